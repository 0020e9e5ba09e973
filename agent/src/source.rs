//! The source side of a migration: order, TLS, handshake, data streams, pre-copy, commit.
//! spec: SPEC.md §5, §7, §8
//!
//! Until COMMIT is journalled, every failure rolls back: the guest is resumed at full speed
//! and stays here. After it, the source never resumes the guest on its own.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::info;
use trustmig_protocol::handshake::Established;
use trustmig_protocol::keys::Direction;
use trustmig_protocol::messages::{Message, TransferMode};
use trustmig_protocol::migration::{Outcome, SourceMigration};
use trustmig_protocol::order::{hex, OrderPolicy, Role, SignedOrder, VerifiedOrder};
use trustmig_protocol::precopy::{GuestMemory, PrecopySource, RoundDecision};
use trustmig_protocol::rate::Pacer;
use trustmig_protocol::record::{RecordType, Sealer};
use trustmig_protocol::Error as ProtoError;

use crate::channel::{abort_code, note_source_result, vm_manifest, SourceChannel};
use crate::control::{Progress, Summary};
use crate::daemon::Ctx;
use crate::error::AgentError;
use crate::guest::{SyntheticGuest, PAGE_SIZE};
use crate::journal::State;
use crate::settle::{self, InDoubt, Settlement};
use crate::wire::preamble;

/// Run the migration in `order_hex` as its source, reporting progress.
pub async fn migrate(
    ctx: Arc<Ctx>,
    order_hex: String,
    progress: mpsc::Sender<Progress>,
) -> Result<Summary, AgentError> {
    let r = migrate_checked(&ctx, &order_hex, &progress).await;
    if let Err((e, vm_state)) = &r {
        let _ = progress
            .send(Progress::Failed {
                error: e.to_string(),
                vm: vm_state.clone(),
            })
            .await;
    }
    r.map_err(|(e, _)| e)
}

async fn migrate_checked(
    ctx: &Arc<Ctx>,
    order_hex: &str,
    progress: &mpsc::Sender<Progress>,
) -> Result<Summary, (AgentError, String)> {
    let not_started = |e: AgentError| (e, "untouched: the migration never started".to_string());
    let bytes = hex::decode(order_hex.trim())
        .map_err(|e| not_started(AgentError::Usage(format!("order is not hex: {e}"))))?;
    let signed = SignedOrder::from_cbor(&bytes).map_err(|e| not_started(e.into()))?;
    let operators = ctx.operators().map_err(not_started)?;
    let order = signed
        .verify(&OrderPolicy {
            operators: &operators,
            me: ctx.identity.id(),
            role: Role::Source,
            now: crate::unix_now(),
        })
        .map_err(|e| not_started(e.into()))?;
    let body = order.body().clone();
    if crate::sidecar::qemu_vm(&ctx.config, &body.vm).is_some() {
        return crate::sidecar::migrate_source(ctx, order, progress).await;
    }
    // Single use first: a replayed order is refused as such, whatever became of its VM.
    ctx.journal
        .lock()
        .expect("journal lock")
        .claim_as_source(&body, order.id(), false)
        .map_err(|e| not_started(e.into()))?;
    let Some(mut guest) = ctx.vms.lock().expect("vms lock").remove(&body.vm) else {
        let e = AgentError::Migration(format!("no VM named {:?} runs on this agent", body.vm));
        let _ = ctx.journal.lock().expect("journal lock").set(
            order.id(),
            State::RolledBack,
            e.to_string(),
        );
        return Err(not_started(e));
    };
    info!(order = %hex(order.id()), vm = %body.vm, to = %body.destination_addr, "migration starts");
    let mut run = Run {
        ctx: ctx.clone(),
        progress: progress.clone(),
        outcome: Outcome::RollBack,
        started: Instant::now(),
    };
    let result = run.go(&order, &mut guest).await;
    let id = *order.id();
    match result {
        Ok(summary) => {
            note_source_result(ctx, &id, &body.vm, Ok(&summary), false);
            Ok(summary)
        }
        Err(e) => {
            // After COMMIT only the destination's answer may give the VM back (SPEC.md §8.8).
            let in_doubt = InDoubt::of(&order, false);
            let settlement = settle::after_failure(ctx, &in_doubt, run.outcome).await;
            let rolled_back = matches!(settlement, None | Some(Settlement::NotMoved));
            let vm_state = if rolled_back {
                guest.set_throttle(0);
                guest.resume();
                ctx.vms
                    .lock()
                    .expect("vms lock")
                    .insert(body.vm.clone(), guest);
                let how = "the VM keeps running on the source, its memory untouched";
                match settlement {
                    Some(s) => format!("{}; {how}", s.vm_state()),
                    None => format!("rolled back: {how}"),
                }
            } else {
                if let Some(Settlement::InDoubt(_)) = settlement {
                    // Stopped as it is until the destination answers (settle.rs).
                    ctx.parked
                        .lock()
                        .expect("parked lock")
                        .insert(body.vm.clone(), guest);
                    settle::keep_asking(ctx.clone(), in_doubt, true);
                }
                settlement.map(|s| s.vm_state()).unwrap_or_default()
            };
            note_source_result(ctx, &id, &body.vm, Err((&e, &vm_state)), rolled_back);
            Err((e, vm_state))
        }
    }
}

