"""Servers and file systems for ``latency_bench.py``.

Servers (loopback, each behind its own :class:`~latency_proxy.LatencyProxy`):

* :class:`Moto`   - moto server: S3 + KMS, in memory; serves a ranged GET by copying the whole object.
* :class:`S3rver` - s3rver (npm): file-backed S3, serves ranges in proportion to their size; no KMS.

File systems, each mounting one fresh bucket through the proxy:

* :class:`Dssefs` - ``python -m dssefs mount s3://BUCKET MNT --endpoint-url PROXY`` with a KMS key
  created on moto (KMS goes through the proxy too) or, on s3rver, a local keyring;
* :class:`S3fs`   - s3fs-fuse (``-o url=PROXY,use_path_request_style``);
* :class:`Rclone` - ``rclone mount`` of a crypt remote over an s3 remote (provider Other), with
  ``--vfs-cache-mode writes --vfs-write-back 0s``.

Every file system has ``settle()``: wait until everything written so far is stored in the bucket.
For dssefs that is when its status reports no dirty file and no upload in flight (a close already
stores the file; directory attributes may wait ``--attr-delay``); for s3fs it is immediate (its
close and every metadata change upload before they return); for rclone (whose close only queues
the upload) it is when its log shows every queued upload done ("Copied") and its ``core/stats``
no transfer running.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: moto server and Mount helpers used by the tests

from conftest import MotoServer  # noqa: E402
from fuse_fixtures import FUSERMOUNT, Mount, force_unmount, mounted  # noqa: E402
from mount_bench import drop_caches, log  # noqa: E402,F401 (log and drop_caches are used by the benches)

REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout: float, what: str, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def boto3_client(service: str, endpoint: str, access: str, secret: str, **config):
    import boto3
    from botocore.config import Config

    return boto3.client(service, endpoint_url=endpoint, region_name=REGION, aws_access_key_id=access,
                        aws_secret_access_key=secret,
                        config=Config(retries={"mode": "standard", "max_attempts": 3}, **config))


# ---- servers -----------------------------------------------------------------------------------------

class Server:
    name = "?"
    access = secret = "?"
    has_kms = False
    endpoint = ""

    def client(self, service: str = "s3", endpoint: str | None = None, **config):
        """A boto3 client straight to the server (``endpoint``: e.g. the proxy instead)."""
        return boto3_client(service, endpoint or self.endpoint, self.access, self.secret, **config)

    @property
    def env(self) -> dict[str, str]:
        """boto3's credential chain for a process that talks to this server (dssefs)."""
        return {"AWS_ACCESS_KEY_ID": self.access, "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true"}

    def new_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str) -> list[tuple[str, int]]:
        out = []
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket):
            out += [(o["Key"], o["Size"]) for o in page.get("Contents", [])]
        return out

    def drop_bucket(self, bucket: str) -> None:
        """Delete every object, unfinished upload and the bucket (best effort)."""
        c = self.client()
        try:
            for page in c.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
                for u in page.get("Uploads", []):
                    c.abort_multipart_upload(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
        except Exception:  # noqa: BLE001 - s3rver has no ListMultipartUploads
            pass
        keys = [k for k, _ in self.keys(bucket)]
        for i in range(0, len(keys), 1000):
            c.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]],
                                                    "Quiet": True})
        c.delete_bucket(Bucket=bucket)

    def describe(self) -> str:
        return self.name

    def stop(self) -> None: ...


class Moto(Server):
    name = "moto"
    access = secret = "testing"
    has_kms = True

    def __init__(self) -> None:
        self.server = MotoServer()
        self.endpoint = self.server.endpoint

    def new_kms_key(self) -> str:
        return self.client("kms").create_key(Description="dssefs latency benchmark")["KeyMetadata"]["Arn"]

    def describe(self) -> str:
        import moto
        return f"moto {moto.__version__} server (S3 + KMS, in memory)"

    def stop(self) -> None:
        self.server.stop()


