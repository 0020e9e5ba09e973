//! The source side of the QEMU sidecar: QEMU migrates into a unix socket the agent owns, the
//! agent seals the stream onto the attested session and drives the switch-over. spec: spec/qemu.md §3

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use trustmig_protocol::handshake::Established;
use trustmig_protocol::hvstream::final_digest;
use trustmig_protocol::keys::Direction;
use trustmig_protocol::manifest::MAX_MIRRORED;
use trustmig_protocol::messages::TransferMode;
use trustmig_protocol::order::{Limits, NonConvergence, OrderBody, VerifiedOrder};
use trustmig_protocol::precopy::{PrecopyError, THROTTLE_STEPS};
use trustmig_protocol::record::{Opener, Sealer};
use trustmig_protocol::Digest;

use crate::backend::vm_manifest;
use crate::backend::{Offer, SourceLink, SourceVm, Tasks, Transferred};
use crate::config::{Config, VmConfig, DEFAULT_DOWNTIME_STEPS};
use crate::control::{Progress, Summary};
use crate::ctx::Ctx;
use crate::error::{AgentError, Link};
use crate::net::stream_init;
use trustmig_qemu::qmp::{Event, MigrationInfo, MigrationStatus, Moving, Qmp};

use super::disk::SourceDisk;
use super::giveback::{give_back, Was};
use super::mirror::{Mirrors, Relayed, SourceMirror};
use super::pumps::{open_pump, seal_pump, Carried, Counted, Counting, Received, Sent};
use super::{socket_dir, socket_path, SocketRole};

/// How often `query-migrate` is polled for progress and state.
const POLL: Duration = Duration::from_millis(200);
/// `max-bandwidth` when the order sets no cap (QEMU's own default is 128 MiB/s).
const UNCAPPED_BPS: u64 = 1 << 40;

/// QEMU's largest `downtime-limit` (2000 s): setting it makes QEMU switch over at its next check.
const QEMU_MAX_DOWNTIME_MS: u64 = 2_000_000;
/// QEMU's throttle for `throttle` orders: the native engine's steps (`THROTTLE_STEPS`, 20% then
/// +20% up to 99%), as `cpu-throttle-initial`, `cpu-throttle-increment`, `max-cpu-throttle`.
const THROTTLE_STEP: u8 = 20;
const THROTTLE_MAX: u8 = 99;
/// How long, in rounds and in time (both), an order that says `throttle` waits beyond
/// `max_rounds` for QEMU's throttle to rise before it takes QEMU's heuristic as done with it.
/// QEMU 7.2 looks at the guest's dirty rate at the first sync a second or more after its last
/// look, and raises its throttle at every second look that finds the guest too fast
/// (`qemu_raises_its_throttle_at_no_more_than_every_second_sync`), so its raises come at most
/// about two rounds apart when rounds take over a second and two seconds and a round or two
/// apart when they are shorter (measured: 3.4 s with rounds of 0.8–0.9 s).
const THROTTLE_STEP_ROUNDS: u64 = 4;
const THROTTLE_STEP_WAIT: Duration = Duration::from_secs(8);

/// The ladder's steps for an order allowing `max_rounds`: it reaches the target by the order's
/// last round at the latest, so non-convergence is judged against the target, never a step.
fn ladder_steps(configured: u32, max_rounds: u32) -> u32 {
    configured.min(max_rounds.saturating_sub(1))
}

/// QEMU's downtime-limit (ms) during the first pass when the ladder is on.
const FIRST_PASS_LIMIT_MS: u64 = 1;

/// QEMU's downtime-limit (ms) after `rounds` completed dirty-memory rounds: during the first
/// pass [`FIRST_PASS_LIMIT_MS`], then the order's `target` halved `steps - rounds` times, at
/// least 1 ms, never above `target`; with no steps, `target` from the start.
///
/// Why a ladder: QEMU stops the guest as soon as the memory left to send fits in its limit at
/// the measured bandwidth, even in the middle of the first pass. With the full target from the
/// start, a fast transport buys a large stop-and-copy instead of a short one, so the guest's
/// downtime comes out close to the target whatever it dirties. Starting low lets an idle or
/// slow-dirtying guest finish the first pass and stop with little left; a busy guest still
/// reaches the full target after `steps` rounds (the approach of OpenStack Nova's
/// `live_migration_downtime_steps`). The first pass gets 1 ms, not `target >> steps`: what is
/// left of it is memory the guest has not touched since it began, and with target/8 QEMU still
/// stopped near its end with that tail to send (measured: 26–35 MiB left, 25–37 ms of downtime,
/// in three runs of four; spec/qemu.md §3).
fn downtime_step(target: u64, steps: u32, rounds: u64) -> u64 {
    if steps > 0 && rounds == 0 {
        return FIRST_PASS_LIMIT_MS.min(target);
    }
    let halvings = u64::from(steps).saturating_sub(rounds);
    (target >> halvings.min(63)).max(1).min(target)
}

/// A QEMU VM on its way out: its QMP session (held for the migration's time), its state
/// before the migration, and the disks that travel with it.
pub(crate) struct QemuSource {
    vm: String,
    qmp: Qmp,
    /// The guest was paused when the order claimed it (the claim journals it).
    paused_at_claim: bool,
    /// The guest is stopped, and not by this migration: as read when QEMU starts migrating,
    /// then kept from QEMU's events (`Seen::held`). The switch-over hands it over so, and a
    /// give-back leaves it so.
    held: bool,
    /// QEMU switched over (the guest stopped for it): a guest `held` then is handed over so.
    switched_over: bool,
    /// Read-only disks copied before QEMU's stream (empty with shared storage).
    disks: Vec<SourceDisk>,
    /// Writable disks mirrored live (spec/qemu.md §5).
    mirror_disks: Vec<SourceMirror>,
    /// The mirrors once started (stopped on failure).
    mirrors: Option<Mirrors>,
    /// See `downtime_step`.
    downtime_steps: u32,
    started: Instant,
    /// The stream pumps: they live until the migration is over, failed ones too, so the data
    /// stream closes only after the driver's `Abort` (the destination then names the cause).
    pumps: Tasks,
}

impl QemuSource {
    /// Check that QEMU can migrate `body.vm` (running or paused, not migrating, its disks
    /// fit for transfer); nothing is changed yet.
    pub async fn prepare(
        ctx: &Arc<Ctx>,
        config: &Config,
        body: &OrderBody,
        qmp_path: &Path,
    ) -> Result<Self, AgentError> {
        let mut qmp = Qmp::connect(qmp_path, ctx.step_timeout()).await?;
        let status = qmp.query_status().await?;
        if !matches!(status.status.as_str(), "running" | "paused") {
            return Err(AgentError::Refused(format!(
                "QEMU VM {:?} is in state {:?}; only a running or paused VM can migrate",
                body.vm, status.status
            )));
        }
        let m = qmp.query_migrate().await?;
        if m.in_progress() {
            return Err(AgentError::Refused(format!(
                "QEMU VM {:?} is already migrating (status {})",
                body.vm,
                m.status()
            )));
        }
        let cfg = config.vm(&body.vm).and_then(VmConfig::qemu);
        // Disks that travel (spec/qemu.md §5): read-only raw images are copied, writable raw
        // or qcow2 images mirrored; anything else is refused here, before anything moves.
        let (disks, mirror_disks) = match cfg {
            Some(q) => super::disk::source_disks(q, &mut qmp).await?,
            None => (Vec::new(), Vec::new()),
        };
        // Each mirrored disk takes a data stream beside QEMU's: refused before any image is
        // read (`offer` checks the rest of the manifest as the destination will).
        if mirror_disks.len() > MAX_MIRRORED {
            return Err(AgentError::Refused(format!(
                "QEMU VM {:?} has {} writable disks to mirror; at most {MAX_MIRRORED} fit a session's streams",
                body.vm,
                mirror_disks.len()
            )));
        }
        debug!(vm = %body.vm, qemu = %qmp.version, "QEMU ready to migrate");
        Ok(Self {
            vm: body.vm.clone(),
            qmp,
            paused_at_claim: !status.running,
            held: !status.running,
            switched_over: false,
            disks,
            mirror_disks,
            mirrors: None,
            downtime_steps: cfg
                .and_then(|v| v.downtime_steps)
                .unwrap_or(DEFAULT_DOWNTIME_STEPS),
            started: Instant::now(),
            pumps: Tasks::default(),
        })
    }

