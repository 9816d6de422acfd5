"""Sealing ahead: a new version sealed in memory while the file is still being written.

docs/format.md 17.3 ("Stream").  A file written in order from its start gets a
:class:`PresealWriter`; each run of complete chunks with more data after it is sealed with
``final = 0`` (under its :class:`~.draft.DraftVersion`'s draft header) by a worker thread into its
place in the body, with the CRC32 of each run.  At close,
:meth:`PresealWriter.finish` seals only the rest (the last chunk with ``final = 1``, under the real
header) and stores the body with one PUT that carries the CRC32 of the whole body, joined from
the runs' (:func:`dssefs.crc32.crc32_combine`).  So close waits for the tail and the request, not
for sealing and checksumming the whole file (docs/performance.md).

The body is an anonymous private mapping of ``vault.multipart_threshold`` bytes (the most one
request holds): its pages take memory only once a chunk is sealed into them, it never moves (runs
are sealed into it in parallel, and nothing is copied as it fills), and it is unmapped as soon as
the version is stored or abandoned.  The bytes claimed are held in ``vault.single_puts`` (all
single-request bodies together); a file that outgrows the mapping or the budget is stored the
ordinary way.

Rules kept here (17.3): each chunk index is sealed at most once per message id (runs are claimed
in order and never twice; the tail is sealed only past them).  A writer whose caller must change a
sealed chunk, or whose :meth:`finish` failed, is abandoned: the file is then stored the ordinary
way, under a new message id.  Only ciphertext is kept, in memory; nothing is written to disk.
"""

from __future__ import annotations

import mmap
import threading
import zlib

from ..crc32 import crc32_combine
from ..envelope import format as fmt
from .draft import DraftVersion
from .stream import StreamUnusable
from .vault import OpenObject, Source, Vault

