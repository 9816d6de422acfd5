#!/usr/bin/env python3
"""Regenerate the DSSEFS golden objects: ``dssefs_v1_golden.json`` and ``dssefs_v2_golden.json``.

Run by hand only, after a deliberate format decision::

    python tests/vectors/generate.py           # rewrite both JSON files
    python tests/vectors/generate.py --check   # exit 1 if either file differs

The test suite never rewrites the files: ``tests/test_envelope_vectors.py`` and
``tests/test_envelope_vectors_v2.py`` call :func:`render` / :func:`render_v2` and compare, and
separately re-encrypt and decrypt every case.  Every random input of the writer is injected (data
keys, file_id, msg_id, attribute nonce, wrapping nonces, epoch id and epoch keys), so the output is
fully deterministic.

Version 1: the local-keyring cases carry real wrapped keys made from fixed master keys and fixed
wrapping nonces exactly as docs/format.md section 10 describes (computed here with
``cryptography`` directly, not through dssefs), so a reader can go from master key to plaintext.
The KMS case carries fixed fake blobs: they document the metadata encoding and budget and are not
unwrappable.

Version 2 (docs/format.md section 17): every local case names an epoch whose record holds the two
epoch keys wrapped under the same keyring master keys as version 1 (the 69-byte blobs of 17.5, with
fixed nonces), and carries its data keys wrapped under those epoch keys (the 61-byte blobs of
17.4).  Both wrappings are computed here with ``cryptography`` directly from the specification, so
a case decodes from master key to epoch keys to data keys to plaintext.  The ``-attrs`` cases are
the next version of the case without the suffix after an attribute change (17.6): same object key,
message id, data keys, wrapped keys and body; new header (generation + 1, FLAG_ATTRS) and an
attribute blob.  The KMS case's epoch record carries fake 184-byte blobs and key ARNs (sizes only);
its epoch keys are listed, so its object decodes from the epoch keys down.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import sys
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dssefs.envelope import codec
from dssefs.envelope import format as fmt
from dssefs.envelope.codec import ObjectCipher
from dssefs.envelope.inner import InnerAEAD
from dssefs.envelope.metadata import Envelope, EpochRef
from dssefs.envelope.sparse import ChunkMap

OUT = Path(__file__).with_name("dssefs_v1_golden.json")
OUT_V2 = Path(__file__).with_name("dssefs_v2_golden.json")
OUT_SPARSE = Path(__file__).with_name("dssefs_v2_sparse_golden.json")

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
    cipher = ObjectCipher.new_version(DK_INNER, DK_OUTER, plaintext_len=len(pt), file_id=FILE_ID, version=1,
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


# ---- version 2 (docs/format.md section 17) -------------------------------------------------------

LAYERS = ("inner", "outer")
V2_CREATED = "2025-01-01T00:00:00Z"
V2_DOMAIN = b"dssefs2"
KMS_KEY_ARNS = ("arn:aws:kms:eu-west-1:111122223333:key/0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
                "arn:aws:kms:eu-west-1:111122223333:key/1f2e3d4c-5b6a-7988-97a6-b5c4d3e2f1a0")
# Appendix D's attribute plaintext: a 0644 regular file owned by 1000:1000.
ATTRS_PLAINTEXT_V2 = (b'{"m":33188,"u":1000,"g":1000,"a":1700000000123456789,"t":1700000000123456789,'
                      b'"c":1700000000123456789}')
# Where the epochs of the vectors live: the local epoch is the epoch of a mount of prefix
# "golden/" (depth 1; the objects are one level further down), the KMS epoch that of the whole
# bucket (prefix "", depth 0).
V2_EPOCHS = {"local": ("golden/", "local"), "kms": ("", "kms")}


def canonical_json(ctx: dict[str, str]) -> bytes:
    return json.dumps(ctx, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def keyring_check(name: str) -> bytes:
    """The keyring's key check value (appendix C), 8 bytes: the first bytes of the 69-byte blob."""
    return hmac.new(master_key(name), b"dssefs-keyring-check-v1", hashlib.sha256).digest()[:8]


def epoch_context(layer: str, prefix: str, epoch_hex: str) -> dict[str, str]:
    return {"dssefs:v": "2", "dssefs:layer": layer, "dssefs:bucket": BUCKET, "dssefs:prefix": prefix,
            "dssefs:epoch": epoch_hex}