    /// Whether the VM was paused when the order claimed it (the claim journals it).
    pub fn paused_before(&self) -> bool {
        self.paused_at_claim
    }
}

impl SourceVm for QemuSource {
    const NAME: &'static str = "qemu";

    async fn offer(&mut self, ctx: &Arc<Ctx>) -> Result<Offer, AgentError> {
        let disk_manifests = super::disk::hash_disks(&self.disks).await?;
        // Empty with shared storage; the root covers these digests and the mirrored disks
        // (spec/qemu.md §5). Mirror i travels on data stream i + 1.
        let mut manifest = vm_manifest(ctx, &self.vm, super::disk::DISK_CHUNK, disk_manifests);
        manifest.mirrors = self
            .mirror_disks
            .iter()
            .map(SourceMirror::manifest)
            .collect();
        // What the destination checks, said here before anything is sent (too many writable
        // disks to mirror, above all).
        trustmig_attest::manifest::validate(&manifest).map_err(|e| {
            AgentError::Migration(format!("vm {:?} cannot be offered: {e}", self.vm))
        })?;
        Ok(Offer {
            mode: TransferMode::HypervisorStream,
            streams: 1 + manifest.mirrors.len() as u16,
            manifest,
        })
    }

    async fn transfer(&mut self, link: SourceLink<'_>) -> Result<Transferred, AgentError> {
        self.started = Instant::now();
        transfer(self, link).await
    }

    fn waits_for_discard(&self) -> bool {
        true
    }

    fn memory_checksum(&self, digest: &Digest) -> String {
        // The final digest of QEMU's stream: memory and device state, as attested.
        hex::encode(digest)
    }

    async fn give_back(mut self, ctx: &Arc<Ctx>, paused: bool) -> String {
        // The driver's `Abort` went and the destination closed (or did not in time): the
        // pumps go first, so a QEMU blocked writing to one (holding its big lock, deaf to
        // QMP) sees its socket close, fails its migration, and answers the give-back.
        self.pumps = Tasks::default();
        if let Some(m) = &mut self.mirrors {
            m.tear_down(&mut self.qmp).await;
        }
        // The journal knows a paused hand-over (and, from the operator's `stop` on, one during
        // pre-copy too); a guest paused neither at the claim nor at a switch-over was stopped
        // by someone else meanwhile, which the operator is told as such.
        let was = match (self.held, paused) {
            (false, _) => Was::Running,
            (true, true) if self.paused_at_claim || self.switched_over => Was::Paused,
            (true, _) => Was::StoppedMeanwhile,
        };
        give_back(ctx, &self.vm, &mut self.qmp, was).await
    }

    fn keep_stopped(self, _ctx: &Arc<Ctx>) {
        // QEMU holds the stopped VM until the destination answers (settle.rs): nothing to keep.
    }
}

/// Carry QEMU's migration of `vm` through the attested session: data stream 0 with the
/// copied disks, then QEMU's stream and its return path, following QEMU to `completed`; the
/// mirrored disks on streams 1.., ready before QEMU's stream starts.
async fn transfer(
    vm: &mut QemuSource,
    mut link: SourceLink<'_>,
) -> Result<Transferred, AgentError> {
    let ctx = link.ctx;
    let body = link.order.body();
    // Every stream opens first: the destination binds them all before it reads any.
    let (mut data, mut sealer, opener) = open_stream(link.est, &body.destination_addr, 0).await?;
    let mut nbd = Vec::with_capacity(vm.mirror_disks.len());
    for i in 1..=vm.mirror_disks.len() as u16 {
        nbd.push(open_stream(link.est, &body.destination_addr, i).await?);
    }
    // Copied disks first (spec/qemu.md §5): the destination attaches them, once verified,
    // before it lets its QEMU load anything. A failure here leaves the source VM untouched.
    let disk_wire = send_copied_disks(&mut data, &mut sealer, link.est, &vm.disks).await?;
    // Bytes moved on every stream of this migration, both ways: the watch for silence during
    // the switch-over, QMP's late replies and the mirrors' completion count them, up to the
    // migration's cap.
    let moved = Arc::new(AtomicU64::new(0));
    let progress = Moving {
        counter: moved.clone(),
        cap: tokio::time::Instant::from_std(vm.started + LONGEST),
    };
    if !vm.mirror_disks.is_empty() {
        let dir = socket_dir(ctx)?;
        let started = super::mirror::start(
            &mut vm.qmp,
            &vm.mirror_disks,
            nbd,
            (&dir, link.order.id()),
            (ctx.step_timeout(), progress.clone()),
            &mut vm.pumps,
        )
        .await?;
        let mirrors = vm.mirrors.insert(started);
        mirrors_ready(&mut vm.qmp, mirrors, &mut link).await?;
    }
    let disk_ms = vm.started.elapsed().as_millis() as u64;
    let mut ladder = Ladder::new(&body.limits, vm.downtime_steps, Instant::now());
    // The guest as it is now (an operator may have stopped or run it since the claim): how
    // the switch-over shows, and what is handed over. Older events say nothing about this
    // migration; from this reading on, `follow` keeps up with them.
    vm.qmp.take_events();
    vm.held = !vm.qmp.query_status().await?.running;
    // Journalled now if it changed since the claim, as every later change is (`journal_hold`).
    if vm.held != vm.paused_at_claim {
        link.hands_over(vm.held)?;
    }
    // Events dropped before this reading are in it already.
    let dropped = vm.qmp.dropped_events();
    let switch = Switch::choose(!vm.mirror_disks.is_empty(), !vm.held);
    let qemu_sock = start_qemu(ctx, &mut vm.qmp, link.order, &ladder, switch).await?;
    let pumps = spawn_pumps(
        &mut vm.pumps,
        qemu_sock,
        (data, ctx.step_timeout(), moved),
        sealer,
        opener,
    );
    let mut seen = Seen::new(switch, (vm.held, vm.held));
    seen.dropped = dropped;
    // QEMU answers no QMP command during its stop-and-copy (it holds its big lock until the
    // last byte is sent): a look at QEMU waits as long as the streams move (spec/qemu.md §4).
    vm.qmp.answer_late_while(Some(progress.clone()));
    let done = follow(
        &mut vm.qmp,
        link,
        (&mut ladder, &mut seen),
        vm.started,
        pumps,
        vm.mirrors.as_mut(),
    )
    .await;
    vm.qmp.answer_late_while(None);
    vm.held = seen.held;
    vm.switched_over = seen.paused_at.is_some();
    let done = done?;
    Ok(transferred(
        done,
        &ladder,
        disk_wire,
        disk_ms,
        std::mem::take(&mut vm.pumps),
    ))
}

/// Send the copied disks (read-only images, sent whole: spec/qemu.md §5) on data stream 0;
/// returns the bytes put on the wire.
async fn send_copied_disks(
    data: &mut TcpStream,
    sealer: &mut Sealer,
    est: &Established,
    disks: &[SourceDisk],
) -> Result<u64, AgentError> {
    if est.manifest.disks.is_empty() {
        return Ok(0);
    }
    let n = super::disk::send_disks(data, sealer, &est.manifest, disks)
        .await
        .map_err(|e| AgentError::transport(Link::Data(0), format!("sending disks: {e}")))?;
    info!(bytes = n, disks = est.manifest.disks.len(), "disks sent");
    Ok(n)
}

