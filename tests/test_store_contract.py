"""One behavioural contract for every ObjectStore: S3 (a real moto server over HTTP) and a local
directory must be indistinguishable to the layers above."""

from __future__ import annotations

import errno
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from dssefs.errors import (ConfigError, MetadataBudgetError, ObjectNotFound, PreconditionFailed,
                           StoreError)
from dssefs.store import (METADATA_LIMIT, MIN_PART_SIZE, LocalStore, ObjectInfo, iter_keys,
                          listing, open_store, open_store_for_uri, parse_uri)
from dssefs.store.s3 import S3Store
from threads import run_in_threads


@pytest.fixture(params=[pytest.param("s3", marks=pytest.mark.s3), "local"])
def store(request, tmp_path):
    if request.param == "s3":
        s = S3Store(request.getfixturevalue("bucket"))
    else:
        s = LocalStore(tmp_path / "store")
    try:
        yield s
    finally:
        s.close()


def keys_of(items) -> list[str]:
    return [i if isinstance(i, str) else i.key for i in items]


def body(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


# ----------------------------------------------------------------------------------------------
# put / head / get_range


def test_put_head_roundtrip(store):
    before = time.time()
    etag = store.put("dir/obj", b"hello world", {"dsse-h": "abc", "x": ""})
    info = store.head("dir/obj")
    assert info.key == "dir/obj"
    assert info.size == 11
    assert info.etag == etag
    assert etag.startswith('"') and etag.endswith('"')
    assert info.metadata == {"dsse-h": "abc", "x": ""}
    assert before - 5 <= info.mtime <= time.time() + 5


@pytest.mark.parametrize("prefix", [1, 5, 11, 12, 4096])
def test_head_with_prefix_returns_the_first_bytes_in_one_call(store, prefix):
    etag = store.put("dir/obj", b"hello world", {"dsse-h": "abc"})
    plain = store.head("dir/obj")
    assert plain.prefix is None
    info = store.head("dir/obj", prefix=prefix)
    assert (info.key, info.size, info.etag, info.metadata) == ("dir/obj", 11, etag, {"dsse-h": "abc"})
    assert info.prefix == b"hello world"[:prefix]
    assert info == plain  # the prefix is extra data, not part of the object's identity


def test_head_with_prefix_of_empty_and_missing_objects(store):
    etag = store.put("empty", b"", {"a": "b"})
    info = store.head("empty", prefix=100)
    assert (info.size, info.etag, info.metadata, info.prefix) == (0, etag, {"a": "b"}, b"")
    with pytest.raises(ObjectNotFound):
        store.head("no/such", prefix=100)


def test_metadata_keys_are_lowercased(store):
    store.put("k", b"x", {"DSSE-H": "Value-Keeps-Case", "Mixed-Key": "v"})
    assert store.head("k").metadata == {"dsse-h": "Value-Keeps-Case", "mixed-key": "v"}


def test_memoryview_and_bytearray_bodies(store):
    data = bytearray(body(1000))
    store.put("mv", memoryview(data)[10:500], {})
    assert store.get_range("mv", 0, 1000) == (bytes(data[10:500]), 490)
    store.put("ba", data, {})
    assert store.get_range("ba", 0, 2000)[0] == bytes(data)


@pytest.mark.parametrize("start,length,expect", [
    (0, 10, b"0123456789"),
    (3, 4, b"3456"),
    (8, 10, b"89"),  # runs past the end: short data
    (9, 1, b"9"),
    (10, 5, b""),  # starts at EOF
    (11, 5, b""),  # starts after EOF
    (1000, 1, b""),
    (4, 0, b""),  # empty range
])
def test_get_range(store, start, length, expect):
    store.put("r", b"0123456789", {})
    assert store.get_range("r", start, length) == (expect, 10)


def test_zero_length_object(store):
    etag = store.put("empty", b"", {"a": "b"})
    info = store.head("empty")
    assert (info.size, info.etag, info.metadata) == (0, etag, {"a": "b"})
    assert store.get_range("empty", 0, 100) == (b"", 0)
    assert store.get_range("empty", 5, 100) == (b"", 0)
    assert store.get_range("empty", 0, 0) == (b"", 0)


def test_large_object_ranges(store):
    data = body(3 * 1024 * 1024 + 7, seed=3)
    store.put("big", data, {})
    assert store.get_range("big", 0, len(data)) == (data, len(data))
    assert store.get_range("big", 1024 * 1024 - 3, 65536) == (
        data[1024 * 1024 - 3: 1024 * 1024 - 3 + 65536], len(data))


def test_get_range_if_match(store):
    etag = store.put("c", b"abc", {})
    assert store.get_range("c", 0, 3, if_match=etag) == (b"abc", 3)
    with pytest.raises(PreconditionFailed):
        store.get_range("c", 0, 3, if_match='"0123456789abcdef0123456789abcdef"')
    with pytest.raises(PreconditionFailed):
        store.get_range("c", 0, 0, if_match='"0123456789abcdef0123456789abcdef"')


def test_invalid_range_arguments(store):
    store.put("x", b"abc", {})
    with pytest.raises(ValueError):
        store.get_range("x", -1, 3)
    with pytest.raises(ValueError):
        store.get_range("x", 0, -3)


def test_missing_object(store):
    for call in (lambda: store.head("no/such"), lambda: store.get_range("no/such", 0, 10)):
        with pytest.raises(ObjectNotFound) as ei:
            call()
        assert "no such object" in str(ei.value)
        assert "no/such" in str(ei.value)
        assert "\n" not in str(ei.value)
        assert ei.value.errno == errno.ENOENT


def test_overwrite_replaces_body_and_metadata(store):
    store.put("o", b"first version", {"v": "1", "old": "x"})
    store.put("o", b"second", {"v": "2"})
    info = store.head("o")
    assert (info.size, info.metadata) == (6, {"v": "2"})
    assert store.get_range("o", 0, 100) == (b"second", 6)


# ----------------------------------------------------------------------------------------------
# Keys


@pytest.mark.parametrize("key", [
    "dir/", "a//b", "sp ace/f.txt", "uni/é/日本", "pct%41%2F", "a.o", "a.d/b", "x.tmp", "#?&=+",
    "UPPER/lower", "./dot", "../dotdot", ".hidden",
])
def test_unusual_keys(store, key):
    data = key.encode()
    store.put(key, data, {"k": "v"})
    assert store.get_range(key, 0, 1000) == (data, len(data))
    assert store.head(key).metadata == {"k": "v"}
    assert keys_of(store.list("", None)) == [key]
    store.delete(key)
    assert keys_of(store.list("", None)) == []


def test_key_and_prefix_coexist(store):
    store.put("a", b"file", {})
    store.put("a/b", b"nested", {})
    assert store.get_range("a", 0, 10) == (b"file", 4)
    assert store.get_range("a/b", 0, 10) == (b"nested", 6)
    assert keys_of(store.list("")) == ["a", "a/"]
    store.delete("a")
    assert store.get_range("a/b", 0, 10) == (b"nested", 6)
    assert keys_of(store.list("")) == ["a/"]


def test_bad_keys_refused(store):
    with pytest.raises(StoreError) as ei:
        store.put("k" * 1025, b"", {})
    assert ei.value.errno == errno.ENAMETOOLONG
    with pytest.raises(StoreError):
        store.put("", b"", {})
    with pytest.raises(StoreError):
        store.put("bad\udcff", b"", {})


# ----------------------------------------------------------------------------------------------
# Metadata budget


def _meta_of_size(n: int) -> dict[str, str]:
    # keys + values, UTF-8 bytes, as S3 counts them
    return {"dsse-h": "h" * (n - len("dsse-h"))}


def test_metadata_at_budget_accepted(store):
    meta = _meta_of_size(METADATA_LIMIT)
    store.put("m", b"x", meta)
    assert store.head("m").metadata == meta


def test_metadata_over_budget_refused(store):
    meta = _meta_of_size(METADATA_LIMIT + 1)
    with pytest.raises(MetadataBudgetError):
        store.put("m", b"x", meta)
    store.put("src", b"x", {})
    with pytest.raises(MetadataBudgetError):
        store.copy("src", "dst", meta)
    with pytest.raises(MetadataBudgetError):
        store.begin_upload("u", meta)
    assert keys_of(store.list("", None)) == ["src"]


def test_metadata_budget_counts_all_pairs(store):
    meta = {f"k{i:02d}": "v" * 60 for i in range(32)}  # 32 * 63 = 2016 bytes
    store.put("ok", b"", meta)
    meta["k99"] = "v" * 30  # 2016 + 33 = 2049
    with pytest.raises(MetadataBudgetError):
        store.put("over", b"", meta)


@pytest.mark.parametrize("meta", [
    {"bad key": "v"}, {"k": "line\nbreak"}, {"k": "caf\u00e9"}, {"k": " padded"},
    {"k": "v", "K": "w"}, {"": "v"},
])
def test_metadata_that_s3_cannot_carry_is_refused(store, meta):
    with pytest.raises(ValueError):
        store.put("m", b"", meta)


# ----------------------------------------------------------------------------------------------
# Conditional writes


def test_if_none_match(store):
    etag = store.put("c", b"one", {}, if_none_match=True)
    with pytest.raises(PreconditionFailed) as ei:
        store.put("c", b"two", {}, if_none_match=True)
    assert "\n" not in str(ei.value)
    assert store.head("c").etag == etag
    assert store.get_range("c", 0, 10)[0] == b"one"


def test_if_match(store):
    etag1 = store.put("c", b"one", {})
    etag2 = store.put("c", b"two", {}, if_match=etag1)
    assert etag2 != etag1
    with pytest.raises(PreconditionFailed):
        store.put("c", b"three", {}, if_match=etag1)  # stale
    assert store.get_range("c", 0, 10)[0] == b"two"
    etag3 = store.put("c", b"four", {"m": "1"}, if_match=etag2)
    assert store.head("c").etag == etag3


def test_if_match_on_missing_object(store):
    with pytest.raises(PreconditionFailed):
        store.put("gone", b"x", {}, if_match='"0123456789abcdef0123456789abcdef"')
    with pytest.raises(ObjectNotFound):
        store.head("gone")


def test_conflicting_conditions_refused(store):
    with pytest.raises(ValueError):
        store.put("c", b"x", {}, if_match='"a"', if_none_match=True)


# ----------------------------------------------------------------------------------------------
# Multipart uploads

PARTS = [body(MIN_PART_SIZE, 1), body(MIN_PART_SIZE, 2), body(1024, 3)]


def test_multipart_parallel_parts(store):
    up = store.begin_upload("mp/obj", {"Dsse-H": "hdr"})
    order = [3, 1, 2]
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda n: up.put_part(n, PARTS[n - 1]), order))
    with pytest.raises(ObjectNotFound):
        store.head("mp/obj")  # nothing visible before complete()
    etag = up.complete()
    info = store.head("mp/obj")
    whole = b"".join(PARTS)
    assert (info.size, info.etag, info.metadata) == (len(whole), etag, {"dsse-h": "hdr"})
    assert store.get_range("mp/obj", 0, len(whole)) == (whole, len(whole))
    assert store.get_range("mp/obj", MIN_PART_SIZE - 2, 4)[0] == whole[MIN_PART_SIZE - 2:
                                                                         MIN_PART_SIZE + 2]


