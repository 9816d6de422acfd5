"""A local directory as an :class:`~dssefs.store.base.ObjectStore`, with S3's semantics.

Layout
------
::

    ROOT/.dssefs-store          marker: {"format": "dssefs-local-store", "version": 1}
    ROOT/objects/               the objects, one file each
    ROOT/uploads/<id>/          multipart uploads in progress (``upload.json``: key and start
                                time; ``body``: the object file being built, parts at their final
                                offsets; <n>.part: parts that did not fit)
    ROOT/locks/<nn>.lock        64 lock files, picked by a hash of the key

An object key is split at ``/``; every segment but the last becomes a directory named
``<segment>.d`` and the last a file named ``<segment>.o``.  So key ``a`` is ``objects/a.o`` and
key ``a/b`` is ``objects/a.d/b.o``: both can exist, as on S3, and no key maps onto another's file
(files and directories carry different suffixes; ``.``, ``..`` and empty segments become the
ordinary names ``..o``, ``...d``, ``.d``).  Segments may be at most 253 UTF-8 bytes
(``ENAMETOOLONG`` otherwise).  The file system must be case-sensitive (checked when opening).
Anything without one of the two suffixes (temporary files end in ``.tmp``) is ignored.

Object file
-----------
One file holds the metadata and the body, so both change together with one ``rename``::

    "DSSEOBJ1" | u32 big-endian n | n bytes of JSON | body
    JSON: {"etag": "\\"<32 hex>\\"", "size": <body bytes>, "mtime": <epoch>, "metadata": {...}}

The JSON may be followed by spaces (counted in n): a multipart upload reserves room for the header
in front of its parts and pads the header it finally writes to that size.

A reader opens the file once and reads header and body from that descriptor, so it always sees
one consistent version even while a writer replaces it.  The ETag is a fresh random token on every
put, copy and completed upload.  A file whose length disagrees with its header is reported as
corrupt.

Crash safety
------------
Writes go to ``.<random>.tmp`` in the target directory (a multipart upload: to
``uploads/<id>/body``, on the same file system), are ``fsync``-ed, renamed over the object
under the key's lock and the directory is ``fsync``-ed; new directories are ``fsync``-ed into
their parents.  A writer killed at any point leaves either the old or the new object, plus at
worst a temporary file or upload directory that listings ignore and :meth:`LocalStore.sweep`
removes.

Conditional writes
------------------
The check of ``if_match`` / ``if_none_match`` and the rename run while holding both a
per-process ``threading.Lock`` and an ``fcntl.flock`` on the key's lock file (opened afresh each
time, so forked processes do not share it).  Every mutation takes the lock, so a conditional
write can never overwrite a version it has not seen, across threads and processes on one host
(``flock`` over NFS depends on the server's lock support).

Errors: missing object → ObjectNotFound; ``ENOSPC`` / ``EDQUOT`` → StoreFull; ``EACCES`` /
``EPERM`` / ``EROFS`` → StoreAccessDenied; a lost condition → PreconditionFailed; other ``OSError``
→ StoreError with the errno.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as _errno
import fcntl
import hashlib
import json
import logging
import mmap
import os
import re
import secrets
import shutil
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from ..errors import (ConfigError, DssefsError, ObjectNotFound, PreconditionFailed,
                      StoreAccessDenied, StoreError, StoreFull)
from ._common import (check_conditions, check_key, check_part_number, check_parts, check_range,
                      normalize_metadata, one_line, strip_etag)
from .base import MIN_PART_SIZE, ObjectInfo, ObjectStore, PendingUpload, Upload

__all__ = ["LocalStore", "LocalUpload", "MARKER", "is_local_store"]

log = logging.getLogger(__name__)

MARKER = ".dssefs-store"
FORMAT = "dssefs-local-store"
VERSION = 1
OBJECTS = "objects"
UPLOADS = "uploads"
LOCKS = "locks"
FILE_SUFFIX = ".o"
DIR_SUFFIX = ".d"
TMP_SUFFIX = ".tmp"
MAGIC = b"DSSEOBJ1"
_PREFIX = struct.Struct(">8sI")
MAX_HEADER = 64 * 1024
MAX_SEGMENT_BYTES = 255 - len(FILE_SUFFIX)
LOCK_STRIPES = 64
_IO_CHUNK = 1 << 30  # Linux moves at most ~2 GiB per read/write call
# Multipart bodies are written with O_DIRECT where the file system allows it (ext4, xfs; not
# tmpfs): buffered writes of a GiB-sized upload cost 2-4 s of kernel time copying into the page
# cache on the development machine, direct ones 0.05 s.  Writes are aligned to this many bytes.
_DIRECT_ALIGN = 4096
_DIRECT_MIN = 1 << 20  # smaller parts are written through the page cache
_COPY_CHUNK = 8 << 20
_HEAD_READ = 4096
UPLOAD_RECORD = "upload.json"
_UPLOAD_ID_RE = re.compile(r"^[0-9a-f]{32}$")


def is_local_store(path: str | os.PathLike) -> bool:
    """Whether ``path`` is the root of a local store (holds the marker file)."""
    return os.path.isfile(os.path.join(os.fspath(path), MARKER))


@dataclass(frozen=True)
class _Header:
    etag: str
    size: int
    mtime: float
    metadata: dict[str, str]
    offset: int  # where the body starts in the file


def _new_etag() -> str:
    return f'"{secrets.token_hex(16)}"'


def _encode_header(etag: str, size: int, mtime: float, metadata: dict[str, str]) -> bytes:
    blob = json.dumps({"etag": etag, "size": size, "mtime": mtime, "metadata": metadata},
                      separators=(",", ":"), sort_keys=True).encode("ascii")
    return _PREFIX.pack(MAGIC, len(blob)) + blob


def _as_bytes_view(data: bytes | bytearray | memoryview) -> memoryview:
    mv = memoryview(data)
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    return mv


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    pos = 0
    while pos < len(data):
        pos += os.pwrite(fd, data[pos:pos + _IO_CHUNK], offset + pos)


def _pread_exact(fd: int, n: int, offset: int) -> bytearray:
    """Exactly ``n`` bytes at ``offset``, read straight into a (writable) bytearray."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = os.preadv(fd, [view[got:got + min(n - got, _IO_CHUNK)]], offset + got)
        if k == 0:
            raise EOFError
        got += k
    return buf


