//! The synthetic guest backend: a VM whose memory lives in the agent (`crate::guest`), moved
//! page by page by the protocol's pre-copy engines over N sealed data streams.
//! spec: SPEC.md §8.1–8.6

mod dest;
mod source;

pub(crate) use dest::SyntheticDest;
pub(crate) use source::SyntheticSource;
