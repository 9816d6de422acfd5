"""One validated configuration for every command.

Every setting is declared once in :data:`OPTIONS`.  The same table produces the ``--long-flag``
command-line options, parses ``-o key=value,...`` mount options (``mount.fuse3`` syntax; dashes and
underscores are interchangeable) and configuration-file keys.  Precedence: explicit ``--flag`` >
``-o`` > a mount's configuration file > the user's ``$XDG_CONFIG_HOME/dssefs/config.toml`` > the
system's ``/etc/dssefs/config.toml`` > default.  The user and system files are where trust is set
once (``kms_allowed_key_ids``, ``kms_allowed_key_ids_outer``, ``keyrings``, a default
``kms_key_id``...); every command and mount reads them.  Unknown keys and bad values raise
ConfigError naming the key and the file.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import ConfigError


def default_cache_size() -> int:
    """1/8 of physical memory, at least 256 MiB and at most 2 GiB: a file of that size is written
    without spilling (a 1 GiB write on a 24 GiB machine spilled half of itself with 512 MiB)."""
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        ram = 4 << 30
    return max(256 << 20, min(2 << 30, ram // 8))


def _size(text: str) -> int:
    """``123``, ``64k``, ``512M``, ``2G``, ``1GiB`` -> bytes."""
    t = str(text).strip().lower().removesuffix("ib").removesuffix("b")
    mult = 1
    for suffix, m in (("k", 1 << 10), ("m", 1 << 20), ("g", 1 << 30), ("t", 1 << 40)):
        if t.endswith(suffix):
            t, mult = t[:-1], m
            break
    try:
        value = int(float(t) * mult)
    except ValueError:
        raise ValueError(f"{text!r} is not a size (e.g. 512M, 2G)") from None
    if value < 0:
        raise ValueError("size must not be negative")
    return value


def _bool(text: Any) -> bool:
    if isinstance(text, bool):
        return text
    t = str(text).strip().lower()
    if t in ("1", "yes", "true", "on", ""):
        return True
    if t in ("0", "no", "false", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean (yes/no)")


def _octal(text: Any) -> int:
    if isinstance(text, bool):
        raise ValueError(f"{text!r} is not a permission mode like 0644")
    value = text if isinstance(text, int) else int(str(text), 8)
    if not 0 <= value <= 0o7777:
        raise ValueError(f"{text!r} is not a permission mode like 0644")
    return value


def _nonneg_int(text: Any) -> int:
    if isinstance(text, bool) or (isinstance(text, float) and not text.is_integer()):
        raise ValueError(f"{text!r} is not a whole number")
    value = int(text)
    if value < 0:
        raise ValueError("must not be negative")
    return value


def _nonneg_float(text: Any) -> float:
    if isinstance(text, bool):
        raise ValueError(f"{text!r} is not a number of seconds")
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    if value < 0:
        raise ValueError("must not be negative")
    return value


def _positive_float(text: Any) -> float:
    """A number of seconds greater than zero (plain seconds: ``3600``, ``86400``, ``0.5``)."""
    if isinstance(text, bool):
        raise ValueError(f"{text!r} is not a number of seconds")
    try:
        value = float(str(text).strip()) if isinstance(text, str) else float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number of seconds (e.g. 86400 for one day)") from None
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    if value <= 0:
        raise ValueError("must be greater than 0 seconds")
    return value


def _positive_int(text: Any) -> int:
    """A whole number of at least 1."""
    if isinstance(text, bool) or (isinstance(text, float) and not text.is_integer()):
        raise ValueError(f"{text!r} is not a whole number")
    try:
        value = int(str(text).strip()) if isinstance(text, str) else int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _path(text: Any) -> str:
    """A file or directory; relative paths are resolved by :meth:`Settings.set`."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{text!r} is not a path")
    return os.path.expanduser(text.strip())


