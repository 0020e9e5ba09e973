//! Loopback ports for programs the harness starts and that bind them later (swtpm, agents).
//!
//! Asking the kernel for a free port (`bind(0)`) and releasing it leaves a window until the
//! program binds it, and in that window the kernel may hand the same port to any other socket:
//! another `bind(0)`, or the local end of a `connect()`, both taken from the ephemeral range
//! (`net.ipv4.ip_local_port_range`). Parallel tests make many of both, and CI saw an agent fail
//! with "Address already in use" on a port chosen that way a few seconds before.
//!
//! So the ports handed out here come from outside the ephemeral range, where the kernel never
//! picks on its own; no two callers in this process get the same one; and each is bindable when
//! handed out (a process outside the harness may still hold one: that is checked, not assumed).
//! A child forked by another thread while a port is being checked holds a copy of the check's
//! socket until its exec closes it (microseconds to milliseconds): a swtpm that finds its port
//! taken is started again on others, and the tests allow a moment for it.

use std::collections::BTreeSet;
use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::ops::Range;
use std::sync::Mutex;

/// Where the harness looks when the kernel's range cannot be read (Linux's default range is
/// 32768–60999, so this lies below it).
const FALLBACK: Range<u32> = 20_000..32_768;

/// The lowest port handed out: below it lie well-known and registered services.
const LOWEST: u32 = 10_000;

/// Ports handed out in this process, never handed out again (a program may still be starting
/// on one, or have exited and left it to be rebound by a restart).
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// The ports outside the kernel's ephemeral range that the harness may use.
fn candidates() -> Vec<Range<u32>> {
    let Some((lo, hi)) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(str::parse::<u32>);
            Some((it.next()?.ok()?, it.next()?.ok()?))
        })
    else {
        return vec![FALLBACK];
    };
    [LOWEST..lo, hi.saturating_add(1)..65_536]
        .into_iter()
        .filter(|r| r.start < r.end)
        .collect()
}

/// `n` consecutive loopback ports, the first returned, reserved for the caller in this process
/// and bindable now, from outside the kernel's ephemeral range.
pub fn reserve(n: u16) -> io::Result<u16> {
    // Start somewhere different in each process, so that back-to-back runs do not reuse ports
    // a previous run's programs may still be releasing.
    let start = std::process::id().wrapping_mul(2_654_435_761) ^ seed_from_clock();
    let mut handed = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    pick(&candidates(), &mut handed, start, n)
}

/// The first of `n` consecutive ports of `ranges`, none in `handed` (to which they are added)
/// and all bindable now, searching from offset `start`.
fn pick(ranges: &[Range<u32>], handed: &mut BTreeSet<u16>, start: u32, n: u16) -> io::Result<u16> {
    let n = u32::from(n.max(1));
    let total: u32 = ranges.iter().map(|r| r.len() as u32).sum();
    if total < n {
        return Err(io::Error::other(
            "no loopback ports outside the kernel's ephemeral range",
        ));
    }
    let mut at = start % total;
    for _ in 0..total.min(4_096) {
        at = (at + 1) % total;
        let Some(first) = nth(ranges, at, n) else {
            continue;
        };
        let ports: Vec<u16> = (first..first + n)
            .filter_map(|p| p.try_into().ok())
            .collect();
        if ports.len() as u32 != n || ports.iter().any(|p| handed.contains(p)) {
            continue;
        }
        // Held together while checking, so that each is known free at once.
        let held: Result<Vec<TcpListener>, _> = ports
            .iter()
            .map(|&p| TcpListener::bind((Ipv4Addr::LOCALHOST, p)))
            .collect();
        if held.is_ok() {
            handed.extend(ports.iter().copied());
            return Ok(ports[0]);
        }
    }
    Err(io::Error::other(
        "no free loopback ports outside the kernel's ephemeral range",
    ))
}

/// The first of `n` consecutive ports at offset `at` into `ranges`, all within one range.
fn nth(ranges: &[Range<u32>], mut at: u32, n: u32) -> Option<u32> {
    for r in ranges {
        let len = r.len() as u32;
        if at < len {
            let first = r.start + at;
            return (first + n <= r.end).then_some(first);
        }
        at -= len;
    }
    None
}

fn seed_from_clock() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_outside_the_ephemeral_range_distinct_and_bindable() {
        let ranges = candidates();
        let mut seen = BTreeSet::new();
        for _ in 0..20 {
            let p = reserve(2).expect("reserve");
            for q in [p, p + 1] {
                assert!(
                    ranges.iter().any(|r| r.contains(&u32::from(q))),
                    "{q} outside {ranges:?}"
                );
                assert!(seen.insert(q), "{q} handed out twice");
                // A process another test thread forks meanwhile (a swtpm starting) holds a copy
                // of the check's socket until its exec closes it (seen: 12 runs in 40, the port
                // free again by the time `ss` looked): bindable within a moment.
                let bound = (0..50).any(|_| {
                    let free = TcpListener::bind((Ipv4Addr::LOCALHOST, q)).is_ok();
                    if !free {
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    free
                });
                assert!(bound, "{q} not bindable");
            }
        }
    }

    #[test]
    fn a_port_someone_holds_is_not_handed_out() {
        // Three ports; another socket holds the first two: only the third can be handed out,
        // whichever offset the search starts from.
        let first = reserve(3).expect("reserve");
        let only: Range<u32> = u32::from(first)..u32::from(first) + 3;
        let ranges = std::slice::from_ref(&only);
        let _held: Vec<_> = (first..first + 2)
            .map(|p| TcpListener::bind((Ipv4Addr::LOCALHOST, p)).expect("bind"))
            .collect();
        for start in 0..3 {
            let mut handed = BTreeSet::new();
            assert_eq!(
                pick(ranges, &mut handed, start, 1).expect("pick"),
                first + 2
            );
            assert!(handed.contains(&(first + 2)));
            // Handed out once, never again; and nothing else is free.
            assert!(pick(ranges, &mut handed, start, 1).is_err());
        }
        // No two consecutive free ports there.
        assert!(pick(ranges, &mut BTreeSet::new(), 0, 2).is_err());
    }

    #[test]
    fn offsets_stay_within_one_range() {
        let ranges = [10..20, 30..40];
        assert_eq!(nth(&ranges, 0, 2), Some(10));
        assert_eq!(nth(&ranges, 8, 2), Some(18));
        assert_eq!(nth(&ranges, 9, 2), None);
        assert_eq!(nth(&ranges, 10, 2), Some(30));
        assert_eq!(nth(&ranges, 20, 1), None);
    }
}
