//! QEMU sidecar mode: trustmig carries QEMU's own migration stream through the attested
//! session and gates the switch-over. spec: spec/qemu.md, SPEC.md §8.5.1
//!
//! ```text
//! source QEMU --unix--> source agent ==sealed HypervisorStream records, stream 0==> destination agent --unix--> destination QEMU
//!             <--unix-- (return path) <==sealed records, same TCP connection, D->S keys== <--unix--
//! ```
//! Source (`source.rs`): the agent listens on a unix socket in its home, sets `return-path`
//! and `events` (and `pause-before-switchover` with mirrors or a paused guest), a
//! `downtime-limit` on the ladder up to the order's target and the order's `max-bandwidth`,
//! then `migrate uri=unix:PATH`. QEMU pre-copies by itself; the agent reports `query-migrate`
//! as progress and applies the order's non-convergence action. The guest's `STOP` (or, with the
//! pause, `pre-switchover`, where the mirrors complete and `migrate-continue` lets QEMU go on)
//! is the switch-over. The agent waits for QEMU's completion and the stream's end, because the
//! final digest must cover every stream byte, the device state included. With the
//! return path, the source QEMU completes only after the destination QEMU loaded everything.
//! Then SwitchOver, FinalChallenge, FinalEvidence over the digest of the whole stream, Ready,
//! journalled Commit. Before Commit any failure cancels the migration and runs `cont` on the
//! source; after it the source QEMU stays stopped (`postmigrate`) for good.
//!
//! Destination (`dest.rs`): QEMU runs with `-incoming defer -S`; the agent runs `migrate-incoming
//! uri=unix:PATH` (QEMU listens on a path in the agent's home) and feeds it what it opens. It
//! runs `cont` only after the final evidence verified against its own digest of every byte it
//! fed and `Commit` came. On any failure before that it never runs `cont` and discards the
//! destination QEMU with `quit`.

/// The program that creates qcow2 destination images and maps images for `verify = "full"`
/// (Debian: `qemu-utils`).
pub const QEMU_IMG: &str = "qemu-img";

pub(crate) use image::available as qemu_img_available;
pub use image::ImageError;
pub use mirror::verify_allowance;

mod dest;
pub mod disk;
mod giveback;
mod image;
mod mirror;
mod pumps;
mod reconcile;
mod source;

use std::path::{Path, PathBuf};

use trustmig_protocol::order::hex;

use crate::config::Config;
use crate::ctx::Ctx;
use crate::error::AgentError;
use trustmig_qemu::qmp::{Qmp, QmpError};

pub(crate) use dest::QemuDest;
pub(crate) use giveback::resume_given_back;
pub use giveback::Retries;
pub(crate) use reconcile::{by_operator as reconcile_by_operator, reconcile_all, Reconcile};
pub(crate) use source::QemuSource;

/// The QMP socket of `vm` when this agent hosts it with the QEMU backend.
pub fn qemu_vm(config: &Config, vm: &str) -> Option<PathBuf> {
    Some(config.vm(vm)?.qemu()?.qmp.clone())
}

/// What QEMU at `qmp` says of its VM's state, briefly (for `trustmig status`). QEMU's QMP
/// socket serves one client at a time, so while a migration holds it the greeting does not
/// come: that is "busy", not an error of QEMU's; an unreachable QEMU is said so.
pub(crate) async fn status(qmp: &Path) -> String {
    match Qmp::connect(qmp, std::time::Duration::from_secs(1)).await {
        Ok(mut q) => match q.query_status().await {
            Ok(st) => st.status,
            Err(e) => format!("QEMU did not answer: {e}"),
        },
        Err(QmpError::Timeout { .. }) => {
            "busy (its QMP socket is in use, by a migration or another client)".into()
        }
        Err(e) => format!("QEMU not reachable: {e}"),
    }
}

/// Whether a source QEMU's runstate is a stop its migration made: `finish-migrate` (sending
/// the rest, or waiting at `pre-switchover`) or `postmigrate` (done). QEMU sets them for a
/// guest that was already paused too
/// (`qemu_counts_its_last_bitmap_sync_after_the_guest_stopped`). Any other stop (an operator's
/// `stop`, an I/O error, a guest powering off under `-no-shutdown`: `paused`, `io-error`,
/// `shutdown`) is someone else's: QEMU goes on pre-copying through it, and its own rollback
/// does not run such a guest.
fn stopped_by_migration(status: &str) -> bool {
    matches!(status, "finish-migrate" | "postmigrate")
}

