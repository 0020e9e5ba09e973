//! Commit, rollback and settlement: every decision about where a VM may run, sans-IO.
//! spec: SPEC.md §8.7–8.8
//!
//! "Never two copies, never none" rests on a handful of decisions taken over an order's
//! journal entry: may this order be claimed, may it commit, what does a failure, a restart, a
//! settlement answer or an operator's override make of it, and what happens to the VM. They
//! are pure functions of the entry here ([`Rules`]); the agent's journal asks them before it
//! writes and its drivers act on their answers, and the model checker (`tests/tests/model.rs`)
//! composes the very same functions with crashes, a lossy network and an attacker. The caller
//! makes each returned [`State`] durable before it acts on it.
//!
//! [`Rules::mutated`] exists for the model checker's mutation tests (feature `mutations`):
//! it breaks one rule on purpose, to show the checker catches it. A normal build cannot set one.

use serde::{Deserialize, Serialize};

use crate::order::Role;
use crate::AgentId;

/// Where an order stands in an agent's journal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// The order id is used; nothing moved yet, or transfer under way.
    Claimed,
    /// COMMIT recorded: the destination owns the VM.
    Committed,
    /// Finished successfully.
    Done,
    /// Failed before commit; the source kept its VM (or got it back by settlement).
    RolledBack,
    /// Settled at restart from an interrupted state, or by the operator as moved.
    Settled,
    /// Revoked by the operator before this agent used it (`trustmig order revoke`): it can
    /// never be claimed here.
    Revoked,
}

/// As the journal writes it.
impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Claimed => "claimed",
            Self::Committed => "committed",
            Self::Done => "done",
            Self::RolledBack => "rolled-back",
            Self::Settled => "settled",
            Self::Revoked => "revoked",
        })
    }
}

/// What the rules need to know of an order's latest journal record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Entry {
    /// This agent's role in the order.
    pub role: Role,
    /// Where it stands.
    pub state: State,
    /// The other agent: the destination (source role), the one agent answered about the order
    /// (destination role). `None` in records older than the field.
    pub peer: Option<AgentId>,
    /// Source role: the VM is paused as the journal last read it (at the claim, then at the
    /// switch-over if that differed), and stays paused when given back. Destination role: the
    /// VM's hypervisor was handed to the order and not yet found gone (a restart that finds
    /// the order rolled back discards that hypervisor's state, and no other).
    pub flag: bool,
}

/// Why the copy of a VM here is not free to send ([`Rules::holds_vm`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotHeld {
    /// An order is sending it from here (claimed, or at COMMIT: in doubt).
    Leaving,
    /// A copy that arrived under an order that never committed here (or is arriving still):
    /// its hypervisor's state is to be discarded, never run.
    ToDiscard,
    /// Committed here and not run since: its resume is under way, or a restart settled it and
    /// its reconciliation has not resumed it yet, or its `cont` failed and it was left to the
    /// operator (DONE is journalled once it runs, `Resumed` sent or not).
    NotYetResumed,
}

/// Why a rule refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The order id was used here before.
    #[error("order already used here (journalled {0:?}): replayed")]
    Replayed(State),
    /// The operator revoked the order here.
    #[error("order revoked by the operator")]
    Revoked,
    /// Nothing is journalled for the order.
    #[error("no journal record of the order")]
    Unknown,
    /// COMMIT asked for an order that is no longer (or not) claimed: after a destination
    /// answered "not committed", no late `Commit` may make it commit after all.
    #[error("the order is {0:?} in the journal: refusing to commit it")]
    NotClaimed(State),
    /// COMMIT asked before the peer's evidence verified.
    #[error("refusing to commit before the peer's evidence verified")]
    GateClosed,
    /// A settlement query from an agent that is not the order's source.
    #[error("no settlement answer for an agent that did not send the order")]
    NotItsSource,
    /// A settlement query about an order this agent sent.
    #[error("the order was sent from this agent, not received: no answer to a settlement query")]
    SentFromHere,
    /// An operator's settlement of an order that is not in doubt here.
    #[error("the order is not in doubt here ({0:?})")]
    NotInDoubt(State),
}

