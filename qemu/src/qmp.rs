//! An async QMP client (QEMU Machine Protocol) over a unix socket.
//!
//! JSON lines: a greeting, `qmp_capabilities`, then commands tagged with an `id`; replies are
//! `{"return": ..}` or `{"error": {"class", "desc"}}`, and asynchronous `{"event": ..}` lines may
//! come in between (they are queued). Every step has a timeout. An `error` reply becomes
//! [`QmpError::Qemu`] with QEMU's own class and message; anything that is not the expected JSON
//! becomes [`QmpError::Malformed`] quoting what arrived.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// Longest reply line accepted (QEMU's largest replies are far below this).
pub const MAX_LINE: u64 = 4 << 20;

/// What can go wrong talking to QEMU.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QmpError {
    /// The QMP socket could not be opened.
    #[error("cannot connect to QMP socket {}: {source} (is QEMU running with `-qmp unix:{},server=on,wait=off`?)", path.display(), path.display())]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("QMP {}: {source}", path.display())]
    Io {
        /// Socket path.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// QEMU closed the socket (it exited, or `quit` ran).
    #[error("QMP {}: QEMU closed the connection while waiting for {waiting_for}", path.display())]
    Closed {
        /// Socket path.
        path: PathBuf,
        /// What we were waiting for.
        waiting_for: String,
    },
    /// No answer in time.
    #[error("QMP {}: no answer to {waiting_for} {ended}", path.display())]
    Timeout {
        /// Socket path.
        path: PathBuf,
        /// What we were waiting for.
        waiting_for: String,
        /// Why the wait ended.
        ended: WaitEnded,
    },
    /// QEMU refused a command.
    #[error("QEMU refused {command}: {desc} ({class})")]
    Qemu {
        /// The command.
        command: String,
        /// QEMU's error class (`GenericError`, `CommandNotFound`, ...).
        class: String,
        /// QEMU's own message.
        desc: String,
    },
    /// A line that is not the QMP we expect.
    #[error("malformed QMP {context}: {reason}: {line}")]
    Malformed {
        /// What was being read.
        context: String,
        /// What is wrong with it.
        reason: String,
        /// The offending text (truncated).
        line: String,
    },
}

/// An asynchronous QMP event.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// Event name, e.g. `MIGRATION`, `STOP`, `RESUME`.
    pub name: String,
    /// Its data (`null` when absent).
    pub data: Value,
    /// When QEMU emitted it (its `timestamp`; `None` when absent or malformed).
    pub at: Option<SystemTime>,
}

impl Event {
    /// For a `MIGRATION` event, the new migration status (`pre-switchover`, `completed`, ...).
    pub fn migration_status(&self) -> Option<MigrationStatus> {
        if self.name != "MIGRATION" {
            return None;
        }
        self.data
            .get("status")
            .and_then(Value::as_str)
            .map(MigrationStatus::parse)
    }
}

/// QMP's `{"seconds": s, "microseconds": us}` as a time.
fn timestamp(v: Option<&Value>) -> Option<SystemTime> {
    let v = v?;
    let s = v.get("seconds")?.as_u64()?;
    let us = v.get("microseconds")?.as_u64()?;
    // Checked: a bogus timestamp from QEMU is no timestamp, not an overflow panic.
    if us >= 1_000_000 {
        return None;
    }
    UNIX_EPOCH.checked_add(Duration::from_secs(s) + Duration::from_micros(us))
}

/// `query-status` reply.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct StatusInfo {
    /// Whether the vCPUs run.
    pub running: bool,
    /// Run state: `running`, `paused`, `inmigrate`, `postmigrate`, `finish-migrate`, ...
    pub status: String,
}

/// RAM statistics of `query-migrate`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct RamStats {
    /// Bytes transferred.
    #[serde(default)]
    pub transferred: u64,
    /// Bytes still to send.
    #[serde(default)]
    pub remaining: u64,
    /// Guest RAM bytes.
    #[serde(default)]
    pub total: u64,
    /// Zero pages found.
    #[serde(default)]
    pub duplicate: u64,
    /// Full pages sent.
    #[serde(default)]
    pub normal: u64,
    /// Page size.
    #[serde(default)]
    pub page_size: u64,
    /// Dirty pages per second.
    #[serde(default)]
    pub dirty_pages_rate: u64,
    /// Throughput, megabits per second.
    #[serde(default)]
    pub mbps: f64,
    /// Dirty-bitmap syncs so far (= rounds started).
    #[serde(default)]
    pub dirty_sync_count: u64,
}

/// `query-migrate` reply (fields QEMU leaves out are `None`).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    /// `none`, `setup`, `active`, `pre-switchover`, `device`, `completed`, `failed`, `cancelled`, ...
    #[serde(default)]
    pub status: Option<String>,
    /// RAM statistics.
    #[serde(default)]
    pub ram: Option<RamStats>,
    /// Predicted downtime, ms.
    #[serde(default)]
    pub expected_downtime: Option<u64>,
    /// Actual downtime, ms (when completed).
    #[serde(default)]
    pub downtime: Option<u64>,
    /// Total time, ms.
    #[serde(default)]
    pub total_time: Option<u64>,
    /// CPU throttle in force.
    #[serde(default)]
    pub cpu_throttle_percentage: Option<u64>,
    /// QEMU's error text when failed.
    #[serde(default)]
    pub error_desc: Option<String>,
}

impl MigrationInfo {
    /// The status, [`MigrationStatus::None`] when QEMU left it out.
    pub fn status(&self) -> MigrationStatus {
        self.status
            .as_deref()
            .map_or(MigrationStatus::None, MigrationStatus::parse)
    }

    /// Whether a migration is under way (QEMU may still stop, send or cancel).
    pub fn in_progress(&self) -> bool {
        self.status().in_progress()
    }
}

/// QEMU's migration status (`MigrationStatus` in QEMU's `qapi/migration.json`), as
/// `query-migrate` and `MIGRATION` events report it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum MigrationStatus {
    /// No migration has run (`none`).
    None,
    /// Setting up (`setup`).
    Setup,
    /// Being cancelled (`cancelling`).
    Cancelling,
    /// Cancelled (`cancelled`).
    Cancelled,
    /// Pre-copying (`active`).
    Active,
    /// Post-copy running (`postcopy-active`).
    PostcopyActive,
    /// Post-copy paused by a failure (`postcopy-paused`).
    PostcopyPaused,
    /// Post-copy recovering (`postcopy-recover`).
    PostcopyRecover,
    /// Done (`completed`): the source sent everything, or the destination loaded it.
    Completed,
    /// Failed (`failed`).
    Failed,
    /// COLO fault tolerance (`colo`).
    Colo,
    /// Stopped before switch-over, waiting for `migrate-continue` (`pre-switchover`).
    PreSwitchover,
    /// Sending device state (`device`).
    Device,
    /// Waiting for a device to unplug (`wait-unplug`).
    WaitUnplug,
    /// A status this client does not know (a newer QEMU), as QEMU spelled it.
    Unknown(String),
}

