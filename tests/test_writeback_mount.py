"""--write-back through a real mount on moto S3: close returns before the upload, fsync and
unmount wait for it, a crash leaves the journal to the next mount, and a conflict found in the
background becomes a conflict copy."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from faultproxy import DELAY, LOST_RESPONSE, RESET, SLOWDOWN, fault_proxy  # noqa: F401 (fixture)
from fuse_fixtures import requires_fuse

from dssefs.store.journal import entry_files

pytestmark = [pytest.mark.s3, pytest.mark.fuse]


def _keys(moto_server, bucket) -> set[str]:
    out = moto_server.client("s3").list_objects_v2(Bucket=bucket).get("Contents", [])
    return {o["Key"] for o in out if "/.dssefs/" not in "/" + o["Key"]}


@pytest.fixture
def wb(tmp_path, mount_factory, bucket, kms_key, fault_proxy):  # noqa: F811
    """A --write-back mount through the proxy (PUTs delayed 1.5 s each)."""
    fault_proxy.add(DELAY, method="PUT", path=r"^/[^?]*[^/?]$", delay=1.5)
    m = mount_factory(tmp_path / "mnt", f"s3://{bucket}", "--kms-key-id", kms_key, "--write-back",
                      "--journal-dir", str(tmp_path / "journal"), "--spill-dir", str(tmp_path / "spill"),
                      "--endpoint-url", fault_proxy.endpoint)
    m.start()
    return m


@requires_fuse
def test_close_returns_before_upload_fsync_and_unmount_wait(wb, moto_server, bucket, tmp_path):
    data = {f"f{i}": os.urandom(1000 + i) for i in range(12)}
    for name, body in data.items():
        (wb / name).write_bytes(body)  # each close: journaled, not uploaded (PUTs take 1.5 s)
    assert len(_keys(moto_server, bucket) & set(data)) < len(data)
    assert wb.status()["write_back"]["entries"] > 0
    assert (wb / "f3").read_bytes() == data["f3"]  # read back from the journal meanwhile
    fd = os.open(wb / "f0", os.O_RDONLY)
    os.fsync(fd)  # waits for the upload
    os.close(fd)
    assert "f0" in _keys(moto_server, bucket)
    helper = wb.status()["write_back"]["helper"]  # small PUTs are sent by a helper process
    assert helper["alive"] and helper["puts"] >= 1
    assert wb.stop() == 0  # unmount drains the journal
    assert _keys(moto_server, bucket) >= set(data)
    assert not entry_files(tmp_path / "journal")
    wb.start()
    for name, body in data.items():
        assert (wb / name).read_bytes() == body


@requires_fuse
def test_a_killed_upload_helper_loses_nothing(wb, moto_server, bucket):
    """The helper process sending small PUTs is killed while PUTs are in flight: those are sent
    again (their outcome was unknown), later ones by the daemon, and every file is stored."""
    data = {f"k{i}": os.urandom(500 + i) for i in range(8)}
    for name, body in data.items():
        (wb / name).write_bytes(body)
    time.sleep(0.5)  # the first PUTs are on their way (each takes 1.5 s)
    helper = wb.status()["write_back"]["helper"]
    os.kill(helper["pid"], 9)
    for name, body in list(data.items())[:2]:
        (wb / (name + ".after")).write_bytes(body)
        data[name + ".after"] = body
    fd = os.open(wb.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)  # every name in the directory stored
    finally:
        os.close(fd)
    assert _keys(moto_server, bucket) >= set(data)
    st = wb.status()
    assert not st["write_back"]["helper"]["alive"] and st["write_back"]["entries"] == 0
    r = subprocess.run([sys.executable, "-m", "dssefs", "status", str(wb.mountpoint)],
                       capture_output=True, text=True, timeout=60)
    assert "gone: sent by the daemon" in r.stdout
    assert "event=upload_helper_lost" in wb.log()
    assert wb.stop() == 0
    wb.start()
    for name, body in data.items():
        assert (wb / name).read_bytes() == body


@requires_fuse
def test_uploads_through_faults_store_every_file_once(tmp_path, mount_factory, bucket, kms_key, fault_proxy,
                                                     moto_server):
    """The helper's PUTs meet 503s, resets and lost responses (the store applied the PUT, the
    answer never came): each is retried, a refused retry of a PUT that landed is recognised as
    our own, and every file is stored with its content, with no error and no conflict copy."""
    for i, action in enumerate((SLOWDOWN, RESET, LOST_RESPONSE)):
        fault_proxy.add(action, method="PUT", path=r"^/[^?]*/f\d+$", nth=(3 + i, 11 + i, 23 + i, 37 + i))
    m = mount_factory(tmp_path / "mnt", f"s3://{bucket}", "--kms-key-id", kms_key, "--write-back",
                      "--journal-dir", str(tmp_path / "journal"), "--spill-dir", str(tmp_path / "spill"),
                      "--endpoint-url", fault_proxy.endpoint)
    m.start()
    (m / "d").mkdir()
    data = {f"f{i}": os.urandom(200 + 37 * i) for i in range(60)}
    for name, body in data.items():
        (m / "d" / name).write_bytes(body)
    fd = os.open(m / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    assert all(fault_proxy.count(a, "PUT") > 0 for a in (SLOWDOWN, RESET, LOST_RESPONSE))
    st = m.status()
    assert st["write_back"]["helper"]["alive"] and st["write_back"]["helper"]["puts"] > len(data) // 2
    assert st["write_back"]["entries"] == 0 and st["write_back"]["conflicts"] == 0
    assert st["errors"]["total"] == 0
    assert "event=write_confirmed" in m.log()  # a lost response's retry found our own version
    assert {k for k in _keys(moto_server, bucket) if k.startswith("d/")} == {"d/"} | {f"d/{n}" for n in data}
    assert m.stop() == 0
    fault_proxy.clear()
    m.start()
    for name, body in data.items():
        assert (m / "d" / name).read_bytes() == body


@requires_fuse
def test_fsync_of_a_directory_waits_for_its_names_uploads(wb, moto_server, bucket):
    """fsync(2) of a directory returns once the names made in it (files, a new subdirectory's
    marker, a symbolic link) are in the store, not only in the journal."""
    (wb / "d").mkdir()
    (wb / "d" / "a").write_bytes(b"a" * 100)
    (wb / "d" / "b").write_bytes(b"b" * 200)
    (wb / "d" / "sub").mkdir()
    os.symlink("a", wb / "d" / "l")
    assert not {"d/a", "d/b"} <= _keys(moto_server, bucket)  # PUTs take 1.5 s each
    fd = os.open(wb / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    assert {"d/", "d/a", "d/b", "d/sub/", "d/l"} <= _keys(moto_server, bucket)


@requires_fuse
def test_crash_leaves_the_journal_to_the_next_mount(wb, moto_server, bucket, tmp_path):
    data = {f"g{i}": os.urandom(3000) for i in range(8)}
    for name, body in data.items():
        (wb / name).write_bytes(body)
    wb.kill()  # SIGKILL while uploads wait
    assert len(_keys(moto_server, bucket) & set(data)) < len(data)
    assert entry_files(tmp_path / "journal")
    wb.start()
    assert "event=journal_replay" in wb.log()
    for name, body in data.items():
        assert (wb / name).read_bytes() == body  # from the journal or the store
    assert wb.stop() == 0
    assert _keys(moto_server, bucket) >= set(data)
    assert not entry_files(tmp_path / "journal")


@requires_fuse
def test_conflict_found_in_the_background(wb, moto_server, bucket, tmp_path, mount_factory, kms_key):
    other = mount_factory(tmp_path / "other", f"s3://{bucket}", "--kms-key-id", kms_key,
                          "--spill-dir", str(tmp_path / "spill2"), "--endpoint-url", moto_server.endpoint)
    other.start()
    wb.stop()
    wb.start(None, None, *wb.args, "--attr-timeout", "60", "--entry-timeout", "60")  # no refresh below
    (wb / "doc").write_bytes(b"mine, first")
    fd = os.open(wb / "doc", os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    (other / "doc").write_bytes(b"theirs")  # stored at once (no write-back there)
    (wb / "doc").write_bytes(b"mine, second")  # based on the first version: refused in the background
    with pytest.raises(OSError):
        fd = os.open(wb / "doc", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    st = wb.status()["write_back"]
    assert st["conflicts"] == 1 and "doc.dssefs-conflict-" in st["recent_conflicts"][0]["saved_as"]
    assert wb.stop() == 0
    time.sleep(1.1)  # the other mount's entry TTL
    names = os.listdir(other.mountpoint)
    copies = [n for n in names if n.startswith("doc.dssefs-conflict-")]
    assert len(copies) == 1, names
    assert (other / "doc").read_bytes() == b"theirs"
    assert (other / copies[0]).read_bytes() == b"mine, second"
    assert "event=conflict_copy" in wb.log()


@requires_fuse
def test_stale_answers_are_refreshed_in_the_background(tmp_path, mount_factory, bucket, kms_key, moto_server):
    # write-back mode uses a directory's answer past its TTL (here 0.5 s) once more while it asks
    # the store again in the background (window: 10 TTLs); another client's removal is seen
    # right after
    ttl = "0.5"
    wb = mount_factory(tmp_path / "mnt", f"s3://{bucket}", "--kms-key-id", kms_key, "--write-back",
                       "--journal-dir", str(tmp_path / "journal"), "--spill-dir", str(tmp_path / "spill"),
                       "--endpoint-url", moto_server.endpoint, "--entry-timeout", ttl, "--attr-timeout", ttl)
    wb.start()
    s3 = moto_server.client("s3")
    s3.put_object(Bucket=bucket, Key="d/e/x", Body=b"another client's")  # d and e exist through it
    assert os.path.isdir(wb / "d" / "e")
    s3.delete_object(Bucket=bucket, Key="d/e/x")  # ... and are gone with it
    time.sleep(0.8)  # past the TTL, within the window
    assert os.path.isdir(wb / "d" / "e")  # the known answer, at once
    deadline = time.monotonic() + 10
    while os.path.exists(wb / "d" / "e"):  # the refresh found it gone
        assert time.monotonic() < deadline
        time.sleep(0.05)
    st = wb.status()["stale_answers"]
    assert st["window_s"] == 5.0 and st["own_window_s"] == 30.0 and st["served"] >= 1 and st["refreshed"] >= 1 and st["failed"] == 0
    r = subprocess.run([sys.executable, "-m", "dssefs", "status", str(wb.mountpoint)],
                       capture_output=True, text=True, timeout=60)
    assert "answers used past their TTL (window 5 s, 30 s for directories made here" in r.stdout
    assert wb.stop() == 0
