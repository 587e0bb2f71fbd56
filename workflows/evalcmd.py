"""`longcap eval` (retrieval and grounding benchmarks) and `longcap ablate` (the paper-style ablation table)."""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path

from pipeline.storage import atomic_write_json
from .rundir import RunDir

log = logging.getLogger("longcap.eval")


def checkpoint_defaults(path: str) -> dict:
    """image_size / k_chunks the model was trained with (the checkpoint's train.json), when known."""
    from model.checkpoint import model_file, read_train_json

    folder = model_file(path).rsplit("/", 1)[0]  # a training folder, a step-* folder, a model file
    try:
        cfg = read_train_json(folder)
        return {"image_size": int(cfg.get("image_size", 224)), "k_chunks": int(cfg.get("k_chunks", 4)), "known": True}
    except (OSError, ValueError, TypeError, AttributeError):
        return {"image_size": 224, "k_chunks": 4, "known": False}


def checkpoint_label(path: str) -> str:
    """A name for a checkpoint in file names: the training folder (with the step for a step-* folder) or the file."""
    remote = "://" in str(path)
    p = Path(str(path).split("://", 1)[1]) if remote else Path(path).resolve()
    if p.suffix == ".safetensors" if remote else p.is_file():  # step-N/model.safetensors, or an exported file
        # (named after its folder when it is model.*)
        p = p.parent if p.parent.name.startswith("step-") or p.stem == "model" else p.with_suffix("")
    return f"{p.parent.name}-{p.name}" if p.name.startswith("step-") else p.name


def evaluate_checkpoint(checkpoint: str, dataset: str, root: str | None = None, split: str | None = None,
                        annotations: str | None = None, images: str | None = None, image_size: int | None = None,
                        k_chunks: int | None = None, batch_size: int = 32, limit: int | None = None,
                        device: str = "cpu", alpha: float | None = None, where: dict | None = None,
                        split_by: str | None = None) -> dict:
    from model import evalsets
    from model.checkpoint import load_model
    from model.evaluate import encode_set, refer_grounding, retrieval

    model = load_model(checkpoint, device)
    d = checkpoint_defaults(checkpoint)
    size, k = image_size or getattr(model, "input_size", None) or d["image_size"], k_chunks or d["k_chunks"]
    if d["known"] and k > d["k_chunks"] and getattr(getattr(model, "text", None), "chunk_pos", None) is not None:
        raise evalsets.DatasetError(f"--k-chunks {k}: {checkpoint} was trained with K = {d['k_chunks']}; its "
                                    f"whole-caption encoder never saw chunk positions past {d['k_chunks'] - 1}")
    out = {"dataset": dataset, "checkpoint": str(checkpoint), "model": model.cfg.name,
           "trained_steps": getattr(model, "trained_steps", None), "image_size": size, "k_chunks": k}
    t0 = time.time()
    if hasattr(model, "evaluate") and dataset == "synthetic":  # GOAL, grouping: their own measures
        out.update(_own_measures(model, root, where, size, k, batch_size, device))
    elif hasattr(model, "evaluate") and (dataset in evalsets.REFER_SETS or dataset in evalsets.FGOVD_SETS
                                         or not hasattr(model, "evaluate_set")):
        raise evalsets.DatasetError(f"{checkpoint}: a {model.cfg.name} model is not evaluated on {dataset}: "
                                    f"GOAL models on 'synthetic' and the retrieval sets, grouping models on "
                                    f"'synthetic' only")
    elif dataset == "synthetic":
        out.update(_synthetic(model, root, where, size, k, batch_size, device))
    elif dataset in evalsets.REFER_SETS:
        from model.grounding import cannot_ground

        if cannot_ground(model):
            raise evalsets.DatasetError(f"{checkpoint}: not evaluated on {dataset}: {cannot_ground(model)}")
        items = evalsets.read_refer(_root(root, dataset), dataset, split or "val", split_by, images=images)
        out["grounding"] = refer_grounding(model, items, size, device, limit)
        out["split"] = split or "val"
    elif dataset in evalsets.FGOVD_SETS:
        from model.evaluate import fgovd_accuracy

        items, left = evalsets.read_fgovd(_root(root, dataset), dataset, images)
        out["fgovd"] = fgovd_accuracy(model, items, size, k, batch_size, device, limit)
        out["fgovd"]["left_out"] = len(left)  # annotations with fewer than 10 negatives (the benchmark's filter)
    else:
        es = evalsets.retrieval_set(dataset, _root(root, dataset), split, annotations, images)
        if limit:
            es = _first_images(es, limit)
        if hasattr(model, "evaluate_set"):  # GOAL: global retrieval with its own long-text handling
            out.update(model.evaluate_set(es, size, batch_size, device))
        else:
            enc = encode_set(model, es, size, k, batch_size, device)
            out["retrieval"] = retrieval(model, enc, alpha)
            out["text"] = enc["text"]
            out["skipped"] = enc["skipped"]
        out["notes"] = es.notes
    out["seconds"] = round(time.time() - t0, 1)
    return out


