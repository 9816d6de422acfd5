#!/usr/bin/env python3
"""S3 latency benchmark: dssefs, s3fs and rclone crypt over a loopback S3 that answers late.

Every request to the store (and to KMS) goes through ``latency_proxy.py``, which delivers each
client-to-server byte ``--delay`` seconds late (default 20 ms: every request arrives 20 ms late,
also on a reused keep-alive connection).  Loopback otherwise hides every serial round trip.

Two servers, each behind its own proxy:

* moto server (S3 + KMS): every workload below; dssefs wraps its data keys with a KMS key on moto
  (KMS through the proxy too).  moto serves a ranged GET by copying the whole stored object, so
  large reads by a ranged reader (dssefs, s3fs) look worse on moto than they are;
* s3rver (npm; file-backed, serves ranges in proportion to their size): the sequential write and
  read again (dssefs with a local keyring: s3rver has no KMS).

Workloads, on each file system with a fresh bucket, in this order:

* tar x      ``tar -xf`` of a generated tree (``--files``, default 500 files in nested directories,
             1-40 KB each, ~5 MB), timed until every object is stored (``settle`` in
             latency_targets.py: dssefs reports nothing dirty or in flight; s3fs at once; rclone
             when ``vfs/stats`` shows no upload queued or running); tar's own exit time is shown too
* find       ``find`` of the tree after a remount (names only)
* ls -lR     ``ls -lR`` of the tree after another remount (every entry's attributes)
* read tree  read every file after another remount, checked against the tree's contents
* rm -r      ``rm -r`` of the tree, until stored
* seq write  ``dd bs=1M conv=fsync`` of ``--seq-mib`` MiB (64) of random data, until stored
* seq read   the same file after a remount (``dd bs=1M`` to /dev/null)
* with ``--large``: the same with 1 GiB on s3rver only (a ranged reader needs ~1,000 whole-object
  copies of moto's to read 1 GiB)

Plus boto3's own figures through the same proxies: 4 KiB PUT and GET latency, 64 MiB
put_object / get_object, 64 MiB in 1 MiB ranged GETs one after another, and boto3's managed
transfer (upload_fileobj / download_fileobj: 8 MiB parts, 10 threads); with ``--large`` all of
these for 1 GiB as well (a 1 GiB write by dssefs is a multipart upload: compare it with
upload_fileobj, which pays the server's completion of the parts too).

Printed: each figure (median of ``--repeat`` runs), the best of the peers, dssefs's ratio to the
best peer and to boto3 (``x`` > 1.00: dssefs is faster), and the requests of each workload: S3 by
kind and KMS by operation as the proxy counted them, for dssefs also its own counters
(``dssefs status --json``).

Needs root (FUSE, drop_caches), s3fs and rclone (Debian packages) and s3rver (npm; looked up on
PATH, in /opt/s3rver/node_modules/.bin and ~/node_modules/.bin, or ``--s3rver PATH``).  Not
collected by pytest; run it from the repository root with the project's Python::

    python tests/bench/latency_bench.py --quick                  # smoke run, ~1 minute
    python tests/bench/latency_bench.py --repeat 2 --json out.json   # ~14 minutes on 2 cores
    python tests/bench/latency_bench.py --large --skip tree --servers s3rver   # 1 GiB, ~4 minutes
    python tests/bench/latency_bench.py --delay 0.05 --only dssefs,rclone
    python tests/bench/latency_bench.py --only dssefs --dssefs-opts "--workers 8"
    python tests/bench/latency_bench.py --only dssefs --skip seq,boto3 --proxy-log --workdir /tmp/lb
                                      # every request in /tmp/lb/proxy-moto.log, with its time

The exit status is 1 when a workload failed on some file system (the table says which).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import io
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from latency_proxy import LatencyProxy  # noqa: E402
from latency_targets import (Moto, S3rver, Target, available, drop_caches, find_s3rver, log,  # noqa: E402
                             make_target)

MB = 1_000_000
MiB = 1 << 20
PEERS = ("s3fs", "rclone")


# ---- the tree ----------------------------------------------------------------------------------------

def make_tree(files: int, out: Path, seed: int = 1) -> dict:
    """A source-tarball-like tree: one top directory, ~files/8 nested directories (depth <= 5),
    files of 1-40 KB (log-uniform) of random bytes.  Returns its description, with each file's
    digest for checking reads."""
    rng = random.Random(seed)
    top = "proj-1.0"
    dirs = [top]
    depth = {top: 0}
    for i in range(max(2, files // 8)):
        parent = rng.choice([d for d in dirs if depth[d] < 5])
        name = f"{parent}/{rng.choice(['src', 'lib', 'mod', 'pkg', 'util', 'test', 'doc', 'core'])}{i:02d}"
        dirs.append(name)
        depth[name] = depth[parent] + 1
    exts = [".c", ".h", ".py", ".txt", ".md", ".json"]
    entries: dict[str, bytes] = {}
    for i in range(files):
        size = int(math.exp(rng.uniform(math.log(1000), math.log(40_000))))
        entries[f"{rng.choice(dirs)}/file{i:04d}{rng.choice(exts)}"] = rng.randbytes(size)
    mtime = 1_700_000_000
    with tarfile.open(out, "w", format=tarfile.GNU_FORMAT) as tf:
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, mtime
            tf.addfile(info)
        for path, data in sorted(entries.items()):
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), 0o644, mtime
            tf.addfile(info, io.BytesIO(data))
    return {"top": top, "files": files, "dirs": len(dirs), "bytes": sum(map(len, entries.values())),
            "digests": {p: hashlib.sha256(d).hexdigest() for p, d in entries.items()}, "tarball": str(out)}


def read_tree(root: Path) -> dict[str, str]:
    got = {}
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            h = hashlib.sha256()
            with open(os.path.join(dirpath, n), "rb", buffering=0) as f:
                while chunk := f.read(MiB):
                    h.update(chunk)
            got[os.path.relpath(os.path.join(dirpath, n), root.parent)] = h.hexdigest()
    return got


# ---- measuring ---------------------------------------------------------------------------------------

def run(cmd: list[str], timeout: float = 1800, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, stdout=kw.pop("stdout", subprocess.DEVNULL), stderr=subprocess.PIPE,
                       timeout=timeout, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {r.returncode}: {r.stderr.decode(errors='replace')[-2000:]}")
    return r


def delta(after: dict, before: dict) -> dict:
    out = {}
    for k, v in after.items():
        if isinstance(v, dict):
            d = delta(v, before.get(k, {}))
            if d:
                out[k] = d
        elif isinstance(v, (int, float)) and v - before.get(k, 0):
            out[k] = v - before.get(k, 0)
    return out


class Meter:
    """Counts the requests of one workload: the proxy's counts and the file system's own."""

    def __init__(self, t: Target, proxy: LatencyProxy, into: dict, name: str):
        self.t, self.proxy, self.into, self.name = t, proxy, into, name

    def __enter__(self) -> "Meter":
        self.t.mark()
        self.before = self.t.counters() or {}
        self.proxy.reset()
        return self

    def __exit__(self, exc_type, *_exc) -> None:
        if exc_type is not None:
            return
        req = {"proxy": self.proxy.reset()}
        own = self.t.counters()
        if own is not None:
            req["own"] = delta(own, self.before)
        self.into.setdefault("requests", {})[self.name] = req


def w_tar(t: Target, proxy: LatencyProxy, tree: dict, res: dict, server) -> None:
    drop_caches()
    with Meter(t, proxy, res, "tar x"):
        t0 = time.perf_counter()
        run(["tar", "--no-same-owner", "--no-same-permissions", "-C", str(t.mnt), "-xf", tree["tarball"]])
        res["tar_exit_s"] = time.perf_counter() - t0
        t.settle(uploads=tree["files"])
        res["tar_s"] = time.perf_counter() - t0
    stored = len(server.keys(t.bucket))
    if stored < tree["files"]:
        raise RuntimeError(f"{t.name}: {stored} objects in the bucket after tar x, expected >= {tree['files']}")
    res["tar_objects"] = stored


def w_find(t: Target, proxy: LatencyProxy, tree: dict, res: dict) -> None:
    t.remount()
    with Meter(t, proxy, res, "find"):
        t0 = time.perf_counter()
        out = run(["find", str(t.mnt / tree["top"])], stdout=subprocess.PIPE).stdout
        res["find_s"] = time.perf_counter() - t0
    listed = out.count(b"\n")
    if listed != tree["files"] + tree["dirs"]:
        raise RuntimeError(f"{t.name}: find listed {listed} entries, expected {tree['files'] + tree['dirs']}")


def w_ls(t: Target, proxy: LatencyProxy, tree: dict, res: dict) -> None:
    t.remount()
    with Meter(t, proxy, res, "ls -lR"):
        t0 = time.perf_counter()
        run(["ls", "-lR", str(t.mnt / tree["top"])], stdout=subprocess.PIPE)
        res["ls_s"] = time.perf_counter() - t0


def w_read(t: Target, proxy: LatencyProxy, tree: dict, res: dict) -> None:
    t.remount()
    with Meter(t, proxy, res, "read tree"):
        t0 = time.perf_counter()
        got = read_tree(t.mnt / tree["top"])
        res["read_s"] = time.perf_counter() - t0
    if got != tree["digests"]:
        bad = sorted(set(got.items()) ^ set(tree["digests"].items()))[:3]
        raise RuntimeError(f"{t.name}: tree read back differs ({len(got)} files; e.g. {bad})")


def w_rm(t: Target, proxy: LatencyProxy, tree: dict, res: dict, server) -> None:
    with Meter(t, proxy, res, "rm -r"):
        t0 = time.perf_counter()
        run(["rm", "-r", str(t.mnt / tree["top"])])
        t.settle()
        res["rm_s"] = time.perf_counter() - t0
    left = [k for k, _ in server.keys(t.bucket)]
    res["rm_objects_left"] = len(left)
    if len(left) >= tree["files"] // 10:
        raise RuntimeError(f"{t.name}: {len(left)} objects left in the bucket after rm -r, e.g. {left[:3]}")


def w_seq(t: Target, proxy: LatencyProxy, src: Path, mib: int, res: dict, prefix: str) -> None:
    f = t.mnt / "seq.bin"
    drop_caches()
    with Meter(t, proxy, res, f"{prefix} write"):
        t0 = time.perf_counter()
        run(["dd", f"if={src}", f"of={f}", "bs=1M", f"count={mib}", "conv=fsync", "status=none"])
        t.settle(uploads=1)
        res[f"{prefix}_write_MBps"] = mib * MiB / (time.perf_counter() - t0) / MB
    t.remount()
    with Meter(t, proxy, res, f"{prefix} read"):
        t0 = time.perf_counter()
        run(["dd", f"if={f}", "of=/dev/null", "bs=1M", "status=none"])
        res[f"{prefix}_read_MBps"] = mib * MiB / (time.perf_counter() - t0) / MB
    if f.stat().st_size != mib * MiB:
        raise RuntimeError(f"{t.name}: {f} has {f.stat().st_size} bytes, expected {mib * MiB}")
    with open(src, "rb") as a, open(f, "rb") as b:  # spot check: first and last MiB
        for off in (0, (mib - 1) * MiB):
            a.seek(off)
            b.seek(off)
            if a.read(MiB) != b.read(MiB):
                raise RuntimeError(f"{t.name}: {f} differs from what was written at offset {off}")
    f.unlink()
    t.settle()


def run_target(name: str, server, proxy: LatencyProxy, work: Path, ns, tree: dict | None,
               seqs: list[tuple[str, int]], src: Path) -> dict:
    """One file system on a fresh bucket of ``server``: the tree workloads (when ``tree``), then
    each sequential size; returns figures and requests.  A failing group of workloads is recorded
    in ``error`` (with the bucket's keys saved in ``work``) and the next group still runs."""
    bucket = f"bench-{name}-{uuid.uuid4().hex[:10]}"
    server.new_bucket(bucket)
    res: dict = {}
    errors: list[str] = []
    t = make_target(name, work, server, proxy.endpoint, bucket, ns.dssefs_opts)
    res["describe"] = t.describe()

    def tree_group() -> None:
        log(f"    tar x, find, ls -lR, read tree, rm -r ({tree['files']} files)")
        w_tar(t, proxy, tree, res, server)
        w_find(t, proxy, tree, res)
        w_ls(t, proxy, tree, res)
        w_read(t, proxy, tree, res)
        w_rm(t, proxy, tree, res, server)

    def seq_group(prefix: str, mib: int) -> None:
        log(f"    seq write + read, {mib} MiB")
        w_seq(t, proxy, src, mib, res, prefix)

    groups = ([("tree", tree_group, ())] if tree is not None else []) + \
        [(f"{mib} MiB", seq_group, (prefix, mib)) for prefix, mib in seqs]
    try:
        t.mount()
        for label, fn, args in groups:
            try:
                fn(*args)
            except Exception as e:  # noqa: BLE001 - one file system failing must not end the run
                errors.append(f"{label}: {type(e).__name__}: {e}")
                log(f"    {name} on {server.name} FAILED: {errors[-1]}")
                with contextlib.suppress(Exception):
                    keys = server.keys(bucket)
                    (work / f"bucket-keys-{len(errors)}.txt").write_text("".join(f"{k} {n}\n" for k, n in keys))
                log(f"    (logs and the bucket's keys in {work})")
                t.remount()  # the next group starts from a fresh mount
    except Exception as e:  # noqa: BLE001 - the mount itself failed
        errors.append(f"mount: {type(e).__name__}: {e}")
        log(f"    {name} on {server.name} FAILED: {errors[-1]}")
    finally:
        with contextlib.suppress(Exception):
            t.cleanup()
        with contextlib.suppress(Exception):
            server.drop_bucket(bucket)
    if errors:
        res["error"] = "; ".join(errors)
    return res


# ---- boto3's own figures -------------------------------------------------------------------------------

def boto3_reference(server, proxy: LatencyProxy, src: Path, mib: int, samples: int, ranged: bool) -> dict:
    from boto3.s3.transfer import TransferConfig

    bucket = server.new_bucket(f"bench-boto3-{uuid.uuid4().hex[:10]}")
    c = server.client("s3", endpoint=proxy.endpoint, max_pool_connections=16)
    res: dict = {}
    try:
        small = os.urandom(4096)
        c.put_object(Bucket=bucket, Key="warm", Body=small)  # connection and credentials set up
        proxy.reset()
        puts, gets = [], []
        for i in range(samples):
            t0 = time.perf_counter()
            c.put_object(Bucket=bucket, Key=f"small/{i}", Body=small)
            puts.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            c.get_object(Bucket=bucket, Key=f"small/{i}")["Body"].read()
            gets.append(time.perf_counter() - t0)
        res["put4k_ms"] = statistics.median(puts) * 1e3
        res["get4k_ms"] = statistics.median(gets) * 1e3
        # keep-alive: how many connections these requests used (the proxy delays each request
        # however many share a connection: compare the latencies with the connections)
        counts = proxy.reset()
        res["small_requests"] = sum(v for k, v in counts.items() if k != "connections")
        res["small_connections"] = counts.get("connections", 0)
        with open(src, "rb") as f:
            big = f.read(mib * MiB)
        t0 = time.perf_counter()
        c.put_object(Bucket=bucket, Key="big", Body=big)
        res["put_MBps"] = len(big) / (time.perf_counter() - t0) / MB
        t0 = time.perf_counter()
        got = c.get_object(Bucket=bucket, Key="big")["Body"].read()
        res["get_MBps"] = len(big) / (time.perf_counter() - t0) / MB
        if got != big:
            raise RuntimeError("boto3 read back different data")
        del got
        if ranged:
            t0 = time.perf_counter()
            for off in range(0, len(big), MiB):
                c.get_object(Bucket=bucket, Key="big", Range=f"bytes={off}-{off + MiB - 1}")["Body"].read()
            res["ranged_MBps"] = len(big) / (time.perf_counter() - t0) / MB
        cfg = TransferConfig()  # 8 MiB parts, 10 threads
        t0 = time.perf_counter()
        c.upload_fileobj(io.BytesIO(big), bucket, "managed", Config=cfg)
        res["upload_MBps"] = len(big) / (time.perf_counter() - t0) / MB
        sink = io.BytesIO()
        t0 = time.perf_counter()
        c.download_fileobj(bucket, "managed", sink, Config=cfg)
        res["download_MBps"] = len(big) / (time.perf_counter() - t0) / MB
    except Exception as e:  # noqa: BLE001
        res["error"] = f"{type(e).__name__}: {e}"
        log(f"    boto3 on {server.name} FAILED: {res['error']}")
    finally:
        with contextlib.suppress(Exception):
            server.drop_bucket(bucket)
    return res


# ---- reporting ---------------------------------------------------------------------------------------

def median_of(runs: list[dict]) -> dict:
    keys = {k for r in runs for k, v in r.items() if isinstance(v, (int, float))}
    return {k: statistics.median(r[k] for r in runs if isinstance(r.get(k), (int, float))) for k in sorted(keys)}


def median_requests(runs: list[dict]) -> dict:
    """Per workload and source (proxy / own), the median count of each kind over the runs that
    completed the workload (a kind missing from one of them counts 0 there)."""
    out: dict = {}
    for r in runs:
        for wl, srcs in r.get("requests", {}).items():
            for src, counts in srcs.items():
                out.setdefault(wl, {}).setdefault(src, []).append(_flatten(counts))
    return {wl: {src: {k: statistics.median(c.get(k, 0) for c in per_run)
                       for k in sorted({k for c in per_run for k in c})}
                 for src, per_run in srcs.items()} for wl, srcs in out.items()}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


SHORT = {"PutObject": "PUT", "GetObject": "GET", "GetObject(range)": "GET(range)", "HeadObject": "HEAD",
         "ListObjectsV2": "LIST", "ListObjects": "LIST(v1)", "CopyObject": "COPY", "DeleteObject": "DELETE",
         "DeleteObjects": "DELETE(multi)", "CreateMultipartUpload": "MPU-create", "UploadPart": "PART",
         "CompleteMultipartUpload": "MPU-complete", "AbortMultipartUpload": "MPU-abort",
         "ListMultipartUploads": "LIST-uploads", "HeadBucket": "HEAD-bucket"}


def fmt_num(v: float) -> str:
    return f"{v:.0f}" if v == int(v) else f"{v:.1f}"


def fmt_proxy(counts: dict) -> str:
    s3 = {SHORT.get(k, k): v for k, v in counts.items() if v and not k.startswith("kms:") and k != "connections"}
    kms = {k[4:]: v for k, v in counts.items() if v and k.startswith("kms:")}
    parts = [f"S3 {fmt_num(sum(s3.values()))}"]
    if s3:
        parts[0] += " (" + ", ".join(f"{k} {fmt_num(v)}" for k, v in sorted(s3.items(), key=lambda kv: -kv[1])) + ")"
    parts.append(f"KMS {fmt_num(sum(kms.values()))}" + (
        " (" + ", ".join(f"{k} {fmt_num(v)}" for k, v in sorted(kms.items())) + ")" if kms else ""))
    parts.append(f"{fmt_num(counts.get('connections', 0))} connections")
    return "; ".join(parts)


def fmt_own(counts: dict) -> str:
    store = {k.split(".", 1)[1]: v for k, v in counts.items() if k.startswith("store.") and v}
    kms = {k.split(".", 1)[1]: v for k, v in counts.items() if k.startswith("kms.") and v}
    out = "store " + (", ".join(f"{k} {fmt_num(v)}" for k, v in store.items()) or "none")
    out += "; kms " + (", ".join(f"{k} {fmt_num(v)}" for k, v in kms.items()) or "none")
    for k in ("failures", "not_found"):
        if counts.get(k):
            out += f"; {k.replace('_', ' ')} {fmt_num(counts[k])}"
    return out


#: (server, key, label, higher is better, boto3 key for the vs-boto3 ratio)
def rows(seq_mib: int, large: bool) -> list[tuple[str, str, str, bool, str | None]]:
    out = [
        ("moto", "tar_s", "tar x, until stored (s)", False, None),
        ("moto", "tar_exit_s", "  tar x, until tar exits (s)", False, None),
        ("moto", "find_s", "find after remount (s)", False, None),
        ("moto", "ls_s", "ls -lR after remount (s)", False, None),
        ("moto", "read_s", "read tree after remount (s)", False, None),
        ("moto", "rm_s", "rm -r, until stored (s)", False, None),
        ("moto", "seq_write_MBps", f"{seq_mib} MiB write, until stored (MB/s)", True, "put_MBps"),
        ("moto", "seq_read_MBps", f"{seq_mib} MiB read after remount (MB/s)", True, "get_MBps"),
        ("s3rver", "seq_write_MBps", f"s3rver: {seq_mib} MiB write (MB/s)", True, "put_MBps"),
        ("s3rver", "seq_read_MBps", f"s3rver: {seq_mib} MiB read (MB/s)", True, "get_MBps"),
    ]
    if large:
        out += [("s3rver", "large_write_MBps", "s3rver: 1 GiB write (MB/s)", True, "put_MBps"),
                ("s3rver", "large_read_MBps", "s3rver: 1 GiB read (MB/s)", True, "get_MBps")]
    return out


BOTO3_ROWS = [
    ("put4k_ms", "4 KiB PUT (ms, median)"),
    ("get4k_ms", "4 KiB GET (ms, median)"),
    ("put_MBps", "put_object, one request (MB/s)"),
    ("get_MBps", "get_object, one request (MB/s)"),
    ("ranged_MBps", "1 MiB ranged GETs, one after another (MB/s)"),
    ("upload_MBps", "upload_fileobj, 8 MiB parts x 10 threads (MB/s)"),
    ("download_MBps", "download_fileobj, 8 MiB ranges x 10 threads (MB/s)"),
]


def fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:,.2f}" if v < 10 else f"{v:,.1f}" if v < 100 else f"{v:,.0f}"


