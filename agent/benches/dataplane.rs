//! `cargo bench -p trustmig-agent --bench dataplane`: migration throughput of an idle synthetic
//! guest over loopback TCP through the agent's data path (pre-copy engine, batch buffers, N
//! streams, records, destination engine), sealed with AES-256-GCM against the same path with a
//! null cipher that exists only in this file. Target (issue 4): encrypted >= 0.8x null.
//! The destination guest is pre-faulted so that first-touch page faults (which dominate a
//! fresh destination on virtualised hosts) do not hide the cipher's cost.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use trustmig_agent::config::SyntheticVm;
use trustmig_agent::guest::{SyntheticGuest, PAGE_SIZE};
use trustmig_agent::net::wire::read_record;
use trustmig_protocol::keys::TrafficSecret;
use trustmig_protocol::order::{Limits, NonConvergence};
use trustmig_protocol::precopy::{GuestMemory, PrecopyDest, PrecopySource};
use trustmig_protocol::record::{Opener, RecordType, Sealer, HEADER_LEN, TAG_LEN};

trait Seal: Send + 'static {
    fn seal(&mut self, payload: &[u8], out: &mut Vec<u8>);
}
trait Open: Send + 'static {
    fn open<'a>(&mut self, rec: &'a mut [u8]) -> &'a [u8];
}

impl Seal for Sealer {
    fn seal(&mut self, payload: &[u8], out: &mut Vec<u8>) {
        Sealer::seal(self, RecordType::Pages, payload, out).expect("seal");
    }
}
impl Open for Opener {
    fn open<'a>(&mut self, rec: &'a mut [u8]) -> &'a [u8] {
        Opener::open(self, rec).expect("open").1
    }
}

/// Same framing and sizes as a sealed record, no cryptography.
struct Null;
impl Seal for Null {
    fn seal(&mut self, payload: &[u8], out: &mut Vec<u8>) {
        let mut h = [0u8; HEADER_LEN];
        h[0] = 1;
        h[1] = RecordType::Pages as u8;
        h[12..16].copy_from_slice(&((payload.len() + TAG_LEN) as u32).to_be_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(payload);
        out.extend_from_slice(&[0u8; TAG_LEN]);
    }
}
impl Open for Null {
    fn open<'a>(&mut self, rec: &'a mut [u8]) -> &'a [u8] {
        &rec[HEADER_LEN..rec.len() - TAG_LEN]
    }
}

struct Dest {
    engine: PrecopyDest,
    guest: SyntheticGuest,
}

fn secret(i: u16) -> TrafficSecret {
    TrafficSecret::dangerous_from_bytes([i as u8 + 1; 32], [7; 12])
}

async fn run<S: Seal, O: Open>(
    src: &mut SyntheticGuest,
    dest: Arc<Mutex<Dest>>,
    streams: u16,
    mk: impl Fn(u16) -> (S, O),
) -> f64 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let mut txs = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..streams {
        let (mut sealer, mut opener) = mk(i);
        let mut out = TcpStream::connect(addr).await.unwrap();
        let (mut inp, _) = l.accept().await.unwrap();
        out.set_nodelay(true).unwrap();
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(2);
        txs.push(tx);
        tasks.push(tokio::spawn(async move {
            let mut buf = Vec::with_capacity(1 << 20);
            while let Some(p) = rx.recv().await {
                buf.clear();
                sealer.seal(&p, &mut buf);
                out.write_all(&buf).await.unwrap();
            }
        }));
        let dest = dest.clone();
        tasks.push(tokio::spawn(async move {
            let mut buf = Vec::with_capacity(1 << 20);
            while read_record(&mut inp, &mut buf).await.unwrap() {
                let payload = opener.open(&mut buf);
                let mut d = dest.lock().unwrap();
                let Dest { engine, guest } = &mut *d;
                engine.on_pages(guest, i, payload).unwrap();
            }
        }));
    }
    let limits = Limits {
        downtime_ms: 300,
        bandwidth_bps: 0,
        max_rounds: 1,
        on_nonconvergence: NonConvergence::Force,
    };
    let t0 = Instant::now();
    let mut engine = PrecopySource::new(src, limits, streams).unwrap();
    engine.begin(src).unwrap();
    let mut bytes = 0u64;
    loop {
        let mut buf = Vec::with_capacity(engine.max_batch_bytes());
        let Some(b) = engine.next_batch(src, &mut buf).unwrap() else {
            break;
        };
        bytes += buf.len() as u64;
        txs[b.stream as usize].send(buf).await.unwrap();
    }
    drop(txs);
    for t in tasks {
        t.await.unwrap();
    }
    bytes as f64 / t0.elapsed().as_secs_f64() / (1 << 20) as f64
}

fn main() {
    // `cargo test --benches` runs this file too: keep that run tiny.
    let quick = std::env::args().any(|a| a == "--test")
        || std::env::var_os("TRUSTMIG_BENCH_QUICK").is_some();
    let size_mib = if quick { 16 } else { 1024 };
    let cfg = SyntheticVm {
        size_mib,
        dirty_pages_per_sec: 0,
        hot_fraction: 0.05,
        fill_fraction: 1.0,
        seed: 1,
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut src = SyntheticGuest::new("bench", &cfg).expect("the bench guest's memory");
    let pages = src.page_count();
    println!("data-plane throughput, idle {size_mib} MiB guest (all pages non-zero), loopback TCP");
    println!(
        "{:>8} {:>14} {:>14} {:>8}",
        "streams", "AES-GCM MiB/s", "null MiB/s", "ratio"
    );
    for streams in [1u16, 2, 4] {
        let mut figures = Vec::new();
        for null in [false, true] {
            // Pre-faulted, as a destination's.
            let g = SyntheticGuest::zeroed("dst", pages).expect("the bench guest's memory");
            let dest = Arc::new(Mutex::new(Dest {
                engine: PrecopyDest::new(&g, PAGE_SIZE as u32, pages, streams).unwrap(),
                guest: g,
            }));
            let mibs = if null {
                rt.block_on(run(&mut src, dest.clone(), streams, |_| (Null, Null)))
            } else {
                rt.block_on(run(&mut src, dest.clone(), streams, |i| {
                    (Sealer::new(secret(i), i), Opener::new(secret(i), i))
                }))
            };
            let d = dest.lock().unwrap();
            assert_eq!(
                d.guest.checksum(),
                src.checksum(),
                "destination equals source"
            );
            figures.push(mibs);
        }
        println!(
            "{streams:>8} {:>14.0} {:>14.0} {:>8.2}",
            figures[0],
            figures[1],
            figures[0] / figures[1]
        );
    }
}
