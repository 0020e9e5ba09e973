//! `trustmig`: the agent daemon and the operator's CLI.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use trustmig_agent::admin::{self, OrderArgs};
use trustmig_agent::audit::anchor::{self, Anchor as _};
use trustmig_agent::control::{self, Reply, Request};
use trustmig_agent::error::AgentError;
use trustmig_agent::home::Home;
use trustmig_agent::progress::{summary_text, Display};
use trustmig_protocol::order::Limits;

mod cli;
use cli::{AttestCmd, AuditCmd, Cli, Cmd, HomeArg, OperatorCmd, OrderCmd, QemuCmd, TrustCmd};

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

fn run(cli: Cli) -> Result<(), AgentError> {
    match cli.cmd {
        Cmd::Init { home, listen, tcti } => init(&Home::at(home.home), &listen, &tcti),
        Cmd::Operator(OperatorCmd::Keygen { out }) => {
            let public = trustmig_agent::identity::operator_keygen(&out)?;
            println!("{}", hex::encode(public));
            Ok(())
        }
        Cmd::Order(o) => order(o),
        Cmd::Trust(t) => trust(t),
        Cmd::Attest(a) => attest(a),
        Cmd::Audit(a) => audit(a),
        Cmd::Agent { home, log_format } => {
            init_logging(&log_format);
            runtime()?.block_on(trustmig_agent::daemon::run(Home::at(home.home)))
        }
        Cmd::Migrate { home, order, json } => migrate(&Home::at(home.home), &order, json),
        Cmd::Evacuate { home, orders } => evacuate(&Home::at(home.home), &orders),
        Cmd::Doctor { home, peers } => doctor(&Home::at(home.home), &peers),
        Cmd::Reload { home } => match ask(&Home::at(home.home), &Request::Reload)? {
            Reply::Reloaded(what) => say(&what),
            other => Err(refused(other)),
        },
        Cmd::Status { home, json } => match ask(&Home::at(home.home), &Request::Status)? {
            Reply::Status(v) if json => say(&v),
            Reply::Status(v) => {
                print!("{}", trustmig_agent::progress::status_text(&v));
                Ok(())
            }
            other => Err(refused(other)),
        },
        Cmd::Settle {
            home,
            order_id,
            resume_here,
            moved: _,
        } => {
            let req = Request::Settle {
                order_id,
                resume_here,
            };
            match ask(&Home::at(home.home), &req)? {
                Reply::Settled(what) => say(&what),
                other => Err(refused(other)),
            }
        }
        Cmd::Reconcile { home, vm } => {
            match ask(&Home::at(home.home), &Request::Reconcile { vm })? {
                Reply::Reconciled(what) => say(&what),
                other => Err(refused(other)),
            }
        }
        Cmd::Qemu(q) => qemu(q),
        Cmd::Bench {
            size_mib,
            rates,
            downtime_ms,
            rss_size_mib,
            concurrent,
            tpm_sign_ms,
        } => bench(
            size_mib,
            &rates,
            downtime_ms,
            rss_size_mib,
            (concurrent, tpm_sign_ms),
        ),
        Cmd::Demo {
            size_mib,
            dirty_pages_per_sec,
            downtime_ms,
            streams,
            json,
            keep,
        } => demo(
            size_mib,
            dirty_pages_per_sec,
            downtime_ms,
            streams,
            json,
            keep,
        ),
    }
}

/// `trustmig init`: a new home, its identity printed.
fn init(h: &Home, listen: &str, tcti: &str) -> Result<(), AgentError> {
    let id = admin::init(h, listen, tcti)?;
    println!("{}", hex::encode(id));
    eprintln!(
        "created {}: identity above; next: `trustmig trust add-peer`, `trustmig trust add-operator`, then enroll each other's AKs (`trustmig attest enroll-request` on each host, README)",
        h.root().display()
    );
    Ok(())
}

/// Print the agent's answer to a command, on stdout (scripts read it there).
fn say(what: &dyn std::fmt::Display) -> Result<(), AgentError> {
    println!("{what}");
    Ok(())
}

/// One request to the agent of `home` over its control socket; its one reply.
fn ask(home: &Home, req: &Request) -> Result<Reply, AgentError> {
    runtime()?.block_on(control::request(&home.control_socket(), req))
}

