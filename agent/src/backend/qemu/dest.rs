//! The destination side of the QEMU sidecar: the agent feeds the opened stream to QEMU
//! (`migrate-incoming`) and runs `cont` only after the final evidence and `Commit`.
//! spec: spec/qemu.md §3, §4

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpStream, UnixStream};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use trustmig_protocol::handshake::Established;
use trustmig_protocol::hvstream::final_digest;
use trustmig_protocol::keys::{Direction, KeySchedule};
use trustmig_protocol::manifest::ImageManifest;
use trustmig_protocol::order::{hex, OrderId};
use trustmig_protocol::record::{Opener, Sealer};
use trustmig_protocol::Digest;

use crate::backend::{Arrived, DestVm, Tasks};
use crate::config::Config;
use crate::ctx::{Ctx, DataConn};
use crate::error::{AgentError, Link};
use crate::net::stream_init;
use trustmig_qemu::qmp::{MigrationStatus, Qmp};

use super::pumps::{open_pump, seal_pump, Carried, Counting, Received};
use super::{qemu_vm, socket_dir, socket_path, SocketRole};

/// How long the destination waits for the source's data stream to bind: the source opens it
/// right after the handshake, so a stream that has not authenticated by then never will.
const BIND_TIMEOUT: Duration = Duration::from_secs(10);

/// A QEMU VM arriving: the destination QEMU, found waiting (`-incoming defer -S`), fed what
/// the stream carries, and run (`cont`) only on `Commit`. On failure it is quit.
pub(crate) struct QemuDest {
    vm: String,
    /// The order it arrives by.
    order_id: OrderId,
    /// The configuration as the migration started (a reload meanwhile changes nothing here).
    config: Arc<Config>,
    qmp_path: PathBuf,
    /// The QMP session: lent to the receiving task, back once the stream loaded.
    qmp: Option<Qmp>,
    arrived: Option<mpsc::Receiver<Result<(Arrived, Qmp), AgentError>>>,
    /// Received disk files (removed if the migration fails before `Commit`).
    disk_files: Arc<std::sync::Mutex<Vec<PathBuf>>>,
    /// Bytes received on the data streams so far (the driver's silence check).
    moved: Arc<AtomicU64>,
    /// What hashing the mirrored images in full takes, beyond a step timeout of silence.
    hashing: Duration,
    tasks: Tasks,
}

impl QemuDest {
    /// The QEMU handed to this order is gone: the journal says so, so that no restart
    /// discards a QEMU for this order again (`Journal::mark_discarded`).
    fn gone(&self, ctx: &Ctx) {
        let marked = (ctx.journal.lock().expect("journal lock")).mark_discarded(&self.order_id);
        if let Err(e) = marked {
            warn!(vm = %self.vm, order = %hex(&self.order_id), "the QEMU is gone, but the journal could not say so ({e}): until it does, every start quits a QEMU waiting for this VM and no order may send it from here; once the journal's disk is writable again, run `{}` (or restart the agent)", ctx.home.command(&["reconcile", &self.vm]));
        }
    }

