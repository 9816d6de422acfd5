#!/usr/bin/env python3
"""Regenerate the DSSEFS v1 golden objects in ``dssefs_v1_golden.json``.

Run by hand only, after a deliberate format decision::

    python tests/vectors/generate.py           # rewrite the JSON file
    python tests/vectors/generate.py --check   # exit 1 if the file differs

The test suite never rewrites the file: ``tests/test_envelope_vectors.py`` calls :func:`build` and
compares, and separately re-encrypts and decrypts every case.  Every random input of the writer is
injected (data keys, file_id, msg_id, attribute nonce), so the output is fully deterministic.

The local-keyring cases carry real wrapped keys made from fixed master keys and fixed wrapping
nonces exactly as docs/format.md section 10 describes (computed here with ``cryptography`` directly,
not through dssefs), so a reader can go from master key to plaintext.  The KMS case carries fixed
fake blobs: they document the metadata encoding and budget and are not unwrappable.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dssefs.envelope import codec
from dssefs.envelope import format as fmt
from dssefs.envelope.codec import ObjectCipher
from dssefs.envelope.inner import InnerAEAD
from dssefs.envelope.metadata import Envelope

OUT = Path(__file__).with_name("dssefs_v1_golden.json")

DK_INNER = bytes(range(0x00, 0x20))
DK_OUTER = bytes(range(0x40, 0x60))
FILE_ID = bytes.fromhex("f0e1d2c3b4a5968778695a4b3c2d1e0f")
# Opaque to the envelope; the file system layer defines what it holds.
ATTRS_PLAINTEXT = b'{"gid":1000,"mode":33188,"mtime_ns":1700000000123456789,"uid":1000}'


def _sha(label: str) -> bytes:
    return hashlib.sha256(label.encode("ascii")).digest()


def plaintext(n: int) -> bytes:
    """The deterministic plaintext of every case: byte i is i mod 251."""
    return bytes(i % 251 for i in range(n))


def _fake_wrapped(label: str, size: int) -> bytes:
    out = b""
    counter = 0
    while len(out) < size:
        out += _sha(f"dssefs golden fake wrapped key {label} {counter}")
        counter += 1
    return out[:size]


BUCKET = "golden-bucket"
KEY_NAMES = ("golden-inner", "golden-outer")


def master_key(name: str) -> bytes:
    return _sha(f"dssefs golden keyring master key {name}")


def context(layer: str, object_key: str) -> dict[str, str]:
    return {"dssefs:v": "1", "dssefs:layer": layer, "dssefs:bucket": BUCKET, "dssefs:key": object_key}


def local_wrap_aad(name: str, ctx: dict[str, str]) -> bytes:
    canon = json.dumps(ctx, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    return b"\x01" + name.encode("ascii") + b"\x00" + canon


def local_wrap(name: str, ctx: dict[str, str], data_key: bytes, nonce: bytes) -> bytes:
    return b"\x01" + nonce + AESGCM(master_key(name)).encrypt(nonce, data_key, local_wrap_aad(name, ctx))


def cases() -> list[dict]:
    cs = 1 << 12
    specs = [(f"cs12-len{n}", 12, n, "local") for n in (0, 1, cs - 1, cs, cs + 1, 2 * cs, 3 * cs - 1)]
    specs.append(("cs20-len5-kms", 20, 5, "kms"))
    out = []
    for generation, (name, chunk_log2, length, provider) in enumerate(specs, start=1):
        object_key = f"golden/{name}.bin"
        if provider == "local":
            ids = KEY_NAMES
            wrapped = tuple(
                local_wrap(kname, context(layer, object_key), dk,
                           _sha(f"dssefs golden wrap nonce {name} {layer}")[:12])
                for kname, layer, dk in ((KEY_NAMES[0], "inner", DK_INNER), (KEY_NAMES[1], "outer", DK_OUTER)))
        else:
            # roughly the size of an AWS KMS CiphertextBlob for a 32-byte data key
            ids = ("arn:aws:kms:eu-west-1:111122223333:key/0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
                   "arn:aws:kms:eu-west-1:111122223333:key/1f2e3d4c-5b6a-7988-97a6-b5c4d3e2f1a0")
            wrapped = (_fake_wrapped(name + " inner", 184), _fake_wrapped(name + " outer", 184))
        out.append(dict(name=name, chunk_log2=chunk_log2, plaintext_len=length, generation=generation,
                        msg_id=_sha(f"dssefs golden msg_id {name}"),
                        attrs_nonce=_sha(f"dssefs golden attrs nonce {name}")[:12],
                        provider=provider, key_ids=ids, wrapped=wrapped, object_key=object_key))
    return out


def build_case(spec: dict) -> dict:
    pt = plaintext(spec["plaintext_len"])
    cipher = ObjectCipher.new_version(DK_INNER, DK_OUTER, plaintext_len=len(pt), file_id=FILE_ID,
                                      generation=spec["generation"], chunk_log2=spec["chunk_log2"],
                                      msg_id=spec["msg_id"])
    suite = cipher.header.suite
    k_in, c_in, a_in = codec._derive_inner(DK_INNER, spec["msg_id"], suite, cipher.header.bound_fields())
    k_out, c_out, a_out = codec._derive_outer(DK_OUTER, spec["msg_id"], suite, cipher.header.bound_fields())
    body = bytearray()
    chunks = []
    cs = cipher.chunk_size
    for i in range(cipher.n_chunks):
        piece = pt[i * cs:i * cs + cipher.chunk_plain_len(i)]
        final = i == cipher.n_chunks - 1
        aad_in = fmt.chunk_aad(fmt.aad_prefix(suite, fmt.LAYER_INNER, cipher.digest), i, final)
        aad_out = fmt.chunk_aad(fmt.aad_prefix(suite, fmt.LAYER_OUTER, cipher.digest), i, final)
        inner_sealed = bytearray(len(piece) + fmt.TAG_BYTES)
        InnerAEAD(k_in).encrypt_into(fmt.chunk_nonce(i), piece, aad_in, inner_sealed)
        sealed = cipher.seal_chunk(i, piece)
        assert len(body) == cipher.chunk_body_offset(i)
        chunks.append({
            "index": i, "body_offset": len(body), "plain_len": len(piece), "final": final,
            "nonce": fmt.chunk_nonce(i).hex(), "aad_inner": aad_in.hex(), "aad_outer": aad_out.hex(),
            "inner_tag": bytes(inner_sealed[-16:]).hex(), "outer_tag": bytes(sealed[-16:]).hex(),
        })
        body += sealed
    assert len(body) == cipher.body_size
    attrs_blob = cipher.seal_attrs(ATTRS_PLAINTEXT, nonce=spec["attrs_nonce"])
    env = Envelope(header=cipher.header, provider=spec["provider"], key_id_inner=spec["key_ids"][0],
                   key_id_outer=spec["key_ids"][1], wrapped_inner=spec["wrapped"][0],
                   wrapped_outer=spec["wrapped"][1], attrs=attrs_blob)
    meta = env.to_metadata()
    return {
        "name": spec["name"],
        "chunk_log2": spec["chunk_log2"],
        "plaintext_len": len(pt),
        "plaintext_sha256": hashlib.sha256(pt).hexdigest(),
        "generation": spec["generation"],
        "dk_inner": DK_INNER.hex(),
        "dk_outer": DK_OUTER.hex(),
        "file_id": FILE_ID.hex(),
        "msg_id": spec["msg_id"].hex(),
        "derived": {
            "inner": {"key": k_in.hex(), "commit": c_in.hex(), "attrs_key": a_in.hex()},
            "outer": {"key": k_out.hex(), "commit": c_out.hex(), "attrs_key": a_out.hex()},
        },
        "header_hex": cipher.header_bytes.hex(),
        "header_sha256": cipher.digest.hex(),
        "aad_prefix_inner": fmt.aad_prefix(suite, fmt.LAYER_INNER, cipher.digest).hex(),
        "aad_prefix_outer": fmt.aad_prefix(suite, fmt.LAYER_OUTER, cipher.digest).hex(),
        "n_chunks": cipher.n_chunks,
        "chunks": chunks,
        "body_size": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest(),
        "body_hex": bytes(body).hex(),
        "attrs_plaintext": ATTRS_PLAINTEXT.hex(),
        "attrs_nonce": spec["attrs_nonce"].hex(),
        "attrs_blob_hex": attrs_blob.hex(),
        "bucket": BUCKET,
        "object_key": spec["object_key"],
        "provider": spec["provider"],
        "key_id_inner": spec["key_ids"][0],
        "key_id_outer": spec["key_ids"][1],
        "wrapped_inner": spec["wrapped"][0].hex(),
        "wrapped_outer": spec["wrapped"][1].hex(),
        "wrapped_keys_real": spec["provider"] == "local",
        "metadata": meta,
        "metadata_bytes": sum(len(k) + len(v) for k, v in meta.items()),
    }


def build() -> dict:
    return {
        "format": "DSSEFS v1",
        "suite": fmt.SUITE_DUAL_AES256GCM_HKDF_SHA512_COMMIT,
        "spec": "docs/format.md",
        "plaintext": "byte i of every case's plaintext is i mod 251",
        "wrapped_keys": "local cases: real local-keyring blobs under the master keys below; "
                        "kms case: fixed fake blobs (not unwrappable) showing the encoding and size",
        "keyring": {name: master_key(name).hex() for name in KEY_NAMES},
        "cases": [build_case(spec) for spec in cases()],
    }


def render() -> str:
    return json.dumps(build(), indent=1, sort_keys=False) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        same = OUT.exists() and OUT.read_text() == text
        print("golden vectors up to date" if same else "golden vectors differ from the generator")
        return 0 if same else 1
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
