"""Write-behind: a new version sealed and uploaded while the file is still being written.

docs/format.md 17.3 ("Stream") and 17.11.  A :class:`StreamWriter` draws the message id, the file
id and both data keys when it is made (a :class:`~.draft.DraftVersion`); chunk ``i`` is sealed with ``final = 0`` (under a draft
header whose length is larger than any chunk index it seals) once the caller knows its bytes are
complete and more follow, and uploaded as a part of a multipart upload to a **staging key**
(``P/.dssefs/staging/<32 hex>``, no metadata).  :meth:`StreamWriter.finish` seals the remaining
chunks under the real header (same message id, so the same content keys; the last chunk with
``final = 1``), completes the staging upload, and stores the version with one server-side copy
of the staging object to the file's key with the final metadata (conditional exactly like an
ordinary write: ``If-Match`` / ``If-None-Match``), then deletes the staging object.  So the file's
key changes once, to the complete version with its metadata; a crash leaves only the staging
upload or object, which the mount's stale-upload clean-up removes (:mod:`dssefs.store.uploads`).

Rules kept here: each chunk index is sealed at most once per message id (parts are claimed in
order, never sealed twice, and the tail is sealed only past them); a writer that must change a
sealed chunk abandons the stream (:meth:`abort`) and the caller stores the file the ordinary way,
under a new message id.  Nothing is written to local disk.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import threading

from .. import envelope
from ..errors import ObjectNotFound, StoreError
from ..store.base import Upload
from ..store.uploads import STAGING_DIR
from .draft import DraftVersion
from .vault import OpenObject, Source, Vault

log = logging.getLogger(__name__)

#: S3 allows 10,000 parts; a stream that would need more is abandoned (stored the ordinary way).
MAX_STREAM_PARTS = 9000


def staging_key(prefix: str) -> str:
    """A fresh staging key below ``prefix`` (a mount's prefix: ``""`` or ending in ``/``)."""
    return f"{prefix}{STAGING_DIR}{os.urandom(16).hex()}"


class StreamUnusable(Exception):
    """The stream cannot produce the version asked for (store it the ordinary way)."""


class StreamWriter:
    """One streamed version.  ``put_part`` runs in worker threads (several at once); ``claim``,
    ``finish`` and ``abort`` are called by the one owner of the stream."""

    def __init__(self, vault: Vault, staging: str, *, chunk_log2: int, file_id: bytes | None = None):
        self.version = DraftVersion(vault, chunk_log2=chunk_log2, file_id=file_id)
        self.vault, self.store, self.staging = vault, vault.store, staging
        self.cs = self.version.cs
        self.per_part = max(1, -(-vault.part_size // self.cs))
        self.next_chunk = 0  # chunks [0, next_chunk) are claimed by parts 1..parts
        self.parts = 0
        self._lock = threading.Lock()
        self._upload: Upload | None = None
        self._state = "open"  # open -> finishing -> done | aborted
        self._completed = False  # the staging object exists
        self.failed: BaseException | None = None

    def __repr__(self) -> str:
        return f"StreamWriter({self.staging!r}, parts={self.parts}, <keys redacted>)"

    # ---- parts while the file is written ---------------------------------------------------------

    def claim(self, chunks: range) -> int | None:
        """Reserve ``chunks`` (the next ``per_part`` chunks, all complete, more bytes known to
        follow) for the next part; returns its number, or None when the stream holds no more."""
        if chunks.start != self.next_chunk or len(chunks) != self.per_part:
            raise ValueError(f"part must be chunks {self.next_chunk}..+{self.per_part}")
        if self.parts + 1 > MAX_STREAM_PARTS or self._state != "open":
            return None
        self.parts += 1
        self.next_chunk = chunks.stop
        return self.parts

    def _begin(self) -> Upload:
        with self._lock:
            if self._state != "open":
                raise StoreError(f"{self.store.url}/{self.staging}: stream already {self._state}")
            if self._upload is None:
                self._upload = self.store.begin_upload(self.staging, {})
            return self._upload

    def put_part(self, number: int, chunks: range, source: Source) -> None:
        """Seal ``chunks`` (claimed as part ``number``) with ``final = 0`` and upload them.  A
        failure is kept in :attr:`failed` (and raised)."""
        try:
            upload = self._begin()
            body = self.vault._seal_chunks(self.version.draft, list(chunks), source, None)
            upload.put_part(number, body)
        except BaseException as e:
            with self._lock:
                if self.failed is None:
                    self.failed = e
            raise

    # ---- the end ----------------------------------------------------------------------------------

    def finish(self, key: str, size: int, source: Source, *, attrs: bytes | None, generation: int,
               if_match: str | None = None, if_none_match: bool = False) -> OpenObject:
        """Seal the rest (the last chunk final), complete the staging upload and copy it to
        ``key`` with the version's metadata, conditionally; returns the stored version opened.
        Every part must have been uploaded (their futures done).  On failure the staging upload
        or object is removed and the error raised; :class:`StreamUnusable` when this stream
        cannot hold ``size`` bytes (nothing was stored)."""
        with self._lock:
            if self._state != "open":
                raise StreamUnusable(f"stream already {self._state}")
            if self.failed is not None:
                raise StreamUnusable(f"a part failed: {self.failed}")
            if size <= self.next_chunk * self.cs:
                raise StreamUnusable("the file ends within the parts already sealed")
            self._state = "finishing"
        vault, version = self.vault, self.version
        try:
            version.check_key(key)
            cipher = version.final(size, generation=generation, with_attrs=attrs is not None)
            self._upload_tail(cipher, source)
            upload = self._upload
            body_size = cipher.body_size
            try:
                upload.complete()
            except StoreError:
                # a completion whose reply was lost is answered NoSuchUpload when retried
                try:
                    info = self.store.head(self.staging)
                except (ObjectNotFound, StoreError):
                    info = None
                if info is None or info.size != body_size:
                    raise
            self._completed = True
            keys, env = version.envelope(key, cipher, attrs)
            meta = env.to_metadata()
            etag = vault._store_write(key, meta, lambda: self.store.copy(
                self.staging, key, meta, if_match=if_match, if_none_match=if_none_match))
        except BaseException:
            self._state = "open"
            self.abort()
            raise
        self._state = "done"
        try:  # housekeeping, off the caller's path (a later mount removes what is left)
            vault.pool.submit(self._drop_staging)
        except RuntimeError:  # the pool is shut down
            self._drop_staging()
        return version.opened(key, cipher, keys, env, meta, etag)

    def _upload_tail(self, cipher: envelope.ObjectCipher, source: Source) -> None:
        """Seal chunks ``next_chunk .. n-1`` under the final header and upload them as the last
        parts (several, in parallel, when the tail is long)."""
        tail = list(range(self.next_chunk, cipher.n_chunks))
        runs = [tail[s:s + self.per_part] for s in range(0, len(tail), self.per_part)]
        if self._upload is None:
            with self._lock:
                self._upload = self.store.begin_upload(self.staging, {})
        upload = self._upload
        first = self.parts + 1
        if first + len(runs) - 1 > 10000:
            raise StreamUnusable("too many parts")

        def part(k: int) -> None:
            body = self.vault._seal_chunks(cipher, runs[k], source, None)
            upload.put_part(first + k, body)

        if len(runs) == 1:
            part(0)
            return
        sem = threading.BoundedSemaphore(self.vault.workers)
        futures = []

        def bounded(k: int) -> None:
            try:
                part(k)
            finally:
                sem.release()

        try:
            for k in range(len(runs)):
                sem.acquire()
                if any(f.done() and f.exception() for f in futures):
                    sem.release()
                    break
                futures.append(self.vault.pool.submit(bounded, k))
            for f in futures:
                f.result()
        except BaseException:
            for f in futures:
                f.cancel()
            cf.wait(futures)
            raise

    def abort(self) -> None:
        """Abandon the stream: abort the staging upload, delete a completed staging object.
        Never raises (what it cannot remove the stale-upload clean-up of a later mount does)."""
        with self._lock:
            if self._state in ("aborted", "done", "finishing"):
                return
            self._state = "aborted"
            upload, completed = self._upload, self._completed
        if upload is not None and not completed:
            try:
                upload.abort()
            except Exception as e:  # noqa: BLE001 - abort never raises by contract; be safe
                log.warning("event=stream_abort_failed object=%s/%s reason=%s", self.store.url.rstrip("/"),
                            self.staging, e)
        if completed:
            self._drop_staging()

    def _drop_staging(self) -> None:
        try:
            self.store.delete(self.staging)
        except Exception as e:  # noqa: BLE001 - housekeeping: a later mount removes it
            log.warning("event=staging_delete_failed object=%s/%s reason=%s", self.store.url.rstrip("/"),
                        self.staging, e)