    /// Find the VM's QEMU waiting for a migration (`inmigrate`) and hand it to this order
    /// (journalled, for reconciliation after a restart). Anything else is refused and that
    /// QEMU left alone: it is not the incoming VM.
    /// `config`: the configuration as the migration starts (taken as the arrival began): the
    /// VM's entry is read again for its disks and mirrors, and must not change under it.
    pub async fn prepare(
        ctx: &Arc<Ctx>,
        config: Arc<Config>,
        vm: &str,
        est: &Established,
    ) -> Result<Self, AgentError> {
        let Some(qmp_path) = qemu_vm(&config, vm) else {
            return Err(AgentError::Refused(format!(
                "no QEMU VM named {vm:?} is configured on this agent (add a [[vm]] with backend = \"qemu\")"
            )));
        };
        let mut qmp = Qmp::connect(&qmp_path, ctx.step_timeout()).await?;
        let status = qmp.query_status().await?;
        if status.status != "inmigrate" {
            return Err(AgentError::Refused(format!(
                "destination QEMU for {vm:?} is in state {:?}, not waiting for a migration: start it with `-incoming defer -S` (see `trustmig qemu`)",
                status.status
            )));
        }
        // A QEMU started without `-S` would run the guest the moment loading ends, before
        // the digest is checked and before COMMIT: `stop` while `inmigrate` turns that off
        // (QEMU clears its autostart; pinned by
        // `qemu_a_destination_started_without_s_never_runs_before_commit`). With `-S` it
        // changes nothing.
        qmp.stop().await?;
        // From here this QEMU is this migration's, to discard on failure; a restart that
        // finds the order rolled back discards it too (until the journal says it is gone),
        // and only a QEMU handed over so.
        ctx.journal
            .lock()
            .expect("journal lock")
            .mark_fed(est.order.id())?;
        let me = Self {
            vm: vm.to_string(),
            order_id: *est.order.id(),
            config,
            qmp_path,
            qmp: Some(qmp),
            arrived: None,
            disk_files: Arc::default(),
            moved: Arc::default(),
            hashing: full_hash_silence(ctx, &est.manifest),
            tasks: Tasks::default(),
        };
        // Stream 0 carries QEMU's stream, one more per mirrored disk (spec/qemu.md §5).
        let want = 1 + est.manifest.mirrors.len();
        if usize::from(est.streams) != want {
            me.discard(ctx).await;
            return Err(AgentError::Refused(format!(
                "hypervisor-stream mode uses {want} data stream(s) here (1 + {} mirrored disks), source announced {}",
                est.manifest.mirrors.len(),
                est.streams
            )));
        }
        Ok(me)
    }
}

/// How long the source may be silent beyond a step timeout while the images verified in full
/// are hashed: the source allows each image a step timeout plus its share of the hashing
/// allowance (`Mirrors::hash_images`), so the destination waits as long.
fn full_hash_silence(ctx: &Ctx, manifest: &ImageManifest) -> Duration {
    let full = manifest.mirrors.iter().filter(|m| m.verify_full).count() as u32;
    super::mirror::verify_allowance(manifest) + ctx.step_timeout() * full
}

/// What the receiving task needs of the session (the keys stay with the driver's session).
struct Incoming {
    order_id: OrderId,
    manifest: ImageManifest,
    transcript_hash: Digest,
    /// The session's keys: stream 0's secret from the source, one per candidate connection,
    /// and back to the source (QEMU's return path).
    keys: Arc<KeySchedule>,
    /// Counts the bytes received on every data stream.
    moved: Arc<AtomicU64>,
    /// The configuration as the migration started.
    config: Arc<Config>,
}

impl DestVm for QemuDest {
    const HANDS_OVER_PAUSED: bool = true;

    fn start(
        &mut self,
        ctx: &Arc<Ctx>,
        est: Established,
        conns: mpsc::Receiver<DataConn>,
    ) -> Result<(), AgentError> {
        let inc = Incoming {
            order_id: *est.order.id(),
            manifest: est.manifest.clone(),
            transcript_hash: est.transcript_hash,
            keys: Arc::new(est.keys),
            moved: self.moved.clone(),
            config: self.config.clone(),
        };
        let mut qmp = self.qmp.take().expect("start is called once");
        let (tx, rx) = mpsc::channel(1);
        self.arrived = Some(rx);
        let (ctx, vm, files) = (ctx.clone(), self.vm.clone(), self.disk_files.clone());
        let mut pumps = Tasks::default();
        self.tasks.spawn(async move {
            let r = receive(&ctx, &vm, &mut qmp, inc, conns, &files, &mut pumps).await;
            let _ = tx.send(r.map(|a| (a, qmp))).await;
            // The return path keeps running until the driver is done with this migration.
            std::future::pending::<()>().await;
            drop(pumps);
        });
        Ok(())
    }

    async fn arrived(&mut self) -> Result<Arrived, AgentError> {
        let Some(rx) = &mut self.arrived else {
            return std::future::pending().await;
        };
        let (arrived, qmp) = rx
            .recv()
            .await
            .unwrap_or_else(|| Err(AgentError::Migration("receiving ended".into())))?;
        self.qmp = Some(qmp);
        Ok(arrived)
    }

    fn activity(&self) -> Option<u64> {
        // Bytes on any data stream (copied disks, QEMU's stream, the NBD streams): a source
        // silent on all of them and on the control channel for a step timeout is gone, and
        // the loaded QEMU is discarded rather than kept waiting until a restart.
        Some(self.moved.load(Ordering::Relaxed))
    }

