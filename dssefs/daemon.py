"""The mount lifecycle: ``dssefs mount`` and ``dssefs umount``.

``mount`` validates its input, clears a dead mount left by a crash, forks a daemon (unless
``--foreground``) and exits 0 only once the file system answers; the daemon reports readiness
through a pipe and, when ``$NOTIFY_SOCKET`` is set, with ``READY=1`` (systemd ``Type=notify``).
SIGTERM/SIGINT: store every dirty file, unmount, exit 0.  ``umount`` sends SIGTERM to the daemon
recorded in the pid file and waits until it is gone.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import time

from . import config
from .errors import ConfigError, DssefsError
from .session import (default_keyring_path, default_source, default_store_dir, key_provider, vault_for,
                      store_options, xdg_dir)

log = logging.getLogger("dssefs.daemon")

FUSERMOUNT_CANDIDATES = ("/usr/bin/fusermount3", "/bin/fusermount3", "/usr/local/bin/fusermount3",
                         "/usr/bin/fusermount", "/bin/fusermount")
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
'dssefs umount MOUNTPOINT' (or SIGTERM), which stores every unsaved file first.  Under systemd
use Type=notify with --foreground: READY=1 is sent to $NOTIFY_SOCKET once the mount answers.

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
exit status: 0 mounted (or clean shutdown with --foreground), 1 error (message on stderr).
"""


# ---- small utilities ----------------------------------------------------------------------------------

