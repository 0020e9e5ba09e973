//! The model checker over the settlement rules (SPEC.md §8.9): every property holds with the
//! agent's own rules, crashes, a lossy and replaying network, an attacker and an informed
//! operator; a blind operator and each deliberate mistake in the rules are caught, with the
//! trace printed as steps.
//!
//! Budget: exhaustive breadth-first search of the whole state space with up to
//! `TRUSTMIG_MODEL_CRASHES` crashes (default 3) for one order, `TRUSTMIG_MODEL_CRASHES_TWO`
//! (default 2) for two orders of the VM (there and back: the state space grows by about its
//! square; with an operator, a give-back's refused `cont` only with
//! `TRUSTMIG_MODEL_REFUSALS_TWO=1`, three times the states), then random walks of both from seed
//! `TRUSTMIG_MODEL_SEED` (default 1). A longer
//! run: `TRUSTMIG_MODEL_CRASHES=8 TRUSTMIG_MODEL_CRASHES_TWO=3 TRUSTMIG_MODEL_WALKS=1000000
//! cargo test --release -p trustmig-tests --test model -- --nocapture`.

use stateright::{Checker, Expectation, Model};
use trustmig_protocol::settlement::{Mutation, Rules};
use trustmig_tests::model::{Action, Migration, Operator, Sys};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn crashes() -> u8 {
    env("TRUSTMIG_MODEL_CRASHES", 3) as u8
}

fn crashes_over_two_orders() -> u8 {
    env("TRUSTMIG_MODEL_CRASHES_TWO", 2) as u8
}

/// A violation's trace as readable steps.
fn explain(
    m: &Migration,
    name: &str,
    path: stateright::Path<<Migration as Model>::State, <Migration as Model>::Action>,
) -> String {
    explain_steps(m, name, path.into_vec())
}

/// A trace as readable steps: what each agent holds, then the action taken.
fn explain_steps(m: &Migration, name: &str, steps: Vec<(Sys, Option<Action>)>) -> String {
    let mut out = format!("violated: {name}\n");
    for (i, (s, a)) in steps.into_iter().enumerate() {
        let agents: Vec<String> = s
            .agents
            .iter()
            .zip(["A", "B"])
            .map(|(a, who)| {
                let orders: Vec<String> = (0..m.orders)
                    .map(|k| {
                        format!(
                            "order {k}: journal={:?} session={:?}{}",
                            a.entries(k).map(|e| e.state).collect::<Vec<_>>(),
                            a.session(k),
                            if a.asking(k) { " asking" } else { "" }
                        )
                    })
                    .collect();
                format!(
                    "{who}: {} vm={:?}{} {}",
                    if a.up { "up" } else { "DOWN" },
                    a.vm,
                    a.reconcile.map_or(String::new(), |(k, act)| format!(
                        " reconciling(order {k}: {act:?})"
                    )) + &a.resuming.map_or(String::new(), |(k, paused)| format!(
                        " retrying the give-back of order {k}{}",
                        if paused { " (paused before)" } else { "" }
                    )) + if a.refuse_cont {
                        " (its next give-back not settled at once)"
                    } else {
                        ""
                    } + if a.refuse_quit {
                        " (its next quit refused)"
                    } else {
                        ""
                    },
                    orders.join(", ")
                )
            })
            .collect();
        out += &format!("  {i:>2}. {}\n", agents.join(" | "));
        if let Some(a) = a {
            out += &format!("      -> {}\n", m.format_action(&a));
        }
    }
    out
}

/// The safety properties' names (the rest are examples the search must reach).
fn safety(m: &Migration) -> Vec<&'static str> {
    (m.properties().iter())
        .filter(|p| p.expectation == Expectation::Always)
        .map(|p| p.name)
        .collect()
}

