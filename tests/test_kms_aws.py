"""AWS KMS key provider against a real moto server over HTTP.

Faults a server cannot produce (access denied by a key policy, a disabled key refusing Decrypt,
throttling...) are injected with a botocore ``before-call`` handler on the provider's own client,
so the request still goes through botocore's error parsing and dssefs' error mapping.
"""

from __future__ import annotations

import base64
import errno
import logging
import socket
import threading
import types
import uuid

import boto3
import pytest


from dssefs.errors import ConfigError, KeyAccessDenied, KeyNotFound, KeyProviderError, \
    KeyUnavailable
from dssefs.kms._common import WrappedKeyMismatch
from dssefs.kms.aws import AwsKmsProvider, looks_like_kms_key_id, parse_kms_key_id
from dssefs.kms.base import DATA_KEY_BYTES, Layer, WrappedKey, context
from threads import run_in_threads

pytestmark = pytest.mark.s3

CTX_IN = context(Layer.INNER, "bucket", "dir/file.txt")
CTX_OUT = context(Layer.OUTER, "bucket", "dir/file.txt")


@pytest.fixture
def kms(moto_server):
    return moto_server.client("kms")


@pytest.fixture
def kms_key2(kms) -> str:
    return kms.create_key(Description="dssefs test 2")["KeyMetadata"]["Arn"]


def key_uuid(arn: str) -> str:
    return arn.rsplit("/", 1)[1]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def record_ops(provider: AwsKmsProvider) -> list[str]:
    ops: list[str] = []
    provider.client.meta.events.register("before-call.kms",
                                         lambda model, **kw: ops.append(model.name))
    return ops


def inject(provider: AwsKmsProvider, op: str, code: str | None = None, *, status: int = 400,
           parsed: dict | None = None, message: str = "injected") -> None:
    """Make every ``op`` call on the provider's client answer with an error (or ``parsed``)."""
    if parsed is None:
        parsed = {"Error": {"Code": code, "Message": message},
                  "ResponseMetadata": {"HTTPStatusCode": status, "RetryAttempts": 0}}

    def handler(**kwargs):
        return types.SimpleNamespace(status_code=status, headers={}), parsed

    provider.client.meta.events.register(f"before-call.kms.{op}", handler)


def secret_forms(*secrets: bytes) -> list[str]:
    out = []
    for s in secrets:
        out += [s.hex(), base64.b64encode(s).decode(), base64.b64encode(s).decode().rstrip("="),
                base64.urlsafe_b64encode(s).decode(), repr(s)[2:-1]]
    return out


def assert_clean(err: BaseException, *secrets: bytes) -> str:
    msg = str(err)
    assert msg and "\n" not in msg
    for form in secret_forms(*secrets):
        assert form not in msg
    return msg


# ---------------------------------------------------------------------------- happy paths


def test_generate_unwrap_round_trip(kms_key):
    p = AwsKmsProvider(kms_key)  # region, endpoint and credentials from the environment
    assert p.kind == "kms"
    assert p.key_id(Layer.INNER) == p.key_id(Layer.OUTER) == kms_key
    assert p.endpoint_url.startswith("http://127.0.0.1:") and p.region == "us-east-1"
    dk_in, w_in = p.generate(Layer.INNER, CTX_IN)
    dk_out, w_out = p.generate(Layer.OUTER, CTX_OUT)
    assert len(dk_in) == len(dk_out) == DATA_KEY_BYTES and dk_in != dk_out
    assert w_in.key_id == w_out.key_id == kms_key
    assert p.unwrap(Layer.INNER, w_in, CTX_IN) == dk_in
    assert p.unwrap(Layer.OUTER, w_out, CTX_OUT) == dk_out
    assert p.stats == {"generate": 2, "unwrap": 2, "rewrap": 0, "describe": 0, "errors": 0}
    p.close()


def test_reader_in_another_process_unwraps(kms_key):
    """A fresh provider (as on another mount) unwraps what the writer wrapped."""
    dk, w = AwsKmsProvider(kms_key).generate(Layer.INNER, CTX_IN)
    assert AwsKmsProvider(kms_key).unwrap(Layer.INNER, w, CTX_IN) == dk


