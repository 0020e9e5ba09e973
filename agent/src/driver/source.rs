//! The source driver: order, claim, channel, handshake, the backend's transfer, switch-over,
//! final evidence, commit; on failure rollback or settlement. spec: SPEC.md §5, §7, §8
//!
//! Until COMMIT is journalled, every failure rolls back: the backend gives the VM back as it
//! was. After it, the source never resumes the VM on its own: only the destination's answer
//! (or the operator) may give it back (SPEC.md §8.8).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{debug, error, info};
use trustmig_protocol::commit::{Input, Output, Signal};
use trustmig_protocol::messages::Message;
use trustmig_protocol::migration::{SourceEvent, SourceMigration};
use trustmig_protocol::order::{hex, OrderId, OrderPolicy, Role, SignedOrder, VerifiedOrder};
use trustmig_protocol::settlement::{NotHeld, VmAction};

use crate::attestation::SharedTpm;
use crate::backend::qemu::QemuSource;
use crate::backend::synthetic::SyntheticSource;
use crate::backend::{SourceLink, SourceVm};
use crate::control::{Progress, Step, Summary};
use crate::ctx::{history_entry, Ctx};
use crate::driver::channel::SourceChannel;
use crate::driver::commit::{expect, Commit};
use crate::driver::settle::{self, InDoubt, Settlement};
use crate::error::AgentError;
use crate::fault::{self, crash_point, CrashPoint};
use crate::journal::State;
use crate::net::wire::WireError;

/// How long a failing source waits for the destination to discard its copy and close before
/// it gives the VM back: a loaded destination QEMU may hold the images' locks, which the
/// source's `cont` needs (a refused `cont` is retried anyway: `backend/qemu/giveback.rs`).
const DISCARD_WAIT: Duration = Duration::from_secs(5);

/// Where the VM is after a migration that failed, for the operator (`Progress::Failed`).
#[derive(Debug, PartialEq, Eq)]
pub enum Whereabouts {
    /// The migration never started: the VM was not touched.
    Untouched,
    /// The migration did not commit (`settled`: the destination, asked after a lost session,
    /// said it never did): the VM is this host's again, `how` says in what state.
    GivenBack {
        /// Settled by asking the destination.
        settled: bool,
        /// What the backend did (`rolled back: the VM runs again on the source (cont)`, ...).
        how: String,
    },
    /// Committed; the destination confirmed it committed: the VM is there.
    Moved,
    /// Committed; the destination did not answer (why): the VM stays stopped here, in doubt,
    /// and the destination is asked again until it answers.
    InDoubt(String),
}

impl std::fmt::Display for Whereabouts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Untouched => f.write_str("untouched: the migration never started"),
            Self::GivenBack {
                settled: false,
                how,
            } => f.write_str(how),
            Self::GivenBack { settled: true, how } => {
                write!(f, "{}; {how}", settle::NOT_MOVED)
            }
            Self::Moved => f.write_str(&Settlement::Moved.vm_state()),
            Self::InDoubt(why) => f.write_str(&Settlement::InDoubt(why.clone()).vm_state()),
        }
    }
}

/// Run the migration in `order_hex` as its source, reporting progress.
pub async fn migrate(
    ctx: Arc<Ctx>,
    order_hex: String,
    progress: mpsc::Sender<Progress>,
) -> Result<Summary, AgentError> {
    let body = ::hex::decode(order_hex.trim())
        .ok()
        .and_then(|b| SignedOrder::from_cbor(&b).ok())
        .and_then(|o| o.dangerous_unverified_body().ok());
    // Journalled before this attempt (replayed, revoked): its refusal is audited here.
    let known = |ctx: &Ctx| {
        (body.as_ref()).is_some_and(|b| {
            (ctx.journal
                .lock()
                .expect("journal lock")
                .record(&b.order_id))
            .is_some()
        })
    };
    let known_before = known(&ctx);
    let r = migrate_checked(&ctx, &order_hex, &progress).await;
    if let Err((e, Whereabouts::Untouched)) = &r {
        if known_before || !known(&ctx) {
            audit_refused(&ctx, body.as_ref(), e);
            ctx.metrics.refused(e);
        }
    }
    if let Err((e, vm_state)) = &r {
        let _ = progress
            .send(Progress::Failed {
                error: e.to_string(),
                vm: vm_state.to_string(),
            })
            .await;
    }
    r.map_err(|(e, _)| e)
}