impl MigrationStatus {
    const NAMES: [(&'static str, Self); 14] = [
        ("none", Self::None),
        ("setup", Self::Setup),
        ("cancelling", Self::Cancelling),
        ("cancelled", Self::Cancelled),
        ("active", Self::Active),
        ("postcopy-active", Self::PostcopyActive),
        ("postcopy-paused", Self::PostcopyPaused),
        ("postcopy-recover", Self::PostcopyRecover),
        ("completed", Self::Completed),
        ("failed", Self::Failed),
        ("colo", Self::Colo),
        ("pre-switchover", Self::PreSwitchover),
        ("device", Self::Device),
        ("wait-unplug", Self::WaitUnplug),
    ];

    /// The status QEMU names `s`.
    pub fn parse(s: &str) -> Self {
        Self::NAMES
            .iter()
            .find(|(n, _)| *n == s)
            .map_or_else(|| Self::Unknown(s.to_string()), |(_, v)| v.clone())
    }

    /// QEMU's name for it.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Unknown(s) => s,
            known => Self::NAMES
                .iter()
                .find(|(_, v)| v == known)
                .map_or("?", |(n, _)| n),
        }
    }

    /// Whether a migration is under way (QEMU may still stop, send or cancel). The states
    /// trustmig's pre-copy can see; post-copy is never enabled.
    pub fn in_progress(&self) -> bool {
        matches!(
            self,
            Self::Setup | Self::Active | Self::PreSwitchover | Self::Device | Self::Cancelling
        )
    }
}

impl std::fmt::Display for MigrationStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `command`'s reply `v` read as a `T`: one of another shape is `Malformed`, naming the command
/// and quoting the reply (clipped).
pub fn typed_reply<T: serde::de::DeserializeOwned>(v: Value, command: &str) -> Result<T, QmpError> {
    serde_json::from_value(v.clone()).map_err(|e| QmpError::Malformed {
        context: command.into(),
        reason: e.to_string(),
        line: clip(&v.to_string()),
    })
}

/// One line from QEMU (with its `\n`) as JSON; a cut, over-long or non-JSON line is `Malformed`.
fn parse_json_line(buf: &[u8], waiting_for: &str) -> Result<Value, QmpError> {
    if buf.last() != Some(&b'\n') {
        return Err(QmpError::Malformed {
            context: waiting_for.into(),
            reason: format!("line longer than {MAX_LINE} bytes or cut"),
            line: clip(&String::from_utf8_lossy(&buf[..buf.len().min(300)])),
        });
    }
    serde_json::from_slice(buf).map_err(|e| QmpError::Malformed {
        context: waiting_for.into(),
        reason: format!("not JSON ({e})"),
        line: clip(&String::from_utf8_lossy(buf)),
    })
}

/// A line read while waiting for QMP's greeting: QEMU's version (`7.2.22`) from the greeting,
/// or `None` for an event, which QEMU 7.2 can send ahead of the greeting on a monitor that
/// connects while a migration runs (seen: `MIGRATION_PASS` first).
fn greeting(v: &Value) -> Result<Option<String>, QmpError> {
    if v.get("event").is_some() {
        return Ok(None);
    }
    let q = v
        .get("QMP")
        .and_then(|g| g.get("version"))
        .and_then(|v| v.get("qemu"))
        .ok_or_else(|| QmpError::Malformed {
            context: "greeting".into(),
            reason: "no QMP.version.qemu".into(),
            line: clip(&v.to_string()),
        })?;
    let part = |name| q.get(name).and_then(Value::as_u64).unwrap_or(0);
    Ok(Some(format!(
        "{}.{}.{}",
        part("major"),
        part("minor"),
        part("micro")
    )))
}

/// Everything the agent does with one line from QEMU, whatever its bytes: parse it, read it
/// as a greeting when it has the greeting's `QMP` member, otherwise classify it (reply, error
/// reply, event) and decode the typed replies it may be. A bad line is a `Malformed` error
/// naming `context` (or "greeting"); nothing panics. For the `qmp_line` fuzz target and the
/// property tests.
#[doc(hidden)]
pub fn handle_line(line: &[u8], context: &str) -> Result<(), QmpError> {
    let v = parse_json_line(line, context)?;
    if v.get("QMP").is_some() {
        return greeting(&v).map(|_| ());
    }
    match Qmp::classify(v, context)? {
        Line::Return(_, r) => {
            if let Ok(m) = Qmp::parse::<MigrationInfo>(r.clone(), context) {
                let _ = m.status();
            }
            let _ = Qmp::parse::<StatusInfo>(r, context);
        }
        Line::Event(e) => {
            let _ = (e.migration_status(), e.at);
        }
        Line::Error(..) => {}
    }
    Ok(())
}

impl QmpError {
    /// Whether this says QEMU is gone: it closed the connection (it exited, `quit` ran), or
    /// nothing listens on its socket any more (the file gone, or no process behind it).
    pub fn qemu_gone(&self) -> bool {
        match self {
            Self::Closed { .. } => true,
            Self::Connect { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ),
            _ => false,
        }
    }
}

/// Work a caller watches that lets a wait run past its timeout: a counter it sees move (the
/// bytes a migration moved) and the latest any such wait may end. Each wait takes its own
/// [`Patience`] ([`Moving::begin`]).
#[derive(Clone, Debug)]
pub struct Moving {
    /// The counter.
    pub counter: Arc<AtomicU64>,
    /// No wait extends past this.
    pub cap: tokio::time::Instant,
}

impl Moving {
    /// A wait starting now.
    pub fn begin(&self) -> Patience {
        Patience {
            seen: self.counter.load(Ordering::Relaxed),
            moving: self.clone(),
            window: None,
        }
    }
}

/// One wait's view of a [`Moving`].
#[derive(Debug)]
pub struct Patience {
    moving: Moving,
    seen: u64,
    /// The length of the window that ends at the next deadline, if an extension set it (the
    /// cap may have cut it short); before any, the caller's timeout.
    window: Option<Duration>,
}