@pytest.mark.parametrize("field", ["layer", "bucket", "key", "version", "extra"])
def test_wrong_context_refused(kms_key, field):
    p = AwsKmsProvider(kms_key)
    dk, w = p.generate(Layer.INNER, CTX_IN)
    other = {
        "layer": context(Layer.OUTER, "bucket", "dir/file.txt"),
        "bucket": context(Layer.INNER, "other-bucket", "dir/file.txt"),
        "key": context(Layer.INNER, "bucket", "dir/file.txt.moved"),
        "version": {**CTX_IN, "dssefs:v": "2"},
        "extra": {**CTX_IN, "x": "y"},
    }[field]
    with pytest.raises(WrappedKeyMismatch) as ei:
        p.unwrap(Layer.INNER, w, other)
    assert isinstance(ei.value, KeyAccessDenied) and ei.value.errno == errno.EACCES
    msg = assert_clean(ei.value, dk)
    assert "encryption context" in msg and "copied or renamed outside dssefs" in msg
    assert p.stats["errors"] == 1


def test_rewrap_to_second_key_with_new_context(kms_key, kms_key2):
    p = AwsKmsProvider(kms_key)
    dk, w = p.generate(Layer.INNER, CTX_IN)
    new_ctx = context(Layer.INNER, "bucket", "renamed.txt")
    ops = record_ops(p)
    w2 = p.rewrap(Layer.INNER, w, CTX_IN, new_ctx, new_key_id=kms_key2)
    assert ops == ["ReEncrypt"]  # the data key never left KMS
    assert w2.key_id == kms_key2 and w2.blob != w.blob
    assert p.unwrap(Layer.INNER, w2, new_ctx) == dk
    with pytest.raises(WrappedKeyMismatch):
        p.unwrap(Layer.INNER, w2, CTX_IN)
    # a reader that trusts only the first key refuses the re-wrapped key; listing it helps
    with pytest.raises(KeyAccessDenied, match="does not trust"):
        AwsKmsProvider(kms_key).unwrap(Layer.INNER, w2, new_ctx)
    reader = AwsKmsProvider(kms_key, allowed_key_ids=[kms_key2])
    assert reader.unwrap(Layer.INNER, w2, new_ctx) == dk
    assert AwsKmsProvider(kms_key, allowed_key_ids=kms_key2).unwrap(Layer.INNER, w2, new_ctx) == dk
    assert p.stats["rewrap"] == 1


def test_rewrap_same_key_new_context(kms_key):
    p = AwsKmsProvider(kms_key)
    dk, w = p.generate(Layer.OUTER, CTX_OUT)
    new_ctx = context(Layer.OUTER, "bucket", "renamed.txt")
    w2 = p.rewrap(Layer.OUTER, w, CTX_OUT, new_ctx)
    assert w2.key_id == kms_key
    assert p.unwrap(Layer.OUTER, w2, new_ctx) == dk
    with pytest.raises(WrappedKeyMismatch):
        p.rewrap(Layer.OUTER, w, new_ctx, CTX_OUT)  # wrong source context


@pytest.mark.parametrize("form", ["alias", "alias-arn", "key-id"])
def test_alias_and_key_id_forms(kms, kms_key, form):
    alias = f"alias/dssefs-{uuid.uuid4().hex[:8]}"
    kms.create_alias(AliasName=alias, TargetKeyId=key_uuid(kms_key))
    kid = {"alias": alias, "alias-arn": kms_key.rsplit(":", 1)[0] + ":" + alias,
           "key-id": key_uuid(kms_key)}[form]
    p = AwsKmsProvider(kid)
    assert p.key_id(Layer.INNER) == kid
    dk, w = p.generate(Layer.INNER, CTX_IN)
    assert w.key_id == kms_key  # metadata records the key ARN KMS answered with
    assert p.unwrap(Layer.INNER, w, CTX_IN) == dk
    # a reader configured the same way that never generated resolves the alias itself
    reader = AwsKmsProvider(kid)
    assert reader.unwrap(Layer.INNER, w, CTX_IN) == dk
    statuses = reader.check()
    assert [s.arn for s in statuses] == [kms_key]


def test_alias_resolution_denied(kms, kms_key):
    alias = f"alias/dssefs-{uuid.uuid4().hex[:8]}"
    kms.create_alias(AliasName=alias, TargetKeyId=key_uuid(kms_key))
    _, w = AwsKmsProvider(kms_key).generate(Layer.INNER, CTX_IN)
    reader = AwsKmsProvider(alias)
    inject(reader, "DescribeKey", "AccessDeniedException")
    with pytest.raises(KeyAccessDenied) as ei:
        reader.unwrap(Layer.INNER, w, CTX_IN)
    msg = assert_clean(ei.value)
    assert "cannot check whether" in msg and f"kms:DescribeKey on {alias}" in msg