def sd_notify(message: str) -> bool:
    """sd_notify(3) without libsystemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(message.encode())
        return True
    except OSError as e:
        log.debug("event=sd_notify_failed reason=%s", e)
        return False


def fusermount() -> str:
    for path in FUSERMOUNT_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return "fusermount3"


def _unescape(field: str) -> str:
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) + 0 and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_entries(mountpoint: str) -> list[dict]:
    """Entries of /proc/self/mountinfo whose mount point is ``mountpoint``."""
    out = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                parts, rparts = left.split(), right.split()
                if len(parts) >= 5 and _unescape(parts[4]) == mountpoint:
                    out.append({"devno": parts[2], "fstype": rparts[0] if rparts else "",
                                "source": _unescape(rparts[1]) if len(rparts) > 1 else ""})
    except OSError:
        pass
    return out


def mount_state(mountpoint: str) -> str:
    """``none``, ``live`` (a FUSE file system answers), ``dead`` (ENOTCONN) or ``other``."""
    entries = [e for e in mount_entries(mountpoint) if e["fstype"].startswith("fuse")]
    if not entries:
        return "none"
    try:
        os.stat(mountpoint)
        return "live"
    except OSError as e:
        if e.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.ECONNREFUSED):
            return "dead"
        return "live"


def runtime_dir() -> str:
    if os.geteuid() == 0:
        base = "/run/dssefs"
    else:
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        base = os.path.join(xdg, "dssefs") if xdg else f"/tmp/dssefs-{os.geteuid()}"
    return base


def log_file(mountpoint: str) -> str:
    """Where a daemonized mount logs (unless started by systemd, which keeps stderr)."""
    return pid_file(mountpoint)[:-4] + ".log"


def pid_file(mountpoint: str) -> str:
    digest = hashlib.sha256(mountpoint.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    base = os.path.basename(mountpoint.rstrip("/")) or "root"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in base)[:40]
    return os.path.join(runtime_dir(), f"{safe}-{digest}.pid")


def default_spill_dir(mountpoint: str) -> str:
    if os.geteuid() == 0:
        base = "/var/cache/dssefs"
    else:
        base = xdg_dir("XDG_CACHE_HOME", ".cache")
    return os.path.join(base, "spill-" + hashlib.sha256(mountpoint.encode()).hexdigest()[:16])


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s dssefs[%(process)d] level=%(levelname)s logger=%(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# ---- argument parsing ------------------------------------------------------------------------------------

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
    if state == "dead":
        log.warning("event=dead_mount mountpoint=%s action='%s -uz' reason='left by a crashed daemon'",
                    mnt, fusermount())
        subprocess.run([fusermount(), "-uz", mnt], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       check=False)
        if mount_state(mnt) == "dead":
            raise DssefsError(f"mount point {mnt} holds a dead mount that could not be cleared",
                              errno=errno.EBUSY)
    try:
        st = os.stat(mnt)
    except OSError as e:
        raise DssefsError(f"mount point {mnt}: {e.strerror}", errno=e.errno or errno.ENOENT) from None
    if not stat.S_ISDIR(st.st_mode):
        raise DssefsError(f"mount point {mnt} is not a directory", errno=errno.ENOTDIR)


# ---- building the file system ------------------------------------------------------------------------------

def open_backend(req: MountRequest):
    """Store, key provider and prefix for the request (may talk to S3/KMS)."""
    from .store import open_store

    s = req.settings
    if req.source is None:
        req.source = default_source()
    if req.source == default_source():
        os.makedirs(default_store_dir(), mode=0o700, exist_ok=True)
    store, prefix = open_store(req.source, **store_options(s))
    setup = key_provider(s, create_default=True)
    if setup.created_keyring:
        log.info("event=keyring_created path=%s", setup.created_keyring)
    req.default_keyring_used = s.keyring is None and s.kms_key_id is None
    keys = setup.provider
    # reachability: one listing request now gives a clear error instead of a broken mount
    for _ in store.list(prefix, delimiter="/"):
        break
    return store, keys, prefix


def build_filesystem(req: MountRequest, store, keys, prefix):
    from .fs import Filesystem, FsConfig

    s = req.settings
    vault = vault_for(s, store, keys)
    cfg = FsConfig(attr_timeout=s.attr_timeout, entry_timeout=s.entry_timeout, attr_delay=s.attr_delay,
                   uid=s.uid if s.uid is not None else os.getuid(),
                   gid=s.gid if s.gid is not None else os.getgid(),
                   file_mode=s.file_mode, dir_mode=s.dir_mode, foreign_objects=s.foreign_objects,
                   read_only=s.read_only, cache_size=s.cache_size, small_file_prefetch=s.small_file_prefetch,
                   spill_dir=s.spill_dir or default_spill_dir(req.mountpoint),
                   chunk_size=s.chunk_size, io_workers=max(2, s.workers * 2),
                   crypto_workers=max(1, os.cpu_count() or 1))
    return Filesystem(vault, prefix, cfg)


def fuse_options(req: MountRequest) -> set[str]:
    src = "".join(c for c in (req.settings.name or req.source or "dssefs") if c not in ", \t\n\\")
    opts = {"fsname=" + src, "subtype=dssefs", "default_permissions"}
    if req.settings.allow_other:
        opts.add("allow_other")
    if req.settings.read_only:
        opts.add("ro")
    return opts


def raise_read_ahead(mnt: str, kb: int = 1024) -> None:
    for e in mount_entries(mnt):
        if e["fstype"].startswith("fuse"):
            path = f"/sys/class/bdi/{e['devno']}/read_ahead_kb"
            try:
                with open(path, "w") as f:
                    f.write(str(kb))
                log.debug("event=read_ahead path=%s kb=%d", path, kb)
            except OSError as err:
                log.debug("event=read_ahead_failed path=%s reason=%s", path, err)


# ---- serving ---------------------------------------------------------------------------------------------------

def serve(req: MountRequest, ready) -> int:
    """Mount and serve until unmounted or signalled; returns the exit status.  ``ready(msg)`` is
    called once with None when the mount is live, or with an error message before that."""
    import pyfuse3
    import trio

    from .fs.fuse_ops import FuseOps

    try:
        store, keys, prefix = open_backend(req)
        fs = build_filesystem(req, store, keys, prefix)
        fs.load_root()
    except DssefsError as e:
        ready(str(e))
        return 1
    except Exception as e:  # noqa: BLE001 - an unmapped failure still gets one clear line
        log.exception("event=start_failed")
        ready(f"cannot start: {type(e).__name__}: {e}")
        return 1
    mnt = req.mountpoint
    state = {"ready": False}

    def on_init() -> None:
        state["ready"] = True
        ready(None)
        sd_notify(f"READY=1\nSTATUS=serving {req.source} on {mnt}\nMAINPID={os.getpid()}")

    ops = FuseOps(fs, on_init=on_init)
    try:
        pyfuse3.init(ops, mnt, fuse_options(req))
    except Exception as e:  # noqa: BLE001 - libfuse says little more than "failed"
        ready(f"cannot mount on {mnt}: {e}")
        return 1
    pidf = pid_file(mnt)
    try:
        os.makedirs(os.path.dirname(pidf), mode=0o755, exist_ok=True)
        with open(pidf, "w") as f:
            f.write(f"{os.getpid()}\n{mnt}\n")
    except OSError as e:
        log.warning("event=pid_file_failed path=%s reason=%s", pidf, e)
    log.info("event=mounted source=%s mountpoint=%s prefix=%r chunk_size=%d cache_size=%d pid=%d",
             req.source, mnt, prefix, req.settings.chunk_size, req.settings.cache_size, os.getpid())
    result = {"failures": [], "clean": False}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            async def watch_signals() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as it:
                    async for signum in it:
                        log.info("event=signal signal=%s action='flush and unmount' dirty_files=%d",
                                 signal.Signals(signum).name, len(fs.dirty_inodes()))
                        sd_notify("STOPPING=1")
                        await fs.flush_all()
                        pyfuse3.terminate()
                        return

            async def when_ready() -> None:
                while not state["ready"]:
                    await trio.sleep(0.02)
                await trio.to_thread.run_sync(raise_read_ahead, mnt)

            nursery.start_soon(watch_signals)
            nursery.start_soon(when_ready)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
        result["failures"] = await fs.flush_all(final=True)
        result["clean"] = True

    try:
        trio.run(main)
    except BaseException:
        log.exception("event=fatal action='leaving the mount dead (ENOTCONN) so it is not mistaken "
                      "for an empty directory'")
        pyfuse3.close(unmount=False)
        _status(pidf, 2)
        return 2
    finally:
        if not state["ready"]:
            ready("the file system stopped before it was ready (see the log above)")
    pyfuse3.close(unmount=True)
    fs.close()
    try:
        fs.vault.close()
        keys.close()
        store.close()
    except Exception:  # noqa: BLE001
        pass
    code = 1 if result["failures"] else 0
    if result["failures"]:
        log.error("event=unmounted dirty_files_lost=%d (see the errors above)", len(result["failures"]))
    else:
        spill = fs.cache.spill_area
        log.info("event=unmounted mountpoint=%s spill_bytes=%d ", mnt, spill.bytes_written if spill else 0)
    _status(pidf, code)
    return code


def _status(pidf: str, code: int) -> None:
    try:
        with open(pidf + ".status", "w") as f:
            f.write(f"{code}\n")
        os.unlink(pidf)
    except OSError:
        pass


# ---- commands --------------------------------------------------------------------------------------------------

def _print_error(msg: str) -> None:
    print(f"dssefs: error: {msg}", file=sys.stderr, flush=True)


def mount_command(argv: list[str]) -> int:
    """``dssefs mount [SOURCE] MOUNTPOINT [options]`` (also the mount.fuse3 form)."""
    try:
        req = parse_mount(argv)
        setup_logging(req.settings.log_level)
        check_mountpoint(req.mountpoint)
    except DssefsError as e:
        _print_error(str(e))
        return 1
    if req.source is None:
        req.source = default_source()
        print(f"dssefs: no SOURCE given: using the local store {default_store_dir()} and the keyring "
              f"{default_keyring_path()}", file=sys.stderr, flush=True)
    if req.settings.foreground:
        def ready(msg):
            if msg is not None:
                _print_error(msg)
        return serve(req, ready)
    return _daemonize(req)


def _daemonize(req: MountRequest) -> int:
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(w)
        data = b""
        while True:
            chunk = os.read(r, 4096)
            if not chunk:
                break
            data += chunk
            if data.endswith(b"\n"):
                break
        os.close(r)
        text = data.decode("utf-8", "replace").strip()
        if text == "READY":
            if not os.environ.get("JOURNAL_STREAM"):
                print(f"dssefs: mounted {req.source} on {req.mountpoint}; log: {log_file(req.mountpoint)}",
                      file=sys.stderr, flush=True)
            return 0
        if text.startswith("ERROR "):
            _print_error(text[6:])
        else:
            _, status = os.waitpid(pid, os.WNOHANG)
            _print_error("the mount daemon exited before the mount was ready (see its log)")
        return 1
    # child: the daemon
    os.close(r)
    os.setsid()
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    if not os.environ.get("JOURNAL_STREAM"):
        # keep no pipe or terminal of the caller open: $(dssefs mount ...) and mount(8) must not
        # wait for the daemon; under systemd (JOURNAL_STREAM) stderr already is the journal
        logpath = log_file(req.mountpoint)
        try:
            os.makedirs(os.path.dirname(logpath), exist_ok=True)
            fd = os.open(logpath, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            os.dup2(fd, 2)
            os.close(fd)
        except OSError:
            os.dup2(devnull, 2)
    os.close(devnull)
    sent = {"done": False}

    def ready(msg):
        if sent["done"]:
            return
        sent["done"] = True
        try:
            os.write(w, b"READY\n" if msg is None else ("ERROR " + msg.replace("\n", " ") + "\n").encode())
            os.close(w)
        except OSError:
            pass

    code = 1
    try:
        code = serve(req, ready)
    except BaseException as e:  # noqa: BLE001
        ready(f"{type(e).__name__}: {e}")
        log.exception("event=fatal")
    finally:
        logging.shutdown()
        os._exit(code)


def umount_parser(prog: str = "dssefs umount") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Store every unsaved file, unmount and wait for the daemon to exit. "
        "Falls back to fusermount3 -u when no daemon is recorded for the mount point.")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="seconds to wait for unsaved files to be stored (default: 900)")
    p.add_argument("-z", "--lazy", action="store_true",
                   help="detach even if busy (fusermount3 -uz); unsaved files are still stored")
    p.add_argument("--if-dead", action="store_true",
                   help="only clear a dead mount (ENOTCONN, left by a daemon that crashed or was "
                   "killed); a live mount is left alone and no mount is not an error (systemd's "
                   "ExecStartPre=/ExecStopPost= use this)")
    return p


def umount_command(argv: list[str]) -> int:
    ns = umount_parser().parse_args(argv)
    mnt = os.path.abspath(ns.mountpoint)
    if ns.if_dead:
        return clear_dead_mount(mnt)
    pidf = pid_file(mnt)
    pid = None
    try:
        with open(pidf) as f:
            pid = int(f.readline().strip())
    except (OSError, ValueError):
        pid = None
    if pid is not None and not _alive(pid):
        pid = None
    if pid is None:
        state = mount_state(mnt)
        if state == "none":
            _print_error(f"{mnt} is not mounted")
            return 1
        rc = subprocess.run([fusermount(), "-uz" if ns.lazy or state == "dead" else "-u", mnt],
                            check=False).returncode
        return 0 if rc == 0 else 1
    if ns.lazy:
        subprocess.run([fusermount(), "-uz", mnt], check=False)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + ns.timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            _print_error(f"the daemon (pid {pid}) is still storing files after {ns.timeout:.0f} s; "
                         "it keeps running")
            return 1
        time.sleep(0.05)
    code = 0
    try:
        with open(pidf + ".status") as f:
            code = int(f.read().strip() or 0)
        os.unlink(pidf + ".status")
    except (OSError, ValueError):
        pass
    if mount_state(mnt) != "none":
        subprocess.run([fusermount(), "-uz", mnt], check=False)
    if code:
        _print_error("the daemon could not store every file before exiting (see its log)")
        return 1
    return 0


def clear_dead_mount(mnt: str) -> int:
    """Lazily unmount a dead FUSE mount at ``mnt`` (repeatedly: crashes may have stacked several);
    0 when none is left, 1 when one could not be cleared."""
    for _ in range(8):
        if mount_state(mnt) != "dead":
            return 0
        log.warning("event=dead_mount mountpoint=%s action='%s -uz'", mnt, fusermount())
        subprocess.run([fusermount(), "-uz", mnt], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       check=False)
    if mount_state(mnt) == "dead":
        _print_error(f"{mnt}: a dead mount could not be cleared (try 'umount -l {mnt}')")
        return 1
    return 0


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0] != "Z"
    except (OSError, IndexError):
        return False


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["umount"]:
        return umount_command(argv[1:])
    if argv[:1] == ["mount"]:
        return mount_command(argv[1:])
    return mount_command(argv)


if __name__ == "__main__":
    sys.exit(main())
