"""A store that counts what passes through it: requests by kind, bytes, failures, writes in flight.

The mount daemon wraps its store in one so that ``dssefs status`` can say what the daemon asks of
S3 (or the local directory) without each layer above keeping its own counters.  Counting happens
on the calling (worker) thread under one lock; nothing else changes: every call is forwarded as
is and every exception propagates unchanged.
"""

from __future__ import annotations

import threading
from typing import Iterator

from ..errors import ObjectNotFound
from .base import DELETE_MANY_MAX, ObjectInfo, ObjectStore, PendingUpload, Upload

REQUESTS = ("head", "get", "put", "upload_part", "complete_upload", "abort_upload", "copy",
            "delete", "delete_many", "list")


class StoreMeter:
    """Thread-safe counters; ``snapshot()`` returns plain numbers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = dict.fromkeys(REQUESTS, 0)
        self.failures = 0  # requests that failed (a missing object is an answer, not a failure)
        self.not_found = 0
        self.bytes_read = 0
        self.bytes_written = 0
        self.objects_written = 0
        self.writes_in_flight = 0  # puts, copies and multipart uploads begun but not finished
        self.stale_uploads_aborted = 0  # crashed writers' multipart uploads aborted (see store.uploads)

    def count(self, kind: str, *, read: int = 0, written: int = 0, n: int = 1) -> None:
        with self._lock:
            self.requests[kind] += n
            self.bytes_read += read
            self.bytes_written += written

    def failed(self, exc: BaseException, kind: str | None = None) -> None:
        """A request of ``kind`` (counted like any other) that raised ``exc``."""
        with self._lock:
            if kind is not None:
                self.requests[kind] += 1
            if isinstance(exc, ObjectNotFound):
                self.not_found += 1
            else:
                self.failures += 1

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def snapshot(self) -> dict:
        with self._lock:
            return {"requests": dict(self.requests), "failures": self.failures, "not_found": self.not_found,
                    "bytes_read": self.bytes_read, "bytes_written": self.bytes_written,
                    "objects_written": self.objects_written, "writes_in_flight": self.writes_in_flight,
                    "stale_uploads_aborted": self.stale_uploads_aborted}


class _MeteredUpload(Upload):
    def __init__(self, inner: Upload, meter: StoreMeter):
        self._inner, self._meter = inner, meter
        self._open = True

    @property
    def upload_id(self) -> str:
        return self._inner.upload_id

    def _finish(self) -> None:
        if self._open:
            self._open = False
            self._meter.add(writes_in_flight=-1)

    def put_part(self, number: int, data: bytes | memoryview) -> None:
        try:
            self._inner.put_part(number, data)
        except BaseException as e:
            self._meter.failed(e, "upload_part")
            raise
        self._meter.count("upload_part", written=len(data))

    def complete(self) -> str:
        try:
            etag = self._inner.complete()
        except BaseException as e:
            self._meter.failed(e, "complete_upload")
            self._finish()
            raise
        self._meter.count("complete_upload")
        self._meter.add(objects_written=1)
        self._finish()
        return etag

    def abort(self) -> None:
        self._meter.count("abort_upload")
        self._finish()
        self._inner.abort()


class MeteredStore(ObjectStore):
    """Forwards every call to ``inner`` and counts it in ``meter``."""

    def __init__(self, inner: ObjectStore, meter: StoreMeter | None = None):
        self._wrapping(inner)
        self.meter = meter or StoreMeter()

    def _failed(self, exc: BaseException, kind: str | None = None) -> None:
        self.meter.failed(exc, kind)

    def head(self, key: str, *, prefix: int = 0) -> ObjectInfo:
        try:
            info = self.inner.head(key, prefix=prefix)
        except BaseException as e:
            self._failed(e, "get" if prefix else "head")
            raise
        self.meter.count("get" if prefix else "head", read=len(info.prefix or b""))
        return info

    def get_range(self, key: str, start: int, length: int, *, if_match: str | None = None
                  ) -> tuple[bytes, int]:
        try:
            data, total = self.inner.get_range(key, start, length, if_match=if_match)
        except BaseException as e:
            self._failed(e, "get")
            raise
        self.meter.count("get", read=len(data))
        return data, total

    def _write(self, kind: str, call, size: int = 0) -> str:
        self.meter.add(writes_in_flight=1)
        try:
            etag = call()
        except BaseException as e:
            self._failed(e, kind)
            raise
        finally:
            self.meter.add(writes_in_flight=-1)
        self.meter.count(kind, written=size)
        self.meter.add(objects_written=1)
        return etag

    def put(self, key: str, body: bytes | memoryview, metadata: dict[str, str], *,
            if_match: str | None = None, if_none_match: bool = False, crc32: int | None = None) -> str:
        return self._write("put", lambda: self.inner.put(key, body, metadata, if_match=if_match,
                                                          if_none_match=if_none_match, crc32=crc32), len(body))

    def begin_upload(self, key: str, metadata: dict[str, str], *,
                     if_match: str | None = None, if_none_match: bool = False,
                     size_hint: int | None = None) -> Upload:
        try:
            upload = self.inner.begin_upload(key, metadata, if_match=if_match, if_none_match=if_none_match,
                                             size_hint=size_hint)
        except BaseException as e:
            self._failed(e)
            raise
        self.meter.add(writes_in_flight=1)
        return _MeteredUpload(upload, self.meter)

    def copy(self, src: str, dst: str, metadata: dict[str, str], *,
             if_match: str | None = None, if_none_match: bool = False) -> str:
        return self._write("copy", lambda: self.inner.copy(src, dst, metadata, if_match=if_match,
                                                            if_none_match=if_none_match))

    def delete(self, key: str) -> None:
        try:
            self.inner.delete(key)
        except BaseException as e:
            self._failed(e, "delete")
            raise
        self.meter.count("delete")

    def delete_many(self, keys) -> list:
        """Counted as one ``delete_many`` request per 1000 keys (S3's DeleteObjects); keys the
        store could not delete count one failure per call."""
        keys = list(keys)
        if not keys:
            return []
        many = getattr(self.inner, "delete_many", None)
        try:
            failures = many(keys) if many is not None else ObjectStore.delete_many(self.inner, keys)
        except BaseException as e:
            self._failed(e, "delete_many")
            raise
        self.meter.count("delete_many", n=-(-len(keys) // DELETE_MANY_MAX))
        if failures:
            self._failed(failures[0][1])
        return failures

    def list(self, prefix: str = "", delimiter: str | None = "/") -> Iterator[ObjectInfo | str]:
        self.meter.count("list")
        try:
            yield from self.inner.list(prefix, delimiter)
        except GeneratorExit:
            raise
        except BaseException as e:
            self._failed(e)
            raise

    def list_uploads(self, prefix: str = "") -> Iterator[PendingUpload]:
        self.meter.count("list")
        try:
            yield from self.inner.list_uploads(prefix)
        except GeneratorExit:
            raise
        except BaseException as e:
            self._failed(e)
            raise

    def abort_upload(self, key: str, upload_id: str) -> None:
        try:
            self.inner.abort_upload(key, upload_id)
        except BaseException as e:
            self._failed(e, "abort_upload")
            raise
        self.meter.count("abort_upload")

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str):
        # store-specific extras (e.g. a local store's root) stay reachable
        return getattr(self.inner, name)
