//! The agent home: one directory holding identity, configuration, trust store and journal.
//!
//! ```text
//! HOME/identity.key     agent identity, ed25519 PKCS#8 (0600; refused if group/world readable)
//! HOME/identity.crt     self-signed certificate for that key (DER); peers pin the key, not the CA
//! HOME/config.toml      configuration (commented defaults written by `init`)
//! HOME/trust/peers.toml      peer agent identities
//! HOME/trust/operators.toml  operator keys allowed to sign orders
//! HOME/trust/policy.toml     attestation policy (trusted AKs, allowed measurements)
//! HOME/journal/         order and migration journal (fsync'd)
//! HOME/control.sock     local control socket (0600), while the agent runs
//! ```

use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::AgentError;

/// Paths inside a home.
#[derive(Clone, Debug)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    /// A home at `root` (not checked).
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The home directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The CLI command `trustmig SUBCOMMAND --home HOME OPERANDS...` for this home (`args`:
    /// the subcommand, then its operands), quoted for a shell: what an operator is told to run
    /// works as printed, from any directory, `TRUSTMIG_HOME` set or not, whatever the operands
    /// (`--` before them when one starts with `-`, as a VM name may).
    pub fn command(&self, args: &[&str]) -> String {
        let root = std::path::absolute(&self.root).unwrap_or_else(|_| self.root.clone());
        let mut words = vec!["trustmig".to_string()];
        let (sub, operands) = args
            .split_first()
            .map_or((None, &[][..]), |(s, o)| (Some(s), o));
        words.extend(sub.map(|s| s.to_string()));
        words.extend(["--home".to_string(), root.display().to_string()]);
        if operands.iter().any(|o| o.starts_with('-')) {
            words.push("--".into());
        }
        words.extend(operands.iter().map(|o| o.to_string()));
        trustmig_qemu::cmdline::shell_line(&words)
    }
    /// Identity private key.
    pub fn identity_key(&self) -> PathBuf {
        self.root.join("identity.key")
    }
    /// Identity certificate.
    pub fn identity_cert(&self) -> PathBuf {
        self.root.join("identity.crt")
    }
    /// Configuration file.
    pub fn config(&self) -> PathBuf {
        self.root.join("config.toml")
    }
    /// Trust directory.
    pub fn trust_dir(&self) -> PathBuf {
        self.root.join("trust")
    }
    /// Peer identities.
    pub fn peers(&self) -> PathBuf {
        self.trust_dir().join("peers.toml")
    }
    /// Operator keys.
    pub fn operators(&self) -> PathBuf {
        self.trust_dir().join("operators.toml")
    }
    /// Attestation policy.
    pub fn policy(&self) -> PathBuf {
        self.trust_dir().join("policy.toml")
    }
    /// Journal directory.
    pub fn journal_dir(&self) -> PathBuf {
        self.root.join("journal")
    }
    /// The journal's file (`journal::FILE` in the journal directory).
    pub fn journal_file(&self) -> PathBuf {
        self.journal_dir().join(crate::journal::FILE)
    }
    /// Default control socket path.
    pub fn control_socket(&self) -> PathBuf {
        self.root.join("control.sock")
    }

    /// Fail with a helpful error unless this looks like an initialised home.
    pub fn check(&self) -> Result<(), AgentError> {
        for (p, what) in [
            (self.identity_key(), "identity.key"),
            (self.config(), "config.toml"),
            (self.trust_dir(), "trust/"),
            (self.journal_dir(), "journal/"),
        ] {
            if !p.exists() && self.identity_key().exists() {
                return Err(AgentError::IncompleteHome {
                    home: self.root.clone(),
                    what: what.into(),
                });
            }
            if !p.exists() {
                return Err(AgentError::NotAHome {
                    home: self.root.clone(),
                    what: what.into(),
                });
            }
        }
        Ok(())
    }
}

/// Write `data` to a new file with mode 0600, fsync it, and refuse to overwrite.
pub fn write_secret(path: &Path, data: &[u8]) -> Result<(), AgentError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(AgentError::io(path))?;
    f.write_all(data).map_err(AgentError::io(path))?;
    f.sync_all().map_err(AgentError::io(path))
}

