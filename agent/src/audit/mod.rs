//! The audit trail: an append-only, hash-chained JSON-lines log in the agent's home
//! (`<home>/journal/audit.jsonl`), one entry per order received, refused, committed, rolled
//! back, settled, done or revoked: who (the order's peer), what (order, VM, role) and why.
//! spec: SPEC.md §8.10
//!
//! Each entry carries the hash of the one before (`prev`) and its own (`hash` = SHA-256 of
//! `prev` and the entry's JSON with `hash` empty), and is fsync'd before the agent acts on the
//! journal record it accompanies. `trustmig audit verify` recomputes the chain and names the
//! first entry that was edited, deleted, inserted or moved. Removing entries at the *end*
//! leaves a shorter valid chain: the journal, which the agent needs to run, keeps the same
//! events, and `verify` cross-checks them.
//!
//! The TPM anchors the chain: every entry's hash is extended into a PCR nothing else extends
//! (`tpm.audit_pcr`), so a trail rewritten after its entries were anchored no longer folds to
//! the PCR's value. An `anchored` entry opens each epoch of the PCR and records its value then
//! (`base`): the first anchor of a trail, and after the PCR was reset (a reboot, or a reset of a
//! resettable PCR, in the trail for all to see). Anchoring runs on a thread of its own so no
//! journal write waits for the TPM (a hardware TPM may be busy signing for hundreds of ms); the
//! few entries not yet extended when the agent dies are extended when it next starts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub mod anchor;
pub use anchor::Anchor;

use serde::{Deserialize, Serialize};

use crate::error::AgentError;

/// The file's name in the journal directory.
pub const FILE: &str = "audit.jsonl";

/// One entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Position in the chain, from 0.
    pub seq: u64,
    /// UNIX seconds.
    pub at: u64,
    /// `order-received`, `order-refused`, `committed`, `rolled-back`, `settled`, `done`,
    /// `revoked`, `final-quote` (the late final quote, or its incident), `anchored`.
    pub event: String,
    /// Order id (hex), when known.
    #[serde(default)]
    pub order_id: String,
    /// The VM.
    #[serde(default)]
    pub vm: String,
    /// This agent's role in the order.
    #[serde(default)]
    pub role: String,
    /// The other agent's identity (hex), when known.
    #[serde(default)]
    pub peer: String,
    /// Why (an error, a settlement's reason, a summary).
    #[serde(default)]
    pub reason: String,
    /// The ed25519 key (hex) of the operator who signed the order, when known.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub operator: String,
    /// Evidence digests (hex) by name: `transcript` (the handshake, both agents' quotes),
    /// `manifest_root`, `final_digest`, `final_quote`; for `anchored`: `pcr` and `base`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub evidence: BTreeMap<String, String>,
    /// Hash of the previous entry (hex; zeros for the first).
    pub prev: String,
    /// This entry's hash (hex).
    pub hash: String,
}

impl Entry {
    /// SHA-256 of the previous hash and this entry with an empty `hash`.
    fn compute(&self) -> [u8; 32] {
        let mut bare = self.clone();
        bare.hash.clear();
        let json = serde_json::to_vec(&bare).expect("an entry serialises");
        let prev = hex::decode(&self.prev).unwrap_or_default();
        trustmig_protocol::sha256(&[&prev, &json])
    }

    /// Re-link `list` from its first entry on: each entry's `prev` and `hash` recomputed after
    /// its content changed. What a forger does to make an edited trail verify again (tests and
    /// forensics use it to show what the TPM anchor catches that the chain cannot).
    pub fn relink(list: &mut [Entry]) {
        let mut prev = list.first().map(|e| e.prev.clone()).unwrap_or_default();
        for e in list {
            e.prev = prev;
            e.hash = hex::encode(e.compute());
            prev = e.hash.clone();
        }
    }

    /// Its `hash` as bytes (zeros if it is not hex: such an entry never verifies).
    fn hash_bytes(&self) -> [u8; 32] {
        (hex::decode(&self.hash).ok())
            .and_then(|b| b.try_into().ok())
            .unwrap_or_default()
    }
}

/// What to record (the chain fields are filled in by [`Audit::record`]).
#[derive(Clone, Debug, Default)]
pub struct Event {
    /// See [`Entry::event`].
    pub event: &'static str,
    /// Order id (hex).
    pub order_id: String,
    /// VM.
    pub vm: String,
    /// Role.
    pub role: String,
    /// Peer identity (hex).
    pub peer: String,
    /// Why.
    pub reason: String,
    /// Operator key (hex).
    pub operator: String,
    /// Evidence digests.
    pub evidence: BTreeMap<String, String>,
}