/// `trustmig demo`: one attested migration of a synthetic VM on this machine.
fn demo(
    size_mib: u64,
    dirty_pages_per_sec: u64,
    downtime_ms: u32,
    streams: u16,
    json: bool,
    keep: bool,
) -> Result<(), AgentError> {
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
    Ok(())
}

/// `trustmig bench`: downtime and bytes against the dirty rate, and peak memory.
fn bench(
    size_mib: u64,
    rates: &[u64],
    downtime_ms: u32,
    rss_size_mib: u64,
    (concurrent, tpm_sign_ms): (usize, u64),
) -> Result<(), AgentError> {
    if size_mib == 0 || rates.is_empty() || downtime_ms == 0 {
        return Err(AgentError::Usage(
            "--size-mib, --rates and --downtime-ms must be non-empty and > 0".into(),
        ));
    }
    // The table's agents run with the default configuration: it says how many go at once.
    let most = trustmig_agent::config::DEFAULT_MAX_CONCURRENT;
    if concurrent > most {
        return Err(AgentError::Usage(format!(
            "--concurrent: at most {most} (the agent's default max_concurrent_migrations)"
        )));
    }
    print!(
        "{}",
        trustmig_agent::bench::dirty_rate_table(size_mib, rates, downtime_ms)?
    );
    if rss_size_mib > 0 {
        println!();
        print!("{}", trustmig_agent::bench::peak_rss(rss_size_mib)?);
    }
    if concurrent > 0 {
        println!();
        print!(
            "{}",
            trustmig_agent::bench::concurrent_table(
                concurrent,
                size_mib,
                tpm_sign_ms,
                downtime_ms
            )?
        );
    }
    Ok(())
}

/// An answer the command did not ask for: the agent's refusal, or nothing useful.
/// `trustmig doctor`: every check, then what to fix; an error if any check failed.
fn doctor(home: &Home, peers: &[String]) -> Result<(), AgentError> {
    use trustmig_agent::doctor::Level;
    let peers = peers
        .iter()
        .map(|p| match p.split_once('=') {
            Some((n, a)) if !n.is_empty() && !a.is_empty() => Ok((n.to_string(), a.to_string())),
            _ => Err(AgentError::Usage(format!(
                "--peer {p:?}: expected NAME=HOST:PORT"
            ))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let checks = runtime()?.block_on(trustmig_agent::doctor::run(home, &peers));
    let mut failed = 0;
    for c in &checks {
        let tag = match c.level {
            Level::Ok => "ok  ",
            Level::Warn => "WARN",
            Level::Fail => {
                failed += 1;
                "FAIL"
            }
        };
        println!("[{tag}] {}", c.what);
        if !c.fix.is_empty() && c.level != Level::Ok {
            println!("       fix: {}", c.fix);
        }
    }
    if failed > 0 {
        return Err(AgentError::Usage(format!(
            "{failed} check(s) failed: a migration would fail on this host"
        )));
    }
    Ok(())
}

/// `trustmig evacuate`: every order in `dir` at once; a table of what became of each VM.
fn evacuate(home: &Home, dir: &std::path::Path) -> Result<(), AgentError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(AgentError::io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(AgentError::Usage(format!(
            "no order files in {}",
            dir.display()
        )));
    }
    let socket = home.control_socket();
    let results = runtime()?.block_on(async {
        let runs = files.iter().cloned().map(|f| {
            let socket = socket.clone();
            let unknown = AgentError::OutcomeUnknown(no_outcome(home));
            async move {
                let (bytes, order) = read_order(&f)?;
                let vm = order
                    .dangerous_unverified_body()
                    .map_or_else(|_| "?".to_string(), |b| b.vm);
                let mut outcome = Err(unknown);
                let req = Request::Migrate {
                    order: hex::encode(&bytes),
                };
                control::call(&socket, &req, |r| match r {
                    Reply::Progress(control::Progress::Done(s)) => {
                        outcome = Ok(format!(
                            "moved: downtime {} ms, total {} ms{}",
                            s.downtime_ms,
                            s.total_ms,
                            // An operator's stop went with it: it waits for `cont` there.
                            if s.handed_over_paused {
                                ", handed over paused"
                            } else {
                                ""
                            }
                        ))
                    }
                    Reply::Progress(control::Progress::Failed { error, vm }) => {
                        outcome = Err(AgentError::Reported(format!("{error}; VM: {vm}")))
                    }
                    Reply::Error(e) => outcome = Err(AgentError::Reported(e)),
                    _ => {}
                })
                .await?;
                Ok::<_, AgentError>((vm, outcome))
            }
        });
        futures_join_all(runs).await
    });
    let (mut failed, mut unknown) = (0, 0);
    println!("{:<24} {:<40} RESULT", "VM", "ORDER FILE");
    for (f, r) in files.iter().zip(results) {
        let (vm, what) = match r {
            Ok((vm, Ok(text))) => (vm, text),
            // Not a failure: the order may have committed (the agent settles it).
            Ok((vm, Err(AgentError::OutcomeUnknown(why)))) => {
                unknown += 1;
                (vm, format!("OUTCOME UNKNOWN: {why}"))
            }
            Ok((vm, Err(e))) => {
                failed += 1;
                (vm, format!("FAILED: {e}"))
            }
            Err(e) => {
                failed += 1;
                ("?".into(), format!("FAILED: {e}"))
            }
        };
        let name = f
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        println!("{vm:<24} {name:<40} {what}");
    }
    if failed + unknown > 0 {
        return Err(AgentError::Reported(format!(
            "of {} migrations, {failed} failed and {unknown} ended with their outcome unknown (`{}` shows where each VM is)",
            files.len(),
            home.command(&["status"])
        )));
    }
    Ok(())
}

/// Await every future, in order (tasks on the current runtime; no extra crate).
async fn futures_join_all<T: Send + 'static>(
    futs: impl Iterator<Item = impl std::future::Future<Output = T> + Send + 'static>,
) -> Vec<T> {
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("evacuation task panicked"));
    }
    out
}

