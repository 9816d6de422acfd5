"""An independent reference decoder for DSSEFS versions 1 and 2, written from docs/format.md alone.

It deliberately shares no code with ``dssefs``: HKDF is built here from ``hmac`` and ``hashlib``
(RFC 5869), and BOTH GCM layers use ``cryptography``'s AESGCM, whereas dssefs computes the outer
layer with pycryptodome.  If dssefs's objects decrypt here, each layer is plain standard
AES-256-GCM as the specification says.  Section numbers refer to docs/format.md: sections 4-11 for
version 1, section 17 for what version 2 changes (domain strings, header flags, chunk and attribute
AADs, epoch records and epoch references, keyring and data-key wrapping, metadata, reader order),
section 18 for which keyring keys a reader trusts, appendix A for the local store's files and
appendix C for the (unprotected) keyring file.

Version 2 objects are read with :class:`RefReader`, which follows 17.8 step by step: metadata,
size, epoch (prefix from ``dsse-e``, record fetched, checked and unwrapped with the keyring, keys
cached per prefix and epoch id), data keys, commitments, chunks, attributes.  It reads objects
through any ``get(key) -> (metadata, body) | None``; :class:`LocalStoreFiles` is one that reads a
local store's object files directly (appendix A), so no dssefs code sits between the bytes on disk
and this decoder.  Key wrapping by AWS KMS is out of scope (records naming ``kms`` are refused
with :class:`KeyRefused`); :func:`read_with_epoch_keys` decodes any version 2 object from given
epoch keys.

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


class KeyRefused(RefError):
    """The key provider's kind of error (section 11.3 ``KeyProviderError``): a master key that is
    not trusted, not in the keyring, or a wrapped key that does not open."""


class Untrusted(KeyRefused):
    """A record (or version 1 object) names a master key this reader does not trust for that layer
    (section 18)."""


class KeyNotInKeyring(KeyRefused):
    """The keyring has no key of the name a record or object names."""


class WrongKeyring(KeyRefused):
    """A 69-byte keyring blob (17.5) carries another key's check value: the keyring has a
    different key of that name."""


class WrappedKeyMismatch(KeyRefused):
    """A wrapped epoch key or data key does not open under its context (17.4: ``WrappedKeyMismatch``,
    errno EACCES): altered, or copied to another object key, layer, epoch, prefix or bucket."""


# ---- constants (sections 4-9) ---------------------------------------------------------------------

HEADER_LEN = 133
BOUND_LEN = 69
TAG = 16
DOMAIN = b"dssefs1"
DOMAINS = {1: b"dssefs1", 2: b"dssefs2"}  # 5.1 / 7 and 17.1
INNER, OUTER = 0x01, 0x02
LAYER_NAMES = {INNER: "inner", OUTER: "outer"}
REQUIRED = ("dsse-h", "dsse-ki", "dsse-ko", "dsse-w")
OPTIONAL = ("dsse-a",)
REQUIRED_V2 = ("dsse-h", "dsse-ki", "dsse-ko", "dsse-e")  # 17.7
ALL_KEYS = ("dsse-h", "dsse-ki", "dsse-ko", "dsse-w", "dsse-e", "dsse-a")
FLAG_ATTRS = 0x01  # 17.2
FLAG_SPARSE = 0x02  # 17.2, 17.10
MAP_INDEX = (1 << 64) - 1  # 17.10: the chunk index the sealed chunk map is sealed with
ALLOWED_FLAGS = {1: 0x00, 2: FLAG_ATTRS | FLAG_SPARSE}
KEY_ID = re.compile(r"[A-Za-z0-9:/_.+=@-]{1,256}")
KEYRING_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")  # appendix C, 17.4
B64U = re.compile(r"[A-Za-z0-9_-]*")
EPOCH_REF = re.compile(r"([0-9a-f]{32});(0|[1-9][0-9]{0,3})")  # 17.4, used with fullmatch
HEX32 = re.compile(r"[0-9a-f]{32}")
CREATED = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")
WRAPPED_DK_LEN = 61  # 17.4
KEYRING_BLOB_V2_LEN = 69  # 17.5
MAX_RECORD = 16 * 1024  # 17.4
RECORD_MEMBERS = frozenset({"bucket", "created", "epoch", "format", "inner", "outer", "prefix", "provider",
                            "version"})
RESERVED_COMPONENT = ".dssefs"  # 17.8 step 3
CHECK_LABEL = b"dssefs-keyring-check-v1"  # appendix C, 17.5
#: 17.4 as amended in docs/format.md: the epoch prefix ``P`` may be the whole key only for a
#: directory marker (e.g. a prefix mount's root marker ``team/``).  The earlier draft of 17.4 said
#: "reject if P would be the whole key" without exception; ``epoch_prefix(..., marker_root=False)``
#: applies that rule.
MARKER_MAY_BE_ITS_OWN_PREFIX = True


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

    @property
    def has_attrs(self) -> bool:
        """Version 2 only (17.2): the version carries an attribute blob."""
        return self.version == 2 and bool(self.flags & FLAG_ATTRS)

    @property
    def sparse(self) -> bool:
        """Version 2 only (17.10): only the chunks of the chunk map are stored."""
        return self.version == 2 and bool(self.flags & FLAG_SPARSE)

    @property
    def sealed_map_len(self) -> int:
        return -(-self.n // 8) + 32

    def size_ok(self, size: int) -> bool:
        """Step 2 before the map is known: exact for a dense version; for a sparse one, room for
        the last chunk and the sealed map, and no more than a dense body plus the map."""
        if not self.sparse:
            return size == self.body_size
        last = self.plaintext_len - (self.n - 1) * self.cs + 32
        return last + self.sealed_map_len <= size <= self.body_size + self.sealed_map_len


def parse_header(raw: bytes) -> RefHeader:
    if len(raw) != HEADER_LEN:
        raise Integrity("header must be 133 bytes")
    version = raw[0]
    suite = struct.unpack(">H", raw[1:3])[0]
    flags = raw[3]
    if version not in ALLOWED_FLAGS or suite != 1 or flags & ~ALLOWED_FLAGS[version]:
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
    provider: str  # version 1 only ("" in version 2)
    key_id_inner: str
    key_id_outer: str
    wrapped_inner: bytes
    wrapped_outer: bytes
    attrs: bytes | None
    epoch_id: bytes | None = None  # version 2 only (dsse-e)
    depth: int | None = None

    @property
    def version(self) -> int:
        return self.header.version


def parse_metadata(meta: dict[str, str]) -> RefEnvelope:
    """Section 11.2 step 1 (version 1) and 17.7 / 17.8 step 1 (version 2)."""
    ours = {k: v for k, v in meta.items() if k.lower().startswith("dsse-")}
    if not ours:
        raise NotDssefs("no dsse-* metadata")
    for k, v in ours.items():
        if k not in ALL_KEYS:
            raise Integrity(f"unknown metadata key {k!r}")
        if not isinstance(v, str) or not v.isascii():
            raise Integrity(f"{k} is not ASCII")
    if "dsse-h" not in ours:
        raise Integrity("missing dsse-h")
    # 17.7: the version is decided by the first byte of the decoded dsse-h
    header = parse_header(b64u_decode(ours["dsse-h"]))
    if header.version == 2:
        return _parse_metadata_v2(ours, header)
    if "dsse-e" in ours:
        raise Integrity("dsse-e in a version 1 object")
    for k in REQUIRED:
        if k not in ours:
            raise Integrity(f"missing {k}")
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


def _parse_metadata_v2(ours: dict[str, str], header: RefHeader) -> RefEnvelope:
    if "dsse-w" in ours:
        raise Integrity("dsse-w in a version 2 object")
    for k in REQUIRED_V2:
        if k not in ours:
            raise Integrity(f"missing {k}")
    m = EPOCH_REF.fullmatch(ours["dsse-e"])
    if m is None:
        raise Integrity("dsse-e is not <32 lowercase hex digits>;<depth>")
    epoch_id, depth = bytes.fromhex(m.group(1)), int(m.group(2))
    w_in, w_out = b64u_decode(ours["dsse-ki"]), b64u_decode(ours["dsse-ko"])
    for blob in (w_in, w_out):
        if len(blob) != WRAPPED_DK_LEN:
            raise Integrity(f"version 2 wrapped data key of {len(blob)} bytes")
        if blob[0] != 0x02:
            raise Unsupported(f"data key wrapping version {blob[0]}")
    attrs = b64u_decode(ours["dsse-a"]) if "dsse-a" in ours else None
    if attrs is not None and len(attrs) < 44:
        raise Integrity("attribute blob too short")
    if header.has_attrs and attrs is None:
        raise Integrity("FLAG_ATTRS is set but dsse-a is missing")
    if attrs is not None and not header.has_attrs:
        raise Integrity("dsse-a is present but FLAG_ATTRS is clear")
    return RefEnvelope(header, "", "", "", w_in, w_out, attrs, epoch_id, depth)


# ---- keys, AAD, decoding (sections 5-8, 9.3) ------------------------------------------------------

def info(suite: int, layer: int, label: bytes, version: int = 1) -> bytes:
    """``I(label)`` of 5.1 (``I2(label)`` of 17.1 for version 2)."""
    return DOMAINS[version] + struct.pack(">HB", suite, layer) + label


def derive(layer: int, dk: bytes, header: RefHeader) -> tuple[bytes, bytes, bytes]:
    """(K_L, CM_L, AK_L) of section 5.1 (17.1: with "dssefs2" in version 2)."""
    s, m, v = header.suite, header.msg_id, header.version
    return (hkdf_sha512(dk, m, info(s, layer, b"DERIVEKEY", v)),
            hkdf_sha512(dk, m, info(s, layer, b"COMMITKEY", v) + header.raw[:BOUND_LEN]),
            hkdf_sha512(dk, m, info(s, layer, b"ATTRSKEY", v)))


def nonce(i: int) -> bytes:
    return b"\x00" * 4 + struct.pack(">Q", i)


def aad_prefix(header: RefHeader, layer: int) -> bytes:
    """``prefix_L`` of section 7 (chunks and attributes of version 1); in version 2 ``aprefix_L``
    of 17.3, the attribute AAD's prefix only."""
    return info(header.suite, layer, hashlib.sha256(header.raw).digest(), header.version)


