//! A QEMU VM after a restart of its agent: what the journal allows (`crate::reconcile`), done
//! to what QEMU actually holds, asked over QMP; again at the operator's `trustmig reconcile`
//! once they saw to what a start left to them. spec: spec/qemu.md §4, SPEC.md §8.8

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{info, warn};
use trustmig_protocol::order::Role;

use crate::ctx::Ctx;
use crate::driver::reconcile::Action;
use crate::error::AgentError;
use crate::journal::Journal;
use trustmig_qemu::qmp::{MigrationInfo, MigrationStatus, Qmp, StatusInfo};

use super::giveback::{given_back, Was};
use super::qemu_vm;

/// Connection attempts before a VM's reconciliation is left to the operator (with the
/// give-back's pauses, about a minute).
const CONNECT_TRIES: u32 = 10;

/// Whether a source QEMU may hold a guest its migration stopped: done sending
/// (`postmigrate`, or on its way there), or stopped while one is still under way (the give-back
/// tells a stop of someone else's from it once the migration is cancelled).
fn stopped_by_migration(st: &StatusInfo, m: &MigrationInfo) -> bool {
    super::stopped_by_migration(&st.status) || (!st.running && m.in_progress())
}

/// Whether a destination QEMU holds (or waits for) an incoming migration and never ran it:
/// waiting (`inmigrate`: it may hold the order's disks and NBD server before it was fed), or
/// stopped after loading (paused by `-S`), never one that sent a VM away. Once discarded, the
/// order says so (`Journal::mark_discarded`), so a later restart quits no fresh QEMU for it.
fn holds_incoming(st: &StatusInfo, m: &MigrationInfo) -> bool {
    st.status == "inmigrate"
        || (!st.running && st.status != "postmigrate" && m.status() != MigrationStatus::None)
}

/// Whether a destination QEMU holds a VM it received and never ran: stopped once its incoming
/// migration completed. Never one that sent a VM away (`postmigrate`, its migration completed
/// too): a destination order's reconciliation runs only what arrived, whatever the journal
/// says. (The model checker lets a mistaken reading of the journal `cont` such a source copy,
/// and finds two copies; the agent's reading is checked there, and this refuses it as well.)
fn received_and_stopped(st: &StatusInfo, m: &MigrationInfo) -> bool {
    !st.running && st.status != "postmigrate" && m.status() == MigrationStatus::Completed
}

/// Whether the action decided for `r.vm` still holds: the journal's record of its current
/// order here (`Journal::last_order_of`) is still the one it was decided on (not a newer
/// order, nor the same order moved on: DONE written by another reconciliation meanwhile, say),
/// and no copy of it is arriving. A reconciliation waits for QEMU for up to a minute, and asks
/// once it holds QEMU's one QMP connection.
#[derive(Debug, PartialEq)]
enum Still {
    Holds,
    Changed,
    Arriving,
}

fn still_the_vms(ctx: &Ctx, r: &Reconcile) -> Still {
    let arriving = ctx.arriving.contains(&r.vm);
    Still::of(&ctx.journal.lock().expect("journal lock"), arriving, r)
}

impl Still {
    /// Against `journal` now, a copy of the VM `arriving` or not.
    fn of(journal: &Journal, arriving: bool, r: &Reconcile) -> Self {
        let now = journal
            .last_order_of(&r.vm)
            .map(|l| (l.order_id.as_str(), l.entry()));
        if now != r.order.as_deref().zip(r.entry) {
            Self::Changed
        } else if arriving {
            Self::Arriving
        } else {
            Self::Holds
        }
    }
}

/// What a reconciliation came to.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The journal's action is carried out, or found done already: the journal says so (a
    /// resumed VM's order DONE, a discarded QEMU's order no longer holding one).
    Done(String),
    /// Nothing for the journal: nothing to do, the journal moved on since the action was
    /// decided (a newer order, another reconciliation), a give-back.
    Unchanged(String),
    /// Left to the operator: the journal stays as it is, so the next start tries again.
    Left(String),
    /// Given back, its `cont` refused for now and retried in the background: the journal stays
    /// as it is; `status` follows the retries ("rolled back, not yet running", then what they
    /// came to), not this reconciliation.
    Retrying(String),
}

