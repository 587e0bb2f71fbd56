"""A real S3-compatible server (moto's server mode) on 127.0.0.1 for the tests.

The endpoint and credentials go through the usual variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION), which s3fs (botocore) reads; conftest sets them for the whole test
session before any Ray starts, so every Ray worker inherits them. They always point at loopback: no test can
reach a real bucket.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_env(port: int) -> dict:
    return {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def moto_server(port: int, log_path: str = os.devnull):
    """`python -m moto.server` on 127.0.0.1:port until the block ends; yields the endpoint URL.
    Its request log goes to a file (never a pipe nobody reads: the server blocks once the pipe is full)."""
    log = open(log_path, "ab")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"moto server exited {proc.returncode} (log: {log_path})")
                if time.time() > deadline:
                    raise RuntimeError(f"moto server on {url} did not answer within 60 s")
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def new_bucket(name: str) -> str:
    """Create a bucket on the loopback server; returns its s3:// URL."""
    import s3fs

    assert os.environ["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
    fs = s3fs.S3FileSystem()
    fs.mkdir(name)
    return f"s3://{name}"
