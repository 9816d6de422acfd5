"""Background deletes (docs/semantics.md, Durability): ``unlink`` and ``rmdir`` return once the
name is gone from the mount; the DELETEs follow in the background, batched (``delete_many``:
DeleteObjects on S3), in order with later writes of the same name; ``fsync`` of the directory and
unmount wait for them; faults are retried; a crash leaves the objects of pending deletes in the store.

The file system core is driven directly over a local store whose deletes a test can hold back or
fail (deterministic), and real mounts over moto go through tests/faultproxy.py.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time

import pytest
import trio

from dssefs.errors import DssefsError, StoreError, StoreUnavailable
from dssefs.fs import Filesystem, FsConfig
from dssefs.kms.local import LocalKeyringProvider, create_keyring
from dssefs.objects.vault import Vault, bytes_source
from dssefs.store.base import ObjectStore
from dssefs.store.local import LocalStore
from dssefs.store.metered import MeteredStore
from dssefs.store.s3 import S3Store

from faultproxy import DELAY, RESET, fault_proxy  # noqa: F401 (fault_proxy is a fixture)
from fuse_fixtures import requires_fuse

ROOT = 1
S3_ONLY = {"x-amz-target": None}  # KMS requests carry X-Amz-Target


def on_deletes(proxy, action: str, **kw) -> list:
    """The same fault for every delete request: DeleteObject (DELETE) and DeleteObjects (POST
    ?delete).  Returns the two faults."""
    return [proxy.add(action, method="DELETE", headers=S3_ONLY, **kw),
            proxy.add(action, method="POST", path=r"[?&]delete(=|&|$)", headers=S3_ONLY, **kw)]


# ---- a store whose deletes a test holds back or fails --------------------------------------------------


class ControlledStore(ObjectStore):
    """Forwards to a local store and logs ``(op, key)`` of every write and delete.  ``gate``
    (cleared) holds every delete back until it is set; ``failing`` keys (or all, ``fail_all``)
    fail their deletes as an unreachable store does; ``delay`` slows each delete request."""

    def __init__(self, inner: LocalStore):
        self.inner = inner
        self.context_name, self.url = inner.context_name, inner.url
        self.max_segment_bytes = inner.max_segment_bytes
        self.parallel_requests = True
        self.gate = threading.Event()
        self.gate.set()
        self.fail_all = False
        self.delay = 0.0
        self.list_pause = None  # called between taking a listing and handing it out
        self.log: list[tuple[str, str]] = []
        self.requests: list[tuple[str, int]] = []  # ("delete" | "delete_many", keys)
        self.lock = threading.Lock()

    def _note(self, op: str, key: str) -> None:
        with self.lock:
            self.log.append((op, key))

    def _deleting(self, kind: str, n: int) -> None:
        with self.lock:
            self.requests.append((kind, n))
        assert self.gate.wait(30), "a test left a delete held back"
        time.sleep(self.delay)

    def head(self, key, *, prefix=0):
        return self.inner.head(key, prefix=prefix)

    def get_range(self, key, start, length, *, if_match=None):
        return self.inner.get_range(key, start, length, if_match=if_match)

    def put(self, key, body, metadata, *, if_match=None, if_none_match=False):
        self._note("put", key)
        return self.inner.put(key, body, metadata, if_match=if_match, if_none_match=if_none_match)

    def begin_upload(self, key, metadata, *, if_match=None, if_none_match=False, size_hint=None):
        self._note("put", key)
        return self.inner.begin_upload(key, metadata, if_match=if_match, if_none_match=if_none_match,
                                       size_hint=size_hint)

    def copy(self, src, dst, metadata, *, if_match=None, if_none_match=False):
        self._note("copy", dst)
        return self.inner.copy(src, dst, metadata, if_match=if_match, if_none_match=if_none_match)

    def delete(self, key):
        self._deleting("delete", 1)
        if self.fail_all:
            raise StoreUnavailable(f"{key}: injected: the store is unreachable")
        self._note("delete", key)
        self.inner.delete(key)

    def delete_many(self, keys):
        keys = list(keys)
        self._deleting("delete_many", len(keys))
        if self.fail_all:
            err = StoreUnavailable("injected: the store is unreachable")
            return [(k, err) for k in keys]
        for k in keys:
            self._note("delete", k)
        return self.inner.delete_many(keys)

    def list(self, prefix="", delimiter="/"):
        self._note("list", prefix)
        items = list(self.inner.list(prefix, delimiter))  # the store answers now...
        pause, self.list_pause = self.list_pause, None
        if pause is not None:
            pause()  # ...and its answer reaches the caller later
        return iter(items)

    def list_uploads(self, prefix=""):
        return self.inner.list_uploads(prefix)

    def abort_upload(self, key, upload_id):
        self.inner.abort_upload(key, upload_id)

    def stored(self) -> set[str]:
        return {i.key for i in self.inner.list("", delimiter=None) if not i.key.startswith(".dssefs/")}

    def delete_requests(self) -> list[tuple[str, int]]:
        with self.lock:
            return list(self.requests)


@pytest.fixture
def world(tmp_path):
    """``(store, new_fs)``: a controlled local store and a factory of file systems over it (a new
    mount each; attributes stored at once, no TTL caches)."""
    create_keyring(str(tmp_path / "keyring"))
    store = ControlledStore(LocalStore(str(tmp_path / "store")))
    n = iter(range(1000))

    def new_fs(**kw) -> Filesystem:
        vault = Vault(store, LocalKeyringProvider(str(tmp_path / "keyring")), chunk_log2=16)
        cfg = dict(chunk_size=1 << 16, spill_dir=str(tmp_path / f"spill-{next(n)}"), attr_timeout=0,
                   entry_timeout=0, attr_delay=0)
        cfg.update(kw)
        return Filesystem(vault, "", FsConfig(**cfg))

    yield store, new_fs
    store.gate.set()


async def write_file(fs, name, data, parent=ROOT) -> int:
    fh, st = await fs.create(parent, name, 0o644, os.O_WRONLY | os.O_CREAT, 0, 0)
    await fs.write(fh, 0, data)
    await fs.flush(fh)
    await fs.release(fh)
    return st.ino


async def read_file(fs, name, parent=ROOT) -> bytes:
    st = await fs.lookup(parent, name)
    fh, _ = await fs.open(st.ino, os.O_RDONLY)
    try:
        return await fs.read(fh, 0, 1 << 20)
    finally:
        await fs.release(fh)


async def names(fs, ino=ROOT) -> list[str]:
    fh = await fs.opendir(ino)
    try:
        return [n for n, _st, _off in await fs.readdir(fh, 0) if n not in (".", "..")]
    finally:
        await fs.releasedir(fh)


async def fsyncdir(fs, ino=ROOT) -> None:
    fh = await fs.opendir(ino)
    try:
        await fs.fsyncdir(fh)
    finally:
        await fs.releasedir(fh)


async def until(predicate, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


# ---- the store interface: delete_many --------------------------------------------------------------------


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def any_store(request, tmp_path):
    if request.param == "local":
        s = LocalStore(tmp_path / "store")
    else:
        s = S3Store(request.getfixturevalue("bucket"))
    yield s
    s.close()


def test_delete_many_deletes_every_key_and_reports_the_ones_it_could_not(any_store):
    keys = [f"d/k{i}" for i in range(5)] + ["top", "d/sub/deep", "d/marker/"]
    for k in keys:
        any_store.put(k, b"x", {})
    too_long = "d/" + "n" * 300  # no store holds a name this long (the local store refuses it per key)
    failures = any_store.delete_many(keys[:4] + ["never-was", "d/sub/deep", "d/marker/"] +
                                     ([too_long] if isinstance(any_store, LocalStore) else []))
    if isinstance(any_store, LocalStore):
        assert [(k, e.errno) for k, e in failures] == [(too_long, errno.ENAMETOOLONG)]
    else:
        assert failures == []
    assert sorted(i.key for i in any_store.list("", delimiter=None)) == ["d/k4", "top"]
    assert any_store.delete_many([]) == []


@pytest.mark.s3
def test_s3_delete_many_batches_and_reports_a_failed_request_per_key(fault_proxy, bucket, monkeypatch):
    import dssefs.store.s3 as s3mod

    store = MeteredStore(S3Store(bucket, endpoint_url=fault_proxy.endpoint, max_attempts=2))
    keys = [f"k{i:02d}" for i in range(7)] + ["ctl\x01key"]
    for k in keys:
        store.put(k, b"x", {})
    monkeypatch.setattr(s3mod, "DELETE_MANY_MAX", 3)  # S3's 1,000 keys per request, scaled down
    assert store.delete_many(keys) == []
    posts = [r for r in fault_proxy.log if r.method == "POST" and "delete" in r.target]
    singles = [r for r in fault_proxy.log if r.method == "DELETE"]
    assert len(posts) == 3 and len(singles) == 1  # 7 keys in 3 requests; a control character never goes in XML
    assert list(store.list("", None)) == []
    requests = store.meter.snapshot()["requests"]
    assert (requests["delete_many"], requests["delete"]) == (1, 0)  # counted per 1,000 keys
    for k in keys[:3]:
        store.put(k, b"x", {})
    fault_proxy.add(RESET, method="POST", path=r"[?&]delete")
    failures = store.delete_many(keys[:3])
    assert [k for k, _ in failures] == keys[:3]  # the request failed: every key it carried, no raise
    assert all(isinstance(e, StoreUnavailable) for _, e in failures)
    assert sorted(i.key for i in store.list("", None)) == keys[:3]


# ---- the file system core ----------------------------------------------------------------------------


async def test_unlink_returns_before_the_delete_and_the_name_is_gone_at_once(world):
    store, new_fs = world
    fs = new_fs()
    d = await fs.mkdir(ROOT, "d", 0o755, 0, 0)
    await write_file(fs, "f", b"data", parent=d.ino)
    await write_file(fs, "g", b"kept", parent=d.ino)
    store.gate.clear()  # the store does not answer deletes for now
    with trio.fail_after(5):
        await fs.unlink(d.ino, "f")
    assert "d/f" in store.stored()  # not deleted yet...
    before = len(store.log)
    with pytest.raises(DssefsError) as e:
        await fs.lookup(d.ino, "f")
    assert e.value.errno == errno.ENOENT
    assert len(store.log) == before  # ...but gone for this mount, without asking the store
    assert await names(fs, d.ino) == ["g"]  # a listing of the store leaves it out
    assert fs.deletes.stats()["pending"] == 1
    # fsync of the directory waits for the delete
    done = trio.Event()

    async def sync():
        await fsyncdir(fs, d.ino)
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sync)
        await trio.sleep(0.3)
        assert not done.is_set()
        store.gate.set()
    assert "d/f" not in store.stored() and fs.deletes.stats()["pending"] == 0


async def test_unlinks_are_batched(world):
    store, new_fs = world
    fs = new_fs(entry_timeout=1, attr_timeout=1)  # the names are known: unlink asks the store nothing
    d = await fs.mkdir(ROOT, "d", 0o755, 0, 0)
    for i in range(100):
        await write_file(fs, f"f{i:03d}", b"x" * i, parent=d.ino)
    store.delay = 0.05  # each request takes a while, as over a network
    with trio.fail_after(5):
        for i in range(100):
            await fs.unlink(d.ino, f"f{i:03d}")
    await fsyncdir(fs, ROOT)
    requests = store.delete_requests()
    assert sum(n for _, n in requests) == 100 and {k for k, _ in requests} == {"delete_many"}, (requests, fs.deletes.stats(), store.stored())
    assert len(requests) <= 5, requests
    assert store.stored() == {"d/"}


async def test_rmdir_and_listings_while_the_deletes_of_the_children_are_pending(world):
    store, new_fs = world
    fs = new_fs()
    d = await fs.mkdir(ROOT, "d", 0o755, 0, 0)
    sub = await fs.mkdir(d.ino, "sub", 0o755, 0, 0)
    for name in ("a", "b"):
        await write_file(fs, name, name.encode(), parent=sub.ino)
    await write_file(fs, "top", b"t")
    store.gate.clear()
    with trio.fail_after(5):
        for name in ("a", "b"):
            await fs.unlink(sub.ino, name)
        await fs.rmdir(d.ino, "sub")  # its listing leaves the pending keys out: empty
        await fs.rmdir(ROOT, "d")
    assert store.stored() == {"d/", "d/sub/", "d/sub/a", "d/sub/b", "top"}
    # "d/" is a common prefix in the store's listing: everything below it is pending, so it is left out
    assert await names(fs) == ["top"]
    other = new_fs()  # another client sees the objects until the deletes are done
    assert await names(other) == ["d", "top"]
    store.gate.set()
    await fsyncdir(fs)
    assert store.stored() == {"top"}
    assert await names(new_fs()) == ["top"]


async def test_rmdir_right_after_a_listing_asks_the_store_nothing_unless_records_are_there(world, tmp_path):
    store, new_fs = world
    # 'dssefs put' keeps epoch records in the object's directory (k/.dssefs/epochs/ID)
    cli = Vault(store.inner, LocalKeyringProvider(str(tmp_path / "keyring")), chunk_log2=16)
    cli.write("k/y", bytes_source(b"from put"), 8)
    fs = new_fs(entry_timeout=5, attr_timeout=5)
    d = await fs.mkdir(ROOT, "d", 0o755, 0, 0)
    await write_file(fs, "f", b"x", parent=d.ino)
    assert await names(fs, d.ino) == ["f"]  # rm -r lists it...
    await fs.unlink(d.ino, "f")  # ...empties it...
    before = len(store.log)
    await fs.rmdir(ROOT, "d")  # ...and removes it: that listing, a moment old, says it is empty
    assert [op for op, _ in store.log[before:]] == []
    # only a listing finds such records: a directory whose listing showed them is listed again
    # at rmdir, and they go with it
    k = await fs.lookup(ROOT, "k")
    assert await names(fs, k.ino) == ["y"]
    await fs.unlink(k.ino, "y")
    await fs.rmdir(ROOT, "k")
    await fsyncdir(fs)
    assert [i.key for i in store.inner.list("k/", delimiter=None)] == []
    assert await names(new_fs()) == []


async def test_a_listing_answered_before_deletes_complete_does_not_show_them(world):
    store, new_fs = world
    fs = new_fs()
    for name in ("a", "b"):
        await write_file(fs, name, b"x")
    d = await fs.mkdir(ROOT, "d", 0o755, 0, 0)
    await write_file(fs, "x", b"x", parent=d.ino)
    store.gate.clear()
    await fs.unlink(ROOT, "a")
    await fs.unlink(d.ino, "x")
    await fs.rmdir(ROOT, "d")

    def deletes_complete():  # while the listing is on its way back
        store.gate.set()
        deadline = time.monotonic() + 10
        while len(fs.deletes) and time.monotonic() < deadline:
            time.sleep(0.01)

    store.list_pause = deletes_complete
    assert await names(fs) == ["b"]  # "a" and "d/" were listed, and deleted since
    assert len(fs.deletes) == 0 and store.stored() == {"b"}


async def test_a_write_of_a_name_waits_for_its_pending_delete(world):
    """rm f; echo new > f: the new object is stored after the DELETE of the old one, never
    before (a DELETE sent later would remove it), and its create finds the name free."""
    store, new_fs = world
    fs = new_fs()
    await write_file(fs, "f", b"old")
    await write_file(fs, "g", b"renamed over f")
    store.gate.clear()
    await fs.unlink(ROOT, "f")
    await until(lambda: store.delete_requests())  # the DELETE is on its way, and held
    stored = trio.Event()

    async def recreate():
        await write_file(fs, "f", b"new")  # close: stores it
        stored.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(recreate)
        await trio.sleep(0.3)
        assert not stored.is_set()  # the close waits for the delete
        store.gate.set()
    assert [op for op, key in store.log if key == "f"][-2:] == ["delete", "put"]
    assert await read_file(new_fs(), "f") == b"new"
    # a rename onto a name whose delete is pending: the same order
    store.gate.clear()
    await fs.unlink(ROOT, "f")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs.rename, ROOT, "g", ROOT, "f")
        await trio.sleep(0.3)
        store.gate.set()
    assert [op for op, key in store.log if key == "f"][-2:] == ["delete", "copy"]
    await fsyncdir(fs)
    assert await read_file(new_fs(), "f") == b"renamed over f"
    assert store.stored() == {"f"}


async def test_failed_deletes_stay_pending_are_retried_and_reported(world, caplog):
    caplog.set_level(logging.INFO, logger="dssefs.fs")
    store, new_fs = world
    fs = new_fs()
    for name in ("a", "b", "c"):
        await write_file(fs, name, b"x")
    store.fail_all = True  # the store is unreachable for deletes
    for name in ("a", "b"):
        await fs.unlink(ROOT, name)
    await until(lambda: fs.deletes.stats()["failed_attempts"] >= 2)
    assert await names(fs) == ["c"]  # gone in the mount all the same
    assert {"a", "b"} <= store.stored()
    st = fs.deletes.stats()
    assert st["pending"] == 2 and st["waiting_retry"] + st["sending"] == 2 and "unreachable" in st["last_error"]
    with pytest.raises(DssefsError) as e:
        await fsyncdir(fs)  # fsync of the directory reports it
    assert e.value.errno == errno.EIO and "could not be deleted" in str(e.value)
    assert len(re.findall(r"event=delete_failed object=\S+/a ", caplog.text)) == 1  # once per key
    assert "event=delete_failed keys=" in caplog.text  # and a line per failed request
    left = await fs.deletes.drain()  # unmount while it stays unreachable: reported, not hung
    assert sorted(k.rsplit("/", 1)[1] for k, _ in left) == ["a", "b"]
    store.fail_all = False  # the store is back
    await fsyncdir(fs)
    assert store.stored() == {"c"} and fs.deletes.stats()["pending"] == 0
    assert "event=delete_retried keys=" in caplog.text


# ---- real mounts over S3 (moto) -------------------------------------------------------------------------


def _status(m, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "dssefs", "status", str(m.mountpoint), *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _report(m) -> dict:
    return json.loads(_status(m, "--json"))


def _keys(moto_server, bucket, prefix="") -> set[str]:
    s3 = moto_server.client("s3")
    keys = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.update(o["Key"] for o in page.get("Contents", ()))
    return {k for k in keys if not k.startswith(".dssefs/")}


def _fsync_dir(path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.fixture
def proxied_mount(fault_proxy, mount_factory, s3_source, tmp_path):
    source, args = s3_source
    return mount_factory(tmp_path / "mnt", source, *args, "--endpoint-url", fault_proxy.endpoint,
                         "--max-attempts", "2")


@pytest.mark.fuse
@pytest.mark.s3
@requires_fuse
def test_mount_unlink_returns_before_the_delete_and_fsync_of_the_directory_waits(
        fault_proxy, proxied_mount, moto_server, bucket):
    m = proxied_mount.start()
    (m / "d").mkdir()
    for name in ("f", "g"):
        (m / "d" / name).write_bytes(name.encode() * 10)
    (m / "e").mkdir()
    (m / "e" / "x").write_bytes(b"x")
    _fsync_dir(m.mountpoint)  # the markers are stored
    on_deletes(fault_proxy, DELAY, delay=1.5)  # every delete request takes 1.5 s
    t0 = time.monotonic()
    os.unlink(m / "d" / "f")
    subprocess.run(["rm", "-r", str(m / "e")], check=True, timeout=30)
    took = time.monotonic() - t0
    assert took < 1.0, f"unlink and rm -r took {took:.2f} s: they waited for the DELETE"
    assert {"d/f", "e/x", "e/"} <= _keys(moto_server, bucket)  # still in the store...
    assert not (m / "d" / "f").exists() and os.listdir(m / "d") == ["g"]  # ...gone in the mount
    assert sorted(os.listdir(m.mountpoint)) == ["d"]
    assert _report(m)["deletes"]["pending"] >= 1
    _fsync_dir(m / "d")  # waits for the delete of d/f
    assert time.monotonic() - t0 >= 1.5
    assert "d/f" not in _keys(moto_server, bucket)
    _fsync_dir(m.mountpoint)  # and of everything below the root
    assert _keys(moto_server, bucket) == {"d/", "d/g"}
    assert _report(m)["deletes"]["pending"] == 0
    assert m.stop() == 0, m.log()


@pytest.mark.fuse
@pytest.mark.s3
@requires_fuse
def test_mount_rm_r_of_100_files_sends_few_delete_requests(fault_proxy, proxied_mount, moto_server, bucket):
    m = proxied_mount.start()
    (m / "tree").mkdir()
    for i in range(100):
        (m / "tree" / f"f{i:03d}").write_bytes(b"small file %d" % i)
    m.remount()  # a cold start, as before a benchmark's rm -r
    on_deletes(fault_proxy, DELAY, delay=0.2)  # each delete request takes 0.2 s
    before = _report(m)["store"]["requests"]
    t0 = time.monotonic()
    subprocess.run(["rm", "-r", str(m / "tree")], check=True, timeout=60)
    took = time.monotonic() - t0
    _fsync_dir(m.mountpoint)
    after = _report(m)["store"]["requests"]
    spent = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    assert spent.get("delete", 0) == 0 and 1 <= spent["delete_many"] <= 5, spent
    assert took < 100 * 0.2, took  # one DELETE per file took at least 0.2 s each
    assert _keys(moto_server, bucket) == set()
    assert m.stop() == 0, m.log()


@pytest.mark.fuse
@pytest.mark.s3
@requires_fuse
@pytest.mark.parametrize("end", ["unmount", "crash"])
def test_mount_rm_then_recreate_in_a_row(fault_proxy, proxied_mount, moto_server, bucket, end):
    m = proxied_mount.start()
    (m / "f").write_bytes(b"old version\n")
    (m / "g").write_bytes(b"old g\n")
    on_deletes(fault_proxy, DELAY, delay=0.5)
    os.unlink(m / "f")
    assert "f" in _keys(moto_server, bucket)  # the DELETE is still on its way...
    (m / "f").write_bytes(b"new\n")  # ...and the close of the new file waits for it
    script = 'rm g; echo "new g" > g; cat f g'
    r = subprocess.run(["sh", "-c", script], cwd=m.mountpoint, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout == "new\nnew g\n", (r.stdout, r.stderr)
    if end == "crash":
        m.kill()  # SIGKILL right after the closes returned: what they stored is there
    else:
        assert m.stop() == 0, m.log()
    fault_proxy.clear()
    m.start()
    assert (m / "f").read_bytes() == b"new\n" and (m / "g").read_bytes() == b"new g\n"
    assert _keys(moto_server, bucket) == {"f", "g"}


@pytest.mark.fuse
@pytest.mark.s3
@requires_fuse
def test_mount_outage_during_background_deletes(fault_proxy, proxied_mount, moto_server, bucket):
    m = proxied_mount.start()
    (m / "d").mkdir()
    for i in range(6):
        (m / "d" / f"f{i}").write_bytes(b"%d" % i)
    outage = on_deletes(fault_proxy, RESET)  # deletes cannot reach S3
    t0 = time.monotonic()
    for i in range(3):
        os.unlink(m / "d" / f"f{i}")
    assert time.monotonic() - t0 < 2.0
    assert sorted(os.listdir(m / "d")) == ["f3", "f4", "f5"]  # gone in the mount
    deadline = time.monotonic() + 30
    while _report(m)["deletes"]["failed_attempts"] < 3:
        assert time.monotonic() < deadline, m.log()
        time.sleep(0.2)
    report = _report(m)
    assert report["deletes"]["pending"] == 3 and report["deletes"]["deleted"] == 0, report["deletes"]
    text = _status(m)
    assert re.search(r"^deletes: +3 pending .*failed attempt", text, re.M), text
    assert {"d/f0", "d/f1", "d/f2"} <= _keys(moto_server, bucket)
    assert sorted(os.listdir(m / "d")) == ["f3", "f4", "f5"]
    with pytest.raises(OSError) as e:
        _fsync_dir(m / "d")  # fsync of the directory: EIO while the deletes fail
    assert e.value.errno == errno.EIO
    for i in range(3):
        assert len(re.findall(rf"event=delete_failed object=s3://{bucket}/d/f{i} ", m.log())) == 1, m.log()
    assert sum(f.hits for f in outage) >= 4  # every attempt was sent, and retried by botocore
    # the outage ends: the next attempt (or fsync of the directory) deletes them
    fault_proxy.clear()
    _fsync_dir(m / "d")
    assert _keys(moto_server, bucket) == {"d/", "d/f3", "d/f4", "d/f5"}
    assert _report(m)["deletes"]["pending"] == 0
    # another outage, and an unmount that waits for the deletes pending when it begins
    on_deletes(fault_proxy, RESET, limit=2)  # one attempt (two requests with --max-attempts 2) fails
    failed = _report(m)["deletes"]["failed_attempts"]
    os.unlink(m / "d" / "f3")
    while _report(m)["deletes"]["failed_attempts"] == failed:
        assert time.monotonic() < deadline + 30, m.log()
        time.sleep(0.1)
    assert m.stop() == 0, m.log()  # the unmount sends it again, and waits for it
    assert _keys(moto_server, bucket) == {"d/", "d/f4", "d/f5"}


@pytest.mark.fuse
@pytest.mark.s3
@requires_fuse
def test_mount_unmount_while_the_store_stays_unreachable_reports_the_deletes(
        fault_proxy, proxied_mount, moto_server, bucket):
    m = proxied_mount.start()
    for name in ("a", "b", "c"):
        (m / name).write_bytes(name.encode())
    on_deletes(fault_proxy, RESET)
    os.unlink(m / "a")
    os.unlink(m / "b")
    t0 = time.monotonic()
    assert m.stop(timeout=120) == 1, m.log()  # reported like an unstored file, not hung
    assert time.monotonic() - t0 < 60
    for name in ("a", "b"):
        assert re.search(rf"op=delete object=s3://{bucket}/{name} errno=EIO reason=.*not deleted", m.log()), m.log()
    assert "deletes_not_done=2" in m.log()
    fault_proxy.clear()
    m.start()  # not deleted: the names are back
    assert sorted(os.listdir(m.mountpoint)) == ["a", "b", "c"]
    assert (m / "a").read_bytes() == b"a"


@pytest.mark.fuse
@pytest.mark.s3
@requires_fuse
def test_mount_crash_with_pending_deletes_leaves_the_objects(fault_proxy, proxied_mount, moto_server, bucket):
    """Documented: pending deletes live in memory; after a crash their objects are still in the
    store and the names reappear, as on a local file system without fsync of the directory."""
    m = proxied_mount.start()
    (m / "d").mkdir()
    for name in ("gone", "kept", "synced"):
        (m / "d" / name).write_bytes(name.encode())
    os.unlink(m / "d" / "synced")
    _fsync_dir(m / "d")  # durable: fsync of the directory waited for its delete
    on_deletes(fault_proxy, RESET)  # no delete reaches the store
    os.unlink(m / "d" / "gone")
    assert os.listdir(m / "d") == ["kept"]
    m.kill()
    fault_proxy.clear()
    assert _keys(moto_server, bucket) == {"d/", "d/gone", "d/kept"}
    m.start()
    assert sorted(os.listdir(m / "d")) == ["gone", "kept"]  # the pending delete was lost with the daemon
    assert (m / "d" / "gone").read_bytes() == b"gone"
