//! The command line: what each `trustmig` command takes (clap definitions only; the work is
//! done by the library modules that own it, called from `main.rs`).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use trustmig_agent::error::AgentError;

#[derive(Parser)]
#[command(
    name = "trustmig",
    version,
    about = "Attested, signed, sealed live migration of VMs"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) cmd: Cmd,
}

#[derive(Args, Clone)]
pub(crate) struct HomeArg {
    /// Agent home directory (or set TRUSTMIG_HOME).
    #[arg(long, env = "TRUSTMIG_HOME")]
    pub(crate) home: PathBuf,
}

#[derive(Subcommand)]
pub(crate) enum Cmd {
    /// Create an agent home: identity key, certificate, config, trust store, journal.
    Init {
        #[command(flatten)]
        home: HomeArg,
        /// Address to listen on (peers dial the address an order names: `order sign
        /// --destination-addr`); 127.0.0.1 is reachable from this host only.
        #[arg(long, default_value = "127.0.0.1:7443")]
        listen: String,
        /// TPM TCTI (swtpm:host=H,port=P | device:/dev/tpmrm0 | tabrmd).
        #[arg(long, default_value = "device:/dev/tpmrm0")]
        tcti: String,
    },
    /// Operator keys.
    #[command(subcommand)]
    Operator(OperatorCmd),
    /// Signed migration orders.
    #[command(subcommand)]
    Order(OrderCmd),
    /// The trust store: peers, operators, allowed measurements.
    #[command(subcommand)]
    Trust(TrustCmd),
    /// Attestation: enrollment and measurements.
    #[command(subcommand)]
    Attest(AttestCmd),
    /// The audit trail: verify its hash chain and TPM anchor, list it, anchor it anew.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Run the agent daemon.
    Agent {
        #[command(flatten)]
        home: HomeArg,
        /// Log format: text or json (one JSON object per line).
        #[arg(long, default_value = "text", value_parser = ["text", "json"])]
        log_format: String,
    },
    /// Submit an order to the local (source) agent and follow the migration.
    Migrate {
        #[command(flatten)]
        home: HomeArg,
        /// The signed order file.
        #[arg(long)]
        order: PathBuf,
        /// One JSON object per line instead of a progress display.
        #[arg(long)]
        json: bool,
    },
    /// Submit every order in a directory to the local (source) agent at once (host evacuation).
    ///
    /// The agent runs `transfer.max_concurrent_migrations` of them at a time and
    /// queues the rest; prints a table of results. Fails if any migration failed.
    Evacuate {
        #[command(flatten)]
        home: HomeArg,
        /// Directory of signed order files (every regular file in it).
        #[arg(long)]
        orders: PathBuf,
    },
    /// Check this host for migrations, and print what to fix.
    ///
    /// Checks the binary (a test build with fault injection is named), home and key
    /// permissions, configuration, trust store and enrolled AKs, the agent, the TPM, each
    /// QEMU's QMP socket (and `qemu-img` where disks need it), the audit trail and its TPM
    /// anchor, the clock, and each peer given with --peer. Fails if anything would make a
    /// migration fail, or if the audit trail was tampered with.
    Doctor {
        #[command(flatten)]
        home: HomeArg,
        /// A peer to reach: NAME=HOST:PORT (NAME as in the trust store, or its hex key).
        #[arg(long = "peer", value_name = "NAME=HOST:PORT")]
        peers: Vec<String>,
    },
    /// Make the running agent read its configuration and attestation policy again.
    ///
    /// As SIGHUP does. A file that does not load is refused with its error and the old one
    /// kept; what takes effect only at the next start (listen, metrics_listen, tpm, ...) is
    /// named.
    Reload {
        #[command(flatten)]
        home: HomeArg,
    },
    /// Migrations in flight and recent ones, hosted VMs.
    Status {
        #[command(flatten)]
        home: HomeArg,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Settle by hand a migration left in doubt on this (source) agent.
    ///
    /// Its session was lost after COMMIT and the destination cannot be asked (say, its host
    /// is gone for good).
    /// Only for an operator who knows where the VM runs: a wrong answer makes two copies, or
    /// none. The agent keeps asking the destination by itself until then.
    #[command(group = clap::ArgGroup::new("where").required(true))]
    Settle {
        #[command(flatten)]
        home: HomeArg,
        /// The order id (hex), or a prefix of it that names one order in doubt (`trustmig
        /// status` lists the first 16 digits).
        order_id: String,
        /// The destination never ran the VM and never will: run it here again, as it was.
        /// Only when the destination's journal shows the order rolled back, or its host is gone
        /// for good: "not committed yet" is not enough while a `Commit` may still reach it (the
        /// model checker's trace, SPEC.md §8.9).
        #[arg(long, group = "where")]
        resume_here: bool,
        /// The destination runs the VM: keep no copy here. Only when the destination's journal
        /// shows the order committed: otherwise the VM may run nowhere.
        #[arg(long, group = "where")]
        moved: bool,
    },
    /// Bring a QEMU VM in line with this agent's journal again, as the agent's start does.
    ///
    /// For a VM whose reconciliation the start left to you (the log says so: QEMU unreachable, a
    /// `cont` refused, a copy to quit). Until then a copy that never committed here, or one
    /// committed here and not yet resumed, is not sent from here. See to QEMU first, as the
    /// refusal or the log says; this looks at QEMU again, does what the journal allows, and
    /// records it.
    Reconcile {
        #[command(flatten)]
        home: HomeArg,
        /// The VM's name (as in config.toml).
        vm: String,
    },
    /// QEMU sidecar helpers.
    #[command(subcommand)]
    Qemu(QemuCmd),
    /// Benchmarks with real agents on loopback: downtime/bytes vs dirty rate, peak memory.
    Bench {
        /// Guest size for the dirty-rate table, MiB.
        #[arg(long, default_value_t = 256)]
        size_mib: u64,
        /// Dirty rates to measure, pages per second.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "0,10000,25000,50000,100000,200000"
        )]
        rates: Vec<u64>,
        /// Downtime target, ms.
        #[arg(long, default_value_t = 300)]
        downtime_ms: u32,
        /// Guest size for the peak-memory figure, MiB (0 skips it).
        #[arg(long, default_value_t = 4096)]
        rss_size_mib: u64,
        /// Migrations at once for the concurrency table, with TPMs that sign in
        /// `--tpm-sign-ms` (0 skips it; at most the agent's default
        /// `max_concurrent_migrations`, 4).
        #[arg(long, default_value_t = trustmig_agent::config::DEFAULT_MAX_CONCURRENT)]
        concurrent: usize,
        /// How long the concurrency table's TPMs take to sign, ms (hardware: 100-600).
        #[arg(long, default_value_t = 200)]
        tpm_sign_ms: u64,
    },
    /// Run an attested live migration on this machine with embedded defaults.
    Demo {
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 512)]
        size_mib: u64,
        /// Pages the guest dirties per second while it runs.
        #[arg(long, default_value_t = 20_000)]
        dirty_pages_per_sec: u64,
        /// Downtime target, ms.
        #[arg(long, default_value_t = 100)]
        downtime_ms: u32,
        /// Data streams.
        #[arg(long, default_value_t = 2)]
        streams: u16,
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// Keep the temp dir with homes and agent logs.
        #[arg(long)]
        keep: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum QemuCmd {
    /// Print the destination QEMU command line for a VM, given the source's QEMU command line
    /// (after `--`): the same machine and devices, plus `-incoming defer -S` and a QMP socket.
    DestinationCommand(DestinationArgs),
    /// Start the destination QEMU with that command line (printed on stderr first): this
    /// process becomes QEMU, waiting for the agent's `migrate-incoming`.
    StartDestination(DestinationArgs),
}

