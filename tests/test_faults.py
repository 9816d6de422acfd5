"""Faults between dssefs and S3/KMS (tests/faultproxy.py in front of moto): lost responses,
resets, throttling.

A conditional write whose first attempt S3 applied but whose response was lost is retried by
botocore, and the retry is refused (412, or 409 / NoSuchUpload for a completion): that must not be
reported as a conflict with another client.  A real conflict still must be.
"""

from __future__ import annotations

import errno
import logging
import os
import time

import pytest

from dssefs import kms
from dssefs.errors import ObjectNotFound, PreconditionFailed
from dssefs.objects import Vault, bytes_source
from dssefs.store.s3 import S3Store

from faultproxy import (COPY_SOURCE, DELAY, ERROR, KMS_TARGET, KMS_THROTTLE, LOST_RESPONSE, RESET,
                        SLOWDOWN, fault_proxy)  # noqa: F401 (fault_proxy is a fixture)
from fuse_fixtures import requires_fuse

pytestmark = pytest.mark.s3

MiB = 1024 * 1024
NOT_COPY = {"x-amz-copy-source": None}


@pytest.fixture
def through(fault_proxy, bucket, kms_key):
    """``make(**vault_options) -> Vault`` on the bucket through the proxy (S3 only; KMS direct)."""
    made = []

    def make(**kw) -> Vault:
        store = S3Store(bucket, endpoint_url=fault_proxy.endpoint)
        v = Vault(store, kms.make_provider(kms_key_id=kms_key), **kw)
        made.append(v)
        return v

    yield make
    for v in made:
        v.close()


def _other_writer(bucket, kms_key) -> Vault:
    """Another client: straight to moto, its own key cache and epochs."""
    return Vault(S3Store(bucket), kms.make_provider(kms_key_id=kms_key))


def _key_path(bucket: str, key: str) -> str:
    return f"^/{bucket}/{key}$"


def _refused(proxy) -> list[int]:
    return [r.status for r in proxy.log if r.status in (404, 409, 412)]


# ---- (1) lost responses of our own writes are not conflicts ----------------------------------------

def test_lost_response_of_create_and_rewrite(fault_proxy, through, bucket):
    vault = through()
    fault_proxy.add(LOST_RESPONSE, method="PUT", path=_key_path(bucket, "dir/doc"), headers=NOT_COPY,
                    nth=[1, 3])  # the first attempt of the create and of the rewrite
    first = vault.write("dir/doc", bytes_source(b"first"), 5, attrs=b"{}", if_none_match=True)
    second = vault.write("dir/doc", bytes_source(b"second version"), 14, attrs=b"{}",
                         if_match=first.etag, generation=1)
    assert fault_proxy.count(LOST_RESPONSE) == 2
    assert _refused(fault_proxy) == [412, 412]  # botocore's retries were refused, as on S3
    obj = vault.open("dir/doc")
    assert obj.etag == second.etag and obj.read(0, 100) == b"second version"


def test_lost_response_of_an_epoch_record(fault_proxy, through, bucket, moto_server):
    vault = through()
    fault_proxy.add(LOST_RESPONSE, method="PUT", path=r"/\.dssefs/epochs/", nth=[1])
    vault.write("a/b", bytes_source(b"data"), 4, if_none_match=True)
    assert fault_proxy.count(LOST_RESPONSE) == 1
    assert vault.open("a/b").read(0, 4) == b"data"
    keys = [o["Key"] for o in moto_server.client("s3").list_objects_v2(Bucket=bucket)["Contents"]]
    assert len([k for k in keys if "/.dssefs/epochs/" in k]) == 1  # the stored record is recognised as ours


def _multipart_vault(through) -> Vault:
    return through(part_size=5 * MiB, multipart_threshold=5 * MiB, workers=2)


@pytest.mark.parametrize("retry_answer", [None, (412, "PreconditionFailed"),
                                          (409, "ConditionalRequestConflict"), (404, "NoSuchUpload")])
