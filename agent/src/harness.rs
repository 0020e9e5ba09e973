//! Two agents, two swtpm instances, an operator and a trust set-up on one machine: what the
//! demo runs and what the system tests attack. Everything lives in one temp dir and dies with
//! the [`Pair`].

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use trustmig_attest::slowtpm::{Delay, SlowTpm};
use trustmig_attest::swtpm::{LocalCa, Swtpm, SwtpmError};
use trustmig_protocol::order::{Limits, SignedOrder};
use trustmig_protocol::AgentId;

use crate::admin::{self, OrderArgs};
use crate::control::{self, Reply, Request};
use crate::error::AgentError;
use crate::home::Home;
use crate::identity::operator_keygen;

pub mod wait;

/// The synthetic VM the pair migrates.
#[derive(Clone, Debug)]
pub struct VmSpec {
    /// Name.
    pub name: String,
    /// Memory, MiB.
    pub size_mib: u64,
    /// Pages dirtied per second while running.
    pub dirty_pages_per_sec: u64,
    /// Fraction of pages receiving 90% of writes.
    pub hot_fraction: f64,
    /// Fraction of pages holding data.
    pub fill_fraction: f64,
}

impl Default for VmSpec {
    fn default() -> Self {
        Self {
            name: "demo-vm".into(),
            size_mib: 512,
            dirty_pages_per_sec: 20_000,
            hot_fraction: 0.15,
            fill_fraction: 0.5,
        }
    }
}

/// A running agent process; SIGTERM then SIGKILL on drop.
pub struct AgentProcess {
    child: Child,
    /// Its log file.
    pub log: PathBuf,
}

impl AgentProcess {
    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL now (a crash).
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait up to 10 s.
    pub fn terminate(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let child = &mut self.child;
        let exited = || matches!(child.try_wait(), Ok(Some(_)));
        if !wait::until_blocking(Duration::from_secs(10), Duration::from_millis(20), exited) {
            self.kill9();
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
        }
    }
}

/// A source and a destination agent on loopback.
pub struct Pair {
    /// Source home.
    pub src: Home,
    /// Destination home.
    pub dst: Home,
    /// Source identity.
    pub src_id: AgentId,
    /// Destination identity.
    pub dst_id: AgentId,
    /// Where the source listens.
    pub src_addr: String,
    /// Where the destination listens.
    pub dst_addr: String,
    /// Operator signing key file.
    pub operator_key: PathBuf,
    /// Agent processes once started: [source, destination].
    pub procs: Vec<Option<AgentProcess>>,
    /// Orders this pair signs ask for the strict final quote (SPEC.md §8.7).
    pub strict_final_quote: bool,
    /// Extra environment of the source agent process (fault injection, `crate::fault`).
    pub src_env: Vec<(String, String)>,
    /// Extra environment of the destination agent process (fault injection, `crate::fault`).
    pub dst_env: Vec<(String, String)>,
    /// A command each agent [source, destination] runs under, its program and arguments
    /// before the agent's (`strace -D ...`): it must leave the agent the process started, so
    /// that signals reach it.
    pub wrap: [Vec<String>; 2],
    exe: PathBuf,
    tpms: Vec<Swtpm>,
    /// With `TRUSTMIG_TPM_SIGN_MS`: a relay per TPM that makes it sign as slowly as hardware.
    slow: Vec<SlowTpm>,
    _ca: LocalCa,
    dir: tempfile::TempDir,
}

/// A loopback address for an agent to listen on: it binds it only once started, seconds later
/// (`trustmig_attest::loopback` says why that is not a `bind(0)` port).
fn free_addr() -> Result<String, AgentError> {
    let port = trustmig_attest::loopback::reserve(1).map_err(AgentError::io("loopback port"))?;
    Ok(format!("127.0.0.1:{port}"))
}

/// The environment variable that makes the pair's TPMs sign (quote) in that many ms, as
/// hardware TPMs do (100–600 ms), for tests and benchmarks (`bench/qemu.sh`).
pub const TPM_SIGN_MS_ENV: &str = "TRUSTMIG_TPM_SIGN_MS";

