//! The audit trail's TPM anchor: every entry's hash extended into a PCR nothing else extends.
//! spec: SPEC.md §8.10
//!
//! The PCR's value is the fold of the entries since the epoch's `anchored` entry (which records
//! the PCR's value then, `base`). A trail rewritten after its entries were extended no longer
//! folds to it. A reset PCR (reboot, TPM restart, or a reset of a resettable PCR) opens a new
//! epoch, in the trail for all to see; anything else that does not fold is refused until the
//! operator has looked and re-anchored (`trustmig audit anchor`), which the trail records too.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::mpsc;

use super::{verify, Audit, Entry, Event};
use crate::error::AgentError;

/// The PCR that anchors the trail: read and extended by the agent's TPM (or, with no agent
/// running, the operator's `audit` command).
pub trait Anchor: Send {
    /// Which PCR.
    fn pcr(&self) -> u8;
    /// Its SHA-256 value now.
    fn read(&mut self) -> Result<[u8; 32], String>;
    /// Extend it with `digest`.
    fn extend(&mut self, digest: &[u8; 32]) -> Result<(), String>;
}

/// The anchoring thread as the trail holds it: where new entries' hashes go, its PCR, and a
/// channel that disconnects when the thread has extended everything it was given and ended.
pub(super) struct Anchoring {
    pub(super) tx: mpsc::Sender<[u8; 32]>,
    pub(super) pcr: u8,
    done: mpsc::Receiver<()>,
}

/// The anchoring thread, told to stop ([`Audit::stop_anchoring`]).
pub struct AnchorDrain(mpsc::Receiver<()>);

impl AnchorDrain {
    /// Wait up to `within` for the thread to extend every entry recorded before it was told to
    /// stop. False when time ran out: those entries are extended at the next start.
    pub fn wait(self, within: std::time::Duration) -> bool {
        matches!(
            self.0.recv_timeout(within),
            Err(mpsc::RecvTimeoutError::Disconnected)
        )
    }
}

/// The value of a SHA-256 PCR at `base` after extending each of `hashes`.
pub fn fold<'a>(base: [u8; 32], hashes: impl IntoIterator<Item = &'a [u8; 32]>) -> [u8; 32] {
    hashes
        .into_iter()
        .fold(base, |pcr, h| trustmig_protocol::sha256(&[&pcr, h]))
}

impl Audit {
    /// Anchor the trail in `anchor`'s PCR, then keep anchoring each new entry on a thread of
    /// its own. Entries a crash left unanchored are extended now; a PCR that was reset opens a
    /// new epoch with an `anchored` entry; a PCR that matches no prefix of its epoch means the
    /// trail was rewritten (or something else extended the PCR): refused, with what to do.
    pub fn anchor(&mut self, mut anchor: Box<dyn Anchor>) -> Result<(), AgentError> {
        let v = verify(&self.path).map_err(|e| self.broken(e.to_string()))?;
        let pcr = anchor.pcr();
        let value = anchor.read().map_err(AgentError::Tpm)?;
        let pending: Vec<[u8; 32]> = match check_anchor(&v.list, pcr, &value) {
            Ok(a) => v.list[a.anchored as usize..]
                .iter()
                .map(Entry::hash_bytes)
                .collect(),
            Err(AnchorMismatch::NoEpoch) => {
                vec![self.open_epoch(pcr, value, "the first anchor of this trail")?]
            }
            // Not opened silently: it would hide the trail that was there (deleted, or moved
            // aside) behind a new one that folds to the PCR from here on.
            Err(e @ AnchorMismatch::NotFromHere { .. }) => {
                return Err(self.broken(format!("{e}; {ANCHOR_HOW}")))
            }
            Err(AnchorMismatch::Moved { from }) => vec![self.open_epoch(
                pcr,
                value,
                &format!("the anchor moved from PCR {from} (tpm.audit_pcr changed)"),
            )?],
            Err(AnchorMismatch::Differs { .. }) if value == [0; 32] => vec![self.open_epoch(
                pcr,
                value,
                &format!(
                    "PCR {pcr} was reset (a reboot, a TPM restart, or a reset): entries before this one are vouched for by the hash chain alone"
                ),
            )?],
            Err(e) => return Err(self.broken(format!("{e}; {ANCHOR_HOW}"))),
        };
        for h in &pending {
            anchor.extend(h).map_err(AgentError::Tpm)?;
        }
        let (tx, rx) = mpsc::channel::<[u8; 32]>();
        let (done_tx, done) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("audit-anchor".into())
            .spawn(move || {
                let _done = done_tx; // dropped when the last hash is extended
                for h in rx {
                    let mut pause = crate::backoff::Backoff::new(
                        std::time::Duration::from_millis(100),
                        std::time::Duration::from_secs(10),
                    );
                    while let Err(e) = anchor.extend(&h) {
                        tracing::error!("could not extend the audit trail's anchor PCR {pcr}: {e}; trying again");
                        std::thread::sleep(pause.next_pause());
                    }
                }
            })
            .map_err(AgentError::io("audit anchor thread"))?;
        self.anchoring = Some(Anchoring { tx, pcr, done });
        Ok(())
    }