    fn silence_allowance(&self) -> Duration {
        self.hashing
    }

    async fn resume(&mut self, _ctx: &Arc<Ctx>, paused: bool) -> Result<(), AgentError> {
        let qmp = self
            .qmp
            .as_mut()
            .ok_or_else(|| AgentError::Migration("Commit before the stream loaded".into()))?;
        if paused {
            // Handed over as it was at the source: loaded under `-S`, QEMU waits `paused` (or in
            // the stopped state the source's guest was in: an I/O error, say). The operator's
            // `cont` runs it, and only then QEMU activates its images and announces it.
            // Running, it was not ours to start.
            let st = qmp.query_status().await?;
            if st.running {
                return Err(AgentError::Migration(format!(
                    "destination QEMU runs (state {:?}), but the VM was to be handed over paused",
                    st.status
                )));
            }
        } else {
            qmp.cont().await?;
            let st = qmp.query_status().await?;
            if !st.running {
                return Err(AgentError::Migration(format!(
                    "destination QEMU did not start after cont (state {:?})",
                    st.status
                )));
            }
        }
        // Mirrored disks' images are this VM's now: no longer leftovers of this order.
        super::mirror::committed(&self.disk_files.lock().expect("disk files lock"));
        if paused {
            info!(vm = %self.vm, "QEMU VM handed over paused on this host, as it was at the source");
        } else {
            info!(vm = %self.vm, "QEMU VM resumed on this host");
        }
        Ok(())
    }

    async fn discard(mut self, ctx: &Arc<Ctx>) {
        // The QMP session is here, or waiting in the channel (the task sent it as the driver
        // gave up), or still with the receiving task: take it back where it is, else end the
        // task and ask QEMU anew (its one QMP slot frees as the task's session drops).
        if let Some(Ok((_, q))) = self.arrived.take().and_then(|mut rx| rx.try_recv().ok()) {
            self.qmp = Some(q);
        }
        drop(std::mem::take(&mut self.tasks));
        let qmp = match self.qmp.take() {
            Some(q) => Ok(q),
            None => Qmp::connect(&self.qmp_path, ctx.step_timeout()).await,
        };
        // This QEMU was started for this migration and holds (part of) a VM that must not
        // run here, or waits for one that will not come. It exits before the source hears of
        // the failure (the driver closes the channel after this), so a source waiting for the
        // images' locks can run its VM again (spec/qemu.md §4).
        let vm = &self.vm;
        let failed = match qmp {
            Ok(mut q) => match q.quit_and_wait(ctx.step_timeout()).await {
                Ok(()) => {
                    warn!(
                        vm,
                        "destination QEMU discarded (quit); it was never resumed"
                    );
                    self.gone(ctx);
                    None
                }
                Err(e) => Some(e),
            },
            // QEMU 7.2 exits by itself when a load fails.
            Err(e) if e.qemu_gone() => {
                warn!(
                    vm,
                    "destination QEMU gone (it exited); it was never resumed"
                );
                self.gone(ctx);
                None
            }
            Err(e) => Some(e),
        };
        // Left loaded (or waiting): the journal still holds it to this order, so every start
        // quits it, and `status` keeps it in sight until someone does.
        if let Some(e) = failed {
            let how = format!("the destination QEMU of a migration that never committed here could not be quit ({e}): it must never run here; once it answers run `{}`, or quit it by hand (never `cont` it) and then run that", ctx.home.command(&["reconcile", vm]));
            warn!(vm, "destination QEMU not resumed; {how}");
            ctx.leave_to_operator(vm, Some(hex(&self.order_id)), how);
        }
        super::disk::discard(&self.disk_files.lock().expect("disk files lock"));
    }
}

