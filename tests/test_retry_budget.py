"""Retries beyond botocore's attempts, botocore's retry quota, and writes whose outcome is unknown
(tests/faultproxy.py in front of moto).

* The S3 store and the KMS provider send a request again after a transient failure (throttled,
  5xx, connection reset or refused, a body broken off) until their retry budget has passed, so a
  request that meets more faults in a row than botocore's ``max_attempts`` still succeeds;
  refusals (412, 404...) are never retried there.
* botocore's retry quota (standard mode: 500 tokens, given back only by successes) never runs
  out for these clients: more than a hundred requests that each need a retry and end in a 404
  all still get their retries.
* The Vault's read-back after a refused write retries transient failures; a write that failed
  transiently (it may have been applied) is remembered, and a later write of the key that finds
  that version in its way is sent on top of it instead of being called a conflict.
"""

from __future__ import annotations

import errno
import logging
import os
import time
import uuid

import botocore.retries.standard as botocore_standard
import pytest

from dssefs import kms
from dssefs.errors import (ConfigError, KeyNotFound, KeyUnavailable, ObjectNotFound,
                           PreconditionFailed, StoreUnavailable)
from dssefs.kms.aws import AwsKmsProvider
from dssefs.kms.base import Layer, context
from dssefs.objects import Vault, bytes_source
from dssefs.objects import vault as vault_module
from dssefs import retrying
from dssefs.store.s3 import S3Store, is_transient

from faultproxy import (COPY_SOURCE, KMS_TARGET, KMS_THROTTLE, LOST_RESPONSE, RESET, SLOWDOWN,
                        fault_proxy)  # noqa: F401 (fault_proxy is a fixture)
from fuse_fixtures import requires_fuse

pytestmark = pytest.mark.s3

MiB = 1024 * 1024
S3_ONLY = {"x-amz-target": None}
NOT_COPY = {"x-amz-copy-source": None}


@pytest.fixture
def fast_backoff(monkeypatch):
    """Every wait between attempts 50 times shorter (botocore's, the store's, the Vault's); the
    attempts themselves, their number and the retry quota are unchanged."""
    delay = botocore_standard.ExponentialBackoff.delay_amount
    monkeypatch.setattr(botocore_standard.ExponentialBackoff, "delay_amount",
                        lambda self, context: delay(self, context) * 0.02)
    monkeypatch.setattr(retrying, "RETRY_FIRST_DELAY", 0.01)
    monkeypatch.setattr(retrying, "RETRY_MAX_DELAY", 0.16)


def _path(bucket: str, key: str) -> str:
    return f"^/{bucket}/{key}$"


def _puts(proxy, key: str) -> list[int | None]:
    """The statuses the PUTs of ``key`` were answered with (None: reset)."""
    time.sleep(0.2)  # the proxy logs a request just after it has answered
    return [r.status for r in proxy.log if r.method == "PUT" and r.target.endswith(f"/{key}")]


def _store(proxy, bucket, **kw) -> S3Store:
    return S3Store(bucket, endpoint_url=proxy.endpoint, **kw)


# ---- the budget: defaults and limits ---------------------------------------------------------------

def test_retry_budget_defaults(bucket, kms_key):
    assert S3Store(bucket).retry_budget == 60
    assert S3Store(bucket, max_attempts=10).retry_budget == 60
    assert S3Store(bucket, max_attempts=2).retry_budget == 0  # asks for quick failures
    assert S3Store(bucket, max_attempts=2, retry_budget=5).retry_budget == 5
    assert S3Store(bucket, retry_budget=0).retry_budget == 0
    for bad in (-1, 10_000, "60"):
        with pytest.raises(ConfigError, match="retry budget"):
            S3Store(bucket, retry_budget=bad)
    assert AwsKmsProvider(kms_key).retry_budget == 60
    assert AwsKmsProvider(kms_key, max_attempts=1).retry_budget == 0
    assert AwsKmsProvider(kms_key, retry_budget=7.5).retry_budget == 7.5
    with pytest.raises(ConfigError, match="retry budget"):
        AwsKmsProvider(kms_key, retry_budget=-1)


# ---- S3: transient failures beyond max_attempts ----------------------------------------------------