def _chunk_size(text: Any) -> int:
    value = _size(text)
    if value & (value - 1) or not (1 << 12) <= value <= (1 << 24):
        raise ValueError("must be a power of two from 4K to 16M")
    return value


def _list(text: Any) -> tuple[str, ...]:
    if isinstance(text, (list, tuple)):
        return tuple(str(t).strip() for t in text if str(t).strip())
    return tuple(t.strip() for t in str(text).replace(";", ",").split(",") if t.strip())


def _path_list(text: Any) -> tuple[str, ...]:
    """Paths (a TOML list, or comma-separated); relative ones are resolved by Settings.set."""
    return tuple(_path(t) for t in _list(text))


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(text: Any) -> str:
        t = str(text).strip().lower()
        if t not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return t
    return parse


def _source(text: Any) -> str:
    t = str(text).strip()
    if not t.startswith(("s3://", "file://")):
        raise ValueError(f"{text!r} is not s3://BUCKET[/PREFIX] or file:///DIR")
    return t


def _name(text: Any) -> str:
    t = str(text).strip()
    if not t or len(t) > 64 or any(c in t for c in ", \t\n\\=\"'") or not t.isprintable():
        raise ValueError(f"{text!r} is not a short name (1-64 printable characters; no spaces, "
                         "commas, quotes, '=' or backslashes)")
    return t


@dataclass(frozen=True)
class Option:
    name: str  # attribute / config-file key (underscores)
    parse: Callable[[Any], Any]
    default: Any
    help: str
    metavar: str | None = None
    flag: bool = False  # a boolean switch: ``--name`` sets True, ``-o name`` too
    groups: tuple[str, ...] = ("store", "keys")

    @property
    def cli(self) -> str:
        return "--" + self.name.replace("_", "-")


