//! Pumps between a QEMU unix socket and sealed records on the data stream (QEMU sidecar mode).
//! spec: SPEC.md §7.2, §8.5.1; spec/qemu.md §2
//!
//! Each direction runs two tasks joined by a short queue, so QEMU keeps writing (or reading)
//! while a record is sealed, sent, received or opened: the path is latency-bound otherwise.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BufMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use trustmig_protocol::error::PeerMisbehaved;
use trustmig_protocol::hvstream::StreamDigest;
use trustmig_protocol::record::{Opener, RecordType, Sealer, HEADER_LEN, MAX_PAYLOAD, TAG_LEN};

use crate::error::{AgentError, Link};
use crate::net::wire::{read_record, WireError};

/// Bytes read from QEMU per record (the record layer allows up to [`MAX_PAYLOAD`]).
const CHUNK: usize = 512 << 10;

fn proto(e: impl Into<trustmig_protocol::Error>) -> AgentError {
    AgentError::Protocol(e.into())
}

/// What a pump carries: QEMU's migration stream (`HypervisorStream` records) or a mirrored
/// disk's NBD connection (`BlockStream` records; the pump that writes to QEMU half-closes its
/// socket at the stream's end, so an NBD peer that did not disconnect sees the end too).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Carried {
    Migration,
    Nbd,
}

impl Carried {
    /// Writing to QEMU failed (`why`): QEMU's side of its migration stream, typed so (the
    /// destination then asks QEMU why, `dest::load_failure`); an NBD stream's, a migration
    /// failure.
    fn writer_failed(self, why: String) -> AgentError {
        match self {
            Self::Migration => AgentError::transport(Link::QemuStream, why),
            Self::Nbd => AgentError::Migration(why),
        }
    }

    fn record(self) -> RecordType {
        match self {
            Self::Migration => RecordType::HypervisorStream,
            Self::Nbd => RecordType::BlockStream,
        }
    }
}

/// What a forward pump (QEMU stream -> records) did.
pub(crate) struct Sent {
    pub(crate) records: u64,
    pub(crate) wire_bytes: u64,
    pub(crate) digest: StreamDigest,
}

/// Buffers in flight between a pump's two tasks: the queue's depth, one being filled and one
/// being sealed (or written). They go back and forth, so the bulk path allocates and zeroes
/// its buffers once, not once per record (that showed in profiles as page faults and memset).
const IN_FLIGHT: usize = 4;

