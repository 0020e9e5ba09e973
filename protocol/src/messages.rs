//! Control-channel messages (carried inside TLS). spec: SPEC.md §4, messages.cddl
//!
//! A frame is a 4-byte big-endian length followed by the CBOR of one [`Message`]; the length is
//! at most [`crate::codec::MAX_CBOR_SIZE`].

use serde::{Deserialize, Serialize};

use crate::codec::{self, CodecError, MAX_CBOR_SIZE};
use crate::error::AbortCode;
use crate::order::SignedOrder;
use crate::Digest;

/// Frame length prefix size.
pub const FRAME_HEADER: usize = 4;
/// Most data streams a session may open. spec: SPEC.md §9
pub const MAX_STREAMS: u16 = 16;

/// Source -> destination: opens the handshake.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientHello {
    /// Versions the source speaks, highest first.
    pub versions: Vec<u16>,
    /// Fresh 32-byte nonce for the destination's quote.
    #[serde(with = "serde_bytes")]
    pub nonce: [u8; 32],
    /// The signed order.
    pub order: SignedOrder,
    /// How the VM state travels.
    pub mode: TransferMode,
    /// Number of data streams the source will open (1..=[`MAX_STREAMS`]).
    pub streams: u16,
}

/// How VM state travels on the data streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum TransferMode {
    /// trustmig's own pre-copy engine over a guest-memory backend.
    Precopy {
        /// Guest page size in bytes.
        page_size: u32,
        /// Number of guest pages.
        page_count: u64,
    },
    /// An opaque hypervisor stream (QEMU's migration stream) on stream 0; each mirrored disk
    /// of the manifest on its own stream after it (spec/qemu.md §5).
    HypervisorStream,
}

/// Destination -> source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerHello {
    /// Chosen version.
    pub version: u16,
    /// Every version the destination speaks (lets the source detect a downgrade).
    pub versions: Vec<u16>,
    /// Fresh 32-byte nonce for the source's quote.
    #[serde(with = "serde_bytes")]
    pub nonce: [u8; 32],
}

/// Every control message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Message {
    /// Handshake 1 (S->D).
    ClientHello(ClientHello),
    /// Handshake 2 (D->S).
    ServerHello(ServerHello),
    /// Handshake 3 (S->D): source evidence and the image manifest it covers.
    SourceEvidence {
        /// Opaque evidence from the source's attester.
        #[serde(with = "serde_bytes")]
        evidence: Vec<u8>,
        /// CBOR of the image manifest; its root is in the source's event log.
        #[serde(with = "serde_bytes")]
        manifest: Vec<u8>,
        /// The source's ephemeral final-signature key (ed25519), bound into the qualifying
        /// data of `evidence` (SPEC.md §8.7).
        #[serde(with = "serde_bytes")]
        final_key: [u8; 32],
    },
    /// Handshake 4 (D->S): destination evidence.
    DestinationEvidence {
        /// Opaque evidence from the destination's attester.
        #[serde(with = "serde_bytes")]
        evidence: Vec<u8>,
    },
    /// Handshake 5/6: key confirmation over the transcript.
    Finished {
        /// HMAC of the transcript hash under the sender's confirm key.
        #[serde(with = "serde_bytes")]
        mac: [u8; 32],
    },
    /// Progress (S->D, informational): a pre-copy round ended.
    RoundDone {
        /// Round number (0-based).
        round: u32,
        /// Records sent on each stream so far.
        stream_records: Vec<u64>,
    },
    /// S->D: the VM is paused and every page and the device state are on the streams.
    SwitchOver {
        /// Total records sent on each stream, including `StreamEnd`.
        stream_records: Vec<u64>,
        /// The guest was stopped when its switch-over began, not by the migration (paused at
        /// the claim, or by someone else during pre-copy): the destination hands it over
        /// paused, as it was, instead of resuming it (absent when false).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        paused: bool,
    },
    /// D->S: everything arrived; quote your final digest with this fresh nonce.
    FinalChallenge {
        /// Fresh nonce.
        #[serde(with = "serde_bytes")]
        nonce: [u8; 32],
    },
    /// S->D: final image digest, signed by the source's attested final key; in strict mode
    /// also extended into the source TPM and quoted (SPEC.md §8.7).
    FinalEvidence {
        /// The final image digest.
        #[serde(with = "serde_bytes")]
        digest: Digest,
        /// ed25519 signature by the final key (`finalsig::signing_input`).
        #[serde(with = "serde_bytes")]
        signature: Vec<u8>,
        /// Strict mode: evidence over the final qualifying data, quoted before `Ready`.
        #[serde(default, with = "serde_bytes", skip_serializing_if = "Option::is_none")]
        evidence: Option<Vec<u8>>,
    },
    /// D->S: final evidence verified and the digest matches; ready to resume.
    Ready,
    /// S->D: the source has journalled the commit; resume.
    Commit,
    /// D->S: the VM runs on the destination.
    Resumed,
    /// S->D, after `Resumed` (not in strict mode): the final digest extended into the source
    /// TPM and quoted over the final qualifying data, the record's evidence (SPEC.md §8.7).
    FinalQuote {
        /// Evidence over the final qualifying data.
        #[serde(with = "serde_bytes")]
        evidence: Vec<u8>,
    },
    /// S->D, first and only message on a fresh control connection (SPEC.md §8.8): the source
    /// journalled COMMIT but lost the session; what became of this order on the destination?
    SettleQuery {
        /// The order in doubt.
        #[serde(with = "serde_bytes")]
        order_id: [u8; 16],
    },
    /// D->S: the destination's journalled answer. `committed = false` also means the
    /// destination can no longer commit this order (it journalled it rolled back).
    SettleAnswer {
        /// The order asked about.
        #[serde(with = "serde_bytes")]
        order_id: [u8; 16],
        /// Whether the destination journalled COMMIT (it owns the VM).
        committed: bool,
    },
    /// Either way: the migration is over, unsuccessfully.
    Abort {
        /// Abort code.
        code: AbortCode,
        /// Human-readable reason (no secrets).
        reason: String,
    },
}

