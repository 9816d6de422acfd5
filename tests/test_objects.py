"""The objects layer (envelope + key provider + store) against a local store and moto's S3 + KMS."""

from __future__ import annotations

import hashlib
import threading
import time
import os

import pytest

from dssefs import kms
from dssefs.errors import (DssefsError, IntegrityError, KeyProviderError, NotDssefsObject,
                           PreconditionFailed, StoreAccessDenied)
from dssefs.objects import Vault, bytes_source
from dssefs.objects import epochs as epochs_mod
from dssefs.store import LocalStore

from v1objects import write_v1


@pytest.fixture(params=["local", "s3"])
def env(request, tmp_path):
    """(store, provider, second_key_id) for a local store + keyring, and for moto S3 + KMS."""
    if request.param == "local":
        ring = tmp_path / "keyring"
        kms.create_keyring(ring, names=("default", "second"))
        store = LocalStore(tmp_path / "store", min_part_size=4096)
        return store, kms.make_provider(keyring=str(ring)), "second"
    from dssefs.store.s3 import S3Store

    server = request.getfixturevalue("moto_server")
    bucket = request.getfixturevalue("bucket")
    kms_client = server.client("kms")
    key1 = kms_client.create_key()["KeyMetadata"]["Arn"]
    key2 = kms_client.create_key()["KeyMetadata"]["Arn"]
    provider = kms.make_provider(kms_key_id=key1, kms_allowed_key_ids=[key2])
    return S3Store(bucket), provider, key2


def _vault(store, provider, **kw) -> Vault:
    kw.setdefault("chunk_log2", 12)
    return Vault(store, provider, **kw)


SIZES = [0, 1, 4095, 4096, 4097, 3 * 4096 - 1, 100_000]


