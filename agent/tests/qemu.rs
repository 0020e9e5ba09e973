//! QEMU sidecar mode against real `qemu-system-x86_64` (TCG) with the multiboot test guest in
//! `tests/guest/`: two agents with swtpm, a source QEMU running the guest, a destination QEMU
//! waiting with `-incoming defer -S`. The guest prints `T <counter> <generation>` ticks and
//! `V <counter> bad=<n> sum=<x>` self-checks of its data area on COM1.
//!
//! Without qemu-system-x86_64 (or gcc/ld/swtpm) these tests skip with a one-line reason, except
//! in CI (env `CI` set), where they fail.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use trustmig_agent::control::{Progress, Reply, Summary};
use trustmig_agent::fault::{CrashPoint, Hold, HOLD_ENV};
use trustmig_agent::harness::wait::{eventually, eventually_blocking, until, until_blocking};
use trustmig_agent::harness::{Pair, VmSpec};
use trustmig_protocol::order::{Limits, NonConvergence};
use trustmig_qemu::qmp::{MigrationStatus, Qmp, QmpError};
use trustmig_tests::metrics::scrape_until;
use trustmig_tests::proxy::{Fault, Proxy};

/// One migration at a time: each test runs two QEMUs, two agents and two swtpm on 2 cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const VM: &str = "qvm";
const MEM_MIB: u32 = 256;

fn missing(what: &str) -> bool {
    if std::env::var_os("CI").is_some() {
        panic!("{what} is required in CI (./test.sh installs it)");
    }
    eprintln!("skipped: {what} not installed");
    true
}

fn have(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn tools_missing() -> bool {
    for (p, a) in [
        ("qemu-system-x86_64", "--version"),
        ("gcc", "--version"),
        ("ld", "--version"),
        ("swtpm", "--version"),
    ] {
        if !have(p, a) {
            return missing(p);
        }
    }
    false
}

/// Build the test guest into `dir`.
fn build_guest(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/guest");
    let obj = dir.join("guest.o");
    let elf = dir.join("guest.elf");
    let ok = Command::new("gcc")
        .args([
            "-m32",
            "-ffreestanding",
            "-fno-pic",
            "-fno-stack-protector",
            "-nostdlib",
            "-O2",
            "-c",
        ])
        .arg(src.join("guest.c"))
        .arg("-o")
        .arg(&obj)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "gcc could not build tests/guest/guest.c");
    let ok = Command::new("ld")
        .args(["-m", "elf_i386", "--no-warn-rwx-segments", "-T"])
        .arg(src.join("guest.ld"))
        .arg("-o")
        .arg(&elf)
        .arg(&obj)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "ld could not link the test guest");
    elf
}

/// A QEMU process, killed on drop.
struct QemuVm {
    child: Child,
    qmp: PathBuf,
    serial: PathBuf,
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl QemuVm {
    fn start(dir: &Path, name: &str, guest: &Path, opts: &VmOpts, incoming: bool) -> Self {
        let qmp = dir.join(format!("{name}.qmp"));
        let serial = dir.join(format!("{name}.serial"));
        let log = std::fs::File::create(dir.join(format!("{name}.qemu.log"))).expect("qemu log");
        let mut args: Vec<String> = [
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-m",
            &opts.mem_mib.to_string(),
            "-nodefaults",
            "-display",
            "none",
            "-kernel",
            &guest.display().to_string(),
            "-append",
            &opts.append,
            "-serial",
            &format!("file:{}", serial.display()),
            "-qmp",
            &format!("unix:{},server=on,wait=off", qmp.display()),
        ]
        .map(String::from)
        .to_vec();
        let mut cmd = if incoming && opts.dst_without_s {
            args.extend(["-incoming", "defer"].map(String::from));
            let mut c = Command::new(&args[0]);
            c.args(&args[1..]);
            c
        } else if incoming {
            // As an operator would: the destination's command line derived from the source's
            // by `trustmig qemu start-destination` (transferred disks left out), which then
            // becomes that QEMU. Only the serial file, QMP path and vTPM socket differ.
            if !opts.transferred.is_empty() {
                args.extend(opts.src_extra.iter().cloned());
            }
            args.extend(opts.dst_extra.iter().cloned());
            let mut c = Command::new(env!("CARGO_BIN_EXE_trustmig"));
            c.args(["qemu", "start-destination", "--qmp"]).arg(&qmp);
            for t in &opts.transferred {
                c.arg("--transferred-disk").arg(t);
            }
            c.arg("--").args(&args);
            c
        } else {
            args.extend(opts.src_extra.iter().cloned());
            let mut c = Command::new(&args[0]);
            c.args(&args[1..]);
            c
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("qemu-system-x86_64 starts");
        let vm = Self { child, qmp, serial };
        let made = until_blocking(Duration::from_secs(20), Duration::from_millis(20), || {
            vm.qmp.exists()
        });
        assert!(made, "QEMU {name} did not create its QMP socket");
        vm
    }

    /// A QEMU with no guest, stopped (`-S`), with these extra arguments; its output in
    /// `<name>.qemu.log` ([`Self::log`]). Returns once its QMP socket is there, or when it
    /// exited first (a refused `-drive`, say).
    fn idle(dir: &Path, name: &str, extra: &[String]) -> Self {
        let qmp = dir.join(format!("{name}.qmp"));
        let log = std::fs::File::create(dir.join(format!("{name}.qemu.log"))).expect("qemu log");
        let child = Command::new("qemu-system-x86_64")
            .args([
                "-accel",
                "tcg",
                "-m",
                "32",
                "-nodefaults",
                "-display",
                "none",
                "-S",
            ])
            .args(extra)
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("qemu-system-x86_64 starts");
        let serial = dir.join(format!("{name}.serial"));
        let mut vm = Self { child, qmp, serial };
        let up = until_blocking(Duration::from_secs(20), Duration::from_millis(20), || {
            vm.qmp.exists() || !vm.alive()
        });
        assert!(up, "QEMU {name} neither made its QMP socket nor exited");
        vm
    }

    /// What an [`Self::idle`] QEMU wrote on stdout and stderr.
    fn log(&self) -> String {
        let path = self.qmp.with_extension("qemu.log");
        std::fs::read_to_string(path).unwrap_or_default()
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// Tick counters printed so far.
    /// The serial output's complete lines: a guest stopped mid-line (at switch-over) leaves a
    /// partial `T 22` of `T 221 5` behind, which must not count as tick 22.
    fn lines(&self) -> Vec<String> {
        self.output()
            .split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .map(|l| l.trim_end().to_string())
            .collect()
    }

    fn ticks(&self) -> Vec<u32> {
        self.lines()
            .iter()
            .filter_map(|l| l.strip_prefix("T "))
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect()
    }

    /// (counter, bad pages) of every self-check printed so far.
    fn checks(&self) -> Vec<(u32, u32)> {
        self.lines()
            .iter()
            .filter_map(|l| {
                let mut w = l.strip_prefix("V ")?.split_whitespace();
                let c = w.next()?.parse().ok()?;
                let bad = w.next()?.strip_prefix("bad=")?.parse().ok()?;
                Some((c, bad))
            })
            .collect()
    }

    fn wait_ticks(&self, n: usize, within: Duration) {
        let ticked = until_blocking(within, Duration::from_millis(50), || {
            self.ticks().len() >= n
        });
        assert!(
            ticked,
            "guest printed {} ticks, wanted {n}:\n{}",
            self.ticks().len(),
            self.output()
        );
    }

    /// A QMP session with this QEMU.
    async fn qmp(&self) -> Result<Qmp, String> {
        Qmp::connect(&self.qmp, Duration::from_secs(5))
            .await
            .map_err(|e| e.to_string())
    }

    /// The source's `query-migrate` (after a migration: QEMU's own total time and downtime).
    async fn migration(&self) -> Result<trustmig_qemu::qmp::MigrationInfo, String> {
        let mut q = self.qmp().await?;
        q.query_migrate().await.map_err(|e| e.to_string())
    }

    /// A numeric migration parameter (`downtime-limit`, `cpu-throttle-initial`, ...), from
    /// `query-migrate-parameters`.
    async fn migrate_parameter(&self, name: &str) -> Result<u64, String> {
        let mut q = self.qmp().await?;
        let p = q
            .execute("query-migrate-parameters", serde_json::json!({}))
            .await
            .map_err(|e| e.to_string())?;
        p.get(name)
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| format!("no {name} in {p}"))
    }

    /// Whether a migration capability is on, from `query-migrate-capabilities`.
    async fn migrate_capability(&self, name: &str) -> Result<bool, String> {
        let mut q = self.qmp().await?;
        let caps = q
            .execute("query-migrate-capabilities", serde_json::json!({}))
            .await
            .map_err(|e| e.to_string())?;
        caps.as_array()
            .and_then(|a| a.iter().find(|c| c["capability"] == name))
            .and_then(|c| c["state"].as_bool())
            .ok_or_else(|| format!("no capability {name} in {caps}"))
    }

    async fn status(&self) -> Result<String, String> {
        let mut q = self.qmp().await?;
        q.query_status()
            .await
            .map(|s| s.status)
            .map_err(|e| e.to_string())
    }
}

struct Setup {
    pair: Pair,
    src: QemuVm,
    dst: QemuVm,
    /// Where the source and destination agents serve their metrics (`VmOpts::metrics`).
    metrics: Option<[String; 2]>,
}

impl Setup {
    /// A fresh destination QEMU, `name`, in place of the one there (quit): it takes over the
    /// QMP socket path the destination agent's configuration names.
    fn replace_dst(&mut self, name: &str, opts: &VmOpts, incoming: bool) {
        let dir = self.pair.dir().to_path_buf();
        let old = std::mem::replace(
            &mut self.dst,
            QemuVm::start(&dir, name, &build_guest(&dir), opts, incoming),
        );
        drop(old);
        std::fs::rename(&self.dst.qmp, dir.join("dst.qmp")).expect("qmp socket");
        self.dst.qmp = dir.join("dst.qmp");
    }

    /// Both agents' whole logs, for a test that looks for a line (`logs` shows the tail).
    fn all_logs(&self) -> String {
        (self.pair.procs.iter().flatten())
            .map(|p| std::fs::read_to_string(&p.log).unwrap_or_default())
            .collect()
    }

    /// Whether either agent's whole log holds `text`.
    fn logged(&self, text: &str) -> bool {
        self.pair
            .procs
            .iter()
            .flatten()
            .any(|p| std::fs::read_to_string(&p.log).is_ok_and(|l| l.contains(text)))
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for p in self.pair.procs.iter().flatten() {
            let text = std::fs::read_to_string(&p.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out += &format!("--- {}\n", p.log.display());
            for l in &lines[lines.len().saturating_sub(30)..] {
                out += l;
                out.push('\n');
            }
        }
        out
    }
}

/// How the QEMUs run.
#[derive(Default)]
struct VmOpts {
    append: String,
    mem_mib: u32,
    dst_extra: Vec<String>,
    /// Extra arguments of a QEMU that is not incoming (the source).
    src_extra: Vec<String>,
    /// Disk images the agent transfers: the destination's command line is the source's with
    /// their drives and devices left out (`trustmig qemu start-destination --transferred-disk`).
    transferred: Vec<PathBuf>,
    /// TOML appended to the source's / destination's `[[vm]]` entry.
    src_vm: String,
    dst_vm: String,
    /// Environment of the source agent.
    src_env: Vec<(String, String)>,
    /// Environment of the destination agent.
    dst_env: Vec<(String, String)>,
    /// Start the destination QEMU as `-incoming defer` alone, without `-S` (an operator who
    /// did not use `trustmig qemu start-destination`).
    dst_without_s: bool,
    /// The destination agent's step timeout, if not the default.
    dst_step_timeout_secs: Option<u64>,
    /// The source agent's step timeout, if not the default.
    src_step_timeout_secs: Option<u64>,
    /// Both agents serve metrics (`Setup::metrics`).
    metrics: bool,
    /// What each agent runs under (`Pair::wrap`).
    wrap: [Vec<String>; 2],
}

fn setup(append: &str, dst_incoming: bool) -> Option<Setup> {
    let opts = VmOpts {
        append: append.into(),
        mem_mib: MEM_MIB,
        ..VmOpts::default()
    };
    setup_with(&opts, dst_incoming)
}

fn setup_with(opts: &VmOpts, dst_incoming: bool) -> Option<Setup> {
    if tools_missing() {
        return None;
    }
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_trustmig"));
    let spec = VmSpec {
        name: "unused-synthetic".into(),
        size_mib: 1,
        dirty_pages_per_sec: 0,
        ..VmSpec::default()
    };
    let mut pair = match Pair::create(&exe, &spec, 1) {
        Ok(p) => p,
        Err(e) => {
            assert!(std::env::var_os("CI").is_none(), "pair: {e}");
            eprintln!("skipped: {e}");
            return None;
        }
    };
    // Pair::create ran in this test process: allow the real agent binary too.
    let digest = trustmig_agent::attestation::file_sha256(&exe).expect("hash trustmig");
    trustmig_agent::admin::allow_exe(&pair.src, digest).expect("allow exe");
    trustmig_agent::admin::allow_exe(&pair.dst, digest).expect("allow exe");
    let dir = pair.dir().to_path_buf();
    let guest = build_guest(&dir);
    let src = QemuVm::start(&dir, "src", &guest, opts, false);
    let dst = QemuVm::start(&dir, "dst", &guest, opts, dst_incoming);
    let metrics = opts.metrics.then(|| {
        [&pair.src, &pair.dst].map(|home| {
            let port = trustmig_attest::loopback::reserve(1).expect("port");
            let addr = format!("127.0.0.1:{port}");
            let cfg = home.config();
            let text = std::fs::read_to_string(&cfg).expect("config");
            std::fs::write(&cfg, format!("metrics_listen = \"{addr}\"\n{text}")).expect("config");
            addr
        })
    });
    for (home, vm, extra) in [
        (&pair.src, &src, &opts.src_vm),
        (&pair.dst, &dst, &opts.dst_vm),
    ] {
        let path = home.config();
        let mut text = std::fs::read_to_string(&path).expect("config");
        let step_timeout = if std::ptr::eq(home, &pair.dst) {
            opts.dst_step_timeout_secs
        } else {
            opts.src_step_timeout_secs
        };
        if let Some(t) = step_timeout {
            text = text.replace(
                "step_timeout_secs = 30",
                &format!("step_timeout_secs = {t}"),
            );
        }
        text += &format!(
            "\n[[vm]]\nname = \"{VM}\"\nbackend = \"qemu\"\nqmp = \"{}\"\n{extra}",
            vm.qmp.display()
        );
        std::fs::write(&path, text).expect("config");
    }
    pair.src_env.clone_from(&opts.src_env);
    pair.dst_env.clone_from(&opts.dst_env);
    pair.wrap.clone_from(&opts.wrap);
    pair.start_both().expect("agents start");
    src.wait_ticks(3, Duration::from_secs(180));
    Some(Setup {
        pair,
        src,
        dst,
        metrics,
    })
}

fn limits(downtime_ms: u32) -> Limits {
    Limits {
        downtime_ms,
        bandwidth_bps: 0,
        max_rounds: 30,
        on_nonconvergence: NonConvergence::Force,
    }
}

/// Run a migration to `addr` (the destination or a proxy); Ok(summary) or Err(failure text).
async fn migrate(
    s: &mut Setup,
    addr: &str,
    downtime_ms: u32,
) -> (Result<Summary, String>, Vec<Progress>) {
    migrate_with(s, addr, limits(downtime_ms)).await
}

/// `migrate` with the order's limits spelled out.
async fn migrate_with(
    s: &mut Setup,
    addr: &str,
    limits: Limits,
) -> (Result<Summary, String>, Vec<Progress>) {
    s.pair.dst_addr = addr.to_string();
    let order = s.pair.order(VM, limits, 600).expect("order");
    let mut events = Vec::new();
    let mut result = Err("no final reply".to_string());
    let called = s
        .pair
        .migrate(&order, |r| match r {
            Reply::Progress(Progress::Done(sum)) => result = Ok(sum),
            Reply::Progress(Progress::Failed { error, vm }) => {
                result = Err(format!("{error}; VM: {vm}"))
            }
            Reply::Progress(p) => events.push(p),
            Reply::Error(e) => result = Err(e),
            _ => {}
        })
        .await;
    if let Err(e) = called {
        // The agent's own words, and whether it is still there.
        let exited = s.pair.procs[0].as_mut().map(|p| !p.running());
        panic!(
            "control socket: {e}; source agent gone: {exited:?}\n{}",
            s.logs()
        );
    }
    (result, events)
}

/// The last reply of the agent at `home` to `request` on its control socket.
async fn ask(
    home: &trustmig_agent::home::Home,
    request: trustmig_agent::control::Request,
) -> Option<Reply> {
    let mut out = None;
    trustmig_agent::control::call(&home.control_socket(), &request, |r| out = Some(r))
        .await
        .expect("control socket");
    out
}

/// `trustmig status` of the agent at `home`, as text.
async fn agent_status(home: &trustmig_agent::home::Home) -> String {
    match ask(home, trustmig_agent::control::Request::Status).await {
        Some(Reply::Status(v)) => trustmig_agent::progress::status_text(&v),
        other => panic!("no status: {other:?}"),
    }
}

/// After a successful migration: the destination runs, continues the source's counter, and
/// its data area checks out; the source stays stopped.
async fn assert_moved(s: &mut Setup, summary: &Summary) {
    assert_eq!(
        s.dst.status().await.as_deref(),
        Ok("running"),
        "{}",
        s.logs()
    );
    assert_eq!(s.src.status().await.as_deref(), Ok("postmigrate"));
    // `trustmig status` asks each agent's QEMU too.
    for (home, want) in [(&s.pair.src, "postmigrate"), (&s.pair.dst, "running")] {
        let text = agent_status(home).await;
        assert!(text.contains(&format!("{VM:20} QEMU: {want}")), "{text}");
    }
    let last_src = *s.src.ticks().last().expect("source ticked");
    s.dst.wait_ticks(40, Duration::from_secs(30));
    let dst_ticks = s.dst.ticks();
    let first_dst = dst_ticks[0];
    assert!(
        first_dst + 3 >= last_src && first_dst <= last_src + 5,
        "destination counter starts at {first_dst}, source stopped at {last_src}"
    );
    assert!(
        dst_ticks.windows(2).all(|w| w[1] == w[0] + 1),
        "destination ticks are consecutive"
    );
    let checks = s.dst.checks();
    assert!(
        !checks.is_empty(),
        "destination guest checked its data area"
    );
    assert!(
        checks.iter().all(|&(_, bad)| bad == 0),
        "guest data area after the move: {checks:?}"
    );
    assert_stays_stopped(&s.src, "the source guest stays stopped").await;
    assert!(
        summary.guest_bytes >= u64::from(MEM_MIB) << 20,
        "{summary:?}"
    );
    assert!(summary.bytes_on_wire > 0);
}

/// After a failed migration: the destination never ran, the source guest keeps running.
async fn assert_rolled_back(s: &mut Setup, result: &Result<Summary, String>, expect: &str) {
    let err = result
        .as_ref()
        .err()
        .unwrap_or_else(|| panic!("migration should fail\n{}", s.logs()));
    assert!(
        err.contains(expect),
        "error {err:?} does not mention {expect:?}\n{}",
        s.logs()
    );
    eprintln!("migration failed as expected: {err}");
    assert!(err.contains("rolled back"), "{err}");
    assert_source_runs_alone(s, Duration::from_secs(10)).await;
}

/// Exactly one copy runs, on the source: the destination QEMU was discarded or at least never
/// resumed (its guest printed nothing), the source guest runs again `within` (its counter
/// advances) and its data area checks out.
async fn assert_source_runs_alone(s: &mut Setup, within: Duration) {
    if s.dst.alive() {
        let st = s.dst.status().await;
        assert!(
            st.as_deref() != Ok("running"),
            "destination must never run: {st:?}"
        );
    }
    assert!(s.dst.ticks().is_empty(), "the destination guest never ran");
    assert_source_guest_runs(s, within).await;
    // `trustmig status` on both sides says so.
    let src = agent_status(&s.pair.src).await;
    assert!(src.contains(&format!("{VM:20} QEMU: running")), "{src}");
    assert!(!src.contains("not yet running"), "{src}");
    let dst = agent_status(&s.pair.dst).await;
    assert!(!dst.contains(&format!("{VM:20} QEMU: running")), "{dst}");
}

/// The source QEMU runs `within` (its guest's counter advances) and its data area checks out.
async fn assert_source_guest_runs(s: &mut Setup, within: Duration) {
    let ran = until(within, Duration::from_millis(100), async || {
        s.src.status().await.as_deref() == Ok("running")
    })
    .await;
    assert!(ran, "source never ran again: {:?}", s.src.status().await);
    let before = *s.src.ticks().last().expect("ticks");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = *s.src.ticks().last().expect("ticks");
    assert!(
        after > before + 5,
        "source guest counter keeps advancing ({before} -> {after})"
    );
    let checks = s.src.checks();
    assert!(
        checks.iter().all(|&(_, bad)| bad == 0),
        "source data area: {checks:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_migrates_an_idle_guest() {
    let _g = SERIAL.lock().await;
    let Some(mut s) = setup("area=16 rate=0 check=10", true) else {
        return;
    };
    let addr = s.pair.dst_addr.clone();
    let (r, events) = migrate(&mut s, &addr, 300).await;
    let summary = r.unwrap_or_else(|e| panic!("{e}\n{}", s.logs()));
    assert!(events
        .iter()
        .any(|p| matches!(p, Progress::Attested { .. })));
    assert!(
        events.iter().any(|p| matches!(p, Progress::Round { .. })),
        "progress from query-migrate"
    );
    assert!(events
        .iter()
        .any(|p| matches!(p, Progress::SwitchOver { .. })));
    assert!(events.iter().any(|p| matches!(p, Progress::Committed)));
    // A running guest without mirrors: QEMU does not pause at `pre-switchover`, the guest's
    // STOP marks the switch-over (spec/qemu.md §2).
    assert_eq!(
        switch_steps(&summary),
        ["STOP seen"],
        "{:?}",
        summary.timeline
    );
    assert_moved(&mut s, &summary).await;
    // SPEC.md §8.8: a destination copy that ran and was then stopped by its operator shows
    // what a loaded copy that never ran shows (`paused`, its incoming migration `completed`,
    // pinned by `qemu_a_copy_still_to_be_discarded_is_not_sent_on`): QEMU cannot tell them
    // apart, so the journal must (DONE once it runs).
    s.dst.qmp().await.expect("qmp").stop().await.expect("stop");
    assert_eq!(s.dst.status().await.as_deref(), Ok("paused"));
    assert_eq!(
        s.dst.migration().await.map(|m| m.status()),
        Ok(trustmig_qemu::qmp::MigrationStatus::Completed)
    );
}

/// The switch-over's signs in a summary's timeline, in order: `STOP seen` (QEMU went straight
/// on), or `pre-switchover seen`, the mirrors' completion and `migrate-continue done`.
fn switch_steps(summary: &Summary) -> Vec<&str> {
    const SIGNS: [&str; 5] = [
        "STOP seen",
        "switch-over of a stopped guest seen",
        "pre-switchover seen",
        "disk mirrors completed",
        "migrate-continue done",
    ];
    summary
        .timeline
        .iter()
        .map(|s| s.step.as_str())
        .filter(|s| SIGNS.contains(s))
        .collect()
}

/// A guest paused before its migration gives QEMU no STOP to mark the switch-over: the agent
/// has QEMU pause at `pre-switchover` and lets it go on (spec/qemu.md §2). The VM moves and is
/// handed over paused, as it was (SPEC.md §8.7): the destination journals it so, and runs it
/// only when the operator says `cont`; then it goes on from where it stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_migrates_a_paused_guest_and_hands_it_over_paused() {
    let _g = SERIAL.lock().await;
    let Some(mut s) = setup("area=16 rate=0 check=10", true) else {
        return;
    };
    s.src.qmp().await.expect("qmp").stop().await.expect("stop");
    let addr = s.pair.dst_addr.clone();
    let (r, events) = migrate(&mut s, &addr, 300).await;
    let summary = r.unwrap_or_else(|e| panic!("{e}\n{}", s.logs()));
    assert!(events
        .iter()
        .any(|p| matches!(p, Progress::SwitchOver { .. })));
    assert_eq!(
        switch_steps(&summary),
        ["pre-switchover seen", "migrate-continue done"],
        "{:?}",
        summary.timeline
    );
    assert_handed_over_paused(&mut s, &summary).await;
}

/// QEMU arguments for a second QMP monitor on a unix socket at `path` (events reach every
/// monitor), for a test's or the bench's own commands beside the agent's.
fn second_monitor(path: &Path) -> Vec<String> {
    vec![
        "-chardev".into(),
        format!("socket,id=watch,path={},server=on,wait=off", path.display()),
        "-mon".into(),
        "chardev=watch,mode=control".into(),
    ]
}

/// A dirtying guest whose source QEMU has a second monitor for an operator's commands (and
/// the temp dir holding its socket).
async fn with_operator_monitor(
    src_env: Vec<(String, String)>,
    dst_env: Vec<(String, String)>,
) -> Option<(Setup, Qmp, tempfile::TempDir)> {
    let mons = tempfile::tempdir().expect("tempdir");
    let mon = mons.path().join("src.qmp");
    let opts = VmOpts {
        append: "area=64 rate=64 check=25".into(),
        mem_mib: MEM_MIB,
        src_extra: second_monitor(&mon),
        src_env,
        dst_env,
        ..VmOpts::default()
    };
    let s = setup_with(&opts, true)?;
    let q = Qmp::connect(&mon, Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("monitor {}: {e}", mon.display()));
    Some((s, q, mons))
}

/// The operator's `stop`, 200 ms into QEMU's first pass (`migrate_slowly` makes it last
/// seconds).
async fn stop_in_first_pass(q: &mut Qmp) {
    into_first_pass(q).await;
    q.stop().await.expect("operator stop");
}

/// Wait until QEMU's first pass has run for 200 ms.
async fn into_first_pass(q: &mut Qmp) {
    loop {
        let ev = q.event().await.expect("QMP event");
        if ev.migration_status() == Some(MigrationStatus::Active) {
            break;
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
}

/// Migrate with a bandwidth cap that makes QEMU's first pass last seconds; the summary and the
/// progress seen, or a panic with the logs.
async fn migrate_slowly(s: &mut Setup) -> (Summary, Vec<Progress>) {
    let (r, events) = try_migrate_slowly(s).await;
    (r.unwrap_or_else(|e| panic!("{e}\n{}", s.logs())), events)
}

/// `migrate_slowly`, the result as it came.
async fn try_migrate_slowly(s: &mut Setup) -> (Result<Summary, String>, Vec<Progress>) {
    let addr = s.pair.dst_addr.clone();
    let limits = Limits {
        downtime_ms: 300,
        bandwidth_bps: 40_000_000,
        max_rounds: 30,
        on_nonconvergence: NonConvergence::Force,
    };
    tokio::time::timeout(Duration::from_secs(180), migrate_with(s, &addr, limits))
        .await
        .unwrap_or_else(|_| panic!("the migration never ended\n{}", s.logs()))
}

/// Reload (SIGHUP, `trustmig reload`) refuses to change the entry of a VM arriving here, as it
/// refuses for one leaving: the destination reads that entry again as the migration goes (its
/// disks, its mirrors). Before, only a VM leaving, in doubt or being given back counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_a_reload_cannot_change_an_arriving_vm() {
    let _g = SERIAL.lock().await;
    let Some(mut s) = setup("area=64 rate=64 check=25", true) else {
        return;
    };
    let home = s.pair.dst.clone();
    // Beside the migration, in this task: the compiler cannot show the wait's future `Send`.
    let reloader = async move {
        let journal = home.journal_file();
        let arrived = until(
            Duration::from_secs(60),
            Duration::from_millis(20),
            async || std::fs::read_to_string(&journal).is_ok_and(|t| t.contains(FED)),
        )
        .await;
        assert!(arrived, "the VM never arrived");
        // The VM's [[vm]] table is the file's last: a line appended changes its entry.
        let config = home.config();
        let before = std::fs::read_to_string(&config).expect("config");
        std::fs::write(&config, format!("{before}downtime_steps = 3\n")).expect("config");
        let reply = ask(&home, trustmig_agent::control::Request::Reload).await;
        std::fs::write(&config, before).expect("config");
        reply
    };
    let ((summary, _), reply) = tokio::join!(migrate_slowly(&mut s), reloader);
    assert!(
        matches!(&reply, Some(Reply::Error(e)) if e.contains("VM qvm is migrating (from or to here)")),
        "{reply:?}"
    );
    assert_moved(&mut s, &summary).await;
}

/// A reload between an order's preparation and its claim (which makes the VM busy, so that
/// reloads are refused) changes the VM's entry: the claim sees the entry is no longer the one
/// the order was prepared on and refuses, nothing moved, the source guest running on. Before,
/// the claim went ahead on the entry the reload had replaced, and a give-back or settlement
/// would have read the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_a_reload_between_preparation_and_claim_refuses_the_order() {
    let _g = SERIAL.lock().await;
    let opts = VmOpts {
        append: "area=16 rate=8 check=10".into(),
        mem_mib: MEM_MIB,
        src_env: vec![(HOLD_ENV.into(), Hold::BeforeClaim.env(3000))],
        ..VmOpts::default()
    };
    let Some(mut s) = setup_with(&opts, true) else {
        return;
    };
    let home = s.pair.src.clone();
    let log = s.pair.procs[0].as_ref().expect("source agent").log.clone();
    let reloader = tokio::spawn(async move {
        let held =
            tokio::task::spawn_blocking(move || wait_for_text(&log, &Hold::BeforeClaim.logged()));
        assert!(held.await.expect("wait"), "the source never held");
        // The VM's [[vm]] table is the file's last: a line appended changes its entry.
        let config = home.config();
        let before = std::fs::read_to_string(&config).expect("config");
        std::fs::write(&config, format!("{before}downtime_steps = 3\n")).expect("config");
        ask(&home, trustmig_agent::control::Request::Reload).await
    });
    let addr = s.pair.dst_addr.clone();
    let (r, _) = migrate(&mut s, &addr, 300).await;
    let reply = reloader.await.expect("reloader");
    assert!(
        matches!(&reply, Some(Reply::Reloaded(_))),
        "the VM was not busy yet: {reply:?}"
    );
    let e = r.expect_err("the claim went ahead on a replaced entry");
    assert!(
        e.contains("changed (a reload) while the order was being prepared"),
        "{e}\n{}",
        s.logs()
    );
    assert_eq!(s.src.status().await.as_deref(), Ok("running"));
    assert_eq!(s.dst.status().await.as_deref(), Ok("inmigrate"));
}

/// The guest was handed over paused: the summary and both journals say so, the destination
/// QEMU waits `paused` and its guest does not run until the operator's `cont` there, after
/// which the move is complete (`assert_moved`).
async fn assert_handed_over_paused(s: &mut Setup, summary: &Summary) {
    assert!(summary.handed_over_paused, "{summary:?}");
    assert_eq!(
        s.dst.status().await.as_deref(),
        Ok("paused"),
        "{}",
        s.logs()
    );
    assert_journalled_paused(&s.pair.src, true);
    assert_journalled_paused(&s.pair.dst, true);
    // An operator sees it in `trustmig status` on either host.
    for (home, says) in [
        (&s.pair.src, "handed over paused"),
        (&s.pair.dst, "handed over paused here"),
    ] {
        let text = agent_status(home).await;
        assert!(
            text.lines()
                .any(|l| l.contains(&summary.order_id[..16]) && l.contains(says)),
            "{text}"
        );
    }
    assert_stays_stopped(&s.dst, "the guest stays paused").await;
    s.dst.qmp().await.expect("qmp").cont().await.expect("cont");
    assert_moved(s, summary).await;
}

/// The destination QEMU exits (discarded) within `within`; else `what`, with its state and
/// the agents' logs.
async fn assert_dst_quits(s: &mut Setup, within: Duration, what: &str) {
    let quit = until(within, Duration::from_millis(100), async || !s.dst.alive()).await;
    assert!(quit, "{what}: {:?}\n{}", s.dst.status().await, s.logs());
}

/// The guest `g` does not tick for half a second: `what` (it stays stopped) holds.
async fn assert_stays_stopped(g: &QemuVm, what: &str) {
    let before = g.ticks().len();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(g.ticks().len(), before, "{what}");
}

/// The source journal of `home` has a record saying `what` between its claim and COMMIT.
fn assert_journalled_at_the_switch_over(home: &trustmig_agent::home::Home, what: &str) {
    let journal = std::fs::read_to_string(home.journal_file()).expect("journal");
    let states: Vec<&str> = journal
        .lines()
        .filter(|l| l.contains("\"claimed\"") || l.contains("\"committed\""))
        .map(|l| {
            if l.contains(what) {
                what
            } else if l.contains("\"committed\"") {
                "committed"
            } else {
                "claimed"
            }
        })
        .collect();
    assert_eq!(states, ["claimed", what, "committed"], "{journal}");
}

/// Every COMMIT and DONE record in the journal of `home` says whether the VM was handed over
/// `paused` (`paused_before`), and there is at least one.
fn assert_journalled_paused(home: &trustmig_agent::home::Home, paused: bool) {
    let journal = std::fs::read_to_string(home.journal_file()).expect("journal");
    let committed: Vec<&str> = journal
        .lines()
        .filter(|l| l.contains("\"committed\"") || l.contains("\"done\""))
        .collect();
    assert!(
        !committed.is_empty()
            && committed
                .iter()
                .all(|l| l.contains("\"paused_before\":true") == paused),
        "{journal}"
    );
}

/// spec/qemu.md §2 (step 6): without the pause, only a `STOP` that QEMU made for the
/// switch-over marks it. An operator's `stop` during pre-copy (on a second monitor), and the
/// `cont` after it, are none: the ladder goes on, the dirtying guest converges, and the
/// switch-over is marked once, by QEMU's own stop, so the downtime is counted from there.
/// (Taken as the switch-over, the operator's stop froze the limit at the first pass's 1 ms and
/// counted seconds of pre-copy as downtime.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_an_operator_stop_during_precopy_is_no_switch_over() {
    let _g = SERIAL.lock().await;
    let Some((mut s, mut q, _mons)) = with_operator_monitor(Vec::new(), Vec::new()).await else {
        return;
    };
    let operator = tokio::spawn(async move {
        stop_in_first_pass(&mut q).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        q.cont().await.expect("operator cont");
        Instant::now()
    });
    let (summary, _) = migrate_slowly(&mut s).await;
    let since_cont = operator.await.expect("operator task").elapsed();
    // The downtime runs from QEMU's own stop, after the operator's `cont`: measured from the
    // operator's stop it would be longer than everything since that `cont`.
    assert!(
        u128::from(summary.downtime_ms) < since_cont.as_millis(),
        "downtime {} ms, the operator's cont {since_cont:?} ago: {summary:?}",
        summary.downtime_ms
    );
    assert!(summary.converged, "{summary:?}\n{}", s.logs());
    assert_eq!(
        switch_steps(&summary),
        ["STOP seen"],
        "{:?}",
        summary.timeline
    );
    // Each of the operator's changes journalled when seen, during pre-copy: an agent that died
    // after QEMU switched over would find a `postmigrate` QEMU that cannot tell them.
    let journal = std::fs::read_to_string(s.pair.src.journal_file()).expect("journal");
    let changes = [
        "stopped during the migration",
        "run again during the migration",
    ];
    let notes: Vec<&str> = journal
        .lines()
        .filter(|l| l.contains(&summary.order_id))
        .filter_map(|l| changes.into_iter().find(|n| l.contains(n)))
        .collect();
    assert_eq!(notes, changes, "{journal}");
    assert_moved(&mut s, &summary).await;
}

/// spec/qemu.md §2 (step 6): an operator's `stop` during pre-copy that is never undone leaves
/// QEMU a paused guest, and QEMU gives no `STOP` when it switches over (pinned by
/// `qemu_counts_its_last_bitmap_sync_after_the_guest_stopped`). The agent sees the switch-over in
/// QEMU's runstate instead: it is marked once, reported, and the downtime is not counted from
/// the operator's stop. (Before, nothing marked it: no `SwitchOver` progress, and a downtime
/// counted from QEMU's completion.) The guest is handed over paused, as QEMU hands over the
/// runstate it finds at completion (SPEC.md §8.7): the stop is the operator's to undo, on the
/// destination now. (Before, the destination ran it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_an_operator_stop_left_in_place_is_seen_at_the_switch_over() {
    let _g = SERIAL.lock().await;
    let Some((mut s, mut q, _mons)) = with_operator_monitor(Vec::new(), Vec::new()).await else {
        return;
    };
    let operator = tokio::spawn(async move {
        stop_in_first_pass(&mut q).await;
        Instant::now()
    });
    let (summary, events) = migrate_slowly(&mut s).await;
    let since_stop = operator.await.expect("operator task").elapsed();
    assert!(summary.converged, "{summary:?}\n{}", s.logs());
    assert_eq!(
        switch_steps(&summary),
        ["switch-over of a stopped guest seen"],
        "{:?}\n{}",
        summary.timeline,
        s.logs()
    );
    assert!(
        events
            .iter()
            .any(|p| matches!(p, Progress::SwitchOver { .. })),
        "{events:?}"
    );
    // QEMU pre-copied for seconds after the operator's stop (the first pass alone, at 40 MB/s),
    // so a downtime counted from that stop would be most of everything since it.
    assert!(
        u128::from(summary.downtime_ms) < since_stop.as_millis() / 2,
        "downtime {} ms, the operator's stop {since_stop:?} ago: {summary:?}",
        summary.downtime_ms
    );
    // Not what the claim read: journalled at the switch-over, before COMMIT.
    assert_journalled_at_the_switch_over(&s.pair.src, "handed over paused");
    assert_handed_over_paused(&mut s, &summary).await;
}

/// spec/qemu.md §2 (step 6): what is handed over is the guest as QEMU switches over, not as
/// the claim saw it. A guest paused at the claim and run by its operator during pre-copy is
/// handed over running, and its journals say nothing of a pause. (Before, it was handed over
/// paused, and a rollback after the switch-over left it stopped: the operator's `cont` undone.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_a_paused_guest_run_during_precopy_is_handed_over_running() {
    let _g = SERIAL.lock().await;
    let Some((mut s, mut q, _mons)) = with_operator_monitor(Vec::new(), Vec::new()).await else {
        return;
    };
    q.stop().await.expect("paused before the order");
    let operator = tokio::spawn(async move {
        into_first_pass(&mut q).await;
        q.cont().await.expect("operator cont");
    });
    let (summary, _) = migrate_slowly(&mut s).await;
    operator.await.expect("operator task");
    assert_journalled_paused(&s.pair.src, false);
    assert_journalled_paused(&s.pair.dst, false);
    assert_journalled_at_the_switch_over(&s.pair.src, "handed over running");
    assert!(!summary.handed_over_paused, "{summary:?}");
    assert_moved(&mut s, &summary).await;
}

