"""The `longcap` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from pipeline.config import ConfigError, dump_config, load_config
from pipeline.download import shard_name
from pipeline.sources import InputError

EXIT_FAILED, EXIT_CONFIG = 1, 2


def _load(config: str, overrides: list[str]):
    """A config file, or a run directory (its run.yaml)."""
    import fsspec

    fs, p = fsspec.core.url_to_fs(config)
    if fs.isdir(p):  # a run: a local folder or any fsspec URL
        from .rundir import RunDir

        snapshot = RunDir(config).path("run.yaml")
        if not fs.exists(fsspec.core.url_to_fs(snapshot)[1]):
            raise ConfigError(f"{config} is a folder without run.yaml: pass a config file or a started run")
        config = snapshot
    return load_config(config, overrides)


def _split_csv(text: str | None) -> list[str] | None:
    return [x.strip() for x in text.split(",") if x.strip()] if text else None


def cmd_config(args) -> int:
    if args.reference:
        from pipeline.configdoc import reference

        print(reference(), end="")
        return 0
    if not args.config:
        print("longcap config: give a CONFIG (or --reference)", file=sys.stderr)
        return 2
    print(dump_config(_load(args.config, args.overrides)), end="")
    return 0


def cmd_run(args) -> int:
    from .rundir import RunDir
    from .runner import Runner
    from .status import format_status, run_status
    from .stages import ORDER

    cfg = _load(args.config, args.overrides)
    stages = _split_csv(args.stages)
    bad = [s for s in stages or [] if s not in (*ORDER, "train")]
    if bad:
        raise ConfigError(f"--stages: unknown stage(s) {bad}; allowed: {', '.join(ORDER)}, train")
    if "regions" in (stages or []) and cfg.regions is None:
        raise ConfigError("--stages regions: the config has no regions section")
    if "dedup" in (stages or []) and cfg.dedup is None:
        raise ConfigError("--stages dedup: the config has no dedup section")
    do_train = cfg.train is not None and (stages is None or "train" in stages)
    stages = [s for s in stages if s != "train"] if stages else None
    shards = [int(s) for s in _split_csv(args.shards)] if args.shards else None
    run = RunDir(cfg.run.dir, cfg.input.images_from)
    changed = run.check_config(cfg, force=args.force)
    if changed:
        print("config changed (--force):\n  " + "\n  ".join(changed), file=sys.stderr)
    if stages == []:
        from .runner import RunResult
        result = RunResult()
    else:
        result = Runner(cfg, run, stages=stages, shards=shards, progress=not args.no_progress).execute()
        print(f"\nrun directory: {run.root}")
        print(format_status(run_status(run)))
    if result.ok:
        return run_training(cfg, run.root) if do_train else 0
    print("", file=sys.stderr)
    for (stage, shard), err in sorted(result.failed.items()):
        print(f"FAILED {stage} shard {shard_name(shard)}: {err}", file=sys.stderr)
    for (stage, shard), why in sorted(result.blocked.items()):
        print(f"NOT RUN {stage} shard {shard_name(shard)}: {why}", file=sys.stderr)
    names = sorted({shard_name(s) for _, s in list(result.failed) + list(result.blocked)})
    first = min(ORDER.index(st) for st, _ in list(result.failed) + list(result.blocked))
    selected = [s for s in ORDER if s in (stages or cfg.run.stages) and not (s == "download" and cfg.input.images_from)]
    failed_stages = [s for s in selected if ORDER.index(s) >= first]  # and the stages after them, to finish
    print(f"\n{len(names)} shard(s) did not finish. After fixing the cause, rerun them with:\n"
          f"  longcap run {run.root} --stages {','.join(failed_stages)} --shards {','.join(names)}",
          file=sys.stderr)
    return EXIT_FAILED


def run_training(cfg, root) -> int:
    """`longcap run` with a train section: train on the run's export (resuming), evaluate, print."""
    from .model_cli import format_result
    from .training import launch, plan

    if not cfg.train.ray_workers:  # the pipeline's own local Ray is done; its idle workers would hold memory
        import ray

        from .runner import STARTED_HERE
        if ray.is_initialized() and STARTED_HERE:
            ray.shutdown()
            STARTED_HERE.clear()
    print(f"\ntraining {cfg.train.model} for {cfg.train.steps} steps on {root}/export ...", flush=True)
    result = launch(cfg.train, plan(cfg.train, str(root)))
    print(format_result(result))
    from model.registry import kind_of

    if cfg.regions is not None and result.get("checkpoint") and kind_of(cfg.train.model) == "caft":
        from .evalpairs import evaluate, format_report
        from .rescore import rescore_with_caft
        from .rundir import RunDir

        run = RunDir(root)
        n = rescore_with_caft(cfg, run, result["checkpoint"], run.plan(cfg))
        print(f"\nregions rescored with the trained {cfg.train.model}: {n} pairs kept (regions-caft/)")
        if cfg.input.synthetic is not None:
            print(format_report(evaluate(str(root))))
    return 0