def test_multipart_resent_part_replaces(store):
    up = store.begin_upload("mp", {})
    up.put_part(1, PARTS[1])
    up.put_part(2, b"old")
    up.put_part(1, memoryview(PARTS[0]))
    up.put_part(2, b"new")
    up.complete()
    assert store.get_range("mp", MIN_PART_SIZE - 1, 10) == (PARTS[0][-1:] + b"new",
                                                           MIN_PART_SIZE + 3)


def test_multipart_abort(store):
    up = store.begin_upload("mp", {})
    up.put_part(1, PARTS[2])
    up.abort()
    up.abort()  # idempotent, never raises
    with pytest.raises(ObjectNotFound):
        store.head("mp")
    with pytest.raises(StoreError):
        up.put_part(2, b"x")
    assert keys_of(store.list("", None)) == []


def test_multipart_small_part_refused(store):
    up = store.begin_upload("mp", {})
    up.put_part(1, b"too small")
    up.put_part(2, b"last")
    with pytest.raises(StoreError):
        up.complete()
    up.abort()
    with pytest.raises(ObjectNotFound):
        store.head("mp")


def test_multipart_missing_part_refused(store):
    up = store.begin_upload("mp", {})
    up.put_part(1, PARTS[0])
    up.put_part(3, b"x")
    with pytest.raises(StoreError):
        up.complete()
    up.abort()


