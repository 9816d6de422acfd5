"""Plain directories (docs/format.md, section E): a directory made by mkdir gets a marker with a
one-byte body, which declares that no symbolic link, FIFO, socket or device is in it, so a walk
for names (find) takes its small objects for regular files without probing them.  Before such an
object enters the directory (created there or renamed into it, by any client), the marker is
stored again with an empty body, first.

Real mounts on moto; requests are counted by tests/faultproxy.py.
"""

from __future__ import annotations

import os
import stat
import subprocess
import time

import pytest

from faultproxy import fault_proxy  # noqa: F401 (fault_proxy is a fixture)
from fuse_fixtures import requires_fuse

from dssefs.envelope.format import body_size
from dssefs.fs.common import PLAIN_MARKER_SIZE

pytestmark = [pytest.mark.s3, pytest.mark.fuse, requires_fuse]

TTL = 1.0  # entry_timeout / attr_timeout (the defaults)
EMPTY_MARKER_SIZE = body_size(0, 4096)  # one empty chunk: the two tags


def _mount(fault_proxy, mount_factory, s3_source, tmp_path, *extra, at="mnt"):
    source, args = s3_source
    return mount_factory(tmp_path / at, source, *args, "--endpoint-url", fault_proxy.endpoint, *extra)


def _marker_size(moto_server, bucket: str, key: str) -> int:
    return moto_server.client("s3").head_object(Bucket=bucket, Key=key)["ContentLength"]


def _sync_dir(path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)  # stores the directory's marker (deferred after mkdir)
    finally:
        os.close(fd)


def _puts(proxy, since: int, bucket: str) -> list[str]:
    return [r.target.partition("?")[0][len(f"/{bucket}/"):] for r in proxy.log[since:] if r.method == "PUT"]


def _object_requests(proxy, since: int, bucket: str, prefix: str) -> list[str]:
    """GET/HEAD requests of the objects directly under ``prefix`` (not its marker, not listings)."""
    out = []
    for r in proxy.log[since:]:
        path, _, query = r.target.partition("?")
        key = path[len(f"/{bucket}/"):]
        if (r.method in ("GET", "HEAD") and key.startswith(prefix) and key != prefix
                and "list-type" not in query):
            out.append(key)
    return out


def _find(root, *args) -> list[str]:
    out = subprocess.run(["find", ".", *args], cwd=root, capture_output=True, text=True, check=True).stdout
    return sorted(line[2:] for line in out.splitlines() if line.startswith("./"))


def test_mkdir_writes_a_plain_marker_and_a_link_or_fifo_clears_it_first(
        fault_proxy, mount_factory, s3_source, tmp_path, bucket, moto_server):
    m = _mount(fault_proxy, mount_factory, s3_source, tmp_path).start()
    for d in ("d", "e", "f", "g"):
        (m / d).mkdir()
    os.chmod(m / "d", 0o750)
    for d in ("d", "e", "f", "g"):
        _sync_dir(m / d)
        assert _marker_size(moto_server, bucket, f"{d}/") == PLAIN_MARKER_SIZE, d

    # a symbolic link: the marker is stored again, empty, before the link is
    mark = len(fault_proxy.log)
    os.symlink("somewhere", m / "d" / "l")
    assert _marker_size(moto_server, bucket, "d/") == EMPTY_MARKER_SIZE
    puts = _puts(fault_proxy, mark, bucket)
    assert "d/" in puts and "d/l" in puts and puts.index("d/") < puts.index("d/l"), puts

    os.mkfifo(m / "e" / "p")  # a FIFO
    assert _marker_size(moto_server, bucket, "e/") == EMPTY_MARKER_SIZE

    os.symlink("t", m / "d" / "l2")  # renamed into a plain directory
    os.rename(m / "d" / "l2", m / "f" / "l2")
    assert _marker_size(moto_server, bucket, "f/") == EMPTY_MARKER_SIZE

    # regular files (also made by mknod) and directories keep it plain
    (m / "g" / "small").write_bytes(b"x" * 100)
    (m / "g" / "sub").mkdir()
    os.mknod(m / "g" / "empty", 0o644 | stat.S_IFREG)
    os.rename(m / "g" / "small", m / "g" / "moved")
    _sync_dir(m / "g")
    assert _marker_size(moto_server, bucket, "g/") == PLAIN_MARKER_SIZE

    # a directory never becomes plain again once it was not; attribute changes keep the body
    os.unlink(m / "d" / "l")
    os.chmod(m / "d", 0o700)
    os.chmod(m / "g", 0o711)
    assert m.stop() == 0, m.log()
    assert _marker_size(moto_server, bucket, "d/") == EMPTY_MARKER_SIZE
    assert _marker_size(moto_server, bucket, "g/") == PLAIN_MARKER_SIZE
    assert _marker_size(moto_server, bucket, "g/sub/") == PLAIN_MARKER_SIZE

    m.start()
    assert stat.S_IMODE(os.stat(m / "d").st_mode) == 0o700  # the attributes went along
    assert stat.S_IMODE(os.stat(m / "g").st_mode) == 0o711
    assert os.stat(m / "d").st_size == 0
    assert stat.S_ISFIFO(os.lstat(m / "e" / "p").st_mode)
    assert os.readlink(m / "f" / "l2") == "t"


