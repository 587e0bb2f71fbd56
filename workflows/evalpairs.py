"""`longcap eval-pairs RUN`: the detector's mAP50 and local-pair precision/recall against synthetic truth.

A kept pair is right when its region has IoU >= 0.5 with the box of what its
sentence describes (object sentences: the object; relation sentences: the
union of both objects; background: the whole image). Precision = right pairs
/ kept pairs; recall = right pairs / sentences; coverage = sentences for which
some region of the image reaches the IoU (the best any matcher could do).
"""

from __future__ import annotations

from collections import defaultdict
import torch
from torchvision.ops import box_iou

from pipeline.download import read_images_meta, shard_name
from pipeline.storage import atomic_write_json, exists, read_table
from .rundir import RunDir

KINDS = ("object", "relation", "background")


def pair_metrics(items: list[dict], min_iou: float = 0.5) -> dict:
    """items: {'truth': box, 'pred': box of the kept pair or None, 'regions': [boxes]} per sentence."""
    n, n_pred, right, covered = len(items), 0, 0, 0
    for it in items:
        truth = torch.tensor([it["truth"]], dtype=torch.float64)
        if it["pred"] is not None:
            n_pred += 1
            right += float(box_iou(torch.tensor([it["pred"]], dtype=torch.float64), truth)[0, 0]) >= min_iou
        if it["regions"]:
            covered += float(box_iou(torch.tensor(it["regions"], dtype=torch.float64), truth).max()) >= min_iou
    return {"sentences": n, "pairs": n_pred, "right": int(right),
            "precision": round(right / n_pred, 4) if n_pred else None,
            "recall": round(right / n, 4) if n else None,
            "coverage": round(covered / n, 4) if n else None}


def collect_items(run: RunDir, shards: list[int], stage: str = "regions", rescore=None,
                  path=None, redetect: bool = False) -> tuple[dict, int, dict]:
    """Per sentence kind, the evaluation items of every regions row whose image has synthetic truth; the
    sentences not found in the truth; the kind classifier's counts (truth kind -> predicted kind).

    rescore: a RegionPairer that re-pairs the stage's regions in memory (an ablation) instead of reading them;
    with redetect, its detector finds the regions again (an ablation of the detector or region settings).
    path: shard -> the regions-schema file to read instead of the stage's (a self-training round's)."""
    truth = {r["id"]: {s["text"]: s for s in r["sentences"]}
             for r in read_table(run.synth("truth.parquet"), ["id", "sentences"]).to_pylist()}
    items, unmatched, kinds = defaultdict(list), 0, defaultdict(lambda: defaultdict(int))
    path = path or (lambda s: run.output(stage, s))
    for shard in shards:
        if not exists(path(shard)):
            continue
        meta = read_images_meta(run.images(), shard)
        ids = {r["key"]: r["id"] for r in meta.select(["key", "id"]).to_pylist()}
        table = read_table(path(shard), ["key", "regions", "matches"])
        if rescore is not None:
            fixed = None if redetect else {r["key"]: r["regions"] for r in table.select(["key", "regions"]).to_pylist()
                                           if r["regions"]}
            table = rescore.pair_shard(meta, run.images(f"{shard_name(shard)}.tar"),
                                       read_table(run.output("sentences", shard)), fixed=fixed)
        for r in table.select(["key", "regions", "matches"]).to_pylist():
            sents = truth.get(ids.get(r["key"]))
            if sents is None or not r["matches"]:
                continue
            boxes = [g["box"] for g in r["regions"]]
            candidates = [g["box"] for g in r["regions"] if not g["source"].startswith("union:")]
            for m in r["matches"]:
                t = sents.get(m["sentence"])
                if t is None:
                    unmatched += 1
                    continue
                kinds[t["kind"]][m.get("kind") or "-"] += 1
                pred = boxes[m["region"]] if m["kept"] else None
                items[t["kind"]].append({"truth": list(t["box"]), "pred": pred, "regions": candidates})
    return items, unmatched, {k: dict(v) for k, v in kinds.items()}


ABLATIONS = {  # rescoring the run's own regions with one rule changed (same scorer, same regions)
    "labels off": {"labels": False},
    "object and relation sentences choose among every region, not detector boxes": {"object_regions": "all",
                                                                                    "relation_regions": "all"},
    "object sentences scored by the sentence alone (not with its noun phrase)": {"object_text": "sentence"},
    "flat label term (not times the detector's confidence)": {"label_scale": "flat"},
    "best region for every kind, labels off (before issue 20)": {"labels": False, "pair_relation": "best",
                                                                 "pair_scene": "best", "object_regions": "all",
                                                                 "relation_regions": "all",
                                                                 "object_text": "sentence"},
}


def ablations(run: RunDir, cfg, shards: list[int], min_iou: float) -> dict:
    from pipeline.regions import RegionPairer
    from pipeline.scorers import build_scorer, resolve_device

    scorer = build_scorer(cfg.regions.scorer, resolve_device(cfg.regions.device), cfg.run.seed)
    out = {}
    for name, change in ABLATIONS.items():
        pairer = RegionPairer(cfg.regions.model_copy(update=change), scorer, None, cfg.download.max_image_area)
        items, _, _ = collect_items(run, shards, rescore=pairer)
        out[name] = {"change": change, "pairs": {k: pair_metrics(items.get(k, []), min_iou) for k in KINDS},
                     "all": pair_metrics([i for k in KINDS for i in items.get(k, [])], min_iou)}
    return out


