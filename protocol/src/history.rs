//! Which order a host's copy of each VM belongs to, read from the journal's records in the
//! order they were written: what a restart reconciles each VM with (`Rules::vm_after_restart`
//! of that order's latest record), and whether the VM left this host.
//! spec: SPEC.md §8.8 (restart), §8.9 (the model checker runs it over two orders of one VM)
//!
//! Pure logic over (VM, order, record): the agent feeds it its journal's records, the model
//! checker its model's journal (of [`Entry`]s), so the checker's verdict holds for the agent's
//! own reading.

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::hash::Hash;

use crate::order::Role;
use crate::settlement::{Entry, Mutation, Rules, State};

/// A journal record as the history reads it: what the rules need of it, [`Entry`].
pub trait Recorded {
    /// What the rules need to know of the record.
    fn entry(&self) -> Entry;
}

impl Recorded for Entry {
    fn entry(&self) -> Entry {
        *self
    }
}

/// What a journal says of each VM: its current order and the record that last moved it (kept
/// whole, so that two histories agree only on the same record).
#[derive(Clone, Debug)]
pub struct VmHistory<V, O, R = Entry> {
    /// Each VM's record that last moved it (`Rules::moves_vm`), with its order.
    last_move: HashMap<V, (O, R)>,
    /// Each VM's current order: the last to write a record about this host's copy of it
    /// (`Rules::touches_vm`) that the order still owned.
    order: HashMap<V, O>,
    /// Each VM's orders that wrote about it since it last moved.
    since_move: HashMap<V, Vec<O>>,
    /// Orders whose VM moved under another order after they wrote about it: over for it.
    superseded: HashSet<O>,
}

impl<V, O, R> Default for VmHistory<V, O, R> {
    fn default() -> Self {
        Self {
            last_move: HashMap::new(),
            order: HashMap::new(),
            since_move: HashMap::new(),
            superseded: HashSet::new(),
        }
    }
}

/// Two histories agree when they say the same of every VM (the agent's compaction checks
/// that; which orders they know of differs by what it dropped).
impl<V: Eq + Hash, O: Eq, R: PartialEq> PartialEq for VmHistory<V, O, R> {
    fn eq(&self, other: &Self) -> bool {
        self.last_move == other.last_move && self.order == other.order
    }
}

impl<V: Clone + Eq + Hash, O: Clone + Eq + Hash, R: Recorded + Clone> VmHistory<V, O, R> {
    /// The history of `records` (VM, order, record), oldest first.
    pub fn of(rules: &Rules, records: impl IntoIterator<Item = (V, O, R)>) -> Self {
        let mut out = Self::default();
        let mut latest: HashMap<O, Entry> = HashMap::new();
        for (vm, order, r) in records {
            out.track(rules, &vm, &order, latest.get(&order), &r);
            latest.insert(order, r.entry());
        }
        out
    }

    /// Take record `r` of `order` about `vm` into account, `prev` being the order's record
    /// before it.
    ///
    /// An order is over for its VM once the VM moves under another order after it: its later
    /// records (a late final quote's verdict, an incident's note, what a restart settles it
    /// to) neither make it the VM's order again nor move the VM. Otherwise a destination order
    /// left at COMMIT (its `Resumed` lost) and settled at a later restart would take back a VM
    /// that had left here since under a newer order: two copies. An order that touched the VM
    /// without moving it (refused, rolled back before COMMIT) supersedes nothing: an older
    /// order in doubt still settles where the VM is.
    pub fn track(&mut self, rules: &Rules, vm: &V, order: &O, prev: Option<&Entry>, r: &R) {
        let e = &r.entry();
        if !rules.touches_vm(e) {
            return;
        }
        // The mistake this type exists to avoid: whatever wrote last owns the VM.
        if rules.broken(Mutation::LatestOrderOwnsVm) {
            if rules.moves_vm(prev.map(|p| p.state), e.role, e.state) {
                self.last_move
                    .insert(vm.clone(), (order.clone(), r.clone()));
            }
            self.order.insert(vm.clone(), order.clone());
            return;
        }
        if self.superseded.contains(order) {
            return;
        }
        // The first record of an order that does not claim is what compaction kept of a
        // finished order (its last line): history, and the VM has a later order already.
        if prev.is_none() && e.state != State::Claimed && self.order.contains_key(vm) {
            return;
        }
        let prev_state = prev.map(|p| p.state);
        // What gives an order the VM: its first record about it, or a change of the VM's place
        // (a COMMIT either way, a source's rollback after its COMMIT: an order in doubt
        // settles where the VM is, whatever was refused meanwhile). What only follows up on
        // a change made earlier (DONE, SETTLED after COMMIT, a note) is the VM's only while the
        // order still is: a restart settling an older order after a newer one claimed the VM
        // must not take the VM from it.
        let starts = !prev.is_some_and(|p| rules.touches_vm(p));
        let current = self.order.get(vm) == Some(order);
        let relocates = match (e.role, e.state) {
            (_, State::Committed) => prev_state != Some(State::Committed),
            (Role::Source, State::RolledBack) => prev_state == Some(State::Committed),
            _ => false,
        };
        if !(starts || current || relocates) {
            return;
        }
        let since = self.since_move.entry(vm.clone()).or_default();
        if relocates {
            self.superseded
                .extend(since.drain(..).filter(|o| o != order));
        }
        if rules.moves_vm(prev_state, e.role, e.state) {
            self.last_move
                .insert(vm.clone(), (order.clone(), r.clone()));
        }
        if !since.contains(order) {
            since.push(order.clone());
        }
        self.order.insert(vm.clone(), order.clone());
    }