class PresealWriter:
    """One version sealed ahead.  ``seal`` runs in worker threads (several runs at once);
    ``claim``, ``finish`` and ``abort`` are called by the one owner of the writer."""

    def __init__(self, vault: Vault, *, chunk_log2: int, file_id: bytes | None = None):
        self.version = DraftVersion(vault, chunk_log2=chunk_log2, file_id=file_id)
        self.vault = vault
        self.cs = self.version.cs
        self.stride = self.cs + fmt.CHUNK_OVERHEAD  # sealed bytes of a whole chunk
        self.max_body = vault.multipart_threshold
        self.body: mmap.mmap | None = None  # mapped by the first run
        self.held = 0  # bytes of vault.single_puts held for the body
        self.next_chunk = 0  # chunks [0, next_chunk) are claimed
        self.runs: dict[int, tuple[int, int]] = {}  # first chunk -> (end, CRC32) of each run sealed
        self._sealing = 0  # runs being sealed now
        self._lock = threading.Lock()
        self._state = "open"  # open -> finishing -> done | aborted
        self.failed: BaseException | None = None

    def __repr__(self) -> str:
        return f"PresealWriter(runs={len(self.runs)}, claimed={self.next_chunk}, <keys redacted>)"

    def _reserve(self, need: int) -> bool:
        """Hold ``need`` bytes of the single-request budget in all; False when it cannot give them."""
        if need <= self.held:
            return True
        if not self.vault.single_puts.take(need - self.held):
            return False
        self.held = need
        return True

    def _mapped(self) -> mmap.mmap:
        """The body (lock held), mapped on first use: zero pages, memory only once written."""
        if self.body is None:
            self.body = mmap.mmap(-1, self.max_body, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                                  | getattr(mmap, "MAP_NORESERVE", 0))
        return self.body

    # ---- while the file is written ---------------------------------------------------------------

    def claim(self, chunks: range) -> bool:
        """Reserve ``chunks`` (from :attr:`next_chunk` on, all complete, more bytes known to
        follow) for :meth:`seal`; False when the body cannot take them (stop sealing ahead)."""
        if chunks.start != self.next_chunk or not chunks:
            raise ValueError(f"a run must start at chunk {self.next_chunk}")
        if self._state != "open" or self.failed is not None:
            return False
        need = chunks.stop * self.stride
        if need > self.max_body or not self._reserve(need):
            return False
        self.next_chunk = chunks.stop
        return True

    def seal(self, chunks: range, source: Source) -> None:
        """Seal the claimed ``chunks`` (``final = 0``) into the body.  A failure is kept in
        :attr:`failed` (and raised)."""
        try:
            with self._lock:
                if self._state != "open":
                    return
                body = self._mapped()
                self._sealing += 1  # (an abort meanwhile leaves the unmapping to the last run)
            try:
                crc = self._seal_into(body, self.version.draft, chunks, source, 0)
            finally:
                with self._lock:
                    self._sealing -= 1
                    if self._state == "aborted" and not self._sealing:
                        self._release()
            with self._lock:
                self.runs[chunks.start] = (chunks.stop, crc)
        except BaseException as e:
            self.failed = self.failed or e
            raise

    def _seal_into(self, body: mmap.mmap, cipher, chunks: range, source: Source, crc: int,
                   parallel: bool = False) -> int:
        """Seal the consecutive ``chunks`` into their place in ``body`` (the vault's own sealing,
        in worker threads when ``parallel``); returns ``crc`` continued over their bytes."""
        start = chunks.start * self.stride
        end = start + sum(cipher.chunk_plain_len(i) for i in chunks) + len(chunks) * fmt.CHUNK_OVERHEAD
        with memoryview(body) as view, view[start:end] as place:
            with self.vault._seal_chunks(cipher, list(chunks), source, None, parallel=parallel, buf=place) as out:
                return zlib.crc32(out, crc)

    def _sealed(self) -> tuple[int, int] | None:
        """(chunks sealed, CRC32 of their bytes) when the runs cover ``[0, next_chunk)``."""
        at, crc = 0, 0
        while at < self.next_chunk:
            run = self.runs.get(at)
            if run is None:
                return None
            end, run_crc = run
            crc = crc32_combine(crc, run_crc, (end - at) * self.stride)
            at = end
        return at, crc

    # ---- the end ----------------------------------------------------------------------------------

    def finish(self, key: str, size: int, source: Source, *, attrs: bytes | None, generation: int,
               if_match: str | None = None, if_none_match: bool = False) -> OpenObject:
        """Seal the rest (the last chunk final) and store the version with one conditional PUT;
        returns it opened.  The seal of every claimed run must have returned.  On failure the
        writer is abandoned and the error raised; :class:`StreamUnusable` when this writer
        cannot hold ``size`` bytes (nothing was stored)."""
        with self._lock:
            if self._state != "open":
                raise StreamUnusable(f"sealing ahead already {self._state}")
            if self.failed is not None:
                raise StreamUnusable(f"sealing a run failed: {self.failed}")
            sealed = self._sealed()
            if sealed is None or self._sealing:
                raise StreamUnusable("a claimed run was not sealed")
            if size <= sealed[0] * self.cs:
                raise StreamUnusable("the file ends within the chunks already sealed")
            self._state = "finishing"
        done, crc = sealed
        vault, version = self.vault, self.version
        try:
            version.check_key(key)
            cipher = version.final(size, generation=generation, with_attrs=attrs is not None)
            body_size = cipher.body_size
            if body_size > self.max_body or not self._reserve(body_size):
                raise StreamUnusable("the file is too large to be sent in one request")
            with self._lock:
                mapped = self._mapped()
            # the tail (long when seals fell behind a fast writer): in worker threads
            crc = self._seal_into(mapped, cipher, range(done, cipher.n_chunks), source, crc, parallel=True)
            keys, env = version.envelope(key, cipher, attrs)
            meta = env.to_metadata()
            store = vault.store
            with memoryview(mapped) as view, view[:body_size] as body:
                etag = vault._store_write(
                    key, meta, lambda: store.put(key, body, meta, if_match=if_match, if_none_match=if_none_match,
                                                 crc32=crc),
                    condition=(if_match, if_none_match),
                    again=lambda etag: store.put(key, body, meta, if_match=etag, crc32=crc))
        except BaseException:
            self._state = "open"
            self.abort()
            raise
        self._state = "done"
        self._release()
        return version.opened(key, cipher, keys, env, meta, etag)

    def abort(self) -> None:
        """Abandon the writer: its body is unmapped (by the last run still being sealed, if
        any) and its budget given back.  Never raises."""
        with self._lock:
            if self._state in ("aborted", "done", "finishing"):
                return
            self._state = "aborted"
            if not self._sealing:
                self._release()

    def _release(self) -> None:
        """Unmap the body and give its budget back (lock held, or the writer done)."""
        body, self.body = self.body, None
        if body is not None:
            try:
                body.close()
            except BufferError:  # a view of it still referenced somewhere: unmapped when collected
                pass
        held, self.held = self.held, 0
        if held:
            self.vault.single_puts.give(held)
