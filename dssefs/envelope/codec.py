"""Per-version object encryption: key derivation, commitments, chunk and attribute sealing.

An :class:`ObjectCipher` holds the two derived per-version keys of one object version.  It is
created either for a *new* version (fresh random message id, commitments computed) or for an
*existing* one (commitments verified in constant time before any key is used).  All methods are
pure computations and safe to call from several threads at once.

Only the commitments are derived up front.  The content keys and the attribute keys are derived
on first use (an object probed for its attributes never needs its content keys, one that is only
read never needs its attribute keys), expanded from each layer's HKDF-Extract output, computed
once from data keys whose commitments have been checked: the derived values are exactly those of
the format, only their timing changes.
"""

from __future__ import annotations

import dataclasses
import hmac
import os

from ..errors import IntegrityError
from . import format as fmt
from . import sparse as sparse_map
from .format import Header
from .inner import InnerAEAD
from .inner import hkdf_expand as inner_expand
from .inner import hkdf_extract as inner_extract
from .outer import OuterAEAD
from .outer import hkdf_expand as outer_expand
from .outer import hkdf_extract as outer_extract

LABEL_DERIVE = b"DERIVEKEY"
LABEL_COMMIT = b"COMMITKEY"
LABEL_ATTRS = b"ATTRSKEY"


# Every derivation of a layer starts from the same HKDF-Extract (salt = msg_id, IKM = data key),
# so the pseudorandom key is computed once per layer and version and each key or commitment is one
# HKDF-Expand of it (docs/format.md 4.2).

def _prk_inner(dk: bytes, msg_id: bytes) -> bytes:
    return inner_extract(dk, msg_id)


def _prk_outer(dk: bytes, msg_id: bytes) -> bytes:
    return outer_extract(dk, msg_id)


def _key_inner(prk: bytes, suite: int, label: bytes, version: int) -> bytes:
    return inner_expand(prk, fmt.kdf_info(suite, fmt.LAYER_INNER, label, version))


def _key_outer(prk: bytes, suite: int, label: bytes, version: int) -> bytes:
    return outer_expand(prk, fmt.kdf_info(suite, fmt.LAYER_OUTER, label, version))


def _commit_inner(prk: bytes, suite: int, bound: bytes, version: int) -> bytes:
    """``bound`` is the header's first 69 bytes: the commitment covers them, so a verified
    commitment authenticates the header."""
    return inner_expand(prk, fmt.commit_info(suite, fmt.LAYER_INNER, LABEL_COMMIT, bound, version))


def _commit_outer(prk: bytes, suite: int, bound: bytes, version: int) -> bytes:
    return outer_expand(prk, fmt.commit_info(suite, fmt.LAYER_OUTER, LABEL_COMMIT, bound, version))


def _derive_inner(dk: bytes, msg_id: bytes, suite: int, bound: bytes,
                  version: int = fmt.FORMAT_V1) -> tuple[bytes, bytes, bytes]:
    """(content key, commitment, attribute key) of the inner layer, all at once."""
    prk = _prk_inner(dk, msg_id)
    return (_key_inner(prk, suite, LABEL_DERIVE, version), _commit_inner(prk, suite, bound, version),
            _key_inner(prk, suite, LABEL_ATTRS, version))


def _derive_outer(dk: bytes, msg_id: bytes, suite: int, bound: bytes,
                  version: int = fmt.FORMAT_V1) -> tuple[bytes, bytes, bytes]:
    prk = _prk_outer(dk, msg_id)
    return (_key_outer(prk, suite, LABEL_DERIVE, version), _commit_outer(prk, suite, bound, version),
            _key_outer(prk, suite, LABEL_ATTRS, version))


def _committed(draft: Header, prks: tuple[bytes, bytes]) -> Header:
    """``draft`` with both commitments computed over its bound fields."""
    bound = draft.bound_fields()
    c_in = _commit_inner(prks[0], draft.suite, bound, draft.version)
    c_out = _commit_outer(prks[1], draft.suite, bound, draft.version)
    return dataclasses.replace(draft, commit_inner=c_in, commit_outer=c_out)


def _check_dk(dk: bytes, name: str) -> bytes:
    if not isinstance(dk, (bytes, bytearray)) or len(dk) != 32:
        raise ValueError(f"{name} data key must be 32 bytes")
    return bytes(dk)


def _wipe(buf) -> None:
    if buf is not None and not (isinstance(buf, memoryview) and buf.readonly):
        buf[:] = bytes(len(buf))


