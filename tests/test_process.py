"""No core dump of a process holding keys or plaintext, whatever limit it was started with."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest

from fuse_fixtures import Mount, requires_fuse


@pytest.fixture
def unlimited_cores():
    """Start children as a shell after 'ulimit -c unlimited' would."""
    old = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    yield
    resource.setrlimit(resource.RLIMIT_CORE, old)


def test_every_command_forbids_core_dumps_first(unlimited_cores):
    code = ("import resource, dssefs.process as p; assert p.dumpable() == 1; "
            "assert resource.getrlimit(resource.RLIMIT_CORE)[0] != 0; "
            "from dssefs import cli; import sys; sys.argv = ['dssefs', '--version']; "
            "import contextlib, io\n"
            "try:\n    cli.main(['--version'])\nexcept SystemExit:\n    pass\n"
            "print(resource.getrlimit(resource.RLIMIT_CORE), p.dumpable())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "(0, 0) 0"


@requires_fuse
def test_a_mount_started_with_unlimited_cores_cannot_dump(unlimited_cores, local_mount: Mount):
    limits = open(f"/proc/{local_mount.pid}/limits").read()
    line = next(l for l in limits.splitlines() if l.startswith("Max core file size"))
    assert line.split()[4:6] == ["0", "0"], line
