"""Download stage: one shard of a URL list -> images/<shard>.tar (+ .parquet, _stats.json) via img2dataset.

img2dataset's Downloader does the fetching, resizing and writing into a
staging folder through longcap's KeyOrderWriter (shardwriter.py). longcap (1) checks every image with a
pixel limit read from the header before any decode and a completeness check (truncated files fail), (2)
writes the URL as given in the list (relative URLs are fetched against a base URL), (3) orders rows and tar
members by key with fixed tar metadata so a rerun gives the same bytes, and (4) commits tar, stats and parquet
by rename, parquet last.
"""

from __future__ import annotations

import functools
import math
import os
import urllib.parse
import uuid
from collections import Counter

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations phones home on import

import fsspec  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from .images import check_image  # noqa: E402
from .records import download_reason  # noqa: E402
from .shardwriter import KeyOrderWriter  # noqa: E402
from .storage import atomic_write_bytes, atomic_write_table  # noqa: E402

SHARD_DIGITS = 5  # img2dataset's oom_shard_count
RESERVED = {"key", "url", "width", "height", "original_width", "original_height", "status",
            "error_message", "exif", "md5", "sha256", "sha512"}


def shard_name(shard_id: int) -> str:
    return f"{shard_id:0{SHARD_DIGITS}d}"


def key_digits(shard_size: int) -> int:
    """Digits img2dataset gives the row index inside a key."""
    return math.ceil(math.log10(shard_size)) if shard_size > 1 else 0


def make_key(shard_id: int, index: int, shard_size: int) -> str:
    k = key_digits(shard_size)
    return f"{shard_id * 10**k + index:0{SHARD_DIGITS + k}d}"


def key_shard(key: str, shard_size: int) -> int:
    """The shard id inside a key made by make_key."""
    return int(key) // 10 ** key_digits(shard_size)


class CheckedResizer:
    """img2dataset's Resizer behind longcap's image check."""

    def __init__(self, resizer, max_pixels: float):
        self.resizer, self.max_pixels = resizer, max_pixels

    def __call__(self, img_stream, blurring_bbox_list=None):
        error = check_image(img_stream, self.max_pixels)
        if error is not None:
            return None, None, None, None, None, error
        img_stream.seek(0)
        return self.resizer(img_stream, blurring_bbox_list)


def resolve(url: str, base_url: str | None) -> str:
    if base_url and url and "://" not in url:
        return urllib.parse.urljoin(base_url.rstrip("/") + "/", url.lstrip("/"))
    return url


def plan_shards(table: pa.Table, shard_size: int) -> list[pa.Table]:
    return [table.slice(i, shard_size) for i in range(0, max(table.num_rows, 1), shard_size) if i < table.num_rows]


def download_shard(shard_id: int, rows: pa.Table, images_dir: str, cfg, shard_size: int,
                   base_url: str | None = None, own_server: bool = False) -> dict:
    """Download one shard; returns {'rows', 'ok', 'reasons'}. Raises if img2dataset fails the shard.

    own_server: base_url is a server of this run (the demo's); a connection error then means that
    server is gone (its driver died), so the shard is failed rather than committed with the errors.
    """
    from img2dataset.downloader import Downloader
    from img2dataset.resizer import Resizer

    from .urlsafety import install

    install(tuple(cfg.allow_networks))  # every request img2dataset makes is checked (redirects too)
    bad = sorted(RESERVED & set(rows.column_names) - {"url"})
    if bad:
        raise ValueError(f"input columns {bad} clash with img2dataset's own columns; rename them")
    given = [u if u is not None else "" for u in rows["url"].to_pylist()]
    fetch = pa.array([resolve(u, base_url) for u in given], pa.string())
    rows = rows.set_column(rows.column_names.index("url"), "url", fetch)

    name = shard_name(shard_id)
    fs, root = fsspec.core.url_to_fs(images_dir)
    staging = f"{root}/_staging/{name}-{uuid.uuid4().hex[:8]}"
    fs.makedirs(staging, exist_ok=True)
    try:
        input_file = f"{staging}/input.arrow"
        with fs.open(input_file, "wb") as f, pa.ipc.new_file(f, rows.schema) as w:
            w.write_table(rows)
        resizer = Resizer(
            image_size=cfg.image_size, resize_mode=cfg.resize_mode, resize_only_if_bigger=cfg.resize_only_if_bigger,
            encode_format=cfg.encode_format, encode_quality=cfg.encode_quality, min_image_size=cfg.min_image_size,
            max_image_area=cfg.max_image_area, max_aspect_ratio=cfg.max_aspect_ratio,
        )
        downloader = Downloader(
            sample_writer_class=functools.partial(KeyOrderWriter, given=given, key_digits=key_digits(shard_size)),
            resizer=CheckedResizer(resizer, cfg.max_image_area),
            thread_count=cfg.threads, save_caption="caption" in rows.column_names, extract_exif=True,
            output_folder=_url(fs, staging), column_list=rows.column_names, timeout=cfg.timeout,
            number_sample_per_shard=shard_size, oom_shard_count=SHARD_DIGITS, compute_hash="sha256",
            verify_hash_type=None, encode_format=cfg.encode_format, retries=cfg.retries,
            user_agent_token=cfg.user_agent_token,
            disallowed_header_directives=cfg.disallowed_header_directives or None,
        )
        ok, _ = downloader((shard_id, _url(fs, input_file)))
        if not ok:
            raise RuntimeError(f"img2dataset failed on shard {name} (see the worker log for its traceback)")
        return _finalize(fs, staging, root, name, len(given), own_server)
    finally:
        fs.rm(staging, recursive=True)


def _url(fs, path: str) -> str:
    return path if "file" in fs.protocol else fs.unstrip_protocol(path)


def _finalize(fs, staging: str, root: str, name: str, expected: int, own_server: bool) -> dict:
    with fs.open(f"{staging}/{name}.parquet", "rb") as f:
        meta = pq.read_table(f)  # sorted by key, URLs as given (KeyOrderWriter)
    if meta.num_rows != expected:
        raise RuntimeError(f"shard {name}: img2dataset wrote {meta.num_rows} rows for {expected} URLs")
    reasons = Counter(download_reason(s, e) for s, e in zip(meta["status"].to_pylist(),
                                                             meta["error_message"].to_pylist()))
    if own_server and reasons.get("connection_error"):
        raise RuntimeError(f"shard {name}: the local image server stopped answering "
                           f"({reasons['connection_error']} connection errors); not committing")
    fs.mv(f"{staging}/{name}.tar", f"{root}/{name}.tar")
    with fs.open(f"{staging}/{name}_stats.json", "rb") as f:
        atomic_write_bytes(_url(fs, f"{root}/{name}_stats.json"), f.read())
    atomic_write_table(_url(fs, f"{root}/{name}.parquet"), meta)  # the commit marker
    return {"rows": meta.num_rows, "ok": reasons.pop("ok", 0), "reasons": dict(reasons)}


def read_images_meta(images_dir: str, shard_id: int, columns=None) -> pa.Table:
    from .storage import read_table

    return read_table(f"{images_dir}/{shard_name(shard_id)}.parquet", columns=columns)