class ObjectCipher:
    __slots__ = ("header", "header_bytes", "digest", "chunk_size", "n_chunks", "_prk_inner", "_prk_outer",
                 "_inner", "_outer", "_inner_attrs", "_outer_attrs", "_aad_in", "_aad_out",
                 "_attrs_aad_in", "_attrs_aad_out")

    def __init__(self, header: Header, keys_inner: tuple[bytes, bytes] | None = None,
                 keys_outer: tuple[bytes, bytes] | None = None, *,
                 prks: tuple[bytes, bytes] | None = None):
        # private: use new_version() or open_version().  Either the derived (content, attribute)
        # keys of both layers are given, or the pseudorandom keys (HKDF-Extract of the checked data
        # keys) they are expanded from on first use.
        self.header = header
        self.header_bytes = header.pack()
        self.digest = header.digest()
        self.chunk_size = header.chunk_size
        self.n_chunks = fmt.chunk_count(header.plaintext_len, self.chunk_size)
        self._prk_inner, self._prk_outer = prks if prks is not None else (None, None)
        self._inner = self._inner_attrs = self._outer = self._outer_attrs = None
        if keys_inner is not None:
            self._inner, self._inner_attrs = InnerAEAD(keys_inner[0]), InnerAEAD(keys_inner[1])
        if keys_outer is not None:
            self._outer, self._outer_attrs = OuterAEAD(keys_outer[0]), OuterAEAD(keys_outer[1])
        if prks is None and (keys_inner is None or keys_outer is None):
            raise ValueError("derived keys or pseudorandom keys are required")
        v = header.version
        self._attrs_aad_in = fmt.attrs_aad(fmt.aad_prefix(header.suite, fmt.LAYER_INNER, self.digest, v))
        self._attrs_aad_out = fmt.attrs_aad(fmt.aad_prefix(header.suite, fmt.LAYER_OUTER, self.digest, v))
        if v == fmt.FORMAT_V1:
            self._aad_in = fmt.aad_prefix(header.suite, fmt.LAYER_INNER, self.digest, v)
            self._aad_out = fmt.aad_prefix(header.suite, fmt.LAYER_OUTER, self.digest, v)
        else:  # version 2: chunk AADs do not depend on the length, generation or attributes
            self._aad_in = fmt.chunk_aad_prefix_v2(header.suite, fmt.LAYER_INNER, header.file_id, header.msg_id)
            self._aad_out = fmt.chunk_aad_prefix_v2(header.suite, fmt.LAYER_OUTER, header.file_id, header.msg_id)

    def _content(self) -> tuple[InnerAEAD, OuterAEAD]:
        inner, outer = self._inner, self._outer
        if inner is None or outer is None:  # two threads may both derive: same keys, either wins
            h = self.header
            inner = InnerAEAD(_key_inner(self._prk_inner, h.suite, LABEL_DERIVE, h.version))
            outer = OuterAEAD(_key_outer(self._prk_outer, h.suite, LABEL_DERIVE, h.version))
            self._inner, self._outer = inner, outer
        return inner, outer

    def _attrs(self) -> tuple[InnerAEAD, OuterAEAD]:
        inner, outer = self._inner_attrs, self._outer_attrs
        if inner is None or outer is None:
            h = self.header
            inner = InnerAEAD(_key_inner(self._prk_inner, h.suite, LABEL_ATTRS, h.version))
            outer = OuterAEAD(_key_outer(self._prk_outer, h.suite, LABEL_ATTRS, h.version))
            self._inner_attrs, self._outer_attrs = inner, outer
        return inner, outer

    def __repr__(self) -> str:
        return (f"ObjectCipher(len={self.header.plaintext_len}, chunks={self.n_chunks}, "
                f"gen={self.header.generation}, <keys redacted>)")

    def __reduce__(self):  # keys must not end up in a pickle, a file or a child process
        raise TypeError("ObjectCipher holds keys and cannot be pickled")

    # ---- construction ---------------------------------------------------------------------------

    @classmethod
    def new_version(cls, dk_inner: bytes, dk_outer: bytes, *, plaintext_len: int, file_id: bytes,
                    generation: int = 0, chunk_log2: int = fmt.DEFAULT_CHUNK_LOG2,
                    msg_id: bytes | None = None, version: int = fmt.FORMAT_VERSION,
                    with_attrs: bool = False, sparse: bool = False) -> "ObjectCipher":
        """Keys for a new object version.  ``msg_id`` defaults to 32 fresh random bytes; pass one
        only to reproduce test vectors.  ``version`` 1 is for test vectors and for reading old
        objects' successors only; new objects are version 2.  ``with_attrs`` (version 2): the
        version carries an attribute blob (the header's FLAG_ATTRS).  ``sparse`` (version 2): the
        body stores only the chunks of a chunk map (FLAG_SPARSE, :meth:`seal_map`)."""
        dk_inner = _check_dk(dk_inner, "inner")
        dk_outer = _check_dk(dk_outer, "outer")
        if hmac.compare_digest(dk_inner, dk_outer):
            raise ValueError("inner and outer data keys must differ")
        if msg_id is None:
            msg_id = os.urandom(fmt.MSG_ID_BYTES)
        suite = fmt.SUITE_DUAL_AES256GCM_HKDF_SHA512_COMMIT
        if version == fmt.FORMAT_V1 and with_attrs:
            flags = 0  # version 1 has no flag: its attribute blob is optional
        else:
            flags = fmt.FLAG_ATTRS if with_attrs else 0
        if sparse:
            if version != fmt.FORMAT_V2:
                raise ValueError("only version 2 objects can be sparse")
            flags |= fmt.FLAG_SPARSE
        # validates every field; the commitments are filled in below
        draft = Header(chunk_log2=chunk_log2, generation=generation, plaintext_len=plaintext_len,
                       file_id=bytes(file_id), msg_id=bytes(msg_id), commit_inner=bytes(fmt.COMMIT_BYTES),
                       commit_outer=bytes(fmt.COMMIT_BYTES), suite=suite, version=version, flags=flags)
        prks = (_prk_inner(dk_inner, draft.msg_id), _prk_outer(dk_outer, draft.msg_id))
        return cls(_committed(draft, prks), prks=prks)

    def successor(self, *, generation: int, with_attrs: bool) -> "ObjectCipher":
        """Version 2: the same content (body, message id, keys) under a new header with another
        generation and attribute flag, its commitments recomputed.  An attribute change stores
        this header with a newly sealed blob and leaves the body alone: version 2 chunk AADs do
        not cover the header, while the attribute AAD does (so an old blob cannot be put back
        without its old header, whose generation is lower)."""
        if self.header.version != fmt.FORMAT_V2:
            raise ValueError("only version 2 headers have successors without a new body")
        if self._prk_inner is None or self._prk_outer is None:
            raise ValueError("this cipher was built from derived keys: no successor possible")
        draft = dataclasses.replace(self.header, generation=generation,
                                    flags=(fmt.FLAG_ATTRS if with_attrs else 0)
                                    | (self.header.flags & fmt.FLAG_SPARSE))
        prks = (self._prk_inner, self._prk_outer)
        out = ObjectCipher(_committed(draft, prks), prks=prks)
        out._inner, out._outer = self._inner, self._outer  # same content keys
        return out

    @classmethod
    def open_version(cls, header: Header, dk_inner: bytes, dk_outer: bytes) -> "ObjectCipher":
        """Keys for an existing version; verifies both commitments first (constant time).

        The commitments cover the data keys, ``msg_id`` and every other header field, so once this
        returns the header is authenticated (plaintext length and generation included) even before
        any chunk has been read."""
        dk_inner = _check_dk(dk_inner, "inner")
        dk_outer = _check_dk(dk_outer, "outer")
        bound = header.bound_fields()
        prks = (_prk_inner(dk_inner, header.msg_id), _prk_outer(dk_outer, header.msg_id))
        c_in = _commit_inner(prks[0], header.suite, bound, header.version)
        c_out = _commit_outer(prks[1], header.suite, bound, header.version)
        ok_in = hmac.compare_digest(c_in, header.commit_inner)
        ok_out = hmac.compare_digest(c_out, header.commit_outer)
        if not (ok_in and ok_out):
            which = " and ".join(n for n, ok in (("inner", ok_in), ("outer", ok_out)) if not ok)
            raise IntegrityError(f"commitment mismatch ({which} layer): wrong or substituted data key, "
                                 "or an altered header")
        # the content and attribute keys are expanded on first use from these checked keys
        return cls(header, prks=prks)

    # ---- layout ---------------------------------------------------------------------------------

    @property
    def plaintext_len(self) -> int:
        return self.header.plaintext_len

    @property
    def body_size(self) -> int:
        return fmt.body_size(self.header.plaintext_len, self.chunk_size)

    def chunk_plain_len(self, index: int) -> int:
        return fmt.chunk_plain_len(index, self.header.plaintext_len, self.chunk_size)

    def chunk_body_offset(self, index: int) -> int:
        return fmt.chunk_body_offset(index, self.chunk_size)

    def chunks_for_range(self, offset: int, length: int) -> range:
        return fmt.chunks_for_range(offset, length, self.header.plaintext_len, self.chunk_size)

    def body_span(self, chunks: range) -> tuple[int, int]:
        return fmt.body_span(chunks, self.header.plaintext_len, self.chunk_size)

    # ---- chunks ---------------------------------------------------------------------------------

    def seal_chunk_into(self, index: int, plaintext, out) -> None:
        """Encrypt chunk ``index`` (both layers) into ``out`` (exactly len(plaintext)+32 bytes)."""
        n = self.chunk_plain_len(index)
        if len(plaintext) != n:
            raise ValueError(f"chunk {index} must hold {n} plaintext bytes, got {len(plaintext)}")
        out = memoryview(out)
        if len(out) != n + fmt.CHUNK_OVERHEAD:
            raise ValueError("output buffer must be plaintext length + 32 bytes")
        nonce = fmt.chunk_nonce(index)
        final = index == self.n_chunks - 1
        mid = out[:n + fmt.TAG_BYTES]
        inner, outer = self._content()
        inner.encrypt_into(nonce, plaintext, fmt.chunk_aad(self._aad_in, index, final), mid)
        outer.encrypt_into(nonce, mid, fmt.chunk_aad(self._aad_out, index, final), out)

    def seal_chunk(self, index: int, plaintext) -> bytearray:
        out = bytearray(len(plaintext) + fmt.CHUNK_OVERHEAD)
        self.seal_chunk_into(index, plaintext, out)
        return out

    def open_chunk_into(self, index: int, data, out, scratch=None) -> None:
        """Verify and decrypt chunk ``index`` into ``out`` (exactly its plaintext length).

        ``data`` is the chunk's body bytes; if it is writable it is used as scratch space, else
        ``scratch`` (a writable buffer of at least the chunk's size plus one tag, reusable for
        the next chunk: it only ever holds inner-layer ciphertext), else a new buffer.  On any
        failure ``out`` is wiped and IntegrityError is raised: no unverified plaintext escapes.
        """
        if not 0 <= index < self.n_chunks:
            raise IntegrityError(f"chunk {index} does not exist (object has {self.n_chunks})")
        n = self.chunk_plain_len(index)
        out = memoryview(out)
        if len(out) != n:
            raise ValueError("output buffer must be exactly the chunk's plaintext length")
        if len(data) != n + fmt.CHUNK_OVERHEAD:
            _wipe(out)
            raise IntegrityError(f"chunk {index} is {len(data)} bytes, expected {n + fmt.CHUNK_OVERHEAD}"
                                 " (truncated or extended object)")
        view = memoryview(data)
        if not view.readonly:
            scratch = view[:n + fmt.TAG_BYTES]
        elif scratch is not None and len(scratch) >= n + fmt.TAG_BYTES:
            scratch = memoryview(scratch)[:n + fmt.TAG_BYTES]
        else:
            scratch = memoryview(bytearray(n + fmt.TAG_BYTES))
        nonce = fmt.chunk_nonce(index)
        final = index == self.n_chunks - 1
        inner, outer = self._content()
        if not outer.decrypt_into(nonce, view, fmt.chunk_aad(self._aad_out, index, final), scratch):
            _wipe(out)
            raise IntegrityError(f"chunk {index} failed authentication (outer layer)")
        if not inner.decrypt_into(nonce, scratch, fmt.chunk_aad(self._aad_in, index, final), out):
            _wipe(out)
            _wipe(scratch)
            raise IntegrityError(f"chunk {index} failed authentication (inner layer)")

    def scratch(self) -> bytearray:
        """A buffer that :meth:`open_chunk_into` can use as ``scratch`` for any chunk."""
        return bytearray(self.chunk_size + fmt.TAG_BYTES)

    def open_chunk(self, index: int, data, scratch=None) -> bytearray:
        out = bytearray(self.chunk_plain_len(index) if 0 <= index < self.n_chunks else 0)
        self.open_chunk_into(index, data, out, scratch)
        return out

    # ---- chunk map of a sparse version ----------------------------------------------------------

    @property
    def sparse(self) -> bool:
        return self.header.version == fmt.FORMAT_V2 and self.header.sparse

    @property
    def sealed_map_len(self) -> int:
        """Bytes of the sealed chunk map at the end of a sparse version's body (0 if dense)."""
        return sparse_map.sealed_map_bytes(self.n_chunks) if self.sparse else 0

    def seal_map(self, chunk_map: "sparse_map.ChunkMap") -> bytearray:
        """The sealed chunk map (both layers, content keys, nonce and AAD of index 2^64 - 1)."""
        if not self.sparse:
            raise ValueError("the header of this version is not sparse")
        if chunk_map.n != self.n_chunks or chunk_map.bits is None:
            raise ValueError("chunk map does not belong to this version")
        plain = chunk_map.bits
        n = len(plain)
        out = bytearray(n + fmt.CHUNK_OVERHEAD)
        mid = memoryview(out)[:n + fmt.TAG_BYTES]
        nonce = fmt.chunk_nonce(fmt.MAP_INDEX)
        inner, outer = self._content()
        inner.encrypt_into(nonce, plain, fmt.map_aad(self._aad_in), mid)
        outer.encrypt_into(nonce, mid, fmt.map_aad(self._aad_out), out)
        return out

    def open_map(self, data) -> "sparse_map.ChunkMap":
        """Verify and decrypt a sparse version's sealed chunk map, then check its rules."""
        if not self.sparse:
            raise ValueError("the header of this version is not sparse")
        n = sparse_map.map_bytes(self.n_chunks)
        if len(data) != n + fmt.CHUNK_OVERHEAD:
            raise IntegrityError(f"chunk map is {len(data)} bytes, expected {n + fmt.CHUNK_OVERHEAD}")
        body = bytearray(data)
        mid = memoryview(body)[:n + fmt.TAG_BYTES]
        nonce = fmt.chunk_nonce(fmt.MAP_INDEX)
        inner, outer = self._content()
        if not outer.decrypt_into(nonce, body, fmt.map_aad(self._aad_out), mid):
            raise IntegrityError("chunk map failed authentication (outer layer)")
        out = bytearray(n)
        if not inner.decrypt_into(nonce, mid, fmt.map_aad(self._aad_in), out):
            raise IntegrityError("chunk map failed authentication (inner layer)")
        return sparse_map.ChunkMap(bytes(out), self.header.plaintext_len, self.chunk_size)

    # ---- attributes -----------------------------------------------------------------------------

    def seal_attrs(self, data: bytes, nonce: bytes | None = None) -> bytes:
        """Encrypt a small attribute blob under both layers' attribute keys, bound to this
        version's header.  Returns ``nonce(12) || outer(inner(data))``; a fresh random nonce is
        drawn unless one is given (test vectors only)."""
        if nonce is None:
            nonce = os.urandom(fmt.NONCE_BYTES)
        if len(nonce) != fmt.NONCE_BYTES:
            raise ValueError("nonce must be 12 bytes")
        n = len(data)
        out = bytearray(fmt.NONCE_BYTES + n + fmt.CHUNK_OVERHEAD)
        out[:fmt.NONCE_BYTES] = nonce
        body = memoryview(out)[fmt.NONCE_BYTES:]
        inner, outer = self._attrs()
        if self.header.version == fmt.FORMAT_V2 and not self.header.has_attrs:
            raise ValueError("this version 2 header says the version has no attribute blob")
        inner.encrypt_into(nonce, data, self._attrs_aad_in, body[:n + fmt.TAG_BYTES])
        outer.encrypt_into(nonce, body[:n + fmt.TAG_BYTES], self._attrs_aad_out, body)
        return bytes(out)

    def open_attrs(self, blob: bytes) -> bytes:
        if len(blob) < fmt.NONCE_BYTES + fmt.CHUNK_OVERHEAD:
            raise IntegrityError("attribute blob too short")
        nonce = bytes(blob[:fmt.NONCE_BYTES])
        body = bytearray(blob[fmt.NONCE_BYTES:])
        n = len(body) - fmt.CHUNK_OVERHEAD
        mid = memoryview(body)[:n + fmt.TAG_BYTES]
        inner, outer = self._attrs()
        if not outer.decrypt_into(nonce, body, self._attrs_aad_out, mid):
            raise IntegrityError("attributes failed authentication (outer layer)")
        out = bytearray(n)
        if not inner.decrypt_into(nonce, mid, self._attrs_aad_in, out):
            _wipe(out)
            raise IntegrityError("attributes failed authentication (inner layer)")
        return bytes(out)
