"""The write-back journal (dssefs/store/journal.py): writes are durable locally at once, uploaded
in the background in order per key, visible to their writer meanwhile, and survive crashes,
failures and conflicts."""

from __future__ import annotations

import errno
import json
import os
import threading

import pytest

from dssefs.errors import ObjectNotFound, PreconditionFailed, StoreError
from dssefs.store import LocalStore
from dssefs.store import journal as jmod
from dssefs.store.journal import JournalStore, entry_files

META = {"dsse-h": "h1", "dsse-ki": "k"}


class Gated(LocalStore):
    """A local store whose writes wait for ``gate`` and can be made to fail; counts them."""

    def __init__(self, root):
        super().__init__(root)
        self.gate = threading.Event()
        self.gate.set()
        self.fail: BaseException | None = None
        self.calls: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def _enter(self, op: str, key: str) -> None:
        assert self.gate.wait(30)
        with self.lock:
            self.calls.append((op, key))
        if self.fail is not None:
            raise self.fail

    def put(self, key, body, metadata, **kw):
        self._enter("put", key)
        return super().put(key, body, metadata, **kw)

    def delete(self, key):
        self._enter("delete", key)
        return super().delete(key)

    def begin_upload(self, key, metadata, **kw):
        self._enter("begin_upload", key)
        return super().begin_upload(key, metadata, **kw)


@pytest.fixture
def inner(tmp_path) -> Gated:
    return Gated(tmp_path / "store")


@pytest.fixture
def journal(inner, tmp_path):
    made = []

    def make(**kw) -> JournalStore:
        j = JournalStore(inner, tmp_path / "journal", **kw)
        made.append(j)
        return j

    yield make
    for j in made:
        j._closed = True
        with j._cv:
            j._cv.notify_all()
            j._work.notify_all()


def _meta(h: str) -> dict:
    return {"dsse-h": h, "dsse-ki": "k"}


def test_put_is_local_first_then_uploaded(journal, inner):
    inner.gate.clear()
    j = journal()
    etag = j.put("d/a", b"hello", _meta("v1"), if_none_match=True)
    assert etag.startswith(jmod.SYNTHETIC)
    with pytest.raises(ObjectNotFound):
        LocalStore.head(inner, "d/a")  # not in the store yet
    info = j.head("d/a", prefix=3)
    assert (info.size, info.etag, info.prefix, info.metadata) == (5, etag, b"hel", _meta("v1"))
    assert j.get_range("d/a", 1, 3, if_match=etag) == (b"ell", 5)
    assert [x if isinstance(x, str) else x.key for x in j.list("d/")] == ["d/a"]
    assert [x for x in j.list("", "/")] == ["d/"]
    assert j.stats()["entries"] == 1
    inner.gate.set()
    j.settle("d/a")
    stored = LocalStore.head(inner, "d/a")
    assert stored.metadata == _meta("v1") and LocalStore.get_range(inner, "d/a", 0, 5)[0] == b"hello"
    # a reader pinned to the synthetic ETag still reads, from the store now
    assert j.get_range("d/a", 0, 5, if_match=etag) == (b"hello", 5)
    assert j.stats()["entries"] == 0 and not entry_files(j.dir)


def test_settle_returns_once_the_entry_file_is_gone(journal, inner, monkeypatch):
    """Once settle() returns, the journal holds no file of what it waited for (before, the file
    was removed after the waiters were told: with a slow unlink, settle returned first)."""
    import pathlib
    import time

    real_unlink = pathlib.Path.unlink

    def slow_unlink(self, *a, **kw):
        if self.suffix in (".centry", ".entry"):
            time.sleep(0.3)
        return real_unlink(self, *a, **kw)

    monkeypatch.setattr(pathlib.Path, "unlink", slow_unlink)
    j = journal()
    j.put("d/a", b"hello", _meta("v1"), if_none_match=True)
    j.settle("d/a")
    assert not entry_files(j.dir)
    j.put("d/b", b"world", _meta("v1"), if_none_match=True)
    assert j.drain(30) == []
    assert not entry_files(j.dir)


def test_a_pending_version_is_replaced_not_uploaded(journal, inner):
    inner.gate.clear()
    j = journal(workers=1)
    e1 = j.put("blocker", b"x", _meta("b"), if_none_match=True)  # the one worker waits on this
    etag = j.put("f", b"one", _meta("1"), if_none_match=True)
    for n in range(2, 6):
        etag = j.put("f", f"version {n}".encode(), _meta(str(n)), if_match=etag)
    assert len(entry_files(j.dir)) == 2
    inner.gate.set()
    assert j.drain() == []
    assert [c for c in inner.calls if c[1] == "f"] == [("put", "f")]  # only the newest was sent
    assert LocalStore.get_range(inner, "f", 0, 100)[0] == b"version 5"
    assert e1


