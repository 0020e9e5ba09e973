//! System tests: two real agent processes, each with its own swtpm, on loopback; the
//! operator, the attacker and the network are played by the test. spec: SPEC.md §2 (every
//! defence is exercised by attacking it).
//!
//! Without swtpm these tests skip with a one-line reason, except in CI (env `CI`), where they fail.

use std::sync::Mutex;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use trustmig_agent::control::{Progress, Reply, Summary};
use trustmig_agent::harness::wait::{eventually_blocking, until_blocking};
use trustmig_agent::harness::{Pair, VmSpec};
use trustmig_agent::home::Home;
use trustmig_protocol::messages::Message;
use trustmig_protocol::order::{Limits, NonConvergence, OrderBody, SignedOrder, ORDER_VERSION};
use trustmig_protocol::AbortCode;
use trustmig_tests::metrics::{sample, scrape, scrape_until};
use trustmig_tests::peer::{raw_hello, raw_request};
use trustmig_tests::proxy::{Fault, Proxy};

/// Two agents and two swtpm per test on 2 cores: one test at a time keeps timings sane.
static SERIAL: Mutex<()> = Mutex::new(());

fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_trustmig")
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn swtpm_missing() -> bool {
    let ok = std::process::Command::new("swtpm")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "swtpm is required in CI (apt-get install swtpm swtpm-tools)"
        );
        eprintln!("skipped: swtpm not installed (apt-get install swtpm swtpm-tools)");
    }
    !ok
}

fn vm(name: &str, size_mib: u64, rate: u64) -> VmSpec {
    VmSpec {
        name: name.into(),
        size_mib,
        dirty_pages_per_sec: rate,
        hot_fraction: 0.05,
        fill_fraction: 0.5,
    }
}

fn limits(downtime_ms: u32, max_rounds: u32, on: NonConvergence) -> Limits {
    Limits {
        downtime_ms,
        bandwidth_bps: 0,
        max_rounds,
        on_nonconvergence: on,
    }
}

/// Outcome of one submitted order.
#[derive(Debug)]
enum Outcome {
    Done(Box<Summary>),
    Failed(String),
}

/// Run `trustmig ARGS --home HOME`: whether it succeeded, and its stdout and stderr.
fn cli(home: &Home, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(exe())
        .args(args)
        .arg("--home")
        .arg(home.root())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// `trustmig status --json` of the agent at `home`, if it answers.
fn status_json(rt: &tokio::runtime::Runtime, home: &Home) -> Option<serde_json::Value> {
    let mut st = None;
    let r = rt.block_on(trustmig_agent::control::call(
        &home.control_socket(),
        &trustmig_agent::control::Request::Status,
        |r| {
            if let Reply::Status(v) = r {
                st = Some(v);
            }
        },
    ));
    r.ok().and(st)
}

/// Send SIGHUP to process `pid`.
fn sighup(pid: u32) {
    let ok = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -HUP {pid}");
}

fn migrate(rt: &tokio::runtime::Runtime, pair: &Pair, order: &SignedOrder) -> Outcome {
    rt.block_on(migrate_async(pair, order))
}

async fn migrate_async(pair: &Pair, order: &SignedOrder) -> Outcome {
    migrate_from(pair, 0, order).await
}

/// Submit `order` to agent `i` (0: source, 1: destination) and wait for its outcome.
async fn migrate_from(pair: &Pair, i: usize, order: &SignedOrder) -> Outcome {
    let mut out = None;
    let r = pair
        .migrate_from(i, order, |reply| match reply {
            Reply::Progress(Progress::Done(s)) => out = Some(Outcome::Done(Box::new(s))),
            Reply::Progress(Progress::Failed { error, vm }) => {
                out = Some(Outcome::Failed(format!("{error}; VM: {vm}")))
            }
            Reply::Error(e) => out = Some(Outcome::Failed(e)),
            _ => {}
        })
        .await;
    match (r, out) {
        (_, Some(o)) => o,
        (Err(e), None) => Outcome::Failed(e.to_string()),
        (Ok(()), None) => Outcome::Failed("no result".into()),
    }
}

fn failed(o: Outcome) -> String {
    match o {
        Outcome::Failed(e) => e,
        Outcome::Done(s) => panic!("migration unexpectedly succeeded: {s:?}"),
    }
}

fn done(o: Outcome, pair: &Pair) -> Summary {
    match o {
        Outcome::Done(s) => *s,
        Outcome::Failed(e) => panic!("migration failed: {e}\n{}", pair.log_tails(15)),
    }
}

/// The VM runs on the source again and the destination has none of it; returns its checksum.
fn assert_rolled_back(rt: &tokio::runtime::Runtime, pair: &Pair, name: &str) -> String {
    let (sum, paused) = rt
        .block_on(Pair::checksum(&pair.src, name))
        .unwrap_or_else(|e| panic!("VM {name} gone from the source: {e}"));
    assert!(!paused, "source VM {name} runs again after rollback");
    assert!(
        rt.block_on(Pair::vm_absent(&pair.dst, name)),
        "destination discarded {name}"
    );
    sum
}

#[test]
fn migrates_at_several_dirty_rates_and_refuses_replayed_orders() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if swtpm_missing() {
        return;
    }
    let rt = rt();
    let vms = [
        vm("idle", 256, 0),
        vm("busy", 256, 5_000),
        vm("hot", 256, 40_000),
    ];
    let mut pair = Pair::create_with(exe().as_ref(), &vms, 2).unwrap();
    pair.start_both().unwrap();
    let mut first = None;
    for v in &vms {
        // A generous target: this checks the engine meets what it predicts, not machine speed.
        let order = pair
            .order(&v.name, limits(2000, 30, NonConvergence::Force), 600)
            .unwrap();
        let s = done(migrate(&rt, &pair, &order), &pair);
        let (dst_sum, dst_paused) = rt.block_on(Pair::checksum(&pair.dst, &v.name)).unwrap();
        assert_eq!(
            dst_sum, s.memory_checksum,
            "{}: destination memory equals source memory at pause",
            v.name
        );
        assert!(!dst_paused, "{}: destination VM runs", v.name);
        // The source's TPM quoted the final digest after Resumed and the destination
        // verified it (SPEC.md §8.7): said in the summary and in the destination's journal.
        assert!(
            s.final_quote.contains("no incident"),
            "{}: {}",
            v.name,
            s.final_quote
        );
        let journal = std::fs::read_to_string(pair.dst.journal_file()).unwrap();
        assert!(
            journal
                .lines()
                .any(|l| l.contains(&s.order_id) && l.contains("late final quote verified")),
            "{journal}"
        );
        assert!(
            rt.block_on(Pair::vm_absent(&pair.src, &v.name)),
            "{}: source no longer hosts it",
            v.name
        );
        if v.dirty_pages_per_sec <= 5_000 {
            assert!(s.converged, "{}: converged", v.name);
            assert!(
                s.downtime_ms <= s.downtime_target_ms,
                "{}: downtime {} ms > target",
                v.name,
                s.downtime_ms
            );
        }
        first.get_or_insert(order);
    }
    let used = first.unwrap();

    // The same order again: refused by the source's journal ...
    let e = failed(migrate(&rt, &pair, &used));
    assert!(e.contains("already used"), "{e}");
    // ... also after both agents restart (the journal is durable) ...
    pair.stop(0);
    pair.stop(1);
    pair.start_both().unwrap();
    // A restarted source does not bring back VMs that migrated away (never two copies).
    for v in &vms {
        assert!(
            rt.block_on(Pair::vm_absent(&pair.src, &v.name)),
            "{} runs on the source again after restart",
            v.name
        );
    }
    let e = failed(migrate(&rt, &pair, &used));
    assert!(e.contains("already used"), "{e}");
    // ... and by the destination's own journal, when a source replays its captured hello.
    let reply = rt
        .block_on(raw_hello(&pair.src, &pair.dst_addr, pair.dst_id, &used))
        .unwrap();
    match reply {
        Message::Abort { code, reason } => {
            assert_eq!(code, AbortCode::OrderRefused);
            assert!(reason.contains("already used"), "{reason}");
        }
        other => panic!("replayed hello accepted: {other:?}"),
    }
}