OPTIONS: tuple[Option, ...] = (
    # keys
    Option("kms_key_id", str, None, "KMS key (id, ARN, alias/NAME) wrapping the inner layer's data keys; "
           "with --keyring, the keyring key name (default 'default')", "KEY", groups=("keys",)),
    Option("kms_key_id_outer", str, None, "a second KMS key (or keyring key name) for the outer layer "
           "(split custody); defaults to --kms-key-id", "KEY", groups=("keys",)),
    Option("kms_allowed_key_ids", _list, (), "further KMS keys trusted when reading (comma-separated), "
           "e.g. the previous key while re-keying; with --kms-key-id-outer (split custody) for the inner "
           "layer only", "KEYS", groups=("keys",)),
    Option("kms_allowed_key_ids_outer", _list, (), "further KMS keys trusted when reading the outer layer "
           "under split custody (comma-separated; the outer layer's counterpart of --kms-allowed-key-ids, "
           "and no key may be in both); without --kms-key-id-outer both lists apply to both layers",
           "KEYS", groups=("keys",)),
    Option("keyring", _path, None, "local keyring file to use instead of AWS KMS", "PATH", groups=("keys",)),
    Option("keyrings", _path_list, (), "further keyring files trusted when reading objects that a "
           "keyring wrapped (comma-separated; with none, the default keyring if it exists); usually "
           "set once in ~/.config/dssefs/config.toml", "PATHS", groups=("keys",)),
    Option("keyring_passphrase_file", _path, None, "file holding the keyring passphrase (else "
           "$DSSEFS_KEYRING_PASSPHRASE, else a prompt)", "PATH", groups=("keys",)),
    Option("epoch_max_age", _positive_float, 86400.0, "start a new epoch key pair after this many "
           "seconds (default 1 day); see docs/format.md", "SECONDS", groups=("keys",)),
    Option("epoch_max_objects", _positive_int, 1_000_000, "start a new epoch key pair after this many "
           "objects (default 1,000,000)", "N", groups=("keys",)),
    # store / AWS
    Option("endpoint_url", str, None, "S3/KMS endpoint (default: boto3's, honouring AWS_ENDPOINT_URL, "
           "AWS_ENDPOINT_URL_S3 and AWS_ENDPOINT_URL_KMS)", "URL", groups=("store", "keys")),
    Option("region", str, None, "AWS region (default: boto3's chain)", "REGION", groups=("store", "keys")),
    Option("profile", str, None, "AWS profile from ~/.aws/config", "NAME", groups=("store", "keys")),
    Option("path_style", _bool, False, "path-style S3 addressing (MinIO and similar)", flag=True,
           groups=("store",)),
    Option("retry_mode", _choice("standard", "adaptive", "legacy"), "standard",
           "botocore retry mode", "MODE", groups=("store", "keys")),
    Option("max_attempts", _nonneg_int, 5, "botocore attempts per request", "N", groups=("store", "keys")),
    # format
    Option("chunk_size", _chunk_size, 1 << 20, "plaintext chunk size for new objects (4K..16M, power "
           "of two)", "SIZE", groups=("write",)),
    Option("workers", _nonneg_int, max(2, min(8, (os.cpu_count() or 2) * 2)),
           "parallel crypto/S3 workers", "N", groups=("write",)),
    # mount
    Option("cache_size", _size, default_cache_size(), "plaintext chunk cache bound in memory, 1/8 of RAM "
           "within 256M..2G unless set; dirty data beyond it spills, encrypted, to --spill-dir", "SIZE",
           groups=("mount",)),
    Option("small_file_prefetch", _size, 64 << 10, "files up to this size are read whole and decrypted "
           "when first listed or looked up: one store request instead of two (a ranged GET in place of "
           "a HEAD on S3); 0 fetches metadata only", "SIZE", groups=("mount",)),
    Option("spill_dir", _path, None, "staging directory for dirty data beyond --cache-size (encrypted with "
           "an in-memory key; default under $XDG_CACHE_HOME or /var/cache/dssefs)", "DIR", groups=("mount",)),
    Option("write_behind", _size, 0, "a new or truncated file written in order is encrypted and "
           "uploaded in parts while it is written once it is larger than this (e.g. 16M), so close waits "
           "for its last part, then one server-side copy (S3 only; not with --write-back); 0 (default): "
           "every file is uploaded at close (see docs/performance.md)",
           "SIZE", groups=("mount",)),
    Option("write_back", _bool, False, "close() returns once the file's encrypted object is durable in a "
           "local journal (--journal-dir); uploads run in the background, fsync still waits for the "
           "store, unmount waits for the journal to drain, and the next mount uploads what a crash "
           "left; directories past their TTL are refreshed in the background for up to 10 more TTLs "
           "(see docs/semantics.md)", flag=True, groups=("mount",)),
    Option("journal_dir", _path, None, "write-back journal: encrypted objects waiting for upload (default "
           "under $XDG_STATE_HOME or /var/lib/dssefs, one per mount point; keep it on a local disk "
           "that survives reboots)", "DIR", groups=("mount",)),
    Option("attr_timeout", _nonneg_float, 1.0, "seconds the kernel and dssefs cache attributes",
           "SECONDS", groups=("mount",)),
    Option("entry_timeout", _nonneg_float, 1.0, "seconds the kernel and dssefs cache name lookups "
           "(what is known of a directory this mount created: 60 times as long)",
           "SECONDS", groups=("mount",)),
    Option("attr_delay", _nonneg_float, 1.0, "seconds within which attribute-only changes (chmod, "
           "chown, utimens, xattrs) of a closed file are coalesced into one store (stored earlier once "
           "0.1 s pass without another change); fsync, close and unmount store them at once; 0 stores "
           "each change immediately", "SECONDS", groups=("mount",)),
    Option("stale_upload_age", _nonneg_float, 86400.0, "multipart uploads under the mount's prefix begun "
           "longer ago than this are a crashed writer's: the mount aborts them once it serves (no upload "
           "of dssefs lasts that long; keep it above the longest upload of any client); 0 keeps them",
           "SECONDS", groups=("mount",)),
    Option("allow_other", _bool, False, "let other users access the mount (implies default_permissions)",
           flag=True, groups=("mount",)),
    Option("read_only", _bool, False, "mount read-only", flag=True, groups=("mount",)),
    Option("uid", _nonneg_int, None, "owner of objects without attributes (default: the mounting user)",
           "UID", groups=("mount",)),
    Option("gid", _nonneg_int, None, "group of objects without attributes", "GID", groups=("mount",)),
    Option("file_mode", _octal, 0o644, "mode of files without attributes", "MODE", groups=("mount",)),
    Option("dir_mode", _octal, 0o755, "mode of directories without attributes", "MODE", groups=("mount",)),
    Option("foreign_objects", _choice("deny", "read-only"), "deny",
           "objects not written by dssefs: 'deny' (listed, reads fail with EACCES) or 'read-only' "
           "(readable as plain bytes)", "POLICY", groups=("mount",)),
    Option("log_level", _choice("debug", "info", "warning", "error"), "info", "log level", "LEVEL",
           groups=("mount",)),
    Option("foreground", _bool, False, "stay attached to the terminal instead of daemonizing", flag=True,
           groups=("mount",)),
    Option("source", _source, None, "what to mount: s3://BUCKET[/PREFIX] or file:///DIR (the SOURCE "
           "argument; a configuration file names it with this key)", "URI", groups=("mount",)),
    Option("name", _name, None, "short name of the mount, shown as its source by df and mount(8), in "
           "'dssefs status' and in log lines (default: SOURCE)", "NAME", groups=("mount",)),
    Option("config", _path, None, "configuration file (TOML): the keys are these options' names "
           "(dashes or underscores); command-line flags and -o options override it", "PATH",
           groups=("mount",)),
)
BY_NAME = {o.name: o for o in OPTIONS}

