"""Per-layer trust end to end (moto S3 + KMS): with split custody configured, objects whose two
layers are wrapped under one of the keys, under swapped keys or under a foreign key are refused by
the objects layer, by `dssefs get`/`verify` and by the mount; attribute removal fails verify."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from dssefs import kms
from dssefs.errors import IntegrityError, KeyAccessDenied
from dssefs.objects import Vault, bytes_source
from dssefs.store.s3 import S3Store

pytestmark = pytest.mark.s3


@pytest.fixture
def keys(moto_server):
    c = moto_server.client("kms")
    return [c.create_key()["KeyMetadata"]["Arn"] for _ in range(3)]


def _write(bucket, key, inner, outer=None, data=b"forged?", attrs=b"mode"):
    v = Vault(S3Store(bucket), kms.make_provider(kms_key_id=inner, kms_key_id_outer=outer))
    v.write(key, bytes_source(data), len(data), attrs=attrs)


FORGERIES = {  # object key -> (inner key index, outer key index or None for "same as inner")
    "same-a1": (0, None), "same-a2": (1, None), "swapped": (1, 0), "foreign": (2, None),
    "foreign-outer": (0, 2),
}


def _reader(bucket, keys) -> Vault:
    return Vault(S3Store(bucket), kms.make_provider(kms_key_id=keys[0], kms_key_id_outer=keys[1]))


def test_split_custody_refuses_every_forgery(bucket, keys):
    for name, (i, o) in FORGERIES.items():
        _write(bucket, f"f/{name}", keys[i], None if o is None else keys[o])
    _write(bucket, "f/good", keys[0], keys[1], data=b"genuine")
    reader = _reader(bucket, keys)
    assert reader.open("f/good").read(0, 100) == b"genuine"
    for name in FORGERIES:
        with pytest.raises(KeyAccessDenied) as e:
            reader.open(f"f/{name}")
        msg = str(e.value)
        assert "inner" in msg or "outer" in msg, msg  # the refusal names the layer


def _cli(args, env):
    return subprocess.run([sys.executable, "-m", "dssefs", *args], env=env, capture_output=True,
                          timeout=120)


def test_get_and_verify_refuse_forgeries(moto_server, bucket, keys, tmp_path):
    env = dict(os.environ, **moto_server.env, XDG_CONFIG_HOME=str(tmp_path / "cfg"))
    split = ["--kms-key-id", keys[0], "--kms-key-id-outer", keys[1]]
    _write(bucket, "g/good", keys[0], keys[1], data=b"genuine")
    _write(bucket, "g/same", keys[0])
    _write(bucket, "g/swapped", keys[1], keys[0])
    assert _cli(["get", f"s3://{bucket}/g/good", "-", *split], env).stdout == b"genuine"
    for name in ("same", "swapped"):
        proc = _cli(["get", f"s3://{bucket}/g/{name}", "-", *split], env)
        assert proc.returncode == 1 and proc.stdout == b""
        err = proc.stderr.decode().strip().splitlines()
        assert len(err) == 1 and "layer" in err[0], err
    proc = _cli(["verify", f"s3://{bucket}/g/", *split], env)
    assert proc.returncode == 1
    out = proc.stdout.decode()
    assert "g/same" in out and "g/swapped" in out and "FAILED" in out and "g/good" not in out


def test_removed_or_added_attributes_fail_verify(moto_server, bucket, keys, tmp_path):
    s3 = moto_server.client("s3")
    _write(bucket, "a/with", keys[0], keys[1], attrs=b"0600 and owner")
    _write(bucket, "a/without", keys[0], keys[1], attrs=None)
    head = s3.head_object(Bucket=bucket, Key="a/with")
    meta = {k: v for k, v in head["Metadata"].items() if k != "dsse-a"}
    s3.copy_object(Bucket=bucket, Key="a/with", CopySource={"Bucket": bucket, "Key": "a/with"},
                   Metadata=meta, MetadataDirective="REPLACE")
    other = s3.head_object(Bucket=bucket, Key="a/without")["Metadata"]
    s3.copy_object(Bucket=bucket, Key="a/without", CopySource={"Bucket": bucket, "Key": "a/without"},
                   Metadata={**other, "dsse-a": head["Metadata"]["dsse-a"]}, MetadataDirective="REPLACE")
    reader = _reader(bucket, keys)
    for key in ("a/with", "a/without"):
        with pytest.raises(IntegrityError) as e:
            reader.open(key)
        assert "dsse-a" in str(e.value)


@pytest.mark.fuse
def test_mount_refuses_forged_files_with_eacces(mount_factory, moto_server, bucket, keys, tmp_path):
    from fuse_fixtures import fuse_available

    if not fuse_available():
        pytest.skip("needs /dev/fuse")
    _write(bucket, "good", keys[0], keys[1], data=b"genuine", attrs=None)
    _write(bucket, "same", keys[0], attrs=None)
    _write(bucket, "swapped", keys[1], keys[0], attrs=None)
    m = mount_factory(tmp_path / "mnt", f"s3://{bucket}", "--kms-key-id", keys[0], "--kms-key-id-outer",
                      keys[1], "--spill-dir", str(tmp_path / "spill"))
    m.start()
    assert (m / "good").read_bytes() == b"genuine"
    for name in ("same", "swapped"):
        with pytest.raises(OSError) as e:
            (m / name).read_bytes()
        assert e.value.errno == errno.EACCES, name
    assert sorted(os.listdir(m.mountpoint)) == ["good", "same", "swapped"]  # listed, not readable
