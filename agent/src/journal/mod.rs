//! The durable journal of orders and migration states. spec: SPEC.md §3.4, §8.8
//!
//! An append-only file of JSON lines, each fsync'd before the caller acts on it. Order ids
//! are claimed once per agent; migration states record where a migration stood so that a
//! restarted agent settles what was in doubt. What may be written is decided by
//! `trustmig_protocol::settlement::Rules` (the rules the model checker checks); this module
//! only keeps the records and makes them durable. A torn last line (crash mid-write) is ignored;
//! any other malformed line is an error, since guessing could let a used order id run again.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use trustmig_protocol::commit::{Input, Output, Side, Signal};
use trustmig_protocol::order::{
    hex, OrderBody, OrderError, OrderId, OrderJournal, Role, VerifiedOrder,
};
pub use trustmig_protocol::settlement::State;
use trustmig_protocol::settlement::{Entry, Gate, Refusal, Rules, Settle, VmAction};
use trustmig_protocol::AgentId;

use crate::error::AgentError;
use append_log::AppendLog;

pub(crate) mod append_log;
mod compact;

/// One journal line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// Order id, hex.
    pub order_id: String,
    /// Our role.
    pub role: Role,
    /// VM name.
    pub vm: String,
    /// New state.
    pub state: State,
    /// Order expiry (UNIX seconds).
    pub not_after: u64,
    /// When written (UNIX seconds).
    pub at: u64,
    /// Free text (error, summary).
    #[serde(default)]
    pub note: String,
    /// The other agent's identity (hex). Source role: the destination, so that a source
    /// restarted with this order at COMMIT can ask it what became of the VM; destination role:
    /// the source, the only agent whose settlement query it answers (SPEC.md §8.8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// Source role: the destination's address (`host:port`), for the same query.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_addr: Option<String>,
    /// Source role, QEMU VMs: the VM was paused when the order claimed it, or, from a record
    /// written at the switch-over on, when it switched over (stopped, not by the migration),
    /// so it is handed over paused and a give-back leaves it paused (spec/qemu.md §4). Destination
    /// role: the source said so in its `SwitchOver` (carried from the next record on, COMMIT
    /// in a migration that commits), so the VM is handed over paused, and a restart that
    /// finds it committed here does not run it either.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused_before: bool,
    /// Destination role, QEMU VMs: the VM's QEMU was found waiting for this migration
    /// (`inmigrate`) and given to it, so a restart that finds the order interrupted discards
    /// that QEMU, and no other (`reconcile.rs`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fed: bool,
    /// The ed25519 key (hex) of the operator who signed the order (the audit trail's "by whom").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
    /// From COMMIT on: digests of the evidence the commit rests on (hex, by name; see
    /// [`crate::audit::Entry::evidence`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub evidence: BTreeMap<String, String>,
}

impl trustmig_protocol::history::Recorded for Record {
    fn entry(&self) -> Entry {
        Record::entry(self)
    }
}

impl Record {
    /// Whether its order is under way or interrupted: claimed, or committed and not yet done
    /// (a start settles it; `status` always shows it).
    pub fn in_flight(&self) -> bool {
        matches!(self.state, State::Claimed | State::Committed)
    }

    /// What the agent wrote, and nothing else: ids that are not the hex of an order id or an
    /// agent's were read as absent before (`entry`'s `peer`), and a source at COMMIT whose
    /// destination reads as unknown settles as moved without asking it.
    fn check(&self) -> Result<(), String> {
        let hex_of = |s: &str, bytes: usize| {
            s.len() == 2 * bytes && s.bytes().all(|b| b.is_ascii_hexdigit())
        };
        if !hex_of(&self.order_id, 16) {
            return Err(format!(
                "order {:?} is not a 16-byte order id in hex",
                self.order_id
            ));
        }
        match &self.peer {
            Some(p) if !hex_of(p, 32) => Err(format!(
                "order {}: peer {p:?} is not a 32-byte agent id in hex",
                self.order_id
            )),
            _ => Ok(()),
        }
    }

    /// What the settlement rules need to know of it.
    pub fn entry(&self) -> Entry {
        Entry {
            role: self.role,
            state: self.state,
            // A source can ask its destination only knowing its address too.
            peer: self
                .peer
                .as_deref()
                .filter(|_| self.role == Role::Destination || self.peer_addr.is_some())
                .and_then(|p| ::hex::decode(p).ok()?.try_into().ok()),
            flag: match self.role {
                Role::Source => self.paused_before,
                Role::Destination => self.fed,
            },
        }
    }

    fn new(order_id: String, role: Role, vm: &str, state: State, not_after: u64) -> Self {
        Self {
            order_id,
            role,
            vm: vm.into(),
            state,
            not_after,
            at: crate::unix_now(),
            note: String::new(),
            peer: None,
            peer_addr: None,
            paused_before: false,
            fed: false,
            operator: None,
            evidence: BTreeMap::new(),
        }
    }
}

/// The longest note a record keeps, in characters. Notes carry error text, some of it built
/// from what a peer or QEMU said (a list of stream record counts, a reason): one record must
/// not take megabytes of the journal that is read whole at every start.
pub const MAX_NOTE_CHARS: usize = 2000;

/// Cut `note` to `MAX_NOTE_CHARS`, marking the cut.
fn clip_note(note: &mut String) {
    if let Some((at, _)) = note.char_indices().nth(MAX_NOTE_CHARS) {
        note.truncate(at);
        note.push('…');
    }
}

/// What the journal says of each VM (by name): its current order (hex id) and last move.
type VmHistory = trustmig_protocol::history::VmHistory<String, String, Record>;

/// Take record `r` into `vms`, `prev` being its order's record before it.
fn track(vms: &mut VmHistory, prev: Option<&Record>, r: &Record) {
    let prev = prev.map(Record::entry);
    vms.track(&Rules::default(), &r.vm, &r.order_id, prev.as_ref(), r);
}

/// What a journal's lines say, replayed in order.
#[derive(Debug, Default)]
struct Replay {
    /// Each order's latest record.
    latest: HashMap<String, Record>,
    /// Each VM's current order and last move.
    vms: VmHistory,
    /// The last record that changed its order's state (the audit trail must end with it).
    last_change: Option<Record>,
    /// Where a torn last line starts (a crash mid-append).
    torn_at: Option<u64>,
    /// Each whole line's order id and byte range in the text, in order.
    lines: Vec<(String, std::ops::Range<usize>)>,
    /// The latest time any line was written at, and its order (`Journal::order_clock`).
    newest: Option<(u64, String)>,
}

impl Replay {
    /// Replay `text`, the journal at `path`. A torn last line (crash mid-append: the caller
    /// never acted on it) is set aside to be cut off; any other malformed line is an error.
    fn of(text: &str, path: &Path) -> Result<Self, AgentError> {
        let mut out = Self::default();
        let lines: Vec<&str> = text.split_inclusive('\n').collect();
        let mut offset = 0usize;
        for (i, line) in lines.iter().enumerate() {
            if i == lines.len() - 1 && !line.ends_with('\n') {
                // Written without its newline: never acknowledged (`AppendLog`), even if it
                // parses.
                out.torn_at = Some(offset as u64);
                break;
            }
            let parsed = serde_json::from_str::<Record>(line.trim_end())
                .map_err(|e| e.to_string())
                .and_then(|r| r.check().map(|()| r));
            match parsed {
                Ok(r) => {
                    track(&mut out.vms, out.latest.get(&r.order_id), &r);
                    let prev = out.latest.get(&r.order_id).map(|p| p.state);
                    if prev != Some(r.state) {
                        out.last_change = Some(r.clone());
                    }
                    out.lines
                        .push((r.order_id.clone(), offset..offset + line.len()));
                    if out.newest.as_ref().is_none_or(|(at, _)| r.at >= *at) {
                        out.newest = Some((r.at, r.order_id.clone()));
                    }
                    out.latest.insert(r.order_id.clone(), r);
                }
                Err(e) => {
                    return Err(AgentError::BadConfig {
                        path: path.to_path_buf(),
                        reason: format!("line {}: {e} (journal corrupt; refusing to guess)", i + 1),
                    })
                }
            }
            offset += line.len();
        }
        Ok(out)
    }
}