#: Generic mount options that mount(8) / mount.fuse3 pass along and dssefs accepts and ignores
#: (or maps, see ``parse_mount_options``).
GENERIC_MOUNT_OPTIONS = frozenset({
    "rw", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "async", "sync", "atime", "noatime",
    "relatime", "norelatime", "strictatime", "diratime", "nodiratime", "auto", "noauto", "user",
    "nouser", "users", "_netdev", "nofail", "defaults", "default_permissions", "lazytime",
    "nolazytime", "silent", "loud",
})


@dataclass
class Settings:
    values: dict[str, Any] = field(default_factory=lambda: {o.name: o.default for o in OPTIONS})
    sources: dict[str, str] = field(default_factory=dict)  # name -> "cli" | "-o" | "file" | "default"
    files: list[str] = field(default_factory=list)  # system/user configuration files read

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def set(self, name: str, raw: Any, source: str, base_dir: str | None = None) -> None:
        """Validate and set one option.  A relative path is taken relative to ``base_dir`` (the
        configuration file's directory), else to the current directory: the daemon runs in /."""
        opt = BY_NAME.get(name)
        if opt is None:
            raise ConfigError(f"unknown option '{name}'")
        try:
            if isinstance(raw, str) and any(ord(c) < 0x20 or c == "\x7f" for c in raw):
                raise ValueError("control characters (such as newlines) are not allowed")
            value = None if raw is None else opt.parse(raw)
        except (ValueError, TypeError, OverflowError) as e:
            raise ConfigError(f"bad value for '{name.replace('_', '-')}' ({source}): {e}") from None
        if opt.parse is _path and value is not None:
            value = _absolute(value, base_dir)
        if opt.parse is _path_list and value:
            value = tuple(_absolute(v, base_dir) for v in value)
        self.values[name] = value
        self.sources[name] = source


def _absolute(path: str, base_dir: str | None) -> str:
    if not os.path.isabs(path):
        path = os.path.join(base_dir or os.getcwd(), path)
    return os.path.normpath(path)


