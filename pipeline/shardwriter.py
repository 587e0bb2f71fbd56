"""The sample writer longcap gives img2dataset's Downloader: a shard written once, in key order, reproducibly.

img2dataset's own WebDatasetSampleWriter writes samples in the order their downloads finish, with the
wall-clock time in every tar header and the fetched URL in every .json; longcap used to rewrite that tar after
the fact (0.3-0.45 CPU s per 1000 images). This writer spools each sample as it comes (in memory up to
SPOOL_BYTES, then a temporary file), and at close writes the tar with members ordered by (key, name), mtime 0,
mode 0444, USTAR headers, and the parquet with rows sorted by key; both carry the URL as given in the list.
"""

from __future__ import annotations

import io
import json
import tarfile
import tempfile

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SPOOL_BYTES = 64 << 20


class KeyOrderWriter:
    """Called by the Downloader as its sample_writer_class (bind `given` and `key_digits` with functools.partial):
    write() once per key, failed ones included, then close()."""

    def __init__(self, shard_id, output_folder, save_caption, oom_shard_count, schema, encode_format, *,
                 given: list[str], key_digits: int):
        self.name = f"{shard_id:0{oom_shard_count}d}"
        self.fs, self.folder = fsspec.core.url_to_fs(output_folder)
        self.save_caption, self.schema, self.ext = save_caption, schema, encode_format
        self.given, self.modulus = given, 10 ** key_digits
        self.spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
        self.members: list[tuple[str, int, int]] = []  # (member name, offset in the spool, size)
        self.rows: list[dict] = []

    def write(self, img_str, key: str, caption, meta: dict) -> None:
        meta["url"] = self.given[int(key) % self.modulus]
        for k, v in meta.items():  # as img2dataset's writer: some values are arrays
            if isinstance(v, np.ndarray):
                meta[k] = v.tolist()
        files = {}
        if img_str is not None:  # everything is encoded before anything is kept: a row never lacks its files
            # default=str: an input column of dates or decimals goes into the .json as text (img2dataset's
            # writer raised on it and lost the row); the parquet keeps the typed value
            files = {self.ext: img_str, "json": json.dumps(meta, indent=4, default=str).encode()}
            if self.save_caption:
                files["txt"] = (str(caption) if caption is not None else "").encode()
        self.rows.append(meta)
        for ext, payload in files.items():
            self.members.append((f"{key}.{ext}", self.spool.tell(), len(payload)))
            self.spool.write(payload)

    def close(self) -> None:
        try:
            rows = sorted(self.rows, key=lambda r: r["key"])
            with self.fs.open(f"{self.folder}/{self.name}.parquet", "wb") as f:
                pq.write_table(pa.Table.from_pylist(rows, schema=self.schema), f)
            with self.fs.open(f"{self.folder}/{self.name}.tar", "wb") as f, \
                    tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for name, offset, size in sorted(self.members, key=lambda m: (m[0].split(".", 1)[0], m[0])):
                    self.spool.seek(offset)
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = size, 0, 0o444
                    tar.addfile(info, io.BytesIO(self.spool.read(size)))
        finally:
            self.spool.close()
