//! The data-plane record layer. spec: SPEC.md §7
//!
//! ```text
//! offset  size  field
//! 0       1     version (1)
//! 1       1     type
//! 2       2     stream index, big-endian
//! 4       8     sequence number, big-endian
//! 12      4     ciphertext length incl. the 16-byte tag, big-endian
//! 16      len   AES-256-GCM(payload), AAD = the 16 header bytes
//! ```
//! The nonce is the stream IV XOR the sequence number (right-aligned, as TLS 1.3). Streams run
//! over ordered transports, so the opener accepts exactly the next sequence number: any gap,
//! repeat or reorder is fatal, as is a bad tag, an oversize record, an unknown type or a record
//! for another stream. Every error is sticky, and a rejected record changes nothing else.

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

use crate::keys::TrafficSecret;

/// Header length in bytes.
pub const HEADER_LEN: usize = 16;
/// AEAD tag length.
pub const TAG_LEN: usize = 16;
/// Record format version.
pub const RECORD_VERSION: u8 = 1;
/// Largest plaintext payload of one record. spec: SPEC.md §9
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Largest ciphertext (payload + tag).
pub const MAX_CIPHERTEXT: usize = MAX_PAYLOAD + TAG_LEN;

/// Record types. spec: SPEC.md §7.2
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordType {
    /// First record of a stream; payload = session id || stream index (proves key possession).
    StreamInit = 1,
    /// A batch of guest pages (pre-copy engine).
    Pages = 2,
    /// Device state blob (at stop-and-copy).
    DeviceState = 3,
    /// Opaque hypervisor migration stream bytes (QEMU sidecar mode).
    HypervisorStream = 4,
    /// The sender switches to the next key epoch after this record; empty payload.
    KeyUpdate = 5,
    /// End of the stream; empty payload. Nothing follows.
    StreamEnd = 6,
    /// One disk chunk of the image manifest, in manifest order (QEMU sidecar mode, before the
    /// hypervisor stream). spec: SPEC.md §7.2, spec/qemu.md §5
    DiskChunk = 7,
    /// NBD bytes of a mirrored disk (QEMU sidecar mode, data streams 1..): the source QEMU's
    /// NBD client to the destination QEMU's NBD server on S->D, the replies on D->S.
    /// spec: SPEC.md §7.2, spec/qemu.md §5
    BlockStream = 8,
}

impl RecordType {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::StreamInit,
            2 => Self::Pages,
            3 => Self::DeviceState,
            4 => Self::HypervisorStream,
            5 => Self::KeyUpdate,
            6 => Self::StreamEnd,
            7 => Self::DiskChunk,
            8 => Self::BlockStream,
            _ => return None,
        })
    }
}

/// Why a record was refused. Every one ends the session.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// Header version is not [`RECORD_VERSION`].
    #[error("record version {0} unknown")]
    BadVersion(u8),
    /// Unknown record type.
    #[error("record type {0} unknown")]
    BadType(u8),
    /// Record names another stream than the one it arrived on.
    #[error("record for stream {got} arrived on stream {expected}")]
    WrongStream {
        /// Stream index in the header.
        got: u16,
        /// The stream this opener serves.
        expected: u16,
    },
    /// Declared length is over the limit or shorter than a tag.
    #[error("record length {0} out of range")]
    BadLength(u32),
    /// Buffer length disagrees with the header.
    #[error("record truncated or padded: header says {declared} bytes, got {actual}")]
    LengthMismatch {
        /// Length in the header.
        declared: usize,
        /// Bytes actually present after the header.
        actual: usize,
    },
    /// Sequence number below the expected one: a replay or a reordering.
    #[error("record {got} replayed or reordered (expected {expected})")]
    Replayed {
        /// Sequence in the header.
        got: u64,
        /// Expected sequence.
        expected: u64,
    },
    /// Sequence number above the expected one: records were dropped.
    #[error("record gap: got {got}, expected {expected} (records dropped)")]
    Gap {
        /// Sequence in the header.
        got: u64,
        /// Expected sequence.
        expected: u64,
    },
    /// The AEAD tag did not verify: altered in transit or wrong key.
    #[error("record {seq} failed authentication (tampered)")]
    BadTag {
        /// Sequence of the refused record.
        seq: u64,
    },
    /// A record arrived after `StreamEnd`.
    #[error("record after end of stream")]
    AfterEnd,
    /// The sequence space is used up; the stream must close.
    #[error("sequence numbers exhausted at {0}")]
    Exhausted(u64),
    /// Payload is larger than [`MAX_PAYLOAD`] (local misuse when sealing).
    #[error("payload of {0} bytes exceeds {MAX_PAYLOAD}")]
    PayloadTooLarge(usize),
}

/// Sequence-number limits. spec: SPEC.md §7.4
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SequenceLimits {
    /// Records per key epoch before the sealer sends a `KeyUpdate`.
    pub rekey_interval: u64,
    /// Records per stream after which the stream must close.
    pub hard_limit: u64,
}