/// spec/qemu.md §2 (step 6), in `Pause` mode (the guest was paused at the claim): the
/// operator runs it during pre-copy and stops it again. That `STOP` is not QEMU's (its
/// runstate says `paused`), so the guest is handed over paused; QEMU's own stop at completion
/// reads as the switch-over's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_a_guest_run_and_stopped_again_during_precopy_is_handed_over_paused() {
    let _g = SERIAL.lock().await;
    let Some((mut s, mut q, _mons)) = with_operator_monitor(Vec::new(), Vec::new()).await else {
        return;
    };
    q.stop().await.expect("paused before the order");
    let operator = tokio::spawn(async move {
        into_first_pass(&mut q).await;
        q.cont().await.expect("operator cont");
        tokio::time::sleep(Duration::from_millis(300)).await;
        q.stop().await.expect("operator stop");
    });
    let (summary, _) = migrate_slowly(&mut s).await;
    operator.await.expect("operator task");
    assert_eq!(
        switch_steps(&summary),
        ["pre-switchover seen", "migrate-continue done"],
        "{:?}",
        summary.timeline
    );
    assert_handed_over_paused(&mut s, &summary).await;
}

/// spec/qemu.md §4: an operator's `stop` during pre-copy stays the operator's when the
/// migration fails. The destination agent dies (SIGKILL) while QEMU pre-copies the stopped
/// guest; the source gives the VM back stopped, as QEMU's own rollback would, and says why.
/// (Before, the give-back's `cont` ran a guest its operator had stopped.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_a_guest_stopped_during_precopy_is_given_back_stopped() {
    let _g = SERIAL.lock().await;
    let Some((mut s, mut q, _mons)) = with_operator_monitor(Vec::new(), Vec::new()).await else {
        return;
    };
    let dst_agent = s.pair.procs[1].as_ref().expect("destination agent").pid();
    let operator = tokio::spawn(async move {
        stop_in_first_pass(&mut q).await;
        let killed = std::process::Command::new("kill")
            .args(["-KILL", &dst_agent.to_string()])
            .status();
        assert!(killed.is_ok_and(|k| k.success()), "kill {dst_agent}");
        q
    });
    let (r, _) = try_migrate_slowly(&mut s).await;
    let mut q = operator.await.expect("operator task");
    let err = r.expect_err("the destination agent died");
    assert!(
        err.contains("stopped during the migration, not by it"),
        "{err}\n{}",
        s.logs()
    );
    assert_eq!(s.src.status().await.as_deref(), Ok("paused"), "{err}");
    assert_stays_stopped(&s.src, "the guest stays stopped").await;
    q.cont().await.expect("the operator's cont");
    assert_source_guest_runs(&mut s, Duration::from_secs(10)).await;
}

/// spec/qemu.md §4: an operator's `stop` still in place at the switch-over, and the migration
/// fails after it (the destination agent dies at `FinalChallenge`, its QEMU loaded): the
/// source, which journalled the paused hand-over with its rollback, gives the VM back stopped.
/// (Before, the give-back's `cont` ran it, from `postmigrate`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_a_guest_stopped_at_the_switch_over_is_given_back_stopped() {
    let _g = SERIAL.lock().await;
    let crash = crash_at(CrashPoint::DestinationFinalChallenge);
    let Some((mut s, mut q, _mons)) = with_operator_monitor(Vec::new(), crash).await else {
        return;
    };
    let operator = tokio::spawn(async move {
        stop_in_first_pass(&mut q).await;
        q
    });
    let (r, _) = try_migrate_slowly(&mut s).await;
    let mut q = operator.await.expect("operator task");
    let err = r.expect_err("the destination agent crashed");
    wait_agent_exit(&mut s, 1, Duration::from_secs(10));
    assert!(err.contains("paused as it was"), "{err}\n{}", s.logs());
    assert_eq!(s.src.status().await.as_deref(), Ok("postmigrate"), "{err}");
    let journal = std::fs::read_to_string(s.pair.src.journal_file()).expect("source journal");
    let rolled_back = journal.lines().last().expect("a record");
    assert!(
        rolled_back.contains("\"rolled-back\"") && rolled_back.contains("\"paused_before\":true"),
        "{journal}"
    );
    assert_stays_stopped(&s.src, "the guest stays stopped").await;
    q.cont().await.expect("the operator's cont");
    assert_source_guest_runs(&mut s, Duration::from_secs(10)).await;
}

/// spec/qemu.md §1: a destination QEMU started without `-S` (`-incoming defer` alone) would
/// run the guest the moment loading ends, before the digest check and COMMIT. The agent turns
/// its autostart off (`stop` while `inmigrate`): a destination agent that dies at
/// `FinalChallenge` (loaded, no COMMIT) leaves that QEMU paused, its guest never run, and the
/// source gives its guest back. (Without the `stop`, QEMU 7.2 runs it: two copies.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_a_destination_started_without_s_never_runs_before_commit() {
    let _g = SERIAL.lock().await;
    let opts = VmOpts {
        append: "area=16 rate=8 check=10".into(),
        mem_mib: MEM_MIB,
        dst_env: crash_at(CrashPoint::DestinationFinalChallenge),
        dst_without_s: true,
        ..VmOpts::default()
    };
    let Some(mut s) = setup_with(&opts, true) else {
        return;
    };
    assert_eq!(s.dst.status().await.as_deref(), Ok("inmigrate"));
    let addr = s.pair.dst_addr.clone();
    let (r, _) = migrate(&mut s, &addr, 300).await;
    r.expect_err("the destination agent crashed");
    wait_agent_exit(&mut s, 1, Duration::from_secs(10));
    assert_eq!(
        s.dst.migration().await.map(|m| m.status()),
        Ok(trustmig_qemu::qmp::MigrationStatus::Completed),
        "the destination QEMU loaded the stream"
    );
    assert_eq!(
        s.dst.status().await.as_deref(),
        Ok("paused"),
        "{}",
        s.logs()
    );
    assert_source_guest_runs(&mut s, Duration::from_secs(10)).await;
    assert!(s.dst.ticks().is_empty(), "the destination guest never ran");
}

/// What a destination journals once its QEMU is handed to the order (the stream flows next).
const FED: &str = "the VM's QEMU waits for this migration";

/// Wait (blocking, up to 90 s) until the file at `path` holds `what`; whether it did.
fn wait_for_text(path: &Path, what: &str) -> bool {
    until_blocking(Duration::from_secs(90), Duration::from_millis(20), || {
        std::fs::read_to_string(path).is_ok_and(|t| t.contains(what))
    })
}

/// Send signal `sig` (`-STOP`, `-CONT`) to process `pid`; whether it was sent.
fn signal(pid: u32, sig: &str) -> bool {
    let sent = Command::new("kill").args([sig, &pid.to_string()]).status();
    sent.is_ok_and(|s| s.success())
}

/// 10 MB/s: the first pass over the 64 MiB a busy test guest filled takes seconds.
fn ten_mb_a_second() -> Limits {
    Limits {
        downtime_ms: 300,
        bandwidth_bps: 10_000_000,
        max_rounds: 30,
        on_nonconvergence: NonConvergence::Force,
    }
}

/// SPEC.md §8.8: a destination whose source goes silent without closing anything (its agent
/// frozen by SIGSTOP during the transfer: no reset, no byte, no message) gives up after a
/// step timeout and discards its loaded QEMU, rather than keeping it until a restart (a QEMU
/// destination had no silence check: `activity` said nothing). Thawed, the source finds its
/// session gone and its guest runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_a_destination_gives_up_on_a_silent_source() {
    let _g = SERIAL.lock().await;
    let opts = VmOpts {
        append: "area=64 rate=64 check=25".into(),
        mem_mib: MEM_MIB,
        dst_step_timeout_secs: Some(5),
        ..VmOpts::default()
    };
    let Some(mut s) = setup_with(&opts, true) else {
        return;
    };
    let pid = s.pair.procs[0].as_ref().expect("source agent").pid();
    let journal = s.pair.dst.journal_file();
    let dst_log = s.pair.dir().join("destination.log");
    let freezer = std::thread::spawn(move || {
        // The destination QEMU is this migration's and the stream flows: freeze the source.
        let fed = wait_for_text(&journal, FED);
        std::thread::sleep(Duration::from_millis(300));
        assert!(signal(pid, "-STOP"), "kill -STOP {pid}");
        let gave_up = fed && wait_for_text(&dst_log, "source silent for 5 s");
        assert!(signal(pid, "-CONT"), "kill -CONT {pid}");
        (fed, gave_up)
    });
    let addr = s.pair.dst_addr.clone();
    let (r, _) = migrate_with(&mut s, &addr, ten_mb_a_second()).await;
    let (fed, gave_up) = freezer.join().expect("freezer");
    assert!(fed && gave_up, "fed {fed}, gave up {gave_up}\n{}", s.logs());
    r.expect_err("the destination gave up");
    assert_dst_quits(&mut s, Duration::from_secs(30), "destination QEMU kept").await;
    assert_source_guest_runs(&mut s, Duration::from_secs(20)).await;
}

/// A destination QEMU that does not answer when its migration fails (SIGSTOP: neither QMP
/// nor its stream moves, so the destination gives up and its `quit` cannot get through) stays
/// loaded and the journal holds it to the order: `status` shows it left to the operator (before,
/// only a log line said so, and the VM's entry read "paused" like any other). Once QEMU answers
/// again, `trustmig reconcile` removes it and `status` no longer shows it; the source's guest
/// runs on meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_a_destination_qemu_that_cannot_be_quit_is_left_to_the_operator() {
    let _g = SERIAL.lock().await;
    let opts = VmOpts {
        append: "area=64 rate=64 check=25".into(),
        mem_mib: MEM_MIB,
        dst_step_timeout_secs: Some(3),
        ..VmOpts::default()
    };
    let Some(mut s) = setup_with(&opts, true) else {
        return;
    };
    let pid = s.dst.child.id();
    let journal = s.pair.dst.journal_file();
    let freezer = std::thread::spawn(move || {
        let fed = wait_for_text(&journal, FED);
        std::thread::sleep(Duration::from_millis(300));
        fed && signal(pid, "-STOP")
    });
    let addr = s.pair.dst_addr.clone();
    let (r, _) = migrate_with(&mut s, &addr, ten_mb_a_second()).await;
    assert!(
        freezer.join().expect("freezer"),
        "QEMU was never frozen\n{}",
        s.logs()
    );
    r.expect_err("the destination gave up");
    let left = "left to the operator: the destination QEMU of a migration that never committed here could not be quit";
    let said = until(
        Duration::from_secs(30),
        Duration::from_millis(200),
        async || agent_status(&s.pair.dst).await.contains(left),
    )
    .await;
    let status = agent_status(&s.pair.dst).await;
    assert!(said, "{status}\n{}", s.logs());
    assert_source_guest_runs(&mut s, Duration::from_secs(30)).await;
    assert!(signal(pid, "-CONT"), "kill -CONT {pid}");
    let request = || trustmig_agent::control::Request::Reconcile { vm: VM.into() };
    // QEMU, thawed, may still be finishing with the stream it was fed.
    let mut last = String::new();
    let reconciled = eventually(
        Duration::from_secs(30),
        Duration::from_millis(500),
        async || match ask(&s.pair.dst, request()).await {
            Some(Reply::Reconciled(how)) => Some(how),
            other => {
                eprintln!("not yet: {other:?}");
                last = format!("{other:?}");
                None
            }
        },
    )
    .await;
    let Some(how) = reconciled else {
        panic!("not reconciled: {last}\n{}", s.logs());
    };
    assert!(
        how.contains("discarded (quit)") || how.contains("is gone: nothing to discard"),
        "{how}"
    );
    assert_dst_quits(&mut s, Duration::from_secs(30), "destination QEMU kept").await;
    let status = agent_status(&s.pair.dst).await;
    assert!(!status.contains("left to the operator"), "{status}");
    let journal = std::fs::read_to_string(s.pair.dst.journal_file()).expect("journal");
    let last = journal.lines().last().expect("a record");
    // The journal no longer holds a QEMU to the order: no start quits one for it again.
    assert!(!last.contains("\"fed\":true"), "{last}");
}

/// spec/qemu.md §4: the source agent dies after a switch-over that hands over an operator's
/// `stop` (not what the claim read: journalled then, fsync'd) and before COMMIT. The restarted
/// source gives the guest back stopped, as that record says: its QEMU's `postmigrate` cannot
/// tell. (With the flag kept in memory for the next record, the restart ran the guest.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_a_paused_hand_over_survives_a_source_crash_before_commit() {
    let _g = SERIAL.lock().await;
    let crash = crash_at(CrashPoint::SourceFinalChallenge);
    let Some((mut s, mut q, _mons)) = with_operator_monitor(crash, Vec::new()).await else {
        return;
    };
    let operator = tokio::spawn(async move {
        stop_in_first_pass(&mut q).await;
        q
    });
    let (r, _) = try_migrate_slowly(&mut s).await;
    assert!(r.is_err(), "the source agent crashed: {r:?}");
    let mut q = operator.await.expect("operator task");
    wait_agent_exit(&mut s, 0, Duration::from_secs(10));
    assert_eq!(s.src.status().await.as_deref(), Ok("postmigrate"));
    s.pair.src_env.clear();
    s.pair.start(0).expect("source agent restarts");
    let gave_back = until(
        Duration::from_secs(30),
        Duration::from_millis(100),
        async || s.all_logs().contains("paused as it was"),
    )
    .await;
    assert!(gave_back, "no give-back\n{}", s.logs());
    assert_eq!(s.src.status().await.as_deref(), Ok("postmigrate"));
    assert_stays_stopped(&s.src, "the guest stays stopped").await;
    q.cont().await.expect("the operator's cont");
    assert_source_guest_runs(&mut s, Duration::from_secs(10)).await;
}

/// A paused guest's destination agent dies right after journalling COMMIT, before it could hand
/// the VM over. At restart it settles the order as committed here (SPEC.md §8.8) and, because
/// its COMMIT record says the VM was paused at its source, leaves it paused instead of running it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_a_paused_guest_committed_before_a_crash_stays_paused_after_restart() {
    let _g = SERIAL.lock().await;
    let opts = VmOpts {
        append: "area=16 rate=0 check=10".into(),
        mem_mib: MEM_MIB,
        dst_env: crash_at(CrashPoint::DestinationAfterCommit),
        ..VmOpts::default()
    };
    let Some(mut s) = setup_with(&opts, true) else {
        return;
    };
    s.src.qmp().await.expect("qmp").stop().await.expect("stop");
    let addr = s.pair.dst_addr.clone();
    let _ = migrate(&mut s, &addr, 300).await;
    wait_agent_exit(&mut s, 1, Duration::from_secs(30));
    s.pair.procs[1] = None;
    s.pair.dst_env.clear();
    s.pair.start(1).expect("agent restarts");
    let settled = until(
        Duration::from_secs(30),
        Duration::from_millis(100),
        async || journals_final(&s).await,
    )
    .await;
    assert!(settled, "journals never settled\n{}", s.logs());
    let logs = s.logs();
    assert!(logs.contains("handed over paused"), "{logs}");
    assert_eq!(s.dst.status().await.as_deref(), Ok("paused"), "{logs}");
    assert_eq!(s.src.status().await.as_deref(), Ok("postmigrate"), "{logs}");
    assert_stays_stopped(&s.dst, "the guest stays paused").await;
}

