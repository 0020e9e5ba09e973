//! Bad input of every kind at the command line: one clear line naming the problem, non-zero exit.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

fn trustmig(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_trustmig"))
        .args(args)
        .env_remove("TRUSTMIG_HOME")
        .output()
        .expect("run trustmig");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn fails_with(args: &[&str], needle: &str) {
    let (ok, _, err) = trustmig(args);
    assert!(!ok, "{args:?} succeeded");
    assert!(
        err.contains(needle),
        "{args:?}: stderr {err:?} lacks {needle:?}"
    );
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
}

#[test]
fn init_refuses_to_overwrite_and_keys_must_be_private() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("h");
    let h = home.to_str().unwrap();
    let (ok, out, _) = trustmig(&["init", "--home", h, "--tcti", "swtpm:host=127.0.0.1,port=1"]);
    assert!(ok);
    assert_eq!(out.trim().len(), 64, "prints the identity: {out}");
    let key = home.join("identity.key");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    fails_with(&["init", "--home", h], "already holds an agent identity");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    fails_with(
        &["agent", "--home", h],
        "permissions 644 are too open; run `chmod 600",
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    // The TPM is unreachable: named, with the TCTI.
    fails_with(&["agent", "--home", h], "swtpm:host=127.0.0.1,port=1");
    // A malformed configuration names the file and the key.
    let cfg = home.join("config.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("streams = 2", "streams = 99")).unwrap();
    fails_with(&["agent", "--home", h], "transfer.streams = 99");
    std::fs::write(&cfg, "listen = \n").unwrap();
    fails_with(&["agent", "--home", h], "config.toml");
    // A home that lost a part is not sent to `init`, which would refuse it.
    std::fs::remove_file(&cfg).unwrap();
    fails_with(
        &["agent", "--home", h],
        "holds an agent identity but config.toml is missing; restore it",
    );
}

#[test]
fn missing_home_socket_and_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let nowhere = dir.path().join("none");
    let n = nowhere.to_str().unwrap();
    fails_with(&["agent", "--home", n], "is not a trustmig home");
    fails_with(&["status", "--home", n], "cannot reach the local agent");
    fails_with(&["order", "show", n], "none");
    let junk = dir.path().join("junk.order");
    std::fs::write(&junk, b"not an order").unwrap();
    fails_with(
        &["order", "show", junk.to_str().unwrap()],
        "junk.order: order is malformed",
    );
    fails_with(
        &["order", "revoke", "--home", n, junk.to_str().unwrap()],
        "junk.order: order is malformed",
    );
    // The trust store of a mistyped home: named as no home, not a file inside it, and never
    // an empty list.
    let key = "ab".repeat(32);
    fails_with(
        &[
            "trust", "add-peer", "--home", n, "--name", "b", "--key", &key,
        ],
        "is not a trustmig home",
    );
    fails_with(&["trust", "list", "--home", n], "is not a trustmig home");
    fails_with(
        &["migrate", "--home", n, "--order", junk.to_str().unwrap()],
        "junk.order",
    );
}

#[test]
fn order_signing_checks_its_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("op.key");
    let k = key.to_str().unwrap();
    let (ok, out, _) = trustmig(&["operator", "keygen", "--out", k]);
    assert!(ok && out.trim().len() == 64);
    let a = "aa".repeat(32);
    let b = "bb".repeat(32);
    let out_file = dir.path().join("o.order");
    let o = out_file.to_str().unwrap();
    let base = [
        "order",
        "sign",
        "--key",
        k,
        "--vm",
        "v",
        "--source",
        &a,
        "--destination",
        &b,
        "--destination-addr",
        "127.0.0.1:1",
        "--out",
        o,
    ];
    let (ok, _, err) = trustmig(&base);
    assert!(ok, "{err}");
    let (ok, shown, _) = trustmig(&["order", "show", o]);
    assert!(ok && shown.contains("verified   not checked"));
    assert!(shown.contains("final quote after Resumed"), "{shown}");
    // --strict-final-quote is signed into the order and shown.
    let mut strict = base.to_vec();
    strict.push("--strict-final-quote");
    let (ok, _, err) = trustmig(&strict);
    assert!(ok, "{err}");
    let (ok, shown, _) = trustmig(&["order", "show", o]);
    assert!(ok && shown.contains("final quote strict"), "{shown}");
    let mut bad = base.to_vec();
    bad[7] = "abcd";
    fails_with(&bad, "2 bytes, expected 32");
    // The two halves of the key pair swapped: each refused, by name, before anything is made
    // of them (signing with the public half made orders no agent trusts; trusting the secret
    // half copied it into the trust store).
    let public = dir.path().join("op.pub");
    let mut swapped = base.to_vec();
    swapped[3] = public.to_str().unwrap();
    fails_with(
        &swapped,
        "op.pub: not a valid operator key: this is a public key",
    );
    let home = dir.path().join("h");
    let h = home.to_str().unwrap();
    assert!(trustmig(&["init", "--home", h, "--tcti", "swtpm:host=127.0.0.1,port=1"]).0);
    fails_with(
        &[
            "trust",
            "add-operator",
            "--home",
            h,
            "--name",
            "op",
            "--key",
            k,
        ],
        "this is the secret key of",
    );
    let operators = std::fs::read_to_string(home.join("trust/operators.toml")).unwrap_or_default();
    let secret = std::fs::read_to_string(&key).unwrap();
    assert!(!operators.contains(secret.trim()), "{operators}");
    let (ok, _, err) = trustmig(&[
        "trust",
        "add-operator",
        "--home",
        h,
        "--name",
        "op",
        "--key",
        public.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let mut bad = base.to_vec();
    bad.extend(["--max-rounds", "0"]);
    fails_with(&bad, "max_rounds 0");
    let mut bad = base.to_vec();
    bad.extend(["--on-nonconvergence", "pray"]);
    fails_with(&bad, "unknown non-convergence action");
    let mut bad = base.to_vec();
    bad.extend(["--ttl", "999999"]);
    fails_with(&bad, "--ttl 999999");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    fails_with(&base, "too open");
}

#[test]
fn port_in_use_is_named_with_the_fix() {
    let tpm = match trustmig_attest::swtpm::Swtpm::start() {
        Ok(t) => t,
        Err(e) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "swtpm is required in CI: {e}"
            );
            eprintln!("skipped: {e}");
            return;
        }
    };
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("h");
    let h = home.to_str().unwrap();
    let (ok, _, err) = trustmig(&[
        "init",
        "--home",
        h,
        "--listen",
        &addr,
        "--tcti",
        &tpm.tcti(),
    ]);
    assert!(ok, "{err}");
    fails_with(&["agent", "--home", h], &format!("cannot listen on {addr}"));
    fails_with(&["agent", "--home", h], "change `listen` in config.toml");
    let cfg = home.join("config.toml");
    below_1024_without_capabilities(&cfg, &addr, h);
    // A configured guest larger than this host's memory is named, not an allocation abort.
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text += "\n[[vm]]\nname = \"huge\"\nbackend = \"synthetic\"\nsize_mib = 1000000\n";
    std::fs::write(&cfg, text).unwrap();
    fails_with(&["agent", "--home", h], "lower size_mib");
    with_meminfo_hidden(h);
}

