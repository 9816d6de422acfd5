"""Negative tests for every rule format version 2 adds (docs/format.md section 17, and 18).

Each case is a real object written by dssefs's Vault to a LocalStore with a local keyring, then
altered in the store the way anyone who can write the bucket could alter it.  Every case is read
twice and must be refused both times, with the same kind of error:

- by dssefs: a fresh Vault (no cached keys) opens the object and verifies every chunk and the
  attribute blob;
- by tests/refdecoder.py, which reads the store's files and the keyring file itself.

Error kinds (section 11.3, 17.4, 17.5, 18): an integrity error, an *unsupported format* (a kind
of integrity error), a wrapped key that does not open (``WrappedKeyMismatch``), a keyring that
has another key of the name (``WrongKeyring``), an untrusted master key, not a dssefs object.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dssefs import kms
from dssefs.envelope import codec
from dssefs.envelope import format as fmt
from dssefs.envelope import metadata as md
from dssefs.envelope.codec import ObjectCipher
from dssefs.envelope.format import Header
from dssefs.envelope.keywrap import wrap_data_key
from dssefs.errors import (ConfigError, IntegrityError, KeyAccessDenied, KeyProviderError,
                           NotDssefsObject, UnsupportedFormat)
from dssefs.kms import WrappedKeyMismatch, WrongKeyring
from dssefs.kms.base import Layer, object_context_v2
from dssefs.objects import Vault, bytes_source
from dssefs.store import LocalStore

import refdecoder
from v1objects import write_v1

CL = 12
CS = 1 << CL
ATTRS_A = b'{"m":33152,"u":1000,"g":1000,"a":1,"t":2,"c":3}'   # 0600
ATTRS_B = b'{"m":33188,"u":1000,"g":1000,"a":4,"t":5,"c":6}'   # 0644


@dataclass
class Env:
    store: LocalStore
    provider: object
    vault: Vault
    ring: Path
    root: Path
    trust: refdecoder.Trust

    def fresh_vault(self, **kw) -> Vault:
        kw.setdefault("chunk_log2", CL)
        return Vault(self.store, self.provider, **kw)

    def reader(self, **kw) -> refdecoder.RefReader:
        kw.setdefault("trust", self.trust)
        trust = kw.pop("trust")
        return refdecoder.RefReader(refdecoder.LocalStoreFiles(str(self.root)).get, "local",
                                    refdecoder.load_keyring_file(self.ring.read_text()), trust, **kw)

    def master(self, name: str) -> bytes:
        return refdecoder.load_keyring_file(self.ring.read_text())[name]


def make_env(tmp_path, names=("default", "second"), inner=None, outer=None) -> Env:
    ring = tmp_path / "keyring"
    kms.create_keyring(ring, names=names)
    store = LocalStore(tmp_path / "store", min_part_size=4096, fsync=False)
    provider = kms.make_provider(keyring=str(ring), kms_key_id=inner, kms_key_id_outer=outer)
    trust = refdecoder.split_trust(inner or "default", outer or inner or "default")
    return Env(store, provider, Vault(store, provider, chunk_log2=CL), ring, tmp_path / "store", trust)


@pytest.fixture
def env(tmp_path) -> Env:
    return make_env(tmp_path)


def pattern(n: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(n))


# ---- reading and refusing -------------------------------------------------------------------------

def dssefs_read(env: Env, key: str, vault: Vault | None = None):
    obj = (vault or env.fresh_vault()).open(key)
    obj.verify()  # every chunk (even the empty one of an empty file) and the attribute blob
    return obj, obj.read(0, obj.size), obj.attrs()


KINDS = {
    # kind: (dssefs class, refdecoder class, dssefs classes it must not be, refdecoder ones)
    "integrity": (IntegrityError, refdecoder.Integrity, UnsupportedFormat, refdecoder.Unsupported),
    "any-integrity": (IntegrityError, refdecoder.Integrity, None, None),
    "unsupported": (UnsupportedFormat, refdecoder.Unsupported, None, None),
    "mismatch": (WrappedKeyMismatch, refdecoder.WrappedKeyMismatch, None, None),
    "wrong-keyring": (WrongKeyring, refdecoder.WrongKeyring, None, None),
    "untrusted": (KeyAccessDenied, refdecoder.Untrusted, WrappedKeyMismatch, None),
    "provider": (KeyProviderError, refdecoder.KeyRefused, None, None),
    "not-dssefs": (NotDssefsObject, refdecoder.NotDssefs, None, None),
}


def refused(env: Env, key: str, kind: str, match: str | None = None, *, vault: Vault | None = None,
            reader: refdecoder.RefReader | None = None) -> tuple[Exception, Exception]:
    """Both decoders refuse ``key`` with an error of ``kind``; ``match`` applies to both messages."""
    ours, ref, not_ours, not_ref = KINDS[kind]
    with pytest.raises(ours, match=match) as a:
        dssefs_read(env, key, vault)
    if not_ours is not None:
        assert not isinstance(a.value, not_ours), a.value
    with pytest.raises(ref, match=match) as b:
        (reader or env.reader()).read(key)
    if not_ref is not None:
        assert not isinstance(b.value, not_ref), b.value
    assert "Traceback" not in str(a.value)
    return a.value, b.value


def both_read(env: Env, key: str):
    obj, pt, attrs = dssefs_read(env, key)
    res = env.reader().read(key)
    assert (res.plaintext, res.attrs, res.generation) == (pt, attrs, obj.generation)
    return obj, res


# ---- editing the store ----------------------------------------------------------------------------

def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def meta_of(env: Env, key: str) -> dict[str, str]:
    return dict(env.store.head(key).metadata)


def body_of(env: Env, key: str) -> bytes:
    return bytes(env.store.get_range(key, 0, env.store.head(key).size)[0])


def set_meta(env: Env, key: str, meta: dict[str, str]) -> None:
    env.store.copy(key, key, meta)


def header_of(meta: dict[str, str]) -> bytearray:
    return bytearray(md.b64decode(meta["dsse-h"], "dsse-h"))


def chunks_of(body: bytes, n_chunks: int) -> list[bytes]:
    step = CS + 32
    return [body[i * step:(i + 1) * step] for i in range(n_chunks)]


def record_key_of(env: Env, key: str) -> str:
    e = refdecoder.parse_metadata(meta_of(env, key))
    return refdecoder.record_key(refdecoder.epoch_prefix(key, e.depth), e.epoch_id)


def edit_record(env: Env, key: str, change) -> None:
    """``change(doc)`` edits the parsed record in place, or returns the new record bytes."""
    rk = record_key_of(env, key)
    doc = json.loads(body_of(env, rk))
    new = change(doc)
    if new is None:
        new = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("ascii")
    env.store.put(rk, new, {})


def write(env: Env, key: str, n: int = 3 * CS - 5, attrs: bytes | None = ATTRS_A, vault: Vault | None = None,
          seed: int = 0, **kw):
    return (vault or env.vault).write(key, bytes_source(pattern(n, seed)), n, attrs=attrs, **kw)


# ---- 17.2: header flags and the attribute blob ------------------------------------------------------

@pytest.mark.parametrize("flags", [0x04, 0x05, 0x06, 0x40, 0x80, 0xFF])
@pytest.mark.parametrize("attrs", [None, ATTRS_A], ids=["no-attrs", "attrs"])
def test_flag_bits_other_than_attrs_and_sparse_are_unsupported(env, flags, attrs):
    write(env, "f/x", attrs=attrs)
    meta = meta_of(env, "f/x")
    raw = header_of(meta)
    raw[3] = flags
    set_meta(env, "f/x", {**meta, "dsse-h": b64u(bytes(raw))})
    refused(env, "f/x", "unsupported")


@pytest.mark.parametrize("attrs", [None, ATTRS_A], ids=["no-attrs", "attrs"])
def test_sparse_flag_set_on_a_dense_object_fails(env, attrs):
    write(env, "f/x", attrs=attrs)
    meta = meta_of(env, "f/x")
    raw = header_of(meta)
    raw[3] |= 0x02
    set_meta(env, "f/x", {**meta, "dsse-h": b64u(bytes(raw))})
    refused(env, "f/x", "integrity")


def test_flag_set_but_attribute_blob_removed(env):
    write(env, "f/x", attrs=ATTRS_A)
    meta = meta_of(env, "f/x")
    del meta["dsse-a"]
    set_meta(env, "f/x", meta)
    refused(env, "f/x", "integrity", "dsse-a")


def test_attribute_blob_present_without_the_flag(env):
    write(env, "f/x", attrs=None)
    write(env, "f/y", attrs=ATTRS_A)
    set_meta(env, "f/x", {**meta_of(env, "f/x"), "dsse-a": meta_of(env, "f/y")["dsse-a"]})
    refused(env, "f/x", "integrity", "dsse-a")


def test_blob_put_back_after_the_attributes_were_removed(env):
    obj = write(env, "f/x", attrs=ATTRS_A)
    old_blob = meta_of(env, "f/x")["dsse-a"]
    env.vault.update_attrs(obj, None)
    assert "dsse-a" not in meta_of(env, "f/x")
    set_meta(env, "f/x", {**meta_of(env, "f/x"), "dsse-a": old_blob})
    refused(env, "f/x", "integrity", "dsse-a")


def test_flag_cleared_and_blob_removed_fails_the_commitments(env):
    """Deleting the blob AND clearing the flag (the v1 downgrade of a 0600 file to default
    attributes) passes the metadata rules but not the commitments: flags is a bound field."""
    write(env, "f/x", attrs=ATTRS_A)
    meta = meta_of(env, "f/x")
    raw = header_of(meta)
    raw[3] = 0
    del meta["dsse-a"]
    set_meta(env, "f/x", {**meta, "dsse-h": b64u(bytes(raw))})
    refused(env, "f/x", "integrity", "commitment")


def test_older_blob_of_the_same_object_fails_under_the_new_header(env):
    obj = write(env, "f/x", attrs=ATTRS_A)
    old_blob = meta_of(env, "f/x")["dsse-a"]
    env.vault.update_attrs(obj, ATTRS_B)
    _, res = both_read(env, "f/x")
    assert res.attrs == ATTRS_B and res.generation == 1
    set_meta(env, "f/x", {**meta_of(env, "f/x"), "dsse-a": old_blob})
    refused(env, "f/x", "integrity", "attrib|tag")


def test_old_header_and_old_blob_together_are_a_rollback_with_a_lower_generation(env):
    """The documented semantics (14, 17.6): a complete older version is valid on its own; only
    its lower generation tells it apart."""
    obj = write(env, "f/x", attrs=ATTRS_A, generation=5)
    old = meta_of(env, "f/x")
    obj = env.vault.update_attrs(obj, ATTRS_B)
    env.vault.update_attrs(obj, None)
    newest, res_new = both_read(env, "f/x")
    assert newest.generation == res_new.generation == 7 and res_new.attrs is None
    set_meta(env, "f/x", old)
    rolled, res_old = both_read(env, "f/x")
    assert rolled.generation == res_old.generation == 5 < newest.generation
    assert rolled.attrs() == res_old.attrs == ATTRS_A
    assert rolled.file_id == newest.file_id


def test_older_content_version_put_back_is_a_rollback_too(env):
    write(env, "f/x", seed=1, generation=0)
    old_meta, old_body = meta_of(env, "f/x"), body_of(env, "f/x")
    first = env.vault.open("f/x")
    write(env, "f/x", seed=2, generation=1, file_id=first.file_id)
    env.store.put("f/x", old_body, old_meta)
    obj, res = both_read(env, "f/x")
    assert obj.generation == res.generation == 0 and res.plaintext == pattern(3 * CS - 5, 1)


# ---- 17.7: metadata keys ----------------------------------------------------------------------------

def test_dsse_w_in_a_version_2_object(env):
    write(env, "m/x")
    set_meta(env, "m/x", {**meta_of(env, "m/x"), "dsse-w": "local;default;default"})
    refused(env, "m/x", "integrity", "dsse-w")


def test_dsse_e_in_a_version_1_object(env):
    write_v1(env.store, env.provider, "m/v1", pattern(100))
    both_read(env, "m/v1")
    write(env, "m/v2")
    set_meta(env, "m/v1", {**meta_of(env, "m/v1"), "dsse-e": meta_of(env, "m/v2")["dsse-e"]})
    refused(env, "m/v1", "integrity", "dsse-e")


def test_dsse_e_missing(env):
    write(env, "m/x")
    meta = meta_of(env, "m/x")
    del meta["dsse-e"]
    set_meta(env, "m/x", meta)
    refused(env, "m/x", "integrity", "dsse-e")


@pytest.mark.parametrize("mangle", [
    pytest.param(lambda e, d: e.upper() + f";{d}", id="uppercase-hex"),
    pytest.param(lambda e, d: e[:5] + "A" + e[6:] + f";{d}", id="one-uppercase-digit"),
    pytest.param(lambda e, d: e + f";0{d}", id="leading-zero"),
    pytest.param(lambda e, d: e + ";00", id="double-zero"),
    pytest.param(lambda e, d: e + ";+1", id="plus-sign"),
    pytest.param(lambda e, d: e + ";-1", id="negative"),
    pytest.param(lambda e, d: e + ";10000", id="five-digits"),
    pytest.param(lambda e, d: e + ";", id="no-depth"),
    pytest.param(lambda e, d: e, id="no-separator"),
    pytest.param(lambda e, d: e + f":{d}", id="colon"),
    pytest.param(lambda e, d: e + f";{d};{d}", id="two-depths"),
    pytest.param(lambda e, d: e[:-1] + f";{d}", id="31-hex-digits"),
    pytest.param(lambda e, d: e + f"0;{d}", id="33-hex-digits"),
    pytest.param(lambda e, d: e[:-1] + f"g;{d}", id="not-hex"),
    pytest.param(lambda e, d: e + f";\u0661", id="arabic-indic-digit"),
    pytest.param(lambda e, d: e + f";{d}\n", id="trailing-newline"),
])
def test_malformed_epoch_reference(env, mangle):
    write(env, "m/x")
    meta = meta_of(env, "m/x")
    eid, depth = meta["dsse-e"].split(";")
    bad = {**meta, "dsse-e": mangle(eid, depth)}
    with pytest.raises(IntegrityError, match="dsse-e"):
        md.parse(bad)
    with pytest.raises(refdecoder.Integrity, match="dsse-e"):
        refdecoder.parse_metadata(bad)
    try:
        set_meta(env, "m/x", bad)
    except ValueError:
        return  # the store itself refuses it (not printable ASCII, or a trailing blank)
    refused(env, "m/x", "integrity", "dsse-e")


def test_epoch_depth_deeper_than_the_key(env):
    write(env, "m/x")
    meta = meta_of(env, "m/x")
    eid = meta["dsse-e"].split(";")[0]
    for depth in (2, 3, 9999):
        set_meta(env, "m/x", {**meta, "dsse-e": f"{eid};{depth}"})
        refused(env, "m/x", "integrity", "depth")


def test_epoch_depth_covering_the_whole_key(env):
    """A marker key whose depth makes ``P`` the whole key.  The earlier wording of 17.4 refuses it
    outright; docs/format.md allows it for directory markers (a prefix mount's root marker), so
    here it names a record that does not exist, and is refused for that."""
    write(env, "m/sub/", n=0)
    meta = meta_of(env, "m/sub/")
    eid, depth = meta["dsse-e"].split(";")
    assert depth == "1"  # the parent of m/sub: the object commands' rule
    set_meta(env, "m/sub/", {**meta, "dsse-e": f"{eid};2"})
    with pytest.raises(refdecoder.Integrity, match="whole key"):
        env.reader(marker_root=False).read("m/sub/")
    refused(env, "m/sub/", "integrity", "missing")


def test_metadata_rules_of_section_9_1_apply(env):
    write(env, "m/x")
    meta = meta_of(env, "m/x")
    for bad in ({**{k: v for k, v in meta.items() if k != "dsse-e"}, "DSSE-E": meta["dsse-e"]},
                {**meta, "dsse-x": "1"},
                {**meta, "dsse-e": meta["dsse-e"][:-1] + "\u0661"},
                {**meta, "dsse-ki": meta["dsse-ki"] + "="}):
        with pytest.raises(IntegrityError):
            md.parse(bad)
        with pytest.raises(refdecoder.Integrity):
            refdecoder.parse_metadata(bad)


# ---- 17.4: wrapped data keys ------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["dsse-ki", "dsse-ko"])
@pytest.mark.parametrize("change,kind", [
    pytest.param(lambda b: b[:-1], "integrity", id="60-bytes"),
    pytest.param(lambda b: b + b"\x00", "integrity", id="62-bytes"),
    pytest.param(lambda b: b + bytes(8), "integrity", id="69-bytes"),
    pytest.param(lambda b: b"", "integrity", id="empty"),
    pytest.param(lambda b: b"\x01" + b[1:], "unsupported", id="first-byte-1"),
    pytest.param(lambda b: b"\x03" + b[1:], "unsupported", id="first-byte-3"),
    pytest.param(lambda b: b[:20] + bytes([b[20] ^ 1]) + b[21:], "mismatch", id="ciphertext-bit"),
    pytest.param(lambda b: b[:5] + bytes([b[5] ^ 0x80]) + b[6:], "mismatch", id="nonce-bit"),
    pytest.param(lambda b: b[:-1] + bytes([b[-1] ^ 1]), "mismatch", id="tag-bit"),
])
def test_wrapped_data_key_malformed_or_altered(env, which, change, kind):
    write(env, "k/x")
    meta = meta_of(env, "k/x")
    blob = md.b64decode(meta[which], which)
    set_meta(env, "k/x", {**meta, which: b64u(change(blob))})
    refused(env, "k/x", kind)


def test_data_key_blobs_swapped_between_the_layers(env):
    write(env, "k/x")
    meta = meta_of(env, "k/x")
    set_meta(env, "k/x", {**meta, "dsse-ki": meta["dsse-ko"], "dsse-ko": meta["dsse-ki"]})
    refused(env, "k/x", "mismatch")


def test_wrapped_keys_of_another_object_of_the_same_epoch(env):
    write(env, "k/x")
    write(env, "k/y", seed=3)
    set_meta(env, "k/x", {**meta_of(env, "k/x"), "dsse-ki": meta_of(env, "k/y")["dsse-ki"]})
    refused(env, "k/x", "mismatch")


def test_object_copied_to_another_key_does_not_open(env):
    write(env, "k/x")
    env.store.copy("k/x", "k/copy", meta_of(env, "k/x"))
    both_read(env, "k/x")
    refused(env, "k/copy", "mismatch")


def test_object_copied_to_another_directory_finds_no_record(env):
    write(env, "k/x")
    env.store.copy("k/x", "other/x", meta_of(env, "k/x"))
    refused(env, "other/x", "integrity", "restore")


def test_object_moved_to_another_epochs_reference(env):
    vault = env.fresh_vault(epoch_max_objects=1)  # one epoch per object
    write(env, "e/a", vault=vault)
    write(env, "e/b", vault=vault)
    ref_a, ref_b = meta_of(env, "e/a")["dsse-e"], meta_of(env, "e/b")["dsse-e"]
    assert ref_a != ref_b and record_key_of(env, "e/a") != record_key_of(env, "e/b")
    set_meta(env, "e/a", {**meta_of(env, "e/a"), "dsse-e": ref_b})
    refused(env, "e/a", "mismatch")


def test_epoch_reference_moved_to_another_prefix(env):
    write(env, "e/sub/x")
    meta = meta_of(env, "e/sub/x")
    eid = meta["dsse-e"].split(";")[0]
    assert meta["dsse-e"].endswith(";2")
    for depth in (0, 1):
        set_meta(env, "e/sub/x", {**meta, "dsse-e": f"{eid};{depth}"})
        refused(env, "e/sub/x", "integrity", "restore")


def test_record_copied_to_the_other_prefix_does_not_unwrap(env):
    """Even a record copied to where the altered reference points fails: the prefix is in the
    record and in the epoch keys' context."""
    write(env, "e/sub/x")
    meta = meta_of(env, "e/sub/x")
    rk = record_key_of(env, "e/sub/x")
    env.store.put(rk.replace("e/sub/", "e/", 1), body_of(env, rk), {})
    set_meta(env, "e/sub/x", {**meta, "dsse-e": meta["dsse-e"][:-1] + "1"})
    refused(env, "e/sub/x", "integrity", "prefix")

    def other_prefix(doc):
        doc["prefix"] = "e/"
    edit_record(env, "e/sub/x", other_prefix)  # now the record says e/: its blobs do not open
    refused(env, "e/sub/x", "mismatch")


def test_both_layers_with_one_data_key_are_refused(env):
    """17.4: DK_in and DK_out MUST differ.  Built by hand (dssefs refuses to write it)."""
    write(env, "k/seed")  # starts the epoch of k/
    meta = meta_of(env, "k/seed")
    eid = bytes.fromhex(meta["dsse-e"].split(";")[0])
    epoch = env.vault.epochs.for_reading("k/", eid)
    dk, msg_id, pt = os.urandom(32), os.urandom(32), pattern(100)
    draft = Header(chunk_log2=CL, generation=0, plaintext_len=len(pt), file_id=os.urandom(16),
                   msg_id=msg_id, commit_inner=bytes(32), commit_outer=bytes(32), version=2)
    prks = (codec._prk_inner(dk, msg_id), codec._prk_outer(dk, msg_id))
    cipher = ObjectCipher(codec._committed(draft, prks), prks=prks)
    wrapped = [wrap_data_key(lb, ek, dk, object_context_v2(layer, "local", "k/same", eid.hex()))
               for lb, ek, layer in ((fmt.LAYER_INNER, epoch.key_inner, Layer.INNER),
                                     (fmt.LAYER_OUTER, epoch.key_outer, Layer.OUTER))]
    env.store.put("k/same", bytes(cipher.seal_chunk(0, pt)),
                  {"dsse-h": b64u(cipher.header_bytes), "dsse-ki": b64u(wrapped[0]),
                   "dsse-ko": b64u(wrapped[1]), "dsse-e": meta["dsse-e"]})
    refused(env, "k/same", "integrity", "same data key")


# ---- 17.4 / 17.5: epoch records ---------------------------------------------------------------------

def test_missing_record_names_the_fix(env):
    write(env, "r/x")
    env.store.delete(record_key_of(env, "r/x"))
    ours, ref = refused(env, "r/x", "integrity", "missing")
    assert "restore" in str(ours) and ".dssefs/epochs/" in str(ours)
    assert "restore" in str(ref)


def _set(member, value):
    def change(doc):
        doc[member] = value
    return change


def _set_layer(layer, member, value):
    def change(doc):
        doc[layer][member] = value
    return change


def _drop(member):
    def change(doc):
        del doc[member]
    return change


def _raw(fn):
    """A change producing raw record bytes from the canonical ones."""
    def change(doc):
        return fn(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("ascii"), doc)
    return change


@pytest.mark.parametrize("change,kind,match", [
    pytest.param(_set("epoch", "0" * 32), "integrity", "epoch", id="other-epoch-id"),
    pytest.param(lambda d: d.update(epoch=d["epoch"].upper()), "integrity", "epoch", id="uppercase-epoch-id"),
    pytest.param(_set("prefix", "elsewhere/"), "integrity", "prefix", id="other-prefix"),
    pytest.param(_set("prefix", ""), "integrity", "prefix", id="empty-prefix"),
    pytest.param(_set("bucket", "golden-bucket"), "integrity", "bucket", id="other-bucket"),
    pytest.param(_set("note", "hello"), "integrity", "field|member", id="extra-field"),
    pytest.param(_drop("created"), "integrity", "field|member", id="missing-created"),
    pytest.param(_drop("outer"), "integrity", "field|member", id="missing-outer"),
    pytest.param(_set("version", 3), "unsupported", "version", id="version-3"),
    pytest.param(_set("version", 1), "unsupported", "version", id="version-1"),
    pytest.param(_set("version", "2"), "any-integrity", "version", id="version-string"),
    pytest.param(_set("version", 2.0), "any-integrity", "version", id="version-float"),
    pytest.param(_set("format", "dssefs-epochs"), "integrity", "record", id="other-format"),
    pytest.param(_set("provider", "vault"), "unsupported", "provider", id="unknown-provider"),
    pytest.param(_set("created", "yesterday"), "integrity", "created|creation", id="bad-created"),
    pytest.param(_set("created", 20250101), "integrity", "created|string", id="created-not-string"),
    pytest.param(_set("created", "\u0662\u0660\u0662\u0665-01-01T00:00:00Z"), "integrity", "created|creation",
                 id="created-non-ascii-digits"),
    pytest.param(_set_layer("inner", "extra", 1), "integrity", "inner", id="extra-layer-member"),
    pytest.param(_set_layer("outer", "key_id", "bad name!"), "integrity", "outer", id="bad-key-id"),
    pytest.param(_set_layer("inner", "wrapped", "not base64!"), "integrity", "base64", id="bad-base64"),
    pytest.param(_raw(lambda raw, d: raw + b" " * (16 * 1024 + 1 - len(raw))), "integrity",
                 "16|bytes", id="larger-than-16KiB"),
    pytest.param(_raw(lambda raw, d: raw.replace(b'"created"', b'"cr\xc3\xa9ated"')), "integrity",
                 "ASCII", id="not-ascii"),
    pytest.param(_raw(lambda raw, d: raw[:-1]), "integrity", "JSON", id="not-json"),
    pytest.param(_raw(lambda raw, d: b"[" + raw + b"]"), "integrity", "record", id="json-array"),
])
def test_tampered_epoch_record(env, change, kind, match):
    write(env, "r/x")
    edit_record(env, "r/x", change)
    refused(env, "r/x", kind, match)


def test_record_layout_is_free_but_members_are_not(env):
    """17.4: any JSON whitespace and key order is accepted."""
    write(env, "r/x")
    edit_record(env, "r/x", lambda doc: json.dumps(dict(reversed(list(doc.items()))), indent=3).encode())
    both_read(env, "r/x")


@pytest.mark.parametrize("change,kind", [
    pytest.param(lambda d: d.update(inner=d["outer"], outer=d["inner"]), "mismatch", id="blobs-swapped"),
    pytest.param(lambda d: d["inner"].update(wrapped=d["outer"]["wrapped"]), "mismatch", id="outer-blob-as-inner"),
    pytest.param(lambda d: d["outer"].update(wrapped=d["outer"]["wrapped"][:40] +
                                             ("A" if d["outer"]["wrapped"][40] != "A" else "B") +
                                             d["outer"]["wrapped"][41:]), "mismatch", id="blob-bit"),
    pytest.param(lambda d: d["inner"].update(key_id="second"), "wrong-keyring", id="other-key-of-the-keyring"),
    pytest.param(lambda d: d["inner"].update(key_id="absent"), "provider", id="key-not-in-keyring"),
    pytest.param(_set("provider", "kms"), "provider", id="provider-kms"),
])
def test_record_blobs_or_key_names_altered(env, change, kind):
    write(env, "r/x")
    edit_record(env, "r/x", change)
    refused(env, "r/x", kind)


def test_record_blob_check_value_altered(env):
    write(env, "r/x")

    def change(doc):
        blob = bytearray(md.b64decode(doc["inner"]["wrapped"], "w"))
        blob[3] ^= 0x10  # inside the 8-byte check value: the blob still opens
        doc["inner"]["wrapped"] = b64u(bytes(blob))
    edit_record(env, "r/x", change)
    refused(env, "r/x", "mismatch", "check value")


def test_record_in_version_1_keyring_format(env):
    """A 61-byte 0x01 blob in a record: version 2 contexts take only the 69-byte blob (17.5)."""
    write(env, "r/x")
    rec = json.loads(body_of(env, record_key_of(env, "r/x")))

    def change(doc):
        blob = md.b64decode(doc["inner"]["wrapped"], "w")
        doc["inner"]["wrapped"] = b64u(b"\x01" + blob[9:])
    edit_record(env, "r/x", change)
    assert rec["inner"]["key_id"] == "default"
    refused(env, "r/x", "mismatch")


def test_another_keyring_with_the_same_key_name(env, tmp_path):
    write(env, "r/x")
    (tmp_path / "other").mkdir()
    other = make_env(tmp_path / "other")  # its own 'default' key
    vault = Vault(env.store, other.provider, chunk_log2=CL)
    reader = refdecoder.RefReader(refdecoder.LocalStoreFiles(str(env.root)).get, "local",
                                  refdecoder.load_keyring_file(other.ring.read_text()))
    ours, ref = refused(env, "r/x", "wrong-keyring", vault=vault, reader=reader)
    mine = [k.check for k in kms.list_keys(str(env.ring)) if k.name == "default"][0]
    assert mine in str(ours) and mine in str(ref)


# ---- 18: which master keys are trusted ----------------------------------------------------------------

@pytest.fixture
def split(tmp_path) -> Env:
    return make_env(tmp_path, names=("k-in", "k-out", "spare"), inner="k-in", outer="k-out")


def test_split_custody_reads_its_own_objects(split):
    write(split, "s/x")
    both_read(split, "s/x")


def test_split_custody_refuses_swapped_layers(split):
    write(split, "s/x")
    edit_record(split, "s/x", lambda d: d.update(inner=d["outer"], outer=d["inner"]))
    ours, _ = refused(split, "s/x", "untrusted")
    assert "inner" in str(ours)


def _keyring_v2_blob(env: Env, name: str, layer: str, record: dict, epoch_key: bytes) -> bytes:
    ctx = refdecoder.epoch_context(refdecoder.INNER if layer == "inner" else refdecoder.OUTER, "local",
                                   record["prefix"], record["epoch"])
    master = env.master(name)
    nonce = os.urandom(12)
    aad = b"\x02" + name.encode() + b"\x00" + refdecoder.canonical_context(ctx)
    return b"\x02" + refdecoder.keyring_check(master) + nonce + AESGCM(master).encrypt(nonce, epoch_key, aad)


@pytest.mark.parametrize("name", ["k-in", "spare"])
def test_split_custody_refuses_an_outer_layer_wrapped_by_another_key(split, name):
    """A record whose outer epoch key is wrapped (correctly) under a key not trusted for the outer
    layer is refused before anything is unwrapped with it."""
    write(split, "s/x")
    rk = record_key_of(split, "s/x")
    record = json.loads(body_of(split, rk))
    ek_out = split.reader().epoch_keys(record["prefix"], bytes.fromhex(record["epoch"]))[1]

    def change(doc):
        doc["outer"] = {"key_id": name, "wrapped": b64u(_keyring_v2_blob(split, name, "outer", doc, ek_out))}
    edit_record(split, "s/x", change)
    # with one key name serving both layers every keyring key is trusted, and the blob opens
    assert refdecoder.RefReader(refdecoder.LocalStoreFiles(str(split.root)).get, "local",
                                refdecoder.load_keyring_file(split.ring.read_text())).read("s/x")
    ours, _ = refused(split, "s/x", "untrusted")
    assert "outer" in str(ours)


# ---- 17.1: relabelled versions --------------------------------------------------------------------

def test_version_1_object_relabelled_as_version_2(env):
    """Everything a version 2 reader checks before the commitments is made consistent (header byte,
    dsse-e, data keys wrapped under a real epoch for this key); the commitments, computed with
    "dssefs1", do not verify under "dssefs2"."""
    write_v1(env.store, env.provider, "v/x", pattern(5000))
    dk = env.fresh_vault().open("v/x").data_keys
    write(env, "v/seed")
    ref = meta_of(env, "v/seed")["dsse-e"]
    eid = bytes.fromhex(ref.split(";")[0])
    epoch = env.vault.epochs.for_reading("v/", eid)
    meta = meta_of(env, "v/x")
    raw = header_of(meta)
    raw[0] = 2
    new = {"dsse-h": b64u(bytes(raw)), "dsse-e": ref,
           "dsse-ki": b64u(wrap_data_key(fmt.LAYER_INNER, epoch.key_inner, dk.inner,
                                         object_context_v2(Layer.INNER, "local", "v/x", eid.hex()))),
           "dsse-ko": b64u(wrap_data_key(fmt.LAYER_OUTER, epoch.key_outer, dk.outer,
                                         object_context_v2(Layer.OUTER, "local", "v/x", eid.hex())))}
    env.store.put("v/x", body_of(env, "v/x"), new)
    refused(env, "v/x", "integrity", "commitment")


def test_version_2_object_relabelled_as_version_1(env):
    write(env, "v/x", attrs=None)
    dk = env.fresh_vault().open("v/x").data_keys
    meta = meta_of(env, "v/x")
    raw = header_of(meta)
    raw[0] = 1
    wrapped = {}
    for layer, key in (("inner", dk.inner), ("outer", dk.outer)):
        ctx = {"dssefs:v": "1", "dssefs:layer": layer, "dssefs:bucket": "local", "dssefs:key": "v/x"}
        nonce = os.urandom(12)
        aad = b"\x01default\x00" + refdecoder.canonical_context(ctx)
        wrapped[layer] = b"\x01" + nonce + AESGCM(env.master("default")).encrypt(nonce, key, aad)
    new = {"dsse-h": b64u(bytes(raw)), "dsse-w": "local;default;default",
           "dsse-ki": b64u(wrapped["inner"]), "dsse-ko": b64u(wrapped["outer"])}
    env.store.put("v/x", body_of(env, "v/x"), new)
    refused(env, "v/x", "integrity", "commitment")


# ---- 17.3: chunks -------------------------------------------------------------------------------------

def test_chunk_swapped_between_two_objects(env):
    write(env, "c/a", seed=1)
    write(env, "c/b", seed=2)
    a, b = chunks_of(body_of(env, "c/a"), 3), chunks_of(body_of(env, "c/b"), 3)
    env.store.put("c/a", a[0] + b[1] + a[2], meta_of(env, "c/a"))
    refused(env, "c/a", "integrity", "chunk 1")


def test_chunk_of_an_earlier_version_of_the_same_file(env):
    obj = write(env, "c/a", seed=1)
    old = chunks_of(body_of(env, "c/a"), 3)
    write(env, "c/a", seed=2, file_id=obj.file_id, generation=1)
    new = chunks_of(body_of(env, "c/a"), 3)
    env.store.put("c/a", new[0] + new[1] + old[2], meta_of(env, "c/a"))
    refused(env, "c/a", "integrity", "chunk 2")


def test_reordered_chunks(env):
    write(env, "c/a", n=3 * CS)
    ch = chunks_of(body_of(env, "c/a"), 3)
    env.store.put("c/a", ch[1] + ch[0] + ch[2], meta_of(env, "c/a"))
    refused(env, "c/a", "integrity", "chunk 0")


def test_last_chunk_dropped(env):
    write(env, "c/a")
    env.store.put("c/a", b"".join(chunks_of(body_of(env, "c/a"), 3)[:2]), meta_of(env, "c/a"))
    refused(env, "c/a", "integrity", "size|bytes")


def test_extended_body(env):
    write(env, "c/a")
    env.store.put("c/a", body_of(env, "c/a") + bytes(32), meta_of(env, "c/a"))
    refused(env, "c/a", "integrity", "size|bytes")


@pytest.mark.parametrize("attrs", [None, ATTRS_A], ids=["no-attrs", "attrs"])
def test_truncation_at_a_chunk_boundary_with_a_valid_header(env, attrs):
    """The hardest truncation: someone holding the data keys writes a header with the shorter
    length and the same message id, so the commitments verify and the chunk keys and AADs are
    the same as before (nothing in a version 2 chunk AAD depends on the length).  The kept last
    chunk was sealed with final = 0, and that alone refuses it."""
    write(env, "c/a", n=3 * CS - 5, attrs=attrs)
    obj = env.fresh_vault().open("c/a")
    h = obj.header
    short = ObjectCipher.new_version(obj.data_keys.inner, obj.data_keys.outer, plaintext_len=2 * CS,
                                     file_id=h.file_id, version=2, generation=h.generation,
                                     chunk_log2=CL, msg_id=h.msg_id, with_attrs=attrs is not None)
    meta = {**meta_of(env, "c/a"), "dsse-h": b64u(short.header_bytes)}
    if attrs is not None:
        meta["dsse-a"] = b64u(short.seal_attrs(attrs))
    env.store.put("c/a", b"".join(chunks_of(body_of(env, "c/a"), 3)[:2]), meta)
    refused(env, "c/a", "integrity", "chunk 1")
    # the first chunk is still authentic on its own (chunks verify independently, 11.2 step 6)
    assert env.fresh_vault().open("c/a").read(0, 10) == pattern(10)


def test_a_final_chunk_cannot_be_followed(env):
    """The converse: a header claiming one more chunk than was sealed as final."""
    write(env, "c/a", n=2 * CS, attrs=None)
    obj = env.fresh_vault().open("c/a")
    h = obj.header
    longer = ObjectCipher.new_version(obj.data_keys.inner, obj.data_keys.outer, plaintext_len=3 * CS,
                                      file_id=h.file_id, version=2, generation=h.generation,
                                      chunk_log2=CL, msg_id=h.msg_id)
    ch = chunks_of(body_of(env, "c/a"), 2)
    env.store.put("c/a", ch[0] + ch[1] + ch[1], {**meta_of(env, "c/a"), "dsse-h": b64u(longer.header_bytes)})
    refused(env, "c/a", "integrity", "chunk 1")


# ---- 17.8 step 3: the reserved name ---------------------------------------------------------------

@pytest.mark.parametrize("key", [".dssefs/x", "a/.dssefs/x", "a/.dssefs", "a/.dssefs/epochs/00"])
def test_keys_with_a_dssefs_component_are_never_files(env, key):
    with pytest.raises(ConfigError, match=".dssefs"):
        env.vault.write(key, bytes_source(b"x"), 1)
    write(env, "a/real")
    env.store.copy("a/real", key, meta_of(env, "a/real"))
    refused(env, key, "integrity", ".dssefs")


def test_rename_into_a_dssefs_name_is_refused(env):
    obj = write(env, "a/real")
    try:
        env.vault.rename(obj, "a/.dssefs/x")
    except ConfigError:
        return
    raise AssertionError("renamed into a reserved name")


def test_similar_names_are_ordinary_files(env):
    for key in ("a/.dssefsx/f", "a/x.dssefs", "a/..dssefs/f"):
        write(env, key)
        both_read(env, key)


def test_an_epoch_record_is_not_a_dssefs_object(env):
    write(env, "a/x")
    rk = record_key_of(env, "a/x")
    with pytest.raises(NotDssefsObject):
        env.fresh_vault().open(rk)
    with pytest.raises(refdecoder.NotDssefs):
        env.reader().read(rk)


def test_metadata_stripped_is_not_a_dssefs_object(env):
    write(env, "a/x")
    set_meta(env, "a/x", {"owner": "someone"})
    refused(env, "a/x", "not-dssefs")


def test_a_records_name_gives_back_its_epoch_id_and_nothing_else_does():
    from dssefs.envelope.epoch import EPOCH_DIR, record_epoch_id, record_key

    epoch_id = bytes(range(16))
    key = record_key("team/", epoch_id)
    assert record_epoch_id(key[len("team/" + EPOCH_DIR):]) == epoch_id
    for name in ("", epoch_id.hex()[:-1], epoch_id.hex() + "0", epoch_id.hex().upper(),
                 " " + epoch_id.hex()[1:], epoch_id.hex()[:-1] + "g"):
        assert record_epoch_id(name) is None, name