/// Audit an order refused before this attempt claimed it (a claimed one is audited by the
/// journal). `body` is the order as sent, unverified: what it claims to be.
fn audit_refused(ctx: &Ctx, body: Option<&trustmig_protocol::order::OrderBody>, e: &AgentError) {
    ctx.journal
        .lock()
        .expect("journal lock")
        .audit_refused(crate::audit::Event {
            order_id: body.map(|b| hex(&b.order_id)).unwrap_or_default(),
            vm: body.map(|b| b.vm.clone()).unwrap_or_default(),
            role: "source".into(),
            peer: body.map(|b| hex(&b.destination)).unwrap_or_default(),
            reason: e.to_string(),
            ..Default::default()
        });
}

/// The migration; its error comes with where the VM is now.
async fn migrate_checked(
    ctx: &Arc<Ctx>,
    order_hex: &str,
    progress: &mpsc::Sender<Progress>,
) -> Result<Summary, (AgentError, Whereabouts)> {
    let not_started = |e: AgentError| (e, Whereabouts::Untouched);
    let order = verified(ctx, order_hex).map_err(not_started)?;
    let vm = order.body().vm.clone();
    // Refused at once when the VM is busy, and again at the claim (another order may have
    // taken the VM while this one queued).
    let qemu = crate::backend::qemu::qemu_vm(&ctx.config(), &vm).is_some();
    busy(
        ctx,
        &ctx.journal.lock().expect("journal lock"),
        &order,
        qemu,
    )
    .map_err(not_started)?;
    let _slot = slot(ctx, order.id(), &vm, progress).await;
    // The configuration the order is prepared on (once it has its slot: an order may queue
    // long); the claim checks the VM's entry is still this one (a reload may replace it until
    // the claim makes the VM busy).
    let config = ctx.config();
    if let Some(qmp) = crate::backend::qemu::qemu_vm(&config, &vm) {
        // QEMU's state first: the claim records whether the VM was paused (spec/qemu.md §4).
        let source = QemuSource::prepare(ctx, &config, order.body(), &qmp)
            .await
            .map_err(not_started)?;
        crate::fault::hold(crate::fault::Hold::BeforeClaim).await;
        claim(ctx, &config, &order, source.paused_before())
            .await
            .map_err(not_started)?;
        return run(ctx, order, progress, source).await;
    }
    // Single use first: a replayed order is refused as such, whatever became of its VM.
    claim(ctx, &config, &order, false)
        .await
        .map_err(not_started)?;
    match SyntheticSource::take(ctx, &vm) {
        Ok(source) => run(ctx, order, progress, source).await,
        Err(e) => {
            let _ = ctx.journal.lock().expect("journal lock").set(
                order.id(),
                State::RolledBack,
                e.to_string(),
            );
            Err(not_started(e))
        }
    }
}

/// The order in `order_hex`, verified for this agent as its source, to a destination this
/// agent trusts as a peer.
fn verified(ctx: &Ctx, order_hex: &str) -> Result<VerifiedOrder, AgentError> {
    let bytes = hex::decode(order_hex.trim())
        .map_err(|e| AgentError::Usage(format!("order is not hex: {e}")))?;
    let signed = SignedOrder::from_cbor(&bytes)?;
    let (now, overruled) =
        (ctx.journal.lock().expect("journal lock")).order_time(crate::unix_now());
    let order = signed
        .verify(&OrderPolicy {
            operators: &ctx.operators()?,
            me: ctx.identity.id(),
            role: Role::Source,
            now,
        })
        .map_err(|e| AgentError::of_order(e, overruled))?;
    // The order pins the destination's identity; this agent must trust it as a peer too, so
    // that removing a peer (`trust remove-peer`) stops migrations to it at once (SPEC.md §3.4).
    let destination = &order.body().destination;
    if !ctx.peers()?.contains(destination) {
        return Err(AgentError::Refused(format!(
            "destination {} is not a trusted peer here (trustmig trust add-peer)",
            hex(destination)
        )));
    }
    Ok(order)
}

