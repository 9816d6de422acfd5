"""Unmodified programs on a real mount: git, sqlite3, tar, diff, cp, rsync, dd, sha256sum, sed.

Most run on the local-store mount; a representative subset (git, sqlite3, tar, editor save) also
runs on the S3 mount backed by moto.  Each test remounts at least once, so what it checks is what
was stored, not what the daemon still holds in memory.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from fuse_fixtures import Mount, requires_fuse

pytestmark = [pytest.mark.fuse, requires_fuse, pytest.mark.timeout(300)]

def need(*programs: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")


def run(*cmd, cwd=None, input=None, env=None) -> str:
    """Run a program; fail the test with its output when it exits non-zero."""
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, input=input, capture_output=True, text=True,
                       env=env, timeout=240)
    assert r.returncode == 0, f"{cmd} exited {r.returncode}\nstdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-4000:]}"
    return r.stdout


def package_dir(name: str) -> Path:
    """An installed package directory to use as a real tree of source files."""
    mod = __import__(name)
    return Path(mod.__file__).parent


@pytest.fixture(params=["local", "s3"])
def any_mount(request) -> Mount:
    return request.getfixturevalue(f"{request.param}_mount")


def tree_listing(root: Path, *, mtimes: bool = True) -> dict[str, tuple]:
    """relative path -> (type, mode, size, content digest or link target, mtime_ns)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                what = os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                what = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                what = None
            # directory mtimes move when entries are added (cp -a sets them last; compare all)
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode),
                        st.st_size if stat.S_ISREG(st.st_mode) else None, what,
                        st.st_mtime_ns if mtimes and not stat.S_ISLNK(st.st_mode) else None)
    return out


def assert_same_tree(a: Path, b: Path, *, mtimes: bool = True) -> None:
    la, lb = tree_listing(a, mtimes=mtimes), tree_listing(b, mtimes=mtimes)
    assert sorted(la) == sorted(lb)
    diffs = {k: (la[k], lb[k]) for k in la if la[k] != lb[k]}
    assert not diffs, f"{len(diffs)} entries differ, e.g. {list(diffs.items())[:5]}"


