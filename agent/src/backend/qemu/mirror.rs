//! Writable local disks, mirrored live through the attested session. spec: spec/qemu.md §5
//!
//! ```text
//! source QEMU: blockdev-mirror (sync=full, copy-mode=write-blocking) -> NBD client node
//!   --unix--> source agent ==BlockStream records, data stream i+1, both directions==>
//!   destination agent --unix--> destination QEMU's NBD server -> the copy the agent created
//! ```
//!
//! The guest keeps writing while its disk is copied: QEMU's mirror copies the image in the
//! background, tracked by a dirty bitmap, and with `write-blocking` every guest write goes to
//! both copies before it completes (active mirroring), so the copy converges and stays in step.
//! Memory migration starts only once every mirror is `ready`. At `pre-switchover` (the guest
//! stopped) the source cancels each ready job, which leaves the target consistent at that point
//! (as libvirt does for a mirror into NBD), and deletes its NBD client node: the NBD connection
//! ends in both directions. Every NBD byte of each direction is digested on both agents and
//! bound into the final digest with QEMU's stream (`trustmig_protocol::hvstream::final_digest`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use trustmig_protocol::hvstream::BlockDigests;
use trustmig_protocol::manifest::{DiskFormat, ImageManifest, MirrorDisk};
use trustmig_protocol::order::{hex, OrderId};
use trustmig_protocol::record::{Opener, Sealer};

use crate::backend::Tasks;
use crate::config::{DiskVerify, MirrorMode, VmConfig, RESERVED_PREFIX};
use crate::error::{AgentError, Link};
use crate::journal::{Journal, State};
pub(crate) use trustmig_qemu::block::BlockNode;
use trustmig_qemu::block::JobInfo;
use trustmig_qemu::qmp::{Moving, Qmp, WaitEnded};

use super::pumps::{open_pump, seal_pump, Carried, Counted, Counting, Received, Sent};

fn mig(s: String) -> AgentError {
    AgentError::Migration(s)
}

/// A failure of mirror `i`'s NBD path seen on the source (a cut, QEMU's mirror failing on the
/// broken connection): a transport failure of its data stream, so the destination's `Abort`,
/// which usually names the cause (a refused record), is reported first.
fn broken(i: usize, e: impl std::fmt::Display) -> AgentError {
    AgentError::transport(Link::Data(i as u16 + 1), e)
}

use super::QEMU_IMG;

/// What one mirrored disk's NBD relay carried: both directions' digests and the records
/// sealed (source) or opened (destination) towards the destination.
pub(crate) type Relayed = (BlockDigests, u64);

/// One relay's result, tagged with its mirror's index.
type Tagged = (usize, Result<Relayed, AgentError>);

/// The relays' results as they arrive (each tagged with its mirror's index), kept in mirror
/// order.
pub(crate) struct Relays {
    rx: mpsc::Receiver<Tagged>,
    names: Vec<String>,
    got: Vec<Option<Relayed>>,
}

impl Relays {
    fn new(names: Vec<String>) -> (mpsc::Sender<Tagged>, Self) {
        let (tx, rx) = mpsc::channel(names.len().max(1));
        let got = vec![None; names.len()];
        (tx, Self { rx, names, got })
    }

    /// The first relay failure (a refused record, a cut, QEMU's end of the connection). A relay
    /// that ends well is kept, unless `early` says no relay may end yet (the source, before it
    /// disconnected its NBD clients). Never returns once every relay ended well.
    pub(crate) async fn failure(&mut self, early: bool) -> AgentError {
        while let Some((i, r)) = self.rx.recv().await {
            let name = &self.names[i];
            match r {
                Err(e) => {
                    warn!(disk = %name, "NBD relay failed: {e}");
                    return e;
                }
                Ok(_) if early => {
                    return mig(format!(
                        "disk {name}: the NBD connection ended before the switch-over"
                    ))
                }
                Ok(x) => self.got[i] = Some(x),
            }
        }
        std::future::pending().await
    }

    /// Every relay's result, in mirror order, once each ended; the first failure ends the wait.
    pub(crate) async fn collect(&mut self, timeout: Duration) -> Result<Vec<Relayed>, AgentError> {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.got.iter().any(Option::is_none) {
            let (i, r) = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .map_err(|_| AgentError::Timeout("an NBD stream did not end".into()))?
                .ok_or_else(|| mig("NBD relays ended".into()))?;
            self.got[i] = Some(r?);
        }
        Ok(self.got.iter().flatten().cloned().collect())
    }
}

/// Carry one NBD connection (`qemu`) over data stream `data` in both directions until both
/// ended: what QEMU writes is sealed as `BlockStream` records, what arrives is opened and
/// written to QEMU. A failure of either direction ends both. `data` is only borrowed: the
/// caller closes it after it reported the result, so a peer that sees the stream end has been
/// told why first (else a refused record here could reach the peer as "stream cut", and the
/// peer's cut of stream 0 reach this agent's driver before the refusal did).
async fn relay(
    qemu: UnixStream,
    data: &mut TcpStream,
    sealer: Sealer,
    opener: Opener,
    (out, back, stall): (&'static str, &'static str, Duration),
    (received, sent): (Arc<AtomicU64>, Arc<AtomicU64>),
) -> Result<(Sent, Received), AgentError> {
    let (q_rd, q_wr) = qemu.into_split();
    let (d_rd, d_wr) = data.split();
    let d_wr = Counted::new(d_wr, sent);
    let opener = Counting::new(opener, received);
    let sealing = async {
        seal_pump(q_rd, d_wr, sealer, (out, Carried::Nbd), stall)
            .await
            .map_err(mig)
    };
    let opening = open_pump(d_rd, q_wr, opener, back, Carried::Nbd);
    tokio::try_join!(sealing, opening)
}

// ---------------------------------------------------------------------------------------------
// Source.

/// A writable disk of the source VM that is mirrored.
#[derive(Clone, Debug)]
pub struct SourceMirror {
    /// Its place among the order's mirrors: its QEMU node names take it rather than the disk's
    /// name, which may itself be as long as QEMU allows a node name (31 bytes).
    pub index: usize,
    /// Manifest name.
    pub name: String,
    /// QEMU's format node of the image (the mirror's source).
    pub node: String,
    /// Image format.
    pub format: DiskFormat,
    /// Size the guest sees.
    pub virtual_size: u64,
    /// QEMU's copy mode.
    pub mode: MirrorMode,
    /// The image file (for `verify = "full"`).
    pub path: PathBuf,
    /// `verify = "full"`: the image is hashed whole at the switch-over.
    pub verify_full: bool,
}

