"""The daemon as a service sees it: systemd's notify protocol (READY, STATUS, STOPPING, ERRNO,
WATCHDOG, EXTEND_TIMEOUT_USEC) against the real daemon on a datagram NOTIFY_SOCKET, ``dssefs
status`` from the running daemon, and what its logs may and may not contain."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid

import pytest
import trio

from fuse_fixtures import force_unmount, mounted, requires_fuse

from dssefs import config
from dssefs.daemon.control import query
from dssefs.daemon.logs import redact
from dssefs.daemon.notify import Notifier, watchdog_interval
from dssefs.daemon.paths import pid_file
from dssefs.daemon.request import MountRequest
from dssefs.daemon.serve import EXTEND_BY, PROGRESS_INTERVAL, Daemon


def dssefs(*args, env=None, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dssefs", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass  # the mount is gone: nothing to flush any more


def stored(local_source, tmp_path, name: str) -> bytes:
    """The plaintext of object ``name`` as the store holds it (read with the CLI, not the mount)."""
    source, args = local_source
    out = tmp_path / f"stored-{name}"
    r = dssefs("get", f"{source}/{name}", out, "--keyring", args[args.index("--keyring") + 1])
    assert r.returncode == 0, r.stderr
    return out.read_bytes()


class Listener:
    """A datagram socket standing in for systemd's notify socket (a path or @abstract)."""

    def __init__(self, tmp_path, abstract: bool = False):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"dssefs-notify-{uuid.uuid4().hex[:12]}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.address = str(tmp_path / f"notify-{uuid.uuid4().hex[:8]}.sock")
            self.sock.bind(self.address)
        self.messages: list[str] = []

    def recv(self, timeout: float) -> str | None:
        self.sock.settimeout(timeout)
        try:
            msg = self.sock.recv(65536).decode()
        except (socket.timeout, BlockingIOError):
            return None
        self.messages.append(msg)
        return msg

    def wait_for(self, field: str, timeout: float, proc=None, on_each=None) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self.recv(0.05)
            if msg is not None:
                if on_each is not None:
                    on_each(msg)
                if field in msg.split("\n"):
                    return msg
            elif proc is not None and proc.poll() is not None:
                raise AssertionError(f"daemon exited with {proc.returncode} before {field}; got {self.messages}")
        raise AssertionError(f"no {field} within {timeout} s; got {self.messages}")

    def drain(self, seconds: float) -> list[str]:
        out = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            msg = self.recv(max(0.01, deadline - time.monotonic()))
            if msg is not None:
                out.append(msg)
        return out

    def close(self) -> None:
        self.sock.close()


class Service:
    """``dssefs mount --foreground`` as systemd starts it (Type=notify)."""

    def __init__(self, tmp_path, source, args, listener: Listener, env=None, name="mnt"):
        self.mnt = tmp_path / name
        self.mnt.mkdir(exist_ok=True)
        self.log_path = tmp_path / f"{name}.log"
        full_env = {**os.environ, "NOTIFY_SOCKET": listener.address, **(env or {})}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "dssefs", "mount", source, str(self.mnt),
                                          "--foreground", *args], stdout=log, stderr=log, env=full_env,
                                         start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        force_unmount(self.mnt)


@pytest.fixture
def service(tmp_path, local_source):
    """``start(args=(), env=None, abstract=False) -> (Daemon, Listener)``; stopped at teardown."""
    made = []

    def start(extra=(), env=None, abstract=False, source=None, args=None):
        src, base_args = local_source
        listener = Listener(tmp_path, abstract)
        d = Service(tmp_path, source or src, list(base_args if args is None else args) + list(extra),
                   listener, env)
        made.append((d, listener))
        return d, listener

    yield start
    for d, listener in made:
        d.stop()
        listener.close()


def _ready(d: Service, listener: Listener, timeout: float = 30) -> str:
    """Wait for READY=1, asserting at the moment it arrives that the mount is live."""
    msg = listener.wait_for("READY=1", timeout, d.proc)
    assert mounted(d.mnt), "READY=1 arrived before the mount was in /proc/self/mountinfo"
    os.stat(d.mnt)  # and it answers
    return msg


# ---- notify protocol ----------------------------------------------------------------------------

