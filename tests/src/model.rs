//! A model of two agents migrating one VM under one order, for `stateright` to check.
//! spec: SPEC.md §8.9
//!
//! Every decision about the journal and the VM is taken by `trustmig_protocol::settlement::Rules`,
//! the rules the agent itself follows: may the order be claimed, may COMMIT be journalled,
//! what a failure, a restart, a settlement query or answer and an operator's override make of
//! the order and its VM. Around them the model puts what the agents' drivers do (the message
//! flow of SPEC.md §8.7) and everything that can go wrong:
//! - a network that loses, duplicates, reorders and delays: every message ever sent stays
//!   deliverable, any number of times, in any order, or never;
//! - an attacker who replays any message seen (the same), replays the order, and asks the
//!   destination about the order as a third agent;
//! - sessions that fail at any point (cut, timeout, refused record), and crashes of either
//!   agent at any step, after which only the journal survives (the hypervisor too: a QEMU
//!   keeps its state when its agent dies), followed by a restart;
//! - the operator's overrides (`trustmig settle --resume-here | --moved`), either informed
//!   (their precondition holds: they looked at the destination) or blind, and a revocation of
//!   the order on either agent (`trustmig order revoke`) at any moment.
//!
//! Abstracted away: time (timeouts are session failures that may come at any moment), the
//! TPM, cryptography and the data streams (the handshake and record layer are what make a
//! message of a dead session, or a forged one, undeliverable: a session's messages reach only
//! that session), and more than one order or VM.

use std::collections::BTreeSet;

use stateright::{Model, Property};
use trustmig_protocol::order::Role;
use trustmig_protocol::settlement::{
    AfterFailure, Entry, Gate, Rules, Settle, State as J, VmAction,
};
use trustmig_protocol::AgentId;

/// The source host's identity (index 0).
pub const SOURCE: AgentId = [1; 32];
/// The destination host's identity (index 1).
pub const DESTINATION: AgentId = [2; 32];
/// A trusted third agent that did not send the order.
pub const MALLORY: AgentId = [3; 32];

/// The VM as a host's hypervisor holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Vm {
    /// Nothing of it.
    Absent,
    /// Running.
    Running,
    /// Source: stopped at the switch-over, can run again.
    Stopped,
    /// Destination: arrived (loaded), never ran.
    Loaded,
}

/// Where a session stands (volatile: gone at a crash).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    /// Source: pre-copy under way, the guest runs.
    Transfer,
    /// Source: guest stopped, final evidence sent; waits for `Ready`.
    Switched,
    /// Source: `Ready` verified.
    ReadyIn,
    /// Source: COMMIT durable, `Commit` not yet sent.
    Committing,
    /// Source: `Commit` sent; waits for `Resumed`.
    AwaitResumed,
    /// Destination: receiving.
    Receiving,
    /// Destination: everything arrived and verified, `Ready` sent; waits for `Commit`.
    ReadySent,
    /// Destination: COMMIT durable, VM not yet resumed.
    Committed,
    /// Destination: VM resumed, `Resumed` not yet sent.
    Resumed,
}

/// A message. Session messages reach only a live session of the order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Msg {
    /// The operator's order, to the source.
    Order,
    /// The source opens a session with the destination (handshake with the order).
    Begin,
    /// The source's last bytes and final evidence.
    Final,
    /// The destination's `Ready`.
    Ready,
    /// The source's `Commit`.
    Commit,
    /// The destination's `Resumed`.
    Resumed,
    /// A settlement query about the order, from `from`.
    Query {
        /// The asker.
        from: Who,
    },
    /// The destination's settlement answer, to `to`.
    Answer {
        /// The asker it answers.
        to: Who,
        /// Whether it journalled COMMIT.
        committed: bool,
    },
}

/// An agent that asks the destination about the order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Who {
    /// The order's source.
    Source,
    /// A trusted third agent that did not send the order.
    Mallory,
}

impl Who {
    fn id(self) -> AgentId {
        match self {
            Self::Source => SOURCE,
            Self::Mallory => MALLORY,
        }
    }
}

/// One agent.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Agent {
    /// Running (else crashed, waiting for its restart).
    pub up: bool,
    /// The journal's records of the order, oldest first: durable.
    pub journal: Vec<Entry>,
    /// The session, if one runs: volatile.
    pub session: Option<Phase>,
    /// Source: asking the destination about the order in doubt: volatile.
    pub asking: bool,
    /// The hypervisor's copy of the VM: survives the agent's crash.
    pub vm: Vm,
}