#[test]
fn refuses_forged_misdirected_and_expired_orders_and_rogue_peers() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if swtpm_missing() {
        return;
    }
    let rt = rt();
    let mut pair = Pair::create(exe().as_ref(), &vm("v", 64, 0), 1).unwrap();
    pair.start_both().unwrap();
    let good = pair
        .order("v", limits(300, 10, NonConvergence::Force), 600)
        .unwrap();
    let body = good.dangerous_unverified_body().unwrap();

    // Signed by a key nobody trusts.
    let rogue_op = SigningKey::from_bytes(&[9; 32]);
    let forged = SignedOrder::sign(&body, &rogue_op);
    let e = failed(migrate(&rt, &pair, &forged));
    assert!(e.contains("not trusted here"), "{e}");
    // A trusted operator key claimed, but the body altered after signing.
    let mut altered = good.clone();
    let mut b2 = body.clone();
    b2.limits.downtime_ms = 99_999;
    altered.body = trustmig_protocol::codec::encode(&b2);
    let e = failed(migrate(&rt, &pair, &altered));
    assert!(e.contains("signature does not verify"), "{e}");

    let op = trustmig_agent::identity::operator_load(&pair.operator_key).unwrap();
    let resign = |f: &dyn Fn(&mut OrderBody)| {
        let mut b = body.clone();
        b.order_id = trustmig_agent::random();
        f(&mut b);
        SignedOrder::sign(&b, &op)
    };
    // Expired.
    let now = trustmig_agent::unix_now();
    let expired = resign(&|b| {
        b.not_before = now - 4000;
        b.not_after = now - 3000;
    });
    let e = failed(migrate(&rt, &pair, &expired));
    assert!(e.contains("expired"), "{e}");
    // For another destination: untrusted here, refused before anything is dialled ...
    let elsewhere = resign(&|b| {
        b.v = ORDER_VERSION;
        b.destination = [0x77; 32];
    });
    let e = failed(migrate(&rt, &pair, &elsewhere));
    assert!(e.contains("is not a trusted peer here"), "{e}");
    // ... and once trusted, the source's TLS pin refuses the real destination at that address.
    trustmig_agent::admin::add_peer(&pair.src, "elsewhere", [0x77; 32]).unwrap();
    let elsewhere = resign(&|b| {
        b.v = ORDER_VERSION;
        b.destination = [0x77; 32];
    });
    let e = failed(migrate(&rt, &pair, &elsewhere));
    assert!(e.contains("is not the destination the order names"), "{e}");
    // Naming another agent as source: this agent is not the order's source.
    let wrong_role = resign(&|b| b.source = [0x55; 32]);
    let e = failed(migrate(&rt, &pair, &wrong_role));
    assert!(e.contains("this agent is"), "{e}");
    assert_rolled_back(&rt, &pair, "v");

    // A rogue agent (valid TLS key, not in the destination's trust store) is refused at TLS.
    let rogue = Home::at(pair.dir().join("rogue"));
    let rogue_key = trustmig_agent::admin::init(&rogue, "127.0.0.1:1", &pair.tcti(0)).unwrap();
    let fresh = resign(&|_| {});
    let r = rt.block_on(raw_hello(&rogue, &pair.dst_addr, pair.dst_id, &fresh));
    // The destination's TLS refuses the rogue's certificate with an alert (not, say, a
    // connection refused).
    assert!(
        r.as_ref()
            .is_err_and(|e| e.to_string().contains("received fatal alert")),
        "rogue peer got an answer: {r:?}"
    );
    // The genuine order still works afterwards: nothing above burnt it or broke the agents.
    let s = done(migrate(&rt, &pair, &fresh), &pair);
    assert_eq!(s.vm, "v");

    // SPEC.md §8.8: a settlement query is answered to the order's source only. The intruder
    // is a trusted peer of the destination, but not the order's source: no answer, and the
    // refusal does not name the source.
    let id = fresh.dangerous_unverified_body().unwrap().order_id;
    trustmig_agent::admin::add_peer(&pair.dst, "intruder", rogue_key).unwrap();
    let query = Message::SettleQuery { order_id: id };
    let intruded = std::time::Instant::now();
    match rt.block_on(raw_request(&rogue, &pair.dst_addr, pair.dst_id, &query)) {
        Ok(Message::Abort { reason, .. }) => {
            assert!(reason.contains("did not send it"), "{reason}");
            let source = trustmig_protocol::order::hex(&pair.src_id);
            assert!(!reason.contains(&source), "source disclosed: {reason}");
        }
        other => panic!("intruder answered: {other:?}"),
    }
    // The source itself is answered: the destination committed (it runs the VM).
    match rt.block_on(raw_request(&pair.src, &pair.dst_addr, pair.dst_id, &query)) {
        Ok(Message::SettleAnswer {
            order_id,
            committed,
        }) => assert!(order_id == id && committed),
        other => panic!("the source got no answer: {other:?}"),
    }

    // Fresh order ids cost a trusted peer nothing, and each answer is journalled for good: a
    // peer has a budget of queries about orders unknown here (SPEC.md §8.8), then errors and
    // nothing journalled; other peers keep theirs.
    use trustmig_agent::driver::peer_budget::BURST;
    for n in 0..=BURST {
        let query = Message::SettleQuery {
            order_id: trustmig_agent::random(),
        };
        match rt.block_on(raw_request(&rogue, &pair.dst_addr, pair.dst_id, &query)) {
            Ok(Message::SettleAnswer { committed, .. }) if n < BURST => assert!(!committed),
            Ok(Message::Abort { reason, .. }) if n == BURST => {
                assert!(reason.contains("too many settlement queries"), "{reason}")
            }
            other => panic!("query {n}: {other:?}"),
        }
    }
    let unknown = trustmig_agent::random();
    let query = Message::SettleQuery { order_id: unknown };
    match rt.block_on(raw_request(&pair.src, &pair.dst_addr, pair.dst_id, &query)) {
        Ok(Message::SettleAnswer { committed, .. }) => assert!(!committed),
        other => panic!("the source got no answer: {other:?}"),
    }
    let journal = std::fs::read_to_string(pair.dst.journal_file()).unwrap();
    assert_eq!(
        journal
            .lines()
            .filter(|l| l.contains("the source asked"))
            .count(),
        BURST as usize + 1,
        "the refused query journalled nothing"
    );
    // Each refused session of the intruder (the query about another's order, the query past
    // its budget, and more of those) is audited only within a budget of its own, so a peer
    // cannot grow the audit trail at will either (`peer_budget`).
    for n in 0..BURST {
        let query = Message::SettleQuery {
            order_id: trustmig_agent::random(),
        };
        match rt.block_on(raw_request(&rogue, &pair.dst_addr, pair.dst_id, &query)) {
            Ok(Message::Abort { reason, .. }) => {
                assert!(reason.contains("too many settlement queries"), "{reason}")
            }
            other => panic!("query {n} past the budget: {other:?}"),
        }
    }
    let trail = std::fs::read_to_string(pair.dst.journal_dir().join("audit.jsonl")).unwrap();
    let intruder = trustmig_protocol::order::hex(&rogue_key);
    let refused: Vec<&str> = trail
        .lines()
        .filter(|l| l.contains("\"order-refused\"") && l.contains(&intruder))
        .collect();
    // One more per minute since the intruder's first refusal (none on any but a crawling host).
    let refills =
        intruded.elapsed().as_secs() / trustmig_agent::driver::peer_budget::REFILL.as_secs();
    let most = BURST as usize + refills as usize;
    assert!(
        (BURST as usize..=most).contains(&refused.len()),
        "{} of at most {most}: {trail}",
        refused.len()
    );
    assert!(refused[0].contains("did not send it"), "{}", refused[0]);
    assert!(
        refused[1..]
            .iter()
            .all(|l| l.contains("too many settlement queries")),
        "{trail}"
    );
}

/// A flood of silent connections from one address takes at most its share of the listener
/// (daemon::admission): beyond it new connections are closed at once. The flood is held open,
/// half of it silent and half stalled after a TLS record's first byte (a slow loris): the agent
/// closes each within its 10 s for first bytes or for the TLS handshake. A migration from the
/// same address during the flood is refused with a reason that says so; once the flood is
/// closed, one goes through as before. A control request longer than the agent reads
/// is refused by name, and a second agent on the same home is refused.
#[test]
fn a_connection_flood_is_capped_and_leaves_no_trace() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if swtpm_missing() {
        return;
    }
    use std::io::Read;
    let rt = rt();
    let mut pair = Pair::create(exe().as_ref(), &vm("v", 16, 0), 1).unwrap();
    pair.start_both().unwrap();
    // A control client that stalls in its request line (answered below, after its wait).
    let stalled_at = std::time::Instant::now();
    let mut stalled = std::os::unix::net::UnixStream::connect(pair.dst.control_socket()).unwrap();
    std::io::Write::write_all(&mut stalled, b"{\"op\":").unwrap();
    // Without the wait's end the read below fails here, not hangs.
    stalled
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let addr: std::net::SocketAddr = pair.dst_addr.parse().unwrap();
    let connect = || std::net::TcpStream::connect(addr).expect("connect");
    use trustmig_agent::daemon::admission::MAX_PER_ADDRESS;
    let flood: Vec<_> = (0..MAX_PER_ADDRESS)
        .map(|i| {
            let mut c = connect();
            if i % 2 == 1 {
                use std::io::Write;
                c.write_all(&[0x16]).unwrap(); // a TLS handshake record begins, and stalls
            }
            c
        })
        .collect();
    let flooded = std::time::Instant::now();
    // Each is taken on in turn: the next finds the address's share used and is closed.
    let mut closed = false;
    for _ in 0..50 {
        let mut extra = connect();
        extra
            .set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .unwrap();
        if matches!(extra.read(&mut [0u8; 1]), Ok(0)) {
            closed = true;
            break;
        }
    }
    assert!(closed, "a connection beyond the cap was kept open");
    // A migration from the same address meanwhile is turned away as well: its source names
    // that (a handshake cut with no TLS alert) and its guest runs on.
    let order = pair
        .order("v", limits(300, 10, NonConvergence::Force), 600)
        .unwrap();
    let e = failed(migrate(&rt, &pair, &order));
    assert!(e.contains("turned the connection away unread"), "{e}");
    assert_rolled_back(&rt, &pair, "v");
    {
        use std::io::{BufRead, Write};
        let mut c = std::os::unix::net::UnixStream::connect(pair.dst.control_socket()).unwrap();
        // Written from a thread: the agent stops reading at its limit.
        let mut w = c.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let _ = w.write_all(&vec![b'x'; 2 << 20]);
        });
        let mut reply = String::new();
        std::io::BufReader::new(&mut c)
            .read_line(&mut reply)
            .unwrap();
        assert!(reply.contains("longer than 1048576 bytes"), "{reply}");
        drop(c);
        writer.join().unwrap();
        // The stalled client is answered, and let go, once its wait is over.
        let mut reply = String::new();
        std::io::BufReader::new(&mut stalled)
            .read_line(&mut reply)
            .unwrap();
        assert!(
            reply.contains("no whole request line within 10 s"),
            "{reply}"
        );
        assert!(stalled_at.elapsed() >= Duration::from_secs(10));
        assert_eq!(stalled.read(&mut [0u8; 1]).unwrap(), 0, "closed after");
        // A line that is not UTF-8 is answered so (it was dropped unanswered), and so is one
        // too long that the bound cuts inside a character.
        for (bytes, says) in [
            (b"{\"status\xff\"}\n".to_vec(), "not UTF-8 (at byte 8)"),
            (
                format!("a{}", "é".repeat(1 << 20)).into_bytes(),
                "longer than 1048576 bytes",
            ),
        ] {
            let mut c = std::os::unix::net::UnixStream::connect(pair.dst.control_socket()).unwrap();
            let mut w = c.try_clone().unwrap();
            let writer = std::thread::spawn(move || {
                let _ = w.write_all(&bytes);
            });
            let mut reply = String::new();
            std::io::BufReader::new(&mut c)
                .read_line(&mut reply)
                .unwrap();
            assert!(reply.contains(says), "{reply}");
            drop(c);
            writer.join().unwrap();
        }
    }
    // A second agent on the same home is refused by the journal's lock, before it touches
    // anything of the first (which goes on to migrate below).
    {
        let mut second = std::process::Command::new(exe())
            .args(["agent", "--home"])
            .arg(pair.dst.root())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let exited =
            eventually_blocking(Duration::from_secs(20), Duration::from_millis(50), || {
                second.try_wait().unwrap()
            });
        let Some(status) = exited else {
            second.kill().unwrap();
            panic!("a second agent on the same home kept running");
        };
        let mut err = String::new();
        second
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(!status.success());
        assert!(err.contains("another trustmig agent"), "{err}");
    }
    // The agent ends every stalled connection of the flood itself: 10 s each, 20 s allowed
    // (below the step timeout of 30 s, which would otherwise end them too).
    for (i, mut c) in flood.into_iter().enumerate() {
        let left = std::time::Duration::from_secs(20).saturating_sub(flooded.elapsed());
        c.set_read_timeout(Some(left.max(std::time::Duration::from_millis(1))))
            .unwrap();
        match c.read(&mut [0u8; 1]) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("stalled connection {i} was not closed by the agent: {other:?}"),
        }
    }
    let order = pair
        .order("v", limits(300, 10, NonConvergence::Force), 600)
        .unwrap();
    let s = done(migrate(&rt, &pair, &order), &pair);
    assert_eq!(s.vm, "v");
}

#[test]
fn a_peer_whose_measurement_is_not_allowed_fails_attestation() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if swtpm_missing() {
        return;
    }
    let rt = rt();
    let mut pair = Pair::create(exe().as_ref(), &vm("v", 64, 1000), 1).unwrap();
    // The destination allows only some other build of the agent.
    let policy = pair.dst.policy();
    let text = std::fs::read_to_string(&policy).unwrap();
    let exe_digest = hex::encode(trustmig_agent::attestation::file_sha256(exe().as_ref()).unwrap());
    assert!(text.contains(&exe_digest), "policy allows the agent build");
    std::fs::write(&policy, text.replace(&exe_digest, &"ab".repeat(32))).unwrap();
    pair.start_both().unwrap();
    let order = pair
        .order("v", limits(300, 10, NonConvergence::Force), 600)
        .unwrap();
    let e = failed(migrate(&rt, &pair, &order));
    assert!(e.contains("attestation"), "{e}");
    assert!(e.contains("rolled back"), "{e}");
    assert_rolled_back(&rt, &pair, "v");
}

