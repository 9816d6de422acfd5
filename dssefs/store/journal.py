"""Write-back journal (``--write-back``): a store in front of another one that makes writes
durable in a local directory and uploads them in the background.

A write (``put``, a multipart upload, a ``copy`` or ``delete`` of a key with writes still
pending) becomes an *entry*: one file holding a JSON header line and the object's body exactly as
it will be stored (dssefs bodies are ciphertext and their metadata holds wrapped keys only, so
nothing in the journal is plaintext or a usable key).  The entry is written under its final name
with the CRC32 of its body in its header, fsync'ed, and its directory fsync'ed before the call
returns, with a synthetic ETag (``wb-…``).  (One file system commit per entry: a temporary file
renamed into place needs a second one.  An entry that a crash cut short fails its length or CRC
check when the journal is opened again and is dropped: its write never returned.)  An entry
whose body is a multipart upload's parts, copied from their files, is written to a temporary
file and renamed into place instead.

Entries of one key are written and uploaded in order, one at a time; different keys in parallel
(``workers`` uploads; the writes of different keys, fsync included, do not wait for each other or
for the uploads' bookkeeping).
Until an entry is uploaded, ``head``, ``get_range`` and ``list`` answer from it, so the writer
sees its own writes.  A later write of a key whose previous entry has not started uploading
replaces that entry (only the newest version is uploaded).  Conditions are kept: a write made
against a pending entry is conditional on what that entry stores once it is uploaded.

Failures: an upload that fails (store unreachable, throttled beyond botocore's retries) stays in
the journal and is retried with back-off.  A refused condition is first checked against what was
sent (a retry whose first attempt was applied finds our own version: confirmed, as in the
Vault); otherwise another client changed the object: the newest pending version of the key is
handed to ``on_conflict`` (which stores it under another name) and the key's entries are dropped.
After a crash, opening the journal again uploads what it holds.

:meth:`settle` (``fsync``) waits until a key's entries are stored; :meth:`drain` (unmount)
until every entry is, or has failed once more.
"""

from __future__ import annotations

import collections
import errno as _errno
import fcntl
import heapq
import json
import logging
import os
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from ..errors import ConfigError, ObjectNotFound, PreconditionFailed, StoreError
from .base import ObjectInfo, ObjectStore, PendingUpload, Upload

log = logging.getLogger(__name__)

SYNTHETIC = "wb-"  # prefix of the ETags the journal hands out for entries not uploaded yet
UPLOAD_PART = 8 << 20  # entries larger than MULTIPART are uploaded in parts of this size
MULTIPART = 16 << 20
BACKOFF_MAX = 30.0
RESOLVED_MAX = 200_000  # synthetic ETag -> stored ETag, remembered for readers pinned to one
ENTRY_SUFFIX = ".entry"  # renamed into place once complete
CHECKED_SUFFIX = ".centry"  # written in place: complete if its length and CRC32 say so
FORMAT = 1

#: ``on_conflict(key, metadata, body) -> str``: store a version that lost its condition under
#: another name and return that name.
ConflictHandler = Callable[[str, dict, bytes], str]


@dataclass
class Entry:
    seq: int
    op: str  # "put" or "delete"
    key: str
    etag: str  # synthetic
    meta: dict[str, str] = field(default_factory=dict)
    size: int = 0
    mtime: float = 0.0
    # condition when this entry is the first of its key: "if_match" (a stored ETag),
    # "if_none_match" (True), or neither (unconditional)
    if_match: str | None = None
    if_none_match: bool = False
    # set when the entry was written while an earlier entry of the key was pending: the upload is
    # conditional on what that entry stored (its ETag, or absence after a delete)
    after: int | None = None
    after_op: str | None = None
    after_header: str | None = None  # dsse-h of the earlier put: recognises it after a crash
    replaces: int | None = None  # an earlier entry this one replaced (dropped when both exist)
    path: Path | None = None
    offset: int = 0  # where the body starts in the file
    uploading: bool = False
    replacing: bool = False  # a newer entry that takes its place is being written: not to be sent
    attempts: int = 0
    error: BaseException | None = None
    next_try: float = 0.0

    def header(self, crc32: int | None = None) -> dict:
        h = {"format": FORMAT, "seq": self.seq, "op": self.op, "key": self.key, "etag": self.etag,
             "meta": self.meta, "size": self.size, "mtime": self.mtime, "if_match": self.if_match,
             "if_none_match": self.if_none_match, "after": self.after, "after_op": self.after_op,
             "after_header": self.after_header, "replaces": self.replaces}
        if crc32 is not None:
            h["crc32"] = crc32
        return h


