#!/usr/bin/env python3
"""End-to-end mount benchmark: dssefs (local store) vs a plain directory vs gocryptfs.

Runs the same workloads on each file system in one run, so the ratios are comparable even on a
noisy machine:

* seq write   ``dd if=/dev/zero bs=1M count=N conv=fsync`` after drop_caches (MB/s, timed around the whole dd)
* seq read    the same file after ``drop_caches`` (and a remount, so dssefs's own cache is cold)
* tree        ``tar -xf`` of an installed Python package (~3,400 files), then ``sync``; then,
              cold again, read every file back (MB/s and files/s)
* rand read   N random aligned 4 KiB ``pread`` on a 256 MiB file after drop_caches + remount (IOPS)

Needs root (drop_caches, FUSE).  Not collected by pytest; run it directly::

    python tests/bench/mount_bench.py                       # full size
    python tests/bench/mount_bench.py --size 64 --rand-size 32 --tree trio    # quick
    python tests/bench/mount_bench.py --json --repeat 3 --chunk-size 4M
    python tests/bench/mount_bench.py --only dssefs --profile /tmp/prof       # py-spy or cProfile
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/ : the Mount helper used by the mount tests

from fuse_fixtures import Mount, force_unmount, mounted  # noqa: E402

MB = 1_000_000
MiB = 1 << 20


def py_spy() -> str | None:
    """py-spy on PATH or next to this Python (a virtualenv's bin/)."""
    return shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def drop_caches() -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        log(f"warning: cannot drop caches ({e}); read figures include the page cache")


# ---- file systems under test -----------------------------------------------------------------------

class Target:
    name = "?"

    def __init__(self, work: Path):
        self.work = work
        self.mnt = work / "mnt"

    def setup(self) -> None: ...
    def cold(self) -> None: drop_caches()
    def teardown(self) -> None: ...
    def describe(self) -> str: return self.name


class Plain(Target):
    name = "plain"

    def setup(self) -> None:
        self.mnt.mkdir(parents=True, exist_ok=True)

    def describe(self) -> str:
        r = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "-T", str(self.mnt)], capture_output=True, text=True)
        return f"plain directory ({r.stdout.strip() or '?'})"


class Dssefs(Target):
    name = "dssefs"

    def __init__(self, work: Path, mount_args: list[str], profile: Path | None):
        super().__init__(work)
        self.mount_args = mount_args
        self.profile = profile
        self.m: Mount | None = None
        self.profilers: list[subprocess.Popen] = []
        self.runs = 0

    def setup(self) -> None:
        from dssefs.kms.local import create_keyring
        keyring = self.work / "keyring"
        create_keyring(str(keyring))
        (self.work / "store").mkdir()
        args = ["--keyring", str(keyring), "--spill-dir", str(self.work / "spill"), "--log-level", "warning",
                *self.mount_args]
        self.m = ProfiledMount(self.mnt, f"file://{self.work / 'store'}", args, log_dir=self.work, cwd=self.work,
                               bench=self)
        self.m.start()

    def cold(self) -> None:
        self.m.stop()
        drop_caches()
        self.m.start()

    def teardown(self) -> None:
        if self.m is not None:
            self.m.cleanup()

    def describe(self) -> str:
        return "dssefs local store, " + (" ".join(self.mount_args) or "default flags")


