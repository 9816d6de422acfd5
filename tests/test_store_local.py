"""LocalStore behaviour beyond the shared contract: layout, crash safety, cross-process locking."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest


from dssefs.errors import (ConfigError, ObjectNotFound, PreconditionFailed, StoreAccessDenied,
                           StoreError, StoreFull)
from dssefs.store import MIN_PART_SIZE, LocalStore, is_local_store
from dssefs.store.local import MAGIC
from threads import run_in_threads


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "store")


def keys_of(items) -> list[str]:
    return [i if isinstance(i, str) else i.key for i in items]


def test_identity(store, tmp_path):
    assert store.context_name == "local"
    assert store.url == f"file://{tmp_path}/store"
    assert is_local_store(tmp_path / "store")
    store.check()


def test_layout(store, tmp_path):
    root = tmp_path / "store"
    store.put("a", b"A", {})
    store.put("a/b", b"B", {})
    store.put("dir/", b"", {})
    assert (root / "objects" / "a.o").is_file()
    assert (root / "objects" / "a.d" / "b.o").is_file()
    assert (root / "objects" / "dir.d" / ".o").is_file()
    marker = json.loads((root / ".dssefs-store").read_text())
    assert marker == {"format": "dssefs-local-store", "version": 1}
    assert (root / "objects" / "a.o").read_bytes().startswith(MAGIC)
    assert oct((root).stat().st_mode & 0o777) == "0o700"


def test_etag_changes_on_every_write(store):
    e1 = store.put("k", b"same", {})
    e2 = store.put("k", b"same", {})
    e3 = store.copy("k", "k", {})
    e4 = store.copy("k", "k2", {})
    assert len({e1, e2, e3, e4}) == 4
    assert all(e.startswith('"') and e.endswith('"') and len(e) == 34 for e in (e1, e2, e3, e4))


def test_reopen_and_create_rules(tmp_path):
    with pytest.raises(ConfigError) as ei:
        LocalStore(tmp_path / "absent", create=False)
    assert "not a dssefs local store" in str(ei.value)
    assert not (tmp_path / "absent").exists()
    s = LocalStore(tmp_path / "deep" / "er" / "store")
    s.put("x", b"1", {})
    assert LocalStore(tmp_path / "deep" / "er" / "store", create=False).get_range("x", 0, 9) == (b"1", 1)


def test_unsupported_marker(tmp_path):
    root = tmp_path / "s"
    LocalStore(root)
    (root / ".dssefs-store").write_text(json.dumps({"format": "dssefs-local-store", "version": 99}))
    with pytest.raises(ConfigError) as ei:
        LocalStore(root)
    assert "upgrade dssefs" in str(ei.value)
    (root / ".dssefs-store").write_text("garbage")
    with pytest.raises(ConfigError):
        LocalStore(root)


def test_root_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError):
        LocalStore(tmp_path / "f")


def test_segment_too_long(store):
    with pytest.raises(StoreError) as ei:
        store.put("d/" + "x" * 254, b"", {})
    assert ei.value.errno == errno.ENAMETOOLONG
    store.put("d/" + "x" * 253, b"", {})  # 253 + ".o" = 255 bytes, the limit


def test_delete_prunes_empty_directories(store, tmp_path):
    store.put("p/q/r/s", b"", {})
    store.put("p/t", b"", {})
    store.delete("p/q/r/s")
    assert not (tmp_path / "store" / "objects" / "p.d" / "q.d").exists()
    assert (tmp_path / "store" / "objects" / "p.d").is_dir()
    store.delete("p/t")
    assert os.listdir(tmp_path / "store" / "objects") == []


def test_concurrent_put_and_delete_in_one_directory(store):
    """Pruning directories never makes a concurrent writer fail."""
    stop = time.monotonic() + 1.5
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            while time.monotonic() < stop:
                store.put(f"x/y/{i}", b"data", {})
                store.delete(f"x/y/{i}")
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    run_in_threads(writer, range(4))
    assert not errors, errors


# ----------------------------------------------------------------------------------------------
# Crash safety


def test_temp_files_are_invisible(store, tmp_path):
    store.put("d/obj", b"old", {"v": "1"})
    objdir = tmp_path / "store" / "objects" / "d.d"
    # What a writer killed before its rename leaves behind.
    (objdir / ".0123456789abcdef01234567.tmp").write_bytes(b"half-written")
    (tmp_path / "store" / "objects" / ".feedfacefeedfacefeedface.tmp").write_bytes(b"x")
    assert keys_of(store.list("", None)) == ["d/obj"]
    assert keys_of(store.list("")) == ["d/"]
    assert keys_of(store.list("d/")) == ["d/obj"]
    assert store.get_range("d/obj", 0, 10) == (b"old", 3)
    assert store.sweep(older_than=3600) == 0  # too young to be a crashed writer's
    assert store.sweep(older_than=0) == 2
    assert sorted(os.listdir(objdir)) == ["obj.o"]


def test_only_temp_files_do_not_make_a_prefix(store, tmp_path):
    store.put("a", b"", {})
    d = tmp_path / "store" / "objects" / "ghost.d"
    d.mkdir()
    (d / ".abc.tmp").write_bytes(b"x")
    assert keys_of(store.list("")) == ["a"]


def test_killed_writer_leaves_old_object(store, tmp_path):
    """A writer process SIGKILLed after writing its temporary file but before renaming it."""
    etag = store.put("victim", b"old body", {"v": "old"})
    ready = tmp_path / "ready"
    script = textwrap.dedent(f"""
        import os, time
        from dssefs.store import LocalStore
        s = LocalStore({str(tmp_path / 'store')!r})
        real_replace = os.replace
        def stall(src, dst):
            open({str(ready)!r}, "w").close()
            time.sleep(60)
        os.replace = stall
        s.put("victim", b"new body" * 100000, {{"v": "new"}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None, "writer exited early"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        tmps = [n for n in os.listdir(tmp_path / "store" / "objects") if n.endswith(".tmp")]
        assert len(tmps) == 1  # fully written, not yet renamed
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    info = store.head("victim")
    assert (info.etag, info.metadata) == (etag, {"v": "old"})
    assert store.get_range("victim", 0, 100) == (b"old body", 8)
    assert keys_of(store.list("", None)) == ["victim"]
    # The lock the killed writer may have held is released with its file descriptors.
    store.put("victim", b"after", {}, if_match=etag)
    assert store.sweep(older_than=0) == 1


def test_reader_keeps_its_version_while_a_writer_replaces_it(store):
    store.put("k", b"A" * 100_000, {"v": "a"})
    fd_count = len(os.listdir("/proc/self/fd"))
    for i in range(20):
        store.put("k", bytes([65 + i % 26]) * 100_000, {"v": str(i)})
        data, total = store.get_range("k", 0, 100_000)
        assert len(set(data)) == 1 and total == 100_000
    assert len(os.listdir("/proc/self/fd")) == fd_count  # no descriptor leaks


def test_truncated_object_is_reported(store, tmp_path):
    store.put("t", b"x" * 1000, {})
    store.put("u", b"y", {})
    path = tmp_path / "store" / "objects" / "t.o"
    os.truncate(path, path.stat().st_size - 10)
    with pytest.raises(StoreError) as ei:
        store.head("t")
    assert "corrupt" in str(ei.value) and "\n" not in str(ei.value)
    with pytest.raises(StoreError):
        store.get_range("t", 0, 10)
    assert keys_of(store.list("")) == ["u"]  # skipped with a warning
    (tmp_path / "store" / "objects" / "v.o").write_bytes(b"not an object")
    with pytest.raises(StoreError):
        store.head("v")


# ----------------------------------------------------------------------------------------------
# Conditional writes under contention


def test_threads_race_if_none_match(store):
    barrier = threading.Barrier(12)

    def attempt(i: int) -> str | None:
        barrier.wait()
        try:
            return store.put("race", f"writer {i}".encode(), {"w": str(i)}, if_none_match=True)
        except PreconditionFailed:
            return None

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(attempt, range(12)))
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    assert store.head("race").etag == winners[0]


def _race_process(root: str, etag: str, i: int, barrier, results) -> None:
    store = LocalStore(root, create=False)
    barrier.wait()
    try:
        store.put("race", f"process {i}".encode(), {"w": str(i)}, if_match=etag)
        results.put(i)
    except PreconditionFailed:
        results.put(-1)


def test_processes_race_if_match(store):
    etag = store.put("race", b"base", {})
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    results = ctx.Queue()
    procs = [ctx.Process(target=_race_process, args=(store.root, etag, i, barrier, results))
             for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    outcome = sorted(results.get(timeout=5) for _ in procs)
    assert outcome.count(-1) == 3
    winner = outcome[-1]
    assert store.get_range("race", 0, 100)[0] == f"process {winner}".encode()
    assert store.head("race").metadata == {"w": str(winner)}


def test_threads_race_copy_if_match(store):
    etag = store.put("doc", b"body", {"v": "0"})
    barrier = threading.Barrier(8)

    def attempt(i: int) -> bool:
        barrier.wait()
        try:
            store.copy("doc", "doc", {"v": str(i)}, if_match=etag)
            return True
        except PreconditionFailed:
            return False

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(attempt, range(8))) == 1


# ----------------------------------------------------------------------------------------------
# Multipart staging


def test_upload_staging_is_cleaned(store, tmp_path):
    up = store.begin_upload("m", {})
    up.put_part(1, b"x" * MIN_PART_SIZE)
    up.put_part(2, b"y")
    assert len(os.listdir(tmp_path / "store" / "uploads")) == 1
    up.complete()
    assert os.listdir(tmp_path / "store" / "uploads") == []
    with pytest.raises(StoreError):
        up.complete()  # already completed
    up.abort()  # no effect after completion
    assert store.head("m").size == MIN_PART_SIZE + 1

    up = store.begin_upload("n", {})
    up.put_part(1, b"z")
    up.abort()
    assert os.listdir(tmp_path / "store" / "uploads") == []


def test_multipart_parts_are_written_in_place(store, tmp_path, monkeypatch):
    """Equal parts land at their final offsets: complete() copies nothing, the header is padded
    into its reserved area, and the object reads back exactly."""
    import dssefs.store.local as local
    copies = []
    monkeypatch.setattr(local, "_copy_range", lambda *a: copies.append(a))
    s = LocalStore(tmp_path / "s", min_part_size=4)
    parts = [bytes([n]) * 8 for n in range(1, 6)] + [b"tail"]
    up = s.begin_upload("k/obj", {"m": "v"})
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda n: up.put_part(n, parts[n - 1]), [2, 1, 4, 3, 5, 6]))
    assert [n for n in os.listdir(up._dir) if n.endswith(".part")] == []
    etag = up.complete()
    assert copies == []
    whole = b"".join(parts)
    info = s.head("k/obj")
    assert (info.size, info.etag, info.metadata) == (len(whole), etag, {"m": "v"})
    assert s.get_range("k/obj", 0, 100) == (whole, len(whole))
    raw = (tmp_path / "s" / "objects" / "k.d" / "obj.o").read_bytes()
    assert raw.startswith(MAGIC) and raw.endswith(whole)
    n = int.from_bytes(raw[8:12], "big")
    assert json.loads(raw[12:12 + n])["etag"] == etag and raw[12:12 + n].endswith(b" ")
    assert os.listdir(tmp_path / "s" / "uploads") == []