impl SourceMirror {
    /// Its manifest entry.
    pub fn manifest(&self) -> MirrorDisk {
        MirrorDisk {
            name: self.name.clone(),
            format: self.format,
            virtual_size: self.virtual_size,
            verify_full: self.verify_full,
        }
    }

    /// QEMU's NBD client node, the mirror's target.
    fn nbd_node(&self) -> String {
        format!("{NBD_NODE}{}", self.index)
    }

    /// The mirror job (a job id has no length limit: it names the disk, for `query-jobs`).
    fn job(&self) -> String {
        format!("{JOB}{}", self.name)
    }

    /// The filter node QEMU puts over the disk for the job's life.
    fn filter_node(&self) -> String {
        format!("{FILTER_NODE}{}", self.index)
    }
}

/// The agent's QEMU names (`RESERVED_PREFIX`, which no disk name takes), by what they name.
/// A node name has at most 31 bytes in QEMU 7.2 ("Node name too long" beyond).
const NBD_NODE: &str = "trustmig-nbd-";
const FILTER_NODE: &str = "trustmig-mirror-top-";
const JOB: &str = "trustmig-mirror-";

/// Whether `node` is one of this agent's own (a mirror's filter or NBD client node): never
/// the disk itself, whatever file it names.
pub(crate) fn ours(node: &BlockNode) -> bool {
    agents_node(&node.node_name)
}

/// Whether a node of this name is one the agent names so.
fn agents_node(name: &str) -> bool {
    name.starts_with(NBD_NODE) || name.starts_with(FILTER_NODE)
}

/// The mirrors under way on the source: their QMP objects and the relays' results.
pub(crate) struct Mirrors {
    disks: Vec<SourceMirror>,
    results: Relays,
    /// NBD client nodes and jobs exist in QEMU (to remove on failure).
    started: bool,
    /// Bytes moved on every stream of the migration, both ways (the relays count theirs into
    /// it), and the migration's cap: waits for the jobs go on while it moves.
    progress: Moving,
}

impl Mirrors {
    /// `verify = "full"`: hash each such disk's whole image as the guest sees it into its
    /// digests (`blocks`, in manifest order). Called once QEMU completed: the guest is stopped
    /// and QEMU has flushed and let go of its images (inactive), so the file is what the guest
    /// wrote.
    /// Whether any was. Each may take `timeout` plus its allowance (`image::hash_allowance`).
    pub(crate) async fn hash_images(
        &self,
        blocks: &mut [Relayed],
        timeout: Duration,
    ) -> Result<bool, AgentError> {
        let mut any = false;
        for (d, (digests, _)) in self.disks.iter().zip(blocks) {
            if d.verify_full {
                let digest = hash_image(&d.name, &d.path, (d.format, d.virtual_size), timeout);
                digests.image = Some(digest.await?);
                any = true;
            }
        }
        Ok(any)
    }
}

/// The guest-visible digest of disk `name`'s image at `path` (on a blocking thread), within
/// `timeout` and the image's allowance: a read that hangs ends the migration, named, rather
/// than keeping the guest paused.
async fn hash_image(
    name: &str,
    path: &Path,
    (format, virtual_size): (DiskFormat, u64),
    timeout: Duration,
) -> Result<trustmig_protocol::hvstream::StreamDigest, AgentError> {
    let path = path.to_path_buf();
    let started = std::time::Instant::now();
    let within = timeout.saturating_add(super::image::hash_allowance(virtual_size));
    let hashing = tokio::task::spawn_blocking(move || {
        super::image::guest_digest(&path, format, virtual_size)
    });
    let digest = tokio::time::timeout(within, hashing)
        .await
        .map_err(|_| {
            AgentError::Timeout(format!(
                "disk {name}: verify = \"full\": hashing the image took over {} s",
                within.as_secs()
            ))
        })?
        .map_err(|e| mig(format!("disk {name}: hashing task: {e}")))?
        .map_err(|source| AgentError::Image {
            disk: name.to_owned(),
            source: Box::new(source),
        })?;
    info!(disk = %name, bytes = virtual_size, ms = started.elapsed().as_millis() as u64, "image hashed in full");
    Ok(digest)
}

/// What hashing the manifest's disks verified in full may take beyond a step's timeout (the
/// source waits that much longer for `FinalChallenge`, which follows the destination's hash).
pub fn verify_allowance(manifest: &ImageManifest) -> Duration {
    // Saturating: the sizes are the source's (validated before this is asked, and bounded so).
    let bytes = (manifest.mirrors.iter())
        .filter(|m| m.verify_full)
        .fold(0u64, |sum, m| sum.saturating_add(m.virtual_size));
    super::image::hash_allowance(bytes)
}

/// The destination's copies verified in full (`verify_full` in the manifest): each hashed as
/// the guest sees it into its digests (`blocks`, in manifest order). Called once every NBD
/// stream ended (the source's client flushed and disconnected) and QEMU loaded the stream,
/// before the guest runs here.
pub(crate) async fn hash_copies(
    targets: &[Target],
    blocks: &mut [Relayed],
    timeout: Duration,
) -> Result<(), AgentError> {
    for (t, (digests, _)) in targets.iter().zip(blocks) {
        if !t.disk.verify_full {
            continue;
        }
        if crate::fault::alter_mirrored_image() {
            let (path, d) = (t.path.clone(), t.disk.clone());
            let at = tokio::task::spawn_blocking(move || {
                super::image::flip_first_data_byte(&path, d.format, d.virtual_size)
            })
            .await
            .map_err(|e| mig(format!("fault injection task: {e}")))?
            .map_err(|source| AgentError::Image {
                disk: t.disk.name.clone(),
                source: Box::new(source),
            })?
            .ok_or_else(|| {
                mig(format!(
                    "fault injection: disk {} holds no data to alter",
                    t.disk.name
                ))
            })?;
            warn!(disk = %t.disk.name, at, "fault injection: altered a byte of the copy after its NBD stream ended");
        }
        let d = &t.disk;
        digests.image =
            Some(hash_image(&d.name, &t.path, (d.format, d.virtual_size), timeout).await?);
    }
    Ok(())
}

/// Relay one listener's NBD connection over `data` (stream `i + 1`); `sock` is the
/// listener's file, removed once QEMU connected (or this is aborted).
async fn source_relay(
    i: usize,
    (listener, sock): (UnixListener, super::SocketFile),
    data: &mut TcpStream,
    (sealer, opener): (Sealer, Opener),
    (timeout, moved): (Duration, Arc<AtomicU64>),
) -> Result<Relayed, AgentError> {
    let accepted = tokio::time::timeout(timeout, listener.accept()).await;
    let path = sock.path().to_path_buf();
    drop(sock);
    let (qemu, _) = accepted
        .map_err(|_| {
            AgentError::Timeout(format!(
                "QEMU's NBD client did not connect to {}",
                path.display()
            ))
        })?
        .map_err(AgentError::io(&path))?;
    let (sent, got) = relay(
        qemu,
        data,
        sealer,
        opener,
        (
            "NBD to the destination",
            "NBD from the destination",
            timeout,
        ),
        (moved.clone(), moved),
    )
    .await
    .map_err(|e| match e {
        // The destination's own records refused: its fault, typed as such.
        e @ AgentError::Protocol(_) => e,
        e => broken(i, e),
    })?;
    let digests = BlockDigests {
        to_destination: sent.digest,
        to_source: got.digest,
        image: None,
    };
    Ok((digests, sent.records))
}

