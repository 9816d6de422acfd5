"""S3Store behaviour beyond the shared contract, against real moto servers over HTTP."""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import random
import socket
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import boto3
import botocore.exceptions as bce
import pytest

from dssefs.errors import (ConfigError, MetadataBudgetError, ObjectNotFound, PreconditionFailed,
                           StoreAccessDenied, StoreError, StoreFull, StoreUnavailable)
from dssefs.store import MIN_PART_SIZE
from dssefs.store.s3 import S3Store
from faultproxy import DELAY, ERROR, fault_proxy  # noqa: F401 (fault_proxy is a fixture)

pytestmark = pytest.mark.s3


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def one_line(err: BaseException) -> str:
    msg = str(err)
    assert "\n" not in msg
    assert "testing" not in msg  # the test credentials never appear
    assert "Signature" not in msg and "X-Amz" not in msg
    return msg


# ----------------------------------------------------------------------------------------------
# Configuration


def test_identity(bucket):
    store = S3Store(bucket)
    assert store.context_name == bucket
    assert store.url == f"s3://{bucket}"
    assert store.supports_conditional_writes


def test_endpoint_from_environment(bucket, moto_server):
    store = S3Store(bucket)
    assert store.endpoint == moto_server.endpoint
    store.check()


def test_explicit_endpoint_overrides_environment(bucket, moto_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    store = S3Store(bucket, endpoint_url=moto_server.endpoint)
    store.put("k", b"v", {})
    assert store.get_range("k", 0, 1) == (b"v", 1)


def test_service_specific_endpoint_variable(bucket, moto_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_server.endpoint)
    store = S3Store(bucket)
    store.put("k", b"v", {})
    assert store.head("k").size == 1


def test_path_style_addressing(bucket, moto_server):
    endpoint = moto_server.endpoint.replace("127.0.0.1", "localhost")
    store = S3Store(bucket, endpoint_url=endpoint, path_style=True)
    urls: list[str] = []
    store._client.meta.events.register("before-send.s3", lambda request, **kw: urls.append(request.url))
    store.put("dir/k", b"v", {})
    assert store.head("dir/k").size == 1
    assert urls and all(u.startswith(f"{endpoint}/{bucket}/") for u in urls)


def test_retry_mode_and_pool_settings(bucket):
    store = S3Store(bucket, retries_mode="adaptive", max_attempts=3, max_pool_connections=7)
    cfg = store._client.meta.config
    assert cfg.retries["mode"] == "adaptive" and cfg.retries["total_max_attempts"] == 3
    assert cfg.max_pool_connections == 7
    store.put("k", b"", {})


@pytest.mark.parametrize("kwargs", [
    {"retries_mode": "bogus"}, {"max_attempts": 0}, {"list_page_size": 0},
    {"copy_part_size": 1024},
])
def test_bad_options(bucket, kwargs):
    with pytest.raises(ConfigError):
        S3Store(bucket, **kwargs)


def test_unknown_profile(bucket):
    with pytest.raises(ConfigError) as ei:
        S3Store(bucket, profile="no-such-profile-xyz")
    assert "no-such-profile-xyz" in one_line(ei.value)


def test_explicit_session(bucket, moto_server):
    session = boto3.Session(aws_access_key_id="testing", aws_secret_access_key="testing",
                            region_name="us-east-1")
    store = S3Store(bucket, session=session, endpoint_url=moto_server.endpoint)
    store.put("k", b"v", {})


# ----------------------------------------------------------------------------------------------
# Failures a real server produces


def test_missing_bucket(moto_server):
    store = S3Store("dssefs-no-such-bucket-0000")
    expected = ("bucket dssefs-no-such-bucket-0000 does not exist: create it or fix the source URI")
    for call in (store.check, lambda: store.put("k", b"", {}), lambda: list(store.list("")),
                 lambda: store.get_range("k", 0, 1)):
        with pytest.raises(StoreUnavailable) as ei:
            call()
        assert one_line(ei.value) == expected


def test_unreachable_endpoint(moto_server):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    store = S3Store("some-bucket", endpoint_url=endpoint, max_attempts=1, connect_timeout=2)
    for call in (store.check, lambda: store.head("k"), lambda: store.put("k", b"", {}),
                 lambda: list(store.list(""))):
        with pytest.raises(StoreUnavailable) as ei:
            call()
        assert one_line(ei.value) == (f"cannot reach S3 endpoint {endpoint}: check network / "
                                      "AWS_ENDPOINT_URL")


@pytest.mark.parametrize("url", ["http://user:secret@127.0.0.1:9000", "http://127.0.0.1:9000/?x=secret",
                                 "http://127.0.0.1:secret"])
def test_bad_endpoint_urls_refused(url):
    with pytest.raises(ConfigError) as ei:
        S3Store("some-bucket", endpoint_url=url)
    assert "secret" not in one_line(ei.value)


def test_endpoint_scheme_checked():
    with pytest.raises(ConfigError) as ei:
        S3Store("some-bucket", endpoint_url="ftp://host.example")
    assert "use http(s)://HOST[:PORT]" in one_line(ei.value)


def test_endpoint_credentials_from_environment_never_shown(moto_server, monkeypatch):
    port = closed_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://user:secret@127.0.0.1:{port}")
    store = S3Store("some-bucket", max_attempts=1)
    with pytest.raises(StoreError) as ei:
        store.head("k")
    assert "secret" not in one_line(ei.value)


def test_no_credentials(bucket, moto_server, monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store = S3Store(bucket)
    with pytest.raises(StoreAccessDenied) as ei:
        store.head("k")
    assert one_line(ei.value).startswith("no AWS credentials found: ")


@pytest.fixture(scope="module")
def auth_server():
    """A second moto server that enforces IAM after its first four (set-up) requests."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="4")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.skip("second moto server did not start")
                time.sleep(0.05)
        kw = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                  aws_secret_access_key="testing")
        boto3.client("s3", **kw).create_bucket(Bucket="auth-bucket")
        iam = boto3.client("iam", **kw)
        iam.create_user(UserName="nobody")
        key = iam.create_access_key(UserName="nobody")["AccessKey"]
        boto3.client("s3", **kw).put_object(Bucket="auth-bucket", Key="k", Body=b"x")
        yield endpoint, key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        proc.terminate()
        proc.wait(10)


def _session(access: str, secret: str):
    return boto3.Session(aws_access_key_id=access, aws_secret_access_key=secret,
                         region_name="us-east-1")


def test_access_denied_names_the_permission(auth_server):
    endpoint, access, secret = auth_server
    store = S3Store("auth-bucket", endpoint_url=endpoint, session=_session(access, secret))
    with pytest.raises(StoreAccessDenied) as ei:
        store.get_range("k", 0, 1)
    assert "grant s3:GetObject on arn:aws:s3:::auth-bucket/*" in one_line(ei.value)
    with pytest.raises(StoreAccessDenied) as ei:
        store.head("k")
    assert "s3:GetObject" in one_line(ei.value)
    with pytest.raises(StoreAccessDenied) as ei:
        store.put("k", b"", {})
    assert "s3:PutObject" in one_line(ei.value)
    with pytest.raises(StoreAccessDenied) as ei:
        list(store.list(""))
    assert "s3:ListBucket on arn:aws:s3:::auth-bucket " in one_line(ei.value)
    with pytest.raises(StoreAccessDenied) as ei:
        store.check()
    assert "s3:ListBucket" in one_line(ei.value)


def test_rejected_credentials(auth_server):
    endpoint, _, _ = auth_server
    store = S3Store("auth-bucket", endpoint_url=endpoint,
                    session=_session("AKIAIOSFODNN7BOGUS00", "not-a-secret"))
    with pytest.raises(StoreAccessDenied) as ei:
        store.get_range("k", 0, 1)
    msg = one_line(ei.value)
    assert "rejected the AWS credentials (InvalidAccessKeyId)" in msg
    assert "not-a-secret" not in msg and "AKIAIOSFODNN7BOGUS00" not in msg


def test_head_missing_object_message(bucket):
    with pytest.raises(ObjectNotFound) as ei:
        S3Store(bucket).head("dir/nope")
    assert one_line(ei.value) == f"s3://{bucket}/dir/nope: no such object"


# ----------------------------------------------------------------------------------------------
# Error translation for faults a test server cannot produce


def client_error(code: str, status: int, message: str = "msg", headers: dict | None = None,
                 **extra) -> bce.ClientError:
    return bce.ClientError({"Error": {"Code": code, "Message": message, **extra},
                            "ResponseMetadata": {"HTTPStatusCode": status,
                                                 "HTTPHeaders": headers or {}}}, "Op")


@pytest.mark.parametrize("code,status,op,exc,fragment", [
    ("AccessDenied", 403, "delete", StoreAccessDenied, "grant s3:DeleteObject"),
    ("403", 403, "copy", StoreAccessDenied, "s3:GetObject on the source and s3:PutObject"),
    ("SlowDown", 503, "put", StoreUnavailable, "throttling or unavailable"),
    ("InternalError", 500, "get", StoreUnavailable, "retry later"),
    ("EntityTooLarge", 400, "put", StoreFull, "too large or a storage quota"),
    ("XMinioStorageFull", 507, "put", StoreFull, "storage quota"),
    ("MetadataTooLarge", 400, "put", MetadataBudgetError, "2 KB"),
    ("ConditionalRequestConflict", 409, "put", PreconditionFailed, "changed by another writer"),
    ("PreconditionFailed", 412, "complete", PreconditionFailed, "changed by another writer"),
    ("ExpiredToken", 400, "get", StoreAccessDenied, "refresh the session"),
    ("InvalidBucketName", 400, "check", ConfigError, "invalid bucket name"),
    ("KeyTooLongError", 400, "put", StoreError, "1024 bytes"),
    ("InvalidObjectState", 403, "get", StoreError, "restore it"),
    ("NoSuchUpload", 404, "complete", StoreError, "no longer exists"),
    ("WeirdThing", 400, "get", StoreError, "WeirdThing (HTTP 400): msg"),
    ("NotImplemented", 501, "list_uploads", StoreError, "does not implement the request"),
])
def test_error_translation(bucket, code, status, op, exc, fragment):
    store = S3Store(bucket)
    err = store._client_error(client_error(code, status), op, "k")
    assert type(err) is exc
    assert fragment in one_line(err)


def test_a_request_the_service_does_not_implement_is_not_retried(bucket):
    # 501 is the service's final word (an S3-compatible service without ListMultipartUploads,
    # say): not a transient error that the retry budget would spend a minute on
    from dssefs.retrying import is_transient
    err = S3Store(bucket)._client_error(client_error("NotImplemented", 501), "list_uploads", None)
    assert not is_transient(err) and err.errno == errno.EOPNOTSUPP
    assert not is_transient(S3Store(bucket)._client_error(client_error("", 501), "get", "k"))
    assert is_transient(S3Store(bucket)._client_error(client_error("", 502), "get", "k"))


def test_region_redirect_translation(bucket):
    store = S3Store(bucket)
    err = store._client_error(client_error("PermanentRedirect", 301,
                                           headers={"x-amz-bucket-region": "eu-west-3"}), "get", "k")
    assert isinstance(err, ConfigError) and "eu-west-3" in str(err)


def test_not_found_on_conditional_write_is_a_precondition(bucket):
    store = S3Store(bucket)
    err = store._client_error(client_error("NoSuchKey", 404), "put", "k", conditional=True)
    assert isinstance(err, PreconditionFailed)


def test_server_message_is_one_line(bucket):
    store = S3Store(bucket)
    err = store._client_error(client_error("Odd", 400, "line one\nline two\r\n" + "x" * 500),
                              "get", "k")
    assert len(one_line(err)) < 300


# ----------------------------------------------------------------------------------------------
# Listing and pagination


def test_list_crosses_the_1000_key_page(bucket, moto_server):
    client = moto_server.client("s3")
    keys = sorted(f"p/{i:05d}" for i in range(1003)) + ["p/sub/x", "q"]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=bucket, Key=k, Body=b"z"), keys))
    store = S3Store(bucket)
    items = list(store.list("p/", None))
    assert [i.key for i in items] == sorted(k for k in keys if k.startswith("p/"))
    assert all(i.size == 1 for i in items)
    flat = list(store.list("p/"))
    assert [getattr(i, "key", i) for i in flat][-3:] == ["p/01001", "p/01002", "p/sub/"]
    assert len(flat) == 1004


def test_list_small_pages_merge_objects_and_prefixes(bucket):
    store = S3Store(bucket, list_page_size=2)
    keys = ["a", "b/1", "b/2", "c", "d/1", "e", "f/x/y", "g"]
    for k in keys:
        store.put(k, b"", {})
    got = [getattr(i, "key", i) for i in store.list("")]
    assert got == ["a", "b/", "c", "d/", "e", "f/", "g"]
    assert [i.key for i in store.list("", None)] == keys


# ----------------------------------------------------------------------------------------------
# Copies larger than the single-request limit (threshold lowered so the test stays small)


def test_multipart_copy(bucket):
    store = S3Store(bucket, multipart_copy_threshold=MIN_PART_SIZE, copy_part_size=MIN_PART_SIZE)
    data = random.Random(5).randbytes(2 * MIN_PART_SIZE + 1234)
    store.put("big", data, {"a": "1"})
    etag = store.copy("big", "copy/big", {"B": "2"})
    info = store.head("copy/big")
    assert info.etag == etag and etag.endswith('-3"')  # assembled from three copied parts
    assert info.metadata == {"b": "2"}
    assert store.get_range("copy/big", 0, len(data)) == (data, len(data))

    src_etag = store.head("big").etag
    store.copy("big", "big", {"c": "3"}, if_match=src_etag)
    assert store.head("big").metadata == {"c": "3"}
    assert store.get_range("big", 0, len(data))[0] == data
    with pytest.raises(PreconditionFailed):
        store.copy("big", "copy/big", {}, if_none_match=True)
    with pytest.raises(PreconditionFailed):
        store.copy("big", "big", {}, if_match=src_etag)  # the object has changed since
    # Nothing is left behind by the refused copies.
    assert store._client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_copies_pin_the_source_version(bucket):
    """Every copy request carries x-amz-copy-source-if-match with the ETag inspected first, so
    one copy never mixes two source versions (moto does not enforce it; S3 does)."""
    store = S3Store(bucket, multipart_copy_threshold=MIN_PART_SIZE, copy_part_size=MIN_PART_SIZE)
    seen: list[tuple[str, str | None]] = []

    def record(request, **kw):
        seen.append((request.method, request.headers.get("x-amz-copy-source-if-match")))

    store._client.meta.events.register("before-send.s3.UploadPartCopy", record)
    store._client.meta.events.register("before-send.s3.CopyObject", record)
    big = store.put("big", b"v" * (MIN_PART_SIZE + 1), {})
    small = store.put("small", b"s", {})
    store.copy("big", "dst", {})
    store.copy("small", "dst2", {})
    expect = [big.encode(), big.encode(), small.encode()]
    assert [h if isinstance(h, bytes) else h.encode() for _, h in seen] == expect


def test_upload_context_manager_aborts(bucket):
    store = S3Store(bucket)
    with pytest.raises(RuntimeError):
        with store.begin_upload("u", {}) as up:
            up.put_part(1, b"x")
            raise RuntimeError("writer failed")
    assert store._client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    with pytest.raises(ObjectNotFound):
        store.head("u")


def test_a_reused_part_buffer_is_sent_without_a_copy(bucket):
    """A multipart upload seals each part into a reused bytearray and hands over a view of it:
    botocore gets the bytearray itself (no 8 MiB copy per part); what is stored is what the
    buffer held during the call, also when the caller refills it right after."""
    from dssefs.store.s3 import _sendable

    buf = bytearray(random.Random(7).randbytes(MIN_PART_SIZE))
    assert _sendable(memoryview(buf)) is buf
    assert _sendable(b"abc") == b"abc" and _sendable(bytearray(b"ab")) == bytearray(b"ab")
    part = _sendable(memoryview(buf)[:10])  # a part of the buffer: read through, not copied
    assert len(part) == 10 and part.read(4) == bytes(buf[:10]) and part.read(4) == b""
    buf[0] ^= 1
    assert part.seek(0) == 0 and part.read()[:1] == bytes(buf[:1])  # the buffer's own bytes
    buf[0] ^= 1
    del part
    first = bytes(buf)
    store = S3Store(bucket)
    up = store.begin_upload("reused", {})
    up.put_part(1, memoryview(buf))
    buf[:] = b"\x00" * len(buf)  # refilled for the next part
    up.put_part(2, memoryview(buf)[:100])
    up.complete()
    assert store.get_range("reused", 0, len(first) + 200) == (first + b"\x00" * 100, len(first) + 100)


def test_small_uploads_do_not_wait_for_100_continue(fault_proxy, bucket):
    """A small PUT sends its body with its headers (no ``Expect: 100-continue``, which costs a
    round trip); a large part still waits for the server's go-ahead."""
    seen = []

    def record(req) -> bool:
        seen.append((req.target, req.headers.get("expect"), len(req.body)))
        return True

    fault_proxy.add(DELAY, method="PUT", where=record, delay=0)
    store = S3Store(bucket, endpoint_url=fault_proxy.endpoint)
    store.put("small", b"x" * 4096, {})
    up = store.begin_upload("big", {})
    up.put_part(1, b"y" * (6 << 20))
    up.complete()
    small = [expect for target, expect, _n in seen if target.startswith(f"/{bucket}/small")]
    parts = [expect for target, expect, _n in seen if "partNumber=" in target]
    assert small == [None], seen
    assert parts == ["100-continue"], seen


# ----------------------------------------------------------------------------------------------
# Checksums: dssefs's CRC32 header and an unsigned payload instead of botocore's two hashes


def _uploads_sent(store) -> list[dict]:
    seen: list[dict] = []

    def record(request, **_kw) -> None:
        if request.method == "PUT":
            seen.append({"payload": request.headers.get("X-Amz-Content-SHA256"),
                         "crc32": request.headers.get("x-amz-checksum-crc32")})
    store._client.meta.events.register("before-send.s3", record)
    return seen


def _b64crc(value: int) -> bytes:
    return base64.b64encode(value.to_bytes(4, "big"))


def test_uploads_carry_own_crc32_over_http(bucket):
    store = S3Store(bucket)
    assert store.own_checksums
    sent = _uploads_sent(store)
    body = os.urandom(2 << 20)
    store.put("computed", body, {})
    store.put("given", bytearray(body), {}, crc32=zlib.crc32(body))  # a caller's CRC is sent as it is
    upload = store.begin_upload("parts", {})
    part = os.urandom(5 << 20)
    upload.put_part(1, part)
    upload.put_part(2, b"end")
    upload.complete()
    assert [r["crc32"] for r in sent] == [_b64crc(zlib.crc32(body))] * 2 + [
        _b64crc(zlib.crc32(part)), _b64crc(zlib.crc32(b"end"))]
    assert all(r["payload"] == b"UNSIGNED-PAYLOAD" for r in sent)
    assert store.get_range("given", 0, len(body))[0] == body
    assert store.get_range("parts", 0, (5 << 20) + 3)[0] == part + b"end"


def test_payload_signed_when_checksums_only_where_required(bucket, monkeypatch):
    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "WHEN_REQUIRED")
    store = S3Store(bucket)
    assert not store.own_checksums
    sent = _uploads_sent(store)
    body = os.urandom(1 << 20)
    store.put("signed", body, {}, crc32=zlib.crc32(body))
    assert sent[0]["crc32"] is None
    assert sent[0]["payload"] == hashlib.sha256(body).hexdigest().encode()
    assert store.get_range("signed", 0, len(body))[0] == body


def test_a_view_is_sent_without_a_copy_and_again_from_its_start(fault_proxy, bucket):
    """A body that is a view of memory other than a whole bytearray (a version sealed into an
    anonymous mapping) goes out as it is, and a PUT sent again after a failure (above botocore's
    retries) sends the whole body once more."""
    import mmap

    size = (3 << 20) + 5
    data = os.urandom(size)
    mapping = mmap.mmap(-1, 8 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping[:size] = data
    fault_proxy.add(ERROR, method="PUT", path="/viewed", status=500, code="InternalError", limit=2)
    store = S3Store(bucket, endpoint_url=fault_proxy.endpoint, max_attempts=2, retry_budget=30)
    with memoryview(mapping) as whole, whole[:size] as view:
        store.put("viewed", view, {}, crc32=zlib.crc32(data))
        up = store.begin_upload("parts", {})
        up.put_part(1, whole[:5 << 20])
        up.put_part(2, view[:100])
        up.complete()
    mapping.close()  # no view of it is left behind
    assert fault_proxy.count(ERROR) == 2
    assert store.get_range("viewed", 0, size + 1) == (data, size)
    assert store.get_range("parts", 0, (5 << 20) + 100)[0] == data + bytes((5 << 20) - size) + data[:100]
