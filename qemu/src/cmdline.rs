//! The destination QEMU's command line, derived from the source's (`trustmig qemu
//! destination-command`). spec: spec/qemu.md §1, §5
//!
//! The destination runs the same machine, memory and devices, waiting for the stream
//! (`-incoming defer -S`) on the QMP socket its agent knows. Disks that the agent transfers are
//! hot-added by the agent once they verified, so their `-drive`/`-blockdev` and the `-device`
//! that uses them must not be on the destination's command line: QEMU would open a file that
//! does not exist yet (or an old one) and the hot-add would clash with the device.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// Why a destination command line cannot be derived.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmdlineError {
    /// A transferred disk that no `-drive`/`-blockdev` of the source opens.
    #[error("no -drive or -blockdev of the source command line opens {0:?} (give the path exactly as on the source's command line)")]
    DiskNotFound(PathBuf),
    /// An option that needs a value ends the command line.
    #[error("the source command line ends with {0}, which needs a value")]
    MissingValue(String),
    /// A JSON-syntax value (`-device {...}`, `-blockdev {...}`) that is not a JSON object.
    #[error("{option} {value}: not a JSON object ({reason})")]
    BadJson {
        /// The option.
        option: String,
        /// Its value.
        value: String,
        /// What the JSON parser said.
        reason: String,
    },
}

/// What was left out, for the operator to see.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Derived {
    /// The destination's command line, binary first.
    pub args: Vec<String>,
    /// Options dropped because they belong to transferred disks (`-drive …`, `-device …`),
    /// for the operator's eyes (secrets redacted).
    pub dropped: Vec<String>,
}

/// Options of the source that the destination must not repeat, with a value.
const DROP_WITH_VALUE: &[&str] = &["-qmp", "-incoming", "-pidfile"];
/// Options of the source that the destination must not repeat, without a value.
const DROP_ALONE: &[&str] = &["-daemonize", "-S"];
/// Options whose value is an option string (`key=value,...`) that may name a disk.
const BLOCK_OPTS: &[&str] = &["-drive", "-blockdev"];
/// Options that always take the next argument as their value, as QEMU does (`HAS_ARG`), even
/// when it starts with `-`: for these the "next is an option, so this is a flag" guess must
/// not apply, or `-blockdev -drive file=X` would be read differently from QEMU and dropping
/// the `-drive` pair would change what the arguments around it mean. Public for the test that
/// pins each against QEMU (`qemu_reads_the_next_argument_as_the_value_of_each_value_option`).
pub const VALUE_OPTS: &[&str] = &[
    "-drive",
    "-blockdev",
    "-device",
    "-qmp",
    "-incoming",
    "-pidfile",
    "-append",
    "-m",
    "-smp",
    "-machine",
    "-M",
    "-cpu",
    "-accel",
    "-name",
    "-kernel",
    "-initrd",
    "-chardev",
    "-serial",
    "-mon",
    "-monitor",
    "-netdev",
    "-object",
    "-tpmdev",
    "-global",
    "-display",
    "-vga",
    "-boot",
    "-uuid",
    "-rtc",
];

/// The command line of the destination for a VM started on the source with `qemu
/// source_args`, listening on `qmp`, without the block nodes that open `transferred` images
/// and the devices that use them.
pub fn destination_command(
    qemu: &str,
    source_args: &[String],
    qmp: &Path,
    transferred: &[PathBuf],
) -> Result<Derived, CmdlineError> {
    let pairs = options(source_args)?;
    let drop = transferred_options(&pairs, transferred)?;
    let mut out = Derived {
        args: vec![qemu.to_string()],
        dropped: Vec::new(),
    };
    for (i, (opt, value)) in pairs.into_iter().enumerate() {
        let name = canonical(&opt);
        if DROP_WITH_VALUE.contains(&name.as_str()) || DROP_ALONE.contains(&name.as_str()) {
            continue;
        }
        if drop[i] {
            let shown = redacted(&[value.unwrap_or_default()]).concat();
            out.dropped.push(format!("{opt} {shown}"));
            continue;
        }
        out.args.push(opt);
        out.args.extend(value);
    }
    out.args.extend([
        "-qmp".to_string(),
        format!("unix:{},server=on,wait=off", qmp.display()),
        "-incoming".to_string(),
        "defer".to_string(),
        "-S".to_string(),
    ]);
    Ok(out)
}

