//! `trustmig demo`: the whole product on one machine with embedded defaults.

use trustmig_protocol::order::{Limits, NonConvergence};

use crate::control::Summary;
use crate::error::AgentError;
use crate::harness::{Pair, VmSpec};
use crate::progress::{summary_text, Display};

/// Demo settings.
pub struct DemoArgs {
    /// The VM.
    pub vm: VmSpec,
    /// Data streams.
    pub streams: u16,
    /// Order limits.
    pub limits: Limits,
    /// Machine output.
    pub json: bool,
    /// Keep the temp dir.
    pub keep: bool,
}

impl Default for DemoArgs {
    fn default() -> Self {
        Self {
            vm: VmSpec::default(),
            streams: 2,
            limits: Limits {
                // Tight enough that a busy guest shows iterative pre-copy rounds.
                downtime_ms: 100,
                bandwidth_bps: 0,
                max_rounds: 30,
                on_nonconvergence: NonConvergence::Throttle,
            },
            json: false,
            keep: false,
        }
    }
}

fn say(json: bool, s: &str) {
    if !json {
        eprintln!("{s}");
    }
}

/// Run the demo; returns the summary after checking the destination's memory.
pub async fn run(a: DemoArgs) -> Result<Summary, AgentError> {
    let exe = std::env::current_exe().map_err(AgentError::io("/proc/self/exe"))?;
    say(
        a.json,
        "setting up: two swtpm TPMs with EK certificates, two agent homes, an operator key,",
    );
    say(
        a.json,
        "            mutual trust, and AK enrollment (MakeCredential/ActivateCredential) both ways",
    );
    let mut pair = tokio::task::block_in_place(|| Pair::create(&exe, &a.vm, a.streams))?;
    tokio::task::block_in_place(|| pair.start_both())?;
    say(
        a.json,
        &format!(
            "agents up: source {} and destination {} on {}",
            &hex::encode(pair.src_id)[..16],
            &hex::encode(pair.dst_id)[..16],
            pair.dst_addr
        ),
    );
    let order = pair.order(&a.vm.name, a.limits.clone(), 600)?;
    say(
        a.json,
        &format!(
            "order {} signed: move {} ({} MiB, dirtying {} pages/s) with downtime target {} ms",
            &hex::encode(order.dangerous_unverified_body()?.order_id)[..16],
            a.vm.name,
            a.vm.size_mib,
            a.vm.dirty_pages_per_sec,
            a.limits.downtime_ms
        ),
    );
    let mut display = Display::new(a.json);
    let r = pair.migrate(&order, |r| display.show(r)).await;
    if let Some(f) = r.err().map(|e| e.to_string()).or(display.failure.take()) {
        return Err(AgentError::Migration(format!("{f}\n{}", pair.log_tails(8))));
    }
    let summary = display
        .summary
        .ok_or_else(|| AgentError::Migration("the source agent ended without a summary".into()))?;
    let (dst_sum, dst_paused) = Pair::checksum(&pair.dst, &a.vm.name).await?;
    if dst_sum != summary.memory_checksum {
        return Err(AgentError::Migration(format!(
            "destination memory {dst_sum} differs from source memory at pause {}",
            summary.memory_checksum
        )));
    }
    if dst_paused {
        return Err(AgentError::Migration(
            "destination VM is not running".into(),
        ));
    }
    if !a.json {
        eprint!("{}", summary_text(&summary));
        eprintln!(
            "  memory check        destination memory equals source memory at pause (BLAKE3 {}…)",
            crate::progress::short(&dst_sum)
        );
        eprintln!("  destination VM      running");
    }
    if a.keep {
        let kept = pair.keep();
        say(
            a.json,
            &format!(
                "kept {} (homes, journals, agent logs); agents stopped — restart one with `trustmig agent --home {}/destination`",
                kept.display(),
                kept.display()
            ),
        );
    }
    Ok(summary)
}
