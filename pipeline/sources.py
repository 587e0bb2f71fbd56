"""Reading URL lists (parquet, csv, tsv, jsonl, txt; optionally .gz) into one table."""

from __future__ import annotations

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

FORMATS = ("parquet", "csv", "tsv", "jsonl", "txt")


class InputError(ValueError):
    """A URL list that cannot be read; the message names the file and the reason."""


def detect_format(path: str) -> str:
    name = path.lower().removesuffix(".gz")
    for fmt in FORMATS:
        if name.endswith("." + fmt):
            return fmt
    if name.endswith(".json"):
        return "jsonl"
    raise InputError(f"{path}: cannot tell the format from the extension; set input.format to one of {FORMATS}")


def read_one(path: str, fmt: str, url_col: str) -> pa.Table:
    return _read(path, detect_format(path) if fmt == "auto" else fmt, url_col)


def as_text(col) -> pa.ChunkedArray:
    """A column as strings; bytes that are not UTF-8 (CSV readers give them as binary) get U+FFFD."""
    if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
        return pa.chunked_array([pa.array([None if b is None else b.decode("utf-8", errors="replace")
                                           for b in col.to_pylist()], pa.string())])
    return pc.cast(col, pa.string())


def _read(path: str, fmt: str, url_col: str) -> pa.Table:
    compression = "gzip" if path.endswith(".gz") else None
    try:
        if fmt == "parquet":
            with fsspec.open(path, "rb") as f:
                return pq.read_table(f)
        with fsspec.open(path, "rb", compression=compression) as f:
            conv = pacsv.ConvertOptions()
            if fmt == "txt":
                opts = pacsv.ReadOptions(column_names=[url_col])
                parse = pacsv.ParseOptions(delimiter="\x01", quote_char=False)
                return pacsv.read_csv(f, read_options=opts, parse_options=parse, convert_options=conv)
            if fmt == "csv":
                return pacsv.read_csv(f, convert_options=conv)
            if fmt == "tsv":
                return pacsv.read_csv(f, parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
                                      convert_options=conv)
            return pajson.read_json(f)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read as {fmt}: {e}") from None


def read_url_lists(paths: list[str], fmt: str, url_col: str, caption_cols: list[str],
                   extra_cols: list[str]) -> pa.Table:
    """All rows of all files, in order, with columns url, *caption_cols, *extra_cols."""
    wanted = [url_col] + [c for c in caption_cols + extra_cols if c != url_col]
    parts = []
    for path in paths:
        t = read_one(path, fmt, url_col)
        missing = [c for c in wanted if c not in t.column_names]
        if missing:
            raise InputError(f"{path}: missing column(s) {missing}; the file has {t.column_names}")
        t = t.select(wanted)
        cols = [t[c] if c not in caption_cols + [url_col] else as_text(t[c]) for c in wanted]
        parts.append(pa.table(cols, names=["url" if c == url_col else c for c in wanted]))
    if not parts:
        raise InputError("no URL list files given")
    try:
        return pa.concat_tables(parts, promote_options="permissive")
    except pa.ArrowInvalid as e:
        raise InputError(f"URL lists {paths} have incompatible columns: {e}") from None
