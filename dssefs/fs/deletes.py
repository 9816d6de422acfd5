"""Background deletes: ``unlink`` and ``rmdir`` return once the name is gone from the mount; the
objects' DELETEs follow in the background, batched (``delete_many``: DeleteObjects on S3, up to
1,000 keys per request).

:class:`DeleteQueue` holds the keys whose delete is pending.  Its rules:

* **Gone at once for this mount.**  :attr:`DeleteQueue.view` is the store as this mount sees it:
  ``head`` and ``get_range`` of a pending key answer ``ObjectNotFound`` without a request, and
  listings leave pending keys out (and a common prefix whose every key is pending, after one
  recursive listing of it).  Lookups, ``readdir`` and ``rmdir``'s emptiness check all read the
  store through it.
* **In order with later writes of the same key.**  A write of a key whose delete is pending
  settles that delete first (:meth:`DeleteQueue.settle_sync`, in the writing worker thread: it
  waits for the batch that carries the key, or sends the key's DELETE itself), so a later DELETE
  never removes a newer object and a create conditional on absence (``If-None-Match``) finds the
  name free.  A crash in between leaves the old object or none, never a new object deleted.
* **Failures are retried.**  botocore retries each request; a key that a request could not delete
  stays pending and is sent again after a backoff (0.5 s, doubling up to 30 s).  Each key's first
  failure is logged (``event=delete_failed object=...``), and every failed request once
  (``event=delete_failed keys=N attempt=...``).
* **Waiting.**  ``fsync`` of a directory waits for the deletes below it (:meth:`DeleteQueue.sync`),
  unmount for every one (:meth:`DeleteQueue.drain`): each pending key is sent at least once more,
  and those that fail again are reported, so an unreachable store cannot hold the unmount forever.
* **Crash.**  Pending deletes live in memory only: after a crash their objects are still in the
  store and reappear at the next mount, as entries removed on a local file system without an
  ``fsync`` of their directory may.

Threads: one lock guards the state.  The view and :meth:`DeleteQueue.settle_sync` run in worker
threads; the sender runs on the trio loop and sends its batches in threads of its own limiter
(never the file system's: a writer holding one of those may be waiting for a batch).
"""

from __future__ import annotations

import collections
import errno
import heapq
import itertools
import logging
import math
import threading
import time
from typing import Callable, Iterable, Iterator

import trio

from ..envelope.epoch import RESERVED_NAME
from ..errors import DssefsError, ObjectNotFound, StoreError
from ..store.base import DELETE_MANY_MAX, ObjectInfo, ObjectStore, PendingUpload, Upload
from .common import FsError

log = logging.getLogger("dssefs.fs")

MAX_BATCHES = 4  # delete_many requests in flight at once (more than one only for full batches)
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0

READY, SENDING, WAITING = "ready", "sending", "waiting"


def _parents(key: str) -> Iterator[str]:
    """Every directory prefix of ``key`` ("a/", "a/b/" for "a/b/c" and for the marker "a/b/")."""
    i = key.find("/")
    while i >= 0:
        yield key[:i + 1]
        i = key.find("/", i + 1)


def _backoff(attempts: int) -> float:
    return min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** min(attempts - 1, 10))


def _reason(error: BaseException) -> str:
    text = str(error).replace("\n", " ")
    return text if isinstance(error, DssefsError) else f"{type(error).__name__}: {text}"


class _Pending:
    __slots__ = ("key", "added", "state", "attempts", "error", "next_try")

    def __init__(self, key: str):
        self.key = key
        self.added = time.monotonic()
        self.state = READY
        self.attempts = 0  # failed attempts so far
        self.error: BaseException | None = None
        self.next_try = 0.0


