"""An S3 outage while files are written (tests/faultproxy.py in front of moto resets every S3
connection until the outage ends; KMS keeps answering).

The contract (docs/semantics.md, Durability): an upload that fails because the store is
unreachable returns ``EIO`` from ``fsync``/``close``, the log names the object and the reason, the
dirty data stays in the daemon's memory (readable through the mount meanwhile), and the file's next
``fsync``/``close`` stores it, or the unmount does.  How long the outage lasts matters only through
the retries: once it outlasts a request's attempts, the request fails the same way after 2 s or
after 30 s.  ``--max-attempts 2`` keeps each failing request short, so the test does not wait
out botocore's five attempts (with backoff) for every call.
"""

from __future__ import annotations

import errno
import os
import re
import time

import pytest

from faultproxy import RESET, fault_proxy  # noqa: F401 (fault_proxy is a fixture)
from fuse_fixtures import requires_fuse

pytestmark = [pytest.mark.fuse, pytest.mark.s3, requires_fuse]

MiB = 1024 * 1024
S3_ONLY = {"x-amz-target": None}  # KMS requests carry X-Amz-Target: they still get through


def _close_fails_with_eio(fd: int) -> None:
    with pytest.raises(OSError) as e:
        os.close(fd)  # the descriptor is closed all the same
    assert e.value.errno == errno.EIO, e.value


def test_s3_outage_during_writes_keeps_the_data_and_stores_it_later(fault_proxy, mount_factory, s3_source,
                                                                      moto_server, bucket, tmp_path):
    source, args = s3_source
    m = mount_factory(tmp_path / "mnt", source, *args, "--endpoint-url", fault_proxy.endpoint,
                      "--max-attempts", "2")
    m.start()
    (m / "old.txt").write_bytes(b"stored before the outage")
    new = os.urandom(3 * MiB)  # a file created just before the outage
    changed = os.urandom(100_000)  # a stored file rewritten during it
    fd_new = os.open(m / "new.bin", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o640)
    fd_old = os.open(m / "old.txt", os.O_WRONLY | os.O_TRUNC)

    t0 = time.monotonic()
    outage = fault_proxy.add(RESET, headers=S3_ONLY)  # S3 is unreachable from here on
    os.write(fd_new, new)
    os.write(fd_old, changed)
    _close_fails_with_eio(fd_new)
    _close_fails_with_eio(fd_old)
    fd = os.open(m / "new.bin", os.O_RDONLY)  # any descriptor's fsync tries again: still down
    with pytest.raises(OSError) as e:
        os.fsync(fd)
    assert e.value.errno == errno.EIO
    assert os.read(fd, len(new) + 1) == new  # the data is kept, and the mount serves it
    os.close(fd)  # a reader's close stores nothing (docs/semantics.md, Which close stores)
    fd = os.open(m / "old.txt", os.O_RDONLY)
    assert os.read(fd, len(changed) + 1) == changed
    os.close(fd)
    report = m.status()
    assert report["dirty"]["files"] == 2 and report["dirty"]["bytes"] >= len(new) + len(changed), report
    assert report["store"]["failures"] >= 3, report
    outage_s = time.monotonic() - t0
    assert outage.hits >= 6, fault_proxy.log  # every upload was attempted, and retried

    # the log names the object, the errno and the problem, once per failed call
    endpoint = re.escape(fault_proxy.endpoint)
    for op, name in (("flush", "new.bin"), ("flush", "old.txt"), ("fsync", "new.bin")):
        pattern = rf"op={op} object=s3://{bucket}/{re.escape(name)} errno=EIO reason=cannot reach S3 endpoint {endpoint}"
        assert re.search(pattern, m.log()), (pattern, m.log())
    s3 = moto_server.client("s3")
    assert s3.list_objects_v2(Bucket=bucket, Prefix="new.bin").get("KeyCount") == 0  # nothing stored yet

    fault_proxy.clear()  # S3 is back
    fd = os.open(m / "new.bin", os.O_RDONLY)
    os.fsync(fd)  # stores new.bin
    os.close(fd)
    assert s3.head_object(Bucket=bucket, Key="new.bin")["ContentLength"] > len(new)  # stored, encrypted
    assert m.status()["dirty"]["files"] == 1  # old.txt is left for the unmount
    assert m.stop() == 0, m.log()  # stores old.txt: nothing lost
    assert "dirty_files_lost" not in m.log()

    m.start()  # what was stored reads back
    assert (m / "new.bin").read_bytes() == new
    assert (m / "old.txt").read_bytes() == changed
    assert sorted(os.listdir(m.mountpoint)) == ["new.bin", "old.txt"]
    assert outage_s < 25, f"the failing uploads took {outage_s:.1f} s"
