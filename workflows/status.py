"""`longcap status`: what every stage did, and the fate of 100% of the input URLs, from the files."""

from __future__ import annotations

import json
from collections import Counter

import fsspec
import pyarrow as pa

from pipeline.download import read_images_meta, shard_name
from pipeline.records import OK, download_reason
from pipeline.storage import exists, read_table
from .rundir import STAGE_DIRS, RunDir
from .stages import ORDER


def run_status(run: RunDir) -> dict:
    plan_file = run.images("_shards", "plan.json")
    if not exists(plan_file):
        raise FileNotFoundError(f"{run.root} is not a started run (no images/_shards/plan.json)")
    manifest = run.load_manifest()
    with fsspec.open(plan_file, "r") as f:
        plan = json.load(f)
    shards = list(range(plan["shards"]))
    urls = Counter()
    stages = {}
    snapshot = run.load_snapshot() or {}
    for stage in ORDER:
        if stage == "regions" and not snapshot.get("regions"):
            continue  # not configured for this run
        info = {"shards_done": 0, "shards_failed": 0, "shards_pending": 0, "rows": Counter(), "failed": {}}
        entries = manifest.get("stages", {}).get(stage, {}).get("shards", {})
        for shard in shards:
            name = shard_name(shard)
            if run.is_done(stage, shard):
                info["shards_done"] += 1
                try:
                    info["rows"].update(_reasons(run, stage, shard))
                except (OSError, pa.ArrowException) as e:
                    info["rows"]["unreadable output"] += 1
                    info["failed"][name] = f"cannot read {run.output(stage, shard)}: {e}"
            elif entries.get(name, {}).get("status") == "failed":
                info["shards_failed"] += 1
                info["failed"][name] = entries[name].get("error", "")
            else:
                info["shards_pending"] += 1
            if stage == "download":
                urls.update(_url_outcomes(run, shard, entries.get(name, {})))
        info["rows"] = dict(sorted(info["rows"].items()))
        stages[STAGE_DIRS[stage]] = info
    total = plan["rows"]
    return {"run": run.root, "shards": len(shards), "urls": total,
            "accounting": dict(sorted(urls.items(), key=lambda kv: (kv[0] != OK, -kv[1], kv[0]))),
            "accounted": sum(urls.values()) == total, "stages": stages}


def _url_outcomes(run: RunDir, shard: int, entry: dict) -> Counter:
    n = run.shard_rows(shard).num_rows
    if run.is_done("download", shard):
        try:
            return _download_reasons(run, shard)
        except (OSError, pa.ArrowException):
            return Counter({"unreadable_output": n})
    return Counter({"shard_failed" if entry.get("status") == "failed" else "not_downloaded_yet": n})


def _download_reasons(run: RunDir, shard: int) -> Counter:
    meta = read_images_meta(run.images(), shard, columns=["status", "error_message"])
    return Counter(download_reason(s, e) for s, e in zip(meta["status"].to_pylist(), meta["error_message"].to_pylist()))


def _reasons(run: RunDir, stage: str, shard: int) -> Counter:
    if stage == "download":
        return _download_reasons(run, shard)
    t = read_table(run.output(stage, shard))
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
    lines.append("  input URLs by outcome:")
    for reason, n in st["accounting"].items():
        lines.append(f"      {reason:<40} {n}")
    total = sum(st["accounting"].values())
    mark = "all accounted for" if st["accounted"] else "MISMATCH"
    lines.append(f"      {'total':<40} {total} of {st['urls']} ({mark})")
    return "\n".join(lines)