/// The source's arguments as (option, value) pairs: a value is the next argument after an
/// option that takes one. QEMU options are `-name value` or `-flag` (`--name` is the same
/// option); an option is taken as a flag when QEMU's table says so, or when it is not one we
/// know to take a value and the next argument is itself an option (a flag newer than
/// [`FLAGS`]). A non-option argument is kept as it is, with no value.
fn options(args: &[String]) -> Result<Vec<(String, Option<String>)>, CmdlineError> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        let name = canonical(a);
        let next_is_option = args.get(i + 1).is_some_and(|n| n.starts_with('-'));
        let flag = !a.starts_with('-')
            || DROP_ALONE.contains(&name.as_str())
            || FLAGS.contains(&name.as_str())
            || (next_is_option && !VALUE_OPTS.contains(&name.as_str()));
        if flag {
            out.push((a.clone(), None));
            i += 1;
        } else {
            let v = args
                .get(i + 1)
                .ok_or_else(|| CmdlineError::MissingValue(a.clone()))?;
            out.push((a.clone(), Some(v.clone())));
            i += 2;
        }
    }
    Ok(out)
}

/// `--name` and `-name` are the same QEMU option.
fn canonical(opt: &str) -> String {
    match opt.strip_prefix("--") {
        Some(rest) if !rest.is_empty() => format!("-{rest}"),
        _ => opt.to_string(),
    }
}

/// QEMU 7.2 options that take no value (`qemu-options.def` entries without `HAS_ARG`).
const FLAGS: &[&str] = &[
    "-nodefaults",
    "-no-reboot",
    "-no-shutdown",
    "-enable-kvm",
    "-nographic",
    "-no-hpet",
    "-no-acpi",
    "-snapshot",
    "-mem-prealloc",
    "-no-user-config",
    "-nouserconfig",
    "-full-screen",
    "-s",
    "-only-migratable",
    "-usb",
    "-no-fd-bootchk",
    "-enable-fips",
    "-no-kvm-pit-reinjection",
    "-win2k-hack",
    "-rtc-td-hack",
    "-no-quit",
    "-alt-grab",
    "-ctrl-grab",
    "-preconfig",
    "-singlestep",
    "-curses",
    "-sdl",
    "-portrait",
    "-no-frame",
    "-xen-attach",
    "-old-param",
    "-semihosting",
    "-enable-sync-profile",
];

/// Which of `pairs` belong to transferred images: the `-drive`/`-blockdev` that opens one,
/// a format node over such a protocol node (`-blockdev driver=raw,file=<node>`), and the
/// `-device` whose `drive=` is one of those. Every transferred image must be opened.
fn transferred_options(
    pairs: &[(String, Option<String>)],
    transferred: &[PathBuf],
) -> Result<Vec<bool>, CmdlineError> {
    let block = |o: &str| BLOCK_OPTS.contains(&o);
    let parsed = pairs
        .iter()
        .map(|(o, v)| {
            let name = canonical(o);
            // Only these values are looked into (others may be anything, `-append {` too).
            let kv = match v {
                Some(v) if block(&name) || name == "-device" => parse_value(&name, v)?,
                _ => Vec::new(),
            };
            Ok((name, kv))
        })
        .collect::<Result<Vec<_>, CmdlineError>>()?;
    // A -drive may carry both an id and a node-name; a device may refer to either.
    // An inline protocol node (`file.node-name`) is a name of the same drive.
    let own_names = |kv: &[(String, String)]| {
        ["id", "node-name", "file.node-name"]
            .into_iter()
            .filter_map(|k| get(kv, k).map(str::to_string))
            .collect::<Vec<_>>()
    };
    let mut drop = vec![false; pairs.len()];
    let mut names = HashSet::new();
    for p in transferred {
        let mut found = false;
        for (i, (o, kv)) in parsed.iter().enumerate() {
            let file = ["file", "filename", "file.filename"]
                .into_iter()
                .find_map(|k| get(kv, k));
            if block(o) && file == p.to_str() {
                found = true;
                drop[i] = true;
                names.extend(own_names(kv));
            }
        }
        if !found {
            return Err(CmdlineError::DiskNotFound(p.clone()));
        }
    }
    loop {
        let before = names.len();
        for (i, (o, kv)) in parsed.iter().enumerate() {
            if block(o) && get(kv, "file").is_some_and(|f| names.contains(f)) {
                drop[i] = true;
                names.extend(own_names(kv));
            }
        }
        if names.len() == before {
            break;
        }
    }
    for (i, (o, kv)) in parsed.iter().enumerate() {
        if o == "-device" && get(kv, "drive").is_some_and(|d| names.contains(d)) {
            drop[i] = true;
        }
    }
    Ok(drop)
}

