"""Object stores (S3 and a local directory) and the URIs that name them.

URIs
----
``s3://BUCKET/KEY``
    Bucket ``BUCKET``, key ``KEY`` taken literally (no percent-decoding, as the AWS CLI does).
``file:///DIR/KEY`` (or ``file://localhost/DIR/KEY``)
    A :class:`~dssefs.store.local.LocalStore` rooted at ``DIR`` holding object ``KEY``.  The path
    is taken literally and must be absolute; ``.`` and ``..`` components are refused.  Where the
    store root ends and the key begins is decided by the file system:

    1. the nearest ancestor directory of the path that contains the ``.dssefs-store`` marker is
       the root, and the rest of the path (possibly several components) is the key;
    2. without such an ancestor, the path's parent directory is the root and its last component
       the key (a store is created there on first write).

    So once ``/srv/vault`` is a store, ``file:///srv/vault/docs/a.pdf`` is key ``docs/a.pdf`` in
    it; ``file:///tmp/new/a.pdf`` with no store above it is key ``a.pdf`` in ``/tmp/new``.

For mounts, :func:`open_store` takes the root only: ``s3://BUCKET[/PREFIX]`` (the prefix is
returned with a trailing ``/``) or ``file:///DIR`` (the directory itself is the store).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Iterator

from ..errors import ConfigError
from .base import METADATA_LIMIT, MIN_PART_SIZE, Listing, ObjectInfo, ObjectStore, Upload
from .local import MARKER, LocalStore, is_local_store

if TYPE_CHECKING:  # pragma: no cover
    from .s3 import S3Store

__all__ = ["ObjectStore", "Upload", "ObjectInfo", "Listing", "METADATA_LIMIT", "MIN_PART_SIZE",
           "LocalStore", "S3Store", "MARKER", "parse_uri", "open_store", "open_store_for_uri",
           "listing", "is_local_store"]

_HINT = "use s3://BUCKET/KEY or file:///DIR/KEY"
#: Options understood by LocalStore; S3 options are ignored for file:// URIs.
_LOCAL_OPTIONS = frozenset({"create", "min_part_size", "fsync"})


def __getattr__(name: str) -> Any:
    # boto3 takes a while to import; only S3 users pay for it.
    if name == "S3Store":
        from .s3 import S3Store

        return S3Store
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _split_scheme(uri: str) -> tuple[str, str]:
    if not isinstance(uri, str) or "://" not in uri:
        raise ConfigError(f"not a store URI {uri!r}: {_HINT}")
    scheme, rest = uri.split("://", 1)
    scheme = scheme.lower()
    if scheme not in ("s3", "file"):
        raise ConfigError(f"unknown URI scheme '{scheme}://': {_HINT}")
    return scheme, rest


def _parse_s3(rest: str, uri: str) -> tuple[str, str]:
    bucket, _, key = rest.partition("/")
    if not bucket or any(c.isspace() for c in bucket) or ":" in bucket or "@" in bucket:
        raise ConfigError(f"no valid bucket in {uri!r}: {_HINT}")
    return bucket, key


def _file_path(rest: str, uri: str) -> str:
    if rest.startswith("localhost/"):
        rest = rest[len("localhost"):]
    if not rest.startswith("/"):
        raise ConfigError(f"file URI {uri!r} needs an absolute path: {_HINT}")
    if "\x00" in rest:
        raise ConfigError(f"file URI {uri!r} contains a NUL character")
    parts = rest.split("/")
    if any(p in (".", "..") for p in parts):
        raise ConfigError(f"file URI {uri!r} contains '.' or '..': give the plain absolute path")
    return rest


def _split_file(path: str) -> tuple[str, str]:
    """(store root, key) for an absolute path, by the marker rule in the module docstring."""
    parts = path.split("/")  # parts[0] == "" (leading slash)
    for i in range(len(parts) - 1, 0, -1):
        root = "/".join(parts[:i]) or "/"
        if is_local_store(root):
            return root, "/".join(parts[i:])
    root = "/".join(parts[:-1]) or "/"
    return root, parts[-1]


def parse_uri(uri: str) -> tuple[str, str, str]:
    """``(scheme, location, key)``: ``("s3", BUCKET, KEY)`` or ``("file", ROOT_DIR, KEY)``.

    For ``file://`` URIs the split between root and key follows the marker rule of the module
    docstring, so it looks at the file system.  ``key`` may be empty (``s3://bucket``,
    ``file:///dir/``).  Raises ConfigError for anything else.
    """
    scheme, rest = _split_scheme(uri)
    if scheme == "s3":
        bucket, key = _parse_s3(rest, uri)
        return "s3", bucket, key
    root, key = _split_file(_file_path(rest, uri))
    return "file", root, key


def _local_options(opts: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in opts.items() if k in _LOCAL_OPTIONS}


def _s3_options(opts: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in opts.items() if k not in _LOCAL_OPTIONS}


def open_store_for_uri(uri: str, **opts: Any) -> tuple[ObjectStore, str]:
    """The store and key a single-object URI names (for ``put``, ``get``, ``inspect``...).

    ``opts`` are S3Store keyword arguments (ignored for ``file://``, apart from LocalStore's own
    ``create`` / ``min_part_size`` / ``fsync``).  A local store is created at the root when
    missing, unless ``create=False``.  Raises ConfigError when the URI names no object.
    """
    scheme, location, key = parse_uri(uri)
    if not key or key.endswith("/"):
        raise ConfigError(f"{uri!r} names a directory, not an object: add the object's name")
    if scheme == "s3":
        from .s3 import S3Store

        return S3Store(location, **_s3_options(opts)), key
    return LocalStore(location, **_local_options(opts)), key


def open_store(uri_root: str, **opts: Any) -> tuple[ObjectStore, str]:
    """The store a mount source names and the key prefix inside it.

    ``s3://BUCKET`` → ``(S3Store, "")``; ``s3://BUCKET/PREFIX`` → ``(S3Store, "PREFIX/")``;
    ``file:///DIR`` → ``(LocalStore(DIR), "")``.
    """
    scheme, rest = _split_scheme(uri_root)
    if scheme == "s3":
        from .s3 import S3Store

        bucket, prefix = _parse_s3(rest, uri_root)
        prefix = prefix.strip("/")
        return S3Store(bucket, **_s3_options(opts)), (prefix + "/" if prefix else "")
    path = _file_path(rest, uri_root)
    root = path.rstrip("/") or "/"
    return LocalStore(os.path.normpath(root), **_local_options(opts)), ""


def listing(store: ObjectStore, prefix: str = "") -> Listing:
    """Collect one ``/``-delimited listing level of ``prefix`` (all pages)."""
    objects: list[ObjectInfo] = []
    prefixes: list[str] = []
    for item in store.list(prefix, "/"):
        if isinstance(item, str):
            prefixes.append(item)
        else:
            objects.append(item)
    return Listing(objects=objects, prefixes=prefixes)


def iter_keys(store: ObjectStore, prefix: str = "") -> Iterator[str]:
    """Every key under ``prefix``, recursively, in order."""
    for item in store.list(prefix, None):
        if isinstance(item, ObjectInfo):
            yield item.key
