"""Directory-rename intents: a sealed record of a rename in progress, so that an interrupted one
can be finished (rolled forward) by whoever holds the keys.

A directory rename moves every object below ``src`` to ``dst`` one by one (server-side copy with
re-wrapped keys, then delete of the source).  Before the first copy, the record of the rename is
stored at ``P + ".dssefs/renames/" + hex(id)`` (``P``: the prefix of the mount, ``""`` or ending
in ``/``) with ``If-None-Match``; it is deleted after the last source is.  It names ``src``,
``dst`` and every object to move with the exact version that was there (its header and sealed
attributes, or the ETag and size of an object not written by dssefs).

Finishing one entry (:meth:`Renames.settle`) moves only that version, and deletes a source only
once the object under the new name is verifiably its copy: a dssefs object with the same header
and attributes that opens under its new name.  Anything else (the source changed, or another
object under the new name) is a conflict: both objects are kept and it is logged.

The record is sealed like an object: two fresh 32-byte data keys wrapped under the current epoch
keys of ``P`` (one per layer, :mod:`dssefs.envelope.keywrap`, with a context naming the record's
key and its purpose), the payload encrypted with AES-256-GCM under each in turn (the inner layer
with ``cryptography``, the outer with ``pycryptodome``), the cleartext fields as additional data.
Only holders of the master keys can write a record that opens, and a record opens only under the
name it was written to.

No FUSE here: the file system (and any command) drives these blocking, thread-safe calls.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import re
import socket
import time
import zlib
from typing import Iterable

from ..envelope import format as fmt
from ..envelope.epoch import EPOCH_DIR, RESERVED_NAME, check_prefix, is_reserved_key
from ..envelope.inner import InnerAEAD
from ..envelope.keywrap import unwrap_data_key, wrap_data_key
from ..envelope.metadata import KEY_ATTRS, KEY_HEADER
from ..envelope.outer import OuterAEAD
from ..errors import (DssefsError, IntegrityError, NotDssefsObject, ObjectNotFound, PreconditionFailed,
                      UnsupportedFormat)
from ..kms.base import Layer, object_context_v2
from ..store.base import ObjectInfo

log = logging.getLogger("dssefs.objects.renames")

INTENT_DIR = RESERVED_NAME + "/renames/"
RECORD_FORMAT = "dssefs-rename"
RECORD_VERSION = 1
ID_BYTES = 16
MAX_RECORD_BYTES = 64 * 1024 * 1024  # stored (compressed) record
MAX_PAYLOAD_BYTES = 256 * 1024 * 1024  # its payload, decompressed
#: seconds between refreshes of the record of a rename that is running
HEARTBEAT = 60.0
#: a record not refreshed for this long belongs to a rename that is no longer running
STALE_AFTER = 600.0

_KEY_RE = re.compile(r"^(|.*/)" + re.escape(INTENT_DIR) + r"([0-9a-f]{32})$")
_FIELDS = {"format", "version", "id", "bucket", "prefix", "epoch", "inner", "outer", "sealed"}
_PAYLOAD = {"src", "dst", "owner", "created", "objects"}
_VERSION_RE = re.compile(r"^(v:[0-9a-f]{64}|f:[^\s:]{1,200}:[0-9]{1,20})$")

# what one entry came to (Renames.move / settle)
MOVED = "moved"  # copied now, source deleted
DONE = "done"  # its copy was there already: source deleted
GONE = "gone"  # no source left (moved before, or deleted by another client)
CHANGED = "changed"  # the source is not the recorded version any more: left in place
CONFLICT = "conflict"  # another object is under the new name: both kept
OUTCOMES = (MOVED, DONE, GONE, CHANGED, CONFLICT)


def default_owner() -> str:
    """Who runs a rename, when the caller does not say (host and process)."""
    return f"{socket.gethostname()}:pid{os.getpid()}"


def intent_key(prefix: str, intent_id: bytes) -> str:
    check_prefix(prefix)
    return prefix + INTENT_DIR + intent_id.hex()


def parse_intent_key(key: str) -> tuple[str, bytes] | None:
    """``(prefix, id)`` of an intent record's key, or None for any other key."""
    m = _KEY_RE.fullmatch(key)
    if m is None or is_reserved_key(m.group(1)):
        return None
    return m.group(1), bytes.fromhex(m.group(2))


def is_epoch_record(key: str) -> bool:
    """Whether ``key`` is an epoch record (``.../.dssefs/epochs/ID``)."""
    return ("/" + EPOCH_DIR) in ("/" + key)


