"""setattr (chmod, chown, truncate, utimens) and storing attribute-only changes.
"""

from __future__ import annotations

import errno
import stat

from ..errors import MetadataBudgetError, PreconditionFailed
from .attributes import now_ns
from .common import Stat, fail
from .inodes import Inode


class MetadataOps:
    """Attribute changes and their persistence."""

    async def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None,
                      gid: int | None = None, size: int | None = None, atime_ns: int | None = None,
                      mtime_ns: int | None = None, fh: int | None = None, caller_uid: int = 0) -> Stat:
        self._writable_fs()
        node = self.node(ino)
        if node.foreign or node.broken:
            raise fail(errno.EACCES, "not a dssefs object: read-only")
        async with node.lock:
            old = node.attrs.copy()
            a = node.attrs
            t = now_ns()
            if size is not None:
                if node.is_dir():
                    raise fail(errno.EISDIR)
                if not a.is_reg():
                    raise fail(errno.EINVAL)
                content = await self._content(node)
                await self._cpu(content.truncate, size)
                a.mtime_ns = t
                if a.mode & (stat.S_ISUID | stat.S_ISGID) and caller_uid != 0:
                    a.mode &= ~stat.S_ISUID
                    if a.mode & stat.S_IXGRP:
                        a.mode &= ~stat.S_ISGID
            if mode is not None:
                a.mode = stat.S_IFMT(a.mode) | (mode & 0o7777)
            if uid is not None or gid is not None:
                if not node.is_dir() and ((uid is not None and uid != a.uid) or (gid is not None and gid != a.gid)
                                          or caller_uid != 0):
                    a.mode &= ~stat.S_ISUID
                    if a.mode & stat.S_IXGRP:
                        a.mode &= ~stat.S_ISGID
                if uid is not None:
                    a.uid = uid
                if gid is not None:
                    a.gid = gid
            if atime_ns is not None:
                a.atime_ns = atime_ns
            if mtime_ns is not None:
                a.mtime_ns = mtime_ns
            a.ctime_ns = t
            node.meta_dirty = True
            if node.writers == 0:  # nobody writing: store now (else at the next flush/close)
                try:
                    await self._persist_attrs(node)
                except MetadataBudgetError:
                    node.attrs = old
                    node.meta_dirty = False
                    raise
        return self.stat(node)

    async def _persist_attrs(self, node: Inode) -> None:
        """Store changed attributes now (lock held): a metadata-only self-copy when possible."""
        if not node.meta_dirty:
            return
        if node.content is not None and node.content.modified:
            await self._flush_locked(node)
            return
        key = self.object_key(node)
        if key is None:  # the root of a bucket without prefix: attributes live in memory
            node.meta_dirty = False
            return
        if not node.linked:
            node.meta_dirty = False
            return
        blob = node.attrs.encode()
        if node.stored and node.obj is not None:
            obj = node.obj
            try:
                new = await self._io(self.vault.update_attrs, obj, blob)
            except PreconditionFailed:
                raise fail(errno.EIO, f"{self.store.url.rstrip('/')}/{key}: changed by another client; "
                                      "attributes not stored") from None
            self._stored(node, new)
        elif node.is_dir() or not node.stored:
            if not node.is_dir() and not (node.content is not None):
                node.meta_dirty = False
                return
            if node.is_dir():
                res = await self._io(self._write_sync, key, b"", blob, None, True)
                self._stored(node, res)
            else:
                await self._flush_locked(node, force=True)
                return
        node.meta_dirty = False