#[test]
fn tampered_replayed_dropped_reordered_or_cut_data_streams_roll_back() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if swtpm_missing() {
        return;
    }
    let rt = rt();
    // An idle guest, so that "memory intact" can be checked byte for byte after each attack.
    let mut pair = Pair::create(exe().as_ref(), &vm("v", 64, 0), 2).unwrap();
    pair.start_both().unwrap();
    let (before, _) = rt.block_on(Pair::checksum(&pair.src, "v")).unwrap();
    for fault in [
        Fault::FlipBit(5),
        Fault::Replay(5),
        Fault::Drop(5),
        Fault::Reorder(5),
        Fault::CutAfter(8 << 20),
    ] {
        let proxy = rt
            .block_on(Proxy::start(pair.dst_addr.clone(), fault))
            .unwrap();
        let order = pair
            .order_via(
                &proxy.addr,
                "v",
                limits(300, 10, NonConvergence::Force),
                600,
            )
            .unwrap();
        let e = failed(migrate(&rt, &pair, &order));
        assert!(
            proxy.fired.load(std::sync::atomic::Ordering::SeqCst),
            "{fault:?} applied"
        );
        assert!(e.contains("rolled back"), "{fault:?}: {e}");
        let why: &[&str] = match fault {
            Fault::FlipBit(_) => &["tampered"],
            Fault::Replay(_) => &["replayed or reordered"],
            // A later record arriving first is a gap at the moment it is seen.
            Fault::Drop(_) | Fault::Reorder(_) => &["records dropped"],
            // Nothing to open: a link just ends, the data stream (read or written first, by
            // timing) or, should its next message come first, the control channel the proxy
            // cuts with it.
            Fault::CutAfter(_) => &["data stream", "control channel"],
            other => panic!("no expectation for {other:?}"),
        };
        assert!(
            why.iter().any(|w| e.contains(w)),
            "{fault:?}: the report names the attack: {e}"
        );
        if !matches!(fault, Fault::CutAfter(_)) {
            assert!(
                e.contains("RecordFailure"),
                "{fault:?}: typed abort code: {e}"
            );
        }
        assert_eq!(
            assert_rolled_back(&rt, &pair, "v"),
            before,
            "{fault:?}: source memory intact"
        );
    }
    // After the attacks, and with a squatter holding a stalled connection with stream 0's preamble does not hold up the
    // genuine stream: the migration completes (well within the destination's step timeout,
    // which would have expired first were candidates checked one after another).
    let proxy = rt
        .block_on(Proxy::start(pair.dst_addr.clone(), Fault::Squat))
        .unwrap();
    let order = pair
        .order_via(
            &proxy.addr,
            "v",
            limits(300, 10, NonConvergence::Force),
            600,
        )
        .unwrap();
    let r = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(25), async {
            migrate_async(&pair, &order).await
        })
        .await
    });
    assert!(
        proxy.fired.load(std::sync::atomic::Ordering::SeqCst),
        "squatter connected"
    );
    match r {
        Ok(Outcome::Done(_)) => {}
        other => panic!(
            "squatted migration did not complete: {other:?}\n{}",
            pair.log_tails(10)
        ),
    }
    let (dst_sum, _) = rt.block_on(Pair::checksum(&pair.dst, "v")).unwrap();
    assert_eq!(
        dst_sum, before,
        "after all the failed attempts, the intact VM arrived"
    );
}

#[test]
fn destination_killed_mid_round_leaves_the_source_running() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if swtpm_missing() {
        return;
    }
    let rt = rt();
    let mut pair = Pair::create(exe().as_ref(), &vm("v", 128, 0), 2).unwrap();
    pair.start_both().unwrap();
    let (before, _) = rt.block_on(Pair::checksum(&pair.src, "v")).unwrap();
    // A bandwidth cap keeps round 0 going for several seconds.
    let mut l = limits(300, 10, NonConvergence::Force);
    l.bandwidth_bps = 10 << 20;
    let order = pair.order("v", l, 600).unwrap();
    let dst_pid = pair.procs[1].as_ref().unwrap().pid();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        let _ = std::process::Command::new("kill")
            .arg("-KILL")
            .arg(dst_pid.to_string())
            .status();
    });
    let e = failed(migrate(&rt, &pair, &order));
    killer.join().unwrap();
    assert!(e.contains("rolled back"), "{e}");
    let (after, paused) = rt.block_on(Pair::checksum(&pair.src, "v")).unwrap();
    assert!(!paused, "source VM runs");
    assert_eq!(after, before, "source memory intact");
    // The destination restarts, settles its journal and accepts a new order.
    pair.procs[1] = None;
    pair.start(1).unwrap();
    let order = pair
        .order("v", limits(300, 10, NonConvergence::Force), 600)
        .unwrap();
    done(migrate(&rt, &pair, &order), &pair);
}

/// Both agents up with a 64 MiB VM `v` dirtying `rate` pages/s on the source, whose agent runs
/// with the fault-injection variables `env` set (None without swtpm).
fn hooked_source(env: &[(&str, &str)], rate: u64) -> Option<(tokio::runtime::Runtime, Pair)> {
    if swtpm_missing() {
        return None;
    }
    let mut pair = Pair::create(exe().as_ref(), &vm("v", 64, rate), 2).unwrap();
    pair.src_env = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    pair.start_both().unwrap();
    Some((rt(), pair))
}

/// A migration of a writing 64 MiB guest whose source loses the session right after COMMIT
/// and whose first `unanswered` settlement queries go unanswered: it fails in doubt. Returns
/// the agents, the order's id (hex) and how many pages the guest had written before (a guest
/// kept as it was has written more since; one created anew has not).
fn lost_in_doubt(unanswered: &str) -> Option<(tokio::runtime::Runtime, Pair, String, u64)> {
    let hooks = [
        (trustmig_agent::fault::LOSE_COMMIT_ENV, "1"),
        (trustmig_agent::fault::SETTLE_UNANSWERED_ENV, unanswered),
    ];
    let (rt, pair) = hooked_source(&hooks, 20_000)?;
    let (_, _, writes_before) = rt.block_on(Pair::vm_state(&pair.src, "v")).unwrap();
    let order = pair
        .order("v", limits(300, 10, NonConvergence::Force), 600)
        .unwrap();
    let id = trustmig_protocol::order::hex(&order.dangerous_unverified_body().unwrap().order_id);
    let e = failed(migrate(&rt, &pair, &order));
    // ... and names the command that settles it by hand, as it is to be typed.
    let settle = pair.src.command(&["settle", &id]);
    assert!(
        e.contains("in doubt")
            && e.contains("asks the destination again")
            && e.contains(&format!("`{settle}` with `--moved` or `--resume-here`")),
        "{e}\n{}",
        pair.log_tails(10)
    );
    Some((rt, pair, id, writes_before))
}

/// SPEC.md §8.8 rule 3: a source that journalled COMMIT but never saw `Resumed` asks the
/// destination. If the destination never committed (the session was lost before `Commit`
/// left), the VM runs on the source again, memory untouched; if it did (it failed before
/// `Resumed`), the VM is the destination's and the source keeps none.
#[test]
fn commit_without_resumed_is_settled_by_asking_the_destination() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((rt, mut pair)) = hooked_source(&[(trustmig_agent::fault::LOSE_COMMIT_ENV, "1")], 0)
    else {
        return;
    };
    let (before, _) = rt.block_on(Pair::checksum(&pair.src, "v")).unwrap();
    let order = pair
        .order("v", limits(300, 10, NonConvergence::Force), 600)
        .unwrap();
    let e = failed(migrate(&rt, &pair, &order));
    assert!(
        e.contains("settled: the destination never committed")
            && e.contains("keeps running on the source"),
        "{e}\n{}",
        pair.log_tails(10)
    );
    assert_eq!(
        assert_rolled_back(&rt, &pair, "v"),
        before,
        "memory untouched"
    );

    // Lost `Resumed`: the destination committed and runs the VM; the source lets it go.
    pair.stop(0);
    pair.stop(1);
    pair.src_env.clear();
    pair.dst_env = vec![(trustmig_agent::fault::LOSE_RESUMED_ENV.into(), "1".into())];
    pair.start_both().unwrap();
    let order = pair
        .order("v", limits(300, 10, NonConvergence::Force), 600)
        .unwrap();
    let e = failed(migrate(&rt, &pair, &order));
    assert!(
        e.contains("moved: the destination confirmed it committed"),
        "{e}\n{}",
        pair.log_tails(10)
    );
    let (_, paused) = rt
        .block_on(Pair::checksum(&pair.dst, "v"))
        .unwrap_or_else(|e| panic!("the destination runs the VM: {e}"));
    assert!(!paused, "the destination's VM runs");
    assert!(
        rt.block_on(Pair::vm_absent(&pair.src, "v")),
        "the source keeps no copy"
    );
    // DONE at the destination all the same, saying Resumed was not sent: left at COMMIT, a
    // restart's Resume would run the guest again were its operator to stop it meanwhile. A
    // restart finds nothing to settle.
    let id = hex::encode(order.dangerous_unverified_body().unwrap().order_id);
    let last = |pair: &Pair| last_record(&pair.dst, &id);
    let (count, record) = last(&pair);
    assert_eq!(record["state"], "done", "{record}");
    assert!(
        record["note"]
            .as_str()
            .is_some_and(|n| n.contains("Resumed not sent")),
        "{record}"
    );
    pair.stop(1);
    pair.dst_env.clear();
    pair.start(1).unwrap();
    assert_eq!(last(&pair), (count, record), "a restart settles nothing");
}

/// How many journal records the agent at `home` holds of order `id` (hex), and the last.
fn last_record(home: &Home, id: &str) -> (usize, serde_json::Value) {
    let journal = std::fs::read_to_string(home.journal_file()).unwrap();
    let records: Vec<serde_json::Value> = journal
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|r: &serde_json::Value| r["order_id"] == id)
        .collect();
    (records.len(), records.last().cloned().unwrap())
}

/// SPEC.md §8.8: a destination whose DONE record fails (cleanly: a full disk) after its VM
/// runs writes it again in the background until it lands. Left at COMMIT, the VM could not be
/// sent on from there and a restart would resume it again.
#[test]
fn a_done_record_that_failed_is_written_again() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if swtpm_missing() {
        return;
    }
    let mut pair = Pair::create(exe().as_ref(), &vm("v", 64, 0), 2).unwrap();
    pair.dst_env = vec![(
        trustmig_agent::fault::JOURNAL_FAILS_ENV.into(),
        "destination:done:3".into(),
    )];
    pair.start_both().unwrap();
    let rt = rt();
    let order = pair
        .order("v", limits(300, 10, NonConvergence::Force), 600)
        .unwrap();
    done(migrate(&rt, &pair, &order), &pair);
    let id = hex::encode(order.dangerous_unverified_body().unwrap().order_id);
    // The session's try and two more fail; the fourth, 1.75 s later, lands.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    // DONE, with the late final quote's verdict (journalled at COMMIT meanwhile, or after).
    let record = loop {
        let (_, record) = last_record(&pair.dst, &id);
        let quoted = record["note"]
            .as_str()
            .is_some_and(|n| n.contains("late final quote verified"));
        if (record["state"] == "done" && quoted) || std::time::Instant::now() > deadline {
            break record;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(record["state"], "done", "{record}\n{}", pair.log_tails(10));
    assert!(
        record["note"]
            .as_str()
            .is_some_and(|n| n.starts_with("resumed here")),
        "{record}"
    );
    // By the retries (the fourth write), not the session's own.
    let log = std::fs::read_to_string(&pair.procs[1].as_ref().unwrap().log).unwrap();
    assert!(
        log.contains("DONE journalled") && log.contains("tries=4"),
        "{}",
        pair.log_tails(20)
    );
    let (_, paused) = rt.block_on(Pair::checksum(&pair.dst, "v")).unwrap();
    assert!(!paused, "the destination's VM runs");
    // The session succeeded all the same: no incident reached the source (the destination
    // still checked the late final quote).
    let (_, record) = last_record(&pair.src, &id);
    let note = record["note"].as_str().unwrap_or_default();
    assert!(
        record["state"] == "done" && !note.contains("INCIDENT"),
        "{record}"
    );
    assert!(
        log.contains("late final quote verified"),
        "{}",
        pair.log_tails(20)
    );
}

/// SPEC.md §8.7: a synthetic destination cannot keep a guest paused for an operator's `cont`,
/// so a `switch-over` that hands one over paused is refused before COMMIT, named, and the
/// source's guest runs on with its memory as it was.
#[test]
fn a_paused_hand_over_a_synthetic_destination_cannot_keep_is_refused() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    rolls_back_under(
        (trustmig_agent::fault::HAND_OVER_PAUSED_ENV, "1"),
        "cannot keep paused",
    );
}