def find_s3rver(hint: str | None) -> str | None:
    for cand in (hint, shutil.which("s3rver"), "/opt/s3rver/node_modules/.bin/s3rver",
                 str(Path.home() / "node_modules/.bin/s3rver")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


class S3rver(Server):
    name = "s3rver"
    access = secret = "S3RVER"

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        directory.mkdir(parents=True, exist_ok=True)
        self.log_file = open(directory.parent / "s3rver.log", "wb")
        self.proc = subprocess.Popen(
            [binary, "-d", str(directory), "-a", "127.0.0.1", "-p", str(self.port), "--no-vhost-buckets"],
            stdout=self.log_file, stderr=subprocess.STDOUT, start_new_session=True)

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"s3rver exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return True
            except OSError:
                return False
        wait_for(up, 30, "s3rver to listen")

    def describe(self) -> str:
        pkg = Path(os.path.realpath(self.binary)).parent.parent / "package.json"
        try:
            version = json.loads(pkg.read_text())["version"]
        except (OSError, ValueError, KeyError):
            version = "?"
        return f"s3rver {version} (npm; file-backed, no KMS)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log_file.close()


# ---- file systems ------------------------------------------------------------------------------------

class Target:
    """One file system mounted on ``work/mnt`` over ``bucket`` of ``server`` through ``endpoint``."""

    name = "?"

    def __init__(self, work: Path, server: Server, endpoint: str, bucket: str):
        self.work = work
        self.server = server
        self.endpoint = endpoint
        self.bucket = bucket
        self.mnt = work / "mnt"
        self.mounts = 0

    def mount(self) -> None: ...
    def unmount(self) -> None: ...

    def remount(self) -> None:
        """Everything stored, unmounted, page cache dropped, mounted again: the next access is cold."""
        self.settle()
        self.unmount()
        drop_caches()
        self.mount()

    def mark(self) -> None:
        """A workload starts: :meth:`settle` waits for what is written from here on."""

    def settle(self, timeout: float = 600, uploads: int | None = None) -> None:
        """Return once everything written so far is stored in the bucket; ``uploads``: the
        number of files the workload wrote (for a file system that uploads after close)."""

    def counters(self) -> dict | None:
        """The file system's own request counters (cumulative since mount), if it has any."""
        return None

    def describe(self) -> str:
        return self.name

    def _wait_mounted(self, proc: subprocess.Popen, log_path: Path, timeout: float = 30) -> None:
        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {proc.returncode} before mounting:\n"
                                   + log_path.read_text(errors="replace")[-3000:])
            if not mounted(self.mnt):
                return False
            try:
                os.stat(self.mnt)
                return True
            except OSError:
                return False
        wait_for(up, timeout, f"{self.name} to mount")


class Dssefs(Target):
    name = "dssefs"

    def __init__(self, work: Path, server: Server, endpoint: str, bucket: str, extra: list[str]):
        super().__init__(work, server, endpoint, bucket)
        self.extra = extra
        if server.has_kms:
            self.keys = ["--kms-key-id", server.new_kms_key()]
        else:
            from dssefs.kms.local import create_keyring
            keyring = work / "keyring"
            create_keyring(str(keyring))
            self.keys = ["--keyring", str(keyring)]
        args = [*self.keys, "--endpoint-url", endpoint, "--region", REGION, "--spill-dir", str(work / "spill"),
                "--log-level", "warning", *extra]
        env = {**server.env, "NO_PROXY": "127.0.0.1,localhost", "HOME": str(work), "XDG_CONFIG_HOME": str(work / "config"),
               "XDG_CACHE_HOME": str(work / "cache")}
        self.m = Mount(self.mnt, f"s3://{bucket}", args, env=env, log_dir=work, cwd=work)

    def mount(self) -> None:
        self.mounts += 1
        self.m.start(timeout=60)

    def unmount(self) -> None:
        rc = self.m.stop(timeout=300)
        if rc not in (0, None):
            raise RuntimeError(f"dssefs exited with {rc}:\n{self.m.log()[-3000:]}")

    def status(self) -> dict:
        from dssefs.daemon.control import query
        return query(str(self.mnt))

    def settle(self, timeout: float = 600, uploads: int | None = None) -> None:
        def done() -> bool:
            s = self.status()
            return (s["dirty"]["files"] == 0 and s["dirty"]["bytes"] == 0 and s["flushes"]["in_flight"] == 0
                    and s["store"]["writes_in_flight"] == 0
                    and s.get("deletes", {}).get("pending", 0) == 0)  # unlink/rmdir delete in the background
        wait_for(done, timeout, "dssefs to store every dirty file")
        errors = self.status()["errors"]
        if errors["total"]:
            log(f"warning: dssefs reports {errors['total']} errors: {errors['recent'][-3:]}")

    def counters(self) -> dict:
        s = self.status()
        kms = {k: v for k, v in s["kms"].items() if isinstance(v, int)}
        return {"store": dict(s["store"]["requests"]), "kms": kms,
                "failures": s["store"]["failures"], "not_found": s["store"]["not_found"]}

    def cleanup(self) -> None:
        self.m.cleanup()

    def describe(self) -> str:
        import dssefs
        keys = "KMS key on moto (through the proxy)" if self.server.has_kms else "local keyring"
        return f"dssefs {dssefs.__version__}, {keys}" + (f", {' '.join(self.extra)}" if self.extra else "")


class _Process(Target):
    """A FUSE client run in the foreground as a child process, unmounted with fusermount."""

    proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def prepare_mount(self) -> None: ...

    def environ(self) -> dict[str, str]:
        env = dict(os.environ, NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
        # rclone 1.60 refuses to start with AWS_CA_BUNDLE set, even for an http:// endpoint
        # ("LoadCustomCABundleError: ... unsupported transport"); no TLS is used here
        env.pop("AWS_CA_BUNDLE", None)
        return env

    def mount(self) -> None:
        self.mounts += 1
        self.mnt.mkdir(exist_ok=True)
        self.prepare_mount()
        self.log_path = self.work / f"{self.name}-{self.mounts}.log"
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, env=self.environ())
        self._wait_mounted(self.proc, self.log_path)

    def unmount(self) -> None:
        subprocess.run([FUSERMOUNT, "-u", str(self.mnt)], capture_output=True, timeout=600)
        if self.proc is not None:
            try:
                self.proc.wait(600)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        force_unmount(self.mnt)

    def cleanup(self) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.unmount()
        finally:
            if self.proc is not None and self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            force_unmount(self.mnt)