fn refused(reply: Reply) -> AgentError {
    match reply {
        Reply::Error(e) => AgentError::Usage(format!("the agent refused: {e}")),
        other => AgentError::Migration(format!("unexpected answer from the agent: {other:?}")),
    }
}

fn order(o: OrderCmd) -> Result<(), AgentError> {
    match o {
        OrderCmd::Sign {
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
            strict_final_quote,
            out,
        } => {
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
                    strict_final_quote,
                },
            )?;
            trustmig_agent::home::write_atomic(&out, &order.to_cbor())?;
            eprint!("{}", admin::show_order(&order.to_cbor(), None)?);
        }
        OrderCmd::Revoke { home, file } => {
            let (bytes, _) = read_order(&file)?;
            let req = Request::Revoke {
                order: hex::encode(bytes),
            };
            match ask(&Home::at(home.home), &req)? {
                Reply::Revoked(what) => println!("{what}"),
                other => return Err(refused(other)),
            }
        }
        OrderCmd::Show { file, home } => {
            let (bytes, _) = read_order(&file)?;
            print!(
                "{}",
                admin::show_order(&bytes, home.map(Home::at).as_ref())?
            );
        }
    }
    Ok(())
}

fn audit(a: AuditCmd) -> Result<(), AgentError> {
    let (home, show, tpm) = match a {
        AuditCmd::Verify { home, no_tpm } => (home, None, !no_tpm),
        AuditCmd::Show { home, json } => (home, Some(json), false),
        AuditCmd::Anchor { home, reason } => return reanchor(&Home::at(home.home), &reason),
    };
    let home = Home::at(home.home);
    let dir = home.journal_dir();
    let trail = dir.join(trustmig_agent::audit::FILE);
    // The PCR before the trail: a running agent only appends, so the PCR read first folds to a
    // prefix of the trail read after it.
    let anchored = match tpm {
        true => Some(runtime()?.block_on(admin::audit_anchor_value(&home))?),
        false => None,
    };
    let v =
        trustmig_agent::audit::verify_with_journal(&dir).map_err(|e| AgentError::BadConfig {
            path: trail.clone(),
            reason: e,
        })?;
    match show {
        None => {
            println!(
                "audit trail verifies: {} entries, ends where the journal does, head {}",
                v.entries,
                hex::encode(v.head)
            );
            if let Some((pcr, value)) = anchored {
                println!(
                    "{}",
                    anchor::describe(&v.list, pcr, &value).map_err(|e| {
                        AgentError::BadConfig {
                            path: trail,
                            reason: format!("{e}; {}", anchor::ANCHOR_HOW),
                        }
                    })?
                );
            }
        }
        Some(json) => {
            for e in &v.list {
                if json {
                    println!("{}", serde_json::to_string(e).unwrap_or_default());
                } else {
                    // A trail whose chain verifies may still hold any text: never slice bytes.
                    let short = |s: &str| s.chars().take(16).collect::<String>();
                    let order = short(&e.order_id);
                    println!(
                        "{:>5} {} {:<15} {:<11} order {order:<16} vm {:<12} peer {:<16} {}",
                        e.seq,
                        e.at,
                        e.event,
                        e.role,
                        e.vm,
                        short(&e.peer),
                        e.reason
                    );
                }
            }
        }
    }
    Ok(())
}