def test_lost_response_of_multipart_completion(fault_proxy, through, bucket, retry_answer, caplog):
    caplog.set_level(logging.INFO)
    vault = _multipart_vault(through)
    data = os.urandom(11 * MiB)
    completion = dict(method="POST", path=r"[?&]uploadId=")
    fault_proxy.add(LOST_RESPONSE, nth=[1], **completion)
    if retry_answer is not None:
        # moto answers a retried completion 200; S3 may refuse it as its condition or upload is gone
        status, code = retry_answer
        fault_proxy.add(ERROR, nth=[2], status=status, code=code, **completion)
    new = vault.write("big", bytes_source(data), len(data), if_none_match=True)
    assert fault_proxy.count(LOST_RESPONSE) == 1
    obj = vault.open("big")
    assert obj.etag == new.etag and obj.read(0, len(data)) == data
    # a confirmed completion is not reported as a failure of anything (the abort finds no upload)
    assert "abort_upload_failed" not in caplog.text


def test_lost_response_of_attribute_self_copy(fault_proxy, through, bucket):
    vault = through()
    obj = vault.write("doc", bytes_source(b"body"), 4, attrs=b'{"m":1}', if_none_match=True)
    copy = dict(method="PUT", path=_key_path(bucket, "doc"), headers=COPY_SOURCE)
    fault_proxy.add(LOST_RESPONSE, nth=[1], **copy)
    # S3 refuses the retry when the first copy changed the ETag (an object written in parts gets
    # a new one): x-amz-copy-source-if-match fails.  moto ignores that header: play S3
    fault_proxy.add(ERROR, nth=[2], status=412, code="PreconditionFailed", **copy)
    new = vault.update_attrs(obj, b'{"m":2}')
    assert fault_proxy.count(LOST_RESPONSE) == 1 and _refused(fault_proxy) == [412]
    again = vault.open("doc")
    assert again.etag == new.etag and again.attrs() == b'{"m":2}' and again.generation == 1
    assert again.read(0, 4) == b"body"


def test_lost_response_of_rename_copy_and_delete(fault_proxy, through, bucket):
    vault = through()
    obj = vault.write("src", bytes_source(b"moved"), 5, attrs=b"{}", if_none_match=True)
    copy = dict(method="PUT", path=_key_path(bucket, "dst"), headers=COPY_SOURCE)
    fault_proxy.add(LOST_RESPONSE, nth=[1], **copy)
    # moto ignores If-None-Match on CopyObject (dssefs checks it with a HEAD first): play S3
    fault_proxy.add(ERROR, nth=[2], status=412, code="PreconditionFailed", **copy)
    fault_proxy.add(LOST_RESPONSE, method="DELETE", path=_key_path(bucket, "src"), nth=[1])
    etag = vault.rename(obj, "dst", dst_if_none_match=True)
    assert fault_proxy.count(LOST_RESPONSE) == 2
    moved = vault.open("dst")
    assert moved.etag == etag and moved.read(0, 5) == b"moved"
    with pytest.raises(ObjectNotFound):
        vault.store.head("src")
    # a DELETE retried after its first attempt was applied finds nothing: success (S3 answers 204)
    assert [r.status for r in fault_proxy.log if r.method == "DELETE"] == [None, 204]
    fault_proxy.add(RESET, method="DELETE", nth=[1])
    vault.store.delete("dst")
    vault.store.delete("never-was")


# ---- (2) real conflicts are still conflicts --------------------------------------------------------

