"""Directory listings: opendir/readdir/releasedir, and reading ahead for tree walks.

pyfuse3 answers every readdir as READDIRPLUS, with each entry's attributes and type.  A listing
tells directories from other names, and the object's size tells a regular file from what could
also be a symbolic link, FIFO, socket or device (their bodies are at most a link target); in a
plain directory (its marker, listed with it, says that no such object is in it: see
common.PLAIN_MARKER_BODY) every object is a regular file.  Otherwise only a probe of the
object's sealed attributes gives the type of a small object, and anyone's size, mode and times
come only from a probe.  So a readdir

* lists a regular file the listing shows as such (larger than SPECIAL_OBJECT_MAX, or any object
  of a plain directory) without a probe while nobody asks for attributes (find): its type is
  right, and the kernel is told to keep none of its default attributes (TTL 0), so it asks again
  before using them;
* probes the other names through the metadata scheduler (:mod:`.probes`; dozens at once,
  bounded), the batch after it read ahead while the kernel takes this one, and returns the names
  ready up to the first one still probed, in the listing's order: the kernel holds the directory
  while a readdir runs (no parallel directory operations with pyfuse3), so a readdir never waits
  for every probe of its batch, and a lookup in the directory gets its turn between two
  readdirs; the order never changes, because a tree walk (fts) visits subdirectories in the
  order it reads them, and read-ahead queues them in the listing's order;
* lists the names whose probes have not answered when the first of them has not answered within
  ``_readdir_wait()`` with their type unknown (DT_UNKNOWN: mode 0, which the kernel does not
  keep; it sends a FORGET for the lookup count the entry carried).

When attributes of a file listed without a probe are asked for (ls -l, stat, open), the other such
files of its directory are probed together, and for AHEAD_IDLE seconds listings probe every
name.  Probe answers are kept for the entry TTL, so the lookups, ``stat``s and opens that follow a
listing cost no request of their own.

Tree walks (find, ls -R, du, cp -r, tar, os.walk) read a directory to its end and then enter its
subdirectories one after another.  When a directory is entered right after its parent was read
through, one recursive listing of the parent's subtree (up to TREE_KEYS keys) gives the shape of
the tree, and the listings and probes of every directory below are queued in the order such a
walk reaches them (a directory's entries, then each subdirectory's subtree in name order); a
level's listing is skipped while the recursive one is fresh.  Unused answers stay within a budget
(as many as the walk uses in half the entry TTL, AHEAD_MIN..AHEAD_BUDGET, AHEAD_START while its
pace is not known yet); what is queued is
dropped once nothing read ahead has been used for AHEAD_IDLE seconds (the walk stopped or went
elsewhere).
"""

from __future__ import annotations

import errno
import functools
import logging

import trio

from ..envelope.epoch import RESERVED_NAME
from ..errors import DssefsError, StoreError
from .common import LISTING_CACHE_MAX, NAME_MAX, READDIR_BATCH, DirHandle, Probe, Stat, fail, with_links
from .inodes import ROOT_INODE, Inode
from .namespace import SPECIAL_OBJECT_MAX, DirList
from .probes import AHEAD, NEXT, READDIR

log = logging.getLogger("dssefs.fs")

# Probes that mostly wait (S3: a HEAD or small GET takes several ms) run in parallel.  Probes of a
# store whose requests mostly compute (a local directory: read a file, check commitments, decrypt)
# run all of a batch in one worker-thread round trip: parallel ones would only contend for the
# GIL, and a thread that gives it up for a system call waits for the other's switch interval.

# read-ahead answers (and read-ahead requests running) not used yet: at most as many as the reader
# uses in half the entry TTL (an answer read ahead further would expire before it is used),
# between AHEAD_MIN and AHEAD_BUDGET; AHEAD_START for the first second of a walk, before its pace
# is known
AHEAD_BUDGET = 256
AHEAD_MIN = 32
AHEAD_START = 96
# queued read-ahead is dropped when nothing read ahead was used for this long (seconds)
AHEAD_IDLE = 2.0
# keys of one recursive listing that gives the shape of a tree being walked (a request per 1,000)
TREE_KEYS = 4000
# a readdir waits at least this long (seconds), and four times the usual probe, for its first
# probe answer before it lists the names with their type unknown
READDIR_WAIT = 0.1