def test_alias_resolution_shared_by_concurrent_readers(kms, kms_key):
    alias = f"alias/dssefs-{uuid.uuid4().hex[:8]}"
    kms.create_alias(AliasName=alias, TargetKeyId=key_uuid(kms_key))
    writer = AwsKmsProvider(kms_key)
    wrapped = [writer.generate(Layer.INNER, context(Layer.INNER, "b", f"o{i}")) for i in range(8)]
    reader = AwsKmsProvider(alias)
    results: list[bool] = []
    barrier = threading.Barrier(len(wrapped))

    def worker(i):
        dk, w = wrapped[i]
        barrier.wait()
        results.append(reader.unwrap(Layer.INNER, w, context(Layer.INNER, "b", f"o{i}")) == dk)

    run_in_threads(worker, range(len(wrapped)))
    assert results == [True] * len(wrapped)
    assert reader.stats["describe"] == 1


def test_alias_resolution_retried_after_transient_failure(kms, kms_key):
    alias = f"alias/dssefs-{uuid.uuid4().hex[:8]}"
    kms.create_alias(AliasName=alias, TargetKeyId=key_uuid(kms_key))
    dk, w = AwsKmsProvider(kms_key).generate(Layer.INNER, CTX_IN)
    reader = AwsKmsProvider(alias, max_attempts=1)
    calls = []

    def flaky(**kwargs):
        calls.append(1)
        if len(calls) == 1:
            return types.SimpleNamespace(status_code=503, headers={}), {
                "Error": {"Code": "ServiceUnavailableException", "Message": "try later"},
                "ResponseMetadata": {"HTTPStatusCode": 503, "RetryAttempts": 0}}
        return None

    reader.client.meta.events.register("before-call.kms.DescribeKey", flaky)
    with pytest.raises(KeyUnavailable, match="cannot check whether"):
        reader.unwrap(Layer.INNER, w, CTX_IN)
    assert reader.unwrap(Layer.INNER, w, CTX_IN) == dk
    assert len(calls) == 2


def test_split_custody(kms_key, kms_key2):
    p = AwsKmsProvider(kms_key, kms_key2)
    assert p.key_id(Layer.INNER) == kms_key and p.key_id(Layer.OUTER) == kms_key2
    dk_in, w_in = p.generate(Layer.INNER, CTX_IN)
    dk_out, w_out = p.generate(Layer.OUTER, CTX_OUT)
    assert w_in.key_id == kms_key and w_out.key_id == kms_key2
    assert p.unwrap(Layer.INNER, w_in, CTX_IN) == dk_in
    assert p.unwrap(Layer.OUTER, w_out, CTX_OUT) == dk_out
    # the outer wrapped key relabelled as made by the inner key: KMS refuses it
    with pytest.raises(KeyProviderError):
        p.unwrap(Layer.OUTER, WrappedKey(w_out.blob, kms_key), CTX_OUT)
    statuses = p.check()
    assert [(s.layers, s.arn) for s in statuses] == [(("inner",), kms_key),
                                                     (("outer",), kms_key2)]
    assert all(s.usable and s.state == "Enabled" for s in statuses)


def test_check_single_key(kms_key):
    p = AwsKmsProvider(kms_key)
    [status] = p.check()
    assert status.layers == ("inner", "outer") and status.arn == kms_key
    assert p.stats["describe"] == 1


def test_untrusted_key_in_metadata_refused_without_calling_kms(kms_key, kms_key2):
    """Metadata pointing at another KMS key (e.g. an attacker's) is refused before Decrypt."""
    dk, w = AwsKmsProvider(kms_key2).generate(Layer.INNER, CTX_IN)
    p = AwsKmsProvider(kms_key)
    ops = record_ops(p)
    with pytest.raises(KeyAccessDenied) as ei:
        p.unwrap(Layer.INNER, w, CTX_IN)
    msg = assert_clean(ei.value, dk)
    assert kms_key2 in msg and "does not trust" in msg and "'bucket/dir/file.txt'" in msg
    with pytest.raises(KeyAccessDenied):
        p.rewrap(Layer.INNER, w, CTX_IN, CTX_IN, new_key_id=kms_key)
    foreign = kms_key.replace("123456789012", "999999999999").replace(key_uuid(kms_key),
                                                                      str(uuid.uuid4()))
    with pytest.raises(KeyAccessDenied):
        p.unwrap(Layer.INNER, WrappedKey(w.blob, foreign), CTX_IN)
    assert ops == [] and p.stats["unwrap"] == 0


