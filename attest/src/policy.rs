//! The verifier's policy file (TOML): trusted AKs per agent, allowed measurements, required
//! events. spec: attestation.md §6

use std::path::Path;

use serde::{Deserialize, Serialize};
use trustmig_protocol::attestation::Measurement;
use trustmig_protocol::{AgentId, Digest};

/// Policy format version this code reads.
pub const POLICY_VERSION: u32 = 1;
/// Largest policy file accepted, bytes.
pub const MAX_POLICY_SIZE: usize = 1 << 20;

/// The kind of a measurement, as named in policy files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// [`Measurement::AgentExecutable`].
    AgentExecutable,
    /// [`Measurement::AgentConfig`].
    AgentConfig,
    /// [`Measurement::ImageManifest`].
    ImageManifest,
    /// [`Measurement::MigrationFinal`].
    MigrationFinal,
}

impl EventKind {
    /// Kind of `m`.
    pub fn of(m: &Measurement) -> Self {
        match m {
            Measurement::AgentExecutable(_) => Self::AgentExecutable,
            Measurement::AgentConfig(_) => Self::AgentConfig,
            Measurement::ImageManifest(_) => Self::ImageManifest,
            Measurement::MigrationFinal(_) => Self::MigrationFinal,
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::AgentExecutable => "agent-executable",
            Self::AgentConfig => "agent-config",
            Self::ImageManifest => "image-manifest",
            Self::MigrationFinal => "migration-final",
        })
    }
}

/// One trust-store entry: this AK speaks for this agent identity. Produced by enrollment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustedAk {
    /// The agent's identity key.
    pub agent: AgentId,
    /// The AK's TPM name (`0x000b || SHA-256(TPMT_PUBLIC)`, 34 bytes).
    pub ak_name: Vec<u8>,
}

impl TrustedAk {
    /// This entry as a `[[trusted_ak]]` TOML table, ready to append to a policy file.
    pub fn to_toml(&self) -> String {
        format!(
            "[[trusted_ak]]\nagent = \"{}\"\nak_name = \"{}\"\n",
            hex::encode(self.agent),
            hex::encode(&self.ak_name)
        )
    }
}

/// A verified, usable policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// The measurement PCR the quote must select (16..=23), SHA-256 bank.
    pub pcr: u8,
    /// Trusted AKs and the agent each speaks for.
    pub trusted_aks: Vec<TrustedAk>,
    /// Allowed `agent-executable` digests (never empty).
    pub allowed_executables: Vec<Digest>,
    /// Allowed `agent-config` digests; `None` allows any configuration.
    pub allowed_configs: Option<Vec<Digest>>,
    /// Event kinds the log must contain at least once.
    pub required_events: Vec<EventKind>,
}