#[derive(Args)]
pub(crate) struct DestinationArgs {
    /// QMP socket path for the destination QEMU (the agent's `qmp` for this VM).
    #[arg(long)]
    pub(crate) qmp: PathBuf,
    /// A disk image the agent transfers (the source's `[[vm.disk]] path`, as on the source
    /// command line): its -drive/-blockdev and -device are left out, since the destination
    /// agent hot-adds the verified copy. Repeat for several disks.
    #[arg(long = "transferred-disk", value_name = "PATH")]
    pub(crate) transferred: Vec<PathBuf>,
    /// The source QEMU command line, binary first.
    #[arg(last = true, required = true)]
    pub(crate) source: Vec<String>,
}

impl DestinationArgs {
    /// The derived command line; what was left out goes to stderr.
    pub(crate) fn derive(&self) -> Result<Vec<String>, AgentError> {
        let (bin, args) = self.source.split_first().ok_or_else(|| {
            AgentError::Usage("give the source QEMU command line after --".into())
        })?;
        let cmd =
            trustmig_qemu::cmdline::destination_command(bin, args, &self.qmp, &self.transferred)
                .map_err(|e| AgentError::Usage(e.to_string()))?;
        for d in &cmd.dropped {
            eprintln!("left out (a transferred disk, hot-added by the agent): {d}");
        }
        Ok(cmd.args)
    }
}

