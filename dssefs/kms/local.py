"""Local keyring: named 256-bit master keys in a file, for offline use without AWS KMS.

Keyring file
------------
A JSON document, mode 0600, owned by the user that mounts::

    {"format": "dssefs-keyring", "version": 1, "protection": "none",
     "keys": {"default": {"created": "2025-01-01T00:00:00Z", "key": "<base64, 32 bytes>",
                          "check": "<16 hex digits>"}}}

``check`` is a key check value, the first 8 bytes of HMAC-SHA256(key, "dssefs-keyring-check-v1"):
it catches a damaged key on load and lets two copies of a keyring be compared without showing the
key.  With a passphrase, the ``keys`` map is encrypted instead::

    {"format": "dssefs-keyring", "version": 1, "protection": "argon2id+aes-256-gcm",
     "kdf": {"name": "argon2id", "memory_kib": 65536, "iterations": 3, "lanes": 4,
             "salt": "<base64, 16 bytes>"},
     "nonce": "<base64, 12 bytes>", "ciphertext": "<base64>"}

The file key is Argon2id(passphrase as UTF-8 after Unicode NFC normalisation, salt, params) and
``ciphertext`` is AES-256-GCM of the canonical JSON of the ``keys`` map, with the canonical JSON of
every other top-level field as associated data, so parameters, salt and nonce cannot be changed
unnoticed.  Salt and nonce are fresh on every write.  Files are written atomically (temporary file
in the same directory, fsync, rename, directory fsync); creating never overwrites.

Wrapped keys
------------
The encryption context's ``dssefs:v`` value selects the wrapping format (any other value is a
``ValueError``, a programming error):

* ``"1"``: ``blob = 0x01 || nonce (12) || AES-256-GCM(master key, nonce, key, AAD)`` = 61 bytes,
  with ``AAD = 0x01 || key name (ASCII) || 0x00 || canonical JSON of the encryption context``.
* ``"2"``: ``blob = 0x02 || check (8) || nonce (12) || AES-256-GCM(...)`` = 69 bytes, with
  ``AAD = 0x02 || key name (ASCII) || 0x00 || canonical JSON of the encryption context``.
  ``check`` is the wrapping master key's key check value (the keyring file's ``check`` field as
  8 bytes), so a reader can tell "this keyring has another key of that name" from tampering.

Canonical JSON has sorted keys, no spaces and is ASCII with ``\\u`` escapes.  A NUL cannot occur
in a key name or in that JSON, so the encoding is unambiguous.  ``WrappedKey.key_id`` is the key
name.  A blob is only accepted in the format its context names: a format-1 blob presented under a
format-2 context (or any other length or version byte) is refused as altered metadata.

Which keyring keys are trusted on read
--------------------------------------
The key name of each wrapped key is stored in object metadata, which anyone who can write to the
bucket can change.  With one key name for both layers (the usual set-up), every key of the keyring
is accepted for both layers, so a key rotated inside the keyring keeps old objects readable.  With
two different names (split custody), the inner layer accepts only the inner name and
``allowed_names_inner``, the outer layer only the outer name and ``allowed_names_outer``; the two
sets must not overlap, and a key named for the wrong layer is refused with
:class:`~dssefs.errors.KeyAccessDenied`.

Errors
------
A wrapped key that does not open, because the context differs (object copied or renamed outside
dssefs, another layer) or the blob was altered, raises
:class:`~dssefs.kms.WrappedKeyMismatch`, a :class:`~dssefs.errors.KeyAccessDenied` with errno
``EACCES``: the same class the AWS KMS provider raises for ``InvalidCiphertextException``.  A
format-2 blob whose check value differs from this keyring's key of that name raises
:class:`~dssefs.kms.WrongKeyring` (a :class:`~dssefs.errors.KeyNotFound`) naming both check values;
a format-1 blob cannot tell the two causes apart and its message names both.  An unknown key name
raises ``KeyNotFound`` naming the key, the layer and the keyring.  A wrong passphrase raises
``KeyAccessDenied``; a missing, unsafe (group/other-accessible) or damaged keyring file raises
:class:`~dssefs.errors.ConfigError`.  No message, ``repr`` or log line carries key bytes; master
keys live only as ``bytes`` in process memory.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as _dt
import errno as _errno
import fcntl
import hashlib
import hmac
import json
import os
import re
import stat
import tempfile
import threading
import unicodedata
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import ConfigError, KeyAccessDenied, KeyNotFound, KeyProviderError
from ._common import (Stats, WrappedKeyMismatch, WrongKeyring, canonical_context,
                      check_context, describe_context, key_noun, one_line)
from .base import DATA_KEY_BYTES, KeyProvider, Layer, WrappedKey

__all__ = ["Keyring", "KeyInfo", "LocalKeyStatus", "KdfParams", "LocalKeyringProvider",
           "create_keyring", "add_key", "load_keyring", "list_keys", "change_passphrase",
           "passphrase_from_env_or_file", "validate_key_name", "PASSPHRASE_ENV", "DEFAULT_KDF",
           "WRAPPED_KEY_BYTES", "WRAPPED_KEY_BYTES_V2", "CHECK_BYTES"]

KEYRING_FORMAT = "dssefs-keyring"
KEYRING_VERSION = 1
PROTECTION_NONE = "none"
PROTECTION_PASSPHRASE = "argon2id+aes-256-gcm"
PASSPHRASE_ENV = "DSSEFS_KEYRING_PASSPHRASE"

MASTER_KEY_BYTES = 32
WRAP_VERSION = 0x01  # wrapping format 1 (context "dssefs:v": "1")
WRAP_VERSION_V2 = 0x02  # wrapping format 2 (context "dssefs:v": "2"), with a key check value
NONCE_BYTES = 12
TAG_BYTES = 16
CHECK_BYTES = 8
WRAPPED_KEY_BYTES = 1 + NONCE_BYTES + DATA_KEY_BYTES + TAG_BYTES  # 61
WRAPPED_KEY_BYTES_V2 = 1 + CHECK_BYTES + NONCE_BYTES + DATA_KEY_BYTES + TAG_BYTES  # 69
_BLOB_BYTES = {WRAP_VERSION: WRAPPED_KEY_BYTES, WRAP_VERSION_V2: WRAPPED_KEY_BYTES_V2}
_CONTEXT_VERSIONS = {"1": WRAP_VERSION, "2": WRAP_VERSION_V2}
SALT_BYTES = 16
MAX_KEYRING_BYTES = 1 << 20
MAX_PASSPHRASE_FILE_BYTES = 64 << 10

KEY_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_CHECK_LABEL = b"dssefs-keyring-check-v1"
_CREATED_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")


@dataclass(frozen=True)
class KdfParams:
    """Argon2id parameters (RFC 9106's second recommended set by default: 64 MiB, t=3, p=4)."""

    memory_kib: int = 64 * 1024
    iterations: int = 3
    lanes: int = 4

    def validate(self, where: str = "Argon2id parameters") -> None:
        ok = (type(self.lanes) is int and 1 <= self.lanes <= 64
              and type(self.iterations) is int and 1 <= self.iterations <= 64
              and type(self.memory_kib) is int
              and 8 * self.lanes <= self.memory_kib <= 4 * 1024 * 1024)
        if not ok:
            raise ConfigError(f"{where} out of range (memory {self.memory_kib!r} KiB, iterations "
                              f"{self.iterations!r}, lanes {self.lanes!r}): use memory 8*lanes.."
                              "4194304 KiB, iterations 1..64, lanes 1..64")


DEFAULT_KDF = KdfParams()


@dataclass(frozen=True)
class LocalKeyStatus:
    """A configured keyring key as ``describe()`` reports it (no key bytes)."""

    layers: tuple[str, ...]
    key_id: str  # the key name
    created: str
    check: str
    keyring: str  # the keyring's path

    @property
    def usable(self) -> bool:
        return True  # a key that loaded passed its check value


@dataclass(frozen=True)
class KeyInfo:
    """A master key's public facts: never the key itself."""

    name: str
    created: str  # ISO 8601 UTC, e.g. 2025-01-01T00:00:00Z
    check: str  # key check value, 16 hex digits


# --------------------------------------------------------------------------------------------
# Helpers


def validate_key_name(name: str) -> str:
    if not isinstance(name, str) or not KEY_NAME_RE.fullmatch(name):
        shown = repr(name)[:80]
        raise ConfigError(f"keyring key name {shown} is invalid: use 1-64 characters from "
                          "A-Z a-z 0-9 . _ -")
    return name


def _check_value(key: bytes) -> str:
    return hmac.new(key, _CHECK_LABEL, hashlib.sha256).digest()[:8].hex()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object, what: str, path: str, size: int | None = None) -> bytes:
    try:
        if not isinstance(text, str):
            raise ValueError
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, binascii.Error, UnicodeEncodeError):
        raise ConfigError(f"keyring {path} is damaged: {what} is not base64; restore it from a "
                          "backup") from None
    if size is not None and len(data) != size:
        raise ConfigError(f"keyring {path} is damaged: {what} has {len(data)} bytes, expected "
                          f"{size}; restore it from a backup")
    return data


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _passphrase_bytes(passphrase: str) -> bytes:
    if not isinstance(passphrase, str) or not passphrase:
        raise ConfigError("keyring passphrase is empty: give a non-empty passphrase")
    return unicodedata.normalize("NFC", passphrase).encode("utf-8")