/// The downtime ladder (spec/qemu.md §3): the source QEMU's first pass runs with a 1 ms limit,
/// read on a second monitor as the migration starts (the first pass of the 256 MiB guest
/// outlasts the read, and the agent raises the limit only after it), and the limit never
/// exceeds the order's target; `downtime_steps = 0` gives QEMU the target from the start. (An
/// idle guest then usually switches over right after its first pass, still at 1 ms: asserting
/// that would test this machine's timing, so the final limit is only bounded.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_downtime_ladder_starts_low_unless_configured_flat() {
    let _g = SERIAL.lock().await;
    for (steps, first) in [(None, 1), (Some(0), 300)] {
        let mons = tempfile::tempdir().expect("tempdir");
        let mon = mons.path().join("src.qmp");
        let opts = VmOpts {
            append: "area=16 rate=0 check=10".into(),
            mem_mib: MEM_MIB,
            src_vm: steps.map_or_else(String::new, |n: u32| format!("downtime_steps = {n}\n")),
            src_extra: second_monitor(&mon),
            ..VmOpts::default()
        };
        let Some(mut s) = setup_with(&opts, true) else {
            return;
        };
        // Connected before the order goes, so the first MIGRATION event is not missed.
        let q = Qmp::connect(&mon, Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("monitor {}: {e}", mon.display()));
        let watch = tokio::spawn(watch_ladder(q));
        let addr = s.pair.dst_addr.clone();
        let (r, _) = migrate(&mut s, &addr, 300).await;
        r.unwrap_or_else(|e| panic!("{e}\n{}", s.logs()));
        let (limit, passes) = watch.await.expect("monitor task");
        assert_eq!(
            limit,
            first,
            "first pass, downtime_steps {steps:?}\n{}",
            s.logs()
        );
        // QEMU announces every dirty-bitmap sync, its count in `pass` (the source agent steps
        // the ladder at each, spec/qemu.md §3): 1 at setup, the last with the guest stopped.
        let syncs = s
            .src
            .migration()
            .await
            .ok()
            .and_then(|m| m.ram)
            .map(|r| r.dirty_sync_count);
        assert!(
            syncs.is_some_and(|n| n >= 2 && passes == (1..=n).collect::<Vec<_>>()),
            "MIGRATION_PASS events {passes:?}, dirty-sync-count {syncs:?}"
        );
        let last = s.src.migrate_parameter("downtime-limit").await;
        assert!(
            last.as_ref().is_ok_and(|&l| (first..=300).contains(&l)),
            "downtime_steps {steps:?}: final limit {last:?}\n{}",
            s.logs()
        );
    }
}

/// On a second monitor `q`: QEMU's `downtime-limit` when its migration starts (read at the
/// first `MIGRATION` event, `setup`, at `migrate`), and the `pass` of every `MIGRATION_PASS`
/// event until the migration completed.
async fn watch_ladder(mut q: Qmp) -> (u64, Vec<u64>) {
    async fn next(q: &mut Qmp) -> trustmig_qemu::qmp::Event {
        tokio::time::timeout(Duration::from_secs(120), q.event())
            .await
            .expect("a QEMU event within 120 s")
            .expect("monitor event")
    }
    while next(&mut q).await.name != "MIGRATION" {}
    let p = q
        .execute("query-migrate-parameters", serde_json::json!({}))
        .await
        .expect("query-migrate-parameters");
    let limit = p
        .get("downtime-limit")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or_else(|| panic!("no downtime-limit in {p}"));
    let mut passes = Vec::new();
    loop {
        let ev = next(&mut q).await;
        if ev.name == "MIGRATION_PASS" {
            passes.extend(ev.data.get("pass").and_then(serde_json::Value::as_u64));
        }
        if let Some(st) = ev.migration_status().filter(|st| !st.in_progress()) {
            assert_eq!(st, MigrationStatus::Completed, "the source migration ended");
            return (limit, passes);
        }
    }
}

/// The order's non-convergence action (SPEC.md §8.4) governs QEMU's pre-copy too. A guest that
/// dirties about 80 MB/s through a 20 MB/s bandwidth cap never converges to a 1 ms target:
/// `abort` rolls back after `max_rounds` (the source guest runs on), `force` switches over
/// anyway (the guest's data checks out on the destination), `throttle` turns on QEMU's
/// auto-converge with the native engine's steps, and forces once those rounds are spent too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nonconvergence_follows_the_order() {
    let _g = SERIAL.lock().await;
    let busy = "area=16 rate=200 check=25";
    let hopeless = |on_nonconvergence| Limits {
        downtime_ms: 1,
        bandwidth_bps: 20_000_000,
        max_rounds: 3,
        on_nonconvergence,
    };
    let Some(mut s) = setup(busy, true) else {
        return;
    };
    let addr = s.pair.dst_addr.clone();
    let (r, _) = migrate_with(&mut s, &addr, hopeless(NonConvergence::Abort)).await;
    assert_rolled_back(&mut s, &r, "did not converge").await;
    assert!(r.unwrap_err().contains("order says abort"));
    // QEMU showed its decision to go on at the sync that ended the rounds (RAM sent since,
    // the guest running: spec/qemu.md §3), so the agent did not wait out its cap.
    assert!(!s.logged(NO_DECISION), "{}", s.logs());
    drop(s);

    for action in [NonConvergence::Force, NonConvergence::Throttle] {
        let Some(mut s) = setup(busy, true) else {
            return;
        };
        let addr = s.pair.dst_addr.clone();
        let (r, _) = migrate_with(&mut s, &addr, hopeless(action)).await;
        let summary = r.unwrap_or_else(|e| panic!("{action:?}: {e}\n{}", s.logs()));
        let throttle = action == NonConvergence::Throttle;
        if throttle {
            // QEMU's throttle may make the guest converge on its own; if not, the agent forces
            // once the throttle reached its ceiling (this guest stays too fast for QEMU's
            // heuristic, so its throttle keeps rising until then).
            assert!(summary.throttle > 0, "QEMU throttled: {summary:?}");
            assert!(
                summary.converged || summary.throttle >= 99,
                "forced only once QEMU's throttle reached its ceiling: {summary:?}"
            );
        } else {
            assert!(
                !summary.converged && summary.rounds >= 3,
                "forced after the order's rounds: {summary:?}"
            );
        }
        assert_eq!(
            s.src.migrate_capability("auto-converge").await,
            Ok(throttle)
        );
        if throttle {
            assert_eq!(
                s.src.migrate_parameter("cpu-throttle-initial").await,
                Ok(20)
            );
            assert_eq!(
                s.src.migrate_parameter("cpu-throttle-increment").await,
                Ok(20)
            );
            assert_eq!(s.src.migrate_parameter("max-cpu-throttle").await, Ok(99));
        }
        assert!(!s.logged(NO_DECISION), "{action:?}: {}", s.logs());
        assert_moved(&mut s, &summary).await;
    }
}

/// What the source agent logs when QEMU showed no decision at the sync that ended the
/// order's rounds within its cap.
const NO_DECISION: &str = "QEMU showed no decision";

/// spec/qemu.md §3: a forced switch-over of a guest that dirties faster than a slow link
/// carries, whose stop-and-copy lasts longer than the source's step timeout. QEMU holds its
/// big lock through the stop-and-copy, so the agent's `query-status` at the guest's `STOP`
/// (and any look at `query-migrate`) is answered only after it; while the stream's bytes keep
/// moving, that is no hung QEMU. (Before, the QMP call timed out after the step timeout and
/// the migration rolled back: no guest with more dirty memory than a step timeout's worth of
/// link could be forced over.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_a_stop_and_copy_longer_than_a_step_timeout_completes() {
    let _g = SERIAL.lock().await;
    let opts = VmOpts {
        append: "area=16 rate=200 check=25".into(),
        mem_mib: MEM_MIB,
        src_step_timeout_secs: Some(1),
        ..VmOpts::default()
    };
    let Some(mut s) = setup_with(&opts, true) else {
        return;
    };
    // 4 MB/s: the dirty area (16 MiB) takes about 4 s, in each round and in the stop-and-copy.
    let proxy = Proxy::start(s.pair.dst_addr.clone(), Fault::Throttle(4_000_000))
        .await
        .expect("proxy");
    let limits = Limits {
        downtime_ms: 1,
        bandwidth_bps: 0,
        max_rounds: 1,
        on_nonconvergence: NonConvergence::Force,
    };
    let addr = proxy.addr.clone();
    let (r, _) = migrate_with(&mut s, &addr, limits).await;
    let summary = r.unwrap_or_else(|e| panic!("{e}\n{}", s.logs()));
    assert!(!summary.converged, "forced: {summary:?}");
    assert!(
        summary.downtime_ms > 1000,
        "the stop-and-copy outlasted the 1 s step timeout: {summary:?}"
    );
    assert_moved(&mut s, &summary).await;
}

/// spec/qemu.md §2 (step 6), §3: an idle guest converges at the end of QEMU's first pass, so
/// with `max_rounds = 1` and `abort` the order's budget runs out exactly at the switch-over: at
/// the sync QEMU converges at (`dirty-sync-count` 2, its `MIGRATION_PASS` looked at while QEMU
/// decides; seen when the pass outlasts QEMU's first 100 ms bandwidth estimate) or at the sync
/// it takes after stopping the guest (2 when the pass ended before QEMU had a limit to compare
/// with, 3 otherwise). Neither is a pre-copy round that failed to converge: the migration
/// commits, converged, and is not aborted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_an_abort_order_whose_rounds_end_at_the_switch_over_commits() {
    let _g = SERIAL.lock().await;
    let Some(mut s) = setup("area=16 rate=0 check=10", true) else {
        return;
    };
    let addr = s.pair.dst_addr.clone();
    let limits = Limits {
        downtime_ms: 300,
        bandwidth_bps: 0,
        max_rounds: 1,
        on_nonconvergence: NonConvergence::Abort,
    };
    let (r, _) = migrate_with(&mut s, &addr, limits).await;
    let summary = r.unwrap_or_else(|e| panic!("{e}\n{}", s.logs()));
    assert!(summary.converged, "{summary:?}");
    assert!(!s.logged(NO_DECISION), "{}", s.logs());
    let syncs = s
        .src
        .migration()
        .await
        .ok()
        .and_then(|m| m.ram)
        .map(|r| r.dirty_sync_count);
    assert!(
        syncs.is_some_and(|n| (2..=3).contains(&n)),
        "the budget ran out at the switch-over: dirty-sync-count {syncs:?}"
    );
    assert_moved(&mut s, &summary).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_migrates_a_dirtying_guest() {
    let _g = SERIAL.lock().await;
    let Some(mut s) = setup("area=64 rate=64 check=25", true) else {
        return;
    };
    let addr = s.pair.dst_addr.clone();
    let (r, events) = migrate(&mut s, &addr, 500).await;
    let summary = r.unwrap_or_else(|e| panic!("{e}\n{}", s.logs()));
    let rounds = events
        .iter()
        .filter(|p| matches!(p, Progress::Round { .. }))
        .count();
    assert!(rounds >= 1, "{events:?}");
    assert!(
        summary.bytes_on_wire > 64 << 20,
        "the dirty data area travelled: {summary:?}"
    );
    assert_moved(&mut s, &summary).await;
}

async fn faulted(fault: Fault, expect: &str) {
    let _g = SERIAL.lock().await;
    let Some(mut s) = setup("area=32 rate=16 check=10", true) else {
        return;
    };
    let proxy = Proxy::start(s.pair.dst_addr.clone(), fault)
        .await
        .expect("proxy");
    let (r, _) = migrate(&mut s, &proxy.addr.clone(), 300).await;
    assert!(
        proxy.fired.load(std::sync::atomic::Ordering::SeqCst),
        "the fault was applied"
    );
    assert_rolled_back(&mut s, &r, expect).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_flipped_bit_rolls_back() {
    faulted(Fault::FlipBit(6), "tampered").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_replayed_record_rolls_back() {
    faulted(Fault::Replay(6), "replayed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_dropped_record_rolls_back() {
    faulted(Fault::Drop(6), "records dropped").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_reordered_record_rolls_back() {
    // A later record arriving first is a gap at the moment it is seen.
    faulted(Fault::Reorder(6), "records dropped").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_cut_connection_rolls_back() {
    // Read or written first, by timing: the data stream is named either way.
    faulted(Fault::CutAfter(4 << 20), "data stream").await;
}

/// A destination QEMU started with a configuration the source's stream does not fit (the
/// source has a device it lacks: QEMU 7.2 refuses the unknown section) fails the load and
/// exits. The operator is told the destination QEMU failed to load the stream, or exited while
/// loading it, not only that a write to it failed (which was all the error said); nothing
/// moved and the source runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_a_destination_that_cannot_load_the_stream_is_named() {
    let _g = SERIAL.lock().await;
    let opts = VmOpts {
        append: "area=16 rate=8 check=10".into(),
        mem_mib: MEM_MIB,
        src_extra: ["-device", "virtio-rng-pci"].map(String::from).to_vec(),
        ..VmOpts::default()
    };
    let Some(mut s) = setup_with(&opts, true) else {
        return;
    };
    let addr = s.pair.dst_addr.clone();
    let (r, _) = migrate(&mut s, &addr, 300).await;
    let e = r.as_ref().err().cloned().unwrap_or_default();
    let named = [
        "exited while loading the stream",
        "failed to load the stream",
    ];
    assert!(named.iter().any(|n| e.contains(n)), "{e:?}\n{}", s.logs());
    assert_rolled_back(&mut s, &r, "destination QEMU").await;
}

/// SPEC.md §8.8 rule 3 with QEMU: the source journalled COMMIT and lost the session before
/// `Commit` left; the destination, asked, never committed, so the source QEMU runs again
/// (`cont` from `postmigrate`) and the destination QEMU never does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_lost_commit_is_settled_and_the_source_runs_again() {
    let _g = SERIAL.lock().await;
    settled_not_committed(trustmig_agent::fault::LOSE_COMMIT_ENV).await;
}

/// A migration whose source runs with the fault `env`, settled by asking: "not committed", and
/// the source runs the VM again. `None` when the tools are missing.
async fn settled_not_committed(env: &str) -> Option<Setup> {
    let opts = VmOpts {
        append: "area=16 rate=8 check=10".into(),
        mem_mib: MEM_MIB,
        src_env: vec![(env.into(), "1".into())],
        ..VmOpts::default()
    };
    let mut s = setup_with(&opts, true)?;
    let addr = s.pair.dst_addr.clone();
    let (r, _) = migrate(&mut s, &addr, 300).await;
    assert_rolled_back(&mut s, &r, "settled: the destination never committed").await;
    Some(s)
}

/// SPEC.md §8.8 rule 3 with QEMU: the source asks before it sends its `Commit` (fault
/// injection), the destination answers "not committed" on another connection and journals it;
/// the late `Commit` on the old session is refused, and the destination quits the QEMU that
/// loaded the VM (its session's machine takes the journal's record as it is: the review of the
/// commit machine found it kept that QEMU, paused, for good). The source runs the VM again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_a_late_commit_after_a_not_committed_answer_discards_the_destination() {
    let _g = SERIAL.lock().await;
    let Some(mut s) = settled_not_committed(trustmig_agent::fault::SETTLE_BEFORE_COMMIT_ENV).await
    else {
        return;
    };
    assert_dst_quits(
        &mut s,
        Duration::from_secs(20),
        "the destination QEMU was kept",
    )
    .await;
    assert!(
        s.logs().contains("refusing to commit") || s.logs().contains("settled otherwise"),
        "{}",
        s.logs()
    );
}

/// SPEC.md §8.8 with QEMU, the destination not answering at once: the source QEMU stays
/// stopped while the agent asks again, and when the answer comes ("never committed") the VM is
/// given back as it was before the migration: paused here, since it was paused (spec/qemu.md §4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_unanswered_settlement_is_retried_and_a_paused_vm_stays_paused() {
    let _g = SERIAL.lock().await;
    let opts = VmOpts {
        append: "area=16 rate=8 check=10".into(),
        mem_mib: MEM_MIB,
        src_env: vec![
            (trustmig_agent::fault::LOSE_COMMIT_ENV.into(), "1".into()),
            (
                trustmig_agent::fault::SETTLE_UNANSWERED_ENV.into(),
                "1".into(),
            ),
        ],
        ..VmOpts::default()
    };
    let Some(mut s) = setup_with(&opts, true) else {
        return;
    };
    s.src.qmp().await.expect("qmp").stop().await.expect("stop");
    let addr = s.pair.dst_addr.clone();
    let (r, _) = migrate(&mut s, &addr, 300).await;
    let err = r.expect_err("the session was lost after COMMIT");
    assert!(
        err.contains("asks the destination again"),
        "{err}\n{}",
        s.logs()
    );
    let journal = s.pair.src.journal_file();
    let settled = until(
        Duration::from_secs(15),
        Duration::from_millis(100),
        async || {
            std::fs::read_to_string(&journal)
                .unwrap_or_default()
                .contains("settled: the destination never committed")
        },
    )
    .await;
    assert!(settled, "never settled\n{}", s.logs());
    let logs = s.logs();
    assert!(logs.contains("paused as it was"), "{logs}");
    // Not resumed: QEMU stays stopped where the migration left it.
    assert_eq!(s.src.status().await.as_deref(), Ok("postmigrate"), "{logs}");
    if s.dst.alive() {
        assert_ne!(s.dst.status().await.as_deref(), Ok("running"));
    }
    assert!(s.dst.ticks().is_empty(), "the destination guest never ran");
}

/// An agent's environment that makes it crash at `point` (fault injection).
fn crash_at(point: CrashPoint) -> Vec<(String, String)> {
    vec![(
        trustmig_agent::fault::CRASH_AT_ENV.into(),
        point.name().into(),
    )]
}

/// Wait up to `within` for agent `i` of the pair (0 = source) to exit at its crash point (its
/// log says so: not a panic or any other exit).
fn wait_agent_exit(s: &mut Setup, i: usize, within: Duration) {
    let crashed = until_blocking(within, Duration::from_millis(20), || {
        !s.pair.procs[i].as_mut().is_some_and(|p| p.running())
    });
    assert!(crashed, "agent {i} did not crash\n{}", s.logs());
    // The point it was started to crash at, as its log names it.
    let env = [&s.pair.src_env, &s.pair.dst_env][i];
    let point = (env.iter())
        .find(|(k, _)| k == trustmig_agent::fault::CRASH_AT_ENV)
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("agent {i} was not started to crash"));
    if let Some(p) = &s.pair.procs[i] {
        let log = std::fs::read_to_string(&p.log).unwrap_or_default();
        assert!(
            log.contains(&format!("fault injection: crash point {point}:")),
            "agent {i} exited, not at its crash point {point}\n{}",
            s.logs()
        );
    }
}

/// Issue 14, case 1: the source agent dies when `FinalChallenge` arrives (its QEMU completed
/// and stopped in `postmigrate`; nothing committed). The destination discards its QEMU; the
/// restarted source reconciles its QEMU with the journal (rolled back) and runs the VM again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_source_crash_before_commit_runs_the_vm_again_at_restart() {
    let _g = SERIAL.lock().await;
    let opts = VmOpts {
        append: "area=16 rate=8 check=10".into(),
        mem_mib: MEM_MIB,
        src_env: crash_at(CrashPoint::SourceFinalChallenge),
        ..VmOpts::default()
    };
    let Some(mut s) = setup_with(&opts, true) else {
        return;
    };
    let addr = s.pair.dst_addr.clone();
    let (r, _) = migrate(&mut s, &addr, 300).await;
    assert!(r.is_err(), "the source agent crashed: {r:?}");
    wait_agent_exit(&mut s, 0, Duration::from_secs(10));
    // The crash left the VM stopped on the source and never running on the destination.
    assert_eq!(
        s.src.status().await.as_deref(),
        Ok("postmigrate"),
        "{}",
        s.logs()
    );
    s.pair.src_env.clear();
    s.pair.start(0).expect("source agent restarts");
    assert_source_runs_alone(&mut s, Duration::from_secs(10)).await;
    let logs = s.logs();
    assert!(logs.contains("after restart"), "{logs}");
}

/// Exactly one copy runs, on the destination: its guest's counter advances `within`, the
/// source QEMU stays stopped, and `trustmig status` on both sides says so.
async fn assert_destination_runs_alone(s: &mut Setup, within: Duration) {
    let ran = until(within, Duration::from_millis(100), async || {
        s.dst.status().await.as_deref() == Ok("running")
    })
    .await;
    let now = s.dst.status().await;
    assert!(ran, "destination never ran: {now:?}\n{}", s.logs());
    s.dst.wait_ticks(10, Duration::from_secs(30));
    assert_ne!(s.src.status().await.as_deref(), Ok("running"));
    assert_stays_stopped(&s.src, "the source guest stays stopped").await;
    let dst = agent_status(&s.pair.dst).await;
    assert!(dst.contains(&format!("{VM:20} QEMU: running")), "{dst}");
    let src = agent_status(&s.pair.src).await;
    assert!(!src.contains(&format!("{VM:20} QEMU: running")), "{src}");
}

/// Whether every journal record of both agents is final (none claimed or at COMMIT): the
/// next migration of the VM finds nothing under way or in doubt.
async fn journals_final(s: &Setup) -> bool {
    let mut fin = true;
    for home in [&s.pair.src, &s.pair.dst] {
        let Some(Reply::Status(st)) = ask(home, trustmig_agent::control::Request::Status).await
        else {
            panic!("no status from {}", home.root().display());
        };
        fin &= (st["journal"].as_array().into_iter().flatten())
            .all(|r| !matches!(r["state"].as_str(), Some("claimed" | "committed")));
    }
    fin
}

/// SPEC.md §8.9, crash matrix against real QEMU: each agent is killed (exit 137, as by SIGKILL)
/// at every journal point and mid-transfer, and restarted. Its QEMU lives on, so the VM must
/// end running in exactly one place every time: on the source unless the destination
/// journalled COMMIT (then there, a destination resuming at restart what it committed), both
/// journals settled and `trustmig status` on both sides agreeing; where it runs on the source,
/// the journals accept its next migration (to a destination QEMU still waiting, or a new one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_crash_matrix_every_journal_point_leaves_one_copy_running() {
    let _g = SERIAL.lock().await;
    let mut table = Vec::new();
    for p in CrashPoint::ALL {
        let mut opts = VmOpts {
            append: "area=16 rate=8 check=10".into(),
            mem_mib: MEM_MIB,
            ..VmOpts::default()
        };
        let i = usize::from(!p.in_source());
        if i == 0 {
            opts.src_env = crash_at(p);
        } else {
            opts.dst_env = crash_at(p);
        }
        let Some(mut s) = setup_with(&opts, true) else {
            return;
        };
        let addr = s.pair.dst_addr.clone();
        let (r, _) = migrate(&mut s, &addr, 300).await;
        wait_agent_exit(&mut s, i, Duration::from_secs(30));
        s.pair.procs[i] = None;
        s.pair.src_env.clear();
        s.pair.dst_env.clear();
        s.pair.start(i).expect("agent restarts");
        let moved = matches!(
            p,
            CrashPoint::SourceAfterDone
                | CrashPoint::DestinationAfterCommit
                | CrashPoint::DestinationAfterDone
        );
        if moved {
            assert_destination_runs_alone(&mut s, Duration::from_secs(60)).await;
        } else {
            assert_source_runs_alone(&mut s, Duration::from_secs(60)).await;
        }
        let settled = until(
            Duration::from_secs(30),
            Duration::from_millis(100),
            async || journals_final(&s).await,
        )
        .await;
        assert!(
            settled,
            "{}: journals never settled\n{}",
            p.name(),
            s.logs()
        );
        let at = if moved { "destination" } else { "source" };
        // The journals accept the VM's next migration: from the source, where it runs, to a
        // destination QEMU waiting for it (the one still waiting, or a new one).
        let again = if moved {
            "-"
        } else {
            // One never handed a migration still waits; any other is on its way out (quit by
            // its agent, or exiting after a failed load): a new one replaces it.
            let waiting = s.dst.alive()
                && s.dst.migration().await.map(|m| m.status())
                    == Ok(trustmig_qemu::qmp::MigrationStatus::None);
            if !waiting {
                s.replace_dst("dst-next", &opts, true);
            }
            let (again, _) = migrate(&mut s, &addr, 300).await;
            again.unwrap_or_else(|e| panic!("{}: the next migration: {e}\n{}", p.name(), s.logs()));
            assert_destination_runs_alone(&mut s, Duration::from_secs(60)).await;
            "done"
        };
        table.push(format!(
            "{:<28} runs on the {at} (migration: {}; the next one: {again})",
            p.name(),
            if r.is_ok() { "done" } else { "failed" }
        ));
    }
    println!("{}", table.join("\n"));
}

/// A failing disk under the destination's journal at COMMIT: the line is written whole, then
/// the write fails and cannot be cut back (fault injection), so the next start replays COMMIT.
/// The destination keeps the QEMU that loaded the VM (it discarded it before, and its restart
/// then resumed a QEMU that was gone: the VM ran nowhere); no settlement answer can be
/// journalled, so the source keeps its VM stopped and asks again. Restarted, the destination
/// resumes its QEMU by the file's COMMIT and the source, asking, lets the VM go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_a_commit_the_journal_cannot_confirm_keeps_the_arrived_copy() {
    let _g = SERIAL.lock().await;
    let opts = VmOpts {
        append: "area=16 rate=8 check=10".into(),
        mem_mib: MEM_MIB,
        dst_env: vec![(
            trustmig_agent::fault::JOURNAL_BREAKS_AT_COMMIT_ENV.into(),
            "1".into(),
        )],
        ..VmOpts::default()
    };
    let Some(mut s) = setup_with(&opts, true) else {
        return;
    };
    let addr = s.pair.dst_addr.clone();
    let (r, _) = migrate(&mut s, &addr, 300).await;
    let err = r.expect_err("the destination's COMMIT failed");
    // Not told that it committed: whether it did is what is unknown.
    assert!(!err.contains("does not start here"), "{err}");
    let kept = until(
        Duration::from_secs(20),
        Duration::from_millis(100),
        async || s.logs().contains("what arrived is kept, not discarded"),
    )
    .await;
    assert!(kept, "{err}\n{}", s.logs());
    assert!(s.dst.alive(), "the destination QEMU was quit\n{}", s.logs());
    assert_eq!(
        s.dst.migration().await.map(|m| m.status()),
        Ok(trustmig_qemu::qmp::MigrationStatus::Completed),
        "the destination QEMU holds the VM"
    );
    assert_ne!(s.dst.status().await.as_deref(), Ok("running"));
    assert_ne!(
        s.src.status().await.as_deref(),
        Ok("running"),
        "{}",
        s.logs()
    );
    assert!(
        s.logs().contains("asks the destination again")
            || err.contains("asks the destination again"),
        "{err}\n{}",
        s.logs()
    );
    // `status` and `doctor` say the journal refuses appends until a restart.
    let (ok, text) = cli(&s.pair.dst, &["doctor"]);
    assert!(
        !ok && text.contains("[FAIL] journal: refuses appends (fault injection"),
        "{text}"
    );
    let (_, text) = cli(&s.pair.dst, &["status"]);
    assert!(text.contains("JOURNAL BROKEN: "), "{text}");
    s.pair.stop(1);
    s.pair.dst_env.clear();
    s.pair.start(1).expect("destination agent restarts");
    assert_destination_runs_alone(&mut s, Duration::from_secs(90)).await;
    let settled = until(
        Duration::from_secs(90),
        Duration::from_millis(100),
        async || journals_final(&s).await,
    )
    .await;
    assert!(settled, "journals never settled\n{}", s.logs());
}