impl Agent {
    fn new(vm: Vm) -> Self {
        Self {
            up: true,
            journal: Vec::new(),
            session: None,
            asking: false,
            vm,
        }
    }

    /// The order's latest entry.
    pub fn latest(&self) -> Option<&Entry> {
        self.journal.last()
    }

    fn write(&mut self, state: J) {
        let e = *self.latest().expect("write after a claim");
        self.journal.push(Entry { state, ..e });
    }
}

/// Things that must never happen, recorded as they happen (the properties read them).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ghost {
    /// Claims of the order, per agent.
    pub claims: [u8; 2],
    /// An agent claimed the order after it was revoked there.
    pub claimed_revoked: bool,
    /// COMMITs journalled, per agent.
    pub commits: [u8; 2],
    /// The source journalled COMMIT without the destination's `Ready` verified.
    pub commit_without_gate: bool,
    /// The source ran the VM again while its journal did not say rolled back.
    pub resumed_unsettled: bool,
    /// The destination answered a settlement query to an agent that did not send the order.
    pub answered_other: bool,
}

/// The system.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Sys {
    /// Source (0) and destination (1).
    pub agents: [Agent; 2],
    /// Every message sent so far (deliverable any number of times).
    pub net: BTreeSet<Msg>,
    /// Crashes left.
    pub crashes: u8,
    /// Operator overrides left.
    pub overrides: u8,
    /// The attacker's queries left.
    pub intrusions: u8,
    /// Revocations left.
    pub revocations: u8,
    /// What happened that must not.
    pub ghost: Ghost,
}

/// The operator's overrides in the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operator {
    /// No overrides.
    None,
    /// Overrides whose precondition holds (the operator checked the destination host):
    /// `--resume-here` only when the order rolled back there (it can never commit: "never
    /// committed" so far is not enough while a `Commit` may still arrive), `--moved` only when
    /// it committed there.
    Informed,
    /// Overrides at any time the order is in doubt.
    Blind,
}

/// What can happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// The network delivers `Msg` (again, late, or for the first time).
    Deliver(Msg),
    /// Agent `i` takes its next own step (a switch-over, a journal write made durable, a VM
    /// action, a message sent).
    Step(usize),
    /// Agent `i`'s session fails (cut, timeout, refused record, abort).
    Fail(usize),
    /// Agent `i` crashes (SIGKILL, power): only its journal and its hypervisor survive.
    Crash(usize),
    /// Agent `i` starts again and settles what its journal shows interrupted.
    Restart(usize),
    /// The source asks the destination about the order in doubt.
    Ask,
    /// The source's query went unanswered (destination unreachable).
    Unanswered,
    /// A third agent asks the destination about the order.
    Intrude,
    /// `trustmig settle --resume-here` on the source.
    ResumeHere,
    /// `trustmig settle --moved` on the source.
    Moved,
    /// `trustmig order revoke` on agent `i`.
    Revoke(usize),
}

impl Action {
    /// What happens anyway under fairness once the network heals (the rest are faults,
    /// attacks and the operator, which may or may not happen).
    pub fn is_progress(&self) -> bool {
        matches!(
            self,
            Self::Deliver(_) | Self::Step(_) | Self::Fail(_) | Self::Restart(_) | Self::Ask
        )
    }
}

/// The model: the rules under test, the faults' budget and the operator.
#[derive(Clone, Debug)]
pub struct Migration {
    /// The rules (possibly mutated).
    pub rules: Rules,
    /// Crashes allowed in a run.
    pub crashes: u8,
    /// The operator.
    pub operator: Operator,
}

impl Migration {
    /// The agent's own rules, `crashes` crashes, the operator as given.
    pub fn new(rules: Rules, crashes: u8, operator: Operator) -> Self {
        Self {
            rules,
            crashes,
            operator,
        }
    }

