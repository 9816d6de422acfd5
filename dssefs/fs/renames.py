"""rename, and finishing directory renames that were interrupted.

A directory rename moves every object below the directory (server-side copies with re-wrapped
keys, then deletes of the sources).  Its intent record (:mod:`dssefs.objects.intents`) is stored
before the first copy and deleted after the last source is, so a rename that a crash or a store
failure interrupted is finished later: at the next mount start (:meth:`RenameOps.resume_renames`,
once the mount serves) or by the next rename that touches its source or destination.  A record
is acted on by the mount that wrote it (the same host and mount point: a second daemon cannot
serve it while the first runs), or once nobody has refreshed it for ``STALE_AFTER`` seconds; a
read-only mount only reports it.
"""

from __future__ import annotations

import errno
import logging
import time

import trio

from ..errors import DssefsError, ObjectNotFound
from ..envelope.epoch import is_reserved_key
from ..objects import intents
from ..objects.intents import (CHANGED, CONFLICT, DONE, MOVED, OUTCOMES, RenameIntent, Renames,
                               parse_intent_key)
from ..store.base import ObjectInfo
from .common import _Locks, fail
from .inodes import ROOT_INODE, Inode

log = logging.getLogger("dssefs.fs")


class _RenameState:
    """Intent records this mount knows: ``pending`` (None until the first listing) maps a record's
    key to its listing and the opened intent (None if it could not be opened); ``active`` holds
    the records of renames running here now."""

    def __init__(self) -> None:
        self.lock = trio.Lock()
        self.pending: dict[str, tuple[ObjectInfo | None, RenameIntent | None]] | None = None
        self.active: set[str] = set()


