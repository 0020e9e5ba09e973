//! `config.toml`: what an operator sets per agent. `init` writes every key with its default.

use std::path::Path;

use serde::Deserialize;

use crate::error::AgentError;
use crate::home::read_text;

mod qemu;
pub use qemu::{check_disk_name, DEFAULT_DOWNTIME_STEPS, MAX_DOWNTIME_STEPS, RESERVED_PREFIX};

/// Agent configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address peers connect to (control and data streams share it).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Where to serve Prometheus metrics at `/metrics` (`host:port`); off when absent. Bind it
    /// to loopback or a management network: the metrics name VMs and peers' activity.
    #[serde(default)]
    pub metrics_listen: Option<String>,
    /// TPM settings.
    pub tpm: TpmConfig,
    /// Transfer settings.
    #[serde(default)]
    pub transfer: TransferConfig,
    /// VMs this agent hosts (synthetic guests for demos, tests and benchmarks).
    #[serde(default, rename = "vm")]
    pub vms: Vec<VmConfig>,
}

/// TPM settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TpmConfig {
    /// TCTI: `swtpm:host=127.0.0.1,port=2321`, `device:/dev/tpmrm0` or `tabrmd`.
    pub tcti: String,
    /// Measurement PCR, in 16..=23: the agent resets it at start, which only 16 and 23 allow at
    /// locality 0 (any other fails then, with the TPM's error).
    #[serde(default = "default_pcr")]
    pub pcr: u8,
    /// Persistent handle of the attestation key.
    #[serde(default = "default_ak_handle")]
    pub ak_handle: u32,
    /// PCR that anchors the audit trail (SHA-256 bank, 0..=23, not the measurement PCR):
    /// each entry's hash is extended into it (SPEC.md §8.10). Nothing else may extend it.
    #[serde(default = "default_audit_pcr")]
    pub audit_pcr: u8,
}

/// Transfer settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransferConfig {
    /// Data streams per migration (1..=16).
    #[serde(default = "default_streams")]
    pub streams: u16,
    /// Seconds to wait for any single protocol step before giving up.
    #[serde(default = "default_step_timeout")]
    pub step_timeout_secs: u64,
    /// Most migrations this agent sends at once; further orders queue (in `status`) until one
    /// ends. Incoming migrations are not counted: a destination cannot keep a source waiting.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent_migrations: usize,
}

impl Default for TransferConfig {
    fn default() -> Self {
        Self {
            streams: default_streams(),
            step_timeout_secs: default_step_timeout(),
            max_concurrent_migrations: default_max_concurrent(),
        }
    }
}

/// A hosted VM (`[[vm]]`), checked: its name and what its backend needs.
#[derive(Clone, Debug, PartialEq, Deserialize, serde::Serialize)]
#[serde(try_from = "VmEntry", into = "VmEntry")]
pub struct VmConfig {
    /// Name used in orders.
    pub name: String,
    /// The backend and its settings.
    pub backend: VmBackend,
}

/// Which backend runs a VM, with the settings that backend reads.
#[derive(Clone, Debug, PartialEq)]
pub enum VmBackend {
    /// The built-in synthetic guest (`backend = "synthetic"`).
    Synthetic(SyntheticVm),
    /// A QEMU VM driven over QMP (`backend = "qemu"`). spec: spec/qemu.md §1
    Qemu(QemuVm),
}

/// A synthetic guest's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct SyntheticVm {
    /// Guest memory in MiB.
    pub size_mib: u64,
    /// Pages the guest dirties per second while running.
    pub dirty_pages_per_sec: u64,
    /// Fraction of pages (0..=1) that receive 90% of the writes.
    pub hot_fraction: f64,
    /// Fraction of pages (0..=1) that hold data at start; the rest are zero.
    pub fill_fraction: f64,
    /// Seed of the deterministic workload.
    pub seed: u64,
}

/// A QEMU VM's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct QemuVm {
    /// The VM's QMP socket (`-qmp unix:PATH,server=on,wait=off`), absolute.
    pub qmp: std::path::PathBuf,
    /// Destination: absolute directory where transferred disk images are written.
    pub disk_dir: Option<std::path::PathBuf>,
    /// Source: steps of the downtime ladder (spec/qemu.md §3); `None`: the default.
    pub downtime_steps: Option<u32>,
    /// Disks that travel with the VM (`[[vm.disk]]`).
    pub disks: Vec<DiskConfig>,
}