/// Bind the data streams, receive the copied disks, set up the mirrored ones, feed QEMU the
/// stream to its end and wait until QEMU loaded it and every NBD stream ended; the pumps go
/// into `pumps`.
async fn receive(
    ctx: &Arc<Ctx>,
    vm: &str,
    qmp: &mut Qmp,
    inc: Incoming,
    conns: mpsc::Receiver<DataConn>,
    files: &std::sync::Mutex<Vec<PathBuf>>,
    pumps: &mut Tasks,
) -> Result<Arrived, AgentError> {
    let timeout = ctx.step_timeout();
    let deadline = tokio::time::Instant::now() + timeout.min(BIND_TIMEOUT);
    let count = 1 + inc.manifest.mirrors.len() as u16;
    // Each candidate may take what the whole binding may.
    let binding = bind(conns, &inc.keys, count, timeout.min(BIND_TIMEOUT));
    let mut streams = tokio::time::timeout_at(deadline, binding)
        .await
        .map_err(|_| AgentError::Timeout("the source opened no data stream in time".into()))??;
    let (mut data, opener) = streams.remove(0);
    let mut opener = Counting::new(opener, inc.moved.clone());
    let sealer = Sealer::new(inc.keys.stream_secret(Direction::DestinationToSource, 0), 0);

    // Disks first (spec/qemu.md §5): each chunk checked against the attested manifest as it
    // arrives; attached to QEMU only once every disk verified, before QEMU loads anything.
    if !inc.manifest.disks.is_empty() {
        let vm_cfg = inc.config.vm(vm);
        let targets = {
            let journal = ctx.journal.lock().expect("journal lock");
            super::disk::plan(&inc.manifest, vm_cfg, &journal)?
        };
        files.lock().expect("disk files lock").extend(
            targets
                .iter()
                .flat_map(|t| t.files().map(Path::to_path_buf)),
        );
        let n = super::disk::receive_disks(
            &mut data,
            &mut opener,
            (&inc.manifest, &inc.order_id),
            &targets,
            timeout,
        )
        .await?;
        info!(order = %hex(&inc.order_id), bytes = n, disks = targets.len(), "disks received and verified");
        super::disk::attach(qmp, &targets).await?;
    }

    // Mirrored disks (spec/qemu.md §5): created here, opened and exported over NBD, each
    // stream relayed to QEMU's NBD server while the source mirrors into it.
    let (mut relays, targets) = if streams.is_empty() {
        (None, Vec::new())
    } else {
        let (relays, targets) = mirrors_in(ctx, vm, qmp, &inc, streams, files, pumps).await?;
        (Some(relays), targets)
    };
    // A relay that fails (a refused record on an NBD stream) ends the migration at once. It is
    // polled first: its failure is the cause of everything that follows (the source sees the
    // NBD stream cut and ends data stream 0), so when both are ready it is the one to report.
    let fed = feed(ctx, vm, qmp, &inc, (data, opener, sealer), pumps);
    let got = match &mut relays {
        Some(r) => tokio::select! {
            biased;
            e = r.failure(false) => return Err(e),
            got = fed => got?,
        },
        None => fed.await?,
    };
    // The source ended every NBD stream before QEMU's device state.
    let mut blocks = match &mut relays {
        Some(r) => super::mirror::finish(qmp, r, timeout).await?,
        None => Vec::new(),
    };
    // verify = "full" (the attested manifest says which): the copies as the guest will see
    // them, before anything runs here.
    super::mirror::hash_copies(&targets, &mut blocks, timeout).await?;
    let digests: Vec<_> = blocks.iter().map(|(d, _)| d.clone()).collect();
    let mut stream_records = vec![got.records];
    stream_records.extend(blocks.iter().map(|(_, n)| *n));
    Ok(Arrived {
        stream_records,
        digest: final_digest(&inc.transcript_hash, got.digest, &digests),
    })
}

