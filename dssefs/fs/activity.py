"""What the file system is doing, for ``dssefs status`` and systemd's ``STATUS=`` line.

:class:`Activity` counts errors handed to applications (by errno, with the last few as one-line
records naming the operation and object: never file contents), stores in progress and stores done.
:func:`snapshot` adds the cache and dirty-data figures.  Everything here runs on the trio thread
except those figures: they need the cache lock, so they are read in a worker thread.
"""

from __future__ import annotations

import collections
import errno
import time

import trio


class Activity:
    RECENT = 20

    def __init__(self) -> None:
        self.started = time.time()
        self.errors = 0
        self.errors_by_errno: collections.Counter[str] = collections.Counter()
        self.recent: collections.deque[dict] = collections.deque(maxlen=self.RECENT)
        self.flushes_in_flight = 0
        self.flushes_done = 0
        self.flush_failures = 0
        # versions sealed while written (fs/writebehind.py), by kind ("write_behind": uploaded
        # to a staging key; "sealed_ahead": sealed in memory): begun, stored by their close,
        # abandoned (stored the ordinary way)
        self.streams = {kind: {"started": 0, "stored": 0, "abandoned": 0}
                        for kind in ("write_behind", "sealed_ahead")}

    def error(self, op: str, target: str, code: int, reason: str) -> None:
        """An error returned to an application (expected ones such as ENOENT are not counted)."""
        name = errno.errorcode.get(code, str(code))
        self.errors += 1
        self.errors_by_errno[name] += 1
        self.recent.append({"time": round(time.time(), 3), "op": op, "object": target, "errno": name,
                            "reason": " ".join(reason.split())[:300]})


def unsaved_bytes(nodes) -> int:
    """Bytes written to ``nodes`` and not stored yet.  Takes the cache lock, which a worker may
    hold while it spills to disk: call it from a worker thread, never on the event loop."""
    return sum(n.content.dirty_bytes() for n in nodes if n.content is not None)


async def dirty_figures(fs) -> tuple[int, int]:
    """(files, bytes) not stored yet."""
    nodes = fs.dirty_inodes()
    return len(nodes), (await trio.to_thread.run_sync(unsaved_bytes, nodes) if nodes else 0)


async def snapshot(fs) -> dict:
    """Plain-data state of a :class:`~dssefs.fs.Filesystem` (no secrets, no file contents)."""
    act: Activity = fs.activity
    nodes = fs.dirty_inodes()
    cache, dirty_bytes = await trio.to_thread.run_sync(lambda: (fs.cache.stats(), unsaved_bytes(nodes)))
    spill = fs.cache.spill_area
    return {
        "uptime_s": round(time.time() - act.started, 1),
        "cache": {**cache, "spill_bytes_written": spill.bytes_written if spill else 0},
        "dirty": {"files": len(nodes), "bytes": dirty_bytes},
        "flushes": {"in_flight": act.flushes_in_flight, "done": act.flushes_done,
                    "failed": act.flush_failures},
        **{kind: dict(counts) for kind, counts in act.streams.items()},
        "open_files": len(fs.handles),
        "inodes": len(fs.table.by_ino),
        "errors": {"total": act.errors, "by_errno": dict(act.errors_by_errno), "recent": list(act.recent)},
    }