/// Most characters of an entry's name or identity field (a VM name is at most 255 bytes).
const MAX_FIELD: usize = 255;
/// Most characters of an entry's reason.
const MAX_REASON: usize = 500;

/// `s`, cut to its first `n` characters.
fn clip(s: String, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((at, _)) => s[..at].to_string(),
        None => s,
    }
}

/// Events that do not change an order's state (the journal cross-check skips them).
const NOT_STATE_EVENTS: [&str; 3] = ["order-refused", "anchored", "final-quote"];

/// The open trail.
pub struct Audit {
    path: PathBuf,
    file: crate::journal::append_log::AppendLog,
    head: [u8; 32],
    seq: u64,
    /// (order id, event) of the last entry about an order (not a refusal).
    last_order_entry: Option<(String, String)>,
    /// The anchoring thread, once [`Audit::anchor`] started it.
    anchoring: Option<anchor::Anchoring>,
}

impl Audit {
    /// Open (or create) the trail in `dir`; a trail that does not verify is refused (the agent
    /// must not extend a chain it cannot vouch for), and so is a missing one beside a journal
    /// that recorded something (`trustmig init` creates the trail: it was deleted or moved
    /// aside, and a new one starts only by the operator's [`Audit::reanchor`]).
    pub fn open(dir: &Path) -> Result<Self, AgentError> {
        Self::open_or_start(dir, false)
    }

    fn open_or_start(dir: &Path, start_anew: bool) -> Result<Self, AgentError> {
        let path = dir.join(FILE);
        let (head, seq, last, torn_at) = match verify(&path) {
            Ok(v) => {
                let last = last_order_entry(&v.list);
                (v.head, v.entries, last, v.torn_at)
            }
            Err(VerifyError::Missing) if start_anew => ([0; 32], 0, None, None),
            Err(VerifyError::Missing) => match journal_records(dir) {
                Ok(0) => ([0; 32], 0, None, None),
                Ok(n) => {
                    return Err(AgentError::BadConfig {
                        path,
                        reason: format!("no audit trail, but the journal holds {n} records: the trail was deleted or moved aside; restore it, or stop the agent and run `trustmig audit anchor --reason TEXT` to start a new one (it records why)"),
                    })
                }
                Err(e) => {
                    return Err(AgentError::BadConfig {
                        path,
                        reason: format!("no audit trail, and the journal cannot be read ({e}), so whether a trail was here is not known"),
                    })
                }
            },
            Err(e) => {
                return Err(AgentError::BadConfig {
                    path,
                    reason: format!(
                        "audit trail does not verify: {e} (keep it as evidence; to start a new one, move it aside and run `trustmig audit anchor --reason TEXT`, which records why)"
                    ),
                })
            }
        };
        // A crash mid-append: that entry was never whole; cut it off, as the journal does.
        let file = crate::journal::append_log::AppendLog::open(&path, torn_at)?;
        Ok(Self {
            path,
            file,
            head,
            seq,
            last_order_entry: last,
            anchoring: None,
        })
    }

    /// The PCR the trail is anchored in, once anchored.
    pub fn anchor_pcr(&self) -> Option<u8> {
        self.anchoring.as_ref().map(|a| a.pcr)
    }

    /// Whether the trail's last entry about an order is `event` for `order_id`.
    pub fn ends_with(&self, order_id: &str, event: &str) -> bool {
        self.last_order_entry
            .as_ref()
            .is_some_and(|(o, e)| o == order_id && e == event)
    }

    /// Append `e` durably; its hash goes to the anchoring thread, if one runs.
    pub fn record(&mut self, e: Event) -> Result<(), AgentError> {
        let hash = self.append(e)?;
        if let Some(a) = &self.anchoring {
            // A send that fails (the thread is gone) leaves the entry to the catch-up at the
            // next start.
            let _ = a.tx.send(hash);
        }
        Ok(())
    }

