"""``dssefs bench``: envelope throughput next to each library's raw AES-256-GCM throughput.

In the spirit of ``gocryptfs -speed``: one run prints encrypt and decrypt MB/s of the DSSEFS v2
envelope (both layers, with key derivation, AAD and buffers) with 1 and 2 worker threads, and the
raw single-layer GCM speed of ``cryptography`` and ``pycryptodome`` on the same buffers.  The
*overhead* column is envelope time divided by the sum of the two raw passes, minus one: what the
format itself costs beyond the two unavoidable GCM passes.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import statistics
import time
from typing import Callable

from .envelope import ObjectCipher
from .envelope import format as fmt
from .envelope.inner import InnerAEAD
from .envelope.outer import OuterAEAD


def _timeit(fn: Callable[[], None], repeat: int) -> float:
    """Median wall time of ``repeat`` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _split(n: int, parts: int) -> list[range]:
    step = -(-n // parts)
    return [range(s, min(s + step, n)) for s in range(0, n, step)]


def run(total: int = 64 << 20, chunk_log2: int = fmt.DEFAULT_CHUNK_LOG2, repeat: int = 3,
        threads: tuple[int, ...] = (1, 2)) -> dict:
    cs = 1 << chunk_log2
    n = max(1, total // cs)
    total = n * cs
    plain = bytearray(os.urandom(total))
    pv = memoryview(plain)
    body = bytearray(total + n * fmt.CHUNK_OVERHEAD)
    bv = memoryview(body)
    out = bytearray(total)
    ov = memoryview(out)
    cipher = ObjectCipher.new_version(os.urandom(32), os.urandom(32), plaintext_len=total,
                                      file_id=os.urandom(16), chunk_log2=chunk_log2)
    inner, outer = InnerAEAD(os.urandom(32)), OuterAEAD(os.urandom(32))
    mid = bytearray(total + n * fmt.TAG_BYTES)
    mv = memoryview(mid)
    aad = bytes(51)
    pool = cf.ThreadPoolExecutor(max(threads))

    def seal(r: range) -> None:
        for i in r:
            o = i * (cs + fmt.CHUNK_OVERHEAD)
            cipher.seal_chunk_into(i, pv[i * cs:(i + 1) * cs], bv[o:o + cs + fmt.CHUNK_OVERHEAD])

    def open_(r: range) -> None:
        for i in r:
            o = i * (cs + fmt.CHUNK_OVERHEAD)
            cipher.open_chunk_into(i, bv[o:o + cs + fmt.CHUNK_OVERHEAD], ov[i * cs:(i + 1) * cs])

    def raw_inner(r: range) -> None:
        for i in r:
            o = i * (cs + fmt.TAG_BYTES)
            inner.encrypt_into(fmt.chunk_nonce(i), pv[i * cs:(i + 1) * cs], aad, mv[o:o + cs + fmt.TAG_BYTES])

    def raw_outer(r: range) -> None:
        for i in r:
            o = i * (cs + fmt.TAG_BYTES)
            outer.encrypt_into(fmt.chunk_nonce(i), pv[i * cs:(i + 1) * cs], aad, mv[o:o + cs + fmt.TAG_BYTES])

    def parallel(fn: Callable[[range], None], k: int) -> Callable[[], None]:
        if k == 1:
            return lambda: fn(range(n))
        return lambda: list(pool.map(fn, _split(n, k)))

    results: dict = {"plaintext_bytes": total, "chunk_size": cs, "chunks": n, "repeat": repeat,
                     "cpus": os.cpu_count(), "rows": []}
    mb = total / 1e6
    for k in threads:
        t_in = _timeit(parallel(raw_inner, k), repeat)
        t_out = _timeit(parallel(raw_outer, k), repeat)
        t_seal = _timeit(parallel(seal, k), repeat)
        # decrypt works in place on the body, so re-seal before every timed decrypt run
        t_open = statistics.median(_open_runs(parallel(seal, k), parallel(open_, k), repeat))
        if bytes(out) != bytes(plain):
            raise AssertionError("benchmark round trip produced wrong plaintext")
        results["rows"].append({
            "threads": k,
            "raw_inner_mbps": mb / t_in, "raw_outer_mbps": mb / t_out,
            "raw_both_mbps": mb / (t_in + t_out),
            "encrypt_mbps": mb / t_seal, "decrypt_mbps": mb / t_open,
            "encrypt_overhead": t_seal / (t_in + t_out) - 1.0,
            "decrypt_overhead": t_open / (t_in + t_out) - 1.0,
        })
    pool.shutdown()
    base = results["rows"][0]
    for row in results["rows"]:
        row["encrypt_scaling"] = row["encrypt_mbps"] / base["encrypt_mbps"]
        row["decrypt_scaling"] = row["decrypt_mbps"] / base["decrypt_mbps"]
    return results


def _open_runs(reseal: Callable[[], None], open_all: Callable[[], None], repeat: int) -> list[float]:
    times = []
    for _ in range(repeat + 1):
        reseal()
        t0 = time.perf_counter()
        open_all()
        times.append(time.perf_counter() - t0)
    return times[1:]


def format_table(r: dict) -> str:
    lines = [
        f"dssefs bench: {r['plaintext_bytes'] >> 20} MiB in {r['chunks']} chunks of "
        f"{r['chunk_size'] >> 10} KiB, median of {r['repeat']} runs, {r['cpus']} CPUs",
        f"{'threads':>7} {'raw inner':>10} {'raw outer':>10} {'raw both':>10} {'encrypt':>10} "
        f"{'decrypt':>10} {'enc ovh':>8} {'dec ovh':>8} {'enc x':>6} {'dec x':>6}",
    ]
    for row in r["rows"]:
        lines.append(
            f"{row['threads']:>7} {row['raw_inner_mbps']:>10.0f} {row['raw_outer_mbps']:>10.0f} "
            f"{row['raw_both_mbps']:>10.0f} {row['encrypt_mbps']:>10.0f} {row['decrypt_mbps']:>10.0f} "
            f"{row['encrypt_overhead']:>+8.1%} {row['decrypt_overhead']:>+8.1%} "
            f"{row['encrypt_scaling']:>5.2f}x {row['decrypt_scaling']:>5.2f}x")
    lines.append("MB/s = 10^6 bytes/s of plaintext; raw both = the two single-layer GCM passes back to "
                 "back; ovh = envelope time / raw both time - 1 (target <= +10%); x = speed-up over 1 "
                 "thread (target >= 1.6x at 2 threads)")
    return "\n".join(lines)


def main(total: int, chunk_log2: int, repeat: int, as_json: bool) -> int:
    r = run(total=total, chunk_log2=chunk_log2, repeat=repeat)
    print(json.dumps(r, indent=2) if as_json else format_table(r))
    return 0
