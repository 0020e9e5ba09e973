//! Disk transfer in QEMU sidecar mode: a disk that is not on shared storage travels on data
//! stream 0 as `DiskChunk` records before QEMU's stream, is checked chunk by chunk against the
//! attested image manifest, and is attached to the destination QEMU only once all of it
//! verified. spec: spec/qemu.md §5, SPEC.md §7.2
//!
//! Supported disks: raw image files that the source QEMU has open **read-only** (`-drive
//! ...,format=raw,readonly=on` or `-blockdev ...,read-only=on`), so that the guest cannot change
//! them while they are copied. Anything else is refused with the reason. The source also checks
//! every chunk it reads against the manifest it attested, so a change by anyone else during the
//! copy aborts the migration before QEMU's own migration starts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{info, warn};
use trustmig_attest::manifest::{hash_chunks, ChunkChecker, DEFAULT_CHUNK};
use trustmig_protocol::error::PeerMisbehaved;
use trustmig_protocol::manifest::{DiskManifest, ImageManifest};
use trustmig_protocol::order::{hex, OrderId};
use trustmig_protocol::record::{RecordType, Sealer, MAX_PAYLOAD};

use crate::config::{DiskVerify, MirrorMode, QemuVm, VmConfig};

use super::mirror::{named_block_nodes, ours, stale, BlockNode, SourceMirror};
use super::pumps::Counting;
use crate::error::AgentError;
use crate::journal::Journal;
use crate::net::wire::{read_record, WireError};
use trustmig_qemu::qmp::Qmp;

/// Chunk size of the disks in the manifest: one chunk per `DiskChunk` record.
pub const DISK_CHUNK: u32 = DEFAULT_CHUNK;
const _: () = assert!(DISK_CHUNK as usize <= MAX_PAYLOAD);

fn mig(s: String) -> AgentError {
    AgentError::Migration(s)
}

fn proto(e: impl Into<trustmig_protocol::Error>) -> AgentError {
    AgentError::Protocol(e.into())
}

// ---------------------------------------------------------------------------------------------
// Source.

/// A disk the source sends.
#[derive(Clone, Debug)]
pub struct SourceDisk {
    /// Manifest name.
    pub name: String,
    /// Image file.
    pub path: PathBuf,
}

fn same_file(qemu: &str, ours: &Path) -> bool {
    let q = Path::new(qemu);
    q.is_absolute()
        && (q == ours
            || matches!((q.canonicalize(), ours.canonicalize()), (Ok(a), Ok(b)) if a == b))
}

/// The disks of `vm` this source moves (the `[[vm.disk]]` entries with a `path`), as QEMU
/// has them open: a raw image open read-only is copied chunk by chunk before QEMU's stream; a
/// writable raw or qcow2 image is mirrored live (`mirror.rs`). Anything else is refused, with
/// the reason, before anything moves.
pub async fn source_disks(
    vm: &QemuVm,
    qmp: &mut Qmp,
) -> Result<(Vec<SourceDisk>, Vec<SourceMirror>), AgentError> {
    let wanted: Vec<(&str, &Path, MirrorMode, DiskVerify)> = vm
        .disks
        .iter()
        .filter_map(|d| {
            Some((
                d.name.as_str(),
                d.path.as_deref()?,
                d.mirror.unwrap_or_default(),
                d.verify.unwrap_or_default(),
            ))
        })
        .collect();
    if wanted.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let nodes = named_block_nodes(qmp).await?;
    let (mut copied, mut mirrored) = (Vec::new(), Vec::new());
    for (name, path, mode, verify) in wanted {
        // Not a mirror's filter node of ours: one an earlier order left (its agent killed
        // mid-mirror) is removed once this order holds the VM (`mirror::start`).
        let mine: Vec<&BlockNode> = nodes
            .iter()
            .filter(|n| same_file(&n.file, path) && !ours(n))
            .collect();
        let shown = path.display();
        // The format node (raw, qcow2, ...) over the protocol node (`file`), or the protocol
        // node alone when the device sits on it directly.
        let Some(top) = mine
            .iter()
            .find(|n| n.drv != "file")
            .or_else(|| mine.first())
        else {
            return Err(mig(format!(
                "disk {name}: the source QEMU has no block node on {shown} (QEMU must open the image by this absolute path)"
            )));
        };
        if mine.iter().all(|n| n.ro) && matches!(top.drv.as_str(), "raw" | "file") {
            if verify == DiskVerify::Full {
                return Err(AgentError::Refused(format!(
                    "disk {name}: verify = \"full\" is for mirrored (writable) disks; {shown} is open read-only and is checked chunk by chunk against the manifest already"
                )));
            }
            copied.push(SourceDisk {
                name: name.to_string(),
                path: path.to_path_buf(),
            });
        } else {
            mirrored.push(super::mirror::source_mirror(
                (mirrored.len(), name, mode, verify),
                path,
                top,
            )?);
        }
    }
    for m in mirrored.iter().filter(|m| m.verify_full) {
        // Before anything moves: an image that cannot be hashed as the guest sees it would
        // otherwise roll back a finished move, with the guest paused.
        let (path, format, size) = (m.path.clone(), m.format, m.virtual_size);
        tokio::task::spawn_blocking(move || super::image::preflight(&path, format, size))
            .await
            .map_err(|e| mig(format!("disk {}: checking the image: {e}", m.name)))?
            .map_err(|source| AgentError::Image {
                disk: m.name.clone(),
                source: Box::new(source),
            })?;
    }
    Ok((copied, mirrored))
}