def test_writes_after_an_upload_began_wait_for_it_and_chain_conditions(journal, inner):
    inner.gate.clear()
    j = journal()
    e1 = j.put("f", b"one", _meta("1"), if_none_match=True)
    for _ in range(100):  # a worker has taken it and waits at the gate
        with j._cv:
            if j._queues["f"][0].uploading:
                break
        threading.Event().wait(0.01)
    e2 = j.put("f", b"two", _meta("2"), if_match=e1)
    with pytest.raises(PreconditionFailed):
        j.put("f", b"x", _meta("x"), if_match=e1)  # not the newest version
    with pytest.raises(PreconditionFailed):
        j.put("f", b"x", _meta("x"), if_none_match=True)
    inner.gate.set()
    j.settle("f")
    assert LocalStore.get_range(inner, "f", 0, 10)[0] == b"two"
    assert [c for c in inner.calls if c[1] == "f"] == [("put", "f"), ("put", "f")]
    assert e2


def test_deleting_a_never_stored_file_costs_nothing(journal, inner):
    inner.gate.clear()
    j = journal()
    j.put("tmp", b"scratch", _meta("t"), if_none_match=True)
    j.delete("tmp")
    with pytest.raises(ObjectNotFound):
        j.head("tmp")
    inner.gate.set()
    assert j.drain() == []
    assert inner.calls == []


def test_delete_after_a_stored_version_is_ordered(journal, inner):
    j = journal()
    e1 = j.put("f", b"one", _meta("1"), if_none_match=True)
    j.settle("f")
    inner.gate.clear()
    e2 = j.put("f", b"two", _meta("2"), if_match=e1)
    j.delete("f")
    with pytest.raises(ObjectNotFound):
        j.head("f")
    assert "f" not in [x.key for x in j.list("") if not isinstance(x, str)]
    j.put("f", b"three", _meta("3"), if_none_match=True)  # recreated after the pending delete
    inner.gate.set()
    j.settle("f")
    assert LocalStore.get_range(inner, "f", 0, 10)[0] == b"three"
    assert e2


def test_copy_of_a_pending_object_is_journaled(journal, inner):
    inner.gate.clear()
    j = journal()
    e = j.put("a", b"body", _meta("1"), if_none_match=True)
    j.copy("a", "a", _meta("1-attrs"), if_match=e)  # an attribute change
    j.copy("a", "b", _meta("1-b"), if_none_match=True)  # a rename's copy
    j.delete("a")
    inner.gate.set()
    assert j.drain() == []
    assert LocalStore.head(inner, "b").metadata == _meta("1-b")
    assert LocalStore.get_range(inner, "b", 0, 10)[0] == b"body"
    with pytest.raises(ObjectNotFound):
        LocalStore.head(inner, "a")


def test_crash_before_upload_then_replay(journal, inner, tmp_path):
    inner.fail = StoreError("store unreachable", errno=5)
    j = journal()
    e1 = j.put("f", b"one", _meta("1"), if_none_match=True)
    with pytest.raises(StoreError):
        j.settle("f")  # fsync reports the failure, the entry stays
    assert len(j.drain()) == 1
    j.close()  # as after a crash: the entry is on disk
    inner.fail = None
    j2 = journal()
    assert j2.drain() == []
    assert LocalStore.get_range(inner, "f", 0, 10)[0] == b"one"
    assert e1


def test_crash_between_two_versions_recognises_the_first(journal, inner):
    """The first version was uploaded, the crash came before the second: after the replay the
    second is conditional on the first, recognised by its header."""
    inner.gate.clear()
    j = journal()
    e1 = j.put("f", b"one", _meta("1"), if_none_match=True)
    for _ in range(100):
        with j._cv:
            if j._queues["f"][0].uploading:
                break
        threading.Event().wait(0.01)
    j.put("f", b"two", _meta("2"), if_match=e1)
    inner.fail = None
    inner.gate.set()
    j.settle("f")  # both uploaded here; now make a second run crash after the first of two
    inner.fail = StoreError("down", errno=5)
    e3 = j.put("f", b"three", _meta("3"), if_match=j.head("f").etag)
    with pytest.raises(StoreError):
        j.settle("f")
    j.close()
    inner.fail = None
    j2 = journal()
    assert j2.drain() == []
    assert LocalStore.get_range(inner, "f", 0, 10)[0] == b"three"
    assert e3


