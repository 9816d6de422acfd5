"""Stale-while-revalidate for names and attributes (write-back mode), and own directories.

An answer about a name (a known inode, a directory's listing that answers lookups of absent
names, attributes) is normally used for the entry/attribute TTL from when the store was asked,
and then asked again before it is used.  With ``--write-back`` the mount is already local-first
(other clients see its changes once uploaded, conflicts are settled in the background), and
waiting for that request is what a tree extraction spends most of its time on: every directory
entered a second after it was created costs a listing and a HEAD while the writer waits.

So in write-back mode an answer about a directory (its lookup, its attributes, and a lookup of
an absent name in it, which its listing answers) older than the TTL but younger than the TTL plus
``window`` is used once more, and the same request that would have been waited for is sent in
the background (one at a time per name or directory); the kernel is told to keep that answer for
no time, so it asks again and gets the refreshed one as soon as it is in.  What another client
changed is therefore seen within the TTL plus ``window`` (plus one request), instead of within
the TTL.  Nothing older than that is ever used; failures of a background request are counted and
the next use asks again (in the foreground once the answer is too old).  Files are not answered
this way: one listing revalidates a directory's files together, and an answer the kernel may keep
for no time would make it ask again at every use of the file.

The window is 0 (off) without write-back.

Directories this mount created (mkdir) less than the TTL plus ``own_window`` ago are a case of
their own, in both modes: what the mount knows of such a directory (that it exists, its
attributes, the names in it, all kept up to date with the mount's own changes) is used without
asking the store at all, for answers less than the TTL plus ``own_window`` old.  A directory a
writer has just created is rarely anyone else's, and a tree being extracted enters each of its
directories again seconds after creating them (tar creates the directories first): in the
default mode that cost a HEAD and a listing per directory.  What another client changes in such a
directory (a name it creates there, a chmod, a removal) is therefore seen within the TTL plus
``own_window``, not within the TTL; a name both create is still never overwritten (every create
is conditional).  ``own_window`` is 0 with ``--entry-timeout 0`` (always ask).
"""

from __future__ import annotations

import errno
import logging
from typing import Awaitable, Callable, Hashable

import trio

log = logging.getLogger("dssefs.fs")


class StaleAnswers:
    def __init__(self, window: float = 0.0, own_window: float = 0.0):
        self.window = max(0.0, window)
        self.own_window = max(self.window, own_window)  # never shorter than the stale window
        self._running: set[Hashable] = set()
        self.served = 0  # answers used beyond the TTL while refreshed
        self.own = 0  # of those, about directories this mount created within own_window (no refresh)
        self.refreshed = 0  # background refreshes done
        self.failed = 0  # background refreshes that failed (the next use asks again)

    def usable(self, age: float, ttl: float, *, own: bool = False) -> bool:
        """Whether an answer ``age`` seconds old may be used once more while it is refreshed (or,
        ``own``: about a directory this mount created within ``own_window``, used as it is)."""
        window = self.own_window if own else self.window
        return window > 0 and age < ttl + window

    def refresh(self, key: Hashable, fn: Callable[[], Awaitable[object]], *, own: bool = False) -> None:
        """An answer for ``key`` was used stale: run ``await fn()`` (which asks the store and
        installs the answer) in the background, unless a refresh of ``key`` is running.  ``own``:
        the answer is about a directory this mount created within ``own_window``; it is used
        without a refresh (nothing older than that window is used either way, and a directory a
        writer has just created is rarely anyone else's)."""
        self.served += 1
        if own:
            self.own += 1
            return
        if key in self._running:
            return
        self._running.add(key)
        trio.lowlevel.spawn_system_task(self._run, key, fn, name="dssefs-revalidate")

    @property
    def running(self) -> int:
        return len(self._running)

    def stats(self) -> dict:
        return {"window_s": self.window, "own_window_s": self.own_window, "served": self.served, "own": self.own,
                "refreshed": self.refreshed, "failed": self.failed, "running": self.running}

    async def _run(self, key: Hashable, fn: Callable[[], Awaitable[object]]) -> None:
        try:
            await fn()
            self.refreshed += 1
        except Exception as e:  # noqa: BLE001 - a system task must not crash the mount; the next use asks again
            if getattr(e, "errno", None) == errno.ENOENT:  # the refresh found the name gone
                self.refreshed += 1
            else:
                self.failed += 1
                log.debug("event=revalidate_failed key=%r reason=%s", key, e)
        finally:
            self._running.discard(key)
