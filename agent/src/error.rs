//! Agent errors: each names what was wrong and, where there is one, the fix.

use std::path::PathBuf;

use trustmig_protocol::order::OrderError;

/// Everything the agent and CLI can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A key file is readable by group or others.
    #[error("{}: permissions {mode:o} are too open; run `chmod 600 {}`", path.display(), path.display())]
    LoosePermissions {
        /// The key file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
    /// The agent home does not exist or is incomplete.
    #[error("{} is not a trustmig home ({what} missing); create one with `trustmig init --home {}`", home.display(), home.display())]
    NotAHome {
        /// The directory.
        home: PathBuf,
        /// What is missing.
        what: String,
    },
    /// The agent home has its identity but lacks another part (`init` would refuse it).
    #[error("{} is an incomplete trustmig home: it holds an agent identity but {what} is missing; restore it from a backup (`trustmig init` refuses a home with an identity; a new home means a new identity, which every peer must trust again)", home.display())]
    IncompleteHome {
        /// The directory.
        home: PathBuf,
        /// What is missing.
        what: String,
    },
    /// `init` would overwrite an identity.
    #[error("{} already holds an agent identity; refusing to overwrite it", .0.display())]
    HomeExists(PathBuf),
    /// A configuration or trust file is malformed.
    #[error("{}: {reason}", path.display())]
    BadConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A key file is malformed.
    #[error("{}: not a valid {kind}: {reason}", path.display())]
    BadKey {
        /// The file.
        path: PathBuf,
        /// Which kind of key.
        kind: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// An order was refused.
    #[error("order refused: {0}")]
    Order(#[from] OrderError),
    /// An order that expired by the journal's order clock, not by this host's clock (SPEC.md
    /// §3.4): a new order is refused the same way until the clock passes the floor `why` names.
    #[error("order refused: it expires at UNIX time {not_after}, before the journal's order clock ({clock}): {why}")]
    OrderClock {
        /// The order's end of validity.
        not_after: u64,
        /// The journal's order clock it was checked against.
        clock: u64,
        /// What `Journal::order_time` said of the clock.
        why: String,
    },
    /// The listen address is taken.
    #[error("cannot listen on {addr}: {source} (is another agent running? a port below 1024 needs CAP_NET_BIND_SERVICE, which contrib/trustmig.service does not grant; change `listen` in config.toml)")]
    Listen {
        /// Address.
        addr: String,
        /// OS error.
        source: std::io::Error,
    },
    /// The peer could not be reached.
    #[error("cannot reach {addr}: {reason}")]
    Connect {
        /// Address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The TPM failed or is unreachable.
    #[error("TPM: {0}")]
    Tpm(String),
    /// The local agent's control socket is unreachable.
    #[error("cannot reach the local agent at {}: {reason} (is `trustmig agent --home ...` running?)", path.display())]
    Control {
        /// Socket path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The migration failed; the message says where and what happened to the VM.
    #[error("migration failed: {}", self.cause())]
    Migration(String),
    /// The transport broke on `link`: a data stream or the control channel failed, or QEMU's
    /// stream ended early. On the source this usually follows the destination refusing
    /// something, and its `Abort` names what ([`AgentError::PeerAborted`]).
    #[error("migration failed: {}", self.cause())]
    Transport {
        /// Which connection.
        link: Link,
        /// What happened to it.
        reason: String,
    },
    /// A failure here, explained by the destination's `Abort`.
    #[error("{local}; destination: peer aborted with {code:?}: {reason}")]
    PeerAborted {
        /// What failed here.
        local: Box<AgentError>,
        /// The destination's abort code.
        code: trustmig_protocol::AbortCode,
        /// The destination's reason.
        reason: String,
    },
    /// This agent refuses the migration (or its peer's part in it): the VM, the host or the
    /// hypervisor is not in a state to send or take it. Nothing moved.
    #[error("migration failed: {}", self.cause())]
    Refused(String),
    /// A step did not happen in time.
    #[error("migration failed: {}", self.cause())]
    Timeout(String),
    /// The journal cannot record or does not allow what was asked (SPEC.md §3.4, §8.8).
    #[error("migration failed: {}", self.cause())]
    Journal(String),
    /// TLS could not be set up (configuration, handshake, exporter, the peer's identity).
    #[error("migration failed: {}", self.cause())]
    Tls(String),
    /// QEMU refused a command or could not be reached; keeps QEMU's class and message.
    #[error("migration failed: {}", self.cause())]
    Qemu(#[from] trustmig_qemu::qmp::QmpError),
    /// A protocol error.
    #[error("{0}")]
    Protocol(#[from] trustmig_protocol::Error),
    /// Disk `disk`'s image could not be checked or hashed as the guest sees it
    /// (`verify = "full"`, spec/qemu.md §5): before anything moves (source), or at the
    /// switch-over (the migration then rolls back).
    #[error("migration failed: {}", self.cause())]
    Image {
        /// The disk's name.
        disk: String,
        /// What was wrong.
        source: Box<crate::backend::qemu::ImageError>,
    },
    /// A required external program is missing.
    #[error("{program} not found; install it with `apt-get install {package}`")]
    MissingProgram {
        /// Program.
        program: &'static str,
        /// Debian package.
        package: &'static str,
    },
    /// What the agent reported of a migration, whole (it says where the VM is).
    #[error("{0}")]
    Reported(String),
    /// The agent ended a migration's connection without an outcome (it stopped or restarted
    /// mid-migration): what became of the order is not known here.
    #[error("outcome unknown: {0}")]
    OutcomeUnknown(String),
    /// Bad command-line usage not caught by the parser.
    #[error("{0}")]
    Usage(String),
}

/// What a data stream that ended before its `StreamEnd` is said to be (the metrics' `cut`).
pub const CUT: &str = "cut before its end";

/// The connection a transport failure happened on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// The TLS control channel.
    Control,
    /// Data stream `n`.
    Data(u16),
    /// QEMU's migration stream between QEMU and its agent (source: QEMU into the agent).
    QemuStream,
    /// QEMU's return path (destination QEMU back to the source QEMU).
    ReturnPath,
}

impl std::fmt::Display for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Control => f.write_str("control channel"),
            Self::Data(n) => write!(f, "data stream {n}"),
            Self::QemuStream => f.write_str("QEMU's migration stream"),
            Self::ReturnPath => f.write_str("QEMU's return path"),
        }
    }
}

/// An error's cause without the "migration failed: " that the failures of a migration lead
/// with: [`AgentError::cause`].
pub struct Cause<'a>(&'a AgentError);

impl std::fmt::Display for Cause<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            AgentError::Migration(s)
            | AgentError::Refused(s)
            | AgentError::Timeout(s)
            | AgentError::Journal(s)
            | AgentError::Tls(s) => f.write_str(s),
            AgentError::Transport { link, reason } => write!(f, "{link}: {reason}"),
            AgentError::Qemu(e) => write!(f, "QEMU: {e}"),
            AgentError::Image { disk, source } => {
                write!(f, "disk {disk}: verify = \"full\": {source}")
            }
            // Not framed as a failed migration: the whole message is the cause.
            other => write!(f, "{other}"),
        }
    }
}