def _big_parts(seed: int) -> list[bytes]:
    rnd = __import__("random").Random(seed)
    size = (3 << 20) + 100  # not a multiple of the page size: part offsets are unaligned
    return [rnd.randbytes(size) for _ in range(3)] + [rnd.randbytes(1234)]


def _roundtrip_big(s: LocalStore, key: str, parts: list[bytes]):
    up = s.begin_upload(key, {"m": "v"})
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda n: up.put_part(n, parts[n - 1]), [2, 1, 3, 4]))
    direct = up._direct_ok and len(up._bounces) > 0  # aligned copies were made: direct writes ran
    up.complete()
    whole = b"".join(parts)
    assert s.get_range(key, 0, len(whole) + 10) == (whole, len(whole))
    assert s.get_range(key, (3 << 20) - 7, 5000)[0] == whole[(3 << 20) - 7:(3 << 20) - 7 + 5000]
    return up, direct


def test_multipart_large_parts_are_written_with_direct_io(tmp_path):
    """Large parts bypass the page cache (O_DIRECT) for their page-aligned middle; the unaligned
    head and tail of each part go through it; the object reads back exactly."""
    s = LocalStore(tmp_path / "s", min_part_size=4)
    up, direct = _roundtrip_big(s, "big", _big_parts(1))
    assert direct, "ext4 supports O_DIRECT: the direct path must have been taken"
    assert up._bounces == [] and up._dfd == -1  # released with the upload


