//! Anti-replay sliding window for transports that may reorder. spec: SPEC.md §7.5
//!
//! The ordered TCP streams use the record layer's strict sequence check instead; this window is
//! for a future datagram transport and follows wireguard-go's `replay` (a ring of 64-bit blocks
//! with one spare block) and s2n-quic's `SlidingWindow` (read-only `check`, separate `insert`,
//! typed errors, a rejected counter leaves the window unchanged). Call `check` before
//! decrypting and `insert` only after the tag verified, so forgeries cannot move the window.

const BLOCK_BITS: u64 = 64;
const BLOCKS: usize = 32; // 2048 bits, one block of which is the spare being recycled
/// Counters older than this many below the highest accepted one are refused.
pub const WINDOW_SIZE: u64 = (BLOCKS as u64 - 1) * BLOCK_BITS;

/// Why a counter was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// Seen before.
    #[error("counter {0} already received")]
    Duplicate(u64),
    /// Too far behind the window to tell.
    #[error("counter {0} is older than the replay window")]
    TooOld(u64),
    /// At or beyond the hard limit.
    #[error("counter {0} at or beyond the limit; rekey required")]
    Exhausted(u64),
}

/// Sliding replay window.
#[derive(Clone, Debug)]
pub struct ReplayWindow {
    last: u64,
    any: bool,
    blocks: [u64; BLOCKS],
    limit: u64,
}

impl ReplayWindow {
    /// A window accepting counters below `limit`.
    pub fn new(limit: u64) -> Self {
        Self {
            last: 0,
            any: false,
            blocks: [0; BLOCKS],
            limit,
        }
    }

    fn bit(n: u64) -> (usize, u64) {
        (
            ((n / BLOCK_BITS) as usize) % BLOCKS,
            1u64 << (n % BLOCK_BITS),
        )
    }

    /// Would `n` be accepted? Changes nothing.
    pub fn check(&self, n: u64) -> Result<(), ReplayError> {
        if n >= self.limit {
            return Err(ReplayError::Exhausted(n));
        }
        if !self.any || n > self.last {
            return Ok(());
        }
        if self.last - n >= WINDOW_SIZE {
            return Err(ReplayError::TooOld(n));
        }
        let (i, m) = Self::bit(n);
        if self.blocks[i] & m != 0 {
            return Err(ReplayError::Duplicate(n));
        }
        Ok(())
    }

    /// Record `n` as received (after its tag verified). Re-checks, so misuse cannot corrupt it.
    pub fn insert(&mut self, n: u64) -> Result<(), ReplayError> {
        self.check(n)?;
        if !self.any || n > self.last {
            let from = if self.any {
                self.last / BLOCK_BITS + 1
            } else {
                0
            };
            let to = n / BLOCK_BITS;
            // Clear the blocks the window slides over (at most all of them).
            let span = to.saturating_sub(from).saturating_add(1).min(BLOCKS as u64);
            if !self.any || to > self.last / BLOCK_BITS {
                for k in 0..span {
                    let idx = ((to - k) % BLOCKS as u64) as usize;
                    self.blocks[idx] = 0;
                }
            }
            self.last = n;
            self.any = true;
        }
        let (i, m) = Self::bit(n);
        self.blocks[i] |= m;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn typed_rejections() {
        let mut w = ReplayWindow::new(10_000);
        w.insert(5).unwrap();
        assert_eq!(w.check(5), Err(ReplayError::Duplicate(5)));
        w.insert(3).unwrap();
        assert_eq!(w.insert(3), Err(ReplayError::Duplicate(3)));
        w.insert(5000).unwrap();
        assert_eq!(w.check(3), Err(ReplayError::TooOld(3)));
        assert_eq!(w.check(10_000), Err(ReplayError::Exhausted(10_000)));
        // A refused counter leaves the window unchanged.
        let before = w.clone();
        let _ = w.insert(5000);
        assert_eq!(before.blocks, w.blocks);
        assert_eq!(before.last, w.last);
    }

    proptest! {
        /// Against a model (a set plus the highest counter): accept iff new and within the window.
        #[test]
        fn matches_model(ns in proptest::collection::vec(0u64..6000, 1..400)) {
            let mut w = ReplayWindow::new(u64::MAX);
            let mut seen = std::collections::HashSet::new();
            let mut last: Option<u64> = None;
            for n in ns {
                let too_old = matches!(last, Some(l) if n < l && l - n >= WINDOW_SIZE);
                let expect_ok = !too_old && !seen.contains(&n);
                let got = w.insert(n);
                prop_assert_eq!(got.is_ok(), expect_ok, "n={} last={:?} got={:?}", n, last, got);
                if got.is_ok() {
                    seen.insert(n);
                    last = Some(last.map_or(n, |l| l.max(n)));
                }
            }
        }
    }
}
