"""Key providers: where the two per-object data keys come from and how they are wrapped.

* :class:`~dssefs.kms.aws.AwsKmsProvider` (kind ``kms``): AWS KMS ``GenerateDataKey`` /
  ``Decrypt`` / ``ReEncrypt``, optionally with a second KMS key for the outer layer.
* :class:`~dssefs.kms.local.LocalKeyringProvider` (kind ``local``): AES-256-GCM key wrapping under
  named master keys from a keyring file, for offline use.

Both bind every wrapped key to its encryption context (:func:`context` for format-1 objects,
:func:`object_context_v2` and :func:`epoch_context` for format 2); a wrapped key that does not
open under the context given raises :class:`WrappedKeyMismatch` (a ``KeyAccessDenied``, errno
``EACCES``).  A keyring that has another key of the name a format-2 wrapped key needs raises
:class:`WrongKeyring` (a ``KeyNotFound``).  Both bind each layer to its own trusted keys under split
custody (two different keys for the two layers): a key trusted for one layer is refused for the
other.  Use :func:`make_provider` to build one from configuration.
"""

from __future__ import annotations

import os
from typing import Iterable

from ..errors import ConfigError, KeyNotFound
from ._common import WrappedKeyMismatch, WrongKeyring
from .aws import AwsKmsProvider, KmsKeyStatus, looks_like_kms_key_id, parse_kms_key_id
from .base import (DATA_KEY_BYTES, KeyProvider, Layer, WrappedKey, context, epoch_context,
                   object_context_v2)
from .local import (DEFAULT_KDF, PASSPHRASE_ENV, KdfParams, KeyInfo, Keyring,
                    LocalKeyringProvider, LocalKeyStatus, add_key, change_passphrase,
                    create_keyring, list_keys, load_keyring, passphrase_from_env_or_file,
                    validate_key_name)

__all__ = [
    "KeyProvider", "Layer", "WrappedKey", "context", "epoch_context", "object_context_v2",
    "DATA_KEY_BYTES", "WrappedKeyMismatch", "WrongKeyring",
    "AwsKmsProvider", "KmsKeyStatus", "parse_kms_key_id", "looks_like_kms_key_id",
    "LocalKeyringProvider", "LocalKeyStatus", "Keyring", "KeyInfo", "KdfParams", "DEFAULT_KDF",
    "PASSPHRASE_ENV",
    "create_keyring", "add_key", "load_keyring", "list_keys", "change_passphrase",
    "passphrase_from_env_or_file", "validate_key_name", "make_provider", "ensure_kind",
    "PROVIDER_KINDS",
]

#: Provider kinds recorded in object metadata.
PROVIDER_KINDS = ("kms", "local")


def make_provider(*, kms_key_id: str | None = None, kms_key_id_outer: str | None = None,
                  keyring: Keyring | str | os.PathLike | None = None,
                  keyring_passphrase: str | None = None, region: str | None = None,
                  profile: str | None = None, endpoint_url: str | None = None,
                  kms_allowed_key_ids: Iterable[str] = (),
                  kms_allowed_key_ids_outer: Iterable[str] = (), **kms_options) -> KeyProvider:
    """Build the key provider the configuration asks for.

    The rule:

    * A ``keyring`` (path or loaded :class:`Keyring`) selects the local keyring.  ``kms_key_id``
      and ``kms_key_id_outer`` then name keyring keys (inner defaults to ``default``, outer to the
      inner name).  A value that can only be a KMS key (key ARN, alias ARN, ``alias/NAME``, a KMS
      key id such as a UUID or ``mrk-...``) is refused as ambiguous.  ``keyring_passphrase``
      opens a protected keyring; the AWS options (``region``, ``profile``, ``endpoint_url``,
      ``kms_options``) are ignored.
    * Otherwise ``kms_key_id`` selects AWS KMS and must be a KMS key id, key ARN, alias name or
      alias ARN; ``kms_key_id_outer`` optionally names a second KMS key for the outer layer
      (split custody).  ``kms_allowed_key_ids`` lists further keys trusted for reading (e.g. the
      previous target of an alias): for the inner layer under split custody, for both layers
      otherwise; ``kms_allowed_key_ids_outer`` does the same for the outer layer.  Under split
      custody the two layers' trusted keys must not overlap.  ``kms_options`` are passed to
      :class:`AwsKmsProvider` (``session``, ``retries_mode``, ``max_attempts``, timeouts...).
    * Neither: :class:`~dssefs.errors.ConfigError`.
    """
    if keyring is not None:
        allowed = list(kms_allowed_key_ids) + list(kms_allowed_key_ids_outer)
        if allowed:
            raise ConfigError("allowed KMS key ids were given with a keyring: they apply to AWS "
                              "KMS only; drop them or drop the keyring")
        for value in (kms_key_id, kms_key_id_outer):
            if value is not None and looks_like_kms_key_id(value):
                raise ConfigError(f"{value!r} is a KMS key but a keyring was given: drop the "
                                  "keyring to use KMS, or name a key in the keyring")
        return LocalKeyringProvider(keyring, kms_key_id or "default", kms_key_id_outer,
                                    passphrase=keyring_passphrase)
    if keyring_passphrase is not None:
        raise ConfigError("a keyring passphrase was given without a keyring: give the keyring "
                          "path, or drop the passphrase")
    if kms_key_id is None:
        if kms_key_id_outer is not None:
            raise ConfigError("an outer KMS key was given without the inner one: give the inner "
                              "KMS key too")
        raise ConfigError("no key provider configured: give a KMS key (ARN, key id or "
                          "alias/NAME) or a keyring path")
    for value in (kms_key_id, kms_key_id_outer):
        if value is not None and not looks_like_kms_key_id(value):
            raise ConfigError(f"{value!r} is not a KMS key id, key ARN or alias (alias/NAME): "
                              "fix it, or give a keyring path to use a local key of that name")
    return AwsKmsProvider(kms_key_id, kms_key_id_outer, region=region, profile=profile,
                          endpoint_url=endpoint_url, allowed_key_ids=kms_allowed_key_ids,
                          allowed_key_ids_outer=kms_allowed_key_ids_outer, **kms_options)


def ensure_kind(provider: KeyProvider, kind: str, where: str = "this object") -> None:
    """Refuse to unwrap keys recorded for another provider kind, with a message naming the fix."""
    if kind == provider.kind:
        return
    if kind == "local":
        fix = "mount with the keyring that wrote it"
    elif kind == "kms":
        fix = "mount with its AWS KMS key"
    else:
        fix = "upgrade dssefs"
    raise KeyNotFound(f"the data keys of {where} are wrapped by the {kind!r} key provider but "
                      f"this mount uses {provider.kind!r}: {fix}")
