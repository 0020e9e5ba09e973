//! The final digest of a hypervisor stream (QEMU sidecar mode). spec: SPEC.md §8.5.1
//!
//! `SHA-256("trustmig hvstream v1" || transcript_hash || total length u64 BE ||
//!  BLAKE3(every HypervisorStream payload byte, in order))`.
//!
//! The inner hash runs over every byte QEMU sends, on both agents, so it is BLAKE3 for the same
//! reason as page digests (SPEC.md §8.5): on the sidecar's path SHA-256 was the largest single
//! cost (a profile of `bench/qemu.sh` put it at about a quarter of all CPU time).
//!
//! Both sides feed the same bytes: the source what it sealed, the destination what it opened,
//! so equal digests mean the destination hypervisor loaded exactly the stream the source sent.

use crate::{sha256, Digest};

/// Domain-separation label of the hypervisor-stream digest.
pub const HVSTREAM_LABEL: &[u8] = b"trustmig hvstream v1";

/// A running digest over the payload bytes of `HypervisorStream` records.
#[derive(Clone)]
pub struct StreamDigest {
    hasher: blake3::Hasher,
    len: u64,
}

impl Default for StreamDigest {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for StreamDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamDigest")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl StreamDigest {
    /// An empty stream.
    pub fn new() -> Self {
        Self {
            hasher: blake3::Hasher::new(),
            len: 0,
        }
    }

    /// Append the payload of one record.
    pub fn update(&mut self, payload: &[u8]) {
        self.hasher.update(payload);
        self.len += payload.len() as u64;
    }

    /// Payload bytes so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether no byte was fed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The final digest, bound to the session's handshake transcript.
    pub fn finish(self, transcript_hash: &Digest) -> Digest {
        let inner = self.hasher.finalize();
        sha256(&[
            HVSTREAM_LABEL,
            transcript_hash,
            &self.len.to_be_bytes(),
            inner.as_bytes(),
        ])
    }
}

/// Domain-separation label of the final digest of a migration with mirrored disks.
pub const HVSTREAM_DISKS_LABEL: &[u8] = b"trustmig hvstream v2";

/// The two directions of one mirrored disk's NBD stream.
#[derive(Clone, Debug, Default)]
pub struct BlockDigests {
    /// NBD client (source QEMU) to server (destination QEMU): requests and written data.
    pub to_destination: StreamDigest,
    /// Server to client: replies and read data.
    pub to_source: StreamDigest,
    /// For a disk the manifest marks `verify_full`: the image's whole guest-visible content
    /// (its virtual size, unallocated ranges as zeros), hashed by each agent on its own copy
    /// with the guest stopped. `None` for the others.
    pub image: Option<StreamDigest>,
}

/// The final digest of a hypervisor stream together with the NBD streams of mirrored disks,
/// in manifest order. Without mirrors it is `stream.finish(transcript_hash)` (v1), so
/// migrations without them are unchanged; with them:
/// `SHA-256("trustmig hvstream v2" || transcript_hash || len || BLAKE3(stream) ||
///  count u16 BE || for each disk: (len || BLAKE3) of S->D, then of D->S, then, for a disk
///  the manifest marks `verify_full`, (len || BLAKE3) of its image's guest-visible content)`.
/// Whether the image part is there follows from the attested manifest (bound through the
/// transcript), so the encoding stays unambiguous; an agent that hashed a disk the other did
/// not gets a different digest, and the migration rolls back.
pub fn final_digest(
    transcript_hash: &Digest,
    stream: StreamDigest,
    disks: &[BlockDigests],
) -> Digest {
    if disks.is_empty() {
        return stream.finish(transcript_hash);
    }
    let part = |d: &StreamDigest| {
        let mut out = d.len.to_be_bytes().to_vec();
        out.extend_from_slice(d.hasher.finalize().as_bytes());
        out
    };
    let mut parts: Vec<Vec<u8>> = vec![part(&stream)];
    let count = u16::try_from(disks.len()).unwrap_or(u16::MAX);
    parts.push(count.to_be_bytes().to_vec());
    for d in disks {
        parts.push(part(&d.to_destination));
        parts.push(part(&d.to_source));
        if let Some(image) = &d.image {
            parts.push(part(image));
        }
    }
    let mut all: Vec<&[u8]> = vec![HVSTREAM_DISKS_LABEL, transcript_hash];
    all.extend(parts.iter().map(Vec::as_slice));
    sha256(&all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunking_does_not_matter_and_everything_is_bound() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + 3) as u8).collect();
        let t = [9u8; 32];
        let mut whole = StreamDigest::new();
        whole.update(&data);
        let mut parts = StreamDigest::new();
        for c in data.chunks(333) {
            parts.update(c);
        }
        parts.update(&[]);
        assert_eq!(parts.len(), 10_000);
        let d = whole.finish(&t);
        assert_eq!(d, parts.finish(&t));
        // Definition, spelled out.
        let inner = *blake3::hash(&data).as_bytes();
        assert_eq!(
            d,
            sha256(&[
                b"trustmig hvstream v1",
                &t,
                &10_000u64.to_be_bytes(),
                &inner
            ])
        );
        // Another transcript, a flipped byte, a missing byte: all differ.
        let mut other = StreamDigest::new();
        other.update(&data);
        assert_ne!(d, other.finish(&[8u8; 32]));
        let mut flipped = data.clone();
        flipped[5000] ^= 1;
        let mut f = StreamDigest::new();
        f.update(&flipped);
        assert_ne!(d, f.finish(&t));
        let mut short = StreamDigest::new();
        short.update(&data[..9_999]);
        assert_ne!(d, short.finish(&t));
        // With mirrored disks: v2, every direction of every disk bound, v1 without any.
        let mut s = StreamDigest::new();
        s.update(&data);
        assert_eq!(final_digest(&t, s.clone(), &[]), d);
        let mut disk = BlockDigests::default();
        disk.to_destination.update(b"write");
        disk.to_source.update(b"ok");
        let v2 = final_digest(&t, s.clone(), std::slice::from_ref(&disk));
        let part = |b: &[u8]| {
            [
                &(b.len() as u64).to_be_bytes()[..],
                blake3::hash(b).as_bytes(),
            ]
            .concat()
        };
        assert_eq!(
            v2,
            sha256(&[
                b"trustmig hvstream v2",
                &t,
                &part(&data),
                &1u16.to_be_bytes(),
                &part(b"write"),
                &part(b"ok"),
            ])
        );
        let mut swapped = BlockDigests::default();
        swapped.to_destination.update(b"ok");
        swapped.to_source.update(b"write");
        assert_ne!(v2, final_digest(&t, s.clone(), &[swapped]));
        assert_ne!(v2, final_digest(&t, s, &[disk.clone(), disk]));
        // The empty stream is well defined.
        let e = StreamDigest::new();
        assert!(e.is_empty());
        assert_eq!(
            e.finish(&t),
            sha256(&[
                b"trustmig hvstream v1",
                &t,
                &0u64.to_be_bytes(),
                blake3::hash(&[]).as_bytes()
            ])
        );
    }
}
