"""S3 and KMS over HTTPS, the way every AWS user runs them: a moto server speaking TLS only, with a
certificate its clients trust through ``AWS_CA_BUNDLE`` (boto3's standard setting).

Over HTTPS botocore sends uploads differently from plain HTTP: the body is not hashed for the
signature (``UNSIGNED-PAYLOAD``) but streamed with ``aws-chunked`` encoding and a CRC32 trailer.
These tests make sure that the whole product works on that path (store requests, conditional
writes, multipart uploads, a mount with KMS, write-back with its upload helper process) and that
an untrusted certificate is reported as such, naming the setting that fixes it.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import os
import re
import subprocess
import sys
import uuid
import zlib

import pytest

from conftest import MotoServer
from fuse_fixtures import Mount, requires_fuse

pytestmark = [pytest.mark.s3]


def _self_signed(directory) -> tuple[str, str]:
    """A certificate for 127.0.0.1 (its own CA) and its key, as PEM files in ``directory``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dssefs test S3 endpoint")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "s3-cert.pem", directory / "s3-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    server = MotoServer(tls=_self_signed(tmp_path_factory.mktemp("tls")))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def tls_env(tls_server, monkeypatch) -> dict[str, str]:
    """This process talks to the TLS server through boto3's chain (restored after the test)."""
    for k, v in tls_server.env.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_KMS", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    return tls_server.env


@pytest.fixture
def tls_bucket(tls_server) -> str:
    name = f"dssefs-tls-{uuid.uuid4().hex[:12]}"
    tls_server.client("s3").create_bucket(Bucket=name)
    return name


def _sent(store) -> list[dict]:
    """Record the method and body headers of every request ``store``'s client sends."""
    seen: list[dict] = []

    def record(request, **_kw) -> None:
        h = request.headers
        body = request.body
        if hasattr(body, "seek"):
            pos = body.tell()
            data = body.read()
            body.seek(pos)
        else:
            data = bytes(body or b"")
        seen.append({"method": request.method, "encoding": h.get("Content-Encoding"),
                     "payload": h.get("X-Amz-Content-SHA256"), "trailer": h.get("x-amz-trailer"),
                     "crc32": h.get("x-amz-checksum-crc32"), "body_crc32": zlib.crc32(data)})

    store._client.meta.events.register("before-send.s3", record)
    return seen


def test_store_requests_over_https(tls_env, tls_server, tls_bucket):
    from dssefs.errors import PreconditionFailed
    from dssefs.store.s3 import S3Store

    store = S3Store(tls_bucket, endpoint_url=tls_server.endpoint, region="us-east-1")
    sent = _sent(store)
    small, large = os.urandom(1000), os.urandom(3 << 20)  # below and above the 100-continue size
    etag = store.put("small", small, {"k": "v"}, if_none_match=True)
    store.put("large", bytearray(large), {"k": "v"}, if_none_match=True)
    assert store.get_range("small", 0, 1000) == (small, 1000)
    assert store.get_range("large", 1 << 20, 1 << 20) == (large[1 << 20:2 << 20], len(large))
    assert store.head("small").metadata == {"k": "v"}
    # conditions hold on the streamed path: a refused PUT is a conflict, not a transport error
    with pytest.raises(PreconditionFailed):
        store.put("small", b"other", {}, if_none_match=True)
    with pytest.raises(PreconditionFailed):
        store.put("large", os.urandom(2 << 20), {}, if_match='"0123456789abcdef0123456789abcdef"')
    assert store.put("small", b"second", {}, if_match=etag) != etag
    upload = store.begin_upload("parts", {"k": "v"}, if_none_match=True)
    first = bytearray(os.urandom(5 << 20))
    upload.put_part(1, first)
    upload.put_part(2, b"tail")
    upload.complete()
    assert store.get_range("parts", 0, (5 << 20) + 4)[0] == bytes(first) + b"tail"
    # every upload carried dssefs's CRC32 of its body in a header and an unsigned payload (not
    # botocore's aws-chunked stream with a trailer), so the assertions above did exercise that
    puts = [r for r in sent if r["method"] == "PUT"]
    assert len(puts) >= 7
    assert all(r["encoding"] is None and r["trailer"] is None and r["payload"] == b"UNSIGNED-PAYLOAD"
               and r["crc32"] == base64.b64encode(r["body_crc32"].to_bytes(4, "big")) for r in puts), puts


