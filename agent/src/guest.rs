//! Guest backends. `SyntheticGuest`: an in-process guest for demos, tests and benchmarks.
//!
//! It owns its memory in place (no second copy) and "runs" when the driver ticks it: each tick
//! dirties pages in proportion to the wall time since the last tick and the configured rate,
//! 90% of them in a hot set, as a real guest's working set would. The workload is a
//! deterministic function of the seed and the tick times.

use std::time::Instant;

use trustmig_protocol::precopy::{DirtyBitmap, GuestMemory, PrecopyError};

use crate::config::SyntheticVm;

/// Page size of synthetic guests.
pub const PAGE_SIZE: usize = 4096;

/// The allocator refused a guest's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoMemory {
    /// Pages asked for.
    pub pages: u64,
}

impl std::fmt::Display for NoMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = self.pages.saturating_mul(PAGE_SIZE as u64) >> 20;
        write!(f, "cannot allocate {mib} MiB of guest memory here")
    }
}

impl std::error::Error for NoMemory {}

/// A synthetic guest.
pub struct SyntheticGuest {
    name: String,
    mem: Vec<u8>,
    dirty: DirtyBitmap,
    rate: u64,
    hot_pages: u64,
    rng: u64,
    paused: bool,
    throttle: u8,
    last_tick: Option<Instant>,
    carry: f64,
    writes: u64,
}

impl SyntheticGuest {
    /// A guest as configured, with `fill_fraction` of its pages holding data.
    pub fn new(name: &str, cfg: &SyntheticVm) -> Result<Self, NoMemory> {
        let pages = cfg.size_mib.saturating_mul(1 << 20) / PAGE_SIZE as u64;
        let mut g = Self::zeroed(name, pages)?;
        g.rate = cfg.dirty_pages_per_sec;
        g.hot_pages = ((pages as f64 * cfg.hot_fraction) as u64).clamp(1, pages);
        g.rng = cfg.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let filled = (pages as f64 * cfg.fill_fraction) as u64;
        // Spread the filled pages over the whole guest (every k-th page), deterministically.
        if let Some(step) = pages.checked_div(filled) {
            let step = step.max(1);
            let mut p = 0;
            while p < pages {
                g.scribble(p);
                p += step;
            }
        }
        g.dirty.clear_all();
        Ok(g)
    }

    /// An all-zero, paused guest (a destination waiting for state, or one about to be
    /// filled), or `NoMemory` where the allocator refuses its memory. Allocated fallibly, then
    /// written: `vec![0; n]` aborts the whole agent when refused (seen under the unit's
    /// `ProcSubset=pid`, where no `MemAvailable` check came first), and its zero pages, mapped
    /// only at their first write, made a destination take one fault per page while pages
    /// arrived (the destination, not the transport, set the pace). So its memory is
    /// pre-faulted, as QEMU's `-mem-prealloc` does.
    pub fn zeroed(name: &str, pages: u64) -> Result<Self, NoMemory> {
        let bytes = (pages.checked_mul(PAGE_SIZE as u64))
            .and_then(|b| usize::try_from(b).ok())
            .ok_or(NoMemory { pages })?;
        let mut mem = Vec::new();
        mem.try_reserve_exact(bytes)
            .map_err(|_| NoMemory { pages })?;
        mem.resize(bytes, 0);
        Ok(Self::of(name, mem, pages))
    }

    /// A guest with no memory: what a destination leaves in place of the guest it hands on.
    pub fn empty(name: &str) -> Self {
        Self::of(name, Vec::new(), 0)
    }

