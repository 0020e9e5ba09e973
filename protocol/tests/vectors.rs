//! Test vectors in `spec/vectors/`: the code must reproduce them byte for byte.
//! Regenerate (after a deliberate, spec-documented change) with
//! `TRUSTMIG_WRITE_VECTORS=1 cargo test -p trustmig-protocol --test vectors`.

use ed25519_dalek::SigningKey;
use serde_json::{json, Value};
use trustmig_protocol::attestation::{qualifying_data, Measurement, FINAL_LABEL, HANDSHAKE_LABEL};
use trustmig_protocol::finalsig::{self, FinalContext, FinalKey};
use trustmig_protocol::hvstream::{self, BlockDigests, StreamDigest};
use trustmig_protocol::keys::{Direction, KeySchedule, TrafficSecret};
use trustmig_protocol::manifest::{manifest_root, DiskFormat, ImageManifest, MirrorDisk};
use trustmig_protocol::order::*;
use trustmig_protocol::precopy::final_digest;
use trustmig_protocol::record::{Opener, RecordType, Sealer};

fn h(b: &[u8]) -> String {
    hex::encode(b)
}

fn compute() -> Value {
    let exporter = [0x01u8; 32];
    let transcript = [0x02u8; 32];
    let ks = KeySchedule::new(&exporter, &transcript);
    let s0 = ks.stream_secret(Direction::SourceToDestination, 0);
    let (k0, iv0) = s0.dangerous_export();
    let (k0u, iv0u) = s0.update().dangerous_export();
    let (k1r, iv1r) = ks
        .stream_secret(Direction::DestinationToSource, 1)
        .dangerous_export();

    let mut sealer = Sealer::new(TrafficSecret::dangerous_from_bytes(k0, iv0), 0);
    let mut rec0 = Vec::new();
    sealer
        .seal(RecordType::Pages, b"trustmig record vector", &mut rec0)
        .unwrap();
    let mut rec1 = Vec::new();
    sealer.seal(RecordType::StreamEnd, &[], &mut rec1).unwrap();

    let op = SigningKey::from_bytes(&[0x42; 32]);
    let body = OrderBody {
        v: ORDER_VERSION,
        order_id: [0x11; 16],
        vm: "vm-1".into(),
        source: [0xA1; 32],
        destination: [0xB2; 32],
        destination_addr: "192.0.2.10:7443".into(),
        limits: Limits {
            downtime_ms: 300,
            bandwidth_bps: 125_000_000,
            max_rounds: 30,
            on_nonconvergence: NonConvergence::Throttle,
        },
        not_before: 1_800_000_000,
        not_after: 1_800_000_600,
        strict_final_quote: false,
    };
    let signed = SignedOrder::sign(&body, &op);

    json!({
        "key_schedule": {
            "tls_exporter": h(&exporter),
            "transcript_hash": h(&transcript),
            "prk": h(&ks.dangerous_prk()),
            "session_id": h(&ks.session_id()),
            "confirm_source": h(&ks.confirm_key(Role::Source)[..]),
            "confirm_destination": h(&ks.confirm_key(Role::Destination)[..]),
            "finished_source": h(&ks.finished_mac(Role::Source, &transcript)),
            "s2d_stream0_key": h(&k0), "s2d_stream0_iv": h(&iv0),
            "s2d_stream0_epoch1_key": h(&k0u), "s2d_stream0_epoch1_iv": h(&iv0u),
            "d2s_stream1_key": h(&k1r), "d2s_stream1_iv": h(&iv1r),
        },
        "records": {
            "key": h(&k0), "iv": h(&iv0), "stream": 0,
            "record0_pages": h(&rec0),
            "record0_plaintext": h(b"trustmig record vector"),
            "record1_stream_end": h(&rec1),
        },
        "order": {
            "operator_seed": h(&[0x42; 32]),
            "signed_order_cbor": h(&signed.to_cbor()),
            "body_cbor": h(&signed.body),
        },
        "attestation": {
            "qualifying_data_handshake": h(&qualifying_data(HANDSHAKE_LABEL, &[3; 32], &[4; 32], &[5; 16], &[6; 32])),
            "qualifying_data_final": h(&qualifying_data(FINAL_LABEL, &[3; 32], &[4; 32], &[5; 16], &[6; 32])),
            "event_agent_executable_0x07": h(&Measurement::AgentExecutable([7; 32]).pcr_digest()),
            "event_image_manifest_0x07": h(&Measurement::ImageManifest([7; 32]).pcr_digest()),
            // The source's handshake quote binds its final key (SPEC.md §5.2 S4, §8.7).
            "final_key_seed": h(&[0x0F; 32]),
            "final_key": h(&FinalKey::from_seed(&[0x0F; 32]).public()),
            "qualifying_data_handshake_source": h(&finalsig::source_handshake_qualifying_data(
                &[3; 32], &[4; 32], &[5; 16], &[6; 32], &FinalKey::from_seed(&[0x0F; 32]).public()
            )),
            // The final signature over nonce 0x0A.., exporter 0x0B.., order 0x0C.., transcript
            // 0x0D.., digest 0x0E.. (ed25519 is deterministic).
            "final_signature_input": h(&finalsig::signing_input(&final_ctx(), &[0x0E; 32])),
            "final_signature": h(&FinalKey::from_seed(&[0x0F; 32]).sign(&final_ctx(), &[0x0E; 32])),
        },
        "hvstream": {
            "transcript_hash": h(&transcript),
            "stream": h(b"QEVM\x00\x00\x00\x03 qemu migration stream bytes"),
            "final": h(&{
                let mut d = StreamDigest::new();
                d.update(b"QEVM\x00\x00\x00\x03 qemu ");
                d.update(b"migration stream bytes");
                d.finish(&transcript)
            }),
            // With one mirrored disk (spec/qemu.md §5): its NBD stream's two directions.
            "nbd_to_destination": h(b"\x25\x60\x95\x13 nbd request"),
            "nbd_to_source": h(b"\x67\x44\x66\x98 nbd reply"),
            "final_with_disk": h(&{
                let mut d = StreamDigest::new();
                d.update(b"QEVM\x00\x00\x00\x03 qemu migration stream bytes");
                let mut disk = BlockDigests::default();
                disk.to_destination.update(b"\x25\x60\x95\x13 nbd request");
                disk.to_source.update(b"\x67\x44\x66\x98 nbd reply");
                hvstream::final_digest(&transcript, d, &[disk])
            }),
            // A manifest with one mirrored disk, as encoded, and its root.
            "manifest_with_mirror": h(&mirror_manifest().to_cbor()),
            "manifest_with_mirror_root": h(&manifest_root(&mirror_manifest().to_cbor())),
            // That disk verified in full: its manifest entry says so, and the final digest
            // binds the image's guest-visible content after the two NBD directions.
            "image": h(b"\x00\x00 guest-visible image content"),
            "final_with_disk_verified_in_full": h(&{
                let mut d = StreamDigest::new();
                d.update(b"QEVM\x00\x00\x00\x03 qemu migration stream bytes");
                let mut disk = BlockDigests::default();
                disk.to_destination.update(b"\x25\x60\x95\x13 nbd request");
                disk.to_source.update(b"\x67\x44\x66\x98 nbd reply");
                let mut image = StreamDigest::new();
                image.update(b"\x00\x00 guest-visible image content");
                disk.image = Some(image);
                hvstream::final_digest(&transcript, d, &[disk])
            }),
            "manifest_with_full_verify": h(&full_verify_manifest().to_cbor()),
        },
        "image_digest": {
            "transcript_hash": h(&transcript),
            "page_size": 4096, "page_count": 2,
            "pages_root": h(&[9; 32]),
            "device_state": h(b"dev"),
            "final": h(&final_digest(&transcript, 4096, 2, &[9; 32], b"dev")),
        }
    })
}