def test_multipart_single_small_part(store):
    up = store.begin_upload("mp", {})
    up.put_part(1, b"only part")
    up.complete()
    assert store.get_range("mp", 0, 100) == (b"only part", 9)


def test_multipart_conditions(store):
    store.put("mp", b"existing", {})
    up = store.begin_upload("mp", {}, if_none_match=True)
    up.put_part(1, b"new")
    with pytest.raises(PreconditionFailed):
        up.complete()
    up.abort()
    assert store.get_range("mp", 0, 100)[0] == b"existing"

    etag = store.head("mp").etag
    stale = store.begin_upload("mp", {}, if_match='"0123456789abcdef0123456789abcdef"')
    fresh = store.begin_upload("mp", {"v": "2"}, if_match=etag)
    stale.put_part(1, b"stale")
    fresh.put_part(1, b"fresh")
    with pytest.raises(PreconditionFailed):
        stale.complete()
    new_etag = fresh.complete()
    assert store.head("mp").etag == new_etag
    assert store.get_range("mp", 0, 100)[0] == b"fresh"


# ----------------------------------------------------------------------------------------------
# Copy


def test_copy_replaces_metadata_keeps_body(store):
    data = body(100_000, 9)
    store.put("src", data, {"a": "1", "b": "2"})
    etag = store.copy("src", "dst/copy", {"C": "3"})
    info = store.head("dst/copy")
    assert info.etag == etag
    assert info.metadata == {"c": "3"}
    assert store.get_range("dst/copy", 0, len(data)) == (data, len(data))
    assert store.head("src").metadata == {"a": "1", "b": "2"}


