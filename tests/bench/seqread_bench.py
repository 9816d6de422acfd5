#!/usr/bin/env python3
"""Sequential read of one large file after a remount, over S3 at network latency, next to boto3.

For each server (moto: S3 + KMS in memory, copies the whole object for every ranged GET; s3rver:
file-backed, serves ranges in proportion to their size), behind ``latency_proxy.py`` (every
request arrives ``--delay`` seconds late, 20 ms by default):

* boto3 through the same proxy, on an object of each size: one ``get_object`` of the whole object,
  and the object in ``--part-mib`` ranged GETs, ``--threads`` at once (the rate a ranged reader
  can reach on that server);
* dssefs (and, with ``--only``, s3fs / rclone crypt) mounted on a fresh bucket through the proxy:
  the file is written with ``dd conv=fsync`` and stored, then for each run the mount is remounted
  (page cache dropped: cold) and ``dd if=FILE of=/dev/null bs=1M`` is timed.  The first run's
  bytes are checked against what was written (outside the timing).

Printed per server and size: MB/s (median and every run), boto3's rates, dssefs's ratio to
them, and the ranged GETs the proxy counted during one read (how many, and their sizes with
``--proxy-log``).

Sizes: ``--sizes`` MiB (default 64) on every server, plus ``--large`` (1 GiB) on s3rver only (a
ranged reader needs a whole-object copy of moto's per request).  Needs root (FUSE, drop_caches)
and s3rver (``npm install --prefix /opt/s3rver s3rver``, or ``--s3rver PATH``).  Not collected by
pytest; run from the repository root with the project's Python::

    python tests/bench/seqread_bench.py                        # 64 MiB on moto and s3rver, 3 runs
    python tests/bench/seqread_bench.py --large --servers s3rver
    python tests/bench/seqread_bench.py --only dssefs,s3fs,rclone --repeat 2
    python tests/bench/seqread_bench.py --dssefs-opts "--workers 8" --proxy-log --workdir /tmp/sr
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from latency_proxy import LatencyProxy  # noqa: E402
from latency_targets import Moto, S3rver, available, find_s3rver, log, make_target  # noqa: E402

MB = 1_000_000
MiB = 1 << 20


def run(cmd: list[str], timeout: float = 1800) -> None:
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {r.returncode}: {r.stderr.decode(errors='replace')[-2000:]}")


def digest(path: Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    left = limit
    with open(path, "rb", buffering=0) as f:
        while left is None or left > 0:
            block = f.read(MiB if left is None else min(MiB, left))
            if not block:
                break
            h.update(block)
            if left is not None:
                left -= len(block)
    return h.hexdigest()


# ---- boto3 ----------------------------------------------------------------------------------------------

def boto3_rates(server, proxy: LatencyProxy, src: Path, mib: int, part_mib: int, threads: int,
                repeat: int) -> dict:
    """boto3 through the proxy: one whole-object GET and ``part_mib`` ranged GETs ``threads`` at
    once, of a ``mib`` MiB object; medians of ``repeat`` runs (MB/s)."""
    bucket = server.new_bucket(f"seqread-boto3-{uuid.uuid4().hex[:10]}")
    c = server.client("s3", endpoint=proxy.endpoint, max_pool_connections=max(16, threads * 2))
    size = mib * MiB
    out: dict = {"single": [], "ranged": []}
    try:
        if src.stat().st_size == size:
            c.upload_file(str(src), bucket, "big")  # managed upload: never the whole body in memory
        else:
            with open(src, "rb") as f:
                c.put_object(Bucket=bucket, Key="big", Body=f.read(size))
        c.head_object(Bucket=bucket, Key="big")
        part = part_mib * MiB
        ranges = [(off, min(size, off + part) - 1) for off in range(0, size, part)]

        def get(r: tuple[int, int]) -> int:
            body = c.get_object(Bucket=bucket, Key="big", Range=f"bytes={r[0]}-{r[1]}")["Body"]
            n = 0
            while block := body.read(MiB):
                n += len(block)
            return n

        with cf.ThreadPoolExecutor(threads) as pool:
            for _ in range(repeat):
                t0 = time.perf_counter()
                body = c.get_object(Bucket=bucket, Key="big")["Body"]
                n = 0
                while block := body.read(8 * MiB):
                    n += len(block)
                out["single"].append(n / (time.perf_counter() - t0) / MB)
                if n != size:
                    raise RuntimeError(f"boto3 read {n} bytes, expected {size}")
                t0 = time.perf_counter()
                n = sum(pool.map(get, ranges))
                out["ranged"].append(n / (time.perf_counter() - t0) / MB)
                if n != size:
                    raise RuntimeError(f"boto3 ranged GETs read {n} bytes, expected {size}")
    except Exception as e:  # noqa: BLE001 - report, go on with the file systems
        out["error"] = f"{type(e).__name__}: {e}"
        log(f"    boto3 on {server.name} FAILED: {out['error']}")
    finally:
        with contextlib.suppress(Exception):
            server.drop_bucket(bucket)
    return out


# ---- a file system ----------------------------------------------------------------------------------------

RANGE = re.compile(r" range=bytes=(\d+)-(\d+)")
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of process ``pid`` so far (0 if unknown)."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, IndexError, ValueError):
        return 0.0


def pids(t, server, proxy: LatencyProxy) -> dict[str, int | None]:
    """The processes whose CPU time a read costs: the file system's, the server's, the proxy's."""
    fs = getattr(getattr(t, "m", None), "proc", None) or getattr(t, "proc", None)
    srv = getattr(server, "proc", None) or getattr(getattr(server, "server", None), "proc", None)
    return {"fs": fs.pid if fs else None, "server": srv.pid if srv else None,
            "proxy": proxy.proc.pid if proxy.proc else None}


