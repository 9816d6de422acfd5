"""The key provider interface: generate, unwrap and re-wrap per-layer data keys.

A wrapped key is opaque bytes.  Every call takes an encryption *context* (``dict[str, str]``) which
the provider binds to the wrapped key (KMS encryption context, or AAD for the local keyring):
unwrapping with any other context fails.  Plaintext data keys are returned as ``bytes`` and must
never be logged, printed or written anywhere.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from enum import Enum

DATA_KEY_BYTES = 32


class Layer(str, Enum):
    INNER = "inner"
    OUTER = "outer"


def context(layer: Layer, bucket: str, key: str) -> dict[str, str]:
    """The encryption context that binds a wrapped data key to one layer of one object."""
    return {
        "dssefs:v": "1",
        "dssefs:layer": layer.value,
        "dssefs:bucket": bucket,
        "dssefs:key": key,
    }


def epoch_context(layer: Layer, bucket: str, prefix: str, epoch_id_hex: str) -> dict[str, str]:
    """The encryption context (format 2) that binds a wrapped epoch key to one layer of one epoch
    of one prefix."""
    return {
        "dssefs:v": "2",
        "dssefs:layer": Layer(layer).value,
        "dssefs:bucket": bucket,
        "dssefs:prefix": prefix,
        "dssefs:epoch": epoch_id_hex,
    }


def object_context_v2(layer: Layer, bucket: str, key: str, epoch_id_hex: str) -> dict[str, str]:
    """The encryption context (format 2) that binds a wrapped key to one layer of one object
    written under epoch ``epoch_id_hex``."""
    return {
        "dssefs:v": "2",
        "dssefs:layer": Layer(layer).value,
        "dssefs:bucket": bucket,
        "dssefs:key": key,
        "dssefs:epoch": epoch_id_hex,
    }


@dataclass(frozen=True)
class WrappedKey:
    blob: bytes  # opaque, provider-specific
    key_id: str  # the master key that wraps it (KMS key ARN, or local keyring key name)


class KeyProvider(abc.ABC):
    #: ``kms`` or ``local``; recorded in object metadata so readers pick the right provider.
    kind: str
    #: Whether two requests at once finish sooner than one after the other (a network service:
    #: the Vault then asks for both layers' keys concurrently).
    parallel_requests: bool = False

    @abc.abstractmethod
    def key_id(self, layer: Layer) -> str:
        """The master key used for new data keys of ``layer``."""

    @abc.abstractmethod
    def generate(self, layer: Layer, ctx: dict[str, str]) -> tuple[bytes, WrappedKey]:
        """A fresh random 32-byte data key and its wrapped form."""

    @abc.abstractmethod
    def unwrap(self, layer: Layer, wrapped: WrappedKey, ctx: dict[str, str]) -> bytes:
        """The 32-byte data key; raises KeyProviderError (or a subclass) on any failure."""

    @abc.abstractmethod
    def rewrap(self, layer: Layer, wrapped: WrappedKey, old_ctx: dict[str, str],
               new_ctx: dict[str, str], new_key_id: str | None = None) -> WrappedKey:
        """Re-wrap under ``new_ctx`` and optionally another master key, without exposing the key
        where the provider allows it (KMS ReEncrypt)."""

    @property
    def split_custody(self) -> bool:
        """Whether the two layers use different master keys, each trusted for its own layer only
        (a key trusted for one layer is refused for the other)."""
        return self.key_id(Layer.INNER) != self.key_id(Layer.OUTER)

    def trusted_description(self, layer: Layer) -> str:
        """Short text naming the master keys accepted for ``layer`` on read (no secrets), for
        messages and help output."""
        which = f"{Layer(layer).value} layer only" if self.split_custody else "both layers"
        return f"{self.key_id(layer)} ({which})"

    @property
    def stats(self) -> dict[str, int]:
        """Counts of calls made so far (generate, unwrap, rewrap, describe, errors); no secrets."""
        return {}

    def close(self) -> None:  # pragma: no cover - optional
        pass