def version_of(info: ObjectInfo) -> str:
    """The identity of one stored version: its header and sealed attributes for a dssefs object
    (a rename keeps both; every new version has a fresh message id, every attribute change a new
    blob), its ETag and size for any other object."""
    meta = {k.lower(): v for k, v in info.metadata.items()}
    header = meta.get(KEY_HEADER)
    if header is None:
        etag = info.etag.strip('"')
        return f"f:{etag}:{info.size}"
    digest = hashlib.sha256(f"{header};{meta.get(KEY_ATTRS, '')}".encode("ascii", "replace"))
    return "v:" + digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class Entry:
    rel: str  # the object's key below src (and below dst)
    version: str  # :func:`version_of` the source when the rename began

    @property
    def foreign(self) -> bool:
        return self.version.startswith("f:")


@dataclasses.dataclass(frozen=True)
class RenameIntent:
    intent_id: bytes
    prefix: str
    src: str
    dst: str
    owner: str
    created: str
    entries: tuple[Entry, ...]

    @property
    def key(self) -> str:
        return intent_key(self.prefix, self.intent_id)

    def touches(self, keys: Iterable[str]) -> bool:
        """Whether any of ``keys`` (object keys or directory prefixes) is, contains or lies in
        ``src`` or ``dst``."""
        return any(_nested(k, d) for k in keys for d in (self.src, self.dst))

    def payload(self) -> bytes:
        doc = {"src": self.src, "dst": self.dst, "owner": self.owner, "created": self.created,
               "objects": [[e.rel, e.version] for e in self.entries]}
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text, what: str) -> bytes:
    if not isinstance(text, str) or not re.fullmatch(r"[A-Za-z0-9_-]*", text) or len(text) % 4 == 1:
        raise IntegrityError(f"rename record: {what} is not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _aad(head: dict) -> bytes:
    fields = {k: head[k] for k in ("format", "version", "id", "bucket", "prefix", "epoch")}
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return b"\x01" + text.encode("ascii")


def _wrap_ctx(layer: Layer, bucket: str, key: str, epoch_hex: str) -> dict[str, str]:
    """Wrapping context of a record's data key: an object's version 2 context naming the record's
    key, plus its purpose (no object can have this context)."""
    return {**object_context_v2(layer, bucket, key, epoch_hex), "dssefs:record": RECORD_FORMAT}


def _check_dir(path: str, prefix: str, what: str) -> None:
    if (not isinstance(path, str) or not path.startswith(prefix) or not path.endswith("/")
            or path == prefix or is_reserved_key(path) or "//" in path):
        raise IntegrityError(f"rename record: malformed {what}")


class Renames:
    """Intent records of directory renames on one vault's store, and the steps that carry a
    rename out or finish one that was interrupted.  ``owner`` names who runs the renames begun
    here (a mount: host and mount point)."""

    def __init__(self, vault, owner: str | None = None):
        self.vault = vault
        self.store = vault.store
        self.owner = owner or default_owner()

    @property
    def where(self) -> str:
        return self.store.url.rstrip("/")

    # ---- the record ------------------------------------------------------------------------------

    def seal(self, intent: RenameIntent) -> bytes:
        epoch = self.vault.epochs.for_writing(intent.prefix)
        key, bucket, eid = intent.key, self.store.context_name, epoch.epoch_id.hex()
        head = {"format": RECORD_FORMAT, "version": RECORD_VERSION, "id": intent.intent_id.hex(),
                "bucket": bucket, "prefix": intent.prefix, "epoch": eid}
        aad = _aad(head)
        dk_in, dk_out = os.urandom(32), os.urandom(32)
        w_in = wrap_data_key(fmt.LAYER_INNER, epoch.key_inner, dk_in,
                             _wrap_ctx(Layer.INNER, bucket, key, eid))
        w_out = wrap_data_key(fmt.LAYER_OUTER, epoch.key_outer, dk_out,
                              _wrap_ctx(Layer.OUTER, bucket, key, eid))
        plain = zlib.compress(intent.payload(), 6)
        n_in, n_out = os.urandom(fmt.NONCE_BYTES), os.urandom(fmt.NONCE_BYTES)
        inner = bytearray(len(plain) + 16)
        InnerAEAD(dk_in).encrypt_into(n_in, plain, aad, inner)
        outer = bytearray(len(inner) + 16)
        OuterAEAD(dk_out).encrypt_into(n_out, bytes(inner), aad, outer)
        doc = dict(head, inner=_b64(w_in), outer=_b64(w_out), sealed=_b64(n_in + n_out + bytes(outer)))
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")

    def open_record(self, key: str, data: bytes) -> RenameIntent:
        """The intent stored at ``key`` as ``data``; IntegrityError unless it is well formed and
        opens under the epoch keys of its prefix for exactly this name (KeyProviderError when
        those keys cannot be unwrapped)."""
        where = f"{self.where}/{key}"
        parsed = parse_intent_key(key)
        if parsed is None:
            raise IntegrityError(f"{where}: not a rename record's name")
        prefix, intent_id = parsed
        if len(data) > MAX_RECORD_BYTES:
            raise IntegrityError(f"{where}: {len(data)} bytes is not a rename record")
        try:
            doc = json.loads(bytes(data).decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise IntegrityError(f"{where}: not a rename record") from None
        if not isinstance(doc, dict) or doc.get("format") != RECORD_FORMAT:
            raise IntegrityError(f"{where}: not a rename record")
        if doc.get("version") != RECORD_VERSION or type(doc.get("version")) is not int:
            raise UnsupportedFormat(f"{where}: rename record version {doc.get('version')!r}: upgrade dssefs")
        if set(doc) != _FIELDS:
            raise IntegrityError(f"{where}: rename record has other fields")
        if doc["id"] != intent_id.hex() or doc["prefix"] != prefix or doc["bucket"] != self.store.context_name:
            raise IntegrityError(f"{where}: rename record made for another name, prefix or bucket")
        if not isinstance(doc["epoch"], str) or not re.fullmatch(r"[0-9a-f]{32}", doc["epoch"]):
            raise IntegrityError(f"{where}: rename record names no epoch")
        epoch = self.vault.epochs.for_reading(prefix, bytes.fromhex(doc["epoch"]))
        bucket, eid = self.store.context_name, doc["epoch"]
        try:
            dk_in = unwrap_data_key(fmt.LAYER_INNER, epoch.key_inner, _unb64(doc["inner"], "inner"),
                                    _wrap_ctx(Layer.INNER, bucket, key, eid))
            dk_out = unwrap_data_key(fmt.LAYER_OUTER, epoch.key_outer, _unb64(doc["outer"], "outer"),
                                     _wrap_ctx(Layer.OUTER, bucket, key, eid))
        except IntegrityError as e:
            raise IntegrityError(f"{where}: {e}") from None
        try:
            sealed = _unb64(doc["sealed"], "sealed")
        except IntegrityError as e:
            raise IntegrityError(f"{where}: {e}") from None
        n = 2 * fmt.NONCE_BYTES
        if len(sealed) < n + 32:
            raise IntegrityError(f"{where}: rename record is truncated")
        aad = _aad(doc)
        inner = bytearray(len(sealed) - n - 16)
        plain = bytearray(len(inner) - 16)
        if not (OuterAEAD(dk_out).decrypt_into(sealed[fmt.NONCE_BYTES:n], sealed[n:], aad, inner)
                and InnerAEAD(dk_in).decrypt_into(sealed[:fmt.NONCE_BYTES], bytes(inner), aad, plain)):
            raise IntegrityError(f"{where}: rename record fails authentication (altered, or not "
                                 "written with these keys)")
        try:
            z = zlib.decompressobj()
            text = z.decompress(bytes(plain), MAX_PAYLOAD_BYTES)
            if z.unconsumed_tail or not z.eof:
                raise ValueError("too large")
            body = json.loads(text.decode("ascii"))
        except (zlib.error, ValueError, UnicodeDecodeError):
            raise IntegrityError(f"{where}: rename record payload is malformed") from None
        return self._intent(where, prefix, intent_id, body)

    @staticmethod
    def _intent(where: str, prefix: str, intent_id: bytes, body) -> RenameIntent:
        if not isinstance(body, dict) or set(body) != _PAYLOAD:
            raise IntegrityError(f"{where}: rename record payload is malformed")
        src, dst = body["src"], body["dst"]
        _check_dir(src, prefix, "source")
        _check_dir(dst, prefix, "destination")
        if src.startswith(dst) or dst.startswith(src):
            raise IntegrityError(f"{where}: rename record source and destination overlap")
        if not isinstance(body["owner"], str) or not isinstance(body["created"], str):
            raise IntegrityError(f"{where}: rename record payload is malformed")
        entries, seen = [], set()
        for item in body["objects"] if isinstance(body["objects"], list) else [None]:
            if (not isinstance(item, list) or len(item) != 2 or not all(isinstance(x, str) for x in item)
                    or item[0] in seen or is_reserved_key(item[0]) or not _VERSION_RE.fullmatch(item[1])
                    or item[0].startswith("/") or "//" in item[0]):
                raise IntegrityError(f"{where}: rename record lists a malformed object")
            seen.add(item[0])
            entries.append(Entry(item[0], item[1]))
        return RenameIntent(intent_id, prefix, src, dst, body["owner"], body["created"], tuple(entries))

    # ---- beginning -------------------------------------------------------------------------------

    def plan(self, src: str, key: str) -> tuple[Entry, ObjectInfo]:
        """The entry of object ``key`` below ``src`` and the version it names.  A dssefs object
        must open (keys unwrapped, header verified): one that cannot be moved is refused before
        anything is."""
        info = self.store.head(key)
        try:
            self.vault.open(key, info)
        except NotDssefsObject:
            pass
        return Entry(key[len(src):], version_of(info)), info

    def entry(self, src: str, key: str) -> Entry:
        return self.plan(src, key)[0]

    def new_intent(self, prefix: str, src: str, dst: str, entries: Iterable[Entry]) -> RenameIntent:
        """The intent of moving ``entries`` from ``src`` to ``dst`` (both below ``prefix``),
        under a fresh random name; not stored yet."""
        intent = RenameIntent(os.urandom(ID_BYTES), check_prefix(prefix), src, dst, self.owner,
                              _utc_now(), tuple(entries))
        self._intent(f"{self.where}/{intent.key}", prefix, intent.intent_id,
                     json.loads(intent.payload()))  # exactly what a reader accepts
        return intent

    def store_intent(self, intent: RenameIntent) -> None:
        """Seal and store the record durably, conditionally on the name being free."""
        body = self.seal(intent)
        try:
            self.store.put(intent.key, body, {}, if_none_match=True)
        except PreconditionFailed:
            # a fresh random name: refused only when a retried request's first attempt stored it
            data, _ = self.store.get_range(intent.key, 0, len(body) + 1)
            if data != body:
                raise
        log.debug("event=rename_begun intent=%s/%s src=%s dst=%s objects=%d", self.where, intent.key,
                  intent.src, intent.dst, len(intent.entries))

    def begin(self, prefix: str, src: str, dst: str, entries: Iterable[Entry]) -> RenameIntent:
        """:meth:`new_intent` and :meth:`store_intent`."""
        intent = self.new_intent(prefix, src, dst, entries)
        self.store_intent(intent)
        return intent

    def heartbeat(self, intent: RenameIntent) -> bool:
        """Copy the record onto itself so that its age says the rename is running; False when
        it is gone (finished by someone else)."""
        try:
            info = self.store.head(intent.key)
            self.store.copy(intent.key, intent.key, {}, if_match=info.etag)
            return True
        except (ObjectNotFound, PreconditionFailed):
            return False

    # ---- finding and loading ---------------------------------------------------------------------

    def pending(self, prefix: str) -> list[ObjectInfo]:
        """The intent records stored under ``prefix`` (one listing; nothing opened)."""
        out = []
        for item in self.store.list(check_prefix(prefix) + INTENT_DIR, delimiter=None):
            if not isinstance(item, str) and (parse_intent_key(item.key) or ("",))[0] == prefix:
                out.append(item)
        return out

    def load(self, key: str) -> RenameIntent:
        data, total = self.store.get_range(key, 0, MAX_RECORD_BYTES + 1)
        if total != len(data):
            raise IntegrityError(f"{self.where}/{key}: {total} bytes is not a rename record")
        return self.open_record(key, data)

    @staticmethod
    def stale(info: ObjectInfo, now: float | None = None) -> bool:
        """Whether a record was not refreshed for :data:`STALE_AFTER` seconds."""
        return (time.time() if now is None else now) - info.mtime > STALE_AFTER

    # ---- moving ----------------------------------------------------------------------------------

    def move(self, intent: RenameIntent, entry: Entry, info: ObjectInfo, *, again: bool = True) -> str:
        """Move one object of a rename that is running: ``info`` is the source version the
        entry was made from.  The copy is conditional on nothing being under the new name."""
        src, dst = intent.src + entry.rel, intent.dst + entry.rel
        try:
            self._copy(entry, src, dst, info)
        except PreconditionFailed:
            if not again:
                raise
            return self._existing_copy(intent, entry, src, dst, info)
        self.store.delete(src)
        return MOVED

    def settle(self, intent: RenameIntent, entry: Entry) -> str:
        """Finish one entry of an interrupted rename, from what the store holds now."""
        src, dst = intent.src + entry.rel, intent.dst + entry.rel
        try:
            info = self.store.head(src)
        except ObjectNotFound:
            return GONE
        if version_of(info) != entry.version:
            log.warning("event=rename_source_changed intent=%s/%s object=%s/%s effect='changed since "
                        "the rename began: left under its old name'", self.where, intent.key, self.where, src)
            return CHANGED
        try:
            there = self.store.head(dst)
        except ObjectNotFound:
            return self.move(intent, entry, info)
        return self._existing_copy(intent, entry, src, dst, info, there)

    def _copy(self, entry: Entry, src: str, dst: str, info: ObjectInfo) -> None:
        if entry.foreign:
            self.store.copy(src, dst, dict(info.metadata), if_none_match=True)
        else:
            self.vault.rename(self.vault.open(src, info), dst, dst_if_none_match=True, delete_source=False)

    def _existing_copy(self, intent: RenameIntent, entry: Entry, src: str, dst: str, info: ObjectInfo,
                       there: ObjectInfo | None = None) -> str:
        """Something is under the new name: delete the source only if it is its copy."""
        if there is None:
            try:
                there = self.store.head(dst)
            except ObjectNotFound:  # gone again meanwhile: try once more
                return self.move(intent, entry, info, again=False)
        if self._is_copy(entry, src, dst, info, there):
            self.store.delete(src)
            return DONE
        log.warning("event=rename_conflict intent=%s/%s object=%s/%s other=%s/%s effect='another object "
                    "is under the new name: both kept'", self.where, intent.key, self.where, src,
                    self.where, dst)
        return CONFLICT

    def _is_copy(self, entry: Entry, src: str, dst: str, info: ObjectInfo, there: ObjectInfo) -> bool:
        """A dssefs copy has the source's header and attributes (a fresh message id per version)
        and its keys open under the new name; another object's copy has the same bytes."""
        if entry.foreign:
            return version_of(there) == version_of(info) or self._same_bytes(src, dst, info, there)
        if version_of(there) != version_of(info):
            return False
        try:
            self.vault.open(dst, there)
        except DssefsError:
            return False
        return True

    def _same_bytes(self, src: str, dst: str, info: ObjectInfo, there: ObjectInfo) -> bool:
        """Objects not written by dssefs whose ETags differ (a multipart copy): compare bodies."""
        if info.size != there.size or {k.lower(): v for k, v in info.metadata.items()} != \
                {k.lower(): v for k, v in there.metadata.items()}:
            return False
        step = 8 * 1024 * 1024
        for off in range(0, info.size, step):
            a, _ = self.store.get_range(src, off, step, if_match=info.etag)
            b, _ = self.store.get_range(dst, off, step, if_match=there.etag)
            if a != b:
                return False
        return True

    # ---- finishing -------------------------------------------------------------------------------

    def finish(self, intent: RenameIntent) -> bool:
        """After every entry: delete the epoch records below ``src`` when no other object is
        left there (only objects below it could name them), then the intent record.  Returns
        whether ``src`` is empty."""
        left, records = False, []
        for item in self.store.list(intent.src, delimiter=None):
            if isinstance(item, str):
                continue
            if is_epoch_record(item.key[len(intent.src):]):
                records.append(item.key)
            else:
                left = True
        if not left:
            for key in records:
                self.store.delete(key)
        self.store.delete(intent.key)
        return not left

    def resume(self, intent: RenameIntent, *, workers: int = 8) -> dict[str, int]:
        """Finish an interrupted rename (blocking): settle every entry, ``workers`` at a time,
        then :meth:`finish`.  Logs ``event=rename_resumed``; returns the outcome counts."""
        t0 = time.monotonic()
        counts = dict.fromkeys(OUTCOMES, 0)
        with cf.ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="dssefs-rename") as pool:
            for outcome in pool.map(lambda e: self.settle(intent, e), intent.entries):
                counts[outcome] += 1
        self.finish(intent)
        self.log_resumed(intent, counts, time.monotonic() - t0)
        return counts

    def log_resumed(self, intent: RenameIntent, counts: dict[str, int], seconds: float) -> None:
        left = counts[CHANGED] + counts[CONFLICT]
        log.log(logging.WARNING if left else logging.INFO,
                "event=rename_resumed intent=%s/%s src=%s dst=%s objects=%d moved=%d done=%d gone=%d "
                "changed=%d conflicts=%d seconds=%.2f%s", self.where, intent.key, intent.src, intent.dst,
                len(intent.entries), counts[MOVED], counts[DONE], counts[GONE], counts[CHANGED],
                counts[CONFLICT], seconds,
                f" effect='{left} objects left under the old name (see above)'" if left else "")


def _nested(a: str, b: str) -> bool:
    """Whether one of two keys is the other or lies below it (as a directory)."""
    a, b = a.rstrip("/") + "/", b.rstrip("/") + "/"
    return a.startswith(b) or b.startswith(a)


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