/// Why `order`'s VM cannot be taken now, if it cannot: one migration per VM at a time. An
/// order already journalled passes: a replayed order is left to the claim, which names it so.
/// `qemu`: the VM is a QEMU VM in the configuration the caller read.
fn busy(
    ctx: &Ctx,
    j: &crate::journal::Journal,
    order: &VerifiedOrder,
    qemu: bool,
) -> Result<(), AgentError> {
    let vm = &order.body().vm;
    if j.entry(order.id()).is_some() {
        return Ok(());
    }
    if j.leaving(vm) {
        return Err(AgentError::Refused(not_free(ctx, j, vm, NotHeld::Leaving)));
    }
    // Its arrival's session resumes it (`cont`) after COMMIT: a source that took the QEMU
    // meanwhile would have that `cont` run a copy it switched over.
    if ctx.arriving.contains(vm) {
        return Err(AgentError::Refused(format!(
            "VM {vm} is arriving here by another order: send it once it has arrived"
        )));
    }
    // QEMU alone cannot tell: a copy that arrived and never ran is paused too. (Synthetic
    // guests live in the agent and start anew from the journal: no such copy.)
    if qemu {
        if let Err(why) = j.holds_vm(vm) {
            return Err(AgentError::Refused(not_free(ctx, j, vm, why)));
        }
    }
    Ok(())
}

/// Claim `order`'s VM in the journal (`paused_before`: the VM was paused before the order),
/// if its entry in the configuration is still the one of `config`, the configuration the
/// order was prepared on. Under `Ctx::claims`, so that no reload swaps the entry between the
/// check and the claim.
async fn claim(
    ctx: &Ctx,
    config: &crate::config::Config,
    order: &VerifiedOrder,
    paused_before: bool,
) -> Result<(), AgentError> {
    let vm = &order.body().vm;
    let _claims = ctx.claims.read().await;
    if !config.same_vm(&ctx.config(), vm) {
        return Err(AgentError::Refused(format!(
            "VM {vm}'s entry in the configuration changed (a reload) while the order was being prepared: send the order again"
        )));
    }
    let mut journal = ctx.journal.lock().expect("journal lock");
    let qemu = crate::backend::qemu::qemu_vm(config, vm).is_some();
    busy(ctx, &journal, order, qemu)?;
    journal.claim_as_source(order, paused_before)?;
    drop(journal);
    crash_point(CrashPoint::SourceAfterClaim);
    Ok(())
}

/// A permit to send one migration (`transfer.max_concurrent_migrations`), queueing for it
/// (listed by `status`, reported to the operator) while every permit is taken.
async fn slot(
    ctx: &Arc<Ctx>,
    id: &OrderId,
    vm: &str,
    progress: &mpsc::Sender<Progress>,
) -> tokio::sync::OwnedSemaphorePermit {
    if let Ok(p) = ctx.outgoing.clone().try_acquire_owned() {
        return p;
    }
    let key = hex(id);
    let ahead = {
        let mut q = ctx.queued.lock().expect("queue lock");
        q.push((key.clone(), vm.to_string()));
        q.len() - 1
    };
    info!(order = %key, vm, ahead, "queued: concurrent migrations at their limit");
    let _ = progress.send(Progress::Queued { ahead }).await;
    let p = ctx.outgoing.clone().acquire_owned().await;
    ctx.queued
        .lock()
        .expect("queue lock")
        .retain(|(o, _)| *o != key);
    p.expect("the semaphore is never closed")
}

