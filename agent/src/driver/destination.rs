//! The destination driver: TLS accept, handshake and claim (or a settlement query), the
//! backend's receive, final evidence, commit, resume. spec: SPEC.md §5, §7, §8
//!
//! The VM is resumed only after the source's final evidence verified, the digest matched what
//! arrived, and `Commit` came and was journalled. Before that, any failure discards what
//! arrived, and the backend's hypervisor never runs it.

use std::sync::Arc;

use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tracing::{error, info, warn};
use trustmig_protocol::attestation::{AttestationError, Attester};
use trustmig_protocol::error::{AbortCode, PeerMisbehaved};
use trustmig_protocol::handshake::{
    ChannelBinding, DestinationConfig, DestinationHandshake, Established,
};
use trustmig_protocol::messages::{Message, TransferMode};
use trustmig_protocol::migration::{DestEvent, DestMigration};
use trustmig_protocol::order::{hex, OrderId};
use trustmig_protocol::{AgentId, Digest};

use crate::attestation::{Prequoted, SharedTpm};
use crate::backend::qemu::QemuDest;
use crate::backend::synthetic::SyntheticDest;
use crate::backend::{Arrived, DestVm};
use crate::ctx::{history_entry, Ctx, DataConn};
use crate::driver::commit::{expect, Commit};
use crate::error::{AgentError, Link};
use crate::fault::{crash_point, CrashPoint};
use crate::journal::{ClaimAsDestination, State};
use crate::net::wire::{spawn_frame_reader, write_frame, WireError};
use trustmig_protocol::commit::{Input, Output, Signal};
use trustmig_protocol::settlement::VmAction;

type Tls = TlsStream<TcpStream>;
type Frames = mpsc::Receiver<Result<Vec<u8>, WireError>>;

/// Serve one incoming TLS control connection; `authenticated` runs once the TLS handshake
/// proved the peer a trusted agent (the listener then stops counting the connection against
/// unauthenticated ones).
pub async fn serve<G>(
    ctx: Arc<Ctx>,
    tcp: TcpStream,
    authenticated: impl FnOnce() -> G,
) -> Result<(), AgentError> {
    let (tls, exporter, peer) = accept(&ctx, tcp).await?;
    // Held for the session (the listener's admission of its address's streams).
    let _authenticated = authenticated();
    let (rd, wr) = tokio::io::split(tls);
    let mut s = Session {
        ctx: ctx.clone(),
        wr,
        order_id: None,
        vm: String::new(),
        sid: None,
        backend: "",
        not_started: false,
    };
    let r = s.run(rd, exporter, peer).await;
    if let Some(sid) = s.sid {
        ctx.sessions.lock().expect("sessions lock").remove(&sid);
    }
    if !s.backend.is_empty() {
        ctx.metrics.receiving.dec();
    }
    let Err(e) = r else {
        if !s.backend.is_empty() {
            ctx.metrics.ended("destination", s.backend, "done", None);
        }
        // Done: close our side, so the source, waiting after its late quote for an incident
        // (SPEC.md §8.7), hears at once that there is none.
        let _ = s.wr.shutdown().await;
        return Ok(());
    };
    s.failed(&e, &peer).await;
    Err(e)
}

