"""Turning one validated :class:`~dssefs.config.Settings` into a store, a key provider and a Vault.

Shared by the object commands and the mount daemon, so both pick keys and stores by the same rules:

* ``--keyring PATH`` selects the local keyring; ``--kms-key-id`` / ``--kms-key-id-outer`` then name
  keys inside it.
* otherwise ``--kms-key-id`` selects AWS KMS (boto3's credential chain and endpoint variables);
  ``--kms-allowed-key-ids`` / ``--kms-allowed-key-ids-outer`` add keys trusted on read, per layer
  under split custody (``--kms-key-id-outer``).
* neither: the embedded default keyring ``$XDG_CONFIG_HOME/dssefs/keyring``, created on first use
  when the caller writes (``create_default=True``).

That is the *writing* key.  Reading picks the provider from what each object names
(:class:`ReadingKeys`): AWS KMS trusting the configured keys per layer (``kms_key_id`` /
``kms_key_id_outer`` and ``kms_allowed_key_ids`` / ``kms_allowed_key_ids_outer``, usually set once
in ``~/.config/dssefs/config.toml``), or the trusted keyrings (``--keyring``, else ``keyrings`` and
the default keyring when it exists).  Reading never depends on which writing key a command has.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

from . import config, kms, store
from .config import Settings
from .errors import ConfigError
from .objects import Vault
from .objects.vault import DEFAULT_SINGLE_PUT_BUDGET


def xdg_dir(var: str, fallback: str) -> str:
    """``$VAR/dssefs``, or ``$HOME/FALLBACK/dssefs`` when VAR is unset or relative (XDG rules)."""
    base = os.environ.get(var)
    if not base or not os.path.isabs(base):
        base = os.path.join(os.environ.get("HOME") or os.path.expanduser("~"), fallback)
    return os.path.join(base, "dssefs")


def default_keyring_path() -> str:
    return os.path.join(xdg_dir("XDG_CONFIG_HOME", ".config"), "keyring")


def default_store_dir() -> str:
    return os.path.join(xdg_dir("XDG_DATA_HOME", ".local/share"), "store")


def default_source() -> str:
    return "file://" + default_store_dir()


def store_options(s: Settings) -> dict[str, Any]:
    opts = {"region": s.region, "profile": s.profile, "endpoint_url": s.endpoint_url,
            "path_style": s.path_style, "retries_mode": s.retry_mode, "max_attempts": max(1, s.max_attempts)}
    return {k: v for k, v in opts.items() if v is not None}


@dataclass
class KeySetup:
    provider: kms.KeyProvider
    created_keyring: str | None = None  # path of a keyring created just now


def key_provider(s: Settings, *, create_default: bool = False) -> KeySetup:
    """The key provider the settings name (see the module docstring)."""
    keyring = s.keyring
    created = None
    if keyring is None and s.kms_key_id is None:
        keyring = default_keyring_path()
        if not os.path.exists(keyring):
            if not create_default:
                raise ConfigError(f"no key configured and no default keyring at {keyring}: give "
                                  "--kms-key-id or --keyring, or write something first to create it")
            os.makedirs(os.path.dirname(keyring), mode=0o700, exist_ok=True)
            try:
                kms.create_keyring(keyring, names=("default",))
            except FileExistsError:
                pass  # created concurrently by another dssefs process
            created = keyring
    if keyring is not None:
        passphrase = kms.passphrase_from_env_or_file(s.keyring_passphrase_file)
        provider = kms.make_provider(kms_key_id=s.kms_key_id, kms_key_id_outer=s.kms_key_id_outer,
                                     keyring=keyring, keyring_passphrase=passphrase)
    else:
        provider = kms.make_provider(kms_key_id=s.kms_key_id, kms_key_id_outer=s.kms_key_id_outer,
                                     kms_allowed_key_ids=s.kms_allowed_key_ids,
                                     kms_allowed_key_ids_outer=s.kms_allowed_key_ids_outer,
                                     **kms_client_options(s))
    return KeySetup(provider, created)


def kms_client_options(s: Settings) -> dict[str, Any]:
    """How the settings reach AWS KMS, for every KMS provider a command makes."""
    return {"region": s.region, "profile": s.profile, "endpoint_url": s.endpoint_url,
            "retries_mode": s.retry_mode, "max_attempts": max(1, s.max_attempts),
            "trust_hint": trust_line}


def vault_for(s: Settings, object_store: store.ObjectStore, provider: kms.KeyProvider | None,
              reading: "ReadingKeys | None" = None) -> Vault:
    """A Vault writing with ``provider`` (None: a reading command) and reading objects of any
    provider kind through ``reading`` (built from ``s`` when not given)."""
    chunk_log2 = s.chunk_size.bit_length() - 1
    # single-request bodies sealed at once stay within the memory the user gave the cache
    return Vault(object_store, provider, chunk_log2=chunk_log2, workers=max(1, s.workers),
                 single_put_budget=min(DEFAULT_SINGLE_PUT_BUDGET, s.cache_size),
                 epoch_max_age=s.epoch_max_age, epoch_max_objects=s.epoch_max_objects,
                 key_resolver=reading or ReadingKeys(s))


def explicit_keys(s: Settings) -> bool:
    """Whether the settings name a writing key (flag, -o or a configuration file)."""
    return s.keyring is not None or s.kms_key_id is not None


def trust_line(option: str, key: str) -> str:
    """What trusts ``key``: ``option`` on the command line, or its line in the user's file."""
    name = option.lstrip("-").replace("-", "_")
    return f" on the command line, or the line {name} = [\"{key}\"] in {config.user_config_path()}"


