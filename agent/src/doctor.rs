//! `trustmig doctor`: check a host the way an operator would before trusting it with a
//! migration, and say what to fix. Nothing is changed (a missing AK is reported, not created).
//!
//! Checked: the binary (a test build with fault injection is named), the home and its key's
//! permissions, the configuration, the trust store and the attestation policy (every trusted
//! peer's AK enrolled), whether the agent runs, the TPM (reachable, AK present) when the agent
//! does not hold it, each QEMU VM's QMP socket (and `qemu-img` where its disks need it), the
//! audit trail, the clock (NTP synchronisation, when `timedatectl` can tell), and each peer
//! given with `--peer` (reachable, TLS with pinned identities, and it accepts this agent).

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use trustmig_protocol::order::hex;

use crate::config::Config;
use crate::control::{Reply, Request};
use crate::home::Home;
use crate::identity::Identity;
use crate::trust::KeyList;

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Fine.
    Ok,
    /// Works, but probably not what the operator wants.
    Warn,
    /// A migration will fail.
    Fail,
}

/// One check's result.
#[derive(Clone, Debug)]
pub struct Check {
    /// Outcome.
    pub level: Level,
    /// What was checked and what was found.
    pub what: String,
    /// What to do about it (empty when fine).
    pub fix: String,
}

fn check(level: Level, what: impl Into<String>, fix: impl Into<String>) -> Check {
    Check {
        level,
        what: what.into(),
        fix: fix.into(),
    }
}

/// Run every check for the agent at `home`; `peers` are (name or hex key, `host:port`).
pub async fn run(home: &Home, peers: &[(String, String)]) -> Vec<Check> {
    let mut out = Vec::new();
    let root = home.root().display().to_string();
    if let Err(e) = home.check() {
        out.push(check(
            Level::Fail,
            format!("home {root}: {e}"),
            home.command(&["init"]),
        ));
        return out;
    }
    out.push(build());
    out.push(key_permissions(home));
    let config = match Config::load(&home.config()) {
        Ok(c) => {
            out.push(check(Level::Ok, "configuration loads", ""));
            c
        }
        Err(e) => {
            out.push(check(
                Level::Fail,
                format!("configuration: {e}"),
                "fix config.toml",
            ));
            return out;
        }
    };
    let identity = match Identity::load(home) {
        Ok(i) => {
            out.push(check(Level::Ok, format!("identity {}", hex(&i.id())), ""));
            Some(i)
        }
        Err(e) => {
            out.push(check(
                Level::Fail,
                format!("identity: {e}"),
                "as the message says, or restore identity.key/identity.crt from a backup",
            ));
            None
        }
    };
    let trusted = trust_store(home, &mut out);
    policy(home, &trusted, &mut out);
    agent(home, &config, &mut out).await;
    for vm in &config.vms {
        if let Some(q) = vm.qemu() {
            out.push(qmp(&vm.name, &q.qmp).await);
            out.extend(qemu_img(&vm.name, q));
        }
    }
    out.push(audit_trail(home).await);
    out.push(clock());
    out.push(order_clock(home));
    for (name, addr) in peers {
        out.push(match &identity {
            Some(me) => peer(me, trusted.as_ref(), name, addr).await,
            None => check(
                Level::Fail,
                format!("peer {name}: not checked (no usable identity)"),
                "fix the identity first",
            ),
        });
    }
    out
}

/// Whether this binary is a test build: one with fault injection compiled in obeys
/// `TRUSTMIG_TEST_*` variables that make it crash, lose messages or alter data on purpose. A
/// `--workspace` build has it (the tests crate turns it on); a plain `cargo build` at the root
/// (`default-members`) and `-p trustmig-agent` do not.
fn build() -> Check {
    if crate::fault::ENABLED {
        check(
            Level::Warn,
            "this trustmig binary has fault injection compiled in (a test build)",
            "for real hosts build it alone: cargo build --release -p trustmig-agent",
        )
    } else {
        check(Level::Ok, "a release build (no fault injection)", "")
    }
}

fn key_permissions(home: &Home) -> Check {
    let path = home.identity_key();
    match std::fs::metadata(&path) {
        Ok(m) if m.mode() & 0o077 != 0 => check(
            Level::Fail,
            format!(
                "{} is readable by others (mode {:o})",
                path.display(),
                m.mode() & 0o777
            ),
            format!("chmod 600 {}", path.display()),
        ),
        Ok(m) if m.uid() != rustix::process::geteuid().as_raw() => check(
            Level::Warn,
            format!(
                "{} belongs to uid {}, not to this user",
                path.display(),
                m.uid()
            ),
            "chown the home to the user the agent runs as",
        ),
        Ok(_) => check(Level::Ok, "identity key: mode 0600, owned by this user", ""),
        Err(e) => check(
            Level::Fail,
            format!("{}: {e}", path.display()),
            "restore it",
        ),
    }
}

