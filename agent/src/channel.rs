//! The source's control channel to a destination, shared by the pre-copy driver (`source.rs`)
//! and the QEMU sidecar (`sidecar/`): dial, TLS 1.3 pinned to the order's destination,
//! framed messages with step timeouts, the attested handshake, and aborts.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncWriteExt, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::client::TlsStream;
use tracing::debug;
use trustmig_protocol::handshake::{ChannelBinding, Established, SourceHandshake};
use trustmig_protocol::manifest::{DiskManifest, ImageManifest};
use trustmig_protocol::messages::{Message, TransferMode};
use trustmig_protocol::migration::{Outcome, SourceEvent, SourceMigration};
use trustmig_protocol::order::{OrderId, VerifiedOrder};
use trustmig_protocol::AbortCode;
use trustmig_protocol::AgentId;

use crate::control::Progress;
use crate::daemon::Ctx;
use crate::error::AgentError;
use crate::fault::{self, crash_point, CrashPoint};
use crate::wire::{spawn_frame_reader, write_frame, WireError};

type Tls = TlsStream<TcpStream>;

fn wire(e: WireError) -> AgentError {
    AgentError::Transport(format!("control channel: {e}"))
}

/// An open, TLS-authenticated control channel from source to destination.
pub struct SourceChannel {
    ctx: Arc<Ctx>,
    wr: WriteHalf<Tls>,
    rx: mpsc::Receiver<Result<Vec<u8>, WireError>>,
    exporter: [u8; 32],
}

impl SourceChannel {
    /// Dial the order's destination address and run TLS pinned to its identity.
    pub async fn connect(ctx: &Arc<Ctx>, order: &VerifiedOrder) -> Result<Self, AgentError> {
        let body = order.body();
        Self::connect_to(ctx, &body.destination_addr, body.destination).await
    }

    /// Connect to the agent with identity `destination` at `addr` (TLS 1.3, pinned keys).
    pub async fn connect_to(
        ctx: &Arc<Ctx>,
        addr: &str,
        destination: AgentId,
    ) -> Result<Self, AgentError> {
        let timeout = ctx.step_timeout();
        let addr = addr.to_string();
        let cerr = |reason: String| AgentError::Connect {
            addr: addr.clone(),
            reason,
        };
        let tcp = tokio::time::timeout(timeout, TcpStream::connect(&addr))
            .await
            .map_err(|_| cerr("timed out".into()))?
            .map_err(|e| cerr(e.to_string()))?;
        tcp.set_nodelay(true).ok();
        let tls_cfg = crate::tls::client_config(&ctx.identity, destination)
            .map_err(|e| AgentError::Migration(format!("TLS configuration: {e}")))?;
        let name = rustls::pki_types::ServerName::try_from("trustmig-agent")
            .expect("static name is valid");
        let tls = tokio::time::timeout(
            timeout,
            tokio_rustls::TlsConnector::from(tls_cfg).connect(name, tcp),
        )
        .await
        .map_err(|_| cerr("TLS handshake timed out".into()))?
        .map_err(|e| cerr(format!("TLS handshake: {e}")))?;
        let exporter = crate::tls::exporter(tls.get_ref().1)
            .map_err(|e| AgentError::Migration(format!("TLS exporter: {e}")))?;
        let (rd, wr) = tokio::io::split(tls);
        Ok(Self {
            ctx: ctx.clone(),
            wr,
            rx: spawn_frame_reader(rd),
            exporter,
        })
    }

    /// Send one encoded message within the step timeout.
    pub async fn send(&mut self, msg: &[u8]) -> Result<(), AgentError> {
        tokio::time::timeout(self.ctx.step_timeout(), write_frame(&mut self.wr, msg))
            .await
            .map_err(|_| AgentError::Transport("control channel: send timed out".into()))?
            .map_err(wire)
    }

    /// The next message, within the step timeout.
    pub async fn recv(&mut self) -> Result<Vec<u8>, AgentError> {
        match tokio::time::timeout(self.ctx.step_timeout(), self.rx.recv()).await {
            Err(_) => Err(AgentError::Migration(
                "destination did not answer in time".into(),
            )),
            Ok(None) => Err(AgentError::Transport("control channel closed".into())),
            Ok(Some(r)) => r.map_err(wire),
        }
    }

    /// The next message if one is already waiting (cancel-safe, for `select!` too).
    pub async fn next(&mut self) -> Option<Result<Vec<u8>, AgentError>> {
        self.rx.recv().await.map(|r| r.map_err(wire))
    }

    /// A message that already arrived, without waiting.
    pub fn try_recv(&mut self) -> Option<Result<Vec<u8>, AgentError>> {
        self.rx.try_recv().ok().map(|r| r.map_err(wire))
    }

    /// After a local data-stream failure: the destination usually refused a record and closed
    /// the stream, and its `Abort` follows on this channel. Returns it if it comes within 2 s.
    pub async fn peer_abort(&mut self) -> Option<(AbortCode, String)> {
        let msg = tokio::time::timeout(Duration::from_secs(2), self.rx.recv()).await;
        match msg
            .ok()
            .flatten()
            .and_then(Result::ok)
            .map(|m| Message::decode(&m))
        {
            Some(Ok(Message::Abort { code, reason })) => Some((code, reason)),
            _ => None,
        }
    }