/// QMP of the VM's QEMU: it may be starting, or its one QMP slot taken for a moment, so it is
/// tried for about a minute. Otherwise what that means for `action`.
async fn connect(ctx: &Ctx, (vm, qmp_path): (&str, &Path), action: Action) -> Result<Qmp, Outcome> {
    let mut pauses = super::giveback::RETRY;
    let mut tries = 0;
    loop {
        match Qmp::connect(qmp_path, ctx.step_timeout()).await {
            Ok(q) => return Ok(q),
            Err(e) if tries < CONNECT_TRIES && super::giveback::refusal_clears(&e) => {
                tries += 1;
                tokio::time::sleep(pauses.next_pause()).await;
            }
            // What was to be discarded is gone already (QEMU 7.2 exits when a load fails).
            Err(e) if action == Action::Discard && e.qemu_gone() => {
                return Err(Outcome::Done("the destination QEMU left from a migration that never committed here is gone: nothing to discard".into()))
            }
            Err(e) => {
                return Err(Outcome::Left(format!(
                    "QEMU is not reachable ({e}): once it is, run `{}`", ctx.home.command(&["reconcile", vm])
                )))
            }
        }
    }
}

/// Do `action` to the QEMU of `vm` at `qmp_path`. `paused`: a VM committed here is handed over
/// paused (it was paused at its source), not run.
async fn reconcile(ctx: &Arc<Ctx>, r: &Reconcile) -> Outcome {
    use Outcome::{Done, Left, Unchanged};
    let (vm, qmp_path, action, paused) = (r.vm.as_str(), r.qmp.as_path(), r.action, r.paused);
    if action == Action::Nothing {
        return Unchanged("nothing to do".into());
    }
    // The action still holds once QMP is ours: nothing can feed an arrival or claim the VM
    // as a source while this holds QEMU's one QMP connection. While a copy arrives, QMP is the
    // arrival's: wait for it to end (it is fed, and its order becomes the VM's, or it fails;
    // its own timeouts end it), then look again.
    let mut qmp = loop {
        if ctx.arriving.contains(vm) {
            info!(vm, "a copy of the VM is arriving: reconciling once it has");
            while ctx.arriving.contains(vm) {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
        let qmp = match connect(ctx, (vm, qmp_path), action).await {
            Ok(q) => q,
            Err(outcome) => return outcome,
        };
        match still_the_vms(ctx, r) {
            Still::Holds => break qmp,
            Still::Changed => {
                return Unchanged(
                    "the journal moved on since this reconciliation was decided (a newer order, or another reconciliation): nothing to do".into(),
                )
            }
            // It began while QMP was being reached.
            Still::Arriving => drop(qmp),
        }
    };
    let seen = async {
        let st = qmp.query_status().await?;
        let m = qmp.query_migrate().await?;
        Ok::<_, trustmig_qemu::qmp::QmpError>((st, m))
    };
    let (st, m) = match seen.await {
        Ok(x) => x,
        Err(e) => {
            return Left(format!(
                "QEMU did not answer ({e}): once it does, run `{}`",
                ctx.home.command(&["reconcile", vm])
            ))
        }
    };
    match action {
        Action::GiveBack { paused_before } if stopped_by_migration(&st, &m) => {
            let back = given_back(ctx, vm, &mut qmp, Was::journalled(paused_before)).await;
            if back.retrying {
                Outcome::Retrying(back.how)
            } else if back.pending {
                Left(back.how)
            } else {
                Unchanged(back.how)
            }
        }
        Action::Discard if holds_incoming(&st, &m) => match qmp.quit_and_wait(ctx.step_timeout()).await {
            Ok(()) => Done("the destination QEMU left from a migration that never committed here was discarded (quit); it never ran here".into()),
            Err(e) => Left(format!("the destination QEMU left from a migration that never committed here could not be discarded ({e}): quit it by hand, never `cont` it, then run `{}` before starting another QEMU for this VM here (until then each start quits a QEMU waiting for it)", ctx.home.command(&["reconcile", vm]))),
        },
        // Not this order's copy (a fresh QEMU an operator started since, say): none to discard.
        Action::Discard => Done(format!(
            "QEMU is in state {:?}: it holds nothing of this order's to discard",
            st.status
        )),
        Action::Resume if paused && received_and_stopped(&st, &m) => Done(
            "committed here: the VM is this host's, handed over paused as it was at its source".into(),
        ),
        Action::Resume if received_and_stopped(&st, &m) => match qmp.cont().await {
            Ok(()) => Done("committed here: the VM runs on this host (cont)".into()),
            Err(e) => Left(format!("committed here, but `cont` failed ({e}): the VM is this host's; once QEMU can run it, run `{}` again", ctx.home.command(&["reconcile", vm]))),
        },
        Action::Resume if st.running => Done("committed here and running".into()),
        Action::Resume if st.status == "postmigrate" => Left(
            format!("committed here, but this QEMU sent the VM away since (postmigrate): not resumed, left as the journal says; check where the VM runs, then run `{}`", ctx.home.command(&["reconcile", vm])),
        ),
        Action::Resume => Left(format!(
            "committed here, but QEMU is in state {:?} (migration {}): the VM may be lost; check it by hand, then run `{}`",
            st.status,
            m.status(),
            ctx.home.command(&["reconcile", vm])
        )),
        _ => Unchanged(format!("QEMU is in state {:?}: nothing to do", st.status)),
    }
}

/// One QEMU VM to bring in line with its journal.
pub(crate) struct Reconcile {
    /// The VM.
    pub vm: String,
    /// Its QMP socket.
    pub qmp: PathBuf,
    /// What the journal allows.
    pub action: Action,
    /// The VM's current order here (hex), if any (`Journal::last_order_of`).
    pub order: Option<String>,
    /// That order's latest record, as the action was decided on it.
    pub entry: Option<trustmig_protocol::settlement::Entry>,
    /// That order handed the VM over paused here (it was paused at its source).
    pub paused: bool,
}

impl Reconcile {
    /// What `journal` allows after a restart for `vm`, whose QMP socket is `qmp`
    /// (`driver/reconcile.rs`).
    pub(crate) fn of(journal: &Journal, vm: String, qmp: PathBuf) -> Self {
        Self::by(crate::driver::reconcile::action, journal, vm, qmp)
    }

    /// What `journal` allows at the operator's request, while no order brings or sends `vm`
    /// (`driver/reconcile.rs`).
    fn on_request(journal: &Journal, vm: String, qmp: PathBuf) -> Self {
        Self::by(crate::driver::reconcile::on_request, journal, vm, qmp)
    }

    fn by(
        rule: fn(trustmig_protocol::settlement::Rules, Option<&crate::journal::Record>) -> Action,
        journal: &Journal,
        vm: String,
        qmp: PathBuf,
    ) -> Self {
        let last = journal.last_order_of(&vm);
        let action = rule(journal.rules(), last);
        let order = last.map(|r| r.order_id.clone());
        let paused = last.is_some_and(|r| r.role == Role::Destination && r.paused_before);
        Self {
            vm,
            qmp,
            action,
            order,
            entry: last.map(crate::journal::Record::entry),
            paused,
        }
    }
}

/// Reconcile every QEMU VM of this agent in the background, each as the journal allows.
pub(crate) fn reconcile_all(ctx: &Arc<Ctx>, list: Vec<Reconcile>) {
    for r in list {
        if r.action == Action::Nothing {
            continue;
        }
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let (vm, action) = (r.vm.as_str(), r.action);
            match reconcile_one(&ctx, &r).await {
                Outcome::Done(how) | Outcome::Unchanged(how) => {
                    info!(vm, ?action, "after restart: {how}")
                }
                Outcome::Left(how) | Outcome::Retrying(how) => {
                    warn!(vm, ?action, "after restart: {how}")
                }
            }
        });
    }
}

