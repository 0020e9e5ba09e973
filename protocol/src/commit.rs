//! One sans-IO machine per side for an order, from its claim to DONE: commit, rollback and
//! settlement. spec: SPEC.md §8.7–8.9
//!
//! Inputs are what the agent learns: the protocol's verified messages (`Ready`, `Commit`,
//! `Resumed`, a settlement query or answer), "the journal record is durable", a failed session
//! (cut, timeout, refused record, abort), the operator's commands and a restart with the records
//! that survived. Outputs are what it must do, in order: journal a state (durably: the outputs
//! that depend on it are held back until [`Input::Durable`]), send a message, act on the VM, or
//! ask the destination. Every decision is one of [`Rules`]; the machine adds the order of
//! things — COMMIT durable before `Commit` leaves; the destination's COMMIT durable before its
//! VM runs; a rollback durable before the VM is given back — and which step may follow which.
//!
//! The agent's drivers feed it and carry out its outputs (`agent/src/driver/commit.rs`); the
//! model checker (`tests/src/model.rs`) runs the same machines under every fault.

use crate::order::Role;
use crate::settlement::{AfterFailure, Entry, Gate, Refusal, Rules, Settle, State, VmAction};
use crate::AgentId;

/// What one side learns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Input {
    /// The journal record of the last [`Output::Journal`] is durable.
    Durable,
    /// Source: the guest stopped, the last bytes and the final evidence went.
    SwitchedOver,
    /// Source: the destination's `Ready` verified.
    Ready,
    /// Source: the destination's `Resumed`.
    Resumed,
    /// Destination: everything arrived and the source's final evidence verified.
    FinalVerified,
    /// Destination: the source's `Commit` (after our `Ready`).
    Commit,
    /// Destination: the VM runs here (`cont` succeeded).
    VmRunning,
    /// The session failed: cut, timeout, refused record, abort.
    Failed,
    /// Source: the destination answered the settlement query.
    Answer {
        /// It journalled COMMIT.
        committed: bool,
    },
    /// Source: the settlement query went unanswered.
    Unanswered,
    /// Source: the operator settles the order by hand (`trustmig settle`).
    Operator(Settle),
}

/// A message the machine sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Signal {
    /// Destination: ready to commit.
    Ready,
    /// Source: committed; the destination owns the VM.
    Commit,
    /// Destination: the VM runs here.
    Resumed,
    /// Destination: the settlement answer to the order's source.
    Answer {
        /// The agent that asked.
        to: AgentId,
        /// Whether it journalled COMMIT.
        committed: bool,
    },
}

/// What the agent must do, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Output {
    /// Journal this as the order's latest record, durably; then feed [`Input::Durable`].
    Journal(Entry),
    /// Send this to the peer.
    Send(Signal),
    /// Do this to the VM.
    Vm(VmAction),
    /// Source: ask the destination about the order (again, after a pause); feed its answer
    /// or [`Input::Unanswered`].
    Ask,
}

/// Where a session stands (volatile: a restart starts without one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    /// Source: pre-copy under way, the guest runs. Destination: receiving.
    Transfer,
    /// Source: the guest stopped, the final evidence sent; waits for `Ready`.
    Switched,
    /// Source: COMMIT journalled, `Commit` sent once durable; waits for `Resumed`.
    /// Destination: COMMIT journalled, the VM resumed once durable.
    Committed,
    /// Destination: `Ready` sent; waits for `Commit`.
    ReadySent,
}

/// The machine of one side of one order.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Side {
    rules: Rules,
    role: Role,
    /// The order's latest journal record as this machine wrote or found it.
    entry: Option<Entry>,
    session: Option<Phase>,
    /// Source: asking the destination about the order in doubt.
    asking: bool,
    /// Outputs held back until the journal record written last is durable.
    held: Vec<Output>,
}

/// A machine after a restart, and what the restart does.
#[derive(Debug)]
pub struct Restarted {
    /// The machine.
    pub side: Side,
    /// How many of the records given survive (the rest are ignored).
    pub kept: usize,
    /// What to do now.
    pub outputs: Vec<Output>,
}