/// Check `m` exhaustively; returns each violated property with its trace. Every example
/// (`sometimes`) must be reached, or the model is vacuous.
fn check(m: Migration) -> Vec<(&'static str, String)> {
    let props = safety(&m);
    // One thread: breadth-first in order, so a trace is a shortest one.
    let c = m.clone().checker().spawn_bfs().join();
    println!(
        "model ({} orders, {:?}, {} crashes): {} states, {} unique, depth {}",
        m.orders,
        m.operator,
        m.crashes,
        c.state_count(),
        c.unique_state_count(),
        c.max_depth()
    );
    assert!(
        c.is_done(),
        "the search ended before it covered every state"
    );
    // The examples must be reached with the agent's rules; a mutation may well make one
    // unreachable (one that runs what was paused never gives it back paused).
    for e in m.properties() {
        if e.expectation == Expectation::Sometimes && m.rules == Rules::default() {
            assert!(c.discovery(e.name).is_some(), "never reached: {}", e.name);
        }
    }
    props
        .into_iter()
        .filter_map(|p| Some((p, explain(&m, p, c.discovery(p)?))))
        .collect()
}

#[test]
fn the_agents_rules_keep_every_property_exhaustively() {
    for operator in [Operator::None, Operator::Informed] {
        let found = check(Migration::new(Rules::default(), crashes(), operator));
        let traces: Vec<&str> = found.iter().map(|(_, t)| t.as_str()).collect();
        assert!(found.is_empty(), "{}", traces.join("\n"));
    }
}

/// Random walks from the initial state with a larger crash budget than the exhaustive search:
/// each walk takes a random enabled step until nothing more happens (or 200 steps), checking
/// every safety property at every state. A violation prints its walk.
#[test]
fn random_walks_find_nothing_either() {
    let one = Migration::new(Rules::default(), crashes() + 3, Operator::Informed);
    let two = Migration::new(
        Rules::default(),
        crashes_over_two_orders() + 3,
        Operator::Informed,
    );
    walk(one);
    // Refused `cont`s and `quit`s too, which the exhaustive search over two orders leaves out
    // for time.
    walk(Migration {
        cont_refusals: 1,
        quit_refusals: 1,
        ..two.there_and_back()
    });
}

fn walk(m: Migration) {
    let seed = env("TRUSTMIG_MODEL_SEED", 1) as u64;
    let walks = env("TRUSTMIG_MODEL_WALKS", 20_000);
    let props: Vec<_> = (m.properties().into_iter())
        .filter(|p| p.expectation == Expectation::Always)
        .collect();
    // xorshift64*: reproducible from the seed, no dependency.
    let mut x = seed.max(1);
    let mut next = move |n: usize| {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
    };
    let mut steps = 0usize;
    let starts = m.init_states();
    for w in 0..walks {
        // Both starting states in turn: the VM running, or paused by its operator.
        let mut s = starts[w % starts.len()].clone();
        let mut trace = vec![(s.clone(), None)];
        for _ in 0..200 * m.orders {
            let next_steps = m.next_steps(&s);
            if next_steps.is_empty() {
                break;
            }
            let (a, t) = next_steps[next(next_steps.len())].clone();
            trace.last_mut().expect("trace").1 = Some(a);
            trace.push((t.clone(), None));
            s = t;
            steps += 1;
            if let Some(p) = props.iter().find(|p| !(p.condition)(&m, &s)) {
                panic!("{}", explain_steps(&m, p.name, trace));
            }
        }
    }
    println!(
        "random walks ({} orders, seed {seed}, {} crashes): {walks} walks, {steps} steps",
        m.orders, m.crashes
    );
}

/// `--resume-here` after the destination committed, or `--moved` when it never did: the
/// model shows what the CLI and SPEC.md §8.8 warn of.
#[test]
fn a_blind_operator_override_can_break_safety() {
    let found = check(Migration::new(Rules::default(), crashes(), Operator::Blind));
    let names: Vec<&str> = found.iter().map(|(n, _)| *n).collect();
    for (_, t) in &found {
        println!("{t}");
    }
    assert!(names.contains(&"never two live copies"), "{names:?}");
    assert!(names.contains(&"the VM is never lost"), "{names:?}");
}

/// One order, the mutated rules, no operator: `property` must be violated.
fn caught(mutation: Mutation, property: &str) {
    caught_in(
        Migration::new(Rules::mutated(mutation), crashes(), Operator::None),
        property,
    );
}

