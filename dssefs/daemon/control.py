"""The control socket: how ``dssefs status`` asks a running daemon what it is doing.

A Unix stream socket next to the pid file (``/run/dssefs/NAME-HASH.sock``, mode 0600; peers
other than root and the daemon's own user are refused by their credentials).  One request per
connection: the client sends a command line (``status``), the daemon answers one JSON line and
closes.  The answer is built on the daemon's event loop (the figures that need the cache lock
in a worker thread).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import struct
import time
from typing import Awaitable, Callable

import trio

from ..errors import DssefsError
from .paths import control_socket, ensure_runtime_dir

log = logging.getLogger("dssefs.daemon")

__all__ = ["control_socket", "query", "serve_control"]

COMMANDS = ("status",)
MAX_REQUEST = 1024


def _peer_uid(sock) -> int | None:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", raw)[1]
    except OSError:
        return None


async def serve_control(path: str, answer: Callable[[str], Awaitable[dict]], *,
                        task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Listen on ``path`` until cancelled; ``answer(command)`` builds the reply (event loop)."""
    ensure_runtime_dir()
    try:
        os.unlink(path)  # left by a daemon that was killed; the pid file check keeps one per mount
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        await sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(128)
    mine = os.stat(path).st_ino  # a newer daemon on this mount point may replace the socket
    me = os.geteuid()

    async def handle(stream: trio.SocketStream) -> None:
        try:
            uid = _peer_uid(stream.socket)
            if uid not in (0, me):
                reply = {"error": "permission denied: ask as root or as the user running the mount"}
            else:
                data = b""
                with trio.move_on_after(5):
                    while b"\n" not in data and len(data) < MAX_REQUEST:
                        chunk = await stream.receive_some(MAX_REQUEST)
                        if not chunk:
                            break
                        data += chunk
                command = data.split(b"\n", 1)[0].decode("utf-8", "replace").strip()
                if command in COMMANDS:
                    reply = await answer(command)
                else:
                    reply = {"error": f"unknown command {command[:40]!r}; known: {', '.join(COMMANDS)}"}
            with trio.move_on_after(5):
                await stream.send_all(json.dumps(reply).encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            log.debug("event=control_connection_failed reason=%s", e)
        finally:
            await stream.aclose()

    try:
        await trio.serve_listeners(handle, [trio.SocketListener(sock)], task_status=task_status)
    finally:
        try:
            if os.stat(path).st_ino == mine:
                os.unlink(path)
        except OSError:
            pass


def query(mountpoint: str, command: str = "status", timeout: float = 10.0, path: str | None = None) -> dict:
    """Ask the daemon serving ``mountpoint`` (through ``path``, by default the socket this user's
    daemon for it would have); raises DssefsError with a one-line reason."""
    path = path or control_socket(os.path.abspath(mountpoint))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    s.connect(path)
                    break
                except BlockingIOError:  # the listen backlog is full for a moment: wait, like a blocking connect
                    if time.monotonic() > deadline:
                        raise socket.timeout from None
                    time.sleep(0.01)
            try:
                s.sendall(command.encode() + b"\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the daemon refused and hung up before reading: its answer is still queued
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                data += chunk
        except (FileNotFoundError, ConnectionRefusedError):
            raise DssefsError(f"no dssefs daemon answers for {mountpoint}: it is not a dssefs mount, or it "
                              "was mounted by another user (ask as that user or as root)",
                              errno=errno.ENOENT) from None
        except PermissionError:
            raise DssefsError(f"permission denied on {path}: ask as root or as the user running the "
                              "mount", errno=errno.EACCES) from None
        except socket.timeout:
            raise DssefsError(f"the daemon serving {mountpoint} did not answer within {timeout:.0f} s "
                              "(its event loop is stalled)", errno=errno.ETIMEDOUT) from None
    try:
        reply = json.loads(data)
    except ValueError:
        raise DssefsError(f"the daemon serving {mountpoint} sent an unreadable answer") from None
    if "error" in reply:
        raise DssefsError(f"{mountpoint}: {reply['error']}")
    return reply
