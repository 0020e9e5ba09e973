//! systemd readiness (`Type=notify`): `READY=1` once the agent listens, `STOPPING=1` when it
//! shuts down, sent to `$NOTIFY_SOCKET` (sd_notify(3)'s protocol: one datagram on a unix
//! socket, a path or, starting with `@`, an abstract name). Without the variable: nothing.

use std::io;
use std::os::unix::net::UnixDatagram;

use tracing::warn;

/// Tell systemd (if it started us) `state`, e.g. `"READY=1"`; failures are logged, never fatal.
pub fn notify(state: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send(&target.to_string_lossy(), state) {
        warn!("sd_notify {state:?} to {target:?}: {e}");
    }
}

fn send(target: &str, state: &str) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    match target.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        }
        None => {
            sock.send_to(state.as_bytes(), target)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_reaches_a_path_and_an_abstract_socket() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("notify.sock");
        let rx = UnixDatagram::bind(&path).expect("bind");
        send(&path.display().to_string(), "READY=1").expect("send");
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"READY=1");
        use std::os::linux::net::SocketAddrExt;
        let name = format!("trustmig-test-{}", std::process::id());
        let addr =
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("addr");
        let rx = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        send(&format!("@{name}"), "STOPPING=1").expect("send");
        let n = rx.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"STOPPING=1");
        // Nobody listening: an error, which `notify` only logs.
        assert!(send(&dir.path().join("none").display().to_string(), "READY=1").is_err());
    }
}