/// Read a secret file, refusing it if group or others can read or write it.
pub fn read_secret(path: &Path) -> Result<zeroize::Zeroizing<Vec<u8>>, AgentError> {
    let meta = fs::metadata(path).map_err(AgentError::io(path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(AgentError::LoosePermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    read_limited(path, MAX_TEXT_FILE).map(zeroize::Zeroizing::new)
}

/// Write a non-secret file atomically (temp file, fsync, rename).
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), AgentError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(AgentError::io(dir))?;
    tmp.write_all(data).map_err(AgentError::io(path))?;
    tmp.as_file().sync_all().map_err(AgentError::io(path))?;
    tmp.persist(path).map_err(|e| AgentError::Io {
        path: path.to_path_buf(),
        source: e.error,
    })?;
    Ok(())
}

/// Read a text file (a configuration or trust file, a certificate) with its path in any error;
/// one larger than [`MAX_TEXT_FILE`] is refused.
pub fn read_text(path: &Path) -> Result<String, AgentError> {
    let bytes = read_limited(path, MAX_TEXT_FILE)?;
    String::from_utf8(bytes).map_err(|e| AgentError::BadConfig {
        path: path.to_path_buf(),
        reason: format!("not UTF-8 text: {e}"),
    })
}

/// Most bytes of a text file the agent or the CLI reads whole: a configuration, trust file or
/// certificate is a few KiB; a path to a device or a huge file by mistake is refused by its
/// size, not read until memory runs out.
pub const MAX_TEXT_FILE: u64 = 4 << 20;

/// Most bytes of an order or an enrollment file (the codec's own limit on a message).
pub const MAX_MESSAGE_FILE: u64 = 1 << 20;

/// The file at `path`, whole, if it holds at most `limit` bytes; else a refusal naming it.
/// Reads at most one byte past `limit`: a huge file or a device that never ends is refused,
/// not read until memory runs out. A pipe whose writer is already there (`<(…)`, `/dev/stdin`)
/// is read as a file; a FIFO without a writer is refused at once instead of blocking at `open`.
pub fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>, AgentError> {
    use std::io::Read;
    // Opened non-blocking: a FIFO's `open` for reading would otherwise wait for a writer
    // forever. Reads then block again, so a pipe whose writer is slow is still read whole.
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
        .map_err(AgentError::io(path))?;
    let flags = rustix::fs::fcntl_getfl(&file).map_err(|e| AgentError::io(path)(e.into()))?;
    rustix::fs::fcntl_setfl(&file, flags - rustix::fs::OFlags::NONBLOCK)
        .map_err(|e| AgentError::io(path)(e.into()))?;
    let meta = file.metadata().map_err(AgentError::io(path))?;
    // Sized once, as `fs::read` does: a buffer grown by reallocation would leave copies of a
    // key file's bytes behind in freed memory, unzeroed.
    let size = meta.len().min(limit) + 1;
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    (&file)
        .take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(AgentError::io(path))?;
    if bytes.len() as u64 > limit {
        return Err(AgentError::BadConfig {
            path: path.to_path_buf(),
            reason: format!("larger than {limit} bytes: not a file of this kind"),
        });
    }
    if bytes.is_empty() && meta.file_type().is_fifo() {
        // A FIFO read before any writer opened it ends at once (the kernel's end of file).
        return Err(AgentError::BadConfig {
            path: path.to_path_buf(),
            reason: "a FIFO with no writer: nothing to read (give a file, or open the FIFO's \
                     writer first)"
                .into(),
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file up to its bound is read whole; one byte more, or a device that never ends, is
    /// refused by name and size, not read until memory runs out.
    #[test]
    fn a_file_past_its_bound_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("order.cbor");
        fs::write(&path, vec![7u8; 100]).unwrap();
        assert_eq!(read_limited(&path, 100).unwrap().len(), 100);
        let e = read_limited(&path, 99).unwrap_err().to_string();
        assert!(
            e.contains(&path.display().to_string()) && e.contains("larger than 99 bytes"),
            "{e}"
        );
        let e = read_text(Path::new("/dev/zero")).unwrap_err().to_string();
        assert!(e.contains("/dev/zero") && e.contains("larger than"), "{e}");
        fs::write(&path, [0xff, 0xfe]).unwrap();
        let e = read_text(&path).unwrap_err().to_string();
        assert!(e.contains("not UTF-8"), "{e}");
    }

    /// A FIFO nobody writes to is refused by name at once (it blocked at `open` forever); a
    /// pipe whose writer came first, as a shell's `<(…)` gives, is read whole.
    #[test]
    fn a_fifo_without_a_writer_is_refused_and_a_pipe_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("order.fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let (tx, rx) = std::sync::mpsc::channel();
        let path = fifo.clone();
        std::thread::spawn(move || tx.send(read_limited(&path, 100).map_err(|e| e.to_string())));
        let e = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("reading a FIFO without a writer must not block")
            .unwrap_err();
        assert!(
            e.contains(&fifo.display().to_string()) && e.contains("FIFO with no writer"),
            "{e}"
        );

        // A pipe from a writer that has written and gone, as `<(…)` gives.
        let mut writer = std::process::Command::new("printf")
            .arg("an order")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        assert!(writer.wait().unwrap().success());
        let reader = writer.stdout.take().unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&reader);
        let bytes = read_limited(Path::new(&format!("/proc/self/fd/{fd}")), 100).unwrap();
        assert_eq!(bytes, b"an order");
    }
}