def test_conflict_found_in_the_background_is_saved_elsewhere(journal, inner):
    saved = []

    def on_conflict(key, meta, body):
        saved.append((key, meta, body))
        LocalStore.put(inner, key + ".conflict", body, meta, if_none_match=True)
        return key + ".conflict"

    j = journal(on_conflict=on_conflict)
    e1 = j.put("f", b"mine v1", _meta("1"), if_none_match=True)
    j.settle("f")
    LocalStore.put(inner, "f", b"theirs", _meta("other"))  # another client
    e2 = j.put("f", b"mine v2", _meta("2"), if_match=e1)
    with pytest.raises(StoreError):
        j.settle("f")
    assert saved == [("f", _meta("2"), b"mine v2")]
    assert LocalStore.get_range(inner, "f", 0, 10)[0] == b"theirs"
    assert LocalStore.get_range(inner, "f.conflict", 0, 10)[0] == b"mine v2"
    assert j.stats()["conflicts"] == 1 and j.stats()["entries"] == 0
    with pytest.raises(PreconditionFailed):
        j.put("f", b"v3", _meta("3"), if_match=e2)  # the lost version cannot be built upon


def test_multipart_entry_is_uploaded_in_parts(journal, inner, monkeypatch):
    monkeypatch.setattr(jmod, "MULTIPART", 1 << 20)
    monkeypatch.setattr(jmod, "UPLOAD_PART", 5 << 20)
    j = journal()
    data = os.urandom(11 << 20)
    up = j.begin_upload("big", _meta("b"), if_none_match=True)
    for n, start in enumerate(range(0, len(data), 4 << 20), start=1):
        up.put_part(n, data[start:start + (4 << 20)])
    etag = up.complete()
    assert j.get_range("big", 5, 10, if_match=etag) == (data[5:15], len(data))
    j.settle("big")
    assert ("begin_upload", "big") in inner.calls
    assert LocalStore.get_range(inner, "big", 0, len(data))[0] == data
    assert not [p for p in j.dir.iterdir() if p.name.startswith("upload-")]


def _wait_uploading(j: JournalStore, key: str) -> None:
    for _ in range(500):
        with j._cv:
            q = j._queues.get(key)
            if q and q[0].uploading:
                return
        threading.Event().wait(0.01)
    raise AssertionError(f"no worker took {key}")


def _crash(j: JournalStore, inner: Gated) -> None:
    """Stop ``j`` as a crash would: the upload waiting at the gate fails, nothing is uploaded or
    dropped any more (the entries stay on disk)."""
    j._closed = True
    with j._cv:
        j._work.notify_all()
    inner.fail = StoreError("the daemon is gone", errno=errno.EIO)
    inner.gate.set()
    for t in j._threads:
        t.join(10)
    inner.fail = None


class _SlowFsync:
    """``os.fsync`` that, in threads named ``slow``, waits for ``release`` (or raises ``error``)."""

    def __init__(self, monkeypatch):
        self.entered, self.release = threading.Event(), threading.Event()
        self.error: OSError | None = None
        real = os.fsync

        def fsync(fd):
            if threading.current_thread().name == "slow":
                self.entered.set()
                assert self.release.wait(30)
                if self.error is not None:
                    raise self.error
            return real(fd)

        monkeypatch.setattr(jmod.os, "fsync", fsync)

    def start(self, fn) -> threading.Thread:
        box = {}

        def run():
            try:
                box["result"] = fn()
            except BaseException as e:  # noqa: BLE001 - handed to the test
                box["error"] = e

        t = threading.Thread(target=run, name="slow")
        t.box = box
        t.start()
        assert self.entered.wait(10)
        return t


def test_writes_of_other_keys_do_not_wait_for_an_entry_being_made_durable(journal, inner, monkeypatch):
    """An entry is fsync'ed outside the journal's lock: while one key's entry waits for the disk,
    other keys are written, read and listed; a later write of the same key waits for it."""
    slow = _SlowFsync(monkeypatch)
    j = journal()
    t1 = slow.start(lambda: j.put("a", b"first", _meta("a1"), if_none_match=True))
    done = threading.Event()
    threading.Thread(target=lambda: (j.put("b", b"other", _meta("b1"), if_none_match=True), done.set()),
                     daemon=True).start()
    assert done.wait(10), "the write of another key waited for an fsync that was not its own"
    assert j.head("b").size == 5 and j.stats()["keys"] >= 1
    with pytest.raises(ObjectNotFound):
        j.head("a")  # not durable yet: not visible yet
    later = threading.Thread(target=lambda: j.put("a", b"second", _meta("a2")))
    later.start()
    later.join(0.3)
    assert later.is_alive(), "a later write of the same key did not wait for the earlier one"
    slow.release.set()
    t1.join(10)
    later.join(10)
    assert "error" not in t1.box and not later.is_alive()
    j.settle("a")
    assert LocalStore.get_range(inner, "a", 0, 10)[0] == b"second"


