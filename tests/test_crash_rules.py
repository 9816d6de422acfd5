"""Crash rules through a real mount: a file's object changes only when a descriptor that changed
it is closed (or fsync'ed), so a daemon killed in the middle of a rewrite leaves the old version.
"""

from __future__ import annotations

import os
import subprocess
import time

from fuse_fixtures import Mount

OLD = os.urandom(5 << 20)


def _store_old(m: Mount, name: str = "f") -> None:
    (m / name).write_bytes(OLD)


def test_o_trunc_then_dup_close_keeps_old_version(local_mount: Mount):
    """dd reopens its output (open O_TRUNC, dup2, close): that close must not store an empty file;
    nor may a reader's close store the half-written one."""
    m = local_mount
    _store_old(m)
    fd = os.open(m / "f", os.O_WRONLY | os.O_TRUNC)
    fd2 = os.dup(fd)
    os.close(fd)  # FLUSH of a handle that only truncated
    os.write(fd2, b"n" * (2 << 20))
    assert (m / "f").stat().st_size == 2 << 20
    rd = os.open(m / "f", os.O_RDONLY)
    assert os.read(rd, 3) == b"nnn"
    os.close(rd)  # FLUSH of a reader
    m.kill()
    m.start()
    assert (m / "f").read_bytes() == OLD


def test_dd_over_a_file_killed_midway_keeps_old_version(local_mount: Mount):
    m = local_mount
    _store_old(m)
    src = m.mountpoint.parent / "new-src"
    src.write_bytes(b"\x01" * (3 << 20))
    subprocess.run(["dd", f"if={src}", f"of={m / 'f'}", "bs=64K", "status=none"], check=True, timeout=60)
    assert (m / "f").read_bytes() == b"\x01" * (3 << 20)  # dd's last close stored it
    # now a dd that is still writing (fed through a FIFO) when the daemon dies
    fifo = m.mountpoint.parent / "fifo"
    os.mkfifo(fifo)
    dd = subprocess.Popen(["dd", f"if={fifo}", f"of={m / 'f'}", "bs=64K", "iflag=fullblock", "status=none"])
    with open(fifo, "wb") as feed:
        feed.write(b"\x02" * (1 << 20))
        feed.flush()
        for _ in range(200):  # until dd has written what it was fed
            if (m / "f").stat().st_size == 1 << 20:
                break
            time.sleep(0.02)
        assert (m / "f").stat().st_size == 1 << 20
        m.kill()  # the daemon dies while dd is still writing
        dd.kill()
    dd.wait(10)
    m.start()
    assert (m / "f").read_bytes() == b"\x01" * (3 << 20)


def test_ftruncate_close_stores(local_mount: Mount):
    """truncate(1): open without O_TRUNC, ftruncate, close; the close stores the new size."""
    m = local_mount
    _store_old(m)
    subprocess.run(["truncate", "-s", "1000", str(m / "f")], check=True)
    m.kill()
    m.start()
    assert (m / "f").read_bytes() == OLD[:1000]


def test_written_file_close_and_fsync_store(local_mount: Mount):
    m = local_mount
    _store_old(m)
    fd = os.open(m / "f", os.O_RDWR)
    os.write(fd, b"abc")
    os.fsync(fd)
    m.kill()  # killed before the close: fsync alone stored it
    try:
        os.close(fd)
    except OSError:
        pass  # ENOTCONN from the dead mount
    m.start()
    assert (m / "f").read_bytes() == b"abc" + OLD[3:]


def test_shell_truncation_is_stored_at_last_close(local_mount: Mount):
    m = local_mount
    _store_old(m)
    subprocess.run(["sh", "-c", f": > '{m / 'f'}'"], check=True)
    assert (m / "f").stat().st_size == 0
    assert m.remount()
    assert (m / "f").read_bytes() == b""
