//! A TCP proxy between source and destination. Control connections (TLS, first byte 0x16) pass
//! through untouched; on data streams the proxy understands the preamble and record framing
//! (SPEC.md §7) and applies one [`Fault`] to the source->destination direction of one data
//! stream (stream 0 unless [`Proxy::start_on`] says another).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use trustmig_protocol::record::HEADER_LEN;

/// What to do to the first data stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forward faithfully.
    None,
    /// Close both directions of every connection after this many data-stream bytes.
    CutAfter(u64),
    /// Flip one bit in record number `n` (counting from 0 = StreamInit), in its body.
    FlipBit(u64),
    /// Send record `n` twice.
    Replay(u64),
    /// Never send record `n`.
    Drop(u64),
    /// Send record `n + 1` before record `n`.
    Reorder(u64),
    /// Squat: before forwarding data stream 0, open a second connection to the destination
    /// with the same preamble and then say nothing (an on-path attacker stalling a stream).
    Squat,
    /// Forward at most this many bytes per second (a slow link: every record waits for its
    /// share of the second before it goes on).
    Throttle(u64),
}

/// A running proxy.
pub struct Proxy {
    /// Address to give the source instead of the destination's.
    pub addr: String,
    /// Whether the fault was applied.
    pub fired: Arc<AtomicBool>,
    /// Data-stream bytes forwarded.
    pub data_bytes: Arc<AtomicU64>,
}

impl Proxy {
    /// Listen on a free loopback port and forward to `target`.
    pub async fn start(target: String, fault: Fault) -> std::io::Result<Self> {
        Self::start_on(target, fault, 0).await
    }

    /// Like [`Proxy::start`], with the fault on data stream `stream` (a mirrored disk's NBD
    /// stream is stream 1 and up).
    pub async fn start_on(target: String, fault: Fault, stream: u16) -> std::io::Result<Self> {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?.to_string();
        let fired = Arc::new(AtomicBool::new(false));
        let data_bytes = Arc::new(AtomicU64::new(0));
        let cut = Arc::new(AtomicBool::new(false));
        let (f2, d2) = (fired.clone(), data_bytes.clone());
        tokio::spawn(async move {
            while let Ok((c, _)) = l.accept().await {
                let (target, fired, data, cut) =
                    (target.clone(), f2.clone(), d2.clone(), cut.clone());
                tokio::spawn(async move {
                    let _ = relay(c, target, (fault, stream), fired, data, cut).await;
                });
            }
        });
        Ok(Self {
            addr,
            fired,
            data_bytes,
        })
    }
}

async fn relay(
    client: TcpStream,
    target: String,
    (fault, faulty): (Fault, u16),
    fired: Arc<AtomicBool>,
    data: Arc<AtomicU64>,
    cut: Arc<AtomicBool>,
) -> std::io::Result<()> {
    let server = TcpStream::connect(&target).await?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let mut first = [0u8; 1];
    client.peek(&mut first).await?;
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let back = {
        let cut = cut.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = sr.read(&mut buf).await?;
                if n == 0 || cut.load(Ordering::SeqCst) {
                    break;
                }
                cw.write_all(&buf[..n]).await?;
            }
            let _ = cw.shutdown().await;
            Ok::<_, std::io::Error>(())
        })
    };
    if first[0] == 0x16 {
        // Control channel: plain relay, but honour a cut.
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = cr.read(&mut buf).await?;
            if n == 0 || cut.load(Ordering::SeqCst) {
                break;
            }
            sw.write_all(&buf[..n]).await?;
        }
        let _ = sw.shutdown().await;
        back.abort();
        return Ok(());
    }
    // Data stream: preamble, then records.
    let mut pre = [0u8; 26];
    cr.read_exact(&mut pre).await?;
    let stream = u16::from_be_bytes([pre[24], pre[25]]);
    if fault == Fault::Squat && stream == 0 && !fired.swap(true, Ordering::SeqCst) {
        let mut squatter = TcpStream::connect(&target).await?;
        squatter.write_all(&pre).await?;
        // Give the squatter a head start, then keep it open and silent for a minute.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_secs(60)).await;
            drop(squatter);
        });
    }
    sw.write_all(&pre).await?;
    let mut index = 0u64;
    let mut held: Option<Vec<u8>> = None;
    loop {
        let mut h = [0u8; HEADER_LEN];
        if cr.read_exact(&mut h).await.is_err() {
            break;
        }
        let len = u32::from_be_bytes([h[12], h[13], h[14], h[15]]) as usize;
        let mut rec = h.to_vec();
        rec.resize(HEADER_LEN + len, 0);
        if cr.read_exact(&mut rec[HEADER_LEN..]).await.is_err() {
            break;
        }
        let total = data.fetch_add(rec.len() as u64, Ordering::SeqCst) + rec.len() as u64;
        let mine = stream == faulty;
        let mut out: Vec<Vec<u8>> = vec![rec];
        match fault {
            Fault::CutAfter(n) if total >= n => {
                fired.store(true, Ordering::SeqCst);
                cut.store(true, Ordering::SeqCst);
                break;
            }
            Fault::FlipBit(k) if mine && index == k => {
                let last = out[0].len() - 1;
                out[0][HEADER_LEN + (last - HEADER_LEN) / 2] ^= 0x10;
                fired.store(true, Ordering::SeqCst);
            }
            Fault::Replay(k) if mine && index == k => {
                out.push(out[0].clone());
                fired.store(true, Ordering::SeqCst);
            }
            Fault::Drop(k) if mine && index == k => {
                out.clear();
                fired.store(true, Ordering::SeqCst);
            }
            Fault::Reorder(k) if mine && index == k => {
                held = out.pop();
            }
            Fault::Reorder(k) if mine && index == k + 1 => {
                if let Some(h) = held.take() {
                    out.push(h);
                    fired.store(true, Ordering::SeqCst);
                }
            }
            Fault::Throttle(rate) if mine => {
                let len = out[0].len() as u64;
                let wait = std::time::Duration::from_micros(len * 1_000_000 / rate.max(1));
                tokio::time::sleep(wait).await;
                fired.store(true, Ordering::SeqCst);
            }
            _ => {}
        }
        for r in out {
            sw.write_all(&r).await?;
        }
        index += 1;
    }
    let _ = sw.shutdown().await;
    back.abort();
    Ok(())
}