impl Side {
    /// A side that has nothing journalled for the order yet.
    pub fn new(rules: Rules, role: Role) -> Self {
        Self {
            rules,
            role,
            entry: None,
            session: None,
            asking: false,
            held: Vec::new(),
        }
    }

    /// A side whose order was just claimed (the journal holds `claimed`) and whose session
    /// starts: the destination's handshake claims through the journal itself.
    pub fn claimed(rules: Rules, claimed: Entry) -> Self {
        Self {
            entry: Some(claimed),
            session: Some(Phase::Transfer),
            ..Self::new(rules, claimed.role)
        }
    }

    /// A side that finds `latest` journalled and no session running for it: a source's order
    /// at COMMIT is in doubt, its destination being asked (after the session failed, or the
    /// restart that found it so).
    pub fn from_journal(rules: Rules, role: Role, latest: Option<Entry>) -> Self {
        let asking = latest.is_some_and(|e| rules.restart(&e).is_some_and(|x| x.ask));
        Self {
            entry: latest,
            asking,
            ..Self::new(rules, role)
        }
    }

    /// A restart with the records that survived (oldest first): settle what they show
    /// interrupted (SPEC.md §8.8). What becomes of the VM is not this order's to say alone: the
    /// host reconciles each VM with its current order once every order is settled
    /// (`history::VmHistory`, `Rules::vm_after_restart`); a newer order may own it by now.
    pub fn restart(rules: Rules, role: Role, records: &[Entry]) -> Restarted {
        let kept = rules.replay(records).len();
        let mut side = Self::from_journal(rules, role, records[..kept].last().copied());
        side.asking = false; // set below, with the `Ask` that goes with it
        let mut outputs = Vec::new();
        let Some(e) = side.entry else {
            return Restarted {
                side,
                kept,
                outputs,
            };
        };
        if let Some(x) = rules.restart(&e) {
            if let Some(state) = x.write {
                side.write(&mut outputs, state);
            }
            if x.ask {
                side.asking = true;
                outputs.push(Output::Ask);
            }
        }
        Restarted {
            side,
            kept,
            outputs,
        }
    }

    /// Which side this is.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The journal's latest record of the order, as it is now: another machine of the same
    /// order (a settlement answer given on another connection) may have written since, and a
    /// write this machine asked for may have failed. The agent calls it before every input, so
    /// that each decision rests on the journal as it is (the model runs one machine per side,
    /// always in step with its journal).
    pub fn sync(&mut self, latest: Option<Entry>) {
        self.entry = latest;
    }

    /// A journal write this machine asked for failed or was refused: what it held back for it
    /// is dropped, it takes the journal's record as it is, and the session (if one ran) is
    /// still there to fail ([`Input::Failed`]) from that record.
    pub fn write_failed(&mut self, latest: Option<Entry>) {
        self.held.clear();
        self.entry = latest;
        self.session.get_or_insert(Phase::Transfer);
    }

    /// The order's latest journal record as this machine knows it.
    pub fn entry(&self) -> Option<&Entry> {
        self.entry.as_ref()
    }

    /// The session's phase, if one runs.
    pub fn session(&self) -> Option<Phase> {
        self.session
    }

    /// Source: whether it is asking the destination about the order in doubt.
    pub fn asking(&self) -> bool {
        self.asking
    }

    /// Whether outputs wait for [`Input::Durable`].
    pub fn awaits_durable(&self) -> bool {
        !self.held.is_empty()
    }

    /// Claim the order: the source when its operator hands it the order, the destination at
    /// the handshake. `peer` is the other agent (the one a destination answers about the
    /// order); `flag` as [`Entry::flag`]. A session starts.
    pub fn claim(&mut self, peer: Option<AgentId>, flag: bool) -> Result<Vec<Output>, Refusal> {
        self.rules.claim(self.entry.as_ref())?;
        let e = Entry {
            role: self.role,
            state: State::Claimed,
            peer,
            flag,
        };
        self.entry = Some(e);
        self.session = Some(Phase::Transfer);
        Ok(vec![Output::Journal(e)])
    }

