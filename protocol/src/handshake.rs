//! The handshake: hello, order, mutual attestation, key confirmation. spec: SPEC.md §5
//!
//! ```text
//! source (TLS client)                          destination (TLS server)
//!   ClientHello{versions, nonce_s, order, mode, streams}  ->
//!                                   verify order, TLS peer = order.source, claim order id
//!                           <-  ServerHello{version, versions, nonce_d}
//!   extend ImageManifest(root); quote(qd_s(nonce_d, final_key))
//!   SourceEvidence{evidence, manifest, final_key}   ->
//!                                   verify evidence, manifest root attested
//!                           <-  DestinationEvidence{evidence}   (quote(qd(nonce_s)))
//!                           <-  Finished{mac_d}
//!   verify evidence, mac_d
//!   Finished{mac_s}   ->
//! ```
//! Both state machines take encoded messages in and give encoded messages out; the driver
//! frames them on the TLS stream. Any error is sticky.

use crate::attestation::{
    qualifying_data, Attester, Claims, EvidenceVerifier, Measurement, HANDSHAKE_LABEL,
};
use crate::error::{Error, PeerMisbehaved};
use crate::finalsig::{source_handshake_qualifying_data, FinalKey};
use crate::keys::KeySchedule;
use crate::machine::{advance, decode, unexpected};
use crate::manifest::{manifest_root, ImageManifest, MAX_MIRRORED};
use crate::messages::{ClientHello, Message, ServerHello, TransferMode, MAX_STREAMS};
use crate::order::{hex, OrderJournal, OrderPolicy, Role, VerifiedOrder};
use crate::{codec, ct_eq, AgentId, Digest, SUPPORTED_VERSIONS};

/// Largest guest page accepted (64 KiB): a batch holds at least one page in one record.
/// spec: SPEC.md §9
pub const MAX_PAGE_SIZE: u32 = 64 << 10;
/// Largest guest accepted, bytes (16 TiB). spec: SPEC.md §9
pub const MAX_GUEST_BYTES: u64 = 16 << 40;

/// What the TLS layer established; an input to both state machines. Wiped when dropped (each
/// clone too): with the transcript hash, which the journal keeps in clear, the exporter gives
/// every stream key of the session.
#[derive(Clone, zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
pub struct ChannelBinding {
    /// `EXPORTER-trustmig-v1` output of the TLS session (32 bytes, empty context).
    pub tls_exporter: [u8; 32],
    /// Our identity key (the key in our TLS certificate).
    pub local: AgentId,
    /// The authenticated TLS peer's identity key.
    pub peer: AgentId,
}

impl std::fmt::Debug for ChannelBinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The exporter is session secret material: never printed.
        f.debug_struct("ChannelBinding")
            .field("local", &hex(&self.local))
            .field("peer", &hex(&self.peer))
            .finish_non_exhaustive()
    }
}

/// A finished handshake: what the session runs on.
pub struct Established {
    /// Our role.
    pub role: Role,
    /// The verified order.
    pub order: VerifiedOrder,
    /// Negotiated version.
    pub version: u16,
    /// Channel binding.
    pub channel: ChannelBinding,
    /// Hash of the four messages ClientHello..DestinationEvidence.
    pub transcript_hash: Digest,
    /// Session key schedule.
    pub keys: KeySchedule,
    /// What the peer's TPM vouched for.
    pub peer_claims: Claims,
    /// Transfer mode and geometry.
    pub mode: TransferMode,
    /// Number of data streams.
    pub streams: u16,
    /// The image manifest as sent.
    pub manifest: ImageManifest,
    /// Its root, as attested (over the bytes as sent).
    pub manifest_root: Digest,
    /// Source: the session's final-signature key, for [`crate::migration::SourceMigration`]
    /// (taken from here by it).
    pub final_key: Option<FinalKey>,
    /// Destination: the source's attested final-signature key.
    pub peer_final_key: Option<[u8; 32]>,
}

