"""Version 2 epoch records: the two KMS- (or keyring-) wrapped epoch keys of one epoch.

An epoch record is a small JSON object stored at ``P + ".dssefs/epochs/" + hex(epoch_id)``, where
``P`` is the epoch's prefix (empty, or ending with ``/``).  It holds nothing secret: each epoch key
is wrapped by its layer's master key with an encryption context that binds the bucket, the
prefix, the layer and the epoch id (docs/format.md 10.2).  Encoding and strict parsing only; no
I/O.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from ..errors import IntegrityError, UnsupportedFormat
from .format import EPOCH_ID_BYTES
from .metadata import MAX_WRAPPED_BYTES, PROVIDERS, b64decode, b64encode

RESERVED_NAME = ".dssefs"
EPOCH_DIR = RESERVED_NAME + "/epochs/"
RECORD_FORMAT = "dssefs-epoch"
RECORD_VERSION = 2
MAX_RECORD_BYTES = 16 * 1024
_KEY_ID_RE = re.compile(r"^[A-Za-z0-9:/_.+=@-]{1,256}$")
_CREATED_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$")
_LOCAL_KEY_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_FIELDS = {"format", "version", "epoch", "bucket", "prefix", "provider", "inner", "outer", "created"}


def _unique_members(pairs: list) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"member {k!r} appears twice")
        out[k] = v
    return out


def record_key(prefix: str, epoch_id: bytes) -> str:
    """Where the record of ``epoch_id`` under ``prefix`` is stored."""
    check_prefix(prefix)
    return prefix + EPOCH_DIR + epoch_id.hex()


def record_epoch_id(name: str) -> bytes | None:
    """The epoch id whose record is stored under ``name`` (the part of a key after
    ``EPOCH_DIR``), or None if ``name`` is not one that :func:`record_key` makes."""
    if len(name) != 2 * EPOCH_ID_BYTES or name.strip("0123456789abcdef"):
        return None
    return bytes.fromhex(name)


def check_prefix(prefix: str) -> str:
    if prefix and not prefix.endswith("/"):
        raise ValueError(f"an epoch prefix is empty or ends with '/': {prefix!r}")
    return prefix


def is_reserved_key(key: str) -> bool:
    """Whether ``key`` lies in a ``.dssefs/`` area (epoch records and other dssefs-internal
    objects), which is never a file: the name ``.dssefs`` is reserved in every directory."""
    return RESERVED_NAME in key.split("/")


@dataclass(frozen=True)
class EpochRecord:
    epoch_id: bytes
    bucket: str
    prefix: str
    provider: str
    key_id_inner: str
    key_id_outer: str
    wrapped_inner: bytes
    wrapped_outer: bytes
    created: str

    def __post_init__(self) -> None:
        if len(self.epoch_id) != EPOCH_ID_BYTES:
            raise ValueError("epoch ids are 16 bytes")
        check_prefix(self.prefix)

    @property
    def hex(self) -> str:
        return self.epoch_id.hex()

    def encode(self) -> bytes:
        doc = {
            "format": RECORD_FORMAT, "version": RECORD_VERSION, "epoch": self.epoch_id.hex(),
            "bucket": self.bucket, "prefix": self.prefix, "provider": self.provider,
            "inner": {"key_id": self.key_id_inner, "wrapped": b64encode(self.wrapped_inner)},
            "outer": {"key_id": self.key_id_outer, "wrapped": b64encode(self.wrapped_outer)},
            "created": self.created,
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")

    @classmethod
    def parse(cls, data: bytes, *, bucket: str, prefix: str, epoch_id: bytes) -> "EpochRecord":
        """Parse a record fetched for ``epoch_id`` under ``prefix`` in ``bucket``; anything
        malformed or naming another epoch, prefix or bucket is an IntegrityError."""
        where = f"epoch record {prefix}{EPOCH_DIR}{epoch_id.hex()}"
        if len(data) > MAX_RECORD_BYTES:
            raise IntegrityError(f"{where} is {len(data)} bytes: not an epoch record")
        try:
            doc = json.loads(bytes(data).decode("ascii"), object_pairs_hook=_unique_members)
        except (UnicodeDecodeError, ValueError):
            raise IntegrityError(f"{where} is not ASCII JSON with unique members") from None
        if not isinstance(doc, dict) or doc.get("format") != RECORD_FORMAT:
            raise IntegrityError(f"{where} is not an epoch record")
        if type(doc.get("version")) is not int:
            raise IntegrityError(f"{where}: version is not a whole number")
        if doc.get("version") != RECORD_VERSION:
            raise UnsupportedFormat(f"{where} has version {doc.get('version')!r}: upgrade dssefs")
        if set(doc) != _FIELDS:
            raise IntegrityError(f"{where} has fields {sorted(set(doc) ^ _FIELDS)} it should not "
                                 "have or lacks")
        for name in ("epoch", "bucket", "prefix", "provider", "created"):
            if not isinstance(doc[name], str):
                raise IntegrityError(f"{where}: {name} is not a string")
        if doc["epoch"] != epoch_id.hex():
            raise IntegrityError(f"{where} names epoch {doc['epoch'][:40]!r}")
        if doc["prefix"] != prefix or doc["bucket"] != bucket:
            raise IntegrityError(f"{where} was made for another bucket or prefix")
        if doc["provider"] not in PROVIDERS:
            raise UnsupportedFormat(f"{where}: unknown key provider {doc['provider'][:40]!r}")
        if not _CREATED_RE.fullmatch(doc["created"]):
            raise IntegrityError(f"{where}: malformed creation time")
        layers = []
        for name in ("inner", "outer"):
            part = doc[name]
            if not isinstance(part, dict) or set(part) != {"key_id", "wrapped"} \
                    or not isinstance(part["key_id"], str) or not _KEY_ID_RE.fullmatch(part["key_id"]):
                raise IntegrityError(f"{where}: malformed {name} layer")
            blob = b64decode(part["wrapped"], f"{where} {name}.wrapped")
            if not 1 <= len(blob) <= MAX_WRAPPED_BYTES:
                raise IntegrityError(f"{where}: wrapped {name} epoch key of {len(blob)} bytes")
            if doc["provider"] == "local" and not _LOCAL_KEY_ID_RE.fullmatch(part["key_id"]):
                raise IntegrityError(f"{where}: {name} key id is not a keyring key name")
            layers.append((part["key_id"], blob))
        return cls(epoch_id=epoch_id, bucket=bucket, prefix=prefix, provider=doc["provider"],
                   key_id_inner=layers[0][0], key_id_outer=layers[1][0],
                   wrapped_inner=layers[0][1], wrapped_outer=layers[1][1], created=doc["created"])
