//! The synthetic guest leaving: pre-copy rounds, stop-and-copy and device state over N sealed
//! data streams. spec: SPEC.md §7, §8.1–8.6

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use trustmig_protocol::handshake::Established;
use trustmig_protocol::messages::{Message, TransferMode};
use trustmig_protocol::precopy::{GuestMemory, PrecopySource, RoundDecision};
use trustmig_protocol::rate::Pacer;
use trustmig_protocol::record::{RecordType, Sealer};
use trustmig_protocol::Digest;

use crate::backend::vm_manifest;
use crate::backend::{Offer, SourceLink, SourceVm, Tasks, Transferred};
use crate::control::{Progress, Summary};
use crate::ctx::Ctx;
use crate::error::{AgentError, Link};
use crate::guest::{SyntheticGuest, PAGE_SIZE};
use crate::net::stream_init;

/// A synthetic guest on its way out: taken from the running VMs for the migration's time.
pub(crate) struct SyntheticSource {
    guest: SyntheticGuest,
}

impl SyntheticSource {
    /// Take `vm` from the VMs that run here (it runs on while it migrates).
    pub fn take(ctx: &Ctx, vm: &str) -> Result<Self, AgentError> {
        let guest = ctx.vms.lock().expect("vms lock").remove(vm);
        guest
            .map(|guest| Self { guest })
            .ok_or_else(|| AgentError::Refused(format!("no VM named {vm:?} runs on this agent")))
    }
}

impl SourceVm for SyntheticSource {
    const NAME: &'static str = "synthetic";

    async fn offer(&mut self, ctx: &Arc<Ctx>) -> Result<Offer, AgentError> {
        // Synthetic guests have no disks: shared-storage mode.
        Ok(Offer {
            mode: TransferMode::Precopy {
                page_size: PAGE_SIZE as u32,
                page_count: self.guest.page_count(),
            },
            streams: ctx.config().transfer.streams,
            manifest: vm_manifest(ctx, self.guest.name(), 1 << 20, vec![]),
        })
    }

    async fn transfer(&mut self, link: SourceLink<'_>) -> Result<Transferred, AgentError> {
        let mut pool = Pool::new(4 * usize::from(link.est.streams) + 4);
        let addr = &link.order.body().destination_addr;
        let streams = open_streams(link.est, addr, &pool).await?;
        transfer(link, &mut self.guest, streams, &mut pool).await
    }

    fn memory_checksum(&self, _digest: &Digest) -> String {
        // BLAKE3 of the guest's memory at pause: the demo compares it with the destination's.
        hex::encode(self.guest.checksum())
    }

    // A synthetic guest is never paused (its claim says so): it runs again.
    async fn give_back(mut self, ctx: &Arc<Ctx>, _paused: bool) -> String {
        self.guest.set_throttle(0);
        self.guest.resume();
        let name = self.guest.name().to_string();
        ctx.vms.lock().expect("vms lock").insert(name, self.guest);
        "rolled back: the VM keeps running on the source, its memory untouched".into()
    }

    fn keep_stopped(self, ctx: &Arc<Ctx>) {
        let name = self.guest.name().to_string();
        ctx.parked
            .lock()
            .expect("parked lock")
            .insert(name, self.guest);
    }
}

struct StreamTx {
    tx: mpsc::Sender<(RecordType, Vec<u8>)>,
    task: JoinHandle<Result<(u64, u64), String>>,
}

/// Batch buffers go back to the engine after sealing, so a migration allocates a handful of
/// 256 KiB buffers instead of one per batch (large blocks are mmap'd and faulted in anew).
struct Pool {
    tx: mpsc::Sender<Vec<u8>>,
    rx: mpsc::Receiver<Vec<u8>>,
}

impl Pool {
    fn new(n: usize) -> Self {
        let (tx, rx) = mpsc::channel(n);
        Self { tx, rx }
    }

    fn take(&mut self, cap: usize) -> Vec<u8> {
        match self.rx.try_recv() {
            Ok(mut b) => {
                b.clear();
                b
            }
            Err(_) => Vec::with_capacity(cap),
        }
    }
}

