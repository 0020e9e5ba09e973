//! The model checker over the settlement rules (SPEC.md §8.9): every property holds with the
//! agent's own rules, crashes, a lossy and replaying network, an attacker and an informed
//! operator; a blind operator and each deliberate mistake in the rules are caught, with the
//! trace printed as steps.
//!
//! Budget: exhaustive breadth-first search of the whole state space with up to
//! `TRUSTMIG_MODEL_CRASHES` crashes (default 3), then random walks from seed
//! `TRUSTMIG_MODEL_SEED` (default 1). A longer run: `TRUSTMIG_MODEL_CRASHES=8
//! TRUSTMIG_MODEL_WALKS=1000000 cargo test --release -p trustmig-tests --test model -- --nocapture`.

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
            .zip(["source", "destination"])
            .map(|(a, who)| {
                format!(
                    "{who}: {} vm={:?} journal={:?} session={:?}{}",
                    if a.up { "up" } else { "DOWN" },
                    a.vm,
                    a.journal.iter().map(|e| e.state).collect::<Vec<_>>(),
                    a.session(),
                    if a.asking() { " asking" } else { "" }
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
        "model ({:?}, {} crashes): {} states, {} unique, depth {}",
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
    let seed = env("TRUSTMIG_MODEL_SEED", 1) as u64;
    let walks = env("TRUSTMIG_MODEL_WALKS", 20_000);
    let m = Migration::new(Rules::default(), crashes() + 3, Operator::Informed);
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
    for _ in 0..walks {
        let mut s = m.init_states().remove(0);
        let mut trace = vec![(s.clone(), None)];
        for _ in 0..200 {
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
        "random walks (seed {seed}, {} crashes): {walks} walks, {steps} steps",
        m.crashes
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

fn caught(mutation: Mutation, property: &str) {
    let found = check(Migration::new(
        Rules::mutated(mutation),
        crashes(),
        Operator::None,
    ));
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
