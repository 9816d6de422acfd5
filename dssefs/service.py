"""``dssefs service``: run a mount as the systemd service ``dssefs@<instance>.service``.

The instance is the mount point escaped as ``systemd-escape --path`` does (``/mnt/secure`` ->
``mnt-secure``); the unit reads its settings from ``/etc/dssefs/<instance>.toml``.  ``install``
writes that file and the template unit ``/etc/systemd/system/dssefs@.service`` (the text of
``systemd/dssefs@.service`` in the repository, with the path of the running dssefs).  The unit
and its hardening are explained in docs/operations.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from typing import Any

from . import config
from .errors import ConfigError

EXIT_FAIL = 1
EXIT_USAGE = 2

CONFIG_DIR = "/etc/dssefs"
UNIT_DIR = "/etc/systemd/system"
TEMPLATE_NAME = "dssefs@.service"
#: The executable named in UNIT_TEMPLATE; ``install`` puts the real one in its place.
DEFAULT_EXECUTABLE = "/usr/local/bin/dssefs"
#: systemd refuses unit names longer than this (UNIT_NAME_MAX - 1).
UNIT_NAME_MAX = 255

#: The template unit.  tests/test_systemd_units.py checks that systemd/dssefs@.service is this
#: text byte for byte, so edit both together.
UNIT_TEMPLATE = """\
# dssefs@.service - one dssefs mount, served by a daemon that systemd supervises.
#
# The instance is the escaped mount point, and the settings are read from /etc/dssefs/<instance>.toml:
#   dssefs service install team --source s3://my-bucket/team --mountpoint /mnt/secure --kms-key-id alias/team
#   systemctl daemon-reload
#   systemctl enable --now dssefs@$(systemd-escape --path /mnt/secure).service
# %f is the mount point (/mnt/secure), %i the escaped instance (mnt-secure).
# 'dssefs service install' writes this file with the path of the dssefs it runs from.
# Every line is explained in docs/operations.md.
#
# Two rules for editing (or for a drop-in made with 'systemctl edit'):
# - systemd has no trailing comments: everything after '=' belongs to the value.
# - Use no option that creates a mount namespace (PrivateTmp=, PrivateDevices=, ProtectSystem=,
#   ProtectHome=, ReadWritePaths=, ProtectKernelTunables=, ProtectKernelModules=,
#   ProtectKernelLogs=, ProtectControlGroups=, ProtectProc=, BindPaths=, ...): the mount would
#   then exist only inside that namespace and the host would see an empty directory.

[Unit]
Description=dssefs encrypted mount on %f
Wants=network-online.target
After=network-online.target
Before=remote-fs.target

[Service]
Type=notify
NotifyAccess=main
ExecStartPre=-/usr/local/bin/dssefs umount --if-dead %f
ExecStart=/usr/local/bin/dssefs mount --foreground --config /etc/dssefs/%i.toml %f
ExecStopPost=-/usr/local/bin/dssefs umount --if-dead %f
KillMode=mixed
TimeoutStartSec=90
TimeoutStopSec=15min
Restart=on-failure
RestartSec=5s
UMask=0077
LimitNOFILE=65536
LimitCORE=0
RuntimeDirectory=dssefs
RuntimeDirectoryMode=0755
RuntimeDirectoryPreserve=yes
CacheDirectory=dssefs
CacheDirectoryMode=0700
NoNewPrivileges=yes
CapabilityBoundingSet=CAP_SYS_ADMIN
DevicePolicy=closed
DeviceAllow=/dev/fuse rw
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
ProtectClock=yes
ProtectHostname=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service @mount
SystemCallErrorNumber=EPERM

[Install]
WantedBy=remote-fs.target
"""

#: Options naming files: written as absolute paths, since the daemon runs with / as its directory.
PATH_OPTIONS = ("keyring", "keyring_passphrase_file", "spill_dir")

#: Mount options that ``install`` sets itself instead of taking them as flags.
OWN_OPTIONS = {
    "config": "install writes the configuration file itself",
    "foreground": "the unit runs the daemon in the foreground already",
    "source": None,  # replaced by a required --source
    "name": "the mount's name is the first argument (NAME)",
}

DESCRIPTION = """\
Run a dssefs mount as the systemd service dssefs@INSTANCE.service, where INSTANCE is the mount
point escaped as 'systemd-escape --path' does (/mnt/secure -> mnt-secure).  The service reads its
settings from /etc/dssefs/INSTANCE.toml: the keys are the long options of 'dssefs mount --help'
(dashes or underscores).  Secrets never go into that file: AWS credentials come from boto3's chain
(instance role, /root/.aws/credentials, or Environment= in a drop-in), a keyring passphrase from
keyring_passphrase_file.  docs/operations.md explains the unit and its hardening.
"""

EPILOG = """\
examples:
  dssefs service install team --source s3://my-bucket/team --mountpoint /mnt/secure \\
      --kms-key-id alias/team --allow-other
  dssefs service install vault --source file:///srv/vault --mountpoint /mnt/vault \\
      --keyring /etc/dssefs/keyring --enable
  dssefs service show /mnt/secure
  dssefs service uninstall /mnt/secure
