//! A data stream's opening (SPEC.md §7.1): the source starts each connection with a preamble
//! naming the session and stream and a sealed `StreamInit` record; the destination binds each
//! stream index to the first connection whose `StreamInit` authenticates.
//!
//! Until then a connection is anyone's: the preamble travels in clear, so whoever sees one can
//! open connections that name the session. Each such candidate costs the destination a socket
//! and a fixed `STREAM_INIT_RECORD` bytes (a header declaring any other length is refused before
//! anything is allocated), it waits at most the caller's timeout, and at most `MAX_PENDING` (32)
//! wait at once per session: a new one pushes out the oldest. The genuine source writes its `StreamInit`
//! with its preamble, so it authenticates as soon as it is read; a candidate still waiting when
//! many others arrived after it is a squatter.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tracing::warn;
use trustmig_protocol::keys::{Direction, KeySchedule, TrafficSecret};
use trustmig_protocol::messages::MAX_STREAMS;
use trustmig_protocol::record::{Header, Opener, RecordType, Sealer, HEADER_LEN, TAG_LEN};

use super::wire::preamble;
use crate::ctx::DataConn;

/// `StreamInit`'s payload: the session id and the stream index.
const INIT_PAYLOAD: usize = 16 + 2;

/// A whole `StreamInit` record: header, payload, tag.
const STREAM_INIT_RECORD: usize = HEADER_LEN + INIT_PAYLOAD + TAG_LEN;

/// Candidates of one session checked at once; a new one pushes out the oldest. Twice the most
/// streams a session has, so that its genuine connections, all taken off the queue before any
/// check has run, never push out one another.
pub const MAX_PENDING: usize = 2 * MAX_STREAMS as usize;

/// Dropped connections of one session logged one by one; the rest are counted.
const LOGGED_DROPS: u64 = 8;

impl Drop for Binder<'_> {
    fn drop(&mut self) {
        if self.dropped > LOGGED_DROPS {
            warn!(
                dropped = self.dropped,
                "data connections dropped in this session (the first {LOGGED_DROPS} logged)"
            );
        }
    }
}

/// `StreamInit`'s payload for stream `index` of session `sid`.
fn init_payload(sid: &[u8; 16], index: u16) -> [u8; INIT_PAYLOAD] {
    let mut p = [0u8; INIT_PAYLOAD];
    p[..16].copy_from_slice(sid);
    p[16..].copy_from_slice(&index.to_be_bytes());
    p
}

/// The source's first bytes on data stream `index` (preamble and sealed `StreamInit`), and the
/// sealer that goes on sealing the stream.
pub fn opening(
    keys: &KeySchedule,
    index: u16,
) -> Result<(Vec<u8>, Sealer), trustmig_protocol::record::RecordError> {
    let sid = keys.session_id();
    let mut sealer = Sealer::new(
        keys.stream_secret(Direction::SourceToDestination, index),
        index,
    );
    let mut first = preamble(&sid, index).to_vec();
    sealer.seal(
        RecordType::StreamInit,
        &init_payload(&sid, index),
        &mut first,
    )?;
    Ok((first, sealer))
}

/// Read a candidate's `StreamInit` and check it: `Some` with the opener that authenticated it,
/// `None` (the connection is dropped) for anything else or nothing within `timeout`.
async fn check(
    mut sock: TcpStream,
    secret: TrafficSecret,
    sid: [u8; 16],
    index: u16,
    timeout: Duration,
) -> Option<(u16, TcpStream, Opener)> {
    sock.set_nodelay(true).ok();
    let mut record = [0u8; STREAM_INIT_RECORD];
    let read = async {
        sock.read_exact(&mut record[..HEADER_LEN]).await.ok()?;
        let header = Header::parse(record[..HEADER_LEN].try_into().ok()?).ok()?;
        // Any other length is not a StreamInit: refused before reading it.
        if header.len as usize != INIT_PAYLOAD + TAG_LEN {
            return None;
        }
        sock.read_exact(&mut record[HEADER_LEN..]).await.ok()
    };
    tokio::time::timeout(timeout, read).await.ok()??;
    let mut opener = Opener::new(secret, index);
    let genuine = matches!(opener.open(&mut record),
        Ok((RecordType::StreamInit, p)) if p == init_payload(&sid, index));
    genuine.then_some((index, sock, opener))
}