/// contrib/trustmig.service's `ProcSubset=pid` mounts the unit's /proc with `subset=pid`,
/// which hides /proc/meminfo (tried in a mount and pid namespace of its own): the agent then
/// cannot check its synthetic VMs' memory against the host's and says so; a guest larger than
/// the allocator grants is still a configuration error naming the VM (it aborted the agent on
/// the allocation). Needs root (skipped otherwise).
fn with_meminfo_hidden(home: &str) {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../contrib/trustmig.service"
    ))
    .unwrap();
    assert!(unit.lines().any(|l| l == "ProcSubset=pid"), "{unit}");
    // Only the kernel's heuristic overcommit refuses a single allocation larger than memory
    // and swap; with `vm.overcommit_memory = 1` the guest would be granted and written.
    let overcommit = std::fs::read_to_string("/proc/sys/vm/overcommit_memory");
    if !is_root() || overcommit.map(|s| s.trim() == "0").ok() != Some(true) {
        eprintln!("the ProcSubset part skipped: not root, or not heuristic overcommit");
        return;
    }
    let script = "mount -t proc -o subset=pid proc /proc || exit 3; \
                  test -e /proc/meminfo && exit 4; test -e /proc/self/stat || exit 5; exec \"$@\"";
    let out = Command::new("unshare")
        .args([
            "-m",
            "-p",
            "-f",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
        ])
        .arg(env!("CARGO_BIN_EXE_trustmig"))
        .args(["agent", "--home", home])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        ![Some(3), Some(4), Some(5)].contains(&out.status.code()),
        "{out:?}"
    );
    assert!(!out.status.success(), "{err}");
    for part in [
        "cannot read MemAvailable",
        "vm \"huge\": cannot allocate 1000000 MiB of guest memory here; lower size_mib",
    ] {
        assert!(err.contains(part), "{err:?} lacks {part:?}");
    }
    assert!(!err.contains("memory allocation of"), "{err}");
}

