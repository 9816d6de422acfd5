"""The file system: POSIX-ish operations over a Vault, with no FUSE dependency.

Every public coroutine takes inode numbers and ``str`` names and raises :class:`DssefsError`
(``.errno``) on failure, so tests drive it directly under trio.  State (inode table, handles) is
owned by the trio thread; blocking work (store, KMS, crypto, spill I/O) runs in worker threads
under two capacity limiters, and probes and listings through a metadata scheduler of their own
(bounded, prioritised: see :mod:`.probes`).  Per-inode ``trio.Lock`` serialises writes, truncates
and flushes of one file; different files proceed concurrently.

Object layout under the mount's prefix ``P``:

* file ``a/b``           -> object ``P + "a/b"`` (body = file bytes, attrs = mode/owner/times/xattrs)
* directory ``a``        -> marker ``P + "a/"`` (empty body, attrs), or only implied by keys below it
* symlink                -> object whose encrypted body is the target
* fifo, socket, device   -> empty object; the type and rdev are in the attrs

The operations are split by job across mixins: :mod:`.namespace` (probes, lookups),
:mod:`.metadata` (setattr), :mod:`.flush` (storing objects), :mod:`.files` (file handles),
:mod:`.dirs` (namespace changes), :mod:`.readdir` and :mod:`.xattrs`.
"""

from __future__ import annotations

import collections
import errno
import functools
import itertools
import stat
import weakref

import trio

from ..envelope import format as fmt
from ..envelope.epoch import RESERVED_NAME
from ..errors import ObjectNotFound
from ..objects.vault import Vault
from .activity import Activity
from .attributes import Attrs, now_ns
from .cache import LOCAL_REQUEST_MAX, PREFETCH_REQUEST_MAX, ChunkCache
from .common import (KEY_MAX, NAME_MAX, ConflictError, DirHandle, FsConfig, FsError, link_count,
                     Handle, Probe, Stat, fail)
from .deletes import DeleteQueue
from .dirs import DirOps
from .files import FileOps
from .flush import FlushOps
from .inodes import ROOT_INODE, Inode, InodeTable
from .metadata import MetadataOps
from .namespace import DirList, Kept, NamespaceOps
from .probes import MetaScheduler
from .readdir import ReaddirOps
from .spill import SpillArea
from .stale import StaleAnswers
from .writebehind import WriteBehindOps
from .xattrs import XattrOps

__all__ = ["ConflictError", "FsConfig", "FsError", "Filesystem", "Probe", "Stat", "fail"]

# metadata requests only lookups may use, beyond FsConfig.probe_workers: a lookup of a name not
# probed yet is answered at once even while a big directory's probes fill every other slot
LOOKUP_SLOTS = 8


