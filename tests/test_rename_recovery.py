"""Interrupted directory renames are finished: by the next mount, or by the next rename that
touches the same directories.  A crash is played at every step of a rename (the store dies at a
chosen request: nothing after it reaches the store), then a new file system on the same store
must end with the directory under its new name only, nothing lost and nothing duplicated.  The
last tests kill a real mount daemon (SIGKILL) while a request of the rename is held back by the
fault proxy in front of moto."""

from __future__ import annotations

import base64
import errno
import json
import logging
import os
import stat
import threading
import time

import pytest

from dssefs.envelope.epoch import is_reserved_key
from dssefs.errors import DssefsError
from dssefs.fs import Filesystem, FsConfig
from dssefs.kms.local import LocalKeyringProvider, create_keyring
from dssefs.objects.vault import Vault
from dssefs.store.local import LocalStore

from faultproxy import COPY_SOURCE, DELAY, ERROR, fault_proxy  # noqa: F401 (fixture)
from fuse_fixtures import requires_fuse

ROOT = 1
RENAMES = ".dssefs/renames/"
TREE = {"a.txt": b"alpha", "b.bin": os.urandom(70_000), "c": b"", "sub/deep.bin": os.urandom(3000),
        "sub/x": b"x" * 10, "e.txt": b"echo"}


class Crash(BaseException):
    """The process died: nothing after this reaches the store."""


class CrashingStore:
    """A store that dies at the ``nth`` call of ``method`` whose key ``match``es; every later
    call (from any thread) dies too."""

    CALLS = {"head", "get_range", "put", "copy", "delete", "list", "begin_upload", "list_uploads",
             "abort_upload"}

    def __init__(self, inner, method: str | None = None, match=lambda key: True, nth: int = 1):
        self.inner, self.method, self.match, self.nth = inner, method, match, nth
        self.seen = 0
        self.dead = False
        self.crashed_at: str | None = None
        self._lock = threading.Lock()

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if name not in self.CALLS:
            return attr

        def call(*args, **kw):
            key = args[1] if name == "copy" else (args[0] if args else kw.get("prefix", ""))
            with self._lock:
                if self.dead:
                    raise Crash(name)
                if name == self.method and self.match(key):
                    self.seen += 1
                    if self.seen == self.nth:
                        self.dead = True
                        self.crashed_at = key
                        raise Crash(name)
            return attr(*args, **kw)
        return call


def has_crash(exc: BaseException) -> bool:
    if isinstance(exc, Crash):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return any(has_crash(e) for e in exc.exceptions)
    return has_crash(exc.__context__) if exc.__context__ is not None else False


@pytest.fixture
def world(tmp_path):
    """``(store, new_vault)``: a local store and a factory of fresh vaults (a new process each)."""
    create_keyring(str(tmp_path / "keyring"))
    store = LocalStore(str(tmp_path / "store"))

    def new_vault(over=None) -> Vault:
        return Vault(over or store, LocalKeyringProvider(str(tmp_path / "keyring")), chunk_log2=16)
    return store, new_vault


def make_fs(vault, tmp_path, prefix="", **kw) -> Filesystem:
    cfg = dict(chunk_size=1 << 16, spill_dir=str(tmp_path / f"spill-{os.urandom(4).hex()}"),
               attr_timeout=0, entry_timeout=0, attr_delay=0)
    cfg.update(kw)
    return Filesystem(vault, prefix, FsConfig(**cfg))


async def write_file(fs, parent, name, data):
    fh, st = await fs.create(parent, name, 0o644, os.O_WRONLY | os.O_CREAT, 0, 0)
    await fs.write(fh, 0, data)
    await fs.flush(fh)
    await fs.release(fh)
    return st.ino


async def read_path(fs, path):
    ino = ROOT
    for part in path.split("/"):
        ino = (await fs.lookup(ino, part)).ino
    fh, _ = await fs.open(ino, os.O_RDONLY)
    try:
        return await fs.read(fh, 0, 1 << 30)
    finally:
        await fs.release(fh)


async def names(fs, ino=ROOT):
    fh = await fs.opendir(ino)
    try:
        return sorted(n for n, _, _ in await fs.readdir(fh, 0) if n not in (".", ".."))
    finally:
        await fs.releasedir(fh)