/// The journal's file in its directory (`<home>/journal/`).
pub const FILE: &str = "journal.jsonl";

/// The journal.
pub struct Journal {
    path: PathBuf,
    file: AppendLog,
    latest: HashMap<String, Record>,
    /// Each VM's current order and last move.
    vms: VmHistory,
    rules: Rules,
    /// The audit trail beside it: one entry per change of an order's state.
    audit: crate::audit::Audit,
    /// Lines in the file, and how many there were after the last compaction (or at open):
    /// a running agent tries again once `MIN_DROPPED_LINES` more were written.
    lines: usize,
    lines_after_compaction: usize,
    /// The latest time any record was written at (`order_clock`).
    newest_at: u64,
    /// This process's hold on the journal (`LOCK`), for as long as it has it open.
    _lock: File,
}

/// The file whose exclusive lock says which process has the journal open. Not the journal
/// itself: compaction replaces that file, and a lock on the old one would hold nothing.
pub const LOCK: &str = "journal.lock";

/// Take the journal in `dir` for this process, or say who has it: a second agent on the same
/// home would otherwise replay a journal the first goes on writing (and, compacting it at
/// start, replace the file under it, so that what the first wrote afterwards is lost).
pub(crate) fn lock(dir: &Path) -> Result<File, AgentError> {
    let path = dir.join(LOCK);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(AgentError::io(&path))?;
    // `doctor`, asking whether an agent holds it (`held`), holds it for a moment: a second of
    // retries waits that out; an agent holds it for good.
    let mut tries = 0;
    loop {
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(file),
            Err(e) if e == rustix::io::Errno::WOULDBLOCK && tries < 20 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => {
                return Err(AgentError::Journal(format!(
                    "{} is locked ({e}): another trustmig agent has this home's journal open; stop it first",
                    path.display()
                )))
            }
        }
    }
}

/// Whether a process (an agent) holds the journal in `dir` now: its lock is taken. Asked
/// read-only with a shared lock, released at once; an agent starting in that moment waits it
/// out (`lock`).
pub fn held(dir: &Path) -> bool {
    let Ok(file) = File::open(dir.join(LOCK)) else {
        return false;
    };
    matches!(
        rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockShared),
        Err(e) if e == rustix::io::Errno::WOULDBLOCK
    )
}

/// `Journal::order_clock` of a journal whose newest record was written at `newest_at`.
fn order_clock(newest_at: u64, clock: u64) -> u64 {
    clock.max(newest_at.saturating_sub(compact::RETENTION_SECS))
}

/// `Journal::clock_overruled` of a journal whose newest record was written at `newest_at`.
fn clock_overruled(newest_at: u64, clock: u64) -> Option<String> {
    let floor = order_clock(newest_at, clock);
    (floor > clock).then(|| {
        format!(
            "this host's clock reads {clock} (UNIX time), but the journal's newest record was written at {newest_at}: orders are checked against {floor}, a week before it, so that a clock set back cannot make an order the journal forgot valid again (SPEC.md §3.4); if the clock was ahead when that record was written, orders are refused until it passes {floor}"
        )
    })
}

/// What `doctor` and `order show` read of a journal without taking it (a running agent holds
/// it).
#[derive(Debug)]
pub struct Look {
    /// Orders a start would find interrupted ([`Journal::in_doubt`]), oldest first.
    pub interrupted: Vec<Record>,
    /// The time orders are checked against at the clock given, and why it is not that clock
    /// when the journal overrules it ([`Journal::order_time`]).
    pub order_time: (u64, Option<String>),
}

/// Read the journal in `dir` as a start replays it, without taking it or compacting it, at
/// `clock`: an empty [`Look`] when there is no journal yet; an error when a start would
/// refuse it (a corrupt line, say).
pub fn look(dir: &Path, clock: u64) -> Result<Look, AgentError> {
    let path = dir.join(FILE);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Look {
                interrupted: Vec::new(),
                order_time: (clock, None),
            })
        }
        Err(e) => return Err(AgentError::io(&path)(e)),
    };
    let replayed = Replay::of(&text, &path)?;
    let mut interrupted: Vec<Record> = (replayed.latest.into_values())
        .filter(Record::in_flight)
        .collect();
    interrupted.sort_by_key(|r| r.at);
    let newest_at = replayed.newest.map_or(0, |(at, _)| at);
    Ok(Look {
        interrupted,
        order_time: (
            order_clock(newest_at, clock),
            clock_overruled(newest_at, clock),
        ),
    })
}

impl Journal {
    /// Open (or create) the journal in `dir` and replay it; compact it first when enough of
    /// it is no longer needed (`compact.rs`).
    pub fn open(dir: &Path) -> Result<Self, AgentError> {
        fs::create_dir_all(dir).map_err(AgentError::io(dir))?;
        let lock = lock(dir)?;
        let path = dir.join(FILE);
        let mut replayed = Replay::default();
        if path.exists() {
            let text = fs::read_to_string(&path).map_err(AgentError::io(&path))?;
            replayed = Replay::of(&text, &path)?;
            if let Some(smaller) = compact::compact(&path, &text, &replayed, crate::unix_now())? {
                replayed = smaller;
            }
        }
        let lines = replayed.lines.len();
        let Replay {
            latest,
            vms,
            last_change,
            torn_at,
            newest,
            ..
        } = replayed;
        let file = AppendLog::open(&path, torn_at)?;
        // The directory entry must be durable too, or a fresh journal could vanish on crash.
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(AgentError::io(dir))?;
        let mut journal = Self {
            path,
            file,
            latest,
            vms,
            rules: Rules::default(),
            audit: crate::audit::Audit::open(dir)?,
            lines,
            lines_after_compaction: 0,
            newest_at: newest.map_or(0, |(at, _)| at),
            _lock: lock,
        };
        journal.audit_catch_up(last_change)?;
        Ok(journal)
    }

    /// A destination's VM, committed here, runs after its session ended (settled by a restart,
    /// resumed by the operator's `trustmig reconcile`, or its session's own DONE failed and is
    /// written again, `note` its record's): DONE (what
    /// `trustmig_protocol::commit::Side` journals on `VmRunning` then), so nothing resumes it
    /// again. Nothing for an order in any other state, nor a source's.
    pub fn resumed_after_session(
        &mut self,
        order_id: &OrderId,
        note: &str,
    ) -> Result<(), AgentError> {
        let mut side = Side::from_journal(self.rules, Role::Destination, self.entry(order_id));
        let outs = side.handle(Input::VmRunning);
        // What was said at COMMIT since (a late final quote's verdict) stays in the record.
        let note = match self.latest.get(&hex(order_id)) {
            Some(r) if r.state == State::Committed && !r.note.is_empty() => {
                format!("{note}; {}", r.note)
            }
            _ => note.to_string(),
        };
        self.carry_out(order_id, &mut side, outs, &note).map(drop)
    }