impl std::fmt::Debug for Established {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys stay out of Debug output.
        f.debug_struct("Established")
            .field("role", &self.role)
            .field("order_id", &hex(self.order.id()))
            .field("version", &self.version)
            .field("mode", &self.mode)
            .field("streams", &self.streams)
            .finish_non_exhaustive()
    }
}

/// Running SHA-256 over length-prefixed messages. spec: SPEC.md §5.3
#[derive(Clone)]
struct Transcript(ring::digest::Context);

impl Transcript {
    fn new() -> Self {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"trustmig transcript v1");
        Self(ctx)
    }
    fn add(&mut self, msg: &[u8]) {
        self.0.update(&(msg.len() as u32).to_be_bytes());
        self.0.update(msg);
    }
    fn hash(&self) -> Digest {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.0.clone().finish().as_ref());
        out
    }
}

/// The TLS peer is the agent the order names for the peer's `role` (constant time).
fn check_peer(channel: &ChannelBinding, role: Role, named: &AgentId) -> Result<(), Error> {
    if !ct_eq(&channel.peer, named) {
        return Err(PeerMisbehaved::WrongPeer {
            role,
            tls_peer: hex(&channel.peer),
            named: hex(named),
        }
        .into());
    }
    Ok(())
}

/// Check the peer's `Finished` MAC over the transcript (SPEC.md §5.3).
fn check_finished(est: &Established, from: Role, mac: &[u8; 32]) -> Result<(), Error> {
    let expect = est.keys.finished_mac(from, &est.transcript_hash);
    if !ct_eq(mac, &expect) {
        return Err(PeerMisbehaved::BadFinished.into());
    }
    Ok(())
}

/// The streams a manifest's mirrored disks need: hypervisor-stream mode uses stream 0 for
/// QEMU's stream and stream `i + 1` for mirror `i`; the native engine carries no mirrors.
fn check_streams(mode: &TransferMode, streams: u16, manifest: &ImageManifest) -> Result<(), Error> {
    let mirrors = manifest.mirrors.len();
    let ok = match mode {
        TransferMode::HypervisorStream => usize::from(streams) == 1 + mirrors,
        TransferMode::Precopy { .. } => mirrors == 0,
    };
    if ok {
        return Ok(());
    }
    let mode = match mode {
        TransferMode::HypervisorStream => "hypervisor-stream",
        TransferMode::Precopy { .. } => "precopy",
    };
    Err(PeerMisbehaved::BadField(format!(
        "{streams} streams for {mirrors} mirrored disks in {mode} mode"
    ))
    .into())
}

fn check_mode(mode: &TransferMode, streams: u16) -> Result<(), Error> {
    if streams == 0 || streams > MAX_STREAMS {
        return Err(PeerMisbehaved::BadField(format!(
            "streams {streams} not in 1..={MAX_STREAMS}"
        ))
        .into());
    }
    // Hypervisor-stream mode: one stream for QEMU's, one more per mirrored disk (checked
    // against the manifest by `check_streams` once it is known; `MAX_MIRRORED` is what fits).
    const _: () = assert!(1 + MAX_MIRRORED == MAX_STREAMS as usize);
    if let TransferMode::Precopy {
        page_size,
        page_count,
    } = *mode
    {
        if !page_size.is_power_of_two() || !(4096..=MAX_PAGE_SIZE).contains(&page_size) {
            return Err(PeerMisbehaved::BadField(format!("page size {page_size}")).into());
        }
        if page_count == 0 || page_count.saturating_mul(u64::from(page_size)) > MAX_GUEST_BYTES {
            return Err(PeerMisbehaved::BadField(format!("page count {page_count}")).into());
        }
    }
    Ok(())
}

/// Best common version of our list and theirs.
fn best_common(theirs: &[u16]) -> Option<u16> {
    SUPPORTED_VERSIONS
        .iter()
        .copied()
        .filter(|v| theirs.contains(v))
        .max()
}

/// The refusal for a peer that offers no version this side speaks, naming the first few it
/// offered: the list is the peer's, as long as a frame allows, and the error goes into logs.
fn no_common_version(offered: &[u16]) -> PeerMisbehaved {
    const SHOWN: usize = 16;
    PeerMisbehaved::NoCommonVersion(offered.iter().take(SHOWN).copied().collect())
}