/// A rollback the source's journal cannot record (a full disk): the VM runs again, but the
/// journal still shows the order under way, so it is not sent until a restart settles the
/// order from the file; `status`, `doctor` and the refusal of the next order say so.
#[test]
fn a_rollback_the_journal_cannot_record_is_left_to_the_operator() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let fails = (
        trustmig_agent::fault::JOURNAL_FAILS_ENV,
        "source:rolled-back:1",
    );
    let Some((rt, mut pair)) = hooked_source(
        &[(trustmig_agent::fault::HAND_OVER_PAUSED_ENV, "1"), fails],
        0,
    ) else {
        return;
    };
    let (before, _) = rt.block_on(Pair::checksum(&pair.src, "v")).unwrap();
    let l = || limits(300, 10, NonConvergence::Force);
    let order = pair.order("v", l(), 600).unwrap();
    let e = failed(migrate(&rt, &pair, &order));
    assert!(e.contains("cannot keep paused"), "{e}");
    assert_eq!(assert_rolled_back(&rt, &pair, "v"), before);
    let left = "left to the operator: the outcome of order";
    let (_, text) = cli(&pair.src, &["status"]);
    assert!(text.contains(left), "{text}");
    let (_, text) = cli(&pair.src, &["doctor"]);
    assert!(text.contains(&format!("[WARN] VM v: {left}")), "{text}");
    let e = failed(migrate(&rt, &pair, &pair.order("v", l(), 600).unwrap()));
    assert!(
        e.contains(&format!("VM v is {left}")) && e.contains("restart the agent"),
        "{e}"
    );
    // Restarted as the message says, without the faults: settled, and the VM goes.
    pair.stop(0);
    pair.src_env.clear();
    pair.start(0).unwrap();
    let (_, text) = cli(&pair.src, &["status"]);
    assert!(!text.contains("left to the operator"), "{text}");
    done(
        migrate(&rt, &pair, &pair.order("v", l(), 600).unwrap()),
        &pair,
    );
}

/// A migration of an idle 64 MiB guest whose source runs with the fault `hook` fails with an
/// error that says `named`, and rolls back: the source's guest runs on with its memory as it
/// was, the destination keeps nothing. Returns the agents for further checks.
fn rolls_back_under(hook: (&str, &str), named: &str) -> Option<(tokio::runtime::Runtime, Pair)> {
    let (rt, pair) = hooked_source(&[hook], 0)?;
    let (before, _) = rt.block_on(Pair::checksum(&pair.src, "v")).unwrap();
    let order = pair
        .order("v", limits(300, 10, NonConvergence::Force), 600)
        .unwrap();
    let e = failed(migrate(&rt, &pair, &order));
    assert!(e.contains(named), "{e}\n{}", pair.log_tails(10));
    assert_eq!(
        assert_rolled_back(&rt, &pair, "v"),
        before,
        "memory untouched"
    );
    Some((rt, pair))
}

/// SPEC.md §8.8: once a destination answered "not committed", a `Commit` that arrives after
/// all (here: the source asks first, then sends it on its old session) is refused; the
/// destination never resumes the VM and the source, asking again, runs it with its memory as
/// it was.
#[test]
fn a_commit_after_a_not_committed_answer_is_refused() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((_rt, pair)) = rolls_back_under(
        (trustmig_agent::fault::SETTLE_BEFORE_COMMIT_ENV, "1"),
        "settled: the destination never committed",
    ) else {
        return;
    };
    assert!(
        pair.log_tails(40).contains("refusing to commit"),
        "{}",
        pair.log_tails(15)
    );
}

/// SPEC.md §8.8, operator override: the destination never answers (its host is gone, say);
/// the operator, who knows where the VM runs, settles the order by hand with `trustmig settle`:
/// `--resume-here` runs the VM here again as it was; `--moved` lets it go. Either way the
/// order is no longer in doubt and cannot be settled twice.
#[test]
fn the_operator_settles_an_order_the_destination_never_answers() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for resume in [true, false] {
        let Some((rt, pair, id, writes_before)) = lost_in_doubt("1000000") else {
            return;
        };
        let cli = |args: &[&str]| cli(&pair.src, args);
        let (ok, status) = cli(&["status"]);
        assert!(
            ok && status.contains("in doubt") && status.contains(&id[..16]),
            "{status}"
        );
        // `doctor` does not call the host healthy meanwhile.
        let (_, text) = cli(&["doctor"]);
        assert!(
            text.contains("[WARN] VM v: stopped, in doubt after a migration"),
            "{text}"
        );
        let (ok, text) = cli(&["settle", "zz", "--moved"]);
        assert!(!ok && text.contains("is not hex"), "{text}");
        let (ok, text) = cli(&["settle", "0000000000", "--moved"]);
        assert!(
            !ok && text.contains("no order in doubt here matches"),
            "{text}"
        );
        // The first 16 digits, as `status` lists them, name it.
        let decision = if resume { "--resume-here" } else { "--moved" };
        let (ok, text) = cli(&["settle", &id[..16], decision]);
        assert!(ok && text.contains("settled by the operator"), "{text}");
        let here = rt.block_on(Pair::vm_state(&pair.src, "v"));
        if resume {
            let (_, paused, writes_after) = here.unwrap();
            assert!(!paused, "the VM runs here again");
            assert!(
                writes_after > writes_before,
                "as it was when the session was lost"
            );
        } else {
            assert!(here.is_err(), "the source keeps no copy");
            let (_, status) = cli(&["status"]);
            assert!(!status.contains("in doubt"), "{status}");
        }
        let (ok, text) = cli(&["settle", &id, "--resume-here"]);
        assert!(
            !ok && text.contains("no order in doubt here matches"),
            "settled once: {text}"
        );
        let journal = std::fs::read_to_string(pair.src.journal_file()).unwrap();
        let note = if resume {
            "settled by the operator: the destination never ran the VM"
        } else {
            "settled by the operator: the destination owns the VM"
        };
        assert!(journal.contains(note), "{journal}");
    }
}

/// Poll `home`'s agent until it runs `vm`; its checksum and whether it is paused.
fn wait_for_vm(
    rt: &tokio::runtime::Runtime,
    pair: &Pair,
    home: &trustmig_agent::home::Home,
    vm: &str,
) -> (String, bool) {
    let back = eventually_blocking(Duration::from_secs(20), Duration::from_millis(100), || {
        rt.block_on(Pair::checksum(home, vm)).ok()
    });
    back.unwrap_or_else(|| {
        let e = match rt.block_on(Pair::checksum(home, vm)) {
            Err(e) => e.to_string(),
            Ok(_) => "(it came back just after the deadline)".into(),
        };
        panic!("{vm} never came back: {e}\n{}", pair.log_tails(15))
    })
}

/// SPEC.md §8.8 rule 3 when the destination does not answer at once: the source keeps the VM
/// stopped, exactly as it was, asks again (with back-off) while it stays up, and resumes it
/// untouched once the destination says it never committed.
#[test]
fn an_unanswered_settlement_is_asked_again_until_answered() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // The query right after the lost session and the first retry go unanswered.
    let Some((rt, pair, _, writes_before)) = lost_in_doubt("2") else {
        return;
    };
    assert!(
        rt.block_on(Pair::vm_absent(&pair.src, "v")),
        "in doubt, the source does not run the VM"
    );
    let (_, paused) = wait_for_vm(&rt, &pair, &pair.src, "v");
    assert!(!paused, "the VM runs on the source again");
    let (_, _, writes_after) = rt.block_on(Pair::vm_state(&pair.src, "v")).unwrap();
    // A synthetic guest writes while the engine runs it (during the migration's rounds), so
    // one that kept its memory has written more than before; one created anew has not.
    assert!(
        writes_after > writes_before,
        "the guest kept the memory it had at the pause (it wrote {writes_before} pages before the migration, {writes_after} now)"
    );
    assert!(
        rt.block_on(Pair::vm_absent(&pair.dst, "v")),
        "the destination has no copy"
    );
    let journal = std::fs::read_to_string(pair.src.journal_file()).unwrap();
    assert!(
        journal.contains("settled: the destination never committed"),
        "{journal}"
    );
    let logs = pair.log_tails(200);
    assert_eq!(
        logs.matches("still in doubt").count(),
        1,
        "one retry went unanswered, the next was answered\n{logs}"
    );
}

/// SPEC.md §8.8 rule 3 across a restart: the source crashes right after journalling COMMIT
/// (before `Commit` left); restarted while the destination is down, it keeps the VM stopped
/// and asks again until the destination is back and answers that it never committed; the VM
/// then runs on the source again (a synthetic guest anew: its memory lived in the process).
#[test]
fn a_source_restarted_at_commit_asks_the_destination() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((rt, mut pair)) = hooked_source(
        &[(
            trustmig_agent::fault::CRASH_AT_ENV,
            trustmig_agent::fault::CrashPoint::SourceAfterCommit.name(),
        )],
        0,
    ) else {
        return;
    };
    let order = pair
        .order("v", limits(300, 10, NonConvergence::Force), 600)
        .unwrap();
    let _ = migrate(&rt, &pair, &order); // the source agent exits mid-way
                                         // The destination is down when the source comes back: no answer, the VM stays stopped.
    pair.stop(0);
    pair.stop(1);
    pair.src_env.clear();
    pair.start(0).unwrap();
    // Its first query goes unanswered (the destination is down), however long the restart.
    let in_doubt = until_blocking(Duration::from_secs(20), Duration::from_millis(50), || {
        pair.log_tails(50).contains("still in doubt")
    });
    assert!(in_doubt, "{}", pair.log_tails(15));
    assert!(
        rt.block_on(Pair::vm_absent(&pair.src, "v")),
        "in doubt, the VM stays stopped"
    );
    // The destination returns; the source, still up, asks again and gets its VM back.
    pair.start(1).unwrap();
    let (_, paused) = wait_for_vm(&rt, &pair, &pair.src, "v");
    assert!(!paused, "the VM runs on the source again");
    assert!(
        rt.block_on(Pair::vm_absent(&pair.dst, "v")),
        "the destination has no copy"
    );
    let journal = std::fs::read_to_string(pair.src.journal_file()).unwrap();
    assert!(
        journal.contains("settled: the destination never committed"),
        "{journal}"
    );
}

#[test]
fn non_converging_workloads_get_the_orders_action() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if swtpm_missing() {
        return;
    }
    let rt = rt();
    let wild = |n: &str| VmSpec {
        name: n.into(),
        size_mib: 64,
        dirty_pages_per_sec: 400_000,
        hot_fraction: 1.0,
        fill_fraction: 1.0,
    };
    let mut pair =
        Pair::create_with(exe().as_ref(), &[wild("a"), wild("f"), wild("t")], 1).unwrap();
    pair.start_both().unwrap();
    let o = pair
        .order("a", limits(1, 3, NonConvergence::Abort), 600)
        .unwrap();
    let e = failed(migrate(&rt, &pair, &o));
    assert!(e.contains("did not converge in 3 rounds"), "{e}");
    assert_rolled_back(&rt, &pair, "a");

    let o = pair
        .order("f", limits(1, 3, NonConvergence::Force), 600)
        .unwrap();
    let s = done(migrate(&rt, &pair, &o), &pair);
    assert!(!s.converged && s.throttle == 0, "forced switch-over: {s:?}");

    let o = pair
        .order("t", limits(1, 3, NonConvergence::Throttle), 600)
        .unwrap();
    let s = done(migrate(&rt, &pair, &o), &pair);
    assert!(s.throttle > 0, "throttled: {s:?}");
    let (dst_sum, _) = rt.block_on(Pair::checksum(&pair.dst, "t")).unwrap();
    assert_eq!(dst_sum, s.memory_checksum);
}

/// An order that asks for the strict final quote: the source's TPM quotes the final digest
/// before `Commit`, and nothing follows `Resumed` (SPEC.md §8.7).
#[test]
fn a_strict_order_is_quoted_before_commit() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if swtpm_missing() {
        return;
    }
    let rt = rt();
    let mut pair = Pair::create(exe().as_ref(), &vm("v", 64, 0), 2).unwrap();
    pair.strict_final_quote = true;
    pair.start_both().unwrap();
    let order = pair
        .order("v", limits(2000, 30, NonConvergence::Force), 600)
        .unwrap();
    let s = done(migrate(&rt, &pair, &order), &pair);
    assert_eq!(s.final_quote, "quoted before Commit (strict)");
    let journal = std::fs::read_to_string(pair.dst.journal_file()).unwrap();
    assert!(!journal.contains("late final quote"), "{journal}");
    assert!(!journal.contains("INCIDENT"), "{journal}");
}