/// Feed QEMU the migration stream of data stream 0 to its end (its return path goes back
/// through `sealer`) and wait until QEMU loaded it.
async fn feed(
    ctx: &Arc<Ctx>,
    vm: &str,
    qmp: &mut Qmp,
    inc: &Incoming,
    (data, opener, sealer): (TcpStream, Counting, Sealer),
    pumps: &mut Tasks,
) -> Result<Received, AgentError> {
    let timeout = ctx.step_timeout();
    let dir = socket_dir(ctx)?;
    // QEMU listens on a socket in our home; we feed it.
    let sock = socket_path(&dir, SocketRole::In, &inc.order_id)?;
    let path = sock.path();
    // `events`: the load's completion wakes `wait_loaded` at once. `late-block-activate`:
    // QEMU activates the images (and takes their write locks) at `cont`, not when loading
    // ends, so a destination that loaded but is never resumed holds no image a rollback `cont`
    // on the source needs (spec/qemu.md §5; pinned by
    // `qemu_destination_crash_on_a_shared_image_leaves_one_copy_running`).
    qmp.migrate_set_capabilities(&[("events", true), ("late-block-activate", true)])
        .await?;
    qmp.migrate_incoming(&format!("unix:{}", path.display()))
        .await?;
    let qemu_sock = connect_qemu(path, timeout).await?;
    drop(sock);
    let (qemu_rd, qemu_wr) = qemu_sock.into_split();
    let (data_rd, data_wr) = data.into_split();
    pumps.spawn(async move {
        let what = ("return path", Carried::Migration);
        if let Err(e) = seal_pump(qemu_rd, data_wr, sealer, what, timeout).await {
            warn!("{e}");
        }
    });
    info!(order = %hex(&inc.order_id), vm, "feeding the destination QEMU");
    let fed = open_pump(
        data_rd,
        qemu_wr,
        opener,
        "data stream 0",
        Carried::Migration,
    )
    .await;
    let got = match fed {
        Ok(got) => got,
        // Writing to QEMU failed: QEMU knows why. Anything else (a record refused, a stream
        // cut on the network) is the cause itself, and QEMU's failure that follows (its socket
        // closed under it) only its effect.
        Err(
            e @ AgentError::Transport {
                link: Link::QemuStream,
                ..
            },
        ) => return Err(load_failure(qmp, vm, e).await),
        Err(e) => return Err(e),
    };
    debug!("QEMU stream opened to its end and written to QEMU");
    // Everything arrived; QEMU must also have loaded it without complaint.
    match wait_loaded(qmp, timeout).await {
        Ok(()) => {}
        // QMP failed (QEMU gone, say): ask what became of the load. A load QEMU said failed,
        // or one too slow, is named by `wait_loaded` already.
        Err(e @ AgentError::Qemu(_)) => return Err(load_failure(qmp, vm, e).await),
        Err(e) => return Err(e),
    }
    debug!("destination QEMU loaded the stream");
    Ok(got)
}

/// Why writing the stream to the destination QEMU failed with `e`, or asking it whether it
/// loaded: QEMU's own reason when it has one. A QEMU 7.2 whose load fails (a device or memory
/// size the source's stream does not fit) exits, and its socket closing is all that tells, so
/// a QEMU gone is named as that; one still there that failed the load gives its `error-desc`.
async fn load_failure(qmp: &mut Qmp, vm: &str, e: AgentError) -> AgentError {
    match qmp.query_migrate().await {
        Err(q) if q.qemu_gone() => AgentError::Migration(format!(
            "the destination QEMU of VM {vm} exited while loading the stream ({e}): QEMU exits when a load fails, for one a configuration that does not match the source's; its log says why"
        )),
        Ok(m) if m.status() == MigrationStatus::Failed => AgentError::Migration(format!(
            "the destination QEMU of VM {vm} failed to load the stream: {} ({e})",
            m.error_desc.as_deref().unwrap_or("no reason given")
        )),
        _ => e,
    }
}

/// Create, open and export the mirrored disks' images and relay their streams (`streams[i]`
/// is data stream `i + 1`) to QEMU's NBD server. The images join `files`, removed if the
/// migration fails before `Commit`.
async fn mirrors_in(
    ctx: &Arc<Ctx>,
    vm: &str,
    qmp: &mut Qmp,
    inc: &Incoming,
    streams: Vec<(TcpStream, Opener)>,
    files: &std::sync::Mutex<Vec<PathBuf>>,
    pumps: &mut Tasks,
) -> Result<(super::mirror::Relays, Vec<super::mirror::Target>), AgentError> {
    if inc.manifest.mirrors.iter().any(|m| m.verify_full) {
        // Checked before anything is created: without it the hash fails at the switch-over.
        super::image::available().map_err(|e| {
            AgentError::Refused(format!(
                "the source asks for disks verified in full (verify = \"full\"): {e}"
            ))
        })?;
    }
    let targets = {
        let journal = ctx.journal.lock().expect("journal lock");
        super::mirror::plan(&inc.manifest, inc.config.vm(vm), &journal)?
    };
    files.lock().expect("disk files lock").extend(
        targets
            .iter()
            .flat_map(|t| t.files().map(Path::to_path_buf)),
    );
    super::mirror::create(&targets, &inc.order_id).await?;
    let sock = socket_path(&socket_dir(ctx)?, SocketRole::NbdServer, &inc.order_id)?;
    super::mirror::export(qmp, &targets, sock.path()).await?;
    let streams = (1u16..)
        .zip(streams)
        .map(|(i, (data, opener))| {
            let back = Sealer::new(inc.keys.stream_secret(Direction::DestinationToSource, i), i);
            (data, opener, back)
        })
        .collect();
    info!(order = %hex(&inc.order_id), disks = targets.len(), "mirrored disks exported to the source");
    Ok((
        super::mirror::relay_all(
            sock,
            &targets,
            streams,
            (pumps, ctx.step_timeout(), inc.moved.clone()),
        ),
        targets,
    ))
}

