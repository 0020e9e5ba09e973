//! Test helpers shared by the system tests (`agent/tests/`): a man-in-the-middle TCP proxy
//! that can cut, corrupt, replay, drop or reorder the sealed records of data streams, raw
//! protocol peers that play an agent by hand, a reader of an agent's metrics, and the model of commit and settlement that
//! `tests/model.rs` checks.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod metrics;
pub mod model;
pub mod peer;
pub mod proxy;
