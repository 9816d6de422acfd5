"""A bound on bytes held at once, reserved without waiting."""

from __future__ import annotations

import threading


class ByteBudget:
    """``take(n)`` reserves ``n`` bytes if they fit under ``limit`` and says whether it did; it
    never waits (a caller that is refused takes another path).  ``give(n)`` returns them."""

    def __init__(self, limit: int):
        if limit < 0:
            raise ValueError("a byte budget cannot be negative")
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.limit:
                return False
            self.used += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            if n > self.used:
                raise ValueError(f"returned {n} bytes, {self.used} were held")
            self.used -= n
