//! A model of two agents migrating one VM (running, or paused by its operator) under one order,
//! or under two: there (host A to B) and back (B to A), for `stateright` to check.
//! spec: SPEC.md §8.9
//!
//! Each agent runs the agent's own machine, `trustmig_protocol::commit::Side`, once per order:
//! it takes every decision about the journal, the messages of the commit and the VM (claim,
//! COMMIT, rollback, settlement queries and answers, restarts, the operator's overrides),
//! following `trustmig_protocol::settlement::Rules`. A restart settles every order from the
//! journal alone, then, as a step of its own (a crash can come first), reconciles the VM with
//! the order the journal says it belongs to now (`trustmig_protocol::history::VmHistory`,
//! `Rules::vm_after_restart`), as `daemon/start.rs` and `backend/qemu/reconcile.rs` do. The
//! model only carries out the machines' outputs (a journal that keeps what was written, a
//! network, a hypervisor) and adds everything that can go wrong:
//! - a network that loses, duplicates, reorders and delays: every message ever sent stays
//!   deliverable, any number of times, in any order, or never;
//! - an attacker who replays any message seen (the same), replays an order, and asks the
//!   destination about an order as a third agent;
//! - sessions that fail at any point (cut, timeout, refused record), and crashes of either
//!   agent at any step — between a journal write and what waits for it to be durable too —
//!   after which only the journal survives (the hypervisor too: a QEMU keeps its state when
//!   its agent dies), followed by a restart;
//! - the operator's overrides (`trustmig settle --resume-here | --moved`), either informed
//!   (their precondition holds: they looked at the destination) or blind, and a revocation of
//!   an order on either agent (`trustmig order revoke`) at any moment;
//! - with an operator, a restart's reconciliation left to them (QEMU unreachable for a minute,
//!   `cont` refused), a destination's `cont` after its COMMIT that fails for good (its session
//!   ends, the VM loaded, not run), a give-back that QEMU does not settle at once (a `cont`
//!   refused for now, a late answer; tried again in the background, keeping a VM paused before
//!   paused, which a crash ends, or which stop and leave the VM to the operator),
//!   a destination's discard of a copy that arrived whose `quit` QEMU refuses (the copy stays
//!   loaded, the journal holding it to the order, left to the operator), and their `trustmig
//!   reconcile` at any moment, gated as the agent gates it;
//! - with two orders, the second may come at any moment: while the first is still under way,
//!   in doubt, or settled on one host and not the other.
//!
//! The agent's checks around a claim are modelled as it makes them: a source claims a new
//! order for what its hypervisor shows running or paused (a loaded copy shows paused) only if
//! the VM is not leaving here, not arriving here, and the journal gives it the copy here
//! (`Rules::holds_vm`); a destination's handshake claims the order, then refuses it (touching
//! nothing) unless nothing of the VM is here, or only a copy sent away, and the VM is not
//! leaving here. (Another arrival of the same VM needs a third order.)
//!
//! Abstracted away: time (timeouts are session failures that may come at any moment), the
//! TPM, cryptography and the data streams (the handshake and record layer are what make a
//! message of a dead session, or a forged one, undeliverable: a session's messages reach only
//! that session), compaction, and more than two orders or one VM.

use std::collections::BTreeSet;

use stateright::{Model, Property};
use trustmig_protocol::commit::{Input, Output, Phase, Side, Signal};
use trustmig_protocol::history::VmHistory;
use trustmig_protocol::order::Role;
use trustmig_protocol::settlement::{Entry, Rules, Settle, State as J, VmAction};
use trustmig_protocol::AgentId;

/// A trusted third agent that sent no order.
pub const MALLORY: AgentId = [3; 32];

/// Host `h`'s identity (A is 0, B is 1).
fn id(h: usize) -> AgentId {
    [h as u8 + 1; 32]
}

/// The source host of order `k`: the first goes from A to B, the second back.
fn src(k: usize) -> usize {
    k
}

/// The destination host of order `k`.
fn dst(k: usize) -> usize {
    1 - k
}

/// Host `h`'s role in order `k`.
fn role(h: usize, k: usize) -> Role {
    if h == src(k) {
        Role::Source
    } else {
        Role::Destination
    }
}

/// The VM as a host's hypervisor holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Vm {
    /// Nothing of it (a hypervisor waiting for an incoming migration, if an order comes).
    Absent,
    /// Source: sent away for good, yet still there, stopped (a QEMU in `postmigrate` stays so
    /// until someone quits it): not the VM, and a mistaken `cont` would run it. An operator
    /// replaces it with a fresh hypervisor when the VM is to come back.
    SentAway,
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

/// A message of one order. Session messages reach only a live session of their order.
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

/// An agent that asks the destination about an order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Who {
    /// The order's source.
    Source,
    /// A trusted third agent that did not send the order.
    Mallory,
}

impl Who {
    fn id(self, k: usize) -> AgentId {
        match self {
            Self::Source => id(src(k)),
            Self::Mallory => MALLORY,
        }
    }
}

