//! The evidence a `TpmAttester` emits and a `PolicyVerifier` checks. spec: attestation.md §2

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use trustmig_protocol::attestation::Measurement;
use trustmig_protocol::codec::{self, CodecError};

use crate::event_log::{check_log_len, EventLogError};

/// An ECDSA signature as the TPM returns it: big-endian `r` and `s`, at most 32 bytes each.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EcdsaSignature {
    /// `signatureR`.
    pub r: ByteBuf,
    /// `signatureS`.
    pub s: ByteBuf,
}

impl EcdsaSignature {
    /// `r || s`, each left-padded to 32 bytes, as ring's fixed encoding wants; `None` if
    /// either is longer than 32 bytes.
    pub fn to_fixed(&self) -> Option<[u8; 64]> {
        let mut out = [0u8; 64];
        for (i, v) in [&self.r, &self.s].into_iter().enumerate() {
            let pad = 32usize.checked_sub(v.len())?;
            out[i * 32 + pad..(i + 1) * 32].copy_from_slice(v);
        }
        Some(out)
    }
}

/// Evidence: quote, signature, AK public area and event log, CBOR-encoded through the
/// protocol codec.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Evidence {
    /// `TPMS_ATTEST` bytes exactly as the TPM signed them.
    #[serde(with = "serde_bytes")]
    pub quote: Vec<u8>,
    /// ECDSA P-256 signature over SHA-256(`quote`).
    pub signature: EcdsaSignature,
    /// The AK's marshalled `TPMT_PUBLIC` (without the TPM2B size prefix).
    #[serde(with = "serde_bytes")]
    pub ak_public: Vec<u8>,
    /// Every measurement extended into the PCR since it was reset, in order.
    pub event_log: Vec<Measurement>,
}

/// Evidence bytes that could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EvidenceDecodeError {
    /// Not the evidence CBOR structure.
    #[error("evidence is not valid CBOR evidence: {0}")]
    Codec(#[from] CodecError),
    /// The event log is too long.
    #[error(transparent)]
    Log(#[from] EventLogError),
}

impl Evidence {
    /// Encode.
    pub fn to_cbor(&self) -> Vec<u8> {
        codec::encode(self)
    }

    /// Decode, within the codec's limits and [`crate::event_log::MAX_EVENTS`].
    pub fn from_cbor(bytes: &[u8]) -> Result<Self, EvidenceDecodeError> {
        let ev: Self = codec::decode(bytes)?;
        check_log_len(&ev.event_log)?;
        Ok(ev)
    }
}