struct Run {
    ctx: Arc<Ctx>,
    progress: mpsc::Sender<Progress>,
    outcome: Outcome,
    started: Instant,
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

fn proto(e: impl Into<ProtoError>) -> AgentError {
    AgentError::Protocol(e.into())
}

impl Run {
    async fn report(&self, p: Progress) {
        let _ = self.progress.send(p).await;
    }

    async fn go(
        &mut self,
        order: &VerifiedOrder,
        guest: &mut SyntheticGuest,
    ) -> Result<Summary, AgentError> {
        self.started = Instant::now();
        let mut chan = SourceChannel::connect(&self.ctx, order).await?;
        self.report(Progress::Connected {
            peer: hex(&order.body().destination),
        })
        .await;
        let r = self.run_on(&mut chan, order, guest).await;
        if let Err(e) = &r {
            chan.abort(abort_code(e), &e.to_string()).await;
        }
        r
    }

    async fn run_on(
        &mut self,
        chan: &mut SourceChannel,
        order: &VerifiedOrder,
        guest: &mut SyntheticGuest,
    ) -> Result<Summary, AgentError> {
        let body = order.body();
        // Synthetic guests have no disks: shared-storage mode.
        let manifest = vm_manifest(&self.ctx, &body.vm, 1 << 20, vec![]);
        let mode = TransferMode::Precopy {
            page_size: PAGE_SIZE as u32,
            page_count: guest.page_count(),
        };
        let est = chan
            .handshake(order, mode, self.ctx.config.transfer.streams, &manifest)
            .await?;
        self.report(Progress::Attested {
            streams: est.streams,
        })
        .await;
        let mut pool = Pool::new(4 * usize::from(est.streams) + 4);
        let streams = self
            .open_streams(&est, &body.destination_addr, &pool)
            .await?;
        match self
            .transfer(order, &est, guest, streams, &mut pool, chan)
            .await
        {
            // A transport failure on our side (a data stream or the control channel broke)
            // usually follows the destination refusing something; its Abort, queued or about
            // to arrive, names what (tampered, replayed, ...). Prefer it.
            Err(AgentError::Migration(local))
                if local.starts_with("data stream") || local.starts_with("control channel") =>
            {
                match chan.peer_abort().await {
                    Some((code, reason)) => Err(proto(ProtoError::PeerAborted { code, reason })),
                    None => Err(AgentError::Migration(local)),
                }
            }
            r => r,
        }
    }

    async fn open_streams(
        &self,
        est: &Established,
        addr: &str,
        pool: &Pool,
    ) -> Result<Vec<StreamTx>, AgentError> {
        let sid = est.keys.session_id();
        let mut out = Vec::new();
        for i in 0..est.streams {
            let mut sock = TcpStream::connect(addr)
                .await
                .map_err(|e| AgentError::Connect {
                    addr: addr.to_string(),
                    reason: format!("data stream {i}: {e}"),
                })?;
            sock.set_nodelay(true).ok();
            let mut sealer =
                Sealer::new(est.keys.stream_secret(Direction::SourceToDestination, i), i);
            let mut first = preamble(&sid, i).to_vec();
            let init = [&sid[..], &i.to_be_bytes()].concat();
            sealer
                .seal(RecordType::StreamInit, &init, &mut first)
                .map_err(proto)?;
            sock.write_all(&first)
                .await
                .map_err(|e| AgentError::Migration(format!("data stream {i}: {e}")))?;
            let (tx, rx) = mpsc::channel(2);
            out.push(StreamTx {
                tx,
                task: tokio::spawn(stream_writer(sock, sealer, rx, pool.tx.clone())),
            });
        }
        Ok(out)
    }