def _derive(passphrase: str, salt: bytes, kdf: KdfParams) -> bytes:
    try:
        from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
    except ImportError:  # pragma: no cover - cryptography >= 44 has it
        raise ConfigError("Argon2id is not available: install cryptography >= 44") from None
    try:
        return Argon2id(salt=salt, length=32, iterations=kdf.iterations, lanes=kdf.lanes,
                        memory_cost=kdf.memory_kib).derive(_passphrase_bytes(passphrase))
    except UnsupportedAlgorithm:  # pragma: no cover - depends on the OpenSSL build
        raise ConfigError("Argon2id is not supported by this cryptography/OpenSSL build: "
                          "install the cryptography wheel from PyPI") from None
    except MemoryError:  # pragma: no cover
        raise ConfigError(f"not enough memory for Argon2id ({kdf.memory_kib} KiB)") from None


# --------------------------------------------------------------------------------------------
# The keyring in memory


class Keyring:
    """Master keys loaded from a keyring file.  ``repr`` and pickling never expose keys."""

    def __init__(self, path: str, keys: Mapping[str, bytes], info: Mapping[str, KeyInfo], *,
                 kdf: KdfParams | None):
        self.path = path
        self._keys = dict(keys)
        self._info = dict(info)
        self._kdf = kdf

    @property
    def protected(self) -> bool:
        """Whether the file is passphrase-protected."""
        return self._kdf is not None

    def names(self) -> list[str]:
        return sorted(self._keys)

    def keys(self) -> list[KeyInfo]:
        """Name, creation time and check value of every key, sorted by name."""
        return [self._info[n] for n in sorted(self._info)]

    def __contains__(self, name: object) -> bool:
        return name in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def master_key(self, name: str) -> bytes:
        """The raw master key ``name``; KeyNotFound naming the key and the keyring otherwise."""
        try:
            return self._keys[name]
        except (KeyError, TypeError):
            raise self._not_found(name) from None

    def info(self, name: str) -> KeyInfo:
        """Name, creation time and check value of key ``name``; KeyNotFound otherwise."""
        try:
            return self._info[name]
        except (KeyError, TypeError):
            raise self._not_found(name) from None

    def _not_found(self, name: object) -> KeyNotFound:
        shown = repr(name)[:80]
        return KeyNotFound(f"key {shown} not found in keyring {self.path} (it has "
                           f"{', '.join(self.names()) or 'no keys'}): use the keyring that "
                           "wrote this data or add the key")

    def __repr__(self) -> str:
        return (f"Keyring(path={self.path!r}, keys={self.names()!r}, "
                f"protected={self.protected})")

    __str__ = __repr__

    def __reduce__(self):  # keys must not end up in a pickle, a cache or a child process
        raise TypeError("Keyring objects hold master keys and cannot be pickled")


