"""tests/refdecoder.py reads what dssefs writes (format version 2), straight from disk.

Objects are written by dssefs's Vault to a LocalStore with a local keyring; the reference decoder
reads the store's object files itself (appendix A), the keyring file itself (appendix C) and
follows 17.8: epoch reference, record, keyring unwrap, data keys, commitments, chunks, attributes.
No dssefs code is between the bytes on disk and the decoder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from dssefs import kms
from dssefs.objects import Vault, bytes_source
from dssefs.store import LocalStore

import refdecoder
from v1objects import write_v1

CL = 12
CS = 1 << CL


@dataclass
class Env:
    store: LocalStore
    provider: object
    vault: Vault
    ring: Path
    root: Path

    def reader(self, trust: refdecoder.Trust = refdecoder.Trust(), **kw) -> refdecoder.RefReader:
        return refdecoder.RefReader(refdecoder.LocalStoreFiles(str(self.root)).get, "local",
                                    refdecoder.load_keyring_file(self.ring.read_text()), trust, **kw)

    def vault_with(self, **kw) -> Vault:
        kw.setdefault("chunk_log2", CL)
        return Vault(self.store, self.provider, **kw)


def make_env(tmp_path, names=("default", "second"), inner=None, outer=None) -> Env:
    ring = tmp_path / "keyring"
    kms.create_keyring(ring, names=names)
    store = LocalStore(tmp_path / "store", min_part_size=4096, fsync=False)
    provider = kms.make_provider(keyring=str(ring), kms_key_id=inner, kms_key_id_outer=outer)
    return Env(store, provider, Vault(store, provider, chunk_log2=CL), ring, tmp_path / "store")


@pytest.fixture
def env(tmp_path) -> Env:
    return make_env(tmp_path)


def data(n: int, seed: int = 0) -> bytes:
    return bytes((i * 31 + seed) % 256 for i in range(n))


ATTRS = b'{"m":33188,"u":1000,"g":1000,"a":1,"t":2,"c":3}'


@pytest.mark.parametrize("size", [0, 1, CS - 1, CS, CS + 1, 3 * CS - 1, 100_000])
@pytest.mark.parametrize("attrs", [None, ATTRS], ids=["no-attrs", "attrs"])
def test_reads_what_the_vault_writes(env, size, attrs):
    pt = data(size)
    env.vault.write("dir/obj", bytes_source(pt), size, attrs=attrs, generation=7)
    res = env.reader().read("dir/obj")
    assert res.plaintext == pt and res.attrs == attrs and res.generation == 7
    assert res.header.version == 2 and res.header.has_attrs == (attrs is not None)
    assert res.epoch_prefix == "dir/" and res.envelope.depth == 1
    # the same object as dssefs's store interface returns it
    info = env.store.head("dir/obj")
    body, _ = env.store.get_range("dir/obj", 0, info.size)
    assert env.reader().read_object("dir/obj", info.metadata, body).plaintext == pt


def test_multipart_upload_with_a_padded_object_header(env):
    vault = env.vault_with(part_size=16384, multipart_threshold=16384, workers=3)
    pt = os.urandom(3 * 16384 + 777)
    vault.write("big/file", bytes_source(pt), len(pt), attrs=ATTRS)
    assert env.reader().read("big/file").plaintext == pt


def test_attribute_changes_raise_the_generation_and_keep_the_body(env):
    pt = data(5000)
    obj = env.vault.write("a/f", bytes_source(pt), len(pt))
    body0 = env.store.get_range("a/f", 0, 1 << 20)[0]
    reader = env.reader()
    assert reader.read("a/f").attrs is None
    obj = env.vault.update_attrs(obj, ATTRS)
    res = env.reader().read("a/f")
    assert (res.attrs, res.generation, res.header.flags) == (ATTRS, 1, refdecoder.FLAG_ATTRS)
    obj = env.vault.update_attrs(obj, ATTRS.replace(b"1000", b"1001"))
    assert env.reader().read("a/f").generation == 2
    obj = env.vault.update_attrs(obj, None)
    res = env.reader().read("a/f")
    assert (res.attrs, res.generation, res.header.flags, res.plaintext) == (None, 3, 0, pt)
    assert env.store.get_range("a/f", 0, 1 << 20)[0] == body0
    assert res.header.msg_id == refdecoder.parse_metadata(env.store.head("a/f").metadata).header.msg_id


def test_renamed_objects_name_the_destination_epoch(env):
    pt = data(9000)
    obj = env.vault.write("src/one", bytes_source(pt), len(pt), attrs=ATTRS)
    env.vault.rename(obj, "dst/deeper/two")
    res = env.reader().read("dst/deeper/two")
    assert res.plaintext == pt and res.attrs == ATTRS and res.epoch_prefix == "dst/deeper/"
    assert env.reader().get("src/one") is None


def test_top_level_keys_markers_and_special_names(env):
    for key in ("top", "d/sub/", "d/sub/x", "a//b", "x/../y", ".", "ü/ñ.txt"):
        env.vault.write(key, bytes_source(key.encode()), len(key.encode()), attrs=ATTRS)
    reader = env.reader()
    expect = {"top": "", "d/sub/": "d/", "d/sub/x": "d/sub/", "a//b": "a//", "x/../y": "x/../",
              ".": "", "ü/ñ.txt": "ü/"}
    for key, prefix in expect.items():
        res = reader.read(key)
        assert res.plaintext == key.encode() and res.epoch_prefix == prefix, key


def test_one_record_fetch_per_epoch_and_new_epochs_when_full(env):
    for i in range(5):
        env.vault.write(f"p/{i}", bytes_source(b"x" * i), i)
    reader = env.reader()
    for i in range(5):
        assert reader.read(f"p/{i}").plaintext == b"x" * i
    assert reader.records_fetched == 1
    small = env.vault_with(epoch_max_objects=2)
    for i in range(5):
        small.write(f"q/{i}", bytes_source(b"y" * i), i)
    reader = env.reader()
    ids = {reader.read(f"q/{i}").envelope.epoch_id for i in range(5)}
    assert len(ids) == 3 and reader.records_fetched == 3


def test_prefix_mount_epochs_and_the_root_marker(env):
    """A mount of prefix team/ wraps everything below it, its root marker ``team/`` included,
    under epochs of ``team/``: for the marker the prefix is the whole key."""
    vault = env.vault_with(epoch_prefix="team/")
    vault.write("team/a/b.txt", bytes_source(b"hello"), 5, attrs=ATTRS)
    vault.write("team/", bytes_source(b""), 0, attrs=ATTRS)
    reader = env.reader()
    assert reader.read("team/a/b.txt").epoch_prefix == "team/"
    marker = reader.read("team/")
    assert marker.epoch_prefix == "team/" and marker.envelope.depth == 1 and marker.attrs == ATTRS
    # dssefs itself reads it back
    assert env.vault_with().open("team/").attrs() == ATTRS
    # the rule without the directory-marker exception (the earlier wording of 17.4) refuses it
    with pytest.raises(refdecoder.Integrity, match="whole key"):
        env.reader(marker_root=False).read("team/")
    assert env.reader(marker_root=False).read("team/a/b.txt").plaintext == b"hello"


def test_epoch_prefix_rule():
    ep = refdecoder.epoch_prefix
    assert ep("a/b/c", 0) == "" and ep("a/b/c", 1) == "a/" and ep("a/b/c", 2) == "a/b/"
    assert ep("a//b", 2) == "a//" and ep("a/b/", 2) == "a/b/"
    for key, depth in (("a/b/c", 3), ("abc", 1), ("a/", 2)):
        with pytest.raises(refdecoder.Integrity):
            ep(key, depth)
    with pytest.raises(refdecoder.Integrity):
        ep("a/b/", 2, marker_root=False)


def test_upgraded_and_version_1_objects(env):
    pt = data(6000)
    write_v1(env.store, env.provider, "old/f", pt, attrs=ATTRS, generation=4, file_id=b"\x11" * 16)
    res = env.reader().read("old/f")
    assert (res.header.version, res.plaintext, res.attrs, res.generation) == (1, pt, ATTRS, 4)
    env.vault.upgrade(env.vault.open("old/f"))
    res = env.reader().read("old/f")
    assert (res.header.version, res.plaintext, res.attrs, res.generation) == (2, pt, ATTRS, 5)
    assert res.header.file_id == b"\x11" * 16


def test_split_custody_trust(tmp_path):
    env = make_env(tmp_path, names=("k-in", "k-out", "spare"), inner="k-in", outer="k-out")
    env.vault.write("s/f", bytes_source(b"secret"), 6)
    ok = refdecoder.split_trust("k-in", "k-out")
    assert env.reader(ok).read("s/f").plaintext == b"secret"
    assert env.reader(refdecoder.Trust()).read("s/f").plaintext == b"secret"  # one name: any key
    for bad in (refdecoder.split_trust("k-out", "k-in"), refdecoder.split_trust("spare", "k-out"),
                refdecoder.split_trust("k-in", "spare")):
        with pytest.raises(refdecoder.Untrusted):
            env.reader(bad).read("s/f")
    with pytest.raises(ValueError):
        refdecoder.split_trust("k-in", "k-out", allowed_inner=["k-out"])


def test_local_store_files_layout(env):
    env.vault.write("docs/a.txt", bytes_source(b"hi\n"), 3)
    files = refdecoder.LocalStoreFiles(str(env.root))
    assert files.path("docs/a.txt") == f"{env.root}/objects/docs.d/a.txt.o"
    assert files.path("docs/") == f"{env.root}/objects/docs.d/.o"
    assert files.path("x/../y") == f"{env.root}/objects/x.d/...d/y.o"
    meta, body = files.get("docs/a.txt")
    assert meta == env.store.head("docs/a.txt").metadata and len(body) == 35
    assert files.get("docs/missing") is None and files.get("docs/a.txt/below") is None


def test_keyring_file_reader(env):
    keys = refdecoder.load_keyring_file(env.ring.read_text())
    assert sorted(keys) == ["default", "second"]
    info = {k.name: k.check for k in kms.list_keys(str(env.ring))}
    assert {n: refdecoder.keyring_check(k).hex() for n, k in keys.items()} == info
