//! `trustmig bench`: whole-product figures with real agents, TPMs and TLS on loopback.
//! Downtime and bytes against the guest's dirty rate, and the agents' peak memory while
//! moving a large guest. (Record-layer cost against a null cipher: `cargo bench -p
//! trustmig-agent --bench dataplane`, so no null cipher is ever built into this binary.)

use trustmig_protocol::order::{Limits, NonConvergence};

use crate::control::{Progress, Reply, Summary};
use crate::error::AgentError;
use crate::harness::{Pair, VmSpec};

fn run_one(
    pair: &Pair,
    rt: &tokio::runtime::Runtime,
    vm: &str,
    limits: Limits,
) -> Result<Summary, AgentError> {
    let order = pair.order(vm, limits, 600)?;
    let mut out = Err(AgentError::Migration("no result".into()));
    rt.block_on(pair.migrate(&order, |r| match r {
        Reply::Progress(Progress::Done(s)) => out = Ok(s),
        Reply::Progress(Progress::Failed { error, vm }) => {
            out = Err(AgentError::Migration(format!("{error}; {vm}")))
        }
        _ => {}
    }))?;
    out
}

fn hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Downtime and bytes on the wire against the dirty rate, for a guest of `size_mib`.
pub fn dirty_rate_table(
    size_mib: u64,
    rates: &[u64],
    downtime_ms: u32,
) -> Result<String, AgentError> {
    let exe = std::env::current_exe().map_err(AgentError::io("/proc/self/exe"))?;
    let vms: Vec<VmSpec> = rates
        .iter()
        .map(|r| VmSpec {
            name: format!("rate-{r}"),
            size_mib,
            dirty_pages_per_sec: *r,
            hot_fraction: 0.05,
            fill_fraction: 1.0,
        })
        .collect();
    let mut pair = Pair::create_with(&exe, &vms, 2)?;
    pair.start_both()?;
    let rt = tokio::runtime::Runtime::new().map_err(|e| AgentError::Migration(e.to_string()))?;
    let mut t = format!(
        "downtime and bytes vs dirty rate ({size_mib} MiB guest, all pages non-zero, 5% hot set, target {downtime_ms} ms, throttle on non-convergence)\n\
         {:>12} {:>7} {:>10} {:>10} {:>12} {:>10} {:>9} {:>9}\n",
        "dirty pg/s", "rounds", "converged", "throttle", "downtime ms", "total ms", "wire MiB", "x guest"
    );
    for v in &vms {
        let s = run_one(
            &pair,
            &rt,
            &v.name,
            Limits {
                downtime_ms,
                bandwidth_bps: 0,
                max_rounds: 30,
                on_nonconvergence: NonConvergence::Throttle,
            },
        )?;
        t += &format!(
            "{:>12} {:>7} {:>10} {:>9}% {:>12} {:>10} {:>9.1} {:>9.2}\n",
            v.dirty_pages_per_sec,
            s.rounds,
            s.converged,
            s.throttle,
            s.downtime_ms,
            s.total_ms,
            s.bytes_on_wire as f64 / (1 << 20) as f64,
            s.bytes_on_wire as f64 / s.guest_bytes as f64
        );
    }
    Ok(t)
}

