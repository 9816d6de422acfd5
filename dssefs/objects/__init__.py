"""Encrypted objects: the envelope, a key provider and an object store put together.

This is the layer the CLI and the file system use.  It knows nothing about files or FUSE.
"""

from .vault import DataKeys, OpenObject, Vault, bytes_source, file_source

__all__ = ["Vault", "OpenObject", "DataKeys", "bytes_source", "file_source"]