def grid(table: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def speed_ratio(v, base, higher: bool) -> str:
    if v is None or not base:
        return "-"
    return f"{(v / base if higher else base / v):.2f}x"


def describe_lines(describe: dict) -> list[str]:
    lines = []
    for k, v in describe.items():
        if isinstance(v, str):
            lines.append(f"  {k}: {v}")
        elif len(set(v.values())) == 1:
            lines.append(f"  {k}: {next(iter(v.values()))}")
        else:
            lines += [f"  {k} on {s}: {d}" for s, d in v.items()]
    return lines


def report(out: dict) -> str:
    p = out["params"]
    res, boto = out["results"], out["boto3"]
    names = p["filesystems"]
    peers = [n for n in names if n in PEERS]
    lines = [f"latency benchmark {out['date']} on {out['machine']}",
             f"delay {p['delay'] * 1e3:.0f} ms per request (client to server), medians of {p['repeat']} run(s); "
             f"tree {p['tree_files']} files / {p['tree_dirs']} dirs / {p['tree_bytes'] / MB:.1f} MB",
             *describe_lines(out["describe"]), ""]
    header = ["workload", *names]
    if "dssefs" in names and peers:
        header += ["best peer", "dssefs/best"]
    header += ["boto3", "dssefs/boto3"] if "dssefs" in names else ["boto3"]
    table = [header]
    for server, key, label, higher, bkey in rows(p["seq_mib"], p["large"]):
        vals = {n: res.get(server, {}).get(n, {}).get(key) for n in names}
        if all(v is None for v in vals.values()):
            continue
        row = [label] + [fmt(vals[n]) for n in names]
        if "dssefs" in names and peers:
            got = [(vals[n], n) for n in peers if vals[n] is not None]
            if got:
                best, who = (max if higher else min)(got)
                row += [f"{fmt(best)} {who}", speed_ratio(vals["dssefs"], best, higher)]
            else:
                row += ["-", "-"]
        b = boto.get(server, {}).get(bkey) if bkey else None
        if bkey and key.startswith("large"):
            b = boto.get(server, {}).get("large_" + bkey)
        row.append(fmt(b))
        if "dssefs" in names:
            row.append(speed_ratio(vals["dssefs"], b, higher) if bkey else "-")
        table.append(row)
    lines += [grid(table), "", "x > 1.00: dssefs is faster (shorter time or higher rate) than the reference.", ""]

    servers = [s for s in ("moto", "s3rver") if boto.get(s)]
    if servers:
        bt = [["boto3 through the same proxy", *servers]]
        for key, label in BOTO3_ROWS:
            bt.append([label] + [fmt(boto[s].get(key)) for s in servers])
        if any(boto[s].get("large_put_MBps") for s in servers):
            bt.append(["1 GiB put_object (MB/s)"] + [fmt(boto[s].get("large_put_MBps")) for s in servers])
            bt.append(["1 GiB get_object (MB/s)"] + [fmt(boto[s].get("large_get_MBps")) for s in servers])
            # multipart, as dssefs stores 1 GiB: the server's completion of the parts is included
            bt.append(["1 GiB upload_fileobj, 8 MiB parts (MB/s)"]
                      + [fmt(boto[s].get("large_upload_MBps")) for s in servers])
            bt.append(["1 GiB download_fileobj (MB/s)"] + [fmt(boto[s].get("large_download_MBps")) for s in servers])
        bt.append(["  4 KiB requests / new connections"] + [
            f"{fmt_num(boto[s].get('small_requests', 0))} / {fmt_num(boto[s].get('small_connections', 0))}"
            for s in servers])
        lines += [grid(bt), f"(64 MiB figures: {p['seq_mib']} MiB objects; moto closes every connection after "
                  "one response, s3rver keeps them alive)", ""]

    lines.append("requests per workload (medians of the runs; counted by the proxy; for dssefs also its own "
                 "counters):")
    for server in ("moto", "s3rver"):
        reqs = out["requests"].get(server, {})
        workloads = []
        for n in names:
            for wl in reqs.get(n, {}):
                if wl not in workloads:
                    workloads.append(wl)
        for wl in workloads:
            lines.append(f"  {server}: {wl}")
            for n in names:
                r = reqs.get(n, {}).get(wl)
                if not r:
                    continue
                lines.append(f"    {n:<7} {fmt_proxy(r.get('proxy', {}))}")
                if "own" in r:
                    lines.append(f"    {'':<7} own counters: {fmt_own(r['own'])}")
    errors = [f"  {s} / {n} run {i + 1}: {r['error']}" for s, per in out["runs"].items() for n, rs in per.items()
              for i, r in enumerate(rs) if r.get("error")]
    if errors:
        lines += ["", "FAILED:", *errors]
    return "\n".join(lines)


def machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} vCPU {cpu}, {platform.system()} {platform.release()}, Python {platform.python_version()}"


