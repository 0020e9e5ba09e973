//! The seam between the protocol and a TPM. spec: SPEC.md §6
//!
//! `trustmig-attest` implements these traits with a real TPM (tss-esapi) and a pure-Rust
//! verifier; the protocol only sees opaque evidence bytes and the measurements a verifier
//! vouches for. Keeping them traits keeps this crate free of FFI, so it fuzzes anywhere.

use serde::{Deserialize, Serialize};

use crate::{sha256, AgentId, Digest};

/// Domain label of the handshake quote's qualifying data. spec: SPEC.md §6.1
pub const HANDSHAKE_LABEL: &[u8] = b"trustmig attest v1";
/// Domain label of the final (switch-over) quote's qualifying data. spec: SPEC.md §6.1
pub const FINAL_LABEL: &[u8] = b"trustmig final v1";

/// One measured event, as extended into the agent's PCR and recorded in its event log.
/// spec: SPEC.md §6.2
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Measurement {
    /// SHA-256 of the agent executable, measured at start.
    AgentExecutable(#[serde(with = "serde_bytes")] Digest),
    /// SHA-256 of the agent's configuration file, measured at start.
    AgentConfig(#[serde(with = "serde_bytes")] Digest),
    /// Root of the image manifest the source is about to send.
    ImageManifest(#[serde(with = "serde_bytes")] Digest),
    /// The final image digest of a migration, extended at switch-over.
    MigrationFinal(#[serde(with = "serde_bytes")] Digest),
}

impl Measurement {
    /// The 32 bytes this event extends into the PCR: SHA-256(kind label || value).
    /// spec: SPEC.md §6.2 (the label keeps one kind of event from standing in for another)
    pub fn pcr_digest(&self) -> Digest {
        let (label, value): (&[u8], &Digest) = match self {
            Self::AgentExecutable(d) => (b"trustmig event agent-executable", d),
            Self::AgentConfig(d) => (b"trustmig event agent-config", d),
            Self::ImageManifest(d) => (b"trustmig event image-manifest", d),
            Self::MigrationFinal(d) => (b"trustmig event migration-final", d),
        };
        sha256(&[label, value])
    }
}

/// What a verifier vouches for after a quote checked out: the replayed event log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    /// Every event of the peer's log, in order; their replay matched the quoted PCR.
    pub measurements: Vec<Measurement>,
}

impl Claims {
    /// The last image-manifest root in the log, if any.
    pub fn image_manifest(&self) -> Option<&Digest> {
        self.measurements.iter().rev().find_map(|m| match m {
            Measurement::ImageManifest(d) => Some(d),
            _ => None,
        })
    }

    /// The last final-migration digest in the log, if any.
    pub fn migration_final(&self) -> Option<&Digest> {
        self.measurements.iter().rev().find_map(|m| match m {
            Measurement::MigrationFinal(d) => Some(d),
            _ => None,
        })
    }
}

/// A failed attestation operation, with the reason in words. The attest crate keeps its own
/// typed errors; at this seam they become one abort code plus a message naming the mismatch.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct AttestationError {
    /// What went wrong, for logs and the operator (never contains secrets).
    pub reason: String,
}

impl AttestationError {
    /// Wrap a displayable error.
    pub fn new(reason: impl std::fmt::Display) -> Self {
        Self {
            reason: reason.to_string(),
        }
    }
}

/// The local TPM: extends measurements and quotes over qualifying data.
pub trait Attester {
    /// Extend `m` into the measurement PCR and append it to the event log.
    fn extend(&mut self, m: &Measurement) -> Result<(), AttestationError>;
    /// Quote the measurement PCR with `qualifying_data`; returns the encoded evidence
    /// (quote, signature, AK public key, event log).
    fn quote(&mut self, qualifying_data: &Digest) -> Result<Vec<u8>, AttestationError>;
}

/// Checks a peer's evidence. Implementations fail closed: any doubt is an error.
pub trait EvidenceVerifier {
    /// Verify `evidence` was produced by a trusted TPM for `peer` over exactly
    /// `qualifying_data`, that its event log replays to the quoted PCR, and that policy
    /// allows what it measured.
    fn verify(
        &self,
        evidence: &[u8],
        qualifying_data: &Digest,
        peer: &AgentId,
    ) -> Result<Claims, AttestationError>;
}

/// Qualifying data for a quote. spec: SPEC.md §6.1
///
/// `SHA-256(label || peer_nonce || tls_exporter || order_id || own_identity)`
pub fn qualifying_data(
    label: &[u8],
    peer_nonce: &[u8; 32],
    tls_exporter: &[u8; 32],
    order_id: &[u8; 16],
    own_identity: &AgentId,
) -> Digest {
    sha256(&[label, peer_nonce, tls_exporter, order_id, own_identity])
}
