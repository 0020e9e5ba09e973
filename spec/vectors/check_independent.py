#!/usr/bin/env python3
"""Recompute spec/vectors/protocol.json from SPEC.md with Python's standard library only.

An independent implementation of the key schedule (SPEC.md §6.4), qualifying data (§6.1),
event digests (§6.2) and the final image digest (§8.5): if the Rust code and this script agree,
the spec text, not just one implementation, defines the bytes. AES-GCM records are checked by
the Rust tests (the standard library has no AES).
"""
import hashlib, hmac, json, os, sys

V = json.load(open(os.path.join(os.path.dirname(__file__), "protocol.json")))
b = bytes.fromhex

def hkdf_expand(prk, info, n):
    out, t, i = b"", b"", 1
    while len(out) < n:
        t = hmac.new(prk, t + info + bytes([i]), hashlib.sha256).digest()
        out += t
        i += 1
    return out[:n]

def expand(prk, label, ctx, n):
    return hkdf_expand(prk, b"trustmig v1 " + label + ctx, n)

def sha256(*parts):
    return hashlib.sha256(b"".join(parts)).digest()

failures = []
def check(name, got, want):
    if got.hex() != want:
        failures.append(f"{name}: spec gives {got.hex()}, vector has {want}")

ks = V["key_schedule"]
prk = hmac.new(b(ks["transcript_hash"]), b(ks["tls_exporter"]), hashlib.sha256).digest()
check("prk", prk, ks["prk"])
check("session_id", expand(prk, b"session id", b"", 16), ks["session_id"])
check("confirm_source", expand(prk, b"confirm source", b"", 32), ks["confirm_source"])
check("confirm_destination", expand(prk, b"confirm destination", b"", 32), ks["confirm_destination"])
fin = hmac.new(expand(prk, b"confirm source", b"", 32), b"trustmig finished" + b(ks["transcript_hash"]), hashlib.sha256).digest()
check("finished_source", fin, ks["finished_source"])
k0 = expand(prk, b"stream key", bytes([0, 0, 0]), 32)
check("s2d_stream0_key", k0, ks["s2d_stream0_key"])
check("s2d_stream0_iv", expand(prk, b"stream iv", bytes([0, 0, 0]), 12), ks["s2d_stream0_iv"])
check("s2d_stream0_epoch1_key", expand(k0, b"key update", b"", 32), ks["s2d_stream0_epoch1_key"])
check("s2d_stream0_epoch1_iv", expand(k0, b"iv update", b"", 12), ks["s2d_stream0_epoch1_iv"])
check("d2s_stream1_key", expand(prk, b"stream key", bytes([1, 0, 1]), 32), ks["d2s_stream1_key"])
check("d2s_stream1_iv", expand(prk, b"stream iv", bytes([1, 0, 1]), 12), ks["d2s_stream1_iv"])

rec = V["records"]
r0 = b(rec["record0_pages"])
pt = b(rec["record0_plaintext"])
want_header = bytes([1, 2, 0, 0]) + (0).to_bytes(8, "big") + (len(pt) + 16).to_bytes(4, "big")
if r0[:16] != want_header or len(r0) != 16 + len(pt) + 16:
    failures.append(f"record0 header {r0[:16].hex()} != {want_header.hex()}")

at = V["attestation"]
args = (b"\x03" * 32, b"\x04" * 32, b"\x05" * 16, b"\x06" * 32)
check("qd handshake", sha256(b"trustmig attest v1", *args), at["qualifying_data_handshake"])
check("qd final", sha256(b"trustmig final v1", *args), at["qualifying_data_final"])
check("event agent-executable", sha256(b"trustmig event agent-executable", b"\x07" * 32), at["event_agent_executable_0x07"])
check("event image-manifest", sha256(b"trustmig event image-manifest", b"\x07" * 32), at["event_image_manifest_0x07"])

im = V["image_digest"]
final = sha256(b"trustmig image v1", b(im["transcript_hash"]), im["page_size"].to_bytes(4, "big"),
               im["page_count"].to_bytes(8, "big"), b(im["pages_root"]), sha256(b(im["device_state"])))
check("final image digest", final, im["final"])

hv = V["hvstream"]
stream = b(hv["stream"])
check("hvstream final digest", sha256(b"trustmig hvstream v1", b(hv["transcript_hash"]),
      len(stream).to_bytes(8, "big"), sha256(stream)), hv["final"])

if failures:
    print("\n".join(failures))
    sys.exit(1)
print("spec/vectors/protocol.json: every vector recomputed independently from SPEC.md")
