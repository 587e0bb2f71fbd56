"""The grounded-text-units claim on synthetic data: grouping trained with contrastive + reconstruction finds
phrase-like units better than with either loss alone (tIoU and F1 at IoU >= 0.5 against the synthetic world's
noun phrases, on held-out sentences).

Rows: grouping-tiny (both losses), grouping-tiny-contrastive, grouping-tiny-recon, at equal steps, batch,
learning rate and seeds; reference rows: the untrained model, all words in one group, one word per group.
The image side: the GroupViT-style encoder trained jointly (`--image groupvit`, 64 px), or a trained CAFT's
segments, frozen (`--image caft --caft-checkpoint runs/demo/models/caft-tiny --image-size 112`: the
grouping-tiny-caft config with the same loss weights per row). Prints a markdown table (mean ± sd over seeds)
and one JSON line per run.

    python benchmarks/grouping_ablation.py --families 100 --steps 300 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.ablation_data import add_data_args, header, mean_sd, prepare, train_one  # noqa: E402

LOSSES = (("", "contrastive + reconstruction", {}), ("-contrastive", "contrastive only", {"recon_weight": 0.0}),
          ("-recon", "reconstruction only", {"contrastive_weight": 0.0}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_args(p)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n-sub", type=int, default=2, help="sentences per image in a batch")
    p.add_argument("--image", choices=["groupvit", "caft"], default="groupvit")
    p.add_argument("--caft-checkpoint", help="--image caft: a trained CAFT (training folder or model file)")
    p.set_defaults(batch=16)
    args = p.parse_args()
    if args.image == "caft" and not args.caft_checkpoint:
        p.error("--image caft needs --caft-checkpoint")
    base = "grouping-tiny" if args.image == "groupvit" else "grouping-tiny-caft"
    extra = {} if args.image == "groupvit" else {"caft_checkpoint": str(Path(args.caft_checkpoint).resolve())}
    rows = [(f"{base}{suffix}", label, {**extra, **changes}) for suffix, label, changes in LOSSES]
    urls, truth = prepare(args)

    import torch

    from model.grouping import synthetic_phrases
    from model.registry import build

    items = synthetic_phrases(truth, {"split": "test"})
    runs = []
    for seed in args.seeds:
        torch.manual_seed(seed)
        untrained = build(base, **extra).phrase_eval(items)  # the trained rows' initial weights (the trainer seeds alike)
        runs.append({"model": "untrained", "seed": seed, "eval": {"phrases": untrained}})
        for name, _, changes in rows:
            out = Path(args.work) / f"grouping-{name}-s{seed}-{args.steps}"
            r = train_one(base, seed, urls, truth, args, out, lr=args.lr, warmup=max(1, args.steps // 10),
                          weight_decay=0.05, n_sub=args.n_sub, k_chunks=args.n_sub, model_changes=changes)
            r["model"] = name
            runs.append(r)
            print(json.dumps(r), flush=True)
    base = runs[0]["eval"]["phrases"]["baselines"]
    print(f"\n{header(args, urls)}; image side: {args.image}" + (f" ({args.caft_checkpoint}, frozen)" if extra else ""))
    print(f"held-out sentences: {base['one_group']['n_texts']}, phrases: {base['one_group']['n_phrases']}, "
          f"K = 4 groups per sentence\n")
    print("| model | losses | tIoU | F1 (IoU ≥ 0.5) | precision | recall | groups/sentence | R@1 i→t / t→i | s/run |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, label in (*[(n, lab) for n, lab, _ in rows], ("untrained", "none (random init)")):
        mine = [r for r in runs if r["model"] == name]
        ph = [r["eval"]["phrases"] for r in mine]
        cols = [mean_sd([x[k] for x in ph]) for k in ("tiou", "f1", "precision", "recall")]
        gps = mean_sd([x["n_groups"] / x["n_texts"] for x in ph])
        ret = [r["eval"].get("retrieval") for r in mine]
        r1 = (f"{mean_sd([x['groups']['i2t_r1'] for x in ret])} / {mean_sd([x['groups']['t2i_r1'] for x in ret])}"
              if all(ret) else "–")
        secs = f"{sum(r['seconds'] for r in mine) / len(mine):.0f}" if "seconds" in mine[0] else "–"
        print(f"| {name} | {label} | {' | '.join(cols)} | {gps} | {r1} | {secs} |")
    for key, label in (("one_group", "all words in one group"), ("word_per_group", "one word per group")):
        b = base[key]
        print(f"| {key} | {label} | {b['tiou']:.3f} | {b['f1']:.3f} | {b['precision']:.3f} | {b['recall']:.3f} | "
              f"{b['n_groups'] / b['n_texts']:.2f} | – | – |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