impl VmConfig {
    /// The synthetic guest's settings, if this VM is one.
    pub fn synthetic(&self) -> Option<&SyntheticVm> {
        match &self.backend {
            VmBackend::Synthetic(s) => Some(s),
            VmBackend::Qemu(_) => None,
        }
    }

    /// The QEMU settings, if this VM runs in QEMU.
    pub fn qemu(&self) -> Option<&QemuVm> {
        match &self.backend {
            VmBackend::Qemu(q) => Some(q),
            VmBackend::Synthetic(_) => None,
        }
    }
}

/// `[[vm]]` as the file writes it: one flat table whose `backend` says which keys apply.
/// Checked and turned into a [`VmConfig`] as it is read.
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct VmEntry {
    /// Name used in orders.
    pub name: String,
    /// Backend: `synthetic` or `qemu`.
    pub backend: String,
    /// Guest memory in MiB.
    #[serde(default = "default_size")]
    pub size_mib: u64,
    /// Pages the synthetic guest dirties per second while running.
    #[serde(default)]
    pub dirty_pages_per_sec: u64,
    /// Fraction of pages (0..=1) that receive 90% of the writes.
    #[serde(default = "default_hot")]
    pub hot_fraction: f64,
    /// Fraction of pages (0..=1) that hold data at start; the rest are zero.
    #[serde(default = "default_fill")]
    pub fill_fraction: f64,
    /// Seed of the deterministic workload.
    #[serde(default)]
    pub seed: u64,
    /// Backend `qemu`: the VM's QMP socket (`-qmp unix:PATH,server=on,wait=off`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qmp: Option<std::path::PathBuf>,
    /// Backend `qemu`, destination: absolute directory where transferred disk images are
    /// written: `<disk_dir>/<disk name>.<format>` (`raw` for a copied read-only disk, a
    /// mirrored disk's own format). spec: spec/qemu.md §5
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_dir: Option<std::path::PathBuf>,
    /// Backend `qemu`, source: QEMU's downtime-limit is 1 ms during the first pass, then the
    /// order's downtime target divided by 2^(steps - 1) and doubling with each dirty-memory
    /// round until it reaches the target (default 3; 0 gives QEMU the target from the start).
    /// spec: spec/qemu.md §3
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_steps: Option<u32>,
    /// Backend `qemu`: disks that travel with the VM (not on shared storage), `[[vm.disk]]`.
    #[serde(default, rename = "disk", skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskConfig>,
}

/// A disk that is transferred with a QEMU VM. spec: spec/qemu.md §5
#[derive(Clone, Debug, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// The disk's name in the image manifest and the destination QEMU's block node name.
    pub name: String,
    /// Source: the image file QEMU has open (absolute path). Read-only raw images are copied
    /// chunk by chunk; writable raw or qcow2 images are mirrored live (spec/qemu.md §5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<std::path::PathBuf>,
    /// Destination: the `device_add` arguments of the guest device (`driver` and properties,
    /// as on the source's `-device`); the agent adds `drive = <name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<toml::Table>,
    /// Destination: the format a mirrored disk must arrive in; a source announcing another is
    /// refused before anything is created. Any format the agent supports when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<trustmig_protocol::manifest::DiskFormat>,
    /// Source: how QEMU's mirror of a writable disk keeps up with the guest's writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<MirrorMode>,
    /// Source: what a mirrored disk's arrival is checked by (the destination follows the
    /// attested manifest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<DiskVerify>,
}

/// How a mirrored disk's copy is checked before `Commit`. spec: spec/qemu.md §5
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskVerify {
    /// Every NBD byte that crossed, in both directions, is bound into the final digest: the
    /// copy got exactly what the source's mirror sent. The default: it costs no downtime.
    #[default]
    Stream,
    /// Also, with the guest stopped, both agents hash the whole image as the guest sees it
    /// and the final digest binds it: the copy must equal the source image, whatever the
    /// mirror did or did not send. Costs downtime: reading and hashing the image on both
    /// hosts (measured in spec/qemu.md §9).
    Full,
}