    /// Carry out a machine's outputs for `order_id` here, in order: each journal write made
    /// durable, then `Durable` fed and what it releases carried out in turn. Returns the
    /// outputs that are not the journal's (messages, VM actions) for the caller.
    fn carry_out(
        &mut self,
        order_id: &OrderId,
        side: &mut Side,
        outputs: Vec<Output>,
        note: &str,
    ) -> Result<Vec<Output>, AgentError> {
        let key = hex(order_id);
        let mut queue: std::collections::VecDeque<Output> = outputs.into();
        let mut rest = Vec::new();
        while let Some(o) = queue.pop_front() {
            let Output::Journal(e) = o else {
                rest.push(o);
                continue;
            };
            if self.latest.contains_key(&key) {
                self.set(order_id, e.state, note)?;
            } else {
                // An order never seen here (a settlement query about it uses its id up). Its
                // window is not known, but one that is being settled started by now, so it
                // closes within the longest window from now: compaction may drop the id a
                // week after that (before, such ids stayed for good, a peer's to add).
                use trustmig_protocol::order::{MAX_CLOCK_SKEW, MAX_ORDER_LIFETIME};
                let not_after = (crate::unix_now())
                    .saturating_add(MAX_ORDER_LIFETIME)
                    .saturating_add(MAX_CLOCK_SKEW);
                let mut r = Record::new(key.clone(), e.role, "", e.state, not_after);
                r.note = note.into();
                self.append(r)?;
            }
            queue.extend(side.handle(Input::Durable));
        }
        Ok(rest)
    }

    /// Anchor the audit trail in the TPM from now on ([`crate::audit::Audit::anchor`]).
    pub fn anchor_audit(
        &mut self,
        anchor: Box<dyn crate::audit::Anchor>,
    ) -> Result<(), AgentError> {
        self.audit.anchor(anchor)
    }

    /// Stop anchoring the audit trail (at shutdown); see [`crate::audit::Audit::stop_anchoring`].
    pub fn stop_audit_anchoring(&mut self) -> Option<crate::audit::anchor::AnchorDrain> {
        self.audit.stop_anchoring()
    }

    /// The time an order's window is checked against (SPEC.md §3.4): the clock, but never more
    /// than `compact::RETENTION_SECS` before the journal's newest record. Compaction forgets an
    /// order's id once its window closed that long ago; with the clock set back further (an
    /// unauthenticated time source, say), that order would be in its window again and its id
    /// unknown: a replay. Only a clock set back by more than the retention is overruled; one that
    /// ran ahead leaves its records' times as a floor for at most as long.
    pub fn order_clock(&self, clock: u64) -> u64 {
        order_clock(self.newest_at, clock)
    }

    /// The time to check an order against, and why it is not `clock` when the journal
    /// overrules it (for a refusal or a log line to say).
    pub fn order_time(&self, clock: u64) -> (u64, Option<String>) {
        (
            self.order_clock(clock),
            clock_overruled(self.newest_at, clock),
        )
    }

    /// Whether appends are refused: one failed and could not be cut back, so its record may be
    /// in the file, and the next start replays it (what a restart holds is then unknown here).
    pub fn is_broken(&self) -> bool {
        self.file.is_broken()
    }

    /// Why appends are refused ([`Self::is_broken`]), for `status` and `doctor`.
    pub fn broken_because(&self) -> Option<&str> {
        self.file.broken_because()
    }

    /// The PCR the audit trail is anchored in, once anchored.
    pub fn audit_anchor_pcr(&self) -> Option<u8> {
        self.audit.anchor_pcr()
    }

    /// Append `r` durably, then its audit entry when it changes the order's state. The journal
    /// is the authority: an audit write that fails is logged, and a crash between the two is
    /// made good when the journal is next opened ([`Self::audit_catch_up`]).
    pub fn append(&mut self, mut r: Record) -> Result<(), AgentError> {
        clip_note(&mut r.note);
        let prev = self.latest.get(&r.order_id).map(|p| p.state);
        let mut line = serde_json::to_vec(&r).map_err(|e| AgentError::Journal(e.to_string()))?;
        line.push(b'\n');
        if crate::fault::journal_breaks_at(r.role, r.state) {
            return self.file.append_then_break(&line);
        }
        if crate::fault::journal_fails_at(r.role, r.state) {
            return Err(AgentError::io(&self.path)(std::io::Error::other(
                "fault injection: no space left on device (the line was cut back)",
            )));
        }
        self.file.append(&line)?;
        self.lines += 1;
        self.newest_at = self.newest_at.max(r.at);
        if prev != Some(r.state) {
            if let Err(e) = self.audit.record(audit_of(&r, "")) {
                tracing::error!("could not write the audit trail: {e}");
            }
        }
        track(&mut self.vms, self.latest.get(&r.order_id), &r);
        self.latest.insert(r.order_id.clone(), r);
        Ok(())
    }

    /// Compact the journal of a running agent (SPEC.md §3.4) once `MIN_DROPPED_LINES` lines
    /// were written since the last try (`now`: UNIX seconds). Not while an order is under way
    /// (claimed, not yet committed or finished): the journal is locked for the rewrite, and a
    /// migration's COMMIT, written while its guest is stopped, must not wait for it. Returns
    /// whether the file was rewritten.
    pub fn compact_if_due(&mut self, now: u64) -> Result<bool, AgentError> {
        if self.lines < self.lines_after_compaction + compact::MIN_DROPPED_LINES
            || self.latest.values().any(|r| r.state == State::Claimed)
        {
            return Ok(false);
        }
        self.compact_running(now, compact::MIN_DROPPED_LINES)
    }

    /// Compact the file now if at least `min` lines can go: the running journal's records
    /// stay as they are in memory (compaction keeps each remaining order's and VM's records
    /// exactly, `compact::agrees`), less the orders it dropped; appends go to the new file.
    fn compact_running(&mut self, now: u64, min: usize) -> Result<bool, AgentError> {
        // A failed append that could not be cut back left a fragment: reopening would forget
        // that, and the next record would land after it. Only a restart mends it.
        if self.file.is_broken() {
            return Ok(false);
        }
        self.lines_after_compaction = self.lines;
        let text = fs::read_to_string(&self.path).map_err(AgentError::io(&self.path))?;
        let whole = Replay::of(&text, &self.path)?;
        let compacted = compact::compact_from(&self.path, &text, &whole, now, min);
        // Appends go to the file at the path now, whatever happened: an error after the rename
        // must not leave them going to the replaced file, which no one reads again. If the
        // file cannot be opened again, no append goes anywhere until a restart.
        match AppendLog::open(&self.path, None) {
            Ok(file) => self.file = file,
            Err(e) => {
                self.file
                    .refuse(format!("reopening it after compaction failed: {e}"));
                return Err(e);
            }
        }
        let Some(smaller) = compacted? else {
            return Ok(false);
        };
        self.latest.retain(|id, _| smaller.latest.contains_key(id));
        // The same of every VM (`agrees`), with only the orders that stayed.
        self.vms = smaller.vms;
        self.lines = smaller.lines.len();
        self.lines_after_compaction = self.lines;
        Ok(true)
    }

    /// After a crash between a journal record and its audit entry: append the entry of the
    /// journal's last change of state if the trail does not end with it.
    fn audit_catch_up(&mut self, last: Option<Record>) -> Result<(), AgentError> {
        let Some(r) = last else {
            return Ok(());
        };
        if !self.audit.ends_with(&r.order_id, audit_event(r.state)) {
            self.audit.record(audit_of(
                &r,
                " (entry written when the journal was reopened)",
            ))?;
        }
        Ok(())
    }