/// A policy file that was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// Could not read the file.
    #[error("cannot read policy {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Larger than [`MAX_POLICY_SIZE`].
    #[error("policy is {0} bytes, more than {MAX_POLICY_SIZE}")]
    TooLarge(usize),
    /// Not TOML of the policy schema.
    #[error("policy is not valid: {0}")]
    Syntax(String),
    /// `version` is not [`POLICY_VERSION`].
    #[error("policy version {0} is not supported (expected {POLICY_VERSION})")]
    Version(u32),
    /// `pcr` outside 16..=23.
    #[error("policy pcr {0} is outside 16..=23")]
    Pcr(u32),
    /// A hex value of the wrong form.
    #[error("policy field {field}: {reason}")]
    BadValue {
        /// Which field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// No agent executable is allowed: such a policy would reject everything.
    #[error("policy allows no agent executable")]
    NoExecutables,
    /// An AK is listed for two agents.
    #[error("AK {0} is trusted for more than one agent")]
    DuplicateAk(String),
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    version: u32,
    #[serde(default = "default_pcr")]
    pcr: u32,
    allowed_executables: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    allowed_configs: Option<Vec<String>>,
    #[serde(default)]
    required_events: Vec<EventKind>,
    #[serde(default)]
    trusted_ak: Vec<TrustedAkFile>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TrustedAkFile {
    agent: String,
    ak_name: String,
}

fn default_pcr() -> u32 {
    16
}

fn parse_hex<const N: usize>(field: &'static str, s: &str) -> Result<[u8; N], PolicyError> {
    let v = hex::decode(s).map_err(|e| PolicyError::BadValue {
        field,
        reason: e.to_string(),
    })?;
    <[u8; N]>::try_from(v.as_slice()).map_err(|_| PolicyError::BadValue {
        field,
        reason: format!("{} bytes, expected {N}", v.len()),
    })
}

impl Policy {
    /// Parse and validate a policy from TOML text.
    pub fn from_toml_str(text: &str) -> Result<Self, PolicyError> {
        if text.len() > MAX_POLICY_SIZE {
            return Err(PolicyError::TooLarge(text.len()));
        }
        let f: PolicyFile = toml::from_str(text).map_err(|e| PolicyError::Syntax(e.to_string()))?;
        if f.version != POLICY_VERSION {
            return Err(PolicyError::Version(f.version));
        }
        let pcr = match u8::try_from(f.pcr) {
            Ok(p @ 16..=23) => p,
            _ => return Err(PolicyError::Pcr(f.pcr)),
        };
        let allowed_executables = f
            .allowed_executables
            .iter()
            .map(|s| parse_hex::<32>("allowed_executables", s))
            .collect::<Result<Vec<_>, _>>()?;
        if allowed_executables.is_empty() {
            return Err(PolicyError::NoExecutables);
        }
        let allowed_configs = f
            .allowed_configs
            .map(|v| {
                v.iter()
                    .map(|s| parse_hex::<32>("allowed_configs", s))
                    .collect()
            })
            .transpose()?;
        let mut trusted_aks: Vec<TrustedAk> = Vec::with_capacity(f.trusted_ak.len());
        for t in &f.trusted_ak {
            let agent = parse_hex::<32>("trusted_ak.agent", &t.agent)?;
            let name = parse_hex::<34>("trusted_ak.ak_name", &t.ak_name)?;
            if name[..2] != [0x00, 0x0b] {
                return Err(PolicyError::BadValue {
                    field: "trusted_ak.ak_name",
                    reason: "name algorithm is not SHA-256 (0x000b)".into(),
                });
            }
            if let Some(other) = trusted_aks.iter().find(|a| a.ak_name == name) {
                if other.agent != agent {
                    return Err(PolicyError::DuplicateAk(t.ak_name.clone()));
                }
                continue;
            }
            trusted_aks.push(TrustedAk {
                agent,
                ak_name: name.to_vec(),
            });
        }
        let mut required_events = Vec::new();
        for k in f.required_events {
            if !required_events.contains(&k) {
                required_events.push(k);
            }
        }
        Ok(Self {
            pcr,
            trusted_aks,
            allowed_executables,
            allowed_configs,
            required_events,
        })
    }

    /// Read and validate a policy file.
    pub fn from_file(path: &Path) -> Result<Self, PolicyError> {
        use std::io::Read;
        let io = |source| PolicyError::Io {
            path: path.display().to_string(),
            source,
        };
        // Read at most one byte past the limit: a huge file (or a device) is refused by its
        // size, not read whole first.
        let file = std::fs::File::open(path).map_err(io)?;
        let mut bytes = Vec::new();
        (&file)
            .take(MAX_POLICY_SIZE as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        if bytes.len() > MAX_POLICY_SIZE {
            // A device or pipe says 0: the bytes read count then.
            let size = file
                .metadata()
                .map_or(0, |m| m.len())
                .max(bytes.len() as u64);
            return Err(PolicyError::TooLarge(
                usize::try_from(size).unwrap_or(usize::MAX),
            ));
        }
        let text = String::from_utf8(bytes)
            .map_err(|e| io(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
        Self::from_toml_str(&text)
    }

    /// The policy as TOML (parses back to an equal policy).
    pub fn to_toml(&self) -> String {
        let f = PolicyFile {
            version: POLICY_VERSION,
            pcr: u32::from(self.pcr),
            allowed_executables: self.allowed_executables.iter().map(hex::encode).collect(),
            allowed_configs: self
                .allowed_configs
                .as_ref()
                .map(|v| v.iter().map(hex::encode).collect()),
            required_events: self.required_events.clone(),
            trusted_ak: self
                .trusted_aks
                .iter()
                .map(|t| TrustedAkFile {
                    agent: hex::encode(t.agent),
                    ak_name: hex::encode(&t.ak_name),
                })
                .collect(),
        };
        toml::to_string(&f).unwrap_or_default()
    }

    /// Stop trusting every AK enrolled for `agent`; returns how many were removed.
    pub fn untrust(&mut self, agent: &AgentId) -> usize {
        let before = self.trusted_aks.len();
        self.trusted_aks.retain(|a| &a.agent != agent);
        before - self.trusted_aks.len()
    }

    /// Add an enrolled AK to the trust store.
    pub fn trust(&mut self, entry: TrustedAk) -> Result<(), PolicyError> {
        if let Some(other) = self.trusted_aks.iter().find(|a| a.ak_name == entry.ak_name) {
            if other.agent == entry.agent {
                return Ok(());
            }
            return Err(PolicyError::DuplicateAk(hex::encode(&entry.ak_name)));
        }
        self.trusted_aks.push(entry);
        Ok(())
    }
}
