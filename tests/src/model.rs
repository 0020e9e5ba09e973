//! A model of two agents migrating one VM (running, or paused by its operator) under one order,
//! for `stateright` to check.
//! spec: SPEC.md §8.9
//!
//! Each agent is the agent's own machine, `trustmig_protocol::commit::Side`: it takes every
//! decision about the journal, the messages of the commit and the VM (claim, COMMIT, rollback,
//! settlement queries and answers, restarts, the operator's overrides), following
//! `trustmig_protocol::settlement::Rules`. The model only carries out the machines' outputs
//! (a journal that keeps what was written, a network, a hypervisor) and adds everything that
//! can go wrong:
//! - a network that loses, duplicates, reorders and delays: every message ever sent stays
//!   deliverable, any number of times, in any order, or never;
//! - an attacker who replays any message seen (the same), replays the order, and asks the
//!   destination about the order as a third agent;
//! - sessions that fail at any point (cut, timeout, refused record), and crashes of either
//!   agent at any step — between a journal write and what waits for it to be durable too —
//!   after which only the journal survives (the hypervisor too: a QEMU keeps its state when
//!   its agent dies), followed by a restart;
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
use trustmig_protocol::commit::{Input, Output, Phase, Side, Signal};
use trustmig_protocol::order::Role;
use trustmig_protocol::settlement::{Entry, Rules, Settle, State as J, VmAction};
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
    /// Paused by its operator (not by a migration): a live copy, to stay paused until its
    /// operator runs it.
    Paused,
    /// Source: stopped at the switch-over, can run again.
    Stopped,
    /// Destination: arrived (loaded), never ran.
    Loaded,
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
    /// The agent's machine (its session, the query under way and what waits for a durable
    /// record are volatile: a crash loses them, a restart makes a new one from the journal).
    pub side: Side,
    /// The hypervisor's copy of the VM: survives the agent's crash.
    pub vm: Vm,
}

impl Agent {
    fn new(rules: Rules, role: Role, vm: Vm) -> Self {
        Self {
            up: true,
            journal: Vec::new(),
            side: Side::new(rules, role),
            vm,
        }
    }

    /// The order's latest entry.
    pub fn latest(&self) -> Option<&Entry> {
        self.journal.last()
    }

    /// The session's phase, if one runs.
    pub fn session(&self) -> Option<Phase> {
        self.side.session()
    }

    /// Source: asking the destination about the order in doubt.
    pub fn asking(&self) -> bool {
        self.side.asking()
    }

    /// Whether anything waits for the last journal record to be durable.
    fn holding(&self) -> bool {
        self.side.awaits_durable()
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
    /// The source's VM was paused by its operator when the order came.
    pub paused_before: bool,
    /// A give-back ran a VM that was paused before its migration.
    pub ran_paused: bool,
    /// A give-back left a VM stopped by the switch-over paused, as it was before.
    pub gave_back_paused: bool,
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
        let i = match m {
            Msg::Order | Msg::Ready | Msg::Resumed | Msg::Answer { .. } => 0,
            Msg::Begin | Msg::Final | Msg::Commit | Msg::Query { .. } => 1,
        };
        if !s.agents[i].up {
            return;
        }
        let a = &mut s.agents[i];
        let outs = match m {
            // The claim records whether the VM is paused (the agent reads it from QEMU).
            Msg::Order if matches!(a.vm, Vm::Running | Vm::Paused) && a.session().is_none() => {
                let paused = a.vm == Vm::Paused;
                a.side.claim(Some(DESTINATION), paused).unwrap_or_default()
            }
            // The handshake claims the order at the destination, for its hypervisor (`flag`).
            Msg::Begin if a.session().is_none() => {
                a.side.claim(Some(SOURCE), true).unwrap_or_default()
            }
            Msg::Final if a.session() == Some(Phase::Transfer) => {
                a.vm = Vm::Loaded;
                a.side.handle(Input::FinalVerified)
            }
            Msg::Ready => a.side.handle(Input::Ready),
            Msg::Commit => a.side.handle(Input::Commit),
            Msg::Resumed => a.side.handle(Input::Resumed),
            Msg::Answer {
                to: Who::Source,
                committed,
            } => a.side.handle(Input::Answer { committed }),
            Msg::Query { from } => {
                // An order the destination never received: it cannot tell who sent it, holds
                // nothing of it, and answers "no" to anyone (using the id up). The property is
                // about orders it received, whose source it knows.
                let received = a.journal.iter().any(|e| e.peer == Some(SOURCE));
                let outs = a.side.query(&from.id()).unwrap_or_default();
                if from != Who::Source && received && !outs.is_empty() {
                    s.ghost.answered_other = true;
                }
                return self.run(s, i, outs);
            }
            _ => return,
        };
        self.run(s, i, outs);
    }

