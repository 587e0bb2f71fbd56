"""The openai backend against a real `transformers serve` (tiny VLM) and a scripted stdlib server on 127.0.0.1."""

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from pipeline.config import CaptionerSection, PromptSection, QualitySection
from pipeline.captions import build_captioner
from pipeline.openai_captioner import OpenAICaptioner, ServerUnavailable
from workflows.cli import main

from captioner_helpers import Serve, caption_through_a_restart, jpeg, tiny_vlm, write_shard  # noqa: F401  (fixture)
from conftest import demo_config

PROMPTS = {"long": PromptSection(text="Describe this image in detail."),
           "short": PromptSection(text="One short sentence.")}


def entry(base_url, **kw):
    kw = {"model": "m", "prompts": ["long", "short"], "retries": 3, "backoff": 0.01, "timeout": 30,
          "generation": {"max_new_tokens": 8}, **kw}
    return CaptionerSection(name="api", backend="openai", base_url=base_url, **kw)


def shard(tmp_path, n=4, failed=None):
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 0, 0), (99, 99, 99), (200, 100, 0), (5, 50, 150), (9, 9, 9)]
    return write_shard(tmp_path, {f"{i:04d}": jpeg(colors[i % len(colors)], (40 + i, 32)) for i in range(n)},
                       failed=failed or {})


# ---------------------------------------------------------------- a scripted loopback server


class Scripted(BaseHTTPRequestHandler):
    """Chat completions that answer by the image's colour: red -> 400, green -> 500, else a caption.
    `busy` answers 503 (with Retry-After) to that many requests first."""

    busy = 0
    seen: list = []
    lock = threading.Lock()

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            type(self).seen.append((self.headers.get("Authorization"), body))
            busy = type(self).busy
            type(self).busy = max(0, busy - 1)
        if busy:
            return self.reply(503, {"error": "overloaded"}, {"Retry-After": "0"})
        url = body["messages"][-1]["content"][0]["image_url"]["url"]
        r, g, b = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB").getpixel((0, 0))
        if r > 200 and g < 50:
            return self.reply(400, {"error": {"message": "image rejected by the content filter"}})
        if g > 200 and r < 50:
            return self.reply(500, {"error": "internal"})
        text = f"A plain square of colour {r // 32} {g // 32} {b // 32} with {body['max_tokens']} tokens at most."
        self.reply(200, {"choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant",
                                                                                     "content": text}}],
                         "usage": {"completion_tokens": 13, "prompt_tokens": 50}})

    def reply(self, code, doc, headers=None):
        data = json.dumps(doc).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def scripted():
    Scripted.busy, Scripted.seen = 0, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_400_is_recorded_per_image_and_500_after_retries(scripted, tmp_path, monkeypatch):
    monkeypatch.setenv("LONGCAP_TEST_KEY", "sk-test-123")
    meta, tar = shard(tmp_path, n=4, failed={"0009": "HTTP Error 404"})
    cap = build_captioner(entry(scripted, api_key_env="LONGCAP_TEST_KEY", retries=2), [], PROMPTS, QualitySection())
    rows = {(r["key"], r["prompt_id"]): r for r in cap.caption_shard(meta, tar).to_pylist()}
    assert len(rows) == 5 * 2
    red, green, blue = rows[("0000", "long")], rows[("0001", "short")], rows[("0002", "long")]
    assert red["status"] == "failed" and red["error"].startswith("HTTP 400") and "content filter" in red["error"]
    assert green["status"] == "failed" and "HTTP 500" in green["error"] and "after 3 attempts" in green["error"]
    assert blue["status"] == "ok" and blue["text"] == "A plain square of colour 0 0 7 with 8 tokens at most."
    assert blue["n_tokens"] == 13 and blue["finish_reason"] == "stop" and json.loads(blue["flags"]) == []
    assert rows[("0009", "long")]["status"] == "skipped"
    # 4 images x 2 prompts; the green image's 2 requests were tried 3 times each
    assert len(Scripted.seen) == 8 + 2 * 2
    auth, body = Scripted.seen[0]
    assert auth == "Bearer sk-test-123"
    assert body["model"] == "m" and body["max_tokens"] == 8 and body["temperature"] == 0.0 and body["stream"] is False
    assert {b["seed"] for _, b in Scripted.seen} >= {cap.seed("0002", "long"), cap.seed("0002", "short")}
    sent = {base64.b64decode(b["messages"][-1]["content"][0]["image_url"]["url"].split(",", 1)[1])
            for _, b in Scripted.seen}
    assert jpeg((0, 0, 255), (42, 32)) in sent  # a JPEG within image_max_side goes as stored, not re-encoded


def test_busy_server_is_retried_and_a_missing_key_is_named(scripted, tmp_path, monkeypatch):
    Scripted.busy = 5
    meta, tar = shard(tmp_path, n=3)
    cap = build_captioner(entry(scripted, prompts=["long"], retries=6, max_in_flight=1), [], PROMPTS, QualitySection())
    rows = cap.caption_shard(meta, tar.replace("\\", "/")).to_pylist()
    assert [r["status"] for r in rows] == ["failed", "failed", "ok"]  # red: 400, green: 500; blue ok after 503s
    assert len(Scripted.seen) == 5 + 1 + 7 + 1
    monkeypatch.delenv("NOT_SET_KEY", raising=False)
    with pytest.raises(ValueError, match="environment variable NOT_SET_KEY"):
        build_captioner(entry(scripted, api_key_env="NOT_SET_KEY"), [], PROMPTS, QualitySection())