def test_copy_onto_itself(store):
    etag = store.put("self", b"body", {"v": "1"})
    store.copy("self", "self", {"v": "2"}, if_match=etag)
    info = store.head("self")
    assert info.metadata == {"v": "2"}
    assert store.get_range("self", 0, 10)[0] == b"body"
    with pytest.raises(PreconditionFailed):
        store.copy("self", "self", {"v": "3"}, if_match='"0123456789abcdef0123456789abcdef"')
    assert store.head("self").metadata == {"v": "2"}


def test_copy_conditions_on_destination(store):
    store.put("src", b"s", {})
    dst_etag = store.put("dst", b"d", {})
    with pytest.raises(PreconditionFailed):
        store.copy("src", "dst", {}, if_none_match=True)
    with pytest.raises(PreconditionFailed):
        store.copy("src", "dst", {}, if_match='"0123456789abcdef0123456789abcdef"')
    with pytest.raises(PreconditionFailed):
        store.copy("src", "nowhere", {}, if_match=dst_etag)
    assert store.get_range("dst", 0, 10)[0] == b"d"
    store.copy("src", "dst", {"n": "1"}, if_match=dst_etag)
    assert store.get_range("dst", 0, 10)[0] == b"s"
    store.copy("src", "fresh", {}, if_none_match=True)
    assert store.get_range("fresh", 0, 10)[0] == b"s"