/// Under systemd (`Type=notify`, contrib/trustmig.service) the agent says `READY=1` once it
/// listens and `STOPPING=1` when SIGTERM stops it.
#[test]
fn the_agent_tells_systemd_when_it_is_ready_and_stopping() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if swtpm_missing() {
        return;
    }
    let mut pair = Pair::create(exe().as_ref(), &vm("v", 16, 0), 1).unwrap();
    let path = pair.dir().join("notify.sock");
    let rx = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    pair.src_env = vec![("NOTIFY_SOCKET".into(), path.display().to_string())];
    pair.start(0).unwrap();
    let mut buf = [0u8; 256];
    let n = rx.recv(&mut buf).expect("READY=1 within 20 s");
    let said = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(said.starts_with("READY=1"), "{said}");
    pair.stop(0);
    let n = rx.recv(&mut buf).expect("STOPPING=1");
    assert_eq!(&buf[..n], b"STOPPING=1");
}

/// `trustmig reconcile` is for QEMU VMs a start left to the operator: an unknown VM and a
/// synthetic guest (no hypervisor; it starts from the journal alone) are refused, named.
#[test]
fn reconcile_names_what_it_cannot_reconcile() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if swtpm_missing() {
        return;
    }
    let mut pair = Pair::create(exe().as_ref(), &vm("v", 16, 0), 1).unwrap();
    pair.start(0).unwrap();
    let (ok, text) = cli(&pair.src, &["reconcile", "nosuch"]);
    assert!(!ok && text.contains("no VM named \"nosuch\""), "{text}");
    let (ok, text) = cli(&pair.src, &["reconcile", "v"]);
    assert!(!ok && text.contains("is a synthetic guest"), "{text}");
}

/// Where the VM of a crash-matrix run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ended {
    Source,
    Destination,
    /// Nowhere: the synthetic guest's memory lived in the agent that crashed while it ran
    /// there (as a QEMU guest dies with its QEMU).
    Nowhere,
}

/// Both agents' `trustmig status`: where the VM runs (not paused, not in doubt), and whether
/// every journal record of `order` is final (not claimed, not at COMMIT).
fn settled_status(rt: &tokio::runtime::Runtime, pair: &Pair, order: &str) -> (Vec<bool>, bool) {
    let mut runs = Vec::new();
    let mut fin = true;
    for home in [&pair.src, &pair.dst] {
        let Some(st) = status_json(rt, home) else {
            return (vec![false, false], false);
        };
        runs.push(
            st["vms"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|v| v["name"] == "v" && v["paused"] == false && v["in_doubt"] == false),
        );
        fin &= st["journal"].as_array().into_iter().flatten().all(|r| {
            r["order_id"] != order || !matches!(r["state"].as_str(), Some("claimed" | "committed"))
        });
    }
    (runs, fin)
}

/// SPEC.md §8.9, crash matrix (synthetic guests): each agent is killed (exit 137, as by
/// SIGKILL) at every journal point and mid-transfer, then restarted. Whatever the point, the
/// journals of both settle, `trustmig status` on both sides shows the VM running in exactly one
/// place (or, where the synthetic guest's memory died with the agent that ran it, nowhere),
/// and the VM's next migration from where it runs is accepted and completes.
#[test]
fn crash_matrix_every_journal_point_settles_to_one_copy() {
    use trustmig_agent::fault::{CrashPoint, CRASH_AT_ENV};
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if swtpm_missing() {
        return;
    }
    let rt = rt();
    let expected = |p: CrashPoint| match p {
        CrashPoint::SourceAfterDone => Ended::Destination,
        CrashPoint::DestinationAfterCommit | CrashPoint::DestinationAfterDone => Ended::Nowhere,
        _ => Ended::Source,
    };
    let mut table = Vec::new();
    for p in CrashPoint::ALL {
        let mut pair = Pair::create(exe().as_ref(), &vm("v", 64, 2_000), 2).unwrap();
        let i = usize::from(!p.in_source());
        let env = vec![(CRASH_AT_ENV.to_string(), p.name().to_string())];
        if i == 0 {
            pair.src_env = env;
        } else {
            pair.dst_env = env;
        }
        pair.start_both().unwrap();
        let order = pair
            .order("v", limits(300, 10, NonConvergence::Force), 600)
            .unwrap();
        let id =
            trustmig_protocol::order::hex(&order.dangerous_unverified_body().unwrap().order_id);
        if i == 0 {
            // The CLI cannot know what became of the order: it says so, and where to look.
            let f = pair.dir().join("crash.order");
            std::fs::write(&f, order.to_cbor()).unwrap();
            let (ok, text) = cli(&pair.src, &["migrate", "--order", f.to_str().unwrap()]);
            assert!(
                !ok && text.contains("trustmig: outcome unknown: ")
                    && text.contains("trustmig status --home"),
                "{}: {text}",
                p.name()
            );
        } else {
            let _ = migrate(&rt, &pair, &order);
        }
        let crashed = until_blocking(Duration::from_secs(30), Duration::from_millis(20), || {
            !pair.procs[i].as_mut().is_some_and(|a| a.running())
        });
        let tails = pair.log_tails(20);
        assert!(crashed, "{}: crash point never reached\n{tails}", p.name());
        // It died there, not otherwise (a panic, say).
        let log = std::fs::read_to_string(&pair.procs[i].as_ref().unwrap().log).unwrap();
        assert!(
            log.contains(&format!("fault injection: crash point {}:", p.name())),
            "{}: the agent exited elsewhere\n{}",
            p.name(),
            pair.log_tails(20)
        );
        pair.procs[i] = None;
        // `doctor` on the stopped agent's home reads what its start will settle.
        let home = [&pair.src, &pair.dst][i];
        let (_, text) = cli(home, &["doctor"]);
        let interrupted = format!("[WARN] journal: order {id} (VM v, ");
        assert_eq!(
            text.contains(&interrupted),
            !matches!(
                p,
                CrashPoint::SourceAfterDone | CrashPoint::DestinationAfterDone
            ),
            "{}: {text}",
            p.name()
        );
        pair.src_env.clear();
        pair.dst_env.clear();
        pair.start(i).unwrap();
        let want = expected(p);
        let settled =
            eventually_blocking(Duration::from_secs(60), Duration::from_millis(100), || {
                let (runs, fin) = settled_status(&rt, &pair, &id);
                let at_most_one = runs.iter().filter(|r| **r).count() <= 1;
                assert!(at_most_one, "{}: two running copies", p.name());
                let ended = match (runs[0], runs[1]) {
                    (true, false) => Some(Ended::Source),
                    (false, true) => Some(Ended::Destination),
                    _ => None,
                };
                (fin && ended.unwrap_or(Ended::Nowhere) == want).then_some(runs)
            });
        let Some(runs) = settled else {
            let (runs, fin) = settled_status(&rt, &pair, &id);
            panic!(
                "{}: not settled to {want:?} (running {runs:?}, journals final: {fin})\n{}",
                p.name(),
                pair.log_tails(20)
            );
        };
        // The next migration of the VM, from where it runs, is accepted and completes.
        let next = match want {
            Ended::Source => Some((
                0,
                pair.order("v", limits(300, 10, NonConvergence::Force), 600),
            )),
            Ended::Destination => Some((
                1,
                pair.order_back("v", limits(300, 10, NonConvergence::Force), 600),
            )),
            Ended::Nowhere => None,
        };
        if let Some((from, o)) = next {
            done(rt.block_on(migrate_from(&pair, from, &o.unwrap())), &pair);
        }
        table.push(format!("{:<28} {want:?} {runs:?}", p.name()));
    }
    println!(
        "crash point / where the VM runs / running [source, destination]:\n{}",
        table.join("\n")
    );
}

/// SPEC.md §3.4, revocation takes effect at once: an order revoked on either of its agents can
/// no longer start (a used one cannot be revoked); a removed operator key or peer refuses the
/// next migration with a named reason; and a peer removed while its migration runs stops that
/// migration before it commits: it rolls back and the VM runs on where it was.
#[test]
fn revocation_takes_effect_at_once() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if swtpm_missing() {
        return;
    }
    let rt = rt();
    let mut pair = Pair::create(exe().as_ref(), &vm("v", 64, 200), 2).unwrap();
    pair.start_both().unwrap();
    let file = |o: &SignedOrder, name: &str| {
        let p = pair.dir().join(name);
        std::fs::write(&p, o.to_cbor()).unwrap();
        p.display().to_string()
    };
    let l = || limits(300, 10, NonConvergence::Force);

    // Revoked on the source, then on the destination only: refused either way, by name.
    for (who, home) in [("source", &pair.src), ("destination", &pair.dst)] {
        let o = pair.order("v", l(), 600).unwrap();
        let f = file(&o, &format!("revoked-{who}.order"));
        let (ok, text) = cli(home, &["order", "revoke", &f]);
        assert!(ok && text.contains("revoked here as its"), "{text}");
        let (ok, text) = cli(home, &["order", "revoke", &f]);
        assert!(
            !ok && text.contains("cannot revoke: order ")
                && text.contains("already used")
                && !text.contains("migration failed"),
            "{text}"
        );
        let e = failed(migrate(&rt, &pair, &o));
        assert!(e.contains("revoked by the operator"), "{who}: {e}");
        assert_rolled_back(&rt, &pair, "v");
        // The CLI prints the agent's report as it is: once, with where the VM is (an order
        // revoked at the destination was used up at the source by now).
        if who == "destination" {
            continue;
        }
        let (ok, text) = cli(&pair.src, &["migrate", "--order", &f]);
        assert!(
            !ok && text.contains("revoked by the operator")
                && text.contains("; VM: ")
                && text.matches("migration failed").count()
                    == e.matches("migration failed").count(),
            "{who}: {text}"
        );
    }
    // A used order cannot be revoked; an order that names neither agent is refused.
    let other = Pair::create(exe().as_ref(), &vm("w", 8, 0), 1).unwrap();
    let foreign = other.order("w", l(), 600).unwrap();
    let (ok, text) = cli(
        &pair.src,
        &["order", "revoke", &file(&foreign, "foreign.order")],
    );
    assert!(!ok && text.contains("names neither this agent"), "{text}");

    // The operator's key removed on the destination: the next order is refused there.
    let o = pair.order("v", l(), 600).unwrap();
    let (ok, text) = cli(&pair.dst, &["trust", "remove-operator", "operator"]);
    assert!(ok, "{text}");
    let e = failed(migrate(&rt, &pair, &o));
    assert!(e.contains("not trusted here"), "{e}");
    assert_rolled_back(&rt, &pair, "v");
    // That order was claimed (used) by the source: too late to revoke it there.
    let (ok, text) = cli(&pair.src, &["order", "revoke", &file(&o, "used.order")]);
    assert!(!ok && text.contains("already used"), "{text}");
    let op = trustmig_agent::identity::operator_load(&pair.operator_key).unwrap();
    let key = hex::encode(op.verifying_key().to_bytes());
    let (ok, text) = cli(
        &pair.dst,
        &["trust", "add-operator", "--name", "operator", "--key", &key],
    );
    assert!(ok, "{text}");

    // The source no longer trusts the destination: refused before anything moves.
    let (ok, text) = cli(&pair.src, &["trust", "remove-peer", "destination"]);
    assert!(ok, "{text}");
    let e = failed(migrate(&rt, &pair, &pair.order("v", l(), 600).unwrap()));
    assert!(e.contains("is not a trusted peer here"), "{e}");
    assert!(e.contains("untouched"), "{e}");
    assert_rolled_back(&rt, &pair, "v");
    let dst_key = hex::encode(pair.dst_id);
    let (ok, text) = cli(
        &pair.src,
        &[
            "trust",
            "add-peer",
            "--name",
            "destination",
            "--key",
            &dst_key,
        ],
    );
    assert!(ok, "{text}");

    // Removed while a (bandwidth-capped) migration runs: it never commits, and rolls back.
    let mut slow = l();
    slow.bandwidth_bps = 16 << 20;
    let o = pair.order("v", slow, 600).unwrap();
    let remover = remove_peer_mid_transfer(&pair, &o, 0, "destination");
    let e = failed(migrate(&rt, &pair, &o));
    let (ok, text) = remover.join().unwrap();
    assert!(ok, "{text}");
    assert!(
        e.contains("removed from the trust store during the migration"),
        "{e}\n{}",
        pair.log_tails(20)
    );
    assert!(e.contains("rolled back"), "{e}");
    assert_rolled_back(&rt, &pair, "v");

    // The same on the destination's side: it stops before sending `Ready` (never at a
    // verified `Commit`, when the source has committed), and the source rolls back.
    let (ok, text) = cli(
        &pair.src,
        &[
            "trust",
            "add-peer",
            "--name",
            "destination",
            "--key",
            &dst_key,
        ],
    );
    assert!(ok, "{text}");
    let mut slow = l();
    slow.bandwidth_bps = 16 << 20;
    let o = pair.order("v", slow, 600).unwrap();
    let remover = remove_peer_mid_transfer(&pair, &o, 1, "source");
    let e = failed(migrate(&rt, &pair, &o));
    let (ok, text) = remover.join().unwrap();
    assert!(ok, "{text}");
    assert!(
        e.contains("removed from the trust store during the migration"),
        "{e}\n{}",
        pair.log_tails(20)
    );
    assert!(e.contains("rolled back"), "{e}");
    assert_rolled_back(&rt, &pair, "v");
}

