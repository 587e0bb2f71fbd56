"""Export stage: training-ready webdataset shards (<key>.jpg + <key>.json + <key>.txt) and a per-key index.

<key>.txt is one caption in full (config export.txt, default the first captioner's first prompt; when that
caption was left out for a key, the longest kept one; the JSON's "txt" names which): what webdataset readers
that expect an image/text pair, such as open_clip's own trainer, read.

For each pipeline shard it writes export/<shard>-<part>.tar (parts cut at
`max_samples` samples or `max_bytes` bytes) and export/<shard>.parquet with a
row for every key of the shard: exported or not, and why not. index.parquet
(exported keys of all shards) is assembled from those when the stage is done.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter, defaultdict

import fsspec
import pyarrow as pa

from . import dedup_stage
from .records import EXPORT_INDEX, OK, download_reason, table
from .storage import tmp_name


def image_members(tar_path: str):
    """Yields (key, {ext: bytes}) from an img2dataset tar whose members are grouped by key."""
    with fsspec.open(tar_path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tf:
        key, files = None, {}
        for m in tf:
            if not m.isfile():
                continue
            k, _, ext = m.name.partition(".")
            if k != key and key is not None:
                yield key, files
                files = {}
            key = k
            files[ext] = tf.extractfile(m).read()
        if key is not None:
            yield key, files


def captions_by_key(sentences: pa.Table, min_sentences: int) -> tuple[dict, dict]:
    """Kept captions per key, and per key the reasons its other captions were left out."""
    kept, dropped = defaultdict(list), defaultdict(list)
    cols = ["key", "captioner", "prompt_id", "text", "sentences", "flags", "excluded", "exclude_reasons", "status", "error"]
    for r in sentences.select(cols).to_pylist():
        if r["status"] != OK:
            dropped[r["key"]].append(f"{r['captioner']}/{r['prompt_id']}: {r['status']}")
        elif r["excluded"]:
            dropped[r["key"]].append(f"{r['captioner']}/{r['prompt_id']}: {', '.join(r['exclude_reasons'])}")
        elif len(r["sentences"]) < min_sentences:
            dropped[r["key"]].append(f"{r['captioner']}/{r['prompt_id']}: fewer than {min_sentences} sentences")
        else:
            kept[r["key"]].append({"captioner": r["captioner"], "prompt_id": r["prompt_id"], "text": r["text"],
                                   "sentences": r["sentences"], "flags": r["flags"]})
    return kept, dropped


def pick_txt(captions: list[dict], name: str | None) -> dict:
    """The kept caption called `name` ('CAPTIONER/PROMPT'), else the longest kept one."""
    for c in captions:
        if f"{c['captioner']}/{c['prompt_id']}" == name:
            return c
    return max(captions, key=lambda c: len(c["text"]))


class TarParts:
    """Writes <prefix>-<part>.tar files, each committed by rename, cut at a sample or byte limit."""

    def __init__(self, prefix: str, max_samples: int, max_bytes: int):
        self.prefix, self.max_samples, self.max_bytes = prefix, max_samples, max_bytes
        self.part, self.count, self.size, self.tar, self.fobj, self.tmp = -1, 0, 0, None, None, None
        self.written: list[str] = []

    @property
    def name(self) -> str:
        return f"{self.prefix}-{self.part:03d}.tar"

    def add(self, key: str, files: dict[str, bytes]) -> str:
        size = sum(len(v) + 1024 for v in files.values())
        if self.tar is None or self.count >= self.max_samples or (self.count and self.size + size > self.max_bytes):
            self._next()
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            self.tar.addfile(info, io.BytesIO(data))
        self.count, self.size = self.count + 1, self.size + size
        return self.name.rsplit("/", 1)[-1]

    def _next(self) -> None:
        self.close()
        self.part, self.count, self.size = self.part + 1, 0, 0
        self.tmp = tmp_name(self.name)
        self.fobj = fsspec.open(self.tmp, "wb").open()
        self.tar = tarfile.open(fileobj=self.fobj, mode="w", format=tarfile.USTAR_FORMAT)

    def close(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        self.fobj.close()
        fs, p = fsspec.core.url_to_fs(self.tmp)
        fs.mv(p, fsspec.core.url_to_fs(self.name)[1])
        self.written.append(self.name)
        self.tar = None


def export_shard(shard_name: str, images_meta: pa.Table, images_tar: str, sentences: pa.Table,
                 out_dir: str, cfg, regions: pa.Table | None = None,
                 extra_cols: list[str] = (), txt_caption: str | None = None,
                 dedup: pa.Table | None = None) -> tuple[pa.Table, dict]:
    """Write the shard's export tars; returns its index (every key, exported or not) and a summary.
    `dedup`: the shard's dedup rows (pipeline/dedup_stage.py): duplicates and contaminated keys are left out.
    `extra_cols`: input columns carried into each sample's JSON under "extra" (e.g. the synthetic split).
    `txt_caption`: 'CAPTIONER/PROMPT' of the caption written as <key>.txt (None: the longest kept caption)."""
    extra_cols = [c for c in extra_cols if c in images_meta.column_names]
    extras = {r.pop("key"): r for r in images_meta.select(["key", *extra_cols]).to_pylist()}
    kept, dropped = captions_by_key(sentences, cfg.min_sentences)
    local = regions_by_key(regions)
    meta = {r["key"]: r for r in images_meta.select(
        ["key", "url", "status", "error_message", "width", "height", "original_width", "original_height"]).to_pylist()}
    gone = {} if dedup is None else {r["key"]: dedup_stage.export_reason(r) for r in dedup.to_pylist()}
    images = _Images(images_tar)
    parts = TarParts(f"{out_dir}/{shard_name}", cfg.max_samples, cfg.max_bytes)
    rows, reasons = [], Counter()
    try:
        for key in sorted(meta):
            m = meta[key]
            why = _exclusion(m, kept.get(key), dropped.get(key), cfg)
            if gone.get(key):  # a duplicate or contaminated image (None for keys without an image): that is why,
                why = [gone[key]]  # not the captions that dedup.before_captions did not make
            row = {"key": key, "shard": shard_name, "url": m["url"], "width": m["width"], "height": m["height"],
                   "n_captions": len(kept.get(key, [])), "exported": not why, "reasons": why, "tar": None,
                   "captioners": sorted({c["captioner"] for c in kept.get(key, [])}),
                   "max_sentences": max((len(c["sentences"]) for c in kept.get(key, [])), default=0),
                   "caption_digests": sorted({dedup_stage.caption_digest(c["text"]) for c in kept.get(key, [])})}
            if download_reason(m["status"], m["error_message"]) == OK:
                files = images.get(key)
                if not why:
                    doc = {"key": key, "url": m["url"], "width": m["width"], "height": m["height"],
                           "original_width": m["original_width"], "original_height": m["original_height"],
                           "captions": kept[key], "extra": extras[key]}
                    if key in local:
                        doc["regions"] = local[key]
                    txt = pick_txt(kept[key], txt_caption)
                    doc["txt"] = f"{txt['captioner']}/{txt['prompt_id']}"
                    ext = "jpg" if "jpg" in files else next(e for e in files if e not in ("json", "txt"))
                    row["tar"] = parts.add(key, {"jpg" if ext == "jpg" else ext: files[ext],
                                                 "json": json.dumps(doc, ensure_ascii=False).encode(),
                                                 "txt": txt["text"].encode()})
            reasons.update(why or [OK])
            rows.append(row)
    finally:
        parts.close()
    index = table(rows, EXPORT_INDEX)
    n_ok = sum(r["exported"] for r in rows)
    return index, {"rows": len(rows), "ok": n_ok, "reasons": {k: v for k, v in reasons.items() if k != OK},
                   "tars": len(parts.written)}


def regions_by_key(regions: pa.Table | None) -> dict:
    """Per key with regions: {'boxes': [{box, source, score}], 'pairs': kept region-sentence pairs}."""
    out = {}
    if regions is None:
        return out
    for r in regions.select(["key", "regions", "matches"]).to_pylist():
        if r["regions"] is None:
            continue
        pairs = [{"captioner": m["captioner"], "prompt_id": m["prompt_id"], "sentence_index": m["sentence_index"],
                  "sentence": m["sentence"], "kind": m.get("kind"), "region": m["region"], "score": m["score"]}
                 for m in r["matches"] or [] if m["kept"]]
        out[r["key"]] = {"boxes": r["regions"], "pairs": pairs}
    return out


class _Images:
    """Walks a key-sorted tar alongside key-sorted metadata."""

    def __init__(self, tar_path: str):
        self.it, self.pending = image_members(tar_path), None

    def get(self, key: str) -> dict:
        while True:
            item = self.pending or next(self.it, None)
            self.pending = None
            if item is None or item[0] > key:
                self.pending = item
                raise ValueError(f"image {key} is marked downloaded but is missing from the shard's tar")
            if item[0] == key:
                return item[1]


def _exclusion(m: dict, kept: list | None, dropped: list | None, cfg) -> list[str]:
    reason = download_reason(m["status"], m["error_message"])
    if reason != OK:
        return [f"no image ({reason})"]
    why = []
    if not kept:
        why.append("no caption left" + (f": {'; '.join(dropped)}" if dropped else ""))
    side = min(m["original_width"] or 0, m["original_height"] or 0)
    if side < cfg.min_image_size:
        why.append(f"image smaller than {cfg.min_image_size} px ({m['original_width']}x{m['original_height']})")
    return why