/// QEMU's `copy-mode` for a mirrored disk. spec: spec/qemu.md §5
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MirrorMode {
    /// Guest writes land on the source and are copied from the dirty bitmap; the last ones at
    /// the switch-over, with the guest stopped. The default: QEMU 7.2 corrupts its heap and
    /// dies when the NBD connection of a `write-blocking` mirror breaks under guest writes
    /// (reproduced: `scripts/repro/active-mirror-crash.py`), and anyone on the path can break it.
    #[default]
    Background,
    /// Active mirroring: each guest write completes only once both copies have it, so the copy
    /// stays in step and the switch-over has nothing left to copy. For QEMU versions without
    /// that crash.
    WriteBlocking,
}

impl MirrorMode {
    /// QEMU's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Background => "background",
            Self::WriteBlocking => "write-blocking",
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:7443".into()
}
fn default_pcr() -> u8 {
    16
}
fn default_audit_pcr() -> u8 {
    23
}
fn default_ak_handle() -> u32 {
    0x8101_0020
}
fn default_streams() -> u16 {
    2
}
fn default_step_timeout() -> u64 {
    30
}
/// `transfer.max_concurrent_migrations` when the configuration does not set it.
pub const DEFAULT_MAX_CONCURRENT: usize = 4;

/// The most `transfer.max_concurrent_migrations` may be.
pub const MAX_CONCURRENT: usize = 64;

fn default_max_concurrent() -> usize {
    DEFAULT_MAX_CONCURRENT
}
fn default_size() -> u64 {
    512
}
fn default_hot() -> f64 {
    0.1
}
fn default_fill() -> f64 {
    0.5
}

impl Config {
    /// The configured VM named `name`.
    pub fn vm(&self, name: &str) -> Option<&VmConfig> {
        self.vms.iter().find(|v| v.name == name)
    }

    /// Whether VM `name` has the same entry here as in `other` (or none in either): what a
    /// reload may not change under a migration, and what a claim checks it prepared on.
    pub fn same_vm(&self, other: &Config, name: &str) -> bool {
        let entry = |c: &Config| c.vm(name).map(|v| toml::to_string(v).ok());
        entry(self) == entry(other)
    }

    /// Load and validate `path`.
    pub fn load(path: &Path) -> Result<Self, AgentError> {
        let text = read_text(path)?;
        Self::parse(&text).map_err(|reason| AgentError::BadConfig {
            path: path.to_path_buf(),
            reason,
        })
    }

    /// Parse and validate config text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let c: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        if !(16..=23).contains(&c.tpm.pcr) {
            return Err(format!("tpm.pcr = {} must be in 16..=23", c.tpm.pcr));
        }
        if c.tpm.audit_pcr > 23 || c.tpm.audit_pcr == c.tpm.pcr {
            return Err(format!(
                "tpm.audit_pcr = {} must be in 0..=23 and not the measurement PCR (tpm.pcr = {})",
                c.tpm.audit_pcr, c.tpm.pcr
            ));
        }
        if c.transfer.streams == 0 || c.transfer.streams > trustmig_protocol::messages::MAX_STREAMS
        {
            return Err(format!(
                "transfer.streams = {} must be in 1..=16",
                c.transfer.streams
            ));
        }
        // A day at most: a step that may wait longer is a hang, and timers add allowances to it.
        if !(1..=86_400).contains(&c.transfer.step_timeout_secs) {
            return Err(format!(
                "transfer.step_timeout_secs = {} must be in 1..=86400",
                c.transfer.step_timeout_secs
            ));
        }
        if !(1..=MAX_CONCURRENT).contains(&c.transfer.max_concurrent_migrations) {
            return Err(format!(
                "transfer.max_concurrent_migrations = {} must be in 1..={MAX_CONCURRENT}",
                c.transfer.max_concurrent_migrations
            ));
        }
        check_vms_apart(&c.vms)?;
        Ok(c)
    }
}

