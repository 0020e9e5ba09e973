//! Showing a migration to a person (progress bar on a terminal, lines otherwise) or a machine
//! (`--json`: one JSON object per line).

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

use crate::control::{Progress, Reply, Summary};

/// Renders replies from the agent.
pub struct Display {
    json: bool,
    bar: Option<ProgressBar>,
    /// The summary, once done.
    pub summary: Option<Summary>,
    /// The failure, if any.
    pub failure: Option<String>,
}

/// The first 16 characters of an id from the agent's reply (all of it if shorter, or if 16
/// bytes would cut a character): a reply from another version, or another process on the
/// socket, is shown, not a panic.
pub fn short(id: &str) -> &str {
    id.get(..16).unwrap_or(id)
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

impl Display {
    /// A display; `json` selects machine output.
    pub fn new(json: bool) -> Self {
        let bar = (!json && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::new(0);
            b.set_style(
                ProgressStyle::with_template("{spinner} round {prefix} [{bar:30}] {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b
        });
        Self {
            json,
            bar,
            summary: None,
            failure: None,
        }
    }

    fn line(&self, s: String) {
        match &self.bar {
            Some(b) => b.println(s),
            None => eprintln!("{s}"),
        }
    }

    /// Show one reply.
    pub fn show(&mut self, r: Reply) {
        if self.json {
            if let Ok(s) = serde_json::to_string(&r) {
                println!("{s}");
            }
        }
        match r {
            Reply::Progress(p) => self.progress(p),
            Reply::Error(e) => self.failure = Some(e),
            _ => {}
        }
    }

    fn progress(&mut self, p: Progress) {
        let human = !self.json;
        match p {
            Progress::Queued { ahead } if human => self.line(format!(
                "queued: the agent's concurrent migrations are at their limit ({ahead} orders ahead)"
            )),
            Progress::Connected { peer } if human => {
                self.line(format!("connected to destination {}", short(&peer)))
            }
            Progress::Attested { streams } if human => self.line(format!(
                "mutual attestation verified; {streams} sealed data streams open"
            )),
            Progress::Round {
                round,
                pages,
                bytes,
                dirty_pages,
                dirty_rate,
                predicted_downtime_ms,
                throttle,
                bandwidth,
                total_bytes,
                guest_pages,
            } if human => {
                let msg = format!(
                    "round {round}: sent {pages} pages ({:.1} MiB) at {:.0} MiB/s, dirty rate {dirty_rate} pages/s, {dirty_pages} dirty, predicted downtime {} ms{}",
                    mib(bytes),
                    mib(bandwidth),
                    if predicted_downtime_ms == u64::MAX { "∞".to_string() } else { predicted_downtime_ms.to_string() },
                    if throttle > 0 { format!(", throttle {throttle}%") } else { String::new() }
                );
                match &self.bar {
                    Some(b) => {
                        // Saturating: the page count is the hypervisor's (QEMU's `ram.total`).
                        let guest_bytes = guest_pages.saturating_mul(4096);
                        b.set_length(guest_bytes);
                        b.set_position(total_bytes.min(guest_bytes));
                        b.set_prefix(round.to_string());
                        b.set_message(format!(
                            "{:.0} MiB/s, predicted downtime {predicted_downtime_ms} ms",
                            mib(bandwidth)
                        ));
                        b.println(msg);
                    }
                    None => eprintln!("{msg}"),
                }
            }
            Progress::Mirror { done, total, ready } if human => self.line(if ready {
                format!(
                    "disks mirrored ({:.1} MiB) and in step; migrating memory",
                    mib(done)
                )
            } else {
                format!("mirroring disks: {:.1} of {:.1} MiB", mib(done), mib(total))
            }),
            Progress::SwitchOver { pages } if human => self.line(format!(
                "switch-over: guest paused, sending the last {pages} pages"
            )),
            Progress::Committed if human => {
                self.line("final evidence verified by the destination; COMMIT journalled".into())
            }
            Progress::Done(s) => {
                if let Some(b) = self.bar.take() {
                    b.finish_and_clear();
                }
                self.summary = Some(s);
            }
            Progress::Failed { error, vm } => {
                if let Some(b) = self.bar.take() {
                    b.abandon();
                }
                self.failure = Some(format!("{error}; VM: {vm}"));
            }
            _ => {}
        }
    }
}

/// The summary as text.
pub fn summary_text(s: &Summary) -> String {
    let per_round: Vec<String> = s
        .bytes_per_round
        .iter()
        .map(|b| format!("{:.1}", mib(*b)))
        .collect();
    format!(
        "migration {} of {} complete\n  guest memory        {:.0} MiB\n  total time          {} ms\n  downtime            {} ms (target {} ms{})\n  rounds              {} (+ stop-and-copy of {} pages)\n  bytes on the wire   {:.1} MiB\n  MiB per round       {}\n  zero pages skipped  {}\n  throughput          {:.0} MiB/s\n  throttle            {}%\n",
        short(&s.order_id),
        s.vm,
        mib(s.guest_bytes),
        s.total_ms,
        s.downtime_ms,
        s.downtime_target_ms,
        if s.converged { ", converged" } else { ", forced: did not converge" },
        s.rounds,
        s.stop_copy_pages,
        mib(s.bytes_on_wire),
        per_round.join(" "),
        s.zero_pages_skipped,
        mib(s.throughput_bps),
        s.throttle,
    ) + &if s.final_quote.is_empty() {
        String::new()
    } else {
        format!("  final TPM quote     {}\n", s.final_quote)
    } + if s.handed_over_paused {
        "  handed over paused  it was stopped at the switch-over: it runs once its operator runs `cont` on the destination\n"
    } else {
        ""
    } + &if s.disk_bytes > 0 {
        format!(
            "  disks mirrored      {:.1} MiB in {} ms before memory moved\n",
            mib(s.disk_bytes),
            s.disk_ms
        )
    } else {
        String::new()
    }
}

/// The agent's status (as the control socket returns it) as text: identity, hosted VMs,
/// and the journal's latest record per migration (in flight first).
pub fn status_text(v: &serde_json::Value) -> String {
    let str_of = |v: &serde_json::Value, k: &str| {
        v.get(k).and_then(|x| x.as_str()).unwrap_or("?").to_string()
    };
    let mut out = format!(
        "agent {} listening on {}\n",
        str_of(v, "identity"),
        str_of(v, "listen")
    );
    let vms = v
        .get("vms")
        .and_then(|x| x.as_array())
        .cloned()
        .unwrap_or_default();
    if let Some(why) = v.get("journal_broken").and_then(|x| x.as_str()) {
        out += &format!("JOURNAL BROKEN: {why}: no order can start, commit or settle here until the agent restarts\n");
    }
    out += &format!("VMs hosted here: {}\n", vms.len());
    if let Some(limit) = v.get("max_concurrent_migrations").and_then(|x| x.as_u64()) {
        let sending = v.get("sending").and_then(|x| x.as_u64()).unwrap_or(0);
        out += &format!("Sending: {sending} of at most {limit} at once\n");
    }
    for q in v
        .get("queued")
        .and_then(|x| x.as_array())
        .into_iter()
        .flatten()
    {
        out += &format!(
            "  queued: order {} (VM {})\n",
            str_of(q, "order_id").chars().take(16).collect::<String>(),
            str_of(q, "vm")
        );
    }
    for vm in &vms {
        if let Some(state) = vm.get("qemu").and_then(|x| x.as_str()) {
            out += &format!("  {:20} QEMU: {state}\n", str_of(vm, "name"));
            continue;
        }
        let bytes = vm.get("bytes").and_then(|x| x.as_u64()).unwrap_or(0);
        let paused = vm.get("paused").and_then(|x| x.as_bool()).unwrap_or(false);
        let in_doubt = vm
            .get("in_doubt")
            .and_then(|x| x.as_bool())
            .unwrap_or(false);
        let state = match (in_doubt, paused) {
            (true, _) => "stopped, in doubt: asking its destination (see the journal)",
            (false, true) => "paused",
            (false, false) => "running",
        };
        let left = match vm.get("left").and_then(|x| x.as_str()) {
            Some(how) => format!(", left to the operator: {how}"),
            None => String::new(),
        };
        out += &format!(
            "  {:20} {:>8.0} MiB  {state}{left}\n",
            str_of(vm, "name"),
            mib(bytes),
        );
    }
    let mut journal = v
        .get("journal")
        .and_then(|x| x.as_array())
        .cloned()
        .unwrap_or_default();
    // In flight (claimed or committed, not done) first.
    journal.sort_by_key(|r| !matches!(str_of(r, "state").as_str(), "claimed" | "committed"));
    out += "migrations (latest state per order, newest first; in flight on top):\n";
    if journal.is_empty() {
        out += "  none\n";
    }
    for r in &journal {
        let order = str_of(r, "order_id");
        out += &format!(
            "  {}  {:11} {:12} {:16} {}\n",
            short(&order),
            str_of(r, "role"),
            str_of(r, "state"),
            str_of(r, "vm"),
            str_of(r, "note")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ids from a reply are shortened where they can be, shown whole where they cannot: a
    /// short, empty or multi-byte one is no panic (it was a slice at byte 16).
    #[test]
    fn ids_from_a_reply_are_shortened_without_panicking() {
        assert_eq!(short(&"ab".repeat(16)), "abababababababab");
        assert_eq!(short("abc"), "abc");
        assert_eq!(short(""), "");
        let wide = "é".repeat(10); // 20 bytes: byte 16 ends the eighth character
        assert_eq!(short(&wide), "é".repeat(8));
        let cut = format!("a{}", "é".repeat(10)); // byte 16 falls inside a character
        assert_eq!(short(&cut), cut);
        // What the CLI shows of a reply with a short id: no panic (it sliced at byte 16; human
        // lines, this test's stderr being no terminal).
        let mut d = Display::new(false);
        d.show(Reply::Progress(Progress::Connected {
            peer: "short".into(),
        }));
    }

    /// The operator reads that the guest waits, paused, on the destination, and only then.
    #[test]
    fn the_summary_says_when_the_guest_was_handed_over_paused() {
        let s = Summary {
            order_id: "00".repeat(16),
            vm: "v".into(),
            ..Summary::default()
        };
        assert!(!summary_text(&s).contains("handed over paused"));
        let paused = Summary {
            handed_over_paused: true,
            ..s
        };
        let text = summary_text(&paused);
        assert!(
            text.contains("handed over paused") && text.contains("`cont` on the destination"),
            "{text}"
        );
    }
}