class DeleteQueue:
    """The pending deletes of one mount over ``store`` (the store its Vault writes to)."""

    def __init__(self, store: ObjectStore, *, batch_max: int = DELETE_MANY_MAX,
                 max_batches: int = MAX_BATCHES):
        self.store = store
        self.url = store.url.rstrip("/")
        self.batch_max = max(1, min(batch_max, DELETE_MANY_MAX))
        self.max_batches = max(1, max_batches)
        self.view = PendingDeletesView(store, self)
        self._cv = threading.Condition()
        self._pending: dict[str, _Pending] = {}
        self._below: collections.Counter[str] = collections.Counter()  # prefix -> pending keys under it
        # directories rmdir removed while deletes below them are pending: listings leave them out
        # without listing what is below them (see dir_removed)
        self._gone_dirs: set[str] = set()
        self._records: set[str] = set()  # directory prefixes whose listing showed '.dssefs' records
        self._ready: collections.deque[_Pending] = collections.deque()
        self._retry: list[tuple[float, int, _Pending]] = []  # heap of keys waiting for their backoff
        self._tick = itertools.count()
        self._in_flight = 0  # batches the sender is sending
        self._limiter = trio.CapacityLimiter(self.max_batches)
        self._token: trio.lowlevel.TrioToken | None = None
        self._changed = trio.Event()  # set and replaced at every change (see _poke)
        self._running = False
        # listings in progress see the store as it was when they were answered, maybe before a
        # delete that completes while they are read: keys deleted since a listing began stay
        # hidden from it (``_done``: key -> completion number, kept while an older listing runs)
        self._completions = 0
        self._listings: collections.Counter[int] = collections.Counter()  # start -> listings running
        self._done: dict[str, int] = {}
        self._done_below: dict[str, int] = {}  # prefix -> last completion of a key below it
        self.deleted = 0
        self.requests = 0
        self.failed_attempts = 0
        self.last_error: str | None = None

    # ---- questions the view asks (any thread) ------------------------------------------------

    def pending(self, key: str) -> bool:
        """The delete of ``key`` was asked for and is not done: the key is gone for this mount."""
        return key in self._pending

    def listing_begins(self) -> int:
        with self._cv:
            self._listings[self._completions] += 1
            return self._completions

    def listing_ends(self, start: int) -> None:
        with self._cv:
            self._listings[start] -= 1
            if not self._listings[start]:
                del self._listings[start]
            if not self._listings:
                self._done.clear()
                self._done_below.clear()
            elif len(self._done) > 4096:  # only what a listing still running may need
                oldest = min(self._listings)
                self._done = {k: n for k, n in self._done.items() if n > oldest}
                self._done_below = {k: n for k, n in self._done_below.items() if n > oldest}

    def hidden(self, key: str, since: int) -> bool:
        """``key``, listed by a listing that began at ``since`` (:meth:`listing_begins`), is gone
        for this mount: pending, or deleted after the listing began."""
        return key in self._pending or self._done.get(key, -1) > since

    def hidden_below(self, prefix: str, since: int) -> bool:
        """Some key below ``prefix`` is pending, or was deleted after ``since``."""
        return self._below.get(prefix, 0) > 0 or self._done_below.get(prefix, -1) > since

    def saw_records(self, prefix: str) -> None:
        self._records.add(prefix)

    def records_dropped(self, prefix: str) -> None:
        self._records.discard(prefix)

    def has_records(self, prefix: str) -> bool:
        """A listing of the directory ``prefix`` through the view showed dssefs's own '.dssefs'
        records (epoch records of objects 'dssefs put' wrote there): only a listing finds them."""
        return prefix in self._records

    def gone_dir(self, prefix: str) -> bool:
        """``prefix`` is a directory rmdir removed, with deletes below it still pending."""
        return prefix in self._gone_dirs

    def removed(self, key: str) -> bool:
        """``key`` (a name's path) was removed through this mount, as a file or as a directory,
        and a delete of it (or below it) is pending."""
        return key in self._pending or key + "/" in self._pending or key + "/" in self._gone_dirs

    def __len__(self) -> int:
        return len(self._pending)

    # ---- asking for deletes (trio thread) ---------------------------------------------------------

    def add(self, key: str) -> None:
        """Delete ``key`` in the background; from now on it is gone for this mount."""
        with self._cv:
            if key in self._pending:
                return
            e = self._pending[key] = _Pending(key)
            for p in _parents(key):
                self._below[p] += 1
            self._ready.append(e)
        self._start()

    def dir_removed(self, prefix: str) -> None:
        """rmdir removed the directory ``prefix`` (its listing, seen through the view, was empty):
        until the deletes pending below it are done, listings leave it out at once, instead of
        listing what is below it to find every key there pending."""
        with self._cv:
            if self._below.get(prefix, 0) > 0:
                self._gone_dirs.add(prefix)

    def _revive(self, key: str) -> None:
        """``key`` is about to be written: the directories above it exist again."""
        if self._gone_dirs:
            with self._cv:
                for p in _parents(key):
                    self._gone_dirs.discard(p)

    def _remove(self, e: _Pending) -> None:
        """Lock held: ``e``'s delete is done."""
        del self._pending[e.key]
        self._completions += 1
        if self._listings:
            self._done[e.key] = self._completions
            for p in _parents(e.key):
                self._done_below[p] = self._completions
        for p in _parents(e.key):
            n = self._below[p] - 1
            if n:
                self._below[p] = n
            else:
                del self._below[p]
                self._gone_dirs.discard(p)  # a listing that shows it now shows what is there

    def _start(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        if not self._running:
            self._running = True
            trio.lowlevel.spawn_system_task(self._sender, name="dssefs-deletes")
        self._poke()

    def _poke(self) -> None:
        """Wake the sender and every waiter (trio thread)."""
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    def _poke_from_thread(self) -> None:
        token = self._token
        if token is not None:
            try:
                token.run_sync_soon(self._poke)
            except trio.RunFinishedError:
                pass

    # ---- the sender (trio thread) -------------------------------------------------------------

    async def _sender(self) -> None:
        try:
            while True:
                async with trio.open_nursery() as nursery:
                    while True:
                        changed = self._changed
                        batch, wait = self._next_batch()
                        if batch:
                            nursery.start_soon(self._send, batch)
                        elif wait is None:
                            break  # nothing pending
                        else:
                            with trio.move_on_after(wait):
                                await changed.wait()
                if not self._pending:  # no checkpoint since the nursery closed: nothing new came in
                    return
        except Exception:  # noqa: BLE001 - a system task must not crash the mount; the next add restarts it
            log.exception("event=delete_queue_error pending=%d", len(self._pending))
        finally:
            self._running = False

    def _next_batch(self) -> tuple[list[_Pending] | None, float | None]:
        """The next batch to send and mark sending, or (None, seconds to wait) with ``None``
        when nothing is pending.  One batch at a time, more only while full ones are waiting:
        keys that come in while a batch is on its way go together in the next one."""
        with self._cv:
            now = time.monotonic()
            while self._retry and self._retry[0][0] <= now:
                _, _, e = heapq.heappop(self._retry)
                if self._pending.get(e.key) is e and e.state == WAITING and e.next_try <= now:
                    e.state = READY
                    self._ready.append(e)
            if not self._pending:
                return None, None
            batch: list[_Pending] = []
            if self._in_flight == 0 or (self._in_flight < self.max_batches
                                        and len(self._ready) >= self.batch_max):
                while self._ready and len(batch) < self.batch_max:
                    e = self._ready.popleft()
                    if self._pending.get(e.key) is e and e.state == READY:
                        e.state = SENDING
                        batch.append(e)
            if batch:
                self._in_flight += 1
                return batch, 0.0
            return None, (self._retry[0][0] - now if self._retry else math.inf)

    def _delete_many(self, keys: list[str]) -> list:
        many = getattr(self.store, "delete_many", None)
        return many(keys) if many is not None else ObjectStore.delete_many(self.store, keys)

    async def _send(self, batch: list[_Pending]) -> None:
        keys = [e.key for e in batch]
        try:
            failures = await trio.to_thread.run_sync(self._delete_many, keys, limiter=self._limiter)
        except Exception as err:  # noqa: BLE001 - stores report failures; anything else fails the batch too
            failures = [(k, err) for k in keys]
        self._finish(batch, failures)

    def _failed(self, e: _Pending, error: BaseException, now: float) -> None:
        """Lock held: ``e`` stays pending and is tried again after its backoff."""
        e.attempts += 1
        e.error = error
        e.state = WAITING
        e.next_try = now + _backoff(e.attempts)
        heapq.heappush(self._retry, (e.next_try, next(self._tick), e))
        self.failed_attempts += 1
        self.last_error = _reason(error)

    def _finish(self, batch: list[_Pending], failures: list) -> None:
        failed = dict(failures)
        now = time.monotonic()
        first: list[_Pending] = []
        recovered = 0
        with self._cv:
            self._in_flight -= 1
            self.requests += 1
            for e in batch:
                error = failed.get(e.key)
                if error is None:
                    self._remove(e)
                    self.deleted += 1
                    recovered += e.attempts > 0
                else:
                    self._failed(e, error, now)
                    if e.attempts == 1:
                        first.append(e)
            self._cv.notify_all()
        self._poke()
        for e in first:
            log.warning("event=delete_failed object=%s/%s errno=%s reason=%s effect='the name stays removed "
                        "in this mount; the delete is retried'", self.url, e.key,
                        errno.errorcode.get(getattr(e.error, "errno", None), "EIO"), _reason(e.error))
        if failed:
            error = next(iter(failed.values()))
            attempt = max(e.attempts for e in batch if e.key in failed)
            log.warning("event=delete_failed keys=%d of=%d attempt=%d retry_in=%.1fs errno=%s reason=%s",
                        len(failed), len(batch), attempt, _backoff(attempt),
                        errno.errorcode.get(getattr(error, "errno", None), "EIO"), _reason(error))
        if recovered:
            log.info("event=delete_retried keys=%d effect='deleted after failed attempts'", recovered)

    # ---- writes of a pending key (worker threads) -----------------------------------------------

    def settle_sync(self, key: str) -> bool:
        """Before a write of ``key``: if its delete is pending, wait for the batch carrying it, or
        send its DELETE now (a failure is raised: the write must not go ahead).  True when a
        pending delete was settled, False when there was none.  Blocking; worker threads only."""
        self._revive(key)
        if key not in self._pending:
            self._done.pop(key, None)  # written again: a listing that shows it is right
            return False
        with self._cv:
            while True:
                e = self._pending.get(key)
                if e is None:
                    return True
                if e.state != SENDING:
                    e.state = SENDING  # ours now: the sender leaves it alone
                    break
                self._cv.wait()
        try:
            self.store.delete(key)
        except BaseException as err:
            with self._cv:
                self._failed(e, err, time.monotonic())
                self._cv.notify_all()
            self._poke_from_thread()
            raise
        with self._cv:
            self._remove(e)
            self._done.pop(key, None)  # about to be written again
            self.deleted += 1
            self._cv.notify_all()
        self._poke_from_thread()
        return True

    # ---- waiting (trio thread) ------------------------------------------------------------------

    async def _wait(self, match: Callable[[str], bool]) -> list[tuple[str, BaseException]]:
        """Send every pending key that ``match``es now (backoffs are cut short) and wait until
        each is deleted or has failed once more; returns those that failed."""
        with self._cv:
            watched = [(e, e.attempts) for e in self._pending.values() if match(e.key)]
            for e, _ in watched:
                if e.state == WAITING:
                    e.state = READY
                    e.next_try = 0.0
                    self._ready.append(e)
        if not watched:
            return []
        self._start()
        while True:
            changed = self._changed
            with self._cv:
                left = [(e, n) for e, n in watched if self._pending.get(e.key) is e]
                failed = [e for e, n in left if e.attempts > n and e.state != SENDING]
            if not left:
                return []
            if len(failed) == len(left):
                return [(e.key, e.error) for e in failed]
            await changed.wait()

    async def sync(self, prefix: str) -> None:
        """``fsync`` of a directory: the deletes of everything below ``prefix`` (its directory
        prefix) are done before this returns; raises if some still fail."""
        self._raise(await self._wait(lambda k: k.startswith(prefix)), f"{self.url}/{prefix}")

    async def settle_tree(self, key: str) -> None:
        """Before a rename to ``key``: the pending deletes of ``key``, its marker and everything
        below it are done (a copy to a key must not be overtaken by that key's earlier DELETE)."""
        below = key + "/"
        self._revive(below)
        self._raise(await self._wait(lambda k: k == key or k.startswith(below)), f"{self.url}/{key}")

    async def drain(self) -> list[tuple[str, BaseException]]:
        """Unmount: every pending key is sent at least once more; returns ``(object, error)`` of
        those not deleted (they stay in the store and reappear at the next mount)."""
        return [(f"{self.url}/{k}", err) for k, err in await self._wait(lambda k: True)]

    @staticmethod
    def _raise(failures: list[tuple[str, BaseException]], where: str) -> None:
        if not failures:
            return
        error = failures[0][1]
        code = getattr(error, "errno", None) or errno.EIO
        raise FsError(f"{len(failures)} objects below {where} could not be deleted yet ({_reason(error)}); "
                      "the names stay removed in this mount and the deletes are retried", errno=code)

    # ---- status -------------------------------------------------------------------------------------

    def stats(self) -> dict:
        """The backlog, for ``dssefs status``: object names are never listed, only counts."""
        with self._cv:
            states = collections.Counter(e.state for e in self._pending.values())
            oldest = min((e.added for e in self._pending.values()), default=None)
            return {"pending": len(self._pending), "sending": states[SENDING],
                    "waiting_retry": states[WAITING], "oldest_s": round(time.monotonic() - oldest, 1) if oldest is not None else 0.0,
                    "deleted": self.deleted, "requests": self.requests,
                    "failed_attempts": self.failed_attempts, "last_error": self.last_error}


class PendingDeletesView(ObjectStore):
    """``store`` as the mount sees it while deletes are pending (see the module docstring): pending
    keys are absent, and a write of one settles its delete first."""

    def __init__(self, inner: ObjectStore, queue: DeleteQueue):
        self._wrapping(inner)
        self._queue = queue

    def _gone(self, key: str) -> ObjectNotFound:
        return ObjectNotFound(f"{self.url.rstrip('/')}/{key}: no such object (deleted)")

    def head(self, key: str, *, prefix: int = 0) -> ObjectInfo:
        if self._queue.pending(key):
            raise self._gone(key)
        return self.inner.head(key, prefix=prefix)

    def get_range(self, key: str, start: int, length: int, *, if_match: str | None = None
                  ) -> tuple[bytes, int]:
        if self._queue.pending(key):
            raise self._gone(key)
        return self.inner.get_range(key, start, length, if_match=if_match)

    def put(self, key: str, body, metadata: dict[str, str], *, if_match: str | None = None,
            if_none_match: bool = False, crc32: int | None = None) -> str:
        self._queue.settle_sync(key)
        return self.inner.put(key, body, metadata, if_match=if_match, if_none_match=if_none_match, crc32=crc32)

    def begin_upload(self, key: str, metadata: dict[str, str], *, if_match: str | None = None,
                     if_none_match: bool = False, size_hint: int | None = None) -> Upload:
        self._queue.settle_sync(key)
        return self.inner.begin_upload(key, metadata, if_match=if_match, if_none_match=if_none_match,
                                       size_hint=size_hint)

    def copy(self, src: str, dst: str, metadata: dict[str, str], *, if_match: str | None = None,
             if_none_match: bool = False) -> str:
        if self._queue.pending(src):
            raise self._gone(src)
        self._queue.settle_sync(dst)
        return self.inner.copy(src, dst, metadata, if_match=if_match, if_none_match=if_none_match)

    def delete(self, key: str) -> None:
        if not self._queue.settle_sync(key):
            self.inner.delete(key)

    def delete_many(self, keys: Iterable[str]) -> list[tuple[str, StoreError]]:
        return ObjectStore.delete_many(self, keys)

    def list(self, prefix: str = "", delimiter: str | None = "/") -> Iterator[ObjectInfo | str]:
        q = self._queue
        since = q.listing_begins()
        records = prefix + RESERVED_NAME + "/" if delimiter == "/" else None
        try:
            for item in self.inner.list(prefix, delimiter):
                if isinstance(item, str):
                    if item == records:
                        q.saw_records(prefix)
                    if q.gone_dir(item) or (q.hidden_below(item, since) and self._all_gone(item, since)):
                        continue
                elif q.hidden(item.key, since):
                    continue
                yield item
        finally:
            q.listing_ends(since)

    def _all_gone(self, prefix: str, since: int) -> bool:
        """Every key below ``prefix`` is gone for this mount (one recursive listing; it stops at
        the first key that is not)."""
        for item in self.inner.list(prefix, delimiter=None):
            if isinstance(item, str) or not self._queue.hidden(item.key, since):
                return False
        return True

    def list_uploads(self, prefix: str = "") -> Iterator[PendingUpload]:
        return self.inner.list_uploads(prefix)

    def abort_upload(self, key: str, upload_id: str) -> None:
        self.inner.abort_upload(key, upload_id)

    def __getattr__(self, name: str):
        # store-specific extras (a local store's root, a journal's settle) stay reachable
        return getattr(self.__dict__["inner"], name)