fn trust_store(home: &Home, out: &mut Vec<Check>) -> Option<KeyList> {
    let root = home.root().display();
    match KeyList::load(&home.operators()) {
        Ok(l) if l.keys().is_empty() => out.push(check(
            Level::Warn,
            "no operator key is trusted: no order can be verified here",
            format!("trustmig trust add-operator --home {root} --name NAME --key KEY.pub"),
        )),
        Ok(l) => out.push(check(
            Level::Ok,
            format!("{} operator key(s) trusted", l.keys().len()),
            "",
        )),
        Err(e) => out.push(check(
            Level::Fail,
            format!("operators: {e}"),
            "fix trust/operators.toml (or re-add with `trustmig trust add-operator`)",
        )),
    }
    match KeyList::load(&home.peers()) {
        Ok(l) => {
            if l.keys().is_empty() {
                out.push(check(
                    Level::Warn,
                    "no peer agent is trusted: no migration can run",
                    format!("trustmig trust add-peer --home {root} --name NAME --key IDENTITY"),
                ));
            } else {
                out.push(check(
                    Level::Ok,
                    format!("{} peer(s) trusted", l.keys().len()),
                    "",
                ));
            }
            Some(l)
        }
        Err(e) => {
            out.push(check(
                Level::Fail,
                format!("peers: {e}"),
                "fix trust/peers.toml (or re-add with `trustmig trust add-peer`)",
            ));
            None
        }
    }
}

fn policy(home: &Home, peers: &Option<KeyList>, out: &mut Vec<Check>) {
    let policy = match trustmig_attest::policy::Policy::from_file(&home.policy()) {
        Ok(p) => p,
        Err(e) => {
            out.push(check(
                Level::Fail,
                format!("attestation policy: {e}"),
                "enroll the peers' AKs (trustmig attest enroll) and allow their executable",
            ));
            return;
        }
    };
    for e in peers.iter().flat_map(|l| l.entries()) {
        let enrolled =
            (policy.trusted_aks.iter()).any(|ak| hex(&ak.agent) == e.key.to_ascii_lowercase());
        out.push(match enrolled {
            true => check(Level::Ok, format!("peer {}: its AK is enrolled", e.name), ""),
            false => check(
                Level::Fail,
                format!("peer {}: no enrolled AK, its attestation will be refused", e.name),
                "trustmig attest enroll (or enroll-request / enroll-challenge / enroll-finish across hosts)",
            ),
        });
    }
}

/// Whether the agent runs, and what needs the operator: its state when it answers, its
/// journal read as at rest when it does not run; the TPM probed only when no agent holds it.
async fn agent(home: &Home, config: &Config, out: &mut Vec<Check>) {
    let answer = match agent_answer(home).await {
        // No answer in time, but the journal is held: an agent runs (its status was slow:
        // it asks each QEMU), and its journal is not to be read as one at rest.
        Answer::None if crate::journal::held(&home.journal_dir()) => Answer::Busy,
        a => a,
    };
    let running = !matches!(answer, Answer::None);
    out.push(match &answer {
        Answer::Status(_) => check(
            Level::Ok,
            "the agent is running (control socket answers)",
            "",
        ),
        Answer::Busy => check(
            Level::Warn,
            "the agent is running (it holds its journal), but its control socket is busy or did not answer in 3 s (starting, or asking slow QEMUs): its state was not read",
            "run doctor again in a moment",
        ),
        Answer::None => check(
            Level::Warn,
            "the agent is not running",
            format!("{} (or systemctl start trustmig)", home.command(&["agent"])),
        ),
    });
    match &answer {
        Answer::Status(v) => out.extend(agent_state(v, home)),
        Answer::Busy => {}
        Answer::None => out.extend(journal_at_rest(home)),
    }
    if running {
        out.push(check(
            Level::Ok,
            "TPM: held by the running agent (it opened it and measured itself at start)",
            "",
        ));
    } else {
        out.push(tpm(config));
    }
}

/// What the agent's control socket answered a status request with.
enum Answer {
    /// Its status.
    Status(serde_json::Value),
    /// It runs, with every control connection taken.
    Busy,
    /// Nothing: it does not run (or does not answer).
    None,
}

