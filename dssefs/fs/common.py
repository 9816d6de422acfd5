"""Shared definitions of the file system core: limits, errors, configuration and the
small records (Stat, Probe, handles) the operation modules exchange.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field

from ..envelope.format import MAX_PLAINTEXT, MIN_CHUNK_LOG2, body_size
from ..errors import DssefsError
from .attributes import Attrs
from .inodes import Inode


NAME_MAX = 255
KEY_MAX = 1024  # S3 object keys are at most 1024 UTF-8 bytes
READDIR_BATCH = 256
LISTING_CACHE_MAX = 1000  # directories up to one S3 listing page are cached for negative lookups
XATTR_PREFIX = "user."

# A directory marker whose body is one byte long declares its directory plain: no symbolic link,
# FIFO, socket or device directly in it (docs/format.md, section E, "Plain directories").  A
# writer makes the marker not plain (an empty body) before such an object enters the directory,
# so a listing of a plain directory gives every name's type without a probe.  Only mkdir of a new
# name writes a plain marker.  The listed size of such a marker is PLAIN_MARKER_SIZE.
PLAIN_MARKER_BODY = b"\x00"
PLAIN_MARKER_SIZE = body_size(len(PLAIN_MARKER_BODY), 1 << MIN_CHUNK_LOG2)


class FsError(DssefsError):
    """A POSIX error decided by the file system itself (ENOENT, ENOTEMPTY...)."""


class ConflictError(FsError):
    """A conditional write lost: another client stored a newer version (or created the name)."""


def fail(code: int, message: str | None = None) -> FsError:
    return FsError(message or os.strerror(code), errno=code)


# Largest file: the format's plaintext length is below 2^48 (docs/format.md section 13).
MAX_FILE_SIZE = MAX_PLAINTEXT - 1


def check_size(size: int) -> None:
    """EFBIG, before anything changes, for a file size the format cannot store."""
    if size > MAX_FILE_SIZE:
        raise FsError(f"{size} bytes is beyond the largest file dssefs stores ({MAX_FILE_SIZE} bytes, "
                      "2^48 - 1)", errno=errno.EFBIG)


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
    # probes and listings in flight at once (plus a few for lookups only; see probes.py)
    probe_workers: int = 32
    crypto_workers: int = max(1, os.cpu_count() or 1)
    # The kernel's writeback cache merges small writes (4 KiB writes: 29 -> 84 MB/s measured) but
    # is off: in that mode the kernel never takes a regular file's size from the daemon again, so
    # another client's new version would be read with a stale size, and dirty pages still in the
    # kernel at SIGTERM are not reachable by the daemon's flush.
    writeback_cache: bool = False
    # attribute-only changes (chmod, chown, utimens, xattrs) of files without unsaved data are
    # stored this many seconds after the first one, or at the next fsync/close, fsyncdir, rename
    # or unmount (0: store each change before the call returns)
    attr_delay: float = 1.0
    # ... or once this long has passed without another deferred change (the burst, such as tar's
    # chmod + utimens of what it extracted, is over: waiting longer would merge nothing more)
    attr_idle: float = 0.1
    # files up to this size are read whole (one request: a ranged GET instead of a HEAD on S3) and
    # decrypted when they are looked up or listed, so opening and reading them needs no further
    # store request or worker-thread round trip; 0: probes fetch metadata only
    small_file_prefetch: int = 64 << 10
    # write-behind (see writebehind.py): a new or truncated file written in order is encrypted and
    # uploaded in parts while it is written once it is larger than this many bytes; 0 (default):
    # never (on a fast link the staging copy at close costs more than it saves: docs/performance.md)
    write_behind: int = 0
    # seconds beyond the entry/attribute TTL during which a known answer is used once more while
    # it is asked again in the background (stale.py; the daemon sets it in write-back mode only)
    stale_window: float = 0.0
    # seconds beyond the entry/attribute TTL during which what this mount knows of a directory it
    # created (mkdir) is used without asking the store again, in either mode (stale.py)
    own_window: float = 0.0


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

    def __post_init__(self):
        # A directory's link count (2 + its subdirectories) is not known without listing it, so
        # every directory reports 1, the usual "unknown" (btrfs, CIFS, many FUSE file systems):
        # find/fts then do not use it to skip subdirectories.  Never 2, which claims "no
        # subdirectories".
        if stat.S_ISDIR(self.mode) and self.nlink:
            self.nlink = 1


def link_count(node: Inode) -> int:
    """``st_nlink`` of an inode: 1 while it has its name (hard links do not exist; directories:
    see :class:`Stat`), 0 once unlinked or removed (an open file after unlink, fstat)."""
    return 1 if node.linked else 0


def with_links(st: Stat, node: Inode) -> Stat:
    st.nlink = link_count(node)
    return st


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
    body: list | None = None  # plaintext chunks of a small file read whole with the probe


class Handle:
    """One open file description (shared by ``dup``'ed descriptors and forked children)."""

    __slots__ = ("fh", "node", "writable", "append", "changed_at")

    def __init__(self, fh: int, node: Inode, writable: bool, append: bool):
        self.fh, self.node, self.writable, self.append = fh, node, writable, append
        self.changed_at = -1  # node.stores when this handle last wrote or truncated

    def mark_changed(self) -> None:
        self.changed_at = self.node.stores

    @property
    def changed(self) -> bool:
        """This handle wrote (or truncated, or created the file) since the file was last stored."""
        return self.changed_at == self.node.stores


class DirHandle:
    __slots__ = ("fh", "node", "names", "probes")

    def __init__(self, fh: int, node: Inode, names: list[tuple[str, str]]):
        self.fh, self.node, self.names = fh, node, names
        # name -> (time, Probe): store answers for entries resolved ahead of the kernel's
        # requests, so entries not yet handed out need no second round trip
        self.probes: dict[str, tuple[float, Probe | None]] = {}


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