/// Start mirroring every disk of `disks` over its data stream (`streams[i]` for mirror `i`):
/// a relay per disk listening on a socket in `dir`, QEMU's NBD client connected to it
/// (`blockdev-add`, which completes the NBD handshake with the destination's server through
/// both agents), then `blockdev-mirror`.
pub(crate) async fn start(
    qmp: &mut Qmp,
    disks: &[SourceMirror],
    streams: Vec<(TcpStream, Sealer, Opener)>,
    (dir, order_id): (&Path, &OrderId),
    (timeout, progress): (Duration, Moving),
    tasks: &mut Tasks,
) -> Result<Mirrors, AgentError> {
    let (tx, results) = Relays::new(disks.iter().map(|d| d.name.clone()).collect());
    let mut m = Mirrors {
        disks: disks.to_vec(),
        results,
        started: false,
        progress,
    };
    m.clear_leftovers(qmp).await?;
    // Whatever started before a failure (an NBD client, a job) is stopped here: the caller
    // gets no `Mirrors` to tear down then.
    if let Err(e) = connect_all(qmp, &mut m, streams, (dir, order_id), timeout, (tasks, tx)).await {
        m.tear_down(qmp).await;
        return Err(e);
    }
    Ok(m)
}

/// For each disk: its relay, QEMU's NBD client on it, then `blockdev-mirror`.
async fn connect_all(
    qmp: &mut Qmp,
    m: &mut Mirrors,
    streams: Vec<(TcpStream, Sealer, Opener)>,
    (dir, order_id): (&Path, &OrderId),
    timeout: Duration,
    (tasks, tx): (&mut Tasks, mpsc::Sender<Tagged>),
) -> Result<(), AgentError> {
    let disks = m.disks.clone();
    for (i, ((data, sealer, opener), d)) in streams.into_iter().zip(&disks).enumerate() {
        let sock = super::socket_path(dir, super::SocketRole::NbdRelay(i), order_id)?;
        let path = sock.path().to_path_buf();
        let listener = UnixListener::bind(&path).map_err(AgentError::io(&path))?;
        let (tx, moved) = (tx.clone(), m.progress.counter.clone());
        tasks.spawn(async move {
            let mut data = data;
            let keys = (sealer, opener);
            let r = source_relay(i, (listener, sock), &mut data, keys, (timeout, moved)).await;
            let _ = tx.send((i, r)).await;
            drop(data); // after the report (see `relay`)
        });
        m.started = true;
        qmp.execute(
            "blockdev-add",
            json!({
                "driver": "nbd",
                "node-name": d.nbd_node(),
                "server": { "type": "unix", "path": path },
                "export": d.name,
            }),
        )
        .await
        .map_err(|e| {
            mig(format!(
                "disk {}: connecting QEMU's NBD client: {e}",
                d.name
            ))
        })?;
        qmp.execute(
            "blockdev-mirror",
            json!({
                "job-id": d.job(),
                "device": d.node,
                "target": d.nbd_node(),
                "filter-node-name": d.filter_node(),
                "sync": "full",
                "copy-mode": d.mode.as_str(),
                "auto-dismiss": false,
            }),
        )
        .await
        .map_err(|e| mig(format!("disk {}: blockdev-mirror: {e}", d.name)))?;
        info!(disk = %d.name, format = d.format.as_str(), bytes = d.virtual_size, mode = d.mode.as_str(), "mirroring");
    }
    Ok(())
}

async fn query_jobs(qmp: &mut Qmp) -> Result<Vec<JobInfo>, AgentError> {
    Ok(qmp.execute_as("query-jobs", json!({})).await?)
}

impl Mirrors {
    /// One look at the jobs: (bytes copied, bytes to copy, every mirror `ready`: copied, and
    /// the copy kept in step), or an error if one failed or vanished.
    pub(crate) async fn look(&mut self, qmp: &mut Qmp) -> Result<(u64, u64, bool), AgentError> {
        let jobs = query_jobs(qmp).await?;
        let (mut done, mut total) = (0u64, 0u64);
        let mut all = true;
        for (i, d) in self.disks.iter().enumerate() {
            let Some(j) = jobs.iter().find(|j| j.id == d.job()) else {
                return Err(mig(format!("disk {}: the mirror job vanished", d.name)));
            };
            match j.status.as_str() {
                "ready" => {}
                "concluded" | "aborting" | "null" => {
                    return Err(broken(
                        i,
                        format!(
                            "disk {}: the mirror failed: {}",
                            d.name,
                            j.error.as_deref().unwrap_or(&j.status)
                        ),
                    ))
                }
                _ => {
                    debug!(disk = %d.name, done = j.current, of = j.total, "mirroring");
                    all = false;
                }
            }
            // QEMU's numbers: added without trusting them not to overflow.
            done = done.saturating_add(j.current);
            total = total.saturating_add(j.total);
        }
        Ok((done, total, all))
    }

    /// A relay that ended before the switch-over: its failure (a refused record, a cut), or
    /// an NBD connection that closed early.
    pub(crate) async fn relay_ended(&mut self) -> AgentError {
        self.results.failure(true).await
    }

    /// At `pre-switchover` (the guest stopped): complete every mirror (cancel the ready job,
    /// which flushes the target and leaves it consistent), disconnect QEMU's NBD client, and
    /// collect both directions' digests of every relay, in mirror order.
    pub(crate) async fn complete(
        &mut self,
        qmp: &mut Qmp,
        timeout: Duration,
    ) -> Result<Vec<Relayed>, AgentError> {
        for d in &self.disks {
            qmp.execute("block-job-cancel", json!({ "device": d.job() }))
                .await?;
        }
        let jobs = self.wait_concluded(qmp, &self.jobs(), timeout).await?;
        for (i, d) in self.disks.iter().enumerate() {
            if let Some(err) = jobs
                .iter()
                .find(|j| j.id == d.job())
                .and_then(|j| j.error.as_ref())
            {
                let e = format!("disk {}: the mirror failed: {err}", d.name);
                return Err(broken(i, e));
            }
        }
        self.remove_from_qemu(qmp).await;
        self.results.collect(timeout).await
    }