def cmd_status(args) -> int:
    from .rundir import RunDir
    from .status import format_status, run_status

    st = run_status(RunDir(args.run), full=args.full)
    print(json.dumps(st, indent=2) if args.json else format_status(st))
    return 0 if st["accounted"] else EXIT_FAILED


def cmd_synth(args) -> int:
    from pipeline.synthetic import write_world

    info = write_world(args.out, args.families, args.variants, args.size, args.seed, not args.no_broken)
    print(json.dumps(info))
    return 0


def cmd_import(args) -> int:
    import yaml

    from pipeline.importers import import_corpus, write_url_list

    table = import_corpus(args.format, args.src, args.url_col, _split_csv(args.caption_cols) or [])
    snippet = write_url_list(table, args.out)
    print(f"# {table.num_rows} rows written to {args.out}; use these config sections:")
    print(yaml.safe_dump(snippet, sort_keys=False), end="")
    return 0


def cmd_eval_pairs(args) -> int:
    from .evalpairs import evaluate, format_report

    rep = evaluate(args.run, args.min_iou, args.ablations)
    print(json.dumps(rep, indent=2) if args.json else format_report(rep))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longcap", description="long-caption datasets and hierarchical VLM training")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("config", help="print the resolved config (--reference: every key, generated)")
    c.add_argument("config", nargs="?")
    c.add_argument("--reference", action="store_true", help="print the configuration reference (CONFIG.md)")
    c.add_argument("overrides", nargs="*", help="dotted.key=value")
    c.set_defaults(fn=cmd_config)

    r = sub.add_parser("run", help="run (or resume) the pipeline")
    r.add_argument("config", help="config YAML, or a run directory to resume")
    r.add_argument("overrides", nargs="*", help="dotted.key=value")
    r.add_argument("--stages", help="comma-separated subset of: download,dedup,captions,sentences,regions,export,train")
    r.add_argument("--shards", help="comma-separated shard ids, e.g. 00003,00007")
    r.add_argument("--force", action="store_true", help="continue a run whose config changed")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(fn=cmd_run)

    s = sub.add_parser("status", help="per-stage progress and the accounting of every input URL")
    s.add_argument("run")
    s.add_argument("--json", action="store_true")
    s.add_argument("--full", action="store_true",
                   help="count from every shard's files, not the progress summaries (slow on large runs)")
    s.set_defaults(fn=cmd_status)

    y = sub.add_parser("synth", help="write a synthetic world (images, urls.parquet, truth.parquet)")
    y.add_argument("out")
    y.add_argument("--families", type=int, default=12)
    y.add_argument("--variants", type=int, default=3)
    y.add_argument("--size", type=int, default=256)
    y.add_argument("--seed", type=int, default=0)
    y.add_argument("--no-broken", action="store_true", help="leave out the deliberately broken URLs")
    y.set_defaults(fn=cmd_synth)

    m = sub.add_parser("import", help="turn an existing recaptioned corpus into a URL list with source captions")
    m.add_argument("format", choices=["dreamlip", "sharegpt4v", "pixelprose", "generic"])
    m.add_argument("src", help="the corpus file (CSV, JSON, JSON lines or parquet)")
    m.add_argument("out", help="the URL list to write (parquet)")
    m.add_argument("--url-col", default="url", help="generic: the URL column")
    m.add_argument("--caption-cols", help="generic: comma-separated caption columns")
    m.set_defaults(fn=cmd_import)
    e = sub.add_parser("eval-pairs", help="synthetic runs: detector mAP50 and local-pair precision/recall vs truth")
    e.add_argument("run")
    e.add_argument("--min-iou", type=float, default=0.5, help="IoU with the truth box for a pair to be right")
    e.add_argument("--json", action="store_true")
    e.add_argument("--ablations", action="store_true",
                   help="also rescore the run's regions with label-aware scores off, and with the best region for "
                        "every kind (the rule before sentence kinds)")
    e.set_defaults(fn=cmd_eval_pairs)

    from . import evalcmd, model_cli, report, selftrain
    model_cli.add_commands(sub)
    selftrain.add_commands(sub)
    evalcmd.add_commands(sub)
    report.add_commands(sub)  # report, ground
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("LONGCAP_LOG", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, InputError) as e:
        print(f"longcap: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except FileNotFoundError as e:
        print(f"longcap: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except ValueError as e:  # bad checkpoints, model names, shard lists: named, without a traceback
        if type(e).__name__ not in ("CheckpointError", "TrainConfigError", "DatasetError"):
            raise
        print(f"longcap: {e}", file=sys.stderr)
        return EXIT_CONFIG


READ_ONLY = ("status", "config", "model-info")


def entry() -> None:
    """The `longcap` program. Read-only commands leave with os._exit once their output is flushed: at
    interpreter teardown a native thread pool (pyarrow's, after `status --full` read every shard) was seen to
    abort the process with 'terminate called without an active exception' (exit 134) in about 4 of 10 parallel
    runs. Commands that start Ray or write a run exit normally, so their atexit handlers run."""
    rc = main()
    if len(sys.argv) > 1 and sys.argv[1] in READ_ONLY:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc if isinstance(rc, int) else 1)
    sys.exit(rc)


if __name__ == "__main__":
    entry()