/// One agent.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Agent {
    /// Running (else crashed, waiting for its restart).
    pub up: bool,
    /// The journal's records, oldest first, each with its order: durable.
    pub journal: Vec<(u8, Entry)>,
    /// The agent's machine of each order (its session, the query under way and what waits for
    /// a durable record are volatile: a crash loses them, a restart makes a new one from the
    /// journal).
    pub sides: Vec<Side>,
    /// The hypervisor's copy of the VM: survives the agent's crash.
    pub vm: Vm,
    /// After a restart, until done: the VM's reconciliation with the order it belongs to, as
    /// the restart read the journal (volatile).
    pub reconcile: Option<(u8, VmAction)>,
    /// A give-back of order `k` that QEMU did not settle at once (a `cont` refused for now for
    /// an image lock the destination's copy, being discarded, still holds; a QMP command not
    /// answered in time; a cancelled migration not ended yet), tried again in the background
    /// (`giveback::keep_trying`; `status`: "rolled back, not yet running"), with whether the VM
    /// was paused before (every try keeps it so). Volatile: a crash ends the retries, and the
    /// restart's reconciliation gives the VM back again; they may also stop without the VM
    /// running (`RetriesStop`), leaving it to the operator.
    pub resuming: Option<(u8, bool)>,
    /// QEMU will not settle the next give-back here at once (the destination's copy, being
    /// discarded, still holds an image lock; QEMU is slow to answer): the checker arms it at a
    /// moment it chooses (`LockHeld`), and the next give-back of a stopped or paused VM spends
    /// it.
    pub refuse_cont: bool,
    /// QEMU will refuse the next discard's `quit` here (a QEMU stopped or hung, the
    /// destination agent's `quit` timing out): the checker arms it at a moment it chooses
    /// (`QuitRefused`), and the next discard of a loaded copy spends it.
    pub refuse_quit: bool,
}

impl Agent {
    fn new(rules: Rules, h: usize, orders: usize, vm: Vm) -> Self {
        Self {
            up: true,
            journal: Vec::new(),
            sides: (0..orders).map(|k| Side::new(rules, role(h, k))).collect(),
            vm,
            reconcile: None,
            resuming: None,
            refuse_cont: false,
            refuse_quit: false,
        }
    }

    /// Order `k`'s records, oldest first.
    pub fn entries(&self, k: usize) -> impl Iterator<Item = &Entry> {
        (self.journal.iter()).filter_map(move |(o, e)| (usize::from(*o) == k).then_some(e))
    }

    /// Order `k`'s latest entry.
    pub fn latest(&self, k: usize) -> Option<&Entry> {
        self.entries(k).last()
    }

    /// Order `k`'s session's phase, if one runs.
    pub fn session(&self, k: usize) -> Option<Phase> {
        self.sides[k].session()
    }

    /// Source: asking the destination about order `k`, in doubt.
    pub fn asking(&self, k: usize) -> bool {
        self.sides[k].asking()
    }

    /// Whether anything waits for the last journal record to be durable.
    fn holding(&self) -> bool {
        self.sides.iter().any(Side::awaits_durable)
    }

    /// Whether the VM is leaving here under some order (`Journal::leaving`).
    fn leaving(&self, rules: &Rules) -> bool {
        (0..self.sides.len()).any(|k| self.latest(k).is_some_and(|e| rules.leaving(e)))
    }

    /// Whether a copy of the VM is arriving here (`ctx::OnePerVm`): a destination session runs,
    /// or what it does once its last record is durable (its `cont`) is still to come.
    fn arriving(&self, h: usize) -> bool {
        (0..self.sides.len()).any(|j| {
            role(h, j) == Role::Destination
                && (self.session(j).is_some() || self.sides[j].awaits_durable())
        })
    }

    /// The order the journal says the VM belongs to here (`Journal::last_order_of`).
    fn current_order(&self, rules: &Rules) -> Option<usize> {
        self.history(rules).order(&()).map(|k| usize::from(*k))
    }

    /// Whether the journal gives the VM to this host still, as a give-back's retries ask
    /// before each `cont` (`keep_trying`'s `still_ours`: not leaving, not sent away).
    fn still_ours(&self, rules: &Rules) -> bool {
        !self.leaving(rules) && !self.history(rules).migrated_away(rules, &())
    }

    fn history(&self, rules: &Rules) -> VmHistory<(), u8> {
        VmHistory::of(rules, self.journal.iter().map(|(k, e)| ((), *k, *e)))
    }
}

/// Things that must never happen, recorded as they happen (the properties read them).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ghost {
    /// Claims of each order, per agent.
    pub claims: [[u8; 2]; 2],
    /// An agent claimed an order after it was revoked there.
    pub claimed_revoked: bool,
    /// COMMITs of each order journalled, per agent.
    pub commits: [[u8; 2]; 2],
    /// A source journalled COMMIT without the destination's `Ready` verified.
    pub commit_without_gate: bool,
    /// A source ran the VM again while its journal did not say rolled back.
    pub resumed_unsettled: bool,
    /// A destination answered a settlement query to an agent that did not send the order.
    pub answered_other: bool,
    /// The source's VM was paused by its operator when it claimed the order, per order.
    pub paused_before: [bool; 2],
    /// A give-back ran a VM that was paused before its migration.
    pub ran_paused: bool,
    /// A source claimed a copy that arrived and never ran (QEMU shows it paused, as it shows a
    /// VM its operator paused): it would be handed over "paused as it was", which it was not.
    pub claimed_unrun: bool,
    /// A give-back left a VM stopped by the switch-over paused, as it was before.
    pub gave_back_paused: bool,
    /// The operator's `trustmig reconcile` did something: what a restart left to them, or
    /// came to before the restart's own reconciliation did.
    pub operator_reconciled: bool,
    /// The operator's `trustmig reconcile` did what no restart would have: it ran a VM whose
    /// `cont` failed after COMMIT (`Rules::vm_on_request`).
    pub operator_ran_a_commit: bool,
    /// A give-back's `cont` refused at first ran the VM when tried again in the background:
    /// the host and the order.
    pub ran_on_retry: Option<(usize, usize)>,
    /// A give-back of a VM paused before its migration, deferred to the retries, left it
    /// paused there.
    pub paused_on_retry: bool,
    /// The give-back retries on this host stopped without the VM running (`RetriesStop`).
    pub retries_stopped: Option<usize>,
    /// The operator's `trustmig reconcile` ran a VM whose give-back retries had stopped.
    pub operator_ran_after_retries: bool,
    /// A discard failed (QEMU refused its `quit`), the copy left loaded.
    pub discard_failed: bool,
}

