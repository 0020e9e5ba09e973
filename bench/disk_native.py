#!/usr/bin/env python3
"""One live migration with a writable local disk using QEMU's own transports, the way libvirt's
`--copy-storage-all` does it: the destination QEMU (-incoming defer -S) creates nothing itself,
its image is made with qemu-img, opened, attached and exported over NBD; the source mirrors into
it (blockdev-mirror sync=full, copy-mode background) until ready, migrates memory with
pause-before-switchover, cancels the ready mirror with the guest stopped, then lets QEMU finish.

usage: disk_native.py WORKDIR MODE DISK_MIB GUEST_ELF MEM_MIB
  MODE plain: NBD and migration over unix sockets; tls: both over TCP with tls-creds-x509
  (WORKDIR/pki holds ca-cert.pem, server-*.pem, client-*.pem).
prints: total_ms qemu_downtime_ms disk_bytes mirror_ms
The guest's disk is written 64 KiB every 10 ms through its virtio-blk device (HMP qemu-io on a
second monitor) for the whole migration, as bench_trustmig_disk does.
"""
import json
import os
import socket
import subprocess
import sys
import threading
import time

W, MODE, DISK_MIB, GUEST, MEM = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]


class Qmp:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        for _ in range(400):
            try:
                self.s.connect(path)
                break
            except OSError:
                time.sleep(0.05)
        self.f = self.s.makefile("rw")
        self.f.readline()
        self.x("qmp_capabilities")

    def x(self, cmd, **args):
        self.f.write(json.dumps({"execute": cmd, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "event" in r:
                continue
            if "error" in r:
                raise RuntimeError(f"{cmd}: {r['error']}")
            return r["return"]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run(*args):
    subprocess.run(args, check=True, capture_output=True)


src_img, dst_img = f"{W}/src.raw", f"{W}/dst.raw"
q = DISK_MIB // 4
run("qemu-img", "create", "-q", "-f", "raw", src_img, f"{DISK_MIB}M")
run("qemu-io", "-f", "raw", "-c", f"write -P 0x41 0 {q}M", "-c", f"write -P 0x42 {2 * q}M {q}M", src_img)
run("qemu-img", "create", "-q", "-f", "raw", dst_img, f"{DISK_MIB}M")

tls = MODE == "tls"
common = ["qemu-system-x86_64", "-accel", "tcg", "-m", MEM, "-nodefaults", "-display", "none",
          "-kernel", GUEST, "-append", "area=16 rate=0 check=1000000"]
procs = []
src_args = common + [
    "-blockdev", f"driver=raw,node-name=d0,file.driver=file,file.filename={src_img}",
    "-device", "virtio-blk-pci,drive=d0,id=vd0,addr=0x5",
    "-qmp", f"unix:{W}/src.qmp,server=on,wait=off", "-qmp", f"unix:{W}/src2.qmp,server=on,wait=off"]
dst_args = common + ["-mem-prealloc", "-qmp", f"unix:{W}/dst.qmp,server=on,wait=off", "-incoming", "defer", "-S"]
if tls:
    src_args += ["-object", f"tls-creds-x509,id=tls0,dir={W}/pki,endpoint=client"]
    dst_args += ["-object", f"tls-creds-x509,id=tls0,dir={W}/pki,endpoint=server,verify-peer=on"]
for args, log in ((src_args, "src"), (dst_args, "dst")):
    procs.append(subprocess.Popen(args, stdout=open(f"{W}/{log}.log", "w"), stderr=subprocess.STDOUT))
try:
    src, dst, writer_qmp = Qmp(f"{W}/src.qmp"), Qmp(f"{W}/dst.qmp"), Qmp(f"{W}/src2.qmp")
    time.sleep(0.5)  # the guest boots
    stop = threading.Event()

    def write():
        k = 0
        while not stop.is_set():
            time.sleep(0.01)
            if not writer_qmp.x("query-status")["running"]:
                continue
            off = (k * 7 % 200) * 65536
            writer_qmp.x("human-monitor-command",
                         **{"command-line": f'qemu-io -d vd0/virtio-backend "write -P {k % 250 + 1} {off} 64k"'})
            k += 1

    threading.Thread(target=write, daemon=True).start()
    started = time.monotonic()
    dst.x("blockdev-add", driver="raw", **{"node-name": "d0"}, file={"driver": "file", "filename": dst_img})
    dst.x("device_add", driver="virtio-blk-pci", drive="d0", id="vd0", addr="0x5")
    if tls:
        nbd_port, mig_port = free_port(), free_port()
        dst.x("nbd-server-start", addr={"type": "inet", "data": {"host": "127.0.0.1", "port": str(nbd_port)}},
              **{"tls-creds": "tls0"})
        server = {"type": "inet", "host": "127.0.0.1", "port": str(nbd_port)}
        extra = {"tls-creds": "tls0", "tls-hostname": "localhost"}
        dst.x("migrate-set-parameters", **{"tls-creds": "tls0"})
        src.x("migrate-set-parameters", **{"tls-creds": "tls0", "tls-hostname": "localhost"})
        uri = f"tcp:127.0.0.1:{mig_port}"
    else:
        dst.x("nbd-server-start", addr={"type": "unix", "data": {"path": f"{W}/nbd.sock"}})
        server, extra = {"type": "unix", "path": f"{W}/nbd.sock"}, {}
        uri = f"unix:{W}/mig.sock"
    dst.x("block-export-add", type="nbd", id="e0", **{"node-name": "d0"}, name="d0", writable=True)
    src.x("blockdev-add", driver="nbd", **{"node-name": "n0"}, server=server, export="d0", **extra)
    src.x("blockdev-mirror", **{"job-id": "m0", "device": "d0", "target": "n0", "sync": "full",
                                "copy-mode": "background", "auto-dismiss": False})
    while not any(j["id"] == "m0" and j["status"] == "ready" for j in src.x("query-jobs")):
        time.sleep(0.005)
    mirror_ms = (time.monotonic() - started) * 1000
    src.x("migrate-set-capabilities", capabilities=[{"capability": "pause-before-switchover", "state": True}])
    src.x("migrate-set-parameters", **{"downtime-limit": 300, "max-bandwidth": 1 << 40})
    dst.x("migrate-set-capabilities", capabilities=[{"capability": "late-block-activate", "state": True}])
    dst.x("migrate-incoming", uri=uri)
    src.x("migrate", uri=uri)
    while src.x("query-migrate")["status"] != "pre-switchover":
        time.sleep(0.001)
    src.x("block-job-cancel", device="m0")
    while any(j["id"] == "m0" and j["status"] != "concluded" for j in src.x("query-jobs")):
        time.sleep(0.001)
    src.x("job-dismiss", id="m0")
    src.x("blockdev-del", **{"node-name": "n0"})
    src.x("migrate-continue", state="pre-switchover")
    while (info := src.x("query-migrate"))["status"] not in ("completed", "failed"):
        time.sleep(0.002)
    if info["status"] != "completed":
        sys.exit(f"migration {info['status']}: {info}")
    while dst.x("query-migrate")["status"] != "completed":
        time.sleep(0.002)
    dst.x("nbd-server-stop")
    dst.x("cont")
    total_ms = (time.monotonic() - started) * 1000
    stop.set()
    # The disk bytes QEMU copied: the allocated half of the image plus what the guest wrote.
    disk_bytes = DISK_MIB // 2 << 20
    print(int(total_ms), info["downtime"], disk_bytes, int(mirror_ms))
finally:
    for p in procs:
        p.kill()