    /// The operator revokes the order here (only one this agent never used).
    pub fn revoke(&mut self) -> Result<Vec<Output>, Refusal> {
        let state = self.rules.revoke(self.entry.as_ref())?;
        let e = Entry {
            role: self.role,
            state,
            peer: None,
            flag: false,
        };
        self.entry = Some(e);
        Ok(vec![Output::Journal(e)])
    }

    /// A destination answers a settlement query from `asker` (SPEC.md §8.8 rule 3): what it
    /// journals first, then the answer. Refused for anyone but the order's source.
    pub fn query(&mut self, asker: &AgentId) -> Result<Vec<Output>, Refusal> {
        let (committed, write) = self.rules.answer(self.entry.as_ref(), asker)?;
        let mut out = Vec::new();
        if let Some(state) = write {
            match self.entry {
                Some(_) => self.write(&mut out, state),
                // Never seen here: its id is used up, with no source on record.
                None => {
                    let e = Entry {
                        role: Role::Destination,
                        state,
                        peer: None,
                        flag: false,
                    };
                    self.entry = Some(e);
                    out.push(Output::Journal(e));
                }
            }
        }
        self.then(
            &mut out,
            Output::Send(Signal::Answer {
                to: *asker,
                committed,
            }),
        );
        Ok(out)
    }

    /// Feed one input; returns what to do, in order. An input that does not apply now (a
    /// late, duplicated or replayed message; a step out of turn) changes nothing.
    /// [`Input::Durable`] releases everything held back: one journal write is outstanding at
    /// a time (every output that journals holds back what follows it).
    pub fn handle(&mut self, input: Input) -> Vec<Output> {
        let mut out = Vec::new();
        let r = self.rules;
        match (self.role, self.session, input) {
            (_, _, Input::Durable) => out = std::mem::take(&mut self.held),
            (_, Some(_), Input::Failed) => self.failed(&mut out),
            (Role::Source, Some(Phase::Transfer), Input::SwitchedOver) => {
                self.session = Some(Phase::Switched);
                // The gate is closed: `Ready` has not come. Only a broken rule commits here.
                self.try_commit(&mut out, Gate::Closed);
            }
            (Role::Source, Some(Phase::Switched), Input::Ready) => {
                self.try_commit(&mut out, Gate::Open);
            }
            (Role::Source, Some(Phase::Committed), Input::Resumed) if self.held.is_empty() => {
                self.session = None;
                self.write(&mut out, State::Done);
                self.then(&mut out, Output::Vm(VmAction::Forget));
            }
            (Role::Source, _, Input::Answer { committed }) if self.asking => {
                self.asking = false;
                if let Ok(Some((state, vm))) =
                    r.settle(self.entry.as_ref(), Settle::Answer { committed })
                {
                    self.write(&mut out, state);
                    self.then(&mut out, Output::Vm(vm));
                }
            }
            (Role::Source, _, Input::Unanswered) if self.asking => match r.unanswered() {
                VmAction::KeepStopped => out.push(Output::Ask),
                act => {
                    self.asking = false;
                    out.push(Output::Vm(act));
                }
            },
            (Role::Source, _, Input::Operator(how)) if self.asking => {
                if let Ok(Some((state, vm))) = r.settle(self.entry.as_ref(), how) {
                    self.asking = false;
                    self.write(&mut out, state);
                    self.then(&mut out, Output::Vm(vm));
                }
            }
            (Role::Destination, Some(Phase::Transfer), Input::FinalVerified) => {
                self.session = Some(Phase::ReadySent);
                out.push(Output::Send(Signal::Ready));
            }
            (Role::Destination, Some(Phase::ReadySent), Input::Commit) => {
                if let Ok(state) = r.commit(self.entry.as_ref(), Gate::Open) {
                    self.session = Some(Phase::Committed);
                    self.write(&mut out, state);
                    self.then(&mut out, Output::Vm(VmAction::Resume));
                }
            }
            (Role::Destination, Some(Phase::Committed), Input::VmRunning)
                if self.held.is_empty() =>
            {
                self.session = None;
                out.push(Output::Send(Signal::Resumed));
                self.write(&mut out, State::Done);
            }
            // Resumed after its session ended, by a restart that settled it or by the
            // operator's `trustmig reconcile` of a COMMIT whose `cont` had failed: DONE, so
            // nothing resumes it again (the operator may pause it by then).
            (Role::Destination, None, Input::VmRunning)
                if self.held.is_empty()
                    && self.entry.is_some_and(|e| {
                        e.role == Role::Destination
                            && matches!(e.state, State::Settled | State::Committed)
                    }) =>
            {
                self.write(&mut out, State::Done);
            }
            _ => {}
        }
        out
    }