/// The system.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Sys {
    /// Host A (0), where the VM starts, and host B (1).
    pub agents: [Agent; 2],
    /// Every message sent so far, with its order (deliverable any number of times).
    pub net: BTreeSet<(u8, Msg)>,
    /// Crashes left.
    pub crashes: u8,
    /// Operator overrides left.
    pub overrides: u8,
    /// The attacker's queries left.
    pub intrusions: u8,
    /// Revocations left.
    pub revocations: u8,
    /// Failing `cont`s after a destination's COMMIT left.
    pub cont_failures: u8,
    /// Give-backs whose `cont` QEMU refuses for now, left.
    pub cont_refusals: u8,
    /// Discards whose `quit` QEMU refuses, left.
    pub quit_refusals: u8,
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
    /// Overrides at any time an order is in doubt.
    Blind,
}

/// What can happen. `k` is an order (0: A to B, 1: B to A), `h` a host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// The network delivers order `k`'s `Msg` (again, late, or for the first time).
    Deliver(u8, Msg),
    /// Agent `h` takes its next own step in order `k` (a switch-over, a journal write made
    /// durable, a VM action, a message sent).
    Step(usize, u8),
    /// Agent `h`'s session of order `k` fails (cut, timeout, refused record, abort).
    Fail(usize, u8),
    /// Agent `h` crashes (SIGKILL, power): only its journal and its hypervisor survive.
    Crash(usize),
    /// Agent `h` starts again and settles what its journal shows interrupted.
    Restart(usize),
    /// Agent `h`, started again, brings its VM in line with the journal.
    Reconcile(usize),
    /// Agent `h`'s reconciliation after its restart gives up and leaves the VM to the operator
    /// (QEMU unreachable for a minute, `cont` refused): it does nothing.
    LeaveToOperator(usize),
    /// The operator's `trustmig reconcile` on agent `h`.
    OperatorReconcile(usize),
    /// From now on QEMU on host `h` refuses the next give-back's `cont` for a while.
    LockHeld(usize),
    /// From now on QEMU on host `h` refuses the next discard's `quit` (`quit_or_leave`): the
    /// loaded copy stays, held to its order by the journal, left to the operator.
    QuitRefused(usize),
    /// Agent `h` tries again, in the background, the `cont` of a give-back QEMU refused.
    RetryGiveBack(usize),
    /// Agent `h`'s retries of a give-back stop without the VM running (QEMU refused it for
    /// another reason, or did not listen for a minute): the VM stays stopped, left to the
    /// operator (`keep_trying`).
    RetriesStop(usize),
    /// Agent `h`'s `cont` after its COMMIT of order `k` fails for good (QEMU refused it for a
    /// step timeout, `start_committed`): its session ends, the VM loaded and not run, the
    /// record at COMMIT.
    ContFails(usize, u8),
    /// The source asks the destination about order `k`, in doubt.
    Ask(u8),
    /// The source's query about order `k` went unanswered (destination unreachable).
    Unanswered(u8),
    /// A third agent asks the destination about order `k`.
    Intrude(u8),
    /// `trustmig settle --resume-here` on order `k`'s source.
    ResumeHere(u8),
    /// `trustmig settle --moved` on order `k`'s source.
    Moved(u8),
    /// `trustmig order revoke` of order `k` on agent `h`.
    Revoke(usize, u8),
}

impl Action {
    /// What happens anyway under fairness once the network heals (the rest are faults,
    /// attacks and the operator, which may or may not happen).
    pub fn is_progress(&self) -> bool {
        matches!(
            self,
            Self::Deliver(..)
                | Self::Step(..)
                | Self::Fail(..)
                | Self::Restart(_)
                | Self::Reconcile(_)
                | Self::RetryGiveBack(_)
                | Self::Ask(_)
                // An operator told (by the refusal, by the log) what a start left to them.
                | Self::OperatorReconcile(_)
        )
    }
}

/// The model: the rules under test, how many orders, the faults' budget and the operator.
#[derive(Clone, Debug)]
pub struct Migration {
    /// The rules (possibly mutated).
    pub rules: Rules,
    /// Orders: 1 (A to B) or 2 (A to B, then B to A).
    pub orders: usize,
    /// Crashes allowed in a run.
    pub crashes: u8,
    /// The operator.
    pub operator: Operator,
    /// Give-backs whose `cont` QEMU refuses for now (`Action::LockHeld`), in a run.
    pub cont_refusals: u8,
    /// Discards whose `quit` QEMU refuses (`Action::QuitRefused`), in a run.
    pub quit_refusals: u8,
}

impl Migration {
    /// One order, the agent's own rules, `crashes` crashes, the operator as given; with an
    /// operator, one give-back's `cont` may be refused for now (what they see, and may not do,
    /// meanwhile), and one discard's `quit` refused (what they must then clear).
    pub fn new(rules: Rules, crashes: u8, operator: Operator) -> Self {
        Self {
            rules,
            orders: 1,
            crashes,
            operator,
            cont_refusals: u8::from(operator != Operator::None),
            quit_refusals: u8::from(operator != Operator::None),
        }
    }

    /// The VM moved there and back: two orders. Without refused `cont`s: with one, the
    /// exhaustive search over two orders grows from 4.1 to 12.3 million distinct states (400 s
    /// unoptimised; run once on 2026-11-30, before `RetriesStop`, nothing found); set
    /// `cont_refusals` to search so.
    pub fn there_and_back(self) -> Self {
        Self {
            orders: 2,
            cont_refusals: 0,
            quit_refusals: 0,
            ..self
        }
    }

