//! `trustmig agent`: the daemon. One TCP port for peers (TLS control sessions and data streams,
//! told apart by their first byte), one unix control socket for the local CLI.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::mpsc;
use tracing::{error, info, warn};
use trustmig_protocol::attestation::{Attester, EvidenceVerifier};
use trustmig_protocol::order::OrderId;

use crate::config::Config;
use crate::control::{Progress, Reply, Request, Summary};
use crate::error::AgentError;
use crate::guest::SyntheticGuest;
use crate::home::Home;
use crate::identity::Identity;
use crate::journal::{Journal, State};
use crate::settle::InDoubt;
use crate::trust::KeyList;
use crate::wire::{parse_preamble, PREAMBLE_LEN};
use trustmig_qemu::qmp::{Qmp, QmpError};

/// A data connection handed to the session that owns its session id.
pub type DataConn = (u16, TcpStream);

/// Everything a running agent shares between its tasks.
pub struct Ctx {
    /// The home.
    pub home: Home,
    /// Configuration.
    pub config: Config,
    /// Identity.
    pub identity: Identity,
    /// The TPM (one at a time: quotes are short).
    pub attester: Mutex<Box<dyn Attester + Send>>,
    /// Verifier of peers' evidence.
    pub verifier: Box<dyn EvidenceVerifier + Send + Sync>,
    /// The journal.
    pub journal: Mutex<Journal>,
    /// Hosted VMs that are not migrating.
    pub vms: Mutex<HashMap<String, SyntheticGuest>>,
    /// Synthetic VMs stopped in doubt after a session lost past COMMIT, kept as they were until
    /// their destination answers (SPEC.md §8.8; `settle.rs`).
    pub parked: Mutex<HashMap<String, SyntheticGuest>>,
    /// Orders in doubt whose destination is being asked in the background (`settle.rs`): the
    /// only ones an operator may settle by hand. Each lock is held while one answer or decision
    /// is acted on, so the two never cross.
    pub in_doubt: Mutex<HashMap<OrderId, Arc<tokio::sync::Mutex<()>>>>,
    /// QEMU VMs given back after a rollback whose `cont` QEMU refused for now (an image lock
    /// held by a destination being discarded), with the cause: "rolled back, not yet running"
    /// until it runs (`sidecar/giveback.rs`).
    pub resuming: Mutex<HashMap<String, String>>,
    /// Sessions waiting for data connections, by session id.
    pub sessions: Mutex<HashMap<[u8; 16], mpsc::Sender<DataConn>>>,
    /// Summaries of finished migrations (newest last).
    pub history: Mutex<Vec<serde_json::Value>>,
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

    /// Step timeout.
    pub fn step_timeout(&self) -> Duration {
        Duration::from_secs(self.config.transfer.step_timeout_secs)
    }

    /// Record a finished migration for `status`.
    pub fn remember(&self, entry: serde_json::Value) {
        let mut h = self.history.lock().expect("history lock");
        h.push(entry);
        let excess = h.len().saturating_sub(100);
        h.drain(..excess);
    }
}

/// Settle migrations the journal shows as interrupted, from the journal alone; returns the
/// source-side orders at COMMIT whose destination is known, to be settled by asking it
/// (`settle::keep_asking`), and the state each order settled here was in (hex id), for
/// reconciling the VMs' hypervisors (`reconcile.rs`). spec: SPEC.md §8.8
fn settle_in_doubt(
    journal: &mut Journal,
) -> Result<(Vec<InDoubt>, HashMap<String, State>), AgentError> {
    let mut ask = Vec::new();
    let mut interrupted = HashMap::new();
    for r in journal.in_doubt() {
        let id: [u8; 16] = hex::decode(&r.order_id)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| {
                AgentError::Migration(format!("journal holds a bad order id {}", r.order_id))
            })?;
        let source = r.role == trustmig_protocol::order::Role::Source;
        // A source at COMMIT that knows its destination asks it once the agent is up.
        if source && r.state == State::Committed {
            if let Some(p) = InDoubt::from_record(&r) {
                warn!(order = %r.order_id, vm = %r.vm, "committed before restart: asking the destination what became of the VM");
                ask.push(p);
                continue;
            }
        }
        let note = match (source, r.state) {
            (true, State::Claimed) => {
                "interrupted before commit: the source keeps the VM (rolled back)"
            }
            (true, _) => {
                "committed before restart: the destination owns the VM; the source never resumes it"
            }
            (false, State::Claimed) => "interrupted before commit: destination state discarded",
            (false, _) => "committed before restart: the destination owns the VM",
        };
        warn!(order = %r.order_id, vm = %r.vm, role = %r.role, "{note}");
        let state = if r.state == State::Claimed {
            State::RolledBack
        } else {
            State::Settled
        };
        journal.set(&id, state, note)?;
        interrupted.insert(r.order_id.clone(), r.state);
    }
    Ok((ask, interrupted))
}