#[derive(Subcommand)]
pub(crate) enum OperatorCmd {
    /// Generate an operator signing key (secret at FILE, public beside it with the extension
    /// `.pub`: operator.key -> operator.pub).
    Keygen {
        /// Where to write the secret key.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
pub(crate) enum OrderCmd {
    /// Sign an order.
    Sign {
        /// Operator secret key file.
        #[arg(long)]
        key: PathBuf,
        /// VM name.
        #[arg(long)]
        vm: String,
        /// Source agent identity (hex, or a file holding it).
        #[arg(long)]
        source: String,
        /// Destination agent identity (hex, or a file holding it).
        #[arg(long)]
        destination: String,
        /// Destination address host:port.
        #[arg(long)]
        destination_addr: String,
        /// Downtime target, ms.
        #[arg(long, default_value_t = 300)]
        downtime_ms: u32,
        /// Bandwidth cap, bytes per second (0 = uncapped).
        #[arg(long, default_value_t = 0)]
        bandwidth: u64,
        /// Most pre-copy rounds.
        #[arg(long, default_value_t = 30)]
        max_rounds: u32,
        /// throttle, force or abort.
        #[arg(long, default_value = "throttle")]
        on_nonconvergence: String,
        /// Validity from now, seconds.
        #[arg(long, default_value_t = 600)]
        ttl: u64,
        /// Strict mode: the source's TPM quotes the final digest before Commit, inside the
        /// guest's downtime (a hardware TPM adds 100-600 ms), instead of after Resumed.
        #[arg(long)]
        strict_final_quote: bool,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Revoke an order this agent has not used: it can no longer start here (an order needs
    /// both its agents, so revoking it on either is enough). Asks the running agent.
    Revoke {
        #[command(flatten)]
        home: HomeArg,
        /// Order file.
        file: PathBuf,
    },
    /// Print an order; with --home, verify it against that agent's trust store.
    Show {
        /// Order file.
        file: PathBuf,
        /// Agent home to verify against.
        #[arg(long, env = "TRUSTMIG_HOME")]
        home: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub(crate) enum TrustCmd {
    /// Trust a peer agent identity.
    AddPeer {
        #[command(flatten)]
        home: HomeArg,
        /// A name for it.
        #[arg(long)]
        name: String,
        /// Identity (hex, or a file holding it).
        #[arg(long)]
        key: String,
    },
    /// Stop trusting a peer (by name or key).
    RemovePeer {
        #[command(flatten)]
        home: HomeArg,
        /// Name or hex key.
        name_or_key: String,
    },
    /// Trust an operator key for orders.
    AddOperator {
        #[command(flatten)]
        home: HomeArg,
        /// A name for it.
        #[arg(long)]
        name: String,
        /// Public key (hex, or the .pub file).
        #[arg(long)]
        key: String,
    },
    /// Stop trusting an operator (by name or key).
    RemoveOperator {
        #[command(flatten)]
        home: HomeArg,
        /// Name or hex key.
        name_or_key: String,
    },
    /// Stop trusting a peer's enrolled AK(s) (by peer name or hex identity): its attestation is
    /// refused from the agent's next reload (`trustmig reload`) or start.
    RemoveAk {
        #[command(flatten)]
        home: HomeArg,
        /// Peer name or hex identity.
        name_or_key: String,
    },
    /// Allow a peer agent executable (SHA-256, hex) in the attestation policy.
    AllowExe {
        #[command(flatten)]
        home: HomeArg,
        /// Digest (hex); see `trustmig attest measure-self`.
        digest: String,
    },
    /// Show the trust store.
    List {
        #[command(flatten)]
        home: HomeArg,
    },
}

#[derive(Subcommand)]
pub(crate) enum AuditCmd {
    /// Check the hash chain (and that it ends where the journal does); name the first entry
    /// that was edited, deleted, inserted or moved.
    Verify {
        #[command(flatten)]
        home: HomeArg,
        /// Check the chain alone, not its TPM anchor (a copy of a trail, away from its host).
        #[arg(long)]
        no_tpm: bool,
    },
    /// With the agent stopped, after a trail was found not to match its TPM anchor and the
    /// operator has looked into it: record a new anchor (and why) in the trail.
    Anchor {
        #[command(flatten)]
        home: HomeArg,
        /// Why (kept in the trail).
        #[arg(long)]
        reason: String,
    },
    /// List the trail (verified first).
    Show {
        #[command(flatten)]
        home: HomeArg,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum AttestCmd {
    /// Enroll an agent's AK into a verifier's policy (EK certificate + MakeCredential/ActivateCredential).
    Enroll {
        /// The agent whose AK is enrolled.
        #[arg(long)]
        home: PathBuf,
        /// The agent whose policy will trust it.
        #[arg(long)]
        verifier_home: PathBuf,
        /// PEM file of the CA(s) that issue EK certificates.
        #[arg(long)]
        ek_ca: PathBuf,
    },
    /// Enrollment across hosts, step 1 (on the agent's host): write the request.
    EnrollRequest {
        #[command(flatten)]
        home: HomeArg,
        /// Request file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Step 2 (on the verifier's host): check the EK certificate, write the challenge; the
    /// secret stays in the verifier's trust/pending/ (0600).
    #[command(group = clap::ArgGroup::new("ek_check").required(true))]
    EnrollChallenge {
        #[command(flatten)]
        home: HomeArg,
        /// The agent's request file.
        #[arg(long)]
        request: PathBuf,
        /// PEM file of the CA(s) that issue EK certificates.
        #[arg(long)]
        ek_ca: PathBuf,
        /// The EK certificate SHA-256 that `enroll-request` printed on the agent's host (hex,
        /// colons allowed): a request whose EK differs (one swapped on its way for another
        /// genuine TPM's) is refused.
        #[arg(long, value_name = "HEX", group = "ek_check")]
        ek_sha256: Option<String>,
        /// Enroll without that check: only when the request file cannot have been swapped on
        /// its way (it never left a channel you trust). The fingerprint is printed to compare.
        #[arg(long, group = "ek_check")]
        ek_unchecked: bool,
        /// Challenge file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Step 3 (on the agent's host): activate the credential in the TPM, write the response.
    EnrollActivate {
        #[command(flatten)]
        home: HomeArg,
        /// The verifier's challenge file.
        #[arg(long)]
        challenge: PathBuf,
        /// Response file to write (secret: mode 0600).
        #[arg(long)]
        out: PathBuf,
    },
    /// Step 4 (on the verifier's host): check the response and trust the AK.
    EnrollFinish {
        #[command(flatten)]
        home: HomeArg,
        /// The agent's response file.
        #[arg(long)]
        response: PathBuf,
        /// The agent identity being enrolled (hex, or a file holding it).
        #[arg(long)]
        agent: String,
    },
    /// Print the SHA-256 of this trustmig executable (what peers' policies allow).
    MeasureSelf,
}