/// Open the session's data streams, each bound by its `StreamInit` record. spec: SPEC.md §7.1
async fn open_streams(
    est: &Established,
    addr: &str,
    pool: &Pool,
) -> Result<Vec<StreamTx>, AgentError> {
    let mut out = Vec::new();
    for i in 0..est.streams {
        let mut sock = TcpStream::connect(addr)
            .await
            .map_err(|e| AgentError::Connect {
                addr: addr.to_string(),
                reason: format!("data stream {i}: {e}"),
            })?;
        sock.set_nodelay(true).ok();
        let (first, sealer) = stream_init::opening(&est.keys, i)?;
        sock.write_all(&first)
            .await
            .map_err(|e| AgentError::transport(Link::Data(i), e))?;
        let (tx, rx) = mpsc::channel(2);
        out.push(StreamTx {
            tx,
            task: tokio::spawn(stream_writer(sock, sealer, rx, pool.tx.clone())),
        });
    }
    Ok(out)
}

/// Pre-copy rounds until the engine switches over, stop-and-copy, device state, stream ends.
async fn transfer(
    mut link: SourceLink<'_>,
    guest: &mut SyntheticGuest,
    streams: Vec<StreamTx>,
    pool: &mut Pool,
) -> Result<Transferred, AgentError> {
    let body = link.order.body();
    let mut engine = PrecopySource::new(guest, body.limits.clone(), link.est.streams)?;
    engine.begin(guest)?;
    guest.tick(Instant::now());

    precopy_rounds(&mut link, guest, &mut engine, &streams, pool).await?;

    // Stop-and-copy: from here the guest is paused until rollback or forever.
    engine.stop_and_copy(guest)?;
    let paused_at = Instant::now();
    let stop_pages = engine.pending_pages();
    link.report(Progress::SwitchOver { pages: stop_pages })
        .await;
    while let Some((batch, buf)) = next_batch(&mut engine, guest, pool)? {
        send_record(&streams, batch.stream, RecordType::Pages, buf).await?;
    }
    let device_state = format!(
        "synthetic-vcpu vm={} writes={}",
        guest.name(),
        guest.writes()
    )
    .into_bytes();
    send_record(&streams, 0, RecordType::DeviceState, device_state.clone()).await?;
    let mut counts = Vec::new();
    let mut wire_bytes = 0;
    for (i, s) in streams.into_iter().enumerate() {
        s.tx.send((RecordType::StreamEnd, Vec::new()))
            .await
            .map_err(|_| AgentError::transport(Link::Data(i as u16), "closed"))?;
        drop(s.tx);
        let (records, bytes) = s
            .task
            .await
            .map_err(|e| AgentError::transport(Link::Data(i as u16), format!("writer task: {e}")))?
            .map_err(|e| AgentError::transport(Link::Data(i as u16), e))?;
        counts.push(records);
        wire_bytes += bytes;
    }
    let digest = engine.finish(&device_state, &link.est.transcript_hash)?;
    let stats = engine.stats().clone();
    Ok(Transferred {
        steps: vec![(
            "last pages and device state sent, digest computed",
            Instant::now(),
        )],
        stream_records: counts,
        digest,
        paused_at,
        stream_bytes: wire_bytes,
        summary: Summary {
            guest_bytes: guest.bytes(),
            rounds: stats.rounds.len().saturating_sub(1) as u32,
            converged: !stats.forced,
            throttle: stats.throttle,
            bytes_on_wire: wire_bytes,
            bytes_per_round: stats.rounds.iter().map(|r| r.bytes).collect(),
            zero_pages_skipped: stats.zero_pages_skipped,
            stop_copy_pages: stop_pages,
            ..Summary::default()
        },
        tasks: Tasks::default(),
    })
}