/// Drive a claimed order with its backend; after a failure, roll back or settle.
async fn run<B: SourceVm>(
    ctx: &Arc<Ctx>,
    order: VerifiedOrder,
    progress: &mpsc::Sender<Progress>,
    mut vm: B,
) -> Result<Summary, (AgentError, Whereabouts)> {
    let body = order.body();
    info!(order = %hex(order.id()), vm = %body.vm, to = %body.destination_addr, "migration starts");
    ctx.metrics.started("source", B::NAME);
    let id = *order.id();
    let mut commit = match Commit::claimed(ctx, id) {
        Ok(c) => c,
        Err(e) => return Err((e, Whereabouts::Untouched)),
    };
    let result = drive(ctx, &order, progress, &mut vm, &mut commit).await;
    let e = match result {
        Ok(summary) => {
            note_source_result(ctx, &id, &body.vm, Ok(&summary));
            ctx.metrics.ended("source", B::NAME, "done", None);
            ctx.metrics.sent(&summary);
            return Ok(summary);
        }
        Err(e) => e,
    };
    // The machine decides (SPEC.md §8.8): before COMMIT it journals the rollback, then the VM
    // is given back; after it, only the destination's answer may give the VM back.
    commit.feed(ctx, Input::Failed, e.to_string());
    let mut unjournalled = None;
    let outs = commit.drain(ctx).unwrap_or_else(|j| {
        // Unjournalled, the rollback is made again by a restart; the journal decides below.
        error!(order = %hex(&id), "could not journal what the session's failure means: {j}");
        unjournalled = Some(j);
        Vec::new()
    });
    // Paused at the claim, or handed over paused at the switch-over: given back paused (a
    // backend that saw more, live, may know better). The machine's give-back says so.
    let give_back = outs.iter().find_map(|o| match o {
        Output::Vm(a) => a.given_back(),
        _ => None,
    });
    let in_doubt = InDoubt::of(&order);
    let settlement = if outs.contains(&Output::Ask) {
        Some(settle::ask(ctx, &in_doubt).await)
    } else if give_back.is_some() {
        None
    } else {
        // The machine said nothing (its session had ended: a DONE write failed, say): the
        // journal's record decides, as a restart would.
        let latest = ctx.journal.lock().expect("journal lock").entry(&id);
        match latest.map(|e| e.state) {
            Some(State::Committed) => Some(settle::ask(ctx, &in_doubt).await),
            Some(State::Done | State::Settled) => Some(Settlement::Moved),
            _ => None,
        }
    };
    let vm_state = match settlement {
        // When the machine gave none (its session had ended), the same rule read from the
        // journal.
        None => Whereabouts::GivenBack {
            settled: false,
            how: vm
                .give_back(
                    ctx,
                    give_back.unwrap_or_else(|| journalled_paused(ctx, &id)),
                )
                .await,
        },
        // Journalled before the VM is given back (by the machine, or a "not moved" answer by
        // `settle::ask`, paused as its machine said): a give-back that goes on in the
        // background (a refused `cont`) asks the journal whether the VM is still this host's.
        Some(Settlement::NotMoved { paused_before }) => Whereabouts::GivenBack {
            settled: true,
            how: vm.give_back(ctx, paused_before).await,
        },
        Some(Settlement::InDoubt(why)) => {
            // Stopped as it is until the destination answers (settle.rs).
            vm.keep_stopped(ctx);
            settle::keep_asking(ctx.clone(), in_doubt, true);
            Whereabouts::InDoubt(why)
        }
        Some(Settlement::Moved) => Whereabouts::Moved,
        // Only the operator settles an order by hand, and only once its session ended.
        Some(s @ Settlement::Meanwhile) => Whereabouts::InDoubt(s.vm_state()),
    };
    // After the give-back, which clears what was left before.
    if let Some(j) = unjournalled {
        leave_unjournalled(ctx, &id, &body.vm, &j);
    }
    note_source_result(ctx, &id, &body.vm, Err((&e, &vm_state)));
    let outcome = match &vm_state {
        Whereabouts::Untouched => "refused",
        Whereabouts::GivenBack { .. } => "rolled-back",
        Whereabouts::Moved => "moved",
        Whereabouts::InDoubt(_) => "in-doubt",
    };
    ctx.metrics.ended("source", B::NAME, outcome, Some(&e));
    Err((e, vm_state))
}

