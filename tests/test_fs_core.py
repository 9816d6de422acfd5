"""The file system core driven directly (no FUSE), over LocalStore + keyring and S3(moto) + KMS."""

from __future__ import annotations

import errno
import os
import stat

import pytest
import trio

from dssefs.errors import DssefsError
from dssefs.fs import Filesystem, FsConfig
from dssefs.kms.local import LocalKeyringProvider, create_keyring
from dssefs.objects.vault import Vault, bytes_source
from dssefs.store.local import LocalStore

ROOT = 1


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def backend(request, tmp_path):
    if request.param == "local":
        store = LocalStore(str(tmp_path / "store"))
        create_keyring(str(tmp_path / "keyring"))
        keys = LocalKeyringProvider(str(tmp_path / "keyring"))
    else:
        from dssefs.kms.aws import AwsKmsProvider
        from dssefs.store.s3 import S3Store
        bucket = request.getfixturevalue("bucket")
        key = request.getfixturevalue("kms_key")
        store = S3Store(bucket)
        keys = AwsKmsProvider(key)
    return Vault(store, keys, chunk_log2=16)


def make_fs(vault, tmp_path, **kw) -> Filesystem:
    # attr_delay=0: attribute changes are stored before the call returns (the deferred stores
    # have their own tests below)
    cfg = dict(chunk_size=1 << 16, spill_dir=str(tmp_path / "spill"), attr_timeout=0, entry_timeout=0,
               attr_delay=0)
    cfg.update(kw)
    return Filesystem(vault, "", FsConfig(**cfg))


async def write_file(fs, name, data, parent=ROOT):
    fh, st = await fs.create(parent, name, 0o644, os.O_WRONLY | os.O_CREAT, 0, 0)
    await fs.write(fh, 0, data)
    await fs.flush(fh)
    await fs.release(fh)
    return st.ino


async def read_file(fs, name, parent=ROOT):
    st = await fs.lookup(parent, name)
    fh, _ = await fs.open(st.ino, os.O_RDONLY)
    try:
        return await fs.read(fh, 0, 1 << 30)
    finally:
        await fs.release(fh)


async def test_roundtrip_and_remount(backend, tmp_path):
    fs = make_fs(backend, tmp_path)
    data = os.urandom(200_000)
    await write_file(fs, "a.bin", data)
    assert await read_file(fs, "a.bin") == data
    fs2 = make_fs(backend, tmp_path / "2")
    assert await read_file(fs2, "a.bin") == data
    st = await fs2.lookup(ROOT, "a.bin")
    assert st.size == len(data) and stat.S_ISREG(st.mode) and st.mode & 0o777 == 0o644


async def test_random_writes_holes_truncate(backend, tmp_path):
    fs = make_fs(backend, tmp_path)
    ino = await write_file(fs, "f", b"x" * 100)
    model = bytearray(b"x" * 100)
    fh, _ = await fs.open(ino, os.O_RDWR)
    for off, chunk in [(300_000, b"tail"), (70_000, b"mid" * 1000), (50, b"yy")]:
        await fs.write(fh, off, chunk)
        if len(model) < off:
            model.extend(bytes(off - len(model)))
        model[off:off + len(chunk)] = chunk
    assert await fs.read(fh, 0, 1 << 20) == bytes(model)
    await fs.setattr(ino, size=65_000)
    del model[65_000:]
    await fs.setattr(ino, size=140_000)
    model.extend(bytes(140_000 - len(model)))
    await fs.fsync(fh)
    await fs.release(fh)
    fs2 = make_fs(backend, tmp_path / "2")
    assert await read_file(fs2, "f") == bytes(model)


async def test_spill_beyond_cache(backend, tmp_path):
    fs = make_fs(backend, tmp_path, cache_size=3 << 16)
    data = os.urandom(20 << 16)
    fh, st = await fs.create(ROOT, "big", 0o600, os.O_RDWR | os.O_CREAT, 0, 0)
    for off in range(0, len(data), 50_000):
        await fs.write(fh, off, data[off:off + 50_000])
    assert fs.cache.stats()["spilled_chunks"] > 0
    assert fs.cache.used <= (4 << 16)
    assert await fs.read(fh, 0, len(data)) == data
    await fs.flush(fh)
    assert fs.cache.stats()["spilled_chunks"] == 0
    await fs.release(fh)
    assert os.listdir(tmp_path / "spill") == []
    assert await read_file(make_fs(backend, tmp_path / "2"), "big") == data


