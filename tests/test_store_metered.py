"""The metered store: every request counted once by kind, bytes both ways, objects written, writes
in flight back at zero on every path (success, failure, abort), missing objects not counted as
failures; calls and exceptions pass through unchanged."""

from __future__ import annotations

import pytest

from dssefs.errors import ObjectNotFound, PreconditionFailed, StoreUnavailable
from dssefs.store.base import MIN_PART_SIZE
from dssefs.store.local import LocalStore
from dssefs.store.metered import MeteredStore


@pytest.fixture
def store(tmp_path):
    return MeteredStore(LocalStore(str(tmp_path / "store")))


def snap(store):
    return store.meter.snapshot()


def test_requests_bytes_and_objects_are_counted(store):
    etag = store.put("a", b"x" * 1000, {"k": "v"})
    info = store.head("a")
    assert (info.size, info.metadata, info.etag) == (1000, {"k": "v"}, etag)
    assert store.head("a", prefix=10).prefix == b"x" * 10
    data, total = store.get_range("a", 100, 50)
    assert (data, total) == (b"x" * 50, 1000)
    store.copy("a", "b", {"k": "w"})
    assert [i.key for i in store.list("", None)] == ["a", "b"]
    store.delete("b")
    s = snap(store)
    assert s["requests"] == {"head": 1, "get": 2, "put": 1, "upload_part": 0, "complete_upload": 0,
                             "abort_upload": 0, "copy": 1, "delete": 1, "delete_many": 0, "list": 1}
    assert (s["bytes_written"], s["bytes_read"], s["objects_written"]) == (1000, 60, 2)
    assert (s["failures"], s["not_found"], s["writes_in_flight"]) == (0, 0, 0)


def test_multipart_upload_in_flight_until_complete(store):
    up = store.begin_upload("big", {}, size_hint=MIN_PART_SIZE + 10)
    assert snap(store)["writes_in_flight"] == 1
    up.put_part(1, b"p" * MIN_PART_SIZE)
    up.put_part(2, b"q" * 10)
    assert snap(store)["writes_in_flight"] == 1
    up.complete()
    s = snap(store)
    assert (s["writes_in_flight"], s["objects_written"], s["bytes_written"]) == (0, 1, MIN_PART_SIZE + 10)
    assert (s["requests"]["upload_part"], s["requests"]["complete_upload"]) == (2, 1)
    assert store.head("big").size == MIN_PART_SIZE + 10


def test_failures_and_aborts_leave_nothing_in_flight(store):
    store.put("a", b"1", {})
    with pytest.raises(PreconditionFailed):
        store.put("a", b"2", {}, if_none_match=True)
    with pytest.raises(PreconditionFailed):
        store.copy("a", "a", {}, if_match='"not-the-etag"')
    up = store.begin_upload("a", {}, if_match='"not-the-etag"')
    up.put_part(1, b"x")
    with pytest.raises(PreconditionFailed):
        up.complete()  # the condition is checked at completion
    up2 = store.begin_upload("c", {})
    up2.abort()
    s = snap(store)
    assert (s["failures"], s["writes_in_flight"], s["objects_written"]) == (3, 0, 1)
    # failed requests are requests too
    assert {k: s["requests"][k] for k in ("put", "copy", "upload_part", "complete_upload", "abort_upload")} \
        == {"put": 2, "copy": 1, "upload_part": 1, "complete_upload": 1, "abort_upload": 1}
    with pytest.raises(ObjectNotFound):
        store.head("missing")
    with pytest.raises(ObjectNotFound):
        store.get_range("missing", 0, 1)
    s = snap(store)
    assert (s["not_found"], s["failures"]) == (2, 3)  # a missing object is an answer, not a failure
    assert (s["requests"]["head"], s["requests"]["get"]) == (1, 1)


class FailingParts(LocalStore):
    """Fault injection: the store accepts the upload but every part fails (a network error)."""

    def begin_upload(self, *a, **kw):
        inner = super().begin_upload(*a, **kw)

        class Broken:
            def put_part(self, number, data, *, crc32=None):
                raise StoreUnavailable("network down")

            def complete(self):
                return inner.complete()

            def abort(self):
                inner.abort()
        return Broken()


def test_a_failing_part_counts_and_abort_ends_the_write(tmp_path):
    store = MeteredStore(FailingParts(str(tmp_path / "store")))
    up = store.begin_upload("x", {})
    with pytest.raises(StoreUnavailable):
        up.put_part(1, b"data")
    assert snap(store)["writes_in_flight"] == 1  # still open until aborted
    up.abort()
    up.abort()  # twice: counted as requests, but the write ends once
    s = snap(store)
    assert (s["failures"], s["writes_in_flight"], s["bytes_written"], s["objects_written"]) == (1, 0, 0, 0)
    assert s["requests"]["upload_part"] == 1


def test_store_attributes_pass_through(store):
    inner = store.inner
    assert (store.url, store.context_name) == (inner.url, inner.context_name)
    assert store.supports_conditional_writes == inner.supports_conditional_writes
    assert store.parallel_requests == inner.parallel_requests
    assert store.root == inner.root  # store-specific extras stay reachable
