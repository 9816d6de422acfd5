"""Multipart uploads left behind by crashed writers: listing and aborting them in every store, and
the clean-up a mount runs once it serves (``stale_upload_age``).

moto answers ListMultipartUploads with one fixed time (2010-11-10) for every upload, in no
particular order and in one page.  :class:`S3Uploads`, the fault proxy in front of moto, plays S3
there: the time the upload was begun (when the proxy saw it begun), key order and pages of
``max-uploads`` with key and upload-id markers.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from urllib.parse import parse_qs, urlsplit

import pytest

from dssefs.errors import StoreAccessDenied, StoreError
from dssefs.store import LocalStore
from dssefs.store.base import MIN_PART_SIZE, PendingUpload
from dssefs.store.metered import MeteredStore
from dssefs.store.s3 import S3Store
from dssefs.store.uploads import DEFAULT_STALE_UPLOAD_AGE, abort_stale_uploads, is_file_system_key

from faultproxy import FaultProxy
from fuse_fixtures import requires_fuse

MiB = 1024 * 1024
S3NS = "http://s3.amazonaws.com/doc/2006-03-01/"
ET.register_namespace("", S3NS)


def _q(tag: str) -> str:
    return f"{{{S3NS}}}{tag}"


class S3Uploads(FaultProxy):
    """The fault proxy, answering ListMultipartUploads as S3 does (see the module docstring)."""

    def __init__(self, upstream: str):
        super().__init__(upstream)
        self.initiated: dict[str, float] = {}  # upload id -> when its CreateMultipartUpload was answered
        self.list_pages = 0

    def _forward(self, request: bytes, req) -> bytes:
        response = super()._forward(request, req)
        query = parse_qs(urlsplit(req.target).query, keep_blank_values=True)
        if "uploads" not in query:
            return response
        head, _, body = response.partition(b"\r\n\r\n")
        if not head.split(b" ", 2)[1].startswith(b"2"):
            return response
        root = ET.fromstring(body)
        if req.method == "POST":  # CreateMultipartUpload
            with self._lock:
                self.initiated[root.findtext(_q("UploadId"))] = round(time.time(), 3)
            return response
        if req.method != "GET":
            return response
        with self._lock:
            self.list_pages += 1
            initiated = dict(self.initiated)
        uploads = root.findall(_q("Upload"))
        for u in uploads:
            root.remove(u)
            t = initiated.get(u.findtext(_q("UploadId")))
            if t is not None:
                ms = int(round((t % 1) * 1000))
                u.find(_q("Initiated")).text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{ms:03d}Z"
        uploads.sort(key=lambda u: (u.findtext(_q("Key")), u.findtext(_q("Initiated"))))
        key_marker = query.get("key-marker", [""])[0]
        id_marker = query.get("upload-id-marker", [""])[0]
        start = 0
        if key_marker:
            ids = [(u.findtext(_q("Key")), u.findtext(_q("UploadId"))) for u in uploads]
            if id_marker and (key_marker, id_marker) in ids:
                start = ids.index((key_marker, id_marker)) + 1
            else:
                start = next((i for i, (k, _) in enumerate(ids) if k > key_marker), len(ids))
        size = int(query.get("max-uploads", ["1000"])[0])
        page = uploads[start:start + size]
        truncated = start + size < len(uploads)
        root.find(_q("IsTruncated")).text = "true" if truncated else "false"
        root.find(_q("MaxUploads")).text = str(size)
        if truncated:
            ET.SubElement(root, _q("NextKeyMarker")).text = page[-1].findtext(_q("Key"))
            ET.SubElement(root, _q("NextUploadIdMarker")).text = page[-1].findtext(_q("UploadId"))
        for u in page:
            root.append(u)
        body = b'<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root)
        lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"content-length:")]
        lines.append(b"Content-Length: %d" % len(body))
        return b"\r\n".join(lines) + b"\r\n\r\n" + body


@pytest.fixture
def s3_uploads(moto_server):
    proxy = S3Uploads(moto_server.endpoint).start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture(params=[pytest.param("s3", marks=pytest.mark.s3), "local"])
def store(request, tmp_path):
    if request.param == "s3":
        proxy = request.getfixturevalue("s3_uploads")
        # no retry budget: moto answers 500 (transient) where S3 answers NoSuchUpload for the
        # completion of an aborted upload, and each such call would be retried for a minute
        s = S3Store(request.getfixturevalue("bucket"), endpoint_url=proxy.endpoint, list_page_size=2,
                    retry_budget=0)
        s.proxy = proxy
    else:
        s = LocalStore(tmp_path / "store", min_part_size=16)
        s.proxy = None
    try:
        yield s
    finally:
        s.close()


def crashed_upload(store, key: str, data: bytes = b"x" * 64) -> str:
    """What a writer killed in the middle of a multipart upload leaves: begun, one part stored,
    never completed nor aborted.  Returns the upload id."""
    up = store.begin_upload(key, {"dsse-test": "1"})
    up.put_part(1, data)
    return up.upload_id


def backdate(store, upload_id: str, seconds: float) -> None:
    """Make an upload look begun ``seconds`` earlier (S3: the time the proxy reports; local: the
    start time in its record)."""
    if store.proxy is not None:
        store.proxy.initiated[upload_id] -= seconds
    else:
        backdate_local(store.root, upload_id, seconds)


def backdate_local(root, upload_id: str, seconds: float) -> None:
    path = os.path.join(root, "uploads", upload_id, "upload.json")
    with open(path) as f:
        record = json.load(f)
    record["started"] -= seconds
    with open(path, "w") as f:
        json.dump(record, f)


def objects(store) -> dict[str, tuple[str, int]]:
    return {o.key: (o.etag, o.size) for o in store.list("", None)}


# ---- the store interface -------------------------------------------------------------------------------

def test_list_uploads_follows_pages_and_abort_discards_one(store):
    store.put("team/kept", b"an object", {})
    before = objects(store)
    t0 = time.time()
    ids = {key: crashed_upload(store, key) for key in ("team/c", "team/a", "team/b/x", "other/d", "team/a")}
    mine = list(store.list_uploads("team/"))
    assert [u.key for u in mine] == ["team/a", "team/a", "team/b/x", "team/c"]  # key order
    assert all(isinstance(u, PendingUpload) and t0 - 5 <= u.initiated <= time.time() + 5 for u in mine)
    key, upload_id, _initiated = mine[-1]  # a plain tuple too
    assert (key, upload_id) == ("team/c", ids["team/c"])
    if store.proxy is not None:
        assert store.proxy.list_pages == 2  # two uploads a page (list_page_size)
    assert len(list(store.list_uploads(""))) == 5
    assert list(store.list_uploads("nothing/")) == []

    store.abort_upload("team/c", ids["team/c"])
    store.abort_upload("team/c", ids["team/c"])  # already gone: not an error
    assert sorted(u.key for u in store.list_uploads("")) == ["other/d", "team/a", "team/a", "team/b/x"]
    assert objects(store) == before  # objects are not uploads


def test_an_aborted_upload_cannot_be_completed_by_its_writer(store):
    up = store.begin_upload("doc", {})
    up.put_part(1, b"y" * 32)
    store.abort_upload("doc", up.upload_id)
    with pytest.raises(StoreError):
        up.complete()
    assert list(store.list_uploads("")) == [] and objects(store) == {}


def test_a_young_upload_survives_the_clean_up_and_completes(store):
    store.put("kept", b"an object", {})
    before = objects(store)
    old = crashed_upload(store, "dir/old")
    backdate(store, old, 2 * DEFAULT_STALE_UPLOAD_AGE)
    reserved = crashed_upload(store, "dir/.dssefs/epochs/x")
    backdate(store, reserved, 2 * DEFAULT_STALE_UPLOAD_AGE)
    first = MIN_PART_SIZE if store.proxy is not None else 16  # S3's smallest part but the last
    live = store.begin_upload("dir/live", {})
    live.put_part(1, b"z" * first)
    result = abort_stale_uploads(store, "")
    assert [(u.key, u.upload_id) for u in result.aborted] == [("dir/old", old)]
    assert (result.kept, result.ignored, result.failed, result.stopped) == (1, 1, 0, False)
    assert sorted(u.key for u in store.list_uploads("")) == ["dir/.dssefs/epochs/x", "dir/live"]
    live.put_part(2, b"w" * 3)
    live.complete()  # another writer's upload in progress is untouched
    assert store.get_range("dir/live", first - 1, 100)[0] == b"z" + b"w" * 3
    assert {k: v for k, v in objects(store).items() if k != "dir/live"} == before


def test_local_upload_with_an_unreadable_record(tmp_path):
    store = LocalStore(tmp_path / "store")
    upload_id = crashed_upload(store, "a/b")
    os.unlink(tmp_path / "store" / "uploads" / upload_id / "upload.json")  # crashed while beginning
    os.utime(tmp_path / "store" / "uploads" / upload_id, (1000.0, 1000.0))
    assert list(store.list_uploads("")) == [PendingUpload("", upload_id, 1000.0)]
    assert list(store.list_uploads("a/")) == []  # its key is not known
    with pytest.raises(StoreError):
        store.abort_upload("a/b", upload_id)  # not what the listing said
    with pytest.raises(StoreError):
        store.abort_upload("a/b", "../objects")  # never a path
    assert abort_stale_uploads(store, "").aborted == [PendingUpload("", upload_id, 1000.0)]
    assert os.listdir(tmp_path / "store" / "uploads") == []


def test_metered_store_counts_listings_and_aborts(tmp_path):
    store = MeteredStore(LocalStore(tmp_path / "store"))
    upload_id = crashed_upload(store, "k")
    assert [u.key for u in store.list_uploads("")] == ["k"]
    store.abort_upload("k", upload_id)
    with pytest.raises(StoreError):
        store.abort_upload("k", "not-an-id")
    s = store.meter.snapshot()
    assert (s["requests"]["list"], s["requests"]["abort_upload"], s["failures"]) == (1, 2, 1)
    assert s["writes_in_flight"] == 1 and s["stale_uploads_aborted"] == 0  # the crashed writer's is not ours


# ---- the clean-up rules ----------------------------------------------------------------------------------

def test_which_keys_are_the_file_systems():
    assert is_file_system_key("team/a/b", "team/")
    assert is_file_system_key("a", "") and is_file_system_key("", "")
    assert not is_file_system_key("teamx/a", "team/") and not is_file_system_key("other/a", "team/")
    assert not is_file_system_key("team/.dssefs/epochs/1", "team/")
    assert not is_file_system_key("team/d/.dssefs/x", "team/")
    assert is_file_system_key("team/.dssefs-conflict/x", "team/")


class Recording(LocalStore):
    """A local store whose aborts fail on demand."""

    fail_with: Exception | None = None

    def abort_upload(self, key, upload_id):
        if self.fail_with is not None and key.endswith("fails"):
            raise self.fail_with
        super().abort_upload(key, upload_id)


def test_clean_up_by_age_prefix_failures_and_stop(tmp_path, caplog):
    store = Recording(tmp_path / "store")
    for key in ("p/a", "p/fails", "p/z", "q/other"):
        crashed_upload(store, key)
    now = time.time() + 100
    with pytest.raises(ValueError):
        abort_stale_uploads(store, "p/", 0)
    with pytest.raises(ValueError):
        abort_stale_uploads(store, "p", 10)
    assert abort_stale_uploads(store, "p/", 1000, now=now).kept == 3  # too young

    store.fail_with = StoreError("disk on fire")
    caplog.set_level("INFO", logger="dssefs.store.uploads")
    result = abort_stale_uploads(store, "p/", 10, now=now)
    assert [u.key for u in result.aborted] == ["p/a", "p/z"] and result.failed == 1
    assert [u.key for u in store.list_uploads("")] == ["p/fails", "q/other"]
    lines = [r.getMessage() for r in caplog.records]
    assert any(re.fullmatch(r"event=stale_upload_aborted store=file://\S+ key=p/a age=1\d\d\.\d upload_id=[0-9a-f]{32}",
                            line) for line in lines), lines
    assert any("event=stale_upload_abort_failed" in line and "key=p/fails" in line and "disk on fire" in line
               for line in lines), lines

    store.fail_with = StoreAccessDenied("no s3:AbortMultipartUpload")
    with pytest.raises(StoreAccessDenied):
        abort_stale_uploads(store, "p/", 10, now=now)

    stop = threading.Event()
    stop.set()
    assert abort_stale_uploads(store, "", 10, now=now, stop=stop).stopped
    assert len(list(store.list_uploads(""))) == 2


# ---- a mount cleans up at start ------------------------------------------------------------------------

AGE = 2.5  # --stale-upload-age (s): longer than a mount takes to start (under 1 s here), so the young
#           upload is still young when the mount lists it; the tests check that they were quick enough


def _wait_for_summary(m, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in m.log().splitlines():
            if "event=stale_uploads " in line or "event=stale_upload_cleanup_failed" in line:
                return line
        time.sleep(0.05)
    raise AssertionError(f"no clean-up summary in the log:\n{m.log()}")


@requires_fuse
@pytest.mark.fuse
@pytest.mark.s3
def test_mount_aborts_its_stale_uploads_on_s3(s3_uploads, mount_factory, bucket, kms_key, tmp_path):
    raw = S3Store(bucket, endpoint_url=s3_uploads.endpoint)
    raw.put("team/plain.bin", b"an object", {})
    raw.put("elsewhere.bin", b"another", {})
    before = objects(raw)
    old = crashed_upload(raw, "team/dir/big.bin", os.urandom(MiB))
    crashed_upload(raw, "team/.dssefs/epochs/0123", b"r")  # dssefs's records: not file system uploads
    crashed_upload(raw, "other/file.bin", b"o")  # outside the mount's prefix
    time.sleep(AGE + 0.2)
    young = raw.begin_upload("team/dir/young.bin", {})  # another client, writing right now
    young.put_part(1, b"y" * (5 * MiB))

    m = mount_factory(tmp_path / "mnt", f"s3://{bucket}/team", "--kms-key-id", kms_key,
                      "--spill-dir", str(tmp_path / "spill"), "--endpoint-url", s3_uploads.endpoint,
                      "--stale-upload-age", str(AGE))
    t0 = time.monotonic()
    m.start()
    summary = _wait_for_summary(m)
    assert "aborted=1 kept=1 failed=0" in summary, m.log()
    assert time.monotonic() - t0 < AGE, "the young upload may have grown old: raise AGE"
    aborted = [line for line in m.log().splitlines() if "event=stale_upload_aborted" in line]
    assert len(aborted) == 1 and f"upload_id={old}" in aborted[0], m.log()
    assert re.search(r"key=team/dir/big\.bin age=\d+\.\d", aborted[0]), aborted[0]
    assert sorted(u.key for u in raw.list_uploads("")) == ["other/file.bin", "team/.dssefs/epochs/0123",
                                                           "team/dir/young.bin"]
    assert m.status()["store"]["stale_uploads_aborted"] == 1
    text = subprocess.run([sys.executable, "-m", "dssefs", "status", str(m.mountpoint)],
                          capture_output=True, text=True, timeout=60).stdout
    assert "1 stale multipart uploads aborted" in text, text
    assert sorted(os.listdir(m.mountpoint)) == ["plain.bin"]  # the mount serves as before
    assert objects(raw) == before  # no object was touched
    young.put_part(2, b"z")
    young.complete()  # the live upload completes
    assert raw.head("team/dir/young.bin").size == 5 * MiB + 1
    assert m.stop() == 0, m.log()


@requires_fuse
@pytest.mark.fuse
def test_mount_aborts_its_stale_uploads_on_a_local_store(mount_factory, local_source, tmp_path):
    source, args = local_source
    raw = LocalStore(tmp_path / "store", min_part_size=16)
    m = mount_factory(tmp_path / "mnt", source, *args, "--stale-upload-age", str(AGE))
    m.start()
    (m / "file.txt").write_bytes(b"stored by dssefs")
    assert m.stop() == 0, m.log()
    before = objects(raw)
    old = crashed_upload(raw, "dir/big.bin", os.urandom(MiB))
    crashed_upload(raw, ".dssefs/epochs/0123", b"r")
    time.sleep(AGE + 0.2)
    young = raw.begin_upload("dir/young.bin", {})
    young.put_part(1, b"y" * 32)

    t0 = time.monotonic()
    m.start()
    summary = _wait_for_summary(m)
    assert "aborted=1 kept=1 failed=0" in summary, m.log()
    assert time.monotonic() - t0 < AGE, "the young upload may have grown old: raise AGE"
    assert f"upload_id={old}" in m.log() and "key=dir/big.bin" in m.log()
    assert sorted(u.key for u in raw.list_uploads("")) == [".dssefs/epochs/0123", "dir/young.bin"]
    assert not (tmp_path / "store" / "uploads" / old).exists()
    assert (m / "file.txt").read_bytes() == b"stored by dssefs"
    assert objects(raw) == before
    young.put_part(2, b"z")
    young.complete()
    assert raw.get_range("dir/young.bin", 0, 100)[0] == b"y" * 32 + b"z"
    assert m.stop() == 0, m.log()


@requires_fuse
@pytest.mark.fuse
def test_read_only_and_disabled_mounts_leave_uploads_alone(mount_factory, local_source, tmp_path):
    source, args = local_source
    raw = LocalStore(tmp_path / "store", min_part_size=16)
    crashed_upload(raw, "dir/big.bin")
    backdate_local(raw.root, next(raw.list_uploads("")).upload_id, 2 * DEFAULT_STALE_UPLOAD_AGE)
    for extra in (["--read-only"], ["--stale-upload-age", "0"]):
        m = mount_factory(tmp_path / "mnt", source, *args, *extra)
        m.start()
        os.listdir(m.mountpoint)
        time.sleep(0.5)
        assert m.stop() == 0, m.log()
        assert "event=stale_upload" not in m.log(), m.log()
        assert [u.key for u in raw.list_uploads("")] == ["dir/big.bin"]
    m = mount_factory(tmp_path / "mnt", source, *args)  # the default: older than a day
    m.start()
    assert "aborted=1 kept=0 failed=0" in _wait_for_summary(m), m.log()
    assert list(raw.list_uploads("")) == []