    fn deliver(&self, s: &mut Sys, m: Msg) {
        let r = self.rules;
        let [src, dst] = &mut s.agents;
        match m {
            Msg::Order
                if src.up
                    && src.vm == Vm::Running
                    && src.session.is_none()
                    && r.claim(src.latest()).is_ok() =>
            {
                src.journal.push(Entry {
                    role: Role::Source,
                    state: J::Claimed,
                    peer: Some(DESTINATION),
                    flag: false,
                });
                s.ghost.claims[0] += 1;
                s.ghost.claimed_revoked |= revoked(src);
                src.session = Some(Phase::Transfer);
                s.net.insert(Msg::Begin);
            }
            Msg::Begin if dst.up && dst.session.is_none() && r.claim(dst.latest()).is_ok() => {
                dst.journal.push(Entry {
                    role: Role::Destination,
                    state: J::Claimed,
                    peer: Some(SOURCE),
                    flag: true,
                });
                s.ghost.claims[1] += 1;
                s.ghost.claimed_revoked |= revoked(dst);
                dst.session = Some(Phase::Receiving);
            }
            Msg::Final if dst.up && dst.session == Some(Phase::Receiving) => {
                dst.vm = Vm::Loaded;
                dst.session = Some(Phase::ReadySent);
                s.net.insert(Msg::Ready);
            }
            Msg::Ready if src.up && src.session == Some(Phase::Switched) => {
                src.session = Some(Phase::ReadyIn);
            }
            Msg::Commit if dst.up && dst.session == Some(Phase::ReadySent) => {
                if let Ok(state) = r.commit(dst.latest(), Gate::Open) {
                    dst.write(state);
                    s.ghost.commits[1] += 1;
                    dst.session = Some(Phase::Committed);
                }
            }
            Msg::Resumed if src.up && src.session == Some(Phase::AwaitResumed) => {
                src.write(J::Done);
                src.vm = Vm::Absent;
                src.session = None;
            }
            Msg::Query { from } if dst.up => {
                // An order the destination never received: it cannot tell who sent it, holds
                // nothing of it, and answers "no" to anyone (using the id up). The property is
                // about orders it received, whose source it knows.
                let received = dst.journal.iter().any(|e| e.peer == Some(SOURCE));
                if let Ok((committed, write)) = r.answer(dst.latest(), &from.id()) {
                    match (write, dst.latest().is_some()) {
                        (Some(state), true) => dst.write(state),
                        (Some(state), false) => dst.journal.push(Entry {
                            role: Role::Destination,
                            state,
                            peer: None,
                            flag: false,
                        }),
                        (None, _) => {}
                    }
                    if from != Who::Source && received {
                        s.ghost.answered_other = true;
                    }
                    s.net.insert(Msg::Answer {
                        to: from,
                        committed,
                    });
                }
            }
            Msg::Answer { to, committed } if to == Who::Source && src.up && src.asking => {
                src.asking = false;
                if let Ok(Some((state, vm))) = r.settle(src.latest(), Settle::Answer { committed })
                {
                    src.write(state);
                    source_vm(src, vm, &mut s.ghost);
                }
            }
            _ => {}
        }
    }

    fn step(&self, s: &mut Sys, i: usize) {
        let r = self.rules;
        let a = &mut s.agents[i];
        if !a.up {
            return;
        }
        match a.session {
            // The switch-over: the guest stops, the last bytes and the evidence go.
            Some(Phase::Transfer) => {
                a.vm = Vm::Stopped;
                a.session = Some(Phase::Switched);
                s.net.insert(Msg::Final);
            }
            // COMMIT, durable before `Commit` leaves; the gate is open only after `Ready`.
            Some(p @ (Phase::Switched | Phase::ReadyIn)) => {
                let gate = if p == Phase::ReadyIn {
                    Gate::Open
                } else {
                    Gate::Closed
                };
                if let Ok(state) = r.commit(a.latest(), gate) {
                    a.write(state);
                    s.ghost.commits[0] += 1;
                    s.ghost.commit_without_gate |= gate == Gate::Closed;
                    a.session = Some(Phase::Committing);
                }
            }
            Some(Phase::Committing) => {
                s.net.insert(Msg::Commit);
                a.session = Some(Phase::AwaitResumed);
            }
            Some(Phase::Committed) => {
                a.vm = Vm::Running;
                a.session = Some(Phase::Resumed);
            }
            Some(Phase::Resumed) => {
                s.net.insert(Msg::Resumed);
                a.write(J::Done);
                a.session = None;
            }
            _ => {}
        }
    }

    fn fail(&self, s: &mut Sys, i: usize) {
        let r = self.rules;
        let a = &mut s.agents[i];
        // COMMIT and `cont` follow each other with no I/O between them: only a crash
        // separates them.
        if !a.up || a.session.is_none() || a.session == Some(Phase::Committed) {
            return;
        }
        a.session = None;
        let after = r.after_failure(a.latest());
        if let AfterFailure::RollBack | AfterFailure::Discard = after {
            if let Some(state) = r.roll_back(a.latest()) {
                a.write(state);
            }
        }
        match after {
            AfterFailure::RollBack => source_vm(
                a,
                VmAction::GiveBack {
                    paused_before: false,
                },
                &mut s.ghost,
            ),
            AfterFailure::AskDestination => a.asking = true,
            AfterFailure::Discard => a.vm = Vm::Absent,
            AfterFailure::Keep => {}
        }
    }

