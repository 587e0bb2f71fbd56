"""Model commands of the `longcap` CLI: train, export-model, model-info, train-sfcn."""

from __future__ import annotations

import glob
import json
import time


def cmd_model_info(args) -> int:
    from model.info import caft_info, open_clip_info, table

    rows = [caft_info(name, args.n_sub, args.k_chunks) for name in args.names]
    if not args.no_reference:
        rows.append(open_clip_info(args.reference))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(table(rows))
        print(f"FLOPs per sample at 224 px: one image; text = one caption of the listed number of sub-captions "
              f"(77 tokens each; the whole-caption encoder included); pool = attention pooling of them.")
    return 0


def cmd_train_sfcn(args) -> int:
    from model.data import shard_images
    from model.sfcn import save_sfcn, train_sfcn

    urls = sorted(u for pattern in args.shards for u in (glob.glob(pattern) or [pattern]))
    images = list(shard_images(urls, args.max_images))
    if not images:
        raise FileNotFoundError(f"no decodable jpg images in {args.shards}")
    t0 = time.time()
    model, losses = train_sfcn(images, steps=args.steps, batch=args.batch, size=args.size, lr=args.lr,
                               compactness=args.compactness, seed=args.seed, device=args.device)
    save_sfcn(model, args.out, {"images": len(images), "steps": args.steps, "loss_first": losses[0],
                                "loss_last": losses[-1], "shards": len(urls)})
    print(f"trained SFCN on {len(images)} images from {len(urls)} shards, {args.steps} steps in "
          f"{time.time() - t0:.0f}s: loss {losses[0]:.4f} -> {losses[-1]:.4f}; wrote {args.out}")
    return 0


def cmd_train(args) -> int:
    from pipeline.config import load_train_config
    from .training import launch, plan

    cfg, run_root = load_train_config(args.config, args.overrides)
    if args.run:
        run_root = args.run
    result = launch(cfg, plan(cfg, run_root))
    print(format_result(result))
    return 0


def format_result(result: dict) -> str:
    """Training summary with the held-out evaluation, chance levels stated."""
    from .evalcmd import phrase_lines, retrieval_lines

    lines = [f"trained to step {result.get('step')}" + (" (stopped early; rerun to resume)" if result.get("stopped") else "")
             + f"; checkpoint {result.get('checkpoint')}"]
    ev = result.get("eval") or {}
    r = ev.get("retrieval")
    if r:
        lines.append(f"held-out retrieval on {r['n']} images (chance R@1 = {r['chance_r1']:.3f}):")
        lines += retrieval_lines(r)
    lines += phrase_lines(ev, "held-out ")
    g = ev.get("grounding")
    if g:
        lines.append(f"held-out grounding mIoU {g['miou']:.3f} over {g['n']} object sentences "
                     f"(a mask of the whole image scores {g['baseline_whole_image_miou']:.3f})")
    return "\n".join(lines)


def cmd_export_model(args) -> int:
    from model.checkpoint import load_model, save_model

    model = load_model(args.checkpoint)
    save_model(model, args.out, step=model.trained_steps, extra={"exported_from": str(args.checkpoint)})
    print(f"wrote {args.out}: {model.cfg.name}, inference weights + config (safetensors)")
    return 0


class _ModelNames:
    """argparse choices read only when checked or printed: building the parser must not import torch
    (`longcap status` and the other light commands start in about a second)."""

    def _names(self):
        from model.caft import CONFIGS

        return list(CONFIGS)

    def __contains__(self, name) -> bool:
        return name in self._names()

    def __iter__(self):
        return iter(self._names())


def add_commands(sub) -> None:

    r = sub.add_parser("train", help="train a model on export shards (resumes from train.out)")
    r.add_argument("config", help="a run config with a train section, or a train-only YAML")
    r.add_argument("overrides", nargs="*", help="dotted.key=value")
    r.add_argument("--run", help="take export/ and the synthetic truth from this run directory")
    r.set_defaults(fn=cmd_train)

    e = sub.add_parser("export-model", help="write an inference-only checkpoint (weights + config, safetensors)")
    e.add_argument("checkpoint", help="a training folder (its latest checkpoint) or a model.safetensors")
    e.add_argument("out", help="the .safetensors file to write")
    e.set_defaults(fn=cmd_export_model)

    i = sub.add_parser("model-info", help="parameters and forward FLOPs per sample, next to open_clip ViT-B-16")
    i.add_argument("names", nargs="+", choices=_ModelNames(), metavar="NAME", help="%(choices)s")
    i.add_argument("--n-sub", type=int, default=8, help="sub-captions per caption (N)")
    i.add_argument("--k-chunks", type=int, default=4, help="of which in the whole caption (K)")
    i.add_argument("--reference", default="ViT-B-16", help="open_clip architecture to compare with")
    i.add_argument("--no-reference", action="store_true")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_model_info)

    t = sub.add_parser("train-sfcn", help="train the SFCN superpixel net on image shards (webdataset tars)")
    t.add_argument("shards", nargs="+", help="tar files or glob patterns (e.g. runs/demo/images/*.tar)")
    t.add_argument("--out", required=True, help="checkpoint to write (.safetensors)")
    t.add_argument("--steps", type=int, default=500)
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--size", type=int, default=224)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--compactness", type=float, default=0.1)
    t.add_argument("--max-images", type=int, default=5000)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu")
    t.set_defaults(fn=cmd_train_sfcn)