    /// The latest record of `order_id`, which must have one.
    fn latest_of(&self, order_id: &OrderId) -> Result<Record, AgentError> {
        let key = hex(order_id);
        self.latest
            .get(&key)
            .cloned()
            .ok_or_else(|| AgentError::Journal(format!("journal has no record of order {key}")))
    }

    /// Record a state change for `order_id`.
    pub fn set(
        &mut self,
        order_id: &OrderId,
        state: State,
        note: impl Into<String>,
    ) -> Result<(), AgentError> {
        let prev = self.latest_of(order_id)?;
        self.append(Record {
            state,
            at: crate::unix_now(),
            note: note.into(),
            ..prev
        })
    }

    /// This (destination) order's VM is handed over `paused` or not, as the source's
    /// `SwitchOver` said: the next record, COMMIT or a rollback, carries it as
    /// [`Record::paused_before`]. Nothing is written now: this comes in the guest's downtime,
    /// and before COMMIT a restart discards the VM whatever it was.
    pub fn hands_over(&mut self, order_id: &OrderId, paused: bool) -> Result<(), AgentError> {
        let key = hex(order_id);
        let r = self
            .latest
            .get_mut(&key)
            .ok_or_else(|| AgentError::Journal(format!("journal has no record of order {key}")))?;
        r.paused_before = paused;
        Ok(())
    }

    /// This (source) order's VM is handed over `paused` or not, which is not what the journal
    /// said (an operator stopped or ran the guest during the migration): journalled, fsync'd,
    /// as soon as the agent sees it in QEMU's events, and at the switch-over if it saw it only
    /// then, because a restart must give the guest back as it was and the source's QEMU
    /// (`postmigrate` once it switched over, either way) cannot tell.
    pub fn hand_over_changed(
        &mut self,
        order_id: &OrderId,
        paused: bool,
    ) -> Result<(), AgentError> {
        let prev = self.latest_of(order_id)?;
        self.append(Record {
            paused_before: paused,
            at: crate::unix_now(),
            note: if paused {
                "handed over paused: stopped during the migration, not by it".into()
            } else {
                "handed over running: run again during the migration".into()
            },
            ..prev
        })
    }

    /// Record that the hypervisor waiting for this claimed (destination) order was handed to
    /// it ([`Record::fed`]).
    pub fn mark_fed(&mut self, order_id: &OrderId) -> Result<(), AgentError> {
        let prev = self.latest_of(order_id)?;
        self.append(Record {
            fed: true,
            at: crate::unix_now(),
            note: "the VM's QEMU waits for this migration".into(),
            ..prev
        })
    }

    /// The QEMU handed to a destination order is gone (quit, or found holding nothing of it):
    /// the order's records say `fed` no more, so no later restart discards a QEMU for it (a
    /// fresh one an operator started for the next order, say).
    pub fn mark_discarded(&mut self, order_id: &OrderId) -> Result<(), AgentError> {
        let prev = self.latest_of(order_id)?;
        if !prev.fed {
            return Ok(());
        }
        self.append(Record {
            fed: false,
            at: crate::unix_now(),
            note: "its QEMU was discarded".into(),
            ..prev
        })
    }

    /// Audit an order this agent refused before claiming it (nothing else records it).
    /// Whether the entry was written: a failure is logged here, and a caller that counts what
    /// it did not audit keeps this one in the count.
    pub fn audit_refused(&mut self, e: crate::audit::Event) -> bool {
        match self.audit.record(crate::audit::Event {
            event: "order-refused",
            ..e
        }) {
            Ok(()) => true,
            Err(err) => {
                tracing::error!("could not write the audit trail: {err}");
                false
            }
        }
    }

    /// The rules this journal follows.
    pub fn rules(&self) -> Rules {
        self.rules
    }

    /// The latest entry of `order_id`, as the rules see it.
    pub fn entry(&self, order_id: &OrderId) -> Option<Entry> {
        self.latest.get(&hex(order_id)).map(Record::entry)
    }

    /// Journal COMMIT for an order still claimed here, the peer's evidence having verified
    /// (`gate`). Refused once the order was rolled back or settled: after this destination
    /// answered a settlement query "not committed", no late `Commit` may make it commit after
    /// all (SPEC.md §8.8).
    pub fn commit(
        &mut self,
        order_id: &OrderId,
        gate: Gate,
        evidence: BTreeMap<String, String>,
    ) -> Result<(), AgentError> {
        let state = self
            .rules
            .commit(self.entry(order_id).as_ref(), gate)
            .map_err(|e| refused(order_id, e))?;
        let prev = self.latest_of(order_id)?;
        self.append(Record {
            state,
            at: crate::unix_now(),
            note: String::new(),
            evidence,
            ..prev
        })
    }

    /// After DONE (or at COMMIT, while a DONE that failed is written again): what became of
    /// the late final quote (SPEC.md §8.7), with its digest when
    /// one was sent or received, and `note` (an incident says so) after what DONE said (the
    /// downtime, a hand-over paused: `trustmig status` shows the latest note): journalled on
    /// the order and audited as `final-quote`.
    pub fn late_quote(
        &mut self,
        order_id: &OrderId,
        quote: Option<&[u8]>,
        note: &str,
    ) -> Result<(), AgentError> {
        let mut r = self.latest_of(order_id)?;
        if let Some(q) = quote {
            let digest = ::hex::encode(trustmig_protocol::sha256(&[q]));
            r.evidence.insert("final_quote".into(), digest);
        }
        r.at = crate::unix_now();
        r.note = match r.note.as_str() {
            "" => note.into(),
            done => format!("{done}; {note}"),
        };
        self.append(r.clone())?;
        let audited = self.audit.record(crate::audit::Event {
            event: "final-quote",
            ..audit_of(&r, "")
        });
        if let Err(e) = audited {
            tracing::error!("could not write the audit trail: {e}");
        }
        Ok(())
    }

    /// Settle a source order that is at COMMIT, in doubt, as `how` says: journal what the
    /// rules make of it, only if it still is in doubt (the destination's answer, a retry and
    /// the operator may race). Returns what to do with the VM, `None` when it was settled
    /// already; an operator's override of an order not in doubt is refused.
    pub fn settle(
        &mut self,
        order_id: &OrderId,
        how: Settle,
        note: impl Into<String>,
    ) -> Result<Option<VmAction>, AgentError> {
        // No session runs here for it: the machine finds it in doubt, or not, from the journal.
        let mut side = Side::from_journal(self.rules, Role::Source, self.entry(order_id));
        let outs = match how {
            Settle::Answer { committed } => side.handle(Input::Answer { committed }),
            how => side.operator(how).map_err(|e| refused(order_id, e))?,
        };
        let rest = self.carry_out(order_id, &mut side, outs, &note.into())?;
        Ok(rest.into_iter().find_map(|o| match o {
            Output::Vm(act) => Some(act),
            _ => None,
        }))
    }

    /// Journal an order rolled back, if the rules let it (only what never got past its claim).
    /// Returns whether it was rolled back.
    pub fn roll_back_if_claimed(
        &mut self,
        order_id: &OrderId,
        note: impl Into<String>,
    ) -> Result<bool, AgentError> {
        match self.rules.roll_back(self.entry(order_id).as_ref()) {
            Some(state) => self.set(order_id, state, note).map(|()| true),
            None => Ok(false),
        }
    }