class JournalStore(ObjectStore):
    def __init__(self, inner: ObjectStore, directory: str | os.PathLike, *, workers: int = 16,
                 on_conflict: ConflictHandler | None = None, identity: str | None = None):
        """``identity`` (the store URL and prefix): entries are only ever uploaded to the store
        they were written for; a journal holding another store's entries is refused."""
        self.inner = inner
        self.dir = Path(directory)
        self.identity = identity
        self.workers = max(1, workers)
        self.on_conflict = on_conflict
        # one lock; two conditions on it: ``_cv`` for state changes that settle, drain and writers
        # wait for (an entry stored, failed, replaced or written), ``_work`` for upload workers
        # waiting for an entry to send (woken one at a time, one per entry ready)
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._work = threading.Condition(self._lock)
        self._writing: set[str] = set()  # keys whose next entry is being written (outside the lock)
        self._queues: dict[str, collections.deque[Entry]] = {}
        self._ready: collections.deque[str] = collections.deque()  # keys whose head may be uploaded
        self._waiting: list[tuple[float, int, str]] = []  # heap of (next_try, seq, key) after a failure
        self._resolved: collections.OrderedDict[str, str | None] = collections.OrderedDict()
        self._after_etag: dict[int, str | None] = {}  # seq of an uploaded put/delete -> its result
        self._conflicted: dict[str, tuple[int, str]] = {}  # key -> (last seq dropped, saved as)
        self._seq = 0
        self._closed = False
        self.uploaded = 0
        self.failed_attempts = 0
        self.conflicts: list[tuple[str, str]] = []
        self._open_dir()
        self._threads = [threading.Thread(target=self._worker, name=f"dssefs-journal-{i}", daemon=True)
                         for i in range(self.workers)]
        for t in self._threads:
            t.start()

    # ---- the directory ------------------------------------------------------------------------------

    def _open_dir(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.dir, 0o700)
            self._lock_fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
            self._dir_fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise ConfigError(f"write-back journal {self.dir}: {e.strerror}; choose another --journal-dir") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._close_fds()
            raise ConfigError(f"write-back journal {self.dir} is in use by another dssefs daemon; give "
                              "each mount its own --journal-dir") from None
        ident = self.dir / "store"
        if self.identity is not None:
            try:
                held = ident.read_text()
            except FileNotFoundError:
                held = None
            if held is not None and held != self.identity and entry_files(self.dir):
                self._close_fds()
                raise ConfigError(f"write-back journal {self.dir} holds versions not stored yet for {held}, "
                                  f"not {self.identity}: mount that store here first (they are uploaded "
                                  "then), or give this mount another --journal-dir")
            if held != self.identity:
                ident.write_text(self.identity)
        entries: dict[int, Entry] = {}
        for p in self.dir.iterdir():
            if p.name.endswith(".tmp"):
                p.unlink()  # never renamed into place: its write never returned
            elif p.name.endswith(ENTRY_SUFFIX):
                e = self._read_header(p)
                entries[e.seq] = e
            elif p.name.endswith(CHECKED_SUFFIX):
                e = self._read_checked(p)
                if e is None:
                    p.unlink()
                else:
                    entries[e.seq] = e
        for e in list(entries.values()):  # a crash between writing a replacement and dropping the old
            if e.replaces is not None and e.replaces in entries:
                old = entries.pop(e.replaces)
                old.path.unlink()
        for seq in sorted(entries):
            e = entries[seq]
            self._queues.setdefault(e.key, collections.deque()).append(e)
            self._seq = max(self._seq, seq)
        for key in self._queues:
            self._ready.append(key)
        if entries:
            log.info("event=journal_replay dir=%s entries=%d bytes=%d", self.dir, len(entries),
                     sum(e.size for e in entries.values()))

    @staticmethod
    def _read_header(path: Path, line: bytes | None = None) -> Entry:
        """The entry of ``path`` from its header ``line`` (read from the file when not given)."""
        if line is None:
            with open(path, "rb") as f:
                line = f.readline()
        try:
            return _parse_entry(path, line, json.loads(line))
        except (ValueError, KeyError, TypeError) as err:
            raise StoreError(f"write-back journal entry {path} is unreadable ({err}); move it away to "
                             "mount, and keep it: it holds a version not stored yet", errno=_errno.EIO) from None

    def _read_checked(self, path: Path) -> Entry | None:
        """An entry written in place, or None if a crash cut its write short (its header does not
        parse, or its body's length or CRC32 is not what the header says)."""
        try:
            with open(path, "rb") as f:
                line = f.readline()
                h = json.loads(line) if line.endswith(b"\n") else None
                crc = h.get("crc32") if isinstance(h, dict) else None
                complete = isinstance(crc, int)
                if complete:
                    got, n = 0, 0
                    while block := f.read(1 << 20):
                        got, n = zlib.crc32(block, got), n + len(block)
                    complete = n == int(h["size"]) and got == crc
        except (ValueError, KeyError, TypeError):
            complete = False
        if not complete:
            log.warning("event=journal_torn_entry entry=%s reason='its write was cut short (a crash "
                        "before the write returned, so no program was told it was saved); dropped'", path)
            return None
        return self._read_header(path, line)  # the header line read above, not read again

    def _write_entry(self, e: Entry, body) -> None:
        """Make ``e`` durable.  A body in memory (or none): header line with the body's CRC32, then
        the body, under the entry's final name; fsync; fsync of the directory (the new name).
        Parts of a multipart upload: copied into a temporary file that is renamed into place."""
        parts = isinstance(body, _PartsBody)
        final = self.dir / f"{e.seq:016d}{ENTRY_SUFFIX if parts else CHECKED_SUFFIX}"
        path = final.with_name(final.name + ".tmp") if parts else final
        crc = None if parts else zlib.crc32(body if body is not None else b"")
        head = json.dumps(e.header(crc), separators=(",", ":")).encode() + b"\n"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                _write_all(fd, head, body)
                os.fsync(fd)
            finally:
                os.close(fd)
            if parts:
                os.rename(path, final)
            os.fsync(self._dir_fd)
        except OSError as err:
            try:
                path.unlink()
            except OSError:
                pass
            code = err.errno if err.errno in (_errno.ENOSPC, _errno.EDQUOT, _errno.EACCES) else _errno.EIO
            raise StoreError(f"write-back journal {self.dir}: {err.strerror}", errno=code) from None
        e.path, e.offset = final, len(head)

    def _body(self, e: Entry, start: int = 0, length: int | None = None) -> bytes:
        n = e.size - start if length is None else min(length, e.size - start)
        with open(e.path, "rb") as f:
            f.seek(e.offset + start)
            return f.read(max(0, n))

    # ---- entries ------------------------------------------------------------------------------------

    def _new_entry(self, op: str, key: str, meta: dict | None, size: int, *, if_match: str | None,
                   if_none_match: bool) -> tuple[Entry, Entry | None]:
        """A new entry for ``key`` with its condition resolved against pending entries (lock
        held).  Returns it and the pending entry it replaces, if any."""
        self._seq += 1
        e = Entry(self._seq, op, key, SYNTHETIC + uuid.uuid4().hex, dict(meta or {}), size, time.time())
        q = self._queues.get(key)
        last = q[-1] if q else None
        if last is None:
            if if_match is not None and if_match.startswith(SYNTHETIC):
                real = self._resolved.get(if_match)
                if real is None:
                    raise PreconditionFailed(f"{self._where(key)}: the version this write is based on was "
                                             "not stored (replaced, or lost a conflict)")
                if_match = real
            e.if_match, e.if_none_match = if_match, if_none_match
            return e, None
        exists = last.op == "put"
        if if_none_match and exists:
            raise PreconditionFailed(f"{self._where(key)}: exists")
        if if_match is not None and (not exists or if_match != last.etag):
            raise PreconditionFailed(f"{self._where(key)}: changed since it was read")
        if not last.uploading and last.op == op == "put":
            # the pending version was never sent: this one takes its place and its condition
            e.if_match, e.if_none_match = last.if_match, last.if_none_match
            e.after, e.after_op, e.after_header = last.after, last.after_op, last.after_header
            e.replaces = last.seq
            return e, last
        e.after, e.after_op = last.seq, last.op
        e.after_header = last.meta.get("dsse-h") if last.op == "put" else None
        return e, None

    def _add(self, e: Entry, replaced: Entry | None) -> None:
        """Queue a durable entry (lock held)."""
        q = self._queues.setdefault(e.key, collections.deque())
        if replaced is not None:
            if replaced in q:  # (not when a conflict dropped the key's entries meanwhile)
                q.remove(replaced)
            self._resolved[replaced.etag] = None  # nobody can read that version any more
            try:
                replaced.path.unlink()
            except OSError:
                pass
        q.append(e)
        if q[0] is e:
            self._wake(e.key)

    def _wake(self, key: str) -> None:
        """The first entry of ``key`` may be sent (lock held): one idle worker is woken for it."""
        self._ready.append(key)
        self._work.notify()

    def _await_writing(self, key: str) -> None:
        """Wait until no entry of ``key`` is being written (lock held): the entries of a key keep
        the order of their writes."""
        while key in self._writing:
            self._cv.wait()

    def _claim(self, op: str, key: str, meta: dict | None, size: int, *, if_match: str | None = None,
               if_none_match: bool = False) -> tuple[Entry, Entry | None]:
        """A new entry for ``key`` (lock held, no entry of ``key`` being written), to be written
        by :meth:`_commit` outside the lock; the entry it replaces is not sent meanwhile."""
        e, replaced = self._new_entry(op, key, meta, size, if_match=if_match, if_none_match=if_none_match)
        if replaced is not None:
            replaced.replacing = True
        self._writing.add(key)
        return e, replaced

    def _commit(self, e: Entry, replaced: Entry | None, body) -> str:
        """Write a claimed entry (fsync'ed, outside the lock: other keys' writes and the uploads go
        on meanwhile) and queue it; on failure the entry it would have replaced is sent again."""
        written = False
        try:
            self._write_entry(e, body)
            written = True
        finally:
            with self._cv:
                self._writing.discard(e.key)
                if written:
                    self._add(e, replaced)
                elif replaced is not None:
                    replaced.replacing = False
                    q = self._queues.get(e.key)
                    if q and q[0] is replaced:
                        self._wake(e.key)
                self._cv.notify_all()
        return e.etag

    def _journal(self, op: str, key: str, meta: dict | None, body, size: int, *, if_match: str | None = None,
                 if_none_match: bool = False) -> str:
        with self._cv:
            self._await_writing(key)
            e, replaced = self._claim(op, key, meta, size, if_match=if_match, if_none_match=if_none_match)
        return self._commit(e, replaced, body)

    # ---- the ObjectStore interface ------------------------------------------------------------------

    def __getattr__(self, name: str):
        return getattr(self.__dict__["inner"], name)

    url = property(lambda self: self.inner.url)
    context_name = property(lambda self: self.inner.context_name)
    supports_conditional_writes = property(lambda self: self.inner.supports_conditional_writes)
    parallel_requests = property(lambda self: self.inner.parallel_requests)
    max_segment_bytes = property(lambda self: self.inner.max_segment_bytes)

    def _where(self, key: str) -> str:
        return f"{self.url.rstrip('/')}/{key}"

    def _pending(self, key: str) -> Entry | None:
        q = self._queues.get(key)
        return q[-1] if q else None

    def _real_etag(self, etag: str | None, key: str) -> str | None:
        if etag is None or not etag.startswith(SYNTHETIC):
            return etag
        real = self._resolved.get(etag)
        if real is None:
            raise PreconditionFailed(f"{self._where(key)}: the version read was replaced before it was stored")
        return real

    def head(self, key: str, *, prefix: int = 0) -> ObjectInfo:
        with self._cv:
            e = self._pending(key)
        if e is None:
            return self.inner.head(key, prefix=prefix)
        if e.op == "delete":
            raise ObjectNotFound(f"{self._where(key)}: no such object")
        try:
            body = self._body(e, 0, prefix) if prefix else None
        except FileNotFoundError:  # uploaded or replaced meanwhile: ask again
            return self.head(key, prefix=prefix)
        return ObjectInfo(key, e.size, e.etag, e.mtime, dict(e.meta), prefix=body)

    def get_range(self, key: str, start: int, length: int, *, if_match: str | None = None):
        with self._cv:
            e = self._pending(key)
            if e is None:
                real = self._real_etag(if_match, key)
        if e is None:
            return self.inner.get_range(key, start, length, if_match=real)
        if e.op == "delete":
            raise ObjectNotFound(f"{self._where(key)}: no such object")
        if if_match is not None and if_match != e.etag:
            raise PreconditionFailed(f"{self._where(key)}: changed since it was read")
        try:
            return self._body(e, start, length), e.size
        except FileNotFoundError:
            return self.get_range(key, start, length, if_match=if_match)

    def put(self, key: str, body, metadata: dict[str, str], *, if_match: str | None = None,
            if_none_match: bool = False, crc32: int | None = None) -> str:
        if _own_record(key):  # epoch and rename records are stored before what depends on them
            return self.inner.put(key, body, metadata, if_match=if_match, if_none_match=if_none_match,
                                  crc32=crc32)
        view = memoryview(body)
        return self._journal("put", key, metadata, view, view.nbytes, if_match=if_match,
                             if_none_match=if_none_match)

    def begin_upload(self, key: str, metadata: dict[str, str], *, if_match: str | None = None,
                     if_none_match: bool = False, size_hint: int | None = None) -> Upload:
        if _own_record(key):
            return self.inner.begin_upload(key, metadata, if_match=if_match, if_none_match=if_none_match,
                                           size_hint=size_hint)
        return _JournalUpload(self, key, metadata, if_match, if_none_match)

    def copy(self, src: str, dst: str, metadata: dict[str, str], *, if_match: str | None = None,
             if_none_match: bool = False) -> str:
        with self._cv:
            s, d = self._pending(src), self._pending(dst)
        if s is not None and s.op == "put":
            try:
                body = self._body(s)
            except FileNotFoundError:  # uploaded meanwhile: copy in the store
                return self.copy(src, dst, metadata, if_match=if_match, if_none_match=if_none_match)
            if src == dst and if_match is not None and if_match != s.etag:
                raise PreconditionFailed(f"{self._where(dst)}: changed since it was read")
            return self._journal("put", dst, metadata, body, len(body), if_match=if_match,
                                 if_none_match=if_none_match)
        if s is not None:
            raise ObjectNotFound(f"{self._where(src)}: no such object")
        if d is not None:
            self.settle(dst)  # what is pending for dst goes first
        with self._cv:
            real = self._real_etag(if_match, dst)
        return self.inner.copy(src, dst, metadata, if_match=real, if_none_match=if_none_match)

    def delete(self, key: str) -> None:
        if _own_record(key):
            return self.inner.delete(key)
        with self._cv:
            self._await_writing(key)
            q = self._queues.get(key)
            if not q:
                entry = None
            elif all(e.op == "put" and not e.uploading for e in q) and q[0].if_none_match and q[0].after is None:
                # created and never sent: nothing to delete in the store
                for e in list(q):
                    self._resolved[e.etag] = None
                    try:
                        e.path.unlink()
                    except OSError:
                        pass
                del self._queues[key]
                return
            elif q[-1].op == "delete":
                return
            else:
                entry, _ = self._claim("delete", key, None, 0)
        if entry is None:
            self.inner.delete(key)
        else:
            self._commit(entry, None, None)

    def delete_many(self, keys) -> list:
        direct, failures = [], []
        for key in keys:
            with self._cv:
                pending = key in self._queues
            if pending:
                try:
                    self.delete(key)
                except StoreError as e:
                    failures.append((key, e))
            else:
                direct.append(key)
        if direct:
            many = getattr(self.inner, "delete_many", None)
            if many is not None:
                failures.extend(many(direct))
            else:
                for key in direct:
                    try:
                        self.inner.delete(key)
                    except StoreError as e:
                        failures.append((key, e))
        return failures

    def list(self, prefix: str = "", delimiter: str | None = "/") -> Iterator[ObjectInfo | str]:
        with self._cv:
            pending = {k: q[-1] for k, q in self._queues.items() if k.startswith(prefix)}
        if not pending:
            yield from self.inner.list(prefix, delimiter)
            return
        items: dict[str, ObjectInfo | str] = {}
        for it in self.inner.list(prefix, delimiter):
            items[it if isinstance(it, str) else it.key] = it
        for key, e in pending.items():
            rest = key[len(prefix):]
            if delimiter and delimiter in rest:
                if e.op == "put":
                    p = prefix + rest[:rest.index(delimiter) + len(delimiter)]
                    items.setdefault(p, p)
            elif e.op == "put":
                items[key] = ObjectInfo(key, e.size, e.etag, e.mtime)
            else:
                items.pop(key, None)
        for name in sorted(items):
            yield items[name]

    def list_uploads(self, prefix: str = "") -> Iterator[PendingUpload]:
        return self.inner.list_uploads(prefix)

    def abort_upload(self, key: str, upload_id: str) -> None:
        self.inner.abort_upload(key, upload_id)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
            self._work.notify_all()
        for t in self._threads:
            t.join(timeout=5)
        self._close_fds()
        self.inner.close()

    def _close_fds(self) -> None:
        for fd in (self._dir_fd, self._lock_fd):
            try:
                os.close(fd)
            except OSError:
                pass

    # ---- waiting ------------------------------------------------------------------------------------

    def settle(self, key: str) -> None:
        """Return once every entry of ``key`` written so far is stored; raise the error of an
        attempt that failed after this call began (the entry stays and is retried)."""
        with self._cv:
            q = self._queues.get(key)
            if not q:
                return
            last = q[-1]
            start = {e.seq: e.attempts for e in q}
            self._retry_now(key)
            while True:
                q = self._queues.get(key)
                if not q or all(e.seq > last.seq for e in q):
                    lost = self._conflicted.get(key)
                    if lost is not None and lost[0] >= last.seq:
                        raise StoreError(f"{self._where(key)}: changed by another client before this "
                                         f"version was stored; it was saved as {lost[1]} (conflict)",
                                         errno=_errno.EIO)
                    return
                head = q[0]
                if head.error is not None and head.attempts > start.get(head.seq, 0):
                    raise StoreError(f"{self._where(key)}: not stored yet: {head.error}",
                                     errno=getattr(head.error, "errno", None) or _errno.EIO)
                self._cv.wait(1.0)

    def settle_under(self, prefix: str) -> None:
        """:meth:`settle` every key directly below ``prefix`` (``fsync`` of a directory: its
        names are stored once their entries are)."""
        with self._cv:
            keys = [k for k in self._queues if k.startswith(prefix) and "/" not in k[len(prefix):].rstrip("/")]
        for key in keys:
            self.settle(key)

    def drain(self, timeout: float | None = None) -> list[tuple[str, BaseException]]:
        """Wait until the journal is empty, or every key left has failed once more (the store is
        unreachable): returns those keys with their errors; their entries stay for the next
        mount."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            start = {q[0].seq: q[0].attempts for q in self._queues.values() if q}
            for key in list(self._queues):
                self._retry_now(key)
            while self._queues:
                stuck = [(k, q[0].error) for k, q in self._queues.items()
                         if q[0].error is not None and q[0].attempts > start.get(q[0].seq, 0)]
                if len(stuck) == len(self._queues):
                    return stuck
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return [(k, q[0].error or StoreError("not stored yet", errno=_errno.EIO))
                            for k, q in self._queues.items()]
                self._cv.wait(1.0 if left is None else min(1.0, left))
            return []

    def _retry_now(self, key: str) -> None:
        q = self._queues.get(key)
        if q and q[0].error is not None and not q[0].uploading and q[0].next_try > 0:
            q[0].next_try = 0.0
            self._wake(key)

    def stats(self) -> dict:
        with self._cv:
            entries = [e for q in self._queues.values() for e in q]
            return {"entries": len(entries), "bytes": sum(e.size for e in entries),
                    "keys": len(self._queues), "uploading": sum(e.uploading for e in entries),
                    "uploaded": self.uploaded, "failed_attempts": self.failed_attempts,
                    "conflicts": len(self.conflicts),
                    "recent_conflicts": [{"object": k, "saved_as": v} for k, v in self.conflicts[-5:]],
                    "dir": str(self.dir)}

    # ---- uploading ----------------------------------------------------------------------------------

    def _next(self) -> Entry | None:
        """The next entry to upload (lock held), or None."""
        now = time.monotonic()
        while self._waiting and self._waiting[0][0] <= now:
            _, _, key = heapq.heappop(self._waiting)
            self._ready.append(key)
        while self._ready:
            key = self._ready.popleft()
            q = self._queues.get(key)
            if not q or q[0].uploading or q[0].replacing or q[0].next_try > now:
                continue
            q[0].uploading = True
            return q[0]
        return None

    def _worker(self) -> None:
        while True:
            with self._cv:
                e = None
                while not self._closed:
                    e = self._next()
                    if e is not None:
                        break
                    wait = self._waiting[0][0] - time.monotonic() if self._waiting else None
                    self._work.wait(wait if wait is None or wait > 0 else 0.01)
                if self._closed:
                    if e is not None:
                        e.uploading = False
                    return
            try:
                try:
                    result = self._upload(e)
                except PreconditionFailed as err:
                    self._conflict(e, err)
                except Exception as err:  # noqa: BLE001 - kept and retried; settle/drain report it
                    self._failed(e, err)
                else:
                    self._done(e, result)
            except Exception as err:  # noqa: BLE001 - a worker never dies: the entry is retried
                log.exception("event=journal_worker_error object=%s", self._where(e.key))
                self._failed(e, err)

    def _condition(self, e: Entry) -> tuple[str | None, bool]:
        """(if_match, if_none_match) for uploading ``e`` (its earlier entries are stored)."""
        if e.after is None:
            return e.if_match, e.if_none_match
        if e.after in self._after_etag:
            result = self._after_etag[e.after]
            return (None, True) if e.after_op == "delete" else (result, False)
        # after a crash: the earlier entry was uploaded, its result was not recorded
        if e.after_op == "delete":
            return None, True
        try:
            info = self.inner.head(e.key)
        except ObjectNotFound:
            raise PreconditionFailed(f"{self._where(e.key)}: deleted by another client") from None
        if info.metadata.get("dsse-h") != e.after_header:
            raise PreconditionFailed(f"{self._where(e.key)}: changed by another client")
        return info.etag, False

    def _upload(self, e: Entry) -> str | None:
        if e.op == "delete":
            self.inner.delete(e.key)
            return None
        if_match, if_none_match = self._condition(e)
        try:
            if e.size <= MULTIPART:
                return self.inner.put(e.key, self._body(e), e.meta, if_match=if_match,
                                      if_none_match=if_none_match)
            return self._upload_parts(e, if_match, if_none_match)
        except (PreconditionFailed, StoreError) as err:
            if isinstance(err, StoreError) and not isinstance(err, PreconditionFailed) and e.size <= MULTIPART:
                raise
            # a retried request whose first attempt was applied finds our own version
            try:
                info = self.inner.head(e.key)
            except ObjectNotFound:
                raise err from None
            except StoreError as unknown:
                # the read-back failed (after the store's retries): the outcome is unknown, which
                # is no conflict; the entry stays and is uploaded again later
                raise unknown from err
            if _same_dsse(info.metadata, e.meta):
                log.info("event=write_confirmed object=%s reason='the store refused a retried request "
                         "(%s) whose first attempt had stored this version'", self._where(e.key),
                         type(err).__name__)
                return info.etag
            raise

    def _upload_parts(self, e: Entry, if_match: str | None, if_none_match: bool) -> str:
        up = self.inner.begin_upload(e.key, e.meta, if_match=if_match, if_none_match=if_none_match,
                                     size_hint=e.size)
        try:
            number = 1
            for start in range(0, e.size, UPLOAD_PART):
                up.put_part(number, self._body(e, start, UPLOAD_PART))
                number += 1
            return up.complete()
        except BaseException:
            up.abort()
            raise

    def _done(self, e: Entry, result: str | None) -> None:
        with self._cv:
            q = self._queues[e.key]
            q.popleft()
            e.uploading = False
            self._after_etag.pop(e.after, None)
            if result is not None:
                self._remember(e.etag, result)
            if q or e.key in self._writing:  # the next entry's condition is what this one stored
                self._after_etag[e.seq] = result
            if q:
                self._wake(e.key)
            else:
                del self._queues[e.key]
            self.uploaded += 1
            # removed before anyone is told: once settle() or drain() returns, the journal holds
            # no file of it (a reader that took the entry before finds the file gone and asks
            # the store)
            try:
                e.path.unlink()
            except OSError:
                pass
            self._cv.notify_all()

    def _remember(self, synthetic: str, real: str | None) -> None:
        self._resolved[synthetic] = real
        self._resolved.move_to_end(synthetic)
        while len(self._resolved) > RESOLVED_MAX:
            self._resolved.popitem(last=False)

    def _failed(self, e: Entry, err: BaseException) -> None:
        with self._cv:
            e.uploading = False
            e.attempts += 1
            e.error = err
            delay = min(BACKOFF_MAX, 0.5 * 2 ** min(e.attempts - 1, 10))
            e.next_try = time.monotonic() + delay
            heapq.heappush(self._waiting, (e.next_try, e.seq, e.key))
            self.failed_attempts += 1
            self._cv.notify_all()
            self._work.notify()  # an idle worker waits for the earliest retry
        log.warning("event=journal_upload_failed object=%s attempt=%d retry_in=%.1fs reason=%s",
                    self._where(e.key), e.attempts, delay, str(err).splitlines()[0] if str(err) else type(err).__name__)

    def _conflict(self, e: Entry, err: BaseException) -> None:
        """Another client changed ``e.key``: save the newest pending version of it under another
        name (``on_conflict``) and drop the key's entries."""
        with self._cv:
            q = list(self._queues.get(e.key, ()))
        newest = next((x for x in reversed(q) if x.op == "put"), None)
        saved_as = "-"
        if newest is not None:
            if self.on_conflict is None:
                self._failed(e, err)
                return
            try:
                saved_as = self.on_conflict(e.key, dict(newest.meta), self._body(newest))
            except Exception as copy_err:  # noqa: BLE001 - kept; retried like a failed upload
                self._failed(e, copy_err)
                return
        with self._cv:
            for x in q:
                self._resolved[x.etag] = None
                try:
                    x.path.unlink()
                except OSError:
                    pass
            self._queues.pop(e.key, None)
            self.conflicts.append((self._where(e.key), saved_as))
            self._conflicted[e.key] = (q[-1].seq if q else e.seq, saved_as)
            self._cv.notify_all()
        log.warning("event=conflict_copy object=%s saved_as=%s reason='another client changed it before "
                    "the write-back upload (%s); the local version was saved under a new name'",
                    self._where(e.key), saved_as, str(err).splitlines()[0] if str(err) else "precondition failed")


