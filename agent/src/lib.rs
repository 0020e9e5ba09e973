//! trustmig-agent: the `trustmig` binary's library. tokio, rustls, the agent home, the
//! journal, VM backends, and the drivers that run the sans-IO protocol state machines. The
//! architecture, and which files a change of each kind touches: spec/architecture.md.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

// The migration: one driver per side (order, channel, attestation, commit, settlement) over
// the VM backends (synthetic guest, QEMU).
pub mod backend;
pub mod driver;

// What a running agent holds, and the process around it.
pub mod ctx;
pub mod daemon;
pub mod error;
pub mod fault;
/// The synthetic guest: the in-process "hypervisor" the synthetic backend drives.
pub mod guest;

// The network: TLS identities and framing.
pub mod net;

// What is kept on disk: home, configuration, identity, trust store, journal, audit trail.
pub mod audit;
pub mod config;
pub mod home;
pub mod identity;
pub mod journal;
pub mod trust;

// The operator's side: local control socket, progress display, administration, attestation
// setup, demo and benchmarks (and the two-agent harness they share with the tests).
pub mod admin;
pub mod attestation;
pub mod bench;
pub mod control;
pub mod demo;
pub mod doctor;
pub mod harness;
pub mod metrics;
pub mod progress;

mod backoff;

pub use error::AgentError;

/// Current UNIX time in seconds (the agent owns the clock; the protocol takes it as input).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `n` fresh random bytes from the OS (for what is not secret: returned by value, copies of
/// them may stay behind; a secret is drawn into its own place with [`fill_random`]).
pub fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    fill_random(&mut b);
    b
}

/// Fill `buf` with fresh random bytes from the OS, in place.
pub fn fill_random(buf: &mut [u8]) {
    use ring::rand::SecureRandom;
    ring::rand::SystemRandom::new()
        .fill(buf)
        .expect("the OS random number generator is available");
}
