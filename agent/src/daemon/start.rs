//! Starting the agent: configuration, identity, journal (settling what a restart found
//! interrupted), the VMs it hosts, the TPM, the sockets. Errors in files are named before the
//! TPM is touched. spec: SPEC.md §8.8

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tracing::{info, warn};

use crate::config::Config;
use crate::ctx::{Ctx, OnePerVm};
use crate::driver::settle::InDoubt;
use crate::error::AgentError;
use crate::guest::SyntheticGuest;
use crate::home::Home;
use crate::identity::Identity;
use crate::journal::{Journal, State};
use trustmig_protocol::commit::{Output, Side};

/// A started agent, before it serves.
pub(super) struct Started {
    pub ctx: Arc<Ctx>,
    pub listener: TcpListener,
    pub control: UnixListener,
    /// Source orders at COMMIT to settle by asking their destination.
    ask: Vec<InDoubt>,
    /// What the journal allows for each QEMU VM's hypervisor state.
    reconcile: Vec<crate::backend::qemu::Reconcile>,
}

impl Started {
    /// What a restart leaves to do in the background: settlement queries, reconciliation.
    pub fn resume_background_work(&mut self) {
        for p in std::mem::take(&mut self.ask) {
            crate::driver::settle::keep_asking(self.ctx.clone(), p, false);
        }
        crate::backend::qemu::reconcile_all(&self.ctx, std::mem::take(&mut self.reconcile));
        tokio::spawn(keep_journal_compact(self.ctx.clone()));
    }
}

/// How often a running agent looks whether its journal is due for compaction.
const COMPACTION_CHECK: Duration = Duration::from_secs(600);

/// Compact the journal of the running agent when due (`Journal::compact_if_due`: once enough
/// was written since the last try, and no order is under way), so that neither the file nor
/// the records held in memory grow for as long as the agent runs. On a blocking thread: the
/// rewrite reads and fsyncs the whole file.
async fn keep_journal_compact(ctx: Arc<Ctx>) {
    let mut tick = tokio::time::interval(COMPACTION_CHECK);
    tick.tick().await; // at once: the journal was compacted as it opened
    loop {
        tick.tick().await;
        let c = ctx.clone();
        let done = tokio::task::spawn_blocking(move || {
            c.journal
                .lock()
                .expect("journal lock")
                .compact_if_due(crate::unix_now())
        })
        .await;
        if let Ok(Err(e)) = done {
            warn!("journal compaction failed (the journal is as it was, or compacted and reopened): {e}");
        }
    }
}

/// Load everything the agent needs, settle the journal, start its synthetic VMs, open the
/// TPM and bind its sockets.
pub(super) async fn load(home: Home) -> Result<Started, AgentError> {
    home.check()?;
    let config = Config::load(&home.config())?;
    let identity = Identity::load(&home)?;
    let verifier = crate::attestation::load_verifier(&home.policy())?;
    let mut journal = Journal::open(&home.journal_dir())?;
    // The journal's lock makes the home this agent's alone: no migration uses its sockets.
    crate::backend::qemu::clear_sockets(&home);
    let ask = settle_in_doubt(&mut journal)?;
    // QEMU VMs: what the journal allows for each, done once the agent is up (backend/qemu).
    let reconcile = to_reconcile(&config, &journal);
    check_memory(&config, &journal, &home)?;
    // The TPM last: configuration errors above are named without touching it.
    let attester = crate::attestation::open_measured(&config, &home.config())?;
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let attester = Arc::new(Mutex::new(crate::metrics::TimedAttester::new(
        attester,
        metrics.clone(),
    )));
    // Before the agent takes any request: a trail that does not match its anchor stops here.
    journal.anchor_audit(Box::new(crate::attestation::PcrAnchor {
        tpm: attester.clone(),
        pcr: config.tpm.audit_pcr,
    }))?;
    let vms = start_synthetic_vms(&config, &journal, &home)?;
    let listener =
        TcpListener::bind(&config.listen)
            .await
            .map_err(|source| AgentError::Listen {
                addr: config.listen.clone(),
                source,
            })?;
    let metrics_server = (config.metrics_listen.as_deref())
        .map(|addr| crate::metrics::bind(addr, &home.config()))
        .transpose()?;
    let sock_path = home.control_socket();
    let control = bind_control(&sock_path)?;
    info!(
        identity = %hex::encode(identity.id()),
        listen = %config.listen,
        control = %sock_path.display(),
        "agent ready"
    );
    let max_sending = config.transfer.max_concurrent_migrations;
    let ctx = Arc::new(Ctx {
        home,
        config: std::sync::RwLock::new(Arc::new(config)),
        identity,
        attester,
        metrics: metrics.clone(),
        verifier: std::sync::RwLock::new(Arc::new(verifier)),
        journal: Mutex::new(journal),
        vms: Mutex::new(vms),
        parked: Mutex::new(HashMap::new()),
        arriving: OnePerVm::new("arriving here by another order"),
        claims: tokio::sync::RwLock::new(()),
        reconciling: OnePerVm::new("being reconciled with its journal"),
        in_doubt: Mutex::new(HashMap::new()),
        resuming: Mutex::default(),
        left_to_operator: Mutex::new(HashMap::new()),
        sessions: Mutex::new(HashMap::new()),
        history: Mutex::new(Vec::new()),
        outgoing: Arc::new(tokio::sync::Semaphore::new(max_sending)),
        max_sending,
        queued: Mutex::new(Vec::new()),
        unknown_queries: Default::default(),
        refusals_audited: Default::default(),
    });
    if let Some(server) = metrics_server {
        crate::metrics::serve(ctx.clone(), server)?;
    }
    Ok(Started {
        ctx,
        listener,
        control,
        ask,
        reconcile,
    })
}