class _JournalUpload(Upload):
    """A multipart upload into the journal: parts go to temporary files, ``complete`` makes them
    one entry."""

    def __init__(self, journal: JournalStore, key: str, meta: dict, if_match, if_none_match):
        self.journal, self.key, self.meta = journal, key, dict(meta)
        self.if_match, self.if_none_match = if_match, if_none_match
        self.upload_id = uuid.uuid4().hex
        self.parts: dict[int, Path] = {}
        self._lock = threading.Lock()

    def put_part(self, number: int, data) -> None:
        p = self.journal.dir / f"upload-{self.upload_id}-{number:05d}.tmp"
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_buffers(fd, [data])
        except OSError as e:
            raise StoreError(f"write-back journal {self.journal.dir}: {e.strerror}", errno=_errno.EIO) from None
        finally:
            os.close(fd)
        with self._lock:
            self.parts[number] = p

    def complete(self) -> str:
        with self._lock:
            numbers = sorted(self.parts)
        if numbers != list(range(1, len(numbers) + 1)):
            raise StoreError("multipart upload is missing parts", errno=_errno.EINVAL)
        size = sum(self.parts[n].stat().st_size for n in numbers)
        try:
            return self.journal._journal("put", self.key, self.meta, _PartsBody(self.parts, numbers), size,
                                         if_match=self.if_match, if_none_match=self.if_none_match)
        finally:
            self.abort()

    def abort(self) -> None:
        with self._lock:
            parts, self.parts = self.parts, {}
        for p in parts.values():
            try:
                p.unlink()
            except OSError:
                pass