    fn deliver(&self, s: &mut Sys, k: usize, m: Msg) {
        let h = match m {
            Msg::Order | Msg::Ready | Msg::Resumed | Msg::Answer { .. } => src(k),
            Msg::Begin | Msg::Final | Msg::Commit | Msg::Query { .. } => dst(k),
        };
        if !s.agents[h].up {
            return;
        }
        let rules = self.rules;
        let a = &mut s.agents[h];
        let outs = match m {
            // The claim records whether the VM is paused (the agent reads it from QEMU, where a
            // copy that arrived and never ran is paused too). A new order for a VM leaving here
            // under another, or whose copy here the journal does not give it, is refused
            // before its claim (`busy` in driver/source.rs).
            Msg::Order
                if matches!(a.vm, Vm::Running | Vm::Paused | Vm::Loaded)
                    && a.session(k).is_none() =>
            {
                let current = a.current_order(&rules).and_then(|c| a.latest(c));
                let busy = a.leaving(&rules) || a.arriving(h) || rules.holds_vm(current).is_err();
                if a.latest(k).is_none() && busy {
                    return;
                }
                let paused = a.vm != Vm::Running;
                let outs = a.sides[k]
                    .claim(Some(id(dst(k))), paused)
                    .unwrap_or_default();
                if !outs.is_empty() {
                    s.ghost.paused_before[k] = paused;
                    s.ghost.claimed_unrun |= a.vm == Vm::Loaded;
                }
                outs
            }
            // The handshake claims the order at the destination; its hypervisor is handed to
            // the order (`flag`) only when nothing of the VM is here (or only a copy sent away,
            // which the operator replaced by a waiting hypervisor) and it is not leaving here,
            // else the session is refused at once: the refusal is journalled, and nothing of
            // the VM here is touched (`receive_into`).
            Msg::Begin if a.session(k).is_none() => {
                let free = matches!(a.vm, Vm::Absent | Vm::SentAway) && !a.leaving(&rules);
                let side = &mut a.sides[k];
                let mut outs = side.claim(Some(id(src(k))), free).unwrap_or_default();
                if !free && !outs.is_empty() {
                    outs.extend(side.handle(Input::Failed));
                    outs.retain(|o| !matches!(o, Output::Vm(_)));
                }
                outs
            }
            Msg::Final if a.session(k) == Some(Phase::Transfer) => {
                a.vm = Vm::Loaded;
                a.sides[k].handle(Input::FinalVerified)
            }
            Msg::Ready => a.sides[k].handle(Input::Ready),
            Msg::Commit => a.sides[k].handle(Input::Commit),
            Msg::Resumed => a.sides[k].handle(Input::Resumed),
            Msg::Answer {
                to: Who::Source,
                committed,
            } => a.sides[k].handle(Input::Answer { committed }),
            Msg::Query { from } => {
                // An order the destination never received: it cannot tell who sent it, holds
                // nothing of it, and answers "no" to anyone (using the id up). The property is
                // about orders it received, whose source it knows.
                let received = a.entries(k).any(|e| e.peer == Some(id(src(k))));
                let outs = a.sides[k].query(&from.id(k)).unwrap_or_default();
                if from != Who::Source && received && !outs.is_empty() {
                    s.ghost.answered_other = true;
                }
                return self.run(s, h, k, outs);
            }
            _ => return,
        };
        self.run(s, h, k, outs);
    }

    /// Carry out agent `h`'s outputs for order `k`: a journal record is written at once (a
    /// crash before the machine hears it is durable is a crash after the write), messages go on
    /// the network, VM actions reach the hypervisor.
    fn run(&self, s: &mut Sys, h: usize, k: usize, outs: Vec<Output>) {
        let tag = k as u8;
        for o in outs {
            let a = &mut s.agents[h];
            match o {
                Output::Journal(e) => {
                    // A state onto the order's record as the journal has it (`Journal::set`):
                    // a discard may have changed it since the machine read it.
                    let e = match a.latest(k) {
                        Some(l) if e.state != J::Claimed => Entry {
                            state: e.state,
                            ..*l
                        },
                        _ => e,
                    };
                    match e.state {
                        J::Claimed => {
                            s.ghost.claims[k][h] += 1;
                            s.ghost.claimed_revoked |= revoked(a, k);
                        }
                        J::Committed => {
                            s.ghost.commits[k][h] += 1;
                            // The source's COMMIT needs the destination's `Ready`, which only
                            // exists once the destination sent it.
                            s.ghost.commit_without_gate |=
                                h == src(k) && !s.net.contains(&(tag, Msg::Ready));
                        }
                        _ => {}
                    }
                    a.journal.push((tag, e));
                    // The agent's machine reads the journal's record before every input.
                    a.sides[k].sync(Some(e));
                }
                Output::Send(sig) => {
                    s.net.insert((
                        tag,
                        match sig {
                            Signal::Ready => Msg::Ready,
                            Signal::Commit => Msg::Commit,
                            Signal::Resumed => Msg::Resumed,
                            Signal::Answer { to, committed } => Msg::Answer {
                                to: if to == id(src(k)) {
                                    Who::Source
                                } else {
                                    Who::Mallory
                                },
                                committed,
                            },
                        },
                    ));
                }
                Output::Vm(act) => vm_action(a, k, act, &mut s.ghost),
                // The model's `Ask` and `Unanswered` actions are the query's two outcomes.
                Output::Ask => {}
            }
        }
        // The source opened its session: it dials the destination.
        if h == src(k)
            && s.agents[h].session(k) == Some(Phase::Transfer)
            && !s.net.contains(&(tag, Msg::Begin))
        {
            s.net.insert((tag, Msg::Begin));
        }
    }