/// Option keys whose values are secrets (`-object secret,data=...`, passwords): never logged.
const SECRET_KEYS: &[&str] = &["data", "password", "passwd"];

/// `args` with secret values replaced, for logs: `key=value,...` strings and JSON objects
/// alike. The command line QEMU runs is not changed by this.
pub fn redacted(args: &[String]) -> Vec<String> {
    const HIDDEN: &str = "<redacted>";
    fn hide_json(v: &mut serde_json::Value) {
        if let serde_json::Value::Object(m) = v {
            for (k, v) in m.iter_mut() {
                if SECRET_KEYS.contains(&k.as_str()) {
                    *v = serde_json::Value::String(HIDDEN.into());
                } else {
                    hide_json(v);
                }
            }
        }
    }
    args.iter()
        .map(|a| {
            if a.starts_with('{') {
                return match serde_json::from_str::<serde_json::Value>(a) {
                    Ok(mut v) => {
                        hide_json(&mut v);
                        v.to_string()
                    }
                    Err(_) => a.clone(),
                };
            }
            let items = parse_opts(a);
            if !items.iter().any(|(k, _)| SECRET_KEYS.contains(&k.as_str())) {
                return a.clone();
            }
            items
                .iter()
                .map(|(k, v)| {
                    let v = if SECRET_KEYS.contains(&k.as_str()) {
                        HIDDEN
                    } else {
                        v
                    };
                    let item = if k.is_empty() {
                        v.to_string()
                    } else {
                        format!("{k}={v}")
                    };
                    item.replace(',', ",,")
                })
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect()
}

/// `args` as one line a POSIX shell reads back as the same arguments.
pub fn shell_line(args: &[String]) -> String {
    let quote = |a: &String| {
        let plain = !a.is_empty()
            && a.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c));
        if plain {
            a.clone()
        } else {
            format!("'{}'", a.replace('\'', r"'\''"))
        }
    };
    args.iter().map(quote).collect::<Vec<_>>().join(" ")
}

/// An option's value as key/value pairs: for `-blockdev` and `-device` whose value starts
/// with `{`, QEMU's JSON syntax (what libvirt writes), nested objects flattened to dotted keys
/// as QEMU does (`"file": {"filename": ...}` is `file.filename`); else the `key=value,...`
/// syntax (`-drive` has no JSON form).
fn parse_value(option: &str, value: &str) -> Result<Vec<(String, String)>, CmdlineError> {
    if option == "-drive" || !value.starts_with('{') {
        return Ok(parse_opts(value));
    }
    let bad = |reason: String| CmdlineError::BadJson {
        option: option.to_string(),
        value: value.to_string(),
        reason,
    };
    let v: serde_json::Value = serde_json::from_str(value).map_err(|e| bad(e.to_string()))?;
    if !v.is_object() {
        return Err(bad("a JSON value, but not an object".into()));
    }
    let mut out = Vec::new();
    flatten("", &v, &mut out);
    Ok(out)
}

fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        serde_json::Value::String(s) => out.push((prefix.to_string(), s.clone())),
        other => out.push((prefix.to_string(), other.to_string())),
    }
}

/// QEMU's `key=value,...` option syntax (`,,` is a literal comma; an item without `=` has the
/// empty key, as the leading `virtio-blk-pci` of `-device virtio-blk-pci,drive=d0`).
fn parse_opts(s: &str) -> Vec<(String, String)> {
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
                continue;
            }
            items.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    items.push(cur);
    items
        .into_iter()
        .map(|i| match i.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (String::new(), i),
        })
        .collect()
}

