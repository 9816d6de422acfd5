"""Reading and writing dual-layer encrypted objects.

A :class:`Vault` binds one object store to one key provider.  All methods are blocking and
thread-safe; the file system calls them from worker threads.  Large writes are split into parts
that are encrypted and uploaded in parallel with bounded memory (``workers`` parts in flight).

Rules enforced here (see docs/format.md):
- new objects are format version 2: fresh random data keys per version, wrapped locally under the
  current epoch keys of their prefix (:mod:`.epochs`: KMS calls per epoch, not per object); version
  1 objects stay readable, and re-keying one rewrites it as version 2;
- every new version gets a fresh message id, hence fresh per-version keys;
- readers check the stored object size against the authenticated length before decrypting, fetch
  whole chunks pinned to the ETag they opened (``If-Match``), and release only verified plaintext;
- rename and re-key rewrite metadata only (server-side copy); bodies are never re-encrypted.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import itertools
import logging
import os
import threading
import time
import types
from typing import Callable, Iterable, Iterator

from .. import envelope
from ..envelope import format as fmt
from ..envelope.epoch import is_reserved_key, record_key
from ..envelope.keywrap import unwrap_data_key, wrap_data_key
from ..envelope.metadata import Envelope, EpochRef, metadata_size
from ..errors import (ConfigError, IntegrityError, KeyProviderError, ObjectNotFound, PreconditionFailed,
                      StoreError)
from ..kms._common import WrappedKeyMismatch
from ..kms.base import KeyProvider, Layer, WrappedKey, context, object_context_v2
from ..retrying import DEFAULT_RETRY_BUDGET, is_transient, retry_delay
from ..store.base import ObjectInfo, ObjectStore
from .budget import ByteBudget
from .epochs import DEFAULT_MAX_AGE, DEFAULT_MAX_OBJECTS, Epoch, Epochs, fetch_record

log = logging.getLogger(__name__)

#: ``source(offset, length) -> bytes-like`` returning exactly ``length`` plaintext bytes.
Source = Callable[[int, int], "bytes | bytearray | memoryview"]
Progress = Callable[[int], None]
#: ``deliver(index, plaintext)``: one verified chunk of a run, handed over before the next is opened.
Deliver = Callable[[int, bytearray], None]

DEFAULT_PART_SIZE = 8 * 1024 * 1024
OPEN_CACHE_ENTRIES = 4096  # unwrapped data keys and verified ciphers kept in memory (LRU each)
#: Bodies up to this size are stored with one PUT: S3's own guidance is to consider multipart
#: uploads from 100 MB (Amazon S3 User Guide, "Amazon S3 multipart upload limits").  A single
#: request saves the creation and completion round trips, and the completion's server work,
#: of the parts (10 requests instead of 1 for 64 MiB in 8 MiB parts).
DEFAULT_MULTIPART_THRESHOLD = 100_000_000
#: Bytes of single-request bodies larger than a part that may be sealed in memory at once (all
#: files together); a body that does not fit goes as a multipart upload, whose buffers are
#: bounded per file (``workers`` parts).
DEFAULT_SINGLE_PUT_BUDGET = 256 * 1024 * 1024
READ_WINDOW = 8 * 1024 * 1024
#: Writes whose outcome is unknown, remembered (memory only): keys (LRU), and writes per key.
UNCONFIRMED_KEYS = 1024
UNCONFIRMED_PER_KEY = 4
#: How many times one write is sent again on top of versions of our own it finds in its way.
MAX_REBASES = 3


def bytes_source(data) -> Source:
    view = memoryview(data)
    return lambda offset, length: view[offset:offset + length]


def file_source(fd: int) -> Source:
    def read(offset: int, length: int) -> bytes:
        buf = os.pread(fd, length, offset)
        if len(buf) != length:
            raise IOError(f"source file shrank while being read (wanted {length} bytes at {offset})")
        return buf
    return read


class DataKeys:
    """The two plaintext data keys of one object key and their wrapped forms.  Never printed.

    Version 2 keys carry the epoch whose keys wrap them (``epoch``); their ``provider`` is the
    epoch record's."""

    __slots__ = ("inner", "outer", "wrapped_inner", "wrapped_outer", "provider", "object_key", "epoch")

    def __init__(self, inner: bytes, outer: bytes, wrapped_inner: WrappedKey, wrapped_outer: WrappedKey,
                 provider: str, object_key: str, epoch: Epoch | None = None):
        self.inner, self.outer = inner, outer
        self.wrapped_inner, self.wrapped_outer = wrapped_inner, wrapped_outer
        self.provider, self.object_key = provider, object_key
        self.epoch = epoch

    def __repr__(self) -> str:
        return f"DataKeys({self.provider}, {self.object_key!r}, <redacted>)"