    fn append(&mut self, e: Event) -> Result<[u8; 32], AgentError> {
        let mut entry = Entry {
            seq: self.seq,
            at: crate::unix_now(),
            event: e.event.into(),
            // Bounded: a refused order's fields are what it claims, unverified (a VM name of
            // megabytes, say), and the trail is kept and read whole at every start.
            order_id: clip(e.order_id, MAX_FIELD),
            vm: clip(e.vm, MAX_FIELD),
            role: clip(e.role, MAX_FIELD),
            peer: clip(e.peer, MAX_FIELD),
            reason: clip(e.reason, MAX_REASON),
            operator: clip(e.operator, MAX_FIELD),
            evidence: e.evidence,
            prev: hex::encode(self.head),
            hash: String::new(),
        };
        let hash = entry.compute();
        entry.hash = hex::encode(hash);
        let mut line =
            serde_json::to_vec(&entry).map_err(|e| AgentError::Journal(e.to_string()))?;
        line.push(b'\n');
        self.file.append(&line)?;
        self.head = hash;
        self.seq += 1;
        if !NOT_STATE_EVENTS.contains(&entry.event.as_str()) {
            self.last_order_entry = Some((entry.order_id, entry.event));
        }
        Ok(hash)
    }

    /// Tests: the next entry's write stops after `n` bytes and fails.
    #[cfg(test)]
    pub(crate) fn fail_after(&mut self, n: usize) {
        self.file.fail_after = Some(n);
    }

    fn broken(&self, reason: String) -> AgentError {
        AgentError::BadConfig {
            path: self.path.clone(),
            reason,
        }
    }
}

/// A trail that verified.
#[derive(Debug)]
pub struct Verified {
    /// Its entries.
    pub entries: u64,
    /// The last entry's hash.
    pub head: [u8; 32],
    /// The entries, in order.
    pub list: Vec<Entry>,
    /// Where a torn last line (a crash mid-append, no newline) starts, if there is one: not an
    /// entry, and not tampering.
    pub torn_at: Option<u64>,
}

fn last_order_entry(list: &[Entry]) -> Option<(String, String)> {
    (list.iter().rev())
        .find(|e| !NOT_STATE_EVENTS.contains(&e.event.as_str()))
        .map(|e| (e.order_id.clone(), e.event.clone()))
}

/// Why a trail does not verify: the first bad entry, named by its line.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// No trail.
    #[error("no audit trail")]
    Missing,
    /// Unreadable file.
    #[error("{0}")]
    Io(String),
    /// A line that is not an entry.
    #[error("line {line}: not an audit entry ({why})")]
    Malformed {
        /// 1-based.
        line: usize,
        /// Parser's words.
        why: String,
    },
    /// An entry out of place: one before it was deleted, or it was moved or inserted.
    #[error("line {line}: entry {seq} where entry {expected} belongs: an entry was deleted, inserted or moved")]
    OutOfPlace {
        /// 1-based.
        line: usize,
        /// Its `seq`.
        seq: u64,
        /// The `seq` that belongs there.
        expected: u64,
    },
    /// An entry in its place that names another entry before it: the one before was edited
    /// and its hash recomputed, or replaced.
    #[error(
        "line {line}: entry {seq} does not follow the entry before it (that one was rewritten)"
    )]
    BrokenLink {
        /// 1-based.
        line: usize,
        /// Its `seq`.
        seq: u64,
    },
    /// An entry whose content does not match its hash.
    #[error("line {line}: entry {seq} was edited (its hash does not match its content)")]
    Edited {
        /// 1-based.
        line: usize,
        /// Its `seq`.
        seq: u64,
    },
}