    fn restart(&self, s: &mut Sys, i: usize) {
        let r = self.rules;
        let a = &mut s.agents[i];
        a.up = true;
        let kept = r.replay(&a.journal).len();
        a.journal.truncate(kept);
        let Some(e) = a.latest().copied() else {
            return;
        };
        let mut was = None;
        if let Some(x) = r.restart(&e) {
            was = Some(e.state);
            if let Some(state) = x.write {
                a.write(state);
            }
            a.asking = x.ask;
        }
        let latest = *a.latest().expect("claimed");
        match r.vm_after_restart(&latest, was) {
            VmAction::Discard => a.vm = Vm::Absent,
            VmAction::Resume if a.vm == Vm::Loaded => a.vm = Vm::Running,
            act @ VmAction::GiveBack { .. } => source_vm(a, act, &mut s.ghost),
            _ => {}
        }
    }

    fn operator(&self, s: &mut Sys, how: Settle) {
        let r = self.rules;
        // What the operator can see on the destination host: the order used up there, never
        // to commit (rolled back), or committed there.
        let dst = s.agents[1].latest().map(|e| e.state);
        let informed_ok = match how {
            Settle::OperatorResumeHere => dst == Some(J::RolledBack),
            _ => matches!(dst, Some(J::Committed | J::Done | J::Settled)),
        };
        if self.operator == Operator::None
            || (self.operator == Operator::Informed && !informed_ok)
            || s.overrides == 0
        {
            return;
        }
        let src = &mut s.agents[0];
        // Only an order whose destination is being asked can be settled by hand.
        if !src.up || !src.asking {
            return;
        }
        if let Ok(Some((state, vm))) = r.settle(src.latest(), how) {
            s.overrides -= 1;
            src.write(state);
            src.asking = false;
            source_vm(src, vm, &mut s.ghost);
        }
    }
}

/// Do what the rules said to the source's VM.
fn source_vm(a: &mut Agent, act: VmAction, ghost: &mut Ghost) {
    match act {
        VmAction::GiveBack { .. } if a.vm == Vm::Stopped => {
            if a.latest().map(|e| e.state) != Some(J::RolledBack) {
                ghost.resumed_unsettled = true;
            }
            a.vm = Vm::Running;
        }
        VmAction::Forget => a.vm = Vm::Absent,
        _ => {}
    }
}

impl Model for Migration {
    type State = Sys;
    type Action = Action;

    fn init_states(&self) -> Vec<Sys> {
        vec![Sys {
            agents: [Agent::new(Vm::Running), Agent::new(Vm::Absent)],
            net: BTreeSet::from([Msg::Order]),
            crashes: self.crashes,
            overrides: 1,
            intrusions: 1,
            revocations: 1,
            ghost: Ghost::default(),
        }]
    }

    fn actions(&self, s: &Sys, out: &mut Vec<Action>) {
        out.extend(s.net.iter().map(|m| Action::Deliver(*m)));
        for i in 0..2 {
            out.push(Action::Step(i));
            out.push(Action::Fail(i));
            if s.agents[i].up {
                if s.crashes > 0 {
                    out.push(Action::Crash(i));
                }
            } else {
                out.push(Action::Restart(i));
            }
        }
        if s.agents[0].up && s.agents[0].asking {
            out.extend([Action::Ask, Action::Unanswered]);
            if self.operator != Operator::None && s.overrides > 0 {
                out.extend([Action::ResumeHere, Action::Moved]);
            }
        }
        if s.intrusions > 0 {
            out.push(Action::Intrude);
        }
        if s.revocations > 0 {
            out.extend([Action::Revoke(0), Action::Revoke(1)]);
        }
    }

    fn next_state(&self, last: &Sys, action: Action) -> Option<Sys> {
        let mut s = last.clone();
        match action {
            Action::Deliver(m) => self.deliver(&mut s, m),
            Action::Step(i) => self.step(&mut s, i),
            Action::Fail(i) => self.fail(&mut s, i),
            Action::Crash(i) => {
                s.crashes -= 1;
                let a = &mut s.agents[i];
                a.up = false;
                a.session = None;
                a.asking = false;
            }
            Action::Restart(i) => self.restart(&mut s, i),
            Action::Ask => {
                s.net.insert(Msg::Query { from: Who::Source });
            }
            Action::Unanswered => {
                let src = &mut s.agents[0];
                let act = self.rules.unanswered();
                if act != VmAction::KeepStopped {
                    src.asking = false;
                    source_vm(src, act, &mut s.ghost);
                }
            }
            Action::Intrude => {
                s.intrusions -= 1;
                s.net.insert(Msg::Query { from: Who::Mallory });
            }
            Action::Revoke(i) => {
                let a = &mut s.agents[i];
                if let (true, Ok(state)) = (a.up, self.rules.revoke(a.latest())) {
                    s.revocations -= 1;
                    let role = if i == 0 {
                        Role::Source
                    } else {
                        Role::Destination
                    };
                    a.journal.push(Entry {
                        role,
                        state,
                        peer: None,
                        flag: false,
                    });
                }
            }
            Action::ResumeHere => self.operator(&mut s, Settle::OperatorResumeHere),
            Action::Moved => self.operator(&mut s, Settle::OperatorMoved),
        }
        // An action that changes nothing is not a step (keeps the graph free of self-loops).
        (s != *last).then_some(s)
    }

