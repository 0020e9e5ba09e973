//! Image manifests from files, and the streaming chunk checker. spec: attestation.md §8
//!
//! Disk chunks are hashed with BLAKE3, as the protocol core already does for memory pages: it is
//! several times faster than SHA-256 per core (SIMD over 1 KiB blocks inside one chunk), so
//! hashing a disk image never becomes the migration's bottleneck, and one hash family covers
//! the whole data plane. The VM configuration digest and the manifest root stay SHA-256
//! (small inputs; the root is extended into a SHA-256 PCR bank).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use ring::digest;
use serde_bytes::ByteBuf;
use trustmig_protocol::manifest::{DiskManifest, ImageManifest, MAX_DISKS, MAX_MIRRORED};
use trustmig_protocol::Digest;

/// Smallest allowed chunk size.
pub const MIN_CHUNK: u32 = 64 * 1024;
/// Largest allowed chunk size.
pub const MAX_CHUNK: u32 = 16 * 1024 * 1024;
/// Default chunk size (1 MiB).
pub const DEFAULT_CHUNK: u32 = 1024 * 1024;

/// Building or checking a manifest failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// Could not read a file.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Cause.
        source: io::Error,
    },
    /// Chunk size not a power of two in [`MIN_CHUNK`]..=[`MAX_CHUNK`].
    #[error("chunk size {0} is not a power of two in 64 KiB..=16 MiB")]
    ChunkSize(u32),
    /// More than [`MAX_DISKS`] disks.
    #[error("{0} disks, more than {MAX_DISKS}")]
    TooManyDisks(usize),
    /// More than [`MAX_MIRRORED`] mirrored disks: each needs a data stream of its own.
    #[error("{0} mirrored disks, more than {MAX_MIRRORED} (each travels on a data stream of its own beside QEMU's)")]
    TooManyMirrors(usize),
    /// Two disks with one name.
    #[error("disk name {0} appears twice")]
    DuplicateDisk(String),
    /// A disk's chunk list does not fit its size, or a digest is not 32 bytes.
    #[error("disk {disk}: {reason}")]
    Inconsistent {
        /// Disk.
        disk: String,
        /// What is wrong.
        reason: String,
    },
}

fn check_chunk_size(chunk_size: u32) -> Result<(), ManifestError> {
    if !chunk_size.is_power_of_two() || !(MIN_CHUNK..=MAX_CHUNK).contains(&chunk_size) {
        return Err(ManifestError::ChunkSize(chunk_size));
    }
    Ok(())
}

/// BLAKE3 digest of one chunk.
pub fn chunk_digest(data: &[u8]) -> Digest {
    *blake3::hash(data).as_bytes()
}

/// Read `reader` to its end in `chunk_size` pieces; returns (total size, chunk digests).
pub fn hash_chunks(mut reader: impl Read, chunk_size: u32) -> io::Result<(u64, Vec<Digest>)> {
    let mut buf = vec![0u8; chunk_size as usize];
    let mut size = 0u64;
    let mut out = Vec::new();
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            match reader.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if filled == 0 {
            return Ok((size, out));
        }
        size += filled as u64;
        out.push(chunk_digest(&buf[..filled]));
        if filled < buf.len() {
            return Ok((size, out));
        }
    }
}

