"""Local keyring: file handling, passphrase protection, key wrapping and its failure modes."""

from __future__ import annotations

import base64
import errno
import json
import os
import pickle
import stat

import pytest

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dssefs.errors import ConfigError, KeyAccessDenied, KeyNotFound, KeyProviderError
from dssefs.kms._common import WrappedKeyMismatch, WrongKeyring, describe_context
from dssefs.kms.base import (DATA_KEY_BYTES, Layer, WrappedKey, context, epoch_context,
                             object_context_v2)
from dssefs.kms.local import (DEFAULT_KDF, PASSPHRASE_ENV, WRAPPED_KEY_BYTES,
                              WRAPPED_KEY_BYTES_V2, KdfParams, Keyring, LocalKeyringProvider,
                              add_key, change_passphrase, create_keyring, list_keys, load_keyring,
                              passphrase_from_env_or_file)
from threads import run_in_threads

FAST = KdfParams(memory_kib=256, iterations=1, lanes=1)
CTX_IN = context(Layer.INNER, "bucket", "dir/file.txt")
CTX_OUT = context(Layer.OUTER, "bucket", "dir/file.txt")


@pytest.fixture
def kr_path(tmp_path):
    return str(tmp_path / "keyring.json")


@pytest.fixture
def keyring(kr_path):
    return create_keyring(kr_path, ["default", "second"])


@pytest.fixture
def provider(keyring):
    return LocalKeyringProvider(keyring)


def secret_forms(*secrets: bytes) -> list[str]:
    """Every way a key could show up in text: hex, base64 (std and url), repr."""
    out = []
    for s in secrets:
        out += [s.hex(), base64.b64encode(s).decode(), base64.urlsafe_b64encode(s).decode(),
                repr(s)[2:-1], base64.b64encode(s).decode().rstrip("=")]
    return out


def assert_no_secrets(text: str, *secrets: bytes) -> None:
    for form in secret_forms(*secrets):
        assert form not in text


def master_keys(keyring: Keyring) -> list[bytes]:
    return [keyring.master_key(n) for n in keyring.names()]


# ---------------------------------------------------------------------------- keyring files


def test_create_load_round_trip(kr_path):
    created = create_keyring(kr_path, ["default", "archive"])
    assert stat.S_IMODE(os.stat(kr_path).st_mode) == 0o600
    doc = json.loads(open(kr_path).read())
    assert doc["format"] == "dssefs-keyring" and doc["version"] == 1
    assert doc["protection"] == "none"
    assert set(doc["keys"]) == {"default", "archive"}
    loaded = load_keyring(kr_path)
    assert loaded.names() == ["archive", "default"]
    for name in ("default", "archive"):
        assert loaded.master_key(name) == created.master_key(name)
        assert len(loaded.master_key(name)) == 32
    assert loaded.master_key("default") != loaded.master_key("archive")
    assert not loaded.protected
    # no temporary files left behind
    assert os.listdir(os.path.dirname(kr_path)) == ["keyring.json"]


def test_create_refuses_overwrite(kr_path):
    create_keyring(kr_path)
    before = open(kr_path, "rb").read()
    with pytest.raises(ConfigError, match="already exists"):
        create_keyring(kr_path)
    assert open(kr_path, "rb").read() == before
    assert len(os.listdir(os.path.dirname(kr_path))) == 1


def test_create_refuses_overwrite_of_any_file(tmp_path):
    p = tmp_path / "other"
    p.write_text("precious")
    with pytest.raises(ConfigError, match="already exists"):
        create_keyring(str(p))
    assert p.read_text() == "precious"


def test_create_in_missing_directory(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        create_keyring(str(tmp_path / "nope" / "keyring.json"))


def test_missing_keyring_message(kr_path):
    with pytest.raises(ConfigError) as ei:
        load_keyring(kr_path)
    msg = str(ei.value)
    assert f"keyring {kr_path} does not exist" in msg
    assert f"dssefs keyring create {kr_path}" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o660, 0o644, 0o610])
def test_load_refuses_group_or_other_access(keyring, kr_path, mode):
    os.chmod(kr_path, mode)
    with pytest.raises(ConfigError) as ei:
        load_keyring(kr_path)
    assert f"chmod 600 {kr_path}" in str(ei.value)
    assert "\n" not in str(ei.value)


