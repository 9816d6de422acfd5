"""Metadata at latency, through a real mount on moto behind tests/faultproxy.py: the probes of a
listing run in parallel under a bound, their answers serve the lookups and opens that follow, a
lookup never queues behind a listing's probes, and after the TTL a directory's listing
revalidates the names it shows (one request per directory, not one per name) while changes by
other clients are still seen.

The checks count requests and their order as the proxy saw them; delays only hold requests back
so that the order is forced, no assertion is about how long something took.
"""

from __future__ import annotations

import os
import stat
import threading
import time
import urllib.parse

import pytest

from faultproxy import DELAY, ERROR, fault_proxy  # noqa: F401 (fault_proxy is a fixture)
from fuse_fixtures import requires_fuse

pytestmark = [pytest.mark.s3, pytest.mark.fuse, requires_fuse]

PROBE_BOUND = 32  # FsConfig.probe_workers: probes and listings in flight at once (lookups: 8 more)
OLD_BOUND = 16  # what the I/O limiter allowed before (2 x workers): "dozens" must go beyond it
TTL = 1.0  # attr_timeout / entry_timeout (the defaults)
SETTLE = 2.2  # a version must be this old when probed before a listing may confirm it (2 s + margin)


def _mount(fault_proxy, mount_factory, s3_source, tmp_path, *extra):
    source, args = s3_source
    return mount_factory(tmp_path / "mnt", source, *args, "--endpoint-url", fault_proxy.endpoint, *extra)


def _object_requests(proxy, since: int, bucket: str, prefix: str, *, action: str | None = None):
    """GET/HEAD requests of objects under ``prefix`` (probes and reads; not listings) logged
    since index ``since``."""
    out = []
    for r in proxy.log[since:]:
        path, _, query = r.target.partition("?")
        if (r.method in ("GET", "HEAD") and path.startswith(f"/{bucket}/{prefix}") and "list-type" not in query
                and (action is None or r.action == action)):
            out.append(r)
    return out


def _listings(proxy, since: int):
    return [r for r in proxy.log[since:] if r.method == "GET" and "list-type=2" in r.target]


def _not_plain(path) -> None:
    """Make a directory made by mkdir not plain (a symbolic link entered it once; see
    test_plain_dirs.py): a listing of it must probe its small objects for their type."""
    os.symlink("x", path / ".link")
    os.unlink(path / ".link")


def _populate(m, directory: str, n: int, size=lambda i: 1000 + 97 * i) -> dict[str, bytes]:
    (m / directory).mkdir()
    _not_plain(m / directory)
    files = {}
    for i in range(n):
        data = os.urandom(size(i))
        (m / directory / f"f{i:03d}").write_bytes(data)
        files[f"f{i:03d}"] = data
    return files


