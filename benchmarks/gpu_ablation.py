"""The CAFT ablation (CAFT §4.4, Table 3) in one command, sized for one GPU (H100/H200) in under 8 minutes.

Rows: FLAIR, + visual hierarchy, + textual hierarchy, + hierarchical loss (= CAFT), - part-level alignment
(model/caft.py rows), and SigLIP (not in the paper). Every row trains with the same data, steps, batch,
schedule and seeds on a fresh synthetic world (benchmarks/ablation_data.py: every fifth family held out),
and is evaluated on the held-out split: whole-level R@1 both ways, the text-conditioned (FLAIR-style) and
CAFT++ scores, synthetic grounding mIoU. The table gives mean ± std over seeds, the values per seed, each
of the paper's claims with a paired per-seed comparison (workflows/evalcmd.py claims), and how much the
training loss still moved over the last 20% of the steps (a check that the losses flattened).

    python benchmarks/gpu_ablation.py                    # full scale: 340 families (204 held-out images), 3 seeds
    python benchmarks/gpu_ablation.py --smoke            # CPU plumbing check (tests/test_ablation_bench.py)

A run whose result.json exists for the same job (row, seed, data, settings) is reused, so an interrupted call
resumes where it stopped.

Runs go in parallel child processes (--jobs); on a GPU they share it. Results: WORK/ablation.json and the
markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.ablation_data import add_data_args, header, prepare, train_one  # noqa: E402

# full scale: >= 200 held-out images (one image < 0.5% of R@1), 3 seeds; steps: see BENCHMARKS.md
FULL = dict(families=340, size=128, image_size=112, steps=1000, batch=64, seeds=[0, 1, 2], jobs=9, threads=1)
PLANNED_S = 450  # what FULL should take on one H200 (18 runs, 9 at a time); to be measured by the GPU check
SMOKE = dict(families=10, size=64, image_size=56, steps=2, batch=4, seeds=[0], jobs=2, threads=1)


def _one(job: dict) -> dict:
    import logging

    logging.basicConfig(level=logging.WARNING)
    args = argparse.Namespace(**job["args"])
    r = train_one(job["row"], job["seed"], job["urls"], job["truth"], args, Path(job["out"]), **job["train"])
    r["loss_flat"] = loss_drift(Path(job["out"]) / "metrics.jsonl")
    return r


def _child(job: dict) -> dict:
    out = Path(job["out"])
    done = out / "result.json"
    if done.exists() and (out / "job.json").exists() and json.loads((out / "job.json").read_text()) == job:
        return json.loads(done.read_text())  # finished by an earlier, interrupted call with the same job: reused
    done.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "job.json").write_text(json.dumps(job))
    with open(out / "job.log", "w") as log:
        rc = subprocess.run([sys.executable, __file__, "--job", str(out / "job.json")], stdout=log,
                            stderr=subprocess.STDOUT).returncode
    if rc:
        raise RuntimeError(f"{job['row']} seed {job['seed']} failed (exit {rc}); see {out / 'job.log'}")
    return json.loads((out / "result.json").read_text())


def loss_drift(metrics: Path) -> float | None:
    """Relative change of the mean logged loss from the 60-80% to the 80-100% stretch of training (0: flat)."""
    if not metrics.exists():
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    loss = {r["step"]: r["loss"] for r in rows if "loss" in r}
    steps = sorted(loss)
    if len(steps) < 5:
        return None
    end = steps[-1]
    a = [loss[s] for s in steps if 0.6 * end < s <= 0.8 * end]
    b = [loss[s] for s in steps if s > 0.8 * end]
    if not a or not b:
        return None
    return (statistics.fmean(b) - statistics.fmean(a)) / abs(statistics.fmean(a))


def main(argv: list[str] | None = None) -> int:
    from model.caft import ablation_names
    from workflows.evalcmd import _row_summary, claims, format_ablation

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_args(p)
    p.set_defaults(work="runs/gpu-ablation", **{k: v for k, v in FULL.items() if k != "jobs"})
    p.add_argument("--jobs", type=int, default=FULL["jobs"], help="runs in parallel processes")
    p.add_argument("--model-size", default="tiny", choices=["tiny", "b16"])
    p.add_argument("--rows", nargs="+", help="config names (default: the Table 3 rows, then siglip)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--n-sub", type=int, default=4)
    p.add_argument("--k-chunks", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="tiny world, 2 steps, one seed: the plumbing only")
    p.add_argument("--out", help="default: WORK/ablation.json")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="cpu: hide the GPU from the runs (auto/cuda: train and evaluate on it when torch sees one)")
    p.add_argument("--budget-s", type=float, help="seconds the whole ablation may take: the step count is scaled "
                                                  f"by budget / {PLANNED_S} (the full scale is planned for "
                                                  f"{PLANNED_S} s on one H200; not measured yet)")
    p.add_argument("--job", help=argparse.SUPPRESS)  # internal: run one job file, write its result.json
    args = p.parse_args(argv)
    if args.job:
        job = json.loads(Path(args.job).read_text())
        Path(job["out"], "result.json").write_text(json.dumps(_one(job)))
        return 0
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
    if args.device == "cpu":  # the runs' train() picks the GPU whenever torch sees one
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if args.budget_s and not args.smoke:
        args.steps = max(50, min(args.steps, int(args.steps * args.budget_s / PLANNED_S)))
    rows = args.rows or ablation_names(args.model_size)
    t0 = time.time()
    urls, truth = prepare(args)
    data_s = time.time() - t0
    jobs = []
    for row in rows:
        flat = row.startswith("siglip")  # flat text: one 77-token caption per image, as SigLIP trains
        train = dict(lr=args.lr, warmup=max(1, args.steps // 10), weight_decay=args.weight_decay,
                     n_sub=1 if flat else args.n_sub, k_chunks=1 if flat else args.k_chunks)
        for seed in args.seeds:
            out = Path(args.work) / f"{row}-s{seed}-{args.steps}x{args.batch}-{args.image_size}px"
            jobs.append({"row": row, "seed": seed, "urls": urls, "truth": truth, "out": str(out), "train": train,
                         "args": {k: v for k, v in vars(args).items() if k in ("steps", "batch", "threads", "image_size")}})
    with ThreadPoolExecutor(args.jobs) as pool:  # one child process per run (its DataLoader workers fork from it)
        runs = list(pool.map(_child, jobs))
    results = []
    for row in rows:
        mine = [r for r in runs if r["model"] == row]
        summary = _row_summary(row, [{"seed": r["seed"], "eval": r["eval"], "train_seconds": r["seconds"],
                                      "last": r["last"], "loss_flat": r["loss_flat"]} for r in mine])
        summary["loss_drift"] = [r["loss_flat"] for r in mine]
        results.append(summary)
    t = {"run": f"synthetic world {args.families}x3 ({args.work})", "steps": args.steps, "seeds": args.seeds,
         "size": args.model_size, "rows": results, "claims": claims(results), "header": header(args, urls),
         "data_seconds": round(data_s, 1), "wall_seconds": round(time.time() - t0, 1)}
    t["table"] = format_ablation(t)
    out = Path(args.out or Path(args.work) / "ablation.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(t, indent=2))
    print(t["header"])
    print(t["table"])
    print("loss drift over the last 20% of steps (per seed): " + "; ".join(
        f"{r['row']} " + " / ".join("—" if d is None else f"{d:+.3f}" for d in r["loss_drift"]) for r in results))
    print(f"wall {t['wall_seconds']} s (data {t['data_seconds']} s); wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