def test_multipart_direct_io_refused_falls_back_to_the_page_cache(tmp_path, monkeypatch):
    import dssefs.store.local as local
    real = local._pwrite_all
    refused = []

    def pwrite(fd, data, offset):
        if fd == up_fds.get("direct"):
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)
    monkeypatch.setattr(local, "_pwrite_all", pwrite)
    up_fds = {}
    real_open = local._open_direct
    monkeypatch.setattr(local, "_open_direct", lambda path: up_fds.setdefault("direct", real_open(path)))
    s = LocalStore(tmp_path / "s", min_part_size=4)
    up, _ = _roundtrip_big(s, "big", _big_parts(2))
    assert refused and not up._direct_ok


def test_multipart_large_parts_without_direct_io(tmp_path, monkeypatch):
    """A file system that refuses O_DIRECT at open: every byte goes through the page cache."""
    import dssefs.store.local as local
    monkeypatch.setattr(local, "_open_direct", lambda path: -1)
    s = LocalStore(tmp_path / "s", min_part_size=4)
    up, direct = _roundtrip_big(s, "big", _big_parts(3))
    assert not direct


def test_large_ranged_reads_use_direct_io_and_are_exact(tmp_path, monkeypatch):
    import random

    import dssefs.store.local as local
    s = LocalStore(tmp_path / "s")
    body = random.Random(4).randbytes((5 << 20) + 333)
    s.put("obj", body, {})
    used = []
    real = local._pread_direct
    monkeypatch.setattr(local, "_pread_direct", lambda *a: used.append(a[1:]) or real(*a))
    for start, length in [(0, len(body)), (1, (1 << 20) + 5), (4095, 3 << 20), (len(body) - (1 << 20) - 7, 1 << 21)]:
        data, total = s.get_range("obj", start, length)
        assert total == len(body) and data == body[start:start + length]
    assert len(used) == 4
    fd = os.open(tmp_path / "s" / "objects" / "obj.o", os.O_RDONLY)
    try:
        assert real(fd, 1 << 20, 7) is not None  # ext4 takes O_DIRECT: the direct path ran
    finally:
        os.close(fd)
    # a file system that refuses O_DIRECT: the same bytes through the page cache
    monkeypatch.setattr(local.fcntl, "fcntl", lambda *a: (_ for _ in ()).throw(OSError(errno.EINVAL, "no")))
    data, _ = s.get_range("obj", 3, 2 << 20)
    assert data == body[3:3 + (2 << 20)]


