#!/usr/bin/env python3
"""A TCP proxy that makes a loopback S3/KMS server look remote: every byte the client sends reaches
the server ``delay`` seconds late.

Each connection is a pair of byte streams.  The client-to-server stream is held in a queue: every
chunk read from the client is stamped with its arrival time and written to the server at
``arrival + delay`` (``--delay-down`` does the same for the server-to-client stream, 0 by
default).  The delay is applied to every chunk, not once per connection, so a keep-alive connection
reused for many requests delays each request again, and a large body is shifted by ``delay``, not
throttled (chunks are forwarded as they fall due, many in flight at once).  A request that waits
for ``100 Continue`` before sending its body pays the delay twice, as it would over a real link.

Nothing is rewritten.  The proxy only watches the client's stream to count the HTTP requests in
it (see :func:`classify`): S3 requests by kind and KMS requests by operation, which makes every
client's requests comparable (the benchmark uses them for s3fs and rclone, which have no counters,
and to cross-check dssefs's own).

Run it as a program (``latency_proxy.py UPSTREAM [--delay S] [--log FILE]``): it prints ``PORT`` on its first
line, then answers commands on stdin, one per line, with one JSON line on stdout:
``counts`` (requests counted since the last ``reset``), ``reset`` and ``quit``.  Or use
:class:`LatencyProxy` in a program, which starts such a process.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import socket
import subprocess
import sys
import threading
from urllib.parse import parse_qsl, urlsplit

#: bytes queued in one direction of one connection before the proxy stops reading from the sender
HIGH_WATER = 32 << 20
LOW_WATER = 8 << 20
READ_SIZE = 1 << 18


# ---- what a request is ----------------------------------------------------------------------------

def classify(method: str, target: str, headers: dict[str, str]) -> str:
    """``kms:Operation`` for KMS (JSON over POST with ``X-Amz-Target: TrentService.Operation``),
    else the S3 request kind as S3's documentation names it (path-style addressing)."""
    amz_target = headers.get("x-amz-target", "")
    if amz_target.startswith("TrentService."):
        return "kms:" + amz_target.split(".", 1)[1]
    if amz_target:
        return "other:" + amz_target
    split = urlsplit(target)
    query = dict(parse_qsl(split.query, keep_blank_values=True))
    segments = [s for s in split.path.split("/") if s]
    bucket_level = len(segments) <= 1
    m = method.upper()
    if m == "GET":
        if "uploadId" in query:
            return "ListParts"
        if bucket_level:
            if "uploads" in query:
                return "ListMultipartUploads"
            if "location" in query:
                return "GetBucketLocation"
            if not segments:
                return "ListBuckets"
            if any(k in query for k in ("versioning", "acl", "policy", "lifecycle", "tagging", "cors",
                                        "encryption", "object-lock", "ownershipControls")):
                return "GetBucketConfig"
            return "ListObjects" + ("V2" if query.get("list-type") == "2" else "")
        return "GetObject(range)" if "range" in headers else "GetObject"
    if m == "HEAD":
        return "HeadBucket" if bucket_level else "HeadObject"
    if m == "PUT":
        if bucket_level:
            return "PutBucket"
        copy = "x-amz-copy-source" in headers
        if "partNumber" in query:
            return "UploadPartCopy" if copy else "UploadPart"
        return "CopyObject" if copy else "PutObject"
    if m == "POST":
        if "uploads" in query:
            return "CreateMultipartUpload"
        if "uploadId" in query:
            return "CompleteMultipartUpload"
        if "delete" in query:
            return "DeleteObjects"
        return "POST"
    if m == "DELETE":
        if "uploadId" in query:
            return "AbortMultipartUpload"
        return "DeleteBucket" if bucket_level else "DeleteObject"
    return m