/// Binds a session's data streams `0..count` as their `StreamInit`s authenticate.
pub struct Binder<'a> {
    conns: mpsc::Receiver<DataConn>,
    keys: &'a KeySchedule,
    bound: Vec<bool>,
    timeout: Duration,
    pending: JoinSet<Option<(u16, TcpStream, Opener)>>,
    /// The pending checks, oldest first (finished ones are pruned as new ones arrive).
    order: VecDeque<AbortHandle>,
    /// Connections dropped so far (`dropped`).
    dropped: u64,
}

impl<'a> Binder<'a> {
    /// Bind the candidates `conns` brings for the session of `keys`; each may take `timeout`
    /// to send its `StreamInit`.
    pub fn new(
        conns: mpsc::Receiver<DataConn>,
        keys: &'a KeySchedule,
        count: u16,
        timeout: Duration,
    ) -> Self {
        Self {
            conns,
            keys,
            bound: vec![false; usize::from(count)],
            timeout,
            pending: JoinSet::new(),
            order: VecDeque::new(),
            dropped: 0,
        }
    }

    /// The next stream bound: its index, connection and opener. `None` once the session's
    /// connections end (the driver closed it). Candidates for an index out of range or
    /// already bound, and those that do not authenticate, are dropped; the session goes on.
    pub async fn next(&mut self) -> Option<(u16, TcpStream, Opener)> {
        loop {
            tokio::select! {
                c = self.conns.recv() => {
                    let (i, sock) = c?;
                    self.candidate(i, sock);
                }
                Some(r) = self.pending.join_next() => match r {
                    Ok(Some((i, sock, opener))) if !self.bound[usize::from(i)] => {
                        self.bound[usize::from(i)] = true;
                        return Some((i, sock, opener));
                    }
                    Ok(Some((i, ..))) => self.dropped(i, "surplus data connection dropped"),
                    // Unauthenticated or pushed out: drop the connection, keep the session
                    // (SPEC.md §7.1). Its stream index is not known here: logged as 65535.
                    Ok(None) | Err(_) => self.dropped(u16::MAX, "data connection failed StreamInit; dropped"),
                },
            }
        }
    }

    /// A dropped connection, logged: the first few each, then only counted (anyone who saw a
    /// preamble can open them, and must not fill the log), the count when the session ends.
    fn dropped(&mut self, stream: u16, what: &str) {
        self.dropped += 1;
        if self.dropped <= LOGGED_DROPS {
            warn!(stream, "{what}");
        }
    }

