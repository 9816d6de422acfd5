"""DSSEFS constants (format versions 1 and 2), the binary header, the chunk layout and the AADs.

See ``docs/format.md`` for the normative specification; this module is its reference code.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass

from ..errors import IntegrityError, UnsupportedFormat

FORMAT_V1 = 1
FORMAT_V2 = 2
#: What new objects are written as.  Readers accept every version in SUPPORTED_VERSIONS.
FORMAT_VERSION = FORMAT_V2
SUPPORTED_VERSIONS = (FORMAT_V1, FORMAT_V2)
SUITE_DUAL_AES256GCM_HKDF_SHA512_COMMIT = 0x0001
DOMAIN = b"dssefs1"  # version 1's domain string
DOMAINS = {FORMAT_V1: b"dssefs1", FORMAT_V2: b"dssefs2"}

#: Header flags of version 2 (version 1 allows none).  FLAG_ATTRS: the version carries an
#: attribute blob (``dsse-a``); a reader refuses the object if the blob is missing, or present
#: without the flag, so deleting or adding attributes cannot go unnoticed.
FLAG_ATTRS = 0x01
#: FLAG_SPARSE (version 2): the body stores only some chunks, followed by the sealed chunk map
#: (see envelope/sparse.py); omitted chunks read as zeros.
FLAG_SPARSE = 0x02
ALLOWED_FLAGS = {FORMAT_V1: 0x00, FORMAT_V2: FLAG_ATTRS | FLAG_SPARSE}

LAYER_INNER = 0x01
LAYER_OUTER = 0x02

NONCE_BYTES = 12
TAG_BYTES = 16
CHUNK_OVERHEAD = 2 * TAG_BYTES  # inner tag + outer tag per chunk

MIN_CHUNK_LOG2 = 12  # 4 KiB
MAX_CHUNK_LOG2 = 24  # 16 MiB
DEFAULT_CHUNK_LOG2 = 20  # 1 MiB: see docs/format.md "Chunk size"

FILE_ID_BYTES = 16
MSG_ID_BYTES = 32
COMMIT_BYTES = 32
DIGEST_BYTES = 32

# Largest plaintext per object: S3 caps objects at 48.8 TiB; 2**48 leaves margin and keeps every
# chunk index far below 2**32.
MAX_PLAINTEXT = 1 << 48

_HEADER = struct.Struct(">BHBBQQ16s32s32s32s")
HEADER_BYTES = _HEADER.size  # 133
# Every header field before the two commitments (version .. msg_id).  These bytes are bound into
# both commitments, so the commitment check at open time authenticates the whole header.
HEADER_BOUND_BYTES = HEADER_BYTES - 2 * COMMIT_BYTES  # 69


@dataclass(frozen=True)
class Header:
    """The authenticated per-version header.  Its SHA-256 is bound into every chunk's AAD."""

    chunk_log2: int
    generation: int
    plaintext_len: int
    file_id: bytes
    msg_id: bytes
    commit_inner: bytes
    commit_outer: bytes
    version: int = FORMAT_V1
    suite: int = SUITE_DUAL_AES256GCM_HKDF_SHA512_COMMIT
    flags: int = 0

    def __post_init__(self) -> None:
        validate_header_fields(self)

    @property
    def chunk_size(self) -> int:
        return 1 << self.chunk_log2

    @property
    def has_attrs(self) -> bool:
        """Version 2: whether the header commits to an attribute blob.  Version 1: unknown (None
        would be more honest; False is returned and the blob is optional)."""
        return bool(self.flags & FLAG_ATTRS)

    @property
    def sparse(self) -> bool:
        """Version 2: the body stores only the chunks its chunk map names."""
        return bool(self.flags & FLAG_SPARSE)

    def pack(self) -> bytes:
        return _HEADER.pack(self.version, self.suite, self.flags, self.chunk_log2, self.generation,
                            self.plaintext_len, self.file_id, self.msg_id, self.commit_inner,
                            self.commit_outer)

    @classmethod
    def unpack(cls, data: bytes) -> "Header":
        if len(data) != HEADER_BYTES:
            raise IntegrityError(f"header is {len(data)} bytes, expected {HEADER_BYTES}")
        version = data[0]
        if version not in SUPPORTED_VERSIONS:
            raise UnsupportedFormat(f"unknown format version {version}; this build reads versions "
                                    f"{', '.join(map(str, SUPPORTED_VERSIONS))}: upgrade dssefs")
        (version, suite, flags, chunk_log2, generation, plaintext_len, file_id, msg_id, ci,
         co) = _HEADER.unpack(data)
        return cls(chunk_log2=chunk_log2, generation=generation, plaintext_len=plaintext_len,
                   file_id=file_id, msg_id=msg_id, commit_inner=ci, commit_outer=co,
                   version=version, suite=suite, flags=flags)

    def digest(self) -> bytes:
        return hashlib.sha256(self.pack()).digest()

    def bound_fields(self) -> bytes:
        """``version .. msg_id`` as packed (69 bytes): the header bytes the commitments cover."""
        return self.pack()[:HEADER_BOUND_BYTES]