/// Run `trustmig ARGS --home HOME`: whether it succeeded, and its stdout and stderr.
fn cli(home: &trustmig_agent::home::Home, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_trustmig"))
        .args(args)
        .arg("--home")
        .arg(home.root())
        .output()
        .expect("trustmig");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// Issue 14, case 2, and the block handover of issue 10: the destination agent dies when it
/// would send `FinalChallenge`, both QEMUs on one shared writable image. The destination QEMU
/// loaded the VM and stays paused, its agent gone. Because it runs with `late-block-activate`
/// it has not activated the image (nor taken its write lock): the source's rollback `cont`
/// succeeds at once, its guest's disk is writable again, and only then does the destination
/// agent come back and discard its QEMU. Without `late-block-activate` QEMU 7.2 takes the lock
/// when loading ends and the source cannot run until that QEMU is gone (this test then fails).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_destination_crash_on_a_shared_image_leaves_one_copy_running() {
    let _g = SERIAL.lock().await;
    let shared = SharedImage::new();
    let drive = shared.drive.clone();
    let opts = VmOpts {
        append: "area=16 rate=8 check=10".into(),
        mem_mib: MEM_MIB,
        src_extra: drive.clone(),
        dst_extra: drive,
        dst_env: crash_at(CrashPoint::DestinationFinalChallenge),
        ..VmOpts::default()
    };
    let Some(mut s) = setup_with(&opts, true) else {
        return;
    };
    let addr = s.pair.dst_addr.clone();
    let (r, _) = migrate(&mut s, &addr, 300).await;
    let err = r.expect_err("the destination agent crashed");
    wait_agent_exit(&mut s, 1, Duration::from_secs(10));
    eprintln!("source says: {err}");
    // The destination QEMU loaded everything and waits, its agent gone ...
    assert!(s.dst.alive(), "{}", s.logs());
    assert_eq!(
        s.dst.migration().await.map(|m| m.status()),
        Ok(trustmig_qemu::qmp::MigrationStatus::Completed),
        "the destination QEMU loaded the stream"
    );
    // ... and the source runs again meanwhile, alone, with a writable disk.
    assert_source_guest_runs(&mut s, Duration::from_secs(10)).await;
    assert!(s.dst.ticks().is_empty(), "the destination guest never ran");
    assert!(!err.contains("not yet running"), "{err}");
    let wrote = hmp_qemu_io(&s.src, "d0", "write -P 0x5a 0 64k").await;
    assert!(
        qemu_log(&s, "src").contains("wrote 65536/65536 bytes at offset 0"),
        "the source's disk is writable after the rollback: {wrote:?}\n{}",
        qemu_log(&s, "src")
    );
    assert!(
        s.dst.alive(),
        "the source did not need the destination gone"
    );
    s.pair.dst_env.clear();
    s.pair.start(1).expect("destination agent restarts");
    assert_dst_quits(
        &mut s,
        Duration::from_secs(20),
        "destination QEMU not discarded",
    )
    .await;
    assert_source_runs_alone(&mut s, Duration::from_secs(10)).await;
}

/// A give-back whose `cont` QEMU refuses for an image lock another process holds is retried
/// in the background against the real QEMU (`keep_trying`) until the lock goes: the source
/// QEMU let go of its image's locks when its migration completed (so `qemu-io` can open the
/// image read-write while the source waits to give the VM back), QEMU 7.2 refuses `cont` with
/// `Failed to get shared "write" lock` (a refusal that clears, spec/qemu.md §4), `status` says "rolled
/// back, not yet running" meanwhile, and once the lock holder exits the VM runs again and the
/// entry goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_a_give_back_refused_for_an_image_lock_runs_once_the_lock_goes() {
    give_back_refused_for_an_image_lock(false).await;
}

/// The same, with a rollback the source's journal could not record (a full disk; fault
/// `source:rolled-back:1`): the journal still shows the order claimed, never committed, so the
/// retries go on as a restart's give-back would (they stopped at once, leaving the VM stopped),
/// and `status` keeps saying that a restart settles the order once the VM runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_a_refused_give_back_whose_rollback_is_unrecorded_runs_once_the_lock_goes() {
    give_back_refused_for_an_image_lock(true).await;
}

async fn give_back_refused_for_an_image_lock(rollback_unrecorded: bool) {
    let _g = SERIAL.lock().await;
    if !have_qemu_io() {
        return;
    }
    let shared = SharedImage::new();
    let drive = shared.drive.clone();
    let mut src_env = vec![(HOLD_ENV.into(), Hold::BeforeGiveBack.env(4000))];
    if rollback_unrecorded {
        let fails = (
            trustmig_agent::fault::JOURNAL_FAILS_ENV,
            "source:rolled-back:1",
        );
        src_env.push((fails.0.into(), fails.1.into()));
    }
    let opts = VmOpts {
        append: "area=16 rate=8 check=10".into(),
        mem_mib: MEM_MIB,
        src_extra: drive.clone(),
        dst_extra: drive,
        src_env,
        dst_env: crash_at(CrashPoint::DestinationFinalChallenge),
        metrics: true,
        ..VmOpts::default()
    };
    let Some(mut s) = setup_with(&opts, true) else {
        return;
    };
    // While the source holds before its give-back, another process takes the image.
    let log = s.pair.procs[0].as_ref().expect("source agent").log.clone();
    let path = shared.path.clone();
    let locker = tokio::task::spawn_blocking(move || {
        assert!(
            wait_for_text(&log, &Hold::BeforeGiveBack.logged()),
            "the source never gave back"
        );
        lock_image(&path)
    });
    let addr = s.pair.dst_addr.clone();
    let (r, _) = migrate(&mut s, &addr, 300).await;
    let mut locker = locker.await.expect("locker");
    let err = r.expect_err("the destination agent crashed");
    assert!(
        err.contains("not yet running") && err.contains("Failed to get shared \"write\" lock"),
        "{err}\n{}",
        s.logs()
    );
    assert_ne!(s.src.status().await.as_deref(), Ok("running"));
    let text = agent_status(&s.pair.src).await;
    assert!(text.contains("rolled back, not yet running"), "{text}");
    let [metrics, _] = s.metrics.clone().expect("metrics");
    let giving_back = "trustmig_vms_giving_back";
    let m = tokio::task::spawn_blocking({
        let metrics = metrics.clone();
        move || scrape_until(&metrics, giving_back, 1.0)
    });
    m.await.expect("scrape");
    // The lock goes: a retry runs the VM, and `status` says nothing more of it.
    let _ = locker.kill();
    let _ = locker.wait();
    assert_source_guest_runs(&mut s, Duration::from_secs(30)).await;
    let running = eventually(
        Duration::from_secs(10),
        Duration::from_millis(100),
        async || Some(agent_status(&s.pair.src).await).filter(|t| !t.contains("not yet running")),
    )
    .await;
    let Some(text) = running else {
        panic!("{}", agent_status(&s.pair.src).await);
    };
    let unrecorded = "left to the operator: the outcome of order";
    assert_eq!(text.contains(unrecorded), rollback_unrecorded, "{text}");
    if rollback_unrecorded {
        assert!(text.contains("restart the agent"), "{text}");
    } else {
        assert!(!text.contains("left to the operator"), "{text}");
    }
    let m = tokio::task::spawn_blocking(move || scrape_until(&metrics, giving_back, 0.0));
    m.await.expect("scrape");
    assert!(s.dst.ticks().is_empty(), "the destination guest never ran");
}

/// A destination whose `cont` after COMMIT QEMU keeps refusing (another process took the
/// shared image the source QEMU let go of) leaves the VM to the operator once its step timeout
/// of retries is spent: `status` says "left to the operator: committed here, but the VM does
/// not start", and the operator's `trustmig reconcile`, once the lock is gone, runs the VM and
/// clears it. An order to send it on meanwhile is refused. The source's copy stays stopped
/// throughout (never two).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_a_committed_vm_that_does_not_start_is_left_to_the_operator_until_reconciled() {
    let _g = SERIAL.lock().await;
    if !have_qemu_io() {
        return;
    }
    let shared = SharedImage::new();
    let (image, drive) = (shared.path.clone(), shared.drive.clone());
    let opts = VmOpts {
        append: "area=16 rate=8 check=10".into(),
        mem_mib: MEM_MIB,
        src_extra: drive.clone(),
        dst_extra: drive,
        dst_env: vec![(HOLD_ENV.into(), Hold::BeforeResume.env(3000))],
        // The destination's `cont` is retried for a step timeout before it is left.
        dst_step_timeout_secs: Some(5),
        metrics: true,
        ..VmOpts::default()
    };
    let Some(mut s) = setup_with(&opts, true) else {
        return;
    };
    let log = s.pair.procs[1]
        .as_ref()
        .expect("destination agent")
        .log
        .clone();
    let locker = tokio::task::spawn_blocking(move || {
        assert!(
            wait_for_text(&log, &Hold::BeforeResume.logged()),
            "the destination never committed"
        );
        lock_image(&image)
    });
    let addr = s.pair.dst_addr.clone();
    let (r, _) = migrate(&mut s, &addr, 300).await;
    let mut locker = locker.await.expect("locker");
    // The source's operator hears that the VM is left to the destination's, not only "moved".
    let said = format!("{r:?}");
    assert!(
        said.contains(
            "committed, but the VM does not start here; left to this host's operator: QEMU: QEMU refused cont"
        ) && said.contains("; VM: moved"),
        "{said}\n{}",
        s.logs()
    );
    let home = s.pair.dst.clone();
    let left = "left to the operator: committed here, but the VM does not start";
    let said = until(
        Duration::from_secs(30),
        Duration::from_millis(100),
        async || agent_status(&home).await.contains(left),
    )
    .await;
    let status = agent_status(&home).await;
    assert!(said, "{status}\n{}", s.logs());
    // QEMU's own refusal, named as such: not "migration failed", which it was not.
    let line = status
        .lines()
        .find(|l| l.contains(left))
        .unwrap_or_default();
    assert!(
        line.contains("(QEMU: QEMU refused cont") && !line.contains("migration failed"),
        "{line}"
    );
    assert_ne!(s.dst.status().await.as_deref(), Ok("running"));
    assert_ne!(s.src.status().await.as_deref(), Ok("running"));
    // An operator's alert sees it too.
    let [_, metrics] = s.metrics.clone().expect("metrics");
    let left = "trustmig_vms_left_to_operator";
    let m = tokio::task::spawn_blocking({
        let metrics = metrics.clone();
        move || scrape_until(&metrics, left, 1.0)
    });
    m.await.expect("scrape");
    // Not sent on meanwhile: QEMU shows a copy it never ran as paused, and it would go as
    // "paused as it was", which it was not (SPEC.md §8.8 `holds_vm`; an audit found it sent).
    let refusal = refusal_of_an_order_back(&s).await;
    assert!(
        refusal.contains("the journal does not yet record that it ran here")
            && refusal.contains("the VM does not start"),
        "{refusal}\n{}",
        s.logs()
    );
    // The operator frees the image and reconciles: the VM runs, and `status` says no more.
    let _ = locker.kill();
    let _ = locker.wait();
    let request = trustmig_agent::control::Request::Reconcile { vm: VM.into() };
    let reply = ask(&home, request).await;
    assert!(
        matches!(&reply, Some(Reply::Reconciled(_))),
        "{reply:?}\n{}",
        s.logs()
    );
    assert_eq!(s.dst.status().await.as_deref(), Ok("running"));
    let text = agent_status(&home).await;
    assert!(!text.contains("left to the operator"), "{text}");
    let m = tokio::task::spawn_blocking(move || scrape_until(&metrics, left, 0.0));
    m.await.expect("scrape");
    assert_ne!(s.src.status().await.as_deref(), Ok("running"));
}

/// A 4 MiB raw image both QEMUs of a test open (shared storage), and the QEMU arguments that
/// give it to the guest as virtio disk `d0`.
struct SharedImage {
    _dir: tempfile::TempDir,
    path: PathBuf,
    drive: Vec<String>,
}

impl SharedImage {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("shared.raw");
        std::fs::write(&path, vec![0u8; 4 << 20]).expect("image");
        let drive = vec![
            "-drive".to_string(),
            format!("file={},format=raw,if=none,id=d0", path.display()),
            "-device".into(),
            "virtio-blk-pci,drive=d0".into(),
        ];
        Self {
            _dir: dir,
            path,
            drive,
        }
    }
}

/// Whether `qemu-io` runs here (else the test is skipped, saying so; in CI it fails).
fn have_qemu_io() -> bool {
    have("qemu-io", "--version") || !missing("qemu-io (apt-get install -y qemu-utils)")
}

/// `qemu-io` holding `image` open for writing (its write lock) until killed; it must still run
/// half a second after it started (the image was free to take).
fn lock_image(image: &Path) -> std::process::Child {
    let mut child = Command::new("qemu-io")
        .args(["-f", "raw"])
        .arg(image)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("qemu-io");
    std::thread::sleep(Duration::from_millis(500));
    let exited = child.try_wait().expect("qemu-io");
    assert!(
        exited.is_none(),
        "qemu-io could not open {}: {exited:?}",
        image.display()
    );
    child
}

/// A migration whose destination agent dies when it would send `FinalChallenge`, its QEMU
/// loaded and stopped: the source runs the guest again, and the destination agent, gone, starts
/// next without the crash. Returns the setup and the destination agent's address.
async fn destination_killed_at_final_challenge() -> Option<(Setup, String)> {
    let opts = VmOpts {
        append: "area=16 rate=8 check=10".into(),
        mem_mib: MEM_MIB,
        dst_env: crash_at(CrashPoint::DestinationFinalChallenge),
        ..VmOpts::default()
    };
    let mut s = setup_with(&opts, true)?;
    let addr = s.pair.dst_addr.clone();
    let (r, _) = migrate(&mut s, &addr, 300).await;
    r.expect_err("the destination agent crashed");
    wait_agent_exit(&mut s, 1, Duration::from_secs(10));
    assert_source_guest_runs(&mut s, Duration::from_secs(10)).await;
    s.pair.procs[1] = None;
    s.pair.dst_env.clear();
    Some((s, addr))
}

/// SPEC.md §8.8, found by the model checker: a restart settles an order interrupted before
/// COMMIT (the destination agent died when it would send `FinalChallenge`, its QEMU loaded and
/// paused) and journals it rolled back, then fails before it quits that QEMU (here: its listen
/// port is taken). The next start still discards it: the discard follows from the journal as
/// it is, not from which start settled the order. (Before, only the settling start discarded,
/// and the loaded QEMU stayed for good.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_a_start_that_dies_after_settling_leaves_the_discard_to_the_next() {
    let _g = SERIAL.lock().await;
    let Some((mut s, addr)) = destination_killed_at_final_challenge().await else {
        return;
    };
    // The restart settles the order, then cannot bind its listen address.
    let taken = std::net::TcpListener::bind(&addr).expect("take the destination's port");
    let e = s.pair.start(1).expect_err("the destination cannot listen");
    assert!(e.to_string().contains("Address already in use"), "{e}");
    let journal = std::fs::read_to_string(s.pair.dst.journal_file()).expect("journal");
    assert!(
        journal.contains("\"rolled-back\""),
        "the failed start settled the order:\n{journal}"
    );
    assert!(s.dst.alive(), "the failed start never reached its QEMU");
    assert_eq!(
        s.dst.migration().await.map(|m| m.status()),
        Ok(trustmig_qemu::qmp::MigrationStatus::Completed),
        "the destination QEMU holds the loaded VM"
    );
    drop(taken);
    s.pair.start(1).expect("destination agent starts");
    assert_dst_quits(&mut s, Duration::from_secs(20), "loaded QEMU kept").await;
    assert_source_runs_alone(&mut s, Duration::from_secs(10)).await;
}

/// SPEC.md §8.8: a copy that arrived and never committed here, still to be discarded, is never
/// sent on as the VM. The destination agent dies at `FinalChallenge`: its QEMU holds the loaded
/// copy, stopped, its incoming migration `completed` (to QEMU's own checks, a paused VM), and
/// the source runs the VM again. The destination agent restarts while the test holds its
/// QEMU's one QMP connection, so its discard waits; an order for the VM from there is refused
/// before its claim, naming why. (Before, QEMU's `paused` passed the source's checks, and the
/// stale copy was claimed and sent while the VM ran at its source: found by the model checker
/// over two orders.) Once QMP is free, the restart's discard quits that QEMU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_a_copy_still_to_be_discarded_is_not_sent_on() {
    let _g = SERIAL.lock().await;
    let Some((mut s, _)) = destination_killed_at_final_challenge().await else {
        return;
    };
    // What QEMU alone shows of the stale copy: a paused VM, not migrating (QEMU 7.2).
    assert_eq!(s.dst.status().await.as_deref(), Ok("paused"));
    assert_eq!(
        s.dst.migration().await.map(|m| m.status()),
        Ok(trustmig_qemu::qmp::MigrationStatus::Completed)
    );
    let held = s.dst.qmp().await.expect("the destination QEMU's QMP, held");
    s.pair.start(1).expect("destination agent restarts");
    let refusal = refusal_of_an_order_back(&s).await;
    assert!(
        refusal.contains("is to be discarded, never run or sent"),
        "{refusal}\n{}",
        s.logs()
    );
    let journal = std::fs::read_to_string(s.pair.dst.journal_file()).expect("journal");
    // Only the first order's destination records: the order back was never claimed here.
    assert!(
        !journal.contains("\"role\":\"source\""),
        "refused before its claim:\n{journal}"
    );
    drop(held);
    assert_dst_quits(&mut s, Duration::from_secs(90), "loaded QEMU kept").await;
    assert_source_runs_alone(&mut s, Duration::from_secs(10)).await;
}

/// SPEC.md §8.8: a destination order that failed (a tampered record) discards its QEMU and
/// journals that it did, so a later restart of the destination agent leaves alone the fresh
/// QEMU an operator started for the next order (a restart discards a QEMU for a rolled-back
/// order only while the journal says the order still has one); that next order moves the VM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_a_restart_leaves_a_fresh_destination_qemu_alone() {
    let _g = SERIAL.lock().await;
    let opts = VmOpts {
        append: "area=32 rate=16 check=10".into(),
        mem_mib: MEM_MIB,
        ..VmOpts::default()
    };
    let Some(mut s) = setup_with(&opts, true) else {
        return;
    };
    let addr = s.pair.dst_addr.clone();
    let proxy = Proxy::start(addr.clone(), Fault::FlipBit(6))
        .await
        .expect("proxy");
    let (r, _) = migrate(&mut s, &proxy.addr.clone(), 300).await;
    assert_rolled_back(&mut s, &r, "tampered").await;
    assert_dst_quits(&mut s, Duration::from_secs(20), "failed destination kept").await;
    let journal = std::fs::read_to_string(s.pair.dst.journal_file()).expect("journal");
    assert!(
        journal.contains("its QEMU was discarded"),
        "{journal}\n{}",
        s.logs()
    );
    // The operator starts a fresh destination QEMU; the destination agent restarts.
    s.replace_dst("dst-next", &opts, true);
    s.pair.stop(1);
    s.pair.start(1).expect("destination agent restarts");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        s.dst.status().await.as_deref(),
        Ok("inmigrate"),
        "{}",
        s.logs()
    );
    let (again, _) = migrate(&mut s, &addr, 300).await;
    let summary = again.unwrap_or_else(|e| panic!("the next migration: {e}\n{}", s.logs()));
    assert_moved(&mut s, &summary).await;
}

/// SPEC.md §8.8, reconciliation: a restart never resumes a QEMU that sent the VM away, even
/// when the journal's latest order of the VM here is one that brought it here and committed
/// (written by hand below: the agent's own journal never reads so since `VmHistory`, which the
/// model checker checks over two orders without this guard). QEMU 7.2 reports such a source
/// stopped in `postmigrate` with its migration `completed`, as a loaded destination reports
/// `completed` too: only the runstate tells them apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_a_restart_does_not_resume_a_qemu_that_sent_the_vm_away() {
    let _g = SERIAL.lock().await;
    let opts = VmOpts {
        append: "area=16 rate=0 check=10".into(),
        mem_mib: MEM_MIB,
        ..VmOpts::default()
    };
    let Some(mut s) = setup_with(&opts, true) else {
        return;
    };
    let addr = s.pair.dst_addr.clone();
    let (r, _) = migrate(&mut s, &addr, 300).await;
    let summary = r.unwrap_or_else(|e| panic!("{e}\n{}", s.logs()));
    assert_moved(&mut s, &summary).await;
    {
        let mut q = s.src.qmp().await.expect("qmp");
        let st = q.query_status().await.expect("query-status");
        let m = q.query_migrate().await.expect("query-migrate");
        assert_eq!((st.running, st.status.as_str()), (false, "postmigrate"));
        assert_eq!(m.status(), trustmig_qemu::qmp::MigrationStatus::Completed);
    }
    s.pair.stop(0);
    let path = s.pair.src.journal_file();
    assert!(path.exists(), "the source journalled the migration");
    let order = "ab".repeat(16);
    journal_a_commit_here(&path, &order);
    s.pair.start(0).expect("source agent restarts");
    let refused = until(
        Duration::from_secs(30),
        Duration::from_millis(200),
        async || s.all_logs().contains("sent the VM away since"),
    )
    .await;
    let now = s.src.status().await;
    assert!(
        refused,
        "no refusal to resume logged; the source QEMU is {now:?}\n{}",
        s.logs()
    );
    let journal = std::fs::read_to_string(&path).expect("source journal");
    let last = journal.lines().last().expect("a record");
    // Not DONE: that would say the VM ran here.
    assert!(
        last.contains(&order) && last.contains("\"settled\""),
        "{journal}"
    );
    assert_eq!(
        s.src.status().await.as_deref(),
        Ok("postmigrate"),
        "{}",
        s.logs()
    );
    assert_eq!(s.dst.status().await.as_deref(), Ok("running"));
}

/// SPEC.md §8.8: a VM whose reconciliation a start left to the operator is not sent until the
/// operator has seen to it and run `trustmig reconcile`, which looks at QEMU again and records
/// what it finds (before, only another restart did). The destination agent's journal (written
/// by hand) holds an order committed here; at its start the VM's QEMU waits for a migration,
/// so the restart cannot resume anything and leaves the VM to the operator. While QEMU is so,
/// `trustmig reconcile` says the same, and an order for the VM from there is refused, naming
/// the command; once the operator runs the VM here (a fresh QEMU), it records DONE, and the
/// journal lets the VM go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_an_operator_reconciles_a_vm_a_start_left_to_them() {
    let _g = SERIAL.lock().await;
    let opts = VmOpts {
        append: "area=16 rate=0 check=10".into(),
        mem_mib: MEM_MIB,
        ..VmOpts::default()
    };
    let Some(mut s) = setup_with(&opts, true) else {
        return;
    };
    s.pair.stop(1);
    let path = s.pair.dst.journal_file();
    let order = "cd".repeat(16);
    journal_a_commit_here(&path, &order);
    s.pair.start(1).expect("destination agent restarts");
    let left = until(
        Duration::from_secs(30),
        Duration::from_millis(200),
        async || {
            s.all_logs()
                .contains("the VM may be lost; check it by hand")
        },
    )
    .await;
    assert!(
        left,
        "the start did not leave the VM to the operator\n{}",
        s.logs()
    );
    let home = s.pair.dst.clone();
    let trustmig = |args: &[&str]| cli(&home, args);
    let reconcile = |vm: &str| trustmig(&["reconcile", vm]);
    let (_, status) = trustmig(&["status"]);
    assert!(
        status.contains("left to the operator: committed here, but QEMU is in state"),
        "{status}"
    );
    // `doctor` names it too, rather than calling the host healthy.
    let (_, text) = trustmig(&["doctor"]);
    assert!(
        text.contains(&format!("[WARN] VM {VM}: "))
            && text.contains("left to the operator: committed here, but QEMU is in state"),
        "{text}"
    );
    let (ok, text) = reconcile("nosuch");
    assert!(!ok && text.contains("no VM named \"nosuch\""), "{text}");
    // QEMU still waits for a migration: still left to the operator, nothing journalled.
    let (ok, text) = reconcile(VM);
    assert!(
        !ok && text.contains("not reconciled") && text.contains("\"inmigrate\""),
        "{text}\n{}",
        s.logs()
    );
    let refusal = refusal_of_an_order_back(&s).await;
    assert!(
        refusal.contains(&format!(
            "check it by hand, then run `{}`",
            s.pair.dst.command(&["reconcile", VM])
        )),
        "{refusal}"
    );
    // The operator runs the VM here.
    s.replace_dst("dst-run", &opts, false);
    let (ok, text) = reconcile(VM);
    assert!(
        ok && text.contains("committed here and running"),
        "{text}\n{}",
        s.logs()
    );
    let journal = std::fs::read_to_string(&path).expect("journal");
    let last = journal.lines().last().expect("a record");
    assert!(
        last.contains(&order) && last.contains("\"done\""),
        "{journal}"
    );
    let (_, status) = trustmig(&["status"]);
    assert!(!status.contains("left to the operator"), "{status}");
    let (ok, text) = reconcile(VM);
    assert!(ok && text.contains("nothing to reconcile"), "{text}");
    assert_eq!(s.dst.status().await.as_deref(), Ok("running"));
}

