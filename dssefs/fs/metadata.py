"""setattr (chmod, chown, truncate, utimens) and storing attribute-only changes.

Attribute-only changes of an inode without unsaved data are stored once ``attr_idle`` seconds
pass without another such change in the mount, at the latest ``attr_delay`` seconds after the
first of them (one metadata-only self-copy for a chmod + chown + utimens burst, off the caller's
path), or earlier by the inode's next fsync/close, a rename, ``fsyncdir`` or unmount.
"""

from __future__ import annotations

import errno
import logging
import stat

import trio

from ..errors import DssefsError, MetadataBudgetError, PreconditionFailed
from .attributes import now_ns
from .common import PLAIN_MARKER_BODY, Stat, check_size, fail, with_links
from .inodes import Inode

log = logging.getLogger("dssefs.fs")


class MetadataOps:
    """Attribute changes and their persistence."""

    async def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None,
                      gid: int | None = None, size: int | None = None, atime_ns: int | None = None,
                      mtime_ns: int | None = None, fh: int | None = None, caller_uid: int = 0) -> Stat:
        node = self._changeable(ino)
        async with node.lock:
            old = node.attrs.copy()
            a = node.attrs
            t = now_ns()
            if size is not None:
                if node.is_dir():
                    raise fail(errno.EISDIR)
                if not a.is_reg():
                    raise fail(errno.EINVAL)
                check_size(size)
                content = await self._content(node)
                await self._cpu(content.truncate, size)
                h = self.handles.get(fh) if fh is not None else None
                if h is not None and h.node is node:
                    h.mark_changed()  # ftruncate: the close of this descriptor stores it
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
                node.touched_ns = 0  # a time set explicitly is stored, and is what refreshes show
            a.ctime_ns = t
            await self._attrs_changed(node, old, node.meta_dirty, may_defer=size is None)
        return with_links(self.stat(node), node)

    async def _attrs_changed(self, node: Inode, old, was_dirty: bool, *, may_defer: bool = True) -> None:
        """Mark ``node``'s attributes changed (inode lock held).  With nobody writing, store them
        soon (deferred) or now; otherwise the next flush/close stores them.  A change that does
        not fit the metadata budget is rolled back and raised."""
        node.meta_dirty = True
        if node.writers:
            return
        try:
            if may_defer and self._can_defer(node):
                self._check_budget(node)
                self._defer_attrs(node)
            else:
                await self._persist_attrs(node)
        except MetadataBudgetError:
            node.attrs = old
            node.meta_dirty = was_dirty
            raise

    # ---- deferred attribute stores ------------------------------------------------------------

    def _can_defer(self, node: Inode) -> bool:
        """Attribute-only changes may wait when storing them is a self-copy of a stored object
        and no file data is unsaved (that is stored at once, with the attributes, by the next
        flush).  A directory without a marker object gets its marker at once, unless the marker
        of a directory made by mkdir is already waiting (then the two are stored together)."""
        if self.cfg.attr_delay <= 0 or not node.linked:
            return False
        if node.is_dir() and not node.stored:
            return node.ino in self._deferred
        return node.stored and node.obj is not None and not (node.content is not None and node.content.modified)

    def _defer_attrs(self, node: Inode) -> None:
        """Store ``node``'s attributes within ``attr_delay`` seconds (inode lock held), or once
        ``attr_idle`` seconds pass without another deferred change (the burst is over: waiting
        longer would merge nothing more)."""
        now = self._now()
        if node.ino not in self._deferred:  # the first change sets the deadline: no starvation
            self._deferred[node.ino] = now + self.cfg.attr_delay
        self._deferred_last = now
        if not self._deferring:
            self._deferring = True
            trio.lowlevel.spawn_system_task(self._deferred_attrs_task, name="dssefs-deferred-attrs")

    async def _deferred_attrs_task(self) -> None:
        try:
            while self._deferred:
                now = self._now()
                quiet = self._deferred_last + min(self.cfg.attr_idle, self.cfg.attr_delay)
                due = [ino for ino, t in self._deferred.items() if t <= now or quiet <= now]
                if not due:
                    await trio.sleep(max(0.0, min(quiet, *self._deferred.values()) - now))
                    continue
                async with trio.open_nursery() as nursery:
                    for ino in due:
                        del self._deferred[ino]
                        node = self.table.get(ino)
                        if node is not None:
                            nursery.start_soon(self._store_deferred, node)
        finally:
            self._deferring = False

    async def _store_deferred(self, node: Inode) -> None:
        try:
            async with node.lock:
                # open for writing: stored by the writer's next flush/close; unlinked: nothing to do
                if not node.meta_dirty or not node.linked or node.writers > 0:
                    return
                await self._persist_attrs(node)
        except DssefsError as e:
            node.meta_error = e
            log.error("op=store_attributes object=%s errno=%s reason=%s (kept in memory; retried by the "
                      "next fsync/close of the file or at unmount)", self.describe(node.ino),
                      errno.errorcode.get(e.errno, e.errno), e)
        except Exception:  # noqa: BLE001 - a system task must not crash the mount
            log.exception("op=store_attributes object=%s unexpected error", self.describe(node.ino))

    async def store_attrs_now(self, node: Inode) -> None:
        """Store pending attribute changes of ``node`` now (fsync, fsyncdir); raises the error of
        a failed deferred store if storing still fails."""
        self._deferred.pop(node.ino, None)
        if node.meta_dirty and node.linked:
            async with node.lock:
                await self._persist_attrs(node)
        node.meta_error = None

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
        sent = self._now()
        if node.stored and node.obj is not None:
            obj = node.obj
            try:
                new = await self._io(self.vault.update_attrs, obj, blob)
            except PreconditionFailed:
                raise fail(errno.EIO, f"{self.store.url.rstrip('/')}/{key}: changed by another client; "
                                      "attributes not stored") from None
            self._stored(node, new, sent)
        elif node.is_dir() or not node.stored:
            if not node.is_dir() and not (node.content is not None):
                node.meta_dirty = False
                return
            if node.is_dir():
                try:
                    res = await self._io(self._write_sync, key, self._marker_body(node), blob, None, True)
                except PreconditionFailed:
                    raise fail(errno.EIO, f"{self.store.url.rstrip('/')}/{key}: directory marker created "
                                          "by another client meanwhile; attributes not stored") from None
                self._stored(node, res, sent)
            else:
                await self._flush_locked(node, force=True)
                return
        node.meta_dirty = False

    # ---- plain directories (PLAIN_MARKER_BODY) --------------------------------------------------

    @staticmethod
    def _marker_body(node: Inode) -> bytes:
        """The body of a new marker of directory ``node``: plain only for a directory made by
        mkdir here that no symbolic link or special file has entered since."""
        return PLAIN_MARKER_BODY if node.made and not node.holds_special else b""

    async def _unplain(self, d: Inode) -> None:
        """Before a symbolic link or special file enters directory ``d`` (docs/format.md, section
        E): a plain marker is replaced by one that is not (same attributes, conditional on the
        version replaced) and stored first; a marker not stored yet is stored not plain."""
        d.holds_special = True
        key = self.object_key(d)
        for _attempt in range(3):
            await self._refresh(d, fresh=True)
            obj = d.obj
            if key is None or not d.linked or not d.stored or obj is None or obj.size != len(PLAIN_MARKER_BODY):
                return
            async with d.lock:
                if d.obj is not obj:
                    continue
                sent = self._now()
                try:
                    new = await self._io(self._write_sync, key, b"", d.attrs.encode(), obj, False)
                except PreconditionFailed:
                    d.validated = 0.0  # changed by another client: look at it again
                    continue
                self._stored(d, new, sent)
                d.meta_dirty = False  # stored with it
                self._deferred.pop(d.ino, None)
            dl = self._dirlists.get(self.dir_prefix(d))
            if dl is not None:
                dl.versions.pop("", None)
            return
        raise fail(errno.EIO, f"{self.store.url.rstrip('/')}/{key}: directory marker changed by another "
                              "client while it was being updated; try again")