def validate_header_fields(h: Header) -> None:
    if h.version not in SUPPORTED_VERSIONS:
        raise UnsupportedFormat(f"unknown format version {h.version}")
    if h.suite != SUITE_DUAL_AES256GCM_HKDF_SHA512_COMMIT:
        raise UnsupportedFormat(f"unknown algorithm suite 0x{h.suite:04x}; refusing to guess")
    if not 0 <= h.flags <= 0xFF or h.flags & ~ALLOWED_FLAGS[h.version]:
        raise UnsupportedFormat(f"unknown header flags 0x{h.flags:02x} for format version {h.version}")
    if not MIN_CHUNK_LOG2 <= h.chunk_log2 <= MAX_CHUNK_LOG2:
        raise IntegrityError(f"chunk_log2 {h.chunk_log2} outside {MIN_CHUNK_LOG2}..{MAX_CHUNK_LOG2}")
    if not 0 <= h.plaintext_len < MAX_PLAINTEXT:
        raise IntegrityError(f"plaintext length {h.plaintext_len} out of range")
    if not 0 <= h.generation < (1 << 64):
        raise IntegrityError("generation out of range")
    for name, value, size in (("file_id", h.file_id, FILE_ID_BYTES), ("msg_id", h.msg_id, MSG_ID_BYTES),
                              ("commit_inner", h.commit_inner, COMMIT_BYTES),
                              ("commit_outer", h.commit_outer, COMMIT_BYTES)):
        if not isinstance(value, bytes) or len(value) != size:
            raise IntegrityError(f"{name} must be {size} bytes")


# ---- chunk layout -------------------------------------------------------------------------------