class _PartsBody:
    """The parts of a journal upload, written into an entry file one after another."""

    def __init__(self, parts: dict[int, Path], numbers: list[int]):
        self.files = [parts[n] for n in numbers]


def _parse_entry(path: Path, line: bytes, h) -> Entry:
    """The entry of header ``h`` (parsed from ``line``, the first line of ``path``); raises
    ValueError, KeyError or TypeError if it is not one."""
    if h.get("format") != FORMAT:
        raise ValueError(f"format {h.get('format')!r}")
    e = Entry(seq=int(h["seq"]), op=h["op"], key=h["key"], etag=h["etag"], meta=dict(h["meta"]),
              size=int(h["size"]), mtime=float(h["mtime"]), if_match=h["if_match"],
              if_none_match=bool(h["if_none_match"]), after=h["after"], after_op=h["after_op"],
              after_header=h["after_header"], replaces=h["replaces"])
    e.path, e.offset = path, len(line)
    return e


def entry_files(directory: str | os.PathLike) -> list[Path]:
    """The entry files in a journal directory (versions not uploaded yet, or cut short)."""
    d = Path(directory)
    return sorted([*d.glob("*" + ENTRY_SUFFIX), *d.glob("*" + CHECKED_SUFFIX)])


def _write_all(fd: int, head: bytes, body) -> None:
    """``head`` and then ``body`` (bytes-like, a :class:`_PartsBody`, or None) into ``fd``."""
    if isinstance(body, _PartsBody):
        _write_buffers(fd, [head])
        for p in body.files:
            src = os.open(p, os.O_RDONLY)
            try:
                left = os.fstat(src).st_size
                while left:
                    n = os.copy_file_range(src, fd, left)
                    if n == 0:
                        raise OSError(_errno.EIO, "short copy")
                    left -= n
            finally:
                os.close(src)
        return
    _write_buffers(fd, [head] if body is None else [head, body])


def _write_buffers(fd: int, buffers: list) -> None:
    views = [memoryview(b).cast("B") for b in buffers]
    views = [v for v in views if v.nbytes]
    while views:
        n = os.writev(fd, views)
        while views and n >= views[0].nbytes:
            n -= views[0].nbytes
            views.pop(0)
        if n:
            views[0] = views[0][n:]


def _own_record(key: str) -> bool:
    """Keys below a ``.dssefs`` segment: dssefs's own records, written through at once."""
    return ".dssefs" in key.split("/")


def _same_dsse(stored: dict[str, str], sent: dict[str, str]) -> bool:
    def dsse(meta: dict[str, str]) -> dict[str, str]:
        return {k.lower(): v for k, v in meta.items() if k.lower().startswith("dsse-")}

    return bool(dsse(sent)) and dsse(stored) == dsse(sent)
