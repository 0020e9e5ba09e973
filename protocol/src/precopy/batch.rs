//! Page batch payload of a `Pages` record. spec: SPEC.md §8.2
//!
//! ```text
//! u32 count (1..=64)                      big-endian
//! count x { u64 pfn, u8 kind, [page_size bytes if kind = 1] }
//! ```
//! kind 0 = zero page (no data), 1 = raw page. Page numbers strictly increase and lie in one
//! 64-page chunk. Decoding validates the whole batch before anything is written.

use super::{PrecopyError, CHUNK_PAGES};

/// Bytes before the first page entry.
pub const BATCH_HEADER: usize = 4;
/// Bytes of an entry before its data.
pub const PAGE_HEADER: usize = 9;
/// Most pages per batch (one chunk).
pub const MAX_BATCH_PAGES: usize = CHUNK_PAGES as usize;

/// How a page travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageKind {
    /// All zero; no data follows.
    Zero = 0,
    /// Raw contents follow.
    Raw = 1,
}

/// One decoded page entry.
#[derive(Debug, PartialEq, Eq)]
pub struct PageRef<'a> {
    /// Page number.
    pub pfn: u64,
    /// Contents; `None` for a zero page.
    pub data: Option<&'a [u8]>,
}

/// Write a batch header placeholder; returns its offset for [`finish_batch`].
pub(crate) fn begin_batch(out: &mut Vec<u8>) -> usize {
    let at = out.len();
    out.extend_from_slice(&0u32.to_be_bytes());
    at
}

pub(crate) fn push_entry_header(out: &mut Vec<u8>, pfn: u64, kind: PageKind) {
    out.extend_from_slice(&pfn.to_be_bytes());
    out.push(kind as u8);
}

pub(crate) fn finish_batch(out: &mut [u8], at: usize, count: u32) {
    out[at..at + 4].copy_from_slice(&count.to_be_bytes());
}

/// Decode and validate a whole batch.
pub fn decode_batch(payload: &[u8], page_size: usize) -> Result<Vec<PageRef<'_>>, PrecopyError> {
    let bad = |s: String| PrecopyError::BadBatch(s);
    let count = payload
        .get(..BATCH_HEADER)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or_else(|| bad("shorter than its header".into()))?;
    if count == 0 || count > MAX_BATCH_PAGES {
        return Err(bad(format!(
            "page count {count} not in 1..={MAX_BATCH_PAGES}"
        )));
    }
    let mut pages = Vec::with_capacity(count);
    let mut pos = BATCH_HEADER;
    let mut prev: Option<u64> = None;
    for i in 0..count {
        let h = payload
            .get(pos..pos + PAGE_HEADER)
            .ok_or_else(|| bad(format!("truncated at entry {i}")))?;
        let pfn = u64::from_be_bytes(h[..8].try_into().expect("8 bytes"));
        pos += PAGE_HEADER;
        if let Some(p) = prev {
            if pfn <= p {
                return Err(bad(format!(
                    "page {pfn} does not follow {p} in increasing order"
                )));
            }
            if pfn / CHUNK_PAGES != p / CHUNK_PAGES {
                return Err(bad(format!("pages {p} and {pfn} are in different chunks")));
            }
        }
        prev = Some(pfn);
        let data = match h[8] {
            0 => None,
            1 => {
                let d = payload
                    .get(pos..pos + page_size)
                    .ok_or_else(|| bad(format!("page {pfn} data truncated")))?;
                pos += page_size;
                Some(d)
            }
            k => return Err(bad(format!("unknown page kind {k}"))),
        };
        pages.push(PageRef { pfn, data });
    }
    if pos != payload.len() {
        return Err(bad(format!("{} trailing bytes", payload.len() - pos)));
    }
    Ok(pages)
}