    /// Agent `h`'s next own step in order `k`: the record written last is durable; else the
    /// source's switch-over (the guest stops, the last bytes and the evidence go), or the
    /// destination's VM running after `cont`.
    fn step(&self, s: &mut Sys, h: usize, k: usize) {
        let a = &mut s.agents[h];
        if !a.up {
            return;
        }
        let outs = if a.sides[k].awaits_durable() {
            a.sides[k].handle(Input::Durable)
        } else {
            match (role(h, k), a.session(k)) {
                (Role::Source, Some(Phase::Transfer)) => {
                    a.vm = Vm::Stopped;
                    s.net.insert((k as u8, Msg::Final));
                    a.sides[k].handle(Input::SwitchedOver)
                }
                (Role::Destination, Some(Phase::Committed) | None) if a.vm == Vm::Running => {
                    a.sides[k].handle(Input::VmRunning)
                }
                _ => return,
            }
        };
        self.run(s, h, k, outs);
    }

    fn fail(&self, s: &mut Sys, h: usize, k: usize) {
        let a = &mut s.agents[h];
        if !a.up {
            return;
        }
        let outs = a.sides[k].handle(Input::Failed);
        self.run(s, h, k, outs);
    }

    /// Agent `h` starts: each order's machine settles what the journal shows of it, in the
    /// order the journal last wrote about them (`Journal::in_doubt`), with those writes only;
    /// then the VM is reconciled with its current order, by a step of its own.
    fn restart(&self, s: &mut Sys, h: usize) {
        let orders = self.orders;
        let a = &mut s.agents[h];
        a.up = true;
        // What each order's machine keeps of its records (a mutation forgets one).
        let mut kept = vec![0; orders];
        for (k, keep) in kept.iter_mut().enumerate() {
            let entries: Vec<Entry> = a.entries(k).copied().collect();
            *keep = self.rules.replay(&entries).len();
        }
        let mut seen = vec![0; orders];
        a.journal.retain(|(k, _)| {
            let k = usize::from(*k);
            seen[k] += 1;
            seen[k] <= kept[k]
        });
        let mut by_last_write: Vec<usize> = (0..orders).collect();
        by_last_write.sort_by_key(|k| a.journal.iter().rposition(|(o, _)| usize::from(*o) == *k));
        for k in by_last_write {
            let a = &mut s.agents[h];
            let entries: Vec<Entry> = a.entries(k).copied().collect();
            let x = Side::restart(self.rules, role(h, k), &entries);
            a.sides[k] = x.side;
            self.run(s, h, k, x.outputs);
        }
        let a = &mut s.agents[h];
        a.reconcile = a.current_order(&self.rules).and_then(|k| {
            let e = a.latest(k)?;
            match self.rules.vm_after_restart(e) {
                VmAction::Nothing => None,
                act => Some((k as u8, act)),
            }
        });
    }

    /// The restart's reconciliation, once what it journalled is durable: only if the order it
    /// read is still the VM's and no copy of it is arriving (`still_the_vms`).
    fn reconcile(&self, s: &mut Sys, h: usize) {
        let a = &mut s.agents[h];
        if !a.up || a.holding() {
            return;
        }
        // It waits while a copy arrives (its QMP let go): the arrival's order becomes the
        // VM's, or it fails.
        if a.arriving(h) {
            return;
        }
        let Some((k, act)) = a.reconcile.take() else {
            return;
        };
        let k = usize::from(k);
        if a.current_order(&self.rules) == Some(k) {
            vm_action(a, k, act, &mut s.ghost);
        }
    }

    /// The operator's `trustmig reconcile` (`backend/qemu/reconcile.rs` `by_operator`): only
    /// while no copy of the VM arrives, none leaves and no give-back is tried again in the
    /// background; then what the journal allows with the order it says the VM belongs to now
    /// (`Rules::vm_on_request`: a restart's action, and a destination left at COMMIT resumed).
    fn operator_reconcile(&self, s: &mut Sys, h: usize) {
        let a = &mut s.agents[h];
        if !a.up || a.arriving(h) || a.leaving(&self.rules) || a.resuming.is_some() {
            return;
        }
        let Some(k) = a.current_order(&self.rules) else {
            return;
        };
        let Some(current) = a.latest(k).copied() else {
            return;
        };
        let before = a.clone();
        let act = self.rules.vm_on_request(&current);
        vm_action(a, k, act, &mut s.ghost);
        let acted = *a != before;
        s.ghost.operator_reconciled |= acted;
        s.ghost.operator_ran_after_retries |=
            acted && a.vm == Vm::Running && s.ghost.retries_stopped == Some(h);
        s.ghost.operator_ran_a_commit |= acted && act != self.rules.vm_after_restart(&current);
    }

    /// The background retry of a give-back's refused `cont` (`cont_until_running`): it runs
    /// the VM while the journal still gives it to this host, else the retries stop.
    fn retry_give_back(&self, s: &mut Sys, h: usize) {
        let a = &mut s.agents[h];
        // A crash ended the retries (it clears this).
        let Some((k, paused_before)) = a.resuming.take() else {
            return;
        };
        let k = usize::from(k);
        if a.still_ours(&self.rules) {
            let before = a.vm;
            give_back(a, k, paused_before, &mut s.ghost);
            if a.vm == Vm::Running && before != Vm::Running {
                s.ghost.ran_on_retry = Some((h, k));
            }
            s.ghost.paused_on_retry |= paused_before && a.vm == Vm::Paused;
        }
    }

    fn cont_fails(&self, s: &mut Sys, h: usize, k: usize) {
        let a = &mut s.agents[h];
        let committed = a.session(k) == Some(Phase::Committed) && a.sides[k].awaits_durable();
        if !a.up || role(h, k) != Role::Destination || !committed {
            return;
        }
        let mut outs: Vec<Output> = (a.sides[k].handle(Input::Durable).into_iter())
            .filter(|o| *o != Output::Vm(VmAction::Resume))
            .collect();
        outs.extend(a.sides[k].handle(Input::Failed));
        s.cont_failures -= 1;
        self.run(s, h, k, outs);
    }