def ranged_gets(log_path: Path | None, since: int) -> list[int]:
    """Sizes of the ranged GETs the proxy logged after byte ``since`` of its log."""
    if log_path is None or not log_path.exists():
        return []
    with open(log_path, "rb") as f:
        f.seek(since)
        text = f.read().decode(errors="replace")
    return [int(m.group(2)) - int(m.group(1)) + 1 for m in RANGE.finditer(text)]


def fs_reads(name: str, server, proxy: LatencyProxy, proxy_log: Path | None, work: Path, src: Path, mib: int,
             repeat: int, opts: str) -> dict:
    bucket = f"seqread-{name}-{uuid.uuid4().hex[:10]}"
    server.new_bucket(bucket)
    t = make_target(name, work, server, proxy.endpoint, bucket, opts)
    res: dict = {"describe": t.describe(), "MBps": []}
    f = t.mnt / "seq.bin"
    try:
        t.mount()
        t.mark()
        run(["dd", f"if={src}", f"of={f}", "bs=1M", f"count={mib}", "conv=fsync", "status=none"])
        t.settle(uploads=1)
        for i in range(repeat):
            t.remount()
            proxy.reset()
            mark = proxy_log.stat().st_size if proxy_log is not None and proxy_log.exists() else 0
            before = t.counters() or {}
            procs = pids(t, server, proxy)
            cpu0 = {k: cpu_seconds(v) for k, v in procs.items()}
            t0 = time.perf_counter()
            run(["dd", f"if={f}", "of=/dev/null", "bs=1M", "status=none"])
            wall = time.perf_counter() - t0
            res["MBps"].append(mib * MiB / wall / MB)
            res.setdefault("cpu", []).append({"wall": wall, **{k: cpu_seconds(v) - cpu0[k] for k, v in procs.items()}})
            counts = proxy.reset()
            if i == 0:
                res["proxy"] = {k: v for k, v in counts.items() if v}
                after = t.counters()
                if after is not None:
                    res["own_gets"] = after["store"].get("get", 0) - before.get("store", {}).get("get", 0)
                time.sleep(0.2)  # the proxy writes its log as it goes
                res["range_sizes"] = ranged_gets(proxy_log, mark)
                if f.stat().st_size != mib * MiB or digest(f) != digest(src, mib * MiB):
                    raise RuntimeError(f"{name}: {f} differs from what was written")
            log(f"    {name} {mib} MiB read #{i + 1}: {res['MBps'][-1]:.0f} MB/s")
    except Exception as e:  # noqa: BLE001 - one file system failing must not end the run
        res["error"] = f"{type(e).__name__}: {e}"
        log(f"    {name} on {server.name} FAILED: {res['error']} (logs in {work})")
    finally:
        with contextlib.suppress(Exception):
            t.cleanup()
        with contextlib.suppress(Exception):
            server.drop_bucket(bucket)
    return res


