"""Forward + backward time per training step: caft-b16 vs siglip-b16 (and any other config), with the
superpixel step timed on its own. On CUDA: bf16 autocast, batch 128 by default; on CPU: fp32, small batch.

Both models see the same random images and tokens (N sub-captions per image for CAFT/FLAIR-style rows,
one 77-token caption for flat-text rows). Prints one JSON line per model.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from model.caft import build
from model.superpixels import superpixels


def step_time(name: str, batch: int, n_sub: int, k_chunks: int, device: str, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    model = build(name).to(device).train()
    flat = model.cfg.whole_depth == 0 and not model.cfg.part_loss
    n = 1 if flat else n_sub
    images = torch.randn(batch, 3, 224, 224, device=device)
    tokens = torch.randint(1, 49406, (batch, n, 77), device=device)
    tokens[..., -1] = 49407
    valid = torch.ones(batch, n, dtype=torch.bool, device=device)
    whole = torch.arange(n, device=device).unsqueeze(0).expand(batch, -1) < (1 if flat else k_chunks)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    from model.info import count_flops

    def fwd_bwd():
        with amp:
            loss = model(images, tokens, valid, whole)["loss"]
        loss.backward()

    step_flops = count_flops(fwd_bwd)  # forward + backward, matmuls/convs/attention
    opt.zero_grad(set_to_none=True)
    times = []
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        with amp:
            loss = model(images, tokens, valid, whole)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    raw = (images * 0.27 + 0.45).clamp(0, 1)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        superpixels(raw, model.cfg.backend)
    sync()
    sp = (time.perf_counter() - t0) / steps
    mem = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"model": name, "device": device, "batch": batch, "texts_per_image": n, "step_s": min(times),
            "step_s_mean": sum(times) / len(times), "samples_per_s": batch / min(times),
            "superpixels_s": sp, "max_mem_gib": mem, "step_tflop": step_flops / 1e12,
            "achieved_tflops": step_flops / min(times) / 1e12}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="caft-b16,siglip-b16")
    ap.add_argument("--batch", type=int, default=None, help="default 128 on CUDA, 4 on CPU")
    ap.add_argument("--n-sub", type=int, default=8)
    ap.add_argument("--k-chunks", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="MFU denominator (H100 SXM bf16 dense: 989)")
    args, _ = ap.parse_known_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch = args.batch or (128 if device == "cuda" else 4)
    rows = [step_time(m, batch, args.n_sub, args.k_chunks, device, args.steps, args.warmup)
            for m in args.models.split(",")]
    for r in rows:
        if device == "cuda":
            r["mfu"] = r["achieved_tflops"] / args.peak_tflops
        print(json.dumps(r))
    base = rows[-1]["step_s"]
    print(json.dumps({"bench": "model", "machine": platform.node(), "torch": torch.__version__,
                      "ratio_step_time": {r["model"]: round(r["step_s"] / base, 3) for r in rows}}))


if __name__ == "__main__":
    main()