def test_load_accepts_owner_only_modes(keyring, kr_path):
    os.chmod(kr_path, 0o400)
    assert load_keyring(kr_path).names() == ["default", "second"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_load_refuses_file_of_another_user(keyring, kr_path):
    os.chown(kr_path, 4242, 4242)
    with pytest.raises(ConfigError, match="owned by uid 4242"):
        load_keyring(kr_path)


def test_load_refuses_directory(tmp_path):
    d = tmp_path / "dir"
    d.mkdir(mode=0o700)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_keyring(str(d))


def test_load_refuses_fifo_without_blocking(tmp_path):
    p = tmp_path / "fifo"
    os.mkfifo(p, 0o600)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_keyring(str(p))


def test_add_key(keyring, kr_path):
    before = {n: keyring.master_key(n) for n in keyring.names()}
    info = add_key(kr_path, "rotated-2025")
    assert info.name == "rotated-2025" and len(info.check) == 16
    loaded = load_keyring(kr_path)
    assert loaded.names() == ["default", "rotated-2025", "second"]
    for n, k in before.items():
        assert loaded.master_key(n) == k
    assert stat.S_IMODE(os.stat(kr_path).st_mode) == 0o600
    assert os.listdir(os.path.dirname(kr_path)) == ["keyring.json"]
    with pytest.raises(ConfigError, match="already exists"):
        add_key(kr_path, "default")
    assert load_keyring(kr_path).master_key("default") == before["default"]


def test_add_key_concurrently_loses_nothing(keyring, kr_path):
    names = [f"k{i}" for i in range(8)]
    errors = []

    def worker(name):
        try:
            add_key(kr_path, name)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    run_in_threads(worker, names)
    assert not errors
    assert set(load_keyring(kr_path).names()) == {"default", "second", *names}


def test_list_keys_never_shows_key_bytes(keyring, kr_path):
    infos = list_keys(kr_path)
    assert [i.name for i in infos] == ["default", "second"]
    for i in infos:
        assert i.created.endswith("Z") and len(i.check) == 16
    text = repr(infos) + str(infos) + repr(keyring) + str(keyring) + repr(list_keys(keyring))
    assert_no_secrets(text, *master_keys(keyring))


def test_keyring_cannot_be_pickled(keyring, provider):
    with pytest.raises(TypeError):
        pickle.dumps(keyring)
    with pytest.raises(TypeError):
        pickle.dumps(provider)


@pytest.mark.parametrize("name", ["", "a" * 65, "a b", "a/b", "../x", "ключ", "a:b", "x\n",
                                  "a\x00"])
def test_key_names_validated(kr_path, name):
    with pytest.raises(ConfigError, match="key name"):
        create_keyring(kr_path, [name])
    assert not os.path.exists(kr_path)


@pytest.mark.parametrize("name", ["a", "A-Z_0.9", "x" * 64, "2025-01.rotated"])
def test_valid_key_names(tmp_path, name):
    create_keyring(str(tmp_path / "k"), [name])
    assert load_keyring(str(tmp_path / "k")).names() == [name]


def test_add_key_validates_name(keyring, kr_path):
    with pytest.raises(ConfigError, match="key name"):
        add_key(kr_path, "bad name")


def test_duplicate_and_empty_names_refused(kr_path):
    with pytest.raises(ConfigError):
        create_keyring(kr_path, ["a", "a"])
    with pytest.raises(ConfigError):
        create_keyring(kr_path, [])


# ---------------------------------------------------------------------------- passphrase


def test_passphrase_round_trip(kr_path):
    created = create_keyring(kr_path, ["default"], passphrase="correct horse", kdf=FAST)
    assert created.protected
    text = open(kr_path).read()
    doc = json.loads(text)
    assert doc["protection"] == "argon2id+aes-256-gcm"
    assert "keys" not in doc and "default" not in text  # names and keys are encrypted
    assert doc["kdf"] == {"name": "argon2id", "memory_kib": 256, "iterations": 1, "lanes": 1,
                          "salt": doc["kdf"]["salt"]}
    assert_no_secrets(text, created.master_key("default"))
    loaded = load_keyring(kr_path, "correct horse")
    assert loaded.master_key("default") == created.master_key("default")
    assert loaded.protected


def test_wrong_passphrase(kr_path):
    create_keyring(kr_path, passphrase="right", kdf=FAST)
    with pytest.raises(KeyAccessDenied) as ei:
        load_keyring(kr_path, "wrong")
    assert str(ei.value).startswith("wrong keyring passphrase")
    assert ei.value.errno == errno.EACCES
    assert "\n" not in str(ei.value)


def test_protected_keyring_without_passphrase(kr_path):
    create_keyring(kr_path, passphrase="pw", kdf=FAST)
    with pytest.raises(KeyAccessDenied, match=PASSPHRASE_ENV):
        load_keyring(kr_path)


def test_passphrase_for_unprotected_keyring_refused(keyring, kr_path):
    with pytest.raises(ConfigError, match="not passphrase-protected"):
        load_keyring(kr_path, "pw")


def test_passphrase_unicode_normalised(kr_path):
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    created = create_keyring(kr_path, passphrase=composed, kdf=FAST)
    assert load_keyring(kr_path, decomposed).master_key("default") == \
        created.master_key("default")


def test_empty_passphrase_refused(kr_path):
    with pytest.raises(ConfigError, match="empty"):
        create_keyring(kr_path, passphrase="", kdf=FAST)
    assert not os.path.exists(kr_path)


def test_default_argon2_parameters(kr_path):
    """The real default (64 MiB, t=3, p=4) once, end to end."""
    assert DEFAULT_KDF == KdfParams(65536, 3, 4)
    created = create_keyring(kr_path, passphrase="pw")
    kdf = json.loads(open(kr_path).read())["kdf"]
    assert (kdf["memory_kib"], kdf["iterations"], kdf["lanes"]) == (65536, 3, 4)
    assert len(base64.b64decode(kdf["salt"])) == 16
    assert load_keyring(kr_path, "pw").master_key("default") == created.master_key("default")


def test_add_key_keeps_protection_and_parameters(kr_path):
    create_keyring(kr_path, passphrase="pw", kdf=FAST)
    salt1 = json.loads(open(kr_path).read())["kdf"]["salt"]
    add_key(kr_path, "second", "pw")
    doc = json.loads(open(kr_path).read())
    assert doc["kdf"]["memory_kib"] == 256 and doc["kdf"]["salt"] != salt1
    assert load_keyring(kr_path, "pw").names() == ["default", "second"]
    with pytest.raises(KeyAccessDenied):
        add_key(kr_path, "third", "wrong")


def test_change_passphrase(kr_path):
    created = create_keyring(kr_path, passphrase="old", kdf=FAST)
    change_passphrase(kr_path, "old", "new")
    with pytest.raises(KeyAccessDenied):
        load_keyring(kr_path, "old")
    assert load_keyring(kr_path, "new").master_key("default") == created.master_key("default")
    change_passphrase(kr_path, "new", None)
    assert not load_keyring(kr_path).protected
    change_passphrase(kr_path, None, "again", kdf=FAST)
    assert load_keyring(kr_path, "again").master_key("default") == created.master_key("default")
    assert stat.S_IMODE(os.stat(kr_path).st_mode) == 0o600


def _edit(path, fn):
    doc = json.loads(open(path).read())
    fn(doc)
    with open(path, "w") as f:
        json.dump(doc, f)


@pytest.mark.parametrize("field,value", [
    ("memory_kib", 512), ("iterations", 2), ("lanes", 2),
    ("salt", base64.b64encode(b"\x00" * 16).decode()),
])
def test_tampered_protected_header_refused(kr_path, field, value):
    create_keyring(kr_path, passphrase="pw", kdf=FAST)
    _edit(kr_path, lambda d: d["kdf"].__setitem__(field, value))
    with pytest.raises(KeyAccessDenied, match="wrong keyring passphrase"):
        load_keyring(kr_path, "pw")


def test_tampered_protected_ciphertext_refused(kr_path):
    create_keyring(kr_path, passphrase="pw", kdf=FAST)

    def flip(doc):
        ct = bytearray(base64.b64decode(doc["ciphertext"]))
        ct[5] ^= 1
        doc["ciphertext"] = base64.b64encode(bytes(ct)).decode()

    _edit(kr_path, flip)
    with pytest.raises(KeyAccessDenied):
        load_keyring(kr_path, "pw")


def test_tampered_protected_nonce_refused(kr_path):
    create_keyring(kr_path, passphrase="pw", kdf=FAST)
    _edit(kr_path, lambda d: d.__setitem__("nonce", base64.b64encode(b"\x01" * 12).decode()))
    with pytest.raises(KeyAccessDenied):
        load_keyring(kr_path, "pw")


def test_tampered_plain_key_refused(keyring, kr_path):
    def flip(doc):
        k = bytearray(base64.b64decode(doc["keys"]["default"]["key"]))
        k[0] ^= 0x80
        doc["keys"]["default"]["key"] = base64.b64encode(bytes(k)).decode()

    _edit(kr_path, flip)
    with pytest.raises(ConfigError, match="check value") as ei:
        load_keyring(kr_path)
    assert_no_secrets(str(ei.value), *master_keys(keyring))


@pytest.mark.parametrize("edit", [
    lambda d: d.__setitem__("format", "something-else"),
    lambda d: d.__setitem__("version", 2),
    lambda d: d.__setitem__("protection", "rot13"),
    lambda d: d.__setitem__("extra", 1),
    lambda d: d["keys"]["default"].__setitem__("key", "not base64!"),
    lambda d: d["keys"]["default"].__setitem__("key", base64.b64encode(b"short").decode()),
    lambda d: d["keys"]["default"].__setitem__("created", "yesterday"),
    lambda d: d["keys"]["default"].pop("check"),
    lambda d: d.__setitem__("keys", {}),
    lambda d: d["keys"].__setitem__("bad name", d["keys"]["default"]),
])
def test_malformed_plain_keyring_refused(keyring, kr_path, edit):
    _edit(kr_path, edit)
    with pytest.raises(ConfigError) as ei:
        load_keyring(kr_path)
    assert "\n" not in str(ei.value)
    assert_no_secrets(str(ei.value), *master_keys(keyring))


def test_not_json_refused(kr_path):
    fd = os.open(kr_path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"\x00garbage")
    os.close(fd)
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_keyring(kr_path)


# ---------------------------------------------------------------------------- passphrase source


def _private_file(path, text):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, text.encode())
    os.close(fd)
    return str(path)


