//! After a restart, each VM's hypervisor state is brought in line with its journal (SPEC.md
//! §8.8, spec/qemu.md §4). A crash can stop an agent between any two steps of a migration, and
//! the hypervisor keeps what the migration did to it: a source QEMU stopped in `postmigrate`, a
//! destination QEMU that loaded the VM and waits, paused. The journal says what may happen to
//! it ([`action`], a pure function of the records); the backend looks at what the hypervisor
//! actually holds and does it (`backend::qemu::reconcile` for QEMU). Synthetic guests live in the
//! agent's process and start from the journal alone (`daemon/start.rs`). A VM whose order may have
//! committed and whose outcome the source does not know is never touched here: that is the
//! settlement's decision (`settle.rs`).

use std::collections::HashMap;

use trustmig_protocol::settlement::Rules;

use crate::journal::{Record, State};

/// What the journal allows for a VM after a restart (the settlement rules decide it).
pub use trustmig_protocol::settlement::VmAction as Action;

/// What to do for a VM whose most recent order left `last` in the journal, as `rules` say.
/// `interrupted` maps the orders this start found unfinished (hex id) to the state they were
/// in before they were settled from the journal (`Claimed` or `Committed`).
pub fn action(rules: Rules, last: Option<&Record>, interrupted: &HashMap<String, State>) -> Action {
    let Some(r) = last else {
        return Action::Nothing;
    };
    rules.vm_after_restart(&r.entry(), interrupted.get(&r.order_id).copied())
}

#[cfg(test)]
mod tests {
    use super::*;
    use trustmig_protocol::order::Role;

    fn record(role: Role, state: State, flag: bool) -> Record {
        let mut r: Record = serde_json::from_value(serde_json::json!({
            "order_id": "0101", "role": role, "vm": "vm", "state": state,
            "not_after": 0, "at": 0,
        }))
        .expect("record");
        // The one flag of each role: paused before (source), QEMU handed over (destination).
        r.paused_before = flag && role == Role::Source;
        r.fed = flag && role == Role::Destination;
        r
    }

    #[test]
    fn the_journal_decides_what_a_restart_does_to_the_vm() {
        use Role::{Destination as D, Source as S};
        let now = |s: State| HashMap::from([("0101".to_string(), s)]);
        let none = HashMap::new();
        let cases = [
            // A source rolled back now, at an earlier start, or settled "not committed".
            (
                S,
                State::RolledBack,
                now(State::Claimed),
                false,
                Action::GiveBack {
                    paused_before: false,
                },
            ),
            (
                S,
                State::RolledBack,
                none.clone(),
                false,
                Action::GiveBack {
                    paused_before: false,
                },
            ),
            (
                S,
                State::RolledBack,
                none.clone(),
                true,
                Action::GiveBack {
                    paused_before: true,
                },
            ),
            // A source at COMMIT is in doubt: only the destination's answer decides.
            (S, State::Committed, none.clone(), false, Action::Nothing),
            (S, State::Done, none.clone(), false, Action::Nothing),
            (
                S,
                State::Settled,
                now(State::Committed),
                false,
                Action::Nothing,
            ),
            // A destination interrupted before COMMIT discards; after it, resumes.
            (
                D,
                State::RolledBack,
                now(State::Claimed),
                true,
                Action::Discard,
            ),
            // ... but not one refused before its QEMU was handed over (a VM running here).
            (
                D,
                State::RolledBack,
                now(State::Claimed),
                false,
                Action::Nothing,
            ),
            (
                D,
                State::Settled,
                now(State::Committed),
                false,
                Action::Resume,
            ),
            // Older outcomes were acted on by the agent that wrote them.
            (D, State::RolledBack, none.clone(), false, Action::Nothing),
            (D, State::Done, none.clone(), false, Action::Nothing),
            // Settled at an earlier start that died before the VM ran (DONE follows once it
            // runs): still this host's to run. The model checker found it left paused before.
            (D, State::Settled, none.clone(), false, Action::Resume),
        ];
        for (role, state, interrupted, paused, want) in cases {
            let r = record(role, state, paused);
            assert_eq!(
                action(Rules::default(), Some(&r), &interrupted),
                want,
                "{role:?} {state:?} interrupted {interrupted:?}"
            );
        }
        assert_eq!(action(Rules::default(), None, &none), Action::Nothing);
    }
}
