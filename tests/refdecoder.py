"""An independent reference decoder for DSSEFS v1, written from docs/format.md alone.

It deliberately shares no code with ``dssefs.envelope``: HKDF is built here from ``hmac`` and
``hashlib`` (RFC 5869), and BOTH GCM layers use ``cryptography``'s AESGCM, whereas dssefs computes
the outer layer with pycryptodome.  If dssefs's objects decrypt here, each layer is plain standard
AES-256-GCM as the specification says.  Section numbers refer to docs/format.md.

Test-only code: it returns plaintext as ``bytes`` and makes no effort to wipe anything.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM


class RefError(Exception):
    pass


class NotDssefs(RefError):
    """No dsse-* metadata (section 9.1)."""


class Integrity(RefError):
    """Anything malformed, tampered, truncated, extended or mis-keyed."""


class Unsupported(Integrity):
    """Unknown version, suite, flags or provider (section 11.3: a kind of integrity error)."""


# ---- constants (sections 4-9) ---------------------------------------------------------------------

HEADER_LEN = 133
BOUND_LEN = 69
TAG = 16
DOMAIN = b"dssefs1"
INNER, OUTER = 0x01, 0x02
REQUIRED = ("dsse-h", "dsse-ki", "dsse-ko", "dsse-w")
OPTIONAL = ("dsse-a",)
KEY_ID = re.compile(r"[A-Za-z0-9:/_.+=@-]{1,256}")
B64U = re.compile(r"[A-Za-z0-9_-]*")


# ---- primitives -----------------------------------------------------------------------------------

def hkdf_sha512(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """RFC 5869 with HMAC-SHA-512, from the standard library only."""
    prk = hmac.new(salt, ikm, hashlib.sha512).digest()
    okm, block, counter = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha512).digest()
        okm += block
        counter += 1
    return okm[:length]


def gcm_open(key: bytes, nonce: bytes, data: bytes, aad: bytes) -> bytes:
    assert len(key) == 32 and len(nonce) == 12
    if len(data) < TAG:
        raise Integrity("GCM input shorter than a tag")
    try:
        return AESGCM(key).decrypt(nonce, data, aad)
    except InvalidTag:
        raise Integrity("GCM tag mismatch") from None


def b64u_decode(text: str) -> bytes:
    """Canonical unpadded base64url (section 9.2)."""
    if not isinstance(text, str) or not B64U.fullmatch(text) or len(text) % 4 == 1:
        raise Integrity("not canonical unpadded base64url")
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != text:
        raise Integrity("not canonical unpadded base64url")
    return raw


# ---- header (section 4) ---------------------------------------------------------------------------

@dataclass(frozen=True)
class RefHeader:
    raw: bytes
    version: int
    suite: int
    flags: int
    chunk_log2: int
    generation: int
    plaintext_len: int
    file_id: bytes
    msg_id: bytes
    commit_inner: bytes
    commit_outer: bytes

    @property
    def cs(self) -> int:
        return 1 << self.chunk_log2

    @property
    def n(self) -> int:
        return max(1, -(-self.plaintext_len // self.cs))

    @property
    def body_size(self) -> int:
        return self.plaintext_len + 32 * self.n


def parse_header(raw: bytes) -> RefHeader:
    if len(raw) != HEADER_LEN:
        raise Integrity("header must be 133 bytes")
    version = raw[0]
    suite = struct.unpack(">H", raw[1:3])[0]
    flags = raw[3]
    if version != 1 or suite != 1 or flags != 0:
        raise Unsupported(f"version {version} suite {suite} flags {flags}")
    chunk_log2 = raw[4]
    generation, plaintext_len = struct.unpack(">QQ", raw[5:21])
    if not 12 <= chunk_log2 <= 24:
        raise Integrity("chunk_log2 out of range")
    if plaintext_len >= 1 << 48:
        raise Integrity("plaintext_len out of range")
    return RefHeader(raw, version, suite, flags, chunk_log2, generation, plaintext_len,
                     raw[21:37], raw[37:69], raw[69:101], raw[101:133])


# ---- metadata (section 9) -------------------------------------------------------------------------

@dataclass(frozen=True)
class RefEnvelope:
    header: RefHeader
    provider: str
    key_id_inner: str
    key_id_outer: str
    wrapped_inner: bytes
    wrapped_outer: bytes
    attrs: bytes | None


def parse_metadata(meta: dict[str, str]) -> RefEnvelope:
    ours = {k: v for k, v in meta.items() if k.lower().startswith("dsse-")}
    if not ours:
        raise NotDssefs("no dsse-* metadata")
    for k, v in ours.items():
        if k not in REQUIRED + OPTIONAL:
            raise Integrity(f"unknown metadata key {k!r}")
        if not isinstance(v, str) or not v.isascii():
            raise Integrity(f"{k} is not ASCII")
    for k in REQUIRED:
        if k not in ours:
            raise Integrity(f"missing {k}")
    header = parse_header(b64u_decode(ours["dsse-h"]))
    parts = ours["dsse-w"].split(";")
    if len(parts) != 3:
        raise Integrity("wrapping descriptor needs exactly two ';'")
    provider, kid_in, kid_out = parts
    if provider not in ("kms", "local"):
        raise Unsupported(f"provider {provider!r}")
    if not (KEY_ID.fullmatch(kid_in) and KEY_ID.fullmatch(kid_out)):
        raise Integrity("malformed key id")
    w_in, w_out = b64u_decode(ours["dsse-ki"]), b64u_decode(ours["dsse-ko"])
    if not (1 <= len(w_in) <= 1024 and 1 <= len(w_out) <= 1024):
        raise Integrity("wrapped key length")
    attrs = b64u_decode(ours["dsse-a"]) if "dsse-a" in ours else None
    if attrs is not None and len(attrs) < 44:
        raise Integrity("attribute blob too short")
    return RefEnvelope(header, provider, kid_in, kid_out, w_in, w_out, attrs)


# ---- keys, AAD, decoding (sections 5-8, 9.3) ------------------------------------------------------

def info(suite: int, layer: int, label: bytes) -> bytes:
    return DOMAIN + struct.pack(">HB", suite, layer) + label


def derive(layer: int, dk: bytes, header: RefHeader) -> tuple[bytes, bytes, bytes]:
    """(K_L, CM_L, AK_L) of section 5.1."""
    s, m = header.suite, header.msg_id
    return (hkdf_sha512(dk, m, info(s, layer, b"DERIVEKEY")),
            hkdf_sha512(dk, m, info(s, layer, b"COMMITKEY") + header.raw[:BOUND_LEN]),
            hkdf_sha512(dk, m, info(s, layer, b"ATTRSKEY")))


def nonce(i: int) -> bytes:
    return b"\x00" * 4 + struct.pack(">Q", i)


def aad_prefix(header: RefHeader, layer: int) -> bytes:
    return info(header.suite, layer, hashlib.sha256(header.raw).digest())


def chunk_aad(header: RefHeader, layer: int, i: int) -> bytes:
    return aad_prefix(header, layer) + struct.pack(">QB", i, 1 if i == header.n - 1 else 0)


@dataclass(frozen=True)
class RefVersion:
    header: RefHeader
    k_in: bytes
    k_out: bytes
    ak_in: bytes
    ak_out: bytes

    def chunk_len(self, i: int) -> int:
        h = self.header
        if not 0 <= i < h.n:
            raise Integrity(f"chunk {i} does not exist")
        return h.cs if i < h.n - 1 else h.plaintext_len - (h.n - 1) * h.cs

    def offset(self, i: int) -> int:
        return i * (self.header.cs + 32)

    def open_chunk(self, i: int, data: bytes) -> bytes:
        if len(data) != self.chunk_len(i) + 32:
            raise Integrity(f"chunk {i} has the wrong size")
        mid = gcm_open(self.k_out, nonce(i), bytes(data), chunk_aad(self.header, OUTER, i))
        return gcm_open(self.k_in, nonce(i), mid, chunk_aad(self.header, INNER, i))

    def open_attrs(self, blob: bytes) -> bytes:
        if len(blob) < 44:
            raise Integrity("attribute blob too short")
        r = bytes(blob[:12])
        mid = gcm_open(self.ak_out, r, bytes(blob[12:]), aad_prefix(self.header, OUTER) + b"attrs")
        return gcm_open(self.ak_in, r, mid, aad_prefix(self.header, INNER) + b"attrs")


def open_version(header: RefHeader, dk_in: bytes, dk_out: bytes) -> RefVersion:
    """Derive both layers' keys and check both commitments (section 5.2) before returning."""
    k_in, cm_in, ak_in = derive(INNER, dk_in, header)
    k_out, cm_out, ak_out = derive(OUTER, dk_out, header)
    ok_in = hmac.compare_digest(cm_in, header.commit_inner)
    ok_out = hmac.compare_digest(cm_out, header.commit_outer)
    if not (ok_in and ok_out):
        raise Integrity("commitment mismatch")
    return RefVersion(header, k_in, k_out, ak_in, ak_out)