async def test_directories_and_rename(backend, tmp_path):
    fs = make_fs(backend, tmp_path)
    d = await fs.mkdir(ROOT, "d", 0o750, 0, 0)
    sub = await fs.mkdir(d.ino, "sub", 0o755, 0, 0)
    await write_file(fs, "x", b"hello", parent=sub.ino)
    with pytest.raises(DssefsError) as e:
        await fs.rmdir(ROOT, "d")
    assert e.value.errno == errno.ENOTEMPTY
    with pytest.raises(DssefsError) as e:
        await fs.mkdir(ROOT, "d", 0o755, 0, 0)
    assert e.value.errno == errno.EEXIST
    await fs.rename(ROOT, "d", ROOT, "e")
    fs2 = make_fs(backend, tmp_path / "2")
    e2 = await fs2.lookup(ROOT, "e")
    assert stat.S_ISDIR(e2.mode) and e2.mode & 0o777 == 0o750
    s2 = await fs2.lookup(e2.ino, "sub")
    assert await read_file(fs2, "x", parent=s2.ino) == b"hello"
    with pytest.raises(DssefsError):
        await fs2.lookup(ROOT, "d")
    # rename over an existing file
    await write_file(fs, "p", b"new")
    await write_file(fs, "q", b"old")
    await fs.rename(ROOT, "p", ROOT, "q")
    assert await read_file(fs2, "q") == b"new"
    fh = await fs2.opendir(ROOT)
    names = [n for n, _st, _off in await fs2.readdir(fh, 0)]
    assert names == [".", "..", "e", "q"]


async def test_unlinked_file_stays_readable(backend, tmp_path):
    fs = make_fs(backend, tmp_path)
    data = os.urandom(150_000)
    ino = await write_file(fs, "gone", data)
    fh, _ = await fs.open(ino, os.O_RDWR)
    await fs.unlink(ROOT, "gone")
    assert await fs.read(fh, 0, len(data)) == data
    await fs.write(fh, 0, b"ZZ")
    assert (await fs.read(fh, 0, 4)) == b"ZZ" + data[2:4]
    await fs.release(fh)
    with pytest.raises(DssefsError) as e:
        await fs.lookup(ROOT, "gone")
    assert e.value.errno == errno.ENOENT


async def test_symlink_special_xattr_chmod(backend, tmp_path):
    fs = make_fs(backend, tmp_path)
    target = b"/" + b"t" * 4000
    await fs.symlink(ROOT, "ln", target, 0, 0)
    await fs.mknod(ROOT, "fifo", stat.S_IFIFO | 0o640, 0, 0, 0)
    ino = await write_file(fs, "f", b"data")
    await fs.setxattr(ino, "user.k", b"v" * 100)
    with pytest.raises(DssefsError) as e:
        await fs.setxattr(ino, "user.big", b"v" * 2000)
    assert e.value.errno == errno.ENOSPC
    await fs.setattr(ino, mode=0o4755)
    await fs.setattr(ino, uid=1000, gid=1000)
    await fs.setattr(ino, atime_ns=1_000_000_000, mtime_ns=2_000_000_000)
    fs2 = make_fs(backend, tmp_path / "2")
    ln = await fs2.lookup(ROOT, "ln")
    assert stat.S_ISLNK(ln.mode) and await fs2.readlink(ln.ino) == target
    fifo = await fs2.lookup(ROOT, "fifo")
    assert stat.S_ISFIFO(fifo.mode) and fifo.mode & 0o777 == 0o640
    f = await fs2.lookup(ROOT, "f")
    assert f.mode & 0o7777 == 0o755 and (f.uid, f.gid) == (1000, 1000)  # setuid cleared by chown
    assert (f.atime_ns, f.mtime_ns) == (1_000_000_000, 2_000_000_000)
    assert await fs2.getxattr(f.ino, "user.k") == b"v" * 100
    assert await fs2.listxattr(f.ino) == ["user.k"]
    assert await read_file(fs2, "f") == b"data"
    with pytest.raises(DssefsError) as e:
        await fs2.link(f.ino, ROOT, "hard")
    assert e.value.errno == errno.EPERM


def count_copies(vault) -> list:
    calls = []
    real = vault.store.copy

    def copy(*a, **kw):
        calls.append(a[:2])
        return real(*a, **kw)
    vault.store.copy = copy
    return calls


async def mode_seen_by_another_mount(vault, tmp_path, name, parent_name=None) -> int:
    other = make_fs(vault, tmp_path)
    parent = ROOT if parent_name is None else (await other.lookup(ROOT, parent_name)).ino
    return (await other.lookup(parent, name)).mode & 0o7777