class Filesystem(NamespaceOps, MetadataOps, FlushOps, WriteBehindOps, FileOps, DirOps, ReaddirOps, XattrOps):
    """One mounted tree: shared state and plumbing here, the operations in the mixins."""

    def __init__(self, vault: Vault, prefix: str = "", config: FsConfig | None = None):
        self.vault = vault
        # unlink/rmdir leave their DELETEs to this queue; the mount reads the store through its
        # view, in which keys whose delete is pending are already gone (see deletes.py)
        self.deletes = DeleteQueue(vault.store)
        self.store = self.deletes.view
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        # a name the store cannot hold is refused when it is created, never at close
        self.name_max = min(NAME_MAX, getattr(self.store, "max_segment_bytes", None) or NAME_MAX)
        # everything this mount writes is wrapped under the epochs of its prefix
        vault.epoch_prefix = self.prefix
        self.cfg = config or FsConfig()
        self.io = trio.CapacityLimiter(max(1, self.cfg.io_workers))
        self.cpu = trio.CapacityLimiter(max(1, self.cfg.crypto_workers))
        spill = SpillArea(self.cfg.spill_dir) if self.cfg.spill_dir else None
        # read-ahead from a store whose requests mostly compute (a local directory) comes in
        # requests of up to 2 MiB, several decrypted in parallel; from S3 in requests up to 8 MiB
        self.cache = ChunkCache(self.cfg.cache_size, spill,
                                request_max=PREFETCH_REQUEST_MAX if self.store.parallel_requests else LOCAL_REQUEST_MAX)
        t = now_ns()
        self.table = InodeTable(Attrs(stat.S_IFDIR | self.cfg.dir_mode, self.cfg.uid, self.cfg.gid, t, t, t))
        self.activity = Activity()
        self.handles: dict[int, Handle] = {}
        self.dirs: dict[int, DirHandle] = {}
        self._fh = itertools.count(1)
        self._conditional = getattr(self.store, "supports_conditional_writes", True)
        self._listings: dict[int, tuple[float, dict[str, str] | None]] = {}
        self.chunk_log2 = self.cfg.chunk_size.bit_length() - 1
        self._deferred: dict[int, float] = {}  # inode -> when its pending attributes are stored
        self._deferring = False
        self._deferred_last = 0.0  # when the last deferred attribute change was made
        # Probes and listings (metadata requests): their own worker threads and bound, so they
        # neither wait behind file reads and writes (``io``) nor hold them up; lookups have slots
        # of their own on top (see probes.py).  Answers and listings are kept for the entry TTL.
        self.meta = MetaScheduler(self.cfg.probe_workers, LOOKUP_SLOTS, self._ahead_gate)
        # answers used beyond their TTL while they are refreshed (write-back mode; see stale.py)
        self.stale = StaleAnswers(self.cfg.stale_window, self.cfg.own_window)
        self._kept: dict[str, Kept] = {}  # object key -> the last probe answer
        self._dirlists: dict[str, DirList] = {}  # directory prefix -> its last listing
        self._start_names: tuple[float, dict[str, str]] | None = None  # the start's root listing
        self._key_changed: dict[str, float] = {}  # names (and directories' entries) changed here
        self._settled = weakref.WeakKeyDictionary()  # inode -> version a listing may confirm
        self._unused = 0  # read-ahead answers kept and not used yet
        self._ahead_limit = 96  # the read-ahead budget in use (see readdir.py)
        self._ahead_since = -1e9  # when the walk being read ahead began (its first second: AHEAD_START)
        self._ahead_uses: collections.deque[float] = collections.deque()  # read-ahead answers used (1 s)
        self._ahead_used = -1e9  # when read-ahead was last used (or asked for)
        self._ahead_wanted: dict[str, tuple] = {}  # directories whose read-ahead waits for a listing
        self._ahead_done: dict[str, DirList] = {}  # directories read ahead, by the listing used
        self._trees: dict[str, tuple] = {}  # tree listings read ahead: top -> (time, last key, levels)
        self._attrs_until = -1e9  # until when read-ahead probes every name (attributes asked for)
        self._visited: dict[str, float] = {}  # directories a walk read ahead has opened
        self._partial: set[int] = set()  # directory handles whose last readdir left names for the next
        self._probe_time = 0.0  # moving average of how long a probe takes (s)
        self._read_through: dict[int, float] = {}  # directory inode -> when a readdir reached its end
        self._swept = 0.0
        # body bytes fetched with a file's probe: a small file whole, in chunks as small as 4 KiB
        small = self.cfg.small_file_prefetch
        self._probe_prefix = small + fmt.CHUNK_OVERHEAD * -(-small >> fmt.MIN_CHUNK_LOG2) if small > 0 else 0

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
        if name == RESERVED_NAME:
            raise fail(errno.EPERM, f"'{RESERVED_NAME}' is reserved for dssefs's own records")
        try:
            encoded = name.encode("utf-8")
        except UnicodeEncodeError:
            raise fail(errno.EILSEQ, "file names must be valid UTF-8 (S3 keys are)") from None
        if len(encoded) > self.name_max:
            raise fail(errno.ENAMETOOLONG, f"names are at most {self.name_max} bytes in this store")
        if len((self.dir_prefix(parent) + name + "/").encode("utf-8")) > KEY_MAX:
            raise fail(errno.ENAMETOOLONG, "path longer than S3's 1024-byte key limit")
        return name

    def _writable_fs(self) -> None:
        if self.cfg.read_only:
            raise fail(errno.EROFS)

    def _changeable(self, ino: int):
        """The inode of ``ino`` if its attributes may change: EROFS on a read-only mount, EACCES
        for objects dssefs did not write (or cannot authenticate)."""
        self._writable_fs()
        node = self.node(ino)
        if node.foreign or node.broken:
            raise fail(errno.EACCES, "not a dssefs object: read-only")
        return node

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
        used = size
        obj = node.obj
        if obj is not None and getattr(obj, "sparse", False) and obj.size == size:
            used = min(size, obj.body_size)  # a stored sparse version: what it stores (cp, du, tar -S)
        return Stat(node.ino, a.mode, link_count(node), a.uid, a.gid, a.rdev, size,
                    (used + 511) // 512, a.atime_ns, a.mtime_ns, a.ctime_ns)

    # ---- whole file system ----------------------------------------------------------------------------------

    def statfs(self) -> dict:
        total = 1 << 50
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": total // 4096, "f_bfree": total // 4096,
                "f_bavail": total // 4096, "f_files": 1 << 32, "f_ffree": 1 << 32, "f_favail": 1 << 32,
                "f_namemax": self.name_max}

    def close(self) -> None:
        self.cache.close()
        for node in list(self.table.by_ino.values()):
            if node.content is not None:
                node.content.discard()
