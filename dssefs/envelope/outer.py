"""The outer layer: AES-256-GCM and HKDF-SHA512 from ``pycryptodome`` only.

This module may import nothing but the standard library and ``Crypto`` (pycryptodome).  Nonces and
tag lengths are always passed explicitly: pycryptodome would otherwise pick a 16-byte random nonce
and accept truncated tags.
"""

from __future__ import annotations

from Crypto.Cipher import AES
from Crypto.Hash import SHA512

NONCE_BYTES = 12
TAG_BYTES = 16

_BLOCK = 128  # SHA-512 block size
_IPAD = bytes(b ^ 0x36 for b in range(256))  # byte-wise XOR tables for bytes.translate
_OPAD = bytes(b ^ 0x5C for b in range(256))


def hmac_sha512(key: bytes, msg: bytes) -> bytes:
    """HMAC-SHA512 (RFC 2104) on pycryptodome's SHA-512.

    Four SHA-512 calls and two ``translate``s: about 8 us, a third of ``Crypto.Hash.HMAC`` (whose
    per-object set-up dominated a small file's key derivation)."""
    if len(key) > _BLOCK:
        key = SHA512.new(key).digest()
    key = bytes(key).ljust(_BLOCK, b"\0")
    inner = SHA512.new(key.translate(_IPAD))
    inner.update(msg)
    outer = SHA512.new(key.translate(_OPAD))
    outer.update(inner.digest())
    return outer.digest()


def hkdf_extract(ikm: bytes, salt: bytes) -> bytes:
    """HKDF-Extract (RFC 5869 2.2): the 64-byte pseudorandom key."""
    return hmac_sha512(salt or bytes(64), ikm)


def hkdf_expand(prk: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF-Expand (RFC 5869 2.3) with SHA-512."""
    if not 0 < length <= 255 * 64:
        raise ValueError("HKDF-SHA512 output length must be 1..16320 bytes")
    out, t, i = b"", b"", 1
    while len(out) < length:
        t = hmac_sha512(prk, t + info + bytes((i,)))
        out += t
        i += 1
    return out[:length]


def hkdf_sha512(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF-SHA512 (RFC 5869) extract-then-expand."""
    return hkdf_expand(hkdf_extract(ikm, salt), info, length)


def _writable_view(out, size: int) -> memoryview:
    """``out`` as a memoryview of exactly ``size`` writable bytes.

    Slicing a bytearray copies it, so ``output=out[:n]`` on a bytearray would make pycryptodome
    write into a temporary and leave ``out`` untouched (plaintext left in place by an in-place
    encryption, zeros returned by a decryption).  A memoryview slice writes through.
    """
    view = memoryview(out)
    if view.readonly or view.nbytes != size:
        raise ValueError(f"output buffer must be {size} writable bytes")
    return view.cast("B") if view.format != "B" else view


def warm_up() -> None:
    """Load what pycryptodome loads on its first GCM cipher (its GCM, ECB and CTR modes and their
    GHASH and AES libraries: ~25 ms of imports and ``dlopen``), so that a mount's first read or
    write does not wait for it.  One encryption and one decryption of an empty message under an
    all-zero key: no secret is involved."""
    aead = OuterAEAD(bytes(32))
    out = bytearray(TAG_BYTES)
    aead.encrypt_into(bytes(NONCE_BYTES), b"", b"", out)
    if not aead.decrypt_into(bytes(NONCE_BYTES), bytes(out), b"", bytearray(0)):
        raise RuntimeError("pycryptodome AES-GCM failed its warm-up round trip")


class OuterAEAD:
    """AES-256-GCM with 12-byte nonces and 16-byte tags; in place on writable buffers."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes):
        if len(key) != 32:
            raise ValueError("outer layer key must be 32 bytes")
        self._key = bytes(key)

    def __repr__(self) -> str:
        return "OuterAEAD(<key redacted>)"

    def __reduce__(self):  # keys must not end up in a pickle, a file or a child process
        raise TypeError("OuterAEAD holds a key and cannot be pickled")

    def _cipher(self, nonce: bytes, aad: bytes):
        if len(nonce) != NONCE_BYTES:
            raise ValueError("nonce must be 12 bytes")
        cipher = AES.new(self._key, AES.MODE_GCM, nonce=nonce, mac_len=TAG_BYTES)
        cipher.update(aad)
        return cipher

    def encrypt_into(self, nonce: bytes, data, aad: bytes, out) -> None:
        """Write ``ciphertext || tag`` (len(data) + 16 bytes) into ``out``.

        ``out[:len(data)]`` may be the very buffer ``data`` (in-place encryption).
        """
        n = len(data)
        out = _writable_view(out, n + TAG_BYTES)
        cipher = self._cipher(nonce, aad)
        cipher.encrypt(data, output=out[:n])
        out[n:n + TAG_BYTES] = cipher.digest()

    def decrypt_into(self, nonce: bytes, data, aad: bytes, out) -> bool:
        """Verify and decrypt ``ciphertext || tag`` into ``out`` (may alias ``data``); False on
        authentication failure, in which case the caller must wipe ``out``."""
        n = len(data) - TAG_BYTES
        if n < 0:
            return False
        out = _writable_view(out, n)
        cipher = self._cipher(nonce, aad)
        try:
            cipher.decrypt_and_verify(data[:n], data[n:], output=out[:n])
        except ValueError:
            return False
        return True
