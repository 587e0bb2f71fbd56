"""FAST-GOAL's claim on synthetic data: fine-tuning with local region-sentence pairs (local loss + TSL) beats
global-only fine-tuning at equal steps, on long-caption retrieval R@1.

Both rows are the same model (`goal-tiny`: a tiny random-init open_clip CLIP standing in for pretrained
weights, so "fine-tuning" here is training from scratch), the same long-text handling, data, steps, batch,
learning rate and seeds; `goal-tiny-global` drops the local and TSL losses (and so the pairs). Prints a
markdown table (mean ± sd over seeds) and one JSON line per run.

    python benchmarks/goal_ablation.py --families 100 --steps 300 --seeds 0 1
    python benchmarks/goal_ablation.py --run runs/demo --pairs export     # the pipeline's own pairs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.ablation_data import add_data_args, header, mean_sd, prepare, train_one  # noqa: E402

ROWS = (("goal-tiny", "global + local pairs (local loss + TSL)"), ("goal-tiny-global", "global only"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_args(p)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--long-text", choices=["stretch", "chunk"], default="stretch")
    p.add_argument("--rows", nargs="+", choices=[n for n, _ in ROWS], default=[n for n, _ in ROWS])
    args = p.parse_args()
    rows = [(n, label) for n, label in ROWS if n in args.rows]
    urls, truth = prepare(args)
    runs = []
    for seed in args.seeds:
        for name, _ in rows:
            out = Path(args.work) / f"goal-{name}-{args.long_text}-s{seed}-{args.steps}"
            r = train_one(name, seed, urls, truth, args, out, lr=args.lr, warmup=max(1, args.steps // 10),
                          weight_decay=0.05, model_changes={"long_text": args.long_text})
            runs.append(r)
            print(json.dumps(r), flush=True)
    print(f"\n{header(args, urls)}; pairs: {'exact (truth)' if args.pairs == 'truth' or not args.run else 'the run export'}"
          f"; long text: {args.long_text}")
    n = runs[0]["eval"]["retrieval"]["n"]
    print(f"held-out images: {n} (chance R@1 {1 / n:.3f})\n")
    print("| model | rows | image→text R@1 | text→image R@1 | image→text R@5 | text→image R@5 | s/run |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, label in rows:
        mine = [r for r in runs if r["model"] == name]
        g = [r["eval"]["retrieval"]["global"] for r in mine]
        cols = [mean_sd([x[k] for x in g]) for k in ("i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5")]
        secs = sum(r["seconds"] for r in mine) / len(mine)
        print(f"| {name} | {label} | {' | '.join(cols)} | {secs:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
