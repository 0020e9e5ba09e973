//! The durable journal of orders and migration states. spec: SPEC.md §3.4, §8.8
//!
//! An append-only file of JSON lines, each fsync'd before the caller acts on it. Order ids
//! are claimed once per agent; migration states record where a migration stood so that a
//! restarted agent settles what was in doubt. A torn last line (crash mid-write) is ignored;
//! any other malformed line is an error, since guessing could let a used order id run again.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use trustmig_protocol::order::{hex, OrderBody, OrderError, OrderId, OrderJournal, Role};
use trustmig_protocol::AgentId;

use crate::error::AgentError;

/// Where a migration stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// The order id is used; nothing moved yet, or transfer under way.
    Claimed,
    /// COMMIT recorded: the destination owns the VM.
    Committed,
    /// Finished successfully.
    Done,
    /// Failed before commit; the source kept its VM.
    RolledBack,
    /// Settled at restart from an interrupted state.
    Settled,
}

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
}

/// The journal.
pub struct Journal {
    path: PathBuf,
    file: File,
    latest: HashMap<String, Record>,
    last_for_vm: HashMap<String, Record>,
}

impl Journal {
    /// Open (or create) the journal in `dir` and replay it.
    pub fn open(dir: &Path) -> Result<Self, AgentError> {
        fs::create_dir_all(dir).map_err(AgentError::io(dir))?;
        let path = dir.join("journal.jsonl");
        let mut latest = HashMap::new();
        let mut last_for_vm: HashMap<String, Record> = HashMap::new();
        let mut torn_at = None;
        if path.exists() {
            let text = fs::read_to_string(&path).map_err(AgentError::io(&path))?;
            let lines: Vec<&str> = text.split_inclusive('\n').collect();
            let mut offset = 0u64;
            for (i, line) in lines.iter().enumerate() {
                let torn_tail = i == lines.len() - 1 && !line.ends_with('\n');
                match serde_json::from_str::<Record>(line.trim_end()) {
                    Ok(r) => {
                        last_for_vm.insert(r.vm.clone(), r.clone());
                        latest.insert(r.order_id.clone(), r);
                    }
                    // Crash mid-append: the caller never acted on it; cut it off below.
                    Err(_) if torn_tail => torn_at = Some(offset),
                    Err(e) => {
                        return Err(AgentError::BadConfig {
                            path: path.clone(),
                            reason: format!(
                                "line {}: {e} (journal corrupt; refusing to guess)",
                                i + 1
                            ),
                        })
                    }
                }
                offset += line.len() as u64;
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(AgentError::io(&path))?;
        if let Some(len) = torn_at {
            file.set_len(len)
                .and_then(|_| file.sync_all())
                .map_err(AgentError::io(&path))?;
        }
        // The directory entry must be durable too, or a fresh journal could vanish on crash.
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(AgentError::io(dir))?;
        Ok(Self {
            path,
            file,
            latest,
            last_for_vm,
        })
    }

    /// Append `r` durably.
    pub fn append(&mut self, r: Record) -> Result<(), AgentError> {
        let mut line = serde_json::to_vec(&r).map_err(|e| AgentError::Migration(e.to_string()))?;
        line.push(b'\n');
        self.file
            .write_all(&line)
            .map_err(AgentError::io(&self.path))?;
        self.file.sync_data().map_err(AgentError::io(&self.path))?;
        self.last_for_vm.insert(r.vm.clone(), r.clone());
        self.latest.insert(r.order_id.clone(), r);
        Ok(())
    }

    /// Record a state change for `order_id`.
    pub fn set(
        &mut self,
        order_id: &OrderId,
        state: State,
        note: impl Into<String>,
    ) -> Result<(), AgentError> {
        let key = hex(order_id);
        let prev = self.latest.get(&key).cloned().ok_or_else(|| {
            AgentError::Migration(format!("journal has no record of order {key}"))
        })?;
        self.append(Record {
            state,
            at: crate::unix_now(),
            note: note.into(),
            ..prev
        })
    }

    /// Journal COMMIT for an order still claimed here. Refused once the order was rolled back
    /// or settled: after this destination answered a settlement query "not committed", no
    /// late `Commit` may make it commit after all (SPEC.md §8.8).
    pub fn commit(&mut self, order_id: &OrderId) -> Result<(), AgentError> {
        let key = hex(order_id);
        match self.latest.get(&key).map(|r| r.state) {
            Some(State::Claimed) => self.set(order_id, State::Committed, ""),
            Some(other) => Err(AgentError::Migration(format!(
                "order {key} is {other:?} in the journal: refusing to commit it"
            ))),
            None => Err(AgentError::Migration(format!(
                "journal has no record of order {key}"
            ))),
        }
    }

    /// Journal an order rolled back, unless it got past its claim: a failure after COMMIT
    /// (say, `Resumed` could not be sent) must not turn a committed order into a rolled-back one,
    /// or a settlement query would hand the VM back to the source while it runs here. Returns
    /// whether it was rolled back.
    pub fn roll_back_if_claimed(
        &mut self,
        order_id: &OrderId,
        note: impl Into<String>,
    ) -> Result<bool, AgentError> {
        match self.latest.get(&hex(order_id)).map(|r| r.state) {
            Some(State::Claimed) => self.set(order_id, State::RolledBack, note).map(|()| true),
            _ => Ok(false),
        }
    }

    /// Answer a source's settlement query as the destination (SPEC.md §8.8 rule 3): `true`
    /// when this agent journalled COMMIT for the order (it owns the VM). Otherwise the order is
    /// journalled rolled back first, an order never seen here too (so its id is used up and
    /// no late session can commit it), and the answer is `false`.
    /// Only the order's source, as recorded at the claim, is answered about a claimed order.
    pub fn settle_query(
        &mut self,
        order_id: &OrderId,
        asker: &AgentId,
    ) -> Result<bool, AgentError> {
        let key = hex(order_id);
        let note = "settlement: the source asked; never committed here";
        if let Some(source) = self.latest.get(&key).and_then(|r| r.peer.as_deref()) {
            let mine = self.latest[&key].role == Role::Destination;
            if mine && source != hex(asker) {
                return Err(AgentError::Migration(format!(
                    "order {key} came from agent {source}, not from {}: no answer to its settlement query",
                    hex(asker)
                )));
            }
        }
        match self.latest.get(&key).map(|r| (r.role, r.state)) {
            Some((Role::Destination, State::Committed | State::Done | State::Settled)) => {
                Ok(true)
            }
            Some((Role::Destination, State::Claimed)) => {
                self.set(order_id, State::RolledBack, note)?;
                Ok(false)
            }
            Some((Role::Destination, State::RolledBack)) => Ok(false),
            Some((Role::Source, _)) => Err(AgentError::Migration(format!(
                "order {key} was sent from this agent, not received: no answer to a settlement query"
            ))),
            None => {
                self.append(Record {
                    order_id: key,
                    role: Role::Destination,
                    vm: String::new(),
                    state: State::RolledBack,
                    not_after: 0,
                    at: crate::unix_now(),
                    note: note.into(),
                    peer: None,
                    peer_addr: None,
                })?;
                Ok(false)
            }
        }
    }

    /// Claim an order id for `role`/`vm`.
    pub fn claim_for(
        &mut self,
        id: &OrderId,
        role: Role,
        vm: &str,
        not_after: u64,
    ) -> Result<(), OrderError> {
        self.claim(id, role, vm, not_after, None, None)
    }

    /// Claim an order as its source, remembering its destination for settlement.
    pub fn claim_as_source(&mut self, body: &OrderBody, id: &OrderId) -> Result<(), OrderError> {
        let (peer, addr) = (hex(&body.destination), body.destination_addr.clone());
        self.claim(
            id,
            Role::Source,
            &body.vm,
            body.not_after,
            Some(peer),
            Some(addr),
        )
    }

    /// Claim an order as its destination, remembering its source: the one agent whose
    /// settlement query about it is answered.
    pub fn claim_as_destination(&mut self, body: &OrderBody) -> Result<(), OrderError> {
        let peer = hex(&body.source);
        let (id, vm) = (&body.order_id, &body.vm);
        self.claim(id, Role::Destination, vm, body.not_after, Some(peer), None)
    }

    fn claim(
        &mut self,
        id: &OrderId,
        role: Role,
        vm: &str,
        not_after: u64,
        peer: Option<String>,
        peer_addr: Option<String>,
    ) -> Result<(), OrderError> {
        let key = hex(id);
        if self.latest.contains_key(&key) {
            return Err(OrderError::Replayed(key));
        }
        self.append(Record {
            order_id: key,
            role,
            vm: vm.into(),
            state: State::Claimed,
            not_after,
            at: crate::unix_now(),
            note: String::new(),
            peer,
            peer_addr,
        })
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

    /// Whether `vm` left this agent: its latest record (in journal order) is a source-side
    /// migration that committed, so the destination owns it and it must not start here again.
    pub fn migrated_away(&self, vm: &str) -> bool {
        self.last_for_vm.get(vm).is_some_and(|r| {
            r.role == Role::Source
                && matches!(r.state, State::Committed | State::Done | State::Settled)
        })
    }

    /// Migrations interrupted by a crash or restart: not Done, RolledBack or Settled.
    pub fn in_doubt(&self) -> Vec<Record> {
        self.latest
            .values()
            .filter(|r| matches!(r.state, State::Claimed | State::Committed))
            .cloned()
            .collect()
    }
}

/// The destination handshake claims ids through this adapter (with the order's source, for
/// settlement).
pub struct ClaimAsDestination<'a>(pub &'a mut Journal);

impl OrderJournal for ClaimAsDestination<'_> {
    fn claim(&mut self, order: &OrderBody) -> Result<(), OrderError> {
        self.0.claim_as_destination(order)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let e = j.commit(&[1; 16]).unwrap_err().to_string();
        assert!(e.contains("refusing to commit"), "{e}");
        assert!(
            !j.settle_query(&[1; 16], &src).unwrap(),
            "the answer does not change"
        );
        // Committed: "yes"; a later failure does not roll it back.
        j.claim_for(&[2; 16], Role::Destination, "b", 10).unwrap();
        j.commit(&[2; 16]).unwrap();
        assert!(!j.roll_back_if_claimed(&[2; 16], "send failed").unwrap());
        assert!(j.settle_query(&[2; 16], &src).unwrap());
        // Never seen: "no", and the id is used up for good (survives a restart).
        assert!(!j.settle_query(&[3; 16], &src).unwrap());
        drop(j);
        let mut j = Journal::open(dir.path()).unwrap();
        assert!(matches!(
            j.claim_for(&[3; 16], Role::Destination, "c", 10),
            Err(OrderError::Replayed(_))
        ));
        assert!(j.commit(&[1; 16]).is_err());
        // An order this agent sent is not its to answer.
        j.claim_for(&[4; 16], Role::Source, "d", 10).unwrap();
        assert!(j.settle_query(&[4; 16], &src).is_err());
    }

    /// A destination answers only the source its order named: another trusted agent can
    /// neither learn the outcome nor make the destination refuse a COMMIT still to come.
    #[test]
    fn settlement_is_answered_to_the_orders_source_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        let body = OrderBody {
            v: 1,
            order_id: [5; 16],
            vm: "v".into(),
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
        };
        ClaimAsDestination(&mut j).claim(&body).unwrap();
        let e = j.settle_query(&[5; 16], &[3; 32]).unwrap_err().to_string();
        assert!(
            e.contains(&format!("came from agent {}", hex(&[1; 32]))),
            "{e}"
        );
        drop(j);
        // The source is on record across a restart; the intruder changed nothing.
        let mut j = Journal::open(dir.path()).unwrap();
        assert!(j.settle_query(&[5; 16], &[3; 32]).is_err());
        j.commit(&[5; 16])
            .expect("still claimed: the order may commit");
        assert!(j.settle_query(&[5; 16], &[1; 32]).unwrap());
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
        let p = dir.path().join("journal.jsonl");
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
