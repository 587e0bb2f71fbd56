"""`longcap status`: what every stage did, and the fate of 100% of the input URLs.

Fast at any size: per stage it reads the summary the runner keeps (progress/<stage>.json) and one listing of
the stage folder; only outputs the summary does not know are read (workflows/progress.py). `--full` reads
every shard's files instead.
"""

from __future__ import annotations

import json
from collections import Counter

import fsspec
import numpy as np
import pyarrow as pa

from pipeline.download import read_images_meta, shard_name
from pipeline.records import OK, download_reason
from pipeline.storage import exists, read_table
from . import progress
from .rundir import STAGE_DIRS, RunDir
from .stages import ORDER


def read_plan(run: RunDir) -> dict:
    plan_file = run.images("_shards", "plan.json")
    if not exists(plan_file):
        raise FileNotFoundError(f"{run.root} is not a started run (no images/_shards/plan.json)")
    with fsspec.open(plan_file, "r") as f:
        return json.load(f)


def status_stages(run: RunDir) -> list[str]:
    snapshot = run.load_snapshot() or {}
    return [s for s in ORDER if s not in ("regions", "dedup") or snapshot.get(s)]  # regions, dedup: when configured


def reconcile(run: RunDir, stage: str, shards: int, full: bool = False,
              manifest: dict | None = None) -> tuple[progress.StageSummary, bool]:
    """The stage's summary made to agree with the files: (summary, changed)."""
    summary = progress.StageSummary(stage, shards) if full else progress.load(run.progress(stage), stage, shards)
    listed = np.zeros(shards, bool)
    committed = [s for s in run.committed(stage) if s < shards]
    listed[committed] = True
    known = np.unpackbits(np.frombuffer(bytes(summary.done), np.uint8), bitorder="little")[:shards].astype(bool)
    changed = False
    if summary.dirty or (known & ~listed).any():  # counts of files that are gone: start again from the files
        summary, known, changed = progress.StageSummary(stage, shards), np.zeros(shards, bool), True
    if manifest is not None and not summary.failed:  # runs from before progress/ existed: failures in the manifest
        for name, e in manifest.get("stages", {}).get(stage, {}).get("shards", {}).items():
            if e.get("status") == "failed":
                summary.fail(name, e.get("error", ""))
    for shard in np.flatnonzero(listed & ~known):
        name = shard_name(int(shard))
        rows, urls, error = stage_counts(run, stage, int(shard))
        summary.add(int(shard), name, rows, urls)
        if error:
            summary.fail(name, error)
        changed = True
    return summary, changed


def stage_counts(run: RunDir, stage: str, shard: int) -> tuple[Counter, Counter | None, str | None]:
    """(rows by outcome, input URLs by outcome for the download stage, error) of one committed shard, from its
    files; an unreadable output counts as one "unreadable output" row, its URLs as unreadable_output."""
    try:
        rows = _reasons(run, stage, shard)
    except (OSError, pa.ArrowException) as e:
        n = _shard_size(run, shard)
        return (Counter({"unreadable output": 1}), Counter({"unreadable_output": n}) if stage == "download" else None,
                f"cannot read {run.output(stage, shard)}: {e}")
    return rows, (rows if stage == "download" else None), None


def run_status(run: RunDir, full: bool = False) -> dict:
    plan = read_plan(run)
    n = plan["shards"]
    manifest = run.load_manifest() if full or not exists(run.progress("download")) else None
    urls = Counter()
    stages = {}
    for stage in status_stages(run):
        summary, _ = reconcile(run, stage, n, full, manifest)
        done = summary.n_done()
        failed = {k: v for k, v in sorted(summary.failed.items()) if not summary.is_done(int(k))}
        stages[STAGE_DIRS[stage]] = {"shards_done": done, "shards_failed": len(failed),
                                     "shards_pending": n - done - len(failed),
                                     "rows": dict(sorted(summary.rows.items())),
                                     "failed": dict(sorted(summary.failed.items()))}  # + unreadable outputs
        if stage == "download":
            urls.update(summary.urls)
            sizes = _sizes(plan, run)
            for shard in range(n):
                if not summary.is_done(shard):
                    urls["shard_failed" if shard_name(shard) in failed else "not_downloaded_yet"] += sizes(shard)
    total = plan["rows"]
    out = {"run": run.root, "shards": n, "urls": total,
           "accounting": dict(sorted(urls.items(), key=lambda kv: (kv[0] != OK, -kv[1], kv[0]))),
           "accounted": sum(urls.values()) == total, "stages": stages}
    if "dedup" in stages:
        out["dedup"] = dedup_counts(stages["dedup"]["rows"])
    if exists(run.repeated_captions()):
        with fsspec.open(run.repeated_captions(), "r") as f:
            doc = json.load(f)
        out["repeated_captions"] = {k: doc[k] for k in ("min_images", "texts", "images")}
    return out