/// `trustmig audit anchor`: only with the agent stopped (it owns the trail and the TPM).
fn reanchor(home: &Home, reason: &str) -> Result<(), AgentError> {
    // An agent that answers holds the trail and the TPM; only a failure to ask at all (no
    // runtime) must not pass for "stopped".
    let rt = runtime()?;
    if rt
        .block_on(control::request(&home.control_socket(), &Request::Status))
        .is_ok()
    {
        return Err(AgentError::Usage(
            "the agent is running: stop it first (it appends to the trail and holds the TPM)"
                .into(),
        ));
    }
    let mut a = trustmig_agent::attestation::OperatorAnchor::open(home)?;
    let seq = trustmig_agent::audit::Audit::reanchor(&home.journal_dir(), &mut a, reason)?;
    println!("audit trail re-anchored in PCR {} at entry {seq}", a.pcr());
    Ok(())
}

fn attest(a: AttestCmd) -> Result<(), AgentError> {
    let enrolled = |entry: trustmig_attest::policy::TrustedAk| {
        println!(
            "enrolled AK {} for agent {}",
            hex::encode(&entry.ak_name),
            hex::encode(entry.agent)
        );
    };
    match a {
        AttestCmd::Enroll {
            home,
            verifier_home,
            ek_ca,
        } => {
            let pem = trustmig_agent::home::read_text(&ek_ca)?;
            enrolled(admin::enroll(
                &Home::at(home),
                &Home::at(verifier_home),
                &pem,
            )?);
        }
        AttestCmd::EnrollRequest { home, out } => {
            let req = admin::enroll_request_file(&Home::at(home.home), &out)?;
            println!(
                "wrote {} for agent {}\nEK certificate SHA-256: {}\n(carry this to the verifier's host: `enroll-challenge --ek-sha256` checks the request is this TPM's)",
                out.display(),
                hex::encode(req.agent),
                admin::ek_fingerprint(&req)
            );
        }
        AttestCmd::EnrollChallenge {
            home,
            request,
            ek_ca,
            ek_sha256,
            ek_unchecked: _,
            out,
        } => {
            let req = admin::enroll_challenge_files(
                &Home::at(home.home),
                &request,
                &ek_ca,
                ek_sha256.as_deref(),
                &out,
            )?;
            let checked = if ek_sha256.is_some() {
                "as given"
            } else {
                "not checked (--ek-unchecked): compare it with what `enroll-request` printed on the agent's host"
            };
            println!(
                "wrote {} for agent {}\nEK certificate SHA-256: {} ({checked})",
                out.display(),
                hex::encode(req.agent),
                admin::ek_fingerprint(&req)
            );
        }
        AttestCmd::EnrollActivate {
            home,
            challenge,
            out,
        } => admin::enroll_activate_files(&Home::at(home.home), &challenge, &out)?,
        AttestCmd::EnrollFinish {
            home,
            response,
            agent,
        } => {
            let agent = admin::key_arg(&agent)?;
            enrolled(admin::enroll_finish_files(
                &Home::at(home.home),
                &response,
                &agent,
            )?);
        }
        AttestCmd::MeasureSelf => {
            println!(
                "{}",
                hex::encode(trustmig_agent::attestation::self_measurement()?)
            );
        }
    }
    Ok(())
}