fn final_ctx() -> FinalContext<'static> {
    FinalContext {
        nonce: &[0x0A; 32],
        tls_exporter: &[0x0B; 32],
        order_id: &[0x0C; 16],
        transcript_hash: &[0x0D; 32],
    }
}

fn mirror_manifest() -> ImageManifest {
    ImageManifest {
        vm: "vm1".into(),
        config_digest: [8; 32],
        chunk_size: 1 << 20,
        disks: Vec::new(),
        mirrors: vec![MirrorDisk {
            name: "d0".into(),
            format: DiskFormat::Qcow2,
            virtual_size: 1 << 30,
            verify_full: false,
        }],
    }
}

/// The same with the disk verified in full (`verify = "full"`).
fn full_verify_manifest() -> ImageManifest {
    let mut m = mirror_manifest();
    m.mirrors[0].verify_full = true;
    m
}

fn path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../spec/vectors/protocol.json")
}

#[test]
fn code_reproduces_spec_vectors() {
    let now = compute();
    if std::env::var_os("TRUSTMIG_WRITE_VECTORS").is_some() {
        // Atomic replace: the other test may be reading the file right now.
        let tmp = path().with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&now).unwrap() + "\n").unwrap();
        std::fs::rename(&tmp, path()).unwrap();
    }
    let text = std::fs::read_to_string(path()).expect("spec/vectors/protocol.json exists");
    let want: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(now, want, "code and spec/vectors/protocol.json disagree");
}

#[test]
fn vectors_open_and_verify() {
    let text = std::fs::read_to_string(path()).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let bytes = |p: &str| hex::decode(v.pointer(p).unwrap().as_str().unwrap()).unwrap();
    let key: [u8; 32] = bytes("/records/key").try_into().unwrap();
    let iv: [u8; 12] = bytes("/records/iv").try_into().unwrap();
    let mut o = Opener::new(TrafficSecret::dangerous_from_bytes(key, iv), 0);
    let mut r0 = bytes("/records/record0_pages");
    assert_eq!(
        o.open(&mut r0).unwrap().1,
        bytes("/records/record0_plaintext").as_slice()
    );
    let mut r1 = bytes("/records/record1_stream_end");
    assert_eq!(o.open(&mut r1).unwrap().0, RecordType::StreamEnd);

    let signed = SignedOrder::from_cbor(&bytes("/order/signed_order_cbor")).unwrap();
    let op = SigningKey::from_bytes(&bytes("/order/operator_seed").try_into().unwrap());
    let ops = [op.verifying_key().to_bytes()];
    let verified = signed
        .verify(&OrderPolicy {
            operators: &ops,
            me: [0xB2; 32],
            role: Role::Destination,
            now: 1_800_000_100,
        })
        .unwrap();
    assert_eq!(verified.body().vm, "vm-1");
}
