"""Sparse files through a real mount: a hole costs neither memory nor upload, sizes the format
cannot store fail at once with EFBIG, and the bytes read back are right."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from fuse_fixtures import Mount

GiB = 1 << 30


def _stored_bytes(m: Mount) -> int:
    store = m.mountpoint.parent / "store"
    return sum(p.stat().st_size for p in store.rglob("*") if p.is_file())


def test_truncate_to_10_gib_stores_almost_nothing(local_mount: Mount):
    m = local_mount
    before = _stored_bytes(m)
    subprocess.run(["truncate", "-s", "10G", str(m / "big")], check=True, timeout=60)
    with open(m / "big", "r+b") as f:
        f.seek(5 * GiB)
        f.write(b"middle")
    assert _stored_bytes(m) - before < 4 << 20  # two chunks and the map, not 10 GiB
    assert m.remount()
    st = (m / "big").stat()
    assert st.st_size == 10 * GiB and st.st_blocks * 512 < 4 << 20  # du and cp see a sparse file
    with open(m / "big", "rb") as f:
        f.seek(5 * GiB - 3)
        assert f.read(12) == b"\0\0\0middle\0\0\0"
        f.seek(10 * GiB - 4)
        assert f.read(10) == b"\0\0\0\0"
        f.seek(3 * GiB)
        assert f.read(1 << 20) == bytes(1 << 20)


def test_cp_keeps_a_sparse_file_sparse(local_mount: Mount):
    m = local_mount
    with open(m / "src", "wb") as f:
        f.write(b"head")
        f.truncate(256 << 20)
    assert m.remount()
    before = _stored_bytes(m)
    subprocess.run(["cp", str(m / "src"), str(m / "copy")], check=True, timeout=300)  # --sparse=auto
    assert (m / "copy").stat().st_size == 256 << 20
    assert _stored_bytes(m) - before < 4 << 20
    assert (m / "copy").read_bytes()[:8] == b"head\0\0\0\0"


def test_sparse_file_rewrite_keeps_holes(local_mount: Mount):
    m = local_mount
    data = os.urandom(3 << 20)
    with open(m / "f", "wb") as f:
        f.write(data)
        f.seek(2 * GiB)
        f.write(b"tail")
    size1 = _stored_bytes(m)
    with open(m / "f", "r+b") as f:  # rewrite one byte of the sparse file: holes stay holes
        f.seek(1)
        f.write(b"X")
    assert _stored_bytes(m) < size1 + (6 << 20)
    assert m.remount()
    with open(m / "f", "rb") as f:
        got = f.read(3 << 20)
        assert got == data[:1] + b"X" + data[2:]
        f.seek(GiB)
        assert f.read(4096) == bytes(4096)
        f.seek(2 * GiB)
        assert f.read() == b"tail"


def test_size_beyond_the_format_fails_with_efbig(local_mount: Mount):
    m = local_mount
    (m / "f").write_bytes(b"abc")
    r = subprocess.run(["truncate", "-s", "999999999999999", str(m / "f")], capture_output=True, text=True)
    assert r.returncode != 0 and "too large" in r.stderr.lower()
    with pytest.raises(OSError) as e:
        os.truncate(m / "f", 1 << 48)
    assert e.value.errno == errno.EFBIG
    fd = os.open(m / "f", os.O_WRONLY)
    try:
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"x", (1 << 48) - 1)
        assert e.value.errno == errno.EFBIG
        os.pwrite(fd, b"y", (1 << 48) - 2)  # the last byte the format allows
    finally:
        os.close(fd)
    assert (m / "f").stat().st_size == (1 << 48) - 1
    os.truncate(m / "f", 0)  # and back: nothing hangs
    assert m.remount()
    assert (m / "f").read_bytes() == b""
