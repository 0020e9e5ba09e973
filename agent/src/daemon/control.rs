//! The local control socket: one JSON request a connection (migrate, status, settle, a
//! synthetic guest's checksum), answered with JSON lines. The socket is 0600, in the home.

use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tracing::{error, info};

use crate::control::{Progress, Reply, Request};
use crate::ctx::Ctx;
use crate::error::AgentError;
use crate::guest::SyntheticGuest;

/// The longest request line read from a control client.
const MAX_REQUEST: u64 = 1 << 20;

/// How long a control client has to send its whole request line: `trustmig` sends it at once;
/// one that stalls would hold a task and up to [`MAX_REQUEST`] bytes for as long as it likes.
const REQUEST_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Most control connections served at once. A migration's client holds its connection for the
/// whole migration and a `status` client for a moment; only the agent's user reaches the socket
/// (0600), but a script of theirs that leaks connections must not run the agent out of tasks
/// and file descriptors.
pub(super) const MAX_CONTROL_CONNECTIONS: usize = 64;

/// The control connections served, and those being told the agent is busy.
pub(super) struct Slots {
    serving: Arc<tokio::sync::Semaphore>,
    refusing: Arc<tokio::sync::Semaphore>,
}

impl Slots {
    /// `n` connections served at once, and as many refused at once with a reply.
    pub(super) fn new(n: usize) -> Self {
        Self {
            serving: Arc::new(tokio::sync::Semaphore::new(n)),
            refusing: Arc::new(tokio::sync::Semaphore::new(n)),
        }
    }

    /// A slot for a new control connection, or `None` when all are taken: the client is then
    /// told so (`refuse_busy`), or, past as many refusals at once, closed unanswered.
    pub(super) fn admit(
        &self,
        sock: UnixStream,
    ) -> Option<(tokio::sync::OwnedSemaphorePermit, UnixStream)> {
        if let Ok(slot) = self.serving.clone().try_acquire_owned() {
            return Some((slot, sock));
        }
        if let Ok(refusal) = self.refusing.clone().try_acquire_owned() {
            tokio::spawn(async move {
                refuse_busy(sock).await;
                drop(refusal);
            });
        }
        None
    }
}

/// How long a refused client has to send its request line before it is closed.
const REFUSAL_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Tell a client the agent is busy: its request line read first (within `REFUSAL_WAIT`), so
/// that closing with it unread does not reset the connection and lose the reply; then one line.
async fn refuse_busy(sock: UnixStream) {
    let (rd, mut wr) = sock.into_split();
    // A request line is a few KiB; one longer is cut, and its rest may reset the reply.
    let mut rd = BufReader::new(rd.take(64 << 10));
    let mut request = Vec::new();
    let _ = tokio::time::timeout(REFUSAL_WAIT, rd.read_until(b'\n', &mut request)).await;
    let why = format!(
        "busy: {MAX_CONTROL_CONNECTIONS} control connections are open; try again when one ends"
    );
    let _ = send_within(&mut wr, Reply::Error(why), REFUSAL_WAIT).await;
}