def _wait_for(cond, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_listing_then_stat_and_read_costs_one_request_per_file(fault_proxy, mount_factory, s3_source,
                                                               tmp_path, bucket):
    """ls -l, then (after the TTL) reading every file: the probes of the listing (small files are
    read whole with them) are the only GET/HEAD of the files; after the TTL the directory's
    listing revalidates them.  Before, every open after the TTL probed its file again.  Changes
    by another client (new content, an attribute-only change: same ETag on S3) are still seen
    after the TTL."""
    m = _mount(fault_proxy, mount_factory, s3_source, tmp_path).start()
    n = 24
    files = _populate(m, "d", n)
    m.remount()
    time.sleep(SETTLE)  # the versions are older than a listing's time resolution when probed

    mark = len(fault_proxy.log)
    names = sorted(os.listdir(m / "d"))
    assert names == sorted(files)
    sizes = {name: os.lstat(m / "d" / name).st_size for name in names}
    assert sizes == {name: len(data) for name, data in files.items()}
    listed = _object_requests(fault_proxy, mark, bucket, "d/")
    assert n <= len(listed) <= n + 2, [r.target for r in listed]

    time.sleep(TTL + 0.3)  # everything the kernel and the daemon know is past its TTL now
    mark2 = len(fault_proxy.log)
    for name, data in files.items():
        assert (m / "d" / name).read_bytes() == data
    again = _object_requests(fault_proxy, mark2, bucket, "d/")
    # at most the directory marker's probes: no second round of GETs per file
    assert len(again) <= 4, [r.target for r in again]
    assert 1 <= len(_listings(fault_proxy, mark2)) <= 4

    # another client changes one file's content and another's mode (a metadata-only self-copy)
    other = mount_factory(tmp_path / "other", m.source, *m.args).start()
    (other / "d" / "f000").write_bytes(b"changed elsewhere")
    os.chmod(other / "d" / "f001", 0o600)
    assert other.stop() == 0, other.log()  # stores the deferred attribute change
    time.sleep(TTL + 0.3)
    assert (m / "d" / "f000").read_bytes() == b"changed elsewhere"
    assert stat.S_IMODE(os.stat(m / "d" / "f001").st_mode) == 0o600
    assert (m / "d" / "f001").read_bytes() == files["f001"]


def _root_listings(proxy, since: int, bucket: str):
    """Listings of the bucket's root level (not of .dssefs/ records) logged since ``since``."""
    out = []
    for r in _listings(proxy, since):
        path, _, query = r.target.partition("?")
        q = urllib.parse.parse_qs(query, keep_blank_values=True)
        if path == f"/{bucket}" and q.get("prefix") == [""] and q.get("delimiter") == ["/"]:
            out.append(r)
    return out


def test_the_starts_listing_answers_the_roots_first_lookups(fault_proxy, mount_factory, s3_source, tmp_path,
                                                             moto_server, bucket):
    """The listing a mount makes while it starts (its reachability check) answers the first
    lookups of the root's names: stat and reading a file right after the mount make no listing
    of their own.  Before, the first lookup listed the root again.  A name that listing did not
    show, and readdir, still list the root: another client's object stored after the start is
    seen at once.  The TTLs are long here so that a slow start cannot age the listing out."""
    m = _mount(fault_proxy, mount_factory, s3_source, tmp_path, "--entry-timeout", "30",
               "--attr-timeout", "30").start()
    data = os.urandom(300_000)
    (m / "big").write_bytes(data)
    (m / "d").mkdir()
    (m / "d" / "inner").write_bytes(b"i")
    assert m.stop() == 0, m.log()
    mark = len(fault_proxy.log)
    m.start()
    started = len(fault_proxy.log)
    assert len(_root_listings(fault_proxy, mark, bucket)) == 1  # the start's own
    assert os.stat(m / "big").st_size == len(data)
    assert (m / "big").read_bytes() == data
    assert (m / "d" / "inner").read_bytes() == b"i"
    assert _root_listings(fault_proxy, started, bucket) == []
    assert _object_requests(fault_proxy, started, bucket, "big")  # the file itself was asked for

    moto_server.client("s3").put_object(Bucket=bucket, Key="theirs", Body=b"stored by another client")
    assert "theirs" in os.listdir(m.mountpoint)  # readdir lists the root afresh
    assert len(_root_listings(fault_proxy, started, bucket)) >= 1


def test_a_name_stored_elsewhere_after_the_start_is_found_by_its_lookup(fault_proxy, mount_factory, s3_source,
                                                                        tmp_path, moto_server, bucket):
    """A lookup of a name the start's listing did not show lists the root afresh."""
    m = _mount(fault_proxy, mount_factory, s3_source, tmp_path, "--entry-timeout", "30",
               "--attr-timeout", "30").start()
    moto_server.client("s3").put_object(Bucket=bucket, Key="late", Body=b"stored by another client")
    with pytest.raises(PermissionError):  # found: a foreign object (foreign_objects=deny)
        (m / "late").read_bytes()


def test_lookup_is_not_queued_behind_a_listings_probes(fault_proxy, mount_factory, s3_source, tmp_path,
                                                       bucket):
    """While a listing's probes are held back (every file's probe but one name's), a lookup of
    that one name is answered: none of the held requests has been answered when it returns.
    Before, a lookup waited for a worker thread the listing's probes all held."""
    m = _mount(fault_proxy, mount_factory, s3_source, tmp_path).start()
    n = 40
    _populate(m, "d", n)
    (m / "d" / "target").write_bytes(b"t" * 1234)
    m.remount()
    held = fault_proxy.add(DELAY, method="GET", path=rf"^/{bucket}/d/f\d+", delay=4.0)
    listing = threading.Thread(target=lambda: os.listdir(m / "d"), daemon=True)
    listing.start()
    _wait_for(lambda: held.seen >= OLD_BOUND, f"{OLD_BOUND} probes of the listing to be held")
    st = os.stat(m / "d" / "target")
    answered = [r for r in fault_proxy.log if r.action == DELAY]
    assert st.st_size == 1234
    assert answered == [], "the lookup waited for the listing's probes"
    listing.join(60)
    assert not listing.is_alive()


def test_probes_in_flight_are_bounded(fault_proxy, mount_factory, s3_source, tmp_path, bucket):
    """A listing of 100 files probes dozens of names at once (more than the old 16), never more
    than the bound: every probe is held 0.6 s, so the probes sent within any 0.3 s were all in
    flight together."""
    m = _mount(fault_proxy, mount_factory, s3_source, tmp_path).start()
    n = 100
    files = _populate(m, "d", n, size=lambda i: 500 + i)
    m.remount()
    fault_proxy.add(DELAY, method="GET", path=rf"^/{bucket}/d/f\d+", delay=0.6)
    mark = len(fault_proxy.log)
    assert sorted(os.listdir(m / "d")) == sorted(files)
    # names not answered in time are listed with their type unknown while their probes go on
    _wait_for(lambda: len(_object_requests(fault_proxy, mark, bucket, "d/f", action=DELAY)) >= n,
              "every name to be probed")
    probes = sorted(r.at for r in _object_requests(fault_proxy, mark, bucket, "d/f", action=DELAY))
    assert len(probes) >= n
    window = 0.3
    most = max(sum(1 for t in probes[i:] if t < start + window) for i, start in enumerate(probes))
    assert most <= PROBE_BOUND, f"{most} probes in flight at once"
    assert most > OLD_BOUND + 4, f"only {most} probes in flight at once"


def test_failing_probe_in_a_walk_lists_the_name_as_broken(fault_proxy, mount_factory, s3_source, tmp_path,
                                                          bucket):
    """A name whose probe fails beyond the retries, met by a tree walk (read ahead), is still
    listed, with default attributes; opening it fails with EIO and the log names it."""
    m = _mount(fault_proxy, mount_factory, s3_source, tmp_path, "--max-attempts", "2").start()
    for d in ("top/a", "top/b", "top/b/c"):
        (m / d).mkdir(parents=True)
        _not_plain(m / d)
        for i in range(5):
            (m / d / f"f{i}").write_bytes(os.urandom(2000))
    m.remount()
    fault_proxy.add(ERROR, method="GET", path=rf"^/{bucket}/top/b/c/f3$", status=500, code="InternalError")
    found = []
    for dirpath, dirnames, filenames in os.walk(m / "top"):
        for name in filenames:
            found.append(os.path.relpath(os.path.join(dirpath, name), m / "top"))
    assert "b/c/f3" in found and len(found) == 15
    try:
        st = os.lstat(m / "top" / "b" / "c" / "f3")
        assert stat.S_ISREG(st.st_mode) and st.st_size == 0
    except OSError as e:  # the listing's answer expired: a lookup probes again and fails
        assert e.errno == 5
    with pytest.raises(OSError) as e:
        (m / "top" / "b" / "c" / "f3").read_bytes()
    assert e.value.errno == 5  # EIO
    assert (m / "top" / "b" / "c" / "f2").stat().st_size == 2000
    assert "event=probe_failed" in m.log() and "top/b/c/f3" in m.log()


def test_listing_order_is_kept_when_probes_answer_out_of_order(fault_proxy, mount_factory, s3_source,
                                                               tmp_path, bucket):
    """The first name's probe answers last: a readdir returns the names in the listing's order
    anyway (those answered before the first one still probed), so a tree walk (fts visits
    subdirectories in the order it reads them) follows the order they were read ahead in."""
    m = _mount(fault_proxy, mount_factory, s3_source, tmp_path).start()
    files = _populate(m, "d", 12)
    for sub in ("s0", "s1", "s2"):
        (m / "d" / sub).mkdir()
    m.remount()
    held = fault_proxy.add(DELAY, path=rf"^/{bucket}/d/f000$", delay=0.06)
    names = os.listdir(m / "d")
    assert held.seen >= 1
    assert names == sorted(list(files) + ["s0", "s1", "s2"])
