"""A mount request: the mount command's arguments, options and configuration file, validated."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import stat

from .. import config
from ..errors import DssefsError
from .mounts import clear_dead, mount_state

log = logging.getLogger("dssefs.daemon")

MOUNT_GROUPS = ("mount", "store", "keys", "write")

MOUNT_DESCRIPTION = """\
Mount an object store as a directory.  Files are ordinary files to every program; each stored
object carries two independent AES-256-GCM layers whose data keys are wrapped by AWS KMS (or a
local keyring) and kept in the object's metadata.

SOURCE is s3://BUCKET[/PREFIX] or file:///DIR.  Without SOURCE, a local store under
$XDG_DATA_HOME/dssefs/store and a keyring at $XDG_CONFIG_HOME/dssefs/keyring are used (both
created on first use).  A file:// SOURCE without --keyring/--kms-key-id uses that keyring too.

By default the command returns once the mount is live, leaving a daemon behind (it logs to
/run/dssefs/*.log, or $XDG_RUNTIME_DIR/dssefs/ for non-root users); stop it with
'dssefs umount MOUNTPOINT' (or SIGTERM), which stores every unsaved file first.  'dssefs status
MOUNTPOINT' shows what the daemon is doing.  Under systemd (Type=notify, --foreground; see
'dssefs service install --help' and docs/operations.md) the daemon sends READY=1 once the mount
answers, STATUS= lines, STOPPING=1, EXTEND_TIMEOUT_USEC= while a stop's flush makes progress and
WATCHDOG=1 when WatchdogSec= is set; it logs to the journal with syslog priorities.

Options come from, in increasing precedence: defaults, the TOML file named by --config (keys are
the option names below without dashes, e.g. cache_size = "1G"; no secrets: credentials come from
boto3's chain, keyring passphrases from keyring_passphrase_file), -o key=value, --flags.

The mount.fuse3 form 'dssefs SOURCE MOUNTPOINT -o key=value,...' (fstab type fuse.dssefs) takes
the same options as -o keys (dashes or underscores); generic options such as rw, dev, suid,
_netdev are ignored.  The semantics (errnos, durability, conflicts) are in docs/semantics.md.
"""

MOUNT_EPILOG = """\
examples:
  dssefs mount s3://my-bucket/team /mnt/team --kms-key-id alias/team
  dssefs mount file:///srv/vault /mnt/vault --keyring /etc/dssefs/keyring
  dssefs mount ~/plain                      (embedded default: local store + keyring)
  mount -t fuse.dssefs s3://my-bucket /mnt/b -o kms_key_id=alias/team,allow_other
  dssefs mount /mnt/secure --config /etc/dssefs/mnt-secure.toml --foreground   (as the unit does)
exit status: 0 mounted (or clean shutdown with --foreground), 1 error (message on stderr).
"""



def mount_parser(prog: str = "dssefs mount") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=MOUNT_DESCRIPTION, epilog=MOUNT_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="[SOURCE] MOUNTPOINT",
                   help="s3://BUCKET[/PREFIX] or file:///DIR (optional), then the mount point")
    p.add_argument("-o", dest="mount_options", action="append", default=[], metavar="KEY=VALUE[,...]",
                   help="mount options (mount.fuse3 syntax): any --option below as key=value")
    p.add_argument("-f", dest="foreground", action="store_const", const=True, default=argparse.SUPPRESS,
                   help="same as --foreground")
    config.add_arguments(p, MOUNT_GROUPS)
    return p


class MountRequest:
    def __init__(self, source: str | None, mountpoint: str, settings: config.Settings):
        self.source, self.mountpoint, self.settings = source, mountpoint, settings
        self.default_keyring_used = False


def parse_mount(argv: list[str]) -> MountRequest:
    p = mount_parser()
    ns = p.parse_args(argv)
    if len(ns.paths) > 2:
        p.error("expected [SOURCE] MOUNTPOINT")
    source = ns.paths[0] if len(ns.paths) == 2 else None
    mountpoint = ns.paths[-1]
    file_values = None
    cfg_path = getattr(ns, "config", None)
    opts_text = ",".join(ns.mount_options)
    if cfg_path is None and opts_text:
        cfg_path = config.parse_mount_options(opts_text).get("config")
    if cfg_path:
        file_values = config.load_file(cfg_path)
    settings = config.settings_from(ns, opts_text, file_values, file_name=cfg_path or "file")
    if source is not None:
        settings.set("source", source, "cli")
    source = settings.source
    mnt = os.path.abspath(mountpoint)
    return MountRequest(source, mnt, settings)


def check_mountpoint(mnt: str) -> None:
    """Refuse a live mount, clear a dead one (ENOTCONN after a crash), require a directory."""
    state = mount_state(mnt)
    if state == "live":
        raise DssefsError(f"mount point {mnt} is busy: a FUSE file system is already mounted there "
                          f"(run 'dssefs umount {mnt}' first)", errno=errno.EBUSY)
    if state == "dead" and not clear_dead(mnt):
        raise DssefsError(f"mount point {mnt} holds a dead mount that could not be cleared "
                          f"(try 'umount -l {mnt}')", errno=errno.EBUSY)
    try:
        st = os.stat(mnt)
    except OSError as e:
        raise DssefsError(f"mount point {mnt}: {e.strerror}", errno=e.errno or errno.ENOENT) from None
    if not stat.S_ISDIR(st.st_mode):
        raise DssefsError(f"mount point {mnt} is not a directory", errno=errno.ENOTDIR)


