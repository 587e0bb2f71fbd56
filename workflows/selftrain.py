"""`longcap selftrain RUN`: a pair scorer that knows the data, trained on the run's own captions.

Where no pretrained image-text model fits (the demo's synthetic world, a new domain), the regions stage's
scorer knows nothing about the images, and its pairs lean on the detector's class names alone. The loop:

- round 0 (global): a global-only FAST-GOAL model (`selftrain.global_model`) trained on the run's exported
  captions (export/*.tar); the regions stage's regions rescored with it (`pipeline.regions.RegionPairer`, the
  same rules per sentence kind) → selftrain/round-0/regions/NNNNN.parquet; those pairs exported with the images
  and captions → selftrain/round-0/export/ (the export stage's format);
- round r ≥ 1 (local): FAST-GOAL with local pairs (`selftrain.local_model`), initialised from round r-1's
  weights, trained on round r-1's export (its pairs are the local pairs); the regions rescored and exported
  again → selftrain/round-r/.

After each round, the record selftrain/rounds.json (RunDir.selftrain()) gets the round's settings, checkpoint,
pairs kept and, on synthetic runs, the pair precision/recall per sentence kind against the truth (the numbers of
`longcap eval-pairs`). A rerun skips every round recorded with the same settings (and the same round before it);
a round that was interrupted resumes its training from its last checkpoint and redoes its rescoring. Every path
comes from RunDir and every file goes through fsspec, so an s3:// run works the same; the one local file is
the initial weights handed to open_clip for rounds ≥ 1 (open_clip reads local paths only): in the run folder
for a local run, else in a cache folder named after the run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time

import fsspec

from pipeline.config import SelfTrainSection, TrainSection
from pipeline.download import read_images_meta, shard_name
from pipeline.storage import atomic_write_json, atomic_write_table, exists, read_table
from .rundir import RunDir

log = logging.getLogger("longcap.selftrain")
RECORD_VERSION = 1


def round_settings(cfg, st: SelfTrainSection, r: int) -> dict:
    """What round r's result depends on (compared on rerun): the model, its training, the rescoring rules."""
    return {"round": r, "kind": "global" if r == 0 else "local",
            "model": st.global_model if r == 0 else st.local_model,
            "model_changes": dict(st.model_changes, image_size=st.image_size),
            "steps": st.steps if r == 0 else (st.local_steps or st.steps),
            "batch_size": st.batch_size, "lr": st.lr, "warmup": st.warmup, "weight_decay": st.weight_decay,
            "seed": st.seed, "train_where": st.train_where,
            "regions": cfg.regions.model_copy(update=st.regions).model_dump(mode="json")}


def load_record(run: RunDir) -> dict:
    if not exists(run.selftrain()):
        return {"version": RECORD_VERSION, "rounds": []}
    with fsspec.open(run.selftrain(), "r") as f:
        return json.load(f)


def _count_rows(paths: list[str]) -> int:
    """Exported samples in export index files (NNNNN.parquet)."""
    return sum(sum(bool(x) for x in read_table(p, ["exported"])["exported"].to_pylist()) for p in paths)


def _init_weights(run: RunDir, prev_checkpoint: str, r: int) -> str:
    """Round r-1's CLIP weights as an open_clip state dict in a local safetensors file (for `pretrained`)."""
    from safetensors.torch import save_file

    from model.checkpoint import model_file, read_model_file

    if run.is_local:
        path = run.selftrain(f"round-{r}", "init-clip.safetensors")
    else:  # open_clip opens local files only
        tag = hashlib.sha1(f"{run.root}/{r}".encode()).hexdigest()[:16]
        path = os.path.join(tempfile.gettempdir(), "longcap-selftrain", tag, "init-clip.safetensors")
    state, _ = read_model_file(model_file(prev_checkpoint))
    clip = {k[len("clip."):]: v.contiguous() for k, v in state.items() if k.startswith("clip.")}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file(clip, tmp)
    os.replace(tmp, path)
    return path