/// How long the TPMs sign as `TPM_SIGN_MS_ENV` asks (none: swtpm's own speed).
fn sign_time_from_env() -> Result<Option<std::time::Duration>, AgentError> {
    let Ok(ms) = std::env::var(TPM_SIGN_MS_ENV) else {
        return Ok(None);
    };
    let ms: u64 = ms.parse().map_err(|_| AgentError::BadConfig {
        path: TPM_SIGN_MS_ENV.into(),
        reason: format!("{ms:?} is not a number of milliseconds"),
    })?;
    Ok(Some(std::time::Duration::from_millis(ms)))
}

/// A slow-TPM relay per TPM that signs in `sign` (none: no relay).
fn slow_tpms(
    tpms: &[Swtpm],
    sign: Option<std::time::Duration>,
) -> Result<Vec<SlowTpm>, AgentError> {
    let Some(sign) = sign else {
        return Ok(Vec::new());
    };
    let delay = Delay::signing(sign);
    tpms.iter()
        .map(|t| SlowTpm::start(t.port(), delay.clone()).map_err(AgentError::io("slow TPM relay")))
        .collect()
}

fn swtpm_err(e: SwtpmError) -> AgentError {
    match e {
        SwtpmError::NotInstalled { .. } => AgentError::MissingProgram {
            program: "swtpm",
            package: "swtpm swtpm-tools",
        },
        other => AgentError::Tpm(other.to_string()),
    }
}

impl Pair {
    /// Create homes, TPMs (manufactured with EK certificates from a local CA), an operator,
    /// mutual trust and mutual AK enrollment; `exe` is the `trustmig` binary to run agents with.
    pub fn create(exe: &Path, vm: &VmSpec, streams: u16) -> Result<Self, AgentError> {
        Self::create_with(exe, std::slice::from_ref(vm), streams)
    }

    /// Like [`Pair::create`], with several VMs on the source.
    pub fn create_with(exe: &Path, vms: &[VmSpec], streams: u16) -> Result<Self, AgentError> {
        Self::create_signing_in(exe, vms, streams, sign_time_from_env()?)
    }

    /// Like [`Pair::create_with`], with TPMs that sign (quote) in `sign`, as hardware TPMs do
    /// (none: at swtpm's speed).
    pub fn create_signing_in(
        exe: &Path,
        vms: &[VmSpec],
        streams: u16,
        sign: Option<std::time::Duration>,
    ) -> Result<Self, AgentError> {
        let dir = tempfile::Builder::new()
            .prefix("trustmig-pair-")
            .tempdir()
            .map_err(AgentError::io("temp dir"))?;
        let ca = LocalCa::new().map_err(swtpm_err)?;
        let tpms = vec![
            Swtpm::start_manufactured(&ca).map_err(swtpm_err)?,
            Swtpm::start_manufactured(&ca).map_err(swtpm_err)?,
        ];
        let src = Home::at(dir.path().join("source"));
        let dst = Home::at(dir.path().join("destination"));
        let src_addr = free_addr()?;
        let dst_addr = free_addr()?;
        // The agents run `exe`, which need not be the program running this (tests).
        let agent_exe = crate::attestation::file_sha256(exe)?;
        let slow = slow_tpms(&tpms, sign)?;
        let tcti = |i: usize| slow.get(i).map_or_else(|| tpms[i].tcti(), SlowTpm::tcti);
        let src_id = admin::init_with(&src, &src_addr, &tcti(0), agent_exe)?;
        let dst_id = admin::init_with(&dst, &dst_addr, &tcti(1), agent_exe)?;
        for h in [&src, &dst] {
            let path = h.config();
            let mut text = std::fs::read_to_string(&path).map_err(AgentError::io(&path))?;
            text = text.replace("streams = 2", &format!("streams = {streams}"));
            std::fs::write(&path, text).map_err(AgentError::io(&path))?;
        }
        let cfg = src.config();
        let mut text = std::fs::read_to_string(&cfg).map_err(AgentError::io(&cfg))?;
        for vm in vms {
            text += &format!(
                "\n[[vm]]\nname = \"{}\"\nbackend = \"synthetic\"\nsize_mib = {}\ndirty_pages_per_sec = {}\nhot_fraction = {}\nfill_fraction = {}\nseed = 7\n",
                vm.name, vm.size_mib, vm.dirty_pages_per_sec, vm.hot_fraction, vm.fill_fraction
            );
        }
        std::fs::write(&cfg, text).map_err(AgentError::io(&cfg))?;
        admin::add_peer(&src, "destination", dst_id)?;
        admin::add_peer(&dst, "source", src_id)?;
        let operator_key = dir.path().join("operator.key");
        let op = operator_keygen(&operator_key)?;
        admin::add_operator(&src, "operator", op)?;
        admin::add_operator(&dst, "operator", op)?;
        let ca_pem = ca.certificates_pem().map_err(swtpm_err)?;
        admin::enroll(&src, &dst, &ca_pem)?;
        admin::enroll(&dst, &src, &ca_pem)?;
        Ok(Self {
            src,
            dst,
            src_id,
            dst_id,
            src_addr,
            dst_addr,
            operator_key,
            procs: vec![None, None],
            strict_final_quote: false,
            src_env: Vec::new(),
            dst_env: Vec::new(),
            wrap: [Vec::new(), Vec::new()],
            exe: exe.to_path_buf(),
            tpms,
            slow,
            _ca: ca,
            dir,
        })
    }

