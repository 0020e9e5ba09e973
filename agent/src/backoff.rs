//! Pauses between retries that double from a first pause up to a ceiling: for settlement
//! queries nobody answers (`settle.rs`) and for a `cont` QEMU refuses until an image lock
//! clears (`backend/qemu/giveback.rs`).

use std::time::Duration;

/// A doubling back-off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// Pauses of `first`, doubling, never above `max`.
    pub const fn new(first: Duration, max: Duration) -> Self {
        Self { next: first, max }
    }

    /// The next pause; the one after it is twice as long, at most the ceiling.
    pub fn next_pause(&mut self) -> Duration {
        let p = self.next.min(self.max);
        self.next = (p * 2).min(self.max);
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_the_ceiling() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let seen: Vec<u64> = (0..9).map(|_| b.next_pause().as_secs()).collect();
        assert_eq!(seen, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        let mut b = Backoff::new(Duration::from_secs(5), Duration::from_secs(2));
        assert_eq!(b.next_pause(), Duration::from_secs(2));
    }
}