struct Hello {
    order: VerifiedOrder,
    channel: ChannelBinding,
    nonce_s: [u8; 32],
    nonce_d: [u8; 32],
    /// Source: its ephemeral final-signature key; destination: the source's public half, once
    /// its attested `SourceEvidence` arrived (SPEC.md §8.7).
    final_key: Option<FinalKey>,
    peer_final_key: Option<[u8; 32]>,
    mode: TransferMode,
    streams: u16,
    version: u16,
    transcript: Transcript,
}

enum SourceState {
    AwaitServerHello {
        hello: Box<Hello>,
        manifest: Vec<u8>,
    },
    AwaitDestinationEvidence {
        hello: Box<Hello>,
        manifest: ImageManifest,
        root: Digest,
    },
    AwaitFinished(Box<Established>),
    Done(Box<Established>),
    Taken,
}

impl SourceState {
    /// The message this state waits for, for errors.
    fn expects(&self) -> &'static str {
        match self {
            Self::AwaitServerHello { .. } => "server-hello",
            Self::AwaitDestinationEvidence { .. } => "destination-evidence",
            Self::AwaitFinished(_) => "finished",
            Self::Done(_) | Self::Taken => "nothing (handshake complete)",
        }
    }
}

/// The source's side of the handshake.
pub struct SourceHandshake {
    state: Result<SourceState, Error>,
}

impl SourceHandshake {
    /// Begin: returns the state machine and the encoded `ClientHello`.
    ///
    /// `manifest` is the image manifest the source will attest; `nonce` and `final_key_seed`
    /// must be fresh random (the seed becomes the session's final-signature key).
    pub fn start(
        order: VerifiedOrder,
        channel: ChannelBinding,
        (nonce, final_key_seed): ([u8; 32], &[u8; 32]),
        mode: TransferMode,
        streams: u16,
        manifest: &ImageManifest,
    ) -> Result<(Self, Vec<u8>), Error> {
        check_mode(&mode, streams)?;
        check_streams(&mode, streams, manifest)?;
        check_peer(&channel, Role::Destination, &order.body().destination)?;
        let msg = Message::ClientHello(ClientHello {
            versions: SUPPORTED_VERSIONS.to_vec(),
            nonce,
            order: order.signed().clone(),
            mode,
            streams,
        })
        .encode();
        let mut transcript = Transcript::new();
        transcript.add(&msg);
        let hello = Box::new(Hello {
            order,
            channel,
            nonce_s: nonce,
            nonce_d: [0; 32],
            final_key: Some(FinalKey::from_seed(final_key_seed)),
            peer_final_key: None,
            mode,
            streams,
            version: 0,
            transcript,
        });
        let state = SourceState::AwaitServerHello {
            hello,
            manifest: manifest.to_cbor(),
        };
        Ok((Self { state: Ok(state) }, msg))
    }

    /// Whether the handshake completed.
    pub fn is_done(&self) -> bool {
        matches!(self.state, Ok(SourceState::Done(_)))
    }

    /// Feed one received message; returns the messages to send, in order.
    pub fn handle(
        &mut self,
        msg: &[u8],
        attester: &mut dyn Attester,
        verifier: &dyn EvidenceVerifier,
    ) -> Result<Vec<Vec<u8>>, Error> {
        advance(&mut self.state, SourceState::Taken, |state| {
            Self::step(state, msg, attester, verifier)
        })
    }

