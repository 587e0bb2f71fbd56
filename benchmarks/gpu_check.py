"""The prepared GPU check: every number only a GPU can give, in one command of under 8 minutes.

    python benchmarks/gpu_check.py OUT_DIR [--smoke] [--budget-s 450] [--parts models,superpixels,...]

Parts, in order (each inside its own time box; one that fails is recorded with its error and the rest go on):
  models       caft-b16 / flair-b16 / siglip-b16 training steps (bf16 autocast, AdamW) at batch 128, then the
               largest batch that fits: samples/s, peak memory, MFU (FlopCounter FLOPs / the GPU's dense bf16
               peak); the torch profiler's top 10 kernels of caft-b16 when it misses 0.8x siglip or 40% MFU
  superpixels  torch SLIC and SFCN at 224 px: images/s on the GPU vs the CPU of the same machine
  regions      the regions stage (YOLO predict + open_clip ViT-B-16 crop scoring) vs the raw libraries, on the GPU
  captioner    the hf backend (tiny VLM built offline) vs a plain generate loop, batched, on the GPU: tokens/s
  ablation     the synthetic-world ablation (paper rows) sized to the time that is left
vLLM cannot be installed on the GPU machine (no network, no wheel for its torch), so it has no part here.

Writes OUT_DIR/gpu_check.json after every part (a kill keeps what finished) and OUT_DIR/summary.txt at the end.
`--smoke` runs every part tiny on the CPU (the test suite does, so the script cannot rot).
On the GPU machine (Python 3.12, its own torch, no network), with the wheels of benchmarks/gpu_wheels.sh in .whl/:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense bf16, datasheet
PARTS = ("models", "superpixels", "regions", "captioner", "ablation")
# share of the whole budget each part may use (the ablation takes what is left)
SHARE = {"models": 0.35, "superpixels": 0.05, "regions": 0.12, "captioner": 0.12}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_tflops(device: str) -> float | None:
    import torch

    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def part_models(a, device: str, deadline: float) -> dict:
    import torch

    from model_bench import step_time

    names = ["caft-tiny", "flair-tiny", "siglip-tiny"] if a.smoke else ["caft-b16", "flair-b16", "siglip-b16"]
    batch = 2 if a.smoke else 128
    peak = _peak_tflops(device)
    out = {"batch": batch, "peak_tflops": peak, "rows": []}
    for name in names:
        r = step_time(name, batch, 8, 4, device, steps=1 if a.smoke else 5, warmup=0 if a.smoke else 1)
        r["mfu"] = r["achieved_tflops"] / peak if peak else None
        out["rows"].append(r)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    by = {r["model"]: r for r in out["rows"]}
    caft, siglip = by[names[0]], by[names[2]]
    out["caft_vs_siglip_samples"] = round(caft["samples_per_s"] / siglip["samples_per_s"], 3)
    out["targets"] = {"caft >= 0.8x siglip samples/s": out["caft_vs_siglip_samples"] >= 0.8,
                      "caft MFU >= 40%": caft["mfu"] is not None and caft["mfu"] >= 0.4}
    if not all(out["targets"].values()):
        out["caft_top_kernels"] = top_kernels(names[0], batch, device)
    out["largest_batch"] = largest_batch(names, batch, device, deadline, a.smoke)
    return out


def top_kernels(name: str, batch: int, device: str, k: int = 10) -> list[dict]:
    """The torch profiler's top k ops by device time (CPU time on the CPU) over one training step."""
    from torch.profiler import ProfilerActivity, profile

    from model_bench import step_time

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        step_time(name, batch, 8, 4, device, steps=1, warmup=0)
    key = "device_time_total" if device.startswith("cuda") else "cpu_time_total"
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0) or 0, reverse=True)
    total = sum((getattr(e, key, 0) or 0) for e in rows if not e.key.startswith("ProfilerStep")) or 1
    return [{"op": e.key[:80], "ms": round((getattr(e, key, 0) or 0) / 1e3, 2),
             "share": round((getattr(e, key, 0) or 0) / total, 3), "calls": e.count} for e in rows[:k]]


