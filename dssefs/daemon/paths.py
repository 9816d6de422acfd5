"""Where a mount's runtime files live: pid file, exit status, log, control socket, spill area."""

from __future__ import annotations

import hashlib
import os

from ..session import xdg_dir


def runtime_dir() -> str:
    if os.geteuid() == 0:
        base = "/run/dssefs"
    else:
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        base = os.path.join(xdg, "dssefs") if xdg else f"/tmp/dssefs-{os.geteuid()}"
    return base


def log_file(mountpoint: str) -> str:
    """Where a daemonized mount logs (unless started by systemd, which keeps stderr)."""
    return pid_file(mountpoint)[:-4] + ".log"


def pid_file(mountpoint: str) -> str:
    digest = hashlib.sha256(mountpoint.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    base = os.path.basename(mountpoint.rstrip("/")) or "root"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in base)[:40]
    return os.path.join(runtime_dir(), f"{safe}-{digest}.pid")


def default_spill_dir(mountpoint: str) -> str:
    if os.geteuid() == 0:
        base = "/var/cache/dssefs"
    else:
        base = xdg_dir("XDG_CACHE_HOME", ".cache")
    return os.path.join(base, "spill-" + hashlib.sha256(mountpoint.encode()).hexdigest()[:16])


