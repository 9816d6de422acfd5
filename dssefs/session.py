"""Turning one validated :class:`~dssefs.config.Settings` into a store, a key provider and a Vault.

Shared by the object commands and the mount daemon, so both pick keys and stores by the same rules:

* ``--keyring PATH`` selects the local keyring; ``--kms-key-id`` / ``--kms-key-id-outer`` then name
  keys inside it.
* otherwise ``--kms-key-id`` selects AWS KMS (boto3's credential chain and endpoint variables);
  ``--kms-allowed-key-ids`` / ``--kms-allowed-key-ids-outer`` add keys trusted on read, per layer
  under split custody (``--kms-key-id-outer``).
* neither: the embedded default keyring ``$XDG_CONFIG_HOME/dssefs/keyring``, created on first use
  when the caller writes (``create_default=True``).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

from . import kms, store
from .config import Settings
from .errors import ConfigError
from .objects import Vault


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
                                     region=s.region, profile=s.profile, endpoint_url=s.endpoint_url,
                                     retries_mode=s.retry_mode, max_attempts=max(1, s.max_attempts))
    return KeySetup(provider, created)


def vault_for(s: Settings, object_store: store.ObjectStore, provider: kms.KeyProvider) -> Vault:
    chunk_log2 = s.chunk_size.bit_length() - 1
    return Vault(object_store, provider, chunk_log2=chunk_log2, workers=max(1, s.workers),
                 epoch_max_age=s.epoch_max_age, epoch_max_objects=s.epoch_max_objects)


def announce_keyring(setup: KeySetup) -> None:
    if setup.created_keyring:
        print(f"dssefs: created keyring {setup.created_keyring} (mode 0600). Back it up: without it "
              "the data cannot be decrypted.", file=sys.stderr)