/// In a thread: once the destination shows `order` claimed (the TLS session up, whatever the
/// machine's load) and half a second more (the handshake done and the data streams open; the
/// capped transfer lasts seconds, and the peer list is read again only at `Ready` and COMMIT,
/// `Ctx::check_still_trusted`), remove
/// `peer` from agent `i`'s trust store (0 = source): a removal *during* the migration. The
/// CLI's success and output.
fn remove_peer_mid_transfer(
    pair: &Pair,
    order: &SignedOrder,
    i: usize,
    peer: &'static str,
) -> std::thread::JoinHandle<(bool, String)> {
    let id = trustmig_protocol::order::hex(&order.dangerous_unverified_body().unwrap().order_id);
    let (dst, home) = (
        Home::at(pair.dst.root()),
        Home::at([&pair.src, &pair.dst][i].root()),
    );
    std::thread::spawn(move || {
        let claimed = until_blocking(Duration::from_secs(30), Duration::from_millis(20), || {
            let (_, text) = cli(&dst, &["status"]);
            text.lines()
                .any(|l| l.contains(&id[..16]) && l.contains("claimed"))
        });
        assert!(claimed, "never claimed: {}", cli(&dst, &["status"]).1);
        std::thread::sleep(Duration::from_millis(500));
        cli(&home, &["trust", "remove-peer", peer])
    })
}

/// Issue 12 item 4: migrations at once in both directions on one agent, with the source's
/// limit (`transfer.max_concurrent_migrations = 1` here): `trustmig evacuate` submits two
/// orders, one runs and one queues (listed by `status`); a second order for the VM under way
/// is refused by name; a VM migrates *into* the same agent meanwhile; all three end where
/// their orders sent them, and the evacuation prints its table.
#[test]
fn concurrent_migrations_queue_beyond_the_limit() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if swtpm_missing() {
        return;
    }
    let rt = rt();
    let vms = [vm("a", 64, 200), vm("b", 64, 200), vm("c", 64, 200)];
    let mut pair = Pair::create_with(exe().as_ref(), &vms, 2).unwrap();
    let cfg = pair.src.config();
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(text.contains("max_concurrent_migrations = 4"), "{text}");
    std::fs::write(
        &cfg,
        text.replace(
            "max_concurrent_migrations = 4",
            "max_concurrent_migrations = 1",
        ),
    )
    .unwrap();
    pair.start_both().unwrap();
    let fast = || limits(300, 10, NonConvergence::Force);
    done(
        migrate(&rt, &pair, &pair.order("c", fast(), 600).unwrap()),
        &pair,
    );

    let mut slow = fast();
    slow.bandwidth_bps = 24 << 20;
    let dir = pair.dir().join("evacuate");
    std::fs::create_dir_all(&dir).unwrap();
    for name in ["a", "b"] {
        let o = pair.order(name, slow.clone(), 600).unwrap();
        std::fs::write(dir.join(format!("{name}.order")), o.to_cbor()).unwrap();
    }
    let (src_root, orders) = (pair.src.root().to_path_buf(), dir.clone());
    let evacuation = std::thread::spawn(move || {
        std::process::Command::new(exe())
            .args(["evacuate", "--orders"])
            .arg(orders)
            .arg("--home")
            .arg(src_root)
            .output()
            .unwrap()
    });
    // One sends, the other waits in the queue, as `status` shows.
    let seen = eventually_blocking(Duration::from_secs(20), Duration::from_millis(20), || {
        let st = status_json(&rt, &pair.src).expect("source status");
        let queued = st["queued"].as_array().cloned().unwrap_or_default();
        let claimed = (st["journal"].as_array().into_iter().flatten())
            .find(|r| r["state"] == "claimed" && r["role"] == "source")
            .map(|r| r["vm"].as_str().unwrap_or_default().to_string());
        let (1, Some(vm)) = (queued.len(), claimed) else {
            return None;
        };
        assert_eq!(st["sending"], 1, "{st}");
        Some((vm, queued[0]["vm"].as_str().unwrap().to_string()))
    });
    let (sending_vm, queued_vm) = seen.unwrap_or_else(|| {
        panic!("no queue seen: {:?}", status_json(&rt, &pair.src));
    });
    assert_ne!(sending_vm, queued_vm);
    // A second order for the VM under way: refused at once, by name.
    let dup = pair.order(&sending_vm, fast(), 600).unwrap();
    let e = failed(migrate(&rt, &pair, &dup));
    assert!(e.contains("is already migrating from this host"), "{e}");
    // Meanwhile a VM arrives here (incoming migrations are not queued).
    let back = pair.order_back("c", fast(), 600).unwrap();
    done(rt.block_on(migrate_from(&pair, 1, &back)), &pair);
    let out = evacuation.join().unwrap();
    let table =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{table}\n{}", pair.log_tails(20));
    for name in ["a", "b"] {
        assert!(
            table
                .lines()
                .any(|l| l.starts_with(name) && l.contains("moved: downtime")),
            "{table}"
        );
        assert!(
            rt.block_on(Pair::checksum(&pair.dst, name)).is_ok(),
            "{name} on the destination"
        );
        assert!(
            rt.block_on(Pair::vm_absent(&pair.src, name)),
            "{name} left the source"
        );
    }
    let (_, paused) = rt.block_on(Pair::checksum(&pair.src, "c")).unwrap();
    assert!(!paused, "c runs on the source again");
    assert!(rt.block_on(Pair::vm_absent(&pair.dst, "c")));
}

/// SPEC.md §8.10, the audit trail: both agents record each order received, committed, done,
/// its late final quote, and one refused (a replay), with the peer, the operator's key and the
/// evidence digests (equal on both sides); `trustmig audit verify` accepts the trail, anchored
/// in the TPM, and names the first bad line after a line is deleted, two are swapped, one is
/// edited, or the trail is cut at its end; an edited and re-linked trail is caught by the TPM.
#[test]
fn the_audit_trail_records_each_order_and_names_tampering() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if swtpm_missing() {
        return;
    }
    let rt = rt();
    let mut pair = Pair::create_with(exe().as_ref(), &[vm("v", 32, 0), vm("w", 32, 0)], 2).unwrap();
    pair.start_both().unwrap();
    let l = || limits(300, 10, NonConvergence::Force);
    let o = pair.order("v", l(), 600).unwrap();
    done(migrate(&rt, &pair, &o), &pair);
    let e = failed(migrate(&rt, &pair, &o));
    assert!(e.contains("replayed"), "{e}");
    done(
        migrate(&rt, &pair, &pair.order("w", l(), 600).unwrap()),
        &pair,
    );
    let id = trustmig_protocol::order::hex(&o.dangerous_unverified_body().unwrap().order_id);
    let mut evidence = Vec::new();
    for (home, peer) in [(&pair.src, pair.dst_id), (&pair.dst, pair.src_id)] {
        let (ok, text) = cli(home, &["audit", "verify"]);
        assert!(ok && text.contains("audit trail verifies"), "{text}");
        let (ok, text) = cli(home, &["audit", "show", "--json"]);
        assert!(ok, "{text}");
        let entries: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let of_v: Vec<&serde_json::Value> = (entries.iter())
            .filter(|e| e["order_id"] == id.as_str() && e["event"] != "order-refused")
            .collect();
        let events: Vec<&str> = of_v.iter().map(|e| e["event"].as_str().unwrap()).collect();
        assert_eq!(
            events,
            ["order-received", "committed", "done", "final-quote"],
            "{text}"
        );
        assert!(
            entries
                .iter()
                .filter(|e| e["order_id"] == id.as_str())
                .all(|e| e["peer"] == hex::encode(peer)),
            "{text}"
        );
        assert!(
            of_v.iter()
                .all(|e| e["operator"] == hex::encode(o.operator)),
            "by whom: {text}"
        );
        // What the commit rested on: the same digests on both sides.
        evidence.push((of_v[1]["evidence"].clone(), of_v[3]["evidence"].clone()));
        // Anchored in the TPM from the trail's first entry (the agent holds the TPM: asked).
        assert_eq!(entries[0]["event"], "anchored", "{text}");
        let (ok, text) = cli(home, &["audit", "verify"]);
        assert!(
            ok && text.contains("anchored in PCR 23 since entry 0"),
            "{text}"
        );
    }
    let [(src_commit, src_final), (dst_commit, dst_final)] = &evidence[..] else {
        unreachable!()
    };
    for k in ["transcript", "manifest_root", "final_digest"] {
        assert_eq!(
            src_commit[k].as_str().map(str::len),
            Some(64),
            "{k}: {src_commit}"
        );
        assert_eq!(src_commit[k], dst_commit[k], "{k}");
    }
    assert_eq!(
        src_final["final_quote"].as_str().map(str::len),
        Some(64),
        "{src_final}"
    );
    assert_eq!(src_final["final_quote"], dst_final["final_quote"]);
    let (_, text) = cli(&pair.src, &["audit", "show", "--json"]);
    assert!(
        text.lines()
            .any(|l| l.contains("order-refused") && l.contains("replayed")),
        "{text}"
    );

    // Tampering, each on a fresh copy of the source's trail; the agent is stopped first.
    pair.stop(0);
    let path = pair.src.journal_dir().join("audit.jsonl");
    let good: Vec<String> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert!(good.len() >= 6, "{good:?}");
    let try_with = |lines: Vec<String>| {
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        let (ok, text) = cli(&pair.src, &["audit", "verify"]);
        assert!(!ok, "tampering not seen: {text}");
        text
    };
    let mut deleted = good.clone();
    deleted.remove(2);
    assert!(try_with(deleted).contains("line 3: entry 3 where entry 2 belongs"));
    let mut swapped = good.clone();
    swapped.swap(1, 2);
    assert!(try_with(swapped).contains("line 2: entry 2 where entry 1 belongs"));
    let mut edited = good.clone();
    edited[3] = edited[3].replacen("\"vm\":\"", "\"vm\":\"x", 1);
    assert!(try_with(edited).contains("line 4: entry 3 was edited"));
    // Cut at its end: the journal's last state change (`done`) missing is named by the
    // journal; the late quote's entry after it (no state change) by the TPM anchor.
    let cut = good[..good.len() - 2].to_vec();
    assert!(try_with(cut).contains("entries were removed from its end"));
    let cut = good[..good.len() - 1].to_vec();
    assert!(try_with(cut).contains("does not match its TPM anchor"));
    std::fs::write(&path, good.join("\n") + "\n").unwrap();
    let (ok, text) = cli(&pair.src, &["audit", "verify"]);
    assert!(ok && text.contains("anchored in PCR 23"), "{text}");

    // A forger who edits an entry and re-links the chain after it: the chain verifies, the TPM
    // does not, and the agent will not append to it until the operator re-anchors.
    let mut forged: Vec<trustmig_agent::audit::Entry> = good
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    forged[3].reason = "nothing happened here".into();
    trustmig_agent::audit::Entry::relink(&mut forged[3..]);
    let lines: Vec<String> = forged
        .iter()
        .map(|e| serde_json::to_string(e).unwrap())
        .collect();
    let text = try_with(lines);
    assert!(
        text.contains("does not match its TPM anchor: PCR 23 holds")
            && text.contains("trustmig audit anchor"),
        "{text}"
    );
    let e = pair.start(0).unwrap_err().to_string();
    assert!(e.contains("does not match its TPM anchor"), "{e}");
    let (ok, text) = cli(
        &pair.src,
        &["audit", "anchor", "--reason", "investigated: ticket 42"],
    );
    assert!(ok && text.contains("re-anchored in PCR 23"), "{text}");
    pair.start(0).unwrap();
    let (ok, text) = cli(&pair.src, &["audit", "verify"]);
    assert!(
        ok && text.contains("anchored in PCR 23 since entry"),
        "{text}"
    );
    let (_, text) = cli(&pair.src, &["audit", "show"]);
    assert!(
        text.contains("re-anchored by the operator: investigated: ticket 42"),
        "{text}"
    );

    // The trail moved aside (or deleted): the journal's records and PCR 23's extends show that
    // one was here, so the doctor fails and the agent does not start a new trail by itself;
    // the operator starts one with a reason, and `audit verify` says for good where it starts.
    pair.stop(0);
    std::fs::rename(&path, path.with_extension("jsonl.old")).unwrap();
    let (ok, text) = cli(&pair.src, &["doctor"]);
    assert!(
        !ok && text.contains("[FAIL] audit trail: missing, but the journal holds"),
        "{text}"
    );
    let journal = pair.src.journal_file();
    std::fs::rename(&journal, journal.with_extension("away")).unwrap();
    let (ok, text) = cli(&pair.src, &["doctor"]);
    assert!(
        !ok && text.contains("[FAIL] audit trail: missing, but PCR 23 holds extends"),
        "{text}"
    );
    std::fs::rename(journal.with_extension("away"), &journal).unwrap();
    let e = pair.start(0).unwrap_err().to_string();
    assert!(e.contains("no audit trail, but the journal holds"), "{e}");
    assert!(!path.exists(), "a refused start writes no trail");
    let (ok, text) = cli(
        &pair.src,
        &[
            "audit",
            "anchor",
            "--reason",
            "old trail in audit.jsonl.old",
        ],
    );
    assert!(ok, "{text}");
    pair.start(0).unwrap();
    let (ok, text) = cli(&pair.src, &["audit", "verify"]);
    assert!(
        ok && text.contains("entry 0 anchored on PCR 23 at")
            && text.contains("entry 0 gives the reason"),
        "{text}"
    );

    // SPEC.md §8.10, pinned against swtpm: a TPM restart (a reboot) zeros PCR 23, and the
    // agent's next start says so in the trail, which verifies on (the entries before the
    // reset by their chain alone).
    let since = |text: &str| -> u64 {
        let n = text.split("anchored in PCR 23 since entry ").nth(1);
        n.and_then(|n| n.split(':').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no epoch in: {text}"))
    };
    let (_, text) = cli(&pair.src, &["audit", "verify"]);
    let before = since(&text);
    pair.stop(0);
    pair.power_cycle_tpm(0).unwrap();
    pair.start(0).unwrap();
    let (_, text) = cli(&pair.src, &["audit", "show"]);
    assert!(
        text.contains("PCR 23 was reset (a reboot, a TPM restart, or a reset)"),
        "{text}"
    );
    let (ok, text) = cli(&pair.src, &["audit", "verify"]);
    let after = since(&text);
    assert!(ok && after > before, "epoch {before} -> {after}: {text}");
    assert!(
        text.contains(&format!("(those before {after}, by the hash chain alone)")),
        "{text}"
    );
}

