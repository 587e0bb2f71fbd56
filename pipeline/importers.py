"""Importers: existing recaptioned corpora -> a longcap URL list (url + one column per caption source).

Each caption column becomes a `source` captioner of its own name, so a run
over the imported list needs no MLLM. `write_url_list` returns the config
lines (input + captioners) to use it.
"""

from __future__ import annotations

import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from .sources import InputError, read_one

DREAMLIP_CSV = ("raw", "shortIB", "longIB", "shortSV", "longSV", "shortLLA", "longLLA")
# DreamLIP JSON keys -> longcap column names (same names as the CSV release)
DREAMLIP_JSON = {"RawCaption": "raw", "IBCaptionShort": "shortIB", "IBCaptionLong": "longIB",
                 "SVCaptionShort": "shortSV", "SVCaptionLong": "longSV",
                 "LLACaptionShort": "shortLLA", "LLACaptionLong": "longLLA"}
DREAMLIP_SNAKE = {"raw_caption": "raw", "ib_caption_short": "shortIB", "ib_caption_long": "longIB",
                  "sv_caption_short": "shortSV", "sv_caption_long": "longSV",
                  "lla_caption_short": "shortLLA", "lla_caption_long": "longLLA"}
PIXELPROSE = ("vlm_caption", "original_caption")
FORMATS = ("dreamlip", "sharegpt4v", "pixelprose", "generic")


def _load_json(path: str):
    with fsspec.open(path, "r", encoding="utf-8", compression="infer") as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        try:  # JSON lines
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: neither JSON nor JSON lines: {e}") from None


def _records(path: str) -> list[dict]:
    data = _load_json(path)
    if isinstance(data, dict):  # {"annotations": [...]} or {"data": [...]}
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise InputError(f"{path}: expected a list of objects")
    return data


def import_dreamlip(path: str) -> pa.Table:
    if path.lower().removesuffix(".gz").endswith((".csv", ".tsv")):
        t = read_one(path, "auto", "image")
        missing = [c for c in ("image",) + DREAMLIP_CSV if c not in t.column_names]
        if missing:
            raise InputError(f"{path}: not a DreamLIP CSV, missing {missing} (has {t.column_names})")
        return pa.table({"url": t["image"].cast(pa.string()), **{c: t[c].cast(pa.string()) for c in DREAMLIP_CSV}})
    recs = _records(path)
    key_map, url_key = (DREAMLIP_JSON, "ImagePath") if "ImagePath" in recs[0] else (DREAMLIP_SNAKE, "image_path")
    if url_key not in recs[0]:
        raise InputError(f"{path}: not a DreamLIP JSON: first record has {sorted(recs[0])}")
    cols = {"url": [r.get(url_key) for r in recs]}
    for src, name in key_map.items():
        cols[name] = [r.get(src) for r in recs]
    return pa.table({k: pa.array(v, pa.string()) for k, v in cols.items()})


def import_sharegpt4v(path: str) -> pa.Table:
    urls, caps, ids = [], [], []
    for i, r in enumerate(_records(path)):
        conv = r.get("conversations") or []
        answer = next((c.get("value") for c in conv if c.get("from") in ("gpt", "assistant")), None)
        urls.append(r.get("image"))
        caps.append(answer)
        ids.append(str(r.get("id", i)))
    return pa.table({"url": pa.array(urls, pa.string()), "sharegpt4v": pa.array(caps, pa.string()),
                     "source_id": pa.array(ids, pa.string())})


def import_pixelprose(path: str) -> pa.Table:
    t = read_one(path, "auto", "url")
    missing = [c for c in ("url",) + PIXELPROSE if c not in t.column_names]
    if missing:
        raise InputError(f"{path}: not a PixelProse file, missing {missing} (has {t.column_names})")
    cols = {"url": t["url"].cast(pa.string()), **{c: t[c].cast(pa.string()) for c in PIXELPROSE}}
    for idc in ("uid", "key"):
        if idc in t.column_names:
            cols["source_id"] = t[idc].cast(pa.string())
            break
    return pa.table(cols)


def import_generic(path: str, url_col: str, caption_cols: list[str]) -> pa.Table:
    if not caption_cols:
        raise InputError("generic import: name the caption columns")
    t = read_one(path, "auto", url_col)
    missing = [c for c in [url_col] + caption_cols if c not in t.column_names]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing}; the file has {t.column_names}")
    return pa.table({"url": t[url_col].cast(pa.string()), **{c: t[c].cast(pa.string()) for c in caption_cols}})


def import_corpus(fmt: str, path: str, url_col: str = "url", caption_cols: list[str] = ()) -> pa.Table:
    if fmt == "dreamlip":
        return import_dreamlip(path)
    if fmt == "sharegpt4v":
        return import_sharegpt4v(path)
    if fmt == "pixelprose":
        return import_pixelprose(path)
    if fmt == "generic":
        return import_generic(path, url_col, list(caption_cols))
    raise InputError(f"unknown import format {fmt!r}; one of {', '.join(FORMATS)}")


def write_url_list(table: pa.Table, out: str) -> dict:
    """Write the list; returns the config sections that read it (one source captioner per caption column)."""
    with fsspec.open(out, "wb") as f:
        pq.write_table(table, f)
    captions = [c for c in table.column_names if c not in ("url", "source_id")]
    return {
        "input": {"urls": [out], "caption_cols": captions,
                  "extra_cols": ["source_id"] if "source_id" in table.column_names else []},
        "captioners": [{"name": c, "backend": "source", "columns": [c]} for c in captions],
    }