/// Serve one control connection.
pub(super) async fn connection(ctx: Arc<Ctx>, sock: UnixStream) -> Result<(), AgentError> {
    if let Ok(cred) = sock.peer_cred() {
        info!(uid = cred.uid(), pid = ?cred.pid(), "control client");
    }
    let (rd, mut wr) = sock.into_split();
    // One request line, bounded: an order is a few KiB. Read as bytes, so that a line that
    // is not UTF-8 (or one cut inside a character at the bound) gets an answer saying so.
    let mut raw = Vec::new();
    let mut rd = BufReader::new(rd.take(MAX_REQUEST));
    let read = rd.read_until(b'\n', &mut raw);
    match tokio::time::timeout(REQUEST_WAIT, read).await {
        Ok(r) => r.map_err(AgentError::io("control socket"))?,
        Err(_) => {
            let why = format!(
                "bad request: no whole request line within {} s",
                REQUEST_WAIT.as_secs()
            );
            send(&mut wr, Reply::Error(why)).await;
            return Ok(());
        }
    };
    if raw.is_empty() {
        return Ok(());
    }
    let line = match String::from_utf8(raw) {
        Ok(line) => line,
        Err(e) => {
            let at = e.utf8_error().valid_up_to();
            let why = if e.as_bytes().len() as u64 >= MAX_REQUEST {
                format!("bad request: longer than {MAX_REQUEST} bytes")
            } else {
                format!("bad request: not UTF-8 (at byte {at})")
            };
            send(&mut wr, Reply::Error(why)).await;
            return Ok(());
        }
    };
    let req: Request = match serde_json::from_str(line.trim_end_matches(['\n', '\r'])) {
        Ok(r) => r,
        Err(_) if line.len() as u64 >= MAX_REQUEST && !line.ends_with('\n') => {
            let too_long = format!("bad request: longer than {MAX_REQUEST} bytes");
            send(&mut wr, Reply::Error(too_long)).await;
            return Ok(());
        }
        Err(e) => {
            send(&mut wr, Reply::Error(format!("bad request: {e}"))).await;
            return Ok(());
        }
    };
    let reply = match req {
        Request::Migrate { order } => return migrate(ctx, order, &mut wr).await,
        Request::Status => Reply::Status(status(&ctx).await),
        Request::Reload => {
            // Blocking work (files, the TPM): off the runtime's workers.
            let c = ctx.clone();
            match tokio::task::spawn_blocking(move || super::reload::reload(&c)).await {
                Ok(Ok(what)) => Reply::Reloaded(what),
                Ok(Err(e)) => Reply::Error(format!(
                    "reload refused, the running configuration is kept: {e}"
                )),
                Err(e) => Reply::Error(format!("reload failed: {e}")),
            }
        }
        Request::AuditAnchor => match anchor_value(&ctx) {
            Ok((pcr, value)) => Reply::Anchor {
                pcr,
                value: hex::encode(value),
            },
            Err(e) => Reply::Error(e.to_string()),
        },
        // Not a migration: its errors without the "migration failed" those lead with.
        Request::Revoke { order } => match revoke(&ctx, &order) {
            Ok(what) => Reply::Revoked(what),
            Err(e) => Reply::Error(format!("cannot revoke: {}", e.cause())),
        },
        Request::Settle {
            order_id,
            resume_here,
        } => match crate::driver::settle::by_operator(&ctx, &order_id, resume_here).await {
            Ok(what) => Reply::Settled(what),
            Err(e) => Reply::Error(format!("cannot settle: {}", e.cause())),
        },
        Request::Reconcile { vm } => {
            match crate::backend::qemu::reconcile_by_operator(&ctx, &vm).await {
                Ok(what) => Reply::Reconciled(what),
                Err(e) => Reply::Error(e.to_string()),
            }
        }
        Request::VmChecksum { vm } => match ctx.vms.lock().expect("vms lock").get(&vm) {
            Some(g) => Reply::Checksum {
                checksum: hex::encode(g.checksum()),
                paused: g.is_paused(),
                writes: g.writes(),
            },
            None => Reply::Error(format!("no VM named {vm:?} runs on this agent")),
        },
    };
    send(&mut wr, reply).await;
    Ok(())
}

/// The audit anchor PCR this agent extends, and its value now.
fn anchor_value(ctx: &Ctx) -> Result<(u8, [u8; 32]), AgentError> {
    let pcr = (ctx.journal.lock().expect("journal lock").audit_anchor_pcr())
        .ok_or_else(|| AgentError::Refused("the audit trail is not anchored".into()))?;
    // The TPM may be quoting for a migration: wait where blocking is allowed.
    let value = tokio::task::block_in_place(|| {
        let mut tpm = ctx.attester.lock().expect("attester lock");
        tpm.inner().tpm().pcr_read_at(pcr)
    })
    .map_err(|e| AgentError::Tpm(e.to_string()))?;
    Ok((pcr, value))
}

/// How long a client may leave a reply unread before it is given up on.
const CLIENT_STALL: std::time::Duration = std::time::Duration::from_secs(5);

/// One reply line. The operator may have gone away: what they asked for carries on regardless.
async fn send(wr: &mut OwnedWriteHalf, r: Reply) {
    let _ = send_within(wr, r, CLIENT_STALL).await;
}

/// [`send`], within `stall`: whether the client took it. A client that stops reading (a
/// terminal paused with Ctrl-S, a stalled pipe) must not hold up what it asked for.
async fn send_within(wr: &mut OwnedWriteHalf, r: Reply, stall: std::time::Duration) -> bool {
    let mut v = serde_json::to_vec(&r).unwrap_or_default();
    v.push(b'\n');
    matches!(
        tokio::time::timeout(stall, wr.write_all(&v)).await,
        Ok(Ok(()))
    )
}