impl AgentError {
    /// What went wrong, without the framing: for a message that is not about a failed
    /// migration (a VM committed here that QEMU will not run).
    pub fn cause(&self) -> Cause<'_> {
        Cause(self)
    }

    /// A transport failure on `link`.
    pub fn transport(link: Link, reason: impl std::fmt::Display) -> Self {
        Self::Transport {
            link,
            reason: reason.to_string(),
        }
    }

    /// The wire abort code for this error: the protocol's mapping (SPEC.md §10) for protocol
    /// errors, `InternalError` otherwise. The one place an agent error becomes a code.
    pub fn abort_code(&self) -> trustmig_protocol::AbortCode {
        match self {
            Self::Protocol(p) => trustmig_protocol::AbortCode::from(p),
            // Answering the peer's own abort: the protocol's code for that (`Cancelled`).
            Self::PeerAborted { code, reason, .. } => {
                trustmig_protocol::AbortCode::from(&trustmig_protocol::Error::PeerAborted {
                    code: *code,
                    reason: reason.clone(),
                })
            }
            // An order refused here (replayed, revoked, expired, forged) is what SPEC.md §10
            // names `OrderRefused`, whichever layer refused it.
            Self::Order(_) | Self::OrderClock { .. } => trustmig_protocol::AbortCode::OrderRefused,
            _ => trustmig_protocol::AbortCode::InternalError,
        }
    }

    /// An order refused with `e` when checked at the journal's order clock; `overruled`: what
    /// `Journal::order_time` said when that clock is not this host's.
    pub fn of_order(e: OrderError, overruled: Option<String>) -> Self {
        match (e, overruled) {
            (OrderError::Expired { not_after, now }, Some(why)) => Self::OrderClock {
                not_after,
                clock: now,
                why,
            },
            (e, _) => Self::Order(e),
        }
    }

    /// Wrap an I/O error with its path.
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }
}