    /// Stop anchoring new entries (at shutdown): the thread extends what it was given, then
    /// ends; wait for it with the returned drain. Entries recorded from now on are extended at
    /// the next start.
    pub fn stop_anchoring(&mut self) -> Option<AnchorDrain> {
        self.anchoring.take().map(|a| AnchorDrain(a.done))
    }

    /// Record an `anchored` entry opening an epoch of `pcr` at `base`; returns its hash (to be
    /// extended first).
    fn open_epoch(&mut self, pcr: u8, base: [u8; 32], why: &str) -> Result<[u8; 32], AgentError> {
        tracing::warn!("audit trail: {why}; anchored in PCR {pcr} from here");
        self.append(Event {
            event: "anchored",
            reason: why.into(),
            evidence: BTreeMap::from([
                ("pcr".into(), pcr.to_string()),
                ("base".into(), hex::encode(base)),
            ]),
            ..Event::default()
        })
    }

    /// With no agent running: record that the operator re-anchored the trail (`reason`) in
    /// `anchor`'s PCR, as it is now, and extend that entry; a missing trail starts anew with
    /// it. Returns its `seq`.
    pub fn reanchor(dir: &Path, anchor: &mut dyn Anchor, reason: &str) -> Result<u64, AgentError> {
        // The journal's lock keeps an agent out meanwhile: one starting (before its control
        // socket answers) or stopping (after it closed it) still appends to the trail, and
        // two writers would give two entries one `seq`.
        let _journal = crate::journal::lock(dir)?;
        let mut audit = Audit::open_or_start(dir, true)?;
        let value = anchor.read().map_err(AgentError::Tpm)?;
        let seq = audit.seq;
        let why = format!("re-anchored by the operator: {reason}");
        let h = audit.open_epoch(anchor.pcr(), value, &why)?;
        anchor.extend(&h).map_err(AgentError::Tpm)?;
        Ok(seq)
    }
}

/// What the operator does about a trail that does not match its anchor.
pub const ANCHOR_HOW: &str = "find out who changed it (compare with `trustmig audit show` and your copies), then `trustmig audit anchor --reason TEXT` with the agent stopped records a new anchor, and that one was needed, in the trail";

/// A trail's anchor, as found.
#[derive(Debug, PartialEq, Eq)]
pub struct Anchored {
    /// The PCR.
    pub pcr: u8,
    /// `seq` of the `anchored` entry that opened the epoch.
    pub since: u64,
    /// How many entries (from the first) the PCR vouches for; those after are not extended yet.
    pub anchored: u64,
}

/// Why a trail does not match its anchor.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AnchorMismatch {
    /// The trail was never anchored (and its PCR was never extended since its last reset).
    #[error("the trail has no anchor")]
    NoEpoch,
    /// The trail was never anchored in the configured PCR, but that PCR was extended since its
    /// last reset: by an earlier trail that is not here (deleted, or moved aside), or by
    /// something else.
    #[error("the trail has no anchor in PCR {pcr}, but PCR {pcr} holds {value}, not zeros: it was extended since its last reset, by an earlier audit trail that is no longer here (deleted, or moved aside) or by something else")]
    NotFromHere {
        /// The PCR.
        pcr: u8,
        /// Its value (hex).
        value: String,
    },
    /// Its epoch is in another PCR.
    #[error("the trail is anchored in PCR {from}, not the configured one")]
    Moved {
        /// The epoch's PCR.
        from: u8,
    },
    /// The PCR is not the fold of any prefix of the epoch.
    #[error("the trail does not match its TPM anchor: PCR {pcr} holds {value}, which no part of the trail since its anchor at entry {since} extends to: the trail was rewritten after it was anchored, or something else extended PCR {pcr}")]
    Differs {
        /// The PCR.
        pcr: u8,
        /// Its value (hex).
        value: String,
        /// `seq` of the epoch's `anchored` entry.
        since: u64,
    },
}

