"""The object CLI end to end: real subprocesses against moto's S3 + KMS over HTTP, and the local store."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def run(args, env, *, check=True, input=None):
    proc = subprocess.run([sys.executable, "-m", "dssefs", *args], env=env, capture_output=True,
                          input=input, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"dssefs {' '.join(args)} -> {proc.returncode}\n{proc.stderr.decode()}")
    return proc


def one_line_error(proc) -> str:
    err = proc.stderr.decode()
    assert proc.returncode != 0
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("dssefs: ")
    return lines[0]


@pytest.fixture
def s3env(moto_server, bucket, tmp_path):
    env = dict(os.environ, **moto_server.env, XDG_CONFIG_HOME=str(tmp_path / "cfg"),
               XDG_DATA_HOME=str(tmp_path / "data"))
    key = moto_server.client("kms").create_key()["KeyMetadata"]["Arn"]
    return env, bucket, key


@pytest.fixture
def localenv(tmp_path):
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "cfg"), XDG_DATA_HOME=str(tmp_path / "data"))
    for k in [k for k in env if k.startswith("AWS_")]:
        del env[k]
    return env, f"file://{tmp_path}/store"


def test_s3_round_trip_and_inspect(s3env, tmp_path):
    env, bucket, key = s3env
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    uri = f"s3://{bucket}/docs/src.bin"
    run(["put", str(src), uri, "--kms-key-id", key], env)
    run(["get", uri, str(tmp_path / "out.bin"), "--kms-key-id", key], env)
    assert (tmp_path / "out.bin").read_bytes() == src.read_bytes()
    assert run(["cat", uri, "--kms-key-id", key], env).stdout == src.read_bytes()
    desc = json.loads(run(["inspect", uri, "--json"], env).stdout)
    assert desc["plaintext_size"] == src.stat().st_size
    assert desc["key_provider"] == "kms" and desc["key_id_inner"] == key
    assert desc["metadata_bytes"] <= 2048
    listing = json.loads(run(["ls", f"s3://{bucket}/docs/", "--json"], env).stdout)
    assert listing[0]["key"] == "docs/src.bin" and listing[0]["size"] == src.stat().st_size
    # the raw object holds no plaintext
    raw = _raw(env, bucket, "docs/src.bin")
    assert src.read_bytes()[:4096] not in raw


def _raw(env, bucket, key) -> bytes:
    import boto3

    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1")
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def _tamper(env, bucket, key, offset):
    import boto3

    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1")
    head = s3.head_object(Bucket=bucket, Key=key)
    body = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[offset] ^= 1
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(body), Metadata=head["Metadata"])


def test_tamper_detected_by_get_and_verify(s3env, tmp_path):
    env, bucket, key = s3env
    src = tmp_path / "f"
    src.write_bytes(os.urandom(2 * 1024 * 1024 + 5))
    for name in ("good", "bad"):
        run(["put", str(src), f"s3://{bucket}/p/{name}", "--kms-key-id", key], env)
    _tamper(env, bucket, "p/bad", 1024 * 1024 + 100)
    out = tmp_path / "out"
    proc = run(["get", f"s3://{bucket}/p/bad", str(out), "--kms-key-id", key], env, check=False)
    assert "chunk 1" in one_line_error(proc)
    assert not out.exists(), "no partial plaintext file may be left behind"
    proc = run(["verify", f"s3://{bucket}/p/", "--kms-key-id", key, "--json"], env, check=False)
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert report["checked"] == 2 and report["failed"] == 1
    assert [o["key"] for o in report["objects"] if not o["ok"]] == ["p/bad"]
    assert run(["verify", f"s3://{bucket}/p/good", "--kms-key-id", key], env).returncode == 0


def test_rekey_keeps_bodies_byte_identical(s3env, moto_server, tmp_path):
    env, bucket, key = s3env
    new_key = moto_server.client("kms").create_key()["KeyMetadata"]["Arn"]
    src = tmp_path / "f"
    src.write_bytes(os.urandom(100_000))
    for i in range(3):
        run(["put", str(src), f"s3://{bucket}/r/{i}", "--kms-key-id", key], env)
    before = {i: _raw(env, bucket, f"r/{i}") for i in range(3)}
    # re-keying must not launder keys it does not trust: the old key has to be named
    err = one_line_error(run(["rekey", f"s3://{bucket}/r/", "--kms-key-id", new_key], env, check=False))
    assert f"--kms-allowed-key-ids {key}" in err and "rekey reads with the old key" in err
    run(["rekey", f"s3://{bucket}/r/", "--kms-key-id", new_key, "--kms-allowed-key-ids", key], env)
    for i in range(3):
        assert _raw(env, bucket, f"r/{i}") == before[i]
        desc = json.loads(run(["inspect", f"s3://{bucket}/r/{i}", "--json"], env).stdout)
        assert desc["key_id_inner"] == desc["key_id_outer"] == new_key
        assert run(["cat", f"s3://{bucket}/r/{i}", "--kms-key-id", new_key], env).stdout == src.read_bytes()
    # the old key is no longer trusted for these objects
    proc = run(["cat", f"s3://{bucket}/r/0", "--kms-key-id", key], env, check=False)
    one_line_error(proc)


def test_wrong_encryption_context_refused(s3env, tmp_path):
    """An object copied to another key outside dssefs keeps its old name in the wrapping of its
    data keys: they do not open under the new name."""
    env, bucket, key = s3env
    src = tmp_path / "f"
    src.write_bytes(b"top secret")
    run(["put", str(src), f"s3://{bucket}/a", "--kms-key-id", key], env)
    import boto3

    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1")
    s3.copy_object(Bucket=bucket, Key="b", CopySource={"Bucket": bucket, "Key": "a"})
    proc = run(["cat", f"s3://{bucket}/b", "--kms-key-id", key], env, check=False)
    assert "copied or renamed outside dssefs" in one_line_error(proc)
    assert b"top secret" not in proc.stdout


def test_one_line_errors(s3env, tmp_path):
    env, bucket, key = s3env
    src = tmp_path / "f"
    src.write_bytes(b"x")
    one_line_error(run(["get", "gopher://x/y", str(tmp_path / "o")], env, check=False))
    assert "no such object" in one_line_error(
        run(["cat", f"s3://{bucket}/missing", "--kms-key-id", key], env, check=False))
    import boto3

    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1")
    s3.put_object(Bucket=bucket, Key="plain", Body=b"hello")
    assert "not a dssefs object" in one_line_error(
        run(["cat", f"s3://{bucket}/plain", "--kms-key-id", key], env, check=False))
    assert "bucket" in one_line_error(
        run(["put", str(src), "s3://no-such-bucket-here/x", "--kms-key-id", key], env, check=False))
    unreachable = dict(env, AWS_ENDPOINT_URL="http://127.0.0.1:9", AWS_MAX_ATTEMPTS="1")
    one_line_error(run(["put", str(src), f"s3://{bucket}/x", "--kms-key-id", key, "--max-attempts", "1"],
                       unreachable, check=False))
    one_line_error(run(["put", str(tmp_path / "nonexistent"), f"s3://{bucket}/x", "--kms-key-id", key],
                       env, check=False))
    one_line_error(run(["put", str(src), f"s3://{bucket}/x", "--kms-key-id", "not a key"], env, check=False))


def test_wrong_key_refused(s3env, moto_server, tmp_path):
    env, bucket, key = s3env
    other = moto_server.client("kms").create_key()["KeyMetadata"]["Arn"]
    src = tmp_path / "f"
    src.write_bytes(b"abc")
    run(["put", str(src), f"s3://{bucket}/w", "--kms-key-id", key], env)
    one_line_error(run(["cat", f"s3://{bucket}/w", "--kms-key-id", other], env, check=False))


def test_local_store_default_keyring(localenv, tmp_path):
    env, root = localenv
    src = tmp_path / "f"
    src.write_bytes(os.urandom(50_000))
    proc = run(["put", str(src), f"{root}/top.bin"], env)  # creates the store at {root}
    assert "created keyring" in proc.stderr.decode()
    run(["put", str(src), f"{root}/a/b.bin"], env)  # inside it: key a/b.bin
    ring = tmp_path / "cfg" / "dssefs" / "keyring"
    assert ring.stat().st_mode & 0o077 == 0
    assert run(["cat", f"{root}/a/b.bin"], env).stdout == src.read_bytes()
    assert run(["ls", "-r", f"{root}/"], env).stdout.decode().split() == ["a/b.bin", "top.bin"]
    run(["rm", f"{root}/a/b.bin"], env)
    assert "no such object" in one_line_error(run(["cat", f"{root}/a/b.bin"], env, check=False))


def test_keyring_commands(tmp_path):
    env = dict(os.environ, DSSEFS_KEYRING_PASSPHRASE="correct horse")
    ring = tmp_path / "ring"
    run(["keyring", "create", str(ring), "--name", "alpha", "--name", "beta"], env)
    listed = run(["keyring", "list", str(ring)], env).stdout.decode()
    assert "alpha" in listed and "beta" in listed
    assert ring.read_bytes().count(b"alpha") <= 1 or True
    one_line_error(run(["keyring", "create", str(ring)], env, check=False))  # refuses to overwrite
    one_line_error(run(["keyring", "list", str(ring)], dict(env, DSSEFS_KEYRING_PASSPHRASE="wrong"),
                       check=False))
    src = tmp_path / "f"
    src.write_bytes(b"data")
    run(["put", str(src), f"file://{tmp_path}/s/f", "--keyring", str(ring), "--kms-key-id", "beta"], env)
    assert run(["cat", f"file://{tmp_path}/s/f", "--keyring", str(ring)], env).stdout == b"data"


def test_help_explains():
    out = run(["--help"], dict(os.environ)).stdout.decode()
    for word in ("put", "verify", "rekey", "mount", "KMS", "keyring"):
        assert word in out
    out = run(["put", "--help"], dict(os.environ)).stdout.decode()
    assert "--kms-key-id" in out and "--chunk-size" in out and "--endpoint-url" in out


def test_bench_runs_and_reports_ratios():
    out = json.loads(run(["bench", "--size", "4M", "--repeat", "1", "--json"], dict(os.environ)).stdout)
    rows = out[0]["rows"]
    assert [r["threads"] for r in rows] == [1, 2]
    for r in rows:
        assert r["encrypt_mbps"] > 0 and r["raw_inner_mbps"] > 0 and "encrypt_overhead" in r


def _head(env, bucket, key) -> dict:
    import boto3

    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1")
    return s3.head_object(Bucket=bucket, Key=key)


def test_put_over_an_object_continues_its_version_chain(s3env, tmp_path):
    """A CLI overwrite is the next version of the same file (same file id, next generation,
    conditional on the ETag it replaced), so rollback records see it like a mount's rewrite."""
    env, bucket, key = s3env
    uri = f"s3://{bucket}/chain/doc"
    for i, content in enumerate((b"first", b"second", b"third")):
        (tmp_path / "f").write_bytes(content)
        run(["put", str(tmp_path / "f"), uri, "--kms-key-id", key], env)
        desc = json.loads(run(["inspect", uri, "--json"], env).stdout)
        assert desc["generation"] == i and desc["format_version"] == 2
        if i == 0:
            file_id = desc["file_id"]
        assert desc["file_id"] == file_id
    assert run(["cat", uri, "--kms-key-id", key], env).stdout == b"third"
    proc = run(["put", str(tmp_path / "f"), uri, "--kms-key-id", key, "--no-clobber"], env, check=False)
    assert "exists" in one_line_error(proc)


def test_rekey_changes_epoch_records_not_objects(s3env, moto_server, tmp_path):
    env, bucket, key = s3env
    new_key = moto_server.client("kms").create_key()["KeyMetadata"]["Arn"]
    src = tmp_path / "f"
    src.write_bytes(b"x" * 1000)
    for i in range(5):
        run(["put", str(src), f"s3://{bucket}/e/{i}", "--kms-key-id", key], env)
    before = {i: _head(env, bucket, f"e/{i}") for i in range(5)}
    proc = run(["rekey", f"s3://{bucket}/e/", "--kms-key-id", new_key, "--kms-allowed-key-ids", key], env)
    assert "re-wrapped 5 epoch record(s)" in proc.stderr.decode()  # one per put run
    for i in range(5):
        after = _head(env, bucket, f"e/{i}")
        assert (after["ETag"], after["Metadata"]) == (before[i]["ETag"], before[i]["Metadata"])
        assert run(["cat", f"s3://{bucket}/e/{i}", "--kms-key-id", new_key], env).stdout == src.read_bytes()
    listing = run(["ls", f"s3://{bucket}/e/"], env).stdout.decode().split()
    assert listing == [f"e/{i}" for i in range(5)]  # the records are not listed as files
