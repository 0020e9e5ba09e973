//! Bytes on sockets: control frames, data-stream preambles, whole records. spec: SPEC.md §4.1, §7.1

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use trustmig_protocol::codec::CodecError;
use trustmig_protocol::messages::{frame_len, FRAME_HEADER};
use trustmig_protocol::record::{Header, RecordError, HEADER_LEN};

/// First bytes of a data-stream connection (a TLS connection starts with 0x16 instead).
pub const DATA_MAGIC: &[u8; 8] = b"TMDATA01";
/// Preamble length: magic, session id, stream index.
pub const PREAMBLE_LEN: usize = 8 + 16 + 2;

/// A transport failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// Socket error.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed the connection.
    #[error("connection closed by peer")]
    Closed,
    /// A frame is too large.
    #[error("{0}")]
    Codec(#[from] CodecError),
    /// A record header is invalid.
    #[error("{0}")]
    Record(#[from] RecordError),
    /// A data connection's preamble is wrong.
    #[error("bad data-stream preamble")]
    BadPreamble,
}

fn closed(e: std::io::Error) -> WireError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        WireError::Closed
    } else {
        WireError::Io(e)
    }
}

/// Write one control message (already CBOR-encoded) as a frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, body: &[u8]) -> Result<(), WireError> {
    w.write_all(&(body.len() as u32).to_be_bytes()).await?;
    w.write_all(body).await?;
    w.flush().await?;
    Ok(())
}

/// Read one frame body; its length is bounded before allocation.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Vec<u8>, WireError> {
    let mut h = [0u8; FRAME_HEADER];
    r.read_exact(&mut h).await.map_err(closed)?;
    let n = frame_len(h)?;
    let mut body = vec![0u8; n];
    r.read_exact(&mut body).await.map_err(closed)?;
    Ok(body)
}

/// The preamble a data connection starts with.
pub fn preamble(session_id: &[u8; 16], stream: u16) -> [u8; PREAMBLE_LEN] {
    let mut p = [0u8; PREAMBLE_LEN];
    p[..8].copy_from_slice(DATA_MAGIC);
    p[8..24].copy_from_slice(session_id);
    p[24..].copy_from_slice(&stream.to_be_bytes());
    p
}

/// Parse the rest of a preamble (after the magic was recognised): (session id, stream).
pub fn parse_preamble(p: &[u8; PREAMBLE_LEN]) -> Result<([u8; 16], u16), WireError> {
    if &p[..8] != DATA_MAGIC {
        return Err(WireError::BadPreamble);
    }
    let mut sid = [0u8; 16];
    sid.copy_from_slice(&p[8..24]);
    Ok((sid, u16::from_be_bytes([p[24], p[25]])))
}

/// Read one whole record (header and sealed body) into `buf`, replacing its contents.
/// Returns `Ok(false)` on a clean end of stream before any byte of a record.
pub async fn read_record<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<bool, WireError> {
    let mut h = [0u8; HEADER_LEN];
    match r.read_exact(&mut h).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
        Err(e) => return Err(e.into()),
    }
    let header = Header::parse(&h)?;
    // Reuses the buffer's bytes (read_exact overwrites them): zeroing a record's worth before
    // every read showed in profiles of the bulk path.
    buf.resize(HEADER_LEN + header.len as usize, 0);
    buf[..HEADER_LEN].copy_from_slice(&h);
    r.read_exact(&mut buf[HEADER_LEN..]).await.map_err(closed)?;
    Ok(true)
}

/// Read control frames in a task of their own and hand them over a channel. `read_frame` is
/// not cancel-safe (a frame half read when a `select!` picks another branch would be lost and
/// the stream desynchronised); a channel receive is.
pub fn spawn_frame_reader<R>(mut rd: R) -> mpsc::Receiver<Result<Vec<u8>, WireError>>
where
    R: AsyncRead + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        loop {
            let r = read_frame(&mut rd).await;
            let stop = r.is_err();
            if tx.send(r).await.is_err() || stop {
                break;
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    /// The one control-frame reader is cancel-safe: frames split across reads arrive whole
    /// even when the receiving end is cancelled often, as a `select!` does.
    #[tokio::test]
    async fn frames_survive_split_and_cancelled_reads() {
        let mut wire = Vec::new();
        for body in [&b"first"[..], &b""[..], &[7u8; 40_000][..]] {
            wire.extend_from_slice(&(body.len() as u32).to_be_bytes());
            wire.extend_from_slice(body);
        }
        let (mut w, r) = tokio::io::duplex(64);
        let feed = tokio::spawn(async move {
            for c in wire.chunks(997) {
                w.write_all(c).await.expect("write");
                tokio::time::sleep(Duration::from_micros(50)).await;
            }
        });
        let mut frames = spawn_frame_reader(r);
        let mut got = Vec::new();
        while got.len() < 3 {
            // Cancel the wait often, as a select! would.
            if let Ok(r) = tokio::time::timeout(Duration::from_micros(30), frames.recv()).await {
                got.push(r.expect("open").expect("frame"));
            }
        }
        feed.await.expect("feed");
        assert_eq!(got[0], b"first");
        assert!(got[1].is_empty());
        assert_eq!(got[2], vec![7u8; 40_000]);
        assert!(matches!(frames.recv().await, Some(Err(WireError::Closed))));
    }
}