def decrypt_object(meta: dict[str, str], body: bytes, dk_in: bytes, dk_out: bytes
                   ) -> tuple[bytes, bytes | None]:
    """Reader rules of section 11.2 for a whole object: ``(plaintext, attrs or None)``."""
    env = parse_metadata(meta)
    h = env.header
    if len(body) != h.body_size:
        raise Integrity("object size differs from the header's body size")
    v = open_version(h, dk_in, dk_out)
    out = []
    for i in range(h.n):
        off = v.offset(i)
        out.append(v.open_chunk(i, body[off:off + v.chunk_len(i) + 32]))
    attrs = v.open_attrs(env.attrs) if env.attrs is not None else None
    return b"".join(out), attrs


def read_range(v: RefVersion, body: bytes, off: int, cnt: int) -> bytes:
    """Plaintext ``[off, off+cnt)`` clipped to the end, decrypting only the chunks it touches."""
    h = v.header
    end = min(off + cnt, h.plaintext_len)
    if cnt <= 0 or off >= end:
        return b""
    first, last = off // h.cs, (end - 1) // h.cs
    plain = b"".join(v.open_chunk(i, body[v.offset(i):v.offset(i) + v.chunk_len(i) + 32])
                     for i in range(first, last + 1))
    skip = off - first * h.cs
    return plain[skip:skip + end - off]


# ---- local keyring wrapping (section 10) ----------------------------------------------------------

def canonical_context(ctx: dict[str, str]) -> bytes:
    return json.dumps(ctx, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def unwrap_local(master_key: bytes, key_name: str, ctx: dict[str, str], blob: bytes) -> bytes:
    """The data key inside a 61-byte local-keyring blob; Integrity if it does not open."""
    if len(blob) != 61:
        raise Integrity("local wrapped key must be 61 bytes")
    if blob[0] != 0x01:
        raise Unsupported(f"local wrapping version {blob[0]}")
    aad = b"\x01" + key_name.encode("ascii") + b"\x00" + canonical_context(ctx)
    return gcm_open(master_key, bytes(blob[1:13]), bytes(blob[13:]), aad)
