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
READ_AHEAD = 16 << 20  # bytes kept cached or on their way ahead of a sequential reader
PREFETCH_JOBS = 4  # the read-ahead window is fetched in this many requests, decrypted in parallel
FAST_WRITE_MAX = 1 << 20  # writes up to this size may be done on the event loop (no I/O)
PREFETCH_WORKERS = 2


class Chunk:
    """``data``: the chunk's bytes in memory (a bytearray, or the immutable ``bytes`` of the
    write request that replaced the whole chunk; copied on the first partial write), None when
    spilled."""

    __slots__ = ("data", "dirty", "spilled")

    def __init__(self, data: bytearray | bytes | None, dirty: bool):
        self.data, self.dirty, self.spilled = data, dirty, False


class ChunkCache:
    def __init__(self, budget: int, spill: SpillArea | None):
        self.lock = threading.RLock()
        self.budget = budget
        self.spill_area = spill
        self.lru: OrderedDict[tuple[int, int], "FileContent"] = OrderedDict()
        self.used = 0
        self.spilled_chunks = 0
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
                    "spilled_chunks": self.spilled_chunks}

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
        self.seq_end = -1  # where the last read ended (sequential-read detection)
        self.inflight: dict[int, cf.Future] = {}  # chunks being read ahead

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
            sequential = off == self.seq_end
            self.seq_end = end
            data = self._assemble(off, end, {})
            if sequential:
                self._maybe_prefetch((end - 1) // self.cs)
            return data
        finally:
            self.cache.lock.release()

    def read(self, off: int, length: int) -> bytes:
        with self.cache.lock:
            end = min(self.size, off + length)
            sequential = off == self.seq_end or off == 0
            self.seq_end = end
            if off >= end:
                return b""
            cs = self.cs
            want = list(range(off // cs, (end - 1) // cs + 1))
            if sequential:  # start the chunks after these before waiting for these
                self._maybe_prefetch(want[-1])
            waiting = {self.inflight[i] for i in want if i in self.inflight}
        if waiting:  # already being read ahead: wait for that instead of a second request
            cf.wait(waiting)
        got = self._fetch_and_lock(want, want)
        try:
            data = self._assemble(off, end, got)
            self.cache._enforce()
            if sequential:
                self._maybe_prefetch(want[-1])
        finally:
            self.cache.lock.release()
        return data

    def _maybe_prefetch(self, last: int) -> None:
        """Sequential reader at chunk ``last`` (lock held): keep the read-ahead window after it
        cached or on its way, fetched in several requests that the prefetch workers fetch and
        decrypt in parallel, so the reader neither waits for the store nor for decryption."""
        if self.base is None:
            return
        cs = self.cs
        depth = max(2, min(READ_AHEAD, self.cache.budget // 4) // cs)
        job = max(1, depth // PREFETCH_JOBS)
        limit = -(-self._valid_base() // cs)
        stop = min(limit, last + 1 + depth)
        todo = [i for i in range(last + 1, stop) if i not in self.chunks and i not in self.inflight]
        runs = []
        for run in _runs(todo):
            for s in range(run.start, run.stop, job):
                r = range(s, min(s + job, run.stop))
                if len(r) == job or r.stop == limit:  # whole jobs only (the last may be short)
                    runs.append(r)
        for r in runs:
            fut = self.cache.prefetcher().submit(self._prefetch_run, list(r))
            for i in r:
                self.inflight[i] = fut

            def done(f: cf.Future, todo=r) -> None:
                with self.cache.lock:
                    for i in todo:
                        if self.inflight.get(i) is f:
                            del self.inflight[i]
            fut.add_done_callback(done)

    def _prefetch_run(self, todo: list[int]) -> None:
        try:
            self._fetch(todo)
            with self.cache.lock:
                self.cache._enforce()
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
            self.base = None  # read-ahead still in flight has nowhere to put its chunks
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

    def read_chunks(self, run: range) -> list[bytearray]:
        start = run.start * self.chunk_size
        length = min(self.size, run.stop * self.chunk_size) - start
        data, _total = self.store.get_range(self.key, start, length, if_match=self.etag)
        buf = bytearray(data)
        return [buf[j:j + self.chunk_size] for j in range(0, len(buf), self.chunk_size)]


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