fn get<'a>(kv: &'a [(String, String)], key: &str) -> Option<&'a str> {
    kv.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| (*a).to_string()).collect()
    }

    #[test]
    fn source_only_options_are_replaced() {
        let src = args(&[
            "-m",
            "256",
            "-qmp",
            "unix:/old,server=on",
            "-nodefaults",
            "-kernel",
            "g.elf",
            "-daemonize",
            "-pidfile",
            "/run/q.pid",
            "-S",
        ]);
        let d = destination_command("qemu-system-x86_64", &src, Path::new("/run/q.sock"), &[])
            .expect("derived");
        assert_eq!(
            d.args.join(" "),
            "qemu-system-x86_64 -m 256 -nodefaults -kernel g.elf -qmp unix:/run/q.sock,server=on,wait=off -incoming defer -S"
        );
        assert!(d.dropped.is_empty());
    }

    #[test]
    fn transferred_drives_and_their_devices_are_left_out() {
        let src = args(&[
            "-m",
            "256",
            "-drive",
            "file=/img/d0.raw,format=raw,if=none,id=d0,readonly=on",
            "-device",
            "virtio-blk-pci,drive=d0,id=vd0,addr=0x5",
            "-drive",
            "file=/shared/root.qcow2,if=none,id=root",
            "-device",
            "virtio-blk-pci,drive=root,id=vd1",
            // A blockdev pair: protocol node, then the format node over it.
            "-blockdev",
            "driver=file,node-name=f1,filename=/img/a,,b.raw,read-only=on",
            "-blockdev",
            "driver=raw,node-name=d1,file=f1,read-only=on",
            "-device",
            "virtio-blk-pci,drive=d1,id=vd2",
        ]);
        let d = destination_command(
            "qemu",
            &src,
            Path::new("/q.sock"),
            &[PathBuf::from("/img/d0.raw"), PathBuf::from("/img/a,b.raw")],
        )
        .expect("derived");
        let line = d.args.join(" ");
        assert_eq!(
            line,
            "qemu -m 256 -drive file=/shared/root.qcow2,if=none,id=root -device virtio-blk-pci,drive=root,id=vd1 -qmp unix:/q.sock,server=on,wait=off -incoming defer -S"
        );
        assert_eq!(d.dropped.len(), 5, "{:?}", d.dropped);
        assert!(d.dropped.iter().any(|o| o.contains("id=vd0")));
        assert!(d.dropped.iter().any(|o| o.contains("node-name=d1")));
    }

    #[test]
    fn bad_input_is_named() {
        let src = args(&["-m", "256", "-drive", "file=/img/d0.raw,id=d0"]);
        assert_eq!(
            destination_command(
                "qemu",
                &src,
                Path::new("/q"),
                &[PathBuf::from("/img/d1.raw")]
            ),
            Err(CmdlineError::DiskNotFound(PathBuf::from("/img/d1.raw")))
        );
        let cut = args(&["-m", "256", "-drive"]);
        let e = destination_command("qemu", &cut, Path::new("/q"), &[]).unwrap_err();
        assert_eq!(e, CmdlineError::MissingValue("-drive".into()));
        assert!(e.to_string().contains("-drive, which needs a value"));
    }

    #[test]
    fn flags_long_forms_and_both_names_are_understood() {
        let src = args(&[
            "-usb",
            "--device",
            "virtio-blk-pci,drive=n0",
            "-only-migratable",
            "--daemonize",
            "-some-new-flag",
            "-append",
            "-x quiet",
            "--drive",
            "file=/img/d0.raw,if=none,id=d0,node-name=n0",
        ]);
        let d = destination_command(
            "qemu",
            &src,
            Path::new("/q"),
            &[PathBuf::from("/img/d0.raw")],
        )
        .expect("derived");
        assert_eq!(
            d.args.join(" "),
            "qemu -usb -only-migratable -some-new-flag -append -x quiet -qmp unix:/q,server=on,wait=off -incoming defer -S"
        );
        assert_eq!(d.dropped.len(), 2, "{:?}", d.dropped);
    }

    #[test]
    fn options_that_take_a_value_take_it_even_when_it_looks_like_an_option() {
        // Found by the property test below: with "-blockdev" read as a flag (its next word
        // starts with '-'), dropping the transferred "-drive file=…" left the stray copy of
        // "file=…" right after "-blockdev", and the output opened the image again.
        let src = args(&[
            "-drive",
            "file=/img/d.raw,id=d0",
            "-blockdev",
            "-drive",
            "file=/img/d.raw,id=d0",
        ]);
        let d = destination_command(
            "qemu",
            &src,
            Path::new("/q"),
            &[PathBuf::from("/img/d.raw")],
        )
        .expect("derived");
        assert_eq!(
            options(&d.args[1..]).expect("parses")[..2],
            [
                ("-blockdev".to_string(), Some("-drive".to_string())),
                ("file=/img/d.raw,id=d0".to_string(), None),
            ]
        );
        assert_eq!(d.dropped, ["-drive file=/img/d.raw,id=d0"]);
    }

    /// libvirt writes `-blockdev` and `-device` in QEMU's JSON syntax.
    #[test]
    fn json_syntax_drives_and_devices_are_understood() {
        let src = args(&[
            "-blockdev",
            r#"{"driver":"file","filename":"/img/d0.raw","node-name":"libvirt-1-storage","read-only":true}"#,
            "-blockdev",
            r#"{"node-name":"libvirt-1-format","read-only":true,"driver":"raw","file":"libvirt-1-storage"}"#,
            "-device",
            r#"{"driver":"virtio-blk-pci","bus":"pci.0","addr":"0x4","drive":"libvirt-1-format","id":"virtio-disk0"}"#,
            // A format node with its protocol node inline.
            "-blockdev",
            r#"{"driver":"raw","node-name":"d1","file":{"driver":"file","filename":"/img/d1.raw"}}"#,
            "-device",
            r#"{"driver":"virtio-blk-pci","drive":"d1"}"#,
            "-device",
            r#"{"driver":"virtio-net-pci","id":"net0"}"#,
            // A device on an inline protocol node, by its name.
            "-blockdev",
            r#"{"driver":"raw","node-name":"d2","file":{"driver":"file","filename":"/img/d2.raw","node-name":"d2f"}}"#,
            "-device",
            "virtio-blk-pci,drive=d2f",
        ]);
        let d = destination_command(
            "qemu",
            &src,
            Path::new("/q"),
            &[
                PathBuf::from("/img/d0.raw"),
                PathBuf::from("/img/d1.raw"),
                PathBuf::from("/img/d2.raw"),
            ],
        )
        .expect("derived");
        assert_eq!(
            d.args.join(" "),
            r#"qemu -device {"driver":"virtio-net-pci","id":"net0"} -qmp unix:/q,server=on,wait=off -incoming defer -S"#
        );
        assert_eq!(d.dropped.len(), 7, "{:?}", d.dropped);
        // -drive has no JSON form: its value is read as key=value (and names no image here).
        let e = destination_command(
            "qemu",
            &args(&["-drive", r#"{"file":"/img/d0.raw"}"#]),
            Path::new("/q"),
            &[PathBuf::from("/img/d0.raw")],
        )
        .unwrap_err();
        assert!(matches!(e, CmdlineError::DiskNotFound(_)), "{e:?}");
        let bad = args(&["-device", r#"{"driver":"virtio-blk-pci","#]);
        let e = destination_command("qemu", &bad, Path::new("/q"), &[]).unwrap_err();
        assert!(
            matches!(&e, CmdlineError::BadJson { option, .. } if option == "-device"),
            "{e:?}"
        );
        assert!(
            e.to_string()
                .starts_with(r#"-device {"driver":"virtio-blk-pci",: not a JSON object"#),
            "{e}"
        );
    }

    #[test]
    fn secrets_are_redacted_for_logs() {
        let a = args(&[
            "qemu",
            "-object",
            "secret,id=s0,data=hunter2,,and,format=raw",
            "-object",
            r#"{"qom-type":"secret","id":"s1","data":"sesame"}"#,
            "-m",
            "256",
        ]);
        let r = redacted(&a).join(" ");
        assert!(
            !r.contains("hunter2") && !r.contains("and") && !r.contains("sesame"),
            "{r}"
        );
        assert!(
            r.starts_with("qemu -object secret,id=s0,data=<redacted>,format=raw -object {")
                && r.contains(r#""data":"<redacted>""#)
                && r.contains(r#""id":"s1""#)
                && r.ends_with("} -m 256"),
            "{r}"
        );
        // What destination-command lists as left out is redacted too.
        let src = args(&["-drive", "file=/img/d.raw,id=d0,password=hunter2"]);
        let img = [PathBuf::from("/img/d.raw")];
        let d = destination_command("qemu", &src, Path::new("/q"), &img).expect("derived");
        assert_eq!(
            d.dropped,
            ["-drive file=/img/d.raw,id=d0,password=<redacted>"]
        );
    }

    #[test]
    fn the_printed_line_reads_back_in_a_shell() {
        let a = args(&[
            "qemu",
            "-append",
            "area=16 rate=0",
            "-name",
            "it's",
            "-m",
            "256",
        ]);
        assert_eq!(
            shell_line(&a),
            r"qemu -append 'area=16 rate=0' -name 'it'\''s' -m 256"
        );
    }

    proptest::proptest! {
        /// Any command line, from a set of pieces that can form drives, devices, flags and
        /// stray values: a typed result, never a panic; and when it succeeds, no -drive or
        /// -blockdev that opens a transferred image survives, and the QMP/incoming options
        /// are ours alone.
        #[test]
        fn any_command_line_is_handled(
            picks in proptest::collection::vec(0usize..16, 0..24),
            transfer in proptest::prelude::any::<bool>(),
        ) {
            const PIECES: &[&str] = &[
                "-drive", "file=/img/d.raw,id=d0,node-name=n0", "-device",
                "virtio-blk-pci,drive=d0", "--device", "virtio-blk-pci,drive=n0",
                "-usb", "-qmp", "unix:/s,server=on", "-blockdev",
                "driver=raw,node-name=f,file=n0", "-S",
                r#"{"driver":"file","filename":"/img/d.raw","node-name":"j0"}"#,
                r#"{"driver":"raw","node-name":"j1","file":{"filename":"/img/d.raw"}}"#,
                r#"{"driver":"virtio-blk-pci","drive":"j1"}"#, r#"{"driver":"#,
            ];
            let src: Vec<String> = picks.iter().map(|&i| PIECES[i].to_string()).collect();
            let img = [PathBuf::from("/img/d.raw")];
            let t: &[PathBuf] = if transfer { &img } else { &[] };
            match destination_command("qemu", &src, Path::new("/q"), t) {
                Ok(d) => {
                    let line = d.args.join(" ");
                    // Read the result back as QEMU would: no block option may open the image.
                    // (Looking at neighbouring words instead is wrong: `-blockdev -drive
                    // file=X` is a -blockdev whose value is "-drive", then a stray word.)
                    let back = options(&d.args[1..]).expect("our own output parses");
                    for (opt, value) in &back {
                        let name = canonical(opt);
                        if !BLOCK_OPTS.contains(&name.as_str()) {
                            continue;
                        }
                        // What QEMU would open (a JSON `-drive` opens nothing: QEMU refuses it).
                        let kv = parse_value(&name, value.as_deref().unwrap_or_default());
                        let opens = kv.as_deref().unwrap_or_default().iter().any(|(k, v)| {
                            ["file", "filename", "file.filename"].contains(&k.as_str())
                                && v == "/img/d.raw"
                        });
                        proptest::prop_assert!(!(transfer && opens), "{line}");
                    }
                    let ours = |o: &str| ["-qmp", "-incoming", "-S"].contains(&canonical(o).as_str());
                    let n = back.len();
                    proptest::prop_assert!(n >= 3, "{}", line);
                    proptest::prop_assert!(!back[..n - 3].iter().any(|(o, _)| ours(o)), "{}", line);
                    proptest::prop_assert!(line.ends_with("-qmp unix:/q,server=on,wait=off -incoming defer -S"));
                }
                Err(e) => proptest::prop_assert!(!e.to_string().is_empty()),
            }
        }
    }

    #[test]
    fn option_strings_follow_qemu_escaping() {
        assert_eq!(
            parse_opts("virtio-blk-pci,drive=d0,serial=a,,b"),
            vec![
                (String::new(), "virtio-blk-pci".to_string()),
                ("drive".to_string(), "d0".to_string()),
                ("serial".to_string(), "a,b".to_string()),
            ]
        );
    }
}