    /// The VM's current order: what a restart reconciles its copy here with.
    pub fn order<Q: Hash + Eq + ?Sized>(&self, vm: &Q) -> Option<&O>
    where
        V: Borrow<Q>,
    {
        self.order.get(vm)
    }

    /// The order whose record last moved the VM, and that record.
    pub fn last_move<Q: Hash + Eq + ?Sized>(&self, vm: &Q) -> Option<&(O, R)>
    where
        V: Borrow<Q>,
    {
        self.last_move.get(vm)
    }

    /// Every order the history needs to say what it says: each VM's current order and the
    /// one that last moved it (compaction keeps their records).
    pub fn needed(&self) -> impl Iterator<Item = &O> {
        (self.last_move.values().map(|(o, _)| o)).chain(self.order.values())
    }

    /// Whether the VM left this host ([`Rules::left_here`] of its last move).
    pub fn migrated_away<Q: Hash + Eq + ?Sized>(&self, rules: &Rules, vm: &Q) -> bool
    where
        V: Borrow<Q>,
    {
        self.last_move(vm)
            .is_some_and(|(_, r)| rules.left_here(&r.entry()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(role: Role, state: State) -> Entry {
        Entry {
            role,
            state,
            peer: Some([9; 32]),
            flag: true,
        }
    }

    /// A VM arrives by order 1 (its `Resumed` lost: COMMIT, no DONE), leaves by order 2, and a
    /// restart settles order 1 afterwards: order 2 keeps the VM, which left.
    #[test]
    fn an_order_settled_after_the_vm_left_under_a_newer_one_takes_nothing() {
        use Role::{Destination as D, Source as S};
        let records = [
            ((), 1, e(D, State::Claimed)),
            ((), 1, e(D, State::Committed)),
            ((), 2, e(S, State::Claimed)),
            ((), 2, e(S, State::Committed)),
            ((), 1, e(D, State::Settled)),
        ];
        let r = Rules::default();
        let h = VmHistory::of(&r, records);
        assert_eq!(h.order(&()), Some(&2));
        assert!(h.migrated_away(&r, &()));
        assert_eq!(h.last_move(&()).map(|m| m.0), Some(2));
    }

    /// A newer order claimed and rolled back before COMMIT supersedes nothing: the VM is
    /// still here, and it was never moved by it.
    #[test]
    fn an_order_rolled_back_before_commit_moves_nothing() {
        use Role::{Destination as D, Source as S};
        let r = Rules::default();
        let h = VmHistory::of(
            &r,
            [
                ((), 1, e(D, State::Claimed)),
                ((), 1, e(D, State::Committed)),
                ((), 1, e(D, State::Done)),
                ((), 2, e(S, State::Claimed)),
                ((), 2, e(S, State::RolledBack)),
            ],
        );
        assert_eq!(h.order(&()), Some(&2));
        assert!(!h.migrated_away(&r, &()));
        assert_eq!(h.last_move(&()).map(|m| m.0), Some(1));
    }
}