async fn agent_answer(home: &Home) -> Answer {
    let mut answer = Answer::None;
    let socket = home.control_socket();
    let call = crate::control::call(&socket, &Request::Status, |r| match r {
        Reply::Status(v) => answer = Answer::Status(v),
        Reply::Error(e) if e.starts_with("busy:") => answer = Answer::Busy,
        _ => {}
    });
    match tokio::time::timeout(Duration::from_secs(3), call).await {
        Ok(Ok(())) => answer,
        _ => Answer::None,
    }
}

/// What a running agent's status says needs the operator: a journal that refuses appends
/// (nothing can start, commit or settle), VMs in doubt or left to the operator.
fn agent_state(status: &serde_json::Value, home: &Home) -> Vec<Check> {
    let mut out = Vec::new();
    if let Some(why) = status.get("journal_broken").and_then(|x| x.as_str()) {
        out.push(check(
            Level::Fail,
            format!("journal: refuses appends ({why}): no order can start, commit or settle here"),
            format!(
                "fix the disk under {}, then restart the agent (its start settles what the file holds)",
                home.journal_dir().display()
            ),
        ));
    }
    let vms = status.get("vms").and_then(|x| x.as_array());
    for vm in vms.into_iter().flatten() {
        let name = vm.get("name").and_then(|x| x.as_str()).unwrap_or("?");
        let needs = match vm.get("qemu").and_then(|x| x.as_str()) {
            Some(state) => [", in doubt", ", left to the operator", ", rolled back, not yet running"]
                .iter()
                .any(|m| state.contains(m))
                .then(|| state.to_string()),
            None => match vm.get("left").and_then(|x| x.as_str()) {
                Some(how) => Some(format!("left to the operator: {how}")),
                None => (vm.get("in_doubt").and_then(|x| x.as_bool()) == Some(true)).then(|| {
                    "stopped, in doubt after a migration: the agent asks its destination until it answers".to_string()
                }),
            },
        };
        if let Some(state) = needs {
            out.push(check(
                Level::Warn,
                format!("VM {name}: {state}"),
                format!(
                    "as it says; `{}` shows the journal's records",
                    home.command(&["status"])
                ),
            ));
        }
    }
    if out.is_empty() {
        out.push(check(
            Level::Ok,
            "no VM in doubt or left to the operator; the journal takes appends",
            "",
        ));
    }
    out
}

/// The journal of an agent that does not run, read as its start would: a start refuses a
/// corrupt one; orders it finds interrupted it settles.
fn journal_at_rest(home: &Home) -> Vec<Check> {
    match crate::journal::look(&home.journal_dir(), crate::unix_now()) {
        Err(e) => vec![check(
            Level::Fail,
            format!("journal: {e}: the agent will not start with it"),
            "restore the journal from a backup, or mend the line named (never delete records of orders in flight)",
        )],
        Ok(look) if look.interrupted.is_empty() => vec![check(
            Level::Ok,
            "journal: reads whole, no order interrupted",
            "",
        )],
        Ok(look) => look
            .interrupted
            .iter()
            .map(|r| {
                check(
                    Level::Warn,
                    format!(
                        "journal: order {} (VM {}, {}) was interrupted at {}: the agent's next start settles it",
                        r.order_id, r.vm, r.role, r.state
                    ),
                    format!("start the agent: {}", home.command(&["agent"])),
                )
            })
            .collect(),
    }
}

fn tpm(config: &Config) -> Check {
    let cfg = trustmig_attest::tpm::TpmConfig {
        tcti: config.tpm.tcti.clone(),
        ak_handle: config.tpm.ak_handle,
        pcr: config.tpm.pcr,
    };
    match trustmig_attest::tpm::Tpm::probe(&cfg) {
        Ok(true) => check(
            Level::Ok,
            format!("TPM at {}: reachable, AK at {:#x}", cfg.tcti, cfg.ak_handle),
            "",
        ),
        Ok(false) => check(
            Level::Warn,
            format!("TPM at {}: reachable, but no AK at {:#x} yet", cfg.tcti, cfg.ak_handle),
            "the agent creates it at its first start; then enroll it with the peers",
        ),
        Err(e) => check(
            Level::Fail,
            format!("TPM at {}: {e}", cfg.tcti),
            "check tpm.tcti in config.toml, that the TPM (or swtpm) runs, and /dev/tpmrm0's permissions",
        ),
    }
}