class ProfiledMount(Mount):
    """A Mount whose daemon can run under cProfile (when py-spy is not available)."""

    def __init__(self, *a, bench: Dssefs, **kw):
        super().__init__(*a, **kw)
        self.bench = bench

    def command(self) -> list[str]:
        prof = self.bench.profile
        if prof is not None and not py_spy():
            out = prof / f"dssefs-daemon-{self.runs}.cprof"
            return [sys.executable, "-m", "cProfile", "-o", str(out), "-m", "dssefs", "mount", self.source,
                    str(self.mountpoint), "--foreground", *self.args]
        return super().command()

    def start(self, *extra, timeout: float = 30.0):
        super().start(*extra, timeout=timeout)
        prof = self.bench.profile
        if prof is not None and py_spy():
            out = prof / f"dssefs-daemon-{self.runs}"
            # collapsed stacks (flamegraph.pl, speedscope and inferno read them), all threads
            self.bench.profilers.append(subprocess.Popen(
                [py_spy(), "record", "--pid", str(self.pid), "--threads", "--rate", "100", "--format", "raw",
                 "-o", f"{out}.folded"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        return self

    def stop(self, timeout: float = 60.0):
        rc = super().stop(timeout)
        for p in self.bench.profilers:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.terminate()
        self.bench.profilers.clear()
        return rc


class Gocryptfs(Target):
    name = "gocryptfs"

    def setup(self) -> None:
        self.cipher = self.work / "cipher"
        self.cipher.mkdir()
        self.mnt.mkdir()
        subprocess.run(["gocryptfs", "-init", "-q", "-extpass", "echo pw", str(self.cipher)], check=True,
                       stdout=subprocess.DEVNULL)
        self.mount()

    def mount(self) -> None:
        subprocess.run(["gocryptfs", "-q", "-nosyslog", "-extpass", "echo pw", str(self.cipher), str(self.mnt)], check=True)

    def cold(self) -> None:
        force_unmount(self.mnt)
        drop_caches()
        self.mount()

    def teardown(self) -> None:
        force_unmount(self.mnt)

    def describe(self) -> str:
        r = subprocess.run(["gocryptfs", "-version"], capture_output=True, text=True)
        return r.stdout.strip().splitlines()[0] if r.stdout else "gocryptfs"


# ---- workloads ---------------------------------------------------------------------------------------

def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t0


def bench_seq(t: Target, size_mib: int) -> dict:
    f = t.mnt / "seq.bin"
    drop_caches()  # every target starts writing with free page cache, not one the last filled up
    w = timed(["dd", "if=/dev/zero", f"of={f}", "bs=1M", f"count={size_mib}", "conv=fsync", "status=none"])
    t.cold()
    r = timed(["dd", f"if={f}", "of=/dev/null", "bs=1M", "status=none"])
    assert f.stat().st_size == size_mib * MiB
    f.unlink()
    return {"seq_write_MBps": size_mib * MiB / w / MB, "seq_read_MBps": size_mib * MiB / r / MB,
            "seq_write_s": w, "seq_read_s": r}


def bench_rand(t: Target, size_mib: int, reads: int, seed: int = 1) -> dict:
    f = t.mnt / "rand.bin"
    block = os.urandom(MiB)
    with open(f, "wb") as out:
        for i in range(size_mib):
            out.write(i.to_bytes(8, "big") + block[8:])
        out.flush()
        os.fsync(out.fileno())
    t.cold()
    rng = random.Random(seed)
    offsets = [rng.randrange(size_mib * MiB // 4096) * 4096 for _ in range(reads)]
    fd = os.open(f, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        for off in offsets:
            if len(os.pread(fd, 4096, off)) != 4096:
                raise RuntimeError("short read")
        el = time.perf_counter() - t0
    finally:
        os.close(fd)
    f.unlink()
    return {"rand_read_iops": reads / el, "rand_read_s": el}


def make_tarball(package: str, out: Path) -> tuple[Path, int, int]:
    mod = __import__(package)
    src = Path(mod.__file__).parent
    files = nbytes = 0
    with tarfile.open(out, "w") as tf:
        for p in sorted(src.rglob("*")):
            tf.add(p, arcname=str(p.relative_to(src.parent)), recursive=False)
            if p.is_file() and not p.is_symlink():
                files += 1
                nbytes += p.stat().st_size
    return out, files, nbytes


def read_tree(root: Path) -> tuple[int, int]:
    files = nbytes = 0
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            with open(os.path.join(dirpath, n), "rb", buffering=0) as f:
                while chunk := f.read(MiB):
                    nbytes += len(chunk)
            files += 1
    return files, nbytes


def bench_tree(t: Target, tarball: Path, files: int, nbytes: int) -> dict:
    dest = t.mnt / "tree"
    dest.mkdir()
    drop_caches()
    x = timed(["tar", "-C", str(dest), "-xf", str(tarball)])
    # durable: sync(2), not syncfs of the mount (FUSE passes syncfs on to few file systems, so a
    # gocryptfs extract would otherwise still sit in the backing file system's page cache)
    t0 = time.perf_counter()
    os.sync()
    s = time.perf_counter() - t0
    t.cold()
    t0 = time.perf_counter()
    got_files, got_bytes = read_tree(dest)
    r = time.perf_counter() - t0
    if (got_files, got_bytes) != (files, nbytes):
        raise RuntimeError(f"{t.name}: tree read back {got_files} files / {got_bytes} B, "
                           f"expected {files} / {nbytes}")
    return {"tree_extract_s": x, "tree_sync_s": s, "tree_read_s": r, "tree_read_files_per_s": files / r}


def bench_tree_rm(t: Target) -> dict:
    t0 = time.perf_counter()
    shutil.rmtree(t.mnt / "tree")
    return {"tree_rm_s": time.perf_counter() - t0}


# ---- reporting ---------------------------------------------------------------------------------------

COLUMNS = [  # key, label, higher is better
    ("seq_write_MBps", "seq write MB/s", True),
    ("seq_read_MBps", "seq read MB/s", True),
    ("tree_extract_s", "tree extract s", False),
    ("tree_sync_s", "+sync s", False),
    ("tree_read_s", "tree read s", False),
    ("tree_rm_s", "tree rm -r s", False),
    ("rand_read_iops", "4K rand read IOPS", True),
]


def table(results: dict[str, dict], ref: str = "gocryptfs") -> str:
    names = list(results)
    rows = [["metric", *names] + ([f"{n}/{ref}" for n in names if n != ref] if ref in results else [])]
    for key, label, higher in COLUMNS:
        vals = [results[n].get(key) for n in names]
        if all(v is None for v in vals):
            continue
        row = [label] + [("-" if v is None else f"{v:,.2f}" if v < 100 else f"{v:,.0f}") for v in vals]
        if ref in results:
            base = results[ref].get(key)
            for n in names:
                if n == ref:
                    continue
                v = results[n].get(key)
                if v is None or not base:
                    row.append("-")
                else:  # speed ratio: > 1.00 means faster than the reference
                    row.append(f"{(v / base if higher else base / v):.2f}x")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1024, help="sequential file size in MiB (default 1024)")
    p.add_argument("--rand-size", type=int, default=256, help="random-read file size in MiB (default 256)")
    p.add_argument("--rand-reads", type=int, default=2000, help="random 4 KiB reads (default 2000)")
    p.add_argument("--tree", default="moto", help="installed package whose tree is extracted (default moto)")
    p.add_argument("--only", default="dssefs,plain,gocryptfs", help="comma-separated targets")
    p.add_argument("--repeat", type=int, default=1, help="runs per target; medians are reported")
    p.add_argument("--workdir", help="where stores, cipher dirs and mounts go (default: a temp dir in /var/tmp)")
    p.add_argument("--chunk-size", help="dssefs --chunk-size")
    p.add_argument("--cache-size", help="dssefs --cache-size")
    p.add_argument("--workers", help="dssefs --workers")
    p.add_argument("--mount-arg", action="append", default=[], help="extra dssefs mount argument (repeatable)")
    p.add_argument("--profile", type=Path, help="profile the dssefs daemon into this directory "
                   "(py-spy when installed, else cProfile)")
    p.add_argument("--skip", default="", help="comma-separated workloads to skip: seq,tree,rand")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ns = p.parse_args(argv)

    if os.geteuid() != 0:
        log("warning: not root: drop_caches will fail and FUSE may be unavailable")
    mount_args = list(ns.mount_arg)
    for opt in ("chunk_size", "cache_size", "workers"):
        if getattr(ns, opt):
            mount_args += [f"--{opt.replace('_', '-')}", getattr(ns, opt)]
    wanted = [w.strip() for w in ns.only.split(",") if w.strip()]
    if "gocryptfs" in wanted and not shutil.which("gocryptfs"):
        log("gocryptfs not installed: skipped")
        wanted.remove("gocryptfs")
    skip = set(filter(None, ns.skip.split(",")))
    if ns.profile:
        ns.profile.mkdir(parents=True, exist_ok=True)

    base = Path(ns.workdir or tempfile.mkdtemp(prefix="dssefs-bench-", dir="/var/tmp")).absolute()
    base.mkdir(parents=True, exist_ok=True)
    tarball, tree_files, tree_bytes = make_tarball(ns.tree, base / "tree.tar")
    log(f"tree: {ns.tree}: {tree_files} files, {tree_bytes / MB:.1f} MB; work dir {base}")

    runs: dict[str, list[dict]] = {w: [] for w in wanted}
    described: dict[str, str] = {}
    live: list[tuple[Target, dict]] = []
    # Nothing is deleted until every target has run its creating workloads: ext4 skips inodes freed
    # in the last minutes when it allocates new ones, so a bulk delete (rm -r of a tree, removing a
    # work directory) would slow down whichever target creates files next in the same block group.
    try:
        for rep in range(ns.repeat):
            for name in wanted:
                work = base / f"{name}-{rep}"
                work.mkdir()
                t = {"dssefs": lambda: Dssefs(work, mount_args, ns.profile), "plain": lambda: Plain(work),
                     "gocryptfs": lambda: Gocryptfs(work)}[name]()
                res: dict = {}
                live.append((t, res))
                t.setup()
                described[name] = t.describe()
                if "seq" not in skip:
                    log(f"[{rep + 1}/{ns.repeat}] {name}: sequential {ns.size} MiB")
                    res.update(bench_seq(t, ns.size))
                if "tree" not in skip:
                    log(f"[{rep + 1}/{ns.repeat}] {name}: tree")
                    res.update(bench_tree(t, tarball, tree_files, tree_bytes))
                if "rand" not in skip:
                    log(f"[{rep + 1}/{ns.repeat}] {name}: random 4 KiB reads")
                    res.update(bench_rand(t, ns.rand_size, ns.rand_reads))
                runs[name].append(res)
        if "tree" not in skip:
            for t, res in live:
                log(f"{t.name}: rm -r tree")
                res.update(bench_tree_rm(t))
        for t, res in live:
            log(f"    {t.name}: {json.dumps({k: round(v, 3) for k, v in res.items()})}")
    finally:
        for t, _res in live:
            with contextlib.suppress(Exception):
                t.teardown()
        leftover = [str(base / d / "mnt") for d in os.listdir(base) if mounted(base / d / "mnt")] \
            if base.exists() else []
        for m in leftover:
            force_unmount(m)
        if not ns.workdir:
            shutil.rmtree(base, ignore_errors=True)

    results = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in runs.items() if rs}
    if ns.json:
        print(json.dumps({"params": {"size_mib": ns.size, "rand_size_mib": ns.rand_size,
                                     "rand_reads": ns.rand_reads, "tree": ns.tree, "tree_files": tree_files,
                                     "tree_bytes": tree_bytes, "repeat": ns.repeat, "dssefs_args": mount_args},
                          "targets": described, "results": results, "runs": runs}, indent=2))
    else:
        print(f"seq: {ns.size} MiB dd bs=1M conv=fsync, read after drop_caches (+remount); "
              f"tree: {ns.tree} {tree_files} files {tree_bytes / MB:.1f} MB; "
              f"rand: {ns.rand_reads} x 4 KiB pread on {ns.rand_size} MiB, cold; medians of {ns.repeat}")
        for n, d in described.items():
            print(f"  {n}: {d}")
        print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
