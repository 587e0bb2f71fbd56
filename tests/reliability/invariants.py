"""The invariants every reliability scenario checks on a run directory."""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from workflows.rundir import RunDir
from workflows.status import run_status

ROW_KEYS = {"captions": ("key", "captioner", "prompt_id"), "sentences": ("key", "captioner", "prompt_id"),
            "regions": ("key",), "regions-caft": ("key",), "export": ("key",), "images": ("key",)}
# Left out of content hashes (the rest must be identical): columns that measure time, and the plan's list of
# input files (absolute paths: the synthetic world lives in the run directory).
VOLATILE = {"captions": {"latency_s"}, "plan.json": {"sources"}}


def accounted(run_dir: Path, total: int) -> dict:
    """`longcap status`: 100% of the input URLs accounted for (ok + each failure reason = total)."""
    st = run_status(RunDir(str(run_dir)))
    assert st["urls"] == total, f"the plan has {st['urls']} URLs, the input {total}"
    assert sum(st["accounting"].values()) == total and st["accounted"], st["accounting"]
    return st


def _dupes(values) -> list:
    return [v for v, n in Counter(values).items() if n > 1]


def no_duplicates_and_nothing_lost(run_dir: Path) -> dict:
    """Per shard: every stage's output has each row id once and exactly the keys the download saw;
    export tars hold each key once, and index.parquet is exactly the exported keys. Returns rows per stage."""
    rows = Counter()
    images = Path(RunDir(str(run_dir)).images())  # this run's, or the earlier run's with input.images_from
    for f in sorted(images.glob("*.parquet")):
        keys = pq.read_table(f, columns=["key"])["key"].to_pylist()
        assert not _dupes(keys), f"duplicate keys in {f}: {_dupes(keys)}"
        rows["images"] += len(keys)
        for stage, cols in ROW_KEYS.items():
            out = run_dir / stage / f.name
            if stage == "images" or not out.exists():
                continue
            t = pq.read_table(out, columns=list(cols)).to_pylist()
            ids = [tuple(r[c] for c in cols) for r in t]
            assert not _dupes(ids), f"duplicate rows in {out}: {_dupes(ids)[:5]}"
            assert sorted({r["key"] for r in t}) == sorted(keys), f"{out} lost or invented keys"
            rows[stage] += len(t)
    members = [m for tar in sorted((run_dir / "export").glob("*.tar")) for m in tar_members(tar)]
    assert not _dupes(members), f"duplicate export members: {_dupes(members)[:5]}"
    exported = sorted(r["key"] for f in sorted((run_dir / "export").glob("[0-9]*.parquet"))
                      for r in pq.read_table(f, columns=["key", "exported"]).to_pylist() if r["exported"])
    assert sorted(m.split(".", 1)[0] for m in members if m.endswith(".json")) == exported
    index = run_dir / "export" / "index.parquet"
    if index.exists():
        assert pq.read_table(index, columns=["key"])["key"].to_pylist() == exported
    rows["exported"] = len(exported)
    return dict(rows)


def tar_members(path: Path) -> list[str]:
    with tarfile.open(path) as tf:
        return tf.getnames()


def content_hashes(run_dir: Path) -> dict[str, str]:
    """sha256 of every stage output's content: parquet rows sorted by their id (time columns left out),
    each tar member, other files (plan.json without its input paths). Not hashed: run.yaml (holds run.dir), manifest.json,
    progress/ (bookkeeping, like the manifest) and img2dataset's
    *_stats.json (timings), the synthetic world (the input)."""
    out = {}
    for f in sorted(run_dir.rglob("*")):
        rel = f.relative_to(run_dir).as_posix()
        if not f.is_file() or rel.startswith(("synth/", "models/", "progress/")) or f.name.endswith("_stats.json") \
                or rel in ("run.yaml", "manifest.json"):
            continue
        h = hashlib.sha256()
        if f.suffix == ".parquet":
            t = pq.read_table(f)
            t = t.drop_columns([c for c in VOLATILE.get(f.parent.name, ()) if c in t.column_names])
            cols = [c for c in ROW_KEYS.get(f.parent.name, ("key",)) if c in t.column_names]
            recs = t.to_pylist()
            recs.sort(key=lambda r: tuple(str(r[c]) for c in cols))
            h.update(json.dumps(recs, sort_keys=True, default=str).encode())
        elif f.suffix == ".tar":
            with tarfile.open(f) as tf:
                for m in sorted(tf.getmembers(), key=lambda m: m.name):
                    h.update(m.name.encode() + b"\0" + tf.extractfile(m).read())
        elif f.name in VOLATILE:
            doc = json.loads(f.read_text())
            h.update(json.dumps({k: v for k, v in doc.items() if k not in VOLATILE[f.name]}, sort_keys=True).encode())
        else:
            h.update(f.read_bytes())
        out[rel] = h.hexdigest()
    return out
