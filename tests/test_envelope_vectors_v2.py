"""Golden DSSEFS v2 objects (tests/vectors/dssefs_v2_golden.json, docs/format.md section 17).

- the generator script still produces exactly the committed file (and the v1 file);
- dssefs's own code decodes every local case from the keyring master keys: EpochRecord.parse,
  the keyring provider's unwrap of the record's 69-byte blobs, metadata.parse, the epoch
  reference, unwrap_data_key, ObjectCipher; the KMS case from its epoch keys down;
- dssefs re-encrypts every case from its injected inputs and reproduces every byte (header, body,
  attribute blob, wrapped data keys, metadata, record JSON), and ``successor()`` reproduces the
  ``-attrs`` cases from the cases they follow;
- tests/refdecoder.py decodes every case (from the record and the master keys, through its own
  reader) and reproduces every intermediate value;
- each layer is plain AES-256-GCM: the inner layer opens with pycryptodome, the outer with
  cryptography.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
from Crypto.Cipher import AES
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dssefs.envelope import format as fmt
from dssefs.envelope import metadata as md
from dssefs.envelope.codec import ObjectCipher
from dssefs.envelope.epoch import EpochRecord, record_key
from dssefs.envelope.keywrap import unwrap_data_key, wrap_data_key
from dssefs.envelope.metadata import Envelope, EpochRef
from dssefs.errors import MetadataBudgetError
from dssefs.kms import local
from dssefs.kms.base import Layer, WrappedKey, epoch_context, object_context_v2

import refdecoder

TESTS = Path(__file__).parent
GOLDEN_PATH = TESTS / "vectors" / "dssefs_v2_golden.json"
GOLDEN_V1_PATH = TESTS / "vectors" / "dssefs_v1_golden.json"
GOLDEN = json.loads(GOLDEN_PATH.read_text())
CASES = GOLDEN["cases"]
IDS = [c["name"] for c in CASES]
BY_NAME = {c["name"]: c for c in CASES}
LOCAL = [c for c in CASES if c["epoch"]["wrapped_keys_real"]]
KMS = [c for c in CASES if not c["epoch"]["wrapped_keys_real"]]
LAYERS = {"inner": (Layer.INNER, fmt.LAYER_INNER), "outer": (Layer.OUTER, fmt.LAYER_OUTER)}
H = bytes.fromhex


def plaintext(n: int) -> bytes:
    return bytes(i % 251 for i in range(n))


def body(case) -> bytes:
    return H(case["body_hex"])


def dks(case) -> tuple[bytes, bytes]:
    return H(case["dk_inner"]), H(case["dk_outer"])


def eks(case) -> tuple[bytes, bytes]:
    return H(case["epoch"]["epoch_key_inner"]), H(case["epoch"]["epoch_key_outer"])


def ring() -> dict[str, bytes]:
    return {k: H(v) for k, v in GOLDEN["keyring"].items()}


def provider() -> local.LocalKeyringProvider:
    kr = local.Keyring("<golden>", ring(), {}, kdf=None)
    return local.LocalKeyringProvider(kr, "golden-inner", "golden-outer")


def _generator():
    spec = importlib.util.spec_from_file_location("dssefs_golden_generate", TESTS / "vectors" / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    return gen


# ---- the file -------------------------------------------------------------------------------------

def test_golden_file_covers_the_required_cases():
    cs = 1 << 12
    want = {0, 1, cs - 1, cs, cs + 1, 3 * cs - 1}
    cs12 = [c for c in LOCAL if c["chunk_log2"] == 12]
    assert {c["plaintext_len"] for c in cs12 if not c["with_attrs"]} == want
    assert {c["plaintext_len"] for c in cs12 if c["with_attrs"]} == want
    assert any(c["chunk_log2"] == fmt.DEFAULT_CHUNK_LOG2 for c in LOCAL)
    assert len(KMS) == 1
    for c in CASES:
        assert H(c["header_hex"])[0] == fmt.FORMAT_V2
        assert c["flags"] == (fmt.FLAG_ATTRS if c["with_attrs"] else 0) == H(c["header_hex"])[3]
        assert c["plaintext_sha256"] == hashlib.sha256(plaintext(c["plaintext_len"])).hexdigest()
        assert c["body_sha256"] == hashlib.sha256(body(c)).hexdigest()
        assert ("dsse-a" in c["metadata"]) == c["with_attrs"]
        assert set(c["metadata"]) - {"dsse-a"} == {"dsse-h", "dsse-ki", "dsse-ko", "dsse-e"}
    # the same keyring as the v1 vectors, with appendix C's check values
    assert GOLDEN["keyring"] == json.loads(GOLDEN_V1_PATH.read_text())["keyring"]
    assert GOLDEN["keyring_check"] == {"golden-inner": "7c18ba5c27e75188", "golden-outer": "aaaddbf6f08e3910"}
    kms = KMS[0]["epoch"]
    assert kms["provider"] == "kms" and kms["key_id_inner"].startswith("arn:aws:kms:")
    assert len(H(kms["wrap"]["inner"]["blob"])) == len(H(kms["wrap"]["outer"]["blob"])) == 184


def test_generator_reproduces_the_committed_files():
    gen = _generator()
    assert gen.render_v2() == GOLDEN_PATH.read_text(), \
        "tests/vectors/generate.py no longer reproduces the v2 golden file: the format changed"
    assert gen.render() == GOLDEN_V1_PATH.read_text()


def test_successor_cases_share_everything_but_header_and_attributes():
    """17.6: an attribute change is a header rewrite with the same message id, keys and body."""
    succ = [c for c in CASES if c["successor_of"]]
    assert len(succ) == 6
    for c in succ:
        base = BY_NAME[c["successor_of"]]
        assert c["generation"] == base["generation"] + 1
        for field in ("object_key", "file_id", "msg_id", "dk_inner", "dk_outer", "wrapped_inner",
                      "wrapped_outer", "body_hex", "chunk_aad_prefix_inner", "chunk_aad_prefix_outer"):
            assert c[field] == base[field], field
        assert c["derived"]["inner"]["key"] == base["derived"]["inner"]["key"]
        assert c["derived"]["inner"]["commit"] != base["derived"]["inner"]["commit"]
        assert c["header_hex"] != base["header_hex"]
        assert {k: v for k, v in c["metadata"].items() if k not in ("dsse-h", "dsse-a")} == \
            {k: v for k, v in base["metadata"].items() if k != "dsse-h"}
        assert c["metadata"]["dsse-h"] != base["metadata"]["dsse-h"]


# ---- dssefs decodes -------------------------------------------------------------------------------

def _record(case) -> EpochRecord:
    ep = case["epoch"]
    rec = EpochRecord.parse(ep["record_json"].encode("ascii"), bucket=case["bucket"], prefix=ep["prefix"],
                            epoch_id=H(ep["epoch_id"]))
    assert record_key(ep["prefix"], H(ep["epoch_id"])) == ep["record_key"]
    assert (rec.provider, rec.key_id_inner, rec.key_id_outer, rec.created) == \
        (ep["provider"], ep["key_id_inner"], ep["key_id_outer"], ep["created"])
    assert (rec.wrapped_inner.hex(), rec.wrapped_outer.hex()) == \
        (ep["wrap"]["inner"]["blob"], ep["wrap"]["outer"]["blob"])
    return rec


def _decode_with_dssefs(case, ek_in: bytes, ek_out: bytes) -> None:
    env = md.parse(case["metadata"])
    ep = case["epoch"]
    assert env.version == fmt.FORMAT_V2 and env.epoch == EpochRef(H(ep["epoch_id"]), ep["depth"])
    assert env.epoch.prefix_of(case["object_key"]) == ep["prefix"]
    got = []
    for name, ek, blob in (("inner", ek_in, env.wrapped_inner), ("outer", ek_out, env.wrapped_outer)):
        layer, lb = LAYERS[name]
        ctx = object_context_v2(layer, case["bucket"], case["object_key"], ep["epoch_id"])
        assert ctx == case["object_contexts"][name]
        got.append(unwrap_data_key(lb, ek, blob, ctx))
    assert tuple(got) == dks(case)
    cipher = ObjectCipher.open_version(env.header, *got)
    data = body(case)
    assert len(data) == cipher.body_size == case["body_size"]
    out = bytearray()
    for i in range(cipher.n_chunks):
        off, n = cipher.chunk_body_offset(i), cipher.chunk_plain_len(i)
        out += cipher.open_chunk(i, data[off:off + n + fmt.CHUNK_OVERHEAD])
    assert bytes(out) == plaintext(case["plaintext_len"])
    if case["with_attrs"]:
        assert cipher.open_attrs(env.attrs) == H(case["attrs_plaintext"])
    else:
        assert env.attrs is None


@pytest.mark.parametrize("case", LOCAL, ids=[c["name"] for c in LOCAL])
def test_dssefs_decodes_from_the_master_keys(case):
    rec = _record(case)
    ep = case["epoch"]
    keys = provider()
    ek = []
    for name, blob, kid in (("inner", rec.wrapped_inner, rec.key_id_inner),
                            ("outer", rec.wrapped_outer, rec.key_id_outer)):
        layer, _ = LAYERS[name]
        ctx = epoch_context(layer, case["bucket"], ep["prefix"], ep["epoch_id"])
        assert ctx == ep["contexts"][name]
        ek.append(keys.unwrap(layer, WrappedKey(blob, kid), ctx))
    assert tuple(ek) == eks(case)
    _decode_with_dssefs(case, *ek)


@pytest.mark.parametrize("case", KMS, ids=[c["name"] for c in KMS])
def test_dssefs_decodes_the_kms_case_from_its_epoch_keys(case):
    rec = _record(case)
    assert rec.prefix == "" and case["epoch"]["depth"] == 0
    _decode_with_dssefs(case, *eks(case))


def test_keyring_provider_writes_the_layout_of_the_golden_blobs():
    """The provider draws its own nonces, so the golden blobs are built from 17.5 by the generator;
    what the provider writes has the same layout (version byte, check value, 69 bytes) and the
    golden blobs open with it (above)."""
    keys = provider()
    case = LOCAL[0]
    ep = case["epoch"]
    for name in ("inner", "outer"):
        layer, _ = LAYERS[name]
        kid = ep[f"key_id_{name}"]
        ctx = epoch_context(layer, case["bucket"], ep["prefix"], ep["epoch_id"])
        _, wrapped = keys.generate(layer, ctx)
        golden = H(ep["wrap"][name]["blob"])
        assert wrapped.key_id == kid and len(wrapped.blob) == len(golden) == 69
        assert wrapped.blob[:9] == golden[:9] == b"\x02" + H(GOLDEN["keyring_check"][kid])
        assert golden[9:21] == H(ep["wrap"][name]["nonce"])


# ---- dssefs re-encrypts ---------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reencrypt_reproduces_every_byte(case):
    pt = plaintext(case["plaintext_len"])
    dk_in, dk_out = dks(case)
    cipher = ObjectCipher.new_version(dk_in, dk_out, plaintext_len=len(pt), file_id=H(case["file_id"]),
                                      version=fmt.FORMAT_V2, generation=case["generation"],
                                      chunk_log2=case["chunk_log2"], msg_id=H(case["msg_id"]),
                                      with_attrs=case["with_attrs"])
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
    blob = None
    if case["with_attrs"]:
        blob = cipher.seal_attrs(H(case["attrs_plaintext"]), nonce=H(case["attrs_nonce"]))
        assert blob.hex() == case["attrs_blob_hex"]
    ep = case["epoch"]
    wrapped = {}
    for name, ek, dk in (("inner", eks(case)[0], dk_in), ("outer", eks(case)[1], dk_out)):
        layer, lb = LAYERS[name]
        ctx = object_context_v2(layer, case["bucket"], case["object_key"], ep["epoch_id"])
        wrapped[name] = wrap_data_key(lb, ek, dk, ctx, nonce=H(case["dk_wrap"][name]["nonce"]))
        assert fmt.dk_wrap_aad(ctx).hex() == case["dk_wrap"][name]["aad"]
        assert wrapped[name].hex() == case["dk_wrap"][name]["blob"] == case[f"wrapped_{name}"]
    env = Envelope(header=cipher.header, provider="", key_id_inner="", key_id_outer="",
                   wrapped_inner=wrapped["inner"], wrapped_outer=wrapped["outer"], attrs=blob,
                   epoch=EpochRef(H(ep["epoch_id"]), EpochRef.depth_of(ep["prefix"])))
    meta = env.to_metadata()
    assert meta == case["metadata"]
    assert md.metadata_size(meta) == case["metadata_bytes"] <= md.METADATA_LIMIT
    rec = EpochRecord(epoch_id=H(ep["epoch_id"]), bucket=case["bucket"], prefix=ep["prefix"],
                      provider=ep["provider"], key_id_inner=ep["key_id_inner"],
                      key_id_outer=ep["key_id_outer"], wrapped_inner=H(ep["wrap"]["inner"]["blob"]),
                      wrapped_outer=H(ep["wrap"]["outer"]["blob"]), created=ep["created"])
    assert rec.encode().decode("ascii") == ep["record_json"]


@pytest.mark.parametrize("case", [c for c in CASES if c["successor_of"]],
                         ids=[c["name"] for c in CASES if c["successor_of"]])
def test_successor_reproduces_the_attribute_change(case):
    base = BY_NAME[case["successor_of"]]
    first = ObjectCipher.new_version(*dks(base), plaintext_len=base["plaintext_len"],
                                     file_id=H(base["file_id"]), version=fmt.FORMAT_V2,
                                     generation=base["generation"], chunk_log2=base["chunk_log2"],
                                     msg_id=H(base["msg_id"]))
    assert first.header_bytes.hex() == base["header_hex"]
    nxt = first.successor(generation=base["generation"] + 1, with_attrs=True)
    assert nxt.header_bytes.hex() == case["header_hex"]
    assert nxt.seal_attrs(H(case["attrs_plaintext"]), nonce=H(case["attrs_nonce"])).hex() == case["attrs_blob_hex"]
    # the old body opens under the new header: chunk AADs do not cover the header in version 2
    opened = ObjectCipher.open_version(md.parse(case["metadata"]).header, *dks(case))
    data = body(base)
    got = b"".join(bytes(opened.open_chunk(i, data[opened.chunk_body_offset(i):opened.chunk_body_offset(i)
                                                     + opened.chunk_plain_len(i) + 32]))
                   for i in range(opened.n_chunks))
    assert got == plaintext(case["plaintext_len"])


def test_metadata_budget_of_version_2():
    """What 17.7's budget paragraph computes, checked on the golden metadata: dsse-e is
    6 + 32 + 1 + digits(depth) bytes, so an object without attributes uses 402 bytes, and an
    attribute plaintext of up to 1,186 bytes fits (the paragraph says 403 and 1,185)."""
    for c in CASES:
        assert len("dsse-e") + len(c["metadata"]["dsse-e"]) == 6 + 33 + len(str(c["epoch"]["depth"])) == 40
        assert c["metadata_bytes"] == (402 if not c["with_attrs"] else
                                       402 + 6 + -(-4 * (44 + len(H(c["attrs_plaintext"]))) // 3))
    case = BY_NAME["cs12-len1-attrs"]
    env = md.parse(case["metadata"])
    cipher = ObjectCipher.open_version(env.header, *dks(case))
    for n, fits in ((1186, True), (1187, False)):
        blob = cipher.seal_attrs(b"x" * n)
        candidate = Envelope(header=env.header, provider="", key_id_inner="", key_id_outer="",
                             wrapped_inner=env.wrapped_inner, wrapped_outer=env.wrapped_outer,
                             attrs=blob, epoch=env.epoch)
        if fits:
            assert md.metadata_size(candidate.to_metadata()) <= md.METADATA_LIMIT
        else:
            with pytest.raises(MetadataBudgetError):
                candidate.to_metadata()


# ---- the reference decoder ------------------------------------------------------------------------

def _objects(case) -> dict:
    ep = case["epoch"]
    return {ep["record_key"]: ({}, ep["record_json"].encode("ascii")),
            case["object_key"]: (case["metadata"], body(case))}


@pytest.mark.parametrize("case", LOCAL, ids=[c["name"] for c in LOCAL])
def test_reference_decoder_reads_from_the_master_keys(case):
    objects = _objects(case)
    reader = refdecoder.RefReader(objects.get, case["bucket"], ring(),
                                  refdecoder.split_trust("golden-inner", "golden-outer"))
    res = reader.read(case["object_key"])
    assert res.plaintext == plaintext(case["plaintext_len"])
    assert res.attrs == (H(case["attrs_plaintext"]) if case["with_attrs"] else None)
    assert res.generation == case["generation"] and res.epoch_prefix == case["epoch"]["prefix"]
    assert reader.epochs[(case["epoch"]["prefix"], H(case["epoch"]["epoch_id"]))] == eks(case)


@pytest.mark.parametrize("case", KMS, ids=[c["name"] for c in KMS])
def test_reference_decoder_reads_the_kms_case_from_its_epoch_keys(case):
    ep = case["epoch"]
    rec = refdecoder.parse_epoch_record(ep["record_json"].encode(), bucket=case["bucket"], prefix=ep["prefix"],
                                        epoch_id=H(ep["epoch_id"]))
    assert rec.provider == "kms" and len(rec.wrapped_inner) == 184
    reader = refdecoder.RefReader(_objects(case).get, case["bucket"], ring())
    with pytest.raises(refdecoder.KeyRefused, match="kms"):
        reader.read(case["object_key"])
    res = refdecoder.read_with_epoch_keys(case["metadata"], body(case), key=case["object_key"],
                                          bucket=case["bucket"], epoch_in=eks(case)[0], epoch_out=eks(case)[1])
    assert res.plaintext == plaintext(case["plaintext_len"])
    assert res.attrs == H(case["attrs_plaintext"])


def test_reference_decoder_fetches_each_record_once():
    firsts = [c for c in LOCAL if not c["successor_of"]]
    objects = {}
    for c in firsts:
        objects.update(_objects(c))
    reader = refdecoder.RefReader(objects.get, firsts[0]["bucket"], ring())
    for c in firsts:
        assert reader.read(c["object_key"]).plaintext == plaintext(c["plaintext_len"])
    assert len(firsts) == 7 and reader.records_fetched == 1


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reference_decoder_intermediates(case):
    env = refdecoder.parse_metadata(case["metadata"])
    h = env.header
    ep = case["epoch"]
    assert env.version == 2 and env.epoch_id.hex() == ep["epoch_id"] and env.depth == ep["depth"]
    assert refdecoder.epoch_prefix(case["object_key"], env.depth) == ep["prefix"]
    assert refdecoder.record_key(ep["prefix"], env.epoch_id) == ep["record_key"]
    dk_in, dk_out = dks(case)
    for layer, dk, name in ((refdecoder.INNER, dk_in, "inner"), (refdecoder.OUTER, dk_out, "outer")):
        k, cm, ak = refdecoder.derive(layer, dk, h)
        assert (k.hex(), cm.hex(), ak.hex()) == tuple(case["derived"][name][x] for x in ("key", "commit", "attrs_key"))
        assert refdecoder.chunk_prefix(h, layer).hex() == case[f"chunk_aad_prefix_{name}"]
        assert len(refdecoder.chunk_prefix(h, layer)) == 58
        assert refdecoder.attrs_aad(h, layer).hex() == case[f"attrs_aad_{name}"]
        ectx = refdecoder.epoch_context(layer, case["bucket"], ep["prefix"], ep["epoch_id"])
        assert ectx == ep["contexts"][name]
        assert refdecoder.canonical_context(ectx).decode() == ep["contexts_canonical"][name]
        octx = refdecoder.object_context_v2(layer, case["bucket"], case["object_key"], ep["epoch_id"])
        assert octx == case["object_contexts"][name]
        assert refdecoder.canonical_context(octx).decode() == case["object_contexts_canonical"][name]
        assert refdecoder.dk_wrap_aad(octx).hex() == case["dk_wrap"][name]["aad"]
        ek = eks(case)[0 if name == "inner" else 1]
        assert refdecoder.unwrap_dk_v2(ek, octx, H(case[f"wrapped_{name}"])) == dk
        if ep["wrapped_keys_real"]:
            kid = ep[f"key_id_{name}"]
            assert refdecoder.keyring_check(ring()[kid]).hex() == ep["wrap"][name]["check"]
            assert ep["wrap"][name]["aad"] == (b"\x02" + kid.encode() + b"\x00").hex() + \
                refdecoder.canonical_context(ectx).hex()
            assert refdecoder.unwrap_keyring_v2(ring()[kid], kid, ectx, H(ep["wrap"][name]["blob"])) == ek
    for ch in case["chunks"]:
        i = ch["index"]
        assert refdecoder.nonce(i).hex() == ch["nonce"]
        assert refdecoder.chunk_aad(h, refdecoder.INNER, i).hex() == ch["aad_inner"]
        assert refdecoder.chunk_aad(h, refdecoder.OUTER, i).hex() == ch["aad_outer"]
        assert len(H(ch["aad_inner"])) == 67 and ch["final"] == (i == h.n - 1)
    pt, attrs = refdecoder.decrypt_object(case["metadata"], body(case), dk_in, dk_out)
    assert pt == plaintext(case["plaintext_len"])
    assert attrs == (H(case["attrs_plaintext"]) if case["with_attrs"] else None)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cross_library_each_layer_is_standard_gcm(case):
    """Outer layer opened with cryptography, inner layer with pycryptodome; attributes likewise."""
    data = body(case)
    pt = plaintext(case["plaintext_len"])
    k_in, k_out = H(case["derived"]["inner"]["key"]), H(case["derived"]["outer"]["key"])
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
    if case["with_attrs"]:
        blob = H(case["attrs_blob_hex"])
        assert blob[:12].hex() == case["attrs_nonce"]
        mid = AESGCM(H(case["derived"]["outer"]["attrs_key"])).decrypt(blob[:12], blob[12:],
                                                                         H(case["attrs_aad_outer"]))
        dec = AES.new(H(case["derived"]["inner"]["attrs_key"]), AES.MODE_GCM, nonce=blob[:12], mac_len=16)
        dec.update(H(case["attrs_aad_inner"]))
        assert dec.decrypt_and_verify(mid[:-16], mid[-16:]) == H(case["attrs_plaintext"])