def _train(run: RunDir, s: dict, st: SelfTrainSection, shards: list[str], init: str | None) -> dict:
    from .training import launch

    out = run.selftrain(f"round-{s['round']}", "model")
    changes = dict(s["model_changes"])
    if init:
        changes["pretrained"] = init
    tc = TrainSection(model=s["model"], model_changes=changes, shards=shards, out=out, steps=s["steps"],
                      batch_size=s["batch_size"], lr=s["lr"], warmup=s["warmup"], weight_decay=s["weight_decay"],
                      image_size=st.image_size, workers=st.workers, threads=st.threads, seed=s["seed"],
                      train_where=s["train_where"], sampling="resampled", log_every=max(1, s["steps"] // 6),
                      ckpt_every=max(1, s["steps"] // 3), keep=1, tensorboard=False)
    # a resampled stream's "epoch" only sets how often the loader restarts: the exported rows, at least 50 batches
    folder = shards[0].rsplit("/", 1)[0]
    fs, p = fsspec.core.url_to_fs(folder)
    parts = [n for n in fs.ls(p, detail=False) if n.rsplit("/", 1)[-1][:5].isdigit() and n.endswith(".parquet")]
    epoch = max(_count_rows([run.url(n) for n in parts]), 50 * tc.batch_size)
    return launch(tc, {"shards": _tars(shards), "eval": None, "out": out, "epoch_samples": epoch})


def _tars(patterns: list[str]) -> list[str]:
    from model.data import expand_shards

    return expand_shards(patterns)


def _rescore_and_export(cfg, regions, run: RunDir, s: dict, checkpoint: str, shards: list[int], device: str) -> int:
    """The run's regions rescored with round s's model → round-N/regions; exported with their pairs → round-N/export."""
    from model.scorer import load_scorer
    from pipeline.export import export_shard
    from pipeline.regions import RegionPairer
    from pipeline.scorers import resolve_device

    r = s["round"]
    scorer = load_scorer(checkpoint, resolve_device(device))
    pairer = RegionPairer(regions, scorer, None, cfg.download.max_image_area)
    kept = 0
    for shard in shards:
        if not run.is_done("regions", shard):
            continue
        name = shard_name(shard)
        meta, tar = read_images_meta(run.images(), shard), run.images(f"{name}.tar")
        sentences = read_table(run.output("sentences", shard))
        fixed = {x["key"]: x["regions"] for x in read_table(run.output("regions", shard), ["key", "regions"]).to_pylist()
                 if x["regions"]}
        out = pairer.pair_shard(meta, tar, sentences, fixed=fixed)
        atomic_write_table(run.selftrain(f"round-{r}", "regions", f"{name}.parquet"), out)
        kept += sum(n or 0 for n in out["n_pairs"].to_pylist())
        index, _ = export_shard(name, meta, tar, sentences, run.selftrain(f"round-{r}", "export"), cfg.export,
                                regions=out, extra_cols=cfg.extra_columns(), txt_caption=cfg.txt_caption())
        atomic_write_table(run.selftrain(f"round-{r}", "export", f"{name}.parquet"), index)
    return kept


def _metrics(cfg, run: RunDir, r: int, shards: list[int]) -> dict | None:
    """Pair precision/recall per sentence kind against the synthetic truth (eval-pairs' numbers), else None."""
    if cfg.input.synthetic is None or run.truth() is None:
        return None
    from .evalpairs import KINDS, collect_items, pair_metrics

    items, _, _ = collect_items(run, shards, path=lambda s: run.selftrain(f"round-{r}", "regions",
                                                                          f"{shard_name(s)}.parquet"))
    return {"pairs": {k: pair_metrics(items.get(k, []), 0.5) for k in KINDS},
            "all": pair_metrics([i for k in KINDS for i in items.get(k, [])], 0.5)}


def _clear_round(run: RunDir, r: int) -> None:
    fs, p = fsspec.core.url_to_fs(run.selftrain(f"round-{r}"))
    if fs.exists(p):
        fs.rm(p, recursive=True)


def selftrain(cfg, run: RunDir, say=print) -> dict:
    """Run the rounds not yet recorded; returns the record (selftrain/rounds.json)."""
    if cfg.regions is None:
        from pipeline.config import ConfigError

        raise ConfigError("selftrain: the run has no regions section (nothing to pair)")
    st = cfg.selftrain or SelfTrainSection()
    shards = run.plan(cfg)
    if not all(run.is_done("regions", s) for s in shards) or not all(run.is_done("export", s) for s in shards):
        from pipeline.config import ConfigError

        raise ConfigError(f"selftrain: {run.root} has shards without regions or export; finish `longcap run` first")
    regions = cfg.regions.model_copy(update=st.regions)  # the rules the rescoring pairs with
    record = load_record(run)
    done = record["rounds"]
    ran_before = False
    for r in range(st.rounds + 1):
        s = round_settings(cfg, st, r)
        if r < len(done) and done[r]["settings"] == s:
            say(f"selftrain round {r} ({s['kind']}, {s['model']}): recorded, skipped")
            continue
        del done[r:]  # this round and every later one are redone
        marker = run.selftrain(f"round-{r}", "settings.json")
        if ran_before:  # the round before was trained again here: this round's old model starts from stale weights
            _clear_round(run, r)
        elif exists(marker):
            with fsspec.open(marker, "r") as f:
                if json.load(f) != s:  # an interrupted round with other settings: start it again
                    _clear_round(run, r)
        atomic_write_json(marker, s)
        t0 = time.time()
        data = [run.export_shards()] if r == 0 else [run.selftrain(f"round-{r - 1}", "export", "*.tar")]
        init = _init_weights(run, done[r - 1]["checkpoint"], r) if r else None
        say(f"selftrain round {r} ({s['kind']}): training {s['model']} for {s['steps']} steps on "
            f"{'the run’s export' if r == 0 else f'round {r - 1}’s pairs'} ...")
        result = _train(run, s, st, data, init)
        t1 = time.time()
        kept = _rescore_and_export(cfg, regions, run, s, result["checkpoint"], shards, st.device)
        t2 = time.time()
        entry = {"round": r, "kind": s["kind"], "model": s["model"], "checkpoint": result["checkpoint"],
                 "step": result.get("step"), "pairs_kept": kept, "settings": s,
                 "seconds": {"train": round(t1 - t0, 1), "rescore_export": round(t2 - t1, 1)}}
        m = _metrics(cfg, run, r, shards)
        if m is not None:
            entry.update(m)
            entry["seconds"]["eval"] = round(time.time() - t2, 1)
        done.append(entry)
        ran_before = True
        atomic_write_json(run.selftrain(), record)
        say(format_round(entry))
    return record


def format_round(e: dict) -> str:
    fmt = lambda v: f"{v:.3f}" if v is not None else "-"  # noqa: E731
    head = (f"selftrain round {e['round']} ({e['kind']}, {e['model']}, step {e['step']}): {e['pairs_kept']} pairs "
            f"kept; train {e['seconds']['train']} s, rescore+export {e['seconds']['rescore_export']} s")
    if "pairs" not in e:
        return head
    rows = [f"      {'sentences':<12}{'n':>6}{'pairs':>7}{'right':>7}{'precision':>11}{'recall':>8}"]
    for name, m in list(e["pairs"].items()) + [("all", e["all"])]:
        rows.append(f"      {name:<12}{m['sentences']:>6}{m['pairs']:>7}{m['right']:>7}{fmt(m['precision']):>11}"
                    f"{fmt(m['recall']):>8}")
    return "\n".join([head] + rows)


def cmd_selftrain(args) -> int:
    from .cli import _load

    cfg = _load(args.config, args.overrides)
    run = RunDir(cfg.run.dir, cfg.input.images_from)
    if not exists(run.path("run.yaml")):
        raise FileNotFoundError(f"{run.root} is not a started run (no run.yaml): `longcap run` it first")
    record = selftrain(cfg, run)
    print(f"\nself-training record: {run.selftrain()} ({len(record['rounds'])} round(s))")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("selftrain", help="train the pair scorer on the run's own captions: a global round, then "
                                         "self-training rounds with its local pairs; each round's pairs measured")
    p.add_argument("config", help="the run's config file or its run directory (a finished `longcap run`)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. selftrain.steps=100")
    p.set_defaults(fn=cmd_selftrain)