def count_puts(vault) -> list:
    """The keys of objects PUT from now on; epoch records (one per epoch, not per object) are
    left out."""
    calls = []
    real = vault.store.put

    def put(key, *a, **kw):
        if ".dssefs" not in key.split("/"):
            calls.append(key)
        return real(key, *a, **kw)
    vault.store.put = put
    return calls


async def test_attribute_changes_are_stored_together_after_a_delay(backend, tmp_path):
    fs = make_fs(backend, tmp_path, attr_delay=1.5, attr_idle=1.5)
    ino = await write_file(fs, "f", b"data")
    copies, puts = count_copies(backend), count_puts(backend)
    d = await fs.mkdir(ROOT, "d", 0o700, 0, 0)
    for i in (ino, d.ino):  # what tar does at the end of a directory: utimens, chown, chmod
        await fs.setattr(i, atime_ns=1_000_000_000, mtime_ns=2_000_000_000)
        await fs.setattr(i, uid=1000, gid=1000)
        await fs.setattr(i, mode=0o751)
    assert (await fs.getattr(ino)).mode & 0o7777 == 0o751  # seen at once through this mount
    assert copies == [] and puts == []  # nothing stored yet, not even the new directory
    assert await mode_seen_by_another_mount(backend, tmp_path / "o1", "f") == 0o644
    with trio.fail_after(10):  # due 1.5 s after the first change
        while not (copies and puts):
            await trio.sleep(0.05)
    await trio.sleep(0.1)  # nothing more comes
    # one metadata-only copy for the file; the directory's marker is created once, with its
    # final attributes
    assert copies == [("f", "f")] and puts == ["d/"]
    assert await mode_seen_by_another_mount(backend, tmp_path / "o2", "f") == 0o751
    assert await mode_seen_by_another_mount(backend, tmp_path / "o3", "d") == 0o751
    other = make_fs(backend, tmp_path / "o4")
    f = await other.lookup(ROOT, "f")
    assert (f.uid, f.gid, f.atime_ns, f.mtime_ns) == (1000, 1000, 1_000_000_000, 2_000_000_000)


async def test_deferred_attributes_are_stored_once_the_burst_is_over(backend, tmp_path):
    # attr_idle: a burst of changes (spaced less than attr_idle apart) is stored together once it
    # stops, long before attr_delay; the deadline (attr_delay after the first change) still holds
    # for changes that keep coming
    fs = make_fs(backend, tmp_path, attr_delay=30, attr_idle=0.4)
    ino = await write_file(fs, "f", b"data")
    copies, puts = count_copies(backend), count_puts(backend)
    d = await fs.mkdir(ROOT, "d", 0o700, 0, 0)
    t0 = trio.current_time()
    for mode in (0o751, 0o750, 0o755, 0o711):  # 0.6 s of changes, 0.15 s apart
        await fs.setattr(ino, mode=mode)
        await fs.setattr(d.ino, mode=mode)
        await trio.sleep(0.15)
    assert copies == [] and puts == []  # still within the burst
    with trio.fail_after(10):
        while not (copies and puts):
            await trio.sleep(0.02)
    stored_after = trio.current_time() - t0
    await trio.sleep(0.5)  # nothing more comes
    assert copies == [("f", "f")] and puts == ["d/"]  # one store each, with the last mode
    assert 0.6 <= stored_after < 5  # after the burst, not after attr_delay (30 s)
    assert await mode_seen_by_another_mount(backend, tmp_path / "o1", "f") == 0o711
    assert await mode_seen_by_another_mount(backend, tmp_path / "o2", "d") == 0o711

    # changes that keep coming are stored attr_delay after the first of them
    fs = make_fs(backend, tmp_path / "b", attr_delay=1.0, attr_idle=0.5)
    ino = (await fs.lookup(ROOT, "f")).ino
    copies.clear()
    t0 = trio.current_time()
    modes = iter(range(0o700, 0o777))
    with trio.fail_after(10):
        while not copies:
            await fs.setattr(ino, mode=next(modes))
            await trio.sleep(0.1)
    assert 0.9 <= trio.current_time() - t0 < 5