/// Append to the journal at `path` (its agent stopped) a destination order `order` (hex) of
/// the VM, claimed and committed here, its QEMU handed to it: what an agent killed after its
/// COMMIT leaves, written by hand. A missing journal is an agent's that never journalled.
fn journal_a_commit_here(path: &Path, order: &str) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let mut journal = std::fs::read_to_string(path).unwrap_or_default();
    for state in ["claimed", "committed"] {
        let line = serde_json::json!({
            "order_id": order, "role": "destination", "vm": VM, "state": state,
            "not_after": now + 3600, "at": now, "fed": true,
        });
        journal += &format!("{line}\n");
    }
    std::fs::write(path, journal).expect("journal written");
}

/// An order to send the VM back (B to A), submitted to the destination agent, which must
/// refuse it: the refusal's text.
async fn refusal_of_an_order_back(s: &Setup) -> String {
    let order = s.pair.order_back(VM, limits(300), 600).expect("order back");
    let mut refusal = None;
    s.pair
        .migrate_from(1, &order, |r| match r {
            Reply::Error(e) => refusal = Some(e),
            Reply::Progress(Progress::Failed { error, .. }) => refusal = Some(error),
            _ => {}
        })
        .await
        .expect("the order reaches the destination agent");
    refusal.unwrap_or_else(|| panic!("not refused\n{}", s.logs()))
}

/// HMP `qemu-io DEV "CMD"` through `vm`'s QMP socket (its output goes to QEMU's stdout, the
/// `<name>.qemu.log`); returns the HMP reply (empty on success).
async fn hmp_qemu_io(vm: &QemuVm, dev: &str, cmd: &str) -> String {
    let mut q = vm.qmp().await.expect("qmp");
    let out = q
        .execute(
            "human-monitor-command",
            serde_json::json!({ "command-line": format!("qemu-io {dev} \"{cmd}\"") }),
        )
        .await
        .expect("human-monitor-command");
    out.as_str().unwrap_or_default().to_string()
}

/// QEMU's stdout and stderr of the test's QEMU `name` ("src", "dst").
fn qemu_log(s: &Setup, name: &str) -> String {
    std::fs::read_to_string(s.pair.dir().join(format!("{name}.qemu.log"))).unwrap_or_default()
}

/// The Ethernet frames QEMUs send on a `-netdev socket,udp=...` NIC, collected from a UDP
/// socket by a background thread: (sender's port, ethertype) per frame.
struct FrameTap {
    port: u16,
    frames: std::sync::Arc<std::sync::Mutex<Vec<(u16, u16)>>>,
}

impl FrameTap {
    fn start() -> Self {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let port = sock.local_addr().expect("addr").port();
        let frames = std::sync::Arc::<std::sync::Mutex<Vec<(u16, u16)>>>::default();
        let out = std::sync::Arc::downgrade(&frames);
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            loop {
                let got = sock.recv_from(&mut buf);
                let Some(out) = out.upgrade() else { return };
                if let Ok((n, from)) = got {
                    if n >= 14 {
                        let typ = u16::from_be_bytes([buf[12], buf[13]]);
                        out.lock().expect("frames").push((from.port(), typ));
                    }
                }
            }
        });
        Self { port, frames }
    }

    /// A QEMU NIC that sends its frames here, from `local` (a free UDP port of its own).
    fn nic(&self, local: u16) -> Vec<String> {
        vec![
            "-netdev".into(),
            format!(
                "socket,id=n0,udp=127.0.0.1:{},localaddr=127.0.0.1:{local}",
                self.port
            ),
            "-device".into(),
            "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56,addr=0x6".into(),
        ]
    }

    /// RARP frames (ethertype 0x8035, QEMU's self-announce) sent from `port` so far.
    fn rarps_from(&self, port: u16) -> usize {
        let frames = self.frames.lock().expect("frames");
        frames
            .iter()
            .filter(|&&(p, t)| p == port && t == 0x8035)
            .count()
    }
}

fn free_udp_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    s.local_addr().expect("addr").port()
}

/// The source and destination QEMUs with a NIC each, sending to one `FrameTap`.
fn nic_setup(dst_env: Vec<(String, String)>) -> Option<(Setup, FrameTap, u16)> {
    let tap = FrameTap::start();
    let (src_port, dst_port) = (free_udp_port(), free_udp_port());
    let opts = VmOpts {
        append: "area=16 rate=8 check=10".into(),
        mem_mib: MEM_MIB,
        src_extra: tap.nic(src_port),
        dst_extra: tap.nic(dst_port),
        dst_env,
        ..VmOpts::default()
    };
    let s = setup_with(&opts, true)?;
    Some((s, tap, dst_port))
}

/// Issue 10, network handover: a destination QEMU (`-incoming defer -S`) that loaded the VM
/// holds its self-announce (RARP) frames in its net queue while the VM is stopped, so no host
/// claims the guest's MAC before trustmig's gate. Here the destination agent dies at
/// `FinalChallenge` (QEMU loaded, never resumed): no RARP leaves it, and none after the
/// restarted agent discards it, while the source runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_rolled_back_destination_never_announces_the_guest() {
    let _g = SERIAL.lock().await;
    let Some((mut s, tap, dst_port)) = nic_setup(crash_at(CrashPoint::DestinationFinalChallenge))
    else {
        return;
    };
    let addr = s.pair.dst_addr.clone();
    let (r, _) = migrate(&mut s, &addr, 300).await;
    r.expect_err("the destination agent crashed");
    wait_agent_exit(&mut s, 1, Duration::from_secs(10));
    assert_eq!(
        s.dst.migration().await.map(|m| m.status()),
        Ok(trustmig_qemu::qmp::MigrationStatus::Completed),
        "the destination QEMU loaded the stream"
    );
    // QEMU announces 5 times within about a second of a load it resumes; give it 2 s.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        tap.rarps_from(dst_port),
        0,
        "a loaded, stopped destination announced"
    );
    s.pair.dst_env.clear();
    s.pair.start(1).expect("destination agent restarts");
    assert_source_runs_alone(&mut s, Duration::from_secs(10)).await;
    assert_dst_quits(
        &mut s,
        Duration::from_secs(20),
        "destination QEMU not discarded",
    )
    .await;
    assert_eq!(
        tap.rarps_from(dst_port),
        0,
        "a discarded destination announced"
    );
}

/// Issue 10, network handover, the other half: after a migration that commits, the
/// destination announces the guest (its RARPs leave at `cont`, after `Resumed`'s gate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_resumed_destination_announces_the_guest() {
    let _g = SERIAL.lock().await;
    let Some((mut s, tap, dst_port)) = nic_setup(Vec::new()) else {
        return;
    };
    let addr = s.pair.dst_addr.clone();
    let (r, _) = migrate(&mut s, &addr, 300).await;
    let summary = r.unwrap_or_else(|e| panic!("{e}\n{}", s.logs()));
    // spec/qemu.md §5: QEMU 7.2 announces 5 times per NIC (its announce rounds, within about
    // a second), then stops.
    let all = until(
        Duration::from_secs(5),
        Duration::from_millis(50),
        async || tap.rarps_from(dst_port) >= 5,
    )
    .await;
    let seen = tap.rarps_from(dst_port);
    assert!(seen > 0, "the resumed destination never announced");
    assert!(all, "{seen} announcements");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(tap.rarps_from(dst_port), 5, "then no more");
    assert_moved(&mut s, &summary).await;
}

/// Pins what spec/qemu.md §4 and SPEC.md §8.8 say of QEMU 7.2's image locks: while a QEMU has
/// a writable image open, a second QEMU cannot open it (it exits naming the lock); at the
/// moment `quit_and_wait` returns (QEMU closed its QMP socket) its locks on the image are
/// already gone (looked at with `F_OFD_GETLK` at once, by a probe started beforehand: QEMU
/// closes its images before its QMP socket), and a second QEMU opens the image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_image_lock_is_gone_when_qmp_closes_after_quit() {
    let _g = SERIAL.lock().await;
    if tools_missing() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("img.raw");
    std::fs::write(&image, vec![0u8; 1 << 20]).expect("image");
    let drive = [
        "-drive".to_string(),
        format!("file={},format=raw,if=virtio", image.display()),
    ];
    let a = QemuVm::idle(dir.path(), "a", &drive);
    // A second opener is refused while `a` holds the image.
    let mut b = QemuVm::idle(dir.path(), "b", &drive);
    let exited = until_blocking(Duration::from_secs(20), Duration::from_millis(20), || {
        !b.alive()
    });
    assert!(exited, "a second QEMU opened an image another QEMU holds");
    assert!(b.log().contains("lock"), "{}", b.log());
    let mut probe = LockProbe::start(&image);
    assert_eq!(probe.look(), "locked", "QEMU holds no lock on its image");
    let mut q = Qmp::connect(&a.qmp, Duration::from_secs(10))
        .await
        .expect("qmp a");
    q.quit_and_wait(Duration::from_secs(10))
        .await
        .expect("a quits");
    assert_eq!(
        probe.look(),
        "unlocked",
        "QEMU closed its QMP socket with its image still locked"
    );
    let mut c = QemuVm::idle(dir.path(), "c", &drive);
    std::thread::sleep(Duration::from_millis(300));
    assert!(c.alive(), "the image was still locked: {}", c.log());
}

/// spec/qemu.md §1: QEMU 7.2 takes `-blockdev` and `-device` in JSON (as libvirt writes them),
/// and an inline child's `node-name` (`file.node-name`) names a node a device may use; so
/// `trustmig qemu destination-command` leaves out a transferred disk's device that names that
/// inline node, as it does one naming the format node. Checked against QEMU itself: the
/// source's line runs, QEMU lists both nodes and attaches the device to the inline one; the
/// derived line holds neither option.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_reads_json_options_and_an_inline_node_name_as_the_parser_does() {
    let _g = SERIAL.lock().await;
    if tools_missing() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("d0.raw");
    std::fs::write(&image, vec![0u8; 1 << 20]).expect("image");
    let blockdev = serde_json::json!({
        "driver": "raw",
        "node-name": "d0",
        "file": {"driver": "file", "filename": image, "node-name": "f0"},
    });
    let device = serde_json::json!({"driver": "virtio-blk-pci", "drive": "f0", "id": "vd0"});
    let extra = [
        "-blockdev".to_string(),
        blockdev.to_string(),
        "-device".into(),
        device.to_string(),
    ];
    let mut vm = QemuVm::idle(dir.path(), "src", &extra);
    assert!(vm.alive(), "QEMU refused the JSON options: {}", vm.log());
    let mut q = vm.qmp().await.expect("qmp");
    let nodes = q
        .execute("query-named-block-nodes", serde_json::json!({"flat": true}))
        .await
        .expect("nodes");
    let names: Vec<&str> = (nodes.as_array().into_iter().flatten())
        .filter_map(|n| n["node-name"].as_str())
        .collect();
    assert!(names.contains(&"d0") && names.contains(&"f0"), "{nodes}");
    let block = q
        .execute("query-block", serde_json::json!({}))
        .await
        .expect("query-block");
    let attached = (block.as_array().into_iter().flatten())
        .find(|b| b["qdev"].as_str().is_some_and(|d| d.contains("vd0")))
        .unwrap_or_else(|| panic!("no device vd0: {block}"));
    assert_eq!(attached["inserted"]["node-name"], "f0", "{attached}");
    let out = Command::new(env!("CARGO_BIN_EXE_trustmig"))
        .args(["qemu", "destination-command", "--qmp"])
        .arg(dir.path().join("dst.qmp"))
        .arg("--transferred-disk")
        .arg(&image)
        .args(["--", "qemu-system-x86_64", "-m", "32"])
        .args(&extra)
        .output()
        .expect("trustmig");
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !line.contains("-blockdev") && !line.contains("-device"),
        "{line}"
    );
}

/// A process that tells, each time it is asked, whether any process holds a lock on a file
/// (`F_OFD_GETLK` for a write lock over the whole file: QEMU's image locks are OFD locks on
/// single bytes). Started ahead, so that a look takes microseconds, not a process's start.
struct LockProbe(Child);

impl LockProbe {
    fn start(file: &Path) -> Self {
        let script = r#"
import fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDWR)
for _ in sys.stdin:
    want = struct.pack("hh4xqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0)
    got = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, want)
    print("unlocked" if struct.unpack("hh4xqqi4x", got)[0] == fcntl.F_UNLCK else "locked", flush=True)
"#;
        let child = Command::new("python3")
            .args(["-c", script])
            .arg(file)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        Self(child)
    }

    fn look(&mut self) -> String {
        use std::io::{BufRead, Write};
        let stdin = self.0.stdin.as_mut().expect("probe stdin");
        stdin.write_all(b"look\n").expect("probe asked");
        let mut line = String::new();
        let out = self.0.stdout.as_mut().expect("probe stdout");
        std::io::BufReader::new(out)
            .read_line(&mut line)
            .expect("probe answers");
        line.trim().to_string()
    }
}

impl Drop for LockProbe {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// SPEC.md §8.8 and spec/qemu.md §4: QEMU 7.2's QMP socket serves one client at a time. A
/// second client gets no greeting while the first is connected (so a give-back's try, holding
/// its connection, knows no migration of the VM starts in between; and `doctor` calls a socket
/// whose greeting does not come busy), and gets it as soon as the first one goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_serves_one_qmp_client_at_a_time() {
    let _g = SERIAL.lock().await;
    if tools_missing() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let vm = QemuVm::idle(dir.path(), "a", &[]);
    let mut first = Qmp::connect(&vm.qmp, Duration::from_secs(10))
        .await
        .expect("first client");
    let second = Qmp::connect(&vm.qmp, Duration::from_secs(1)).await;
    assert!(
        matches!(&second, Err(QmpError::Timeout { waiting_for, .. }) if waiting_for == "greeting"),
        "a second client while the first is connected: {:?}",
        second.err()
    );
    let path = vm.qmp.clone();
    let waiting = tokio::spawn(async move { Qmp::connect(&path, Duration::from_secs(10)).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    first
        .query_status()
        .await
        .expect("the first client is served");
    assert!(!waiting.is_finished(), "greeted beside the first client");
    drop(first);
    let mut second = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("greeted once the first client went")
        .expect("task")
        .expect("second client");
    second
        .query_status()
        .await
        .expect("the second client is served");
}

/// QEMU's stamp of its `MIGRATION` `completed` event (`events` on); a failed migration panics.
async fn completed_at(q: &mut Qmp) -> std::time::SystemTime {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(120), q.event())
            .await
            .expect("QEMU completes within 120 s")
            .expect("QMP event");
        let status = ev.data["status"].as_str().unwrap_or_default();
        assert!(
            ev.name != "MIGRATION" || status != "failed",
            "the migration failed"
        );
        if ev.name == "MIGRATION" && status == "completed" {
            return ev.at.expect("QEMU stamps its events");
        }
    }
}

/// Two QEMUs without agents, to pin QEMU's own behaviour: a 128 MiB source running the test
/// guest with `append` (its data area filled) and a destination waiting (`-incoming defer`),
/// with a QMP session to each.
async fn bare_pair(dir: &Path, append: &str) -> (QemuVm, QemuVm, Qmp, Qmp) {
    bare_pair_with(dir, append, &[], &["-incoming".into(), "defer".into()]).await
}

/// [`bare_pair`] with these extra arguments for each QEMU (the destination's include its
/// `-incoming`).
async fn bare_pair_with(
    dir: &Path,
    append: &str,
    src_extra: &[String],
    dst_extra: &[String],
) -> (QemuVm, QemuVm, Qmp, Qmp) {
    let guest = build_guest(dir);
    let opts = |extra: &[String]| VmOpts {
        append: append.into(),
        mem_mib: 128,
        src_extra: extra.to_vec(),
        ..VmOpts::default()
    };
    let src = QemuVm::start(dir, "src", &guest, &opts(src_extra), false);
    let dst = QemuVm::start(dir, "dst", &guest, &opts(dst_extra), false);
    src.wait_ticks(1, Duration::from_secs(60));
    let s = src.qmp().await.expect("qmp src");
    let d = dst.qmp().await.expect("qmp dst");
    (src, dst, s, d)
}

/// Start a migration from `s` to `d` (waiting, `-incoming defer`) over a unix socket in `dir`.
async fn bare_migrate(s: &mut Qmp, d: &mut Qmp, dir: &Path) {
    let uri = format!("unix:{}", dir.join("m.sock").display());
    d.migrate_incoming(&uri).await.expect("migrate-incoming");
    s.migrate(&uri).await.expect("migrate");
}

/// spec/qemu.md §2 (step 6) and §9: with `return-path`, the source QEMU announces `completed`
/// only after the destination QEMU has loaded the whole stream. That is why QEMU's own
/// `downtime` for trustmig (which runs with it) includes the destination's load and the native
/// modes' (QEMU's default, without it) does not, and why the bench measures every mode from
/// the source's `STOP` to the destination's `RESUME` instead. And (§2) the return path carries
/// only a few bytes that steer the source QEMU, which is why the final digest leaves it out.
/// Plain QEMU to QEMU through a relay, both QEMUs' `completed` events compared by QEMU's own
/// stamps (one host, one clock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_with_return_path_the_source_completes_after_the_destination_loaded() {
    let _g = SERIAL.lock().await;
    if tools_missing() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    // Its data area is filled before the migration: real pages move.
    let (_src, _dst, mut s, mut d) = bare_pair(dir.path(), "area=100 rate=0 check=1000000").await;
    // spec/qemu.md §2 (step 3): QEMU 7.2's own bandwidth cap is 128 MiB/s, which the agent
    // lifts unless the order sets one.
    let p = s
        .execute("query-migrate-parameters", serde_json::json!({}))
        .await
        .expect("query-migrate-parameters");
    assert_eq!(p["max-bandwidth"].as_u64(), Some(128 << 20), "{p}");
    // spec/qemu.md §9: and `return-path` is off unless asked for.
    let caps = s
        .execute("query-migrate-capabilities", serde_json::json!({}))
        .await
        .expect("query-migrate-capabilities");
    let return_path = (caps.as_array().into_iter().flatten())
        .find(|c| c["capability"] == "return-path")
        .and_then(|c| c["state"].as_bool());
    assert_eq!(return_path, Some(false), "{caps}");
    let caps = [("return-path", true), ("events", true)];
    s.migrate_set_capabilities(&caps)
        .await
        .expect("source capabilities");
    d.migrate_set_capabilities(&caps)
        .await
        .expect("destination capabilities");
    // Through a relay that keeps what comes back: the return path.
    let (relay, incoming) = (dir.path().join("r.sock"), dir.path().join("m.sock"));
    d.migrate_incoming(&format!("unix:{}", incoming.display()))
        .await
        .expect("migrate-incoming");
    let returned = return_path_relay(&relay, &incoming);
    s.migrate(&format!("unix:{}", relay.display()))
        .await
        .expect("migrate");
    let (src_done, dst_done) = tokio::join!(completed_at(&mut s), completed_at(&mut d));
    assert!(
        dst_done <= src_done,
        "with return-path the source completed {:?} before the destination had loaded",
        dst_done.duration_since(src_done).unwrap_or_default()
    );
    let moved = s
        .query_migrate()
        .await
        .expect("query-migrate")
        .ram
        .unwrap_or_default();
    assert!(
        moved.transferred > 90 << 20,
        "only {} bytes moved",
        moved.transferred
    );
    // spec/qemu.md §2: what came back only steers the source QEMU, a few bytes in all: QEMU's
    // `MIG_RP_MSG_*` messages (be16 type, be16 length, payload), here only `SHUT` (1: the
    // destination's load result, 0 for success) and `PONG` (2: an acknowledgement).
    let back = tokio::time::timeout(Duration::from_secs(10), returned)
        .await
        .expect("the relay ends with the stream")
        .expect("relay");
    let messages = return_path_messages(&back);
    assert!(
        back.len() < 4096,
        "{} bytes came back: {messages:?}",
        back.len()
    );
    assert!(
        messages.iter().all(|(kind, _)| matches!(kind, 1 | 2)),
        "{messages:?}"
    );
    let shut: Vec<_> = messages.iter().filter(|(kind, _)| *kind == 1).collect();
    assert_eq!(shut, [&(1, vec![0, 0, 0, 0])], "{messages:?}");
    // spec/qemu.md §1: an incoming QEMU started without `-S` runs the guest once loading
    // ends, by itself (why the agent stops one that was, before it feeds it).
    let ran = until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        async || d.query_status().await.ok().map(|s| s.status).as_deref() == Some("running"),
    )
    .await;
    assert!(ran, "the loaded destination never ran");
}

/// A relay from a listener at `from` to QEMU's incoming socket at `to`, both ways; it returns,
/// once either side closes, every byte that came back from `to` (QEMU's return path).
fn return_path_relay(from: &Path, to: &Path) -> tokio::task::JoinHandle<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::UnixListener::bind(from).expect("relay bind");
    let to = to.to_path_buf();
    tokio::spawn(async move {
        let (src, _) = listener.accept().await.expect("relay accept");
        let dst = tokio::net::UnixStream::connect(&to)
            .await
            .expect("relay connect");
        let ((mut src_rd, mut src_wr), (mut dst_rd, mut dst_wr)) =
            (src.into_split(), dst.into_split());
        let forth = async move {
            let _ = tokio::io::copy(&mut src_rd, &mut dst_wr).await;
            let _ = dst_wr.shutdown().await;
        };
        let back = async move {
            let mut kept = Vec::new();
            let mut buf = vec![0u8; 4096];
            while let Ok(n @ 1..) = dst_rd.read(&mut buf).await {
                kept.extend_from_slice(&buf[..n]);
                if src_wr.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            kept
        };
        tokio::join!(forth, back).1
    })
}

/// QEMU's return-path messages in `bytes`, as (type, payload); a cut message panics.
fn return_path_messages(mut bytes: &[u8]) -> Vec<(u16, Vec<u8>)> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        assert!(bytes.len() >= 4, "a cut header: {bytes:?} after {out:?}");
        let kind = u16::from_be_bytes([bytes[0], bytes[1]]);
        let len = u16::from_be_bytes([bytes[2], bytes[3]]) as usize;
        assert!(
            bytes.len() >= 4 + len,
            "a cut message: {bytes:?} after {out:?}"
        );
        out.push((kind, bytes[4..4 + len].to_vec()));
        bytes = &bytes[4 + len..];
    }
    out
}

/// spec/qemu.md §5 (block handover): without `late-block-activate` an incoming QEMU 7.2
/// activates its images when loading ends, even under `-S`, and takes their write lock
/// (shared until it first runs: what it blocks is a QEMU that wants to be the image's only
/// writer); with the capability, not before `cont`.
/// Hence the destination agent sets it: the source's rollback `cont` of its guest, which takes
/// the image back as its only writer, is refused while a loaded destination without it lives.
/// Plain QEMU to QEMU on one shared image, the source's `cont` once both completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_an_incoming_qemu_locks_its_images_when_loading_ends_unless_late_block_activate() {
    let _g = SERIAL.lock().await;
    if tools_missing() {
        return;
    }
    for late in [false, true] {
        let dir = tempfile::tempdir().expect("temp dir");
        let shared = SharedImage::new();
        let mut dst_extra = shared.drive.clone();
        dst_extra.extend(["-incoming", "defer", "-S"].map(String::from));
        let (_src, _dst, mut s, mut d) = bare_pair_with(
            dir.path(),
            "area=16 rate=0 check=1000000",
            &shared.drive,
            &dst_extra,
        )
        .await;
        s.migrate_set_capabilities(&[("events", true)])
            .await
            .expect("source capabilities");
        d.migrate_set_capabilities(&[("events", true), ("late-block-activate", late)])
            .await
            .expect("destination capabilities");
        bare_migrate(&mut s, &mut d, dir.path()).await;
        tokio::join!(completed_at(&mut s), completed_at(&mut d));
        let given_back = s.cont().await.map_err(|e| e.to_string());
        if late {
            assert!(given_back.is_ok(), "{given_back:?}");
        } else {
            assert!(
                given_back
                    .as_ref()
                    .is_err_and(|e| e.contains("Failed to get shared \"write\" lock")),
                "{given_back:?}"
            );
            // It shares that lock until it first runs: another writer that shares it too
            // (`qemu-io`) opens the image and writes.
            if have_qemu_io() {
                let out = Command::new("qemu-io")
                    .args(["-f", "raw", "-c", "write 0 512"])
                    .arg(&shared.path)
                    .output()
                    .expect("qemu-io");
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}

/// spec/qemu.md §4: an incoming QEMU 7.2 whose load fails exits by itself (the agent quits it
/// anyway). A stream that is not QEMU's: the destination process ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_an_incoming_qemu_whose_load_fails_exits() {
    let _g = SERIAL.lock().await;
    if tools_missing() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let dst_extra = ["-incoming", "defer", "-S"].map(String::from);
    let (_src, mut dst, _s, mut d) =
        bare_pair_with(dir.path(), "area=1 rate=0 check=1000000", &[], &dst_extra).await;
    let path = dir.path().join("m.sock");
    d.migrate_incoming(&format!("unix:{}", path.display()))
        .await
        .expect("migrate-incoming");
    let mut sock = tokio::net::UnixStream::connect(&path)
        .await
        .expect("connect");
    tokio::io::AsyncWriteExt::write_all(&mut sock, b"not a migration stream\n")
        .await
        .expect("write");
    drop(sock);
    let exited = until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        async || !dst.alive(),
    )
    .await;
    assert!(exited, "the destination QEMU did not exit");
}

/// spec/qemu.md §2 (step 6): QEMU takes its last dirty-bitmap sync after it stopped the guest
/// (with `pause-before-switchover`, after `migrate-continue`) and counts it in
/// `dirty-sync-count`, so a look after the guest's `STOP` may find one more "round" that is no
/// pre-copy round; the source agent therefore judges rounds only until the switch-over. Plain
/// QEMU to QEMU with the pause: for a running guest `STOP` comes before `pre-switchover`, for a
/// paused one none comes (why a paused guest keeps the pause); QEMU's runstate is
/// `finish-migrate` in the switch-over and `postmigrate` after it (what the agent's check reads);
/// the count at `completed` is the count at the pause plus one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_counts_its_last_bitmap_sync_after_the_guest_stopped() {
    let _g = SERIAL.lock().await;
    if tools_missing() {
        return;
    }
    for running in [true, false] {
        let dir = tempfile::tempdir().expect("temp dir");
        let (_src, _dst, mut s, mut d) =
            bare_pair(dir.path(), "area=16 rate=0 check=1000000").await;
        s.migrate_set_capabilities(&[("pause-before-switchover", true), ("events", true)])
            .await
            .expect("source capabilities");
        if !running {
            s.stop().await.expect("stop");
        }
        s.take_events(); // the paused guest's own STOP
        bare_migrate(&mut s, &mut d, dir.path()).await;
        let mut stopped = false;
        loop {
            let ev = tokio::time::timeout(Duration::from_secs(120), s.event())
                .await
                .expect("QEMU pauses within 120 s")
                .expect("QMP event");
            stopped |= ev.name == "STOP";
            if ev.migration_status() == Some(MigrationStatus::PreSwitchover) {
                break;
            }
            assert_ne!(ev.migration_status(), Some(MigrationStatus::Failed));
        }
        assert_eq!(
            stopped, running,
            "QEMU announces a STOP before pre-switchover only for a guest that ran"
        );
        let state = |st: trustmig_qemu::qmp::StatusInfo| st.status;
        assert_eq!(
            state(s.query_status().await.expect("status")),
            "finish-migrate"
        );
        let syncs =
            |m: trustmig_qemu::qmp::MigrationInfo| m.ram.unwrap_or_default().dirty_sync_count;
        let at_pause = syncs(s.query_migrate().await.expect("query-migrate"));
        s.migrate_continue("pre-switchover")
            .await
            .expect("migrate-continue");
        completed_at(&mut s).await;
        let at_end = syncs(s.query_migrate().await.expect("query-migrate"));
        assert!(at_pause >= 1, "the first pass's sync is counted");
        assert_eq!(
            at_end,
            at_pause + 1,
            "one more bitmap sync, taken with the guest stopped"
        );
        // QEMU announces `completed` a moment before it leaves `finish-migrate`.
        let left = until(
            Duration::from_secs(10),
            Duration::from_millis(20),
            async || state(s.query_status().await.expect("status")) == "postmigrate",
        )
        .await;
        let now = state(s.query_status().await.expect("status"));
        assert!(left, "QEMU stayed {now}, not postmigrate");
    }
}