def test_thread_safety(kms_key):
    p = AwsKmsProvider(kms_key)
    results: list[bool] = []

    def worker(i):
        ctx = context(Layer.INNER, "bucket", f"obj{i}")
        for _ in range(10):
            dk, w = p.generate(Layer.INNER, ctx)
            results.append(p.unwrap(Layer.INNER, w, ctx) == dk)

    run_in_threads(worker, range(6))
    assert len(results) == 60 and all(results)
    assert p.stats["generate"] == p.stats["unwrap"] == 60


# ---------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("value", [
    "", "not a key", "arn:aws:s3:::bucket", "alias/", "key/abc", "x" * 300, "alias/a b",
    "12345678-1234-1234-1234-123456789012\n",
    "arn:aws:kms:us-east-1:123:key/12345678-1234-1234-1234-123456789012",
])
def test_malformed_key_ids_refused(moto_server, value):
    assert not looks_like_kms_key_id(value)
    with pytest.raises(ConfigError):
        AwsKmsProvider(value)


@pytest.mark.parametrize("value,form", [
    ("12345678-1234-1234-1234-123456789012", "key-id"),
    ("mrk-1234abcd12ab34cd56ef1234567890ab", "key-id"),
    ("alias/my-key", "alias"),
    ("arn:aws:kms:eu-west-1:123456789012:key/12345678-1234-1234-1234-123456789012", "key-arn"),
    ("arn:aws-us-gov:kms:us-gov-west-1:123456789012:alias/x/y_z-1", "alias-arn"),
])
def test_key_id_forms(value, form):
    ref = parse_kms_key_id(value)
    assert ref.form == form and looks_like_kms_key_id(value)


def test_wrong_region_refused_up_front(moto_server, kms_key):
    with pytest.raises(ConfigError) as ei:
        AwsKmsProvider(kms_key, region="eu-west-1")
    msg = assert_clean(ei.value)
    assert "us-east-1" in msg and "eu-west-1" in msg and "AWS_REGION" in msg
    other = kms_key.replace("us-east-1", "eu-central-1")
    with pytest.raises(ConfigError, match="region"):
        AwsKmsProvider(kms_key, other)


def test_region_taken_from_arn(monkeypatch, moto_server, kms_key):
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/dssefs-test")
    p = AwsKmsProvider(kms_key)
    assert p.region == "us-east-1"
    dk, w = p.generate(Layer.INNER, CTX_IN)
    assert p.unwrap(Layer.INNER, w, CTX_IN) == dk
    with pytest.raises(ConfigError, match="no AWS region"):
        AwsKmsProvider(key_uuid(kms_key))


def test_unknown_key_is_not_found(moto_server):
    p = AwsKmsProvider(str(uuid.uuid4()))
    with pytest.raises(KeyNotFound) as ei:
        p.generate(Layer.INNER, CTX_IN)
    msg = assert_clean(ei.value)
    assert "not found in region us-east-1" in msg and "--region" in msg
    with pytest.raises(KeyNotFound):
        p.check()
    with pytest.raises(KeyNotFound):
        AwsKmsProvider("alias/dssefs-does-not-exist").generate(Layer.INNER, CTX_IN)
    assert p.stats["errors"] == 2


def test_unknown_profile(moto_server):
    with pytest.raises(ConfigError, match="profile 'nope-dssefs' not found"):
        AwsKmsProvider("alias/x", profile="nope-dssefs")


def test_bad_options(moto_server):
    with pytest.raises(ConfigError, match="retry mode"):
        AwsKmsProvider("alias/x", retries_mode="eager")
    with pytest.raises(ConfigError, match="attempts"):
        AwsKmsProvider("alias/x", max_attempts=0)
    with pytest.raises(ConfigError):
        AwsKmsProvider("alias/x", endpoint_url="not a url")


def test_repr_has_no_secrets(kms_key):
    p = AwsKmsProvider(kms_key)
    text = repr(p)
    assert kms_key in text and "testing" not in text