async def build_tree(fs, top="old", parent=ROOT):
    d = await fs.mkdir(parent, top, 0o750, 0, 0)
    sub = await fs.mkdir(d.ino, "sub", 0o755, 0, 0)
    for rel, data in TREE.items():
        await write_file(fs, sub.ino if rel.startswith("sub/") else d.ino, rel.split("/")[-1], data)
    await write_file(fs, ROOT, "keep.txt", b"untouched")


def file_keys(store, prefix=""):
    return sorted(k for k in (i.key for i in store.list(prefix, None) if not isinstance(i, str))
                  if not is_reserved_key(k))


def intents(store, prefix=""):
    return [i.key for i in store.list(prefix + RENAMES, None) if not isinstance(i, str)]


def expected_keys(top="new", prefix=""):
    return sorted([prefix + "keep.txt", f"{prefix}{top}/", f"{prefix}{top}/sub/"]
                  + [f"{prefix}{top}/{rel}" for rel in TREE])


async def check_renamed(fs, store, prefix=""):
    """The directory is under its new name only, every file whole, no stray objects or records."""
    assert await names(fs) == ["keep.txt", "new"]
    new = await fs.lookup(ROOT, "new")
    assert stat.S_ISDIR(new.mode) and new.mode & 0o777 == 0o750  # the marker moved with its attributes
    assert await names(fs, new.ino) == sorted(["a.txt", "b.bin", "c", "e.txt", "sub"])
    for rel, data in TREE.items():
        assert await read_path(fs, "new/" + rel) == data, rel
    assert await read_path(fs, "keep.txt") == b"untouched"
    assert file_keys(store) == expected_keys(prefix=prefix)
    assert intents(store, prefix) == []
    with pytest.raises(DssefsError) as e:
        await fs.lookup(ROOT, ".dssefs")
    assert e.value.errno == errno.ENOENT


# crash points: (store method, which keys, nth call)
POINTS = {
    "after-intent": ("copy", lambda k: k.startswith("new/"), 1),  # intent stored, nothing copied
    "after-copies": ("copy", lambda k: k.startswith("new/"), 4),  # some objects moved
    "copy-then-delete": ("delete", lambda k: k.startswith("old/"), 1),  # a copy whose source is kept
    "after-deletes": ("delete", lambda k: RENAMES in k, 1),  # every source gone, record left
}


async def crashed_rename(world, tmp_path, point, prefix=""):
    """Build the tree, then rename old -> new on a store that dies at ``point``."""
    store, new_vault = world
    await build_tree(make_fs(new_vault(), tmp_path, prefix))
    method, match, nth = POINTS[point]
    crashing = CrashingStore(store, method, lambda k: match(k[len(prefix):]), nth)
    fs = make_fs(new_vault(crashing), tmp_path, prefix)
    with pytest.raises(BaseException) as e:
        await fs.rename(ROOT, "old", ROOT, "new")
    assert has_crash(e.value), e.value
    assert crashing.dead
    # the record of the rename was durable before its first copy, and is still there
    assert len(intents(store, prefix)) == 1
    return store


@pytest.mark.parametrize("point", list(POINTS))
async def test_next_mount_finishes_an_interrupted_rename(world, tmp_path, point, caplog):
    caplog.set_level(logging.INFO, logger="dssefs")
    store = await crashed_rename(world, tmp_path, point)
    fs = make_fs(world[1](), tmp_path)
    summary = await fs.resume_renames()
    assert summary["resumed"] == 1, summary
    assert "event=rename_resumed" in caplog.text
    await check_renamed(fs, store)


@pytest.mark.parametrize("point", list(POINTS))
async def test_running_the_rename_again_finishes_it(world, tmp_path, point):
    store = await crashed_rename(world, tmp_path, point)
    fs = make_fs(world[1](), tmp_path)
    if point == "after-deletes":  # nothing is left under the old name: the kernel would say ENOENT
        with pytest.raises(DssefsError) as e:
            await fs.rename(ROOT, "old", ROOT, "new")
        assert e.value.errno == errno.ENOENT
    else:
        await fs.rename(ROOT, "old", ROOT, "new")
        # the inode of 'old' now answers as 'new'
        assert (await fs.lookup(ROOT, "new")).ino is not None
    await check_renamed(fs, store)