/// Issue 12 item 6: `trustmig doctor` passes on a healthy host and names what is wrong on a
/// broken one: the agent down, a peer that no longer trusts this agent, an unreachable peer,
/// an identity key readable by others, a QEMU VM whose QMP socket is missing.
#[test]
fn doctor_names_what_to_fix() {
    use std::os::unix::fs::PermissionsExt;
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if swtpm_missing() {
        return;
    }
    let mut pair = Pair::create(exe().as_ref(), &vm("v", 8, 0), 1).unwrap();
    let doctor = |home: &Home, peers: &[String]| {
        let mut args = vec!["doctor"];
        for p in peers {
            args.extend(["--peer", p.as_str()]);
        }
        cli(home, &args)
    };
    // Agents down: the TPM is free to probe; the agent's absence is a warning.
    let (ok, text) = doctor(&pair.src, &[]);
    assert!(ok, "{text}");
    // The tests' binary is a test build (the tests crate turns fault injection on): named.
    assert!(
        text.contains("[WARN] this trustmig binary has fault injection compiled in"),
        "{text}"
    );
    assert!(text.contains("[ok  ] TPM at"), "{text}");
    assert!(text.contains("[WARN] the agent is not running"), "{text}");
    assert!(
        text.contains("[ok  ] journal: reads whole, no order interrupted"),
        "{text}"
    );
    // A journal a start would refuse (a line that is not a record): named before a start.
    let journal = pair.src.journal_file();
    let kept = std::fs::read(&journal).unwrap_or_default();
    let mut bad = kept.clone();
    bad.extend_from_slice(b"{\"not\": \"a record\"}\n");
    std::fs::write(&journal, &bad).unwrap();
    let (ok, text) = doctor(&pair.src, &[]);
    assert!(
        !ok && text.contains("[FAIL] journal: ")
            && text.contains("the agent will not start with it"),
        "{text}"
    );
    std::fs::write(&journal, &kept).unwrap();
    assert!(
        text.contains("[ok  ] peer destination: its AK is enrolled"),
        "{text}"
    );
    assert!(text.contains("[ok  ] identity key: mode 0600"), "{text}");
    assert!(
        text.contains("[ok  ] audit trail: 0 entries verify; not anchored yet"),
        "{text}"
    );
    // No trail file at all, in a home that never recorded anything (PCR 23 at zeros, the
    // journal empty): nothing to miss yet.
    let trail = pair.src.journal_dir().join("audit.jsonl");
    std::fs::rename(&trail, trail.with_extension("away")).unwrap();
    let (ok, text) = doctor(&pair.src, &[]);
    assert!(
        ok && text.contains("[ok  ] audit trail: none yet"),
        "{text}"
    );
    // ... unless the journal cannot be read (here a directory where the file goes): whether it
    // recorded anything is not known, and the doctor says so instead of taking it for empty.
    let journal = pair.src.journal_file();
    let had_journal = journal.exists();
    if had_journal {
        std::fs::rename(&journal, journal.with_extension("away")).unwrap();
    }
    std::fs::create_dir(&journal).unwrap();
    let (ok, text) = doctor(&pair.src, &[]);
    assert!(
        !ok && text.contains("[FAIL] audit trail: missing, and the journal cannot be read"),
        "{text}"
    );
    std::fs::remove_dir(&journal).unwrap();
    if had_journal {
        std::fs::rename(journal.with_extension("away"), &journal).unwrap();
    }
    std::fs::rename(trail.with_extension("away"), &trail).unwrap();

    pair.start_both().unwrap();
    let peer = format!("destination={}", pair.dst_addr);
    let (ok, text) = doctor(&pair.src, std::slice::from_ref(&peer));
    assert!(ok, "{text}");
    assert!(text.contains("[ok  ] the agent is running"), "{text}");
    assert!(
        text.contains("[ok  ] no VM in doubt or left to the operator; the journal takes appends"),
        "{text}"
    );
    assert!(text.contains("reachable, mutual TLS accepted"), "{text}");
    // The running agent anchored its new trail in PCR 23 (its `anchored` entry).
    assert!(
        text.contains("[ok  ] audit trail: 1 entries verify; anchored in PCR 23 since entry 0"),
        "{text}"
    );

    // The destination stops trusting this agent; a wrong port; an unknown peer name.
    let (ok, text) = cli(&pair.dst, &["trust", "remove-peer", "source"]);
    assert!(ok, "{text}");
    let (ok, text) = doctor(
        &pair.src,
        &[
            peer.clone(),
            "destination=127.0.0.1:1".into(),
            "nobody=127.0.0.1:1".into(),
        ],
    );
    assert!(!ok, "{text}");
    assert!(text.contains("refused this agent"), "{text}");
    assert!(
        text.contains("[FAIL] peer destination at 127.0.0.1:1"),
        "{text}"
    );
    assert!(
        text.contains("[FAIL] peer nobody: not in the trust store"),
        "{text}"
    );
    // The three above (and the clock, on a host whose clock is not synchronised), counted.
    let failed = text.lines().filter(|l| l.starts_with("[FAIL]")).count();
    assert!(
        failed >= 3 && text.contains(&format!("{failed} check(s) failed")),
        "{text}"
    );

    // A key readable by others, a QEMU VM without its QMP socket.
    pair.stop(0);
    pair.stop(1);
    let key = pair.src.identity_key();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cfg = pair.src.config();
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text += "\n[[vm]]\nname = \"q\"\nbackend = \"qemu\"\nqmp = \"/nonexistent/q.qmp\"\n";
    text += "[[vm.disk]]\nname = \"d0\"\npath = \"/images/q.qcow2\"\nverify = \"full\"\n";
    // And one whose QMP socket another client holds: it listens, and no greeting comes.
    let busy = pair.dir().join("busy.qmp");
    let _held = std::os::unix::net::UnixListener::bind(&busy).unwrap();
    text += &format!(
        "\n[[vm]]\nname = \"b\"\nbackend = \"qemu\"\nqmp = \"{}\"\n",
        busy.display()
    );
    std::fs::write(&cfg, text).unwrap();
    // verify = "full" needs qemu-img: found here, and named when it is not on the PATH.
    let out = std::process::Command::new(exe())
        .args(["doctor", "--home"])
        .arg(pair.src.root())
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("[FAIL] VM q: qemu-img not found") && said.contains("apt install qemu-utils"),
        "{said}"
    );
    let (ok, text) = doctor(&pair.src, &[]);
    assert!(
        text.contains("[ok  ] VM q: qemu-img present (verify = \"full\" maps its images)"),
        "{text}"
    );
    assert!(!ok, "{text}");
    assert!(
        text.contains("is readable by others (mode 644)") && text.contains("fix: chmod 600"),
        "{text}"
    );
    assert!(
        text.contains("[FAIL] VM q: QMP /nonexistent/q.qmp"),
        "{text}"
    );
    let held = format!(
        "[WARN] VM b: QMP {} is busy, or QEMU does not respond",
        busy.display()
    );
    assert!(
        text.contains(&held) && text.contains("another QMP client may hold the socket"),
        "{text}"
    );
    let (ok, text) = doctor(&pair.src, &["bad".into()]);
    assert!(!ok && text.contains("expected NAME=HOST:PORT"), "{text}");

    // An audit trail edited behind the agent's back (its one entry's reason changed, the
    // chain no longer holds): the doctor fails it. Then one whose chain was re-linked after
    // the edit, so it verifies alone: the TPM's PCR names it.
    let trail = pair.src.journal_dir().join("audit.jsonl");
    let original = std::fs::read_to_string(&trail).unwrap();
    let mut entry: serde_json::Value = serde_json::from_str(original.trim_end()).unwrap();
    entry["reason"] = "nothing happened here".into();
    std::fs::write(&trail, format!("{entry}\n")).unwrap();
    let (ok, text) = doctor(&pair.src, &[]);
    assert!(!ok, "{text}");
    assert!(text.contains("[FAIL] audit trail: "), "{text}");
    let mut list: Vec<trustmig_agent::audit::Entry> = vec![serde_json::from_value(entry).unwrap()];
    trustmig_agent::audit::Entry::relink(&mut list);
    std::fs::write(
        &trail,
        format!("{}\n", serde_json::to_string(&list[0]).unwrap()),
    )
    .unwrap();
    let (_, text) = cli(&pair.src, &["audit", "verify", "--no-tpm"]);
    assert!(text.contains("audit trail verifies"), "{text}");
    let (ok, text) = doctor(&pair.src, &[]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("[FAIL] audit trail: ") && text.contains("trustmig audit anchor --reason"),
        "{text}"
    );
}

