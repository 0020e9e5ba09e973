//! trustmig-agent: the `trustmig` binary's library. tokio, rustls, the agent home, the
//! journal, guest backends, and the drivers that run the sans-IO protocol state machines.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod attestation;
pub mod backend;
mod backoff;
pub mod bench;
pub mod channel;
pub mod config;
pub mod control;
pub mod daemon;
pub mod demo;
pub mod driver;
pub mod error;
pub mod fault;
pub mod guest;
pub mod harness;
pub mod home;
pub mod identity;
pub mod journal;
pub mod progress;
pub mod reconcile;
pub mod settle;

pub mod tls;
pub mod trust;
pub mod wire;

pub use error::AgentError;

/// Current UNIX time in seconds (the agent owns the clock; the protocol takes it as input).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `n` fresh random bytes from the OS.
pub fn random<const N: usize>() -> [u8; N] {
    use ring::rand::SecureRandom;
    let mut b = [0u8; N];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .expect("the OS random number generator is available");
    b
}