/// Read `from` to its end, sealing each chunk as a `HypervisorStream` record on `to`; then
/// `StreamEnd` (payload: total bytes, u64 BE). `digest` sees every payload byte. Reading (and
/// the digest) runs in a task of its own, so QEMU keeps writing, and the digest of one chunk
/// is computed on one core while the last one is sealed and sent on the other; each chunk is
/// read behind room for the record header and sealed where it lies. A write to `to` that
/// waits longer than `stall` (a peer that stopped reading without closing: a host gone, a
/// partition) fails the pump: with the guest stopped for the switch-over, nothing else would.
pub(crate) async fn seal_pump<R, W>(
    from: R,
    mut to: W,
    mut sealer: Sealer,
    (what, carried): (&'static str, Carried),
    stall: Duration,
) -> Result<Sent, String>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin,
{
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(IN_FLIGHT);
    let (back_tx, back_rx) = mpsc::channel::<Vec<u8>>(IN_FLIGHT + 2);
    let reader = tokio::spawn(read_chunks(from, tx, back_rx, what));
    let mut before = Vec::new();
    let mut wire_bytes = 0u64;
    while let Some(mut record) = rx.recv().await {
        before.clear();
        sealer
            .seal_in_place(carried.record(), &mut record, &mut before)
            .map_err(|e| format!("{what}: {e}"))?;
        for part in [&before, &record] {
            write_within(&mut to, part, stall, what).await?;
            wire_bytes += part.len() as u64;
        }
        let _ = back_tx.try_send(record); // the reader allocates anew if it has gone
    }
    // The channel closed: the reader saw the end of QEMU's stream, or failed.
    let digest = reader
        .await
        .map_err(|e| format!("{what}: reader task: {e}"))??;
    let mut out = Vec::new();
    sealer
        .seal(RecordType::StreamEnd, &digest.len().to_be_bytes(), &mut out)
        .map_err(|e| format!("{what}: {e}"))?;
    write_within(&mut to, &out, stall, what).await?;
    wire_bytes += out.len() as u64;
    to.flush()
        .await
        .map_err(|e| format!("{what}: data stream flush: {e}"))?;
    Ok(Sent {
        records: sealer.next_seq(),
        wire_bytes,
        digest,
    })
}

/// A stream that counts the bytes written to it (into a counter it may share with others): the
/// source watches its streams' for progress while the guest is stopped. What arrives counts
/// only once it opens ([`Counting`]), on both sides.
pub(crate) struct Counted<T> {
    inner: T,
    bytes: Arc<AtomicU64>,
}

impl<T> Counted<T> {
    pub(crate) fn new(inner: T, bytes: Arc<AtomicU64>) -> Self {
        Self { inner, bytes }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// An opener that counts the wire bytes of each record it opens into a counter shared with
/// [`Counted`] writers. Only records that authenticate count: bytes an on-path party trickles
/// into a stream, a record at a time never completed, are no sign of the peer, and counted as
/// they were read they kept a source's silence watch from ending a switch-over whose
/// destination had gone.
pub(crate) struct Counting {
    opener: Opener,
    moved: Arc<AtomicU64>,
}

impl Counting {
    pub(crate) fn new(opener: Opener, moved: Arc<AtomicU64>) -> Self {
        Self { opener, moved }
    }

    /// [`Opener::open`], counting the record once it opened.
    pub(crate) fn open<'a>(
        &mut self,
        record: &'a mut [u8],
    ) -> Result<(RecordType, &'a [u8]), trustmig_protocol::record::RecordError> {
        let wire = record.len() as u64;
        let opened = self.opener.open(record)?;
        self.moved.fetch_add(wire, Ordering::Relaxed);
        Ok(opened)
    }

    /// Records accepted so far.
    pub(crate) fn records(&self) -> u64 {
        self.opener.records()
    }
}

/// Write `data` to the data stream within `stall`.
async fn write_within<W: AsyncWrite + Unpin>(
    to: &mut W,
    data: &[u8],
    stall: Duration,
    what: &str,
) -> Result<(), String> {
    match tokio::time::timeout(stall, to.write_all(data)).await {
        Ok(r) => r.map_err(|e| format!("{what}: data stream write: {e}")),
        Err(_) => Err(format!(
            "{what}: data stream write stalled for {} s: the peer stopped reading",
            stall.as_secs()
        )),
    }
}

/// Read `from` to its end in chunks of up to `CHUNK` bytes, coalescing what QEMU already
/// wrote (it writes 32 KiB at a time) into one chunk, and hand them to `tx`, each behind
/// `HEADER_LEN` bytes of room, after the digest has seen them. Buffers come back on `back`
/// once sealed. Returns the digest of everything read.
async fn read_chunks<R: AsyncRead + Unpin>(
    mut from: R,
    tx: mpsc::Sender<Vec<u8>>,
    mut back: mpsc::Receiver<Vec<u8>>,
    what: &'static str,
) -> Result<StreamDigest, String> {
    let full = HEADER_LEN + CHUNK.min(MAX_PAYLOAD);
    let mut digest = StreamDigest::new();
    loop {
        let mut buf = back
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(full + TAG_LEN));
        // Room for the header; QEMU's bytes go into the spare capacity behind it, so nothing
        // is zeroed ahead of a read (that was up to a chunk's worth of memset per record,
        // since reads rarely fill a chunk).
        buf.clear();
        buf.resize(HEADER_LEN, 0);
        let got = from
            .read_buf(&mut (&mut buf).limit(full - HEADER_LEN))
            .await
            .map_err(|e| format!("{what}: reading from QEMU: {e}"))?;
        if got == 0 {
            return Ok(digest);
        }
        while buf.len() < full {
            let left = full - buf.len();
            let mut room = (&mut buf).limit(left);
            let more = tokio::select! {
                biased;
                r = from.read_buf(&mut room) => r.map_err(|e| format!("{what}: reading from QEMU: {e}"))?,
                () = std::future::ready(()) => break,
            };
            if more == 0 {
                break; // end of stream: the next read returns 0 again
            }
        }
        digest.update(&buf[HEADER_LEN..]);
        if tx.send(buf).await.is_err() {
            return Ok(digest); // the sealing side failed and reports why
        }
    }
}

/// What an open pump (records -> QEMU) did.
pub(crate) struct Received {
    pub(crate) records: u64,
    pub(crate) digest: StreamDigest,
}

/// Open records from `from` and write their payloads to `to` until `StreamEnd`. Any record
/// error, an unexpected type, a wrong `StreamEnd` length or a cut connection is fatal. Writing
/// to QEMU runs in a task of its own, so records keep being read and opened meanwhile.
pub(crate) async fn open_pump<R, W>(
    mut from: R,
    to: W,
    mut opener: Counting,
    what: &'static str,
    carried: Carried,
) -> Result<Received, AgentError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    // Record and protocol failures keep their type, so the Abort says record-failure or
    // protocol-violation; transport failures are local (text).
    let local = |m: String| AgentError::Migration(format!("{what}: {m}"));
    let (tx, rx) = mpsc::channel::<Opened>(IN_FLIGHT);
    let (back_tx, mut back) = mpsc::channel::<Vec<u8>>(IN_FLIGHT + 2);
    let mut writer = tokio::spawn(write_chunks(to, rx, back_tx, what, carried == Carried::Nbd));
    // Bytes opened so far; the digest of them is the writer's (on the other core).
    let mut opened = 0u64;
    let r = loop {
        // A buffer the writer is done with, or a new one: records are opened where they lie
        // and written to QEMU from there.
        let mut buf = back
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(HEADER_LEN + MAX_PAYLOAD + TAG_LEN));
        match read_record(&mut from, &mut buf).await {
            Err(WireError::Record(e)) => break Err(proto(e)),
            Err(e) => break Err(local(e.to_string())),
            Ok(false) => break Err(local(format!("data stream {}", crate::error::CUT))),
            Ok(true) => {}
        }
        let (typ, payload) = match opener.open(&mut buf) {
            Ok(x) => x,
            Err(e) => break Err(proto(e)),
        };
        crate::fault::record_opened();
        match typ {
            t if t == carried.record() => {
                opened += payload.len() as u64;
                let payload = HEADER_LEN..HEADER_LEN + payload.len();
                if tx.send(Opened { buf, payload }).await.is_err() {
                    // The writer stopped on an error of its own (QEMU closed its end, say):
                    // its error is the cause, and names it. QEMU's side of the stream, typed
                    // so: the destination then asks QEMU why (`dest::load_failure`).
                    let why = match (&mut writer).await {
                        Ok(Err(why)) => why,
                        Ok(Ok(_)) => format!("{what}: writing to QEMU ended early"),
                        Err(e) => format!("{what}: writer task: {e}"),
                    };
                    break Err(carried.writer_failed(why));
                }
            }
            RecordType::KeyUpdate => {}
            RecordType::StreamEnd => {
                let total: Option<[u8; 8]> = payload.try_into().ok();
                if total.map(u64::from_be_bytes) != Some(opened) {
                    break Err(proto(PeerMisbehaved::BadField(format!(
                        "{what}: stream end announces {:?} bytes, {} arrived",
                        total.map(u64::from_be_bytes),
                        opened
                    ))));
                }
                break Ok(());
            }
            t => {
                break Err(proto(PeerMisbehaved::BadField(format!(
                    "{what}: unexpected {t:?} record"
                ))))
            }
        }
    };
    drop(tx);
    if let Err(e) = r {
        writer.abort(); // QEMU may have stopped reading; do not wait for it
        return Err(e);
    }
    // The writer may fail on the last records, after `StreamEnd` was read: the same failure.
    let digest = writer
        .await
        .map_err(|e| carried.writer_failed(format!("{what}: writer task: {e}")))?
        .map_err(|why| carried.writer_failed(why))?;
    Ok(Received {
        records: opener.records(),
        digest,
    })
}

