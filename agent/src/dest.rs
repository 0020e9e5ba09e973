//! The destination side: TLS accept, handshake, data streams, final evidence, commit.
//! spec: SPEC.md §5, §7, §8
//!
//! The guest is created zeroed and paused; it is resumed only after the source's final
//! evidence verified, the digest matched what arrived, and `Commit` came. Before that, any
//! failure discards it.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tracing::{info, warn};
use trustmig_protocol::error::PeerMisbehaved;
use trustmig_protocol::handshake::{
    ChannelBinding, DestinationConfig, DestinationHandshake, Established,
};
use trustmig_protocol::keys::Direction;
use trustmig_protocol::messages::{Message, TransferMode};
use trustmig_protocol::migration::{DestEvent, DestMigration};
use trustmig_protocol::order::hex;
use trustmig_protocol::precopy::{GuestMemory, PrecopyDest};
use trustmig_protocol::record::{Opener, RecordType};
use trustmig_protocol::AbortCode;

use crate::daemon::{history_entry, Ctx, DataConn};
use crate::error::AgentError;
use crate::guest::{SyntheticGuest, PAGE_SIZE};
use crate::journal::{ClaimAsDestination, State};
use crate::wire::{read_frame, read_record, write_frame, WireError};

type Tls = TlsStream<TcpStream>;

struct Receiving {
    engine: PrecopyDest,
    guest: SyntheticGuest,
}

fn proto(e: impl Into<trustmig_protocol::Error>) -> AgentError {
    AgentError::Protocol(e.into())
}

/// Serve one incoming TLS control connection.
pub async fn serve(ctx: Arc<Ctx>, tcp: TcpStream) -> Result<(), AgentError> {
    let peers = ctx.peers()?;
    let cfg = crate::tls::server_config(&ctx.identity, peers.keys())
        .map_err(|e| AgentError::Migration(format!("TLS configuration: {e}")))?;
    let tls = tokio::time::timeout(
        ctx.step_timeout(),
        tokio_rustls::TlsAcceptor::from(cfg).accept(tcp),
    )
    .await
    .map_err(|_| AgentError::Migration("TLS handshake timed out".into()))?
    .map_err(|e| AgentError::Migration(format!("TLS handshake refused: {e}")))?;
    let conn = tls.get_ref().1;
    let exporter = crate::tls::exporter(conn)
        .map_err(|e| AgentError::Migration(format!("TLS exporter: {e}")))?;
    let peer = crate::tls::peer_identity(conn).map_err(AgentError::Migration)?;
    info!(peer = %hex(&peer), name = peers.name_of(&peer).unwrap_or("?"), "peer connected");
    let (rd, wr) = tokio::io::split(tls);
    let mut s = Session {
        ctx: ctx.clone(),
        wr,
        order_id: None,
        vm: String::new(),
        sid: None,
    };
    let r = s.run(rd, exporter, peer).await;
    if let Some(sid) = s.sid {
        ctx.sessions.lock().expect("sessions lock").remove(&sid);
    }
    match r {
        Ok(()) => Ok(()),
        Err(e) => {
            let code = match &e {
                AgentError::Protocol(p) => AbortCode::from(p),
                _ => AbortCode::InternalError,
            };
            let msg = Message::Abort {
                code,
                reason: e.to_string().chars().take(200).collect(),
            };
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                write_frame(&mut s.wr, &msg.encode()),
            )
            .await;
            let _ = s.wr.shutdown().await;
            let mut rolled_back = true;
            if let Some(id) = s.order_id {
                rolled_back = ctx
                    .journal
                    .lock()
                    .expect("journal lock")
                    .roll_back_if_claimed(&id, e.to_string())
                    .unwrap_or(false);
                ctx.remember(history_entry(
                    "destination",
                    None,
                    Some(&e.to_string()),
                    &hex(&id),
                    &s.vm,
                ));
            }
            match (s.order_id, rolled_back) {
                // Refused before any order was accepted (handshake, settlement query): nothing
                // was received, so there is nothing to discard.
                (None, _) => warn!("peer session refused: {e}"),
                (Some(_), true) => warn!("incoming migration failed: {e}; destination state discarded, VM never resumed here"),
                (Some(_), false) => warn!("incoming migration failed after COMMIT: {e}; the VM runs here (the source settles by asking)"),
            }
            Err(e)
        }
    }
}

struct Session {
    ctx: Arc<Ctx>,
    wr: WriteHalf<Tls>,
    order_id: Option<[u8; 16]>,
    vm: String,
    sid: Option<[u8; 16]>,
}

