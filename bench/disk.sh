#!/usr/bin/env bash
# Live migration of a writable local disk, same guest, same run, three transports:
#   nbd-plain  QEMU's NBD mirror and migration over unix sockets (libvirt --copy-storage-all)
#   nbd-tls    the same over TCP with QEMU's TLS (tls-creds-x509 on the NBD server and client,
#              and on the migration stream; certificates made with openssl here)
#   trustmig   QEMU's NBD mirror and migration through two agents: sealed records under keys
#              of the TPM-attested session, every NBD byte bound into the final evidence
#   trustmig-full  the same with verify = "full": both agents also hash the whole image (as the
#              guest sees it) with the guest stopped; its downtime is that option's cost
# The disk is a raw image, half of it data; the guest writes 64 KiB every 10 ms through its
# virtio-blk device the whole time (HMP qemu-io). Mirrors run in QEMU's background copy mode
# (spec/qemu.md §5), the memory migration starts once the mirror is ready.
#
# Usage: bench/disk.sh [DISK_MIB]   (default 1024)
#   env RUNS=n   repeats each mode (default 3); the summary gives each mode's median
#   env MEM=MiB  guest memory (default 256)
set -euo pipefail
cd "$(dirname "$0")/.."
DISK=${1:-1024}
RUNS=${RUNS:-3}
MEM=${MEM:-256}
for p in qemu-system-x86_64 qemu-img qemu-io gcc ld openssl python3; do
    command -v "$p" >/dev/null || { echo "bench/disk.sh: $p is not installed (scripts/install-deps.sh)" >&2; exit 1; }
done
W=$(mktemp -d /tmp/tm-disk-bench-XXXXXX)
trap 'rm -rf "$W"' EXIT

gcc -m32 -ffreestanding -fno-pic -fno-stack-protector -nostdlib -O2 -c tests/guest/guest.c -o "$W/guest.o"
ld -m elf_i386 --no-warn-rwx-segments -T tests/guest/guest.ld -o "$W/guest.elf" "$W/guest.o"
. bench/pki.sh
make_pki "$W/pki"

echo "building trustmig (release) ..." >&2
cargo build --release -q -p trustmig-agent --bin trustmig
cargo test --release -q -p trustmig-agent --test qemu --no-run 2>/dev/null

rows=()
for run in $(seq "$RUNS"); do
    for mode in plain tls; do
        echo "run $run: nbd-$mode ..." >&2
        mkdir -p "$W/run" && ln -s "$W/pki" "$W/run/pki"
        rows+=("nbd-$mode $(python3 bench/disk_native.py "$W/run" "$mode" "$DISK" "$W/guest.elf" "$MEM" | tail -1)")
        rm -rf "$W/run"
    done
    # trustmig-full: the disk with verify = "full" (both hosts hash the image at the switch-over)
    for verify in stream full; do
        mode=trustmig; [ $verify = full ] && mode=trustmig-full
        echo "run $run: $mode ..." >&2
        line=$(env TRUSTMIG_BENCH_DISK_MIB="$DISK" TRUSTMIG_BENCH_VERIFY=$verify \
            cargo test --release -q -p trustmig-agent --test qemu -- --ignored --exact bench_trustmig_disk --nocapture 2>/dev/null | grep '^BENCH ')
        # BENCH total e2e_downtime disk_bytes mirror_ms qemu_downtime -> total qemu_downtime disk_bytes mirror_ms e2e
        read -r _ t e b m q <<<"$line"
        rows+=("$mode $t $q $b $m $e")
    done
done

printf '\nQEMU %s, TCG, %d MiB guest, %d MiB raw disk (%d MiB data), guest writing 64 KiB / 10 ms, mirror copy-mode background\n' \
    "$(qemu-system-x86_64 --version | head -1 | awk '{print $4}')" "$MEM" "$DISK" $((DISK / 2))
printf '%s\n' "${rows[@]}" | DATA=$((DISK / 2)) python3 -c '
import os, statistics, sys
data = int(os.environ["DATA"]) << 20
rows = [l.split() for l in sys.stdin if l.strip()]
print("%-13s %4s %10s %10s %10s %12s %14s" % ("mode", "run", "total_ms", "mirror_ms", "disk_MB/s", "downtime_ms", "e2e_downtime"))
med = {}
for mode in ("nbd-plain", "nbd-tls", "trustmig", "trustmig-full"):
    runs = [r[1:] for r in rows if r[0] == mode]
    for i, r in enumerate(runs, 1):
        t, qd, _, m = (int(x) for x in r[:4])
        e2e = r[4] if len(r) > 4 else "-"
        print("%-13s %4d %10d %10d %10.0f %12d %14s" % (mode, i, t, m, data / (m * 1000), qd, e2e))
    med[mode] = (statistics.median(data / (int(r[3]) * 1000) for r in runs),
                 statistics.median(int(r[0]) for r in runs),
                 statistics.median(int(r[1]) for r in runs))
print()
print("medians: " + ", ".join("%s %.0f MB/s, total %d ms, downtime %d ms" % (m, *v) for m, v in med.items()))
tm, tls, pl = med["trustmig"], med["nbd-tls"], med["nbd-plain"]
print("trustmig vs QEMU NBD with TLS: %.2fx disk throughput (target >= 1.5x), downtime %d vs %d ms (target: no worse)"
      % (tm[0] / tls[0], tm[2], tls[2]))
print("trustmig vs QEMU NBD plain:    %.2fx disk throughput, downtime %d vs %d ms" % (tm[0] / pl[0], tm[2], pl[2]))
e2e = {m: statistics.median(int(r[5]) for r in rows if r[0] == m) for m in ("trustmig", "trustmig-full")}
print("verify = full (both hosts hash the %d MiB image with the guest stopped): downtime from STOP to Resumed %d ms"
      " against %d ms with the stream digests alone" % (int(os.environ["DATA"]) * 2, e2e["trustmig-full"], e2e["trustmig"]))
'
echo "(disk MB/s: the image's data over the time from the mirror's start to its ready;"
echo " downtime_ms: the source QEMU's query-migrate; e2e_downtime: trustmig from STOP to the destination's Resumed)"