    fn operator(&self, s: &mut Sys, k: usize, how: Settle) {
        // What the operator can see on the destination host: the order used up there, never
        // to commit (rolled back), or committed there.
        let there = s.agents[dst(k)].latest(k).map(|e| e.state);
        let informed_ok = match how {
            Settle::OperatorResumeHere => there == Some(J::RolledBack),
            _ => matches!(there, Some(J::Committed | J::Done | J::Settled)),
        };
        if self.operator == Operator::None
            || (self.operator == Operator::Informed && !informed_ok)
            || s.overrides == 0
        {
            return;
        }
        let a = &mut s.agents[src(k)];
        // Only an order whose destination is being asked can be settled by hand.
        if !a.up || !a.asking(k) {
            return;
        }
        if let Ok(outs) = a.sides[k].operator(how) {
            if !outs.is_empty() {
                s.overrides -= 1;
            }
            self.run(s, src(k), k, outs);
        }
    }
}

/// Do what order `k`'s machine (or a restart's reconciliation by it) said to its host's VM.
fn vm_action(a: &mut Agent, k: usize, act: VmAction, ghost: &mut Ghost) {
    match act {
        // A paused VM given back before the switch-over stopped it: running it (`cont`) is
        // as wrong as after. A copy sent away is stopped by its migration too (`postmigrate`),
        // and a give-back would run it. A loaded copy a source claimed (as paused: QEMU shows
        // it so) was the VM, committed here, whose `cont` failed: given back, it is the VM,
        // paused, as QEMU holds it.
        //
        // A `cont` QEMU refuses for now (`refuse_cont`) leaves the VM stopped as it is and
        // the give-back to the background's retries (`resuming`). Only a VM the migration
        // stopped gets a `cont` (`attempt` leaves any other state alone).
        // A give-back QEMU does not settle at once (`refuse_cont`) goes to the retries, whether
        // the VM was paused before or not: QEMU's answer may be late before the agent looks at
        // what the guest was (the agent carries it into every retry).
        VmAction::GiveBack { paused_before } => {
            if a.refuse_cont && matches!(a.vm, Vm::Stopped | Vm::SentAway | Vm::Paused) {
                a.refuse_cont = false;
                a.resuming = Some((k as u8, paused_before));
            } else {
                give_back(a, k, paused_before, ghost);
            }
        }
        VmAction::Forget if a.vm == Vm::Stopped => a.vm = Vm::SentAway,
        // Only a copy that arrived and never ran (`holds_incoming`, and the destination driver
        // discards only the QEMU it was handed); either way the order holds no hypervisor
        // any more, and the journal says so (`Journal::mark_discarded`).
        // A `quit` QEMU refuses leaves the copy loaded and the journal as it was: the order
        // still holds that hypervisor, to be discarded by the next reconciliation (the
        // operator's, or a restart's), and no order may send or claim the VM over it.
        VmAction::Discard if a.refuse_quit && a.vm == Vm::Loaded => {
            a.refuse_quit = false;
            ghost.discard_failed = true;
        }
        VmAction::Discard => {
            if a.vm == Vm::Loaded {
                a.vm = Vm::Absent;
            }
            if let Some(e) = a.latest(k).filter(|e| e.flag).copied() {
                a.journal.push((k as u8, Entry { flag: false, ..e }));
                // The machine's record as it stands, less the hypervisor (it may have moved on
                // to a rollback the journal is about to get).
                if let Some(mine) = a.sides[k].entry().copied() {
                    a.sides[k].sync(Some(Entry {
                        flag: false,
                        ..mine
                    }));
                }
            }
        }
        // A QEMU that sent the VM away reports its migration completed and is stopped, as one
        // that received it does. The agent resumes only the latter; the model lets a
        // resume run either, so the journal's reading is checked without that guard.
        VmAction::Resume if matches!(a.vm, Vm::Loaded | Vm::Stopped | Vm::SentAway) => {
            a.vm = Vm::Running
        }
        _ => {}
    }
}

/// Give the VM back on `a` for order `k`: run it, or leave it paused if it was before (a
/// copy that runs already is left so). A give-back retried in the background is done then.
fn give_back(a: &mut Agent, k: usize, paused_before: bool, ghost: &mut Ghost) {
    if !matches!(a.vm, Vm::Stopped | Vm::Paused | Vm::SentAway | Vm::Loaded) {
        return;
    }
    a.resuming = None;
    if matches!(a.vm, Vm::Stopped | Vm::SentAway) {
        if a.latest(k).map(|e| e.state) != Some(J::RolledBack) {
            ghost.resumed_unsettled = true;
        }
        ghost.gave_back_paused |= paused_before;
    }
    ghost.ran_paused |= ghost.paused_before[k] && !paused_before;
    a.vm = if paused_before {
        Vm::Paused
    } else {
        Vm::Running
    };
}

impl Model for Migration {
    type State = Sys;
    type Action = Action;

    /// The VM on host A, running or paused by its operator (the paused hand-over); the
    /// operator's orders sent.
    fn init_states(&self) -> Vec<Sys> {
        [Vm::Running, Vm::Paused]
            .into_iter()
            .map(|vm| Sys {
                agents: [
                    Agent::new(self.rules, 0, self.orders, vm),
                    Agent::new(self.rules, 1, self.orders, Vm::Absent),
                ],
                net: (0..self.orders as u8).map(|k| (k, Msg::Order)).collect(),
                crashes: self.crashes,
                overrides: 1,
                intrusions: 1,
                revocations: 1,
                cont_failures: u8::from(self.operator != Operator::None),
                cont_refusals: self.cont_refusals,
                quit_refusals: self.quit_refusals,
                ghost: Ghost::default(),
            })
            .collect()
    }

