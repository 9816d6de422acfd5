"""Multipart uploads that crashed writers left behind: find them and abort them.

A daemon killed during a multipart upload (SIGKILL, the OOM killer, a power cut) never completes
or aborts it, and S3 keeps its parts, and bills them, until the upload is aborted (or a bucket
lifecycle rule does it).  Nothing in a listing of uploads says which writer began one: S3's
ListMultipartUploads gives the key, the upload id and the time it was begun, not the metadata the
writer sent.  So an upload counts as dssefs's own, and abandoned, when

* its key is under the mount's prefix (the file system's objects), and not under a ``.dssefs``
  component (dssefs's own records, which are never written in parts);
* it was begun more than ``max_age`` seconds ago (``stale_upload_age``, default one day).  A live
  upload of dssefs lasts as long as storing one file takes; ``max_age`` must be longer than the
  longest such upload, so another client's upload in progress is never aborted.

Write-behind (docs/format.md 17.11) uploads a file being written to a staging key
``<prefix>.dssefs/staging/<32 hex>`` and copies it to the file's key at close.  A crash leaves that
upload, or the completed staging object: both are removed here under the same age rule (the
uploads with the others; the objects with one listing of the staging directory).

:func:`abort_stale_uploads` is what the mount daemon runs once it serves (in a worker thread), and
what a command can run on a store directly.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from ..errors import DssefsError, StoreAccessDenied
from .base import ObjectStore, PendingUpload

__all__ = ["DEFAULT_STALE_UPLOAD_AGE", "STAGING_DIR", "StaleUploads", "abort_stale_uploads", "is_file_system_key",
           "is_staging_key"]

log = logging.getLogger("dssefs.store.uploads")

#: Uploads begun longer ago than this (seconds) are abandoned: no upload of dssefs lasts a day.
DEFAULT_STALE_UPLOAD_AGE = 86400.0
#: The reserved name below which dssefs keeps its own records (never a file system entry).
RESERVED = ".dssefs"
#: Below a mount's prefix: the staging keys of write-behind (objects and uploads, never files).
STAGING_DIR = RESERVED + "/staging/"


@dataclass
class StaleUploads:
    """What one clean-up found."""

    aborted: list[PendingUpload] = field(default_factory=list)
    kept: int = 0  # the file system's uploads begun less than max_age ago (possibly live)
    ignored: int = 0  # under the prefix, but not the file system's (below .dssefs)
    failed: int = 0  # aborts that failed (logged each)
    staging_deleted: list[str] = field(default_factory=list)  # stale write-behind staging objects
    stopped: bool = False  # asked to stop before the listing was done


def is_file_system_key(key: str, prefix: str) -> bool:
    """Whether ``key`` names a file system entry of a mount of ``prefix`` (``""`` or ending in
    ``/``): under the prefix and not under a ``.dssefs`` component.  A local store's upload whose
    record is unreadable has the key ``""``: it counts as one when the prefix is ``""``."""
    if not key.startswith(prefix):
        return False
    return RESERVED not in key[len(prefix):].split("/")


def is_staging_key(key: str, prefix: str) -> bool:
    """Whether ``key`` is a write-behind staging key of a mount of ``prefix``."""
    rest = key[len(prefix):] if key.startswith(prefix) else None
    return rest is not None and rest.startswith(STAGING_DIR) and "/" not in rest[len(STAGING_DIR):] \
        and len(rest) > len(STAGING_DIR)


def _printable(key: str) -> str:
    return key if key and key.isprintable() and " " not in key else repr(key)


def abort_stale_uploads(store: ObjectStore, prefix: str, max_age: float = DEFAULT_STALE_UPLOAD_AGE, *,
                        now: float | None = None, stop: threading.Event | None = None) -> StaleUploads:
    """Abort the multipart uploads under ``prefix`` (a mount's: ``""`` or ending in ``/``) begun
    more than ``max_age`` seconds before ``now`` (default: the current time), except those
    under a ``.dssefs`` component.  Logs ``event=stale_upload_aborted`` per upload and returns
    what it did.  One listing (all its pages) and one request per aborted upload.

    A failing listing raises (StoreError, ...).  A failing abort is logged and counted, and the
    others are still tried, except when access is denied: that raises StoreAccessDenied at
    once.  ``stop``: checked between uploads; when set, the clean-up ends early."""
    if not max_age > 0:
        raise ValueError("max_age must be greater than 0 seconds")
    if prefix and not prefix.endswith("/"):
        raise ValueError("prefix must be empty or end with '/'")
    now = time.time() if now is None else now
    result = StaleUploads()
    where = store.url.rstrip("/")
    for upload in store.list_uploads(prefix):
        if stop is not None and stop.is_set():
            result.stopped = True
            break
        if not (is_file_system_key(upload.key, prefix) or is_staging_key(upload.key, prefix)):
            result.ignored += 1
            continue
        age = now - upload.initiated
        if age <= max_age:
            result.kept += 1
            continue
        try:
            store.abort_upload(upload.key, upload.upload_id)
        except StoreAccessDenied:
            raise
        except DssefsError as e:
            result.failed += 1
            log.warning("event=stale_upload_abort_failed store=%s key=%s upload_id=%s age=%.1f reason=%s",
                        where, _printable(upload.key), upload.upload_id, age, e)
            continue
        result.aborted.append(upload)
        log.info("event=stale_upload_aborted store=%s key=%s age=%.1f upload_id=%s", where,
                 _printable(upload.key), age, upload.upload_id)
    if not result.stopped:
        _delete_stale_staging(store, prefix, now - max_age, result, where)
    return result


def _delete_stale_staging(store: ObjectStore, prefix: str, before: float, result: StaleUploads, where: str) -> None:
    """Delete the completed staging objects (a crash between completing a staged upload and
    copying it to the file's key) older than ``before``."""
    stale = [o.key for o in store.list(prefix + STAGING_DIR, delimiter=None)
             if not isinstance(o, str) and is_staging_key(o.key, prefix) and o.mtime < before]
    if not stale:
        return
    failures = dict(store.delete_many(stale))
    for key in stale:
        if key in failures:
            result.failed += 1
            log.warning("event=stale_staging_delete_failed store=%s key=%s reason=%s", where, _printable(key),
                        failures[key])
        else:
            result.staging_deleted.append(key)
            log.info("event=stale_staging_deleted store=%s key=%s", where, _printable(key))
