"""Captioners: config, the shared request/row code, the hf backend on a tiny VLM, the vLLM mapping."""

import base64
import hashlib
import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import pyarrow.parquet as pq
import yaml
from PIL import Image

from pipeline.captions import build_captioner
from pipeline.config import CaptionerSection, ConfigError, PromptSection, QualitySection, load_config
from pipeline.mllm import Request, Result, caption_flags, prompt_hash
from pipeline.quality import QualityChecker
from pipeline.vllm_captioner import VLLMCaptioner, engine_args, map_output, sampling_params
from workflows.cli import main

from captioner_helpers import jpeg, tiny_vlm, write_shard  # noqa: F401  (fixture)
from conftest import demo_config

PROMPTS = {"long": PromptSection(text="Describe this image in detail."),
           "short": PromptSection(text="One short sentence.", version=3, system="You caption images.")}


def cfg_with(captioners, run_dir="/tmp/unused", **extra):
    return {**demo_config(run_dir), "captioners": captioners, **extra}


# ---------------------------------------------------------------- config


def test_prompts_defaults_user_entries_and_checks():
    cfg = load_config(data=cfg_with([{"name": "m", "backend": "hf", "model": "x", "prompts": ["long", "mine"]}],
                                    prompts={"mine": {"text": "Say what you see.", "version": 2}}))
    assert set(cfg.prompts) == {"long", "short", "mine"} and cfg.prompts["mine"].version == 2
    assert "Describe this image in detail" in cfg.prompts["long"].text
    with pytest.raises(ConfigError, match=r"captioners\[m\].prompts \['nope'\] are not defined"):
        load_config(data=cfg_with([{"name": "m", "backend": "hf", "model": "x", "prompts": ["nope"]}]))


@pytest.mark.parametrize("entry, message", [
    ({"name": "m", "backend": "hf"}, "backend hf needs `model`"),
    ({"name": "m", "backend": "openai", "model": "x"}, "backend openai needs `base_url`"),
    ({"name": "m", "backend": "hf", "model": "x", "base_url": "http://h"}, r"does not use \['base_url'\]"),
    ({"name": "m", "backend": "source", "generation": {"max_new_tokens": 5}}, r"does not use \['generation'\]"),
    ({"name": "m", "backend": "hf", "model": "x", "generation": {"top_p": 0}}, "top_p"),
    ({"name": "m", "backend": "hf", "model": "x", "prompts": ["long", "long"]}, "prompts listed twice"),
])
def test_captioner_entry_errors_name_the_key(entry, message):
    with pytest.raises(ConfigError, match=message):
        load_config(data=cfg_with([entry]))