impl Patience {
    /// A deadline ran out at `at`: the next one, `timeout` later but never past the cap, if the
    /// counter moved since the wait began (or since the last extension); otherwise the wait
    /// ends, and the error says which of the two ended it. So a wait ends one to two timeouts
    /// after the counter stopped.
    pub fn extend(
        &mut self,
        at: tokio::time::Instant,
        timeout: Duration,
    ) -> Result<tokio::time::Instant, WaitEnded> {
        // Standing still first: a QEMU that stopped is what to look at, cap or not, for as
        // long as the window it stood still in (the cap may have cut that short).
        let now = self.moving.counter.load(Ordering::Relaxed);
        if now == self.seen {
            return Err(WaitEnded::StoodStill(self.window.unwrap_or(timeout)));
        }
        if at >= self.moving.cap {
            return Err(WaitEnded::Cap);
        }
        self.seen = now;
        let next = (at + timeout).min(self.moving.cap);
        self.window = Some(next - at);
        Ok(next)
    }
}

/// Why a wait ended without its answer. The two call for different looks: a QEMU (or peer)
/// that stopped, or a migration that moved all along but ran out of its time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitEnded {
    /// Nothing moved (or nothing was counted) for this long.
    StoodStill(Duration),
    /// The data still moved, but the migration's time cap ([`Moving::cap`]) was reached.
    Cap,
}

impl std::fmt::Display for WaitEnded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::StoodStill(t) => write!(f, "within {} s", t.as_secs_f32()),
            Self::Cap => {
                f.write_str("before the migration's time limit ran out (its data was still moving)")
            }
        }
    }
}

/// Events kept for the caller between its reads of them (`Qmp::queue_event`).
pub const MAX_QUEUED_EVENTS: usize = 1024;

/// Longest event `data` kept, as JSON text; longer data is dropped (`null`) and the event kept.
/// The events the agent reads carry a few dozen bytes (a migration status, a job's id); a queue
/// of `MAX_QUEUED_EVENTS` events of megabytes each would not be bounded in any useful sense.
pub const MAX_EVENT_DATA: usize = 4096;

/// Counts bytes written to it (an event's data measured without keeping its text).
struct Counter(usize);

impl std::io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A connected, negotiated QMP session.
pub struct Qmp {
    rd: BufReader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
    path: PathBuf,
    timeout: Duration,
    next_id: u64,
    events: VecDeque<Event>,
    /// Events dropped from a full queue so far ([`Qmp::dropped_events`]).
    dropped: u64,
    /// A line being read (see `read_json_untimed`).
    line: Vec<u8>,
    /// Work of QEMU's the caller counts, and the latest a reply may come while it moves
    /// (`Qmp::answer_late_while`).
    moving: Option<Moving>,
    /// QEMU's version string from the greeting (`7.2.22`).
    pub version: String,
}

fn clip(s: &str) -> String {
    let mut out: String = s.trim_end().chars().take(300).collect();
    if s.len() > out.len() + 1 {
        out.push('…');
    }
    out
}

enum Line {
    Return(u64, Value),
    Error(u64, String, String),
    Event(Event),
}

impl Qmp {
    /// Connect to `path`, read the greeting and leave negotiation mode. Each step may take up
    /// to `timeout`.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let sock = tokio::time::timeout(timeout, UnixStream::connect(path))
            .await
            .map_err(|_| QmpError::Timeout {
                path: path.to_path_buf(),
                waiting_for: "connect".into(),
                ended: WaitEnded::StoodStill(timeout),
            })?
            .map_err(|source| QmpError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        let (rd, wr) = sock.into_split();
        let mut q = Self {
            rd: BufReader::new(rd),
            wr,
            path: path.to_path_buf(),
            timeout,
            next_id: 1,
            events: VecDeque::new(),
            dropped: 0,
            line: Vec::new(),
            moving: None,
            version: String::new(),
        };
        // Events ahead of the greeting are skipped (`greeting`), within the timeout for the
        // greeting as a whole.
        q.version = tokio::time::timeout(timeout, async {
            loop {
                let v = q.read_json_untimed("greeting").await?;
                if let Some(version) = greeting(&v)? {
                    return Ok::<_, QmpError>(version);
                }
            }
        })
        .await
        .map_err(|_| q.timed_out("greeting", WaitEnded::StoodStill(timeout)))??;
        q.execute("qmp_capabilities", json!({})).await?;
        Ok(q)
    }

    /// Let a command's reply come late while `moving` moves ([`Patience::extend`]): QEMU's
    /// monitor answers only when it holds QEMU's big lock, and a migration's stop-and-copy
    /// holds that lock until its last byte is sent; on a slow link that takes longer than any
    /// fixed timeout, while the caller sees the bytes going (spec/qemu.md §4). `None` ends it.
    pub fn answer_late_while(&mut self, moving: Option<Moving>) {
        self.moving = moving;
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn timed_out(&self, waiting_for: &str, ended: WaitEnded) -> QmpError {
        QmpError::Timeout {
            path: self.path.clone(),
            waiting_for: waiting_for.into(),
            ended,
        }
    }

    /// An I/O error on the socket: QEMU gone if the socket says its peer left. QEMU exiting
    /// with bytes of ours unread resets the socket instead of closing it (seen after `quit`),
    /// and a write to a QEMU that exited fails with a broken pipe; both are QEMU gone, as an
    /// end of file is.
    fn io_error(&self, source: std::io::Error, waiting_for: &str) -> QmpError {
        match source.kind() {
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe => {
                QmpError::Closed {
                    path: self.path.clone(),
                    waiting_for: waiting_for.into(),
                }
            }
            _ => QmpError::Io {
                path: self.path.clone(),
                source,
            },
        }
    }

    /// Read one JSON line. Cancel-safe: a partly read line stays in `self.line` for the next
    /// call, so this can wait for events inside `select!`.
    async fn read_json_untimed(&mut self, waiting_for: &str) -> Result<Value, QmpError> {
        let room = MAX_LINE.saturating_sub(self.line.len() as u64);
        let n = (&mut self.rd)
            .take(room)
            .read_until(b'\n', &mut self.line)
            .await
            .map_err(|source| self.io_error(source, waiting_for))?;
        let buf = std::mem::take(&mut self.line);
        if n == 0 && buf.is_empty() {
            return Err(QmpError::Closed {
                path: self.path.clone(),
                waiting_for: waiting_for.into(),
            });
        }
        parse_json_line(&buf, waiting_for)
    }

    fn classify(v: Value, context: &str) -> Result<Line, QmpError> {
        let bad = |reason: &str, v: &Value| QmpError::Malformed {
            context: context.into(),
            reason: reason.into(),
            line: clip(&v.to_string()),
        };
        let Some(obj) = v.as_object() else {
            return Err(bad("not a JSON object", &v));
        };
        if let Some(name) = obj.get("event") {
            let name = name
                .as_str()
                .ok_or_else(|| bad("event name is not a string", &v))?;
            // Data past its bound is dropped, the event kept: the queue holds up to
            // `MAX_QUEUED_EVENTS`, and a parsed value takes many times its text.
            let data = obj.get("data").filter(|d| {
                let mut size = Counter(0);
                serde_json::to_writer(&mut size, d).is_ok() && size.0 <= MAX_EVENT_DATA
            });
            return Ok(Line::Event(Event {
                name: name.to_string(),
                data: data.cloned().unwrap_or(Value::Null),
                at: timestamp(obj.get("timestamp")),
            }));
        }
        let id = obj.get("id").and_then(Value::as_u64).unwrap_or(0);
        if let Some(r) = obj.get("return") {
            return Ok(Line::Return(id, r.clone()));
        }
        if let Some(e) = obj.get("error") {
            let class = e
                .get("class")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_string();
            let desc = e
                .get("desc")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("error without desc", &v))?
                .to_string();
            return Ok(Line::Error(id, class, desc));
        }
        Err(bad("neither return, error nor event", &v))
    }

