//! The source side of the QEMU sidecar: QEMU migrates into a unix socket the agent owns, the
//! agent seals the stream onto the attested session and drives the switch-over. spec: spec/qemu.md §3

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UnixListener};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, info};
use trustmig_protocol::keys::Direction;
use trustmig_protocol::messages::TransferMode;
use trustmig_protocol::migration::{Outcome, SourceMigration};
use trustmig_protocol::order::{hex, NonConvergence, VerifiedOrder};
use trustmig_protocol::precopy::{PrecopyError, THROTTLE_STEPS};
use trustmig_protocol::record::{Opener, RecordType, Sealer};
use trustmig_protocol::Digest;

use crate::channel::{abort_code, note_source_result, vm_manifest, SourceChannel};
use crate::control::{Progress, Summary};
use crate::daemon::Ctx;
use crate::disk::SourceDisk;
use crate::error::AgentError;
use crate::journal::State;
use crate::pumps::{open_pump, seal_pump, Received, Sent};
use crate::qmp::{MigrationInfo, Qmp};
use crate::settle::{self, InDoubt, Settlement};
use crate::wire::preamble;

use super::giveback::give_back;
use super::{proto, qemu_vm, qmp_err, socket_dir, socket_path, stream_secret};

/// How long a failing source waits for the destination to discard its copy and close before
/// it runs `cont` (a refused `cont` is retried anyway: `giveback.rs`).
const DISCARD_WAIT: Duration = Duration::from_secs(5);
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

/// Steps of the downtime ladder unless the VM's configuration says otherwise.
const DEFAULT_DOWNTIME_STEPS: u32 = 3;
/// More steps than this would start below a millisecond for any sensible target.
pub(super) const MAX_DOWNTIME_STEPS: u32 = 10;

/// The ladder's steps for an order allowing `max_rounds`: it reaches the target by the order's
/// last round at the latest, so non-convergence is judged against the target, never a step.
fn ladder_steps(configured: u32, max_rounds: u32) -> u32 {
    configured.min(max_rounds.saturating_sub(1))
}

/// QEMU's downtime-limit (ms) after `rounds` completed dirty-memory rounds: the order's
/// `target` halved `steps - rounds` times, at least 1 ms, never above `target`.
///
/// Why a ladder: QEMU stops the guest as soon as the memory left to send fits in its limit at
/// the measured bandwidth, even in the middle of the first pass. With the full target from the
/// start, a fast transport buys a large stop-and-copy instead of a short one, so the guest's
/// downtime comes out close to the target whatever it dirties. Starting low lets an idle or
/// slow-dirtying guest finish the first pass and stop with little left; a busy guest still
/// reaches the full target after `steps` rounds (the approach of OpenStack Nova's
/// `live_migration_downtime_steps`).
fn downtime_step(target: u64, steps: u32, rounds: u64) -> u64 {
    let halvings = u64::from(steps).saturating_sub(rounds);
    (target >> halvings.min(63)).max(1).min(target)
}

