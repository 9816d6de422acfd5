"""The object store interface: what the layers above need from S3 or a local directory.

Implementations are synchronous and thread-safe; callers run them in worker threads.  Keys are
``/``-separated strings without a leading slash.  User metadata is a ``dict[str, str]`` of
lowercase ASCII keys without the ``x-amz-meta-`` prefix and ASCII values.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Iterable, Iterator, NamedTuple

from ..errors import DssefsError

# S3 caps user-defined metadata at 2 KB, counted as the UTF-8 bytes of keys (without the
# ``x-amz-meta-`` prefix) plus values.
METADATA_LIMIT = 2048

#: Parts of a multipart upload other than the last must be at least this large (S3 rule).
MIN_PART_SIZE = 5 * 1024 * 1024

#: Keys per DeleteObjects request (S3's limit); :meth:`ObjectStore.delete_many` splits larger sets.
DELETE_MANY_MAX = 1000


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    mtime: float
    metadata: dict[str, str] = field(default_factory=dict)
    #: the body's first bytes, when ``head(key, prefix=n)`` asked for them (None otherwise)
    prefix: bytes | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Listing:
    """One page-independent listing result: objects directly under the prefix and sub-prefixes."""

    objects: list[ObjectInfo]  # metadata is NOT populated by list (S3 does not return it)
    prefixes: list[str]  # each ends with the delimiter


class PendingUpload(NamedTuple):
    """A multipart upload begun and neither completed nor aborted, by any writer."""

    key: str
    upload_id: str
    #: when it was begun, in epoch seconds by the store's clock
    initiated: float


class Upload(abc.ABC):
    """A multipart upload in progress.  ``put_part`` may be called from several threads at once."""

    #: the store's id of the upload, as :meth:`ObjectStore.list_uploads` reports it
    upload_id: str

    @abc.abstractmethod
    def put_part(self, number: int, data: bytes | memoryview) -> None:
        """Store part ``number`` (1-based, contiguous); all parts but the last >= MIN_PART_SIZE."""

    @abc.abstractmethod
    def complete(self) -> str:
        """Make the object visible atomically; returns its ETag."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Discard the parts; never raises."""


class ObjectStore(abc.ABC):
    #: Name bound into key-wrapping contexts (the bucket for S3; ``local`` for a directory).
    context_name: str
    #: Human-readable location for messages, e.g. ``s3://bucket`` or ``file:///srv/data``.
    url: str
    #: Whether put/copy honour ``if_match`` / ``if_none_match``.
    supports_conditional_writes: bool = True
    #: Whether concurrent requests finish sooner than the same requests one after another (a
    #: network store: each request mostly waits).  A local directory's requests mostly compute in
    #: Python, so concurrent ones would only take turns holding the GIL.
    parallel_requests: bool = True
    #: Longest name between two '/' of a key the store can hold, in UTF-8 bytes (None: no limit
    #: below S3's 1024-byte keys).  The file system refuses longer names when they are created.
    max_segment_bytes: int | None = None

    @abc.abstractmethod
    def head(self, key: str, *, prefix: int = 0) -> ObjectInfo:
        """Size, ETag, mtime and user metadata; raises ObjectNotFound.

        ``prefix > 0`` also returns up to that many first bytes of the body in ``info.prefix``,
        in the same request (a ranged GET on S3): small objects are read whole by their probe."""

    @abc.abstractmethod
    def get_range(self, key: str, start: int, length: int, *, if_match: str | None = None
                  ) -> tuple[bytes, int]:
        """Return ``(data, total_size)`` for bytes ``[start, start+length)``.

        ``total_size`` is the whole object's size as the store reports it (S3: from
        ``Content-Range``) so readers can detect truncation.  Short data means the object ended.
        """

    @abc.abstractmethod
    def put(self, key: str, body: bytes | memoryview, metadata: dict[str, str], *,
            if_match: str | None = None, if_none_match: bool = False, crc32: int | None = None) -> str:
        """Store an object in one request; returns the new ETag.

        ``if_match``: fail with PreconditionFailed unless the current ETag equals it.
        ``if_none_match``: fail with PreconditionFailed if the key exists.
        ``crc32``: the CRC32 of ``body`` when the caller has it (computed while sealing); a store
        that sends a checksum with the body uses it instead of reading the body once more.
        """

    @abc.abstractmethod
    def begin_upload(self, key: str, metadata: dict[str, str], *,
                     if_match: str | None = None, if_none_match: bool = False,
                     size_hint: int | None = None) -> Upload:
        """Start a multipart upload; conditions are checked when it completes.  ``size_hint``:
        the expected total size, if known (a local store reserves the space in one piece)."""

    @abc.abstractmethod
    def copy(self, src: str, dst: str, metadata: dict[str, str], *,
             if_match: str | None = None, if_none_match: bool = False) -> str:
        """Server-side copy of the body with metadata replaced; ``if_match`` applies to ``src``
        when ``src == dst`` and to ``dst`` otherwise.  Returns the new ETag."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Delete; deleting a missing key is not an error."""

    def delete_many(self, keys: Iterable[str]) -> list[tuple[str, DssefsError]]:
        """Delete several keys (missing ones are not an error) and return the keys that were not
        deleted, each with its error, in the order given.  Never raises a DssefsError: a request
        that failed as a whole reports its error for every key it carried.  This default deletes
        one key at a time; S3 sends DeleteObjects requests of up to :data:`DELETE_MANY_MAX` keys."""
        failures: list[tuple[str, DssefsError]] = []
        for key in keys:
            try:
                self.delete(key)
            except DssefsError as e:
                failures.append((key, e))
        return failures

    @abc.abstractmethod
    def list(self, prefix: str = "", delimiter: str | None = "/") -> Iterator[ObjectInfo | str]:
        """Yield ObjectInfo (without metadata) for objects and ``str`` for common prefixes, in key
        order, following pagination.  With ``delimiter=None`` the listing is recursive."""

    @abc.abstractmethod
    def list_uploads(self, prefix: str = "") -> Iterator[PendingUpload]:
        """Yield the multipart uploads in progress whose keys start with ``prefix`` (every
        writer's, not only this process's: a crashed writer's stay until aborted), in key order,
        following pagination.  Nothing tells which writer began an upload, only when."""

    @abc.abstractmethod
    def abort_upload(self, key: str, upload_id: str) -> None:
        """Abort an upload :meth:`list_uploads` reported and discard its parts.  An upload that is
        already gone (completed or aborted meanwhile) is not an error.  A writer still using it
        fails at its next part or at completion."""

    def _wrapping(self, inner: "ObjectStore") -> None:
        """This store forwards to ``inner`` (a layer in front of it): it names the same store and
        has the same abilities."""
        self.inner = inner
        self.context_name = inner.context_name
        self.url = inner.url
        self.supports_conditional_writes = getattr(inner, "supports_conditional_writes", True)
        self.parallel_requests = getattr(inner, "parallel_requests", True)
        self.max_segment_bytes = getattr(inner, "max_segment_bytes", None)

    def close(self) -> None:  # pragma: no cover - optional
        pass

    def __enter__(self) -> "ObjectStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