/// The outcome of order `id` could not be journalled (`j`): the journal still shows it under
/// way, so `vm` is not sent from here until a restart settles it; `status` and `doctor` say
/// why, beside what the give-back left to the operator, if anything.
fn leave_unjournalled(ctx: &Ctx, id: &OrderId, vm: &str, j: &AgentError) {
    let mut how = format!(
        "the outcome of order {} could not be journalled ({j}): the VM is not sent from here until it is; once the journal's disk is writable again, restart the agent (its start settles the order from the file)",
        hex(id)
    );
    if let Some(before) = ctx.left_now(vm) {
        how = format!("{how}; and: {before}");
    }
    ctx.leave_to_operator(vm, Some(hex(id)), how);
}

/// Whether the journal says this source order's VM is paused: at the claim, or at the
/// switch-over once there (`SourceLink::hands_over`). The machine's own rule
/// (`Rules::give_back`), so that the model checker's verdict on it holds here too.
fn journalled_paused(ctx: &Ctx, id: &OrderId) -> bool {
    let journal = ctx.journal.lock().expect("journal lock");
    let back = journal.rules().give_back(journal.entry(id).as_ref());
    back.given_back() == Some(true)
}

/// Why the QEMU copy of `vm` here is not the VM to send, and what gets it out of that.
fn not_free(ctx: &Ctx, j: &crate::journal::Journal, vm: &str, why: NotHeld) -> String {
    let reconcile = ctx.home.command(&["reconcile", vm]);
    let status = ctx.home.command(&["status"]);
    let current = j.last_order_of(vm);
    let order = match why {
        NotHeld::Leaving => j.leaving_order(vm).or(current),
        _ => current,
    }
    .map_or("?", |r| r.order_id.as_str());
    match why {
        NotHeld::Leaving => match ctx.left_as_journal_says(j, vm) {
            Some(how) => format!("VM {vm} is left to the operator: {how}"),
            None => format!(
                "VM {vm} is already migrating from this host, or in doubt after one (order {order}; one migration per VM at a time): `{status}` says which"
            ),
        },
        NotHeld::ToDiscard => format!(
            "VM {vm} here is a copy that arrived under order {order}, which never committed here: its QEMU is to be discarded, never run or sent. This agent's start-up reconciliation quits it (its log says what it did); if that was left to you, quit that QEMU (never `cont` it), then run `{reconcile}`"
        ),
        NotHeld::NotYetResumed => match ctx.left_as_journal_says(j, vm) {
            Some(how) => format!(
                "VM {vm} was committed here (order {order}) and the journal does not yet record that it ran here: {how}"
            ),
            None => {
                let run = if current.is_some_and(|r| r.paused_before) {
                    "it was handed over paused: leave it so (no `cont`)"
                } else {
                    "`cont` it"
                };
                format!(
                    "VM {vm} was committed here (order {order}) and has not run here since: it is resuming, or this agent's start or its `cont` after COMMIT left it to you (`{status}` and the log say which); if it was left to you, {run}, then run `{reconcile}` to record it, then send it"
                )
            }
        },
    }
}

/// Connect, run the session, and on failure tell the destination and let it discard first.
async fn drive<B: SourceVm>(
    ctx: &Arc<Ctx>,
    order: &VerifiedOrder,
    progress: &mpsc::Sender<Progress>,
    vm: &mut B,
    commit: &mut Commit,
) -> Result<Summary, AgentError> {
    let started = Instant::now();
    let mut chan = SourceChannel::connect(ctx, order).await?;
    let _ = progress
        .send(Progress::Connected {
            peer: hex(&order.body().destination),
        })
        .await;
    let r = match session(ctx, &mut chan, order, (progress, commit), vm, started).await {
        // A transport failure here usually follows the destination refusing something; its
        // Abort, queued or about to arrive, names what (tampered, replayed, ...).
        Err(local @ AgentError::Transport { .. }) => Err(match chan.peer_abort().await {
            Some((code, reason)) => AgentError::PeerAborted {
                local: Box::new(local),
                code,
                reason,
            },
            None => local,
        }),
        r => r,
    };
    if let Err(e) = &r {
        chan.abort(e.abort_code(), &e.to_string()).await;
        // The destination discards its copy before it closes (SPEC.md §8.8).
        if vm.waits_for_discard() && !chan.wait_closed(DISCARD_WAIT).await {
            debug!("the destination did not close within {DISCARD_WAIT:?} of the abort");
        }
    }
    r
}