    /// Answer a source's settlement query as the destination (SPEC.md §8.8 rule 3): `true`
    /// when this agent journalled COMMIT for the order (it owns the VM). What the rules say to
    /// journal first is journalled first (an order claimed or never seen here is rolled back,
    /// its id used up). The asker learns no more than that it gets no answer (not who the
    /// source is).
    pub fn settle_query(
        &mut self,
        order_id: &OrderId,
        asker: &AgentId,
    ) -> Result<bool, AgentError> {
        let key = hex(order_id);
        let note = "settlement: the source asked; never committed here";
        let mut side = Side::from_journal(self.rules, Role::Destination, self.entry(order_id));
        let outs = side.query(asker).map_err(|e| match e {
            Refusal::NotItsSource => AgentError::Journal(format!(
                "order {key}: no settlement answer for agent {}, which did not send it",
                hex(asker)
            )),
            e => refused(order_id, e),
        })?;
        let rest = self.carry_out(order_id, &mut side, outs, note)?;
        rest.into_iter()
            .find_map(|o| match o {
                Output::Send(Signal::Answer { committed, .. }) => Some(committed),
                _ => None,
            })
            .ok_or_else(|| AgentError::Journal(format!("order {key}: no settlement answer")))
    }

    /// Revoke an order this agent has not used, as `role` (what it would have been): it can
    /// never be claimed here. Refused for an order already used here.
    pub fn revoke(&mut self, body: &OrderBody, role: Role) -> Result<(), AgentError> {
        let state = self
            .rules
            .revoke(self.entry(&body.order_id).as_ref())
            .map_err(|e| refused(&body.order_id, e))?;
        let mut r = Record::new(hex(&body.order_id), role, &body.vm, state, body.not_after);
        r.note = "revoked by the operator".into();
        self.append(r)
    }

    /// Claim an order id for `role`/`vm`.
    pub fn claim_for(
        &mut self,
        id: &OrderId,
        role: Role,
        vm: &str,
        not_after: u64,
    ) -> Result<(), OrderError> {
        self.claim(id, role, vm, not_after, |_| {})
    }

    /// Claim an order as its source, remembering its destination for settlement, and whether
    /// the VM was paused.
    pub fn claim_as_source(
        &mut self,
        order: &VerifiedOrder,
        paused_before: bool,
    ) -> Result<(), OrderError> {
        let body = order.body();
        self.claim(order.id(), Role::Source, &body.vm, body.not_after, |r| {
            r.peer = Some(hex(&body.destination));
            r.peer_addr = Some(body.destination_addr.clone());
            r.paused_before = paused_before;
            r.operator = Some(hex(&order.signed().operator));
        })
    }

    /// Claim an order as its destination, remembering its source: the one agent whose
    /// settlement query about it is answered.
    pub fn claim_as_destination(
        &mut self,
        body: &OrderBody,
        operator: &[u8; 32],
    ) -> Result<(), OrderError> {
        let (id, vm) = (&body.order_id, &body.vm);
        self.claim(id, Role::Destination, vm, body.not_after, |r| {
            r.peer = Some(hex(&body.source));
            r.operator = Some(hex(operator));
        })
    }

    fn claim(
        &mut self,
        id: &OrderId,
        role: Role,
        vm: &str,
        not_after: u64,
        fill: impl FnOnce(&mut Record),
    ) -> Result<(), OrderError> {
        let key = hex(id);
        match self.rules.claim(self.entry(id).as_ref()) {
            Ok(()) => {}
            Err(Refusal::Revoked) => return Err(OrderError::Revoked(key)),
            Err(_) => return Err(OrderError::Replayed(key)),
        }
        let mut r = Record::new(key, role, vm, State::Claimed, not_after);
        fill(&mut r);
        self.append(r)
            .map_err(|e| OrderError::Journal(e.to_string()))
    }

    /// The latest record of `order_id`.
    pub fn record(&self, order_id: &OrderId) -> Option<&Record> {
        self.latest.get(&hex(order_id))
    }

    /// Latest record per order, newest first.
    pub fn records(&self) -> Vec<Record> {
        let mut v: Vec<Record> = self.latest.values().cloned().collect();
        v.sort_by_key(|r| std::cmp::Reverse(r.at));
        v
    }

    /// The latest record of `vm`'s current order here (`VmHistory`: the order that last took
    /// the VM, which is not simply the last to write about it): what this host last did with
    /// the VM, for reconciling its hypervisor state after a restart (`reconcile.rs`) and for
    /// whether it may send it (`holds_vm`).
    pub fn last_order_of(&self, vm: &str) -> Option<&Record> {
        self.latest.get(self.vms.order(vm)?)
    }

    /// Whether `vm` left this agent: the latest record (in journal order) that moved it is a
    /// source-side COMMIT, or what settled one as moved, so the destination owns it (or may: in
    /// doubt) and it must not start here again. Orders that never committed do not count: a
    /// refused or rolled-back order leaves the VM wherever it was.
    pub fn migrated_away(&self, vm: &str) -> bool {
        self.vms.migrated_away(&self.rules, vm)
    }

    /// Whether an order that sends `vm` from here is under way (claimed) or at COMMIT,
    /// unsettled: the VM may come back or run on its destination, so no other copy of it may
    /// arrive here meanwhile.
    pub fn leaving(&self, vm: &str) -> bool {
        self.leaving_order(vm).is_some()
    }

    /// The latest record of the order that sends `vm` from here, if one does ([`Self::leaving`]).
    pub fn leaving_order(&self, vm: &str) -> Option<&Record> {
        (self.latest.values()).find(|r| r.vm == vm && self.rules.leaving(&r.entry()))
    }

    /// Whether this host's copy of `vm` is the VM and free to be sent, by its current order
    /// here (`Rules::holds_vm`): never migrated, given back, or arrived and ran here.
    pub fn holds_vm(&self, vm: &str) -> Result<(), trustmig_protocol::settlement::NotHeld> {
        self.rules
            .holds_vm(self.last_order_of(vm).map(Record::entry).as_ref())
    }

    /// Whether an order that sent `vm` from here is at COMMIT, unsettled (in doubt).
    pub fn in_doubt_as_source(&self, vm: &str) -> bool {
        self.doubt_as_source(vm).is_some()
    }

    /// The order `vm` is in doubt after as its source ([`Self::in_doubt_as_source`]).
    pub fn doubt_as_source(&self, vm: &str) -> Option<&Record> {
        self.latest
            .values()
            .find(|r| r.vm == vm && r.role == Role::Source && r.state == State::Committed)
    }

    /// Migrations interrupted by a crash or restart: not Done, RolledBack or Settled; oldest
    /// first, so that what a restart writes for them follows the order they happened in.
    pub fn in_doubt(&self) -> Vec<Record> {
        let mut v: Vec<Record> = (self.latest.values())
            .filter(|r| r.in_flight())
            .cloned()
            .collect();
        v.sort_by_key(|r| r.at);
        v
    }
}

/// The audit entry of record `r`.
fn audit_of(r: &Record, suffix: &str) -> crate::audit::Event {
    crate::audit::Event {
        event: audit_event(r.state),
        order_id: r.order_id.clone(),
        vm: r.vm.clone(),
        role: r.role.to_string(),
        peer: r.peer.clone().unwrap_or_default(),
        reason: format!("{}{suffix}", r.note),
        operator: r.operator.clone().unwrap_or_default(),
        evidence: r.evidence.clone(),
    }
}

/// The audit trail's name for a record's new state.
pub(crate) fn audit_event(s: State) -> &'static str {
    match s {
        State::Claimed => "order-received",
        State::Committed => "committed",
        State::Done => "done",
        State::RolledBack => "rolled-back",
        State::Settled => "settled",
        State::Revoked => "revoked",
    }
}

