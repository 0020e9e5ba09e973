//! QEMU's block layer as QMP reports it, typed: `query-jobs` and `query-named-block-nodes`
//! (flat). The agent's disk mirrors read these (spec/qemu.md §5); what QEMU sends is not
//! trusted to be sensible, only to be of this shape (`qmp::typed_reply`).

use serde::Deserialize;

/// One job of `query-jobs`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct JobInfo {
    /// The job's id.
    pub id: String,
    /// `mirror`, `backup`, ...
    #[serde(default, rename = "type")]
    pub kind: String,
    /// `created`, `running`, `ready`, `concluded`, ...
    pub status: String,
    /// Bytes done so far.
    #[serde(default, rename = "current-progress")]
    pub current: u64,
    /// Bytes to do (it grows while the guest writes).
    #[serde(default, rename = "total-progress")]
    pub total: u64,
    /// Why it failed, once it did.
    #[serde(default)]
    pub error: Option<String>,
}

/// An image's size as `query-named-block-nodes` reports it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct ImageInfo {
    /// The size the guest sees, bytes.
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
}

/// A block node of `query-named-block-nodes` (flat).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct BlockNode {
    /// The file it opens.
    #[serde(default)]
    pub file: String,
    /// Read-only.
    #[serde(default)]
    pub ro: bool,
    /// Its driver (`qcow2`, `raw`, `file`, ...).
    #[serde(default)]
    pub drv: String,
    /// Its node name.
    #[serde(default, rename = "node-name")]
    pub node_name: String,
    /// The image's backing file, if any (`backing_file_depth` is 0 in QEMU 7.2's flat list
    /// even for an overlay, so this is what tells).
    #[serde(default)]
    pub backing_file: Option<String>,
    /// The image's size, when QEMU reports it.
    pub image: Option<ImageInfo>,
}