def _root(root: str | None, dataset: str) -> str:
    if not root:
        raise FileNotFoundError(f"--root is required for {dataset}: the folder its local copy was unpacked into")
    return root


def _first_images(es, n: int):
    from model.evalsets import EvalSet

    keep = [t for t, i in enumerate(es.image_of_text) if i < n]
    return EvalSet(es.name, es.images[:n], [es.captions[t] for t in keep], [es.image_of_text[t] for t in keep],
                   es.notes + f"; first {n} images", es.skipped)


def _own_measures(model, run: str | None, where: dict | None, size: int, k: int, batch_size: int,
                  device: str) -> dict:
    from model.data import expand_shards
    from model.train import EvalSpec

    if not run:
        raise FileNotFoundError("synthetic evaluation needs --run RUN (a run with a synthetic input and export/)")
    rd = RunDir(run)
    where = where if where is not None else {"split": "test"}
    spec = EvalSpec(expand_shards([rd.export_shards()]), where=where, truth=rd.truth(),
                    image_size=size, k_chunks=k, batch_size=batch_size)
    model.eval()
    return {"where": where, **model.evaluate(spec, device)}


def _synthetic(model, run: str | None, where: dict | None, size: int, k: int, batch_size: int, device: str) -> dict:
    """The synthetic benchmark of a run: held-out families (default split=test) of export/, truth for grounding."""
    from model.data import DataConfig, expand_shards
    from model.evaluate import encode_shards, read_truth, retrieval, synthetic_grounding

    if not run:
        raise FileNotFoundError("synthetic evaluation needs --run RUN (a run with a synthetic input and export/)")
    rd = RunDir(run)
    urls = expand_shards([rd.export_shards()])
    where = where if where is not None else {"split": "test"}
    flat = model.cfg.whole_depth == 0 and not model.cfg.part_loss
    data = DataConfig(image_size=size, n_sub=1 if flat else max(k, 1), k_chunks=1 if flat else k, train=False,
                      batch_size=batch_size, where=where or None)
    out = {"where": where, "retrieval": retrieval(model, encode_shards(model, urls, data, device))}
    truth = rd.truth()
    if truth and model.cfg.part_loss:
        out["grounding"] = synthetic_grounding(model, urls, read_truth(truth), data, device)
    return out


def retrieval_lines(ret: dict) -> list[str]:
    return [f"  {kind:<7} image->text R@1 {ret[kind]['i2t_r1']:.3f} R@5 {ret[kind]['i2t_r5']:.3f}   "
            f"text->image R@1 {ret[kind]['t2i_r1']:.3f} R@5 {ret[kind]['t2i_r5']:.3f}"
            for kind in ("whole", "part", "caftpp", "global", "groups") if kind in ret]


def phrase_lines(ev: dict, prefix: str = "") -> list[str]:
    """Grouping models: tIoU/F1 of the discovered groups against phrases, next to the reference partitions."""
    lines = []
    for name, label in (("phrases", "synthetic phrases"), ("flickr30k_entities", "Flickr30K Entities phrases")):
        p = ev.get(name)
        if p:
            base = p.get("baselines", {})
            lines.append(f"{prefix}{label}: tIoU {p['tiou']:.3f}, F1 {p['f1']:.3f} (P {p['precision']:.3f}, "
                         f"R {p['recall']:.3f}) over {p['n_phrases']} phrases in {p['n_texts']} texts"
                         + (f"; one group per text: tIoU {base['one_group']['tiou']:.3f} F1 {base['one_group']['f1']:.3f}, "
                            f"one word per group: tIoU {base['word_per_group']['tiou']:.3f} "
                            f"F1 {base['word_per_group']['f1']:.3f}" if base else ""))
    return lines