async def test_mkdir_marker_is_stored_with_later_attribute_changes(backend, tmp_path):
    fs = make_fs(backend, tmp_path, attr_delay=60, attr_idle=60)
    puts = count_puts(backend)
    a = await fs.mkdir(ROOT, "a", 0o700, 0, 0)
    b = await fs.mkdir(a.ino, "b", 0o700, 0, 0)
    await fs.mkdir(ROOT, "gone", 0o700, 0, 0)
    assert puts == []
    # this mount sees the new directories at once, with their attributes and (empty) listings
    assert set(await list_dir(fs)) >= {"a", "gone"} and set(await list_dir(fs, a.ino)) == {".", "..", "b"}
    assert (await fs.lookup(ROOT, "a")).mode & 0o7777 == 0o700
    # another mount does not see an empty one yet (as after a crash before it was stored)
    with pytest.raises(DssefsError) as e:
        await make_fs(backend, tmp_path / "o1").lookup(ROOT, "gone")
    assert e.value.errno == errno.ENOENT
    await fs.rmdir(ROOT, "gone")  # never stored: nothing to delete
    assert puts == []
    await fs.setattr(b.ino, mode=0o750)
    # fsync of the parent stores the markers of directories made in it (POSIX: mkdir is made
    # durable by fsync of the parent), each once, with the attributes changed meanwhile
    fh = await fs.opendir(a.ino)
    await fs.fsyncdir(fh)
    await fs.releasedir(fh)
    assert puts == ["a/", "a/b/"]  # the directory itself and the one made in it
    assert await mode_seen_by_another_mount(backend, tmp_path / "o2", "b", "a") == 0o750
    # a file below a pending directory brings it into existence; unmount stores its marker
    c = await fs.mkdir(ROOT, "c", 0o700, 0, 0)
    await write_file(fs, "f", b"x", parent=c.ino)
    assert await mode_seen_by_another_mount(backend, tmp_path / "o3", "c") == 0o755  # implicit
    errors = await fs.flush_all(final=True)
    assert errors == []
    assert puts == ["a/", "a/b/", "c/f", "c/"]
    assert await mode_seen_by_another_mount(backend, tmp_path / "o4", "c") == 0o700
    assert "gone" not in await list_dir(make_fs(backend, tmp_path / "o5"))


async def test_deferred_mkdir_loses_to_another_clients_marker_without_losing_data(backend, tmp_path):
    fs = make_fs(backend, tmp_path, attr_delay=60, attr_idle=60)
    await fs.mkdir(ROOT, "d", 0o700, 0, 0)
    other = make_fs(backend, tmp_path / "o")
    await other.mkdir(ROOT, "d", 0o711, 0, 0)  # stored at once (attr_delay=0)
    errors = await fs.flush_all(final=True)
    assert [e.errno for _, e in errors] == [errno.EIO]
    assert "another client" in str(errors[0][1])
    assert await mode_seen_by_another_mount(backend, tmp_path / "o2", "d") == 0o711


async def test_fsync_fsyncdir_close_and_unmount_store_pending_attributes(backend, tmp_path):
    fs = make_fs(backend, tmp_path, attr_delay=60, attr_idle=60)
    ino = await write_file(fs, "f", b"data")
    d = await fs.mkdir(ROOT, "d", 0o755, 0, 0)
    await fs.setattr(ino, mode=0o600)
    fh, _ = await fs.open(ino, os.O_RDONLY)
    await fs.fsync(fh)  # fsync of a read-only descriptor
    assert await mode_seen_by_another_mount(backend, tmp_path / "o1", "f") == 0o600
    await fs.setattr(ino, mode=0o640)
    await fs.flush(fh)  # close
    await fs.release(fh)
    assert await mode_seen_by_another_mount(backend, tmp_path / "o2", "f") == 0o640
    await fs.setattr(d.ino, mode=0o700)
    dh = await fs.opendir(d.ino)
    await fs.fsyncdir(dh)
    await fs.releasedir(dh)
    assert await mode_seen_by_another_mount(backend, tmp_path / "o3", "d") == 0o700
    await fs.setattr(ino, mode=0o604)
    await fs.setxattr(d.ino, "user.k", b"v")
    assert await fs.flush_all(final=True) == []  # unmount / SIGTERM
    assert await mode_seen_by_another_mount(backend, tmp_path / "o4", "f") == 0o604
    other = make_fs(backend, tmp_path / "o5")
    assert await other.getxattr((await other.lookup(ROOT, "d")).ino, "user.k") == b"v"
    # pending changes of a removed name are dropped, not stored under another name
    await fs.setattr(ino, mode=0o666)
    await fs.unlink(ROOT, "f")
    await fs.setattr(d.ino, mode=0o711)
    await fs.rmdir(ROOT, "d")
    assert fs.dirty_inodes() == []