impl Default for SequenceLimits {
    fn default() -> Self {
        // 2^24 records of at most 1 MiB is 16 TiB per key, well inside AES-GCM's bounds for
        // deterministic nonces; 2^48 caps a stream long before the 64-bit counter could wrap.
        Self {
            rekey_interval: 1 << 24,
            hard_limit: 1 << 48,
        }
    }
}

/// A parsed record header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Raw type byte (validated only after the tag verifies, so the error is not an oracle).
    pub typ: u8,
    /// Stream index.
    pub stream: u16,
    /// Sequence number.
    pub seq: u64,
    /// Ciphertext length including the tag.
    pub len: u32,
}

impl Header {
    /// Parse and bound-check a header; tells the reader how many bytes follow.
    pub fn parse(b: &[u8; HEADER_LEN]) -> Result<Self, RecordError> {
        if b[0] != RECORD_VERSION {
            return Err(RecordError::BadVersion(b[0]));
        }
        let len = u32::from_be_bytes([b[12], b[13], b[14], b[15]]);
        if (len as usize) < TAG_LEN || len as usize > MAX_CIPHERTEXT {
            return Err(RecordError::BadLength(len));
        }
        Ok(Self {
            typ: b[1],
            stream: u16::from_be_bytes([b[2], b[3]]),
            seq: u64::from_be_bytes(b[4..12].try_into().expect("8 bytes")),
            len,
        })
    }

    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0] = RECORD_VERSION;
        h[1] = self.typ;
        h[2..4].copy_from_slice(&self.stream.to_be_bytes());
        h[4..12].copy_from_slice(&self.seq.to_be_bytes());
        h[12..16].copy_from_slice(&self.len.to_be_bytes());
        h
    }
}

struct Epoch {
    key: LessSafeKey,
    secret: TrafficSecret,
}

impl Epoch {
    fn new(secret: TrafficSecret) -> Self {
        let key = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, secret.key()).expect("AES-256 key is 32 bytes"),
        );
        Self { key, secret }
    }

    fn nonce(&self, seq: u64) -> Nonce {
        let mut n = *self.secret.iv();
        for (b, s) in n[4..].iter_mut().zip(seq.to_be_bytes()) {
            *b ^= s;
        }
        Nonce::assume_unique_for_key(n)
    }

    fn next(&self) -> Self {
        Self::new(self.secret.update())
    }
}

/// Seals records for one stream in one direction.
pub struct Sealer {
    epoch: Epoch,
    stream: u16,
    seq: u64,
    limits: SequenceLimits,
    ended: bool,
}

impl Sealer {
    /// A sealer for `stream` with default limits.
    pub fn new(secret: TrafficSecret, stream: u16) -> Self {
        Self::with_limits(secret, stream, SequenceLimits::default())
    }

    /// A sealer with explicit limits (tests use small ones).
    pub fn with_limits(secret: TrafficSecret, stream: u16, limits: SequenceLimits) -> Self {
        Self {
            epoch: Epoch::new(secret),
            stream,
            seq: 0,
            limits,
            ended: false,
        }
    }

    /// Next sequence number to be used.
    pub fn next_seq(&self) -> u64 {
        self.seq
    }

    /// Append one sealed record carrying `payload` to `out`. When the epoch's interval is used
    /// up, a `KeyUpdate` record is appended first and the key rotates.
    pub fn seal(
        &mut self,
        typ: RecordType,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        self.admit(typ, payload.len(), out)?;
        out.reserve(HEADER_LEN + payload.len() + TAG_LEN);
        let start = out.len();
        out.extend_from_slice(&[0; HEADER_LEN]);
        out.extend_from_slice(payload);
        self.seal_tail(typ, out, start);
        Ok(())
    }

    /// Seal in place, for a payload already in the caller's buffer (the bulk path: no copy).
    /// `record` holds [`HEADER_LEN`] bytes of room followed by the payload; on return it is the
    /// whole sealed record (header, ciphertext, tag). When the epoch's interval is used up, the
    /// `KeyUpdate` record that must precede it is appended to `before`, which the caller sends
    /// first, and the key rotates. The records are those `seal` would produce.
    pub fn seal_in_place(
        &mut self,
        typ: RecordType,
        record: &mut Vec<u8>,
        before: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        let Some(len) = record.len().checked_sub(HEADER_LEN) else {
            return Err(RecordError::LengthMismatch {
                declared: HEADER_LEN,
                actual: record.len(),
            });
        };
        self.admit(typ, len, before)?;
        record.reserve(TAG_LEN);
        self.seal_tail(typ, record, 0);
        Ok(())
    }

    /// The checks before a record of `len` payload bytes, all-or-nothing, and the `KeyUpdate`
    /// that must precede it when the epoch's interval is used up (appended to `out`).
    fn admit(&mut self, typ: RecordType, len: usize, out: &mut Vec<u8>) -> Result<(), RecordError> {
        if len > MAX_PAYLOAD {
            return Err(RecordError::PayloadTooLarge(len));
        }
        if self.ended {
            return Err(RecordError::AfterEnd);
        }
        let rekey =
            self.seq > 0 && self.seq % self.limits.rekey_interval == self.limits.rekey_interval - 1;
        // Refuse before writing anything if the update and the record don't fit.
        if self.seq + 1 + u64::from(rekey) > self.limits.hard_limit {
            return Err(RecordError::Exhausted(self.seq));
        }
        if rekey {
            let start = out.len();
            out.extend_from_slice(&[0; HEADER_LEN]);
            self.seal_tail(RecordType::KeyUpdate, out, start);
            self.epoch = self.epoch.next();
        }
        if typ == RecordType::StreamEnd {
            self.ended = true;
        }
        Ok(())
    }

