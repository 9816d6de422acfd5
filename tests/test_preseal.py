"""Sealing ahead (dssefs/objects/preseal.py, docs/performance.md): a file written in order is sealed
into one body in memory while it is written, and stored with one PUT and the CRC32 kept meanwhile.

The writer itself against a local store and moto (objects readable as any other, the CRC32 sent is
the body's, each chunk sealed once per message id, the single-request budget held and given back,
failures abandon it), then mounts over moto behind the fault proxy: the default mode seals ahead and
stores a large file with one PUT, a rewrite of sealed bytes or a file with holes is stored the
ordinary way under a new message id, a failing store gives EIO and loses nothing."""

from __future__ import annotations

import concurrent.futures as cf
import errno
import hashlib
import os
import zlib

import pytest

from dssefs import kms
from dssefs.crc32 import crc32_combine
from dssefs.envelope import format as fmt
from dssefs.errors import PreconditionFailed, StoreUnavailable
from dssefs.objects import Vault, bytes_source
from dssefs.objects.preseal import PresealWriter
from dssefs.objects.stream import StreamUnusable
from dssefs.store import LocalStore
from faultproxy import ERROR, fault_proxy  # noqa: F401 (fault_proxy is a fixture)
from fuse_fixtures import file_sha256, fsync_and_close_fail, requires_fuse

MiB = 1 << 20


class Recording:
    """A store whose puts are recorded with the CRC32 their caller gave (fault injection: it can
    fail the next puts)."""

    def __init__(self, inner):
        self.inner = inner
        self.puts: list[tuple[str, int | None, bytes]] = []
        self.fail = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def put(self, key, body, metadata, *, crc32=None, **kw):
        if self.fail:
            self.fail -= 1
            raise StoreUnavailable("injected: network down")
        self.puts.append((key, crc32, bytes(body)))
        return self.inner.put(key, body, metadata, crc32=crc32, **kw)


@pytest.fixture(params=["local", "s3"])
def env(request, tmp_path):
    """(store, provider) for a local store + keyring, and for moto S3 + KMS."""
    if request.param == "local":
        ring = tmp_path / "keyring"
        kms.create_keyring(ring)
        return LocalStore(tmp_path / "store"), kms.make_provider(keyring=str(ring))
    from dssefs.store.s3 import S3Store

    server = request.getfixturevalue("moto_server")
    bucket = request.getfixturevalue("bucket")
    key = server.client("kms").create_key()["KeyMetadata"]["Arn"]
    return S3Store(bucket), kms.make_provider(kms_key_id=key)


def _vault(env, **kw) -> tuple[Vault, Recording]:
    store, provider = env
    rec = Recording(store)
    return Vault(rec, provider, chunk_log2=16, workers=2, **kw), rec