@pytest.mark.parametrize("fault", [SLOWDOWN, RESET])
def test_s3_requests_outlast_more_faults_in_a_row_than_max_attempts(fault_proxy, bucket, fast_backoff,
                                                                    fault, caplog):
    caplog.set_level(logging.INFO, logger="dssefs.store.s3")
    store = _store(fault_proxy, bucket, retry_budget=30)
    faults = fault_proxy.add(fault, headers=S3_ONLY, path=_path(bucket, "k"), nth=range(1, 8))
    etag = store.put("k", b"value", {"a": "1"}, if_none_match=True)  # 7 faults, then stored
    assert faults.hits == 7
    assert store.head("k").etag == etag
    for op in ("head", "get_range", "copy", "delete"):
        fault_proxy.clear()
        faults = fault_proxy.add(fault, headers=S3_ONLY, path=_path(bucket, "k"), nth=range(1, 8),
                                 method={"head": "HEAD", "get_range": "GET", "copy": "PUT",
                                         "delete": "DELETE"}[op])
        if op == "head":
            assert store.head("k").etag == etag
        elif op == "get_range":
            assert store.get_range("k", 0, 5) == (b"value", 5)
        elif op == "copy":
            etag = store.copy("k", "k", {"a": "2"}, if_match=etag)
        else:
            store.delete("k")
        assert faults.hits == 7, op
    with pytest.raises(ObjectNotFound):
        store.head("k")
    assert "event=store_retry op=put" in caplog.text and "event=store_retry op=delete" in caplog.text
    assert "value" not in caplog.text  # no body in the log


def test_s3_listing_retries_the_page_that_failed(fault_proxy, bucket, fast_backoff):
    store = _store(fault_proxy, bucket, retry_budget=30, list_page_size=2)
    for i in range(5):
        store.put(f"d/k{i}", b"", {})
    pages = fault_proxy.add(RESET, method="GET", path=r"list-type=2", nth=range(2, 9))  # page 2, 7 times
    assert [o.key for o in store.list("d/", None)] == [f"d/k{i}" for i in range(5)]
    assert pages.hits == 7
    listed = [r.target for r in fault_proxy.log if "list-type=2" in r.target]
    assert sum("continuation-token" not in t for t in listed) == 1  # the listing was not restarted


def test_s3_multipart_parts_and_completion_retried(fault_proxy, bucket, fast_backoff):
    store = _store(fault_proxy, bucket, retry_budget=30)
    up = store.begin_upload("big", {})
    fault_proxy.add(SLOWDOWN, method="PUT", path=r"[?&]uploadId=", nth=range(1, 7))
    up.put_part(1, b"x" * (5 * MiB))
    up.put_part(2, b"y")
    fault_proxy.add(RESET, method="POST", path=r"[?&]uploadId=", nth=range(1, 7))
    etag = up.complete()
    assert store.head("big").etag == etag and store.head("big").size == 5 * MiB + 1


def test_s3_body_broken_off_more_often_than_max_attempts(bucket, moto_server, fast_backoff, monkeypatch):
    """A body that breaks off mid-read (the proxy cannot cut one short: a stand-in body)."""
    import botocore.exceptions as bce

    store = S3Store(bucket, retry_budget=30)
    store.put("k", b"0123456789", {})
    real = store._client.get_object
    broken = {"left": 7}

    class Broken:
        def read(self):
            raise bce.IncompleteReadError(actual_bytes=3, expected_bytes=10)

        def close(self):
            pass

    def get_object(**kw):
        r = real(**kw)
        if broken["left"] > 0:
            broken["left"] -= 1
            r["Body"].close()
            r["Body"] = Broken()
        return r

    monkeypatch.setattr(store._client, "get_object", get_object)
    assert store.get_range("k", 2, 4) == (b"2345", 10)
    assert broken["left"] == 0


def test_s3_budget_runs_out_then_the_error_is_raised(fault_proxy, bucket, fast_backoff):
    store = _store(fault_proxy, bucket, retry_budget=1.5)
    fault_proxy.add(RESET, headers=S3_ONLY)  # an outage
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable, match="cannot reach S3 endpoint") as ei:
        store.head("k")
    took = time.monotonic() - t0
    assert is_transient(ei.value)
    assert 1.5 <= took < 15, took
    assert fault_proxy.count(RESET) > 5  # more than botocore's attempts


