"""What the file system is doing, for ``dssefs status`` and systemd's ``STATUS=`` line.

:class:`Activity` counts errors handed to applications (by errno, with the last few as one-line
records naming the operation and object: never file contents), stores in progress and stores done.
:func:`snapshot` adds the cache and dirty-data figures.  Everything here runs on the trio thread
except the cache figures, which take the cache lock for a moment.
"""

from __future__ import annotations

import collections
import errno
import time


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

    def error(self, op: str, target: str, code: int, reason: str) -> None:
        """An error returned to an application (expected ones such as ENOENT are not counted)."""
        name = errno.errorcode.get(code, str(code))
        self.errors += 1
        self.errors_by_errno[name] += 1
        self.recent.append({"time": round(time.time(), 3), "op": op, "object": target, "errno": name,
                            "reason": " ".join(reason.split())[:300]})


def snapshot(fs) -> dict:
    """Plain-data state of a :class:`~dssefs.fs.Filesystem` (no secrets, no file contents)."""
    act: Activity = fs.activity
    dirty = fs.dirty_inodes()
    dirty_bytes = sum(n.content.dirty_bytes() for n in dirty if n.content is not None)
    cache = fs.cache.stats()
    spill = fs.cache.spill_area
    return {
        "uptime_s": round(time.time() - act.started, 1),
        "cache": {**cache, "spill_bytes_written": spill.bytes_written if spill else 0},
        "dirty": {"files": len(dirty), "bytes": dirty_bytes},
        "flushes": {"in_flight": act.flushes_in_flight, "done": act.flushes_done,
                    "failed": act.flush_failures},
        "open_files": len(fs.handles),
        "inodes": len(fs.table.by_ino),
        "errors": {"total": act.errors, "by_errno": dict(act.errors_by_errno), "recent": list(act.recent)},
    }
