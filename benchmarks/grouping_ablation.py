"""The grounded-text-units claim on synthetic data: grouping trained with contrastive + reconstruction finds
phrase-like units better than with either loss alone (tIoU and F1 at IoU >= 0.5 against the synthetic world's
noun phrases, on held-out sentences).

Rows: grouping-tiny (both losses), grouping-tiny-contrastive, grouping-tiny-recon, at equal steps, batch,
learning rate and seeds; reference rows: the untrained model, all words in one group, one word per group.
The image side:
- `--image groupvit-frozen` (default, the paper's setup): a GroupViT (transformers' GroupViTModel at the
  GROUPVIT_TINY vision shape, 64 px, with a small text tower) is first pre-trained CLIP-style on the world's
  training split (`--groupvit-steps`, GroupViT's own contrastive loss, one sentence per image; saved with
  save_pretrained under --work and reused), then frozen under every row. K = 4, 6 + 3 text layers, a 1-head
  decoder, InfoNCE at tau 0.07 on pooled groups, lambda 1, 256-d; GradCache in chunks of --chunk texts.
- `--image groupvit`: our GroupViT-style encoder trained jointly (grouping-tiny-joint, the earlier setup).
- `--image caft --caft-checkpoint runs/demo/models/caft-tiny --image-size 112`: a trained CAFT's segments, frozen.
Prints a markdown table (mean ± sd over seeds), per-seed values and one JSON line per run.

    python benchmarks/grouping_ablation.py --families 100 --steps 300 --seeds 0 1 2 --batch 32
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # by file: pysbd installs a top-level `benchmarks` package

from ablation_data import add_data_args, header, mean_sd, prepare, train_one  # noqa: E402

LOSSES = (("", "contrastive + reconstruction", {}), ("-contrastive", "contrastive only", {"recon_weight": 0.0}),
          ("-recon", "reconstruction only", {"contrastive_weight": 0.0}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_args(p)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n-sub", type=int, default=2, help="sentences per image in a batch")
    p.add_argument("--image", choices=["groupvit-frozen", "groupvit", "caft"], default="groupvit-frozen")
    p.add_argument("--caft-checkpoint", help="--image caft: a trained CAFT (training folder or model file)")
    p.add_argument("--groupvit", help="--image groupvit-frozen: a GroupViT save_pretrained folder to use as is")
    p.add_argument("--groupvit-steps", type=int, default=400, help="pre-training steps of the frozen GroupViT")
    p.add_argument("--groupvit-batch", type=int, default=64)
    p.add_argument("--chunk", type=int, default=32, help="GradCache chunk (texts per chunk)")
    p.set_defaults(batch=16)
    args = p.parse_args()
    if args.image == "caft" and not args.caft_checkpoint:
        p.error("--image caft needs --caft-checkpoint")
    urls, truth = prepare(args)
    base = {"groupvit-frozen": "grouping-tiny", "groupvit": "grouping-tiny-joint", "caft": "grouping-tiny-caft"}[args.image]
    extra, pre = {}, None
    if args.image == "caft":
        extra = {"caft_checkpoint": str(Path(args.caft_checkpoint).resolve())}
    elif args.image == "groupvit-frozen":
        path = args.groupvit or str(Path(args.work) / f"groupvit-tiny-{args.families}x3-{args.groupvit_steps}")
        pre = pretrain_groupvit(urls, truth, args, Path(path)) if not args.groupvit else {"path": path}
        print(json.dumps({"groupvit": pre}), flush=True)
        extra = {"groupvit": str(Path(path).resolve()), "grad_cache_chunk": args.chunk}
    rows = [(f"{base}{suffix}", label, {**extra, **changes}) for suffix, label, changes in LOSSES]

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
    side = {"caft": f" ({args.caft_checkpoint}, frozen)", "groupvit": " (trained jointly)",
            "groupvit-frozen": f" ({extra.get('groupvit')}, frozen; GradCache chunk {args.chunk})"}[args.image]
    print(f"\n{header(args, urls)}; n_sub {args.n_sub}; lr {args.lr}; image side: {args.image}{side}")
    if pre and "r1" in pre:
        print(f"frozen GroupViT: pre-trained {pre['steps']} steps ({pre['seconds']} s), final loss {pre['loss']:.3f}, "
              f"held-out image->text R@1 {pre['r1']['i2t']:.3f} / text->image {pre['r1']['t2i']:.3f} "
              f"(chance {1 / pre['r1']['n']:.3f}, {pre['r1']['n']} images)")
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
    print("\nper seed (seed: F1 / tIoU):")
    for name, *_ in (*rows, ("untrained",)):
        vals = [f"{r['seed']}: {r['eval']['phrases']['f1']:.3f} / {r['eval']['phrases']['tiou']:.3f}"
                for r in runs if r["model"] == name]
        print(f"- {name}: " + ", ".join(vals))
    both, con, rec = (rows[0][0], rows[1][0], rows[2][0])
    print("\npaired per seed (both minus the other, F1):")
    for other in (con, rec, "untrained"):
        d = [next(r for r in runs if r["model"] == both and r["seed"] == s)["eval"]["phrases"]["f1"] -
             next(r for r in runs if r["model"] == other and r["seed"] == s)["eval"]["phrases"]["f1"] for s in args.seeds]
        print(f"- {both} - {other}: " + ", ".join(f"{x:+.3f}" for x in d) + f" (above in {sum(x > 0 for x in d)}/{len(d)})")
    return 0


def pretrain_groupvit(urls: list[str], truth: str, args, path: Path) -> dict:
    """A tiny GroupViT (GroupViTModel, GROUPVIT_TINY vision shape, a 2-layer text tower, 256-d projections)
    pre-trained with GroupViT's own image-text contrastive loss on the world's training split, one sentence
    per image; saved to `path` (reused when there). Returns its steps, final loss and held-out R@1."""
    import time

    import torch
    from transformers import GroupViTConfig, GroupViTModel

    from model.data import DataConfig, dataset
    from model.grouping import GROUPVIT_TINY, trim
    from model.localdata import EOT

    done = path / "pretrain.json"
    if done.exists():
        return json.loads(done.read_text())
    torch.manual_seed(0)
    text = {"vocab_size": 49408, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 77, "eos_token_id": EOT}
    model = GroupViTModel(GroupViTConfig(text_config=text, vision_config=GROUPVIT_TINY, projection_dim=256,
                                         projection_intermediate_dim=1024))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=args.groupvit_steps, pct_start=0.1)
    torch.set_num_threads(args.threads)

    def one_sentence(batch, pick=None):
        """One sentence per image: a random valid one (training) or the first (held-out R@1)."""
        if pick is None:
            tok = trim(batch["tokens"][:, 0])
        else:
            idx = torch.tensor([pick.choice(v.nonzero().flatten().tolist()) for v in batch["valid"]])
            tok = batch["tokens"][torch.arange(len(idx)), idx]
        tok = trim(tok)
        return tok, (tok != 0).long()

    import random

    pick = random.Random(0)

    t0, step, loss = time.time(), 0, float("nan")
    model.train()
    epoch = 0
    while step < args.groupvit_steps:
        data = DataConfig(image_size=64, n_sub=4, k_chunks=4, batch_size=args.groupvit_batch, train=True, seed=epoch,
                          epoch=epoch, where={"split": "train"}, mode="grouping", max_chunk=1)
        for batch in dataset(urls, data):
            if batch["image"].shape[0] < 2:
                continue
            tok, mask = one_sentence(batch, pick)
            out = model(input_ids=tok, attention_mask=mask, pixel_values=batch["image"], return_loss=True)
            out.loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step, loss = step + 1, out.loss.item()
            if step % 50 == 0:
                print(f"groupvit pre-training step {step}: loss {loss:.3f}", flush=True)
            if step >= args.groupvit_steps:
                break
        epoch += 1
    model.eval()
    imgs, txts = [], []
    with torch.no_grad():
        data = DataConfig(image_size=64, n_sub=1, k_chunks=1, batch_size=64, train=False, where={"split": "test"},
                          mode="grouping", max_chunk=1)
        for batch in dataset(urls, data):
            tok, mask = one_sentence(batch)
            imgs.append(model.get_image_features(pixel_values=batch["image"]).pooler_output)
            txts.append(model.get_text_features(input_ids=tok, attention_mask=mask).pooler_output)
    sim = torch.nn.functional.normalize(torch.cat(imgs), dim=-1) @ torch.nn.functional.normalize(torch.cat(txts), dim=-1).T
    n = sim.shape[0]
    r1 = {"n": n, "i2t": (sim.argmax(1) == torch.arange(n)).float().mean().item(),
          "t2i": (sim.argmax(0) == torch.arange(n)).float().mean().item()}
    model.save_pretrained(path)
    res = {"path": str(path), "steps": step, "loss": loss, "seconds": round(time.time() - t0, 1), "r1": r1}
    done.write_text(json.dumps(res))
    return res


if __name__ == "__main__":
    sys.exit(main())