impl Message {
    /// Short name, for errors.
    pub fn name(&self) -> &'static str {
        match self {
            Self::ClientHello(_) => "client-hello",
            Self::ServerHello(_) => "server-hello",
            Self::SourceEvidence { .. } => "source-evidence",
            Self::DestinationEvidence { .. } => "destination-evidence",
            Self::Finished { .. } => "finished",
            Self::RoundDone { .. } => "round-done",
            Self::SwitchOver { .. } => "switch-over",
            Self::FinalChallenge { .. } => "final-challenge",
            Self::FinalEvidence { .. } => "final-evidence",
            Self::Ready => "ready",
            Self::Commit => "commit",
            Self::Resumed => "resumed",
            Self::FinalQuote { .. } => "final-quote",
            Self::SettleQuery { .. } => "settle-query",
            Self::SettleAnswer { .. } => "settle-answer",
            Self::Abort { .. } => "abort",
        }
    }

    /// CBOR encoding (without the frame header).
    pub fn encode(&self) -> Vec<u8> {
        codec::encode(self)
    }

    /// Decode one message body.
    pub fn decode(bytes: &[u8]) -> Result<Self, CodecError> {
        codec::decode(bytes)
    }

    /// Length-prefixed frame.
    pub fn to_frame(&self) -> Vec<u8> {
        frame(&self.encode())
    }
}

/// Most characters of a peer's `abort` reason an agent keeps (its own are at most 200).
pub const MAX_PEER_REASON: usize = 500;

/// A peer's `abort` reason as an agent keeps it (logs, status, journal, summaries): a peer,
/// perhaps compromised, may fill a frame with text, so it is clipped to [`MAX_PEER_REASON`]
/// characters (marked), and control characters (a forged log line, a terminal escape) become
/// U+FFFD.
pub fn peer_reason(reason: &str) -> String {
    let mut out: String = (reason.chars().take(MAX_PEER_REASON))
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect();
    if reason.chars().nth(MAX_PEER_REASON).is_some() {
        out.push_str(" [clipped]");
    }
    out
}

/// Prefix `body` with its length.
pub fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_HEADER + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Parse a frame header; the length is bounded before anything is allocated.
pub fn frame_len(header: [u8; FRAME_HEADER]) -> Result<usize, CodecError> {
    let n = u32::from_be_bytes(header) as usize;
    if n > MAX_CBOR_SIZE {
        return Err(CodecError::TooLarge(n));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peers_reason_is_clipped_and_cannot_forge_lines() {
        assert_eq!(peer_reason("digest mismatch"), "digest mismatch");
        assert_eq!(
            peer_reason("a\nINFO forged\x1b[2J"),
            "a\u{fffd}INFO forged\u{fffd}[2J"
        );
        let long = "é".repeat(MAX_PEER_REASON + 1);
        let kept = peer_reason(&long);
        assert!(kept.ends_with(" [clipped]"));
        assert_eq!(kept.chars().filter(|c| *c == 'é').count(), MAX_PEER_REASON);
        assert_eq!(
            peer_reason(&long[..2 * MAX_PEER_REASON]),
            long[..2 * MAX_PEER_REASON]
        );
    }
}