/// The directory of the agent's sockets for QEMU (`socket_dir` makes it).
fn sockets_of(home: &crate::home::Home) -> PathBuf {
    home.root().join("qemu")
}

/// A private directory in the agent's home for the unix sockets QEMU talks to.
fn socket_dir(ctx: &Ctx) -> Result<PathBuf, AgentError> {
    use std::os::unix::fs::PermissionsExt;
    let dir = sockets_of(&ctx.home);
    std::fs::create_dir_all(&dir).map_err(AgentError::io(&dir))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(AgentError::io(&dir))?;
    Ok(dir)
}

/// What a unix socket in the agent's socket directory serves. Its file name says it and the
/// order (`<role>-<16 hex digits of the order id>.sock`), so that a start can tell the files
/// a killed agent left from an operator's (`clear_sockets`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SocketRole {
    /// Source: QEMU's outgoing migration stream (`out`).
    Out,
    /// Destination: QEMU's incoming migration stream (`in`).
    In,
    /// Destination: QEMU's NBD server for the mirrored disks (`nbd`).
    NbdServer,
    /// Source: the relay of mirrored disk `i` (`nbd<i>`).
    NbdRelay(usize),
}

impl SocketRole {
    /// The roles without a parameter; `NbdRelay` is read by its digits.
    const FIXED: [Self; 3] = [Self::Out, Self::In, Self::NbdServer];

    fn prefix(self) -> String {
        match self {
            Self::Out => "out".into(),
            Self::In => "in".into(),
            Self::NbdServer => "nbd".into(),
            Self::NbdRelay(i) => format!("nbd{i}"),
        }
    }

    /// The socket's file name for an order.
    fn file_name(self, order_id: &[u8; 16]) -> String {
        format!("{}-{}.sock", self.prefix(), &hex(order_id)[..16])
    }

    /// The role of a file name `file_name` makes; `None` for any other name.
    fn of_file(name: &str) -> Option<Self> {
        let (prefix, rest) = name.split_once('-')?;
        let id = rest.strip_suffix(".sock")?;
        // Exactly as `file_name` writes them: lowercase hex, no leading zero in a relay's index
        // (an operator's `nbd00-….sock` or `OUT-….sock` is theirs).
        let hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
        if id.len() != 16 || !id.bytes().all(hex) {
            return None;
        }
        let relay = || {
            let i = prefix.strip_prefix("nbd")?;
            let n: usize = i
                .parse()
                .ok()
                .filter(|_| i.bytes().all(|b| b.is_ascii_digit()))?;
            (n.to_string() == i).then_some(Self::NbdRelay(n))
        };
        Self::FIXED
            .into_iter()
            .find(|r| r.prefix() == prefix)
            .or_else(relay)
    }
}

/// The path of the socket `role` of an order in `dir` (nothing there yet), removed when the
/// returned guard drops.
fn socket_path(
    dir: &Path,
    role: SocketRole,
    order_id: &[u8; 16],
) -> Result<SocketFile, AgentError> {
    let p = dir.join(role.file_name(order_id));
    if p.as_os_str().len() > 107 {
        return Err(AgentError::Migration(format!(
            "unix socket path {} is too long (107 bytes at most): use a shorter agent home",
            p.display()
        )));
    }
    let _ = std::fs::remove_file(&p);
    Ok(SocketFile(p))
}

/// A unix socket's file in the agent's socket directory, removed when this drops: a socket
/// serves one migration, and neither a task aborted while it waits for QEMU to connect nor a
/// socket QEMU's NBD server listens on (removed here, not left to QEMU) may leave its file.
#[derive(Debug)]
pub(crate) struct SocketFile(PathBuf);

