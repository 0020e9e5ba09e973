//! The checks of a `backend = "qemu"` entry: its QMP socket, its downtime ladder and the disks
//! that travel with it. spec: spec/qemu.md §1, §3, §5

use trustmig_protocol::manifest::MAX_DISKS;

use super::QemuVm;

/// Steps of the downtime ladder unless the VM's configuration says otherwise.
pub const DEFAULT_DOWNTIME_STEPS: u32 = 3;
/// More steps than this would start below a millisecond for any sensible target.
pub const MAX_DOWNTIME_STEPS: u32 = 10;
/// The prefix of the agent's own QEMU names: its mirrors' jobs and nodes on a source, its NBD
/// exports on a destination (which go when it stops QEMU's NBD server, before COMMIT).
pub const RESERVED_PREFIX: &str = "trustmig-";

/// The longest unix socket path the agent (and QEMU) can bind or connect to: `sun_path` is 108
/// bytes, and Rust's standard library (so tokio too) keeps one for the NUL; pinned by
/// `unix_socket_paths_of_107_bytes_bind_and_no_longer`.
const MAX_SOCKET_PATH: usize = 107;

/// Check the QEMU settings of VM `name`.
pub(super) fn check(name: &str, vm: &QemuVm) -> Result<(), String> {
    if !vm.qmp.is_absolute() {
        return Err(format!(
            "vm {name:?}: qmp {:?} must be an absolute path",
            vm.qmp.display().to_string()
        ));
    }
    if vm.qmp.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(format!(
            "vm {name:?}: qmp path is longer than a unix socket path may be ({MAX_SOCKET_PATH} bytes)"
        ));
    }
    if vm.downtime_steps.is_some_and(|n| n > MAX_DOWNTIME_STEPS) {
        return Err(format!(
            "vm {name:?}: downtime_steps must be at most {MAX_DOWNTIME_STEPS}"
        ));
    }
    check_disks(name, vm)
}

/// A disk name: the manifest name and the destination's QEMU node name (QEMU: a letter, then
/// letters, digits, `-`, `_`, at most 31 bytes); also the file name in `disk_dir`. Not
/// `trustmig-…`: QEMU names of that prefix are the agent's own (its mirrors' jobs and nodes,
/// which a later order of the VM removes), and a disk's node named so could be taken for one
/// of them.
pub fn check_disk_name(name: &str) -> Result<(), String> {
    if name.starts_with(RESERVED_PREFIX) {
        return Err(format!(
            "disk name {name:?} must not begin with {RESERVED_PREFIX:?}: QEMU names so are the agent's own"
        ));
    }
    let ok = name.len() <= 31
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "disk name {name:?} must be a letter then letters, digits, '-' or '_', at most 31 bytes"
        ))
    }
}

