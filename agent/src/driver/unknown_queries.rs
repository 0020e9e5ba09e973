//! How many settlement queries about orders it never heard of a peer may ask (SPEC.md §8.8).
//!
//! Each such query is answered "not committed" and journalled first, for good (the order is
//! used up), with an audit entry and a PCR extend. A peer is pinned but may be compromised, and
//! fresh order ids cost it nothing: unbounded, it could grow this host's journal and audit trail
//! at will. A genuine source asks only after journalling COMMIT, which needs this destination's
//! evidence, so it asks about an order unknown here only when this host lost its journal: rare.
//! Past its budget a peer gets an error and nothing is journalled; a genuine source keeps its
//! VM as it is and asks again (every 60 s at most), and one token comes back each minute.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use trustmig_protocol::AgentId;

/// Queries about unknown orders a peer may ask in a burst.
pub const BURST: u32 = 32;

/// One more comes back after this long.
pub const REFILL: Duration = Duration::from_secs(60);

/// Each peer's budget: tokens left, as of when.
#[derive(Default)]
pub struct UnknownQueries {
    budgets: Mutex<HashMap<AgentId, (u32, Instant)>>,
}

impl UnknownQueries {
    /// Whether `peer` may ask about one more unknown order at `now` (and, if so, spend it).
    pub fn allow(&self, peer: &AgentId, now: Instant) -> bool {
        let mut budgets = self.budgets.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, since) = budgets.entry(*peer).or_insert((BURST, now));
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
            return false;
        }
        *tokens -= 1;
        true
    }

    /// Give back what `allow` took for a query that journalled nothing after all.
    pub fn refund(&self, peer: &AgentId) {
        let mut budgets = self.budgets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((tokens, _)) = budgets.get_mut(peer) {
            *tokens = (*tokens + 1).min(BURST);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_gets_its_burst_then_one_a_minute_and_others_are_unaffected() {
        let q = UnknownQueries::default();
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
}