/// How long a peer may take over the TLS handshake (a few round trips, no TPM): an
/// unauthenticated connection holds one of the listener's places meanwhile.
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The TLS handshake with a trusted peer (within `TLS_HANDSHAKE_TIMEOUT`, or the step timeout
/// if shorter): the stream, its exporter and the peer's identity key.
async fn accept(
    ctx: &Ctx,
    tcp: TcpStream,
) -> Result<(Tls, zeroize::Zeroizing<[u8; 32]>, AgentId), AgentError> {
    let peers = ctx.peers()?;
    let cfg = crate::net::tls::server_config(&ctx.identity, peers.keys())
        .map_err(|e| AgentError::Tls(format!("TLS configuration: {e}")))?;
    let tls = tokio::time::timeout(
        ctx.step_timeout().min(TLS_HANDSHAKE_TIMEOUT),
        tokio_rustls::TlsAcceptor::from(cfg).accept(tcp),
    )
    .await
    .map_err(|_| AgentError::Tls("TLS handshake timed out".into()))?
    .map_err(|e| AgentError::Tls(format!("TLS handshake refused: {e}")))?;
    let conn = tls.get_ref().1;
    let exporter = crate::net::tls::exporter(conn)
        .map_err(|e| AgentError::Tls(format!("TLS exporter: {e}")))?;
    let peer = crate::net::tls::peer_identity(conn).map_err(AgentError::Tls)?;
    info!(peer = %hex(&peer), name = peers.name_of(&peer).unwrap_or("?"), "peer connected");
    Ok((tls, exporter, peer))
}

struct Session {
    ctx: Arc<Ctx>,
    wr: WriteHalf<Tls>,
    order_id: Option<[u8; 16]>,
    vm: String,
    sid: Option<[u8; 16]>,
    /// The backend, once the handshake named the transfer mode (metrics).
    backend: &'static str,
    /// Committed here, and QEMU would not run the VM: left to the operator (its `Abort` says so).
    not_started: bool,
}

/// The order's source, as its claim recorded it.
fn peer_of(ctx: &Ctx, order: Option<OrderId>) -> [u8; 32] {
    let journal = ctx.journal.lock().expect("journal lock");
    order
        .and_then(|id| journal.entry(&id))
        .and_then(|e| e.peer)
        .unwrap_or([0; 32])
}

/// The destination's handshake quote, taken on a blocking thread as soon as its qualifying
/// data is known (SPEC.md §5.2, D11), while the source takes its own.
struct EarlyQuote {
    qualifying_data: Digest,
    task: tokio::task::JoinHandle<Result<Vec<u8>, AttestationError>>,
}

impl EarlyQuote {
    fn start(ctx: &Arc<Ctx>, qualifying_data: Digest) -> Self {
        let tpm = ctx.attester.clone();
        let task = tokio::task::spawn_blocking(move || {
            tpm.lock().expect("attester lock").quote(&qualifying_data)
        });
        Self {
            qualifying_data,
            task,
        }
    }

    /// Wait for it, `within` at most (a TPM that hangs fails the handshake, named): what it
    /// covers, and the quote (or why there is none).
    async fn ready(
        self,
        within: std::time::Duration,
    ) -> (Digest, Result<Vec<u8>, AttestationError>) {
        let quote = match tokio::time::timeout(within, self.task).await {
            Ok(Ok(quote)) => quote,
            Ok(Err(e)) => Err(AttestationError::new(format!("early quote: {e}"))),
            Err(_) => Err(AttestationError::new(format!(
                "the TPM did not quote within {} s",
                within.as_secs()
            ))),
        };
        (self.qualifying_data, quote)
    }
}

fn wire(e: WireError) -> AgentError {
    AgentError::transport(Link::Control, e)
}

impl Session {
    /// The session failed with `e`: the source hears why (after the backend discarded what
    /// arrived: it may run its VM again only once this host's copy is gone, SPEC.md §8.8); the
    /// order's claim is rolled back if nothing else did; metrics, history, audit and the log
    /// say what became of the VM here.
    async fn failed(&mut self, e: &AgentError, peer: &AgentId) {
        let ctx = self.ctx.clone();
        // A VM committed here that QEMU will not run (its `cont` refused for good): the
        // source's operator hears that, not only QEMU's refusal.
        let left = (self.not_started).then(|| ctx.left_now(&self.vm)).flatten();
        let msg = Message::Abort {
            code: e.abort_code(),
            reason: match &left {
                Some(_) => format!(
                    "committed, but the VM does not start here; left to this host's operator: {}",
                    e.cause()
                ),
                None => e.to_string(),
            }
            .chars()
            .take(200)
            .collect(),
        };
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            write_frame(&mut self.wr, &msg.encode()),
        )
        .await;
        let _ = self.wr.shutdown().await;
        let mut rolled_back = true;
        if let Some(id) = self.order_id {
            // Rolled back by its machine; a session that failed before the machine started
            // (its claim just made) rolls its claim back here.
            let mut journal = ctx.journal.lock().expect("journal lock");
            let _ = journal.roll_back_if_claimed(&id, e.to_string());
            rolled_back = journal.entry(&id).map(|e| e.state) == Some(State::RolledBack);
            drop(journal);
            ctx.remember(history_entry(
                "destination",
                None,
                Some(&e.to_string()),
                &hex(&id),
                &self.vm,
            ));
        }
        match (self.backend.is_empty(), rolled_back) {
            (true, _) => ctx.metrics.refused(e),
            (false, true) => ctx
                .metrics
                .ended("destination", self.backend, "discarded", Some(e)),
            (false, false) => ctx
                .metrics
                .ended("destination", self.backend, "kept", Some(e)),
        }
        match (self.order_id, rolled_back) {
            // Refused before any order was accepted (handshake, settlement query): nothing
            // was received, so there is nothing to discard.
            (None, _) => {
                warn!(peer = %hex(peer), "peer session refused: {e}");
                // A trusted peer may be compromised: it must not grow the trail at will.
                let now = std::time::Instant::now();
                let Some(missed) = ctx.refusals_audited.allow_counting(peer, now) else {
                    return;
                };
                // The count first: the trail keeps 500 characters of a reason.
                let reason = match missed {
                    0 => e.to_string(),
                    n => format!("{n} earlier refused sessions of this peer not audited (past its budget); this one: {e}"),
                };
                let audited = ctx
                    .journal
                    .lock()
                    .expect("journal lock")
                    .audit_refused(crate::audit::Event {
                        role: "destination".into(),
                        peer: hex(peer),
                        reason,
                        ..Default::default()
                    });
                if !audited {
                    // The next entry that is written says these too.
                    ctx.refusals_audited.not_audited(peer, missed + 1);
                }
            }
            (Some(_), true) => warn!("incoming migration failed: {e}; destination state discarded, VM never resumed here"),
            (Some(_), false) if ctx.journal.lock().expect("journal lock").is_broken() => warn!("incoming migration failed, its journal broken: {e}; what arrived is kept until a restart settles the order by the journal's file"),
            (Some(_), false) => match left {
                Some(how) => error!("incoming migration failed after COMMIT: {e}; the VM is this host's, left to the operator: {how}"),
                None => warn!("incoming migration failed after COMMIT: {e}; the VM runs here (the source settles by asking)"),
            },
        }
    }

    async fn send(&mut self, m: &[u8]) -> Result<(), AgentError> {
        tokio::time::timeout(self.ctx.step_timeout(), write_frame(&mut self.wr, m))
            .await
            .map_err(|_| AgentError::transport(Link::Control, "send timed out"))?
            .map_err(wire)
    }

    async fn recv(&self, frames: &mut Frames) -> Result<Vec<u8>, AgentError> {
        tokio::time::timeout(self.ctx.step_timeout(), frames.recv())
            .await
            .map_err(|_| AgentError::Timeout("source did not answer in time".into()))?
            .ok_or_else(|| AgentError::transport(Link::Control, "closed"))?
            .map_err(wire)
    }

    async fn run(
        &mut self,
        rd: ReadHalf<Tls>,
        exporter: zeroize::Zeroizing<[u8; 32]>,
        peer: [u8; 32],
    ) -> Result<(), AgentError> {
        let ctx = self.ctx.clone();
        let channel = ChannelBinding {
            tls_exporter: *exporter,
            local: ctx.identity.id(),
            peer,
        };
        let (now, overruled) =
            (ctx.journal.lock().expect("journal lock")).order_time(crate::unix_now());
        if let Some(why) = &overruled {
            warn!(peer = %hex(&peer), "{why}");
        }
        let mut hs = DestinationHandshake::new(
            DestinationConfig {
                operators: ctx.operators()?,
                now,
            },
            channel,
            crate::random(),
        );
        // The one reader of this control channel, for the whole session.
        let mut frames = spawn_frame_reader(rd);
        let first = self.recv(&mut frames).await?;
        if let Ok(Message::SettleQuery { order_id }) = Message::decode(&first) {
            return self.answer_settlement(order_id, &peer).await;
        }
        let mut pending = Some(first);
        // This agent's handshake quote, taken once the hello is accepted, beside the source's.
        let mut early: Option<EarlyQuote> = None;
        while !hs.is_done() {
            let msg = match pending.take() {
                Some(m) => m,
                None => self.recv(&mut frames).await?,
            };
            let early_quote = match early.take() {
                Some(e) => Some(e.ready(ctx.step_timeout()).await),
                None => None,
            };
            let out = {
                // The step's TPM (its lock, once taken) ends with the step, before any await.
                let mut att = Prequoted {
                    early: early_quote,
                    tpm: SharedTpm::new(&ctx.attester),
                };
                let (verifier, mut claim) = (ctx.verifier(), ClaimAsDestination(&ctx.journal));
                hs.handle(&msg, &mut att, verifier.as_ref(), &mut claim)
            };
            if let Some(qd) = hs.evidence_qualifying_data() {
                early = Some(EarlyQuote::start(&ctx, qd));
            }
            if let Some(o) = hs.order() {
                self.order_id = Some(*o.id());
                self.vm = o.body().vm.clone();
            }
            let out = out.map_err(|e| match e {
                trustmig_protocol::Error::Order(e) => AgentError::of_order(e, overruled.clone()),
                e => e.into(),
            })?;
            for m in out {
                self.send(&m).await?;
            }
        }
        let est = hs.into_established()?;
        info!(order = %hex(est.order.id()), vm = %self.vm, "source attested; receiving");
        crash_point(CrashPoint::DestinationAfterClaim);
        // The handshake claimed the order through the journal: its machine starts here.
        let commit = Commit::claimed(&ctx, *est.order.id())?;
        self.receive(est, frames, commit).await
    }

    /// A source lost its session after journalling COMMIT and asks what became of the order
    /// (SPEC.md §8.8 rule 3). The journal answers; "not committed" is journalled first, so no
    /// late `Commit` can make this agent commit afterwards.
    async fn answer_settlement(
        &mut self,
        order_id: [u8; 16],
        peer: &[u8; 32],
    ) -> Result<(), AgentError> {
        let committed = {
            let mut journal = self.ctx.journal.lock().expect("journal lock");
            let unknown = journal.entry(&order_id).is_none();
            if unknown
                && !self
                    .ctx
                    .unknown_queries
                    .allow(peer, std::time::Instant::now())
            {
                return Err(AgentError::Refused(format!(
                    "order {}: too many settlement queries about orders unknown here from this peer; ask again later",
                    hex(&order_id)
                )));
            }
            let answer = journal.settle_query(&order_id, peer);
            if unknown && answer.is_err() {
                // Nothing was journalled: the query cost the peer nothing.
                self.ctx.unknown_queries.refund(peer);
            }
            answer?
        };
        info!(order = %hex(&order_id), peer = %hex(peer), committed, "settlement query answered");
        let m = Message::SettleAnswer {
            order_id,
            committed,
        };
        self.send(&m.encode()).await?;
        let _ = self.wr.shutdown().await;
        Ok(())
    }

    /// The VM arrives through the backend its transfer mode names.
    async fn receive(
        &mut self,
        est: Established,
        frames: Frames,
        mut commit: Commit,
    ) -> Result<(), AgentError> {
        let r = self.receive_into(est, frames, &mut commit).await;
        if let Err(e) = &r {
            // Refused before the backend held anything (or after it discarded, which fed the
            // machine already): the machine journals the rollback.
            commit.feed(&self.ctx, Input::Failed, e.to_string());
            if let Err(j) = commit.drain(&self.ctx) {
                error!("could not journal the rollback: {j}");
            }
        }
        r
    }

    async fn receive_into(
        &mut self,
        est: Established,
        frames: Frames,
        commit: &mut Commit,
    ) -> Result<(), AgentError> {
        let ctx = self.ctx.clone();
        // The source's manifest, checked once for every backend before anything reads it: its
        // quote vouches for what it measured, not that the sizes and counts in it make sense
        // (two disks of 2^63 bytes each overflowed the sum of the time to hash them).
        trustmig_attest::manifest::validate(&est.manifest)
            .map_err(|e| AgentError::Refused(format!("the source's image manifest: {e}")))?;
        // A VM this agent is sending away, or sent and has not settled, may run elsewhere; a
        // copy arriving now could make two (SPEC.md §8.8 rule 4), or be overwritten when the
        // outgoing one comes back.
        let parked = ctx
            .parked
            .lock()
            .expect("parked lock")
            .contains_key(&self.vm);
        if parked || ctx.journal.lock().expect("journal lock").leaving(&self.vm) {
            return Err(AgentError::Refused(format!(
                "VM {:?} is leaving this host, or left under an order still in doubt: refusing another copy until that is settled",
                self.vm
            )));
        }
        // Register first: the source opens its data streams right after the handshake, and
        // the listener waits only a few seconds for their session (a reload below may hold
        // `claims` for a TPM extend).
        let sid = est.keys.session_id();
        let (conn_tx, conns) = mpsc::channel::<DataConn>(16);
        ctx.sessions
            .lock()
            .expect("sessions lock")
            .insert(sid, conn_tx);
        self.sid = Some(sid);
        // Busy, and the entry it runs on taken, under `Ctx::claims`: a reload's in-use check
        // sees the arrival, or its swap came first and the arrival runs on the new entry.
        let claims = ctx.claims.read().await;
        let _arriving = ctx.arriving.begin(&self.vm)?;
        let config = ctx.config();
        drop(claims);
        self.backend = match est.mode {
            TransferMode::Precopy { .. } => "synthetic",
            TransferMode::HypervisorStream => "qemu",
        };
        ctx.metrics.started("destination", self.backend);
        ctx.metrics.receiving.inc();
        match est.mode {
            TransferMode::Precopy { .. } => {
                let vm = SyntheticDest::prepare(&ctx, &self.vm, &est)?;
                self.receive_with(vm, est, frames, conns, commit).await
            }
            TransferMode::HypervisorStream => {
                let vm = QemuDest::prepare(&ctx, config, &self.vm, &est).await?;
                self.receive_with(vm, est, frames, conns, commit).await
            }
        }
    }

    /// Drive the backend; before COMMIT any failure discards what it received.
    async fn receive_with<B: DestVm>(
        &mut self,
        mut vm: B,
        est: Established,
        frames: Frames,
        conns: mpsc::Receiver<DataConn>,
        commit: &mut Commit,
    ) -> Result<(), AgentError> {
        let r = self.exchange(&mut vm, est, frames, conns, commit).await;
        if let Err(e) = &r {
            // The machine decides: before COMMIT (or once a settlement answer rolled the order
            // back) what arrived is discarded, then the rollback journalled; after it the VM
            // is ours.
            commit.feed(&self.ctx, Input::Failed, e.to_string());
            let mut vm = Some(vm);
            while let Some(o) = commit.next(&self.ctx)? {
                if o == Output::Vm(VmAction::Discard) {
                    if self.journal_in_doubt(commit.id()) {
                        continue;
                    }
                    if let Some(vm) = vm.take() {
                        vm.discard(&self.ctx).await;
                    }
                }
            }
        }
        r
    }

    /// Whether the journal broke on a write it could not cut back (a failing disk): that
    /// record may be in the file, COMMIT among them, and the next start replays what the file
    /// holds. What arrived is then kept, not discarded: were it COMMIT, the restart resumes it
    /// and the source, asking, hears "committed" (discarded, the VM would run nowhere); were
    /// it not, the restart rolls back and discards it. Until then no settlement answer can be
    /// journalled, so the source keeps its VM stopped and asks again.
    fn journal_in_doubt(&self, id: OrderId) -> bool {
        if !self.ctx.journal.lock().expect("journal lock").is_broken() {
            return false;
        }
        let how = "the journal refuses writes (one failed and could not be cut back, or its file could not be reopened), so whether this order committed here is what its file holds: what arrived is kept, not discarded; fix the journal's disk, then restart the agent, which settles the order by the file (resumes it if COMMIT is there, else discards it)".to_string();
        error!(order = %hex(&id), vm = %self.vm, "{how}");
        self.ctx.leave_to_operator(&self.vm, Some(hex(&id)), how);
        true
    }

    /// The control exchange while the backend receives: the source's messages go to the
    /// commit machine; once every stream ended and the source announced its counts, the
    /// final challenge; on `Commit`, [`Self::resume`].
    async fn exchange<B: DestVm>(
        &mut self,
        vm: &mut B,
        est: Established,
        mut frames: Frames,
        conns: mpsc::Receiver<DataConn>,
        commit: &mut Commit,
    ) -> Result<(), AgentError> {
        let ctx = self.ctx.clone();
        let mut dm = DestMigration::new(&est);
        vm.start(&ctx, est, conns)?;
        let mut arrived: Option<Arrived> = None;
        let mut awaiting: Option<Vec<u64>> = None;
        // A source that goes silent (no control message, no progress on its streams) for a
        // whole step timeout has failed: the destination discards rather than wait for ever.
        let mut last_activity = vm.activity();
        let silence = ctx.step_timeout() + vm.silence_allowance();
        loop {
            tokio::select! {
                () = tokio::time::sleep(silence), if last_activity.is_some() => {
                    let now = vm.activity();
                    if now == last_activity {
                        return Err(AgentError::Timeout(format!(
                            "source silent for {} s (no message, no data); giving up",
                            silence.as_secs()
                        )));
                    }
                    last_activity = now;
                }
                msg = frames.recv() => {
                    let msg = msg
                        .ok_or_else(|| AgentError::transport(Link::Control, "closed"))?
                        .map_err(wire)?;
                    match dm.handle(&msg, ctx.verifier().as_ref())? {
                        DestEvent::None => {}
                        DestEvent::AwaitStreams(counts) => {
                            if dm.hands_over_paused() {
                                if !B::HANDS_OVER_PAUSED {
                                    return Err(PeerMisbehaved::BadField(
                                        "switch-over hands over a paused guest, which this backend cannot keep paused"
                                            .into(),
                                    )
                                    .into());
                                }
                                let id = commit.id();
                                ctx.journal
                                    .lock()
                                    .expect("journal lock")
                                    .hands_over(&id, true)?;
                            }
                            awaiting = Some(counts);
                        }
                        DestEvent::Send(m) => {
                            // Before `Ready` (after it, a verified `Commit` is never refused):
                            // a source removed from the trust store stops here.
                            if matches!(Message::decode(&m), Ok(Message::Ready)) {
                                ctx.check_still_trusted(&peer_of(&ctx, self.order_id))?;
                                commit.feed(&self.ctx, Input::FinalVerified, "");
                                expect(commit.next(&ctx)?, Output::Send(Signal::Ready))?;
                            }
                            self.send(&m).await?
                        }
                        // The machine yields this only after `Resumed` (`late_quote`): here it
                        // would be a verdict nobody records, so it is an error, never dropped.
                        DestEvent::FinalQuote(v) => {
                            return Err(AgentError::Migration(format!(
                                "a late final quote's verdict before Resumed: {v:?}"
                            )));
                        }
                        DestEvent::Resume => {
                            return self.resume(vm, &mut dm, &mut frames, commit).await;
                        }
                    }
                }
                r = vm.arrived(), if arrived.is_none() => arrived = Some(r?),
            }
            if let (Some(counts), Some(got)) = (&awaiting, &arrived) {
                if got.stream_records.len() != counts.len() {
                    return Err(PeerMisbehaved::BadField(format!(
                        "source announced {} streams, session has {}",
                        counts.len(),
                        got.stream_records.len()
                    ))
                    .into());
                }
                let m = dm.streams_complete(&got.stream_records, got.digest, crate::random())?;
                crash_point(CrashPoint::DestinationFinalChallenge);
                self.send(&m).await?;
                awaiting = None;
            }
        }
    }

    /// `Commit` arrived: the machine journals COMMIT, then the VM runs here, then `Resumed`.
    async fn resume<B: DestVm>(
        &mut self,
        vm: &mut B,
        dm: &mut DestMigration,
        frames: &mut Frames,
        commit: &mut Commit,
    ) -> Result<(), AgentError> {
        let ctx = self.ctx.clone();
        let id = commit.id();
        // `Commit` verified after our `Ready` (DestMigration checked it).
        commit.with_evidence(dm.evidence());
        commit.feed(&self.ctx, Input::Commit, "");
        expect(commit.next(&ctx)?, Output::Vm(VmAction::Resume))?;
        crash_point(CrashPoint::DestinationAfterCommit);
        let paused = dm.hands_over_paused();
        self.start_committed(vm, &id, paused).await?;
        let note = if paused {
            "handed over paused here, as it was at the source"
        } else {
            "resumed here"
        };
        commit.feed(&self.ctx, Input::VmRunning, note);
        expect(commit.next(&ctx)?, Output::Send(Signal::Resumed))?;
        let m = dm.resumed()?;
        let sent = if crate::fault::lose_resumed() {
            Err(AgentError::Migration(
                "fault injection: failed after COMMIT, before Resumed was sent".into(),
            ))
        } else {
            self.send(&m).await
        };
        if let Err(e) = sent {
            // DONE all the same: the VM runs here (or is held paused as it was), and the
            // source learns so by asking (SPEC.md §8.8). Left at COMMIT, a restart's or
            // `trustmig reconcile`'s Resume would `cont` a guest this host's operator had
            // stopped since: it cannot tell a copy QEMU never ran from one it ran.
            let mut note = format!(
                "{}; Resumed not sent: {e}",
                if paused {
                    "handed over paused here"
                } else {
                    "resumed here"
                }
            );
            // The source's TPM will never quote its final digest for this session: say so,
            // it is what the late quote exists to catch (SPEC.md §8.7).
            if dm.awaits_final_quote() {
                let reason =
                    format!("no late final quote can come: the session ended before Resumed ({e})");
                error!(order = %hex(&id), vm = %self.vm, "INCIDENT: {reason}");
                note = format!("{note}; INCIDENT: {reason}");
            }
            commit.set_note(note.clone());
            // The session's failure is the error; one of the journal's is logged beside it.
            match commit.drain(&ctx) {
                Ok(rest) => debug_assert!(rest.is_empty(), "{rest:?}"),
                Err(j) => keep_journalling_done(ctx.clone(), id, self.vm.clone(), note, &j),
            }
            return Err(e);
        }
        // DONE. One that fails leaves the session a success all the same: the VM runs here
        // and the source has `Resumed`; DONE is written again in the background.
        match commit.drain(&ctx) {
            Ok(rest) => debug_assert!(rest.is_empty(), "{rest:?}"),
            Err(j) => keep_journalling_done(ctx.clone(), id, self.vm.clone(), note.into(), &j),
        }
        crash_point(CrashPoint::DestinationAfterDone);
        info!(order = %hex(&id), vm = %self.vm, paused, "VM handed over to this host");
        ctx.remember(history_entry(
            "destination",
            None,
            None,
            &hex(&id),
            &self.vm,
        ));
        if dm.awaits_final_quote() {
            self.late_quote(dm, frames, &id).await;
        }
        Ok(())
    }

    /// Start the committed VM (`paused`: hand it over paused, as it was at the source). It is
    /// this host's now and runs nowhere else: a refused `cont` is tried again (250 ms doubling
    /// to 5 s) for a step timeout before it is reported; a restart of the agent resumes it too
    /// (SPEC.md §8.8).
    async fn start_committed<B: DestVm>(
        &mut self,
        vm: &mut B,
        id: &OrderId,
        paused: bool,
    ) -> Result<(), AgentError> {
        let mut pauses = crate::backoff::Backoff::new(
            std::time::Duration::from_millis(250),
            std::time::Duration::from_secs(5),
        );
        crate::fault::hold(crate::fault::Hold::BeforeResume).await;
        let deadline = tokio::time::Instant::now() + self.ctx.step_timeout();
        loop {
            match vm.resume(&self.ctx, paused).await {
                Ok(()) => return Ok(()),
                Err(e) if tokio::time::Instant::now() < deadline => {
                    warn!(order = %hex(id), vm = %self.vm, "committed here, but the VM did not start; trying again: {e}");
                    tokio::time::sleep(pauses.next_pause()).await;
                }
                Err(e) => {
                    // The cause without the "migration failed" every error of a migration
                    // leads with: this one committed.
                    let how = format!("committed here, but the VM does not start ({}): it runs nowhere until it does; once QEMU can run it, run `{}` (or restart the agent)", e.cause(), self.ctx.home.command(&["reconcile", &self.vm]));
                    error!(order = %hex(id), vm = %self.vm, "{how}");
                    self.ctx.leave_to_operator(&self.vm, Some(hex(id)), how);
                    self.not_started = true;
                    return Err(e);
                }
            }
        }
    }

    /// After `Resumed`: the source's TPM quote of the final digest, the record's evidence
    /// (SPEC.md §8.7). It gates nothing any more (the VM runs here), so whatever is wrong with
    /// it is an incident: logged, journalled on the order, and sent to the source as `Abort`
    /// for its operator. A quote that verifies is journalled too.
    async fn late_quote(&mut self, dm: &mut DestMigration, frames: &mut Frames, id: &OrderId) {
        let ctx = self.ctx.clone();
        // A hardware TPM quotes in up to ~600 ms: the step timeout covers it.
        let raw = self.recv(frames).await;
        let verdict = match &raw {
            Ok(raw) => match dm.handle(raw, ctx.verifier().as_ref()) {
                Ok(DestEvent::FinalQuote(v)) => v,
                Ok(_) => Err("an unexpected message instead of the late final quote".into()),
                Err(e) => Err(format!("the late final quote was refused: {e}")),
            },
            Err(e) => Err(format!("no late final quote arrived: {e}")),
        };
        let note = match &verdict {
            Ok(()) => "late final quote verified".to_string(),
            Err(reason) => format!("INCIDENT: {reason}"),
        };
        let journalled =
            (ctx.journal.lock().expect("journal lock")).late_quote(id, raw.as_deref().ok(), &note);
        if let Err(e) = journalled {
            error!(order = %hex(id), "could not journal the late quote's verdict: {e}");
        }
        match verdict {
            Ok(()) => info!(order = %hex(id), "late final quote verified"),
            Err(reason) => {
                error!(order = %hex(id), vm = %self.vm, "INCIDENT: {reason}");
                let abort = Message::Abort {
                    code: AbortCode::DigestMismatch,
                    reason: format!("incident after commit: {reason}"),
                };
                let _ = self.send(&abort.encode()).await;
            }
        }
    }
}

