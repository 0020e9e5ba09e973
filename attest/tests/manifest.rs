//! Image manifests from files and the streaming chunk checker (no TPM needed).

use std::io::Write;

use trustmig_attest::manifest::{
    build_manifest, chunk_digest, validate, ChunkChecker, ChunkError, ManifestError, MIN_CHUNK,
};
use trustmig_protocol::manifest::{manifest_root, ImageManifest};

const CS: usize = MIN_CHUNK as usize;

fn image(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed ^ (i >> 16) as u8)
        .collect()
}

struct Files {
    _dir: tempfile::TempDir,
    manifest: ImageManifest,
    disk0: Vec<u8>,
    disk1: Vec<u8>,
}

fn files() -> Files {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("vm.toml");
    std::fs::write(&cfg, b"memory = 1024\n").expect("write config");
    let disk0 = image(3 * CS + 1234, 1);
    let disk1 = image(2 * CS, 2);
    let p0 = dir.path().join("disk0.img");
    let p1 = dir.path().join("disk1.img");
    std::fs::File::create(&p0)
        .and_then(|mut f| f.write_all(&disk0))
        .expect("write disk0");
    std::fs::File::create(&p1)
        .and_then(|mut f| f.write_all(&disk1))
        .expect("write disk1");
    let manifest = build_manifest("vm1", &cfg, &[("vda", &p0), ("vdb", &p1)], MIN_CHUNK)
        .expect("build manifest");
    Files {
        _dir: dir,
        manifest,
        disk0,
        disk1,
    }
}

#[test]
fn manifest_from_files() {
    let f = files();
    let m = &f.manifest;
    assert_eq!(m.vm, "vm1");
    assert_eq!(
        m.config_digest,
        trustmig_protocol::sha256(&[b"memory = 1024\n"])
    );
    assert_eq!(m.disks[0].size, f.disk0.len() as u64);
    assert_eq!(m.disks[0].chunks.len(), 4);
    assert_eq!(
        m.disks[0].chunks[3].as_ref(),
        chunk_digest(&f.disk0[3 * CS..])
    );
    assert_eq!(m.disks[1].chunks.len(), 2);
    validate(m).expect("consistent");
    // The root is over the encoded bytes and changes with any chunk digest.
    let root = manifest_root(&m.to_cbor());
    let mut other = m.clone();
    other.disks[1].chunks[0][0] ^= 1;
    assert_ne!(manifest_root(&other.to_cbor()), root);
}

fn chunks(data: &[u8]) -> Vec<&[u8]> {
    data.chunks(CS).collect()
}

#[test]
fn all_chunks_in_order_pass() {
    let f = files();
    let mut c = ChunkChecker::new(f.manifest.clone()).expect("checker");
    // Disks may interleave; within a disk chunks come in order.
    let (a, b) = (chunks(&f.disk0), chunks(&f.disk1));
    c.check_chunk("vda", a[0]).expect("vda 0");
    c.check_chunk("vdb", b[0]).expect("vdb 0");
    for x in &a[1..] {
        c.check_chunk("vda", x).expect("vda");
    }
    c.check_chunk("vdb", b[1]).expect("vdb 1");
    c.finish().expect("complete");
}

#[test]
fn altered_chunk() {
    let f = files();
    let mut c = ChunkChecker::new(f.manifest.clone()).expect("checker");
    let mut bad = f.disk0[CS..2 * CS].to_vec();
    bad[100] ^= 0x80;
    c.check_chunk("vda", &f.disk0[..CS]).expect("chunk 0");
    assert_eq!(
        c.check_chunk("vda", &bad),
        Err(ChunkError::Altered {
            disk: "vda".into(),
            index: 1
        })
    );
    // The failure is permanent.
    assert!(matches!(
        c.check_chunk("vda", &f.disk0[CS..2 * CS]),
        Err(ChunkError::Failed(_))
    ));
}

#[test]
fn reordered_chunks() {
    let f = files();
    let mut c = ChunkChecker::new(f.manifest.clone()).expect("checker");
    let a = chunks(&f.disk0);
    c.check_chunk("vda", a[0]).expect("chunk 0");
    assert_eq!(
        c.check_chunk("vda", a[2]),
        Err(ChunkError::Reordered {
            disk: "vda".into(),
            index: 1,
            found: 2
        })
    );
}

#[test]
fn missing_chunk() {
    let f = files();
    let mut c = ChunkChecker::new(f.manifest.clone()).expect("checker");
    for x in chunks(&f.disk0) {
        c.check_chunk("vda", x).expect("vda");
    }
    c.check_chunk("vdb", &f.disk1[..CS]).expect("vdb 0");
    assert_eq!(
        c.finish(),
        Err(ChunkError::Missing {
            disk: "vdb".into(),
            received: 1,
            count: 2
        })
    );
}

