//! The destination side of the QEMU sidecar: the agent feeds the opened stream to QEMU
//! (`migrate-incoming`) and runs `cont` only after the final evidence and `Commit`. spec: spec/qemu.md §3, §4

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, ReadHalf, WriteHalf};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};
use trustmig_protocol::error::PeerMisbehaved;
use trustmig_protocol::handshake::Established;
use trustmig_protocol::keys::Direction;
use trustmig_protocol::messages::{frame_len, Message, FRAME_HEADER};
use trustmig_protocol::migration::{DestEvent, DestMigration};
use trustmig_protocol::order::hex;
use trustmig_protocol::record::{Opener, RecordType, Sealer};

use crate::daemon::{history_entry, Ctx, DataConn};
use crate::error::AgentError;
use crate::fault::{crash_point, CrashPoint};
use crate::journal::State;
use crate::pumps::{open_pump, seal_pump, Received};
use crate::qmp::Qmp;
use crate::wire::{read_record, write_frame, WireError};

use super::{proto, qemu_vm, qmp_err, socket_dir, socket_path, stream_secret};

type ServerTls = tokio_rustls::server::TlsStream<TcpStream>;

/// How long the destination waits for the source's data stream to bind: the source opens it
/// right after the handshake, so a stream that has not authenticated by then never will.
const BIND_TIMEOUT: Duration = Duration::from_secs(10);

/// Receive a QEMU migration (called by `dest` for `TransferMode::HypervisorStream`). `sid_slot`
/// is set to the registered session id so the caller can unregister it. On any error before
/// `Commit` the destination QEMU is never resumed; it is discarded with `quit`.
pub async fn receive(
    ctx: Arc<Ctx>,
    est: Established,
    rd: &mut ReadHalf<ServerTls>,
    wr: &mut WriteHalf<ServerTls>,
    vm: &str,
    sid_slot: &mut Option<[u8; 16]>,
) -> Result<(), AgentError> {
    // Register first: the source opens its data stream right after the handshake.
    let sid = est.keys.session_id();
    let (conn_tx, conn_rx) = mpsc::channel::<DataConn>(4);
    ctx.sessions
        .lock()
        .expect("sessions lock")
        .insert(sid, conn_tx);
    *sid_slot = Some(sid);
    let Some(qmp_path) = qemu_vm(&ctx.config, vm) else {
        return Err(AgentError::Migration(format!(
            "no QEMU VM named {vm:?} is configured on this agent (add a [[vm]] with backend = \"qemu\")"
        )));
    };
    let mut qmp = Qmp::connect(&qmp_path, ctx.step_timeout())
        .await
        .map_err(qmp_err)?;
    let mut d = DestRun {
        ctx: ctx.clone(),
        vm: vm.to_string(),
        committed: false,
        incoming: false,
        tasks: Vec::new(),
        disk_files: Vec::new(),
    };
    let r = d.go(est, rd, wr, &mut qmp, conn_rx).await;
    for t in d.tasks.drain(..) {
        t.abort();
    }
    if r.is_err() && d.incoming && !d.committed {
        // Discard: this QEMU was started for this migration and holds (part of) a VM that must
        // not run here, or waits for one that will not come. It exits before the source hears
        // of the failure (the caller closes the channel after this), so a source waiting for
        // the images' locks can run its VM again (spec/qemu.md §4).
        match qmp.quit_and_wait(ctx.step_timeout()).await {
            Ok(()) => warn!(
                vm,
                "destination QEMU discarded (quit); it was never resumed"
            ),
            Err(e) => warn!(vm, "destination QEMU not resumed; quit failed: {e}"),
        }
    }
    if r.is_err() && !d.committed {
        crate::disk::discard(&d.disk_files);
    }
    r
}

struct DestRun {
    ctx: Arc<Ctx>,
    vm: String,
    committed: bool,
    /// QEMU was found waiting for this migration (`inmigrate`): it is this migration's to
    /// discard on failure.
    incoming: bool,
    tasks: Vec<JoinHandle<()>>,
    /// Received disk files (removed if the migration fails before `Commit`).
    disk_files: Vec<PathBuf>,
}

