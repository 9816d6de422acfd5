"""Pieces shared by the key providers: the wrapped-key errors, context checks, counters."""

from __future__ import annotations

import json
import re
import threading
from typing import Mapping

from ..errors import KeyAccessDenied, KeyNotFound
from .base import Layer

#: Key ids that may be written into object metadata (``dsse-w``); both providers enforce it.
METADATA_KEY_ID_RE = re.compile(r"^[A-Za-z0-9:/_.+=@-]{1,256}$")

#: Operations counted in ``provider.stats``.
STAT_NAMES = ("generate", "unwrap", "rewrap", "describe", "errors")


class WrappedKeyMismatch(KeyAccessDenied):
    """A wrapped data key does not open under the encryption context (or master key) given.

    Raised by both providers when the wrapped key was made for another object, another layer or
    another master key, or was altered: KMS answers ``InvalidCiphertextException`` /
    ``IncorrectKeyException``; the local keyring's AES-GCM tag check fails.  The two causes
    cannot be told apart (that is the point of binding the context), so callers get one error.
    It is a :class:`~dssefs.errors.KeyAccessDenied` (errno ``EACCES``): the reader is refused the
    key.
    """


class WrongKeyring(KeyNotFound):
    """A wrapped key names a keyring key that this keyring has, but with other key bytes.

    Raised by the local keyring for wrapping format 2, whose blobs carry the key check value of
    the master key that wrapped them: the check value differs, so the key was wrapped by another
    keyring's key of the same name (e.g. two hosts that each created their own default keyring).
    Tampering with a blob whose check value matches raises :class:`WrappedKeyMismatch` instead.
    It is a :class:`~dssefs.errors.KeyNotFound` (errno ``EACCES``): the key needed is not here.
    """


def layer_value(layer: Layer | str) -> str:
    return Layer(layer).value


def check_context(ctx: Mapping[str, str]) -> dict[str, str]:
    """A defensive copy of ``ctx`` after checking it is a non-empty ``str -> str`` mapping."""
    if not isinstance(ctx, Mapping) or not ctx:
        raise TypeError("encryption context must be a non-empty dict[str, str]")
    out: dict[str, str] = {}
    for k, v in ctx.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError("encryption context must be a non-empty dict[str, str]")
        out[k] = v
    return out


def canonical_context(ctx: Mapping[str, str]) -> bytes:
    """Canonical, ASCII-only JSON of a context: sorted keys, no spaces, non-ASCII escaped."""
    return json.dumps(dict(ctx), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True).encode("ascii")


_HEX_RE = re.compile(r"^[0-9a-fA-F]+$")


def describe_context(ctx: Mapping[str, str]) -> str:
    """Where a context points, for messages: ``'bucket/key'`` for an object, ``'bucket/prefix'
    (epoch 0123abcd)`` for an epoch key (object keys, prefixes and epoch ids are not secret)."""
    bucket = ctx.get("dssefs:bucket")
    key = ctx.get("dssefs:key")
    if bucket is not None and key is not None:
        return one_line(f"'{bucket}/{key}'", 300)
    prefix = ctx.get("dssefs:prefix")
    epoch = ctx.get("dssefs:epoch")
    if bucket is not None and prefix is not None and epoch is not None:
        shown = epoch[:8] if _HEX_RE.fullmatch(epoch[:8] or "-") else one_line(repr(epoch), 20)
        return one_line(f"'{bucket}/{prefix}'", 280) + f" (epoch {shown})"
    return "this object"


def key_noun(ctx: Mapping[str, str]) -> str:
    """What a wrapped key of this context is, for messages: ``epoch key`` or ``data key``."""
    if "dssefs:epoch" in ctx and "dssefs:prefix" in ctx and "dssefs:key" not in ctx:
        return "epoch key"
    return "data key"


def one_line(text: str, limit: int = 200) -> str:
    """Collapse whitespace and shorten, so foreign text cannot break a one-line message."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Stats:
    """Thread-safe call counters, read as a plain dict through ``provider.stats``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(STAT_NAMES, 0)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] = self._counts.get(name, 0) + n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)
