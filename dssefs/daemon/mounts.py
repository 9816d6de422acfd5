"""The kernel's view of mount points: /proc/self/mountinfo entries, live or dead FUSE mounts."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import threading

log = logging.getLogger("dssefs.daemon")

FUSERMOUNT_CANDIDATES = ("/usr/bin/fusermount3", "/bin/fusermount3", "/usr/local/bin/fusermount3",
                         "/usr/bin/fusermount", "/bin/fusermount")


def fusermount() -> str:
    for path in FUSERMOUNT_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return "fusermount3"


def _unescape(field: str) -> str:
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) + 0 and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_entries(mountpoint: str) -> list[dict]:
    """Entries of /proc/self/mountinfo whose mount point is ``mountpoint``."""
    out = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                parts, rparts = left.split(), right.split()
                if len(parts) >= 5 and _unescape(parts[4]) == mountpoint:
                    out.append({"devno": parts[2], "fstype": rparts[0] if rparts else "",
                                "source": _unescape(rparts[1]) if len(rparts) > 1 else ""})
    except OSError:
        pass
    return out


DEAD = (errno.ENOTCONN, errno.ECONNABORTED, errno.ECONNREFUSED)


def mount_state(mountpoint: str, timeout: float = 2.0) -> str:
    """``none``, ``live`` (a FUSE file system answers, or is busy) or ``dead`` (its daemon is
    gone: ENOTCONN).  ``stat`` alone cannot tell: the kernel answers it from cached attributes for
    a while after the daemon died, so a statfs, which always reaches the daemon, decides.  A daemon
    that does not answer within ``timeout`` seconds counts as live (hung, not dead)."""
    entries = [e for e in mount_entries(mountpoint) if e["fstype"].startswith("fuse")]
    if not entries:
        return "none"
    result: dict[str, int] = {}

    def probe() -> None:
        try:
            os.stat(mountpoint)
            os.statvfs(mountpoint)
            result["errno"] = 0
        except OSError as e:
            result["errno"] = e.errno or 0

    worker = threading.Thread(target=probe, name="dssefs-mount-probe", daemon=True)
    worker.start()
    worker.join(timeout)
    return "dead" if result.get("errno") in DEAD else "live"


def clear_dead(mountpoint: str, attempts: int = 8) -> bool:
    """Lazily unmount dead FUSE mounts at ``mountpoint`` (crashes may have stacked several; a live
    one is never touched); True when no dead mount is left."""
    for _ in range(attempts):
        if mount_state(mountpoint) != "dead":
            return True
        log.warning("event=dead_mount mountpoint=%s action='%s -uz' reason='left by a daemon that died'",
                    mountpoint, fusermount())
        subprocess.run([fusermount(), "-uz", mountpoint], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)
    return mount_state(mountpoint) != "dead"
