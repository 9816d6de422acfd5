"""Directory listings: opendir/readdir/releasedir (READDIRPLUS probes resolved in
parallel groups of entries).
"""

from __future__ import annotations

import errno
import math
import time

import trio

from ..errors import DssefsError, StoreError
from .common import LISTING_CACHE_MAX, READDIR_BATCH, DirHandle, Probe, Stat, fail, with_links
from .inodes import Inode

# Probes that mostly wait (S3: a HEAD or small GET takes several ms) run in parallel groups sized to
# ~2 ms each.  Probes of a store whose requests mostly compute (a local directory: read a file, check
# commitments, decrypt) run all in one worker-thread round trip: parallel ones would only contend
# for the GIL, and a thread that gives it up for a system call waits for the other's switch interval.
PROBE_GROUP_SECONDS = 0.002


class ReaddirOps:
    """Directory handles."""

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
        changed: call :meth:`incref` for every entry handed to the kernel, then :meth:`trim`.

        Every name of the snapshot is returned unless the store no longer has it: a name whose
        probe fails (store error on that key, object or attributes failing authentication, key
        access denied) is listed flagged broken, never left out (see :meth:`_listed_probe`)."""
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
            t0 = time.perf_counter()
            for name, kind, prev in group:
                try:
                    out.append((name, self._probe_sync(dirpfx, name, kind, prev)))
                except DssefsError as e:  # the store failed on this key (beyond its retries)
                    key = dirpfx + name + ("/" if kind == "dir" else "")
                    out.append((name, self._broken_probe(key, kind, e)))
            per = (time.perf_counter() - t0) / len(group)
            self._probe_seconds += (per - self._probe_seconds) / 8  # moving average (benign race)
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
                nodes[name] = self._listed_probe(node, name, d.probes[name][1])
            else:
                todo.append((name, kind))
        if todo:
            work = []
            for name, kind in todo:
                old = self.table.child(node.ino, name)
                work.append((name, kind, old.obj if old is not None else None))
            # a few entries per worker-thread round trip; groups run in parallel (store latency)
            size = max(1, min(16, len(work) // max(1, self.io.total_tokens)))
            if not self.store.parallel_requests:
                size = len(work)
            elif self._probe_seconds > 0:
                size = max(size, min(16, math.ceil(PROBE_GROUP_SECONDS / self._probe_seconds)))
            async with trio.open_nursery() as nursery:
                for i in range(0, len(work), size):
                    nursery.start_soon(resolve, work[i:i + size])
            for name, _kind in todo:
                nodes[name] = self._listed_probe(node, name, d.probes[name][1])
        for i, (name, _kind) in enumerate(batch):
            n = nodes.get(name)
            if n is not None and n.linked:
                out.append((name, with_links(self.stat(n), n), first + i + 3))
        return out

    def _listed_probe(self, parent: Inode, name: str, p: Probe | None) -> Inode | None:
        """The inode of a listed name after its probe.  A store error on that one key keeps what
        is known of an inode that was fine (it is probed again at its next use, after the TTL);
        otherwise the probe is installed, a failed one as a broken inode (listed with default
        attributes, opening it fails with EIO or EACCES).  None only if the name is gone."""
        old = self.table.child(parent.ino, name)
        if (p is not None and isinstance(p.broken, StoreError) and old is not None and old.broken is None
                and not (old.is_dir() ^ (p.kind == "dir"))):
            return old
        return self._install(parent, name, p)

    async def releasedir(self, fh: int) -> None:
        self.dirs.pop(fh, None)

    async def fsyncdir(self, fh: int) -> None:
        """fsync(2) of a directory: its pending attribute changes, and the marker objects of
        directories made in it whose store is pending, are stored before it returns (the other
        names are stored by the operations that change them)."""
        d = self.dirs.get(fh)
        if d is None:
            raise fail(errno.EBADF)
        await self.store_attrs_now(d.node)
        for child in self.table.children(d.node.ino):
            if child.is_dir() and not child.stored and child.meta_dirty:
                await self.store_attrs_now(child)