def largest_batch(names: list[str], start: int, device: str, deadline: float, smoke: bool) -> dict:
    """Doubling batches from 2x start until out of memory or out of time: the last batch that ran, per model."""
    import torch

    from model_bench import step_time

    out = {}
    for name in names:
        b, best = start * 2, None
        while time.time() < deadline and b <= (start * 2 if smoke else 4096):
            try:
                r = step_time(name, b, 8, 4, device, steps=1, warmup=0 if smoke else 1)
                best = {"batch": b, "samples_per_s": round(r["samples_per_s"], 1), "max_mem_gib": r["max_mem_gib"]}
            except torch.OutOfMemoryError:
                break
            finally:
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
            b *= 2
        out[name] = best
    return out


def part_superpixels(a, device: str, deadline: float) -> dict:
    import torch

    from model.sfcn import SFCN
    from model.superpixels import superpixels

    def rate(dev: str, batch: int, backend: str, reps: int) -> float:
        torch.manual_seed(0)
        images = torch.rand(batch, 3, 224, 224, device=dev)
        net = SFCN().to(dev).eval() if backend == "sfcn" else None
        with torch.inference_mode():
            superpixels(images, backend, net=net)  # warm-up
            _sync(dev)
            t0 = time.perf_counter()
            for _ in range(reps):
                superpixels(images, backend, net=net)
            _sync(dev)
        return batch * reps / (time.perf_counter() - t0)

    gpu_batch, cpu_batch = (2, 2) if a.smoke else (128, 16)
    out = {"size": 224, "device_batch": gpu_batch, "cpu_batch": cpu_batch, "cpu_threads": torch.get_num_threads()}
    for backend in ("slic", "sfcn"):
        dev = rate(device, gpu_batch, backend, 2 if a.smoke else 10)
        cpu = rate("cpu", cpu_batch, backend, 1 if a.smoke else 2)
        out[backend] = {"device_images_per_s": round(dev, 1), "cpu_images_per_s": round(cpu, 1),
                        "speedup": round(dev / cpu, 2)}
    return out


def part_regions(a, device: str, deadline: float) -> dict:
    from regions_bench import bench

    if a.smoke:
        return bench(images=4, size=128, imgsz=128, clip_model="ViT-S-32", clip_size=64, repeats=1, device=device,
                     log=lambda s: None)
    return bench(images=256, size=384, imgsz=640, clip_model="ViT-B-16", clip_size=224, threads=4, repeats=3,
                 device=device, log=lambda s: print("  regions", s, flush=True))


def part_captioner(a, device: str, deadline: float) -> dict:
    from caption_bench import bench_hf, make_shard

    from pipeline.tiny_vlm import build_tiny_vlm

    args = argparse.Namespace(batch=2 if a.smoke else 32, tokens=8 if a.smoke else 64, repeats=1 if a.smoke else 3,
                              threads=2, device=device)
    n = 4 if a.smoke else 256
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_vlm(Path(tmp) / "model", hidden=256, layers=2 if a.smoke else 4)
        meta, tar, blobs = make_shard(Path(tmp), n, 128 if a.smoke else 384)
        r = bench_hf(model_dir, meta, tar, blobs, args)
    r["vllm"] = "not measured: vLLM cannot be installed on the GPU machine (no network, no wheel for its torch)"
    return r


def part_ablation(a, device: str, deadline: float) -> dict:
    """The paper rows on the synthetic world, sized to the seconds left (benchmarks/gpu_ablation.py)."""
    import subprocess

    left = deadline - time.time()
    if left < 60 and not a.smoke:
        return {"skipped": f"only {left:.0f} s left"}
    script = ROOT / "benchmarks" / "gpu_ablation.py"
    if not script.exists():
        return {"skipped": "benchmarks/gpu_ablation.py is not there yet"}
    with tempfile.TemporaryDirectory() as tmp:
        res_path = Path(tmp) / "ablation.json"
        cmd = [sys.executable, str(script), "--out", str(res_path), "--budget-s", str(int(left - 20)),
               "--device", device] + (["--smoke"] if a.smoke else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(60, left), cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr[-2000:]}")
        return json.loads(res_path.read_text())


