"""The inner layer: AES-256-GCM and HKDF-SHA512 from ``cryptography`` (OpenSSL) only.

This module may import nothing but the standard library and ``cryptography``: a flaw in the other
library must not reach this layer's keys.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

NONCE_BYTES = 12
TAG_BYTES = 16


def hkdf_extract(ikm: bytes, salt: bytes) -> bytes:
    """HKDF-Extract (RFC 5869 2.2) with SHA-512: the 64-byte pseudorandom key."""
    h = hmac.HMAC(salt or bytes(64), hashes.SHA512())
    h.update(ikm)
    return h.finalize()


def hkdf_expand(prk: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF-Expand (RFC 5869 2.3) with SHA-512."""
    return HKDFExpand(algorithm=hashes.SHA512(), length=length, info=info).derive(prk)


def hkdf_sha512(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF-SHA512 (RFC 5869) extract-then-expand."""
    return hkdf_expand(hkdf_extract(ikm, salt), info, length)


class InnerAEAD:
    """AES-256-GCM with 12-byte nonces and 16-byte tags, writing into caller buffers."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes):
        if len(key) != 32:
            raise ValueError("inner layer key must be 32 bytes")
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "InnerAEAD(<key redacted>)"

    def __reduce__(self):  # keys must not end up in a pickle, a file or a child process
        raise TypeError("InnerAEAD holds a key and cannot be pickled")

    def encrypt_into(self, nonce: bytes, plaintext, aad: bytes, out) -> None:
        """Write ``ciphertext || tag`` (len(plaintext) + 16 bytes) into ``out``."""
        if len(nonce) != NONCE_BYTES:
            raise ValueError("nonce must be 12 bytes")
        self._aead.encrypt_into(nonce, plaintext, aad, out)

    def decrypt_into(self, nonce: bytes, data, aad: bytes, out) -> bool:
        """Verify and decrypt ``ciphertext || tag`` into ``out``; False on authentication failure.

        On failure ``out`` may hold garbage: the caller must wipe it.
        """
        if len(nonce) != NONCE_BYTES:
            raise ValueError("nonce must be 12 bytes")
        try:
            self._aead.decrypt_into(nonce, data, aad, out)
        except InvalidTag:
            return False
        return True