def test_upload_size_hint_reserves_the_body_in_one_piece(tmp_path, monkeypatch):
    import ctypes

    import dssefs.store.local as local
    s = LocalStore(tmp_path / "s", min_part_size=4)
    up = s.begin_upload("big", {}, size_hint=64 << 20)
    assert os.fstat(up._fd).st_blocks * 512 >= 64 << 20  # allocated up front
    up.abort()
    # a full file system refuses the reservation: the upload fails at once with ENOSPC

    def full(fd, mode, offset, length):
        ctypes.set_errno(errno.ENOSPC)
        return -1
    monkeypatch.setattr(local, "_fallocate", full)
    with pytest.raises(StoreError) as e:
        s.begin_upload("big", {}, size_hint=64 << 20)
    assert e.value.errno == errno.ENOSPC and "free space" in str(e.value)
    assert os.listdir(tmp_path / "s" / "uploads") == []
    # a file system that cannot reserve space (EOPNOTSUPP): the upload goes on without it

    def unsupported(fd, mode, offset, length):
        ctypes.set_errno(errno.EOPNOTSUPP)
        return -1
    monkeypatch.setattr(local, "_fallocate", unsupported)
    _roundtrip_big(s, "big", _big_parts(5))


def test_multipart_out_of_layout_parts_are_copied(tmp_path):
    """The short last part arriving first, or a re-sent part of another size: still exact."""
    s = LocalStore(tmp_path / "s", min_part_size=4)
    up = s.begin_upload("a", {})
    up.put_part(3, b"xy")
    up.put_part(1, b"1" * 8)
    up.put_part(2, b"2" * 8)
    up.complete()
    assert s.get_range("a", 0, 100) == (b"1" * 8 + b"2" * 8 + b"xy", 18)
    up = s.begin_upload("b", {})
    up.put_part(1, b"1" * 8)
    up.put_part(2, b"2" * 8)
    up.put_part(1, b"3" * 12)  # larger than the stride: its own file
    up.put_part(2, b"45")  # now the last part, smaller: in place, then the layout is checked
    up.complete()
    assert s.get_range("b", 0, 100) == (b"3" * 12 + b"45", 14)
    up = s.begin_upload("c", {})
    up.put_part(1, b"1" * 8)
    up.put_part(2, b"2" * 8)
    up.put_part(2, b"9" * 5)  # re-sent smaller last part in place: the body is cut to size
    up.complete()
    assert s.get_range("c", 0, 100) == (b"1" * 8 + b"9" * 5, 13)


def test_multipart_in_place_conditions_and_sweep(store):
    up = store.begin_upload("mp", {}, if_none_match=True)
    up.put_part(1, b"x" * MIN_PART_SIZE)
    up.put_part(2, b"y")
    store.put("mp", b"other", {})
    with pytest.raises(PreconditionFailed):
        up.complete()
    assert store.get_range("mp", 0, 10)[0] == b"other"
    up = store.begin_upload("mp2", {})
    up.put_part(1, b"x" * MIN_PART_SIZE)
    store.sweep(older_than=-1)
    with pytest.raises(StoreError):
        up.complete()
    with pytest.raises(ObjectNotFound):
        store.head("mp2")