def test_copy_missing_source(store):
    with pytest.raises(ObjectNotFound):
        store.copy("nope", "dst", {})


def test_copy_empty_object(store):
    store.put("e", b"", {"x": "1"})
    store.copy("e", "e2", {"y": "2"})
    assert store.head("e2").size == 0
    assert store.get_range("e2", 0, 10) == (b"", 0)


# ----------------------------------------------------------------------------------------------
# Delete


def test_delete(store):
    store.put("d/x", b"x", {})
    store.delete("d/x")
    with pytest.raises(ObjectNotFound):
        store.head("d/x")
    store.delete("d/x")  # missing is fine
    store.delete("never/existed")
    assert list(store.list("")) == []


# ----------------------------------------------------------------------------------------------
# Listing

TREE = ["a", "a!b", "a/", "a/b", "a/c/d", "a/c/e", "a0", "ab", "b/x/y", "c", "z\u00e9", "\u65e5"]


def _fill(store, keys=TREE):
    for i, k in enumerate(keys):
        store.put(k, k.encode() * (i + 1), {"m": "x"})


def test_list_recursive_in_key_order(store):
    _fill(store)
    items = list(store.list("", None))
    assert keys_of(items) == sorted(TREE)
    assert all(isinstance(i, ObjectInfo) and i.metadata == {} for i in items)
    by_key = {i.key: i for i in items}
    assert by_key["a/b"].size == len(b"a/b") * 4
    assert by_key["a/b"].etag == store.head("a/b").etag


def test_list_delimiter(store):
    _fill(store)
    assert keys_of(store.list("")) == ["a", "a!b", "a/", "a0", "ab", "b/", "c", "z\u00e9",
                                       "\u65e5"]
    assert keys_of(store.list("a/")) == ["a/", "a/b", "a/c/"]
    assert keys_of(store.list("a")) == ["a", "a!b", "a/", "a0", "ab"]
    assert keys_of(store.list("a/c")) == ["a/c/"]
    assert keys_of(store.list("a/c/")) == ["a/c/d", "a/c/e"]
    assert keys_of(store.list("b/")) == ["b/x/"]
    assert keys_of(store.list("nothing/")) == []
    assert keys_of(store.list("a/", None)) == ["a/", "a/b", "a/c/d", "a/c/e"]
    lst = listing(store, "a/")
    assert [o.key for o in lst.objects] == ["a/", "a/b"] and lst.prefixes == ["a/c/"]
    assert list(iter_keys(store, "a/c")) == ["a/c/d", "a/c/e"]


def test_list_other_delimiter(store):
    _fill(store, ["x-1", "x-2-3", "x.y", "y", "y-"])
    assert keys_of(store.list("", "-")) == ["x-", "x.y", "y", "y-"]
    assert keys_of(store.list("x-", "-")) == ["x-1", "x-2-"]


def test_list_no_prefix_for_deleted_directory(store):
    store.put("p/q/r", b"", {})
    store.put("p/s", b"", {})
    store.delete("p/q/r")
    assert keys_of(store.list("p/")) == ["p/s"]
    store.delete("p/s")
    assert keys_of(store.list("")) == []


def test_list_many_keys(store):
    keys = sorted(f"many/{i:04d}" for i in range(250))
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: store.put(k, b"", {}), keys))
    assert keys_of(store.list("many/")) == keys
    assert keys_of(store.list("")) == ["many/"]


# ----------------------------------------------------------------------------------------------
# URIs


