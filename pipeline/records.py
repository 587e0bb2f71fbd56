"""Schemas of every stage's output and the status vocabulary, in one place.

images/<shard>.parquet is img2dataset's own file (its columns are listed in
IMAGE_COLUMNS); every later stage's file is described here.
"""

from __future__ import annotations

import hashlib
import re

import pyarrow as pa

OK = "ok"
SKIPPED = "skipped"  # an upstream stage failed for this key
FAILED = "failed"

# The columns of img2dataset's per-shard parquet that longcap reads.
IMAGE_COLUMNS = ("key", "url", "status", "error_message", "width", "height", "original_width", "original_height")

CAPTIONS = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("captioner", pa.string(), nullable=False),
    pa.field("model", pa.string()),  # model id, or 'source:<column>'
    pa.field("prompt_id", pa.string()),
    pa.field("prompt_hash", pa.string()),
    pa.field("params", pa.string()),  # generation parameters, JSON
    pa.field("text", pa.string()),
    pa.field("n_tokens", pa.int32()),
    pa.field("finish_reason", pa.string()),
    pa.field("latency_s", pa.float32()),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("flags", pa.string()),  # quality flags, JSON
])

SENTENCES = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("captioner", pa.string(), nullable=False),
    pa.field("prompt_id", pa.string()),
    pa.field("text", pa.string()),  # the normalised caption; spans point into it
    pa.field("sentences", pa.list_(pa.string())),  # kept sentences, in order
    pa.field("spans", pa.list_(pa.list_(pa.int32()))),  # [start, end) of each kept sentence in text
    pa.field("n_sentences", pa.int32()),
    pa.field("n_chars", pa.int32()),
    pa.field("n_words", pa.int32()),
    pa.field("repetition", pa.float32()),  # 1 - distinct/total word n-grams
    pa.field("alpha_frac", pa.float32()),  # letters / non-space characters
    pa.field("boilerplate", pa.string()),  # the matched opening, '' if none
    pa.field("truncated", pa.string()),  # why it looks truncated, '' if not
    pa.field("invalid_utf8", pa.bool_()),
    pa.field("flags", pa.list_(pa.string())),
    pa.field("stripped", pa.list_(pa.string())),  # what strip actions removed
    pa.field("excluded", pa.bool_()),  # kept out of export
    pa.field("exclude_reasons", pa.list_(pa.string())),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
])

EXPORT_INDEX = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("shard", pa.string(), nullable=False),  # pipeline shard
    pa.field("url", pa.string()),
    pa.field("width", pa.int32()),  # stored image size
    pa.field("height", pa.int32()),
    pa.field("n_captions", pa.int32()),  # kept captions in the sample
    pa.field("max_sentences", pa.int32()),
    pa.field("captioners", pa.list_(pa.string())),
    pa.field("exported", pa.bool_(), nullable=False),
    pa.field("reasons", pa.list_(pa.string())),  # why not exported
    pa.field("tar", pa.string()),  # export tar holding the sample
    pa.field("caption_digests", pa.list_(pa.string())),  # of the kept captions (export.caption_digest)
])

DEDUP = pa.schema([  # one row per key of the shard (pipeline/dedup_stage.py)
    pa.field("key", pa.string(), nullable=False),
    pa.field("url", pa.string()),
    pa.field("sha256", pa.string()),  # of the downloaded bytes (img2dataset)
    pa.field("phash", pa.int64()),  # 64-bit pHash as a signed int
    pa.field("kept", pa.bool_(), nullable=False),  # an image that is neither a duplicate nor contaminated
    pa.field("duplicate_of", pa.string()),  # the kept key of its group, or for contamination "<set>/<image id>"
    pa.field("reason", pa.string()),  # same url | same bytes | near duplicate (phash d=N) | contaminated: <set>
    pa.field("distance", pa.int32()),  # pHash bits to duplicate_of (either way round)
    pa.field("status", pa.string(), nullable=False),  # ok, or skipped (no image)
    pa.field("error", pa.string()),
])

REGION = pa.struct([
    pa.field("box", pa.list_(pa.float32(), 4)),  # normalised xyxy
    pa.field("source", pa.string()),  # det:<class> or grid:<scheme>:<i>
    pa.field("score", pa.float32()),  # detector confidence; null for grid regions
])