/// Handshake, transfer, switch-over, commit exchange; the summary, journalled DONE.
async fn session<B: SourceVm>(
    ctx: &Arc<Ctx>,
    chan: &mut SourceChannel,
    order: &VerifiedOrder,
    (progress, commit): (&mpsc::Sender<Progress>, &mut Commit),
    vm: &mut B,
    started: Instant,
) -> Result<Summary, AgentError> {
    let offer = vm.offer(ctx).await?;
    let est = chan
        .handshake(order, offer.mode, offer.streams, &offer.manifest)
        .await?;
    let _ = progress
        .send(Progress::Attested {
            streams: est.streams,
        })
        .await;
    let mut est = est;
    let mut sm = SourceMigration::new(&mut est);
    let link = SourceLink {
        ctx,
        chan: &mut *chan,
        order,
        est: &est,
        sm: &mut sm,
        progress,
    };
    let t = vm.transfer(link).await?;
    let digest = t.digest;
    let paused = journalled_paused(ctx, order.id()) || crate::fault::hand_over_paused();
    let so = sm.switch_over(t.stream_records, digest, paused)?;
    // The guest is stopped and its last bytes went: the machine may not commit yet (no
    // `Ready`), so nothing comes of it but its phase.
    commit.feed(ctx, Input::SwitchedOver, "");
    commit.drain(ctx)?;
    // Final evidence, Ready, Commit (journalled first), Resumed.
    let mut steps = t.steps;
    let exchange = Exchange {
        order_id: order.id(),
        progress,
        steps: &mut steps,
        commit: &mut *commit,
        challenge_allowance: crate::backend::qemu::verify_allowance(&est.manifest),
    };
    commit_exchange(ctx, chan, &mut sm, &so, exchange).await?;
    drop(t.tasks);
    let downtime = t.paused_at.elapsed();
    let total = started.elapsed();
    let body = order.body();
    let mut summary = Summary {
        order_id: hex(order.id()),
        vm: body.vm.clone(),
        total_ms: total.as_millis() as u64,
        downtime_ms: downtime.as_millis() as u64,
        downtime_target_ms: u64::from(body.limits.downtime_ms),
        throughput_bps: (t.stream_bytes as f64 / total.as_secs_f64().max(1e-3)) as u64,
        memory_checksum: vm.memory_checksum(&digest),
        timeline: steps
            .iter()
            .map(|(step, at)| Step {
                step: (*step).to_string(),
                us: at.saturating_duration_since(t.paused_at).as_micros() as u64,
            })
            .collect(),
        handed_over_paused: paused,
        ..t.summary
    };
    commit.feed(
        ctx,
        Input::Resumed,
        // `trustmig status` shows the latest record's note: an operator's stop that went with
        // the VM shows there, as it does on the destination.
        match paused {
            true => format!("downtime {} ms; handed over paused", summary.downtime_ms),
            false => format!("downtime {} ms", summary.downtime_ms),
        },
    );
    // DONE journalled; the VM left here is the backend's to drop.
    expect(commit.next(ctx)?, Output::Vm(VmAction::Forget))?;
    crash_point(CrashPoint::SourceAfterDone);
    info!(order = %summary.order_id, downtime_ms = summary.downtime_ms, total_ms = summary.total_ms, "migration done");
    summary.final_quote = late_quote(ctx, chan, &mut sm, order.id()).await;
    Ok(summary)
}