    /// Wait until every job is concluded (or gone), waking on QEMU's events and looking every
    /// 5 ms (the guest is stopped meanwhile); for `timeout`, or longer while the migration's
    /// streams move bytes, up to its cap (a mirror completing copies what the guest dirtied
    /// since it was ready, which on a slow link takes as long as it takes), then every 100 ms:
    /// each look takes QEMU's big lock, which the copy needs.
    async fn wait_concluded(
        &self,
        qmp: &mut Qmp,
        ids: &[String],
        timeout: Duration,
    ) -> Result<Vec<JobInfo>, AgentError> {
        let mut until = tokio::time::Instant::now() + timeout;
        let mut patience = self.progress.begin();
        let mut look = Duration::from_millis(5);
        loop {
            let jobs = query_jobs(qmp).await?;
            let open = jobs
                .iter()
                .any(|j| ids.contains(&j.id) && j.status != "concluded");
            if !open {
                return Ok(jobs);
            }
            let now = tokio::time::Instant::now();
            if now > until {
                until = patience.extend(now, timeout).map_err(|ended| {
                    // Which jobs, where: QEMU's status and progress of each still open.
                    let open: Vec<String> = (jobs.iter())
                        .filter(|j| ids.contains(&j.id) && j.status != "concluded")
                        .map(|j| format!("{} {} {}/{} bytes", j.id, j.status, j.current, j.total))
                        .collect();
                    let open = open.join(", ");
                    AgentError::Timeout(match ended {
                        WaitEnded::StoodStill(t) => format!(
                            "a mirror job did not complete ({open}), nothing moved for {} s",
                            t.as_secs_f32()
                        ),
                        WaitEnded::Cap => format!("a mirror job did not complete ({open}) {ended}"),
                    })
                })?;
                look = Duration::from_millis(100);
            }
            qmp.next_event(look).await?;
        }
    }

    /// This order's job ids, one per disk.
    fn jobs(&self) -> Vec<String> {
        self.disks.iter().map(SourceMirror::job).collect()
    }

    /// Dismiss the jobs and delete the NBD client nodes (QEMU then closes the connections).
    async fn remove_from_qemu(&mut self, qmp: &mut Qmp) {
        let nodes: Vec<String> = self.disks.iter().map(SourceMirror::nbd_node).collect();
        remove(qmp, &self.jobs(), &nodes).await; // what QEMU kept is logged
        self.started = false;
    }

    /// Remove what an earlier order's mirrors left in QEMU: a source agent killed mid-mirror
    /// leaves its job (`auto-dismiss` is off), its filter node and its NBD client node, and a
    /// tear-down QEMU did not answer leaves them too. Their names are the next order's, so its
    /// `blockdev-add` would fail on them ("Duplicate nodes"), and a job left on a disk since
    /// renamed in the configuration keeps its filter over the disk for every mirror after it,
    /// until someone removed them by hand. So every mirror job and node named as the agent
    /// names them ([`Held`]) goes, whatever disk it was for. No other order of the VM can own
    /// them: this one holds the VM's claim, and an order that ended before it
    /// (journalled rolled back, its give-back still tearing its mirrors down) held QEMU's one
    /// QMP connection until its tear-down ended, so this order's QMP session began after it.
    /// An error names what could not be removed.
    async fn clear_leftovers(&self, qmp: &mut Qmp) -> Result<(), AgentError> {
        let left = Held::in_qemu(qmp).await?;
        if left.is_empty() {
            return Ok(());
        }
        warn!(
            left = %left,
            "an earlier migration's mirror left these in QEMU: removing them"
        );
        for job in &left.jobs {
            cancel(qmp, job).await;
        }
        let mut why = Vec::new();
        if let Err(e) = self.wait_concluded(qmp, &left.jobs, STOP_TIMEOUT).await {
            warn!("leftover mirror jobs did not stop: {e}");
            why.push(e.to_string());
        }
        // A filter node goes with its job, once concluded and dismissed.
        why.extend(remove(qmp, &left.jobs, &left.nbd_nodes()).await);
        let still = Held::in_qemu(qmp).await?;
        if still.is_empty() {
            return Ok(());
        }
        Err(mig(format!(
            "an earlier migration's mirror left {still} in QEMU and they could not be removed{}",
            if why.is_empty() {
                String::new()
            } else {
                format!(" ({})", why.join("; "))
            }
        )))
    }

    /// After a failure: stop every mirror at once (the source image is the VM's and stays as
    /// the guest writes it) and remove the NBD clients; best effort, QEMU's errors logged.
    pub(crate) async fn tear_down(&mut self, qmp: &mut Qmp) {
        if !self.started {
            return;
        }
        let jobs = self.jobs();
        for job in &jobs {
            cancel(qmp, job).await;
        }
        if let Err(e) = self.wait_concluded(qmp, &jobs, STOP_TIMEOUT).await {
            warn!("mirror jobs did not stop: {e}");
        }
        self.remove_from_qemu(qmp).await;
        info!("mirrors stopped; the source's disks are untouched");
    }
}

/// How long a forced cancel of mirror jobs may take before their removal goes ahead anyway.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Stop mirror job `id` at once (`force`: no final copy); best effort.
async fn cancel(qmp: &mut Qmp, id: &str) {
    let _ = qmp
        .execute("block-job-cancel", json!({ "device": id, "force": true }))
        .await;
}

/// Dismiss concluded jobs `jobs` and delete NBD client nodes `nodes` (which closes their
/// connections); best effort: what QEMU refused to delete, with its reason, is logged and
/// returned.
async fn remove(qmp: &mut Qmp, jobs: &[String], nodes: &[String]) -> Vec<String> {
    for id in jobs {
        let _ = qmp.execute("job-dismiss", json!({ "id": id })).await;
    }
    let mut kept = Vec::new();
    for node in nodes {
        if let Err(e) = qmp
            .execute("blockdev-del", json!({ "node-name": node }))
            .await
        {
            warn!(%node, "could not remove QEMU's NBD client: {e}");
            kept.push(format!("node {node}: {e}"));
        }
    }
    kept
}

/// The agent's mirror jobs and block nodes a QEMU holds: only names of the shapes the agent
/// gives (an operator's own `trustmig-…` node or job of another kind is not taken for one).
#[derive(Debug, PartialEq)]
struct Held {
    jobs: Vec<String>,
    nodes: Vec<String>,
}

impl Held {
    async fn in_qemu(qmp: &mut Qmp) -> Result<Self, AgentError> {
        let jobs = query_jobs(qmp).await?;
        let nodes = named_block_nodes(qmp).await?;
        Ok(Self::of(&jobs, &nodes))
    }