/// spec/qemu.md §3 (`throttle`): QEMU 7.2's `auto-converge` looks at the guest's dirty rate at
/// a bitmap sync at most once a second and raises its throttle by the increment at every second
/// look that finds the guest too fast, first to `cpu-throttle-initial`: raises at least two
/// syncs and two seconds apart (by QEMU's stamps), which is what the agent's wait for each step
/// rests on, and within 4 syncs or 8 s of each other, which its giving up on a rise rests on. Plain QEMU to QEMU: a guest dirtying fast through a 20 MB/s cap with a 1 ms limit,
/// the throttle read at each `MIGRATION_PASS`, until it reached 60%. Then, the limit raised so
/// that QEMU switches over: at completion QEMU no longer shows a throttle (why the agent's
/// summary keeps the highest it saw in pre-copy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_raises_its_throttle_at_no_more_than_every_second_sync() {
    let _g = SERIAL.lock().await;
    if tools_missing() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let (_src, _dst, mut s, mut d) = bare_pair(dir.path(), "area=16 rate=200 check=25").await;
    s.migrate_set_capabilities(&[("events", true), ("auto-converge", true)])
        .await
        .expect("source capabilities");
    s.migrate_set_throttle(20, 20, 99).await.expect("throttle");
    s.migrate_set_parameters(1, 20_000_000)
        .await
        .expect("parameters");
    bare_migrate(&mut s, &mut d, dir.path()).await;
    // (sync, throttle, QEMU's stamp of the sync) at each raise.
    let mut raises: Vec<(u64, u64, std::time::SystemTime)> = Vec::new();
    let (mut last, mut syncs) = (0, 0);
    while last < 60 {
        let ev = tokio::time::timeout(Duration::from_secs(60), s.event())
            .await
            .expect("QEMU syncs within 60 s")
            .expect("QMP event");
        assert_ne!(ev.migration_status(), Some(MigrationStatus::Completed));
        if ev.name != "MIGRATION_PASS" {
            continue;
        }
        syncs = ev.data["pass"].as_u64().expect("pass");
        assert!(syncs < 40, "no 60% throttle in {syncs} syncs: {raises:?}");
        let info = s.query_migrate().await.expect("query-migrate");
        let throttle = info.cpu_throttle_percentage.unwrap_or(0);
        if throttle != last {
            raises.push((syncs, throttle, ev.at.expect("QEMU stamps its events")));
            last = throttle;
        }
    }
    s.migrate_set_parameters(60_000, 20_000_000)
        .await
        .expect("a limit QEMU meets");
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(60), s.event())
            .await
            .expect("QEMU completes within 60 s")
            .expect("QMP event");
        if ev.migration_status() == Some(MigrationStatus::Completed) {
            break;
        }
    }
    let done = s.query_migrate().await.expect("query-migrate");
    assert_eq!(done.status(), MigrationStatus::Completed);
    assert_eq!(
        done.cpu_throttle_percentage.unwrap_or(0),
        0,
        "a throttle shown after completion"
    );
    let throttles: Vec<u64> = raises.iter().map(|&(_, t, _)| t).collect();
    assert_eq!(
        throttles,
        [20, 40, 60],
        "raised by the increment: {raises:?}"
    );
    for pair in raises.windows(2) {
        let apart = (pair[1].2.duration_since(pair[0].2)).unwrap_or_default();
        assert!(
            pair[1].0 >= pair[0].0 + 2 && apart >= Duration::from_millis(1900),
            "raised {apart:?} apart: {raises:?} (of {syncs} syncs)"
        );
        // And no later than the agent's patience for a rise (4 rounds and 8 s, whichever
        // ends later) allows: two looks, a second or more apart, each at a sync.
        assert!(
            pair[1].0 <= pair[0].0 + 4 || apart <= Duration::from_secs(8),
            "raised {apart:?} and {} syncs apart: {raises:?}",
            pair[1].0 - pair[0].0
        );
    }
}

/// A relay from unix socket `from` to `to` (one connection, source to destination only: no
/// return path) at `rate` bytes per second; it returns when the source closes, with its
/// timeline: when each read brought bytes (the wall clock, as QEMU stamps its events) and how
/// many had come by then.
async fn slow_relay(
    from: &Path,
    to: &Path,
    rate: u64,
) -> tokio::task::JoinHandle<Vec<(std::time::SystemTime, u64)>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::UnixListener::bind(from).expect("relay bind");
    let to = to.to_path_buf();
    tokio::spawn(async move {
        let (mut src, _) = listener.accept().await.expect("relay accept");
        let mut dst = tokio::net::UnixStream::connect(&to)
            .await
            .expect("relay connect");
        let start = Instant::now();
        let (mut timeline, mut so_far) = (Vec::new(), 0u64);
        let mut buf = vec![0u8; 16 << 10];
        loop {
            let n = src.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return timeline;
            }
            so_far += n as u64;
            timeline.push((std::time::SystemTime::now(), so_far));
            if dst.write_all(&buf[..n]).await.is_err() {
                return timeline;
            }
            let due = start + Duration::from_secs_f64(so_far as f64 / rate as f64);
            tokio::time::sleep_until(due.into()).await;
        }
    })
}

/// spec/qemu.md §4 (QMP timeouts): QEMU 7.2 answers no QMP command during its stop-and-copy:
/// the migration thread holds the big lock from the guest's `STOP` until it has sent its last
/// byte, so a `query-status` asked at `STOP` is answered only then (why a QMP command's timeout
/// is extended while the stream moves). And (§3, the ladder's rationale) QEMU switches over
/// in the middle of its first pass once what is left fits its limit at the bandwidth it
/// measures. Plain QEMU to QEMU through an 8 MB/s relay, with QEMU's largest `downtime-limit`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_answers_no_qmp_command_during_its_stop_and_copy() {
    let _g = SERIAL.lock().await;
    if tools_missing() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let (_src, _dst, mut s, mut d) = bare_pair(dir.path(), "area=16 rate=0 check=1000000").await;
    s.migrate_set_capabilities(&[("events", true)])
        .await
        .expect("source capabilities");
    s.migrate_set_parameters(2_000_000, 1 << 40)
        .await
        .expect("parameters");
    let (relay, incoming) = (dir.path().join("r.sock"), dir.path().join("m.sock"));
    d.migrate_incoming(&format!("unix:{}", incoming.display()))
        .await
        .expect("migrate-incoming");
    let relayed = slow_relay(&relay, &incoming, 8_000_000).await;
    s.migrate(&format!("unix:{}", relay.display()))
        .await
        .expect("migrate");
    // By QEMU's stamp of `STOP`, not when this test read it (a loaded host reads it late).
    let stopped = loop {
        let ev = tokio::time::timeout(Duration::from_secs(60), s.event())
            .await
            .expect("the guest stops within 60 s")
            .expect("QMP event");
        if ev.name == "STOP" {
            break ev.at.expect("QEMU stamps its events");
        }
    };
    let since_stop = |t: std::time::SystemTime| t.duration_since(stopped).unwrap_or_default();
    s.query_status().await.expect("query-status");
    let mut answered = std::time::SystemTime::now();
    // QEMU may answer in the moment right after `STOP`, while it drains and flushes its block
    // devices (seen once in CI: 0.4 ms after it); a command sent after that waits.
    if since_stop(answered) < Duration::from_millis(100) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        s.query_status().await.expect("query-status");
        answered = std::time::SystemTime::now();
    }
    completed_at(&mut s).await;
    let timeline = relayed.await.expect("relay");
    let &(last_byte, all) = timeline.last().expect("bytes relayed");
    let stop_and_copy = since_stop(last_byte);
    assert!(
        stop_and_copy > Duration::from_secs(1),
        "the stop-and-copy took only {stop_and_copy:?}"
    );
    // The last bytes reach the relay a socket buffer's worth (at 8 MB/s, tens of ms) after
    // QEMU wrote them.
    assert!(
        answered + Duration::from_millis(300) >= last_byte,
        "answered {:?} after STOP, the stream ended {stop_and_copy:?} after it",
        since_stop(answered)
    );
    let before = (timeline.iter())
        .take_while(|(t, _)| *t <= stopped)
        .last()
        .map_or(0, |&(_, n)| n);
    assert!(
        before * 2 < all,
        "{before} of {all} bytes went before the guest stopped: QEMU switched over late"
    );
}

/// A relay from a listener at `from` to QEMU's incoming socket at `to`, at `rate` bytes per
/// second until `stall` is set; from then on it reads nothing, and it closes both sockets when
/// `cut` fires (a peer that stopped reading without closing, then went).
async fn stalling_relay(
    from: &Path,
    to: &Path,
    rate: u64,
    stall: std::sync::Arc<std::sync::atomic::AtomicBool>,
    cut: tokio::sync::oneshot::Receiver<()>,
) -> tokio::task::JoinHandle<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::UnixListener::bind(from).expect("relay bind");
    let to = to.to_path_buf();
    tokio::spawn(async move {
        let (mut src, _) = listener.accept().await.expect("relay accept");
        let mut dst = tokio::net::UnixStream::connect(&to)
            .await
            .expect("relay connect");
        let (start, mut so_far) = (Instant::now(), 0u64);
        let mut buf = vec![0u8; 16 << 10];
        while !stall.load(std::sync::atomic::Ordering::SeqCst) {
            // Looked at again every 20 ms: a stall set while QEMU sends nothing still holds.
            let read = tokio::time::timeout(Duration::from_millis(20), src.read(&mut buf));
            let n = match read.await {
                Ok(r) => r.unwrap_or(0),
                Err(_) => continue,
            };
            if n == 0 || dst.write_all(&buf[..n]).await.is_err() {
                return;
            }
            so_far += n as u64;
            let due = start + Duration::from_secs_f64(so_far as f64 / rate as f64);
            tokio::time::sleep_until(due.into()).await;
        }
        let _ = cut.await;
    })
}

/// spec/qemu.md §4 (the give-back drops the pumps first) and SPEC.md §8.8 (QEMU's own
/// rollback): a source QEMU blocked writing its stop-and-copy to a peer that stopped reading
/// holds its big lock and answers no QMP command; once its migration socket closes (what the
/// agent's give-back does first, dropping its pumps) the write fails, QEMU answers again, the
/// migration is `failed`, and QEMU itself runs the guest that ran at the switch-over again,
/// with no `cont` from anyone. Plain QEMU to QEMU, QEMU's largest `downtime-limit`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_blocked_in_its_stop_and_copy_answers_and_runs_the_guest_once_its_stream_closes() {
    let _g = SERIAL.lock().await;
    if tools_missing() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let (src, _dst, mut s, mut d) = bare_pair(dir.path(), "area=16 rate=0 check=1000000").await;
    s.migrate_set_capabilities(&[("events", true)])
        .await
        .expect("source capabilities");
    s.migrate_set_parameters(2_000_000, 1 << 40)
        .await
        .expect("parameters");
    let (relay, incoming) = (dir.path().join("r.sock"), dir.path().join("m.sock"));
    d.migrate_incoming(&format!("unix:{}", incoming.display()))
        .await
        .expect("migrate-incoming");
    let stall = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (cut, cut_rx) = tokio::sync::oneshot::channel();
    let relayed = stalling_relay(&relay, &incoming, 8_000_000, stall.clone(), cut_rx).await;
    s.migrate(&format!("unix:{}", relay.display()))
        .await
        .expect("migrate");
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(60), s.event())
            .await
            .expect("the guest stops within 60 s")
            .expect("QMP event");
        if ev.name == "STOP" {
            break;
        }
    }
    stall.store(true, std::sync::atomic::Ordering::SeqCst);
    // Past the moment right after `STOP` in which QEMU may still answer (see above); more
    // than half the guest's memory is still to send, far more than the sockets buffer.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let asked = tokio::spawn(async move {
        let r = s.query_status().await;
        (r, s, Instant::now())
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !asked.is_finished(),
        "QEMU answered while its stop-and-copy could not write"
    );
    let ticks = src.ticks().len();
    let closed = Instant::now();
    cut.send(()).expect("the relay waits");
    relayed.await.expect("relay");
    let (r, mut s, answered) = tokio::time::timeout(Duration::from_secs(10), asked)
        .await
        .expect("QEMU answers once its migration socket closed")
        .expect("the query's task");
    r.expect("query-status");
    eprintln!("answered {:?} after the close", answered - closed);
    let info = s.query_migrate().await.expect("query-migrate");
    assert_eq!(info.status.as_deref(), Some("failed"), "{info:?}");
    let running = eventually(
        Duration::from_secs(10),
        Duration::from_millis(50),
        async || Some(s.query_status().await.expect("query-status")).filter(|st| st.running),
    )
    .await;
    assert!(running.is_some(), "QEMU did not run the guest again itself");
    src.wait_ticks(ticks + 3, Duration::from_secs(30));
}