/// Reconcile one VM (one reconciliation per VM at a time) and journal what was done: a VM
/// resumed here because a restart settled its order as committed here gets DONE once it runs
/// (or was left paused, handed over so), so that no later restart resumes it again and it may
/// be sent on; a discarded copy's order no longer holds a QEMU (SPEC.md §8.8).
async fn reconcile_one(ctx: &Arc<Ctx>, r: &Reconcile) -> Outcome {
    // Busy, and the entry checked, under `Ctx::claims`: a reload's in-use check sees the
    // reconciliation, or its swap came first and is seen here.
    let claims = ctx.claims.read().await;
    let Ok(_one) = ctx.reconciling.begin(&r.vm) else {
        return Outcome::Left(
            "another reconciliation of it is under way (the agent's log says what it did)".into(),
        );
    };
    if qemu_vm(&ctx.config(), &r.vm).as_ref() != Some(&r.qmp) {
        return Outcome::Left(
            format!("its entry in the configuration changed (a reload) as the reconciliation began: run `{}` again", ctx.home.command(&["reconcile", &r.vm])),
        );
    }
    drop(claims);
    let outcome = match reconcile(ctx, r).await {
        Outcome::Done(how) => match journal_done(ctx, r) {
            Ok(()) => Outcome::Done(how),
            Err(why) => Outcome::Left(format!("{how}; but {why}")),
        },
        other => other,
    };
    // What `status` shows: left to the operator until a reconciliation gets through; a
    // give-back retried in the background keeps its own entries (read from the outcome, not
    // from `resuming`, which the retries may already have left).
    match &outcome {
        Outcome::Left(how) => ctx.leave_to_operator(&r.vm, r.order.clone(), how.clone()),
        Outcome::Retrying(_) => {}
        Outcome::Done(_) | Outcome::Unchanged(_) => {
            ctx.left_to_operator
                .lock()
                .expect("left lock")
                .remove(&r.vm);
        }
    }
    outcome
}