/// Pre-copy rounds until the engine decides to switch over: each round's pages, paced to the
/// order's bandwidth cap, its progress, and `RoundDone` on the control channel.
async fn precopy_rounds(
    link: &mut SourceLink<'_>,
    guest: &mut SyntheticGuest,
    engine: &mut PrecopySource,
    streams: &[StreamTx],
    pool: &mut Pool,
) -> Result<(), AgentError> {
    let mut pacer = Pacer::new(
        link.order.body().limits.bandwidth_bps,
        Duration::from_millis(10),
    );
    let mut total_bytes = 0u64;
    // Pre-copy rounds.
    loop {
        let round_start = Instant::now();
        let writes_before = guest.writes();
        let mut round_bytes = 0u64;
        while let Some((batch, buf)) = next_batch(engine, guest, pool)? {
            let d = pacer.delay(Instant::now(), buf.len() as u64);
            if !d.is_zero() {
                tokio::time::sleep(d).await;
            }
            round_bytes += buf.len() as u64;
            send_record(streams, batch.stream, RecordType::Pages, buf).await?;
            guest.tick(Instant::now());
            // A destination abort (or garbage) during transfer ends it now.
            if let Some(msg) = link.chan.try_recv() {
                link.peer_message(Some(msg))?;
            }
        }
        total_bytes += round_bytes;
        let elapsed = round_start.elapsed().max(Duration::from_millis(1));
        let bandwidth = (round_bytes as f64 / elapsed.as_secs_f64()) as u64;
        guest.tick(Instant::now());
        let dirty_rate = ((guest.writes() - writes_before) as f64 / elapsed.as_secs_f64()) as u64;
        let round = engine.round();
        let decision = engine.end_round(guest, bandwidth.max(1))?;
        let (predicted, switch) = match decision {
            RoundDecision::Continue { predicted_ms }
            | RoundDecision::Throttle { predicted_ms, .. } => (predicted_ms, false),
            RoundDecision::SwitchOver { predicted_ms, .. } => (predicted_ms, true),
        };
        let stats = engine.stats();
        let r = stats
            .rounds
            .get(round as usize)
            .cloned()
            .unwrap_or_default();
        link.report(Progress::Round {
            round,
            pages: r.pages_sent,
            bytes: r.bytes,
            dirty_pages: r.dirtied,
            dirty_rate,
            predicted_downtime_ms: predicted,
            throttle: stats.throttle,
            bandwidth,
            total_bytes,
            guest_pages: guest.page_count(),
        })
        .await;
        let counts = Message::RoundDone {
            round,
            stream_records: vec![],
        };
        link.chan.send(&counts.encode()).await?;
        if switch {
            return Ok(());
        }
    }
}

/// Take the engine's next batch into a fresh buffer.
fn next_batch(
    engine: &mut PrecopySource,
    guest: &SyntheticGuest,
    pool: &mut Pool,
) -> Result<Option<(trustmig_protocol::precopy::Batch, Vec<u8>)>, AgentError> {
    let mut buf = pool.take(engine.max_batch_bytes());
    Ok(engine.next_batch(guest, &mut buf)?.map(|b| (b, buf)))
}

async fn send_record(
    streams: &[StreamTx],
    stream: u16,
    typ: RecordType,
    payload: Vec<u8>,
) -> Result<(), AgentError> {
    let s = streams
        .get(stream as usize)
        .ok_or_else(|| AgentError::Migration(format!("no data stream {stream}")))?;
    if s.tx.send((typ, payload)).await.is_err() {
        return Err(AgentError::transport(
            Link::Data(stream),
            "failed (connection lost)",
        ));
    }
    Ok(())
}

/// Seal and write records for one stream; returns (records sealed, bytes written).
async fn stream_writer(
    mut sock: TcpStream,
    mut sealer: Sealer,
    mut rx: mpsc::Receiver<(RecordType, Vec<u8>)>,
    recycle: mpsc::Sender<Vec<u8>>,
) -> Result<(u64, u64), String> {
    let mut out = Vec::with_capacity(1 << 20);
    let mut bytes = 0u64;
    while let Some((typ, payload)) = rx.recv().await {
        out.clear();
        sealer
            .seal(typ, &payload, &mut out)
            .map_err(|e| e.to_string())?;
        sock.write_all(&out)
            .await
            .map_err(|e| format!("data stream write: {e}"))?;
        bytes += out.len() as u64;
        let _ = recycle.try_send(payload);
    }
    sock.flush().await.map_err(|e| e.to_string())?;
    let _ = sock.shutdown().await;
    Ok((sealer.next_seq(), bytes))
}