def _preseal(vault: Vault, data: bytes, *, runs: int = 1 << 30, step: int = 3) -> PresealWriter:
    """Seal ahead as the file system does: after every ``step`` chunks written, one run of every
    complete chunk with more data after it (at most ``runs`` runs), up to two runs sealed at once
    in threads."""
    w = PresealWriter(vault, chunk_log2=vault.chunk_log2)
    src = bytes_source(data)
    written = 0
    with cf.ThreadPoolExecutor(2) as pool:
        inflight: set[cf.Future] = set()
        while runs and written < len(data):
            written = min(len(data), written + step * w.cs)
            run = range(w.next_chunk, (written - 1) // w.cs)
            inflight = {f for f in inflight if not f.done() or f.result()}
            if not run or len(inflight) >= 2:
                continue
            assert w.claim(run)
            inflight.add(pool.submit(w.seal, run, src))
            runs -= 1
        for f in inflight:
            f.result()
    return w


@pytest.mark.parametrize("chunks, extra, runs", [(10, 1, 1 << 30), (10, 0, 1 << 30), (7, 300, 1), (2, 5, 1 << 30),
                                                 (300, 77, 1 << 30)])
def test_sealed_ahead_object_reads_back_like_any_other(env, chunks, extra, runs):
    vault, rec = _vault(env)
    cs = 1 << vault.chunk_log2
    data = os.urandom(chunks * cs + extra)
    w = _preseal(vault, data, runs=runs)
    assert w.runs  # some chunks were sealed before the length was known
    obj = w.finish("dir/f", len(data), bytes_source(data), attrs=b"attributes", generation=0, if_none_match=True)
    again = vault.open("dir/f")
    assert again.read(0, len(data) + 1) == data and again.attrs() == b"attributes"
    assert again.header.msg_id == obj.header.msg_id == w.version.msg_id
    assert not again.sparse
    again.verify()
    # one PUT, whose CRC32 (kept while sealing) is the CRC32 of the body it sent
    [(crc, body)] = [(crc, body) for key, crc, body in rec.puts if key == "dir/f"]
    assert len(body) == fmt.body_size(len(data), cs) and crc == zlib.crc32(body)
    # chunks sealed ahead are the version's own: the whole body decodes under its header
    assert again.open_body(body) == [bytearray(data[i:i + cs]) for i in range(0, len(data), cs)]
    assert vault.single_puts.used == 0  # the body's budget was given back
    vault.close()


def test_runs_are_claimed_in_order_and_sealed_once(env):
    vault, _rec = _vault(env)
    w = PresealWriter(vault, chunk_log2=vault.chunk_log2)
    data = os.urandom(10 * w.cs)
    src = bytes_source(data)
    assert w.claim(range(0, 3))
    with pytest.raises(ValueError):
        w.claim(range(0, 3))  # claimed already: never sealed twice
    with pytest.raises(ValueError):
        w.claim(range(4, 5))  # not the next one
    assert w.claim(range(3, 5))  # sealed beside the first run, in any order
    w.seal(range(3, 5), src)  # runs may be sealed in any order
    with pytest.raises(StreamUnusable):  # run 0..3 claimed, not sealed: nothing to store yet
        w.finish("f", len(data), src, attrs=None, generation=0)
    w.abort()
    assert vault.single_puts.used == 0
    assert w.claim(range(5, 6)) is False
    with pytest.raises(StreamUnusable):
        w.finish("f", len(data), src, attrs=None, generation=0)
    vault.close()


@pytest.mark.parametrize("a, b", [(0, 0), (1, 0), (0, 1), (1000, 1 << 20), ((1 << 20) + 7, 33)])
def test_crc32_combine_matches_zlib(a, b):
    x, y = os.urandom(a), os.urandom(b)
    assert crc32_combine(zlib.crc32(x), zlib.crc32(y), b) == zlib.crc32(x + y)
    with pytest.raises(ValueError):
        crc32_combine(1, 2, -1)


def test_a_file_ending_within_the_sealed_chunks_is_refused(env):
    """Every sealed chunk is a middle chunk: a file that ends at or before the last of them (a
    truncate) cannot be finished by this writer; nothing is stored."""
    vault, rec = _vault(env)
    data = os.urandom(6 * (1 << vault.chunk_log2))
    w = PresealWriter(vault, chunk_log2=vault.chunk_log2)
    assert w.claim(range(0, 5))
    w.seal(range(0, 5), bytes_source(data))
    with pytest.raises(StreamUnusable):
        w.finish("f", 5 * w.cs, bytes_source(data), attrs=None, generation=0)
    w.abort()  # what the file system does with a writer it cannot use
    assert [p for p in rec.puts if p[0] == "f"] == [] and vault.single_puts.used == 0
    vault.close()


def test_bounds_one_request_and_the_memory_budget(env):
    cs = 1 << 16
    stride = cs + fmt.CHUNK_OVERHEAD
    # a body larger than one request: the claim is refused (the file is stored the ordinary way)
    vault, _rec = _vault(env, part_size=5 * MiB, multipart_threshold=8 * MiB)
    w = PresealWriter(vault, chunk_log2=16)
    assert w.claim(range(0, 100))
    assert w.claim(range(100, 8 * MiB // stride + 1)) is False
    w.abort()
    assert vault.single_puts.used == 0
    vault.close()
    # the budget holds what is claimed, and a claim it cannot cover is refused
    vault, _rec = _vault(env, single_put_budget=30 * stride)
    w = PresealWriter(vault, chunk_log2=16)
    assert w.claim(range(0, 10)) and vault.single_puts.used == 10 * stride
    assert w.claim(range(10, 25)) and vault.single_puts.used == 25 * stride
    assert w.claim(range(25, 31)) is False and w.next_chunk == 25
    other = PresealWriter(vault, chunk_log2=16)
    assert other.claim(range(0, 6)) is False  # what is left is too little for a second file
    assert other.claim(range(0, 5))
    w.abort()
    other.abort()
    assert vault.single_puts.used == 0
    vault.close()


def test_a_failed_finish_abandons_the_writer_and_the_next_version_has_a_new_message_id(env):
    """A store failure at close: the writer is gone (its last chunk was sealed final under its
    message id, so nothing more may be sealed under it); the file is stored again the ordinary
    way, under fresh keys."""
    vault, rec = _vault(env)
    data = os.urandom(5 * (1 << vault.chunk_log2) + 7)
    w = _preseal(vault, data)
    rec.fail = 1
    with pytest.raises(StoreUnavailable):
        w.finish("f", len(data), bytes_source(data), attrs=None, generation=0, if_none_match=True)
    assert vault.single_puts.used == 0
    with pytest.raises(StreamUnusable):
        w.finish("f", len(data), bytes_source(data), attrs=None, generation=0, if_none_match=True)
    obj = vault.write("f", bytes_source(data), len(data), if_none_match=True)
    assert obj.header.msg_id != w.version.msg_id
    assert vault.open("f").read(0, len(data)) == data
    vault.close()


def test_conditions_hold(env):
    vault, _rec = _vault(env)
    old = vault.write("f", bytes_source(b"old"), 3, if_none_match=True)
    data = os.urandom(4 * (1 << vault.chunk_log2) + 1)
    with pytest.raises(PreconditionFailed):
        _preseal(vault, data).finish("f", len(data), bytes_source(data), attrs=None, generation=0,
                                     if_none_match=True)
    w = PresealWriter(vault, chunk_log2=vault.chunk_log2, file_id=old.file_id)
    new = w.finish("f", len(data), bytes_source(data), attrs=None, generation=old.generation + 1,
                   if_match=old.etag)
    assert new.file_id == old.file_id and new.generation == old.generation + 1
    with pytest.raises(PreconditionFailed):  # replaced meanwhile
        _preseal(vault, data).finish("f", len(data), bytes_source(data), attrs=None, generation=2,
                                     if_match=old.etag)
    assert vault.open("f").read(0, len(data)) == data
    assert vault.single_puts.used == 0
    vault.close()


# ---- mounts over moto behind the fault proxy --------------------------------------------------------

def _mount(mount_factory, s3_source, tmp_path, proxy, *extra: str):
    source, args = s3_source
    m = mount_factory(tmp_path / "mnt", source, *args, "--endpoint-url", proxy.endpoint, *extra)
    m.start()
    return m


def _file_writes(proxy, bucket: str, name: str) -> list:
    return [r for r in proxy.log if r.target.split("?")[0].endswith(f"/{bucket}/{name}")
            and r.method in ("PUT", "POST")]


@requires_fuse
@pytest.mark.fuse
@pytest.mark.s3
def test_default_mode_seals_ahead_and_stores_with_one_put(fault_proxy, mount_factory, s3_source, tmp_path, bucket,
                                                          moto_server):
    m = _mount(mount_factory, s3_source, tmp_path, fault_proxy)
    data = os.urandom(24 * MiB + 4321)
    with open(m / "big.bin", "wb", buffering=0) as f:
        for off in range(0, len(data), MiB):
            f.write(data[off:off + MiB])
        os.fsync(f.fileno())
    status = m.status()
    assert status["sealed_ahead"] == {"started": 1, "stored": 1, "abandoned": 0}, status
    assert status["write_behind"]["started"] == 0
    writes = _file_writes(fault_proxy, bucket, "big.bin")
    assert [r.method for r in writes] == ["PUT"] * len(writes) and len(writes) <= 2  # (the create at open)
    head = moto_server.client("s3").head_object(Bucket=bucket, Key="big.bin")
    assert head["ContentLength"] == fmt.body_size(len(data), MiB)
    assert file_sha256(m / "big.bin") == hashlib.sha256(data).hexdigest()
    m.remount()
    assert file_sha256(m / "big.bin") == hashlib.sha256(data).hexdigest()
    # small files never get a writer
    (m / "small").write_bytes(os.urandom(MiB))
    assert m.status()["sealed_ahead"]["started"] == 0


@requires_fuse
@pytest.mark.fuse
@pytest.mark.s3
def test_rewriting_sealed_bytes_or_holes_store_the_ordinary_way(fault_proxy, mount_factory, s3_source, tmp_path,
                                                                moto_server, bucket):
    m = _mount(mount_factory, s3_source, tmp_path, fault_proxy, "--log-level", "debug")
    data = bytearray(os.urandom(12 * MiB))
    with open(m / "f.bin", "wb", buffering=0) as f:
        for off in range(0, 8 * MiB, MiB):
            f.write(data[off:off + MiB])  # each write claims the chunks that became complete
        f.seek(100)
        f.write(b"rewritten")  # inside chunk 0, sealed already
        data[100:109] = b"rewritten"
        f.seek(8 * MiB)
        f.write(data[8 * MiB:])
    assert file_sha256(m / "f.bin") == hashlib.sha256(data).hexdigest()
    status = m.status()["sealed_ahead"]
    assert status["abandoned"] == 1 and status["stored"] == 0, status
    assert "event=sealed_ahead_fallback" in m.log()
    # a file with holes is stored as a sparse version (only the chunks written)
    with open(m / "holes.bin", "wb", buffering=0) as f:
        f.write(data[:3 * MiB])
        f.seek(20 * MiB)
        f.write(b"end")
    head = moto_server.client("s3").head_object(Bucket=bucket, Key="holes.bin")
    assert head["ContentLength"] < 10 * MiB  # not 20 MiB of sealed zeros
    assert m.status()["sealed_ahead"]["abandoned"] == 2
    m.remount()
    assert file_sha256(m / "f.bin") == hashlib.sha256(data).hexdigest()
    with open(m / "holes.bin", "rb") as f:
        got = f.read()
    assert got == bytes(data[:3 * MiB]) + bytes(17 * MiB) + b"end"


@requires_fuse
@pytest.mark.fuse
@pytest.mark.s3
def test_a_failing_store_gives_eio_and_loses_nothing(fault_proxy, mount_factory, s3_source, tmp_path):
    m = _mount(mount_factory, s3_source, tmp_path, fault_proxy, "--max-attempts", "1")
    data = os.urandom(20 * MiB + 3)
    f = open(m / "f.bin", "wb", buffering=0)
    # the sealed-ahead body fails to store at fsync; the close stores the ordinary way (new keys)
    with fsync_and_close_fail(f, errno.EIO):
        for off in range(0, len(data), MiB):
            f.write(data[off:off + MiB])
        fault_proxy.add(ERROR, method="PUT", path=r"/f\.bin$", status=500, code="InternalError")
    assert m.status()["sealed_ahead"]["abandoned"] == 1
    fault_proxy.clear()
    m.remount()  # the unmount stores what is dirty
    assert file_sha256(m / "f.bin") == hashlib.sha256(data).hexdigest()


@requires_fuse
@pytest.mark.fuse
@pytest.mark.s3
def test_write_behind_option_takes_precedence(fault_proxy, mount_factory, s3_source, tmp_path):
    m = _mount(mount_factory, s3_source, tmp_path, fault_proxy, "--write-behind", "8M")
    data = os.urandom(20 * MiB)
    (m / "f.bin").write_bytes(data)
    status = m.status()
    assert status["write_behind"]["stored"] == 1 and status["sealed_ahead"]["started"] == 0, status
    assert file_sha256(m / "f.bin") == hashlib.sha256(data).hexdigest()


@requires_fuse
@pytest.mark.fuse
@pytest.mark.s3
def test_sigkill_while_sealing_ahead_keeps_the_old_version(fault_proxy, mount_factory, s3_source, tmp_path,
                                                           moto_server, bucket):
    """The sealed body lives in memory only: a daemon killed while a rewrite is being sealed
    leaves the old version, no upload and no other object behind."""
    from fuse_fixtures import force_unmount

    m = _mount(mount_factory, s3_source, tmp_path, fault_proxy, "--log-level", "debug")
    old = os.urandom(3 * MiB)
    (m / "f.bin").write_bytes(old)
    client = moto_server.client("s3")
    etag = client.head_object(Bucket=bucket, Key="f.bin")["ETag"]
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", []))
    f = open(m / "f.bin", "wb", buffering=0)  # truncates it (in memory until close)
    new = os.urandom(30 * MiB)
    for off in range(0, len(new), MiB):
        f.write(new[off:off + MiB])
    assert "event=sealed_ahead_start" in m.log()
    m.kill()
    force_unmount(m.mountpoint)
    try:
        f.close()
    except OSError:
        pass  # the daemon is gone
    assert client.head_object(Bucket=bucket, Key="f.bin")["ETag"] == etag
    assert sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])) == keys
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    m.start()
    assert (m / "f.bin").read_bytes() == old
