//! Dropping what the journal no longer needs (SPEC.md §3.4), so that it does not grow with
//! every migration for as long as the agent runs: it is read whole at every start, and every
//! order it holds stays in memory.
//!
//! An order's lines may go once all of these hold:
//! - it is finished (done, rolled back, settled, revoked): nothing is in doubt about it;
//! - its window closed more than `RETENTION_SECS` ago beyond the clock skew: §3.3 refuses the
//!   order anyway, so its id need not be kept (§3.4), and the week's margin keeps that true
//!   across a clock set back by mistake, and keeps recent history for the operator;
//! - it knows its window (ids used up by a settlement query about an order never seen here
//!   were journalled without one, and stay);
//! - no VM's memory rests on it: it wrote neither the record that last moved a VM nor the
//!   last record about one (what a restart does with each VM is decided from those), nor the
//!   journal's last change of state (the audit trail must end with it), nor its newest record
//!   (the floor of the clock orders are checked against, `Journal::order_clock`).
//!
//! An order committed here as destination is never forgotten: its source may ask about it at
//! any time, however late, and must hear "committed" (an id unknown here is answered "not
//! committed", SPEC.md §8.8, which would make two copies run); such an order keeps its last line
//! (its latest record). Every line of any other order that stays is kept, in order, so
//! replaying the smaller journal gives each remaining order, and each VM, exactly what the whole
//! one gave; that is checked before
//! the smaller file replaces the old one (written beside it, fsync'd, renamed over it), and a
//! difference leaves the journal as it was. It runs at start, when at least
//! `MIN_DROPPED_LINES` lines can go, so the file is not rewritten for a handful, with the
//! journal locked (`LOCK`) so that no other agent writes it meanwhile; and in a running agent
//! once that many more lines were written, with no order under way (`Journal::compact_if_due`,
//! looked at every 10 minutes by the daemon). "now" is the earlier of the clock and the
//! journal's newest record (a clock running ahead at boot drops nothing early).
//!
//! A mirrored disk's copy left by an order rolled back here is removed by a later incoming mirror
//! of that disk only while the journal shows that order (`mirror.rs`, `stale`); once it went,
//! such a copy stays until the operator removes it (that mirror is refused, named, meanwhile).

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use trustmig_protocol::order::{Role, MAX_CLOCK_SKEW};

use super::{Replay, State};
use crate::error::AgentError;

/// How long after its window closed (beyond the clock skew) a finished order is kept.
pub const RETENTION_SECS: u64 = 7 * 24 * 3600;

/// The fewest lines worth rewriting the journal for.
pub const MIN_DROPPED_LINES: usize = 1024;

/// What becomes of an order's lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    /// All go.
    Drop,
    /// Only its last line stays: an order committed here as destination, whose source may ask
    /// about it at any time, however late (SPEC.md §8.8: a source in doubt asks until
    /// answered), and must then hear "committed", never the "not committed" an unknown id
    /// gets. Its last line is its latest record, so the answer stays.
    Squash,
}

/// What becomes of the orders whose lines need not all stay at `now` (UNIX seconds); the
/// others keep every line.
fn fates(replayed: &Replay, now: u64) -> HashMap<&str, Fate> {
    let mut needed: HashSet<&str> = replayed.vms.needed().map(String::as_str).collect();
    needed.extend(replayed.last_change.as_ref().map(|r| r.order_id.as_str()));
    // The newest record's time is the floor of the clock orders are checked against
    // (`Journal::order_clock`): its order stays whole, so the floor does not move back.
    needed.extend(replayed.newest.as_ref().map(|(_, o)| o.as_str()));
    (replayed.latest.values())
        .filter(|r| {
            matches!(
                r.state,
                State::Done | State::RolledBack | State::Settled | State::Revoked
            ) && r.not_after != 0
                && now
                    > (r.not_after)
                        .saturating_add(MAX_CLOCK_SKEW)
                        .saturating_add(RETENTION_SECS)
                && !needed.contains(r.order_id.as_str())
        })
        .map(|r| {
            let committed_here =
                r.role == Role::Destination && matches!(r.state, State::Done | State::Settled);
            let fate = if committed_here {
                Fate::Squash
            } else {
                Fate::Drop
            };
            (r.order_id.as_str(), fate)
        })
        .collect()
}