/// Run the agent until SIGTERM/SIGINT.
pub async fn run(home: Home) -> Result<(), AgentError> {
    crate::fault::init();
    home.check()?;
    let config = Config::load(&home.config())?;
    let identity = Identity::load(&home)?;
    let verifier = crate::attestation::load_verifier(&home.policy())?;
    let mut journal = Journal::open(&home.journal_dir())?;
    let (ask_destinations, interrupted) = settle_in_doubt(&mut journal)?;
    // QEMU VMs: what the journal allows for each, done once the agent is up (sidecar/).
    let reconcile: Vec<_> = config
        .vms
        .iter()
        .filter_map(|v| {
            Some((
                v.name.clone(),
                v.qmp.clone().filter(|_| v.backend == "qemu")?,
            ))
        })
        .map(|(vm, qmp)| {
            let action = crate::reconcile::action(journal.last_order_of(&vm), &interrupted);
            (vm, qmp, action)
        })
        .collect();
    // A configured guest this host cannot hold is a configuration error, not an allocation abort.
    let want: u64 = config
        .vms
        .iter()
        .filter(|v| v.backend == "synthetic" && !journal.migrated_away(&v.name))
        .map(|v| v.size_mib << 20)
        .sum();
    if let Some(avail) = crate::guest::mem_available() {
        if want > avail {
            return Err(AgentError::BadConfig {
                path: home.config(),
                reason: format!(
                    "synthetic VMs need {} MiB but {} MiB of memory is available; lower size_mib",
                    want >> 20,
                    avail >> 20
                ),
            });
        }
    }
    // The TPM last: configuration errors above are named without touching it.
    let attester = crate::attestation::open_measured(&config, &home.config())?;
    let vms = config
        .vms
        .iter()
        .filter(|v| v.backend == "synthetic") // `qemu` VMs live in their QEMU (sidecar/)
        // A VM that migrated away is the destination's now: never two running copies.
        .filter(|v| {
            let gone = journal.migrated_away(&v.name);
            if gone {
                info!(vm = %v.name, "not started: it migrated to another host (journal)");
            }
            !gone
        })
        .map(|v| {
            let mut g = SyntheticGuest::new(v);
            trustmig_protocol::precopy::GuestMemory::resume(&mut g);
            (v.name.clone(), g)
        })
        .collect();
    let listener =
        TcpListener::bind(&config.listen)
            .await
            .map_err(|source| AgentError::Listen {
                addr: config.listen.clone(),
                source,
            })?;
    let sock_path = home.control_socket();
    let _ = std::fs::remove_file(&sock_path);
    let control = UnixListener::bind(&sock_path).map_err(AgentError::io(&sock_path))?;
    std::fs::set_permissions(&sock_path, std::fs::Permissions::from_mode(0o600))
        .map_err(AgentError::io(&sock_path))?;
    info!(
        identity = %hex::encode(identity.id()),
        listen = %config.listen,
        control = %sock_path.display(),
        "agent ready"
    );
    let ctx = Arc::new(Ctx {
        home,
        config,
        identity,
        attester: Mutex::new(Box::new(attester)),
        verifier: Box::new(verifier),
        journal: Mutex::new(journal),
        vms: Mutex::new(vms),
        parked: Mutex::new(HashMap::new()),
        in_doubt: Mutex::new(HashMap::new()),
        resuming: Mutex::new(HashMap::new()),
        sessions: Mutex::new(HashMap::new()),
        history: Mutex::new(Vec::new()),
    });
    for p in ask_destinations {
        crate::settle::keep_asking(ctx.clone(), p, false);
    }
    crate::backend::qemu::reconcile_all(&ctx, reconcile);

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| AgentError::Migration(format!("cannot install SIGTERM handler: {e}")))?;
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((sock, addr)) => {
                    let ctx = ctx.clone();
                    tokio::spawn(async move {
                        if let Err(e) = peer_connection(ctx, sock).await {
                            warn!(%addr, "peer connection: {e}");
                        }
                    });
                }
                Err(e) => warn!("accept: {e}"),
            },
            r = control.accept() => match r {
                Ok((sock, _)) => {
                    let ctx = ctx.clone();
                    tokio::spawn(async move {
                        if let Err(e) = control_connection(ctx, sock).await {
                            warn!("control connection: {e}");
                        }
                    });
                }
                Err(e) => warn!("control accept: {e}"),
            },
            _ = term.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = tokio::signal::ctrl_c() => { info!("SIGINT: shutting down"); break; }
        }
    }
    let _ = std::fs::remove_file(ctx.home.control_socket());
    Ok(())
}