async def test_mv_into_the_new_directory_finishes_the_rename_first(world, tmp_path):
    """'mv old new' with 'new' a directory means rename(old, new/old): the pending rename is
    finished first, after which 'old' no longer exists (ENOENT), and nothing is nested."""
    store = await crashed_rename(world, tmp_path, "after-copies")
    fs = make_fs(world[1](), tmp_path)
    new = await fs.lookup(ROOT, "new")
    with pytest.raises(DssefsError) as e:
        await fs.rename(ROOT, "old", new.ino, "old")
    assert e.value.errno == errno.ENOENT
    await check_renamed(fs, store)


async def test_a_copy_changed_by_another_client_is_a_conflict(world, tmp_path, caplog):
    """Between the crash and the recovery another client rewrites the copy of the object whose
    delete was interrupted: that copy is not the source's, so neither is deleted or overwritten."""
    caplog.set_level(logging.INFO, logger="dssefs")
    store, new_vault = world
    await build_tree(make_fs(new_vault(), tmp_path))
    crashing = CrashingStore(store, "delete", lambda k: k == "old/b.bin")
    fs = make_fs(new_vault(crashing), tmp_path)
    with pytest.raises(BaseException):
        await fs.rename(ROOT, "old", ROOT, "new")
    assert crashing.crashed_at == "old/b.bin" and file_keys(store, "new/b.bin") == ["new/b.bin"]
    other = make_fs(new_vault(), tmp_path)
    new = await other.lookup(ROOT, "new")
    fh, _ = await other.open((await other.lookup(new.ino, "b.bin")).ino, os.O_WRONLY | os.O_TRUNC)
    await other.write(fh, 0, b"written by another client")
    await other.flush(fh)
    await other.release(fh)

    fs = make_fs(new_vault(), tmp_path)
    summary = await fs.resume_renames()
    assert summary["resumed"] == 1
    assert "event=rename_conflict" in caplog.text and "old/b.bin" in caplog.text
    assert await read_path(fs, "old/b.bin") == TREE["b.bin"]  # kept: its copy is not verified
    assert await read_path(fs, "new/b.bin") == b"written by another client"  # not overwritten
    for rel, data in TREE.items():
        if rel != "b.bin":
            assert await read_path(fs, "new/" + rel) == data
    assert file_keys(store, "old/") == ["old/b.bin"]
    assert intents(store) == []


async def test_forged_or_moved_records_move_nothing(world, tmp_path, caplog):
    """A record sealed under other keys, an altered record and a genuine record copied to another
    name are refused: nothing is moved or deleted."""
    from dssefs.objects.intents import Entry, Renames, version_of

    caplog.set_level(logging.INFO, logger="dssefs")
    store = await crashed_rename(world, tmp_path, "after-copies")
    genuine = intents(store)[0]
    body, _ = store.get_range(genuine, 0, 1 << 20)
    store.delete(genuine)
    before = file_keys(store)
    # someone with write access to the bucket, sealing with keys of their own
    create_keyring(str(tmp_path / "other-keyring"))
    attacker = Vault(store, LocalKeyringProvider(str(tmp_path / "other-keyring")), chunk_log2=16)
    Renames(attacker).begin("", "new/", "stolen/", [Entry(k[4:], version_of(store.head(k)))
                                                     for k in file_keys(store, "new/")])
    doc = json.loads(body)  # one bit of the sealed payload flipped, stored under its own name
    sealed = bytearray(base64.urlsafe_b64decode(doc["sealed"] + "=="))
    sealed[40] ^= 1
    doc["sealed"] = base64.urlsafe_b64encode(bytes(sealed)).rstrip(b"=").decode()
    store.put(genuine, json.dumps(doc).encode(), {})
    store.put(RENAMES + "1" * 32, body, {})  # the genuine record under another name
    fs = make_fs(world[1](), tmp_path)
    summary = await fs.resume_renames()
    assert summary["resumed"] == 0 and summary["rejected"] == 3, summary
    assert caplog.text.count("event=rename_intent_rejected") == 3
    assert "fails authentication" in caplog.text and "made for another name" in caplog.text
    assert file_keys(store) == before  # nothing moved or deleted
    assert len(intents(store)) == 3  # left for a key holder to look at


