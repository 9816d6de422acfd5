"""Model-based test: random operation sequences on the mount and on a plain directory must agree.

Every operation (create, pwrite at random offsets, append, truncate, ftruncate on open descriptors,
pread, rename of files and directories, mkdir, rmdir, unlink, chmod, symlink, utime, close) is
applied to the dssefs mount and to a directory on the host's own file system.  The results must be
identical: same return values and data, or the same errno.  After each sequence, and again after a
remount, the two trees must hold the same names, types, sizes, contents, modes and symlink
targets (and explicitly set mtimes).

Names come from a small fixed pool of paths so that sequences collide often: ENOENT, EEXIST,
ENOTDIR, EISDIR, ENOTEMPTY, EINVAL (a directory into itself) and EBADF all come up.  The mount uses
a 16 KiB chunk size so small writes straddle chunk boundaries, and a small cache so dirty chunks
spill.  One mount per test; the trees are emptied between examples.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, precondition, rule,
                                 run_state_machine_as_test)

from fuse_fixtures import Mount, requires_fuse

pytestmark = [pytest.mark.fuse, requires_fuse, pytest.mark.timeout(600)]

CHUNK = 16 << 10
PATHS = ["a", "b", "d", "d/a", "d/c", "d/e", "d/e/a", "e", "e/b", "e/d"]
MAX_OFFSET = 5 * CHUNK + 100
EXPLICIT_TIME_LIMIT_NS = 1_000_000_000 * 10 ** 9  # utime below sets times before 2001

paths = st.sampled_from(PATHS)
offsets = st.one_of(st.integers(0, MAX_OFFSET), st.sampled_from([0, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK]))
lengths = st.one_of(st.integers(0, 3 * CHUNK), st.sampled_from([1, CHUNK - 1, CHUNK, CHUNK + 1]))
modes = st.one_of(st.sampled_from([0o644, 0o600, 0o755, 0o700, 0o444, 0o000, 0o4755, 0o2750, 0o1777]),
                  st.integers(0, 0o7777))
open_flags = st.sampled_from([
    os.O_RDONLY, os.O_WRONLY, os.O_RDWR,
    os.O_RDWR | os.O_CREAT, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, os.O_RDWR | os.O_CREAT | os.O_EXCL,
    os.O_WRONLY | os.O_APPEND | os.O_CREAT, os.O_RDWR | os.O_APPEND, os.O_RDWR | os.O_TRUNC,
    os.O_RDONLY | os.O_DIRECTORY,
])
# Operations follow symlinks (chmod, truncate, open O_CREAT...), so no target may resolve outside
# the tree: relative targets never climb ("..") and the only absolute one has a missing parent.
symlink_targets = st.one_of(
    st.sampled_from(PATHS + ["missing", "d/missing", "/nonexistent-dssefs-model-target/x"]),
    st.text(st.characters(min_codepoint=33, max_codepoint=0x2fff, exclude_characters="/"), min_size=1,
            max_size=60).filter(lambda t: t not in (".", "..")))


def data_for(seed: int, n: int) -> bytes:
    """Cheap, distinct bytes: a seed-dependent repeating pattern (not all zeros, so holes show)."""
    unit = seed.to_bytes(4, "big") + bytes(range(seed % 251, seed % 251 + 5))
    return (unit * (n // len(unit) + 1))[:n]


def outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except OSError as e:
        return ("err", errno.errorcode.get(e.errno, e.errno))


def snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st_ = os.lstat(p)
            rel = str(p.relative_to(root))
            kind = stat.S_IFMT(st_.st_mode)
            if stat.S_ISLNK(st_.st_mode):
                entry = (kind, None, None, os.readlink(p), (st_.st_uid, st_.st_gid), None)
            elif stat.S_ISREG(st_.st_mode):
                with open(p, "rb") as f:
                    entry = (kind, stat.S_IMODE(st_.st_mode), st_.st_size, f.read(), (st_.st_uid, st_.st_gid), st_.st_mtime_ns)
            else:
                entry = (kind, stat.S_IMODE(st_.st_mode), None, None, (st_.st_uid, st_.st_gid), st_.st_mtime_ns)
            out[rel] = entry
    return out


def compare(model: Path, mount: Path, when: str) -> None:
    a, b = snapshot(model), snapshot(mount)
    assert sorted(a) == sorted(b), f"{when}: names differ: model {sorted(a)} mount {sorted(b)}"
    for k in a:
        ma, mb = a[k], b[k]
        # mtimes must agree only where the model holds a time set by utime (others are 'now')
        if ma[5] is not None and ma[5] < EXPLICIT_TIME_LIMIT_NS:
            assert ma[5] == mb[5], f"{when}: {k}: mtime {mb[5]} != {ma[5]}"
        assert ma[:5] == mb[:5], f"{when}: {k}: model {ma[:3] + ma[4:5]} mount {mb[:3] + mb[4:5]}" + (
            "" if ma[3] == mb[3] else f" (contents differ: {len(ma[3] or b'')} vs {len(mb[3] or b'')} bytes)")


def empty(root: Path) -> None:
    """Remove everything under ``root`` (directories may have been chmod'ed to 000)."""
    for entry in os.scandir(root):
        p = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            os.chmod(p, 0o700)
            for dirpath, dirnames, _ in os.walk(p):  # symlinks to directories show up in dirnames
                for d in dirnames:
                    if not os.path.islink(os.path.join(dirpath, d)):
                        os.chmod(os.path.join(dirpath, d), 0o700)
            shutil.rmtree(p)
        else:
            os.unlink(p)


class FsModel(RuleBasedStateMachine):
    """Subclassed per test with ``mount`` and ``model_root`` set (one mount serves every example)."""

    mount: Mount
    model_root: Path
    examples = 0

    def __init__(self):
        super().__init__()
        self.fds: list[tuple[int, int, str, int]] = []  # (model fd, mount fd, path, flags)
        self.steps = 0
        self.remounted = False
        type(self).examples += 1

    @initialize(dirs=st.lists(st.booleans(), min_size=3, max_size=3),
                files=st.lists(st.tuples(st.sampled_from(["a", "b", "d/a", "d/c", "d/e/a", "e/b"]),
                                         st.integers(0, 3 * CHUNK)), max_size=4))
    def start(self, dirs, files):
        """Empty both trees, then lay out a few directories and files so that most operations
        meet something that exists (an empty start makes nearly every operation ENOENT)."""
        empty(self.model_root)
        empty(self.mount.mountpoint)
        for want, d in zip(dirs, ["d", "d/e", "e"]):
            if want:
                self.both(os.mkdir, d, 0o755)
        for i, (path, n) in enumerate(files):
            self.write_file(path, i, n)

    def both(self, fn, *args, path_args=(0,), **kw):
        """Apply ``fn`` to the model and to the mount; return the (identical) outcome."""
        self.steps += 1

        def with_root(root):
            a = list(args)
            for i in path_args:
                a[i] = str(root / a[i])
            return a

        r_model = outcome(lambda *a: fn(*a, **kw), *with_root(self.model_root))
        r_mount = outcome(lambda *a: fn(*a, **kw), *with_root(self.mount.mountpoint))
        assert r_model[0] == r_mount[0] and (r_model[0] == "ok" or r_model == r_mount), \
            f"{fn.__name__}{args}: model {r_model} mount {r_mount}"
        return r_model, r_mount

    # ---- namespace --------------------------------------------------------------------------------
    @rule(path=paths, mode=st.sampled_from([0o755, 0o700, 0o750, 0o2775]))
    def mkdir(self, path, mode):
        self.both(os.mkdir, path, mode)

    @rule(path=paths)
    def rmdir(self, path):
        self.both(os.rmdir, path)

    @rule(path=paths)
    def unlink(self, path):
        self.both(os.unlink, path)

    @rule(src=paths, dst=paths)
    def rename(self, src, dst):
        self.both(os.rename, src, dst, path_args=(0, 1))

    @rule(link_target=symlink_targets, path=paths)
    def symlink(self, link_target, path):
        self.both(os.symlink, link_target, path, path_args=(1,))

    @rule(path=paths)
    def readlink(self, path):
        a, b = self.both(os.readlink, path)
        assert a == b

    @rule(path=paths, mode=modes)
    def chmod(self, path, mode):
        # follows symlinks on both sides (lchmod does not exist on Linux)
        self.both(os.chmod, path, mode)

    @rule(path=paths, uid=st.sampled_from([-1, 0, 1000]), gid=st.sampled_from([-1, 0, 1234]))
    def chown(self, path, uid, gid):
        self.both(os.chown, path, uid, gid)

    @rule(path=paths, atime=st.integers(0, 10 ** 18), mtime=st.integers(0, 10 ** 18 - 1))
    def utime(self, path, atime, mtime):
        self.both(os.utime, path, ns=(atime, mtime))

    @rule(path=paths)
    def stat_(self, path):
        def st_(p):
            s = os.lstat(p)
            kind = stat.S_IFMT(s.st_mode)
            return (kind, stat.S_IMODE(s.st_mode) if not stat.S_ISLNK(s.st_mode) else None,
                    s.st_size if stat.S_ISREG(s.st_mode) or stat.S_ISLNK(s.st_mode) else None)
        a, b = self.both(st_, path)
        assert a == b

    @rule(path=paths)
    def listdir(self, path):
        a, b = self.both(lambda p: sorted(os.listdir(p)), path)
        assert a == b

    # ---- whole-file operations by name ------------------------------------------------------------
    @rule(path=paths, seed=st.integers(0, 2 ** 16), n=lengths)
    def write_file(self, path, seed, n):
        def w(p):
            with open(p, "wb") as f:
                f.write(data_for(seed, n))
        self.both(w, path)

    @rule(path=paths, seed=st.integers(0, 2 ** 16), n=lengths)
    def append_file(self, path, seed, n):
        def w(p):
            with open(p, "ab") as f:
                f.write(data_for(seed, n))
        self.both(w, path)

    @rule(path=paths, size=offsets)
    def truncate(self, path, size):
        self.both(os.truncate, path, size)

    @rule(path=paths)
    def read_file(self, path):
        def r(p):
            with open(p, "rb") as f:
                return f.read()
        a, b = self.both(r, path)
        assert a == b, f"read {path}: contents differ"

    # ---- open descriptors ---------------------------------------------------------------------------
    @precondition(lambda self: len(self.fds) < 6)
    @rule(path=paths, flags=open_flags, mode=st.sampled_from([0o644, 0o600, 0o640]))
    def open_(self, path, flags, mode):
        (ka, fa), (kb, fb) = self.both(os.open, path, flags, mode)
        if ka == "ok":
            self.fds.append((fa, fb, path, flags))

    def pick(self, i):
        return self.fds[i % len(self.fds)]

    @precondition(lambda self: self.fds)
    @rule(i=st.integers(0, 5), seed=st.integers(0, 2 ** 16), n=lengths, off=offsets)
    def pwrite(self, i, seed, n, off):
        fa, fb, _, flags = self.pick(i)
        data = data_for(seed, n)
        if flags & os.O_APPEND:  # pwrite on O_APPEND appends on Linux; use write() to say what we mean
            ra, rb = outcome(os.write, fa, data), outcome(os.write, fb, data)
        else:
            ra, rb = outcome(os.pwrite, fa, data, off), outcome(os.pwrite, fb, data, off)
        assert ra == rb, f"pwrite({n} bytes at {off}): model {ra} mount {rb}"

    @precondition(lambda self: self.fds)
    @rule(i=st.integers(0, 5), n=lengths, off=offsets)
    def pread(self, i, n, off):
        fa, fb, path, _ = self.pick(i)
        ra, rb = outcome(os.pread, fa, n, off), outcome(os.pread, fb, n, off)
        assert ra == rb, f"pread({n} at {off}) of {path}: model {ra[0]} mount {rb[0]}" + (
            f" {ra[1]!r:.60} vs {rb[1]!r:.60}" if ra[0] != "ok" or rb[0] != "ok" else
            f" lengths {len(ra[1])} vs {len(rb[1])}")

    @precondition(lambda self: self.fds)
    @rule(i=st.integers(0, 5), size=offsets)
    def ftruncate(self, i, size):
        fa, fb, _, _ = self.pick(i)
        ra, rb = outcome(os.ftruncate, fa, size), outcome(os.ftruncate, fb, size)
        assert ra == rb, f"ftruncate({size}): model {ra} mount {rb}"

    @precondition(lambda self: self.fds)
    @rule(i=st.integers(0, 5))
    def fstat(self, i):
        fa, fb, _, _ = self.pick(i)

        def f(fd):
            s = os.fstat(fd)
            return stat.S_IFMT(s.st_mode), stat.S_IMODE(s.st_mode), s.st_size if stat.S_ISREG(s.st_mode) else None
        ra, rb = outcome(f, fa), outcome(f, fb)
        assert ra == rb, f"fstat: model {ra} mount {rb}"

    @precondition(lambda self: self.fds)
    @rule(i=st.integers(0, 5), data=st.booleans())
    def fsync(self, i, data):
        fa, fb, _, _ = self.pick(i)
        fn = os.fdatasync if data else os.fsync
        ra, rb = outcome(fn, fa), outcome(fn, fb)
        assert ra == rb, f"{fn.__name__}: model {ra} mount {rb}"

    @precondition(lambda self: self.fds)
    @rule(i=st.integers(0, 5))
    def close(self, i):
        fa, fb, _, _ = self.fds.pop(i % len(self.fds))
        ra, rb = outcome(os.close, fa), outcome(os.close, fb)
        assert ra == rb, f"close: model {ra} mount {rb}"

    def close_all(self):
        while self.fds:
            fa, fb, _, _ = self.fds.pop()
            ra, rb = outcome(os.close, fa), outcome(os.close, fb)
            assert ra == rb, f"close: model {ra} mount {rb}"

    # ---- durability -------------------------------------------------------------------------------
    @precondition(lambda self: self.steps >= 12 and not self.remounted)
    @rule()
    def remount(self):
        """Close everything and remount mid-sequence: what follows runs on state read back."""
        self.close_all()
        self.remounted = True
        self.mount.remount()
        compare(self.model_root, self.mount.mountpoint, "after a mid-sequence remount")

    def teardown(self):
        try:
            self.close_all()
            compare(self.model_root, self.mount.mountpoint, "end of sequence")
            if type(self).examples % 3 == 0 or self.remounted:
                self.mount.remount()
                compare(self.model_root, self.mount.mountpoint, "after remount")
        finally:
            for fa, fb, _, _ in self.fds:
                for fd in (fa, fb):
                    try:
                        os.close(fd)
                    except OSError:
                        pass


def run_model(mount: Mount, model_root: Path, max_examples: int, steps: int) -> None:
    """The random operation sequences, under umask 022 (the model's files are created with it)."""
    machine = type("Model", (FsModel,), {"mount": mount, "model_root": model_root, "examples": 0})
    old = os.umask(0o022)
    try:
        run_state_machine_as_test(machine, settings=settings(
            max_examples=max_examples, stateful_step_count=steps, deadline=None, database=None,
            suppress_health_check=list(HealthCheck)))
    finally:
        os.umask(old)


@pytest.fixture
def model_root():
    # the model lives on the host's file system, not in tmp_path if that were exotic
    with tempfile.TemporaryDirectory(prefix="dssefs-model-") as d:
        root = Path(d) / "tree"
        root.mkdir()
        yield root


@pytest.fixture
def model_mount(tmp_path, mount_factory, local_source) -> Mount:
    from fuse_fixtures import fuse_available
    if not fuse_available():
        pytest.skip("needs /dev/fuse, root and fusermount3")
    source, args = local_source
    # small chunks: writes and truncates straddle chunk boundaries; small cache: dirty chunks spill
    m = mount_factory(tmp_path / "mnt", source, *args, "--chunk-size", "16K", "--cache-size", "256K")
    m.start()
    yield m
    m.cleanup()


# DSSEFS_MODEL_EXAMPLES=500 for a longer soak run than CI's
EXAMPLES = int(os.environ.get("DSSEFS_MODEL_EXAMPLES", "60"))


def test_random_operation_sequences_match_a_plain_directory(model_mount: Mount, model_root: Path):
    run_model(model_mount, model_root, max_examples=EXAMPLES, steps=40)


def test_random_operation_sequences_on_s3(s3_mount: Mount, model_root: Path):
    """A shorter run against the S3 store (moto): the same semantics over a different store."""
    run_model(s3_mount, model_root, max_examples=max(8, EXAMPLES // 8), steps=30)


@pytest.fixture
def s3_model_mount(tmp_path, mount_factory, s3_source) -> Mount:
    """The S3 store (moto) with the model's small chunks: files written in order from their second
    chunk on are sealed while they are written (docs/semantics.md, "Sealing ahead"), so the random
    writes, truncates and fsyncs below also break, finish and fall back from those writers."""
    source, args = s3_source
    m = mount_factory(tmp_path / "mnt", source, *args, "--chunk-size", "16K", "--cache-size", "256K",
                      "--log-level", "debug")
    m.start()
    yield m
    m.cleanup()


def test_random_operation_sequences_on_s3_with_small_chunks(s3_model_mount: Mount, model_root: Path):
    run_model(s3_model_mount, model_root, max_examples=max(8, EXAMPLES // 6), steps=40)
    # the sequences did exercise those writers (in every daemon run of the test: it remounts)
    logs = "".join(p.read_text(errors="replace")
                   for p in s3_model_mount.log_dir.glob(f"{s3_model_mount.mountpoint.name}-daemon-*.log"))
    started, stored = logs.count("event=sealed_ahead_start"), logs.count("event=sealed_ahead_stored")
    assert started >= stored > 0, (started, stored, logs.count("event=sealed_ahead_fallback"))


def test_setgid_directory_inheritance(model_mount: Mount, model_root: Path):
    """BSD group semantics in a set-group-ID directory, as on local file systems: new entries take
    the directory's group, new subdirectories also inherit the set-group-ID bit.  Shared project
    directories rely on this to keep files owned by the project group."""
    old = os.umask(0o022)
    try:
        for root in (model_root, model_mount.mountpoint):
            os.mkdir(root / "shared", 0o755)
            os.chown(root / "shared", -1, 1234)
            os.chmod(root / "shared", 0o2775)
            (root / "shared" / "file").write_bytes(b"x")
            os.mkdir(root / "shared" / "sub")
            (root / "shared" / "sub" / "deeper").write_bytes(b"y")
            os.symlink("file", root / "shared" / "link")
            os.mkfifo(root / "shared" / "fifo")
            os.chmod(root / "shared", 0o775)  # no longer set-group-ID: back to the creator's group
            (root / "shared" / "after").write_bytes(b"z")
        compare(model_root, model_mount.mountpoint, "setgid directory")
        model_mount.remount()
        compare(model_root, model_mount.mountpoint, "setgid directory after remount")
    finally:
        os.umask(old)
