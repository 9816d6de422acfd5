"""Reusable fixtures that mount dssefs for real (FUSE) in a subprocess.

``Mount`` runs ``python -m dssefs mount SOURCE MOUNTPOINT --foreground ...`` and waits until the
mount shows up in /proc/self/mountinfo and answers (failing fast if the daemon exits).  Teardown
always unmounts: SIGTERM and wait, then ``fusermount3 -u``, then ``-uz``, then SIGKILL.

Fixtures:
* ``local_mount`` - a local store + keyring in tmp_path, mounted at tmp_path/mnt;
* ``s3_mount``    - a fresh moto bucket + KMS key, mounted at tmp_path/mnt.
Both yield a started :class:`Mount`; call ``.remount()`` or start a second ``Mount`` on the same
source (``Mount.like(other, name)``) for cross-mount tests.  ``mount_factory(mnt, source, *args,
env=...)`` makes more (cleaned up at teardown); ``local_source`` / ``s3_source`` give the
``(source, args)`` the two fixtures use.  A bare ``Mount().start(source, mnt, *opts, env=...)``
works too; call ``.cleanup()`` in a ``finally``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import socket
import uuid
from pathlib import Path

import pytest

FUSERMOUNT = shutil.which("fusermount3") or "/usr/bin/fusermount3"


def fuse_available() -> bool:
    return os.path.exists("/dev/fuse") and os.geteuid() == 0 and os.path.exists(FUSERMOUNT)


requires_fuse = pytest.mark.skipif(not fuse_available(), reason="needs /dev/fuse, root and fusermount3")


def _unescape(field: str) -> str:
    import re
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounted(path: str | os.PathLike) -> list[str]:
    """fstypes of the mounts exactly at ``path``."""
    path = os.path.abspath(path)
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            parts = left.split()
            if len(parts) >= 5 and _unescape(parts[4]) == path:
                out.append(right.split()[0])
    return out


def mount_ids(path: str | os.PathLike) -> set[str]:
    """mountinfo ids of the mounts exactly at ``path`` (a new mount gets a new id)."""
    path = os.path.abspath(path)
    out = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split(" - ")[0].split()
            if len(parts) >= 5 and _unescape(parts[4]) == path:
                out.add(parts[0])
    return out


def force_unmount(path: str | os.PathLike) -> None:
    for _ in range(5):
        if not mounted(path):
            return
        r = subprocess.run([FUSERMOUNT, "-u", str(path)], capture_output=True)
        if r.returncode != 0:
            subprocess.run([FUSERMOUNT, "-uz", str(path)], capture_output=True)
        time.sleep(0.05)


def dssefs_executable() -> str:
    """The dssefs script of the environment running the tests (what units and mount(8) run)."""
    beside = Path(sys.executable).parent / "dssefs"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("dssefs")
    if not found:
        pytest.skip("no dssefs executable installed next to the test interpreter or on PATH")
    return os.path.abspath(found)


def daemons(mnt: Path) -> list[int]:
    """pids of dssefs daemons serving ``mnt`` (their command line names it)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if str(mnt).encode() in argv and any(b"dssefs" in a for a in argv):
            pids.append(int(entry))
    return pids


