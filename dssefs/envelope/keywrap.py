"""Version 2: a per-object data key wrapped under its layer's epoch key (docs/format.md 10.3).

``blob = 0x02 || nonce (12, random) || GCM-Enc(EK_L, nonce, DK_L, 0x02 || canonical JSON of ctx)``
(61 bytes), where ``ctx`` is the object's version-2 context of that layer (layer, bucket, object
key, epoch id).  The inner layer's keys are wrapped with ``cryptography`` only and the outer
layer's with ``pycryptodome`` only, like everything else of the layer.  A blob that does not open
(altered, or copied to another object key, layer or epoch) is an integrity error.
"""

from __future__ import annotations

import os

from ..errors import IntegrityError
from . import format as fmt
from .inner import InnerAEAD
from .outer import OuterAEAD


def _aead(layer: int, epoch_key: bytes):
    if layer == fmt.LAYER_INNER:
        return InnerAEAD(epoch_key)
    if layer == fmt.LAYER_OUTER:
        return OuterAEAD(epoch_key)
    raise ValueError(f"unknown layer {layer}")


def wrap_data_key(layer: int, epoch_key: bytes, data_key: bytes, ctx: dict[str, str],
                  nonce: bytes | None = None) -> bytes:
    """The 61-byte wrapped form of ``data_key``; ``nonce`` only for test vectors."""
    if len(data_key) != 32:
        raise ValueError("data key must be 32 bytes")
    nonce = os.urandom(fmt.NONCE_BYTES) if nonce is None else nonce
    if len(nonce) != fmt.NONCE_BYTES:
        raise ValueError("nonce must be 12 bytes")
    out = bytearray(fmt.WRAPPED_DK_BYTES)
    out[0] = fmt.DK_WRAP_VERSION
    out[1:1 + fmt.NONCE_BYTES] = nonce
    _aead(layer, epoch_key).encrypt_into(nonce, data_key, fmt.dk_wrap_aad(ctx),
                                         memoryview(out)[1 + fmt.NONCE_BYTES:])
    return bytes(out)


def unwrap_data_key(layer: int, epoch_key: bytes, blob: bytes, ctx: dict[str, str]) -> bytes:
    """The data key, or IntegrityError naming the layer (no key bytes in any message)."""
    name = "inner" if layer == fmt.LAYER_INNER else "outer"
    if len(blob) != fmt.WRAPPED_DK_BYTES or blob[0] != fmt.DK_WRAP_VERSION:
        raise IntegrityError(f"wrapped {name} data key is malformed ({len(blob)} bytes)")
    nonce = bytes(blob[1:1 + fmt.NONCE_BYTES])
    out = bytearray(32)
    if not _aead(layer, epoch_key).decrypt_into(nonce, bytes(blob[1 + fmt.NONCE_BYTES:]),
                                                fmt.dk_wrap_aad(ctx), out):
        out[:] = bytes(32)
        raise IntegrityError(f"wrapped {name} data key does not open under its epoch key for this "
                             "object name (copied or renamed outside dssefs, or altered)")
    return bytes(out)