# ---- main --------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--delay", type=float, default=0.02, help="seconds each request arrives late (default 0.02)")
    p.add_argument("--repeat", type=int, default=1, help="runs of everything; medians are reported (default 1)")
    p.add_argument("--only", default="dssefs,s3fs,rclone", help="file systems, comma-separated")
    p.add_argument("--servers", default="moto,s3rver", help="servers, comma-separated (default moto,s3rver)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write every figure and count to FILE")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 60 files, 8 MiB sequential, 5 latency samples")
    p.add_argument("--files", type=int, help="files in the tree (default 500; --quick 60)")
    p.add_argument("--seq-mib", type=int, help="sequential file size in MiB (default 64; --quick 8)")
    p.add_argument("--large", action="store_true", help="also 1 GiB write + read on s3rver (and boto3's)")
    p.add_argument("--samples", type=int, help="boto3 4 KiB PUT/GET samples (default 30; --quick 5)")
    p.add_argument("--dssefs-opts", default="", help="extra dssefs mount options, one shell-quoted string, "
                   "e.g. \"--workers 8 --attr-delay 0\"")
    p.add_argument("--skip", default="", help="workload groups to leave out, comma-separated: tree, seq, boto3")
    p.add_argument("--proxy-log", action="store_true", help="log every request the proxies see to "
                   "WORKDIR/proxy-SERVER.log (use with --workdir)")
    p.add_argument("--s3rver", help="the s3rver executable (default: looked up)")
    p.add_argument("--workdir", type=Path, help="where tree, buckets' files and mounts go (kept afterwards; "
                   "default: a temporary directory in /var/tmp, removed)")
    ns = p.parse_args(argv)
    files = ns.files or (60 if ns.quick else 500)
    seq_mib = ns.seq_mib or (8 if ns.quick else 64)
    samples = ns.samples or (5 if ns.quick else 30)

    if os.geteuid() != 0:
        log("warning: not root: FUSE mounts and drop_caches may fail")
    wanted = [n.strip() for n in ns.only.split(",") if n.strip()]
    for n in list(wanted):
        if not available(n):
            log(f"{n} is not installed (apt-get install {n}): skipped")
            wanted.remove(n)
    servers_wanted = [s.strip() for s in ns.servers.split(",") if s.strip()]
    skip = {w.strip() for w in ns.skip.split(",") if w.strip()}
    if skip - {"tree", "seq", "boto3"}:
        p.error(f"--skip: unknown workload group(s) {', '.join(sorted(skip - {'tree', 'seq', 'boto3'}))}")
    s3rver_bin = find_s3rver(ns.s3rver)
    if "s3rver" in servers_wanted and not s3rver_bin:
        log("s3rver not found (npm install --prefix /opt/s3rver s3rver): the s3rver figures are skipped")
        servers_wanted.remove("s3rver")

    base = (ns.workdir or Path(tempfile.mkdtemp(prefix="dssefs-latency-", dir="/var/tmp"))).absolute()
    base.mkdir(parents=True, exist_ok=True)
    tree = make_tree(files, base / "tree.tar")
    src = base / "random.bin"
    with open(src, "wb") as f:
        for _ in range(1024 if ns.large else seq_mib):
            f.write(os.urandom(MiB))
    log(f"tree: {tree['files']} files in {tree['dirs']} directories, {tree['bytes'] / MB:.1f} MB; "
        f"work dir {base}")

    servers: dict = {}
    proxies: dict[str, LatencyProxy] = {}
    runs: dict[str, dict[str, list[dict]]] = {s: {n: [] for n in wanted} for s in servers_wanted}
    boto_runs: dict[str, list[dict]] = {s: [] for s in servers_wanted}
    describe: dict = {}
    started = time.monotonic()
    try:
        for s in servers_wanted:
            servers[s] = Moto() if s == "moto" else S3rver(s3rver_bin, base / "s3rver-data")
            proxies[s] = LatencyProxy(servers[s].endpoint, ns.delay,
                                      log=str(base / f"proxy-{s}.log") if ns.proxy_log else None).start()
            describe[s] = servers[s].describe()
        for rep in range(ns.repeat):
            for s in servers_wanted:
                server, proxy = servers[s], proxies[s]
                if "boto3" not in skip:
                    log(f"[{rep + 1}/{ns.repeat}] {s}: boto3")
                    b = boto3_reference(server, proxy, src, seq_mib, samples, ranged=True)
                    if ns.large and s == "s3rver":
                        big = boto3_reference(server, proxy, src, 1024, 1, ranged=False)
                        b.update({"large_" + k: big.get(k) for k in
                                  ("put_MBps", "get_MBps", "upload_MBps", "download_MBps")})
                    boto_runs[s].append(b)
                for n in wanted:
                    log(f"[{rep + 1}/{ns.repeat}] {s}: {n}")
                    work = base / f"{s}-{n}-{rep}"
                    work.mkdir()
                    seqs = [("seq", seq_mib)] + ([("large", 1024)] if ns.large and s == "s3rver" else [])
                    if "seq" in skip:
                        seqs = []
                    r = run_target(n, server, proxy, work, ns, tree if s == "moto" and "tree" not in skip else None,
                                   seqs, src)
                    describe.setdefault(n, {})[s] = r.pop("describe")
                    runs[s][n].append(r)
                    log(f"    {json.dumps({k: round(v, 3) for k, v in r.items() if isinstance(v, float)})}")
    finally:
        for proxy in proxies.values():
            with contextlib.suppress(Exception):
                proxy.stop()
        for server in servers.values():
            with contextlib.suppress(Exception):
                server.stop()
        if not ns.workdir:
            shutil.rmtree(base, ignore_errors=True)

    out = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "elapsed_s": round(time.monotonic() - started, 1),
        "params": {"delay": ns.delay, "repeat": ns.repeat, "filesystems": wanted, "servers": servers_wanted,
                   "tree_files": tree["files"], "tree_dirs": tree["dirs"], "tree_bytes": tree["bytes"],
                   "seq_mib": seq_mib, "large": ns.large, "samples": samples, "dssefs_opts": ns.dssefs_opts},
        "describe": describe,
        "results": {s: {n: median_of(rs) for n, rs in per.items() if rs} for s, per in runs.items()},
        "boto3": {s: median_of(rs) for s, rs in boto_runs.items() if rs},
        "requests": {s: {n: median_requests(rs) for n, rs in per.items() if rs} for s, per in runs.items()},
        "runs": runs,
        "boto3_runs": boto_runs,
    }
    text = report(out)
    print(text)
    print(f"\n(total {out['elapsed_s']:.0f} s)")
    if ns.json:
        ns.json.write_text(json.dumps(out, indent=2))
    return 1 if any(r.get("error") for per in runs.values() for rs in per.values() for r in rs) else 0


if __name__ == "__main__":
    sys.exit(main())
