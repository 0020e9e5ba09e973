#!/usr/bin/env python3
"""Drive one QEMU-native migration for bench/qemu.sh and time it as the guest sees it.

Usage: native_migrate.py SRC_QMP DST_QMP URI DOWNTIME_MS LADDER(0|1) QEMU_PIDS [SRC_CMD_JSON]
  QEMU_PIDS: the two QEMUs' process ids, comma-separated, for the CPU accounting.

The destination must already be listening (migrate-incoming done). This connects to both
monitors, turns on `events` on both (so the destination announces its own completion), starts
the migration, runs trustmig's downtime ladder when asked (a step at each `MIGRATION_PASS`,
the event QEMU sends at each dirty-bitmap sync, as the source agent does), and sends the
destination `cont` the moment it announces `completed`, as a management layer at its quickest
would.

Prints: total_ms e2e_ms bytes downtime_ms e2e_ms total_ms after_ms cpu_ms busy qemu syncs
  total_ms, bytes, downtime_ms: the source's query-migrate (its downtime ends when the last byte
  left the source: without return-path that is before the destination has loaded it);
  e2e_ms: from the source's STOP to the destination's RESUME, both by QEMU's own event
  timestamps (the same clock: one host), which is the downtime the guest sees;
  after_ms: from the destination's `completed` to its RESUME (QEMU stamps);
  cpu_ms, busy, qemu: from just before `migrate` to the RESUME, its length (ms), the CPU time
  the whole machine was busy and that the two QEMUs used (clock ticks), counted as
  bench_trustmig counts them (`cpu_ticks`);
  syncs: the source's dirty-sync-count at the end (its dirty-bitmap syncs, the last one while
  the guest was stopped).
"""
import json
import select
import socket
import sys
import time


class Qmp:
    """A QMP client with its own line buffer, so waiting for an event can use select()."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.buf = b""
        self.events = []
        self.line(None)  # greeting
        self.cmd("qmp_capabilities")

    def line(self, timeout):
        """The next message, or None after `timeout` seconds (None: wait for ever)."""
        while b"\n" not in self.buf:
            ready, _, _ = select.select([self.sock], [], [], timeout)
            if not ready:
                return None
            chunk = self.sock.recv(65536)
            if not chunk:
                raise SystemExit("native_migrate: QEMU closed its monitor")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name, **args):
        self.sock.sendall((json.dumps({"execute": name, "arguments": args}) + "\n").encode())
        while True:
            reply = self.line(None)
            if "event" in reply:
                self.events.append(reply)
            elif "error" in reply:
                raise SystemExit(f"native_migrate: {name}: {reply['error']}")
            else:
                return reply["return"]

    def event(self, timeout):
        """The next event, or None after `timeout` seconds without one."""
        if self.events:
            return self.events.pop(0)
        return self.line(timeout)


def stamp(ev):
    return ev["timestamp"]["seconds"] + ev["timestamp"]["microseconds"] / 1e6


def cpu_ticks(pids):
    """(busy ticks of the whole machine, utime + stime ticks of `pids`), as `cpu_ticks` in
    agent/tests/qemu.rs: /proc/stat without idle and iowait; /proc/PID/stat fields 14 and 15."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:9]]
    busy = sum(fields) - fields[3] - fields[4]
    own = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        own += int(rest[11]) + int(rest[12])
    return busy, own


def ladder_step(downtime, sync):
    """trustmig's ladder (agent/src/backend/qemu/source.rs, `downtime_step` with 3 steps):
    1 ms during the first pass, then the target halved 3 - rounds times, rounds = dirty
    syncs - 1."""
    rounds = max(0, sync - 1)
    if rounds == 0:
        return min(1, downtime)
    return min(downtime, max(1, downtime >> max(0, 3 - rounds)))


def main():
    src_path, dst_path, uri, downtime, ladder, pids = sys.argv[1:7]
    downtime, ladder = int(downtime), ladder == "1"
    pids = [int(p) for p in pids.split(",")]
    extra = json.loads(sys.argv[7]) if len(sys.argv) > 7 else None
    # Without the ladder QEMU's downtime-limit is the target from the start, as QEMU is run
    # by default; with it, the ladder's first step.
    limit = ladder_step(downtime, 0) if ladder else downtime
    src, dst = Qmp(src_path), Qmp(dst_path)
    events = [{"capability": "events", "state": True}]
    src.cmd("migrate-set-capabilities", capabilities=events)
    dst.cmd("migrate-set-capabilities", capabilities=events)
    if extra:
        src.cmd(extra["execute"], **extra.get("arguments", {}))
    src.cmd("migrate-set-parameters", **{"downtime-limit": limit, "max-bandwidth": 1 << 40})
    cpu_from, cpu_before = time.monotonic(), cpu_ticks(pids)
    src.cmd("migrate", uri=uri)
    stopped = None
    deadline = time.monotonic() + 300
    while True:
        ev = src.event(max(0.0, deadline - time.monotonic()))
        if ev is None or time.monotonic() > deadline:
            raise SystemExit("native_migrate: QEMU did not finish in 300 s "
                             "(the guest dirties faster than this transport sends: lower RATE)")
        if ev["event"] == "STOP":
            stopped = stamp(ev)
        elif ev["event"] == "MIGRATION" and ev["data"]["status"] in ("failed", "cancelled"):
            raise SystemExit(f"native_migrate: migration {ev['data']['status']}")
        elif ev["event"] == "MIGRATION" and ev["data"]["status"] == "completed":
            break
        elif ev["event"] == "MIGRATION_PASS" and ladder and stopped is None:
            # `pass` is QEMU's dirty-sync-count after this sync.
            step = ladder_step(downtime, ev["data"]["pass"])
            if step != limit:
                limit = step
                src.cmd("migrate-set-parameters", **{"downtime-limit": limit})
    while True:
        ev = dst.event(60)
        if ev is None:
            raise SystemExit("native_migrate: the destination did not complete within 60 s")
        if ev["event"] == "MIGRATION" and ev["data"]["status"] == "completed":
            loaded = stamp(ev)
            break
        if ev["event"] == "MIGRATION" and ev["data"]["status"] == "failed":
            raise SystemExit("native_migrate: the destination failed to load")
    dst.cmd("cont")
    while True:
        ev = dst.event(10)
        if ev is None:
            raise SystemExit("native_migrate: no RESUME from the destination within 10 s")
        if ev["event"] == "RESUME":
            resumed = stamp(ev)
            break
    cpu_after, cpu_ms = cpu_ticks(pids), round((time.monotonic() - cpu_from) * 1000)
    info = src.cmd("query-migrate")
    if stopped is None:
        raise SystemExit("native_migrate: the source never announced STOP")
    e2e = round((resumed - stopped) * 1000)
    # As bench_trustmig prints its BENCH line: total, end to end, bytes, QEMU's own downtime,
    # end to end by QEMU's timestamps, QEMU's total (the same figures here), and the time from
    # the destination's completion to its RESUME (what a management layer adds).
    print(info["total-time"], e2e, info["ram"]["transferred"], info["downtime"], e2e,
          info["total-time"], "%.1f" % ((resumed - loaded) * 1000), cpu_ms,
          cpu_after[0] - cpu_before[0], cpu_after[1] - cpu_before[1],
          info["ram"]["dirty-sync-count"])


if __name__ == "__main__":
    main()