# ---- report -------------------------------------------------------------------------------------------------

def fmt_runs(vals: list[float]) -> str:
    if not vals:
        return "-"
    return f"{statistics.median(vals):.0f} [{', '.join(f'{v:.0f}' for v in vals)}]"


def sizes_summary(sizes: list[int]) -> str:
    if not sizes:
        return ""
    mib = [s / MiB for s in sizes]
    head = ", ".join(f"{m:g}" for m in mib[:12]) + (", ..." if len(mib) > 12 else "")
    return f"; range sizes (MiB, in order): {head}"


def report(out: dict) -> str:
    p = out["params"]
    lines = [f"sequential read after remount, delay {p['delay'] * 1e3:.0f} ms per request, {p['repeat']} run(s) "
             f"(MB/s: median [runs])", ""]
    for server, per_size in out["results"].items():
        lines.append(f"{server}: {out['describe'].get(server, '')}")
        for mib, r in per_size.items():
            b = r.get("boto3", {})
            single = statistics.median(b["single"]) if b.get("single") else None
            ranged = statistics.median(b["ranged"]) if b.get("ranged") else None
            lines.append(f"  {mib} MiB: boto3 get_object {fmt_runs(b.get('single', []))}, "
                         f"{p['part_mib']} MiB ranges x {p['threads']} threads {fmt_runs(b.get('ranged', []))}"
                         + (f"  FAILED: {b['error']}" if b.get("error") else ""))
            for name, fr in r.get("fs", {}).items():
                med = statistics.median(fr["MBps"]) if fr.get("MBps") else None
                ratio = ""
                if med and single:
                    ratio += f"; x{med / single:.2f} of get_object"
                if med and ranged:
                    ratio += f", x{med / ranged:.2f} of parallel ranges"
                proxy = fr.get("proxy", {})
                gets = proxy.get("GetObject(range)", 0) + proxy.get("GetObject", 0)
                lines.append(f"    {name:<7} {fmt_runs(fr.get('MBps', []))}{ratio}; {gets} GETs in one read"
                             + sizes_summary(fr.get("range_sizes", []))
                             + (f"  FAILED: {fr['error']}" if fr.get("error") else ""))
                if fr.get("cpu"):
                    med = {k: statistics.median(c[k] for c in fr["cpu"]) for k in fr["cpu"][0]}
                    lines.append(f"            CPU s per read (medians): {name} {med['fs']:.2f}, server "
                                 f"{med['server']:.2f}, proxy {med['proxy']:.2f}; wall {med['wall']:.2f} s")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--delay", type=float, default=0.02, help="seconds each request arrives late (default 0.02)")
    p.add_argument("--servers", default="moto,s3rver", help="comma-separated (default moto,s3rver)")
    p.add_argument("--sizes", default="64", help="file sizes in MiB, comma-separated (default 64)")
    p.add_argument("--large", action="store_true", help="also 1 GiB, on s3rver only")
    p.add_argument("--repeat", type=int, default=3, help="timed reads per size (default 3)")
    p.add_argument("--only", default="dssefs", help="file systems: dssefs, s3fs, rclone (default dssefs)")
    p.add_argument("--dssefs-opts", default="", help="extra dssefs mount options, one shell-quoted string")
    p.add_argument("--part-mib", type=int, default=8, help="boto3's ranged GET size in MiB (default 8)")
    p.add_argument("--threads", type=int, default=8, help="boto3's ranged GETs at once (default 8)")
    p.add_argument("--skip-boto3", action="store_true")
    p.add_argument("--proxy-log", action="store_true", help="log requests (range sizes in the report)")
    p.add_argument("--s3rver", help="the s3rver executable (default: looked up)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the figures to FILE")
    p.add_argument("--workdir", type=Path, help="kept afterwards (default: a temporary directory, removed)")
    ns = p.parse_args(argv)

    if os.geteuid() != 0:
        log("warning: not root: FUSE mounts and drop_caches may fail")
    names = [n.strip() for n in ns.only.split(",") if n.strip() and available(n.strip())]
    servers_wanted = [s.strip() for s in ns.servers.split(",") if s.strip()]
    s3rver_bin = find_s3rver(ns.s3rver)
    if "s3rver" in servers_wanted and not s3rver_bin:
        log("s3rver not found (npm install --prefix /opt/s3rver s3rver): skipped")
        servers_wanted.remove("s3rver")
    sizes = [int(s) for s in ns.sizes.split(",") if s.strip()]
    biggest = max(sizes + ([1024] if ns.large else []))

    base = (ns.workdir or Path(tempfile.mkdtemp(prefix="dssefs-seqread-", dir="/var/tmp"))).absolute()
    base.mkdir(parents=True, exist_ok=True)
    src = base / "random.bin"
    if not src.exists() or src.stat().st_size != biggest * MiB:
        with open(src, "wb") as f:
            block = os.urandom(MiB)
            for i in range(biggest):
                f.write(hashlib.sha256(i.to_bytes(8, "big")).digest() + block[32:])  # distinct MiBs
    out: dict = {"params": {"delay": ns.delay, "repeat": ns.repeat, "part_mib": ns.part_mib, "threads": ns.threads,
                            "dssefs_opts": ns.dssefs_opts},
                 "describe": {}, "results": {}}
    try:
        for s in servers_wanted:
            server = Moto() if s == "moto" else S3rver(s3rver_bin, base / "s3rver-data")
            proxy_log = base / f"proxy-{s}.log" if ns.proxy_log else None
            proxy = LatencyProxy(server.endpoint, ns.delay, log=str(proxy_log) if proxy_log else None).start()
            out["describe"][s] = server.describe()
            try:
                for mib in sizes + ([1024] if ns.large and s == "s3rver" else []):
                    r: dict = {"fs": {}}
                    if not ns.skip_boto3:
                        log(f"{s}: boto3, {mib} MiB")
                        r["boto3"] = boto3_rates(server, proxy, src, mib, ns.part_mib, ns.threads, ns.repeat)
                    for n in names:
                        log(f"{s}: {n}, {mib} MiB")
                        work = base / f"{s}-{n}-{mib}"
                        shutil.rmtree(work, ignore_errors=True)
                        work.mkdir()
                        r["fs"][n] = fs_reads(n, server, proxy, proxy_log, work, src, mib, ns.repeat,
                                              ns.dssefs_opts if n == "dssefs" else "")
                    out["results"].setdefault(s, {})[mib] = r
            finally:
                with contextlib.suppress(Exception):
                    proxy.stop()
                with contextlib.suppress(Exception):
                    server.stop()
    finally:
        if not ns.workdir:
            shutil.rmtree(base, ignore_errors=True)
    print(report(out))
    if ns.json:
        ns.json.write_text(json.dumps(out, indent=2))
    failed = any(fr.get("error") for per in out["results"].values() for r in per.values() for fr in r["fs"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