/// The two pumps of QEMU's migration: its stream sealed onto data stream 0, and the return
/// path opened from it back to QEMU. They live in `tasks` until the migration is over; their
/// results arrive on the returned channels.
fn spawn_pumps(
    tasks: &mut Tasks,
    qemu: UnixStream,
    (data, stall, moved): (TcpStream, Duration, Arc<AtomicU64>),
    sealer: Sealer,
    opener: Opener,
) -> Pumps {
    let (qemu_rd, qemu_wr) = qemu.into_split();
    let (data_rd, data_wr) = data.into_split();
    let data_wr = Counted::new(data_wr, moved.clone());
    let opener = Counting::new(opener, moved.clone());
    let (fwd_tx, fwd_rx) = mpsc::channel(1);
    tasks.spawn(async move {
        let stream = "source stream";
        let r = seal_pump(
            qemu_rd,
            data_wr,
            sealer,
            (stream, Carried::Migration),
            stall,
        )
        .await;
        let _ = fwd_tx.send(r).await;
    });
    let (ret_tx, ret_rx) = mpsc::channel(1);
    tasks.spawn(async move {
        let r = open_pump(data_rd, qemu_wr, opener, "return path", Carried::Migration).await;
        let _ = ret_tx.send(r).await;
    });
    (fwd_rx, ret_rx, moved)
}

/// What the transfer did, from what `follow` saw: the summary's figures and the records of
/// every stream (QEMU's first, then each mirror's), and from the `ladder`: whether the
/// switch-over was forced, and the highest throttle QEMU showed (it lifts it at completion).
fn transferred(
    done: Done,
    ladder: &Ladder,
    disk_wire: u64,
    disk_ms: u64,
    tasks: Tasks,
) -> Transferred {
    let Done {
        sent,
        info,
        paused_at,
        digest,
        blocks,
        steps,
    } = done;
    let ram = info.ram.clone().unwrap_or_default();
    let nbd_bytes: u64 = blocks
        .iter()
        .map(|(d, _)| d.to_destination.len() + d.to_source.len())
        .sum();
    let mut stream_records = vec![sent.records];
    stream_records.extend(blocks.iter().map(|(_, n)| *n));
    Transferred {
        steps,
        stream_records,
        digest,
        paused_at,
        stream_bytes: sent.wire_bytes,
        summary: Summary {
            guest_bytes: ram.total,
            rounds: ram.dirty_sync_count.saturating_sub(1) as u32,
            converged: !ladder.forced,
            throttle: ladder.throttled,
            bytes_on_wire: sent.wire_bytes + disk_wire + nbd_bytes,
            bytes_per_round: vec![sent.digest.len()],
            zero_pages_skipped: ram.duplicate,
            stop_copy_pages: 0,
            disk_bytes: blocks.iter().map(|(d, _)| d.to_destination.len()).sum(),
            disk_ms: if blocks.is_empty() { 0 } else { disk_ms },
            ..Summary::default()
        },
        tasks,
    }
}

/// Wait until every mirror is `ready` (waking on QEMU's job events), while watching the
/// relays and the destination.
async fn mirrors_ready(
    qmp: &mut Qmp,
    mirrors: &mut Mirrors,
    link: &mut SourceLink<'_>,
) -> Result<(), AgentError> {
    let started = Instant::now();
    let mut reported: Option<Instant> = None;
    loop {
        let (done, total, ready) = mirrors.look(qmp).await?;
        if ready || reported.is_none_or(|r| r.elapsed() >= Duration::from_secs(1)) {
            reported = Some(Instant::now());
            link.report(Progress::Mirror { done, total, ready }).await;
        }
        if ready {
            break;
        }
        tokio::select! {
            e = mirrors.relay_ended() => return Err(e),
            msg = link.chan.next() => link.peer_message(msg)?,
            r = qmp.next_event(POLL) => { r?; }
        }
        if started.elapsed() > LONGEST {
            return Err(AgentError::Timeout(
                "the disk mirrors were not ready within an hour".into(),
            ));
        }
    }
    info!(
        secs = started.elapsed().as_secs_f64(),
        "every disk mirror is ready"
    );
    Ok(())
}

/// Data stream `index`, bound to the session by its `StreamInit` record; its sealer (to the
/// destination) and its opener (from it: QEMU's return path, or NBD replies).
async fn open_stream(
    est: &Established,
    addr: &str,
    index: u16,
) -> Result<(TcpStream, Sealer, Opener), AgentError> {
    let mut data = TcpStream::connect(addr)
        .await
        .map_err(|e| AgentError::Connect {
            addr: addr.to_string(),
            reason: format!("data stream {index}: {e}"),
        })?;
    data.set_nodelay(true).ok();
    let (first, sealer) = stream_init::opening(&est.keys, index)?;
    data.write_all(&first)
        .await
        .map_err(|e| AgentError::transport(Link::Data(index), e))?;
    let opener = Opener::new(
        est.keys
            .stream_secret(Direction::DestinationToSource, index),
        index,
    );
    Ok((data, sealer, opener))
}

/// How the agent learns that QEMU stopped the guest for the switch-over (spec/qemu.md §2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Switch {
    /// QEMU pauses at `pre-switchover` until `migrate-continue`: the mirrors complete there,
    /// while the guest is stopped and before QEMU sends the device state.
    Pause,
    /// QEMU goes straight on (no mirrors to complete): the guest's `STOP` event is the
    /// switch-over, and the pause's two QMP round trips stay out of the downtime.
    Stop,
}

impl Switch {
    /// `Pause` when a mirror must complete at the switch-over, or when the guest does not run
    /// (`running`: as the order claimed it and still as QEMU starts migrating): QEMU's stop of
    /// a paused guest sends no `STOP` to mark the switch-over.
    fn choose(mirrored: bool, running: bool) -> Self {
        if running && !mirrored {
            Self::Stop
        } else {
            Self::Pause
        }
    }
}

/// The longest a QEMU migration may take here, from the order's start (then it fails).
const LONGEST: Duration = Duration::from_secs(3600);

/// The longest a look that finds the order's rounds run out waits for QEMU's own decision at
/// the sync that ended them (then it judges them run out): right after each sync QEMU stops
/// the guest if what is left fits its limit, and a look prompted by that sync's
/// `MIGRATION_PASS` is often answered first, with the guest still running. Converged comes
/// before out of rounds (SPEC.md §8.4). The wait ends as soon as QEMU shows what it decided
/// ([`Decision::of`]), within milliseconds either way; the cap only bounds a QEMU that shows
/// neither. (A fixed 100 ms grace read a decision QEMU was slow to act on, on a loaded host,
/// as no decision, and applied the order's action to a migration that had converged.)
const DECISION_CAP: Duration = Duration::from_secs(5);

/// What QEMU decided at the bitmap sync that ended the order's rounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Decision {
    /// It stopped the guest to switch over.
    SwitchOver,
    /// It went on with another round (or the migration ended otherwise: the next look says how).
    GoesOn,
    /// Not shown yet.
    Undecided,
}

impl Decision {
    /// From the look that found the rounds run out (`look`, read after that sync), a later
    /// `query-migrate` (`now`), and whether the guest was stopped for the switch-over by a
    /// `query-status` sent after `now` was answered. QEMU's completion stops the guest before
    /// it sends another byte, so RAM sent since the look (or a later sync) with the guest
    /// still running after it means QEMU chose another round.
    fn of(look: &MigrationInfo, now: &MigrationInfo, stopped: bool) -> Self {
        if stopped {
            return Self::SwitchOver;
        }
        if now.status() != MigrationStatus::Active {
            return Self::GoesOn;
        }
        let progress = |m: &MigrationInfo| {
            m.ram
                .as_ref()
                .map_or((0, 0), |r| (r.dirty_sync_count, r.transferred))
        };
        let ((sync_then, sent_then), (sync_now, sent_now)) = (progress(look), progress(now));
        if sync_now > sync_then || sent_now > sent_then {
            Self::GoesOn
        } else {
            Self::Undecided
        }
    }
}