exit status: 0 done, 1 failed (one line on stderr says why), 2 bad usage or option value.
"""

INSTALL_DESCRIPTION = """\
Write /etc/dssefs/INSTANCE.toml (name, source and every mount option given here) and the template
unit /etc/systemd/system/dssefs@.service (naming the dssefs executable that runs this command),
and create the mount point.  The settings are validated before anything is written, and an
existing configuration file is replaced only with --force.  Without --enable it prints the
systemctl commands to run next.
"""


class ServiceError(Exception):
    """A failure reported as one line (exit status 1)."""


# ---- unit names ---------------------------------------------------------------------------------

_VALID = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:_.")


def _escape_char(byte: int) -> str:
    return f"\\x{byte:02x}"


def escape(text: str) -> str:
    """systemd-escape TEXT: systemd.unit(5), "String Escaping for Inclusion in Unit Names"."""
    out = []
    data = text.encode("utf-8", "surrogateescape")
    for i, byte in enumerate(data):
        ch = chr(byte)
        if ch == "/":
            out.append("-")
        elif (i == 0 and ch == ".") or ch not in _VALID or byte >= 0x80:
            out.append(_escape_char(byte))
        else:
            out.append(ch)
    return "".join(out)


def escape_path(path: str) -> str:
    """systemd-escape --path PATH: duplicate and trailing slashes and '.' components are dropped,
    '/' alone becomes '-', other slashes become '-'; a path with '..' is refused (ValueError)."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"{path!r} is not a normalized path ('..')")
    if not parts:
        return "-"
    return escape("/".join(parts))


def unescape_path(instance: str) -> str:
    """The mount point an escaped instance stands for (what systemd's %f gives)."""
    out = bytearray()
    i = 0
    while i < len(instance):
        ch = instance[i]
        if ch == "\\" and instance[i + 1:i + 2] == "x" and len(instance) >= i + 4:
            out.append(int(instance[i + 2:i + 4], 16))
            i += 4
            continue
        out += b"/" if ch == "-" else ch.encode("utf-8", "surrogateescape")
        i += 1
    text = out.decode("utf-8", "surrogateescape")
    return "/" if text == "/" else "/" + text.strip("/")


def unit_name(instance: str) -> str:
    return f"dssefs@{instance}.service"


def config_path(instance: str) -> str:
    return f"{CONFIG_DIR}/{instance}.toml"


def mountpoint_of(text: str) -> str:
    """The absolute, normalized mount point for a command-line argument."""
    mnt = os.path.normpath(os.path.abspath(text))
    if mnt == "/":
        raise ConfigError("the mount point cannot be / (name a directory such as /mnt/secure)")
    return mnt


def instance_of(mountpoint: str) -> str:
    instance = escape_path(mountpoint)
    if len(unit_name(instance)) > UNIT_NAME_MAX:
        raise ConfigError(f"the unit name for {mountpoint} would be {len(unit_name(instance))} characters, "
                          f"more than systemd's {UNIT_NAME_MAX}: choose a shorter mount point")
    return instance


# ---- files --------------------------------------------------------------------------------------

def under_root(root: str | None, path: str) -> str:
    """``path`` inside ``root`` (like systemctl --root), or ``path`` itself."""
    return os.path.join(root, path.lstrip("/")) if root else path


def _toml_string(text: str) -> str:
    out = ['"']
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_value(name: str, raw: Any) -> str:
    opt = config.BY_NAME[name]
    if isinstance(raw, bool):
        return "true" if raw else "false"
    if isinstance(raw, (list, tuple)):
        return "[" + ", ".join(_toml_string(str(v)) for v in raw) + "]"
    text = str(raw)
    types, _ = config.file_types(opt)
    if str in types:
        return _toml_string(text)  # also when it looks like a number: name = "2024"
    return repr(opt.parse(text))  # a whole number or a finite float, as the loader wants it