/// Chunk digests of the source's disks, for the manifest.
pub async fn hash_disks(disks: &[SourceDisk]) -> Result<Vec<DiskManifest>, AgentError> {
    let disks = disks.to_vec();
    tokio::task::spawn_blocking(move || {
        disks
            .iter()
            .map(|d| {
                let f = std::fs::File::open(&d.path).map_err(AgentError::io(&d.path))?;
                let (size, chunks) = hash_chunks(std::io::BufReader::new(f), DISK_CHUNK)
                    .map_err(AgentError::io(&d.path))?;
                Ok(DiskManifest {
                    name: d.name.clone(),
                    size,
                    chunks: chunks
                        .into_iter()
                        .map(|c| serde_bytes::ByteBuf::from(c.to_vec()))
                        .collect(),
                })
            })
            .collect()
    })
    .await
    .map_err(|e| mig(format!("hashing disks: {e}")))?
}

/// Read up to `buf.len()` bytes (fewer only at the end of the file).
async fn read_full<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let k = r.read(&mut buf[n..]).await?;
        if k == 0 {
            break;
        }
        n += k;
    }
    Ok(n)
}

/// Send every disk of `manifest` as `DiskChunk` records, in manifest order, each chunk checked
/// against the manifest first (the image must not have changed since it was hashed). Returns
/// the bytes written to `to`.
pub async fn send_disks<W: AsyncWrite + Unpin>(
    to: &mut W,
    sealer: &mut Sealer,
    manifest: &ImageManifest,
    disks: &[SourceDisk],
) -> Result<u64, AgentError> {
    let mut checker =
        ChunkChecker::new(manifest.clone()).map_err(|e| mig(format!("own manifest: {e}")))?;
    let cs = manifest.chunk_size as usize;
    let mut buf = vec![0u8; cs];
    let mut out = Vec::with_capacity(cs + 64);
    let mut wire = 0u64;
    let mut index = 0u64;
    for dm in &manifest.disks {
        let d = disks
            .iter()
            .find(|d| d.name == dm.name)
            .ok_or_else(|| mig(format!("disk {} of the manifest has no image", dm.name)))?;
        let mut f = tokio::fs::File::open(&d.path)
            .await
            .map_err(AgentError::io(&d.path))?;
        let changed = |what: String| {
            mig(format!(
                "disk {} ({}) changed while it was copied: {what}",
                dm.name,
                d.path.display()
            ))
        };
        for _ in 0..dm.chunks.len() {
            let n = read_full(&mut f, &mut buf)
                .await
                .map_err(AgentError::io(&d.path))?;
            checker
                .check_chunk(&dm.name, &buf[..n])
                .map_err(|e| changed(e.to_string()))?;
            if n > 0 && crate::fault::alter_disk_chunk(index) {
                warn!(
                    chunk = index,
                    "fault injection: altering a disk chunk after its check"
                );
                buf[0] ^= 1;
            }
            out.clear();
            sealer
                .seal(RecordType::DiskChunk, &buf[..n], &mut out)
                .map_err(|e| AgentError::Protocol(e.into()))?;
            to.write_all(&out)
                .await
                .map_err(|e| mig(format!("data stream 0: {e}")))?;
            wire += out.len() as u64;
            index += 1;
        }
        if read_full(&mut f, &mut buf[..1])
            .await
            .map_err(AgentError::io(&d.path))?
            != 0
        {
            return Err(changed("it grew".into()));
        }
        info!(disk = %dm.name, bytes = dm.size, "disk sent");
    }
    checker
        .finish()
        .map_err(|e| mig(format!("disk transfer: {e}")))?;
    Ok(wire)
}

