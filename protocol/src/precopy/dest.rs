//! The destination's pre-copy engine. spec: SPEC.md §8.2, §8.5

use super::batch::decode_batch;
use super::digest::{final_digest, PageDigests};
use super::memory::GuestMemory;
use super::{stream_for, PrecopyError};
use crate::Digest;

/// Largest device-state blob accepted. spec: SPEC.md §9
pub const MAX_DEVICE_STATE: usize = 1 << 20;

/// The destination engine: validates every batch in full, then writes it into guest memory.
pub struct PrecopyDest {
    page_size: usize,
    page_count: u64,
    streams: u16,
    digests: PageDigests,
    device_state: Option<Vec<u8>>,
    pages_written: u64,
    failed: Option<PrecopyError>,
}

impl PrecopyDest {
    /// An engine for the geometry agreed in the handshake; `mem` must match it and start zeroed.
    pub fn new(
        mem: &dyn GuestMemory,
        page_size: u32,
        page_count: u64,
        streams: u16,
    ) -> Result<Self, PrecopyError> {
        if mem.page_size() != page_size as usize || mem.page_count() != page_count {
            return Err(PrecopyError::Geometry(format!(
                "session says {page_count} pages of {page_size} bytes, local guest has {} of {}",
                mem.page_count(),
                mem.page_size()
            )));
        }
        Ok(Self {
            page_size: page_size as usize,
            page_count,
            streams: streams.max(1),
            digests: PageDigests::new(page_size as usize, page_count),
            device_state: None,
            pages_written: 0,
            failed: None,
        })
    }

    /// Pages written so far.
    pub fn pages_written(&self) -> u64 {
        self.pages_written
    }

    /// Apply one `Pages` record payload that arrived on `stream`. All-or-nothing: nothing is
    /// written unless the whole batch is valid. Errors are sticky.
    pub fn on_pages(
        &mut self,
        mem: &mut dyn GuestMemory,
        stream: u16,
        payload: &[u8],
    ) -> Result<u32, PrecopyError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let r = self.apply(mem, stream, payload);
        if let Err(e) = &r {
            self.failed = Some(e.clone());
        }
        r
    }

    fn apply(
        &mut self,
        mem: &mut dyn GuestMemory,
        stream: u16,
        payload: &[u8],
    ) -> Result<u32, PrecopyError> {
        // Device state may overtake pages of other streams; the final digest is computed only
        // after every stream delivered its StreamEnd, so ordering across streams is moot.
        let pages = decode_batch(payload, self.page_size)?;
        // Bounds and stream checks for the whole batch before any write.
        for p in &pages {
            if p.pfn >= self.page_count {
                return Err(PrecopyError::OutOfBounds {
                    pfn: p.pfn,
                    page_count: self.page_count,
                });
            }
            let expected = stream_for(p.pfn, self.streams);
            if expected != stream {
                return Err(PrecopyError::WrongStream {
                    pfn: p.pfn,
                    stream,
                    expected,
                });
            }
        }
        let zero = vec![0u8; self.page_size];
        for p in &pages {
            mem.write_page(p.pfn, p.data.unwrap_or(&zero))?;
            self.digests.update(p.pfn, p.data);
        }
        self.pages_written += pages.len() as u64;
        Ok(pages.len() as u32)
    }

    /// Accept the device state (once, at stop-and-copy).
    pub fn on_device_state(&mut self, state: &[u8]) -> Result<(), PrecopyError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.device_state.is_some() || state.len() > MAX_DEVICE_STATE {
            let e = PrecopyError::BadBatch("device state repeated or too large".into());
            self.failed = Some(e.clone());
            return Err(e);
        }
        self.device_state = Some(state.to_vec());
        Ok(())
    }

    /// The device state received, if any.
    pub fn device_state(&self) -> Option<&[u8]> {
        self.device_state.as_deref()
    }

    /// The final digest of what arrived; compare it with the source's attested one.
    pub fn final_digest(&self, transcript_hash: &Digest) -> Result<Digest, PrecopyError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let state = self
            .device_state
            .as_deref()
            .ok_or(PrecopyError::NoDeviceState)?;
        Ok(final_digest(
            transcript_hash,
            self.page_size as u32,
            self.page_count,
            &self.digests.root(),
            state,
        ))
    }
}