/// Data streams `0..count`, each the first candidate connection whose `StreamInit`
/// authenticates, with its opener (`net::stream_init`).
async fn bind(
    conns: mpsc::Receiver<DataConn>,
    keys: &KeySchedule,
    count: u16,
    timeout: Duration,
) -> Result<Vec<(TcpStream, Opener)>, AgentError> {
    let mut bound: Vec<Option<(TcpStream, Opener)>> = (0..count).map(|_| None).collect();
    let mut binder = stream_init::Binder::new(conns, keys, count, timeout);
    while bound.iter().any(Option::is_none) {
        let (i, sock, opener) = binder
            .next()
            .await
            .ok_or_else(|| AgentError::Migration("session closed".into()))?;
        bound[usize::from(i)] = Some((sock, opener));
    }
    Ok(bound.into_iter().flatten().collect())
}

/// Connect to the socket QEMU listens on for the incoming stream (it appears shortly after
/// `migrate-incoming`).
async fn connect_qemu(path: &Path, timeout: Duration) -> Result<UnixStream, AgentError> {
    let until = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path).await {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() > until => {
                return Err(AgentError::Timeout(format!(
                    "destination QEMU does not listen on {}: {e}",
                    path.display()
                )))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Wait until the destination QEMU reports the incoming migration `completed`.
async fn wait_loaded(qmp: &mut Qmp, timeout: Duration) -> Result<(), AgentError> {
    let until = Instant::now() + timeout;
    loop {
        let m = qmp.query_migrate().await?;
        match m.status() {
            MigrationStatus::Completed => return Ok(()),
            MigrationStatus::Failed | MigrationStatus::Cancelled => {
                return Err(AgentError::Migration(format!(
                    "destination QEMU failed to load the stream: {}",
                    m.error_desc.as_deref().unwrap_or("no reason given")
                )))
            }
            s if Instant::now() > until => {
                return Err(AgentError::Timeout(format!(
                    "destination QEMU did not finish loading in time (status {s})"
                )))
            }
            _ => {
                // Woken by the next event (a MIGRATION event with the events capability), or
                // after 20 ms at the latest.
                qmp.next_event(Duration::from_millis(20)).await?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A destination QEMU that failed its load and is still there (QEMU 7.2 exits instead,
    /// `qemu_an_incoming_qemu_whose_load_fails_exits`, so only a fake QEMU reaches this) is
    /// named by its `error-desc`; one still loading leaves the write's own error as it was.
    #[tokio::test]
    async fn a_failed_load_is_named_by_qemus_reason() {
        for (status, named) in [
            (
                "failed",
                "failed to load the stream: Unknown savevm section type 5",
            ),
            ("active", "writing to QEMU failed"),
        ] {
            let (_dir, path) = super::super::tests::fake_qmp(move |command, _| {
                (command == "query-migrate").then(|| {
                    serde_json::json!({"return": {"status": status, "error-desc": "Unknown savevm section type 5"}})
                })
            });
            let mut qmp = Qmp::connect(&path, Duration::from_secs(5))
                .await
                .expect("qmp");
            let write = AgentError::transport(Link::QemuStream, "writing to QEMU failed");
            let e = load_failure(&mut qmp, "vm", write).await.to_string();
            assert!(e.contains(named), "{status}: {e}");
        }
    }
}