def format_eval(r: dict) -> str:
    lines = [f"{r['dataset']}: {r['model']} ({r['checkpoint']}), {r['image_size']} px, {r.get('seconds')} s"]
    ret = r.get("retrieval")
    if ret:
        lines.append(f"retrieval over {ret['n']} images / {ret.get('n_texts', ret['n'])} texts (chance R@1 {ret['chance_r1']:.4f})")
        lines += retrieval_lines(ret)
    if r.get("text"):
        lines.append(f"  text: {r['text']}")
    lines += phrase_lines(r)
    g = r.get("grounding")
    if g:
        lines.append(f"grounding mIoU {g['miou']:.3f} over {g['n']} texts (whole-image mask "
                     f"{g['baseline_whole_image_miou']:.3f})")
        if "ciou" in g:
            lines.append(f"  {g['protocol']}; cIoU {g['ciou']:.3f}, mIoU with Otsu's threshold {g['miou_otsu']:.3f}")
    f = r.get("fgovd")
    if f:
        lines.append(f"FG-OVD accuracy {f['accuracy']:.3f} over {f['n']} objects, {f['n_captions']} captions each "
                     f"(chance {f['chance']:.3f}); mean rank {f['mean_rank']:.2f}, median {f['median_rank']:.1f}; "
                     f"{f['left_out']} annotations with fewer negatives left out")
    skipped = r.get("skipped", []) + (g or {}).get("skipped", []) + (f or {}).get("skipped", [])
    if skipped:
        lines.append(f"  skipped {len(skipped)}: " + "; ".join(f"{s['item']}: {s['reason']}" for s in skipped[:5]))
    return "\n".join(lines)


def cmd_eval(args) -> int:
    where = dict(kv.split("=", 1) for kv in args.where) if args.where else None
    r = evaluate_checkpoint(args.checkpoint, args.dataset, args.root or (args.run if args.dataset == "synthetic"
                            else None), args.split, args.annotations, args.images, args.image_size, args.k_chunks,
                            args.batch, args.limit, args.device, args.alpha, where, args.split_by)
    out = args.out or (RunDir(args.run).eval_file(f"{args.dataset}-{checkpoint_label(args.checkpoint)}")
                       if args.run else None)
    if out:
        atomic_write_json(out, r)
    print(json.dumps(r, indent=2) if args.json else format_eval(r))
    if out:
        print(f"wrote {out}")
    return 0


# ---------------------------------------------------------------- ablation


def row_config(base, row: str, seed: int, steps: int, out: str):
    """The run's train section for one ablation row: same data, steps and schedule; the flat-text SigLIP row
    gets one 77-token caption (N = K = 1), as SigLIP trains. FLAIR's rows take every one of the N
    sub-captions as a text of both its losses (model/losses.py)."""
    from model.caft import CONFIGS

    c = CONFIGS[row]
    flat = c.whole_depth == 0 and not c.part_loss
    return base.model_copy(update={"model": row, "seed": seed, "steps": steps, "out": out, "eval_every": 0,
                                   **({"n_sub": 1, "k_chunks": 1} if flat else {})})


def ablate(run: str, size: str = "tiny", rows: list[str] | None = None, seeds: list[int] = (0,),
           steps: int | None = None, device: str = "auto") -> dict:
    from model.caft import ablation_names
    from pipeline.config import load_config
    from .training import launch, plan

    rd = RunDir(run)
    cfg = load_config(rd.path("run.yaml"))
    if cfg.train is None:
        raise FileNotFoundError(f"{run}/run.yaml has no train section: ablate trains each row with it")
    device = _device(device)
    names = rows or ablation_names(size)
    steps = steps or cfg.train.steps
    results = []
    for row in names:
        runs = []
        for seed in seeds:
            tc = row_config(cfg.train, row, seed, steps, rd.ablation(row, f"seed-{seed}"))
            t0 = time.time()
            p = dict(plan(tc, run), eval=None)  # evaluated below, exactly as `longcap eval ... synthetic`
            res = launch(tc, p)  # trains on the GPU when torch sees one
            if res.get("stopped") or res.get("step") != steps:
                raise RuntimeError(f"ablation row {row} seed {seed} stopped at step {res.get('step')}; rerun to resume")
            seconds = round(time.time() - t0, 1)
            ev = evaluate_checkpoint(tc.out, "synthetic", run, where=tc.eval_where or {"split": "test"}, device=device)
            runs.append({"seed": seed, "eval": ev, "train_seconds": seconds, "last": res.get("last", {})})
            log.info("ablation %s seed %d: %s", row, seed, format_eval(ev))
        results.append(_row_summary(row, runs))
    return {"run": run, "steps": steps, "seeds": list(seeds), "size": size, "device": device, "rows": results,
            "claims": claims(results)}


