#!/usr/bin/env bash
# QEMU live migration, same guest, same run, four transports:
#   plain     QEMU -> unix socket -> QEMU
#   socat     QEMU -> unix -> socat -> TCP -> socat -> unix -> QEMU (the floor any sidecar pays)
#   qemu-tls  QEMU native TLS (tls-creds-x509, certificates made with openssl here)
#   qemu-tls-ladder  the same, with trustmig's downtime ladder driven over QMP (bench/native_migrate.py)
#   trustmig  QEMU -> source agent -> sealed records (TLS 1.3 control, TPM-attested) -> destination agent -> QEMU
#             (also with TPMs that sign in 200 ms, and with the strict final quote)
# The guest is tests/guest (built here with gcc); its data area fills the guest's memory so
# pages are real data, not zero pages. The destination preallocates its memory (-mem-prealloc).
#
# Usage: bench/qemu.sh [MEM_MIB]      (default 1024)
#   env RUNS=n        repeats each mode (default 3); the summary gives each mode's median run
#   env DOWNTIME=ms   QEMU's downtime-limit and the order's downtime target (default 300)
#   env RATE=n        pages the guest dirties per 10 ms tick (default 0: an idle guest)
#   env MODES="..."   run only these modes (default: all eight); comparisons need both sides
set -euo pipefail
cd "$(dirname "$0")/.."
MEM=${1:-1024}
RUNS=${RUNS:-3}
DOWNTIME=${DOWNTIME:-300}
AREA=$((MEM - 16))
RATE=${RATE:-0}
APPEND="area=$AREA rate=$RATE check=1000000"
for p in qemu-system-x86_64 gcc ld socat openssl python3; do
    command -v "$p" >/dev/null || { echo "bench/qemu.sh: $p is not installed" >&2; exit 1; }