def test_s3_refusals_are_not_retried(fault_proxy, bucket, fast_backoff):
    store = _store(fault_proxy, bucket, retry_budget=30)
    store.put("k", b"v", {})
    n = len(fault_proxy.log)
    with pytest.raises(PreconditionFailed) as ei:
        store.put("k", b"w", {}, if_none_match=True)
    assert not is_transient(ei.value)
    with pytest.raises(ObjectNotFound):
        store.head("missing")
    with pytest.raises(PreconditionFailed):
        store.put("k", b"w", {}, if_match='"0123456789abcdef0123456789abcdef"')
    assert len(fault_proxy.log) - n == 3  # one request each


# ---- botocore's retry quota never runs out ---------------------------------------------------------

def test_s3_retry_quota_never_runs_out(fault_proxy, bucket, fast_backoff):
    # no retries above botocore: what is tested is botocore's own
    store = _store(fault_proxy, bucket, retry_budget=0)
    # from the 2nd request on, the first attempt of each is reset and its retry answered 404: a
    # retry costs 14 tokens of 500 and a 404 gives none back (empty after 36 requests)
    resets = fault_proxy.add(RESET, method="HEAD", path=_path(bucket, "missing"), every=2)
    for i in range(120):
        with pytest.raises(ObjectNotFound):
            store.head("missing")
    assert resets.hits == 119


def test_kms_retry_quota_never_runs_out(fault_proxy, moto_server, fast_backoff):
    missing = f"arn:aws:kms:us-east-1:123456789012:key/{uuid.uuid4()}"
    provider = AwsKmsProvider(missing, endpoint_url=fault_proxy.endpoint, retry_budget=0)
    resets = fault_proxy.add(RESET, headers=KMS_TARGET, every=2)
    for i in range(120):
        with pytest.raises(KeyNotFound):
            provider.describe()
    assert resets.hits == 119


def _standard_handlers(client, event: str) -> list:
    return [h.__self__ for h in client.meta.events._emitter._handlers.prefix_search(event)
            if isinstance(getattr(h, "__self__", None), botocore_standard.RetryHandler)]


def test_retry_quota_is_botocores_own_handler_otherwise(bucket):
    """The handler is botocore's (attempts, back-off, what is retried): only its quota is new."""
    store = S3Store(bucket, max_attempts=4)
    handlers = _standard_handlers(store._client, "needs-retry.s3.HeadObject")
    assert len(handlers) == 1  # replaced, not added
    handler = handlers[0]
    assert handler._retry_policy._retry_checker._max_attempts_checker._max_attempts == 4
    quota = handler._retry_quota._quota
    assert all(quota.acquire(14) for _ in range(1000))
    # legacy mode has no quota: left alone
    legacy = S3Store(bucket, retries_mode="legacy")
    assert _standard_handlers(legacy._client, "needs-retry.s3.HeadObject") == []


# ---- KMS: throttling beyond max_attempts -----------------------------------------------------------

def test_kms_calls_outlast_more_throttling_than_max_attempts(fault_proxy, moto_server, kms_key,
                                                             fast_backoff, caplog):
    caplog.set_level(logging.INFO, logger="dssefs.kms.aws")
    provider = AwsKmsProvider(kms_key, endpoint_url=fault_proxy.endpoint, retry_budget=30)
    ctx = context(Layer.INNER, "bucket", "some/key")
    throttle = fault_proxy.add(KMS_THROTTLE, headers=KMS_TARGET, nth=range(1, 8))
    plain, wrapped = provider.generate(Layer.INNER, ctx)
    assert throttle.hits == 7
    fault_proxy.clear()
    fault_proxy.add(RESET, headers=KMS_TARGET, nth=range(1, 8))
    assert provider.unwrap(Layer.INNER, wrapped, ctx) == plain
    assert "event=kms_retry op=GenerateDataKey" in caplog.text and "reason=ThrottlingException" in caplog.text
    assert "event=kms_retry op=Decrypt" in caplog.text


