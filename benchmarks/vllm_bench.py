"""The vllm backend vs a plain `LLM.chat` call, and vllm vs hf captions/s, on the tiny VLM on CPU.

Run with longcap's Python: it builds the tiny VLM and a shard of random JPEGs,
times the hf backend here, then runs this file again with the vLLM env's
Python (`make vllm-env`; `--part vllm`) for the vLLM side. There one engine
serves both sides, so start-up is excluded from both (and printed): the
backend's `caption_shard` (tar read, decode check, requests with per-request
seeds, one `LLM.chat`, rows, flags) against reading the same tar, building the
same chat messages with data URLs and one `LLM.chat` with one SamplingParams.
Greedy and float32 everywhere, so the texts can be compared too. One JSON line per part.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def entry(backend: str, model_dir: str, args):
    from pipeline.config import CaptionerSection

    kw = {"engine_args": {"max_model_len": 512}} if backend == "vllm" else {"batch_size": args.batch}
    return CaptionerSection(name=backend, backend=backend, model=model_dir, prompts=["long"], dtype="float32",
                            generation={"max_new_tokens": args.tokens, "temperature": 0.0}, **kw)


def prompts():
    from pipeline.config import DEFAULT_PROMPTS, PromptSection

    return {k: PromptSection(**v) for k, v in DEFAULT_PROMPTS.items()}


def read_meta(path: str):
    import pyarrow.parquet as pq

    return pq.read_table(path)


def bench_vllm(args) -> dict:
    from vllm import SamplingParams

    from pipeline.captions import build_captioner
    from pipeline.config import QualitySection
    from pipeline.mllm import chat_messages

    meta = read_meta(args.meta)
    t0 = time.perf_counter()
    cap = build_captioner(entry("vllm", args.model, args), [], prompts(), QualitySection())
    start_s = time.perf_counter() - t0
    llm, prompt = cap.engine, prompts()["long"]

    def plain() -> list[str]:
        with tarfile.open(args.tar) as tar:
            blobs = [tar.extractfile(m).read() for m in tar if m.isfile()]
        messages = [chat_messages(prompt, {"type": "image_url", "image_url": {
            "url": "data:image/jpeg;base64," + base64.b64encode(b).decode()}}) for b in blobs]
        outs = llm.chat(messages, sampling_params=SamplingParams(max_tokens=args.tokens, temperature=0.0),
                        use_tqdm=False)
        return [o.outputs[0].text for o in outs]

    plain(), cap.caption_shard(meta, args.tar)  # warm-up
    per_repeat = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        texts = plain()
        p = len(texts) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        rows = cap.caption_shard(meta, args.tar)
        b = rows.num_rows / (time.perf_counter() - t0)
        per_repeat.append((p, b))
    best_p, best_b = max(p for p, _ in per_repeat), max(b for _, b in per_repeat)
    same = sum(a == b for a, b in zip(texts, rows["text"].to_pylist()))
    return {"bench": "vllm", "images": rows.num_rows, "max_new_tokens": args.tokens,
            "engine_start_s": round(start_s, 1),
            "plain_captions_per_s": round(best_p, 2), "backend_captions_per_s": round(best_b, 2),
            "ratio": round(best_b / best_p, 3), "per_repeat_ratios": [round(b / p, 3) for p, b in per_repeat],
            "same_text": f"{same}/{rows.num_rows}", "texts": rows["text"].to_pylist()}


def bench_hf(model_dir: str, meta, tar: str, args) -> dict:
    import torch

    from pipeline.captions import build_captioner
    from pipeline.config import QualitySection

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    cap = build_captioner(entry("hf", model_dir, args), [], prompts(), QualitySection())
    start_s = time.perf_counter() - t0
    cap.caption_shard(meta.slice(0, args.batch), tar)  # warm-up
    rates = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        rows = cap.caption_shard(meta, tar)
        rates.append(rows.num_rows / (time.perf_counter() - t0))
    return {"bench": "hf", "images": rows.num_rows, "batch": args.batch, "max_new_tokens": args.tokens,
            "model_load_s": round(start_s, 1), "captions_per_s": round(max(rates), 2),
            "per_repeat": [round(r, 2) for r in rates], "texts": rows["text"].to_pylist()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["all", "vllm"], default="all")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8, help="hf: images per generate call")
    ap.add_argument("--threads", type=int, default=2, help="hf: torch threads")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    ap.add_argument("--vllm-log", default="vllm_bench_engine.log", help="the vLLM part's stderr")
    ap.add_argument("--model"), ap.add_argument("--tar"), ap.add_argument("--meta")
    args = ap.parse_args()
    if args.part == "vllm":
        print(json.dumps(bench_vllm(args)), flush=True)
        return

    from caption_bench import make_shard
    from pipeline.tiny_vlm import build_tiny_vlm

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(build_tiny_vlm(Path(tmp) / "model", layers=args.layers))
        meta, tar, _ = make_shard(Path(tmp), args.images, args.size)
        import pyarrow.parquet as pq

        pq.write_table(meta, Path(tmp) / "meta.parquet")
        hf = bench_hf(model_dir, meta, tar, args)
        print(json.dumps({k: v for k, v in hf.items() if k != "texts"}), flush=True)
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        out = subprocess.run([args.vllm_python, __file__, "--part", "vllm", "--model", model_dir, "--tar", tar,
                              "--meta", str(Path(tmp) / "meta.parquet"), "--tokens", str(args.tokens),
                              "--repeats", str(args.repeats)], env=env, check=True, stdout=subprocess.PIPE,
                             stderr=open(args.vllm_log, "w"), text=True)
        vl = json.loads(out.stdout.strip().splitlines()[-1])
    same = sum(a.strip() == b.strip() for a, b in zip(hf.pop("texts"), vl.pop("texts")))
    print(json.dumps(vl))
    print(json.dumps({"bench": "vllm_vs_hf", "speedup": round(vl["backend_captions_per_s"] / hf["captions_per_s"], 2),
                      "same_text_as_hf": f"{same}/{vl['images']}"}))


if __name__ == "__main__":
    main()