# --------------------------------------------------------------------------------------------
# Reading and writing keyring files


def _read_private_file(path: str, what: str, limit: int, missing: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # no hang on a FIFO
    except FileNotFoundError:
        raise ConfigError(missing) from None
    except PermissionError:
        raise ConfigError(f"cannot read {what} {path}: permission denied; run as its owner") \
            from None
    except OSError as exc:
        raise ConfigError(f"cannot open {what} {path}: {exc.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ConfigError(f"{what} {path} is not a regular file: give the path of the file")
    with os.fdopen(fd, "rb") as f:
        if st.st_mode & 0o077:
            raise ConfigError(f"{what} {path} is accessible by group or others (mode "
                              f"{stat.S_IMODE(st.st_mode):04o}): chmod 600 {path}")
        euid = os.geteuid()
        if st.st_uid not in (euid, 0):
            raise ConfigError(f"{what} {path} is owned by uid {st.st_uid}, not by you (uid "
                              f"{euid}): chown it or use your own copy")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ConfigError(f"{what} {path} is larger than {limit} bytes: give the right file")
    return data


def _missing_keyring(path: str) -> str:
    return f"keyring {path} does not exist: create one with `dssefs keyring create {path}`"


def _parse_keys(obj: object, path: str) -> tuple[dict[str, bytes], dict[str, KeyInfo]]:
    if not isinstance(obj, dict) or not obj:
        raise ConfigError(f"keyring {path} is damaged: no keys; restore it from a backup")
    keys: dict[str, bytes] = {}
    info: dict[str, KeyInfo] = {}
    for name, entry in obj.items():
        if not isinstance(name, str) or not KEY_NAME_RE.fullmatch(name):
            raise ConfigError(f"keyring {path} is damaged: invalid key name; restore it from a "
                              "backup")
        if not isinstance(entry, dict) or set(entry) != {"created", "key", "check"} \
                or not isinstance(entry["created"], str) \
                or not _CREATED_RE.fullmatch(entry["created"]) \
                or not isinstance(entry["check"], str):
            raise ConfigError(f"keyring {path} is damaged: entry {name!r} is malformed; restore "
                              "it from a backup")
        key = _unb64(entry["key"], f"key {name!r}", path, MASTER_KEY_BYTES)
        if not hmac.compare_digest(_check_value(key), entry["check"]):
            raise ConfigError(f"keyring {path} is damaged: key {name!r} fails its check value; "
                              "restore it from a backup")
        keys[name] = key
        info[name] = KeyInfo(name=name, created=entry["created"], check=entry["check"])
    return keys, info


def _keys_json(keyring: Keyring) -> dict[str, dict[str, str]]:
    return {name: {"created": keyring._info[name].created, "key": _b64(key),
                   "check": keyring._info[name].check}
            for name, key in sorted(keyring._keys.items())}


def _decode(raw: bytes, path: str, passphrase: str | None) -> Keyring:
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ConfigError(f"keyring {path} is not valid JSON: restore it from a backup") from None
    if not isinstance(doc, dict) or doc.get("format") != KEYRING_FORMAT:
        raise ConfigError(f"{path} is not a dssefs keyring: give the path of a keyring file")
    version = doc.get("version")
    if version != KEYRING_VERSION:
        raise ConfigError(f"keyring {path} has version {version!r}; this dssefs reads version "
                          f"{KEYRING_VERSION}: upgrade dssefs")
    protection = doc.get("protection")
    if protection == PROTECTION_NONE:
        if set(doc) != {"format", "version", "protection", "keys"}:
            raise ConfigError(f"keyring {path} is damaged: unexpected fields; restore it from "
                              "a backup")
        if passphrase is not None:
            raise ConfigError(f"keyring {path} is not passphrase-protected but a passphrase was "
                              f"given: unset {PASSPHRASE_ENV} or protect the keyring")
        keys, info = _parse_keys(doc["keys"], path)
        return Keyring(path, keys, info, kdf=None)
    if protection != PROTECTION_PASSPHRASE:
        raise ConfigError(f"keyring {path} uses protection {protection!r}, unknown to this "
                          "dssefs: upgrade dssefs")
    if set(doc) != {"format", "version", "protection", "kdf", "nonce", "ciphertext"}:
        raise ConfigError(f"keyring {path} is damaged: unexpected fields; restore it from a "
                          "backup")
    kdf_doc = doc["kdf"]
    if not isinstance(kdf_doc, dict) or set(kdf_doc) != {"name", "memory_kib", "iterations",
                                                         "lanes", "salt"} \
            or kdf_doc["name"] != "argon2id":
        raise ConfigError(f"keyring {path} is damaged: bad kdf field; restore it from a backup")
    kdf = KdfParams(memory_kib=kdf_doc["memory_kib"], iterations=kdf_doc["iterations"],
                    lanes=kdf_doc["lanes"])
    kdf.validate(f"keyring {path}: Argon2id parameters")
    salt = _unb64(kdf_doc["salt"], "salt", path, SALT_BYTES)
    nonce = _unb64(doc["nonce"], "nonce", path, NONCE_BYTES)
    ciphertext = _unb64(doc["ciphertext"], "ciphertext", path)
    if passphrase is None:
        raise KeyAccessDenied(f"keyring {path} is passphrase-protected: set {PASSPHRASE_ENV} "
                              "or give a passphrase file")
    file_key = _derive(passphrase, salt, kdf)
    aad = _canonical({k: v for k, v in doc.items() if k != "ciphertext"})
    try:
        plain = AESGCM(file_key).decrypt(nonce, ciphertext, aad)
    except InvalidTag:
        raise KeyAccessDenied(f"wrong keyring passphrase for {path} (or the file was altered): "
                              "try again, or restore the keyring from a backup") from None
    try:
        keys_doc = json.loads(plain.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ConfigError(f"keyring {path} is damaged: restore it from a backup") from None
    keys, info = _parse_keys(keys_doc, path)
    return Keyring(path, keys, info, kdf=kdf)


def _encode(keyring: Keyring, passphrase: str | None, kdf: KdfParams | None) -> bytes:
    keys_doc = _keys_json(keyring)
    if passphrase is None:
        doc: dict[str, object] = {"format": KEYRING_FORMAT, "version": KEYRING_VERSION,
                                  "protection": PROTECTION_NONE, "keys": keys_doc}
    else:
        kdf = kdf or DEFAULT_KDF
        kdf.validate()
        salt = os.urandom(SALT_BYTES)
        nonce = os.urandom(NONCE_BYTES)
        doc = {"format": KEYRING_FORMAT, "version": KEYRING_VERSION,
               "protection": PROTECTION_PASSPHRASE,
               "kdf": {"name": "argon2id", "memory_kib": kdf.memory_kib,
                       "iterations": kdf.iterations, "lanes": kdf.lanes, "salt": _b64(salt)},
               "nonce": _b64(nonce)}
        file_key = _derive(passphrase, salt, kdf)
        doc["ciphertext"] = _b64(AESGCM(file_key).encrypt(nonce, _canonical(keys_doc),
                                                          _canonical(doc)))
    return json.dumps(doc, indent=2, sort_keys=True).encode("ascii") + b"\n"


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:  # pragma: no cover - some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - e.g. EINVAL on some network file systems
        pass
    finally:
        os.close(fd)


def _directory_of(path: str) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ConfigError(f"directory {directory} does not exist: create it first")
    return directory


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """Serialise read-modify-write of one keyring between processes (flock on its directory)."""
    directory = _directory_of(path)
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:  # pragma: no cover
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # pragma: no cover - file systems without flock
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def _write_atomic(path: str, data: bytes, *, replace: bool) -> None:
    directory = _directory_of(path)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=directory)
    try:
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails atomically if ``path`` exists
            except FileExistsError:
                raise ConfigError(f"{path} already exists: refusing to overwrite a keyring; "
                                  "choose another path or add keys to it") from None
            except OSError as exc:  # pragma: no cover - no hard links here (e.g. some FUSE)
                if exc.errno not in (_errno.EPERM, _errno.ENOTSUP, _errno.EOPNOTSUPP,
                                     _errno.EMLINK, _errno.ENOSYS):
                    raise
                if os.path.lexists(path):
                    raise ConfigError(f"{path} already exists: refusing to overwrite a keyring; "
                                      "choose another path or add keys to it") from None
                os.rename(tmp, path)
            else:
                os.unlink(tmp)
        _fsync_dir(directory)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------------------
# Public functions


def create_keyring(path: str | os.PathLike, names: Iterable[str] = ("default",),
                   passphrase: str | None = None, *, kdf: KdfParams | None = None) -> Keyring:
    """Write a new keyring with a fresh random key per name; never overwrites an existing file."""
    path = os.fspath(path)
    names = list(names)
    if not names:
        raise ConfigError("a keyring needs at least one key name")
    for name in names:
        validate_key_name(name)
    if len(set(names)) != len(names):
        raise ConfigError("keyring key names must be unique")
    if passphrase is not None:
        _passphrase_bytes(passphrase)
        (kdf or DEFAULT_KDF).validate()
    if os.path.lexists(path):
        raise ConfigError(f"{path} already exists: refusing to overwrite a keyring; choose "
                          "another path or add keys to it")
    created = _now()
    keys = {name: os.urandom(MASTER_KEY_BYTES) for name in names}
    info = {name: KeyInfo(name, created, _check_value(k)) for name, k in keys.items()}
    keyring = Keyring(path, keys, info, kdf=(kdf or DEFAULT_KDF) if passphrase else None)
    with _locked(path):
        _write_atomic(path, _encode(keyring, passphrase, kdf), replace=False)
    return keyring


def load_keyring(path: str | os.PathLike, passphrase: str | None = None) -> Keyring:
    """Read a keyring file (mode 0600, owned by you); ``passphrase`` if it is protected."""
    path = os.fspath(path)
    raw = _read_private_file(path, "keyring", MAX_KEYRING_BYTES, _missing_keyring(path))
    return _decode(raw, path, passphrase)


def add_key(path: str | os.PathLike, name: str, passphrase: str | None = None, *,
            kdf: KdfParams | None = None) -> KeyInfo:
    """Add a fresh random key ``name`` to an existing keyring (atomic replace of the file)."""
    path = os.fspath(path)
    validate_key_name(name)
    with _locked(path):
        keyring = load_keyring(path, passphrase)
        if name in keyring:
            raise ConfigError(f"key {name!r} already exists in keyring {path}: choose another "
                              "name")
        key = os.urandom(MASTER_KEY_BYTES)
        keyring._keys[name] = key
        keyring._info[name] = KeyInfo(name, _now(), _check_value(key))
        _write_atomic(path, _encode(keyring, passphrase, kdf or keyring._kdf), replace=True)
    return keyring._info[name]


def change_passphrase(path: str | os.PathLike, passphrase: str | None,
                      new_passphrase: str | None, *, kdf: KdfParams | None = None) -> None:
    """Re-encrypt a keyring under a new passphrase (``None`` on either side: unprotected)."""
    path = os.fspath(path)
    if new_passphrase is not None:
        _passphrase_bytes(new_passphrase)
    with _locked(path):
        keyring = load_keyring(path, passphrase)
        _write_atomic(path, _encode(keyring, new_passphrase, kdf or keyring._kdf), replace=True)


def list_keys(keyring: Keyring | str | os.PathLike, passphrase: str | None = None
              ) -> list[KeyInfo]:
    """Names, creation times and check values of a keyring's keys (never the keys)."""
    if not isinstance(keyring, Keyring):
        keyring = load_keyring(keyring, passphrase)
    return keyring.keys()


def passphrase_from_env_or_file(passphrase_file: str | os.PathLike | None = None) -> str | None:
    """The keyring passphrase: ``passphrase_file`` if given, else ``$DSSEFS_KEYRING_PASSPHRASE``.

    A passphrase file must be private (mode 0600) like the keyring; one trailing newline is
    dropped.  Returns ``None`` when neither is set (the caller may then prompt).
    """
    if passphrase_file is not None:
        path = os.fspath(passphrase_file)
        raw = _read_private_file(path, "passphrase file", MAX_PASSPHRASE_FILE_BYTES,
                                 f"passphrase file {path} does not exist: give the right path")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"passphrase file {path} is not UTF-8 text: rewrite it") from None
        if text.endswith("\r\n"):
            text = text[:-2]
        elif text.endswith("\n"):
            text = text[:-1]
        if not text:
            raise ConfigError(f"passphrase file {path} is empty: write the passphrase into it")
        return text
    value = os.environ.get(PASSPHRASE_ENV)
    if value is None:
        return None
    if not value:
        raise ConfigError(f"{PASSPHRASE_ENV} is set but empty: unset it or set the passphrase")
    return value


# --------------------------------------------------------------------------------------------
# The provider


def wrap_version(ctx: Mapping[str, str]) -> int:
    """The wrapping format an encryption context asks for: its ``dssefs:v`` value, 1 or 2.

    Any other value is a ``ValueError``: contexts are built by dssefs itself, so an unknown
    version is a programming error, not something read from an object.
    """
    value = ctx.get("dssefs:v")
    try:
        return _CONTEXT_VERSIONS[value]
    except (KeyError, TypeError):
        raise ValueError(f"encryption context names format dssefs:v={one_line(repr(value), 40)}; "
                         "the local keyring wraps keys for formats '1' and '2' only") from None


def _aad(version: int, name: str, ctx: Mapping[str, str]) -> bytes:
    return bytes([version]) + name.encode("ascii") + b"\x00" + canonical_context(ctx)


def _other(layer: Layer) -> Layer:
    return Layer.OUTER if layer is Layer.INNER else Layer.INNER


def _name_list(names: Iterable[str] | str, what: str) -> list[str]:
    if isinstance(names, str):
        names = [names]
    out = []
    for name in names:
        try:
            out.append(validate_key_name(name))
        except ConfigError as exc:
            raise ConfigError(f"{what}: {exc}") from None
    return out


class LocalKeyringProvider(KeyProvider):
    """Data keys wrapped locally with AES-256-GCM under keyring master keys.  Thread-safe.

    ``allowed_names_inner`` / ``allowed_names_outer`` name further keyring keys trusted on read for
    one layer each; they only matter under split custody (see the module docstring).
    """

    kind = "local"

    def __init__(self, keyring: Keyring | str | os.PathLike, key_name_inner: str = "default",
                 key_name_outer: str | None = None, *, passphrase: str | None = None,
                 allowed_names_inner: Iterable[str] = (), allowed_names_outer: Iterable[str] = ()):
        inner = validate_key_name(key_name_inner)
        outer = validate_key_name(key_name_outer) if key_name_outer is not None else inner
        extra_in = _name_list(allowed_names_inner, "allowed inner keyring key")
        extra_out = _name_list(allowed_names_outer, "allowed outer keyring key")
        self._split = inner != outer
        # Per-layer trusted names under split custody; None: every key of the keyring, both
        # layers.  The configured names are only needed to wrap new data keys: generate() and
        # check() raise KeyNotFound naming the key and the keyring.
        self._trusted: dict[Layer, set[str]] | None = None
        if self._split:
            names_in = {inner, *extra_in}
            names_out = {outer, *extra_out}
            both = sorted(names_in & names_out)
            if both:
                raise ConfigError(
                    f"keyring key {both[0]!r} is trusted for both layers, but the inner layer uses "
                    f"{inner!r} and the outer layer {outer!r} (split custody), where each key may "
                    "serve one layer only: remove it from the inner or the outer allowed names")
            self._trusted = {Layer.INNER: names_in, Layer.OUTER: names_out}
        if not isinstance(keyring, Keyring):
            keyring = load_keyring(keyring, passphrase)
        self._keyring = keyring
        self._names = {Layer.INNER: inner, Layer.OUTER: outer}
        self._aeads: dict[str, AESGCM] = {}
        self._lock = threading.Lock()
        self._stats = Stats()

    @property
    def keyring(self) -> Keyring:
        return self._keyring

    @property
    def stats(self) -> dict[str, int]:
        """Counts of wrap operations: generate, unwrap, rewrap, describe, and errors."""
        return self._stats.snapshot()

    @property
    def split_custody(self) -> bool:
        return self._split

    def key_id(self, layer: Layer) -> str:
        return self._names[Layer(layer)]

    def trusted_description(self, layer: Layer) -> str:
        layer = Layer(layer)
        if self._trusted is None:
            return f"every key of keyring {self._keyring.path} (both layers)"
        with self._lock:
            names = sorted(self._trusted[layer])
        names.remove(self._names[layer])
        shown = ", ".join(repr(n) for n in [self._names[layer], *names])
        return (f"keyring key{'s' if names else ''} {shown} of {self._keyring.path} "
                f"({layer.value} layer only)")

    def generate(self, layer: Layer, ctx: dict[str, str]) -> tuple[bytes, WrappedKey]:
        layer = Layer(layer)
        ctx = check_context(ctx)
        version = wrap_version(ctx)
        self._stats.add("generate")
        name = self._names[layer]
        data_key = os.urandom(DATA_KEY_BYTES)
        return data_key, WrappedKey(blob=self._wrap(version, name, data_key, ctx), key_id=name)

    def unwrap(self, layer: Layer, wrapped: WrappedKey, ctx: dict[str, str]) -> bytes:
        layer = Layer(layer)
        ctx = check_context(ctx)
        wrap_version(ctx)
        self._stats.add("unwrap")
        try:
            return self._unwrap(layer, wrapped, ctx)
        except KeyProviderError:
            self._stats.add("errors")
            raise

    def rewrap(self, layer: Layer, wrapped: WrappedKey, old_ctx: dict[str, str],
               new_ctx: dict[str, str], new_key_id: str | None = None) -> WrappedKey:
        layer = Layer(layer)
        old_ctx = check_context(old_ctx)
        new_ctx = check_context(new_ctx)
        wrap_version(old_ctx)
        new_version = wrap_version(new_ctx)
        self._stats.add("rewrap")
        try:
            if isinstance(wrapped.key_id, str) and KEY_NAME_RE.fullmatch(wrapped.key_id):
                self._require_trusted(layer, wrapped.key_id, old_ctx)  # the source first
            dest = validate_key_name(new_key_id) if new_key_id is not None else wrapped.key_id
            self._check_destination(layer, dest, new_ctx)
            self._aead(dest)  # unknown destination: fail before touching the data key
            data_key = self._unwrap(layer, wrapped, old_ctx)
            blob = self._wrap(new_version, dest, data_key, new_ctx)
            if self._trusted is not None:
                with self._lock:
                    self._trusted[layer].add(dest)  # chosen by the caller for this layer
            return WrappedKey(blob=blob, key_id=dest)
        except KeyProviderError:
            self._stats.add("errors")
            raise

    def describe(self) -> list[LocalKeyStatus]:
        """The configured keys: layers, name, creation time and check value (no key bytes)."""
        self._stats.add("describe")
        by_name: dict[str, list[str]] = {}
        for layer, name in self._names.items():
            by_name.setdefault(name, []).append(layer.value)
        infos = {i.name: i for i in self._keyring.keys()}
        return [LocalKeyStatus(layers=tuple(layers), key_id=name, created=infos[name].created,
                               check=infos[name].check, keyring=self._keyring.path)
                for name, layers in by_name.items()]

    def check(self) -> list[LocalKeyStatus]:
        """Mount-time check: the configured keys exist (they are verified on load)."""
        for name in set(self._names.values()):
            self._keyring.master_key(name)
        return self.describe()

    def __repr__(self) -> str:
        return (f"LocalKeyringProvider(keyring={self._keyring.path!r}, "
                f"inner={self._names[Layer.INNER]!r}, outer={self._names[Layer.OUTER]!r})")

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("LocalKeyringProvider holds master keys and cannot be pickled")

    # ------------------------------------------------------------------------------------ trust

    def _split_text(self) -> str:
        return (f"split custody: inner {self._names[Layer.INNER]!r}, "
                f"outer {self._names[Layer.OUTER]!r}")

    def _require_trusted(self, layer: Layer, name: str, ctx: Mapping[str, str]) -> None:
        if self._trusted is None:
            return  # one key for both layers: any key of this keyring
        other = _other(layer)
        with self._lock:
            if name in self._trusted[layer]:
                return
            other_layer_only = name in self._trusted[other]
        where = describe_context(ctx)
        what = f"{layer.value} {key_noun(ctx)} of {where} is wrapped by keyring key {name!r}"
        if other_layer_only:
            raise KeyAccessDenied(f"{what}, which this reader trusts only for the {other.value} "
                                  f"layer ({self._split_text()}): refusing a possible forgery")
        raise KeyAccessDenied(
            f"{what}, which this reader does not trust for the {layer.value} layer "
            f"({self._split_text()}): if it is yours, read with it as the {layer.value} key "
            f"({'--kms-key-id' if layer is Layer.INNER else '--kms-key-id-outer'} {name})")

    def _check_destination(self, layer: Layer, dest: str, ctx: Mapping[str, str]) -> None:
        if self._trusted is None:
            return
        other = _other(layer)
        with self._lock:
            wrong = dest in self._trusted[other] and dest not in self._trusted[layer]
        if wrong:
            raise ConfigError(
                f"re-wrapping the {layer.value} {key_noun(ctx)} of {describe_context(ctx)} under "
                f"keyring key {dest!r} would put it under a key trusted only for the "
                f"{other.value} layer ({self._split_text()}): choose a key of the "
                f"{layer.value} layer")

    # ------------------------------------------------------------------------------------ crypto

    def _aead(self, name: str) -> AESGCM:
        with self._lock:
            aead = self._aeads.get(name)
        if aead is None:
            aead = AESGCM(self._keyring.master_key(name))
            with self._lock:
                self._aeads.setdefault(name, aead)
        return aead

    def _check_hex(self, name: str) -> str:
        """The key check value of keyring key ``name`` (16 hex digits, as ``keyring list``)."""
        try:
            return self._keyring.info(name).check
        except KeyNotFound:  # a Keyring built in memory without key facts
            return _check_value(self._keyring.master_key(name))

    def _check8(self, name: str) -> bytes:
        return bytes.fromhex(self._check_hex(name))[:CHECK_BYTES]

    def _wrap(self, version: int, name: str, data_key: bytes, ctx: Mapping[str, str]) -> bytes:
        aead = self._aead(name)
        nonce = os.urandom(NONCE_BYTES)
        sealed = aead.encrypt(nonce, data_key, _aad(version, name, ctx))
        if version == WRAP_VERSION:
            blob = bytes([WRAP_VERSION]) + nonce + sealed
        else:
            blob = bytes([WRAP_VERSION_V2]) + self._check8(name) + nonce + sealed
        assert len(blob) == _BLOB_BYTES[version]
        return blob

    def _unwrap(self, layer: Layer, wrapped: WrappedKey, ctx: Mapping[str, str]) -> bytes:
        version = wrap_version(ctx)
        name = wrapped.key_id
        if not isinstance(name, str) or not KEY_NAME_RE.fullmatch(name):
            raise KeyNotFound(f"key {repr(name)[:80]} is not a keyring key name: this object was "
                              f"not wrapped by a local keyring ({self._keyring.path})")
        self._require_trusted(layer, name, ctx)
        blob = wrapped.blob
        where = describe_context(ctx)
        what = f"wrapped {layer.value} {key_noun(ctx)} of {where}"
        size = _BLOB_BYTES[version]
        if not isinstance(blob, (bytes, bytearray)) or len(blob) != size:
            n = len(blob) if isinstance(blob, (bytes, bytearray)) else 0
            if n and n == _BLOB_BYTES.get(blob[0]):
                raise WrappedKeyMismatch(
                    f"{what} is in keyring wrapping format {blob[0]}, but its encryption context "
                    f"asks for format {version}: the object's metadata was altered")
            raise WrappedKeyMismatch(f"{what} has {n} bytes, not {size} (keyring wrapping format "
                                     f"{version}, as its encryption context asks): the object's "
                                     "metadata was altered")
        if blob[0] != version:
            raise WrappedKeyMismatch(f"{what} starts with wrapping version byte {blob[0]}, but its "
                                     f"encryption context asks for version {version}: the "
                                     "object's metadata was altered")
        blob = bytes(blob)
        check = blob[1:1 + CHECK_BYTES] if version == WRAP_VERSION_V2 else None
        if name not in self._keyring:
            needed = f" (check {check.hex()})" if check is not None else ""
            raise KeyNotFound(
                f"{layer.value} {key_noun(ctx)} of {where} is wrapped by keyring key {name!r}"
                f"{needed}, which keyring {self._keyring.path} does not have (it has "
                f"{', '.join(self._keyring.names()) or 'no keys'}): use the keyring that wrote it")
        aead = self._aead(name)
        start = 1 + (CHECK_BYTES if check is not None else 0)
        nonce = blob[start:start + NONCE_BYTES]
        try:
            data_key = aead.decrypt(nonce, blob[start + NONCE_BYTES:], _aad(version, name, ctx))
        except InvalidTag:
            mine = self._check_hex(name)
            if check is None:
                raise WrappedKeyMismatch(
                    f"{what} does not open with keyring key {name!r} of {self._keyring.path} "
                    f"(check {mine}): either this keyring is not the one that wrote it (compare "
                    "check values with dssefs keyring list on the writer's keyring) or the "
                    "object was altered, or copied or renamed outside dssefs (its encryption "
                    "context differs)") from None
            if not hmac.compare_digest(check, self._check8(name)):
                raise WrongKeyring(
                    f"the {layer.value} {key_noun(ctx)} of {where} needs keyring key {name!r} "
                    f"with check value {check.hex()}, but keyring {self._keyring.path} has a "
                    f"different key of that name (check {mine}): use the keyring that wrote it "
                    "(dssefs keyring list shows check values)") from None
            raise WrappedKeyMismatch(
                f"{what} does not match its encryption context under keyring key {name!r} "
                f"(check {mine}, the key that wrapped it): it was altered, or copied or renamed "
                "outside dssefs; restore it or copy it with dssefs") from None
        if check is not None and not hmac.compare_digest(check, self._check8(name)):
            # It opened, so this is the right key: only the check value was changed.
            mine = self._check_hex(name)
            raise WrappedKeyMismatch(f"{what} carries check value {check.hex()}, not {mine} of "
                                     f"keyring key {name!r} that wrapped it: the object's "
                                     "metadata was altered")
        return data_key
