//! A software TPM for tests, benchmarks and demos (feature `swtpm-harness`): starts `swtpm` on a
//! free loopback port pair in a temporary directory and stops it on drop.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

const INSTALL_HINT: &str = "apt-get install swtpm swtpm-tools";

/// The harness could not provide a TPM.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SwtpmError {
    /// A required program is not on PATH.
    #[error("{program} is not installed (try: {INSTALL_HINT})")]
    NotInstalled {
        /// The program (`swtpm` or `swtpm_setup`).
        program: &'static str,
    },
    /// Filesystem or process error.
    #[error("swtpm harness: {what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Cause.
        source: io::Error,
    },
    /// swtpm_setup failed.
    #[error("swtpm_setup failed ({status}): {stderr}")]
    Setup {
        /// Exit status.
        status: String,
        /// Its stderr.
        stderr: String,
    },
    /// swtpm did not start listening.
    #[error("swtpm did not start: {0}")]
    Start(String),
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> SwtpmError {
    move |source| SwtpmError::Io { what, source }
}

/// Find `program` on PATH.
pub fn which(program: &'static str) -> Result<PathBuf, SwtpmError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .ok_or(SwtpmError::NotInstalled { program })
}

/// A local EK certificate authority (swtpm-localca state), shared by the TPMs manufactured
/// with it. The CA key is created by the first [`Swtpm::start_manufactured`].
pub struct LocalCa {
    dir: TempDir,
}

impl LocalCa {
    /// A new, empty CA directory with the config files swtpm_setup needs.
    pub fn new() -> Result<Self, SwtpmError> {
        let dir = tempfile::Builder::new()
            .prefix("trustmig-localca-")
            .tempdir()
            .map_err(io_err("create CA dir"))?;
        let d = dir.path().display();
        std::fs::write(
            dir.path().join("swtpm-localca.conf"),
            format!(
                "statedir = {d}\nsigningkey = {d}/signkey.pem\nissuercert = {d}/issuercert.pem\ncertserial = {d}/certserial\n"
            ),
        )
        .map_err(io_err("write swtpm-localca.conf"))?;
        std::fs::write(
            dir.path().join("swtpm-localca.options"),
            "--platform-manufacturer trustmig\n--platform-version 2.1\n--platform-model swtpm\n",
        )
        .map_err(io_err("write swtpm-localca.options"))?;
        std::fs::write(
            dir.path().join("swtpm_setup.conf"),
            format!(
                "create_certs_tool = /usr/bin/swtpm_localca\ncreate_certs_tool_config = {d}/swtpm-localca.conf\ncreate_certs_tool_options = {d}/swtpm-localca.options\nactive_pcr_banks = sha256\n"
            ),
        )
        .map_err(io_err("write swtpm_setup.conf"))?;
        Ok(Self { dir })
    }

    /// The CA's state directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// PEM text of the root CA and the issuing CA certificates (after the first manufacture).
    pub fn certificates_pem(&self) -> Result<String, SwtpmError> {
        let mut out = String::new();
        for f in ["swtpm-localca-rootca-cert.pem", "issuercert.pem"] {
            out += &std::fs::read_to_string(self.dir.path().join(f))
                .map_err(io_err("read CA certificate"))?;
        }
        Ok(out)
    }
}

/// A running swtpm. Killed, and its state removed, on drop.
pub struct Swtpm {
    child: Child,
    port: u16,
    dir: TempDir,
}

/// A port `p` for swtpm's server, with its control port `p + 1` (see [`crate::loopback`]: CI
/// saw a TPM lose such a race, and its readiness probe reach another test's socket).
fn free_port_pair() -> Result<u16, SwtpmError> {
    crate::loopback::reserve(2).map_err(io_err("reserve loopback ports"))
}

impl Swtpm {
    /// A fresh TPM (no EK certificate).
    pub fn start() -> Result<Self, SwtpmError> {
        let swtpm = which("swtpm")?;
        let dir = tempfile::Builder::new()
            .prefix("trustmig-swtpm-")
            .tempdir()
            .map_err(io_err("create state dir"))?;
        Self::launch(&swtpm, dir)
    }

