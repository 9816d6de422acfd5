"""A fault-injecting HTTP/1.1 proxy for tests: put it between dssefs (or boto3) and the moto server.

The proxy listens on a free loopback port and forwards every request to the upstream server
(plain HTTP), one upstream connection per request (``Connection: close`` upstream and towards the
client, so each request has its own client connection too).  Faults are chosen per request:

* ``SLOWDOWN``      - answer ``503 SlowDown`` (S3's XML error) without forwarding;
* ``RESET``         - reset the client connection before forwarding (the server never sees it);
* ``LOST_RESPONSE`` - forward, read the whole response (the server has applied the request), then
                      reset the client connection instead of answering;
* ``DELAY``         - wait ``delay`` seconds, then go on (other faults may still apply);
* ``KMS_THROTTLE``  - answer ``400 ThrottlingException`` (KMS's JSON error) without forwarding;
* ``ERROR``         - answer an S3 XML error ``status`` / ``code`` without forwarding (to play a
                      behaviour of S3 that moto lacks, e.g. ``412`` to a retried completion).

A :class:`Fault` selects requests by method, a regex searched in the request target (path and
query), header regexes (``None``: the header must be absent) and an optional predicate, and then
hits the ``nth`` selected ones (1-based), or every ``every``-th, or each with ``probability`` (a
``random.Random(seed)`` per fault, so a run is reproducible for the same order of requests), at
most ``limit`` times.  Every fault counts every request it selects; of those that hit, the first
added decides (delays add up and let a later fault decide).  ``FaultProxy(...,
max_in_a_row=N)`` (or the attribute) spares a request once the same method and target met N
faults in a row, so that every request succeeds within N + 1 attempts (the skipped decisions
still count as selected, and the random streams stay as they would be).

Use the ``fault_proxy`` fixture (import it into a test module: ``from faultproxy import
fault_proxy``) or ``with FaultProxy(moto_server.endpoint) as proxy: ...``; point the client at
``proxy.endpoint`` (``--endpoint-url`` or ``proxy.env``'s ``AWS_ENDPOINT_URL``).  ``proxy.log``
lists every request as a :class:`Record`; ``proxy.count(action)`` counts the faults injected.
"""

from __future__ import annotations

import dataclasses
import random
import re
import socket
import struct
import threading
import time
from typing import Callable, Collection
from urllib.parse import urlsplit

import pytest

SLOWDOWN = "slowdown"
RESET = "reset"
LOST_RESPONSE = "lost_response"
DELAY = "delay"
KMS_THROTTLE = "kms_throttle"
ERROR = "error"
ACTIONS = (SLOWDOWN, RESET, LOST_RESPONSE, DELAY, KMS_THROTTLE, ERROR)
FORWARD = "forward"

#: KMS requests (moto serves KMS and S3 on one endpoint): POST / with this header.
KMS_TARGET = {"x-amz-target": r"^TrentService\."}
#: S3 CopyObject / UploadPartCopy are PUTs with this header.
COPY_SOURCE = {"x-amz-copy-source": r"."}

_MAX_HEAD = 64 * 1024
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "expect", "te", "upgrade"}


@dataclasses.dataclass(frozen=True)
class Request:
    method: str
    target: str  # path and query, as sent
    headers: dict[str, str]  # lowercase names (the last value of repeated headers)
    body: bytes  # decoded from chunked transfer encoding if it was chunked

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


@dataclasses.dataclass(frozen=True)
class Record:
    method: str
    target: str
    action: str  # FORWARD or one of ACTIONS (the deciding one; DELAY if only delayed)
    status: int | None  # the status the client got (None: reset)
    at: float = 0.0  # time.time() when the request was read (before any delay)