    fn step(
        state: SourceState,
        raw: &[u8],
        attester: &mut dyn Attester,
        verifier: &dyn EvidenceVerifier,
    ) -> Result<(SourceState, Vec<Vec<u8>>), Error> {
        match (state, decode(raw)?) {
            (SourceState::AwaitServerHello { hello, manifest }, Message::ServerHello(sh)) => {
                Self::on_server_hello(hello, manifest, sh, raw, attester)
            }
            (
                SourceState::AwaitDestinationEvidence {
                    mut hello,
                    manifest,
                    root,
                },
                Message::DestinationEvidence { evidence },
            ) => {
                let qd = destination_qualifying_data(&hello, &hello.channel.peer);
                let peer_claims = verifier.verify(&evidence, &qd, &hello.channel.peer)?;
                hello.transcript.add(raw);
                let est = establish(*hello, Role::Source, peer_claims, (manifest, root));
                Ok((SourceState::AwaitFinished(Box::new(est)), vec![]))
            }
            (SourceState::AwaitFinished(est), Message::Finished { mac }) => {
                check_finished(&est, Role::Destination, &mac)?;
                let mine = est.keys.finished_mac(Role::Source, &est.transcript_hash);
                let out = Message::Finished { mac: mine }.encode();
                Ok((SourceState::Done(est), vec![out]))
            }
            (s, m) => Err(unexpected(&m, s.expects())),
        }
    }

    /// `ServerHello` (SPEC.md §5.2 S1-S5): the version chosen is the best common one (no
    /// downgrade); then measure the manifest and quote over the destination's nonce, the channel
    /// and the final key.
    fn on_server_hello(
        mut hello: Box<Hello>,
        manifest: Vec<u8>,
        sh: ServerHello,
        raw: &[u8],
        attester: &mut dyn Attester,
    ) -> Result<(SourceState, Vec<Vec<u8>>), Error> {
        let ServerHello {
            version,
            versions,
            nonce,
        } = sh;
        let best = best_common(&versions).ok_or_else(|| no_common_version(&versions))?;
        if version != best {
            return Err(PeerMisbehaved::Downgrade {
                chosen: version,
                best,
            }
            .into());
        }
        hello.version = version;
        hello.nonce_d = nonce;
        hello.transcript.add(raw);
        let root = manifest_root(&manifest);
        attester.extend(&Measurement::ImageManifest(root))?;
        let final_key = hello
            .final_key
            .as_ref()
            .ok_or(Error::ApiMisuse("source handshake without a final key"))?
            .public();
        let qd = source_qualifying_data(&hello, &hello.channel.local, &final_key);
        let evidence = attester.quote(&qd)?;
        let parsed: ImageManifest = codec::decode(&manifest)?;
        let out = Message::SourceEvidence {
            evidence,
            manifest,
            final_key,
        }
        .encode();
        hello.transcript.add(&out);
        let next = SourceState::AwaitDestinationEvidence {
            hello,
            manifest: parsed,
            root,
        };
        Ok((next, vec![out]))
    }

    /// The session, once [`Self::is_done`].
    pub fn into_established(self) -> Result<Established, Error> {
        match self.state? {
            SourceState::Done(e) => Ok(*e),
            _ => Err(Error::ApiMisuse("handshake not complete")),
        }
    }
}

fn establish(
    hello: Hello,
    role: Role,
    peer_claims: Claims,
    (manifest, manifest_root): (ImageManifest, Digest),
) -> Established {
    let transcript_hash = hello.transcript.hash();
    Established {
        role,
        final_key: hello.final_key,
        peer_final_key: hello.peer_final_key,
        keys: KeySchedule::new(&hello.channel.tls_exporter, &transcript_hash),
        order: hello.order,
        version: hello.version,
        channel: hello.channel,
        transcript_hash,
        peer_claims,
        mode: hello.mode,
        streams: hello.streams,
        manifest,
        manifest_root,
    }
}

/// The qualifying data of the destination's handshake quote (SPEC.md §5.2 D11, checked at
/// S7): the source's nonce, the channel, the order and the destination's identity.
fn destination_qualifying_data(hello: &Hello, destination: &AgentId) -> Digest {
    qualifying_data(
        HANDSHAKE_LABEL,
        &hello.nonce_s,
        &hello.channel.tls_exporter,
        hello.order.id(),
        destination,
    )
}

