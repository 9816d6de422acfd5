"""Directories a mount created, in the default mode (dssefs/fs/stale.py, docs/semantics.md
"Directories this mount created"): for the TTL plus 60 TTLs after mkdir, what the mount knows of
them answers lookups without a request, so a tree extraction that comes back to its directories
after the TTL costs one request per new file; another client's new name in such a directory is
seen once that window is over.

Real mounts on moto; requests are counted by tests/faultproxy.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from faultproxy import fault_proxy  # noqa: F401 (fault_proxy is a fixture)
from fuse_fixtures import requires_fuse

pytestmark = [pytest.mark.s3, pytest.mark.fuse, requires_fuse]

TTL = 0.1  # --entry-timeout / --attr-timeout: the own window is 60 TTLs (6 s)


def _fsync_dir(path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)  # stores the directory's marker now (deferred after mkdir otherwise)
    finally:
        os.close(fd)


def test_files_written_into_directories_made_here_cost_one_request_each(
        fault_proxy, mount_factory, s3_source, tmp_path, bucket, moto_server):
    source, args = s3_source
    m = mount_factory(tmp_path / "mnt", source, *args, "--endpoint-url", fault_proxy.endpoint,
                      "--entry-timeout", str(TTL), "--attr-timeout", str(TTL)).start()
    dirs = ["top", "top/a", "top/a/deep", "top/b"]
    for d in dirs:
        (m / d).mkdir()
        _fsync_dir(m / d)
    (m / "top" / "first").write_bytes(b"1")  # the mount's keys exist from here on
    time.sleep(TTL * 2)  # every answer about these directories is past its TTL
    mark = len(fault_proxy.log)
    for d in dirs:
        for i in range(3):
            (m / d / f"f{i}").write_bytes(os.urandom(50 + i))
    # one PUT per file: no HEAD of a directory, no listing to answer the lookups of the new names
    sent = [(r.method, r.target) for r in fault_proxy.log[mark:]]
    assert sorted(sent) == sorted(("PUT", f"/{bucket}/{d}/f{i}") for d in dirs for i in range(3)), sent
    for d in dirs:
        assert {"f0", "f1", "f2"} <= set(os.listdir(m / d))

    # another client's new name in such a directory: seen once the window is over
    s3 = moto_server.client("s3")
    s3.put_object(Bucket=bucket, Key="top/b/theirs", Body=b"x")
    assert not os.path.exists(m / "top" / "b" / "theirs")
    r = subprocess.run([sys.executable, "-m", "dssefs", "status", str(m.mountpoint), "--json"],
                       capture_output=True, text=True, timeout=60)
    st = json.loads(r.stdout)["stale_answers"]
    assert st["window_s"] == 0 and st["own_window_s"] == pytest.approx(60 * TTL) and st["own"] >= len(dirs)
    assert st["served"] == st["own"] and st["refreshed"] == 0
    deadline = time.monotonic() + 60 * TTL + 5
    while not os.path.exists(m / "top" / "b" / "theirs"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert m.stop() == 0
