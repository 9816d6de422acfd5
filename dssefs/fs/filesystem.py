"""The file system: POSIX-ish operations over a Vault, with no FUSE dependency.

Every public coroutine takes inode numbers and ``str`` names and raises :class:`DssefsError`
(``.errno``) on failure, so tests drive it directly under trio.  State (inode table, handles) is
owned by the trio thread; blocking work (store, KMS, crypto, spill I/O) runs in worker threads
under two capacity limiters.  Per-inode ``trio.Lock`` serialises writes, truncates and flushes of
one file; different files proceed concurrently.

Object layout under the mount's prefix ``P``:

* file ``a/b``           -> object ``P + "a/b"`` (body = file bytes, attrs = mode/owner/times/xattrs)
* directory ``a``        -> marker ``P + "a/"`` (empty body, attrs), or only implied by keys below it
* symlink                -> object whose encrypted body is the target
* fifo, socket, device   -> empty object; the type and rdev are in the attrs
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import stat
import time
from dataclasses import dataclass, field

import trio

from ..errors import (DssefsError, MetadataBudgetError, NotDssefsObject, ObjectNotFound,
                      PreconditionFailed)
from ..objects.vault import Vault, bytes_source
from ..store.base import ObjectInfo
from .attributes import Attrs, now_ns
from .cache import ChunkCache, FileContent, ForeignBase
from .inodes import ROOT_INODE, Inode, InodeTable
from .spill import SpillArea

log = logging.getLogger("dssefs.fs")

NAME_MAX = 255
KEY_MAX = 1024  # S3 object keys are at most 1024 UTF-8 bytes
READDIR_BATCH = 256
LISTING_CACHE_MAX = 1000  # directories up to one S3 listing page are cached for negative lookups
XATTR_PREFIX = "user."


class FsError(DssefsError):
    """A POSIX error decided by the file system itself (ENOENT, ENOTEMPTY...)."""


class ConflictError(FsError):
    """A conditional write lost: another client stored a newer version (or created the name)."""


def fail(code: int, message: str | None = None) -> FsError:
    return FsError(message or os.strerror(code), errno=code)


@dataclass
class FsConfig:
    attr_timeout: float = 1.0
    entry_timeout: float = 1.0
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)
    file_mode: int = 0o644
    dir_mode: int = 0o755
    foreign_objects: str = "deny"  # or "read-only"
    read_only: bool = False
    cache_size: int = 512 << 20
    spill_dir: str | None = None
    chunk_size: int = 1 << 20
    io_workers: int = 8
    crypto_workers: int = max(1, os.cpu_count() or 1)
    # The kernel's writeback cache merges small writes (4 KiB writes: 29 -> 84 MB/s measured) but
    # is off: in that mode the kernel never takes a regular file's size from the daemon again, so
    # another client's new version would be read with a stale size, and dirty pages still in the
    # kernel at SIGTERM are not reachable by the daemon's flush.
    writeback_cache: bool = False


@dataclass
class Stat:
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int


@dataclass
class Probe:
    """What the store says about one name."""

    kind: str  # "file" (any non-directory object) or "dir"
    attrs: Attrs
    stored: bool  # an object exists (file, or directory marker)
    obj: object = None
    etag: str | None = None
    foreign: bool = False
    size: int = 0
    broken: DssefsError | None = None


class Handle:
    __slots__ = ("fh", "node", "writable", "append")

    def __init__(self, fh: int, node: Inode, writable: bool, append: bool):
        self.fh, self.node, self.writable, self.append = fh, node, writable, append


class DirHandle:
    __slots__ = ("fh", "node", "names", "probes")

    def __init__(self, fh: int, node: Inode, names: list[tuple[str, str]]):
        self.fh, self.node, self.names = fh, node, names
        # name -> (time, Probe): store answers for entries resolved ahead of the kernel's
        # requests, so entries not yet handed out need no second round trip
        self.probes: dict[str, tuple[float, Probe | None]] = {}


class Filesystem:
    def __init__(self, vault: Vault, prefix: str = "", config: FsConfig | None = None):
        self.vault = vault
        self.store = vault.store
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.cfg = config or FsConfig()
        self.io = trio.CapacityLimiter(max(1, self.cfg.io_workers))
        self.cpu = trio.CapacityLimiter(max(1, self.cfg.crypto_workers))
        spill = SpillArea(self.cfg.spill_dir) if self.cfg.spill_dir else None
        self.cache = ChunkCache(self.cfg.cache_size, spill)
        t = now_ns()
        self.table = InodeTable(Attrs(stat.S_IFDIR | self.cfg.dir_mode, self.cfg.uid, self.cfg.gid, t, t, t))
        self.handles: dict[int, Handle] = {}
        self.dirs: dict[int, DirHandle] = {}
        self._fh = itertools.count(1)
        self._conditional = getattr(self.store, "supports_conditional_writes", True)
        self._listings: dict[int, tuple[float, dict[str, str] | None]] = {}
        self.chunk_log2 = self.cfg.chunk_size.bit_length() - 1

    def load_root(self) -> None:
        """Read the root's attributes from the prefix marker, if there is one (blocking; call
        before serving).  A bucket mounted without prefix keeps root attributes in memory."""
        if not self.prefix:
            return
        try:
            info = self.store.head(self.prefix)
        except ObjectNotFound:
            return
        p = self._describe_sync(self.prefix, info, "dir")
        root = self.table.root
        root.attrs, root.obj, root.etag, root.stored = p.attrs, p.obj, p.etag, p.stored

    # ---- plumbing -------------------------------------------------------------------------------

    async def _io(self, fn, *args, **kw):
        return await trio.to_thread.run_sync(functools.partial(fn, *args, **kw), limiter=self.io,
                                             abandon_on_cancel=False)

    async def _cpu(self, fn, *args, **kw):
        return await trio.to_thread.run_sync(functools.partial(fn, *args, **kw), limiter=self.cpu,
                                             abandon_on_cancel=False)

    def _now(self) -> float:
        return trio.current_time()

    def node(self, ino: int) -> Inode:
        node = self.table.get(ino)
        if node is None:
            raise fail(errno.ESTALE, f"inode {ino} is not known")
        return node

    def key_of(self, node: Inode) -> str:
        """The path of ``node`` under the prefix, without a trailing slash ('' for the root)."""
        parts = []
        n = node
        while n.ino != ROOT_INODE:
            parts.append(n.name)
            n = self.table.by_ino[n.parent]
        return self.prefix + "/".join(reversed(parts))

    def dir_prefix(self, node: Inode) -> str:
        return self.prefix if node.ino == ROOT_INODE else self.key_of(node) + "/"

    def object_key(self, node: Inode) -> str | None:
        if node.ino == ROOT_INODE:
            return self.prefix or None
        return self.key_of(node) + ("/" if node.is_dir() else "")

    def describe(self, ino: int) -> str:
        """``s3://bucket/key`` of an inode, for log lines."""
        node = self.table.get(ino)
        if node is None:
            return f"inode {ino}"
        try:
            key = self.object_key(node) if node.linked else f"(deleted) {node.name}"
        except KeyError:
            key = node.name
        return f"{self.store.url.rstrip('/')}/{key or ''}"

    def _check_name(self, parent: Inode, name: str) -> str:
        if not name or name in (".", "..") or "/" in name or "\0" in name:
            raise fail(errno.EINVAL, f"invalid name {name!r}")
        try:
            encoded = name.encode("utf-8")
        except UnicodeEncodeError:
            raise fail(errno.EILSEQ, "file names must be valid UTF-8 (S3 keys are)") from None
        if len(encoded) > NAME_MAX:
            raise fail(errno.ENAMETOOLONG)
        if len((self.dir_prefix(parent) + name + "/").encode("utf-8")) > KEY_MAX:
            raise fail(errno.ENAMETOOLONG, "path longer than S3's 1024-byte key limit")
        return name

    def _writable_fs(self) -> None:
        if self.cfg.read_only:
            raise fail(errno.EROFS)

    def _default_attrs(self, kind: str) -> Attrs:
        if kind == "dir":
            return Attrs(stat.S_IFDIR | self.cfg.dir_mode, self.cfg.uid, self.cfg.gid, 0, 0, 0)
        return Attrs(stat.S_IFREG | self.cfg.file_mode, self.cfg.uid, self.cfg.gid, 0, 0, 0)

    def stat(self, node: Inode) -> Stat:
        a = node.attrs
        if node.is_dir():
            size = 0
        elif node.content is not None:
            size = node.content.size
        elif node.obj is not None:
            size = node.obj.size
        else:
            size = node.foreign_size
        return Stat(node.ino, a.mode, 2 if node.is_dir() else 1, a.uid, a.gid, a.rdev, size,
                    (size + 511) // 512, a.atime_ns, a.mtime_ns, a.ctime_ns)

    # ---- probing the store (blocking; worker threads) -------------------------------------------

    def _describe_sync(self, key: str, info: ObjectInfo, kind: str, data_keys=None) -> Probe:
        try:
            obj = self.vault.open(key, info, data_keys=data_keys)
        except NotDssefsObject:
            a = self._default_attrs(kind)
            t = int(info.mtime * 1e9)
            a.atime_ns = a.mtime_ns = a.ctime_ns = t
            if kind == "file":
                a.mode = stat.S_IFREG | (self.cfg.file_mode & 0o555 if self.cfg.foreign_objects == "read-only"
                                         else self.cfg.file_mode)
            return Probe(kind, a, True, None, info.etag, foreign=True, size=info.size)
        except DssefsError as e:  # tampered object, key access denied...
            log.warning("object=%s/%s errno=%s reason=%s", self.store.url.rstrip("/"), key,
                        errno.errorcode.get(e.errno, e.errno), e)
            return Probe(kind, self._default_attrs(kind), True, None, info.etag, broken=e, size=0)
        blob = obj.attrs()
        if blob is None:
            a = self._default_attrs(kind)
            t = int(info.mtime * 1e9)
            a.atime_ns = a.mtime_ns = a.ctime_ns = t
        else:
            a = Attrs.decode(blob)
        if kind == "dir" and not a.is_dir():
            a.mode = stat.S_IFDIR | (a.mode & 0o7777)
        if kind == "file" and a.is_dir():
            a.mode = stat.S_IFREG | (a.mode & 0o7777)
        return Probe(kind, a, True, obj, info.etag, size=obj.size)

    def _probe_sync(self, dirpfx: str, name: str, hint: str | None = None, data_keys=None) -> Probe | None:
        key = dirpfx + name
        if hint != "dir":
            try:
                return self._describe_sync(key, self.store.head(key), "file", data_keys)
            except ObjectNotFound:
                if hint == "file":
                    return None
        try:
            return self._describe_sync(key + "/", self.store.head(key + "/"), "dir", data_keys)
        except ObjectNotFound:
            pass
        for _item in self.store.list(key + "/", delimiter="/"):
            return Probe("dir", self._default_attrs("dir"), False)
        return None

    def _list_sync(self, dirpfx: str, limit: int | None = None) -> list[tuple[str, str]] | None:
        """Sorted ``(name, kind)`` of one directory level; None if it has more than ``limit``."""
        names: dict[str, str] = {}
        for n, item in enumerate(self.store.list(dirpfx, delimiter="/")):
            if limit is not None and n >= limit:
                return None
            if isinstance(item, str):
                name, kind = item[len(dirpfx):].rstrip("/"), "dir"
            else:
                name, kind = item.key[len(dirpfx):], "file"
            if not name or "/" in name or name in (".", "..") or len(name.encode()) > NAME_MAX:
                continue
            if names.get(name) != "file":  # a file and a directory of one name: the file wins
                names[name] = kind
        return sorted(names.items())

    # ---- inode bookkeeping ------------------------------------------------------------------------

    def _apply(self, node: Inode, p: Probe) -> None:
        changed = p.etag != node.etag
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
            if node.content is not None and not node.content.modified:
                if node.foreign:
                    base = ForeignBase(self.store, self.object_key(node), p.size, p.etag, self.cfg.chunk_size)
                else:
                    base = p.obj
                node.content.reset(base, p.size if base is not None else 0)

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
                    return None
        keys = node.obj.data_keys if node is not None and node.obj is not None else None
        p = await self._io(self._probe_sync, self.dir_prefix(parent), name, hint, keys)
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
        keys = node.obj.data_keys if node.obj is not None else None
        p = await self._io(self._probe_sync, self.dir_prefix(parent), node.name,
                           "dir" if node.is_dir() else "file", keys)
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
        t = now_ns()
        parent.attrs.mtime_ns = parent.attrs.ctime_ns = t

    # ---- lookups and attributes -------------------------------------------------------------------

    async def lookup(self, parent_ino: int, name: str) -> Stat:
        parent = self._dir(parent_ino)
        if name == ".":
            node = parent
        elif name == "..":
            node = self.node(parent.parent)
        else:
            self._check_name(parent, name)
            node = await self._existing(parent, name)
        node.nlookup += 1
        return self.stat(node)

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
        return self.stat(node)

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

    # ---- persistence --------------------------------------------------------------------------------

    def _reopen_sync(self, key: str, data_keys=None):
        return self.vault.open(key, data_keys=data_keys)

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
                await self._io(self.vault.set_attrs, obj, blob)
                new = await self._io(self._reopen_sync, key, obj.data_keys)
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

    def _write_sync(self, key: str, body: bytes, attrs: bytes, prev, if_none_match: bool):
        """Write a small object (marker, symlink, special file) and return its OpenObject."""
        kw = {}
        if self._conditional:
            if prev is not None:
                kw["if_match"] = prev.etag
            elif if_none_match:
                kw["if_none_match"] = True
        res = self.vault.write(key, bytes_source(body), len(body), attrs=attrs,
                               file_id=prev.file_id if prev is not None else None,
                               generation=prev.generation + 1 if prev is not None else 0,
                               data_keys=prev.data_keys if prev is not None else None, **kw)
        return self._opened(key, res)

    def _opened(self, key: str, res):
        info = ObjectInfo(key, res.body_size, res.etag, time.time(), res.envelope.to_metadata())
        return self.vault.open(key, info, data_keys=res.data_keys)

    def _stored(self, node: Inode, obj) -> None:
        node.obj = obj
        node.etag = obj.etag
        node.stored = True
        node.validated = self._now()
        if node.content is not None:
            node.content.rebase(obj)

    def _flush_sync(self, key: str, content: FileContent, attrs: bytes, prev, stored: bool):
        kw = {}
        if self._conditional:
            if stored and prev is not None:
                kw["if_match"] = prev.etag
            elif not stored:
                kw["if_none_match"] = True
        res = self.vault.write(key, content.source, content.size, attrs=attrs,
                               file_id=prev.file_id if prev is not None else None,
                               generation=prev.generation + 1 if prev is not None else 0,
                               data_keys=prev.data_keys if prev is not None else None,
                               chunk_log2=content.cs.bit_length() - 1, **kw)
        new = self._opened(key, res)
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
        try:
            new = await self._io(self._flush_sync, key, content, node.attrs.encode(), prev, node.stored)
        except PreconditionFailed:
            raise ConflictError(f"{self.store.url.rstrip('/')}/{key}: changed by another client since it "
                                "was opened; local changes kept, not stored (conflict)", errno=errno.EIO) from None
        node.obj, node.etag, node.stored = new, new.etag, True
        node.validated = self._now()
        node.meta_dirty = False
        node.cached_etag = new.etag  # the page cache holds exactly what was stored

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

    # ---- files --------------------------------------------------------------------------------

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
            if content.try_write(off, data):
                n = len(data)
            else:
                n = await self._io(content.write, off, data)
            node.attrs.mtime_ns = node.attrs.ctime_ns = now_ns()
        return n

    async def flush(self, fh: int) -> None:
        """close(2) of one descriptor: returns once the file is stored."""
        h = self.handle(fh)
        node = h.node
        if node.dirty and node.linked:
            async with node.lock:
                await self._flush_locked(node)

    fsync = flush

    async def release(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if h is None:
            return
        node = h.node
        node.open_count -= 1
        if h.writable:
            node.writers -= 1
        if node.writers == 0 and node.dirty and node.linked:
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

    # ---- namespace changes --------------------------------------------------------------------------

    async def _create_object(self, parent: Inode, name: str, attrs: Attrs, body: bytes = b"",
                             kind: str = "file") -> Inode:
        self._writable_fs()
        self._check_name(parent, name)
        if await self._child(parent, name) is not None:
            raise fail(errno.EEXIST)
        key = self.dir_prefix(parent) + name + ("/" if kind == "dir" else "")
        try:
            obj = await self._io(self._write_sync, key, body, attrs.encode(), None, True)
        except PreconditionFailed:
            raise fail(errno.EEXIST, f"{key} was created by another client") from None
        node = self.table.add(parent.ino, name, attrs)
        self._stored(node, obj)
        node.nlookup += 1
        self._touch_dir(parent)
        self._listed(parent, name, kind)
        return node

    async def mkdir(self, parent_ino: int, name: str, mode: int, uid: int, gid: int) -> Stat:
        parent = self._dir(parent_ino)
        attrs = self._new_attrs(parent, stat.S_IFDIR | (mode & 0o7777), uid, gid)
        node = await self._create_object(parent, name, attrs, kind="dir")
        return self.stat(node)

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
        """Delete the stored object of a file (lock held); open handles keep working."""
        if node.open_count > 0 and node.content is not None:
            await self._io(node.content.materialize)
        if node.stored:
            await self._io(self.store.delete, self.object_key(node))
        node.stored = False
        node.meta_dirty = False
        self.table.detach(node)

    async def _is_empty(self, node: Inode) -> bool:
        if any(n.dirty or not n.stored and not n.is_dir() for n in self.table.children(node.ino)):
            return False
        entries = await self._io(self._list_sync, self.dir_prefix(node))
        return not entries

    async def rmdir(self, parent_ino: int, name: str) -> None:
        self._writable_fs()
        parent = self._dir(parent_ino)
        node = await self._existing(parent, name)
        if not node.is_dir():
            raise fail(errno.ENOTDIR)
        if not await self._is_empty(node):
            raise fail(errno.ENOTEMPTY)
        if node.stored:
            await self._io(self.store.delete, self.object_key(node))
        node.stored = False
        self.table.detach(node)
        self._touch_dir(parent)
        self._listed(parent, name, None)
        self._listings.pop(node.ino, None)

    async def rename(self, old_parent: int, old: str, new_parent: int, new: str, flags: int = 0) -> None:
        self._writable_fs()
        RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
        if flags & RENAME_EXCHANGE:
            raise fail(errno.EINVAL, "RENAME_EXCHANGE is not supported")
        sp, dp = self._dir(old_parent), self._dir(new_parent)
        self._check_name(dp, new)
        src = await self._existing(sp, old)
        dst = await self._child(dp, new)
        if dst is src:
            return
        if dst is not None and flags & RENAME_NOREPLACE:
            raise fail(errno.EEXIST)
        if src.foreign or src.broken or (dst is not None and (dst.foreign or dst.broken)):
            raise fail(errno.EACCES, "objects not written by dssefs are read-only")
        if dst is not None:
            if src.is_dir() and not dst.is_dir():
                raise fail(errno.ENOTDIR)
            if not src.is_dir() and dst.is_dir():
                raise fail(errno.EISDIR)
            if dst.is_dir() and not await self._is_empty(dst):
                raise fail(errno.ENOTEMPTY)
        if src.is_dir():
            p = dp
            while p.ino != ROOT_INODE:
                if p is src:
                    raise fail(errno.EINVAL, "cannot move a directory into itself")
                p = self.node(p.parent)
        locks = sorted({src.ino: src, **({dst.ino: dst} if dst is not None else {})}.items())
        async with _Locks([n.lock for _, n in locks]):
            dst_key = self.dir_prefix(dp) + new
            if src.is_dir():
                await self._flush_tree(src)
                if dst is not None and dst.stored:
                    await self._io(self.store.delete, self.object_key(dst))
                await self._rename_tree(self.dir_prefix(src), dst_key + "/")
            else:
                if src.dirty:
                    await self._flush_locked(src, force=not src.stored)
                if dst is not None and dst.open_count > 0 and dst.content is not None:
                    await self._io(dst.content.materialize)
                if src.stored and src.obj is not None:
                    obj = src.obj
                    await self._io(self.vault.rename, obj, dst_key)
                    new_obj = await self._io(self._reopen_sync, dst_key)
                    self._stored(src, new_obj)
            if dst is not None:
                dst.stored = False
                self.table.detach(dst)
            self.table.move(src, dp.ino, new)
            self._listed(sp, old, None)
            self._listed(dp, new, "dir" if src.is_dir() else "file")
            if src.is_dir():
                await self._reopen_tree(src)
        self._touch_dir(sp)
        self._touch_dir(dp)

    async def _flush_tree(self, node: Inode) -> None:
        for n in self.table.descendants(node.ino):
            if n.dirty and n.linked:
                async with n.lock:
                    await self._flush_locked(n, force=not n.stored and not n.is_dir())

    def _rename_one_sync(self, src: str, dst: str) -> None:
        info = self.store.head(src)
        try:
            obj = self.vault.open(src, info)
        except NotDssefsObject:
            self.store.copy(src, dst, dict(info.metadata))
            self.store.delete(src)
            return
        self.vault.rename(obj, dst)

    async def _rename_tree(self, src_pfx: str, dst_pfx: str) -> None:
        """Move every object under ``src_pfx``: metadata-only copies, bodies never re-encrypted."""
        keys = await self._io(lambda: [i.key for i in self.store.list(src_pfx, delimiter=None)
                                       if not isinstance(i, str)])
        async with trio.open_nursery() as nursery:
            for key in keys:
                nursery.start_soon(self._io, self._rename_one_sync, key, dst_pfx + key[len(src_pfx):])

    async def _reopen_tree(self, node: Inode) -> None:
        async def one(n: Inode) -> None:
            key = self.object_key(n)
            try:
                self._stored(n, await self._io(self._reopen_sync, key))
            except ObjectNotFound:
                n.validated = 0.0
        async with trio.open_nursery() as nursery:
            for n in self.table.descendants(node.ino) + [node]:
                if n.obj is not None and n.stored:
                    nursery.start_soon(one, n)

    # ---- directories ----------------------------------------------------------------------------------

    async def opendir(self, ino: int) -> int:
        node = self._dir(ino)
        names = await self._io(self._list_sync, self.dir_prefix(node))
        listed = {n for n, _ in names}
        for child in self.table.children(node.ino):  # created here, not stored yet
            if child.name not in listed and (child.dirty or not child.stored and not child.is_dir()):
                names.append((child.name, "dir" if child.is_dir() else "file"))
        names.sort()
        if len(names) <= LISTING_CACHE_MAX:
            self._listings[node.ino] = (self._now(), dict(names))
        fh = next(self._fh)
        self.dirs[fh] = DirHandle(fh, node, names)
        return fh

    async def readdir(self, fh: int, start: int) -> list[tuple[str, Stat, int]]:
        """Up to READDIR_BATCH entries from offset ``start``: ``(name, stat, next_offset)``.
        Offsets are stable for the handle (a snapshot taken at opendir).  Lookup counts are not
        changed: call :meth:`incref` for every entry handed to the kernel, then :meth:`trim`."""
        d = self.dirs.get(fh)
        if d is None:
            raise fail(errno.EBADF)
        out: list[tuple[str, Stat, int]] = []
        node = d.node
        if start < 1:
            out.append((".", self.stat(node), 1))
        if start < 2:
            parent = self.table.get(node.parent) or node
            out.append(("..", self.stat(parent), 2))
        first = max(0, start - 2)
        batch = d.names[first:first + READDIR_BATCH]
        nodes: dict[str, Inode | None] = {}
        dirpfx = self.dir_prefix(node)

        def probe_many(group: list[tuple[str, str, object]]) -> list[tuple[str, Probe | None]]:
            out = []
            for name, kind, keys in group:
                try:
                    out.append((name, self._probe_sync(dirpfx, name, kind, keys)))
                except DssefsError as e:
                    log.warning("op=readdir object=%s%s errno=%s reason=%s", self.store.url.rstrip("/") + "/",
                                dirpfx + name, errno.errorcode.get(e.errno, e.errno), e)
                    out.append((name, None))
            return out

        async def resolve(group: list[tuple[str, str, object]]) -> None:
            for name, p in await self._io(probe_many, group):
                d.probes[name] = (self._now(), p)

        now = self._now()
        todo = []
        for name, kind in batch:
            n = self.table.child(node.ino, name)
            if n is not None and (self._local_authority(n) or self._fresh(n, self.cfg.entry_timeout)):
                nodes[name] = n
            elif name in d.probes and now - d.probes[name][0] < self.cfg.entry_timeout:
                nodes[name] = self._install(node, name, d.probes[name][1])
            else:
                todo.append((name, kind))
        if todo:
            work = []
            for name, kind in todo:
                old = self.table.child(node.ino, name)
                work.append((name, kind, old.obj.data_keys if old is not None and old.obj is not None else None))
            # a few entries per worker-thread round trip; groups run in parallel (store latency)
            size = max(1, min(16, len(work) // max(1, self.io.total_tokens)))
            async with trio.open_nursery() as nursery:
                for i in range(0, len(work), size):
                    nursery.start_soon(resolve, work[i:i + size])
            for name, _kind in todo:
                nodes[name] = self._install(node, name, d.probes[name][1])
        for i, (name, _kind) in enumerate(batch):
            n = nodes.get(name)
            if n is not None and n.linked:
                out.append((name, self.stat(n), first + i + 3))
        return out

    async def releasedir(self, fh: int) -> None:
        self.dirs.pop(fh, None)

    # ---- extended attributes ----------------------------------------------------------------------------

    async def getxattr(self, ino: int, name: str) -> bytes:
        node = self.node(ino)
        await self._refresh(node)
        try:
            return node.attrs.xattrs[name]
        except KeyError:
            raise fail(errno.ENODATA) from None

    async def listxattr(self, ino: int) -> list[str]:
        node = self.node(ino)
        await self._refresh(node)
        return sorted(node.attrs.xattrs)

    async def setxattr(self, ino: int, name: str, value: bytes) -> None:
        if not name.startswith(XATTR_PREFIX) or len(name) <= len(XATTR_PREFIX):
            raise fail(errno.ENOTSUP, "only user.* extended attributes are supported")
        await self._change_xattrs(ino, lambda x: x.__setitem__(name, bytes(value)))

    async def removexattr(self, ino: int, name: str) -> None:
        node = self.node(ino)
        if name not in node.attrs.xattrs:
            raise fail(errno.ENODATA)
        await self._change_xattrs(ino, lambda x: x.pop(name, None))

    async def _change_xattrs(self, ino: int, change) -> None:
        self._writable_fs()
        node = self.node(ino)
        if node.foreign or node.broken:
            raise fail(errno.EACCES, "not a dssefs object: read-only")
        async with node.lock:
            old = node.attrs.copy()
            was_dirty = node.meta_dirty
            change(node.attrs.xattrs)
            node.attrs.ctime_ns = now_ns()
            try:
                self._check_budget(node)
                node.meta_dirty = True
                if node.writers == 0:
                    await self._persist_attrs(node)
            except MetadataBudgetError:
                node.attrs = old
                node.meta_dirty = was_dirty
                raise

    def _check_budget(self, node: Inode) -> None:
        """Refuse attributes that cannot fit next to the envelope in 2 KB of S3 metadata."""
        size = len(node.attrs.encode())
        sealed_b64 = ((size + 28) * 4 + 2) // 3
        used = 0
        if node.obj is not None:
            meta = node.obj.envelope.to_metadata()
            used = sum(len(k) + len(v) for k, v in meta.items() if k != "dsse-a")
        else:
            used = 1100  # a conservative envelope estimate (KMS ARNs and wrapped keys)
        if used + len("dsse-a") + sealed_b64 > 2048:
            raise MetadataBudgetError(f"{self.describe(node.ino)}: extended attributes would exceed S3's "
                                      "2 KB metadata budget")

    # ---- whole file system ----------------------------------------------------------------------------------

    def statfs(self) -> dict:
        total = 1 << 50
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": total // 4096, "f_bfree": total // 4096,
                "f_bavail": total // 4096, "f_files": 1 << 32, "f_ffree": 1 << 32, "f_favail": 1 << 32,
                "f_namemax": NAME_MAX}

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
        name = f"{node.name}.dssefs-conflict-{stamp}"
        key = self.dir_prefix(parent) + name
        content = node.content
        new = await self._io(self._flush_sync, key, content, node.attrs.encode(), None, False)
        log.warning("event=conflict_copy object=%s saved_as=%s/%s reason='another client stored a newer "
                    "version; the local changes were saved under a new name'", self.describe(node.ino),
                    self.store.url.rstrip("/"), key)
        node.meta_dirty = False
        # the content now belongs to the copy: nothing left to store under the original name
        content.rebase(new)
        self._listed(parent, name, "file")

    def close(self) -> None:
        self.cache.close()
        for node in list(self.table.by_ino.values()):
            if node.content is not None:
                node.content.discard()


class _Locks:
    """Acquire several trio locks in a fixed order."""

    def __init__(self, locks):
        self.locks = locks

    async def __aenter__(self):
        for lk in self.locks:
            await lk.acquire()

    async def __aexit__(self, *exc):
        for lk in reversed(self.locks):
            lk.release()
