"""Writing format version 1 objects the way earlier releases did, to show they stay readable.

dssefs itself only writes version 2 now; these objects are what a bucket written by an earlier
release holds (per-object data keys wrapped by the provider with the version 1 context)."""

from __future__ import annotations

import os

from dssefs.envelope import ObjectCipher
from dssefs.envelope.metadata import Envelope
from dssefs.kms.base import Layer, context


def write_v1(store, provider, key: str, data: bytes, *, attrs: bytes | None = None,
             chunk_log2: int = 12, generation: int = 0, file_id: bytes | None = None) -> str:
    """Store ``data`` at ``key`` as a version 1 object; returns its ETag."""
    bucket = store.context_name
    dk_in, w_in = provider.generate(Layer.INNER, context(Layer.INNER, bucket, key))
    dk_out, w_out = provider.generate(Layer.OUTER, context(Layer.OUTER, bucket, key))
    cipher = ObjectCipher.new_version(dk_in, dk_out, plaintext_len=len(data), version=1,
                                      file_id=file_id or os.urandom(16), generation=generation,
                                      chunk_log2=chunk_log2)
    body = bytearray()
    for i in range(cipher.n_chunks):
        start = i * cipher.chunk_size
        body += cipher.seal_chunk(i, data[start:start + cipher.chunk_plain_len(i)])
    env = Envelope(header=cipher.header, provider=provider.kind, key_id_inner=w_in.key_id,
                   key_id_outer=w_out.key_id, wrapped_inner=w_in.blob, wrapped_outer=w_out.blob,
                   attrs=None if attrs is None else cipher.seal_attrs(attrs))
    return store.put(key, bytes(body), env.to_metadata())
