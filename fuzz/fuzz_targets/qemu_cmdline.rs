#![no_main]
//! `trustmig qemu destination-command` over any command line: NUL-separated arguments, the
//! first of which lists the transferred images (`:`-separated). A typed error or a command
//! line that ends with our QMP socket and `-incoming defer -S`, never a panic; and the
//! redacted form of any command line (what `start-destination` logs).
use std::path::{Path, PathBuf};

use trustmig_qemu::cmdline::{destination_command, redacted, shell_line};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\0');
    let images: Vec<PathBuf> = parts
        .next()
        .unwrap_or_default()
        .split(':')
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .collect();
    let args: Vec<String> = parts.map(str::to_string).collect();
    // What start-destination logs: one argument for each, secrets hidden.
    assert_eq!(redacted(&args).len(), args.len());
    match destination_command("qemu", &args, Path::new("/q"), &images) {
        Ok(d) => {
            let tail = [
                "-qmp",
                "unix:/q,server=on,wait=off",
                "-incoming",
                "defer",
                "-S",
            ];
            assert!(d.args.ends_with(&tail.map(String::from)), "{:?}", d.args);
            assert!(!shell_line(&d.args).is_empty());
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
