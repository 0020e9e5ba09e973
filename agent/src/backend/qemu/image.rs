//! A disk image's guest-visible content, hashed for `verify = "full"` (spec/qemu.md §5): what
//! the guest reads from it over its whole virtual size, whatever the format keeps on disk. Two
//! qcow2 files with the same content differ byte-wise (clusters lie where each was allocated),
//! so the file is not hashed as such: `qemu-img map` says which ranges hold data and where in
//! the file, and unallocated or zero ranges read as zeros.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use trustmig_protocol::hvstream::StreamDigest;
use trustmig_protocol::manifest::DiskFormat;
use trustmig_qemu::img::{external_data_file, parse_map, Extent, ImgError};

use super::QEMU_IMG;

/// Bytes read (or zeros hashed) at a time.
const STEP: usize = 1 << 20;

/// An image could not be checked or hashed as the guest sees it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// `qemu-img` could not be run (not installed, not executable).
    #[error("{QEMU_IMG} not found or not runnable ({action}: {source}); install qemu-utils")]
    NotRunnable {
        /// Its subcommand.
        action: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// `qemu-img` ran and failed.
    #[error("{QEMU_IMG} {action} {}: {stderr}", path.display())]
    Failed {
        /// Its subcommand.
        action: &'static str,
        /// The image.
        path: PathBuf,
        /// What it said.
        stderr: String,
    },
    /// `qemu-img`'s answer does not describe an image that can be read as the guest sees it
    /// (unreadable, not covering the virtual size, compressed or encrypted ranges).
    #[error("{QEMU_IMG} {action} {}: {source}", path.display())]
    Layout {
        /// Its subcommand.
        action: &'static str,
        /// The image.
        path: PathBuf,
        /// What is wrong with it.
        source: ImgError,
    },
    /// `qemu-img --version` ran and failed.
    #[error("{QEMU_IMG} --version failed: {stderr}")]
    VersionFailed {
        /// What it said.
        stderr: String,
    },
    /// A qcow2 image that keeps its data in another file.
    #[error("{} keeps its data in an external data file ({file}); verify = \"full\" reads self-contained images only", path.display())]
    ExternalDataFile {
        /// The image.
        path: PathBuf,
        /// The data file it names.
        file: String,
    },
    /// The image file could not be opened, read or (fault injection) written.
    #[error("{}: {what}: {source}", path.display())]
    File {
        /// The image.
        path: PathBuf,
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
}

impl ImageError {
    fn file(path: &Path, what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let (path, what) = (path.to_path_buf(), what.into());
        move |source| Self::File { path, what, source }
    }
}

/// Where each range of the image's first `virtual_size` guest bytes comes from
/// (`trustmig_qemu::img::parse_map` checks it). `-U` (share the image): QEMU has it open, with
/// the guest stopped or the image inactive.
fn map(path: &Path, format: DiskFormat, virtual_size: u64) -> Result<Vec<Extent>, ImageError> {
    let out = qemu_img(&["map", "--output=json", "-U", "-f", format.as_str()], path)?;
    parse_map(&out, virtual_size).map_err(|source| ImageError::Layout {
        action: "map",
        path: path.to_path_buf(),
        source,
    })
}

/// `qemu-img ARGS PATH`'s standard output, or what went wrong, named.
fn qemu_img(args: &[&'static str], path: &Path) -> Result<Vec<u8>, ImageError> {
    let action = args[0];
    let out = Command::new(QEMU_IMG)
        .args(args)
        .arg(path)
        .output()
        .map_err(|source| ImageError::NotRunnable { action, source })?;
    if !out.status.success() {
        return Err(ImageError::Failed {
            action,
            path: path.to_path_buf(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out.stdout)
}

/// The slowest rate (bytes/s) at which an image may be read and hashed for `verify = "full"`
/// before the step counts as hung: each hash may take the step timeout plus its virtual size at
/// this rate (20 s per GiB), and the source waits that much longer for the destination's
/// `FinalChallenge`.
const SLOWEST_HASH_BPS: u64 = 50_000_000;

/// What hashing `bytes` of images in full may take beyond a step's timeout.
pub(crate) fn hash_allowance(bytes: u64) -> std::time::Duration {
    std::time::Duration::from_millis(bytes / (SLOWEST_HASH_BPS / 1000))
}

/// `qemu-img` runs (the destination checks before it creates anything for a disk verified in
/// full).
pub(crate) fn available() -> Result<(), ImageError> {
    let action = "--version";
    match Command::new(QEMU_IMG).arg(action).output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(ImageError::VersionFailed {
            stderr: String::from_utf8_lossy(&o.stderr).trim().to_owned(),
        }),
        Err(source) => Err(ImageError::NotRunnable { action, source }),
    }
}

/// Before anything moves (source, `verify = "full"`): the image can be hashed as the guest
/// sees it at the switch-over. `qemu-img` is there and maps the whole virtual size; no range
/// is compressed or encrypted (no file offset to read); a qcow2 keeps its data in its own file
/// (an external data file's offsets point elsewhere). Found only at the switch-over, each of
/// these would roll back a finished move with the guest paused.
pub(crate) fn preflight(
    path: &Path,
    format: DiskFormat,
    virtual_size: u64,
) -> Result<(), ImageError> {
    map(path, format, virtual_size)?;
    if format == DiskFormat::Qcow2 {
        let info = qemu_img(&["info", "--output=json", "-U", "-f", "qcow2"], path)?;
        let layout = |source| ImageError::Layout {
            action: "info",
            path: path.to_path_buf(),
            source,
        };
        if let Some(file) = external_data_file(&info).map_err(layout)? {
            return Err(ImageError::ExternalDataFile {
                path: path.to_path_buf(),
                file,
            });
        }
    }
    Ok(())
}

/// The digest of the image's guest-visible content: its `virtual_size` bytes as the guest
/// reads them.
pub(crate) fn guest_digest(
    path: &Path,
    format: DiskFormat,
    virtual_size: u64,
) -> Result<StreamDigest, ImageError> {
    let extents = map(path, format, virtual_size)?;
    let file = std::fs::File::open(path).map_err(ImageError::file(path, "opening it"))?;
    let mut digest = StreamDigest::new();
    let zeros = vec![0u8; STEP];
    let mut buf = vec![0u8; STEP];
    for e in &extents {
        let mut left = e.length;
        let from = e.file_offset();
        while left > 0 {
            let n = usize::try_from(left).map_or(STEP, |l| l.min(STEP));
            match from {
                None => digest.update(&zeros[..n]),
                Some(offset) => {
                    // No overflow: `parse_map` checked offset + length.
                    let at = offset + (e.length - left);
                    file.read_exact_at(&mut buf[..n], at)
                        .map_err(ImageError::file(path, format!("reading {n} bytes at {at}")))?;
                    digest.update(&buf[..n]);
                }
            }
            left -= n as u64;
        }
    }
    Ok(digest)
}

/// Fault injection (the destination's copy diverged after its NBD stream ended): flip the
/// first byte the guest would read from data, where it lies in the file; `None` when the
/// image holds no data.
pub(crate) fn flip_first_data_byte(
    path: &Path,
    format: DiskFormat,
    virtual_size: u64,
) -> Result<Option<u64>, ImageError> {
    let Some(at) = map(path, format, virtual_size)?
        .iter()
        .find_map(Extent::file_offset)
    else {
        return Ok(None);
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(ImageError::file(path, "opening it to alter"))?;
    let mut b = [0u8; 1];
    file.read_exact_at(&mut b, at)
        .and_then(|()| file.write_all_at(&[!b[0]], at))
        .map_err(ImageError::file(path, format!("altering the byte at {at}")))?;
    Ok(Some(at))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> bool {
        Command::new(args[0])
            .args(&args[1..])
            .status()
            .is_ok_and(|s| s.success())
    }

    /// `qemu-img create -f qcow2 [-o OPTIONS] PATH SIZE`; false when qemu-img is missing.
    fn qcow2(path: &str, size: &str, options: Option<&str>) -> bool {
        let mut args = vec![QEMU_IMG, "create", "-q", "-f", "qcow2"];
        args.extend(options.map(|o| ["-o", o]).into_iter().flatten());
        args.extend([path, size]);
        run(&args)
    }

    /// The digest is the guest's view, pinned against QEMU's own: a qcow2 image with data,
    /// zeros and holes hashes as its `qemu-img convert -O raw` image does, byte for byte.
    #[test]
    fn a_qcow2_image_hashes_as_the_raw_bytes_the_guest_reads() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("d.qcow2");
        let r = dir.path().join("d.raw");
        let (qs, rs) = (q.to_str().unwrap(), r.to_str().unwrap());
        if !qcow2(qs, "4M", None) {
            eprintln!("skipped: {QEMU_IMG} missing");
            assert!(std::env::var_os("CI").is_none(), "{QEMU_IMG} missing in CI");
            return;
        }
        // Data out of order (clusters land in the file in write order), a zero cluster.
        for cmd in [
            "write -P 0x5a 3M 64k",
            "write -P 0x11 0 4k",
            "write -z 1M 64k",
            "write -P 0x22 2M 100k",
        ] {
            assert!(run(&["qemu-io", "-f", "qcow2", "-c", cmd, qs]), "{cmd}");
        }
        assert!(run(&[
            QEMU_IMG, "convert", "-f", "qcow2", "-O", "raw", qs, rs
        ]));
        let raw = std::fs::read(&r).unwrap();
        assert_eq!(raw.len(), 4 << 20);
        let mut want = StreamDigest::new();
        want.update(&raw);
        let want = want.finish(&[0; 32]);
        let got = guest_digest(&q, DiskFormat::Qcow2, 4 << 20).unwrap();
        assert_eq!(got.len(), 4 << 20);
        assert_eq!(got.finish(&[0; 32]), want, "qcow2 as the guest sees it");
        let got = guest_digest(&r, DiskFormat::Raw, 4 << 20).unwrap();
        assert_eq!(got.finish(&[0; 32]), want, "the raw image, holes included");

        // A flipped data byte changes it; a wrong virtual size is refused by name.
        assert!(flip_first_data_byte(&q, DiskFormat::Qcow2, 4 << 20)
            .unwrap()
            .is_some());
        let flipped = guest_digest(&q, DiskFormat::Qcow2, 4 << 20).unwrap();
        assert_ne!(flipped.finish(&[0; 32]), want);
        let e = guest_digest(&q, DiskFormat::Qcow2, 8 << 20).unwrap_err();
        assert!(
            matches!(&e, ImageError::Layout { source: ImgError::Coverage { virtual_size, .. }, .. } if *virtual_size == 8 << 20),
            "{e:?}"
        );
        assert!(e.to_string().contains("virtual size is 8388608"), "{e}");
        let none = dir.path().join("none");
        let e = guest_digest(&none, DiskFormat::Raw, 512).unwrap_err();
        assert!(
            matches!(&e, ImageError::Failed { action: "map", path, .. } if *path == none),
            "{e:?}"
        );
        assert!(e.to_string().contains("none"), "{e}");
    }

    /// Layouts qemu-img maps differently hash the same when the guest reads the same: metadata
    /// preallocation (`data` and `zero` both set) against a plain empty image; and the ones
    /// that cannot be read from the image file are refused before anything moves.
    #[test]
    fn layouts_hash_as_the_guest_reads_them_or_are_refused_up_front() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        let s = |n: &str| p(n).display().to_string();
        if !qcow2(&s("plain.qcow2"), "2M", None) {
            eprintln!("skipped: {QEMU_IMG} missing");
            assert!(std::env::var_os("CI").is_none(), "{QEMU_IMG} missing in CI");
            return;
        }
        let digest = |n: &str| {
            let d = guest_digest(&p(n), DiskFormat::Qcow2, 2 << 20).unwrap();
            d.finish(&[0; 32])
        };
        let prealloc = s("prealloc.qcow2");
        assert!(qcow2(&prealloc, "2M", Some("preallocation=metadata")));
        assert_eq!(digest("prealloc.qcow2"), digest("plain.qcow2"), "all zeros");
        preflight(&p("prealloc.qcow2"), DiskFormat::Qcow2, 2 << 20).expect("self-contained");
        // Compressed: written by `qemu-img convert -c`.
        assert!(run(&[
            "qemu-io",
            "-f",
            "qcow2",
            "-c",
            "write -P 0x33 0 64k",
            &s("plain.qcow2")
        ]));
        let packed = s("packed.qcow2");
        assert!(run(&[
            QEMU_IMG,
            "convert",
            "-c",
            "-O",
            "qcow2",
            &s("plain.qcow2"),
            &packed
        ]));
        let e = preflight(&p("packed.qcow2"), DiskFormat::Qcow2, 2 << 20).unwrap_err();
        assert!(
            matches!(
                &e,
                ImageError::Layout {
                    source: ImgError::NoFileOffset { .. },
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("compressed or encrypted"), "{e}");
        // Encrypted (LUKS in qcow2): `qemu-img` cannot open it without its secret, which the
        // agent does not have: refused before anything moves, with qemu-img's own reason.
        // (qemu-img 7.2 times its key derivation by its CPU time and fails at once, "Unable to
        // get accurate CPU usage", when that did not advance: 2 creations in 5 here. Again.)
        let encrypted = (0..10).any(|_| {
            run(&[
                QEMU_IMG,
                "create",
                "-q",
                "-f",
                "qcow2",
                "--object",
                "secret,id=sec0,data=abc",
                "-o",
                "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
                &s("enc.qcow2"),
                "2M",
            ])
        });
        assert!(encrypted, "qemu-img could not create an encrypted image");
        let e = preflight(&p("enc.qcow2"), DiskFormat::Qcow2, 2 << 20).unwrap_err();
        assert!(e.to_string().contains("encrypt.key-secret"), "{e}");
        // An external data file: the offsets point into it, not into the image file.
        let data = s("data.raw");
        let opts = format!("data_file={data}");
        assert!(qcow2(&s("ext.qcow2"), "2M", Some(&opts)));
        let e = preflight(&p("ext.qcow2"), DiskFormat::Qcow2, 2 << 20).unwrap_err();
        assert!(
            matches!(&e, ImageError::ExternalDataFile { file, .. } if *file == data),
            "{e:?}"
        );
        assert!(e.to_string().contains("external data file"), "{e}");
    }
}