def object_context_v2(layer: str, object_key: str, epoch_hex: str) -> dict[str, str]:
    return {"dssefs:v": "2", "dssefs:layer": layer, "dssefs:bucket": BUCKET, "dssefs:key": object_key,
            "dssefs:epoch": epoch_hex}


def keyring_wrap_v2_aad(name: str, ctx: dict[str, str]) -> bytes:
    return b"\x02" + name.encode("ascii") + b"\x00" + canonical_json(ctx)


def keyring_wrap_v2(name: str, ctx: dict[str, str], epoch_key: bytes, nonce: bytes) -> bytes:
    """17.5: ``0x02 || check (8) || nonce (12) || GCM-Enc(master, nonce, EK, AAD)``, 69 bytes."""
    sealed = AESGCM(master_key(name)).encrypt(nonce, epoch_key, keyring_wrap_v2_aad(name, ctx))
    return b"\x02" + keyring_check(name) + nonce + sealed


def dk_wrap_aad(ctx: dict[str, str]) -> bytes:
    return b"\x02" + canonical_json(ctx)


def dk_wrap(epoch_key: bytes, ctx: dict[str, str], data_key: bytes, nonce: bytes) -> bytes:
    """17.4: ``0x02 || nonce (12) || GCM-Enc(EK, nonce, DK, 0x02 || canonical JSON)``, 61 bytes."""
    return b"\x02" + nonce + AESGCM(epoch_key).encrypt(nonce, data_key, dk_wrap_aad(ctx))


def build_epoch(label: str) -> dict:
    prefix, provider = V2_EPOCHS[label]
    epoch_id = _sha(f"dssefs golden v2 epoch id {label}")[:16]
    eh = epoch_id.hex()
    keys = {layer: _sha(f"dssefs golden v2 epoch key {label} {layer}") for layer in LAYERS}
    ctxs = {layer: epoch_context(layer, prefix, eh) for layer in LAYERS}
    wrap = {}
    if provider == "local":
        ids = dict(zip(LAYERS, KEY_NAMES))
        for layer in LAYERS:
            nonce = _sha(f"dssefs golden v2 epoch wrap nonce {label} {layer}")[:12]
            blob = keyring_wrap_v2(ids[layer], ctxs[layer], keys[layer], nonce)
            assert len(blob) == 69
            wrap[layer] = {"check": keyring_check(ids[layer]).hex(), "nonce": nonce.hex(),
                           "aad": keyring_wrap_v2_aad(ids[layer], ctxs[layer]).hex(), "blob": blob.hex()}
    else:
        # roughly the size of an AWS KMS CiphertextBlob for a 32-byte key: encoding and size only
        ids = dict(zip(LAYERS, KMS_KEY_ARNS))
        for layer in LAYERS:
            wrap[layer] = {"check": None, "nonce": None, "aad": None,
                           "blob": _fake_wrapped(f"v2 epoch {label} {layer}", 184).hex()}
    record = {"format": "dssefs-epoch", "version": 2, "epoch": eh, "bucket": BUCKET, "prefix": prefix,
              "provider": provider, "created": V2_CREATED,
              "inner": {"key_id": ids["inner"], "wrapped": b64u(bytes.fromhex(wrap["inner"]["blob"]))},
              "outer": {"key_id": ids["outer"], "wrapped": b64u(bytes.fromhex(wrap["outer"]["blob"]))}}
    record_json = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return {
        "label": label,
        "epoch_id": eh,
        "prefix": prefix,
        "depth": prefix.count("/"),
        "record_key": prefix + ".dssefs/epochs/" + eh,
        "provider": provider,
        "created": V2_CREATED,
        "key_id_inner": ids["inner"],
        "key_id_outer": ids["outer"],
        "epoch_key_inner": keys["inner"].hex(),
        "epoch_key_outer": keys["outer"].hex(),
        "contexts": ctxs,
        "contexts_canonical": {layer: canonical_json(ctxs[layer]).decode("ascii") for layer in LAYERS},
        "wrap": wrap,
        "wrapped_keys_real": provider == "local",
        "record_json": record_json,
        "record_bytes": len(record_json),
    }