class OpenObject:
    """One opened, authenticated object version: header parsed, keys unwrapped, commitments
    verified.  Reads are pinned to the ETag seen at open time."""

    def __init__(self, vault: "Vault", info: ObjectInfo, env: Envelope, cipher: envelope.ObjectCipher,
                 keys: DataKeys, chunk_map: envelope.ChunkMap | None = None):
        self.vault, self.info, self.envelope, self.cipher, self.data_keys = vault, info, env, cipher, keys
        # which chunks the body stores: every one (dense), or a sparse version's map, read and
        # authenticated on first use (one ranged GET of the body's end)
        self._map = chunk_map if chunk_map is not None or cipher.sparse else \
            envelope.ChunkMap(None, cipher.plaintext_len, cipher.chunk_size)
        self._map_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"OpenObject({self.key!r}, size={self.size}, gen={self.generation})"

    key = property(lambda self: self.info.key)
    etag = property(lambda self: self.info.etag)
    size = property(lambda self: self.cipher.plaintext_len)
    header = property(lambda self: self.cipher.header)
    file_id = property(lambda self: self.cipher.header.file_id)
    generation = property(lambda self: self.cipher.header.generation)
    chunk_size = property(lambda self: self.cipher.chunk_size)
    body_size = property(lambda self: self.info.size)  # stored (encrypted) bytes
    n_chunks = property(lambda self: self.cipher.n_chunks)
    sparse = property(lambda self: self.cipher.sparse)

    def chunk_map(self) -> envelope.ChunkMap:
        """Which chunks are stored; a sparse version's map is fetched and verified once."""
        m = self._map
        if m is None:
            with self._map_lock:
                m = self._map
                if m is None:
                    m = self._map = self._load_map(None)
        return m

    def _load_map(self, body) -> envelope.ChunkMap:
        size, n = self.info.size, self.cipher.sealed_map_len
        if body is None:
            body, total = self.vault.store.get_range(self.key, size - n, n, if_match=self.etag)
            if total != size:
                raise IntegrityError(f"{self.vault.store.url}/{self.key}: object is {total} bytes, "
                                     f"expected {size} (changed while being read)")
        else:
            body = memoryview(body)[size - n:]
        try:
            m = self.cipher.open_map(body)
        except IntegrityError as e:
            raise IntegrityError(f"{self.vault.store.url}/{self.key}: {e}") from None
        if m.body_size() != size:
            raise IntegrityError(f"{self.vault.store.url}/{self.key}: object is {size} bytes, its chunk map "
                                 f"says {m.body_size()} (truncated or extended)")
        return m

    def is_hole(self, index: int) -> bool:
        """Chunk ``index`` is not stored (a sparse version's hole: it reads as zeros)."""
        return self.sparse and not self.chunk_map().stored(index)

    def attrs(self) -> bytes | None:
        """The decrypted attribute blob, or None if the object has none (decrypted once)."""
        if self.envelope.attrs is None:
            return None
        plain = self.__dict__.get("_attrs_plain")
        if plain is None:
            plain = self._attrs_plain = self.cipher.open_attrs(self.envelope.attrs)
        return plain

    def read_chunks(self, chunks: range, deliver: Deliver | None = None) -> list[bytearray]:
        """Fetch a contiguous run of chunks with one ranged GET (none for a run of holes) and
        return their plaintexts.  ``deliver(index, plaintext)``, if given, is called for each
        chunk in order as soon as it is verified, before the later ones are decrypted."""
        if not chunks:
            return []
        if chunks.start < 0 or chunks.stop > self.n_chunks:
            raise IndexError(f"chunks {chunks.start}..{chunks.stop - 1} outside 0..{self.n_chunks - 1}")
        m = self.chunk_map()
        start, length, stored = m.span(chunks)
        if not stored:  # holes only: zeros, nothing to fetch
            return self._open_run(chunks, stored, b"", deliver)
        data, total = self.vault.store.get_range(self.key, start, length, if_match=self.etag)
        if total != m.body_size():
            raise IntegrityError(f"{self.vault.store.url}/{self.key}: object is {total} bytes, its header "
                                 f"says {m.body_size()} (truncated or extended)")
        if len(data) != length:
            raise IntegrityError(f"{self.vault.store.url}/{self.key}: short read ({len(data)} of {length} bytes)")
        return self._open_run(chunks, stored, data, deliver)

    def open_body(self, body: bytes) -> list[bytearray]:
        """Plaintexts of every chunk from ``body``, the whole body as fetched by a HEAD with a
        prefix (``ObjectInfo.prefix``): verified exactly like :meth:`read_chunks`."""
        if len(body) != self.info.size:
            raise IntegrityError(f"{self.vault.store.url}/{self.key}: body is {len(body)} bytes, the object "
                                 f"{self.info.size} (truncated or extended)")
        if self._map is None:
            with self._map_lock:
                if self._map is None:
                    self._map = self._load_map(body)
        chunks = range(self.n_chunks)
        return self._open_run(chunks, self._map.stored_in(chunks), body)

    def _open_run(self, chunks: range, stored: list[int], data, deliver: Deliver | None = None
                  ) -> list[bytearray]:
        """Plaintexts of ``chunks`` from ``data``, the bodies of the ``stored`` ones back to back
        (the others are holes: zeros).  A read-only ``data`` is not copied: each chunk's outer
        layer is opened into one scratch buffer, reused for the next chunk."""
        view = memoryview(data)
        stored_set = set(stored) if len(stored) != len(chunks) else None
        scratch = self.cipher.scratch() if view.readonly and len(stored) > 1 else None
        out = []
        pos = 0
        for i in chunks:
            if stored_set is None or i in stored_set:
                n = self.cipher.chunk_plain_len(i) + fmt.CHUNK_OVERHEAD
                try:
                    plain = self.cipher.open_chunk(i, view[pos:pos + n], scratch)
                except IntegrityError as e:
                    raise IntegrityError(f"{self.vault.store.url}/{self.key}: {e}") from None
                pos += n
            else:
                plain = bytearray(self.cipher.chunk_plain_len(i))
            out.append(plain)
            if deliver is not None:
                deliver(i, plain)
        return out

    def read(self, offset: int, length: int) -> bytes:
        """Plaintext bytes ``[offset, offset+length)`` clipped to the end of the object."""
        chunks = self.cipher.chunks_for_range(offset, length)
        if not chunks:
            return b""
        plain = b"".join(self.read_chunks(chunks))
        skip = offset - chunks.start * self.chunk_size
        return plain[skip:skip + min(length, self.size - offset)]

    def iter_chunks(self, *, window: int = READ_WINDOW, progress: Progress | None = None
                    ) -> Iterator[tuple[int, bytearray]]:
        """Every chunk in order, fetched ``window`` bytes per request with requests in parallel."""
        per = max(1, window // self.chunk_size)
        runs = iter([range(s, min(s + per, self.n_chunks)) for s in range(0, self.n_chunks, per)])
        pool = self.vault.pool
        pending: collections.deque = collections.deque(
            (run, pool.submit(self.read_chunks, run)) for run in itertools.islice(runs, self.vault.workers))
        try:
            while pending:
                run, future = pending.popleft()
                plains = future.result()
                nxt = next(runs, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(self.read_chunks, nxt)))
                for i, p in zip(run, plains):
                    if progress:
                        progress(len(p))
                    yield i, p
        finally:
            for _, future in pending:
                future.cancel()

    def verify(self, progress: Progress | None = None) -> None:
        """Authenticate every chunk (and the attributes); raises IntegrityError on the first failure."""
        self.attrs()
        for _ in self.iter_chunks(progress=progress):
            pass


