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
        None => (
            SyntheticGuest::new(vm, cfg),
            "the synthetic guest starts again here (its memory did not survive the restart)",
        ),
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

/// The guest `vm` runs on its destination: the copy parked here goes.
pub(crate) fn forget(ctx: &Ctx, vm: &str) -> String {
    ctx.parked.lock().expect("parked lock").remove(vm);
    "this host keeps no copy".into()
}
