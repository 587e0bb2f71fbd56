"""Atomic writes on any fsspec filesystem: write <path>.tmp-<uuid>, then rename into place."""

from __future__ import annotations

import io
import json
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

# s3fs caches directory listings per process; on a run shared by many processes (Ray workers commit shards the
# driver then checks) a cached listing would hide new files. Off unless the user's fsspec config says otherwise.
fsspec.config.conf.setdefault("s3", {}).setdefault("use_listings_cache", False)


def tmp_name(path: str) -> str:
    return f"{path}.tmp-{uuid.uuid4().hex[:12]}"


def atomic_write_bytes(path: str, data: bytes) -> None:
    fs, p = fsspec.core.url_to_fs(path)
    fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
    tmp = tmp_name(p)
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, p)


def atomic_write_json(path: str, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def atomic_write_table(path: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    atomic_write_bytes(path, buf.getvalue())


def exists(path: str) -> bool:
    fs, p = fsspec.core.url_to_fs(path)
    return fs.exists(p)


def read_table(path: str, columns: list[str] | None = None) -> pa.Table:
    fs, p = fsspec.core.url_to_fs(path)
    with fs.open(p, "rb") as f:
        return pq.read_table(f, columns=columns)


def parquet_rows(path: str) -> int:
    """Row count of a parquet file from its footer."""
    fs, p = fsspec.core.url_to_fs(path)
    with fs.open(p, "rb") as f:
        return pq.read_metadata(f).num_rows


def remove_stale_tmp(folder: str) -> int:
    """Delete leftovers of killed writers (`*.tmp-*`) in one folder; returns how many."""
    fs, p = fsspec.core.url_to_fs(folder)
    if not fs.exists(p):
        return 0
    stale = [f for f in fs.ls(p, detail=False) if ".tmp-" in f.rsplit("/", 1)[-1]]
    for f in stale:
        fs.rm(f, recursive=True)
    return len(stale)


def unpickler_reason(e: Exception) -> str:
    """The line of torch.load(weights_only=True)'s refusal that names what it refused."""
    lines = str(e).splitlines()
    return next((ln.strip() for ln in lines if "WeightsUnpickler error" in ln), lines[-1] if lines else "")[:200]
