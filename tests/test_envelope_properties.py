"""Property tests (hypothesis, bounded so the file runs in a few seconds).

- round trip of random sizes at chunk_log2 12..14, through dssefs and the reference decoder;
- chunks_for_range / body_span equal a naive computation, and decrypting only those chunks yields
  exactly the requested plaintext slice;
- N encryptions of identical content give distinct msg_ids, headers, commitments and bodies;
- instrumented AEADs: over many versions under the SAME data keys no (key, nonce) pair repeats.
"""

from __future__ import annotations

import functools
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dssefs.envelope import codec
from dssefs.envelope import format as fmt
from dssefs.envelope import metadata as md
from dssefs.envelope.codec import ObjectCipher
from dssefs.envelope.metadata import Envelope
from dssefs.errors import IntegrityError

import refdecoder


def _new_v1(*args, **kw):
    """These tests pin format version 1 (v1 objects must stay readable); v2 has its own."""
    return ObjectCipher.new_version(*args, version=1, **kw)

FAST = settings(max_examples=40, deadline=None)


def seal_all(cipher: ObjectCipher, pt: bytes) -> bytes:
    body = bytearray(cipher.body_size)
    view = memoryview(body)
    for i in range(cipher.n_chunks):
        off, n = cipher.chunk_body_offset(i), cipher.chunk_plain_len(i)
        cipher.seal_chunk_into(i, pt[i * cipher.chunk_size:i * cipher.chunk_size + n], view[off:off + n + 32])
    return bytes(body)


def metadata_for(cipher: ObjectCipher, attrs: bytes | None = None) -> dict[str, str]:
    return Envelope(header=cipher.header, provider="local", key_id_inner="a", key_id_outer="b",
                    wrapped_inner=b"\x01" * 61, wrapped_outer=b"\x01" * 61,
                    attrs=None if attrs is None else cipher.seal_attrs(attrs)).to_metadata()


@st.composite
def objects(draw):
    chunk_log2 = draw(st.integers(12, 14))
    cs = 1 << chunk_log2
    length = draw(st.one_of(st.integers(0, 3 * cs + 17),
                            st.sampled_from([0, 1, cs - 1, cs, cs + 1, 2 * cs, 2 * cs - 1, 3 * cs])))
    seed = draw(st.integers(0, 250))
    return chunk_log2, length, seed


def plaintext(length: int, seed: int) -> bytes:
    return bytes((i * 13 + seed) % 256 for i in range(length))


