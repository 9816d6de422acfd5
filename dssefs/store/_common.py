"""Argument checks shared by every store, so S3 and a local directory accept exactly the same input.

* Keys: non-empty ``str`` that encodes to valid UTF-8, at most 1024 bytes (S3's limit), no NUL.
* User metadata: keys are lowercased (S3 does the same on the wire), must be HTTP header token
  characters, and may not collide after lowercasing; values are printable ASCII without leading or
  trailing blanks (S3 would strip them silently, and CR/LF would be header injection).  Keys plus
  values may not exceed :data:`~dssefs.store.base.METADATA_LIMIT` UTF-8 bytes
  (:class:`~dssefs.errors.MetadataBudgetError`, as S3 answers ``MetadataTooLarge``).
* Conditions: ``if_match`` and ``if_none_match`` are mutually exclusive.
"""

from __future__ import annotations

import errno as _errno
import re
from typing import Mapping

from ..errors import MetadataBudgetError, StoreError
from .base import METADATA_LIMIT

#: S3's maximum key length in UTF-8 bytes.
MAX_KEY_BYTES = 1024
#: S3's part-number range for multipart uploads.
MAX_PARTS = 10_000

_TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9a-z-]+$")
_VALUE_RE = re.compile(r"^(?:[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?)?$")


def check_key(key: str) -> str:
    """Validate an object key; raises StoreError (``EINVAL`` / ``ENAMETOOLONG``)."""
    if not isinstance(key, str):
        raise TypeError(f"object key must be str, not {type(key).__name__}")
    if not key:
        raise StoreError("empty object key", errno=_errno.EINVAL)
    if "\x00" in key:
        raise StoreError("object key contains a NUL character", errno=_errno.EINVAL)
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise StoreError("object key is not valid UTF-8: rename the file", errno=_errno.EINVAL) from None
    if size > MAX_KEY_BYTES:
        raise StoreError(f"object key is {size} bytes; S3 allows {MAX_KEY_BYTES}: shorten the path",
                         errno=_errno.ENAMETOOLONG)
    return key


def metadata_size(metadata: Mapping[str, str]) -> int:
    """S3's count: UTF-8 bytes of keys (without ``x-amz-meta-``) plus values."""
    return sum(len(k.encode("utf-8")) + len(v.encode("utf-8")) for k, v in metadata.items())


def normalize_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """Lowercase the keys and validate; returns a new dict.

    Raises MetadataBudgetError when over budget and ValueError for characters S3 cannot carry
    unchanged (a caller bug, not a user error).
    """
    out: dict[str, str] = {}
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError("metadata keys and values must be str")
        lk = k.lower()
        if not _TOKEN_RE.match(lk):
            raise ValueError(f"metadata key {k!r} is not a valid HTTP header name")
        if not _VALUE_RE.match(v):
            raise ValueError(f"metadata {lk}: value must be printable ASCII without leading or "
                             "trailing blanks")
        if lk in out:
            raise ValueError(f"metadata key {k!r} collides with another key once lowercased")
        out[lk] = v
    size = metadata_size(out)
    if size > METADATA_LIMIT:
        raise MetadataBudgetError(f"object metadata would be {size} bytes; S3 allows {METADATA_LIMIT}")
    return out


def check_conditions(if_match: str | None, if_none_match: bool) -> None:
    if if_match is not None:
        if not isinstance(if_match, str) or not if_match:
            raise ValueError("if_match must be a non-empty ETag string")
        if if_none_match:
            raise ValueError("if_match and if_none_match are mutually exclusive")


def check_range(start: int, length: int) -> None:
    if start < 0 or length < 0:
        raise ValueError(f"invalid byte range start={start} length={length}")


def check_part_number(number: int) -> None:
    if not isinstance(number, int) or not 1 <= number <= MAX_PARTS:
        raise ValueError(f"part number must be 1..{MAX_PARTS}, not {number!r}")


def check_parts(sizes: Mapping[int, int], min_part_size: int) -> list[int]:
    """Part numbers in order; raises StoreError unless they are 1..N and all but the last are at
    least ``min_part_size`` (S3's ``InvalidPartOrder`` / ``EntityTooSmall``)."""
    numbers = sorted(sizes)
    if not numbers:
        raise StoreError("multipart upload has no parts", errno=_errno.EINVAL)
    if numbers != list(range(1, len(numbers) + 1)):
        missing = sorted(set(range(1, numbers[-1] + 1)) - set(numbers))
        raise StoreError(f"multipart upload is missing part(s) {missing[:5]}", errno=_errno.EINVAL)
    for n in numbers[:-1]:
        if sizes[n] < min_part_size:
            raise StoreError(f"part {n} is {sizes[n]} bytes; every part but the last must be at "
                             f"least {min_part_size}", errno=_errno.EINVAL)
    return numbers


def strip_etag(etag: str) -> str:
    """ETag without surrounding quotes or weak prefix, for comparisons."""
    etag = etag.strip()
    if etag.startswith("W/"):
        etag = etag[2:]
    if len(etag) >= 2 and etag[0] == etag[-1] == '"':
        etag = etag[1:-1]
    return etag


def one_line(text: object, limit: int = 200) -> str:
    """Collapse whitespace so a server-supplied message cannot break the one-line rule."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."
