"""Small PUTs sent by a helper process with an interpreter of its own (write-back mode).

With ``--write-back`` a program writing many small files keeps the FUSE event loop busy while the
journal's upload threads send one PutObject per file.  botocore spends 1.5-2 ms of interpreter
time on each request (parameters, signing, HTTP), and within one interpreter that time is taken
from the event loop: on 2 cores a 500-file tar extraction ran 1.6 s with the uploads paused and
3.7-4.2 s with them running.  :class:`HelperPuts` hands single-request PUTs of bodies up to
``max_body`` to a helper process (``python -m dssefs.store.helper``) that opens its own client
for the same store, with the same options, credential chain and endpoint; every other request,
and every larger body, is sent from this process as before.

The helper is handed what the store is handed: ciphertext bodies and metadata that holds
wrapped keys only (never a data key or plaintext).  It talks to this process over a socket pair
(pickled tuples; both ends are ours), and exits when that closes or this process dies.  Errors
come back as the same classes with the same message, errno and ``transient`` flag.  If the helper
goes away, the PUTs it was sending fail as transient (their outcome is unknown: the journal sends
them again, and a refused retry of a write that did land is recognised as our own), and later
PUTs are sent from this process, after one warning.
"""

from __future__ import annotations

import errno as _errno
import itertools
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any, Iterator

from .. import errors
from ..errors import StoreError
from ..process import die_with_parent, forbid_core_dumps
from ..retrying import is_transient, transient
from .base import ObjectInfo, ObjectStore, PendingUpload, Upload

log = logging.getLogger(__name__)

#: bodies larger than this are sent from this process (a pipe would copy them twice more)
MAX_BODY = 1 << 20


def _describe(e: BaseException) -> tuple[str, str, int, bool]:
    """An exception as (class name, message, errno, transient), to rebuild on the other side."""
    name = type(e).__name__ if isinstance(e, errors.DssefsError) else "StoreError"
    message = str(e) if isinstance(e, errors.DssefsError) else f"upload helper: {type(e).__name__}: {e}"
    return name, message, int(getattr(e, "errno", None) or _errno.EIO), is_transient(e)


def _rebuild(desc: tuple[str, str, int, bool]) -> StoreError:
    name, message, code, may_pass = desc
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, errors.DssefsError)):
        cls = StoreError
    err = cls(message, errno=code)
    return transient(err) if may_pass else err


