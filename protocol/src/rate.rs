//! Bandwidth cap as a pacing calculator (GCRA). spec: SPEC.md §8.6
//!
//! Sans-IO: the driver passes `now` and sleeps for the returned delay before sending.

use std::time::{Duration, Instant};

/// Paces bytes to at most `rate` bytes per second, allowing a burst of `burst` bytes.
#[derive(Clone, Debug)]
pub struct Pacer {
    rate: u64,
    burst: Duration,
    tat: Option<Instant>,
}

impl Pacer {
    /// A pacer for `rate_bps` bytes/s (0 = unlimited) with a burst worth `burst` of time.
    pub fn new(rate_bps: u64, burst: Duration) -> Self {
        Self {
            rate: rate_bps,
            burst,
            tat: None,
        }
    }

    /// Account for sending `bytes` at `now`; returns how long to wait before sending them.
    pub fn delay(&mut self, now: Instant, bytes: u64) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        let cost_ns =
            (u128::from(bytes) * 1_000_000_000 / u128::from(self.rate)).min(u128::from(u64::MAX));
        let cost = Duration::from_nanos(cost_ns as u64);
        let tat = self.tat.map_or(now, |t| t.max(now));
        let new_tat = tat + cost;
        self.tat = Some(new_tat);
        new_tat
            .saturating_duration_since(now)
            .saturating_sub(self.burst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::disallowed_methods)] // a test needs one real instant as an anchor
    fn paces_to_rate() {
        let t0 = Instant::now();
        let mut p = Pacer::new(1_000_000, Duration::ZERO);
        // 10 sends of 100 kB at the same instant: the last must wait a full second.
        let mut waited = Duration::ZERO;
        for _ in 0..10 {
            waited = p.delay(t0, 100_000);
        }
        assert_eq!(waited, Duration::from_millis(1000));
        // Later sends are not penalised for idle time.
        assert_eq!(
            p.delay(t0 + Duration::from_secs(5), 1000),
            Duration::from_millis(1)
        );
        assert_eq!(
            Pacer::new(0, Duration::ZERO).delay(t0, u64::MAX),
            Duration::ZERO
        );
    }
}