class Fault:
    """One rule; see the module docstring.  ``seen`` / ``hits`` count selected / hit requests."""

    def __init__(self, action: str, *, method: str | None = None, path: str | None = None,
                 headers: dict[str, str | None] | None = None,
                 where: Callable[[Request], bool] | None = None,
                 nth: Collection[int] | None = None, every: int | None = None,
                 probability: float | None = None, seed: int = 0, limit: int | None = None,
                 delay: float = 0.0, status: int = 500, code: str = "InternalError",
                 message: str = "injected by faultproxy"):
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}: use one of {ACTIONS}")
        if sum(x is not None for x in (nth, every, probability)) > 1:
            raise ValueError("give at most one of nth, every and probability")
        self.action = action
        self.method = method.upper() if method else None
        self.path = re.compile(path) if path is not None else None
        self.headers = {k.lower(): (re.compile(v) if v is not None else None)
                        for k, v in (headers or {}).items()}
        self.where = where
        self.nth = frozenset(nth) if nth is not None else None
        self.every = every
        self.probability = probability
        self.rng = random.Random(seed)
        self.limit = limit
        self.delay = delay
        self.status, self.code, self.message = status, code, message
        self.seen = 0
        self.hits = 0

    def __repr__(self) -> str:
        return (f"Fault({self.action}, method={self.method}, path={self.path and self.path.pattern!r}, "
                f"seen={self.seen}, hits={self.hits})")

    def selects(self, req: Request) -> bool:
        if self.method is not None and req.method != self.method:
            return False
        if self.path is not None and not self.path.search(req.target):
            return False
        for name, rx in self.headers.items():
            value = req.headers.get(name)
            if rx is None:
                if value is not None:
                    return False
            elif value is None or not rx.search(value):
                return False
        return self.where is None or bool(self.where(req))

    def decide(self, req: Request) -> bool:
        """Whether this request would be hit; counts it when selected (under the proxy's lock;
        the caller counts ``hits`` for the faults it applies)."""
        if not self.selects(req):
            return False
        self.seen += 1
        if self.nth is not None:
            hit = self.seen in self.nth
        elif self.every is not None:
            hit = self.seen % self.every == 0
        elif self.probability is not None:
            hit = self.rng.random() < self.probability
        else:
            hit = True
        return hit and (self.limit is None or self.hits < self.limit)


class _Closed(Exception):
    """The client closed the connection before sending a whole request."""


class FaultProxy:
    def __init__(self, upstream: str, *, timeout: float = 120.0, max_in_a_row: int | None = None):
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError("the upstream must be http://HOST:PORT")
        self.upstream = (parts.hostname, parts.port or 80)
        self.timeout = timeout
        self.max_in_a_row = max_in_a_row
        self._in_a_row: dict[tuple[str, str], int] = {}
        self.faults: list[Fault] = []
        self.log: list[Record] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.port = 0

    # ---- control --------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """Environment that points boto3 (S3 and KMS) at the proxy."""
        return {"AWS_ENDPOINT_URL": self.endpoint}

    def add(self, action: str, **kw) -> Fault:
        fault = Fault(action, **kw)
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        """Remove every fault (the log is kept)."""
        with self._lock:
            self.faults.clear()

    def count(self, action: str | None = None, method: str | None = None) -> int:
        """Requests the given action decided (all faults when None), optionally of one method."""
        with self._lock:
            return sum(1 for r in self.log
                       if (action is None and r.action != FORWARD or r.action == action)
                       and (method is None or r.method == method))

    def start(self) -> "FaultProxy":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        self._listener = sock
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name="faultproxy-accept", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        if self._listener is not None:
            try:
                # wake up accept(): a connection to ourselves
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            except OSError:
                pass
            self._listener.close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- serving --------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stopping:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            if self._stopping:
                conn.close()
                return
            threading.Thread(target=self._serve, args=(conn,), name="faultproxy-conn",
                             daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(self.timeout)
        try:
            with conn:
                reader = conn.makefile("rb")
                try:
                    head, req = self._read_request(reader, conn)
                except _Closed:
                    return
                finally:
                    reader.close()  # else close() would leave the descriptor open (no reset)
                self._handle(conn, head, req)
        except OSError:
            pass  # the client went away: nothing to answer

    def _handle(self, conn: socket.socket, head: bytes, req: Request) -> None:
        at = time.time()
        action = FORWARD
        chosen: Fault | None = None
        delay = 0.0
        with self._lock:
            key = (req.method, req.target)
            spared = self.max_in_a_row is not None and self._in_a_row.get(key, 0) >= self.max_in_a_row
            for fault in self.faults:
                if not fault.decide(req) or chosen is not None:
                    continue
                if fault.action == DELAY:
                    fault.hits += 1
                    delay += fault.delay
                    action = DELAY
                elif not spared:
                    fault.hits += 1
                    chosen, action = fault, fault.action
            if chosen is not None:
                self._in_a_row[key] = self._in_a_row.get(key, 0) + 1
            else:
                self._in_a_row.pop(key, None)
        if delay:
            time.sleep(delay)
        status: int | None = None
        out: bytes | None = None  # the answer to send, if any
        reset = False
        try:
            if action == SLOWDOWN:
                body = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                        b"<Message>Please reduce your request rate.</Message>"
                        b"<RequestId>faultproxy</RequestId></Error>")
                status = 503
                out = _response(503, "Slow Down", "application/xml", body)
            elif action == KMS_THROTTLE:
                body = b'{"__type":"ThrottlingException","message":"Rate exceeded"}'
                status = 400
                out = _response(400, "Bad Request", "application/x-amz-json-1.1", body,
                                ("x-amzn-ErrorType: ThrottlingException",))
            elif action == ERROR:
                body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{chosen.code}</Code>'
                        f"<Message>{chosen.message}</Message><RequestId>faultproxy</RequestId>"
                        "</Error>").encode()
                status = chosen.status
                out = _response(status, "Injected", "application/xml", body)
            elif action == RESET:
                reset = True
            else:
                response = self._forward(head, req)
                if action == LOST_RESPONSE:
                    reset = True  # the server applied it; the client never hears
                else:
                    status = _status_of(response)
                    out = response
        finally:
            with self._lock:
                self.log.append(Record(req.method, req.target, action, status, at))
        # recorded before the client can see the answer: a test that reads the log right after
        # its request returned finds the request in it
        if reset:
            _reset(conn)
        elif out is not None:
            conn.sendall(out)

    def _read_request(self, reader, conn: socket.socket) -> tuple[bytes, Request]:
        line = reader.readline(_MAX_HEAD)
        if not line:
            raise _Closed()
        try:
            method, target, _version = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
        except ValueError:
            raise _Closed() from None
        lines: list[str] = []
        size = len(line)
        while True:
            h = reader.readline(_MAX_HEAD)
            size += len(h)
            if not h or size > _MAX_HEAD:
                raise _Closed()
            if h in (b"\r\n", b"\n"):
                break
            lines.append(h.decode("latin-1").rstrip("\r\n"))
        headers: dict[str, str] = {}
        kept: list[str] = []
        for h in lines:
            name, _, value = h.partition(":")
            headers[name.strip().lower()] = value.strip()
            if name.strip().lower() not in _HOP_BY_HOP:
                kept.append(h)
        if headers.get("expect", "").lower() == "100-continue":
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        if chunked:
            raw, body = _read_chunked(reader)
        else:
            n = int(headers.get("content-length") or 0)
            raw = body = _read_exact(reader, n)
        head = "\r\n".join([f"{method} {target} HTTP/1.1", *kept, "Connection: close", "", ""])
        return head.encode("latin-1") + raw, Request(method.upper(), target, headers, body)

    def _forward(self, request: bytes, req: Request) -> bytes:
        """Send the request upstream and return the whole response, rewritten to close."""
        with socket.create_connection(self.upstream, timeout=self.timeout) as up:
            up.sendall(request)
            chunks = []
            while True:
                data = up.recv(1 << 16)
                if not data:
                    break
                chunks.append(data)
        raw = b"".join(chunks)
        head, sep, body = raw.partition(b"\r\n\r\n")
        if not sep:
            raise OSError("upstream closed without a complete response")
        lines = head.split(b"\r\n")
        kept = [lines[0]] + [h for h in lines[1:]
                             if h.split(b":", 1)[0].strip().lower().decode("latin-1") not in _HOP_BY_HOP]
        kept.append(b"Connection: close")
        return b"\r\n".join(kept) + b"\r\n\r\n" + body


