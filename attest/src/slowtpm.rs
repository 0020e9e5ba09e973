//! A TPM as slow as real ones, for tests and benchmarks: a relay in front of swtpm's TCP
//! ports that holds back the response to chosen TPM commands. swtpm quotes in ~3.5 ms; hardware
//! TPMs sign in 100–600 ms (a field study: 200 ms median, 600 ms at the 95th percentile), and
//! every figure that involves a quote must be measured with one as slow. spec: SPEC.md §8.7
//!
//! The TCTI (`swtpm:host=H,port=P`) talks TPM commands on port P and the swtpm control
//! protocol on P + 1: the relay listens on a pair of its own, delays only complete TPM
//! responses on the command port and passes the control port through.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// `TPM2_CC_Quote`.
pub const TPM2_CC_QUOTE: u32 = 0x0000_0158;
/// `TPM2_CC_Sign`.
pub const TPM2_CC_SIGN: u32 = 0x0000_015D;

/// Which commands wait, and how long.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delay {
    /// Each listed command code waits this long before its response returns.
    Commands(Vec<u32>, Duration),
    /// Every command waits this long.
    Flat(Duration),
}

impl Delay {
    /// A TPM that signs (quotes) in `d`, as a hardware TPM does; everything else at swtpm's speed.
    pub fn signing(d: Duration) -> Self {
        Self::Commands(vec![TPM2_CC_QUOTE, TPM2_CC_SIGN], d)
    }

    fn of(&self, command: u32) -> Duration {
        match self {
            Self::Commands(cs, d) if cs.contains(&command) => *d,
            Self::Commands(..) => Duration::ZERO,
            Self::Flat(d) => *d,
        }
    }
}

/// A running relay; stops accepting on drop (connections in progress finish).
pub struct SlowTpm {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl SlowTpm {
    /// Relay to the swtpm whose command port is `target` (control port `target + 1`).
    pub fn start(target: u16, delay: Delay) -> io::Result<Self> {
        let (cmd, ctrl) = listener_pair()?;
        let port = cmd.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        spawn_accept(cmd, target, Some(delay), stop.clone());
        spawn_accept(ctrl, target + 1, None, stop.clone());
        Ok(Self { port, stop })
    }

    /// The TCTI configuration string for the slow TPM.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }
}

impl Drop for SlowTpm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn listener_pair() -> io::Result<(TcpListener, TcpListener)> {
    for _ in 0..50 {
        let a = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let p = a.local_addr()?.port();
        if p == u16::MAX {
            continue;
        }
        if let Ok(b) = TcpListener::bind((Ipv4Addr::LOCALHOST, p + 1)) {
            return Ok((a, b));
        }
    }
    Err(io::Error::other("no free loopback port pair"))
}

fn spawn_accept(l: TcpListener, target: u16, delay: Option<Delay>, stop: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        for client in l.incoming() {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let Ok(client) = client else { continue };
            let delay = delay.clone();
            std::thread::spawn(move || {
                let Ok(server) = TcpStream::connect((Ipv4Addr::LOCALHOST, target)) else {
                    return;
                };
                let _ = match delay {
                    Some(d) => relay_commands(client, server, &d),
                    None => relay_plain(client, server),
                };
            });
        }
    });
}

/// Control port: bytes both ways, unchanged. When either side closes, both connections are
/// shut down: swtpm serves one control connection at a time, and one left open would hold up
/// the next TCTI for ever.
fn relay_plain(client: TcpStream, server: TcpStream) -> io::Result<()> {
    let (mut c2, mut s2) = (client.try_clone()?, server.try_clone()?);
    let (c3, s3) = (client.try_clone()?, server.try_clone()?);
    let up = std::thread::spawn(move || {
        let _ = io::copy(&mut c2, &mut s2);
        let _ = c3.shutdown(Shutdown::Both);
        let _ = s3.shutdown(Shutdown::Both);
    });
    let (mut c, mut s) = (client, server);
    let _ = io::copy(&mut s, &mut c);
    let _ = c.shutdown(Shutdown::Both);
    let _ = s.shutdown(Shutdown::Both);
    let _ = up.join();
    Ok(())
}

/// One TPM command (header: tag u16, size u32, code u32) or response (tag, size, rc) at a time.
fn read_frame(from: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut head = [0u8; 10];
    match from.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let size = u32::from_be_bytes([head[2], head[3], head[4], head[5]]) as usize;
    if !(10..=1 << 20).contains(&size) {
        return Err(io::Error::other(format!("TPM frame of {size} bytes")));
    }
    let mut frame = head.to_vec();
    frame.resize(size, 0);
    from.read_exact(&mut frame[10..])?;
    Ok(Some(frame))
}

/// Command port: each command to swtpm, its response back after the command's delay.
fn relay_commands(mut client: TcpStream, mut server: TcpStream, delay: &Delay) -> io::Result<()> {
    while let Some(cmd) = read_frame(&mut client)? {
        let code = u32::from_be_bytes([cmd[6], cmd[7], cmd[8], cmd[9]]);
        server.write_all(&cmd)?;
        let Some(resp) = read_frame(&mut server)? else {
            return Ok(());
        };
        std::thread::sleep(delay.of(code));
        client.write_all(&resp)?;
    }
    let _ = server.shutdown(Shutdown::Both);
    Ok(())
}