# ---------------------------------------------------------------------------- environment faults


def test_no_credentials(monkeypatch, moto_server, kms_key):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/dssefs-credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/dssefs-config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    session = boto3.Session()
    assert session.get_credentials() is None
    p = AwsKmsProvider(kms_key, session=session, max_attempts=1)
    with pytest.raises(KeyAccessDenied) as ei:
        p.generate(Layer.INNER, CTX_IN)
    assert str(ei.value) == ("no AWS credentials found: set AWS_PROFILE / AWS_ACCESS_KEY_ID or "
                             "an instance role")
    with pytest.raises(KeyAccessDenied, match="no AWS credentials"):
        AwsKmsProvider(kms_key).check()


def test_unreachable_endpoint(moto_server, kms_key):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    p = AwsKmsProvider(kms_key, endpoint_url=endpoint, max_attempts=1, connect_timeout=1)
    with pytest.raises(KeyUnavailable) as ei:
        p.generate(Layer.INNER, CTX_IN)
    msg = assert_clean(ei.value)
    assert msg == f"cannot reach KMS at {endpoint}: check network / AWS_ENDPOINT_URL_KMS"
    assert ei.value.errno == errno.EIO
    with pytest.raises(KeyUnavailable, match="cannot reach KMS"):
        p.unwrap(Layer.INNER, WrappedKey(b"x" * 64, kms_key), CTX_IN)
    assert p.stats["errors"] == 2


def test_service_endpoint_env_honoured_and_overridable(monkeypatch, moto_server, kms_key):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", endpoint)
    p = AwsKmsProvider(kms_key, max_attempts=1)
    assert p.endpoint_url == endpoint
    with pytest.raises(KeyUnavailable, match=endpoint):
        p.generate(Layer.INNER, CTX_IN)
    q = AwsKmsProvider(kms_key, endpoint_url=moto_server.endpoint)  # explicit wins
    dk, w = q.generate(Layer.INNER, CTX_IN)
    assert q.unwrap(Layer.INNER, w, CTX_IN) == dk


def test_disabled_and_deleted_keys_fail_check(kms):
    key = kms.create_key()["KeyMetadata"]
    p = AwsKmsProvider(key["Arn"])
    kms.disable_key(KeyId=key["KeyId"])  # moto's DisableKey wants the bare key id
    with pytest.raises(KeyUnavailable) as ei:
        p.check()
    assert "is disabled: enable it" in assert_clean(ei.value)
    [status] = p.describe()
    assert status.state == "Disabled" and not status.usable
    kms.enable_key(KeyId=key["KeyId"])
    p.check()
    kms.schedule_key_deletion(KeyId=key["KeyId"], PendingWindowInDays=7)
    with pytest.raises(KeyUnavailable, match="pending deletion"):
        p.check()


# ---------------------------------------------------------------------------- injected faults


@pytest.mark.parametrize("op,code,exc,text", [
    ("Decrypt", "AccessDeniedException", KeyAccessDenied,
     "KMS denied kms:Decrypt on {key}: grant it in the key policy or IAM"),
    ("GenerateDataKey", "AccessDeniedException", KeyAccessDenied,
     "KMS denied kms:GenerateDataKey on {key}: grant it in the key policy or IAM"),
    ("Decrypt", "DisabledException", KeyUnavailable, "KMS key {key} is disabled: enable it"),
    ("GenerateDataKey", "KMSInvalidStateException", KeyUnavailable,
     "KMS key {key} is disabled or pending deletion: enable it"),
    ("Decrypt", "KeyUnavailableException", KeyUnavailable, "is unavailable"),
    ("Decrypt", "InvalidCiphertextException", WrappedKeyMismatch,
     "(object copied or renamed outside dssefs?)"),
    ("Decrypt", "IncorrectKeyException", WrappedKeyMismatch, "was not made with KMS key {key}"),
    ("Decrypt", "NotFoundException", KeyNotFound, "not found in region us-east-1"),
    ("GenerateDataKey", "InvalidKeyUsageException", KeyProviderError,
     "use a symmetric encryption key"),
    ("Decrypt", "ThrottlingException", KeyUnavailable, "KMS throttled Decrypt"),
    ("Decrypt", "KMSInternalException", KeyUnavailable, "retry later"),
    ("GenerateDataKey", "UnrecognizedClientException", KeyAccessDenied,
     "KMS rejected the AWS credentials"),
    ("GenerateDataKey", "ExpiredTokenException", KeyAccessDenied, "refresh them"),
    ("Decrypt", "SomethingNewException", KeyProviderError, "SomethingNewException"),
])
def test_error_mapping(kms_key, op, code, exc, text):
    p = AwsKmsProvider(kms_key, max_attempts=1)
    dk, w = p.generate(Layer.INNER, CTX_IN)
    inject(p, op, code, message="line one\nline two")
    with pytest.raises(exc) as ei:
        if op == "Decrypt":
            p.unwrap(Layer.INNER, w, CTX_IN)
        else:
            p.generate(Layer.INNER, CTX_IN)
    msg = assert_clean(ei.value, dk)
    assert text.format(key=kms_key) in msg
    assert isinstance(ei.value.__cause__, Exception)  # botocore detail kept for logs