impl Session {
    async fn send(&mut self, m: &[u8]) -> Result<(), AgentError> {
        tokio::time::timeout(self.ctx.step_timeout(), write_frame(&mut self.wr, m))
            .await
            .map_err(|_| AgentError::Migration("control channel: send timed out".into()))?
            .map_err(|e| AgentError::Migration(format!("control channel: {e}")))
    }

    async fn recv(&self, rd: &mut ReadHalf<Tls>) -> Result<Vec<u8>, AgentError> {
        tokio::time::timeout(self.ctx.step_timeout(), read_frame(rd))
            .await
            .map_err(|_| AgentError::Migration("source did not answer in time".into()))?
            .map_err(|e| AgentError::Migration(format!("control channel: {e}")))
    }

    async fn run(
        &mut self,
        mut rd: ReadHalf<Tls>,
        exporter: [u8; 32],
        peer: [u8; 32],
    ) -> Result<(), AgentError> {
        let ctx = self.ctx.clone();
        let channel = ChannelBinding {
            tls_exporter: exporter,
            local: ctx.identity.id(),
            peer,
        };
        let mut hs = DestinationHandshake::new(
            DestinationConfig {
                operators: ctx.operators()?,
                now: crate::unix_now(),
            },
            channel,
            crate::random(),
        );
        let first = self.recv(&mut rd).await?;
        if let Ok(Message::SettleQuery { order_id }) = Message::decode(&first) {
            return self.answer_settlement(order_id, &peer).await;
        }
        let mut pending = Some(first);
        while !hs.is_done() {
            let msg = match pending.take() {
                Some(m) => m,
                None => self.recv(&mut rd).await?,
            };
            let out = {
                let mut att = ctx.attester.lock().expect("attester lock");
                let mut journal = ctx.journal.lock().expect("journal lock");
                let mut claim = ClaimAsDestination(&mut journal);
                hs.handle(&msg, att.as_mut(), ctx.verifier.as_ref(), &mut claim)
            };
            if let Some(o) = hs.order() {
                self.order_id = Some(*o.id());
                self.vm = o.body().vm.clone();
            }
            for m in out.map_err(proto)? {
                self.send(&m).await?;
            }
        }
        let est = hs.into_established().map_err(proto)?;
        info!(order = %hex(est.order.id()), vm = %self.vm, "source attested; receiving");
        self.receive(est, rd).await
    }

    /// A source lost its session after journalling COMMIT and asks what became of the order
    /// (SPEC.md §8.8 rule 3). The journal answers; "not committed" is journalled first, so no
    /// late `Commit` can make this agent commit afterwards.
    async fn answer_settlement(
        &mut self,
        order_id: [u8; 16],
        peer: &[u8; 32],
    ) -> Result<(), AgentError> {
        let committed = self
            .ctx
            .journal
            .lock()
            .expect("journal lock")
            .settle_query(&order_id, peer)?;
        info!(order = %hex(&order_id), peer = %hex(peer), committed, "settlement query answered");
        let m = Message::SettleAnswer {
            order_id,
            committed,
        };
        self.send(&m.encode()).await?;
        let _ = self.wr.shutdown().await;
        Ok(())
    }