    /// A TPM manufactured by `swtpm_setup --create-ek-cert` with an EK certificate from `ca`.
    pub fn start_manufactured(ca: &LocalCa) -> Result<Self, SwtpmError> {
        let swtpm = which("swtpm")?;
        let setup = which("swtpm_setup")?;
        let dir = tempfile::Builder::new()
            .prefix("trustmig-swtpm-")
            .tempdir()
            .map_err(io_err("create state dir"))?;
        let out = Command::new(setup)
            .arg("--tpm2")
            .arg("--tpmstate")
            .arg(dir.path())
            .arg("--create-ek-cert")
            .arg("--config")
            .arg(ca.dir().join("swtpm_setup.conf"))
            .arg("--overwrite")
            .stdin(Stdio::null())
            .output()
            .map_err(io_err("run swtpm_setup"))?;
        if !out.status.success() {
            return Err(SwtpmError::Setup {
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Self::launch(&swtpm, dir)
    }

    fn launch(swtpm: &Path, dir: TempDir) -> Result<Self, SwtpmError> {
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port_pair()?;
            let mut child = Command::new(swtpm)
                .arg("socket")
                .arg("--tpm2")
                .arg("--tpmstate")
                .arg(format!("dir={}", dir.path().display()))
                .arg("--server")
                .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
                .arg("--flags")
                .arg("not-need-init,startup-clear")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(io_err("spawn swtpm"))?;
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    let mut err = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        let _ = io::Read::read_to_string(&mut e, &mut err);
                    }
                    last = format!("swtpm exited ({status}): {}", err.trim());
                    break;
                }
                let up = |p: u16| {
                    TcpStream::connect_timeout(
                        &SocketAddr::from((Ipv4Addr::LOCALHOST, p)),
                        Duration::from_millis(100),
                    )
                    .is_ok()
                };
                // Listening, and ours: a swtpm that could not bind exits at once, and the
                // probe may have reached someone else's socket.
                if up(port + 1) && up(port) {
                    std::thread::sleep(Duration::from_millis(5));
                    if matches!(child.try_wait(), Ok(None)) {
                        return Ok(Self { child, port, dir });
                    }
                    continue;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(SwtpmError::Start("not listening after 5 s".into()));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        Err(SwtpmError::Start(last))
    }

    /// The TCTI configuration string for this TPM (`swtpm:host=127.0.0.1,port=P`).
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// The server port (the control port is one above).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Power-cycle the TPM, as a reboot does: `CMD_INIT` on swtpm's control channel, then
    /// `TPM2_Startup(CLEAR)` as firmware sends it. Its permanent state (persistent keys, NV)
    /// stays; its volatile state (PCRs, loaded objects, sessions) goes.
    pub fn power_cycle(&self) -> Result<(), SwtpmError> {
        self.init()?;
        self.startup_clear()
    }

    /// `CMD_INIT` on swtpm's control channel.
    fn init(&self) -> Result<(), SwtpmError> {
        use std::io::{Read, Write};
        // swtpm's control protocol: a big-endian command (CMD_INIT = 2) and its init flags
        // (none); the answer is a big-endian TPM result, 0 for success.
        let ctrl = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port + 1));
        let mut s = TcpStream::connect_timeout(&ctrl, Duration::from_secs(5))
            .map_err(io_err("connect to swtpm's control port"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(io_err("set a read timeout"))?;
        s.write_all(&[0, 0, 0, 2, 0, 0, 0, 0])
            .map_err(io_err("send CMD_INIT"))?;
        let mut result = [0u8; 4];
        s.read_exact(&mut result)
            .map_err(io_err("read CMD_INIT's result"))?;
        match u32::from_be_bytes(result) {
            0 => Ok(()),
            rc => Err(SwtpmError::Start(format!("CMD_INIT answered {rc:#x}"))),
        }
    }

    /// `TPM2_Startup(TPM_SU_CLEAR)`, raw on the TPM's port (swtpm's TCP server takes TPM
    /// commands as they are); one that finds the TPM started already (`TPM_RC_INITIALIZE`)
    /// is as good.
    fn startup_clear(&self) -> Result<(), SwtpmError> {
        use std::io::{Read, Write};
        let tpm = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let mut s = TcpStream::connect_timeout(&tpm, Duration::from_secs(5))
            .map_err(io_err("connect to swtpm's TPM port"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(io_err("set a read timeout"))?;
        // tag TPM_ST_NO_SESSIONS, size 12, TPM_CC_Startup, TPM_SU_CLEAR.
        s.write_all(&[0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x44, 0, 0])
            .map_err(io_err("send TPM2_Startup"))?;
        let mut response = [0u8; 10];
        s.read_exact(&mut response)
            .map_err(io_err("read TPM2_Startup's response"))?;
        match u32::from_be_bytes([response[6], response[7], response[8], response[9]]) {
            0 | 0x100 => Ok(()),
            rc => Err(SwtpmError::Start(format!("TPM2_Startup answered {rc:#x}"))),
        }
    }

    /// The TPM state directory.
    pub fn state_dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// For tests: `Some(tpm)`, or `None` after printing a one-line skip reason when swtpm is not
/// installed. Panics (fails the test) when swtpm is missing and the `CI` variable is set, or
/// when it is installed but does not start.
pub fn or_skip(r: Result<Swtpm, SwtpmError>) -> Option<Swtpm> {
    match r {
        Ok(t) => Some(t),
        Err(e @ SwtpmError::NotInstalled { .. }) => {
            if std::env::var_os("CI").is_some() {
                panic!("CI requires swtpm: {e}");
            }
            eprintln!("skipped: {e}");
            None
        }
        Err(e) => panic!("swtpm harness failed: {e}"),
    }
}