SYSTEM_CONFIG = "/etc/dssefs/config.toml"


def user_config_path() -> str:
    """``$XDG_CONFIG_HOME/dssefs/config.toml`` (``~/.config/dssefs/config.toml``)."""
    base = os.environ.get("XDG_CONFIG_HOME")
    if not base or not os.path.isabs(base):
        base = os.path.join(os.environ.get("HOME") or os.path.expanduser("~"), ".config")
    return os.path.join(base, "dssefs", "config.toml")


def system_config_path() -> str:
    """``/etc/dssefs/config.toml``; ``$DSSEFS_SYSTEM_CONFIG`` names another (packaging, tests)."""
    return os.environ.get("DSSEFS_SYSTEM_CONFIG") or SYSTEM_CONFIG


def standard_files() -> list[str]:
    """The system and user configuration files that exist, lowest precedence first."""
    return [p for p in (system_config_path(), user_config_path()) if os.path.exists(p)]


def normalise_key(key: str) -> str:
    return key.strip().replace("-", "_")


def parse_mount_options(text: str) -> dict[str, Any]:
    """Parse ``-o`` text (``a=1,b,ro``) into option values; generic options are dropped, ``ro``
    maps to read_only.  Unknown keys raise ConfigError naming the key."""
    out: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key = normalise_key(key)
        if key == "ro":
            out["read_only"] = True
            continue
        if key in GENERIC_MOUNT_OPTIONS or key.startswith("x_"):
            continue
        opt = BY_NAME.get(key)
        if opt is None:
            raise ConfigError(f"unknown mount option '{item.partition('=')[0]}': see 'dssefs mount --help'")
        out[key] = value if sep else (True if opt.flag else "")
        if not sep and not opt.flag:
            raise ConfigError(f"mount option '{key.replace('_', '-')}' needs a value ({key}=...)")
    return out


def add_arguments(parser: argparse.ArgumentParser, groups: tuple[str, ...]) -> None:
    """Add ``--long-flag`` options for every option in the named groups.  Defaults are left as
    None (argparse.SUPPRESS) so that an explicit flag can be told apart from a default."""
    for opt in OPTIONS:
        if not set(opt.groups) & set(groups):
            continue
        dest = opt.name
        default_txt = "" if opt.default is None else f" (default: {_show(opt)})"
        if opt.flag:
            parser.add_argument(opt.cli, dest=dest, action="store_const", const=True,
                                default=argparse.SUPPRESS, help=opt.help + default_txt)
        else:
            parser.add_argument(opt.cli, dest=dest, metavar=opt.metavar, default=argparse.SUPPRESS,
                                help=opt.help + default_txt)


def _show(opt: Option) -> str:
    if isinstance(opt.default, float) and opt.default.is_integer():
        return str(int(opt.default))
    if opt.parse is _octal:
        return f"{opt.default:04o}"
    if opt.parse in (_size, _chunk_size) and opt.default >= 1024:
        for unit, m in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
            if opt.default % m == 0:
                return f"{opt.default // m}{unit}"
    return str(opt.default)


#: Keys that would put a secret into a configuration file, and where the secret belongs instead.
SECRET_KEYS = {
    "aws_access_key_id": "boto3's credential chain (environment, ~/.aws/credentials, instance role)",
    "aws_secret_access_key": "boto3's credential chain (environment, ~/.aws/credentials, instance role)",
    "aws_session_token": "boto3's credential chain (environment, ~/.aws/credentials, instance role)",
    "keyring_passphrase": "a file named by keyring_passphrase_file (mode 0600)",
    "passphrase": "a file named by keyring_passphrase_file (mode 0600)",
    "password": "a file named by keyring_passphrase_file (mode 0600)",
    "secret": "boto3's credential chain or keyring_passphrase_file",
}