    /// Tell the destination the migration is off (best effort) and close.
    pub async fn abort(&mut self, code: AbortCode, reason: &str) {
        let msg = Message::Abort {
            code,
            reason: reason.chars().take(200).collect(),
        };
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            write_frame(&mut self.wr, &msg.encode()),
        )
        .await;
        let _ = self.wr.shutdown().await;
    }

    /// After [`Self::abort`]: wait up to `within` for the destination to close the channel,
    /// which it does once it has discarded its copy. Whether it closed in time.
    pub async fn wait_closed(&mut self, within: Duration) -> bool {
        let closed = async { while self.rx.recv().await.is_some() {} };
        tokio::time::timeout(within, closed).await.is_ok()
    }

    /// Run the attested handshake (SPEC.md §5) for `order` with this transfer mode.
    pub async fn handshake(
        &mut self,
        order: &VerifiedOrder,
        mode: TransferMode,
        streams: u16,
        manifest: &ImageManifest,
    ) -> Result<Established, AgentError> {
        let channel = ChannelBinding {
            tls_exporter: self.exporter,
            local: self.ctx.identity.id(),
            peer: order.body().destination,
        };
        let (mut hs, hello) = SourceHandshake::start(
            order.clone(),
            channel,
            crate::random(),
            mode,
            streams,
            manifest,
        )
        .map_err(AgentError::Protocol)?;
        self.send(&hello).await?;
        while !hs.is_done() {
            let msg = self.recv().await?;
            let out = {
                let ctx = self.ctx.clone();
                let mut att = ctx.attester.lock().expect("attester lock");
                hs.handle(&msg, att.as_mut(), ctx.verifier.as_ref())
            }
            .map_err(AgentError::Protocol)?;
            for m in out {
                self.send(&m).await?;
            }
        }
        hs.into_established().map_err(AgentError::Protocol)
    }
}

impl SourceChannel {
    /// After switch-over: send `SwitchOver`, answer the final challenge with evidence, and on
    /// `Ready` journal COMMIT durably *before* sending `Commit` (SPEC.md §8.7); ends at
    /// `Resumed`. `outcome` turns `Committed` the moment COMMIT is durable, whatever happens
    /// after.
    pub async fn commit_exchange(
        &mut self,
        sm: &mut SourceMigration,
        switch_over: &[u8],
        order_id: &OrderId,
        progress: &mpsc::Sender<Progress>,
        outcome: &mut Outcome,
    ) -> Result<(), AgentError> {
        self.send(switch_over).await?;
        loop {
            let msg = self.recv().await?;
            if matches!(Message::decode(&msg), Ok(Message::FinalChallenge { .. })) {
                crash_point(CrashPoint::SourceFinalChallenge);
            }
            let ev = {
                let ctx = self.ctx.clone();
                let mut att = ctx.attester.lock().expect("attester lock");
                sm.handle(&msg, att.as_mut())
            }
            .map_err(AgentError::Protocol)?;
            match ev {
                SourceEvent::Send(m) => self.send(&m).await?,
                SourceEvent::ReadyToCommit => {
                    debug!("ready to commit");
                    // The point of no return: durable before the destination may resume.
                    self.ctx
                        .journal
                        .lock()
                        .expect("journal lock")
                        .commit(order_id)?;
                    *outcome = Outcome::Committed;
                    crash_point(CrashPoint::SourceAfterCommit);
                    if fault::lose_commit() {
                        return Err(AgentError::Migration("fault injection: session lost after COMMIT was journalled, before Commit was sent".into()));
                    }
                    if fault::settle_before_commit() {
                        crate::settle::ask_about(&self.ctx, order_id).await;
                    }
                    let c = sm.commit().map_err(AgentError::Protocol)?;
                    self.send(&c).await?;
                    let _ = progress.send(Progress::Committed).await;
                }
                SourceEvent::Resumed => {
                    debug!("destination resumed");
                    return Ok(());
                }
            }
        }
    }
}

/// The image manifest a source attests for `vm`: its configuration digest and its disks
/// (empty with shared storage). spec: SPEC.md §6.3
pub fn vm_manifest(
    ctx: &Ctx,
    vm: &str,
    chunk_size: u32,
    disks: Vec<DiskManifest>,
) -> ImageManifest {
    let vm_cfg = ctx.config.vms.iter().find(|v| v.name == vm);
    let config_digest =
        trustmig_protocol::sha256(&[toml::to_string(&vm_cfg).unwrap_or_default().as_bytes()]);
    ImageManifest {
        vm: vm.into(),
        config_digest,
        chunk_size,
        disks,
    }
}

/// The wire abort code for a local error: the protocol's mapping, `InternalError` otherwise.
pub fn abort_code(e: &AgentError) -> AbortCode {
    match e {
        AgentError::Protocol(p) => AbortCode::from(p),
        _ => AbortCode::InternalError,
    }
}

/// Book-keeping after a source-side run: `status` history, and for a failure one log line
/// saying where the VM is (`vm_state`).
pub fn note_source_result(
    ctx: &Ctx,
    id: &OrderId,
    vm: &str,
    result: Result<&crate::control::Summary, (&AgentError, &str)>,
) {
    let order = trustmig_protocol::order::hex(id);
    match result {
        Ok(summary) => ctx.remember(crate::daemon::history_entry(
            "source",
            Some(summary),
            None,
            &order,
            vm,
        )),
        Err((e, vm_state)) => {
            tracing::warn!(order = %order, "migration of {vm} failed: {e}; {vm_state}");
            ctx.remember(crate::daemon::history_entry(
                "source",
                None,
                Some(&format!("{e}; {vm_state}")),
                &order,
                vm,
            ));
        }
    }
}