    /// Run `command` with `arguments` (an object, or `{}`); returns QEMU's `return` value,
    /// within the timeout for the whole command (events arriving meanwhile do not extend it:
    /// a rate-limited event each second would otherwise keep a hung command waiting; only
    /// counted progress does, `answer_late_while`).
    pub async fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let mut deadline = tokio::time::Instant::now() + self.timeout;
        let mut patience = self.moving.as_ref().map(Moving::begin);
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut line = msg.to_string().into_bytes();
        line.push(b'\n');
        tokio::time::timeout(self.timeout, self.wr.write_all(&line))
            .await
            .map_err(|_| self.timed_out(command, WaitEnded::StoodStill(self.timeout)))?
            .map_err(|source| self.io_error(source, command))?;
        loop {
            let Ok(v) = tokio::time::timeout_at(deadline, self.read_json_untimed(command)).await
            else {
                let ended = match patience.as_mut() {
                    Some(p) => p.extend(deadline, self.timeout),
                    None => Err(WaitEnded::StoodStill(self.timeout)),
                };
                match ended {
                    Ok(later) => deadline = later,
                    Err(ended) => return Err(self.timed_out(command, ended)),
                }
                continue;
            };
            match Self::classify(v?, command)? {
                Line::Event(e) => self.queue_event(e),
                Line::Return(rid, r) if rid == id => return Ok(r),
                Line::Error(rid, class, desc) if rid == id => {
                    return Err(QmpError::Qemu {
                        command: command.into(),
                        class,
                        desc,
                    })
                }
                // A reply to an earlier command that timed out: skip it.
                Line::Return(..) | Line::Error(..) => {}
            }
        }
    }

    /// [`Qmp::execute`], its reply read as a `T`: a reply of another shape is `Malformed`,
    /// naming the command and quoting the reply.
    pub async fn execute_as<T: serde::de::DeserializeOwned>(
        &mut self,
        command: &str,
        arguments: Value,
    ) -> Result<T, QmpError> {
        let v = self.execute(command, arguments).await?;
        Self::parse(v, command)
    }

    async fn execute_unit(&mut self, command: &str, arguments: Value) -> Result<(), QmpError> {
        self.execute(command, arguments).await.map(|_| ())
    }

    fn parse<T: serde::de::DeserializeOwned>(v: Value, command: &str) -> Result<T, QmpError> {
        typed_reply(v, command)
    }

    /// `migrate-set-capabilities`.
    pub async fn migrate_set_capabilities(
        &mut self,
        caps: &[(&str, bool)],
    ) -> Result<(), QmpError> {
        let list: Vec<Value> = caps
            .iter()
            .map(|(c, s)| json!({"capability": c, "state": s}))
            .collect();
        self.execute_unit("migrate-set-capabilities", json!({ "capabilities": list }))
            .await
    }

    /// `migrate-set-parameters` for `auto-converge`: first throttle, increment, ceiling (%).
    pub async fn migrate_set_throttle(
        &mut self,
        initial: u8,
        increment: u8,
        max: u8,
    ) -> Result<(), QmpError> {
        self.execute_unit(
            "migrate-set-parameters",
            json!({
                "cpu-throttle-initial": initial,
                "cpu-throttle-increment": increment,
                "max-cpu-throttle": max,
            }),
        )
        .await
    }

    /// `migrate-set-parameters` with downtime limit (ms) and bandwidth cap (bytes/s).
    pub async fn migrate_set_parameters(
        &mut self,
        downtime_limit_ms: u64,
        max_bandwidth: u64,
    ) -> Result<(), QmpError> {
        self.execute_unit(
            "migrate-set-parameters",
            json!({ "downtime-limit": downtime_limit_ms, "max-bandwidth": max_bandwidth }),
        )
        .await
    }

    /// `migrate uri=...` (source).
    pub async fn migrate(&mut self, uri: &str) -> Result<(), QmpError> {
        self.execute_unit("migrate", json!({ "uri": uri })).await
    }

    /// `migrate-incoming uri=...` (destination started with `-incoming defer`).
    pub async fn migrate_incoming(&mut self, uri: &str) -> Result<(), QmpError> {
        self.execute_unit("migrate-incoming", json!({ "uri": uri }))
            .await
    }

    /// `query-migrate`.
    pub async fn query_migrate(&mut self) -> Result<MigrationInfo, QmpError> {
        let v = self.execute("query-migrate", json!({})).await?;
        Self::parse(v, "query-migrate")
    }

    /// `migrate-continue state=...` (leave `pre-switchover`).
    pub async fn migrate_continue(&mut self, state: &str) -> Result<(), QmpError> {
        self.execute_unit("migrate-continue", json!({ "state": state }))
            .await
    }

    /// `migrate_cancel`.
    pub async fn migrate_cancel(&mut self) -> Result<(), QmpError> {
        self.execute_unit("migrate_cancel", json!({})).await
    }

    /// `cont`: run the vCPUs.
    pub async fn cont(&mut self) -> Result<(), QmpError> {
        self.execute_unit("cont", json!({})).await
    }

    /// `stop`: pause the vCPUs.
    pub async fn stop(&mut self) -> Result<(), QmpError> {
        self.execute_unit("stop", json!({})).await
    }

    /// `query-status`.
    pub async fn query_status(&mut self) -> Result<StatusInfo, QmpError> {
        let v = self.execute("query-status", json!({})).await?;
        Self::parse(v, "query-status")
    }

    /// `quit`: QEMU exits (a closed socket after the command counts as success).
    pub async fn quit(&mut self) -> Result<(), QmpError> {
        match self.execute_unit("quit", json!({})).await {
            Ok(()) | Err(QmpError::Closed { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `quit`, then wait up to `within` for QEMU to close its socket: QEMU closes its monitors
    /// after its block devices, and the process's image locks go with it, so a source waiting
    /// on those locks may `cont` once this returns `Ok`.
    pub async fn quit_and_wait(&mut self, within: Duration) -> Result<(), QmpError> {
        self.quit().await?;
        let waiting_for = "QEMU to exit after quit";
        let exited = tokio::time::timeout(within, async {
            loop {
                match self.read_json_untimed(waiting_for).await {
                    Err(QmpError::Closed { .. }) => return Ok(()),
                    Err(e) => return Err(e),
                    Ok(_) => {} // late events: QEMU is still on its way out
                }
            }
        })
        .await;
        exited.unwrap_or_else(|_| {
            Err(QmpError::Timeout {
                path: self.path.clone(),
                waiting_for: waiting_for.into(),
                ended: WaitEnded::StoodStill(within),
            })
        })
    }

    /// Keep an event that arrived while a command waited for its reply. At most
    /// `MAX_QUEUED_EVENTS` are kept, the oldest dropped first: QEMU sends events on its own
    /// (some at the guest's doing), and a session that issues commands without reading events
    /// must not grow without bound. Whoever waits for a dropped event times out, named; whoever
    /// keeps state from events sees that some went ([`Qmp::dropped_events`]).
    fn queue_event(&mut self, e: Event) {
        if self.events.len() >= MAX_QUEUED_EVENTS {
            self.events.pop_front();
            self.dropped += 1;
        }
        self.events.push_back(e);
    }

    /// How many events this session dropped from a full queue so far: a caller that keeps
    /// state from events (the guest's `STOP` and `RESUME`) reads it from QEMU again when this
    /// grows.
    pub fn dropped_events(&self) -> u64 {
        self.dropped
    }

    /// Events received so far, oldest first (drains the queue).
    pub fn take_events(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }

    /// The newest queued event named `name`, left in the queue (a caller deciding on QEMU's
    /// state may need an event that arrived during its last command before it reads it).
    pub fn queued(&self, name: &str) -> Option<&Event> {
        self.events.iter().rev().find(|e| e.name == name)
    }

    /// Wait up to `within` for the next event (queued ones first).
    pub async fn next_event(&mut self, within: Duration) -> Result<Option<Event>, QmpError> {
        match tokio::time::timeout(within, self.event()).await {
            Ok(r) => r.map(Some),
            Err(_) => Ok(None),
        }
    }

    /// Wait for the next event (queued ones first), however long it takes. Cancel-safe, for
    /// `select!`: QEMU announces migration state changes as `MIGRATION` events (with the
    /// `events` capability), which beats polling `query-migrate` by up to a poll period.
    pub async fn event(&mut self) -> Result<Event, QmpError> {
        if let Some(e) = self.events.pop_front() {
            return Ok(e);
        }
        loop {
            let v = self.read_json_untimed("an event").await?;
            match Self::classify(v, "an event")? {
                Line::Event(e) => return Ok(e),
                // A late reply to a command that timed out.
                Line::Return(..) | Line::Error(..) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    #[test]
    fn migration_statuses_read_back_as_qemu_writes_them() {
        for (name, status) in MigrationStatus::NAMES {
            assert_eq!(MigrationStatus::parse(name), status);
            assert_eq!(status.as_str(), name);
        }
        let newer = MigrationStatus::parse("postcopy-recover-setup");
        assert_eq!(
            newer,
            MigrationStatus::Unknown("postcopy-recover-setup".into())
        );
        assert_eq!(newer.to_string(), "postcopy-recover-setup");
        assert!(!newer.in_progress());
        assert!(MigrationStatus::PreSwitchover.in_progress());
        assert!(!MigrationStatus::Completed.in_progress());
    }

    /// A fake QEMU on a fresh socket: it greets, then `talk` has the connection.
    async fn fake_qemu<F, Fut>(talk: F) -> (tempfile::TempDir, PathBuf)
    where
        F: FnOnce(BufReader<OwnedReadHalf>, OwnedWriteHalf) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        fake_qemu_after(b"", talk).await
    }

    /// [`fake_qemu`], sending `first` ahead of its greeting.
    async fn fake_qemu_after<F, Fut>(first: &'static [u8], talk: F) -> (tempfile::TempDir, PathBuf)
    where
        F: FnOnce(BufReader<OwnedReadHalf>, OwnedWriteHalf) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("qmp.sock");
        let l = UnixListener::bind(&path).expect("bind");
        tokio::spawn(async move {
            let Ok((s, _)) = l.accept().await else { return };
            let (rd, mut wr) = s.into_split();
            let _ = wr.write_all(first).await;
            let _ = wr
                .write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 22, \"minor\": 2, \"major\": 7}}, \"capabilities\": []}}\n")
                .await;
            talk(BufReader::new(rd), wr).await;
        });
        (dir, path)
    }

    /// An event that comes ahead of the greeting (QEMU 7.2, a monitor connecting while a
    /// migration runs) is skipped; the greeting still comes first of what the caller sees.
    #[tokio::test]
    async fn an_event_ahead_of_the_greeting_is_skipped() {
        let ev = b"{\"data\":{\"pass\":1},\"event\":\"MIGRATION_PASS\",\"timestamp\":{\"microseconds\":1,\"seconds\":1}}\n";
        let (_d, path) = fake_qemu_after(ev, |mut rd, mut wr| async move {
            let mut line = String::new();
            let _ = rd.read_line(&mut line).await; // qmp_capabilities
            let _ = wr.write_all(b"{\"return\": {}, \"id\": 1}\n").await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        })
        .await;
        let q = Qmp::connect(&path, Duration::from_secs(5))
            .await
            .expect("connect past the event");
        assert_eq!(q.version, "7.2.22");
    }

    /// The greeting's version is read as QEMU sends it; a greeting without one is named, and
    /// the fuzzed line handler reads greetings the same way.
    #[test]
    fn a_greeting_gives_the_version_or_a_named_error() {
        let real = json!({"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7},
            "package": "Debian 1:7.2+dfsg-7+deb12u12"}, "capabilities": ["oob"]}});
        assert_eq!(greeting(&real).expect("greeting"), Some("7.2.22".into()));
        let event = json!({"event": "MIGRATION_PASS", "data": {"pass": 1}});
        assert_eq!(greeting(&event).expect("event"), None);
        for bad in [json!({"QMP": {}}), json!({"return": {}}), json!(7)] {
            let e = greeting(&bad).expect_err("not a greeting");
            assert!(
                matches!(&e, QmpError::Malformed { context, reason, .. }
                    if context == "greeting" && reason.contains("QMP.version.qemu")),
                "{e:?}"
            );
        }
        let r = handle_line(format!("{real}\n").as_bytes(), "fuzz");
        assert!(r.is_ok(), "{r:?}");
        let e = handle_line(b"{\"QMP\": {\"version\": 1}}\n", "fuzz").expect_err("no version");
        assert!(
            matches!(&e, QmpError::Malformed { context, .. } if context == "greeting"),
            "{e:?}"
        );
    }

    /// QEMU exiting after `quit` with our bytes unread resets the socket (seen with QEMU 7.2):
    /// that is QEMU gone, so `quit_and_wait` succeeds, as it does on a plain end of file.
    #[tokio::test]
    async fn a_reset_after_quit_counts_as_qemu_gone() {
        let (_d, path) = fake_qemu(|mut rd, mut wr| async move {
            let mut line = String::new();
            let _ = rd.read_line(&mut line).await; // qmp_capabilities
            let _ = wr.write_all(b"{\"return\": {}, \"id\": 1}\n").await;
            // Let `quit` arrive, leave it unread, and exit: the kernel resets the connection.
            tokio::time::sleep(Duration::from_millis(100)).await;
        })
        .await;
        let mut q = Qmp::connect(&path, Duration::from_secs(5))
            .await
            .expect("connect");
        q.quit_and_wait(Duration::from_secs(5))
            .await
            .expect("a reset is QEMU gone");
    }

    /// A QEMU that sends events but never answers a command: the command times out once, for
    /// the whole of it, however often an event came.
    #[tokio::test]
    async fn events_do_not_keep_a_command_waiting_past_its_timeout() {
        let (_d, path) = fake_qemu(|mut rd, mut wr| async move {
            let mut line = String::new();
            let _ = rd.read_line(&mut line).await; // qmp_capabilities
            let _ = wr.write_all(b"{\"return\": {}, \"id\": 1}\n").await;
            for _ in 0..100 {
                let ev = b"{\"event\": \"BLOCK_IO_ERROR\", \"timestamp\": {}}\n";
                if wr.write_all(ev).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        let mut q = Qmp::connect(&path, Duration::from_millis(300))
            .await
            .expect("connect");
        let e = q.query_status().await.expect_err("no reply comes");
        assert!(matches!(e, QmpError::Timeout { .. }), "{e:?}");
        assert!(!q.take_events().is_empty(), "the events were kept");
    }

    /// A wait's end names how long nothing moved: the window it stood still in, which the
    /// migration's cap may have cut short.
    #[tokio::test]
    async fn a_wait_that_stood_still_says_for_how_long() {
        let timeout = Duration::from_secs(10);
        let t0 = tokio::time::Instant::now();
        let counter = Arc::new(AtomicU64::new(0));
        let moving = Moving {
            counter: counter.clone(),
            cap: t0 + Duration::from_secs(13),
        };
        // Standing still from the start: the caller's timeout.
        let mut p = moving.begin();
        assert_eq!(
            p.extend(t0 + timeout, timeout),
            Err(WaitEnded::StoodStill(timeout))
        );
        // It moved in the first window, so the next runs to the cap, 3 s on; standing still
        // there is 3 s of it (before, a whole timeout was reported).
        let mut p = moving.begin();
        counter.fetch_add(1, Ordering::Relaxed);
        let next = p.extend(t0 + timeout, timeout).expect("it moved");
        assert_eq!(next, moving.cap);
        assert_eq!(
            p.extend(next, timeout),
            Err(WaitEnded::StoodStill(Duration::from_secs(3)))
        );
        // Moving at the cap: the cap ended it.
        counter.fetch_add(1, Ordering::Relaxed);
        let mut p = moving.begin();
        counter.fetch_add(1, Ordering::Relaxed);
        let next = p.extend(t0 + timeout, timeout).expect("it moved");
        counter.fetch_add(1, Ordering::Relaxed);
        assert_eq!(p.extend(next, timeout), Err(WaitEnded::Cap));
    }

    /// A QEMU that answers `query-status` after 5 timeouts (its big lock held by a long
    /// stop-and-copy): the caller's counter moving keeps the command waiting; a counter that
    /// stops (or none) does not.
    #[tokio::test]
    async fn counted_progress_lets_a_reply_come_late_and_only_while_it_moves() {
        let timeout = Duration::from_millis(200);
        let late = |rounds: u32| async move {
            fake_qemu(move |mut rd, mut wr| async move {
                let mut line = String::new();
                let _ = rd.read_line(&mut line).await; // qmp_capabilities
                let _ = wr.write_all(b"{\"return\": {}, \"id\": 1}\n").await;
                let _ = rd.read_line(&mut line).await; // query-status
                tokio::time::sleep(timeout * rounds).await;
                let reply =
                    b"{\"return\": {\"running\": false, \"status\": \"postmigrate\"}, \"id\": 2}\n";
                let _ = wr.write_all(reply).await;
                tokio::time::sleep(Duration::from_secs(5)).await;
            })
            .await
        };
        let ticking = |moved: Arc<AtomicU64>| {
            tokio::spawn(async move {
                loop {
                    moved.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        };
        let far = tokio::time::Instant::now() + Duration::from_secs(60);
        // Moving all along: the reply is read, five timeouts late.
        let (_d, path) = late(5).await;
        let mut q = Qmp::connect(&path, timeout).await.expect("connect");
        let moved = Arc::new(AtomicU64::new(0));
        q.answer_late_while(Some(Moving {
            counter: moved.clone(),
            cap: far,
        }));
        let ticker = ticking(moved.clone());
        let st = q
            .query_status()
            .await
            .expect("a late reply while bytes move");
        assert_eq!(st.status, "postmigrate");
        ticker.abort();
        // Moving during the command, then standing still: it times out before the reply.
        let (_d2, path) = late(10).await;
        let mut q = Qmp::connect(&path, timeout).await.expect("connect");
        q.answer_late_while(Some(Moving {
            counter: moved.clone(),
            cap: far,
        }));
        let ticker = ticking(moved.clone());
        let stopper = tokio::spawn(async move {
            tokio::time::sleep(timeout * 2).await;
            ticker.abort();
        });
        let e = q.query_status().await.expect_err("the counter stopped");
        assert!(
            matches!(e, QmpError::Timeout { ended: WaitEnded::StoodStill(t), .. } if t == timeout),
            "{e:?}"
        );
        stopper.await.expect("stopper");
        // Moving all along, but past the cap: it times out there.
        let (_d3, path) = late(10).await;
        let mut q = Qmp::connect(&path, timeout).await.expect("connect");
        let cap = tokio::time::Instant::now() + timeout * 3;
        q.answer_late_while(Some(Moving {
            counter: moved.clone(),
            cap,
        }));
        let ticker = ticking(moved.clone());
        let e = q.query_status().await.expect_err("past the cap");
        assert!(
            matches!(
                e,
                QmpError::Timeout {
                    ended: WaitEnded::Cap,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("time limit"), "{e}");
        ticker.abort();
        // No counter: the plain timeout.
        let (_d4, path) = late(5).await;
        let mut q = Qmp::connect(&path, timeout).await.expect("connect");
        let e = q.query_status().await.expect_err("no counter");
        assert!(
            matches!(
                e,
                QmpError::Timeout {
                    ended: WaitEnded::StoodStill(_),
                    ..
                }
            ),
            "{e:?}"
        );
    }

    /// A fake QEMU that answers each command line with the next canned line(s).
    async fn fake(script: Vec<&'static str>) -> (tempfile::TempDir, PathBuf) {
        fake_qemu(|mut rd, mut wr| async move {
            for reply in script {
                let mut line = String::new();
                if rd.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                let _ = wr.write_all(reply.as_bytes()).await;
            }
        })
        .await
    }

    #[tokio::test]
    async fn events_queued_behind_a_reply_are_bounded_oldest_dropped_first() {
        let mut flood = String::new();
        for i in 0..MAX_QUEUED_EVENTS + 10 {
            flood += &format!("{{\"event\": \"E{i}\", \"timestamp\": {{}}}}\n");
        }
        flood += "{\"return\": {\"running\": true, \"status\": \"running\"}, \"id\": 2}\n";
        let flood: &'static str = Box::leak(flood.into_boxed_str());
        let (_d, path) = fake(vec!["{\"return\": {}, \"id\": 1}\n", flood]).await;
        let mut q = Qmp::connect(&path, Duration::from_secs(5))
            .await
            .expect("connect");
        assert_eq!(q.dropped_events(), 0);
        q.query_status().await.expect("status");
        assert_eq!(q.dropped_events(), 10, "the drops are counted");
        let events = q.take_events();
        assert_eq!(events.len(), MAX_QUEUED_EVENTS);
        assert_eq!(events[0].name, "E10", "the oldest went first");
        let last = format!("E{}", MAX_QUEUED_EVENTS + 9);
        assert_eq!(events.last().map(|e| e.name.as_str()), Some(last.as_str()));
    }

    /// An event whose data is past its bound keeps its name and time, not its data: a QEMU
    /// (or whatever listens on its socket) sending events of megabytes while a command waits
    /// fills the queue with names, not with gigabytes of parsed JSON.
    #[tokio::test]
    async fn an_events_data_past_its_bound_is_dropped_the_event_kept() {
        let big = format!("[{}0]", "0,".repeat(MAX_EVENT_DATA));
        let just = format!("\"{}\"", "x".repeat(MAX_EVENT_DATA - 2));
        let lines = format!(
            "{{\"event\": \"BIG\", \"data\": {big}, \"timestamp\": {{\"seconds\": 1, \"microseconds\": 0}}}}\n\
             {{\"event\": \"JUST\", \"data\": {just}}}\n\
             {{\"return\": {{\"running\": true, \"status\": \"running\"}}, \"id\": 2}}\n"
        );
        let lines: &'static str = Box::leak(lines.into_boxed_str());
        let (_d, path) = fake(vec!["{\"return\": {}, \"id\": 1}\n", lines]).await;
        let mut q = Qmp::connect(&path, Duration::from_secs(5))
            .await
            .expect("connect");
        q.query_status().await.expect("status");
        let events = q.take_events();
        assert_eq!(events.len(), 2);
        assert_eq!(
            (events[0].name.as_str(), &events[0].data),
            ("BIG", &Value::Null)
        );
        assert!(events[0].at.is_some(), "its time kept");
        assert_eq!(
            events[1].data.as_str().map(str::len),
            Some(MAX_EVENT_DATA - 2)
        );
    }

    /// A reply of the wrong shape for the type asked is named by its command and quoted.
    #[tokio::test]
    async fn a_reply_of_another_shape_is_quoted() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Job {
            id: String,
            status: String,
        }
        let (_d, path) = fake(vec![
            "{\"return\": {}, \"id\": 1}\n",
            "{\"return\": [{\"id\": \"x\"}], \"id\": 2}\n",
        ])
        .await;
        let mut q = Qmp::connect(&path, Duration::from_secs(5))
            .await
            .expect("connect");
        let e = q
            .execute_as::<Vec<Job>>("query-jobs", json!({}))
            .await
            .expect_err("no status");
        let text = e.to_string();
        assert!(matches!(e, QmpError::Malformed { .. }), "{e:?}");
        assert!(
            text.contains("query-jobs")
                && text.contains("status")
                && text.contains("[{\"id\":\"x\"}]"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn replies_events_and_errors_are_typed() {
        let (_d, path) = fake(vec![
            "{\"return\": {}, \"id\": 1}\n",
            "{\"event\": \"STOP\", \"timestamp\": {}}\n{\"return\": {\"running\": false, \"status\": \"paused\"}, \"id\": 2}\n",
            "{\"error\": {\"class\": \"GenericError\", \"desc\": \"There's a migration process in progress\"}, \"id\": 3}\n",
            "{\"return\": {\"status\": \"active\", \"ram\": {\"transferred\": 10, \"mbps\": 1.5, \"dirty-sync-count\": 2}}, \"id\": 4}\n",
            "this is not json\n",
        ])
        .await;
        let mut q = Qmp::connect(&path, Duration::from_secs(5))
            .await
            .expect("connect");
        assert_eq!(q.version, "7.2.22");
        let st = q.query_status().await.expect("status");
        assert_eq!(st.status, "paused");
        assert!(!st.running);
        assert!(q.queued("RESUME").is_none());
        assert!(q.queued("STOP").is_some(), "a queued event is found");
        assert!(q.queued("STOP").is_some(), "and left in the queue");
        assert_eq!(
            q.take_events().first().map(|e| e.name.as_str()),
            Some("STOP")
        );
        assert!(q.queued("STOP").is_none(), "taken events are gone");
        match q.migrate("unix:/x").await {
            Err(QmpError::Qemu {
                command,
                class,
                desc,
            }) => {
                assert_eq!(command, "migrate");
                assert_eq!(class, "GenericError");
                assert!(desc.contains("migration process in progress"));
            }
            other => panic!("expected a QEMU error, got {other:?}"),
        }
        let m = q.query_migrate().await.expect("query-migrate");
        assert_eq!(m.status(), MigrationStatus::Active);
        let ram = m.ram.expect("ram stats");
        assert_eq!((ram.transferred, ram.dirty_sync_count), (10, 2));
        match q.cont().await {
            Err(e @ QmpError::Malformed { .. }) => {
                assert!(e.to_string().contains("this is not json"))
            }
            other => panic!("expected malformed, got {other:?}"),
        }
        // The fake closed after its script: QEMU gone, whether the write or the read finds it.
        let gone = q.stop().await;
        assert!(matches!(gone, Err(QmpError::Closed { .. })), "{gone:?}");
        let again = q.query_status().await;
        assert!(matches!(&again, Err(e) if e.qemu_gone()), "{again:?}");
        q.quit().await.expect("quit of a QEMU that is gone");
    }

    /// An event whose line arrives in two pieces, with a wait in between that outlasts the
    /// caller's patience: the first half is kept, not lost, and the event comes whole.
    #[tokio::test]
    async fn a_partly_read_event_survives_a_cancelled_wait() {
        let (_dir, path) = fake_qemu(|mut rd, mut wr| async move {
            let mut line = String::new();
            let _ = rd.read_line(&mut line).await;
            let _ = wr.write_all(b"{\"return\": {}, \"id\": 1}\n").await;
            let _ = wr
                .write_all(b"{\"event\": \"MIGRATION\", \"data\": {\"status\": \"pre-")
                .await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let _ = wr
                .write_all(b"switchover\"}, \"timestamp\": {\"seconds\": 1700000000, \"microseconds\": 250000}}\n")
                .await;
            tokio::time::sleep(Duration::from_secs(2)).await;
        })
        .await;
        let mut q = Qmp::connect(&path, Duration::from_secs(5))
            .await
            .expect("connect");
        let first = q
            .next_event(Duration::from_millis(50))
            .await
            .expect("no error");
        assert_eq!(first, None, "half an event is no event yet");
        let ev = q
            .next_event(Duration::from_secs(2))
            .await
            .expect("no error")
            .expect("the whole event");
        assert_eq!(ev.migration_status(), Some(MigrationStatus::PreSwitchover));
        assert_eq!(
            ev.at,
            Some(UNIX_EPOCH + Duration::from_micros(1_700_000_000_250_000))
        );
    }

    /// Everything QEMU could send, as bytes: whatever the line, the parser returns a value or a
    /// typed error naming what it waited for, and typed replies parse or fail the same way.
    /// Mutations of real replies reach deeper than random bytes.
    fn every_line_is_handled(line: &[u8]) {
        match handle_line(line, "query-migrate") {
            Ok(()) => {}
            Err(QmpError::Malformed { context, .. }) => assert_eq!(context, "query-migrate"),
            Err(e) => panic!("unexpected error kind {e:?}"),
        }
    }

    const REAL_LINES: &[&str] = &[
        "{\"return\": {\"status\": \"active\", \"expected-downtime\": 300, \"ram\": {\"transferred\": 10, \"remaining\": 20, \"total\": 30, \"duplicate\": 1, \"normal\": 2, \"page-size\": 4096, \"dirty-pages-rate\": 5, \"mbps\": 1.5, \"dirty-sync-count\": 2}}, \"id\": 4}\n",
        "{\"event\": \"MIGRATION\", \"data\": {\"status\": \"pre-switchover\"}, \"timestamp\": {\"seconds\": 1700000000, \"microseconds\": 250000}}\n",
        "{\"error\": {\"class\": \"GenericError\", \"desc\": \"Parameter 'downtime_limit' expects an integer\"}, \"id\": 3}\n",
        "{\"return\": {\"running\": true, \"status\": \"running\"}, \"id\": 2}\n",
    ];

    proptest::proptest! {
        #[test]
        fn random_lines_never_panic(mut line in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512), nl in proptest::prelude::any::<bool>()) {
            if nl {
                line.push(b'\n');
            }
            every_line_is_handled(&line);
        }

        #[test]
        fn mutated_replies_never_panic(
            which in 0..REAL_LINES.len(),
            edits in proptest::collection::vec((proptest::prelude::any::<usize>(), proptest::prelude::any::<u8>()), 1..6),
            cut in proptest::prelude::any::<Option<usize>>(),
        ) {
            let mut line = REAL_LINES[which].as_bytes().to_vec();
            for (at, byte) in edits {
                let at = at % line.len();
                line[at] = byte;
            }
            if let Some(c) = cut {
                line.truncate(c % (line.len() + 1));
            }
            every_line_is_handled(&line);
        }
    }

    #[test]
    fn bogus_event_timestamps_are_absent_not_a_panic() {
        let ts = |s: &str| timestamp(serde_json::from_str::<Value>(s).ok().as_ref());
        assert_eq!(
            ts("{\"seconds\": 18446744073709551615, \"microseconds\": 999999}"),
            None
        );
        assert_eq!(ts("{\"seconds\": 1, \"microseconds\": 1000000}"), None);
        assert_eq!(ts("{\"seconds\": -1, \"microseconds\": 0}"), None);
        assert_eq!(
            ts("{\"seconds\": 2, \"microseconds\": 5}"),
            Some(UNIX_EPOCH + Duration::from_micros(2_000_005))
        );
    }

    #[test]
    fn real_lines_parse() {
        for l in REAL_LINES {
            let v = parse_json_line(l.as_bytes(), "t").expect("JSON");
            assert!(Qmp::classify(v, "t").is_ok(), "{l}");
        }
        assert!(matches!(
            parse_json_line(b"{\"return\": {}}", "t"),
            Err(QmpError::Malformed { reason, .. }) if reason.contains("cut")
        ));
    }

    #[tokio::test]
    async fn missing_socket_and_silent_peer_are_named() {
        let dir = tempfile::tempdir().expect("temp dir");
        let e = Qmp::connect(&dir.path().join("nope.sock"), Duration::from_secs(1))
            .await
            .err();
        assert!(matches!(e, Some(QmpError::Connect { .. })), "{e:?}");
        let path = dir.path().join("silent.sock");
        let l = UnixListener::bind(&path).expect("bind");
        tokio::spawn(async move {
            let held = l.accept().await;
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(held);
        });
        let e = Qmp::connect(&path, Duration::from_millis(200)).await.err();
        match e {
            Some(QmpError::Timeout { waiting_for, .. }) => assert_eq!(waiting_for, "greeting"),
            other => panic!("expected a timeout, got {other:?}"),
        }
    }
}