def test_passphrase_from_env(monkeypatch):
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)
    assert passphrase_from_env_or_file() is None
    monkeypatch.setenv(PASSPHRASE_ENV, "s3cret")
    assert passphrase_from_env_or_file() == "s3cret"
    monkeypatch.setenv(PASSPHRASE_ENV, "")
    with pytest.raises(ConfigError, match="empty"):
        passphrase_from_env_or_file()


def test_passphrase_from_file(tmp_path, monkeypatch):
    monkeypatch.setenv(PASSPHRASE_ENV, "from-env")
    p = _private_file(tmp_path / "pw", "from file \n")
    assert passphrase_from_env_or_file(p) == "from file "  # one newline dropped, file wins
    _private_file(tmp_path / "pw", "crlf\r\n")
    assert passphrase_from_env_or_file(p) == "crlf"
    _private_file(tmp_path / "pw", "\n")
    with pytest.raises(ConfigError, match="empty"):
        passphrase_from_env_or_file(p)
    os.chmod(p, 0o644)
    with pytest.raises(ConfigError, match=f"chmod 600 {p}"):
        passphrase_from_env_or_file(p)
    with pytest.raises(ConfigError, match="does not exist"):
        passphrase_from_env_or_file(str(tmp_path / "missing"))


# ---------------------------------------------------------------------------- provider