done
W=$(mktemp -d /tmp/tm-bench-XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT

gcc -m32 -ffreestanding -fno-pic -fno-stack-protector -nostdlib -O2 -c tests/guest/guest.c -o "$W/guest.o"
ld -m elf_i386 --no-warn-rwx-segments -T tests/guest/guest.ld -o "$W/guest.elf" "$W/guest.o"

# qmp SOCKET JSON...: run commands, print the last reply (python: no extra tools needed).
qmp() {
    python3 - "$@" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rw")
f.readline()
def cmd(c):
    f.write(json.dumps(c) + "\n"); f.flush()
    while True:
        r = json.loads(f.readline())
        if "event" not in r: return r
cmd({"execute": "qmp_capabilities"})
r = None
for a in sys.argv[2:]:
    r = cmd(json.loads(a))
    if "error" in r: print(json.dumps(r)); sys.exit(1)
print(json.dumps(r.get("return")))
PY
}

# start_vm NAME [extra qemu args...]
start_vm() {
    local name=$1; shift
    qemu-system-x86_64 -accel tcg -m "$MEM" -nodefaults -display none \
        -kernel "$W/guest.elf" -append "$APPEND" -serial "file:$W/$name.serial" \
        -qmp "unix:$W/$name.qmp,server=on,wait=off" "$@" >"$W/$name.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 200); do [ -S "$W/$name.qmp" ] && return; sleep 0.05; done
    echo "QEMU $name did not start: $(cat "$W/$name.log")" >&2; exit 1
}
wait_ready() { for _ in $(seq 1200); do grep -q READY "$W/src.serial" 2>/dev/null && return; sleep 0.1; done; echo "guest not ready" >&2; exit 1; }
stop_vms() { for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; PIDS=(); rm -f "$W"/*.qmp "$W"/*.sock "$W"/*.serial; }

# run_native MODE: migrate with QEMU's own transport (bench/native_migrate.py drives it and
# runs the ladder for *-ladder modes); prints its BENCH-like line (see that script)
run_native() {
    local mode=$1 base=${1%-ladder} src_uri dst_uri tls=()
    case $base in
        plain) dst_uri="unix:$W/dst.sock"; src_uri=$dst_uri ;;
        socat) dst_uri="unix:$W/dst.sock"; src_uri="unix:$W/hop1.sock" ;;
        qemu-tls) dst_uri="tcp:127.0.0.1:$PORT"; src_uri=$dst_uri
            tls=(-object "tls-creds-x509,id=tls0,dir=$W/pki,endpoint=server,verify-peer=on") ;;
    esac
    start_vm src $( [ "$base" = qemu-tls ] && echo "-object tls-creds-x509,id=tls0,dir=$W/pki,endpoint=client" )
    start_vm dst -mem-prealloc -incoming defer -S "${tls[@]}"
    local qemu_pids="${PIDS[0]},${PIDS[1]}"
    wait_ready
    local extra_s='{"execute":"query-status"}' extra_d='{"execute":"query-status"}'
    if [ "$base" = qemu-tls ]; then
        extra_s='{"execute":"migrate-set-parameters","arguments":{"tls-creds":"tls0","tls-hostname":"localhost"}}'
        extra_d='{"execute":"migrate-set-parameters","arguments":{"tls-creds":"tls0"}}'
    fi
    qmp "$W/dst.qmp" "$extra_d" "{\"execute\":\"migrate-incoming\",\"arguments\":{\"uri\":\"$dst_uri\"}}" >/dev/null
    if [ "$mode" = socat ]; then
        for _ in $(seq 100); do [ -S "$W/dst.sock" ] && break; sleep 0.05; done
        socat -b 262144 "TCP-LISTEN:$PORT,bind=127.0.0.1,reuseaddr" "UNIX-CONNECT:$W/dst.sock" & PIDS+=($!)
        socat -b 262144 "UNIX-LISTEN:$W/hop1.sock" "TCP:127.0.0.1:$PORT,retry=50,interval=0.1" & PIDS+=($!)
        for _ in $(seq 100); do [ -S "$W/hop1.sock" ] && break; sleep 0.05; done
    fi
    python3 bench/native_migrate.py "$W/src.qmp" "$W/dst.qmp" "$src_uri" "$DOWNTIME" \
        "$([ "$mode" != "$base" ] && echo 1 || echo 0)" "$qemu_pids" "$extra_s"
    stop_vms
}

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
. bench/pki.sh
make_pki "$W/pki"

echo "building trustmig (release) ..." >&2
cargo build --release -q -p trustmig-agent --bin trustmig
cargo test --release -q -p trustmig-agent --test qemu --no-run 2>/dev/null

ALL_MODES="plain socat qemu-tls qemu-tls-ladder trustmig trustmig-flat trustmig-slowtpm trustmig-strict"
MODES=${MODES:-$ALL_MODES}
for m in $MODES; do
    case " $ALL_MODES " in *" $m "*) ;; *) echo "bench/qemu.sh: unknown mode $m (modes: $ALL_MODES)" >&2; exit 1 ;; esac
done
wanted() { case " $MODES " in *" $1 "*) return 0 ;; esac; return 1; }
rows=()
timelines=()
for run in $(seq "$RUNS"); do
    for mode in plain socat qemu-tls qemu-tls-ladder; do
        wanted $mode || continue
        echo "run $run: $mode ..." >&2
        rows+=("$mode $(run_native $mode)")
        echo "  ${rows[-1]}" >&2
    done
    # trustmig: with its downtime ladder (the default), and flat (QEMU's limit at the target
    # from the start, as the native modes run).
    # trustmig-slowtpm: the same with TPMs that sign in 200 ms, as hardware TPMs do
    # (TRUSTMIG_TPM_SIGN_MS, attest/src/slowtpm.rs); trustmig-strict: that TPM and an order
    # asking for the final quote before Commit (SPEC.md §8.7).
    for mode in trustmig trustmig-flat trustmig-slowtpm trustmig-strict; do
        wanted $mode || continue
        extra=()
        case $mode in
            trustmig-flat) extra=(TRUSTMIG_BENCH_STEPS=0) ;;
            trustmig-slowtpm) extra=(TRUSTMIG_TPM_SIGN_MS=200) ;;
            trustmig-strict) extra=(TRUSTMIG_TPM_SIGN_MS=200 TRUSTMIG_BENCH_STRICT=1) ;;
        esac
        echo "run $run: $mode ..." >&2
        out=$(env TRUSTMIG_BENCH_MEM=$MEM TRUSTMIG_BENCH_APPEND="$APPEND" TRUSTMIG_BENCH_DOWNTIME=$DOWNTIME "${extra[@]}" \
            cargo test --release -q -p trustmig-agent --test qemu -- --ignored --exact bench_trustmig --nocapture 2>/dev/null)
        rows+=("$mode $(echo "$out" | grep '^BENCH ' | cut -d' ' -f2-)")
        echo "  ${rows[-1]}" >&2
        timelines+=("$mode run $run: $(echo "$out" | grep '^TIMELINE ' | cut -d' ' -f2-)")
    done
done

printf '\nQEMU %s, TCG, %d MiB guest with a %d MiB data area dirtying %d pages/tick, destination -mem-prealloc, downtime-limit %d ms\n' \
    "$(qemu-system-x86_64 --version | head -1 | awk '{print $4}')" "$MEM" "$AREA" "$RATE" "$DOWNTIME"
printf '%s\n' "${rows[@]}" | python3 -c '
import os, statistics, sys
rows = [l.split() for l in sys.stdin if l.strip()]
HZ, CORES = os.sysconf("SC_CLK_TCK"), os.cpu_count()
# Each row: mode total_ms e2e_ms bytes qemu_downtime_ms stamped_e2e_ms qemu_total_ms after_ms
# cpu_ms busy qemu syncs
# (bench/native_migrate.py, bench_trustmig). total: trustmig the whole order (handshake and
# attestation included), the native modes QEMU total-time. e2e: trustmig as its source agent saw
# it (STOP event to Resumed), the native modes by QEMU stamps. stamped: the source QEMU STOP
# stamp to the destination QEMU RESUME stamp. qemu_total: the source QEMU total-time. after:
# trustmig from QEMU done to Resumed (its agents part), the native modes from the destination
# completed stamp to its RESUME stamp. cpu_ms busy qemu: the CPU accounting window (every mode
# from the source QEMU migrate to the destination RESUME), the busy CPU time of the whole machine
# and of the two QEMUs in it (clock ticks); cpu/GiB and qemu/GiB are those in core-seconds per GiB
# moved, busy the share of all cores in use. syncs: the source QEMU dirty-bitmap syncs
# (dirty-sync-count; the last one with the guest stopped).
print("%-16s %4s %9s %9s %9s %10s %8s %9s %9s %7s %8s %8s %5s %5s" % ("mode", "run", "total_ms", "MiB_sent", "MB/s", "qemu_MB/s", "qemu_dt", "e2e_dt", "stamped", "after", "cpu/GiB", "qemu/GiB", "busy", "syncs"))
med = {}
for mode in ("plain", "socat", "qemu-tls", "qemu-tls-ladder", "trustmig", "trustmig-flat", "trustmig-slowtpm", "trustmig-strict"):
    runs = [tuple(map(float, r)) for m, *r in rows if m == mode]
    if not runs:
        continue
    per_gib = lambda ticks, b: ticks / HZ / (b / 2**30)
    for i, (t, d, b, qd, st, qt, af, cw, cb, cq, sy) in enumerate(runs, 1):
        print("%-16s %4d %9d %9.0f %9.0f %10.0f %8d %9d %9d %7.1f %8.2f %8.2f %4.0f%% %5d" % (mode, i, t, b / 2**20, b / (t * 1000), b / (qt * 1000), qd, d, st, af,
              per_gib(cb, b), per_gib(cq, b), 100 * cb / HZ / (cw / 1000 * CORES), sy))
    med[mode] = dict(mbs=statistics.median(r[2] / (r[0] * 1000) for r in runs),
                     qmbs=statistics.median(r[2] / (r[5] * 1000) for r in runs),
                     cpu=statistics.median(per_gib(r[8], r[2]) for r in runs),
                     cpu_qemu=statistics.median(per_gib(r[9], r[2]) for r in runs),
                     busy=statistics.median(r[8] / HZ / (r[7] / 1000 * CORES) for r in runs),
                     after=statistics.median(r[6] for r in runs),
                     qemu=statistics.median(r[3] for r in runs),
                     e2e=statistics.median(r[1] for r in runs),
                     stamped=statistics.median(r[4] for r in runs))
print()
print("medians: " + ", ".join("%s %.0f MB/s, %d ms stamped" % (m, v["mbs"], v["stamped"]) for m, v in med.items()))
def have(*modes):
    return all(m in med for m in modes)
if have("trustmig", "qemu-tls", "socat"):
    tm, tls, so = med["trustmig"], med["qemu-tls"], med["socat"]
    print("throughput: trustmig vs QEMU TLS %.2fx (target >= 1.5x), vs socat relay %.2fx (target >= 0.97x);"
          " by QEMU total-time (trustmig without its handshake): %.2fx and %.2fx"
          % (tm["mbs"] / tls["mbs"], tm["mbs"] / so["mbs"], tm["qmbs"] / tls["qmbs"], tm["qmbs"] / so["qmbs"]))
if have("trustmig", "socat"):
    tm, so = med["trustmig"], med["socat"]
    print("CPU per GiB moved (core-seconds, medians): socat relay %.2f (QEMUs %.2f, the rest %.2f); trustmig %.2f"
          " (QEMUs %.2f, the rest %.2f: agents, TPMs, the bench); the machine %.0f%% busy with socat, %.0f%% with"
          " trustmig. On these %d cores trustmig can reach at most %.2fx socat (all cores busy at its CPU per GiB"
          " against socat at its own)"
          % (so["cpu"], so["cpu_qemu"], so["cpu"] - so["cpu_qemu"], tm["cpu"], tm["cpu_qemu"],
             tm["cpu"] - tm["cpu_qemu"], 100 * so["busy"], 100 * tm["busy"], CORES,
             so["cpu"] / (tm["cpu"] * so["busy"])))
print("downtime as the guest sees it (source STOP to destination RESUME, QEMU stamps):")
if have("trustmig", "qemu-tls-ladder"):
    tm, tll = med["trustmig"], med["qemu-tls-ladder"]
    print("  like for like with the ladder: trustmig %d ms vs QEMU TLS with the same ladder %d ms (target: within 5 ms);"
          " after QEMU was done: trustmig agents %.1f ms, the native cont %.1f ms"
          % (tm["stamped"], tll["stamped"], tm["after"], tll["after"]))
    print("  QEMU own downtime figures: trustmig %d ms, QEMU TLS with the ladder %d ms: not comparable, QEMU TLS"
          " runs without return-path, so its figure ends when its last byte left the source, before the"
          " destination loaded it" % (tm["qemu"], tll["qemu"]))
if have("trustmig-flat", "qemu-tls"):
    print("  flat limit: trustmig-flat %d ms vs QEMU TLS %d ms (QEMU stops once what is left fits in %s ms at its measured bandwidth)"
          % (med["trustmig-flat"]["stamped"], med["qemu-tls"]["stamped"], "'$DOWNTIME'"))
if have("trustmig", "trustmig-slowtpm", "trustmig-strict"):
    tm, sl, st = med["trustmig"], med["trustmig-slowtpm"], med["trustmig-strict"]
    print("with TPMs that sign in 200 ms: trustmig %d ms vs %d ms with swtpm (target: within 5 ms); strict final"
          " quote %d ms (the TPM inside the downtime); as its source agent saw them: %d, %d, %d ms"
          % (sl["stamped"], tm["stamped"], st["stamped"], sl["e2e"], tm["e2e"], st["e2e"]))
    print("  of which the agents add once QEMU is done (evidence, COMMIT, Commit, cont): %.1f ms with the"
          " slow TPM, %.1f ms with swtpm, %.1f ms strict; the rest is QEMU stop-and-copy, whose size QEMU"
          " picks anew each run" % (sl["after"], tm["after"], st["after"]))
'
printf '\nswitch-over timelines, ms from the guest'"'"'s STOP as the source agent saw each step:\n'
printf '  %s\n' "${timelines[@]}"
echo "(total_ms: trustmig the whole order (handshake and attestation included), the native modes QEMU's total-time;"
echo " MB/s over total_ms, qemu_MB/s over the source QEMU's own total-time (migrate to completed);"
echo " MiB_sent, qemu_dt: the source QEMU's query-migrate (qemu_dt: stop to the end of its sending);"
echo " e2e_dt: trustmig from the STOP event to the destination's Resumed as its source agent saw them;"
echo " stamped: the source QEMU's STOP to the destination QEMU's RESUME by QEMU's own event stamps (one"
echo " clock), the native modes' destination sent 'cont' the moment it announced completion;"
echo " trustmig holds QEMU's downtime-limit at 1 ms for the first pass, then target/4 doubling each round to the target (spec/qemu.md §3),"
echo " trustmig-flat sets the target from the start as plain, socat and qemu-tls do;"
echo " qemu-tls-ladder gets the same ladder from bench/native_migrate.py, a step at each MIGRATION_PASS event as trustmig)"
