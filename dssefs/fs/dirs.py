"""Namespace changes: mkdir, mknod, symlink, readlink, link, unlink and rmdir (rename is in
:mod:`.renames`).
"""

from __future__ import annotations

import errno
import stat

from ..envelope.epoch import RESERVED_NAME
from ..errors import PreconditionFailed
from ..objects.intents import parse_intent_key
from .attributes import Attrs
from .common import PLAIN_MARKER_BODY, Stat, fail
from .inodes import Inode
from .renames import RenameOps


class DirOps(RenameOps):
    """Creating, removing and renaming names."""

    async def _create_object(self, parent: Inode, name: str, attrs: Attrs, body: bytes = b"",
                             kind: str = "file") -> Inode:
        self._writable_fs()
        self._check_name(parent, name)
        if await self._child(parent, name) is not None:
            raise fail(errno.EEXIST)
        if kind == "file" and not attrs.is_reg():
            await self._unplain(parent)  # a symbolic link or special file (common.PLAIN_MARKER_BODY)
        key = self.dir_prefix(parent) + name + ("/" if kind == "dir" else "")
        sent = self._now()
        try:
            obj = await self._io(self._write_sync, key, body, attrs.encode(), None, True)
        except PreconditionFailed:
            raise fail(errno.EEXIST, f"{key} was created by another client") from None
        node = self.table.add(parent.ino, name, attrs)
        self._stored(node, obj, sent)
        node.nlookup += 1
        self._touch_dir(parent)
        self._listed(parent, name, kind)
        if kind == "dir":  # nothing was under the new name: its listing is known to be empty
            self._listings[node.ino] = (self._now(), {})
            node.made = self._now()
        return node

    async def mkdir(self, parent_ino: int, name: str, mode: int, uid: int, gid: int) -> Stat:
        parent = self._dir(parent_ino)
        attrs = self._new_attrs(parent, stat.S_IFDIR | (mode & 0o7777), uid, gid)
        if self.cfg.attr_delay > 0:
            node = await self._create_dir_deferred(parent, name, attrs)
        else:
            node = await self._create_object(parent, name, attrs, PLAIN_MARKER_BODY, kind="dir")
        return self.stat(node)

    async def _create_dir_deferred(self, parent: Inode, name: str, attrs: Attrs) -> Inode:
        """mkdir without a store request: the directory's marker object (which carries its
        attributes) is stored like a deferred attribute change, within ``attr_delay`` or at the
        next fsync of the directory or of its parent, rename or unmount, together with the
        attribute changes made meanwhile (tar's chmod, chown and utimens of a directory it created
        cost no request of their own).  As on a local file system, a crash before then may lose
        the new directory; files stored below it keep it in existence."""
        self._writable_fs()
        self._check_name(parent, name)
        if await self._child(parent, name) is not None:
            raise fail(errno.EEXIST)
        node = self.table.add(parent.ino, name, attrs)
        node.stored = False
        node.meta_dirty = True
        node.validated = self._now()
        node.nlookup += 1
        self._touch_dir(parent)
        self._listed(parent, name, "dir")
        self._listings[node.ino] = (self._now(), {})  # nothing is under the new name
        node.made = self._now()
        self._defer_attrs(node)
        return node

    async def mknod(self, parent_ino: int, name: str, mode: int, rdev: int, uid: int, gid: int) -> Stat:
        parent = self._dir(parent_ino)
        if stat.S_IFMT(mode) == 0:
            mode |= stat.S_IFREG
        if stat.S_ISDIR(mode) or stat.S_ISLNK(mode):
            raise fail(errno.EINVAL)
        node = await self._create_object(parent, name, self._new_attrs(parent, mode & 0o177777, uid, gid, rdev))
        return self.stat(node)

    async def symlink(self, parent_ino: int, name: str, target: bytes, uid: int, gid: int) -> Stat:
        parent = self._dir(parent_ino)
        if len(target) >= 4096:
            raise fail(errno.ENAMETOOLONG)
        attrs = self._new_attrs(parent, stat.S_IFLNK | 0o777, uid, gid)
        node = await self._create_object(parent, name, attrs, body=target)
        node.symlink_target = bytes(target)
        return self.stat(node)

    async def readlink(self, ino: int) -> bytes:
        node = self.node(ino)
        if not node.attrs.is_symlink():
            raise fail(errno.EINVAL)
        await self._refresh(node)
        if node.symlink_target is None:
            if node.broken is not None:
                raise node.broken
            obj = node.obj
            node.symlink_target = await self._io(obj.read, 0, obj.size) if obj.size else b""
        return node.symlink_target

    async def link(self, ino: int, parent_ino: int, name: str) -> Stat:
        raise fail(errno.EPERM, "hard links are not supported")

    async def unlink(self, parent_ino: int, name: str) -> None:
        self._writable_fs()
        parent = self._dir(parent_ino)
        node = await self._existing(parent, name)
        if node.is_dir():
            raise fail(errno.EISDIR)
        if node.foreign or node.broken:
            raise fail(errno.EACCES, f"{self.describe(node.ino)} is not a dssefs object: not deleted")
        async with node.lock:
            await self._drop_object(node)
        self._touch_dir(parent)
        self._listed(parent, name, None)

    async def _drop_object(self, node: Inode) -> None:
        """Remove a file's name and have its stored object deleted in the background (lock held;
        see :mod:`.deletes`); open handles keep working on the data, read in first."""
        if node.open_count > 0 and node.content is not None:
            await self._io(node.content.materialize)
        if node.stored:
            self.deletes.add(self.object_key(node))
        node.stored = False
        node.meta_dirty = False
        self.table.detach(node)

    async def _is_empty(self, node: Inode, reserved: list | None = None) -> bool:
        """Whether ``node`` has no entries; ``reserved`` gets ``True`` when its listing showed
        '.dssefs' records (see :meth:`_list_sync`)."""
        if any(n.dirty or not n.stored and not n.is_dir() for n in self.table.children(node.ino)):
            return False
        entries = await self._io(self._list_sync, self.dir_prefix(node), None, reserved)
        return not entries

    def _known_empty(self, node: Inode) -> bool:
        """Empty without a request: this mount listed the directory less than ``entry_timeout``
        ago (the small-directory listing, kept in step with this mount's own changes), every name
        in it has been removed through this mount since, and that listing showed no '.dssefs'
        records.  ``rm -r`` lists each directory just before it empties and removes it.  As with
        lookups answered from that listing, an entry another client made within the last
        ``entry_timeout`` is not seen; its objects stay in the store (rmdir deletes the marker)."""
        cached = self._listings.get(node.ino)
        return (cached is not None and cached[1] == {} and self._now() - cached[0] < self.cfg.entry_timeout
                and not self.table.children(node.ino) and not self.deletes.has_records(self.dir_prefix(node)))

    async def rmdir(self, parent_ino: int, name: str) -> None:
        self._writable_fs()
        parent = self._dir(parent_ino)
        node = await self._existing(parent, name)
        if not node.is_dir():
            raise fail(errno.ENOTDIR)
        records: list = []
        if not self._known_empty(node) and not await self._is_empty(node, records):
            raise fail(errno.ENOTEMPTY)
        if records:  # only then: an rmdir costs no listing beyond the emptiness check
            # the objects those records unwrap go first: after a crash none is left undecryptable
            await self.deletes.sync(self.dir_prefix(node))
            await self._io(self._drop_records_sync, self.dir_prefix(node))
            self.deletes.records_dropped(self.dir_prefix(node))
        if node.stored:  # the marker: deleted in the background, like an unlinked file's object
            self.deletes.add(self.object_key(node))
        self.deletes.dir_removed(self.dir_prefix(node))
        node.stored = False
        node.meta_dirty = False  # pending attributes die with the directory
        self.table.detach(node)
        self._touch_dir(parent)
        self._listed(parent, name, None)
        self._listings.pop(node.ino, None)

    def _drop_records_sync(self, dirpfx: str) -> None:
        """Delete the '.dssefs' records below an empty directory: only objects below it can
        name them.  The records of interrupted renames there (a mount of a prefix below wrote
        them) are finished first, under the epoch records they are sealed with: nothing is
        left to move, so that only drops them."""
        items = [i for i in self.store.list(dirpfx + RESERVED_NAME + "/", delimiter=None)
                 if not isinstance(i, str)]
        renames = self._renames()
        for item in items:
            if parse_intent_key(item.key) is not None:
                renames.resume(renames.load(item.key))
        for item in items:
            if parse_intent_key(item.key) is None:
                self.store.delete(item.key)
