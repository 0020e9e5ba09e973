//! `trustmig agent`: the daemon. One TCP port for peers (TLS control sessions and data streams,
//! told apart by their first byte), one unix control socket for the local CLI (`control.rs`).
//! Start-up, with the journal's settlement and reconciliation of what a crash left: `start.rs`.

pub mod admission;
mod control;
mod notify;
mod reload;
mod start;

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tracing::{info, warn};

use crate::ctx::Ctx;
use crate::error::AgentError;
use crate::home::Home;
use crate::net::wire::{parse_preamble, PREAMBLE_LEN};

/// Run the agent until SIGTERM/SIGINT.
pub async fn run(home: Home) -> Result<(), AgentError> {
    crate::fault::init();
    let mut started = start::load(home).await?;
    let ctx = started.ctx.clone();
    started.resume_background_work();
    serve(ctx, started.listener, started.control).await
}

/// Accept peers and local control clients until SIGTERM/SIGINT.
async fn serve(
    ctx: Arc<Ctx>,
    listener: TcpListener,
    control: UnixListener,
) -> Result<(), AgentError> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| AgentError::Migration(format!("cannot install SIGTERM handler: {e}")))?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| AgentError::Migration(format!("cannot install SIGHUP handler: {e}")))?;
    // Listening on both sockets: a `Type=notify` unit may order what depends on us now.
    notify::notify("READY=1\nSTATUS=listening");
    let admission = Arc::new(admission::Admission::default());
    let mut turned_away = TurnedAway::default();
    let mut control_turned_away = TurnedAway::default();
    let control_slots = control::Slots::new(control::MAX_CONTROL_CONNECTIONS);
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((sock, addr)) => {
                    let slot = match admission.admit(addr.ip()) {
                        Ok(slot) => slot,
                        Err(why) => {
                            if let Some(closed) = turned_away.count() {
                                warn!(%addr, closed, "too many peer connections ({why:?}): closing new ones at once");
                            }
                            continue;
                        }
                    };
                    let ctx = ctx.clone();
                    tokio::spawn(async move {
                        if let Err(e) = peer_connection(ctx, sock, slot).await {
                            warn!(%addr, "peer connection: {e}");
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors (or memory) fails every accept at once until
                    // some close: pause rather than spin.
                    warn!("accept: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            r = control.accept() => match r {
                Ok((sock, _)) => {
                    let Some((slot, sock)) = control_slots.admit(sock) else {
                        if let Some(closed) = control_turned_away.count() {
                            warn!(closed, "{} control connections open: closing new ones at once", control::MAX_CONTROL_CONNECTIONS);
                        }
                        continue;
                    };
                    let ctx = ctx.clone();
                    tokio::spawn(async move {
                        if let Err(e) = control::connection(ctx, sock).await {
                            warn!("control connection: {e}");
                        }
                        drop(slot);
                    });
                }
                Err(e) => warn!("control accept: {e}"),
            },
            // Off the accept loop and the runtime's workers: a reload reads files and extends
            // the TPM, which may wait for a quote (100-600 ms on a hardware TPM).
            _ = hup.recv() => {
                let ctx = ctx.clone();
                tokio::task::spawn_blocking(move || reload::on_signal(&ctx));
            }
            _ = term.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = tokio::signal::ctrl_c() => { info!("SIGINT: shutting down"); break; }
        }
    }
    notify::notify("STOPPING=1");
    let _ = std::fs::remove_file(ctx.home.control_socket());
    // The audit trail's last entries into its TPM anchor before the process ends (a hardware
    // TPM takes milliseconds per extend); what does not make it is extended at the next start.
    let drain = ctx
        .journal
        .lock()
        .expect("journal lock")
        .stop_audit_anchoring();
    if let Some(drain) = drain {
        let drained = tokio::task::spawn_blocking(move || drain.wait(ANCHOR_DRAIN))
            .await
            .unwrap_or(false);
        if !drained {
            warn!("the audit trail's last entries are not all in its TPM anchor yet: they are extended at the next start");
        }
    }
    Ok(())
}

/// How long shutdown waits for the audit anchor to catch up.
const ANCHOR_DRAIN: Duration = Duration::from_secs(5);

/// Connections closed at once (by `admission`, or past the control socket's cap), logged at
/// most once per `LOG_EVERY` with how many since: a flood must not flood the log too.
#[derive(Default)]
struct TurnedAway {
    since_logged: u64,
    logged_at: Option<std::time::Instant>,
}

impl TurnedAway {
    const LOG_EVERY: Duration = Duration::from_secs(10);

    /// Count one; how many were closed since the last log line when one is due now.
    fn count(&mut self) -> Option<u64> {
        self.since_logged += 1;
        let now = std::time::Instant::now();
        if self.logged_at.is_some_and(|t| now - t < Self::LOG_EVERY) {
            return None;
        }
        self.logged_at = Some(now);
        Some(std::mem::take(&mut self.since_logged))
    }
}

/// The pause after a failed `accept`.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How long a new peer connection may take to send its first bytes (a TLS ClientHello or a
/// data stream's preamble: both are sent as soon as it connects).
const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(10);

/// A TCP connection from a peer: TLS control session (first byte 0x16) or data stream. It holds
/// its admission `slot` while this agent handles it.
async fn peer_connection(
    ctx: Arc<Ctx>,
    sock: TcpStream,
    slot: admission::Slot,
) -> Result<(), AgentError> {
    sock.set_nodelay(true).ok();
    let first_bytes = ctx.step_timeout().min(FIRST_BYTES_TIMEOUT);
    let mut first = [0u8; 1];
    let n = tokio::time::timeout(first_bytes, sock.peek(&mut first))
        .await
        .map_err(|_| AgentError::Timeout("peer sent nothing".into()))?
        .map_err(AgentError::io("peer socket"))?;
    if n == 0 {
        return Ok(());
    }
    if first[0] == 0x16 {
        // Authenticated, the session no longer counts against the unauthenticated ones, and
        // its address's data streams get in past a flood from elsewhere.
        return crate::driver::destination::serve(ctx, sock, move || slot.into_trusted()).await;
    }
    // A data stream: its preamble names the session. Unknown sessions are dropped quietly;
    // an unauthenticated connection must not be able to disturb a session.
    let mut sock = sock;
    let mut p = [0u8; PREAMBLE_LEN];
    tokio::time::timeout(first_bytes, sock.read_exact(&mut p))
        .await
        .map_err(|_| AgentError::Timeout("data preamble timed out".into()))?
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
            // The session has it now, and bounds it.
            drop(slot);
        }
        None => warn!(session = %hex::encode(sid), "data stream for an unknown session dropped"),
    }
    Ok(())
}