def _read_exact(reader, n: int) -> bytes:
    data = reader.read(n) if n else b""
    if len(data) != n:
        raise _Closed()
    return data


def _read_chunked(reader) -> tuple[bytes, bytes]:
    """(the raw chunked bytes, to forward as they are; the decoded body)."""
    raw, body = [], []
    while True:
        line = reader.readline(_MAX_HEAD)
        if not line:
            raise _Closed()
        raw.append(line)
        n = int(line.split(b";", 1)[0].strip() or b"0", 16)
        if n == 0:
            while True:  # trailers, then the empty line
                t = reader.readline(_MAX_HEAD)
                if not t:
                    raise _Closed()
                raw.append(t)
                if t in (b"\r\n", b"\n"):
                    return b"".join(raw), b"".join(body)
        data = _read_exact(reader, n + 2)
        raw.append(data)
        body.append(data[:n])


def _response(status: int, reason: str, ctype: str, body: bytes, extra: tuple[str, ...] = ()) -> bytes:
    head = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {ctype}", f"Content-Length: {len(body)}",
            "x-amz-request-id: faultproxy", *extra, "Connection: close", "", ""]
    return "\r\n".join(head).encode("latin-1") + body


def _status_of(response: bytes) -> int | None:
    try:
        return int(response.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None


def _reset(conn: socket.socket) -> None:
    """Close with RST instead of FIN: the client sees 'connection reset by peer'."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


@pytest.fixture
def fault_proxy(moto_server):
    """A started :class:`FaultProxy` in front of the session's moto server, without faults."""
    proxy = FaultProxy(moto_server.endpoint).start()
    try:
        yield proxy
    finally:
        proxy.stop()