/// Issue 14, case 3: a data stream that never binds (its `StreamInit` tampered with). The
/// source rolls back; the destination gives the session up at once and discards its waiting
/// QEMU instead of holding it (and its QMP socket) for a step timeout and leaving it behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_unbound_data_stream_releases_the_destination_at_once() {
    let _g = SERIAL.lock().await;
    let Some(mut s) = setup("area=16 rate=8 check=10", true) else {
        return;
    };
    let proxy = Proxy::start(s.pair.dst_addr.clone(), Fault::FlipBit(0))
        .await
        .expect("proxy");
    let started = Instant::now();
    let (r, _) = migrate(&mut s, &proxy.addr.clone(), 300).await;
    assert!(proxy.fired.load(std::sync::atomic::Ordering::SeqCst));
    // Released because the source said so, well before the 10 s bind limit would expire.
    while s.dst.alive() {
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "destination QEMU still waits for the refused session\n{}",
            s.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let logs = s.logs();
    assert!(!logs.contains("opened no data stream in time"), "{logs}");
    assert_rolled_back(&mut s, &r, "rolled back").await;
    let journal = std::fs::read_to_string(s.pair.dst.journal_file()).expect("destination journal");
    assert!(journal.contains("rolled-back"), "{journal}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_error_is_reported_clearly() {
    let _g = SERIAL.lock().await;
    let Some(mut s) = setup("area=16 rate=0 check=10", true) else {
        return;
    };
    let addr = s.pair.dst_addr.clone();
    // QEMU caps downtime-limit at 2000 s; the order allows more: QEMU's own refusal must show,
    // before anything moves (the agent has QEMU take the target itself before the ladder's
    // first step, 1 ms, which QEMU would accept).
    let (r, _) = migrate(&mut s, &addr, 30_000_000).await;
    assert_rolled_back(&mut s, &r, "QEMU refused migrate-set-parameters").await;
    let err = r.err().unwrap_or_default();
    // QEMU 7.2's words and class, quoted (spec/qemu.md §3, §4: its 2000 s cap).
    assert!(
        err.contains(
            "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms (GenericError)"
        ),
        "QEMU's own message is quoted: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_destination_not_waiting_is_refused() {
    let _g = SERIAL.lock().await;
    // A destination QEMU that already runs a guest must never receive one.
    let Some(mut s) = setup("area=16 rate=0 check=10", false) else {
        return;
    };
    let addr = s.pair.dst_addr.clone();
    let (r, _) = migrate(&mut s, &addr, 300).await;
    let err = r.err().unwrap_or_else(|| panic!("must fail\n{}", s.logs()));
    assert!(err.contains("-incoming defer"), "{err}\n{}", s.logs());
    assert_eq!(s.src.status().await.as_deref(), Ok("running"));
}

/// Disk test fixture: a raw image of 3 MiB + 100 KiB, chunk k (1 MiB) filled with 0x41 + k,
/// opened read-only by the source QEMU as a virtio-blk disk; the destination writes what it
/// receives into `received/` and attaches it with the same device.
struct DiskFixture {
    dir: tempfile::TempDir,
    image: PathBuf,
    data: Vec<u8>,
}

const DISK_TAIL: usize = 100 << 10;

impl DiskFixture {
    fn new() -> (Self, VmOpts) {
        let dir = tempfile::tempdir().expect("tmp");
        let image = dir.path().join("src.raw");
        let mut data = Vec::new();
        for k in 0..4u8 {
            let len = if k < 3 { 1 << 20 } else { DISK_TAIL };
            data.extend(std::iter::repeat_n(0x41 + k, len));
        }
        std::fs::write(&image, &data).expect("image");
        let received = dir.path().join("received");
        let opts = VmOpts {
            append: "area=16 rate=4 check=10".into(),
            mem_mib: MEM_MIB,
            src_extra: vec![
                "-drive".into(),
                format!(
                    "file={},if=none,id=d0,format=raw,readonly=on",
                    image.display()
                ),
                "-device".into(),
                "virtio-blk-pci,drive=d0,id=vd0,addr=0x5".into(),
            ],
            transferred: vec![image.clone()],
            src_vm: format!("\n[[vm.disk]]\nname = \"d0\"\npath = \"{}\"\n", image.display()),
            dst_vm: format!(
                "disk_dir = \"{}\"\n\n[[vm.disk]]\nname = \"d0\"\ndevice = {{ driver = \"virtio-blk-pci\", id = \"vd0\", addr = \"0x5\" }}\n",
                received.display()
            ),
            ..VmOpts::default()
        };
        (Self { dir, image, data }, opts)
    }

    fn received(&self) -> PathBuf {
        self.dir.path().join("received").join("d0.raw")
    }

    fn leftovers(&self) -> Vec<String> {
        std::fs::read_dir(self.dir.path().join("received"))
            .map(|rd| {
                rd.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_migrates_a_guest_with_a_local_disk() {
    let _g = SERIAL.lock().await;
    let (disk, opts) = DiskFixture::new();
    let Some(mut s) = setup_with(&opts, true) else {
        return;
    };
    let addr = s.pair.dst_addr.clone();
    let (r, _) = migrate(&mut s, &addr, 300).await;
    let summary = r.unwrap_or_else(|e| panic!("{e}\n{}", s.logs()));
    assert_moved(&mut s, &summary).await;
    assert!(
        summary.bytes_on_wire > disk.data.len() as u64,
        "the disk travelled: {summary:?}"
    );
    // The file the destination wrote is the source image, byte for byte.
    let got = std::fs::read(disk.received()).expect("received disk");
    assert!(
        got == disk.data,
        "received disk differs from the source image"
    );
    assert_eq!(std::fs::read(&disk.image).expect("image"), disk.data);
    // The destination QEMU has it attached as node d0 ...
    let mut q = Qmp::connect(&s.dst.qmp, Duration::from_secs(5))
        .await
        .expect("dst qmp");
    let nodes = q
        .execute(
            "query-named-block-nodes",
            serde_json::json!({ "flat": true }),
        )
        .await
        .expect("query-named-block-nodes");
    let want = disk.received().display().to_string();
    assert!(
        nodes.as_array().is_some_and(|a| a
            .iter()
            .any(|n| { n["node-name"] == "d0" && n["file"] == want.as_str() && n["ro"] == true })),
        "destination block nodes: {nodes}"
    );
    // ... and reads the same bytes through its block layer (qemu-io prints to QEMU's stdout).
    for (cmd, ok) in [
        (
            "read -P 0x41 0 1M",
            "read 1048576/1048576 bytes at offset 0",
        ),
        (
            "read -P 0x43 2M 1M",
            "read 1048576/1048576 bytes at offset 2097152",
        ),
        (
            "read -P 0x44 3M 100k",
            "read 102400/102400 bytes at offset 3145728",
        ),
    ] {
        let out = q
            .execute(
                "human-monitor-command",
                serde_json::json!({ "command-line": format!("qemu-io d0 \"{cmd}\"") }),
            )
            .await
            .expect("qemu-io");
        assert_eq!(out, "", "qemu-io {cmd}: {out}");
        let log = std::fs::read_to_string(s.pair.dir().join("dst.qemu.log")).unwrap_or_default();
        assert!(log.contains(ok), "qemu-io {cmd}: {log}");
        assert!(!log.contains("Pattern verification failed"), "{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_altered_disk_chunk_rolls_back() {
    let _g = SERIAL.lock().await;
    let (disk, mut opts) = DiskFixture::new();
    // The source agent (fault injection) flips a byte of chunk 2 after its own check and seals
    // it: the record layer is intact, only the destination's manifest check can notice.
    opts.src_env = vec![(
        trustmig_agent::fault::ALTER_DISK_CHUNK_ENV.into(),
        "2".into(),
    )];
    let Some(mut s) = setup_with(&opts, true) else {
        return;
    };
    let addr = s.pair.dst_addr.clone();
    let (r, _) = migrate(&mut s, &addr, 300).await;
    assert_rolled_back(
        &mut s,
        &r,
        "chunk 2: content does not match the manifest digest",
    )
    .await;
    let err = r.unwrap_err();
    assert!(
        err.contains("peer aborted with DigestMismatch"),
        "the destination's abort code is typed: {err}"
    );
    assert!(
        disk.leftovers().is_empty(),
        "nothing of the refused disk stays: {:?}",
        disk.leftovers()
    );
    if s.dst.alive() {
        let st = s.dst.status().await;
        assert_eq!(
            st.as_deref(),
            Ok("inmigrate"),
            "destination QEMU never loaded"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_tampered_disk_record_rolls_back() {
    let _g = SERIAL.lock().await;
    let (disk, opts) = DiskFixture::new();
    let Some(mut s) = setup_with(&opts, true) else {
        return;
    };
    // Record 0 is StreamInit, 1..=4 are the disk's chunks.
    let proxy = Proxy::start(s.pair.dst_addr.clone(), Fault::FlipBit(2))
        .await
        .expect("proxy");
    let (r, _) = migrate(&mut s, &proxy.addr.clone(), 300).await;
    assert!(proxy.fired.load(std::sync::atomic::Ordering::SeqCst));
    assert_rolled_back(&mut s, &r, "tampered").await;
    assert!(disk.leftovers().is_empty(), "{:?}", disk.leftovers());
}

/// A child process killed (and reaped) when dropped, whatever becomes of the test.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An swtpm behind a QEMU `tpm-emulator`, with its own state directory; killed on drop.
struct VmTpm {
    _child: Reaped,
    sock: PathBuf,
}

impl VmTpm {
    fn start(dir: &Path) -> Self {
        Self::start_named(dir, "swtpm")
    }

    /// An swtpm on state directory `dir` whose socket and log are `dir/<name>.sock`, `.log`.
    fn start_named(dir: &Path, name: &str) -> Self {
        std::fs::create_dir_all(dir).expect("tpm dir");
        let sock = dir.join(format!("{name}.sock"));
        let child = Command::new("swtpm")
            .args(["socket", "--tpm2", "--tpmstate"])
            .arg(format!("dir={}", dir.display()))
            .arg("--ctrl")
            .arg(format!("type=unixio,path={}", sock.display()))
            .arg("--log")
            .arg(format!(
                "file={}",
                dir.join(format!("{name}.log")).display()
            ))
            .stdin(Stdio::null())
            .spawn()
            .expect("swtpm starts");
        let t = Self {
            _child: Reaped(child),
            sock,
        };
        let made = until_blocking(Duration::from_secs(10), Duration::from_millis(20), || {
            t.sock.exists()
        });
        assert!(made, "swtpm did not create its socket");
        t
    }

    /// QEMU arguments attaching this swtpm as a TIS TPM.
    fn qemu_args(&self) -> Vec<String> {
        vec![
            "-chardev".into(),
            format!("socket,id=chrtpm,path={}", self.sock.display()),
            "-tpmdev".into(),
            "emulator,id=tpm0,chardev=chrtpm".into(),
            "-device".into(),
            "tpm-tis,tpmdev=tpm0".into(),
        ]
    }
}

/// The guest's `P <extends> <PCR 16>` lines that are complete (a line cut by the switch-over
/// is skipped); panics on a TPM error line.
fn pcr_lines(vm: &QemuVm) -> Vec<(u32, String)> {
    vm.lines()
        .iter()
        .filter_map(|l| {
            let mut w = l.strip_prefix("P ")?.split_whitespace();
            let k = w.next()?.parse().ok()?;
            let v = w.next()?;
            assert!(v != "error", "guest TPM command failed: {l}");
            (v.len() == 64).then(|| (k, v.to_string()))
        })
        .collect()
}

/// PCR 16 after `k` extends with 32 bytes of 0xA5 (the guest's extend), from all zeros.
fn pcr_chain(k: u32) -> String {
    let mut p = [0u8; 32];
    for _ in 0..k {
        p = trustmig_protocol::sha256(&[&p, &[0xA5; 32]]);
    }
    p.iter().map(|b| format!("{b:02x}")).collect()
}

/// spec/qemu.md §6: two swtpm 0.7.1 on one state directory start, but the second QEMU to
/// initialise its TPM through them fails (swtpm cannot lock the directory's `.lock`) and
/// exits; hence each host's own state directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swtpm_on_a_shared_state_directory_fails_the_second_qemu() {
    let _g = SERIAL.lock().await;
    if tools_missing() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let tpms = [
        VmTpm::start_named(dir.path(), "a"),
        VmTpm::start_named(dir.path(), "b"),
    ];
    let qemu = |tpm: &VmTpm| {
        Command::new("qemu-system-x86_64")
            .args([
                "-accel",
                "tcg",
                "-m",
                "32",
                "-nodefaults",
                "-display",
                "none",
                "-S",
            ])
            .args(tpm.qemu_args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map(Reaped)
            .expect("qemu-system-x86_64 starts")
    };
    let mut first = qemu(&tpms[0]);
    // The first QEMU initialised its TPM once swtpm wrote its state.
    let initialised = until_blocking(Duration::from_secs(20), Duration::from_millis(20), || {
        dir.path().join("tpm2-00.permall").exists()
    });
    assert!(initialised, "the first TPM never initialised");
    let mut second = qemu(&tpms[1]);
    let exited = eventually_blocking(Duration::from_secs(20), Duration::from_millis(20), || {
        second.0.try_wait().expect("the second QEMU")
    });
    let status = exited.expect("the second QEMU started its TPM");
    let mut err = String::new();
    let stderr = second.0.stderr.as_mut().expect("stderr");
    std::io::Read::read_to_string(stderr, &mut err).expect("stderr");
    assert!(
        !status.success() && err.contains("CMD_INIT: 0x9"),
        "{status:?}: {err}"
    );
    let log = std::fs::read_to_string(dir.path().join("b.log")).expect("swtpm log");
    assert!(log.contains("Could not lock access to lockfile"), "{log}");
    assert!(
        matches!(first.0.try_wait(), Ok(None)),
        "the first QEMU runs on"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_vtpm_state_travels_in_the_stream() {
    let _g = SERIAL.lock().await;
    if tools_missing() {
        return;
    }
    // Each side its own swtpm state directory (a shared one fails on swtpm 0.7.1's lock).
    let tmp = tempfile::tempdir().expect("tmp");
    let src_tpm = VmTpm::start(&tmp.path().join("src-tpm"));
    let dst_tpm = VmTpm::start(&tmp.path().join("dst-tpm"));
    let opts = VmOpts {
        append: "area=16 rate=4 check=5 tpm=1".into(),
        mem_mib: MEM_MIB,
        src_extra: src_tpm.qemu_args(),
        dst_extra: dst_tpm.qemu_args(),
        ..VmOpts::default()
    };
    let Some(mut s) = setup_with(&opts, true) else {
        return;
    };
    // The guest extended PCR 16 a few times on the source.
    let extended = until(
        Duration::from_secs(60),
        Duration::from_millis(50),
        async || pcr_lines(&s.src).len() >= 3,
    )
    .await;
    assert!(extended, "source guest: {}", s.src.output());
    let addr = s.pair.dst_addr.clone();
    let (r, _) = migrate(&mut s, &addr, 300).await;
    let summary = r.unwrap_or_else(|e| panic!("{e}\n{}", s.logs()));
    assert_moved(&mut s, &summary).await;
    let extended = until(
        Duration::from_secs(60),
        Duration::from_millis(50),
        async || pcr_lines(&s.dst).len() >= 3,
    )
    .await;
    assert!(extended, "destination guest: {}", s.dst.output());
    let src = pcr_lines(&s.src);
    let dst = pcr_lines(&s.dst);
    for (k, v) in src.iter().chain(&dst) {
        assert_eq!(*v, pcr_chain(*k), "PCR 16 after {k} extends");
    }
    // The destination's TPM continued the source's chain: its first extend is the next one.
    let last_src = src.last().map_or(0, |l| l.0);
    let first_dst = dst[0].0;
    assert!(
        first_dst > last_src && first_dst <= last_src + 2,
        "destination extends start at {first_dst}, source stopped at {last_src}"
    );
}

/// On the bench monitor at `path`, for each of `names` in turn, the first such event after
/// the one before: QEMU's stamp of it, and when it arrived here with the CPU count then
/// ([`cpu_ticks`] of `pids`).
async fn events_in_turn(
    path: PathBuf,
    names: &'static [&'static str],
    pids: [u32; 2],
) -> Vec<(std::time::SystemTime, std::time::Instant, (u64, u64))> {
    let mut q = Qmp::connect(&path, Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("bench monitor {}: {e}", path.display()));
    let mut seen = Vec::new();
    for name in names {
        loop {
            let ev = q.event().await.expect("bench monitor event");
            if ev.name == *name {
                let at = ev.at.expect("QEMU stamps its events");
                seen.push((at, std::time::Instant::now(), cpu_ticks(&pids)));
                break;
            }
        }
    }
    seen
}

/// Run by `bench/qemu.sh`: one trustmig migration of the benchmark guest; prints
/// `BENCH <total ms> <end-to-end downtime ms> <stream bytes> <QEMU's own downtime ms>
/// <end-to-end ms by QEMU's stamps> <QEMU's total ms> <ms after QEMU> <CPU window ms>
/// <busy ticks> <QEMU ticks>`: the guest's downtime as the source
/// agent saw it (its STOP event to the destination's `Resumed`), and from the source QEMU's STOP
/// stamp to the destination QEMU's RESUME stamp, as the native modes are measured; the whole
/// order's time (handshake and attestation included) and QEMU's own (`migrate` to `completed`);
/// `<ms after QEMU>`: what the agents add to the downtime once QEMU is done; the CPU the whole
/// machine and the two QEMUs used from the source QEMU's `migrate` to the destination's RESUME
/// ([`cpu_ticks`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark, run by bench/qemu.sh"]
async fn bench_trustmig() {
    let _g = SERIAL.lock().await;
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
    // A second monitor on each QEMU, for the guest's STOP and RESUME as QEMU stamps them:
    // the end-to-end downtime measured as bench/native_migrate.py measures the native modes.
    let mons = tempfile::tempdir().expect("tempdir");
    let monitor = |name: &str| {
        let path = mons.path().join(format!("{name}.qmp"));
        let args = second_monitor(&path);
        (path, args)
    };
    let (src_mon, src_mon_args) = monitor("src");
    let (dst_mon, dst_mon_args) = monitor("dst");
    let opts = VmOpts {
        append: env("TRUSTMIG_BENCH_APPEND", "area=1008 rate=0 check=1000000"),
        mem_mib: env("TRUSTMIG_BENCH_MEM", "1024")
            .parse()
            .expect("TRUSTMIG_BENCH_MEM is MiB"),
        dst_extra: [vec!["-mem-prealloc".to_string()], dst_mon_args].concat(),
        src_extra: src_mon_args,
        // TRUSTMIG_BENCH_STEPS: the source's downtime ladder (unset: the agent's default).
        src_vm: std::env::var("TRUSTMIG_BENCH_STEPS")
            .map(|n| format!("downtime_steps = {n}\n"))
            .unwrap_or_default(),
        ..VmOpts::default()
    };
    let Some(mut s) = setup_with(&opts, true) else {
        return;
    };
    // TRUSTMIG_BENCH_STRICT=1: the order asks for the strict final quote (SPEC.md §8.7).
    s.pair.strict_final_quote = std::env::var_os("TRUSTMIG_BENCH_STRICT").is_some();
    let addr = s.pair.dst_addr.clone();
    let downtime: u32 = env("TRUSTMIG_BENCH_DOWNTIME", "300")
        .parse()
        .expect("TRUSTMIG_BENCH_DOWNTIME is ms");
    // The CPU is counted from QEMU's first MIGRATION event (`setup`, at `migrate`) to the
    // destination's RESUME, the window bench/native_migrate.py counts for the native modes.
    let qemus = [s.src.child.id(), s.dst.child.id()];
    let src_events = tokio::spawn(events_in_turn(src_mon, &["MIGRATION", "STOP"], qemus));
    let dst_events = tokio::spawn(events_in_turn(dst_mon, &["RESUME"], qemus));
    let (r, _) = migrate(&mut s, &addr, downtime).await;
    let sum = r.unwrap_or_else(|e| panic!("{e}\n{}", s.logs()));
    assert_eq!(s.dst.status().await.as_deref(), Ok("running"));
    let src_events = src_events.await.expect("MIGRATION and STOP");
    let (resumed, cpu_to, cpu_after) = dst_events.await.expect("RESUME")[0];
    let (stopped, (_, cpu_from, cpu_before)) = (src_events[1].0, src_events[0]);
    let cpu_window_ms = cpu_to.duration_since(cpu_from).as_millis();
    let stamped_ms = resumed
        .duration_since(stopped)
        .expect("RESUME after STOP")
        .as_millis();
    let stream_bytes = sum.bytes_per_round.first().copied().unwrap_or(0);
    if std::env::var_os("TRUSTMIG_BENCH_LOGS").is_some() {
        eprintln!("{}", s.logs()); // with TRUSTMIG_LOG=trustmig_agent=debug: the switch-over, step by step
    }
    // QEMU's own downtime (stop to the end of sending) is comparable with the native modes'.
    let qemu = s.src.migration().await.expect("source query-migrate");
    // What the agents add after QEMU is done: from the later of the source QEMU's completion
    // and the end of its stream to `Resumed` (evidence, COMMIT, `Commit`, `cont`).
    let at = |name: &str| sum.timeline.iter().find(|s| s.step == name).map(|s| s.us);
    let qemu_done = at("source QEMU completed").max(at("QEMU's stream sealed to its end"));
    let after_qemu = at("Resumed received")
        .zip(qemu_done)
        .map_or(-1.0, |(r, q)| r.saturating_sub(q) as f64 / 1000.0);
    println!(
        "BENCH {} {} {} {} {stamped_ms} {} {after_qemu:.1} {cpu_window_ms} {} {} {}",
        sum.total_ms,
        sum.downtime_ms,
        stream_bytes,
        qemu.downtime.unwrap_or(0),
        qemu.total_time.unwrap_or(0).max(1),
        cpu_after.0.saturating_sub(cpu_before.0),
        cpu_after.1.saturating_sub(cpu_before.1),
        qemu.ram.as_ref().map_or(0, |r| r.dirty_sync_count),
    );
    // The switch-over step by step (µs from the guest's stop), for bench/qemu.sh.
    let steps: Vec<String> = sum
        .timeline
        .iter()
        .map(|s| format!("{} {:.1}", s.step, s.us as f64 / 1000.0))
        .collect();
    println!("TIMELINE {}", steps.join(" | "));
}

/// CPU time in clock ticks (USER_HZ), for the bench's CPU accounting: the whole machine's busy
/// time (`/proc/stat`: all but idle and iowait) and that of the processes `pids` (utime and
/// stime of `/proc/PID/stat`). bench/native_migrate.py counts the same way.
fn cpu_ticks(pids: &[u32]) -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let busy = stat.lines().next().map_or(0, |cpu| {
        // cpu user nice system idle iowait irq softirq steal
        let f: Vec<u64> = cpu
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        f.iter().sum::<u64>() - f.get(3).unwrap_or(&0) - f.get(4).unwrap_or(&0)
    });
    let procs = pids
        .iter()
        .map(|p| {
            let s = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            // After the command's closing parenthesis: state (field 3) ... utime (14), stime (15).
            s.rsplit_once(')').map_or(0, |(_, rest)| {
                rest.split_whitespace()
                    .skip(11)
                    .take(2)
                    .map(|v| v.parse::<u64>().unwrap_or(0))
                    .sum()
            })
        })
        .sum();
    (busy, procs)
}

// ---------------------------------------------------------------------------------------------
// Writable disks mirrored live (issue 10, spec/qemu.md §5).

/// A writable image of `MIRROR_MIB` MiB the source QEMU opens read-write (`-blockdev`, raw or
/// qcow2) as a virtio-blk disk; the destination creates its copy in `received/`. The test
/// writes through the guest's disk on a second QMP monitor of the source.
struct MirrorFixture {
    dir: tempfile::TempDir,
    image: PathBuf,
    format: &'static str,
    test_qmp: PathBuf,
    /// Image size, MiB.
    mib: u64,
}

const MIRROR_MIB: u64 = 16;
/// Bytes per test write, and the number of write slots over the image.
const WRITE_LEN: u64 = 64 << 10;
const WRITE_SLOTS: u64 = 200;

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{program} {args:?}: {text}");
    text
}

impl MirrorFixture {
    fn new(format: &'static str) -> Option<(Self, VmOpts)> {
        Self::sized(format, MIRROR_MIB)
    }

    /// An image of `mib` MiB: its first quarter filled with 0x41, its third with 0x42.
    fn sized(format: &'static str, mib: u64) -> Option<(Self, VmOpts)> {
        if !have("qemu-img", "--version") || !have("qemu-io", "--version") {
            missing("qemu-img and qemu-io (apt-get install -y qemu-utils)");
            return None;
        }
        let dir = tempfile::tempdir().expect("tmp");
        let image = dir.path().join(format!("src.{format}"));
        let img = image.display().to_string();
        run(
            "qemu-img",
            &["create", "-q", "-f", format, &img, &format!("{mib}M")],
        );
        let q = mib / 4;
        run(
            "qemu-io",
            &[
                "-f",
                format,
                "-c",
                &format!("write -P 0x41 0 {q}M"),
                "-c",
                &format!("write -P 0x42 {}M {q}M", 2 * q),
                &img,
            ],
        );
        let test_qmp = dir.path().join("src-test.qmp");
        let received = dir.path().join("received");
        // Raw disks' node in QEMU's JSON syntax, as libvirt writes it, qcow2's in key=value
        // form: the destination's command line leaves out both (spec/qemu.md §1), each checked
        // against real QEMU through `trustmig qemu start-destination`.
        let blockdev = if format == "raw" {
            serde_json::json!({
                "driver": "raw",
                "node-name": "d0",
                "file": {"driver": "file", "filename": img},
            })
            .to_string()
        } else {
            format!("driver={format},node-name=d0,file.driver=file,file.filename={img}")
        };
        let opts = VmOpts {
            append: "area=16 rate=4 check=10".into(),
            mem_mib: MEM_MIB,
            src_extra: vec![
                "-blockdev".into(),
                blockdev,
                "-device".into(),
                "virtio-blk-pci,drive=d0,id=vd0,addr=0x5".into(),
                "-qmp".into(),
                format!("unix:{},server=on,wait=off", test_qmp.display()),
            ],
            transferred: vec![image.clone()],
            src_vm: format!("\n[[vm.disk]]\nname = \"d0\"\npath = \"{img}\"\n"),
            dst_vm: format!(
                "disk_dir = \"{}\"\n\n[[vm.disk]]\nname = \"d0\"\ndevice = {{ driver = \"virtio-blk-pci\", id = \"vd0\", addr = \"0x5\" }}\n",
                received.display()
            ),
            ..VmOpts::default()
        };
        let f = Self {
            dir,
            image,
            format,
            test_qmp,
            mib,
        };
        Some((f, opts))
    }

    fn copy(&self) -> PathBuf {
        self.dir
            .path()
            .join("received")
            .join(format!("d0.{}", self.format))
    }

    fn leftovers(&self) -> Vec<String> {
        std::fs::read_dir(self.dir.path().join("received"))
            .map(|rd| {
                rd.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The guest-visible bytes of `image` (of this fixture's format), read while QEMU may
    /// hold it (`-U`).
    fn content(&self, image: &Path) -> Vec<u8> {
        let out = self.dir.path().join("content.raw");
        run(
            "qemu-img",
            &[
                "convert",
                "-U",
                "-f",
                self.format,
                "-O",
                "raw",
                &image.display().to_string(),
                &out.display().to_string(),
            ],
        );
        let data = std::fs::read(&out).expect("converted image");
        let _ = std::fs::remove_file(&out);
        data
    }

    /// The source image as the writes a writer made say it must be.
    fn expected(&self, writes: &[(u64, u8)]) -> Vec<u8> {
        let (size, q) = ((self.mib << 20) as usize, (self.mib << 18) as usize);
        let mut model = vec![0u8; size];
        model[..q].fill(0x41);
        model[2 * q..3 * q].fill(0x42);
        for &(off, p) in writes {
            model[off as usize..(off + WRITE_LEN) as usize].fill(p);
        }
        model
    }
}

/// Writes through the source guest's virtio-blk device (HMP `qemu-io` on the device's block
/// backend, so they pass QEMU's mirror as the guest's own writes do) every 10 ms while the
/// source VM runs. Returns (offset, pattern) of every write that completed, in order.
struct Writer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Writes completed so far.
    count: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<Vec<(u64, u8)>>,
}

impl Writer {
    async fn start(qmp: &Path, log: PathBuf) -> Self {
        let mut q = Qmp::connect(qmp, Duration::from_secs(10))
            .await
            .expect("source test QMP");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let halt = stop.clone();
        let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = count.clone();
        let task = tokio::spawn(async move {
            let mut done = Vec::new();
            let mut k = 0u64;
            while !halt.load(std::sync::atomic::Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(10)).await;
                if !q.query_status().await.is_ok_and(|s| s.running) {
                    continue;
                }
                let off = (k * 7 % WRITE_SLOTS) * WRITE_LEN;
                let p = (k % 250) as u8 + 1;
                k += 1;
                let before = std::fs::read_to_string(&log).unwrap_or_default().len();
                let cmd =
                    format!("qemu-io -d vd0/virtio-backend \"write -P {p} {off} {WRITE_LEN}\"");
                let r = q
                    .execute(
                        "human-monitor-command",
                        serde_json::json!({ "command-line": cmd }),
                    )
                    .await;
                let said = std::fs::read_to_string(&log).unwrap_or_default();
                let ok = r.is_ok_and(|v| v == "")
                    && said[before.min(said.len())..].contains(&format!("wrote {WRITE_LEN}/"));
                if ok {
                    done.push((off, p));
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
            done
        });
        Self { stop, count, task }
    }

    fn count(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::SeqCst)
    }

    async fn finish(self) -> Vec<(u64, u8)> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.task.await.expect("writer")
    }
}

/// A migration with the guest writing its disk throughout: the destination's copy is the
/// source image as it was at the pause, byte for byte (guest-visible content); writes after
/// `Resumed` land on the destination only. Returns both agents' logs and whether the two image
/// files were equal byte for byte at that point (`None`: skipped).
async fn mirror_moves(format: &'static str, disk_toml: &str) -> Option<(String, bool)> {
    let _g = SERIAL.lock().await;
    let (disk, mut opts) = MirrorFixture::new(format)?;
    opts.src_vm += disk_toml;
    let mut s = setup_with(&opts, true)?;
    let writer = Writer::start(&disk.test_qmp, s.pair.dir().join("src.qemu.log")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let addr = s.pair.dst_addr.clone();
    let (r, events) = migrate(&mut s, &addr, 300).await;
    let writes = writer.finish().await;
    let summary = r.unwrap_or_else(|e| panic!("{e}\n{}", s.logs()));
    assert!(
        events
            .iter()
            .any(|p| matches!(p, Progress::Mirror { ready: true, done, .. } if *done >= 8 << 20)),
        "the operator saw the mirror become ready: {events:?}"
    );
    assert!(
        summary.bytes_on_wire > 8 << 20,
        "the disk's data crossed: {summary:?}"
    );
    assert!(
        writes.len() >= 10,
        "the guest wrote during the migration: {}",
        writes.len()
    );
    assert_moved(&mut s, &summary).await;
    assert_eq!(
        switch_steps(&summary),
        [
            "pre-switchover seen",
            "disk mirrors completed",
            "migrate-continue done"
        ],
        "the mirrors complete in QEMU's pause: {:?}",
        summary.timeline
    );
    let src = disk.content(&disk.image);
    assert!(
        src == disk.expected(&writes),
        "the source image holds every write"
    );
    assert!(
        disk.content(&disk.copy()) == src,
        "the destination's copy equals the source image at the pause"
    );
    let same_file = std::fs::read(&disk.image).ok() == std::fs::read(disk.copy()).ok();
    assert_eq!(
        disk.leftovers(),
        vec![format!("d0.{format}")],
        "no marker after commit"
    );
    // A write on the destination after `Resumed` lands there only.
    let said = hmp_qemu_io(&s.dst, "-d vd0/virtio-backend", "write -P 238 0 64k").await;
    assert_eq!(said, "", "{}", qemu_log(&s, "dst"));
    assert!(qemu_log(&s, "dst").contains("wrote 65536/65536 bytes at offset 0"));
    assert!(disk.content(&disk.copy())[..64 << 10]
        .iter()
        .all(|&b| b == 238));
    assert!(
        disk.content(&disk.image) == src,
        "the source image stays as at the pause"
    );
    Some((s.all_logs(), same_file))
}

/// contrib/trustmig.service's `SystemCallFilter=` (and what else of the unit seccomp and
/// `setpriv` can say: [`SECCOMP_EXEC`]) lets the agents work, and `qemu-img` with them (it
/// inherits the filter): both agents run under that filter, built as the unit's lines say
/// (`systemd-analyze syscall-filter` expands their groups: `@system-service` less the `~`
/// groups; any other call fails with `EPERM`, `SystemCallErrorNumber=`) and loaded by
/// libseccomp before the agent is executed, as root without capabilities in group `tss`,
/// through a whole migration that uses the most (a qcow2 disk mirrored with
/// `verify = "full"`, so both run `qemu-img`; start-up, TPM, journal, QMP, TLS, the data path,
/// shutdown). Under `strace -f` too, which names the calls the filter refused (printed; QEMU
/// 7.2's `qemu-img` tries `set_mempolicy` and goes on). The unit never runs under a real
/// systemd here; this is its filter without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_the_agents_work_under_the_units_system_call_filter() {
    let _g = SERIAL.lock().await;
    let seccomp = Command::new("/usr/bin/python3")
        .args(["-c", "import seccomp"])
        .status()
        .is_ok_and(|s| s.success());
    if !have("strace", "-V") || !have("systemd-analyze", "--version") || !seccomp {
        missing("strace, systemd-analyze and libseccomp's python3 module (apt-get install -y strace systemd python3-seccomp)");
        return;
    }
    let traces = tempfile::tempdir().expect("tmp");
    let allowed = unit_syscall_filter();
    let allow_file = traces.path().join("allowed");
    let list: Vec<&str> = allowed.iter().map(String::as_str).collect();
    std::fs::write(&allow_file, list.join("\n")).expect("allow list");
    let Some((disk, mut opts)) = MirrorFixture::new("qcow2") else {
        return;
    };
    opts.src_vm += "verify = \"full\"\n";
    // Every system call stops at strace: more time for each step on a loaded host.
    (opts.src_step_timeout_secs, opts.dst_step_timeout_secs) = (Some(120), Some(120));
    // CapabilityBoundingSet= (empty), SupplementaryGroups=tss: as root only (setpriv needs
    // the capabilities it drops); a user has none to drop.
    let root = Command::new("id").arg("-u").output().expect("id").stdout == b"0\n";
    let no_caps = [
        "setpriv",
        "--bounding-set=-all",
        "--inh-caps=-all",
        "--groups",
        "tss",
    ];
    let confined = |who: &str| {
        let out = traces.path().join(who).display().to_string();
        let allow = allow_file.display().to_string();
        let strace = ["strace", "-D", "-f", "-qq", "-o", &out];
        let filter = ["/usr/bin/python3", "-c", SECCOMP_EXEC, &allow];
        (strace
            .iter()
            .chain(no_caps.iter().filter(|_| root))
            .chain(&filter))
        .map(|a| a.to_string())
        .collect()
    };
    opts.wrap = [confined("source"), confined("destination")];
    let Some(mut s) = setup_with(&opts, true) else {
        return;
    };
    let addr = s.pair.dst_addr.clone();
    let (r, _) = migrate(&mut s, &addr, 300).await;
    let summary = r.unwrap_or_else(|e| panic!("{e}\n{}", s.logs()));
    assert_moved(&mut s, &summary).await;
    assert_eq!(disk.leftovers().len(), 1, "the copy arrived");
    let hashed = s.all_logs().matches("image hashed in full").count();
    assert_eq!(hashed, 2, "qemu-img ran on both");
    s.pair.stop(0);
    s.pair.stop(1);
    for who in ["source", "destination"] {
        let text = std::fs::read_to_string(traces.path().join(who)).expect("strace output");
        let mut refused = refused_syscalls(&text, &allowed);
        println!("{who}: refused by the filter: {refused:?}");
        // The wrapper's own checks, once each: the filter was in force.
        for check in ["sched_setaffinity", "mmap(W|X)", "socket(AF_NETLINK)"] {
            assert_eq!(refused.remove(check), Some(1), "{who}: {check}");
        }
        // QEMU 7.2's `qemu-img` tries a memory policy and goes on without it.
        refused.remove("set_mempolicy");
        assert!(
            refused.is_empty(),
            "{who}: refused, unexpected: {refused:?}"
        );
    }
}

/// Confines itself as much of contrib/trustmig.service as seccomp can say, then executes
/// `argv[2..]`: the system calls named in the file `argv[1]` (`SystemCallFilter=`), every other
/// failing with `EPERM` (`SystemCallErrorNumber=`); no memory both writable and executable
/// (`MemoryDenyWriteExecute=`: `mmap`, `mprotect` and `pkey_mprotect` with both); sockets of
/// `AF_UNIX`, `AF_INET` and `AF_INET6` only (`RestrictAddressFamilies=`: `EAFNOSUPPORT` for
/// the others, as systemd answers); `UMask=0077`. It checks each holds first, and that it has
/// no capabilities (`setpriv` ran it, or it is no root).
const SECCOMP_EXEC: &str = r#"
import errno, mmap, os, socket, sys, seccomp
f = seccomp.SyscallFilter(seccomp.ERRNO(errno.EPERM))
wx = mmap.PROT_WRITE | mmap.PROT_EXEC
for name in open(sys.argv[1]).read().split():
    try:
        if name in ("mmap", "mprotect", "pkey_mprotect"):
            for prot in (0, mmap.PROT_WRITE, mmap.PROT_EXEC):
                f.add_rule(seccomp.ALLOW, name, seccomp.Arg(2, seccomp.MASKED_EQ, wx, prot))
        elif name == "socket":
            kept = (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6)
            for family in range(64):
                act = seccomp.ALLOW if family in kept else seccomp.ERRNO(errno.EAFNOSUPPORT)
                f.add_rule(act, name, seccomp.Arg(0, seccomp.EQ, family))
        else:
            f.add_rule(seccomp.ALLOW, name)
    except Exception:
        pass  # a name this libseccomp does not know
f.load()
os.umask(0o077)
def refused(what, code, attempt):
    try:
        attempt()
    except OSError as e:
        if e.errno == code:
            return
    sys.exit(what + " is not refused")
refused("sched_setaffinity", errno.EPERM, lambda: os.sched_setaffinity(0, {0}))
refused("W|X memory", errno.EPERM, lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | wx))
refused("AF_NETLINK", errno.EAFNOSUPPORT, lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW))
status = open("/proc/self/status").read()
if "CapEff:\t0000000000000000" not in status:
    sys.exit("capabilities left: " + status)
os.execv(sys.argv[2], sys.argv[2:])
"#;

/// The system calls `contrib/trustmig.service`'s `SystemCallFilter=` lines allow, as
/// `systemd-analyze syscall-filter` expands their groups: the first line's allow-list less
/// every group of the `~` line.
fn unit_syscall_filter() -> std::collections::BTreeSet<String> {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../contrib/trustmig.service"
    ))
    .expect("unit");
    let lines: Vec<&str> = (unit.lines())
        .filter_map(|l| l.strip_prefix("SystemCallFilter="))
        .collect();
    let [allow, deny] = lines[..] else {
        panic!("expected an allow line and a ~deny line: {lines:?}");
    };
    let expand = |words: &str| {
        let mut all = std::collections::BTreeSet::new();
        for w in words.split_whitespace() {
            all.extend(syscall_group(w));
        }
        all
    };
    let deny = deny.strip_prefix('~').expect("a ~ deny line");
    let allowed = expand(allow);
    assert!(
        allowed.contains("read") && allowed.len() > 200,
        "{allowed:?}"
    );
    allowed.difference(&expand(deny)).cloned().collect()
}

/// A system call, or every call in a group (`@name`, nested groups expanded), as the local
/// systemd defines them.
fn syscall_group(name: &str) -> std::collections::BTreeSet<String> {
    if !name.starts_with('@') {
        return [name.to_string()].into();
    }
    let out = Command::new("systemd-analyze")
        .args(["syscall-filter", name])
        .output()
        .expect("systemd-analyze");
    assert!(out.status.success(), "{name}: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut all = std::collections::BTreeSet::new();
    // The first line names the group itself.
    for line in text.lines().skip(1).map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        all.extend(syscall_group(line));
    }
    all
}

/// The system calls an `strace -f` output shows refused by the filter, with how often: a
/// call `allowed` does not hold that failed with `EPERM`; a `socket` refused its family
/// (`EAFNOSUPPORT`), as `socket(FAMILY)`; memory asked writable and executable, as
/// `mmap(W|X)` (or `mprotect`, `pkey_mprotect`). Lines `PID name(args) = -1 ERRNO ...`.
fn refused_syscalls(
    text: &str,
    allowed: &std::collections::BTreeSet<String>,
) -> std::collections::BTreeMap<String, usize> {
    let mut refused = std::collections::BTreeMap::new();
    for line in text.lines() {
        if !(line.contains("= -1 EPERM") || line.contains("= -1 EAFNOSUPPORT")) {
            continue;
        }
        let Some((_, call)) = line.split_once(' ') else {
            continue;
        };
        let call = call.trim_start();
        let call = call.strip_prefix("<... ").unwrap_or(call);
        let end = call
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(call.len());
        let (name, args) = call.split_at(end);
        let key = match name {
            "socket" => {
                let family = args.trim_start_matches('(').split(',').next().unwrap_or("");
                format!("socket({family})")
            }
            "mmap" | "mprotect" | "pkey_mprotect" if args.contains("PROT_WRITE|PROT_EXEC") => {
                format!("{name}(W|X)")
            }
            _ if name.is_empty() || allowed.contains(name) => continue,
            _ => name.to_string(),
        };
        *refused.entry(key).or_insert(0) += 1;
    }
    refused
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_mirrors_a_writable_raw_disk_while_the_guest_writes() {
    let moved = mirror_moves("raw", "").await;
    assert!(
        moved.is_none_or(|(l, _)| !l.contains("image hashed in full")),
        "verify = \"stream\" (the default) hashes no image"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_mirrors_a_writable_qcow2_disk_while_the_guest_writes() {
    mirror_moves("qcow2", "").await;
}

/// `verify = "full"` (spec/qemu.md §5): both agents hash the image as the guest sees it, the
/// source once QEMU completed, the destination once its NBD stream ended, and the final
/// digest binds both: the move commits only if they agree. A qcow2 copy is laid out unlike the
/// source file (its clusters land in arrival order), so this also pins that the hash is of
/// guest-visible content: the two files differ byte-wise here, their guest views do not.
async fn mirror_verified_in_full(format: &'static str) {
    let Some((logs, same_file)) = mirror_moves(format, "verify = \"full\"\n").await else {
        return;
    };
    let hashed = logs.matches("image hashed in full").count();
    assert_eq!(hashed, 2, "hashed on both hosts:\n{logs}");
    assert_eq!(
        same_file,
        format == "raw",
        "a raw copy is the source file; a qcow2 copy is laid out anew, its guest view the same"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_verifies_a_mirrored_raw_disk_in_full() {
    mirror_verified_in_full("raw").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_verifies_a_mirrored_qcow2_disk_in_full() {
    mirror_verified_in_full("qcow2").await;
}

/// A copy that diverged from the source image after every NBD byte arrived intact (here the
/// destination agent, by fault injection, flips a data byte of its copy before hashing it):
/// the stream digests agree, the image digests do not, and the migration rolls back with the
/// source guest writing on and the copy removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_a_copy_unlike_the_source_image_rolls_back() {
    let _g = SERIAL.lock().await;
    let Some((disk, mut opts)) = MirrorFixture::new("qcow2") else {
        return;
    };
    opts.src_vm += "verify = \"full\"\n";
    opts.dst_env = vec![(
        trustmig_agent::fault::ALTER_MIRRORED_IMAGE_ENV.into(),
        "1".into(),
    )];
    let Some(mut s) = setup_with(&opts, true) else {
        return;
    };
    let writer = Writer::start(&disk.test_qmp, s.pair.dir().join("src.qemu.log")).await;
    let addr = s.pair.dst_addr.clone();
    let (r, _) = migrate(&mut s, &addr, 300).await;
    let err = r.err().unwrap_or_else(|| panic!("must fail\n{}", s.logs()));
    assert!(
        err.contains("final image digest mismatch") && err.contains("rolled back"),
        "{err}\n{}",
        s.logs()
    );
    assert!(
        s.all_logs()
            .contains("fault injection: altered a byte of the copy"),
        "the fault fired"
    );
    assert_mirror_rolled_back(&mut s, &disk, writer).await;
    disk.wait_removed().await;
}

/// Active mirroring (`mirror = "write-blocking"`): every guest write reaches both copies before
/// it completes; the move is the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_mirrors_in_write_blocking_mode() {
    mirror_moves("qcow2", "mirror = \"write-blocking\"\n").await;
}

/// A disk the source cannot move is refused by name before anything moves: here a qcow2
/// overlay with a backing file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_disk_with_a_backing_chain_is_refused() {
    let _g = SERIAL.lock().await;
    let Some((disk, mut opts)) = MirrorFixture::new("qcow2") else {
        return;
    };
    let overlay = disk.dir.path().join("overlay.qcow2");
    let (img, top) = (
        disk.image.display().to_string(),
        overlay.display().to_string(),
    );
    run(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", &img, &top,
        ],
    );
    for a in opts.src_extra.iter_mut() {
        *a = a.replace(&img, &top);
    }
    opts.src_vm = opts.src_vm.replace(&img, &top);
    opts.transferred = vec![overlay];
    let Some(mut s) = setup_with(&opts, true) else {
        return;
    };
    let addr = s.pair.dst_addr.clone();
    let (r, _) = migrate(&mut s, &addr, 300).await;
    let err = r.err().unwrap_or_else(|| panic!("must fail\n{}", s.logs()));
    assert!(err.contains("backing chain"), "{err}");
    assert!(err.contains("untouched"), "{err}");
    // spec/qemu.md §5: QEMU 7.2's flat node list gives even this overlay `backing_file_depth`
    // 0; its `backing_file` is what tells (what the agent reads).
    let nodes = (s.src.qmp().await.expect("qmp"))
        .execute(
            "query-named-block-nodes",
            serde_json::json!({ "flat": true }),
        )
        .await
        .expect("query-named-block-nodes");
    let node = (nodes.as_array().into_iter().flatten())
        .find(|n| n["file"] == top.as_str() && n["drv"] == "qcow2")
        .unwrap_or_else(|| panic!("no qcow2 node of {top}: {nodes}"));
    assert_eq!(node["backing_file_depth"], 0, "{node}");
    assert_eq!(node["backing_file"], img.as_str(), "{node}");
    assert_eq!(s.src.status().await.as_deref(), Ok("running"));
    assert_eq!(s.dst.status().await.as_deref(), Ok("inmigrate"));
    assert!(disk.leftovers().is_empty(), "{:?}", disk.leftovers());
}

/// `verify = "full"` on an image that cannot be hashed as the guest sees it (here a compressed
/// qcow2: its clusters have no plain offset in the file) is refused by name before anything
/// moves, not at the switch-over with the guest paused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_a_disk_that_cannot_be_verified_in_full_is_refused_up_front() {
    let _g = SERIAL.lock().await;
    let Some((disk, mut opts)) = MirrorFixture::new("qcow2") else {
        return;
    };
    let packed = disk.dir.path().join("packed.qcow2");
    let (img, top) = (
        disk.image.display().to_string(),
        packed.display().to_string(),
    );
    run("qemu-img", &["convert", "-c", "-O", "qcow2", &img, &top]);
    for a in opts.src_extra.iter_mut() {
        *a = a.replace(&img, &top);
    }
    opts.src_vm = opts.src_vm.replace(&img, &top) + "verify = \"full\"\n";
    opts.transferred = vec![packed];
    let Some(mut s) = setup_with(&opts, true) else {
        return;
    };
    let addr = s.pair.dst_addr.clone();
    let (r, _) = migrate(&mut s, &addr, 300).await;
    let err = r.err().unwrap_or_else(|| panic!("must fail\n{}", s.logs()));
    assert!(
        err.contains("verify = \"full\"") && err.contains("compressed or encrypted"),
        "{err}"
    );
    assert!(err.contains("untouched"), "{err}");
    assert_eq!(s.src.status().await.as_deref(), Ok("running"));
    assert_eq!(s.dst.status().await.as_deref(), Ok("inmigrate"));
    assert!(disk.leftovers().is_empty(), "{:?}", disk.leftovers());
}

impl MirrorFixture {
    /// The destination removes its copy (and marker) of a rolled-back mirror within 10 s.
    async fn wait_removed(&self) {
        let removed = until(
            Duration::from_secs(10),
            Duration::from_millis(50),
            async || self.leftovers().is_empty(),
        )
        .await;
        assert!(removed, "copy not removed: {:?}", self.leftovers());
    }
}

/// After a failed mirrored migration: the source runs alone and keeps writing its disk, the
/// image holds every write the guest made, QEMU has no mirror job or NBD client left, and the
/// destination's copy is gone.
async fn assert_mirror_rolled_back(s: &mut Setup, disk: &MirrorFixture, writer: Writer) {
    assert_source_guest_runs(s, Duration::from_secs(10)).await;
    let before = writer.count();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let writes = writer.finish().await;
    assert!(
        writes.len() > before,
        "the source guest writes on after the rollback"
    );
    assert!(
        disk.content(&disk.image) == disk.expected(&writes),
        "the source image holds every write, nothing else"
    );
    let mut q = Qmp::connect(&disk.test_qmp, Duration::from_secs(5))
        .await
        .expect("test qmp");
    let jobs = q
        .execute("query-jobs", serde_json::json!({}))
        .await
        .expect("query-jobs");
    assert_eq!(jobs, serde_json::json!([]), "no mirror job is left");
    let nodes = q
        .execute(
            "query-named-block-nodes",
            serde_json::json!({ "flat": true }),
        )
        .await
        .expect("nodes");
    assert!(!nodes.to_string().contains("trustmig-nbd"), "{nodes}");
    assert!(s.dst.ticks().is_empty(), "the destination guest never ran");
}

async fn mirror_faulted(format: &'static str, fault: Fault, expect: &str) {
    let _g = SERIAL.lock().await;
    let Some((disk, opts)) = MirrorFixture::new(format) else {
        return;
    };
    let Some(mut s) = setup_with(&opts, true) else {
        return;
    };
    let writer = Writer::start(&disk.test_qmp, s.pair.dir().join("src.qemu.log")).await;
    let proxy = Proxy::start_on(s.pair.dst_addr.clone(), fault, 1)
        .await
        .expect("proxy");
    let (r, _) = migrate(&mut s, &proxy.addr.clone(), 300).await;
    assert!(proxy.fired.load(std::sync::atomic::Ordering::SeqCst));
    let err = r.err().unwrap_or_else(|| panic!("must fail\n{}", s.logs()));
    assert!(
        err.contains(expect),
        "{err}\n{}\nsource QEMU: {}",
        s.logs(),
        qemu_log(&s, "src")
    );
    assert!(err.contains("rolled back"), "{err}");
    assert_mirror_rolled_back(&mut s, &disk, writer).await;
    disk.wait_removed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_tampered_nbd_record_rolls_back() {
    mirror_faulted("qcow2", Fault::FlipBit(8), "tampered").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_replayed_nbd_record_rolls_back() {
    mirror_faulted("raw", Fault::Replay(8), "replayed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_dropped_nbd_record_rolls_back() {
    mirror_faulted("raw", Fault::Drop(8), "records dropped").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_reordered_nbd_record_rolls_back() {
    mirror_faulted("qcow2", Fault::Reorder(8), "records dropped").await;
}

/// SIGKILL of the destination agent while the disk is mirrored: the source's mirror fails,
/// the source runs on with its image intact and every guest write in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_destination_killed_mid_mirror_leaves_the_source_running() {
    let _g = SERIAL.lock().await;
    let Some((disk, opts)) = MirrorFixture::new("qcow2") else {
        return;
    };
    let Some(mut s) = setup_with(&opts, true) else {
        return;
    };
    let writer = Writer::start(&disk.test_qmp, s.pair.dir().join("src.qemu.log")).await;
    // SIGKILL as soon as the destination created its copy (the mirror is starting).
    let copy = disk.copy();
    let pid = s.pair.procs[1].as_ref().expect("destination agent").pid();
    let killer = std::thread::spawn(move || {
        until_blocking(Duration::from_secs(60), Duration::from_millis(1), || {
            copy.exists()
        });
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        copy.exists()
    });
    let addr = s.pair.dst_addr.clone();
    let (r, _) = migrate(&mut s, &addr, 300).await;
    assert!(
        killer.join().expect("killer"),
        "the destination never created its copy"
    );
    let err = r.err().unwrap_or_else(|| panic!("must fail\n{}", s.logs()));
    assert!(err.contains("rolled back"), "{err}\n{}", s.logs());
    assert_mirror_rolled_back(&mut s, &disk, writer).await;
}

/// A source agent killed mid-mirror (its first pre-copy round: the mirror ready, QEMU's stream
/// under way) leaves its mirror job (failed, kept: `auto-dismiss` is off) and its NBD client
/// node in the source QEMU. After the restart the VM runs on at the source, and its next
/// migration removes them and moves: before, every later order of the VM failed on the
/// duplicate node name until someone removed them by hand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_a_mirror_left_by_a_killed_source_agent_does_not_block_the_next_order() {
    mirror_left_by_a_killed_source_agent(None).await;
}

/// The same, with the disk renamed in both agents' configurations before the next order: the
/// job left under the old name holds the disk (its filter node over it), so this order's mirror
/// of it could not start ("Need a root block node"). Before, only the names of this order's
/// disks were looked for, and every later order of the VM failed so until someone removed the
/// job by hand. The new name is as long as a disk name may be (31 bytes, QEMU's longest node
/// name): before, the agent's node names held the disk's name and QEMU refused them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_a_mirror_left_under_a_disk_since_renamed_does_not_block_the_next_order() {
    mirror_left_by_a_killed_source_agent(Some("root-disk-of-a-long-name-for-31")).await;
}

async fn mirror_left_by_a_killed_source_agent(renamed: Option<&str>) {
    let _g = SERIAL.lock().await;
    let Some((disk, mut opts)) = MirrorFixture::new("raw") else {
        return;
    };
    opts.src_env = crash_at(CrashPoint::SourceMidTransfer);
    let Some(mut s) = setup_with(&opts, true) else {
        return;
    };
    let addr = s.pair.dst_addr.clone();
    let (r, _) = migrate(&mut s, &addr, 300).await;
    assert!(r.is_err(), "the source agent died mid-transfer");
    wait_agent_exit(&mut s, 0, Duration::from_secs(30));
    let mut q = Qmp::connect(&disk.test_qmp, Duration::from_secs(5))
        .await
        .expect("test qmp");
    let nodes = q
        .execute(
            "query-named-block-nodes",
            serde_json::json!({ "flat": true }),
        )
        .await
        .expect("nodes");
    for node in ["trustmig-nbd-0", "trustmig-mirror-top-0"] {
        assert!(
            nodes.to_string().contains(node),
            "the killed agent left {node}: {nodes}"
        );
    }
    // spec/qemu.md §5: QEMU keeps the job (`auto-dismiss` off): still `ready`, or concluded
    // with the broken NBD connection's error.
    let jobs = q
        .execute("query-jobs", serde_json::json!({}))
        .await
        .expect("jobs");
    let left = (jobs.as_array().into_iter().flatten())
        .find(|j| {
            j["id"]
                .as_str()
                .is_some_and(|id| id.starts_with("trustmig-mirror-"))
        })
        .unwrap_or_else(|| panic!("the killed agent's mirror job is gone: {jobs}"));
    let kept = match left["status"].as_str() {
        Some("ready") => true,
        Some("concluded") => left["error"].is_string(),
        _ => false,
    };
    assert!(kept, "{left}");
    if let Some(name) = renamed {
        rename_disk(&s.pair.src, name);
        rename_disk(&s.pair.dst, name);
        reload_once_idle(&s.pair.dst).await;
    }
    s.pair.procs[0] = None;
    s.pair.src_env.clear();
    s.pair.start(0).expect("source agent restarts");
    assert_source_runs_alone(&mut s, Duration::from_secs(60)).await;
    // The destination QEMU of the failed order is on its way out: a new one takes its place.
    s.replace_dst("dst-next", &opts, true);
    let (again, _) = migrate(&mut s, &addr, 300).await;
    let summary = again.unwrap_or_else(|e| panic!("the next migration: {e}\n{}", s.logs()));
    assert_moved(&mut s, &summary).await;
    assert!(
        s.logs()
            .contains("an earlier migration's mirror left these in QEMU"),
        "{}",
        s.logs()
    );
    let jobs = q
        .execute("query-jobs", serde_json::json!({}))
        .await
        .expect("jobs");
    assert_eq!(
        jobs,
        serde_json::json!([]),
        "no job is left in the source QEMU"
    );
    let nodes = q
        .execute(
            "query-named-block-nodes",
            serde_json::json!({ "flat": true }),
        )
        .await
        .expect("nodes");
    assert!(
        !nodes.to_string().contains("trustmig-"),
        "no node of the agent's is left in the source QEMU: {nodes}"
    );
    if let Some(name) = renamed {
        let copy = disk.dir.path().join("received").join(format!("{name}.raw"));
        assert!(
            copy.exists(),
            "the disk arrived as {name}: {:?}",
            disk.leftovers()
        );
    }
}

/// Reload the agent at `home` once it no longer holds the VM (a failed arrival may still be
/// rolling back).
async fn reload_once_idle(home: &trustmig_agent::home::Home) {
    let mut last = String::new();
    let reply = eventually(
        Duration::from_secs(30),
        Duration::from_millis(100),
        async || match ask(home, trustmig_agent::control::Request::Reload).await {
            Some(Reply::Error(e)) if e.contains("migrating") => {
                last = e;
                None
            }
            other => Some(other),
        },
    )
    .await;
    assert!(
        matches!(reply, Some(Some(Reply::Reloaded(_)))),
        "the agent at {} reloads: {reply:?} (last refusal: {last})",
        home.root().display()
    );
}

/// Rename the test's disk `d0` to `name` in the agent's configuration at `home`.
fn rename_disk(home: &trustmig_agent::home::Home, name: &str) {
    let path = home.config();
    let text = std::fs::read_to_string(&path).expect("config");
    let old = "name = \"d0\"";
    assert_eq!(text.matches(old).count(), 1, "{text}");
    std::fs::write(&path, text.replace(old, &format!("name = \"{name}\""))).expect("config");
}

/// A QEMU with no machine (`-machine none -S`) and the extra `args`, fed the QMP commands of
/// `script` on stdin after `qmp_capabilities`, then `quit`: whether it exited cleanly, and its
/// stdout (QMP's replies) and stderr.
fn qemu_machineless(args: &[String], script: &[&str]) -> (bool, String, String) {
    // In a directory of its own: some options name files (`-pidfile -x` writes `-x`).
    let dir = tempfile::tempdir().expect("temp dir");
    let mut child = Command::new("qemu-system-x86_64")
        .current_dir(dir.path())
        .args(["-machine", "none", "-nodefaults", "-display", "none", "-S"])
        .args(args)
        .args(["-qmp", "stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-system-x86_64 starts");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut lines = String::from("{\"execute\":\"qmp_capabilities\"}\n");
    for command in script {
        lines += command;
        lines += "\n";
    }
    lines += "{\"execute\":\"quit\"}\n";
    // Ignored by a QEMU that already exited on its command line.
    let _ = std::io::Write::write_all(&mut stdin, lines.as_bytes());
    drop(stdin);
    // A QEMU that hangs fails the test, not hangs it (its replies are small: no pipe fills).
    let ended = until_blocking(Duration::from_secs(30), Duration::from_millis(10), || {
        !matches!(child.try_wait(), Ok(None))
    });
    if !ended {
        let _ = child.kill();
    }
    let out = child.wait_with_output().expect("qemu-system-x86_64 ends");
    assert!(ended, "QEMU did not quit within 30 s: {args:?}");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// What the agent's mirror node names (`trustmig-nbd-<i>`, `trustmig-mirror-top-<i>`) rely on,
/// pinned against QEMU: a node name of 31 bytes is taken, one of 32 refused ("Node name too
/// long"). Until 2026-11-30 the names held the disk's name, and a disk name over 11 bytes
/// could not be mirrored.
#[test]
fn qemu_takes_node_names_of_31_bytes_and_no_longer() {
    if !have("qemu-system-x86_64", "--version") && missing("qemu-system-x86_64") {
        return;
    }
    let start = |len: usize| {
        let node = "n".repeat(len);
        let blockdev = [
            "-blockdev".into(),
            format!("driver=null-co,node-name={node}"),
        ];
        let (ok, _, err) = qemu_machineless(&blockdev, &[]);
        (ok, err)
    };
    let (ok, err) = start(31);
    assert!(ok, "31 bytes: {err}");
    let (ok, err) = start(32);
    assert!(!ok && err.contains("Node name too long"), "32 bytes: {err}");
}

/// spec/qemu.md §1 (`start-destination` reads the source's line as QEMU does): each option the
/// agent's parser takes to have a value (`trustmig_qemu::cmdline::VALUE_OPTS`) takes the next
/// argument as its value even when it starts with `-`, as QEMU does: `<opt> -bogus` never has
/// QEMU call `-bogus` an invalid option (the value may well be refused). A flag before
/// `-bogus` does (the check can fail). And `-drive` has no JSON form: a JSON object given to it
/// is read as key=value and refused.
#[test]
fn qemu_reads_the_next_argument_as_the_value_of_each_value_option() {
    if !have("qemu-system-x86_64", "--version") && missing("qemu-system-x86_64") {
        return;
    }
    let invalid = "-bogus: invalid option";
    for opt in trustmig_qemu::cmdline::VALUE_OPTS {
        let (_, _, err) = qemu_machineless(&[opt.to_string(), "-bogus".into()], &[]);
        assert!(!err.contains(invalid), "{opt} -bogus: {err}");
    }
    let (ok, _, err) = qemu_machineless(&["-no-reboot".into(), "-bogus".into()], &[]);
    assert!(!ok && err.contains(invalid), "a flag: {err}");
    let json = r#"{"driver":"null-co","node-name":"d"}"#;
    let (ok, _, err) = qemu_machineless(&["-drive".into(), json.into()], &[]);
    assert!(!ok && err.contains("-drive"), "-drive with JSON: {err}");
}

/// spec/qemu.md §5: a job id has no such limit: the agent's mirror job of a disk whose name has
/// the 31 bytes a name may have (`trustmig-mirror-<disk>`, 47 bytes) is taken by
/// `blockdev-mirror` and listed by `query-jobs` under that id.
#[test]
fn qemu_takes_a_mirror_job_id_of_47_bytes() {
    if !have("qemu-system-x86_64", "--version") && missing("qemu-system-x86_64") {
        return;
    }
    let job = format!("trustmig-mirror-{}", "d".repeat(31));
    assert_eq!(job.len(), 47);
    let args = ["src", "dst"]
        .iter()
        .flat_map(|n| {
            [
                "-blockdev".to_string(),
                format!("driver=null-co,node-name={n},size=1048576"),
            ]
        })
        .collect::<Vec<_>>();
    let mirror = format!(
        "{{\"execute\":\"blockdev-mirror\",\"arguments\":{{\"job-id\":\"{job}\",\"device\":\"src\",\"target\":\"dst\",\"sync\":\"full\"}}}}"
    );
    let (ok, out, err) = qemu_machineless(&args, &[&mirror, "{\"execute\":\"query-jobs\"}"]);
    assert!(ok, "{err}");
    assert!(!out.contains("\"error\""), "{out}");
    // `query-jobs`' reply (events name the job too).
    let listed = out.lines().find(|l| l.contains("\"return\": ["));
    assert!(
        listed.is_some_and(|l| l.contains(&format!("\"id\": \"{job}\""))),
        "{out}"
    );
}

/// Benchmark for bench/disk.sh: a mirrored disk of `TRUSTMIG_BENCH_DISK_MIB` MiB (raw, half
/// of it data) moves with the guest writing 64 KiB every 10 ms. Prints
/// `BENCH <total ms> <end-to-end downtime ms> <disk bytes> <mirror ms> <QEMU's downtime ms>`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark, run by bench/disk.sh"]
async fn bench_trustmig_disk() {
    let _g = SERIAL.lock().await;
    let mib = std::env::var("TRUSTMIG_BENCH_DISK_MIB")
        .map_or(1024, |v| v.parse().expect("TRUSTMIG_BENCH_DISK_MIB is MiB"));
    let Some((disk, mut opts)) = MirrorFixture::sized("raw", mib) else {
        return;
    };
    opts.dst_extra.push("-mem-prealloc".into());
    // TRUSTMIG_BENCH_VERIFY=full: the disk verified in full (its downtime cost).
    if let Ok(v) = std::env::var("TRUSTMIG_BENCH_VERIFY") {
        opts.src_vm += &format!("verify = \"{v}\"\n");
    }
    let Some(mut s) = setup_with(&opts, true) else {
        return;
    };
    let writer = Writer::start(&disk.test_qmp, s.pair.dir().join("src.qemu.log")).await;
    let addr = s.pair.dst_addr.clone();
    let (r, _) = migrate(&mut s, &addr, 300).await;
    let writes = writer.finish().await;
    let sum = r.unwrap_or_else(|e| panic!("{e}\n{}", s.logs()));
    if std::env::var_os("TRUSTMIG_BENCH_LOGS").is_some() {
        eprintln!("{}", s.logs());
    }
    assert!(
        disk.content(&disk.copy()) == disk.expected(&writes),
        "the copy is the image at the pause"
    );
    let qemu = s.src.migration().await.expect("source query-migrate");
    println!(
        "BENCH {} {} {} {} {}",
        sum.total_ms,
        sum.downtime_ms,
        sum.disk_bytes,
        sum.disk_ms,
        qemu.downtime.unwrap_or(0)
    );
}