def test_kms_budget_runs_out_and_lasting_errors_are_not_retried(fault_proxy, moto_server, kms_key, fast_backoff):
    provider = AwsKmsProvider(kms_key, endpoint_url=fault_proxy.endpoint, retry_budget=1)
    fault_proxy.add(KMS_THROTTLE, headers=KMS_TARGET)
    t0 = time.monotonic()
    with pytest.raises(KeyUnavailable, match="throttled"):
        provider.generate(Layer.INNER, context(Layer.INNER, "b", "k"))
    assert 1 <= time.monotonic() - t0 < 15
    fault_proxy.clear()
    missing = AwsKmsProvider(f"arn:aws:kms:us-east-1:123456789012:key/{uuid.uuid4()}",
                             endpoint_url=fault_proxy.endpoint, retry_budget=30)
    n = len(fault_proxy.log)
    with pytest.raises(KeyNotFound):
        missing.describe()
    assert len(fault_proxy.log) - n == 1


# ---- the Vault: read-back and writes of unknown outcome --------------------------------------------

@pytest.fixture
def vaults(fault_proxy, bucket, kms_key):
    """``make(store_budget, vault_budget=60, **vault_options) -> Vault`` through the proxy (S3
    only; KMS direct)."""
    made = []

    def make(store_budget: float, vault_budget: float = 60, **kw) -> Vault:
        v = Vault(_store(fault_proxy, bucket, retry_budget=store_budget), kms.make_provider(kms_key_id=kms_key),
                  retry_budget=vault_budget, **kw)
        made.append(v)
        return v

    yield make
    for v in made:
        v.close()


def test_applied_write_whose_retries_were_throttled_is_confirmed(fault_proxy, vaults, bucket, fast_backoff, caplog):
    """The first attempt is applied but its reply lost, botocore's other 4 attempts are throttled:
    the store's retry is refused (412) and the Vault recognises its own version."""
    caplog.set_level(logging.INFO)
    vault = vaults(30)
    put = dict(method="PUT", path=_path(bucket, "doc"), headers=NOT_COPY)
    fault_proxy.add(LOST_RESPONSE, nth=[1], **put)
    fault_proxy.add(SLOWDOWN, nth=[2, 3, 4, 5], **put)
    obj = vault.write("doc", bytes_source(b"data"), 4, attrs=b"{}", if_none_match=True)
    assert _puts(fault_proxy, "doc") == [None, 503, 503, 503, 503, 412]
    assert vault.open("doc").etag == obj.etag
    assert "event=write_confirmed" in caplog.text


def test_read_back_retries_transient_failures(fault_proxy, vaults, bucket, fast_backoff):
    vault = vaults(0)  # the store gives up after botocore's 5 attempts: the Vault's read-back retries
    fault_proxy.add(LOST_RESPONSE, method="PUT", path=_path(bucket, "doc"), headers=NOT_COPY, nth=[1])
    heads = fault_proxy.add(RESET, method="HEAD", path=_path(bucket, "doc"), nth=range(1, 8))
    obj = vault.write("doc", bytes_source(b"data"), 4, attrs=b"{}", if_none_match=True)  # 412, then read back
    assert heads.hits == 7
    assert vault.open("doc").read(0, 4) == b"data" and vault.open("doc").etag == obj.etag


def test_read_back_that_keeps_failing_is_not_a_conflict(fault_proxy, vaults, bucket, fast_backoff, caplog):
    caplog.set_level(logging.INFO)
    vault = vaults(0, vault_budget=0.5)
    fault_proxy.add(LOST_RESPONSE, method="PUT", path=_path(bucket, "doc"), headers=NOT_COPY, nth=[1])
    fault_proxy.add(RESET, method="HEAD", path=_path(bucket, "doc"))  # no read-back gets through
    with pytest.raises(StoreUnavailable) as ei:  # unknown, not PreconditionFailed
        vault.write("doc", bytes_source(b"data"), 4, attrs=b"{}", if_none_match=True)
    assert is_transient(ei.value) and isinstance(ei.value.__cause__, PreconditionFailed)
    assert "event=write_outcome_unknown" in caplog.text
    fault_proxy.clear()
    # the next attempt to create the file finds the version the first one stored: ours
    obj = vault.write("doc", bytes_source(b"data, more"), 10, attrs=b"{}", if_none_match=True)
    assert vault.open("doc").read(0, 100) == b"data, more" and vault.open("doc").etag == obj.etag
    assert "event=write_rebased" in caplog.text


