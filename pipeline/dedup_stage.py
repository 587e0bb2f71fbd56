"""The dedup stage: duplicates across all shards and contamination by evaluation sets, as per-key rows.

Three steps, each committed atomically (pipeline/storage.py), so a run killed anywhere resumes where it was:

1. per shard (`hash_shard`): dedup/_hashes/<shard>.parquet: every key with its normalised URL, img2dataset's
   sha256 of the downloaded bytes and the pHashes of the image, its mirror and its crop windows
   (pipeline/dedup.py, from a grey thumbnail decoded at a reduced scale);
2. global, once every shard is hashed: evaluation sets hashed (dedup/_evalsets/<name>.parquet, cached),
   exact groups (same normalised URL, same bytes), near-duplicate candidates by LSH over pHashes (training
   against training, training against every evaluation set; `candidates`), candidate pairs verified on colour
   thumbnails in chunks (dedup/_verified/<chunk>.parquet: a killed pass keeps its verified chunks; `verify_chunk`,
   the unit the runner spreads over Ray tasks), then the groups (`assign` -> dedup/_groups.parquet);
3. per shard (`shard_rows`): dedup/<shard>.parquet from the groups: the stage's output, one row per key.

Deterministic: candidates come from seeded LSH tables, chunks are slices of the sorted candidate list, and in
every group the key first in key order is kept; the others get `duplicate_of` and a reason. A training image that
is a verified near duplicate of an evaluation image is excluded as `contaminated: <set>` whatever its group.
Pure functions over tables and paths: no Ray (workflows/stages.py and runner.py run them).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
from PIL import Image

from . import dedup
from .images import decode_grey, decode_image
from .records import DEDUP, OK, SKIPPED, download_reason, table

HASHES = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("shard", pa.int32()),
    pa.field("url", pa.string()),
    pa.field("url_norm", pa.string()),
    pa.field("sha256", pa.string()),
    pa.field("phash", pa.int64()),
    pa.field("phash_mirror", pa.int64()),
    pa.field("phash_crops", pa.list_(pa.int64())),  # pHashes of the crop windows (dedup.WINDOWS)
    pa.field("status", pa.string()),  # ok, or the download reason / "unreadable image"
])

EVAL_HASHES = pa.schema([
    pa.field("id", pa.string()),  # the image's path relative to the set's root
    pa.field("path", pa.string()),
    pa.field("phash", pa.int64()),
    pa.field("phash_mirror", pa.int64()),
    pa.field("phash_crops", pa.list_(pa.int64())),
    pa.field("error", pa.string()),
])

CANDIDATES = pa.schema([  # a: a training key; b: a training key after it, or "<set>/<id>" of an evaluation image
    pa.field("a", pa.string()),
    pa.field("b", pa.string()),
    pa.field("evalset", pa.string()),  # null: training pair
    pa.field("distance", pa.int32()),
])

VERIFIED = pa.schema([*CANDIDATES, pa.field("duplicate", pa.bool_())])

GROUPS = pa.schema([f for f in DEDUP if f.name in ("key", "duplicate_of", "reason", "distance")])

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def params_of(cfg) -> dedup.NearParams:
    """dedup.NearParams from the config's dedup section."""
    return dedup.NearParams(max_distance=cfg.max_distance, max_mean=cfg.max_mean, max_local=cfg.max_local,
                            max_ratio=cfg.max_ratio, ratio_floor=cfg.ratio_floor, blur=cfg.blur, window=cfg.window,
                            thumb=cfg.thumb)


def _decode(data: bytes) -> Image.Image:
    img = decode_image(data)
    if max(img.size) > 512:  # verification looks at <= thumb (<= 512) px a side
        img.thumbnail((512, 512), Image.BILINEAR)
    return img


# ---------------------------------------------------------------- 1. per shard

