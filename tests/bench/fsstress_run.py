#!/usr/bin/env python3
"""fsstress-style run on dssefs: wall time, bytes uploaded, the sizes the files reach.

Runs ``fsstress_like.py`` (the same seeded operations, 4,000 by default) on each target in turn,
as a separate process working in ``MNT/fss/p0``, and reports for each:

* the wall time of the operations (and the time per operation kind, largest first);
* for dssefs: what the daemon stored while they ran (``dssefs status MNT --json``: bytes and
  objects written, requests), then the time the unmount took, and the store's size on disk
  afterwards (local store);
* the regular files at the end: how many, their apparent total, the largest ones.

Targets: ``dssefs`` (a local store, the default), ``plain`` (a directory on the same disk),
``gocryptfs`` (when installed), ``s3`` (dssefs on a moto S3 server with a moto KMS key; moto
keeps every object in memory, so use it with fewer operations, e.g. ``--ops 500``).

Needs root (FUSE, drop_caches).  Not collected by pytest; run it from the repository root::

    python tests/bench/fsstress_run.py                           # dssefs, 4,000 ops, seed 1
    python tests/bench/fsstress_run.py --targets dssefs,plain,gocryptfs --json > fss.json
    python tests/bench/fsstress_run.py --targets s3 --ops 500
    python tests/bench/fsstress_run.py --mount-arg=--chunk-size --mount-arg=4M
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: the Mount helper and the moto server
sys.path.insert(0, str(HERE))

from fuse_fixtures import Mount  # noqa: E402
from mount_bench import Dssefs, Gocryptfs, Plain, Target, drop_caches, log  # noqa: E402

MiB = 1 << 20


class S3Dssefs(Target):
    """dssefs on a bucket of a moto server started for the run."""

    name = "s3"

    def __init__(self, work: Path, mount_args: list[str]):
        super().__init__(work)
        self.mount_args = mount_args
        self.server = None
        self.m: Mount | None = None

    def setup(self) -> None:
        from conftest import MotoServer

        self.server = MotoServer()
        os.environ.update(self.server.env)
        self.bucket = f"dssefs-fss-{uuid.uuid4().hex[:8]}"
        self.server.client("s3").create_bucket(Bucket=self.bucket)
        key = self.server.client("kms").create_key()["KeyMetadata"]["Arn"]
        args = ["--kms-key-id", key, "--spill-dir", str(self.work / "spill"), "--log-level", "warning",
                *self.mount_args]
        self.m = Mount(self.mnt, f"s3://{self.bucket}", args, env=self.server.env, log_dir=self.work)
        self.m.start()

    def teardown(self) -> None:
        try:
            if self.m is not None:
                self.m.cleanup()
        finally:
            if self.server is not None:
                self.server.stop()

    def describe(self) -> str:
        return "dssefs on moto S3 + KMS, " + (" ".join(self.mount_args) or "default flags")


def status(mnt: Path) -> dict:
    r = subprocess.run([sys.executable, "-m", "dssefs", "status", str(mnt), "--json"], capture_output=True,
                       text=True, timeout=60)
    return json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr.strip()}


def disk_usage(path: Path) -> dict:
    apparent = allocated = objects = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            apparent += st.st_size
            allocated += st.st_blocks * 512
            objects += 1
    return {"files": objects, "apparent_bytes": apparent, "allocated_bytes": allocated}


def run_target(t: Target, ops: int, seed: int) -> dict:
    t.setup()
    try:
        drop_caches()
        work = t.mnt / "fss"
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, str(HERE / "fsstress_like.py"), "-d", str(work), "-n", str(ops),
                            "-s", str(seed)], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"fsstress_like failed on {t.name}: {p.stderr[-2000:]}")
        out = json.loads(p.stdout)
        result = {"target": t.name, "describe": t.describe(), "wall_s": round(wall, 2),
                  "ops_s": out["elapsed_s"], "sizes": out["sizes"],
                  "by_op": out["by_op"]}
        m = getattr(t, "m", None)
        if m is not None:
            s = status(t.mnt)
            st = s.get("store", {})
            result["store"] = {k: st.get(k) for k in ("bytes_written", "objects_written", "bytes_read",
                                                       "requests", "failures")}
            result["flushes"] = s.get("flushes")
            result["errors"] = s.get("errors", {}).get("total")
            t0 = time.perf_counter()
            rc = m.stop(timeout=3600)
            result["unmount_s"] = round(time.perf_counter() - t0, 2)
            result["unmount_exit"] = rc
            store = t.work / "store"
            if store.is_dir():
                result["store_on_disk"] = disk_usage(store)
        return result
    finally:
        t.teardown()


def fmt_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def show(r: dict) -> str:
    sz = r["sizes"]
    lines = [f"== {r['target']}: {r['describe']}",
             f"   operations: {r['ops_s']:.2f} s ({r['wall_s']:.2f} s wall with start-up)",
             f"   files: {sz['files']}, {fmt_size(sz['total_bytes'])} apparent, "
             f"{fmt_size(sz['allocated_bytes'])} allocated as reported; {sz['over_64MiB']} over 64 MiB; "
             f"largest: {', '.join(fmt_size(x) for x in sz['largest'])}"]
    if "store" in r:
        st = r["store"]
        reqs = ", ".join(f"{k} {v}" for k, v in (st.get("requests") or {}).items() if v)
        lines.append(f"   uploaded while running: {fmt_size(st['bytes_written'] or 0)} in {st['objects_written']} "
                     f"objects ({reqs}); {r.get('flushes')}; errors {r.get('errors')}")
        lines.append(f"   unmount: {r['unmount_s']:.2f} s, exit {r['unmount_exit']}")
    if "store_on_disk" in r:
        d = r["store_on_disk"]
        lines.append(f"   store on disk after unmount: {d['files']} files, {fmt_size(d['apparent_bytes'])}")
    top = sorted(r["by_op"].items(), key=lambda kv: -kv[1]["time_s"])[:8]
    lines.append("   slowest operation kinds: " + ", ".join(
        f"{k} {v['time_s']:.1f} s/{v['n']}" for k, v in top))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--targets", default="dssefs", help="comma-separated: dssefs, plain, gocryptfs, s3")
    ap.add_argument("--mount-arg", action="append", default=[], help="extra dssefs mount argument (repeatable)")
    ap.add_argument("--workdir", help="work here and keep it (default: a temporary directory, removed)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()
    if os.geteuid() != 0:
        log("needs root (FUSE mounts, drop_caches)")
        return 1
    base = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="dssefs-fss-"))
    results = []
    try:
        for name in [x.strip() for x in args.targets.split(",") if x.strip()]:
            work = base / name
            work.mkdir(parents=True)
            if name == "dssefs":
                t: Target = Dssefs(work, args.mount_arg, None)
            elif name == "plain":
                t = Plain(work)
            elif name == "gocryptfs":
                if not shutil.which("gocryptfs"):
                    log("gocryptfs is not installed: skipped")
                    continue
                t = Gocryptfs(work)
            elif name == "s3":
                t = S3Dssefs(work, args.mount_arg)
            else:
                log(f"unknown target {name!r}")
                return 2
            log(f"running {args.ops} operations (seed {args.seed}) on {name} ...")
            r = run_target(t, args.ops, args.seed)
            results.append(r)
            log(show(r))
            if not args.workdir:
                shutil.rmtree(work, ignore_errors=True)  # the sparse files may be large
    finally:
        if not args.workdir:
            shutil.rmtree(base, ignore_errors=True)
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
