//! The source's control channel to a destination, for the source driver and the settlement
//! queries: dial, TLS 1.3 pinned to the order's destination, framed messages with step
//! timeouts, the attested handshake, and aborts.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncWriteExt, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::client::TlsStream;
use trustmig_protocol::handshake::{ChannelBinding, Established, SourceHandshake};
use trustmig_protocol::manifest::ImageManifest;
use trustmig_protocol::messages::{peer_reason, Message, TransferMode};
use trustmig_protocol::order::VerifiedOrder;
use trustmig_protocol::AbortCode;
use trustmig_protocol::AgentId;

use crate::attestation::SharedTpm;
use crate::ctx::Ctx;
use crate::error::{AgentError, Link};
use crate::net::wire::{spawn_frame_reader, write_frame, WireError};

type Tls = TlsStream<TcpStream>;

fn wire(e: WireError) -> AgentError {
    AgentError::transport(Link::Control, e)
}

/// An open, TLS-authenticated control channel from source to destination.
pub struct SourceChannel {
    ctx: Arc<Ctx>,
    wr: WriteHalf<Tls>,
    rx: mpsc::Receiver<Result<Vec<u8>, WireError>>,
    exporter: zeroize::Zeroizing<[u8; 32]>,
    /// The identity the TLS layer authenticated: what the handshake compares with the order's
    /// destination (SPEC.md §5.3 S0b), not a copy of the order's own field.
    peer: AgentId,
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
        let tls =
            crate::net::tls::dial(&ctx.identity, addr, destination, ctx.step_timeout()).await?;
        let exporter = crate::net::tls::exporter(tls.get_ref().1)
            .map_err(|e| AgentError::Tls(format!("TLS exporter: {e}")))?;
        let peer = crate::net::tls::peer_identity(tls.get_ref().1)
            .map_err(|e| AgentError::Tls(format!("destination's identity: {e}")))?;
        let (rd, wr) = tokio::io::split(tls);
        Ok(Self {
            ctx: ctx.clone(),
            wr,
            rx: spawn_frame_reader(rd),
            exporter,
            peer,
        })
    }

    /// Send one encoded message within the step timeout.
    pub async fn send(&mut self, msg: &[u8]) -> Result<(), AgentError> {
        tokio::time::timeout(self.ctx.step_timeout(), write_frame(&mut self.wr, msg))
            .await
            .map_err(|_| AgentError::transport(Link::Control, "send timed out"))?
            .map_err(wire)
    }

    /// The next message, within the step timeout.
    pub async fn recv(&mut self) -> Result<Vec<u8>, AgentError> {
        self.recv_within(std::time::Duration::ZERO).await
    }

    /// [`Self::recv`], waiting `extra` beyond the step timeout (a step the destination is
    /// known to take longer for, such as hashing disks verified in full).
    pub async fn recv_within(&mut self, extra: std::time::Duration) -> Result<Vec<u8>, AgentError> {
        let within = self.ctx.step_timeout().saturating_add(extra);
        match tokio::time::timeout(within, self.rx.recv()).await {
            Err(_) => Err(AgentError::Timeout(
                "destination did not answer in time".into(),
            )),
            Ok(None) => Err(AgentError::transport(Link::Control, "closed")),
            Ok(Some(r)) => r.map_err(wire),
        }
    }

    /// The next message if one is already waiting (cancel-safe, for `select!` too).
    pub async fn next(&mut self) -> Option<Result<Vec<u8>, AgentError>> {
        self.rx.recv().await.map(|r| r.map_err(wire))
    }

    /// The next message, or how the channel ended: `Err(WireError::Closed)` (or `None`) is the
    /// destination's authenticated close (TLS close_notify), a reset or truncation is not.
    pub async fn next_or_end(&mut self) -> Option<Result<Vec<u8>, WireError>> {
        self.rx.recv().await
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
            Some(Ok(Message::Abort { code, reason })) => Some((code, peer_reason(&reason))),
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
            tls_exporter: *self.exporter,
            local: self.ctx.identity.id(),
            peer: self.peer,
        };
        // The seed of the session's final-signature key: fresh, used once, zeroized here
        // (the key itself is zeroized by ed25519-dalek when the session drops it).
        let mut seed = zeroize::Zeroizing::new([0u8; 32]);
        crate::fill_random(&mut *seed);
        let (mut hs, hello) = SourceHandshake::start(
            order.clone(),
            channel,
            (crate::random(), &seed),
            mode,
            streams,
            manifest,
        )
        .map_err(AgentError::Protocol)?;
        self.send(&hello).await?;
        while !hs.is_done() {
            let msg = self.recv().await?;
            let verifier = self.ctx.verifier();
            let out = hs
                .handle(
                    &msg,
                    &mut SharedTpm::new(&self.ctx.attester),
                    verifier.as_ref(),
                )
                .map_err(AgentError::Protocol)?;
            for m in out {
                self.send(&m).await?;
            }
        }
        hs.into_established().map_err(AgentError::Protocol)
    }
}
