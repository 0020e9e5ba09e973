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
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
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
    fs::read(path)
        .map(zeroize::Zeroizing::new)
        .map_err(AgentError::io(path))
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

/// Read a text file with its path in any error.
pub fn read_text(path: &Path) -> Result<String, AgentError> {
    fs::read_to_string(path).map_err(AgentError::io(path))
}