@requires_fuse
@pytest.mark.fuse
def test_ready_only_once_mounted_then_sigterm_with_dirty_data_stores_it(service, tmp_path, local_source):
    d, listener = service()
    before_ready = []
    msg = listener.wait_for("READY=1", 30, d.proc,
                            on_each=lambda m: before_ready.append(bool(mounted(d.mnt))))
    assert mounted(d.mnt) and os.stat(d.mnt)
    assert before_ready == [True]  # nothing but READY (with its STATUS) was sent
    fields = dict(line.split("=", 1) for line in msg.split("\n"))
    assert fields["MAINPID"] == str(d.proc.pid)
    assert fields["STATUS"].startswith("serving ")

    data = os.urandom(3 << 20)
    fd = os.open(d.mnt / "unsaved.bin", os.O_CREAT | os.O_WRONLY, 0o600)
    os.write(fd, data)  # neither closed nor fsynced: only the daemon's cache holds it
    try:
        # asked in-process: a forked child would close its copy of fd at exec, and close(2) of any
        # copy makes the daemon store the file (FUSE FLUSH)
        report = query(str(d.mnt))
        assert report["dirty"] == {"files": 1, "bytes": len(data)}
        assert report["open_files"] == 1
        d.proc.send_signal(signal.SIGTERM)
        stopping = listener.wait_for("STOPPING=1", 30, d.proc)
        assert "STATUS=stopping" in stopping
        assert d.proc.wait(60) == 0, d.log()
    finally:
        close_quietly(fd)
    assert not mounted(d.mnt)
    assert not [m for m in listener.messages if "READY=1" in m.split("\n")][1:]  # READY exactly once
    pidf = pid_file(str(d.mnt))
    assert not any(os.path.exists(pidf + s) for s in ("", ".status", ".wait"))  # nothing left in /run
    assert stored(local_source, tmp_path, "unsaved.bin") == data


