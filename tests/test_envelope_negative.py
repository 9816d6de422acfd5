"""Negative tests: every tampered, truncated, spliced or mis-keyed object fails closed.

Every failure must raise IntegrityError (UnsupportedFormat is a subclass) and release no plaintext:
output buffers are pre-filled with a sentinel and must be all zeros after a failed chunk, and the
plaintext must not be left in the caller's scratch (body) buffer either.

``read_object`` below is the reader of docs/format.md section 11.2 built from dssefs's envelope
calls: parse metadata, check the object size, verify commitments, open every chunk, open the
attribute blob.
"""

from __future__ import annotations

import dataclasses
import os
import random
import struct
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dssefs.envelope import codec
from dssefs.envelope import format as fmt
from dssefs.envelope import metadata as md
from dssefs.envelope.codec import ObjectCipher
from dssefs.envelope.metadata import Envelope
from dssefs.errors import IntegrityError, UnsupportedFormat

import refdecoder


def _new_v1(*args, **kw):
    """These tests pin format version 1 (v1 objects must stay readable); v2 has its own."""
    return ObjectCipher.new_version(*args, version=1, **kw)

CL = 12
CS = 1 << CL
SENTINEL = 0xA5


def pattern(n: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(n))


@dataclass
class Obj:
    cipher: ObjectCipher
    plaintext: bytes
    body: bytes
    meta: dict
    dk_in: bytes
    dk_out: bytes
    attrs: bytes

    @property
    def header(self):
        return self.cipher.header


def make(length: int = 3 * CS - 5, *, dk_in: bytes | None = None, dk_out: bytes | None = None,
         file_id: bytes | None = None, generation: int = 1, seed: int = 0, chunk_log2: int = CL,
         attrs: bytes = b"mode=0644 uid=1000") -> Obj:
    dk_in = dk_in or os.urandom(32)
    dk_out = dk_out or os.urandom(32)
    pt = pattern(length, seed)
    c = _new_v1(dk_in, dk_out, plaintext_len=length, file_id=file_id or os.urandom(16),
                                 generation=generation, chunk_log2=chunk_log2)
    body = bytearray(c.body_size)
    view = memoryview(body)
    for i in range(c.n_chunks):
        off, n = c.chunk_body_offset(i), c.chunk_plain_len(i)
        c.seal_chunk_into(i, pt[i * c.chunk_size:i * c.chunk_size + n], view[off:off + n + 32])
    env = Envelope(header=c.header, provider="local", key_id_inner="k-in", key_id_outer="k-out",
                   wrapped_inner=b"\x01" + os.urandom(60), wrapped_outer=b"\x01" + os.urandom(60),
                   attrs=c.seal_attrs(attrs))
    return Obj(c, pt, bytes(body), env.to_metadata(), dk_in, dk_out, attrs)


def open_chunk_checked(cipher: ObjectCipher, i: int, data: bytes, plaintext: bytes | None = None) -> bytes:
    """Open one chunk from a writable copy of ``data``; on failure assert nothing leaked."""
    n = cipher.chunk_plain_len(i) if 0 <= i < cipher.n_chunks else 0
    out = bytearray([SENTINEL]) * n
    scratch = bytearray(data)
    try:
        cipher.open_chunk_into(i, scratch, out)
    except IntegrityError:
        assert out == bytes(n), "output buffer not wiped after a failure"
        if plaintext and len(plaintext) >= 8:
            assert plaintext not in bytes(scratch), "plaintext left in the scratch buffer"
        raise
    return bytes(out)


def read_object(meta: dict, body: bytes, dk_in: bytes, dk_out: bytes, *, check_size: bool = True,
                plaintext: bytes | None = None) -> bytes:
    env = md.parse(meta)
    if check_size and len(body) != fmt.body_size(env.header.plaintext_len, env.header.chunk_size):
        raise IntegrityError("object size differs from the header")
    cipher = ObjectCipher.open_version(env.header, dk_in, dk_out)
    out = bytearray()
    for i in range(cipher.n_chunks):
        off, n = cipher.chunk_body_offset(i), cipher.chunk_plain_len(i)
        piece = None if plaintext is None else plaintext[i * cipher.chunk_size:i * cipher.chunk_size + n]
        out += open_chunk_checked(cipher, i, body[off:off + n + 32], piece)
    if env.attrs is not None:
        cipher.open_attrs(env.attrs)
    return bytes(out)