def test_generate_unwrap_round_trip(provider):
    assert provider.kind == "local"
    assert provider.key_id(Layer.INNER) == provider.key_id(Layer.OUTER) == "default"
    dk_in, w_in = provider.generate(Layer.INNER, CTX_IN)
    dk_out, w_out = provider.generate(Layer.OUTER, CTX_OUT)
    assert len(dk_in) == len(dk_out) == DATA_KEY_BYTES and dk_in != dk_out
    assert len(w_in.blob) == WRAPPED_KEY_BYTES == 61 and w_in.blob[0] == 0x01
    assert w_in.key_id == "default"
    assert w_in.blob[1:13] != w_out.blob[1:13]  # fresh nonces
    assert provider.unwrap(Layer.INNER, w_in, CTX_IN) == dk_in
    assert provider.unwrap(Layer.OUTER, w_out, CTX_OUT) == dk_out
    assert provider.stats == {"generate": 2, "unwrap": 2, "rewrap": 0, "describe": 0,
                              "errors": 0}


def test_documented_wrapping_format(keyring, provider):
    """The blob decrypts with the AAD documented in dssefs.kms.local, using independent code."""
    dk, w = provider.generate(Layer.INNER, CTX_IN)
    aad = (b"\x01" + b"default" + b"\x00"
           + json.dumps(CTX_IN, sort_keys=True, separators=(",", ":")).encode())
    assert AESGCM(keyring.master_key("default")).decrypt(w.blob[1:13], w.blob[13:], aad) == dk


def test_loaded_from_path(keyring, kr_path):
    p = LocalKeyringProvider(kr_path, "second")
    dk, w = p.generate(Layer.INNER, CTX_IN)
    assert LocalKeyringProvider(load_keyring(kr_path), "second").unwrap(Layer.INNER, w,
                                                                        CTX_IN) == dk