/// Journal what a reconciliation did (`reconcile_one`).
fn journal_done(ctx: &Ctx, r: &Reconcile) -> Result<(), String> {
    let Some(id) = (r.order.as_deref()).and_then(|o| ::hex::decode(o).ok()?.try_into().ok()) else {
        return Ok(());
    };
    let mut journal = ctx.journal.lock().expect("journal lock");
    let vm = &r.vm;
    match r.action {
        Action::Resume => journal.resumed_after_session(&id, "resumed here after its session ended").map_err(|e| {
            format!("DONE could not be journalled ({e}): no order may send the VM from here until it is; once the journal's disk is writable again, run `{}` (or restart the agent)", ctx.home.command(&["reconcile", vm]))
        }),
        Action::Discard => journal.mark_discarded(&id).map_err(|e| {
            format!("the journal could not say its QEMU is gone ({e}): until it does, every start quits a QEMU waiting for this VM and no order may send it from here; once the journal's disk is writable again, run `{}` (or restart the agent)", ctx.home.command(&["reconcile", vm]))
        }),
        _ => Ok(()),
    }
}

/// The operator's `trustmig reconcile VM`: a start's reconciliation, run again for one QEMU
/// VM, once the operator has seen to what a start left to them (QEMU unreachable; a copy to be
/// quit; a VM committed here to `cont`, or to leave paused as it was handed over; a VM to give
/// back), or to a VM committed here whose session's `cont` failed (`Rules::vm_on_request`).
/// Also refused while the VM's give-back is retried in the background.
/// Without it a VM whose copy here the journal does not let go (`Rules::holds_vm`: a copy
/// still to be discarded, or one committed here and not yet resumed) stays unsendable until
/// the agent's next start. Refused while an order brings or sends the VM: its session, or its
/// settlement, decides (the model checker runs this at any moment, SPEC.md §8.9, and finds
/// nothing even without that refusal, which keeps this from contending with a session for
/// QEMU's one QMP connection).
/// Returns what was done; what is still left to the operator is an error that says so.
/// spec: SPEC.md §8.8
pub(crate) async fn by_operator(ctx: &Arc<Ctx>, vm: &str) -> Result<String, AgentError> {
    let config = ctx.config();
    let Some(v) = config.vm(vm) else {
        return Err(AgentError::Usage(format!(
            "no VM named {vm:?} is configured here"
        )));
    };
    let Some(q) = v.qemu() else {
        return Err(AgentError::Usage(format!(
            "VM {vm:?} is a synthetic guest: it starts from the journal alone, and has no hypervisor to reconcile"
        )));
    };
    if ctx.arriving.contains(vm) {
        return Err(AgentError::Usage(format!(
            "VM {vm:?} is arriving here: its session decides what becomes of it"
        )));
    }
    // Its give-back is tried again in the background until QEMU runs it (`status` says why
    // not yet): a second one here would only race it.
    if let Some(why) = ctx.resuming.lock().expect("resuming lock").cause(vm) {
        return Err(AgentError::Usage(format!(
            "VM {vm:?} is being given back in the background (not yet running: {why}); it runs once QEMU lets it"
        )));
    }
    let (r, held) = {
        let journal = ctx.journal.lock().expect("journal lock");
        if journal.leaving(vm) {
            return Err(AgentError::Usage(format!(
                "VM {vm:?} is migrating from this host, or in doubt after a migration: its session or its settlement decides (`{}`)", ctx.home.command(&["status"])
            )));
        }
        let r = Reconcile::on_request(&journal, vm.to_string(), q.qmp.clone());
        (r, journal.holds_vm(vm))
    };
    match (r.action, held) {
        (Action::Nothing, Ok(())) => {
            ctx.left_to_operator.lock().expect("left lock").remove(vm);
            return Ok(format!(
                "nothing to reconcile: the journal lets this host's copy of VM {vm:?} be sent (it never migrated, arrived and ran, or was sent away)"
            ))
        }
        // An arrival that ended without journalling its end (its record still at the claim):
        // only a start settles that.
        (Action::Nothing, Err(_)) => {
            return Err(AgentError::Usage(format!(
                "the journal's record of order {} leaves nothing to reconcile now: restart the agent, whose start settles it",
                r.order.as_deref().unwrap_or("?")
            )))
        }
        _ => {}
    }
    let action = r.action;
    match reconcile_one(ctx, &r).await {
        Outcome::Done(how) | Outcome::Unchanged(how) => {
            info!(vm, ?action, "reconciled at the operator's request: {how}");
            Ok(how)
        }
        Outcome::Left(how) | Outcome::Retrying(how) => {
            warn!(vm, ?action, "reconciled at the operator's request: {how}");
            Err(AgentError::Usage(format!("not reconciled: {how}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{journal, record};
    use super::*;

    fn seen(running: bool, status: &str, migration: &str) -> (StatusInfo, MigrationInfo) {
        let st = StatusInfo {
            running,
            status: status.into(),
        };
        let m = serde_json::from_value(serde_json::json!({ "status": migration }))
            .expect("migration info");
        (st, m)
    }

    /// An action holds only while the record it was decided on is the VM's latest: the same
    /// order moved on (DONE written by another reconciliation meanwhile) is a change too, not
    /// only a newer order; a copy arriving waits.
    #[test]
    fn an_action_holds_only_on_the_record_it_was_decided_on() {
        let tmp = tempfile::tempdir().expect("tmp");
        let mut j = journal(tmp.path(), &[("ab", "destination", "settled")]);
        let r = Reconcile::of(&j, "q".into(), "/run/q.qmp".into());
        assert_eq!(r.action, Action::Resume);
        assert_eq!(Still::of(&j, false, &r), Still::Holds);
        assert_eq!(Still::of(&j, true, &r), Still::Arriving);
        j.append(record("ab", "destination", "done"))
            .expect("append");
        assert_eq!(
            Still::of(&j, false, &r),
            Still::Changed,
            "the same order, moved on"
        );
        let other = tempfile::tempdir().expect("tmp");
        let newer = journal(
            other.path(),
            &[
                ("ab", "destination", "settled"),
                ("cd", "source", "claimed"),
            ],
        );
        assert_eq!(
            Still::of(&newer, false, &r),
            Still::Changed,
            "a newer order"
        );
        // No order then, one now.
        let empty = tempfile::tempdir().expect("tmp");
        let none = Reconcile::of(&journal(empty.path(), &[]), "q".into(), "/q".into());
        assert_eq!(none.action, Action::Nothing);
        assert_eq!(Still::of(&newer, false, &none), Still::Changed);
    }

    /// Only a destination's loaded, never-run QEMU is resumed: a source that sent the VM away
    /// reports its migration completed and is stopped too, and must stay so.
    #[test]
    fn only_what_arrived_is_resumed() {
        let cases = [
            (false, "paused", "completed", true),
            (false, "postmigrate", "completed", false),
            (true, "running", "completed", false),
            (false, "paused", "none", false),
            (false, "inmigrate", "active", false),
        ];
        for (running, status, migration, want) in cases {
            let (st, m) = seen(running, status, migration);
            assert_eq!(received_and_stopped(&st, &m), want, "{status} {migration}");
        }
    }
}
