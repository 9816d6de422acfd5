"""Encoding of the envelope into S3 user metadata (ASCII only, lowercase keys, strict parsing).

Keys (shown without S3's ``x-amz-meta-`` prefix):

``dsse-h``   base64url(header), 178 characters; its first byte is the format version
``dsse-ki``  base64url(wrapped inner data key)
``dsse-ko``  base64url(wrapped outer data key)
``dsse-w``   version 1 only: wrapping descriptor ``<provider>;<inner key id>;<outer key id>``
``dsse-e``   version 2 only: epoch reference ``<epoch id, 32 hex digits>;<prefix depth>``
``dsse-a``   base64url(sealed attribute blob) written by the file system layer; optional in
             version 1, present exactly when the header's FLAG_ATTRS is set in version 2
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass

from ..errors import IntegrityError, MetadataBudgetError, NotDssefsObject, UnsupportedFormat
from . import format as fmt
from .format import Header

PREFIX = "dsse-"
KEY_HEADER = "dsse-h"
KEY_WRAPPED_INNER = "dsse-ki"
KEY_WRAPPED_OUTER = "dsse-ko"
KEY_WRAPPING = "dsse-w"
KEY_ATTRS = "dsse-a"
KEY_EPOCH = "dsse-e"
REQUIRED = (KEY_HEADER, KEY_WRAPPED_INNER, KEY_WRAPPED_OUTER, KEY_WRAPPING)  # version 1
REQUIRED_V2 = (KEY_HEADER, KEY_WRAPPED_INNER, KEY_WRAPPED_OUTER, KEY_EPOCH)
KNOWN = frozenset(REQUIRED + (KEY_ATTRS,))
KNOWN_V2 = frozenset(REQUIRED_V2 + (KEY_ATTRS,))
_EPOCH_RE = re.compile(r"^([0-9a-f]{32});(0|[1-9][0-9]{0,3})$")

METADATA_LIMIT = 2048  # S3: user metadata keys + values, UTF-8 bytes
PROVIDERS = frozenset({"kms", "local"})
MAX_WRAPPED_BYTES = 1024
MIN_ATTRS_BYTES = 12 + 2 * 16  # nonce + inner tag + outer tag
_KEY_ID_RE = re.compile(r"^[A-Za-z0-9:/_.+=@-]{1,256}$")
_B64_RE = re.compile(r"^[A-Za-z0-9_-]*$")


def b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64decode(text: str, what: str) -> bytes:
    """Strict, canonical unpadded base64url: anything else is an integrity error."""
    if not isinstance(text, str) or not _B64_RE.fullmatch(text) or len(text) % 4 == 1:
        raise IntegrityError(f"{what}: not canonical unpadded base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64encode(data) != text:
        raise IntegrityError(f"{what}: not canonical unpadded base64url")
    return data


@dataclass(frozen=True)
class EpochRef:
    """Version 2: which epoch's keys wrap this object's data keys, and where its record lives.

    ``depth`` says how much of the object key is the epoch's prefix ``P``: the key up to and
    including its ``depth``-th ``/`` (``""`` for 0).  The record is the object
    ``P + ".dssefs/epochs/" + hex(epoch_id)``."""

    epoch_id: bytes
    depth: int

    @property
    def hex(self) -> str:
        return self.epoch_id.hex()

    def prefix_of(self, key: str) -> str:
        """The epoch prefix of object ``key``; IntegrityError if the key is not that deep."""
        if self.depth == 0:
            return ""
        pos = -1
        for _ in range(self.depth):
            pos = key.find("/", pos + 1)
            if pos < 0:
                raise IntegrityError(f"metadata {KEY_EPOCH}: prefix depth {self.depth} is deeper "
                                     "than the object's name")
        return key[:pos + 1]

    def encode(self) -> str:
        return f"{self.epoch_id.hex()};{self.depth}"

    @staticmethod
    def depth_of(prefix: str) -> int:
        return prefix.count("/")


@dataclass(frozen=True)
class Envelope:
    """The parsed, validated envelope of one object version (no secrets in here).

    Version 1 names its key provider and master keys (``provider``, ``key_id_*``); version 2
    names an epoch (``epoch``), whose record names them, and leaves those fields empty."""

    header: Header
    provider: str
    key_id_inner: str
    key_id_outer: str
    wrapped_inner: bytes
    wrapped_outer: bytes
    attrs: bytes | None = None  # sealed blob; open with ObjectCipher.open_attrs
    epoch: EpochRef | None = None  # version 2 only

    @property
    def version(self) -> int:
        return self.header.version

    def to_metadata(self) -> dict[str, str]:
        if self.header.version == fmt.FORMAT_V2:
            return self._to_metadata_v2()
        for kid in (self.key_id_inner, self.key_id_outer):
            if not _KEY_ID_RE.fullmatch(kid):
                raise ValueError(f"key id {kid!r} has characters metadata cannot carry")
        if self.provider not in PROVIDERS:
            raise ValueError(f"unknown provider {self.provider!r}")
        meta = {
            KEY_HEADER: b64encode(self.header.pack()),
            KEY_WRAPPED_INNER: b64encode(self.wrapped_inner),
            KEY_WRAPPED_OUTER: b64encode(self.wrapped_outer),
            KEY_WRAPPING: f"{self.provider};{self.key_id_inner};{self.key_id_outer}",
        }
        return self._finish(meta)

    def _to_metadata_v2(self) -> dict[str, str]:
        if self.epoch is None:
            raise ValueError("a version 2 envelope needs an epoch reference")
        if (self.attrs is not None) != self.header.has_attrs:
            raise ValueError("the header's attribute flag and the attribute blob disagree")
        for blob in (self.wrapped_inner, self.wrapped_outer):
            if len(blob) != fmt.WRAPPED_DK_BYTES:
                raise ValueError("version 2 wrapped data keys are 61 bytes")
        meta = {
            KEY_HEADER: b64encode(self.header.pack()),
            KEY_WRAPPED_INNER: b64encode(self.wrapped_inner),
            KEY_WRAPPED_OUTER: b64encode(self.wrapped_outer),
            KEY_EPOCH: self.epoch.encode(),
        }
        return self._finish(meta)

    def _finish(self, meta: dict[str, str]) -> dict[str, str]:
        if self.attrs is not None:
            meta[KEY_ATTRS] = b64encode(self.attrs)
        check_budget(meta)
        return meta


def metadata_size(meta: dict[str, str]) -> int:
    return sum(len(k.encode("utf-8")) + len(v.encode("utf-8")) for k, v in meta.items())


def check_budget(meta: dict[str, str]) -> None:
    size = metadata_size(meta)
    if size > METADATA_LIMIT:
        raise MetadataBudgetError(f"object metadata would be {size} bytes; S3 allows {METADATA_LIMIT}")


def is_dssefs(meta: dict[str, str]) -> bool:
    return any(k.lower().startswith(PREFIX) for k in meta)


def parse(meta: dict[str, str]) -> Envelope:
    """Validate and parse user metadata.  Raises NotDssefsObject when no ``dsse-*`` key is present
    and IntegrityError (or UnsupportedFormat) on anything malformed."""
    ours = {k: v for k, v in meta.items() if k.lower().startswith(PREFIX)}
    if not ours:
        raise NotDssefsObject("not a dssefs object (no dsse-* metadata)")
    for k, v in ours.items():
        if k not in KNOWN | KNOWN_V2:
            raise IntegrityError(f"unexpected metadata key {k!r}")
        if not isinstance(v, str) or not v.isascii():
            raise IntegrityError(f"metadata {k}: value is not ASCII (re-encoded by a proxy?)")
    if KEY_HEADER not in ours:
        raise IntegrityError(f"metadata incomplete: missing {KEY_HEADER}")
    header = Header.unpack(b64decode(ours[KEY_HEADER], KEY_HEADER))
    if header.version == fmt.FORMAT_V2:
        return _parse_v2(ours, header)
    for k in ours:
        if k not in KNOWN:
            raise IntegrityError(f"unexpected metadata key {k!r} in a version 1 object")
    missing = [k for k in REQUIRED if k not in ours]
    if missing:
        raise IntegrityError(f"metadata incomplete: missing {', '.join(missing)}")
    parts = ours[KEY_WRAPPING].split(";")
    if len(parts) != 3:
        raise IntegrityError(f"metadata {KEY_WRAPPING}: expected provider;inner-key;outer-key")
    provider, kid_in, kid_out = parts
    if provider not in PROVIDERS:
        raise UnsupportedFormat(f"unknown key provider {provider!r} in {KEY_WRAPPING}")
    for kid in (kid_in, kid_out):
        if not _KEY_ID_RE.fullmatch(kid):
            raise IntegrityError(f"metadata {KEY_WRAPPING}: malformed key id")
    w_in = b64decode(ours[KEY_WRAPPED_INNER], KEY_WRAPPED_INNER)
    w_out = b64decode(ours[KEY_WRAPPED_OUTER], KEY_WRAPPED_OUTER)
    for name, blob in ((KEY_WRAPPED_INNER, w_in), (KEY_WRAPPED_OUTER, w_out)):
        if not 1 <= len(blob) <= MAX_WRAPPED_BYTES:
            raise IntegrityError(f"metadata {name}: wrapped key of {len(blob)} bytes")
    attrs = b64decode(ours[KEY_ATTRS], KEY_ATTRS) if KEY_ATTRS in ours else None
    if attrs is not None and len(attrs) < MIN_ATTRS_BYTES:
        raise IntegrityError(f"metadata {KEY_ATTRS}: attribute blob of {len(attrs)} bytes is too short")
    return Envelope(header=header, provider=provider, key_id_inner=kid_in, key_id_outer=kid_out,
                    wrapped_inner=w_in, wrapped_outer=w_out, attrs=attrs)


def _parse_v2(ours: dict[str, str], header: Header) -> Envelope:
    for k in ours:
        if k not in KNOWN_V2:
            raise IntegrityError(f"unexpected metadata key {k!r} in a version 2 object")
    missing = [k for k in REQUIRED_V2 if k not in ours]
    if missing:
        raise IntegrityError(f"metadata incomplete: missing {', '.join(missing)}")
    m = _EPOCH_RE.fullmatch(ours[KEY_EPOCH])
    if m is None:
        raise IntegrityError(f"metadata {KEY_EPOCH}: expected <32 hex digits>;<depth>")
    epoch = EpochRef(bytes.fromhex(m.group(1)), int(m.group(2)))
    w_in = b64decode(ours[KEY_WRAPPED_INNER], KEY_WRAPPED_INNER)
    w_out = b64decode(ours[KEY_WRAPPED_OUTER], KEY_WRAPPED_OUTER)
    for name, blob in ((KEY_WRAPPED_INNER, w_in), (KEY_WRAPPED_OUTER, w_out)):
        if len(blob) != fmt.WRAPPED_DK_BYTES:
            raise IntegrityError(f"metadata {name}: wrapped key of {len(blob)} bytes, expected "
                                 f"{fmt.WRAPPED_DK_BYTES}")
        if blob[0] != fmt.DK_WRAP_VERSION:
            raise UnsupportedFormat(f"metadata {name}: unknown key wrapping version {blob[0]}")
    attrs = b64decode(ours[KEY_ATTRS], KEY_ATTRS) if KEY_ATTRS in ours else None
    if attrs is not None and len(attrs) < MIN_ATTRS_BYTES:
        raise IntegrityError(f"metadata {KEY_ATTRS}: attribute blob of {len(attrs)} bytes is too short")
    if header.has_attrs and attrs is None:
        raise IntegrityError(f"metadata {KEY_ATTRS} is missing but the header says the version has "
                             "attributes (removed by someone?)")
    if attrs is not None and not header.has_attrs:
        raise IntegrityError(f"metadata {KEY_ATTRS} is present but the header says the version has "
                             "no attributes (added by someone?)")
    return Envelope(header=header, provider="", key_id_inner="", key_id_outer="",
                    wrapped_inner=w_in, wrapped_outer=w_out, attrs=attrs, epoch=epoch)