def file_types(opt: Option) -> tuple[tuple[type, ...], str]:
    """The TOML value types a configuration-file key accepts, and how to write it."""
    if opt.parse is _octal:
        return (str,), 'a string such as "0644" (a TOML number would be read as decimal)'
    if opt.parse is _bool:
        return (bool, str), "true or false"
    if opt.parse in (_size, _chunk_size):
        return (int, str), 'a size such as "512M" or a number of bytes'
    if opt.parse in (_nonneg_int, _positive_int):
        return (int,), "a whole number"
    if opt.parse in (_nonneg_float, _positive_float):
        return (int, float), "a number"
    if opt.parse in (_list, _path_list):
        return (list, str), 'a list of strings such as ["a", "b"]'
    return (str,), "a string in double quotes"


def load_file(path: str) -> dict[str, Any]:
    """Read a TOML configuration file: top-level ``key = value`` pairs, each key an option name
    (dashes or underscores).  Every problem raises ConfigError naming the file and the key; the
    values themselves are validated by :func:`settings_from`."""
    import tomllib

    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            raw = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read configuration file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"configuration file {path}: not valid TOML: {e} (strings need double quotes, "
                          'e.g. cache_size = "1G", file_mode = "0640")') from None
    except UnicodeDecodeError:
        raise ConfigError(f"configuration file {path}: not valid UTF-8") from None
    if st.st_mode & 0o002:
        raise ConfigError(f"configuration file {path} is writable by every user (mode "
                          f"{st.st_mode & 0o7777:04o}): run 'chmod o-w {path}'")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = normalise_key(key)
        where = f"configuration file {path}: key '{key}'"
        if name in SECRET_KEYS:
            raise ConfigError(f"{where} is a secret and does not belong in a configuration file: "
                              f"use {SECRET_KEYS[name]}")
        if isinstance(value, dict):
            raise ConfigError(f"{where} is a table; options are top-level 'key = value' lines")
        opt = BY_NAME.get(name)
        if opt is None:
            raise ConfigError(f"{where} is not an option (see 'dssefs mount --help'; dashes and "
                              "underscores are interchangeable)")
        if name == "config":
            raise ConfigError(f"{where}: a configuration file cannot name another one")
        if name in out:
            raise ConfigError(f"{where} is given twice")
        if isinstance(value, list) and opt.parse not in (_list, _path_list):
            raise ConfigError(f"{where} takes one value, not a list")
        types, how = file_types(opt)
        if type(value) not in types or (isinstance(value, list) and not all(isinstance(v, str) for v in value)):
            kind = type(value).__name__
            raise ConfigError(f"{where} has {'an' if kind[0] in 'aeiou' else 'a'} {kind} value; write {how}")
        out[name] = value
    return out


def settings_from(namespace: argparse.Namespace, mount_options: str | None = None,
                  file_values: dict[str, Any] | None = None, file_name: str = "file", *,
                  standard: list[str] | None = None) -> Settings:
    """Merge defaults < system and user files (``standard``, default :func:`standard_files`) <
    file < ``-o`` < explicit flags into one validated Settings."""
    s = Settings()
    for path in standard_files() if standard is None else standard:
        base_dir = os.path.dirname(os.path.abspath(path))
        for key, raw in load_file(path).items():
            s.set(normalise_key(key), raw, f"configuration file {path}", base_dir=base_dir)
        s.files.append(path)
    base = os.path.dirname(os.path.abspath(file_name)) if file_name != "file" else None
    for key, raw in (file_values or {}).items():
        s.set(normalise_key(key), raw, f"configuration file {file_name}" if file_name != "file" else "file",
              base_dir=base)
    if mount_options:
        for key, raw in parse_mount_options(mount_options).items():
            s.set(key, raw, "-o")
    for opt in OPTIONS:
        if opt.name in vars(namespace):
            s.set(opt.name, getattr(namespace, opt.name), "cli")
    return s