/// Lines queued for a client that is slow to read; progress beyond them is dropped.
const CLIENT_QUEUE: usize = 256;

/// Run a migration as its source, streaming its progress to the client. The progress channel
/// is drained whatever the client does (the source's switch-over reports through it with the
/// guest stopped): lines go to the client through a queue its own writer empties, whole
/// lines only; progress that finds the queue full is dropped, and the outcome (`Failed`,
/// `Done`) waits its turn, so a client that was slow, even suspended for a while, still
/// learns how the migration ended.
async fn migrate(ctx: Arc<Ctx>, order: String, wr: &mut OwnedWriteHalf) -> Result<(), AgentError> {
    let (tx, mut rx) = mpsc::channel::<Progress>(64);
    let task = tokio::spawn(crate::driver::source::migrate(ctx, order, tx));
    let (lines, mut queued) = mpsc::channel::<Reply>(CLIENT_QUEUE);
    let forward = async move {
        let mut dropped = 0u64;
        while let Some(p) = rx.recv().await {
            if matches!(p, Progress::Failed { .. }) {
                let _ = lines.send(Reply::Progress(p)).await;
            } else if lines.try_send(Reply::Progress(p)).is_err() {
                dropped += 1;
            }
        }
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "the migration's client read slowly: progress lines dropped"
            );
        }
        match task.await {
            Ok(Ok(summary)) => {
                let _ = lines.send(Reply::Progress(Progress::Done(summary))).await;
            }
            Ok(Err(_)) => {} // already reported as Progress::Failed
            Err(e) => {
                error!("migration task panicked: {e}");
                let _ = lines.send(Reply::Error("internal error".into())).await;
            }
        }
    };
    let write = async {
        while let Some(r) = queued.recv().await {
            let mut v = serde_json::to_vec(&r).unwrap_or_default();
            v.push(b'\n');
            if wr.write_all(&v).await.is_err() {
                break; // the client went away; the migration goes on
            }
        }
    };
    tokio::join!(forward, write);
    Ok(())
}