@requires_fuse
@pytest.mark.fuse
def test_abstract_notify_socket_and_status_lines(service, local_source):
    d, listener = service(abstract=True)
    _ready(d, listener)
    source = local_source[0]
    fd = os.open(d.mnt / "f", os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        os.write(fd, b"x" * 5000)
        # STATUS= follows the dirty data within a few seconds (sent only when it changes)
        listener.wait_for(f"STATUS=serving {source}: 1 dirty file (4.9 KiB), 0 uploads in flight, 0 errors",
                          15, d.proc)
    finally:
        os.close(fd)
    listener.wait_for(f"STATUS=serving {source}: 0 dirty files (0 B), 0 uploads in flight, 0 errors",
                      15, d.proc)
    d.proc.send_signal(signal.SIGINT)
    listener.wait_for("STOPPING=1", 30, d.proc)
    assert d.proc.wait(60) == 0
    assert not mounted(d.mnt)


@requires_fuse
@pytest.mark.fuse
@pytest.mark.parametrize("case", ["missing-keyring", "unreachable-store"])
def test_daemon_that_cannot_mount_never_sends_ready(case, service, tmp_path, request):
    if case == "missing-keyring":
        d, listener = service(args=["--keyring", str(tmp_path / "absent-keyring")])
    else:
        request.getfixturevalue("moto_server")
        d, listener = service(source="s3://no-such-bucket", args=[
            "--kms-key-id", "alias/none", "--endpoint-url", "http://127.0.0.1:9", "--max-attempts", "1"])
    rc = d.proc.wait(60)
    listener.drain(0.2)
    assert rc != 0
    assert not mounted(d.mnt)
    assert not any("READY=1" in m.split("\n") for m in listener.messages), listener.messages
    failed = [m for m in listener.messages if "STATUS=failed: " in m]
    assert failed and "ERRNO=" in failed[0], listener.messages
    errors = [ln for ln in d.log().splitlines() if "error" in ln.lower()]
    assert errors, d.log()


@requires_fuse
@pytest.mark.fuse
def test_watchdog_pings_only_when_asked_for_this_pid(service):
    d, listener = service(env={"WATCHDOG_USEC": "200000"})
    _ready(d, listener)
    pings = [m for m in listener.drain(1.0) if "WATCHDOG=1" in m.split("\n")]
    assert len(pings) >= 4, listener.messages  # every 0.1 s (half of WatchdogSec)
    d.stop()
    other, listener2 = service(env={"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"})
    _ready(other, listener2)
    assert not [m for m in listener2.drain(0.8) if "WATCHDOG=1" in m]


def test_watchdog_interval_parsing():
    pid = str(os.getpid())
    assert watchdog_interval({"WATCHDOG_USEC": "60000000"}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": pid}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval({}) is None


async def test_stop_timeout_extended_only_while_the_flush_progresses(tmp_path, autojump_clock):
    """EXTEND_TIMEOUT_USEC after each interval in which bytes reached the store, none once the
    flush stalls (so TimeoutStopSec still ends a stuck stop)."""
    from dssefs.fs import Filesystem, FsConfig
    from dssefs.kms.local import LocalKeyringProvider, create_keyring
    from dssefs.objects.vault import Vault
    from dssefs.store.local import LocalStore

    listener = Listener(tmp_path)
    create_keyring(str(tmp_path / "keyring"))
    req = MountRequest("file:///x", str(tmp_path / "mnt"), config.Settings())
    d = Daemon(req, ready=lambda msg: None,
               notifier=Notifier({"NOTIFY_SOCKET": listener.address}))
    d.keys = LocalKeyringProvider(str(tmp_path / "keyring"))
    d.fs = Filesystem(Vault(LocalStore(str(tmp_path / "store")), d.keys), "", FsConfig())
    d.state = "stopping"
    received = []

    async def progress():
        # bytes reach the store during the first three intervals, then nothing
        for _ in range(3):
            await trio.sleep(PROGRESS_INTERVAL / 5)
            d.meter.count("upload_part", written=1 << 20)
            await trio.sleep(PROGRESS_INTERVAL * 4 / 5)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(d._extend_while_progressing)
        nursery.start_soon(progress)
        await trio.sleep(PROGRESS_INTERVAL * 8 + 0.5)
        nursery.cancel_scope.cancel()
    while (msg := listener.recv(0.05)) is not None:
        received.append(msg)
    extends = [m for m in received if m.startswith("EXTEND_TIMEOUT_USEC=")]
    assert extends == [f"EXTEND_TIMEOUT_USEC={int(EXTEND_BY * 1e6)}"] * 3, received
    assert any(m.startswith("STATUS=stopping ") for m in received)
    listener.close()


# ---- dssefs status --------------------------------------------------------------------------------

@requires_fuse
@pytest.mark.fuse
def test_status_reports_counters_errors_and_refuses_strangers(local_mount, tmp_path):
    from dssefs.store.local import LocalStore

    m = local_mount
    LocalStore(str(tmp_path / "store")).put("foreign.txt", b"not written by dssefs", {})
    (m / "a.txt").write_bytes(b"a" * 10_000)
    assert (m / "a.txt").read_bytes() == b"a" * 10_000
    with pytest.raises(PermissionError):  # an error returned to a program (foreign_objects=deny)
        (m / "foreign.txt").read_bytes()
    r = dssefs("status", m.mountpoint)
    assert r.returncode == 0, r.stderr
    text = r.stdout
    for label in ("mount:", "daemon:", "cache:", "dirty:", "uploads:", "store:", "kms:", "errors:"):
        assert any(line.startswith(label) for line in text.splitlines()), text
    report = json.loads(dssefs("status", m.mountpoint, "--json").stdout)
    assert report["mountpoint"] == str(m.mountpoint) and report["pid"] == m.pid
    assert report["state"] == "serving"
    assert report["dirty"] == {"files": 0, "bytes": 0}
    assert report["store"]["objects_written"] >= 1 and report["store"]["bytes_written"] > 10_000
    assert report["store"]["requests"]["put"] >= 1 and report["store"]["writes_in_flight"] == 0
    assert report["kms"]["provider"] == "local" and report["kms"]["generate"] >= 2  # two layers
    assert report["errors"]["total"] >= 1
    last = report["errors"]["recent"][-1]
    assert last["op"] == "open" and last["errno"] == "EACCES", last
    assert last["object"].endswith("/foreign.txt") and "dssefs" in last["reason"]
    sock = [p for p in os.listdir("/run/dssefs") if p.endswith(".sock")]
    assert sock
    for name in sock:
        assert stat.S_IMODE(os.stat(os.path.join("/run/dssefs", name)).st_mode) == 0o600

    listing = dssefs("status")  # every mount of this user, one line each
    assert listing.returncode == 0
    assert f"{m.mountpoint}  serving {m.source}: 0 dirty files (0 B), 0 uploads in flight, " in listing.stdout
    assert m.pid in [r["pid"] for r in json.loads(dssefs("status", "--json").stdout)]

    nobody = dssefs("status", tmp_path)
    assert nobody.returncode == 1
    assert nobody.stderr.count("\n") == 1 and "no dssefs daemon answers" in nobody.stderr


@requires_fuse
@pytest.mark.fuse
def test_status_refuses_other_users(local_mount):
    """The socket is 0600 and the daemon checks the peer's uid: another user gets nothing."""
    from dssefs.daemon.control import control_socket

    path = control_socket(str(local_mount.mountpoint))
    assert query(str(local_mount.mountpoint), path=path)["state"] == "serving"
    r = subprocess.run([sys.executable, "-c", "import os; from dssefs.daemon.control import query; "
                        "os.setgid(65534); os.setuid(65534); "
                        f"query({str(local_mount.mountpoint)!r}, path={path!r})"],
                       capture_output=True, text=True, timeout=60, cwd="/")
    assert r.returncode != 0
    assert "permission denied on " in r.stderr, r.stderr  # refused by the socket's mode at connect()
    # and with the mode opened up, the daemon itself refuses the stranger by its credentials
    os.chmod(path, 0o666)
    r = subprocess.run([sys.executable, "-c", "import os; from dssefs.daemon.control import query; "
                        "os.setgid(65534); os.setuid(65534); "
                        f"query({str(local_mount.mountpoint)!r}, path={path!r})"],
                       capture_output=True, text=True, timeout=60, cwd="/")
    assert r.returncode != 0
    assert "permission denied: ask as root" in r.stderr and "permission denied on " not in r.stderr, r.stderr
    assert query(str(local_mount.mountpoint), path=path)["state"] == "serving"


@requires_fuse
@pytest.mark.fuse
def test_control_socket_survives_abusive_clients(local_mount):
    """Clients that never finish a request, send megabytes, or hang up early neither stall the
    daemon's event loop nor stop it from answering others."""
    from dssefs.daemon.control import control_socket

    path = control_socket(str(local_mount.mountpoint))
    idle = []
    for _ in range(50):  # connected, never sending a newline
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        s.send(b"stat")
        idle.append(s)
    big = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    big.connect(path)
    big.settimeout(10)
    try:
        big.sendall(b"x" * (10 << 20))
    except OSError:
        pass  # the daemon stops reading after its limit and answers/closes
    for _ in range(50):  # hang up at once
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        s.close()
    t0 = time.monotonic()
    assert query(str(local_mount.mountpoint), timeout=5)["state"] == "serving"
    assert time.monotonic() - t0 < 2
    (local_mount / "still-serving").write_bytes(b"ok")  # FUSE requests too
    assert (local_mount / "still-serving").read_bytes() == b"ok"
    unknown = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unknown.connect(path)
    unknown.sendall(b"shutdown\n")
    unknown.settimeout(5)
    assert "unknown command" in json.loads(unknown.recv(4096))["error"]
    for s in idle + [big, unknown]:
        s.close()


# ---- logs -----------------------------------------------------------------------------------------

def test_redact_removes_signatures_and_credentials():
    url = ("https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAABCDEFGHIJKLMNOP"
           "%2F20261127%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Signature=0123456789abcdef&X-Amz-Expires=60")
    out = redact(f"event=x url={url}")
    assert "0123456789abcdef" not in out and "AKIAABCDEFGHIJKLMNOP" not in out
    assert "X-Amz-Expires=60" in out and "X-Amz-Signature=REDACTED" in out
    out = redact("headers={'Authorization': 'AWS4-HMAC-SHA256 Credential=AKIA/x, Signature=abc'}")
    assert "Signature=abc" not in out and "Credential=AKIA/x" not in out
    out = redact("creds aws_secret_access_key=wJalrXUtnFEMI/K7MDENG SessionToken: 'FQoGZX'")
    assert "wJalrXUtnFEMI" not in out and "FQoGZX" not in out
    # botocore's header dicts and KMS responses (bytes reprs, with quotes and escapes inside)
    out = redact("headers={'X-Amz-Security-Token': b'FQoGZXIvYXdzEJr', 'Authorization': b'AWS4-HMAC-SHA256 "
                 "Credential=AKIAXX/2026, Signature=abc', 'Host': 'b.s3.amazonaws.com'}")
    assert "FQoGZXIvYXdzEJr" not in out and "Signature=abc" not in out and "'Host': 'b.s3.amazonaws.com'" in out
    for header in ("x-amz-security-token: FQoGZXIvYXdzEJr", "X-Amz-Security-Token: FQoGZXIvYXdzEJr"):
        assert "FQoGZXIvYXdzEJr" not in redact(header)
    for _ in range(2000):  # a data key's repr may hold quotes and backslashes anywhere
        key = os.urandom(32)
        out = redact(f"response={{'KeyId': 'arn:k', 'Plaintext': {key!r}, 'CiphertextBlob': b'zz'}}")
        assert repr(key)[2:-1] not in out and "'CiphertextBlob': b'zz'" in out, out
    # header lines and credential files as written, botocore's credential repr
    out = redact("authorization: AWS4-HMAC-SHA256 Credential=AKIAXX/2026, SignedHeaders=host, Signature=deadbeef")
    assert "deadbeef" not in out and "SignedHeaders" not in out
    assert "wJalr" not in redact("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG")
    assert "wJalr" not in redact('"SecretAccessKey" : "wJalrXUtnFEMIK7"')
    out = redact("ReadOnlyCredentials(access_key='AKIAABCDEFGHIJKLMNOP', secret_key='sEcReT', token='ToKeN')")
    assert "sEcReT" not in out and "ToKeN" not in out and "EFGHIJKLMNOP" not in out
    # ordinary lines, even with words that name secrets, are left alone
    for line in ("event=mounted source=s3://b mountpoint=/mnt", "object=s3://b/plaintext: notes.txt",
                 "object=s3://b/dir/Signature=final.pdf", "reason='keyring passphrase = wrong'",
                 "op=open object=s3://b/Authorization/form.pdf errno=EACCES",
                 "op=open object=s3://b/token=abc.txt errno=EACCES"):
        assert redact(line) == line


def log_to_journal(out, code: str) -> str:
    """Run ``code`` with stderr going to the file ``out``, announced as the journal stream
    ($JOURNAL_STREAM names its device and inode, as systemd does); return what it wrote."""
    with open(out, "wb") as f:
        st = os.fstat(f.fileno())
        subprocess.run([sys.executable, "-c", code], stderr=f, check=True, timeout=60,
                       env={**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    return out.read_text()


def test_journal_format_when_stderr_is_the_journal(tmp_path):
    out = tmp_path / "stderr"
    code = ("import logging, sys; from dssefs.daemon.logs import setup_logging; setup_logging('info'); "
            "logging.getLogger('dssefs.t').warning('event=x key=%s', 'v'); "
            "logging.getLogger('dssefs.t').info('event=y')")
    lines = log_to_journal(out, code).splitlines()
    assert lines == ["<4>level=WARNING logger=dssefs.t event=x key=v", "<6>level=INFO logger=dssefs.t event=y"]
    with open(out, "wb") as f:  # another stream: the plain format with time and pid
        subprocess.run([sys.executable, "-c", code], stderr=f, check=True, timeout=60,
                       env={**os.environ, "JOURNAL_STREAM": "1:2"})
    first = out.read_text().splitlines()[0]
    assert first.endswith("level=WARNING logger=dssefs.t event=x key=v") and " dssefs[" in first


@requires_fuse
@pytest.mark.fuse
def test_debug_log_holds_no_plaintext_or_key(mount_factory, local_source, tmp_path):
    from dssefs.kms.local import load_keyring

    source, args = local_source
    m = mount_factory(tmp_path / "mnt", source, *args, "--log-level", "debug")
    m.start()
    secret = b"PLAINTEXT-MARKER-" + os.urandom(8).hex().encode()
    (m / "secret.txt").write_bytes(secret * 100)
    assert (m / "secret.txt").read_bytes() == secret * 100
    os.symlink(secret.decode(), m / "link")  # a symlink target is file content too
    assert m.stop() == 0
    log = m.log()
    assert "level=DEBUG" in log  # debug logging really was on
    assert secret.decode() not in log
    keyring = load_keyring(args[args.index("--keyring") + 1])
    for name in keyring.names():
        key = keyring.master_key(name)
        for form in (key.hex(), base64.b64encode(key).decode(), base64.urlsafe_b64encode(key).decode()):
            assert form not in log


@requires_fuse
@pytest.mark.fuse
def test_under_a_service_manager_the_daemon_stays_in_the_foreground(tmp_path, local_source):
    """A unit that forgets --foreground still works: with $NOTIFY_SOCKET set, 'dssefs mount' does
    not fork, so READY=1 comes from the process systemd started (NotifyAccess=main)."""
    source, args = local_source
    listener = Listener(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    # as systemd starts it: $SYSTEMD_EXEC_PID is the pid of the process itself ($$ survives exec)
    proc = subprocess.Popen(["/bin/sh", "-c", 'SYSTEMD_EXEC_PID=$$ exec "$@"', "sh", sys.executable, "-m",
                             "dssefs", "mount", source, str(mnt), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "NOTIFY_SOCKET": listener.address})
    try:
        msg = listener.wait_for("READY=1", 30, proc)
        assert f"MAINPID={proc.pid}" in msg.split("\n")
        assert proc.poll() is None  # still serving: it did not daemonize and exit
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert "event=foreground" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        force_unmount(mnt)
        listener.close()
    assert not mounted(mnt)


def test_log_lines_cannot_be_forged_through_object_names(tmp_path):
    """An object name (or any text from outside) with a newline stays inside its own line, also
    in the journal format, where each line would become an entry of its own."""
    out = tmp_path / "stderr"
    code = ("import logging; from dssefs.daemon.logs import setup_logging; setup_logging('info'); "
            "log = logging.getLogger('dssefs.fs'); "
            "log.warning('op=open object=%s errno=EACCES', 's3://b/evil\\nevent=unmounted dirty_files_lost=0'); "
            "log.warning('op=open object=%s', 's3://b/u\\u2028event=x\\x85event=y'); "
            "\ntry:\n    raise ValueError('multi\\nline')\nexcept ValueError:\n    log.exception('event=failed')")
    lines = log_to_journal(out, code).split("\n")[:-1]
    assert lines[0] == "<4>level=WARNING logger=dssefs.fs op=open object=s3://b/evil\\x0aevent=unmounted " \
                       "dirty_files_lost=0 errno=EACCES"
    assert not any(line.startswith("<4>event=") or line.startswith("event=") for line in lines)
    assert lines[1] == "<4>level=WARNING logger=dssefs.fs op=open object=s3://b/u\\u2028event=x\\x85event=y"
    lines.pop(1)
    assert lines[1] == "<3>level=ERROR logger=dssefs.fs event=failed"
    assert lines[2] == "<3>  Traceback (most recent call last):"  # a traceback keeps its lines, indented
    assert lines[-2:] == ["<3>  ValueError: multi", "<3>  line"]  # its message's line breaks start no entry
    assert all(line.startswith(("<4>level=", "<3>level=", "<3>  ")) for line in lines)


# ---- runtime files ----------------------------------------------------------------------------------

@requires_fuse
@pytest.mark.fuse
def test_an_old_daemon_leaves_a_new_daemons_runtime_files_alone(mount_factory, local_source, tmp_path):
    """A daemon still finishing a lazily detached mount must not remove the pid file and control
    socket of the daemon now serving the same mount point (status and umount would lose it)."""
    from dssefs.daemon.control import control_socket

    source, args = local_source
    old = mount_factory(tmp_path / "mnt", source, *args)
    old.start()
    fd = os.open(old / "held.txt", os.O_CREAT | os.O_WRONLY, 0o600)
    os.write(fd, b"held open across the detach")
    subprocess.run(["fusermount3", "-uz", str(old.mountpoint)], check=True)
    new = mount_factory(tmp_path / "mnt", source, *args)
    new.start()
    os.close(fd)  # the old daemon stores the file and exits now
    assert old.wait(30) == 0, old.log()
    mnt = str(new.mountpoint)
    assert os.path.exists(pid_file(mnt)) and os.path.exists(control_socket(mnt))
    assert query(mnt)["pid"] == new.pid
    u = dssefs("umount", mnt)
    assert u.returncode == 0, u.stderr
    assert new.wait(30) == 0
    assert not any(os.path.exists(pid_file(mnt) + s) for s in ("", ".status", ".wait"))
    assert not os.path.exists(control_socket(mnt))


@requires_fuse
@pytest.mark.fuse
def test_umount_never_signals_a_process_that_reused_a_recorded_pid(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    other = subprocess.Popen(["sleep", "60"])
    try:
        os.makedirs(os.path.dirname(pid_file(str(mnt))), exist_ok=True)
        for record in (f"{other.pid}\n{mnt}\n", f"{other.pid}\n{mnt}\n12345\n"):  # no / another start time
            with open(pid_file(str(mnt)), "w") as f:
                f.write(record)
            r = dssefs("umount", mnt)
            assert r.returncode == 1 and "not mounted" in r.stderr
            assert other.poll() is None  # not signalled
        assert dssefs("umount", "--if-dead", mnt).returncode == 0
        assert not os.path.exists(pid_file(str(mnt)))  # a stale record is cleared
    finally:
        other.kill()
        other.wait()


def test_runtime_directory_must_belong_to_this_user(tmp_path, monkeypatch):
    from dssefs.daemon.paths import ensure_runtime_dir
    from dssefs.errors import DssefsError

    monkeypatch.setattr(os, "geteuid", lambda: 4242)  # a user who does not own tmp_path
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    os.makedirs(tmp_path / "dssefs")
    with pytest.raises(DssefsError) as e:
        ensure_runtime_dir()
    assert "not a directory owned by this user" in str(e.value)
    os.chown(tmp_path / "dssefs", 4242, -1)
    os.chmod(tmp_path / "dssefs", 0o777)
    assert ensure_runtime_dir() == str(tmp_path / "dssefs")  # ours, made under a loose umask: closed
    assert stat.S_IMODE(os.stat(tmp_path / "dssefs").st_mode) == 0o755


@requires_fuse
@pytest.mark.fuse
@pytest.mark.skipif(not shutil.which("unshare"), reason="needs unshare(1)")
def test_daemonized_mount_under_a_loose_umask_with_a_fresh_run(tmp_path, local_source):
    """A first mount after boot (no /run/dssefs yet) by a shell with umask 002: the runtime
    directory is created closed, the daemon serves, status answers, umount is clean.  Run in a
    private mount namespace with a fresh tmpfs on /run."""
    source, args = local_source
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    dssefs_cmd = f"{sys.executable} -m dssefs"
    script = (f"set -e; mount -t tmpfs tmpfs /run; umask 002; "
              f"{dssefs_cmd} mount {source} {mnt} {' '.join(args)}; "
              f"echo data > {mnt}/f; stat -c %a /run/dssefs; "
              f"{dssefs_cmd} status {mnt} --json > {tmp_path}/status.json; "
              f"{dssefs_cmd} umount {mnt}")
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.split() == ["755"]
    assert json.loads((tmp_path / "status.json").read_text())["state"] == "serving"
    assert not mounted(mnt)


@requires_fuse
@pytest.mark.fuse
def test_an_inherited_notify_socket_is_not_used(tmp_path, local_source):
    """'mount' run by some Type=notify service passes that service's $NOTIFY_SOCKET on: dssefs
    must still daemonize and return, and never report to the socket (it would speak for the
    service)."""
    source, args = local_source
    listener = Listener(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        r = dssefs("mount", source, mnt, *args, env={"NOTIFY_SOCKET": listener.address,
                                                     "SYSTEMD_EXEC_PID": "1", "WATCHDOG_USEC": "100000"})
        assert r.returncode == 0, r.stderr
        assert mounted(mnt)
        assert dssefs("umount", mnt).returncode == 0
    finally:
        force_unmount(mnt)
    assert listener.drain(0.3) == [] and listener.messages == []
    listener.close()


@requires_fuse
@pytest.mark.fuse
@pytest.mark.parametrize("delay", [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8])
def test_an_early_stop_signal_never_leaves_a_dead_mount(service, delay):
    """SIGTERM at any moment of start-up: the daemon either never mounted or stops cleanly; the
    signal is held while it mounts, so no moment leaves the mount dead."""
    d, listener = service()
    time.sleep(delay)
    d.proc.send_signal(signal.SIGTERM)
    rc = d.proc.wait(60)
    # killed before the handlers exist (still importing), or stopped (before or after mounting)
    assert rc in (-signal.SIGTERM, 0), d.log()
    assert not mounted(d.mnt), d.log()


@requires_fuse
@pytest.mark.fuse
def test_a_stop_signal_while_the_store_does_not_answer_ends_the_start_at_once(service, tmp_path):
    """Start-up hangs on a store that accepts connections and never answers; SIGTERM ends it at
    once, exit 0 (it was asked to stop), without READY=1 and without a mount."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # the kernel accepts; nobody ever reads or answers
    endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
    try:
        d, listener = service(source="s3://silent-bucket", args=[
            "--kms-key-id", "alias/none", "--endpoint-url", endpoint, "--region", "us-east-1"],
            env={"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"})
        time.sleep(2)
        assert d.proc.poll() is None, d.log()  # still waiting for the store
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(30) == 0, d.log()
        assert time.monotonic() - t0 < 5
        listener.drain(0.2)
        assert not any("READY=1" in m.split("\n") for m in listener.messages)
        assert any("STATUS=stopped by SIGTERM before the mount existed" in m for m in listener.messages)
        assert not mounted(d.mnt)
    finally:
        silent.close()


@requires_fuse
@pytest.mark.fuse
def test_repeated_signals_while_stopping_do_not_kill_the_daemon(service, local_source, tmp_path):
    d, listener = service()
    _ready(d, listener)
    data = os.urandom(8 << 20)
    fd = os.open(d.mnt / "big", os.O_CREAT | os.O_WRONLY, 0o600)
    os.write(fd, data)
    try:
        for _ in range(5):  # an impatient operator
            d.proc.send_signal(signal.SIGINT)
            time.sleep(0.01)
        assert d.proc.wait(60) == 0, d.log()
    finally:
        close_quietly(fd)
    assert not mounted(d.mnt)
    assert stored(local_source, tmp_path, "big") == data


def test_service_manager_detection(monkeypatch):
    from dssefs.daemon.commands import started_by_service_manager

    monkeypatch.setenv("NOTIFY_SOCKET", "@x")
    monkeypatch.setenv("SYSTEMD_EXEC_PID", str(os.getpid()))
    assert started_by_service_manager()
    monkeypatch.setenv("SYSTEMD_EXEC_PID", "1")  # inherited from the service that started a parent
    assert not started_by_service_manager()
    monkeypatch.delenv("SYSTEMD_EXEC_PID")  # systemd before 248: the manager is the parent
    monkeypatch.setattr(os, "getppid", lambda: 1)
    assert started_by_service_manager()
    monkeypatch.setattr(os, "getppid", lambda: 4242)
    assert not started_by_service_manager()
    monkeypatch.delenv("NOTIFY_SOCKET")
    monkeypatch.setattr(os, "getppid", lambda: 1)
    assert not started_by_service_manager()


def test_status_query_waits_while_the_listen_backlog_is_full(tmp_path):
    """A daemon busy accepting (a full backlog makes a Unix connect fail with EAGAIN at once on a
    socket with a timeout): the query waits and retries instead of failing."""
    import threading

    path = str(tmp_path / "c.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(0)
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    filler.connect(path)  # takes the one place in the backlog
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    with pytest.raises(BlockingIOError):
        probe.connect(path)  # the condition the retry is for
    probe.close()

    def serve_later():
        time.sleep(0.3)
        server.accept()[0].close()  # the filler
        conn, _ = server.accept()
        conn.recv(100)
        conn.sendall(b'{"state": "serving"}\n')
        conn.close()

    t = threading.Thread(target=serve_later)
    t.start()
    try:
        assert query("/mnt/x", timeout=10, path=path) == {"state": "serving"}
    finally:
        t.join(10)
        filler.close()
        server.close()


@requires_fuse
@pytest.mark.fuse
def test_a_new_daemon_removes_handshake_files_nobody_waits_for(mount_factory, local_source, tmp_path):
    source, args = local_source
    mnt = tmp_path / "mnt"
    pidf = pid_file(str(mnt))
    os.makedirs(os.path.dirname(pidf), exist_ok=True)
    for leftover in (pidf + ".status", pidf + ".wait"):  # of a daemon killed long ago
        with open(leftover, "w") as f:
            f.write("1\n")
    m = mount_factory(mnt, source, *args)
    m.start()
    assert not os.path.exists(pidf + ".status") and not os.path.exists(pidf + ".wait")
    assert m.stop() == 0
