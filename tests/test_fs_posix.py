"""POSIX details of names and attributes: listings never drop a name, directory times never go
back on refresh, inode numbers stay stable when the kernel forgets an inode, and link counts.

Most cases drive the file system core directly (as tests/test_fs_core.py does); the ones where the
kernel matters (its inode cache, fstat of an unlinked file, ls) go through a real FUSE mount.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
import subprocess
import time

import pytest
import trio

from dssefs.envelope.metadata import KEY_ATTRS, b64decode, b64encode
from dssefs.errors import DssefsError, StoreUnavailable
from dssefs.store.local import LocalStore
from fuse_fixtures import Mount, requires_fuse
from test_fs_core import ROOT, backend, list_dir, make_fs, read_file, write_file  # noqa: F401 (fixture)


def fail_head_of(store, key: str):
    """Make ``store.head`` of ``key`` (only) fail as a store that stays throttled beyond its
    retries does; returns the undo function."""
    real = store.head

    def head(k, *a, **kw):
        if k == key:
            raise StoreUnavailable(f"{k}: injected: throttled beyond the retries")
        return real(k, *a, **kw)

    store.head = head
    return lambda: setattr(store, "head", real)


def tamper_attrs(store, key: str) -> None:
    """Flip one bit of the sealed attribute blob (``dsse-a``) of ``key``: the envelope still
    parses and its keys unwrap, but the attributes fail authentication."""
    info = store.head(key)
    body = store.get_range(key, 0, info.size)[0] if info.size else b""
    meta = dict(info.metadata)
    blob = bytearray(b64decode(meta[KEY_ATTRS], KEY_ATTRS))
    blob[len(blob) // 2] ^= 1
    meta[KEY_ATTRS] = b64encode(bytes(blob))
    store.put(key, bytes(body), meta)


def forget_all(fs, ino: int) -> None:
    """What the kernel does when it drops a directory and everything below it from its caches."""
    for child in fs.table.children(ino):
        forget_all(fs, child.ino)
    fs.forget([(ino, fs.node(ino).nlookup)])


async def open_fails(fs, ino: int) -> int:
    with pytest.raises(DssefsError) as e:
        fh, _ = await fs.open(ino, os.O_RDONLY)
        await fs.release(fh)
    return e.value.errno


# ---- 1. a listing never drops a name the store listed -----------------------------------------------


@pytest.mark.parametrize("ttl", [0, 60])
async def test_store_error_on_one_key_does_not_drop_it_from_the_listing(backend, tmp_path, caplog, ttl):
    fs0 = make_fs(backend, tmp_path)
    for name in ("a", "b", "c"):
        await write_file(fs0, name, name.encode() * 10)
    fs = make_fs(backend, tmp_path / "2", attr_timeout=ttl, entry_timeout=ttl)
    undo = fail_head_of(backend.store, "b")
    try:
        with caplog.at_level(logging.WARNING, logger="dssefs"):
            names = await list_dir(fs)
        assert sorted(names) == [".", "..", "a", "b", "c"]  # listed, not silently left out
        assert stat.S_ISREG(names["b"].mode)
        assert any("/b errno=EIO" in r.getMessage() for r in caplog.records)  # the log names it
        assert await open_fails(fs, names["b"].ino) == errno.EIO
        assert await read_file(fs, "a") == b"a" * 10
    finally:
        undo()
    if ttl == 0:  # a store failure is not remembered: the next access after the TTL probes again
        assert await read_file(fs, "b") == b"b" * 10


async def test_store_error_keeps_what_is_known_of_a_listed_name(backend, tmp_path):
    fs = make_fs(backend, tmp_path)
    await write_file(fs, "b", b"known")
    await fs.setattr((await fs.lookup(ROOT, "b")).ino, mode=0o600)
    undo = fail_head_of(backend.store, "b")
    try:
        names = await list_dir(fs)
        assert names["b"].mode & 0o7777 == 0o600 and names["b"].size == 5
    finally:
        undo()


async def test_object_with_tampered_attributes_is_listed_and_fails_to_open(backend, tmp_path, caplog):
    fs0 = make_fs(backend, tmp_path)
    await write_file(fs0, "ok", b"fine")
    await write_file(fs0, "t", b"attributes tampered")
    await fs0.mkdir(ROOT, "d", 0o700, 0, 0)
    tamper_attrs(backend.store, "t")
    tamper_attrs(backend.store, "d/")
    for via in ("readdir", "lookup"):
        fs = make_fs(backend, tmp_path / via)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="dssefs"):
            if via == "readdir":
                names = await list_dir(fs)
                assert sorted(names) == [".", "..", "d", "ok", "t"]
                t, d = names["t"], names["d"]
            else:
                t, d = await fs.lookup(ROOT, "t"), await fs.lookup(ROOT, "d")
        assert stat.S_ISREG(t.mode) and stat.S_ISDIR(d.mode)
        assert any("/t" in r.getMessage() for r in caplog.records), via  # the log names it
        assert await open_fails(fs, t.ino) == errno.EIO
        with pytest.raises(DssefsError) as e:  # and it is not changed blindly
            await fs.setattr(t.ino, mode=0o600)
        assert e.value.errno == errno.EACCES
        assert await read_file(fs, "ok") == b"fine"


# ---- 2. directory times never go back on refresh ------------------------------------------------------


async def test_directory_times_do_not_go_back_on_refresh(backend, tmp_path):
    fs = make_fs(backend, tmp_path)  # attr_timeout=0: every getattr refreshes from the store
    d = await fs.mkdir(ROOT, "d", 0o755, 0, 0)  # marker stored at once (attr_delay=0)
    await trio.sleep(0.05)
    for change in ("create", "mkdir", "rename", "unlink"):
        if change == "create":
            await write_file(fs, "a", b"x", parent=d.ino)
        elif change == "mkdir":
            await fs.mkdir(d.ino, "sub", 0o755, 0, 0)
        elif change == "rename":
            await fs.rename(d.ino, "a", d.ino, "b")
        else:
            await fs.unlink(d.ino, "b")
        seen = await fs.getattr(d.ino)
        assert seen.mtime_ns > d.mtime_ns, change
        await trio.sleep(0.01)
        again = await fs.getattr(d.ino)
        assert (again.mtime_ns, again.ctime_ns) >= (seen.mtime_ns, seen.ctime_ns), change
        # the kernel forgets the directory; looking it up again does not bring the old time back
        forget_all(fs, d.ino)
        assert fs.table.get(d.ino) is None
        d2 = await fs.lookup(ROOT, "d")
        assert (d2.mtime_ns, d2.ctime_ns) >= (seen.mtime_ns, seen.ctime_ns), change
    # a time set explicitly (utimens) is what the directory shows, also when it is older
    await fs.setattr(d.ino, mtime_ns=1_000_000_000)
    assert (await fs.getattr(d.ino)).mtime_ns == 1_000_000_000
    assert (await make_fs(backend, tmp_path / "o").lookup(ROOT, "d")).mtime_ns == 1_000_000_000


async def test_deferred_directory_marker_then_new_file_keeps_the_newer_time(backend, tmp_path):
    """mkdir d; sleep; touch d/a: after the attribute TTL the stored (older) time must not return."""
    fs = make_fs(backend, tmp_path, attr_delay=0.05)
    d = await fs.mkdir(ROOT, "d", 0o755, 0, 0)
    with trio.fail_after(10):
        while fs.node(d.ino).meta_dirty:  # the marker (with the mkdir time) is stored
            await trio.sleep(0.02)
    await trio.sleep(0.1)
    await write_file(fs, "a", b"x", parent=d.ino)
    after = await fs.getattr(d.ino)
    assert after.mtime_ns > d.mtime_ns
    await trio.sleep(0.1)
    assert (await fs.getattr(d.ino)).mtime_ns == after.mtime_ns


# ---- 3. inode numbers are stable for the life of the mount -----------------------------------------------


async def test_inode_numbers_survive_forget_and_rename(backend, tmp_path):
    fs = make_fs(backend, tmp_path)
    d = await fs.mkdir(ROOT, "d", 0o755, 0, 0)
    ino_f = await write_file(fs, "f", b"1", parent=d.ino)
    ino_g = await write_file(fs, "g", b"2")
    fs.forget([(ino_f, 1), (ino_g, 1), (d.ino, 1)])
    assert fs.table.get(ino_f) is None and fs.table.get(d.ino) is None
    d2 = await fs.lookup(ROOT, "d")
    assert d2.ino == d.ino
    assert (await fs.lookup(d.ino, "f")).ino == ino_f
    assert (await fs.lookup(ROOT, "g")).ino == ino_g
    # listed (READDIRPLUS) entries the kernel did not keep: same numbers next time
    first = {n: st.ino for n, st in (await list_dir(fs)).items()}
    fs.trim(list(first.values()))
    assert {n: st.ino for n, st in (await list_dir(fs)).items()} == first
    # renames keep the number, also once forgotten after the rename
    await fs.rename(ROOT, "g", d.ino, "h")
    await fs.rename(ROOT, "d", ROOT, "e")
    fs.forget([(ino_g, 2), (ino_f, 1), (d.ino, 2)])
    e = await fs.lookup(ROOT, "e")
    assert e.ino == d.ino
    assert (await fs.lookup(e.ino, "h")).ino == ino_g
    assert (await fs.lookup(e.ino, "f")).ino == ino_f
    # a new file under a removed name is another file: another number
    await fs.unlink(e.ino, "f")
    assert await write_file(fs, "f", b"new", parent=e.ino) != ino_f


async def test_a_name_gone_from_the_store_gives_a_new_number(backend, tmp_path):
    fs = make_fs(backend, tmp_path)
    ino = await write_file(fs, "f", b"1")
    fs.forget([(ino, 1)])
    other = make_fs(backend, tmp_path / "o")
    await other.unlink(ROOT, "f")
    assert await other.deletes.drain() == []  # unlink leaves the DELETE to the background: done now
    with pytest.raises(DssefsError):
        await fs.lookup(ROOT, "f")
    await write_file(other, "f", b"2")
    assert (await fs.lookup(ROOT, "f")).ino != ino


# ---- 4. link counts -------------------------------------------------------------------------------------


async def test_link_counts(backend, tmp_path):
    fs = make_fs(backend, tmp_path)
    d = await fs.mkdir(ROOT, "d", 0o755, 0, 0)
    await fs.mkdir(d.ino, "sub", 0o755, 0, 0)
    # the number of subdirectories is not known without a listing: 1, "unknown" (as btrfs and
    # several network file systems report), never a count that find could trust wrongly
    assert d.nlink == 1
    assert (await fs.getattr(d.ino)).nlink == 1
    assert (await fs.lookup(ROOT, "d")).nlink == 1
    assert (await fs.getattr(ROOT)).nlink == 1
    assert {n: st.nlink for n, st in (await list_dir(fs)).items()} == {".": 1, "..": 1, "d": 1}
    ino = await write_file(fs, "f", b"data")
    assert (await fs.getattr(ino)).nlink == 1
    fh, _ = await fs.open(ino, os.O_RDWR)
    await fs.unlink(ROOT, "f")
    assert (await fs.getattr(ino)).nlink == 0  # fstat of an open, unlinked file
    assert (await fs.setattr(ino, mode=0o600)).nlink == 0
    await fs.release(fh)


# ---- through a real FUSE mount --------------------------------------------------------------------------


def drop_kernel_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")


@pytest.mark.fuse
@requires_fuse
def test_mount_inode_numbers_survive_drop_caches(local_mount: Mount):
    m = local_mount
    (m / "d").mkdir()
    (m / "d" / "f").write_bytes(b"1")
    (m / "g").write_bytes(b"2")
    before = {p: os.stat(m / p).st_ino for p in ("d", "d/f", "g")}
    out = subprocess.run(["stat", "-c", "%i", str(m / "g")], capture_output=True, text=True, check=True)
    assert int(out.stdout) == before["g"]
    drop_kernel_caches()
    assert {p: os.stat(m / p).st_ino for p in before} == before
    os.rename(m / "g", m / "d" / "h")
    os.rename(m / "d", m / "e")
    drop_kernel_caches()
    assert os.stat(m / "e").st_ino == before["d"]
    assert os.stat(m / "e" / "f").st_ino == before["d/f"]
    assert os.stat(m / "e" / "h").st_ino == before["g"]


@pytest.mark.fuse
@requires_fuse
def test_mount_link_counts(local_mount: Mount):
    m = local_mount
    (m / "d" / "sub").mkdir(parents=True)
    assert os.stat(m / "d").st_nlink == 1
    time.sleep(1.2)  # after the attribute TTL, from the daemon again
    assert os.stat(m / "d").st_nlink == 1
    p = m / "f"
    p.write_bytes(b"data")
    assert os.stat(p).st_nlink == 1
    fd = os.open(p, os.O_RDWR)
    try:
        os.unlink(p)
        assert os.fstat(fd).st_nlink == 0
        os.fchmod(fd, 0o600)
        assert os.fstat(fd).st_nlink == 0
        time.sleep(1.2)
        assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)


@pytest.mark.fuse
@requires_fuse
def test_mount_directory_mtime_does_not_go_back(local_mount: Mount):
    m = local_mount
    (m / "d").mkdir()
    time.sleep(2)  # the marker (with the mkdir time) is stored after attr_delay (1 s)
    (m / "d" / "a").write_bytes(b"")
    seen = os.stat(m / "d").st_mtime_ns
    assert seen > time.time_ns() - 1_000_000_000
    time.sleep(1.3)  # attr_timeout: the next stat refreshes from the store
    assert os.stat(m / "d").st_mtime_ns >= seen
    drop_kernel_caches()
    assert os.stat(m / "d").st_mtime_ns >= seen


@pytest.mark.fuse
@requires_fuse
def test_mount_lists_an_object_with_tampered_attributes(local_mount: Mount):
    m = local_mount
    (m / "ok").write_bytes(b"fine")
    (m / "t").write_bytes(b"attributes tampered")
    assert m.stop() == 0
    tamper_attrs(LocalStore(m.source[len("file://"):]), "t")
    m.start()
    out = subprocess.run(["ls", "-a", str(m.mountpoint)], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split() == [".", "..", "ok", "t"]
    with pytest.raises(OSError) as e:
        (m / "t").read_bytes()
    assert e.value.errno == errno.EIO
    assert (m / "ok").read_bytes() == b"fine"
    assert re.search(r"event=probe_failed object=\S+/t errno=EIO", m.log())  # the log names it
    assert re.search(r"op=open object=\S+/t errno=EIO", m.log())