def test_split_keys(keyring):
    p = LocalKeyringProvider(keyring, "default", "second")
    assert p.key_id(Layer.INNER) == "default" and p.key_id(Layer.OUTER) == "second"
    _, w_in = p.generate(Layer.INNER, CTX_IN)
    dk_out, w_out = p.generate(Layer.OUTER, CTX_OUT)
    assert (w_in.key_id, w_out.key_id) == ("default", "second")
    assert p.unwrap(Layer.OUTER, w_out, CTX_OUT) == dk_out
    # the outer wrapped key claims to be under "default", the inner layer's key: refused
    with pytest.raises(KeyAccessDenied, match="trusts only for the inner layer"):
        p.unwrap(Layer.OUTER, WrappedKey(w_out.blob, "default"), CTX_OUT)


@pytest.mark.parametrize("other", [
    context(Layer.OUTER, "bucket", "dir/file.txt"),
    context(Layer.INNER, "bucket2", "dir/file.txt"),
    context(Layer.INNER, "bucket", "dir/file.txt2"),
    context(Layer.INNER, "bucket", "dir/File.txt"),
    {**CTX_IN, "dssefs:v": "2"},
    {**CTX_IN, "extra": "x"},
])
def test_wrong_context_refused(provider, keyring, other):
    dk, w = provider.generate(Layer.INNER, CTX_IN)
    with pytest.raises(WrappedKeyMismatch) as ei:
        provider.unwrap(Layer.INNER, w, other)
    err = ei.value
    assert isinstance(err, KeyAccessDenied) and err.errno == errno.EACCES
    assert "encryption context" in str(err) and "\n" not in str(err)
    assert_no_secrets(str(err), dk, *master_keys(keyring))
    assert provider.stats["errors"] == 1


def test_every_blob_byte_is_authenticated(provider):
    dk, w = provider.generate(Layer.INNER, CTX_IN)
    for i in range(len(w.blob)):
        for bit in (0x01, 0x80):
            blob = bytearray(w.blob)
            blob[i] ^= bit
            with pytest.raises(KeyProviderError) as ei:
                provider.unwrap(Layer.INNER, WrappedKey(bytes(blob), w.key_id), CTX_IN)
            if i == 0:
                assert "version" in str(ei.value)
            else:
                assert isinstance(ei.value, WrappedKeyMismatch)
            assert_no_secrets(str(ei.value), dk)


@pytest.mark.parametrize("blob", [b"", b"\x01", b"\x01" + b"\x00" * 59, b"\x01" + b"\x00" * 61])
def test_wrong_length_blob_refused(provider, blob):
    with pytest.raises(WrappedKeyMismatch, match="bytes"):
        provider.unwrap(Layer.INNER, WrappedKey(blob, "default"), CTX_IN)


def test_unknown_key_name(keyring, kr_path, provider):
    _, w = provider.generate(Layer.INNER, CTX_IN)
    with pytest.raises(KeyNotFound) as ei:
        provider.unwrap(Layer.INNER, WrappedKey(w.blob, "retired"), CTX_IN)
    assert "'retired'" in str(ei.value) and kr_path in str(ei.value)
    # a missing configured key only matters for new data keys: reading works with any key
    missing = LocalKeyringProvider(keyring, "missing")
    assert missing.unwrap(Layer.INNER, w, CTX_IN)
    for call in (lambda: missing.generate(Layer.INNER, CTX_IN), missing.check):
        with pytest.raises(KeyNotFound) as ei:
            call()
        assert "'missing'" in str(ei.value) and kr_path in str(ei.value)
    with pytest.raises(KeyNotFound):
        provider.unwrap(Layer.INNER, WrappedKey(w.blob, "arn:aws:kms:us-east-1:1:key/x"), CTX_IN)
    with pytest.raises(ConfigError):
        LocalKeyringProvider(keyring, "bad name")


def test_rewrap_to_other_key_and_context(keyring, provider):
    dk, w = provider.generate(Layer.INNER, CTX_IN)
    new_ctx = context(Layer.INNER, "bucket", "renamed.txt")
    w2 = provider.rewrap(Layer.INNER, w, CTX_IN, new_ctx, new_key_id="second")
    assert w2.key_id == "second" and len(w2.blob) == 61 and w2.blob != w.blob
    assert provider.unwrap(Layer.INNER, w2, new_ctx) == dk
    with pytest.raises(WrappedKeyMismatch):
        provider.unwrap(Layer.INNER, w2, CTX_IN)
    # same key, new context only
    w3 = provider.rewrap(Layer.INNER, w, CTX_IN, new_ctx)
    assert w3.key_id == "default" and provider.unwrap(Layer.INNER, w3, new_ctx) == dk
    assert provider.stats["rewrap"] == 2


