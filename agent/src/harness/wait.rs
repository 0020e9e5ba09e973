//! Waiting for something to come true: poll a check until it holds or a time has passed.
//!
//! The harness and the tests wait on things no event tells them about (a log line, a file, a
//! QEMU runstate, another process's exit). One loop for all of them keeps the rules the same
//! everywhere: the check runs at least once, once more after the last sleep, and the caller,
//! not the loop, says what was wrong (with what it sees at that moment).

use std::time::{Duration, Instant};

/// The first `Some` that `check` gives, polled every `every` for up to `within`; `None` if it
/// gave none by then.
pub async fn eventually<T>(
    within: Duration,
    every: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(t) = check().await {
            return Some(t);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(every).await;
    }
}

/// Whether `holds` came true, polled every `every` for up to `within`.
pub async fn until(
    within: Duration,
    every: Duration,
    mut holds: impl AsyncFnMut() -> bool,
) -> bool {
    eventually(within, every, async || holds().await.then_some(()))
        .await
        .is_some()
}

/// [`eventually`] for a thread outside the runtime (it sleeps the thread).
pub fn eventually_blocking<T>(
    within: Duration,
    every: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(t) = check() {
            return Some(t);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// [`until`] for a thread outside the runtime (it sleeps the thread).
pub fn until_blocking(within: Duration, every: Duration, mut holds: impl FnMut() -> bool) -> bool {
    eventually_blocking(within, every, || holds().then_some(())).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(1);

    #[tokio::test]
    async fn gives_the_first_value_the_check_gives() {
        let mut n = 0;
        let got = eventually(Duration::from_secs(5), TICK, async || {
            n += 1;
            (n == 3).then_some(n * 10)
        })
        .await;
        assert_eq!(got, Some(30));
        assert_eq!(n, 3, "no poll after the first value");
    }

    #[tokio::test]
    async fn gives_up_once_its_time_has_passed_having_checked_after_the_last_sleep() {
        let start = Instant::now();
        let mut n = 0u32;
        let held = until(
            Duration::from_millis(30),
            Duration::from_millis(10),
            async || {
                n += 1;
                false
            },
        )
        .await;
        assert!(!held);
        assert!(start.elapsed() >= Duration::from_millis(30));
        // At least at the start and after the last sleep (a loaded host oversleeps).
        assert!(n >= 2, "checked {n} times");
    }

    #[tokio::test]
    async fn checks_once_with_no_time_at_all() {
        assert!(until(Duration::ZERO, TICK, async || true).await);
        let mut n = 0;
        assert!(
            !until(Duration::ZERO, TICK, async || {
                n += 1;
                false
            })
            .await
        );
        assert_eq!(n, 1);
    }

    #[test]
    fn blocking_waits_the_same_way() {
        let mut n = 0;
        assert_eq!(
            eventually_blocking(Duration::from_secs(5), TICK, || {
                n += 1;
                (n == 2).then_some("two")
            }),
            Some("two")
        );
        let start = Instant::now();
        assert!(!until_blocking(Duration::from_millis(20), TICK, || false));
        assert!(start.elapsed() >= Duration::from_millis(20));
    }
}
