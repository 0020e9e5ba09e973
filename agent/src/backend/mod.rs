//! VM backends: what differs between the VMs the agent can move. Each is a handful of verbs
//! behind the traits in this module; the drivers (`driver/`) own everything else (order,
//! claim, channel, attestation, commit, settlement, journal, progress).
//!
//! - `synthetic`: the built-in memory guest, moved by the protocol's own pre-copy engine.
//! - `qemu`: a QEMU VM, whose own migration stream the agent carries (sidecar mode).

pub mod qemu;
pub(crate) mod synthetic;

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use trustmig_protocol::handshake::Established;
use trustmig_protocol::manifest::{DiskManifest, ImageManifest};
use trustmig_protocol::messages::TransferMode;
use trustmig_protocol::migration::SourceMigration;
use trustmig_protocol::order::VerifiedOrder;
use trustmig_protocol::Digest;

use crate::attestation::SharedTpm;
use crate::config::VmBackend;
use crate::control::{Progress, Summary};
use crate::ctx::Ctx;
use crate::driver::channel::SourceChannel;
use crate::error::AgentError;

/// What a source backend asks of the handshake.
pub(crate) struct Offer {
    /// How the VM travels.
    pub mode: TransferMode,
    /// Data streams to open.
    pub streams: u16,
    /// The image manifest; its root is extended into the TPM before the quote.
    pub manifest: ImageManifest,
}

/// What the source driver lends a backend for the transfer.
pub(crate) struct SourceLink<'a> {
    /// The agent.
    pub ctx: &'a Arc<Ctx>,
    /// The control channel (a destination's `Abort` arrives here).
    pub chan: &'a mut SourceChannel,
    /// The order.
    pub order: &'a VerifiedOrder,
    /// The attested session: keys, channel binding, transcript.
    pub est: &'a Established,
    /// The commit machine (fed any control message that arrives during the transfer).
    pub sm: &'a mut SourceMigration,
    /// Progress for the operator.
    pub progress: &'a mpsc::Sender<Progress>,
}

impl SourceLink<'_> {
    /// The guest is handed over `paused` or not, as it is at the switch-over, which is not what
    /// the claim read (an operator stopped or ran it since). Journalled now, for what reads it:
    /// the `SwitchOver`, a give-back, a settlement, a restart (spec/qemu.md §4).
    pub fn hands_over(&self, paused: bool) -> Result<(), AgentError> {
        self.ctx
            .journal
            .lock()
            .expect("journal lock")
            .hand_over_changed(self.order.id(), paused)
    }

    /// Report progress (the operator may have gone away: the migration goes on).
    pub async fn report(&self, p: Progress) {
        if matches!(p, Progress::Round { .. }) {
            crate::fault::crash_point(crate::fault::CrashPoint::SourceMidTransfer);
        }
        let _ = self.progress.send(p).await;
    }

    /// A control message from the destination during the transfer, where it says nothing
    /// unless it aborts: its `Abort` (or garbage, or the channel's end) ends the transfer.
    pub fn peer_message(
        &mut self,
        msg: Option<Result<Vec<u8>, AgentError>>,
    ) -> Result<(), AgentError> {
        let msg =
            msg.ok_or_else(|| AgentError::transport(crate::error::Link::Control, "closed"))??;
        self.sm
            .handle(&msg, &mut SharedTpm::new(&self.ctx.attester))?;
        Ok(())
    }
}

