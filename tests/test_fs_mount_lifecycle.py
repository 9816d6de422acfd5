"""Mount lifecycle through the real command: daemonize, readiness, signals, crash recovery, -o form."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fuse_fixtures import Mount, mounted, requires_fuse

pytestmark = [pytest.mark.fuse, requires_fuse]


def dssefs(*args, env=None, timeout=60) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "dssefs", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def test_sigterm_flushes_open_dirty_file_and_exits_0(local_mount: Mount):
    m = local_mount
    data = os.urandom(3_000_000)
    fd = os.open(m / "open-at-exit", os.O_CREAT | os.O_WRONLY, 0o600)
    os.write(fd, data)  # not closed, not fsynced
    m.signal(signal.SIGTERM)
    assert m.wait(60) == 0, m.log()
    try:
        os.close(fd)
    except OSError:
        pass
    assert not mounted(m.mountpoint)
    assert "signal=SIGTERM" in m.log()
    m.start()
    assert (m / "open-at-exit").read_bytes() == data


def test_sigint_also_clean(local_mount: Mount):
    (local_mount / "f").write_bytes(b"x")
    local_mount.signal(signal.SIGINT)
    assert local_mount.wait(60) == 0
    assert not mounted(local_mount.mountpoint)


def test_crash_then_restart_clears_dead_mount(local_mount: Mount):
    m = local_mount
    (m / "kept").write_bytes(b"stored before the crash")
    m.kill()  # SIGKILL: the kernel keeps a dead mount (ENOTCONN)
    with pytest.raises(OSError):
        os.listdir(m.mountpoint)
    assert mounted(m.mountpoint)
    m.start()
    assert len(mounted(m.mountpoint)) == 1  # replaced, not stacked
    assert "event=dead_mount" in m.log()
    assert (m / "kept").read_bytes() == b"stored before the crash"


def test_daemonize_ready_umount(local_source, mnt, tmp_path):
    source, args = local_source
    r = dssefs("mount", source, str(mnt), *args, env={"HOME": str(tmp_path / "home")})
    assert r.returncode == 0, r.stderr
    assert mounted(mnt)  # live as soon as the command returns
    (mnt / "hello").write_bytes(b"world")
    busy = dssefs("mount", source, str(mnt), *args)
    assert busy.returncode == 1 and "busy" in busy.stderr
    u = dssefs("umount", str(mnt))
    assert u.returncode == 0, u.stderr
    assert not mounted(mnt)
    r = dssefs("mount", source, str(mnt), *args)
    assert r.returncode == 0, r.stderr
    assert (mnt / "hello").read_bytes() == b"world"
    assert dssefs("umount", str(mnt)).returncode == 0
    from dssefs.daemon.paths import pid_file

    pidf = pid_file(str(mnt))
    assert not any(os.path.exists(pidf + s) for s in ("", ".status", ".wait"))  # nothing left in /run


@pytest.mark.parametrize("case", ["bad-source", "missing-keyring", "no-mountpoint", "bad-option"])
def test_daemonize_failures_exit_1_with_one_line(case, local_source, mnt, tmp_path):
    source, args = local_source
    if case == "bad-source":
        argv = ["mount", "ftp://x/y", str(mnt), *args]
    elif case == "missing-keyring":
        argv = ["mount", source, str(mnt), "--keyring", str(tmp_path / "nope")]
    elif case == "no-mountpoint":
        argv = ["mount", source, str(tmp_path / "absent"), *args]
    else:
        argv = [source, str(mnt), "-o", "rw,no_such_option=1"]
    r = dssefs(*argv)
    assert r.returncode == 1
    errors = [ln for ln in r.stderr.splitlines() if "error" in ln.lower()]
    assert errors, r.stderr
    assert not mounted(mnt)


@pytest.mark.s3
def test_unreachable_store_fails_fast(mnt, moto_server, kms_key):
    r = dssefs("mount", "s3://nowhere-bucket", str(mnt), "--kms-key-id", kms_key,
               "--endpoint-url", "http://127.0.0.1:9", "--max-attempts", "1")
    assert r.returncode == 1
    assert "dssefs: error:" in r.stderr
    assert not mounted(mnt)


def test_mount_fuse3_form_without_path(local_source, mnt, tmp_path):
    """What mount(8) -> mount.fuse3 runs: PATH unset, HOME=/root, generic options appended."""
    source, args = local_source
    keyring = args[args.index("--keyring") + 1]
    env = {k: v for k, v in os.environ.items() if k != "PATH"}
    env["HOME"] = "/root"
    r = subprocess.run([sys.executable, "-m", "dssefs", source, str(mnt), "-o",
                        f"rw,_netdev,keyring={keyring},spill-dir={tmp_path / 'spill'},attr_timeout=2,dev,suid"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    try:
        assert mounted(mnt)
        (mnt / "via-fstab").write_bytes(b"ok")
        assert (mnt / "via-fstab").read_bytes() == b"ok"
    finally:
        u = dssefs("umount", str(mnt))
    assert u.returncode == 0, u.stderr
    assert not mounted(mnt)


def test_notify_socket_ready_and_stopping(local_source, mnt, tmp_path, mount_factory):
    source, args = local_source
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(30)
    m = mount_factory(mnt, source, *args, env={"NOTIFY_SOCKET": sock_path})
    m.start()
    msg = sock.recv(4096).decode()
    assert "READY=1" in msg
    assert mounted(mnt) and os.listdir(mnt) == []
    m.signal(signal.SIGTERM)
    assert "STOPPING=1" in sock.recv(4096).decode()
    assert m.wait(30) == 0
    assert not mounted(mnt)
    sock.close()


def test_umount_without_daemon_record_falls_back(local_mount: Mount):
    pidfiles = [f for f in os.listdir("/run/dssefs")] if os.path.isdir("/run/dssefs") else []
    assert pidfiles
    u = dssefs("umount", str(local_mount.mountpoint))
    assert u.returncode == 0, u.stderr
    assert local_mount.wait(30) == 0
    assert not mounted(local_mount.mountpoint)
    assert dssefs("umount", str(local_mount.mountpoint)).returncode == 1  # not mounted any more


def test_help_texts():
    r = dssefs("mount", "--help")
    assert r.returncode == 0 and "SOURCE" in r.stdout and "--kms-key-id" in r.stdout
    r = dssefs("umount", "--help")
    assert r.returncode == 0 and "MOUNTPOINT" in r.stdout
    _ = time


def test_default_source_creates_local_store_and_keyring(mnt, tmp_path):
    env = {"HOME": str(tmp_path / "home"), "XDG_DATA_HOME": str(tmp_path / "data"),
           "XDG_CONFIG_HOME": str(tmp_path / "config")}
    r = dssefs("mount", str(mnt), env=env)
    assert r.returncode == 0, r.stderr
    try:
        assert str(tmp_path / "data" / "dssefs" / "store") in r.stderr
        keyring = tmp_path / "config" / "dssefs" / "keyring"
        assert str(keyring) in r.stderr
        assert (os.stat(keyring).st_mode & 0o777) == 0o600
        p = mnt / "note.txt"
        p.write_bytes(b"kept locally, encrypted")
        before = os.stat(p).st_mtime_ns
        time.sleep(0.02)
        os.utime(p)  # UTIME_NOW
        assert os.stat(p).st_mtime_ns > before
    finally:
        assert dssefs("umount", str(mnt)).returncode == 0
    objects = list((tmp_path / "data" / "dssefs" / "store").rglob("note.txt*"))
    assert objects and b"kept locally" not in objects[0].read_bytes()


def test_config_file(local_source, mnt, tmp_path):
    source, args = local_source
    keyring = args[args.index("--keyring") + 1]
    cfg = tmp_path / "dssefs.toml"
    cfg.write_text(f'source = "{source}"\nkeyring = "{keyring}"\nspill_dir = "{tmp_path / "sp"}"\n'
                   'attr_timeout = 3\nfile_mode = "0600"\n')
    r = dssefs("mount", str(mnt), "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    try:
        (mnt / "from-config").write_bytes(b"1")
        assert (mnt / "from-config").read_bytes() == b"1"
    finally:
        assert dssefs("umount", str(mnt)).returncode == 0
    bad = tmp_path / "bad.toml"
    bad.write_text("no_such_key = 1\n")
    r = dssefs("mount", source, str(mnt), "--config", str(bad), *args)
    assert r.returncode == 1 and "no_such_key" in r.stderr


def test_umount_reports_files_the_daemon_could_not_store(local_source, mnt, tmp_path):
    """The daemon's exit status reaches 'dssefs umount': 1 and one line when a dirty file could
    not be stored (here the store's directory vanished), and the file is named in the log."""
    source, args = local_source
    r = dssefs("mount", source, str(mnt), *args)
    assert r.returncode == 0, r.stderr
    fd = os.open(mnt / "doomed.bin", os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        os.write(fd, b"d" * 100_000)  # dirty, not closed
        store = tmp_path / "store"
        os.rename(store, tmp_path / "store-gone")
        u = dssefs("umount", str(mnt), "--lazy")
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    assert u.returncode == 1
    assert u.stderr.count("\n") == 1 and "could not store every file" in u.stderr, u.stderr
    assert not mounted(mnt)
    from dssefs.daemon.paths import log_file, pid_file

    assert "doomed.bin" in open(log_file(str(mnt))).read()
    assert not any(os.path.exists(pid_file(str(mnt)) + s) for s in ("", ".status", ".wait"))


def test_outer_layer_libraries_are_loaded_before_the_first_file_operation(local_mount: Mount):
    """The daemon loads pycryptodome's GCM code while it starts (outer.warm_up): the first read
    or write after a mount does not wait ~25 ms for imports.  No file is touched here; its CTR
    library, which pycryptodome loads only for a first GCM cipher, is mapped all the same."""
    maps = Path(f"/proc/{local_mount.proc.pid}/maps")
    deadline = time.monotonic() + 10
    while "_raw_ctr" not in maps.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "_raw_ctr" in maps.read_text()
