//! The source's pre-copy engine. spec: SPEC.md §8.3, §8.4

use super::batch::{begin_batch, finish_batch, push_entry_header, PageKind};
use super::digest::{final_digest, page_digest, PageDigests};
use super::memory::{DirtyBitmap, GuestMemory};
use super::{stream_for, PrecopyError, BATCH_HEADER, CHUNK_PAGES, PAGE_HEADER};
use crate::order::{Limits, NonConvergence};
use crate::Digest;

/// Throttle steps applied, one per extra round, when the order says `throttle`.
pub const THROTTLE_STEPS: &[u8] = &[20, 40, 60, 80, 99];

/// Where the engine is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Idle,
    Round(u32),
    StopAndCopy,
    Done,
}

/// A batch the engine produced: which stream must carry it, and what it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Batch {
    /// Stream that carries this chunk.
    pub stream: u16,
    /// Pages in the batch.
    pub pages: u32,
    /// Zero pages sent as such (no data).
    pub zero_pages: u32,
}

/// What to do after a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoundDecision {
    /// Run another round.
    Continue {
        /// Predicted downtime if we switched now, milliseconds.
        predicted_ms: u64,
    },
    /// Another round, with the guest throttled to `percent`.
    Throttle {
        /// Throttle now in force.
        percent: u8,
        /// Predicted downtime if we switched now, milliseconds.
        predicted_ms: u64,
    },
    /// Switch over now.
    SwitchOver {
        /// Predicted downtime, milliseconds.
        predicted_ms: u64,
        /// Whether the target was met (false: forced by the order's action).
        converged: bool,
    },
}

/// Figures for one round.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoundStats {
    /// Pages sent (raw or zero entries).
    pub pages_sent: u64,
    /// Payload bytes produced.
    pub bytes: u64,
    /// Pages dirtied during the round (known at its end).
    pub dirtied: u64,
}

/// Totals over the migration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceStats {
    /// Per round; the last entry is stop-and-copy once it started.
    pub rounds: Vec<RoundStats>,
    /// Zero pages skipped in round 0.
    pub zero_pages_skipped: u64,
    /// Throttle reached.
    pub throttle: u8,
    /// Whether switch-over was forced without converging.
    pub forced: bool,
}

/// The source engine. Reads guest memory, never writes it.
pub struct PrecopySource {
    page_size: usize,
    page_count: u64,
    streams: u16,
    limits: Limits,
    pending: DirtyBitmap,
    scratch: DirtyBitmap,
    cursor: u64,
    phase: Phase,
    digests: PageDigests,
    throttle_step: usize,
    stats: SourceStats,
    batch_pages: usize,
}

impl PrecopySource {
    /// An engine for `mem`'s geometry, with the order's limits and `streams` data streams.
    pub fn new(mem: &dyn GuestMemory, limits: Limits, streams: u16) -> Result<Self, PrecopyError> {
        let page_size = mem.page_size();
        let page_count = mem.page_count();
        if !page_size.is_power_of_two()
            || !(4096..=crate::handshake::MAX_PAGE_SIZE as usize).contains(&page_size)
            || page_count == 0
        {
            return Err(PrecopyError::Geometry(format!(
                "page size {page_size}, {page_count} pages"
            )));
        }
        Ok(Self {
            page_size,
            page_count,
            streams: streams.max(1),
            limits,
            pending: DirtyBitmap::new(page_count),
            scratch: DirtyBitmap::new(page_count),
            cursor: 0,
            phase: Phase::Idle,
            digests: PageDigests::new(page_size, page_count),
            throttle_step: 0,
            stats: SourceStats::default(),
            // A batch must fit one record: 64 pages of 4 KiB, fewer of larger pages.
            batch_pages: ((crate::record::MAX_PAYLOAD - BATCH_HEADER) / (PAGE_HEADER + page_size))
                .min(CHUNK_PAGES as usize),
        })
    }