def render_config(mountpoint: str, instance: str, values: dict[str, Any]) -> str:
    lines = [f"# dssefs settings for the mount on {mountpoint} ({unit_name(instance)}),",
             "# written by 'dssefs service install'.  Keys are the long options of 'dssefs mount --help'",
             "# (dashes or underscores); command-line flags and -o options override them.",
             "# No secrets here: see docs/operations.md for credentials and passphrases.",
             ""]
    lines += [f"{name} = {_toml_value(name, raw)}" for name, raw in values.items()]
    return "\n".join(lines) + "\n"


def render_unit(executable: str) -> str:
    return UNIT_TEMPLATE.replace(DEFAULT_EXECUTABLE, executable.replace("%", "%%"))


def find_executable(explicit: str | None = None, root: str | None = None) -> str:
    """The absolute path of the dssefs command that runs this code (or ``explicit``, which may
    also exist only below ``root``)."""
    candidates = []
    if explicit:
        explicit = os.path.abspath(explicit)
        if root and os.path.isfile(under_root(root, explicit)):
            candidates.append(under_root(root, explicit))
        candidates.append(explicit)
    else:
        argv0 = sys.argv[0] if sys.argv else ""
        if os.path.basename(argv0) == "dssefs":
            candidates.append(argv0)
        candidates.append(os.path.join(os.path.dirname(sys.executable), "dssefs"))
        found = shutil.which("dssefs")
        if found:
            candidates.append(found)
    for path in candidates:
        path = os.path.abspath(path)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            if explicit:
                path = explicit  # the path the unit names (also when it was found below root)
            if any(c in path for c in " \t\n\"'\\"):
                raise ServiceError(f"the dssefs executable {path} has a space, quote or backslash in its "
                                   "path, which a unit's ExecStart= cannot hold as is: install dssefs under a "
                                   "plain path, or pass --executable PATH")
            return path
    if explicit:
        raise ServiceError(f"--executable {explicit}: no such executable file")
    raise ServiceError("cannot find the dssefs executable that runs this command: pass --executable "
                       "/path/to/dssefs")


def _fsync_dir(directory: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _temp_beside(path: str, mode: int):
    """A temporary file in ``path``'s directory (fd, name); removed unless the caller moved it."""
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".dssefs-", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, mode)
        yield fd, tmp
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _write_all(fd: int, text: str) -> None:
    view = memoryview(text.encode("utf-8"))
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)


def validate(values: dict[str, Any], path: str) -> config.Settings:
    """The settings ``values`` give, checked exactly as the daemon will check them."""
    return config.settings_from(argparse.Namespace(), None, values, file_name=path, standard=[])


def write_config(path: str, text: str, *, force: bool, shown_as: str) -> None:
    """Write ``text`` to ``path`` atomically (mode 0600) after loading it back through the
    configuration loader; refuse to replace an existing file unless ``force``."""
    if os.path.lexists(path) and not force:
        raise ServiceError(f"{shown_as} exists: remove it with 'dssefs service uninstall', or pass "
                           "--force to replace it")
    with _temp_beside(path, 0o600) as (fd, tmp):
        _write_all(fd, text)
        try:
            validate(config.load_file(tmp), shown_as)
        except ConfigError as e:
            raise ConfigError(str(e).replace(tmp, shown_as)) from None
        if force:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if the file appeared meanwhile; never replaces it
            except FileExistsError:
                raise ServiceError(f"{shown_as} exists: pass --force to replace it") from None
    _fsync_dir(os.path.dirname(path))


def check_unit(path: str, text: str, *, force: bool, shown_as: str) -> str | None:
    """The installed template's text (None if absent); refuses one with other contents unless
    ``force``.  Called before anything is written, so a refusal leaves no half install."""
    try:
        with open(path, encoding="utf-8") as f:
            old: str | None = f.read()
    except FileNotFoundError:
        old = None
    if old is not None and old != text and not force:
        raise ServiceError(f"{shown_as} exists with other contents (another dssefs executable, or edited by "
                           "hand): keep local changes in a drop-in ('systemctl edit dssefs@.service') and "
                           "pass --force to replace the file")
    return old