/// No two VMs share a name (the first would shadow the second), a QMP socket (one QEMU, two
/// VMs), or a `disk_dir` (disks arrive there under their own names: two VMs' `root` disks,
/// arriving at once, would take each other's files).
pub(crate) fn check_vms_apart(vms: &[VmConfig]) -> Result<(), String> {
    for (i, vm) in vms.iter().enumerate() {
        let before = &vms[..i];
        if before.iter().any(|o| o.name == vm.name) {
            return Err(format!("vm {:?} appears twice", vm.name));
        }
        let VmBackend::Qemu(q) = &vm.backend else {
            continue;
        };
        for o in before {
            let VmBackend::Qemu(oq) = &o.backend else {
                continue;
            };
            if oq.qmp == q.qmp {
                return Err(format!(
                    "vms {:?} and {:?} have the same qmp socket {}",
                    o.name,
                    vm.name,
                    q.qmp.display()
                ));
            }
            if q.disk_dir.is_some() && oq.disk_dir == q.disk_dir {
                return Err(format!(
                    "vms {:?} and {:?} have the same disk_dir {}: give each VM its own",
                    o.name,
                    vm.name,
                    q.disk_dir.as_deref().unwrap_or(Path::new("")).display()
                ));
            }
        }
    }
    Ok(())
}