def test_unreachable_server_fails_the_shard_with_the_reason(tmp_path):
    from captioner_helpers import free_port

    meta, tar = shard(tmp_path, n=2)
    cap = OpenAICaptioner(entry(f"http://127.0.0.1:{free_port()}/v1", retries=2), PROMPTS, QualitySection())
    t0 = time.time()
    with pytest.raises(ServerUnavailable, match=r"unavailable after 3 attempts: ConnectError"):
        cap.caption_shard(meta, tar)
    assert time.time() - t0 < 10


# ---------------------------------------------------------------- the real server: transformers serve


@pytest.fixture(scope="module")
def serve(tiny_vlm, tmp_path_factory):
    server = Serve(tiny_vlm, log=tmp_path_factory.mktemp("serve") / "serve.log").start()
    yield server
    server.stop()


@pytest.mark.slow
def test_transformers_serve_drives_the_openai_backend(serve, tmp_path):
    meta, tar = shard(tmp_path, n=3, failed={"0007": "HTTP Error 404"})
    cap = build_captioner(entry(serve.base_url, model=str(serve.model), max_in_flight=2), [], PROMPTS, QualitySection())
    rows = cap.caption_shard(meta, tar).to_pylist()
    assert [(r["key"], r["prompt_id"]) for r in rows] == [(k, p) for k in ("0000", "0001", "0002", "0007")
                                                          for p in ("long", "short")]
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 6
    for r in ok:
        assert r["text"] and 1 <= r["n_tokens"] <= 8 and r["finish_reason"] in ("stop", "length")
        assert json.loads(r["params"])["max_new_tokens"] == 8 and isinstance(json.loads(r["flags"]), list)
        assert r["latency_s"] > 0 and r["model"] == str(serve.model)
    # the server rejects an unknown request field (HTTP 422): recorded per image, not fatal
    bad = build_captioner(entry(serve.base_url, model=str(serve.model), extra_body={"not_a_field": 1}), [], PROMPTS,
                          QualitySection()).caption_shard(meta, tar).to_pylist()
    assert [r["status"] for r in bad] == ["failed"] * 6 + ["skipped"] * 2
    assert all("HTTP 422" in r["error"] and "not_a_field" in r["error"] for r in bad[:6])


@pytest.mark.slow
def test_server_killed_mid_shard_then_back_the_shard_completes(serve, tiny_vlm, tmp_path):
    meta, tar = shard(tmp_path, n=8)
    entry_ = entry(serve.base_url, model=str(tiny_vlm), max_in_flight=2, retries=30, backoff=0.2, backoff_max=2,
                   generation={"max_new_tokens": 48})
    killed_at, rows = caption_through_a_restart(entry_, PROMPTS, meta, tar, serve)
    assert 3 <= killed_at < 16, "the kill did not land mid-shard"
    assert len(rows) == 16 and all(r["status"] == "ok" for r in rows)


@pytest.mark.slow
def test_runner_records_the_failed_shard_and_a_rerun_completes_it(ray_session, serve, tiny_vlm, tmp_path):
    """The server dies during a run: shards still to caption fail with the reason; with the server back,
    a rerun captions exactly those."""
    first = tmp_path / "first"
    (tmp_path / "first.yaml").write_text(yaml.safe_dump(demo_config(first)))
    assert main(["run", str(tmp_path / "first.yaml"), "--stages", "download", "--no-progress"]) == 0
    server = serve
    run = tmp_path / "recap"
    data = demo_config(run, **{"ray.shard_retries": 0})
    data["input"] = {"images_from": str(first)}
    data["captioners"] = [{"name": "api", "backend": "openai", "model": str(tiny_vlm), "base_url": server.base_url,
                           "prompts": ["short"], "retries": 2, "backoff": 0.05, "generation": {"max_new_tokens": 4}}]
    cfg = tmp_path / "recap.yaml"
    cfg.write_text(yaml.safe_dump(data))
    result = {}
    worker = threading.Thread(target=lambda: result.update(rc=main(["run", str(cfg), "--stages", "captions",
                                                                    "--no-progress"])), daemon=True)
    try:
        worker.start()
        deadline = time.time() + 120
        while not list((run / "captions").glob("*.parquet")) and time.time() < deadline:
            time.sleep(0.01)
        server.stop()
        worker.join(timeout=180)
        assert result["rc"] == 1
        done = {p.name: p.stat().st_mtime_ns for p in (run / "captions").glob("*.parquet")}
        assert 1 <= len(done) < 6
        shards = json.loads((run / "manifest.json").read_text())["stages"]["captions"]["shards"]
        failed = {k: v for k, v in shards.items() if v["status"] == "failed"}
        assert len(failed) == 6 - len(done)
        assert all("ServerUnavailable" in v["error"] and "unavailable after 3 attempts" in v["error"]
                   for v in failed.values())
        server.start()
        assert main(["run", str(cfg), "--stages", "captions", "--no-progress"]) == 0
    finally:
        if server.proc is None:
            server.start()
    rows = [r for f in sorted((run / "captions").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert len(rows) == 12 and sum(r["status"] == "ok" for r in rows) == 9
    assert {name: (run / "captions" / name).stat().st_mtime_ns for name in done} == done  # not redone