/// The journal's records in `dir` (its non-empty lines; 0 without a journal). A journal that
/// is there but cannot be read is an error naming it: whether it recorded anything is unknown.
pub(crate) fn journal_records(dir: &Path) -> Result<usize, String> {
    let path = dir.join(crate::journal::FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(text.lines().filter(|l| !l.trim().is_empty()).count()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Check the whole chain at `path`.
pub fn verify(path: &Path) -> Result<Verified, VerifyError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(VerifyError::Missing),
        Err(e) => return Err(VerifyError::Io(format!("{}: {e}", path.display()))),
    };
    let mut head = [0u8; 32];
    let mut list = Vec::new();
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let mut offset = 0u64;
    let mut torn_at = None;
    for (i, l) in lines.iter().enumerate() {
        let line = i + 1;
        if i == lines.len() - 1 && !l.ends_with('\n') {
            // Written without its newline: never acknowledged (`AppendLog`), even if it parses.
            torn_at = Some(offset);
            break;
        }
        let e: Entry = match serde_json::from_str(l.trim_end()) {
            Ok(e) => e,
            Err(e) => {
                return Err(VerifyError::Malformed {
                    line,
                    why: e.to_string(),
                })
            }
        };
        offset += l.len() as u64;
        let expected = list.len() as u64;
        if e.seq != expected {
            return Err(VerifyError::OutOfPlace {
                line,
                seq: e.seq,
                expected,
            });
        }
        if e.prev != hex::encode(head) {
            return Err(VerifyError::BrokenLink { line, seq: e.seq });
        }
        let hash = e.compute();
        if e.hash != hex::encode(hash) {
            return Err(VerifyError::Edited { line, seq: e.seq });
        }
        head = hash;
        list.push(e);
    }
    Ok(Verified {
        entries: list.len() as u64,
        head,
        list,
        torn_at,
    })
}

/// [`verify`] the trail in the journal directory `dir`, and check that it ends where the
/// journal does: the journal's last change of an order's state is the trail's last entry of an
/// order (an older journal may hold changes from before the trail existed). A trail cut at its
/// end is named so.
pub fn verify_with_journal(dir: &Path) -> Result<Verified, String> {
    let v = verify(&dir.join(FILE)).map_err(|e| e.to_string())?;
    let journal = dir.join(crate::journal::FILE);
    // No journal is an empty one; one that is there and cannot be read is unknown, not empty
    // (read as empty, a trail of real orders was blamed for them, or a cut trail passed).
    let text = match std::fs::read_to_string(&journal) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("{}: {e}", journal.display())),
    };
    let mut states = std::collections::HashMap::new();
    let mut last = None;
    // Whole lines only: a last one without its newline was never acknowledged, and the
    // journal's replay drops it too (`AppendLog`).
    for l in text.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
        let Ok(r) = serde_json::from_str::<crate::journal::Record>(l.trim_end()) else {
            continue; // the journal itself refuses a line that is not a record
        };
        if states.insert(r.order_id.clone(), r.state) != Some(r.state) {
            last = Some((r.order_id, crate::journal::audit_event(r.state)));
        }
    }
    let audited = (v.list.iter().rev())
        .find(|e| !NOT_STATE_EVENTS.contains(&e.event.as_str()))
        .map(|e| (e.order_id.clone(), e.event.as_str()));
    match (last, audited) {
        (Some(j), Some((o, ev))) if j.0 == o && j.1 == ev => Ok(v),
        (None, None) => Ok(v),
        (Some((o, ev)), _) => Err(format!(
            "the trail ends before the journal does (the journal's last change, {ev} of order {o}, is not its last entry): entries were removed from its end"
        )),
        (None, Some(_)) => Err("the trail records orders the journal does not have".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::io::Write;

    fn trail(n: usize) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Audit::open(dir.path()).unwrap();
        for i in 0..n {
            a.record(Event {
                event: "order-received",
                order_id: format!("{i:032x}"),
                vm: "vm".into(),
                role: "source".into(),
                ..Event::default()
            })
            .unwrap();
        }
        let path = dir.path().join(FILE);
        (dir, path)
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    }

    /// A missing trail is started anew only beside a journal known to be empty: one that
    /// cannot be read (here a directory where the file goes) refuses the start, naming it.
    #[test]
    fn a_missing_trail_beside_an_unreadable_journal_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let journal = dir.path().join(crate::journal::FILE);
        std::fs::create_dir(&journal).unwrap();
        let e = Audit::open(dir.path()).err().expect("refused").to_string();
        assert!(
            e.contains("the journal cannot be read") && e.contains(&journal.display().to_string()),
            "{e}"
        );
        assert!(
            !dir.path().join(FILE).exists(),
            "a refused start writes nothing"
        );
        std::fs::remove_dir(&journal).unwrap();
        Audit::open(dir.path()).expect("no journal: a new trail");
    }

    /// Verifying against a journal that is there but cannot be read (here a directory) names
    /// it, rather than checking the trail against an empty journal.
    #[test]
    fn verifying_beside_an_unreadable_journal_names_it() {
        let (dir, _) = trail(2);
        let journal = dir.path().join(crate::journal::FILE);
        std::fs::create_dir(&journal).unwrap();
        let e = verify_with_journal(dir.path()).expect_err("refused");
        assert!(e.contains(&journal.display().to_string()), "{e}");
        std::fs::remove_dir(&journal).unwrap();
        let e = verify_with_journal(dir.path()).expect_err("no journal, orders in the trail");
        assert!(!e.contains(&journal.display().to_string()), "{e}");
    }

    /// A refused order's claims go into the trail unverified: a VM name of a megabyte is cut,
    /// as the reason is, and the trail still verifies.
    #[test]
    fn an_entry_keeps_no_field_longer_than_its_bound() {
        let (dir, path) = trail(1);
        let mut a = Audit::open(dir.path()).unwrap();
        a.record(Event {
            event: "order-refused",
            vm: "é".repeat(1 << 20),
            peer: "p".repeat(1000),
            reason: "r".repeat(1000),
            ..Event::default()
        })
        .unwrap();
        let v = verify(&path).unwrap();
        let e = &v.list[1];
        assert_eq!(e.vm, "é".repeat(MAX_FIELD));
        assert_eq!(e.peer.len(), MAX_FIELD);
        assert_eq!(e.reason.len(), MAX_REASON);
        assert!(std::fs::metadata(&path).unwrap().len() < 8 << 10);
    }

    #[test]
    fn a_chain_verifies_and_survives_reopening() {
        let (dir, path) = trail(3);
        assert_eq!(verify(&path).unwrap().entries, 3);
        let mut a = Audit::open(dir.path()).unwrap();
        a.record(Event {
            event: "done",
            ..Event::default()
        })
        .unwrap();
        let v = verify(&path).unwrap();
        assert_eq!(v.entries, 4);
        assert_eq!(v.list[3].event, "done");
    }

    #[test]
    fn a_torn_last_line_is_cut_not_reported() {
        let (dir, path) = trail(2);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":2,\"at\"").unwrap();
        drop(f);
        let v = verify(&path).unwrap();
        assert_eq!((v.entries, v.torn_at.is_some()), (2, true));
        let mut a = Audit::open(dir.path()).unwrap();
        a.record(Event {
            event: "done",
            ..Event::default()
        })
        .unwrap();
        let v = verify(&path).unwrap();
        assert_eq!((v.entries, v.torn_at), (3, None));
        assert!(a.ends_with("", "done"));
    }

    /// A last entry written whole but for its newline was never acknowledged (`AppendLog`
    /// syncs the line, newline included, before it counts): cut like any torn line, so the
    /// next entry does not land on its line.
    #[test]
    fn a_whole_last_entry_without_its_newline_is_torn() {
        let (dir, path) = trail(3);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.trim_end_matches('\n')).unwrap();
        let v = verify(&path).unwrap();
        assert_eq!((v.entries, v.torn_at.is_some()), (2, true));
        let mut a = Audit::open(dir.path()).unwrap();
        a.record(Event {
            event: "done",
            ..Event::default()
        })
        .unwrap();
        let v = verify(&path).unwrap();
        assert_eq!((v.entries, v.torn_at), (3, None));
        assert_eq!(v.list[2].event, "done");
    }

    #[test]
    fn a_deleted_reordered_or_edited_entry_is_named() {
        let (_dir, path) = trail(4);
        let good = lines(&path);
        let write = |ls: &[String]| std::fs::write(&path, ls.join("\n") + "\n").unwrap();

        let mut deleted = good.clone();
        deleted.remove(1);
        write(&deleted);
        let e = verify(&path).unwrap_err().to_string();
        assert!(
            e.starts_with("line 2: entry 2 where entry 1 belongs"),
            "{e}"
        );

        let mut moved = good.clone();
        moved.swap(1, 2);
        write(&moved);
        let e = verify(&path).unwrap_err().to_string();
        assert!(
            e.starts_with("line 2: entry 2 where entry 1 belongs"),
            "{e}"
        );

        let mut edited = good.clone();
        edited[2] = edited[2].replace("\"vm\":\"vm\"", "\"vm\":\"other\"");
        write(&edited);
        let e = verify(&path).unwrap_err().to_string();
        assert_eq!(
            e,
            "line 3: entry 2 was edited (its hash does not match its content)"
        );

        // Re-chained by hand after an edit: the entry's own hash is recomputed, but the next
        // entry still names the old one.
        let mut rechained: Vec<Entry> = good
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        rechained[1].vm = "other".into();
        rechained[1].hash = hex::encode(rechained[1].compute());
        write(
            &rechained
                .iter()
                .map(|e| serde_json::to_string(e).unwrap())
                .collect::<Vec<_>>(),
        );
        let e = verify(&path).unwrap_err().to_string();
        assert_eq!(
            e,
            "line 3: entry 2 does not follow the entry before it (that one was rewritten)"
        );

        write(&[good[0].clone(), "garbage".into()]);
        let e = verify(&path).unwrap_err().to_string();
        assert!(e.starts_with("line 2: not an audit entry"), "{e}");

        // The agent refuses to extend a broken chain.
        assert!(Audit::open(path.parent().unwrap()).is_err());
    }
}