class ReadingKeys:
    """``kind -> KeyProvider`` for objects a command reads (the Vault's ``key_resolver``)."""

    def __init__(self, s: Settings):
        self.s = s
        self._made: dict[str, kms.KeyProvider] = {}

    def __call__(self, kind: str) -> kms.KeyProvider:
        if kind not in self._made:
            if kind == "kms":
                self._made[kind] = self._kms()
            elif kind == "local":
                self._made[kind] = self._keyrings()
            else:
                raise ConfigError(f"objects name the key provider {kind!r}, unknown to this dssefs: "
                                  "upgrade dssefs")
        return self._made[kind]

    def _kms(self) -> kms.KeyProvider:
        s = self.s
        inner = list(s.kms_allowed_key_ids)
        outer = list(s.kms_allowed_key_ids_outer)
        if s.keyring is None and s.kms_key_id is not None:  # the writing key is trusted too
            inner.insert(0, s.kms_key_id)
            if s.kms_key_id_outer is not None:
                outer.insert(0, s.kms_key_id_outer)
        if not inner and not outer:
            from .kms.readers import UntrustedKms

            def hint(layer: kms.Layer, key: str) -> str:
                return (f"trust it with --kms-allowed-key-ids {key}{trust_line('kms_allowed_key_ids', key)}")
            return UntrustedKms(hint)
        if not inner:
            raise ConfigError("kms_allowed_key_ids_outer is set but no inner layer key is trusted: "
                              "list the inner layer's keys in kms_allowed_key_ids too")
        first_outer = outer[0] if outer else None
        return kms.AwsKmsProvider(
            inner[0], first_outer, allowed_key_ids=inner[1:], allowed_key_ids_outer=outer[1:],
            read_only=True, **kms_client_options(s))

    def _keyrings(self) -> kms.KeyProvider:
        s = self.s
        if s.keyring is not None:
            paths = [s.keyring]
        else:
            paths = list(s.keyrings)
            default = default_keyring_path()
            if os.path.exists(default) and default not in paths:
                paths.append(default)
        if not paths:
            raise ConfigError("this object's keys are wrapped by a local keyring, and none is "
                              "configured: pass --keyring PATH, or list it in keyrings = "
                              f"[\"PATH\"] in {config.user_config_path()}")
        passphrase = kms.passphrase_from_env_or_file(s.keyring_passphrase_file)
        providers = [kms.LocalKeyringProvider(p, passphrase=passphrase) for p in dict.fromkeys(paths)]
        if len(providers) == 1:
            return providers[0]
        from .kms.readers import KeyringSet

        return KeyringSet(providers)


def announce_keyring(setup: KeySetup) -> None:
    if setup.created_keyring:
        print(f"dssefs: created keyring {setup.created_keyring} (mode 0600). Back it up: without it "
              "the data cannot be decrypted.", file=sys.stderr)