def _copy_range(src_fd: int, src_off: int, dst_fd: int, dst_off: int, count: int) -> None:
    """Copy ``count`` bytes between files: ``copy_file_range`` (reflinks where the file system
    offers them), falling back to pread/pwrite.  Raises EOFError if the source is short."""
    cfr = getattr(os, "copy_file_range", None)
    while count > 0 and cfr is not None:
        try:
            n = cfr(src_fd, dst_fd, min(count, _IO_CHUNK), src_off, dst_off)
        except OSError as e:
            if e.errno in (_errno.EXDEV, _errno.ENOSYS, _errno.EINVAL, _errno.EOPNOTSUPP,
                           _errno.EPERM, _errno.ETXTBSY):
                break
            raise
        if n == 0:
            break
        src_off, dst_off, count = src_off + n, dst_off + n, count - n
    while count > 0:
        chunk = os.pread(src_fd, min(count, _COPY_CHUNK), src_off)
        if not chunk:
            raise EOFError
        _pwrite_all(dst_fd, memoryview(chunk), dst_off)
        src_off, dst_off, count = src_off + len(chunk), dst_off + len(chunk), count - len(chunk)


def _fsync_dir(path: str, *, missing_ok: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        if missing_ok:  # removed meanwhile: its removal is recorded in its parent instead
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _decode_segment(name: str, suffix: str) -> str | None:
    seg = name[: -len(suffix)]
    try:
        seg.encode("utf-8")  # names that are not valid UTF-8 are not ours
    except UnicodeEncodeError:
        return None
    return seg


class LocalStore(ObjectStore):
    """A directory holding objects with S3 semantics; see the module docstring for the layout."""

    context_name = "local"
    max_segment_bytes = 253  # 255 minus the ".o" / ".d" suffix of the file it becomes
    supports_conditional_writes = True
    parallel_requests = False  # requests compute (file I/O, JSON) more than they wait

    def __init__(self, root: str | os.PathLike, *, create: bool = True,
                 min_part_size: int = MIN_PART_SIZE, fsync: bool = True):
        """Open the store at ``root``.

        ``create``: make ``root`` (mode 0700) and the layout when the marker is missing;
        otherwise a directory without the marker is refused with ConfigError.
        ``min_part_size``: S3's rule for multipart uploads (lower it only in tests).
        ``fsync``: durability of every write; turn off only for throw-away stores.
        """
        self.root = os.path.abspath(os.fspath(root))
        self.url = f"file://{self.root}"
        self.min_part_size = min_part_size
        self._fsync = fsync
        self._objects = os.path.join(self.root, OBJECTS)
        self._uploads = os.path.join(self.root, UPLOADS)
        self._locks_dir = os.path.join(self.root, LOCKS)
        self._thread_locks = [threading.Lock() for _ in range(LOCK_STRIPES)]
        with self._fs_errors("open", None):
            self._open_layout(create)

    # ------------------------------------------------------------------------------------------
    # Set-up

    def _open_layout(self, create: bool) -> None:
        marker = os.path.join(self.root, MARKER)
        try:
            with open(marker, "rb") as f:
                info = json.loads(f.read(4096) or b"{}")
        except FileNotFoundError:
            info = None
        except (ValueError, UnicodeDecodeError):
            raise ConfigError(f"{marker} is unreadable: not a dssefs local store, or damaged")
        except NotADirectoryError:
            raise ConfigError(f"{self.root} is not a directory: give a directory for the store")
        if info is None:
            if not create:
                raise ConfigError(f"{self.root} is not a dssefs local store (no {MARKER}): "
                                  "check the path or create the store first")
            self._create_layout(marker)
        elif not isinstance(info, dict) or info.get("format") != FORMAT:
            raise ConfigError(f"{marker} does not describe a dssefs local store")
        elif info.get("version") != VERSION:
            raise ConfigError(f"{self.root}: local store version {info.get('version')!r} is not "
                              f"supported by this dssefs (expects {VERSION}): upgrade dssefs")
        for sub in (OBJECTS, UPLOADS, LOCKS):
            path = os.path.join(self.root, sub)
            if not os.path.isdir(path):
                if not create:
                    raise ConfigError(f"{self.root}: store directory {sub}/ is missing")
                os.makedirs(path, exist_ok=True)
        if os.path.exists(os.path.join(self.root, MARKER.upper())):
            raise ConfigError(f"{self.root} is on a case-insensitive file system: a local store "
                              "needs case-sensitive names")

    def _create_layout(self, marker: str) -> None:
        missing = []
        path = self.root
        while not os.path.isdir(path):
            missing.append(path)
            parent = os.path.dirname(path)
            if parent == path:
                break
            path = parent
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        for sub in (OBJECTS, UPLOADS, LOCKS):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        tmp = os.path.join(self.root, f".{secrets.token_hex(8)}{TMP_SUFFIX}")
        with open(tmp, "wb") as f:
            f.write(json.dumps({"format": FORMAT, "version": VERSION}).encode() + b"\n")
            f.flush()
            if self._fsync:
                os.fsync(f.fileno())
        os.replace(tmp, marker)
        if self._fsync:
            _fsync_dir(self.root)
            for p in missing:
                _fsync_dir(os.path.dirname(p))

    # ------------------------------------------------------------------------------------------
    # Paths, locks, errors

    def _where(self, key: str | None) -> str:
        return f"{self.url}/{key}" if key else self.url

    def _paths(self, key: str) -> tuple[str, str]:
        """(directory, file) holding ``key``."""
        check_key(key)
        segs = key.split("/")
        for seg in segs:
            if len(seg.encode("utf-8")) > MAX_SEGMENT_BYTES:
                raise StoreError(f"{self._where(key)}: a path component is longer than "
                                 f"{MAX_SEGMENT_BYTES} bytes: shorten the name",
                                 errno=_errno.ENAMETOOLONG)
        d = os.path.join(self._objects, *(s + DIR_SUFFIX for s in segs[:-1]))
        return d, os.path.join(d, segs[-1] + FILE_SUFFIX)

    @contextlib.contextmanager
    def _locked(self, key: str):
        stripe = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=4).digest(),
                                "big") % LOCK_STRIPES
        with self._thread_locks[stripe]:
            fd = os.open(os.path.join(self._locks_dir, f"{stripe:02d}.lock"),
                         os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the flock

    @contextlib.contextmanager
    def _fs_errors(self, op: str, key: str | None):
        try:
            yield
        except DssefsError:
            raise
        except OSError as e:
            raise self._os_error(e, op, key) from e

    def _os_error(self, e: OSError, op: str, key: str | None) -> StoreError:
        where = self._where(key)
        reason = e.strerror or type(e).__name__
        if e.errno in (_errno.ENOSPC, _errno.EDQUOT):
            return StoreFull(f"{where}: {reason} on the file system holding {self.root}: free "
                             "space or raise the quota")
        if e.errno in (_errno.EACCES, _errno.EPERM):
            return StoreAccessDenied(f"{where}: permission denied: give this user read and write "
                                     f"access to {self.root}")
        if e.errno == _errno.EROFS:
            return StoreAccessDenied(f"{where}: {self.root} is on a read-only file system",
                                     errno=_errno.EROFS)
        if e.errno in (_errno.ENOENT, _errno.ENOTDIR) and op in ("head", "get"):
            return ObjectNotFound(f"{where}: no such object")
        return StoreError(f"{op} {where} failed: {reason}",
                          errno=e.errno if e.errno else _errno.EIO)

    def _corrupt(self, key: str, why: str) -> StoreError:
        return StoreError(f"{self._where(key)}: object file is corrupt ({why}): restore it from "
                          "a backup or delete it", errno=_errno.EIO)

    # ------------------------------------------------------------------------------------------
    # Reading

    def _open(self, key: str) -> int:
        _, path = self._paths(key)
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectNotFound(f"{self._where(key)}: no such object") from None
        except IsADirectoryError:  # pragma: no cover - cannot happen with suffixed names
            raise ObjectNotFound(f"{self._where(key)}: no such object") from None

    def _read_header(self, fd: int, key: str) -> _Header:
        buf = os.pread(fd, _HEAD_READ, 0)
        if len(buf) < _PREFIX.size:
            raise self._corrupt(key, "truncated header")
        magic, n = _PREFIX.unpack_from(buf)
        if magic != MAGIC:
            raise self._corrupt(key, "bad magic")
        if n > MAX_HEADER:
            raise self._corrupt(key, "oversized header")
        end = _PREFIX.size + n
        if end > len(buf):
            buf += os.pread(fd, end - len(buf), len(buf))
            if len(buf) < end:
                raise self._corrupt(key, "truncated header")
        try:
            h = json.loads(buf[_PREFIX.size:end])
            etag, size, mtime, metadata = h["etag"], h["size"], h["mtime"], h["metadata"]
        except (ValueError, KeyError, TypeError):
            raise self._corrupt(key, "unreadable header") from None
        if (not isinstance(etag, str) or not isinstance(size, int) or size < 0
                or not isinstance(mtime, (int, float)) or not isinstance(metadata, dict)
                or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
            raise self._corrupt(key, "malformed header")
        actual = os.fstat(fd).st_size
        if actual != end + size:
            raise self._corrupt(key, f"{actual - end} body bytes where the header says {size}")
        return _Header(etag, size, float(mtime), metadata, end)

    def head(self, key: str, *, prefix: int = 0) -> ObjectInfo:
        with self._fs_errors("head", key):
            fd = self._open(key)
            try:
                h = self._read_header(fd, key)
                body = None
                if prefix > 0:
                    n = min(prefix, h.size)
                    try:
                        body = _pread_exact(fd, n, h.offset) if n else b""
                    except EOFError:
                        raise self._corrupt(key, "body shorter than its header says") from None
            finally:
                os.close(fd)
        return ObjectInfo(key=key, size=h.size, etag=h.etag, mtime=h.mtime,
                          metadata=dict(h.metadata), prefix=body)

    def get_range(self, key: str, start: int, length: int, *, if_match: str | None = None
                  ) -> tuple[bytes, int]:
        check_range(start, length)
        with self._fs_errors("get", key):
            fd = self._open(key)
            try:
                h = self._read_header(fd, key)
                if if_match is not None and strip_etag(h.etag) != strip_etag(if_match):
                    raise self._precondition(key, "changed by another writer")
                n = max(0, min(length, h.size - start))
                if n == 0:
                    return b"", h.size
                try:
                    data = _pread_direct(fd, n, h.offset + start) if n >= _DIRECT_MIN else None
                    if data is None:
                        data = _pread_exact(fd, n, h.offset + start)
                    return data, h.size
                except EOFError:
                    raise self._corrupt(key, "body shorter than its header says") from None
            finally:
                os.close(fd)

    # ------------------------------------------------------------------------------------------
    # Writing

    def _precondition(self, key: str, what: str) -> PreconditionFailed:
        return PreconditionFailed(f"{self._where(key)}: {what} (precondition failed): re-read and "
                                  "retry")

    def _makedirs(self, dirpath: str) -> None:
        """Create ``dirpath`` under objects/, fsync-ing each new directory into its parent."""
        missing = []
        path = dirpath
        while path != self._objects and not os.path.isdir(path):
            missing.append(path)
            path = os.path.dirname(path)
        for path in reversed(missing):
            try:
                os.mkdir(path)
            except FileExistsError:
                continue
            if self._fsync:
                _fsync_dir(os.path.dirname(path))  # ENOENT (pruned meanwhile) makes the caller retry

    def _current_etag(self, path: str, key: str) -> str | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            return self._read_header(fd, key).etag
        finally:
            os.close(fd)

    def _write_object(self, key: str, metadata: dict[str, str], size: int,
                      write_body: Callable[[int, int], None], *, if_match: str | None,
                      if_none_match: bool) -> str:
        """Write a new version of ``key`` with a ``size``-byte body produced by
        ``write_body(fd, offset)`` and make it visible atomically if the conditions hold."""
        dirpath, path = self._paths(key)
        etag = _new_etag()
        header = _encode_header(etag, size, time.time(), metadata)
        for _attempt in range(64):
            tmp = os.path.join(dirpath, f".{secrets.token_hex(12)}{TMP_SUFFIX}")
            try:
                self._makedirs(dirpath)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            except FileNotFoundError:
                continue  # a concurrent delete pruned an empty directory: create it again
            break
        else:  # pragma: no cover - needs a pathological delete storm
            raise StoreError(f"{self._where(key)}: directory keeps disappearing", errno=_errno.EIO)
        committed = False
        try:
            try:
                _pwrite_all(fd, memoryview(header), 0)
                write_body(fd, len(header))
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            with self._locked(key):
                if if_match is not None or if_none_match:
                    current = self._current_etag(path, key)
                    if if_none_match and current is not None:
                        raise self._precondition(key, "already exists")
                    if if_match is not None and (
                            current is None or strip_etag(current) != strip_etag(if_match)):
                        raise self._precondition(key, "changed by another writer")
                os.replace(tmp, path)
                committed = True
        finally:
            if not committed:
                _unlink_quietly(tmp)
        if self._fsync:
            _fsync_dir(dirpath, missing_ok=True)
        return etag

    def put(self, key: str, body: bytes | memoryview, metadata: dict[str, str], *,
            if_match: str | None = None, if_none_match: bool = False, crc32: int | None = None) -> str:
        check_key(key)  # (crc32: nothing crosses a network here to check)
        metadata = normalize_metadata(metadata)
        check_conditions(if_match, if_none_match)
        data = _as_bytes_view(body)
        with self._fs_errors("put", key):
            return self._write_object(key, metadata, len(data),
                                      lambda fd, off: _pwrite_all(fd, data, off),
                                      if_match=if_match, if_none_match=if_none_match)

    def begin_upload(self, key: str, metadata: dict[str, str], *,
                     if_match: str | None = None, if_none_match: bool = False,
                     size_hint: int | None = None) -> "LocalUpload":
        check_key(key)
        self._paths(key)
        metadata = normalize_metadata(metadata)
        check_conditions(if_match, if_none_match)
        with self._fs_errors("upload", key):
            return LocalUpload(self, key, metadata, if_match=if_match, if_none_match=if_none_match,
                               size_hint=size_hint)

    def copy(self, src: str, dst: str, metadata: dict[str, str], *,
             if_match: str | None = None, if_none_match: bool = False) -> str:
        check_key(src)
        check_key(dst)
        metadata = normalize_metadata(metadata)
        check_conditions(if_match, if_none_match)
        with self._fs_errors("copy", src):
            fd = self._open(src)
            try:
                h = self._read_header(fd, src)
                if src == dst and if_match is not None and strip_etag(h.etag) != strip_etag(if_match):
                    raise self._precondition(src, "changed by another writer")

                def write_body(out_fd: int, offset: int) -> None:
                    try:
                        _copy_range(fd, h.offset, out_fd, offset, h.size)
                    except EOFError:
                        raise self._corrupt(src, "body shorter than its header says") from None

                with self._fs_errors("write", dst):
                    return self._write_object(dst, metadata, h.size, write_body,
                                              if_match=if_match, if_none_match=if_none_match)
            finally:
                os.close(fd)

    def _unlink(self, key: str) -> str | None:
        """Remove ``key``'s file; its directory, or None when there was nothing to remove."""
        dirpath, path = self._paths(key)
        with self._fs_errors("delete", key):
            with self._locked(key):
                try:
                    os.unlink(path)
                except (FileNotFoundError, NotADirectoryError):
                    return None
        return dirpath

    def delete(self, key: str) -> None:
        dirpath = self._unlink(key)
        if dirpath is None:
            return
        with self._fs_errors("delete", key):
            if self._fsync:
                _fsync_dir(dirpath, missing_ok=True)
            self._prune(dirpath)

    def delete_many(self, keys) -> list[tuple[str, StoreError]]:
        """Delete each key, then make the removals durable with one fsync per directory (instead
        of one per key) and prune the directories left empty."""
        failures: list[tuple[str, StoreError]] = []
        touched: dict[str, list[str]] = {}
        for key in keys:
            try:
                dirpath = self._unlink(key)
            except StoreError as e:
                failures.append((key, e))
                continue
            if dirpath is not None:
                touched.setdefault(dirpath, []).append(key)
        for dirpath in sorted(touched, key=len, reverse=True):  # deepest first: parents prune after
            if self._fsync:
                try:
                    with self._fs_errors("delete", touched[dirpath][0]):
                        _fsync_dir(dirpath, missing_ok=True)
                except StoreError as e:
                    failures.extend((key, e) for key in touched[dirpath])
                    continue
            self._prune(dirpath)
        return failures

    def _prune(self, dirpath: str) -> None:
        """Remove now-empty directories up to objects/ (writers re-create them as needed)."""
        while dirpath != self._objects and dirpath.startswith(self._objects + os.sep):
            try:
                os.rmdir(dirpath)
            except OSError:
                return
            parent = os.path.dirname(dirpath)
            if self._fsync:
                with contextlib.suppress(OSError):
                    _fsync_dir(parent)
            dirpath = parent

    # ------------------------------------------------------------------------------------------
    # Listing

    def _entries(self, dirpath: str, base_key: str, name_prefix: str
                 ) -> list[tuple[str, bool, str]]:
        """Sorted ``(key, is_dir, path)`` for one directory; directory keys end with ``/``."""
        out = []
        try:
            it = os.scandir(dirpath)
        except (FileNotFoundError, NotADirectoryError):
            return out
        with it:
            for entry in it:
                name = entry.name
                try:
                    if name.endswith(FILE_SUFFIX) and entry.is_file(follow_symlinks=False):
                        seg = _decode_segment(name, FILE_SUFFIX)
                        is_dir = False
                    elif name.endswith(DIR_SUFFIX) and entry.is_dir(follow_symlinks=False):
                        seg = _decode_segment(name, DIR_SUFFIX)
                        is_dir = True
                    else:
                        continue
                except OSError:
                    continue
                if seg is None or not seg.startswith(name_prefix):
                    continue
                out.append((base_key + seg + ("/" if is_dir else ""), is_dir, entry.path))
        out.sort()
        return out

    def _has_objects(self, dirpath: str) -> bool:
        stack = [dirpath]
        while stack:
            for key, is_dir, path in self._entries(stack.pop(), "", ""):
                if not is_dir:
                    return True
                stack.append(path)
        return False

    def _list_info(self, path: str, key: str) -> ObjectInfo | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return None  # deleted while listing
        try:
            h = self._read_header(fd, key)
        except StoreError as e:
            log.warning("event=listing_skipped object=%s reason=%s", self._where(key), e)
            return None
        finally:
            os.close(fd)
        return ObjectInfo(key=key, size=h.size, etag=h.etag, mtime=h.mtime)

    def _walk(self, prefix: str, recursive: bool) -> Iterator[ObjectInfo | str]:
        """Objects under ``prefix`` in key order; without ``recursive`` sub-directories are yielded
        as ``/``-terminated prefixes (only those holding at least one object)."""
        segs = prefix.split("/")
        for seg in segs[:-1]:
            if len(seg.encode("utf-8", "surrogatepass")) > MAX_SEGMENT_BYTES:
                return
        dirpath = os.path.join(self._objects, *(s + DIR_SUFFIX for s in segs[:-1]))
        base = prefix[: len(prefix) - len(segs[-1])]
        stack = [iter(self._entries(dirpath, base, segs[-1]))]
        while stack:
            item = next(stack[-1], None)
            if item is None:
                stack.pop()
                continue
            key, is_dir, path = item
            if not is_dir:
                info = self._list_info(path, key)
                if info is not None:
                    yield info
            elif recursive:
                stack.append(iter(self._entries(path, key, "")))
            elif self._has_objects(path):
                yield key

    def list(self, prefix: str = "", delimiter: str | None = "/") -> Iterator[ObjectInfo | str]:
        if delimiter is not None and not delimiter:
            raise ValueError("delimiter must be None or a non-empty string")
        with self._fs_errors("list", prefix or None):
            if delimiter == "/":
                yield from self._walk(prefix, recursive=False)
                return
            last = None
            for item in self._walk(prefix, recursive=True):
                if delimiter is not None:
                    rest = item.key[len(prefix):]
                    i = rest.find(delimiter)
                    if i >= 0:
                        common = prefix + rest[: i + len(delimiter)]
                        if common != last:
                            last = common
                            yield common
                        continue
                yield item

    # ------------------------------------------------------------------------------------------
    # Multipart uploads in progress

    def _upload_record(self, path: str) -> tuple[str, float] | None:
        """``(key, started)`` of the upload staged in ``path``, or None when its record is missing
        or unreadable (a writer that crashed while beginning it, or one beginning it right now).
        Raises FileNotFoundError when the upload itself is gone."""
        try:
            with open(os.path.join(path, UPLOAD_RECORD), "rb") as f:
                record = json.loads(f.read(MAX_HEADER) or b"null")
        except FileNotFoundError:
            if not os.path.isdir(path):
                raise
            return None
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(record, dict):
            return None
        key, started = record.get("key"), record.get("started")
        if not isinstance(key, str) or isinstance(started, bool) or not isinstance(started, (int, float)):
            return None
        return key, float(started)

    def list_uploads(self, prefix: str = "") -> Iterator[PendingUpload]:
        """The uploads staged under ``uploads/``.  One whose record is unreadable has the key
        ``""`` and the time its directory last changed; it is listed for the prefix ``""`` only."""
        found = []
        with self._fs_errors("list_uploads", prefix or None):
            with os.scandir(self._uploads) as it:
                entries = [e for e in it if _UPLOAD_ID_RE.match(e.name)]
            for entry in entries:
                try:
                    record = self._upload_record(entry.path)
                    if record is None:
                        record = ("", entry.stat(follow_symlinks=False).st_mtime)
                except (FileNotFoundError, NotADirectoryError):
                    continue  # completed or aborted meanwhile
                key, started = record
                if key.startswith(prefix) and (key or not prefix):
                    found.append(PendingUpload(key, entry.name, started))
        found.sort(key=lambda u: (u.key, u.initiated, u.upload_id))
        yield from found

    def abort_upload(self, key: str, upload_id: str) -> None:
        """Remove ``uploads/<upload_id>/``.  ``key`` must be the upload's (``""`` for one whose
        record is unreadable, as :meth:`list_uploads` reports it)."""
        if key:
            check_key(key)
        if not isinstance(upload_id, str) or not _UPLOAD_ID_RE.match(upload_id):
            raise StoreError(f"{self._where(key or None)}: {upload_id!r} is not an upload id of this "
                             "store", errno=_errno.EINVAL)
        path = os.path.join(self._uploads, upload_id)
        with self._fs_errors("abort", key or None):
            try:
                record = self._upload_record(path)
            except (FileNotFoundError, NotADirectoryError):
                return  # completed or aborted meanwhile
            if (record[0] if record is not None else "") != key:
                raise StoreError(f"{self._where(key or None)}: upload {upload_id} is not an upload of "
                                 "this key", errno=_errno.EINVAL)
            try:
                shutil.rmtree(path)
            except FileNotFoundError:
                pass

    # ------------------------------------------------------------------------------------------
    # Maintenance

    def check(self) -> None:
        """Verify at mount time that the store is readable and writable by this user."""
        for path in (self._objects, self._uploads, self._locks_dir):
            if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
                raise StoreAccessDenied(f"{self.url}: no read/write access to {path}: fix the "
                                        "permissions")

    def sweep(self, older_than: float = 24 * 3600.0) -> int:
        """Remove temporary files and multipart uploads left behind by crashed writers, when older
        than ``older_than`` seconds; returns how many were removed.  Safe while others write."""
        cutoff = time.time() - older_than
        removed = 0
        for dirpath, dirnames, filenames in os.walk(self._objects):
            for name in filenames:
                if name.endswith(TMP_SUFFIX):
                    p = os.path.join(dirpath, name)
                    with contextlib.suppress(OSError):
                        if os.lstat(p).st_mtime < cutoff:
                            os.unlink(p)
                            removed += 1
        with contextlib.suppress(OSError), os.scandir(self._uploads) as it:
            for entry in it:
                with contextlib.suppress(OSError):
                    if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                        shutil.rmtree(entry.path)
                        removed += 1
        return removed

    def __repr__(self) -> str:
        return f"LocalStore({self.root!r})"


class LocalUpload(Upload):
    """A multipart upload staged under ``uploads/<id>/``; parts may be written concurrently.

    Parts are written straight into ``uploads/<id>/body``, at the offset they will have in the
    finished object file (after a reserved header area), assuming every part but the last has
    the size of the first part received (what the Vault sends).  ``complete`` then only writes
    the header into its reserved area (the JSON is padded with spaces), ``fsync``-s and renames
    the file over the object: no copy.  A part that does not fit that layout (other sizes, a
    part re-sent while being written) is staged in its own ``<n>.part`` file and ``complete``
    falls back to copying everything into a fresh temporary object file.
    """

    def __init__(self, store: LocalStore, key: str, metadata: dict[str, str], *,
                 if_match: str | None, if_none_match: bool, size_hint: int | None = None):
        self.store = store
        self.key = key
        self.upload_id = secrets.token_hex(16)
        self._metadata = metadata
        self._if_match = if_match
        self._if_none_match = if_none_match
        self._dir = os.path.join(store._uploads, self.upload_id)
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()  # one buffered writer at a time (see _write_at)
        self._sizes: dict[int, int] = {}
        self._where_part: dict[int, int | None] = {}  # number -> offset in body, None: own file
        self._writing: set[int] = set()  # parts being written in place
        self._stride: int | None = None
        self._users = 0  # put_part calls using self._fd
        self._state = "open"  # open -> completing -> completed | aborted
        # room for the final header: the longest size and mtime it can hold, plus slack
        self._reserve = len(_encode_header(_new_etag(), 1 << 62, 9999999999.123456, metadata)) + 64
        self._body = os.path.join(self._dir, "body")
        os.mkdir(self._dir, 0o700)
        with open(os.path.join(self._dir, UPLOAD_RECORD), "w") as f:
            json.dump({"key": key, "started": time.time()}, f)
        # becomes the object file: same mode as the temporary files of single puts
        self._fd = os.open(self._body, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        if size_hint:
            # one contiguous allocation up front: parts written out of order, and the unaligned
            # part boundaries written through the page cache, then land in place instead of
            # scattering the body over dozens of extents (read back at a third of the speed)
            try:
                _reserve_space(self._fd, self._reserve + size_hint)
            except OSError:
                self._close_fds()
                shutil.rmtree(self._dir, ignore_errors=True)
                raise
        self._dfd = _open_direct(self._body)  # the same file without the page cache, or -1
        self._direct_ok = self._dfd >= 0
        self._bounces: list[mmap.mmap] = []  # page-aligned copies of parts for direct writes

    def _part_path(self, number: int) -> str:
        return os.path.join(self._dir, f"{number:05d}.part")

    def _check_open(self) -> None:
        if self._state != "open":
            raise StoreError(f"{self.store._where(self.key)}: upload is already {self._state}",
                             errno=_errno.EINVAL)

    def _release_fd(self) -> None:
        """Drop one use of the body descriptor (lock held); the last use after the upload
        ended closes it (never while a put_part may still write through it)."""
        self._users -= 1
        if self._users == 0 and self._state in ("completed", "aborted") and self._fd >= 0:
            self._close_fds()

    def _close_fds(self) -> None:
        for name in ("_fd", "_dfd"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                setattr(self, name, -1)
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._bounces = []

    def _write_at(self, view: memoryview, offset: int) -> None:
        """Write one part into the body file: its page-aligned middle with O_DIRECT, through an
        aligned copy, when possible; the rest through the page cache, one writer at a time
        (buffered writers of one file serialise on its inode lock anyway, and the waiting ones
        spin on it, burning the CPU the encrypting threads need)."""
        dfd = self._dfd if self._direct_ok else -1
        if dfd >= 0 and len(view) >= _DIRECT_MIN:
            start = -(-offset // _DIRECT_ALIGN) * _DIRECT_ALIGN
            end = (offset + len(view)) // _DIRECT_ALIGN * _DIRECT_ALIGN
            a, b = start - offset, end - offset
            if b - a >= _DIRECT_MIN:
                with self._lock:
                    bounce = self._bounces.pop() if self._bounces else None
                if bounce is None or len(bounce) < b - a:
                    bounce = mmap.mmap(-1, b - a)  # page-aligned
                view_b = memoryview(bounce)[:b - a]
                try:
                    view_b[:] = view[a:b]
                    _pwrite_all(dfd, view_b, start)
                except OSError as e:
                    if e.errno != _errno.EINVAL:
                        raise
                    log.debug("event=direct_io_refused object=%s reason=%s action='page cache'",
                              self.store._where(self.key), e.strerror)
                    self._direct_ok = False
                else:
                    with self._write_lock:
                        if a:
                            _pwrite_all(self._fd, view[:a], offset)
                        if b < len(view):
                            _pwrite_all(self._fd, view[b:], offset + b)
                    return
                finally:
                    view_b.release()
                    with self._lock:
                        self._bounces.append(bounce)
        with self._write_lock:
            _pwrite_all(self._fd, view, offset)
            _start_writeback(self._fd, offset, len(view))

    def put_part(self, number: int, data: bytes | memoryview) -> None:
        check_part_number(number)
        view = _as_bytes_view(data)
        with self._lock:
            self._check_open()
            if self._stride is None:
                self._stride = len(view)
            offset = None
            if (len(view) <= self._stride and number not in self._writing
                    and (len(view) == self._stride or all(n < number for n in self._sizes))):
                offset = self._reserve + (number - 1) * self._stride
                self._writing.add(number)
                self._users += 1
        if offset is not None:
            try:
                with self.store._fs_errors("upload", self.key):
                    self._write_at(view, offset)
                with self._lock:
                    self._check_open()
                    if number in self._where_part and self._where_part[number] is None:
                        _unlink_quietly(self._part_path(number))  # an earlier copy in its own file
                    self._sizes[number] = len(view)
                    self._where_part[number] = offset
            finally:
                with self._lock:
                    self._writing.discard(number)
                    self._release_fd()
            return
        tmp = os.path.join(self._dir, f".{number}.{secrets.token_hex(8)}{TMP_SUFFIX}")
        with self.store._fs_errors("upload", self.key):
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileNotFoundError:
                raise StoreError(f"{self.store._where(self.key)}: upload was aborted",
                                 errno=_errno.EINVAL) from None
            try:
                try:
                    _pwrite_all(fd, view, 0)
                finally:
                    os.close(fd)
                with self._lock:
                    self._check_open()
                    os.replace(tmp, self._part_path(number))  # a re-sent part replaces the old one
                    self._sizes[number] = len(view)
                    self._where_part[number] = None
            except BaseException:
                _unlink_quietly(tmp)
                raise

    def _in_place(self, numbers: list[int], sizes: list[int]) -> bool:
        """Whether the body file already holds parts 1..N contiguously after the header area."""
        offset = self._reserve
        for n, size in zip(numbers, sizes):
            if self._where_part.get(n) != offset:
                return False
            offset += size
        return True

    def complete(self) -> str:
        with self._lock:
            self._check_open()
            numbers = check_parts(self._sizes, self.store.min_part_size)
            sizes = [self._sizes[n] for n in numbers]
            where = dict(self._where_part)
            in_place = self._in_place(numbers, sizes)
            self._state = "completing"
            self._users += 1
        try:
            with self.store._fs_errors("complete", self.key):
                etag = None
                if in_place:
                    etag = self._commit_in_place(sum(sizes))
                if etag is None:
                    etag = self._commit_copy(numbers, sizes, where)
        except PreconditionFailed:
            with self._lock:
                self._release_fd()
            self.abort()
            raise
        except BaseException:
            with self._lock:
                if self._state == "completing":
                    self._state = "open"  # may be retried or aborted
                self._release_fd()
            raise
        with self._lock:
            self._state = "completed"
            self._release_fd()
        shutil.rmtree(self._dir, ignore_errors=True)
        return etag

    def _commit_in_place(self, size: int) -> str | None:
        """Write the header into the reserved area and rename the body file over the object.
        None if the header does not fit (the caller copies instead)."""
        store = self.store
        etag = _new_etag()
        header = _encode_header(etag, size, time.time(), self._metadata)
        if len(header) > self._reserve:  # pragma: no cover - the reserve covers any size and mtime
            return None
        blob = header[_PREFIX.size:] + b" " * (self._reserve - len(header))  # JSON allows trailing spaces
        header = _PREFIX.pack(MAGIC, len(blob)) + blob
        fd = self._fd
        _pwrite_all(fd, memoryview(header), 0)
        if os.fstat(fd).st_size != self._reserve + size:  # ftruncate waits for writeback: only if needed
            os.ftruncate(fd, self._reserve + size)  # drop what a re-sent larger part left beyond
        if store._fsync:
            os.fsync(fd)
        dirpath, path = store._paths(self.key)
        for _attempt in range(64):
            store._makedirs(dirpath)
            with store._locked(self.key):
                if self._if_match is not None or self._if_none_match:
                    current = store._current_etag(path, self.key)
                    if self._if_none_match and current is not None:
                        raise store._precondition(self.key, "already exists")
                    if self._if_match is not None and (
                            current is None or strip_etag(current) != strip_etag(self._if_match)):
                        raise store._precondition(self.key, "changed by another writer")
                if not os.path.exists(self._body):
                    raise StoreError(f"{store._where(self.key)}: upload was aborted",
                                     errno=_errno.EINVAL)
                try:
                    os.replace(self._body, path)
                except FileNotFoundError:
                    continue  # a concurrent delete pruned the (empty) directory: create it again
                with self._lock:
                    self._state = "completed"  # the object is visible: no retry from here on
            break
        else:  # pragma: no cover - needs a pathological delete storm
            raise StoreError(f"{store._where(self.key)}: directory keeps disappearing", errno=_errno.EIO)
        if store._fsync:
            _fsync_dir(dirpath, missing_ok=True)
        return etag

    def _commit_copy(self, numbers: list[int], sizes: list[int], where: dict[int, int | None]) -> str:
        def write_body(out_fd: int, offset: int) -> None:
            for n, size in zip(numbers, sizes):
                at = where[n]
                if at is not None:
                    try:
                        _copy_range(self._fd, at, out_fd, offset, size)
                    except EOFError:
                        raise StoreError(f"{self.store._where(self.key)}: part {n} changed size "
                                         "while staged", errno=_errno.EIO) from None
                    offset += size
                    continue
                fd = os.open(self._part_path(n), os.O_RDONLY | os.O_CLOEXEC)
                try:
                    if os.fstat(fd).st_size != size:
                        raise StoreError(f"{self.store._where(self.key)}: part {n} changed size "
                                         "while staged", errno=_errno.EIO)
                    _copy_range(fd, 0, out_fd, offset, size)
                finally:
                    os.close(fd)
                offset += size

        return self.store._write_object(self.key, self._metadata, sum(sizes), write_body,
                                        if_match=self._if_match, if_none_match=self._if_none_match)

    def abort(self) -> None:
        with self._lock:
            if self._state == "completed":
                return
            self._state = "aborted"
            if self._users == 0 and self._fd >= 0:
                self._close_fds()
        try:
            shutil.rmtree(self._dir, ignore_errors=True)
        except Exception as e:  # pragma: no cover - never raises
            log.warning("event=staging_cleanup_failed path=%s reason=%s", self._dir, one_line(e))

    def __del__(self) -> None:
        if getattr(self, "_users", 0) == 0:
            self._close_fds()

    def __enter__(self) -> "LocalUpload":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def _load_libc(name: str, *argtypes):
    if not hasattr(os, "sched_getaffinity"):  # not Linux
        return None
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):  # pragma: no cover - no libc symbol
        return None
    fn.argtypes = list(argtypes)
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_libc("sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
_SYNC_FILE_RANGE_WRITE = 2
# fallocate(2) itself, not posix_fallocate: where the file system cannot reserve space (NFS, some
# FUSE file systems) glibc's posix_fallocate writes a byte into every block instead
_fallocate = _load_libc("fallocate", ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


def _reserve_space(fd: int, length: int) -> None:
    """Allocate ``length`` bytes of ``fd`` in one piece where the file system can; raises
    OSError only for ENOSPC/EDQUOT (the upload could not be stored anyway)."""
    if _fallocate is None or length <= 0:
        return
    if _fallocate(fd, 0, 0, length) != 0:
        err = ctypes.get_errno()
        if err in (_errno.ENOSPC, _errno.EDQUOT):
            raise OSError(err, os.strerror(err))


_direct_buffers = threading.local()


def _pread_direct(fd: int, n: int, offset: int) -> bytearray | None:
    """Exactly ``n`` bytes at ``offset`` read with O_DIRECT (switched on for this descriptor,
    which the caller opened for this one read), or None where the file system refuses it.  The
    daemon keeps plaintext in its own cache: large ciphertext reads need not fill the page cache,
    and a body written with O_DIRECT read back through it at a third of the speed here."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    a0 = offset // _DIRECT_ALIGN * _DIRECT_ALIGN
    a1 = -(-(offset + n) // _DIRECT_ALIGN) * _DIRECT_ALIGN
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | flag)
    except OSError:
        return None
    buf = getattr(_direct_buffers, "buf", None)  # page-aligned, reused by this thread
    if buf is None or len(buf) < a1 - a0:
        buf = _direct_buffers.buf = mmap.mmap(-1, a1 - a0)
    view = memoryview(buf)[:a1 - a0]
    try:
        got = 0
        while got < a1 - a0:
            k = os.preadv(fd, [view[got:got + min(a1 - a0 - got, _IO_CHUNK)]], a0 + got)
            if k == 0:
                break  # end of file: the last block is partial
            got += k
        if got < offset - a0 + n:
            raise EOFError
        return bytearray(view[offset - a0:offset - a0 + n])
    except OSError as e:
        if e.errno != _errno.EINVAL:
            raise
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)  # refused: the caller reads through the page cache
        return None
    finally:
        view.release()


def _open_direct(path: str) -> int:
    """``path`` opened for writing with O_DIRECT, or -1 where that is not supported."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return -1
    try:
        return os.open(path, os.O_WRONLY | flag | os.O_CLOEXEC)
    except OSError:
        return -1


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``[offset, offset+length)`` to disk now (no waiting), so
    the final ``fsync`` has little left to do.  A hint only: errors are ignored (fsync reports
    real ones)."""
    if _sync_file_range is not None and length:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)