    /// Start round 0: clear the dirty log and mark every page pending.
    pub fn begin(&mut self, mem: &mut dyn GuestMemory) -> Result<(), PrecopyError> {
        if self.phase != Phase::Idle {
            return Err(PrecopyError::Misuse("begin called twice"));
        }
        mem.take_dirty(&mut self.scratch);
        self.scratch.clear_all();
        self.pending = DirtyBitmap::full(self.page_count);
        self.phase = Phase::Round(0);
        self.stats.rounds.push(RoundStats::default());
        Ok(())
    }

    /// Current round (stop-and-copy counts as the last).
    pub fn round(&self) -> u32 {
        self.stats.rounds.len().saturating_sub(1) as u32
    }

    /// Pages still to send in this round.
    pub fn pending_pages(&self) -> u64 {
        self.pending.count()
    }

    /// Statistics so far.
    pub fn stats(&self) -> &SourceStats {
        &self.stats
    }

    /// Bytes a batch can occupy at most (to size buffers).
    pub fn max_batch_bytes(&self) -> usize {
        BATCH_HEADER + self.batch_pages * (PAGE_HEADER + self.page_size)
    }

    /// Append the next batch of this round's pending pages to `out`; `None` when the round (or
    /// stop-and-copy) has nothing left. Zero pages are skipped in round 0 (the destination
    /// starts zeroed) and sent as zero entries later.
    pub fn next_batch(
        &mut self,
        mem: &dyn GuestMemory,
        out: &mut Vec<u8>,
    ) -> Result<Option<Batch>, PrecopyError> {
        let round0 = match self.phase {
            Phase::Round(r) => r == 0,
            Phase::StopAndCopy => false,
            _ => return Err(PrecopyError::Misuse("next_batch outside a round")),
        };
        let words = self.page_count.div_ceil(CHUNK_PAGES);
        while let Some(w) = self.pending.next_word(self.cursor) {
            if w >= words {
                break;
            }
            let bits = self.pending.word(w);
            let start_len = out.len();
            let at = begin_batch(out);
            let (mut pages, mut zeros, mut taken) = (0u32, 0u32, 0u64);
            for bit in 0..64u64 {
                if bits & (1 << bit) == 0 {
                    continue;
                }
                if pages as usize == self.batch_pages {
                    break; // the rest of this chunk goes in the next batch (large pages)
                }
                taken |= 1 << bit;
                let pfn = w * CHUNK_PAGES + bit;
                let entry = out.len();
                push_entry_header(out, pfn, PageKind::Raw);
                let data_at = out.len();
                out.resize(data_at + self.page_size, 0);
                if let Err(e) = mem.read_page(pfn, &mut out[data_at..]) {
                    out.truncate(start_len);
                    return Err(e);
                }
                if is_zero(&out[data_at..]) {
                    out.truncate(entry);
                    if round0 {
                        self.stats.zero_pages_skipped += 1;
                        continue;
                    }
                    push_entry_header(out, pfn, PageKind::Zero);
                    self.digests.update(pfn, None);
                    zeros += 1;
                } else {
                    self.digests.set(pfn, page_digest(&out[data_at..]));
                }
                pages += 1;
            }
            self.pending.clear_bits(w, taken);
            self.cursor = if bits & !taken == 0 { w + 1 } else { w };
            if pages == 0 {
                out.truncate(start_len);
                continue;
            }
            finish_batch(out, at, pages);
            let r = self
                .stats
                .rounds
                .last_mut()
                .expect("a round is open while batching");
            r.pages_sent += u64::from(pages);
            r.bytes += (out.len() - start_len) as u64;
            return Ok(Some(Batch {
                stream: stream_for(w * CHUNK_PAGES, self.streams),
                pages,
                zero_pages: zeros,
            }));
        }
        Ok(None)
    }

