//! `cargo bench -p trustmig-protocol`: record seal+open throughput, order verifications per
//! second, per-page cost of the pre-copy engines, the page-digest choice (SHA-256 vs BLAKE3),
//! and the QEMU stream's end-to-end digest per 512 KiB chunk.
//! Target (issue 2): seal+open >= 2 GB/s on one core.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ed25519_dalek::SigningKey;
use trustmig_protocol::hvstream::StreamDigest;
use trustmig_protocol::keys::TrafficSecret;
use trustmig_protocol::order::*;
use trustmig_protocol::precopy::{page_digest, GuestMemory, PrecopyDest, PrecopySource};
use trustmig_protocol::record::{Opener, RecordType, Sealer, SequenceLimits};
use trustmig_protocol::testing::VecGuest;

fn secret() -> TrafficSecret {
    TrafficSecret::dangerous_from_bytes([7; 32], [9; 12])
}

fn records(c: &mut Criterion) {
    let mut g = c.benchmark_group("record_seal_open");
    for size in [64 << 10, 256 << 10, 1 << 20] {
        let payload = vec![0xA5u8; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::from_parameter(size), &payload, |b, p| {
            let limits = SequenceLimits {
                rekey_interval: 1 << 40,
                hard_limit: 1 << 48,
            };
            let mut s = Sealer::with_limits(secret(), 0, limits);
            let mut o = Opener::with_limits(secret(), 0, limits);
            let mut buf = Vec::with_capacity(size + 64);
            b.iter(|| {
                buf.clear();
                s.seal(RecordType::Pages, p, &mut buf).unwrap();
                let (_, plain) = o.open(&mut buf).unwrap();
                assert_eq!(plain.len(), size);
            })
        });
    }
    g.finish();
}

fn orders(c: &mut Criterion) {
    let op = SigningKey::from_bytes(&[42; 32]);
    let ops = [op.verifying_key().to_bytes()];
    let body = OrderBody {
        v: ORDER_VERSION,
        order_id: [1; 16],
        vm: "vm".into(),
        source: [1; 32],
        destination: [2; 32],
        destination_addr: "127.0.0.1:7443".into(),
        limits: Limits {
            downtime_ms: 300,
            bandwidth_bps: 0,
            max_rounds: 30,
            on_nonconvergence: NonConvergence::Force,
        },
        not_before: 100,
        not_after: 200,
        strict_final_quote: false,
    };
    let signed = SignedOrder::sign(&body, &op);
    let mut g = c.benchmark_group("order");
    g.throughput(Throughput::Elements(1));
    g.bench_function("verify", |b| {
        b.iter(|| {
            signed
                .verify(&OrderPolicy {
                    operators: &ops,
                    me: [2; 32],
                    role: Role::Destination,
                    now: 150,
                })
                .unwrap()
        })
    });
    g.finish();
}

fn precopy(c: &mut Criterion) {
    const PAGES: u64 = 16384; // 64 MiB, all non-zero
    let src = VecGuest::new(4096, PAGES, 1000, 3);
    let limits = Limits {
        downtime_ms: 300,
        bandwidth_bps: 0,
        max_rounds: 30,
        on_nonconvergence: NonConvergence::Force,
    };
    let mut g = c.benchmark_group("precopy_per_page");
    g.throughput(Throughput::Elements(PAGES));
    g.sample_size(10);
    // Source engine: read, zero-check, digest and batch every page of a round.
    g.bench_function("source_round0", |b| {
        let mut batch = Vec::with_capacity(300 << 10);
        b.iter(|| {
            let mut guest = VecGuest::new(4096, 1, 0, 1);
            guest.mem.clone_from(&src.mem);
            let mut e = PrecopySource::new(&guest, limits.clone(), 2).unwrap();
            e.begin(&mut guest).unwrap();
            while {
                batch.clear();
                e.next_batch(&guest, &mut batch).unwrap().is_some()
            } {}
        })
    });
    // Destination engine: validate, write and digest every page.
    let mut batches = Vec::new();
    {
        let mut guest = VecGuest::new(4096, 1, 0, 1);
        guest.mem.clone_from(&src.mem);
        let mut e = PrecopySource::new(&guest, limits.clone(), 1).unwrap();
        e.begin(&mut guest).unwrap();
        let mut batch = Vec::new();
        while let Some(_b) = e.next_batch(&guest, &mut batch).unwrap() {
            batches.push(std::mem::take(&mut batch));
        }
    }
    g.bench_function("destination_apply", |b| {
        let mut dst = VecGuest::new(4096, PAGES, 0, 1);
        b.iter(|| {
            let mut d = PrecopyDest::new(&dst, 4096, PAGES, 1).unwrap();
            for bt in &batches {
                d.on_pages(&mut dst, 0, bt).unwrap();
            }
            assert_eq!(d.pages_written(), PAGES);
            assert_eq!(dst.page_count(), PAGES);
        })
    });
    g.finish();
}

fn page_digests(c: &mut Criterion) {
    let page = vec![0x3Cu8; 4096];
    let mut g = c.benchmark_group("page_digest_4k");
    g.throughput(Throughput::Bytes(4096));
    g.bench_function("blake3", |b| b.iter(|| page_digest(&page)));
    g.bench_function("sha256", |b| {
        b.iter(|| ring::digest::digest(&ring::digest::SHA256, &page))
    });
    g.finish();
}

/// The end-to-end stream digest over one pump chunk (512 KiB, as the QEMU sidecar reads them):
/// each end of a QEMU migration pays this per byte on top of the record layer.
fn stream_digest(c: &mut Criterion) {
    let chunk = vec![0x5Au8; 512 << 10];
    let mut g = c.benchmark_group("stream_digest");
    g.throughput(Throughput::Bytes(chunk.len() as u64));
    g.bench_function("512KiB", |b| {
        let mut d = StreamDigest::new();
        b.iter(|| d.update(&chunk))
    });
    g.finish();
}

criterion_group!(
    benches,
    records,
    orders,
    precopy,
    page_digests,
    stream_digest
);
criterion_main!(benches);