// ---------------------------------------------------------------------------------------------
// Destination.

/// Where a received disk goes and how the destination QEMU attaches it.
#[derive(Clone, Debug)]
pub struct Target {
    name: String,
    /// Written while it arrives; renamed to `path` once every disk verified.
    part: PathBuf,
    path: PathBuf,
    /// `<path>.trustmig-order`: the order that received the image, until it committed.
    marker: PathBuf,
    device: serde_json::Map<String, Value>,
}

impl Target {
    /// Files this target may leave behind (to remove when the migration fails).
    pub fn files(&self) -> [&Path; 3] {
        [&self.part, &self.path, &self.marker]
    }
}

/// Check that this destination can take the manifest's disks: each one configured with a
/// device, `disk_dir` set, no existing file overwritten, chunks that fit one record each. An
/// image in the way that this agent received for an order journalled as rolled back (its
/// marker says which: an agent killed after the rename, before it could remove it) is removed;
/// any other is refused.
pub fn plan(
    manifest: &ImageManifest,
    vm: Option<&VmConfig>,
    journal: &Journal,
) -> Result<Vec<Target>, AgentError> {
    if manifest.disks.is_empty() {
        return Ok(Vec::new());
    }
    trustmig_attest::manifest::validate(manifest)
        .map_err(|e| mig(format!("the source's manifest: {e}")))?;
    if manifest.chunk_size as usize > MAX_PAYLOAD {
        return Err(mig(format!(
            "the source's disk chunks are {} bytes; one record carries at most {MAX_PAYLOAD}",
            manifest.chunk_size
        )));
    }
    let (q, dir) = disk_home(manifest, vm)?;
    let mut out = Vec::with_capacity(manifest.disks.len());
    for d in &manifest.disks {
        let device = device_of(q, &d.name)?;
        let path = dir.join(format!("{}.raw", d.name));
        let part = dir.join(format!("{}.raw.part", d.name));
        let marker = dir.join(format!("{}.raw.trustmig-order", d.name));
        if path.exists() && !stale(&path, &marker, journal) {
            return Err(mig(format!(
                "disk {:?}: {} exists; refusing to overwrite it (remove it if it is not in use)",
                d.name,
                path.display()
            )));
        }
        out.push(Target {
            name: d.name.clone(),
            part,
            path,
            marker,
            device,
        });
    }
    Ok(out)
}

/// The destination's QEMU configuration of the manifest's VM and its `disk_dir` (created),
/// where the disks that arrive go.
pub(crate) fn disk_home<'a>(
    manifest: &ImageManifest,
    vm: Option<&'a VmConfig>,
) -> Result<(&'a QemuVm, &'a Path), AgentError> {
    let vm = vm.ok_or_else(|| mig(format!("no VM {:?} configured here", manifest.vm)))?;
    let q = vm
        .qemu()
        .ok_or_else(|| mig(format!("VM {:?} here is not a QEMU VM", vm.name)))?;
    let dir = q.disk_dir.as_ref().ok_or_else(|| {
        mig(format!(
            "the source sends {} disk(s) for {:?} but its [[vm]] here has no disk_dir",
            manifest.disks.len() + manifest.mirrors.len(),
            vm.name
        ))
    })?;
    std::fs::create_dir_all(dir).map_err(AgentError::io(dir))?;
    Ok((q, dir))
}