class S3fs(_Process):
    name = "s3fs"

    def __init__(self, work: Path, server: Server, endpoint: str, bucket: str):
        super().__init__(work, server, endpoint, bucket)
        self.passwd = work / "s3fs.passwd"
        self.passwd.write_text(f"{server.access}:{server.secret}\n")
        self.passwd.chmod(0o600)

    def command(self) -> list[str]:
        opts = [f"passwd_file={self.passwd}", f"url={self.endpoint}", "use_path_request_style",
                f"endpoint={REGION}", "dbglevel=warn"]
        return ["s3fs", self.bucket, str(self.mnt), "-f", "-o", ",".join(opts)]

    def describe(self) -> str:
        r = subprocess.run(["s3fs", "--version"], capture_output=True, text=True)
        first = (r.stdout or r.stderr).strip().splitlines()
        return (first[0] if first else "s3fs") + " (Debian), default options"


def rclone_obscure(password: str) -> str:
    return subprocess.run(["rclone", "obscure", password], capture_output=True, text=True,
                          check=True).stdout.strip()


class Rclone(_Process):
    name = "rclone"
    #: what the benchmark passes to ``rclone mount`` besides the config, cache dir and rc
    FLAGS = ["--vfs-cache-mode", "writes", "--vfs-write-back", "0s"]

    def __init__(self, work: Path, server: Server, endpoint: str, bucket: str):
        super().__init__(work, server, endpoint, bucket)
        self.config = work / "rclone.conf"
        self.config.write_text(
            "[s3]\ntype = s3\nprovider = Other\nenv_auth = false\n"
            f"access_key_id = {server.access}\nsecret_access_key = {server.secret}\n"
            f"endpoint = {endpoint}\nregion = {REGION}\nforce_path_style = true\n\n"
            f"[crypt]\ntype = crypt\nremote = s3:{bucket}\n"
            f"password = {rclone_obscure('latency-bench-password')}\n"
            f"password2 = {rclone_obscure('latency-bench-salt')}\n")
        self.cache = work / "rclone-cache"
        self.rc_port = free_port()

    def prepare_mount(self) -> None:
        self.log_mark = 0
        shutil.rmtree(self.cache, ignore_errors=True)  # cold: nothing read from an earlier mount's cache

    def command(self) -> list[str]:
        return ["rclone", "mount", "crypt:", str(self.mnt), "--config", str(self.config), *self.FLAGS,
                "--cache-dir", str(self.cache), "--rc", "--rc-addr", f"127.0.0.1:{self.rc_port}",
                "--rc-no-auth", "--log-level", "INFO"]

    def rc(self, method: str, **params) -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{self.rc_port}/{method}",
                                     data=json.dumps(params).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def mark(self) -> None:
        self.log_mark = self.log_path.stat().st_size

    def settle(self, timeout: float = 600, uploads: int | None = None) -> None:
        """Wait until every upload rclone queued since :meth:`mark` is logged as done (and at
        least ``uploads`` were queued: a close returns before rclone queues the file) and
        nothing is transferring.  rclone 1.60's ``vfs/stats`` is no help here: with
        ``--vfs-write-back 0s`` it showed no upload queued or in progress while it uploaded."""
        def done() -> bool:
            with open(self.log_path, "rb") as f:
                f.seek(getattr(self, "log_mark", 0))
                text = f.read().decode(errors="replace")
            queued = text.count(": vfs cache: queuing for upload")
            finished = text.count(": Copied (")
            if "Failed to copy" in text or "failed to upload" in text:
                raise RuntimeError(f"rclone reports a failed upload (see {self.log_path})")
            if (uploads is not None and queued < uploads) or finished < queued:
                return False
            return not self.rc("core/stats").get("transferring")
        wait_for(done, timeout, f"rclone to finish its uploads (log {self.log_path})")

    def copied(self) -> int:
        """Uploads rclone logged as done since it started ("Copied" lines)."""
        try:
            return self.log_path.read_text(errors="replace").count(": Copied (")
        except OSError:
            return 0

    def describe(self) -> str:
        r = subprocess.run(["rclone", "version"], capture_output=True, text=True)
        first = r.stdout.strip().splitlines()
        return (first[0] if first else "rclone") + " (Debian) mount crypt: " + " ".join(self.FLAGS)


def make_target(name: str, work: Path, server: Server, endpoint: str, bucket: str,
                dssefs_opts: str) -> Target:
    if name == "dssefs":
        return Dssefs(work, server, endpoint, bucket, shlex.split(dssefs_opts))
    if name == "s3fs":
        return S3fs(work, server, endpoint, bucket)
    if name == "rclone":
        return Rclone(work, server, endpoint, bucket)
    raise ValueError(f"unknown file system {name!r}")


def available(name: str) -> bool:
    return name == "dssefs" or shutil.which(name) is not None
