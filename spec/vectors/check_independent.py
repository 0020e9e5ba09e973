#!/usr/bin/env python3
"""Recompute spec/vectors/protocol.json from SPEC.md with Python's standard library only.

An independent implementation of the key schedule (SPEC.md §6.4), qualifying data (§6.1),
event digests (§6.2) and the final image digest (§8.5): if the Rust code and this script agree,
the spec text, not just one implementation, defines the bytes. AES-GCM records are checked by
the Rust tests (the standard library has no AES). The standard library has no BLAKE3 either, so
a plain transcription of the BLAKE3 paper's hash mode is below (checked against the official
test vectors before it is used).
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

# BLAKE3 (hash mode, 32-byte output), after the reference implementation in the BLAKE3 paper.
B3_IV = [0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19]
B3_PERM = [2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8]
CHUNK_START, CHUNK_END, PARENT, ROOT = 1, 2, 4, 8
M32 = 0xFFFFFFFF

def b3_compress(cv, block, counter, block_len, flags):
    m = [int.from_bytes(block[i:i + 4], "little") for i in range(0, 64, 4)]
    v = cv[:] + B3_IV[:4] + [counter & M32, counter >> 32, block_len, flags]
    def g(a, b_, c, d, x, y):
        v[a] = (v[a] + v[b_] + x) & M32; v[d] = ((v[d] ^ v[a]) >> 16 | (v[d] ^ v[a]) << 16) & M32
        v[c] = (v[c] + v[d]) & M32; v[b_] = ((v[b_] ^ v[c]) >> 12 | (v[b_] ^ v[c]) << 20) & M32
        v[a] = (v[a] + v[b_] + y) & M32; v[d] = ((v[d] ^ v[a]) >> 8 | (v[d] ^ v[a]) << 24) & M32
        v[c] = (v[c] + v[d]) & M32; v[b_] = ((v[b_] ^ v[c]) >> 7 | (v[b_] ^ v[c]) << 25) & M32
    for r in range(7):
        g(0, 4, 8, 12, m[0], m[1]); g(1, 5, 9, 13, m[2], m[3]); g(2, 6, 10, 14, m[4], m[5]); g(3, 7, 11, 15, m[6], m[7])
        g(0, 5, 10, 15, m[8], m[9]); g(1, 6, 11, 12, m[10], m[11]); g(2, 7, 8, 13, m[12], m[13]); g(3, 4, 9, 14, m[14], m[15])
        m = [m[i] for i in B3_PERM]
    return [v[i] ^ v[i + 8] for i in range(8)]

def b3_words(words):
    return b"".join(w.to_bytes(4, "little") for w in words)

def b3_chunk(data, index, root):
    cv, blocks = B3_IV[:], [data[i:i + 64] for i in range(0, len(data), 64)] or [b""]
    for i, blk in enumerate(blocks):
        flags = (CHUNK_START if i == 0 else 0) | (CHUNK_END if i == len(blocks) - 1 else 0)
        if root and i == len(blocks) - 1:
            flags |= ROOT
        cv = b3_compress(cv, blk.ljust(64, b"\0"), index, len(blk), flags)
    return cv

def b3_tree(chunks, first, root):
    if len(chunks) == 1:
        return b3_chunk(chunks[0], first, root)
    left = 1 << ((len(chunks) - 1).bit_length() - 1)  # largest power of two < len(chunks)
    block = b3_words(b3_tree(chunks[:left], first, False)) + b3_words(b3_tree(chunks[left:], first + left, False))
    return b3_compress(B3_IV[:], block, 0, 64, PARENT | (ROOT if root else 0))

def blake3(data):
    chunks = [data[i:i + 1024] for i in range(0, len(data), 1024)] or [b""]
    return b3_words(b3_tree(chunks, 0, True))

failures = []
def check(name, got, want):
    if got.hex() != want:
        failures.append(f"{name}: spec gives {got.hex()}, vector has {want}")

# The official BLAKE3 test vectors (input byte i = i % 251) at lengths that exercise one block,
# several blocks, one chunk, and trees of 2, 3 and 8 chunks.
B3_OFFICIAL = {
    0: "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262",
    1: "2d3adedff11b61f14c886e35afa036736dcd87a74d27b5c1510225d0f592e213",
    1023: "10108970eeda3eb932baac1428c7a2163b0e924c9a9e25b35bba72b28f70bd11",
    1025: "d00278ae47eb27b34faecf67b4fe263f82d5412916c1ffd97c8cb7fb814b8444",
    3072: "b98cb0ff3623be03326b373de6b9095218513e64f1ee2edd2525c7ad1e5cffd2",
    8192: "aae792484c8efe4f19e2ca7d371d8c467ffb10748d8a5a1ae579948f718a2a63",
}
for n, want in B3_OFFICIAL.items():
    check(f"BLAKE3 official vector, {n} bytes", blake3(bytes(i % 251 for i in range(n))), want)

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
      len(stream).to_bytes(8, "big"), blake3(stream)), hv["final"])

def cbor_head(major, n):
    if n < 24:
        return bytes([major << 5 | n])
    for ai, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if n < 1 << (8 * size):
            return bytes([major << 5 | ai]) + n.to_bytes(size, "big")


def cbor(v):
    """The CBOR subset the manifest uses (SPEC.md §6.3, messages.cddl): maps in field order."""
    if v is True:
        return b"\xf5"  # simple value 21 (true)
    if isinstance(v, bool) or v is None:
        raise ValueError(v)
    if isinstance(v, int):
        return cbor_head(0, v)
    if isinstance(v, bytes):
        return cbor_head(2, len(v)) + v
    if isinstance(v, str):
        return cbor_head(3, len(v.encode())) + v.encode()
    if isinstance(v, list):
        return cbor_head(4, len(v)) + b"".join(cbor(x) for x in v)
    return cbor_head(5, len(v)) + b"".join(cbor(k) + cbor(x) for k, x in v.items())


# With mirrored disks (spec/qemu.md §5): v2 binds both directions of each disk's NBD stream.
def part(data):
    return len(data).to_bytes(8, "big") + blake3(data)


# The source's handshake qualifying data with its final key, and the final signature's input
# (SPEC.md §5.2 S4, §8.7). The ed25519 signature itself is checked by the Rust vector test.
check("QD_S source handshake", sha256(b"trustmig attest v1", b"\x03" * 32, b"\x04" * 32, b"\x05" * 16,
                                      b"\x06" * 32, b(at["final_key"])), at["qualifying_data_handshake_source"])
check("final signature input", b"trustmig final signature v1" + b"\x0a" * 32 + b"\x0b" * 32 + b"\x0c" * 16
      + b"\x0d" * 32 + b"\x0e" * 32, at["final_signature_input"])

check("hvstream final digest with one mirrored disk",
      sha256(b"trustmig hvstream v2", b(hv["transcript_hash"]), part(stream), (1).to_bytes(2, "big"),
             part(b(hv["nbd_to_destination"])), part(b(hv["nbd_to_source"]))),
      hv["final_with_disk"])
mirror_manifest = cbor({"vm": "vm1", "config_digest": b"\x08" * 32, "chunk_size": 1 << 20, "disks": [],
                        "mirrors": [{"name": "d0", "format": "qcow2", "virtual_size": 1 << 30}]})
check("manifest with a mirrored disk", mirror_manifest, hv["manifest_with_mirror"])
check("its root", sha256(b"trustmig manifest v1", mirror_manifest), hv["manifest_with_mirror_root"])
# The disk verified in full (verify = "full"): its entry says so, and the final digest binds
# the image's guest-visible content as a third part after the two NBD directions.
check("hvstream final digest with a disk verified in full",
      sha256(b"trustmig hvstream v2", b(hv["transcript_hash"]), part(stream), (1).to_bytes(2, "big"),
             part(b(hv["nbd_to_destination"])), part(b(hv["nbd_to_source"])), part(b(hv["image"]))),
      hv["final_with_disk_verified_in_full"])
check("manifest with a disk verified in full",
      cbor({"vm": "vm1", "config_digest": b"\x08" * 32, "chunk_size": 1 << 20, "disks": [],
            "mirrors": [{"name": "d0", "format": "qcow2", "virtual_size": 1 << 30, "verify_full": True}]}),
      hv["manifest_with_full_verify"])

if failures:
    print("\n".join(failures))
    sys.exit(1)
print("spec/vectors/protocol.json: every vector recomputed independently from SPEC.md")