def write_unit(path: str, text: str, *, force: bool, shown_as: str) -> str:
    """Write the template unit; returns 'wrote', 'updated' or 'unchanged'."""
    old = check_unit(path, text, force=force, shown_as=shown_as)
    if old == text:
        return "unchanged"
    with _temp_beside(path, 0o644) as (fd, tmp):
        _write_all(fd, text)
        os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))
    return "wrote" if old is None else "updated"


# ---- commands -----------------------------------------------------------------------------------

class _Refuse(argparse.Action):
    """A mount option that ``install`` sets itself: using it is a usage error saying why."""

    def __init__(self, option_strings, dest, reason: str = "", **kw):
        self.reason = reason
        kw.setdefault("nargs", 0)
        super().__init__(option_strings, argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string}: {self.reason}")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="dssefs service", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=fmt)
    sub = p.add_subparsers(dest="action", metavar="ACTION")

    sp = sub.add_parser("install", help="write the configuration file and the unit; create the mount point",
                        description=INSTALL_DESCRIPTION, epilog=EPILOG, formatter_class=fmt,
                        conflict_handler="resolve")
    sp.add_argument("mount_name", metavar="NAME",
                    help="short name of the mount: shown as its source by df and mount(8), in "
                    "'dssefs status' and in the log")
    sp.add_argument("--mountpoint", required=True, metavar="DIR", help="where to mount (created if missing)")
    sp.add_argument("--root", metavar="DIR", help="write every file below DIR instead of / (image building; "
                    "like systemctl --root)")
    sp.add_argument("--force", action="store_true",
                    help="replace an existing configuration file or a different template unit")
    sp.add_argument("--enable", action="store_true",
                    help="also run 'systemctl daemon-reload' and 'systemctl enable --now' for the unit "
                    "(with --root: 'systemctl --root=DIR enable')")
    sp.add_argument("--executable", metavar="PATH",
                    help="the dssefs command the unit runs (default: the one running now)")
    group = sp.add_argument_group("mount options (written to the configuration file)")
    config.add_arguments(group, ("mount", "store", "keys", "write"))
    group.add_argument("--source", required=True, metavar="URI", help=config.BY_NAME["source"].help)
    for name, reason in OWN_OPTIONS.items():
        if reason is not None:
            group.add_argument(config.BY_NAME[name].cli, action=_Refuse, reason=reason, help=argparse.SUPPRESS)
    sp.set_defaults(func=cmd_install)

    for name, help_ in (("uninstall", "remove the configuration file of the mount on MOUNTPOINT (the "
                         "template unit stays for other mounts)"),
                        ("show", "print the instance, unit name, configuration file and its contents")):
        sp = sub.add_parser(name, help=help_, description=help_, formatter_class=fmt)
        sp.add_argument("mountpoint", metavar="MOUNTPOINT")
        sp.add_argument("--root", metavar="DIR", help="look below DIR instead of /")
        sp.set_defaults(func=cmd_uninstall if name == "uninstall" else cmd_show)
    return p


def _values(ns: argparse.Namespace) -> dict[str, Any]:
    """name, source, then every mount option given on the command line, in table order."""
    values: dict[str, Any] = {"name": ns.mount_name, "source": ns.source}
    for opt in config.OPTIONS:
        if opt.name not in OWN_OPTIONS and opt.name in vars(ns):
            raw = getattr(ns, opt.name)
            if opt.name == "kms_allowed_key_ids":
                raw = list(opt.parse(raw))
            elif opt.name in PATH_OPTIONS and raw:
                raw = os.path.abspath(raw)
            values[opt.name] = raw
    return values


def _systemctl(*args: str) -> None:
    cmd = ["systemctl", *args]
    shown = " ".join(shlex.quote(a) for a in cmd)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as e:
        raise ServiceError(f"'{shown}' could not run: {e.strerror}; run it by hand") from None
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no message"])[-1]
        raise ServiceError(f"'{shown}' failed (exit status {r.returncode}): {last}")