@pytest.mark.parametrize("size", SIZES)
def test_round_trip(env, size):
    store, provider, _ = env
    vault = _vault(store, provider)
    data = os.urandom(size)
    result = vault.write("dir/obj", bytes_source(data), size)
    assert store.head("dir/obj").size == result.body_size == size + 32 * max(1, -(-size // 4096))
    obj = vault.open("dir/obj")
    assert obj.size == size
    assert obj.read(0, size + 10) == data
    assert b"".join(p for _, p in obj.iter_chunks(window=8192)) == data
    obj.verify()


def test_multipart_parallel_parts(env):
    store, provider, _ = env
    # S3 needs 5 MiB parts; the local store was opened with a 4 KiB minimum.
    part = 5 * 1024 * 1024 if not isinstance(store, LocalStore) else 16384
    vault = _vault(store, provider, chunk_log2=16, part_size=part, multipart_threshold=part, workers=3)
    data = os.urandom(2 * part + 12345)
    seen = []
    vault.write("big", bytes_source(data), len(data), progress=seen.append)
    assert sum(seen) == len(data)
    obj = vault.open("big")
    assert hashlib.sha256(obj.read(0, len(data))).digest() == hashlib.sha256(data).digest()
    vault.close()


def test_multipart_parts_are_sealed_while_the_upload_is_created(tmp_path):
    # creating the upload is a round trip: the first parts are sealed meanwhile; a failed
    # creation is the write's error (nothing to abort), and a failed part aborts the upload
    ring = tmp_path / "keyring"
    kms.create_keyring(ring)
    store = LocalStore(tmp_path / "store", min_part_size=4096)
    part = 16384
    vault = _vault(store, kms.make_provider(keyring=str(ring)), part_size=part, multipart_threshold=part,
                   workers=3)
    data = os.urandom(4 * part + 100)
    created = threading.Event()
    sealed_before = []
    real_begin = store.begin_upload

    def slow_begin(*a, **kw):
        time.sleep(0.2)
        created.set()
        return real_begin(*a, **kw)

    def source(off, n):
        sealed_before.append(not created.is_set())
        return data[off:off + n]

    store.begin_upload = slow_begin
    vault.write("big", source, len(data))
    assert sealed_before.count(True) >= 3 * (part // 4096), sealed_before  # three parts' chunks
    assert vault.open("big").read(0, len(data)) == data

    def refused(*a, **kw):
        raise StoreAccessDenied("denied (test)")
    aborted = []
    store.abort_upload = lambda *a, **kw: aborted.append(a)
    store.begin_upload = refused
    with pytest.raises(StoreAccessDenied):
        vault.write("big2", bytes_source(data), len(data))
    assert aborted == []

    calls = []

    def failing_begin(*a, **kw):
        up = real_begin(*a, **kw)
        real_put = up.put_part

        def put_part(number, body):
            calls.append(number)
            if number == 2:
                raise StoreAccessDenied("denied (test)")
            return real_put(number, body)
        up.put_part = put_part
        real_abort = up.abort

        def abort():
            aborted.append(up)
            return real_abort()
        up.abort = abort
        return up
    store.begin_upload = failing_begin
    with pytest.raises(StoreAccessDenied):
        vault.write("big3", bytes_source(data), len(data))
    assert len(aborted) == 1 and 2 in calls
    assert list(store.list_uploads("")) == []
    vault.close()


def test_bodies_up_to_the_threshold_go_in_one_request_while_the_budget_lasts(env):
    """A body larger than a part but within ``multipart_threshold`` is one PUT; one that does not
    fit in what is left of ``single_put_budget`` (another large PUT holds it) is a multipart
    upload, and the budget is whole again once the writes return, failed ones included."""
    store, provider, _ = env
    part = 5 * 1024 * 1024 if not isinstance(store, LocalStore) else 16384
    body = 3 * part + 32 * (3 * part // 4096)  # 3 parts of plaintext in 4 KiB chunks
    vault = _vault(store, provider, part_size=part, multipart_threshold=4 * part, single_put_budget=body + 100,
                   workers=2)
    calls = []
    real_put, real_begin = store.put, store.begin_upload
    store.put = lambda key, *a, **kw: calls.append(("put", key)) or real_put(key, *a, **kw)
    store.begin_upload = lambda key, *a, **kw: calls.append(("upload", key)) or real_begin(key, *a, **kw)
    data = os.urandom(3 * part)
    try:
        vault.write("one", bytes_source(data), len(data))
        assert [c for c in calls if c[1] == "one"] == [("put", "one")]
        assert vault.single_puts.used == 0

        # a large PUT in flight holds the budget: the next large body goes in parts
        holding = threading.Event()
        go_on = threading.Event()

        def slow_put(key, *a, **kw):
            calls.append(("put", key))
            if key == "slow":
                holding.set()
                go_on.wait(10)
            return real_put(key, *a, **kw)
        store.put = slow_put
        t = threading.Thread(target=vault.write, args=("slow", bytes_source(data), len(data)))
        t.start()
        assert holding.wait(10)
        assert vault.single_puts.used == body
        vault.write("parts", bytes_source(data), len(data))
        assert ("upload", "parts") in calls and ("put", "parts") not in calls
        small = os.urandom(part // 2)  # up to a part: one request, the budget is not asked
        vault.write("small", bytes_source(small), len(small))
        assert ("put", "small") in calls
        go_on.set()
        t.join(10)
        assert vault.single_puts.used == 0

        def refused(key, *a, **kw):
            raise StoreAccessDenied("denied (test)")
        store.put = refused
        with pytest.raises(StoreAccessDenied):
            vault.write("denied", bytes_source(data), len(data))
        assert vault.single_puts.used == 0
        for key, want in (("one", data), ("slow", data), ("parts", data), ("small", small)):
            assert vault.open(key).read(0, len(want)) == want
    finally:
        store.put, store.begin_upload = real_put, real_begin
        vault.close()


def test_ranged_read_fetches_only_needed_chunks(env):
    store, provider, _ = env
    vault = _vault(store, provider)
    data = os.urandom(10 * 4096)
    vault.write("r", bytes_source(data), len(data))
    fetched = []
    real = store.get_range

    def counting(key, start, length, **kw):
        fetched.append((start, length))
        return real(key, start, length, **kw)

    store.get_range = counting
    obj = vault.open("r")
    assert obj.read(5 * 4096 + 10, 100) == data[5 * 4096 + 10:5 * 4096 + 110]
    assert fetched == [(5 * (4096 + 32), 4096 + 32)]
    fetched.clear()
    assert obj.read(4090, 20) == data[4090:4110]  # crosses chunks 0 and 1
    assert fetched == [(0, 2 * (4096 + 32))]


def test_tampered_body_fails_closed(env):
    store, provider, _ = env
    vault = _vault(store, provider)
    data = os.urandom(3 * 4096)
    vault.write("t", bytes_source(data), len(data))
    info = store.head("t")
    body, _ = store.get_range("t", 0, info.size)
    bad = bytearray(body)
    bad[4096 + 32 + 7] ^= 0x40  # inside chunk 1
    store.put("t", bytes(bad), info.metadata)
    obj = vault.open("t")
    assert obj.read(0, 100) == data[:100]  # chunk 0 still verifies
    with pytest.raises(IntegrityError, match="chunk 1"):
        obj.read(4096, 10)
    with pytest.raises(IntegrityError):
        obj.verify()


def test_truncated_object_refused_at_open(env):
    store, provider, _ = env
    vault = _vault(store, provider)
    vault.write("t", bytes_source(os.urandom(9000)), 9000)
    info = store.head("t")
    body, _ = store.get_range("t", 0, info.size)
    store.put("t", body[:4096 + 32], info.metadata)
    with pytest.raises(IntegrityError, match="truncated"):
        vault.open("t")


def test_object_replaced_after_open_is_not_mixed(env):
    store, provider, _ = env
    vault = _vault(store, provider)
    vault.write("x", bytes_source(b"a" * 5000), 5000)
    obj = vault.open("x")
    vault.write("x", bytes_source(b"b" * 5000), 5000)
    with pytest.raises(PreconditionFailed):
        obj.read(0, 10)


def test_rename_is_metadata_only_and_rebinds_keys(env):
    store, provider, _ = env
    vault = _vault(store, provider)
    data = os.urandom(5000)
    vault.write("a/one", bytes_source(data), len(data), attrs=b'{"m":33188}')
    before = store.get_range("a/one", 0, 1 << 20)[0]
    vault.rename(vault.open("a/one"), "b/two")
    assert store.get_range("b/two", 0, 1 << 20)[0] == before
    with pytest.raises(DssefsError):
        store.head("a/one")
    moved = vault.open("b/two")
    assert moved.read(0, 10000) == data
    assert moved.attrs() == b'{"m":33188}'


def test_copy_outside_dssefs_is_refused(env):
    """A raw server-side copy keeps the old encryption context: unwrapping must fail."""
    store, provider, _ = env
    vault = _vault(store, provider)
    vault.write("orig", bytes_source(b"secret"), 6)
    store.copy("orig", "copy", store.head("orig").metadata)
    with pytest.raises(KeyProviderError):
        vault.open("copy")


def test_rekey_of_a_v1_object_rewrites_it_as_v2(env):
    """Version 1 objects stay readable; re-keying one upgrades it to version 2 (same file id,
    next generation, same attributes), conditional on the ETag it replaced."""
    store, provider, _ = env
    vault = _vault(store, provider)
    data = os.urandom(7000)
    write_v1(store, provider, "k", data, attrs=b"mode", generation=4, file_id=b"F" * 16)
    old = vault.open("k")
    assert (old.envelope.version, old.read(0, 10000), old.attrs()) == (1, data, b"mode")
    new = vault.upgrade(old)
    assert new.envelope.version == 2
    obj = vault.open("k")
    assert (obj.read(0, 10000), obj.attrs(), obj.file_id, obj.generation) == (data, b"mode", b"F" * 16, 5)
    assert "dsse-w" not in store.head("k").metadata and "dsse-e" in store.head("k").metadata


def test_rekey_of_v2_epochs_changes_key_ids_and_keeps_objects(env):
    store, provider, second = env
    vault = _vault(store, provider)
    data = os.urandom(7000)
    vault.write("d/k", bytes_source(data), len(data))
    meta = store.head("d/k").metadata
    body = store.get_range("d/k", 0, 1 << 20)[0]
    ep = vault.open("d/k").data_keys.epoch
    assert vault.epochs.rewrap(ep.prefix, ep.epoch_id, second, second) is True
    assert store.get_range("d/k", 0, 1 << 20)[0] == body and store.head("d/k").metadata == meta
    desc = vault.describe("d/k")
    assert second in (desc["key_id_inner"], desc["key_id_inner"].split("/")[-1])
    assert desc["key_id_inner"] == desc["key_id_outer"]
    fresh = _vault(store, provider)  # nothing cached: the epoch is read and unwrapped again
    assert fresh.open("d/k").read(0, 10000) == data


def test_attrs_update_and_swap(env):
    store, provider, _ = env
    vault = _vault(store, provider)
    vault.write("p", bytes_source(b"x"), 1, attrs=b"first")
    vault.write("q", bytes_source(b"y"), 1, attrs=b"other")
    vault.set_attrs(vault.open("p"), b"second")
    assert vault.open("p").attrs() == b"second"
    # move q's sealed attributes onto p: bound to q's header, so p must refuse them
    meta_p = dict(store.head("p").metadata)
    meta_p["dsse-a"] = store.head("q").metadata["dsse-a"]
    store.copy("p", "p", meta_p)
    with pytest.raises(IntegrityError):
        vault.open("p").attrs()


def test_every_version_gets_fresh_data_keys(env):
    store, provider, _ = env
    vault = _vault(store, provider)
    first = vault.write("v", bytes_source(b"same"), 4)
    second = vault.write("v", bytes_source(b"same"), 4, data_keys=first.data_keys, generation=1,
                         if_match=first.etag)
    assert first.data_keys.inner != second.data_keys.inner
    assert first.data_keys.outer != second.data_keys.outer
    assert first.envelope.wrapped_inner != second.envelope.wrapped_inner
    assert first.envelope.header.msg_id != second.envelope.header.msg_id
    assert first.data_keys.epoch is second.data_keys.epoch  # one epoch: no KMS call per version
    obj = vault.open("v")
    assert (obj.read(0, 4), obj.generation) == (b"same", 1)


def _epoch_records(store) -> list[str]:
    return [it.key for it in store.list(".dssefs/epochs/", None) if not isinstance(it, str)]


def test_epoch_keys_prepared_ahead_serve_the_first_write_and_are_stored_with_it(env):
    """A mount generates its epoch's keys while it starts (``Epochs.prepare``): the first write
    asks KMS for nothing, and the record is stored only by that write; keys prepared longer ago
    than an epoch lives are not used; a record that could not be stored is stored by the next
    write with the same keys."""
    store, provider, _ = env
    vault = _vault(store, provider, epoch_prefix="")
    vault.epochs.prepare("")
    assert provider.stats["generate"] == 2 and _epoch_records(store) == []  # nothing stored yet
    vault.epochs.prepare("")
    assert provider.stats["generate"] == 2  # already prepared
    first = vault.write("a", bytes_source(b"one"), 3, if_none_match=True)
    assert provider.stats["generate"] == 2
    (record,) = _epoch_records(store)
    assert record.endswith(first.data_keys.epoch.epoch_id.hex())
    vault.epochs.prepare("")  # the current epoch is fresh: nothing to prepare
    assert provider.stats["generate"] == 2
    assert _vault(store, provider).open("a").read(0, 3) == b"one"

    # prepared too long ago: fresh keys for the first write
    aged = _vault(store, provider, epoch_prefix="", epoch_max_age=0.2)
    aged.epochs.prepare("")
    assert provider.stats["generate"] == 4
    time.sleep(0.3)
    second = aged.write("b", bytes_source(b"two"), 3, if_none_match=True)
    assert provider.stats["generate"] == 6 and len(_epoch_records(store)) == 2
    assert second.data_keys.epoch.started > time.monotonic() - 0.2

    # the record's PUT fails: the write fails; the next one stores the same record, no new keys
    failing = _vault(store, provider, epoch_prefix="")
    failing.epochs.prepare("")
    assert provider.stats["generate"] == 8
    real_put, refused = store.put, []

    def put(key, body, meta, **kw):
        if "/epochs/" in "/" + key and not refused:
            refused.append(key)
            raise DssefsError("store unreachable")
        return real_put(key, body, meta, **kw)

    store.put = put
    try:
        with pytest.raises(DssefsError, match="unreachable"):
            failing.write("c", bytes_source(b"three"), 5, if_none_match=True)
        third = failing.write("c", bytes_source(b"three"), 5, if_none_match=True)
    finally:
        store.put = real_put
    assert provider.stats["generate"] == 8 and len(_epoch_records(store)) == 3
    assert refused[0].endswith(third.data_keys.epoch.epoch_id.hex())
    assert _vault(store, provider).open("c").read(0, 5) == b"three"


def test_warming_loads_the_newest_epoch_so_that_its_objects_open_without_kms(env, monkeypatch):
    """``Epochs.warm`` (made while a mount starts) unwraps the newest epoch's keys: its objects
    then open with no KMS request and no record fetched; an older epoch's still costs its own.
    No record, or more records than one listing page, warms nothing."""
    store, provider, _ = env
    _vault(store, provider, epoch_prefix="").write("old", bytes_source(b"old"), 3, if_none_match=True)
    time.sleep(1.1)  # S3 gives listing times to the second
    new = _vault(store, provider, epoch_prefix="").write("new", bytes_source(b"new"), 3, if_none_match=True)
    fetched = []
    real_head = store.head

    def head(key, **kw):
        fetched.append(key)
        return real_head(key, **kw)

    store.head = head
    try:
        reader = _vault(store, provider)
        assert reader.epochs.warm("") == new.data_keys.epoch.epoch_id
        warmed = provider.stats["unwrap"]
        fetched.clear()
        assert reader.open("new").read(0, 3) == b"new"
        assert provider.stats["unwrap"] == warmed
        assert not [k for k in fetched if "/epochs/" in "/" + k]
        assert reader.open("old").read(0, 3) == b"old"
        assert provider.stats["unwrap"] == warmed + 2  # not the newest: loaded when needed
    finally:
        store.head = real_head

    assert _vault(store, provider).epochs.warm("sub/") is None  # no record under that prefix
    monkeypatch.setattr(epochs_mod, "WARM_RECORDS_MAX", 1)
    before = provider.stats["unwrap"]
    assert _vault(store, provider).epochs.warm("") is None  # two records: more than one page
    assert provider.stats["unwrap"] == before


def test_conditional_writes(env):
    store, provider, _ = env
    vault = _vault(store, provider)
    first = vault.write("c", bytes_source(b"1"), 1, if_none_match=True)
    with pytest.raises(PreconditionFailed):
        vault.write("c", bytes_source(b"2"), 1, if_none_match=True)
    vault.write("c", bytes_source(b"3"), 1, if_match=first.etag)
    with pytest.raises(PreconditionFailed):
        vault.write("c", bytes_source(b"4"), 1, if_match=first.etag)
    assert vault.open("c").read(0, 1) == b"3"


def test_foreign_object_is_named(env):
    store, provider, _ = env
    store.put("plain.txt", b"hello", {})
    with pytest.raises(NotDssefsObject):
        _vault(store, provider).open("plain.txt")


class BothLayersAtOnce:
    """A provider wrapper whose two layers' requests must be in flight together (a barrier of
    two): proves the Vault asks a network provider for both layers concurrently."""

    def __init__(self, inner, fail_layer=None):
        self._p, self._fail = inner, fail_layer
        self.kind, self.parallel_requests = inner.kind, True
        self.barrier = threading.Barrier(2, timeout=10)

    def __getattr__(self, name):
        return getattr(self._p, name)

    def _meet(self, layer):
        self.barrier.wait()  # BrokenBarrierError after 10 s if the other layer never comes
        if layer == self._fail:
            raise KeyProviderError(f"{layer.value} refused")

    def generate(self, layer, ctx):
        self._meet(layer)
        return self._p.generate(layer, ctx)

    def unwrap(self, layer, wrapped, ctx):
        self._meet(layer)
        return self._p.unwrap(layer, wrapped, ctx)


def test_network_provider_gets_both_layers_requests_at_once(tmp_path):
    ring = tmp_path / "keyring"
    kms.create_keyring(ring)
    store = LocalStore(tmp_path / "store")
    provider = BothLayersAtOnce(kms.make_provider(keyring=str(ring)))
    v = _vault(store, provider)
    v.write("a", bytes_source(b"payload"), 7)
    fresh = _vault(store, BothLayersAtOnce(kms.make_provider(keyring=str(ring))))
    assert fresh.open("a").read(0, 7) == b"payload"  # two unwraps, concurrently
    for layer in (kms.Layer.INNER, kms.Layer.OUTER):  # either layer's failure reaches the caller
        with pytest.raises(KeyProviderError, match=f"{layer.value} refused"):
            _vault(store, BothLayersAtOnce(kms.make_provider(keyring=str(ring)), fail_layer=layer)).open("a")