    /// Stop the agents and TPMs but keep the directory (homes, journals, logs); returns it.
    pub fn keep(mut self) -> PathBuf {
        for p in self.procs.iter_mut() {
            if let Some(mut p) = p.take() {
                p.terminate();
            }
        }
        self.tpms.clear();
        let Pair { dir, .. } = self;
        dir.keep()
    }

    /// The temp dir everything lives in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The TCTI of agent `i` (0 = source): its swtpm, or the slow relay in front of it.
    pub fn tcti(&self, i: usize) -> String {
        self.slow
            .get(i)
            .map_or_else(|| self.tpms[i].tcti(), SlowTpm::tcti)
    }

    /// Power-cycle agent `i`'s TPM, as a reboot of its host does (its PCRs read zeros after).
    pub fn power_cycle_tpm(&self, i: usize) -> Result<(), AgentError> {
        self.tpms[i].power_cycle().map_err(swtpm_err)
    }

    /// Start agent `i` (0 = source, 1 = destination) and wait for its control socket.
    pub fn start(&mut self, i: usize) -> Result<(), AgentError> {
        let home = if i == 0 { &self.src } else { &self.dst };
        let log = self.dir.path().join(if i == 0 {
            "source.log"
        } else {
            "destination.log"
        });
        let _ = std::fs::remove_file(home.control_socket());
        // Appended: a restarted agent's log follows the one before it (crash tests read both).
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(AgentError::io(&log))?;
        let err = out.try_clone().map_err(AgentError::io(&log))?;
        let env = if i == 0 { &self.src_env } else { &self.dst_env };
        let mut cmd = match self.wrap[i].split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(&self.exe);
                c
            }
            None => Command::new(&self.exe),
        };
        let child = cmd
            .arg("agent")
            .arg("--home")
            .arg(home.root())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(AgentError::io(&self.exe))?;
        let mut p = AgentProcess {
            child,
            log: log.clone(),
        };
        // Up: its control socket is there (`Ok`); or it exited (`Err`).
        let up = wait::eventually_blocking(
            Duration::from_secs(20),
            Duration::from_millis(20),
            || match p.child.try_wait() {
                Ok(Some(status)) => Some(Err(status)),
                _ => home.control_socket().exists().then_some(Ok(())),
            },
        );
        match up {
            Some(Ok(())) => {}
            Some(Err(status)) => {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(AgentError::Migration(format!(
                    "agent exited ({status}) at start:\n{text}"
                )));
            }
            None => {
                p.kill9();
                return Err(AgentError::Migration(
                    "agent did not start within 20 s".into(),
                ));
            }
        }
        self.procs[i] = Some(p);
        Ok(())
    }

    /// The last `n` lines of each agent's log, for error reports.
    pub fn log_tails(&self, n: usize) -> String {
        let mut out = String::new();
        for p in self.procs.iter().flatten() {
            let text = std::fs::read_to_string(&p.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out += &format!("--- {} (last {n} lines)\n", p.log.display());
            for l in &lines[lines.len().saturating_sub(n)..] {
                out += l;
                out.push('\n');
            }
        }
        out
    }

    /// Start both agents.
    pub fn start_both(&mut self) -> Result<(), AgentError> {
        self.start(1)?;
        self.start(0)
    }

    /// Sign an order for `vm` from source to destination.
    pub fn order(
        &self,
        vm: &str,
        limits: Limits,
        ttl_secs: u64,
    ) -> Result<SignedOrder, AgentError> {
        self.order_via(&self.dst_addr.clone(), vm, limits, ttl_secs)
    }

    /// Sign an order for `vm` the other way: from the destination back to the source (submit it
    /// with [`Pair::migrate_from`] and index 1).
    pub fn order_back(
        &self,
        vm: &str,
        limits: Limits,
        ttl_secs: u64,
    ) -> Result<SignedOrder, AgentError> {
        self.sign(
            (self.dst_id, self.src_id),
            &self.src_addr,
            vm,
            limits,
            ttl_secs,
        )
    }

    /// Sign an order whose destination address is `addr` (a proxy in front of it, say).
    pub fn order_via(
        &self,
        addr: &str,
        vm: &str,
        limits: Limits,
        ttl_secs: u64,
    ) -> Result<SignedOrder, AgentError> {
        self.sign((self.src_id, self.dst_id), addr, vm, limits, ttl_secs)
    }

    /// Sign an order from `from` to `to` (at `addr`) with the pair's operator key.
    fn sign(
        &self,
        (from, to): (AgentId, AgentId),
        addr: &str,
        vm: &str,
        limits: Limits,
        ttl_secs: u64,
    ) -> Result<SignedOrder, AgentError> {
        admin::sign_order(
            &self.operator_key,
            OrderArgs {
                vm: vm.into(),
                source: from,
                destination: to,
                destination_addr: addr.into(),
                limits,
                ttl_secs,
                strict_final_quote: self.strict_final_quote,
            },
        )
    }

    /// Stop agent `i` cleanly (SIGTERM).
    pub fn stop(&mut self, i: usize) {
        if let Some(mut p) = self.procs[i].take() {
            p.terminate();
        }
    }

    /// Submit `order` to the source agent; every reply goes to `on_reply`.
    pub async fn migrate(
        &self,
        order: &SignedOrder,
        on_reply: impl FnMut(Reply),
    ) -> Result<(), AgentError> {
        self.migrate_from(0, order, on_reply).await
    }

    /// Submit `order` to agent `i` (0: source, 1: destination); every reply goes to `on_reply`.
    pub async fn migrate_from(
        &self,
        i: usize,
        order: &SignedOrder,
        on_reply: impl FnMut(Reply),
    ) -> Result<(), AgentError> {
        let home = if i == 0 { &self.src } else { &self.dst };
        control::call(
            &home.control_socket(),
            &Request::Migrate {
                order: hex::encode(order.to_cbor()),
            },
            on_reply,
        )
        .await
    }

    /// Checksum and paused flag of `vm` on the agent of `home`.
    pub async fn checksum(home: &Home, vm: &str) -> Result<(String, bool), AgentError> {
        Self::vm_state(home, vm).await.map(|(c, p, _)| (c, p))
    }

    /// Whether the agent of `home` answers that `vm` does not run there (not merely that the
    /// agent could not be asked).
    pub async fn vm_absent(home: &Home, vm: &str) -> bool {
        matches!(Self::checksum(home, vm).await,
            Err(AgentError::Migration(e)) if e.contains("runs on this agent"))
    }

    /// A hosted VM's checksum, whether it is paused, and how many pages it wrote in its life.
    pub async fn vm_state(home: &Home, vm: &str) -> Result<(String, bool, u64), AgentError> {
        let mut out = Err(AgentError::Migration("no reply".into()));
        control::call(
            &home.control_socket(),
            &Request::VmChecksum { vm: vm.into() },
            |r| {
                out = match r {
                    Reply::Checksum {
                        checksum,
                        paused,
                        writes,
                    } => Ok((checksum, paused, writes)),
                    Reply::Error(e) => Err(AgentError::Migration(e)),
                    other => Err(AgentError::Migration(format!("unexpected reply {other:?}"))),
                }
            },
        )
        .await?;
        out
    }
}