async def test_failed_deferred_attribute_store_is_reported_by_the_next_fsync(backend, tmp_path):
    fs = make_fs(backend, tmp_path, attr_delay=60, attr_idle=60)
    ino = await write_file(fs, "f", b"data")
    await fs.setattr(ino, mode=0o600)
    assert ino in fs._deferred
    await write_file(make_fs(backend, tmp_path / "o"), "f", b"newer")  # another client wins
    # the deferred store comes due (what the background task does at the deadline): it fails
    # with a conflict, is logged and kept
    del fs._deferred[ino]
    await fs._store_deferred(fs.node(ino))
    assert fs.node(ino).meta_error is not None and fs.node(ino).meta_dirty
    fh, _ = await fs.open(ino, os.O_RDONLY)
    with pytest.raises(DssefsError) as e:
        await fs.fsync(fh)
    assert e.value.errno == errno.EIO
    await fs.release(fh)
    assert await mode_seen_by_another_mount(backend, tmp_path / "o2", "f") == 0o644
    failures = await fs.flush_all(final=True)
    assert [f[1].errno for f in failures] == [errno.EIO]


async def test_conflict_is_not_overwritten(backend, tmp_path):
    fs1 = make_fs(backend, tmp_path)
    fs2 = make_fs(backend, tmp_path / "2")
    await write_file(fs1, "c", b"v1")
    st = await fs2.lookup(ROOT, "c")
    fh2, _ = await fs2.open(st.ino, os.O_WRONLY)
    await write_file(fs1, "c", b"v2-from-one")  # O_CREAT on existing: opens it
    await fs2.write(fh2, 0, b"v3")
    with pytest.raises(DssefsError) as e:
        await fs2.flush(fh2)
    assert e.value.errno == errno.EIO
    assert await read_file(make_fs(backend, tmp_path / "3"), "c") == b"v2-from-one"
    assert fs2.node(st.ino).dirty  # the local change is kept, not dropped
    await fs2.release(fh2)


async def test_concurrent_files(backend, tmp_path):
    fs = make_fs(backend, tmp_path)
    blobs = {f"n{i}": os.urandom(30_000 + i) for i in range(12)}
    async with trio.open_nursery() as n:
        for name, data in blobs.items():
            n.start_soon(write_file, fs, name, data)
    for name, data in blobs.items():
        assert await read_file(fs, name) == data


async def test_root_attributes_persist_with_prefix(backend, tmp_path):
    fs = Filesystem(backend, "team/", FsConfig(chunk_size=1 << 16, attr_timeout=0, entry_timeout=0, attr_delay=0))
    await fs.setattr(ROOT, mode=0o700, uid=42, gid=43)
    await write_file(fs, "inside", b"x")
    fs2 = Filesystem(backend, "team", FsConfig(chunk_size=1 << 16))
    fs2.load_root()
    st = await fs2.getattr(ROOT)
    assert (stat.S_IMODE(st.mode), st.uid, st.gid) == (0o700, 42, 43)
    assert await read_file(fs2, "inside") == b"x"
    keys = sorted(i.key for i in backend.store.list("", delimiter=None) if ".dssefs" not in i.key.split("/"))
    assert keys == ["team/", "team/inside"]


def test_chunk_evicted_between_fetch_and_use_is_fetched_again(tmp_path):
    """Regression: a clean chunk cached when a read/write looked, but evicted by another thread
    before the lock was taken again, must not turn into zeros."""
    from dssefs.fs.cache import ChunkCache, FileContent
    from dssefs.objects.vault import bytes_source

    create_keyring(str(tmp_path / "kr"))
    vault = Vault(LocalStore(str(tmp_path / "store")), LocalKeyringProvider(str(tmp_path / "kr")), chunk_log2=12)
    data = os.urandom(3 * 4096 + 100)
    vault.write("f", bytes_source(data), len(data))
    obj = vault.open("f")
    cache = ChunkCache(1 << 20, None)
    content = FileContent(cache, obj, 4096, obj.size)
    assert content.read(0, len(data)) == data  # everything cached now
    original = content._fetch
    raced = []

    def racing_fetch(want, dirty=False):
        got = original(want, dirty)
        if not raced:  # another thread evicts every clean chunk right after the check
            raced.append(True)
            with cache.lock:
                for i in list(content.chunks):
                    cache._forget(content, i)
        return got

    content._fetch = racing_fetch
    assert content.read(0, len(data)) == data
    raced.clear()
    content.read(0, len(data))
    raced.clear()
    content.write(5, b"XY")  # a partial write needs chunk 0's stored bytes
    assert content.read(0, len(data)) == data[:5] + b"XY" + data[7:]


