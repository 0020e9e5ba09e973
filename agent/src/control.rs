//! The local control socket: JSON lines over a unix socket (mode 0600) between the CLI and
//! its agent. Requests are one line; a migration answers with progress lines and a last line.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::error::AgentError;

/// A request from the CLI.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Run the migration in this signed order (CBOR, hex) as its source.
    Migrate {
        /// Hex of the signed order's CBOR.
        order: String,
    },
    /// List migrations and hosted VMs.
    Status,
    /// Checksum of a hosted VM's memory (demo and tests compare source and destination).
    VmChecksum {
        /// VM name.
        vm: String,
    },
    /// Read the configuration and the attestation policy again (as SIGHUP does).
    Reload,
    /// The audit trail's anchor PCR, as this agent anchors it, and its value (`trustmig audit
    /// verify` while the agent runs).
    AuditAnchor,
    /// The operator revokes an order this agent has not used (SPEC.md §3.4).
    Revoke {
        /// Hex of the signed order's CBOR.
        order: String,
    },
    /// The operator settles an order in doubt here by hand (SPEC.md §8.8): they know where its
    /// VM runs (say, its destination host is gone for good).
    Settle {
        /// Order id, hex.
        order_id: String,
        /// `true`: the destination never ran it, run it here again; `false`: it is the
        /// destination's, keep no copy here.
        resume_here: bool,
    },
    /// The operator has seen to a QEMU VM whose reconciliation a start left to them: run it
    /// again (SPEC.md §8.8).
    Reconcile {
        /// VM name.
        vm: String,
    },
}

/// Live progress of a migration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Progress {
    /// Waiting for one of the agent's migrations to end (`transfer.max_concurrent_migrations`).
    Queued {
        /// Orders waiting before this one.
        ahead: usize,
    },
    /// TLS established with the pinned destination.
    Connected {
        /// Destination identity (hex).
        peer: String,
    },
    /// Both sides attested; data streams are open.
    Attested {
        /// Data streams.
        streams: u16,
    },
    /// A pre-copy round ended.
    Round {
        /// Round number (0-based).
        round: u32,
        /// Pages sent in it.
        pages: u64,
        /// Payload bytes sent in it.
        bytes: u64,
        /// Pages dirtied during it.
        dirty_pages: u64,
        /// Guest dirty rate during the round, pages per second.
        dirty_rate: u64,
        /// Predicted downtime if we switched now (ms).
        predicted_downtime_ms: u64,
        /// Throttle in force after the round.
        throttle: u8,
        /// Measured bandwidth (bytes/s).
        bandwidth: u64,
        /// Bytes sent so far.
        total_bytes: u64,
        /// Guest pages (for a progress bar).
        guest_pages: u64,
    },
    /// Writable disks are being mirrored (QEMU sidecar, spec/qemu.md §5): bytes copied so far
    /// of all mirrored disks together; memory migration starts once every mirror is ready.
    Mirror {
        /// Bytes QEMU's mirror jobs have copied.
        done: u64,
        /// Bytes they have to copy (grows while the guest writes).
        total: u64,
        /// Every mirror is ready: the copies are in step.
        ready: bool,
    },
    /// The guest is paused; the last pages are on their way.
    SwitchOver {
        /// Pages in stop-and-copy.
        pages: u64,
    },
    /// COMMIT is journalled; the destination resumes.
    Committed,
    /// Done.
    Done(Summary),
    /// Failed; `vm` says where the VM runs now.
    Failed {
        /// What went wrong.
        error: String,
        /// What happened to the VM.
        vm: String,
    },
}