    /// Keeps a mutation that claims replayed orders again from growing the journal forever.
    fn within_boundary(&self, s: &Sys) -> bool {
        s.agents.iter().all(|a| a.journal.len() <= 8)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always("never two running copies", |_, s: &Sys| running(s) <= 1),
            Property::always("the VM is never lost", |_, s: &Sys| {
                s.agents.iter().any(|a| a.vm != Vm::Absent)
            }),
            Property::always(
                "an order commits at most once on each side",
                |_, s: &Sys| s.ghost.commits.iter().all(|c| *c <= 1),
            ),
            Property::always(
                "an order is claimed at most once on each side, never once revoked",
                |_, s: &Sys| s.ghost.claims.iter().all(|c| *c <= 1) && !s.ghost.claimed_revoked,
            ),
            Property::always(
                "COMMIT only after the destination's Ready verified",
                |_, s: &Sys| !s.ghost.commit_without_gate,
            ),
            Property::always(
                "after COMMIT the source resumes only once its journal says rolled back",
                |_, s: &Sys| !s.ghost.resumed_unsettled,
            ),
            Property::always(
                "a settlement answer about an order received goes only to its source",
                |_, s: &Sys| !s.ghost.answered_other,
            ),
            // Examples the search must reach, or the model proves nothing (SPEC.md §8.9).
            Property::sometimes("the VM moves", |_, s: &Sys| {
                settled(s) && s.agents[1].vm == Vm::Running && s.agents[0].vm == Vm::Absent
            }),
            Property::sometimes("a failed migration rolls back", |_, s: &Sys| {
                settled(s)
                    && s.agents[0].vm == Vm::Running
                    && s.agents[0].latest().map(|e| e.state) == Some(J::RolledBack)
            }),
            Property::sometimes(
                "an order in doubt is settled by asking: moved",
                |_, s: &Sys| {
                    journal_is(&s.agents[0], &[J::Claimed, J::Committed, J::Done])
                        && s.agents[0].vm == Vm::Absent
                        && s.net.contains(&Msg::Answer {
                            to: Who::Source,
                            committed: true,
                        })
                },
            ),
            Property::sometimes(
                "an order in doubt is settled by asking: given back",
                |_, s: &Sys| {
                    journal_is(&s.agents[0], &[J::Claimed, J::Committed, J::RolledBack])
                        && s.agents[0].vm == Vm::Running
                },
            ),
            Property::sometimes(
                "a restarted destination resumes what it committed",
                |_, s: &Sys| {
                    journal_is(&s.agents[1], &[J::Claimed, J::Committed, J::Settled])
                        && s.agents[1].vm == Vm::Running
                },
            ),
            Property::always(
                "once nothing more happens: one running copy, nothing in doubt",
                |m: &Migration, s: &Sys| !quiescent(m, s) || (running(s) == 1 && settled(s)),
            ),
        ]
    }
}

fn revoked(a: &Agent) -> bool {
    a.journal.iter().any(|e| e.state == J::Revoked)
}

fn journal_is(a: &Agent, states: &[J]) -> bool {
    a.journal.iter().map(|e| e.state).eq(states.iter().copied())
}

fn running(s: &Sys) -> usize {
    s.agents.iter().filter(|a| a.vm == Vm::Running).count()
}

fn settled(s: &Sys) -> bool {
    s.agents
        .iter()
        .all(|a| a.up && !a.asking && a.session.is_none())
}

/// No progress action changes anything: the network delivered all it will, every agent took
/// every step it can, restarted and settled.
pub fn quiescent(m: &Migration, s: &Sys) -> bool {
    let mut acts = Vec::new();
    m.actions(s, &mut acts);
    acts.into_iter()
        .filter(Action::is_progress)
        .all(|a| m.next_state(s, a).is_none())
}