class RequestCounter:
    """Follows one client-to-server byte stream and counts the HTTP/1.1 requests in it.

    Only framing is parsed (request line, headers, Content-Length or chunked body).  A stream it
    cannot follow is counted once as ``unparsed`` and ignored from then on; forwarding never
    depends on it."""

    def __init__(self, counts: collections.Counter, log=None, conn: int = 0):
        self.counts = counts
        self.log = log  # called with (conn, kind, method, target, headers) for each request
        self.conn = conn
        self.buf = bytearray()
        self.state = "head"  # head | body | chunk-size | chunk-data | trailer | lost
        self.remaining = 0

    def feed(self, data: bytes) -> None:
        if self.state == "lost":
            return
        try:
            self._feed(data)
        except Exception:  # noqa: BLE001 - a stream we cannot follow is not an error of the proxy
            self.state = "lost"
            self.buf.clear()
            self.counts["unparsed"] += 1

    def _feed(self, data: bytes) -> None:
        view = memoryview(data)
        while len(view):
            if self.state == "body" or self.state == "chunk-data":
                n = min(self.remaining, len(view))
                self.remaining -= n
                view = view[n:]
                if self.remaining == 0:
                    self.state = "head" if self.state == "body" else "chunk-size"
                continue
            # line-oriented states: accumulate until the terminator
            self.buf += view
            view = memoryview(b"")
            while self.state in ("head", "chunk-size", "trailer"):
                if self.state == "head":
                    end = self.buf.find(b"\r\n\r\n")
                    if end < 0:
                        if len(self.buf) > 1 << 16:
                            raise ValueError("header too long")
                        return
                    head, rest = bytes(self.buf[:end]), bytes(self.buf[end + 4:])
                    self.buf.clear()
                    self._request(head)
                else:
                    end = self.buf.find(b"\r\n")
                    if end < 0:
                        return
                    line, rest = bytes(self.buf[:end]), bytes(self.buf[end + 2:])
                    self.buf.clear()
                    if self.state == "chunk-size":
                        if not line:  # the CRLF after a chunk's data
                            self.buf += rest
                            continue
                        size = int(line.split(b";", 1)[0].strip(), 16)
                        if size == 0:
                            self.state = "trailer"
                        else:
                            self.state, self.remaining = "chunk-data", size
                    elif not line:  # end of the trailers
                        self.state = "head"
                if self.state in ("body", "chunk-data"):
                    view = memoryview(rest)
                    break
                self.buf += rest

    def _request(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        while lines and not lines[0]:  # stray CRLF between requests
            lines.pop(0)
        method, target, _version = lines[0].split(" ", 2)
        headers = {}
        for h in lines[1:]:
            name, _, value = h.partition(":")
            headers[name.strip().lower()] = value.strip()
        kind = classify(method, target, headers)
        self.counts[kind] += 1
        if self.log is not None:
            self.log(self.conn, kind, method, target, headers)
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self.state = "chunk-size"
        else:
            n = int(headers.get("content-length") or 0)
            self.state, self.remaining = ("body", n) if n else ("head", 0)


# ---- the proxy --------------------------------------------------------------------------------------

class _Leg(asyncio.Protocol):
    """One socket of a proxied connection; what it receives goes, delayed, to ``peer``."""

    def __init__(self, delay: float, counter: RequestCounter | None):
        self.delay = delay
        self.counter = counter
        self.transport: asyncio.Transport | None = None
        self.peer: _Leg | None = None
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.queued = 0
        self.timer: asyncio.TimerHandle | None = None
        self.eof_in = False  # the socket sent EOF (or is gone): pass it on once the queue is empty
        self.eof_out = False  # EOF was passed on to this socket
        self.gone = False  # connection_lost
        self.reading_paused = False
        self.peer_blocked = False  # the peer's socket buffer is full (its pause_writing)

    # asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.counter is not None:
            self.counter.feed(data)
        self.queue.append((asyncio.get_running_loop().time() + self.delay, data))
        self.queued += len(data)
        if self.queued > HIGH_WATER and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()
        self._schedule()

    def eof_received(self):
        self.eof_in = True
        self._schedule()
        self._maybe_close()
        return True  # keep our side open for writing until the peer's data is through

    def connection_lost(self, exc) -> None:
        self.gone = self.eof_in = True
        if exc is not None:  # a reset: pass it on, drop what is queued either way
            self.queue.clear()
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            if self.peer is not None and self.peer.transport is not None and not self.peer.transport.is_closing():
                self.peer.transport.abort()
            return
        self._schedule()  # what the socket sent before closing still goes to the peer, then a close

    def pause_writing(self) -> None:  # our socket's send buffer is full: stop the peer's flushes
        if self.peer is not None:
            self.peer.peer_blocked = True

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.peer_blocked = False
            self.peer._schedule()

    # forwarding
    def _schedule(self) -> None:
        if self.timer is not None or self.peer is None or self.peer.transport is None:
            return
        if self.queue:
            if self.peer_blocked:
                return  # resume_writing reschedules
            loop = asyncio.get_running_loop()
            due = self.queue[0][0]
            if due <= loop.time():
                self._flush()
            else:
                self.timer = loop.call_at(due, self._fire)
        elif self.eof_in and not self.peer.eof_out:
            self._pass_eof()

    def _fire(self) -> None:
        self.timer = None
        self._flush()

    def _flush(self) -> None:
        now = asyncio.get_running_loop().time()
        out = self.peer.transport
        while self.queue and self.queue[0][0] <= now and not self.peer_blocked:
            _due, data = self.queue.popleft()
            self.queued -= len(data)
            if not out.is_closing():
                out.write(data)
        if self.reading_paused and self.queued < LOW_WATER and not self.gone:
            self.reading_paused = False
            self.transport.resume_reading()
        self._schedule()

    def _pass_eof(self) -> None:
        peer = self.peer
        peer.eof_out = True
        out = peer.transport
        if out.is_closing():
            return
        if self.gone or not out.can_write_eof():
            out.close()  # after its buffered data
        else:
            out.write_eof()
            peer._maybe_close()

    def _maybe_close(self) -> None:
        """Both directions of this socket are finished: close it."""
        if self.eof_in and self.eof_out and self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class _Server:
    def __init__(self, upstream: tuple[str, int], delay: float, delay_down: float, log_file=None):
        self.upstream = upstream
        self.log_file = log_file
        self.delay = delay
        self.delay_down = delay_down
        self.counts: collections.Counter = collections.Counter()
        self.connections = 0

    def client_factory(self) -> asyncio.Protocol:
        self.connections += 1
        self.counts["connections"] += 1
        client = _Leg(self.delay, RequestCounter(self.counts, self._log if self.log_file else None,
                                                           self.connections))
        asyncio.get_running_loop().create_task(self._connect(client))
        return client

    def _log(self, conn: int, kind: str, method: str, target: str, headers: dict[str, str]) -> None:
        extra = f" range={headers['range']}" if "range" in headers else ""
        if headers.get("content-length", "0") != "0":
            extra += f" length={headers['content-length']}"
        self.log_file.write(f"{asyncio.get_running_loop().time():.3f} conn={conn} {kind} "
                            f"{method} {target}{extra}\n")
        self.log_file.flush()

    async def _connect(self, client: _Leg) -> None:
        loop = asyncio.get_running_loop()
        try:
            _t, server = await loop.create_connection(lambda: _Leg(self.delay_down, None), *self.upstream)
        except OSError:
            if client.transport is not None:
                client.transport.abort()
            return
        client.peer, server.peer = server, client
        client._schedule()  # what the client sent meanwhile (and its EOF, if it is gone already)


async def serve(upstream: str, delay: float, delay_down: float, port: int, ready, log_file=None) -> None:
    parts = urlsplit(upstream if "://" in upstream else f"http://{upstream}")
    srv = _Server((parts.hostname, parts.port or 80), delay, delay_down, log_file)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(srv.client_factory, "127.0.0.1", port, backlog=256)
    ready(server.sockets[0].getsockname()[1], srv)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("upstream", help="http://HOST:PORT of the server")
    p.add_argument("--delay", type=float, default=0.02, help="client-to-server delay in seconds (default 0.02)")
    p.add_argument("--delay-down", type=float, default=0.0, help="server-to-client delay in seconds (default 0)")
    p.add_argument("--port", type=int, default=0, help="port to listen on (default: a free one)")
    p.add_argument("--log", help="append one line per request to this file (time, connection, kind, "
                   "method, target, range, body length)")
    ns = p.parse_args(argv)
    log_file = open(ns.log, "a") if ns.log else None
    loop = asyncio.new_event_loop()
    loop.set_exception_handler(_quiet_teardown)
    state: dict = {}

    def ready(port: int, srv: _Server) -> None:
        state["srv"] = srv
        print(port, flush=True)
        threading.Thread(target=commands, daemon=True).start()

    def commands() -> None:
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "quit":
                break
            fut = asyncio.run_coroutine_threadsafe(_command(state["srv"], cmd), loop)
            print(json.dumps(fut.result()), flush=True)
        loop.call_soon_threadsafe(loop.stop)

    try:
        loop.run_until_complete(serve(ns.upstream, ns.delay, ns.delay_down, ns.port, ready, log_file))
    except RuntimeError:  # loop.stop() from the command thread
        pass
    return 0


def _quiet_teardown(loop, context) -> None:
    """Python 3.11's selector transport can run its connection-lost callback twice when a reset
    arrives on a socket it is already closing; the second run fails on the cleared protocol
    (``'NoneType' object has no attribute 'connection_lost'``).  The connection is gone either way."""
    exc = context.get("exception")
    if isinstance(exc, AttributeError) and "_call_connection_lost" in repr(context.get("handle")):
        return
    loop.default_exception_handler(context)


async def _command(srv: _Server, cmd: str) -> dict:
    if cmd == "counts":
        return dict(srv.counts)
    if cmd == "reset":
        counts = dict(srv.counts)
        srv.counts.clear()
        return counts
    return {"error": f"unknown command {cmd!r}"}


class LatencyProxy:
    """The proxy as a child process: ``LatencyProxy(upstream, delay).start()``; ``endpoint``;
    ``counts()`` / ``reset()``; ``stop()``."""

    def __init__(self, upstream: str, delay: float = 0.02, delay_down: float = 0.0, log: str | None = None):
        self.upstream, self.delay, self.delay_down, self.log = upstream, delay, delay_down, log
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "LatencyProxy":
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), self.upstream, "--delay", str(self.delay),
             "--delay-down", str(self.delay_down), *(["--log", self.log] if self.log else [])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        line = self.proc.stdout.readline()
        if not re.fullmatch(r"\d+\n", line):
            self.stop()
            raise RuntimeError(f"latency proxy did not start: {line!r}")
        self.port = int(line)
        return self

    def _ask(self, cmd: str) -> dict:
        with self._lock:
            self.proc.stdin.write(cmd + "\n")
            self.proc.stdin.flush()
            return json.loads(self.proc.stdout.readline())

    def counts(self) -> dict[str, int]:
        return self._ask("counts")

    def reset(self) -> dict[str, int]:
        """Counts since the last reset, and start counting from zero."""
        return self._ask("reset")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(5)

    def __enter__(self) -> "LatencyProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(main())
