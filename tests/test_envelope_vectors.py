"""Golden DSSEFS v1 objects (tests/vectors/dssefs_v1_golden.json).

- dssefs re-encrypts every case from its injected inputs and reproduces every byte;
- the generator script still produces exactly the committed file;
- dssefs decrypts every case;
- tests/refdecoder.py, written from docs/format.md with ``cryptography`` for BOTH layers and a stdlib
  HKDF, decrypts every case: each layer is plain standard AES-256-GCM;
- cross-library: the inner layer opens with pycryptodome and the outer with cryptography (the
  opposite of dssefs's own assignment);
- the local-keyring wrapped keys unwrap with the spec's construction and with dssefs's provider.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from Crypto.Cipher import AES
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dssefs.envelope import format as fmt
from dssefs.envelope import metadata as md
from dssefs.envelope.codec import ObjectCipher
from dssefs.envelope.metadata import Envelope

import refdecoder

TESTS = Path(__file__).parent
ROOT = TESTS.parent
GOLDEN_PATH = TESTS / "vectors" / "dssefs_v1_golden.json"
GOLDEN = json.loads(GOLDEN_PATH.read_text())
CASES = GOLDEN["cases"]
IDS = [c["name"] for c in CASES]
H = bytes.fromhex


def plaintext(n: int) -> bytes:
    return bytes(i % 251 for i in range(n))


def body(case) -> bytes:
    return H(case["body_hex"])


def dks(case) -> tuple[bytes, bytes]:
    return H(case["dk_inner"]), H(case["dk_outer"])


def test_golden_file_covers_the_required_lengths():
    cs = 1 << 12
    lengths = {c["plaintext_len"] for c in CASES if c["chunk_log2"] == 12}
    assert lengths == {0, 1, cs - 1, cs, cs + 1, 2 * cs, 3 * cs - 1}
    assert any(c["chunk_log2"] == fmt.DEFAULT_CHUNK_LOG2 for c in CASES)
    for c in CASES:
        assert c["plaintext_sha256"] == hashlib.sha256(plaintext(c["plaintext_len"])).hexdigest()
        assert c["body_sha256"] == hashlib.sha256(body(c)).hexdigest()


def test_generator_reproduces_the_committed_file():
    spec = importlib.util.spec_from_file_location("dssefs_golden_generate", TESTS / "vectors" / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.render() == GOLDEN_PATH.read_text(), \
        "tests/vectors/generate.py no longer reproduces the golden file: the format changed"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reencrypt_reproduces_every_byte(case):
    pt = plaintext(case["plaintext_len"])
    dk_in, dk_out = dks(case)
    cipher = ObjectCipher.new_version(dk_in, dk_out, plaintext_len=len(pt), file_id=H(case["file_id"]), version=1,
                                      generation=case["generation"], chunk_log2=case["chunk_log2"],
                                      msg_id=H(case["msg_id"]))
    assert cipher.header_bytes.hex() == case["header_hex"]
    assert cipher.digest.hex() == case["header_sha256"]
    assert cipher.header.commit_inner.hex() == case["derived"]["inner"]["commit"]
    assert cipher.header.commit_outer.hex() == case["derived"]["outer"]["commit"]
    assert cipher.n_chunks == case["n_chunks"] == len(case["chunks"])
    out = bytearray(cipher.body_size)
    view = memoryview(out)
    for ch in case["chunks"]:
        i, n, off = ch["index"], ch["plain_len"], ch["body_offset"]
        assert cipher.chunk_body_offset(i) == off and cipher.chunk_plain_len(i) == n
        cipher.seal_chunk_into(i, pt[i * cipher.chunk_size:i * cipher.chunk_size + n],
                               view[off:off + n + fmt.CHUNK_OVERHEAD])
    assert bytes(out) == body(case)
    blob = cipher.seal_attrs(H(case["attrs_plaintext"]), nonce=H(case["attrs_nonce"]))
    assert blob.hex() == case["attrs_blob_hex"]
    env = Envelope(header=cipher.header, provider=case["provider"], key_id_inner=case["key_id_inner"],
                   key_id_outer=case["key_id_outer"], wrapped_inner=H(case["wrapped_inner"]),
                   wrapped_outer=H(case["wrapped_outer"]), attrs=blob)
    meta = env.to_metadata()
    assert meta == case["metadata"]
    assert md.metadata_size(meta) == case["metadata_bytes"] <= md.METADATA_LIMIT
    assert len(meta["dsse-h"]) == 178


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_dssefs_decrypts(case):
    env = md.parse(case["metadata"])
    assert env.header.pack().hex() == case["header_hex"]
    cipher = ObjectCipher.open_version(env.header, *dks(case))
    data = body(case)
    assert len(data) == cipher.body_size == case["body_size"]
    got = bytearray()
    for i in range(cipher.n_chunks):
        off, n = cipher.chunk_body_offset(i), cipher.chunk_plain_len(i)
        got += cipher.open_chunk(i, data[off:off + n + fmt.CHUNK_OVERHEAD])
    assert bytes(got) == plaintext(case["plaintext_len"])
    assert cipher.open_attrs(env.attrs) == H(case["attrs_plaintext"])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reference_decoder_decrypts(case):
    pt, attrs = refdecoder.decrypt_object(case["metadata"], body(case), *dks(case))
    assert pt == plaintext(case["plaintext_len"])
    assert attrs == H(case["attrs_plaintext"])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reference_decoder_intermediates(case):
    env = refdecoder.parse_metadata(case["metadata"])
    h = env.header
    dk_in, dk_out = dks(case)
    for layer, dk, name in ((refdecoder.INNER, dk_in, "inner"), (refdecoder.OUTER, dk_out, "outer")):
        k, cm, ak = refdecoder.derive(layer, dk, h)
        assert (k.hex(), cm.hex(), ak.hex()) == tuple(case["derived"][name][x] for x in ("key", "commit", "attrs_key"))
    assert refdecoder.aad_prefix(h, refdecoder.INNER).hex() == case["aad_prefix_inner"]
    assert refdecoder.aad_prefix(h, refdecoder.OUTER).hex() == case["aad_prefix_outer"]
    for ch in case["chunks"]:
        i = ch["index"]
        assert refdecoder.nonce(i).hex() == ch["nonce"]
        assert refdecoder.chunk_aad(h, refdecoder.INNER, i).hex() == ch["aad_inner"]
        assert refdecoder.chunk_aad(h, refdecoder.OUTER, i).hex() == ch["aad_outer"]
        assert ch["final"] == (i == h.n - 1)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cross_library_each_layer_is_standard_gcm(case):
    """Outer layer opened with cryptography, inner layer with pycryptodome."""
    data = body(case)
    pt = plaintext(case["plaintext_len"])
    k_in = H(case["derived"]["inner"]["key"])
    k_out = H(case["derived"]["outer"]["key"])
    cs = 1 << case["chunk_log2"]
    for ch in case["chunks"]:
        i, n, off = ch["index"], ch["plain_len"], ch["body_offset"]
        sealed = data[off:off + n + 32]
        assert sealed[-16:].hex() == ch["outer_tag"]
        mid = AESGCM(k_out).decrypt(H(ch["nonce"]), sealed, H(ch["aad_outer"]))
        assert len(mid) == n + 16 and mid[-16:].hex() == ch["inner_tag"]
        dec = AES.new(k_in, AES.MODE_GCM, nonce=H(ch["nonce"]), mac_len=16)
        dec.update(H(ch["aad_inner"]))
        assert dec.decrypt_and_verify(mid[:-16], mid[-16:]) == pt[i * cs:i * cs + n]
        # and the other way round, re-encrypting: pycryptodome outer over cryptography inner
        inner = AESGCM(k_in).encrypt(H(ch["nonce"]), pt[i * cs:i * cs + n], H(ch["aad_inner"]))
        enc = AES.new(k_out, AES.MODE_GCM, nonce=H(ch["nonce"]), mac_len=16)
        enc.update(H(ch["aad_outer"]))
        ct, tag = enc.encrypt_and_digest(inner)
        assert ct + tag == sealed


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reference_decoder_ranged_reads(case):
    env = refdecoder.parse_metadata(case["metadata"])
    v = refdecoder.open_version(env.header, *dks(case))
    pt, data, cs = plaintext(case["plaintext_len"]), body(case), 1 << case["chunk_log2"]
    cipher = ObjectCipher.open_version(md.parse(case["metadata"]).header, *dks(case))
    for off, cnt in ((0, 1), (0, 10 ** 6), (1, cs), (cs - 1, 2), (cs, cs), (2 * cs - 3, 5),
                     (len(pt), 1), (len(pt) + 5, 1), (max(0, len(pt) - 1), 10), (3, 0)):
        assert refdecoder.read_range(v, data, off, cnt) == pt[off:off + cnt]
        chunks = cipher.chunks_for_range(off, cnt)
        start, length = cipher.body_span(chunks)
        span = data[start:start + length]
        got = b"".join(bytes(cipher.open_chunk(i, span[cipher.chunk_body_offset(i) - start:
                                                      cipher.chunk_body_offset(i) - start
                                                      + cipher.chunk_plain_len(i) + 32]))
                       for i in chunks)
        skip = off - (chunks.start * cs if chunks else 0)
        assert got[skip:skip + cnt] == pt[off:off + cnt]


LOCAL_CASES = [c for c in CASES if c["wrapped_keys_real"]]


@pytest.mark.parametrize("case", LOCAL_CASES, ids=[c["name"] for c in LOCAL_CASES])
def test_local_keyring_wrapped_keys_unwrap_per_spec(case):
    """Master key -> data keys (spec construction, refdecoder) -> plaintext."""
    ring = {k: H(v) for k, v in GOLDEN["keyring"].items()}
    got = []
    for layer, wrapped, kid in (("inner", case["wrapped_inner"], case["key_id_inner"]),
                                ("outer", case["wrapped_outer"], case["key_id_outer"])):
        ctx = {"dssefs:v": "1", "dssefs:layer": layer, "dssefs:bucket": case["bucket"],
               "dssefs:key": case["object_key"]}
        got.append(refdecoder.unwrap_local(ring[kid], kid, ctx, H(wrapped)))
        # the same blob does not open for another object key or the other layer
        for bad in ({**ctx, "dssefs:key": case["object_key"] + "x"},
                    {**ctx, "dssefs:layer": "outer" if layer == "inner" else "inner"},
                    {**ctx, "dssefs:bucket": "other"}):
            with pytest.raises(refdecoder.Integrity):
                refdecoder.unwrap_local(ring[kid], kid, bad, H(wrapped))
    assert tuple(got) == dks(case)
    pt, _ = refdecoder.decrypt_object(case["metadata"], body(case), *got)
    assert pt == plaintext(case["plaintext_len"])


def test_local_keyring_provider_unwraps_golden_keys():
    """dssefs's own local keyring provider opens the blobs built from the spec's description."""
    local = pytest.importorskip("dssefs.kms.local")
    from dssefs.kms.base import Layer, WrappedKey, context

    ring = local.Keyring("<golden>", {k: H(v) for k, v in GOLDEN["keyring"].items()}, {}, kdf=None)
    provider = local.LocalKeyringProvider(ring, "golden-inner", "golden-outer")
    for case in LOCAL_CASES:
        dk_in = provider.unwrap(Layer.INNER, WrappedKey(H(case["wrapped_inner"]), case["key_id_inner"]),
                                context(Layer.INNER, case["bucket"], case["object_key"]))
        dk_out = provider.unwrap(Layer.OUTER, WrappedKey(H(case["wrapped_outer"]), case["key_id_outer"]),
                                 context(Layer.OUTER, case["bucket"], case["object_key"]))
        assert (dk_in, dk_out) == dks(case)


def test_reference_decoder_is_independent_of_dssefs():
    src = (TESTS / "refdecoder.py").read_text()
    imported = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"__future__", "base64", "hashlib", "hmac", "json", "re", "struct",
                        "dataclasses", "cryptography"}, imported
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import refdecoder; "
             "bad = [m for m in sys.modules if m.split('.')[0] in ('dssefs', 'Crypto')]; "
             "print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", probe, str(TESTS)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_worked_example_in_spec_matches_vectors():
    """docs/format.md section 16 quotes case cs12-len1; keep the prose and the vectors in step."""
    doc = (ROOT / "docs" / "format.md").read_text()
    case = next(c for c in CASES if c["name"] == "cs12-len1")
    h = case["header_hex"]
    for value in (case["dk_inner"], case["dk_outer"], case["file_id"], case["msg_id"],
                  case["header_sha256"], case["derived"]["inner"]["key"], case["derived"]["outer"]["key"],
                  case["derived"]["inner"]["attrs_key"], case["derived"]["outer"]["attrs_key"],
                  case["derived"]["inner"]["commit"], case["derived"]["outer"]["commit"],
                  case["chunks"][0]["inner_tag"], case["body_hex"][:34], case["body_hex"][34:],
                  case["metadata"]["dsse-w"], h[:2], h[10:26]):
        assert value in doc, value
    lines = doc.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("dsse-h  "))
    assert lines[at][len("dsse-h"):].strip() + lines[at + 1].strip() == case["metadata"]["dsse-h"]