def test_checksums_left_to_botocore_when_only_required(tls_env, tls_server, tls_bucket, monkeypatch):
    """AWS_REQUEST_CHECKSUM_CALCULATION=when_required (a service that refuses checksum headers):
    no checksum is added, and botocore signs the payload as it does by default."""
    from dssefs.store.s3 import S3Store

    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
    store = S3Store(tls_bucket, endpoint_url=tls_server.endpoint, region="us-east-1")
    assert not store.own_checksums
    sent = _sent(store)
    data = os.urandom(3 << 20)
    store.put("plain", bytearray(data), {})
    upload = store.begin_upload("parts", {})
    upload.put_part(1, os.urandom(5 << 20))
    upload.put_part(2, b"tail")
    upload.complete()
    assert store.get_range("plain", 0, len(data))[0] == data
    puts = [r for r in sent if r["method"] == "PUT"]
    assert len(puts) == 3
    assert all(r["crc32"] is None and re.fullmatch(rb"[0-9a-f]{64}", r["payload"]) for r in puts), puts


def test_untrusted_certificate_is_named(tls_env, tls_bucket):
    """Without the CA bundle the command fails at once, saying it is TLS and how to fix it."""
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
    r = subprocess.run([sys.executable, "-m", "dssefs", "ls", f"s3://{tls_bucket}/"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert lines and "AWS_CA_BUNDLE" in lines[-1] and "certificate" in lines[-1].lower(), r.stderr
    assert "Traceback" not in r.stderr


def test_kms_over_https_and_its_tls_error(tls_env, tls_server, monkeypatch):
    from dssefs.errors import KeyUnavailable
    from dssefs.kms.aws import AwsKmsProvider
    from dssefs.kms.base import Layer, context

    key = tls_server.client("kms").create_key(Description="dssefs tls")["KeyMetadata"]["Arn"]
    ctx = context(Layer.INNER, "bucket", "key")
    p = AwsKmsProvider(key)
    assert p.endpoint_url.startswith("https://")
    dk, wrapped = p.generate(Layer.INNER, ctx)
    assert p.unwrap(Layer.INNER, wrapped, ctx) == dk
    p.close()
    monkeypatch.delenv("AWS_CA_BUNDLE")
    p = AwsKmsProvider(key, max_attempts=1, retry_budget=0)
    with pytest.raises(KeyUnavailable) as e:
        p.unwrap(Layer.INNER, wrapped, ctx)
    p.close()
    text = str(e.value)
    assert "TLS error talking to KMS" in text and "certificate verify failed" in text
    assert "AWS_CA_BUNDLE" in text and "\n" not in text


def test_tls_reason_reads_openssl_words():
    import ssl

    import botocore.exceptions as bce
    import urllib3.exceptions

    from dssefs.retrying import tls_reason

    refused = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: "
                                              "self-signed certificate (_ssl.c:1006)")
    refused.verify_message = "self-signed certificate"
    assert tls_reason(bce.SSLError(endpoint_url="https://h", error=refused)) == \
        "certificate verify failed: self-signed certificate"
    cut = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)")
    assert tls_reason(bce.SSLError(endpoint_url="https://h", error=urllib3.exceptions.SSLError(cut))) == \
        "wrong version number"
    assert tls_reason(bce.SSLError(endpoint_url="https://h", error="no words from OpenSSL")) == ""


@requires_fuse
@pytest.mark.fuse
@pytest.mark.parametrize("mode", ["default", "write-back"])
def test_mount_over_https(tls_env, tls_server, tls_bucket, tmp_path, mode):
    """A mount with S3 and KMS over HTTPS: small files, a file uploaded in parts while it is
    written (write-behind, default mode), or through the upload helper (write-back); everything
    reads back after a remount and is encrypted at rest."""
    kms_key = tls_server.client("kms").create_key(Description="dssefs tls")["KeyMetadata"]["Arn"]
    extra = ["--write-back"] if mode == "write-back" else ["--write-behind", "16M"]
    m = Mount(tmp_path / "mnt", f"s3://{tls_bucket}",
              ["--kms-key-id", kms_key, "--spill-dir", str(tmp_path / "spill"), *extra],
              env={"HOME": str(tmp_path / "home"), **tls_env}, log_dir=tmp_path)
    try:
        m.start(timeout=60)
        small = {f"d/f{i}.txt": os.urandom(1000 + 97 * i) for i in range(20)}
        (m / "d").mkdir()
        for name, data in small.items():
            (m / name).write_bytes(data)
        big = os.urandom(40 << 20)
        with open(m / "big.bin", "wb") as f:
            f.write(big)
            os.fsync(f.fileno())
        status = m.status()
        if mode == "default":  # the big file went up in parts while it was written
            assert status["write_behind"]["stored"] == 1, status["write_behind"]
        else:  # the small files went up through the upload helper process
            assert status["write_back"]["helper"]["puts"] >= len(small), status["write_back"]
        m.remount()
        for name, data in small.items():
            assert (m / name).read_bytes() == data, name
        assert (m / "big.bin").read_bytes() == big
        s3 = tls_server.client("s3")
        raw = s3.get_object(Bucket=tls_bucket, Key="big.bin")["Body"].read()
        assert len(raw) > len(big) and big[:4096] not in raw  # stored sealed
        assert m.stop() == 0, m.log()[-3000:]
    finally:
        m.cleanup()