/// Whether the peer's evidence verified: the destination's `Ready` (source), the source's
/// `Commit` after `Ready` was sent (destination). Only then may COMMIT be journalled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// Verified.
    Open,
    /// Not (yet).
    Closed,
}

/// How an order in doubt at its source is settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Settle {
    /// The destination answered the settlement query.
    Answer {
        /// It journalled COMMIT (it owns the VM); `false`: it never did, and now never will.
        committed: bool,
    },
    /// `trustmig settle --resume-here`: the operator says the destination never ran the VM.
    /// Safe only if that is true: after the destination committed it makes two copies (the
    /// model shows the trace; SPEC.md §8.8).
    OperatorResumeHere,
    /// `trustmig settle --moved`: the operator says the destination owns the VM.
    OperatorMoved,
}

/// What to do with the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VmAction {
    /// Nothing: it runs where it belongs, moved away, or is in doubt.
    Nothing,
    /// Source: keep it stopped as it is; only the destination's answer may give it back.
    KeepStopped,
    /// Source: it is this host's again; run it (unless it was paused at the claim or the
    /// switch-over).
    GiveBack {
        /// It stays paused.
        paused_before: bool,
    },
    /// Source: the destination owns it; what is left here is never resumed.
    Forget,
    /// Destination: discard what arrived; it never runs here.
    Discard,
    /// Destination: it is this host's; run it (if it never ran here, it runs nowhere).
    Resume,
}

impl VmAction {
    /// For a give-back, whether the VM stays paused; `None` for any other action.
    pub fn given_back(self) -> Option<bool> {
        match self {
            Self::GiveBack { paused_before } => Some(paused_before),
            _ => None,
        }
    }
}

/// What an agent does after its session failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterFailure {
    /// Source before COMMIT: journal the rollback ([`Rules::roll_back`]), then give the VM back.
    RollBack,
    /// Source after COMMIT: keep the VM stopped and ask the destination until it answers.
    AskDestination,
    /// Destination before COMMIT (or rolled back by a settlement answer meanwhile): discard
    /// what arrived, journal the rollback; it never runs here.
    Discard,
    /// Destination after COMMIT: the VM is this host's; it keeps it.
    Keep,
}

/// What a restart makes of an order the journal shows interrupted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Restart {
    /// The state to journal, if any.
    pub write: Option<State>,
    /// Source at COMMIT with a known destination: ask it (the VM stays stopped meanwhile).
    pub ask: bool,
}

/// A deliberate mistake, for the model checker's mutation tests only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mutation {
    /// An unanswered settlement query gives the VM back.
    ResumeOnUnanswered,
    /// COMMIT is journalled with the gate closed (before `Ready`).
    CommitBeforeReady,
    /// A settlement query is answered whoever asks.
    AnswerAnyone,
    /// An order id already journalled is claimed again.
    AcceptReplayedOrder,
    /// A restart forgets an order's latest record.
    ForgetAtRestart,
    /// A restart leaves what arrived for an order that never committed here.
    KeepArrivedAtRestart,
    /// A give-back runs the VM even when it was paused before its migration.
    RunWhatWasPaused,
    /// Whichever order wrote last about a VM is its order (`history::VmHistory`), even one the
    /// VM left under a newer order since.
    LatestOrderOwnsVm,
    /// A copy that arrived and is still to be discarded counts as this host's VM, free to send.
    SendWhatArrived,
    /// A copy committed here that has not run since (COMMIT, its `cont` refused for good)
    /// counts as this host's VM, free to send (as paused: QEMU shows it so).
    SendWhatDidNotRun,
}

/// The rules. `Rules::default()` is the only kind a normal build makes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Rules {
    mutations: [Option<Mutation>; 2],
}

impl Rules {
    /// Rules with one deliberate mistake (model checker mutation tests).
    #[cfg(feature = "mutations")]
    pub fn mutated(m: Mutation) -> Self {
        Self {
            mutations: [Some(m), None],
        }
    }

    /// These rules with a second mistake: for a rule that guards what another rule already
    /// keeps from happening (defence in depth), shown needed once the other is broken.
    #[cfg(feature = "mutations")]
    pub fn and(self, m: Mutation) -> Self {
        Self {
            mutations: [self.mutations[0], Some(m)],
        }
    }