def test_find_probes_nothing_in_a_plain_directory_and_every_small_object_elsewhere(
        fault_proxy, mount_factory, s3_source, tmp_path, bucket):
    """find of a tree after a remount: no GET or HEAD of any object of the plain directory; in
    the directory that holds a link and a FIFO every small object is probed, and every type is
    right (find -type)."""
    m = _mount(fault_proxy, mount_factory, s3_source, tmp_path).start()
    n = 20
    for d in ("top/p", "top/q"):
        (m / d).mkdir(parents=True)
        for i in range(n):
            (m / d / f"f{i:02d}").write_bytes(os.urandom(100 + 150 * i))
    os.symlink("f00", m / "top" / "q" / "link")
    os.mkfifo(m / "top" / "q" / "fifo")
    m.remount()

    mark = len(fault_proxy.log)
    names = _find(m / "top")
    files = [f"{d}/f{i:02d}" for d in ("p", "q") for i in range(n)]
    assert names == sorted(["p", "q", "q/link", "q/fifo", *files])
    assert _object_requests(fault_proxy, mark, bucket, "top/p/") == []
    assert len(set(_object_requests(fault_proxy, mark, bucket, "top/q/"))) >= n + 2

    m.remount()
    assert _find(m / "top", "-type", "f") == sorted(files)
    m.remount()
    assert _find(m / "top", "-type", "l") == ["q/link"]
    assert _find(m / "top", "-type", "p") == ["q/fifo"]
    # a lookup gives the sealed attributes of an object listed without a probe
    assert os.lstat(m / "top" / "p" / "f03").st_size == 100 + 150 * 3


def test_a_link_made_by_another_client_is_seen_in_a_plain_directory(
        fault_proxy, mount_factory, s3_source, tmp_path, bucket):
    m = _mount(fault_proxy, mount_factory, s3_source, tmp_path).start()
    (m / "d").mkdir()
    for i in range(5):
        (m / "d" / f"f{i}").write_bytes(b"a" * 50)
    _sync_dir(m / "d")
    assert _find(m / "d", "-type", "l") == []

    other = _mount(fault_proxy, mount_factory, s3_source, tmp_path, at="other").start()
    os.symlink("f1", other / "d" / "l")
    assert other.stop() == 0, other.log()

    time.sleep(TTL + 0.5)  # what m knows of d (its listing, its marker) is past the TTL
    assert _find(m / "d", "-type", "l") == ["l"]
    assert sorted(_find(m / "d", "-type", "f")) == [f"f{i}" for i in range(5)]


def test_write_back_mount_clears_the_marker_before_its_link_is_stored(
        fault_proxy, mount_factory, s3_source, tmp_path, bucket, moto_server):
    m = _mount(fault_proxy, mount_factory, s3_source, tmp_path, "--write-back").start()
    (m / "d").mkdir()
    _sync_dir(m / "d")
    assert _marker_size(moto_server, bucket, "d/") == PLAIN_MARKER_SIZE
    os.symlink("there", m / "d" / "l")
    assert m.stop() == 0, m.log()  # drains the journal
    assert _marker_size(moto_server, bucket, "d/") == EMPTY_MARKER_SIZE
    m.start()
    assert _find(m / "d", "-type", "l") == ["l"]