#[test]
fn extra_chunk() {
    let f = files();
    let mut c = ChunkChecker::new(f.manifest.clone()).expect("checker");
    for x in chunks(&f.disk1) {
        c.check_chunk("vdb", x).expect("vdb");
    }
    assert_eq!(
        c.check_chunk("vdb", &f.disk1[..CS]),
        Err(ChunkError::Extra {
            disk: "vdb".into(),
            index: 2,
            count: 2
        })
    );
}

#[test]
fn wrong_length_and_unknown_disk() {
    let f = files();
    let mut c = ChunkChecker::new(f.manifest.clone()).expect("checker");
    assert_eq!(
        c.check_chunk("vda", &f.disk0[..CS - 1]),
        Err(ChunkError::Length {
            disk: "vda".into(),
            index: 0,
            len: CS - 1,
            expected: CS as u64
        })
    );
    let mut c = ChunkChecker::new(f.manifest.clone()).expect("checker");
    assert_eq!(
        c.check_chunk("vdz", &f.disk0[..CS]),
        Err(ChunkError::UnknownDisk("vdz".into()))
    );
}

#[test]
fn inconsistent_manifests_are_refused() {
    let f = files();
    let mut m = f.manifest.clone();
    m.disks[0].chunks.pop();
    assert!(matches!(
        ChunkChecker::new(m).err(),
        Some(ManifestError::Inconsistent { .. })
    ));
    let mut m = f.manifest.clone();
    m.chunk_size = 3000;
    assert!(matches!(validate(&m), Err(ManifestError::ChunkSize(3000))));
    let mut m = f.manifest.clone();
    m.disks[1].name = "vda".into();
    assert!(matches!(validate(&m), Err(ManifestError::DuplicateDisk(_))));
}

#[test]
fn mirrored_disks_are_validated_and_bound_by_the_root() {
    use trustmig_protocol::manifest::{DiskFormat, MirrorDisk};
    let f = files();
    let plain = f.manifest.to_cbor();
    let mut m = f.manifest.clone();
    m.mirrors.push(MirrorDisk {
        name: "vdc".into(),
        format: DiskFormat::Qcow2,
        virtual_size: 1 << 30,
        verify_full: false,
    });
    validate(&m).expect("consistent");
    // Without mirrors the encoding is the old one (no `mirrors` key at all); with them the
    // root covers them.
    let has_key = |cbor: &[u8]| cbor.windows(7).any(|w| w == b"mirrors");
    assert!(!has_key(&plain) && has_key(&m.to_cbor()));
    let root = manifest_root(&m.to_cbor());
    let mut raw = m.clone();
    raw.mirrors[0].format = DiskFormat::Raw;
    assert_ne!(manifest_root(&raw.to_cbor()), root);
    // Verifying in full is attested too: the destination cannot be talked out of it.
    let mut full = m.clone();
    full.mirrors[0].verify_full = true;
    assert_ne!(manifest_root(&full.to_cbor()), root);
    // A name used twice (also across chunked and mirrored disks), an odd size, too large.
    let mut dup = m.clone();
    dup.mirrors[0].name = "vda".into();
    assert!(matches!(validate(&dup), Err(ManifestError::DuplicateDisk(n)) if n == "vda"));
    for size in [0, 1000, (64 << 40) + 512] {
        let mut bad = m.clone();
        bad.mirrors[0].virtual_size = size;
        let e = validate(&bad).unwrap_err().to_string();
        assert!(e.contains("virtual size"), "{size}: {e}");
    }
    let mut many = m;
    for i in 0..15 {
        many.mirrors.push(MirrorDisk {
            name: format!("m{i}"),
            format: DiskFormat::Raw,
            virtual_size: 512,
            verify_full: false,
        });
    }
    assert!(matches!(
        validate(&many),
        Err(ManifestError::TooManyDisks(18))
    ));
    // Fifteen mirrored disks fit a session's sixteen streams beside QEMU's; sixteen do not,
    // though sixteen disks may be copied (before, the manifest passed and every handshake
    // refused its seventeen streams).
    let mirrors_only = |n: usize| {
        let mut m = many.clone();
        m.disks.clear();
        m.mirrors.truncate(n);
        m
    };
    validate(&mirrors_only(15)).expect("15 mirrored disks");
    assert!(matches!(
        validate(&mirrors_only(16)),
        Err(ManifestError::TooManyMirrors(16))
    ));
}