    pub(crate) fn broken(&self, m: Mutation) -> bool {
        self.mutations.contains(&Some(m))
    }

    /// May an order be claimed, given its latest entry? Each id once per agent, whatever
    /// became of it (SPEC.md §3.4).
    pub fn claim(&self, prev: Option<&Entry>) -> Result<(), Refusal> {
        match prev {
            Some(e) if e.state == State::Revoked => Err(Refusal::Revoked),
            Some(e) if !self.broken(Mutation::AcceptReplayedOrder) => {
                Err(Refusal::Replayed(e.state))
            }
            _ => Ok(()),
        }
    }

    /// May the operator revoke an order here? Only one this agent has not used: a migration
    /// under way or done is settled by the rules above, not by revocation.
    pub fn revoke(&self, prev: Option<&Entry>) -> Result<State, Refusal> {
        match prev {
            None => Ok(State::Revoked),
            Some(e) => Err(Refusal::Replayed(e.state)),
        }
    }

    /// May COMMIT be journalled? Only for an order still claimed here and with the gate open.
    pub fn commit(&self, prev: Option<&Entry>, gate: Gate) -> Result<State, Refusal> {
        if gate == Gate::Closed && !self.broken(Mutation::CommitBeforeReady) {
            return Err(Refusal::GateClosed);
        }
        match prev.map(|e| e.state) {
            Some(State::Claimed) => Ok(State::Committed),
            Some(other) => Err(Refusal::NotClaimed(other)),
            None => Err(Refusal::Unknown),
        }
    }

    /// A session failed: roll back only what never got past its claim. A failure after COMMIT
    /// (say, `Resumed` could not be sent) must not turn a committed order into a rolled-back one,
    /// or a settlement query would hand the VM back to the source while it runs elsewhere.
    pub fn roll_back(&self, prev: Option<&Entry>) -> Option<State> {
        (prev?.state == State::Claimed).then_some(State::RolledBack)
    }

    /// What an agent does after its session failed, its order's entry being `prev`.
    pub fn after_failure(&self, prev: Option<&Entry>) -> AfterFailure {
        match prev.map(|e| (e.role, e.state)) {
            Some((Role::Source, State::Committed)) => AfterFailure::AskDestination,
            Some((Role::Destination, State::Committed | State::Done | State::Settled)) => {
                AfterFailure::Keep
            }
            Some((Role::Destination, _)) => AfterFailure::Discard,
            _ => AfterFailure::RollBack,
        }
    }

    /// The source's VM given back after the order's `latest` record: as it was before the
    /// migration, so paused if that record says so (the claim's reading, or the switch-over's).
    pub fn give_back(&self, latest: Option<&Entry>) -> VmAction {
        VmAction::GiveBack {
            paused_before: latest.is_some_and(|e| e.flag)
                && !self.broken(Mutation::RunWhatWasPaused),
        }
    }

    /// A settlement query went unanswered (destination unreachable, ...).
    pub fn unanswered(&self) -> VmAction {
        if self.broken(Mutation::ResumeOnUnanswered) {
            return VmAction::GiveBack {
                paused_before: false,
            };
        }
        VmAction::KeepStopped
    }

    /// Settle a source's order in doubt: the state to journal and what becomes of the VM, or
    /// `Ok(None)` when it is no longer in doubt (an answer, a retry and the operator may race).
    /// The operator's overrides are refused for an order that is not in doubt.
    pub fn settle(
        &self,
        prev: Option<&Entry>,
        how: Settle,
    ) -> Result<Option<(State, VmAction)>, Refusal> {
        let e = match prev {
            Some(e) if e.role == Role::Source && e.state == State::Committed => e,
            Some(_) if matches!(how, Settle::Answer { .. }) => return Ok(None),
            Some(e) => return Err(Refusal::NotInDoubt(e.state)),
            None => return Err(Refusal::Unknown),
        };
        let back = self.give_back(Some(e));
        Ok(Some(match how {
            Settle::Answer { committed: true } => (State::Done, VmAction::Forget),
            Settle::Answer { committed: false } | Settle::OperatorResumeHere => {
                (State::RolledBack, back)
            }
            Settle::OperatorMoved => (State::Settled, VmAction::Forget),
        }))
    }