/// The order file at `path`: its bytes, decoded (not verified). Garbage is refused here, with
/// the file named, before anything is asked of an agent.
fn read_order(
    path: &std::path::Path,
) -> Result<(Vec<u8>, trustmig_protocol::order::SignedOrder), AgentError> {
    let bytes = trustmig_agent::home::read_limited(path, trustmig_agent::home::MAX_MESSAGE_FILE)?;
    let order = trustmig_protocol::order::SignedOrder::from_cbor(&bytes).map_err(|e| {
        AgentError::BadConfig {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
    })?;
    Ok((bytes, order))
}

/// Submit the order in `file` to the local agent and show its progress.
fn migrate(home: &Home, file: &std::path::Path, json: bool) -> Result<(), AgentError> {
    let (bytes, _) = read_order(file)?;
    let mut display = Display::new(json);
    let req = Request::Migrate {
        order: hex::encode(&bytes),
    };
    runtime()?.block_on(control::call(&home.control_socket(), &req, |r| {
        display.show(r)
    }))?;
    if let Some(f) = display.failure {
        return Err(AgentError::Reported(f));
    }
    match display.summary {
        Some(s) if !json => eprint!("{}", summary_text(&s)),
        Some(_) => {}
        None => return Err(AgentError::OutcomeUnknown(no_outcome(home))),
    }
    Ok(())
}

/// What an operator is told when the agent ended a migration's connection without an outcome.
fn no_outcome(home: &Home) -> String {
    format!(
        "the agent closed the connection without a result (it stopped or restarted mid-migration?); the order may have committed: the agent settles it from its journal when it runs again, and `{}` shows where the VM is; do not start the VM by hand",
        home.command(&["status"])
    )
}

fn qemu(q: QemuCmd) -> Result<(), AgentError> {
    match q {
        QemuCmd::DestinationCommand(a) => {
            println!("{}", trustmig_qemu::cmdline::shell_line(&a.derive()?));
            Ok(())
        }
        QemuCmd::StartDestination(a) => {
            use std::os::unix::process::CommandExt;
            let args = a.derive()?;
            let shown = trustmig_qemu::cmdline::redacted(&args);
            eprintln!("starting: {}", trustmig_qemu::cmdline::shell_line(&shown));
            // Only returns if QEMU could not be started.
            let e = std::process::Command::new(&args[0]).args(&args[1..]).exec();
            Err(AgentError::Usage(format!("cannot start {}: {e}", args[0])))
        }
    }
}

/// The home `home` names, refused unless it is one (a mistyped `--home` would otherwise fail
/// on a file inside it, or list nothing).
fn checked(home: HomeArg) -> Result<Home, AgentError> {
    let h = Home::at(home.home);
    h.check()?;
    Ok(h)
}

fn trust(t: TrustCmd) -> Result<(), AgentError> {
    match t {
        TrustCmd::AddPeer { home, name, key } => {
            admin::add_peer(&checked(home)?, &name, admin::key_arg(&key)?)
        }
        TrustCmd::RemovePeer { home, name_or_key } => {
            admin::remove_key(&checked(home)?.peers(), &name_or_key)
        }
        TrustCmd::AddOperator { home, name, key } => {
            admin::add_operator(&checked(home)?, &name, admin::key_arg(&key)?)
        }
        TrustCmd::RemoveOperator { home, name_or_key } => {
            admin::remove_key(&checked(home)?.operators(), &name_or_key)
        }
        TrustCmd::RemoveAk { home, name_or_key } => {
            let n = admin::remove_ak(&checked(home)?, &name_or_key)?;
            println!(
                "{n} AK(s) of {name_or_key} removed; run `trustmig reload` for the running agent"
            );
            Ok(())
        }
        TrustCmd::AllowExe { home, digest } => {
            admin::allow_exe(&checked(home)?, admin::key_arg(&digest)?)
        }
        TrustCmd::List { home } => {
            let h = checked(home)?;
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
