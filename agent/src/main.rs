//! `trustmig`: the agent daemon and the operator's CLI.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use trustmig_agent::admin::{self, OrderArgs};
use trustmig_agent::control::{self, Reply, Request};
use trustmig_agent::error::AgentError;
use trustmig_agent::home::Home;
use trustmig_agent::progress::{summary_text, Display};
use trustmig_attest::enroll::PendingEnrollment;
use trustmig_attest::{EnrollChallenge, EnrollRequest, EnrollResponse};
use trustmig_protocol::order::Limits;

#[derive(Parser)]
#[command(
    name = "trustmig",
    version,
    about = "Attested, signed, sealed live migration of VMs"
)]
struct Cli {
    /// Log format for the agent: text or json.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct HomeArg {
    /// Agent home directory (or set TRUSTMIG_HOME).
    #[arg(long, env = "TRUSTMIG_HOME")]
    home: PathBuf,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create an agent home: identity key, certificate, config, trust store, journal.
    Init {
        #[command(flatten)]
        home: HomeArg,
        /// Address peers will dial.
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
    /// Run the agent daemon.
    Agent {
        #[command(flatten)]
        home: HomeArg,
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
    /// Migrations in flight and recent ones, hosted VMs.
    Status {
        #[command(flatten)]
        home: HomeArg,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Settle by hand a migration left in doubt on this (source) agent: its session was lost
    /// after COMMIT and the destination cannot be asked (say, its host is gone for good).
    /// Only for an operator who knows where the VM runs: a wrong answer makes two copies, or
    /// none. The agent keeps asking the destination by itself until then.
    #[command(group = clap::ArgGroup::new("where").required(true))]
    Settle {
        #[command(flatten)]
        home: HomeArg,
        /// The order id (hex), or a prefix of it that names one order in doubt (`trustmig
        /// status` lists the first 16 digits).
        order_id: String,
        /// The destination never ran the VM: run it here again, as it was.
        #[arg(long, group = "where")]
        resume_here: bool,
        /// The destination runs the VM: keep no copy here.
        #[arg(long, group = "where")]
        moved: bool,
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
enum QemuCmd {
    /// Print the destination QEMU command line for a VM, given the source's QEMU command line
    /// (after `--`): the same machine and devices, plus `-incoming defer -S` and a QMP socket.
    DestinationCommand(DestinationArgs),
    /// Start the destination QEMU with that command line (printed on stderr first): this
    /// process becomes QEMU, waiting for the agent's `migrate-incoming`.
    StartDestination(DestinationArgs),
}

#[derive(Args)]
struct DestinationArgs {
    /// QMP socket path for the destination QEMU (the agent's `qmp` for this VM).
    #[arg(long)]
    qmp: PathBuf,
    /// A disk image the agent transfers (the source's `[[vm.disk]] path`, as on the source
    /// command line): its -drive/-blockdev and -device are left out, since the destination
    /// agent hot-adds the verified copy. Repeat for several disks.
    #[arg(long = "transferred-disk", value_name = "PATH")]
    transferred: Vec<PathBuf>,
    /// The source QEMU command line, binary first.
    #[arg(last = true, required = true)]
    source: Vec<String>,
}

impl DestinationArgs {
    /// The derived command line; what was left out goes to stderr.
    fn derive(&self) -> Result<Vec<String>, AgentError> {
        let (bin, args) = self.source.split_first().ok_or_else(|| {
            AgentError::Usage("give the source QEMU command line after --".into())
        })?;
        let cmd = trustmig_agent::qemu_cmdline::destination_command(
            bin,
            args,
            &self.qmp,
            &self.transferred,
        )
        .map_err(|e| AgentError::Usage(e.to_string()))?;
        for d in &cmd.dropped {
            eprintln!("left out (a transferred disk, hot-added by the agent): {d}");
        }
        Ok(cmd.args)
    }
}

#[derive(Subcommand)]
enum OperatorCmd {
    /// Generate an operator signing key (secret at FILE, public at FILE.pub).
    Keygen {
        /// Where to write the secret key.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum OrderCmd {
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
        /// Output file.
        #[arg(long)]
        out: PathBuf,
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
enum TrustCmd {
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
enum AttestCmd {
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
    EnrollChallenge {
        #[command(flatten)]
        home: HomeArg,
        /// The agent's request file.
        #[arg(long)]
        request: PathBuf,
        /// PEM file of the CA(s) that issue EK certificates.
        #[arg(long)]
        ek_ca: PathBuf,
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

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TRUSTMIG_LOG")
        .unwrap_or_else(|_| "info".into());
    use std::io::IsTerminal;
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, AgentError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| AgentError::Migration(format!("cannot start the async runtime: {e}")))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trustmig: {e}");
            ExitCode::FAILURE
        }
    }
}

fn read_file(p: &PathBuf) -> Result<Vec<u8>, AgentError> {
    std::fs::read(p).map_err(AgentError::io(p))
}

fn run(cli: Cli) -> Result<(), AgentError> {
    match cli.cmd {
        Cmd::Init { home, listen, tcti } => {
            let h = Home::at(home.home);
            let id = admin::init(&h, &listen, &tcti)?;
            println!("{}", hex::encode(id));
            eprintln!(
                "created {}: identity above; next: `trustmig trust add-peer`, `trustmig trust add-operator`, `trustmig attest enroll`",
                h.root().display()
            );
        }
        Cmd::Operator(OperatorCmd::Keygen { out }) => {
            let public = trustmig_agent::identity::operator_keygen(&out)?;
            println!("{}", hex::encode(public));
        }
        Cmd::Order(OrderCmd::Sign {
            key,
            vm,
            source,
            destination,
            destination_addr,
            downtime_ms,
            bandwidth,
            max_rounds,
            on_nonconvergence,
            ttl,
            out,
        }) => {
            if ttl == 0 || ttl > trustmig_protocol::order::MAX_ORDER_LIFETIME {
                return Err(AgentError::Usage(format!(
                    "--ttl {ttl} must be in 1..={}",
                    trustmig_protocol::order::MAX_ORDER_LIFETIME
                )));
            }
            let order = admin::sign_order(
                &key,
                OrderArgs {
                    vm,
                    source: admin::key_arg(&source)?,
                    destination: admin::key_arg(&destination)?,
                    destination_addr,
                    limits: Limits {
                        downtime_ms,
                        bandwidth_bps: bandwidth,
                        max_rounds,
                        on_nonconvergence: admin::parse_action(&on_nonconvergence)?,
                    },
                    ttl_secs: ttl,
                },
            )?;
            trustmig_agent::home::write_atomic(&out, &order.to_cbor())?;
            eprint!("{}", admin::show_order(&order.to_cbor(), None)?);
        }
        Cmd::Order(OrderCmd::Show { file, home }) => {
            let bytes = read_file(&file)?;
            print!(
                "{}",
                admin::show_order(&bytes, home.map(Home::at).as_ref())?
            );
        }
        Cmd::Trust(t) => trust(t)?,
        Cmd::Attest(AttestCmd::Enroll {
            home,
            verifier_home,
            ek_ca,
        }) => {
            let pem = std::fs::read_to_string(&ek_ca).map_err(AgentError::io(&ek_ca))?;
            let entry = admin::enroll(&Home::at(home), &Home::at(verifier_home), &pem)?;
            println!(
                "enrolled AK {} for agent {}",
                hex::encode(&entry.ak_name),
                hex::encode(entry.agent)
            );
        }
        Cmd::Attest(AttestCmd::EnrollRequest { home, out }) => {
            let req = admin::enroll_request(&Home::at(home.home))?;
            trustmig_agent::home::write_atomic(&out, &req.to_cbor())?;
        }
        Cmd::Attest(AttestCmd::EnrollChallenge {
            home,
            request,
            ek_ca,
            out,
        }) => {
            let h = Home::at(home.home);
            let req = EnrollRequest::from_cbor(&read_file(&request)?).map_err(|e| {
                AgentError::BadConfig {
                    path: request.clone(),
                    reason: e.to_string(),
                }
            })?;
            let pem = std::fs::read_to_string(&ek_ca).map_err(AgentError::io(&ek_ca))?;
            let (challenge, pending) = admin::enroll_challenge(&h, &req, &pem)?;
            let p = admin::pending_path(&h, &req.agent);
            if let Some(dir) = p.parent() {
                std::fs::create_dir_all(dir).map_err(AgentError::io(dir))?;
            }
            let _ = std::fs::remove_file(&p); // a newer challenge replaces an older one
            trustmig_agent::home::write_secret(&p, &pending.dangerous_to_cbor())?;
            trustmig_agent::home::write_atomic(&out, &challenge.to_cbor())?;
        }
        Cmd::Attest(AttestCmd::EnrollActivate {
            home,
            challenge,
            out,
        }) => {
            let ch = EnrollChallenge::from_cbor(&read_file(&challenge)?).map_err(|e| {
                AgentError::BadConfig {
                    path: challenge.clone(),
                    reason: e.to_string(),
                }
            })?;
            let resp = admin::enroll_activate(&Home::at(home.home), &ch)?;
            trustmig_agent::home::write_secret(&out, &resp.to_cbor())?;
        }
        Cmd::Attest(AttestCmd::EnrollFinish {
            home,
            response,
            agent,
        }) => {
            let h = Home::at(home.home);
            let agent = admin::key_arg(&agent)?;
            let p = admin::pending_path(&h, &agent);
            let pending_bytes = trustmig_agent::home::read_secret(&p)?;
            let pending = PendingEnrollment::from_cbor(&pending_bytes).map_err(|e| {
                AgentError::BadConfig {
                    path: p.clone(),
                    reason: e.to_string(),
                }
            })?;
            let resp = EnrollResponse::from_cbor(&read_file(&response)?).map_err(|e| {
                AgentError::BadConfig {
                    path: response.clone(),
                    reason: e.to_string(),
                }
            })?;
            // Single use: the pending secret goes whether or not the response was right.
            let _ = std::fs::remove_file(&p);
            let entry = admin::enroll_finish(&h, pending, &resp)?;
            println!(
                "enrolled AK {} for agent {}",
                hex::encode(&entry.ak_name),
                hex::encode(entry.agent)
            );
        }
        Cmd::Attest(AttestCmd::MeasureSelf) => {
            println!(
                "{}",
                hex::encode(trustmig_agent::attestation::self_measurement()?)
            );
        }
        Cmd::Agent { home } => {
            init_logging(&cli.log_format);
            runtime()?.block_on(trustmig_agent::daemon::run(Home::at(home.home)))?;
        }
        Cmd::Migrate { home, order, json } => {
            let h = Home::at(home.home);
            let bytes = read_file(&order)?;
            // Refuse obvious garbage here, with the file named, before bothering the agent.
            trustmig_protocol::order::SignedOrder::from_cbor(&bytes).map_err(|e| {
                AgentError::BadConfig {
                    path: order.clone(),
                    reason: e.to_string(),
                }
            })?;
            let mut display = Display::new(json);
            runtime()?.block_on(control::call(
                &h.control_socket(),
                &Request::Migrate {
                    order: hex::encode(&bytes),
                },
                |r| display.show(r),
            ))?;
            if let Some(f) = display.failure {
                return Err(AgentError::Migration(f));
            }
            match display.summary {
                Some(s) if !json => eprint!("{}", summary_text(&s)),
                Some(_) => {}
                None => {
                    return Err(AgentError::Migration(
                        "agent closed the connection without a result".into(),
                    ))
                }
            }
        }
        Cmd::Status { home, json } => {
            let h = Home::at(home.home);
            let mut out = None;
            runtime()?.block_on(control::call(&h.control_socket(), &Request::Status, |r| {
                out = Some(r)
            }))?;
            match out {
                Some(Reply::Status(v)) => {
                    if json {
                        println!("{v}");
                    } else {
                        print!("{}", trustmig_agent::progress::status_text(&v));
                    }
                }
                Some(Reply::Error(e)) => {
                    return Err(AgentError::Usage(format!("the agent refused: {e}")))
                }
                _ => return Err(AgentError::Migration("no status from agent".into())),
            }
        }
        Cmd::Settle {
            home,
            order_id,
            resume_here,
            moved: _,
        } => {
            let h = Home::at(home.home);
            let req = Request::Settle {
                order_id,
                resume_here,
            };
            let mut out = None;
            runtime()?.block_on(control::call(&h.control_socket(), &req, |r| out = Some(r)))?;
            match out {
                Some(Reply::Settled(what)) => println!("{what}"),
                Some(Reply::Error(e)) => {
                    return Err(AgentError::Usage(format!("the agent refused: {e}")))
                }
                _ => return Err(AgentError::Migration("no answer from the agent".into())),
            }
        }
        Cmd::Qemu(QemuCmd::DestinationCommand(a)) => {
            println!("{}", trustmig_agent::qemu_cmdline::shell_line(&a.derive()?));
        }
        Cmd::Qemu(QemuCmd::StartDestination(a)) => {
            use std::os::unix::process::CommandExt;
            let args = a.derive()?;
            let shown = trustmig_agent::qemu_cmdline::redacted(&args);
            eprintln!(
                "starting: {}",
                trustmig_agent::qemu_cmdline::shell_line(&shown)
            );
            // Only returns if QEMU could not be started.
            let e = std::process::Command::new(&args[0]).args(&args[1..]).exec();
            return Err(AgentError::Usage(format!("cannot start {}: {e}", args[0])));
        }
        Cmd::Bench {
            size_mib,
            rates,
            downtime_ms,
            rss_size_mib,
        } => {
            if size_mib == 0 || rates.is_empty() || downtime_ms == 0 {
                return Err(AgentError::Usage(
                    "--size-mib, --rates and --downtime-ms must be non-empty and > 0".into(),
                ));
            }
            print!(
                "{}",
                trustmig_agent::bench::dirty_rate_table(size_mib, &rates, downtime_ms)?
            );
            if rss_size_mib > 0 {
                println!();
                print!("{}", trustmig_agent::bench::peak_rss(rss_size_mib)?);
            }
        }
        Cmd::Demo {
            size_mib,
            dirty_pages_per_sec,
            downtime_ms,
            streams,
            json,
            keep,
        } => {
            if size_mib == 0 || !(1..=16).contains(&streams) || downtime_ms == 0 {
                return Err(AgentError::Usage(
                    "--size-mib and --downtime-ms must be > 0, --streams in 1..=16".into(),
                ));
            }
            let mut a = trustmig_agent::demo::DemoArgs {
                json,
                keep,
                streams,
                ..Default::default()
            };
            a.vm.size_mib = size_mib;
            a.vm.dirty_pages_per_sec = dirty_pages_per_sec;
            a.limits.downtime_ms = downtime_ms;
            let s = runtime()?.block_on(trustmig_agent::demo::run(a))?;
            if json {
                println!("{}", serde_json::to_string(&s).unwrap_or_default());
            }
        }
    }
    Ok(())
}

fn trust(t: TrustCmd) -> Result<(), AgentError> {
    match t {
        TrustCmd::AddPeer { home, name, key } => {
            admin::add_peer(&Home::at(home.home), &name, admin::key_arg(&key)?)
        }
        TrustCmd::RemovePeer { home, name_or_key } => {
            admin::remove_key(&Home::at(home.home).peers(), &name_or_key)
        }
        TrustCmd::AddOperator { home, name, key } => {
            admin::add_operator(&Home::at(home.home), &name, admin::key_arg(&key)?)
        }
        TrustCmd::RemoveOperator { home, name_or_key } => {
            admin::remove_key(&Home::at(home.home).operators(), &name_or_key)
        }
        TrustCmd::AllowExe { home, digest } => {
            admin::allow_exe(&Home::at(home.home), admin::key_arg(&digest)?)
        }
        TrustCmd::List { home } => {
            let h = Home::at(home.home);
            for (what, path) in [("peer", h.peers()), ("operator", h.operators())] {
                for e in trustmig_agent::trust::KeyList::load(&path)?.entries() {
                    println!("{what:9} {:20} {}", e.name, e.key);
                }
            }
            println!("policy    {}", h.policy().display());
            Ok(())
        }
    }
}