def chunk_count(plaintext_len: int, chunk_size: int) -> int:
    """Every version has at least one chunk, so even an empty file is authenticated."""
    return max(1, -(-plaintext_len // chunk_size))


def body_size(plaintext_len: int, chunk_size: int) -> int:
    return plaintext_len + CHUNK_OVERHEAD * chunk_count(plaintext_len, chunk_size)


def chunk_plain_len(index: int, plaintext_len: int, chunk_size: int) -> int:
    n = chunk_count(plaintext_len, chunk_size)
    if not 0 <= index < n:
        raise IndexError(f"chunk {index} outside 0..{n - 1}")
    if index < n - 1:
        return chunk_size
    return plaintext_len - index * chunk_size


def chunk_body_offset(index: int, chunk_size: int) -> int:
    return index * (chunk_size + CHUNK_OVERHEAD)


def chunks_for_range(offset: int, length: int, plaintext_len: int, chunk_size: int) -> range:
    """Indices of the chunks holding plaintext bytes ``[offset, offset+length)`` (clipped to EOF)."""
    end = min(offset + length, plaintext_len)
    if length <= 0 or offset >= end:
        return range(0)
    return range(offset // chunk_size, (end - 1) // chunk_size + 1)


def body_span(chunks: range, plaintext_len: int, chunk_size: int) -> tuple[int, int]:
    """``(start, length)`` in the object body covering the given contiguous chunks."""
    if not chunks:
        return (0, 0)
    start = chunk_body_offset(chunks.start, chunk_size)
    last = chunks.stop - 1
    end = chunk_body_offset(last, chunk_size) + chunk_plain_len(last, plaintext_len, chunk_size) \
        + CHUNK_OVERHEAD
    return (start, end - start)


# ---- nonces and AAD -----------------------------------------------------------------------------

def chunk_nonce(index: int) -> bytes:
    """4 zero bytes || u64 big-endian chunk index.  Unique per key because keys are per version."""
    return b"\x00\x00\x00\x00" + index.to_bytes(8, "big")


def kdf_info(suite: int, layer: int, label: bytes, version: int = FORMAT_V1) -> bytes:
    return DOMAINS[version] + suite.to_bytes(2, "big") + bytes([layer]) + label


def commit_info(suite: int, layer: int, label: bytes, bound_fields: bytes,
                version: int = FORMAT_V1) -> bytes:
    """HKDF info of a commitment: ``kdf_info(...) || header[0:69]``."""
    if len(bound_fields) != HEADER_BOUND_BYTES:
        raise ValueError(f"bound header fields must be {HEADER_BOUND_BYTES} bytes")
    return kdf_info(suite, layer, label, version) + bound_fields


def aad_prefix(suite: int, layer: int, header_digest: bytes, version: int = FORMAT_V1) -> bytes:
    """Version 1: the prefix of every chunk AAD and of the attribute AAD.  Version 2: the prefix
    of the attribute AAD only (chunks use :func:`chunk_aad_prefix_v2`)."""
    return DOMAINS[version] + suite.to_bytes(2, "big") + bytes([layer]) + header_digest


def chunk_aad_prefix_v2(suite: int, layer: int, file_id: bytes, msg_id: bytes) -> bytes:
    """Version 2 chunk AAD prefix (58 bytes): nothing in it depends on the plaintext length,
    the generation or the attributes, so chunks can be sealed while a file is still being written
    (the length stays authenticated by the commitments and the final flag)."""
    return DOMAINS[FORMAT_V2] + suite.to_bytes(2, "big") + bytes([layer]) + file_id + msg_id


def chunk_aad(prefix: bytes, index: int, final: bool) -> bytes:
    return prefix + index.to_bytes(8, "big") + (b"\x01" if final else b"\x00")


# The chunk map of a sparse version is sealed like a chunk whose index no chunk can have
# (chunk indexes stay below 2^36), with 0x02 where a chunk has its final flag.
MAP_INDEX = (1 << 64) - 1


def map_aad(prefix: bytes) -> bytes:
    return prefix + MAP_INDEX.to_bytes(8, "big") + b"\x02"


ATTRS_LABEL = b"attrs"


def attrs_aad(prefix: bytes) -> bytes:
    return prefix + ATTRS_LABEL


# ---- version 2: per-object data keys wrapped under epoch keys -----------------------------------

EPOCH_ID_BYTES = 16
DK_WRAP_VERSION = 0x02
WRAPPED_DK_BYTES = 1 + NONCE_BYTES + 32 + TAG_BYTES  # 61


def canonical_json(ctx: dict[str, str]) -> bytes:
    """Sorted keys, no spaces, ASCII with \\u escapes: the encoding every context is bound as."""
    return json.dumps(dict(ctx), sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def dk_wrap_aad(ctx: dict[str, str]) -> bytes:
    """AAD of a data key wrapped under an epoch key: ``0x02 || canonical JSON of the object's
    version-2 context`` (layer, bucket, object key, epoch id)."""
    return bytes([DK_WRAP_VERSION]) + canonical_json(ctx)
