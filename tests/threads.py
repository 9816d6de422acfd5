"""Running a test's worker function in several threads at once."""

from __future__ import annotations

import threading
from typing import Callable, Iterable


def run_in_threads(target: Callable, args: Iterable) -> None:
    """Start ``target(arg)`` in one thread per element of ``args`` and wait for all of them."""
    threads = [threading.Thread(target=target, args=(a,)) for a in args]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