@pytest.fixture
def mnt(tmp_path):
    """An empty directory tmp_path/mnt; afterwards nothing is mounted there and no daemon serves it."""
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    force_unmount(path)
    for pid in daemons(path):  # only daemons serving this test's own mount point
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Mount:
    """One dssefs mount served by a foreground daemon subprocess."""

    def __init__(self, mountpoint: str | os.PathLike | None = None, source: str | None = None,
                 args: list[str] | tuple = (), env: dict[str, str] | None = None,
                 log_dir: str | os.PathLike | None = None, cwd: str | os.PathLike | None = None):
        """``cwd``: the daemon's working directory (default: this process's).  ``python -m``
        puts it first on the daemon's ``sys.path``, ahead of ``PYTHONPATH``: a benchmark that
        compares another tree through ``PYTHONPATH`` runs the daemon outside the project."""
        self.mountpoint = Path(mountpoint) if mountpoint is not None else None
        self.cwd = cwd
        self.source = source
        self.args = list(args)
        self.env = dict(env or {})
        self._log_dir = Path(log_dir) if log_dir is not None else None
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self.runs = 0
        self.returncode: int | None = None

    @classmethod
    def like(cls, other: "Mount", name: str, *extra: str) -> "Mount":
        """Another mount of the same source and options at a sibling directory ``name``."""
        mnt = other.mountpoint.parent / name
        return cls(mnt, other.source, other.args + list(extra), other.env, other._log_dir, other.cwd)

    def path(self, *parts: str) -> Path:
        return self.mountpoint.joinpath(*parts)

    def __truediv__(self, part: str) -> Path:
        return self.mountpoint / part

    def command(self) -> list[str]:
        return [sys.executable, "-m", "dssefs", "mount", self.source, str(self.mountpoint),
                "--foreground", *self.args]

    @property
    def log_dir(self) -> Path:
        return self._log_dir or self.mountpoint.parent

    def start(self, source: str | None = None, mnt: str | os.PathLike | None = None, *opts: str,
              env: dict[str, str] | None = None, timeout: float = 30.0) -> "Mount":
        """Mount ``source`` on ``mnt`` with command-line ``opts`` (each defaults to what this
        Mount was created or last started with) and wait until it answers; returns self."""
        if source is not None:
            self.source = source
        if mnt is not None:
            self.mountpoint = Path(mnt)
        if opts:
            self.args = list(opts)
        if env is not None:
            self.env.update(env)
        extra: tuple[str, ...] = ()
        try:
            self.mountpoint.mkdir(parents=True)
        except OSError:
            pass  # exists (possibly as a dead mount, which the daemon clears)
        self.runs += 1
        self.log_path = self.log_dir / f"{self.mountpoint.name}-daemon-{self.runs}.log"
        env = dict(os.environ)
        env.update(self.env)
        notify = None
        if "NOTIFY_SOCKET" not in env:  # readiness exactly as systemd sees it (READY=1)
            notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            name = f"dssefs-test-{os.getpid()}-{uuid.uuid4().hex[:12]}"
            notify.bind("\0" + name)
            notify.setblocking(False)
            env["NOTIFY_SOCKET"] = "@" + name
        before = mount_ids(self.mountpoint)
        try:
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(self.command() + list(extra), stdout=log, stderr=log, env=env,
                                             cwd=self.cwd, start_new_session=True)
            deadline = time.monotonic() + timeout
            ready = False
            while True:
                if self.proc.poll() is not None:
                    self.returncode = self.proc.returncode
                    raise RuntimeError(f"dssefs exited with {self.proc.returncode} before mounting:\n{self.log()}")
                if notify is not None and not ready:
                    try:
                        ready = b"READY=1" in notify.recv(4096)
                    except BlockingIOError:
                        pass
                elif notify is None:
                    ready = bool(mount_ids(self.mountpoint) - before)
                if ready and mounted(self.mountpoint):
                    try:
                        os.stat(self.mountpoint)
                        return self
                    except OSError:
                        pass
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"dssefs did not mount within {timeout} s:\n{self.log()}")
                time.sleep(0.02)
        finally:
            if notify is not None:
                notify.close()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace") if self.log_path else ""
        except OSError:
            return ""

    def status(self) -> dict:
        """``dssefs status MOUNTPOINT --json``, parsed (asserts the command succeeded)."""
        r = subprocess.run([sys.executable, "-m", "dssefs", "status", str(self.mountpoint), "--json"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 60.0) -> int:
        self.returncode = self.proc.wait(timeout)
        return self.returncode

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (flush + unmount), wait; then make sure nothing is left mounted."""
        rc = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                force_unmount(self.mountpoint)
                self.kill()
        elif self.proc is not None:
            rc = self.proc.returncode
        force_unmount(self.mountpoint)
        self.returncode = rc
        return rc

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def remount(self, *opts: str) -> "Mount":
        """Clean stop (asserts exit status 0), then start again (optionally with new options)."""
        rc = self.stop()
        assert rc == 0, f"dssefs exited with {rc}:\n{self.log()}"
        return self.start(None, None, *opts)

    def cleanup(self) -> None:
        if self.mountpoint is None:
            return
        try:
            self.stop(timeout=30)
        finally:
            self.kill()
            force_unmount(self.mountpoint)


@pytest.fixture
def mount_factory(tmp_path):
    """``make(mountpoint, source, *args, env=None) -> Mount`` (not started); all are cleaned up."""
    made: list[Mount] = []

    def make(mountpoint, source, *args, env=None) -> Mount:
        m = Mount(mountpoint, source, args, env={"HOME": str(tmp_path / "home"), **(env or {})},
                  log_dir=tmp_path)
        made.append(m)
        return m

    yield make
    for m in reversed(made):
        m.cleanup()


@pytest.fixture
def local_source(tmp_path):
    """``(source, args)`` for a local store + keyring under tmp_path."""
    from dssefs.kms.local import create_keyring

    keyring = tmp_path / "keyring"
    if not keyring.exists():
        create_keyring(str(keyring))
    store = tmp_path / "store"
    store.mkdir(exist_ok=True)
    return f"file://{store}", ["--keyring", str(keyring), "--spill-dir", str(tmp_path / "spill")]


def _live_mount(tmp_path, mount_factory, source_and_args):
    """A started mount of ``(source, args)`` at tmp_path/mnt, cleaned up after the test."""
    if not fuse_available():
        pytest.skip("needs /dev/fuse, root and fusermount3")
    source, args = source_and_args
    m = mount_factory(tmp_path / "mnt", source, *args)
    m.start()
    yield m
    m.cleanup()


@pytest.fixture
def local_mount(tmp_path, mount_factory, local_source):
    yield from _live_mount(tmp_path, mount_factory, local_source)


@pytest.fixture
def s3_source(bucket, kms_key, tmp_path):
    return f"s3://{bucket}", ["--kms-key-id", kms_key, "--spill-dir", str(tmp_path / "spill")]


@pytest.fixture
def s3_mount(tmp_path, mount_factory, s3_source):
    yield from _live_mount(tmp_path, mount_factory, s3_source)


@contextlib.contextmanager
def fsync_and_close_fail(f, code: int = errno.EIO):
    """The block writes to ``f`` (an open file) and sets up a failing store; then ``fsync`` must
    fail with ``code``, and so must the ``close`` that follows (also when the block or the fsync
    check fails: the file is closed in any case)."""
    try:
        yield
        with pytest.raises(OSError) as e:
            os.fsync(f.fileno())
        assert e.value.errno == code
    finally:
        with pytest.raises(OSError) as e:
            f.close()  # the close stores again, and fails again
        assert e.value.errno == code


def file_sha256(path) -> str:
    """SHA-256 (hex) of a file's contents, read in 4 MiB blocks without Python's buffering."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while block := f.read(4 << 20):
            h.update(block)
    return h.hexdigest()
