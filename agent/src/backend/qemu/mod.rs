//! QEMU sidecar mode: trustmig carries QEMU's own migration stream through the attested
//! session and gates the switch-over. spec: spec/qemu.md, SPEC.md §8.5.1
//!
//! ```text
//! source QEMU --unix--> source agent ==sealed HypervisorStream records, stream 0==> destination agent --unix--> destination QEMU
//!             <--unix-- (return path) <==sealed records, same TCP connection, D->S keys== <--unix--
//! ```
//! Source (`source.rs`): the agent listens on a unix socket in its home, sets `pause-before-switchover`,
//! `return-path` and `events`, a `downtime-limit` on the ladder up to the order's target and
//! the order's `max-bandwidth`, then `migrate uri=unix:PATH`. QEMU pre-copies by itself; the
//! agent reports `query-migrate` as progress and applies the order's non-convergence action.
//! At `pre-switchover` (guest stopped) the agent lets QEMU send the rest (`migrate-continue`),
//! because the final digest must cover every stream byte, the device state included. With the
//! return path, the source QEMU completes only after the destination QEMU loaded everything.
//! Then SwitchOver, FinalChallenge, FinalEvidence over the digest of the whole stream, Ready,
//! journalled Commit. Before Commit any failure cancels the migration and runs `cont` on the
//! source; after it the source QEMU stays stopped (`postmigrate`) for good.
//!
//! Destination (`dest.rs`): QEMU runs with `-incoming defer -S`; the agent runs `migrate-incoming
//! uri=unix:PATH` (QEMU listens on a path in the agent's home) and feeds it what it opens. It
//! runs `cont` only after the final evidence verified against its own digest of every byte it
//! fed and `Commit` came. On any failure before that it never runs `cont` and discards the
//! destination QEMU with `quit`.

mod dest;
pub mod disk;
mod giveback;
mod pumps;
mod reconcile;
mod source;

use std::path::{Path, PathBuf};

use trustmig_protocol::handshake::Established;
use trustmig_protocol::keys::{Direction, TrafficSecret};
use trustmig_protocol::order::hex;

use crate::config::{Config, VmConfig};
use crate::daemon::Ctx;
use crate::error::AgentError;

pub(crate) use dest::QemuDest;
pub(crate) use giveback::give_back;
pub(crate) use reconcile::reconcile_all;
pub(crate) use source::QemuSource;
use source::MAX_DOWNTIME_STEPS;

/// Validate a `backend = "qemu"` entry (called from config validation).
pub fn check_vm_config(vm: &VmConfig) -> Result<(), String> {
    let Some(qmp) = &vm.qmp else {
        return Err(format!(
            "vm {:?}: backend \"qemu\" needs qmp = \"/path/to/qmp.sock\"",
            vm.name
        ));
    };
    if !qmp.is_absolute() {
        return Err(format!(
            "vm {:?}: qmp {:?} must be an absolute path",
            vm.name,
            qmp.display().to_string()
        ));
    }
    if qmp.as_os_str().len() > 107 {
        return Err(format!(
            "vm {:?}: qmp path is longer than a unix socket path may be (107 bytes)",
            vm.name
        ));
    }
    if vm.downtime_steps.is_some_and(|n| n > MAX_DOWNTIME_STEPS) {
        return Err(format!(
            "vm {:?}: downtime_steps must be at most {MAX_DOWNTIME_STEPS}",
            vm.name
        ));
    }
    disk::check_vm_config(vm)
}

/// The QMP socket of `vm` when this agent hosts it with the QEMU backend.
pub fn qemu_vm(config: &Config, vm: &str) -> Option<PathBuf> {
    config
        .vms
        .iter()
        .find(|v| v.name == vm && v.backend == "qemu")
        .and_then(|v| v.qmp.clone())
}

/// A private directory in the agent's home for the unix sockets QEMU talks to.
fn socket_dir(ctx: &Ctx) -> Result<PathBuf, AgentError> {
    use std::os::unix::fs::PermissionsExt;
    let dir = ctx.home.root().join("qemu");
    std::fs::create_dir_all(&dir).map_err(AgentError::io(&dir))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(AgentError::io(&dir))?;
    Ok(dir)
}

fn socket_path(dir: &Path, role: &str, order_id: &[u8; 16]) -> Result<PathBuf, AgentError> {
    let p = dir.join(format!("{role}-{}.sock", &hex(order_id)[..16]));
    if p.as_os_str().len() > 107 {
        return Err(AgentError::Migration(format!(
            "unix socket path {} is too long (107 bytes at most): use a shorter agent home",
            p.display()
        )));
    }
    let _ = std::fs::remove_file(&p);
    Ok(p)
}

fn stream_secret(est: &Established, dir: Direction) -> TrafficSecret {
    est.keys.stream_secret(dir, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation_names_the_problem() {
        let vm = |qmp: Option<&str>| crate::config::test_qemu_vm(qmp, None);
        assert!(check_vm_config(&vm(Some("/run/q.sock"))).is_ok());
        assert!(check_vm_config(&vm(Some("q.sock")))
            .unwrap_err()
            .contains("absolute"));
        assert!(check_vm_config(&vm(None)).unwrap_err().contains("qmp"));
        let long = format!("/{}", "x".repeat(200));
        assert!(check_vm_config(&vm(Some(&long)))
            .unwrap_err()
            .contains("longer"));
        let mut steep = vm(Some("/run/q.sock"));
        steep.downtime_steps = Some(MAX_DOWNTIME_STEPS + 1);
        assert!(check_vm_config(&steep)
            .unwrap_err()
            .contains("downtime_steps must be at most 10"));
        steep.downtime_steps = Some(MAX_DOWNTIME_STEPS);
        assert!(check_vm_config(&steep).is_ok());
    }
}
