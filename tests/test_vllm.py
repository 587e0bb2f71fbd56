"""The `vllm` backend through vLLM's real CPU engine, and `vllm serve` as the server of the `openai` backend.

vLLM lives in its own virtualenv (.venv-vllm, `make vllm-env`: it pins torch 2.13, longcap torch 2.14). The
captions actor is started in it through Ray (runtime_env `py_executable`), as the stage runs it; this process,
Ray's driver and the download stage stay in longcap's env. One engine start per test (about 15-30 s on 2 cores).
"""

import io
import json
import tarfile

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.captions import build_captioner
from pipeline.config import CaptionerSection, PromptSection, QualitySection, load_config
from workflows.cli import main

from captioner_helpers import caption_through_a_restart, jpeg, tiny_vlm, write_shard  # noqa: F401  (fixture)
from conftest import demo_config
from vllm_helpers import VLLM_CPU_ENV, VLLM_PY, VLLMServe, require_vllm_env

pytestmark = [pytest.mark.slow]

PROMPTS = {"long": PromptSection(text="Describe this image in detail."),
           "short": PromptSection(text="One short sentence.", version=3, system="You caption images.")}


@pytest.fixture(scope="module", autouse=True)
def vllm_env():
    require_vllm_env()


def truncate_in_tar(tar_path, key: str) -> None:
    """Cut `key`'s image in half inside the shard's tar (the metadata still says success)."""
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if m.isfile()]
    with tarfile.open(tar_path, "w") as tar:
        for m, data in members:
            data = data[: len(data) // 2] if m.name.rpartition(".")[0] == key else data
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))


