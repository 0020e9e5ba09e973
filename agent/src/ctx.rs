//! What a running agent shares between its tasks: configuration, identity, TPM, verifier,
//! journal, the VMs it hosts, sessions waiting for data connections, and recent history.
//! Everything else in the agent reads it; it depends on nothing that drives a migration.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::mpsc;
use trustmig_protocol::attestation::EvidenceVerifier;
use trustmig_protocol::order::OrderId;

use crate::config::Config;
use crate::control::Summary;
use crate::error::AgentError;
use crate::guest::SyntheticGuest;
use crate::home::Home;
use crate::identity::Identity;
use crate::journal::Journal;
use crate::trust::KeyList;

/// A data connection handed to the session that owns its session id.
pub type DataConn = (u16, TcpStream);

/// Everything a running agent shares between its tasks.
pub struct Ctx {
    /// The home.
    pub home: Home,
    /// Configuration: replaced as a whole by a reload (`reload.rs`); a migration keeps the one
    /// it started with where it took a copy.
    pub config: RwLock<Arc<Config>>,
    /// Identity.
    pub identity: Identity,
    /// The TPM (one command at a time), shared with the audit trail's anchoring thread.
    pub attester: Arc<Mutex<crate::attestation::AgentTpm>>,
    /// Verifier of peers' evidence (the attestation policy): replaced by a reload.
    pub verifier: RwLock<Arc<dyn EvidenceVerifier + Send + Sync>>,
    /// The journal.
    pub journal: Mutex<Journal>,
    /// Hosted VMs that are not migrating.
    pub vms: Mutex<HashMap<String, SyntheticGuest>>,
    /// Synthetic VMs stopped in doubt after a session lost past COMMIT, kept as they were until
    /// their destination answers (SPEC.md §8.8; `settle.rs`).
    pub parked: Mutex<HashMap<String, SyntheticGuest>>,
    /// VMs arriving here now, one session each.
    pub arriving: OnePerVm,
    /// Held for reading while a migration marks its VM busy (the source's claim, a
    /// destination's arrival) and checks or takes the VM's entry it runs on; held for writing
    /// by a reload from its in-use check to its swap (`daemon/reload.rs`). So a reload never
    /// swaps in a change to a VM a claim made busy after the check, and a claim never starts
    /// on an entry a reload replaced after its preparation read it.
    pub claims: tokio::sync::RwLock<()>,
    /// QEMU VMs being reconciled with their journal now (after a start, or by the operator's
    /// `trustmig reconcile`), one reconciliation each (`backend/qemu/reconcile.rs`).
    pub reconciling: OnePerVm,
    /// Orders in doubt whose destination is being asked in the background (`settle.rs`): the
    /// only ones an operator may settle by hand. Each lock is held while one answer or decision
    /// is acted on, so the two never cross.
    pub in_doubt: Mutex<HashMap<OrderId, Arc<tokio::sync::Mutex<()>>>>,
    /// QEMU VMs given back after a rollback whose `cont` QEMU refused for now (an image lock
    /// held by a destination being discarded), with the cause: "rolled back, not yet running"
    /// until it runs (`backend/qemu/giveback.rs`).
    pub resuming: Mutex<crate::backend::qemu::Retries>,
    /// QEMU VMs left to the operator (a reconciliation with the journal that did not get
    /// through, a destination QEMU that could not be quit, a committed VM that does not start,
    /// a give-back whose retries stopped): the order it was about (hex) and what is left.
    /// `status` says so until a reconciliation (`trustmig reconcile`) gets through, or a newer
    /// order moved the VM on.
    pub left_to_operator: Mutex<HashMap<String, (Option<String>, String)>>,
    /// Sessions waiting for data connections, by session id.
    pub sessions: Mutex<HashMap<[u8; 16], mpsc::Sender<DataConn>>>,
    /// Summaries of finished migrations (newest last).
    pub history: Mutex<Vec<serde_json::Value>>,
    /// One permit per migration this agent may send at once
    /// (`transfer.max_concurrent_migrations`).
    pub outgoing: Arc<tokio::sync::Semaphore>,
    /// How many permits `outgoing` was made with (a reload does not change it).
    pub max_sending: usize,
    /// Prometheus metrics (served when `metrics_listen` is set).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Orders waiting for a permit, in arrival order: (order id hex, VM).
    pub queued: Mutex<Vec<(String, String)>>,
    /// Each peer's budget of settlement queries about orders unknown here.
    pub unknown_queries: crate::driver::peer_budget::PeerBudget,
    /// Each peer's budget of audit entries for its sessions refused before any order.
    pub refusals_audited: crate::driver::peer_budget::PeerBudget,
}

impl Ctx {
    /// Operator keys, re-read at every use so trust changes apply without a restart.
    pub fn operators(&self) -> Result<Vec<[u8; 32]>, AgentError> {
        Ok(KeyList::load(&self.home.operators())?.keys())
    }

    /// Peer identities, re-read at every use.
    pub fn peers(&self) -> Result<KeyList, AgentError> {
        KeyList::load(&self.home.peers())
    }

    /// Refuse to go on with `peer` if it was removed from the trust store during the
    /// migration: revocation takes effect at the last step before a point of no return (the
    /// source's COMMIT; the destination's `Ready`, after which a verified `Commit` is never
    /// refused, or the source, committed and unable to ask, would hold the VM stopped with no
    /// copy anywhere), so the migration rolls back (SPEC.md §3.4).
    pub fn check_still_trusted(&self, peer: &[u8; 32]) -> Result<(), AgentError> {
        if self.peers()?.contains(peer) {
            return Ok(());
        }
        Err(AgentError::Refused(format!(
            "peer {} was removed from the trust store during the migration: not committing",
            hex::encode(peer)
        )))
    }

