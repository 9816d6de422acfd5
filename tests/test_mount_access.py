"""A mount whose credentials may read but not write: a refused upload is EACCES, and nothing is lost.

A separate moto server enforces IAM (``INITIAL_NO_AUTH_ACTION_COUNT``): its first requests create
an administrator; every later request is signed and checked against the caller's IAM policy.  The
mount runs with a user that may get, list and head objects and use the KMS key, but is denied
``s3:PutObject`` (which also covers multipart uploads) on the bucket, or ``kms:GenerateDataKey``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import time
import uuid

import boto3
import botocore.exceptions as bce
import pytest

from conftest import MotoServer
from fuse_fixtures import requires_fuse

pytestmark = [pytest.mark.fuse, pytest.mark.s3, requires_fuse]

# Requests served before enforcement starts: create_user, put_user_policy, create_access_key.
NO_AUTH_REQUESTS = 3
REGION = "us-east-1"


def _policy(may_write: bool, bucket: str, deny_kms_generate: bool = False) -> str:
    """Read the bucket and use the KMS key; s3:PutObject on the bucket allowed or denied (and
    optionally kms:GenerateDataKey denied)."""
    put = {"Effect": "Allow" if may_write else "Deny", "Action": ["s3:PutObject", "s3:AbortMultipartUpload"],
           "Resource": f"arn:aws:s3:::{bucket}/*"}
    statements = [
        {"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket", "s3:HeadBucket",
                                       "s3:GetBucketLocation"], "Resource": "*"},
        {"Effect": "Allow", "Action": ["kms:GenerateDataKey", "kms:Decrypt", "kms:DescribeKey"],
         "Resource": "*"},
        put]
    if deny_kms_generate:
        statements.append({"Effect": "Deny", "Action": "kms:GenerateDataKey", "Resource": "*"})
    return json.dumps({"Version": "2012-10-17", "Statement": statements})


class IamMoto(MotoServer):
    """A moto server that checks every request against IAM once the set-up requests are spent."""

    def __init__(self) -> None:
        super().__init__({"INITIAL_NO_AUTH_ACTION_COUNT": str(NO_AUTH_REQUESTS)})

    def client(self, service: str, access: str, secret: str):  # type: ignore[override]
        return boto3.client(service, endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=access, aws_secret_access_key=secret)


@pytest.fixture
def iam_store():
    """Bucket, KMS key, an administrator and a user refused s3:PutObject on the bucket."""
    server = IamMoto()
    try:
        setup = server.client("iam", "testing", "testing")  # the only unauthenticated requests
        setup.create_user(UserName="admin")
        setup.put_user_policy(UserName="admin", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = setup.create_access_key(UserName="admin")["AccessKey"]
        admin = (key["AccessKeyId"], key["SecretAccessKey"])
        # enforcement is on from here: the set-up credentials are no longer accepted
        with pytest.raises(bce.ClientError):
            server.client("s3", "testing", "testing").list_buckets()

        bucket = f"dssefs-access-{uuid.uuid4().hex[:12]}"
        server.client("s3", *admin).create_bucket(Bucket=bucket)
        kms = server.client("kms", *admin)
        kms_key = kms.create_key(Description="dssefs access test")["KeyMetadata"]["Arn"]
        iam = server.client("iam", *admin)
        iam.create_user(UserName="reader")
        iam.put_user_policy(UserName="reader", PolicyName="rw", PolicyDocument=_policy(False, bucket))
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        reader = (key["AccessKeyId"], key["SecretAccessKey"])
        yield server, bucket, kms_key, admin, reader
    finally:
        server.stop()


def _env(server: IamMoto, creds: tuple[str, str], tmp_path) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": creds[0],
            "AWS_SECRET_ACCESS_KEY": creds[1], "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials"),
            "AWS_CONFIG_FILE": str(tmp_path / "no-config")}


def _lines(log: str, pattern: str) -> list[str]:
    return [line for line in log.splitlines() if re.search(pattern, line)]


def test_refused_upload_is_eacces_and_the_data_is_stored_once_allowed(iam_store, mount_factory, tmp_path,
                                                                        monkeypatch):
    server, bucket, kms_key, admin, reader = iam_store
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_KMS"):
        monkeypatch.delenv(var, raising=False)
    source = f"s3://{bucket}"
    args = ["--kms-key-id", kms_key, "--spill-dir", str(tmp_path / "spill")]
    s3 = server.client("s3", *admin)

    # files written by someone who may write
    w = mount_factory(tmp_path / "writer", source, *args, env=_env(server, admin, tmp_path))
    w.start()
    (w / "existing.txt").write_bytes(b"readable by everyone")
    (w / "doc.txt").write_bytes(b"old content")
    assert w.stop() == 0, w.log()
    old = s3.get_object(Bucket=bucket, Key="doc.txt")
    old_etag, old_body = old["ETag"], old["Body"].read()

    m = mount_factory(tmp_path / "mnt", source, *args, env=_env(server, reader, tmp_path))
    m.start()
    assert (m / "existing.txt").read_bytes() == b"readable by everyone"
    assert sorted(os.listdir(m.mountpoint)) == ["doc.txt", "existing.txt"]

    # replacing a stored file: fsync, then close, are refused
    fd = os.open(m / "doc.txt", os.O_WRONLY | os.O_TRUNC)
    os.write(fd, b"new content, longer than the old one")
    with pytest.raises(PermissionError) as e:
        os.fsync(fd)
    assert e.value.errno == errno.EACCES
    with pytest.raises(PermissionError) as e:
        os.close(fd)  # the descriptor is closed all the same
    assert e.value.errno == errno.EACCES
    # a new file: close is refused
    fd = os.open(m / "new.txt", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o640)
    os.write(fd, b"fresh data")
    with pytest.raises(PermissionError) as e:
        os.close(fd)
    assert e.value.errno == errno.EACCES

    log = m.log()
    # one line per refused call, naming the object, the errno and the missing permission
    for op, name in (("fsync", "doc.txt"), ("flush", "doc.txt"), ("flush", "new.txt")):
        hits = _lines(log, rf"op={op} object=s3://{bucket}/{re.escape(name)} errno=EACCES ")
        assert len(hits) == 1, (op, name, log)
        assert "s3:PutObject" in hits[0], hits[0]
    assert reader[1] not in log and admin[1] not in log

    # the store is untouched: the old object, byte for byte, and no new one
    cur = s3.get_object(Bucket=bucket, Key="doc.txt")
    assert cur["ETag"] == old_etag and cur["Body"].read() == old_body
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])
                  if not o["Key"].startswith(".dssefs/"))
    assert keys == ["doc.txt", "existing.txt"]
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    # the refused changes are still what the mount serves.  Closing a descriptor of a file with
    # unsaved changes tries the upload again (every FLUSH of a changed file does), so even a
    # reader's close may report the refusal.
    for name, data in (("doc.txt", b"new content, longer than the old one"), ("new.txt", b"fresh data")):
        fd = os.open(m / name, os.O_RDONLY)
        try:
            assert os.read(fd, 1000) == data
        finally:
            try:
                os.close(fd)
            except OSError as e:
                assert e.errno == errno.EACCES

    # the kernel sends RELEASE after close(2) has returned; each release tries (and fails) again
    deadline = time.monotonic() + 5
    while not all(len(_lines(m.log(), rf"op=release object=s3://{bucket}/{name} errno=EACCES ")) == 2
                  for name in ("doc.txt", "new.txt")):
        assert time.monotonic() < deadline, m.log()
        time.sleep(0.05)

    # once the user may write, the next fsync stores the kept data, and unmount stores the rest
    server.client("iam", *admin).put_user_policy(UserName="reader", PolicyName="rw",
                                                 PolicyDocument=_policy(True, bucket))
    fd = os.open(m / "doc.txt", os.O_WRONLY)
    os.fsync(fd)
    os.close(fd)
    assert s3.get_object(Bucket=bucket, Key="doc.txt")["ETag"] != old_etag
    assert "new.txt" not in [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert m.stop() == 0, m.log()
    assert "dirty_files=1" in m.log()
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])
                  if not o["Key"].startswith(".dssefs/"))
    assert keys == ["doc.txt", "existing.txt", "new.txt"]

    m.start()
    assert (m / "doc.txt").read_bytes() == b"new content, longer than the old one"
    assert (m / "new.txt").read_bytes() == b"fresh data"
    assert os.stat(m / "new.txt").st_mode & 0o777 == 0o640


def test_new_file_refused_a_data_key_is_eacces(iam_store, mount_factory, tmp_path, monkeypatch):
    """A new file needs fresh data keys from KMS: a denied GenerateDataKey is EACCES from close."""
    server, bucket, kms_key, admin, reader = iam_store
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_KMS"):
        monkeypatch.delenv(var, raising=False)
    iam = server.client("iam", *admin)
    iam.put_user_policy(UserName="reader", PolicyName="rw",
                        PolicyDocument=_policy(True, bucket, deny_kms_generate=True))
    m = mount_factory(tmp_path / "mnt", f"s3://{bucket}", "--kms-key-id", kms_key,
                      "--spill-dir", str(tmp_path / "spill"), env=_env(server, reader, tmp_path))
    m.start()
    fd = os.open(m / "keyless.txt", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
    os.write(fd, b"needs a data key")
    with pytest.raises(PermissionError) as e:
        os.close(fd)
    assert e.value.errno == errno.EACCES
    hits = _lines(m.log(), rf"op=flush object=s3://{bucket}/keyless.txt errno=EACCES ")
    assert len(hits) == 1, m.log()
    assert "GenerateDataKey" in hits[0], hits[0]
    s3 = server.client("s3", *admin)
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0

    iam.put_user_policy(UserName="reader", PolicyName="rw", PolicyDocument=_policy(True, bucket))
    assert m.stop() == 0, m.log()  # unmount stores the kept data
    m.start()
    assert (m / "keyless.txt").read_bytes() == b"needs a data key"
