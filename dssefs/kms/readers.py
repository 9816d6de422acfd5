"""Key providers for readers that were given no key to write with.

A reading command (or a mount reading an object of another provider kind) picks the provider from
what the object (or its epoch record) names, never from which files happen to exist:

* :class:`UntrustedKms` stands for AWS KMS when no KMS key is trusted at all: it refuses every
  unwrap with one line naming the key the object needs and how to trust it.
* :class:`KeyringSet` reads with any of several trusted keyrings: the one that holds the key name
  the object names (and, for version 2 blobs, the key with the blob's check value).
"""

from __future__ import annotations

from typing import Callable, Sequence

from ..errors import ConfigError, KeyAccessDenied, KeyNotFound, KeyProviderError
from ._common import Stats, WrongKeyring, describe_context, one_line
from .base import KeyProvider, Layer, WrappedKey
from .local import LocalKeyringProvider


class UntrustedKms(KeyProvider):
    """AWS KMS with an empty trusted set: nothing is unwrapped, every refusal says how to trust."""

    kind = "kms"

    def __init__(self, hint: Callable[[Layer, str], str]):
        self._hint = hint
        self._stats = Stats()

    @property
    def stats(self) -> dict[str, int]:
        return self._stats.snapshot()

    def key_id(self, layer: Layer) -> str:
        raise ConfigError("no KMS key is configured: pass --kms-key-id")

    def generate(self, layer: Layer, ctx: dict[str, str]):
        raise ConfigError("no KMS key is configured for writing: pass --kms-key-id, or set "
                          "kms_key_id in the configuration")

    def unwrap(self, layer: Layer, wrapped: WrappedKey, ctx: dict[str, str]) -> bytes:
        layer = Layer(layer)
        key = one_line(str(wrapped.key_id), 300)
        raise KeyAccessDenied(f"the {layer.value} layer of {describe_context(ctx)} is wrapped by KMS "
                              f"key {key}, which no configuration trusts: {self._hint(layer, key)}")

    def rewrap(self, layer, wrapped, old_ctx, new_ctx, new_key_id=None) -> WrappedKey:
        return self.unwrap(layer, wrapped, old_ctx)  # raises

    def trusted_description(self, layer: Layer) -> str:
        return "no KMS key"

    def __repr__(self) -> str:
        return "UntrustedKms()"


class KeyringSet(KeyProvider):
    """Several trusted keyrings, for reading only; every key of each is trusted for both layers."""

    kind = "local"

    def __init__(self, providers: Sequence[LocalKeyringProvider]):
        if not providers:
            raise ValueError("at least one keyring")
        self._providers = list(providers)

    @property
    def paths(self) -> list[str]:
        return [p.keyring.path for p in self._providers]

    @property
    def stats(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self._providers:
            for k, v in p.stats.items():
                out[k] = out.get(k, 0) + v
        return out

    def key_id(self, layer: Layer) -> str:
        return self._providers[0].key_id(layer)

    def generate(self, layer: Layer, ctx: dict[str, str]):
        raise ConfigError("reading keyrings are not used for writing: pass --keyring PATH")

    def _holding(self, name: str) -> list[LocalKeyringProvider]:
        return [p for p in self._providers if name in p.keyring]

    def unwrap(self, layer: Layer, wrapped: WrappedKey, ctx: dict[str, str]) -> bytes:
        layer = Layer(layer)
        holders = self._holding(wrapped.key_id)
        if not holders:
            raise KeyNotFound(f"the {layer.value} layer of {describe_context(ctx)} needs keyring key "
                              f"{one_line(repr(wrapped.key_id), 80)}, which none of the trusted "
                              f"keyrings holds ({', '.join(self.paths)}): pass --keyring PATH of "
                              "the keyring that wrote it, or add it to 'keyrings' in the "
                              "configuration (dssefs config show lists them)")
        last: KeyProviderError | None = None
        for p in holders:
            try:
                return p.unwrap(layer, wrapped, ctx)
            except WrongKeyring as e:  # same name, another key: try the next keyring
                last = e
        assert last is not None
        raise last

    def rewrap(self, layer, wrapped, old_ctx, new_ctx, new_key_id=None) -> WrappedKey:
        raise ConfigError("re-keying needs the destination keyring: pass --keyring PATH")

    def trusted_description(self, layer: Layer) -> str:
        return "every key of keyrings " + ", ".join(self.paths) + " (both layers)"

    def __repr__(self) -> str:
        return f"KeyringSet({self.paths!r})"

    def __reduce__(self):
        raise TypeError("KeyringSet holds master keys and cannot be pickled")
