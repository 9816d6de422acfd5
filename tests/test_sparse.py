"""Sparse versions (format version 2, FLAG_SPARSE): holes of whole chunks are not stored, the
chunk map at the end of the body says which chunks are, and every tampering fails closed."""

from __future__ import annotations

import os

import pytest

from dssefs import envelope, kms
from dssefs.envelope import format as fmt
from dssefs.envelope.sparse import ChunkMap, map_bytes, sealed_map_bytes
from dssefs.errors import IntegrityError
from dssefs.objects import Vault
from dssefs.store import LocalStore

CS = 4096
STRIDE = CS + fmt.CHUNK_OVERHEAD


@pytest.fixture(params=["local", "s3"])
def vault(request, tmp_path):
    if request.param == "local":
        ring = tmp_path / "keyring"
        kms.create_keyring(ring)
        store = LocalStore(tmp_path / "store", min_part_size=4096)
        provider = kms.make_provider(keyring=str(ring))
    else:
        from dssefs.store.s3 import S3Store

        server = request.getfixturevalue("moto_server")
        bucket = request.getfixturevalue("bucket")
        key = server.client("kms").create_key()["KeyMetadata"]["Arn"]
        store, provider = S3Store(bucket), kms.make_provider(kms_key_id=key)
    return Vault(store, provider, chunk_log2=12, multipart_threshold=64 * STRIDE, part_size=8 * CS)


