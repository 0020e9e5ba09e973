//! The trust store: peer agent identities and operator keys, as TOML lists of named hex keys.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::AgentError;
use crate::home::{read_text, write_atomic};
use crate::identity::parse_hex32;

/// One named key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Operator-chosen name.
    pub name: String,
    /// ed25519 public key, hex.
    pub key: String,
}

#[derive(Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default, rename = "key")]
    keys: Vec<Entry>,
}

/// A list of trusted keys (peers or operators) stored in one file.
#[derive(Clone, Debug, Default)]
pub struct KeyList {
    entries: Vec<(Entry, [u8; 32])>,
}

impl KeyList {
    /// Load `path`; a missing file is an empty list.
    pub fn load(path: &Path) -> Result<Self, AgentError> {
        if !path.exists() {
            return Ok(Self::default());
        }
        let f: File = toml::from_str(&read_text(path)?).map_err(|e| AgentError::BadConfig {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let mut entries = Vec::new();
        for e in f.keys {
            let k = parse_hex32(&e.key, "ed25519 public key", path)?;
            entries.push((e, k));
        }
        Ok(Self { entries })
    }

    /// Save to `path` atomically.
    pub fn save(&self, path: &Path) -> Result<(), AgentError> {
        let f = File {
            keys: self.entries.iter().map(|(e, _)| e.clone()).collect(),
        };
        let text = format!(
            "# trustmig trust store: one [[key]] per trusted key (name, hex ed25519 public key)\n{}",
            toml::to_string(&f).map_err(|e| AgentError::BadConfig {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?
        );
        write_atomic(path, text.as_bytes())
    }

    /// Add (or rename) a key.
    pub fn add(&mut self, name: &str, key: [u8; 32]) {
        self.entries.retain(|(_, k)| *k != key);
        self.entries.push((
            Entry {
                name: name.into(),
                key: hex::encode(key),
            },
            key,
        ));
    }

    /// Remove by name or hex key; returns whether anything was removed.
    pub fn remove(&mut self, name_or_key: &str) -> bool {
        let before = self.entries.len();
        self.entries
            .retain(|(e, _)| e.name != name_or_key && e.key != name_or_key.to_lowercase());
        before != self.entries.len()
    }

    /// The raw keys.
    pub fn keys(&self) -> Vec<[u8; 32]> {
        self.entries.iter().map(|(_, k)| *k).collect()
    }

    /// Whether `key` is trusted.
    pub fn contains(&self, key: &[u8; 32]) -> bool {
        self.entries.iter().any(|(_, k)| k == key)
    }

    /// Name of `key`, if trusted.
    pub fn name_of(&self, key: &[u8; 32]) -> Option<&str> {
        self.entries
            .iter()
            .find(|(_, k)| k == key)
            .map(|(e, _)| e.name.as_str())
    }

    /// Entries for display.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter().map(|(e, _)| e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bad_key_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("peers.toml");
        let mut l = KeyList::default();
        l.add("b", [7; 32]);
        l.save(&p).unwrap();
        let l2 = KeyList::load(&p).unwrap();
        assert!(l2.contains(&[7; 32]));
        assert_eq!(l2.name_of(&[7; 32]), Some("b"));
        std::fs::write(&p, "[[key]]\nname = \"x\"\nkey = \"abcd\"\n").unwrap();
        let e = KeyList::load(&p).unwrap_err().to_string();
        assert!(e.contains("2 bytes, expected 32"), "{e}");
    }
}
