"""Process-wide protection of the secrets a dssefs process holds in memory.

Every dssefs command may hold plaintext, data keys, epoch keys or keyring master keys in memory.
A core dump would write them to disk in the clear (the shell's ``ulimit -c unlimited`` or a
``core_pattern`` pipe would do it on any crash), and a same-user debugger could read them. So the
first thing every command does is :func:`forbid_core_dumps`: ``RLIMIT_CORE`` 0 (soft and hard,
so nothing in the process can raise it again) and ``PR_SET_DUMPABLE`` 0 (no core even through a
``core_pattern`` pipe, no ``ptrace`` attach by other processes of the same user, ``/proc/PID``
files owned by root).  Both survive ``fork``; the daemonized mount inherits them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import signal

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3
PR_SET_PDEATHSIG = 1


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def forbid_core_dumps() -> None:
    """Never raises: a platform without prctl still gets the resource limit."""
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError):  # pragma: no cover - the hard limit can always be lowered
        pass
    try:
        _libc().prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def die_with_parent() -> None:
    """Linux: SIGTERM this process when the thread that started it ends (``PR_SET_PDEATHSIG``;
    a daemon's helper started from its main thread ends with the daemon).  Exits at once if that
    parent is already gone."""
    parent = os.getppid()
    try:
        _libc().prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(0)


def dumpable() -> int:
    """The process's dumpable flag (0 after :func:`forbid_core_dumps`)."""
    return int(_libc().prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))
