//! trustmig-attest: TPM attestation for trustmig. spec: spec/attestation.md
//!
//! - [`tpm`] (feature `tpm`): TPM access via tss-esapi, the persistent AK, [`tpm::TpmAttester`].
//! - [`verify`]: [`verify::PolicyVerifier`], the pure-Rust verifier (ring; no FFI).
//! - [`quote`], [`public`], [`evidence`], [`event_log`], [`policy`]: the formats it checks.
//! - [`enroll`]: MakeCredential/ActivateCredential enrollment into the trust store.
//! - [`manifest`]: image manifests from files and the streaming [`manifest::ChunkChecker`].
//! - [`swtpm`] (feature `swtpm-harness`): a software TPM for tests and demos; [`loopback`]: the
//!   ports it and the harness's agents bind.
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![warn(unreachable_pub)]

pub mod enroll;
pub mod event_log;
pub mod evidence;
#[cfg(feature = "swtpm-harness")]
pub mod loopback;
pub mod manifest;
pub mod policy;
pub mod public;
pub mod quote;
#[cfg(feature = "swtpm-harness")]
pub mod slowtpm;
#[cfg(feature = "swtpm-harness")]
pub mod swtpm;
#[cfg(feature = "tpm")]
pub mod tpm;
pub mod verify;
pub mod wire;
pub mod x509;

#[doc(hidden)]
pub mod fuzzing;

pub use enroll::{EnrollChallenge, EnrollError, EnrollRequest, EnrollResponse, Enroller};
pub use evidence::Evidence;
pub use policy::{Policy, PolicyError, TrustedAk};
pub use verify::{PolicyVerifier, VerifyError};