/// An opened record: its buffer and where the plaintext lies in it.
struct Opened {
    buf: Vec<u8>,
    payload: std::ops::Range<usize>,
}

/// Write opened records' payloads to QEMU until the channel closes, handing each buffer back.
/// Returns the digest of every payload written.
async fn write_chunks<W: AsyncWrite + Unpin>(
    mut to: W,
    mut rx: mpsc::Receiver<Opened>,
    back: mpsc::Sender<Vec<u8>>,
    what: &'static str,
    half_close: bool,
) -> Result<StreamDigest, String> {
    let mut digest = StreamDigest::new();
    while let Some(Opened { buf, payload }) = rx.recv().await {
        // QEMU first (it loads while the digest runs); nothing resumes before the digest is
        // checked, so the order does not matter to what it proves.
        to.write_all(&buf[payload.clone()])
            .await
            .map_err(|e| format!("{what}: writing to QEMU: {e}"))?;
        digest.update(&buf[payload]);
        let _ = back.try_send(buf); // the reading side allocates anew if the queue is full
    }
    let _ = to.flush().await;
    if half_close {
        let _ = to.shutdown().await; // QEMU may have closed first: nothing is lost then
    }
    Ok(digest)
}

/// A sealer and the opener for what it seals (fixed test keys), for the agent's unit tests.
#[cfg(test)]
pub(crate) fn test_pair() -> (Sealer, Counting) {
    use trustmig_protocol::keys::{Direction, KeySchedule};
    let ks = KeySchedule::new(&[1; 32], &[2; 32]);
    (
        Sealer::new(ks.stream_secret(Direction::SourceToDestination, 0), 0),
        Counting::new(
            Opener::new(ks.stream_secret(Direction::SourceToDestination, 0), 0),
            Arc::default(),
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_pair as pair;

    #[tokio::test]
    async fn pumps_carry_every_byte_and_digest_it() {
        let (sealer, opener) = pair();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let (mut qemu_side, agent_side) = tokio::io::duplex(1 << 16);
        let (wire_a, wire_b) = tokio::io::duplex(1 << 16);
        let (out_a, mut out_b) = tokio::io::duplex(1 << 16);
        let d2 = data.clone();
        let writer = tokio::spawn(async move {
            qemu_side.write_all(&d2).await.expect("write");
            qemu_side.shutdown().await.expect("shutdown");
        });
        let sealing = tokio::spawn(seal_pump(
            agent_side,
            wire_a,
            sealer,
            ("t", Carried::Migration),
            Duration::from_secs(60),
        ));
        let opening = tokio::spawn(open_pump(wire_b, out_a, opener, "t", Carried::Migration));
        let mut got = Vec::new();
        out_b.read_to_end(&mut got).await.expect("read");
        writer.await.expect("writer");
        let sent = sealing.await.expect("join").expect("seal pump");
        let recv = opening.await.expect("join").expect("open pump");
        assert_eq!(got, data);
        assert_eq!(sent.records, recv.records);
        assert_eq!(sent.digest.finish(&[3; 32]), recv.digest.finish(&[3; 32]));
    }

    /// A peer that stops reading without closing (a host gone, a partition) fails the pump
    /// once a write waited `stall`: a source whose guest is stopped for the switch-over must
    /// not wait on it for ever.
    #[tokio::test]
    async fn a_peer_that_stops_reading_fails_the_pump() {
        let (sealer, _opener) = pair();
        let (wire, _silent_peer) = tokio::io::duplex(4096);
        let data = vec![7u8; 1 << 20];
        let e = seal_pump(
            std::io::Cursor::new(data),
            wire,
            sealer,
            ("t", Carried::Migration),
            Duration::from_millis(100),
        )
        .await
        .err()
        .expect("stalled");
        assert!(e.contains("t: data stream write stalled"), "{e}");
    }

    /// A reader that always has more than a chunk ready (in memory) fills each record to the
    /// chunk and no further: reads go into the buffer's spare capacity, bounded by the chunk.
    #[tokio::test]
    async fn records_are_filled_to_the_chunk_and_no_further() {
        let (sealer, mut opener) = pair();
        let data: Vec<u8> = (0..(CHUNK * 5 / 2) as u32)
            .map(|i| (i % 253) as u8)
            .collect();
        let mut wire = Vec::new();
        let sent = seal_pump(
            std::io::Cursor::new(data.clone()),
            &mut wire,
            sealer,
            ("t", Carried::Migration),
            Duration::from_secs(60),
        )
        .await
        .expect("seal pump");
        let (mut sizes, mut got, mut rest) = (Vec::new(), Vec::new(), &wire[..]);
        while !rest.is_empty() {
            let len = HEADER_LEN + u32::from_be_bytes(rest[12..16].try_into().unwrap()) as usize;
            let mut record = rest[..len].to_vec();
            rest = &rest[len..];
            let (typ, payload) = opener.open(&mut record).expect("open");
            if typ == RecordType::HypervisorStream {
                sizes.push(payload.len());
                got.extend_from_slice(payload);
            }
        }
        assert_eq!(sizes, [CHUNK, CHUNK, CHUNK / 2]);
        assert_eq!(got, data);
        assert_eq!(sent.digest.len(), data.len() as u64);
    }

    #[tokio::test]
    async fn open_pump_refuses_tampering_and_a_cut() {
        let (mut sealer, _) = pair();
        let mut wire = Vec::new();
        sealer
            .seal(RecordType::HypervisorStream, b"abc", &mut wire)
            .expect("seal");
        let mut flipped = wire.clone();
        flipped[20] ^= 1;
        let replayed = [wire.clone(), wire.clone()].concat();
        // A flipped bit, a stream cut before its StreamEnd, a replayed record.
        for (input, expect) in [
            (flipped, "authentication"),
            (wire, "cut"),
            (replayed, "replayed"),
        ] {
            let (_, opener) = pair();
            let r = open_pump(
                &input[..],
                tokio::io::sink(),
                opener,
                "s0",
                Carried::Migration,
            )
            .await
            .map_err(|e| e.to_string());
            assert!(
                r.as_ref().err().is_some_and(|e| e.contains(expect)),
                "{expect}: {:?}",
                r.err()
            );
        }
    }

    /// The silence watch counts what opened, not what arrived: bytes trickled into a stream
    /// (a record begun and never finished, or a forged one) are no sign of the peer, or an
    /// on-path party could keep a stopped source waiting for as long as it trickles.
    #[tokio::test]
    async fn only_records_that_open_count_as_progress() {
        let (mut sealer, _) = pair();
        let mut genuine = Vec::new();
        sealer
            .seal(RecordType::HypervisorStream, b"abc", &mut genuine)
            .expect("seal");
        let mut forged = Vec::new();
        sealer
            .seal(RecordType::HypervisorStream, b"def", &mut forged)
            .expect("seal");
        *forged.last_mut().expect("tag") ^= 1;
        // The genuine record, then the first bytes of the next one, trickled: the pump waits
        // for the rest, which never comes.
        let (mut peer, agent) = tokio::io::duplex(1 << 16);
        let (_, opener) = pair();
        let moved = opener.moved.clone();
        let pump = tokio::spawn(open_pump(
            agent,
            tokio::io::sink(),
            opener,
            "s0",
            Carried::Migration,
        ));
        peer.write_all(&genuine).await.expect("write");
        for b in &forged[..forged.len() - 1] {
            peer.write_all(std::slice::from_ref(b))
                .await
                .expect("write");
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(moved.load(Ordering::Relaxed), genuine.len() as u64);
        assert!(!pump.is_finished());
        // The forged record complete: refused, and still not counted.
        peer.write_all(&forged[forged.len() - 1..])
            .await
            .expect("write");
        let r = pump.await.expect("join").map(|_| ());
        assert!(
            r.as_ref()
                .is_err_and(|e| e.to_string().contains("authentication")),
            "{r:?}"
        );
        assert_eq!(moved.load(Ordering::Relaxed), genuine.len() as u64);
    }
}
