"""Shared fixtures: a real moto server (S3 + KMS over HTTP, or HTTPS, on a free loopback port)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

pytest_plugins = ["fuse_fixtures"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    def __init__(self, extra_env: dict[str, str] | None = None,
                 tls: tuple[str, str] | None = None) -> None:
        """``tls``: ``(certificate, private key)`` PEM files; the server then speaks HTTPS only."""
        self.port = _free_port()
        self.ca_bundle = tls[0] if tls else None
        self.endpoint = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port),
             *(["--ssl-cert", tls[0], "--ssl-key", tls[1]] if tls else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=dict(os.environ, **(extra_env or {})),
        )
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("moto server exited during start-up")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("moto server did not start within 30 s")
                time.sleep(0.05)

    @property
    def env(self) -> dict[str, str]:
        """Environment for a process that should talk to this server through boto3's chain."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            **({"AWS_CA_BUNDLE": self.ca_bundle} if self.ca_bundle else {}),
        }

    def client(self, service: str):
        import boto3

        return boto3.client(service, endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing",
                            verify=self.ca_bundle)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="session")
def moto_server():
    server = MotoServer()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    for k in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        os.environ.pop(k, None)
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def bucket(moto_server) -> str:
    """A fresh, empty bucket per test."""
    name = f"dssefs-test-{uuid.uuid4().hex[:12]}"
    moto_server.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture
def kms_key(moto_server) -> str:
    """A fresh symmetric KMS key; returns its ARN."""
    return moto_server.client("kms").create_key(Description="dssefs test")["KeyMetadata"]["Arn"]