def cases_v2() -> list[dict]:
    cs = 1 << 12
    out = []
    generation = 1
    for n in (0, 1, cs - 1, cs, cs + 1, 3 * cs - 1):
        base = f"cs12-len{n}"
        common = dict(chunk_log2=12, plaintext_len=n, epoch="local", object=base)
        out.append(dict(common, name=base, generation=generation, with_attrs=False, successor_of=None))
        out.append(dict(common, name=base + "-attrs", generation=generation + 1, with_attrs=True,
                        successor_of=base))
        generation += 2
    out.append(dict(name="cs20-len5-attrs", object="cs20-len5-attrs", chunk_log2=20, plaintext_len=5,
                    epoch="local", generation=(1 << 40) + 5, with_attrs=True, successor_of=None))
    out.append(dict(name="cs20-len5-kms", object="cs20-len5-kms", chunk_log2=20, plaintext_len=5,
                    epoch="kms", generation=3, with_attrs=True, successor_of=None))
    return _with_inputs(out)


def _with_inputs(specs: list[dict]) -> list[dict]:
    """Every injected input of a version 2 case, derived from its object and case names."""
    for spec in specs:
        obj = spec["object"]  # a successor is the same object: same key, file, message id and keys
        spec.update(object_key=f"golden/v2/{obj}.bin",
                    file_id=_sha(f"dssefs golden v2 file_id {obj}")[:16],
                    msg_id=_sha(f"dssefs golden v2 msg_id {obj}"),
                    dk={layer: _sha(f"dssefs golden v2 data key {obj} {layer}") for layer in LAYERS},
                    dk_nonce={layer: _sha(f"dssefs golden v2 data key wrap nonce {obj} {layer}")[:12]
                              for layer in LAYERS},
                    attrs_nonce=_sha(f"dssefs golden v2 attrs nonce {spec['name']}")[:12])
    return specs