def _device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _stats(xs: list[float]) -> dict | None:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "values": xs}


METRICS = {"i2t_r1": ("retrieval", "whole", "i2t_r1"), "t2i_r1": ("retrieval", "whole", "t2i_r1"),
           "part_i2t_r1": ("retrieval", "part", "i2t_r1"), "part_t2i_r1": ("retrieval", "part", "t2i_r1"),
           "caftpp_i2t_r1": ("retrieval", "caftpp", "i2t_r1"), "caftpp_t2i_r1": ("retrieval", "caftpp", "t2i_r1"),
           "miou": ("grounding", "miou")}


def _row_summary(row: str, runs: list[dict]) -> dict:
    from model.caft import row_label

    def pick(path):
        vals = []
        for r in runs:
            x = r["eval"]
            for p in path:
                x = (x or {}).get(p)
            vals.append(x)
        return _stats(vals)

    return {"row": row, "label": row_label(row), "seeds": [r["seed"] for r in runs],
            **{k: pick(path) for k, path in METRICS.items()}, "n_test": runs[0]["eval"]["retrieval"]["n"],
            "train_seconds": [r["train_seconds"] for r in runs], "runs": runs}


def paired(better: dict, worse: dict, metric: str) -> dict | None:
    """The paper's claim "`better` above `worse`" on `metric`, seed by seed (same seeds, same data)."""
    a, b = better.get(metric), worse.get(metric)
    if a is None or b is None:
        return None
    seeds = [s for s in better["seeds"] if s in worse["seeds"]]
    diffs = [a["values"][better["seeds"].index(s)] - b["values"][worse["seeds"].index(s)] for s in seeds]
    wins = sum(d > 0 for d in diffs)
    mean = statistics.fmean(diffs)
    verdict = ("holds in every seed" if wins == len(diffs) else "holds in the mean only" if mean > 0
               else "no difference" if mean == 0 and not any(diffs) else "does not hold")
    return {"better": better["row"], "worse": worse["row"], "metric": metric, "seeds": seeds, "diffs": diffs,
            "mean_diff": statistics.fmean(diffs), "wins": wins, "verdict": verdict}


def claims(rows: list[dict]) -> list[dict]:
    """The paper's claims (§4.4, Table 3) that the rows present can test: each Table 3 row above the one
    before it, CAFT above -part-level alignment, CAFT's grounding above FLAIR's."""
    by = {}
    for r in rows:
        for key in ("flair", "visual", "textual", "hloss", "no-part"):
            if r["row"].startswith(key + "-") or r["row"].endswith("-" + key):
                by[key] = r
    pairs = [(b, w) for b, w in (("visual", "flair"), ("textual", "visual"), ("hloss", "textual"),
                                 ("hloss", "no-part")) if b in by and w in by]
    out = [c for b, w in pairs for m in ("i2t_r1", "t2i_r1") if (c := paired(by[b], by[w], m))]
    if "hloss" in by and "flair" in by and (c := paired(by["hloss"], by["flair"], "miou")):
        out.append(c)
    return out