/// The `device_add` arguments for disk `name` (a safe name, configured here with a device).
pub(crate) fn device_of(
    q: &QemuVm,
    name: &str,
) -> Result<serde_json::Map<String, Value>, AgentError> {
    crate::config::check_disk_name(name).map_err(|e| mig(format!("the source's manifest: {e}")))?;
    let device = q
        .disks
        .iter()
        .find(|c| c.name == name)
        .and_then(|c| c.device.as_ref())
        .ok_or_else(|| {
            mig(format!(
                "the source sends disk {name:?}, which has no [[vm.disk]] with a device here"
            ))
        })?;
    match serde_json::to_value(device) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(mig(format!("disk {name:?}: device is not a table"))),
    }
}

/// Receive every disk of `manifest` from `from` (stream 0, after `StreamInit`): each chunk is
/// checked against the manifest before it is written; once all verified, the files are synced
/// and renamed into place. Each image's marker names `order_id` before any of its bytes land,
/// so that whatever a crash leaves can be traced to this order. Returns the payload bytes
/// received.
pub(crate) async fn receive_disks<R: AsyncRead + Unpin>(
    from: &mut R,
    opener: &mut Counting,
    (manifest, order_id): (&ImageManifest, &OrderId),
    targets: &[Target],
    timeout: Duration,
) -> Result<u64, AgentError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut checker = ChunkChecker::new(manifest.clone())
        .map_err(|e| mig(format!("the source's manifest: {e}")))?;
    let mut buf = Vec::with_capacity(MAX_PAYLOAD + 64);
    let mut total = 0u64;
    for (d, t) in manifest.disks.iter().zip(targets) {
        std::fs::write(&t.marker, hex(order_id)).map_err(AgentError::io(&t.marker))?;
        let _ = std::fs::remove_file(&t.part);
        let std_file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&t.part)
            .map_err(AgentError::io(&t.part))?;
        let mut f = tokio::fs::File::from_std(std_file);
        let mut got = 0usize;
        while got < d.chunks.len() {
            // What the peer sent wrong keeps its type (the Abort says record-failure,
            // protocol-violation or digest-mismatch); a cut or a silent peer is local.
            let more = tokio::time::timeout(timeout, read_record(from, &mut buf))
                .await
                .map_err(|_| mig(format!("disk {}: no chunk arrived in time", d.name)))?
                .map_err(|e| match e {
                    WireError::Record(r) => proto(r),
                    e => mig(format!("data stream 0: {e}")),
                })?;
            if !more {
                return Err(mig("data stream 0 cut during the disk transfer".into()));
            }
            let (typ, payload) = opener.open(&mut buf).map_err(proto)?;
            match typ {
                RecordType::DiskChunk => {}
                RecordType::KeyUpdate => continue,
                t => {
                    return Err(proto(PeerMisbehaved::BadField(format!(
                        "data stream 0: {t:?} record while disk {} is incomplete",
                        d.name
                    ))))
                }
            }
            // Checked before it touches the file.
            checker
                .check_chunk(&d.name, payload)
                .map_err(|e| proto(PeerMisbehaved::DiskMismatch(e.to_string())))?;
            f.write_all(payload)
                .await
                .map_err(AgentError::io(&t.part))?;
            total += payload.len() as u64;
            got += 1;
        }
        f.sync_all().await.map_err(AgentError::io(&t.part))?;
    }
    checker
        .finish()
        .map_err(|e| proto(PeerMisbehaved::DiskMismatch(e.to_string())))?;
    for t in targets {
        std::fs::rename(&t.part, &t.path).map_err(AgentError::io(&t.path))?;
    }
    Ok(total)
}