def _unknown_then(fault_proxy, bucket, key, **select):
    """The next request selected: applied, its reply lost; botocore's 4 retries reset before
    they reach S3 (a store without retries of its own then fails: outcome unknown)."""
    fault_proxy.add(LOST_RESPONSE, nth=[1], path=_path(bucket, key), **select)
    fault_proxy.add(RESET, nth=[2, 3, 4, 5], path=_path(bucket, key), **select)


def test_rewrite_after_a_write_of_unknown_outcome(fault_proxy, vaults, bucket, fast_backoff, caplog):
    caplog.set_level(logging.INFO)
    vault = vaults(0)
    first = vault.write("doc", bytes_source(b"v1"), 2, attrs=b"{}", if_none_match=True)
    _unknown_then(fault_proxy, bucket, "doc", method="PUT", headers=NOT_COPY)
    with pytest.raises(StoreUnavailable):
        vault.write("doc", bytes_source(b"v2"), 2, attrs=b"{}", if_match=first.etag, generation=1)
    assert vault.open("doc").read(0, 2) == b"v2"  # it was applied
    # the file system keeps the data and stores it again, conditional on what it last stored
    third = vault.write("doc", bytes_source(b"v2 and v3"), 9, attrs=b"{}", if_match=first.etag, generation=1)
    assert _puts(fault_proxy, "doc") == [200, None, None, None, None, None, 412, 200]
    assert vault.open("doc").etag == third.etag and vault.open("doc").read(0, 100) == b"v2 and v3"
    assert "event=write_rebased" in caplog.text
    # once stored, the unknown outcome is forgotten: an old condition is a conflict again
    with pytest.raises(PreconditionFailed):
        vault.write("doc", bytes_source(b"x"), 1, attrs=b"{}", if_match=first.etag, generation=1)


def test_multipart_rewrite_after_a_completion_of_unknown_outcome(fault_proxy, vaults, bucket, fast_backoff):
    vault = vaults(0, part_size=5 * MiB, multipart_threshold=5 * MiB, workers=2)
    first = vault.write("big", bytes_source(os.urandom(11 * MiB)), 11 * MiB, if_none_match=True)
    completion = dict(method="POST", path=rf"^/{bucket}/big\?uploadId=")
    fault_proxy.add(LOST_RESPONSE, nth=[1], **completion)
    fault_proxy.add(RESET, nth=[2, 3, 4, 5], **completion)
    second = os.urandom(11 * MiB)
    with pytest.raises(StoreUnavailable):
        vault.write("big", bytes_source(second), len(second), if_match=first.etag, generation=1)
    assert vault.open("big").read(0, 16) == second[:16]  # it was applied
    third = os.urandom(12 * MiB)
    done = []
    obj = vault.write("big", bytes_source(third), len(third), if_match=first.etag, generation=1,
                      progress=done.append)
    assert sum(done) == len(third)  # progress reported once, not for the upload sent again
    assert vault.open("big").etag == obj.etag and vault.open("big").read(0, len(third)) == third


def test_attribute_copy_after_a_copy_of_unknown_outcome(fault_proxy, vaults, bucket, fast_backoff, caplog):
    caplog.set_level(logging.INFO)
    # written in parts: the self-copy gets a new ETag (a single-part object would keep its own)
    vault = vaults(0, part_size=5 * MiB, multipart_threshold=5 * MiB, workers=2)
    body = os.urandom(6 * MiB)
    obj = vault.write("doc", bytes_source(body), len(body), attrs=b'{"m":1}', if_none_match=True)
    _unknown_then(fault_proxy, bucket, "doc", method="PUT", headers=COPY_SOURCE)
    with pytest.raises(StoreUnavailable):
        vault.update_attrs(obj, b'{"m":2}')
    assert vault.open("doc").attrs() == b'{"m":2}' and vault.open("doc").etag != obj.etag  # applied
    new = vault.update_attrs(obj, b'{"m":3}')  # the same version, as the file system still holds
    again = vault.open("doc")
    assert again.etag == new.etag and again.attrs() == b'{"m":3}' and again.read(0, len(body)) == body
    assert "event=write_rebased" in caplog.text