def test_real_conflicts_are_still_reported(fault_proxy, through, bucket, kms_key):
    vault = through()
    other = _other_writer(bucket, kms_key)
    mine = vault.write("doc", bytes_source(b"v1"), 2, attrs=b"{}", if_none_match=True)
    other.write("doc", bytes_source(b"theirs"), 6, attrs=b"{}", if_match=mine.etag, generation=1)
    # with our own request lost as well: the stored version is still not ours
    fault_proxy.add(LOST_RESPONSE, method="PUT", path=_key_path(bucket, "doc"), headers=NOT_COPY, nth=[1])
    with pytest.raises(PreconditionFailed):
        vault.write("doc", bytes_source(b"mine"), 4, attrs=b"{}", if_match=mine.etag, generation=1)
    with pytest.raises(PreconditionFailed):
        vault.update_attrs(mine, b'{"m":1}')
    with pytest.raises(PreconditionFailed):
        vault.write("doc", bytes_source(b"new"), 3, if_none_match=True)
    src = vault.write("src", bytes_source(b"s"), 1, attrs=b"{}", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        vault.rename(src, "doc", dst_if_none_match=True)
    assert other.open("doc").read(0, 10) == b"theirs"
    assert vault.open("src").read(0, 1) == b"s"  # not moved
    # a refused completion that did not store our version
    big = _multipart_vault(through)
    data = os.urandom(11 * MiB)
    fault_proxy.add(ERROR, method="POST", path=r"[?&]uploadId=", nth=[1], status=412,
                    code="PreconditionFailed")
    with pytest.raises(PreconditionFailed):
        big.write("big", bytes_source(data), len(data), if_none_match=True)
    other.close()


# ---- (3) a mount with lost responses ---------------------------------------------------------------

@requires_fuse
@pytest.mark.fuse
def test_mount_with_lost_responses_reports_no_conflicts(fault_proxy, mount_factory, s3_source, tmp_path):
    source, args = s3_source
    m = mount_factory(tmp_path / "mnt", source, *args, "--endpoint-url", fault_proxy.endpoint)
    m.start()
    lost = fault_proxy.add(LOST_RESPONSE, method="PUT", probability=0.05, seed=20240611)
    contents = {f"f{i:03d}": os.urandom(100 + i * 37) for i in range(100)}
    (m / "sub").mkdir()
    failures = []

    def attempt(what, call, *args):
        try:
            call(*args)
        except OSError as e:
            failures.append((what, errno.errorcode.get(e.errno)))

    def create(path, data):
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o640)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)  # stores the file: EIO here was the bug

    for name, data in contents.items():
        attempt(f"create {name}", create, m / "sub" / name, data)
    for name in list(contents)[:20]:  # metadata-only self-copies
        attempt(f"chmod {name}", os.chmod, m / "sub" / name, 0o600)
    for name in list(contents)[20:30]:  # copies to a new key, then deletes
        attempt(f"rename {name}", os.rename, m / "sub" / name, m / "sub" / f"r-{name}")
        contents[f"r-{name}"] = contents.pop(name)
    assert failures == [], m.log()
    assert m.stop() == 0, m.log()
    assert lost.hits >= 3, fault_proxy.log  # the seed does inject faults
    assert "conflict" not in m.log() and "changed by another" not in m.log(), m.log()
    fault_proxy.clear()
    m.start()
    names = sorted(os.listdir(m / "sub"))
    assert names == sorted(contents)  # no conflict copies, nothing lost
    for name, data in contents.items():
        assert (m / "sub" / name).read_bytes() == data, name
    for name in names:
        if name.startswith("f0") and int(name[1:]) < 20:
            assert os.stat(m / "sub" / name).st_mode & 0o7777 == 0o600, name


# ---- (4) throttling and resets are retried -------------------------------------------------------------

def test_slowdown_resets_and_kms_throttling_are_retried(fault_proxy, bucket, kms_key):
    s3_only = {"x-amz-target": None}
    fault_proxy.add(SLOWDOWN, headers=s3_only, every=6)
    fault_proxy.add(RESET, headers=s3_only, every=10)
    fault_proxy.add(DELAY, headers=s3_only, every=4, delay=0.05)
    fault_proxy.add(KMS_THROTTLE, headers=KMS_TARGET, every=3)

    def vault() -> Vault:
        provider = kms.make_provider(kms_key_id=kms_key, endpoint_url=fault_proxy.endpoint)
        # an epoch per 2 objects: GenerateDataKey calls while writing, Decrypt calls while reading
        return Vault(S3Store(bucket, endpoint_url=fault_proxy.endpoint), provider, epoch_max_objects=2)

    writer = vault()
    t0 = time.monotonic()
    data = {f"d/o{i}": os.urandom(1000 + i) for i in range(6)}
    for key, body in data.items():
        writer.write(key, bytes_source(body), len(body), attrs=b"{}", if_none_match=True)
    obj = writer.open("d/o0")
    writer.update_attrs(obj, b'{"x":1}')
    writer.rename(writer.open("d/o1"), "d/moved", dst_if_none_match=True)
    data["d/moved"] = data.pop("d/o1")
    writer.close()
    reader = vault()
    for key, body in data.items():
        assert reader.open(key).read(0, len(body)) == body
    reader.close()
    assert fault_proxy.count(SLOWDOWN) >= 3 and fault_proxy.count(RESET) >= 2
    assert fault_proxy.count(KMS_THROTTLE) >= 3 and fault_proxy.count(DELAY) >= 3
    assert time.monotonic() - t0 < 40
