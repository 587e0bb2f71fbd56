"""Per-stage progress summaries: what `longcap status` reads instead of every shard's files.

RUN/progress/<stage>.json holds, for one stage: a bitmap of the shards whose output was committed, their rows
counted by outcome (the same reasons `status` derives from the files), for the download stage the input URLs by
outcome, and the failed shards with their errors. The runner (the driver, the only writer) updates it after every
shard commit, by atomic rename. It is a cache: the per-key parquet files stay the truth. `status` checks the
summary against a listing of the stage folder; a committed file the summary does not know is read and added,
and a summary that names a file that is gone is rebuilt from the files.
"""

from __future__ import annotations

import base64
import json
from collections import Counter

import fsspec

from pipeline.storage import atomic_write_json, exists

VERSION = 1


class StageSummary:
    def __init__(self, stage: str, shards: int, done: bytearray | None = None, rows: Counter | None = None,
                 urls: Counter | None = None, failed: dict | None = None, dirty: bool = False):
        self.stage, self.shards = stage, shards
        self.done = done if done is not None else bytearray((shards + 7) // 8)
        self.rows, self.urls = rows or Counter(), urls or Counter()
        self.failed = failed or {}  # shard name -> error
        self.dirty = dirty  # a shard was committed twice: the counts need a rebuild from the files

    def is_done(self, shard: int) -> bool:
        return shard < self.shards and bool(self.done[shard >> 3] & (1 << (shard & 7)))

    def n_done(self) -> int:
        return sum(bin(b).count("1") for b in self.done)

    def add(self, shard: int, name: str, rows: dict, urls: dict | None = None) -> None:
        """A committed shard's outcome counts."""
        if shard >= self.shards:  # the plan grew (should not happen): keep the bitmap large enough
            self.done.extend(bytearray((shard + 8) // 8 - len(self.done)))
            self.shards = shard + 1
        if self.is_done(shard):
            self.dirty = True
        self.done[shard >> 3] |= 1 << (shard & 7)
        self.rows.update(rows)
        self.urls.update(urls or {})
        self.failed.pop(name, None)

    def fail(self, name: str, error: str) -> None:
        self.failed[name] = error[:500]

    def to_json(self) -> dict:
        return {"version": VERSION, "stage": self.stage, "shards": self.shards,
                "done": base64.b64encode(bytes(self.done)).decode(), "rows": dict(self.rows),
                "urls": dict(self.urls), "failed": self.failed, "dirty": self.dirty}

    @classmethod
    def from_json(cls, d: dict) -> "StageSummary":
        if d.get("version") != VERSION:
            raise ValueError(f"progress summary version {d.get('version')!r}, expected {VERSION}")
        return cls(d["stage"], int(d["shards"]), bytearray(base64.b64decode(d["done"])), Counter(d["rows"]),
                   Counter(d["urls"]), dict(d["failed"]), bool(d.get("dirty")))


def load(path: str, stage: str, shards: int) -> StageSummary:
    """The stored summary, or an empty one (none yet, or unreadable: status then reads the files)."""
    if exists(path):
        try:
            with fsspec.open(path, "r") as f:
                s = StageSummary.from_json(json.load(f))
            if s.shards == shards:
                return s
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return StageSummary(stage, shards)


def save(path: str, summary: StageSummary) -> None:
    atomic_write_json(path, summary.to_json())
