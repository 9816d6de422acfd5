"""Names: probing the store for one name or one directory level, keeping the inode
table in step with it (revalidation after the entry/attribute TTL, the small-directory listing
cache), and the lookup/getattr/forget operations.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import stat

from ..envelope.epoch import RESERVED_NAME
from ..errors import DssefsError, NotDssefsObject, ObjectNotFound
from ..store.base import ObjectInfo
from .attributes import Attrs, now_ns
from .cache import FileContent, ForeignBase
from .common import LISTING_CACHE_MAX, NAME_MAX, Probe, Stat, fail, with_links
from .inodes import ROOT_INODE, Inode

log = logging.getLogger("dssefs.fs")


class NamespaceOps:
    """Lookups, probes and inode bookkeeping."""

    # ---- probing the store (blocking; worker threads) -------------------------------------------

    def _describe_sync(self, key: str, info: ObjectInfo, kind: str, prev=None) -> Probe:
        """``prev``: the OpenObject this inode had; when the store still has that very version
        (same ETag, size and metadata) it is reused as it is (nothing to parse, unwrap or decrypt)."""
        body = info.prefix
        if body is not None:  # not kept with the object: decrypted below or dropped
            info = dataclasses.replace(info, prefix=None)
        if (prev is not None and prev.key == key and prev.etag == info.etag and prev.info.size == info.size
                and prev.info.metadata == info.metadata):
            obj = prev
            body = None  # same version as before: its chunks are cached or fetched on demand
        else:
            obj = None
        try:
            if obj is None:
                obj = self.vault.open(key, info, data_keys=prev.data_keys if prev is not None else None)
            blob = obj.attrs()  # sealed: fails authentication if tampered with
            a = None if blob is None else Attrs.decode(blob)
        except NotDssefsObject:
            a = self._default_attrs(kind)
            t = int(info.mtime * 1e9)
            a.atime_ns = a.mtime_ns = a.ctime_ns = t
            if kind == "file":
                a.mode = stat.S_IFREG | (self.cfg.file_mode & 0o555 if self.cfg.foreign_objects == "read-only"
                                         else self.cfg.file_mode)
            return Probe(kind, a, True, None, info.etag, foreign=True, size=info.size)
        except DssefsError as e:  # tampered object or attributes, key access denied...
            return self._broken_probe(key, kind, e, info)
        if a is None:
            a = self._default_attrs(kind)
            t = int(info.mtime * 1e9)
            a.atime_ns = a.mtime_ns = a.ctime_ns = t
        if kind == "dir" and not a.is_dir():
            a.mode = stat.S_IFDIR | (a.mode & 0o7777)
        if kind == "file" and a.is_dir():
            a.mode = stat.S_IFREG | (a.mode & 0o7777)
        plains = None
        if (body is not None and len(body) == info.size and obj.size <= self.cfg.small_file_prefetch
                and (a.is_reg() or a.is_symlink())):
            try:
                plains = obj.open_body(body)
            except DssefsError:
                plains = None  # a read fetches it again and reports the failure then
        return Probe(kind, a, True, obj, info.etag, size=obj.size, body=plains)

    def _broken_probe(self, key: str, kind: str, error: DssefsError, info: ObjectInfo | None = None) -> Probe:
        """A name that exists but whose object cannot be used: listed with default attributes (with
        the store's time and ETag when the failure came after the store answered), size 0;
        opening it fails with ``error``'s errno, and the log names it."""
        log.warning("event=probe_failed object=%s/%s errno=%s reason=%s (listed with default attributes; "
                    "opening it fails)", self.store.url.rstrip("/"), key,
                    errno.errorcode.get(error.errno, error.errno), str(error).replace("\n", " "))
        a = self._default_attrs(kind)
        if info is not None:
            a.atime_ns = a.mtime_ns = a.ctime_ns = int(info.mtime * 1e9)
        return Probe(kind, a, True, None, info.etag if info is not None else None, broken=error, size=0)

    def _probe_sync(self, dirpfx: str, name: str, hint: str | None = None, prev=None) -> Probe | None:
        key = dirpfx + name
        if hint != "dir":
            try:
                return self._describe_sync(key, self.store.head(key, prefix=self._probe_prefix), "file", prev)
            except ObjectNotFound:
                if hint == "file":
                    return None
        try:
            return self._describe_sync(key + "/", self.store.head(key + "/"), "dir", prev)
        except ObjectNotFound:
            pass
        for _item in self.store.list(key + "/", delimiter="/"):
            return Probe("dir", self._default_attrs("dir"), False)
        return None

    def _list_sync(self, dirpfx: str, limit: int | None = None, reserved: list | None = None
                   ) -> list[tuple[str, str]] | None:
        """Sorted ``(name, kind)`` of one directory level; None if it has more than ``limit``.
        ``reserved`` (a list) gets ``True`` appended when the level holds dssefs's own ``.dssefs``
        records, which are never listed."""
        names: dict[str, str] = {}
        for n, item in enumerate(self.store.list(dirpfx, delimiter="/")):
            if limit is not None and n >= limit:
                return None
            if isinstance(item, str):
                name, kind = item[len(dirpfx):].rstrip("/"), "dir"
            else:
                name, kind = item.key[len(dirpfx):], "file"
            if name == RESERVED_NAME and reserved is not None:
                reserved.append(True)
            if not name or "/" in name or name in (".", "..", RESERVED_NAME) or len(name.encode()) > NAME_MAX:
                continue
            if names.get(name) != "file":  # a file and a directory of one name: the file wins
                names[name] = kind
        return sorted(names.items())

    # ---- inode bookkeeping ------------------------------------------------------------------------

    def _apply(self, node: Inode, p: Probe) -> None:
        changed = p.etag != node.etag
        if node.touched_ns and p.attrs.is_dir():
            # entries changed through this mount after the stored attributes were written: those
            # times live in memory only and a refresh never takes them back
            p.attrs.mtime_ns = max(p.attrs.mtime_ns, node.touched_ns)
            p.attrs.ctime_ns = max(p.attrs.ctime_ns, node.touched_ns)
        node.attrs = p.attrs
        node.stored = p.stored
        node.obj = p.obj
        node.etag = p.etag
        node.foreign = p.foreign
        node.foreign_size = p.size if p.foreign else 0
        node.broken = p.broken
        node.validated = self._now()
        if changed:
            node.symlink_target = None
            # a version that cannot be opened does not replace what an open reader has (its reads
            # stay pinned to the version it opened and fail if that is gone)
            if node.content is not None and not node.content.modified and p.broken is None:
                if node.foreign:
                    base = ForeignBase(self.store, self.object_key(node), p.size, p.etag, self.cfg.chunk_size)
                else:
                    base = p.obj
                node.content.reset(base, p.size if base is not None else 0)
        if p.body is not None and p.obj is not None and not p.foreign:
            if node.attrs.is_symlink():
                node.symlink_target = b"".join(p.body)
            elif node.attrs.is_reg():
                if node.content is None:
                    node.content = FileContent(self.cache, p.obj, self.cfg.chunk_size, p.obj.size)
                node.content.preload(p.obj, p.body)

    def _fresh(self, node: Inode, ttl: float) -> bool:
        return self._now() - node.validated < ttl

    def _local_authority(self, node: Inode) -> bool:
        """True when local state must not be replaced by what the store says."""
        return node.dirty or node.writers > 0 or not node.linked

    async def _child(self, parent: Inode, name: str, hint: str | None = None) -> Inode | None:
        """The linked child ``name`` of ``parent``, revalidated against the store if stale."""
        node = self.table.child(parent.ino, name)
        if node is not None and (self._local_authority(node) or self._fresh(node, self.cfg.entry_timeout)):
            return node
        if hint is None:
            names = await self._dir_names(parent)
            if names is not None:
                hint = names.get(name)
                if hint is None:  # answered by a fresh listing: no such name
                    if node is not None:
                        self.table.detach(node)
                    self.table.vanish(parent.ino, name)
                    return None
        prev = node.obj if node is not None else None
        p = await self._io(self._probe_sync, self.dir_prefix(parent), name, hint, prev)
        return self._install(parent, name, p)

    async def _dir_names(self, parent: Inode) -> dict[str, str] | None:
        """``name -> kind`` of a small directory from one listing request, cached for the entry
        TTL and kept up to date with this mount's own changes.  Negative lookups (every create
        starts with one) are answered from it.  None for directories of more than one page."""
        cached = self._listings.get(parent.ino)
        if cached is not None and self._now() - cached[0] < self.cfg.entry_timeout:
            return cached[1]
        started = self._now()
        if len(self._listings) > 4096:  # drop expired listings
            self._listings = {k: v for k, v in self._listings.items()
                              if started - v[0] < self.cfg.entry_timeout}
        names = await self._io(self._list_sync, self.dir_prefix(parent), LISTING_CACHE_MAX)
        merged = None if names is None else dict(names)
        if merged is not None:
            for child in self.table.children(parent.ino):  # created here, not stored yet
                if child.dirty or (not child.stored and not child.is_dir()):
                    merged[child.name] = "dir" if child.is_dir() else "file"
        self._listings[parent.ino] = (started, merged)
        return merged

    def _listed(self, parent: Inode, name: str, kind: str | None) -> None:
        """Keep a cached listing in step with a change made through this mount."""
        cached = self._listings.get(parent.ino)
        if cached is not None and cached[1] is not None:
            if kind is None:
                cached[1].pop(name, None)
            else:
                cached[1][name] = kind

    def _install(self, parent: Inode, name: str, p: Probe | None) -> Inode | None:
        """Make the inode table agree with a probe of ``parent/name``."""
        node = self.table.child(parent.ino, name)  # the table may have changed meanwhile
        if node is not None and self._local_authority(node):
            return node
        if p is None:
            if node is not None:
                self.table.detach(node)
            self.table.vanish(parent.ino, name)  # gone from the store: a new object is another file
            return None
        if node is not None and (node.is_dir() != (p.kind == "dir")):
            self.table.detach(node)
            node = None
        if node is None:
            node = self.table.add(parent.ino, name, p.attrs)
        self._apply(node, p)
        return node

    async def _existing(self, parent: Inode, name: str) -> Inode:
        node = await self._child(parent, name)
        if node is None:
            raise fail(errno.ENOENT)
        return node

    def _dir(self, ino: int) -> Inode:
        node = self.node(ino)
        if not node.is_dir():
            raise fail(errno.ENOTDIR)
        return node

    @staticmethod
    def _new_attrs(parent: Inode, mode: int, uid: int, gid: int, rdev: int = 0) -> Attrs:
        """Attributes of a new entry; in a set-group-ID directory it takes the directory's group
        and a new subdirectory inherits the bit (what local file systems do; FUSE leaves it to us)."""
        if parent.attrs.mode & stat.S_ISGID:
            gid = parent.attrs.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        return Attrs.new(mode, uid, gid, rdev)

    async def _refresh(self, node: Inode) -> None:
        if (node.ino == ROOT_INODE or self._local_authority(node)
                or self._fresh(node, self.cfg.attr_timeout)):
            return
        parent = self.table.get(node.parent)
        if parent is None:
            return
        p = await self._io(self._probe_sync, self.dir_prefix(parent), node.name,
                           "dir" if node.is_dir() else "file", node.obj)
        if p is None:
            if node.open_count == 0:
                self.table.detach(node)
                raise fail(errno.ENOENT, "deleted by another client")
            node.validated = self._now()
            return
        if self._local_authority(node):
            return
        self._apply(node, p)

    def _touch_dir(self, parent: Inode) -> None:
        """An entry of ``parent`` was added, removed or renamed through this mount.  The new
        mtime/ctime is kept in memory only (not stored: one metadata copy per create would cost a
        request and conflict between clients writing into one directory); refreshes keep it."""
        t = now_ns()
        parent.attrs.mtime_ns = parent.attrs.ctime_ns = t
        parent.touched_ns = t

    async def lookup(self, parent_ino: int, name: str) -> Stat:
        parent = self._dir(parent_ino)
        if name == ".":
            node = parent
        elif name == "..":
            node = self.node(parent.parent)
        elif name == RESERVED_NAME:  # dssefs's own records: never a file or directory
            raise fail(errno.ENOENT)
        else:
            self._check_name(parent, name)
            node = await self._existing(parent, name)
        node.nlookup += 1
        return with_links(self.stat(node), node)

    def incref(self, ino: int) -> None:
        node = self.table.get(ino)
        if node is not None:
            node.nlookup += 1

    def forget(self, items) -> None:
        for ino, n in items:
            self.table.forget(ino, n)

    def trim(self, inos) -> None:
        for ino in inos:
            node = self.table.get(ino)
            if node is not None:
                self.table.maybe_drop(node)

    async def getattr(self, ino: int) -> Stat:
        node = self.node(ino)
        await self._refresh(node)
        return with_links(self.stat(node), node)