class HelperPuts(ObjectStore):
    """``inner`` with its small single-request PUTs sent by a helper process (see the module
    docstring).  ``source`` and ``options``: what :func:`dssefs.store.open_store` opens the
    same store from, in the helper."""

    def __init__(self, inner: ObjectStore, source: str, options: dict[str, Any], *, workers: int = 16,
                 max_body: int = MAX_BODY):
        self._wrapping(inner)
        self.max_body = max_body
        self.sent = 0  # PUTs the helper answered
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._pending: dict[int, Future] = {}
        self._broken: str | None = None
        self._closing = False
        mine, theirs = socket.socketpair()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "dssefs.store.helper", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, close_fds=True)
        finally:
            theirs.close()
        self._sock = mine  # shut down to end the helper (closing an fd a reader waits on does not)
        self._conn = Connection(os.dup(mine.fileno()))
        self._conn.send((source, dict(options), max(1, workers)))
        self._reader = threading.Thread(target=self._read, name="dssefs-upload-helper", daemon=True)
        self._reader.start()

    # ---- the helper's answers -----------------------------------------------------------------------

    def _read(self) -> None:
        while True:
            try:
                rid, failure, etag = self._conn.recv()
            except (EOFError, OSError, pickle.UnpicklingError, ValueError, TypeError) as e:
                self._lose(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
                return
            with self._lock:
                fut = self._pending.pop(rid, None)
            if fut is None:
                continue
            if failure is None:
                self.sent += 1
                fut.set_result(etag)
            else:
                fut.set_exception(_rebuild(failure))

    def _lose(self, why: str) -> None:
        """The helper is gone: fail what it was sending (outcome unknown) and send from here."""
        with self._lock:
            if self._broken is None:
                self._broken = why
                if not self._closing:
                    log.warning("event=upload_helper_lost pid=%s exit=%s reason='%s' action='PUTs are sent "
                                "from the daemon from now on'", self._proc.pid, self._proc.poll(), why)
            pending, self._pending = self._pending, {}
        for fut in pending.values():
            fut.set_exception(transient(StoreError(f"{self.url}: the upload helper went away while "
                                                   "sending this write (its outcome is unknown; it is "
                                                   "sent again)")))

    @property
    def alive(self) -> bool:
        return self._broken is None

    def stats(self) -> dict:
        return {"pid": self._proc.pid, "alive": self.alive, "puts": self.sent}

    # ---- the store ------------------------------------------------------------------------------------

    def put(self, key: str, body: bytes | memoryview, metadata: dict[str, str], *,
            if_match: str | None = None, if_none_match: bool = False, crc32: int | None = None) -> str:
        fut: Future = Future()
        rid = next(self._ids)
        with self._lock:
            helper = self._broken is None and len(body) <= self.max_body
            if helper:
                self._pending[rid] = fut
        if not helper:  # gone, or a body too large to pass through the socket
            return self.inner.put(key, body, metadata, if_match=if_match, if_none_match=if_none_match,
                                  crc32=crc32)
        try:  # (the helper's own store computes the checksum of what it sends)
            with self._send_lock:
                self._conn.send((rid, key, bytes(body), dict(metadata), if_match, if_none_match))
        except (OSError, ValueError) as e:  # not sent: nothing reached the store, send it from here
            with self._lock:
                self._pending.pop(rid, None)
            self._lose(f"{type(e).__name__}: {e}")
            return self.inner.put(key, body, metadata, if_match=if_match, if_none_match=if_none_match)
        return fut.result()

    def head(self, key: str, *, prefix: int = 0) -> ObjectInfo:
        return self.inner.head(key, prefix=prefix)

    def get_range(self, key: str, start: int, length: int, *, if_match: str | None = None):
        return self.inner.get_range(key, start, length, if_match=if_match)

    def begin_upload(self, key: str, metadata: dict[str, str], *, if_match: str | None = None,
                     if_none_match: bool = False, size_hint: int | None = None) -> Upload:
        return self.inner.begin_upload(key, metadata, if_match=if_match, if_none_match=if_none_match,
                                       size_hint=size_hint)

    def copy(self, src: str, dst: str, metadata: dict[str, str], *, if_match: str | None = None,
             if_none_match: bool = False) -> str:
        return self.inner.copy(src, dst, metadata, if_match=if_match, if_none_match=if_none_match)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def delete_many(self, keys) -> list:
        return self.inner.delete_many(keys)

    def list(self, prefix: str = "", delimiter: str | None = "/") -> Iterator[ObjectInfo | str]:
        return self.inner.list(prefix, delimiter)

    def list_uploads(self, prefix: str = "") -> Iterator[PendingUpload]:
        return self.inner.list_uploads(prefix)

    def abort_upload(self, key: str, upload_id: str) -> None:
        self.inner.abort_upload(key, upload_id)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def close(self) -> None:
        """End the helper once nothing more is sent (the journal has drained): it finishes what
        it was sent and exits when the socket is shut down."""
        self._closing = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._reader.join(timeout=5)
        self._conn.close()
        self.inner.close()


# ---- the helper process ----------------------------------------------------------------------------------

def serve(fd: int) -> int:
    """The helper: open the store, then answer PUTs until the socket closes."""
    forbid_core_dumps()  # it holds the daemon's S3 credentials, like every dssefs process
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C of the foreground daemon is its to handle
    logging.basicConfig(level=logging.WARNING, format="dssefs upload helper: %(levelname)s %(name)s %(message)s")
    conn = Connection(fd)
    try:
        source, options, workers = conn.recv()
    except (EOFError, OSError):
        return 0
    from . import open_store

    store, _prefix = open_store(source, **options)
    send_lock = threading.Lock()

    def run(rid: int, key: str, body: bytes, meta: dict, if_match: str | None, if_none_match: bool) -> None:
        try:
            reply = (rid, None, store.put(key, body, meta, if_match=if_match, if_none_match=if_none_match))
        except BaseException as e:  # noqa: BLE001 - every failure is the caller's to handle
            reply = (rid, _describe(e), None)
        try:
            with send_lock:
                conn.send(reply)
        except OSError:
            pass  # the daemon is gone: nothing is waiting for the answer

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="put") as pool:
        while True:
            try:
                req = conn.recv()
            except (EOFError, OSError):
                break
            pool.submit(run, *req)
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(serve(int(sys.argv[1])))