/// After `Resumed` (the guest runs on the destination, outside its downtime): unless the order
/// is strict, extend the final digest into the TPM, quote it and send it to the destination
/// for its record (SPEC.md §8.7). The destination answers only an incident (`Abort`), which is
/// logged and journalled here too; otherwise it closes. Returns what the summary says.
async fn late_quote(
    ctx: &Arc<Ctx>,
    chan: &mut SourceChannel,
    sm: &mut SourceMigration,
    order_id: &OrderId,
) -> String {
    let quote = sm.final_quote(&mut SharedTpm::new(&ctx.attester));
    let (sent, verdict) = match quote {
        Ok(None) => return "quoted before Commit (strict)".into(),
        Ok(Some(m)) => {
            let verdict = send_late_quote(ctx, chan, &m).await;
            (Some(m), verdict)
        }
        Err(e) => (None, Err(format!("the late final quote failed: {e}"))),
    };
    let note = match verdict {
        Ok(note) => note,
        Err(reason) => {
            error!(order = %hex(order_id), "INCIDENT: {reason}");
            format!("INCIDENT: {reason}")
        }
    };
    let journalled =
        (ctx.journal.lock().expect("journal lock")).late_quote(order_id, sent.as_deref(), &note);
    if let Err(e) = journalled {
        error!(order = %hex(order_id), "could not journal the late final quote: {e}");
    }
    note
}

/// Send the late quote `m` and wait for the destination's verdict: `Err` is an incident.
async fn send_late_quote(ctx: &Ctx, chan: &mut SourceChannel, m: &[u8]) -> Result<String, String> {
    if let Err(e) = chan.send(m).await {
        return Err(format!("the late final quote could not be sent: {e}"));
    }
    match tokio::time::timeout(ctx.step_timeout(), chan.next_or_end()).await {
        Ok(Some(Ok(raw))) => match Message::decode(&raw) {
            Ok(Message::Abort { reason, .. }) => Err(format!(
                "the destination says: {}",
                trustmig_protocol::messages::peer_reason(&reason)
            )),
            _ => Err("an unexpected message after the late final quote".into()),
        },
        // Only the destination's authenticated close (TLS close_notify) says it verified and
        // journalled the quote; a reset or a broken frame may have carried an incident away
        // (an attacker could cause either).
        Ok(None | Some(Err(WireError::Closed))) => {
            Ok("quoted after Resumed; the destination raised no incident".into())
        }
        Ok(Some(Err(e))) => Ok(format!(
            "quoted after Resumed; the destination's verdict was lost ({e}): see its journal"
        )),
        Err(_) => Ok(
            "quoted after Resumed; the destination's verdict did not come in time: see its journal"
                .into(),
        ),
    }
}

/// What the commit exchange reports to: the order, the operator, the timeline.
struct Exchange<'a> {
    order_id: &'a OrderId,
    progress: &'a mpsc::Sender<Progress>,
    steps: &'a mut Vec<(&'static str, Instant)>,
    commit: &'a mut Commit,
    /// How much longer than a step the destination may take for `FinalChallenge` (it hashes
    /// disks verified in full first).
    challenge_allowance: std::time::Duration,
}

/// The timeline's name for a message received during the commit exchange.
fn received_step(raw: &[u8]) -> &'static str {
    match Message::decode(raw) {
        Ok(Message::FinalChallenge { .. }) => "FinalChallenge received",
        Ok(Message::Ready) => "Ready received",
        Ok(Message::Resumed) => "Resumed received",
        _ => "a message received",
    }
}