def build_case_v2(spec: dict, epoch: dict) -> dict:
    pt = plaintext(spec["plaintext_len"])
    cs = 1 << spec["chunk_log2"]
    n_chunks = fmt.chunk_count(len(pt), cs)
    stored = spec.get("stored")  # 17.10: a sparse case stores these chunks; the others are zeros
    if stored is not None:
        pt = b"".join(pt[i * cs:(i + 1) * cs] if i in stored else bytes(len(pt[i * cs:(i + 1) * cs]))
                      for i in range(n_chunks))
    dk_in, dk_out = spec["dk"]["inner"], spec["dk"]["outer"]
    cipher = ObjectCipher.new_version(dk_in, dk_out, plaintext_len=len(pt), file_id=spec["file_id"],
                                      version=fmt.FORMAT_V2, generation=spec["generation"],
                                      chunk_log2=spec["chunk_log2"], msg_id=spec["msg_id"],
                                      with_attrs=spec["with_attrs"], sparse=stored is not None)
    h = cipher.header
    suite = h.suite
    assert cipher.header_bytes[0] == 2 and h.flags == ((1 if spec["with_attrs"] else 0)
                                                       | (2 if stored is not None else 0))
    k_in, c_in, a_in = codec._derive_inner(dk_in, spec["msg_id"], suite, h.bound_fields(), fmt.FORMAT_V2)
    k_out, c_out, a_out = codec._derive_outer(dk_out, spec["msg_id"], suite, h.bound_fields(), fmt.FORMAT_V2)
    # 17.3, from the text: chunk AADs bind file_id and msg_id, the attribute AAD the header digest
    cprefix = {layer: V2_DOMAIN + suite.to_bytes(2, "big") + bytes([lb]) + h.file_id + h.msg_id
               for layer, lb in (("inner", 1), ("outer", 2))}
    aprefix = {layer: V2_DOMAIN + suite.to_bytes(2, "big") + bytes([lb]) + cipher.digest
               for layer, lb in (("inner", 1), ("outer", 2))}
    assert cprefix["inner"] == fmt.chunk_aad_prefix_v2(suite, fmt.LAYER_INNER, h.file_id, h.msg_id)
    assert aprefix["outer"] == fmt.aad_prefix(suite, fmt.LAYER_OUTER, cipher.digest, fmt.FORMAT_V2)
    body = bytearray()
    chunks = []
    for i in range(cipher.n_chunks):
        if stored is not None and i not in stored:
            continue
        piece = pt[i * cs:i * cs + cipher.chunk_plain_len(i)]
        final = i == cipher.n_chunks - 1
        aad_in = cprefix["inner"] + i.to_bytes(8, "big") + bytes([final])
        aad_out = cprefix["outer"] + i.to_bytes(8, "big") + bytes([final])
        inner_sealed = bytearray(len(piece) + fmt.TAG_BYTES)
        InnerAEAD(k_in).encrypt_into(fmt.chunk_nonce(i), piece, aad_in, inner_sealed)
        sealed = cipher.seal_chunk(i, piece)
        assert len(body) == (cipher.chunk_body_offset(i) if stored is None
                             else sum(1 for j in stored if j < i) * (cs + 32))
        chunks.append({
            "index": i, "body_offset": len(body), "plain_len": len(piece), "final": final,
            "nonce": fmt.chunk_nonce(i).hex(), "aad_inner": aad_in.hex(), "aad_outer": aad_out.hex(),
            "inner_tag": bytes(inner_sealed[-16:]).hex(), "outer_tag": bytes(sealed[-16:]).hex(),
        })
        body += sealed
    sparse = None
    if stored is not None:
        # 17.10 from the text: bitmap, map AAD (index 2^64 - 1, 0x02), sealed like a chunk
        bitmap = sum(1 << i for i in stored).to_bytes(-(-n_chunks // 8), "little")
        map_nonce = b"\0" * 4 + ((1 << 64) - 1).to_bytes(8, "big")
        map_aad = {layer: cprefix[layer] + ((1 << 64) - 1).to_bytes(8, "big") + b"\x02" for layer in LAYERS}
        inner_sealed = bytearray(len(bitmap) + fmt.TAG_BYTES)
        InnerAEAD(k_in).encrypt_into(map_nonce, bitmap, map_aad["inner"], inner_sealed)
        sealed_map = cipher.seal_map(ChunkMap(bitmap, len(pt), cs))
        assert AESGCM(k_out).encrypt(map_nonce, bytes(inner_sealed), map_aad["outer"]) == bytes(sealed_map)
        body += sealed_map
        sparse = {"stored_chunks": sorted(stored), "chunk_map_hex": bitmap.hex(), "map_nonce": map_nonce.hex(),
                  "map_aad_inner": map_aad["inner"].hex(), "map_aad_outer": map_aad["outer"].hex(),
                  "sealed_map_hex": bytes(sealed_map).hex()}
    else:
        assert len(body) == cipher.body_size
    attrs_blob = cipher.seal_attrs(ATTRS_PLAINTEXT_V2, nonce=spec["attrs_nonce"]) if spec["with_attrs"] else None
    ekeys = {layer: bytes.fromhex(epoch[f"epoch_key_{layer}"]) for layer in LAYERS}
    octx = {layer: object_context_v2(layer, spec["object_key"], epoch["epoch_id"]) for layer in LAYERS}
    dkw = {}
    for layer in LAYERS:
        blob = dk_wrap(ekeys[layer], octx[layer], spec["dk"][layer], spec["dk_nonce"][layer])
        assert len(blob) == 61
        dkw[layer] = {"nonce": spec["dk_nonce"][layer].hex(), "aad": dk_wrap_aad(octx[layer]).hex(),
                      "blob": blob.hex()}
    ref = EpochRef(bytes.fromhex(epoch["epoch_id"]), epoch["depth"])
    env = Envelope(header=h, provider="", key_id_inner="", key_id_outer="",
                   wrapped_inner=bytes.fromhex(dkw["inner"]["blob"]),
                   wrapped_outer=bytes.fromhex(dkw["outer"]["blob"]), attrs=attrs_blob, epoch=ref)
    meta = env.to_metadata()
    return {
        "name": spec["name"],
        "successor_of": spec["successor_of"],
        "chunk_log2": spec["chunk_log2"],
        "plaintext_len": len(pt),
        "plaintext_sha256": hashlib.sha256(pt).hexdigest(),
        "generation": spec["generation"],
        "flags": h.flags,
        "with_attrs": spec["with_attrs"],
        "dk_inner": dk_in.hex(),
        "dk_outer": dk_out.hex(),
        "file_id": spec["file_id"].hex(),
        "msg_id": spec["msg_id"].hex(),
        "bucket": BUCKET,
        "object_key": spec["object_key"],
        "epoch": epoch,
        "object_contexts": octx,
        "object_contexts_canonical": {layer: canonical_json(octx[layer]).decode("ascii") for layer in LAYERS},
        "dk_wrap": dkw,
        "wrapped_inner": dkw["inner"]["blob"],
        "wrapped_outer": dkw["outer"]["blob"],
        "derived": {
            "inner": {"key": k_in.hex(), "commit": c_in.hex(), "attrs_key": a_in.hex()},
            "outer": {"key": k_out.hex(), "commit": c_out.hex(), "attrs_key": a_out.hex()},
        },
        "header_hex": cipher.header_bytes.hex(),
        "header_sha256": cipher.digest.hex(),
        "chunk_aad_prefix_inner": cprefix["inner"].hex(),
        "chunk_aad_prefix_outer": cprefix["outer"].hex(),
        "attrs_aad_inner": (aprefix["inner"] + b"attrs").hex(),
        "attrs_aad_outer": (aprefix["outer"] + b"attrs").hex(),
        "n_chunks": cipher.n_chunks,
        "chunks": chunks,
        "body_size": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest(),
        "body_hex": bytes(body).hex(),
        "attrs_plaintext": ATTRS_PLAINTEXT_V2.hex() if spec["with_attrs"] else None,
        "attrs_nonce": spec["attrs_nonce"].hex() if spec["with_attrs"] else None,
        "attrs_blob_hex": attrs_blob.hex() if attrs_blob is not None else None,
        "metadata": meta,
        "metadata_bytes": sum(len(k) + len(v) for k, v in meta.items()),
        **({"sparse": sparse} if sparse is not None else {}),
    }


def build_v2() -> dict:
    epochs = {label: build_epoch(label) for label in V2_EPOCHS}
    return {
        "format": "DSSEFS v2",
        "suite": fmt.SUITE_DUAL_AES256GCM_HKDF_SHA512_COMMIT,
        "spec": "docs/format.md section 17 (and sections 1-16 where it does not differ)",
        "plaintext": "byte i of every case's plaintext is i mod 251",
        "wrapped_keys": "local epoch: real keyring blobs (17.5) of the epoch keys under the master keys "
                        "below, data keys wrapped under the epoch keys (17.4); kms epoch: fixed fake "
                        "CiphertextBlobs (not unwrappable) showing the record's encoding and size, data "
                        "keys really wrapped under the listed epoch keys",
        "successors": "a case with successor_of is the next version of that case after an attribute "
                      "change (17.6): same object key, message id, data keys, wrapped keys and body",
        "keyring": {name: master_key(name).hex() for name in KEY_NAMES},
        "keyring_check": {name: keyring_check(name).hex() for name in KEY_NAMES},
        "cases": [build_case_v2(spec, epochs[spec["epoch"]]) for spec in cases_v2()],
    }


def render_v2() -> str:
    return json.dumps(build_v2(), indent=1, sort_keys=False) + "\n"


def cases_sparse() -> list[dict]:
    """17.10: sparse versions (holes read as zeros; the last chunk is always stored)."""
    cs = 1 << 12
    out = [dict(name="sparse-cs12-holes", object="sparse-cs12-holes", chunk_log2=12, plaintext_len=5 * cs + 7,
                stored={1, 5}, epoch="local", generation=1, with_attrs=True, successor_of=None),
           dict(name="sparse-cs12-last-only", object="sparse-cs12-last-only", chunk_log2=12,
                plaintext_len=9 * cs, stored={8}, epoch="local", generation=0, with_attrs=False,
                successor_of=None)]
    return _with_inputs(out)


def render_sparse() -> str:
    golden = build_v2()
    epochs = {label: build_epoch(label) for label in V2_EPOCHS}
    golden.update(spec="docs/format.md section 17.10 (sparse versions)",
                  plaintext="byte i of every case's plaintext is i mod 251, except in chunks not stored "
                            "(listed in sparse.stored_chunks), which are zeros",
                  cases=[build_case_v2(spec, epochs[spec["epoch"]]) for spec in cases_sparse()])
    del golden["successors"]
    return json.dumps(golden, indent=1, sort_keys=False) + "\n"


def main(argv: list[str]) -> int:
    outputs = ((OUT, render()), (OUT_V2, render_v2()), (OUT_SPARSE, render_sparse()))
    if "--check" in argv:
        stale = [path.name for path, text in outputs if not (path.exists() and path.read_text() == text)]
        print(f"golden vectors differ from the generator: {', '.join(stale)}" if stale
              else "golden vectors up to date")
        return 1 if stale else 0
    for path, text in outputs:
        path.write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