/// Run the migration of a QEMU VM as its source (called by `source::migrate` for `qemu` VMs).
/// The error's string says where the VM runs now.
pub async fn migrate_source(
    ctx: &Arc<Ctx>,
    order: VerifiedOrder,
    progress: &mpsc::Sender<Progress>,
) -> Result<Summary, (AgentError, String)> {
    let body = order.body().clone();
    let not_started = |e: AgentError| (e, "untouched: the migration never started".to_string());
    let qmp_path = qemu_vm(&ctx.config, &body.vm).ok_or_else(|| {
        not_started(AgentError::Migration(format!(
            "no QEMU VM named {:?} on this agent",
            body.vm
        )))
    })?;
    let mut qmp = Qmp::connect(&qmp_path, ctx.step_timeout())
        .await
        .map_err(|e| not_started(qmp_err(e)))?;
    let status = qmp
        .query_status()
        .await
        .map_err(|e| not_started(qmp_err(e)))?;
    if !matches!(status.status.as_str(), "running" | "paused") {
        return Err(not_started(AgentError::Migration(format!(
            "QEMU VM {:?} is in state {:?}; only a running or paused VM can migrate",
            body.vm, status.status
        ))));
    }
    let m = qmp
        .query_migrate()
        .await
        .map_err(|e| not_started(qmp_err(e)))?;
    if m.in_progress() {
        return Err(not_started(AgentError::Migration(format!(
            "QEMU VM {:?} is already migrating (status {})",
            body.vm,
            m.status()
        ))));
    }
    // Disks that travel (spec/qemu.md §5): each must be a raw image QEMU has open read-only.
    let disks = match ctx.config.vms.iter().find(|v| v.name == body.vm) {
        Some(v) => crate::disk::source_disks(v, &mut qmp)
            .await
            .map_err(not_started)?,
        None => Vec::new(),
    };
    ctx.journal
        .lock()
        .expect("journal lock")
        .claim_as_source(&body, order.id(), !status.running)
        .map_err(|e| not_started(e.into()))?;
    info!(order = %hex(order.id()), vm = %body.vm, to = %body.destination_addr, qemu = %qmp.version, "QEMU migration starts");
    let mut run = SourceRun {
        ctx: ctx.clone(),
        progress: progress.clone(),
        outcome: Outcome::RollBack,
        tasks: Vec::new(),
        started: Instant::now(),
        disks,
        downtime_steps: ctx
            .config
            .vms
            .iter()
            .find(|v| v.name == body.vm)
            .and_then(|v| v.downtime_steps)
            .unwrap_or(DEFAULT_DOWNTIME_STEPS),
    };
    let result = run.go(&order, &mut qmp).await;
    for t in run.tasks.drain(..) {
        t.abort();
    }
    let id = *order.id();
    match result {
        Ok(summary) => {
            note_source_result(ctx, &id, &body.vm, Ok(&summary), false);
            Ok(summary)
        }
        Err(e) => {
            // After COMMIT only the destination's answer may give the VM back (SPEC.md §8.8).
            let in_doubt = InDoubt::of(&order, !status.running);
            let settlement = settle::after_failure(ctx, &in_doubt, run.outcome).await;
            let rolled_back = matches!(settlement, None | Some(Settlement::NotMoved));
            let vm_state = if rolled_back {
                let back = give_back(ctx, &body.vm, &mut qmp, status.running).await;
                match settlement {
                    Some(s) => format!("{}; {back}", s.vm_state()),
                    None => back,
                }
            } else {
                if let Some(Settlement::InDoubt(_)) = settlement {
                    // QEMU holds the stopped VM until the destination answers (settle.rs).
                    settle::keep_asking(ctx.clone(), in_doubt, true);
                }
                settlement.map(|s| s.vm_state()).unwrap_or_default()
            };
            note_source_result(ctx, &id, &body.vm, Err((&e, &vm_state)), rolled_back);
            Err((e, vm_state))
        }
    }
}

struct SourceRun {
    ctx: Arc<Ctx>,
    progress: mpsc::Sender<Progress>,
    outcome: Outcome,
    tasks: Vec<JoinHandle<()>>,
    started: Instant,
    /// Disks sent before QEMU's stream (empty with shared storage).
    disks: Vec<SourceDisk>,
    /// See `downtime_step`.
    downtime_steps: u32,
}

impl SourceRun {
    async fn report(&self, p: Progress) {
        let _ = self.progress.send(p).await;
    }

    /// A data stream failed here: the destination usually knows why (it refused a record and
    /// closed the stream), and its `Abort` follows on the control channel. Prefer that reason.
    async fn peer_reason(&self, chan: &mut SourceChannel, local: String) -> AgentError {
        match chan.peer_abort().await {
            Some((code, reason)) => AgentError::Migration(format!(
                "{local}; destination: peer aborted with {code:?}: {reason}"
            )),
            None => AgentError::Migration(local),
        }
    }

    async fn go(&mut self, order: &VerifiedOrder, qmp: &mut Qmp) -> Result<Summary, AgentError> {
        let mut chan = SourceChannel::connect(&self.ctx, order).await?;
        self.report(Progress::Connected {
            peer: hex(&order.body().destination),
        })
        .await;
        let r = self.run_on(&mut chan, order, qmp).await;
        if let Err(e) = &r {
            chan.abort(abort_code(e), &e.to_string()).await;
            // The destination discards its QEMU before it closes (spec/qemu.md §4): a loaded
            // destination may hold the images' locks, which the source's `cont` needs.
            if !chan.wait_closed(DISCARD_WAIT).await {
                debug!("the destination did not close within {DISCARD_WAIT:?} of the abort");
            }
        }
        r
    }