/// Check `list` against the value of its anchor PCR.
pub fn check_anchor(list: &[Entry], pcr: u8, value: &[u8; 32]) -> Result<Anchored, AnchorMismatch> {
    let Some((since, epoch)) = (list.iter().enumerate().rev()).find(|(_, e)| e.event == "anchored")
    else {
        return Err(if value == &[0; 32] {
            AnchorMismatch::NoEpoch
        } else {
            AnchorMismatch::NotFromHere {
                pcr,
                value: hex::encode(value),
            }
        });
    };
    let field = |k: &str| epoch.evidence.get(k).map(String::as_str).unwrap_or("");
    let from: u8 = field("pcr").parse().unwrap_or(u8::MAX);
    if from != pcr {
        // A new PCR is taken on only as the trail's from zeros, as a first anchor is: an epoch
        // naming another PCR is otherwise a way round the anchor for whoever writes the file.
        return Err(if value == &[0; 32] {
            AnchorMismatch::Moved { from }
        } else {
            AnchorMismatch::NotFromHere {
                pcr,
                value: hex::encode(value),
            }
        });
    }
    let mut cur: [u8; 32] = (hex::decode(field("base")).ok())
        .and_then(|b| b.try_into().ok())
        .unwrap_or_default();
    // The PCR still at the epoch's base: only a crash between writing the `anchored` entry and
    // extending it, which nothing follows (the agent extends it before anything else). With
    // entries after it, the PCR was reset to a value that happens to be the base (zeros after a
    // reboot): not an anchor of this epoch.
    let mut anchored = None;
    if &cur == value && since + 1 == list.len() {
        anchored = Some(since);
    }
    for (i, e) in list.iter().enumerate().skip(since) {
        cur = fold(cur, [&e.hash_bytes()]);
        if &cur == value {
            anchored = Some(i + 1);
        }
    }
    match anchored {
        Some(n) => Ok(Anchored {
            pcr,
            since: since as u64,
            anchored: n as u64,
        }),
        None => Err(AnchorMismatch::Differs {
            pcr,
            value: hex::encode(value),
            since: since as u64,
        }),
    }
}

/// Every `anchored` entry (`seq`, `base`) that opened its epoch on a PCR holding extends
/// already. The agent opens epochs only on zeros (a first anchor, a reset, a new PCR), so these
/// are the operator's (`trustmig audit anchor`, with its reason: a trail moved aside and started
/// anew, a rewrite looked into) or were written by whoever could write the file; what the PCR
/// held before each is not vouched for by this trail. `audit verify` names them for the auditor.
fn epochs_on_history(list: &[Entry]) -> Vec<(u64, &str)> {
    let zeros = hex::encode([0u8; 32]);
    (list.iter().filter(|e| e.event == "anchored"))
        .filter_map(|e| Some((e.seq, e.evidence.get("base")?.as_str())))
        .filter(|(_, base)| *base != zeros)
        .collect()
}

