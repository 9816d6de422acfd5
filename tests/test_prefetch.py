"""Read-ahead of a mount over S3 (moto behind the fault proxy): what a sequential reader, a random
reader and a reader with a small cache make the mount request, seen in the ranged GETs that reach
the proxy.  Behaviour, not speed: request sizes, requests in flight at once, bytes fetched."""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time

import pytest

from dssefs.envelope import format as fmt
from faultproxy import DELAY, fault_proxy  # noqa: F401 (fault_proxy is a fixture)
from fuse_fixtures import Mount, requires_fuse

pytestmark = [pytest.mark.fuse, pytest.mark.s3, requires_fuse]

MiB = 1 << 20
CHUNK_BODY = MiB + fmt.CHUNK_OVERHEAD  # one stored 1 MiB chunk (the default chunk size)


class RangedGets:
    """Records the ranged GETs of one object's body that pass the proxy: (time sent, first byte,
    length).  Used as a DELAY fault's predicate, so each of them also waits ``delay`` seconds."""

    def __init__(self, proxy, name: str, delay: float):
        self.log: list[tuple[float, int, int]] = []
        self._lock = threading.Lock()
        proxy.add(DELAY, method="GET", path=rf"/{re.escape(name)}(\?|$)", headers={"range": r"^bytes="},
                  where=self._record, delay=delay)
        self.delay = delay

    def _record(self, req) -> bool:
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", req.headers["range"].strip())
        if m:
            with self._lock:
                self.log.append((time.monotonic(), int(m.group(1)), int(m.group(2)) - int(m.group(1)) + 1))
        return True

    def chunks(self) -> list[tuple[float, int, int]]:
        """The GETs of whole chunks (not the probe's or the chunk map's few KiB), in the order
        they were sent: (time, first byte, chunks)."""
        with self._lock:
            return [(t, start, round(n / CHUNK_BODY)) for t, start, n in sorted(self.log) if n >= MiB]

    def most_at_once(self) -> int:
        """A lower bound of the GETs in flight at one moment: each takes at least ``delay``, so
        all those sent within ``delay`` of the first of them overlap just before it ends."""
        times = [t for t, _s, _n in self.chunks()]
        return max((sum(1 for u in times if t <= u < t + self.delay) for t in times), default=0)


def _mount(mount_factory, s3_source, tmp_path, proxy, *extra: str) -> Mount:
    source, args = s3_source
    m = mount_factory(tmp_path / "mnt", source, *args, "--endpoint-url", proxy.endpoint, *extra)
    m.start()
    return m


def _read_all(path, block: int = MiB) -> bytes:
    out = bytearray()
    with open(path, "rb", buffering=0) as f:
        while data := f.read(block):
            out += data
    return bytes(out)


def test_sequential_read_grows_its_requests_and_keeps_several_in_flight(fault_proxy, mount_factory,
                                                                        s3_source, tmp_path):
    m = _mount(mount_factory, s3_source, tmp_path, fault_proxy)
    data = os.urandom(96 * MiB)
    (m / "f.bin").write_bytes(data)
    m.remount()
    assert (m / "f.bin").stat().st_size == len(data)  # looked up (its probe) before counting
    gets = RangedGets(fault_proxy, "f.bin", delay=0.2)
    assert hashlib.sha256(_read_all(m / "f.bin")).digest() == hashlib.sha256(data).digest()
    sizes = [n for _t, _s, n in gets.chunks()]
    by_offset = [n for _t, _s, n in sorted(gets.chunks(), key=lambda g: g[1])]
    assert sum(sizes) == 96, sizes  # every chunk fetched once
    assert min(sizes) <= 4 and max(sizes) >= 8, sizes  # small first, large once the stream is seen
    assert by_offset[:-1] == sorted(by_offset[:-1]), by_offset  # growing along the file (but its end)
    assert gets.most_at_once() >= 4, gets.chunks()