    /// Answer a settlement query about an order as its destination (SPEC.md §8.8 rule 3):
    /// whether this agent journalled COMMIT, and what to journal first. An order claimed but
    /// not committed is rolled back before the answer "no", and one never seen here is
    /// journalled rolled back (its id used up), so that no late session can commit it. Only the
    /// order's source, as recorded at the claim, is answered about it.
    pub fn answer(
        &self,
        prev: Option<&Entry>,
        asker: &AgentId,
    ) -> Result<(bool, Option<State>), Refusal> {
        if let Some(e) = prev.filter(|e| e.role == Role::Destination) {
            if e.peer.is_some_and(|p| &p != asker) && !self.broken(Mutation::AnswerAnyone) {
                return Err(Refusal::NotItsSource);
            }
        }
        match prev.map(|e| (e.role, e.state)) {
            Some((Role::Source, _)) => Err(Refusal::SentFromHere),
            Some((_, State::Committed | State::Done | State::Settled)) => Ok((true, None)),
            Some((_, State::Claimed)) | None => Ok((false, Some(State::RolledBack))),
            Some((_, State::RolledBack | State::Revoked)) => Ok((false, None)),
        }
    }

    /// Whether a record (`role`, `state`) changes where its VM runs, `prev` being its order's
    /// state before: a COMMIT either way (the VM left, or arrived) and what follows it, and a
    /// source rollback after COMMIT (settled: the VM runs here again). A claim, a revocation, or
    /// the rollback of an order that never committed, leaves the VM where it was.
    pub fn moves_vm(&self, prev: Option<State>, role: Role, state: State) -> bool {
        match (role, state) {
            (_, State::Claimed) => false,
            (Role::Source, State::RolledBack) => prev == Some(State::Committed),
            (Role::Destination, State::RolledBack) | (_, State::Revoked) => false,
            (_, State::Committed | State::Done | State::Settled) => true,
        }
    }

    /// Whether an order whose latest entry is `e` sends the VM from here and is under way
    /// (claimed) or at COMMIT, unsettled: the VM may come back or run on its destination, so
    /// no other order may send it from here, and no other copy of it may arrive here meanwhile.
    pub fn leaving(&self, e: &Entry) -> bool {
        e.role == Role::Source && matches!(e.state, State::Claimed | State::Committed)
    }

    /// Whether a record is about this host's copy of the VM, for reconciling its hypervisor
    /// after a restart: not a revocation, and not a destination's claim or refusal before the
    /// VM's hypervisor was handed to the order (`flag`): those never touched it.
    pub fn touches_vm(&self, e: &Entry) -> bool {
        match (e.role, e.state) {
            (_, State::Revoked) => false,
            (Role::Destination, State::Claimed | State::RolledBack) => e.flag,
            _ => true,
        }
    }

    /// Whether the VM left this agent by the order whose latest record that moved it is `e`:
    /// a source-side COMMIT, or what settled one as moved, so the destination owns it (or may:
    /// in doubt) and it must never start here again.
    pub fn left_here(&self, e: &Entry) -> bool {
        e.role == Role::Source && matches!(e.state, State::Committed | State::Done | State::Settled)
    }

    /// Whether this host's copy of the VM is the VM, free to send, as far as the journal can
    /// tell, given the latest entry of the VM's current order here (`history::VmHistory`;
    /// `None`: it never migrated). Free: a copy given back (a source's rollback), one that
    /// arrived and ran or was held paused as handed over (DONE, `Resumed` sent or not), one a
    /// refused arrival never touched, and one whose order sent it away (QEMU refuses a
    /// `postmigrate` copy by itself; a copy an operator started here since is theirs to send).
    /// Not free: one an order is sending; an arrival interrupted or rolled back whose copy is
    /// still to be discarded (QEMU holds it stopped, and a source's checks of QEMU alone would
    /// take it for a paused VM and send it while the VM runs elsewhere); one committed here
    /// and not run since (COMMIT: its resume under way, or its `cont` failed and it was left to
    /// the operator; SETTLED: a restart's reconciliation has not resumed it yet): sent first,
    /// its resume would never come (found by the model checker over two orders), and a copy
    /// QEMU never ran would go as "paused as it was", which it was not (found by an audit).
    pub fn holds_vm(&self, current: Option<&Entry>) -> Result<(), NotHeld> {
        match current.map(|e| (e.role, e.state, e.flag)) {
            Some(_) if current.is_some_and(|e| self.leaving(e)) => Err(NotHeld::Leaving),
            Some((Role::Destination, State::Claimed | State::RolledBack, true))
                if !self.broken(Mutation::SendWhatArrived) =>
            {
                Err(NotHeld::ToDiscard)
            }
            Some((Role::Destination, State::Committed, _))
                if !self.broken(Mutation::SendWhatDidNotRun) =>
            {
                Err(NotHeld::NotYetResumed)
            }
            Some((Role::Destination, State::Settled, _)) => Err(NotHeld::NotYetResumed),
            _ => Ok(()),
        }
    }