def test_rewrap_failures(provider, kr_path):
    _, w = provider.generate(Layer.INNER, CTX_IN)
    new_ctx = context(Layer.INNER, "bucket", "renamed.txt")
    with pytest.raises(WrappedKeyMismatch):
        provider.rewrap(Layer.INNER, w, new_ctx, new_ctx)
    with pytest.raises(KeyNotFound, match=kr_path):
        provider.rewrap(Layer.INNER, w, CTX_IN, new_ctx, new_key_id="nope")
    with pytest.raises(ConfigError):
        provider.rewrap(Layer.INNER, w, CTX_IN, new_ctx, new_key_id="no/slashes")


def test_repr_and_describe_redacted(keyring, provider):
    dk, _ = provider.generate(Layer.INNER, CTX_IN)
    text = repr(provider) + str(provider) + repr(provider.describe()) + repr(provider.check())
    assert "default" in text
    assert_no_secrets(text, dk, *master_keys(keyring))


def test_thread_safety(provider):
    results = []

    def worker(i):
        ctx = context(Layer.INNER, "bucket", f"obj{i}")
        for _ in range(50):
            dk, w = provider.generate(Layer.INNER, ctx)
            results.append(provider.unwrap(Layer.INNER, w, ctx) == dk)

    run_in_threads(worker, range(8))
    assert len(results) == 400 and all(results)
    assert provider.stats["generate"] == provider.stats["unwrap"] == 400


# ---------------------------------------------------------------------------- make_provider


def test_make_provider_keyring(keyring, kr_path):
    from dssefs.kms import make_provider

    p = make_provider(keyring=kr_path)
    assert isinstance(p, LocalKeyringProvider) and p.key_id(Layer.OUTER) == "default"
    p = make_provider(keyring=keyring, kms_key_id="second", region="eu-west-1")
    assert p.key_id(Layer.INNER) == p.key_id(Layer.OUTER) == "second"
    p = make_provider(keyring=kr_path, kms_key_id="default", kms_key_id_outer="second")
    assert (p.key_id(Layer.INNER), p.key_id(Layer.OUTER)) == ("default", "second")


def test_make_provider_keyring_with_passphrase(kr_path):
    from dssefs.kms import make_provider

    create_keyring(kr_path, passphrase="pw", kdf=FAST)
    assert make_provider(keyring=kr_path, keyring_passphrase="pw").kind == "local"
    with pytest.raises(KeyAccessDenied):
        make_provider(keyring=kr_path)


@pytest.mark.parametrize("kid", [
    "alias/prod", "12345678-1234-1234-1234-123456789012",
    "arn:aws:kms:us-east-1:123456789012:key/12345678-1234-1234-1234-123456789012",
])
def test_make_provider_refuses_kms_id_with_keyring(keyring, kr_path, kid):
    from dssefs.kms import make_provider

    with pytest.raises(ConfigError, match="is a KMS key but a keyring was given"):
        make_provider(keyring=kr_path, kms_key_id=kid)
    with pytest.raises(ConfigError, match="KMS"):
        make_provider(keyring=kr_path, kms_allowed_key_ids=[kid])


def test_make_provider_needs_something():
    from dssefs.kms import make_provider

    with pytest.raises(ConfigError, match="no key provider configured"):
        make_provider()
    with pytest.raises(ConfigError, match="not a KMS key id"):
        make_provider(kms_key_id="default")
    with pytest.raises(ConfigError, match="without a keyring"):
        make_provider(kms_key_id="alias/x", keyring_passphrase="pw")
    with pytest.raises(ConfigError, match="outer KMS key"):
        make_provider(kms_key_id_outer="alias/x")


def test_ensure_kind(provider):
    from dssefs.kms import ensure_kind

    ensure_kind(provider, "local")
    with pytest.raises(KeyNotFound, match="'kms' key provider"):
        ensure_kind(provider, "kms", "'b/k'")


# ---------------------------------------------------------------------------- wrapping format 2

EPOCH = "0123abcd" * 4
ECTX_IN = epoch_context(Layer.INNER, "bucket", "photos/", EPOCH)
ECTX_OUT = epoch_context(Layer.OUTER, "bucket", "photos/", EPOCH)
OCTX_IN = object_context_v2(Layer.INNER, "bucket", "photos/a.jpg", EPOCH)