def test_a_version_of_unknown_outcome_never_lets_another_body_through(fault_proxy, vaults, bucket, kms_key,
                                                                      fast_backoff):
    vault = vaults(0)
    obj = vault.write("doc", bytes_source(b"body"), 4, attrs=b"{}", if_none_match=True)
    _unknown_then(fault_proxy, bucket, "doc", method="PUT", headers=NOT_COPY)
    with pytest.raises(StoreUnavailable):
        vault.write("doc", bytes_source(b"new body"), 8, attrs=b"{}", if_match=obj.etag, generation=1)
    # an attribute copy of the old version would put its header on the new body: refused
    with pytest.raises(PreconditionFailed):
        vault.update_attrs(obj, b'{"m":1}')
    assert vault.open("doc").read(0, 100) == b"new body"
    # and a version another client stored on top of ours is a conflict
    other = Vault(S3Store(bucket), kms.make_provider(kms_key_id=kms_key))
    theirs = other.write("doc", bytes_source(b"theirs"), 6, attrs=b"{}", if_match=other.open("doc").etag,
                         generation=2)
    with pytest.raises(PreconditionFailed):
        vault.write("doc", bytes_source(b"mine"), 4, attrs=b"{}", if_match=obj.etag, generation=1)
    assert vault.open("doc").etag == theirs.etag
    other.close()


def test_unknown_outcomes_are_bounded(vaults, monkeypatch):
    vault = vaults(0)
    monkeypatch.setattr(vault_module, "UNCONFIRMED_KEYS", 3)
    meta = {"dsse-h": "x"}
    for i in range(5):
        for n in range(6):
            vault._unknown_outcome(f"k{i}", dict(meta, n=str(n)), ('"e"', False), None, OSError("lost"))
    assert list(vault._unconfirmed) == ["k2", "k3", "k4"]
    assert all(len(v) == vault_module.UNCONFIRMED_PER_KEY for v in vault._unconfirmed.values())
    vault._unknown_outcome("k9", meta, (None, False), None, OSError("lost"))  # never refused: not kept
    assert "k9" not in vault._unconfirmed


# ---- a mount: close fails with an unknown outcome, the next fsync stores, no conflict copy ---------

@requires_fuse
@pytest.mark.fuse
def test_mount_stores_after_a_write_of_unknown_outcome(fault_proxy, mount_factory, s3_source, moto_server,
                                                       bucket, tmp_path):
    source, args = s3_source
    # --max-attempts 2: no retries above botocore's two attempts, so the outcome stays unknown
    m = mount_factory(tmp_path / "mnt", source, *args, "--endpoint-url", fault_proxy.endpoint,
                      "--max-attempts", "2")
    m.start()
    data = os.urandom(200_000)
    fault_proxy.add(LOST_RESPONSE, method="PUT", path=r"/doc$", headers=NOT_COPY, nth=[1])
    fault_proxy.add(RESET, method="PUT", path=r"/doc$", headers=NOT_COPY, nth=[2])
    fd = os.open(m / "doc", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o640)
    os.write(fd, data)
    with pytest.raises(OSError) as ei:
        os.close(fd)  # stored, but nobody could tell
    assert ei.value.errno == errno.EIO
    fd = os.open(m / "doc", os.O_RDONLY)
    os.fsync(fd)  # refused (the create finds our own version), sent again on top of it
    os.close(fd)
    assert m.stop() == 0, m.log()
    assert "event=write_rebased" in m.log() and "conflict" not in m.log(), m.log()
    keys = [o["Key"] for o in moto_server.client("s3").list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert not [k for k in keys if "dssefs-conflict" in k], keys
    fault_proxy.clear()
    m.start()
    assert (m / "doc").read_bytes() == data
    assert sorted(os.listdir(m.mountpoint)) == ["doc"]