def hash_shard(shard: int, images_meta: pa.Table, images_tar: str) -> pa.Table:
    """Every key of a downloaded shard with its exact keys and pHashes (null for keys without an image)."""
    from .export import image_members

    meta = images_meta.select(["key", "url", "status", "error_message", "sha256"]).to_pylist()
    wanted = {m["key"] for m in meta if download_reason(m["status"], m["error_message"]) == OK}
    hashes, bad = {}, {}
    for key, files in image_members(images_tar) if wanted else ():
        if key not in wanted:
            continue
        data = next((files[e] for e in files if e not in ("json", "txt")), None)
        try:
            hashes[key] = dedup.phashes(decode_grey(data, dedup.BASE))
        except Exception as e:  # noqa: BLE001 - recorded per key
            bad[key] = f"unreadable image: {type(e).__name__}"
    rows = []
    for m in sorted(meta, key=lambda m: m["key"]):
        reason = download_reason(m["status"], m["error_message"])
        h = hashes.get(m["key"])
        status = OK if h else (bad.get(m["key"]) or ("unreadable image: missing from tar" if reason == OK else reason))
        rows.append({"key": m["key"], "shard": shard, "url": m["url"], "url_norm": dedup.normalise_url(m["url"] or ""),
                     "sha256": m["sha256"] if h else None, "phash": h[0] if h else None,
                     "phash_mirror": h[1] if h else None, "phash_crops": h[2] if h else None, "status": status})
    return table(rows, HASHES)


# ---------------------------------------------------------------- evaluation sets

def resolve_path(path: str, run_root: str) -> str:
    """An evaluation set's path: absolute as given, a relative one inside the run directory."""
    return path if Path(path).is_absolute() or "://" in path else f"{run_root}/{path}"


def evalset_images(root: str, kind: str, split: str | None = None) -> list[tuple[str, str]]:
    """(id, path) of every image of an evaluation set copy; id is the path relative to root. A 'folder' may be
    any fsspec URL (an s3:// run keeps its own folder there); the readers' layouts are local copies."""
    if kind == "folder":
        fs, base = fsspec.core.url_to_fs(root)
        if not fs.isdir(base):
            raise FileNotFoundError(f"evaluation image folder {root} does not exist")
        found = sorted(p for p in fs.find(base) if Path(p).suffix.lower() in IMAGE_SUFFIXES)
        local = "file" in fs.protocol
        return [(p[len(base):].lstrip("/"), p if local else fs.unstrip_protocol(p)) for p in found]
    if "://" in root:
        raise ValueError(f"evaluation set {root} ({kind}): the {kind} reader reads a local copy; give a local path "
                         f"(or kind: folder for a plain folder of images on object storage)")
    from model import evalsets

    base = Path(root)
    if kind in evalsets.REFER_SETS:
        paths = sorted({Path(it.image) for it in evalsets.read_refer(root, kind, split or "val")})
    else:
        paths = sorted({Path(p) for p in evalsets.retrieval_set(kind, root, split).images})
    out = []
    for p in paths:
        try:
            ident = str(p.relative_to(base))
        except ValueError:
            ident = str(p)
        out.append((ident, str(p)))
    return out


def hash_evalset(items: list[tuple[str, str]]) -> pa.Table:
    rows = []
    for ident, path in items:
        row = {"id": ident, "path": path, "phash": None, "phash_mirror": None, "phash_crops": None, "error": None}
        try:
            with fsspec.open(path, "rb") as f:
                row["phash"], row["phash_mirror"], row["phash_crops"] = dedup.phashes(decode_grey(f.read(), dedup.BASE))
        except Exception as e:  # noqa: BLE001 - an unreadable evaluation image is reported, not fatal
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
    return table(rows, EVAL_HASHES)


# ---------------------------------------------------------------- 2. global

class _Groups:
    """Union-find whose root is always the smallest key."""

    def __init__(self):
        self.parent: dict[str, str] = {}

    def root(self, k: str) -> str:
        while self.parent.get(k, k) != k:
            self.parent[k] = self.parent.get(self.parent[k], self.parent[k])
            k = self.parent[k]
        return k

    def union(self, a: str, b: str) -> None:
        ra, rb = self.root(a), self.root(b)
        if ra != rb:
            lo, hi = sorted((ra, rb))
            self.parent[hi] = lo


def exact_groups(hashes: pa.Table, cfg) -> _Groups:
    """Keys with an image joined by the same normalised URL and the same bytes."""
    g = _Groups()
    rows = hashes.filter(pa.compute.equal(hashes["status"], OK)).select(["key", "url_norm", "sha256"]).to_pylist()
    for col, on in (("url_norm", cfg.url), ("sha256", cfg.bytes)):
        if not on:
            continue
        first: dict[str, str] = {}
        for r in sorted(rows, key=lambda r: r["key"]):
            v = r[col]
            if v:
                g.union(first.setdefault(v, r["key"]), r["key"])
    return g


