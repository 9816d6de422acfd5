"""The template unit's Exec lines run under the unit's own hardening (emulated by
tests/unit_sandbox.py: capability bounding set, no_new_privs, MDWE, the syscall allow-list and
address families): the daemon mounts, serves every kind of operation, answers status, stops
cleanly on SIGTERM, and the pre/post hooks clear a dead mount left by a SIGKILL."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fuse_fixtures import dssefs_executable, force_unmount, mounted, requires_fuse
from test_daemon_service import Listener
from unit_sandbox import exec_line, sandboxed, service_settings

from dssefs.daemon.control import control_socket, query
from dssefs.daemon.paths import pid_file

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "dssefs@.service"
INSTALLED = "/usr/local/bin/dssefs"

pytestmark = [pytest.mark.fuse, requires_fuse,
              pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="needs systemd-analyze")]


@pytest.fixture
def unit(tmp_path, local_source):
    """(settings, exec lines, mountpoint) of the template instantiated for tmp_path/mnt, with the
    installed paths pointed at this checkout and /etc/dssefs at tmp_path/etc."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    instance = subprocess.run(["systemd-escape", "--path", str(mnt)], capture_output=True, text=True,
                              check=True).stdout.strip()
    etc = tmp_path / "etc"
    etc.mkdir()
    source, args = local_source
    keyring = args[args.index("--keyring") + 1]
    (etc / f"{instance}.toml").write_text(
        f'name = "hardened"\nsource = "{source}"\nkeyring = "{keyring}"\nspill_dir = "{tmp_path / "spill"}"\n')
    text = UNIT.read_text().replace(INSTALLED, dssefs_executable()).replace("/etc/dssefs/", f"{etc}/")
    text = text.replace("%i", instance).replace("%f", str(mnt))
    settings = service_settings(text)
    yield settings, mnt
    force_unmount(mnt)


def run_hook(settings, key: str) -> subprocess.CompletedProcess:
    (line,) = settings[key]
    return subprocess.run(sandboxed(settings, exec_line(line)), capture_output=True, text=True, timeout=60)


def start(settings, listener: Listener, log: Path) -> subprocess.Popen:
    (line,) = settings["ExecStart"]
    with open(log, "ab") as f:
        proc = subprocess.Popen(sandboxed(settings, exec_line(line)), stdout=f, stderr=f,
                                env={**os.environ, "NOTIFY_SOCKET": listener.address}, start_new_session=True)
    listener.wait_for("READY=1", 30, proc)
    return proc


def test_daemon_works_under_the_units_hardening(unit, tmp_path):
    settings, mnt = unit
    assert settings["Type"] == ["notify"] and settings["SystemCallFilter"]
    assert run_hook(settings, "ExecStartPre").returncode == 0  # nothing to clear
    listener = Listener(tmp_path)
    log = tmp_path / "daemon.log"
    proc = start(settings, listener, log)
    try:
        assert mounted(mnt)
        status = Path(f"/proc/{proc.pid}/status").read_text()
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        assert fields["NoNewPrivs"].strip() == "1" and fields["Seccomp"].strip() == "2"
        assert int(fields["CapBnd"], 16) == 1 << 21 and int(fields["CapEff"], 16) == 1 << 21  # CAP_SYS_ADMIN

        # every kind of operation: small and large files (multipart, O_DIRECT, fallocate),
        # directories, rename, symlink, xattrs, truncate, delete
        big = os.urandom(12 << 20)
        (mnt / "dir" / "sub").mkdir(parents=True)
        (mnt / "dir" / "sub" / "big.bin").write_bytes(big)
        (mnt / "small.txt").write_text("hello")
        os.rename(mnt / "small.txt", mnt / "dir" / "renamed.txt")
        os.symlink("renamed.txt", mnt / "dir" / "link")
        os.setxattr(mnt / "dir" / "renamed.txt", "user.k", b"v")
        os.truncate(mnt / "dir" / "sub" / "big.bin", 5 << 20)
        assert (mnt / "dir" / "link").read_text() == "hello"
        assert os.getxattr(mnt / "dir" / "renamed.txt", "user.k") == b"v"
        assert (mnt / "dir" / "sub" / "big.bin").read_bytes() == big[:5 << 20]
        os.chmod(mnt / "dir" / "renamed.txt", 0o600)
        os.unlink(mnt / "dir" / "link")
        report = query(str(mnt))
        assert report["name"] == "hardened" and report["errors"]["total"] == 0, report["errors"]

        proc.send_signal(signal.SIGTERM)  # KillMode=mixed: SIGTERM to the main process
        listener.wait_for("STOPPING=1", 30, proc)
        assert proc.wait(60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not mounted(mnt)
    assert "EPERM" not in log.read_text() and "Operation not permitted" not in log.read_text()

    # the stored tree survives a restart (under the same hardening)
    proc = start(settings, listener, log)
    try:
        assert (mnt / "dir" / "sub" / "big.bin").read_bytes() == big[:5 << 20]
        assert oct(os.stat(mnt / "dir" / "renamed.txt").st_mode & 0o777) == "0o600"
        # a killed daemon leaves a dead mount; the stop hook clears it, the start hook is a no-op
        proc.kill()
        proc.wait(10)
        with pytest.raises(OSError):
            os.listdir(mnt)
        r = run_hook(settings, "ExecStopPost")
        assert r.returncode == 0, r.stderr
        assert not mounted(mnt)
        os.listdir(mnt)
        # and the killed daemon's runtime files are gone with its mount
        assert not os.path.exists(pid_file(str(mnt))) and not os.path.exists(control_socket(str(mnt)))
    finally:
        if proc.poll() is None:
            proc.kill()
    listener.close()


def test_the_sandbox_really_restricts(unit, tmp_path):
    """The emulation can fail: a syscall outside the filter, a capability outside the set."""
    settings, _ = unit
    code = ("import ctypes, errno, os, socket\n"
            "try:\n    os.chroot('/')\nexcept PermissionError: print('chroot refused')\n"  # CAP_SYS_CHROOT dropped
            "try:\n    socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\n"
            "except PermissionError: print('packet socket refused')\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "r = libc.syscall(246, 0, 0, 0, 0)\n"  # kexec_load: not in @system-service
            "print('kexec refused' if r == -1 and ctypes.get_errno() == errno.EPERM else 'kexec allowed')\n"
            "print('mdwe', libc.prctl(66, 0, 0, 0, 0))\n")
    r = subprocess.run(sandboxed(settings, [sys.executable, "-c", code]), capture_output=True, text=True,
                       timeout=60)
    assert r.stdout.split("\n")[:4] == ["chroot refused", "packet socket refused", "kexec refused", "mdwe 1"], \
        r.stdout + r.stderr
    _ = time
