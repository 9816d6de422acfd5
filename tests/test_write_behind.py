"""Write-behind (docs/format.md 17.11, docs/semantics.md): a large file written in order is sealed
and uploaded in parts to a staging key while it is written, and stored with one copy at close.

The stream writer itself against a local store and moto (objects readable as any other, each chunk
sealed once per message id, failures clean up), then a mount over moto behind the fault proxy:
parts go out before close, the file reads back, a rewrite of uploaded bytes falls back to a new
message id, failures give EIO and lose nothing, a SIGKILL leaves the old version and the next mount
removes the staging leftovers, and another client sees the old or the new version only."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest

from dssefs import kms
from dssefs.envelope import format as fmt
from dssefs.errors import PreconditionFailed
from dssefs.objects import Vault, bytes_source
from dssefs.objects.stream import StreamUnusable, StreamWriter, staging_key
from dssefs.store import LocalStore
from dssefs.store.uploads import STAGING_DIR, abort_stale_uploads, is_staging_key
from faultproxy import ERROR, fault_proxy  # noqa: F401 (fault_proxy is a fixture)
from fuse_fixtures import file_sha256, fsync_and_close_fail, requires_fuse

MiB = 1 << 20


# ---- the stream writer ---------------------------------------------------------------------------

@pytest.fixture(params=["local", "s3"])
def env(request, tmp_path):
    """(store, provider) for a local store + keyring, and for moto S3 + KMS."""
    if request.param == "local":
        ring = tmp_path / "keyring"
        kms.create_keyring(ring)
        return LocalStore(tmp_path / "store", min_part_size=4096), kms.make_provider(keyring=str(ring))
    from dssefs.store.s3 import S3Store

    server = request.getfixturevalue("moto_server")
    bucket = request.getfixturevalue("bucket")
    key = server.client("kms").create_key()["KeyMetadata"]["Arn"]
    return S3Store(bucket), kms.make_provider(kms_key_id=key)


def _vault(store, provider) -> Vault:
    """Small chunks and parts on a local store; on S3 parts of 5 MiB (its minimum), 1 MiB chunks."""
    if isinstance(store, LocalStore):
        return Vault(store, provider, chunk_log2=12, part_size=4 * 4096, workers=2)
    return Vault(store, provider, chunk_log2=20, part_size=5 * MiB, workers=2)


def _stream(vault: Vault, data: bytes, key: str, *, parts_before: int | None = None, **kw):
    """Stream ``data`` as the writer of a file system would: every complete part with more data
    after it (or only the first ``parts_before`` of them), then finish."""
    w = StreamWriter(vault, staging_key(""), chunk_log2=vault.chunk_log2, file_id=kw.pop("file_id", None))
    src = bytes_source(data)
    n = 0
    while (w.next_chunk + w.per_part) * w.cs < len(data) and (parts_before is None or n < parts_before):
        chunks = range(w.next_chunk, w.next_chunk + w.per_part)
        w.put_part(w.claim(chunks), chunks, src)
        n += 1
    return w, w.finish(key, len(data), src, **kw)


def _staging_left(store) -> list[str]:
    return [o.key for o in store.list(STAGING_DIR, delimiter=None) if not isinstance(o, str)]


@pytest.mark.parametrize("parts, chunks, extra", [(2, 0, 1), (3, 0, 0), (2, 2, -1), (1, 3, 17)])
def test_streamed_object_reads_back_like_any_other(env, parts, chunks, extra):
    store, provider = env
    vault = _vault(store, provider)
    cs = 1 << vault.chunk_log2
    size = parts * vault.part_size + chunks * cs + extra
    data = os.urandom(size)
    w, obj = _stream(vault, data, "dir/f", attrs=b"attributes", generation=0, if_none_match=True)
    assert w.parts >= 1  # some chunks went before the length was known
    again = vault.open("dir/f")
    assert again.size == size and again.read(0, size + 1) == data and again.attrs() == b"attributes"
    assert again.header.msg_id == obj.header.msg_id == w.version.msg_id
    assert again.header.generation == 0 and not again.sparse
    again.verify()
    assert store.head("dir/f").size == fmt.body_size(size, cs)
    vault.close()  # waits for the staging object's delete
    assert _staging_left(store) == []


def test_length_a_multiple_of_the_part_holds_back_the_last_chunk(env):
    """A part is sealed only when more bytes are known to follow: the file that ends exactly at
    a part boundary finishes with that part as its tail (its last chunk final)."""
    store, provider = env
    vault = _vault(store, provider)
    data = os.urandom(3 * vault.part_size)
    w, _obj = _stream(vault, data, "f", attrs=None, generation=0)
    assert w.parts == 2  # the third part is the tail
    assert vault.open("f").read(0, len(data)) == data
    w2 = StreamWriter(vault, staging_key(""), chunk_log2=vault.chunk_log2)
    src = bytes_source(data)
    for _ in range(3):
        chunks = range(w2.next_chunk, w2.next_chunk + w2.per_part)
        w2.put_part(w2.claim(chunks), chunks, src)
    with pytest.raises(StreamUnusable):  # every chunk sealed non-final: cannot end here
        w2.finish("g", len(data), src, attrs=None, generation=0)
    w2.abort()
    vault.close()
    assert _staging_left(store) == []


def test_successor_conditions_and_conflict(env):
    store, provider = env
    vault = _vault(store, provider)
    old = vault.write("f", bytes_source(b"old"), 3, if_none_match=True)
    data = os.urandom(vault.part_size + 1000)
    with pytest.raises(PreconditionFailed):  # the key exists: If-None-Match refuses
        _stream(vault, data, "f", attrs=None, generation=0, if_none_match=True)
    _w, new = _stream(vault, data, "f", attrs=None, generation=old.generation + 1, if_match=old.etag,
                      file_id=old.file_id)
    assert new.file_id == old.file_id and new.generation == old.generation + 1
    assert vault.open("f").read(0, len(data)) == data
    with pytest.raises(PreconditionFailed):  # replaced meanwhile: If-Match on the old ETag refuses
        _stream(vault, os.urandom(vault.part_size + 10), "f", attrs=None, generation=2, if_match=old.etag)
    assert vault.open("f").read(0, len(data)) == data  # untouched
    vault.close()
    assert _staging_left(store) == []
    assert not [u for u in store.list_uploads("") if is_staging_key(u.key, "")]


def test_abort_leaves_nothing_and_writer_seals_each_chunk_once(env):
    store, provider = env
    vault = _vault(store, provider)
    w = StreamWriter(vault, staging_key(""), chunk_log2=vault.chunk_log2)
    src = bytes_source(os.urandom(3 * vault.part_size))
    chunks = range(0, w.per_part)
    w.put_part(w.claim(chunks), chunks, src)
    with pytest.raises(ValueError):
        w.claim(chunks)  # the same chunks again: refused (they would be sealed twice)
    with pytest.raises(ValueError):
        w.claim(range(w.per_part + 1, 2 * w.per_part + 1))  # not the next ones
    w.abort()
    assert not [u for u in store.list_uploads("") if is_staging_key(u.key, "")]
    with pytest.raises(StreamUnusable):
        w.finish("f", 2 * vault.part_size, src, attrs=None, generation=0)


def test_stale_cleanup_removes_staging_uploads_and_objects(moto_server, bucket):
    from dssefs.store.s3 import S3Store

    store = S3Store(bucket)
    old_upload = store.begin_upload("team/" + STAGING_DIR + "a" * 32, {})
    store.put("team/" + STAGING_DIR + "b" * 32, b"sealed bytes", {})  # completed, never copied
    store.put("team/.dssefs/epochs/" + "c" * 32, b"{}", {})  # dssefs's own record: kept
    store.put("team/file", b"x", {})
    later = time.time() + 3600
    result = abort_stale_uploads(store, "team/", 60, now=later)
    assert [u.key for u in result.aborted] == [old_upload.key]
    assert result.staging_deleted == ["team/" + STAGING_DIR + "b" * 32]
    keys = sorted(o.key for o in store.list("team/", delimiter=None))
    assert keys == ["team/.dssefs/epochs/" + "c" * 32, "team/file"]
    assert list(store.list_uploads("team/")) == []
    # a fresh one (possibly another client's stream completing) is kept (moto dates every
    # upload 2010, so only the object's age can be checked here)
    store.put("team/" + STAGING_DIR + "e" * 32, b"sealed", {})
    result = abort_stale_uploads(store, "team/", 60)
    assert not result.staging_deleted
    assert not is_staging_key("team/" + STAGING_DIR + "x/y", "team/") and not is_staging_key("team/x", "team/")


# ---- a mount over moto behind the fault proxy ------------------------------------------------------

STAGING_RX = re.escape("/" + STAGING_DIR)


def _mount(mount_factory, s3_source, tmp_path, proxy, *extra: str):
    source, args = s3_source
    m = mount_factory(tmp_path / "mnt", source, *args, "--endpoint-url", proxy.endpoint,
                      "--write-behind", "8M", *extra)
    m.start()
    return m


def _staged_parts(proxy) -> list:
    return [r for r in proxy.log if r.method == "PUT" and re.search(STAGING_RX, r.target)
            and "partNumber=" in r.target and r.status == 200]


def _wait(pred, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _write_until_staged(f, data: bytes, proxy, upto: int) -> None:
    """Write ``data[:upto]`` in 1 MiB writes, then wait until a staged part has reached the store."""
    for off in range(0, upto, MiB):
        f.write(data[off:min(off + MiB, upto)])
    _wait(lambda: _staged_parts(proxy), what="a part uploaded while the file is open")


def _client(moto_server):
    return moto_server.client("s3")


def _staging_leftovers(moto_server, bucket) -> tuple[list, list]:
    c = _client(moto_server)
    uploads = c.list_multipart_uploads(Bucket=bucket, Prefix=STAGING_DIR).get("Uploads", [])
    objects = c.list_objects_v2(Bucket=bucket, Prefix=STAGING_DIR).get("Contents", [])
    return uploads, objects


@requires_fuse
@pytest.mark.fuse
@pytest.mark.s3
def test_parts_go_out_before_close_and_the_file_reads_back(fault_proxy, mount_factory, s3_source, tmp_path,
                                                         moto_server, bucket):
    m = _mount(mount_factory, s3_source, tmp_path, fault_proxy)
    data = os.urandom(40 * MiB + 12345)
    with open(m / "big.bin", "wb", buffering=0) as f:
        _write_until_staged(f, data, fault_proxy, 30 * MiB)
        f.write(data[30 * MiB:])
        os.fsync(f.fileno())
        stored = time.time()
    log = list(fault_proxy.log)
    parts = _staged_parts(fault_proxy)
    assert len(parts) == -(-len(data) // (8 * MiB))  # every part went to the staging upload
    assert min(r.at for r in parts) < stored - 0.05  # some long before the file was stored
    # the file's key was written once, by the copy of the staging object after its completion
    mine = [r for r in log if r.target.split("?")[0].endswith(f"/{bucket}/big.bin") and r.method in ("PUT", "POST")]
    assert [r.method for r in mine] == ["PUT"], mine
    complete = [r for r in log if r.method == "POST" and re.search(STAGING_RX, r.target) and "uploadId=" in r.target]
    assert len(complete) == 1 and complete[0].at <= mine[0].at
    assert file_sha256(m / "big.bin") == hashlib.sha256(data).hexdigest()
    status = json.loads(subprocess.run([sys.executable, "-m", "dssefs", "status", "--json", str(m.mountpoint)],
                                       capture_output=True, text=True, check=True).stdout)
    wb = json.dumps(status)
    assert '"write_behind"' in wb and '"stored": 1' in wb, wb
    m.remount()
    assert file_sha256(m / "big.bin") == hashlib.sha256(data).hexdigest()
    _wait(lambda: _staging_leftovers(moto_server, bucket) == ([], []), what="the staging object deleted")


@requires_fuse
@pytest.mark.fuse
@pytest.mark.s3
def test_rewriting_uploaded_bytes_falls_back_with_a_new_message_id(fault_proxy, mount_factory, s3_source,
                                                                  tmp_path, moto_server, bucket):
    staged: dict[int, bytes] = {}

    def capture(req) -> bool:
        n = re.search(r"partNumber=(\d+)", req.target)
        if n:
            staged[int(n.group(1))] = req.body
        return False

    from faultproxy import DELAY
    fault_proxy.add(DELAY, method="PUT", path=STAGING_RX, where=capture)
    m = _mount(mount_factory, s3_source, tmp_path, fault_proxy)
    data = bytearray(os.urandom(24 * MiB))
    with open(m / "f.bin", "wb", buffering=0) as f:
        _write_until_staged(f, data, fault_proxy, 12 * MiB)
        f.seek(100)
        f.write(b"rewritten")  # inside part 1, already sealed and uploaded
        data[100:109] = b"rewritten"
        f.seek(12 * MiB)
        f.write(data[12 * MiB:])
    assert file_sha256(m / "f.bin") == hashlib.sha256(data).hexdigest()
    assert "event=write_behind_fallback" in m.log()
    m.remount()
    assert file_sha256(m / "f.bin") == hashlib.sha256(data).hexdigest()
    # chunk 1 (plaintext unchanged) sealed again under other keys: a new message id, not the
    # stream's, whose chunk 1 reached the staging upload
    body = MiB + fmt.CHUNK_OVERHEAD
    assert 1 in staged and len(staged[1]) == 8 * body
    stored = _client(moto_server).get_object(Bucket=bucket, Key="f.bin", Range=f"bytes={body}-{2 * body - 1}")
    assert stored["Body"].read() != staged[1][body:2 * body]
    _wait(lambda: _staging_leftovers(moto_server, bucket) == ([], []), what="the stream aborted")


@requires_fuse
@pytest.mark.fuse
@pytest.mark.s3
def test_a_failing_store_gives_eio_and_loses_nothing(fault_proxy, mount_factory, s3_source, tmp_path):
    m = _mount(mount_factory, s3_source, tmp_path, fault_proxy, "--max-attempts", "1")
    data = os.urandom(20 * MiB)
    f = open(m / "f.bin", "wb", buffering=0)
    with fsync_and_close_fail(f, errno.EIO):
        _write_until_staged(f, data, fault_proxy, 10 * MiB)
        # the stream's parts fail, and so does the store of the whole file that replaces the
        # broken stream (one PUT: 20 MiB is below the multipart threshold)
        fault_proxy.add(ERROR, method="PUT", path=r"partNumber=|/f\.bin$", status=500, code="InternalError")
        f.write(data[10 * MiB:])  # acknowledged: kept in memory whatever the store does
    fault_proxy.clear()
    m.remount()  # the unmount stores what is dirty
    assert file_sha256(m / "f.bin") == hashlib.sha256(data).hexdigest()


@requires_fuse
@pytest.mark.fuse
@pytest.mark.s3
def test_sigkill_mid_stream_keeps_the_old_version_and_the_next_mount_cleans_up(
        fault_proxy, mount_factory, s3_source, tmp_path, moto_server, bucket):
    from fuse_fixtures import force_unmount

    m = _mount(mount_factory, s3_source, tmp_path, fault_proxy)
    old = os.urandom(3 * MiB)
    (m / "f.bin").write_bytes(old)
    etag = _client(moto_server).head_object(Bucket=bucket, Key="f.bin")["ETag"]
    f = open(m / "f.bin", "wb", buffering=0)  # truncates it (in memory until close)
    _write_until_staged(f, os.urandom(20 * MiB), fault_proxy, 20 * MiB)
    m.kill()
    force_unmount(m.mountpoint)
    try:
        f.close()
    except OSError:
        pass  # the daemon is gone
    assert _client(moto_server).head_object(Bucket=bucket, Key="f.bin")["ETag"] == etag
    uploads, _objects = _staging_leftovers(moto_server, bucket)
    assert len(uploads) == 1
    time.sleep(1.5)
    m.start(None, None, *m.args, "--stale-upload-age", "1")
    assert (m / "f.bin").read_bytes() == old
    _wait(lambda: _staging_leftovers(moto_server, bucket) == ([], []), what="the staging upload aborted")
    assert "event=stale_upload_aborted" in m.log()


@requires_fuse
@pytest.mark.fuse
@pytest.mark.s3
def test_another_client_sees_the_old_or_the_new_version_only(fault_proxy, mount_factory, s3_source, tmp_path,
                                                             moto_server, bucket, kms_key):
    from dssefs.store.s3 import S3Store

    m = _mount(mount_factory, s3_source, tmp_path, fault_proxy)
    old = os.urandom(2 * MiB + 5)
    (m / "f.bin").write_bytes(old)
    new = os.urandom(30 * MiB + 7)
    reader = Vault(S3Store(bucket), kms.make_provider(kms_key_id=s3_source[1][1]))
    seen: list[tuple[int, bytes]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                obj = reader.open("f.bin")
                seen.append((obj.size, obj.read(obj.size - 1, 1)))  # the last chunk: final, complete
            except PreconditionFailed:
                continue  # replaced between the HEAD and the read (reads are pinned to the ETag)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
                return

    t = threading.Thread(target=watch)
    t.start()
    try:
        with open(m / "f.bin", "wb", buffering=0) as f:
            _write_until_staged(f, new, fault_proxy, 20 * MiB)
            f.write(new[20 * MiB:])
        time.sleep(0.3)
    finally:
        stop.set()
        t.join(30)
    reader.close()
    assert not errors, errors
    assert set(seen) <= {(len(old), old[-1:]), (len(new), new[-1:])}
    assert seen[0] == (len(old), old[-1:]) and seen[-1] == (len(new), new[-1:])
