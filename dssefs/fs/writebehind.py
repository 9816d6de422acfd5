"""Versions sealed while the file is written: sealing ahead in memory, and write-behind.

A new or truncated file written in order (every chunk below its end written) gets one of two
writers while it grows, both drawing the version's keys at once (format 17.3, "Stream"):

* **Sealing ahead** (:class:`dssefs.objects.preseal.PresealWriter`), in the default mode once the
  file holds more than one chunk: after each write, the complete chunks with more data after them
  are sealed (``final = 0``) by worker threads into one body in memory, PRESEAL_RUNS runs at a
  time per file (a run claims every chunk that has become ready; a write never waits for it).  close/fsync then seal
  the tail only and store the body with one PUT and the CRC32 kept while sealing.  A file that
  outgrows one request (``multipart_threshold``) or the single-request memory budget is stored
  the ordinary way.

* **Write-behind**, when ``FsConfig.write_behind`` is set and the file grows past it: a stream
  (:class:`dssefs.objects.stream.StreamWriter`):
after each write, every run of ``part_size`` bytes of whole chunks with more data after it is
handed to a worker thread that seals it (format 17.3, ``final = 0``) and uploads it as the next
part of a multipart upload to a staging key.  At most ``workers`` parts are in flight per file: a
writer that gets further ahead waits (backpressure).  The plaintext stays in the cache as dirty
data (spilled, encrypted, beyond its bound), so any failure can still store it the ordinary way.

close/fsync then only seal and upload the tail, complete the staging upload and copy it to the
file's key with the final metadata (conditional as ever); see docs/semantics.md.

Either writer is abandoned, and the file stored the ordinary way (a new message id, every chunk
sealed again), when a write or truncate touches bytes already handed to it, when sealing or a
part failed, when the file ends inside what was sealed, when it has holes at close (sealing
ahead: a sparse version stores only the chunks written), or when the file was unlinked or
replaced meanwhile.

Neither is used with ``--write-back`` (the journal stores whole objects; close does not wait for
the store there anyway) nor on a local directory store (no round trips to hide).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging

import trio

from ..objects.preseal import PresealWriter
from ..objects.stream import STAGING_DIR, StreamUnusable, StreamWriter, staging_key
from .inodes import Inode

log = logging.getLogger("dssefs.fs")

__all__ = ["STAGING_DIR", "StreamState", "WriteBehindOps"]

#: Runs of one file sealed ahead at once (each in a worker thread of its own).
PRESEAL_RUNS = 2


class StreamState:
    """A file's writer (write-behind or sealing ahead) as the file system sees it (attached to
    its FileContent as ``stream``)."""

    __slots__ = ("writer", "kind", "limit", "broken", "inflight", "pool", "file_id", "chunk_size")

    def __init__(self, writer: StreamWriter | PresealWriter, pool, file_id: bytes | None):
        self.writer = writer
        self.kind = "sealed_ahead" if isinstance(writer, PresealWriter) else "write_behind"
        self.limit = 0  # bytes [0, limit) are handed to parts (FileContent breaks the stream below)
        self.broken = False
        self.inflight: set[cf.Future] = set()
        self.pool = pool
        self.file_id = file_id  # the previous version's, when the stream continues its file id
        self.chunk_size = writer.cs

    def reap(self) -> None:
        self.inflight = {f for f in self.inflight if not f.done()}

    def abort_soon(self) -> None:
        """Abandon the stream without waiting: its parts finish or fail, then it is aborted."""
        self.broken = True
        futures, writer = list(self.inflight), self.writer

        def later() -> None:
            cf.wait(futures)
            writer.abort()
        try:
            self.pool.submit(later)
        except RuntimeError:  # the pool is shut down (unmount): a later mount cleans up
            pass


class WriteBehindOps:
    """The write path's stream and the flush's end of it (mixed into Filesystem)."""

    def _wb_usable_store(self) -> bool:
        store = self.vault.store
        return bool(getattr(store, "parallel_requests", False)) and getattr(store, "settle", None) is None \
            and getattr(self.store, "settle", None) is None

    def _wb_start(self, node: Inode) -> StreamState | None:
        """The file's writer, started if the file qualifies now (see the module docstring)."""
        content = node.content
        threshold = self.cfg.write_behind
        if threshold:
            if content.size <= threshold:
                return None
        elif content.size <= content.cs:
            return None
        if not node.linked or self.cfg.read_only or content._valid_base() > 0 or not self._wb_usable_store():
            return None
        n = -(-content.size // content.cs)
        if len(content.chunks) < n - 1 or not content.complete_chunks(range(n - 1)):
            return None  # holes, or a write not in order: not a sequential writer
        prev = node.obj
        file_id = prev.file_id if prev is not None else None
        log2 = content.cs.bit_length() - 1
        if threshold:
            writer = StreamWriter(self.vault, staging_key(self.prefix), chunk_log2=log2, file_id=file_id)
            log.debug("event=write_behind_start object=%s staging=%s", self.describe(node.ino), writer.staging)
        else:
            writer = PresealWriter(self.vault, chunk_log2=log2, file_id=file_id)
            log.debug("event=sealed_ahead_start object=%s", self.describe(node.ino))
        st = content.stream = StreamState(writer, self.vault.pool, file_id)
        self.activity.streams[st.kind]["started"] += 1
        return st

    async def _wb_pump(self, node: Inode) -> None:
        """After a write (inode lock held): start the file's writer once it qualifies, then hand
        what has become ready to a worker (write-behind: every complete part, waiting while too
        many are in flight; sealing ahead: PRESEAL_RUNS runs at a time, never waiting)."""
        content = node.content
        st = content.stream
        if st is None:
            st = self._wb_start(node)
            if st is None:
                return
        if st.broken:
            return
        if st.kind == "sealed_ahead":
            self._preseal_pump(st, content)
            return
        writer, cs = st.writer, st.chunk_size
        while not st.broken and writer.failed is None:
            chunks = range(writer.next_chunk, writer.next_chunk + writer.per_part)
            if content.size <= chunks.stop * cs or not content.complete_chunks(chunks):
                return
            st.reap()
            if len(st.inflight) >= self.vault.workers:
                pending = list(st.inflight)
                await trio.to_thread.run_sync(
                    lambda: cf.wait(pending, return_when=cf.FIRST_COMPLETED), abandon_on_cancel=True)
                continue
            number = writer.claim(chunks)
            if number is None:  # no more parts: the file is stored the ordinary way at close
                st.abort_soon()  # stays attached (broken), so no new stream starts over
                return
            st.limit = chunks.stop * cs
            st.inflight.add(self.vault.pool.submit(writer.put_part, number, chunks, content.source))

    def _preseal_pump(self, st: StreamState, content) -> None:
        """Sealing ahead: claim every complete chunk with more data after it that is not sealed
        yet and hand the run to a worker, unless PRESEAL_RUNS are being sealed (the next write
        claims what has come meanwhile)."""
        st.reap()
        writer = st.writer
        if len(st.inflight) >= PRESEAL_RUNS or writer.failed is not None:
            return
        run = range(writer.next_chunk, (content.size - 1) // content.cs)
        if not run or not content.complete_chunks(run):
            return
        if not writer.claim(run):  # the body cannot take it: the file is stored the ordinary way
            st.abort_soon()  # stays attached (broken), so no new writer starts over
            return
        st.limit = run.stop * content.cs
        st.inflight.add(self.vault.pool.submit(writer.seal, run, content.source))

    async def _wb_finish(self, node: Inode, key: str, attrs: bytes, prev):
        """At flush (inode lock held): the stored version if the file's stream stored it, None
        when there was no usable stream (the caller stores the file the ordinary way)."""
        content = node.content
        st = content.stream
        if st is None:
            return None
        content.stream = None  # from here on the stream is finished or abandoned
        pending = list(st.inflight)
        if pending:
            await trio.to_thread.run_sync(cf.wait, pending)
        writer = st.writer
        reason = None
        if st.broken:
            reason = ("bytes already uploaded were changed" if st.kind == "write_behind"
                      else "bytes already sealed were changed, or the body could not take more")
        elif writer.failed is not None:
            reason = f"a part failed: {writer.failed}"
        elif content.size <= st.limit:
            reason = "the file ends within the uploaded parts"
        elif (prev.file_id if prev is not None else None) != st.file_id:
            reason = "the file was replaced meanwhile"
        counts = self.activity.streams[st.kind]
        if reason is None:
            try:
                new = await self._io(self._wb_finish_sync, writer, key, content, attrs, prev, node.stored)
            except StreamUnusable as e:
                reason = str(e)
            except BaseException:
                counts["abandoned"] += 1
                raise
            else:
                counts["stored"] += 1
                log.debug("event=%s_stored object=%s", st.kind, self.describe(node.ino))
                return new
        counts["abandoned"] += 1
        log.log(logging.INFO if st.kind == "write_behind" else logging.DEBUG,
                "event=%s_fallback object=%s reason=%r effect='stored the ordinary way, with a new "
                "message id'", st.kind, self.describe(node.ino), reason)
        await self._io(writer.abort)
        return None

    def _wb_finish_sync(self, writer: StreamWriter | PresealWriter, key: str, content, attrs: bytes, prev,
                        stored: bool):
        self.deletes.settle_sync(key)  # a pending DELETE of this key goes first, never after
        kw = {}
        if self._conditional:
            if not stored:
                kw["if_none_match"] = True
            elif prev is not None:
                kw["if_match"] = prev.etag
        if isinstance(writer, PresealWriter) and len(content.stored_chunks()) < -(-content.size // content.cs):
            raise StreamUnusable("the file has holes")  # (a sparse version stores only what was written)
        new = writer.finish(key, content.size, content.source, attrs=attrs,
                            generation=prev.generation + 1 if prev is not None else 0, **kw)
        content.committed(new)
        return new