    fn of(jobs: &[JobInfo], nodes: &[BlockNode]) -> Self {
        Self {
            jobs: (jobs.iter())
                .filter(|j| j.kind == "mirror" && j.id.starts_with(JOB))
                .map(|j| j.id.clone())
                .collect(),
            nodes: (nodes.iter())
                .map(|n| n.node_name.clone())
                .filter(|n| agents_node(n))
                .collect(),
        }
    }

    /// The NBD client nodes (a filter node goes with its job).
    fn nbd_nodes(&self) -> Vec<String> {
        (self.nodes.iter())
            .filter(|n| n.starts_with(NBD_NODE))
            .cloned()
            .collect()
    }

    fn is_empty(&self) -> bool {
        self.jobs.is_empty() && self.nodes.is_empty()
    }
}

impl fmt::Display for Held {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let jobs = self.jobs.iter().map(|j| format!("job {j}"));
        let nodes = self.nodes.iter().map(|n| format!("node {n}"));
        f.write_str(&jobs.chain(nodes).collect::<Vec<_>>().join(", "))
    }
}

/// QEMU's block nodes (`query-named-block-nodes`, flat).
pub(crate) async fn named_block_nodes(qmp: &mut Qmp) -> Result<Vec<BlockNode>, AgentError> {
    qmp.execute_as("query-named-block-nodes", json!({ "flat": true }))
        .await
        .map_err(|e| mig(format!("QEMU: {e}")))
}

/// The mirror of disk `name` whose format node is `top` (a node QEMU has open read-write),
/// or why it cannot move: a format other than raw or qcow2, a backing chain.
pub(crate) fn source_mirror(
    (index, name, mode, verify): (usize, &str, MirrorMode, DiskVerify),
    path: &Path,
    top: &BlockNode,
) -> Result<SourceMirror, AgentError> {
    let shown = path.display();
    let format = match top.drv.as_str() {
        "raw" | "file" => DiskFormat::Raw,
        "qcow2" => DiskFormat::Qcow2,
        other => {
            return Err(AgentError::Refused(format!(
                "disk {name}: QEMU opens {shown} as {other}; writable disks move as raw or qcow2 (use shared storage for others)"
            )))
        }
    };
    if let Some(backing) = &top.backing_file {
        return Err(AgentError::Refused(format!(
            "disk {name}: {shown} has a backing chain (backing file {backing}); only self-contained images move (flatten it with `qemu-img convert`, or use shared storage)"
        )));
    }
    let virtual_size = top.image.as_ref().map_or(0, |i| i.virtual_size);
    if virtual_size == 0 || virtual_size % 512 != 0 {
        return Err(AgentError::Refused(format!(
            "disk {name}: QEMU reports a virtual size of {virtual_size} bytes for {shown}; a mirrored disk needs a multiple of 512"
        )));
    }
    Ok(SourceMirror {
        index,
        name: name.to_string(),
        node: top.node_name.clone(),
        format,
        virtual_size,
        mode,
        path: path.to_path_buf(),
        verify_full: verify == DiskVerify::Full,
    })
}

// ---------------------------------------------------------------------------------------------
// Destination.

/// A mirrored disk's copy on the destination.
#[derive(Clone, Debug)]
pub struct Target {
    disk: MirrorDisk,
    /// `<disk_dir>/<name>.<format>`, chosen by the destination.
    path: PathBuf,
    /// `<path>.trustmig-order`: the order that created the image, until it committed.
    marker: PathBuf,
    device: serde_json::Map<String, Value>,
}

impl Target {
    /// Files this target leaves behind when the migration fails.
    pub fn files(&self) -> [&Path; 2] {
        [&self.path, &self.marker]
    }
}

/// Check that this destination can take the manifest's mirrored disks, before anything is
/// created: each configured with a device (and the announced format, when one is required
/// here), `disk_dir` set, no image in the way, room for the whole virtual size. An image in
/// the way that this agent created for an order journalled as rolled back (its marker says
/// which) is a leftover of that attempt and is removed; any other is refused.
pub fn plan(
    manifest: &ImageManifest,
    vm: Option<&VmConfig>,
    journal: &Journal,
) -> Result<Vec<Target>, AgentError> {
    if manifest.mirrors.is_empty() {
        return Ok(Vec::new());
    }
    trustmig_attest::manifest::validate(manifest)
        .map_err(|e| mig(format!("the source's manifest: {e}")))?;
    let (q, dir) = super::disk::disk_home(manifest, vm)?;
    let mut out = Vec::with_capacity(manifest.mirrors.len());
    let mut needed = 0u64;
    for d in &manifest.mirrors {
        let device = super::disk::device_of(q, &d.name)?;
        let want = q
            .disks
            .iter()
            .find(|c| c.name == d.name)
            .and_then(|c| c.format);
        if want.is_some_and(|f| f != d.format) {
            return Err(AgentError::Refused(format!(
                "disk {:?}: the source sends a {} image, this host requires {} (format mismatch)",
                d.name,
                d.format.as_str(),
                want.map_or("", DiskFormat::as_str)
            )));
        }
        let path = dir.join(format!("{}.{}", d.name, d.format.as_str()));
        let marker = dir.join(format!("{}.{}.trustmig-order", d.name, d.format.as_str()));
        if path.exists() && !stale(&path, &marker, journal) {
            return Err(AgentError::Refused(format!(
                "disk {:?}: {} exists; refusing to overwrite it (it may be in use; remove it if it is not)",
                d.name,
                path.display()
            )));
        }
        needed += d.virtual_size;
        out.push(Target {
            disk: d.clone(),
            path,
            marker,
            device,
        });
    }
    let free = free_space(dir)?;
    if free < needed {
        return Err(AgentError::Refused(format!(
            "not enough space in {} for the mirrored disks: {needed} bytes needed, {free} free",
            dir.display()
        )));
    }
    Ok(out)
}

/// Whether `path` is a leftover of an attempt that rolled back (its marker names an order
/// journalled so): removed, with the marker, if so.
pub(crate) fn stale(path: &Path, marker: &Path, journal: &Journal) -> bool {
    let Ok(text) = std::fs::read_to_string(marker) else {
        return false;
    };
    let id = hex::decode(text.trim())
        .ok()
        .and_then(|b| OrderId::try_from(b).ok());
    let Some(id) = id else {
        return false;
    };
    let rolled_back = journal
        .record(&id)
        .is_some_and(|r| r.state == State::RolledBack);
    if rolled_back {
        warn!(image = %path.display(), order = %text.trim(), "removing a disk copy left by a migration that rolled back");
        let _ = std::fs::remove_file(path);
        let _ = std::fs::remove_file(marker);
    }
    rolled_back
}