/// The audit trail: its hash chain against the journal, then its anchor in the TPM (SPEC.md
/// §8.10), as `trustmig audit verify` checks them. A running agent appends meanwhile, so a
/// mismatch is looked at twice before it is called one.
async fn audit_trail(home: &Home) -> Check {
    let path = home.journal_dir().join(crate::audit::FILE);
    match std::fs::metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return missing_trail(home).await,
        Err(e) => {
            return check(
                Level::Fail,
                format!("audit trail {}: {e}", path.display()),
                "run the doctor as the agent's user (or root)",
            )
        }
        Ok(_) => {}
    }
    let first = audit_trail_once(home).await;
    if first.level != Level::Fail {
        return first;
    }
    // A write between the journal and the trail, or between an entry and its extend.
    tokio::time::sleep(Duration::from_millis(300)).await;
    audit_trail_once(home).await
}

/// No trail file. `trustmig init` makes one, so none is only fine for a home that never
/// recorded anything; a trail deleted or moved aside still shows in the journal's records (the
/// agent then refuses to start) or in the anchor PCR's extends (§8.10).
async fn missing_trail(home: &Home) -> Check {
    const HOW: &str = "restore the trail from a copy; or, to start a new one, stop the agent and \
                       run `trustmig audit anchor --reason TEXT`, which records why in it";
    match crate::audit::journal_records(&home.journal_dir()) {
        Ok(0) => {}
        Ok(records) => {
            return check(
                Level::Fail,
                format!("audit trail: missing, but the journal holds {records} records: a trail was here (deleted, or moved aside)"),
                HOW,
            )
        }
        Err(e) => {
            return check(
                Level::Fail,
                format!("audit trail: missing, and the journal cannot be read ({e}): whether a trail was here is not known"),
                "make the journal readable (the agent cannot start without it), then run the doctor again",
            )
        }
    }
    match crate::admin::audit_anchor_value(home).await {
        Ok((_, value)) if value == [0; 32] => check(
            Level::Ok,
            "audit trail: none yet (the agent starts one when it first starts)",
            "",
        ),
        Ok((pcr, _)) => check(
            Level::Fail,
            format!("audit trail: missing, but PCR {pcr} holds extends since its last reset: a trail was here (deleted, or moved aside)"),
            HOW,
        ),
        Err(e) => check(
            Level::Warn,
            format!("audit trail: none, and the journal is empty; its anchor PCR could not be read ({e}), so whether one was here is not known"),
            "see the TPM check",
        ),
    }
}

async fn audit_trail_once(home: &Home) -> Check {
    use crate::audit::{anchor, verify_with_journal};
    // The PCR first: the trail only grows, so the PCR read before it folds to a prefix of it.
    let anchor = crate::admin::audit_anchor_value(home).await;
    let v =
        match verify_with_journal(&home.journal_dir()) {
            Ok(v) => v,
            Err(e) => return check(
                Level::Fail,
                format!("audit trail: {e}"),
                "if the agent crashed between a journal write and its trail entry, its next start \
                 writes the entry; otherwise keep the trail as evidence and find out who or what \
                 changed it (`trustmig audit show`)",
            ),
        };
    match anchor {
        Ok((pcr, value)) => match anchor::describe(&v.list, pcr, &value) {
            Ok(said) => check(
                Level::Ok,
                format!("audit trail: {} entries verify; {said}", v.entries),
                "",
            ),
            Err(e) => check(Level::Fail, format!("audit trail: {e}"), anchor::ANCHOR_HOW),
        },
        Err(e) => check(
            Level::Warn,
            format!(
                "audit trail: {} entries verify, not checked against the TPM: {e}",
                v.entries
            ),
            "see the TPM check; an agent that is stopping has no anchor to report",
        ),
    }
}

async fn qmp(vm: &str, path: &std::path::Path) -> Check {
    match trustmig_qemu::qmp::Qmp::connect(path, Duration::from_secs(3)).await {
        Ok(mut q) => match q.query_status().await {
            Ok(st) => check(
                Level::Ok,
                format!(
                    "VM {vm}: QEMU answers on {} ({})",
                    path.display(),
                    st.status
                ),
                "",
            ),
            Err(e) => check(
                Level::Fail,
                format!("VM {vm}: QMP {}: {e}", path.display()),
                "check the QEMU process",
            ),
        },
        // QEMU's QMP socket serves one client at a time: a greeting that does not come is
        // most often another client holding it (a migration, libvirt, an operator's socat),
        // as `status` says, or else a QEMU that is stopped (SIGSTOP) or hung; not a QEMU
        // started without `-qmp`. The two cannot be told apart from here.
        Err(e @ trustmig_qemu::qmp::QmpError::Timeout { .. }) => check(
            Level::Warn,
            format!(
                "VM {vm}: QMP {} is busy, or QEMU does not respond: {e}",
                path.display()
            ),
            "another QMP client may hold the socket (QEMU serves one at a time: a migration, libvirt, a monitor left open), or QEMU is stopped or hung (check its process); a migration needs the socket free",
        ),
        Err(e) => check(
            Level::Fail,
            format!("VM {vm}: QMP {}: {e}", path.display()),
            "start QEMU with -qmp unix:PATH,server=on,wait=off (spec/qemu.md), or fix [[vm]] qmp",
        ),
    }
}

