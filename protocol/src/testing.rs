//! Test doubles shared by this crate's tests, the tests crate, benchmarks and the fuzzer.
//! Not part of the API: a software "TPM" keyed by a shared secret, and an in-memory guest.

use ring::hmac;
use serde::{Deserialize, Serialize};

use crate::attestation::{AttestationError, Attester, Claims, EvidenceVerifier, Measurement};
use crate::precopy::{DirtyBitmap, GuestMemory, PrecopyError};
use crate::{codec, ct_eq, AgentId, Digest};

#[derive(Serialize, Deserialize)]
struct SoftEvidence {
    #[serde(with = "serde_bytes")]
    qd: Digest,
    #[serde(with = "serde_bytes")]
    identity: AgentId,
    log: Vec<Measurement>,
    #[serde(with = "serde_bytes")]
    mac: Vec<u8>,
}

fn soft_mac(key: &[u8], qd: &Digest, identity: &AgentId, log: &[Measurement]) -> Vec<u8> {
    let k = hmac::Key::new(hmac::HMAC_SHA256, key);
    let body = codec::encode(&(
        serde_bytes::Bytes::new(qd),
        serde_bytes::Bytes::new(identity),
        log,
    ));
    hmac::sign(&k, &body).as_ref().to_vec()
}

/// An attester whose "quotes" are HMACs under a key shared with [`SoftVerifier`].
pub struct SoftAttester {
    /// Shared key.
    pub key: Vec<u8>,
    /// Whose quotes these are.
    pub identity: AgentId,
    /// Event log.
    pub log: Vec<Measurement>,
}

impl SoftAttester {
    /// A measured agent with executable digest `exe`.
    pub fn new(key: &[u8], identity: AgentId, exe: Digest) -> Self {
        Self {
            key: key.to_vec(),
            identity,
            log: vec![Measurement::AgentExecutable(exe)],
        }
    }
}

impl Attester for SoftAttester {
    fn extend(&mut self, m: &Measurement) -> Result<(), AttestationError> {
        self.log.push(m.clone());
        Ok(())
    }
    fn quote(&mut self, qd: &Digest) -> Result<Vec<u8>, AttestationError> {
        Ok(codec::encode(&SoftEvidence {
            qd: *qd,
            identity: self.identity,
            log: self.log.clone(),
            mac: soft_mac(&self.key, qd, &self.identity, &self.log),
        }))
    }
}

/// Verifies [`SoftAttester`] evidence: MAC, qualifying data, identity, allowed executables.
pub struct SoftVerifier {
    /// Shared key.
    pub key: Vec<u8>,
    /// Allowed agent executable digests.
    pub allowed_exe: Vec<Digest>,
}

impl EvidenceVerifier for SoftVerifier {
    fn verify(
        &self,
        evidence: &[u8],
        qd: &Digest,
        peer: &AgentId,
    ) -> Result<Claims, AttestationError> {
        let ev: SoftEvidence = codec::decode(evidence).map_err(AttestationError::new)?;
        if !ct_eq(&ev.mac, &soft_mac(&self.key, &ev.qd, &ev.identity, &ev.log)) {
            return Err(AttestationError::new("bad quote signature"));
        }
        if !ct_eq(&ev.qd, qd) {
            return Err(AttestationError::new("qualifying data mismatch"));
        }
        if !ct_eq(&ev.identity, peer) {
            return Err(AttestationError::new("quote from another agent"));
        }
        match ev.log.first() {
            Some(Measurement::AgentExecutable(d)) if self.allowed_exe.contains(d) => {}
            _ => return Err(AttestationError::new("agent measurement not allowed")),
        }
        Ok(Claims {
            measurements: ev.log,
        })
    }
}

/// A deterministic in-memory guest that dirties pages on demand.
pub struct VecGuest {
    /// Page size.
    pub page_size: usize,
    /// Memory.
    pub mem: Vec<u8>,
    dirty: DirtyBitmap,
    rng: u64,
    /// Whether paused.
    pub paused: bool,
    /// Current throttle.
    pub throttle: u8,
    /// Fraction of pages (per mille) that hold data initially; the rest are zero.
    pub hot_pages: u64,
}

impl VecGuest {
    /// A guest of `pages` pages, about `fill_permille`/1000 of them non-zero, seeded.
    pub fn new(page_size: usize, pages: u64, fill_permille: u64, seed: u64) -> Self {
        let mut g = Self {
            page_size,
            mem: vec![0; page_size * pages as usize],
            dirty: DirtyBitmap::new(pages),
            rng: seed | 1,
            paused: false,
            throttle: 0,
            hot_pages: (pages / 8).max(1),
        };
        for p in 0..pages {
            if g.next() % 1000 < fill_permille {
                g.scribble(p);
            }
        }
        g.dirty.clear_all();
        g
    }

    fn next(&mut self) -> u64 {
        // xorshift64: deterministic and fast; quality is irrelevant here.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn scribble(&mut self, pfn: u64) {
        let v = self.next();
        let off = pfn as usize * self.page_size + (v as usize % (self.page_size / 8)) * 8;
        self.mem[off..off + 8].copy_from_slice(&v.to_le_bytes());
        self.dirty.set(pfn);
    }

    /// Dirty `writes` pages (reduced by the throttle), most of them in the hot set.
    /// Does nothing while paused.
    pub fn run(&mut self, writes: u64) {
        if self.paused {
            return;
        }
        let writes = writes * u64::from(100 - self.throttle.min(100)) / 100;
        let pages = self.dirty.len();
        for _ in 0..writes {
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

impl GuestMemory for VecGuest {
    fn page_size(&self) -> usize {
        self.page_size
    }
    fn page_count(&self) -> u64 {
        (self.mem.len() / self.page_size) as u64
    }
    fn read_page(&self, pfn: u64, buf: &mut [u8]) -> Result<(), PrecopyError> {
        let off = pfn as usize * self.page_size;
        let src = self
            .mem
            .get(off..off + self.page_size)
            .ok_or(PrecopyError::OutOfBounds {
                pfn,
                page_count: self.page_count(),
            })?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write_page(&mut self, pfn: u64, data: &[u8]) -> Result<(), PrecopyError> {
        let off = pfn as usize * self.page_size;
        let count = self.page_count();
        let dst = self
            .mem
            .get_mut(off..off + data.len())
            .ok_or(PrecopyError::OutOfBounds {
                pfn,
                page_count: count,
            })?;
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
    }
    fn set_throttle(&mut self, percent: u8) {
        self.throttle = percent;
    }
}
