//! Giving a QEMU VM back to its source host after a migration that did not commit: cancel what
//! is left of QEMU's migration, then `cont` (unless the VM was paused before, at the
//! switch-over, or by someone else during the migration). QEMU may refuse that `cont` for a
//! while: a destination QEMU that loaded the stream without `late-block-activate` holds the
//! shared image's write lock until it is discarded. Such a refusal clears, so the `cont` is
//! retried with back-off in the background, the VM reported "rolled back, not yet running"
//! until it runs (or its QEMU is gone); any other refusal is reported and left to the operator
//! (`status`: "left to the operator"). Never none: a VM the journal gives back must end up
//! running, or paused where its operator paused it, or in the operator's sight.
//! spec: spec/qemu.md §4, SPEC.md §8.8

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::ctx::Ctx;
use crate::journal::Journal;
use trustmig_qemu::qmp::{Qmp, QmpError};

/// Pauses before a refused `cont` is tried again: from 250 ms doubling to 10 s. A destination
/// agent that restarts and discards its QEMU frees the image within seconds, and the source VM
/// should run again soon after.
pub(crate) const RETRY: Backoff = Backoff::new(Duration::from_millis(250), RETRY_MAX);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// How long a retry waits for a cancelled migration to leave QEMU's active states.
const RETRY_CANCEL_WAIT: Duration = Duration::from_secs(1);

/// Tries in a row on which no QEMU listens before a give-back's retries stop (with [`RETRY`],
/// one to two minutes).
const GONE_TRIES: u32 = 10;

/// VMs whose give-back is retried in the background (`Ctx::resuming`), with the order given
/// back and why the VM is not running yet. Keyed by VM, one entry each: a retry ending or
/// noting a cause touches the entry only while it is its own order's, so a give-back of an
/// older order that ends late does not remove a newer one's entry (`status` would stop saying
/// "rolled back, not yet running", and an operator's reconcile would race its retries).
#[derive(Debug, Default)]
pub struct Retries(HashMap<String, (Option<String>, String)>);

impl Retries {
    /// The retries of `order`'s give-back of `vm` begin, refused for `cause`: they speak for
    /// the VM from now on.
    fn begin(&mut self, vm: &str, order: &Option<String>, cause: String) {
        self.0.insert(vm.to_string(), (order.clone(), cause));
    }

    /// Why the retries of `order`'s give-back of `vm` are refused now, while the entry is
    /// theirs.
    fn note(&mut self, vm: &str, order: &Option<String>, cause: &str) {
        if let Some((_, c)) = self.0.get_mut(vm).filter(|(o, _)| o == order) {
            *c = cause.to_string();
        }
    }

    /// The retries of `order`'s give-back of `vm` ended: their entry goes, not another's.
    fn end(&mut self, vm: &str, order: &Option<String>) {
        if self.0.get(vm).is_some_and(|(o, _)| o == order) {
            self.0.remove(vm);
        }
    }

    /// The VM is settled here (it runs, or stays paused or stopped as it was): whatever
    /// retries there were no longer speak for it.
    fn settled(&mut self, vm: &str) {
        self.0.remove(vm);
    }

    /// Why `vm`'s give-back is not running yet, if it is retried.
    pub fn cause(&self, vm: &str) -> Option<&str> {
        self.0.get(vm).map(|(_, cause)| cause.as_str())
    }

    /// How many VMs' give-backs are retried.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What the guest was, for its give-back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Was {
    /// Running (as far as this agent knows): run it again if the migration stopped it.
    Running,
    /// Paused at the claim, or handed over paused (the journal says so): it stays paused.
    Paused,
    /// Stopped by someone else during the migration, and not run again (the source saw it in
    /// QEMU's events): it stays so, whatever QEMU's runstate now.
    StoppedMeanwhile,
}

impl Was {
    /// From the journal's `paused_before` (a settlement, a restart: the live events are gone).
    pub(crate) fn journalled(paused: bool) -> Self {
        if paused {
            Self::Paused
        } else {
            Self::Running
        }
    }
}