/// A character that could forge or hide text where a name is shown: a control character, a
/// line or paragraph separator, or a mark or override of text direction.
fn forges_text(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

impl TryFrom<VmEntry> for VmConfig {
    type Error = String;

    fn try_from(vm: VmEntry) -> Result<Self, String> {
        let name = vm.name;
        // As an order may name it (SPEC.md §3.3: 1..=255 bytes), and printable: it goes into
        // logs, `status` and the audit trail.
        if name.is_empty() || name.len() > 255 || name.chars().any(forges_text) {
            return Err(format!(
                "vm name {name:?} must be 1..=255 bytes without control or text-direction characters (as an order names it)"
            ));
        }
        let backend = match (vm.backend.as_str(), vm.qmp) {
            ("synthetic", None) if vm.disks.is_empty() && vm.disk_dir.is_none() => {
                if vm.size_mib == 0 || vm.size_mib > 1 << 20 {
                    return Err(format!(
                        "vm {name:?}: size_mib {} out of range",
                        vm.size_mib
                    ));
                }
                // Each page written a hundred times a second is past any real guest; beyond
                // some such bound a tick would spin for ever (the rate is a loop count).
                let pages = vm.size_mib * (1 << 20) / crate::guest::PAGE_SIZE as u64;
                if vm.dirty_pages_per_sec > pages * 100 {
                    return Err(format!(
                        "vm {name:?}: dirty_pages_per_sec {} is more than 100 times its {pages} pages a second",
                        vm.dirty_pages_per_sec
                    ));
                }
                if !(0.0..=1.0).contains(&vm.hot_fraction)
                    || !(0.0..=1.0).contains(&vm.fill_fraction)
                {
                    return Err(format!("vm {name:?}: fractions must be within 0..=1"));
                }
                VmBackend::Synthetic(SyntheticVm {
                    size_mib: vm.size_mib,
                    dirty_pages_per_sec: vm.dirty_pages_per_sec,
                    hot_fraction: vm.hot_fraction,
                    fill_fraction: vm.fill_fraction,
                    seed: vm.seed,
                })
            }
            ("synthetic", None) => {
                return Err(format!(
                    "vm {name:?}: disk and disk_dir are only for backend \"qemu\""
                ))
            }
            ("qemu", Some(qmp)) => {
                let q = QemuVm {
                    qmp,
                    disk_dir: vm.disk_dir,
                    downtime_steps: vm.downtime_steps,
                    disks: vm.disks,
                };
                qemu::check(&name, &q)?;
                VmBackend::Qemu(q)
            }
            ("qemu", None) => {
                return Err(format!(
                    "vm {name:?}: backend \"qemu\" needs qmp = \"/path/to/qmp.sock\""
                ))
            }
            ("synthetic", Some(_)) => {
                return Err(format!("vm {name:?}: qmp is only for backend \"qemu\""))
            }
            (other, _) => {
                return Err(format!(
                    "vm {name:?}: backend {other:?} unknown (synthetic, qemu)"
                ))
            }
        };
        Ok(Self { name, backend })
    }
}

impl From<VmConfig> for VmEntry {
    fn from(vm: VmConfig) -> Self {
        let mut e = VmEntry {
            name: vm.name,
            backend: String::new(),
            size_mib: default_size(),
            dirty_pages_per_sec: 0,
            hot_fraction: default_hot(),
            fill_fraction: default_fill(),
            seed: 0,
            qmp: None,
            disk_dir: None,
            downtime_steps: None,
            disks: Vec::new(),
        };
        match vm.backend {
            VmBackend::Synthetic(g) => {
                e.backend = "synthetic".into();
                e.size_mib = g.size_mib;
                e.dirty_pages_per_sec = g.dirty_pages_per_sec;
                e.hot_fraction = g.hot_fraction;
                e.fill_fraction = g.fill_fraction;
                e.seed = g.seed;
            }
            VmBackend::Qemu(q) => {
                e.backend = "qemu".into();
                e.qmp = Some(q.qmp);
                e.disk_dir = q.disk_dir;
                e.downtime_steps = q.downtime_steps;
                e.disks = q.disks;
            }
        }
        e
    }
}

/// The commented configuration `trustmig init` writes.
pub fn default_config_text(listen: &str, tcti: &str) -> String {
    format!(
        r#"# trustmig agent configuration. Every key is shown with its default.

# Address this agent listens on for control (TLS 1.3) and data streams; peers dial the address
# an order names (`trustmig order sign --destination-addr`). Read at start.
listen = "{listen}"

# Prometheus metrics at http://ADDR/metrics (off unless set; keep it on loopback or a
# management network). A top-level key: it must stay above the first [section]. Read at start.
# metrics_listen = "127.0.0.1:9187"

[tpm]
# swtpm:host=H,port=P (control port P+1) | device:/dev/tpmrm0 | tabrmd
tcti = "{tcti}"
# Measurement PCR (16..=23), SHA-256 bank; reset at start, which only 16 and 23 allow at
# locality 0.
pcr = 16
# Persistent handle of the attestation key (created on first use).
ak_handle = 0x81010020
# PCR that anchors the audit trail (each entry's hash is extended into it): one nothing else
# on this host extends. 23 is resettable at locality 0; a PCR the platform leaves unused and
# cannot reset before a reboot makes the anchor hold against a local root too (SPEC.md §8.10).
audit_pcr = 23

[transfer]
# Data streams per migration (1..=16).
streams = 2
# Seconds any single protocol step may take.
step_timeout_secs = 30
# Most migrations this agent sends at once; further orders queue until one ends.
max_concurrent_migrations = 4

# VMs hosted by this agent. The synthetic backend is an in-process guest for demos, tests
# and benchmarks: deterministic, dirtying pages while it runs.
# [[vm]]
# name = "demo-vm"
# backend = "synthetic"
# size_mib = 512
# dirty_pages_per_sec = 20000
# hot_fraction = 0.1
# fill_fraction = 0.5
# seed = 1
"#
    )
}

/// A destination `[[vm.disk]]` named `name` (a virtio-blk device) for unit tests.
#[cfg(test)]
pub(crate) fn test_dest_disk(name: &str) -> DiskConfig {
    let mut device = toml::Table::new();
    device.insert("driver".into(), "virtio-blk-pci".into());
    DiskConfig {
        name: name.into(),
        path: None,
        device: Some(device),
        format: None,
        mirror: None,
        verify: None,
    }
}

/// A `qemu` VM entry named `q` for unit tests.
#[cfg(test)]
pub(crate) fn test_qemu_vm(qmp: &str, disk_dir: Option<&std::path::Path>) -> VmConfig {
    VmConfig {
        name: "q".into(),
        backend: VmBackend::Qemu(QemuVm {
            qmp: qmp.into(),
            disk_dir: disk_dir.map(std::path::Path::to_path_buf),
            downtime_steps: None,
            disks: vec![],
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_and_bad_values_are_named() {
        let c = Config::parse(&default_config_text(
            "127.0.0.1:1",
            "swtpm:host=127.0.0.1,port=2",
        ))
        .unwrap();
        assert_eq!(c.tpm.pcr, 16);
        assert_eq!(c.transfer.streams, 2);
        let bad = default_config_text("x", "y").replace("pcr = 16", "pcr = 3");
        assert!(Config::parse(&bad).unwrap_err().contains("tpm.pcr"));
        let bad = default_config_text("x", "y").replace("audit_pcr = 23", "audit_pcr = 16");
        assert!(Config::parse(&bad)
            .unwrap_err()
            .contains("tpm.audit_pcr = 16 must be in 0..=23 and not the measurement PCR"));
        let bad = default_config_text("x", "y").replace("streams = 2", "streams = 0");
        assert!(Config::parse(&bad)
            .unwrap_err()
            .contains("transfer.streams"));
        for t in [0, 86_401, u64::MAX] {
            let bad = default_config_text("x", "y").replace(
                "step_timeout_secs = 30",
                &format!("step_timeout_secs = {t}"),
            );
            let e = Config::parse(&bad).unwrap_err();
            assert!(e.contains("transfer.step_timeout_secs"), "{t}: {e}");
        }
        assert!(Config::parse("listen = 5").is_err());
        let unknown = default_config_text("x", "y") + "\nbogus = 1\n";
        assert!(Config::parse(&unknown).unwrap_err().contains("bogus"));
    }

    /// Two VMs never share a name, a QMP socket or a `disk_dir`; each is named.
    #[test]
    fn vms_that_would_take_each_others_places_are_refused() {
        let base = default_config_text("127.0.0.1:1", "swtpm:host=127.0.0.1,port=2");
        let qemu = |name: &str, qmp: &str, dir: &str| {
            format!("\n[[vm]]\nname = \"{name}\"\nbackend = \"qemu\"\nqmp = \"{qmp}\"\n{dir}")
        };
        let synthetic = |name: &str| {
            format!("\n[[vm]]\nname = \"{name}\"\nbackend = \"synthetic\"\nsize_mib = 1\n")
        };
        let cases = [
            (synthetic("a") + &synthetic("a"), "vm \"a\" appears twice"),
            (
                qemu("a", "/q/a", "") + &qemu("a", "/q/b", ""),
                "vm \"a\" appears twice",
            ),
            (
                qemu("a", "/q/a", "") + &qemu("b", "/q/a", ""),
                "vms \"a\" and \"b\" have the same qmp socket /q/a",
            ),
            (
                qemu("a", "/q/a", "disk_dir = \"/d\"\n")
                    + &qemu("b", "/q/b", "disk_dir = \"/d\"\n"),
                "vms \"a\" and \"b\" have the same disk_dir /d",
            ),
        ];
        for (vms, says) in cases {
            let e = Config::parse(&(base.clone() + &vms)).unwrap_err();
            assert!(e.contains(says), "{vms}: {e}");
        }
        let apart = qemu("a", "/q/a", "disk_dir = \"/d/a\"\n")
            + &qemu("b", "/q/b", "disk_dir = \"/d/b\"\n")
            + &qemu("c", "/q/c", "")
            + &qemu("d", "/q/d", "")
            + &synthetic("e");
        Config::parse(&(base.clone() + &apart)).expect("VMs apart");
        // A synthetic guest's dirty rate is a loop count: bounded.
        let fast = |rate: u64| format!("{}dirty_pages_per_sec = {rate}\n", synthetic("s"));
        Config::parse(&(base.clone() + &fast(25_600))).expect("each page 100 times a second");
        let e = Config::parse(&(base.clone() + &fast(25_601))).unwrap_err();
        assert!(e.contains("dirty_pages_per_sec 25601"), "{e}");
        // A name no order could name, or one that would forge a log line, is refused.
        let long = "v".repeat(256);
        for bad in [
            "",
            long.as_str(),
            "a\\nb",
            "a\\u001bb",
            "a\\u202eb",
            "a\\u2028b",
        ] {
            let e = Config::parse(&(base.clone() + &synthetic(bad))).unwrap_err();
            assert!(
                e.contains("must be 1..=255 bytes without control or text-direction characters"),
                "{bad}: {e}"
            );
        }
        Config::parse(&(base + &synthetic(&"v".repeat(255)))).expect("255 bytes");
    }
}