/// The VM runs here (or is held paused as it was handed over), but its DONE record failed
/// (`failed`: a full disk, say): write it again in the background, 250 ms doubling to 30 s,
/// until it lands, the order's record moves on (a reconciliation wrote it), or the journal
/// refuses appends for good (then a restart settles the order). Left at COMMIT, the VM may
/// not be sent on from here (`Rules::holds_vm`), and a restart's or `trustmig reconcile`'s
/// resume would `cont` a guest its operator had stopped since (SPEC.md §8.8).
fn keep_journalling_done(
    ctx: Arc<Ctx>,
    id: OrderId,
    vm: String,
    note: String,
    failed: &AgentError,
) {
    error!(order = %hex(&id), vm = %vm, "the VM runs here, but DONE could not be journalled ({failed}): trying again in the background");
    // In sight meanwhile (`status`, `doctor`, a refused order to send it on).
    let order = Some(hex(&id));
    ctx.leave_to_operator(&vm, order.clone(), format!("the VM runs here, but DONE is not yet journalled ({}): written again in the background; the VM is not sent from here until it is", failed.cause()));
    tokio::spawn(async move {
        let mut pauses = crate::backoff::Backoff::new(
            std::time::Duration::from_millis(250),
            std::time::Duration::from_secs(30),
        );
        for tries in 2u64.. {
            tokio::time::sleep(pauses.next_pause()).await;
            let mut journal = ctx.journal.lock().expect("journal lock");
            if journal.entry(&id).map(|e| e.state) != Some(State::Committed) {
                return;
            }
            if journal.is_broken() {
                let how = "the VM runs here, but DONE cannot be journalled: the journal refuses appends until the agent restarts, which settles this order";
                error!(order = %hex(&id), vm = %vm, "{how}");
                ctx.leave_to_operator(&vm, order, how.into());
                return;
            }
            match journal.resumed_after_session(&id, &note) {
                Ok(()) => {
                    info!(order = %hex(&id), vm = %vm, tries, "DONE journalled");
                    let mut left = ctx.left_to_operator.lock().expect("left lock");
                    if left.get(&vm).is_some_and(|(o, _)| *o == order) {
                        left.remove(&vm);
                    }
                    return;
                }
                Err(e) => {
                    warn!(order = %hex(&id), vm = %vm, tries, "DONE could not be journalled, trying again: {e}")
                }
            }
        }
    });
}
