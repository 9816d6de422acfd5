"""Encrypted staging of dirty chunks that do not fit in the memory budget.

One sparse file per file being written, in the spill directory, unlinked right after creation so
nothing is left behind by a crash (the directory is also wiped at mount).  Each chunk slot holds
``nonce(12) || AES-256-GCM(chunk) || tag(16)``; the key is generated at mount and lives only in
memory; the AAD binds the slot to its spill file and chunk index and length, so slots cannot be
swapped or replayed.  Blocking: callers run these methods in worker threads.
"""

from __future__ import annotations

import os
import struct
import threading

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE = 12
TAG = 16
_LEN = struct.Struct(">I")


class SpillArea:
    def __init__(self, directory: str):
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
        self.wipe()
        self._aead = AESGCM(AESGCM.generate_key(256))
        self._lock = threading.Lock()
        self.files = 0
        self.bytes_written = 0

    def wipe(self) -> int:
        """Remove every staging file left in the directory (by a crash); returns the count."""
        n = 0
        for entry in os.scandir(self.directory):
            if entry.name.startswith("spill-") and entry.is_file(follow_symlinks=False):
                try:
                    os.unlink(entry.path)
                    n += 1
                except FileNotFoundError:
                    pass
        return n

    def open(self, chunk_size: int) -> "SpillFile":
        return SpillFile(self, chunk_size)


class SpillFile:
    def __init__(self, area: SpillArea, chunk_size: int):
        self.area = area
        self.slot = NONCE + _LEN.size + chunk_size + TAG
        self.ident = os.urandom(16)
        path = os.path.join(area.directory, f"spill-{self.ident.hex()}")
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.unlink(path)  # unreachable by name from now on; the space is freed on close
        self._lock = threading.Lock()
        self._users = 0  # readers working without the cache lock (see ``use``)
        self._closing = False
        with area._lock:
            area.files += 1

    def _aad(self, index: int, length: int) -> bytes:
        return self.ident + struct.pack(">QI", index, length)

    def write(self, index: int, data) -> None:
        """Encrypt ``data`` (any bytes-like object, not copied) into chunk slot ``index``."""
        n = len(data)
        record = bytearray(NONCE + _LEN.size + n + TAG)
        nonce = os.urandom(NONCE)
        record[:NONCE] = nonce
        _LEN.pack_into(record, NONCE, n)
        self.area._aead.encrypt_into(nonce, data, self._aad(index, n),
                                     memoryview(record)[NONCE + _LEN.size:])
        written = os.pwrite(self.fd, record, index * self.slot)
        if written != len(record):
            raise OSError(28, "short write to the spill directory")
        with self.area._lock:
            self.area.bytes_written += len(record)

    def read(self, index: int) -> bytearray:
        off = index * self.slot
        head = os.pread(self.fd, NONCE + _LEN.size, off)
        if len(head) != NONCE + _LEN.size:
            raise OSError(5, "spill record missing")
        (length,) = _LEN.unpack(head[NONCE:])
        ct = bytearray(length + TAG)
        if os.preadv(self.fd, [ct], off + len(head)) != len(ct):
            raise OSError(5, "spill record truncated")
        out = bytearray(length)
        try:
            self.area._aead.decrypt_into(head[:NONCE], ct, self._aad(index, length), out)
        except Exception:
            out[:] = bytes(length)  # nothing unverified stays around
            raise
        return out

    def use(self) -> bool:
        """Pin the file open for a read done without the cache lock (False: already closed);
        pair with ``unuse``.  ``close`` meanwhile is deferred to the last ``unuse``."""
        with self._lock:
            if self._closing:
                return False
            self._users += 1
            return True

    def unuse(self) -> None:
        with self._lock:
            self._users -= 1
            last = self._closing and self._users == 0
        if last:
            self._close_fd()

    def close(self) -> None:
        with self._lock:
            if self._closing:
                return
            self._closing = True
            if self._users:
                return
        self._close_fd()

    def _close_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            with self.area._lock:
                self.area.files -= 1