    /// Migrations being sent now.
    pub fn sending(&self) -> usize {
        self.max_sending
            .saturating_sub(self.outgoing.available_permits())
    }

    /// The configuration now.
    pub fn config(&self) -> Arc<Config> {
        self.config.read().expect("config lock").clone()
    }

    /// The attestation policy's verifier now.
    pub fn verifier(&self) -> Arc<dyn EvidenceVerifier + Send + Sync> {
        self.verifier.read().expect("verifier lock").clone()
    }

    /// Step timeout.
    pub fn step_timeout(&self) -> Duration {
        Duration::from_secs(self.config().transfer.step_timeout_secs)
    }

    /// Leave QEMU VM `vm`, whose current order here is `order` (hex), to the operator: `status`
    /// shows `how` until a reconciliation gets through (`trustmig reconcile`), or a newer order
    /// moves the VM on. A log line alone scrolls away; a VM left loaded, or committed and not
    /// running, must stay in sight.
    pub fn leave_to_operator(&self, vm: &str, order: Option<String>, how: String) {
        (self.left_to_operator.lock().expect("left lock")).insert(vm.to_string(), (order, how));
    }

    /// What is left to the operator of `vm` now: only while the order it was about is still
    /// the VM's (none moved it on since).
    pub fn left_now(&self, vm: &str) -> Option<String> {
        self.left_as_journal_says(&self.journal.lock().expect("journal lock"), vm)
    }

    /// [`Self::left_now`] for a caller that holds the journal's lock.
    pub fn left_as_journal_says(
        &self,
        journal: &crate::journal::Journal,
        vm: &str,
    ) -> Option<String> {
        let (order, how) = self
            .left_to_operator
            .lock()
            .expect("left lock")
            .get(vm)?
            .clone();
        (journal.last_order_of(vm).map(|r| &r.order_id) == order.as_ref()).then_some(how)
    }

    /// How many configured VMs are left to the operator now ([`Ctx::left_now`]): what
    /// `status` shows so.
    pub fn left_count(&self) -> usize {
        let config = self.config();
        let vms: Vec<String> = (self.left_to_operator.lock().expect("left lock"))
            .keys()
            .filter(|vm| config.vm(vm).is_some())
            .cloned()
            .collect();
        vms.iter().filter(|vm| self.left_now(vm).is_some()).count()
    }

    /// Record a finished migration for `status`.
    pub fn remember(&self, entry: serde_json::Value) {
        let mut h = self.history.lock().expect("history lock");
        h.push(entry);
        let excess = h.len().saturating_sub(100);
        h.drain(..excess);
    }
}

/// Build a summary JSON entry for `status`.
pub fn history_entry(
    role: &str,
    summary: Option<&Summary>,
    error: Option<&str>,
    order_id: &str,
    vm: &str,
) -> serde_json::Value {
    serde_json::json!({
        "role": role,
        "order_id": order_id,
        "vm": vm,
        "at": crate::unix_now(),
        "summary": summary,
        "error": error,
    })
}

/// VMs something is under way for, one at a time per VM: a second is refused while the first
/// runs. Arrivals: two copies arriving at once would have the second replace the first, already
/// running and given up by its source. Reconciliations: two would each wait for QEMU's one QMP
/// connection and act on what they saw before the other acted.
pub struct OnePerVm {
    vms: Mutex<std::collections::HashSet<String>>,
    /// What is under way, for the refusal ("arriving here by another order").
    doing: &'static str,
}

impl OnePerVm {
    /// None under way; `doing` names what is, for refusals.
    pub fn new(doing: &'static str) -> Self {
        Self {
            vms: Mutex::default(),
            doing,
        }
    }

    /// Whether it is under way for `vm` now.
    pub fn contains(&self, vm: &str) -> bool {
        (self.vms.lock().unwrap_or_else(|e| e.into_inner())).contains(vm)
    }

    /// It begins for `vm`, and ends once the guard drops; refused while it is under way.
    pub fn begin(&self, vm: &str) -> Result<Underway<'_>, AgentError> {
        let mut vms = self.vms.lock().unwrap_or_else(|e| e.into_inner());
        if !vms.insert(vm.to_string()) {
            return Err(AgentError::Refused(format!(
                "VM {vm:?} is already {}",
                self.doing
            )));
        }
        Ok(Underway {
            of: self,
            vm: vm.to_string(),
        })
    }
}

/// What [`OnePerVm::begin`] began for a VM; it ends when this drops.
pub struct Underway<'a> {
    of: &'a OnePerVm,
    vm: String,
}

impl Drop for Underway<'_> {
    fn drop(&mut self) {
        let mut vms = self.of.vms.lock().unwrap_or_else(|e| e.into_inner());
        vms.remove(&self.vm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_arrives_by_one_session_at_a_time() {
        let a = OnePerVm::new("arriving here by another order");
        let first = a.begin("web").expect("first");
        let e = a.begin("web").err().expect("a second at once");
        assert!(e.to_string().contains("\"web\" is already arriving"), "{e}");
        let other = a.begin("db").expect("another VM");
        assert!(a.contains("web") && a.contains("db"));
        drop(first);
        assert!(!a.contains("web"));
        let again = a.begin("web").expect("after the first ended");
        drop((again, other));
        assert!(a.vms.lock().unwrap().is_empty());
    }
}