    /// Seal the record that starts at `out[start..]`: `HEADER_LEN` bytes of room, then the
    /// payload to the end of `out`. Writes the header, encrypts in place, appends the tag.
    /// The caller has checked the limits (`admit`).
    fn seal_tail(&mut self, typ: RecordType, out: &mut Vec<u8>, start: usize) {
        let body = start + HEADER_LEN;
        let header = Header {
            typ: typ as u8,
            stream: self.stream,
            seq: self.seq,
            len: (out.len() - body + TAG_LEN) as u32,
        }
        .encode();
        out[start..body].copy_from_slice(&header);
        let tag = self
            .epoch
            .key
            .seal_in_place_separate_tag(
                self.epoch.nonce(self.seq),
                Aad::from(header),
                &mut out[body..],
            )
            .expect("AES-GCM seal cannot fail for payloads under 2^36 bytes");
        out.extend_from_slice(tag.as_ref());
        self.seq += 1;
    }
}

/// Opens records for one stream in one direction, in strict sequence.
pub struct Opener {
    epoch: Epoch,
    stream: u16,
    expected: u64,
    limits: SequenceLimits,
    ended: bool,
    failed: Option<RecordError>,
}

impl Opener {
    /// An opener for `stream` with default limits.
    pub fn new(secret: TrafficSecret, stream: u16) -> Self {
        Self::with_limits(secret, stream, SequenceLimits::default())
    }

    /// An opener with explicit limits.
    pub fn with_limits(secret: TrafficSecret, stream: u16, limits: SequenceLimits) -> Self {
        Self {
            epoch: Epoch::new(secret),
            stream,
            expected: 0,
            limits,
            ended: false,
            failed: None,
        }
    }

    /// Whether `StreamEnd` has been received.
    pub fn is_ended(&self) -> bool {
        self.ended
    }

    /// Number of records accepted so far.
    pub fn records(&self) -> u64 {
        self.expected
    }

    /// Open one whole record (`header || ciphertext || tag`) in place. On success returns its
    /// type and plaintext (a slice of `record`); `KeyUpdate` records are consumed here and
    /// returned too, so callers may ignore them. Any error is permanent.
    pub fn open<'a>(
        &mut self,
        record: &'a mut [u8],
    ) -> Result<(RecordType, &'a [u8]), RecordError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match self.open_inner(record) {
            Ok((typ, range)) => Ok((typ, &record[range])),
            Err(e) => {
                self.failed = Some(e.clone());
                Err(e)
            }
        }
    }

    fn open_inner(
        &mut self,
        record: &mut [u8],
    ) -> Result<(RecordType, std::ops::Range<usize>), RecordError> {
        let hb: &[u8; HEADER_LEN] = record
            .get(..HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or(RecordError::LengthMismatch {
                declared: HEADER_LEN,
                actual: record.len(),
            })?;
        let header = Header::parse(hb)?;
        let hbytes = *hb;
        let body_len = record.len() - HEADER_LEN;
        if header.len as usize != body_len {
            return Err(RecordError::LengthMismatch {
                declared: header.len as usize,
                actual: body_len,
            });
        }
        if header.stream != self.stream {
            return Err(RecordError::WrongStream {
                got: header.stream,
                expected: self.stream,
            });
        }
        if self.ended {
            return Err(RecordError::AfterEnd);
        }
        if self.expected >= self.limits.hard_limit {
            return Err(RecordError::Exhausted(self.expected));
        }
        if header.seq < self.expected {
            return Err(RecordError::Replayed {
                got: header.seq,
                expected: self.expected,
            });
        }
        if header.seq > self.expected {
            return Err(RecordError::Gap {
                got: header.seq,
                expected: self.expected,
            });
        }
        // The tag covers header and payload; only authenticated bytes are interpreted further.
        let plain_len = self
            .epoch
            .key
            .open_in_place(
                self.epoch.nonce(header.seq),
                Aad::from(hbytes),
                &mut record[HEADER_LEN..],
            )
            .map_err(|_| RecordError::BadTag { seq: header.seq })?
            .len();
        let typ = RecordType::from_u8(header.typ).ok_or(RecordError::BadType(header.typ))?;
        self.expected += 1;
        match typ {
            RecordType::KeyUpdate => self.epoch = self.epoch.next(),
            RecordType::StreamEnd => self.ended = true,
            _ => {}
        }
        Ok((typ, HEADER_LEN..HEADER_LEN + plain_len))
    }
}

// Keep `aead` import meaningful for readers: the tag length is ring's.
const _: () = assert!(TAG_LEN == aead::MAX_TAG_LEN);