async def test_rename_errors(backend, tmp_path):
    fs = make_fs(backend, tmp_path)
    d = await fs.mkdir(ROOT, "d", 0o755, 0, 0)
    await fs.mkdir(ROOT, "full", 0o755, 0, 0)
    full = await fs.lookup(ROOT, "full")
    await write_file(fs, "inside", b"1", parent=full.ino)
    await write_file(fs, "f", b"f")
    await write_file(fs, "g", b"g")
    cases = [
        (("f", ROOT, "g", 1), errno.EEXIST),  # RENAME_NOREPLACE
        (("f", ROOT, "g", 2), errno.EINVAL),  # RENAME_EXCHANGE
        (("d", d.ino, "sub", 0), errno.EINVAL),  # into itself
        (("d", ROOT, "f", 0), errno.ENOTDIR),  # directory over a file
        (("f", ROOT, "d", 0), errno.EISDIR),  # file over a directory
        (("d", ROOT, "full", 0), errno.ENOTEMPTY),  # directory over a non-empty one
        (("missing", ROOT, "x", 0), errno.ENOENT),
    ]
    for (old, new_parent, new, flags), code in cases:
        with pytest.raises(DssefsError) as e:
            await fs.rename(ROOT, old, new_parent, new, flags)
        assert e.value.errno == code, (old, new, flags)
    await fs.mkdir(ROOT, "empty", 0o755, 0, 0)
    await fs.rename(ROOT, "d", ROOT, "empty")  # over an empty directory is fine
    assert stat.S_ISDIR((await fs.lookup(ROOT, "empty")).mode)
    assert await read_file(fs, "g") == b"g"


def test_inode_table_lookup_counts_and_deferred_deletion():
    from dssefs.fs.attributes import Attrs
    from dssefs.fs.inodes import InodeTable

    t = InodeTable(Attrs.new(stat.S_IFDIR | 0o755, 0, 0))
    d = t.add(ROOT, "d", Attrs.new(stat.S_IFDIR | 0o755, 0, 0))
    f = t.add(d.ino, "f", Attrs.new(stat.S_IFREG | 0o644, 0, 0))
    d.nlookup, f.nlookup = 1, 2
    t.forget(d.ino, 1)
    assert t.get(d.ino) is d  # kept: it still has a known child (keys are computed through it)
    f.open_count = 1
    t.detach(f)  # unlinked while open
    assert t.child(d.ino, "f") is None and t.get(f.ino) is f
    assert t.get(d.ino) is None  # no references, no children left: dropped
    t.forget(f.ino, 2)
    assert t.get(f.ino) is f  # still open
    f.open_count = 0
    t.maybe_drop(f)
    assert t.get(f.ino) is None
    g = t.add(ROOT, "g", Attrs.new(stat.S_IFREG | 0o644, 0, 0))
    h = t.add(ROOT, "g", Attrs.new(stat.S_IFREG | 0o644, 0, 0))  # replaced name
    assert g.ino != h.ino and t.child(ROOT, "g") is h and not g.linked
    assert len(t) == 2  # root and h; inode numbers are never reused


def test_attrs_codec_roundtrip_and_rejects_garbage():
    from dssefs.errors import IntegrityError
    from dssefs.fs.attributes import Attrs

    a = Attrs(stat.S_IFCHR | 0o600, 1000, 100, 1, 2, 3, os.makedev(1, 3), {"user.k": b"\x00\xff"})
    blob = a.encode()
    assert len(blob) < 200 and Attrs.decode(blob) == a
    for bad in (b"", b"{}", b"[1]", b'{"m":"x","u":0,"g":0,"a":0,"t":0,"c":0}', b"\xff"):
        with pytest.raises(IntegrityError):
            Attrs.decode(bad)


class CountingReads:
    """Counts ranged GETs (the requests a read needs once a file is probed)."""

    def __init__(self, store):
        self.store, self.calls = store, []
        self._get_range = store.get_range
        store.get_range = self

    def __call__(self, key, start, length, **kw):
        self.calls.append(key)
        return self._get_range(key, start, length, **kw)

    def undo(self):
        self.store.get_range = self._get_range


async def list_dir(fs, ino=ROOT):
    fh = await fs.opendir(ino)
    try:
        return {name: st for name, st, _ in await fs.readdir(fh, 0)}
    finally:
        await fs.releasedir(fh)