    async fn receive(&mut self, est: Established, mut rd: ReadHalf<Tls>) -> Result<(), AgentError> {
        let ctx = self.ctx.clone();
        // A VM this agent is sending away, or sent and has not settled, may run elsewhere; a
        // copy arriving now could make two (SPEC.md §8.8 rule 4), or be overwritten when the
        // outgoing one comes back.
        let parked = ctx
            .parked
            .lock()
            .expect("parked lock")
            .contains_key(&self.vm);
        if parked || ctx.journal.lock().expect("journal lock").leaving(&self.vm) {
            return Err(AgentError::Migration(format!(
                "VM {:?} is leaving this host, or left under an order still in doubt: refusing another copy until that is settled",
                self.vm
            )));
        }
        let TransferMode::Precopy {
            page_size,
            page_count,
        } = est.mode
        else {
            return crate::sidecar::receive(
                ctx,
                est,
                &mut rd,
                &mut self.wr,
                &self.vm,
                &mut self.sid,
            )
            .await;
        };
        if page_size as usize != PAGE_SIZE {
            return Err(AgentError::Migration(format!(
                "page size {page_size} unsupported (synthetic guests use {PAGE_SIZE})"
            )));
        }
        if ctx.vms.lock().expect("vms lock").contains_key(&self.vm) {
            return Err(AgentError::Migration(format!(
                "a VM named {:?} already runs here",
                self.vm
            )));
        }
        let Established {
            keys,
            channel,
            order,
            transcript_hash,
            streams,
            ..
        } = est;
        // The peer is attested but its numbers are still input: refuse a guest this host cannot
        // hold rather than abort on allocation.
        let want = page_count.saturating_mul(PAGE_SIZE as u64);
        if let Some(avail) = crate::guest::mem_available() {
            if want > avail {
                return Err(AgentError::Migration(format!(
                    "guest of {} MiB does not fit: {} MiB of memory available here",
                    want >> 20,
                    avail >> 20
                )));
            }
        }
        let guest = SyntheticGuest::zeroed(&self.vm, page_count);
        let engine = PrecopyDest::new(&guest, page_size, page_count, streams).map_err(proto)?;
        let state = Arc::new(Mutex::new(Receiving { engine, guest }));
        let mut dm = DestMigration::new(channel, *order.id());

        // Data streams find this session by its id.
        let sid = keys.session_id();
        let (conn_tx, conn_rx) = mpsc::channel::<DataConn>(16);
        ctx.sessions
            .lock()
            .expect("sessions lock")
            .insert(sid, conn_tx);
        self.sid = Some(sid);
        let (done_tx, mut done_rx) = mpsc::channel::<(u16, Result<u64, AgentError>)>(16);
        tokio::spawn(bind_streams(
            ctx.clone(),
            Arc::new(keys),
            sid,
            streams,
            state.clone(),
            conn_rx,
            done_tx,
        ));

        let mut finished: Vec<Option<u64>> = vec![None; streams as usize];
        let mut awaiting: Option<Vec<u64>> = None;
        let mut ctrl = crate::wire::spawn_frame_reader(rd);
        // A source that goes silent (no control message, no page) for a whole step timeout has
        // failed: the destination discards rather than wait for ever.
        let mut last_pages = u64::MAX;
        loop {
            tokio::select! {
                () = tokio::time::sleep(ctx.step_timeout()) => {
                    let pages = state.lock().expect("state lock").engine.pages_written();
                    if pages == last_pages {
                        return Err(AgentError::Migration(format!(
                            "source silent for {} s (no message, no page); giving up",
                            ctx.step_timeout().as_secs()
                        )));
                    }
                    last_pages = pages;
                }
                msg = ctrl.recv() => {
                    let msg = msg
                        .ok_or_else(|| AgentError::Migration("control channel closed".into()))?
                        .map_err(|e: WireError| AgentError::Migration(format!("control channel: {e}")))?;
                    match dm.handle(&msg, ctx.verifier.as_ref()).map_err(proto)? {
                        DestEvent::None => {}
                        DestEvent::AwaitStreams(counts) => awaiting = Some(counts),
                        DestEvent::Send(m) => self.send(&m).await?,
                        DestEvent::Resume => return self.resume(&mut dm, &state).await,
                    }
                }
                Some((i, r)) = done_rx.recv() => {
                    let n = r?;
                    if let Some(slot) = finished.get_mut(i as usize) {
                        *slot = Some(n);
                    }
                }
            }
            if let Some(counts) = &awaiting {
                if finished.iter().all(Option::is_some) {
                    let received: Vec<u64> = finished.iter().map(|n| n.unwrap_or(0)).collect();
                    if received.len() != counts.len() {
                        return Err(proto(PeerMisbehaved::BadField(format!(
                            "source announced {} streams, session has {}",
                            counts.len(),
                            received.len()
                        ))));
                    }
                    let computed = state
                        .lock()
                        .expect("state lock")
                        .engine
                        .final_digest(&transcript_hash)
                        .map_err(proto)?;
                    let m = dm
                        .streams_complete(&received, computed, crate::random())
                        .map_err(proto)?;
                    self.send(&m).await?;
                    awaiting = None;
                }
            }
        }
    }

    /// `Commit` arrived: journal it, run the VM here, confirm.
    async fn resume(
        &mut self,
        dm: &mut DestMigration,
        state: &Mutex<Receiving>,
    ) -> Result<(), AgentError> {
        let ctx = self.ctx.clone();
        let id = self.order_id.expect("order known after handshake");
        ctx.journal.lock().expect("journal lock").commit(&id)?;
        let mut guest = {
            let mut st = state.lock().expect("state lock");
            std::mem::replace(&mut st.guest, SyntheticGuest::zeroed(&self.vm, 1))
        };
        guest.resume();
        ctx.vms
            .lock()
            .expect("vms lock")
            .insert(self.vm.clone(), guest);
        #[cfg(debug_assertions)]
        if std::env::var_os(crate::channel::TEST_LOSE_RESUMED_ENV).is_some() {
            return Err(AgentError::Migration(
                "test hook: failed after COMMIT, before Resumed was sent".into(),
            ));
        }
        let m = dm.resumed().map_err(proto)?;
        self.send(&m).await?;
        ctx.journal
            .lock()
            .expect("journal lock")
            .set(&id, State::Done, "resumed here")?;
        info!(order = %hex(&id), vm = %self.vm, "VM resumed on this host");
        ctx.remember(history_entry(
            "destination",
            None,
            None,
            &hex(&id),
            &self.vm,
        ));
        Ok(())
    }
}

