"""Where a mount's runtime files live: pid file, exit status, log, control socket, spill area."""

from __future__ import annotations

import errno
import hashlib
import os
import stat

from ..errors import DssefsError
from ..session import xdg_dir


def runtime_dir() -> str:
    if os.geteuid() == 0:
        base = "/run/dssefs"
    else:
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        base = os.path.join(xdg, "dssefs") if xdg else f"/tmp/dssefs-{os.geteuid()}"
    return base


def ensure_runtime_dir() -> str:
    """Create the runtime directory if needed and make sure nobody else controls it: a directory
    another user owns or may write to could hold a fake control socket or a symlinked pid file."""
    base = runtime_dir()
    os.makedirs(base, mode=0o755 if os.geteuid() == 0 else 0o700, exist_ok=True)
    st = os.lstat(base)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        hint = "" if os.geteuid() == 0 else " (or set $XDG_RUNTIME_DIR)"
        raise DssefsError(f"runtime directory {base} is not a directory owned by this user: remove it{hint}",
                          errno=errno.EACCES)
    if st.st_mode & 0o022:  # ours, made under a permissive umask: close it
        os.chmod(base, stat.S_IMODE(st.st_mode) & ~0o022)
    return base


def start_time(pid: int) -> str | None:
    """When process ``pid`` started (field 22 of /proc/PID/stat, clock ticks since boot), or None
    if there is no such process.  A pid and its start time name one process, even after reuse."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if not fields or fields[0] == "Z":
        return None
    return fields[19] if len(fields) > 19 else None


def write_pid_file(path: str, mountpoint: str) -> None:
    pid = os.getpid()
    with open(path, "w") as f:
        f.write(f"{pid}\n{mountpoint}\n{start_time(pid) or ''}\n")


def alive(pid: int, started: str | None) -> bool:
    """Whether the process recorded as (``pid``, ``started``) still runs (not a zombie, and not
    another program that was given the same pid since)."""
    now = start_time(pid)
    if now is None:
        return False
    if started is not None:
        return now == started
    try:  # a record without a start time: at least the program must be dssefs
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"dssefs" in f.read()
    except OSError:
        return False


def read_pid_file(mountpoint: str) -> tuple[int, str | None] | None:
    """(pid, start time or None) as the pid file for ``mountpoint`` records them, if it does."""
    try:
        with open(pid_file(mountpoint)) as f:
            lines = f.read().split("\n")
        pid = int(lines[0].strip())
    except (OSError, ValueError):
        return None
    return pid, (lines[2].strip() or None) if len(lines) > 2 else None


def recorded_daemon(mountpoint: str) -> tuple[int, str | None] | None:
    """(pid, start time) of the live daemon the pid file names for ``mountpoint``, if any."""
    record = read_pid_file(mountpoint)
    return record if record is not None and alive(*record) else None


def forget_gone_daemon(mountpoint: str) -> None:
    """Remove the pid file and control socket of a daemon that no longer runs (killed: nothing
    removed them), keeping those of a newer daemon that took the mount point meanwhile."""
    record = read_pid_file(mountpoint)
    if record is None or alive(*record):
        return
    remove_if_mine(pid_file(mountpoint), record[0])
    if recorded_daemon(mountpoint) is None:
        try:
            os.unlink(control_socket(mountpoint))
        except OSError:
            pass


def remove_if_mine(path: str, pid: int) -> None:
    """Remove the pid file ``path`` if it still names ``pid`` (a newer daemon may own it now)."""
    try:
        with open(path) as f:
            if f.readline().strip() != str(pid):
                return
        os.unlink(path)
    except (OSError, ValueError):
        pass


def control_socket(mountpoint: str) -> str:
    """Where the daemon serving ``mountpoint`` answers 'dssefs status'."""
    return pid_file(mountpoint)[:-4] + ".sock"


def log_file(mountpoint: str) -> str:
    """Where a daemonized mount logs (unless started by systemd, which keeps stderr)."""
    return pid_file(mountpoint)[:-4] + ".log"


def pid_file(mountpoint: str) -> str:
    digest = hashlib.sha256(mountpoint.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    base = os.path.basename(mountpoint.rstrip("/")) or "root"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in base)[:40]
    return os.path.join(runtime_dir(), f"{safe}-{digest}.pid")


def default_journal_dir(mountpoint: str) -> str:
    """The write-back journal of a mount point: persistent (a crash's entries are uploaded by the
    next mount on it), unlike the spill area."""
    if os.geteuid() == 0:
        base = "/var/lib/dssefs"
    else:
        base = xdg_dir("XDG_STATE_HOME", os.path.join(".local", "state"))
    return os.path.join(base, "journal-" + hashlib.sha256(os.path.abspath(mountpoint).encode()).hexdigest()[:16])


def default_spill_dir(mountpoint: str) -> str:
    if os.geteuid() == 0:
        base = "/var/cache/dssefs"
    else:
        base = xdg_dir("XDG_CACHE_HOME", ".cache")
    return os.path.join(base, "spill-" + hashlib.sha256(mountpoint.encode()).hexdigest()[:16])