/// The control socket at `path`: bound under a temporary name, made the owner's only, then
/// renamed, so that its name appears only once it listens with its final mode. A client that
/// waits for the name (the test harness, an operator's script) met "connection refused" between
/// bind and listen, seen once in CI on a loaded machine.
fn bind_control(path: &Path) -> Result<UnixListener, AgentError> {
    let bound = path.with_extension("sock.new");
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(&bound);
    let control = UnixListener::bind(&bound).map_err(AgentError::io(&bound))?;
    std::fs::set_permissions(&bound, std::fs::Permissions::from_mode(0o600))
        .map_err(AgentError::io(&bound))?;
    std::fs::rename(&bound, path).map_err(AgentError::io(path))?;
    Ok(control)
}

/// What the journal allows for each QEMU VM after this start (`driver/reconcile.rs`), to be
/// done once the agent is up.
fn to_reconcile(config: &Config, journal: &Journal) -> Vec<crate::backend::qemu::Reconcile> {
    config
        .vms
        .iter()
        .filter_map(|v| Some((v.name.clone(), v.qemu()?.qmp.clone())))
        .map(|(vm, qmp)| crate::backend::qemu::Reconcile::of(journal, vm, qmp))
        .collect()
}

/// A configured guest this host cannot hold is a configuration error, not an allocation abort.
fn check_memory(config: &Config, journal: &Journal, home: &Home) -> Result<(), AgentError> {
    let want: u64 = config
        .vms
        .iter()
        .filter(|v| !journal.migrated_away(&v.name))
        .filter_map(|v| Some(v.synthetic()?.size_mib << 20))
        .sum();
    let avail = crate::guest::mem_available();
    if avail.is_none() && want > 0 {
        // Hidden under `ProcSubset=pid`, say: said once, not skipped silently.
        warn!("cannot read MemAvailable from /proc/meminfo: the synthetic VMs' memory ({} MiB) is not checked against the host's", want >> 20);
    }
    match avail {
        Some(avail) if want > avail => Err(AgentError::BadConfig {
            path: home.config(),
            reason: format!(
                "synthetic VMs need {} MiB but {} MiB of memory is available; lower size_mib",
                want >> 20,
                avail >> 20
            ),
        }),
        _ => Ok(()),
    }
}

/// The synthetic guests this host runs (QEMU VMs live in their QEMU), except those that
/// migrated away: they are their destination's now, never two running copies.
fn start_synthetic_vms(
    config: &Config,
    journal: &Journal,
    home: &Home,
) -> Result<HashMap<String, SyntheticGuest>, AgentError> {
    config
        .vms
        .iter()
        .filter_map(|v| Some((&v.name, v.synthetic()?)))
        .filter(|(name, _)| {
            let gone = journal.migrated_away(name);
            if gone {
                info!(vm = %name, "not started: it migrated to another host (journal)");
            }
            !gone
        })
        .map(|(name, cfg)| {
            // Past `check_memory`, or where it could not look.
            let mut g = SyntheticGuest::new(name, cfg).map_err(|e| AgentError::BadConfig {
                path: home.config(),
                reason: format!("vm {name:?}: {e}; lower size_mib"),
            })?;
            trustmig_protocol::precopy::GuestMemory::resume(&mut g);
            Ok((name.clone(), g))
        })
        .collect()
}

/// Settle migrations the journal shows as interrupted, from the journal alone; returns the
/// source-side orders at COMMIT whose destination is known, to be settled by asking it
/// (`settle::keep_asking`). What becomes of each VM is reconciled from the journal per VM
/// (`reconcile.rs`). spec: SPEC.md §8.8
fn settle_in_doubt(journal: &mut Journal) -> Result<Vec<InDoubt>, AgentError> {
    let mut ask = Vec::new();
    for r in journal.in_doubt() {
        let id: [u8; 16] = hex::decode(&r.order_id)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| {
                AgentError::Journal(format!("journal holds a bad order id {}", r.order_id))
            })?;
        // The order's machine, restarted with what the journal kept, says what to journal and
        // whether to ask; what becomes of each VM is reconciled per VM (`reconcile.rs`).
        let restarted = Side::restart(journal.rules(), r.role, &[r.entry()]);
        if restarted.outputs.is_empty() {
            continue;
        }
        // A source at COMMIT that knows its destination asks it once the agent is up.
        if restarted.outputs.contains(&Output::Ask) {
            if let Some(p) = InDoubt::from_record(&r) {
                warn!(order = %r.order_id, vm = %r.vm, "committed before restart: asking the destination what became of the VM");
                ask.push(p);
                continue;
            }
        }
        let source = r.role == trustmig_protocol::order::Role::Source;
        let note = match (source, r.state) {
            (true, State::Claimed) => {
                "interrupted before commit: the source keeps the VM (rolled back)"
            }
            (true, _) => {
                "committed before restart: the destination owns the VM; the source never resumes it"
            }
            (false, State::Claimed) => {
                "interrupted before commit: what arrived is to be discarded (reconciliation)"
            }
            (false, _) => "committed before restart: the destination owns the VM",
        };
        warn!(order = %r.order_id, vm = %r.vm, role = %r.role, "{note}");
        for o in &restarted.outputs {
            if let Output::Journal(e) = o {
                journal.set(&id, e.state, note)?;
            }
        }
    }
    Ok(ask)
}
