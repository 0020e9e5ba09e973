//! After a restart, each VM's hypervisor state is brought in line with its journal (SPEC.md
//! §8.8, spec/qemu.md §4). A crash can stop an agent between any two steps of a migration, and
//! the hypervisor keeps what the migration did to it: a source QEMU stopped in `postmigrate`, a
//! destination QEMU that loaded the VM and waits, paused. The journal says what may happen to
//! it ([`action`], a pure function of the records); the backend looks at what the hypervisor
//! actually holds and does it (`backend::qemu::reconcile` for QEMU). Synthetic guests live in the
//! agent's process and start from the journal alone (`daemon/start.rs`). A VM whose order may have
//! committed and whose outcome the source does not know is never touched here: that is the
//! settlement's decision (`settle.rs`).

use trustmig_protocol::settlement::Rules;

use crate::journal::Record;

/// What the journal allows for a VM after a restart (the settlement rules decide it).
pub use trustmig_protocol::settlement::VmAction as Action;

/// What to do for a VM whose current order (`Journal::last_order_of`) left `last` in the
/// journal, as `rules` say
/// (whether this start settled that order or an earlier one did: `Rules::vm_after_restart`).
pub fn action(rules: Rules, last: Option<&Record>) -> Action {
    let Some(r) = last else {
        return Action::Nothing;
    };
    rules.vm_after_restart(&r.entry())
}

/// What to do at the operator's request (`trustmig reconcile`) for a VM no order brings or
/// sends now, whose current order left `last` in the journal (`Rules::vm_on_request`: a
/// restart's action, and a destination's VM at COMMIT whose session ended before it ran).
pub fn on_request(rules: Rules, last: Option<&Record>) -> Action {
    last.map_or(Action::Nothing, |r| rules.vm_on_request(&r.entry()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::State;
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
        let back = |paused_before| Action::GiveBack { paused_before };
        let cases = [
            // A source rolled back (at this start, an earlier one, or by a failure), or settled
            // "not committed".
            (S, State::RolledBack, false, back(false)),
            (S, State::RolledBack, true, back(true)),
            // A source at COMMIT is in doubt: only the destination's answer decides.
            (S, State::Committed, false, Action::Nothing),
            (S, State::Done, false, Action::Nothing),
            (S, State::Settled, false, Action::Nothing),
            // A destination that never committed discards what arrived, whichever start
            // settled it (an earlier start may have died before its QEMU was quit: the model
            // checker found the copy left loaded for good)...
            (D, State::RolledBack, true, Action::Discard),
            // ... but not one refused before its QEMU was handed over (a VM running here).
            (D, State::RolledBack, false, Action::Nothing),
            // Committed here: resumes, whichever start settled it (one that died before the VM
            // ran left it paused for good before); DONE once it ran.
            (D, State::Settled, false, Action::Resume),
            (D, State::Done, false, Action::Nothing),
        ];
        for (role, state, flag, want) in cases {
            let r = record(role, state, flag);
            assert_eq!(
                action(Rules::default(), Some(&r)),
                want,
                "{role:?} {state:?} flag {flag}"
            );
        }
        assert_eq!(action(Rules::default(), None), Action::Nothing);
    }
}