/// Whether QEMU is switching over at the sync `look` found ending the rounds: asked every
/// 10 ms until QEMU shows its decision or `DECISION_CAP` has passed. (One `query-migrate`
/// waits while QEMU holds its big lock for the stop-and-copy.)
async fn switching_over(qmp: &mut Qmp, look: &MigrationInfo) -> Result<bool, AgentError> {
    let deadline = Instant::now() + DECISION_CAP;
    loop {
        let now = qmp.query_migrate().await?;
        match Decision::of(look, &now, stopped_for_switch_over(qmp).await?) {
            Decision::SwitchOver => return Ok(true),
            Decision::GoesOn => return Ok(false),
            Decision::Undecided if Instant::now() >= deadline => {
                warn!(
                    secs = DECISION_CAP.as_secs(),
                    "QEMU showed no decision at the sync that ended the order's rounds: taking them as run out"
                );
                return Ok(false);
            }
            Decision::Undecided => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Whether QEMU stopped the guest for the switch-over (`super::stopped_by_migration`). QEMU
/// answers once its completion lets go of its big lock, which delays only this look.
async fn stopped_for_switch_over(qmp: &mut Qmp) -> Result<bool, AgentError> {
    Ok(super::stopped_by_migration(
        &qmp.query_status().await?.status,
    ))
}

/// Set QEMU's capabilities and parameters from the order (`switch`: whether QEMU pauses at
/// `pre-switchover`), then `migrate` into a socket of ours; returns QEMU's connection to it.
async fn start_qemu(
    ctx: &Arc<Ctx>,
    qmp: &mut Qmp,
    order: &VerifiedOrder,
    ladder: &Ladder,
    switch: Switch,
) -> Result<UnixStream, AgentError> {
    // `events`: QEMU announces the guest's stop, pre-switchover and completion at once
    // (polling would add up to a poll period to the guest's downtime, twice).
    // `auto-converge` with `throttle` orders: QEMU's own throttle, in the native engine's steps.
    let throttle = ladder.throttles();
    qmp.migrate_set_capabilities(&[
        ("pause-before-switchover", switch == Switch::Pause),
        ("return-path", true),
        ("events", true),
        ("auto-converge", throttle),
    ])
    .await?;
    if throttle {
        qmp.migrate_set_throttle(THROTTLE_STEPS[0], THROTTLE_STEP, THROTTLE_MAX)
            .await?;
    }
    if ladder.limit != ladder.target {
        // QEMU judges the order's target before anything moves (it caps downtime-limit at
        // 2000 s): the ladder reaches the target only rounds later, when a refusal would end a
        // migration under way.
        qmp.migrate_set_parameters(ladder.target, ladder.bw).await?;
    }
    qmp.migrate_set_parameters(ladder.limit, ladder.bw).await?;
    let dir = socket_dir(ctx)?;
    let sock = socket_path(&dir, SocketRole::Out, order.id())?;
    let path = sock.path();
    let listener = UnixListener::bind(path).map_err(AgentError::io(path))?;
    qmp.migrate(&format!("unix:{}", path.display())).await?;
    let accepted = tokio::time::timeout(ctx.step_timeout(), listener.accept()).await;
    let (qemu_sock, _) = accepted
        .map_err(|_| {
            AgentError::Timeout(format!(
                "QEMU did not connect to {} in time",
                path.display()
            ))
        })?
        .map_err(AgentError::io(path))?;
    Ok(qemu_sock)
}

/// QEMU's downtime-limit as the migration goes: the ladder towards the order's target, and
/// the order's action when the rounds run out (SPEC.md §8.4, spec/qemu.md §3).
struct Ladder {
    target: u64,
    steps: u32,
    /// The order's rounds, after which its non-convergence action is due (with `throttle`,
    /// once QEMU's throttle has had its chance: [`Ladder::out_of_rounds`]).
    max_rounds: u64,
    /// When the order's rounds were first seen run out.
    rounds_out: Option<Instant>,
    /// QEMU's throttle as last seen, and the round and time it was first seen at.
    level: (u8, u64, Instant),
    /// The highest throttle QEMU showed in pre-copy (the summary's).
    throttled: u8,
    on_nonconvergence: NonConvergence,
    downtime_ms: u32,
    /// `max-bandwidth`.
    bw: u64,
    /// The `downtime-limit` QEMU has now.
    limit: u64,
    /// The switch-over was forced (the summary says `converged: false`).
    forced: bool,
}

impl Ladder {
    fn new(limits: &Limits, configured_steps: u32, now: Instant) -> Self {
        let target = u64::from(limits.downtime_ms);
        let steps = ladder_steps(configured_steps, limits.max_rounds);
        Self {
            target,
            steps,
            max_rounds: u64::from(limits.max_rounds),
            rounds_out: None,
            level: (0, 0, now),
            throttled: 0,
            on_nonconvergence: limits.on_nonconvergence,
            downtime_ms: limits.downtime_ms,
            bw: if limits.bandwidth_bps == 0 {
                UNCAPPED_BPS
            } else {
                limits.bandwidth_bps
            },
            limit: downtime_step(target, steps, 0),
            forced: false,
        }
    }

    /// The order says `throttle`.
    fn throttles(&self) -> bool {
        self.on_nonconvergence == NonConvergence::Throttle
    }

    /// Take in what a look at `m` (at `now`) shows of the rounds and QEMU's throttle.
    fn note(&mut self, m: &MigrationInfo, now: Instant) {
        let rounds = rounds_done(m);
        let throttle = m.cpu_throttle_percentage.unwrap_or(0).min(100) as u8;
        self.throttled = self.throttled.max(throttle);
        if throttle != self.level.0 {
            self.level = (throttle, rounds, now);
        }
        if rounds >= self.max_rounds {
            self.rounds_out.get_or_insert(now);
        }
    }

    /// After a look at QEMU's migration (`m` at `now`, the guest not yet stopped by it): the
    /// new `downtime-limit` to set, if any, or the order's abort.
    fn after_look(&mut self, m: &MigrationInfo, now: Instant) -> Result<Option<u64>, PrecopyError> {
        self.note(m, now);
        if m.status() != MigrationStatus::Active || self.forced {
            return Ok(None);
        }
        let rounds = rounds_done(m);
        if self.out_of_rounds(m, now) {
            if self.on_nonconvergence == NonConvergence::Abort {
                return Err(PrecopyError::NotConverged {
                    rounds: u32::try_from(rounds).unwrap_or(u32::MAX),
                    predicted_ms: m.expected_downtime.unwrap_or(0),
                    target_ms: self.downtime_ms,
                });
            }
            // force, or throttle after its last step: switch over at QEMU's next check,
            // accepting a longer downtime.
            self.forced = true;
            self.limit = QEMU_MAX_DOWNTIME_MS;
            info!(rounds, "pre-copy did not converge: forcing the switch-over");
            return Ok(Some(self.limit));
        }
        let next = downtime_step(self.target, self.steps, rounds);
        if next == self.limit {
            return Ok(None);
        }
        self.limit = next;
        debug!(limit_ms = next, rounds, "downtime-limit raised");
        Ok(Some(next))
    }

    /// Whether `m` (at `now`, taken in by [`Ladder::note`]) shows the order's rounds run out,
    /// so that its non-convergence action is due at this look. With `throttle` (SPEC.md §8.4:
    /// every throttle step, then one more round), once `max_rounds` are done: at the round
    /// after the one in which QEMU's throttle reached its ceiling, or once it has not risen for
    /// `THROTTLE_STEP_ROUNDS` rounds and `THROTTLE_STEP_WAIT` (counted from `max_rounds` at
    /// the earliest): QEMU's heuristic is done with the guest, or never throttles it (it does
    /// not find it too fast).
    fn out_of_rounds(&self, m: &MigrationInfo, now: Instant) -> bool {
        let rounds = rounds_done(m);
        if m.status() != MigrationStatus::Active || self.forced || rounds < self.max_rounds {
            return false;
        }
        if !self.throttles() {
            return true;
        }
        let (throttle, since_round, since) = self.level;
        if throttle >= THROTTLE_MAX {
            return rounds > since_round;
        }
        let since = self.rounds_out.map_or(since, |out| out.max(since));
        // Saturating: `rounds` is QEMU's `dirty-sync-count`, whatever QEMU says it is.
        rounds >= (since_round.max(self.max_rounds)).saturating_add(THROTTLE_STEP_ROUNDS)
            && now.saturating_duration_since(since) >= THROTTLE_STEP_WAIT
    }
}

/// Pre-copy rounds QEMU completed: its bitmap syncs less the first pass's.
fn rounds_done(m: &MigrationInfo) -> u64 {
    m.ram
        .as_ref()
        .map_or(0, |r| r.dirty_sync_count)
        .saturating_sub(1)
}

/// The end of QEMU's migration, as `follow` saw it.
struct Done {
    sent: Sent,
    info: MigrationInfo,
    paused_at: Instant,
    /// The final digest: QEMU's stream and every mirrored disk's NBD stream.
    digest: Digest,
    /// The mirrored disks' NBD streams, in manifest order.
    blocks: Vec<Relayed>,
    /// The switch-over's steps here (the summary's timeline).
    steps: Vec<(&'static str, Instant)>,
}

/// Follow QEMU's migration to `completed` and the stream to its end: progress, the downtime
/// ladder, the switch-over (`migrate-continue` at `pre-switchover`, or the guest's `STOP`),
/// the pumps' results, and any message from the destination (an abort), into `seen`.
async fn follow(
    qmp: &mut Qmp,
    mut link: SourceLink<'_>,
    (ladder, seen): (&mut Ladder, &mut Seen),
    started: Instant,
    (mut fwd_rx, mut ret_rx, moved): Pumps,
    mut mirrors: Option<&mut Mirrors>,
) -> Result<Done, AgentError> {
    let mut poll = tokio::time::interval(POLL);
    // A tick missed while `look_at` waited comes one period later, not at once.
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sent: Option<Sent> = None;
    let mut silence = Silence::new(moved, link.ctx.step_timeout());
    let mut ret_done = false;
    while sent.is_none() || seen.completed.is_none() {
        // On a poll tick or a MIGRATION event, look at QEMU's migration state.
        let mut look = false;
        tokio::select! {
            _ = poll.tick() => {
                look = true;
                silence.tick(seen.paused_at.is_some() && seen.completed.is_none())?;
            }
            ev = qmp.event() => {
                let ev = ev?;
                silence.heard();
                seen.guest_event(&link, qmp, &ev).await?;
                // A `MIGRATION_PASS` is a dirty-bitmap sync: the ladder's next step (or the
                // order's non-convergence action) is due at once. With a look only every poll
                // period, rounds shorter than that went by unseen and their steps were skipped
                // (spec/qemu.md §3).
                look = ev.migration_status().is_some() || ev.name == "MIGRATION_PASS";
            }
            Some(r) = fwd_rx.recv() => {
                let s = r.map_err(|e| AgentError::transport(Link::QemuStream, e))?;
                debug!(bytes = s.digest.len(), "QEMU stream sealed to its end");
                seen.steps.push(("QEMU's stream sealed to its end", Instant::now()));
                sent = Some(s);
            }
            Some(r) = ret_rx.recv(), if !ret_done => {
                ret_done = true;
                r.map_err(|e| AgentError::transport(Link::ReturnPath, e))?;
            }
            msg = link.chan.next() => link.peer_message(msg)?,
            e = relay_ended(mirrors.as_deref_mut()), if seen.paused_at.is_none() => return Err(e),
        }
        if look && seen.completed.is_none() {
            if let Err(e) = look_at(qmp, &link, ladder, seen, mirrors.as_deref_mut()).await {
                return Err(pump_failure(&mut fwd_rx, &mut ret_rx, ret_done)
                    .await
                    .unwrap_or(e));
            }
            // The look may have waited a long while (mirrors completing at `pre-switchover`,
            // a reply QEMU gave only after its stop-and-copy): the watch starts again from it.
            silence.heard();
        }
        if started.elapsed() > LONGEST {
            return Err(AgentError::Timeout(
                "QEMU migration did not finish within an hour".into(),
            ));
        }
    }
    let (Some(sent), Some(info)) = (sent, seen.completed.take()) else {
        unreachable!("the loop ends only when both are set");
    };
    // verify = "full": QEMU completed, so its images are flushed and inactive; the guest is
    // stopped. This is downtime, and the operator asked for it (spec/qemu.md §5).
    if let Some(m) = mirrors.as_deref() {
        if m.hash_images(&mut seen.blocks, link.ctx.step_timeout())
            .await?
        {
            seen.steps
                .push(("disk images hashed in full", Instant::now()));
        }
    }
    let digests: Vec<_> = seen.blocks.iter().map(|(d, _)| d.clone()).collect();
    let digest = final_digest(&link.est.transcript_hash, sent.digest.clone(), &digests);
    Ok(Done {
        sent,
        info,
        paused_at: seen.paused_at.unwrap_or_else(Instant::now),
        digest,
        blocks: std::mem::take(&mut seen.blocks),
        steps: std::mem::take(&mut seen.steps),
    })
}

/// How long a failed look at QEMU's migration waits for a pump's failure, its likelier cause:
/// a pump that failed (a data stream cut) closes QEMU's socket, and QEMU's own failure then
/// says only "Unable to write to socket: Broken pipe" (seen in `qemu_cut_connection_rolls_back`
/// when QEMU's failure was read first).
const PUMP_CAUSE_WAIT: Duration = Duration::from_millis(200);

/// A pump's failure, if one is reported within [`PUMP_CAUSE_WAIT`].
async fn pump_failure(
    fwd_rx: &mut mpsc::Receiver<Result<Sent, String>>,
    ret_rx: &mut mpsc::Receiver<Result<Received, AgentError>>,
    ret_done: bool,
) -> Option<AgentError> {
    let deadline = tokio::time::Instant::now() + PUMP_CAUSE_WAIT;
    if let Ok(Some(Err(e))) = tokio::time::timeout_at(deadline, fwd_rx.recv()).await {
        return Some(AgentError::transport(Link::QemuStream, e));
    }
    if ret_done {
        return None;
    }
    match tokio::time::timeout_at(deadline, ret_rx.recv()).await {
        Ok(Some(Err(e))) => Some(AgentError::transport(Link::ReturnPath, e)),
        _ => None,
    }
}

/// The two pumps' results (QEMU's stream sealed to its end, the return path opened to its
/// end), and the bytes moved on every stream of the migration so far (both ways).
type Pumps = (
    mpsc::Receiver<Result<Sent, String>>,
    mpsc::Receiver<Result<Received, AgentError>>,
    Arc<AtomicU64>,
);

/// With the guest stopped for the switch-over, something must move within a step timeout:
/// bytes on any stream of the migration either way, or an event of QEMU's. A destination gone silent
/// without a reset (a host down, a partition) would otherwise keep the guest stopped until
/// `follow`'s hour-long cap.
struct Silence {
    /// Bytes moved on every stream of the migration, both ways (the pumps and relays count
    /// them).
    bytes: Arc<AtomicU64>,
    /// The count when something last moved, and when.
    last: (u64, tokio::time::Instant),
    limit: Duration,
}

impl Silence {
    fn new(bytes: Arc<AtomicU64>, limit: Duration) -> Self {
        let last = (bytes.load(Ordering::Relaxed), tokio::time::Instant::now());
        Self { bytes, last, limit }
    }

    /// Something other than the streams' bytes told of progress (an event of QEMU's; a look
    /// at QEMU, which may have waited long on QEMU).
    fn heard(&mut self) {
        self.last = (
            self.bytes.load(Ordering::Relaxed),
            tokio::time::Instant::now(),
        );
    }

    /// At a poll tick: an error once nothing moved for the limit while `watching` (the guest
    /// stopped for the switch-over, QEMU not yet completed).
    fn tick(&mut self, watching: bool) -> Result<(), AgentError> {
        if self.bytes.load(Ordering::Relaxed) != self.last.0 || !watching {
            self.heard();
        } else if self.last.1.elapsed() > self.limit {
            return Err(AgentError::Timeout(format!(
                "nothing moved on the data streams for {} s with the guest stopped for the switch-over: the destination stopped answering",
                self.limit.as_secs()
            )));
        }
        Ok(())
    }
}

/// A mirror relay that ended before the switch-over (never, without mirrors).
async fn relay_ended(mirrors: Option<&mut Mirrors>) -> AgentError {
    match mirrors {
        Some(m) => m.relay_ended().await,
        None => std::future::pending().await,
    }
}

/// What `follow` has seen of QEMU's migration.
struct Seen {
    switch: Switch,
    /// QEMU's last look at a `completed` migration.
    completed: Option<MigrationInfo>,
    /// When the guest stopped for the switch-over (from QEMU's `STOP` event time).
    paused_at: Option<Instant>,
    /// The time of QEMU's last `STOP` event (forgotten at a `RESUME`).
    stopped_at: Option<SystemTime>,
    /// The guest is stopped, and not by this migration (stopped as QEMU started migrating and
    /// not run since, or a `STOP` that was not the switch-over's: an operator's `stop`, an I/O
    /// error; cleared by a `RESUME`). At the switch-over it means the guest is handed over
    /// paused, as QEMU hands over the runstate it finds at completion.
    held: bool,
    /// What the journal says of the hand-over so far: the claim's reading.
    journalled_paused: bool,
    /// Pages left to send at the last look before the switch-over.
    remaining_pages: u64,
    last_sync: u64,
    last_report: Instant,
    /// The mirrored disks' NBD streams, once completed at the switch-over.
    blocks: Vec<Relayed>,
    /// The switch-over's steps, when each happened.
    steps: Vec<(&'static str, Instant)>,
    /// QMP's count of events it dropped from a full queue, as last read.
    dropped: u64,
}

impl Seen {
    /// Nothing seen yet; `held`: `QemuSource::held` as QEMU starts migrating, and whether the
    /// journal says the guest is paused now.
    fn new(switch: Switch, (held, journalled_paused): (bool, bool)) -> Self {
        Self {
            switch,
            completed: None,
            paused_at: None,
            stopped_at: None,
            held,
            journalled_paused,
            remaining_pages: 0,
            last_sync: u64::MAX,
            last_report: Instant::now(),
            blocks: Vec::new(),
            steps: Vec::new(),
            dropped: 0,
        }
    }

    /// If QMP dropped events since the last look (a flood while a command waited: an I/O
    /// error's events, say), a `STOP` or `RESUME` may be among them: before the switch-over,
    /// `held` is read from QEMU's runstate instead, as `guest_event` reads a `STOP` (stopped,
    /// and not by the migration: held; running: not). Once QEMU is in its switch-over the
    /// runstate no longer tells (it is the migration's), and `held` stays as the events left it.
    async fn resync_if_events_dropped(&mut self, qmp: &mut Qmp) -> Result<(), AgentError> {
        if qmp.dropped_events() == self.dropped || self.paused_at.is_some() {
            return Ok(());
        }
        self.dropped = qmp.dropped_events();
        let st = qmp.query_status().await?;
        let by_migration = super::stopped_by_migration(&st.status);
        warn!(
            dropped = self.dropped,
            status = %st.status,
            "QMP dropped events the agent had not read: the guest's hold is read from its runstate{}",
            if by_migration { ", which is the switch-over's now: the hold stays as the events left it" } else { "" }
        );
        if st.running {
            self.held = false;
            self.stopped_at = None;
        } else if !by_migration {
            self.held = true;
        }
        Ok(())
    }

    /// A `STOP` or `RESUME` of QEMU's (other events change nothing here). A `RESUME` runs the
    /// guest again (an operator's `cont`, or QEMU's own after a failure): no stop before it
    /// holds the guest, nor starts a downtime. A `STOP` starts the guest's downtime; before the
    /// switch-over, QEMU's runstate tells whether it is the switch-over's or someone else's
    /// (then the guest is `held`); in `Stop` mode the former marks the switch-over.
    async fn guest_event(
        &mut self,
        link: &SourceLink<'_>,
        qmp: &mut Qmp,
        ev: &Event,
    ) -> Result<(), AgentError> {
        match ev.name.as_str() {
            "RESUME" => {
                self.stopped_at = None;
                self.held = false;
            }
            "STOP" => {
                self.stopped_at = ev.at;
                if self.paused_at.is_none() {
                    if !stopped_for_switch_over(qmp).await? {
                        self.held = true;
                    } else if self.switch == Switch::Stop {
                        self.switched_over((link, qmp), ev.at, "STOP seen").await?;
                    }
                }
            }
            _ => return Ok(()),
        }
        self.journal_hold(link)
    }

    /// Journal whether the guest is held, if that changed, before the switch-over: at once,
    /// not only at the switch-over, because in `Stop` mode QEMU may switch over before the
    /// agent looks again, and an agent that dies then is restarted to a `postmigrate` QEMU that
    /// no longer tells whether the guest was held.
    fn journal_hold(&mut self, link: &SourceLink<'_>) -> Result<(), AgentError> {
        if self.paused_at.is_none() && self.held != self.journalled_paused {
            link.hands_over(self.held)?;
            self.journalled_paused = self.held;
        }
        Ok(())
    }

    /// The pages `m` says are left to send.
    fn note_remaining(&mut self, m: &MigrationInfo) {
        if let Some(ram) = &m.ram {
            self.remaining_pages = ram.remaining / ram.page_size.max(1);
        }
    }

    /// The guest stopped for the switch-over, at `at` by QEMU's stamp (its `STOP`; now when
    /// unknown): the downtime starts and the ladder is done; the guest is handed over paused if
    /// it is `held` (a `RESUME` still queued in `qmp` undid that), journalled now if that is not
    /// what the claim read. Once; `step` names the sign.
    async fn switched_over(
        &mut self,
        (link, qmp): (&SourceLink<'_>, &Qmp),
        at: Option<SystemTime>,
        step: &'static str,
    ) -> Result<(), AgentError> {
        if self.paused_at.is_some() {
            return Ok(());
        }
        if qmp.queued("RESUME").is_some() {
            self.held = false;
        }
        // Rare (an operator stopped or ran the guest during the migration), and durable: a
        // restart gives the guest back as it is now, not as the claim read it.
        if self.held != self.journalled_paused {
            link.hands_over(self.held)?;
            self.journalled_paused = self.held;
        }
        self.paused_at = Some(instant_of(at));
        self.steps.push((step, Instant::now()));
        debug!(
            since_stop_ms = self.paused_at.map(|p| p.elapsed().as_millis()),
            remaining_pages = self.remaining_pages,
            "{step}"
        );
        link.report(Progress::SwitchOver {
            pages: self.remaining_pages,
        })
        .await;
        Ok(())
    }
}

/// One look at `query-migrate`: the switch-over (`migrate-continue` at `pre-switchover`),
/// completion, failure, the downtime ladder, and progress during pre-copy (at each new round,
/// or every second).
async fn look_at(
    qmp: &mut Qmp,
    link: &SourceLink<'_>,
    ladder: &mut Ladder,
    seen: &mut Seen,
    mirrors: Option<&mut Mirrors>,
) -> Result<(), AgentError> {
    seen.resync_if_events_dropped(qmp).await?;
    let m = qmp.query_migrate().await?;
    // Again for what the look itself may have dropped, before it acts on the switch-over.
    seen.resync_if_events_dropped(qmp).await?;
    seen.journal_hold(link)?;
    let queued_stop = stop_mode_switch_over(qmp, link, seen).await?;
    match m.status() {
        MigrationStatus::PreSwitchover if seen.paused_at.is_none() => {
            seen.note_remaining(&m);
            let at = queued_stop.or(seen.stopped_at);
            seen.switched_over((link, qmp), at, "pre-switchover seen")
                .await?;
            // The disks first (the guest is stopped, so they are final): complete every
            // mirror and end its NBD stream, then QEMU may send the device state.
            if let Some(m) = mirrors {
                seen.blocks = m.complete(qmp, link.ctx.step_timeout()).await?;
                seen.steps.push(("disk mirrors completed", Instant::now()));
                debug!(
                    since_stop_ms = seen.paused_at.map(|p| p.elapsed().as_millis()),
                    "disk mirrors completed"
                );
            }
            qmp.migrate_continue("pre-switchover").await?;
            seen.steps.push(("migrate-continue done", Instant::now()));
        }
        MigrationStatus::Completed => {
            debug!("source QEMU completed");
            seen.steps.push(("source QEMU completed", Instant::now()));
            seen.completed = Some(m.clone());
        }
        status @ (MigrationStatus::Failed | MigrationStatus::Cancelled) => {
            // Usually because the destination stopped reading: its Abort says why.
            return Err(AgentError::transport(
                Link::QemuStream,
                format!(
                    "QEMU migration {status}: {}",
                    m.error_desc.as_deref().unwrap_or("no reason given")
                ),
            ));
        }
        _ => {}
    }
    precopy_step(qmp, link, ladder, seen, m).await
}

/// `Stop` mode, the switch-over seen from a look rather than from a `STOP` event: a `STOP`
/// read during the command and still queued counts as seen (if QEMU stopped the guest for the
/// switch-over before it answered, its last bitmap sync, which the look may already count, is
/// no pre-copy round); and a guest someone else stopped during pre-copy (`Seen::held`) gives
/// no `STOP` when QEMU switches over, so QEMU's runstate tells. Returns the queued `STOP`'s
/// time, if any.
async fn stop_mode_switch_over(
    qmp: &mut Qmp,
    link: &SourceLink<'_>,
    seen: &mut Seen,
) -> Result<Option<SystemTime>, AgentError> {
    let queued_stop = qmp.queued("STOP").map(|e| e.at);
    if seen.switch != Switch::Stop || seen.paused_at.is_some() {
        return Ok(queued_stop.flatten());
    }
    if queued_stop.is_some() && stopped_for_switch_over(qmp).await? {
        seen.switched_over((link, qmp), queued_stop.flatten(), "STOP seen")
            .await?;
    } else if seen.held && stopped_for_switch_over(qmp).await? {
        seen.switched_over((link, qmp), None, "switch-over of a stopped guest seen")
            .await?;
    }
    Ok(queued_stop.flatten())
}

/// The pre-copy part of a look at `m`: the order's non-convergence action or the ladder's next
/// step, and the round's progress, unless the switch-over has begun.
async fn precopy_step(
    qmp: &mut Qmp,
    link: &SourceLink<'_>,
    ladder: &mut Ladder,
    seen: &mut Seen,
    m: MigrationInfo,
) -> Result<(), AgentError> {
    // The rounds ran out by QEMU's count: unless QEMU switches over at the sync that ended them
    // (it converged there), or that count already holds the sync of a switch-over whose STOP
    // is not read yet, which is no pre-copy round; then no action of the order's is due. In
    // `Pause` mode the `pre-switchover` that follows marks the switch-over.
    ladder.note(&m, Instant::now());
    let out_of_rounds = seen.paused_at.is_none() && ladder.out_of_rounds(&m, Instant::now());
    let switching = out_of_rounds && switching_over(qmp, &m).await?;
    if switching && seen.switch == Switch::Stop {
        seen.note_remaining(&m);
        let at = qmp.queued("STOP").and_then(|e| e.at);
        seen.switched_over((link, qmp), at, "STOP seen").await?;
    }
    // After that wait, the order's action is judged on QEMU as it is now.
    let m = if out_of_rounds && !switching {
        qmp.query_migrate().await?
    } else {
        m
    };
    let precopy = seen.paused_at.is_none() && !switching;
    if precopy {
        if let Some(limit) = ladder.after_look(&m, Instant::now())? {
            qmp.migrate_set_parameters(limit, ladder.bw).await?;
        }
        seen.note_remaining(&m);
    }
    // Rounds are reported during pre-copy only: the sync QEMU takes with the guest stopped
    // (whose `MIGRATION_PASS` prompts a look) is none.
    let sync = m.ram.as_ref().map_or(0, |r| r.dirty_sync_count);
    if seen.completed.is_none()
        && precopy
        && (sync != seen.last_sync || seen.last_report.elapsed() >= Duration::from_secs(1))
    {
        seen.last_sync = sync;
        seen.last_report = Instant::now();
        link.report(round_progress(&m)).await;
    }
    Ok(())
}

/// The monotonic instant of a wall-clock event time (now when unknown or in the future).
fn instant_of(at: Option<SystemTime>) -> Instant {
    let ago = at.and_then(|t| SystemTime::now().duration_since(t).ok());
    ago.and_then(|d| Instant::now().checked_sub(d))
        .unwrap_or_else(Instant::now)
}

fn round_progress(m: &MigrationInfo) -> Progress {
    let ram = m.ram.clone().unwrap_or_default();
    let page = ram.page_size.max(1);
    Progress::Round {
        round: ram.dirty_sync_count.saturating_sub(1) as u32,
        pages: ram.normal,
        bytes: ram.transferred,
        dirty_pages: ram.remaining / page,
        dirty_rate: ram.dirty_pages_rate,
        predicted_downtime_ms: m.expected_downtime.unwrap_or(0),
        throttle: m.cpu_throttle_percentage.unwrap_or(0).min(100) as u8,
        bandwidth: (ram.mbps * 1e6 / 8.0) as u64,
        total_bytes: ram.transferred,
        guest_pages: ram.total / page,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Events QMP dropped from its full queue (a flood while a command waited) may hold the
    /// guest's `STOP`: before the switch-over the agent reads the guest's hold from QEMU's
    /// runstate then, and only then: stopped, not by the migration (`io-error` here), is held;
    /// running is not; the switch-over's own runstate tells nothing and changes nothing.
    #[tokio::test]
    async fn a_hold_lost_with_dropped_events_is_read_from_the_runstate() {
        let flood: Vec<serde_json::Value> = (0..trustmig_qemu::qmp::MAX_QUEUED_EVENTS + 5)
            .map(|_| serde_json::json!({"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 0}}))
            .collect();
        let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = asked.clone();
        let (_dir, path) = super::super::tests::fake_qmp(move |command, _| match command {
            "query-migrate" => {
                Some(serde_json::json!({"return": {"status": "active"}, "_events": flood.clone()}))
            }
            "query-status" => {
                let (running, st) = [
                    (false, "io-error"),
                    (true, "running"),
                    (false, "finish-migrate"),
                ][counted.fetch_add(1, Ordering::SeqCst).min(2)];
                Some(serde_json::json!({"return": {"running": running, "status": st}}))
            }
            _ => None,
        });
        let mut qmp = Qmp::connect(&path, Duration::from_secs(5))
            .await
            .expect("qmp");
        let mut seen = Seen::new(Switch::Stop, (false, false));
        seen.resync_if_events_dropped(&mut qmp)
            .await
            .expect("resync");
        assert_eq!(
            asked.load(Ordering::SeqCst),
            0,
            "nothing dropped: nothing asked"
        );
        qmp.query_migrate().await.expect("look");
        assert_eq!(qmp.dropped_events(), 5);
        seen.resync_if_events_dropped(&mut qmp)
            .await
            .expect("resync");
        assert!(seen.held, "stopped by an I/O error, not by the migration");
        seen.resync_if_events_dropped(&mut qmp)
            .await
            .expect("resync");
        assert_eq!(
            asked.load(Ordering::SeqCst),
            1,
            "no new drops: not asked again"
        );
        qmp.query_migrate().await.expect("look");
        seen.resync_if_events_dropped(&mut qmp)
            .await
            .expect("resync");
        assert!(!seen.held, "running again");
        qmp.query_migrate().await.expect("look");
        seen.held = true;
        seen.resync_if_events_dropped(&mut qmp)
            .await
            .expect("resync");
        assert!(seen.held, "the switch-over's runstate changes nothing");
        assert_eq!(asked.load(Ordering::SeqCst), 3);
    }

    fn info(status: &str, sync: u64, sent: u64) -> MigrationInfo {
        serde_json::from_value(serde_json::json!({
            "status": status,
            "ram": {"transferred": sent, "remaining": 0, "total": 0, "duplicate": 0,
                    "normal": 0, "page-size": 4096, "dirty-pages-rate": 0, "mbps": 0.0,
                    "dirty-sync-count": sync},
        }))
        .expect("query-migrate reply")
    }

    /// An order that says `throttle` runs out of rounds, once `max_rounds` are done, at the
    /// round after the one in which QEMU's throttle reached its ceiling, or once the throttle
    /// has not risen for four rounds and eight seconds; `force` at `max_rounds`.
    #[test]
    fn a_throttled_order_runs_out_of_rounds_once_qemus_throttle_had_its_chance() {
        let limits = |on_nonconvergence| Limits {
            downtime_ms: 1,
            bandwidth_bps: 0,
            max_rounds: 3,
            on_nonconvergence,
        };
        // Rounds are syncs less the first pass's.
        let at = |round: u64, throttle: u64| {
            let mut m = info("active", round + 1, round);
            m.cpu_throttle_percentage = Some(throttle);
            m
        };
        let t0 = Instant::now();
        let secs = |s: u64| t0 + Duration::from_secs(s);
        let forced = Ok(Some(QEMU_MAX_DOWNTIME_MS));

        let mut force = Ladder::new(&limits(NonConvergence::Force), 0, t0);
        assert!(!force.out_of_rounds(&at(2, 0), t0));
        assert!(force.out_of_rounds(&at(3, 0), t0));
        assert_eq!(force.after_look(&at(3, 0), t0), forced);

        // QEMU raising its throttle every four rounds of 0.9 s: never out before the ceiling.
        let mut steady = Ladder::new(&limits(NonConvergence::Throttle), 0, t0);
        for round in 0..20 {
            let now = t0 + Duration::from_millis(900 * round);
            let throttle = at(round, round / 4 * 20);
            assert_eq!(steady.after_look(&throttle, now), Ok(None), "round {round}");
        }
        assert_eq!(
            steady.after_look(&at(20, 99), secs(18)),
            Ok(None),
            "the ceiling's round"
        );
        assert_eq!(
            steady.after_look(&at(21, 99), secs(19)),
            forced,
            "the round after it"
        );
        assert!(steady.forced);
        assert_eq!(steady.throttled, 99, "the summary's highest throttle");

        // A throttle that stopped rising (here: never rose): four rounds and 8 s from the
        // later of its last change and `max_rounds`, whichever comes last.
        let mut stuck = Ladder::new(&limits(NonConvergence::Throttle), 0, t0);
        assert_eq!(stuck.after_look(&at(3, 0), secs(1)), Ok(None));
        assert_eq!(
            stuck.after_look(&at(7, 0), secs(8)),
            Ok(None),
            "8 s not yet passed"
        );
        assert_eq!(
            stuck.after_look(&at(6, 0), secs(30)),
            Ok(None),
            "4 rounds not yet done"
        );
        assert_eq!(stuck.after_look(&at(7, 0), secs(9)), forced);
        let mut slow = Ladder::new(&limits(NonConvergence::Throttle), 0, t0);
        assert_eq!(
            slow.after_look(&at(5, 40), secs(20)),
            Ok(None),
            "a rise restarts it"
        );
        assert_eq!(slow.after_look(&at(9, 40), secs(27)), Ok(None));
        assert_eq!(slow.after_look(&at(9, 40), secs(28)), forced);

        // A ceiling reached before `max_rounds` leaves the order its rounds.
        let mut early = Ladder::new(&limits(NonConvergence::Throttle), 0, t0);
        assert_eq!(early.after_look(&at(1, 99), t0), Ok(None));
        assert!(!early.out_of_rounds(&at(2, 99), t0));
        assert!(early.out_of_rounds(&at(3, 99), t0));

        // QEMU's count taken as it comes: one at the top of its range is no overflow (it was,
        // in the step's round arithmetic) and ends nothing early.
        let mut top = Ladder::new(&limits(NonConvergence::Throttle), 0, t0);
        let mut m = info("active", u64::MAX, 0);
        m.cpu_throttle_percentage = Some(20);
        assert_eq!(top.after_look(&m, t0), Ok(None));
        assert_eq!(top.after_look(&m, secs(60)), Ok(None));
    }

    /// QEMU's decision at the sync that ended the order's rounds is read from what it did
    /// next, not from a fixed grace: a guest stopped for the switch-over says converged; RAM
    /// sent since, or a later sync, with the guest still running says another round; neither
    /// yet (a QEMU slow to act on a loaded host) is no decision, however long it takes.
    #[test]
    fn qemus_decision_at_the_last_sync_is_read_from_what_it_did_next() {
        let look = info("active", 4, 1000);
        let cases = [
            (info("active", 4, 1000), true, Decision::SwitchOver),
            (info("completed", 4, 1500), true, Decision::SwitchOver),
            (info("active", 4, 1000), false, Decision::Undecided),
            (info("active", 4, 1001), false, Decision::GoesOn),
            (info("active", 5, 1000), false, Decision::GoesOn),
            (info("failed", 4, 1000), false, Decision::GoesOn),
            (info("cancelled", 4, 1000), false, Decision::GoesOn),
        ];
        for (now, stopped, expect) in cases {
            assert_eq!(
                Decision::of(&look, &now, stopped),
                expect,
                "{now:?} stopped={stopped}"
            );
        }
    }

    #[test]
    fn downtime_ladder_climbs_to_the_target_and_never_past_it() {
        let ladder: Vec<u64> = (0..6).map(|r| downtime_step(300, 3, r)).collect();
        assert_eq!(ladder, [1, 75, 150, 300, 300, 300]);
        // One step: 1 ms for the first pass, then the target.
        let one: Vec<u64> = (0..3).map(|r| downtime_step(300, 1, r)).collect();
        assert_eq!(one, [1, 300, 300]);
        // No steps: the target from the start; tiny targets stay at least 1 ms, at most target.
        assert_eq!(downtime_step(300, 0, 0), 300);
        assert_eq!(downtime_step(5, 10, 0), 1);
        assert_eq!(downtime_step(5, 10, 1), 1);
        assert_eq!(downtime_step(0, 3, 0), 0);
        assert_eq!(
            downtime_step(u64::from(u32::MAX), 10, 10),
            u64::from(u32::MAX)
        );
    }
}
