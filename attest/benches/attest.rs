//! Attestation figures: quote latency (swtpm), verifications per second, and manifest hashing
//! throughput (BLAKE3 chunks) against `sha256sum` on the same file, in one run.
//!
//! `cargo bench -p trustmig-attest` (set `TRUSTMIG_BENCH_MIB` to change the 256 MiB file size).

use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use trustmig_attest::manifest::{hash_chunks, sha256_reader, DEFAULT_CHUNK};
use trustmig_attest::policy::{Policy, TrustedAk};
use trustmig_attest::swtpm::Swtpm;
use trustmig_attest::tpm::{TpmAttester, TpmConfig};
use trustmig_attest::PolicyVerifier;
use trustmig_protocol::attestation::Measurement;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

/// `cargo bench` passes `--bench`; under `cargo test --benches` run a quick smoke pass instead.
fn full_run() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn tpm_figures() {
    let tpm = match Swtpm::start() {
        Ok(t) => t,
        Err(e) => {
            println!("quote latency: skipped ({e})");
            return;
        }
    };
    let mut att = TpmAttester::open(TpmConfig::new(tpm.tcti())).expect("open swtpm");
    for m in [
        Measurement::AgentExecutable([1; 32]),
        Measurement::AgentConfig([2; 32]),
    ] {
        att.measure(&m).expect("extend");
    }
    let n = if full_run() { 200 } else { 5 };
    let mut raw = Vec::with_capacity(n);
    let mut full = Vec::with_capacity(n);
    for i in 0..n {
        let qd = [i as u8; 32];
        let t = Instant::now();
        att.tpm().quote(&qd).expect("quote");
        raw.push(t.elapsed());
        let t = Instant::now();
        att.evidence(&qd).expect("evidence");
        full.push(t.elapsed());
    }
    raw.sort();
    full.sort();
    println!(
        "quote latency (swtpm, TPM2_Quote only, n={n}): p50 {:.2} ms, p99 {:.2} ms",
        percentile(&raw, 0.5).as_secs_f64() * 1e3,
        percentile(&raw, 0.99).as_secs_f64() * 1e3
    );
    println!(
        "evidence latency (PCR read + quote + encode, n={n}): p50 {:.2} ms, p99 {:.2} ms",
        percentile(&full, 0.5).as_secs_f64() * 1e3,
        percentile(&full, 0.99).as_secs_f64() * 1e3
    );

    let agent = [7u8; 32];
    let policy = Policy {
        pcr: 16,
        trusted_aks: vec![TrustedAk {
            agent,
            ak_name: att.tpm().ak_public().name(),
        }],
        allowed_executables: vec![[1; 32]],
        allowed_configs: None,
        required_events: vec![],
    };
    let v = PolicyVerifier::new(policy);
    let qd = [0xee; 32];
    let ev = att.evidence(&qd).expect("evidence").to_cbor();
    v.verify_evidence(&ev, &qd, &agent).expect("verifies");
    let iters = if full_run() { 5000 } else { 10 };
    let t = Instant::now();
    for _ in 0..iters {
        std::hint::black_box(
            v.verify_evidence(std::hint::black_box(&ev), &qd, &agent)
                .is_ok(),
        );
    }
    let el = t.elapsed();
    println!(
        "verifications per second (one core, full PolicyVerifier): {:.0} ({:.1} us each)",
        iters as f64 / el.as_secs_f64(),
        el.as_secs_f64() * 1e6 / iters as f64
    );
}

fn hashing_figures() {
    let mib: usize = std::env::var("TRUSTMIG_BENCH_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if full_run() { 256 } else { 4 });
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    let mut block = vec![0u8; 1 << 20];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..mib {
        for c in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        file.write_all(&block).expect("write");
    }
    file.flush().expect("flush");
    let path = file.path().to_path_buf();
    let bytes = (mib << 20) as f64;
    let rate = |d: Duration| bytes / d.as_secs_f64() / 1e6;
    // Warm the page cache so every contender reads from memory.
    let _ = sha256_reader(std::fs::File::open(&path).expect("open"));

    let t = Instant::now();
    let (size, chunks) =
        hash_chunks(std::fs::File::open(&path).expect("open"), DEFAULT_CHUNK).expect("hash");
    let blake = t.elapsed();
    assert_eq!(size as usize, mib << 20);
    let t = Instant::now();
    sha256_reader(std::fs::File::open(&path).expect("open")).expect("sha256");
    let ring_sha = t.elapsed();
    let t = Instant::now();
    let out = Command::new("sha256sum").arg(&path).output();
    let sum = t.elapsed();
    println!("manifest hashing, {mib} MiB file from page cache:");
    println!(
        "  trustmig manifest (BLAKE3, {} x 1 MiB chunks): {:.0} MB/s",
        chunks.len(),
        rate(blake)
    );
    println!(
        "  SHA-256 in process (ring, whole file):       {:.0} MB/s",
        rate(ring_sha)
    );
    match out {
        Ok(o) if o.status.success() => println!(
            "  sha256sum (coreutils, same file):             {:.0} MB/s",
            rate(sum)
        ),
        _ => println!("  sha256sum: not available"),
    }
}

fn main() {
    tpm_figures();
    hashing_figures();
}