def test_v2_contexts():
    assert ECTX_OUT == {"dssefs:v": "2", "dssefs:layer": "outer", "dssefs:bucket": "bucket",
                        "dssefs:prefix": "photos/", "dssefs:epoch": EPOCH}
    assert OCTX_IN == {"dssefs:v": "2", "dssefs:layer": "inner", "dssefs:bucket": "bucket",
                       "dssefs:key": "photos/a.jpg", "dssefs:epoch": EPOCH}
    assert context(Layer.INNER, "b", "k")["dssefs:v"] == "1"
    assert describe_context(ECTX_OUT) == "'bucket/photos/' (epoch 0123abcd)"
    assert describe_context(OCTX_IN) == "'bucket/photos/a.jpg'"
    assert describe_context(CTX_IN) == "'bucket/dir/file.txt'"
    weird = {**ECTX_OUT, "dssefs:epoch": "zz\nzz", "dssefs:prefix": "a\nb"}
    assert "\n" not in describe_context(weird) and describe_context({"x": "y"}) == "this object"


@pytest.mark.parametrize("ctx", [ECTX_IN, ECTX_OUT, OCTX_IN])
def test_v2_blob_layout(keyring, provider, ctx):
    layer = Layer(ctx["dssefs:layer"])
    dk, w = provider.generate(layer, ctx)
    assert len(w.blob) == WRAPPED_KEY_BYTES_V2 == 69 and w.blob[0] == 0x02
    check = {i.name: i.check for i in list_keys(keyring)}["default"]
    assert w.blob[1:9] == bytes.fromhex(check)
    # independent decoding with the documented AAD
    aad = (b"\x02" + b"default" + b"\x00"
           + json.dumps(ctx, sort_keys=True, separators=(",", ":")).encode())
    assert AESGCM(keyring.master_key("default")).decrypt(w.blob[9:21], w.blob[21:], aad) == dk
    assert provider.unwrap(layer, w, ctx) == dk


def test_v1_context_still_gives_v1_blobs(provider):
    dk, w = provider.generate(Layer.OUTER, CTX_OUT)
    assert len(w.blob) == 61 and w.blob[0] == 0x01
    w2 = provider.rewrap(Layer.OUTER, w, CTX_OUT, context(Layer.OUTER, "bucket", "x"))
    assert len(w2.blob) == 61 and w2.blob[0] == 0x01


def test_v2_rewrap(provider):
    dk, w = provider.generate(Layer.INNER, CTX_IN)
    other = epoch_context(Layer.INNER, "bucket", "photos/", "f" * 32)
    w2 = provider.rewrap(Layer.INNER, w, CTX_IN, ECTX_IN, new_key_id="second")  # format 1 -> 2
    assert len(w2.blob) == 69 and w2.key_id == "second"
    assert provider.unwrap(Layer.INNER, w2, ECTX_IN) == dk
    w3 = provider.rewrap(Layer.INNER, w2, ECTX_IN, other)
    assert provider.unwrap(Layer.INNER, w3, other) == dk
    with pytest.raises(WrappedKeyMismatch, match="encryption context"):
        provider.unwrap(Layer.INNER, w3, ECTX_IN)
    w4 = provider.rewrap(Layer.INNER, w3, other, CTX_IN)  # and back to format 1
    assert len(w4.blob) == 61 and provider.unwrap(Layer.INNER, w4, CTX_IN) == dk


def test_v2_wrong_keyring(tmp_path, provider, keyring):
    """Two keyrings, each with its own 'default': the check value tells which one is needed."""
    dk, w = provider.generate(Layer.OUTER, ECTX_OUT)
    other_path = str(tmp_path / "other-keyring")
    other = create_keyring(other_path, ["default"])
    reader = LocalKeyringProvider(other)
    with pytest.raises(WrongKeyring) as ei:
        reader.unwrap(Layer.OUTER, w, ECTX_OUT)
    err = ei.value
    assert isinstance(err, KeyNotFound) and err.errno == errno.EACCES
    mine, theirs = keyring.keys()[0].check, other.keys()[0].check
    assert str(err) == (
        f"the outer epoch key of 'bucket/photos/' (epoch 0123abcd) needs keyring key 'default' "
        f"with check value {mine}, but keyring {other_path} has a different key of that name "
        f"(check {theirs}): use the keyring that wrote it (dssefs keyring list shows check values)")
    assert_no_secrets(str(err), dk, *master_keys(keyring), *master_keys(other))
    assert reader.stats["errors"] == 1
    from dssefs.kms import WrongKeyring as exported
    assert exported is WrongKeyring


