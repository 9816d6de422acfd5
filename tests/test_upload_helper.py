"""Small PUTs sent by a helper process (dssefs/store/helper.py), against moto over HTTP.

The helper opens its own client for the same store from the same options, answers with the same
error classes, ends when the daemon closes it or dies, and when it is gone the daemon sends the
PUTs itself: the ones in flight fail as transient (sent again by the journal), none is lost.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from dssefs.errors import PreconditionFailed, StoreError
from dssefs.store.helper import HelperPuts
from dssefs.store.s3 import S3Store
from faultproxy import DELAY, fault_proxy  # noqa: F401 (fault_proxy is a fixture)

pytestmark = pytest.mark.s3


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # a child of this process: reap it
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            pass
        time.sleep(0.05)
    return False


def _helper(bucket: str, endpoint: str | None = None, **opts) -> HelperPuts:
    options = {"endpoint_url": endpoint, **opts} if endpoint else dict(opts)
    return HelperPuts(S3Store(bucket, **options), f"s3://{bucket}", options, workers=4)


def test_small_puts_go_through_the_helper_with_their_conditions(bucket):
    h = _helper(bucket)
    try:
        etag = h.put("a", b"x" * 5000, {"k": "v"}, if_none_match=True)
        info = h.head("a")
        assert info.etag == etag and info.metadata == {"k": "v"} and info.size == 5000
        with pytest.raises(PreconditionFailed):  # the same class, raised here
            h.put("a", b"other", {}, if_none_match=True)
        with pytest.raises(PreconditionFailed):
            h.put("a", b"other", {}, if_match='"0123456789abcdef0123456789abcdef"')
        new = h.put("a", memoryview(b"second"), {"k": "2"}, if_match=etag)
        assert h.get_range("a", 0, 100) == (b"second", 6) and h.head("a").etag == new
        assert h.stats()["puts"] == 2 and h.stats()["alive"]
        big = os.urandom(h.max_body + 1)  # sent from this process
        h.put("big", big, {})
        assert h.stats()["puts"] == 2 and h.get_range("big", 0, len(big))[0] == big
    finally:
        h.close()
    assert h._proc.returncode == 0


def test_a_failing_store_answers_with_the_error_it_raised(moto_server):
    h = _helper("dssefs-test-no-such-bucket", max_attempts=1)
    try:
        with pytest.raises(StoreError) as exc:
            h.put("k", b"x", {})
        assert "does not exist" in str(exc.value) and exc.value.errno
        assert h.alive  # an error is an answer, not the helper's end
    finally:
        h.close()


def test_a_lost_helper_fails_what_it_was_sending_and_the_daemon_sends_the_rest(
        fault_proxy, bucket, caplog):
    arrived = threading.Event()

    def note(_req) -> bool:
        arrived.set()  # called when the request is selected, before its delay
        return True

    fault_proxy.add(DELAY, method="PUT", path=r"/slow$", where=note, delay=3.0)
    h = _helper(bucket, fault_proxy.endpoint)
    out: dict = {}

    def slow() -> None:
        try:
            out["etag"] = h.put("slow", b"s", {})
        except StoreError as e:
            out["error"] = e

    try:
        t = threading.Thread(target=slow)
        t.start()
        assert arrived.wait(10)  # the helper is sending it
        with caplog.at_level(logging.WARNING, logger="dssefs.store.helper"):
            os.kill(h._proc.pid, signal.SIGKILL)
            t.join(10)
            assert not t.is_alive()
            err = out["error"]  # its outcome is unknown: a transient failure, sent again later
            assert getattr(err, "transient", False) and "went away" in str(err)
            assert not h.alive and "event=upload_helper_lost" in caplog.text
            h.put("after", b"a", {})  # sent from this process
        assert h.get_range("after", 0, 10)[0] == b"a" and h.stats()["puts"] == 0
    finally:
        h.close()


def test_the_helper_ends_with_the_daemon(moto_server, bucket, tmp_path):
    script = textwrap.dedent(f"""
        import os, sys
        from dssefs.store.helper import HelperPuts
        from dssefs.store.s3 import S3Store
        h = HelperPuts(S3Store({bucket!r}), "s3://{bucket}", {{}}, workers=2)
        h.put("from-child", b"c", {{}})
        print(h._proc.pid, flush=True)
        os._exit(0)  # dies without closing anything
        """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    pid = int(r.stdout.split()[0])
    assert _gone(pid), "the helper outlived the daemon"
    assert S3Store(bucket).get_range("from-child", 0, 10)[0] == b"c"