async def test_read_only_mount_leaves_the_intent(world, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dssefs")
    store = await crashed_rename(world, tmp_path, "after-copies")
    before = file_keys(store)
    fs = make_fs(world[1](), tmp_path, read_only=True)
    summary = await fs.resume_renames()
    assert summary["resumed"] == 0 and summary["pending"] == 1
    assert "event=rename_pending" in caplog.text and "read_only" in caplog.text
    assert file_keys(store) == before and len(intents(store)) == 1
    fs = make_fs(world[1](), tmp_path)
    await fs.resume_renames()
    await check_renamed(fs, store)


async def test_another_clients_fresh_intent_is_left_alone(world, tmp_path, caplog, monkeypatch):
    """An intent of another mount that is recent may belong to a rename still running there: it
    is not resumed at mount start, and a rename touching its directories fails with EBUSY; once
    its heartbeat is older than the stale age, it is resumed."""
    from dssefs.objects import intents as intents_mod

    caplog.set_level(logging.INFO, logger="dssefs")
    store = await crashed_rename(world, tmp_path, "copy-then-delete")
    fs = make_fs(world[1](), tmp_path)
    fs.rename_owner = "elsewhere:/mnt/other"
    summary = await fs.resume_renames()
    assert summary["resumed"] == 0 and summary["pending"] == 1
    assert "another client" in caplog.text
    with pytest.raises(DssefsError) as e:
        await fs.rename(ROOT, "old", ROOT, "new")
    assert e.value.errno == errno.EBUSY
    monkeypatch.setattr(intents_mod, "STALE_AFTER", 0.0)
    await fs.rename(ROOT, "old", ROOT, "new")
    await check_renamed(fs, store)


async def test_rename_of_a_prefix_mounts_root_finishes_its_pending_rename(world, tmp_path):
    """A mount of prefix 'team' crashed during a rename; another mount (of the whole store)
    renames 'team' itself: the pending rename below is finished first and its record is not
    dropped with the epoch records, so nothing stays under both names."""
    store = await crashed_rename(world, tmp_path, "after-copies", prefix="team/")
    outer = make_fs(world[1](), tmp_path)
    await outer.rename(ROOT, "team", ROOT, "team2")
    assert file_keys(store) == expected_keys(prefix="team2/")
    assert intents(store, "team/") == [] and intents(store, "team2/") == []
    inner = make_fs(world[1](), tmp_path, "team2")
    await check_renamed(inner, store, "team2/")


async def test_an_object_that_cannot_be_moved_refuses_the_rename_first(world, tmp_path):
    """Every object is opened before the record is written: one that fails authentication
    refuses the rename (EIO) before anything moves."""
    store, new_vault = world
    await build_tree(make_fs(new_vault(), tmp_path))
    info = store.head("old/e.txt")
    meta = dict(info.metadata)
    h = meta["dsse-h"]
    meta["dsse-h"] = h[:100] + ("A" if h[100] != "A" else "B") + h[101:]
    store.copy("old/e.txt", "old/e.txt", meta)
    before = file_keys(store)
    fs = make_fs(new_vault(), tmp_path)
    with pytest.raises(DssefsError) as e:
        await fs.rename(ROOT, "old", ROOT, "new")
    assert e.value.errno == errno.EIO
    assert file_keys(store) == before and intents(store) == []


async def test_an_object_not_written_by_dssefs_is_finished_by_its_bytes(world, tmp_path):
    """Another program's object below the directory is moved as it is; caught between its copy
    and its delete, the copy is recognised by its bytes (a local store's copy has a new ETag)."""
    store, new_vault = world
    await build_tree(make_fs(new_vault(), tmp_path))
    store.put("old/plain.txt", b"not encrypted by dssefs", {"origin": "elsewhere"})
    crashing = CrashingStore(store, "delete", lambda k: k == "old/plain.txt")
    with pytest.raises(BaseException):
        await make_fs(new_vault(crashing), tmp_path).rename(ROOT, "old", ROOT, "new")
    assert crashing.crashed_at == "old/plain.txt"
    assert store.head("old/plain.txt").etag != store.head("new/plain.txt").etag
    summary = await make_fs(new_vault(), tmp_path).resume_renames()
    assert summary["resumed"] == 1
    assert file_keys(store, "old") == [] and intents(store) == []
    info = store.head("new/plain.txt")
    assert store.get_range("new/plain.txt", 0, 100)[0] == b"not encrypted by dssefs"
    assert info.metadata == {"origin": "elsewhere"}


async def test_the_objects_layer_finishes_it_without_a_file_system(world, tmp_path):
    """What a command can do: find the records under a prefix, open one, finish it."""
    from dssefs.objects.intents import Renames

    store = await crashed_rename(world, tmp_path, "copy-then-delete")
    renames = Renames(world[1]())
    [record] = renames.pending("")
    intent = renames.load(record.key)
    assert (intent.src, intent.dst, len(intent.entries)) == ("old/", "new/", len(TREE) + 2)
    counts = renames.resume(intent)
    assert counts["moved"] + counts["done"] == len(TREE) + 2 and counts["conflict"] == 0
    await check_renamed(make_fs(world[1](), tmp_path), store)


def test_heartbeat_refreshes_the_record(world, tmp_path):
    from dssefs.objects.intents import Renames

    store, new_vault = world
    renames = Renames(new_vault())
    intent = renames.begin("", "a/", "b/", [])
    first = store.head(intent.key)
    time.sleep(0.02)
    assert renames.heartbeat(intent)
    again = store.head(intent.key)
    assert again.mtime > first.mtime and again.etag != first.etag
    assert renames.load(intent.key) == intent  # the same record, still opening under its name
    store.delete(intent.key)
    assert not renames.heartbeat(intent)


# ---- a real mount, killed with SIGKILL ----------------------------------------------------------

MOUNT_POINTS = {
    # (method, target regex, headers, nth): the request held back while the daemon is killed
    "after-intent": ("PUT", r"/new/", COPY_SOURCE, 1),
    "after-copies": ("PUT", r"/new/", COPY_SOURCE, 3),
    "copy-then-delete": ("DELETE", r"/old/b\.bin(\?|$)", None, 1),
    "after-deletes": ("DELETE", r"/\.dssefs/renames/", None, 1),
}


@requires_fuse
@pytest.mark.fuse
@pytest.mark.s3
@pytest.mark.parametrize("point", list(MOUNT_POINTS))
def test_sigkilled_mount_rename_is_finished_by_the_next_mount(point, fault_proxy, mount_factory, s3_source,
                                                               tmp_path, moto_server, bucket):
    source, args = s3_source
    # directory markers stored at mkdir, so that they are among the objects moved
    m = mount_factory(tmp_path / "mnt", source, *args, "--endpoint-url", fault_proxy.endpoint,
                      "--attr-delay", "0")
    m.start()
    tree = {"a.txt": b"alpha", "b.bin": os.urandom(100_000), "sub/c": b"charlie", "d": b"delta"}
    (m / "old" / "sub").mkdir(parents=True)
    for rel, data in tree.items():
        (m / "old" / rel).write_bytes(data)
    (m / "keep.txt").write_bytes(b"untouched")
    method, path, headers, nth = MOUNT_POINTS[point]
    held = fault_proxy.add(DELAY, method=method, path=path, headers=headers, nth=[nth], delay=5.0)
    fault_proxy.add(ERROR, method=method, path=path, headers=headers, nth=[nth])  # never forwarded
    failed = []

    def rename():
        try:
            os.rename(m / "old", m / "new")
        except OSError as e:
            failed.append(e.errno)

    t = threading.Thread(target=rename)
    t.start()
    deadline = time.monotonic() + 30
    while held.hits == 0:
        assert time.monotonic() < deadline, m.log()
        time.sleep(0.01)
    m.kill()  # SIGKILL while that request is held
    t.join(30)
    assert failed and not t.is_alive()
    fault_proxy.clear()
    s3 = moto_server.client("s3")

    def keys(prefix=""):
        out = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", ())]
        return out

    assert len(keys(RENAMES)) == 1  # the record of the interrupted rename
    m.start()  # the same mount point: its daemon is known dead, so it finishes the rename at once
    deadline = time.monotonic() + 30
    while "event=rename_resumed" not in m.log():
        assert time.monotonic() < deadline, m.log()
        time.sleep(0.05)
    assert sorted(os.listdir(m.mountpoint)) == ["keep.txt", "new"]
    for rel, data in tree.items():
        assert (m / "new" / rel).read_bytes() == data, rel
    assert keys(RENAMES) == [] and [k for k in keys() if k.startswith("old")] == []
    assert sorted(k for k in keys() if not is_reserved_key(k)) == sorted(
        ["keep.txt", "new/", "new/sub/"] + [f"new/{rel}" for rel in tree])
    assert m.stop() == 0, m.log()
