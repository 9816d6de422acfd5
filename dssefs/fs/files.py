"""Open files: create, open, read, write, flush/fsync and release.
"""

from __future__ import annotations

import errno
import logging
import os
import stat

from ..errors import DssefsError
from .attributes import now_ns
from .cache import FileContent
from .common import Handle, Stat, check_size, fail
from .inodes import Inode

log = logging.getLogger("dssefs.fs")


class FileOps:
    """File handle operations."""

    def _new_handle(self, node: Inode, flags: int) -> Handle:
        acc = flags & os.O_ACCMODE
        h = Handle(next(self._fh), node, acc != os.O_RDONLY, bool(flags & os.O_APPEND))
        self.handles[h.fh] = h
        node.open_count += 1
        if h.writable:
            node.writers += 1
        return h

    def handle(self, fh: int) -> Handle:
        h = self.handles.get(fh)
        if h is None:
            raise fail(errno.EBADF)
        return h

    async def create(self, parent_ino: int, name: str, mode: int, flags: int, uid: int, gid: int
                     ) -> tuple[int, Stat]:
        self._writable_fs()
        parent = self._dir(parent_ino)
        self._check_name(parent, name)
        existing = await self._child(parent, name)
        if existing is not None:
            if flags & os.O_EXCL:
                raise fail(errno.EEXIST)
            fh, _keep = await self.open(existing.ino, flags & ~os.O_CREAT)
            existing.nlookup += 1
            return fh, self.stat(existing)
        attrs = self._new_attrs(parent, stat.S_IFREG | (mode & 0o7777), uid, gid)
        node = self.table.add(parent.ino, name, attrs)
        node.content = FileContent(self.cache, None, self.cfg.chunk_size, 0)
        node.content.modified = True  # close stores the (possibly empty) new file
        node.validated = self._now()
        node.nlookup += 1
        self._touch_dir(parent)
        self._listed(parent, name, "file")
        h = self._new_handle(node, flags)
        h.mark_changed()  # a new file: its close stores it (there is no old version to keep)
        return h.fh, self.stat(node)

    async def open(self, ino: int, flags: int) -> tuple[int, bool]:
        """Returns ``(fh, keep_cache)``."""
        node = self.node(ino)
        if node.is_dir():
            raise fail(errno.EISDIR)
        await self._refresh(node)
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        if writable or flags & os.O_TRUNC:
            self._writable_fs()
        if node.broken is not None:
            raise node.broken
        if node.foreign:
            if self.cfg.foreign_objects != "read-only":
                raise fail(errno.EACCES, f"{self.describe(ino)} is not a dssefs object (foreign_objects=deny)")
            if writable:
                raise fail(errno.EACCES, f"{self.describe(ino)} is not a dssefs object: read-only")
        if not node.attrs.is_reg():
            raise fail(errno.EACCES, "special files are not opened through dssefs")
        await self._content(node)
        h = self._new_handle(node, flags)
        try:
            if flags & os.O_TRUNC and writable:
                async with node.lock:
                    if node.content.size or node.obj is not None:
                        await self._cpu(node.content.truncate, 0)
                        node.attrs.mtime_ns = node.attrs.ctime_ns = now_ns()
        except BaseException:
            await self.release(h.fh)
            raise
        keep = node.cached_etag is not None and node.cached_etag == node.etag and not flags & os.O_TRUNC
        node.cached_etag = node.etag
        return h.fh, keep

    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self.handle(fh)
        content = h.node.content
        data = content.try_read(off, size)
        if data is None:
            data = await self._io(content.read, off, size)
        return data

    async def write(self, fh: int, off: int, data) -> int:
        h = self.handle(fh)
        if not h.writable:
            raise fail(errno.EBADF)
        node = h.node
        async with node.lock:
            content = node.content
            if h.append and not self.cfg.writeback_cache:
                off = content.size  # with the writeback cache the kernel already did this
            check_size(off + len(data))
            h.mark_changed()
            if content.try_write(off, data):
                n = len(data)
            else:
                n = await self._io(content.write, off, data)
            node.attrs.mtime_ns = node.attrs.ctime_ns = now_ns()
            if self._wb_usable_store():  # seals (and with write-behind uploads) a file written in order
                await self._wb_pump(node)
        return n

    async def flush(self, fh: int) -> None:
        """close(2) of one descriptor (FUSE FLUSH): returns once the file is stored.

        Unsaved data is stored only by the close of a handle that wrote it (or truncated the file
        through ``ftruncate``, or created the file): a FLUSH also comes from closing a duplicate
        descriptor (``dup2`` of a shell redirection, ``dd``'s reopening of its output right after
        ``O_TRUNC``) and from readers, and storing then would put a half-written or emptied
        version in place of the old one.  Such data is stored by the close of the handle that
        changed it, by the last close of the file (RELEASE) or by ``fsync``.  Attribute-only
        changes are stored by any close."""
        h = self.handle(fh)
        node = h.node
        if not (node.dirty and node.linked):
            return
        if node.content is not None and node.content.modified and not h.changed:
            return
        await self._store_now(node)

    async def fsync(self, fh: int) -> None:
        """fsync/fdatasync through any descriptor: every change of the file is stored (with
        --write-back: uploaded from the journal, not only journaled)."""
        node = self.handle(fh).node
        if node.dirty and node.linked:
            await self._store_now(node)
        if node.linked:
            await self._settle(self.object_key(node))

    async def _store_now(self, node: Inode) -> None:
        self._deferred.pop(node.ino, None)
        async with node.lock:
            await self._flush_locked(node)
        node.meta_error = None  # stored now: an earlier deferred failure has been retried

    async def release(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if h is None:
            return
        node = h.node
        node.open_count -= 1
        if h.writable:
            node.writers -= 1
        if node.writers == 0 and node.dirty and node.linked and self._can_defer(node):
            self._defer_attrs(node)  # only attributes are pending: the data was stored by FLUSH
        elif node.writers == 0 and node.dirty and node.linked:
            try:
                async with node.lock:
                    await self._flush_locked(node)
            except DssefsError as e:
                log.error("op=release object=%s errno=%s reason=%s (changes kept in memory; retried on "
                          "the next fsync/close or at unmount)", self.describe(node.ino),
                          errno.errorcode.get(e.errno, e.errno), e)
        if node.open_count == 0 and not node.linked and node.content is not None:
            node.content.discard()
        self.table.maybe_drop(node)
