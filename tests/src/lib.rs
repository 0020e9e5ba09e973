//! Test helpers shared by the system tests (`agent/tests/`): a man-in-the-middle TCP proxy
//! that can cut, corrupt, replay, drop or reorder the sealed records of data streams, and raw
//! protocol peers that play an agent by hand.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod peer;
pub mod proxy;
