"""Names: probing the store for one name or one directory level, keeping the inode
table in step with it (revalidation after the entry/attribute TTL, the small-directory listing
cache), and the lookup/getattr/forget operations.

Probes and listings go through the metadata scheduler (:mod:`.probes`): lookups first and never
behind a directory's probes, a name probed for a listing is not probed again by the lookup that
follows.  Results are kept for the entry TTL from when they were asked (:meth:`_kept`), and so
are listings with each object's ETag, size and time: after the TTL a known name is revalidated by
its directory's listing (one request per directory, not one per name) when the listing shows the
very version this mount knows (:meth:`_listing_confirms`).
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import logging
import stat
import time
from typing import Awaitable, Callable

from ..envelope import format as fmt
from ..envelope.epoch import RESERVED_NAME
from ..errors import DssefsError, NotDssefsObject, ObjectNotFound
from ..store.base import ObjectInfo
from .attributes import Attrs, now_ns
from .cache import FileContent, ForeignBase
from .common import LISTING_CACHE_MAX, NAME_MAX, PLAIN_MARKER_SIZE, Probe, Stat, fail, with_links
from .inodes import ROOT_INODE, Inode
from .probes import LOOKUP, Job

log = logging.getLogger("dssefs.fs")

# A listing confirms a version only if that version was at least this old (host clock against the
# store's Last-Modified) when it was probed.  S3 keeps the ETag of a single-part object across a
# metadata-only self-copy (an attribute change), and listings give times to the second: a later
# attribute change in the same second as the probed version would look the same in a listing.
# Once the probed version is older than that second (plus a second of clock difference), any later
# version has a later time.
LISTING_TRUST_AGE = 2.0
# The largest object that can be something other than a regular file or a directory: a symbolic
# link's body is its target (at most PATH_MAX - 1 bytes) in one chunk, a FIFO's, socket's or
# device's body is empty.  A listed object larger than this is a regular file (a foreign object is
# one too), so a listing gives its type without a probe.
SPECIAL_OBJECT_MAX = 4095 + fmt.CHUNK_OVERHEAD


@dataclasses.dataclass
class Kept:
    """The answer of one probe, kept for the entry TTL from when it was asked."""

    at: float  # trio time the request was sent
    probe: Probe | None = None  # None: the name does not exist
    error: DssefsError | None = None  # the store failed on that key (beyond its retries)
    unused: bool = False  # a read-ahead answer nobody has used yet (counts against the budget)


@dataclasses.dataclass
class DirList:
    """One listing of a directory level (up to LISTING_CACHE_MAX names)."""

    at: float
    names: dict[str, str]  # name -> "file" | "dir"
    # file name -> (ETag, size, time) as listed; "" -> the same of the directory's own marker
    versions: dict[str, tuple[str, int, float]]
    ahead: bool = False  # fetched by read-ahead and not yet used by an opendir

    def plain(self) -> bool:
        """Whether the directory's marker, as listed, declares it plain (PLAIN_MARKER_BODY)."""
        m = self.versions.get("")
        return m is not None and m[1] == PLAIN_MARKER_SIZE


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

    def _list_sync(self, dirpfx: str, limit: int | None = None, reserved: list | None = None, *,
                   versions: dict | None = None) -> list[tuple[str, str]] | None:
        """Sorted ``(name, kind)`` of one directory level; None if it has more than ``limit``.
        ``reserved`` (a list) gets ``True`` appended when the level holds dssefs's own ``.dssefs``
        records, which are never listed.  ``versions`` (a dict) gets ``name -> (ETag, size,
        time)`` of every file listed, and ``""`` the same of the directory's marker."""
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
            if not name and versions is not None and not isinstance(item, str):
                versions[""] = (item.etag, item.size, item.mtime)  # the directory's own marker
            if not name or "/" in name or name in (".", "..", RESERVED_NAME) or len(name.encode()) > NAME_MAX:
                continue
            if names.get(name) != "file":  # a file and a directory of one name: the file wins
                names[name] = kind
            if versions is not None and kind == "file":
                versions[name] = (item.etag, item.size, item.mtime)
        return sorted(names.items())

    # ---- scheduled, shared and kept store requests ----------------------------------------------

    def _submit_probe(self, dirpfx: str, name: str, hint: str | None, prev, prio: tuple, skip=None) -> Job:
        """The probe of ``dirpfx + name`` (joining one queued or running)."""
        return self.meta.submit(("probe", dirpfx + name),
                                functools.partial(self._probe_sync, dirpfx, name, hint, prev), prio,
                                self._probe_done, skip)

    def _submit_list(self, dirpfx: str, prio: tuple, limit: int | None = LISTING_CACHE_MAX, skip=None) -> Job:
        """The listing of one directory level (joining one queued or running); None if it has more
        than ``limit`` names."""
        def run():
            versions: dict = {}
            return self._list_sync(dirpfx, limit, versions=versions), versions
        return self.meta.submit(("list", dirpfx, limit), run, prio, self._list_done, skip)

    async def _await(self, job: Job):
        """``(result, time the request was sent)``; the request's error is raised."""
        await job.done.wait()
        if job.state == "dropped":  # only queued read-ahead is dropped; never one waited for
            raise fail(errno.EAGAIN, "metadata request dropped")
        if job.error is not None:
            if isinstance(job.error, Exception):
                raise job.error
            raise fail(errno.EIO, "metadata request interrupted")
        return job.result, job.started

    async def _probe(self, parent: Inode, name: str, hint: str | None, prev, prio: tuple = LOOKUP
                     ) -> tuple[Probe | None, float]:
        return await self._await(self._submit_probe(self.dir_prefix(parent), name, hint, prev, prio))

    def _changed_since(self, key: str, t: float) -> bool:
        """Whether this mount changed ``key`` (a name, or the entries of a directory when it ends
        with '/'), or renamed or removed a directory above it, at or after ``t``."""
        changed = self._key_changed
        if not changed:
            return False
        if changed.get(key, -1.0) >= t:
            return True
        end = key.rfind("/", 0, len(key) - 1)
        while end > 0:
            if changed.get(key[:end], -1.0) >= t:
                return True
            end = key.rfind("/", 0, end)
        return False

    def _probe_done(self, job: Job) -> None:
        """Keep a probe's answer for the lookups and listings that follow within the entry TTL
        (store failures too, for readdir only: a lookup asks again), unless this mount changed
        the name since the request was sent."""
        key = job.key[1]
        if job.error is None:  # how long a probe takes (readdir waits a few of them; see readdir.py)
            self._probe_time += (self._now() - job.started - self._probe_time) / 16
        if self._changed_since(key, job.started):
            return
        if job.error is not None and not isinstance(job.error, DssefsError):
            return
        old = self._kept.get(key)
        if old is not None:
            if old.at > job.started:
                return
            if old.unused:
                self._unused -= 1
        background = job.background
        self._kept[key] = Kept(job.started, job.result if job.error is None else None, job.error, background)
        if background:
            self._unused += 1

    def _list_done(self, job: Job) -> None:
        """Keep a listing of up to LISTING_CACHE_MAX names (with each file's version) for the entry
        TTL, unless this mount changed the directory since the request was sent."""
        dirpfx = job.key[1]
        dl = None
        if job.error is None:
            names, versions = job.result
            if (names is not None and len(names) <= LISTING_CACHE_MAX
                    and not self._changed_since(dirpfx, job.started)):
                dl = self._dirlists.get(dirpfx)
                if dl is None or dl.at < job.started:
                    dl = DirList(job.started, dict(names), versions, ahead=job.background)
                    self._dirlists[dirpfx] = dl
        self._listing_arrived(dirpfx, dl)

    def _kept_for(self, key: str, node: Inode | None) -> Kept | None:
        """A kept answer for ``key`` still within the entry TTL and newer than what ``node``
        holds; using it counts as using read-ahead."""
        k = self._kept.get(key)
        if k is None:
            return None
        now = self._now()
        if now - k.at >= self.cfg.entry_timeout or (node is not None and k.at <= node.validated):
            return None
        if k.unused:
            k.unused = False
            self._unused -= 1
            self._ahead_used = now
            self._ahead_used_one()
            self.meta.pump()
        return k

    def _dirlist(self, dirpfx: str) -> DirList | None:
        dl = self._dirlists.get(dirpfx)
        if dl is None or self._now() - dl.at >= self.cfg.entry_timeout:
            return None
        return dl

    def _adopt(self, parent: Inode, dl: DirList) -> dict[str, str]:
        """Use a listing for ``parent``'s lookups, with the names created here and not stored yet."""
        for child in self.table.children(parent.ino):
            if child.dirty or (not child.stored and not child.is_dir()):
                dl.names[child.name] = "dir" if child.is_dir() else "file"
                dl.versions.pop(child.name, None)
        self._listings[parent.ino] = (dl.at, dl.names)
        return dl.names

    def _listing_confirms(self, parent: Inode, node: Inode, ttl: float) -> bool:
        """Revalidate ``node`` without a request of its own: its directory's listing, at most
        ``ttl`` old, shows the version this mount holds (see :meth:`_confirmable`)."""
        dl = self._dirlists.get(self.dir_prefix(parent))
        if dl is None or dl.at <= node.validated or self._now() - dl.at >= ttl:
            return False
        cached = self._listings.get(parent.ino)
        if cached is not None and cached[1] is not None and cached[1] is not dl.names:
            return False  # the directory's listing was replaced since (this mount's own changes)
        if not self._confirmable(node, dl):
            return False
        node.validated = dl.at
        return True

    def _confirmable(self, node: Inode, dl: DirList) -> bool:
        """Whether listing ``dl`` shows the version ``node`` holds: same ETag, size and time, and
        a version that was older than LISTING_TRUST_AGE when it was probed.  Directories have no
        version in a listing and are never confirmed this way."""
        obj = node.obj
        if obj is None or node.foreign or node.broken is not None or node.is_dir():
            return False
        v = dl.versions.get(node.name)
        if v is None or self._settled.get(node) is not obj:
            return False
        etag, size, mtime = v
        info = obj.info
        return (etag.strip('"') == (obj.etag or "").strip('"') and size == info.size
                and int(mtime) == int(info.mtime))

    # ---- inode bookkeeping ------------------------------------------------------------------------

    def _apply(self, node: Inode, p: Probe, at: float | None = None) -> None:
        """Install probe ``p`` (asked at ``at``; now if not given) on ``node``."""
        now = self._now()
        at = now if at is None else at
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
        node.validated = at
        obj = p.obj
        if obj is not None and not p.foreign and p.broken is None:
            asked = time.time() - (now - at)  # the host's clock when the probe was sent
            if asked - obj.info.mtime >= LISTING_TRUST_AGE:
                self._settled[node] = obj
            else:
                self._settled.pop(node, None)
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

    def ttl_left(self, ino: int, ttl: float) -> float:
        """How long the kernel may keep what it is told now about ``ino``: ``ttl`` from when the
        store was asked, so an answer probed or listed a while ago is not kept longer than the
        TTL allows (local state: the whole ``ttl``)."""
        node = self.table.get(ino)
        if node is None or node.ino == ROOT_INODE or self._local_authority(node):
            return ttl
        return max(0.0, min(ttl, ttl - (self._now() - node.validated)))  # never validated: 0

    @staticmethod
    def _unprobed(node: Inode) -> bool:
        """A regular file listed without a probe (see readdir.py): type and number only."""
        return node.validated == 0.0 and node.obj is None and node.stored and not node.foreign

    def _local_authority(self, node: Inode) -> bool:
        """True when local state must not be replaced by what the store says."""
        return node.dirty or node.writers > 0 or not node.linked

    def _used_stale(self, node: Inode, ttl: float, key: tuple, fn: Callable[[], Awaitable[object]]) -> bool:
        """Whether ``node``'s answer, past ``ttl``, is used once more; if so ``fn`` refreshes it
        in the background (write-back mode), or nothing does (a directory this mount created
        within the own window, either mode; see stale.py).  Directories only (every path walk
        revalidates each of them; a file's revalidation is cheap by its directory's listing, and
        using its answers stale would only make the kernel ask again at every use), never one
        whose marker could not be used."""
        if not (node.is_dir() and node.validated > 0.0 and node.broken is None):
            return False
        own = self._made_recently(node, ttl)
        if not self.stale.usable(self._now() - node.validated, ttl, own=own):
            return False
        self.stale.refresh(key, fn, own=own)
        return True

    def _made_recently(self, node: Inode, ttl: float) -> bool:
        """A directory this mount created (mkdir) less than the TTL plus the own window ago (its
        answers are used without asking the store within that window, in either mode)."""
        return node.made > 0.0 and self._now() - node.made < ttl + self.stale.own_window

    async def _child(self, parent: Inode, name: str, hint: str | None = None, *,
                     fresh: bool = False) -> Inode | None:
        """The linked child ``name`` of ``parent``, revalidated against the store if stale: from a
        probe answer kept from a listing, from the directory's listing (one request for the
        whole directory), or with a probe of its own (joining one queued or running).  Unless
        ``fresh``, an answer within the stale window is used while that is done in the
        background."""
        node = self.table.child(parent.ino, name)
        if node is not None and (self._local_authority(node) or self._fresh(node, self.cfg.entry_timeout)):
            return node
        if not fresh and node is not None and self._used_stale(
                node, self.cfg.entry_timeout, ("name", parent.ino, name),
                functools.partial(self._child, parent, name, hint, fresh=True)):
            return node
        if node is not None and self._unprobed(node):
            self._want_attrs(parent)
        dirpfx = self.dir_prefix(parent)
        if node is None and self.deletes.removed(dirpfx + name):
            return None  # removed through this mount, its delete still pending: no request
        k = self._kept_for(dirpfx + name, node)
        if k is not None and k.error is None:
            return self._install(parent, name, k.probe, k.at)
        if hint is None and node is None:
            hint = self._start_hint(parent, name)
        if hint is None:
            # a listing used past its TTL answers only names this mount knows nothing about: it
            # may be older than what a known name's inode holds
            names = await self._dir_names(parent, fresh=fresh or node is not None)
            if names is not None:
                hint = names.get(name)
                node = self.table.child(parent.ino, name)  # the table may have changed meanwhile
                if hint is None:  # answered by a fresh listing: no such name
                    if node is not None:
                        if self._local_authority(node):
                            return node
                        self.table.detach(node)
                    self.table.vanish(parent.ino, name)
                    return None
                if node is not None and (self._local_authority(node) or self._fresh(node, self.cfg.entry_timeout)
                                         or self._listing_confirms(parent, node, self.cfg.entry_timeout)):
                    return node
        prev = node.obj if node is not None else None
        p, at = await self._probe(parent, name, hint, prev)
        return self._install(parent, name, p, at)

    async def _dir_names(self, parent: Inode, *, fresh: bool = False) -> dict[str, str] | None:
        """``name -> kind`` of a small directory from one listing request, cached for the entry
        TTL and kept up to date with this mount's own changes.  Negative lookups (every create
        starts with one) are answered from it, and known names are revalidated by it (see
        :meth:`_listing_confirms`).  None for directories of more than one page.  Unless
        ``fresh``, a listing within the stale window is used while it is asked again in the
        background."""
        cached = self._listings.get(parent.ino)
        if cached is not None and self._now() - cached[0] < self.cfg.entry_timeout:
            return cached[1]
        if not fresh and cached is not None and cached[1] is not None:
            own = self._made_recently(parent, self.cfg.entry_timeout)
            if self.stale.usable(self._now() - cached[0], self.cfg.entry_timeout, own=own):
                self.stale.refresh(("list", parent.ino), functools.partial(self._dir_names, parent, fresh=True),
                                   own=own)
                return cached[1]
        started = self._now()
        if len(self._listings) > 4096:  # drop expired listings
            self._listings = {k: v for k, v in self._listings.items()
                              if started - v[0] < self.cfg.entry_timeout}
        dirpfx = self.dir_prefix(parent)
        dl = self._dirlist(dirpfx)
        if dl is None:
            job = self.meta.job(("list", dirpfx, None))  # an opendir's, under way
            if job is None or job.state != "running":
                job = self._submit_list(dirpfx, LOOKUP)
            (names, versions), started = await self._await(job)
            if names is not None and len(names) > LISTING_CACHE_MAX:
                names = None
            if names is None:
                self._listings[parent.ino] = (started, None)
                return None
            dl = self._dirlist(dirpfx)
            if dl is None or dl.at < started:  # changed through this mount meanwhile: not kept
                dl = DirList(started, dict(names), {})
        return self._adopt(parent, dl)

    def list_root(self) -> None:
        """List the root while the mount starts (blocking; call before serving).  It is the
        start's reachability check, and within the entry TTL of it a lookup of a name it shows
        (and this mount has not changed since) skips the root's listing and probes the name at
        once (:meth:`_start_hint`).  A name it does not show, and ``readdir``, still list the
        root: another client's new object is seen as before."""
        sent = time.monotonic()  # trio's clock does not run yet
        names = self._list_sync(self.prefix, LISTING_CACHE_MAX)
        self._start_names = None if names is None else (sent, dict(names))  # None: over a page

    def _start_hint(self, parent: Inode, name: str) -> str | None:
        """The kind of root entry ``name`` as the start's listing showed it, while that is at
        most the entry TTL old and this mount has not changed the name since."""
        if self._start_names is None or parent.ino != ROOT_INODE:
            return None
        sent, names = self._start_names
        age = time.monotonic() - sent
        if age >= self.cfg.entry_timeout:
            self._start_names = None
            return None
        kind = names.get(name)
        if kind is None or self._changed_since(self.dir_prefix(parent) + name, self._now() - age):
            return None
        return kind

    def _listed(self, parent: Inode, name: str, kind: str | None) -> None:
        """Keep a cached listing in step with a change made through this mount, and forget what
        was asked of the store about that name (and below it) before the change."""
        cached = self._listings.get(parent.ino)
        if cached is not None and cached[1] is not None:
            if kind is None:
                cached[1].pop(name, None)
            else:
                cached[1][name] = kind
        dirpfx = self.dir_prefix(parent)
        dl = self._dirlists.get(dirpfx)
        if dl is not None:
            if kind is None:
                dl.names.pop(name, None)
            else:
                dl.names[name] = kind
            dl.versions.pop(name, None)
        key = dirpfx + name
        now = self._now()
        if len(self._key_changed) > 4096:
            self._key_changed = {k: t for k, t in self._key_changed.items() if now - t < self.cfg.entry_timeout}
        self._key_changed[key] = now
        self._key_changed[dirpfx] = now
        self._forget_kept(key)

    def _forget_kept(self, key: str) -> None:
        """Drop kept answers and listings of ``key`` and of everything below it."""
        below = key + "/"
        for k in [k for k in self._kept if k == key or k.startswith(below)]:
            if self._kept.pop(k).unused:
                self._unused -= 1
        for k in [k for k in self._dirlists if k.startswith(below)]:
            del self._dirlists[k]

    def _install(self, parent: Inode, name: str, p: Probe | None, at: float | None = None) -> Inode | None:
        """Make the inode table agree with a probe of ``parent/name`` asked at ``at``."""
        node = self.table.child(parent.ino, name)  # the table may have changed meanwhile
        if node is not None and self._local_authority(node):
            return node
        if at is not None and (self._changed_since(self.dir_prefix(parent) + name, at)
                               or (node is not None and node.validated > at)):
            return node  # changed or revalidated since the request was sent: the table is newer
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
        self._apply(node, p, at)
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

    async def _refresh(self, node: Inode, *, fresh: bool = False) -> None:
        """Revalidate ``node``'s attributes after the attribute TTL (unless ``fresh``, in the
        background while its answer is within the stale window)."""
        if (node.ino == ROOT_INODE or self._local_authority(node)
                or self._fresh(node, self.cfg.attr_timeout)):
            return
        parent = self.table.get(node.parent)
        if parent is None:
            return
        if not fresh and self._used_stale(node, self.cfg.attr_timeout, ("attr", node.ino),
                                          functools.partial(self._refresh, node, fresh=True)):
            return
        kind = "dir" if node.is_dir() else "file"
        if self._unprobed(node):
            self._want_attrs(parent)
        k = self._kept_for(self.dir_prefix(parent) + node.name, node)
        if k is not None and k.error is None and (k.probe is None or (k.probe.kind == "dir") == node.is_dir()):
            p, at = k.probe, k.at
        elif self._listing_confirms(parent, node, self.cfg.attr_timeout):
            return
        else:
            if node.obj is not None and self._settled.get(node) is node.obj:
                # a version a listing can confirm: one listing revalidates every such name of the
                # directory (a file read a while after its directory was listed, and its siblings)
                await self._dir_names(parent, fresh=True)
                if self._local_authority(node) or self._fresh(node, self.cfg.attr_timeout):
                    return
                if self._listing_confirms(parent, node, self.cfg.attr_timeout):
                    return
            p, at = await self._probe(parent, node.name, kind, node.obj)
        if self._local_authority(node) or node.validated > at:
            return
        if p is None:
            if node.open_count == 0:
                self.table.detach(node)
                raise fail(errno.ENOENT, "deleted by another client")
            node.validated = self._now()
            return
        self._apply(node, p, at)

    def _confirm_above(self, node: Inode, at: float) -> None:
        """The store (or the write-back journal) accepted a write of ``node``'s object, sent at
        ``at``: the directories above it exist at that time, which counts as their revalidation
        (no HEAD or listing of each ancestor while files are written below it).  A change another
        client makes to such a directory's own attributes is seen once this mount has stopped
        writing below it for the TTL.  Directories never probed are left alone."""
        p = self.table.get(node.parent)
        while p is not None and p.ino != ROOT_INODE:
            if p.linked and 0.0 < p.validated < at:
                p.validated = at
            p = self.table.get(p.parent)

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