/// Issue 12 items 3 and 5: an enrolled AK removed from the destination's policy is refused
/// from the agent's reload on (`trustmig reload`); a configuration that does not load is
/// refused by `reload` and by SIGHUP alike, and the agent keeps serving with what it had; the
/// restored policy, reloaded, lets the next migration through.
#[test]
fn reload_applies_a_new_policy_and_refuses_a_bad_file() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if swtpm_missing() {
        return;
    }
    let rt = rt();
    let mut pair = Pair::create(exe().as_ref(), &vm("v", 16, 0), 1).unwrap();
    pair.start_both().unwrap();
    let l = || limits(300, 10, NonConvergence::Force);
    let policy = pair.dst.policy();
    let saved = std::fs::read_to_string(&policy).unwrap();
    let (ok, text) = cli(&pair.dst, &["trust", "remove-ak", "source"]);
    assert!(ok && text.contains("1 AK(s) of source removed"), "{text}");
    let (ok, text) = cli(&pair.dst, &["reload"]);
    assert!(ok && text.contains("reloaded"), "{text}");
    let e = failed(migrate(&rt, &pair, &pair.order("v", l(), 600).unwrap()));
    assert!(
        e.contains("AttestationFailed") && e.contains("is not trusted for any agent"),
        "{e}"
    );
    assert_rolled_back(&rt, &pair, "v");

    // A broken configuration: refused by `reload` and by SIGHUP; the agent serves on.
    let cfg = pair.dst.config();
    let good = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("{good}\nthis is not toml = = =\n")).unwrap();
    let (ok, text) = cli(&pair.dst, &["reload"]);
    assert!(
        !ok && text.contains("reload refused, the running configuration is kept"),
        "{text}"
    );
    let pid = pair.procs[1].as_ref().unwrap().pid();
    sighup(pid);
    let refused = until_blocking(Duration::from_secs(10), Duration::from_millis(50), || {
        pair.log_tails(20).contains("SIGHUP: reload refused")
    });
    assert!(refused, "{}", pair.log_tails(20));
    assert!(
        pair.procs[1].as_mut().unwrap().running(),
        "the agent survives a bad reload"
    );
    let (ok, text) = cli(&pair.dst, &["status"]);
    assert!(ok, "{text}");
    // A synthetic VM's name given to a QEMU VM: the synthetic one stays until a restart, so
    // the two would share the name; refused.
    let src_cfg = pair.src.config();
    let src_good = std::fs::read_to_string(&src_cfg).unwrap();
    let renamed = src_good.replacen(
        "\nbackend = \"synthetic\"",
        "\nbackend = \"qemu\"\nqmp = \"/run/trustmig-test-none.qmp\"",
        1,
    );
    assert_ne!(renamed, src_good);
    std::fs::write(&src_cfg, renamed).unwrap();
    let (ok, text) = cli(&pair.src, &["reload"]);
    assert!(
        !ok && text.contains("vm \"v\" appears twice (with the synthetic VMs kept from the start)"),
        "{text}"
    );
    std::fs::write(&src_cfg, src_good).unwrap();

    // Restored and reloaded (by SIGHUP this time): the next migration goes through.
    std::fs::write(&cfg, good).unwrap();
    std::fs::write(&policy, saved).unwrap();
    sighup(pid);
    let reloaded = until_blocking(Duration::from_secs(10), Duration::from_millis(50), || {
        pair.log_tails(20).contains("SIGHUP: reloaded")
    });
    assert!(reloaded, "{}", pair.log_tails(20));
    done(
        migrate(&rt, &pair, &pair.order("v", l(), 600).unwrap()),
        &pair,
    );
}

/// Issue 12 item 1: Prometheus metrics on `metrics_listen`, scraped during a migration (one
/// being sent) and after it (started and ended by outcome, bytes, rounds, downtime and TPM quote
/// histograms), after a tampered record (a record failure of kind `tamper`, the migration
/// discarded) and after a replayed order (a refusal by its abort code).
#[test]
fn metrics_are_scraped_during_and_after_migrations() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if swtpm_missing() {
        return;
    }
    let rt = rt();
    let vms = [vm("v", 64, 200), vm("w", 16, 0)];
    let mut pair = Pair::create_with(exe().as_ref(), &vms, 2).unwrap();
    let mut addrs = Vec::new();
    for home in [&pair.src, &pair.dst] {
        let port = trustmig_attest::loopback::reserve(1).unwrap();
        let addr = format!("127.0.0.1:{port}");
        let cfg = home.config();
        let text = std::fs::read_to_string(&cfg).unwrap();
        std::fs::write(&cfg, format!("metrics_listen = \"{addr}\"\n{text}")).unwrap();
        addrs.push(addr);
    }
    pair.start_both().unwrap();
    let (src, dst) = (addrs[0].clone(), addrs[1].clone());
    let mut slow = limits(300, 10, NonConvergence::Force);
    slow.bandwidth_bps = 24 << 20;
    let order = pair.order("v", slow, 600).unwrap();
    let during = {
        let src = src.clone();
        std::thread::spawn(move || {
            let seen =
                eventually_blocking(Duration::from_secs(20), Duration::from_millis(20), || {
                    Some(scrape(&src)).filter(|m| sample(m, "trustmig_migrations_sending") == 1.0)
                });
            seen.unwrap_or_else(|| panic!("never seen sending: {}", scrape(&src)))
        })
    };
    done(migrate(&rt, &pair, &order), &pair);
    let m = during.join().unwrap();
    let ended_done =
        r#"trustmig_migrations_ended_total{role="source",backend="synthetic",outcome="done"}"#;
    assert_eq!(sample(&m, ended_done), 0.0, "seen while it ran: {m}");

    let m = scrape(&src);
    let started = r#"trustmig_migrations_started_total{role="source",backend="synthetic"}"#;
    let ended =
        r#"trustmig_migrations_ended_total{role="source",backend="synthetic",outcome="done"}"#;
    assert_eq!(sample(&m, started), 1.0, "{m}");
    assert_eq!(sample(&m, ended), 1.0, "{m}");
    // Half the guest is filled (the rest is zero pages, elided).
    assert!(
        sample(&m, "trustmig_bytes_sent_total") > f64::from(16u32 << 20),
        "{m}"
    );
    assert!(sample(&m, "trustmig_precopy_rounds_total") >= 1.0, "{m}");
    assert_eq!(sample(&m, "trustmig_downtime_seconds_count"), 1.0, "{m}");
    assert!(sample(&m, "trustmig_tpm_quote_seconds_count") >= 1.0, "{m}");
    assert_eq!(sample(&m, "trustmig_migrations_sending"), 0.0, "{m}");
    let done_here =
        r#"trustmig_migrations_ended_total{role="destination",backend="synthetic",outcome="done"}"#;
    scrape_until(&dst, done_here, 1.0);

    // Through a tampering proxy: the destination refuses a record, discards, and counts it.
    let proxy = rt
        .block_on(Proxy::start(pair.dst_addr.clone(), Fault::FlipBit(5)))
        .unwrap();
    let o = pair
        .order_via(
            &proxy.addr,
            "w",
            limits(300, 10, NonConvergence::Force),
            600,
        )
        .unwrap();
    let e = failed(migrate(&rt, &pair, &o));
    assert!(e.contains("tampered"), "{e}");
    let m = scrape_until(
        &dst,
        r#"trustmig_record_failures_total{kind="tamper"}"#,
        1.0,
    );
    let discarded = r#"trustmig_migrations_ended_total{role="destination",backend="synthetic",outcome="discarded"}"#;
    assert_eq!(sample(&m, discarded), 1.0, "{m}");
    // A replayed order: refused at the source, by abort code.
    let e = failed(migrate(&rt, &pair, &order));
    assert!(e.contains("replayed"), "{e}");
    let m = scrape(&src);
    assert_eq!(
        sample(&m, r#"trustmig_refusals_total{code="OrderRefused"}"#),
        1.0,
        "{m}"
    );

    // A metrics address in use: the agent does not start, and says which setting is wrong.
    pair.stop(0);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap().to_string();
    let cfg = pair.src.config();
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace(&src, &busy)).unwrap();
    let e = pair.start(0).unwrap_err().to_string();
    assert!(
        e.contains(&format!("metrics_listen = \"{busy}\"")) && e.contains("in use"),
        "{e}"
    );
}

/// SPEC.md §3.4: orders are checked against the journal's clock floor, never more than the
/// retention week before its newest record, so that a clock set back cannot make an order the
/// journal compacted away valid again. A journal whose newest record is eight days ahead of
/// the clock (as a clock set back leaves it): on the source, an order signed now is refused
/// there, saying why; on the destination, its handshake refuses the order and its log says why.
#[test]
fn orders_are_checked_against_the_journals_clock_floor() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if swtpm_missing() {
        return;
    }
    let ahead = trustmig_agent::unix_now() + 8 * 24 * 3600;
    let line = serde_json::json!({
        "order_id": format!("{:032x}", 0xfeed),
        "role": "source",
        "vm": "elsewhere",
        "state": "done",
        "not_after": ahead,
        "at": ahead,
        "note": "written with the clock ahead",
    })
    .to_string()
        + "\n";
    let rt = rt();
    for ahead_on in [0, 1] {
        let mut pair = Pair::create(exe().as_ref(), &vm("v", 64, 0), 2).unwrap();
        let home = [&pair.src, &pair.dst][ahead_on].clone();
        std::fs::create_dir_all(home.journal_dir()).unwrap();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(home.journal_file())
            .unwrap();
        std::io::Write::write_all(&mut f, line.as_bytes()).unwrap();
        drop(f);
        pair.start_both().unwrap();
        let order = pair
            .order("v", limits(300, 10, NonConvergence::Force), 600)
            .unwrap();
        let e = failed(migrate(&rt, &pair, &order));
        let why = "the journal's newest record was written at";
        // Either side's refusal reaches the source's operator, and does not ask for a new
        // order, which would be refused the same way.
        assert!(
            e.contains("before the journal's order clock") && !e.contains("sign a new one"),
            "{ahead_on}: {e}\n{}",
            pair.log_tails(10)
        );
        let said = if ahead_on == 0 {
            e.clone()
        } else {
            pair.log_tails(40)
        };
        assert!(
            said.contains(why),
            "{ahead_on}: {e}\n{}",
            pair.log_tails(20)
        );
        // `order show --home` checks it as the agent does, and says why.
        let f = pair.dir().join("floor.order");
        std::fs::write(&f, order.to_cbor()).unwrap();
        let (ok, text) = cli(&home, &["order", "show", f.to_str().unwrap()]);
        assert!(
            !ok && text.contains("before the journal's order clock"),
            "{text}"
        );
        // `doctor` on that host says so too.
        let (_, text) = cli(&home, &["doctor"]);
        assert!(
            text.contains("[FAIL] order clock: this host's clock reads"),
            "{text}"
        );
        // The VM stays on the source, running; nothing of it on the destination.
        assert_rolled_back(&rt, &pair, "v");
    }
}
