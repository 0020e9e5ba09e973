//! Test helpers shared by the system tests (`agent/tests/`): a man-in-the-middle TCP proxy
//! that can cut, corrupt, replay, drop or reorder the sealed records of data streams.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod proxy;