class Vault:
    def __init__(self, store: ObjectStore, keys: KeyProvider, *, chunk_log2: int = fmt.DEFAULT_CHUNK_LOG2,
                 workers: int = 4, part_size: int = DEFAULT_PART_SIZE,
                 multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
                 single_put_budget: int = DEFAULT_SINGLE_PUT_BUDGET,
                 key_resolver: Callable[[str], KeyProvider] | None = None,
                 epoch_prefix: str | None = None, epoch_max_age: float = DEFAULT_MAX_AGE,
                 epoch_max_objects: int = DEFAULT_MAX_OBJECTS,
                 retry_budget: float = DEFAULT_RETRY_BUDGET):
        """``keys`` wraps new epoch keys.  ``key_resolver(kind)`` may supply a provider for reading
        objects whose keys another provider kind wrapped (e.g. a KMS-wrapped object read by a
        command configured with a keyring); without it such objects are refused.

        ``epoch_prefix``: the prefix whose epoch new objects below it use (a mount's prefix);
        objects elsewhere (and every object when None) use the epoch of their parent "directory".
        A new epoch starts after ``epoch_max_age`` seconds or ``epoch_max_objects`` objects.

        ``retry_budget``: seconds the read-back of a refused write (see :meth:`_store_write`)
        retries a transient store failure before giving up.

        A new version whose body is at most ``multipart_threshold`` bytes is stored with one
        request; bodies larger than ``part_size`` do so only while ``single_put_budget`` bytes
        of such bodies are not all in use, otherwise as a multipart upload."""
        if not fmt.MIN_CHUNK_LOG2 <= chunk_log2 <= fmt.MAX_CHUNK_LOG2:
            raise ValueError(f"chunk_log2 must be within {fmt.MIN_CHUNK_LOG2}..{fmt.MAX_CHUNK_LOG2}")
        self.store, self.keys = store, keys
        self.key_resolver = key_resolver
        self.chunk_log2 = chunk_log2
        self.workers = max(1, workers)
        self.part_size = part_size
        self.multipart_threshold = max(multipart_threshold, part_size)
        self.single_puts = ByteBudget(single_put_budget)
        self._pool: cf.ThreadPoolExecutor | None = None
        self._key_pool: cf.ThreadPoolExecutor | None = None  # the second layer's KMS request
        self._pool_lock = threading.Lock()
        # memory only, never written anywhere: unwrapped data keys per (object key, wrapped blobs)
        # and verified ciphers per (header, data keys), so that probing, opening and reading one
        # version unwraps (a KMS call) and derives its keys once
        self._open_lock = threading.Lock()
        self._keys_cache: collections.OrderedDict[tuple, DataKeys] = collections.OrderedDict()
        self._cipher_cache: collections.OrderedDict[tuple, envelope.ObjectCipher] = collections.OrderedDict()
        self.retry_budget = retry_budget
        # memory only: writes whose outcome is unknown, per object key (see _store_write)
        self._unconfirmed: collections.OrderedDict[str, list[_Unconfirmed]] = collections.OrderedDict()
        if epoch_prefix is not None and epoch_prefix and not epoch_prefix.endswith("/"):
            raise ValueError("an epoch prefix is empty or ends with '/'")
        self.epoch_prefix = epoch_prefix
        self.epochs = Epochs(store, keys, lambda kind: self._provider_for("", kind), self._per_layer,
                             max_age=epoch_max_age, max_objects=epoch_max_objects)

    @property
    def pool(self) -> cf.ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = cf.ThreadPoolExecutor(max_workers=self.workers * 2,
                                                   thread_name_prefix="dssefs-vault")
            return self._pool

    def close(self) -> None:
        for name in ("_pool", "_key_pool"):
            pool = getattr(self, name)
            if pool is not None:
                pool.shutdown(wait=True)
                setattr(self, name, None)

    def _per_layer(self, provider: KeyProvider, call):
        """``(call(INNER), call(OUTER))``; the two at once for a provider whose requests mostly
        wait (KMS: one round trip instead of two per new or opened version)."""
        if not provider.parallel_requests:
            return call(Layer.INNER), call(Layer.OUTER)
        with self._pool_lock:
            if self._key_pool is None:
                self._key_pool = cf.ThreadPoolExecutor(max_workers=8, thread_name_prefix="dssefs-kms")
            pool = self._key_pool
        outer = pool.submit(call, Layer.OUTER)
        try:
            inner = call(Layer.INNER)
        except Exception:
            cf.wait([outer])  # report this layer's error once the other request has ended too
            raise
        except BaseException:
            outer.cancel()  # interrupted (a stop signal): do not wait for a slow KMS
            raise
        return inner, outer.result()

    def _ctx(self, layer: Layer, key: str) -> dict[str, str]:
        """Version 1 wrapping context of ``key``."""
        return context(layer, self.store.context_name, key)

    def _ctx2(self, layer: Layer, key: str, epoch_id: bytes) -> dict[str, str]:
        """Version 2 context a data key of ``key`` is wrapped with under epoch ``epoch_id``."""
        return object_context_v2(layer, self.store.context_name, key, epoch_id.hex())

    # ---- keys -----------------------------------------------------------------------------------

    def epoch_prefix_for(self, key: str) -> str:
        """The prefix whose epoch a new version of ``key`` is wrapped under."""
        p = self.epoch_prefix
        if p is not None and key.startswith(p):
            return p  # (a prefix mount's root marker is the prefix itself)
        base = key[:-1] if key.endswith("/") else key
        return base[:base.rfind("/") + 1]

    def new_data_keys(self, key: str) -> DataKeys:
        """Fresh random data keys for a new version of ``key``, wrapped under the current epoch
        of its prefix (no KMS call unless that epoch has to be started)."""
        if is_reserved_key(key):
            raise ConfigError(f"{self.store.url}/{key}: '.dssefs' is reserved for dssefs's own "
                              "records in every directory: choose another name")
        if self.keys is None:
            raise ConfigError("this command was given no key to write with: pass --kms-key-id "
                              "(or set kms_key_id in the configuration) or --keyring")
        epoch = self.epochs.for_writing(self.epoch_prefix_for(key))
        dk_in, dk_out = os.urandom(32), os.urandom(32)
        while dk_in == dk_out:  # pragma: no cover - 2**-256
            dk_out = os.urandom(32)
        return self._wrap_under(epoch, key, dk_in, dk_out)

    def _wrap_under(self, epoch: Epoch, key: str, dk_in: bytes, dk_out: bytes) -> DataKeys:
        eid = epoch.epoch_id
        w_in = wrap_data_key(fmt.LAYER_INNER, epoch.key_inner, dk_in, self._ctx2(Layer.INNER, key, eid))
        w_out = wrap_data_key(fmt.LAYER_OUTER, epoch.key_outer, dk_out, self._ctx2(Layer.OUTER, key, eid))
        return DataKeys(dk_in, dk_out, WrappedKey(w_in, ""), WrappedKey(w_out, ""),
                        epoch.record.provider, key, epoch)

    def _provider_for(self, key: str, kind: str) -> KeyProvider:
        if self.keys is not None and kind == self.keys.kind:
            return self.keys
        if self.key_resolver is not None:
            return self.key_resolver(kind)
        where = f"{self.store.url}/{key}" if key else self.store.url
        raise KeyProviderError(
            f"{where}: keys are wrapped by '{kind}' but this command uses "
            f"'{getattr(self.keys, 'kind', 'none')}': pass the matching --kms-key-id or --keyring")

    def _cached(self, cache: collections.OrderedDict, k: tuple):
        with self._open_lock:
            v = cache.get(k)
            if v is not None:
                cache.move_to_end(k)
            return v

    def _remember(self, cache: collections.OrderedDict, k: tuple, v) -> None:
        with self._open_lock:
            cache[k] = v
            cache.move_to_end(k)
            while len(cache) > OPEN_CACHE_ENTRIES:
                cache.popitem(last=False)

    @staticmethod
    def _wrapped_id(key: str, env: Envelope) -> tuple:
        return (key, env.provider, env.key_id_inner, env.key_id_outer, bytes(env.wrapped_inner),
                bytes(env.wrapped_outer), env.epoch)

    def _remember_keys(self, keys: DataKeys) -> None:
        self._remember(self._keys_cache, (keys.object_key, keys.provider, keys.wrapped_inner.key_id,
                                          keys.wrapped_outer.key_id, bytes(keys.wrapped_inner.blob),
                                          bytes(keys.wrapped_outer.blob)), keys)

    def _remember_cipher(self, cipher: envelope.ObjectCipher, keys: DataKeys) -> None:
        """A cipher whose commitments are known to match ``keys`` (verified, or just computed)."""
        self._remember(self._cipher_cache, (cipher.header_bytes, bytes(keys.inner), bytes(keys.outer)), cipher)

    def _unwrap(self, key: str, env: Envelope) -> DataKeys:
        wid = self._wrapped_id(key, env)
        keys = self._cached(self._keys_cache, wid)
        if keys is not None:
            return keys
        keys = self._unwrap_now(key, env)
        self._remember(self._keys_cache, wid, keys)
        return keys

    def _unwrap_now(self, key: str, env: Envelope) -> DataKeys:
        if env.version == fmt.FORMAT_V2:
            return self._unwrap_v2(key, env)
        provider = self._provider_for(key, env.provider)
        w_in = WrappedKey(env.wrapped_inner, env.key_id_inner)
        w_out = WrappedKey(env.wrapped_outer, env.key_id_outer)
        wrapped = {Layer.INNER: w_in, Layer.OUTER: w_out}
        dk_in, dk_out = self._per_layer(
            provider, lambda layer: provider.unwrap(layer, wrapped[layer], self._ctx(layer, key)))
        return DataKeys(dk_in, dk_out, w_in, w_out, env.provider, key)

    def _unwrap_v2(self, key: str, env: Envelope) -> DataKeys:
        """Version 2: the epoch's keys (from memory, or its record and one unwrap per layer),
        then both data keys unwrapped locally under them with this object's name."""
        if is_reserved_key(key):
            raise IntegrityError(f"{self.store.url}/{key}: objects below a '.dssefs' name are "
                                 "dssefs's own records, never files")
        ref = env.epoch
        try:
            prefix = ref.prefix_of(key)
            epoch = self.epochs.for_reading(prefix, ref.epoch_id)
        except IntegrityError as e:
            msg = str(e)
            raise type(e)(msg if msg.startswith(self.store.url) else f"{self.store.url}/{key}: {msg}") from None
        try:
            dk_in = unwrap_data_key(fmt.LAYER_INNER, epoch.key_inner, env.wrapped_inner,
                                    self._ctx2(Layer.INNER, key, ref.epoch_id))
            dk_out = unwrap_data_key(fmt.LAYER_OUTER, epoch.key_outer, env.wrapped_outer,
                                     self._ctx2(Layer.OUTER, key, ref.epoch_id))
        except IntegrityError as e:
            # as with a KMS-wrapped key under the wrong context (version 1): EACCES
            raise WrappedKeyMismatch(f"{self.store.url}/{key}: {e}: restore it, or copy it with "
                                     "dssefs") from None
        if dk_in == dk_out:
            raise IntegrityError(f"{self.store.url}/{key}: both layers have the same data key")
        return DataKeys(dk_in, dk_out, WrappedKey(env.wrapped_inner, ""),
                        WrappedKey(env.wrapped_outer, ""), epoch.record.provider, key, epoch)

    # ---- reading --------------------------------------------------------------------------------

    def open(self, key: str, info: ObjectInfo | None = None, *, data_keys: DataKeys | None = None
             ) -> OpenObject:
        """Head (unless ``info`` is given), parse, unwrap and verify commitments.

        ``data_keys`` may be passed to skip unwrapping when the caller already holds the keys for
        these exact wrapped blobs (the file system's key cache); they are still checked against
        both commitments.  Unwrapped keys and verified ciphers are cached in memory: a version
        whose header and data keys were already checked is not derived and checked again.
        """
        if info is None:
            info = self.store.head(key)
        try:
            env = envelope.parse(info.metadata)
        except IntegrityError as e:
            raise type(e)(f"{self.store.url}/{key}: {e}") from None
        if env.header.version == fmt.FORMAT_V2 and env.header.sparse:
            # the chunk map (at the body's end) says how many chunks are stored: the exact size is
            # checked when it is read; here only that the object can hold the last chunk and the map
            h = env.header
            least = (fmt.chunk_plain_len(fmt.chunk_count(h.plaintext_len, h.chunk_size) - 1, h.plaintext_len,
                                         h.chunk_size) + fmt.CHUNK_OVERHEAD
                     + envelope.sparse.sealed_map_bytes(fmt.chunk_count(h.plaintext_len, h.chunk_size)))
            if not least <= info.size <= fmt.body_size(h.plaintext_len, h.chunk_size) + least:
                raise IntegrityError(f"{self.store.url}/{key}: object is {info.size} bytes, impossible for a "
                                     f"sparse version of {h.plaintext_len} bytes (truncated or extended)")
        elif info.size != fmt.body_size(env.header.plaintext_len, env.header.chunk_size):
            raise IntegrityError(
                f"{self.store.url}/{key}: object is {info.size} bytes but its header says "
                f"{fmt.body_size(env.header.plaintext_len, env.header.chunk_size)} (truncated or extended)")
        if (data_keys is None or data_keys.object_key != key
                or data_keys.wrapped_inner.blob != env.wrapped_inner
                or data_keys.wrapped_outer.blob != env.wrapped_outer):
            data_keys = self._unwrap(key, env)
        cid = (env.header.pack(), bytes(data_keys.inner), bytes(data_keys.outer))
        cipher = self._cached(self._cipher_cache, cid)
        if cipher is None:
            try:
                cipher = envelope.ObjectCipher.open_version(env.header, data_keys.inner, data_keys.outer)
            except IntegrityError as e:
                raise IntegrityError(f"{self.store.url}/{key}: {e}") from None
            self._remember(self._cipher_cache, cid, cipher)
        return OpenObject(self, info, env, cipher, data_keys)

    # ---- writing --------------------------------------------------------------------------------

    def _store_write(self, key: str, meta: dict[str, str], call: Callable[[], str], *,
                     also: tuple[type[Exception], ...] = (),
                     condition: tuple[str | None, bool] | None = None,
                     again: Callable[[str], str] | None = None,
                     source: tuple[str, str] | None = None) -> str:
        """``call()``: one store request that stores a new version of ``key`` with metadata
        ``meta`` (a conditional put, a multipart completion, a copy); returns the new ETag.

        A refused condition is not yet a conflict: when the store (botocore, or the S3 store's
        own retries) retried a request whose first attempt was applied but whose reply was lost,
        the retry finds our own version in place and is refused.  So after PreconditionFailed
        (and the errors in ``also``) the key is read back (a transient failure of the read-back
        is retried for ``retry_budget`` seconds): if it holds exactly the envelope metadata sent
        here (its header carries a fresh random message id per version, the attribute blob a
        fresh nonce), the write took effect and its ETag is returned.

        A write that fails transiently (after every retry of the store) may have been applied
        all the same: its outcome is unknown.  Its envelope metadata is remembered, in memory
        only, with ``condition`` (the ``(if_match, if_none_match)`` it was sent with) and
        ``source`` (a copy's ``(key, ETag)``: the body it stores; None: a body of its own).  A
        later write of the key under the same condition that is refused and reads back one of
        those versions finds our own earlier write in its way, not another client's: it is sent
        again, ``again(etag)``, conditional on that version (for a copy, only if that version
        holds the same body).  Otherwise the original error is raised; when the read-back could
        not be made (the store keeps failing), its transient error is raised instead: the outcome
        is unknown, not a conflict (the file system keeps the data and stores it later, where a
        conflict would be saved as a conflict copy)."""
        first_condition = condition
        rounds = 0
        while True:
            try:
                etag = call()
            except (PreconditionFailed, *also) as e:
                if is_transient(e):
                    self._unknown_outcome(key, meta, first_condition, source, e)
                    raise
                try:
                    info = self._read_back(key)
                except StoreError as read_error:
                    self._unknown_outcome(key, meta, first_condition, source, read_error)
                    raise read_error from e
                if info is not None and _same_envelope(info.metadata, meta):
                    self._forget_unconfirmed(key)
                    log.info("event=write_confirmed object=%s/%s reason='the store refused a retried request "
                             "(%s) whose first attempt had stored this version'", self.store.url.rstrip("/"),
                             key, type(e).__name__)
                    return info.etag
                if (info is None or again is None or rounds >= MAX_REBASES or not isinstance(e, PreconditionFailed)
                        or not self._was_ours(key, info.metadata, first_condition, source)):
                    raise
                rounds += 1
                log.info("event=write_rebased object=%s/%s reason='the version in the way is an earlier write "
                         "of ours whose outcome was unknown (%s); sending this one on top of it'",
                         self.store.url.rstrip("/"), key, type(e).__name__)
                etag_in_the_way = info.etag
                call = lambda: again(etag_in_the_way)  # noqa: E731
                continue
            except StoreError as e:
                if is_transient(e):
                    self._unknown_outcome(key, meta, first_condition, source, e)
                raise
            self._forget_unconfirmed(key)
            return etag

    def _read_back(self, key: str) -> ObjectInfo | None:
        """The version ``key`` holds now, or None when there is none or it cannot be read for a
        lasting reason; a transient failure is retried with back-off until ``retry_budget``
        seconds have passed, then raised."""
        started = time.monotonic()
        attempt = 1
        while True:
            try:
                return self.store.head(key)
            except ObjectNotFound:
                return None
            except StoreError as e:
                if not is_transient(e):
                    return None
                left = self.retry_budget - (time.monotonic() - started)
                if left <= 0:
                    raise
                delay = min(left, retry_delay(attempt))
                attempt += 1
                log.info("event=read_back_retry object=%s/%s attempt=%d retry_in=%.1fs reason=%s",
                         self.store.url.rstrip("/"), key, attempt, delay, str(e).splitlines()[0] if str(e) else
                         type(e).__name__)
                time.sleep(delay)

    def _unknown_outcome(self, key: str, meta: dict[str, str], condition: tuple[str | None, bool] | None,
                         source: tuple[str, str] | None, err: BaseException) -> None:
        """Remember a write of ``key`` that failed transiently: it may have been applied."""
        log.info("event=write_outcome_unknown object=%s/%s reason=%s", self.store.url.rstrip("/"), key,
                 str(err).splitlines()[0] if str(err) else type(err).__name__)
        if condition is None or condition == (None, False):
            return  # without a known condition (never refused): never taken for ours later
        if_match, if_none_match = condition
        record = _Unconfirmed(_dsse(meta), _bare_etag(if_match), bool(if_none_match), source)
        with self._open_lock:
            records = self._unconfirmed.pop(key, [])
            records.append(record)
            self._unconfirmed[key] = records[-UNCONFIRMED_PER_KEY:]
            while len(self._unconfirmed) > UNCONFIRMED_KEYS:
                self._unconfirmed.popitem(last=False)

    def _forget_unconfirmed(self, key: str) -> None:
        """A write of ``key`` is stored: the earlier unknown outcomes no longer matter (a version
        overwritten does not come back)."""
        with self._open_lock:
            self._unconfirmed.pop(key, None)

    def _was_ours(self, key: str, stored: dict[str, str], condition: tuple[str | None, bool] | None,
                  source: tuple[str, str] | None) -> bool:
        """Whether ``stored`` (the metadata ``key`` holds) is a write of ours whose outcome was
        unknown, sent under ``condition`` as this one is, and (for a copy, ``source`` given)
        holding the same body this one copies."""
        if condition is None:
            return False
        found = _dsse(stored)
        if_match, if_none_match = _bare_etag(condition[0]), bool(condition[1])
        with self._open_lock:
            records = list(self._unconfirmed.get(key, ()))
        return any(r.dsse == found and r.if_match == if_match and r.if_none_match == if_none_match
                   and (source is None or r.source == source) for r in records)

    def write(self, key: str, source: Source, size: int, *, attrs: bytes | None = None,
              file_id: bytes | None = None, generation: int = 0, data_keys: DataKeys | None = None,
              if_match: str | None = None, if_none_match: bool = False, chunk_log2: int | None = None,
              progress: Progress | None = None, stored: Callable[[], Iterable[int]] | None = None
              ) -> OpenObject:
        """Encrypt ``size`` bytes from ``source`` as a new version of ``key`` and store it.

        Returns once the store has acknowledged the whole object (durable).  New versions are
        always format version 2 with fresh data keys (``data_keys`` is accepted for callers that
        hold the previous version's, and ignored: fresh keys cost no KMS call).  ``stored()``: the
        indexes of the chunks that may hold data; every other chunk is known to be zeros without
        reading it (never written).  When some chunk is left out, the version is sparse and
        stores only the others (the source is never asked for a hole)."""
        data_keys = self.new_data_keys(key)
        log2 = chunk_log2 or self.chunk_log2
        chunk_map = None
        if stored is not None:
            chunk_map = envelope.ChunkMap.from_stored(size, 1 << log2, stored())
            if not chunk_map.sparse:
                chunk_map = None
        cipher = envelope.ObjectCipher.new_version(
            data_keys.inner, data_keys.outer, plaintext_len=size,
            file_id=file_id if file_id is not None else os.urandom(fmt.FILE_ID_BYTES),
            generation=generation, chunk_log2=log2, with_attrs=attrs is not None, sparse=chunk_map is not None)
        if chunk_map is None:
            chunk_map = envelope.ChunkMap(None, size, 1 << log2)
        self._remember_keys(data_keys)
        self._remember_cipher(cipher, data_keys)
        env = self._envelope(cipher, data_keys, attrs)
        meta = env.to_metadata()
        indexes = list(chunk_map.stored_indexes())
        sealed_map = cipher.seal_map(chunk_map) if cipher.sparse else b""
        body_size = chunk_map.body_size()
        if progress and cipher.sparse:
            progress(size - sum(cipher.chunk_plain_len(i) for i in indexes))  # holes: done at once
        held = self._single_request(body_size)
        if held is not None:
            try:
                body = self._seal_chunks(cipher, indexes, source, progress, parallel=True, tail=sealed_map)
                etag = self._store_write(
                    key, meta, lambda: self.store.put(key, body, meta, if_match=if_match, if_none_match=if_none_match),
                    condition=(if_match, if_none_match),
                    again=lambda etag: self.store.put(key, body, meta, if_match=etag))
            finally:
                self.single_puts.give(held)
        else:
            etag = self._write_multipart(key, cipher, indexes, sealed_map, body_size, source, meta, if_match,
                                         if_none_match, progress)
        # the stored version, opened: no HEAD, parse or key derivation needed to use it
        return OpenObject(self, ObjectInfo(key, body_size, etag, time.time(), meta), env, cipher, data_keys,
                          chunk_map)

    def _single_request(self, body_size: int) -> int | None:
        """How a body of ``body_size`` bytes is sent: None as a multipart upload, else with one
        request holding that many bytes of ``single_puts`` (0 for a body of up to a part)."""
        if body_size > self.multipart_threshold:
            return None
        if body_size <= self.part_size:
            return 0
        return body_size if self.single_puts.take(body_size) else None

    def _envelope(self, cipher: envelope.ObjectCipher, keys: DataKeys, attrs: bytes | None) -> Envelope:
        if cipher.header.version == fmt.FORMAT_V2:
            return Envelope(header=cipher.header, provider="", key_id_inner="", key_id_outer="",
                            wrapped_inner=keys.wrapped_inner.blob, wrapped_outer=keys.wrapped_outer.blob,
                            attrs=None if attrs is None else cipher.seal_attrs(attrs),
                            epoch=self._epoch_ref(keys))
        return Envelope(header=cipher.header, provider=keys.provider,
                        key_id_inner=keys.wrapped_inner.key_id, key_id_outer=keys.wrapped_outer.key_id,
                        wrapped_inner=keys.wrapped_inner.blob, wrapped_outer=keys.wrapped_outer.blob,
                        attrs=None if attrs is None else cipher.seal_attrs(attrs))

    @staticmethod
    def _epoch_ref(keys: DataKeys) -> EpochRef:
        return EpochRef(keys.epoch.epoch_id, EpochRef.depth_of(keys.epoch.prefix))

    def _seal_chunks(self, cipher: envelope.ObjectCipher, chunks: list[int], source: Source,
                     progress: Progress | None, parallel: bool = False, buf: bytearray | None = None,
                     tail: bytes = b"") -> bytearray | memoryview:
        """The sealed body bytes of ``chunks`` (ascending; consecutive in the body) followed by
        ``tail``: a new bytearray, or a view of ``buf`` when it is given and large enough
        (multipart uploads reuse their part buffers)."""
        offsets = []
        length = 0
        for i in chunks:
            offsets.append(length)
            length += cipher.chunk_plain_len(i) + fmt.CHUNK_OVERHEAD
        total = length + len(tail)
        if buf is not None and len(buf) >= total:
            out = memoryview(buf)[:total]
        else:
            out = bytearray(total)
        view = memoryview(out)
        view[length:] = tail

        def seal(k: int) -> None:
            i, off = chunks[k], offsets[k]
            n = cipher.chunk_plain_len(i)
            plain = source(i * cipher.chunk_size, n)
            try:
                cipher.seal_chunk_into(i, plain, view[off:off + n + fmt.CHUNK_OVERHEAD])
            finally:
                if isinstance(plain, memoryview):
                    plain.release()  # the source may hand out views of buffers it resizes later
            if progress:
                progress(n)

        if parallel and len(chunks) > 1:
            list(self.pool.map(seal, range(len(chunks))))
        else:
            for k in range(len(chunks)):
                seal(k)
        return out

    def _write_multipart(self, key, cipher, stored, sealed_map, body_size, source, meta, if_match, if_none_match,
                         progress) -> str:
        per_part = max(1, -(-self.part_size // cipher.chunk_size))
        runs = [stored[s:s + per_part] for s in range(0, len(stored), per_part)]
        sent = itertools.count()

        def upload_all(if_match: str | None, if_none_match: bool) -> str:
            """One multipart upload of the whole body (sealed again from ``source``), conditional
            as given; progress is reported by the first only."""
            report = progress if next(sent) == 0 else None
            # the first parts are sealed while the upload is being created (one round trip)
            begun = self.pool.submit(self.store.begin_upload, key, meta, if_match=if_match,
                                     if_none_match=if_none_match, size_hint=body_size)
            sem = threading.BoundedSemaphore(self.workers)
            spare: list[bytearray] = []  # part buffers whose upload returned: sealed into again

            def part(number: int, run: list[int]) -> None:
                try:
                    try:
                        buf = spare.pop()
                    except IndexError:
                        buf = None
                    body = self._seal_chunks(cipher, run, source, report, buf=buf,
                                             tail=sealed_map if number == len(runs) else b"")
                    begun.result().put_part(number, body)
                    spare.append(body.obj if isinstance(body, memoryview) else body)
                finally:
                    sem.release()

            futures = []
            try:
                for number, run in enumerate(runs, start=1):
                    sem.acquire()
                    if any(f.done() and f.exception() for f in futures):
                        sem.release()
                        break
                    futures.append(self.pool.submit(part, number, run))
                for f in futures:
                    f.result()
                return begun.result().complete()
            except BaseException:
                for f in futures:
                    f.cancel()
                cf.wait(futures)
                if not begun.cancel():
                    cf.wait([begun])
                    if begun.exception() is None:
                        begun.result().abort()
                raise

        # a completion whose reply was lost may be answered NoSuchUpload when retried
        return self._store_write(key, meta, lambda: upload_all(if_match, if_none_match), also=(StoreError,),
                                 condition=(if_match, if_none_match), again=lambda etag: upload_all(etag, False))

    # ---- metadata-only operations ---------------------------------------------------------------

    def set_attrs(self, obj: OpenObject, attrs: bytes | None) -> str:
        """Replace the attribute blob (fresh nonce) with a self-copy pinned to the opened ETag."""
        return self.update_attrs(obj, attrs).etag

    def update_attrs(self, obj: OpenObject, attrs: bytes | None) -> OpenObject:
        """:meth:`set_attrs`, returning the new version opened (header, keys and cipher are those
        of ``obj``: no HEAD, no unwrap, no derivation).  Version 2: the new header has the next
        generation and the attribute flag (commitments recomputed, body untouched)."""
        if obj.envelope.version == fmt.FORMAT_V2:
            cipher = obj.cipher.successor(generation=obj.generation + 1, with_attrs=attrs is not None)
            env = dataclasses.replace(obj.envelope, header=cipher.header,
                                      attrs=None if attrs is None else cipher.seal_attrs(attrs))
            meta = env.to_metadata()
            etag = self._self_copy(obj, meta)
            self._remember_cipher(cipher, obj.data_keys)
            info = ObjectInfo(obj.key, obj.info.size, etag, time.time(), meta)
            return OpenObject(self, info, env, cipher, obj.data_keys, obj._map)  # same body
        env = Envelope(header=obj.envelope.header, provider=obj.envelope.provider,
                       key_id_inner=obj.envelope.key_id_inner, key_id_outer=obj.envelope.key_id_outer,
                       wrapped_inner=obj.envelope.wrapped_inner, wrapped_outer=obj.envelope.wrapped_outer,
                       attrs=None if attrs is None else obj.cipher.seal_attrs(attrs))
        meta = env.to_metadata()
        etag = self._self_copy(obj, meta)
        info = ObjectInfo(obj.key, obj.info.size, etag, time.time(), meta)
        return OpenObject(self, info, env, obj.cipher, obj.data_keys, obj._map)

    def _self_copy(self, obj: OpenObject, meta: dict[str, str]) -> str:
        """Replace the metadata of ``obj``'s version with ``meta`` (a server-side self-copy
        conditional on its ETag; the body stays); returns the new ETag."""
        return self._store_write(obj.key, meta, lambda: self.store.copy(obj.key, obj.key, meta, if_match=obj.etag),
                                 condition=(obj.etag, False), source=(obj.key, _bare_etag(obj.etag)),
                                 again=lambda etag: self.store.copy(obj.key, obj.key, meta, if_match=etag))

    def _rewrapped(self, obj: OpenObject, dst: str, key_id_inner: str | None = None,
                   key_id_outer: str | None = None) -> Envelope:
        env = obj.envelope
        provider = self._provider_for(obj.key, env.provider)
        w_in = provider.rewrap(Layer.INNER, WrappedKey(env.wrapped_inner, env.key_id_inner),
                                self._ctx(Layer.INNER, obj.key), self._ctx(Layer.INNER, dst), key_id_inner)
        w_out = provider.rewrap(Layer.OUTER, WrappedKey(env.wrapped_outer, env.key_id_outer),
                                 self._ctx(Layer.OUTER, obj.key), self._ctx(Layer.OUTER, dst), key_id_outer)
        return Envelope(header=env.header, provider=provider.kind, key_id_inner=w_in.key_id,
                        key_id_outer=w_out.key_id, wrapped_inner=w_in.blob, wrapped_outer=w_out.blob,
                        attrs=env.attrs)

    def rename(self, obj: OpenObject, dst: str, *, dst_if_match: str | None = None,
               dst_if_none_match: bool = False, delete_source: bool = True) -> str:
        """Move an object to ``dst`` without touching its body: both data keys are re-wrapped for
        the new object key (version 2: locally, under the current epoch of ``dst``'s prefix; no
        KMS call), the body is copied server-side with the new metadata, and the source is
        deleted.  Returns the new ETag."""
        if is_reserved_key(dst):
            raise ConfigError(f"{self.store.url}/{dst}: '.dssefs' is reserved for dssefs's own "
                              "records in every directory: choose another name")
        if obj.envelope.version == fmt.FORMAT_V2:
            epoch = self.epochs.for_writing(self.epoch_prefix_for(dst))
            keys = self._wrap_under(epoch, dst, obj.data_keys.inner, obj.data_keys.outer)
            env = dataclasses.replace(obj.envelope, wrapped_inner=keys.wrapped_inner.blob,
                                      wrapped_outer=keys.wrapped_outer.blob, epoch=self._epoch_ref(keys))
        else:
            env = self._rewrapped(obj, dst)
        meta = env.to_metadata()
        etag = self._store_write(
            dst, meta, lambda: self.store.copy(obj.key, dst, meta, if_match=dst_if_match,
                                               if_none_match=dst_if_none_match),
            condition=(dst_if_match, dst_if_none_match), source=(obj.key, _bare_etag(obj.etag)),
            again=lambda etag: self.store.copy(obj.key, dst, meta, if_match=etag))
        if delete_source and dst != obj.key:
            self.store.delete(obj.key)
        return etag

    def save_conflict_copy(self, key: str, meta: dict[str, str], body: bytes, store: ObjectStore) -> str:
        """Store a version of ``key`` that lost its condition (found by a background upload)
        under ``NAME.dssefs-conflict-<UTC time>`` in ``store``, the body untouched and both data
        keys re-wrapped for the new name (as a rename does); returns the new key."""
        env = envelope.parse(meta)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        base = key[:-1] if key.endswith("/") else key
        parent, _, name = base.rpartition("/")
        for n in range(100):
            dst = (parent + "/" if parent else "") + conflict_name(name, stamp, n)
            if env.version == fmt.FORMAT_V2:
                dk = self._unwrap_v2(key, env)
                keys = self._wrap_under(self.epochs.for_writing(self.epoch_prefix_for(dst)), dst, dk.inner, dk.outer)
                new = dataclasses.replace(env, wrapped_inner=keys.wrapped_inner.blob,
                                          wrapped_outer=keys.wrapped_outer.blob, epoch=self._epoch_ref(keys))
            else:  # version 1 (not written any more, but its self-copies may be pending): KMS re-wrap
                new = self._rewrapped(types.SimpleNamespace(envelope=env, key=key), dst)
            try:
                store.put(dst, body, new.to_metadata(), if_none_match=True)
                return dst
            except PreconditionFailed:
                continue  # that name is taken: the next one
        raise PreconditionFailed(f"{self.store.url}/{key}: no free name for a conflict copy")

    def upgrade(self, obj: OpenObject, progress: Progress | None = None) -> OpenObject:
        """Rewrite a version 1 object as version 2 (same file id, next generation, same
        attributes), conditional on the ETag it replaces.  Plaintext is read chunk by chunk from
        the old version as the new one is sealed: nothing reaches local disk."""
        return self.write(obj.key, lambda off, n: obj.read(off, n), obj.size, attrs=obj.attrs(),
                          file_id=obj.file_id, generation=obj.generation + 1, if_match=obj.etag,
                          chunk_log2=obj.header.chunk_log2, progress=progress)

    def rekey(self, key: str, *, key_id_inner: str | None = None, key_id_outer: str | None = None) -> str:
        """Version 1: re-wrap both data keys under new master keys (body untouched); returns the
        new ETag.  Version 2 objects are re-keyed through their epoch records
        (:meth:`Epochs.rewrap`), never one by one."""
        obj = self.open(key)
        if obj.envelope.version == fmt.FORMAT_V2:
            raise ValueError("version 2 objects are re-keyed through their epoch records")
        env = self._rewrapped(obj, key, key_id_inner or self.keys.key_id(Layer.INNER),
                              key_id_outer or self.keys.key_id(Layer.OUTER))
        try:
            return self._self_copy(obj, env.to_metadata())
        except PreconditionFailed:
            raise PreconditionFailed(f"{self.store.url}/{key}: changed while re-keying; run rekey again") from None

    def describe(self, key: str, info: ObjectInfo | None = None) -> dict:
        return describe(self.store, key, info)


def conflict_name(name: str, stamp: str, n: int = 0, limit: int = 255) -> str:
    """``NAME.dssefs-conflict-STAMP[-n]``, with NAME shortened (whole UTF-8 characters) so the
    result stays within ``limit`` bytes (a file system's NAME_MAX)."""
    suffix = f".dssefs-conflict-{stamp}" + (f"-{n}" if n else "")
    room = limit - len(suffix.encode())
    raw = name.encode()
    if len(raw) > room:
        name = raw[:room].decode("utf-8", "ignore")
    return name + suffix


def _dsse(meta: dict[str, str]) -> frozenset:
    """The envelope entries (``dsse-``) of object metadata: header, wrapped keys, epoch or
    wrapping descriptor, attributes; no plaintext."""
    return frozenset((k.lower(), v) for k, v in meta.items() if k.lower().startswith("dsse-"))


def _same_envelope(stored: dict[str, str], sent: dict[str, str]) -> bool:
    """Whether the stored metadata is exactly the envelope that was sent (every ``dsse-`` entry:
    header, wrapped keys, epoch or wrapping descriptor, attributes)."""
    mine = _dsse(sent)
    return bool(mine) and _dsse(stored) == mine


@dataclasses.dataclass(frozen=True)
class _Unconfirmed:
    """A write whose outcome is unknown: the envelope entries it sent (metadata that is stored in
    the object anyway: wrapped keys, header, sealed attributes), the condition it was sent with
    (``if_match`` without quotes) and, for a copy, the ``(key, ETag)`` whose body it stores."""

    dsse: frozenset
    if_match: str | None
    if_none_match: bool
    source: tuple[str, str] | None


def _bare_etag(etag: str | None) -> str | None:
    return None if etag is None else etag.strip().strip('"')


def describe(object_store: ObjectStore, key: str, info: ObjectInfo | None = None) -> dict:
    """Everything about an object that is not secret (for ``dssefs inspect``); needs no keys.
    Version 2: the provider and key ids come from the epoch record (one more read, no KMS)."""
    info = info or object_store.head(key)
    env = envelope.parse(info.metadata)
    h = env.header
    out = {
        "key": key, "store": object_store.url, "etag": info.etag, "object_size": info.size,
        "format_version": h.version, "suite": f"0x{h.suite:04x}",
        "plaintext_size": h.plaintext_len, "chunk_size": h.chunk_size,
        "chunks": fmt.chunk_count(h.plaintext_len, h.chunk_size),
        "expected_object_size": (None if h.version == fmt.FORMAT_V2 and h.sparse  # known from the map
                                 else fmt.body_size(h.plaintext_len, h.chunk_size)),
        "sparse": h.version == fmt.FORMAT_V2 and h.sparse,
        "generation": h.generation, "file_id": h.file_id.hex(), "message_id": h.msg_id.hex(),
        "key_provider": env.provider, "key_id_inner": env.key_id_inner,
        "key_id_outer": env.key_id_outer, "wrapped_key_bytes": [len(env.wrapped_inner), len(env.wrapped_outer)],
        "has_attributes": env.attrs is not None, "metadata_bytes": metadata_size(info.metadata),
    }
    if env.version == fmt.FORMAT_V2:
        prefix = env.epoch.prefix_of(key)
        record, _ = fetch_record(object_store, prefix, env.epoch.epoch_id)
        out.update(epoch_id=env.epoch.hex, epoch_prefix=prefix,
                   epoch_record=record_key(prefix, env.epoch.epoch_id),
                   epoch_created=record.created, key_provider=record.provider,
                   key_id_inner=record.key_id_inner, key_id_outer=record.key_id_outer,
                   wrapped_epoch_key_bytes=[len(record.wrapped_inner), len(record.wrapped_outer)])
    return out