/// The protocol's layered errors convert into [`AgentError::Protocol`] with `?`, keeping their
/// type (and so their wire abort code, `AgentError::abort_code`). Orders keep their own variant.
macro_rules! from_protocol {
    ($($t:ty),*) => {$(
        impl From<$t> for AgentError {
            fn from(e: $t) -> Self {
                Self::Protocol(e.into())
            }
        }
    )*};
}

from_protocol!(
    trustmig_protocol::codec::CodecError,
    trustmig_protocol::error::PeerMisbehaved,
    trustmig_protocol::record::RecordError,
    trustmig_protocol::attestation::AttestationError,
    trustmig_protocol::precopy::PrecopyError
);

#[cfg(test)]
mod tests {
    use super::*;
    use trustmig_protocol::record::RecordError;
    use trustmig_protocol::AbortCode;

    #[test]
    fn transport_failures_name_their_link_and_keep_the_peers_reason() {
        let cut = AgentError::transport(Link::Data(1), "cut before its end");
        assert_eq!(
            cut.to_string(),
            "migration failed: data stream 1: cut before its end"
        );
        assert_eq!(cut.abort_code(), AbortCode::InternalError);
        let explained = AgentError::PeerAborted {
            local: Box::new(cut),
            code: AbortCode::RecordFailure,
            reason: "record 7 failed authentication (tampered)".into(),
        };
        assert_eq!(explained.abort_code(), AbortCode::Cancelled);
        let text = explained.to_string();
        assert!(
            text.starts_with("migration failed: data stream 1: cut"),
            "{text}"
        );
        assert!(
            text.contains("peer aborted with RecordFailure: record 7"),
            "{text}"
        );
        for (link, name) in [
            (Link::Control, "control channel"),
            (Link::QemuStream, "QEMU's migration stream"),
            (Link::ReturnPath, "QEMU's return path"),
        ] {
            assert_eq!(link.to_string(), name);
        }
    }

    /// A migration's failures lead with "migration failed: " then their cause; `cause` gives
    /// the cause alone, and the whole message for an error not framed so.
    #[test]
    fn the_cause_is_the_message_without_the_framing() {
        let framed = [
            AgentError::Migration("m".into()),
            AgentError::Refused("r".into()),
            AgentError::Timeout("t".into()),
            AgentError::Journal("j".into()),
            AgentError::Tls("tls".into()),
            AgentError::transport(Link::QemuStream, "ended"),
        ];
        let causes = ["m", "r", "t", "j", "tls", "QEMU's migration stream: ended"];
        for (e, cause) in framed.iter().zip(causes) {
            assert_eq!(e.cause().to_string(), cause);
            assert_eq!(e.to_string(), format!("migration failed: {cause}"));
        }
        let tpm = AgentError::Tpm("no TPM".into());
        assert_eq!(tpm.cause().to_string(), "TPM: no TPM");
        assert_eq!(tpm.cause().to_string(), tpm.to_string());
    }

    #[test]
    fn protocol_errors_keep_their_type_and_wire_code() {
        let e: AgentError = RecordError::BadType(99).into();
        assert!(matches!(
            e,
            AgentError::Protocol(trustmig_protocol::Error::Record(_))
        ));
        assert_eq!(e.abort_code(), AbortCode::RecordFailure);
        assert_eq!(
            AgentError::Refused("busy".into()).abort_code(),
            AbortCode::InternalError
        );
    }
}
