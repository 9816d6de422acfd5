"""Mounting through mount(8), as /etc/fstab and .mount units do.

``mount -t fuse.TYPE SOURCE DIR -o OPTIONS`` runs /sbin/mount.fuse3, which runs
``/bin/sh -c 'TYPE SOURCE DIR -o OPTIONS'`` with PATH unset after dropping _netdev, nofail,
noauto and friends (mount(8) itself drops x-*).  TYPE here is the absolute path of the dssefs
script of the test environment, linked under a path without '.' (the ``fuse./path/to/dssefs`` form
of systemd/examples/fstab; mount(8) splits the type at its last '.').
mount(8) must return 0 only once the mount answers, and a failed mount must leave nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from fuse_fixtures import daemons, dssefs_executable, mounted, requires_fuse

pytestmark = [pytest.mark.fuse, requires_fuse,
              pytest.mark.skipif(shutil.which("mount.fuse3") is None and not os.path.exists("/sbin/mount.fuse3"),
                                 reason="needs mount.fuse3 (apt-get install fuse3)")]


def wait_gone(mnt: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while daemons(mnt):
        if time.monotonic() > deadline:
            raise AssertionError(f"dssefs daemon for {mnt} still running after {timeout} s")
        time.sleep(0.05)


def typed_path(mnt: Path) -> str:
    """The dssefs script under a path without '.', for the type ``fuse.PATH``: mount(8) finds its
    helper by the type's text up to the last '.', and a virtual environment is often ``.venv``."""
    link = mnt.parent / "bin" / "dssefs"
    if not link.exists():
        link.parent.mkdir(exist_ok=True)
        link.symlink_to(dssefs_executable())
    assert "." not in str(link), link
    return str(link)


def mount8(source: str, mnt: Path, options: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", "-t", f"fuse.{typed_path(mnt)}", source, str(mnt), "-o", options],
                          capture_output=True, text=True, timeout=60)


def dssefs_umount(mnt: Path) -> subprocess.CompletedProcess:
    """'dssefs umount': waits until the daemon has stored everything and exited."""
    return subprocess.run([dssefs_executable(), "umount", str(mnt)], capture_output=True, text=True, timeout=60)


@contextlib.contextmanager
def mounted_by_mount8(source: str, mnt: Path, options: str):
    """Mount through mount(8) (asserting success), then 'dssefs umount' (asserting success)."""
    r = mount8(source, mnt, options)
    assert r.returncode == 0, r.stderr
    try:
        yield
    finally:
        u = dssefs_umount(mnt)
    assert u.returncode == 0, u.stderr


def local_options(args: list[str]) -> str:
    """``--keyring K --spill-dir S`` as mount options."""
    return ",".join(f"{flag.lstrip('-')}={value}" for flag, value in zip(args[::2], args[1::2]))


def test_mount8_returns_once_live_and_umount_detaches(local_source, mnt):
    source, args = local_source
    r = mount8(source, mnt, local_options(args))
    assert r.returncode == 0, r.stderr
    try:
        assert mounted(mnt) == ["fuse.dssefs"]  # live at once: no waiting after mount(8) returned
        assert os.listdir(mnt) == []
        assert len(daemons(mnt)) == 1  # mount.fuse3 and its shell are gone; the daemon stays
        (mnt / "via-mount8").write_bytes(b"stored through mount.fuse3")
        assert (mnt / "via-mount8").read_bytes() == b"stored through mount.fuse3"
    finally:
        u = subprocess.run(["umount", str(mnt)], capture_output=True, text=True, timeout=60)
    assert u.returncode == 0, u.stderr
    assert not mounted(mnt)
    wait_gone(mnt)  # the daemon stores what is left and exits


def test_fstab_style_options_and_data_survive_a_remount(local_source, mnt):
    """Options as an fstab line gives them (mount(8) drops x-*, mount.fuse3 _netdev/nofail/noauto
    and adds dev,suid); the file written in one mount is read in the next."""
    source, args = local_source
    opts = f"rw,_netdev,nofail,noauto,x-systemd.mount-timeout=90s,{local_options(args)},attr_timeout=2,name=team"
    with mounted_by_mount8(source, mnt, opts):
        (mnt / "kept").write_bytes(b"x" * 100_000)
    assert not mounted(mnt) and not daemons(mnt)  # dssefs umount waited until everything was stored
    with mounted_by_mount8(source, mnt, local_options(args)):
        assert (mnt / "kept").read_bytes() == b"x" * 100_000


def test_mount8_with_a_configuration_file(local_source, mnt, tmp_path):
    """config=FILE, as in systemd/examples/fstab: the TOML file 'dssefs service install' writes."""
    source, args = local_source
    cfg = tmp_path / "mnt.toml"
    cfg.write_text(f'source = "{source}"\nkeyring = "{args[1]}"\nspill_dir = "{args[3]}"\nname = "cfgtest"\n')
    cfg.chmod(0o600)
    with mounted_by_mount8(source, mnt, f"_netdev,config={cfg}"):
        assert mounted(mnt) == ["fuse.dssefs"]
        with open("/proc/self/mountinfo") as f:
            entry = next(line for line in f if f" {mnt} " in line)
        assert " - fuse.dssefs cfgtest " in entry  # the name is the source df and mount(8) show


def test_failed_mount8_says_why_in_one_line_and_leaves_nothing(local_source, mnt, tmp_path):
    source, args = local_source
    missing = tmp_path / "no-such-keyring"
    r = mount8(source, mnt, local_options(["--keyring", str(missing), "--spill-dir", args[3]]))
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dssefs: error: ") and str(missing) in lines[0], r.stderr
    assert not mounted(mnt)
    assert not daemons(mnt)
    r = mount8(source, mnt, "no_such_option=1")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no_such_option" in lines[0], r.stderr
    assert not mounted(mnt)


def test_mount_t_fuse_dssefs_finds_the_command_in_the_default_path(local_source, mnt):
    """The literal type 'fuse.dssefs' of the README's fstab line: mount.fuse3's /bin/sh finds
    'dssefs' in its default PATH (PATH is unset), where a pip install as root puts it.  The test
    environment's script is linked there for the duration of the test, unless another dssefs
    already lives there (then this test cannot tell which one ran, and is skipped)."""
    link = Path("/usr/local/bin/dssefs")
    if os.path.lexists(link):
        pytest.skip(f"{link} exists: not replacing an installed dssefs")
    source, args = local_source
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(dssefs_executable(), link)
    try:
        r = subprocess.run(["mount", "-t", "fuse.dssefs", source, str(mnt), "-o",
                            f"_netdev,{local_options(args)}"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        try:
            (mnt / "typed").write_bytes(b"fuse.dssefs")
            assert (mnt / "typed").read_bytes() == b"fuse.dssefs"
            assert mounted(mnt) == ["fuse.dssefs"]
        finally:
            u = subprocess.run(["umount", str(mnt)], capture_output=True, text=True, timeout=60)
        assert u.returncode == 0, u.stderr
        wait_gone(mnt)
    finally:
        os.unlink(link)


def test_a_dot_in_the_typed_path_is_refused_by_mount8(local_source, mnt):
    """Why the documented absolute-path type must be dot-free (docs/operations.md): mount(8) then
    runs no helper at all.  If util-linux ever changes this, the docs can say less."""
    dotted = mnt.parent / "with.dot" / "dssefs"
    dotted.parent.mkdir()
    dotted.symlink_to(dssefs_executable())
    source, args = local_source
    r = subprocess.run(["mount", "-t", f"fuse.{dotted}", source, str(mnt), "-o", local_options(args)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and not mounted(mnt), r.stderr