/// `trustmig order revoke`: journal an order this agent has not used as revoked, after checking
/// that a trusted operator signed it and that it names this agent. An order can start only
/// where both its agents claim it, so revoking it on either one is enough. spec: SPEC.md §3.4
fn revoke(ctx: &Ctx, order_hex: &str) -> Result<String, AgentError> {
    use trustmig_protocol::order::{hex, OrderError, OrderPolicy, Role, SignedOrder};
    let bytes = ::hex::decode(order_hex.trim())
        .map_err(|e| AgentError::Usage(format!("order is not hex: {e}")))?;
    let signed = SignedOrder::from_cbor(&bytes)?;
    let body = signed.dangerous_unverified_body()?;
    let me = ctx.identity.id();
    let role = match (body.source == me, body.destination == me) {
        (true, _) => Role::Source,
        (_, true) => Role::Destination,
        _ => {
            return Err(AgentError::Usage(format!(
                "order {} names neither this agent as its source nor as its destination",
                hex(&body.order_id)
            )))
        }
    };
    let policy = OrderPolicy {
        operators: &ctx.operators()?,
        me,
        role,
        // As a migration would check it: an order past the journal's floor is expired too.
        now: (ctx.journal.lock().expect("journal lock")).order_clock(crate::unix_now()),
    };
    match signed.verify(&policy) {
        Ok(_) => {}
        Err(OrderError::Expired { .. }) => {
            return Ok(format!(
                "order {} has expired: it can no longer start anywhere (nothing journalled)",
                hex(&body.order_id)
            ))
        }
        // Not yet valid: revoking it ahead of its window is the point.
        Err(OrderError::NotYetValid { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    ctx.journal
        .lock()
        .expect("journal lock")
        .revoke(&body, role)?;
    let what = format!(
        "order {} (VM {}) revoked here as its {role}: it can no longer start",
        hex(&body.order_id),
        body.vm
    );
    tracing::warn!("{what}");
    Ok(what)
}

/// How many of the journal's newest records `status` shows (orders in flight are shown too).
const STATUS_RECORDS: usize = 20;

/// `trustmig status`: identity, the VMs and where each stands, the journal's latest records and
/// recent migrations.
async fn status(ctx: &Arc<Ctx>) -> serde_json::Value {
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
    // What is left to the operator, read with those locks released (it takes the journal's).
    for v in &mut vms {
        let left = v["name"].as_str().and_then(|name| ctx.left_now(name));
        v["left"] = left.into();
    }
    for v in &ctx.config().vms {
        let Some(q) = v.qemu() else { continue };
        let state = crate::backend::qemu::status(&q.qmp).await;
        let in_doubt = (ctx.journal.lock().expect("journal lock"))
            .doubt_as_source(&v.name)
            .map(|r| r.order_id.clone());
        let resuming = ctx
            .resuming
            .lock()
            .expect("resuming lock")
            .cause(&v.name)
            .map(str::to_string);
        let left = ctx.left_now(&v.name);
        let state = match (in_doubt, resuming, left) {
            (Some(order), _, _) => format!("{state}, in doubt after order {order}: asking its destination until it answers (should it never: `{}` with `--moved` or `--resume-here`, once you know where the VM runs)", ctx.home.command(&["settle", &order])),
            (None, Some(cause), _) => format!("{state}, rolled back, not yet running: {cause}"),
            (None, None, Some(how)) => format!("{state}, left to the operator: {how}"),
            (None, None, None) => state,
        };
        vms.push(serde_json::json!({ "name": v.name, "qemu": state }));
    }
    // The newest records, and every order in flight however old (one in doubt must not
    // scroll out of sight).
    let (journal, journal_broken) = {
        let j = ctx.journal.lock().expect("journal lock");
        let records: Vec<_> = (j.records().into_iter().enumerate())
            .filter(|(i, r)| *i < STATUS_RECORDS || r.in_flight())
            .map(|(_, r)| r)
            .collect();
        (records, j.broken_because().map(str::to_string))
    };
    let history = ctx.history.lock().expect("history lock").clone();
    let queued: Vec<_> = (ctx.queued.lock().expect("queue lock").iter())
        .map(|(order, vm)| serde_json::json!({ "order_id": order, "vm": vm }))
        .collect();
    let (limit, sending) = (ctx.max_sending, ctx.sending());
    serde_json::json!({
        "identity": hex::encode(ctx.identity.id()),
        "listen": ctx.config().listen,
        "vms": vms,
        "sending": sending,
        "max_concurrent_migrations": limit,
        "queued": queued,
        "journal": journal,
        "journal_broken": journal_broken,
        "recent": history,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Past the cap, a control client (the CLI's own `request`) is told the agent is busy; a
    /// slot given back admits the next.
    #[tokio::test]
    async fn control_connections_past_the_cap_are_told_busy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let slots = Slots::new(2);
        let mut held = Vec::new();
        let mut clients = Vec::new();
        for _ in 0..2 {
            clients.push(UnixStream::connect(&path).await.unwrap());
            let (ours, _) = listener.accept().await.unwrap();
            held.push(slots.admit(ours).expect("a slot is free"));
        }
        let client = tokio::spawn({
            let path = path.clone();
            async move { crate::control::request(&path, &Request::Status).await }
        });
        let (ours, _) = listener.accept().await.unwrap();
        assert!(
            slots.admit(ours).is_none(),
            "a third connection past a cap of 2"
        );
        match client.await.unwrap() {
            Ok(Reply::Error(e)) => assert!(e.starts_with("busy:"), "{e}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        held.pop();
        let _next = UnixStream::connect(&path).await.unwrap();
        let (ours, _) = listener.accept().await.unwrap();
        assert!(
            slots.admit(ours).is_some(),
            "a slot given back is taken again"
        );
    }

    /// A client that stops reading is given up on within the stall allowance; one that reads
    /// gets every line.
    #[tokio::test]
    async fn a_client_that_stops_reading_is_not_waited_for() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (_rd, mut wr) = ours.into_split();
        let big = Reply::Error("x".repeat(64 << 10));
        let stall = std::time::Duration::from_millis(200);
        let mut sent = 0;
        while send_within(&mut wr, big.clone(), stall).await {
            sent += 1;
            assert!(sent < 10_000, "the socket never filled");
        }
        assert!(sent > 0, "the first lines fit the socket's buffer");
        // A reader drains it: lines go again.
        let reader = tokio::spawn(async move {
            let mut rd = theirs;
            let mut buf = vec![0u8; 1 << 20];
            while rd.read(&mut buf).await.is_ok_and(|n| n > 0) {}
        });
        assert!(
            send_within(
                &mut wr,
                Reply::Error("after".into()),
                std::time::Duration::from_secs(10)
            )
            .await
        );
        drop(wr);
        reader.abort();
    }
}