impl SocketFile {
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// At start, with the home locked to this agent and no migration under way: the socket files
/// an agent killed mid-migration left (nothing else listens on them). Only names
/// `socket_path` makes (`SocketRole::of_file`): an operator may keep other sockets there (a
/// QMP socket, say).
pub(crate) fn clear_sockets(home: &crate::home::Home) {
    let Ok(entries) = std::fs::read_dir(sockets_of(home)) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name()
            .to_str()
            .is_some_and(|n| SocketRole::of_file(n).is_some())
        {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A record of VM `q`: order `order` (a hex byte, repeated), `role`, `state`, its QEMU fed.
    pub(crate) fn record(order: &str, role: &str, state: &str) -> crate::journal::Record {
        serde_json::from_value(serde_json::json!({
            "order_id": order.repeat(16), "role": role, "vm": "q", "state": state,
            "not_after": 0, "at": 0, "fed": true,
        }))
        .expect("record")
    }

    /// A journal in `dir` with `records` (order, role, state; see `record`).
    pub(crate) fn journal(dir: &Path, records: &[(&str, &str, &str)]) -> crate::journal::Journal {
        let mut j = crate::journal::Journal::open(&dir.join("journal")).expect("journal");
        for (order, role, state) in records {
            j.append(record(order, role, state)).expect("append");
        }
        j
    }

    /// QEMU 7.2's QMP greeting, for the fake QEMUs of this module's tests.
    pub(crate) const GREETING: &[u8] = b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 7}}, \"capabilities\": []}}\n";