def test_rewrap_error_names_both_permissions(kms_key, kms_key2):
    p = AwsKmsProvider(kms_key, allowed_key_ids=[kms_key2])
    _, w = p.generate(Layer.INNER, CTX_IN)
    inject(p, "ReEncrypt", "AccessDeniedException")
    with pytest.raises(KeyAccessDenied) as ei:
        p.rewrap(Layer.INNER, w, CTX_IN, CTX_OUT, new_key_id=kms_key2)
    msg = assert_clean(ei.value)
    assert f"kms:ReEncryptFrom on {kms_key}" in msg and f"kms:ReEncryptTo on {kms_key2}" in msg


def test_malformed_kms_answers(kms_key):
    p = AwsKmsProvider(kms_key)
    _, w = p.generate(Layer.INNER, CTX_IN)
    short = {"Plaintext": b"\x07" * 16, "KeyId": kms_key,
             "EncryptionAlgorithm": "SYMMETRIC_DEFAULT",
             "ResponseMetadata": {"HTTPStatusCode": 200}}
    inject(p, "Decrypt", status=200, parsed=short)
    with pytest.raises(WrappedKeyMismatch, match="16 bytes"):
        p.unwrap(Layer.INNER, w, CTX_IN)
    q = AwsKmsProvider(kms_key)
    inject(q, "GenerateDataKey", status=200,
           parsed={**short, "CiphertextBlob": b"blob", "Plaintext": b"\x07" * 64})
    with pytest.raises(KeyProviderError, match="malformed data key"):
        q.generate(Layer.INNER, CTX_IN)


def test_debug_logging_does_not_leak_data_keys(kms_key, caplog):
    p = AwsKmsProvider(kms_key)
    with caplog.at_level(logging.DEBUG, logger="botocore"):
        dk, w = p.generate(Layer.INNER, CTX_IN)
        assert p.unwrap(Layer.INNER, w, CTX_IN) == dk
    text = caplog.text
    assert "Response body" in text and "redacted by dssefs" in text
    for form in secret_forms(dk):
        assert form not in text


# ---------------------------------------------------------------------------- make_provider


@pytest.mark.parametrize("form", ["arn", "alias", "key-id"])
def test_make_provider_kms(kms, kms_key, kms_key2, form):
    from dssefs.kms import make_provider

    alias = f"alias/dssefs-{uuid.uuid4().hex[:8]}"
    kms.create_alias(AliasName=alias, TargetKeyId=key_uuid(kms_key))
    kid = {"arn": kms_key, "alias": alias, "key-id": key_uuid(kms_key)}[form]
    p = make_provider(kms_key_id=kid, kms_key_id_outer=kms_key2, max_attempts=2)
    assert isinstance(p, AwsKmsProvider) and p.kind == "kms"
    assert p.key_id(Layer.INNER) == kid and p.key_id(Layer.OUTER) == kms_key2
    dk, w = p.generate(Layer.OUTER, CTX_OUT)
    assert w.key_id == kms_key2 and p.unwrap(Layer.OUTER, w, CTX_OUT) == dk


def test_make_provider_kms_region_and_endpoint(moto_server, kms_key):
    from dssefs.kms import make_provider

    with pytest.raises(ConfigError, match="eu-west-1"):
        make_provider(kms_key_id=kms_key, region="eu-west-1")
    p = make_provider(kms_key_id=kms_key, region="us-east-1", endpoint_url=moto_server.endpoint)
    assert p.endpoint_url == moto_server.endpoint