def cmd_install(ns: argparse.Namespace) -> int:
    mnt = mountpoint_of(ns.mountpoint)
    instance = instance_of(mnt)
    unit = unit_name(instance)
    cfg = config_path(instance)
    values = _values(ns)
    validate(values, cfg)  # a bad value stops here: nothing is written
    if "kms_key_id" not in values and "keyring" not in values:
        raise ConfigError("no key given: add --kms-key-id KEY (AWS KMS) or --keyring PATH (a local keyring, "
                          "e.g. /etc/dssefs/keyring made with 'dssefs keyring create')")
    root = os.path.abspath(ns.root) if ns.root else None
    executable = find_executable(ns.executable, root)
    cfg_file, unit_file = under_root(root, cfg), under_root(root, f"{UNIT_DIR}/{TEMPLATE_NAME}")
    mnt_dir = under_root(root, mnt)
    if os.path.lexists(cfg_file) and not ns.force:  # checked first: nothing written on refusal
        raise ServiceError(f"{cfg} exists: remove it with 'dssefs service uninstall {mnt}', or pass --force "
                           "to replace it")
    if os.path.lexists(mnt_dir) and not os.path.isdir(mnt_dir):
        raise ServiceError(f"mount point {mnt} exists and is not a directory: choose another --mountpoint")
    check_unit(unit_file, render_unit(executable), force=ns.force, shown_as=f"{UNIT_DIR}/{TEMPLATE_NAME}")

    os.makedirs(os.path.dirname(cfg_file), mode=0o755, exist_ok=True)
    os.makedirs(os.path.dirname(unit_file), mode=0o755, exist_ok=True)
    write_config(cfg_file, render_config(mnt, instance, values), force=ns.force, shown_as=cfg)
    print(f"wrote {cfg} (mode 0600)")
    state = write_unit(unit_file, render_unit(executable), force=ns.force,
                       shown_as=f"{UNIT_DIR}/{TEMPLATE_NAME}")
    print(f"{state} {UNIT_DIR}/{TEMPLATE_NAME} (runs {executable})")
    if not os.path.isdir(mnt_dir):
        os.makedirs(mnt_dir, mode=0o755)
        print(f"created the mount point {mnt}")
    keyring = values.get("keyring")
    if keyring and not os.path.exists(under_root(root, keyring)):
        print(f"note: the keyring {keyring} does not exist yet: create it with 'dssefs keyring create "
              f"{keyring}' (and back it up)", file=sys.stderr)

    if ns.enable:
        if root:
            _systemctl(f"--root={root}", "enable", unit)
            print(f"enabled {unit} below {root}; it starts at the next boot")
        else:
            _systemctl("daemon-reload")
            _systemctl("enable", "--now", unit)
            print(f"enabled and started {unit}; see 'systemctl status {shlex.quote(unit)}'")
        return 0
    print("next:")
    print("  systemctl daemon-reload")
    print(f"  systemctl enable --now {shlex.quote(unit)}")
    print(f"  journalctl -u {shlex.quote(unit)} -f")
    return 0


def _located(ns: argparse.Namespace) -> tuple[str, str, str, str]:
    mnt = mountpoint_of(ns.mountpoint)
    instance = instance_of(mnt)
    cfg = config_path(instance)
    root = os.path.abspath(ns.root) if ns.root else None
    return mnt, instance, cfg, under_root(root, cfg)


def cmd_uninstall(ns: argparse.Namespace) -> int:
    mnt, instance, cfg, cfg_file = _located(ns)
    try:
        os.unlink(cfg_file)
    except FileNotFoundError:
        raise ServiceError(f"{cfg} does not exist: no service is installed for {mnt} (see 'dssefs service "
                           f"show {mnt}')") from None
    print(f"removed {cfg}")
    print("the template unit stays for other mounts; stop and disable this one with:")
    print(f"  systemctl disable --now {shlex.quote(unit_name(instance))}")
    return 0


def cmd_show(ns: argparse.Namespace) -> int:
    mnt, instance, cfg, cfg_file = _located(ns)
    print(f"mount point:  {mnt}")
    print(f"instance:     {instance}")
    print(f"unit:         {unit_name(instance)}")
    print(f"config file:  {cfg}")
    try:
        with open(cfg_file, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ServiceError(f"{cfg} does not exist: install it with 'dssefs service install NAME --source URI "
                           f"--mountpoint {mnt} ...'") from None
    print()
    print(text, end="" if text.endswith("\n") else "\n")
    return 0


def main(argv: list[str]) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if not getattr(ns, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return ns.func(ns)
    except ConfigError as e:
        print(f"dssefs: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE
    except ServiceError as e:
        print(f"dssefs: error: {e}", file=sys.stderr)
        return EXIT_FAIL
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"dssefs: error: {where}{e.strerror or e} (run as root, or use --root DIR)", file=sys.stderr)
        return EXIT_FAIL