def summary(res: dict) -> str:
    lines = [f"longcap GPU check {res['date']} on {res['device_name']} (torch {res['torch']}), "
             f"{'smoke' if res['smoke'] else 'full'}, {res['seconds']:.0f} s"]
    m = res["parts"].get("models") or {}
    for r in m.get("rows", []):
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
        mem = f"{r['max_mem_gib']:.1f} GiB" if r.get("max_mem_gib") is not None else "n/a"
        lines.append(f"  {r['model']:<12} batch {r['batch']}: {r['samples_per_s']:.1f} samples/s, MFU {mfu}, "
                     f"peak {mem}")
    if m.get("targets"):
        lines.append(f"  caft/siglip samples/s {m['caft_vs_siglip_samples']}; targets {m['targets']}")
    for k, v in (m.get("largest_batch") or {}).items():
        lines.append(f"  largest batch {k}: {v}")
    sp = res["parts"].get("superpixels") or {}
    for b in ("slic", "sfcn"):
        if b in sp:
            lines.append(f"  {b}: {sp[b]['device_images_per_s']} img/s on {res['device']} vs "
                         f"{sp[b]['cpu_images_per_s']} on CPU ({sp[b]['speedup']}x)")
    rg = res["parts"].get("regions") or {}
    if "ratio" in rg:
        lines.append(f"  regions: stage {rg['stage_images_per_s']} img/s, raw {rg['raw_images_per_s']} "
                     f"(ratio {rg['ratio']})")
    cp = res["parts"].get("captioner") or {}
    if "ratio" in cp:
        lines.append(f"  captioner hf: {cp['backend_tokens_per_s']} tok/s vs plain {cp['plain_tokens_per_s']} "
                     f"(ratio {cp['ratio']})")
    ab = res["parts"].get("ablation") or {}
    if ab.get("table"):
        lines.append("  ablation:\n" + ab["table"])
    elif ab:
        lines.append(f"  ablation: {ab.get('skipped', 'see JSON')}")
    for k, e in res["errors"].items():
        lines.append(f"  ERROR {k}: {e.splitlines()[-1] if e else ''}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="folder for gpu_check.json and summary.txt")
    ap.add_argument("--smoke", action="store_true", help="every part tiny, on the CPU")
    ap.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget of the whole check")
    ap.add_argument("--parts", default=",".join(PARTS))
    a = ap.parse_args(argv)

    import torch

    t_start = time.time()
    device = "cpu" if a.smoke or not torch.cuda.is_available() else "cuda"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host": platform.node(), "device": device,
           "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
           "smoke": a.smoke, "budget_s": a.budget_s, "parts": {}, "seconds_per_part": {}, "errors": {}}
    fns = {"models": part_models, "superpixels": part_superpixels, "regions": part_regions,
           "captioner": part_captioner, "ablation": part_ablation}
    end = t_start + a.budget_s
    for name in a.parts.split(","):
        t0 = time.time()
        deadline = end if name == "ablation" else min(end, t0 + SHARE.get(name, 0.1) * a.budget_s)
        print(f"== {name} (box {deadline - t0:.0f} s)", flush=True)
        try:
            res["parts"][name] = fns[name](a, device, deadline)
        except Exception:  # noqa: BLE001 - record and go on: one part must not cost the others
            res["errors"][name] = traceback.format_exc(limit=6)
            print(res["errors"][name], flush=True)
        res["seconds_per_part"][name] = round(time.time() - t0, 1)
        res["seconds"] = time.time() - t_start
        (out / "gpu_check.json").write_text(json.dumps(res, indent=1, default=str))
    text = summary(res)
    (out / "summary.txt").write_text(text)
    print(text, flush=True)
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