def test_abandoned_uploads_are_swept(store, tmp_path):
    up = store.begin_upload("m", {})
    up.put_part(1, b"x")
    assert store.sweep(older_than=3600) == 0
    assert store.sweep(older_than=0) == 1
    with pytest.raises(StoreError):
        up.complete()


def test_min_part_size_can_be_lowered(tmp_path):
    s = LocalStore(tmp_path / "s", min_part_size=1)
    with s.begin_upload("m", {}) as up:
        up.put_part(1, b"ab")
        up.put_part(2, b"c")
        up.complete()
    assert s.get_range("m", 0, 10) == (b"abc", 3)


def test_upload_context_manager_aborts(store, tmp_path):
    with pytest.raises(RuntimeError):
        with store.begin_upload("m", {}) as up:
            up.put_part(1, b"x")
            raise RuntimeError("writer failed")
    assert os.listdir(tmp_path / "store" / "uploads") == []


# ----------------------------------------------------------------------------------------------
# OS errors


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permissions")
def test_permission_denied(store, tmp_path):
    store.put("d/x", b"", {})
    objdir = tmp_path / "store" / "objects" / "d.d"
    objdir.chmod(0o500)
    try:
        with pytest.raises(StoreAccessDenied) as ei:
            store.put("d/y", b"", {})
        assert "permission denied" in str(ei.value)
    finally:
        objdir.chmod(0o700)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user")
def test_permission_denied_for_another_user():
    """A store readable but not writable by the user: reads work, writes are EACCES."""
    import shutil
    import tempfile

    base = tempfile.mkdtemp(prefix="dssefs-perm-", dir="/tmp")
    try:
        os.chmod(base, 0o755)
        s = LocalStore(os.path.join(base, "s"))
        s.put("d/x", b"readable", {})
        for dirpath, dirnames, filenames in os.walk(base):
            for d in dirnames:
                os.chmod(os.path.join(dirpath, d), 0o755)
            for f in filenames:
                os.chmod(os.path.join(dirpath, f), 0o644)
        script = textwrap.dedent(f"""
            import os, sys
            from dssefs.errors import StoreAccessDenied
            from dssefs.store import LocalStore
            os.setgid(65534); os.setuid(65534)  # after imports: the interpreter may be private
            s = LocalStore({os.path.join(base, 's')!r}, create=False)
            assert s.get_range("d/x", 0, 100) == (b"readable", 8)
            try:
                s.put("d/y", b"", {{}})
            except StoreAccessDenied as e:
                print("DENIED", e)
            try:
                s.check()
            except StoreAccessDenied as e:
                print("CHECK", e)
        """)
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0].startswith("DENIED file://") and "permission denied" in lines[0]
        assert lines[1].startswith("CHECK ")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_os_error_translation(store):
    full = store._os_error(OSError(errno.ENOSPC, "No space left on device"), "put", "k")
    assert isinstance(full, StoreFull) and full.errno == errno.ENOSPC
    assert "free space" in str(full)
    quota = store._os_error(OSError(errno.EDQUOT, "Disk quota exceeded"), "put", "k")
    assert isinstance(quota, StoreFull)
    denied = store._os_error(OSError(errno.EACCES, "Permission denied"), "put", "k")
    assert isinstance(denied, StoreAccessDenied) and denied.errno == errno.EACCES
    rofs = store._os_error(OSError(errno.EROFS, "Read-only file system"), "put", "k")
    assert isinstance(rofs, StoreAccessDenied) and rofs.errno == errno.EROFS
    other = store._os_error(OSError(errno.EIO, "Input/output error"), "get", "k")
    assert type(other) is StoreError and other.errno == errno.EIO


def test_write_to_full_device_maps_to_store_full(tmp_path):
    """A real ENOSPC: the store's objects live on a file system too small for the body."""
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount tmpfs here")
    try:
        s = LocalStore(mnt / "s")
        with pytest.raises(StoreFull):
            s.put("big", b"x" * (4 * 1024 * 1024), {})
        assert [n for n in os.listdir(mnt / "s" / "objects")] == []  # temp file removed
        s.put("small", b"ok", {})
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_object_not_found_message(store, tmp_path):
    with pytest.raises(ObjectNotFound) as ei:
        store.head("x/y")
    assert str(ei.value) == f"file://{tmp_path}/store/x/y: no such object"