def test_v1_wrong_keyring_names_both_causes(tmp_path, provider, keyring):
    _, w = provider.generate(Layer.INNER, CTX_IN)
    other_path = str(tmp_path / "other-keyring")
    other = create_keyring(other_path, ["default"])
    with pytest.raises(WrappedKeyMismatch) as ei:
        LocalKeyringProvider(other).unwrap(Layer.INNER, w, CTX_IN)
    msg = str(ei.value)
    assert msg.startswith(f"wrapped inner data key of 'bucket/dir/file.txt' does not open with "
                          f"keyring key 'default' of {other_path} (check {other.keys()[0].check}"
                          "): either this keyring is not the one that wrote it (compare check "
                          "values with dssefs keyring list on the writer's keyring) or the object "
                          "was altered")
    assert "\n" not in msg


def test_every_v2_blob_byte_is_authenticated(provider):
    """Whatever byte is changed, the blob is refused as altered, never as a wrong keyring."""
    dk, w = provider.generate(Layer.OUTER, ECTX_OUT)
    for i in range(len(w.blob)):
        for bit in (0x01, 0x80):
            blob = bytearray(w.blob)
            blob[i] ^= bit
            with pytest.raises(WrappedKeyMismatch) as ei:
                provider.unwrap(Layer.OUTER, WrappedKey(bytes(blob), w.key_id), ECTX_OUT)
            msg = str(ei.value)
            assert "altered" in msg and "\n" not in msg
            if 1 <= i < 9:
                assert "check value" in msg
            assert_no_secrets(msg, dk)


@pytest.mark.parametrize("writer_ctx, reader_ctx", [(CTX_IN, OCTX_IN), (OCTX_IN, CTX_IN)])
def test_blob_of_the_other_format_refused(provider, writer_ctx, reader_ctx):
    _, w = provider.generate(Layer.INNER, writer_ctx)
    with pytest.raises(WrappedKeyMismatch) as ei:
        provider.unwrap(Layer.INNER, w, reader_ctx)
    want, got = reader_ctx["dssefs:v"], writer_ctx["dssefs:v"]
    assert f"is in keyring wrapping format {got}, but its encryption context asks for format " \
        f"{want}: the object's metadata was altered" in str(ei.value)


@pytest.mark.parametrize("blob, text", [
    (b"\x02" * 68, "has 68 bytes, not 69"), (b"\x02" * 70, "has 70 bytes, not 69"),
    (b"", "has 0 bytes, not 69"), (b"\x01" * 69, "starts with wrapping version byte 1"),
], ids=["short", "long", "empty", "version-byte"])
def test_v2_malformed_blob_refused(provider, blob, text):
    with pytest.raises(WrappedKeyMismatch, match=text):
        provider.unwrap(Layer.INNER, WrappedKey(blob, "default"), ECTX_IN)


@pytest.mark.parametrize("version", ["0", "3", "", "1.0", None])
def test_unknown_context_version_is_a_value_error(provider, version):
    dk, w = provider.generate(Layer.INNER, CTX_IN)
    bad = {**CTX_IN, "dssefs:v": version} if version is not None else \
        {k: v for k, v in CTX_IN.items() if k != "dssefs:v"}
    with pytest.raises(ValueError, match="dssefs:v"):
        provider.generate(Layer.INNER, bad)
    with pytest.raises(ValueError):
        provider.unwrap(Layer.INNER, w, bad)
    with pytest.raises(ValueError):
        provider.rewrap(Layer.INNER, w, CTX_IN, bad)
    with pytest.raises(ValueError):
        provider.rewrap(Layer.INNER, w, bad, CTX_IN)


def test_v2_unknown_key_name(provider, kr_path, keyring):
    add_key(kr_path, "retired")
    writer = LocalKeyringProvider(load_keyring(kr_path), "retired")
    _, w = writer.generate(Layer.OUTER, ECTX_OUT)
    check = load_keyring(kr_path).info("retired").check
    with pytest.raises(KeyNotFound) as ei:
        provider.unwrap(Layer.OUTER, w, ECTX_OUT)  # the keyring as it was before the key was added
    assert str(ei.value) == (
        f"outer epoch key of 'bucket/photos/' (epoch 0123abcd) is wrapped by keyring key "
        f"'retired' (check {check}), which keyring {kr_path} does not have (it has default, "
        "second): use the keyring that wrote it")
    assert not isinstance(ei.value, WrongKeyring)