    /// End the current round: collect the dirty log and decide, given the bandwidth the
    /// driver measured (bytes per second), whether to go on. spec: SPEC.md §8.4
    pub fn end_round(
        &mut self,
        mem: &mut dyn GuestMemory,
        bandwidth_bps: u64,
    ) -> Result<RoundDecision, PrecopyError> {
        let Phase::Round(r) = self.phase else {
            return Err(PrecopyError::Misuse("end_round outside a round"));
        };
        if self.pending.count() != 0 {
            return Err(PrecopyError::Misuse("end_round with pages still pending"));
        }
        mem.take_dirty(&mut self.pending);
        let dirty = self.pending.count();
        if let Some(last) = self.stats.rounds.last_mut() {
            last.dirtied = dirty;
        }
        self.cursor = 0;
        let predicted_ms = predicted_downtime_ms(dirty * self.page_size as u64, bandwidth_bps);
        let rounds_done = r + 1;
        let decision = if predicted_ms <= u64::from(self.limits.downtime_ms) {
            RoundDecision::SwitchOver {
                predicted_ms,
                converged: true,
            }
        } else if rounds_done < self.limits.max_rounds {
            RoundDecision::Continue { predicted_ms }
        } else {
            match self.limits.on_nonconvergence {
                NonConvergence::Force => RoundDecision::SwitchOver {
                    predicted_ms,
                    converged: false,
                },
                NonConvergence::Abort => {
                    return Err(PrecopyError::NotConverged {
                        rounds: rounds_done,
                        predicted_ms,
                        target_ms: self.limits.downtime_ms,
                    })
                }
                NonConvergence::Throttle => match THROTTLE_STEPS.get(self.throttle_step) {
                    Some(&percent) => {
                        self.throttle_step += 1;
                        mem.set_throttle(percent);
                        self.stats.throttle = percent;
                        RoundDecision::Throttle {
                            percent,
                            predicted_ms,
                        }
                    }
                    None => RoundDecision::SwitchOver {
                        predicted_ms,
                        converged: false,
                    },
                },
            }
        };
        match decision {
            RoundDecision::SwitchOver { converged, .. } => self.stats.forced = !converged,
            _ => {
                self.phase = Phase::Round(r + 1);
                self.stats.rounds.push(RoundStats::default());
            }
        }
        Ok(decision)
    }

    /// Pause the guest and gather the last dirty pages for stop-and-copy.
    pub fn stop_and_copy(&mut self, mem: &mut dyn GuestMemory) -> Result<(), PrecopyError> {
        if !matches!(self.phase, Phase::Round(_)) {
            return Err(PrecopyError::Misuse("stop_and_copy outside pre-copy"));
        }
        mem.pause();
        mem.take_dirty(&mut self.pending);
        self.cursor = 0;
        self.phase = Phase::StopAndCopy;
        self.stats.rounds.push(RoundStats::default());
        Ok(())
    }

    /// After stop-and-copy drained: the final digest over pages, device state and transcript.
    pub fn finish(
        &mut self,
        device_state: &[u8],
        transcript_hash: &Digest,
    ) -> Result<Digest, PrecopyError> {
        if self.phase != Phase::StopAndCopy || self.pending.count() != 0 {
            return Err(PrecopyError::Misuse("finish before stop-and-copy drained"));
        }
        self.phase = Phase::Done;
        Ok(final_digest(
            transcript_hash,
            self.page_size as u32,
            self.page_count,
            &self.digests.root(),
            device_state,
        ))
    }

    /// Roll back: the guest runs at full speed again; its memory was never written.
    pub fn rollback(&mut self, mem: &mut dyn GuestMemory) {
        mem.set_throttle(0);
        mem.resume();
        self.phase = Phase::Done;
    }
}

/// Milliseconds to send `bytes` at `bandwidth_bps` (u64::MAX when bandwidth is unknown).
pub fn predicted_downtime_ms(bytes: u64, bandwidth_bps: u64) -> u64 {
    if bytes == 0 {
        return 0;
    }
    if bandwidth_bps == 0 {
        return u64::MAX;
    }
    ((u128::from(bytes) * 1000).div_ceil(u128::from(bandwidth_bps))).min(u128::from(u64::MAX))
        as u64
}

fn is_zero(page: &[u8]) -> bool {
    const Z: [u8; 4096] = [0; 4096];
    page.chunks(Z.len()).all(|c| c == &Z[..c.len()])
}