@pytest.fixture
def sample_tree(tmp_path) -> Path:
    """A small tree with the things copy tools must carry: modes, symlinks, empty files and dirs,
    odd names, files larger than a chunk, fixed mtimes."""
    root = tmp_path / "sample"
    shutil.copytree(package_dir("trio") / "_core", root / "trio_core",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (root / "bin").mkdir()
    script = root / "bin" / "run.sh"
    script.write_text("#!/bin/sh\necho ok\n")
    os.chmod(script, 0o750)
    (root / "secret.key").write_bytes(os.urandom(64))
    os.chmod(root / "secret.key", 0o600)
    (root / "empty").write_bytes(b"")
    (root / "empty-dir").mkdir()
    os.chmod(root / "empty-dir", 0o700)
    (root / "big.bin").write_bytes(os.urandom(3 * (1 << 20) + 12345))
    (root / "name with spaces & ünïcödé.txt").write_text("spaces\n")
    os.symlink("bin/run.sh", root / "link-to-script")
    os.symlink("../nowhere/dangling", root / "dangling")
    for i, p in enumerate(sorted(root.rglob("*"))):
        if not p.is_symlink():
            os.utime(p, ns=(1_600_000_000_000_000_000 + i * 1_000_000_007, 1_500_000_000_123_456_789 + i * 999))
    os.utime(root, ns=(1_600_000_000_000_000_000, 1_500_000_000_000_000_000))
    return root


# ---- git ------------------------------------------------------------------------------------------

def test_git_init_add_commit_log_fsck(any_mount: Mount, tmp_path):
    need("git")
    m = any_mount
    env = {**os.environ, "HOME": str(tmp_path / "home"), "GIT_AUTHOR_NAME": "T", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "T", "GIT_COMMITTER_EMAIL": "t@example.com", "GIT_CONFIG_NOSYSTEM": "1"}
    repo = m / "repo"
    src = package_dir("trio") / "_core"
    run("git", "init", "-q", "-b", "main", repo, env=env)
    keep = None
    if "s3" in m.source:  # every object costs several S3 round trips on moto: keep the S3 repo small
        keep = {"__init__.py", "_run.py", "_io_epoll.py", "_exceptions.py", "_ki.py", "_traps.py"}
    shutil.copytree(src, repo / "core", ignore=lambda d, names: [
        n for n in names if n == "__pycache__" or (keep is not None and n.endswith(".py") and n not in keep)])
    run("git", "add", ".", cwd=repo, env=env)
    run("git", "commit", "-q", "-m", "first", cwd=repo, env=env)
    with open(repo / "core" / "__init__.py", "a") as f:
        f.write("# second commit\n")
    (repo / "core" / "_run.py").unlink()
    os.rename(repo / "core" / "_io_epoll.py", repo / "core" / "_io_epoll_renamed.py")
    run("git", "add", "-A", cwd=repo, env=env)
    run("git", "commit", "-q", "-m", "second", cwd=repo, env=env)
    run("git", "tag", "v1", cwd=repo, env=env)
    if keep is None:  # gc packs objects (big writes, renames, unlinks); ~10 s on moto, so local only
        run("git", "gc", "-q", cwd=repo, env=env)
    head = run("git", "rev-parse", "HEAD", cwd=repo, env=env).strip()
    m.remount()
    assert run("git", "log", "--format=%s", cwd=repo, env=env).split() == ["second", "first"]
    assert run("git", "rev-parse", "v1", cwd=repo, env=env).strip() == head
    run("git", "fsck", "--full", "--strict", "--no-dangling", cwd=repo, env=env)
    assert run("git", "status", "--porcelain", cwd=repo, env=env) == ""
    # a clone out of the mount reproduces the tree exactly
    run("git", "clone", "-q", repo, tmp_path / "clone", env=env)
    run("git", "-C", tmp_path / "clone", "fsck", "--full", env=env)
    assert (tmp_path / "clone" / "core" / "__init__.py").read_bytes() == (repo / "core" / "__init__.py").read_bytes()
    assert not (tmp_path / "clone" / "core" / "_run.py").exists()


# ---- sqlite3 --------------------------------------------------------------------------------------

def sqlite(db: Path, sql: str) -> str:
    return run("sqlite3", "-batch", "-bail", db, input=sql)


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_sqlite3_database_survives_remount(local_mount: Mount, journal):
    need("sqlite3")
    _sqlite_workload(local_mount, journal)


def test_sqlite3_on_s3(s3_mount: Mount):
    need("sqlite3")
    _sqlite_workload(s3_mount, "delete")


def _sqlite_workload(m: Mount, journal: str) -> None:
    db = m / "data" / "app.db"
    db.parent.mkdir()
    out = sqlite(db, f"""
        PRAGMA journal_mode={journal};
        CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT NOT NULL, payload BLOB, score REAL);
        CREATE INDEX t_name ON t(name);
        BEGIN;
        WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 10000)
        INSERT INTO t(id, name, payload, score) SELECT i, 'row-' || i, randomblob(100 + i % 200), i * 0.5 FROM n;
        COMMIT;
        SELECT count(*), sum(id), sum(length(payload)) FROM t;
        PRAGMA integrity_check;
    """).split()
    assert out[0] == journal
    count, total, plen = out[1].split("|")
    assert (int(count), int(total)) == (10000, 10000 * 10001 // 2)
    assert out[2] == "ok"
    # an update transaction and a rollback, in a second process
    sqlite(db, """
        BEGIN; UPDATE t SET score = -1 WHERE id % 7 = 0; DELETE FROM t WHERE id > 9000; COMMIT;
        BEGIN; DELETE FROM t; ROLLBACK;
    """)
    m.remount()
    assert sorted(os.listdir(db.parent))[0] == "app.db"
    out = sqlite(db, """
        SELECT count(*), sum(id), (SELECT count(*) FROM t WHERE score = -1), sum(length(payload)) FROM t;
        SELECT name FROM t WHERE name = 'row-4242';
        PRAGMA integrity_check;
    """).split()
    count, total, neg, plen2 = out[0].split("|")
    assert (int(count), int(total), int(neg)) == (9000, 9000 * 9001 // 2, 9000 // 7)
    assert out[1] == "row-4242" and out[2] == "ok"
    assert 0 < int(plen2) < int(plen)
    sqlite(db, "VACUUM;")
    assert sqlite(db, "PRAGMA integrity_check;").strip() == "ok"


# ---- tar, diff ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_tarball(tmp_path_factory) -> tuple[Path, Path]:
    """(tarball, source dir) of an installed package: botocore, ~2,100 files / 30 MB of real source
    and data (JSON service models), in ~250 directories."""
    src = package_dir("botocore")
    tarball = tmp_path_factory.mktemp("tar") / "botocore.tar"
    with tarfile.open(tarball, "w") as tf:
        tf.add(src, arcname="pkg", filter=lambda ti: None if "__pycache__" in ti.name else ti)
    return tarball, src


def test_tar_extract_and_diff(local_mount: Mount, real_tarball, tmp_path):
    need("tar", "diff")
    tarball, src = real_tarball
    m = local_mount
    run("tar", "-C", m.mountpoint, "-xf", tarball)
    run("diff", "-r", "--exclude=__pycache__", m / "pkg", src)
    m.remount()
    run("diff", "-r", "--exclude=__pycache__", m / "pkg", src)
    # tar restored modes and mtimes of files; a re-created archive lists the same members
    ref = {ti.name: (ti.mode, int(ti.mtime), ti.size, ti.type) for ti in tarfile.open(tarball)}
    run("tar", "-C", m.mountpoint, "-cf", tmp_path / "again.tar", "pkg")
    again = {ti.name: (ti.mode, int(ti.mtime), ti.size, ti.type) for ti in tarfile.open(tmp_path / "again.tar")}
    assert again == ref


def test_tar_extract_on_s3(s3_mount: Mount, tmp_path):
    need("tar", "diff")
    src = package_dir("trio") / "_core"
    tarball = tmp_path / "core.tar"
    run("tar", "-C", src.parent, "--exclude=__pycache__", "-cf", tarball, "_core")
    run("tar", "-C", s3_mount.mountpoint, "-xf", tarball)
    s3_mount.remount()
    run("diff", "-r", "--exclude=__pycache__", s3_mount / "_core", src)


# ---- cp -a, rsync ---------------------------------------------------------------------------------

def test_cp_a_round_trip(local_mount: Mount, sample_tree, tmp_path):
    need("cp")
    m = local_mount
    run("cp", "-a", sample_tree, m / "copy")
    assert_same_tree(sample_tree, m / "copy")
    m.remount()
    assert_same_tree(sample_tree, m / "copy")
    run("cp", "-a", m / "copy", tmp_path / "back")
    assert_same_tree(sample_tree, tmp_path / "back")


def test_rsync_checksum_round_trip(local_mount: Mount, sample_tree, tmp_path):
    need("rsync")
    m = local_mount
    run("rsync", "-a", "--checksum", f"{sample_tree}/", f"{m / 'sync'}/")
    assert_same_tree(sample_tree, m / "sync")
    m.remount()
    # nothing left to do: every checksum matches what is stored
    changes = run("rsync", "-a", "--checksum", "--dry-run", "--itemize-changes", f"{sample_tree}/", f"{m / 'sync'}/")
    assert changes.strip() == "", changes
    # same size and mtime, different bytes: only --checksum notices, and rsync rewrites it in place
    victim = sample_tree / "big.bin"
    st = os.stat(victim)
    with open(victim, "r+b") as f:
        f.seek(2 * (1 << 20) + 7)
        f.write(b"CHANGED!")
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    changes = run("rsync", "-a", "--checksum", "--inplace", "--no-whole-file", "--itemize-changes",
                  f"{sample_tree}/", f"{m / 'sync'}/")
    assert "big.bin" in changes
    m.remount()
    assert_same_tree(sample_tree, m / "sync")
    run("rsync", "-a", "--checksum", f"{m / 'sync'}/", f"{tmp_path / 'back'}/")
    assert_same_tree(sample_tree, tmp_path / "back")


# ---- dd, sha256sum --------------------------------------------------------------------------------

def test_dd_256mib_sha256_across_remount(local_mount: Mount, tmp_path):
    need("dd", "sha256sum")
    m = local_mount
    src = tmp_path / "random.bin"
    seed = hashlib.sha256(b"dd").digest()
    block = b"".join(hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(1 << 15))  # 1 MiB
    with open(src, "wb") as f:
        for i in range(256):
            f.write(i.to_bytes(4, "big") + block[4:])  # every MiB differs
    want = run("sha256sum", src).split()[0]
    run("dd", f"if={src}", f"of={m / 'big.bin'}", "bs=1M", "conv=fsync", "status=none")
    assert os.stat(m / "big.bin").st_size == 256 << 20
    assert run("sha256sum", m / "big.bin").split()[0] == want
    m.remount()
    assert run("sha256sum", m / "big.bin").split()[0] == want
    # an unaligned dd overwrite in the middle, without truncation
    run("dd", "if=/dev/zero", f"of={m / 'big.bin'}", "bs=4096", "seek=12345", "count=300", "conv=notrunc,fsync",
        "status=none")
    with open(src, "r+b") as f:
        f.seek(12345 * 4096)
        f.write(bytes(300 * 4096))
    want = run("sha256sum", src).split()[0]
    m.remount()
    assert run("sha256sum", m / "big.bin").split()[0] == want


# ---- editor-style save ----------------------------------------------------------------------------

def editor_save(path: Path, data: bytes) -> None:
    """What careful editors do: write a sibling temp file, fsync it, rename it over the original,
    fsync the directory."""
    tmp = path.with_name(f".{path.name}.swp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IMODE(os.stat(path).st_mode))
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def test_editor_style_save(any_mount: Mount):
    m = any_mount
    doc = m / "notes" / "doc.txt"
    doc.parent.mkdir()
    doc.write_bytes(b"version 1\n" * 1000)
    os.chmod(doc, 0o640)
    reader = open(doc, "rb")  # a reader holding the old file keeps seeing the old contents
    for v in range(2, 6):
        editor_save(doc, f"version {v}\n".encode() * (1000 + v * 300))
    assert reader.read() == b"version 1\n" * 1000
    reader.close()
    # sed -i: a real program doing the same temp-file-and-rename dance
    need("sed")
    run("sed", "-i", "s/version 5/version six/", doc)
    want = b"version six\n" * (1000 + 5 * 300)
    assert doc.read_bytes() == want
    assert sorted(os.listdir(doc.parent)) == ["doc.txt"]
    m.remount()
    assert doc.read_bytes() == want
    assert stat.S_IMODE(os.stat(doc).st_mode) == 0o640
    assert sorted(os.listdir(doc.parent)) == ["doc.txt"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