def chunk_prefix(header: RefHeader, layer: int) -> bytes:
    """The prefix of every chunk AAD: ``prefix_L`` (version 1), ``cprefix_L`` (17.3, 58 bytes)."""
    if header.version == 1:
        return aad_prefix(header, layer)
    return info(header.suite, layer, header.file_id + header.msg_id, 2)


def chunk_aad(header: RefHeader, layer: int, i: int) -> bytes:
    return chunk_prefix(header, layer) + struct.pack(">QB", i, 1 if i == header.n - 1 else 0)


def attrs_aad(header: RefHeader, layer: int) -> bytes:
    return aad_prefix(header, layer) + b"attrs"


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

    def open_map(self, body: bytes) -> list[bool]:
        """17.10: authenticate the sealed map at the end of ``body``, check its rules and the
        object size; returns which chunks are stored."""
        h = self.header
        sealed = body[len(body) - h.sealed_map_len:]
        aad = {layer: chunk_prefix(h, layer) + struct.pack(">QB", MAP_INDEX, 2) for layer in (INNER, OUTER)}
        try:
            mid = gcm_open(self.k_out, nonce(MAP_INDEX), bytes(sealed), aad[OUTER])
            bitmap = gcm_open(self.k_in, nonce(MAP_INDEX), mid, aad[INNER])
        except Integrity as e:
            raise Integrity(f"chunk map: {e}") from None
        stored = [bool(bitmap[i // 8] >> (i % 8) & 1) for i in range(h.n)]
        if not stored[-1]:
            raise Integrity("chunk map: the last chunk is not stored")
        if any(bitmap[i // 8] >> (i % 8) & 1 for i in range(h.n, 8 * len(bitmap))):
            raise Integrity("chunk map: bits past the last chunk")
        s = sum(stored)
        if len(body) != (s - 1) * (h.cs + 32) + self.chunk_len(h.n - 1) + 32 + h.sealed_map_len:
            raise Integrity("object size differs from the size the chunk map implies")
        return stored

    def plaintext(self, body: bytes) -> bytes:
        """Every chunk in order (dense: at i·(CS+32); sparse: at rank(i)·(CS+32), holes zeros)."""
        h = self.header
        stored = self.open_map(body) if h.sparse else [True] * h.n
        out, rank = [], 0
        for i in range(h.n):
            if not stored[i]:
                out.append(bytes(self.chunk_len(i)))
                continue
            off = rank * (h.cs + 32)
            out.append(self.open_chunk(i, body[off:off + self.chunk_len(i) + 32]))
            rank += 1
        return b"".join(out)

    def open_chunk(self, i: int, data: bytes) -> bytes:
        if len(data) != self.chunk_len(i) + 32:
            raise Integrity(f"chunk {i} has the wrong size")
        try:
            mid = gcm_open(self.k_out, nonce(i), bytes(data), chunk_aad(self.header, OUTER, i))
            return gcm_open(self.k_in, nonce(i), mid, chunk_aad(self.header, INNER, i))
        except Integrity as e:
            raise Integrity(f"chunk {i}: {e}") from None

    def open_attrs(self, blob: bytes) -> bytes:
        if len(blob) < 44:
            raise Integrity("attribute blob too short")
        r = bytes(blob[:12])
        try:
            return self._open_attrs(r, blob)
        except Integrity as e:
            raise Integrity(f"attribute blob: {e}") from None

    def _open_attrs(self, r: bytes, blob: bytes) -> bytes:
        mid = gcm_open(self.ak_out, r, bytes(blob[12:]), attrs_aad(self.header, OUTER))
        return gcm_open(self.ak_in, r, mid, attrs_aad(self.header, INNER))


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
    """Reader rules of section 11.2 for a whole object whose data keys are known (either version):
    ``(plaintext, attrs or None)``."""
    env = parse_metadata(meta)
    h = env.header
    if not h.size_ok(len(body)):
        raise Integrity("object size differs from the header's body size")
    v = open_version(h, dk_in, dk_out)
    pt = v.plaintext(body)
    attrs = v.open_attrs(env.attrs) if env.attrs is not None else None
    return pt, attrs


def read_range(v: RefVersion, body: bytes, off: int, cnt: int) -> bytes:
    """Plaintext ``[off, off+cnt)`` clipped to the end, decrypting only the chunks it touches
    (dense versions)."""
    h = v.header
    if h.sparse:
        raise RefError("read_range reads dense versions; use RefVersion.plaintext for sparse ones")
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


# ---- version 2: epochs (section 17.4, 17.5) -------------------------------------------------------

def keyring_check(master_key: bytes) -> bytes:
    """The 8-byte key check value of a keyring master key (appendix C, 17.5)."""
    return hmac.new(master_key, CHECK_LABEL, hashlib.sha256).digest()[:8]


def epoch_prefix(key: str, depth: int, *, marker_root: bool = MARKER_MAY_BE_ITS_OWN_PREFIX) -> str:
    """``P`` of 17.4: the object key up to and including its ``depth``-th ``/`` ("" for 0)."""
    if depth == 0:
        p = ""
    else:
        pos = -1
        for _ in range(depth):
            pos = key.find("/", pos + 1)
            if pos < 0:
                raise Integrity(f"dsse-e depth {depth}: the key has fewer slashes")
        p = key[:pos + 1]
    if p == key and not (marker_root and key.endswith("/")):
        raise Integrity("dsse-e: the epoch prefix would be the whole key")
    return p


def record_key(prefix: str, epoch_id: bytes) -> str:
    return prefix + RESERVED_COMPONENT + "/epochs/" + epoch_id.hex()


def epoch_context(layer: int, bucket: str, prefix: str, epoch_hex: str) -> dict[str, str]:
    return {"dssefs:v": "2", "dssefs:layer": LAYER_NAMES[layer], "dssefs:bucket": bucket,
            "dssefs:prefix": prefix, "dssefs:epoch": epoch_hex}


def object_context_v2(layer: int, bucket: str, key: str, epoch_hex: str) -> dict[str, str]:
    return {"dssefs:v": "2", "dssefs:layer": LAYER_NAMES[layer], "dssefs:bucket": bucket,
            "dssefs:key": key, "dssefs:epoch": epoch_hex}


@dataclass(frozen=True)
class RefEpochRecord:
    epoch_id: bytes
    bucket: str
    prefix: str
    provider: str
    created: str
    key_id_inner: str
    key_id_outer: str
    wrapped_inner: bytes
    wrapped_outer: bytes


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise Integrity(f"epoch record: member {k!r} twice")
        out[k] = v
    return out


def _no_constants(name):
    raise Integrity(f"epoch record: {name} is not JSON")


def parse_epoch_record(data: bytes, *, bucket: str, prefix: str, epoch_id: bytes) -> RefEpochRecord:
    """17.4: the record fetched for ``epoch_id`` under ``prefix`` in ``bucket``."""
    if len(data) > MAX_RECORD:
        raise Integrity("epoch record larger than 16 KiB")
    try:
        text = bytes(data).decode("ascii")
        doc = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError):
        raise Integrity("epoch record is not ASCII JSON") from None
    if not isinstance(doc, dict):
        raise Integrity("epoch record is not a JSON object")
    if doc.get("format") != "dssefs-epoch":
        raise Integrity("not an epoch record (format)")
    version = doc.get("version")
    if type(version) is not int:
        raise Integrity("epoch record: version is not an integer")
    if version != 2:
        raise Unsupported(f"epoch record version {version}")
    if set(doc) != RECORD_MEMBERS:
        raise Integrity("epoch record members differ from the specification")
    for name in ("bucket", "created", "epoch", "prefix", "provider"):
        if not isinstance(doc[name], str):
            raise Integrity(f"epoch record: {name} is not a string")
    if not HEX32.fullmatch(doc["epoch"]) or doc["epoch"] != epoch_id.hex():
        raise Integrity("epoch record names another epoch")
    if doc["prefix"] != prefix:
        raise Integrity("epoch record names another prefix")
    if doc["bucket"] != bucket:
        raise Integrity("epoch record names another bucket")
    if doc["provider"] not in ("kms", "local"):
        raise Unsupported(f"epoch record provider {doc['provider']!r}")
    if not CREATED.fullmatch(doc["created"]):
        raise Integrity("epoch record: malformed created")
    id_re = KEYRING_NAME if doc["provider"] == "local" else KEY_ID
    layers = []
    for name in ("inner", "outer"):
        part = doc[name]
        if not isinstance(part, dict) or set(part) != {"key_id", "wrapped"}:
            raise Integrity(f"epoch record: malformed {name}")
        if not isinstance(part["key_id"], str) or not id_re.fullmatch(part["key_id"]):
            raise Integrity(f"epoch record: malformed {name}.key_id")
        blob = b64u_decode(part["wrapped"])
        if not blob:
            raise Integrity(f"epoch record: empty {name}.wrapped")
        layers.append((part["key_id"], blob))
    return RefEpochRecord(epoch_id, bucket, prefix, doc["provider"], doc["created"],
                          layers[0][0], layers[1][0], layers[0][1], layers[1][1])


def unwrap_keyring_v2(master_key: bytes, key_name: str, ctx: dict[str, str], blob: bytes) -> bytes:
    """17.5: the epoch key inside a 69-byte keyring blob."""
    if len(blob) != KEYRING_BLOB_V2_LEN:
        raise WrappedKeyMismatch(f"keyring blob of {len(blob)} bytes, not 69")
    if blob[0] != 0x02:
        raise WrappedKeyMismatch(f"keyring blob version {blob[0]} under a version 2 context")
    check, nonce, sealed = bytes(blob[1:9]), bytes(blob[9:21]), bytes(blob[21:])
    aad = b"\x02" + key_name.encode("ascii") + b"\x00" + canonical_context(ctx)
    try:
        key = AESGCM(master_key).decrypt(nonce, sealed, aad)
    except InvalidTag:
        if not hmac.compare_digest(check, keyring_check(master_key)):
            raise WrongKeyring(f"needs keyring key {key_name!r} with check value {check.hex()}, this "
                               f"keyring's has {keyring_check(master_key).hex()}") from None
        raise WrappedKeyMismatch("keyring blob does not open under its epoch context") from None
    if not hmac.compare_digest(check, keyring_check(master_key)):
        raise WrappedKeyMismatch("keyring blob opens but carries another check value (altered)")
    return key


def dk_wrap_aad(ctx: dict[str, str]) -> bytes:
    return b"\x02" + canonical_context(ctx)


def unwrap_dk_v2(epoch_key: bytes, ctx: dict[str, str], blob: bytes) -> bytes:
    """17.4: the data key inside a 61-byte blob wrapped under an epoch key."""
    if len(blob) != WRAPPED_DK_LEN or blob[0] != 0x02:
        raise Integrity("malformed version 2 wrapped data key")
    try:
        return AESGCM(epoch_key).decrypt(bytes(blob[1:13]), bytes(blob[13:]), dk_wrap_aad(ctx))
    except InvalidTag:
        raise WrappedKeyMismatch("wrapped data key does not open under its epoch key for this object "
                                 "key, layer and epoch") from None


# ---- trust (section 18) and the keyring ------------------------------------------------------------

@dataclass(frozen=True)
class Trust:
    """Per-layer trusted keyring key names (18.1).  ``None`` for both: one name serves both
    layers, so every key of the keyring is trusted for both."""

    inner: frozenset | None = None
    outer: frozenset | None = None

    def __post_init__(self):
        if (self.inner is None) != (self.outer is None):
            raise ValueError("give both layers' trusted names, or neither")
        if self.inner is not None and self.inner & self.outer:
            raise ValueError("split custody: the layers' trusted keys must be disjoint (18.2)")

    def check(self, layer: int, name: str) -> None:
        allowed = None if self.inner is None else (self.inner if layer == INNER else self.outer)
        if allowed is not None and name not in allowed:
            raise Untrusted(f"{LAYER_NAMES[layer]} layer wrapped by {name!r}, not trusted for that layer")


def split_trust(inner: str, outer: str, allowed_inner=(), allowed_outer=()) -> Trust:
    """18.1 with a keyring: the configured names; every key for both layers when one name serves both."""
    if inner == outer:
        return Trust()
    return Trust(frozenset({inner, *allowed_inner}), frozenset({outer, *allowed_outer}))


def _unwrap_master(keyring: dict[str, bytes], trust: Trust, layer: int, name: str, ctx: dict[str, str],
                   blob: bytes, version: int) -> bytes:
    trust.check(layer, name)
    if name not in keyring:
        raise KeyNotInKeyring(f"keyring has no key {name!r}")
    if version == 1:
        try:
            return unwrap_local(keyring[name], name, ctx, blob)
        except Integrity as e:
            raise WrappedKeyMismatch(str(e)) from None
    return unwrap_keyring_v2(keyring[name], name, ctx, blob)


def load_keyring_file(text: str | bytes) -> dict[str, bytes]:
    """Appendix C, unprotected keyrings only: ``{name: master key}`` after checking every entry."""
    doc = json.loads(text)
    if not isinstance(doc, dict) or doc.get("format") != "dssefs-keyring" or doc.get("version") != 1:
        raise RefError("not a dssefs keyring (version 1)")
    if doc.get("protection") != "none" or set(doc) != {"format", "version", "protection", "keys"}:
        raise RefError("only unprotected keyrings are read here")
    keys = doc["keys"]
    if not isinstance(keys, dict) or not keys:
        raise RefError("keyring has no keys")
    out = {}
    for name, entry in keys.items():
        if not KEYRING_NAME.fullmatch(name) or not isinstance(entry, dict) \
                or set(entry) != {"created", "key", "check"} or not isinstance(entry["key"], str):
            raise RefError(f"malformed keyring entry {name!r}")
        key = base64.b64decode(entry["key"], validate=True)
        if len(key) != 32 or keyring_check(key).hex() != entry["check"]:
            raise RefError(f"keyring key {name!r} fails its length or check value")
        out[name] = key
    return out


# ---- the reader (17.8; 11.2 for version 1) ---------------------------------------------------------

@dataclass(frozen=True)
class RefResult:
    plaintext: bytes
    attrs: bytes | None
    header: RefHeader
    envelope: RefEnvelope
    epoch_prefix: str | None = None  # version 2

    @property
    def generation(self) -> int:
        return self.header.generation


def read_with_epoch_keys(meta: dict[str, str], body: bytes, *, key: str, bucket: str,
                         epoch_in: bytes, epoch_out: bytes) -> RefResult:
    """17.8 steps 1, 2, 4 and 5 for a version 2 object whose epoch keys are given."""
    env = parse_metadata(meta)
    if env.version != 2:
        raise Integrity("not a version 2 object")
    if not env.header.size_ok(len(body)):
        raise Integrity("object size differs from the header's body size")
    return _finish_v2(env, body, key, bucket, epoch_in, epoch_out,
                      epoch_prefix(key, env.depth))


def _finish_v2(env: RefEnvelope, body: bytes, key: str, bucket: str, ek_in: bytes, ek_out: bytes,
               prefix: str) -> RefResult:
    eh = env.epoch_id.hex()
    dk_in = unwrap_dk_v2(ek_in, object_context_v2(INNER, bucket, key, eh), env.wrapped_inner)
    dk_out = unwrap_dk_v2(ek_out, object_context_v2(OUTER, bucket, key, eh), env.wrapped_outer)
    if dk_in == dk_out:
        raise Integrity("both layers have the same data key")
    pt, attrs = _decrypt(env, body, dk_in, dk_out)
    return RefResult(pt, attrs, env.header, env, prefix)


def _decrypt(env: RefEnvelope, body: bytes, dk_in: bytes, dk_out: bytes) -> tuple[bytes, bytes | None]:
    h = env.header
    v = open_version(h, dk_in, dk_out)
    pt = v.plaintext(body)
    attrs = v.open_attrs(env.attrs) if env.attrs is not None else None
    return pt, attrs


class RefReader:
    """Reads objects of one bucket (``local`` for a local store) with a keyring, as 17.8 says.

    ``get(key)`` returns ``(metadata, body)`` or ``None`` when there is no such object; epoch
    records are objects too (their metadata is ignored).  Unwrapped epoch keys are cached per
    (prefix, epoch id)."""

    def __init__(self, get, bucket: str, keyring: dict[str, bytes], trust: Trust = Trust(), *,
                 marker_root: bool = MARKER_MAY_BE_ITS_OWN_PREFIX):
        self.get, self.bucket, self.keyring, self.trust = get, bucket, keyring, trust
        self.marker_root = marker_root
        self.epochs: dict[tuple[str, bytes], tuple[bytes, bytes]] = {}
        self.records_fetched = 0

    def epoch_keys(self, prefix: str, epoch_id: bytes) -> tuple[bytes, bytes]:
        k = (prefix, epoch_id)
        if k not in self.epochs:
            rk = record_key(prefix, epoch_id)
            got = self.get(rk)
            self.records_fetched += 1
            if got is None:
                raise Integrity(f"epoch record {rk} is missing: the object cannot be decrypted without "
                                "it; restore it from a backup")
            record = parse_epoch_record(got[1], bucket=self.bucket, prefix=prefix, epoch_id=epoch_id)
            if record.provider != "local":
                raise KeyRefused(f"epoch record {rk} is wrapped by {record.provider}; this reader "
                                 "has a keyring only")
            eh = epoch_id.hex()
            self.epochs[k] = tuple(
                _unwrap_master(self.keyring, self.trust, layer, name,
                               epoch_context(layer, self.bucket, prefix, eh), blob, 2)
                for layer, name, blob in ((INNER, record.key_id_inner, record.wrapped_inner),
                                          (OUTER, record.key_id_outer, record.wrapped_outer)))
        return self.epochs[k]

    def read(self, key: str) -> RefResult:
        got = self.get(key)
        if got is None:
            raise RefError(f"no object {key!r}")
        return self.read_object(key, *got)

    def read_object(self, key: str, meta: dict[str, str], body: bytes) -> RefResult:
        env = parse_metadata(meta)                                     # step 1
        if not env.header.size_ok(len(body)):                          # step 2
            raise Integrity("object size differs from the header's body size")
        if env.version == 1:
            return self._read_v1(key, env, body)
        if RESERVED_COMPONENT in key.split("/"):                        # step 3
            raise Integrity(f"{key!r} has a '.dssefs' component: never a dssefs file")
        prefix = epoch_prefix(key, env.depth, marker_root=self.marker_root)
        ek_in, ek_out = self.epoch_keys(prefix, env.epoch_id)
        return _finish_v2(env, body, key, self.bucket, ek_in, ek_out, prefix)  # steps 4, 5

    def _read_v1(self, key: str, env: RefEnvelope, body: bytes) -> RefResult:
        if env.provider != "local":
            raise KeyRefused("version 1 object wrapped by KMS; this reader has a keyring only")
        dks = [_unwrap_master(self.keyring, self.trust, layer, name,
                              {"dssefs:v": "1", "dssefs:layer": LAYER_NAMES[layer],
                               "dssefs:bucket": self.bucket, "dssefs:key": key}, blob, 1)
               for layer, name, blob in ((INNER, env.key_id_inner, env.wrapped_inner),
                                         (OUTER, env.key_id_outer, env.wrapped_outer))]
        pt, attrs = _decrypt(env, body, *dks)
        return RefResult(pt, attrs, env.header, env)


# ---- the local directory store (appendix A) --------------------------------------------------------

class LocalStoreFiles:
    """``get(key)`` over a local store's object files, read directly (appendix A.1-A.3)."""

    MAGIC = b"DSSEOBJ1"

    def __init__(self, root: str):
        self.root = str(root).rstrip("/") or "/"
        with open(self.root + "/.dssefs-store", "rb") as f:
            marker = json.loads(f.read(4096))
        if not isinstance(marker, dict) or marker.get("format") != "dssefs-local-store" \
                or marker.get("version") != 1:
            raise RefError(f"{self.root} is not a local store")

    def path(self, key: str) -> str:
        segments = key.split("/")
        for s in segments:
            if len(s.encode("utf-8")) > 253:
                raise RefError("segment longer than 253 bytes")
        dirs = "".join(s + ".d/" for s in segments[:-1])
        return f"{self.root}/objects/{dirs}{segments[-1]}.o"

    def get(self, key: str) -> tuple[dict[str, str], bytes] | None:
        try:
            with open(self.path(key), "rb") as f:
                data = f.read()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if data[:8] != self.MAGIC or len(data) < 12:
            raise RefError(f"{key}: not an object file")
        n = struct.unpack(">I", data[8:12])[0]
        if n > 65536:
            raise RefError(f"{key}: object header too long")
        head = json.loads(data[12:12 + n].decode("ascii"))
        if not isinstance(head, dict) or not isinstance(head.get("etag"), str) \
                or type(head.get("size")) is not int or head["size"] < 0 \
                or type(head.get("mtime")) not in (int, float) \
                or not isinstance(head.get("metadata"), dict) \
                or not all(isinstance(k, str) and isinstance(v, str) for k, v in head["metadata"].items()):
            raise RefError(f"{key}: malformed object header")
        if len(data) != 12 + n + head["size"]:
            raise RefError(f"{key}: file length differs from its header")
        return dict(head["metadata"]), data[12 + n:]