fn free_space(dir: &Path) -> Result<u64, AgentError> {
    let st = rustix::fs::statvfs(dir).map_err(|e| AgentError::io(dir)(std::io::Error::from(e)))?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Create each target image (raw: a sparse file of the virtual size; qcow2: `qemu-img
/// create`), its marker first, so that whatever exists can be traced to this order.
pub async fn create(targets: &[Target], order_id: &OrderId) -> Result<(), AgentError> {
    use std::os::unix::fs::OpenOptionsExt;
    for t in targets {
        std::fs::write(&t.marker, hex(order_id)).map_err(AgentError::io(&t.marker))?;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&t.path)
            .map_err(AgentError::io(&t.path))?;
        match t.disk.format {
            DiskFormat::Raw => f
                .set_len(t.disk.virtual_size)
                .map_err(AgentError::io(&t.path))?,
            DiskFormat::Qcow2 => {
                drop(f);
                let out = tokio::process::Command::new(QEMU_IMG)
                    .args(["create", "-q", "-f", "qcow2"])
                    .arg(&t.path)
                    .arg(t.disk.virtual_size.to_string())
                    .output()
                    .await
                    .map_err(|e| mig(format!("{QEMU_IMG} (apt install qemu-utils): {e}")))?;
                if !out.status.success() {
                    return Err(mig(format!(
                        "{QEMU_IMG} create {}: {}",
                        t.path.display(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    )));
                }
            }
        }
        info!(disk = %t.disk.name, image = %t.path.display(), format = t.disk.format.as_str(), "destination image created");
    }
    Ok(())
}

/// Open the images in the waiting QEMU (`blockdev-add` read-write, `device_add`) and export
/// them, writable, on an NBD server listening on `sock`.
pub async fn export(qmp: &mut Qmp, targets: &[Target], sock: &Path) -> Result<(), AgentError> {
    for t in targets {
        let name = &t.disk.name;
        qmp.execute(
            "blockdev-add",
            json!({
                "driver": t.disk.format.as_str(),
                "node-name": name,
                "file": { "driver": "file", "filename": t.path },
            }),
        )
        .await
        .map_err(|e| mig(format!("opening disk {name}: QEMU: {e}")))?;
        let mut dev = t.device.clone();
        dev.insert("drive".into(), Value::String(name.clone()));
        qmp.execute("device_add", Value::Object(dev))
            .await
            .map_err(|e| mig(format!("attaching disk {name}: QEMU: {e}")))?;
    }
    qmp.execute(
        "nbd-server-start",
        json!({ "addr": { "type": "unix", "data": { "path": sock } } }),
    )
    .await
    .map_err(|e| mig(format!("starting QEMU's NBD server: {e}")))?;
    for t in targets {
        let name = &t.disk.name;
        qmp.execute(
            "block-export-add",
            json!({
                "type": "nbd",
                "id": format!("{RESERVED_PREFIX}export-{name}"),
                "node-name": name,
                "name": name,
                "writable": true,
            }),
        )
        .await
        .map_err(|e| mig(format!("exporting disk {name}: QEMU: {e}")))?;
    }
    Ok(())
}

/// Relay each mirror's data stream (`streams[i]`, with its opener) to QEMU's NBD server at
/// `sock`; each relay's result arrives on the returned channel. The socket's file goes once
/// every relay connected (or ended).
pub(crate) fn relay_all(
    sock: super::SocketFile,
    targets: &[Target],
    streams: Vec<(TcpStream, Opener, Sealer)>,
    (tasks, stall, received): (&mut Tasks, Duration, Arc<AtomicU64>),
) -> Relays {
    let (tx, rx) = Relays::new(targets.iter().map(|t| t.disk.name.clone()).collect());
    let sock = Arc::new(sock);
    for (i, (data, opener, sealer)) in streams.into_iter().enumerate() {
        let (tx, sock, received) = (tx.clone(), sock.clone(), received.clone());
        tasks.spawn(async move {
            let mut data = data;
            let connected = UnixStream::connect(sock.path()).await;
            let path = sock.path().to_path_buf();
            drop(sock); // the last relay to connect removes the file
            let r = match connected {
                Ok(qemu) => relay(
                    qemu,
                    &mut data,
                    sealer,
                    opener,
                    ("NBD to the source", "NBD from the source", stall),
                    (received, Arc::default()),
                )
                .await
                .map(|(sent, got)| {
                    let digests = BlockDigests {
                        to_destination: got.digest,
                        to_source: sent.digest,
                        image: None,
                    };
                    (digests, got.records)
                }),
                Err(e) => Err(mig(format!("QEMU's NBD server at {}: {e}", path.display()))),
            };
            let _ = tx.send((i, r)).await;
            drop(data); // after the report (see `relay`)
        });
    }
    rx
}

/// Once QEMU loaded the stream: every NBD stream must have ended (the source disconnected at
/// the switch-over); collect them in mirror order and stop QEMU's NBD server.
pub async fn finish(
    qmp: &mut Qmp,
    relays: &mut Relays,
    timeout: Duration,
) -> Result<Vec<Relayed>, AgentError> {
    let out = relays.collect(timeout).await?;
    qmp.execute("nbd-server-stop", json!({}))
        .await
        .map_err(|e| mig(format!("stopping QEMU's NBD server: {e}")))?;
    Ok(out)
}

/// After COMMIT, once the VM runs here (or was handed over paused): the images are the VM's
/// now; their markers go.
pub fn committed(files: &[PathBuf]) {
    for f in files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "trustmig-order"))
    {
        let _ = std::fs::remove_file(f);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::{test_dest_disk, VmBackend};
    use crate::journal::Record;

    fn manifest(format: DiskFormat, virtual_size: u64) -> ImageManifest {
        ImageManifest {
            vm: "q".into(),
            config_digest: [0; 32],
            chunk_size: 1 << 20,
            disks: Vec::new(),
            mirrors: vec![MirrorDisk {
                name: "d0".into(),
                format,
                virtual_size,
                verify_full: false,
            }],
        }
    }

    /// The time allowed for hashing the disks verified in full grows with their sizes and
    /// saturates: sizes are the source's, and two of 2^63 bytes overflowed the sum (a panic in
    /// a debug build). The destination's driver refuses such a manifest before this is asked.
    #[test]
    fn the_hashing_allowance_saturates() {
        let mut m = manifest(DiskFormat::Raw, 1 << 30);
        assert_eq!(verify_allowance(&m), Duration::ZERO, "not verified in full");
        m.mirrors[0].verify_full = true;
        let one = verify_allowance(&m);
        assert!(one > Duration::ZERO);
        m.mirrors.push(m.mirrors[0].clone());
        assert_eq!(
            verify_allowance(&m),
            super::super::image::hash_allowance(2 << 30)
        );
        for d in &mut m.mirrors {
            d.virtual_size = 1 << 63;
        }
        assert_eq!(
            verify_allowance(&m),
            super::super::image::hash_allowance(u64::MAX)
        );
        assert!(trustmig_attest::manifest::validate(&m).is_err());
    }

    fn vm(dir: &Path, format: Option<DiskFormat>) -> VmConfig {
        let mut v = crate::config::test_qemu_vm("/run/q.sock", Some(dir));
        if let VmBackend::Qemu(q) = &mut v.backend {
            let mut d = test_dest_disk("d0");
            d.format = format;
            q.disks = vec![d];
        }
        v
    }

    /// A journal in `dir` with one destination record of `order` (hex) in `state`.
    pub(crate) fn journal_with(dir: &Path, order: &str, state: State) -> Journal {
        let mut j = Journal::open(&dir.join("journal")).expect("journal");
        let r: Record = serde_json::from_value(serde_json::json!({
            "order_id": order, "role": "destination", "vm": "q", "state": state,
            "not_after": 0, "at": 0,
        }))
        .expect("record");
        j.append(r).expect("append");
        j
    }

    #[test]
    fn the_destination_refuses_what_it_cannot_take_before_creating_anything() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("disks");
        let j = journal_with(tmp.path(), &"00".repeat(16), State::Committed);
        let m = manifest(DiskFormat::Qcow2, 1 << 30);
        let t = plan(&m, Some(&vm(&dir, None)), &j).expect("plan");
        assert_eq!(
            t[0].path,
            dir.join("d0.qcow2"),
            "the destination names the path"
        );
        // A format mismatch with what this host requires.
        let e = plan(&m, Some(&vm(&dir, Some(DiskFormat::Raw))), &j).unwrap_err();
        assert!(
            matches!(&e, AgentError::Refused(s) if s.contains("format mismatch")),
            "{e}"
        );
        // More than the file system has.
        let huge = manifest(DiskFormat::Raw, 60 << 40);
        let e = plan(&huge, Some(&vm(&dir, None)), &j).unwrap_err();
        assert!(
            matches!(&e, AgentError::Refused(s) if s.contains("not enough space")),
            "{e}"
        );
        // An image in the way without a marker (someone's disk): refused, left alone.
        std::fs::write(dir.join("d0.qcow2"), b"in use").expect("write");
        let e = plan(&m, Some(&vm(&dir, None)), &j).unwrap_err();
        assert!(
            matches!(&e, AgentError::Refused(s) if s.contains("refusing to overwrite")),
            "{e}"
        );
        // With the marker of an order that committed: still the VM's, refused.
        std::fs::write(dir.join("d0.qcow2.trustmig-order"), "00".repeat(16)).expect("marker");
        assert!(plan(&m, Some(&vm(&dir, None)), &j).is_err());
        assert!(dir.join("d0.qcow2").exists());
        // No device configured for the disk; a manifest that does not validate.
        let mut bare = vm(&dir, None);
        if let VmBackend::Qemu(q) = &mut bare.backend {
            q.disks.clear();
        }
        assert!(plan(&m, Some(&bare), &j).is_err());
        assert!(plan(&manifest(DiskFormat::Raw, 1000), Some(&vm(&dir, None)), &j).is_err());
    }

    #[test]
    fn a_copy_left_by_a_rolled_back_order_is_removed() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("disks");
        std::fs::create_dir_all(&dir).expect("dir");
        let order = "ab".repeat(16);
        let j = journal_with(tmp.path(), &order, State::RolledBack);
        std::fs::write(dir.join("d0.raw"), b"old copy").expect("write");
        std::fs::write(dir.join("d0.raw.trustmig-order"), &order).expect("marker");
        let t = plan(
            &manifest(DiskFormat::Raw, 1 << 20),
            Some(&vm(&dir, None)),
            &j,
        )
        .expect("the leftover does not block the next attempt");
        assert!(!dir.join("d0.raw").exists() && !dir.join("d0.raw.trustmig-order").exists());
        assert_eq!(t[0].path, dir.join("d0.raw"));
    }

    /// A fake QEMU whose mirror job `trustmig-mirror-d0` stays `running` for `busy`, then
    /// `concluded`.
    fn fake_qemu(busy: Duration) -> (tempfile::TempDir, PathBuf) {
        let started = tokio::time::Instant::now();
        super::super::tests::fake_qmp(move |command, _| {
            let status = if started.elapsed() < busy {
                "running"
            } else {
                "concluded"
            };
            let jobs = json!([{"id": "trustmig-mirror-d0", "type": "mirror", "status": status,
                "current-progress": 0, "total-progress": 1}]);
            Some(json!({ "return": if command == "query-jobs" { jobs } else { json!({}) } }))
        })
    }

    fn mirrors(counter: Arc<AtomicU64>, cap: Duration) -> Mirrors {
        let disk = SourceMirror {
            index: 0,
            name: "d0".into(),
            node: "d0".into(),
            format: DiskFormat::Raw,
            virtual_size: 1 << 20,
            mode: MirrorMode::Background,
            path: PathBuf::from("/nonexistent"),
            verify_full: false,
        };
        let (_tx, results) = Relays::new(vec!["d0".into()]);
        Mirrors {
            disks: vec![disk],
            results,
            started: true,
            progress: Moving {
                counter,
                cap: tokio::time::Instant::now() + cap,
            },
        }
    }

    /// A mirror completing at the switch-over copies what the guest dirtied since it was
    /// ready: while its relay moves bytes, the wait for the job goes on past the timeout
    /// (before, a backlog longer than a step timeout on a slow link rolled the migration back);
    /// with nothing moving it ends after the timeout, named; moving past the migration's cap,
    /// it ends there, and says so.
    #[tokio::test]
    async fn a_mirror_completing_is_waited_for_while_its_bytes_move() {
        let timeout = Duration::from_millis(200);
        let moved = Arc::new(AtomicU64::new(0));
        let ticker = {
            let moved = moved.clone();
            tokio::spawn(async move {
                loop {
                    moved.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        };
        let (_d, path) = fake_qemu(timeout * 4);
        let mut q = Qmp::connect(&path, Duration::from_secs(5))
            .await
            .expect("qmp");
        let far = Duration::from_secs(60);
        let jobs = mirrors(moved.clone(), far)
            .wait_concluded(&mut q, &["trustmig-mirror-d0".into()], timeout)
            .await
            .expect("concluded while bytes moved");
        assert_eq!(jobs[0].status, "concluded");
        let (_d, path) = fake_qemu(timeout * 4);
        let mut q = Qmp::connect(&path, Duration::from_secs(5))
            .await
            .expect("qmp");
        let e = mirrors(moved.clone(), timeout * 2)
            .wait_concluded(&mut q, &["trustmig-mirror-d0".into()], timeout)
            .await
            .expect_err("past the cap");
        assert!(e.to_string().contains("time limit"), "{e}");
        ticker.abort();
        let (_d, path) = fake_qemu(timeout * 4);
        let mut q = Qmp::connect(&path, Duration::from_secs(5))
            .await
            .expect("qmp");
        let e = mirrors(moved, far)
            .wait_concluded(&mut q, &["trustmig-mirror-d0".into()], timeout)
            .await
            .expect_err("nothing moved");
        assert!(
            e.to_string()
                .contains("(trustmig-mirror-d0 running 0/1 bytes), nothing moved"),
            "{e}"
        );
    }

    /// A start's clean-up takes every mirror job and node named as the agent names them,
    /// whatever disk it was for (one since renamed too), and nothing else: not the disks, not
    /// others' jobs, not an operator's `trustmig-…` names of other shapes.
    #[test]
    fn the_agents_leftovers_are_its_named_jobs_and_nodes() {
        let jobs =
            |v: serde_json::Value| -> Vec<JobInfo> { serde_json::from_value(v).expect("jobs") };
        let nodes =
            |v: serde_json::Value| -> Vec<BlockNode> { serde_json::from_value(v).expect("nodes") };
        let found = jobs(serde_json::json!([
            {"id": "trustmig-mirror-old", "type": "mirror", "status": "ready"},
            {"id": "backup0", "type": "backup", "status": "running"},
            {"id": "trustmig-mirror-b", "type": "backup", "status": "running"},
            {"id": "Trustmig-mirror-x", "type": "mirror", "status": "ready"},
            {"id": "trustmig-m", "type": "mirror", "status": "ready"},
        ]));
        let named = nodes(serde_json::json!([
            {"node-name": "d0"},
            {"node-name": "trustmig-nbd-old"},
            {"node-name": "trustmig-mirror-top-old"},
            {"node-name": "trustmig-mine"},
            {"node-name": "#block123"},
        ]));
        let held = Held::of(&found, &named);
        assert_eq!(
            held,
            Held {
                jobs: vec!["trustmig-mirror-old".into()],
                nodes: vec!["trustmig-nbd-old".into(), "trustmig-mirror-top-old".into()],
            }
        );
        assert_eq!(held.nbd_nodes(), vec!["trustmig-nbd-old".to_string()]);
        assert_eq!(
            held.to_string(),
            "job trustmig-mirror-old, node trustmig-nbd-old, node trustmig-mirror-top-old"
        );
        let others = nodes(serde_json::json!([
            {"node-name": "d0"}, {"node-name": "trustmig-mine"}, {"node-name": "#block123"},
        ]));
        assert!(Held::of(&found[1..], &others).is_empty());
        // The names this agent gives are all of them, and its node names fit in QEMU's 31
        // bytes for the longest disk name and the last mirror an order may have.
        let longest = "d".repeat(31);
        crate::config::check_disk_name(&longest).expect("a disk name of 31 bytes");
        let d = SourceMirror {
            index: trustmig_protocol::manifest::MAX_DISKS - 1,
            name: longest,
            node: "d0".into(),
            format: DiskFormat::Raw,
            virtual_size: 512,
            mode: MirrorMode::Background,
            path: "/i".into(),
            verify_full: false,
        };
        for name in [d.job(), d.nbd_node(), d.filter_node()] {
            assert!(name.starts_with(RESERVED_PREFIX), "{name}");
        }
        for node in [d.nbd_node(), d.filter_node()] {
            assert!(node.len() <= 31, "{node}");
        }
        let mine = Held::of(
            &jobs(serde_json::json!([{"id": d.job(), "type": "mirror", "status": "ready"}])),
            &nodes(
                serde_json::json!([{"node-name": d.nbd_node()}, {"node-name": d.filter_node()}]),
            ),
        );
        assert_eq!((mine.jobs.len(), mine.nodes.len()), (1, 2), "{mine}");
    }

    #[tokio::test]
    async fn created_images_have_the_announced_size_and_a_marker() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("disks");
        let j = journal_with(tmp.path(), &"00".repeat(16), State::Committed);
        let t = plan(
            &manifest(DiskFormat::Raw, 3 << 20),
            Some(&vm(&dir, None)),
            &j,
        )
        .expect("plan");
        create(&t, &[7; 16]).await.expect("create");
        assert_eq!(
            std::fs::metadata(dir.join("d0.raw")).expect("image").len(),
            3 << 20
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("d0.raw.trustmig-order")).expect("marker"),
            "07".repeat(16)
        );
        // Never over an existing file.
        assert!(create(&t, &[7; 16]).await.is_err());
        committed(
            &t.iter()
                .flat_map(|t| t.files().map(Path::to_path_buf))
                .collect::<Vec<_>>(),
        );
        assert!(!dir.join("d0.raw.trustmig-order").exists());
        assert!(dir.join("d0.raw").exists());
    }

    #[test]
    fn the_source_refuses_disks_that_cannot_move() {
        let node = |drv: &str, backing: Option<&str>, size: u64| -> BlockNode {
            serde_json::from_value(serde_json::json!({
                "file": "/i", "ro": false, "drv": drv, "node-name": "n",
                "backing_file_depth": 0, "backing_file": backing,
                "image": { "virtual-size": size },
            }))
            .expect("node")
        };
        let p = Path::new("/i");
        let ok = source_mirror(
            (0, "d0", MirrorMode::Background, DiskVerify::Stream),
            p,
            &node("qcow2", None, 1 << 20),
        )
        .expect("qcow2");
        assert_eq!((ok.format, ok.node.as_str()), (DiskFormat::Qcow2, "n"));
        assert!(!ok.manifest().verify_full);
        let full = source_mirror(
            (0, "d0", MirrorMode::Background, DiskVerify::Full),
            p,
            &node("qcow2", None, 1 << 20),
        )
        .expect("qcow2");
        assert!(full.manifest().verify_full, "the manifest says so");
        let e = source_mirror(
            (0, "d0", MirrorMode::Background, DiskVerify::Stream),
            p,
            &node("qcow2", Some("/b.qcow2"), 1 << 20),
        )
        .unwrap_err();
        assert!(e.to_string().contains("backing chain"), "{e}");
        let e = source_mirror(
            (0, "d0", MirrorMode::Background, DiskVerify::Stream),
            p,
            &node("vmdk", None, 1 << 20),
        )
        .unwrap_err();
        assert!(e.to_string().contains("as vmdk"), "{e}");
        let e = source_mirror(
            (0, "d0", MirrorMode::Background, DiskVerify::Stream),
            p,
            &node("raw", None, 1000),
        )
        .unwrap_err();
        assert!(e.to_string().contains("multiple of 512"), "{e}");
    }
}