/// After switch-over: send `SwitchOver`, answer the final challenge with evidence, and on
/// `Ready` journal COMMIT durably *before* sending `Commit` (SPEC.md §8.7); ends at
/// `Resumed`. From the moment COMMIT is durable, a failure no longer rolls back (the rules
/// read the journal: `settlement::Rules::after_failure`).
async fn commit_exchange(
    ctx: &Arc<Ctx>,
    chan: &mut SourceChannel,
    sm: &mut SourceMigration,
    switch_over: &[u8],
    x: Exchange<'_>,
) -> Result<(), AgentError> {
    let Exchange {
        order_id,
        progress,
        steps,
        commit,
        challenge_allowance,
    } = x;
    chan.send(switch_over).await?;
    steps.push(("SwitchOver sent", Instant::now()));
    let mut extra = challenge_allowance; // for the first answer, FinalChallenge, only
    loop {
        let msg = chan.recv_within(std::mem::take(&mut extra)).await?;
        steps.push((received_step(&msg), Instant::now()));
        if fault::ENABLED && matches!(Message::decode(&msg), Ok(Message::FinalChallenge { .. })) {
            crash_point(CrashPoint::SourceFinalChallenge);
        }
        // Not strict, this takes nothing of the TPM, so it never waits for it (`SharedTpm`).
        let ev =
            (sm.handle(&msg, &mut SharedTpm::new(&ctx.attester))).map_err(AgentError::Protocol)?;
        match ev {
            SourceEvent::Send(m) => {
                chan.send(&m).await?;
                steps.push(("FinalEvidence sent", Instant::now()));
            }
            SourceEvent::ReadyToCommit => {
                debug!("ready to commit");
                // The point of no return: durable before the destination may resume.
                // `Ready` verified (SourceMigration checked it): the gate is open, unless the
                // destination was removed from the trust store meanwhile.
                let peer = ctx.journal.lock().expect("journal lock").entry(order_id);
                if let Some(p) = peer.and_then(|e| e.peer) {
                    ctx.check_still_trusted(&p)?;
                }
                // The machine journals COMMIT, durably, and only then lets `Commit` go.
                commit.with_evidence(sm.evidence());
                commit.feed(ctx, Input::Ready, "");
                expect(commit.next(ctx)?, Output::Send(Signal::Commit))?;
                steps.push(("COMMIT journalled", Instant::now()));
                crash_point(CrashPoint::SourceAfterCommit);
                if fault::lose_commit() {
                    return Err(AgentError::Migration("fault injection: session lost after COMMIT was journalled, before Commit was sent".into()));
                }
                if fault::settle_before_commit() {
                    crate::driver::settle::ask_about(ctx, order_id).await;
                }
                let c = sm.commit().map_err(AgentError::Protocol)?;
                chan.send(&c).await?;
                steps.push(("Commit sent", Instant::now()));
                let _ = progress.send(Progress::Committed).await;
            }
            SourceEvent::Resumed => {
                debug!("destination resumed");
                return Ok(());
            }
        }
    }
}

/// Book-keeping after a source-side run: `status` history, and for a failure one log line
/// saying where the VM is (`vm_state`).
fn note_source_result(
    ctx: &Ctx,
    id: &OrderId,
    vm: &str,
    result: Result<&crate::control::Summary, (&AgentError, &Whereabouts)>,
) {
    let order = trustmig_protocol::order::hex(id);
    match result {
        Ok(summary) => ctx.remember(history_entry("source", Some(summary), None, &order, vm)),
        Err((e, vm_state)) => {
            tracing::warn!(order = %order, "migration of {vm} failed: {e}; {vm_state}");
            ctx.remember(history_entry(
                "source",
                None,
                Some(&format!("{e}; {vm_state}")),
                &order,
                vm,
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the operator reads of each outcome (the system tests check these words end to end).
    #[test]
    fn whereabouts_say_where_the_vm_is() {
        let back = |settled| Whereabouts::GivenBack {
            settled,
            how: "rolled back: the VM keeps running on the source".into(),
        };
        assert_eq!(
            Whereabouts::Untouched.to_string(),
            "untouched: the migration never started"
        );
        assert_eq!(
            back(false).to_string(),
            "rolled back: the VM keeps running on the source"
        );
        let settled = back(true).to_string();
        assert!(settled.starts_with("settled: the destination never committed; rolled back"));
        assert!(Whereabouts::Moved
            .to_string()
            .starts_with("moved: the destination confirmed it committed"));
        let doubt = Whereabouts::InDoubt("unreachable".into()).to_string();
        assert!(doubt.contains("in doubt") && doubt.contains("asks the destination again"));
        assert!(doubt.contains("unreachable"));
    }
}
