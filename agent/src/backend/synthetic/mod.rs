//! The synthetic guest backend: a VM whose memory lives in the agent (`crate::guest`), moved
//! page by page by the protocol's pre-copy engines over N sealed data streams.
//! spec: SPEC.md §8.1–8.6

mod dest;

mod source;

pub(crate) use dest::SyntheticDest;
pub(crate) use source::SyntheticSource;

use std::sync::Arc;

use trustmig_protocol::precopy::GuestMemory;

use crate::config::SyntheticVm;
use crate::ctx::Ctx;
use crate::guest::SyntheticGuest;

/// Run the guest `vm` here again after a settlement gave it back: as it was parked at the
/// lost session, or anew after a restart (its memory lived in the process). Never over a VM of
/// the same name that runs here (arrival is refused while in doubt; this is the last guard).
pub(crate) fn resume_given_back(ctx: &Arc<Ctx>, vm: &str, cfg: &SyntheticVm) -> String {
    let parked = ctx.parked.lock().expect("parked lock").remove(vm);
    let (mut g, how) = match parked {
        Some(g) => (g, "the VM runs on the source again, its memory untouched"),
        None => match fresh_guest(vm, cfg) {
            Ok(g) => (
                g,
                "the synthetic guest starts again here (its memory did not survive the restart)",
            ),
            Err(e) => return format!("the synthetic guest cannot start again here: {e}"),
        },
    };
    g.set_throttle(0);
    g.resume();
    let mut vms = ctx.vms.lock().expect("vms lock");
    if vms.contains_key(vm) {
        return "another VM of that name runs here; this copy stays stopped".into();
    }
    vms.insert(vm.to_string(), g);
    how.into()
}

/// A new guest for `cfg`, if this host has the memory for it now: the memory check at the
/// agent's start left out a VM whose order was in doubt, and an allocation that fails aborts
/// the whole agent.
fn fresh_guest(vm: &str, cfg: &SyntheticVm) -> Result<SyntheticGuest, crate::error::AgentError> {
    let pages = cfg.size_mib.saturating_mul(1 << 20) / crate::guest::PAGE_SIZE as u64;
    let _room = dest::Room::take(pages)?;
    SyntheticGuest::new(vm, cfg).map_err(|e| crate::error::AgentError::Refused(e.to_string()))
}

/// The guest `vm` runs on its destination: the copy parked here goes.
pub(crate) fn forget(ctx: &Ctx, vm: &str) -> String {
    ctx.parked.lock().expect("parked lock").remove(vm);
    "this host keeps no copy".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest given back after a restart that this host has no memory for is refused by
    /// name, not allocated (which aborted the agent); one that fits starts.
    #[test]
    fn a_guest_given_back_must_fit_first() {
        let mut cfg = SyntheticVm {
            size_mib: 1 << 30, // a PiB
            dirty_pages_per_sec: 0,
            hot_fraction: 0.1,
            fill_fraction: 0.5,
            seed: 1,
        };
        let e = fresh_guest("v", &cfg).err().expect("refused").to_string();
        assert!(
            e.contains("does not fit") || e.contains("MemAvailable"),
            "{e}"
        );
        cfg.size_mib = 1;
        if crate::guest::mem_available().is_some() {
            assert!(fresh_guest("v", &cfg).is_ok());
        }
    }
}