/// A TCP connection from a peer: TLS control session (first byte 0x16) or data stream.
async fn peer_connection(ctx: Arc<Ctx>, sock: TcpStream) -> Result<(), AgentError> {
    sock.set_nodelay(true).ok();
    let mut first = [0u8; 1];
    let n = tokio::time::timeout(ctx.step_timeout(), sock.peek(&mut first))
        .await
        .map_err(|_| AgentError::Migration("peer sent nothing".into()))?
        .map_err(AgentError::io("peer socket"))?;
    if n == 0 {
        return Ok(());
    }
    if first[0] == 0x16 {
        return crate::driver::destination::serve(ctx, sock).await;
    }
    // A data stream: its preamble names the session. Unknown sessions are dropped quietly;
    // an unauthenticated connection must not be able to disturb a session.
    let mut sock = sock;
    let mut p = [0u8; PREAMBLE_LEN];
    tokio::time::timeout(ctx.step_timeout(), sock.read_exact(&mut p))
        .await
        .map_err(|_| AgentError::Migration("data preamble timed out".into()))?
        .map_err(AgentError::io("data stream"))?;
    let (sid, stream) = parse_preamble(&p).map_err(|e| AgentError::Migration(e.to_string()))?;
    // The source may open its streams a moment before this side has processed its Finished
    // and registered the session: wait briefly for the id to appear.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let tx = loop {
        let tx = ctx
            .sessions
            .lock()
            .expect("sessions lock")
            .get(&sid)
            .cloned();
        if tx.is_some() || tokio::time::Instant::now() >= deadline {
            break tx;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    match tx {
        Some(tx) => {
            let _ = tx.send((stream, sock)).await;
        }
        None => warn!(session = %hex::encode(sid), "data stream for an unknown session dropped"),
    }
    Ok(())
}

async fn control_connection(ctx: Arc<Ctx>, sock: UnixStream) -> Result<(), AgentError> {
    if let Ok(cred) = sock.peer_cred() {
        info!(uid = cred.uid(), pid = ?cred.pid(), "control client");
    }
    let (rd, mut wr) = sock.into_split();
    let mut lines = BufReader::new(rd).lines();
    let Some(line) = lines
        .next_line()
        .await
        .map_err(AgentError::io("control socket"))?
    else {
        return Ok(());
    };
    let send = |r: Reply| {
        let mut v = serde_json::to_vec(&r).unwrap_or_default();
        v.push(b'\n');
        v
    };
    let req: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            let _ = wr
                .write_all(&send(Reply::Error(format!("bad request: {e}"))))
                .await;
            return Ok(());
        }
    };
    match req {
        Request::Migrate { order } => {
            let (tx, mut rx) = mpsc::channel::<Progress>(64);
            let task = tokio::spawn(crate::driver::source::migrate(ctx.clone(), order, tx));
            while let Some(p) = rx.recv().await {
                // The operator may have gone away; the migration carries on regardless.
                let _ = wr.write_all(&send(Reply::Progress(p))).await;
            }
            match task.await {
                Ok(Ok(summary)) => {
                    let _ = wr
                        .write_all(&send(Reply::Progress(Progress::Done(summary))))
                        .await;
                }
                Ok(Err(_)) => {} // already reported as Progress::Failed
                Err(e) => {
                    error!("migration task panicked: {e}");
                    let _ = wr
                        .write_all(&send(Reply::Error("internal error".into())))
                        .await;
                }
            }
        }
        Request::Status => {
            let vm = |g: &SyntheticGuest, in_doubt: bool| {
                serde_json::json!({
                    "name": g.name(), "bytes": g.bytes(), "paused": g.is_paused(),
                    "in_doubt": in_doubt,
                })
            };
            let mut vms: Vec<serde_json::Value> = (ctx.vms.lock().expect("vms lock").values())
                .map(|g| vm(g, false))
                .collect();
            // Stopped until their destination answers a settlement query (settle.rs).
            vms.extend((ctx.parked.lock().expect("parked lock").values()).map(|g| vm(g, true)));
            // QEMU VMs live in their QEMU: ask it (briefly; an unreachable QEMU is said so).
            // QEMU's QMP socket serves one client at a time, so while a migration holds it the
            // greeting does not come: that is "busy", not an error of QEMU's.
            for v in ctx.config.vms.iter().filter(|v| v.backend == "qemu") {
                let Some(path) = &v.qmp else { continue };
                let state = match Qmp::connect(path, Duration::from_secs(1)).await {
                    Ok(mut q) => match q.query_status().await {
                        Ok(st) => st.status,
                        Err(e) => format!("QEMU did not answer: {e}"),
                    },
                    Err(QmpError::Timeout { .. }) => {
                        "busy (its QMP socket is in use, by a migration or another client)".into()
                    }
                    Err(e) => format!("QEMU not reachable: {e}"),
                };
                let in_doubt = ctx
                    .journal
                    .lock()
                    .expect("journal lock")
                    .in_doubt_as_source(&v.name);
                let resuming = ctx
                    .resuming
                    .lock()
                    .expect("resuming lock")
                    .get(&v.name)
                    .cloned();
                let state = match (in_doubt, resuming) {
                    (true, _) => {
                        format!("{state}, in doubt: asking its destination (see the journal)")
                    }
                    (false, Some(cause)) => {
                        format!("{state}, rolled back, not yet running: {cause}")
                    }
                    (false, None) => state,
                };
                vms.push(serde_json::json!({ "name": v.name, "qemu": state }));
            }
            let journal: Vec<_> = ctx
                .journal
                .lock()
                .expect("journal lock")
                .records()
                .into_iter()
                .take(20)
                .collect();
            let history = ctx.history.lock().expect("history lock").clone();
            let v = serde_json::json!({
                "identity": hex::encode(ctx.identity.id()),
                "listen": ctx.config.listen,
                "vms": vms,
                "journal": journal,
                "recent": history,
            });
            let _ = wr.write_all(&send(Reply::Status(v))).await;
        }
        Request::Settle {
            order_id,
            resume_here,
        } => {
            let reply = match crate::settle::by_operator(&ctx, &order_id, resume_here).await {
                Ok(what) => Reply::Settled(what),
                Err(e) => Reply::Error(e.to_string()),
            };
            let _ = wr.write_all(&send(reply)).await;
        }
        Request::VmChecksum { vm } => {
            let reply = match ctx.vms.lock().expect("vms lock").get(&vm) {
                Some(g) => Reply::Checksum {
                    checksum: hex::encode(g.checksum()),
                    paused: g.is_paused(),
                    writes: g.writes(),
                },
                None => Reply::Error(format!("no VM named {vm:?} runs on this agent")),
            };
            let _ = wr.write_all(&send(reply)).await;
        }
    }
    Ok(())
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