/// `text` with what `fates` says gone, and how many lines went; `None` when fewer than `min`
/// would.
fn compacted_text(
    text: &str,
    replayed: &Replay,
    fates: &HashMap<&str, Fate>,
    min: usize,
) -> Option<(String, usize)> {
    // Each squashed order's last line, by its position.
    let mut last_line: HashMap<&str, usize> = HashMap::new();
    for (i, (order, _)) in replayed.lines.iter().enumerate() {
        if fates.get(order.as_str()) == Some(&Fate::Squash) {
            last_line.insert(order.as_str(), i);
        }
    }
    let kept: Vec<_> = (replayed.lines.iter().enumerate())
        .filter(|(i, (order, _))| match fates.get(order.as_str()) {
            None => true,
            Some(Fate::Drop) => false,
            Some(Fate::Squash) => last_line.get(order.as_str()) == Some(i),
        })
        .map(|(_, line)| line)
        .collect();
    let dropped = replayed.lines.len() - kept.len();
    if dropped < min.max(1) {
        return None;
    }
    Some((
        kept.iter().map(|(_, range)| &text[range.clone()]).collect(),
        dropped,
    ))
}

/// Whether `smaller` says of every order and VM what `whole` said, but for the orders `fates`
/// drops: exactly the other orders, each with the same latest record, and the same per-VM
/// memory.
fn agrees(smaller: &Replay, whole: &Replay, fates: &HashMap<&str, Fate>) -> bool {
    let dropped = |id: &str| fates.get(id) == Some(&Fate::Drop);
    smaller.vms == whole.vms
        && smaller.last_change == whole.last_change
        && smaller.torn_at.is_none()
        && (whole.latest.iter()).all(|(id, r)| match smaller.latest.get(id) {
            Some(kept) => kept == r && !dropped(id),
            None => dropped(id),
        })
        && smaller.latest.len() <= whole.latest.len()
}

/// Compact the journal at `path`, whose text `text` replayed as `whole`, when enough of it may
/// go at `now`; returns the smaller journal's replay once it replaced the file. A journal with a
/// torn last line is left for the next start (it is cut first).
pub(super) fn compact(
    path: &Path,
    text: &str,
    whole: &Replay,
    now: u64,
) -> Result<Option<Replay>, AgentError> {
    compact_from(path, text, whole, now, MIN_DROPPED_LINES)
}

