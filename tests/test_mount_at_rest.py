"""What a mount leaves at rest: no plaintext in the store or the spill directory, every object
verifies, and a tampered object fails loudly and alone.

Workloads write distinctive markers (>= 16 bytes) into file contents, symlink targets and xattr
values; the raw store (the local store's files under its root, or every S3 object's body, key and
metadata read with boto3 from moto) must not contain any of them, raw or hex/base64-encoded.  File
names are allowed to be visible (they are object keys), so names carry a separate marker that is
not searched for.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from fuse_fixtures import Mount, fuse_available, requires_fuse

pytestmark = [pytest.mark.fuse, requires_fuse, pytest.mark.timeout(300)]


class Markers:
    """Distinctive plaintext strings (never in file names) and their encodings."""

    def __init__(self):
        self.run = uuid.uuid4().hex[:12]
        self.made: list[bytes] = []

    def __call__(self, what: str) -> bytes:
        m = f"PLAINTEXT<{what}>{self.run}-{len(self.made):04d}".encode()
        assert len(m) >= 16
        self.made.append(m)
        return m

    def needles(self) -> list[tuple[bytes, bytes]]:
        """(marker, needle): the marker itself, its hex, and its base64 forms at every alignment."""
        out = []
        for m in self.made:
            out.append((m, m))
            out.append((m, binascii.hexlify(m)))
            for pad in range(3):
                for enc in (base64.b64encode, base64.urlsafe_b64encode, base64.b32encode):
                    e = enc(b"\0" * pad + m).rstrip(b"=")
                    out.append((m, e[4:-4]))  # the edges depend on neighbouring bytes
        return out

    def found_in(self, blob: bytes) -> list[bytes]:
        return sorted({m for m, needle in self.needles() if needle in blob})


def run_workload(m: Mount, mk: Markers, *, big: bool = True) -> dict[str, bytes]:
    """Write files every way the mount supports; return relative path -> expected contents."""
    files: dict[str, bytes] = {}
    root = m.mountpoint
    (root / "docs-NAMEVISIBLE").mkdir()
    (root / "docs-NAMEVISIBLE" / "deep" / "er").mkdir(parents=True)
    # small files written in one go
    for i in range(5):
        rel = f"docs-NAMEVISIBLE/small{i}.txt"
        files[rel] = b"head " + mk(f"small{i}") + b" tail\n"
        (root / rel).write_bytes(files[rel])
    # a multi-chunk file with a marker in every chunk and across a chunk boundary
    if big:
        chunk = 1 << 20
        body = bytearray(os.urandom(3 * chunk + 777))
        for off in (10, chunk - 20, chunk + 5, 2 * chunk + 1000, 3 * chunk + 700):
            mark = mk(f"big@{off}")
            body[off:off + len(mark)] = mark
        files["docs-NAMEVISIBLE/deep/er/big.bin"] = bytes(body)
        (root / "docs-NAMEVISIBLE/deep/er/big.bin").write_bytes(body)
    # random-offset writes, a hole, append, truncate, in-place overwrite through one descriptor
    rel = "docs-NAMEVISIBLE/edited.dat"
    model = bytearray()
    fd = os.open(root / rel, os.O_CREAT | os.O_RDWR, 0o600)
    for off in (0, 5000, 200_000, 70_000):
        mark = mk(f"pwrite@{off}")
        os.pwrite(fd, mark, off)
        model.extend(bytes(max(0, off + len(mark) - len(model))))
        model[off:off + len(mark)] = mark
    os.ftruncate(fd, 150_000)
    del model[150_000:]
    os.close(fd)
    with open(root / rel, "ab") as f:
        mark = mk("appended")
        f.write(mark)
        model.extend(mark)
    files[rel] = bytes(model)
    # an editor-style save and a rename
    tmp = root / "docs-NAMEVISIBLE" / ".swap"
    data = mk("saved-by-rename") * 3
    tmp.write_bytes(data)
    os.rename(tmp, root / "docs-NAMEVISIBLE" / "small0.txt")
    files["docs-NAMEVISIBLE/small0.txt"] = data
    os.rename(root / "docs-NAMEVISIBLE" / "small1.txt", root / "docs-NAMEVISIBLE" / "deep" / "moved1.txt")
    files["docs-NAMEVISIBLE/deep/moved1.txt"] = files.pop("docs-NAMEVISIBLE/small1.txt")
    # symlink targets and xattr values are secrets too
    os.symlink(mk("symlink-target").decode(), root / "docs-NAMEVISIBLE" / "link")
    os.setxattr(root / "docs-NAMEVISIBLE" / "small2.txt", "user.label", mk("xattr-value"))
    os.setxattr(root / "docs-NAMEVISIBLE" / "deep", "user.dirlabel", mk("dir-xattr-value"))
    return files


def check_contents(m: Mount, files: dict[str, bytes], mk: Markers) -> None:
    for rel, want in files.items():
        assert (m.mountpoint / rel).read_bytes() == want, rel
    link = os.readlink(m.mountpoint / "docs-NAMEVISIBLE" / "link").encode()
    assert link in mk.made
    assert os.getxattr(m.mountpoint / "docs-NAMEVISIBLE" / "small2.txt", "user.label") in mk.made


def raw_local_store(store: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, _dirs, names in os.walk(store):
        for n in names:
            p = Path(dirpath) / n
            if p.is_file() and not p.is_symlink():
                out[str(p.relative_to(store))] = p.read_bytes()
    return out


def raw_s3(client, bucket: str) -> dict[str, bytes]:
    """Every object's key, metadata and body as one blob per key (plus unfinished multipart parts)."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            r = client.get_object(Bucket=bucket, Key=obj["Key"])
            meta = "".join(f"{k}={v}\n" for k, v in sorted(r["Metadata"].items())).encode()
            out[obj["Key"]] = obj["Key"].encode() + b"\n" + meta + r["Body"].read()
    uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert not uploads, f"unfinished multipart uploads left behind: {uploads}"
    return out