/// Attach the verified disks to the destination QEMU: `blockdev-add` (raw, read-only, as on the
/// source) and `device_add` with the configured device and `drive = <name>`.
pub async fn attach(qmp: &mut Qmp, targets: &[Target]) -> Result<(), AgentError> {
    for t in targets {
        qmp.execute(
            "blockdev-add",
            json!({
                "driver": "raw",
                "node-name": t.name,
                "read-only": true,
                "file": { "driver": "file", "filename": t.path, "read-only": true },
            }),
        )
        .await
        .map_err(|e| mig(format!("attaching disk {}: QEMU: {e}", t.name)))?;
        let mut dev = t.device.clone();
        dev.insert("drive".into(), Value::String(t.name.clone()));
        qmp.execute("device_add", Value::Object(dev))
            .await
            .map_err(|e| mig(format!("attaching disk {}: QEMU: {e}", t.name)))?;
        info!(disk = %t.name, path = %t.path.display(), "verified disk attached to the destination QEMU");
    }
    Ok(())
}

/// Remove what a failed migration left of received disks.
pub fn discard(files: &[PathBuf]) {
    for f in files {
        match std::fs::remove_file(f) {
            Ok(()) => warn!(file = %f.display(), "received disk discarded"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(file = %f.display(), "could not remove a received disk: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::qemu::mirror::tests::journal_with;
    use crate::backend::qemu::pumps::test_pair as pair;
    use crate::config::{test_dest_disk as dest_disk, DiskConfig};
    use crate::journal::State;

    /// The order the tests receive disks for.
    const ORDER: OrderId = [0xab; 16];

    fn vm(dir: &Path, disks: Vec<DiskConfig>) -> VmConfig {
        let mut v = crate::config::test_qemu_vm("/run/q.sock", Some(dir));
        if let crate::config::VmBackend::Qemu(q) = &mut v.backend {
            q.disks = disks;
        }
        v
    }

    /// (image bytes, source disk, manifest) for a 2.5-chunk image.
    async fn image(dir: &Path) -> (Vec<u8>, SourceDisk, ImageManifest) {
        let data: Vec<u8> = (0..(DISK_CHUNK as usize * 5 / 2))
            .map(|i| (i / 4096) as u8 ^ (i as u8))
            .collect();
        let path = dir.join("src.img");
        std::fs::write(&path, &data).expect("write image");
        let sd = SourceDisk {
            name: "d0".into(),
            path,
        };
        let disks = hash_disks(std::slice::from_ref(&sd)).await.expect("hash");
        let m = ImageManifest {
            vm: "q".into(),
            config_digest: [0; 32],
            chunk_size: DISK_CHUNK,
            disks,
            mirrors: Vec::new(),
        };
        (data, sd, m)
    }

    #[tokio::test]
    async fn a_disk_travels_and_verifies() {
        let tmp = tempfile::tempdir().expect("tmp");
        let j = journal_with(tmp.path(), &hex(&ORDER), State::Claimed);
        let (data, sd, m) = image(tmp.path()).await;
        assert_eq!(m.disks[0].chunks.len(), 3);
        let (mut sealer, mut opener) = pair();
        let mut wire = Vec::new();
        send_disks(&mut wire, &mut sealer, &m, &[sd])
            .await
            .expect("send");
        let out = tmp.path().join("out");
        let cfg = vm(&out, vec![dest_disk("d0")]);
        let targets = plan(&m, Some(&cfg), &j).expect("plan");
        let n = receive_disks(
            &mut &wire[..],
            &mut opener,
            (&m, &ORDER),
            &targets,
            Duration::from_secs(5),
        )
        .await
        .expect("receive");
        assert_eq!(n, data.len() as u64);
        assert_eq!(std::fs::read(out.join("d0.raw")).expect("read"), data);
        assert!(!out.join("d0.raw.part").exists());
        // A second transfer would overwrite it: refused, while the order that received it
        // (its marker says which) did not roll back.
        let marker = out.join("d0.raw.trustmig-order");
        assert_eq!(
            std::fs::read_to_string(&marker).expect("marker"),
            hex(&ORDER)
        );
        let e = plan(&m, Some(&cfg), &j).unwrap_err().to_string();
        assert!(e.contains("refusing to overwrite"), "{e}");
        assert!(out.join("d0.raw").exists());
        // An agent killed after the rename left it: once its order is journalled rolled back
        // (the restart settles it so), the next order's plan removes image and marker (before,
        // the next order was refused until someone removed the file by hand).
        drop(j);
        let rolled_back = journal_with(&tmp.path().join("b"), &hex(&ORDER), State::RolledBack);
        let t = plan(&m, Some(&cfg), &rolled_back).expect("the leftover does not block");
        assert_eq!(t[0].path, out.join("d0.raw"));
        assert!(!out.join("d0.raw").exists() && !marker.exists());
    }

    #[tokio::test]
    async fn an_altered_chunk_is_refused_before_it_is_written() {
        let tmp = tempfile::tempdir().expect("tmp");
        let j = journal_with(tmp.path(), &hex(&ORDER), State::Claimed);
        let (_, _, m) = image(tmp.path()).await;
        // A sealer that sends chunk 1 altered (the record layer is intact: a lying sender).
        let (mut sealer, mut opener) = pair();
        let mut wire = Vec::new();
        let data = std::fs::read(tmp.path().join("src.img")).expect("read");
        for (i, c) in data.chunks(DISK_CHUNK as usize).enumerate() {
            let mut c = c.to_vec();
            if i == 1 {
                c[100] ^= 0x40;
            }
            sealer
                .seal(RecordType::DiskChunk, &c, &mut wire)
                .expect("seal");
        }
        let out = tmp.path().join("out");
        let targets = plan(&m, Some(&vm(&out, vec![dest_disk("d0")])), &j).expect("plan");
        let e = receive_disks(
            &mut &wire[..],
            &mut opener,
            (&m, &ORDER),
            &targets,
            Duration::from_secs(5),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(e.contains("chunk 1: content does not match"), "{e}");
        assert!(!out.join("d0.raw").exists(), "nothing lands in place");
        // tokio's File completes writes in the background, so chunk 0 may or may not have
        // landed yet; what matters is that the altered chunk 1 never did.
        let part = std::fs::metadata(out.join("d0.raw.part")).expect("part");
        assert!(
            part.len() <= u64::from(DISK_CHUNK),
            "only the verified chunk 0 may be written, found {} bytes",
            part.len()
        );
    }

    #[tokio::test]
    async fn source_notices_a_changed_image_and_a_short_stream_is_refused() {
        let tmp = tempfile::tempdir().expect("tmp");
        let j = journal_with(tmp.path(), &hex(&ORDER), State::Claimed);
        let (mut data, sd, m) = image(tmp.path()).await;
        data[DISK_CHUNK as usize + 5] ^= 1;
        std::fs::write(&sd.path, &data).expect("rewrite");
        let (mut sealer, mut opener) = pair();
        let mut wire = Vec::new();
        let e = send_disks(&mut wire, &mut sealer, &m, &[sd])
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("changed while it was copied"), "{e}");
        // What was sent (chunk 0) ends early: a cut.
        let out = tmp.path().join("out");
        let targets = plan(&m, Some(&vm(&out, vec![dest_disk("d0")])), &j).expect("plan");
        let e = receive_disks(
            &mut &wire[..],
            &mut opener,
            (&m, &ORDER),
            &targets,
            Duration::from_secs(5),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(e.contains("cut"), "{e}");
    }

    #[tokio::test]
    async fn plan_names_what_is_missing() {
        let tmp = tempfile::tempdir().expect("tmp");
        let j = journal_with(tmp.path(), &hex(&ORDER), State::Claimed);
        let (_, _, m) = image(tmp.path()).await;
        let e = plan(&m, Some(&vm(tmp.path(), vec![])), &j)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no [[vm.disk]] with a device"), "{e}");
        let mut no_dir = vm(tmp.path(), vec![dest_disk("d0")]);
        if let crate::config::VmBackend::Qemu(q) = &mut no_dir.backend {
            q.disk_dir = None;
        }
        assert!(plan(&m, Some(&no_dir), &j)
            .unwrap_err()
            .to_string()
            .contains("no disk_dir"));
        let mut bad = m.clone();
        bad.disks[0].name = "../x".into();
        // Refused by the name rule, before any lookup of a device (which would fail too).
        let e = plan(&bad, Some(&vm(tmp.path(), vec![dest_disk("d0")])), &j)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("the source's manifest") && e.contains("\"../x\""),
            "{e}"
        );
        assert!(plan(&m, None, &j).is_err());
    }
}