impl DestRun {
    #[allow(clippy::too_many_lines)]
    async fn go(
        &mut self,
        est: Established,
        rd: &mut ReadHalf<ServerTls>,
        wr: &mut WriteHalf<ServerTls>,
        qmp: &mut Qmp,
        mut conns: mpsc::Receiver<DataConn>,
    ) -> Result<(), AgentError> {
        let ctx = self.ctx.clone();
        let timeout = ctx.step_timeout();
        let status = qmp.query_status().await.map_err(qmp_err)?;
        if status.status != "inmigrate" {
            return Err(AgentError::Migration(format!(
                "destination QEMU for {:?} is in state {:?}, not waiting for a migration: start it with `-incoming defer -S` (see `trustmig qemu`)",
                self.vm, status.status
            )));
        }
        self.incoming = true;
        if est.streams != 1 {
            return Err(AgentError::Migration(format!(
                "hypervisor-stream mode uses one data stream, source announced {}",
                est.streams
            )));
        }
        let order_id = *est.order.id();
        let sid = est.keys.session_id();

        let mut dm = DestMigration::new(est.channel.clone(), order_id);
        let mut frames = Frames::default();

        // The data stream: the first connection whose StreamInit authenticates, within
        // BIND_TIMEOUT. The control channel is watched meanwhile: a source that gave up (its
        // stream was refused, say) says so there, and this side must not hold the session and
        // QEMU for a step timeout longer (spec/qemu.md §4).
        let mut opener = Opener::new(stream_secret(&est, Direction::SourceToDestination), 0);
        let deadline = tokio::time::Instant::now() + timeout.min(BIND_TIMEOUT);
        let mut data = loop {
            let conn = tokio::select! {
                c = tokio::time::timeout_at(deadline, conns.recv()) => c,
                msg = frames.next(rd) => {
                    let msg = msg.map_err(|e| AgentError::Migration(format!("control channel: {e}")))?;
                    // An Abort (or garbage) ends the session here; anything else is early.
                    dm.handle(&msg, ctx.verifier.as_ref()).map_err(proto)?;
                    return Err(proto(PeerMisbehaved::UnexpectedMessage {
                        got: Message::decode(&msg).map_or("?", |m| m.name()),
                        expected: "the data stream",
                    }));
                }
            };
            let (i, mut sock) = conn
                .map_err(|_| {
                    AgentError::Migration("the source opened no data stream in time".into())
                })?
                .ok_or_else(|| AgentError::Migration("session closed".into()))?;
            if i != 0 {
                warn!(stream = i, "surplus data connection dropped");
                continue;
            }
            sock.set_nodelay(true).ok();
            let mut buf = Vec::new();
            let ok = match tokio::time::timeout(timeout, read_record(&mut sock, &mut buf)).await {
                Ok(Ok(true)) => {
                    matches!(opener.open(&mut buf), Ok((RecordType::StreamInit, p)) if p == [&sid[..], &0u16.to_be_bytes()].concat())
                }
                _ => false,
            };
            if ok {
                break sock;
            }
            // Unauthenticated: drop the connection, keep the session (SPEC.md §7.1). The
            // opener may be poisoned by the forgery: start a fresh one for the next try.
            warn!("data connection failed StreamInit; dropped");
            opener = Opener::new(stream_secret(&est, Direction::SourceToDestination), 0);
        };
        let sealer = Sealer::new(stream_secret(&est, Direction::DestinationToSource), 0);

        // Disks first (spec/qemu.md §5): each chunk checked against the attested manifest as it
        // arrives; attached to QEMU only once every disk verified, before QEMU loads anything.
        if !est.manifest.disks.is_empty() {
            let vm_cfg = ctx.config.vms.iter().find(|v| v.name == self.vm);
            let targets = crate::disk::plan(&est.manifest, vm_cfg)?;
            self.disk_files = targets
                .iter()
                .flat_map(|t| t.files().map(Path::to_path_buf))
                .collect();
            let n = crate::disk::receive_disks(
                &mut data,
                &mut opener,
                &est.manifest,
                &targets,
                timeout,
            )
            .await?;
            info!(order = %hex(&order_id), bytes = n, disks = targets.len(), "disks received and verified");
            crate::disk::attach(qmp, &targets).await?;
        }

        // QEMU listens on a socket in our home; we feed it.
        let dir = socket_dir(&ctx)?;
        let path = socket_path(&dir, "in", &order_id)?;
        // `events`: the load's completion wakes `wait_loaded` at once.
        qmp.migrate_set_capabilities(&[("events", true)])
            .await
            .map_err(qmp_err)?;
        qmp.migrate_incoming(&format!("unix:{}", path.display()))
            .await
            .map_err(qmp_err)?;
        let qemu_sock = {
            let until = Instant::now() + timeout;
            loop {
                match UnixStream::connect(&path).await {
                    Ok(s) => break s,
                    Err(e) if Instant::now() > until => {
                        return Err(AgentError::Migration(format!(
                            "destination QEMU does not listen on {}: {e}",
                            path.display()
                        )))
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        };
        let _ = std::fs::remove_file(&path);
        let (qemu_rd, qemu_wr) = qemu_sock.into_split();
        let (data_rd, data_wr) = data.into_split();
        let (fwd_tx, mut fwd_rx) = mpsc::channel::<Result<Received, AgentError>>(1);
        self.tasks.push(tokio::spawn(async move {
            let _ = fwd_tx
                .send(open_pump(data_rd, qemu_wr, opener, "data stream 0").await)
                .await;
        }));
        self.tasks.push(tokio::spawn(async move {
            if let Err(e) = seal_pump(qemu_rd, data_wr, sealer, "return path").await {
                warn!("{e}");
            }
        }));
        info!(order = %hex(&order_id), vm = %self.vm, "feeding the destination QEMU");

        let transcript_hash = est.transcript_hash;
        let mut received: Option<Received> = None;
        let mut awaiting: Option<Vec<u64>> = None;
        loop {
            tokio::select! {
                msg = frames.next(rd) => {
                    let msg = msg.map_err(|e| AgentError::Migration(format!("control channel: {e}")))?;
                    let ev = dm.handle(&msg, ctx.verifier.as_ref()).map_err(proto)?;
                    match ev {
                        DestEvent::None => {}
                        DestEvent::AwaitStreams(counts) => awaiting = Some(counts),
                        DestEvent::Send(m) => send(&ctx, wr, &m).await?,
                        DestEvent::Resume => return self.resume(&mut dm, wr, qmp, &order_id).await,
                    }
                }
                Some(r) = fwd_rx.recv(), if received.is_none() => {
                    received = Some(r?);
                    debug!("QEMU stream opened to its end and written to QEMU");
                }
            }
            if let (Some(counts), Some(got)) = (&awaiting, &received) {
                // Everything arrived; QEMU must also have loaded it without complaint.
                wait_loaded(qmp, timeout).await?;
                debug!("destination QEMU loaded the stream");
                let computed = got.digest.clone().finish(&transcript_hash);
                if counts.len() != 1 {
                    return Err(proto(PeerMisbehaved::BadField(format!(
                        "source announced {} streams, hypervisor-stream mode has 1",
                        counts.len()
                    ))));
                }
                let m = dm
                    .streams_complete(&[got.records], computed, crate::random())
                    .map_err(proto)?;
                crash_point(CrashPoint::DestinationFinalChallenge);
                send(&ctx, wr, &m).await?;
                awaiting = None;
            }
        }
    }

    /// `Commit` arrived: journal it, `cont` the destination QEMU, confirm.
    async fn resume(
        &mut self,
        dm: &mut DestMigration,
        wr: &mut WriteHalf<ServerTls>,
        qmp: &mut Qmp,
        id: &[u8; 16],
    ) -> Result<(), AgentError> {
        let ctx = self.ctx.clone();
        ctx.journal.lock().expect("journal lock").commit(id)?;
        self.committed = true;
        debug!("commit journalled");
        qmp.cont().await.map_err(qmp_err)?;
        let st = qmp.query_status().await.map_err(qmp_err)?;
        if !st.running {
            return Err(AgentError::Migration(format!(
                "destination QEMU did not start after cont (state {:?})",
                st.status
            )));
        }
        let m = dm.resumed().map_err(proto)?;
        send(&ctx, wr, &m).await?;
        ctx.journal
            .lock()
            .expect("journal lock")
            .set(id, State::Done, "resumed here")?;
        info!(order = %hex(id), vm = %self.vm, "QEMU VM resumed on this host");
        ctx.remember(history_entry("destination", None, None, &hex(id), &self.vm));
        Ok(())
    }
}

/// Control frames read in a cancel-safe way (`read_frame` is not: inside `select!` a cancelled
/// read would lose a partial frame). The only await is one `read`, which either delivers bytes
/// into `buf` or none.
#[derive(Default)]
struct Frames {
    buf: Vec<u8>,
}

impl Frames {
    async fn next<R: AsyncRead + Unpin>(&mut self, rd: &mut R) -> Result<Vec<u8>, WireError> {
        loop {
            if let Some(h) = self.buf.get(..FRAME_HEADER) {
                let n = frame_len(h.try_into().expect("FRAME_HEADER bytes"))?;
                if self.buf.len() >= FRAME_HEADER + n {
                    let body = self.buf[FRAME_HEADER..FRAME_HEADER + n].to_vec();
                    self.buf.drain(..FRAME_HEADER + n);
                    return Ok(body);
                }
            }
            let mut tmp = [0u8; 16 << 10];
            let k = rd.read(&mut tmp).await?;
            if k == 0 {
                return Err(WireError::Closed);
            }
            self.buf.extend_from_slice(&tmp[..k]);
        }
    }
}

async fn send(ctx: &Ctx, wr: &mut WriteHalf<ServerTls>, m: &[u8]) -> Result<(), AgentError> {
    tokio::time::timeout(ctx.step_timeout(), write_frame(wr, m))
        .await
        .map_err(|_| AgentError::Migration("control channel: send timed out".into()))?
        .map_err(|e| AgentError::Migration(format!("control channel: {e}")))
}

/// Wait until the destination QEMU reports the incoming migration `completed`.
async fn wait_loaded(qmp: &mut Qmp, timeout: Duration) -> Result<(), AgentError> {
    let until = Instant::now() + timeout;
    loop {
        let m = qmp.query_migrate().await.map_err(qmp_err)?;
        match m.status() {
            "completed" => return Ok(()),
            "failed" | "cancelled" => {
                return Err(AgentError::Migration(format!(
                    "destination QEMU failed to load the stream: {}",
                    m.error_desc.as_deref().unwrap_or("no reason given")
                )))
            }
            s if Instant::now() > until => {
                return Err(AgentError::Migration(format!(
                    "destination QEMU did not finish loading in time (status {s})"
                )))
            }
            _ => {
                // Woken by the next event (a MIGRATION event with the events capability), or
                // after 20 ms at the latest.
                qmp.next_event(Duration::from_millis(20))
                    .await
                    .map_err(qmp_err)?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn frames_survive_split_and_cancelled_reads() {
        let mut wire = Vec::new();
        for body in [&b"first"[..], &b""[..], &[7u8; 40_000][..]] {
            wire.extend_from_slice(&(body.len() as u32).to_be_bytes());
            wire.extend_from_slice(body);
        }
        let (mut w, mut r) = tokio::io::duplex(64);
        let feed = tokio::spawn(async move {
            for c in wire.chunks(997) {
                w.write_all(c).await.expect("write");
                tokio::time::sleep(Duration::from_micros(50)).await;
            }
        });
        let mut f = Frames::default();
        let mut got = Vec::new();
        while got.len() < 3 {
            // Cancel the read often, as a select! would.
            if let Ok(r) = tokio::time::timeout(Duration::from_micros(30), f.next(&mut r)).await {
                got.push(r.expect("frame"));
            }
        }
        feed.await.expect("feed");
        assert_eq!(got[0], b"first");
        assert!(got[1].is_empty());
        assert_eq!(got[2], vec![7u8; 40_000]);
        assert!(matches!(f.next(&mut r).await, Err(WireError::Closed)));
    }
}