def assert_no_plaintext(blobs: dict[str, bytes], mk: Markers, where: str) -> None:
    leaks = {k: mk.found_in(v) for k, v in blobs.items()}
    leaks = {k: v for k, v in leaks.items() if v}
    assert not leaks, f"plaintext found in {where}: {leaks}"


def dssefs_cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dssefs", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=240)


def flip_local_body_byte(obj_path: Path, where: float = 0.5) -> None:
    """Flip one bit in the body (not the header/metadata) of a local store object file."""
    raw = bytearray(obj_path.read_bytes())
    assert raw[:8] == b"DSSEOBJ1"
    body_start = 12 + int.from_bytes(raw[8:12], "big")
    pos = body_start + int((len(raw) - body_start) * where)
    raw[pos] ^= 0x01
    obj_path.write_bytes(bytes(raw))


def local_object(store: Path, rel: str) -> Path:
    candidates = [p for p in (store / "objects").rglob("*.o") if p.name == Path(rel).name + ".o"]
    assert len(candidates) == 1, candidates
    return candidates[0]


# ---- local store ----------------------------------------------------------------------------------

def test_local_store_holds_no_plaintext_and_tampering_is_caught(local_mount: Mount, tmp_path):
    m = local_mount
    store, keyring = tmp_path / "store", tmp_path / "keyring"
    mk = Markers()
    files = run_workload(m, mk)
    check_contents(m, files, mk)
    m.remount()
    check_contents(m, files, mk)
    raw = raw_local_store(store)
    assert len(raw) >= len(files)
    assert_no_plaintext(raw, mk, "the local store")
    assert_no_plaintext(raw_local_store(tmp_path / "spill"), mk, "the spill directory")
    assert_no_plaintext({"log": m.log().encode()}, mk, "the daemon log")

    r = dssefs_cli("verify", f"file://{store}/", "--keyring", keyring)
    assert r.returncode == 0, r.stdout + r.stderr
    n_objects = int(re.search(r"(\d+) of (\d+) objects verified", r.stdout).group(2))
    assert n_objects >= len(files) + 1  # files, the symlink, directory markers

    # tamper with one object's body while nothing is mounted (so no cache can hide it)
    m.stop()
    victim = "docs-NAMEVISIBLE/deep/er/big.bin"
    flip_local_body_byte(local_object(store, victim), where=0.6)
    m.start()
    with pytest.raises(OSError) as e:
        (m.mountpoint / victim).read_bytes()
    assert e.value.errno == 5  # EIO
    # the chunks before the damaged one still read; the rest of the tree is untouched
    with open(m.mountpoint / victim, "rb") as f:
        assert f.read(1 << 20) == files[victim][:1 << 20]
    check_contents(m, {k: v for k, v in files.items() if k != victim}, mk)
    assert "big.bin" in m.log()

    r = dssefs_cli("verify", f"file://{store}/", "--keyring", keyring)
    assert r.returncode == 1, r.stdout + r.stderr
    failed = [line for line in r.stdout.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and "deep/er/big.bin" in failed[0], r.stdout
    assert f"{n_objects - 1} of {n_objects} objects verified, 1 FAILED" in r.stderr


# ---- S3 (moto) ------------------------------------------------------------------------------------

def test_s3_objects_hold_no_plaintext_and_tampering_is_caught(s3_mount: Mount, moto_server, bucket, kms_key):
    m = s3_mount
    client = moto_server.client("s3")
    mk = Markers()
    files = run_workload(m, mk)
    m.remount()
    check_contents(m, files, mk)
    raw = raw_s3(client, bucket)
    assert len(raw) >= len(files)
    assert_no_plaintext(raw, mk, f"s3://{bucket}")
    assert_no_plaintext({"log": m.log().encode()}, mk, "the daemon log")

    r = dssefs_cli("verify", f"s3://{bucket}/", "--kms-key-id", kms_key)
    assert r.returncode == 0, r.stdout + r.stderr

    m.stop()
    victim = "docs-NAMEVISIBLE/small3.txt"
    key = next(k for k in raw if k.endswith("small3.txt"))
    head = client.head_object(Bucket=bucket, Key=key)
    body = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0x80
    client.put_object(Bucket=bucket, Key=key, Body=bytes(body), Metadata=head["Metadata"],
                      ContentType=head.get("ContentType", "binary/octet-stream"))
    m.start()
    with pytest.raises(OSError) as e:
        (m.mountpoint / victim).read_bytes()
    assert e.value.errno == 5  # EIO
    check_contents(m, {k: v for k, v in files.items() if k != victim}, mk)

    r = dssefs_cli("verify", f"s3://{bucket}/", "--kms-key-id", kms_key)
    assert r.returncode == 1, r.stdout + r.stderr
    failed = [line for line in r.stdout.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and key in failed[0], r.stdout


# ---- spill directory ------------------------------------------------------------------------------

def spill_fds(pid: int, spill_dir: Path) -> list[Path]:
    """The daemon's open spill files (unlinked at creation, so reachable only through /proc)."""
    out = []
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(str(spill_dir) + "/"):
            out.append(fd)
    return out


def test_spill_holds_no_plaintext_during_and_after_a_large_write(tmp_path, mount_factory, local_source):
    if not fuse_available():
        pytest.skip("needs /dev/fuse, root and fusermount3")
    source, args = local_source
    spill = tmp_path / "spill"
    m = mount_factory(tmp_path / "mnt", source, *args, "--cache-size", "4M", "--chunk-size", "256K")
    m.start()
    mk = Markers()
    block = bytearray(b"." * (64 << 10))
    marks = [mk(f"spill-block-{i}") for i in range(4)]
    for j, mark in enumerate(marks):
        block[j * 16384:j * 16384 + len(mark)] = mark  # one marker in every 16 KiB
    block = bytes(block)
    size = 48 << 20
    seen_spill: list[bytes] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            for fd in spill_fds(m.pid, spill):
                try:
                    with open(fd, "rb") as f:
                        seen_spill.append(f.read())
                except OSError:
                    pass
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with open(m.mountpoint / "large.bin", "wb") as f:
            for _ in range(size // len(block)):
                f.write(block)
            f.flush()
            # still open and not yet fsynced: most of the file is dirty, beyond the 4 MiB cache
            deadline = time.monotonic() + 10
            while not seen_spill and time.monotonic() < deadline:
                time.sleep(0.05)
            during = [Path(os.readlink(fd)) for fd in spill_fds(m.pid, spill)]
    finally:
        stop.set()
        watcher.join()
    assert seen_spill, "nothing was spilled: the test did not exercise the spill path"
    assert sum(len(s) for s in seen_spill) >= 16 << 20
    assert during and all(str(p).endswith("(deleted)") for p in during)  # never reachable by name
    assert_no_plaintext({f"spill snapshot {i}": s for i, s in enumerate(seen_spill)}, mk, "spill files")
    assert_no_plaintext(raw_local_store(spill), mk, "the spill directory")
    assert not spill_fds(m.pid, spill), "spill files still open after close"
    assert os.listdir(spill) == []
    with open(m.mountpoint / "large.bin", "rb") as f:
        for _ in range(size // len(block)):
            assert f.read(len(block)) == block
    assert_no_plaintext(raw_local_store(tmp_path / "store"), mk, "the local store")


def test_marker_search_sees_encoded_plaintext():
    """The search above would notice a marker stored raw, hex-encoded or base64/base32-encoded."""
    mk = Markers()
    m = mk("self-test")
    for blob in (m, binascii.hexlify(m), base64.b64encode(b"x" + m), base64.urlsafe_b64encode(b"xy" + m),
                 base64.b32encode(m), b"junk" + base64.b64encode(m) + b"junk"):
        assert mk.found_in(b"prefix" + blob + b"suffix") == [m], blob
    assert mk.found_in(os.urandom(4096)) == []