MATCH = pa.struct([  # one per sentence: its best region, whether the pair is kept, the top-k for analysis
    pa.field("captioner", pa.string()),
    pa.field("prompt_id", pa.string()),
    pa.field("sentence_index", pa.int32()),
    pa.field("sentence", pa.string()),
    pa.field("kind", pa.string()),  # object, relation, scene, other (pipeline/kinds.py)
    pa.field("region", pa.int32()),  # index into regions
    pa.field("score", pa.float32()),
    pa.field("margin", pa.float32()),  # best - runner-up (null with one region)
    pa.field("kept", pa.bool_()),
    pa.field("top_regions", pa.list_(pa.int32())),
    pa.field("top_scores", pa.list_(pa.float32())),
])

REGIONS = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("width", pa.int32()),  # stored image size (boxes are fractions of it)
    pa.field("height", pa.int32()),
    pa.field("regions", pa.list_(REGION)),
    pa.field("matches", pa.list_(MATCH)),
    pa.field("n_regions", pa.int32()),
    pa.field("n_sentences", pa.int32()),
    pa.field("n_pairs", pa.int32()),  # kept matches
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
])

SCHEMAS = {"dedup": DEDUP, "captions": CAPTIONS, "sentences": SENTENCES, "regions": REGIONS, "export": EXPORT_INDEX}


def empty_row(schema: pa.Schema, **values) -> dict:
    row = {name: None for name in schema.names}
    row.update(values)
    return row


def table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Rows -> a table of `schema`, built column by column (much faster than from_pylist for list columns)."""
    return pa.table([_column([r.get(f.name) for r in rows], f.type) for f in schema], schema=schema)


def _column(values: list, typ: pa.DataType) -> pa.Array:
    if pa.types.is_list(typ) and pa.types.is_list(typ.value_type):  # list<list<int>>: build from offsets
        inner_t = typ.value_type.value_type
        outer_off, inner_off, flat, mask = [0], [0], [], []
        for v in values:
            mask.append(v is None)
            for inner in v or ():
                flat.extend(inner)
                inner_off.append(len(flat))
            outer_off.append(len(inner_off) - 1)
        inner = pa.ListArray.from_arrays(pa.array(inner_off, pa.int32()), pa.array(flat, inner_t))
        return pa.ListArray.from_arrays(pa.array(outer_off, pa.int32()), inner, mask=pa.array(mask, pa.bool_()))
    return pa.array(values, typ)


def key_seed(run_seed: int, stage: str, key: str) -> int:
    """Seed for one key in one stage: the same on every machine and every rerun."""
    digest = hashlib.blake2b(f"{run_seed}:{stage}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


# ---------------------------------------------------------------- download outcomes

_REASONS = [
    (re.compile(r"^blocked"), "blocked"),
    (re.compile(r"redirect error that would lead to an infinite loop"), "redirect_loop"),
    (re.compile(r"HTTP Error (\d{3})"), "http_{0}"),
    (re.compile(r"timed out|timeout", re.I), "timeout"),
    (re.compile(r"not an image|cannot identify image", re.I), "not_an_image"),
    (re.compile(r"truncated", re.I), "truncated"),
    (re.compile(r"pixel limit|decompression bomb|image area too large", re.I), "too_large"),
    (re.compile(r"image too small", re.I), "too_small"),
    (re.compile(r"aspect ratio", re.I), "bad_aspect_ratio"),
    (re.compile(r"X-Robots-Tag", re.I), "disallowed_by_site"),
    (re.compile(r"unknown url type|no host given|invalid url|empty url", re.I), "bad_url"),
    (re.compile(r"Connection refused|Name or service not known|urlopen error|Remote end closed|Connection reset", re.I),
     "connection_error"),
    (re.compile(r"decod", re.I), "decode_error"),
]


def download_reason(status: str | None, error: str | None) -> str:
    """img2dataset's (status, error_message) -> a short reason: 'ok', 'http_404', 'timeout', ..."""
    if status == "success":
        return OK
    text = error or ""
    for pattern, name in _REASONS:
        m = pattern.search(text)
        if m:
            return name.format(*m.groups())
    return "download_error" if status == "failed_to_download" else "image_error"