def format_ablation(t: dict) -> str:
    def cell(s):
        return "—" if s is None else f"{s['mean']:.3f} ± {s['std']:.3f}"

    def seeds(s):
        return "—" if s is None else " / ".join(f"{v:.3f}" for v in s["values"])

    head = (f"ablation on {t['run']}: {t['steps']} steps, seeds {t['seeds']}, held-out images "
            f"{t['rows'][0]['n_test'] if t['rows'] else 0} (mean ± std over seeds; per seed below)")
    lines = [head, "| row | config | I→T R@1 | T→I R@1 | text-cond. I→T / T→I | CAFT++ I→T | CAFT++ T→I | "
                   "grounding mIoU |", "|---|---|---|---|---|---|---|---|"]
    for r in t["rows"]:
        lines.append(f"| {r.get('label', r['row'])} | {r['row']} | {cell(r['i2t_r1'])} | {cell(r['t2i_r1'])} | "
                     f"{cell(r.get('part_i2t_r1'))} / {cell(r.get('part_t2i_r1'))} | {cell(r['caftpp_i2t_r1'])} | "
                     f"{cell(r['caftpp_t2i_r1'])} | {cell(r['miou'])} |")
    lines.append("per seed (I→T; T→I; mIoU):")
    for r in t["rows"]:
        lines.append(f"  {r['row']}: {seeds(r['i2t_r1'])}; {seeds(r['t2i_r1'])}; {seeds(r['miou'])}")
    if t.get("claims"):
        lines.append("the paper's claims, paired by seed (differences better - worse):")
        for c in t["claims"]:
            lines.append(f"  {c['better']} > {c['worse']} on {c['metric']}: {c['verdict']} "
                         f"(mean {c['mean_diff']:+.3f}, {c['wins']}/{len(c['diffs'])} seeds; "
                         + ", ".join(f"{d:+.3f}" for d in c["diffs"]) + ")")
    return "\n".join(lines)


def cmd_ablate(args) -> int:
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = args.rows.split(",") if args.rows else None
    t = ablate(args.run, args.size, rows, seeds, args.steps, args.device)
    out = args.out or RunDir(args.run).ablation()
    atomic_write_json(out, t)
    print(format_ablation(t))
    print(f"wrote {out}")
    return 0


def add_commands(sub) -> None:
    from model.evalsets import FGOVD_SETS, REFER_SETS, RETRIEVAL_SETS

    names = [*RETRIEVAL_SETS, *REFER_SETS, *FGOVD_SETS, "synthetic"]
    e = sub.add_parser("eval", help="retrieval (R@1/R@5 both ways, whole/part/CAFT++) or grounding (mIoU) of a model")
    e.add_argument("checkpoint", help="a training folder (its latest checkpoint) or a model .safetensors")
    e.add_argument("dataset", choices=names, metavar="DATASET", help=", ".join(names))
    e.add_argument("--root", help="the dataset's local copy (published layout; see model/evalsets.py)")
    e.add_argument("--run", help="a run directory: synthetic data from it, results written to RUN/eval/DATASET-MODEL.json")
    e.add_argument("--split", help="dci: all|train|valid|test; docci: test; refcoco*: val|testA|testB|test; "
                                   "coco-5k / flickr30k-1k: test (Karpathy)")
    e.add_argument("--split-by", help="refcoco*: refer's refs(SPLIT_BY).p (default unc, unc, google as SaG uses them)")
    e.add_argument("--annotations", help="sharegpt4v: the annotation JSON if not under --root")
    e.add_argument("--images", help="refcoco*: the COCO train2014 folder; fg-ovd-*: the COCO 2017 folder; coco-5k / "
                                    "flickr30k-1k: the image root, if not under --root")
    e.add_argument("--where", nargs="*", help="synthetic: extra=value filters (default split=test)")
    e.add_argument("--image-size", type=int, help="default: the size the checkpoint was trained at")
    e.add_argument("--k-chunks", type=int, help="sub-captions in the whole caption (default: as trained)")
    e.add_argument("--alpha", type=float, help="CAFT++ weight of the part score (default: the model's)")
    e.add_argument("--limit", type=int, help="the first N images (retrieval) or refs (grounding)")
    e.add_argument("--batch", type=int, default=32)
    e.add_argument("--device", default="cpu")
    e.add_argument("--out", help="result JSON (default with --run: RUN/eval/DATASET-MODEL.json, MODEL the training folder)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=cmd_eval)

    a = sub.add_parser("ablate", help="train every ablation row with a run's train section; the paper-style table")
    a.add_argument("run", help="a finished run directory (export/ + run.yaml with a train section)")
    a.add_argument("--size", default="tiny", choices=["tiny", "b16"])
    a.add_argument("--rows", help="comma-separated config names (default: the Table 3 rows FLAIR, +visual, +textual, "
                                  "+hierarchical loss = CAFT, -part-level, then siglip, not in the paper)")
    a.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    a.add_argument("--steps", type=int, help="default: the run's train.steps")
    a.add_argument("--device", default="auto", help="evaluation device (auto: cuda when torch sees one); "
                                                    "training uses the GPU whenever torch sees one")
    a.add_argument("--out", help="default: RUN/ablation.json")
    a.set_defaults(fn=cmd_ablate)