    /// The operator's settlement of an order that is not in doubt here is refused by name
    /// (rather than ignored, as a late message is).
    pub fn operator(&mut self, how: Settle) -> Result<Vec<Output>, Refusal> {
        let state = self.entry.map_or(State::Claimed, |e| e.state);
        let not_in_doubt = || Refusal::NotInDoubt(state);
        if !self.asking {
            self.rules.settle(self.entry.as_ref(), how)?;
            return Err(not_in_doubt());
        }
        let out = self.handle(Input::Operator(how));
        if out.is_empty() {
            return Err(not_in_doubt());
        }
        Ok(out)
    }

    /// COMMIT if the rules allow it with `gate`: journalled, then `Commit` once durable.
    fn try_commit(&mut self, out: &mut Vec<Output>, gate: Gate) {
        if let Ok(state) = self.rules.commit(self.entry.as_ref(), gate) {
            self.session = Some(Phase::Committed);
            self.write(out, state);
            self.then(out, Output::Send(Signal::Commit));
        }
    }

    fn failed(&mut self, out: &mut Vec<Output>) {
        // What was held back goes with the session (a `Commit` never sent: the source asks),
        // except a committed destination's: its VM is this host's and still resumes.
        let held = std::mem::take(&mut self.held);
        self.session = None;
        let r = self.rules;
        let after = r.after_failure(self.entry.as_ref());
        if after == AfterFailure::Keep {
            self.held = held;
        }
        if let AfterFailure::RollBack | AfterFailure::Discard = after {
            if let Some(state) = r.roll_back(self.entry.as_ref()) {
                self.write(out, state);
            }
        }
        match after {
            AfterFailure::RollBack => {
                let back = r.give_back(self.entry.as_ref());
                self.then(out, Output::Vm(back))
            }
            AfterFailure::AskDestination => {
                self.asking = true;
                out.push(Output::Vm(VmAction::KeepStopped));
                out.push(Output::Ask);
            }
            // Discarded at once: what arrived never runs here, and a crash before the
            // rollback is journalled finds the order claimed and discards again.
            AfterFailure::Discard => out.insert(0, Output::Vm(VmAction::Discard)),
            AfterFailure::Keep => {}
        }
    }

    /// Journal `state` on the order's entry.
    fn write(&mut self, out: &mut Vec<Output>, state: State) {
        let e = Entry {
            state,
            ..self.entry.expect("a write follows the claim")
        };
        self.entry = Some(e);
        out.push(Output::Journal(e));
    }

