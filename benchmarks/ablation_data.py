"""Data and runs shared by the GOAL and grouping ablations (benchmarks/goal_ablation.py, grouping_ablation.py).

Data: a fresh synthetic world written as export-format shards whose `regions` are the exact sentence boxes
(`--families N`), or a finished run's export shards (`--run DIR`) with the pairs its pipeline found
(`--pairs export`) or with exact pairs from its synth/truth.parquet (`--pairs truth`). Every fifth family is
held out (split: test): models train on split train and are evaluated on split test.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
import webdataset as wds


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--work", default="runs/ablation", help="folder for data and checkpoints")
    p.add_argument("--families", type=int, default=100, help="a fresh world: families (x3 variants)")
    p.add_argument("--size", type=int, default=128, help="a fresh world: rendered image size")
    p.add_argument("--run", help="use this run's export/ (and synth/truth.parquet) instead of a fresh world")
    p.add_argument("--pairs", choices=["export", "truth"], default="truth",
                   help="with --run: the run's own pairs, or exact pairs from its truth")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--image-size", type=int, default=64)


def prepare(args) -> tuple[list[str], str]:
    """Export-format shards and the truth table."""
    from model.localdata import truth_regions
    from pipeline.synthetic import write_world

    work = Path(args.work)
    if args.run:
        run = Path(args.run)
        truth = str(run / "synth" / "truth.parquet")
        urls = sorted(str(p) for p in (run / "export").glob("*.tar"))
        if args.pairs == "export":
            return urls, truth
        rows = {r["id"]: r for r in pq.read_table(truth).to_pylist()}
        out = work / "run-truth-pairs"
        out.mkdir(parents=True, exist_ok=True)
        new = []
        for u in urls:
            dst = out / Path(u).name
            with wds.TarWriter(str(dst)) as w:
                for s in wds.WebDataset(u, shardshuffle=False, empty_check=False):
                    doc = json.loads(s["json"])
                    row = rows[doc["extra"]["id"]]
                    cap = doc["captions"][0]
                    if cap["sentences"] != [x["text"] for x in row["sentences"]]:
                        raise ValueError(f"{s['__key__']}: the run's sentences differ from the truth's")
                    doc["regions"] = truth_regions(row, cap["captioner"], cap["prompt_id"])
                    w.write({"__key__": s["__key__"], "jpg": s["jpg"], "json": json.dumps(doc).encode()})
            new.append(str(dst))
        return new, truth
    world = work / f"world-{args.families}x3-{args.size}"
    if not (world / "truth.parquet").exists():
        write_world(world, families_n=args.families, variants=3, image_size=args.size, seed=0, broken=False)
    rows = pq.read_table(world / "truth.parquet").to_pylist()
    shards = world / "shards"
    shards.mkdir(exist_ok=True)
    urls = []
    for s in range(0, len(rows), 50):
        path = shards / f"{s // 50:05d}-000.tar"
        urls.append(str(path))
        if path.exists():
            continue
        with wds.TarWriter(str(path) + ".tmp") as w:
            for i, r in enumerate(rows[s:s + 50]):
                key = f"{s // 50:05d}{i:04d}"
                doc = {"key": key, "captions": [{"captioner": "source", "prompt_id": "caption", "text": r["caption"],
                                                 "sentences": [x["text"] for x in r["sentences"]]}],
                       "extra": {"id": r["id"], "split": r["split"], "family": r["family"]},
                       "regions": truth_regions(r)}
                w.write({"__key__": key, "jpg": (world / "images" / f"{r['id']}.jpg").read_bytes(),
                         "json": json.dumps(doc).encode()})
        Path(str(path) + ".tmp").rename(path)
    return urls, str(world / "truth.parquet")


def train_one(model: str, seed: int, urls: list[str], truth: str, args, out: Path, **train_kw) -> dict:
    """Train `model` for args.steps steps from `seed`; its final evaluation on the held-out split."""
    from model.train import EvalSpec, train
    from pipeline.config import TrainSection

    cfg = TrainSection(model=model, steps=args.steps, batch_size=args.batch, seed=seed, image_size=args.image_size,
                       workers=1, log_every=50, ckpt_every=args.steps, eval_every=0, tensorboard=False,
                       threads=args.threads, train_where={"split": "train"}, eval_where={"split": "test"},
                       sampling="resampled", epoch_samples=50 * args.batch, **train_kw)  # as recorded
    spec = EvalSpec(urls, where={"split": "test"}, truth=truth, image_size=args.image_size,
                    k_chunks=cfg.k_chunks)
    timing = Path(out) / "ablation_seconds.json"  # a finished run is only re-evaluated (the trainer resumes at the end)
    t0 = time.time()
    res = train(cfg, urls, out, spec)
    if not timing.exists():
        timing.write_text(json.dumps({"seconds": round(time.time() - t0, 1)}))
    return {"model": model, "seed": seed, "seconds": json.loads(timing.read_text())["seconds"], "eval": res["eval"],
            "last": res.get("last", {})}


def mean_sd(values: list[float]) -> str:
    m = statistics.mean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:.3f} ± {sd:.3f}"


def header(args, urls) -> str:
    return (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()}, {platform.processor() or platform.machine()}, "
            f"torch {torch.__version__}, {len(urls)} shards, steps {args.steps}, batch {args.batch}, "
            f"seeds {args.seeds}, image {args.image_size} px, threads {args.threads}")