    #[allow(clippy::too_many_lines)]
    async fn transfer(
        &mut self,
        order: &VerifiedOrder,
        est: &Established,
        guest: &mut SyntheticGuest,
        streams: Vec<StreamTx>,
        pool: &mut Pool,
        chan: &mut SourceChannel,
    ) -> Result<Summary, AgentError> {
        let started = self.started;
        let body = order.body();
        let mut engine =
            PrecopySource::new(guest, body.limits.clone(), est.streams).map_err(proto)?;
        let mut pacer = Pacer::new(body.limits.bandwidth_bps, Duration::from_millis(10));
        let mut sm = SourceMigration::new(est.channel.clone(), *order.id());
        let mut total_bytes = 0u64;
        engine.begin(guest).map_err(proto)?;
        guest.tick(Instant::now());

        // Pre-copy rounds.
        loop {
            let round_start = Instant::now();
            let writes_before = guest.writes();
            let mut round_bytes = 0u64;
            while let Some((batch, buf)) = next_batch(&mut engine, guest, pool)? {
                let d = pacer.delay(Instant::now(), buf.len() as u64);
                if !d.is_zero() {
                    tokio::time::sleep(d).await;
                }
                round_bytes += buf.len() as u64;
                send_record(&streams, batch.stream, RecordType::Pages, buf).await?;
                guest.tick(Instant::now());
                // A destination abort (or garbage) during transfer ends it now.
                if let Some(msg) = chan.try_recv() {
                    let msg = msg?;
                    let mut att = self.ctx.attester.lock().expect("attester lock");
                    sm.handle(&msg, att.as_mut()).map_err(proto)?;
                }
            }
            total_bytes += round_bytes;
            let elapsed = round_start.elapsed().max(Duration::from_millis(1));
            let bandwidth = (round_bytes as f64 / elapsed.as_secs_f64()) as u64;
            guest.tick(Instant::now());
            let dirty_rate =
                ((guest.writes() - writes_before) as f64 / elapsed.as_secs_f64()) as u64;
            let round = engine.round();
            let decision = engine.end_round(guest, bandwidth.max(1)).map_err(proto)?;
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
            self.report(Progress::Round {
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
            chan.send(&counts.encode()).await?;
            if switch {
                break;
            }
        }

        // Stop-and-copy: from here the guest is paused until rollback or forever.
        engine.stop_and_copy(guest).map_err(proto)?;
        let paused_at = Instant::now();
        let stop_pages = engine.pending_pages();
        self.report(Progress::SwitchOver { pages: stop_pages })
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
        for s in streams {
            s.tx.send((RecordType::StreamEnd, Vec::new()))
                .await
                .map_err(|_| AgentError::Migration("data stream closed".into()))?;
            drop(s.tx);
            let (records, bytes) = s
                .task
                .await
                .map_err(|e| AgentError::Migration(format!("data stream task: {e}")))?
                .map_err(AgentError::Migration)?;
            counts.push(records);
            wire_bytes += bytes;
        }
        let digest = engine
            .finish(&device_state, &est.transcript_hash)
            .map_err(proto)?;
        let so = sm.switch_over(counts, digest).map_err(proto)?;
        // Final evidence, Ready, Commit (journalled first), Resumed.
        chan.commit_exchange(&mut sm, &so, order.id(), &self.progress, &mut self.outcome)
            .await?;
        let downtime = paused_at.elapsed();
        let total = started.elapsed();
        let stats = engine.stats().clone();
        let summary = Summary {
            order_id: hex(order.id()),
            vm: body.vm.clone(),
            guest_bytes: guest.bytes(),
            total_ms: total.as_millis() as u64,
            downtime_ms: downtime.as_millis() as u64,
            downtime_target_ms: u64::from(body.limits.downtime_ms),
            rounds: stats.rounds.len().saturating_sub(1) as u32,
            converged: !stats.forced,
            throttle: stats.throttle,
            bytes_on_wire: wire_bytes,
            bytes_per_round: stats.rounds.iter().map(|r| r.bytes).collect(),
            zero_pages_skipped: stats.zero_pages_skipped,
            stop_copy_pages: stop_pages,
            throughput_bps: (wire_bytes as f64 / total.as_secs_f64().max(1e-3)) as u64,
            memory_checksum: hex::encode(guest.checksum()),
        };
        self.ctx.journal.lock().expect("journal lock").set(
            order.id(),
            State::Done,
            format!("downtime {} ms", summary.downtime_ms),
        )?;
        info!(order = %summary.order_id, downtime_ms = summary.downtime_ms, total_ms = summary.total_ms, "migration done");
        Ok(summary)
    }
}

/// Take the engine's next batch into a fresh buffer.
fn next_batch(
    engine: &mut PrecopySource,
    guest: &SyntheticGuest,
    pool: &mut Pool,
) -> Result<Option<(trustmig_protocol::precopy::Batch, Vec<u8>)>, AgentError> {
    let mut buf = pool.take(engine.max_batch_bytes());
    Ok(engine
        .next_batch(guest, &mut buf)
        .map_err(proto)?
        .map(|b| (b, buf)))
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
        return Err(AgentError::Migration(format!(
            "data stream {stream} failed (connection lost)"
        )));
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
