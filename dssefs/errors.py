"""One exception hierarchy for every layer.

Each error carries the errno the file system hands to applications and a one-line message that names
the problem and, where there is one, the fix.  Messages never contain key material or plaintext.
"""

from __future__ import annotations

import errno as _errno


class DssefsError(Exception):
    """Base class: ``str(err)`` is a one-line, user-facing message."""

    errno: int = _errno.EIO

    def __init__(self, message: str, *, errno: int | None = None):
        super().__init__(message)
        if errno is not None:
            self.errno = errno


class ConfigError(DssefsError):
    """Bad configuration or command-line input."""

    errno = _errno.EINVAL


class IntegrityError(DssefsError):
    """An object failed authentication or is malformed: tampered, truncated, reordered or swapped."""

    errno = _errno.EIO


class NotDssefsObject(DssefsError):
    """The object exists but carries no dssefs envelope metadata."""

    errno = _errno.EACCES


class UnsupportedFormat(IntegrityError):
    """The object names a format version or suite this build does not know (never downgraded)."""


class MetadataBudgetError(DssefsError):
    """User metadata would exceed S3's 2 KB budget."""

    errno = _errno.ENOSPC


class KeyProviderError(DssefsError):
    """A key provider (KMS or local keyring) failed."""

    errno = _errno.EACCES


class KeyAccessDenied(KeyProviderError):
    errno = _errno.EACCES


class KeyNotFound(KeyProviderError):
    errno = _errno.EACCES


class KeyUnavailable(KeyProviderError):
    """KMS unreachable, throttled beyond retries, or the key is disabled."""

    errno = _errno.EIO


class StoreError(DssefsError):
    """An object store operation failed."""

    errno = _errno.EIO


class ObjectNotFound(StoreError):
    errno = _errno.ENOENT


class StoreAccessDenied(StoreError):
    errno = _errno.EACCES


class StoreUnavailable(StoreError):
    """The store cannot be reached (network, endpoint, bucket missing)."""

    errno = _errno.EIO


class PreconditionFailed(StoreError):
    """A conditional write lost: another writer changed the object first."""

    errno = _errno.EIO


class StoreFull(StoreError):
    errno = _errno.ENOSPC
