"""The commands: ``dssefs mount``, ``dssefs umount``, ``dssefs status``."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time

from ..errors import DssefsError
from ..session import default_keyring_path, default_source, default_store_dir
from .control import query
from .logs import setup_logging
from .mounts import clear_dead, fusermount, mount_state
from .paths import (alive, ensure_runtime_dir, forget_gone_daemon, log_file, pid_file, recorded_daemon,
                    runtime_dir)
from .report import format_text, status_line
from .request import MountRequest, check_mountpoint, parse_mount
from .serve import serve

log = logging.getLogger("dssefs.daemon")


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
    if not req.settings.foreground and started_by_service_manager():
        # systemd started this very process and waits for READY=1 from it (Type=notify): forking
        # would hand the mount to a child whose messages it refuses (NotifyAccess=main)
        log.info("event=foreground reason='started by systemd with NOTIFY_SOCKET: it supervises this process'")
        req.settings.set("foreground", True, "NOTIFY_SOCKET")
    if req.settings.foreground:
        def ready(msg):
            if msg is not None:
                _print_error(msg)
        return serve(req, ready)
    return _daemonize(req)


def started_by_service_manager() -> bool:
    """Whether systemd started this very process with a notify socket.  systemd 248 and later
    set $SYSTEMD_EXEC_PID to that pid; older ones do not, but then the system manager is our
    parent (PID 1).  A $NOTIFY_SOCKET inherited from a service further up (one that ran mount(8),
    say) comes with another $SYSTEMD_EXEC_PID and another parent."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return False
    exec_pid = os.environ.get("SYSTEMD_EXEC_PID")
    if exec_pid is not None:
        return exec_pid == str(os.getpid())
    return os.getppid() == 1


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
    # a notify socket inherited from whatever service ran 'mount' is not ours to report to
    for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        os.environ.pop(var, None)
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    if not os.environ.get("JOURNAL_STREAM"):
        # keep no pipe or terminal of the caller open: $(dssefs mount ...) and mount(8) must not
        # wait for the daemon; under systemd (JOURNAL_STREAM) stderr already is the journal
        logpath = log_file(req.mountpoint)
        try:
            ensure_runtime_dir()
            fd = os.open(logpath, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            os.dup2(fd, 2)
            os.close(fd)
        except (OSError, DssefsError):
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
    daemon = recorded_daemon(mnt)
    if daemon is None:
        state = mount_state(mnt)
        if state == "none":
            _print_error(f"{mnt} is not mounted")
            return 1
        rc = subprocess.run([fusermount(), "-uz" if ns.lazy or state == "dead" else "-u", mnt],
                            check=False).returncode
        return 0 if rc == 0 else 1
    pid, started = daemon
    if ns.lazy:
        subprocess.run([fusermount(), "-uz", mnt], check=False)
    try:  # ask the daemon to leave its exit status behind (nobody else would remove it)
        with open(pidf + ".wait", "w"):
            pass
    except OSError:
        pass
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + ns.timeout
    while alive(pid, started):
        if time.monotonic() > deadline:
            _print_error(f"the daemon (pid {pid}) is still storing files after {ns.timeout:.0f} s; "
                         "it keeps running")
            return 1
        time.sleep(0.05)
    code = 0
    try:
        with open(pidf + ".status") as f:
            code = int(f.read().strip() or 0)
    except (OSError, ValueError):
        pass
    for leftover in (pidf + ".status", pidf + ".wait"):
        with contextlib.suppress(OSError):
            os.unlink(leftover)
    if mount_state(mnt) != "none":
        subprocess.run([fusermount(), "-uz", mnt], check=False)
    if code:
        _print_error("the daemon could not store every file before exiting (see its log)")
        return 1
    return 0


def clear_dead_mount(mnt: str) -> int:
    """``umount --if-dead``: clear dead mounts at ``mnt`` and the runtime files of the daemon that
    left them; 0 when no dead mount is left, 1 when one could not be cleared."""
    forget_gone_daemon(mnt)
    if not clear_dead(mnt):
        _print_error(f"{mnt}: a dead mount could not be cleared (try 'umount -l {mnt}')")
        return 1
    return 0


def status_parser(prog: str = "dssefs status") -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Ask the daemon serving MOUNTPOINT what it is doing: cache use, unsaved (dirty) "
        "files and bytes, uploads in flight, errors returned to programs (with the latest ones), KMS "
        "calls, and store requests, objects and bytes read and written since it started.  Needs root "
        "or the user that mounted it.  Contains no keys or file contents.",
        epilog="exit status: 0 answered, 1 no daemon answers for MOUNTPOINT.\n"
        "example: dssefs status /mnt/secure --json | jq .dirty.bytes")


def status_command(argv: list[str]) -> int:
    p = status_parser()
    p.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?",
                   help="the mount to ask; without it, one line for every mount of this user")
    p.add_argument("--json", action="store_true", help="the whole report as one JSON object (a list "
                   "of them without MOUNTPOINT)")
    ns = p.parse_args(argv)
    if ns.mountpoint is None:
        return _status_all(ns.json)
    try:
        reply = query(ns.mountpoint)
    except DssefsError as e:
        _print_error(str(e))
        return 1
    print(json.dumps(reply, indent=2) if ns.json else format_text(reply))
    return 0


def _status_all(as_json: bool) -> int:
    """Every mount whose daemon answers on this user's runtime directory."""
    reports = []
    try:
        names = sorted(n for n in os.listdir(runtime_dir()) if n.endswith(".sock"))
    except OSError:
        names = []
    for name in names:
        try:
            reports.append(query(name, path=os.path.join(runtime_dir(), name), timeout=5))
        except DssefsError as e:
            log.debug("event=status_skipped socket=%s reason=%s", name, e)
    if as_json:
        print(json.dumps(reports, indent=2))
        return 0
    if not reports:
        print(f"no dssefs mounts answer for this user (sockets in {runtime_dir()})", file=sys.stderr)
        return 0
    for r in sorted(reports, key=lambda r: r["mountpoint"]):
        print(f"{r['mountpoint']}  {status_line(r)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["umount"]:
        return umount_command(argv[1:])
    if argv[:1] == ["mount"]:
        return mount_command(argv[1:])
    if argv[:1] == ["status"]:
        return status_command(argv[1:])
    return mount_command(argv)


if __name__ == "__main__":
    sys.exit(main())