def test_dumped_config_validates_again_and_vllm_gpus_default():
    cfg = load_config(data=cfg_with([{"name": "v", "backend": "vllm", "model": "x", "tensor_parallel_size": 4},
                                     {"name": "o", "backend": "openai", "model": "x", "base_url": "http://h/v1"}]))
    assert cfg.captioners[0].gpus == 4 and cfg.captioners[1].gpus == 0
    again = load_config(data=yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json"))))
    assert again == cfg


def test_images_from_is_exclusive_and_must_be_a_run(tmp_path):
    data = demo_config(tmp_path / "run")
    data["input"] = {"images_from": str(tmp_path / "nothing")}
    with pytest.raises(ConfigError, match="is not a started run"):
        load_config(data=data)
    data["input"] = {"images_from": str(tmp_path), "urls": [str(tmp_path / "x.txt")]}
    with pytest.raises(ConfigError, match="input.urls and input.images_from are exclusive"):
        load_config(data=data)
    from pipeline.config import InputSection

    assert InputSection(images_from="runs/old").images_from == str(Path.cwd() / "runs" / "old")  # for Ray workers
    assert InputSection(images_from="s3://bucket/runs/old").images_from == "s3://bucket/runs/old"


# ---------------------------------------------------------------- shared code


def test_prompt_hash_and_flags_reuse_the_sentences_checker():
    assert prompt_hash(PROMPTS["long"]) == hashlib.sha256(b"\0Describe this image in detail.").hexdigest()[:16]
    assert prompt_hash(PROMPTS["short"]) != prompt_hash(PromptSection(text="One short sentence."))
    checker = QualityChecker(QualitySection())
    assert caption_flags(checker, "The image shows a red circle on a white background.", "stop") == ["boilerplate"]
    assert caption_flags(checker, "A red circle on a white background near the top", "length") == ["truncated"]
    assert caption_flags(checker, "", "stop") == ["empty"]


def test_prepare_sends_stored_jpegs_as_they_are_and_resizes_the_rest():
    from pipeline.mllm import MLLMCaptioner

    cap = MLLMCaptioner(CaptionerSection(name="p", backend="hf", model="x", image_max_side=64), PROMPTS, QualitySection())
    small = jpeg((1, 2, 3), size=(64, 40))
    assert cap.prepare(small) == small
    big = cap.prepare(jpeg((200, 10, 10), size=(256, 128)))
    png = io.BytesIO()
    Image.new("RGB", (30, 20), (0, 90, 0)).save(png, format="PNG")
    for blob, size in ((big, (64, 32)), (cap.prepare(png.getvalue()), (30, 20))):
        with Image.open(io.BytesIO(blob)) as im:
            assert im.format == "JPEG" and im.size == size
    assert Request("k", "long", big, 0).image.getpixel((32, 16))[0] > 180


class Echo:
    """A backend whose 'model' answers with what it was asked (to test the row plumbing alone)."""

    def generate(self, requests):
        return [Result(text=f"A {r.image.size[0]} by {r.image.size[1]} image for {r.prompt_id}.", n_tokens=7,
                       finish_reason="stop", latency_s=0.5) for r in requests]


def test_rows_per_key_and_prompt_with_skips_and_broken_images(tmp_path):
    from pipeline.mllm import MLLMCaptioner

    class EchoCaptioner(Echo, MLLMCaptioner):
        pass

    entry = CaptionerSection(name="echo", backend="hf", model="echo-1", prompts=["long", "short"], image_max_side=32,
                             generation={"max_new_tokens": 9, "seed": 5})
    cap = EchoCaptioner(entry, PROMPTS, QualitySection(), run_seed=0)
    meta, tar = write_shard(tmp_path, {"0000": jpeg((255, 0, 0), (64, 48)), "0001": b"not a jpeg", "0003": None},
                            failed={"0002": "HTTP Error 404: Not Found"})
    rows = cap.caption_shard(meta, tar).to_pylist()
    assert [(r["key"], r["prompt_id"]) for r in rows] == [(k, p) for k in ("0000", "0001", "0002", "0003")
                                                          for p in ("long", "short")]
    ok = [r for r in rows if r["status"] == "ok"]
    assert [r["text"] for r in ok] == ["A 32 by 24 image for long.", "A 32 by 24 image for short."]
    for r in ok:
        params = json.loads(r["params"])
        assert params == {"max_new_tokens": 9, "temperature": 0.0, "top_p": 1.0, "image_max_side": 32,
                          "seed": cap.seed("0000", r["prompt_id"]), "prompt_version": PROMPTS[r["prompt_id"]].version}
        assert r["prompt_hash"] == prompt_hash(PROMPTS[r["prompt_id"]]) and r["model"] == "echo-1"
        assert r["n_tokens"] == 7 and r["finish_reason"] == "stop" and r["latency_s"] == 0.5
        assert json.loads(r["flags"]) == []
    assert cap.seed("0000", "long") != cap.seed("0000", "short") != cap.seed("0003", "short")
    by_key = {(r["key"], r["prompt_id"]): r for r in rows}
    assert by_key[("0001", "long")]["status"] == "failed" and "image unreadable" in by_key[("0001", "long")]["error"]
    assert by_key[("0002", "short")]["status"] == "skipped" and "http_404" in by_key[("0002", "short")]["error"]
    assert by_key[("0003", "long")]["status"] == "failed" and "not in" in by_key[("0003", "long")]["error"]
    # keys the dedup stage left out (dedup.before_captions): skipped with its reason, never sent to the model
    sent = []
    cap.generate = lambda reqs: (sent.extend(r.key for r in reqs), Echo.generate(cap, reqs))[1]
    rows = cap.caption_shard(meta, tar, skip={"0000": "duplicate: same url, duplicate_of 9999"}).to_pylist()
    assert sent == [] and [(r["status"], r["error"]) for r in rows if r["key"] == "0000"] == \
        [("skipped", "duplicate: same url, duplicate_of 9999")] * 2


# ---------------------------------------------------------------- hf backend


def hf_entry(model, **kw):
    return CaptionerSection(name="tiny", backend="hf", model=str(model), prompts=["long", "short"],
                            generation={"max_new_tokens": kw.pop("max_new_tokens", 12)}, **kw)


def test_hf_backend_rows_and_batching(tiny_vlm, tmp_path):
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (250, 250, 0), (0, 0, 0)]
    meta, tar = write_shard(tmp_path, {f"{i:04d}": jpeg(c, (40 + 9 * i, 36)) for i, c in enumerate(colors)},
                            failed={"0009": "timed out"})
    cap = build_captioner(hf_entry(tiny_vlm, batch_size=3), [], PROMPTS, QualitySection())
    rows = cap.caption_shard(meta, tar).to_pylist()
    assert len(rows) == 6 * 2 and sum(r["status"] == "ok" for r in rows) == 10
    ok = [r for r in rows if r["status"] == "ok"]
    for r in ok:
        assert r["captioner"] == "tiny" and r["model"] == str(tiny_vlm) and r["text"]
        assert 1 <= r["n_tokens"] <= 12 and r["finish_reason"] in ("stop", "length")
        assert (r["finish_reason"] == "length") == (r["n_tokens"] == 12)
        assert json.loads(r["params"])["max_new_tokens"] == 12 and r["latency_s"] > 0
        flags = json.loads(r["flags"])
        assert flags == caption_flags(cap.checker, r["text"], r["finish_reason"])
        assert ("truncated" in flags) == (r["finish_reason"] == "length" or not r["text"].endswith("."))
    # batched generation (left padding, 3 per batch) gives exactly what one-by-one generation gives
    requests = [Request(r["key"], r["prompt_id"], jpeg(colors[int(r["key"])], (40 + 9 * int(r["key"]), 36)), 0)
                for r in ok]
    alone = cap.generate_one_by_one(requests)
    assert [r["text"] for r in ok] == [a.text for a in alone]
    assert [r["n_tokens"] for r in ok] == [a.n_tokens for a in alone]
    # a rerun gives the same rows (latency aside)
    again = cap.caption_shard(meta, tar).to_pylist()
    assert [(r["text"], r["params"], r["flags"]) for r in again] == [(r["text"], r["params"], r["flags"]) for r in rows]