def read_rows(folder):
    return [r for f in sorted(folder.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]


@pytest.mark.timeout(900)
def test_vllm_backend_in_a_captions_actor_in_its_own_env(ray_session, tiny_vlm, tmp_path):
    """Download in longcap's env; caption every shard in a Ray actor whose Python is the vLLM env's."""
    from workflows.runner import _StageActor, actor_options

    run = tmp_path / "run"
    (tmp_path / "dl.yaml").write_text(yaml.safe_dump(demo_config(run)))
    assert main(["run", str(tmp_path / "dl.yaml"), "--stages", "download", "--no-progress"]) == 0
    images = read_rows(run / "images")
    ok_keys = sorted(r["key"] for r in images if r["status"] == "success")
    assert len(images) == 12 and len(ok_keys) == 9
    broken = ok_keys[0]
    truncate_in_tar(run / "images" / f"{int(broken) // 2:05d}.tar", broken)

    data = demo_config(run)
    data["captioners"] = [{"name": "vl", "backend": "vllm", "model": str(tiny_vlm), "prompts": ["long", "short"],
                           "gpus": 0,  # vLLM's CPU build: no GPU for the actor to reserve (default: tensor_parallel_size)
                           "generation": {"max_new_tokens": 12, "temperature": 1.0, "top_p": 0.95},
                           "engine_args": {"max_model_len": 512, "enforce_eager": True}}]
    data["prompts"] = {k: v.model_dump() for k, v in PROMPTS.items()}
    data.setdefault("ray", {})["captions_runtime_env"] = {"py_executable": str(VLLM_PY), "env_vars": VLLM_CPU_ENV}
    cfg = load_config(data=data)
    opts = actor_options("captions", cfg)  # the options the runner starts captions actors with
    assert opts["runtime_env"]["py_executable"] == str(VLLM_PY) and opts["num_gpus"] == 0
    actor = _StageActor.options(**opts).remote("captions", cfg, str(run), None)
    import ray

    import torch

    # the actor runs vLLM's env (torch 2.13), this process longcap's (torch 2.14)
    assert ray.get(actor.__ray_call__.remote(lambda self: __import__("torch").__version__)).startswith("2.13")
    assert torch.__version__.startswith("2.14")
    summaries = ray.get([actor.run.remote(s) for s in range(6)], timeout=600)
    rows = read_rows(run / "captions")
    first = {(r["key"], r["prompt_id"]): r for r in rows}

    # one row per image x prompt; download failures skipped, the broken image failed, the rest captioned
    assert sorted(first) == sorted((r["key"], p) for r in images for p in ("long", "short"))
    assert sum(s.get("ok", 0) for s in summaries) == 16
    for (key, prompt), r in first.items():
        assert r["captioner"] == "vl" and r["model"] == str(tiny_vlm)
        params = json.loads(r["params"])
        assert params["max_new_tokens"] == 12 and params["temperature"] == 1.0 and params["top_p"] == 0.95
        assert params["prompt_version"] == (3 if prompt == "short" else 1)
        if key not in ok_keys:
            assert r["status"] == "skipped" and r["error"].startswith("no image")
        elif key == broken:
            assert r["status"] == "failed" and r["error"].startswith("image unreadable")
        else:
            assert r["status"] == "ok", r["error"]
            assert r["text"] and r["finish_reason"] in ("stop", "length") and r["latency_s"] > 0
            assert r["n_tokens"] == 12 if r["finish_reason"] == "length" else 1 <= r["n_tokens"] < 12
            assert isinstance(json.loads(r["flags"]), list)
    # seeds: one per (key, prompt), different across rows; sampled captions differ across images
    seeds = [json.loads(r["params"])["seed"] for r in first.values()]
    assert len(set(seeds)) == len(seeds)
    texts = [r["text"] for r in first.values() if r["status"] == "ok"]
    assert len(set(texts)) > len(texts) // 2

    # rerun every shard on the same engine: the same captions (per-request seeds, batch order does not matter)
    ray.get([actor.run.remote(s) for s in (5, 3, 1, 0, 2, 4)], timeout=600)
    again = {(r["key"], r["prompt_id"]): r for r in read_rows(run / "captions")}
    assert [(k, again[k]["text"], again[k]["n_tokens"]) for k in first] == [
        (k, r["text"], r["n_tokens"]) for k, r in first.items()]
    ray.kill(actor)


# ---------------------------------------------------------------- vllm serve behind the openai backend


@pytest.fixture(scope="module")
def vllm_serve(tiny_vlm, tmp_path_factory):
    server = VLLMServe(tiny_vlm, log=tmp_path_factory.mktemp("vllm_serve") / "serve.log").start(timeout=300)
    yield server
    server.stop()


def openai_entry(server, **kw):
    kw = {"prompts": ["long", "short"], "generation": {"max_new_tokens": 10, "temperature": 0.0}, **kw}
    return CaptionerSection(name="api", backend="openai", model=server.model, base_url=server.base_url, **kw)


@pytest.mark.timeout(600)
def test_vllm_serve_drives_the_openai_backend_like_hf_greedy(vllm_serve, tiny_vlm, tmp_path):
    """Greedy captions from `vllm serve` equal the hf backend's on the same model and images."""
    meta, tar = write_shard(tmp_path, {f"{i:04d}": jpeg(((60 * i) % 256, 200 - 40 * i, 90), (40 + 8 * i, 48))
                                       for i in range(4)}, failed={"0009": "HTTP Error 404"})
    rows = build_captioner(openai_entry(vllm_serve, max_in_flight=4), [], PROMPTS, QualitySection()
                           ).caption_shard(meta, tar).to_pylist()
    assert [(r["key"], r["prompt_id"], r["status"]) for r in rows] == [
        (k, p, "ok") for k in ("0000", "0001", "0002", "0003") for p in ("long", "short")] + [
        ("0009", "long", "skipped"), ("0009", "short", "skipped")]
    hf_entry = openai_entry(vllm_serve).model_dump(include={"prompts", "generation"})
    hf = build_captioner(CaptionerSection(name="api", backend="hf", model=str(tiny_vlm), batch_size=8, dtype="float32",
                                         **hf_entry),
                         [], PROMPTS, QualitySection()).caption_shard(meta, tar).to_pylist()
    # the same tokens; vLLM's incremental detokenizer keeps the Metaspace tokenizer's leading space
    same = [(r["text"].strip(), r["n_tokens"], r["finish_reason"]) == (h["text"], h["n_tokens"], h["finish_reason"])
            for r, h in zip(rows[:8], hf[:8])]
    assert all(same), [(r["text"], h["text"]) for r, h in zip(rows[:8], hf[:8])]


@pytest.mark.timeout(1200)
def test_vllm_serve_killed_mid_shard_then_back_the_shard_completes(vllm_serve, tmp_path):
    meta, tar = write_shard(tmp_path, {f"{i:04d}": jpeg((30 * i, 100, 255 - 30 * i)) for i in range(8)})
    # retries for ~13 min: a restart of the engine takes minutes on this loaded 2-core machine
    entry = openai_entry(vllm_serve, max_in_flight=1, retries=400, backoff=0.5, backoff_max=2,
                         generation={"max_new_tokens": 48, "temperature": 0.0})
    killed_at, rows = caption_through_a_restart(entry, PROMPTS, meta, tar, vllm_serve, first_s=120,
                                                start_timeout=300, join_s=600)
    assert 3 <= killed_at < 16, "the kill did not land mid-shard"
    assert len(rows) == 16 and all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