    /// `o` after what `out` journals is durable: held back if `out` journals something or
    /// something is held already (once: a query repeated meanwhile is answered once).
    fn then(&mut self, out: &mut Vec<Output>, o: Output) {
        if out.iter().any(|x| matches!(x, Output::Journal(_))) || !self.held.is_empty() {
            if !self.held.contains(&o) {
                self.held.push(o);
            }
        } else {
            out.push(o);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: AgentId = [1; 32];
    const DST: AgentId = [2; 32];

    fn journalled(out: &[Output]) -> Vec<State> {
        out.iter()
            .filter_map(|o| match o {
                Output::Journal(e) => Some(e.state),
                _ => None,
            })
            .collect()
    }

    /// The happy path on both sides, with every "durable" in its place: nothing that depends
    /// on a record leaves before it is durable.
    #[test]
    fn a_migration_commits_in_order() {
        let r = Rules::default();
        let (mut s, mut d) = (Side::new(r, Role::Source), Side::new(r, Role::Destination));
        assert_eq!(
            journalled(&s.claim(Some(DST), false).unwrap()),
            [State::Claimed]
        );
        assert_eq!(s.handle(Input::Durable), []);
        assert_eq!(
            journalled(&d.claim(Some(SRC), true).unwrap()),
            [State::Claimed]
        );
        assert_eq!(s.handle(Input::SwitchedOver), [], "no COMMIT before Ready");
        assert_eq!(s.handle(Input::Resumed), [], "out of turn");
        assert_eq!(
            d.handle(Input::FinalVerified),
            [Output::Send(Signal::Ready)]
        );
        let out = s.handle(Input::Ready);
        assert_eq!(journalled(&out), [State::Committed]);
        assert_eq!(
            out.len(),
            1,
            "Commit waits for COMMIT to be durable: {out:?}"
        );
        assert_eq!(s.handle(Input::Durable), [Output::Send(Signal::Commit)]);
        assert_eq!(journalled(&d.handle(Input::Commit)), [State::Committed]);
        assert_eq!(d.handle(Input::Durable), [Output::Vm(VmAction::Resume)]);
        assert_eq!(d.handle(Input::VmRunning)[0], Output::Send(Signal::Resumed));
        assert_eq!(s.handle(Input::Resumed).len(), 1);
        assert_eq!(s.handle(Input::Durable), [Output::Vm(VmAction::Forget)]);
        assert_eq!(s.entry().unwrap().state, State::Done);
        assert_eq!(d.entry().unwrap().state, State::Done);
        assert!(s.session().is_none() && d.session().is_none());
    }

    #[test]
    fn the_destination_resumes_only_after_its_commit_is_durable() {
        let r = Rules::default();
        let mut d = Side::new(r, Role::Destination);
        d.claim(Some(SRC), true).unwrap();
        d.handle(Input::Durable);
        assert_eq!(
            d.handle(Input::Commit),
            [],
            "Commit before Ready is out of turn"
        );
        d.handle(Input::FinalVerified);
        let out = d.handle(Input::Commit);
        assert_eq!(journalled(&out), [State::Committed]);
        assert_eq!(out.len(), 1);
        assert_eq!(
            d.handle(Input::Commit),
            [],
            "a replayed Commit changes nothing"
        );
        assert_eq!(d.handle(Input::Durable), [Output::Vm(VmAction::Resume)]);
        let out = d.handle(Input::VmRunning);
        assert_eq!(out[0], Output::Send(Signal::Resumed));
        assert_eq!(journalled(&out), [State::Done]);
        // A failure between COMMIT and `cont` keeps the VM here: it still resumes.
        let mut d = Side::new(r, Role::Destination);
        d.claim(Some(SRC), true).unwrap();
        d.handle(Input::FinalVerified);
        d.handle(Input::Commit);
        assert_eq!(d.handle(Input::Failed), []);
        assert_eq!(d.handle(Input::Durable), [Output::Vm(VmAction::Resume)]);
        // Before COMMIT, a failure discards, then journals the rollback.
        let mut d = Side::new(r, Role::Destination);
        d.claim(Some(SRC), true).unwrap();
        d.handle(Input::FinalVerified);
        let out = d.handle(Input::Failed);
        assert_eq!(out[0], Output::Vm(VmAction::Discard));
        assert_eq!(journalled(&out), [State::RolledBack]);
    }

    #[test]
    fn a_failure_rolls_back_before_commit_and_asks_after() {
        let r = Rules::default();
        let mut s = Side::new(r, Role::Source);
        s.claim(Some(DST), true).unwrap();
        s.handle(Input::Durable);
        s.handle(Input::SwitchedOver);
        let out = s.handle(Input::Failed);
        assert_eq!(journalled(&out), [State::RolledBack]);
        assert_eq!(out.len(), 1, "the VM waits for the rollback to be durable");
        assert_eq!(
            s.handle(Input::Durable),
            [Output::Vm(VmAction::GiveBack {
                paused_before: true
            })]
        );

        let mut s = Side::new(r, Role::Source);
        s.claim(Some(DST), false).unwrap();
        s.handle(Input::SwitchedOver);
        s.handle(Input::Ready);
        // The session fails before COMMIT is known durable: the record may be on disk, so
        // the source must ask.
        let out = s.handle(Input::Failed);
        assert_eq!(out, [Output::Vm(VmAction::KeepStopped), Output::Ask]);
        assert_eq!(s.handle(Input::Unanswered), [Output::Ask], "stays stopped");
        let out = s.handle(Input::Answer { committed: false });
        assert_eq!(journalled(&out), [State::RolledBack]);
        assert_eq!(
            s.handle(Input::Durable),
            [Output::Vm(VmAction::GiveBack {
                paused_before: false
            })]
        );
        assert_eq!(
            s.handle(Input::Answer { committed: true }),
            [],
            "answered once"
        );
        assert!(
            s.operator(Settle::OperatorMoved).is_err(),
            "no longer in doubt"
        );
    }

    #[test]
    fn a_destination_answers_only_the_orders_source_and_journals_first() {
        let r = Rules::default();
        let mut d = Side::new(r, Role::Destination);
        d.claim(Some(SRC), true).unwrap();
        d.handle(Input::Durable);
        assert_eq!(d.query(&[9; 32]), Err(Refusal::NotItsSource));
        let out = d.query(&SRC).unwrap();
        assert_eq!(journalled(&out), [State::RolledBack]);
        assert_eq!(
            d.handle(Input::Durable),
            [Output::Send(Signal::Answer {
                to: SRC,
                committed: false
            })]
        );
        // A late `Commit` can no longer commit it.
        d.handle(Input::FinalVerified);
        assert_eq!(d.handle(Input::Commit), []);
    }

    #[test]
    fn a_restart_settles_what_it_finds() {
        let r = Rules::default();
        let e = |role, state| Entry {
            role,
            state,
            peer: Some(if role == Role::Source { DST } else { SRC }),
            flag: true,
        };
        // The journal's settlement only: the VM is the host's to reconcile, by the rules
        // applied to its current order's latest record.
        let x = Side::restart(r, Role::Source, &[e(Role::Source, State::Claimed)]);
        assert_eq!(journalled(&x.outputs), [State::RolledBack]);
        let mut side = x.side;
        assert_eq!(side.handle(Input::Durable), []);
        assert_eq!(
            r.vm_after_restart(side.entry().expect("journalled")),
            VmAction::GiveBack {
                paused_before: true
            }
        );
        let x = Side::restart(
            r,
            Role::Source,
            &[
                e(Role::Source, State::Claimed),
                e(Role::Source, State::Committed),
            ],
        );
        assert_eq!(x.outputs, [Output::Ask]);
        assert!(x.side.asking());
        let x = Side::restart(
            r,
            Role::Destination,
            &[
                e(Role::Destination, State::Claimed),
                e(Role::Destination, State::Committed),
            ],
        );
        assert_eq!(journalled(&x.outputs), [State::Settled]);
        let mut side = x.side;
        assert_eq!(side.handle(Input::Durable), []);
        assert_eq!(
            r.vm_after_restart(side.entry().expect("journalled")),
            VmAction::Resume
        );
        // A crash before the VM ran: the next restart resumes it still; once it runs, DONE.
        let settled = [
            e(Role::Destination, State::Claimed),
            e(Role::Destination, State::Committed),
            e(Role::Destination, State::Settled),
        ];
        let x = Side::restart(r, Role::Destination, &settled);
        assert_eq!(x.outputs, []);
        assert_eq!(r.vm_after_restart(&settled[2]), VmAction::Resume);
        let mut side = x.side;
        assert_eq!(journalled(&side.handle(Input::VmRunning)), [State::Done]);
        let done = [settled[2], e(Role::Destination, State::Done)];
        assert_eq!(Side::restart(r, Role::Destination, &done).outputs, []);
        // A COMMIT whose session ended before the VM ran (its `cont` failed), resumed later by
        // the operator's `trustmig reconcile`: DONE too, so nothing resumes it again.
        let mut side = Side::from_journal(
            r,
            Role::Destination,
            Some(e(Role::Destination, State::Committed)),
        );
        assert_eq!(journalled(&side.handle(Input::VmRunning)), [State::Done]);
        // Not for an order that never committed here.
        let mut side = Side::from_journal(
            r,
            Role::Destination,
            Some(e(Role::Destination, State::RolledBack)),
        );
        assert_eq!(side.handle(Input::VmRunning), []);
    }
}