/// The model `m` (with mutated rules) violates `property`; its trace is printed.
fn caught_in(m: Migration, property: &str) {
    let mutation = m.rules;
    let found = check(m);
    let trace = found
        .iter()
        .find(|(n, _)| *n == property)
        .map(|(_, t)| t.clone())
        .unwrap_or_else(|| {
            panic!(
                "{mutation:?} not caught as {property:?}; found {:?}",
                found.iter().map(|(n, _)| *n).collect::<Vec<_>>()
            )
        });
    println!("{mutation:?}:\n{trace}");
}

#[test]
fn mutation_resume_on_an_unanswered_query_is_caught() {
    caught(Mutation::ResumeOnUnanswered, "never two live copies");
}

#[test]
fn mutation_commit_before_ready_is_caught() {
    caught(
        Mutation::CommitBeforeReady,
        "COMMIT only after the destination's Ready verified",
    );
}

#[test]
fn mutation_answer_anyone_is_caught() {
    caught(
        Mutation::AnswerAnyone,
        "a settlement answer about an order received goes only to its source",
    );
}

#[test]
fn mutation_accept_a_replayed_order_is_caught() {
    caught(
        Mutation::AcceptReplayedOrder,
        "an order is claimed at most once on each side, never once revoked",
    );
}

#[test]
fn mutation_keep_what_arrived_at_restart_is_caught() {
    caught(
        Mutation::KeepArrivedAtRestart,
        "once nothing more happens: no loaded copy is left behind",
    );
}

#[test]
fn mutation_run_what_was_paused_is_caught() {
    caught(
        Mutation::RunWhatWasPaused,
        "a VM paused before its migration is never run by a give-back",
    );
}

#[test]
fn mutation_forget_a_record_at_restart_is_caught() {
    caught(Mutation::ForgetAtRestart, "never two live copies");
}

/// The VM there and back (two orders, A to B then B to A): every property holds with the
/// agent's own rules; the second order may come at any moment of the first.
#[test]
fn the_agents_rules_keep_every_property_over_two_orders() {
    let crashes = crashes_over_two_orders();
    for operator in [Operator::None, Operator::Informed] {
        let m = Migration::new(Rules::default(), crashes, operator).there_and_back();
        // TRUSTMIG_MODEL_REFUSALS_TWO=1: with a refused give-back `cont` too (12 million
        // distinct states).
        let refusals = env("TRUSTMIG_MODEL_REFUSALS_TWO", 0) as u8;
        let m = Migration {
            cont_refusals: refusals * u8::from(operator != Operator::None),
            ..m
        };
        let found = check(m);
        let traces: Vec<&str> = found.iter().map(|(_, t)| t.as_str()).collect();
        assert!(found.is_empty(), "{}", traces.join("\n"));
    }
}

/// Defence in depth: the VM's order is the one that last moved it, not the one that wrote
/// last. With the agent's rules the VM cannot leave a host before its arrival there is DONE,
/// so no arrival is settled after it left; once that rule is broken too, the mistake shows.
#[test]
fn mutation_latest_order_owns_the_vm_is_caught_over_two_orders() {
    let m = Migration::new(
        Rules::mutated(Mutation::LatestOrderOwnsVm).and(Mutation::SendWhatDidNotRun),
        // One crash is enough to reach it, and keeps the search short.
        1,
        Operator::None,
    )
    .there_and_back();
    caught_in(m, "never two live copies");
}

/// A source that sends a copy committed here whose `cont` QEMU refused for good: QEMU shows it
/// paused, and it would be handed over "paused as it was", which it was not.
#[test]
fn mutation_send_what_did_not_run_is_caught_over_two_orders() {
    let m = Migration::new(
        Rules::mutated(Mutation::SendWhatDidNotRun),
        1,
        Operator::Informed,
    )
    .there_and_back();
    caught_in(m, "a copy that arrived and never ran is never sent on");
}

/// A source that sends a copy that arrived and never committed here (QEMU shows it paused,
/// the journal says it is to be discarded) while the VM runs where it came from.
#[test]
fn mutation_send_what_arrived_is_caught_over_two_orders() {
    let m = Migration::new(Rules::mutated(Mutation::SendWhatArrived), 1, Operator::None)
        .there_and_back();
    caught_in(m, "never two live copies");
}