/// `audit verify`'s words for a trail's anchor: what the TPM vouches for, or why it does not.
/// A trail never anchored, or anchored in another PCR, is described (the agent anchors it at
/// its next start); one that does not fold to its PCR is the error.
pub fn describe(list: &[Entry], pcr: u8, value: &[u8; 32]) -> Result<String, AnchorMismatch> {
    match check_anchor(list, pcr, value) {
        Ok(a) => {
            let pending = list.len() as u64 - a.anchored;
            let mut s = format!(
                "anchored in PCR {pcr} since entry {}: the TPM vouches for entries {}..{}",
                a.since, a.since, a.anchored
            );
            if a.since > 0 {
                s += &format!(" (those before {}, by the hash chain alone)", a.since);
            }
            if pending > 0 {
                s += &format!(" ({pending} more not extended yet: the agent extends them in the background, or at its next start)");
            }
            for (seq, base) in epochs_on_history(list) {
                s += &format!("; entry {seq} anchored on PCR {pcr} at {base}, not zeros: what was extended there before it is not vouched for by this trail (entry {seq} gives the reason)");
            }
            Ok(s)
        }
        Err(AnchorMismatch::NoEpoch) => Ok(format!(
            "not anchored yet: the agent anchors it in PCR {pcr} when it next starts"
        )),
        Err(AnchorMismatch::Moved { from }) => Ok(format!(
            "anchored in PCR {from}, not PCR {pcr} (tpm.audit_pcr changed): the agent opens a new anchor at its next start"
        )),
        Err(AnchorMismatch::Differs { .. }) if value == &[0; 32] => Ok(format!(
            "PCR {pcr} was reset since the trail was anchored (a reboot, a TPM restart, or a reset): the entries so far are vouched for by the hash chain alone; the agent opens a new anchor at its next start"
        )),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A PCR in memory, shared with the test.
    #[derive(Clone, Default)]
    struct MemoryPcr(Arc<Mutex<[u8; 32]>>);

    impl Anchor for MemoryPcr {
        fn pcr(&self) -> u8 {
            23
        }
        fn read(&mut self) -> Result<[u8; 32], String> {
            Ok(*self.0.lock().unwrap())
        }
        fn extend(&mut self, digest: &[u8; 32]) -> Result<(), String> {
            let mut v = self.0.lock().unwrap();
            *v = fold(*v, [digest]);
            Ok(())
        }
    }

    fn event(n: u32) -> Event {
        Event {
            event: "order-received",
            order_id: format!("{n:032x}"),
            vm: "vm".into(),
            ..Event::default()
        }
    }

    fn entries(dir: &Path) -> Vec<Entry> {
        verify(&dir.join(super::super::FILE)).unwrap().list
    }

    /// Wait (bounded) for the anchoring thread to catch up with the trail.
    fn settled(dir: &Path, pcr: &MemoryPcr) -> Anchored {
        for _ in 0..500 {
            let list = entries(dir);
            let a = check_anchor(&list, 23, &pcr.clone().read().unwrap()).unwrap();
            if a.anchored == list.len() as u64 {
                return a;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        panic!("the anchoring thread never caught up");
    }

    /// A trail anchored in a fresh PCR with `n` entries, all extended.
    fn anchored_trail(n: u32) -> (tempfile::TempDir, MemoryPcr, Audit) {
        let dir = tempfile::tempdir().unwrap();
        let pcr = MemoryPcr::default();
        let mut a = Audit::open(dir.path()).unwrap();
        a.anchor(Box::new(pcr.clone())).unwrap();
        for i in 0..n {
            a.record(event(i)).unwrap();
        }
        settled(dir.path(), &pcr);
        (dir, pcr, a)
    }

    /// Why an agent starting on the trail in `dir` with `pcr` refuses to (it must).
    fn refused_at_start(dir: &Path, pcr: &MemoryPcr) -> String {
        let started = Audit::open(dir).and_then(|mut a| a.anchor(Box::new(pcr.clone())));
        started.expect_err("the agent refuses to start").to_string()
    }

    /// Replace the trail in `dir` with `list`, as someone who can write the file does.
    fn write_trail(dir: &Path, list: &[Entry]) {
        let text: String = (list.iter())
            .map(|e| serde_json::to_string(e).unwrap() + "\n")
            .collect();
        std::fs::write(dir.join(super::super::FILE), text).unwrap();
    }

    #[test]
    fn each_entry_is_extended_and_the_trail_folds_to_the_pcr() {
        let dir = tempfile::tempdir().unwrap();
        let pcr = MemoryPcr::default();
        let mut a = Audit::open(dir.path()).unwrap();
        a.record(event(0)).unwrap(); // before anchoring: caught up by the anchor
        a.anchor(Box::new(pcr.clone())).unwrap();
        for i in 1..4 {
            a.record(event(i)).unwrap();
        }
        let got = settled(dir.path(), &pcr);
        let list = entries(dir.path());
        assert_eq!(list[1].event, "anchored");
        assert_eq!(list[1].evidence["base"], hex::encode([0; 32]));
        assert_eq!((got.since, got.anchored), (1, 5));
        let hashes: Vec<[u8; 32]> = list[1..].iter().map(Entry::hash_bytes).collect();
        assert_eq!(*pcr.0.lock().unwrap(), fold([0; 32], &hashes));
    }

    /// At shutdown the agent waits for the thread: once the drain returns, every entry
    /// recorded before it is in the PCR, however slow the TPM (here 20 ms per extend).
    #[test]
    fn stopping_drains_what_was_recorded() {
        struct Slow(MemoryPcr);
        impl Anchor for Slow {
            fn pcr(&self) -> u8 {
                23
            }
            fn read(&mut self) -> Result<[u8; 32], String> {
                self.0.read()
            }
            fn extend(&mut self, digest: &[u8; 32]) -> Result<(), String> {
                std::thread::sleep(std::time::Duration::from_millis(20));
                self.0.extend(digest)
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let pcr = MemoryPcr::default();
        let mut a = Audit::open(dir.path()).unwrap();
        a.anchor(Box::new(Slow(pcr.clone()))).unwrap();
        for i in 0..5 {
            a.record(event(i)).unwrap();
        }
        let drain = a.stop_anchoring().expect("it was anchoring");
        assert_eq!(a.anchor_pcr(), None);
        assert!(drain.wait(std::time::Duration::from_secs(10)));
        let list = entries(dir.path());
        let hashes: Vec<[u8; 32]> = list.iter().map(Entry::hash_bytes).collect();
        assert_eq!(*pcr.0.lock().unwrap(), fold([0; 32], &hashes));
        // Recorded after the stop: left to the next start's catch-up, not lost.
        a.record(event(9)).unwrap();
        let a = check_anchor(&entries(dir.path()), 23, &pcr.clone().read().unwrap()).unwrap();
        assert_eq!(a.anchored, 6);
    }

    /// The attack the anchor is for: a trail edited and re-chained from the edit on, so that
    /// the chain alone verifies, no longer folds to the PCR, and the agent refuses it.
    #[test]
    fn a_rewritten_trail_that_verifies_is_caught_by_the_tpm() {
        let (dir, pcr, a) = anchored_trail(3);
        drop(a);
        let mut list = entries(dir.path());
        list[2].vm = "another".into();
        Entry::relink(&mut list);
        write_trail(dir.path(), &list);
        assert!(
            verify(&dir.path().join(super::super::FILE)).is_ok(),
            "the chain alone verifies"
        );
        let value = pcr.clone().read().unwrap();
        let e = check_anchor(&entries(dir.path()), 23, &value).unwrap_err();
        assert!(matches!(e, AnchorMismatch::Differs { since: 0, .. }), "{e}");
        let refused = refused_at_start(dir.path(), &pcr);
        assert!(
            refused.contains("does not match its TPM anchor")
                && refused.contains("trustmig audit anchor"),
            "{refused}"
        );
        // Truncating the trail below what the PCR vouches for is caught the same way.
        list.truncate(2);
        write_trail(dir.path(), &list);
        assert!(check_anchor(&entries(dir.path()), 23, &value).is_err());
        // The operator looks, then re-anchors: recorded, and the agent anchors again.
        let mut op = pcr.clone();
        let seq = Audit::reanchor(dir.path(), &mut op, "restored from backup").unwrap();
        let list = entries(dir.path());
        assert_eq!(list[seq as usize].event, "anchored");
        assert!(list[seq as usize].reason.contains("restored from backup"));
        Audit::open(dir.path())
            .unwrap()
            .anchor(Box::new(pcr.clone()))
            .unwrap();
    }

    /// Re-anchoring waits for an agent to let go of the journal: one starting or stopping
    /// appends to the trail without answering on its control socket.
    #[test]
    fn reanchoring_waits_for_the_agent_to_let_go_of_the_journal() {
        let (dir, pcr, a) = anchored_trail(1);
        drop(a);
        let held = crate::journal::lock(dir.path()).unwrap();
        let mut op = pcr.clone();
        let e = Audit::reanchor(dir.path(), &mut op, "x")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("journal.lock") && e.contains("stop it first"),
            "{e}"
        );
        drop(held);
        Audit::reanchor(dir.path(), &mut op, "x").unwrap();
    }

    /// A trail deleted (or moved aside) and started anew while its PCR still holds the old
    /// one's extends: the agent does not open the new trail's epoch on that history by itself
    /// (that would hide the old trail behind one that folds from here on); the operator does,
    /// with a reason, and `audit verify` says for good that the trail starts on history.
    #[test]
    fn a_new_trail_over_an_extended_pcr_waits_for_the_operator() {
        let (dir, pcr, a) = anchored_trail(3);
        let fresh = describe(&entries(dir.path()), 23, &pcr.clone().read().unwrap()).unwrap();
        assert!(!fresh.contains("not zeros"), "{fresh}");
        drop(a);
        std::fs::remove_file(dir.path().join(super::super::FILE)).unwrap();
        let value = pcr.clone().read().unwrap();
        let e = describe(&[], 23, &value).unwrap_err();
        assert!(
            matches!(e, AnchorMismatch::NotFromHere { pcr: 23, .. }),
            "{e}"
        );
        let refused = refused_at_start(dir.path(), &pcr);
        assert!(
            refused.contains("no anchor in PCR 23, but PCR 23 holds")
                && refused.contains("no longer here")
                && refused.contains("trustmig audit anchor"),
            "{refused}"
        );
        assert_eq!(*pcr.0.lock().unwrap(), value, "nothing was extended");
        let mut op = pcr.clone();
        Audit::reanchor(dir.path(), &mut op, "old trail kept as audit.old").unwrap();
        Audit::open(dir.path())
            .unwrap()
            .anchor(Box::new(pcr.clone()))
            .unwrap();
        let list = entries(dir.path());
        let said = describe(&list, 23, &pcr.clone().read().unwrap()).unwrap();
        assert!(
            said.contains(&format!(
                "entry 0 anchored on PCR 23 at {}",
                hex::encode(value)
            )),
            "{said}"
        );
        assert!(list[0].reason.contains("old trail kept as audit.old"));
    }

    /// `tpm.audit_pcr` changed: the trail is taken on by the new PCR only from zeros. An epoch
    /// naming another PCR, added by whoever can write the file, does not get a rewritten trail
    /// past a PCR that holds its extends.
    #[test]
    fn a_new_anchor_pcr_is_taken_on_only_from_zeros() {
        let (dir, pcr, a) = anchored_trail(1);
        drop(a);
        // A forged epoch "in PCR 22" after an edit: PCR 23 holds extends, so it is refused.
        let mut list = entries(dir.path());
        list[1].vm = "another".into();
        list[0].evidence.insert("pcr".into(), "22".into());
        Entry::relink(&mut list);
        write_trail(dir.path(), &list);
        let value = pcr.clone().read().unwrap();
        let e = describe(&entries(dir.path()), 23, &value).unwrap_err();
        assert!(
            matches!(e, AnchorMismatch::NotFromHere { pcr: 23, .. }),
            "{e}"
        );
        refused_at_start(dir.path(), &pcr);
        // A PCR really changed to one at zeros: a new epoch there, in the trail.
        let fresh = MemoryPcr::default();
        let said = describe(&entries(dir.path()), 23, &[0; 32]).unwrap();
        assert!(said.contains("anchored in PCR 22, not PCR 23"), "{said}");
        Audit::open(dir.path())
            .unwrap()
            .anchor(Box::new(fresh.clone()))
            .unwrap();
        let list = entries(dir.path());
        assert!(list.last().unwrap().reason.contains("moved from PCR 22"));
    }

    /// A reset PCR (reboot) opens a new epoch, in the trail; a crash that left entries
    /// unextended is caught up at the next start.
    #[test]
    fn a_reset_opens_a_new_epoch_and_a_crash_is_caught_up() {
        let (dir, pcr, a) = anchored_trail(1);
        drop(a);
        // "Crash": entries appended by an agent whose anchoring never ran.
        let mut a = Audit::open(dir.path()).unwrap();
        a.record(event(1)).unwrap();
        a.record(event(2)).unwrap();
        drop(a);
        let value = pcr.clone().read().unwrap();
        let behind = check_anchor(&entries(dir.path()), 23, &value).unwrap();
        assert_eq!(behind.anchored, 2, "two entries not extended");
        Audit::open(dir.path())
            .unwrap()
            .anchor(Box::new(pcr.clone()))
            .unwrap();
        assert_eq!(settled(dir.path(), &pcr).anchored, 4);
        // Reboot.
        *pcr.0.lock().unwrap() = [0; 32];
        let said = describe(&entries(dir.path()), 23, &[0; 32]).unwrap();
        assert!(said.contains("was reset"), "{said}");
        Audit::open(dir.path())
            .unwrap()
            .anchor(Box::new(pcr.clone()))
            .unwrap();
        let list = entries(dir.path());
        let last = list.last().unwrap();
        assert_eq!(last.event, "anchored");
        assert!(last.reason.contains("PCR 23 was reset"), "{}", last.reason);
        assert_eq!(settled(dir.path(), &pcr).since, 4);
    }
}
