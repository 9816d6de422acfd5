"""Storing objects: small objects (markers, symlinks, special files), file contents on
flush/close/fsync, conflict copies at unmount, and flushing every dirty file.
"""

from __future__ import annotations

import errno
import logging
import time

import trio

from ..errors import DssefsError, PreconditionFailed
from ..objects.vault import bytes_source, conflict_name
from .cache import FileContent, ForeignBase
from .common import ConflictError
from .inodes import Inode

log = logging.getLogger("dssefs.fs")


class FlushOps:
    """Writes to the store."""

    def _reopen_sync(self, key: str, data_keys=None):
        return self.vault.open(key, data_keys=data_keys)

    def _write_version(self, key: str, source, size: int, attrs: bytes, prev, *, create: bool,
                       chunk_log2: int | None = None, stored=None):
        """Store a new version of ``key`` (a successor of ``prev`` when given: same file id, next
        generation, same data keys) and return it opened.  Conditional where the store allows:
        ``If-None-Match`` when ``create``, else ``If-Match`` on ``prev``."""
        self.deletes.settle_sync(key)  # a pending DELETE of this key goes first, never after
        kw = {}
        if self._conditional:
            if create:
                kw["if_none_match"] = True
            elif prev is not None:
                kw["if_match"] = prev.etag
        return self.vault.write(key, source, size, attrs=attrs,
                                file_id=prev.file_id if prev is not None else None,
                                generation=prev.generation + 1 if prev is not None else 0,
                                data_keys=prev.data_keys if prev is not None else None,
                                chunk_log2=chunk_log2, stored=stored, **kw)

    def _write_sync(self, key: str, body: bytes, attrs: bytes, prev, if_none_match: bool):
        """Write a small object (marker, symlink, special file) and return its OpenObject."""
        return self._write_version(key, bytes_source(body), len(body), attrs, prev,
                                   create=prev is None and if_none_match)

    def _stored(self, node: Inode, obj, at: float | None = None) -> None:
        """``at``: when the write was sent (its confirmation of the directories above)."""
        node.obj = obj
        node.etag = obj.etag
        node.stored = True
        node.validated = self._now()
        self._confirm_above(node, node.validated if at is None else at)
        if node.content is not None:
            node.content.rebase(obj)

    def _flush_sync(self, key: str, content: FileContent, attrs: bytes, prev, stored: bool):
        new = self._write_version(key, content.source, content.size, attrs, prev, create=not stored,
                                  chunk_log2=content.cs.bit_length() - 1, stored=content.stored_chunks)
        content.committed(new)
        return new

    async def _flush_locked(self, node: Inode, force: bool = False) -> None:
        """Store the file's data and attributes (inode lock held).  On failure the dirty data
        stays in the cache for the next attempt and the error propagates."""
        if not node.linked:
            return
        content = node.content
        if content is None or not (content.modified or force):
            if node.meta_dirty:
                await self._persist_attrs(node)
            return
        key = self.object_key(node)
        prev = node.obj
        act = self.activity
        act.flushes_in_flight += 1
        sent = self._now()
        try:
            attrs = node.attrs.encode()
            new = None
            if content.stream is not None:  # write-behind: most of the file is uploaded already
                new = await self._wb_finish(node, key, attrs, prev)
            if new is None:
                new = await self._io(self._flush_sync, key, content, attrs, prev, node.stored)
        except PreconditionFailed:
            act.flush_failures += 1
            raise ConflictError(f"{self.store.url.rstrip('/')}/{key}: changed by another client since it "
                                "was opened; local changes kept, not stored (conflict)", errno=errno.EIO) from None
        except BaseException:
            act.flush_failures += 1
            raise
        finally:
            act.flushes_in_flight -= 1
        act.flushes_done += 1
        self._stored(node, new, sent)
        node.stores += 1
        node.meta_dirty = False
        node.cached_etag = new.etag  # the page cache holds exactly what was stored

    async def _settle(self, key: str | None, *, under: bool = False) -> None:
        """Write-back: wait until what the journal holds for ``key`` (or, ``under``, for the names
        directly below the prefix ``key``) is in the store; its failure or conflict is raised."""
        journal = getattr(self.store, "settle", None)
        if journal is None or key is None:
            return
        fn = self.store.settle_under if under else journal
        await trio.to_thread.run_sync(fn, key, abandon_on_cancel=True)

    async def _content(self, node: Inode) -> FileContent:
        if node.content is None:
            if node.foreign:
                base = ForeignBase(self.store, self.object_key(node), node.foreign_size, node.etag,
                                   self.cfg.chunk_size)
                node.content = FileContent(self.cache, base, self.cfg.chunk_size, node.foreign_size)
            else:
                node.content = FileContent(self.cache, node.obj, self.cfg.chunk_size,
                                           node.obj.size if node.obj is not None else 0)
        return node.content

    def dirty_inodes(self) -> list[Inode]:
        return [n for n in self.table.by_ino.values() if n.dirty and n.linked]

    async def flush_all(self, final: bool = False) -> list[tuple[str, DssefsError]]:
        """Store every dirty file; returns the failures (object, error) without raising.

        ``final`` (unmount): a file whose upload lost a conflict is saved next to it as
        ``NAME.dssefs-conflict-<UTC time>`` (a new object), so the local changes survive."""
        failures: list[tuple[str, DssefsError]] = []

        async def one(node: Inode) -> None:
            try:
                async with node.lock:
                    try:
                        await self._flush_locked(node)
                    except ConflictError:
                        if not final or node.content is None:
                            raise
                        await self._save_conflict_copy(node)
            except DssefsError as e:
                failures.append((self.describe(node.ino), e))
                log.error("op=flush object=%s errno=%s reason=%s", self.describe(node.ino),
                          errno.errorcode.get(e.errno, e.errno), e)

        async with trio.open_nursery() as nursery:
            for node in self.dirty_inodes():
                nursery.start_soon(one, node)
        return failures

    async def _save_conflict_copy(self, node: Inode) -> None:
        parent = self.node(node.parent)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        name = conflict_name(node.name, stamp, limit=self.name_max)
        key = self.dir_prefix(parent) + name
        content = node.content
        new = await self._io(self._flush_sync, key, content, node.attrs.encode(), None, False)
        log.warning("event=conflict_copy object=%s saved_as=%s/%s reason='another client stored a newer "
                    "version; the local changes were saved under a new name'", self.describe(node.ino),
                    self.store.url.rstrip("/"), key)
        node.meta_dirty = False
        node.stores += 1
        # the content now belongs to the copy: nothing left to store under the original name
        content.rebase(new)
        self._listed(parent, name, "file")