/// contrib/trustmig.service grants no capability: an agent whose `listen` is a port below
/// 1024 cannot bind it, and says which capability it lacks. Root without capabilities
/// (`setpriv`, as the unit leaves it) on a free port below the kernel's unprivileged start.
/// Needs root and the default `ip_unprivileged_port_start` of 1024 (skipped otherwise).
fn below_1024_without_capabilities(cfg: &std::path::Path, addr: &str, home: &str) {
    let start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start");
    if !is_root() || start.map(|s| s.trim() == "1024").ok() != Some(true) {
        eprintln!("the port-below-1024 part skipped: not root, or ports below 1024 are open");
        return;
    }
    let free = (900..1024).find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok());
    let low = format!("127.0.0.1:{}", free.expect("a free port below 1024"));
    let text = std::fs::read_to_string(cfg).unwrap();
    let moved = text.replace(&format!("\"{addr}\""), &format!("\"{low}\""));
    assert_ne!(moved, text, "listen = {addr:?} in {text}");
    std::fs::write(cfg, &moved).unwrap();
    let out = Command::new("setpriv")
        .args(["--bounding-set=-all", "--inh-caps=-all"])
        .arg(env!("CARGO_BIN_EXE_trustmig"))
        .args(["agent", "--home", home])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    for part in [
        &format!("cannot listen on {low}"),
        "Permission denied",
        "CAP_NET_BIND_SERVICE",
    ] {
        assert!(err.contains(part), "{err:?} lacks {part:?}");
    }
    std::fs::write(cfg, text).unwrap();
}

/// `trustmig qemu destination-command` leaves out a transferred disk's drive and device (and
/// says so on stderr), and names a disk the source command line does not open. (Real QEMU runs
/// `start-destination`'s line in every QEMU test.)
#[test]
fn destination_command_leaves_out_transferred_disks() {
    let source = [
        "qemu",
        "destination-command",
        "--qmp",
        "/run/vm.qmp",
        "--transferred-disk",
        "/img/d0.raw",
        "--",
        "qemu-system-x86_64",
        "-m",
        "256",
        "-qmp",
        "unix:/run/src.qmp,server=on,wait=off",
        "-drive",
        "file=/img/d0.raw,format=raw,if=none,id=d0,readonly=on",
        "-device",
        "virtio-blk-pci,drive=d0,addr=0x5",
    ];
    let (ok, out, err) = trustmig(&source);
    assert!(ok, "{err}");
    assert_eq!(
        out.trim(),
        "qemu-system-x86_64 -m 256 -qmp unix:/run/vm.qmp,server=on,wait=off -incoming defer -S"
    );
    assert!(
        err.contains("left out") && err.contains("virtio-blk-pci,drive=d0"),
        "{err}"
    );
    let mut other = source;
    other[5] = "/img/other.raw";
    fails_with(
        &other,
        "no -drive or -blockdev of the source command line opens \"/img/other.raw\"",
    );
    // start-destination runs that line; a QEMU that cannot start is named.
    fails_with(
        &[
            "qemu",
            "start-destination",
            "--qmp",
            "/run/vm.qmp",
            "--",
            "/nonexistent/qemu-system-x86_64",
            "-m",
            "256",
        ],
        "cannot start /nonexistent/qemu-system-x86_64",
    );
}

/// contrib/trustmig.service scores "OK" or better in systemd's own exposure analysis
/// (`scripts/unit-security.sh`: `systemd-analyze security --offline=true`). Skipped where
/// systemd-analyze is not installed, except in CI (`./test.sh` installs it).
#[test]
fn the_service_unit_is_confined() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/unit-security.sh");
    let out = Command::new(script).output().expect("run unit-security.sh");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(2) {
        assert!(std::env::var_os("CI").is_none(), "required in CI: {text}");
        eprintln!("skipped: {text}");
        return;
    }
    println!("{text}");
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("Overall exposure level for trustmig.service"),
        "{text}"
    );
}

