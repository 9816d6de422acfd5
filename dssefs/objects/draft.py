"""A version whose keys are drawn before its length is known (docs/format.md 17.3, "Stream").

A :class:`DraftVersion` draws the message id, the file id (unless the file keeps its own) and
both data keys when a file starts being written.  Chunks sealed before the length is known are
sealed with :attr:`DraftVersion.draft`, a cipher under a header whose length is larger than any
chunk it seals, so that each of them is a middle chunk (``final = 0``); the version 2 content keys
and chunk AADs depend on the data keys, the file id and the message id only, so they are the
final version's.  :meth:`DraftVersion.final` gives the cipher of the real header (the tail, the
last chunk with ``final = 1``, and the commitments); :meth:`DraftVersion.envelope` wraps the data
keys under the current epoch of the object's prefix and seals the attribute blob.

Both writers that use it (write-behind to a staging key, :mod:`.stream`, and sealing ahead in
memory, :mod:`.preseal`) keep the rule of 17.3: a chunk index is sealed at most once per message
id; a writer that must change a sealed chunk abandons the draft (the file is then stored the
ordinary way, under a new message id).
"""

from __future__ import annotations

import os
import time

from .. import envelope
from ..envelope import format as fmt
from ..envelope.epoch import is_reserved_key
from ..envelope.metadata import Envelope
from ..errors import ConfigError
from ..store.base import ObjectInfo
from .vault import DataKeys, OpenObject, Vault


class DraftVersion:
    """The ids and data keys of one version being written (never printed: see ``__repr__``)."""

    def __init__(self, vault: Vault, *, chunk_log2: int, file_id: bytes | None = None):
        if vault.keys is None:
            raise ConfigError("this command was given no key to write with")
        self.vault = vault
        self.chunk_log2, self.cs = chunk_log2, 1 << chunk_log2
        self.file_id = bytes(file_id) if file_id is not None else os.urandom(fmt.FILE_ID_BYTES)
        self.msg_id = os.urandom(fmt.MSG_ID_BYTES)
        dk_in, dk_out = os.urandom(32), os.urandom(32)
        while dk_in == dk_out:  # pragma: no cover - 2**-256
            dk_out = os.urandom(32)
        self._dk = (dk_in, dk_out)
        self.draft = envelope.ObjectCipher.new_version(
            dk_in, dk_out, plaintext_len=fmt.MAX_PLAINTEXT - 1, file_id=self.file_id, chunk_log2=chunk_log2,
            msg_id=self.msg_id)

    def __repr__(self) -> str:
        return "DraftVersion(<keys redacted>)"

    def final(self, size: int, *, generation: int, with_attrs: bool) -> envelope.ObjectCipher:
        """The cipher of the version's real header: ``size`` bytes, same message id and keys."""
        return envelope.ObjectCipher.new_version(
            self._dk[0], self._dk[1], plaintext_len=size, file_id=self.file_id, generation=generation,
            chunk_log2=self.chunk_log2, msg_id=self.msg_id, with_attrs=with_attrs)

    def check_key(self, key: str) -> None:
        """Refuse to store the version under one of dssefs's own record keys (checked by a
        writer before it sends its tail)."""
        if is_reserved_key(key):
            raise ConfigError(f"{self.vault.store.url}/{key}: '.dssefs' is reserved for dssefs's own records")

    def envelope(self, key: str, cipher: envelope.ObjectCipher, attrs: bytes | None
                 ) -> tuple[DataKeys, Envelope]:
        """The data keys wrapped for ``key`` under its prefix's current epoch, and the envelope
        (header, wrapped keys, sealed attribute blob) to store the version with."""
        vault = self.vault
        epoch = vault.epochs.for_writing(vault.epoch_prefix_for(key))
        keys = vault._wrap_under(epoch, key, *self._dk)
        return keys, vault._envelope(cipher, keys, attrs)

    def opened(self, key: str, cipher: envelope.ObjectCipher, keys: DataKeys, env: Envelope,
               meta: dict[str, str], etag: str) -> OpenObject:
        """The stored version, opened (no HEAD, parse or key derivation needed to use it)."""
        vault = self.vault
        vault._remember_keys(keys)
        vault._remember_cipher(cipher, keys)
        info = ObjectInfo(key, cipher.body_size, etag, time.time(), meta)
        return OpenObject(vault, info, env, cipher, keys, envelope.ChunkMap(None, cipher.plaintext_len, self.cs))
