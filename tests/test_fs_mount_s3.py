"""Real mounts over S3 (moto server) + AWS KMS (moto): durability, consistency, conflicts, errors."""

from __future__ import annotations

import errno
import os
import time

import pytest

from fuse_fixtures import Mount, requires_fuse

pytestmark = [pytest.mark.fuse, pytest.mark.s3, requires_fuse]


def test_s3_roundtrip_rename_remount(s3_mount: Mount, moto_server, bucket):
    m = s3_mount
    data = os.urandom(5_000_000)
    (m / "docs").mkdir()
    (m / "docs" / "big.bin").write_bytes(data)
    os.symlink("docs/big.bin", m / "link")
    os.rename(m / "docs", m / "papers")
    s3 = moto_server.client("s3")
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", []))
    records = [k for k in keys if k.startswith(".dssefs/epochs/")]
    assert len(records) == 1  # the mount's one epoch, at its prefix (the bucket root)
    assert sorted(set(keys) - set(records)) == ["link", "papers/", "papers/big.bin"]
    head = s3.head_object(Bucket=bucket, Key="papers/big.bin")
    assert set(head["Metadata"]) == {"dsse-h", "dsse-ki", "dsse-ko", "dsse-e", "dsse-a"}  # format 2
    assert head["Metadata"]["dsse-e"] == records[0].rsplit("/", 1)[1] + ";0"  # renamed: re-wrapped
    raw = s3.get_object(Bucket=bucket, Key="papers/big.bin")["Body"].read()
    assert data[:64] not in raw  # encrypted at rest
    m.remount()
    assert (m / "papers" / "big.bin").read_bytes() == data
    assert os.readlink(m / "link") == "docs/big.bin"
    assert (m / "link").exists() is False  # dangling after the rename, as on any file system


def test_second_mount_sees_closed_file_within_ttl(s3_mount: Mount, mount_factory, s3_source, tmp_path):
    a = s3_mount
    source, args = s3_source
    b = mount_factory(tmp_path / "mnt-b", source, *args)
    b.start()
    (a / "shared.txt").write_bytes(b"version 1")
    assert (b / "shared.txt").read_bytes() == b"version 1"
    (a / "shared.txt").write_bytes(b"version 2, longer")
    deadline = time.monotonic() + 1.0 + 2.0  # attr/entry TTL (1 s) plus slack for a loaded host
    while (b / "shared.txt").read_bytes() != b"version 2, longer":
        assert time.monotonic() < deadline, "second mount did not see the new version within the TTL"
        time.sleep(0.1)
    os.unlink(a / "shared.txt")
    deadline = time.monotonic() + 3.0
    while (b / "shared.txt").exists():
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_conflicting_writer_gets_eio_and_newer_version_survives(s3_mount: Mount, mount_factory, s3_source,
                                                                tmp_path):
    a = s3_mount
    source, args = s3_source
    b = mount_factory(tmp_path / "mnt-b", source, *args)
    b.start()
    (a / "doc").write_bytes(b"original")
    fd_b = os.open(b / "doc", os.O_WRONLY)
    (a / "doc").write_bytes(b"written by A")  # A stores a newer version
    os.pwrite(fd_b, b"B" * 8, 0)  # replaces every stored byte: nothing to read from the old version
    with pytest.raises(OSError) as e:
        os.fsync(fd_b)
    assert e.value.errno == errno.EIO
    with pytest.raises(OSError):
        os.close(fd_b)
    time.sleep(1.2)
    assert (a / "doc").read_bytes() == b"written by A"
    assert "changed by another client" in b.log()
    # at unmount, B saves its losing version under a conflict name instead of dropping it
    assert b.stop() == 0, b.log()
    assert "event=conflict_copy" in b.log()
    copies = [n for n in os.listdir(a.mountpoint) if n.startswith("doc.dssefs-conflict-")]
    assert len(copies) == 1 and (a / copies[0]).read_bytes() == b"B" * 8
    b.start()
    # a partial overwrite needs the old version's bytes, which are gone: EIO at write time
    fd_b = os.open(b / "doc", os.O_WRONLY)
    (a / "doc").write_bytes(b"written by A again")
    with pytest.raises(OSError) as e:
        os.pwrite(fd_b, b"x", 3)
        os.fsync(fd_b)
    assert e.value.errno == errno.EIO
    try:
        os.close(fd_b)
    except OSError:
        pass
    time.sleep(1.2)
    assert (a / "doc").read_bytes() == b"written by A again"


def test_upload_error_reaches_application_and_data_is_kept(s3_mount: Mount, moto_server, bucket, tmp_path):
    m = s3_mount
    s3 = moto_server.client("s3")
    data = os.urandom(300_000)
    fd = os.open(m / "precious", os.O_CREAT | os.O_WRONLY, 0o600)
    os.write(fd, data)
    s3.delete_bucket(Bucket=bucket)  # the store goes away under the mount
    with pytest.raises(OSError) as e:
        os.fsync(fd)
    assert e.value.errno in (errno.EIO, errno.EACCES, errno.ENOSPC)
    assert "precious" in m.log()
    s3.create_bucket(Bucket=bucket)  # the store is back: the kept dirty data is stored on retry
    os.fsync(fd)
    os.close(fd)
    m.remount()
    assert (m / "precious").read_bytes() == data


def test_prefix_mount_keeps_to_its_prefix(mount_factory, s3_source, moto_server, bucket, tmp_path):
    source, args = s3_source
    s3 = moto_server.client("s3")
    s3.put_object(Bucket=bucket, Key="outside.txt", Body=b"not ours")
    m = mount_factory(tmp_path / "team", f"{source}/team", *args)
    m.start()
    (m / "a.txt").write_bytes(b"inside")
    (m / "sub").mkdir()
    os.chmod(m.mountpoint, 0o710)
    assert sorted(os.listdir(m.mountpoint)) == ["a.txt", "sub"]
    fd = os.open(m.mountpoint, os.O_RDONLY)  # fsync of the parent makes the mkdir durable
    os.fsync(fd)
    os.close(fd)
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"])
    records = [k for k in keys if k.startswith("team/.dssefs/epochs/")]
    assert len(records) == 1  # the mount's epoch lives under its own prefix
    assert sorted(set(keys) - set(records)) == ["outside.txt", "team/", "team/a.txt", "team/sub/"]
    assert s3.head_object(Bucket=bucket, Key="team/a.txt")["Metadata"]["dsse-e"].endswith(";1")
    m.remount()
    assert os.stat(m.mountpoint).st_mode & 0o7777 == 0o710  # root attributes live in team/
    assert (m / "a.txt").read_bytes() == b"inside"