/// A rule's refusal, naming the order.
fn refused(order_id: &OrderId, e: Refusal) -> AgentError {
    AgentError::Journal(format!("order {}: {e}", hex(order_id)))
}

/// The destination handshake claims ids through this adapter (with the order's source, for
/// settlement).
/// The journal is locked for the claim alone: the handshake step that claims is not the one
/// that quotes, but no journal write (another migration's COMMIT) should wait on a handshake.
pub struct ClaimAsDestination<'a>(pub &'a std::sync::Mutex<Journal>);

impl OrderJournal for ClaimAsDestination<'_> {
    fn claim(&mut self, order: &OrderBody, operator: &[u8; 32]) -> Result<(), OrderError> {
        (self.0.lock().expect("journal lock")).claim_as_destination(order, operator)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// `held` tells an agent's lock from none, and an agent's start waits out the moment a
    /// `doctor` holds the lock to ask (it was refused as "another agent").
    #[test]
    fn the_journal_lock_is_seen_held_and_a_brief_look_is_waited_out() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!held(dir.path()), "no lock file yet");
        let agent = lock(dir.path()).unwrap();
        assert!(held(dir.path()));
        assert!(lock(dir.path()).is_err(), "a second agent is refused");
        drop(agent);
        assert!(!held(dir.path()));
        let look = File::open(dir.path().join(LOCK)).unwrap();
        rustix::fs::flock(&look, rustix::fs::FlockOperation::NonBlockingLockShared).unwrap();
        let released = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(200));
            drop(look);
        });
        assert!(
            lock(dir.path()).is_ok(),
            "the start waited for the look to end"
        );
        released.join().unwrap();
    }

    /// An order for `vm` from agent [1; 32] to [2; 32], id [`id`; 16].
    fn order(id: u8, vm: &str) -> OrderBody {
        OrderBody {
            v: 1,
            order_id: [id; 16],
            vm: vm.into(),
            source: [1; 32],
            destination: [2; 32],
            destination_addr: "127.0.0.1:1".into(),
            limits: trustmig_protocol::order::Limits {
                downtime_ms: 300,
                bandwidth_bps: 0,
                max_rounds: 10,
                on_nonconvergence: trustmig_protocol::order::NonConvergence::Force,
            },
            not_before: 0,
            not_after: 10,
            strict_final_quote: false,
        }
    }

    /// A record whose order id or peer is not what the agent writes (a hand edit, bit rot) is
    /// refused by line, as one that does not parse: read as "no peer", a source's COMMIT would
    /// settle as moved without asking its destination.
    #[test]
    fn a_record_with_a_mangled_id_is_refused_by_line() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        let body = order(3, "a");
        j.claim_as_destination(&body, &[9; 32]).unwrap();
        drop(j);
        let file = dir.path().join(FILE);
        let good = fs::read_to_string(&file).unwrap();
        Journal::open(dir.path()).expect("as written");
        let (peer, id) = (hex(&body.source), hex(&body.order_id));
        for (from, to, says) in [
            (peer.as_str(), &peer[..62], "is not a 32-byte agent id"),
            (peer.as_str(), "zz", "is not a 32-byte agent id"),
            (id.as_str(), "0303", "is not a 16-byte order id"),
        ] {
            fs::write(&file, good.replace(from, to)).unwrap();
            let e = Journal::open(dir.path()).err().expect("refused");
            let e = e.to_string();
            assert!(e.contains("line ") && e.contains(says), "{e}");
        }
    }

    /// One process at a time: a second open of the same journal is refused by name until the
    /// first is closed.
    #[test]
    fn a_journal_open_elsewhere_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let e = Journal::open(dir.path()).err().expect("refused");
        assert!(e.to_string().contains("another trustmig agent"), "{e}");
        drop(j);
        Journal::open(dir.path()).expect("free again");
    }

    /// A VM handed over paused: nothing is written when the source says so, the COMMIT line
    /// carries it, and a destination record's rules flag stays what it was fed (a source's is
    /// its own `paused_before`).
    #[test]
    fn a_paused_hand_over_rides_on_the_commit_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        let id = [3; 16];
        j.claim_for(&id, Role::Destination, "a", 10).unwrap();
        let lines = |d: &Path| fs::read_to_string(d.join(FILE)).unwrap().lines().count();
        let before = lines(dir.path());
        j.hands_over(&id, true).unwrap();
        assert_eq!(lines(dir.path()), before, "nothing written in the downtime");
        assert!(j.hands_over(&[4; 16], true).is_err(), "an unknown order");
        j.set(&id, State::Committed, "").unwrap();
        drop(j);
        let j = Journal::open(dir.path()).unwrap();
        let r = j.record(&id).unwrap();
        assert!(r.paused_before && r.state == State::Committed);
        assert!(
            !r.entry().flag,
            "a destination's flag is `fed`, not `paused_before`"
        );
        let mut source = r.clone();
        source.role = Role::Source;
        assert!(source.entry().flag, "a source's flag is `paused_before`");
    }

    /// A source's hand-over that is not what its claim read is journalled at once, both ways,
    /// and a reopened journal (a restart) gives the guest back as it was at the switch-over.
    #[test]
    fn a_changed_source_hand_over_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        let (paused, ran) = ([5; 16], [6; 16]);
        j.claim_for(&paused, Role::Source, "a", 10).unwrap();
        j.claim_for(&ran, Role::Source, "b", 10).unwrap();
        j.hand_over_changed(&paused, true).unwrap();
        j.hand_over_changed(&ran, true).unwrap();
        j.hand_over_changed(&ran, false).unwrap();
        assert!(
            j.hand_over_changed(&[7; 16], true).is_err(),
            "an unknown order"
        );
        drop(j);
        let j = Journal::open(dir.path()).unwrap();
        let flag = |id| j.entry(&id).map(|e| (e.state, e.flag));
        assert_eq!(flag(paused), Some((State::Claimed, true)));
        assert_eq!(flag(ran), Some((State::Claimed, false)));
    }

    /// A journal write that fails part-way (a full disk) is not in the file: the agent goes on
    /// journalling, and it starts again on what it wrote (before, the next record landed
    /// after the fragment and the next start refused the journal as corrupt); the audit trail
    /// the same. A last line written whole but for its newline was never acknowledged.
    #[test]
    fn a_failed_write_leaves_no_fragment_and_the_agent_starts_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        let (a, b) = ([5; 16], [6; 16]);
        j.claim_for(&a, Role::Source, "a", 10).unwrap();
        j.file.fail_after = Some(20);
        assert!(j.set(&a, State::Committed, "").is_err());
        j.audit.fail_after(20);
        j.claim_for(&b, Role::Source, "b", 10).unwrap();
        j.set(&b, State::RolledBack, "").unwrap();
        drop(j);
        let mut j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.entry(&a).map(|e| e.state), Some(State::Claimed));
        assert_eq!(j.entry(&b).map(|e| e.state), Some(State::RolledBack));
        crate::audit::verify(&dir.path().join(crate::audit::FILE)).expect("the trail verifies");
        // A whole record without its newline: cut at the next start.
        let path = dir.path().join(FILE);
        let line = serde_json::to_vec(j.record(&a).unwrap()).unwrap();
        j.set(&a, State::RolledBack, "").unwrap();
        drop(j);
        let text = fs::read(&path).unwrap();
        fs::write(&path, [&text[..], &line[..]].concat()).unwrap();
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.entry(&a).map(|e| e.state), Some(State::RolledBack));
        assert_eq!(
            fs::read(&path).unwrap(),
            text,
            "the unacknowledged line is cut"
        );
    }

    /// The late quote's verdict follows what DONE said (`trustmig status` shows the latest
    /// note: a paused hand-over said at DONE must not be replaced by the verdict).
    #[test]
    fn the_late_quotes_verdict_follows_dones_note() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        let id = [8; 16];
        j.claim_for(&id, Role::Destination, "a", 10).unwrap();
        j.set(&id, State::Committed, "").unwrap();
        j.set(&id, State::Done, "handed over paused here").unwrap();
        j.late_quote(&id, Some(b"quote"), "late final quote verified")
            .unwrap();
        let r = j.record(&id).unwrap();
        assert_eq!(r.note, "handed over paused here; late final quote verified");
        assert!(r.evidence.contains_key("final_quote"));
    }

    /// A note longer than `MAX_NOTE_CHARS` (error text a peer may have shaped) is cut, on a
    /// character boundary, and marked; the record is kept.
    #[test]
    fn long_notes_are_clipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        j.claim_for(&[1; 16], Role::Destination, "a", 10).unwrap();
        let long = "é".repeat(MAX_NOTE_CHARS * 3);
        j.set(&[1; 16], State::RolledBack, long).unwrap();
        drop(j);
        let j = Journal::open(dir.path()).unwrap();
        let note = &j.latest[&hex(&[1; 16])].note;
        assert_eq!(note.chars().count(), MAX_NOTE_CHARS + 1);
        assert!(note.ends_with('…') && note.starts_with("éé"), "{note}");
    }

    /// SPEC.md §8.8 rule 3 from the destination's side: "not committed" is journalled before
    /// it is answered, so a late `Commit` cannot commit afterwards; a committed order answers
    /// "committed" and no failure after COMMIT rolls it back.
    #[test]
    fn settlement_answers_are_final() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        let src = [7; 32];
        // Claimed, never committed: answered "no", and COMMIT is refused from then on.
        j.claim_for(&[1; 16], Role::Destination, "a", 10).unwrap();
        assert!(!j.settle_query(&[1; 16], &src).unwrap());
        let e = j.commit(&[1; 16], Gate::Open, BTreeMap::new()).unwrap_err();
        assert!(
            matches!(&e, AgentError::Journal(m) if m.contains("refusing to commit")),
            "{e}"
        );
        assert!(
            !j.settle_query(&[1; 16], &src).unwrap(),
            "the answer does not change"
        );
        // Committed: "yes"; a later failure does not roll it back.
        j.claim_for(&[2; 16], Role::Destination, "b", 10).unwrap();
        j.commit(&[2; 16], Gate::Open, BTreeMap::new()).unwrap();
        assert!(!j.roll_back_if_claimed(&[2; 16], "send failed").unwrap());
        assert!(j.settle_query(&[2; 16], &src).unwrap());
        // Never seen: "no", and the id is used up (survives a restart) for as long as an
        // order being settled now can be valid: then compaction may drop it.
        let before = crate::unix_now();
        assert!(!j.settle_query(&[3; 16], &src).unwrap());
        let window =
            trustmig_protocol::order::MAX_ORDER_LIFETIME + trustmig_protocol::order::MAX_CLOCK_SKEW;
        let not_after = j.record(&[3; 16]).unwrap().not_after;
        assert!((before + window..=crate::unix_now() + window).contains(&not_after));
        drop(j);
        let mut j = Journal::open(dir.path()).unwrap();
        assert!(matches!(
            j.claim_for(&[3; 16], Role::Destination, "c", 10),
            Err(OrderError::Replayed(_))
        ));
        assert!(j.commit(&[1; 16], Gate::Open, BTreeMap::new()).is_err());
        // An order this agent sent is not its to answer.
        j.claim_for(&[4; 16], Role::Source, "d", 10).unwrap();
        assert!(j.settle_query(&[4; 16], &src).is_err());
    }

    /// A destination answers only the source its order named: another trusted agent can
    /// neither learn the outcome nor make the destination refuse a COMMIT still to come.
    #[test]
    fn settlement_is_answered_to_the_orders_source_only() {
        let dir = tempfile::tempdir().unwrap();
        let j = std::sync::Mutex::new(Journal::open(dir.path()).unwrap());
        let body = order(5, "v");
        ClaimAsDestination(&j).claim(&body, &[9; 32]).unwrap();
        let mut j = j.into_inner().unwrap();
        let e = j.settle_query(&[5; 16], &[3; 32]).unwrap_err().to_string();
        assert!(e.contains("which did not send it"), "{e}");
        assert!(
            !e.contains(&hex(&[1; 32])),
            "the source is not disclosed: {e}"
        );
        drop(j);
        // The source is on record across a restart; the intruder changed nothing.
        let mut j = Journal::open(dir.path()).unwrap();
        assert!(j.settle_query(&[5; 16], &[3; 32]).is_err());
        j.commit(&[5; 16], Gate::Open, BTreeMap::new())
            .expect("still claimed: the order may commit");
        assert!(j.settle_query(&[5; 16], &[1; 32]).unwrap());
    }

    /// SPEC.md §8.8 rule 4: while an order that sent a VM is in doubt, a later order for the
    /// same VM that never committed (refused: the VM is not here) must not make the journal
    /// forget that the VM may run elsewhere, or a restart would start a second copy.
    #[test]
    fn only_orders_that_committed_move_a_vm() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        j.claim_for(&[1; 16], Role::Source, "vm", 10).unwrap();
        j.set(&[1; 16], State::Committed, "").unwrap();
        assert!(j.migrated_away("vm") && j.in_doubt_as_source("vm") && j.leaving("vm"));
        j.claim_for(&[2; 16], Role::Source, "vm", 10).unwrap();
        j.set(&[2; 16], State::RolledBack, "no VM named vm runs here")
            .unwrap();
        j.claim_for(&[3; 16], Role::Destination, "vm", 10).unwrap();
        j.set(&[3; 16], State::RolledBack, "refused").unwrap();
        assert!(j.migrated_away("vm"), "refused orders do not bring it back");
        drop(j);
        let mut j = Journal::open(dir.path()).unwrap();
        assert!(
            j.migrated_away("vm") && j.in_doubt_as_source("vm"),
            "nor after a restart"
        );
        // Settled "not committed": the VM runs here again.
        j.set(&[1; 16], State::RolledBack, "settled: never committed")
            .unwrap();
        assert!(!j.migrated_away("vm") && !j.in_doubt_as_source("vm") && !j.leaving("vm"));
        // An order under way (claimed) is leaving too, not in doubt.
        j.claim_for(&[4; 16], Role::Source, "vm", 10).unwrap();
        assert!(j.leaving("vm") && !j.in_doubt_as_source("vm"));
        drop(j);
        assert!(!Journal::open(dir.path()).unwrap().migrated_away("vm"));
    }

    /// What a restart reconciles a VM's hypervisor with is the latest record that touched it:
    /// not a revocation, nor an arrival refused before the VM's hypervisor was handed over.
    #[test]
    fn only_records_that_touch_the_vm_are_its_last_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        j.claim_for(&[1; 16], Role::Source, "vm", 10).unwrap();
        j.set(&[1; 16], State::RolledBack, "failed").unwrap();
        let mut body = order(2, "vm");
        j.revoke(&body, Role::Source).unwrap();
        body.order_id = [3; 16];
        j.claim_as_destination(&body, &[9; 32]).unwrap();
        j.set(&[3; 16], State::RolledBack, "refused: not waiting")
            .unwrap();
        assert_eq!(j.last_order_of("vm").unwrap().order_id, hex(&[1; 16]));
        drop(j);
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.last_order_of("vm").unwrap().order_id, hex(&[1; 16]));
    }

    /// A VM arrives under order A whose `Resumed` is lost (A stays at COMMIT), then leaves
    /// under order B. A's later records — what a restart settles it to, a late quote's verdict
    /// — must not make A the VM's order again: before, the restart's SETTLED made the VM
    /// "here" (a synthetic VM started, a QEMU one `cont`ed) while it ran on B's destination.
    #[test]
    fn an_older_orders_late_records_do_not_take_back_a_vm_that_left() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        let (a, b, c) = ([1; 16], [2; 16], [3; 16]);
        j.claim_as_destination(&order(1, "vm"), &[9; 32]).unwrap();
        j.mark_fed(&a).unwrap();
        j.set(&a, State::Committed, "").unwrap();
        j.set(&a, State::Committed, "resumed here; INCIDENT: Resumed lost")
            .unwrap();
        let gone = |j: &Journal, mover: &[u8; 16]| {
            assert!(j.migrated_away("vm"));
            assert_eq!(j.last_order_of("vm").unwrap().order_id, hex(mover));
        };
        j.claim_for(&b, Role::Source, "vm", 10).unwrap();
        j.set(&b, State::Committed, "").unwrap();
        j.set(&b, State::Done, "").unwrap();
        gone(&j, &b);
        // A restart settles A (`settle_in_doubt`), and a late quote's verdict lands on it.
        j.set(&a, State::Settled, "committed before restart")
            .unwrap();
        j.late_quote(&a, None, "INCIDENT: no late final quote")
            .unwrap();
        gone(&j, &b);
        drop(j);
        let mut j = Journal::open(dir.path()).unwrap();
        gone(&j, &b);
        // The VM comes back under a newer order C: C is its order, and it is here again.
        j.claim_as_destination(&order(3, "vm"), &[9; 32]).unwrap();
        j.mark_fed(&c).unwrap();
        j.set(&c, State::Committed, "").unwrap();
        assert!(!j.migrated_away("vm"));
        assert_eq!(j.last_order_of("vm").unwrap().order_id, hex(&c));
    }

    /// What the journal gives this host to send (`holds_vm`): not a copy that arrived and is
    /// still to be discarded (QEMU shows it paused, like a VM paused by its operator), nor one
    /// committed here that has not run since (COMMIT: its `cont` may have failed; SETTLED: a
    /// restart's reconciliation has not resumed it yet).
    #[test]
    fn only_the_vm_here_is_free_to_send() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        assert!(j.holds_vm("vm").is_ok(), "never migrated");
        let (a, b) = ([1; 16], [2; 16]);
        j.claim_as_destination(&order(1, "vm"), &[9; 32]).unwrap();
        assert!(
            j.holds_vm("vm").is_ok(),
            "an arrival not handed the VM's QEMU touches nothing"
        );
        j.mark_fed(&a).unwrap();
        assert!(j.holds_vm("vm").is_err(), "arriving");
        j.set(&a, State::RolledBack, "").unwrap();
        assert!(
            j.holds_vm("vm").is_err(),
            "rolled back, its QEMU still to be discarded"
        );
        j.mark_discarded(&a).unwrap();
        assert!(
            j.holds_vm("vm").is_ok(),
            "discarded: whatever runs here is not its"
        );
        j.claim_as_destination(&order(2, "vm"), &[9; 32]).unwrap();
        j.mark_fed(&b).unwrap();
        j.set(&b, State::Committed, "").unwrap();
        assert!(j.holds_vm("vm").is_err(), "committed here, not run yet");
        j.set(&b, State::Settled, "committed before restart")
            .unwrap();
        assert!(
            j.holds_vm("vm").is_err(),
            "settled at a restart, not yet resumed"
        );
        j.set(&b, State::Done, "resumed here after a restart")
            .unwrap();
        assert!(j.holds_vm("vm").is_ok());
    }

    /// A destination order left at COMMIT (its `Resumed` lost) and a newer source order that
    /// claimed the VM, both interrupted: a restart settles both, in either order. The newer
    /// one is the VM's (its rollback gives the VM back as it was), not the older one's SETTLED.
    #[test]
    fn a_restart_settling_an_older_order_leaves_the_vm_to_the_newer_one() {
        for older_first in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let mut j = Journal::open(dir.path()).unwrap();
            let (a, b) = ([1; 16], [2; 16]);
            j.claim_as_destination(&order(1, "vm"), &[9; 32]).unwrap();
            j.mark_fed(&a).unwrap();
            j.set(&a, State::Committed, "").unwrap();
            j.claim_for(&b, Role::Source, "vm", 10).unwrap();
            let settle = |j: &mut Journal, id: &[u8; 16], state| {
                j.set(id, state, "interrupted: settled at restart").unwrap()
            };
            if older_first {
                settle(&mut j, &a, State::Settled);
                settle(&mut j, &b, State::RolledBack);
            } else {
                settle(&mut j, &b, State::RolledBack);
                settle(&mut j, &a, State::Settled);
            }
            let check = |j: &Journal| {
                let last = j.last_order_of("vm").unwrap();
                assert_eq!(
                    (last.order_id.as_str(), last.state),
                    (hex(&b).as_str(), State::RolledBack),
                    "older first: {older_first}"
                );
                assert!(!j.migrated_away("vm"));
            };
            check(&j);
            drop(j);
            check(&Journal::open(dir.path()).unwrap());
        }
    }

    /// A crash after a journal record and before its audit entry: the entry is written when
    /// the journal is next opened, and the trail verifies against the journal again.
    #[test]
    fn the_audit_trail_catches_up_with_the_journal_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        j.claim_for(&[1; 16], Role::Source, "vm", 10).unwrap();
        j.set(&[1; 16], State::Committed, "").unwrap();
        drop(j);
        let trail = dir.path().join(crate::audit::FILE);
        let text = fs::read_to_string(&trail).unwrap();
        let kept: Vec<&str> = text.lines().take(1).collect();
        fs::write(&trail, kept.join("\n") + "\n").unwrap();
        assert!(crate::audit::verify_with_journal(dir.path()).is_err());
        drop(Journal::open(dir.path()).unwrap());
        let v = crate::audit::verify_with_journal(dir.path()).unwrap();
        assert_eq!(v.entries, 2);
        assert_eq!(v.list[1].event, "committed");
        assert!(v.list[1].reason.contains("when the journal was reopened"));
    }

    #[test]
    fn claims_survive_restart_and_torn_tail_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut j = Journal::open(dir.path()).unwrap();
            j.claim_for(&[1; 16], Role::Source, "vm", 10).unwrap();
            j.set(&[1; 16], State::Committed, "").unwrap();
        }
        // Simulate a crash mid-append.
        let p = dir.path().join(FILE);
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"{\"order_id\":\"02").unwrap();
        drop(f);
        let mut j = Journal::open(dir.path()).unwrap();
        assert!(matches!(
            j.claim_for(&[1; 16], Role::Source, "vm", 10),
            Err(OrderError::Replayed(_))
        ));
        assert_eq!(j.in_doubt().len(), 1);
        assert_eq!(j.in_doubt()[0].state, State::Committed);
        assert!(
            j.migrated_away("vm"),
            "a committed source migration means the VM left"
        );
        // The torn tail was cut, so new appends stay readable.
        j.claim_for(&[3; 16], Role::Source, "vm", 10).unwrap();
        drop(j);
        assert_eq!(Journal::open(dir.path()).unwrap().records().len(), 2);
        // Corruption in the middle is refused, not skipped.
        fs::write(&p, "garbage\n{}\n").unwrap();
        assert!(Journal::open(dir.path()).is_err());
    }
}
