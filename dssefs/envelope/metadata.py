"""Encoding of the envelope into S3 user metadata (ASCII only, lowercase keys, strict parsing).

Keys (shown without S3's ``x-amz-meta-`` prefix):

``dsse-h``   base64url(header), 178 characters
``dsse-ki``  base64url(wrapped inner data key)
``dsse-ko``  base64url(wrapped outer data key)
``dsse-w``   wrapping descriptor ``<provider>;<inner key id>;<outer key id>``
``dsse-a``   optional base64url(sealed attribute blob) written by the file system layer
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass

from ..errors import IntegrityError, MetadataBudgetError, NotDssefsObject, UnsupportedFormat
from .format import Header

PREFIX = "dsse-"
KEY_HEADER = "dsse-h"
KEY_WRAPPED_INNER = "dsse-ki"
KEY_WRAPPED_OUTER = "dsse-ko"
KEY_WRAPPING = "dsse-w"
KEY_ATTRS = "dsse-a"
REQUIRED = (KEY_HEADER, KEY_WRAPPED_INNER, KEY_WRAPPED_OUTER, KEY_WRAPPING)
KNOWN = frozenset(REQUIRED + (KEY_ATTRS,))

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
class Envelope:
    """The parsed, validated envelope of one object version (no secrets in here)."""

    header: Header
    provider: str
    key_id_inner: str
    key_id_outer: str
    wrapped_inner: bytes
    wrapped_outer: bytes
    attrs: bytes | None = None  # sealed blob; open with ObjectCipher.open_attrs

    def to_metadata(self) -> dict[str, str]:
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
        if k not in KNOWN:
            raise IntegrityError(f"unexpected metadata key {k!r}")
        if not isinstance(v, str) or not v.isascii():
            raise IntegrityError(f"metadata {k}: value is not ASCII (re-encoded by a proxy?)")
    missing = [k for k in REQUIRED if k not in ours]
    if missing:
        raise IntegrityError(f"metadata incomplete: missing {', '.join(missing)}")
    header = Header.unpack(b64decode(ours[KEY_HEADER], KEY_HEADER))
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
