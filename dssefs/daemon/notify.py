"""systemd's notify protocol (sd_notify(3)) with the standard library only.

``$NOTIFY_SOCKET`` names a datagram socket: a path, or ``@name`` for the abstract namespace.
Messages are newline-separated ``KEY=VALUE`` lines.  The daemon sends ``READY=1`` once the mount
answers, ``STATUS=`` lines while it serves, ``STOPPING=1`` when asked to stop,
``EXTEND_TIMEOUT_USEC=`` while a long flush makes progress, and ``WATCHDOG=1`` from its event
loop when the unit sets ``WatchdogSec=`` (``$WATCHDOG_USEC``).  Without ``$NOTIFY_SOCKET`` every
call is a no-op, so the same code runs under systemd, from fstab and by hand.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Mapping

log = logging.getLogger("dssefs.daemon")


def sd_notify(message: str, env: Mapping[str, str] | None = None) -> bool:
    """Send one notification; False when there is no socket or it cannot be reached."""
    addr = (os.environ if env is None else env).get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(message.encode("utf-8", "replace"))
        return True
    except OSError as e:
        log.debug("event=sd_notify_failed reason=%s", e)
        return False


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``$WATCHDOG_USEC``, as sd_watchdog_enabled(3)
    advises), or None when no watchdog is set for this process."""
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid.strip() != str(os.getpid())):
        return None
    return usec / 2e6


class Notifier:
    """The messages one daemon sends; every method is safe to call without systemd."""

    def __init__(self, env: Mapping[str, str] | None = None):
        self.env = dict(os.environ if env is None else env)
        self.enabled = bool(self.env.get("NOTIFY_SOCKET"))
        self.watchdog = watchdog_interval(self.env)
        self._last_status: str | None = None

    def send(self, *lines: str) -> bool:
        return self.enabled and sd_notify("\n".join(lines), self.env)

    def ready(self, status: str) -> None:
        self._last_status = status
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, text: str) -> None:
        """A ``STATUS=`` line, sent only when it changed."""
        if text != self._last_status:
            self._last_status = text
            self.send(f"STATUS={text}")

    def stopping(self, status: str) -> None:
        self._last_status = status
        self.send("STOPPING=1", f"STATUS={status}")

    def extend_timeout(self, seconds: float) -> None:
        """Give the current phase (start or stop) ``seconds`` more from now."""
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def ping(self) -> None:
        self.send("WATCHDOG=1")
