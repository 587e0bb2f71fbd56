"""Download-stage throughput: longcap (Ray runner, per-shard img2dataset + checks) vs img2dataset called directly.

Both fetch the same URL list from the same loopback HTTP server (a separate
process), with the same processes/threads, image size, shard size and hashing.
Prints one JSON line per measurement and the ratio longcap / img2dataset.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from PIL import Image  # noqa: E402


def make_images(folder: Path, n: int, size: int) -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = np.roll(base, i, axis=(0, 1)).repeat(8, 0).repeat(8, 1)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=90)
        (folder / f"{i:06d}.jpg").write_bytes(buf.getvalue())


def _serve(folder: str, q) -> None:
    from workflows.serve import serve_folder

    with serve_folder(folder) as base:
        q.put(base)
        while True:
            time.sleep(3600)


def run_img2dataset(url_list: str, out: str, procs: int, threads: int, shard: int, image_size: int) -> float:
    from img2dataset import download

    t0 = time.time()
    download(url_list=url_list, output_folder=out, processes_count=procs, thread_count=threads,
             number_sample_per_shard=shard, output_format="webdataset", input_format="parquet", url_col="url",
             image_size=image_size, resize_mode="keep_ratio", resize_only_if_bigger=True, encode_format="jpg",
             timeout=10, compute_hash="sha256", extract_exif=True, distributor="multiprocessing",
             enable_wandb=False)
    return time.time() - t0


def run_longcap(url_list: str, run_dir: str, procs: int, threads: int, shard: int, image_size: int) -> float:
    from pipeline.config import load_config
    from workflows.rundir import RunDir
    from workflows.runner import Runner, ensure_ray

    cfg = load_config(data={
        "run": {"dir": run_dir, "shard_size": shard, "stages": ["download"]},
        "ray": {"num_cpus": procs, "download_tasks": procs},
        "input": {"urls": [url_list]},
        "download": {"image_size": image_size, "threads": threads, "timeout": 10, "allow_networks": ["127.0.0.1/32"]},
    })
    ensure_ray(cfg)  # a cluster is up before a job starts; its start-up is timed separately below
    t0 = time.time()
    result = Runner(cfg, RunDir(run_dir), progress=False).execute()
    assert result.ok, result.failed
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--shard", type=int, default=500)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="longcap-bench-"))
    make_images(work / "www", args.images, 384)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    server = ctx.Process(target=_serve, args=(str(work / "www"), q), daemon=True)
    server.start()
    base = q.get(timeout=30)
    urls = [f"{base}/{i:06d}.jpg" for i in range(args.images)]
    pq.write_table(pa.table({"url": urls}), work / "urls.parquet")

    t0 = time.time()
    import ray

    ray.init(num_cpus=args.procs, include_dashboard=False, log_to_driver=False)
    ray_start = time.time() - t0
    results = {"img2dataset": [], "longcap": []}
    try:
        for r in range(args.repeats):
            for name, fn in (("img2dataset", run_img2dataset), ("longcap", run_longcap)):
                out = str(work / f"{name}-{r}")
                secs = fn(str(work / "urls.parquet"), out, args.procs, args.threads, args.shard, args.size)
                n_ok = _count_ok(out, name)
                results[name].append(args.images / secs)
                print(json.dumps({"tool": name, "repeat": r, "seconds": round(secs, 2), "ok": n_ok,
                                  "images_per_s": round(args.images / secs, 1)}), flush=True)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        ray.shutdown()
        server.terminate()
        shutil.rmtree(work, ignore_errors=True)
    best = {k: max(v) for k, v in results.items()}
    print(json.dumps({"summary": True, "images": args.images, "shard": args.shard, "procs": args.procs,
                      "threads": args.threads, "ray_start_s": round(ray_start, 2),
                      "img2dataset_images_per_s": round(best["img2dataset"], 1),
                      "longcap_images_per_s": round(best["longcap"], 1),
                      "ratio": round(best["longcap"] / best["img2dataset"], 3)}))


def _count_ok(out: str, name: str) -> int:
    folder = Path(out) / "images" if name == "longcap" else Path(out)
    return sum(pq.read_table(f, columns=["status"])["status"].to_pylist().count("success")
               for f in folder.glob("*.parquet"))


if __name__ == "__main__":
    main()