def _probes(t: pa.Table) -> np.ndarray:
    """(rows, 2 + windows) int64: pHash, mirror pHash and crop-window pHashes of every row of a hashes table."""
    crops = t["phash_crops"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return np.column_stack([t["phash"].to_numpy(zero_copy_only=False), t["phash_mirror"].to_numpy(zero_copy_only=False),
                            np.asarray(crops, dtype=np.int64).reshape(t.num_rows, -1)]).astype(np.int64)


def candidates(hashes: pa.Table, evals: dict[str, pa.Table], cfg, seed: int = 0) -> pa.Table:
    """Near-duplicate candidate pairs, sorted: pairs of training keys, and (training key, evaluation image) pairs
    for every set, whose pHashes lie within max_distance bits (one image's hash, mirror hash or a crop window's
    hash against the other's hash; dedup.near_pairs). Only the first key of each exact group (same normalised
    URL or bytes) takes part: its group follows it."""
    ok = hashes.filter(pa.compute.equal(hashes["status"], OK)).sort_by("key")
    g = exact_groups(hashes, cfg)
    ok = ok.filter(pa.array([g.root(k) == k for k in ok["key"].to_pylist()], pa.bool_()))
    keys = ok["key"].to_pylist()
    probes = _probes(ok)
    rows = []
    if keys and cfg.near:
        for i, j, d in dedup.near_pairs(probes[:, 0], probes, cfg.max_distance, self_join=True, seed=seed):
            rows.append({"a": keys[i], "b": keys[j], "evalset": None, "distance": int(d)})
    for name in sorted(evals):
        ev = evals[name].filter(pa.compute.is_valid(evals[name]["phash"]))
        if not keys or not ev.num_rows:
            continue
        eprobes = _probes(ev)
        ids = ev["id"].to_pylist()
        best: dict[tuple[int, int], int] = {}  # (training row, evaluation row) -> distance; crops either way
        for q, j, d in dedup.near_pairs(eprobes[:, 0], probes, cfg.max_distance, self_join=False, seed=seed):
            best[q, j] = int(d)
        for j, q, d in dedup.near_pairs(probes[:, 0], eprobes, cfg.max_distance, self_join=False, seed=seed):
            best[q, j] = min(int(d), best.get((q, j), 64))
        rows += [{"a": keys[q], "b": f"{name}/{ids[j]}", "evalset": name, "distance": d} for (q, j), d in best.items()]
    rows.sort(key=lambda r: (r["a"], r["evalset"] or "", r["b"]))
    return table(rows, CANDIDATES)


def chunks(n_pairs: int, size: int) -> list[tuple[int, int]]:
    """[start, end) of each verification chunk of a candidate list."""
    return [(i, min(i + size, n_pairs)) for i in range(0, n_pairs, size)]


class ImageSource:
    """Decoded images of training keys (from their shard's tar) and evaluation images (from their path)."""

    def __init__(self, tar_of_shard, eval_paths: dict[str, str]):
        self.tar_of_shard, self.eval_paths = tar_of_shard, eval_paths

    def load(self, refs: set[str], shard_of: dict[str, int]) -> dict[str, Image.Image]:
        from .export import image_members

        out = {}
        by_shard = defaultdict(set)
        for r in refs:
            if r in shard_of:
                by_shard[shard_of[r]].add(r)
            else:
                with fsspec.open(self.eval_paths[r], "rb") as f:
                    out[r] = _decode(f.read())
        for shard, keys in sorted(by_shard.items()):
            for key, files in image_members(self.tar_of_shard(shard)):
                if key in keys:
                    out[key] = _decode(next(files[e] for e in files if e not in ("json", "txt")))
        return out


def verify_chunk(pairs: pa.Table, source: ImageSource, shard_of: dict[str, int], params: dedup.NearParams) -> pa.Table:
    """The candidate pairs of one chunk with `duplicate`: whether the colour thumbnails agree."""
    rows = pairs.to_pylist()
    images = source.load({r[c] for r in rows for c in ("a", "b")}, shard_of)
    dup = [bool(r["a"] in images and r["b"] in images and dedup.is_near_duplicate(images[r["a"]], images[r["b"]], params))
           for r in rows]
    return pairs.append_column("duplicate", pa.array(dup, pa.bool_())).cast(VERIFIED)


def _distance(a: dict, b: dict) -> int:
    """What the candidate search measures between two hashes rows: one's hash, mirror or window hashes against
    the other's hash, either way."""
    def probes(r):
        return np.array([r["phash"], r["phash_mirror"], *(r["phash_crops"] or [])], dtype=np.int64)

    return int(min(dedup.hamming(probes(a), b["phash"]).min(), dedup.hamming(probes(b), a["phash"]).min()))


def assign(hashes: pa.Table, verified: pa.Table, cfg) -> pa.Table:
    """Every key that is not kept: duplicate_of (the first key of its group, or the evaluation image) and why."""
    ok = hashes.filter(pa.compute.equal(hashes["status"], OK)).select(["key", "url_norm", "sha256", "phash", "phash_mirror", "phash_crops"])
    info = {r["key"]: r for r in ok.to_pylist()}
    g, exact = exact_groups(hashes, cfg), exact_groups(hashes, cfg)
    contaminated: dict[str, dict] = {}
    for r in verified.filter(pa.compute.field("duplicate")).to_pylist():
        if r["evalset"] is None:
            g.union(r["a"], r["b"])
        else:
            best = contaminated.get(r["a"])
            if best is None or (r["distance"], r["evalset"], r["b"]) < (best["distance"], best["evalset"], best["b"]):
                contaminated[r["a"]] = r
    rows = []
    for key in sorted(info):
        c = contaminated.get(key) or contaminated.get(exact.root(key))  # an exact copy of a contaminated key is one too
        if c is not None:
            rows.append({"key": key, "duplicate_of": c["b"], "reason": f"contaminated: {c['evalset']}",
                         "distance": c["distance"]})
            continue
        root = g.root(key)
        if root == key:
            continue
        a, b = info[key], info[root]
        d = _distance(a, b)
        if cfg.url and a["url_norm"] == b["url_norm"]:
            reason = "same url"
        elif cfg.bytes and a["sha256"] and a["sha256"] == b["sha256"]:
            reason = "same bytes"
        else:
            reason = f"near duplicate (phash d={d})"
        rows.append({"key": key, "duplicate_of": root, "reason": reason, "distance": d})
    return table(rows, GROUPS)


# ---------------------------------------------------------------- 3. per shard

def shard_rows(hashes: pa.Table, groups: pa.Table) -> pa.Table:
    """dedup/<shard>.parquet: every key of the shard, kept or not and why (groups: the global result)."""
    gone = {r["key"]: r for r in groups.to_pylist()}
    rows = []
    for r in hashes.sort_by("key").to_pylist():
        g = gone.get(r["key"])
        ok = r["status"] == OK
        rows.append({"key": r["key"], "url": r["url"], "sha256": r["sha256"], "phash": r["phash"],
                     "kept": ok and g is None, "duplicate_of": g and g["duplicate_of"], "reason": g and g["reason"],
                     "distance": g and g["distance"], "status": OK if ok else SKIPPED,
                     "error": None if ok else f"no image ({r['status']})"})
    return table(rows, DEDUP)


def outcome(row: dict) -> str:
    """The status line of one dedup row: kept, duplicate: same url|same bytes|near duplicate, contaminated: <set>,
    skipped: no image."""
    if row["status"] != OK:
        return f"{row['status']}: no image"
    if row["kept"]:
        return "kept"
    reason = row["reason"] or ""
    return reason if reason.startswith("contaminated:") else f"duplicate: {reason.split(' (')[0]}"


def export_reason(row: dict) -> str | None:
    """Why export leaves a key out, from its dedup row (None: kept, or no image: export says so itself)."""
    if row["status"] != OK or row["kept"]:
        return None
    if (row["reason"] or "").startswith("contaminated:"):
        return f"{row['reason']} (near duplicate of {row['duplicate_of']}, phash d={row['distance']})"
    return f"duplicate: {row['reason']}, duplicate_of {row['duplicate_of']}"


def caption_digest(text: str) -> str:
    """A caption's identity for counting repeats: lower case, whitespace collapsed."""
    return hashlib.blake2b(" ".join((text or "").lower().split()).encode(), digest_size=8).hexdigest()