/// The end-of-migration summary.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Order id (hex).
    pub order_id: String,
    /// VM name.
    pub vm: String,
    /// Guest memory size, bytes.
    pub guest_bytes: u64,
    /// From connect to `Resumed`, ms.
    pub total_ms: u64,
    /// From pause to `Resumed`, ms.
    pub downtime_ms: u64,
    /// The order's downtime target, ms.
    pub downtime_target_ms: u64,
    /// Pre-copy rounds (excluding stop-and-copy).
    pub rounds: u32,
    /// Whether switch-over met the target (false: forced).
    pub converged: bool,
    /// Highest throttle applied.
    pub throttle: u8,
    /// Bytes written to the data streams (records incl. headers and tags).
    pub bytes_on_wire: u64,
    /// Payload bytes per round, stop-and-copy last.
    pub bytes_per_round: Vec<u64>,
    /// Zero pages elided in round 0.
    pub zero_pages_skipped: u64,
    /// Pages sent in stop-and-copy.
    pub stop_copy_pages: u64,
    /// bytes_on_wire / total time, bytes per second.
    pub throughput_bps: u64,
    /// BLAKE3 of guest memory at pause (hex), to compare with the destination's.
    pub memory_checksum: String,
    /// Mirrored disks (QEMU sidecar): NBD payload bytes sent to the destination.
    #[serde(default)]
    pub disk_bytes: u64,
    /// Mirrored disks: from the first mirror's start until every mirror was ready, ms.
    #[serde(default)]
    pub disk_ms: u64,
    /// The source TPM's quote of the final digest: before `Commit` (strict) or after
    /// `Resumed`, and whether the destination raised an incident (SPEC.md §8.7).
    #[serde(default)]
    pub final_quote: String,
    /// The switch-over as the source saw it, step by step, from the guest's stop.
    #[serde(default)]
    pub timeline: Vec<Step>,
    /// The guest was stopped, not by the migration, when it switched over: the destination
    /// holds it paused until its operator runs it (SPEC.md §8.7).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub handed_over_paused: bool,
}

/// One step of the switch-over: what happened, microseconds after the guest stopped.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// What happened.
    pub step: String,
    /// Microseconds since the guest stopped.
    pub us: u64,
}

/// A reply line.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reply {
    /// Progress of a migration.
    Progress(Progress),
    /// Status listing.
    Status(serde_json::Value),
    /// A VM checksum.
    Checksum {
        /// Hex BLAKE3 of memory.
        checksum: String,
        /// Whether the VM is paused.
        paused: bool,
        /// Pages the guest wrote since it was created (its age, in writes: a guest created
        /// anew has few, one that kept its memory has all it wrote before).
        #[serde(default)]
        writes: u64,
    },
    /// An order settled by the operator: what became of its VM here.
    Settled(String),
    /// A VM reconciled with its journal at the operator's request: what was done.
    Reconciled(String),
    /// An order revoked here.
    Revoked(String),
    /// The configuration reloaded: what changed.
    Reloaded(String),
    /// The audit trail's anchor.
    Anchor {
        /// The PCR.
        pcr: u8,
        /// Its SHA-256 value (hex).
        value: String,
    },
    /// The request failed.
    Error(String),
}

/// Send one request and call `on_reply` for every reply line until the agent closes.
pub async fn call(
    socket: &Path,
    req: &Request,
    mut on_reply: impl FnMut(Reply),
) -> Result<(), AgentError> {
    let err = |reason: String| AgentError::Control {
        path: socket.to_path_buf(),
        reason,
    };
    let mut s = UnixStream::connect(socket)
        .await
        .map_err(|e| err(e.to_string()))?;
    let mut line = serde_json::to_vec(req).map_err(|e| err(e.to_string()))?;
    line.push(b'\n');
    s.write_all(&line).await.map_err(|e| err(e.to_string()))?;
    let mut lines = BufReader::new(s).lines();
    while let Some(l) = lines.next_line().await.map_err(|e| err(e.to_string()))? {
        let reply: Reply =
            serde_json::from_str(&l).map_err(|e| err(format!("bad reply from agent: {e}")))?;
        on_reply(reply);
    }
    Ok(())
}

/// One request, one reply (status, settle, a checksum): the agent's only answer.
pub async fn request(socket: &Path, req: &Request) -> Result<Reply, AgentError> {
    let mut out = None;
    call(socket, req, |r| out = Some(r)).await?;
    out.ok_or_else(|| AgentError::Control {
        path: socket.to_path_buf(),
        reason: "the agent closed the connection without an answer".into(),
    })
}