    fn candidate(&mut self, i: u16, sock: TcpStream) {
        if self.bound.get(usize::from(i)).is_none_or(|b| *b) {
            self.dropped(i, "surplus data connection dropped");
            return;
        }
        self.order.retain(|h| !h.is_finished());
        if self.order.len() >= MAX_PENDING {
            if let Some(oldest) = self.order.pop_front() {
                oldest.abort();
            }
        }
        // A fresh opener per candidate: a forgery may poison one.
        let secret = self.keys.stream_secret(Direction::SourceToDestination, i);
        let sid = self.keys.session_id();
        let handle = self
            .pending
            .spawn(check(sock, secret, sid, i, self.timeout));
        self.order.push_back(handle);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;
    use trustmig_protocol::keys::KeySchedule;

    fn keys() -> KeySchedule {
        KeySchedule::new(&[7; 32], &[9; 32])
    }

    /// A record header (version 1, stream 0, sequence 0) declaring `len` bytes to follow.
    fn header_declaring(len: u32) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0] = 1;
        h[12..].copy_from_slice(&len.to_be_bytes());
        h
    }

    /// A connected pair: (what the candidate writes into, what the binder reads).
    async fn pair(l: &TcpListener) -> (TcpStream, TcpStream) {
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn the_genuine_stream_binds_past_squatters_and_forgeries() {
        let keys = keys();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (tx, rx) = mpsc::channel(64);
        let mut binder = Binder::new(rx, &keys, 2, Duration::from_secs(60));
        let mut keep = Vec::new();
        // More silent squatters than may wait at once, a header declaring a huge record, a
        // StreamInit sealed for another index, an index out of range.
        for _ in 0..MAX_PENDING + 4 {
            let (a, b) = pair(&l).await;
            keep.push(a);
            tx.send((1, b)).await.unwrap();
        }
        let (mut a, b) = pair(&l).await;
        a.write_all(&header_declaring(1 << 20)).await.unwrap();
        keep.push(a);
        tx.send((1, b)).await.unwrap();
        let (first, _) = opening(&keys, 0).unwrap();
        let (mut a, b) = pair(&l).await;
        a.write_all(&first[crate::net::wire::PREAMBLE_LEN..])
            .await
            .unwrap();
        keep.push(a);
        tx.send((1, b)).await.unwrap();
        let (_, b) = pair(&l).await;
        tx.send((2, b)).await.unwrap();
        // The genuine one, last.
        let (first, mut sealer) = opening(&keys, 1).unwrap();
        let (mut a, b) = pair(&l).await;
        a.write_all(&first[crate::net::wire::PREAMBLE_LEN..])
            .await
            .unwrap();
        tx.send((1, b)).await.unwrap();
        let (i, mut sock, mut opener) =
            tokio::time::timeout(Duration::from_secs(10), binder.next())
                .await
                .expect("bound in time")
                .expect("bound");
        assert_eq!(i, 1);
        // The opener goes on where the StreamInit left off: the next record opens.
        let mut rec = Vec::new();
        sealer.seal(RecordType::Pages, b"next", &mut rec).unwrap();
        a.write_all(&rec).await.unwrap();
        let mut got = vec![0u8; rec.len()];
        sock.read_exact(&mut got).await.unwrap();
        assert_eq!(
            opener.open(&mut got).unwrap(),
            (RecordType::Pages, &b"next"[..])
        );
        // No squatter is left waiting beyond the cap.
        binder.order.retain(|h| !h.is_finished());
        assert!(binder.order.len() <= MAX_PENDING, "{}", binder.order.len());
        // The session ends: no more streams.
        drop(tx);
        assert!(binder.next().await.is_none());
    }

    /// Past `MAX_PENDING` waiting candidates, the oldest is pushed out: its connection closes.
    #[tokio::test]
    async fn the_oldest_waiting_candidate_is_pushed_out() {
        let keys = keys();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (tx, rx) = mpsc::channel(64);
        let mut binder = Binder::new(rx, &keys, 1, Duration::from_secs(60));
        let mut squatters = Vec::new();
        for _ in 0..=MAX_PENDING {
            let (a, b) = pair(&l).await;
            squatters.push(a);
            tx.send((0, b)).await.unwrap();
        }
        // The binder takes them off the queue while it waits for a stream that never binds.
        let _ = tokio::time::timeout(Duration::from_millis(300), binder.next()).await;
        let mut first = squatters.remove(0);
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), first.read(&mut byte)).await;
        assert!(
            matches!(read, Ok(Ok(0))),
            "the oldest is still open: {read:?}"
        );
        // The newest still waits.
        let mut last = squatters.pop().unwrap();
        let read = tokio::time::timeout(Duration::from_millis(200), last.read(&mut byte)).await;
        assert!(read.is_err(), "the newest was closed too");
    }

    #[tokio::test]
    async fn a_silent_candidate_is_dropped_after_the_timeout() {
        let keys = keys();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (a, b) = pair(&l).await;
        let sid = keys.session_id();
        let secret = keys.stream_secret(Direction::SourceToDestination, 0);
        let checked = check(b, secret, sid, 0, Duration::from_millis(50));
        let r = tokio::time::timeout(Duration::from_secs(5), checked).await;
        assert!(matches!(r, Ok(None)), "not dropped after its timeout");
        drop(a);
    }

    /// A header that declares a record of any other length is refused as soon as it is read:
    /// nothing waits for (or allocates) the body it announces.
    #[tokio::test]
    async fn a_header_of_another_length_is_refused_at_once() {
        let keys = keys();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        for len in [
            1u32 << 20,
            (INIT_PAYLOAD + TAG_LEN + 1) as u32,
            TAG_LEN as u32,
        ] {
            let (mut a, b) = pair(&l).await;
            a.write_all(&header_declaring(len)).await.unwrap();
            let secret = keys.stream_secret(Direction::SourceToDestination, 0);
            let checked = check(b, secret, keys.session_id(), 0, Duration::from_secs(60));
            let r = tokio::time::timeout(Duration::from_secs(5), checked).await;
            assert!(matches!(r, Ok(None)), "length {len}: not refused at once");
        }
    }
}
