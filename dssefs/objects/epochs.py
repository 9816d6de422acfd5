"""Epoch keys (format version 2): KMS calls per epoch, not per object.

Each layer has an epoch key, a 32-byte key from its own ``GenerateDataKey`` (or keyring wrap)
with a context binding bucket, prefix, layer and epoch id.  Per-object data keys are random and
wrapped locally under the epoch keys (:mod:`dssefs.envelope.keywrap`), so writing or opening an
object needs no KMS call once its epoch is known.  The wrapped epoch keys live in an epoch record
(:mod:`dssefs.envelope.epoch`) that every object of the epoch names.

:class:`Epochs` owns, in memory only, the unwrapped epoch keys of one process: the current epoch
per prefix for writing (a new one after ``max_age`` seconds or ``max_objects`` objects, and for
each new process) and every epoch read so far.  Concurrent openers of one epoch wait for a single
fetch and unwrap.  Nothing here is ever written anywhere but the record (which holds only
wrapped keys).
"""

from __future__ import annotations

import collections
import datetime as _dt
import os
import threading
import time
from typing import Callable

from ..envelope import format as fmt
from ..envelope.epoch import EPOCH_DIR, MAX_RECORD_BYTES, EpochRecord, record_epoch_id, record_key
from ..errors import IntegrityError, ObjectNotFound, PreconditionFailed
from ..kms.base import KeyProvider, Layer, WrappedKey, epoch_context
from ..store.base import ObjectStore

DEFAULT_MAX_AGE = 86400.0  # seconds: one day
DEFAULT_MAX_OBJECTS = 1_000_000
READ_CACHE_ENTRIES = 4096
WARM_RECORDS_MAX = 1000  # one listing page: more records than that are not looked through


class Epoch:
    """One epoch's record and its two unwrapped keys.  Never printed, pickled or written."""

    __slots__ = ("record", "key_inner", "key_outer", "started", "objects")

    def __init__(self, record: EpochRecord, key_inner: bytes, key_outer: bytes, started: float | None = None):
        self.record, self.key_inner, self.key_outer = record, key_inner, key_outer
        self.started = time.monotonic() if started is None else started
        self.objects = 0

    @property
    def epoch_id(self) -> bytes:
        return self.record.epoch_id

    @property
    def prefix(self) -> str:
        return self.record.prefix

    def key(self, layer: Layer) -> bytes:
        return self.key_inner if Layer(layer) is Layer.INNER else self.key_outer

    def __repr__(self) -> str:
        return f"Epoch({self.record.prefix!r}, {self.record.hex[:8]}, <keys redacted>)"

    def __reduce__(self):
        raise TypeError("Epoch holds keys and cannot be pickled")