class ReaddirOps:
    """Directory handles."""

    async def opendir(self, ino: int) -> int:
        node = self._dir(ino)
        dirpfx = self.dir_prefix(node)
        self._sweep()
        if self._trees:
            self._visited[dirpfx] = self._now()
        names: list[tuple[str, str]] | None = None
        dl = self._dirlist(dirpfx)
        walking = False
        if dl is not None and dl.ahead:  # read ahead for a walk that has now reached it: used once
            dl.ahead = False
            walking = True
            names = sorted(self._adopt(node, dl).items())
        if names is None:
            small = self.meta.job(("list", dirpfx, LISTING_CACHE_MAX))  # a lookup's, under way
            listed = None
            if small is not None:
                self.meta.submit(small.key, small.fn, READDIR)  # moved up if queued
                (listed, _versions), started = await self._await(small)
            if listed is None:
                (listed, _versions), started = await self._await(self._submit_list(dirpfx, READDIR, None))
            dl = self._dirlist(dirpfx)
            if len(listed) <= LISTING_CACHE_MAX and dl is not None and dl.at >= started:
                names = sorted(self._adopt(node, dl).items())
            else:
                names = list(listed)
                seen = {n for n, _ in names}
                for child in self.table.children(node.ino):  # created here, not stored yet
                    if child.name not in seen and (child.dirty or not child.stored and not child.is_dir()):
                        names.append((child.name, "dir" if child.is_dir() else "file"))
                names.sort()
                if len(names) <= LISTING_CACHE_MAX:
                    self._listings[node.ino] = (started, dict(names))
        parent = self.table.get(node.parent)
        if node.ino != ROOT_INODE and parent is not None and self.store.parallel_requests:
            through = self._read_through.get(parent.ino)
            if walking or (through is not None and self._now() - through < max(AHEAD_IDLE, self.cfg.entry_timeout)):
                self._walk_ahead(parent)
        fh = next(self._fh)
        self.dirs[fh] = DirHandle(fh, node, names)
        return fh

    async def readdir(self, fh: int, start: int, *, kernel: bool = False) -> list[tuple[str, Stat, int]]:
        """Up to READDIR_BATCH entries from offset ``start``: ``(name, stat, next_offset)``.
        Offsets are stable for the handle (a snapshot taken at opendir).  Lookup counts are not
        changed: call :meth:`incref` for every entry handed to the kernel, then :meth:`trim`.

        ``kernel``: the entries go to the kernel, which asks again for attributes it is told to
        keep for no time: regular files the listing shows as such may come without a probe, the
        entries answered first may come alone (:meth:`readdir_partial` says so), and names not
        answered in time may come with their type unknown (mode 0; see the module docstring).
        Otherwise every entry of the batch comes probed, in order.

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
        ttl = self.cfg.entry_timeout

        todo = []
        # regular files the listing shows as such (by their size) are listed without a probe
        # while nobody asks for attributes (find, a walk for names only)
        in_order = True
        if self._attrs_wanted():  # a walk that asks for attributes: it keeps asking
            self._attrs_until = self._now() + AHEAD_IDLE
            dl = None
            in_order = False  # ls -l and the like: they sort what they read
        else:
            dl = self._dirlist(dirpfx) if self.store.parallel_requests and kernel else None
        for name, kind in batch:
            n = self.table.child(node.ino, name)
            if n is not None and (self._local_authority(n) or self._fresh(n, ttl)
                                  or (dl is not None and self._unprobed(n))):
                nodes[name] = n
                continue
            if n is None and dl is not None and self._surely_regular(dl, name) and dirpfx + name not in self._kept:
                nodes[name] = self._unprobed_entry(node, name, dl)
                continue
            k = self._kept_for(dirpfx + name, n)
            if k is not None:
                p = k.probe if k.error is None else self._broken_probe(dirpfx + name, kind, k.error)
                nodes[name] = self._listed_probe(node, name, p, k.at)
            elif n is not None and self._listing_confirms(node, n, ttl):
                nodes[name] = n
            else:
                todo.append((name, kind, n.obj if n is not None else None))
        pending: set[str] = set()
        unknown: set[str] = set()
        if todo:
            if self.store.parallel_requests:
                if in_order:
                    lead = batch[0][0] if batch and batch[0][0] not in nodes else None
                else:
                    lead = "" if not nodes else None  # any first answer
                pending = await self._probe_batch(node, dirpfx, todo, nodes, wait_for=lead, every=not kernel)
            else:
                await self._probe_grouped(node, dirpfx, todo, nodes)
        self._partial.discard(fh)
        if pending and not in_order and nodes:
            # a program that asks for every entry's attributes sorts what it reads: the names
            # answered go first, the others with the next readdir
            done = [e for e in batch if e[0] not in pending]
            d.names[first:first + len(batch)] = done + [e for e in batch if e[0] in pending]
            batch = done
            self._partial.add(fh)
            pending = set()
        ready = next((i for i, (name, _k) in enumerate(batch) if name in pending), len(batch))
        if pending and ready:
            # the names answered up to the first one still probed go now, in order; the others
            # follow in the next readdir, so that this one returns now (the kernel holds the
            # directory while a readdir runs, and a lookup in it waits for that).  The order
            # stays the listing's: a tree walk (fts) visits subdirectories in the order it
            # reads them, which is the order they are read ahead in
            batch = batch[:ready]
            self._partial.add(fh)
        elif pending:
            # the first name not answered in time: listed with their type unknown (no attributes
            # for the kernel to keep), the probes go on for the lookups that follow
            unknown = pending
            for name, kind in batch:
                if name in unknown and self.table.child(node.ino, name) is None:
                    self._unprobed_entry(node, name, None, kind)
                nodes[name] = self.table.child(node.ino, name)
        if self.store.parallel_requests:
            self._read_next(node, dirpfx, d.names[first + READDIR_BATCH:first + 2 * READDIR_BATCH])
        if first + len(batch) >= len(d.names) and fh not in self._partial:
            self._read_through[node.ino] = self._now()
        for i, (name, _kind) in enumerate(batch):
            n = nodes.get(name)
            if n is not None and n.linked:
                st = with_links(self.stat(n), n)
                if name in unknown:
                    st.mode = 0  # DT_UNKNOWN: the kernel keeps nothing of it and forgets it
                out.append((name, st, first + i + 3))
        return out

    def readdir_partial(self, fh: int) -> bool:
        """Whether the last readdir of ``fh`` left names of its batch for the next one (the
        adapter then returns to the kernel instead of asking for more)."""
        return fh in self._partial

    async def _probe_batch(self, parent: Inode, dirpfx: str, todo, nodes, wait_for: str | None,
                           every: bool) -> set[str]:
        """Probe the names of a batch, all queued at once (the scheduler bounds how many run),
        and install those answered: with ``every``, all of them; with ``wait_for`` (a name; "": any),
        once that one is answered (at most ``_readdir_wait()``) and those that follow within a
        few ms; else only those answered already.  Returns the names still being probed."""
        jobs = [(name, kind, self._submit_probe(dirpfx, name, kind, prev, READDIR)) for name, kind, prev in todo]
        if every:
            for _n, _k, job in jobs:
                await job.done.wait()
        elif wait_for == "":  # the first answer, whichever it is
            if not any(job.state == "done" for _n, _k, job in jobs):
                with trio.move_on_after(self._readdir_wait()):
                    await self._first_done([job for _n, _k, job in jobs])
        elif wait_for is not None:
            lead = next((job for name, _k, job in jobs if name == wait_for), None)
            if lead is not None and lead.state != "done":
                with trio.move_on_after(self._readdir_wait()):
                    await lead.done.wait()
        if any(job.state == "done" for _n, _k, job in jobs):
            with trio.move_on_after(0.003):
                for _n, _k, job in jobs:
                    await job.done.wait()
        pending = set()
        for name, kind, job in jobs:
            if job.state != "done":
                pending.add(name)
                continue
            try:
                p, at = await self._await(job)
            except DssefsError as e:  # the store failed on this key (beyond its retries)
                key = dirpfx + name + ("/" if kind == "dir" else "")
                p, at = self._broken_probe(key, kind, e), job.started
            nodes[name] = self._listed_probe(parent, name, p, at)
        return pending

    @staticmethod
    async def _first_done(jobs) -> None:
        first = trio.Event()

        async def watch(job):
            await job.done.wait()
            first.set()

        async with trio.open_nursery() as nursery:
            for job in jobs:
                nursery.start_soon(watch, job)
            await first.wait()
            nursery.cancel_scope.cancel()

    def _readdir_wait(self) -> float:
        """How long a readdir waits for the first answer of its probes: a few probe times."""
        return max(READDIR_WAIT, 4 * self._probe_time)

    async def _probe_grouped(self, parent: Inode, dirpfx: str, todo, nodes) -> None:
        """A store whose requests compute rather than wait: the batch's probes in one
        worker-thread round trip (under the I/O limiter), not one request each."""
        def probe_many():
            res = []
            for name, kind, prev in todo:
                try:
                    res.append((name, self._probe_sync(dirpfx, name, kind, prev)))
                except DssefsError as e:  # the store failed on this key (beyond its retries)
                    key = dirpfx + name + ("/" if kind == "dir" else "")
                    res.append((name, self._broken_probe(key, kind, e)))
            return res

        at = self._now()
        for name, p in await self._io(probe_many):
            nodes[name] = self._listed_probe(parent, name, p, at)

    def _listed_probe(self, parent: Inode, name: str, p: Probe | None, at: float | None = None) -> Inode | None:
        """The inode of a listed name after its probe.  A store error on that one key keeps what
        is known of an inode that was fine (it is probed again at its next use, after the TTL);
        otherwise the probe is installed, a failed one as a broken inode (listed with default
        attributes, opening it fails with EIO or EACCES).  None only if the name is gone."""
        old = self.table.child(parent.ino, name)
        if (p is not None and isinstance(p.broken, StoreError) and old is not None and old.broken is None
                and not (old.is_dir() ^ (p.kind == "dir"))):
            return old
        return self._install(parent, name, p, at)

    # ---- read-ahead ----------------------------------------------------------------------------

    def _read_next(self, parent: Inode, dirpfx: str, names: list[tuple[str, str]]) -> None:
        """Probe the batch after the one being returned, while the kernel takes this one."""
        if not names:
            return
        now = self._now()
        self._ahead_used = now
        dl = self._dirlist(dirpfx)
        for name, kind in names:
            if self._needs_probe(dirpfx, name, parent.ino, dl, now):
                self._submit_probe(dirpfx, name, kind, None, NEXT)

    def _needs_probe(self, dirpfx: str, name: str, ino: int | None, dl, now: float) -> bool:
        """Whether reading ``dirpfx + name`` ahead needs a probe: not if a kept answer is fresh,
        nor if the inode known for it is fresh or will be confirmed by listing ``dl``, nor (while
        nobody asks for attributes) if ``dl`` shows it is a regular file."""
        k = self._kept.get(dirpfx + name)
        if k is not None and now - k.at < self.cfg.entry_timeout:
            return False
        if dl is not None and not self._attrs_wanted() and self._surely_regular(dl, name):
            return False
        n = self.table.child(ino, name) if ino is not None else None
        if n is None:
            return True
        if self._local_authority(n) or self._fresh(n, self.cfg.entry_timeout):
            return False
        return not (dl is not None and dl.at > n.validated and self._confirmable(n, dl))

    @staticmethod
    def _surely_regular(dl, name: str) -> bool:
        v = dl.versions.get(name)
        return (v is not None and dl.names.get(name) == "file"
                and (v[1] > SPECIAL_OBJECT_MAX or dl.plain()))

    def _unprobed_entry(self, parent: Inode, name: str, dl, kind: str = "file") -> Inode:
        """An inode for a name known only from a listing: it has its number and type (a regular
        file when ``dl`` shows it, else the kind the listing gives), and default attributes that
        the kernel is told to keep for no time at all (every use of them asks again: a lookup or
        getattr, which probes it)."""
        a = self._default_attrs(kind)
        if dl is not None:
            a.atime_ns = a.mtime_ns = a.ctime_ns = int(dl.versions[name][2] * 1e9)
        node = self.table.add(parent.ino, name, a)
        node.stored = True
        return node

    def _attrs_wanted(self) -> bool:
        return self._now() < self._attrs_until

    def _want_attrs(self, parent: Inode) -> None:
        """Someone asks for the attributes of a file listed without a probe (ls -l, stat, open
        after a listing): probe the other such files of its directory now, together, and read
        ahead with attributes for a while (every name again, also in walks under way)."""
        now = self._now()
        was = self._attrs_wanted()
        self._attrs_until = now + AHEAD_IDLE
        self._ahead_used = now
        dirpfx = self.dir_prefix(parent)
        for child in self.table.children(parent.ino):
            if (self._unprobed(child) and self.store.parallel_requests
                    and not self._has_answer(dirpfx + child.name)):
                self._submit_probe(dirpfx, child.name, "file", None, NEXT)
        if not was:
            for top, (_started, end, levels) in list(self._trees.items()):
                if levels is not None:
                    self._expand_tree(top, levels, end)

    def _order(self, dirpfx: str) -> tuple[str, ...]:
        rel = dirpfx[len(self.prefix):].rstrip("/")
        return tuple(rel.split("/")) if rel else ()

    def _walk_ahead(self, top: Inode) -> None:
        """A walk entered a subdirectory of ``top``: read ahead every subdirectory of ``top`` and
        everything below them (see the module docstring).  One recursive listing (a request per
        1,000 keys, up to TREE_KEYS) gives the shape of the tree, so that the listings and probes
        of its directories are queued at once in the order the walk reaches them; directories
        beyond it are read ahead level by level."""
        cached = self._listings.get(top.ino)
        if cached is None or cached[1] is None:
            return
        now = self._now()
        if now - self._ahead_used > AHEAD_IDLE:
            self._ahead_since = now  # a new walk: its pace is not known yet
        self._ahead_used = now
        dirpfx = self.dir_prefix(top)
        for tpfx, (_started, end, _levels) in self._trees.items():
            if dirpfx.startswith(tpfx) and (end is None or not end.startswith(dirpfx)):
                return  # inside a tree read ahead already
        self._trees[dirpfx] = (now, "", None)  # queued: covers it until the answer says otherwise
        self.meta.submit(("tree", dirpfx), functools.partial(self._tree_sync, dirpfx, TREE_KEYS), NEXT,
                         self._tree_done)

    def _tree_sync(self, top: str, max_keys: int):
        """The directory levels below ``top`` from one recursive listing of at most ``max_keys``
        keys: ``({prefix: (names, versions)}, last key if the listing was cut short)``.  Names
        follow the rules of :meth:`_list_sync` (dssefs's records and names no directory may hold
        are left out, with everything below them; a file wins over a directory of its name)."""
        levels: dict[str, tuple[dict, dict]] = {top: ({}, {})}
        last = None
        n = 0
        for item in self.store.list(top, delimiter=None):
            if isinstance(item, str):
                continue
            if n >= max_keys:
                return levels, last
            n += 1
            last = item.key
            parts = item.key[len(top):].split("/")
            pfx = top
            for i, part in enumerate(parts):
                final = i == len(parts) - 1
                if final and not part:  # a directory marker: its level exists already
                    levels[pfx][1][""] = (item.etag, item.size, item.mtime)
                    break
                if not part or part in (".", "..", RESERVED_NAME) or len(part.encode()) > NAME_MAX:
                    break
                names, versions = levels[pfx]
                if final:
                    names[part] = "file"
                    versions[part] = (item.etag, item.size, item.mtime)
                    break
                if names.get(part) != "file":
                    names[part] = "dir"
                pfx = pfx + part + "/"
                levels.setdefault(pfx, ({}, {}))
        return levels, None

    def _tree_done(self, job) -> None:
        top = job.key[1]
        if job.error is not None:
            self._trees.pop(top, None)
            return
        levels, end = job.result
        self._trees[top] = (job.started, end, levels)
        for pfx, (names, versions) in levels.items():
            if pfx == top or (end is not None and end.startswith(pfx)) or self._changed_since(pfx, job.started):
                continue  # the top's own listing is its opendir's; a cut level is listed alone
            old = self._dirlists.get(pfx)
            if old is None or old.at < job.started:
                self._dirlists[pfx] = DirList(job.started, names, versions, ahead=True)
        self._expand_tree(top, levels, end)

    def _expand_tree(self, top: str, levels, end) -> None:
        """Queue the read-ahead of every directory below ``top`` that a tree listing found."""
        base = self._order(top)
        node = self._node_at(top)
        for name, kind in sorted(levels[top][0].items()):
            if kind == "dir":
                child = self.table.child(node.ino, name) if node is not None else None
                self._ahead_level(top + name + "/", base + (name,), levels, end,
                                  child.ino if child is not None else None)
        self.meta.pump()

    def _ahead_level(self, dirpfx: str, order: tuple[str, ...], levels, end, ino: int | None) -> None:
        """Queue the listing (unless the tree's is still fresh when its turn comes) and the entries
        of one directory found by a tree listing, then its subdirectories."""
        if dirpfx not in levels or (end is not None and end.startswith(dirpfx)):
            self._ahead_dir(dirpfx, order, ino)  # beyond what the tree listing covered
            return
        if dirpfx in self._visited:  # the walk has been there: only what is below is ahead
            for name, kind in sorted(levels[dirpfx][0].items()):
                if kind == "dir":
                    child = self.table.child(ino, name) if ino is not None else None
                    self._ahead_level(dirpfx + name + "/", order + (name,), levels, end,
                                      child.ino if child is not None else None)
            return
        dl = self._dirlists.get(dirpfx)
        self._ahead_done[dirpfx] = dl
        self._submit_list(dirpfx, (AHEAD, *order), skip=functools.partial(self._has_dirlist, dirpfx))
        names, versions = levels[dirpfx]
        entries = sorted(names.items())
        now = self._now()
        tree = DirList(0.0, names, versions)
        for name, kind in entries:
            if self._needs_probe(dirpfx, name, ino, dl or tree, now):
                surely = self._surely_regular(tree, name)
                self._submit_probe(dirpfx, name, kind, None, (AHEAD, *order, "", name),
                                   skip=functools.partial(self._ahead_skip, dirpfx + name, surely))
        for name, kind in entries:
            if kind == "dir":
                child = self.table.child(ino, name) if ino is not None else None
                self._ahead_level(dirpfx + name + "/", order + (name,), levels, end,
                                  child.ino if child is not None else None)

    def _has_dirlist(self, dirpfx: str) -> bool:
        return self._dirlist(dirpfx) is not None

    def _ahead_skip(self, key: str, surely_regular: bool) -> bool:
        return self._has_answer(key) or (surely_regular and not self._attrs_wanted())

    def _has_answer(self, key: str) -> bool:
        k = self._kept.get(key)
        return k is not None and self._now() - k.at < self.cfg.entry_timeout

    def _node_at(self, dirpfx: str) -> Inode | None:
        """The directory inode of ``dirpfx``, if the table knows it."""
        node = self.table.root
        for part in self._order(dirpfx):
            node = self.table.child(node.ino, part)
            if node is None:
                return None
        return node

    def _ahead_dir(self, dirpfx: str, order: tuple[str, ...], ino: int | None) -> None:
        """Read ahead the listing of ``dirpfx`` (inode ``ino`` if known), then its entries and
        subdirectories."""
        if dirpfx in self._ahead_wanted:
            return  # its listing is queued already
        dl = self._dirlist(dirpfx)
        if dl is not None:
            self._ahead_entries(dirpfx, order, dl, ino)
            return
        self._ahead_wanted[dirpfx] = (order, ino)
        self._submit_list(dirpfx, (AHEAD, *order))

    def _listing_arrived(self, dirpfx: str, dl) -> None:
        wanted = self._ahead_wanted.pop(dirpfx, None)
        if wanted is not None and dl is not None:
            self._ahead_entries(dirpfx, wanted[0], dl, wanted[1])

    def _ahead_entries(self, dirpfx: str, order: tuple[str, ...], dl, ino: int | None) -> None:
        if self._ahead_done.get(dirpfx) is dl:
            return  # this listing was read ahead already
        self._ahead_done[dirpfx] = dl
        now = self._now()
        entries = sorted(dl.names.items())
        # a directory's entries before any subdirectory's subtree: "" sorts before every name
        for name, kind in entries:
            if self._needs_probe(dirpfx, name, ino, dl, now):
                self._submit_probe(dirpfx, name, kind, None, (AHEAD, *order, "", name))
        for name, kind in entries:
            if kind == "dir":
                child = self.table.child(ino, name) if ino is not None else None
                self._ahead_dir(dirpfx + name + "/", order + (name,), child.ino if child is not None else None)

    def _ahead_gate(self) -> bool:
        """Whether background requests may start: while read-ahead is being used and fewer than
        AHEAD_BUDGET answers wait unused."""
        now = self._now()
        self._sweep()
        if now - self._ahead_used > AHEAD_IDLE:
            if self.meta.drop_background():
                self._ahead_wanted.clear()
            self._trees.clear()
            self._visited.clear()
            return False
        used = self._ahead_uses
        while used and now - used[0] > 1.0:
            used.popleft()
        if now - self._ahead_since < 1.0:
            self._ahead_limit = AHEAD_START
        else:
            self._ahead_limit = max(AHEAD_MIN, min(AHEAD_BUDGET, int(len(used) * self.cfg.entry_timeout / 2)))
        return self._unused + self.meta.running_background < self._ahead_limit

    def _ahead_used_one(self) -> None:
        self._ahead_uses.append(self._now())

    def _sweep(self) -> None:
        """Forget kept answers and listings older than the entry TTL (at most every 0.25 s)."""
        now = self._now()
        if now - self._swept < 0.25:
            return
        self._swept = now
        ttl = self.cfg.entry_timeout
        wasted = 0
        for key in [k for k, v in self._kept.items() if now - v.at >= ttl]:
            if self._kept.pop(key).unused:
                self._unused -= 1
                wasted += 1
        if wasted:
            log.debug("event=read_ahead_expired answers=%d budget=%d", wasted, self._ahead_limit)
        for key in [k for k, v in self._dirlists.items() if now - v.at >= ttl]:
            del self._dirlists[key]
        for key in [k for k, v in self._ahead_done.items() if v is None or now - v.at >= ttl]:
            del self._ahead_done[key]

        if len(self._read_through) > 1024:
            keep = max(AHEAD_IDLE, ttl)
            self._read_through = {k: t for k, t in self._read_through.items() if now - t < keep}

    async def releasedir(self, fh: int) -> None:
        self.dirs.pop(fh, None)
        self._partial.discard(fh)

    async def fsyncdir(self, fh: int) -> None:
        """fsync(2) of a directory: its pending attribute changes, and the marker objects of
        directories made in it whose store is pending, are stored before it returns (the other
        names are stored by the operations that change them; with --write-back, what the journal
        holds of the directory's marker and of the names in it is uploaded first)."""
        d = self.dirs.get(fh)
        if d is None:
            raise fail(errno.EBADF)
        await self.store_attrs_now(d.node)
        for child in self.table.children(d.node.ino):
            if child.is_dir() and not child.stored and child.meta_dirty:
                await self.store_attrs_now(child)
        dirpfx = self.dir_prefix(d.node)
        if d.node.linked:
            await self._settle(self.object_key(d.node))
            await self._settle(dirpfx, under=True)
        await self.deletes.sync(dirpfx)  # entries removed below it: deleted