/// The unit gives the agent the TPM through group `tss` (contrib/trustmig.service): pins the two
/// facts that rests on. Debian's `tpm-udev` (which libtss2 depends on) makes `/dev/tpmrm*` owner
/// and group `tss`, mode 0660; and root with no capabilities (`CapabilityBoundingSet=` empty)
/// opens such a file only as a member of its group: the kernel's DAC, tried on a file made so.
/// Skipped where `tpm-udev` is not installed or not run as root, except in CI.
#[test]
fn the_tpm_device_is_open_to_the_units_group_only() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../contrib/trustmig.service"
    ))
    .unwrap();
    let setting = |line: &str| unit.lines().any(|l| l.trim() == line);
    assert!(setting("SupplementaryGroups=tss"), "{unit}");
    assert!(setting("DeviceAllow=/dev/tpmrm0 rw"), "{unit}");
    assert!(setting("CapabilityBoundingSet="), "{unit}");

    let rules = [
        "/usr/lib/udev/rules.d/60-tpm-udev.rules",
        "/lib/udev/rules.d/60-tpm-udev.rules",
    ];
    let Some(rules) = rules.iter().find_map(|p| std::fs::read_to_string(p).ok()) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "tpm-udev is required in CI (libtss2 needs it)"
        );
        eprintln!("skipped: tpm-udev is not installed");
        return;
    };
    let rule = rules
        .lines()
        .find(|l| l.starts_with("KERNEL==\"tpmrm[0-9]*\""))
        .unwrap_or_else(|| panic!("no rule for tpmrm devices in {rules}"));
    for part in ["MODE=\"0660\"", "GROUP=\"tss\""] {
        assert!(rule.contains(part), "{rule:?} lacks {part}");
    }

    // Making a file the rule's way takes root (a CI runner may use sudo for its packages only).
    if !is_root() {
        eprintln!("the kernel's part skipped: not root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dev = dir.path().join("tpmrm-like");
    std::fs::write(&dev, b"x").unwrap();
    std::fs::set_permissions(&dev, std::fs::Permissions::from_mode(0o660)).unwrap();
    let chown = Command::new("chown")
        .arg("tss:tss")
        .arg(&dev)
        .status()
        .unwrap();
    assert!(chown.success());
    // The directory must be enterable once the capabilities are gone.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let open_without_caps = |groups: &[&str]| {
        Command::new("setpriv")
            .args(["--bounding-set=-all", "--inh-caps=-all"])
            .args(groups)
            .args(["sh", "-c", "exec 3<>\"$0\""])
            .arg(&dev)
            .output()
            .unwrap()
    };
    let refused = open_without_caps(&[]);
    assert!(
        !refused.status.success(),
        "root without capabilities opened it"
    );
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("Permission denied"),
        "{refused:?}"
    );
    let granted = open_without_caps(&["--groups", "tss"]);
    assert!(granted.status.success(), "{granted:?}");
}

/// QMP sockets outside the unit's writable paths (libvirt's, under /var/lib/libvirt, which
/// `ProtectSystem=strict` makes read-only) still serve the agent: it only connects to them,
/// and the kernel lets a client connect to a unix socket on a read-only mount (sockets are
/// not written through their mount). Tried in a mount namespace of its own; needs root
/// (skipped otherwise). And the unit's own socket directory is private (mode 0700).
#[test]
fn a_unix_socket_on_a_read_only_mount_takes_connections() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../contrib/trustmig.service"
    ))
    .unwrap();
    assert!(unit.contains("RuntimeDirectoryMode=0700"), "{unit}");
    if !is_root() {
        eprintln!("skipped: not root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.qmp");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let d = dir.path().to_str().unwrap();
    let script = format!(
        "mount --bind -o ro {d} {d} || exit 3; touch {d}/x 2>/dev/null && exit 4; \
         echo hello | socat - UNIX-CONNECT:{d}/vm.qmp"
    );
    let child = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    assert!(child.status.success(), "{child:?}");
    let (mut conn, _) = listener.accept().unwrap();
    let mut got = String::new();
    std::io::Read::read_to_string(&mut conn, &mut got).unwrap();
    assert_eq!(got, "hello\n");
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().unwrap().stdout == b"0\n"
}

/// The agent's features as a build of `workspace_args` at the workspace root resolves them
/// (normal and build edges: what goes into the binary, not the test-only ones).
fn agent_features(workspace_args: &[&str]) -> String {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
    let out = Command::new(cargo)
        .args(["tree", "--offline", "--manifest-path", manifest])
        .args(workspace_args)
        .args(["-e", "normal,build,features", "-i", "trustmig-agent"])
        .args(["--prefix", "none"])
        .output()
        .expect("run cargo tree");
    assert!(
        out.status.success(),
        "cargo tree: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `cargo build --release` at the root builds a binary without the test hooks
/// (`default-members` leaves out the tests crate that turns them on); a workspace-wide build
/// has them, and the doctor names such a binary.
#[test]
fn a_plain_build_at_the_root_has_no_fault_injection() {
    let plain = agent_features(&[]);
    assert!(plain.contains("trustmig-agent v"), "{plain}");
    assert!(!plain.contains("fault-injection"), "{plain}");
    let workspace = agent_features(&["--workspace"]);
    assert!(workspace.contains("\"fault-injection\""), "{workspace}");
}
