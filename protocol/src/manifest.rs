//! Image manifests: what VM the source claims to send. spec: SPEC.md §6.3
//!
//! The manifest lists the VM configuration digest and, per disk, the digests of fixed-size
//! chunks. Its root, `SHA-256("trustmig manifest v1" || CBOR(manifest))`, is extended into the
//! source's PCR before the handshake quote, so the quote vouches for it. Building manifests
//! from files and checking chunks as they arrive is `trustmig-attest`'s work.

use serde::{Deserialize, Serialize};

use crate::{codec, sha256, Digest};

/// Most disks per manifest, copied and mirrored together. spec: SPEC.md §9
pub const MAX_DISKS: usize = 16;

/// Most mirrored disks per manifest: each travels on a data stream of its own beside QEMU's,
/// and a session has at most [`MAX_STREAMS`](crate::messages::MAX_STREAMS). spec: SPEC.md §9
pub const MAX_MIRRORED: usize = crate::messages::MAX_STREAMS as usize - 1;

/// Chunk digests of one disk image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskManifest {
    /// Disk name (device id).
    pub name: String,
    /// Image size in bytes.
    pub size: u64,
    /// BLAKE3 digest of each chunk, in order; the last chunk may be short.
    pub chunks: Vec<serde_bytes::ByteBuf>,
}

/// Image format of a mirrored disk: what the destination creates and opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// A raw image file.
    Raw,
    /// A qcow2 image without a backing file.
    Qcow2,
}

impl DiskFormat {
    /// QEMU's driver name (and the destination image's file extension).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Qcow2 => "qcow2",
        }
    }
}

/// A writable disk that moves live: QEMU mirrors it into the destination's copy over NBD,
/// carried on a data stream of its own (`BlockStream` records), while the guest keeps writing.
/// Its content is bound by the final digest, not by chunk digests. spec: spec/qemu.md §5
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorDisk {
    /// Disk name (NBD export name on the destination, `[[vm.disk]]` name on both sides).
    pub name: String,
    /// Image format the destination creates.
    pub format: DiskFormat,
    /// Size the guest sees, bytes (a multiple of 512).
    pub virtual_size: u64,
    /// `verify = "full"` on the source: once the mirror is done and the guest stopped, both
    /// agents hash the image's whole guest-visible content and the final digest binds it, so
    /// the copy must equal the source image byte for byte as the guest sees it, not only carry
    /// every NBD byte that crossed. Absent from the encoding when false, so manifests without
    /// it encode as before.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub verify_full: bool,
}

/// The image manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageManifest {
    /// The VM's name.
    pub vm: String,
    /// SHA-256 of the VM configuration.
    #[serde(with = "serde_bytes")]
    pub config_digest: Digest,
    /// Chunk size of disk digests, bytes (a power of two, 64 KiB..=16 MiB).
    pub chunk_size: u32,
    /// Disks that travel with the VM (empty with shared storage).
    pub disks: Vec<DiskManifest>,
    /// Writable disks mirrored live, in data-stream order: mirror `i` travels on data stream
    /// `i + 1`. Absent from the encoding when empty, so manifests without mirrors encode as
    /// before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<MirrorDisk>,
}

impl ImageManifest {
    /// Encode for the wire.
    pub fn to_cbor(&self) -> Vec<u8> {
        codec::encode(self)
    }
}

/// Root of encoded manifest bytes (computed over the bytes as sent, never a re-encoding).
pub fn manifest_root(encoded: &[u8]) -> Digest {
    sha256(&[b"trustmig manifest v1", encoded])
}
