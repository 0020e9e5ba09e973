//! trustmig-protocol: the sans-IO core of trustmig.
//!
//! Everything here is pure computation over byte buffers: no sockets, no clock reads, no RNG
//! reads, no TPM. Time and randomness are arguments; attestation enters through the
//! [`attestation::Attester`] and [`attestation::EvidenceVerifier`] traits. The normative text is
//! `spec/SPEC.md`; items point at the section they implement.
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![warn(unreachable_pub)]

pub mod attestation;
pub mod codec;
pub mod commit;
pub mod error;
pub mod finalsig;
pub mod handshake;
pub mod history;
pub mod hvstream;
pub mod keys;
mod machine;
pub mod manifest;
pub mod messages;
pub mod migration;
pub mod order;
pub mod precopy;
pub mod rate;
pub mod record;
pub mod settlement;

#[cfg(feature = "testing")]
pub mod fuzzing;
#[cfg(feature = "testing")]
pub mod testing;

pub use error::{AbortCode, Error};

/// Protocol versions this implementation speaks, highest first. spec: SPEC.md §5.1
pub const SUPPORTED_VERSIONS: &[u16] = &[1];

/// An agent's public identity: its ed25519 public key (also the key in its TLS certificate).
pub type AgentId = [u8; 32];

/// A SHA-256 (or BLAKE3 where the spec says so) digest.
pub type Digest = [u8; 32];

/// Compare two byte strings in constant time (for MACs and digests an attacker can probe).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// SHA-256 over the concatenation of `parts`.
pub fn sha256(parts: &[&[u8]]) -> Digest {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(p);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}