/// The qualifying data of the source's handshake quote (SPEC.md §5.2 S4, checked at D7): the
/// destination's nonce, the channel, the order, the source's identity and its final key.
fn source_qualifying_data(hello: &Hello, source: &AgentId, final_key: &[u8; 32]) -> Digest {
    source_handshake_qualifying_data(
        &hello.nonce_d,
        &hello.channel.tls_exporter,
        hello.order.id(),
        source,
        final_key,
    )
}

/// What the destination knows before the handshake.
pub struct DestinationConfig {
    /// Operator keys allowed to sign orders.
    pub operators: Vec<[u8; 32]>,
    /// Current UNIX time, seconds.
    pub now: u64,
}

enum DestState {
    AwaitClientHello(Box<DestinationConfig>),
    AwaitSourceEvidence(Box<Hello>),
    AwaitFinished(Box<Established>),
    Done(Box<Established>),
    Taken,
}

impl DestState {
    /// The message this state waits for, for errors.
    fn expects(&self) -> &'static str {
        match self {
            Self::AwaitClientHello(_) => "client-hello",
            Self::AwaitSourceEvidence(_) => "source-evidence",
            Self::AwaitFinished(_) => "finished",
            Self::Done(_) | Self::Taken => "nothing (handshake complete)",
        }
    }
}

/// The destination's side of the handshake.
pub struct DestinationHandshake {
    state: Result<DestState, Error>,
    channel: ChannelBinding,
    nonce: [u8; 32],
}

impl DestinationHandshake {
    /// A destination waiting for `ClientHello`; `nonce` must be fresh random.
    pub fn new(config: DestinationConfig, channel: ChannelBinding, nonce: [u8; 32]) -> Self {
        Self {
            state: Ok(DestState::AwaitClientHello(Box::new(config))),
            channel,
            nonce,
        }
    }

    /// Whether the handshake completed.
    pub fn is_done(&self) -> bool {
        matches!(self.state, Ok(DestState::Done(_)))
    }

    /// What this destination's handshake quote covers, from the accepted `ClientHello` until
    /// `SourceEvidence` arrives: everything in it (the source's nonce, the TLS exporter, the
    /// order, this agent's identity) is known by then. So the driver may take the quote early,
    /// while the source takes its own (a hardware TPM signs in 100–600 ms, and the two quotes
    /// need not wait for each other), and hand it to [`Self::handle`] through an attester that
    /// answers this qualifying data with it. The quote is still sent only after the source's
    /// evidence verified.
    pub fn evidence_qualifying_data(&self) -> Option<Digest> {
        match &self.state {
            Ok(DestState::AwaitSourceEvidence(hello)) => {
                Some(destination_qualifying_data(hello, &hello.channel.local))
            }
            _ => None,
        }
    }

    /// The verified order, once the `ClientHello` was accepted (for logs and journals).
    pub fn order(&self) -> Option<&VerifiedOrder> {
        match &self.state {
            Ok(DestState::AwaitSourceEvidence(h)) => Some(&h.order),
            Ok(DestState::AwaitFinished(e)) | Ok(DestState::Done(e)) => Some(&e.order),
            _ => None,
        }
    }

    /// Feed one received message; returns the messages to send, in order.
    pub fn handle(
        &mut self,
        msg: &[u8],
        attester: &mut dyn Attester,
        verifier: &dyn EvidenceVerifier,
        journal: &mut dyn OrderJournal,
    ) -> Result<Vec<Vec<u8>>, Error> {
        let (channel, nonce) = (&self.channel, self.nonce);
        advance(&mut self.state, DestState::Taken, |state| {
            match (state, decode(msg)?) {
                (DestState::AwaitClientHello(cfg), Message::ClientHello(ch)) => {
                    on_client_hello(&cfg, channel, nonce, ch, msg, journal)
                }
                (
                    DestState::AwaitSourceEvidence(hello),
                    Message::SourceEvidence {
                        evidence,
                        manifest,
                        final_key,
                    },
                ) => on_source_evidence(
                    hello,
                    (evidence, manifest, final_key),
                    msg,
                    attester,
                    verifier,
                ),
                (DestState::AwaitFinished(est), Message::Finished { mac }) => {
                    check_finished(&est, Role::Source, &mac)?;
                    Ok((DestState::Done(est), vec![]))
                }
                (s, m) => Err(unexpected(&m, s.expects())),
            }
        })
    }