/// SHA-256 of a whole reader (the VM configuration digest).
pub fn sha256_reader(mut reader: impl Read) -> io::Result<Digest> {
    let mut ctx = digest::Context::new(&digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => ctx.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let mut d = [0u8; 32];
    d.copy_from_slice(ctx.finish().as_ref());
    Ok(d)
}

fn open(path: &Path) -> Result<File, ManifestError> {
    File::open(path).map_err(|source| ManifestError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Build a manifest for VM `vm` from its configuration file and `(name, image path)` disks,
/// streaming each file once.
pub fn build_manifest(
    vm: &str,
    config: &Path,
    disks: &[(&str, &Path)],
    chunk_size: u32,
) -> Result<ImageManifest, ManifestError> {
    check_chunk_size(chunk_size)?;
    if disks.len() > MAX_DISKS {
        return Err(ManifestError::TooManyDisks(disks.len()));
    }
    let io_err = |p: &Path| {
        let path = p.display().to_string();
        move |source| ManifestError::Io { path, source }
    };
    let config_digest = sha256_reader(open(config)?).map_err(io_err(config))?;
    let mut out = Vec::with_capacity(disks.len());
    for (name, path) in disks {
        if out.iter().any(|d: &DiskManifest| d.name == *name) {
            return Err(ManifestError::DuplicateDisk((*name).to_string()));
        }
        let (size, chunks) = hash_chunks(open(path)?, chunk_size).map_err(io_err(path))?;
        out.push(DiskManifest {
            name: (*name).to_string(),
            size,
            chunks: chunks
                .into_iter()
                .map(|c| ByteBuf::from(c.to_vec()))
                .collect(),
        });
    }
    Ok(ImageManifest {
        vm: vm.to_string(),
        config_digest,
        chunk_size,
        disks: out,
        mirrors: Vec::new(),
    })
}

/// Largest virtual size of a mirrored disk a manifest may announce (64 TiB).
pub const MAX_MIRROR_SIZE: u64 = 64 << 40;

/// Check that a (received) manifest is self-consistent: chunk size, disk count, unique names,
/// chunk counts matching sizes, 32-byte digests.
pub fn validate(m: &ImageManifest) -> Result<(), ManifestError> {
    check_chunk_size(m.chunk_size)?;
    let count = m.disks.len() + m.mirrors.len();
    if count > MAX_DISKS {
        return Err(ManifestError::TooManyDisks(count));
    }
    if m.mirrors.len() > MAX_MIRRORED {
        return Err(ManifestError::TooManyMirrors(m.mirrors.len()));
    }
    for (i, d) in m.mirrors.iter().enumerate() {
        let names = m.disks.iter().map(|o| &o.name);
        if names
            .chain(m.mirrors[..i].iter().map(|o| &o.name))
            .any(|n| *n == d.name)
        {
            return Err(ManifestError::DuplicateDisk(d.name.clone()));
        }
        if d.virtual_size == 0 || d.virtual_size % 512 != 0 || d.virtual_size > MAX_MIRROR_SIZE {
            return Err(ManifestError::Inconsistent {
                disk: d.name.clone(),
                reason: format!(
                    "virtual size {} is not a multiple of 512 in 512..=64 TiB",
                    d.virtual_size
                ),
            });
        }
    }
    for (i, d) in m.disks.iter().enumerate() {
        if m.disks[..i].iter().any(|o| o.name == d.name) {
            return Err(ManifestError::DuplicateDisk(d.name.clone()));
        }
        let want = d.size.div_ceil(u64::from(m.chunk_size));
        if d.chunks.len() as u64 != want {
            return Err(ManifestError::Inconsistent {
                disk: d.name.clone(),
                reason: format!(
                    "{} chunks for {} bytes, expected {want}",
                    d.chunks.len(),
                    d.size
                ),
            });
        }
        if d.chunks.iter().any(|c| c.len() != 32) {
            return Err(ManifestError::Inconsistent {
                disk: d.name.clone(),
                reason: "a chunk digest is not 32 bytes".into(),
            });
        }
    }
    Ok(())
}

/// A received chunk that does not match the manifest.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChunkError {
    /// The disk is not in the manifest.
    #[error("disk {0} is not in the manifest")]
    UnknownDisk(String),
    /// The chunk's content matches no chunk of this disk: it was altered.
    #[error("disk {disk} chunk {index}: content does not match the manifest digest")]
    Altered {
        /// Disk.
        disk: String,
        /// Position in the stream.
        index: u64,
    },
    /// The chunk's content is another chunk of this disk: the stream was reordered.
    #[error("disk {disk}: chunk {found} arrived at position {index}")]
    Reordered {
        /// Disk.
        disk: String,
        /// Position in the stream.
        index: u64,
        /// Manifest index of the chunk whose content arrived.
        found: u64,
    },
    /// A chunk beyond the disk's last chunk.
    #[error("disk {disk}: extra chunk at position {index}, the manifest has {count}")]
    Extra {
        /// Disk.
        disk: String,
        /// Position.
        index: u64,
        /// Chunks in the manifest.
        count: u64,
    },
    /// A chunk of the wrong length (all are `chunk_size` except possibly the last).
    #[error("disk {disk} chunk {index}: {len} bytes, expected {expected}")]
    Length {
        /// Disk.
        disk: String,
        /// Position.
        index: u64,
        /// Received length.
        len: usize,
        /// Expected length.
        expected: u64,
    },
    /// At the end, a disk is incomplete.
    #[error("disk {disk}: {received} of {count} chunks received")]
    Missing {
        /// Disk.
        disk: String,
        /// Chunks received.
        received: u64,
        /// Chunks in the manifest.
        count: u64,
    },
    /// A chunk after an earlier failure: the checker fails permanently.
    #[error("chunk checker already failed: {0}")]
    Failed(Box<ChunkError>),
}

struct DiskState {
    next: u64,
    by_digest: HashMap<Digest, u64>,
}

/// Verifies disk chunks against a manifest as they arrive, in order, per disk.
pub struct ChunkChecker {
    manifest: ImageManifest,
    disks: Vec<DiskState>,
    failed: Option<ChunkError>,
}

impl ChunkChecker {
    /// A checker for `manifest` (validated first).
    pub fn new(manifest: ImageManifest) -> Result<Self, ManifestError> {
        validate(&manifest)?;
        let disks = manifest
            .disks
            .iter()
            .map(|d| {
                let mut by_digest = HashMap::with_capacity(d.chunks.len());
                for (i, c) in d.chunks.iter().enumerate() {
                    let mut k = [0u8; 32];
                    k.copy_from_slice(c);
                    by_digest.entry(k).or_insert(i as u64);
                }
                DiskState { next: 0, by_digest }
            })
            .collect();
        Ok(Self {
            manifest,
            disks,
            failed: None,
        })
    }

    /// The manifest being checked against.
    pub fn manifest(&self) -> &ImageManifest {
        &self.manifest
    }

    /// Check the next chunk of `disk`. Any error is permanent for this checker.
    pub fn check_chunk(&mut self, disk: &str, data: &[u8]) -> Result<(), ChunkError> {
        if let Some(e) = &self.failed {
            return Err(ChunkError::Failed(Box::new(e.clone())));
        }
        let r = self.check_inner(disk, data);
        if let Err(e) = &r {
            self.failed = Some(e.clone());
        }
        r
    }

    fn check_inner(&mut self, disk: &str, data: &[u8]) -> Result<(), ChunkError> {
        let i = self
            .manifest
            .disks
            .iter()
            .position(|d| d.name == disk)
            .ok_or_else(|| ChunkError::UnknownDisk(disk.to_string()))?;
        let d = &self.manifest.disks[i];
        let st = &mut self.disks[i];
        let count = d.chunks.len() as u64;
        let index = st.next;
        if index >= count {
            return Err(ChunkError::Extra {
                disk: d.name.clone(),
                index,
                count,
            });
        }
        let cs = u64::from(self.manifest.chunk_size);
        let expected = (d.size - index * cs).min(cs);
        if data.len() as u64 != expected {
            return Err(ChunkError::Length {
                disk: d.name.clone(),
                index,
                len: data.len(),
                expected,
            });
        }
        let got = chunk_digest(data);
        if !trustmig_protocol::ct_eq(&got, &d.chunks[index as usize]) {
            return Err(match st.by_digest.get(&got) {
                Some(&found) => ChunkError::Reordered {
                    disk: d.name.clone(),
                    index,
                    found,
                },
                None => ChunkError::Altered {
                    disk: d.name.clone(),
                    index,
                },
            });
        }
        st.next += 1;
        Ok(())
    }

    /// After the last chunk: every disk must be complete.
    pub fn finish(self) -> Result<(), ChunkError> {
        if let Some(e) = self.failed {
            return Err(ChunkError::Failed(Box::new(e)));
        }
        for (d, st) in self.manifest.disks.iter().zip(&self.disks) {
            let count = d.chunks.len() as u64;
            if st.next != count {
                return Err(ChunkError::Missing {
                    disk: d.name.clone(),
                    received: st.next,
                    count,
                });
            }
        }
        Ok(())
    }
}