def test_hf_backend_sampling_is_seeded_and_a_bad_model_path_is_named(tiny_vlm, tmp_path):
    meta, tar = write_shard(tmp_path, {"0000": jpeg((9, 99, 199)), "0001": jpeg((200, 10, 10))})
    entry = hf_entry(tiny_vlm, max_new_tokens=10)
    entry.generation.temperature, entry.generation.top_p = 1.0, 0.9
    a = build_captioner(entry, [], PROMPTS, QualitySection(), run_seed=1).caption_shard(meta, tar)
    b = build_captioner(entry, [], PROMPTS, QualitySection(), run_seed=1).caption_shard(meta, tar)
    c = build_captioner(entry, [], PROMPTS, QualitySection(), run_seed=2).caption_shard(meta, tar)
    assert a["text"].to_pylist() == b["text"].to_pylist() != c["text"].to_pylist()
    with pytest.raises(ValueError, match=r"captioner 'tiny': cannot load model '.*missing'"):
        build_captioner(hf_entry(tmp_path / "missing"), [], PROMPTS, QualitySection())


def test_hf_backend_dtype_from_the_config(tiny_vlm, tmp_path):
    import torch

    meta, tar = write_shard(tmp_path, {"0000": jpeg((9, 99, 199))})
    cap = build_captioner(hf_entry(tiny_vlm, dtype="bfloat16", max_new_tokens=5), [], PROMPTS, QualitySection())
    assert cap.model.dtype == torch.bfloat16 and str(cap.model.device) == "cpu"
    rows = cap.caption_shard(meta, tar).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok"] and all(1 <= r["n_tokens"] <= 5 for r in rows)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_recaption_an_earlier_runs_images_with_hf_on_ray(ray_session, tiny_vlm, tmp_path):
    """Run 1 downloads; run 2 takes its images (input.images_from), captions with source + hf in two actors
    (all of Ray's 2 CPUs: they must give them back for the sentences tasks), splits sentences."""
    first = tmp_path / "first"
    cfg1 = tmp_path / "first.yaml"
    cfg1.write_text(yaml.safe_dump(demo_config(first)))
    assert main(["run", str(cfg1), "--stages", "download", "--no-progress"]) == 0
    second = tmp_path / "second"
    data = demo_config(second, **{"ray.captions_actors": 2})
    data["input"] = {"images_from": str(first), "caption_cols": ["caption"]}
    data["captioners"] = [{"name": "source", "backend": "source"},
                          {"name": "tiny", "backend": "hf", "model": str(tiny_vlm), "prompts": ["long", "short"],
                           "generation": {"max_new_tokens": 8}, "batch_size": 4}]
    cfg2 = tmp_path / "second.yaml"
    cfg2.write_text(yaml.safe_dump(data))
    assert main(["run", str(cfg2), "--stages", "captions,sentences", "--no-progress"]) == 0
    assert not (second / "images").exists()  # nothing downloaded or copied
    keys = [k for f in sorted((first / "images").glob("*.parquet")) for k in pq.read_table(f)["key"].to_pylist()]
    rows = [r for f in sorted((second / "captions").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert len(keys) == 12
    assert sorted((r["key"], r["captioner"], r["prompt_id"]) for r in rows) == sorted(
        [(k, "source", "caption") for k in keys] + [(k, "tiny", p) for k in keys for p in ("long", "short")])
    tiny_ok = [r for r in rows if r["captioner"] == "tiny" and r["status"] == "ok"]
    assert len(tiny_ok) == 9 * 2 and all(json.loads(r["params"])["max_new_tokens"] == 8 for r in tiny_ok)
    assert all(r["flags"] is not None for r in tiny_ok)
    sentences = [r for f in sorted((second / "sentences").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert len(sentences) == len(rows)
    from workflows.rundir import RunDir
    from workflows.status import run_status

    st = run_status(RunDir(second))
    assert st["accounted"] and st["urls"] == 12 and st["stages"]["captions"]["shards_done"] == 6
    assert st["stages"]["sentences"]["shards_done"] == 6


def test_gpu_captioner_on_a_local_ray_without_gpus_is_a_config_error(ray_session, tmp_path, capsys):
    data = demo_config(tmp_path / "run")
    data["captioners"] = [{"name": "g", "backend": "hf", "model": "x", "gpus": 1}]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    assert main(["run", str(tmp_path / "c.yaml"), "--no-progress"]) == 2
    assert "captions: an actor needs 1 GPU(s) (captioners[].gpus, regions.num_gpus) but the Ray cluster has 0" in capsys.readouterr().err
    assert not (tmp_path / "run" / "images" / "00000.parquet").exists()  # refused before any work


# ---------------------------------------------------------------- vLLM backend (engine isolated)
# The real engine runs in tests/test_vllm.py; here the request building and what the tiny VLM cannot make vLLM do
# (reject one request of a shard, return no completion).


class FakeVLLM(VLLMCaptioner):
    """VLLMCaptioner with the two calls into vLLM replaced; records what it was asked."""

    reject = ()

    def load_engine(self):
        self.calls = []
        return None

    def engine_call(self, messages, params):
        self.calls.append((messages, params))
        if any(p["seed"] in self.reject for p in params):
            raise ValueError("prompt too long for the model's context")
        return [SimpleNamespace(outputs=[SimpleNamespace(text=f"Caption {i}.", token_ids=list(range(3 + i)),
                                                         finish_reason="stop" if i % 2 == 0 else "length")])
                for i in range(len(messages))]


def vllm_entry(**kw):
    kw = {"prompts": ["long", "short"], **kw}
    return CaptionerSection(name="big", backend="vllm", model="org/vlm-7b", image_max_side=24,
                            generation={"max_new_tokens": 300, "temperature": 0.7, "top_p": 0.8, "seed": 11}, **kw)


def test_vllm_engine_and_sampling_arguments():
    assert engine_args(vllm_entry()) == {"model": "org/vlm-7b", "tensor_parallel_size": 1, "dtype": "auto",
                                         "limit_mm_per_prompt": {"image": 1}}
    tp = engine_args(vllm_entry(tensor_parallel_size=2, engine_args={"max_model_len": 4096}))
    assert tp["tensor_parallel_size"] == 2 and tp["max_model_len"] == 4096 and tp["distributed_executor_backend"] == "mp"
    assert sampling_params(vllm_entry().generation, 42) == {"max_tokens": 300, "temperature": 0.7, "top_p": 0.8,
                                                            "seed": 42}


def test_vllm_requests_from_rows_and_outputs_back(tmp_path):
    meta, tar = write_shard(tmp_path, {"0000": jpeg((255, 0, 0), (96, 48)), "0001": jpeg((0, 0, 255))},
                            failed={"0002": "HTTP Error 500"})
    cap = FakeVLLM(vllm_entry(), PROMPTS, QualitySection())
    rows = cap.caption_shard(meta, tar).to_pylist()
    assert len(cap.calls) == 1  # the whole shard in one engine call
    messages, params = cap.calls[0]
    assert len(messages) == 4 and [p["seed"] for p in params] == [cap.seed(k, p) for k in ("0000", "0001")
                                                                  for p in ("long", "short")]
    assert messages[1][0] == {"role": "system", "content": "You caption images."}
    user = messages[0][-1]["content"]
    assert user[1] == {"type": "text", "text": "Describe this image in detail."}
    url = user[0]["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (24, 12)  # image_max_side
    ok = [r for r in rows if r["status"] == "ok"]
    assert [(r["text"], r["n_tokens"], r["finish_reason"]) for r in ok] == [
        ("Caption 0.", 3, "stop"), ("Caption 1.", 4, "length"), ("Caption 2.", 5, "stop"), ("Caption 3.", 6, "length")]
    assert [json.loads(r["flags"]) for r in ok] == [["too_few_words"], ["too_few_words", "truncated"]] * 2
    assert rows[-1]["status"] == "skipped" and cap.cfg.gpus == 1


def test_vllm_rejected_request_is_isolated_and_recorded(tmp_path):
    meta, tar = write_shard(tmp_path, {"0000": jpeg((255, 0, 0)), "0001": jpeg((0, 0, 255))})
    cap = FakeVLLM(vllm_entry(prompts=["long"]), PROMPTS, QualitySection())
    cap.reject = {cap.seed("0001", "long")}
    rows = cap.caption_shard(meta, tar).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "failed"]
    assert "vLLM rejected the request: ValueError: prompt too long" in rows[1]["error"]
    assert map_output(SimpleNamespace(outputs=[]), 0.1).error == "vLLM returned no completion"


def test_vllm_missing_is_a_clear_error():
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vLLM is installed here: the engine would load")
    with pytest.raises(ValueError, match=r"captioner 'big': backend vllm needs vLLM in this Python"):
        VLLMCaptioner(vllm_entry(), PROMPTS, QualitySection())
