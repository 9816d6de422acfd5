"""The ``dssefs`` command: object commands (no mount needed), keyrings, the benchmark, and the mount.

Every failure ends in one line on stderr naming the problem and the fix, and a non-zero exit
status; set ``DSSEFS_DEBUG=1`` to see tracebacks.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import sys
import tempfile
from typing import Iterator

from . import __version__, config, kms, store
from .errors import (ConfigError, DssefsError, IntegrityError, KeyAccessDenied, NotDssefsObject,
                     ObjectNotFound, PreconditionFailed)
from .envelope.epoch import is_reserved_key
from .session import announce_keyring, explicit_keys, key_provider, store_options, vault_for

EXIT_FAIL = 1
EXIT_USAGE = 2

DESCRIPTION = """\
dssefs keeps files in S3 (or a local directory store) under two independent layers of
AES-256-GCM: the inner layer with OpenSSL (cryptography), the outer layer with pycryptodome, each
with its own data key, both wrapped by AWS KMS or a local keyring and kept in object metadata.

URIs name objects: s3://BUCKET/KEY, or file:///DIR/KEY for a local directory store.
Keys: --kms-key-id selects AWS KMS (boto3's credential chain; AWS_ENDPOINT_URL[_S3|_KMS] honoured);
--keyring selects a local keyring; with neither, the default keyring
$XDG_CONFIG_HOME/dssefs/keyring is used (created on first write).
"""

EPILOG = """\
examples:
  dssefs put report.pdf s3://my-bucket/docs/report.pdf --kms-key-id alias/dssefs
  dssefs get s3://my-bucket/docs/report.pdf report.pdf --kms-key-id alias/dssefs
  dssefs verify s3://my-bucket/docs/ --kms-key-id alias/dssefs
  dssefs put notes.txt file:///srv/vault/notes.txt       (default keyring)
  dssefs mount s3://my-bucket /mnt/secure --kms-key-id alias/dssefs
  mount -t fuse.dssefs s3://my-bucket /mnt/secure -o kms_key_id=alias/dssefs   (via mount.fuse3)
run 'dssefs COMMAND --help' for a command's options.
"""

COMMANDS = ("put", "get", "cat", "ls", "rm", "inspect", "verify", "rekey", "keyring", "config", "bench",
            "mount", "umount", "status", "service")
#: Commands with their own parsers (and --help), dispatched before the object commands' parser.
OWN_PARSERS = ("mount", "umount", "status", "service")


# ---- helpers ------------------------------------------------------------------------------------

def _progress(total: int, desc: str, unit: str = "B"):
    from tqdm import tqdm

    if unit == "B":
        return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                    disable=None, file=sys.stderr, leave=False)
    return tqdm(total=total, desc=desc, unit=unit, disable=None, file=sys.stderr, leave=False)


def _settings(ns: argparse.Namespace) -> config.Settings:
    return config.settings_from(ns)


def _object(ns: argparse.Namespace, s: config.Settings, uri: str, *, writing: bool = False):
    """(vault, key) for a URI naming one object."""
    object_store, key = store.open_store_for_uri(uri, **_store_opts(uri, s, writing))
    return _vault(s, object_store, writing=writing), key


def _vault(s: config.Settings, object_store, *, writing: bool = False):
    """Writing commands need a key (explicit, configured, or the default keyring created on
    first write); reading commands take the provider each object names (session.ReadingKeys)
    and use a writing key only when one is given."""
    provider = None
    if writing or explicit_keys(s):
        setup = key_provider(s, create_default=writing)
        announce_keyring(setup)
        provider = setup.provider
    return vault_for(s, object_store, provider)


def _store_opts(uri: str, s: config.Settings, writing: bool) -> dict:
    if uri.lower().startswith("file://"):
        return {"create": writing}
    return store_options(s)


def _prefix(s: config.Settings, uri: str) -> tuple[store.ObjectStore, str]:
    """(store, key-or-prefix) for a URI that may name an object or a prefix."""
    scheme, location, key = store.parse_uri(uri)
    if scheme == "s3":
        from .store.s3 import S3Store

        return S3Store(location, **store_options(s)), key
    return store.LocalStore(location, create=False), key


def _targets(object_store: store.ObjectStore, key: str) -> list[str]:
    """The object ``key`` itself if it exists, else every object below it (as a prefix)."""
    if key and not key.endswith("/"):
        try:
            object_store.head(key)
            return [key]
        except ObjectNotFound:
            key += "/"
    keys = [k for k in store.iter_keys(object_store, key) if not is_reserved_key(k)]
    if not keys:
        raise ObjectNotFound(f"{object_store.url}/{key}: no such object or prefix")
    return keys


@contextlib.contextmanager
def _atomic_output(path: str) -> Iterator[int]:
    """A temporary file beside ``path`` that replaces it only after everything was written."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    fd, tmp = tempfile.mkstemp(prefix=".dssefs-", dir=directory)
    try:
        yield fd
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# ---- object commands ----------------------------------------------------------------------------

def cmd_put(ns: argparse.Namespace) -> int:
    from .objects import file_source

    s = _settings(ns)
    with open(ns.file, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        vault, key = _object(ns, s, ns.uri, writing=True)
        try:
            chain = {"if_none_match": True} if ns.no_clobber else _successor_of(vault, key)
            with _progress(size, f"put {os.path.basename(ns.file)}") as bar:
                try:
                    result = vault.write(key, file_source(f.fileno()), size, progress=bar.update,
                                         **chain)
                except PreconditionFailed:
                    if ns.no_clobber:
                        raise PreconditionFailed(f"{ns.uri} exists (--no-clobber)") from None
                    raise PreconditionFailed(f"{ns.uri} was changed by someone else while it was "
                                             "being written: run put again") from None
        finally:
            vault.close()
    if not ns.quiet:
        print(f"{ns.uri}: {size} bytes stored as {result.body_size} encrypted bytes", file=sys.stderr)
    return 0


def _successor_of(vault, key: str) -> dict:
    """How a put over ``key`` continues what is there, like a rewrite through the mount: the
    same file id, the next generation and the attributes, conditional on the ETag replaced (so
    a reader's rollback high-water mark sees CLI overwrites too).  Nothing there: a new file,
    conditional on absence."""
    from . import envelope

    try:
        info = vault.store.head(key)
    except ObjectNotFound:
        return {"if_none_match": True}
    if not envelope.is_dssefs(info.metadata):
        return {"if_match": info.etag}  # a foreign object is replaced by a new file
    try:
        old = vault.open(key, info)
        attrs = old.attrs()
    except DssefsError:
        # not readable with these keys (or damaged): continue its numbering from the header,
        # which cannot be authenticated here; its attributes cannot be carried over
        try:
            header = envelope.parse(info.metadata).header
        except IntegrityError:
            return {"if_match": info.etag}
        return {"if_match": info.etag, "file_id": header.file_id,
                "generation": min(header.generation + 1, (1 << 64) - 1)}
    return {"if_match": info.etag, "file_id": old.file_id, "attrs": attrs,
            "generation": min(old.generation + 1, (1 << 64) - 1)}


def _read_all(vault, key: str, out_fd: int, desc: str) -> None:
    obj = vault.open(key)
    with _progress(obj.size, desc) as bar:
        for _, plain in obj.iter_chunks(progress=bar.update):
            view = memoryview(plain)
            while view:
                view = view[os.write(out_fd, view):]


def cmd_get(ns: argparse.Namespace) -> int:
    s = _settings(ns)
    vault, key = _object(ns, s, ns.uri)
    try:
        if ns.file == "-":
            _read_all(vault, key, sys.stdout.fileno(), f"get {key}")
        else:
            with _atomic_output(ns.file) as fd:
                _read_all(vault, key, fd, f"get {key}")
    finally:
        vault.close()
    return 0


def cmd_cat(ns: argparse.Namespace) -> int:
    s = _settings(ns)
    vault, key = _object(ns, s, ns.uri)
    try:
        sys.stdout.flush()
        obj = vault.open(key)
        for _, plain in obj.iter_chunks():
            view = memoryview(plain)
            while view:
                view = view[os.write(sys.stdout.fileno(), view):]
    finally:
        vault.close()
    return 0


def cmd_ls(ns: argparse.Namespace) -> int:
    from . import envelope

    s = _settings(ns)
    object_store, prefix = _prefix(s, ns.uri)
    if prefix and not prefix.endswith("/"):
        try:
            items: list = [object_store.head(prefix)]
        except ObjectNotFound:
            prefix += "/"
            items = list(object_store.list(prefix, None if ns.recursive else "/"))
    else:
        items = list(object_store.list(prefix, None if ns.recursive else "/"))
    rows = []
    for item in items:
        if is_reserved_key(item if isinstance(item, str) else item.key):
            continue  # dssefs's own records (epochs), never files
        if isinstance(item, str):
            rows.append({"key": item, "type": "prefix"})
            continue
        row = {"key": item.key, "type": "object", "object_size": item.size}
        if ns.long or ns.json:
            meta = object_store.head(item.key).metadata
            if envelope.is_dssefs(meta):
                try:
                    env = envelope.parse(meta)
                    row.update(size=env.header.plaintext_len, generation=env.header.generation,
                               format_version=env.version, type="dssefs")
                    if env.provider:
                        row["provider"] = env.provider
                except IntegrityError as e:
                    row.update(type="damaged", error=str(e))
            else:
                row["type"] = "foreign"
        rows.append(row)
    if ns.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        if not ns.long:
            print(row["key"])
        elif row["type"] == "prefix":
            print(f"{'PRE':>14}  {'':>6}  {row['key']}")
        elif row["type"] == "dssefs":
            print(f"{row['size']:>14}  gen {row['generation']:<3} {row['key']}")
        else:
            print(f"{row['object_size']:>14}  {row['type']:<6}  {row['key']}")
    return 0


def cmd_rm(ns: argparse.Namespace) -> int:
    s = _settings(ns)
    object_store, key = _prefix(s, ns.uri)
    if ns.recursive:
        keys = _targets(object_store, key)
    else:
        object_store.head(key)  # ObjectNotFound names it
        keys = [key]
    with _progress(len(keys), "rm", unit="obj") as bar:
        for k in keys:
            object_store.delete(k)
            bar.update(1)
    return 0


def cmd_inspect(ns: argparse.Namespace) -> int:
    from . import envelope

    s = _settings(ns)
    object_store, key = _prefix(s, ns.uri)
    info = object_store.head(key)
    if not envelope.is_dssefs(info.metadata):
        raise NotDssefsObject(f"{ns.uri}: not a dssefs object (no dsse-* metadata); written by "
                              "another tool?")
    from .objects.vault import describe

    desc = describe(object_store, key, info)
    if ns.json:
        print(json.dumps(desc, indent=2))
    else:
        width = max(len(k) for k in desc)
        for k, v in desc.items():
            print(f"{k:<{width}}  {v}")
    return 0


def cmd_verify(ns: argparse.Namespace) -> int:
    s = _settings(ns)
    object_store, key = _prefix(s, ns.uri)
    keys = _targets(object_store, key)
    vault = _vault(s, object_store)
    results = []
    try:
        with _progress(len(keys), "verify", unit="obj") as bar:
            for k in keys:
                try:
                    vault.open(k).verify()
                    results.append({"key": k, "ok": True})
                except DssefsError as e:
                    results.append({"key": k, "ok": False, "error": str(e), "errno": e.errno})
                bar.update(1)
    finally:
        vault.close()
    failed = [r for r in results if not r["ok"]]
    if ns.json:
        print(json.dumps({"checked": len(results), "failed": len(failed), "objects": results}, indent=2))
    else:
        for r in failed:
            print(f"FAILED {object_store.url}/{r['key']}: {r['error']}")
        print(f"{len(results) - len(failed)} of {len(results)} objects verified"
              + (f", {len(failed)} FAILED" if failed else ""), file=sys.stderr if failed else sys.stdout)
    return EXIT_FAIL if failed else 0


def cmd_rekey(ns: argparse.Namespace) -> int:
    s = _settings(ns)
    if s.kms_key_id is None:
        raise ConfigError("rekey needs the new key: --kms-key-id NEW (and optionally --kms-key-id-outer); "
                          "the old key must be trusted too: --kms-allowed-key-ids OLD")
    object_store, key = _prefix(s, ns.uri)
    keys = _targets(object_store, key)
    setup = key_provider(s)
    vault = vault_for(s, object_store, setup.provider)
    from . import envelope
    from .envelope.metadata import EpochRef
    from .kms import Layer

    new_in, new_out = setup.provider.key_id(Layer.INNER), setup.provider.key_id(Layer.OUTER)
    epochs: dict[tuple[str, bytes], int] = {}
    upgraded = 0
    try:
        with _progress(len(keys), "rekey", unit="obj") as bar:
            for k in keys:
                info = object_store.head(k)
                env = envelope.parse(info.metadata)
                if env.version == 1:
                    vault.upgrade(vault.open(k, info))  # rewritten as version 2 under the new keys
                    upgraded += 1
                else:
                    ref: EpochRef = env.epoch
                    ek = (ref.prefix_of(k), ref.epoch_id)
                    epochs[ek] = epochs.get(ek, 0) + 1
                bar.update(1)
        changed = 0
        for (prefix, epoch_id) in _epoch_records(object_store, key, epochs):
            changed += vault.epochs.rewrap(prefix, epoch_id, new_in, new_out)
    except KeyAccessDenied as e:
        raise KeyAccessDenied(f"{e} (rekey reads with the old key and writes with the new one: "
                              "--kms-key-id names the new key, --kms-allowed-key-ids the old)") from None
    finally:
        vault.close()
    print(f"re-wrapped {changed} epoch record(s) (covering {sum(epochs.values())} version 2 object(s): "
          f"bodies and metadata untouched) and rewrote {upgraded} version 1 object(s) as version 2",
          file=sys.stderr)
    return 0


def _epoch_records(object_store, key: str, named: dict) -> list[tuple[str, bytes]]:
    """The epochs named by the objects re-keyed, and every epoch record stored below ``key``
    (records no object names any more still hold keys)."""
    from .envelope.epoch import EPOCH_DIR, record_epoch_id

    out = dict.fromkeys(named)
    base = key if key.endswith("/") else key[:key.rfind("/") + 1]  # the URI's "directory"
    for k in store.iter_keys(object_store, base):
        i = k.find(EPOCH_DIR)
        if i >= 0 and (i == 0 or k[i - 1] == "/"):
            epoch_id = record_epoch_id(k[i + len(EPOCH_DIR):])
            if epoch_id is not None:
                out.setdefault((k[:i], epoch_id), None)
    return list(out)


# ---- config -------------------------------------------------------------------------------------

#: What ``dssefs config show`` prints: the options that decide which keys write and which are
#: trusted for reading, and where KMS and S3 are reached.
TRUST_OPTIONS = ("kms_key_id", "kms_key_id_outer", "kms_allowed_key_ids", "kms_allowed_key_ids_outer",
                 "keyring", "keyrings", "keyring_passphrase_file", "epoch_max_age", "epoch_max_objects",
                 "region", "profile", "endpoint_url")


def cmd_config(ns: argparse.Namespace) -> int:
    s = _settings(ns)
    from .session import ReadingKeys, default_keyring_path

    rows = []
    for name in TRUST_OPTIONS:
        value = getattr(s, name)
        if isinstance(value, tuple):
            value = list(value)
        rows.append({"option": name, "value": value, "from": s.sources.get(name, "default")})
    default_ring = default_keyring_path()
    reading: dict = {}
    try:
        kms_reader = ReadingKeys(s)("kms")
        reading["kms_inner"] = kms_reader.trusted_description(kms.Layer.INNER)
        reading["kms_outer"] = kms_reader.trusted_description(kms.Layer.OUTER)
    except DssefsError as e:
        reading["kms"] = f"unusable: {e}"
    if s.keyring is not None:
        reading["keyrings"] = [s.keyring]
    else:
        reading["keyrings"] = list(s.keyrings) + ([default_ring] if os.path.exists(default_ring)
                                                  and default_ring not in s.keyrings else [])
    out = {"files": {"system": config.system_config_path(), "user": config.user_config_path(),
                     "read": s.files},
           "options": rows, "trusted_for_reading": reading}
    if ns.json:
        print(json.dumps(out, indent=2))
        return 0
    print("configuration files (lowest precedence first; flags and -o override them):")
    for label in ("system", "user"):
        path = out["files"][label]
        print(f"  {label}: {path}{'' if path in s.files else '  (absent)'}")
    print("settings:")
    for r in rows:
        value = r["value"]
        shown = ", ".join(value) if isinstance(value, list) else ("-" if value is None else value)
        print(f"  {r['option']:<26} {shown or '-'}  [{r['from']}]")
    print("trusted for reading:")
    if "kms" in reading:
        print(f"  kms: {reading['kms']}")
    else:
        print(f"  kms, inner layer: {reading['kms_inner']}")
        print(f"  kms, outer layer: {reading['kms_outer']}")
    print(f"  keyrings (every key, both layers): {', '.join(reading['keyrings']) or 'none'}")
    return 0


# ---- keyring ------------------------------------------------------------------------------------

def _new_passphrase(ns: argparse.Namespace) -> str | None:
    from . import kms

    if ns.passphrase_file or os.environ.get(kms.PASSPHRASE_ENV):
        return kms.passphrase_from_env_or_file(ns.passphrase_file)
    if not ns.passphrase:
        return None
    if not sys.stdin.isatty():
        raise ConfigError(f"--passphrase needs a terminal; use --passphrase-file or ${kms.PASSPHRASE_ENV}")
    first = getpass.getpass("new keyring passphrase: ")
    if first != getpass.getpass("repeat passphrase: "):
        raise ConfigError("passphrases differ; nothing written")
    return first


def cmd_keyring(ns: argparse.Namespace) -> int:
    from . import kms
    from .session import default_keyring_path

    path = ns.path or default_keyring_path()
    if ns.keyring_command == "create":
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        kms.create_keyring(path, names=ns.name or ("default",), passphrase=_new_passphrase(ns))
        print(f"created keyring {path} (mode 0600) with key(s) {', '.join(ns.name or ('default',))}. "
              "Back it up: without it the data cannot be decrypted.")
        return 0
    passphrase = kms.passphrase_from_env_or_file(ns.passphrase_file)
    if ns.keyring_command == "add":
        kms.add_key(path, ns.key_name, passphrase)
        print(f"added key {ns.key_name} to {path}")
        return 0
    for info in kms.list_keys(path, passphrase):
        print(f"{info.name}\tcreated {info.created}\tcheck {info.check}")
    return 0


def cmd_bench(ns: argparse.Namespace) -> int:
    from . import bench

    sizes = [config.BY_NAME["chunk_size"].parse(c) for c in ns.chunk_size.split(",")]
    results = [bench.run(total=ns.size, chunk_log2=cs.bit_length() - 1, repeat=ns.repeat) for cs in sizes]
    if ns.json:
        print(json.dumps(results, indent=2))
    else:
        print("\n\n".join(bench.format_table(r) for r in results))
    return 0


# ---- parser -------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="dssefs", description=DESCRIPTION, epilog=EPILOG, formatter_class=fmt)
    p.add_argument("--version", action="version", version=f"dssefs {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help_: str, groups=("store", "keys"), **kw) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_, formatter_class=fmt, **kw)
        config.add_arguments(sp, groups)
        return sp

    sp = command("put", "encrypt FILE and store it at URI", ("store", "keys", "write"))
    sp.add_argument("file", metavar="FILE")
    sp.add_argument("uri", metavar="URI")
    sp.add_argument("--no-clobber", action="store_true", help="fail if the object exists")
    sp.add_argument("-q", "--quiet", action="store_true", help="no summary line")
    sp.set_defaults(func=cmd_put)

    sp = command("get", "fetch, verify and decrypt URI into FILE ('-' = stdout); FILE is replaced "
                 "only once every chunk has verified")
    sp.add_argument("uri", metavar="URI")
    sp.add_argument("file", metavar="FILE")
    sp.set_defaults(func=cmd_get)

    sp = command("cat", "decrypt URI to stdout (only verified chunks are written)")
    sp.add_argument("uri", metavar="URI")
    sp.set_defaults(func=cmd_cat)

    sp = command("ls", "list objects under a URI prefix", ("store",))
    sp.add_argument("uri", metavar="URI")
    sp.add_argument("-l", "--long", action="store_true", help="show plaintext sizes and generations "
                    "(one HEAD request per object)")
    sp.add_argument("-r", "--recursive", action="store_true", help="list every object below the prefix")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(func=cmd_ls)

    sp = command("rm", "delete an object (or, with -r, every object under a prefix)", ("store",))
    sp.add_argument("uri", metavar="URI")
    sp.add_argument("-r", "--recursive", action="store_true")
    sp.set_defaults(func=cmd_rm)

    sp = command("inspect", "show an object's format, chunking, key ids and sizes (never secrets)",
                 ("store",))
    sp.add_argument("uri", metavar="URI")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_inspect)

    sp = command("verify", "authenticate every chunk of the object, or of every object under a "
                 "prefix; exit status 1 when any fails")
    sp.add_argument("uri", metavar="URI")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_verify)

    sp = command("rekey", "move an object (or every object under a prefix) to the key(s) given by "
                 "--kms-key-id / --kms-key-id-outer: the epoch records their keys hang on are "
                 "re-wrapped (KMS ReEncrypt; version 2 objects themselves are not touched), and "
                 "version 1 objects are rewritten as version 2",
                 epilog="The old key must be trusted for reading while its epochs are re-wrapped: "
                        "name it with --kms-allowed-key-ids OLD (and --kms-allowed-key-ids-outer "
                        "OLD_OUTER under split custody), e.g.\n  dssefs rekey s3://bucket/docs/ "
                        "--kms-key-id alias/new --kms-allowed-key-ids alias/old\nAn epoch record "
                        "covers every object written with it, also outside URI when they share it.")
    sp.add_argument("uri", metavar="URI")
    sp.set_defaults(func=cmd_rekey)

    sp = sub.add_parser("config", help="show the effective key and trust settings and where each came "
                        "from", formatter_class=fmt,
                        description="Settings come from /etc/dssefs/config.toml, then "
                        "$XDG_CONFIG_HOME/dssefs/config.toml (~/.config/dssefs/config.toml), then "
                        "flags. Trust is set once there, e.g.\n  kms_allowed_key_ids = "
                        "[\"arn:aws:kms:REGION:ACCOUNT:key/ID\"]\n  kms_allowed_key_ids_outer = "
                        "[\"...\"]   # split custody: the outer layer's keys\n  keyrings = "
                        "[\"/etc/dssefs/keyring\"]\nThe keys are the long options' names; no "
                        "secrets are shown (none may be in these files).")
    csub = sp.add_subparsers(dest="config_cmd", metavar="ACTION", required=True)
    cp = csub.add_parser("show", help="print the effective settings with their sources")
    config.add_arguments(cp, ("store", "keys"))
    cp.add_argument("--json", action="store_true")
    cp.set_defaults(func=cmd_config)

    sp = sub.add_parser("keyring", help="create or list a local keyring", formatter_class=fmt,
                        description="A keyring is a file of named 256-bit master keys that wrap data "
                        "keys when no AWS KMS is used.  Default path: $XDG_CONFIG_HOME/dssefs/keyring.")
    ksub = sp.add_subparsers(dest="keyring_command", metavar="ACTION", required=True)
    for name, help_ in (("create", "create a new keyring (mode 0600; refuses to overwrite)"),
                        ("list", "list key names and creation times (never key bytes)"),
                        ("add", "add a new named key")):
        kp = ksub.add_parser(name, help=help_, description=help_)
        kp.add_argument("path", metavar="PATH", nargs="?", help="keyring file")
        if name == "add":
            kp.add_argument("key_name", metavar="NAME")
        if name == "create":
            kp.add_argument("--name", action="append", help="key name (repeatable; default 'default')")
            kp.add_argument("--passphrase", action="store_true",
                            help="protect the keyring with a passphrase (prompted; Argon2id)")
        kp.add_argument("--passphrase-file", metavar="PATH",
                        help="file holding the passphrase (else $DSSEFS_KEYRING_PASSPHRASE)")
    sp.set_defaults(func=cmd_keyring)

    sp = sub.add_parser("bench", help="envelope and raw AES-GCM throughput on this machine",
                        description="Encrypt and decrypt MB/s of the two-layer envelope with 1 and 2 "
                        "threads next to each library's raw AES-256-GCM speed.")
    sp.add_argument("--size", type=config.BY_NAME["cache_size"].parse, default=64 << 20,
                    help="plaintext per measurement (default 64M)")
    sp.add_argument("--chunk-size", default="1M", help="comma-separated chunk sizes (default 1M)")
    sp.add_argument("--repeat", type=int, default=3, help="runs per figure; the median is shown")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_bench)

    sub.add_parser("mount", help="mount SOURCE (s3://BUCKET[/PREFIX] or file:///DIR) on MOUNTPOINT; "
                   "'dssefs mount --help' for options", add_help=False)
    sub.add_parser("umount", help="flush and unmount a dssefs mount", add_help=False)
    sub.add_parser("status", help="what a running mount is doing: cache, dirty data, uploads, errors, "
                   "KMS and store requests ('--json' for scripts)", add_help=False)
    sub.add_parser("service", help="install a mount as a systemd service (unit + configuration file)",
                   add_help=False)
    return p


def _run(argv: list[str]) -> int:
    if argv and argv[0] in OWN_PARSERS:
        if argv[0] == "service":
            from . import service

            return service.main(argv[1:])
        from . import daemon

        return getattr(daemon, argv[0] + "_command")(argv[1:])
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        # mount.fuse3 form: dssefs SOURCE MOUNTPOINT -o k=v,...
        from . import daemon

        return daemon.mount_command(argv)
    parser = build_parser()
    ns = parser.parse_args(argv)
    if not getattr(ns, "func", None):
        parser.print_help()
        return EXIT_USAGE
    return ns.func(ns)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from .process import forbid_core_dumps

    forbid_core_dumps()  # before any key or plaintext is in memory
    try:
        return _run(argv)
    except KeyboardInterrupt:
        print("dssefs: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_FAIL
    except (DssefsError, OSError) as e:
        if os.environ.get("DSSEFS_DEBUG"):
            raise
        print(f"dssefs: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, ConfigError) else EXIT_FAIL


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and not isinstance(e, DssefsError):
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror or e}"
    return " ".join(str(e).split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