    fn of(name: &str, mem: Vec<u8>, pages: u64) -> Self {
        Self {
            name: name.into(),
            mem,
            dirty: DirtyBitmap::new(pages),
            rate: 0,
            hot_pages: pages.max(1),
            rng: 1,
            paused: true,
            throttle: 0,
            last_tick: None,
            carry: 0.0,
            writes: 0,
        }
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the vCPUs are stopped.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Current throttle.
    pub fn throttle(&self) -> u8 {
        self.throttle
    }

    /// Total page writes performed by the workload.
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// Memory size in bytes.
    pub fn bytes(&self) -> u64 {
        self.mem.len() as u64
    }

    /// BLAKE3 of all of memory (to compare source and destination).
    pub fn checksum(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        h.update(&self.mem);
        *h.finalize().as_bytes()
    }

    fn next(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn scribble(&mut self, pfn: u64) {
        let v = self.next();
        let off = pfn as usize * PAGE_SIZE + (v as usize % (PAGE_SIZE / 8)) * 8;
        self.mem[off..off + 8].copy_from_slice(&v.to_le_bytes());
        self.dirty.set(pfn);
        self.writes += 1;
    }

    /// Let the guest run until `now`: dirty pages for the elapsed time at the configured rate,
    /// reduced by the throttle. No effect while paused.
    pub fn tick(&mut self, now: Instant) {
        let last = self.last_tick.replace(now);
        if self.paused || self.rate == 0 {
            return;
        }
        let Some(last) = last else { return };
        let secs = now.saturating_duration_since(last).as_secs_f64();
        let due =
            self.rate as f64 * secs * f64::from(100 - self.throttle.min(100)) / 100.0 + self.carry;
        let n = due.floor() as u64;
        self.carry = due - n as f64;
        let pages = self.dirty.len();
        // After a long gap (a host that stalled), more writes than a few passes over the
        // memory change nothing a pass would not: bounded, so a tick never spins.
        let n = n.min(pages.saturating_mul(4));
        for _ in 0..n {
            let r = self.next();
            let pfn = if r % 10 < 9 {
                (r >> 8) % self.hot_pages
            } else {
                (r >> 8) % pages
            };
            self.scribble(pfn);
        }
    }
}

/// `MemAvailable` from /proc/meminfo, in bytes.
pub fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

impl GuestMemory for SyntheticGuest {
    fn page_size(&self) -> usize {
        PAGE_SIZE
    }
    fn page_count(&self) -> u64 {
        self.dirty.len()
    }
    fn read_page(&self, pfn: u64, buf: &mut [u8]) -> Result<(), PrecopyError> {
        let off = (pfn as usize).checked_mul(PAGE_SIZE);
        let src =
            off.and_then(|o| self.mem.get(o..o + PAGE_SIZE))
                .ok_or(PrecopyError::OutOfBounds {
                    pfn,
                    page_count: self.page_count(),
                })?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write_page(&mut self, pfn: u64, data: &[u8]) -> Result<(), PrecopyError> {
        let count = self.page_count();
        let off = (pfn as usize).checked_mul(PAGE_SIZE);
        let dst = off.and_then(|o| self.mem.get_mut(o..o + PAGE_SIZE)).ok_or(
            PrecopyError::OutOfBounds {
                pfn,
                page_count: count,
            },
        )?;
        if data.len() != PAGE_SIZE {
            return Err(PrecopyError::Geometry(format!(
                "page of {} bytes",
                data.len()
            )));
        }
        dst.copy_from_slice(data);
        Ok(())
    }
    fn take_dirty(&mut self, into: &mut DirtyBitmap) {
        into.union(&self.dirty);
        self.dirty.clear_all();
    }
    fn pause(&mut self) {
        self.paused = true;
    }
    fn resume(&mut self) {
        self.paused = false;
        self.last_tick = None;
    }
    fn set_throttle(&mut self, percent: u8) {
        self.throttle = percent.min(99);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(rate: u64) -> SyntheticVm {
        SyntheticVm {
            size_mib: 4,
            dirty_pages_per_sec: rate,
            hot_fraction: 0.1,
            fill_fraction: 0.5,
            seed: 3,
        }
    }

    #[test]
    fn deterministic_and_rate_driven() {
        let a = SyntheticGuest::new("t", &cfg(1000)).unwrap();
        let b = SyntheticGuest::new("t", &cfg(1000)).unwrap();
        assert_eq!(a.checksum(), b.checksum());
        let mut g = SyntheticGuest::new("t", &cfg(1000)).unwrap();
        g.resume();
        let t0 = Instant::now();
        g.tick(t0);
        g.tick(t0 + std::time::Duration::from_millis(500));
        assert_eq!(g.writes() - a.writes(), 500);
        let mut d = DirtyBitmap::new(g.page_count());
        g.take_dirty(&mut d);
        assert!(d.count() > 0 && d.count() <= 500);
        g.pause();
        let before = g.checksum();
        g.tick(t0 + std::time::Duration::from_secs(5));
        assert_eq!(before, g.checksum(), "a paused guest does not change");
        assert!(g.write_page(g.page_count(), &[0; PAGE_SIZE]).is_err());
    }

    /// A tick after a long gap (a stalled host) writes at most four passes over the memory:
    /// at the rate it would have written for a day.
    #[test]
    fn a_tick_after_a_long_gap_is_bounded() {
        let mut g = SyntheticGuest::new("t", &cfg(25_600)).unwrap();
        g.resume();
        let t0 = Instant::now();
        g.tick(t0);
        let before = g.writes();
        g.tick(t0 + std::time::Duration::from_secs(86_400));
        assert_eq!(g.writes() - before, 4 * g.page_count());
    }
}