def detector_map50(run: RunDir, cfg) -> dict:
    from pipeline.detector import detection_map50

    det = cfg.regions.detector if cfg.regions else None
    if det is None:
        return {"map50": None, "why": "no detector configured"}
    data = run.path("models", "detector", "data.yaml")
    if not exists(data):
        return {"map50": None, "why": "no synthetic validation split (the detector was not trained by this run)"}
    from .stages import detector_weights

    imgsz = det.train.imgsz if det.train else det.imgsz
    return {"map50": detection_map50(detector_weights(cfg, run), data, imgsz), "data": data}


def selftrain_rounds(run: RunDir, shards: list[int], min_iou: float) -> list[dict]:
    """The pairs of every round `longcap selftrain` recorded (selftrain/rounds.json), measured like the stage's."""
    import json

    import fsspec

    if not exists(run.selftrain()):
        return []
    with fsspec.open(run.selftrain(), "r") as f:
        record = json.load(f)
    out = []
    for e in record.get("rounds", []):
        r = e["round"]
        items, _, _ = collect_items(run, shards, path=lambda s: run.selftrain(f"round-{r}", "regions",
                                                                              f"{shard_name(s)}.parquet"))
        out.append({"round": r, "kind": e["kind"], "model": e["model"], "step": e.get("step"),
                    "pairs": {k: pair_metrics(items.get(k, []), min_iou) for k in KINDS},
                    "all": pair_metrics([i for k in KINDS for i in items.get(k, [])], min_iou)})
    return out


def evaluate(run_dir: str, min_iou: float = 0.5, with_ablations: bool = False) -> dict:
    from pipeline.config import load_config

    run = RunDir(run_dir)
    if not exists(run.path("run.yaml")):
        raise FileNotFoundError(f"{run_dir} is not a started run (no run.yaml)")
    cfg = load_config(run.path("run.yaml"))
    if cfg.input.synthetic is None:
        raise FileNotFoundError(f"{run_dir}: eval-pairs needs a synthetic run (truth comes from synth/truth.parquet)")
    shards = run.plan(cfg)
    items, unmatched, kinds = collect_items(run, shards)
    report = {"run": run.root, "min_iou": min_iou,
              "shards_with_regions": sum(run.is_done("regions", s) for s in shards),
              "detector": detector_map50(run, cfg),
              "pairs": {k: pair_metrics(items.get(k, []), min_iou) for k in KINDS},
              "all": pair_metrics([i for k in KINDS for i in items.get(k, [])], min_iou),
              "sentences_without_truth": unmatched,
              "kinds": kinds}
    if any(run.is_done("regions_caft", s) for s in shards):  # the same regions rescored by the trained CAFT
        caft, _, _ = collect_items(run, shards, "regions_caft")
        report["caft"] = {"pairs": {k: pair_metrics(caft.get(k, []), min_iou) for k in KINDS},
                          "all": pair_metrics([i for k in KINDS for i in caft.get(k, [])], min_iou)}
    rounds = selftrain_rounds(run, shards, min_iou)
    if rounds:
        report["selftrain"] = rounds
    if with_ablations:
        report["ablations"] = ablations(run, cfg, shards, min_iou)
    atomic_write_json(run.path("report", "eval_pairs.json"), report)
    return report


def format_report(rep: dict) -> str:
    d = rep["detector"]
    lines = [f"run {rep['run']}: {rep['shards_with_regions']} shard(s) with regions",
             f"  detector mAP50 (synthetic validation): "
             + (f"{d['map50']:.3f}" if d["map50"] is not None else f"n/a ({d['why']})"),
             f"  local pairs (right = IoU >= {rep['min_iou']} with the truth box):",
             f"      {'sentences':<12}{'n':>6}{'pairs':>7}{'right':>7}{'precision':>11}{'recall':>8}{'coverage':>10}"]
    fmt = lambda v: f"{v:.3f}" if v is not None else "-"  # noqa: E731
    tables = [("scorer of the regions stage", rep)] + ([("the trained CAFT (regions-caft/)", rep["caft"])]
                                                      if rep.get("caft") else [])
    tables += [(f"self-training round {t['round']} ({t['kind']}, {t['model']}, step {t['step']}; selftrain/)", t)
               for t in rep.get("selftrain") or []]
    tables += [(f"ablation: {name}", t) for name, t in (rep.get("ablations") or {}).items()]
    for title, t in tables:
        if len(tables) > 1:
            lines.append(f"    {title}:")
        for name, m in list(t["pairs"].items()) + [("all", t["all"])]:
            lines.append(f"      {name:<12}{m['sentences']:>6}{m['pairs']:>7}{m['right']:>7}{fmt(m['precision']):>11}"
                         f"{fmt(m['recall']):>8}{fmt(m['coverage']):>10}")
    if rep.get("kinds"):
        lines.append("  sentence kinds (truth -> classified): " + "; ".join(
            f"{t}: " + ", ".join(f"{k} {n}" for k, n in sorted(c.items(), key=lambda x: -x[1]))
            for t, c in rep["kinds"].items()))
    if rep["sentences_without_truth"]:
        lines.append(f"  {rep['sentences_without_truth']} sentence(s) not found in the truth (split differently)")
    return "\n".join(lines)