@FAST
@given(objects(), st.binary(max_size=200))
def test_round_trip(obj, attrs):
    chunk_log2, length, seed = obj
    pt = plaintext(length, seed)
    dk_in, dk_out = os.urandom(32), os.urandom(32)
    w = _new_v1(dk_in, dk_out, plaintext_len=length, file_id=os.urandom(16),
                                 generation=seed, chunk_log2=chunk_log2)
    body = seal_all(w, pt)
    assert len(body) == length + 32 * max(1, -(-length // (1 << chunk_log2)))
    meta = metadata_for(w, attrs)
    r = ObjectCipher.open_version(md.parse(meta).header, dk_in, dk_out)
    got = b"".join(bytes(r.open_chunk(i, body[r.chunk_body_offset(i):r.chunk_body_offset(i)
                                               + r.chunk_plain_len(i) + 32]))
                   for i in range(r.n_chunks))
    assert got == pt
    assert r.open_attrs(md.parse(meta).attrs) == attrs
    assert refdecoder.decrypt_object(meta, body, dk_in, dk_out) == (pt, attrs)


def _naive_chunks(off: int, cnt: int, length: int, cs: int) -> list[int]:
    n = max(1, -(-length // cs))
    end = min(off + cnt, length)
    return [i for i in range(n) if max(off, i * cs) < min(end, min((i + 1) * cs, length))]


@functools.lru_cache(maxsize=None)
def _fixture(chunk_log2: int, length: int):
    """One sealed object per (chunk size, length): (plaintext, body, cipher, data keys)."""
    pt = plaintext(length, 5)
    dks = (os.urandom(32), os.urandom(32))
    c = _new_v1(*dks, plaintext_len=length, file_id=os.urandom(16), chunk_log2=chunk_log2)
    return pt, seal_all(c, pt), c, dks


@settings(max_examples=150, deadline=None)
@given(st.integers(12, 14), st.sampled_from([0, 1, 4095, 4096, 4097, 10000, 16384, 40000, 49152]),
       st.integers(0, 60000), st.integers(0, 60000))
def test_ranges_match_naive_and_decrypt_exactly_the_slice(chunk_log2, length, off, cnt):
    cs = 1 << chunk_log2
    pt, body, c, dks = _fixture(chunk_log2, length)
    chunks = c.chunks_for_range(off, cnt)
    assert list(chunks) == _naive_chunks(off, cnt, length, cs)
    assert chunks == fmt.chunks_for_range(off, cnt, length, cs)
    start, span = c.body_span(chunks)
    if chunks:
        naive_start = chunks.start * (cs + 32)
        naive_len = sum(c.chunk_plain_len(i) + 32 for i in chunks)
        assert (start, span) == (naive_start, naive_len)
        assert start + span <= len(body)
    else:
        assert (start, span) == (0, 0)
    # fetch only that span (as a ranged GET would) and decrypt only those chunks
    fetched = body[start:start + span]
    plain = bytearray()
    for i in chunks:
        rel = c.chunk_body_offset(i) - start
        plain += c.open_chunk(i, fetched[rel:rel + c.chunk_plain_len(i) + 32])
    skip = off - chunks.start * cs if chunks else 0
    assert bytes(plain[skip:skip + cnt]) == pt[off:off + cnt]
    v = refdecoder.open_version(refdecoder.parse_header(c.header_bytes), *dks)
    assert refdecoder.read_range(v, body, off, cnt) == pt[off:off + cnt]


def test_identical_content_gives_distinct_versions():
    dk_in, dk_out, fid = os.urandom(32), os.urandom(32), os.urandom(16)
    pt = plaintext(9000, 1)
    seen_msg, seen_hdr, seen_body, seen_commit, seen_attrs = set(), set(), set(), set(), set()
    n = 25
    for _ in range(n):
        c = _new_v1(dk_in, dk_out, plaintext_len=len(pt), file_id=fid, chunk_log2=12)
        seen_msg.add(c.header.msg_id)
        seen_hdr.add(c.header_bytes)
        seen_commit.add(c.header.commit_inner)
        seen_commit.add(c.header.commit_outer)
        seen_body.add(seal_all(c, pt))
        seen_attrs.add(c.seal_attrs(b"same attrs")[12:])
    assert len(seen_msg) == len(seen_hdr) == len(seen_body) == len(seen_attrs) == n
    assert len(seen_commit) == 2 * n


class _Recorder:
    """Wraps codec's AEAD classes to record every (layer class, key, nonce) used for encryption."""

    def __init__(self, monkeypatch):
        self.pairs: list[tuple[str, bytes, bytes]] = []
        rec = self

        def wrap(real):
            class Recording(real):
                __slots__ = ("_k",)

                def __init__(self, key):
                    super().__init__(key)
                    self._k = bytes(key)

                def encrypt_into(self, nonce, data, aad, out):
                    rec.pairs.append((real.__name__, self._k, bytes(nonce)))
                    return super().encrypt_into(nonce, data, aad, out)
            return Recording

        monkeypatch.setattr(codec, "InnerAEAD", wrap(codec.InnerAEAD))
        monkeypatch.setattr(codec, "OuterAEAD", wrap(codec.OuterAEAD))


def test_no_key_nonce_pair_ever_repeats(monkeypatch):
    """Many versions of one file under the SAME data keys (the reuse the format allows), identical
    content, attributes re-sealed several times per version: every (key, nonce) pair is unique."""
    rec = _Recorder(monkeypatch)
    dk_in, dk_out, fid = os.urandom(32), os.urandom(32), os.urandom(16)
    pt = plaintext(3 * 4096 - 1, 2)
    versions = 60
    for gen in range(versions):
        c = _new_v1(dk_in, dk_out, plaintext_len=len(pt), file_id=fid,
                                     generation=gen, chunk_log2=12)
        seal_all(c, pt)
        for _ in range(3):
            c.seal_attrs(b"mode=0644")
    expected = versions * (3 * 2 + 3 * 2)  # 3 chunks x 2 layers + 3 attribute seals x 2 layers
    assert len(rec.pairs) == expected
    assert len(set(rec.pairs)) == expected, "a (key, nonce) pair was used twice"
    keys = {(cls, k) for cls, k, _ in rec.pairs}
    assert len(keys) == versions * 4  # chunk and attribute keys, per layer, per version
    assert not {k for _, k, _ in rec.pairs} & {dk_in, dk_out}  # data keys never used directly
    # keys are layer-private: no key value is used by both implementations
    by_cls = {}
    for cls, k, _ in rec.pairs:
        by_cls.setdefault(k, set()).add(cls)
    assert all(len(v) == 1 for v in by_cls.values())


@settings(max_examples=30, deadline=None)
@given(objects(), st.data())
def test_any_single_byte_change_fails(obj, data):
    chunk_log2, length, seed = obj
    pt, body, c, dks = _fixture(chunk_log2, length)
    pos = data.draw(st.integers(0, len(body) - 1))
    delta = data.draw(st.integers(1, 255))
    bad = bytearray(body)
    bad[pos] ^= delta
    meta = metadata_for(c)
    try:
        refdecoder.decrypt_object(meta, bytes(bad), *dks)
    except refdecoder.Integrity:
        pass
    else:
        raise AssertionError(f"byte {pos} changed and the object still decrypted")
    i = pos // (c.chunk_size + 32)
    out = bytearray(b"\xa5") * c.chunk_plain_len(i)
    off = c.chunk_body_offset(i)
    with pytest.raises(IntegrityError):
        c.open_chunk_into(i, bad[off:off + len(out) + 32], out)
    assert out == bytes(len(out))