def test_parse_s3_uri():
    assert parse_uri("s3://bucket/a/b.txt") == ("s3", "bucket", "a/b.txt")
    assert parse_uri("S3://bucket") == ("s3", "bucket", "")
    assert parse_uri("s3://bucket/") == ("s3", "bucket", "")
    assert parse_uri("s3://bucket/sp ace/%41") == ("s3", "bucket", "sp ace/%41")


def test_parse_file_uri_without_store(tmp_path):
    assert parse_uri(f"file://{tmp_path}/new/x.bin") == ("file", f"{tmp_path}/new", "x.bin")
    assert parse_uri(f"file://localhost{tmp_path}/x") == ("file", str(tmp_path), "x")


def test_parse_file_uri_finds_store_root(tmp_path):
    LocalStore(tmp_path / "vault")
    assert parse_uri(f"file://{tmp_path}/vault/docs/2024/a.pdf") == (
        "file", f"{tmp_path}/vault", "docs/2024/a.pdf")
    assert parse_uri(f"file://{tmp_path}/vault/a") == ("file", f"{tmp_path}/vault", "a")


@pytest.mark.parametrize("uri,fragment", [
    ("gs://bucket/key", "unknown URI scheme 'gs://'"),
    ("/plain/path", "not a store URI"),
    ("file://relative/path", "absolute path"),
    ("file:///a/../b", "'..'"),
    ("s3:///key", "no valid bucket"),
])
def test_bad_uris(uri, fragment):
    with pytest.raises(ConfigError) as ei:
        parse_uri(uri)
    assert fragment in str(ei.value)
    assert "s3://BUCKET/KEY or file:///DIR/KEY" in str(ei.value) or fragment in ("'..'",)


def test_open_store_for_file_uri(tmp_path):
    store, key = open_store_for_uri(f"file://{tmp_path}/s/obj", region="ignored")
    assert isinstance(store, LocalStore) and key == "obj"
    assert store.root == f"{tmp_path}/s" and store.url == f"file://{tmp_path}/s"
    store.put(key, b"data", {})
    store2, key2 = open_store_for_uri(f"file://{tmp_path}/s/sub/obj2")
    assert store2.root == store.root and key2 == "sub/obj2"
    with pytest.raises(ConfigError):
        open_store_for_uri(f"file://{tmp_path}/s/dir/")
    with pytest.raises(ConfigError):
        open_store_for_uri(f"file://{tmp_path}/elsewhere/x", create=False)


def test_open_store_for_mounts(tmp_path):
    store, prefix = open_store(f"file://{tmp_path}/m/")
    assert isinstance(store, LocalStore) and prefix == ""
    assert store.root == f"{tmp_path}/m"
    assert os.path.isfile(tmp_path / "m" / ".dssefs-store")


@pytest.mark.s3
def test_open_store_s3(bucket):
    store, prefix = open_store(f"s3://{bucket}/team/data", max_attempts=2)
    assert isinstance(store, S3Store) and prefix == "team/data/"
    assert store.context_name == bucket and store.url == f"s3://{bucket}"
    store.check()
    store2, key = open_store_for_uri(f"s3://{bucket}/a/b", create=True)
    assert key == "a/b" and store2.bucket == bucket
    store2.put(key, b"x", {})
    assert store.head("a/b").size == 1
    assert open_store(f"s3://{bucket}")[1] == ""


def test_thread_safety_smoke(store):
    """Many threads doing mixed operations on overlapping keys see only whole versions."""
    versions = {i: bytes([i]) * (1000 + i) for i in range(8)}
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(15):
                k = f"t/{rng.randrange(3)}"
                v = rng.randrange(8)
                op = rng.randrange(3)
                if op == 0:
                    store.put(k, versions[v], {"v": str(v)})
                elif op == 1:
                    try:
                        data, total = store.get_range(k, 0, 5000)
                    except ObjectNotFound:
                        continue
                    assert data in versions.values() and total == len(data)
                else:
                    store.delete(k)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    run_in_threads(worker, range(6))
    assert not errors, errors
