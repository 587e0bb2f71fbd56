"""Shared by the captioner tests: the tiny VLM, a hand-made image shard, a `transformers serve` process."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory):
    from pipeline.tiny_vlm import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("tiny_vlm") / "model")


def jpeg(color, size=(48, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def write_shard(folder: Path, images: dict[str, bytes | None], failed: dict[str, str] = ()) -> tuple[pa.Table, str]:
    """An img2dataset-like shard: meta table (key, status, error_message) and a tar of <key>.jpg."""
    folder.mkdir(parents=True, exist_ok=True)
    tar_path = folder / "00000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for key, data in images.items():
            if data is not None:
                info = tarfile.TarInfo(f"{key}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    rows = [{"key": k, "status": "success", "error_message": None} for k in images]
    rows += [{"key": k, "status": "failed_to_download", "error_message": e} for k, e in dict(failed).items()]
    rows.sort(key=lambda r: r["key"])
    return pa.Table.from_pylist(rows), str(tar_path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve:
    """A real `transformers serve` process on 127.0.0.1 with the model preloaded (subclasses: other servers)."""

    def __init__(self, model: Path, port: int | None = None, log: Path | None = None):
        self.model, self.port = str(model), port or free_port()
        self.log = log
        self.proc = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    name = "transformers serve"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "transformers.cli.transformers", "serve", self.model,
                "--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu"]

    def env(self) -> dict:
        return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

    def start(self, timeout: float = 120) -> "Serve":
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT, env=self.env(),
                                     start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} (log: {self.log})")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer on port {self.port} within {timeout} s (log: {self.log})")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the server and nothing else
            self.proc.wait(timeout=30)
        self.proc = None


def caption_through_a_restart(entry, prompts: dict, meta, tar, server: Serve, *, first_s: float = 60,
                              start_timeout: float = 120, join_s: float = 120) -> tuple[int, list[dict]]:
    """Caption one shard through the openai backend in a thread; SIGKILL the server once 3 requests are
    answered, start it again, let the shard finish. (requests answered before the kill, the shard's rows)."""
    import threading

    from pipeline.config import QualitySection
    from pipeline.openai_captioner import OpenAICaptioner

    done = []

    class Counting(OpenAICaptioner):
        async def post(self, client, body):
            res = await super().post(client, body)
            done.append(res)
            return res

    cap = Counting(entry, prompts, QualitySection())
    out = {}
    worker = threading.Thread(target=lambda: out.update(table=cap.caption_shard(meta, tar)), daemon=True)
    try:
        worker.start()
        deadline = time.time() + first_s
        while len(done) < 3 and time.time() < deadline:
            time.sleep(0.005)
        server.stop()  # SIGKILL to the server's process group, mid-shard
        killed_at = len(done)
        time.sleep(1.0)
        server.start(timeout=start_timeout)
        worker.join(timeout=join_s)
    finally:
        if server.proc is None:  # the module's server: leave it running
            server.start(timeout=start_timeout)
    return killed_at, out["table"].to_pylist()
