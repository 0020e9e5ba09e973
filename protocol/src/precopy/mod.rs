//! Pre-copy live migration engines over a [`GuestMemory`]. spec: SPEC.md §8
//!
//! The source sends every non-zero page in round 0, then the pages dirtied during the previous
//! round, until the predicted downtime (remaining dirty bytes / measured bandwidth) is under the
//! order's target or the rounds run out; then it pauses the guest and sends what is left
//! (stop-and-copy). Pages travel in batches confined to one 64-page chunk, and a chunk always
//! travels on the same stream, so the copies of one page can never overtake each other.

mod batch;
mod dest;
mod digest;
mod memory;
mod source;

pub use batch::{decode_batch, PageKind, PageRef, BATCH_HEADER, MAX_BATCH_PAGES, PAGE_HEADER};
pub use dest::{PrecopyDest, MAX_DEVICE_STATE};
pub use digest::{final_digest, page_digest, PageDigests};
pub use memory::{DirtyBitmap, GuestMemory};
pub use source::{
    predicted_downtime_ms, Batch, PrecopySource, RoundDecision, RoundStats, SourceStats,
    THROTTLE_STEPS,
};

/// Pages per chunk; a chunk is the unit of batching and of stream assignment.
pub const CHUNK_PAGES: u64 = 64;

/// The stream that carries page `pfn` when there are `streams` streams. spec: SPEC.md §8.2
pub fn stream_for(pfn: u64, streams: u16) -> u16 {
    ((pfn / CHUNK_PAGES) % u64::from(streams.max(1))) as u16
}

/// Pre-copy failures.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PrecopyError {
    /// A page batch is malformed.
    #[error("malformed page batch: {0}")]
    BadBatch(String),
    /// A page number beyond the guest.
    #[error("page {pfn} is outside the guest ({page_count} pages)")]
    OutOfBounds {
        /// The offending page number.
        pfn: u64,
        /// Guest size in pages.
        page_count: u64,
    },
    /// A page arrived on a stream that does not carry its chunk.
    #[error("page {pfn} arrived on stream {stream}, its chunk belongs to stream {expected}")]
    WrongStream {
        /// Page number.
        pfn: u64,
        /// Stream it came on.
        stream: u16,
        /// Stream it belongs to.
        expected: u16,
    },
    /// Geometry disagreement between the memory backend and the session.
    #[error("guest geometry mismatch: {0}")]
    Geometry(String),
    /// Pre-copy did not converge and the order says abort.
    #[error("did not converge in {rounds} rounds (last predicted downtime {predicted_ms} ms, target {target_ms} ms); order says abort")]
    NotConverged {
        /// Rounds done.
        rounds: u32,
        /// Last predicted downtime.
        predicted_ms: u64,
        /// The order's target.
        target_ms: u32,
    },
    /// The memory backend failed.
    #[error("guest memory backend: {0}")]
    Memory(String),
    /// The source ended its streams without sending the device state (the peer's fault, not
    /// this agent's).
    #[error("the source ended its streams without sending the device state")]
    NoDeviceState,
    /// Called in the wrong phase.
    #[error("pre-copy API misuse: {0}")]
    Misuse(&'static str),
}