    /// Carry out agent `i`'s outputs: a journal record is written at once (a crash before the
    /// machine hears it is durable is a crash after the write), messages go on the network,
    /// VM actions reach the hypervisor.
    fn run(&self, s: &mut Sys, i: usize, outs: Vec<Output>) {
        for o in outs {
            let a = &mut s.agents[i];
            match o {
                Output::Journal(e) => {
                    match e.state {
                        J::Claimed => {
                            s.ghost.claims[i] += 1;
                            s.ghost.claimed_revoked |= revoked(a);
                        }
                        J::Committed => {
                            s.ghost.commits[i] += 1;
                            // The source's COMMIT needs the destination's `Ready`, which only
                            // exists once the destination sent it.
                            s.ghost.commit_without_gate |= i == 0 && !s.net.contains(&Msg::Ready);
                        }
                        _ => {}
                    }
                    a.journal.push(e);
                }
                Output::Send(sig) => {
                    s.net.insert(match sig {
                        Signal::Ready => Msg::Ready,
                        Signal::Commit => Msg::Commit,
                        Signal::Resumed => Msg::Resumed,
                        Signal::Answer { to, committed } => Msg::Answer {
                            to: if to == SOURCE {
                                Who::Source
                            } else {
                                Who::Mallory
                            },
                            committed,
                        },
                    });
                }
                Output::Vm(act) => vm_action(a, act, &mut s.ghost),
                // The model's `Ask` and `Unanswered` actions are the query's two outcomes.
                Output::Ask => {}
            }
        }
        // The source opened its session: it dials the destination.
        if i == 0 && s.agents[0].session() == Some(Phase::Transfer) && !s.net.contains(&Msg::Begin)
        {
            s.net.insert(Msg::Begin);
        }
    }

    /// Agent `i`'s next own step: the record written last is durable; else the source's
    /// switch-over (the guest stops, the last bytes and the evidence go), or the destination's
    /// VM running after `cont`.
    fn step(&self, s: &mut Sys, i: usize) {
        let a = &mut s.agents[i];
        if !a.up {
            return;
        }
        let outs = if a.holding() {
            a.side.handle(Input::Durable)
        } else {
            match (i, a.session()) {
                (0, Some(Phase::Transfer)) => {
                    a.vm = Vm::Stopped;
                    s.net.insert(Msg::Final);
                    a.side.handle(Input::SwitchedOver)
                }
                (1, Some(Phase::Committed) | None) if a.vm == Vm::Running => {
                    a.side.handle(Input::VmRunning)
                }
                _ => return,
            }
        };
        self.run(s, i, outs);
    }

    fn fail(&self, s: &mut Sys, i: usize) {
        let a = &mut s.agents[i];
        if !a.up {
            return;
        }
        let outs = a.side.handle(Input::Failed);
        self.run(s, i, outs);
    }

    fn restart(&self, s: &mut Sys, i: usize) {
        let role = if i == 0 {
            Role::Source
        } else {
            Role::Destination
        };
        let a = &mut s.agents[i];
        a.up = true;
        let x = Side::restart(self.rules, role, &a.journal);
        a.journal.truncate(x.kept);
        a.side = x.side;
        self.run(s, i, x.outputs);
    }

    fn operator(&self, s: &mut Sys, how: Settle) {
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
        if !src.up || !src.asking() {
            return;
        }
        if let Ok(outs) = src.side.operator(how) {
            if !outs.is_empty() {
                s.overrides -= 1;
            }
            self.run(s, 0, outs);
        }
    }
}