    #[allow(clippy::too_many_lines)]
    async fn run_on(
        &mut self,
        chan: &mut SourceChannel,
        order: &VerifiedOrder,
        qmp: &mut Qmp,
    ) -> Result<Summary, AgentError> {
        let body = order.body().clone();
        let disk_manifests = crate::disk::hash_disks(&self.disks).await?;
        // Empty with shared storage; the root covers these digests (spec/qemu.md §5).
        let manifest = vm_manifest(&self.ctx, &body.vm, crate::disk::DISK_CHUNK, disk_manifests);
        let est = chan
            .handshake(order, TransferMode::HypervisorStream, 1, &manifest)
            .await?;
        self.report(Progress::Attested {
            streams: est.streams,
        })
        .await;

        // Data stream 0, bound to the session by its StreamInit record.
        let sid = est.keys.session_id();
        let addr = body.destination_addr.clone();
        let mut data = TcpStream::connect(&addr)
            .await
            .map_err(|e| AgentError::Connect {
                addr: addr.clone(),
                reason: format!("data stream 0: {e}"),
            })?;
        data.set_nodelay(true).ok();
        let mut sealer = Sealer::new(stream_secret(&est, Direction::SourceToDestination), 0);
        let mut first = preamble(&sid, 0).to_vec();
        let init = [&sid[..], &0u16.to_be_bytes()].concat();
        sealer
            .seal(RecordType::StreamInit, &init, &mut first)
            .map_err(proto)?;
        data.write_all(&first)
            .await
            .map_err(|e| AgentError::Migration(format!("data stream 0: {e}")))?;
        let opener = Opener::new(stream_secret(&est, Direction::DestinationToSource), 0);
        // Disks first (spec/qemu.md §5): the destination attaches them, once verified, before
        // it lets its QEMU load anything. A failure here leaves the source VM untouched.
        let mut sm = SourceMigration::new(est.channel.clone(), *order.id());
        let disk_wire = if est.manifest.disks.is_empty() {
            0
        } else {
            match crate::disk::send_disks(&mut data, &mut sealer, &est.manifest, &self.disks).await
            {
                Ok(n) => {
                    info!(bytes = n, disks = est.manifest.disks.len(), "disks sent");
                    n
                }
                Err(e) => {
                    let local = format!("sending disks: {e}");
                    return Err(self.peer_reason(chan, local).await);
                }
            }
        };

        // QEMU: parameters from the order, then migrate to our socket.
        let limits = &body.limits;
        // `events`: QEMU announces pre-switchover and completion at once (polling would add up
        // to a poll period to the guest's downtime, twice).
        // `auto-converge` with `throttle` orders: QEMU's own throttle, in the native engine's steps.
        let throttle = limits.on_nonconvergence == NonConvergence::Throttle;
        qmp.migrate_set_capabilities(&[
            ("pause-before-switchover", true),
            ("return-path", true),
            ("events", true),
            ("auto-converge", throttle),
        ])
        .await
        .map_err(qmp_err)?;
        if throttle {
            qmp.migrate_set_throttle(THROTTLE_STEPS[0], THROTTLE_STEP, THROTTLE_MAX)
                .await
                .map_err(qmp_err)?;
        }
        let bw = if limits.bandwidth_bps == 0 {
            UNCAPPED_BPS
        } else {
            limits.bandwidth_bps
        };
        let target = u64::from(limits.downtime_ms);
        let steps = ladder_steps(self.downtime_steps, limits.max_rounds);
        // Rounds QEMU may pre-copy before the order's non-convergence action (SPEC.md §8.4):
        // `max_rounds`, and with `throttle` two more rounds per throttle step (QEMU 7.2 raises
        // its throttle at every second bitmap sync that finds the guest dirtying too fast).
        let round_budget = u64::from(limits.max_rounds)
            + if throttle {
                2 * THROTTLE_STEPS.len() as u64
            } else {
                0
            };
        let mut forced = false;
        let mut limit = downtime_step(target, steps, 0);
        qmp.migrate_set_parameters(limit, bw)
            .await
            .map_err(qmp_err)?;
        let dir = socket_dir(&self.ctx)?;
        let path = socket_path(&dir, "out", order.id())?;
        let listener = UnixListener::bind(&path).map_err(AgentError::io(&path))?;
        let uri = format!("unix:{}", path.display());
        qmp.take_events(); // older events (a STOP before now) say nothing about this migration
        qmp.migrate(&uri).await.map_err(qmp_err)?;
        let accepted = tokio::time::timeout(self.ctx.step_timeout(), listener.accept()).await;
        let _ = std::fs::remove_file(&path);
        let (qemu_sock, _) = accepted
            .map_err(|_| {
                AgentError::Migration(format!(
                    "QEMU did not connect to {} in time",
                    path.display()
                ))
            })?
            .map_err(AgentError::io(&path))?;
        let (qemu_rd, qemu_wr) = qemu_sock.into_split();
        let (data_rd, data_wr) = data.into_split();

        let (fwd_tx, mut fwd_rx) = mpsc::channel::<Result<Sent, String>>(1);
        self.tasks.push(tokio::spawn(async move {
            let _ = fwd_tx
                .send(seal_pump(qemu_rd, data_wr, sealer, "source stream").await)
                .await;
        }));
        let (ret_tx, mut ret_rx) = mpsc::channel::<Result<Received, AgentError>>(1);
        self.tasks.push(tokio::spawn(async move {
            let _ = ret_tx
                .send(open_pump(data_rd, qemu_wr, opener, "return path").await)
                .await;
        }));

        let mut poll = tokio::time::interval(POLL);
        let mut sent: Option<Sent> = None;
        let mut completed: Option<MigrationInfo> = None;
        let mut paused_at: Option<Instant> = None;
        let mut stopped_at: Option<SystemTime> = None;
        let mut last_sync = u64::MAX;
        let mut last_report = Instant::now();
        let mut ret_done = false;
        while sent.is_none() || completed.is_none() {
            // On a poll tick or a MIGRATION event, look at QEMU's migration state.
            let mut look = false;
            tokio::select! {
                _ = poll.tick() => look = true,
                ev = qmp.event() => {
                    let ev = ev.map_err(qmp_err)?;
                    if ev.name == "STOP" {
                        stopped_at = ev.at; // the guest's downtime starts here
                    }
                    look = ev.migration_status().is_some();
                }
                Some(r) = fwd_rx.recv() => match r {
                    Ok(s) => {
                        debug!(bytes = s.digest.len(), "QEMU stream sealed to its end");
                        sent = Some(s);
                    }
                    Err(e) => return Err(self.peer_reason(chan, e).await),
                },
                Some(r) = ret_rx.recv(), if !ret_done => {
                    ret_done = true;
                    if let Err(e) = r {
                        return Err(self.peer_reason(chan, e.to_string()).await);
                    }
                }
                msg = chan.next() => {
                    // The destination says nothing while the stream flows: this is an abort
                    // (or garbage), and either ends the migration.
                    let msg = msg.ok_or_else(|| AgentError::Migration("control channel closed".into()))??;
                    let mut att = self.ctx.attester.lock().expect("attester lock");
                    sm.handle(&msg, att.as_mut()).map_err(proto)?;
                }
            }
            if look && completed.is_none() {
                let m = qmp.query_migrate().await.map_err(qmp_err)?;
                match m.status() {
                    "pre-switchover" if paused_at.is_none() => {
                        // A STOP still queued (read during a command) counts too.
                        let queued_stop = qmp
                            .take_events()
                            .into_iter()
                            .rfind(|e| e.name == "STOP")
                            .and_then(|e| e.at);
                        paused_at = Some(instant_of(stopped_at.or(queued_stop)));
                        debug!(
                            since_stop_ms = paused_at.map(|p| p.elapsed().as_millis()),
                            remaining = m.ram.as_ref().map(|r| r.remaining),
                            transferred = m.ram.as_ref().map(|r| r.transferred),
                            mbps = m.ram.as_ref().map(|r| r.mbps),
                            "pre-switchover"
                        );
                        let ram = m.ram.clone().unwrap_or_default();
                        self.report(Progress::SwitchOver {
                            pages: ram.remaining / ram.page_size.max(1),
                        })
                        .await;
                        qmp.migrate_continue("pre-switchover")
                            .await
                            .map_err(qmp_err)?;
                    }
                    "completed" => {
                        debug!("source QEMU completed");
                        completed = Some(m.clone());
                    }
                    "failed" | "cancelled" => {
                        // Usually because the destination stopped reading: its Abort says why.
                        let local = format!(
                            "QEMU migration {}: {}",
                            m.status(),
                            m.error_desc.as_deref().unwrap_or("no reason given")
                        );
                        return Err(self.peer_reason(chan, local).await);
                    }
                    _ => {}
                }
                let sync = m.ram.as_ref().map_or(0, |r| r.dirty_sync_count);
                // QEMU counts the first pass's bitmap sync too: rounds done = syncs - 1.
                let rounds = sync.saturating_sub(1);
                if !forced
                    && paused_at.is_none()
                    && m.status() == "active"
                    && rounds >= round_budget
                {
                    if limits.on_nonconvergence == NonConvergence::Abort {
                        return Err(proto(PrecopyError::NotConverged {
                            rounds: u32::try_from(rounds).unwrap_or(u32::MAX),
                            predicted_ms: m.expected_downtime.unwrap_or(0),
                            target_ms: limits.downtime_ms,
                        }));
                    }
                    // force, or throttle after its last step: switch over at QEMU's next check,
                    // accepting a longer downtime.
                    forced = true;
                    limit = QEMU_MAX_DOWNTIME_MS;
                    info!(rounds, "pre-copy did not converge: forcing the switch-over");
                    qmp.migrate_set_parameters(limit, bw)
                        .await
                        .map_err(qmp_err)?;
                }
                let next = downtime_step(target, steps, rounds);
                if !forced && next != limit && paused_at.is_none() && m.status() == "active" {
                    limit = next;
                    debug!(
                        limit_ms = limit,
                        rounds = sync.saturating_sub(1),
                        "downtime-limit raised"
                    );
                    qmp.migrate_set_parameters(limit, bw)
                        .await
                        .map_err(qmp_err)?;
                }
                if completed.is_none()
                    && (sync != last_sync || last_report.elapsed() >= Duration::from_secs(1))
                {
                    last_sync = sync;
                    last_report = Instant::now();
                    self.report(round_progress(&m)).await;
                }
            }
            if self.started.elapsed() > Duration::from_secs(3600) {
                return Err(AgentError::Migration(
                    "QEMU migration did not finish within an hour".into(),
                ));
            }
        }
        let (Some(sent), Some(info)) = (sent, completed) else {
            unreachable!("the loop ends only when both are set");
        };
        let paused_at = paused_at.unwrap_or_else(Instant::now);
        let digest: Digest = sent.digest.clone().finish(&est.transcript_hash);
        let so = sm.switch_over(vec![sent.records], digest).map_err(proto)?;
        // Final evidence, Ready, Commit (journalled first), Resumed.
        chan.commit_exchange(&mut sm, &so, order.id(), &self.progress, &mut self.outcome)
            .await?;
        let downtime = paused_at.elapsed();
        let total = self.started.elapsed();
        let ram = info.ram.clone().unwrap_or_default();
        let summary = Summary {
            order_id: hex(order.id()),
            vm: body.vm.clone(),
            guest_bytes: ram.total,
            total_ms: total.as_millis() as u64,
            downtime_ms: downtime.as_millis() as u64,
            downtime_target_ms: u64::from(limits.downtime_ms),
            rounds: ram.dirty_sync_count.saturating_sub(1) as u32,
            converged: !forced,
            throttle: info.cpu_throttle_percentage.unwrap_or(0).min(100) as u8,
            bytes_on_wire: sent.wire_bytes + disk_wire,
            bytes_per_round: vec![sent.digest.len()],
            zero_pages_skipped: ram.duplicate,
            stop_copy_pages: 0,
            throughput_bps: (sent.wire_bytes as f64 / total.as_secs_f64().max(1e-3)) as u64,
            memory_checksum: hex::encode(digest),
        };
        self.ctx.journal.lock().expect("journal lock").set(
            order.id(),
            State::Done,
            format!("downtime {} ms", summary.downtime_ms),
        )?;
        info!(order = %summary.order_id, downtime_ms = summary.downtime_ms, total_ms = summary.total_ms, stream_bytes = sent.digest.len(), "QEMU migration done; source QEMU stays stopped");
        Ok(summary)
    }
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

    #[test]
    fn downtime_ladder_climbs_to_the_target_and_never_past_it() {
        let ladder: Vec<u64> = (0..6).map(|r| downtime_step(300, 3, r)).collect();
        assert_eq!(ladder, [37, 75, 150, 300, 300, 300]);
        // No steps: the target from the start; tiny targets stay at least 1 ms, at most target.
        assert_eq!(downtime_step(300, 0, 0), 300);
        assert_eq!(downtime_step(5, 10, 0), 1);
        assert_eq!(downtime_step(0, 3, 0), 0);
        assert_eq!(
            downtime_step(u64::from(u32::MAX), 10, 10),
            u64::from(u32::MAX)
        );
    }
}