    /// The session, once [`Self::is_done`].
    pub fn into_established(self) -> Result<Established, Error> {
        match self.state? {
            DestState::Done(e) => Ok(*e),
            _ => Err(Error::ApiMisuse("handshake not complete")),
        }
    }
}

/// `ClientHello` (SPEC.md §5.2 D1-D6): a common version, an order signed by a trusted operator
/// naming this agent as destination and the TLS peer as source, a sane mode; the order's id
/// claimed last, so that a hello refused for another reason does not burn it.
fn on_client_hello(
    cfg: &DestinationConfig,
    channel: &ChannelBinding,
    nonce_d: [u8; 32],
    ch: ClientHello,
    raw: &[u8],
    journal: &mut dyn OrderJournal,
) -> Result<(DestState, Vec<Vec<u8>>), Error> {
    let version = best_common(&ch.versions).ok_or_else(|| no_common_version(&ch.versions))?;
    let order = ch.order.verify(&OrderPolicy {
        operators: &cfg.operators,
        me: channel.local,
        role: Role::Destination,
        now: cfg.now,
    })?;
    check_peer(channel, Role::Source, &order.body().source)?;
    check_mode(&ch.mode, ch.streams)?;
    journal.claim(order.body(), &order.signed().operator)?;
    let mut transcript = Transcript::new();
    transcript.add(raw);
    let out = Message::ServerHello(ServerHello {
        version,
        versions: SUPPORTED_VERSIONS.to_vec(),
        nonce: nonce_d,
    })
    .encode();
    transcript.add(&out);
    let hello = Hello {
        order,
        channel: channel.clone(),
        nonce_s: ch.nonce,
        nonce_d,
        final_key: None,
        peer_final_key: None,
        mode: ch.mode,
        streams: ch.streams,
        version,
        transcript,
    };
    Ok((DestState::AwaitSourceEvidence(Box::new(hello)), vec![out]))
}

/// `SourceEvidence` (SPEC.md §5.2 D7-D11): the source's quote over this agent's nonce, the
/// channel and the final key; the manifest it sent is the one it measured, fits the streams and
/// names the order's VM. Then this agent's own quote and `Finished`.
fn on_source_evidence(
    mut hello: Box<Hello>,
    (evidence, manifest, final_key): (Vec<u8>, Vec<u8>, [u8; 32]),
    raw: &[u8],
    attester: &mut dyn Attester,
    verifier: &dyn EvidenceVerifier,
) -> Result<(DestState, Vec<Vec<u8>>), Error> {
    // The quote vouches for the final key only through its qualifying data.
    let qd = source_qualifying_data(&hello, &hello.channel.peer, &final_key);
    let claims = verifier.verify(&evidence, &qd, &hello.channel.peer)?;
    hello.peer_final_key = Some(final_key);
    let root = manifest_root(&manifest);
    if claims.image_manifest().is_none_or(|r| !ct_eq(r, &root)) {
        return Err(PeerMisbehaved::ManifestMismatch.into());
    }
    let parsed: ImageManifest = codec::decode(&manifest)?;
    check_streams(&hello.mode, hello.streams, &parsed)?;
    if parsed.vm != hello.order.body().vm {
        return Err(PeerMisbehaved::BadField(format!(
            "manifest is for VM {:?}, the order for {:?}",
            parsed.vm,
            hello.order.body().vm
        ))
        .into());
    }
    hello.transcript.add(raw);
    let ev = Message::DestinationEvidence {
        evidence: attester.quote(&destination_qualifying_data(&hello, &hello.channel.local))?,
    }
    .encode();
    hello.transcript.add(&ev);
    let est = establish(*hello, Role::Destination, claims, (parsed, root));
    let fin = Message::Finished {
        mac: est
            .keys
            .finished_mac(Role::Destination, &est.transcript_hash),
    }
    .encode();
    Ok((DestState::AwaitFinished(Box::new(est)), vec![ev, fin]))
}