def test_random_reads_fetch_what_they_read(fault_proxy, mount_factory, s3_source, tmp_path):
    m = _mount(mount_factory, s3_source, tmp_path, fault_proxy)
    data = os.urandom(48 * MiB)
    (m / "f.bin").write_bytes(data)
    m.remount()
    assert (m / "f.bin").stat().st_size == len(data)
    gets = RangedGets(fault_proxy, "f.bin", delay=0.05)
    offsets = [0] + [i * MiB + 5 * 4096 for i in (37, 11, 29, 3, 43, 19)]
    fd = os.open(m / "f.bin", os.O_RDONLY)
    try:
        for off in offsets:
            assert os.pread(fd, 4096, off) == data[off:off + 4096]
        time.sleep(1.0)  # any read-ahead these started has been sent by now
        random_gets = gets.chunks()
        # a read at the start of the file may begin a sequential stream: its first window only;
        # the others are random and fetch (about) the chunk they read, nothing ahead
        assert sum(n for _t, _s, n in random_gets) <= 1 + 4 + 2 * (len(offsets) - 1), random_gets
        assert max(n for _t, _s, n in random_gets) <= 4, random_gets
        # reading on from a random position starts a new stream with a small first request
        pos = 19 * MiB + 6 * 4096
        for _ in range(3):
            assert os.pread(fd, MiB, pos) == data[pos:pos + MiB]
            pos += MiB
        later = gets.chunks()[len(random_gets):]
        assert later and later[0][2] <= 4, later
    finally:
        os.close(fd)


def test_no_read_ahead_that_the_cache_cannot_hold(fault_proxy, mount_factory, s3_source, tmp_path):
    """A cache of one chunk: chunks read ahead would push each other (or the one being read) out
    before they are read and be fetched again; the read-ahead stays within a quarter of the
    cache, here nothing."""
    from dssefs.daemon.control import query

    m = _mount(mount_factory, s3_source, tmp_path, fault_proxy, "--cache-size", "1M")
    data = os.urandom(16 * MiB)
    (m / "f.bin").write_bytes(data)
    m.remount()
    assert (m / "f.bin").stat().st_size == len(data)
    gets = RangedGets(fault_proxy, "f.bin", delay=0.05)
    used: list[tuple[int, int]] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            c = query(str(m.mountpoint))["cache"]
            used.append((c["used"], c["budget"]))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        got = _read_all(m / "f.bin")
    finally:
        done.set()
        watcher.join()
    assert got == data
    assert used and all(u <= b for u, b in used), max(used)
    # nothing read ahead was dropped again before it was read: every chunk was fetched once
    starts = sorted(s for _t, s, _n in gets.chunks())
    assert len(starts) == len(set(starts)) and sum(n for _t, _s, n in gets.chunks()) == 16, gets.chunks()


def test_sparse_file_read_ahead_skips_holes_and_reads_right(fault_proxy, mount_factory, s3_source, tmp_path):
    m = _mount(mount_factory, s3_source, tmp_path, fault_proxy)
    expected = bytearray(64 * MiB)
    with open(m / "f.bin", "wb") as f:
        f.truncate(64 * MiB)
        for i in range(0, 64, 8):  # one stored chunk every 8 MiB, holes between
            piece = os.urandom(MiB)
            f.seek(i * MiB)
            f.write(piece)
            expected[i * MiB:(i + 1) * MiB] = piece
    m.remount()
    assert (m / "f.bin").stat().st_size == 64 * MiB
    gets = RangedGets(fault_proxy, "f.bin", delay=0.4)
    assert _read_all(m / "f.bin") == expected
    # only the stored chunks were fetched, each once (holes cost no request): the 8 written and
    # the last one (always stored, docs/format.md 17.10) ...
    assert sum(n for _t, _s, n in gets.chunks()) == 9, gets.chunks()
    # ... and the read-ahead crossed the holes to have the stored chunks ahead fetched together
    assert gets.most_at_once() >= 4, gets.chunks()
