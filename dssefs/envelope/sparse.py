"""Sparse versions (format version 2, FLAG_SPARSE; docs/format.md §17.10): which chunks are
stored, and where each stored chunk lies in the body.

A sparse version stores only some of its chunks; an omitted chunk reads as zeros.  The body is
the stored chunks in ascending index order, each sealed exactly as in a dense version, followed by
the sealed chunk map (:meth:`ObjectCipher.seal_map`).  The map's plaintext is a bitmap of
``n`` bits (``ceil(n / 8)`` bytes; bit ``i`` is bit ``i % 8``, least significant first, of byte
``i // 8``): set for a stored chunk.  The last chunk is always stored, and bits past ``n`` are 0.
"""

from __future__ import annotations

from array import array

from ..errors import IntegrityError
from . import format as fmt

_BLOCK = 512  # map bytes per rank entry (4,096 chunks)


def map_bytes(n_chunks: int) -> int:
    """Plaintext length of the chunk map of a version with ``n_chunks`` chunks."""
    return -(-n_chunks // 8)


def sealed_map_bytes(n_chunks: int) -> int:
    return map_bytes(n_chunks) + fmt.CHUNK_OVERHEAD


class ChunkMap:
    """The authenticated chunk map of one sparse version (or the trivial map of a dense one).

    Costs stay in proportion to the stored data for any size: ranks are counted per block of
    ``_BLOCK`` bytes (4,096 chunks), and stored chunks are found by skipping zero blocks."""

    __slots__ = ("plaintext_len", "chunk_size", "n", "bits", "_ranks", "stored_count")

    def __init__(self, bitmap: bytes | None, plaintext_len: int, chunk_size: int):
        """``bitmap`` None: every chunk is stored (a dense version).  Raises IntegrityError when
        the bitmap breaks a rule (length, last chunk omitted, bits past the end)."""
        self.plaintext_len, self.chunk_size = plaintext_len, chunk_size
        self.n = n = fmt.chunk_count(plaintext_len, chunk_size)
        if bitmap is None:
            self.bits = self._ranks = None
            self.stored_count = n
            return
        bitmap = bytes(bitmap)
        if len(bitmap) != map_bytes(n):
            raise IntegrityError(f"chunk map is {len(bitmap)} bytes, expected {map_bytes(n)} for {n} chunks")
        if bitmap[-1] >> ((n - 1) % 8 + 1):
            raise IntegrityError("chunk map marks chunks past the end of the object")
        if not bitmap[(n - 1) >> 3] >> ((n - 1) & 7) & 1:
            raise IntegrityError("chunk map omits the last chunk (it must always be stored)")
        self.bits = bitmap
        ranks = array("Q")
        total = 0
        for k in range(0, len(bitmap), _BLOCK):
            ranks.append(total)
            total += int.from_bytes(bitmap[k:k + _BLOCK], "little").bit_count()
        self._ranks = ranks
        self.stored_count = total

    @classmethod
    def from_stored(cls, plaintext_len: int, chunk_size: int, stored) -> "ChunkMap":
        """The map of a new version that stores the chunks ``stored`` (indexes, any order,
        duplicates allowed) and the last chunk; every other chunk is a hole."""
        n = fmt.chunk_count(plaintext_len, chunk_size)
        bits = bytearray(map_bytes(n))
        for i in stored:
            if 0 <= i < n:
                bits[i >> 3] |= 1 << (i & 7)
        bits[(n - 1) >> 3] |= 1 << ((n - 1) & 7)
        return cls(bytes(bits), plaintext_len, chunk_size)

    @property
    def sparse(self) -> bool:
        """Some chunk is omitted (a writer sets FLAG_SPARSE only then)."""
        return self.stored_count < self.n

    def stored(self, i: int) -> bool:
        if self.bits is None:
            return 0 <= i < self.n
        return 0 <= i < self.n and bool(self.bits[i >> 3] >> (i & 7) & 1)

    def rank(self, i: int) -> int:
        """Stored chunks before chunk ``i``."""
        if self.bits is None:
            return min(max(i, 0), self.n)
        if i >= self.n:
            return self.stored_count
        byte, bit = i >> 3, i & 7
        k = byte // _BLOCK
        below = int.from_bytes(self.bits[k * _BLOCK:byte], "little").bit_count()
        return self._ranks[k] + below + (self.bits[byte] & ((1 << bit) - 1)).bit_count()

    def stored_in(self, chunks: range) -> list[int]:
        return [i for i in chunks if self.stored(i)]

    def stored_indexes(self):
        """Every stored chunk index, ascending (zero blocks of the map are skipped)."""
        if self.bits is None:
            yield from range(self.n)
            return
        bits, zero = self.bits, bytes(_BLOCK)
        for k in range(0, len(bits), _BLOCK):
            block = bits[k:k + _BLOCK]
            if block == zero[:len(block)]:
                continue
            for j, b in enumerate(block):
                while b:
                    low = b & -b
                    yield (k + j) * 8 + low.bit_length() - 1
                    b ^= low

    def body_offset(self, i: int) -> int:
        """Where stored chunk ``i`` begins in the body (every stored chunk but the last is full)."""
        return self.rank(i) * (self.chunk_size + fmt.CHUNK_OVERHEAD)

    def chunks_bytes(self) -> int:
        """Bytes of the stored chunks (the body without the map)."""
        last = fmt.chunk_plain_len(self.n - 1, self.plaintext_len, self.chunk_size)
        return (self.stored_count - 1) * (self.chunk_size + fmt.CHUNK_OVERHEAD) + last + fmt.CHUNK_OVERHEAD

    def body_size(self) -> int:
        """The whole body: stored chunks, then the sealed map (none for a dense version)."""
        return self.chunks_bytes() + (0 if self.bits is None else sealed_map_bytes(self.n))

    def span(self, chunks: range) -> tuple[int, int, list[int]]:
        """``(start, length, stored)``: the body bytes holding the stored chunks among ``chunks``
        (contiguous: stored chunks follow each other in the body) and their indexes."""
        stored = self.stored_in(chunks)
        if not stored:
            return (0, 0, [])
        start = self.body_offset(stored[0])
        last = stored[-1]
        end = self.body_offset(last) + fmt.chunk_plain_len(last, self.plaintext_len, self.chunk_size) \
            + fmt.CHUNK_OVERHEAD
        return (start, end - start, stored)