class RenameOps:
    """rename(2), and finishing interrupted directory renames."""

    #: who runs this mount's renames (host and mount point); the process when not set
    rename_owner: str | None = None

    def _renames(self) -> Renames:
        return Renames(self.vault, self.rename_owner or intents.default_owner())

    def _rename_state(self) -> _RenameState:
        st = self.__dict__.get("_rename_st")
        if st is None:
            st = self.__dict__["_rename_st"] = _RenameState()
        return st

    async def _each(self, fn, items) -> list:
        """``fn(item)`` (a blocking call, in worker threads) for every item concurrently; the
        first DssefsError is raised once all have ended."""
        results: list = []
        errors: list[DssefsError] = []

        async def one(item) -> None:
            try:
                results.append(await self._io(fn, item))
            except DssefsError as e:
                errors.append(e)

        async with trio.open_nursery() as nursery:
            for item in items:
                nursery.start_soon(one, item)
        if errors:
            raise errors[0]
        return results

    # ---- rename(2) ---------------------------------------------------------------------------------

    async def rename(self, old_parent: int, old: str, new_parent: int, new: str, flags: int = 0) -> None:
        self._writable_fs()
        RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
        if flags & RENAME_EXCHANGE:
            raise fail(errno.EINVAL, "RENAME_EXCHANGE is not supported")
        sp, dp = self._dir(old_parent), self._dir(new_parent)
        self._check_name(dp, new)
        src_key, dst_key = self.dir_prefix(sp) + old, self.dir_prefix(dp) + new
        await self.deletes.settle_tree(dst_key)  # pending DELETEs of the target go first, never after
        if await self._settle_intents((src_key, dst_key), exact=(src_key + "/", dst_key + "/")):
            await self._adopt_rename(sp, old, dp, new)  # the very rename that was interrupted: done
            return
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
        if not src.is_dir() and not src.attrs.is_reg():
            await self._unplain(dp)  # a symbolic link or special file enters it
        locks = sorted({src.ino: src, **({dst.ino: dst} if dst is not None else {})}.items())
        async with _Locks([n.lock for _, n in locks]):
            if src.is_dir():
                await self._flush_tree(src)
                replaced = self.object_key(dst) if dst is not None and dst.stored else None
                await self._move_tree(self.dir_prefix(src), dst_key + "/", replaced)
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
                dst.meta_dirty = False  # replaced: its pending attributes die with it
                self.table.detach(dst)
            self.table.move(src, dp.ino, new)
            self._listed(sp, old, None)
            self._listed(dp, new, "dir" if src.is_dir() else "file")
            if src.is_dir():
                await self._reopen_tree(src)
                if src.meta_dirty and not src.stored:  # a new directory's marker, stored at the new name
                    self._deferred.pop(src.ino, None)
                    await self._persist_attrs(src)
        self._touch_dir(sp)
        self._touch_dir(dp)

    async def _adopt_rename(self, sp: Inode, old: str, dp: Inode, new: str) -> None:
        """The inode table after an interrupted rename of ``old`` to ``new`` was finished: the
        inode of ``old`` (if known) is now ``new``."""
        src, dst = self.table.child(sp.ino, old), self.table.child(dp.ino, new)
        if dst is not None and dst is not src:
            dst.stored = False
            dst.meta_dirty = False
            self.table.detach(dst)
        if src is not None:
            self.table.move(src, dp.ino, new)
            await self._reopen_tree(src)
        self._listed(sp, old, None)
        self._listed(dp, new, "dir")
        self._touch_dir(sp)
        self._touch_dir(dp)

    async def _flush_tree(self, node: Inode) -> None:
        for n in self.table.descendants(node.ino):
            if n.dirty and n.linked:
                async with n.lock:
                    await self._flush_locked(n, force=not n.stored and not n.is_dir())

    def _plan_sync(self, src_pfx: str, key: str):
        return self._renames().plan(src_pfx, key)

    async def _move_tree(self, src_pfx: str, dst_pfx: str, replaced: str | None) -> None:
        """Move every object under ``src_pfx`` to ``dst_pfx`` (metadata-only copies, bodies never
        re-encrypted) under an intent record; ``replaced``: the marker of the empty directory
        the rename replaces, deleted once every object is known to be movable."""
        listed = await self._io(lambda: [i for i in self.store.list(src_pfx, delimiter=None)
                                         if not isinstance(i, str)])
        nested = [i for i in listed if parse_intent_key(i.key) is not None]
        if nested:  # a mount of a prefix below: its interrupted renames are finished first
            await self._settle_records(nested)
            listed = await self._io(lambda: [i for i in self.store.list(src_pfx, delimiter=None)
                                             if not isinstance(i, str)])
        keys = [i.key for i in listed if not is_reserved_key(i.key[len(src_pfx):])]
        planned = await self._each(lambda k: self._plan_sync(src_pfx, k), keys)  # refuses the unmovable
        if replaced is not None:
            await self._io(self.store.delete, replaced)
        renames = self._renames()
        intent = await self._cpu(renames.new_intent, self.prefix, src_pfx, dst_pfx, [e for e, _ in planned])
        infos = {e.rel: info for e, info in planned}
        st = self._rename_state()
        st.active.add(intent.key)  # before it is stored: never taken for an interrupted one here
        try:
            await self._io(renames.store_intent, intent)
        except DssefsError:
            # nothing moved: the rename fails now, and must not be finished later either
            st.active.discard(intent.key)
            with trio.CancelScope(shield=True):
                try:
                    await self._io(self.store.delete, intent.key)
                except DssefsError:
                    pass
            raise
        try:
            error = None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._heartbeat, renames, intent)
                try:
                    outcomes = await self._each(lambda e: renames.move(intent, e, infos[e.rel]),
                                                intent.entries)
                except DssefsError as e:
                    error = e
                nursery.cancel_scope.cancel()
            if error is not None:
                raise error
            await self._io(renames.finish, intent)
        except BaseException:
            if st.pending is not None:  # the next rename touching it finishes it
                st.pending[intent.key] = (None, intent)
            self._invalidate(src_pfx, dst_pfx)
            raise
        finally:
            st.active.discard(intent.key)
        left = outcomes.count(CONFLICT)
        if left:
            self._invalidate(src_pfx, dst_pfx)
            raise fail(errno.EIO, f"{left} objects of {self.store.url.rstrip('/')}/{src_pfx} were not "
                                  "moved: another client stored objects under the new name meanwhile; "
                                  "both are kept (see the log)")

    async def _heartbeat(self, renames: Renames, intent: RenameIntent) -> None:
        while True:
            await trio.sleep(intents.HEARTBEAT)
            try:
                if not await self._io(renames.heartbeat, intent):
                    return
            except DssefsError as e:
                log.debug("event=rename_heartbeat_failed intent=%s reason=%s", intent.key, e)

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

    # ---- interrupted renames --------------------------------------------------------------------------

    def _may_resume(self, intent: RenameIntent, info: ObjectInfo | None) -> bool:
        """Ours (this mount point's earlier daemon, or this daemon), or left alone long enough
        that no rename can still be running it."""
        return intent.owner == self._renames().owner or info is not None and Renames.stale(info)

    async def _load_records(self, infos: list[ObjectInfo], summary: dict | None = None
                            ) -> dict[str, tuple[ObjectInfo, RenameIntent | None]]:
        renames, out = self._renames(), {}
        for info in infos:
            try:
                out[info.key] = (info, await self._io(renames.load, info.key))
            except DssefsError as e:
                log.warning("event=rename_intent_rejected intent=%s/%s errno=%s reason=%s effect='nothing "
                            "moved; the record is left in place'", self.store.url.rstrip("/"), info.key,
                            errno.errorcode.get(e.errno, e.errno), str(e).replace("\n", " "))
                out[info.key] = (info, None)
                if summary is not None:
                    summary["rejected"] += 1
        return out

    async def _scan_intents(self, st: _RenameState, summary: dict | None = None) -> None:
        if st.pending is not None:
            return
        infos = await self._io(self._renames().pending, self.prefix)
        st.pending = await self._load_records([i for i in infos if i.key not in st.active], summary)

    async def _current(self, key: str) -> ObjectInfo | None:
        """The record as stored now (None: gone, finished by someone else)."""
        try:
            return await self._io(self.store.head, key)
        except ObjectNotFound:
            return None

    async def _settle_intents(self, keys: tuple[str, ...], exact: tuple[str, str]) -> bool:
        """Finish the interrupted renames of this mount's prefix whose directories overlap
        ``keys`` (EBUSY when one may still be running elsewhere).  True when one of them was
        exactly the rename ``exact`` (source and destination) and it is complete."""
        st = self._rename_state()
        done = False
        if st.pending is not None and not any(
                intent is not None and key not in st.active and intent.touches(keys)
                for key, (_, intent) in st.pending.items()):
            return False  # nothing known touches them: no waiting for a recovery of others
        async with st.lock:
            await self._scan_intents(st)
            for key, (info, intent) in list(st.pending.items()):
                if intent is None or key in st.active or not intent.touches(keys):
                    continue
                if info is not None or intent.owner != self._renames().owner:
                    info = await self._current(key)
                    if info is None:
                        st.pending.pop(key, None)
                        continue
                if not self._may_resume(intent, info):
                    raise fail(errno.EBUSY, f"{intent.src} is being renamed to {intent.dst} by another "
                                            f"client ({intent.owner}): try again later")
                counts = await self._resume_one(intent)
                st.pending.pop(key, None)
                # the very rename asked for, and it moved something: done (else the usual checks
                # answer, e.g. ENOENT when nothing was left under the old name)
                done = done or ((intent.src, intent.dst) == exact and counts[MOVED] + counts[DONE] > 0
                                and not counts[CHANGED] + counts[CONFLICT])
        return done

    async def _settle_records(self, infos: list[ObjectInfo]) -> None:
        """Finish the interrupted renames recorded below a directory about to be renamed (a
        mount of a prefix below it wrote them); EBUSY when one cannot be."""
        for key, (info, intent) in (await self._load_records(infos)).items():
            if intent is None:
                raise fail(errno.EBUSY, f"{self.store.url.rstrip('/')}/{key}: an interrupted rename below "
                                        "cannot be opened (see the log)")
            if not self._may_resume(intent, info):
                raise fail(errno.EBUSY, f"{intent.src} is being renamed to {intent.dst} by another "
                                        f"client ({intent.owner}): try again later")
            await self._resume_one(intent)

    async def _resume_one(self, intent: RenameIntent) -> dict[str, int]:
        node = self._node_at(intent.src)
        if node is not None:
            await self._flush_tree(node)
        renames = self._renames()
        t0 = time.monotonic()
        counts = dict.fromkeys(OUTCOMES, 0)
        try:
            for outcome in await self._each(lambda e: renames.settle(intent, e), intent.entries):
                counts[outcome] += 1
            await self._io(renames.finish, intent)
        finally:
            self._invalidate(intent.src, intent.dst)
        renames.log_resumed(intent, counts, time.monotonic() - t0)
        return counts

    async def resume_renames(self) -> dict[str, int]:
        """Finish the interrupted directory renames recorded under this mount's prefix (run once
        the mount serves).  A read-only mount only logs them.  Returns counts of records found,
        resumed, left pending, rejected (cannot be opened) and failed."""
        st = self._rename_state()
        summary = dict.fromkeys(("found", "resumed", "pending", "rejected", "failed"), 0)
        t0 = time.monotonic()
        where = self.store.url.rstrip("/")
        async with st.lock:
            st.pending = None
            await self._scan_intents(st, summary)
            summary["found"] = len(st.pending)
        for key, (info, intent) in list(st.pending.items()):
            if intent is None:
                continue
            if self.cfg.read_only or not self._may_resume(intent, info):
                reason = ("read_only mount" if self.cfg.read_only else
                          f"begun by another client ({intent.owner}) {time.time() - info.mtime:.0f} s "
                          f"ago; finished by that mount, by a rename of these directories once idle "
                          f"for {intents.STALE_AFTER:g} s, or by a later mount")
                log.warning("event=rename_pending intent=%s/%s src=%s dst=%s objects=%d action=none "
                            "reason='%s'", where, key, intent.src, intent.dst, len(intent.entries), reason)
                summary["pending"] += 1
                continue
            async with st.lock:  # one at a time: a rename of other directories does not wait
                if key not in st.pending or key in st.active:
                    continue  # finished by a rename meanwhile
                try:
                    await self._resume_one(intent)
                except DssefsError as e:
                    summary["failed"] += 1
                    log.warning("event=rename_resume_failed intent=%s/%s errno=%s reason=%s effect='tried "
                                "again by the next rename of these directories or the next mount'", where,
                                key, errno.errorcode.get(e.errno, e.errno), str(e).replace("\n", " "))
                    continue
                st.pending.pop(key, None)
                summary["resumed"] += 1
        if summary["found"]:
            log.info("event=rename_recovery store=%s/%s found=%d resumed=%d pending=%d rejected=%d failed=%d "
                     "seconds=%.2f", where, self.prefix, summary["found"], summary["resumed"],
                     summary["pending"], summary["rejected"], summary["failed"], time.monotonic() - t0)
        return summary

    # ---- the inode table after objects moved behind its back -------------------------------------------

    def _node_at(self, key: str) -> Inode | None:
        """The known inode of directory prefix or object key ``key`` (None if not known)."""
        if not key.startswith(self.prefix):
            return None
        rel = key[len(self.prefix):].strip("/")
        node = self.table.root
        for part in rel.split("/") if rel else []:
            node = self.table.child(node.ino, part)
            if node is None:
                return None
        return node

    def _invalidate(self, *keys: str) -> None:
        """Make the next use of these directories (and what is below them) ask the store."""
        for key in keys:
            node = self._node_at(key)
            if node is None:
                up = key.rstrip("/").rpartition("/")[0]
                parent = self._node_at(up + "/" if up else "")
                if parent is not None:
                    self._listings.pop(parent.ino, None)
                continue
            self._listings.pop(node.parent, None)
            for n in self.table.descendants(node.ino) + [node]:
                n.validated = 0.0
                self._listings.pop(n.ino, None)
