"""Epoch keys through a real mount on moto's S3 + KMS: KMS requests per mount, not per object.

Target (format version 2): creating 1,000 files, and then ``ls -lR`` plus reading every file after
a remount, take at most 4 KMS requests each, counted by the daemon's own KMS counters; every
object still has its own data keys and message id.  A writable mount generates its epoch's keys
while it starts (2 requests), so its first write waits for no KMS request; a read-only one does
not.  Every mount unwraps the newest stored epoch's keys while it starts (2 requests), so the
last writer's files open without waiting for KMS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from fuse_fixtures import Mount, requires_fuse

pytestmark = [pytest.mark.fuse, pytest.mark.s3, requires_fuse]

FILES = 1000
DIRS = 10


def kms_requests(m: Mount) -> tuple[int, dict]:
    out = subprocess.run([sys.executable, "-m", "dssefs", "status", str(m.mountpoint), "--json"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    kms = json.loads(out)["kms"]
    return sum(kms.get(k, 0) for k in ("generate", "unwrap", "rewrap", "describe")), kms


def prepared(m: Mount, counter: str = "generate") -> dict:
    """The KMS counters once the mount has made 2 requests of kind ``counter`` while it starts:
    ``generate`` for its epoch's keys, ``unwrap`` for the newest stored epoch's."""
    deadline = time.monotonic() + 30
    while True:
        _, kms = kms_requests(m)
        if kms[counter] >= 2 or time.monotonic() > deadline:
            return kms
        time.sleep(0.05)


def test_thousand_files_cost_a_few_kms_requests(s3_mount: Mount, moto_server, bucket):
    m = s3_mount
    # the epoch's keys are generated while the mount starts; its record waits for the first write
    assert prepared(m)["generate"] == 2
    s3 = moto_server.client("s3")
    assert s3.list_objects_v2(Bucket=bucket, Prefix=".dssefs/epochs/").get("KeyCount", 0) == 0
    start, _ = kms_requests(m)
    contents = {}
    for d in range(DIRS):
        (m / f"d{d}").mkdir()
        for i in range(FILES // DIRS):
            rel = f"d{d}/f{i}"
            data = f"{rel} ".encode() * (1 + i % 7)
            (m / rel).write_bytes(data)
            contents[rel] = data
    created, kms = kms_requests(m)
    assert created == start, kms  # the first write used the keys generated at mount
    assert kms["generate"] == 2, kms  # one epoch key per layer

    m.remount()
    assert prepared(m)["generate"] == 2  # a writable mount prepares its epoch (2 requests)
    # and unwraps the newest stored epoch's keys before anything is read
    assert prepared(m, "unwrap")["unwrap"] == 2
    base, _ = kms_requests(m)
    listing = subprocess.run(["ls", "-lR", str(m.mountpoint)], capture_output=True, text=True,
                             check=True, timeout=300).stdout
    assert sum(1 for line in listing.splitlines() if line.startswith("-")) == FILES
    for rel, data in contents.items():
        assert (m / rel).read_bytes() == data
    read, kms = kms_requests(m)
    assert read == base, kms  # the epoch's keys were unwrapped while the mount started
    assert kms["unwrap"] == 2, kms  # the epoch's two keys, once

    # the objects still have keys of their own: no wrapped data key or message id repeats
    wrapped, msg_ids = set(), set()
    for rel in list(contents)[:50]:
        meta = s3.head_object(Bucket=bucket, Key=rel)["Metadata"]
        assert meta["dsse-e"].endswith(";0")  # the mount's epoch, at the bucket root
        wrapped.update((meta["dsse-ki"], meta["dsse-ko"]))
        msg_ids.add(meta["dsse-h"])
    assert len(wrapped) == 100 and len(msg_ids) == 50
    records = s3.list_objects_v2(Bucket=bucket, Prefix=".dssefs/epochs/").get("KeyCount", 0)
    assert records == 1  # the second mount wrote nothing: its prepared keys left no record
    assert ".dssefs" not in os.listdir(m.mountpoint)


def test_a_read_only_mount_generates_nothing_and_unwraps_the_newest_epoch(mount_factory, s3_source, tmp_path):
    source, args = s3_source
    w = mount_factory(tmp_path / "rw", source, *args)
    w.start()
    (w / "f").write_bytes(b"written before")
    assert w.stop() == 0, w.log()
    m = mount_factory(tmp_path / "ro", source, *args, "-o", "ro")
    m.start()
    kms = prepared(m, "unwrap")  # the newest record's keys, while the mount starts
    time.sleep(1.0)  # what a writable mount needs to prepare its epoch, many times over
    total, kms = kms_requests(m)
    assert (kms["generate"], kms["unwrap"]) == (0, 2), kms
    assert (m / "f").read_bytes() == b"written before"
    assert kms_requests(m)[0] == total  # opened with the keys unwrapped at the start