/// What a finished transfer hands to the switch-over.
pub(crate) struct Transferred {
    /// Records sent per data stream (`SwitchOver`).
    pub stream_records: Vec<u64>,
    /// The final image digest (SPEC.md §8.5).
    pub digest: Digest,
    /// When the guest stopped: its downtime runs from here to `Resumed`.
    pub paused_at: Instant,
    /// Bytes of the VM's own stream, for the throughput figure.
    pub stream_bytes: u64,
    /// The backend's part of the summary (the driver fills in order, times and throughput).
    pub summary: Summary,
    /// Tasks that must outlive the commit exchange (a QEMU return path); aborted on drop.
    pub tasks: Tasks,
    /// The backend's steps of the switch-over, when each happened (the summary's timeline).
    pub steps: Vec<(&'static str, Instant)>,
}

/// Spawned tasks of a transfer, aborted when dropped: a failed transfer leaves none behind.
#[derive(Default)]
pub(crate) struct Tasks(Vec<JoinHandle<()>>);

impl Tasks {
    /// Run `f` until it ends or this is dropped.
    pub fn spawn(&mut self, f: impl std::future::Future<Output = ()> + Send + 'static) {
        self.0.push(tokio::spawn(f));
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// A VM leaving this host, as its backend moves it. The source driver (`driver::source`)
/// calls these in order: `offer`, `transfer`, then on failure `give_back` (never committed, or
/// settled "not moved") or `keep_stopped` (in doubt).
pub(crate) trait SourceVm {
    /// The backend's name (metrics).
    const NAME: &'static str;
    /// Handshake parameters: transfer mode, data streams, image manifest.
    async fn offer(&mut self, ctx: &Arc<Ctx>) -> Result<Offer, AgentError>;
    /// Move the VM up to the guest's stop and the end of every data stream. A failure of the
    /// transport is [`AgentError::Transport`] naming the link, so the driver can ask the
    /// destination why.
    async fn transfer(&mut self, link: SourceLink<'_>) -> Result<Transferred, AgentError>;
    /// The summary's `memory_checksum`, asked once the destination resumed (so a checksum of
    /// the whole guest never counts as downtime): what the operator compares with the
    /// destination's copy.
    fn memory_checksum(&self, digest: &Digest) -> String;
    /// Whether, after a failure, the driver waits for the destination to discard its copy
    /// before [`Self::give_back`]: a loaded destination QEMU may hold the images' locks that
    /// the source's `cont` needs. A synthetic guest needs no such wait.
    fn waits_for_discard(&self) -> bool {
        false
    }
    /// The migration did not commit: the VM runs here again as it was before, unless
    /// `paused` (paused at the claim or at the switch-over, the journal says: it stays so).
    /// Returns where the VM is, for the operator.
    async fn give_back(self, ctx: &Arc<Ctx>, paused: bool) -> String;
    /// In doubt after COMMIT: keep the VM stopped as it is until the settlement decides
    /// (`settle.rs` finds it again by name).
    fn keep_stopped(self, ctx: &Arc<Ctx>);
}

/// What arrived, once every data stream ended and the backend checked it.
pub(crate) struct Arrived {
    /// Records received per data stream (compared with the source's `SwitchOver`).
    pub stream_records: Vec<u64>,
    /// The final image digest of what arrived (SPEC.md §8.5), to check the source's evidence.
    pub digest: Digest,
}

/// A VM arriving on this host, as its backend receives it. The destination driver
/// (`driver::destination`) calls `start`, then waits on `arrived` while it reads the control
/// channel; on `Commit` (journalled) `resume`; on any failure before that, `discard`.
pub(crate) trait DestVm {
    /// Whether this backend can hand a VM over paused (`SwitchOver.paused`); a source that
    /// asks one that cannot is refused before COMMIT (the source's VM runs on).
    const HANDS_OVER_PAUSED: bool;
    /// Start receiving in the background on the session's data connections (`conns`, in the
    /// order they arrive): bind each stream by its `StreamInit`, read and check what it carries.
    fn start(
        &mut self,
        ctx: &Arc<Ctx>,
        est: Established,
        conns: mpsc::Receiver<crate::ctx::DataConn>,
    ) -> Result<(), AgentError>;
    /// Cancel-safe (it waits in a `select!`): what arrived, once every stream ended.
    async fn arrived(&mut self) -> Result<Arrived, AgentError>;
    /// A counter that moves while data arrives, for the driver's silence check (`None`: the
    /// backend has no such measure and relies on its own timeouts).
    fn activity(&self) -> Option<u64>;
    /// How much longer than a step timeout the source may be silent: while both agents hash
    /// images in full (`verify = "full"`), nothing moves, and that is no failure.
    fn silence_allowance(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
    /// `Commit` arrived and is journalled: the VM is this host's. Run it, unless `paused`: it
    /// was paused at the source before the migration, and is handed over paused, as it was
    /// (only where [`Self::HANDS_OVER_PAUSED`]).
    async fn resume(&mut self, ctx: &Arc<Ctx>, paused: bool) -> Result<(), AgentError>;
    /// Before COMMIT: discard what arrived; it never runs here.
    async fn discard(self, ctx: &Arc<Ctx>);
}

/// The image manifest a source attests for `vm`: its configuration digest and its disks
/// (empty with shared storage). spec: SPEC.md §6.3
pub fn vm_manifest(
    ctx: &Ctx,
    vm: &str,
    chunk_size: u32,
    disks: Vec<DiskManifest>,
) -> ImageManifest {
    let config = ctx.config();
    let vm_cfg = config.vm(vm);
    let config_digest =
        trustmig_protocol::sha256(&[toml::to_string(&vm_cfg).unwrap_or_default().as_bytes()]);
    ImageManifest {
        vm: vm.into(),
        config_digest,
        chunk_size,
        disks,
        mirrors: Vec::new(),
    }
}

/// Settlement gave the VM back to this host (its destination never committed, or the operator
/// said so): run it again as it was before the migration, as its backend keeps it. Returns
/// where the VM is, for the operator. spec: SPEC.md §8.8
pub(crate) async fn resume_given_back(ctx: &Arc<Ctx>, vm: &str, paused_before: bool) -> String {
    match ctx.config().vm(vm).map(|v| &v.backend) {
        Some(VmBackend::Qemu(q)) => qemu::resume_given_back(ctx, vm, &q.qmp, paused_before).await,
        Some(VmBackend::Synthetic(s)) => synthetic::resume_given_back(ctx, vm, s),
        None => "no such VM is configured here any more".into(),
    }
}

/// Settlement decided the VM runs on its destination: drop what this host keeps of it.
/// Returns what stays here, for the operator.
pub(crate) fn forget_moved(ctx: &Ctx, vm: &str) -> String {
    match ctx.config().vm(vm).map(|v| &v.backend) {
        Some(VmBackend::Qemu(_)) => {
            "its QEMU here stays stopped (postmigrate) for good: shut it down when convenient"
                .into()
        }
        _ => synthetic::forget(ctx, vm),
    }
}
