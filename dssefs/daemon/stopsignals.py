"""SIGTERM, SIGINT and SIGHUP for the daemon's whole life, not only while its event loop runs.

The handlers are installed before anything is mounted and stay until the process exits:

* before the mount exists a stop signal aborts the start (:class:`StartInterrupted`): nothing to
  store, nothing to unmount;
* from just before mount(2) on it is recorded, and the event loop picks it up through a pipe
  (:meth:`StopSignals.wait`): store the dirty files, unmount, exit 0;
* after the last flush further signals are counted, and ignored once the daemon has unmounted.

A handler of trio's own (``open_signal_receiver``) would be removed when the event loop ends, and
SIGINT would then raise KeyboardInterrupt, or SIGTERM kill the process, in the middle of the final
unmount; a signal mask cannot help either, because threads started while it is open keep receiving
signals.
"""

from __future__ import annotations

import os
import signal

import trio

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class StartInterrupted(BaseException):  # not swallowed by 'except Exception' on the way
    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} before the mount existed")
        self.signum = signum


class StopSignals:
    def __init__(self) -> None:
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.pending: list[int] = []
        self.armed = False  # False: a signal aborts the start
        self.count = 0

    def install(self) -> "StopSignals":
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handler)
        return self

    def arm(self) -> None:
        """From now on signals are recorded (call right before mounting)."""
        self.armed = True

    def _handler(self, signum: int, frame) -> None:  # runs in the main thread, between bytecodes
        self.count += 1
        if not self.armed:
            raise StartInterrupted(signum)
        self.pending.append(signum)
        try:
            os.write(self._w, b"s")
        except BlockingIOError:
            pass

    def ignore(self) -> None:
        """Nothing is left to stop: ignore further signals (Python's shutdown would otherwise put
        back the default action, and a late SIGINT would end the process by signal, not exit 0)."""
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)

    async def wait(self) -> int:
        """The next stop signal (recorded ones first)."""
        while not self.pending:
            await trio.lowlevel.wait_readable(self._r)
            try:
                os.read(self._r, 4096)
            except BlockingIOError:
                pass
        return self.pending.pop(0)