class Recording:
    """A source that records which chunks the writer asked for."""

    def __init__(self, data: bytes):
        self.data, self.asked = data, []

    def __call__(self, off: int, n: int):
        self.asked.append(off // CS)
        return self.data[off:off + n]


def _sparse_data(n_chunks: int, stored: set[int], tail: int = 100) -> bytes:
    size = (n_chunks - 1) * CS + tail
    buf = bytearray(size)
    for i in stored:
        end = min(size, (i + 1) * CS)
        buf[i * CS:end] = os.urandom(end - i * CS)
    return bytes(buf)


@pytest.mark.parametrize("n_chunks,stored", [(10, {2, 3}), (3, set()), (200, {0, 1, 50, 51, 52, 150}),
                                             (150, set(range(5, 85)) | {100})])  # multipart
def test_round_trip_stores_only_written_chunks(vault, n_chunks, stored):
    if len(stored) > 64 and not isinstance(vault.store, LocalStore):
        pytest.skip("multipart with 4 KiB chunks: S3 wants parts of 5 MiB (the local store does not)")
    data = _sparse_data(n_chunks, stored)
    src = Recording(data)
    obj = vault.write("f", src, len(data), stored=lambda: stored)
    written = sorted(stored | {n_chunks - 1})
    assert sorted(src.asked) == written  # holes are never read from the source
    assert obj.sparse and obj.header.flags & fmt.FLAG_SPARSE
    expect = (len(written) - 1) * STRIDE + 100 + fmt.CHUNK_OVERHEAD + sealed_map_bytes(n_chunks)
    assert vault.store.head("f").size == obj.body_size == expect
    again = vault.open("f")
    assert again.sparse and again.size == len(data)
    assert again.read(0, len(data)) == data
    assert b"".join(p for _, p in again.iter_chunks(window=3 * CS)) == data
    again.verify()
    for i in range(n_chunks):
        assert again.is_hole(i) == (i not in written)


def test_dense_when_nothing_is_a_hole(vault):
    data = os.urandom(5 * CS)
    obj = vault.write("f", lambda o, n: data[o:o + n], len(data), stored=lambda: range(5))
    assert not obj.sparse and vault.store.head("f").size == 5 * STRIDE


def test_reading_holes_needs_no_request(vault, monkeypatch):
    data = _sparse_data(8, {1})
    vault.write("f", lambda o, n: data[o:o + n], len(data), stored=lambda: [1])
    obj = vault.open("f")
    obj.chunk_map()
    calls = []
    real = vault.store.get_range
    monkeypatch.setattr(vault.store, "get_range", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert obj.read(2 * CS, 4 * CS) == bytes(4 * CS)
    assert calls == []
    assert obj.read(CS, CS) == data[CS:2 * CS]
    assert len(calls) == 1


def test_attribute_change_and_rename_keep_the_map(vault):
    data = _sparse_data(6, {0})
    obj = vault.write("f", lambda o, n: data[o:o + n], len(data), attrs=b"a1", stored=lambda: [0])
    obj2 = vault.update_attrs(obj, b"a2")
    assert obj2.sparse and obj2.generation == obj.generation + 1
    fresh = vault.open("f")
    assert fresh.attrs() == b"a2" and fresh.read(0, len(data)) == data
    vault.rename(fresh, "g")
    assert vault.open("g").read(0, len(data)) == data


# ---- tampering -----------------------------------------------------------------------------------

def _raw(vault, key: str) -> tuple[bytes, dict]:
    info = vault.store.head(key)
    body, _ = vault.store.get_range(key, 0, info.size)
    return bytes(body), info.metadata


def _put(vault, key: str, body: bytes, meta: dict) -> None:
    vault.store.put(key, body, meta)


def _fails(vault, key: str) -> None:
    with pytest.raises(IntegrityError):
        obj = vault.open(key)
        obj.verify()


@pytest.fixture
def local_vault(tmp_path):
    ring = tmp_path / "keyring"
    kms.create_keyring(ring)
    return Vault(LocalStore(tmp_path / "store"), kms.make_provider(keyring=str(ring)), chunk_log2=12)


def _written(vault, stored=frozenset({1, 4}), n=8, key="f") -> tuple[bytes, bytes, dict]:
    data = _sparse_data(n, set(stored))
    vault.write(key, lambda o, k: data[o:o + k], len(data), stored=lambda: stored)
    body, meta = _raw(vault, key)
    return data, body, meta


def test_flipped_map_bit_fails(local_vault):
    _, body, meta = _written(local_vault)
    bad = bytearray(body)
    bad[-sealed_map_bytes(8)] ^= 0x01
    _put(local_vault, "f", bytes(bad), meta)
    _fails(local_vault, "f")


def test_dropped_chunk_fails(local_vault):
    _, body, meta = _written(local_vault)
    _put(local_vault, "f", body[STRIDE:], meta)  # chunk 1 removed, map kept
    _fails(local_vault, "f")


def test_extra_bytes_fail(local_vault):
    _, body, meta = _written(local_vault)
    _put(local_vault, "f", body[:STRIDE] + body[:STRIDE] + body[STRIDE:], meta)
    _fails(local_vault, "f")


def test_swapped_chunks_fail(local_vault):
    _, body, meta = _written(local_vault, stored=frozenset({1, 4}))
    _put(local_vault, "f", body[STRIDE:2 * STRIDE] + body[:STRIDE] + body[2 * STRIDE:], meta)
    _fails(local_vault, "f")


def test_map_of_another_version_fails(local_vault):
    _, body_a, meta_a = _written(local_vault, stored=frozenset({1, 4}), key="a")
    _, body_b, _ = _written(local_vault, stored=frozenset({1, 4}), key="b")
    m = sealed_map_bytes(8)
    _put(local_vault, "a", body_a[:-m] + body_b[-m:], meta_a)
    _fails(local_vault, "a")


def test_sparse_flag_cannot_be_cleared(local_vault):
    _, body, meta = _written(local_vault)
    env = envelope.parse(meta)
    import dataclasses

    plain_header = dataclasses.replace(env.header, flags=env.header.flags & ~fmt.FLAG_SPARSE)
    forged = dataclasses.replace(env, header=plain_header).to_metadata()
    _put(local_vault, "f", body, forged)
    _fails(local_vault, "f")


def test_truncated_map_fails(local_vault):
    _, body, meta = _written(local_vault)
    _put(local_vault, "f", body[:-1], meta)
    _fails(local_vault, "f")


# ---- the map's own rules -------------------------------------------------------------------------

def test_map_rules():
    n = 10
    good = (0b1000000011).to_bytes(map_bytes(n), "little")
    m = ChunkMap(good, (n - 1) * CS + 1, CS)
    assert m.stored_count == 3 and m.rank(9) == 2 and m.sparse
    with pytest.raises(IntegrityError, match="last chunk"):
        ChunkMap((0b0000000011).to_bytes(2, "little"), (n - 1) * CS + 1, CS)
    with pytest.raises(IntegrityError, match="past the end"):
        ChunkMap((0b11000000011).to_bytes(2, "little"), (n - 1) * CS + 1, CS)
    with pytest.raises(IntegrityError, match="bytes"):
        ChunkMap(good + b"\0", (n - 1) * CS + 1, CS)


def test_rank_matches_naive_count():
    import random

    rng = random.Random(7)
    n = 1000
    stored = {i for i in range(n) if rng.random() < 0.3} | {n - 1}
    value = sum(1 << i for i in stored)
    m = ChunkMap(value.to_bytes(map_bytes(n), "little"), n * CS, CS)
    for i in range(n + 1):
        assert m.rank(i) == sum(1 for j in stored if j < i)
    assert list(m.stored_indexes()) == sorted(stored)
    assert ChunkMap.from_stored(n * CS, CS, stored - {n - 1}).bits == m.bits


def test_huge_sparse_map_costs_little():
    """The largest file the format allows, with two chunks written: its map is built, ranked and
    walked by blocks (work in proportion to the map's 32 MiB, not per each of its 2^28 chunks)."""
    size = (1 << 48) - 1
    m = ChunkMap.from_stored(size, 1 << 20, [5, 1 << 27])
    assert list(m.stored_indexes()) == [5, 1 << 27, m.n - 1]
    assert m.rank(m.n - 1) == 2 and m.rank(1 << 27) == 1 and m.rank(6) == 1


# ---- golden sparse objects (tests/vectors/dssefs_v2_sparse_golden.json, docs/format.md 17.10) ------

import json  # noqa: E402
from pathlib import Path  # noqa: E402

from dssefs.envelope import metadata as md  # noqa: E402
from dssefs.envelope.codec import ObjectCipher  # noqa: E402
from dssefs.envelope.keywrap import unwrap_data_key  # noqa: E402
from dssefs.kms.base import object_context_v2, Layer  # noqa: E402

import refdecoder  # noqa: E402

SPARSE_GOLDEN = json.loads((Path(__file__).parent / "vectors" / "dssefs_v2_sparse_golden.json").read_text())
SPARSE_CASES = SPARSE_GOLDEN["cases"]
H = bytes.fromhex


def _golden_plaintext(case) -> bytes:
    cs, n = 1 << case["chunk_log2"], case["plaintext_len"]
    stored = set(case["sparse"]["stored_chunks"])
    return bytes(i % 251 if i // cs in stored else 0 for i in range(n))


@pytest.mark.parametrize("case", SPARSE_CASES, ids=[c["name"] for c in SPARSE_CASES])
def test_golden_sparse_decoded_by_dssefs(case):
    env = md.parse(case["metadata"])
    assert env.header.flags & fmt.FLAG_SPARSE
    ep = case["epoch"]
    dk = [unwrap_data_key(lb, H(ep[f"epoch_key_{name}"]), blob,
                          object_context_v2(layer, case["bucket"], case["object_key"], ep["epoch_id"]))
          for name, layer, lb, blob in (("inner", Layer.INNER, fmt.LAYER_INNER, env.wrapped_inner),
                                        ("outer", Layer.OUTER, fmt.LAYER_OUTER, env.wrapped_outer))]
    cipher = ObjectCipher.open_version(env.header, *dk)
    body = H(case["body_hex"])
    m = cipher.open_map(body[-cipher.sealed_map_len:])
    assert m.bits.hex() == case["sparse"]["chunk_map_hex"] and m.body_size() == len(body)
    out = bytearray()
    for i in range(cipher.n_chunks):
        if not m.stored(i):
            out += bytes(cipher.chunk_plain_len(i))
            continue
        off, n = m.body_offset(i), cipher.chunk_plain_len(i)
        out += cipher.open_chunk(i, body[off:off + n + fmt.CHUNK_OVERHEAD])
    assert bytes(out) == _golden_plaintext(case)
    assert hashlib_sha(out) == case["plaintext_sha256"]
    # the sealed map is reproduced from the text of 17.10 by the generator; dssefs seals the same bytes
    assert bytes(cipher.seal_map(m)).hex() == case["sparse"]["sealed_map_hex"]


@pytest.mark.parametrize("case", SPARSE_CASES, ids=[c["name"] for c in SPARSE_CASES])
def test_golden_sparse_decoded_by_the_reference_decoder(case):
    ep = case["epoch"]
    objects = {ep["record_key"]: ({}, ep["record_json"].encode("ascii")),
               case["object_key"]: (case["metadata"], H(case["body_hex"]))}
    ring = {k: H(v) for k, v in SPARSE_GOLDEN["keyring"].items()}
    reader = refdecoder.RefReader(objects.get, case["bucket"], ring,
                                  refdecoder.split_trust("golden-inner", "golden-outer"))
    res = reader.read(case["object_key"])
    assert res.plaintext == _golden_plaintext(case)
    # and it refuses the same object with one stored chunk removed
    body = H(case["body_hex"])
    stride = (1 << case["chunk_log2"]) + 32
    if len(case["sparse"]["stored_chunks"]) > 1:
        objects[case["object_key"]] = (case["metadata"], body[stride:])
        with pytest.raises(refdecoder.Integrity):
            reader.read(case["object_key"])


def hashlib_sha(data) -> str:
    import hashlib

    return hashlib.sha256(bytes(data)).hexdigest()


def test_generator_reproduces_the_sparse_golden_file():
    import importlib.util

    path = Path(__file__).parent / "vectors" / "generate.py"
    spec = importlib.util.spec_from_file_location("dssefs_golden_generate_sparse", path)
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.render_sparse() == (Path(__file__).parent / "vectors" / "dssefs_v2_sparse_golden.json").read_text()