def assert_fails(obj: Obj, *, meta=None, body=None, dk_in=None, dk_out=None, exc=IntegrityError,
                 check_size=True):
    with pytest.raises(exc):
        read_object(meta if meta is not None else obj.meta, body if body is not None else obj.body,
                    dk_in or obj.dk_in, dk_out or obj.dk_out, check_size=check_size,
                    plaintext=obj.plaintext)


def with_header(meta: dict, raw: bytes) -> dict:
    return {**meta, "dsse-h": md.b64encode(raw)}


@pytest.fixture(scope="module")
def obj() -> Obj:
    return make()


def test_baseline_reads(obj):
    assert read_object(obj.meta, obj.body, obj.dk_in, obj.dk_out) == obj.plaintext
    assert obj.cipher.n_chunks == 3


# ---- body bit flips --------------------------------------------------------------------------------

def _positions(n_plain: int) -> list[int]:
    """Sampled positions in a sealed chunk: first, second, middle and last ciphertext bytes, then
    every byte of the (outer-encrypted) inner tag and of the outer tag."""
    pos = {0, 1, n_plain // 2, max(0, n_plain - 1)} if n_plain else set()
    pos |= set(range(n_plain, n_plain + 32))
    return sorted(pos)


def test_bit_flips_in_every_chunk_fail_closed(obj):
    c = obj.cipher
    flips = 0
    for i in range(c.n_chunks):
        off, n = c.chunk_body_offset(i), c.chunk_plain_len(i)
        for p in _positions(n):
            for bit in (0, 3, 7):
                body = bytearray(obj.body)
                body[off + p] ^= 1 << bit
                assert_fails(obj, body=bytes(body))
                flips += 1
    assert flips >= 3 * 36 * 3


def test_bit_flips_in_an_empty_files_only_chunk():
    e = make(0)
    assert len(e.body) == 32
    for p in range(32):
        body = bytearray(e.body)
        body[p] ^= 0x80
        assert_fails(e, body=bytes(body))


# ---- header fields -----------------------------------------------------------------------------------

FIELDS = {  # name: (offset, size)
    "version": (0, 1), "suite": (1, 2), "flags": (3, 1), "chunk_log2": (4, 1), "generation": (5, 8),
    "plaintext_len": (13, 8), "file_id": (21, 16), "msg_id": (37, 32), "commit_inner": (69, 32),
    "commit_outer": (101, 32),
}


def _set(raw: bytes, field: str, value: int) -> bytes:
    off, size = FIELDS[field]
    return raw[:off] + value.to_bytes(size, "big") + raw[off + size:]


@pytest.mark.parametrize("field,value", [("version", 0), ("version", 3), ("version", 0xFF),
                                         ("suite", 0x0000), ("suite", 0x0002), ("suite", 0x0073),
                                         ("flags", 0x01), ("flags", 0x80)])
def test_unknown_version_suite_or_flags_is_unsupported_never_downgraded(obj, field, value):
    raw = _set(obj.header.pack(), field, value)
    with pytest.raises(UnsupportedFormat):
        md.parse(with_header(obj.meta, raw))
    assert_fails(obj, meta=with_header(obj.meta, raw), exc=UnsupportedFormat)
    with pytest.raises(refdecoder.Unsupported):
        refdecoder.parse_metadata(with_header(obj.meta, raw))


@pytest.mark.parametrize("field,value", [("chunk_log2", 11), ("chunk_log2", 25), ("chunk_log2", 0),
                                         ("plaintext_len", 1 << 48), ("plaintext_len", (1 << 64) - 1)])
def test_out_of_range_header_values_are_rejected_at_parse(obj, field, value):
    raw = _set(obj.header.pack(), field, value)
    with pytest.raises(IntegrityError):
        md.parse(with_header(obj.meta, raw))


@pytest.mark.parametrize("field,value", [("chunk_log2", 13), ("chunk_log2", 20), ("generation", 0),
                                         ("generation", 2), ("generation", (1 << 64) - 1),
                                         ("plaintext_len", 0), ("plaintext_len", 2 * CS),
                                         ("plaintext_len", 3 * CS - 4), ("plaintext_len", 3 * CS - 6)])
def test_valid_but_altered_header_values_fail_the_commitment(obj, field, value):
    raw = _set(obj.header.pack(), field, value)
    meta = with_header(obj.meta, raw)
    header = md.parse(meta).header  # well-formed
    with pytest.raises(IntegrityError, match="commitment"):
        ObjectCipher.open_version(header, obj.dk_in, obj.dk_out)
    assert_fails(obj, meta=meta, check_size=False)


@pytest.mark.parametrize("field", ["file_id", "msg_id", "commit_inner", "commit_outer"])
def test_altered_ids_and_commitments_fail_the_commitment(obj, field):
    off, size = FIELDS[field]
    for k in (0, size // 2, size - 1):
        raw = bytearray(obj.header.pack())
        raw[off + k] ^= 0x01
        header = md.parse(with_header(obj.meta, bytes(raw))).header
        with pytest.raises(IntegrityError, match="commitment"):
            ObjectCipher.open_version(header, obj.dk_in, obj.dk_out)


def test_every_header_bit_flip_fails(obj):
    raw = obj.header.pack()
    for byte in range(len(raw)):
        for bit in range(8):
            bad = bytearray(raw)
            bad[byte] ^= 1 << bit
            assert_fails(obj, meta=with_header(obj.meta, bytes(bad)), check_size=False)


def test_header_digest_binds_chunks_even_with_valid_commitments(obj):
    """Defence in depth: a cipher forced onto an altered header (bypassing open_version, as a buggy
    reader might) still cannot open any chunk, because every AAD holds SHA-256(header)."""
    for change in ({"generation": 2}, {"file_id": bytes(16)}):
        forged = dataclasses.replace(obj.header, **change)
        k_in, _, a_in = codec._derive_inner(obj.dk_in, forged.msg_id, forged.suite, forged.bound_fields())
        k_out, _, a_out = codec._derive_outer(obj.dk_out, forged.msg_id, forged.suite, forged.bound_fields())
        rogue = ObjectCipher(forged, (k_in, a_in), (k_out, a_out))
        for i in range(rogue.n_chunks):
            off, n = rogue.chunk_body_offset(i), rogue.chunk_plain_len(i)
            with pytest.raises(IntegrityError):
                open_chunk_checked(rogue, i, obj.body[off:off + n + 32])
        with pytest.raises(IntegrityError):
            rogue.open_attrs(md.parse(obj.meta).attrs)


def test_forged_header_length_and_generation_fail_at_open():
    """Regression: the commitments cover every header field, so a header claiming a shorter file
    (or a newer generation) fails at open time, before any chunk is read.  Without that binding a
    header forged to plaintext_len=0 over a 32-byte garbage body opened fine and every read
    returned EOF without authenticating anything."""
    dk_in, dk_out = os.urandom(32), os.urandom(32)
    c = _new_v1(dk_in, dk_out, plaintext_len=3 << 12, file_id=os.urandom(16),
                                 generation=9, chunk_log2=12)
    for change in ({"plaintext_len": 0}, {"plaintext_len": 1}, {"generation": 10}, {"generation": 0},
                   {"chunk_log2": 13}, {"file_id": os.urandom(16)}):
        forged = dataclasses.replace(c.header, **change)
        with pytest.raises(IntegrityError, match="commitment"):
            ObjectCipher.open_version(forged, dk_in, dk_out)


# ---- chunk reordering, truncation, extension -------------------------------------------------------

def _chunks(o: Obj) -> list[bytes]:
    c = o.cipher
    return [o.body[c.chunk_body_offset(i):c.chunk_body_offset(i) + c.chunk_plain_len(i) + 32]
            for i in range(c.n_chunks)]


def test_swapped_chunks_fail():
    o = make(3 * CS)  # equal-sized chunks, so a swap keeps every length right
    ch = _chunks(o)
    for i, j in ((0, 1), (1, 2), (0, 2)):
        swapped = list(ch)
        swapped[i], swapped[j] = ch[j], ch[i]
        assert_fails(o, body=b"".join(swapped))


def test_duplicated_chunk_fails():
    o = make(3 * CS)
    ch = _chunks(o)
    for src, dst in ((0, 1), (1, 0), (1, 2), (0, 2)):
        dup = list(ch)
        dup[dst] = ch[src]
        assert_fails(o, body=b"".join(dup))


def test_dropped_final_chunk_fails_with_and_without_the_size_check(obj):
    ch = _chunks(obj)
    body = b"".join(ch[:-1])
    assert_fails(obj, body=body)
    assert_fails(obj, body=body, check_size=False)  # chunk n-1 is missing: its slice is empty


def test_a_non_final_chunk_cannot_pass_as_final():
    """The final flag is in the AAD: a writer that sealed its last chunk with final=0 (or an attacker
    who presents chunk n-2 as the last one) is rejected even with every key known."""
    o = make(2 * CS)
    env = refdecoder.parse_metadata(o.meta)
    v = refdecoder.open_version(env.header, o.dk_in, o.dk_out)
    last = 1
    pt = o.plaintext[CS:]
    wrong_final = refdecoder.aad_prefix(env.header, refdecoder.INNER) + struct.pack(">QB", last, 0)
    inner = AESGCM(v.k_in).encrypt(refdecoder.nonce(last), pt, wrong_final)
    outer_aad = refdecoder.aad_prefix(env.header, refdecoder.OUTER) + struct.pack(">QB", last, 0)
    sealed = AESGCM(v.k_out).encrypt(refdecoder.nonce(last), inner, outer_aad)
    assert_fails(o, body=_chunks(o)[0] + sealed)


@pytest.mark.parametrize("length", [1, CS, CS + 1, 3 * CS - 5])
def test_truncation_at_every_chunk_boundary_and_by_one_byte(length):
    o = make(length)
    c = o.cipher
    cuts = {c.chunk_body_offset(i) for i in range(c.n_chunks)} | {len(o.body) - 1, 0}
    cuts |= {c.chunk_body_offset(i) + 1 for i in range(c.n_chunks)}
    cuts |= {c.chunk_body_offset(i) - 1 for i in range(1, c.n_chunks)}
    for cut in sorted(cuts):
        assert cut < len(o.body)
        assert_fails(o, body=o.body[:cut])
        assert_fails(o, body=o.body[:cut], check_size=False)


def test_appended_chunk_or_byte_fails(obj):
    ch = _chunks(obj)
    for extra in (b"\x00", os.urandom(1), ch[0], ch[-1], os.urandom(32)):
        assert_fails(obj, body=obj.body + extra)
    assert len(obj.body) == obj.cipher.body_size
    with pytest.raises(IntegrityError):
        obj.cipher.open_chunk_into(obj.cipher.n_chunks, ch[0], bytearray(CS))


def test_header_with_zero_length_body_fails():
    for length in (0, 1, CS):
        o = make(length)
        assert_fails(o, body=b"")
        assert_fails(o, body=b"", check_size=False)


def test_chunk_of_wrong_length_is_rejected_and_wipes_output(obj):
    c = obj.cipher
    good = _chunks(obj)[0]
    for data in (good[:-1], good + b"\x00", b""):
        out = bytearray([SENTINEL]) * CS
        with pytest.raises(IntegrityError):
            c.open_chunk_into(0, data, out)
        assert out == bytes(CS)


# ---- splicing between objects and versions ---------------------------------------------------------

def test_chunk_from_another_object_fails():
    a, b = make(3 * CS, seed=1), make(3 * CS, seed=2)
    for i in range(3):
        ch = _chunks(a)
        ch[i] = _chunks(b)[i]
        assert_fails(a, body=b"".join(ch))
    assert_fails(a, body=b.body)


def test_chunk_from_an_older_version_of_the_same_object_fails():
    """Same object key, same file_id, same data keys, even the same content: new msg_id."""
    dk_in, dk_out, fid = os.urandom(32), os.urandom(32), os.urandom(16)
    old = make(3 * CS, dk_in=dk_in, dk_out=dk_out, file_id=fid, generation=1)
    new = make(3 * CS, dk_in=dk_in, dk_out=dk_out, file_id=fid, generation=2)
    assert old.plaintext == new.plaintext and old.header.msg_id != new.header.msg_id
    for i in range(3):
        ch = _chunks(new)
        ch[i] = _chunks(old)[i]
        assert_fails(new, body=b"".join(ch))
    assert_fails(new, body=old.body)                       # old body, new metadata
    assert_fails(new, meta={**new.meta, "dsse-h": old.meta["dsse-h"]})  # old header, new body
    # the old version as a whole is still valid on its own: rollback is only caught by generation
    assert read_object(old.meta, old.body, dk_in, dk_out) == old.plaintext


# ---- keys ---------------------------------------------------------------------------------------------

def test_swapped_inner_and_outer_data_keys_fail(obj):
    with pytest.raises(IntegrityError, match="commitment"):
        ObjectCipher.open_version(obj.header, obj.dk_out, obj.dk_in)
    assert_fails(obj, dk_in=obj.dk_out, dk_out=obj.dk_in)


def test_data_key_from_another_object_fails(obj):
    other = make(10)
    for dk_in, dk_out in ((other.dk_in, obj.dk_out), (obj.dk_in, other.dk_out), (other.dk_in, other.dk_out)):
        with pytest.raises(IntegrityError, match="commitment"):
            ObjectCipher.open_version(obj.header, dk_in, dk_out)


def test_single_bit_change_of_a_data_key_fails(obj):
    for which in ("in", "out"):
        for bit in (0, 255):
            dk = bytearray(obj.dk_in if which == "in" else obj.dk_out)
            dk[bit // 8] ^= 1 << (bit % 8)
            keys = (bytes(dk), obj.dk_out) if which == "in" else (obj.dk_in, bytes(dk))
            with pytest.raises(IntegrityError, match=f"{which}ner layer" if which == "in" else "outer layer"):
                ObjectCipher.open_version(obj.header, *keys)


def test_commitment_mismatch_fires_before_any_decryption(obj, monkeypatch):
    """With a wrong key, open_version must fail before a single AEAD object is even built."""
    sealed_attrs = obj.cipher.seal_attrs(obj.attrs)
    built = []

    def spy(real):
        class Spy(real):
            def __init__(self, key):
                built.append(real.__name__)
                super().__init__(key)
        return Spy

    monkeypatch.setattr(codec, "InnerAEAD", spy(codec.InnerAEAD))
    monkeypatch.setattr(codec, "OuterAEAD", spy(codec.OuterAEAD))
    with pytest.raises(IntegrityError, match="commitment"):
        ObjectCipher.open_version(obj.header, os.urandom(32), obj.dk_out)
    with pytest.raises(IntegrityError, match="commitment"):
        ObjectCipher.open_version(obj.header, obj.dk_in, os.urandom(32))
    assert built == []
    cipher = ObjectCipher.open_version(obj.header, obj.dk_in, obj.dk_out)
    assert built == []  # content and attribute keys are derived on first use, after the check
    n = cipher.chunk_plain_len(0) + 32
    assert bytes(cipher.open_chunk(0, obj.body[:n])) == obj.plaintext[:cipher.chunk_plain_len(0)]
    assert sorted(built) == ["InnerAEAD", "OuterAEAD"]
    assert cipher.open_attrs(sealed_attrs) == obj.attrs
    assert sorted(built) == ["InnerAEAD", "InnerAEAD", "OuterAEAD", "OuterAEAD"]


def test_writer_refuses_equal_or_malformed_data_keys():
    k = os.urandom(32)
    with pytest.raises(ValueError):
        _new_v1(k, k, plaintext_len=1, file_id=bytes(16))
    for bad in (b"", bytes(31), bytes(33)):
        with pytest.raises(ValueError):
            _new_v1(bad, k, plaintext_len=1, file_id=bytes(16))
        with pytest.raises(ValueError):
            ObjectCipher.open_version(make(1).header, bad, k)


# ---- one layer's key compromised --------------------------------------------------------------------

def test_forgery_with_only_the_outer_key_fails_at_the_inner_layer():
    """An attacker holding K_out (e.g. a pycryptodome flaw leaked it) re-seals a modified inner
    ciphertext under a valid outer tag: the inner layer rejects it, the output buffer is wiped and
    the scratch buffer holds no plaintext."""
    o = make(2 * CS)
    env = refdecoder.parse_metadata(o.meta)
    v = refdecoder.open_version(env.header, o.dk_in, o.dk_out)
    i = 0
    sealed = _chunks(o)[i]
    mid = bytearray(AESGCM(v.k_out).decrypt(refdecoder.nonce(i), sealed, refdecoder.chunk_aad(env.header, refdecoder.OUTER, i)))
    for pos in (0, CS // 2, CS - 1, CS, CS + 15):  # inner ciphertext and inner tag
        bad = bytearray(mid)
        bad[pos] ^= 0x10
        forged = AESGCM(v.k_out).encrypt(refdecoder.nonce(i), bytes(bad), refdecoder.chunk_aad(env.header, refdecoder.OUTER, i))
        out = bytearray([SENTINEL]) * CS
        scratch = bytearray(forged)
        with pytest.raises(IntegrityError, match="inner layer"):
            o.cipher.open_chunk_into(i, scratch, out)
        assert out == bytes(CS)
        assert scratch[:CS + 16] == bytes(CS + 16)  # decrypted-but-unverified scratch wiped too
        assert o.plaintext[:CS] not in bytes(scratch)


def test_forgery_with_only_the_inner_key_fails_at_the_outer_layer():
    o = make(CS)
    env = refdecoder.parse_metadata(o.meta)
    v = refdecoder.open_version(env.header, o.dk_in, o.dk_out)
    aad_in = refdecoder.chunk_aad(env.header, refdecoder.INNER, 0)
    forged_inner = AESGCM(v.k_in).encrypt(refdecoder.nonce(0), b"evil" * (CS // 4), aad_in)
    sealed = bytearray(_chunks(o)[0])
    # keep the outer tag, xor the outer ciphertext with (old inner ^ new inner): a valid CTR edit
    old_inner = AESGCM(v.k_out).decrypt(refdecoder.nonce(0), bytes(sealed), refdecoder.chunk_aad(env.header, refdecoder.OUTER, 0))
    for k in range(CS + 16):
        sealed[k] ^= old_inner[k] ^ forged_inner[k]
    with pytest.raises(IntegrityError, match="outer layer"):
        open_chunk_checked(o.cipher, 0, bytes(sealed))


# ---- invisible salamanders ------------------------------------------------------------------------

_R = 0xE1 << 120


def _gf_mul(x: int, y: int) -> int:
    """Multiplication in GCM's GF(2^128) (NIST SP 800-38D, algorithm 1)."""
    z, v = 0, y
    for i in range(127, -1, -1):
        if (x >> i) & 1:
            z ^= v
        v = (v >> 1) ^ _R if v & 1 else v >> 1
    return z


_ONE = 1 << 127


def _gf_pow(x: int, e: int) -> int:
    r = _ONE
    while e:
        if e & 1:
            r = _gf_mul(r, x)
        x = _gf_mul(x, x)
        e >>= 1
    return r


def _gf_inv(x: int) -> int:
    return _gf_pow(x, (1 << 128) - 2)


def _blk(b: bytes) -> int:
    return int.from_bytes(b, "big")


class _Gcm:
    """Just enough of GCM for a 96-bit nonce: H, E(J0), keystream, GHASH of a zero ciphertext."""

    def __init__(self, key: bytes, nonce: bytes):
        enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
        self.e = lambda b: enc.update(b)
        self.h = _blk(self.e(bytes(16)))
        self.nonce = nonce
        self.ej0 = _blk(self.e(nonce + b"\x00\x00\x00\x01"))

    def ks(self, j: int) -> int:  # keystream block j = 1, 2, ...
        return _blk(self.e(self.nonce + struct.pack(">I", 1 + j)))

    def const(self, aad: bytes, n_blocks: int) -> int:
        """E(J0) xor GHASH(aad, 0^n_blocks, lengths): the tag of an all-zero ciphertext."""
        padded = aad + bytes(-len(aad) % 16)
        blocks = [_blk(padded[k:k + 16]) for k in range(0, len(padded), 16)]
        blocks += [0] * n_blocks + [(len(aad) * 8) << 64 | (n_blocks * 128)]
        s = 0
        for b in blocks:
            s = _gf_mul(s ^ b, self.h)
        return self.ej0 ^ s


def _solve(rows: list[list[int]], rhs: list[int]) -> list[int]:
    n = len(rows)
    a = [row[:] + [r] for row, r in zip(rows, rhs)]
    for col in range(n):
        piv = next(r for r in range(col, n) if a[r][col])
        a[col], a[piv] = a[piv], a[col]
        inv = _gf_inv(a[col][col])
        a[col] = [_gf_mul(x, inv) for x in a[col]]
        for r in range(n):
            if r != col and a[r][col]:
                f = a[r][col]
                a[r] = [x ^ _gf_mul(f, y) for x, y in zip(a[r], a[col])]
    return [a[r][n] for r in range(n)]


def test_invisible_salamander_two_layer_ciphertext_is_rejected_by_the_commitment():
    """Build ONE body that passes both GCM layers under two different data-key pairs (A and B) and
    decrypts to two different plaintexts: the classic multi-key GCM attack, done for both layers.
    The header carries A's commitments.  Without commitments a reader given B's wrapped keys would
    see different content than a reader given A's; with them, B is rejected before decryption."""
    msg_id, fid = os.urandom(32), os.urandom(16)
    dk_a = (os.urandom(32), os.urandom(32))
    dk_b = (os.urandom(32), os.urandom(32))
    c_a = _new_v1(*dk_a, plaintext_len=32, file_id=fid, chunk_log2=CL, msg_id=msg_id)
    header = c_a.header
    ref_h = refdecoder.parse_header(header.pack())
    nonce = refdecoder.nonce(0)
    aad_in = refdecoder.chunk_aad(ref_h, refdecoder.INNER, 0)
    aad_out = refdecoder.chunk_aad(ref_h, refdecoder.OUTER, 0)
    keys = {}
    for name, (dki, dko) in (("A", dk_a), ("B", dk_b)):
        k_in = refdecoder.derive(refdecoder.INNER, dki, ref_h)[0]
        k_out = refdecoder.derive(refdecoder.OUTER, dko, ref_h)[0]
        keys[name] = (k_in, k_out, _Gcm(k_in, nonce), _Gcm(k_out, nonce))

    # unknowns: outer ciphertext blocks D1, D2, D3 (= inner ct 2 blocks + inner tag) and outer tag T
    rows, rhs = [], []
    for name in ("A", "B"):
        _, _, gi, go = keys[name]
        # inner tag block (D3 ^ ks3) must equal const_i ^ sum_j (Dj ^ ksj) * Hi^(4-j), j = 1, 2
        h2, h3 = _gf_pow(gi.h, 2), _gf_pow(gi.h, 3)
        rows.append([h3, h2, _ONE])
        rhs.append(gi.const(aad_in, 2) ^ go.ks(3) ^ _gf_mul(go.ks(1), h3) ^ _gf_mul(go.ks(2), h2))
    ga, gb = keys["A"][3], keys["B"][3]
    # outer tags equal: const_A ^ sum Dj*Ha^(5-j) == const_B ^ sum Dj*Hb^(5-j)
    rows.append([_gf_pow(ga.h, 5 - j) ^ _gf_pow(gb.h, 5 - j) for j in (1, 2, 3)])
    rhs.append(ga.const(aad_out, 3) ^ gb.const(aad_out, 3))
    d = _solve(rows, rhs)
    tag = ga.const(aad_out, 3)
    for j, dj in enumerate(d, start=1):
        tag ^= _gf_mul(dj, _gf_pow(ga.h, 5 - j))
    body = b"".join(x.to_bytes(16, "big") for x in d + [tag])
    assert len(body) == 64 == fmt.body_size(32, CS)

    # The salamander is real: plain two-layer GCM accepts the body under BOTH key pairs.
    plains = {}
    for name in ("A", "B"):
        k_in, k_out, _, _ = keys[name]
        mid = AESGCM(k_out).decrypt(nonce, body, aad_out)
        plains[name] = AESGCM(k_in).decrypt(nonce, mid, aad_in)
    assert plains["A"] != plains["B"]

    # dssefs: A opens and reads P_A; B is refused by the commitment before any decryption.
    opened = ObjectCipher.open_version(header, *dk_a)
    assert open_chunk_checked(opened, 0, body) == plains["A"]
    with pytest.raises(IntegrityError, match="commitment"):
        ObjectCipher.open_version(header, *dk_b)
    with pytest.raises(IntegrityError, match="commitment"):
        ObjectCipher.open_version(header, dk_a[0], dk_b[1])
    with pytest.raises(refdecoder.Integrity):
        refdecoder.open_version(ref_h, *dk_b)
    # and a header recomputed for B (its own commitments) no longer matches the chunk AAD
    c_b = _new_v1(*dk_b, plaintext_len=32, file_id=fid, chunk_log2=CL, msg_id=msg_id)
    with pytest.raises(IntegrityError):
        open_chunk_checked(c_b, 0, body)


# ---- attribute blob ---------------------------------------------------------------------------------

def test_attrs_bit_flips_fail_everywhere(obj):
    blob = md.parse(obj.meta).attrs
    assert obj.cipher.open_attrs(blob) == obj.attrs
    for p in range(len(blob)):
        for bit in (0, 7):
            bad = bytearray(blob)
            bad[p] ^= 1 << bit
            with pytest.raises(IntegrityError):
                obj.cipher.open_attrs(bytes(bad))


def test_attrs_truncated_extended_or_empty_fail(obj):
    blob = md.parse(obj.meta).attrs
    for bad in (b"", blob[:12], blob[:43], blob[:-1], blob + b"\x00", blob[12:]):
        with pytest.raises(IntegrityError):
            obj.cipher.open_attrs(bad)


def test_attrs_swapped_between_objects_or_versions_fail():
    dk_in, dk_out, fid = os.urandom(32), os.urandom(32), os.urandom(16)
    a = make(100, dk_in=dk_in, dk_out=dk_out, file_id=fid, generation=1, attrs=b"mode=0600")
    a2 = make(100, dk_in=dk_in, dk_out=dk_out, file_id=fid, generation=2, attrs=b"mode=0644")
    b = make(100, attrs=b"mode=0777")
    for src, dst in ((a, a2), (a2, a), (b, a), (a, b)):
        with pytest.raises(IntegrityError):
            dst.cipher.open_attrs(md.parse(src.meta).attrs)
        assert_fails(dst, meta={**dst.meta, "dsse-a": src.meta["dsse-a"]})


def test_attrs_layers_are_both_checked():
    o = make(10, attrs=b"uid=0")
    env = refdecoder.parse_metadata(o.meta)
    v = refdecoder.open_version(env.header, o.dk_in, o.dk_out)
    r = env.attrs[:12]
    out_aad = refdecoder.aad_prefix(env.header, refdecoder.OUTER) + b"attrs"
    mid = bytearray(AESGCM(v.ak_out).decrypt(r, env.attrs[12:], out_aad))
    mid[0] ^= 1  # valid outer seal around a tampered inner layer
    forged = r + AESGCM(v.ak_out).encrypt(r, bytes(mid), out_aad)
    with pytest.raises(IntegrityError, match="inner layer"):
        o.cipher.open_attrs(forged)


# ---- spot checks that the reference decoder fails the same way ------------------------------------

def test_reference_decoder_rejects_the_same_tampering(obj):
    rng = random.Random(3)
    for _ in range(40):
        body = bytearray(obj.body)
        body[rng.randrange(len(body))] ^= 1 << rng.randrange(8)
        with pytest.raises(refdecoder.Integrity):
            refdecoder.decrypt_object(obj.meta, bytes(body), obj.dk_in, obj.dk_out)
    with pytest.raises(refdecoder.Integrity):
        refdecoder.decrypt_object(obj.meta, obj.body[:-1], obj.dk_in, obj.dk_out)
    with pytest.raises(refdecoder.Integrity):
        refdecoder.decrypt_object(obj.meta, obj.body, obj.dk_out, obj.dk_in)


# ---- key hygiene --------------------------------------------------------------------------------------

def test_key_holding_objects_never_show_or_pickle_keys(obj):
    import copy
    import pickle

    from dssefs.envelope.inner import InnerAEAD
    from dssefs.envelope.outer import OuterAEAD

    key = os.urandom(32)
    for thing in (InnerAEAD(key), OuterAEAD(key), obj.cipher):
        text = repr(thing) + str(thing)
        assert "redacted" in text
        for secret in (key, obj.dk_in, obj.dk_out):
            assert secret.hex() not in text and repr(secret) not in text
        with pytest.raises(TypeError):
            pickle.dumps(thing)
        with pytest.raises(TypeError):
            copy.deepcopy(thing)
    with pytest.raises(IntegrityError) as err:
        ObjectCipher.open_version(obj.header, obj.dk_out, obj.dk_in)
    assert obj.dk_in.hex() not in str(err.value) and obj.dk_out.hex() not in str(err.value)


def test_a_reused_scratch_buffer_opens_every_chunk_and_keeps_no_plaintext():
    # read-only chunk bodies (what a store returns) are opened through one scratch buffer reused
    # from chunk to chunk; a tampered chunk still wipes the output, and the scratch never holds
    # plaintext
    o = make(3 * CS + 100)
    c = o.cipher
    scratch = bytearray(CS + 16)
    for i, data in enumerate(_chunks(o)):
        assert c.open_chunk(i, bytes(data), scratch) == o.plaintext[i * CS:(i + 1) * CS]
    data = bytearray(_chunks(o)[1])
    data[5] ^= 1
    out = bytearray([SENTINEL]) * CS
    with pytest.raises(IntegrityError):
        c.open_chunk_into(1, bytes(data), out, scratch)
    assert out == bytes(CS)
    for i, data in enumerate(_chunks(o)):
        c.open_chunk_into(i, bytes(data), bytearray(c.chunk_plain_len(i)), scratch)
        assert o.plaintext[i * CS:i * CS + 64] not in bytes(scratch)
    with pytest.raises(IntegrityError):  # too small a scratch is not used
        c.open_chunk(0, bytes(_chunks(o)[0][:-1]), bytearray(8))