    fn actions(&self, s: &Sys, out: &mut Vec<Action>) {
        out.extend(s.net.iter().map(|(k, m)| Action::Deliver(*k, *m)));
        for h in 0..2 {
            for k in 0..self.orders as u8 {
                out.push(Action::Step(h, k));
                out.push(Action::Fail(h, k));
            }
            let a = &s.agents[h];
            if a.up {
                if s.crashes > 0 {
                    out.push(Action::Crash(h));
                }
                if a.reconcile.is_some() {
                    out.push(Action::Reconcile(h));
                    if self.operator != Operator::None {
                        out.push(Action::LeaveToOperator(h));
                    }
                }
                if self.operator != Operator::None {
                    out.push(Action::OperatorReconcile(h));
                }
                if a.resuming.is_some() {
                    out.push(Action::RetryGiveBack(h));
                    out.push(Action::RetriesStop(h));
                }
                if s.cont_refusals > 0
                    && !a.refuse_cont
                    && matches!(a.vm, Vm::Stopped | Vm::SentAway | Vm::Paused)
                {
                    out.push(Action::LockHeld(h));
                }
                if s.quit_refusals > 0 && !a.refuse_quit && a.vm == Vm::Loaded {
                    out.push(Action::QuitRefused(h));
                }
            } else {
                out.push(Action::Restart(h));
            }
        }
        for k in 0..self.orders {
            let t = k as u8;
            let a = &s.agents[src(k)];
            if a.up && a.asking(k) {
                out.extend([Action::Ask(t), Action::Unanswered(t)]);
                if self.operator != Operator::None && s.overrides > 0 {
                    out.extend([Action::ResumeHere(t), Action::Moved(t)]);
                }
            }
            if s.intrusions > 0 {
                out.push(Action::Intrude(t));
            }
            if s.revocations > 0 {
                out.extend([Action::Revoke(0, t), Action::Revoke(1, t)]);
            }
            if s.cont_failures > 0 {
                out.push(Action::ContFails(dst(k), t));
            }
        }
    }

    fn next_state(&self, last: &Sys, action: Action) -> Option<Sys> {
        let mut s = last.clone();
        match action {
            Action::Deliver(k, m) => self.deliver(&mut s, k.into(), m),
            Action::Step(h, k) => self.step(&mut s, h, k.into()),
            Action::Fail(h, k) => self.fail(&mut s, h, k.into()),
            Action::Crash(h) => {
                s.crashes -= 1;
                let a = &mut s.agents[h];
                a.up = false;
                // What the machines held in memory is gone; the restart makes new ones.
                for side in &mut a.sides {
                    *side = Side::new(self.rules, side.role());
                }
                a.reconcile = None;
                a.resuming = None;
            }
            Action::Restart(h) => self.restart(&mut s, h),
            Action::Reconcile(h) => self.reconcile(&mut s, h),
            Action::LeaveToOperator(h) => s.agents[h].reconcile = None,
            Action::OperatorReconcile(h) => self.operator_reconcile(&mut s, h),
            Action::RetryGiveBack(h) => self.retry_give_back(&mut s, h),
            Action::RetriesStop(h) => {
                s.agents[h].resuming = None;
                s.ghost.retries_stopped = Some(h);
            }
            Action::LockHeld(h) => {
                s.cont_refusals -= 1;
                s.agents[h].refuse_cont = true;
            }
            Action::QuitRefused(h) => {
                s.quit_refusals -= 1;
                s.agents[h].refuse_quit = true;
            }
            Action::ContFails(h, k) => self.cont_fails(&mut s, h, k.into()),
            Action::Ask(k) => {
                s.net.insert((k, Msg::Query { from: Who::Source }));
            }
            Action::Unanswered(k) => {
                let outs = s.agents[src(k.into())].sides[usize::from(k)].handle(Input::Unanswered);
                // Asking again is the `Ask` action's business.
                let outs = outs.into_iter().filter(|o| *o != Output::Ask).collect();
                self.run(&mut s, src(k.into()), k.into(), outs);
            }
            Action::Intrude(k) => {
                s.intrusions -= 1;
                s.net.insert((k, Msg::Query { from: Who::Mallory }));
            }
            Action::Revoke(h, k) => {
                let a = &mut s.agents[h];
                if let (true, Ok(outs)) = (a.up, a.sides[usize::from(k)].revoke()) {
                    s.revocations -= 1;
                    self.run(&mut s, h, k.into(), outs);
                }
            }
            Action::ResumeHere(k) => self.operator(&mut s, k.into(), Settle::OperatorResumeHere),
            Action::Moved(k) => self.operator(&mut s, k.into(), Settle::OperatorMoved),
        }
        // An action that changes nothing is not a step (keeps the graph free of self-loops).
        (s != *last).then_some(s)
    }