class Epochs:
    def __init__(self, store: ObjectStore, writer: KeyProvider,
                 provider_for: Callable[[str], KeyProvider],
                 per_layer: Callable[[KeyProvider, Callable], tuple], *,
                 max_age: float = DEFAULT_MAX_AGE, max_objects: int = DEFAULT_MAX_OBJECTS):
        if not max_age > 0 or max_objects < 1:
            raise ValueError("epoch limits must be positive")
        self.store, self.writer = store, writer
        self.provider_for, self.per_layer = provider_for, per_layer
        self.max_age, self.max_objects = float(max_age), int(max_objects)
        self._lock = threading.Lock()
        self._current: dict[str, Epoch] = {}  # prefix -> epoch new objects are wrapped under
        self._write_locks: dict[str, threading.Lock] = collections.defaultdict(threading.Lock)
        self._known: collections.OrderedDict[tuple[str, bytes], Epoch] = collections.OrderedDict()
        self._loading: dict[tuple[str, bytes], threading.Lock] = {}
        self._prepared: dict[str, Epoch] = {}  # prefix -> keys generated ahead, record not stored yet

    @property
    def bucket(self) -> str:
        return self.store.context_name

    def _ctx(self, layer: Layer, prefix: str, epoch_id: bytes) -> dict[str, str]:
        return epoch_context(layer, self.bucket, prefix, epoch_id.hex())

    # ---- writing --------------------------------------------------------------------------------

    def for_writing(self, prefix: str) -> Epoch:
        """The epoch a new object under ``prefix`` is wrapped in, counted as one more object;
        starts (and stores the record of) a new one when there is none yet or it is too old or
        full.  Its record is in the store before this returns."""
        with self._write_locks[prefix]:
            with self._lock:
                ep = self._current.get(prefix)
                if ep is not None and self._fresh(ep):
                    ep.objects += 1
                    return ep
            ep = self._start(prefix)
            with self._lock:
                ep.objects += 1
                self._current[prefix] = ep
                self._remember(ep)
            return ep

    def prepare(self, prefix: str) -> None:
        """Generate the keys of the next epoch under ``prefix`` ahead of its first object (the
        KMS requests of a mount's first write, made while it starts).  Its record is stored only
        when the first object is written: a mount that writes nothing leaves nothing behind.
        Unused keys expire like an epoch (``max_age``, counted from here)."""
        with self._write_locks[prefix]:
            with self._lock:
                if prefix in self._prepared or (prefix in self._current and self._fresh(self._current[prefix])):
                    return
            ep = self._generate(prefix)
            with self._lock:
                self._prepared[prefix] = ep

    def _fresh(self, ep: Epoch) -> bool:
        return ep.objects < self.max_objects and time.monotonic() - ep.started < self.max_age

    def _start(self, prefix: str) -> Epoch:
        with self._lock:
            ep = self._prepared.pop(prefix, None)
        if ep is None or not self._fresh(ep):
            ep = self._generate(prefix)
        record = ep.record
        try:
            self.store.put(record_key(prefix, record.epoch_id), record.encode(), {}, if_none_match=True)
        except PreconditionFailed:
            # under a fresh random id, a refusal can only be a retry whose first attempt was
            # stored (its reply lost): it is ours exactly when the stored record is what we sent
            stored, _ = self.fetch_record(prefix, record.epoch_id)
            if stored != record:
                raise
        except Exception:
            with self._lock:  # the next write tries to store it again, without asking KMS again
                self._prepared.setdefault(prefix, ep)
            raise
        return ep

    def _generate(self, prefix: str) -> Epoch:
        """A new epoch's keys (one KMS request per layer) and record, not stored yet."""
        started = time.monotonic()
        epoch_id = os.urandom(fmt.EPOCH_ID_BYTES)
        provider = self.writer
        (k_in, w_in), (k_out, w_out) = self.per_layer(
            provider, lambda layer: provider.generate(layer, self._ctx(layer, prefix, epoch_id)))
        if k_in == k_out:  # never from a working provider; refuse rather than weaken the layers
            raise IntegrityError("the key provider returned the same epoch key for both layers")
        record = EpochRecord(epoch_id=epoch_id, bucket=self.bucket, prefix=prefix,
                             provider=provider.kind, key_id_inner=w_in.key_id,
                             key_id_outer=w_out.key_id, wrapped_inner=w_in.blob,
                             wrapped_outer=w_out.blob, created=_utc_now())
        return Epoch(record, k_in, k_out, started)

    # ---- reading --------------------------------------------------------------------------------

    def for_reading(self, prefix: str, epoch_id: bytes) -> Epoch:
        """The epoch ``epoch_id`` under ``prefix``: from memory, or fetched and unwrapped once
        (concurrent callers wait for that one fetch)."""
        k = (prefix, bytes(epoch_id))
        with self._lock:
            ep = self._known.get(k)
            if ep is not None:
                self._known.move_to_end(k)
                return ep
            gate = self._loading.setdefault(k, threading.Lock())
        with gate:
            with self._lock:
                ep = self._known.get(k)
                if ep is not None:
                    return ep
            try:
                ep = self._load(prefix, bytes(epoch_id))
            finally:
                with self._lock:
                    self._loading.pop(k, None)
            with self._lock:
                self._remember(ep)
            return ep

    def warm(self, prefix: str) -> bytes | None:
        """Fetch and unwrap the newest epoch record under ``prefix`` ahead of its first reader
        (one listing, one GET, one KMS request per layer; made while a mount starts): objects
        written by the last writer are then opened without waiting for the store or KMS.
        Returns the epoch id loaded, or None when there is no record, or more than
        WARM_RECORDS_MAX (the newest would need more than one listing page)."""
        newest = None
        records = prefix + EPOCH_DIR
        for n, item in enumerate(self.store.list(records, delimiter="/")):
            if n >= WARM_RECORDS_MAX:
                return None
            epoch_id = None if isinstance(item, str) else record_epoch_id(item.key[len(records):])
            if epoch_id is not None and (newest is None or item.mtime > newest[0]):
                newest = (item.mtime, epoch_id)
        if newest is None:
            return None
        self.for_reading(prefix, newest[1])
        return newest[1]

    def _remember(self, ep: Epoch) -> None:
        k = (ep.prefix, ep.epoch_id)
        self._known[k] = ep
        self._known.move_to_end(k)
        while len(self._known) > READ_CACHE_ENTRIES:
            self._known.popitem(last=False)

    def fetch_record(self, prefix: str, epoch_id: bytes) -> tuple[EpochRecord, str]:
        return fetch_record(self.store, prefix, epoch_id)

    def _load(self, prefix: str, epoch_id: bytes) -> Epoch:
        record, _etag = self.fetch_record(prefix, epoch_id)
        provider = self.provider_for(record.provider)
        wrapped = {Layer.INNER: WrappedKey(record.wrapped_inner, record.key_id_inner),
                   Layer.OUTER: WrappedKey(record.wrapped_outer, record.key_id_outer)}
        k_in, k_out = self.per_layer(
            provider, lambda layer: provider.unwrap(layer, wrapped[layer],
                                                    self._ctx(layer, prefix, epoch_id)))
        return Epoch(record, k_in, k_out)

    # ---- re-keying ------------------------------------------------------------------------------

    def rewrap(self, prefix: str, epoch_id: bytes, key_id_inner: str, key_id_outer: str) -> bool:
        """Re-wrap one epoch record's keys under other master keys (KMS ReEncrypt: the epoch
        keys never leave KMS) and store it conditionally on the ETag read.  Returns False when
        the record already uses those keys."""
        record, etag = self.fetch_record(prefix, epoch_id)
        provider = self.provider_for(record.provider)
        if provider is not self.writer:
            raise ValueError("re-keying moves epochs to the configured provider's keys only")
        wrapped = {Layer.INNER: WrappedKey(record.wrapped_inner, record.key_id_inner),
                   Layer.OUTER: WrappedKey(record.wrapped_outer, record.key_id_outer)}
        dest = {Layer.INNER: key_id_inner, Layer.OUTER: key_id_outer}
        if record.key_id_inner == key_id_inner and record.key_id_outer == key_id_outer:
            return False
        ctx = {layer: self._ctx(layer, prefix, epoch_id) for layer in Layer}
        w_in, w_out = self.per_layer(
            provider, lambda layer: provider.rewrap(layer, wrapped[layer], ctx[layer], ctx[layer],
                                                    dest[layer]))
        new = EpochRecord(epoch_id=epoch_id, bucket=self.bucket, prefix=prefix,
                          provider=record.provider, key_id_inner=w_in.key_id,
                          key_id_outer=w_out.key_id, wrapped_inner=w_in.blob,
                          wrapped_outer=w_out.blob, created=record.created)
        try:
            self.store.put(record_key(prefix, epoch_id), new.encode(), {}, if_match=etag)
        except PreconditionFailed:
            raise PreconditionFailed(f"{self.store.url}/{record_key(prefix, epoch_id)}: changed "
                                     "while re-keying; run rekey again") from None
        with self._lock:
            self._known.pop((prefix, epoch_id), None)
            self._current.pop(prefix, None)
        return True


def fetch_record(store: ObjectStore, prefix: str, epoch_id: bytes) -> tuple[EpochRecord, str]:
    """The parsed record of ``epoch_id`` under ``prefix`` and its ETag (no keys unwrapped): one
    HEAD that returns the small body with it."""
    rk = record_key(prefix, epoch_id)
    try:
        info = store.head(rk, prefix=MAX_RECORD_BYTES)
    except ObjectNotFound:
        raise IntegrityError(
            f"{store.url}/{rk}: the epoch record this object needs is missing; without it "
            "the object cannot be decrypted: restore the .dssefs/ objects from a backup or an "
            "earlier S3 version") from None
    data = info.prefix or b""
    if len(data) != info.size:
        raise IntegrityError(f"{store.url}/{rk}: {info.size} bytes is not an epoch record")
    try:
        record = EpochRecord.parse(data, bucket=store.context_name, prefix=prefix, epoch_id=epoch_id)
    except IntegrityError as e:
        raise type(e)(f"{store.url}/{rk}: {e}") from None
    return record, info.etag


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