/// The disk settings: `disk_dir`, and each `[[vm.disk]]`.
fn check_disks(name: &str, vm: &QemuVm) -> Result<(), String> {
    if let Some(dir) = &vm.disk_dir {
        if !dir.is_absolute() {
            return Err(format!(
                "vm {name:?}: disk_dir {:?} must be an absolute path",
                dir.display().to_string()
            ));
        }
    }
    if vm.disks.len() > MAX_DISKS {
        return Err(format!(
            "vm {name:?}: {} disks, at most {MAX_DISKS}",
            vm.disks.len()
        ));
    }
    for (i, d) in vm.disks.iter().enumerate() {
        check_disk_name(&d.name).map_err(|e| format!("vm {name:?}: {e}"))?;
        if vm.disks[..i].iter().any(|o| o.name == d.name) {
            return Err(format!("vm {name:?}: disk {:?} appears twice", d.name));
        }
        if d.path.is_none() && d.device.is_none() {
            return Err(format!(
                "vm {name:?}: disk {:?} needs path (source) or device (destination)",
                d.name
            ));
        }
        if d.verify.is_some() && d.path.is_none() {
            return Err(format!(
                "vm {name:?}: disk {:?}: verify is the source's setting (the destination follows the attested manifest); it needs the disk's path",
                d.name
            ));
        }
        if let Some(p) = &d.path {
            if !p.is_absolute() {
                return Err(format!(
                    "vm {name:?}: disk {:?}: path {:?} must be absolute",
                    d.name,
                    p.display().to_string()
                ));
            }
        }
        if let Some(dev) = &d.device {
            if !dev.get("driver").is_some_and(|v| v.is_str()) {
                return Err(format!(
                    "vm {name:?}: disk {:?}: device needs driver = \"...\" (e.g. \"virtio-blk-pci\")",
                    d.name
                ));
            }
            if dev.contains_key("drive") {
                return Err(format!(
                    "vm {name:?}: disk {:?}: device must not set drive (the agent sets drive = {:?})",
                    d.name, d.name
                ));
            }
            if vm.disk_dir.is_none() {
                return Err(format!(
                    "vm {name:?}: disk {:?} has a device: set disk_dir, where received disks are written",
                    d.name
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::{test_dest_disk as dest_disk, Config, DiskConfig};
    use super::*;

    /// spec/qemu.md §1: a unix socket binds at a path of 107 bytes and not at 108 (refused as
    /// invalid input), so a longer QMP path could never be reached.
    #[test]
    fn unix_socket_paths_of_107_bytes_bind_and_no_longer() {
        let dir = tempfile::tempdir().expect("tmp");
        let base = dir.path().display().to_string() + "/";
        if base.len() >= MAX_SOCKET_PATH {
            return; // a temp dir this deep leaves no room to try
        }
        let at = |len: usize| {
            let path = base.clone() + &"s".repeat(len - base.len());
            assert_eq!(path.len(), len);
            std::os::unix::net::UnixListener::bind(&path).map(|_| ())
        };
        at(MAX_SOCKET_PATH).expect("107 bytes bind");
        let e = at(MAX_SOCKET_PATH + 1).expect_err("108 bytes bound");
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
    }

    fn vm(qmp: &str, disk_dir: Option<&Path>, disks: Vec<DiskConfig>) -> QemuVm {
        QemuVm {
            qmp: qmp.into(),
            disk_dir: disk_dir.map(Path::to_path_buf),
            downtime_steps: None,
            disks,
        }
    }

    #[test]
    fn qmp_and_ladder_problems_are_named() {
        let check = |v: &QemuVm| check("q", v);
        assert!(check(&vm("/run/q.sock", None, vec![])).is_ok());
        assert!(check(&vm("q.sock", None, vec![]))
            .unwrap_err()
            .contains("absolute"));
        // A qemu entry without qmp is refused as it is read.
        let text = crate::config::default_config_text("x", "y")
            + "\n[[vm]]\nname = \"q\"\nbackend = \"qemu\"\n";
        assert!(Config::parse(&text).unwrap_err().contains("needs qmp"));
        let long = format!("/{}", "x".repeat(200));
        assert!(check(&vm(&long, None, vec![]))
            .unwrap_err()
            .contains("longer"));
        let mut steep = vm("/run/q.sock", None, vec![]);
        steep.downtime_steps = Some(MAX_DOWNTIME_STEPS + 1);
        assert!(check(&steep)
            .unwrap_err()
            .contains("downtime_steps must be at most 10"));
        steep.downtime_steps = Some(MAX_DOWNTIME_STEPS);
        assert!(check(&steep).is_ok());
    }

    #[test]
    fn disk_problems_are_named() {
        let d = Some(Path::new("/var/lib/t"));
        let check = |disks, dir| check("q", &vm("/run/q.sock", dir, disks));
        assert!(check(vec![dest_disk("d0")], d).is_ok());
        let e = check(vec![dest_disk("0d")], d).unwrap_err();
        assert!(e.contains("disk name"), "{e}");
        let e = check(vec![dest_disk("trustmig-d0")], d).unwrap_err();
        assert!(e.contains("must not begin with \"trustmig-\""), "{e}");
        assert!(check(vec![dest_disk("Trustmig")], d).is_ok());
        let e = check(vec![dest_disk("d0"), dest_disk("d0")], d).unwrap_err();
        assert!(e.contains("twice"), "{e}");
        let mut with_drive = dest_disk("d0");
        if let Some(t) = with_drive.device.as_mut() {
            t.insert("drive".into(), "x".into());
        }
        assert!(check(vec![with_drive], d)
            .unwrap_err()
            .contains("must not set drive"));
        let bare = DiskConfig {
            name: "d0".into(),
            path: None,
            device: None,
            format: None,
            mirror: None,
            verify: None,
        };
        assert!(check(vec![bare], d).unwrap_err().contains("needs path"));
        let rel = DiskConfig {
            name: "d0".into(),
            path: Some("img.raw".into()),
            device: None,
            format: None,
            mirror: None,
            verify: None,
        };
        assert!(check(vec![rel], d).unwrap_err().contains("absolute"));
        let mut verify_here = dest_disk("d0");
        verify_here.verify = Some(crate::config::DiskVerify::Full);
        assert!(check(vec![verify_here], d)
            .unwrap_err()
            .contains("verify is the source's setting"));
        assert!(check(vec![], Some(Path::new("rel")))
            .unwrap_err()
            .contains("disk_dir"));
    }
}