/// `n` guests of `size_mib` (idle, every page non-zero) migrating at once with TPMs that sign
/// in `sign_ms`, as hardware TPMs do: each one's downtime and total time. Each agent's one TPM
/// serves every handshake's quote and every late quote in turn, so those queue while the
/// first migrations switch over; a switch-over does not wait for them (SPEC.md §8.7).
pub fn concurrent_table(
    n: usize,
    size_mib: u64,
    sign_ms: u64,
    downtime_ms: u32,
) -> Result<String, AgentError> {
    let exe = std::env::current_exe().map_err(AgentError::io("/proc/self/exe"))?;
    let vms: Vec<VmSpec> = (0..n)
        .map(|i| VmSpec {
            name: format!("concurrent-{i}"),
            size_mib,
            dirty_pages_per_sec: 0,
            hot_fraction: 0.05,
            fill_fraction: 1.0,
        })
        .collect();
    let sign = std::time::Duration::from_millis(sign_ms);
    let mut pair = Pair::create_signing_in(&exe, &vms, 2, Some(sign))?;
    pair.start_both()?;
    let limits = Limits {
        downtime_ms,
        bandwidth_bps: 0,
        max_rounds: 30,
        on_nonconvergence: NonConvergence::Force,
    };
    let orders = (vms.iter())
        .map(|v| pair.order(&v.name, limits.clone(), 600))
        .collect::<Result<Vec<_>, _>>()?;
    let rt = tokio::runtime::Runtime::new().map_err(|e| AgentError::Migration(e.to_string()))?;
    let socket = pair.src.control_socket();
    let results = rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for (i, order) in orders.into_iter().enumerate() {
            let socket = socket.clone();
            set.spawn(async move {
                let mut out = Err(AgentError::Migration("no result".into()));
                let request = crate::control::Request::Migrate {
                    order: hex::encode(order.to_cbor()),
                };
                let called = crate::control::call(&socket, &request, |r| match r {
                    Reply::Progress(Progress::Done(s)) => out = Ok(s),
                    Reply::Progress(Progress::Failed { error, vm }) => {
                        out = Err(AgentError::Migration(format!("{error}; {vm}")))
                    }
                    _ => {}
                })
                .await;
                (i, called.and(out))
            });
        }
        let mut results = Vec::new();
        while let Some(r) = set.join_next().await {
            results.push(r.map_err(|e| AgentError::Migration(e.to_string()))?);
        }
        Ok::<_, AgentError>(results)
    })?;
    let mut results = results;
    results.sort_by_key(|(i, _)| *i);
    let mut t = format!(
        "{n} migrations at once ({size_mib} MiB guests, all pages non-zero, idle, target {downtime_ms} ms), TPMs signing in {sign_ms} ms\n\
         {:>12} {:>12} {:>10}\n",
        "migration", "downtime ms", "total ms"
    );
    for (i, r) in results {
        let s = r?;
        t += &format!("{i:>12} {:>12} {:>10}\n", s.downtime_ms, s.total_ms);
    }
    Ok(t)
}

/// Peak RSS of both agents while migrating a `size_mib` guest whose every page is non-zero;
/// the guest's own memory (resident on both sides by the end) is subtracted.
pub fn peak_rss(size_mib: u64) -> Result<String, AgentError> {
    let exe = std::env::current_exe().map_err(AgentError::io("/proc/self/exe"))?;
    let vm = VmSpec {
        name: "big".into(),
        size_mib,
        dirty_pages_per_sec: 1000,
        hot_fraction: 0.05,
        fill_fraction: 1.0,
    };
    let mut pair = Pair::create(&exe, &vm, 2)?;
    pair.start_both()?;
    let rt = tokio::runtime::Runtime::new().map_err(|e| AgentError::Migration(e.to_string()))?;
    let pids: Vec<u32> = pair.procs.iter().flatten().map(|p| p.pid()).collect();
    let idle: Vec<u64> = pids.iter().map(|p| hwm_kib(*p)).collect();
    let s = run_one(
        &pair,
        &rt,
        "big",
        Limits {
            downtime_ms: 300,
            bandwidth_bps: 0,
            max_rounds: 30,
            on_nonconvergence: NonConvergence::Force,
        },
    )?;
    let guest_kib = size_mib * 1024;
    let pages = size_mib * 256;
    let bitmaps_kib = pages.div_ceil(8) * 3 / 1024; // pending + scratch + the guest's dirty log
    let digests_kib = pages * 32 / 1024;
    let mut t = format!(
        "peak RSS migrating {size_mib} MiB ({:.0} MiB/s, downtime {} ms); guest memory subtracted\n\
         {:>12} {:>12} {:>12} {:>14} {:>18}\n",
        s.bytes_on_wire as f64 / (1 << 20) as f64 / (s.total_ms.max(1) as f64 / 1000.0),
        s.downtime_ms,
        "agent",
        "idle MiB",
        "peak MiB",
        "overhead MiB",
        "target MiB"
    );
    for (i, pid) in pids.iter().enumerate() {
        let peak = hwm_kib(*pid);
        let base = if i == 0 { guest_kib } else { 0 }; // the source's guest was resident at idle
        let overhead = peak.saturating_sub(guest_kib.max(base));
        t += &format!(
            "{:>12} {:>12.1} {:>12.1} {:>14.1} {:>18}\n",
            if i == 0 { "source" } else { "destination" },
            idle[i] as f64 / 1024.0,
            peak as f64 / 1024.0,
            overhead as f64 / 1024.0,
            format!("<= {:.1}", 64.0 + bitmaps_kib as f64 / 1024.0)
        );
    }
    t += &format!(
        "(of which per-page digests: {:.1} MiB per side, 32 bytes per 4 KiB page)\n",
        digests_kib as f64 / 1024.0
    );
    Ok(t)
}
