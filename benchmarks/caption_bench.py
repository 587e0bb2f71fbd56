"""Captioner overhead: the hf backend vs a plain generate loop, the openai backend vs a plain HTTP client loop.

Both sides use the same tiny LLaVA-style VLM (random weights, built here) and
the same JPEGs in a shard tar. hf: the backend's `caption_shard` (tar read,
decode, resize, chat template, processor, batched greedy generate, decode,
flags, Arrow rows) against processor + `model.generate` + `batch_decode` in
batches of the same size over the same decoded images. openai: the backend
against a thread pool of `httpx.Client` posts of the same JPEGs (base64 of the
original bytes) with the same concurrency, both against one `transformers
serve` process on 127.0.0.1. Prints one JSON line per comparison.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402
from PIL import Image  # noqa: E402


def make_shard(folder: Path, n: int, size: int) -> tuple[pa.Table, str, list[bytes]]:
    import numpy as np

    rng = np.random.default_rng(0)
    tar_path = folder / "00000.tar"
    blobs = []
    with tarfile.open(tar_path, "w") as tar:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG")
            blobs.append(buf.getvalue())
            info = tarfile.TarInfo(f"{i:06d}.jpg")
            info.size = len(blobs[-1])
            tar.addfile(info, io.BytesIO(blobs[-1]))
    meta = pa.table({"key": [f"{i:06d}" for i in range(n)], "status": ["success"] * n, "error_message": [None] * n})
    return meta, str(tar_path), blobs


def bench_hf(model_dir, meta, tar, blobs, args) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from pipeline.captions import build_captioner
    from pipeline.config import CaptionerSection, DEFAULT_PROMPTS, PromptSection, QualitySection
    from pipeline.mllm import chat_messages

    torch.set_num_threads(args.threads)
    prompts = {k: PromptSection(**v) for k, v in DEFAULT_PROMPTS.items()}
    device = getattr(args, "device", "cpu")
    entry = CaptionerSection(name="hf", backend="hf", model=str(model_dir), prompts=["long"], batch_size=args.batch,
                             device=device, generation={"max_new_tokens": args.tokens})
    cap = build_captioner(entry, [], prompts, QualitySection())
    model = AutoModelForImageTextToText.from_pretrained(model_dir).to(device).eval()
    proc = AutoProcessor.from_pretrained(model_dir)
    proc.tokenizer.padding_side = "left"
    text = proc.apply_chat_template(chat_messages(prompts["long"], {"type": "image"}), add_generation_prompt=True)

    def plain() -> list[str]:
        out = []
        for i in range(0, len(blobs), args.batch):
            images = [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs[i:i + args.batch]]
            inputs = proc(text=[text] * len(images), images=images, padding=True, return_tensors="pt").to(device)
            with torch.inference_mode():
                ids = model.generate(**inputs, max_new_tokens=args.tokens, do_sample=False,
                                     pad_token_id=proc.tokenizer.pad_token_id)
            new = ids[:, inputs["input_ids"].shape[1]:]
            counts.append(int((new != proc.tokenizer.pad_token_id).sum()))
            out += proc.batch_decode(new, skip_special_tokens=True)
        return out

    counts: list[int] = []

    plain(), cap.caption_shard(meta.slice(0, args.batch), tar)  # warm-up
    best = {"plain": 0.0, "backend": 0.0, "plain_tok": 0.0, "backend_tok": 0.0}
    ratios = []
    for _ in range(args.repeats):
        counts.clear()
        t0 = time.perf_counter()
        texts = plain()
        plain_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        rows = cap.caption_shard(meta, tar)
        backend_s = time.perf_counter() - t0
        best["plain"] = max(best["plain"], len(blobs) / plain_s)
        best["backend"] = max(best["backend"], len(blobs) / backend_s)
        best["plain_tok"] = max(best["plain_tok"], sum(counts) / plain_s)
        best["backend_tok"] = max(best["backend_tok"], sum(rows["n_tokens"].to_pylist()) / backend_s)
        ratios.append(round(plain_s / backend_s, 3))
    same = sum(a.strip() == b for a, b in zip(texts, rows["text"].to_pylist()))
    return {"bench": "hf", "device": device, "images": len(blobs), "batch": args.batch, "max_new_tokens": args.tokens,
            "plain_images_per_s": round(best["plain"], 2), "backend_images_per_s": round(best["backend"], 2),
            "plain_tokens_per_s": round(best["plain_tok"], 1), "backend_tokens_per_s": round(best["backend_tok"], 1),
            "ratio": round(best["backend"] / best["plain"], 3), "per_repeat_ratios": ratios,
            "same_text": f"{same}/{len(blobs)}"}


def bench_openai(model_dir, meta, tar, blobs, args) -> dict:
    import httpx

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from captioner_helpers import Serve
    from pipeline.captions import build_captioner
    from pipeline.config import CaptionerSection, DEFAULT_PROMPTS, PromptSection, QualitySection
    from pipeline.mllm import chat_messages

    prompts = {k: PromptSection(**v) for k, v in DEFAULT_PROMPTS.items()}
    server = Serve(model_dir).start()
    try:
        entry = CaptionerSection(name="api", backend="openai", model=str(model_dir), base_url=server.base_url,
                                 prompts=["long"], max_in_flight=args.in_flight,
                                 generation={"max_new_tokens": args.tokens})
        cap = build_captioner(entry, [], prompts, QualitySection())
        url = server.base_url + "/chat/completions"

        def body(blob: bytes) -> dict:
            image = {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(blob).decode()}}
            return {"model": str(model_dir), "messages": chat_messages(prompts["long"], image),
                    "max_tokens": args.tokens, "temperature": 0.0, "stream": False}

        def plain() -> list[str]:
            with httpx.Client(timeout=120) as client, ThreadPoolExecutor(args.in_flight) as pool:
                def one(blob):
                    r = client.post(url, json=body(blob))
                    r.raise_for_status()
                    return r.json()["choices"][0]["message"]["content"]
                return list(pool.map(one, blobs))

        plain(), cap.caption_shard(meta.slice(0, args.in_flight), tar)  # warm-up
        best = {"plain": 0.0, "backend": 0.0}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            plain()
            best["plain"] = max(best["plain"], len(blobs) / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            rows = cap.caption_shard(meta, tar)
            best["backend"] = max(best["backend"], len(blobs) / (time.perf_counter() - t0))
        ok = sum(s == "ok" for s in rows["status"].to_pylist())
    finally:
        server.stop()
    return {"bench": "openai", "requests": len(blobs), "in_flight": args.in_flight, "max_new_tokens": args.tokens,
            "plain_requests_per_s": round(best["plain"], 2), "backend_requests_per_s": round(best["backend"], 2),
            "ratio": round(best["backend"] / best["plain"], 3), "backend_ok": f"{ok}/{len(blobs)}"}


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped: still run the finally that stops the server
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--size", type=int, default=256, help="JPEG side in pixels")
    ap.add_argument("--batch", type=int, default=8, help="hf: images per generate call")
    ap.add_argument("--tokens", type=int, default=32, help="max new tokens (greedy)")
    ap.add_argument("--hidden", type=int, default=256, help="tiny VLM text width")
    ap.add_argument("--layers", type=int, default=4, help="tiny VLM text layers")
    ap.add_argument("--in-flight", type=int, default=4, help="openai: requests in flight")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (hf)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", choices=["hf", "openai"], default=None)
    ap.add_argument("--device", default="cpu", help="hf: torch device of both sides")
    args, _ = ap.parse_known_args()

    from pipeline.tiny_vlm import build_tiny_vlm

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_vlm(Path(tmp) / "model", hidden=args.hidden, layers=args.layers)
        meta, tar, blobs = make_shard(Path(tmp), args.images, args.size)
        if args.only in (None, "hf"):
            print(json.dumps(bench_hf(model_dir, meta, tar, blobs, args)), flush=True)
        if args.only in (None, "openai"):
            print(json.dumps(bench_openai(model_dir, meta, tar, blobs, args)), flush=True)


if __name__ == "__main__":
    main()