async def test_small_files_are_read_whole_by_their_probe(backend, tmp_path):
    small, big = os.urandom(60_000), os.urandom(70_000)
    await write_file(make_fs(backend, tmp_path), "small", small)
    await write_file(make_fs(backend, tmp_path), "big", big)
    await make_fs(backend, tmp_path).symlink(ROOT, "link", b"small", 0, 0)
    spy = CountingReads(backend.store)
    try:
        # listed (READDIRPLUS) or looked up: the small file's body came with the probe
        for probe in ("readdir", "lookup"):
            fs = make_fs(backend, tmp_path / probe, small_file_prefetch=64 << 10)
            if probe == "readdir":
                assert set(await list_dir(fs)) >= {"small", "big", "link"}
            spy.calls.clear()
            assert await read_file(fs, "small") == small
            assert await read_file(fs, "big") == big
            st = await fs.lookup(ROOT, "link")
            assert await fs.readlink(st.ino) == b"small"
            assert spy.calls == ["big"], probe
        # prefetch off: every read is a request of its own
        fs = make_fs(backend, tmp_path / "off", small_file_prefetch=0)
        spy.calls.clear()
        assert await read_file(fs, "small") == small
        assert spy.calls == ["small"]
    finally:
        spy.undo()


async def test_tampered_small_file_fails_on_read_not_on_listing(backend, tmp_path):
    data = b"secret small file " * 100
    await write_file(make_fs(backend, tmp_path), "t", data)
    await write_file(make_fs(backend, tmp_path), "ok", b"fine")
    store = backend.store
    info = store.head("t")
    body = bytearray(store.get_range("t", 0, info.size)[0])
    body[len(body) // 2] ^= 1
    store.put("t", bytes(body), info.metadata)  # same header and keys, one body bit flipped
    fs = make_fs(backend, tmp_path / "2")
    names = await list_dir(fs)
    assert names["t"].size == len(data)  # attributes are authentic; the body is not
    with pytest.raises(DssefsError) as e:
        await read_file(fs, "t")
    assert e.value.errno == errno.EIO
    assert await read_file(fs, "ok") == b"fine"


async def test_names_the_store_cannot_hold_are_refused_at_create(backend, tmp_path):
    """A local store keeps names of at most 253 bytes (they become NAME.o files): longer ones
    fail at create with ENAMETOOLONG, never at close with the data only in memory.  S3 keys
    take the 255 bytes that statfs advertises."""
    fs = make_fs(backend, tmp_path)
    local = backend.store.max_segment_bytes is not None
    for n in (253, 254, 255):
        name = "n" * n
        if local and n > 253:
            with pytest.raises(DssefsError) as e:
                await write_file(fs, name, b"data")
            assert e.value.errno == errno.ENAMETOOLONG
            with pytest.raises(DssefsError) as e:
                await fs.mkdir(ROOT, name, 0o755, 0, 0)
            assert e.value.errno == errno.ENAMETOOLONG
        else:
            await write_file(fs, name, b"data")
            assert await read_file(make_fs(backend, tmp_path / "other"), name) == b"data"
    assert fs.statfs()["f_namemax"] == (253 if local else 255)


async def test_epoch_records_below_a_directory_go_with_it(backend, tmp_path):
    """'dssefs put' keeps its epoch in the object's directory (d/.dssefs/epochs/ID): renaming the
    directory re-wraps its files under the mount's epoch and drops the record, and rmdir of a
    directory left with only records removes them, so nothing keeps the name alive."""
    cli = Vault(backend.store, backend.keys, chunk_log2=16)  # as the object commands write
    cli.write("d/x", bytes_source(b"from put"), 8)
    cli.write("k/y", bytes_source(b"kept"), 4)
    backend.store.delete("k/y")  # only k's record is left

    def keys(prefix):
        return sorted(i.key for i in backend.store.list(prefix, delimiter=None))
    assert [k.split("/")[1] for k in keys("d/")] == [".dssefs", "x"]
    fs = make_fs(backend, tmp_path)
    await fs.rename(ROOT, "d", ROOT, "e")
    assert keys("d/") == []
    assert await read_file(fs, "x", (await fs.lookup(ROOT, "e")).ino) == b"from put"
    assert set(await list_dir(fs)) >= {"e", "k"} and ".dssefs" not in await list_dir(fs)
    await fs.rmdir(ROOT, "k")
    assert keys("k/") == []


def test_read_ahead_asks_the_store_again_while_answered_requests_are_decrypted():
    # a read-ahead request holds its slot only while it waits for the store: once its answer is
    # in (its first chunk delivered) the next request starts while the rest of its chunks are
    # decrypted, so decryption never leaves the store idle; at most PREFETCH_JOBS wait for the
    # store at once and at most twice that are in flight
    import threading
    import time

    from dssefs.fs import cache as cache_mod
    from dssefs.fs.cache import ChunkCache, FileContent
    cs = 1 << 20
    n = 64
    release = threading.Event()
    lock = threading.Lock()
    state = {"asking": 0, "most_asking": 0, "started": 0}

    class SlowToDecrypt:
        size = n * cs
        chunk_size = cs

        def read_chunks(self, run, deliver=None):
            with lock:
                state["asking"] += 1
                state["started"] += 1
                state["most_asking"] = max(state["most_asking"], state["asking"])
            time.sleep(0.01)  # the store's answer
            with lock:
                state["asking"] -= 1
            out = [bytearray(bytes([i % 251])) * cs for i in run]
            for k, (i, plain) in enumerate(zip(run, out)):
                if k == 1:
                    release.wait(10)  # the rest of the run is still being decrypted
                if deliver is not None:
                    deliver(i, plain)
            return out

    cache = ChunkCache(1 << 30, None)
    try:
        content = FileContent(cache, SlowToDecrypt(), cs, n * cs)
        content.ra_window = 64 * cs  # a stream that has grown its window
        content.seq_end = 0
        content.ra_req = 4  # 4 MiB, then 8 MiB requests
        with cache.lock:
            content._read_ahead(0)
        deadline = time.monotonic() + 10
        while state["started"] < 2 * cache_mod.PREFETCH_JOBS and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        # every request is answered and stuck decrypting: twice PREFETCH_JOBS were started
        assert state["started"] == 2 * cache_mod.PREFETCH_JOBS, state
        with cache.lock:
            in_flight, asking = len(content.ra_jobs), content.ra_asking
        assert in_flight == 2 * cache_mod.PREFETCH_JOBS and asking == 0
        assert state["most_asking"] <= cache_mod.PREFETCH_JOBS
    finally:
        release.set()
        cache.close()
    assert content.read(5 * cs, 10) == bytes([5]) * 10


def test_sequential_reader_drops_the_clean_chunks_it_has_left_behind():
    """A sequential stream keeps only what is within READ_AHEAD_MIN behind it (the kernel's page
    cache holds what the reader got); chunks from before the stream began and dirty chunks stay."""
    from dssefs.fs.cache import READ_AHEAD_MIN, ChunkCache, FileContent
    cs = 1 << 20
    n = 32
    fetched = []

    class Base:
        size = n * cs
        chunk_size = cs

        def read_chunks(self, run, deliver=None):
            fetched.extend(run)
            out = [bytearray(bytes([i % 251])) * cs for i in run]
            if deliver is not None:
                for i, plain in zip(run, out):
                    deliver(i, plain)
            return out

    def expect(i: int) -> bytes:
        return bytes([i % 251]) * cs

    cache = ChunkCache(1 << 30, None)
    try:
        content = FileContent(cache, Base(), cs, n * cs)
        # random reads first: chunks 20 and 3; then reads from chunk 10 on, a stream from chunk 11
        # (the first read right where the one before ended)
        assert content.read(20 * cs, 10) == expect(20)[:10]
        assert content.read(3 * cs, 10) == expect(3)[:10]
        content.write(12 * cs + 5, b"dirty")
        for i in range(10, n):
            got = content.read(i * cs, cs)
            assert got == (expect(12)[:5] + b"dirty" + expect(12)[10:] if i == 12 else expect(i))
        behind = (n - 1) * cs - READ_AHEAD_MIN  # where the last read began, less the slack
        kept = sorted(content.chunks)
        assert content.chunks[12].dirty
        assert kept == [3, 10, 12, *range(behind // cs, n)]  # 20 was passed by the stream
        assert cache.used == len(kept) * cs
        # a stream from the start drops what it passes, the dirty chunk excepted, and reads right
        for i in range(n):
            content.read(i * cs, cs)
        assert sorted(content.chunks) == [12, *range(behind // cs, n)]
        assert cache.used == (1 + n - behind // cs) * cs
        assert content.read(12 * cs, 10) == expect(12)[:5] + b"dirty"
    finally:
        cache.close()
    # the first pass fetched every chunk once; the second fetched again only what it had dropped
    assert sorted(set(fetched)) == list(range(n))
