"""The run directory (DESIGN §3): paths, config snapshot, shard plan, manifest."""

from __future__ import annotations

import json
import os
import re
import time
import fsspec
import pyarrow as pa
import yaml

from pipeline import synthetic
from pipeline.config import Config, ConfigError, config_diff, dump_config
from pipeline.download import plan_shards, shard_name
from pipeline.sources import read_url_lists
from pipeline.storage import atomic_write_bytes, atomic_write_json, atomic_write_table, exists, read_table, remove_stale_tmp

STAGE_DIRS = {"download": "images", "dedup": "dedup", "captions": "captions", "sentences": "sentences", "regions": "regions",
              "regions_caft": "regions-caft",
              "export": "export"}


class RunDir:
    def __init__(self, root: str, images_from: str | None = None):
        root = str(root).rstrip("/")
        self.fs, self._path = fsspec.core.url_to_fs(root)
        self.root = self._path if "file" in self.fs.protocol else root  # local: absolute, for every worker
        self._images_from = images_from

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    # Every other file of a run is named here, so a run on s3:// (or any fsspec URL) and a local one are the same.

    def synth(self, *parts: str) -> str:
        """The synthetic world of an `input.synthetic` run (images, urls.parquet, truth.parquet)."""
        return self.path("synth", *parts)

    def truth(self) -> str | None:
        """synth/truth.parquet when this run has a synthetic world, else None."""
        p = self.synth("truth.parquet")
        return p if exists(p) else None

    def models(self, *parts: str) -> str:
        """models/: the detector and every training folder (checkpoints, metrics.jsonl, tensorboard/)."""
        return self.path("models", *parts)

    def selftrain(self, *parts: str) -> str:
        """selftrain/: `longcap selftrain`'s rounds (round-N/model, round-N/regions, round-N/export) and the
        record of every finished round; selftrain() alone: the record, selftrain/rounds.json."""
        return self.path("selftrain", *parts) if parts else self.path("selftrain", "rounds.json")

    def export_shards(self) -> str:
        """The glob of the exported training shards."""
        return self.path("export", "*.tar")

    def eval_file(self, name: str) -> str:
        return self.path("eval", f"{name}.json")

    def ablation(self, *parts: str) -> str:
        """ablation/ROW/seed-N training folders; ablation() alone: the table, ablation.json."""
        return self.path("ablation", *parts) if parts else self.path("ablation.json")

    def report(self, *parts: str) -> str:
        return self.path("report", *parts)

    def dedup_hashes(self, shard: int) -> str:
        """dedup/_hashes/<shard>.parquet: the dedup stage's per-shard hashes (pipeline/dedup_stage.py, step 1)."""
        return self.path("dedup", "_hashes", f"{shard_name(shard)}.parquet")

    def dedup_global(self, fingerprint: str, *parts: str) -> str:
        """dedup/_global-<fingerprint>/: the global pass of one dedup config (evalsets/<name>.parquet,
        candidates.parquet, verified/<chunk>.parquet, groups.parquet)."""
        return self.path("dedup", f"_global-{fingerprint}", *parts)

    def repeated_captions(self) -> str:
        """export/repeated_captions.json: caption texts on export.caption_repeats or more exported images."""
        return self.path("export", "repeated_captions.json")

    def glob(self, pattern: str) -> list[str]:
        """Openable paths (local paths or URLs) of the run's files matching a pattern relative to the run."""
        found = sorted(self.fs.glob(f"{self._path}/{pattern}"))
        return found if self.is_local else [self.fs.unstrip_protocol(p) for p in found]

    def url(self, fs_path: str) -> str:
        """An openable path for a path of this run's filesystem (fs.ls / fs.glob give them without the scheme)."""
        return fs_path if self.is_local else self.fs.unstrip_protocol(fs_path)

    @property
    def images_from(self) -> str | None:
        """The earlier run whose images/ this run reads (input.images_from), from the config or run.yaml."""
        if self._images_from is None and exists(self.path("run.yaml")):
            self._images_from = ((self.load_snapshot() or {}).get("input") or {}).get("images_from") or ""
        return self._images_from or None

    def images(self, *parts: str) -> str:
        """A path in images/: this run's own, or the earlier run's with input.images_from."""
        src = self.images_from
        return RunDir(src).path("images", *parts) if src else self.path("images", *parts)

    # ---------------------------------------------------------------- files

    def output(self, stage: str, shard: int) -> str:
        if stage == "download":
            return self.images(f"{shard_name(shard)}.parquet")
        return self.path(STAGE_DIRS[stage], f"{shard_name(shard)}.parquet")

    def stage_dir(self, stage: str) -> str:
        """The folder of a stage's per-shard outputs (download: images/, this run's or input.images_from's)."""
        return self.images() if stage == "download" else self.path(STAGE_DIRS[stage])

    def committed(self, stage: str) -> set[int]:
        """Shard ids whose output file exists, from one listing of the stage folder (not one check per shard)."""
        return self.shard_ids(self.stage_dir(stage))

    @staticmethod
    def shard_ids(folder_url: str) -> set[int]:
        """Shard ids of the `NNNNN.parquet` files in one folder, from one listing."""
        fs, folder = fsspec.core.url_to_fs(folder_url)
        try:  # locally the names alone (fsspec's local ls stats every file: seconds at 100k)
            names = os.listdir(folder) if "file" in fs.protocol else fs.ls(folder, detail=False)
        except FileNotFoundError:
            return set()
        if "file" not in fs.protocol:
            names = [n.rsplit("/", 1)[-1] for n in names]
        return {int(n[:-8]) for n in names if n.endswith(".parquet") and n[:-8].isdigit()}

    def progress(self, stage: str) -> str:
        """progress/<stage>.json: the stage's summary that `status` reads (workflows/progress.py)."""
        return self.path("progress", f"{STAGE_DIRS[stage]}.json")

    def shard_input(self, shard: int) -> str:
        return self.images("_shards", f"{shard_name(shard)}.parquet")

    def is_done(self, stage: str, shard: int) -> bool:
        return exists(self.output(stage, shard))

    @property
    def is_local(self) -> bool:
        return "file" in self.fs.protocol

    def clean_stale(self) -> int:
        """Remove what killed writers left: *.tmp-* files and img2dataset staging folders."""
        folders = [self.root, self.path("images", "_shards"), self.path("dedup", "_hashes")] + [
            self.path(d) for d in set(STAGE_DIRS.values())]
        folders += [f"{self.url(g)}{sub}" for g in self.fs.glob(f"{self._path}/dedup/_global-*")
                    for sub in ("", "/evalsets", "/verified")]
        n = sum(remove_stale_tmp(f) for f in folders)
        staging = f"{self._path}/images/_staging"
        if self.fs.exists(staging):
            self.fs.rm(staging, recursive=True)
        return n

    def drop_leftovers(self, committed: dict[str, set[int]]) -> None:
        """After the loop: remove what attempts killed with their node left behind for shards that were then committed
        by another attempt: `<shard>.*.tmp-*` files in each stage's folder and images/_staging/<shard>-* folders
        (then images/_staging itself when empty). Leftovers of shards not committed stay (another process on the
        same run may be writing them); the next run's clean_stale removes those."""
        def shard_of(name: str) -> int | None:
            head = re.split(r"[.-]", name, maxsplit=1)[0]
            return int(head) if head.isdigit() else None

        for stage, done in committed.items():
            if stage == "download" and self._images_from:
                continue  # another run's images/: not ours to clean
            try:
                for f in self.fs.ls(self.fs._strip_protocol(self.stage_dir(stage)), detail=False):
                    name = f.rstrip("/").rsplit("/", 1)[-1]
                    if ".tmp-" in name and shard_of(name) in done:
                        self.fs.rm(f, recursive=True)
            except (OSError, FileNotFoundError):  # no folder yet, or removed meanwhile
                pass
        staging = f"{self._path}/images/_staging"
        try:
            if not self.fs.exists(staging):
                return
            for folder in self.fs.ls(staging, detail=False):
                if shard_of(folder.rstrip("/").rsplit("/", 1)[-1]) in committed.get("download", ()):
                    self.fs.rm(folder, recursive=True)
            if not self.fs.ls(staging, detail=False):
                self.fs.rmdir(staging)
        except (OSError, FileNotFoundError):  # refilled or removed meanwhile (another process on the same run)
            pass

    # ---------------------------------------------------------------- config snapshot

    def load_snapshot(self) -> dict | None:
        p = self.path("run.yaml")
        if not exists(p):
            return None
        with fsspec.open(p, "r") as f:
            return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # libyaml when there

    def check_config(self, cfg: Config, force: bool = False) -> list[str]:
        """Write run.yaml on first start; on restart, refuse a different config unless forced."""
        new = cfg.model_dump(mode="json")
        old = self.load_snapshot()
        if old is not None:
            diff = config_diff(old, new)
            if diff and not force:
                raise ConfigError(
                    f"{self.root} was started with a different config:\n  " + "\n  ".join(diff)
                    + "\nrerun with --force to continue with the new one (finished shards keep their old outputs),"
                    " or choose another run.dir"
                )
            if not diff:
                return []
        self.fs.makedirs(self._path, exist_ok=True)
        atomic_write_bytes(self.path("run.yaml"), dump_config(cfg).encode())
        return diff if old is not None else []

    # ---------------------------------------------------------------- shard plan

    def plan(self, cfg: Config) -> list[int]:
        """Shard ids of the run. The first start splits the URL list into images/_shards/."""
        plan_file = self.images("_shards", "plan.json")
        if exists(plan_file):
            with fsspec.open(plan_file, "r") as f:
                return list(range(json.load(f)["shards"]))
        if self.images_from:
            raise ConfigError(f"input.images_from: {self.images_from} is not a started run (no {plan_file})")
        urls = self.input_urls(cfg)
        table = read_url_lists(urls, cfg.input.format if cfg.input.synthetic is None else "parquet",
                               cfg.input.url_col if cfg.input.synthetic is None else "url",
                               cfg.caption_columns(), cfg.extra_columns())
        shards = plan_shards(table, cfg.run.shard_size)
        self.fs.makedirs(f"{self._path}/images/_shards", exist_ok=True)
        for i, part in enumerate(shards):
            atomic_write_table(self.shard_input(i), part)
        atomic_write_json(plan_file, {"shards": len(shards), "rows": table.num_rows,
                                      "shard_size": cfg.run.shard_size, "sources": urls})
        return list(range(len(shards)))

    def input_urls(self, cfg: Config) -> list[str]:
        if cfg.input.synthetic is None:
            return list(cfg.input.urls)
        if self.truth() is None:
            s = cfg.input.synthetic
            synthetic.write_world(self.synth(), s.families, s.variants, s.image_size, s.seed, s.broken, s.duplicates)
        return [self.synth("urls.parquet")]

    @property
    def synth_dir(self) -> str:
        return self.synth()

    def serve_dir(self, cfg: Config) -> str | None:
        return self.synth_dir if cfg.input.synthetic is not None else cfg.input.serve_dir

    def shard_rows(self, shard: int) -> pa.Table:
        return read_table(self.shard_input(shard))

    # ---------------------------------------------------------------- manifest

    def load_manifest(self) -> dict:
        p = self.path("manifest.json")
        if not exists(p):
            return {"stages": {}, "events": []}
        with fsspec.open(p, "r") as f:
            return json.load(f)

    def save_manifest(self, manifest: dict) -> None:
        manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        atomic_write_json(self.path("manifest.json"), manifest)
