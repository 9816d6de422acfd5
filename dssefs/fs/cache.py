"""The plaintext chunk cache and the content of one file.

Chunks are aligned to the file's chunk size (the object's, so a cached chunk is exactly one
decrypted chunk of the stored version).  The cache is bounded in bytes: least recently used clean
chunks are dropped, dirty chunks beyond the bound are spilled (encrypted) to the staging
directory and read back on demand.  Everything here is blocking and thread-safe (one lock); the
file system calls it from worker threads.  No store I/O happens while the lock is held.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import threading
from collections import OrderedDict

from ..errors import ObjectNotFound, PreconditionFailed
from .spill import SpillArea, SpillFile

_ids = itertools.count(1)
FAST_WRITE_MAX = 1 << 20  # writes up to this size may be done on the event loop (no I/O)

# Read-ahead for sequential readers (see FileContent._note_read and _read_ahead), after
# mountpoint-s3's growing read window.  The window is how far ahead of the reader chunks are kept
# cached or on their way: a new sequential stream starts with READ_AHEAD_MIN; every read that
# moves it on and has to wait doubles the window, up to READ_AHEAD_MAX and a quarter of the cache
# budget (all files' requests in flight together stay within another quarter); a random read
# ends the stream.  The window is fetched in ranged GETs: the first covers READ_AHEAD_MIN, each
# next one is twice as large up to PREFETCH_REQUEST_MAX (S3's usual part size); up to
# PREFETCH_JOBS of one file wait for the store at once, and one that the store has answered
# starts the next while its chunks are decrypted (up to PREFETCH_JOBS more of them).
# PREFETCH_WORKERS threads (for all files) fetch them and decrypt them chunk by chunk, each
# chunk cached as soon as it is verified.  Clean chunks a stream has left more than READ_AHEAD_MIN
# behind are dropped (FileContent._drop_behind): the kernel's page cache holds what it read.
READ_AHEAD_MIN = 4 << 20
READ_AHEAD_MAX = 128 << 20
PREFETCH_REQUEST_MAX = 8 << 20
# ... from a store that answers at once (a local directory): small requests, so that several
# chunks are decrypted in parallel within a small window
LOCAL_REQUEST_MAX = 2 << 20
PREFETCH_JOBS = 4
PREFETCH_IN_FLIGHT = 2 * PREFETCH_JOBS  # of one file: waiting for the store, or decrypted
PREFETCH_WORKERS = 2 * PREFETCH_JOBS


class Chunk:
    """``data``: the chunk's bytes in memory (a bytearray, or the immutable ``bytes`` of the
    write request that replaced the whole chunk; copied on the first partial write), None when
    spilled."""

    __slots__ = ("data", "dirty", "spilled")

    def __init__(self, data: bytearray | bytes | None, dirty: bool):
        self.data, self.dirty, self.spilled = data, dirty, False


class ChunkCache:
    def __init__(self, budget: int, spill: SpillArea | None, request_max: int = PREFETCH_REQUEST_MAX):
        self.lock = threading.RLock()
        self.budget = budget
        # the largest read-ahead request: a store whose requests mostly compute (a local
        # directory: read and decrypt) gets several small ones, decrypted in parallel
        self.request_max = request_max
        self.spill_area = spill
        self.lru: OrderedDict[tuple[int, int], "FileContent"] = OrderedDict()
        self.used = 0
        self.spilled_chunks = 0
        self.prefetching = 0  # bytes of read-ahead requested and not arrived yet (every file)
        self._prefetcher: cf.ThreadPoolExecutor | None = None

    def prefetcher(self) -> cf.ThreadPoolExecutor:
        """Worker threads that read ahead for sequential readers."""
        with self.lock:
            if self._prefetcher is None:
                self._prefetcher = cf.ThreadPoolExecutor(max_workers=PREFETCH_WORKERS,
                                                         thread_name_prefix="dssefs-prefetch")
            return self._prefetcher

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=False, cancel_futures=True)

    def stats(self) -> dict:
        with self.lock:
            return {"used": self.used, "budget": self.budget, "chunks": len(self.lru),
                    "spilled_chunks": self.spilled_chunks, "prefetching": self.prefetching}

    # all helpers below expect self.lock held
    def _touch(self, content: "FileContent", idx: int) -> None:
        key = (content.id, idx)
        if key in self.lru:
            self.lru.move_to_end(key)
        else:
            self.lru[key] = content

    def _forget(self, content: "FileContent", idx: int) -> None:
        ch = content.chunks.pop(idx, None)
        if ch is None:
            return
        if ch.data is not None:
            self.used -= len(ch.data)
            self.lru.pop((content.id, idx), None)
        if ch.spilled:
            self.spilled_chunks -= 1

    def _enforce(self) -> None:
        while self.used > self.budget and self.lru:
            (cid, idx), content = self.lru.popitem(last=False)
            ch = content.chunks.get(idx)
            if ch is None or ch.data is None:
                continue
            if ch.dirty:
                if self.spill_area is None:
                    self.lru[(cid, idx)] = content  # nowhere to spill: keep it (over budget)
                    self.lru.move_to_end((cid, idx), last=False)
                    return
                if not ch.spilled:
                    content._spill().write(idx, ch.data)
                    ch.spilled = True
                    self.spilled_chunks += 1
                self.used -= len(ch.data)
                ch.data = None
            else:
                self.used -= len(ch.data)
                del content.chunks[idx]


class FileContent:
    """The bytes of one open file: a stored base version plus local (dirty) chunks.

    ``base`` has ``size``, ``chunk_size`` and ``read_chunks(range)`` (an OpenObject or a foreign
    object reader).  Bytes at or beyond ``base_limit`` never come from the base: they were
    truncated away locally.
    """

    def __init__(self, cache: ChunkCache, base, chunk_size: int, size: int):
        self.id = next(_ids)
        self.cache = cache
        self.base = base
        self.cs = base.chunk_size if base is not None else chunk_size
        self.size = size
        self.base_limit = size if base is not None else 0
        self.chunks: dict[int, Chunk] = {}
        self.modified = False
        self.spill_file: SpillFile | None = None
        # read-ahead state (lock held): where the last read ended, the window (0: no sequential
        # stream), the next request's size in chunks, the first chunk not requested yet, one
        # future per chunk on its way (resolved once it is cached, or the request failed), the
        # requests in flight (pool future -> bytes) and how many of them the store has not
        # answered yet
        self.seq_end = -1
        self.ra_window = 0
        self.ra_kept = 0  # the stream has dropped its clean chunks before this one
        self.ra_req = max(1, READ_AHEAD_MIN // self.cs)
        self.ra_next = 0
        self.inflight: dict[int, cf.Future] = {}
        self.ra_jobs: dict[cf.Future, int] = {}
        self.ra_asking = 0
        self.ra_fetching: set[int] = set()  # chunks whose request the store has not answered yet
        self._ra_busy = False
        # write-behind (fs/writebehind.py): the stream uploading this content while it is
        # written; a write or truncate below ``stream.limit`` (bytes handed to its parts) breaks it
        self.stream = None

    def __repr__(self) -> str:
        return f"FileContent(size={self.size}, chunks={len(self.chunks)}, modified={self.modified})"

    # ---- helpers (lock held) --------------------------------------------------------------------

    def _spill(self) -> SpillFile:
        if self.spill_file is None:
            self.spill_file = self.cache.spill_area.open(self.cs)
        return self.spill_file

    def _valid_base(self) -> int:
        return 0 if self.base is None else min(self.base.size, self.base_limit)

    def _mem(self, idx: int, ch: Chunk) -> bytearray:
        if ch.data is None:
            ch.data = self.spill_file.read(idx)
            self.cache.used += len(ch.data)
        self.cache._touch(self, idx)
        return ch.data

    def _missing(self, indexes) -> list[int]:
        vb = self._valid_base()
        return [i for i in indexes if i not in self.chunks and i * self.cs < vb]

    # ---- base fetches (no lock while talking to the store) ----------------------------------------

    def _fetch(self, indexes: list[int], dirty: bool = False) -> dict[int, bytearray]:
        """Bring base chunks ``indexes`` into the cache (one ranged GET per contiguous run) and
        return what was fetched (the cache may evict clean chunks again at any time)."""
        for attempt in range(3):
            with self.cache.lock:
                base = self.base
                todo = self._missing(indexes)
            if not todo:
                return {}
            try:
                got = {}
                for run in _runs(todo):
                    for i, plain in zip(run, base.read_chunks(run)):
                        got[i] = plain
            except (PreconditionFailed, ObjectNotFound):
                with self.cache.lock:
                    if self.base is base:
                        raise
                continue  # the file was flushed or renamed meanwhile: read the new version
            with self.cache.lock:
                if self.base is not base:
                    continue
                vb = self._valid_base()
                for i, plain in got.items():
                    if i in self.chunks:
                        continue
                    keep = max(0, min(len(plain), vb - i * self.cs))
                    if keep < len(plain):
                        del plain[keep:]
                    self.chunks[i] = Chunk(plain, dirty)
                    self.cache.used += len(plain)
                    self.cache._touch(self, i)
            return got
        raise PreconditionFailed("the object kept changing while being read")

    def _fetch_and_lock(self, want: list[int], need) -> dict[int, bytearray]:
        """Fetch ``want`` and return with the cache lock HELD and every chunk in ``need``
        available (cached, just fetched, or beyond the base).  A clean chunk that was cached at
        fetch time may be evicted by another thread before the lock is taken again: then fetch
        again; the last attempt fetches with the lock held, which cannot be raced."""
        for attempt in range(4):
            if attempt == 3:
                self.cache.lock.acquire()
                try:
                    got = self._fetch(want)  # re-entrant lock: nothing can evict meanwhile
                except BaseException:
                    self.cache.lock.release()
                    raise
                return got
            got = self._fetch(want)
            self.cache.lock.acquire()
            vb = self._valid_base()
            if all(i in self.chunks or i in got or i * self.cs >= vb for i in need):
                return got
            self.cache.lock.release()
        raise AssertionError("unreachable")

    # ---- file operations (blocking) ---------------------------------------------------------------

    def _assemble(self, off: int, end: int, got: dict[int, bytearray]) -> bytes:
        """Bytes ``[off, end)`` from cached chunks (lock held); missing chunks are holes.  The
        bytes are copied once (straight from the chunk buffers into the result)."""
        cs = self.cs
        end = min(end, self.size)
        if off >= end:
            return b""
        pieces = []
        vb = self._valid_base()
        for i in range(off // cs, (end - 1) // cs + 1):
            c0 = i * cs
            a, b = max(off, c0) - c0, min(end, c0 + cs) - c0
            ch = self.chunks.get(i)
            if ch is not None:
                data = self._mem(i, ch)
            elif i in got and i * cs < vb:
                data = got[i][:max(0, vb - i * cs)]  # fetched, then evicted already
            else:
                data = b""  # hole (or truncated away): zeros
            piece = memoryview(data)[a:b]
            pieces.append(piece)
            if len(piece) < b - a:
                pieces.append(bytes(b - a - len(piece)))
        return pieces[0].tobytes() if len(pieces) == 1 else b"".join(pieces)

    def try_read(self, off: int, length: int) -> bytes | None:
        """The read, if every byte is already in memory (no I/O, never waits for the lock);
        None otherwise.  Lets the event loop answer cache hits without a thread round trip."""
        if not self.cache.lock.acquire(blocking=False):
            return None
        try:
            end = min(self.size, off + length)
            if off >= end:
                return b""
            vb = self._valid_base()
            for i in range(off // self.cs, (end - 1) // self.cs + 1):
                ch = self.chunks.get(i)
                if (ch is None and i * self.cs < vb) or (ch is not None and ch.data is None):
                    return None
            sequential = self._note_read(off, end, waited=False)
            data = self._assemble(off, end, {})
            if sequential:
                self._read_ahead((end - 1) // self.cs)
            return data
        finally:
            self.cache.lock.release()

    def read(self, off: int, length: int) -> bytes:
        with self.cache.lock:
            end = min(self.size, off + length)
            if off >= end:
                return b""
            cs = self.cs
            want = list(range(off // cs, (end - 1) // cs + 1))
            vb = self._valid_base()
            # waiting for the store (not for a request already answered and being decrypted)
            waited = any(i * cs < vb and i not in self.chunks and (i not in self.inflight or i in self.ra_fetching)
                         for i in want)
            sequential = self._note_read(off, end, waited=waited)
            if sequential:  # start the chunks after these before waiting for these
                self._read_ahead(want[-1])
            waiting = [self.inflight[i] for i in want if i in self.inflight]
        if waiting:  # already being read ahead: wait for those chunks instead of a second request
            cf.wait(waiting)
        got = self._fetch_and_lock(want, want)
        try:
            data = self._assemble(off, end, got)
            self.cache._enforce()
            if sequential:
                self._read_ahead(want[-1])
        finally:
            self.cache.lock.release()
        return data

    # ---- read-ahead (lock held unless noted) ------------------------------------------------------

    def _max_window(self) -> int:
        return min(READ_AHEAD_MAX, self.cache.budget // 4) // self.cs * self.cs

    def _note_read(self, off: int, end: int, waited: bool) -> bool:
        """Account a read of ``[off, end)`` to the sequential stream; True if it is part of one.

        A stream starts with a read at the file's start or right where the previous read ended.
        Within a stream, reads up to READ_AHEAD_MIN before or after its position count (the
        kernel's read-ahead requests may arrive out of order); each one that moves the position
        on and has to wait for the store (``waited``: the read-ahead is not far enough ahead)
        doubles the window.  A reader served from memory, or waiting only for decryption, needs
        no larger one: on a store that answers at once the window stays small, and so does what
        it holds in memory (decrypted far ahead, chunks would also be cold in the CPU caches by
        the time they are read).  Any other read ends the stream (and drops its requests that
        have not started)."""
        w, pos = self.ra_window, self.seq_end
        slack = max(READ_AHEAD_MIN, self.cs)
        if w and pos - slack <= off <= pos + slack:
            if end > pos:
                self.seq_end = end
                self._drop_behind(off - slack)
                if waited:
                    self.ra_window = min(self._max_window(), w * 2)
            return True
        self._end_stream()
        self.seq_end = end
        if off == 0 or off == pos:
            self.ra_window = min(self._max_window(), max(READ_AHEAD_MIN, self.cs))
            self.ra_kept = off // self.cs
        return self.ra_window > 0

    def _drop_behind(self, before: int) -> None:
        """Drop the clean chunks of this stream that end before byte ``before`` (READ_AHEAD_MIN
        behind the reader, past the kernel's out-of-order read-ahead).  The reader has them in
        the kernel's page cache, which answers its re-reads without asking the daemon, so keeping
        them here too would hold the file twice (up to the cache budget).  Their memory is then
        reused for the chunks ahead: a 1 GiB read page-faulted ~300,000 times (every chunk in
        fresh memory) and ~50,000-100,000 with this.  Dirty chunks stay until they are stored;
        chunks from before the stream began are not its to drop."""
        stop = before // self.cs
        for i in range(self.ra_kept, stop):
            ch = self.chunks.get(i)
            if ch is not None and not ch.dirty:
                self.cache._forget(self, i)
        self.ra_kept = max(self.ra_kept, stop)

    def _end_stream(self) -> None:
        """No sequential stream any more: the window closes and requests not started yet are
        dropped (those already talking to the store finish and their chunks are cached)."""
        self.ra_window = 0
        self.ra_req = max(1, READ_AHEAD_MIN // self.cs)
        self.ra_next = 0
        for job in list(self.ra_jobs):
            job.cancel()  # runs _prefetch_done at once if it had not started

    def _read_ahead(self, last: int) -> None:
        """Sequential reader at chunk ``last``: request the chunks of the window after it that
        are neither cached nor on their way, in ranged GETs that the prefetch workers fetch and
        decrypt in parallel, so that the reader waits neither for the store nor for decryption.

        Each request is one contiguous run of missing chunks: the first covers the initial
        window, each next one is twice as large, up to PREFETCH_REQUEST_MAX and the window (so
        its end passes the window's by less than a window); a rest of the file of up to half a
        request goes with the request before it.  Nothing is requested beyond the cache's
        bounds: a quarter of the budget per window, a quarter for all files' requests in flight
        together."""
        if self.base is None or not self.ra_window or self._ra_busy:
            return
        self._ra_busy = True  # a request that ends at once must not start this over (re-entrant lock)
        try:
            self._request_window(last)
        finally:
            self._ra_busy = False

    def _request_window(self, last: int) -> None:
        cs = self.cs
        window = self.ra_window // cs
        limit = -(-self._valid_base() // cs)
        horizon = min(limit, last + 1 + window)
        biggest = max(1, min(self.cache.request_max // cs, window))
        room = self.cache.budget // 4 - self.cache.prefetching
        i = max(self.ra_next, last + 1)
        while i < horizon and self.ra_asking < PREFETCH_JOBS and len(self.ra_jobs) < PREFETCH_IN_FLIGHT:
            if i in self.chunks or i in self.inflight:
                i += 1
                continue
            n = min(self.ra_req, biggest)
            stop = min(limit, i + n)
            if limit - stop <= n // 2:
                stop = limit  # a short rest of the file goes with this request, not in one of its own
            j = i + 1
            while j < stop and j not in self.chunks and j not in self.inflight:
                j += 1
            if (j - i) * cs > room:
                break
            room -= (j - i) * cs
            self._submit(range(i, j))
            self.ra_req = min(self.ra_req * 2, self.cache.request_max // cs or 1)
            i = j
        self.ra_next = i

    def _submit(self, run: range) -> None:
        base, size = self.base, len(run) * self.cs
        futures = {i: cf.Future() for i in run}
        asking = [True]  # the store has not answered this request yet (lock held to change it)
        try:
            job = self.cache.prefetcher().submit(self._prefetch_run, base, run, futures, asking)
        except RuntimeError:  # shut down (unmounting): the reader fetches what it needs
            return
        self.inflight.update(futures)
        self.ra_fetching.update(run)
        self.ra_jobs[job] = size
        self.ra_asking += 1  # (lock held: the worker cannot deliver before this)
        self.cache.prefetching += size
        job.add_done_callback(lambda job: self._prefetch_done(job, futures, asking))

    def _answered(self, asking: list[bool]) -> None:
        """A request's answer is in (or it ended without one), lock held: one request fewer
        waits for the store."""
        if asking[0]:
            asking[0] = False
            self.ra_asking -= 1

    def _prefetch_done(self, job: cf.Future, futures: dict[int, cf.Future], asking: list[bool]) -> None:
        """A request finished, failed or was dropped (any thread): its chunks are no longer on
        their way; a reader waiting for one that did not arrive fetches it itself."""
        with self.cache.lock:
            self._answered(asking)
            self.cache.prefetching -= self.ra_jobs.pop(job, 0)
            for i, f in futures.items():
                if self.inflight.get(i) is f:
                    del self.inflight[i]
                    self.ra_fetching.discard(i)
                if not f.done():
                    f.set_result(None)
            if self.ra_window and not self._ra_busy and not job.cancelled():
                self._read_ahead((self.seq_end - 1) // self.cs)  # keep the requests going

    def _prefetch_run(self, base, run: range, futures: dict[int, cf.Future], asking: list[bool]) -> None:
        """Fetch ``run`` of ``base`` (a worker thread, no lock): each chunk is cached as soon as
        it is decrypted and its waiting reader released, before the next one is decrypted.  Once
        the store has answered, the next request is started while this one is decrypted."""
        cs = self.cs

        def deliver(i: int, plain: bytearray) -> None:
            with self.cache.lock:
                if i == run.start:  # the store has answered: the rest is decryption
                    self.ra_fetching.difference_update(j for j in run if self.inflight.get(j) is futures[j])
                    self._answered(asking)
                    if self.ra_window and not self._ra_busy:
                        self._read_ahead((self.seq_end - 1) // self.cs)
                if self.base is base and i not in self.chunks:
                    keep = max(0, min(len(plain), self._valid_base() - i * cs))
                    if keep:
                        if keep < len(plain):
                            del plain[keep:]
                        self.chunks[i] = Chunk(plain, False)
                        self.cache.used += len(plain)
                        self.cache._touch(self, i)
                        if self.cache.used > self.cache.budget:
                            self.cache._enforce()
                f = futures[i]
                if self.inflight.get(i) is f:
                    del self.inflight[i]
                    self.ra_fetching.discard(i)
                if not f.done():
                    f.set_result(None)

        try:
            base.read_chunks(run, deliver)
        except Exception:  # noqa: BLE001 - a failed read-ahead is retried by the real read
            pass

    def _needs_base(self, off: int, end: int, vb: int) -> set[int]:
        cs = self.cs
        first, last = off // cs, (end - 1) // cs
        # base bytes are needed only where the write leaves some of a chunk's stored bytes
        return {i for i in (first, last) if i * cs < vb and (off > i * cs or end < min((i + 1) * cs, vb))}

    def _apply_write(self, off: int, data) -> None:
        """Copy ``data`` into dirty chunks (lock held; base chunks it needs are cached)."""
        cs, end = self.cs, off + len(data)
        view = memoryview(data)
        if self.stream is not None and off < self.stream.limit:
            self.stream.broken = True  # a sealed chunk changes: never sealed again under its msg_id
        for i in range(off // cs, (end - 1) // cs + 1):
            c0 = i * cs
            a, b = max(off, c0) - c0, min(end, c0 + cs) - c0
            ch = self.chunks.get(i)
            if a == 0 and (ch is None or b == cs or (ch.data is not None and len(ch.data) <= b)):
                # the write replaces the whole chunk: keep its bytes (the FUSE request's own
                # buffer when it is exactly this chunk), never read a spilled copy back
                piece = view[c0 - off:c0 + b - off]
                new = data if isinstance(data, bytes) and len(piece) == len(data) else bytearray(piece)
                if ch is None:
                    ch = self.chunks[i] = Chunk(None, True)
                if ch.data is not None:
                    self.cache.used -= len(ch.data)
                ch.data = new
                self.cache.used += len(new)
                self.cache._touch(self, i)
                ch.dirty = True
                if ch.spilled:
                    ch.spilled = False
                    self.cache.spilled_chunks -= 1
                continue
            if ch is None:
                ch = self.chunks[i] = Chunk(bytearray(), True)
                self.cache._touch(self, i)
            buf = self._mem(i, ch)
            if not isinstance(buf, bytearray):  # a write's own buffer (immutable): copy first
                buf = ch.data = bytearray(buf)
            if len(buf) < b:
                self.cache.used += b - len(buf)
                try:
                    buf.extend(bytes(b - len(buf)))
                except BufferError:  # still exported (a view handed out earlier): resize a copy
                    buf = ch.data = buf + bytes(b - len(buf))
            buf[a:b] = view[c0 + a - off:c0 + b - off]
            ch.dirty = True
            if ch.spilled:
                ch.spilled = False
                self.cache.spilled_chunks -= 1
        self.size = max(self.size, end)
        self.modified = True

    def try_write(self, off: int, data) -> bool:
        """Do a small write in place if it needs no I/O (no base fetch, no spill, lock free)."""
        n = len(data)
        if n == 0 or n > FAST_WRITE_MAX:
            return n == 0
        if not self.cache.lock.acquire(blocking=False):
            return False
        try:
            cs, end = self.cs, off + n
            vb = self._valid_base()
            for i in self._needs_base(off, end, vb):
                if i not in self.chunks:
                    return False
            for i in range(off // cs, (end - 1) // cs + 1):
                ch = self.chunks.get(i)
                if ch is not None and ch.data is None:
                    return False  # spilled: reading it back is I/O
            if self.cache.used + n > self.cache.budget:
                return False  # would have to evict/spill
            self._apply_write(off, data)
            return True
        finally:
            self.cache.lock.release()

    def write(self, off: int, data) -> int:
        n = len(data)
        if n == 0:
            return 0
        cs, end = self.cs, off + n
        with self.cache.lock:
            vb = self._valid_base()
        partial = sorted(self._needs_base(off, end, vb))
        got = self._fetch_and_lock(partial, partial)
        try:
            vb = self._valid_base()
            for i, plain in got.items():
                if i not in self.chunks and i * cs < vb:  # evicted since the fetch: put it back
                    self.chunks[i] = Chunk(plain[:max(0, vb - i * cs)], False)
                    self.cache.used += len(self.chunks[i].data)
                    self.cache._touch(self, i)
            self._apply_write(off, data)
            self.cache._enforce()
        finally:
            self.cache.lock.release()
        return n

    def truncate(self, size: int) -> None:
        with self.cache.lock:
            if self.stream is not None and size < self.stream.limit:
                self.stream.broken = True
            if size < self.size:
                cs = self.cs
                for i in [i for i in self.chunks if i * cs >= size]:
                    self.cache._forget(self, i)
                i = size // cs
                ch = self.chunks.get(i)
                if ch is not None:
                    buf = self._mem(i, ch)
                    keep = size - i * cs
                    if len(buf) > keep:
                        self.cache.used -= len(buf) - keep
                        try:
                            del buf[keep:]
                        except (BufferError, TypeError):  # exported, or immutable: cut a copy
                            ch.data = buf[:keep]
                        ch.dirty = True
                        if ch.spilled:
                            ch.spilled = False
                            self.cache.spilled_chunks -= 1
                self.base_limit = min(self.base_limit, size)
            if size != self.size:
                self.size = size
            self.modified = True

    def _drop_stream(self) -> None:
        """Abandon a write-behind stream still attached (lock held; its abort runs elsewhere)."""
        st, self.stream = self.stream, None
        if st is not None:
            st.broken = True
            st.abort_soon()

    def complete_chunks(self, chunks: range) -> bool:
        """Whether every chunk of ``chunks`` was written locally, whole (a spilled one counts:
        only efficiency depends on this, a later change of it breaks the stream)."""
        with self.cache.lock:
            for i in chunks:
                ch = self.chunks.get(i)
                if ch is None or not ch.dirty or (ch.data is not None and len(ch.data) < self.cs):
                    return False
            return True

    def stored_chunks(self) -> list[int]:
        """Indexes of the chunks that may hold data: written locally, or stored in the part of
        the base that is still valid.  Every other chunk is a hole that nobody wrote (made by
        truncate or by writing beyond the end, or a hole of a sparse base): a flush does not
        store it (a sparse version, docs/format.md 17.10).  Costs in proportion to the data."""
        with self.cache.lock:
            out = [i for i, ch in self.chunks.items() if ch.dirty]
            vb, base = self._valid_base(), self.base
        if vb <= 0:
            return out
        limit = -(-vb // self.cs)
        if getattr(base, "sparse", False):
            for i in base.chunk_map().stored_indexes():
                if i >= limit:
                    break
                out.append(i)
        else:
            out.extend(range(limit))
        return out

    def dirty_bytes(self) -> int:
        """Bytes of chunks written locally and not stored yet (in memory or spilled)."""
        with self.cache.lock:
            return sum(self.cs if ch.data is None else len(ch.data)
                       for ch in self.chunks.values() if ch.dirty)

    def source(self, offset: int, length: int):
        """Plaintext ``[offset, offset+length)`` for the flush (called from the Vault's threads,
        while the file's writes are held off); ``offset`` is chunk aligned.

        The cache lock is held only to look the chunk up: a chunk in memory is returned as a view
        of its buffer (no copy when it is complete), a spilled one is read back and decrypted
        without the lock and not cached again (the flush needs it once; caching it would only
        push other dirty chunks out to the spill), a base chunk is fetched without the lock."""
        i = offset // self.cs
        spill = None
        with self.cache.lock:
            ch = self.chunks.get(i)
            if ch is not None:
                data = ch.data
                if data is not None:
                    if len(data) >= length:
                        return memoryview(data)[:length]
                    out = bytearray(length)
                    out[:len(data)] = data
                    return out
                spill = self.spill_file
                if not spill.use():
                    raise OSError(5, "file content was discarded during the flush")
            else:
                base, vb = self.base, self._valid_base()
        if spill is not None:
            try:
                plain = spill.read(i)
            finally:
                spill.unuse()
            return _fit(plain, length)
        if i * self.cs >= vb:
            return bytearray(length)
        plain = base.read_chunks(range(i, i + 1))[0]
        keep = max(0, min(len(plain), vb - i * self.cs, length))
        del plain[keep:]
        return _fit(plain, length)

    def preload(self, base, plains: list[bytearray]) -> None:
        """Clean chunks of ``base`` that arrived with its probe (a small file read whole): cached
        unless this content has moved on to another version or been modified meanwhile.  Called
        on the event loop, so it is opportunistic: it never waits for the cache lock and never
        evicts (eviction may spill dirty chunks to disk); a read fetches what was not kept."""
        if not self.cache.lock.acquire(blocking=False):
            return
        try:
            if self.base is not base or self.modified:
                return
            vb = self._valid_base()
            for i, plain in enumerate(plains):
                if i in self.chunks or i * self.cs >= vb or self.cache.used + len(plain) > self.cache.budget:
                    continue
                self.chunks[i] = Chunk(plain, False)
                self.cache.used += len(plain)
                self.cache._touch(self, i)
        finally:
            self.cache.lock.release()

    def committed(self, new_base) -> None:
        """The flush stored everything: local chunks become clean copies of ``new_base``."""
        with self.cache.lock:
            self._drop_stream()
            self.base = new_base
            self.size = new_base.size
            self.base_limit = new_base.size
            for i, ch in list(self.chunks.items()):
                ch.dirty = False
                if ch.data is None:
                    self.cache._forget(self, i)
                elif ch.spilled:
                    ch.spilled = False
                    self.cache.spilled_chunks -= 1
            self.modified = False
            if self.spill_file is not None:
                self.spill_file.close()
                self.spill_file = None

    def rebase(self, new_base) -> None:
        """Same bytes, different stored object (after a rename)."""
        with self.cache.lock:
            self.base = new_base

    def reset(self, new_base, size: int) -> None:
        """Another client replaced the object: drop clean chunks, read the new version."""
        with self.cache.lock:
            self._drop_stream()
            self._end_stream()
            for i in list(self.chunks):
                self.cache._forget(self, i)
            self.base = new_base
            self.size = size
            self.base_limit = size if new_base is not None else 0
            self.modified = False

    def materialize(self) -> None:
        """Copy every base byte into local dirty chunks so the stored object may disappear
        (unlink or replace while open)."""
        with self.cache.lock:
            n = -(-self._valid_base() // self.cs)
        for start in range(0, n, 8):
            idx = list(range(start, min(n, start + 8)))
            got = self._fetch_and_lock(idx, idx)
            try:
                vb = self._valid_base()
                for i in idx:
                    if i * self.cs >= vb:
                        continue
                    ch = self.chunks.get(i)
                    if ch is None:
                        plain = got[i][:max(0, vb - i * self.cs)]
                        ch = self.chunks[i] = Chunk(plain, True)
                        self.cache.used += len(plain)
                        self.cache._touch(self, i)
                    ch.dirty = True  # dirty chunks are spilled, never dropped
                self.cache._enforce()
            finally:
                self.cache.lock.release()
        with self.cache.lock:
            self.base = None
            self.base_limit = 0

    def discard(self) -> None:
        with self.cache.lock:
            self._drop_stream()
            self.base = None  # read-ahead still in flight has nowhere to put its chunks
            self._end_stream()
            for i in list(self.chunks):
                self.cache._forget(self, i)
            self.modified = False
            if self.spill_file is not None:
                self.spill_file.close()
                self.spill_file = None


class ForeignBase:
    """A non-dssefs object exposed read-only as plain bytes (``foreign_objects=read-only``)."""

    def __init__(self, store, key: str, size: int, etag: str, chunk_size: int):
        self.store, self.key, self.size, self.etag, self.chunk_size = store, key, size, etag, chunk_size

    def read_chunks(self, run: range, deliver=None) -> list[bytearray]:
        start = run.start * self.chunk_size
        length = min(self.size, run.stop * self.chunk_size) - start
        data, _total = self.store.get_range(self.key, start, length, if_match=self.etag)
        view = memoryview(data)
        out = [bytearray(view[j:j + self.chunk_size]) for j in range(0, len(view), self.chunk_size)]
        if deliver is not None:
            for i, plain in zip(run, out):
                deliver(i, plain)
        return out


def _fit(buf: bytearray, length: int) -> bytearray:
    """``buf`` cut or zero-padded to ``length`` bytes, in place."""
    if len(buf) > length:
        del buf[length:]
    elif len(buf) < length:
        buf.extend(bytes(length - len(buf)))
    return buf


def _runs(indexes: list[int]) -> list[range]:
    out: list[range] = []
    for i in sorted(indexes):
        if out and out[-1].stop == i:
            out[-1] = range(out[-1].start, i + 1)
        else:
            out.append(range(i, i + 1))
    return out
