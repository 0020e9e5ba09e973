//! What a trusted peer may make this host keep for good, per peer: a token bucket of
//! `BURST`, one more each `REFILL`.
//!
//! A peer is pinned but may be compromised, and some of what it does costs it nothing while
//! this host keeps a record of it for good (journal, audit trail, each audit entry extended
//! into a PCR): unbounded, it could grow them at will. Two such things are budgeted, each with
//! its own `PeerBudget` in `Ctx`:
//! - settlement queries about orders never heard of here (SPEC.md §8.8): each is answered "not
//!   committed" and journalled first, for good (the order is used up). A genuine source asks
//!   only after journalling COMMIT, which needs this destination's evidence, so it asks about
//!   an order unknown here only when this host lost its journal: rare. Past its budget a peer
//!   gets an error and nothing is journalled; a genuine source keeps its VM as it is and asks
//!   again (every 60 s at most);
//! - the audit entries of its sessions refused before any order was accepted (a refused
//!   settlement query, a handshake that fails): past its budget a refusal is logged and
//!   counted (the refusal metrics) but not audited, and the next audited one says how many
//!   were not.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use trustmig_protocol::AgentId;

/// What a peer may have in a burst.
pub const BURST: u32 = 32;

/// One more comes back after this long.
pub const REFILL: Duration = Duration::from_secs(60);

/// Each peer's budget.
#[derive(Default)]
pub struct PeerBudget {
    budgets: Mutex<HashMap<AgentId, Bucket>>,
}

struct Bucket {
    tokens: u32,
    /// Whole `REFILL`s since then earn tokens (a full bucket earns none: the clock restarts
    /// when one is found full).
    since: Instant,
    /// Refused since the last one allowed.
    refused: u64,
}

impl PeerBudget {
    /// Whether `peer` may have one more at `now` (and, if so, spend it).
    pub fn allow(&self, peer: &AgentId, now: Instant) -> bool {
        self.allow_counting(peer, now).is_some()
    }

    /// Like [`Self::allow`]; when allowed, how many were refused since the last one allowed
    /// (for the record to say so).
    pub fn allow_counting(&self, peer: &AgentId, now: Instant) -> Option<u64> {
        let mut budgets = self.budgets.lock().unwrap_or_else(|e| e.into_inner());
        let b = budgets.entry(*peer).or_insert(Bucket {
            tokens: BURST,
            since: now,
            refused: 0,
        });
        let Bucket {
            tokens,
            since,
            refused,
        } = b;
        let earned = now.saturating_duration_since(*since).as_secs() / REFILL.as_secs();
        if earned > 0 {
            let refilled = u64::from(*tokens).saturating_add(earned);
            if refilled >= u64::from(BURST) {
                // Full: the next token is earned from now.
                (*tokens, *since) = (BURST, now);
            } else {
                // Fewer than BURST minutes earned: the product is small.
                *tokens = refilled as u32;
                *since += REFILL * earned as u32;
            }
        }
        if *tokens == 0 {
            *refused += 1;
            return None;
        }
        *tokens -= 1;
        Some(std::mem::take(refused))
    }

    /// `n` that `allow_counting` allowed were not kept after all (their audit entry could not
    /// be written): counted with the refused ones, for the next record to say. The budget they
    /// took is not given back: a peer that makes the writes fail gains nothing by it.
    pub fn not_audited(&self, peer: &AgentId, n: u64) {
        let mut budgets = self.budgets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = budgets.get_mut(peer) {
            b.refused = b.refused.saturating_add(n);
        }
    }

    /// Give back what `allow` took for something that was not kept after all.
    pub fn refund(&self, peer: &AgentId) {
        let mut budgets = self.budgets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = budgets.get_mut(peer) {
            b.tokens = (b.tokens + 1).min(BURST);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_gets_its_burst_then_one_a_minute_and_others_are_unaffected() {
        let q = PeerBudget::default();
        let (a, b) = ([1; 32], [2; 32]);
        let t = Instant::now();
        assert!((0..BURST).all(|_| q.allow(&a, t)));
        assert!(!q.allow(&a, t), "burst spent");
        assert!(q.allow(&b, t), "another peer has its own");
        assert!(!q.allow(&a, t + REFILL - Duration::from_secs(1)));
        assert!(q.allow(&a, t + REFILL), "one back after a minute");
        assert!(!q.allow(&a, t + REFILL));
        // A long pause refills to the burst, no more.
        let later = t + REFILL * 1000;
        assert!((0..BURST).all(|_| q.allow(&a, later)));
        assert!(!q.allow(&a, later));
        // A refund gives one back, never past the burst.
        q.refund(&a);
        assert!(q.allow(&a, later));
        for _ in 0..BURST + 5 {
            q.refund(&b);
        }
        assert!((0..BURST).all(|_| q.allow(&b, later)));
        assert!(!q.allow(&b, later));
    }

    #[test]
    fn the_next_one_allowed_says_how_many_were_refused_before_it() {
        let q = PeerBudget::default();
        let a = [1; 32];
        let t = Instant::now();
        assert_eq!(q.allow_counting(&a, t), Some(0));
        assert!((1..BURST).all(|_| q.allow_counting(&a, t) == Some(0)));
        assert_eq!(q.allow_counting(&a, t), None);
        assert!(!q.allow(&a, t));
        assert_eq!(
            q.allow_counting(&a, t + REFILL),
            Some(2),
            "two refused meanwhile"
        );
        assert_eq!(
            q.allow_counting(&a, t + REFILL * 2),
            Some(0),
            "counted once"
        );
    }

    #[test]
    fn allowed_ones_that_were_not_kept_are_counted_for_the_next_without_a_refund() {
        let q = PeerBudget::default();
        let a = [1; 32];
        let t = Instant::now();
        assert_eq!(q.allow_counting(&a, t), Some(0));
        // Its entry could not be written, and neither could the three it carried.
        q.not_audited(&a, 1 + 3);
        assert_eq!(q.allow_counting(&a, t), Some(4), "the next one says them");
        assert!((2..BURST).all(|_| q.allow(&a, t)));
        assert!(!q.allow(&a, t), "the failed one spent its token");
        q.not_audited(&[9; 32], 1);
        assert_eq!(
            q.allow_counting(&[9; 32], t),
            Some(0),
            "an unseen peer owes nothing"
        );
    }
}