def dedup_counts(rows: dict) -> dict:
    """The dedup stage's rows by outcome -> kept, duplicates by reason, contaminated per evaluation set."""
    dup = {k.split(": ", 1)[1]: v for k, v in rows.items() if k.startswith("duplicate: ")}
    cont = {k.split(": ", 1)[1]: v for k, v in rows.items() if k.startswith("contaminated: ")}
    return {"kept": rows.get("kept", 0), "duplicates": dict(sorted(dup.items())), "contaminated": dict(sorted(cont.items())),
            "no_image": sum(v for k, v in rows.items() if k.endswith(": no image"))}


def _sizes(plan: dict, run: RunDir):
    """Rows of a shard's input: shard_size each, the last one the rest (pipeline.download.plan_shards)."""
    n, rows, size = plan["shards"], plan["rows"], plan.get("shard_size")
    if not size:
        return lambda shard: run.shard_rows(shard).num_rows
    return lambda shard: size if shard < n - 1 else rows - size * (n - 1)


def _shard_size(run: RunDir, shard: int) -> int:
    try:
        return _sizes(read_plan(run), run)(shard)
    except (OSError, ValueError, KeyError):
        return 0


def _download_reasons(run: RunDir, shard: int) -> Counter:
    meta = read_images_meta(run.images(), shard, columns=["status", "error_message"])
    return Counter(download_reason(s, e) for s, e in zip(meta["status"].to_pylist(), meta["error_message"].to_pylist()))


def _reasons(run: RunDir, stage: str, shard: int) -> Counter:
    if stage == "download":
        return _download_reasons(run, shard)
    t = read_table(run.output(stage, shard))
    if "duplicate_of" in t.column_names:
        from pipeline.dedup_stage import outcome

        return Counter(outcome(r) for r in t.select(["status", "kept", "reason"]).to_pylist())
    if "exported" in t.column_names:
        return Counter(OK if ok else "not exported: " + "; ".join(r.split(":")[0] for r in why)
                       for ok, why in zip(t["exported"].to_pylist(), t["reasons"].to_pylist()))
    excluded = t["exclude_reasons"].to_pylist() if "exclude_reasons" in t.column_names else [None] * t.num_rows
    out = Counter()
    for s, e, ex in zip(t["status"].to_pylist(), t["error"].to_pylist(), excluded):
        if s != OK:
            out[f"{s}: {(e or '').split(':')[0]}"] += 1
        else:
            out[f"ok, excluded from export ({', '.join(ex)})" if ex else OK] += 1
    return out


def format_status(st: dict) -> str:
    lines = [f"run {st['run']}: {st['shards']} shard(s), {st['urls']} input URL(s)"]
    for stage, info in st["stages"].items():
        lines.append(f"  {stage:<10} shards done {info['shards_done']}, failed {info['shards_failed']}, "
                     f"pending {info['shards_pending']}")
        for reason, n in info["rows"].items():
            lines.append(f"      {reason:<40} {n}")
        for name, err in info["failed"].items():
            lines.append(f"      shard {name} FAILED: {err[:200]}")
    if "dedup" in st:
        d = st["dedup"]
        lines.append(f"  duplicates and contamination: {d['kept']} kept, {sum(d['duplicates'].values())} duplicate(s)"
                     + "".join(f", {n} {why}" for why, n in d["duplicates"].items())
                     + f"; {sum(d['contaminated'].values())} contaminated"
                     + "".join(f", {n} by {name}" for name, n in d["contaminated"].items()))
    if "repeated_captions" in st:
        r = st["repeated_captions"]
        lines.append(f"  repeated captions: {r['texts']} text(s) on {r['min_images']}+ exported images each "
                     f"({r['images']} images; export/repeated_captions.json)")
    lines.append("  input URLs by outcome:")
    for reason, n in st["accounting"].items():
        lines.append(f"      {reason:<40} {n}")
    total = sum(st["accounting"].values())
    mark = "all accounted for" if st["accounted"] else "MISMATCH"
    lines.append(f"      {'total':<40} {total} of {st['urls']} ({mark})")
    return "\n".join(lines)