/// [`compact`] with the fewest lines worth it given.
pub(super) fn compact_from(
    path: &Path,
    text: &str,
    whole: &Replay,
    now: u64,
    min: usize,
) -> Result<Option<Replay>, AgentError> {
    if whole.torn_at.is_some() {
        return Ok(None);
    }
    // The clock is least trustworthy at boot: a clock running ahead must not drop orders whose
    // window is still open, so no later than the journal's newest record.
    let newest = (whole.latest.values()).map(|r| r.at).max().unwrap_or(0);
    let fates = fates(whole, now.min(newest));
    let Some((smaller, dropped)) = compacted_text(text, whole, &fates, min) else {
        return Ok(None);
    };
    let replayed = Replay::of(&smaller, path)?;
    if !agrees(&replayed, whole, &fates) {
        tracing::error!(
            "journal compaction would change what the journal says of a remaining order or VM: left as it is"
        );
        return Ok(None);
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let next = path.with_extension("jsonl.compacted");
    let io = |p: &Path| AgentError::io(p.to_path_buf());
    let mut f = File::create(&next).map_err(io(&next))?;
    f.write_all(smaller.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io(&next))?;
    fs::rename(&next, path).map_err(io(path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    tracing::info!(
        dropped,
        kept = replayed.lines.len(),
        "journal compacted: finished orders whose window closed over {} days ago",
        RETENTION_SECS / 86_400
    );
    Ok(Some(replayed))
}

#[cfg(test)]
mod tests {
    use super::super::{Journal, Record, FILE};
    use super::*;
    use trustmig_protocol::order::Role;

    const DAY: u64 = 86_400;

    fn line(id: u8, vm: &str, role: Role, state: State, not_after: u64) -> String {
        let r = Record::new(format!("{id:032x}"), role, vm, state, not_after);
        serde_json::to_string(&r).unwrap() + "\n"
    }

    /// Finished, expired orders go; what is in doubt, recent, without a window, or what a
    /// VM's fate rests on stays, line for line; the journal then opens to the same answers.
    #[test]
    fn only_finished_expired_orders_nothing_rests_on_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        let now = 100 * DAY;
        let old = now - RETENTION_SECS - MAX_CLOCK_SKEW - DAY;
        let mut text = String::new();
        // VM a: order 1 moved it away long ago (a's last move: stays); order 2 claimed it
        // since and rolled back (a's last record: stays).
        text += &line(1, "a", Role::Source, State::Claimed, old);
        text += &line(1, "a", Role::Source, State::Committed, old);
        text += &line(1, "a", Role::Source, State::Done, old);
        text += &line(2, "a", Role::Source, State::Claimed, old);
        text += &line(2, "a", Role::Source, State::RolledBack, old);
        // VM b: 3 refused before its hypervisor was handed over (goes); 8 brought it here
        // (b's last: stays, and the journal's last change).
        text += &line(3, "b", Role::Destination, State::Claimed, old);
        text += &line(3, "b", Role::Destination, State::RolledBack, old);
        // 4: in doubt long ago; 5: finished, its window closed a day ago; 6: used up by a
        // settlement query (no window): all stay. 7: revoked long ago (goes).
        text += &line(4, "c", Role::Source, State::Claimed, old);
        text += &line(4, "c", Role::Source, State::Committed, old);
        text += &line(5, "d", Role::Source, State::Claimed, now - DAY);
        text += &line(5, "d", Role::Source, State::Done, now - DAY);
        text += &line(6, "", Role::Destination, State::RolledBack, 0);
        text += &line(7, "e", Role::Destination, State::Revoked, old);
        // VM f: 9 brought it here long ago, 10 sent it away since: 9 goes, 10 stays.
        text += &line(9, "f", Role::Destination, State::Claimed, old);
        text += &line(9, "f", Role::Destination, State::Done, old);
        text += &line(10, "f", Role::Source, State::Claimed, old);
        text += &line(10, "f", Role::Source, State::Done, old);
        // VM g: 11 brought it here, its `Resumed` lost (at COMMIT); 12 sent it away since; a
        // restart then settled 11. 11 is over for g: squashed to that last line, which must
        // not take g back once its earlier lines are gone.
        text += &line(11, "g", Role::Destination, State::Claimed, old);
        text += &line(11, "g", Role::Destination, State::Committed, old);
        text += &line(12, "g", Role::Source, State::Claimed, old);
        text += &line(12, "g", Role::Source, State::Committed, old);
        text += &line(12, "g", Role::Source, State::Done, old);
        text += &line(11, "g", Role::Destination, State::Settled, old);
        text += &line(8, "b", Role::Destination, State::Claimed, old);
        text += &line(8, "b", Role::Destination, State::Done, old);
        let whole = Replay::of(&text, &path).unwrap();
        let id = |n: u8| format!("{n:032x}");
        let mut fates: Vec<(String, Fate)> = (fates(&whole, now).into_iter())
            .map(|(o, f)| (o.to_string(), f))
            .collect();
        fates.sort_by(|a, b| a.0.cmp(&b.0));
        let want = [
            (3, Fate::Drop),
            (7, Fate::Drop),
            (9, Fate::Squash),
            (11, Fate::Squash),
        ];
        assert_eq!(fates, want.map(|(n, f)| (id(n), f)).to_vec());

        // The journal as `trustmig init` leaves it (with its audit trail), then this one.
        drop(Journal::open(dir.path()).unwrap());
        std::fs::write(&path, &text).unwrap();
        let smaller = compact_from(&path, &text, &whole, now, 1)
            .unwrap()
            .expect("compacted");
        assert!(agrees(&smaller, &whole, &super::fates(&whole, now)));
        let on_disk = std::fs::read_to_string(&path).unwrap();
        assert_eq!(on_disk.lines().count(), text.lines().count() - 6);
        let lines = |t: &str, n: u8| t.lines().filter(|l| l.contains(&id(n))).count();
        for n in [3, 7] {
            assert_eq!(lines(&on_disk, n), 0, "order {n} kept");
        }
        assert_eq!(lines(&on_disk, 9), 1, "order 9: its last line only");
        assert_eq!(lines(&on_disk, 11), 1, "order 11: its last line only");
        for n in [1, 2, 4, 5, 6, 8, 10, 12] {
            assert_eq!(
                lines(&on_disk, n),
                lines(&text, n),
                "order {n}: every line kept"
            );
        }
        // Order 9's source, in doubt for weeks, still hears "committed"; a dropped order that
        // was rolled back here is answered "not committed", as it was.
        let mut j = Journal::open(dir.path()).unwrap();
        let order_id = |n: u8| {
            let mut b = [0u8; 16];
            b[15] = n;
            b
        };
        assert!(j.settle_query(&order_id(9), &[7; 32]).unwrap());
        assert!(
            j.migrated_away("g"),
            "g left under 12, before and after compaction"
        );
        assert_eq!(j.last_order_of("g").unwrap().order_id, id(12));
        assert!(!j.settle_query(&order_id(3), &[7; 32]).unwrap());
        drop(j);
        let on_disk = std::fs::read_to_string(&path).unwrap();
        // Nothing more to drop the second time; and the journal opens on it.
        let again = Replay::of(&on_disk, &path).unwrap();
        assert!(compact_from(&path, &on_disk, &again, now, 1)
            .unwrap()
            .is_none());
        assert!(!dir.path().join("journal.jsonl.compacted").exists());
    }

    /// A running agent's journal compacts too (`Journal::compact_if_due`): not before enough
    /// was written, not while an order is under way; what it dropped is gone from memory too,
    /// and what is written after it lands in the new file.
    #[test]
    fn a_running_journal_compacts_and_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        let now = crate::unix_now();
        let old = now - RETENTION_SECS - MAX_CLOCK_SKEW - DAY;
        drop(Journal::open(dir.path()).unwrap());
        let mut text = String::new();
        for n in 1..=3 {
            text += &line(n, "a", Role::Source, State::Claimed, old);
            text += &line(n, "a", Role::Source, State::RolledBack, old);
        }
        text += &line(4, "a", Role::Source, State::Claimed, now + DAY);
        text += &line(4, "a", Role::Source, State::Done, now + DAY);
        std::fs::write(&path, &text).unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        let id = |n: u8| {
            let mut b = [0u8; 16];
            b[15] = n;
            b
        };
        assert!(
            j.record(&id(1)).is_some(),
            "too few lines to compact at open"
        );
        assert!(!j.compact_if_due(now).unwrap(), "not enough written since");
        j.claim_for(&id(9), Role::Source, "b", now + DAY).unwrap();
        j.lines += MIN_DROPPED_LINES;
        assert!(!j.compact_if_due(now).unwrap(), "order 9 is under way");
        j.set(&id(9), State::RolledBack, "").unwrap();
        assert!(j.compact_running(now, 1).unwrap());
        for n in 1..=3 {
            assert!(j.record(&id(n)).is_none(), "order {n} is gone from memory");
        }
        j.set(&id(9), State::Settled, "after the compaction")
            .unwrap();
        drop(j);
        let on_disk = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            on_disk.lines().count(),
            2 + 3,
            "orders 4 and 9 (claimed, rolled back, settled)"
        );
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.record(&id(9)).map(|r| r.state), Some(State::Settled));
        assert!(j.record(&id(1)).is_none());
    }

    /// Below the threshold, or with a torn last line, the file is left alone.
    #[test]
    fn a_few_lines_or_a_torn_tail_leave_the_file_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        let now = 100 * DAY;
        let old = now - RETENTION_SECS - MAX_CLOCK_SKEW - DAY;
        let mut text = line(1, "a", Role::Source, State::Done, old);
        text += &line(2, "b", Role::Source, State::Done, old);
        let whole = Replay::of(&text, &path).unwrap();
        assert!(compact_from(&path, &text, &whole, now, 2)
            .unwrap()
            .is_none());
        text += "{\"order_id\": \"torn";
        let torn = Replay::of(&text, &path).unwrap();
        assert!(torn.torn_at.is_some());
        assert!(compact_from(&path, &text, &torn, now, 1).unwrap().is_none());
    }

    /// Through `Journal::open`: a journal with many expired orders opens smaller, and an
    /// expired id it dropped is no longer remembered (the order's window refuses it now).
    #[test]
    fn open_compacts_a_long_journal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        let old = crate::unix_now() - RETENTION_SECS - MAX_CLOCK_SKEW - DAY;
        let mut text = String::new();
        for i in 0..MIN_DROPPED_LINES as u32 {
            let id = format!("{i:032x}");
            for state in [State::Claimed, State::Done] {
                let r = Record::new(id.clone(), Role::Source, "a", state, old);
                text += &(serde_json::to_string(&r).unwrap() + "\n");
            }
        }
        // An empty journal first (with its audit trail), then the long one in its place.
        drop(Journal::open(dir.path()).unwrap());
        std::fs::write(&path, &text).unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let last = format!("{:032x}", MIN_DROPPED_LINES - 1);
        // A clock set back into their window does not make the forgotten orders valid again:
        // orders are checked against the journal's floor, past their window and skew.
        assert!(j.order_clock(old) > old + MAX_CLOCK_SKEW);
        let now = crate::unix_now();
        assert_eq!(j.order_clock(now), now, "a right clock is the order clock");
        assert_eq!(j.latest.len(), 1, "only the VM's last order stays");
        assert!(j.latest.contains_key(&last));
        let on_disk = std::fs::read_to_string(&path).unwrap();
        assert_eq!(on_disk.lines().count(), 2);
        drop(j);
        // The audit trail still ends where the journal does.
        crate::audit::verify_with_journal(dir.path()).expect("trail and journal agree");
    }

    /// A clock running ahead at boot drops nothing whose window is open by the journal's own
    /// newest record; the journal's last change is kept even when nothing else rests on it.
    #[test]
    fn a_clock_ahead_or_the_last_change_keep_their_orders() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        let real = crate::unix_now();
        // Finished orders whose windows close now (records written now).
        let mut text = String::new();
        for n in 1..=3 {
            text += &line(n, "a", Role::Source, State::Claimed, real);
            text += &line(n, "a", Role::Source, State::RolledBack, real);
        }
        let whole = Replay::of(&text, &path).unwrap();
        let ahead = real + RETENTION_SECS + MAX_CLOCK_SKEW + 30 * DAY;
        assert!(compact_from(&path, &text, &whole, ahead, 1)
            .unwrap()
            .is_none());

        // Long expired: a rolled-back order, then a revoked one (touches and moves no VM) that
        // is the journal's last change: only the first goes.
        let old = real - RETENTION_SECS - MAX_CLOCK_SKEW - DAY;
        let mut text = line(4, "b", Role::Source, State::Claimed, old);
        text += &line(4, "b", Role::Source, State::RolledBack, old);
        text += &line(5, "c", Role::Destination, State::Claimed, old);
        text += &line(5, "c", Role::Destination, State::RolledBack, old);
        text += &line(6, "d", Role::Destination, State::Revoked, old);
        let whole = Replay::of(&text, &path).unwrap();
        let fates = fates(&whole, real);
        assert_eq!(fates.get(format!("{:032x}", 5).as_str()), Some(&Fate::Drop));
        assert_eq!(
            fates.get(format!("{:032x}", 6).as_str()),
            None,
            "the last change"
        );
        assert_eq!(fates.len(), 1, "{fates:?}");
    }

    /// `agrees` refuses a smaller journal that lost an order it should keep, or kept one it
    /// should have dropped.
    #[test]
    fn agrees_refuses_what_is_not_the_whole_journal_less_the_dropped() {
        let path = Path::new("journal.jsonl");
        let old = 1;
        let mut text = line(1, "a", Role::Source, State::Claimed, old);
        text += &line(1, "a", Role::Source, State::RolledBack, old);
        text += &line(2, "a", Role::Source, State::Claimed, old);
        text += &line(2, "a", Role::Source, State::Done, old);
        let whole = Replay::of(&text, path).unwrap();
        let one = format!("{:032x}", 1);
        let drop_one: HashMap<&str, Fate> = [(one.as_str(), Fate::Drop)].into();
        let both = whole.lines.iter().map(|(_, r)| &text[r.clone()]);
        let without_one: String = both.skip(2).collect();
        let smaller = Replay::of(&without_one, path).unwrap();
        assert!(agrees(&smaller, &whole, &drop_one));
        // Kept what it should have dropped.
        assert!(!agrees(&whole, &whole, &drop_one));
        // Lost what it should have kept (here: order 1, with nothing said to drop).
        assert!(!agrees(&smaller, &whole, &HashMap::new()));
    }

    fn path() -> &'static Path {
        Path::new("journal.jsonl")
    }

    /// Any JSON value a field might hold instead of its own: every type, numbers at and past
    /// the bounds of the agent's integers, hex and not-hex text of several lengths.
    fn json_value() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        use serde_json::json;
        prop_oneof![
            Just(json!(null)),
            any::<bool>().prop_map(|b| json!(b)),
            any::<u64>().prop_map(|n| json!(n)),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>().prop_map(|n| json!(n)),
            Just(json!(u64::MAX)),
            Just(json!(-1)),
            "\\PC{0,40}".prop_map(|s| json!(s)),
            "[0-9a-f]{0,70}".prop_map(|s| json!(s)),
            Just(json!(["claimed"])),
            Just(json!({"state": "done"})),
        ]
    }

    proptest::proptest! {
        /// On any journal of orders interleaved as agents write them (each order one VM, one
        /// role and one window, its states along a path the rules allow, one order under way
        /// per VM, a VM's last order cut anywhere), what
        /// compaction keeps replays to what the whole journal said (`agrees`), so its guard
        /// never has to leave the journal as it was.
        #[test]
        fn compaction_agrees_on_any_journal(
            orders in proptest::collection::vec(
                (0usize..3, proptest::bool::ANY, 0usize..3, proptest::bool::ANY, 0usize..6, 1usize..4),
                0..7,
            ),
            turns in proptest::collection::vec(0usize..7, 0..30),
        ) {
            use State::*;
            let paths: [&[State]; 6] = [
                &[Revoked],
                &[Claimed, RolledBack],
                &[Claimed, Settled],
                &[Claimed, Committed, Done],
                &[Claimed, Committed, Settled],
                &[Claimed, Committed],
            ];
            let record = |i: usize, state: State| {
                let (vm, destination, window, with_peer, _, _) = orders[i];
                let role = if destination { Role::Destination } else { Role::Source };
                // None, closed long ago, still open at `now` below.
                let not_after = [0, 1, u64::MAX / 4][window];
                let mut r = Record::new(format!("{i:032x}"), role, ["a", "b", "c"][vm], state, not_after);
                if with_peer {
                    r.peer = Some("ab".repeat(32));
                    r.peer_addr = Some("127.0.0.1:1".into());
                }
                serde_json::to_string(&r).unwrap() + "\n"
            };
            // A VM has one order under way at a time (a claim is refused while another order
            // holds it): each order that takes a VM starts once the one before it on that VM
            // finished, and only a VM's last such order may be cut short (left in doubt).
            // Revocations take no VM and come any time.
            let takes = |i: usize| orders[i].4 != 0;
            let last_on_vm = |i: usize| !(i + 1..orders.len()).any(|j| takes(j) && orders[j].0 == orders[i].0);
            let mut left: Vec<Vec<State>> = (0..orders.len())
                .map(|i| {
                    let (.., path, len) = orders[i];
                    let len = if takes(i) && !last_on_vm(i) { usize::MAX } else { len };
                    paths[path].iter().take(len).copied().collect()
                })
                .collect();
            let may_write = |left: &[Vec<State>], i: usize| {
                !takes(i) || (0..i).all(|j| !takes(j) || orders[j].0 != orders[i].0 || left[j].is_empty())
            };
            let mut text = String::new();
            let every = (0..orders.len()).cycle().take(orders.len() * 4 * orders.len());
            for i in turns.into_iter().filter(|&i| i < orders.len()).chain(every) {
                if !left[i].is_empty() && may_write(&left, i) {
                    text += &record(i, left[i].remove(0));
                }
            }
            proptest::prop_assert!(left.iter().all(Vec::is_empty), "every record written");
            let whole = Replay::of(&text, path()).unwrap();
            let fates = fates(&whole, u64::MAX / 8);
            if let Some((smaller, _)) = compacted_text(&text, &whole, &fates, 1) {
                let replayed = Replay::of(&smaller, path()).unwrap();
                proptest::prop_assert!(agrees(&replayed, &whole, &fates), "{text}");
            }
        }

        /// Records of the journal's own shape with any of their fields replaced by any JSON
        /// (another type, a number past every bound, text that is not hex, a peer of the wrong
        /// length): replaying and compacting them answers without a panic, and a refusal names
        /// a line the file has. Random text (below) seldom reaches the checks after parsing.
        #[test]
        fn records_with_any_field_replaced_replay_or_name_their_bad_line(
            lines in proptest::collection::vec(
                (0usize..6, proptest::collection::vec((0usize..11, json_value()), 0..3)),
                1..6,
            ),
        ) {
            use State::*;
            let states = [Claimed, Committed, Done, RolledBack, Settled, Revoked];
            let fields = ["order_id", "role", "vm", "state", "not_after", "at", "note", "peer",
                "peer_addr", "paused_before", "fed"];
            let mut text = String::new();
            for (i, (state, changes)) in lines.iter().enumerate() {
                let mut r = Record::new(format!("{:032x}", i % 2), Role::Source, "a", states[*state], u64::MAX / 4);
                r.peer = Some("ab".repeat(32));
                let mut v = serde_json::to_value(&r).unwrap();
                for (f, value) in changes {
                    v[fields[*f]] = value.clone();
                }
                text += &(v.to_string() + "\n");
            }
            match Replay::of(&text, path()) {
                Ok(whole) => {
                    let fates = fates(&whole, u64::MAX / 8);
                    let _ = compacted_text(&text, &whole, &fates, 1);
                }
                Err(e) => {
                    let e = e.to_string();
                    let line: usize = (e.split("line ").nth(1))
                        .and_then(|rest| rest.split(':').next()?.parse().ok())
                        .unwrap_or(0);
                    proptest::prop_assert!((1..=lines.len()).contains(&line), "{e}");
                }
            }
        }

        /// Whatever the file holds, replaying it answers without a panic: the journal, or an
        /// error naming a line the file has (mostly a smoke test: random text seldom parses
        /// as a record).
        #[test]
        fn any_text_replays_or_names_its_bad_line(text in "(\\PC{0,60}\n){0,5}\\PC{0,20}") {
            if let Err(e) = Replay::of(&text, path()) {
                let e = e.to_string();
                let line: usize = (e.split("line ").nth(1))
                    .and_then(|rest| rest.split(':').next()?.parse().ok())
                    .unwrap_or(0);
                proptest::prop_assert!((1..=text.lines().count()).contains(&line), "{e}");
            }
        }
    }
}