    /// Keeps a mutation that claims replayed orders again from growing the journal forever.
    /// (a second claim is the violation already: nothing past it needs exploring).
    fn within_boundary(&self, s: &Sys) -> bool {
        s.agents.iter().all(|a| a.journal.len() <= 8 * self.orders)
            && s.ghost.claims.iter().flatten().all(|c| *c <= 2)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        let mut props = vec![
            Property::always("never two live copies", |_, s: &Sys| live(s) <= 1),
            Property::always("the VM is never lost", |_, s: &Sys| {
                s.agents.iter().any(|a| !gone(a.vm))
            }),
            Property::always(
                "an order commits at most once on each side",
                |_, s: &Sys| s.ghost.commits.iter().flatten().all(|c| *c <= 1),
            ),
            Property::always(
                "an order is claimed at most once on each side, never once revoked",
                |_, s: &Sys| {
                    s.ghost.claims.iter().flatten().all(|c| *c <= 1) && !s.ghost.claimed_revoked
                },
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
            Property::always(
                "a copy that arrived and never ran is never sent on",
                |_, s: &Sys| !s.ghost.claimed_unrun,
            ),
            // Examples the search must reach, or the model proves nothing (SPEC.md §8.9).
            Property::sometimes("the VM moves", |_, s: &Sys| {
                settled(s) && s.agents[1].vm == Vm::Running && gone(s.agents[0].vm)
            }),
            Property::sometimes("a failed migration rolls back", |_, s: &Sys| {
                settled(s)
                    && s.agents[0].vm == Vm::Running
                    && s.agents[0].latest(0).map(|e| e.state) == Some(J::RolledBack)
            }),
            Property::sometimes(
                "a failed migration of a paused VM gives it back paused",
                |_, s: &Sys| {
                    settled(s)
                        && s.ghost.gave_back_paused
                        && s.agents[0].vm == Vm::Paused
                        && s.agents[0].latest(0).map(|e| e.state) == Some(J::RolledBack)
                },
            ),
            Property::sometimes(
                "an order in doubt is settled by asking: moved",
                |_, s: &Sys| {
                    journal_is(&s.agents[0], 0, &[J::Claimed, J::Committed, J::Done])
                        && gone(s.agents[0].vm)
                        && s.net.contains(&(
                            0,
                            Msg::Answer {
                                to: Who::Source,
                                committed: true,
                            },
                        ))
                },
            ),
            Property::sometimes(
                "an order in doubt is settled by asking: given back",
                |_, s: &Sys| {
                    journal_is(&s.agents[0], 0, &[J::Claimed, J::Committed, J::RolledBack])
                        && s.agents[0].vm == Vm::Running
                },
            ),
            Property::sometimes(
                "a restarted destination resumes what it committed",
                |_, s: &Sys| {
                    journal_is(&s.agents[1], 0, &[J::Claimed, J::Committed, J::Settled])
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
        ];
        if self.operator != Operator::None {
            props.push(Property::sometimes(
                "the operator reconciles what a restart left to them",
                |_, s: &Sys| s.ghost.operator_reconciled && settled(s) && live(s) == 1,
            ));
            props.push(Property::sometimes(
                "a VM whose cont failed after COMMIT runs once the operator reconciles it",
                |_, s: &Sys| {
                    s.ghost.operator_ran_a_commit
                        && settled(s)
                        && s.agents[dst(0)].vm == Vm::Running
                        && s.agents[dst(0)].latest(0).map(|e| e.state) == Some(J::Done)
                },
            ));
        }
        if self.quit_refusals > 0 {
            props.push(Property::sometimes(
                "a copy whose discard failed is discarded by a later reconciliation",
                |_, s: &Sys| {
                    s.ghost.discard_failed
                        && settled(s)
                        && live(s) == 1
                        && s.agents.iter().all(|a| a.vm != Vm::Loaded)
                },
            ));
        }
        if self.cont_refusals > 0 {
            props.push(Property::sometimes(
                "a give-back whose retries stopped runs once the operator reconciles it",
                |_, s: &Sys| s.ghost.operator_ran_after_retries && settled(s) && live(s) == 1,
            ));
            props.push(Property::sometimes(
                "a paused VM's give-back that QEMU did not settle at once leaves it paused on a retry",
                |_, s: &Sys| {
                    s.ghost.paused_on_retry
                        && settled(s)
                        && s.agents[0].vm == Vm::Paused
                        && s.agents[0].latest(0).map(|e| e.state) == Some(J::RolledBack)
                },
            ));
            props.push(Property::sometimes(
                "a give-back whose cont QEMU refused at first runs the VM on a retry",
                |_, s: &Sys| {
                    s.ghost.ran_on_retry == Some((0, 0))
                        && settled(s)
                        && s.agents[0].vm == Vm::Running
                        && s.agents[0].latest(0).map(|e| e.state) == Some(J::RolledBack)
                },
            ));
        }
        if self.orders == 2 {
            props.extend([
                Property::sometimes("the VM moves there and back", |_, s: &Sys| {
                    settled(s)
                        && s.agents[0].vm == Vm::Running
                        && gone(s.agents[1].vm)
                        && s.agents
                            .iter()
                            .all(|a| a.latest(1).map(|e| e.state) == Some(J::Done))
                }),
                // The interleaving the two orders exist for: the VM leaves again once its
                // arrival, interrupted by a restart here, was settled and resumed (DONE). It
                // cannot leave before (`Rules::holds_vm`): with that rule broken
                // (`SendWhatDidNotRun`) an arrival settled after the VM left again took it
                // back (`LatestOrderOwnsVm`).
                Property::sometimes(
                    "an arrival settled at a restart leaves again once resumed",
                    |_, s: &Sys| {
                        let b = &s.agents[1];
                        let at = |k: u8, st: J| {
                            (b.journal.iter()).position(|(o, e)| *o == k && e.state == st)
                        };
                        settled(s)
                            && at(0, J::Settled).is_some()
                            && at(0, J::Done).is_some_and(|done| at(1, J::Committed) > Some(done))
                            && b.latest(1).map(|e| e.state) == Some(J::Done)
                            && gone(b.vm)
                            && s.agents[0].vm == Vm::Running
                    },
                ),
            ]);
        }
        props
    }
}

fn revoked(a: &Agent, k: usize) -> bool {
    a.entries(k).any(|e| e.state == J::Revoked)
}

fn journal_is(a: &Agent, k: usize, states: &[J]) -> bool {
    a.entries(k).map(|e| e.state).eq(states.iter().copied())
}

/// Nothing of the VM there, or only a copy sent away.
fn gone(vm: Vm) -> bool {
    matches!(vm, Vm::Absent | Vm::SentAway)
}

/// Copies of the VM that are the VM: running, or paused by its operator.
fn live(s: &Sys) -> usize {
    (s.agents.iter())
        .filter(|a| matches!(a.vm, Vm::Running | Vm::Paused))
        .count()
}

fn settled(s: &Sys) -> bool {
    s.agents.iter().all(|a| {
        a.up && a.reconcile.is_none()
            && a.resuming.is_none()
            && !a.holding()
            && (0..a.sides.len()).all(|k| !a.asking(k) && a.session(k).is_none())
    })
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
