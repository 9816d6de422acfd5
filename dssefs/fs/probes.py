"""Metadata requests (probes of names, listings of directories) with priorities and a bound.

Every probe and listing the namespace code makes goes through one :class:`MetaScheduler`:

* at most ``slots`` requests run at once, plus ``reserve`` more that only lookups may use, so a
  lookup never queues behind the probes of a big directory or behind read-ahead;
* queued requests start highest priority first: lookups, then the entries a ``readdir`` is
  returning, then read-ahead (ordered among themselves by the caller, e.g. in the order a tree
  walk will reach them);
* one request per key runs at a time: a second caller of the same key (a lookup of a name whose
  probe is queued or running for a listing) waits for that answer instead of asking again, and a
  higher priority moves a queued request up;
* background requests start only while the owner's gate allows (a budget of results not yet
  used), and queued ones can be dropped when nobody is going to use them.

Requests run in worker threads under a limiter of their own (not the data I/O limiter), so file
reads and writes do not wait for probes either.  Everything else runs on the trio thread.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import logging
from typing import Any, Callable, Hashable

import trio

from .common import fail

log = logging.getLogger("dssefs.fs")

#: priorities (lower runs first); read-ahead appends its own order: ``(AHEAD, order...)``
LOOKUP = (0,)
READDIR = (1,)
NEXT = (2,)
AHEAD = 3


def is_background(prio: tuple) -> bool:
    return prio >= NEXT


class Job:
    __slots__ = ("key", "fn", "prio", "state", "done", "result", "error", "started", "on_done", "skip")

    def __init__(self, key: Hashable, fn: Callable[[], Any], prio: tuple, on_done, skip=None):
        self.key, self.fn, self.prio, self.on_done, self.skip = key, fn, prio, on_done, skip
        self.state = "queued"  # -> "running" -> "done" (or "dropped" while queued)
        self.done = trio.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.started = 0.0  # trio.current_time() when the request was sent

    @property
    def background(self) -> bool:
        return is_background(self.prio)


class MetaScheduler:
    def __init__(self, slots: int, reserve: int, gate: Callable[[], bool] | None = None):
        self.slots = max(1, slots)
        self.reserve = max(0, reserve)
        self.threads = trio.CapacityLimiter(self.slots + self.reserve)
        self.gate = gate or (lambda: True)
        self.running = 0
        self.running_background = 0
        self.peak = 0  # most requests in flight at once (status, tests)
        self.started_total = 0
        self._heap: list[tuple[tuple, int, Job]] = []
        self._seq = itertools.count()
        self._jobs: dict[Hashable, Job] = {}

    def __len__(self) -> int:
        return len(self._jobs)

    def job(self, key: Hashable) -> Job | None:
        return self._jobs.get(key)

    def submit(self, key: Hashable, fn: Callable[[], Any], prio: tuple, on_done=None, skip=None) -> Job:
        """Queue ``fn`` (blocking; run in a worker thread) under ``key`` unless a request of that
        key is queued or running already; a queued one is moved up to ``prio`` if that is higher.
        ``on_done(job)`` runs on the trio thread when a new request finishes.  ``skip()``, asked
        when a background request is due to start, drops it if it has become needless."""
        job = self._jobs.get(key)
        if job is None:
            job = Job(key, fn, prio, on_done, skip)
            self._jobs[key] = job
            heapq.heappush(self._heap, (prio, next(self._seq), job))
        elif job.state == "queued" and prio < job.prio:
            job.prio = prio
            heapq.heappush(self._heap, (prio, next(self._seq), job))
        self.pump()
        return job

    async def run(self, key: Hashable, fn: Callable[[], Any], prio: tuple) -> tuple[Any, float]:
        """``(result, time it was sent)`` of the request ``key`` (joining one queued or running);
        its exception is raised."""
        job = self.submit(key, fn, prio)
        await job.done.wait()
        if job.error is not None:
            if isinstance(job.error, Exception):
                raise job.error
            raise fail(errno.EIO, "metadata request interrupted")
        return job.result, job.started

    def drop_background(self) -> int:
        """Forget every queued background request (nobody waits for them)."""
        dropped = 0
        for key, job in list(self._jobs.items()):
            if job.state == "queued" and job.background:
                job.state = "dropped"
                del self._jobs[key]
                job.done.set()
                dropped += 1
        if dropped:
            self._heap = [e for e in self._heap if e[2].state == "queued"]
            heapq.heapify(self._heap)
        return dropped

    def pump(self) -> None:
        """Start queued requests while there is room."""
        heap = self._heap
        while heap:
            prio, _seq, job = heap[0]
            if job.state != "queued" or prio != job.prio:
                heapq.heappop(heap)  # started, dropped, or moved up (another entry holds it)
                continue
            room = self.slots + self.reserve if prio <= LOOKUP else self.slots
            if self.running >= room:
                return
            if job.background:
                if job.skip is not None and job.skip():
                    heapq.heappop(heap)
                    job.state = "dropped"
                    del self._jobs[job.key]
                    job.done.set()
                    continue
                if not self.gate():
                    return
            heapq.heappop(heap)
            job.state = "running"
            self.running += 1
            if job.background:
                self.running_background += 1
            self.peak = max(self.peak, self.running)
            self.started_total += 1
            trio.lowlevel.spawn_system_task(self._exec, job, name="dssefs-metadata")

    async def _exec(self, job: Job) -> None:
        background = job.background
        job.started = trio.current_time()
        try:
            job.result = await trio.to_thread.run_sync(job.fn, limiter=self.threads, abandon_on_cancel=False)
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits for it
            job.error = e
        finally:
            self.running -= 1
            if background:
                self.running_background -= 1
            job.state = "done"
            if self._jobs.get(job.key) is job:
                del self._jobs[job.key]
            job.done.set()
        if job.on_done is not None and isinstance(job.error, (Exception, type(None))):
            try:
                job.on_done(job)
            except Exception:  # noqa: BLE001 - a system task must not crash the mount
                log.exception("event=metadata_callback_failed key=%r", job.key)
        if job.error is not None and not isinstance(job.error, Exception):
            raise job.error  # cancelled at shutdown
        try:
            self.pump()
        except Exception:  # noqa: BLE001
            log.exception("event=metadata_pump_failed")