/// What one attempt to give the VM back achieved.
#[derive(Debug)]
pub(crate) enum Attempt {
    /// The VM runs on the source (how, for the operator).
    Running(&'static str),
    /// The VM was paused before the migration, or at its switch-over, and stays paused
    /// (spec/qemu.md §4).
    PausedAsBefore,
    /// Someone else stopped the VM during the migration (its runstate, named, is none of the
    /// migration's: `super::stopped_by_migration`): it stays so, as QEMU's own rollback
    /// leaves it.
    StoppedMeanwhile(String),
    /// QEMU refused `cont` for a reason that clears by itself (an image lock): try again.
    Refused(QmpError),
    /// QEMU's migration has not ended yet after `migrate_cancel` (why, with its status): a
    /// `cont` now would be refused or undone; try again, as for a refusal that clears.
    StillMigrating(String),
    /// QEMU refused for good, or answered what makes no sense: the operator must look.
    Failed(String),
    /// QEMU is gone (it exited, or was killed, during the migration or after): the VM runs
    /// nowhere, since nothing committed elsewhere.
    Gone(QmpError),
}

/// Whether QEMU's refusal of `cont` clears by itself: an image lock held by another process
/// (a destination QEMU being discarded). QEMU 7.2 says `Failed to get "write" lock` or
/// `Failed to get shared "write" lock`.
pub(crate) fn refusal_clears(e: &QmpError) -> bool {
    match e {
        QmpError::Qemu { desc, .. } => desc.contains("Failed to get") && desc.contains("lock"),
        // The socket was busy or slow: a later connection may do.
        QmpError::Timeout { .. } | QmpError::Connect { .. } => true,
        _ => false,
    }
}

/// Cancel QEMU's migration (if one is left) and wait for it to leave the active states: QEMU
/// restarts a guest it stopped on its own when a migration it still runs is cancelled.
/// `Ok(Some(why))`: QEMU's migration is still under way after `timeout` (with QEMU's refusal
/// of the cancel, if it refused): nothing else may be asked of it.
async fn cancel_migration(qmp: &mut Qmp, timeout: Duration) -> Result<Option<String>, QmpError> {
    // Refused when no migration is left (QEMU 7.2 answers `migrate_cancel` then too, but a
    // refusal is kept for the report below, should the migration go on).
    let refused = qmp.migrate_cancel().await.err();
    let deadline = Instant::now() + timeout;
    loop {
        let m = qmp.query_migrate().await?;
        if !m.in_progress() {
            return Ok(None);
        }
        if Instant::now() >= deadline {
            let refusal = refused.map(|e| format!(" ({e})")).unwrap_or_default();
            return Ok(Some(format!(
                "QEMU's migration is still {} {} s after `migrate_cancel`{refusal}",
                m.status(),
                timeout.as_secs_f32()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One attempt: cancel, then `cont` if the guest ran and is stopped by the migration. A guest
/// someone else stopped meanwhile (seen so, or QEMU's runstate none of the migration's:
/// `paused`, say) is theirs to run: `cont` would undo an operator's `stop` (spec/qemu.md §4).
pub(crate) async fn attempt(qmp: &mut Qmp, was: Was, timeout: Duration) -> Attempt {
    // A QEMU that did not answer in time (busy, or stuck in a write the pumps no longer
    // drain) is asked again in the background, as a refusal that clears by itself is.
    let unanswered = |e: QmpError| {
        if e.qemu_gone() {
            Attempt::Gone(e)
        } else if refusal_clears(&e) {
            Attempt::Refused(e)
        } else {
            Attempt::Failed(format!("the source QEMU: {e}"))
        }
    };
    match cancel_migration(qmp, timeout).await {
        Ok(None) => {}
        Ok(Some(why)) => return Attempt::StillMigrating(why),
        Err(e) => return unanswered(e),
    }
    match qmp.query_status().await {
        // QEMU's cancel runs a guest that ran when it completed, whatever this agent thought.
        Ok(s) if s.running => Attempt::Running("the VM keeps running on the source"),
        Ok(_) if was == Was::Paused => Attempt::PausedAsBefore,
        Ok(s) if was == Was::StoppedMeanwhile || !super::stopped_by_migration(&s.status) => {
            Attempt::StoppedMeanwhile(s.status)
        }
        Ok(_) => match qmp.cont().await {
            Ok(()) => Attempt::Running("the VM runs again on the source (cont)"),
            Err(e) if e.qemu_gone() => Attempt::Gone(e),
            Err(e) if refusal_clears(&e) => Attempt::Refused(e),
            Err(e) => Attempt::Failed(format!("`cont` on the source failed: {e}")),
        },
        Err(e) => unanswered(e),
    }
}

/// Where a give-back left the VM.
pub(crate) struct GivenBack {
    /// For the operator.
    pub how: String,
    /// Not settled yet: `cont` failed for good (the operator's to do), or QEMU refused it for
    /// now and it is retried in the background.
    pub pending: bool,
    /// The latter: retried in the background ([`keep_trying`]).
    pub retrying: bool,
}

/// Give the VM `vm` (its QEMU on `qmp`) back after a rollback: one attempt now, and when QEMU's
/// refusal clears by itself, more in the background ([`keep_trying`]). Returns where the VM
/// stands, for the operator.
pub(crate) async fn give_back(ctx: &Arc<Ctx>, vm: &str, qmp: &mut Qmp, was: Was) -> String {
    given_back(ctx, vm, qmp, was).await.how
}

/// [`give_back`], saying whether the VM's fate is still pending.
pub(crate) async fn given_back(ctx: &Arc<Ctx>, vm: &str, qmp: &mut Qmp, was: Was) -> GivenBack {
    let done = |how: String| GivenBack {
        how,
        pending: false,
        retrying: false,
    };
    crate::fault::hold(crate::fault::Hold::BeforeGiveBack).await;
    let attempt = attempt(qmp, was, ctx.step_timeout()).await;
    // Settled here, one way or the other: no earlier give-back's retries or entry speaks for
    // the VM any more (a refusal that clears starts its own retries below).
    if !matches!(attempt, Attempt::Refused(_) | Attempt::StillMigrating(_)) {
        ctx.resuming.lock().expect("resuming lock").settled(vm);
        ctx.left_to_operator.lock().expect("left lock").remove(vm);
    }
    match attempt {
        Attempt::Running(how) => done(format!("rolled back: {how}")),
        Attempt::PausedAsBefore => {
            done("rolled back: the VM stays on the source, paused as it was".into())
        }
        Attempt::StoppedMeanwhile(state) => done(format!(
            "rolled back: the VM stays on the source, stopped (QEMU {state:?}): it was stopped during the migration, not by it; its operator runs it with `cont`"
        )),
        Attempt::Failed(why) => left(
            ctx,
            vm,
            format!("rollback failed: {why}; the VM is stopped on the source: see to QEMU, then run `{}` (it gives the VM back as the journal says)", ctx.home.command(&["reconcile", vm])),
        ),
        Attempt::Gone(e) => left(
            ctx,
            vm,
            format!("rollback failed: the source QEMU is gone ({e}); the VM runs nowhere: start it again by hand from its images here, then run `{}`", ctx.home.command(&["reconcile", vm])),
        ),
        Attempt::Refused(e) => retrying(ctx, vm, qmp, e.to_string(), was),
        Attempt::StillMigrating(why) => retrying(ctx, vm, qmp, why, was),
    }
}

/// A give-back QEMU refused for now (`cause`): tried again in the background until the VM runs,
/// or stays paused or stopped as it `was` ([`keep_trying`]).
fn retrying(ctx: &Arc<Ctx>, vm: &str, qmp: &Qmp, cause: String, was: Was) -> GivenBack {
    keep_trying(
        ctx.clone(),
        vm.to_string(),
        qmp.path().to_path_buf(),
        cause.clone(),
        was,
    );
    GivenBack {
        how: format!(
            "rolled back, not yet running: {cause}; trying again (every {} s at most) until it runs, or its QEMU is gone",
            RETRY_MAX.as_secs()
        ),
        pending: true,
        retrying: true,
    }
}

/// A give-back that failed for good: the VM is the operator's (`status`: "left to the
/// operator", with `how`), under the order it was given back by.
fn left(ctx: &Arc<Ctx>, vm: &str, how: String) -> GivenBack {
    let order = (ctx.journal.lock().expect("journal lock"))
        .last_order_of(vm)
        .map(|r| r.order_id.clone());
    ctx.leave_to_operator(vm, order, how.clone());
    GivenBack {
        how,
        pending: true,
        retrying: false,
    }
}

/// Run the VM `vm` again after a settlement gave it back (the destination never committed):
/// `cont` unless the journal says it was paused (at the claim or the switch-over).
pub(crate) async fn resume_given_back(
    ctx: &Arc<Ctx>,
    vm: &str,
    qmp_path: &Path,
    paused_before: bool,
) -> String {
    match Qmp::connect(qmp_path, ctx.step_timeout()).await {
        Ok(mut qmp) => give_back(ctx, vm, &mut qmp, Was::journalled(paused_before)).await,
        Err(e) if e.qemu_gone() => {
            left(ctx, vm, format!("rollback failed: the source QEMU is gone ({e}); the VM runs nowhere: start it again by hand from its images here, then run `{}`", ctx.home.command(&["reconcile", vm]))).how
        }
        Err(e) => {
            left(ctx, vm, format!("rolled back, but QEMU is not reachable ({e}): the VM is stopped on the source; once QEMU answers, run `{}`", ctx.home.command(&["reconcile", vm]))).how
        }
    }
}

/// Retry `cont` on the QEMU at `qmp_path` in the background until the VM runs, while the
/// refusal is one that clears and the journal still gives the VM to this host. `status` shows
/// the VM as "rolled back, not yet running" meanwhile (`Ctx::resuming`); if the retries stop
/// without the VM running, as "left to the operator" with why, while the order given back is
/// still the VM's here.
fn keep_trying(ctx: Arc<Ctx>, vm: String, qmp_path: PathBuf, cause: String, was: Was) {
    warn!(vm, "rolled back, not yet running: {cause}; trying again");
    // The order given back: the VM's current one now.
    let order = (ctx.journal.lock().expect("journal lock"))
        .last_order_of(&vm)
        .map(|r| r.order_id.clone());
    (ctx.resuming.lock().expect("resuming lock")).begin(&vm, &order, cause);
    tokio::spawn(async move {
        // Asked before each try: the journal still gives the VM here under the order given
        // back (a newer order that took it, even one that gave it back in turn, decides).
        let still_ours =
            || left_after_retries(&ctx.journal.lock().expect("journal lock"), &vm, &order);
        let note = |cause: &str| {
            (ctx.resuming.lock().expect("resuming lock")).note(&vm, &order, cause);
        };
        let r =
            cont_until_running(&qmp_path, ctx.step_timeout(), RETRY, was, &still_ours, note).await;
        // What `status` shows after: only while the order given back is still the VM's (a
        // newer order's give-back has its own).
        match &r {
            Ok(how) => info!(vm, "rolled back: {how}"),
            Err(why) => warn!(vm, "rolled back, not running: {why}"),
        }
        if still_ours() {
            // The journal still shows the order under way: it could not record the rollback,
            // and what `leave_unjournalled` left to the operator (only a restart settles the
            // order) stays, whatever the retries did. Any other entry is the give-back's own.
            let (unrecorded, before) = {
                let journal = ctx.journal.lock().expect("journal lock");
                (
                    journal.leaving(&vm),
                    ctx.left_as_journal_says(&journal, &vm),
                )
            };
            match &r {
                Ok(_) if unrecorded => {}
                Ok(_) => drop(ctx.left_to_operator.lock().expect("left lock").remove(&vm)),
                Err(why) => {
                    let mut how = format!("rolled back, not running: {why}");
                    if let Some(before) = before.filter(|_| unrecorded) {
                        how = format!("{how}; and: {before}");
                    }
                    ctx.leave_to_operator(&vm, order.clone(), how);
                }
            }
        }
        // No longer retried either way (after the entry above, so that no operator's
        // `trustmig reconcile` finds neither): `status`, `trustmig reconcile` and a reload stop
        // treating the VM as being given back. Before, one whose retries stopped stayed
        // "rolled back, not yet running" until a restart, and refused both.
        (ctx.resuming.lock().expect("resuming lock")).end(&vm, &order);
    });
}

/// Whether a VM whose give-back of order `order` stopped retrying without the VM running is
/// the operator's now: only while the journal still gives it to this host under that order (a
/// newer order that took it meanwhile, even one given back in turn, is its own business). An
/// order the journal still shows claimed is one whose rollback it could not record (a full
/// disk): its `Commit` was never sent (a COMMIT append that failed returns before it), so its
/// destination never runs the VM, and the give-back goes on as the first try did (the retries
/// stopped at once before, leaving the VM stopped). If that COMMIT append broke the journal,
/// its line may be on disk: a restart then finds the order in doubt and asks the destination.
fn left_after_retries(journal: &Journal, vm: &str, order: &Option<String>) -> bool {
    let current = journal.last_order_of(vm).map(|r| &r.order_id);
    current == order.as_ref() && !journal.in_doubt_as_source(vm) && !journal.migrated_away(vm)
}

/// The retry loop of [`keep_trying`], apart from the agent's state so it can be tested against
/// a fake QEMU: a fresh QMP connection per try (QEMU serves one client at a time, and `status`
/// must not wait on us), `pauses` between tries ([`RETRY`] in the agent). `still_ours`
/// is asked before every try; `note` hears each refusal. What the guest `was` holds in every
/// try: a guest paused before the migration, or stopped by someone during it, is never run by a
/// retry (a try whose migration had not ended yet found it stopped by the migration too).
/// Returns how the VM came to run (or was left paused or stopped as it was), or why the retries
/// stopped.
pub(crate) async fn cont_until_running(
    qmp_path: &Path,
    timeout: Duration,
    mut pauses: Backoff,
    was: Was,
    still_ours: impl Fn() -> bool,
    note: impl Fn(&str),
) -> Result<&'static str, String> {
    let mut gone = 0;
    loop {
        tokio::time::sleep(pauses.next_pause()).await;
        let mut qmp = match Qmp::connect(qmp_path, timeout).await {
            Ok(q) => q,
            // No QEMU listens (its socket gone, or refused): one restarting comes back within
            // about a minute of tries; past that it is gone. Before, these were tried for ever.
            Err(e) if e.qemu_gone() && gone + 1 >= GONE_TRIES => {
                return Err(format!("QEMU is gone ({e}); resume the VM by hand"))
            }
            Err(e) if refusal_clears(&e) => {
                gone = if e.qemu_gone() { gone + 1 } else { 0 };
                note(&format!("QEMU not reachable yet: {e}"));
                continue;
            }
            Err(e) => return Err(format!("QEMU is gone ({e}); resume the VM by hand")),
        };
        gone = 0;
        // Asked while this connection holds QEMU's one QMP slot: a migration of the VM that
        // claimed it meanwhile holds QMP for its whole run, so it cannot start after this.
        if !still_ours() {
            return Err("the journal no longer gives the VM to this host: retries stopped".into());
        }
        // A try waits only a moment for a cancelled migration to end: it holds QEMU's one QMP
        // slot meanwhile, and the next try comes soon enough.
        match attempt(&mut qmp, was, timeout.min(RETRY_CANCEL_WAIT)).await {
            Attempt::Running(how) => return Ok(how),
            Attempt::PausedAsBefore => return Ok("paused as it was: left so"),
            Attempt::StoppedMeanwhile(_) => {
                return Ok("stopped meanwhile by someone else: left so")
            }
            Attempt::Refused(e) => note(&e.to_string()),
            Attempt::StillMigrating(why) => note(&why),
            Attempt::Failed(why) => return Err(format!("{why}; resume the VM by hand")),
            Attempt::Gone(e) => return Err(format!("QEMU is gone ({e}); resume the VM by hand")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use super::super::tests::fake_qmp;

    const FAST: Backoff = Backoff::new(Duration::from_millis(1), Duration::from_millis(20));

    /// A fake QEMU that serves any number of connections: stopped in `postmigrate`, it refuses
    /// the first `refusals` `cont`s with QEMU 7.2's lock error (or `other` when set), then runs.
    fn fake_qemu(
        refusals: usize,
        other: Option<&'static str>,
    ) -> (tempfile::TempDir, PathBuf, Arc<AtomicUsize>) {
        fake_qemu_in("postmigrate", refusals, other)
    }

    /// [`fake_qemu`] stopped in the runstate `stopped`.
    fn fake_qemu_in(
        stopped: &'static str,
        refusals: usize,
        other: Option<&'static str>,
    ) -> (tempfile::TempDir, PathBuf, Arc<AtomicUsize>) {
        let conts = Arc::new(AtomicUsize::new(0));
        let seen = conts.clone();
        let running = Mutex::new(false);
        let (dir, path) = fake_qmp(move |command, _| {
            let ok = |v: serde_json::Value| serde_json::json!({ "return": v });
            Some(match command {
                "query-migrate" => ok(serde_json::json!({"status": "completed"})),
                "query-status" => {
                    let r = *running.lock().expect("lock");
                    let st = if r { "running" } else { stopped };
                    ok(serde_json::json!({"running": r, "status": st}))
                }
                "cont" if seen.fetch_add(1, Ordering::SeqCst) < refusals => {
                    let desc = other.unwrap_or("Failed to get shared \"write\" lock");
                    serde_json::json!({"error": {"class": "GenericError", "desc": desc}})
                }
                "cont" => {
                    *running.lock().expect("lock") = true;
                    ok(serde_json::json!({}))
                }
                _ => ok(serde_json::json!({})),
            })
        });
        (dir, path, conts)
    }

    /// `cont` only for a guest that ran and that the migration stopped: never for one paused
    /// before or at the switch-over, nor for one someone else stopped meanwhile, seen so or
    /// found in a runstate that is none of the migration's.
    #[tokio::test]
    async fn a_give_back_runs_only_a_guest_the_migration_stopped() {
        let cases = [
            (
                "postmigrate",
                Was::Running,
                Some("the VM runs again on the source (cont)"),
            ),
            (
                "finish-migrate",
                Was::Running,
                Some("the VM runs again on the source (cont)"),
            ),
            ("paused", Was::Running, None),
            ("io-error", Was::Running, None),
            ("postmigrate", Was::StoppedMeanwhile, None),
            ("postmigrate", Was::Paused, None),
        ];
        for (state, was, want) in cases {
            let (_d, path, conts) = fake_qemu_in(state, 0, None);
            let mut qmp = Qmp::connect(&path, Duration::from_secs(5))
                .await
                .expect("qmp");
            let got = attempt(&mut qmp, was, Duration::from_secs(5)).await;
            let ran = conts.load(Ordering::SeqCst);
            match (want, &got) {
                (Some(how), Attempt::Running(h)) => assert_eq!((*h, ran), (how, 1)),
                (None, Attempt::PausedAsBefore) => assert_eq!((was, ran), (Was::Paused, 0)),
                (None, Attempt::StoppedMeanwhile(st)) => {
                    assert_eq!((st.as_str(), ran), (state, 0), "{was:?}")
                }
                _ => panic!("{state} {was:?}: {got:?}"),
            }
        }
    }

    /// A source QEMU that exited (killed mid-migration, say) is named gone, the VM running
    /// nowhere: not "stopped on the source", which it is not, nor a QEMU that did not answer.
    /// The fake greets, accepts `qmp_capabilities`, then exits (closes its socket).
    #[tokio::test]
    async fn a_qemu_that_exited_is_named_gone() {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("qmp.sock");
        let l = tokio::net::UnixListener::bind(&path).expect("bind");
        tokio::spawn(async move {
            let (s, _) = l.accept().await.expect("accept");
            let (rd, mut wr) = s.into_split();
            wr.write_all(super::super::tests::GREETING)
                .await
                .expect("greet");
            let mut lines = BufReader::new(rd).lines();
            let req = lines.next_line().await.expect("read").expect("a line");
            let req: serde_json::Value = serde_json::from_str(&req).expect("json");
            assert_eq!(req["execute"], "qmp_capabilities");
            let reply = serde_json::json!({"return": {}, "id": req["id"]});
            wr.write_all(format!("{reply}\n").as_bytes())
                .await
                .expect("answer");
        });
        let mut qmp = Qmp::connect(&path, Duration::from_secs(5))
            .await
            .expect("qmp");
        let got = attempt(&mut qmp, Was::Running, Duration::from_secs(5)).await;
        assert!(matches!(&got, Attempt::Gone(e) if e.qemu_gone()), "{got:?}");
    }

    /// A migration QEMU does not let go of (it refuses `migrate_cancel`, and stays active) is
    /// named with its status and QEMU's refusal, and asked again later, as a refusal that
    /// clears is: before, the give-back went on to a `cont` whose failure named neither.
    #[tokio::test]
    async fn a_migration_that_outlives_its_cancel_is_named() {
        let (_dir, path) = fake_qmp(|command, _| {
            Some(match command {
                "migrate_cancel" => {
                    serde_json::json!({"error": {"class": "GenericError", "desc": "not now"}})
                }
                "query-migrate" => serde_json::json!({"return": {"status": "active"}}),
                _ => serde_json::json!({"return": {}}),
            })
        });
        let mut qmp = Qmp::connect(&path, Duration::from_secs(5))
            .await
            .expect("qmp");
        let got = attempt(&mut qmp, Was::Running, Duration::from_millis(300)).await;
        let Attempt::StillMigrating(why) = &got else {
            panic!("{got:?}");
        };
        assert!(
            why.contains("still active 0.3 s after `migrate_cancel`") && why.contains("not now"),
            "{why}"
        );
    }

    /// A QEMU that stops answering (stuck in a write, holding its big lock) is asked again in
    /// the background, not given up on as "check it by hand": its silence is a refusal (a
    /// timeout), which `cont_until_running` retries as it does any refusal
    /// (`a_refused_cont_is_retried_until_the_lock_clears`).
    #[tokio::test]
    async fn a_qemu_that_does_not_answer_is_asked_again() {
        let (_dir, path) = fake_qmp(|_, _| None);
        let mut qmp = Qmp::connect(&path, Duration::from_millis(300))
            .await
            .expect("qmp");
        let got = attempt(&mut qmp, Was::Running, Duration::from_millis(300)).await;
        assert!(
            matches!(
                got,
                Attempt::Refused(trustmig_qemu::qmp::QmpError::Timeout { .. })
            ),
            "{got:?}"
        );
    }

    /// A retry never runs a guest that was paused before the migration, or that someone stopped
    /// during it: however QEMU shows it (stopped by the migration, `postmigrate`, once a
    /// migration that outlived its cancel ended), it stays as it was. Before, every retry
    /// took the guest to have been running.
    #[tokio::test]
    async fn a_retry_keeps_a_paused_guest_paused() {
        for was in [Was::Paused, Was::StoppedMeanwhile] {
            let (_d, path, conts) = fake_qemu(0, None);
            let r =
                cont_until_running(&path, Duration::from_secs(5), FAST, was, || true, |_| {}).await;
            assert!(r.is_ok(), "{was:?}: {r:?}");
            assert_eq!(conts.load(Ordering::SeqCst), 0, "{was:?}: a cont");
        }
    }

    #[tokio::test]
    async fn a_refused_cont_is_retried_until_the_lock_clears() {
        let (_d, path, conts) = fake_qemu(3, None);
        let refusals = Mutex::new(Vec::new());
        let r = cont_until_running(
            &path,
            Duration::from_secs(5),
            FAST,
            Was::Running,
            || true,
            |c| refusals.lock().expect("lock").push(c.to_string()),
        )
        .await;
        assert_eq!(r, Ok("the VM runs again on the source (cont)"));
        assert_eq!(
            conts.load(Ordering::SeqCst),
            4,
            "three refusals, then the cont that ran"
        );
        let refusals = refusals.into_inner().expect("lock");
        assert_eq!(refusals.len(), 3);
        assert!(refusals[0].contains("write\" lock"), "{refusals:?}");
    }

    /// A QEMU that no longer listens (killed: its socket refuses, or is gone) ends the retries
    /// after `GONE_TRIES` tries in a row, saying so; before, it was tried for ever, and the VM
    /// stayed "being given back" (refusing the operator's `trustmig reconcile`) until a restart.
    #[tokio::test]
    async fn retries_stop_once_no_qemu_listens() {
        let dir = tempfile::tempdir().expect("tmp");
        let notes = AtomicUsize::new(0);
        let gone = dir.path().join("gone.qmp");
        let retries = cont_until_running(
            &gone,
            Duration::from_secs(5),
            FAST,
            Was::Running,
            || true,
            |_| {
                notes.fetch_add(1, Ordering::SeqCst);
            },
        );
        let r = tokio::time::timeout(Duration::from_secs(30), retries)
            .await
            .expect("the retries end");
        let err = r.expect_err("QEMU is gone");
        assert!(
            err.contains("QEMU is gone") && err.contains("by hand"),
            "{err}"
        );
        assert_eq!(notes.load(Ordering::SeqCst) as u32, GONE_TRIES - 1);
    }

    /// Retries that stopped leave the VM to the operator only while the journal still gives it
    /// here under the order given back.
    #[test]
    fn only_a_vm_still_given_back_is_left_to_the_operator() {
        use super::super::tests::journal;
        let ab = Some("ab".repeat(16));
        let tmp = tempfile::tempdir().expect("tmp");
        let back = journal(
            tmp.path(),
            &[("ab", "source", "claimed"), ("ab", "source", "rolled-back")],
        );
        assert!(left_after_retries(&back, "q", &ab));
        assert!(!left_after_retries(&back, "q", &Some("cd".repeat(16))));
        // A newer order took the VM since and is sending it; or the journal says it left.
        let tmp = tempfile::tempdir().expect("tmp");
        let leaving = journal(
            tmp.path(),
            &[("ab", "source", "rolled-back"), ("cd", "source", "claimed")],
        );
        assert!(!left_after_retries(&leaving, "q", &ab));
        // Its rollback unrecorded: still claimed, never committed, still the VM's here.
        let tmp = tempfile::tempdir().expect("tmp");
        let unrecorded = journal(tmp.path(), &[("ab", "source", "claimed")]);
        assert!(left_after_retries(&unrecorded, "q", &ab));
        let tmp = tempfile::tempdir().expect("tmp");
        let in_doubt = journal(tmp.path(), &[("ab", "source", "committed")]);
        assert!(!left_after_retries(&in_doubt, "q", &ab));
        let tmp = tempfile::tempdir().expect("tmp");
        let away = journal(
            tmp.path(),
            &[("ab", "source", "committed"), ("ab", "source", "done")],
        );
        assert!(!left_after_retries(&away, "q", &ab));
    }

    #[tokio::test]
    async fn a_refusal_that_does_not_clear_stops_the_retries_and_says_so() {
        let (_d, path, conts) = fake_qemu(1, Some("Resetting the Virtual Machine is required"));
        let r = cont_until_running(
            &path,
            Duration::from_secs(5),
            FAST,
            Was::Running,
            || true,
            |_| {},
        )
        .await;
        let err = r.expect_err("not retried");
        assert!(
            err.contains("Resetting the Virtual Machine is required"),
            "{err}"
        );
        assert!(err.contains("by hand"), "{err}");
        assert_eq!(conts.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn retries_stop_when_the_journal_no_longer_gives_the_vm_here() {
        let (_d, path, conts) = fake_qemu(usize::MAX, None);
        let tries = AtomicUsize::new(0);
        let r = cont_until_running(
            &path,
            Duration::from_secs(5),
            FAST,
            Was::Running,
            || tries.fetch_add(1, Ordering::SeqCst) < 2,
            |_| {},
        )
        .await;
        assert!(r.expect_err("stopped").contains("no longer gives the VM"));
        assert_eq!(
            conts.load(Ordering::SeqCst),
            2,
            "never a cont after the journal changed"
        );
    }

    /// Two give-backs' retries for one VM (an older order's still running when a newer one's
    /// begin): the older ending, or noting a cause, leaves the newer's entry as it is; a
    /// settled VM has none.
    #[test]
    fn a_give_back_retry_ending_late_leaves_a_newer_ones_entry() {
        let (old, new) = (Some("aa".to_string()), Some("bb".to_string()));
        let mut r = Retries::default();
        r.begin("vm", &old, "lock held".into());
        r.begin("vm", &new, "lock still held".into());
        r.note("vm", &old, "QEMU gone");
        r.end("vm", &old);
        assert_eq!(r.cause("vm"), Some("lock still held"));
        r.note("vm", &new, "QEMU not answering");
        assert_eq!(r.cause("vm"), Some("QEMU not answering"));
        r.end("vm", &new);
        assert_eq!(r.cause("vm"), None);
        r.begin("vm", &new, "lock held".into());
        r.settled("vm");
        assert_eq!(r.cause("vm"), None);
    }

    #[test]
    fn only_lock_refusals_and_an_unreachable_socket_clear() {
        let qemu = |desc: &str| QmpError::Qemu {
            command: "cont".into(),
            class: "GenericError".into(),
            desc: desc.into(),
        };
        assert!(refusal_clears(&qemu("Failed to get \"write\" lock")));
        assert!(refusal_clears(&qemu("Failed to get shared \"write\" lock")));
        assert!(!refusal_clears(&qemu("Migration is not finalized yet")));
        assert!(!refusal_clears(&QmpError::Closed {
            path: "/q".into(),
            waiting_for: "cont".into()
        }));
    }
}