/// Do what a machine said to its host's VM.
fn vm_action(a: &mut Agent, act: VmAction, ghost: &mut Ghost) {
    match act {
        // A paused VM given back before the switch-over stopped it: running it (`cont`) is
        // as wrong as after.
        VmAction::GiveBack { paused_before } if matches!(a.vm, Vm::Stopped | Vm::Paused) => {
            if a.vm == Vm::Stopped {
                if a.latest().map(|e| e.state) != Some(J::RolledBack) {
                    ghost.resumed_unsettled = true;
                }
                ghost.gave_back_paused |= paused_before;
            }
            ghost.ran_paused |= ghost.paused_before && !paused_before;
            a.vm = if paused_before {
                Vm::Paused
            } else {
                Vm::Running
            };
        }
        VmAction::Forget | VmAction::Discard => a.vm = Vm::Absent,
        VmAction::Resume if a.vm == Vm::Loaded => a.vm = Vm::Running,
        _ => {}
    }
}

impl Model for Migration {
    type State = Sys;
    type Action = Action;

    /// The source's VM running, or paused by its operator (the paused hand-over).
    fn init_states(&self) -> Vec<Sys> {
        [Vm::Running, Vm::Paused]
            .into_iter()
            .map(|vm| Sys {
                agents: [
                    Agent::new(self.rules, Role::Source, vm),
                    Agent::new(self.rules, Role::Destination, Vm::Absent),
                ],
                net: BTreeSet::from([Msg::Order]),
                crashes: self.crashes,
                overrides: 1,
                intrusions: 1,
                revocations: 1,
                ghost: Ghost {
                    paused_before: vm == Vm::Paused,
                    ..Ghost::default()
                },
            })
            .collect()
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
        if s.agents[0].up && s.agents[0].asking() {
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
                // What the machine held in memory is gone; the restart makes a new one.
                a.side = Side::new(self.rules, a.side.role());
            }
            Action::Restart(i) => self.restart(&mut s, i),
            Action::Ask => {
                s.net.insert(Msg::Query { from: Who::Source });
            }
            Action::Unanswered => {
                let outs = s.agents[0].side.handle(Input::Unanswered);
                // Asking again is the `Ask` action's business.
                let outs = outs.into_iter().filter(|o| *o != Output::Ask).collect();
                self.run(&mut s, 0, outs);
            }
            Action::Intrude => {
                s.intrusions -= 1;
                s.net.insert(Msg::Query { from: Who::Mallory });
            }
            Action::Revoke(i) => {
                let a = &mut s.agents[i];
                if let (true, Ok(outs)) = (a.up, a.side.revoke()) {
                    s.revocations -= 1;
                    self.run(&mut s, i, outs);
                }
            }
            Action::ResumeHere => self.operator(&mut s, Settle::OperatorResumeHere),
            Action::Moved => self.operator(&mut s, Settle::OperatorMoved),
        }
        // An action that changes nothing is not a step (keeps the graph free of self-loops).
        (s != *last).then_some(s)
    }

    /// Keeps a mutation that claims replayed orders again from growing the journal forever.
    /// (a second claim is the violation already: nothing past it needs exploring).
    fn within_boundary(&self, s: &Sys) -> bool {
        s.agents.iter().all(|a| a.journal.len() <= 8) && s.ghost.claims.iter().all(|c| *c <= 2)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always("never two live copies", |_, s: &Sys| live(s) <= 1),
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
            Property::always(
                "a VM paused before its migration is never run by a give-back",
                |_, s: &Sys| !s.ghost.ran_paused,
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
                "a failed migration of a paused VM gives it back paused",
                |_, s: &Sys| {
                    settled(s)
                        && s.ghost.gave_back_paused
                        && s.agents[0].vm == Vm::Paused
                        && s.agents[0].latest().map(|e| e.state) == Some(J::RolledBack)
                },
            ),
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
                "once nothing more happens: one live copy, nothing in doubt",
                |m: &Migration, s: &Sys| !quiescent(m, s) || (live(s) == 1 && settled(s)),
            ),
            // A copy that arrived and never ran, kept by a destination whose order will never
            // commit, holds the host's memory (and a QEMU) for good: nothing would remove it.
            Property::always(
                "once nothing more happens: no loaded copy is left behind",
                |m: &Migration, s: &Sys| {
                    !quiescent(m, s) || s.agents.iter().all(|a| a.vm != Vm::Loaded)
                },
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

/// Copies of the VM that are the VM: running, or paused by its operator.
fn live(s: &Sys) -> usize {
    (s.agents.iter())
        .filter(|a| matches!(a.vm, Vm::Running | Vm::Paused))
        .count()
}

fn settled(s: &Sys) -> bool {
    s.agents
        .iter()
        .all(|a| a.up && !a.asking() && a.session().is_none() && !a.holding())
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