/// `qemu-img`, where a VM needs it: a destination that receives mirrored disks creates qcow2
/// copies with it, and `verify = "full"` maps images with it on both hosts. Without it those
/// migrations fail (rolled back, named) only once they reach that step.
fn qemu_img(vm: &str, q: &crate::config::QemuVm) -> Option<Check> {
    use crate::backend::qemu::QEMU_IMG;
    use crate::config::DiskVerify;
    let why = if q.disks.iter().any(|d| d.verify == Some(DiskVerify::Full)) {
        "verify = \"full\" maps its images"
    } else if q.disk_dir.is_some() {
        "it receives mirrored disks (disk_dir)"
    } else {
        return None;
    };
    Some(match crate::backend::qemu::qemu_img_available() {
        Ok(()) => check(
            Level::Ok,
            format!("VM {vm}: {QEMU_IMG} present ({why})"),
            "",
        ),
        Err(e) => check(
            Level::Fail,
            format!("VM {vm}: {e}, and {why}"),
            "apt install qemu-utils",
        ),
    })
}

/// Whether orders are checked against this host's clock, or the journal overrules it (its
/// newest record more than a week ahead: a clock set back, or one that was ahead then).
fn order_clock(home: &Home) -> Check {
    let look = crate::journal::look(&home.journal_dir(), crate::unix_now());
    match look.ok().and_then(|l| l.order_time.1) {
        None => check(Level::Ok, "orders are checked against this host's clock", ""),
        Some(why) => check(
            Level::Fail,
            format!("order clock: {why}"),
            "set the clock right (NTP); if it is right now and was ahead when that record was written, orders can start once it passes that time",
        ),
    }
}

fn clock() -> Check {
    let out = std::process::Command::new("timedatectl")
        .args(["show", "-p", "NTPSynchronized", "--value"])
        .output();
    match out {
        Ok(o) if o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "yes" => {
            check(Level::Ok, "clock: synchronised (NTP)", "")
        }
        Ok(o) if o.status.success() => check(
            Level::Warn,
            "clock: not synchronised; orders are valid for a window of time and agents more than 60 s apart refuse each other's orders",
            "enable NTP (timedatectl set-ntp true)",
        ),
        _ => check(
            Level::Warn,
            "clock: cannot tell whether it is synchronised (no timedatectl / systemd)",
            "make sure NTP (chrony, ntpd) keeps it right",
        ),
    }
}

async fn peer(me: &Identity, trusted: Option<&KeyList>, name: &str, addr: &str) -> Check {
    let key = trusted.and_then(|l| {
        l.entries()
            .find(|e| e.name == name || e.key.eq_ignore_ascii_case(name))
            .and_then(|e| ::hex::decode(&e.key).ok()?.try_into().ok())
    });
    let Some(key) = key else {
        return check(
            Level::Fail,
            format!("peer {name}: not in the trust store"),
            format!("trustmig trust add-peer --home HOME --name {name} --key IDENTITY"),
        );
    };
    match crate::net::tls::dial(me, addr, key, Duration::from_secs(5)).await {
        Ok(mut tls) => {
            // TLS 1.3: a peer that does not trust us refuses after our Finished; one that does
            // waits for our first message.
            let mut b = [0u8; 1];
            match tokio::time::timeout(Duration::from_millis(700), tls.read(&mut b)).await {
                Err(_) => check(Level::Ok, format!("peer {name} at {addr}: reachable, mutual TLS accepted"), ""),
                Ok(Ok(_)) | Ok(Err(_)) => check(
                    Level::Fail,
                    format!("peer {name} at {addr}: refused this agent (does it trust {}?)", hex(&me.id())),
                    "on the peer: trustmig trust add-peer --name NAME --key <this identity>",
                ),
            }
        }
        Err(e) => check(
            Level::Fail,
            format!("peer {name} at {addr}: {e}"),
            "check the address, the peer agent, and firewalls; a pinned-identity mismatch means a different agent answers there",
        ),
    }
}