    /// The records a restart replays: all of them (a mutation forgets the last).
    pub fn replay<'a, T>(&self, records: &'a [T]) -> &'a [T] {
        match records {
            [rest @ .., _] if self.broken(Mutation::ForgetAtRestart) => rest,
            all => all,
        }
    }

    /// What a restart makes of an order whose latest entry is `e`, if it was interrupted
    /// (claimed, or at COMMIT). A source at COMMIT that knows its destination asks it;
    /// otherwise the journal alone settles it: before COMMIT rolled back, after it settled.
    pub fn restart(&self, e: &Entry) -> Option<Restart> {
        let settle = |state| Restart {
            write: Some(state),
            ask: false,
        };
        match (e.role, e.state) {
            (Role::Source, State::Committed) if e.peer.is_some() => Some(Restart {
                write: None,
                ask: true,
            }),
            (_, State::Claimed) => Some(settle(State::RolledBack)),
            (_, State::Committed) => Some(settle(State::Settled)),
            _ => None,
        }
    }

    /// What a restart does to a VM whose most recent order's entry is `e` (after [`restart`]
    /// wrote its record). It does not matter whether this restart settled the order or an
    /// earlier one (or a failure before it) did: an earlier start may have died after its
    /// record and before its VM action, and each action is harmless to repeat.
    ///
    /// [`restart`]: Rules::restart
    pub fn vm_after_restart(&self, e: &Entry) -> VmAction {
        match (e.role, e.state) {
            // Rolled back before COMMIT, or settled "not committed": in either case the
            // destination never committed, and never will.
            (Role::Source, State::RolledBack) => self.give_back(Some(e)),
            // Never committed here: what arrived never runs. Only a hypervisor handed to this
            // order: the claim comes before the check that the VM's hypervisor waits for a
            // migration, and a refused arrival must not touch a VM. The model checker found a
            // copy left loaded for good when only the restart that settled it discarded it.
            (Role::Destination, State::RolledBack)
                if e.flag && !self.broken(Mutation::KeepArrivedAtRestart) =>
            {
                VmAction::Discard
            }
            // Committed here (DONE follows once it runs): it is this host's; run it. The model
            // checker found one left paused for good when only the settling restart ran it.
            (Role::Destination, State::Settled) => VmAction::Resume,
            _ => VmAction::Nothing,
        }
    }

    /// What the operator's `trustmig reconcile` does to a VM whose current order's latest
    /// entry here is `e`, while no session of that VM runs here (the caller checks: no copy
    /// arriving, none leaving): what a restart does, and also resume a destination's VM at
    /// COMMIT, whose session ended before the VM ran (QEMU refused its `cont`): it is this
    /// host's, as it would be after a restart settled that COMMIT (the model checker makes
    /// that `cont` fail, SPEC.md §8.9).
    pub fn vm_on_request(&self, e: &Entry) -> VmAction {
        match (e.role, e.state) {
            (Role::Destination, State::Committed) => VmAction::Resume,
            _ => self.vm_after_restart(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: AgentId = [1; 32];
    const DST: AgentId = [2; 32];

    fn entry(role: Role, state: State) -> Entry {
        Entry {
            role,
            state,
            peer: Some(if role == Role::Source { DST } else { SRC }),
            flag: false,
        }
    }

    /// Only what the journal gives this host is sent from it: never a copy that arrived and
    /// is still to be discarded.
    #[test]
    fn only_the_vm_here_is_sent() {
        use NotHeld::*;
        use Role::{Destination as D, Source as S};
        use State::*;
        let r = Rules::default();
        let fed = |role, state, flag| Entry {
            role,
            state,
            peer: None,
            flag,
        };
        assert_eq!(r.holds_vm(None), Ok(()));
        let cases = [
            (S, RolledBack, Ok(())),
            (S, Claimed, Err(Leaving)),
            (S, Committed, Err(Leaving)),
            (S, Done, Ok(())),
            (S, Settled, Ok(())),
            (D, Claimed, Err(ToDiscard)),
            (D, RolledBack, Err(ToDiscard)),
            (D, Committed, Err(NotYetResumed)),
            (D, Settled, Err(NotYetResumed)),
            (D, Done, Ok(())),
        ];
        for (role, state, want) in cases {
            assert_eq!(
                r.holds_vm(Some(&fed(role, state, true))),
                want,
                "{role} {state}"
            );
        }
        // A refused arrival (its QEMU never handed over), or one whose QEMU was discarded.
        assert_eq!(r.holds_vm(Some(&fed(D, RolledBack, false))), Ok(()));
    }

    /// Messages name a state as the journal writes it.
    #[test]
    fn a_state_reads_as_the_journal_writes_it() {
        use State::*;
        for st in [Claimed, Committed, Done, RolledBack, Settled, Revoked] {
            let json = serde_json::to_string(&st).expect("json");
            assert_eq!(json, format!("\"{st}\""));
        }
    }

    #[test]
    fn an_order_is_claimed_once() {
        let r = Rules::default();
        assert_eq!(r.claim(None), Ok(()));
        for s in [State::Claimed, State::RolledBack, State::Done] {
            let e = entry(Role::Source, s);
            assert_eq!(r.claim(Some(&e)), Err(Refusal::Replayed(s)));
        }
    }

    #[test]
    fn only_an_unused_order_is_revoked_and_a_revoked_one_is_never_claimed() {
        let r = Rules::default();
        assert_eq!(r.revoke(None), Ok(State::Revoked));
        let used = entry(Role::Source, State::Claimed);
        assert_eq!(
            r.revoke(Some(&used)),
            Err(Refusal::Replayed(State::Claimed))
        );
        let revoked = entry(Role::Destination, State::Revoked);
        assert_eq!(r.claim(Some(&revoked)), Err(Refusal::Revoked));
        assert_eq!(r.answer(Some(&revoked), &SRC), Ok((false, None)));
        assert_eq!(
            r.commit(Some(&revoked), Gate::Open),
            Err(Refusal::NotClaimed(State::Revoked))
        );
    }

    #[test]
    fn commit_needs_a_claim_and_the_gate() {
        let r = Rules::default();
        let claimed = entry(Role::Destination, State::Claimed);
        assert_eq!(r.commit(Some(&claimed), Gate::Open), Ok(State::Committed));
        assert_eq!(
            r.commit(Some(&claimed), Gate::Closed),
            Err(Refusal::GateClosed)
        );
        let rolled = entry(Role::Destination, State::RolledBack);
        assert_eq!(
            r.commit(Some(&rolled), Gate::Open),
            Err(Refusal::NotClaimed(State::RolledBack))
        );
        assert_eq!(r.commit(None, Gate::Open), Err(Refusal::Unknown));
    }

    #[test]
    fn only_a_claim_rolls_back_and_only_commit_puts_a_source_in_doubt() {
        let r = Rules::default();
        let c = entry(Role::Source, State::Claimed);
        let k = entry(Role::Source, State::Committed);
        assert_eq!(r.roll_back(Some(&c)), Some(State::RolledBack));
        assert_eq!(r.roll_back(Some(&k)), None);
        assert_eq!(r.after_failure(Some(&c)), AfterFailure::RollBack);
        assert_eq!(r.after_failure(Some(&k)), AfterFailure::AskDestination);
        let d = |s| entry(Role::Destination, s);
        assert_eq!(
            r.after_failure(Some(&d(State::Claimed))),
            AfterFailure::Discard
        );
        assert_eq!(
            r.after_failure(Some(&d(State::RolledBack))),
            AfterFailure::Discard
        );
        assert_eq!(
            r.after_failure(Some(&d(State::Committed))),
            AfterFailure::Keep
        );
        assert_eq!(r.after_failure(Some(&d(State::Done))), AfterFailure::Keep);
        assert_eq!(r.unanswered(), VmAction::KeepStopped);
    }

    #[test]
    fn settlement_acts_once_and_the_operator_only_on_an_order_in_doubt() {
        let r = Rules::default();
        let k = entry(Role::Source, State::Committed);
        let yes = Settle::Answer { committed: true };
        let no = Settle::Answer { committed: false };
        assert_eq!(
            r.settle(Some(&k), yes),
            Ok(Some((State::Done, VmAction::Forget)))
        );
        let back = VmAction::GiveBack {
            paused_before: false,
        };
        assert_eq!(r.settle(Some(&k), no), Ok(Some((State::RolledBack, back))));
        assert_eq!(
            r.settle(Some(&k), Settle::OperatorMoved),
            Ok(Some((State::Settled, VmAction::Forget)))
        );
        let done = entry(Role::Source, State::Done);
        assert_eq!(r.settle(Some(&done), no), Ok(None));
        assert_eq!(
            r.settle(Some(&done), Settle::OperatorResumeHere),
            Err(Refusal::NotInDoubt(State::Done))
        );
    }

    #[test]
    fn only_the_source_gets_an_answer_and_an_unknown_order_is_used_up() {
        let r = Rules::default();
        let c = entry(Role::Destination, State::Claimed);
        assert_eq!(
            r.answer(Some(&c), &SRC),
            Ok((false, Some(State::RolledBack)))
        );
        assert_eq!(r.answer(Some(&c), &[9; 32]), Err(Refusal::NotItsSource));
        let k = entry(Role::Destination, State::Committed);
        assert_eq!(r.answer(Some(&k), &SRC), Ok((true, None)));
        assert_eq!(
            r.answer(None, &[9; 32]),
            Ok((false, Some(State::RolledBack)))
        );
        let s = entry(Role::Source, State::Committed);
        assert_eq!(r.answer(Some(&s), &DST), Err(Refusal::SentFromHere));
    }

    #[test]
    fn a_restart_settles_from_the_journal_or_asks() {
        let r = Rules::default();
        let ask = r.restart(&entry(Role::Source, State::Committed));
        assert_eq!(
            ask,
            Some(Restart {
                write: None,
                ask: true
            })
        );
        let mut old = entry(Role::Source, State::Committed);
        old.peer = None;
        assert_eq!(r.restart(&old).and_then(|x| x.write), Some(State::Settled));
        let d = r.restart(&entry(Role::Destination, State::Claimed));
        assert_eq!(d.and_then(|x| x.write), Some(State::RolledBack));
        assert_eq!(r.restart(&entry(Role::Destination, State::Done)), None);
        assert_eq!(r.replay(&[1, 2, 3]), &[1, 2, 3]);
    }

    /// The operator's reconciliation does what a restart does, and also resumes a
    /// destination left at COMMIT (its session's `cont` failed); never a source in doubt.
    #[test]
    fn the_operator_reconciles_as_a_restart_and_resumes_a_commit_left_stopped() {
        let r = Rules::default();
        let (d, src) = (Role::Destination, Role::Source);
        let mut fed = entry(d, State::RolledBack);
        fed.flag = true;
        let cases = [
            (entry(d, State::Committed), VmAction::Resume),
            (entry(d, State::Settled), VmAction::Resume),
            (entry(d, State::Done), VmAction::Nothing),
            (entry(d, State::Claimed), VmAction::Nothing),
            (fed, VmAction::Discard),
            (entry(src, State::Committed), VmAction::Nothing),
            (
                entry(src, State::RolledBack),
                VmAction::GiveBack {
                    paused_before: false,
                },
            ),
        ];
        for (e, want) in cases {
            assert_eq!(r.vm_on_request(&e), want, "{:?} {:?}", e.role, e.state);
        }
        // Only the destination at COMMIT differs from a restart's action.
        assert_eq!(
            r.vm_after_restart(&entry(d, State::Committed)),
            VmAction::Nothing
        );
    }
}