def test_the_version_being_replaced_is_not_sent_meanwhile(journal, inner, monkeypatch):
    """While a newer version's entry is being written, the pending one it replaces is not
    uploaded (only the newest is); if the newer one cannot be written, the older one is."""
    for fails in (False, True):
        slow = _SlowFsync(monkeypatch)
        inner.gate.clear()
        inner.calls.clear()
        j = journal(workers=1)
        j.put(f"blocker{fails}", b"x", _meta("b"), if_none_match=True)  # holds the one worker
        _wait_uploading(j, f"blocker{fails}")
        key = f"f{fails}"
        e1 = j.put(key, b"one", _meta("1"), if_none_match=True)
        if fails:
            slow.error = OSError(errno.ENOSPC, "No space left on device")
        t = slow.start(lambda: j.put(key, b"two", _meta("2"), if_match=e1))
        inner.gate.set()  # the worker is free: the blocker is stored, the replaced entry is not sent
        j.settle(f"blocker{fails}")
        threading.Event().wait(0.3)
        assert not [c for c in inner.calls if c[1] == key]
        slow.release.set()
        t.join(10)
        j.settle(key)
        assert [c for c in inner.calls if c[1] == key] == [("put", key)]
        if fails:
            assert isinstance(t.box["error"], StoreError) and t.box["error"].errno == errno.ENOSPC
            assert LocalStore.get_range(inner, key, 0, 10)[0] == b"one"
        else:
            assert "error" not in t.box
            assert LocalStore.get_range(inner, key, 0, 10)[0] == b"two"
        j.close()
        monkeypatch.undo()


@pytest.mark.parametrize("cut", [None, "short body", "changed byte", "empty file", "half a header"])
def test_after_a_crash_between_two_versions_a_torn_entry_is_dropped(journal, inner, cut, caplog):
    """A crash while an entry is written leaves it incomplete; the next open drops it (its write
    never returned) and uploads the pending version it would have replaced.  A complete one
    (``cut`` None: the crash came after it was written, before the older one was dropped)
    replaces the older one, which is never sent."""
    inner.gate.clear()
    j = journal(workers=1)
    j.put("blocker", b"x", _meta("b"), if_none_match=True)
    _wait_uploading(j, "blocker")
    e1 = j.put("f", b"version one", _meta("1"), if_none_match=True)
    first = j._queues["f"][0].path
    kept = first.read_bytes()
    j.put("f", b"version two, longer", _meta("2"), if_match=e1)
    assert not first.exists()
    second = j._queues["f"][0].path
    assert second.name.endswith(jmod.CHECKED_SUFFIX) and json.loads(second.read_bytes().split(b"\n")[0])["crc32"]
    _crash(j, inner)
    first.write_bytes(kept)  # as if the crash came before the first was dropped
    if cut is not None:
        data = second.read_bytes()
        head_len = data.index(b"\n") + 1
        torn = {"short body": data[:-3], "changed byte": data[:-1] + bytes([data[-1] ^ 1]),
                "empty file": b"", "half a header": data[:head_len // 2]}[cut]
        second.write_bytes(torn)
    j._close_fds()
    j2 = journal()
    assert j2.drain() == []
    want = b"version one" if cut else b"version two, longer"
    assert LocalStore.get_range(inner, "f", 0, 100)[0] == want
    assert [c for c in inner.calls if c[1] == "f"] == [("put", "f")]
    assert not entry_files(j2.dir)
    assert ("event=journal_torn_entry" in caplog.text) == (cut is not None)


def test_an_unreadable_renamed_entry_is_refused_not_dropped(journal, tmp_path):
    """An entry renamed into place (a multipart upload's) was complete when it got its name: if
    it cannot be read, it is kept and the mount refused, with the way out."""
    d = tmp_path / "journal"
    d.mkdir()
    (d / f"{7:016d}{jmod.ENTRY_SUFFIX}").write_bytes(b"{not json\n")
    with pytest.raises(StoreError, match="unreadable.*move it away"):
        journal()
    assert (d / f"{7:016d}{jmod.ENTRY_SUFFIX}").exists()


def test_one_daemon_per_journal(journal):
    journal()
    with pytest.raises(Exception, match="in use"):
        journal()


def test_conflict_names_fit_name_max():
    from dssefs.objects.vault import conflict_name

    stamp = "20261205T190000Z"
    assert conflict_name("report.txt", stamp) == "report.txt.dssefs-conflict-20261205T190000Z"
    long = "é" * 127  # 254 bytes
    got = conflict_name(long, stamp, 3)
    assert len(got.encode()) <= 255 and got.endswith(".dssefs-conflict-20261205T190000Z-3")
    assert got.encode().decode() == got  # whole characters only