    /// A fake QEMU on a QMP socket in a temp dir, for any number of connections: it greets
    /// each as QEMU 7.2 does and accepts `qmp_capabilities`, then answers each command with
    /// `answer(command, request)`, the reply's `return` or `error` member (the id is added
    /// here); `None` leaves it unanswered (a QEMU holding its big lock).
    pub(crate) fn fake_qmp<F>(answer: F) -> (tempfile::TempDir, PathBuf)
    where
        F: Fn(&str, &serde_json::Value) -> Option<serde_json::Value> + Send + Sync + 'static,
    {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("qmp.sock");
        let l = tokio::net::UnixListener::bind(&path).expect("bind");
        let answer = std::sync::Arc::new(answer);
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let answer = answer.clone();
                tokio::spawn(async move {
                    let (rd, mut wr) = s.into_split();
                    let _ = wr.write_all(GREETING).await;
                    let mut lines = BufReader::new(rd).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        let req: serde_json::Value = serde_json::from_str(&line).expect("json");
                        let command = req["execute"].as_str().unwrap_or("");
                        let reply = match command {
                            "qmp_capabilities" => Some(serde_json::json!({"return": {}})),
                            _ => answer(command, &req),
                        };
                        let Some(mut reply) = reply else { continue };
                        // Events QEMU sends before it answers (`"_events": [...]`).
                        let mut out = String::new();
                        if let Some(evs) = reply.as_object_mut().and_then(|r| r.remove("_events")) {
                            for e in evs.as_array().into_iter().flatten() {
                                out += &format!("{e}\n");
                            }
                        }
                        reply["id"] = req["id"].clone();
                        out += &format!("{reply}\n");
                        if wr.write_all(out.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (dir, path)
    }

    /// A socket's file goes with its guard, also when the task holding it is aborted while it
    /// waits for QEMU (before, a relay aborted before `accept` left `nbd<i>-<id>.sock`).
    #[tokio::test]
    async fn a_socket_file_goes_with_an_aborted_task() {
        let dir = tempfile::tempdir().expect("tmp");
        let sock = socket_path(dir.path(), SocketRole::NbdRelay(0), &[7; 16]).expect("path");
        let path = sock.path().to_path_buf();
        let listener = tokio::net::UnixListener::bind(&path).expect("bind");
        let waiting = tokio::spawn(async move {
            let _sock = sock;
            let _ = listener.accept().await;
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(path.exists());
        waiting.abort();
        let _ = waiting.await;
        assert!(!path.exists(), "{} left", path.display());
    }

    /// The file-name reader takes any name without panicking, and what it accepts is exactly
    /// a name `file_name` makes (its role, and the 16 hex digits of an order id). Names come
    /// from the agent's own private directory, not the network: a property test here, no
    /// fuzz target (the fuzz build leaves out the agent crate and its TPM libraries).
    #[test]
    fn only_names_the_agent_makes_are_read_as_its_sockets() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let alphabet = b"outinbd0123456789abcdefABCDEF-._x";
        let mut accepted = 0;
        for i in 0..20_000 {
            // Half the names start from a real one, mutated; half are anything.
            let mut name: Vec<u8> = if i % 2 == 0 {
                SocketRole::NbdRelay((next() % 20) as usize)
                    .file_name(&[(next() & 0xff) as u8; 16])
                    .into_bytes()
            } else {
                Vec::new()
            };
            for _ in 0..(next() % 4) {
                let c = alphabet[(next() % alphabet.len() as u64) as usize];
                match next() % 3 {
                    0 if !name.is_empty() => {
                        let at = (next() % name.len() as u64) as usize;
                        name[at] = c;
                    }
                    1 if !name.is_empty() => {
                        name.remove((next() % name.len() as u64) as usize);
                    }
                    _ => name.push(c),
                }
            }
            let Ok(name) = String::from_utf8(name) else {
                continue;
            };
            if let Some(role) = SocketRole::of_file(&name) {
                accepted += 1;
                let id = &name[name.len() - 21..name.len() - 5];
                let id: [u8; 8] = ::hex::decode(id).expect("hex").try_into().expect("8 bytes");
                let mut full = [0u8; 16];
                full[..8].copy_from_slice(&id);
                assert_eq!(role.file_name(&full), name, "{name:?} read as {role:?}");
            }
        }
        assert!(
            accepted > 1000,
            "the test hardly reached real names: {accepted}"
        );
    }

    /// At start, the socket files a killed agent left go; nothing else in the directory does
    /// (an operator's QMP socket kept there, say).
    #[test]
    fn a_start_clears_the_sockets_a_killed_agent_left() {
        let tmp = tempfile::tempdir().expect("tmp");
        let home = crate::home::Home::at(tmp.path());
        let dir = sockets_of(&home);
        std::fs::create_dir_all(&dir).expect("dir");
        // Every role's file, as `socket_path` names it.
        let roles = SocketRole::FIXED
            .into_iter()
            .chain([SocketRole::NbdRelay(0), SocketRole::NbdRelay(12)]);
        let left: Vec<_> = roles
            .map(|r| {
                let f = socket_path(&dir, r, &[0xab; 16]).expect("path");
                assert_eq!(SocketRole::of_file(&r.file_name(&[0xab; 16])), Some(r));
                f.path().to_path_buf()
            })
            .collect();
        let kept: Vec<_> = [
            "notes.txt",
            "vm.qmp.sock",
            "in-01.sock",
            "nbdx-0101010101010101.sock",
            "nbd-0101010101010101.socket",
            "out-01010101010101010.sock",
            "-0101010101010101.sock",
            "nbd00-0101010101010101.sock",
            "OUT-0101010101010101.sock",
            "in-ABCDEF0123456789.sock",
        ]
        .iter()
        .map(|n| dir.join(n))
        .collect();
        for f in left.iter().chain(&kept) {
            std::fs::write(f, b"").expect("file");
        }
        clear_sockets(&home);
        assert!(left.iter().all(|f| !f.exists()), "{left:?}");
        assert!(kept.iter().all(|f| f.exists()), "{kept:?}");
    }

    proptest::proptest! {
        /// A start removes a file only if it is a name the agent makes: whatever the name,
        /// `of_file` either refuses it or reads a role whose name for the order in it is that
        /// very name; and every name the agent makes reads back as its role.
        #[test]
        fn only_names_the_agent_makes_read_as_its_sockets(
            name in "(out|in|nbd[0-9]{0,3}|[a-zA-Z0-9]{0,4})-[0-9a-fA-F]{14,18}\\.sock(et)?",
            role in 0usize..5,
            id in proptest::array::uniform16(proptest::num::u8::ANY),
        ) {
            if let Some(r) = SocketRole::of_file(&name) {
                let digits = &name[name.find('-').unwrap() + 1..name.len() - ".sock".len()];
                let mut id = [0u8; 16];
                ::hex::decode_to_slice(digits, &mut id[..8]).unwrap();
                proptest::prop_assert_eq!(r.file_name(&id), name.clone());
            }
            let r = [
                SocketRole::Out,
                SocketRole::In,
                SocketRole::NbdServer,
                SocketRole::NbdRelay(0),
                SocketRole::NbdRelay(role * 37),
            ][role];
            proptest::prop_assert_eq!(SocketRole::of_file(&r.file_name(&id)), Some(r));
        }
    }
}