/// Accept data connections for this session: bind each stream index once, after its
/// `StreamInit` record authenticates; then read it to its end. spec: SPEC.md §7.1
async fn bind_streams(
    ctx: Arc<Ctx>,
    keys: Arc<trustmig_protocol::keys::KeySchedule>,
    sid: [u8; 16],
    streams: u16,
    state: Arc<Mutex<Receiving>>,
    mut conns: mpsc::Receiver<DataConn>,
    done: mpsc::Sender<(u16, Result<u64, AgentError>)>,
) {
    // Each candidate is checked in a task of its own: a connection that stalls before its
    // StreamInit must not hold up the genuine one behind it. The first that authenticates
    // binds its stream index; later ones are surplus.
    let bound = Arc::new(Mutex::new(vec![false; streams as usize]));
    while let Some((i, mut sock)) = conns.recv().await {
        if i >= streams || bound.lock().expect("bound lock")[i as usize] {
            warn!(stream = i, "surplus data connection dropped");
            continue;
        }
        let (ctx, keys, state, done, bound) = (
            ctx.clone(),
            keys.clone(),
            state.clone(),
            done.clone(),
            bound.clone(),
        );
        tokio::spawn(async move {
            sock.set_nodelay(true).ok();
            let mut opener = Opener::new(keys.stream_secret(Direction::SourceToDestination, i), i);
            let mut buf = Vec::new();
            let init =
                tokio::time::timeout(ctx.step_timeout(), read_record(&mut sock, &mut buf)).await;
            let ok = match init {
                Ok(Ok(true)) => match opener.open(&mut buf) {
                    Ok((RecordType::StreamInit, p)) => p == [&sid[..], &i.to_be_bytes()].concat(),
                    _ => false,
                },
                _ => false,
            };
            if !ok {
                // Unauthenticated: drop the connection, keep the session (SPEC.md §7.1).
                warn!(stream = i, "data connection failed StreamInit; dropped");
                return;
            }
            {
                let mut b = bound.lock().expect("bound lock");
                if b[i as usize] {
                    warn!(stream = i, "surplus data connection dropped");
                    return;
                }
                b[i as usize] = true;
            }
            let r = read_stream(sock, opener, i, &state).await;
            let _ = done.send((i, r)).await;
        });
    }
}

/// Read one bound stream to `StreamEnd`; returns the number of records it carried.
async fn read_stream(
    mut sock: TcpStream,
    mut opener: Opener,
    i: u16,
    state: &Mutex<Receiving>,
) -> Result<u64, AgentError> {
    let mut buf = Vec::with_capacity(1 << 20);
    let cut = || AgentError::Migration(format!("data stream {i} cut before its end"));
    loop {
        // Typed errors, so the Abort the source gets says record-failure or migration-failed.
        match read_record(&mut sock, &mut buf).await {
            Ok(true) => {}
            Ok(false) | Err(WireError::Closed) | Err(WireError::Io(_)) => return Err(cut()),
            Err(WireError::Record(e)) => return Err(proto(e)),
            Err(e) => return Err(AgentError::Migration(format!("data stream {i}: {e}"))),
        }
        let (typ, payload) = opener.open(&mut buf).map_err(proto)?;
        match typ {
            RecordType::Pages => {
                let mut st = state.lock().expect("state lock");
                let Receiving { engine, guest } = &mut *st;
                engine.on_pages(guest, i, payload).map_err(proto)?;
            }
            RecordType::DeviceState => {
                state
                    .lock()
                    .expect("state lock")
                    .engine
                    .on_device_state(payload)
                    .map_err(proto)?;
            }
            RecordType::KeyUpdate => {}
            RecordType::StreamEnd => return Ok(opener.records()),
            t => {
                return Err(proto(PeerMisbehaved::BadField(format!(
                    "{t:?} record on pre-copy data stream {i}"
                ))))
            }
        }
    }
}
