//! The measurement event log: CBOR encoding and replay to a PCR value. spec: attestation.md §5

use trustmig_protocol::attestation::Measurement;
use trustmig_protocol::codec::{self, CodecError};
use trustmig_protocol::{sha256, Digest};

/// Most events one log may hold (an agent extends a handful per migration).
pub const MAX_EVENTS: usize = 256;

/// An event log that was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EventLogError {
    /// More than [`MAX_EVENTS`] events.
    #[error("event log has {0} events, more than the {MAX_EVENTS} allowed")]
    TooLong(usize),
    /// Not a CBOR array of measurements.
    #[error("event log is not valid CBOR: {0}")]
    Codec(#[from] CodecError),
}

pub(crate) fn check_log_len(log: &[Measurement]) -> Result<(), EventLogError> {
    if log.len() > MAX_EVENTS {
        return Err(EventLogError::TooLong(log.len()));
    }
    Ok(())
}

/// Encode a log as a CBOR array.
pub fn encode(log: &[Measurement]) -> Vec<u8> {
    codec::encode(&log)
}

/// Decode a CBOR array of measurements.
pub fn decode(bytes: &[u8]) -> Result<Vec<Measurement>, EventLogError> {
    let log: Vec<Measurement> = codec::decode(bytes)?;
    check_log_len(&log)?;
    Ok(log)
}

/// The PCR value after a reset to zero and extending each event's `pcr_digest()` in order:
/// `pcr = SHA-256(pcr || event.pcr_digest())`.
pub fn replay(log: &[Measurement]) -> Digest {
    replay_prefixes(log).last().copied().unwrap_or([0; 32])
}

/// PCR values after 0, 1, ..., n events (n + 1 values).
pub fn replay_prefixes(log: &[Measurement]) -> Vec<Digest> {
    let mut pcr = [0u8; 32];
    let mut out = Vec::with_capacity(log.len() + 1);
    out.push(pcr);
    for m in log {
        pcr = sha256(&[&pcr, &m.pcr_digest()]);
        out.push(pcr);
    }
    out
}

/// `pcrDigest` of a quote over one SHA-256 PCR holding `pcr`: SHA-256(pcr).
pub fn quoted_digest(pcr: &Digest) -> Digest {
    sha256(&[pcr])
}
