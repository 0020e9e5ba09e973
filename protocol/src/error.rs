//! Layered errors and their one mapping to wire abort codes. spec: SPEC.md §10

use serde::{Deserialize, Serialize};

use crate::attestation::AttestationError;
use crate::codec::CodecError;
use crate::order::OrderError;
use crate::precopy::PrecopyError;
use crate::record::RecordError;

/// Every way the protocol can fail. Fatal errors are sticky: a state machine that returned one
/// returns it again on every later call.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The peer sent bytes that do not decode or exceed a limit.
    #[error("invalid message from peer: {0}")]
    InvalidMessage(#[from] CodecError),
    /// The peer sent a well-formed message that breaks the protocol.
    #[error("peer misbehaved: {0}")]
    PeerMisbehaved(PeerMisbehaved),
    /// The order was refused.
    #[error("order refused: {0}")]
    Order(#[from] OrderError),
    /// A data record was refused; the session is over.
    #[error("record refused: {0}")]
    Record(#[from] RecordError),
    /// Attestation of the peer (or of ourselves) failed.
    #[error("attestation failed: {0}")]
    Attestation(#[from] AttestationError),
    /// The pre-copy engine failed or was given bad pages.
    #[error("pre-copy: {0}")]
    Precopy(#[from] PrecopyError),
    /// The peer aborted the migration.
    #[error("peer aborted with {code:?}: {reason}")]
    PeerAborted {
        /// The peer's abort code.
        code: AbortCode,
        /// The peer's reason.
        reason: String,
    },
    /// The caller used the API out of order (a bug in the driver, not the peer's doing).
    #[error("API misuse: {0}")]
    ApiMisuse(&'static str),
}

/// Protocol violations by a peer whose messages were well-formed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeerMisbehaved {
    /// A message arrived in a state that does not expect it.
    #[error("unexpected {got} while waiting for {expected}")]
    UnexpectedMessage {
        /// Name of the message received.
        got: &'static str,
        /// What the state machine waited for.
        expected: &'static str,
    },
    /// No protocol version in common (the first 16 the peer offers).
    #[error("no common protocol version (peer offers {0:?})")]
    NoCommonVersion(Vec<u16>),
    /// The responder chose a lower version than both support.
    #[error("version downgrade: peer chose {chosen}, best common is {best}")]
    Downgrade {
        /// What the peer chose.
        chosen: u16,
        /// What it should have chosen.
        best: u16,
    },
    /// The TLS peer is not the agent the order names.
    #[error("TLS peer {tls_peer} is not the {role} the order names ({named})")]
    WrongPeer {
        /// Which role was checked.
        role: crate::order::Role,
        /// Hex key of the authenticated TLS peer.
        tls_peer: String,
        /// Hex key named in the order.
        named: String,
    },
    /// Key confirmation MAC did not match: the peers disagree on the transcript or keys.
    #[error("key confirmation failed (transcript or channel binding mismatch)")]
    BadFinished,
    /// The attested image manifest root is not the manifest sent.
    #[error("image manifest does not match the attested manifest root")]
    ManifestMismatch,
    /// The final image digest differs from what the destination received.
    #[error(
        "final image digest mismatch: source attested {attested}, destination computed {computed}"
    )]
    FinalDigestMismatch {
        /// Hex of the digest in the source's evidence.
        attested: String,
        /// Hex of the destination's own digest.
        computed: String,
    },
    /// The final signature does not verify under the ephemeral key the source's handshake
    /// quote vouched for (another key, another digest, another challenge: a replay). SPEC.md §8.7
    #[error("final signature does not verify under the source's attested final key")]
    BadFinalSignature,
    /// A transferred disk chunk is not what the attested image manifest says (hypervisor-stream
    /// mode, SPEC.md §8.5.1): wrong content, too many or too few chunks.
    #[error("disk transfer refused: {0}")]
    DiskMismatch(String),
    /// A field was out of its allowed range.
    #[error("field out of range: {0}")]
    BadField(String),
}

/// Wire abort codes. spec: SPEC.md §10 (values are stable)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[repr(u16)]
#[non_exhaustive]
pub enum AbortCode {
    /// Malformed message.
    DecodeError = 1,
    /// Protocol violation.
    ProtocolViolation = 2,
    /// Order refused (signature, window, role, replay).
    OrderRefused = 3,
    /// Attestation failed.
    AttestationFailed = 4,
    /// Data record failed authentication or sequencing.
    RecordFailure = 5,
    /// Pre-copy failed (bad pages, non-convergence abort).
    MigrationFailed = 6,
    /// Final digest mismatch.
    DigestMismatch = 7,
    /// Local failure at the sender (I/O, TPM, hypervisor).
    InternalError = 8,
    /// The operator cancelled.
    Cancelled = 9,
    /// No common version.
    VersionMismatch = 10,
}

impl From<&Error> for AbortCode {
    fn from(e: &Error) -> Self {
        match e {
            Error::InvalidMessage(_) => Self::DecodeError,
            Error::PeerMisbehaved(PeerMisbehaved::NoCommonVersion(_))
            | Error::PeerMisbehaved(PeerMisbehaved::Downgrade { .. }) => Self::VersionMismatch,
            Error::PeerMisbehaved(PeerMisbehaved::FinalDigestMismatch { .. })
            | Error::PeerMisbehaved(PeerMisbehaved::BadFinalSignature)
            | Error::PeerMisbehaved(PeerMisbehaved::ManifestMismatch)
            | Error::PeerMisbehaved(PeerMisbehaved::DiskMismatch(_)) => Self::DigestMismatch,
            Error::PeerMisbehaved(_) => Self::ProtocolViolation,
            Error::Order(_) => Self::OrderRefused,
            Error::Record(_) => Self::RecordFailure,
            Error::Attestation(_) => Self::AttestationFailed,
            Error::Precopy(_) => Self::MigrationFailed,
            Error::PeerAborted { .. } => Self::Cancelled,
            Error::ApiMisuse(_) => Self::InternalError,
        }
    }
}

impl From<PeerMisbehaved> for Error {
    fn from(p: PeerMisbehaved) -> Self {
        Self::PeerMisbehaved(p)
    }
}
