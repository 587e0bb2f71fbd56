"""Stage workers: read a shard's inputs from the run directory, call the pipeline, commit the output.

A worker is plain Python; the runner wraps task stages in Ray tasks and model
stages in Ray actors (one worker object, so one model load, per actor).
"""

from __future__ import annotations

import json
import time
from collections import Counter

from pipeline.captions import build_captioner
from pipeline.config import Config, ConfigError
from pipeline.download import download_shard, read_images_meta, shard_name
from pipeline.export import export_shard
from pipeline.records import CAPTIONS, OK
from pipeline.sentences import SentenceSplitter
from pipeline.storage import atomic_write_bytes, atomic_write_table, read_table
from .rundir import RunDir

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)


class DownloadWorker:
    kind = "task"

    def __init__(self, cfg: Config, root: str, base_url: str | None = None):
        self.cfg, self.run_dir, self.base_url = cfg, RunDir(root), base_url

    def run(self, shard: int) -> dict:
        rows = self.run_dir.shard_rows(shard)
        return download_shard(shard, rows, self.run_dir.path("images"), self.cfg.download,
                              self.cfg.run.shard_size, self.base_url or self.cfg.input.base_url,
                              own_server=self.base_url is not None)


class CaptionsWorker:
    kind = "actor"

    def __init__(self, cfg: Config, root: str, base_url: str | None = None):
        self.cfg, self.run_dir = cfg, RunDir(root, cfg.input.images_from)
        self.captioners = [build_captioner(c, cfg.caption_columns(), cfg.prompts, cfg.sentences.quality, cfg.run.seed,
                                           cfg.download.max_image_area) for c in cfg.captioners]

    @staticmethod
    def num_gpus(cfg: Config) -> float:
        return max([c.gpus for c in cfg.captioners], default=0)

    def run(self, shard: int) -> dict:
        images = read_images_meta(self.run_dir.images(), shard)
        tar = self.run_dir.images(f"{shard_name(shard)}.tar")
        out = pa.concat_tables([c.caption_shard(images, tar) for c in self.captioners]).cast(CAPTIONS)
        atomic_write_table(self.run_dir.output("captions", shard), out)
        return summarize(out)


class SentencesWorker:
    kind = "task"

    def __init__(self, cfg: Config, root: str, base_url: str | None = None):
        self.run_dir = RunDir(root, cfg.input.images_from)
        self.splitter = SentenceSplitter(cfg.sentences)

    def run(self, shard: int) -> dict:
        captions = read_table(self.run_dir.output("captions", shard))
        out = self.splitter.split_shard(captions)
        atomic_write_table(self.run_dir.output("sentences", shard), out)
        summary = summarize(out)
        summary["excluded"] = dict(Counter(r for rs in out["exclude_reasons"].to_pylist() for r in rs or []))
        return summary


class RegionsWorker:
    kind = "actor"

    def __init__(self, cfg: Config, root: str, base_url: str | None = None):
        from pipeline.regions import RegionPairer
        from pipeline.scorers import build_scorer, resolve_device

        self.cfg, self.run_dir = cfg, RunDir(root)
        rc = cfg.regions
        device = resolve_device(rc.device)
        detector = None
        if rc.detector is not None:
            from pipeline.detector import Detector

            detector = Detector(rc.detector, detector_weights(cfg, self.run_dir), device)
        self.pairer = RegionPairer(rc, build_scorer(rc.scorer, device, cfg.run.seed), detector,
                                   cfg.download.max_image_area)

    @staticmethod
    def num_gpus(cfg: Config) -> float:
        return cfg.regions.num_gpus

    def run(self, shard: int) -> dict:
        name = shard_name(shard)
        sentences = read_table(self.run_dir.output("sentences", shard))
        out = self.pairer.pair_shard(read_images_meta(self.run_dir.images(), shard),
                                     self.run_dir.images(f"{name}.tar"), sentences)
        if self.cfg.regions.goal_json:
            from pipeline.regions import goal_records
            from pipeline.storage import atomic_write_bytes

            doc = json.dumps(goal_records(out, sentences), ensure_ascii=False, indent=1).encode()
            atomic_write_bytes(self.run_dir.path("regions", f"{name}.goal.json"), doc)
        atomic_write_table(self.run_dir.output("regions", shard), out)
        summary = summarize(out)
        summary["pairs"] = int(pa.compute.sum(out["n_pairs"]).as_py() or 0)
        return summary


def detector_weights(cfg: Config, run_dir: RunDir) -> str:
    """The configured weights, or the run's trained synthetic detector."""
    det = cfg.regions.detector
    if det.weights:
        return det.weights
    return run_dir.path("models", "detector", "weights.pt")


def prepare(cfg: Config, run_dir: RunDir) -> dict | None:
    """Work a stage needs before its first shard: training the synthetic detector (cached in models/)."""
    det = cfg.regions.detector if cfg.regions else None
    if det is None or det.train is None:
        return None
    from pipeline.detector import train_detector
    from pipeline.scorers import resolve_device

    if not run_dir.is_local:
        raise ConfigError("regions.detector.train needs a local run.dir")
    return train_detector(run_dir.path("models"), det.train, resolve_device(cfg.regions.device))


class ExportWorker:
    kind = "task"

    def __init__(self, cfg: Config, root: str, base_url: str | None = None):
        self.cfg, self.run_dir = cfg, RunDir(root, cfg.input.images_from)

    def run(self, shard: int) -> dict:
        name = shard_name(shard)
        index, summary = export_shard(name, read_images_meta(self.run_dir.images(), shard),
                                      self.run_dir.images(f"{name}.tar"),
                                      read_table(self.run_dir.output("sentences", shard)),
                                      self.run_dir.path("export"), self.cfg.export, regions=self._regions(shard),
                                      extra_cols=self.cfg.extra_columns(), txt_caption=self.cfg.txt_caption())
        atomic_write_table(self.run_dir.output("export", shard), index)
        return summary

    def _regions(self, shard: int):
        if self.cfg.regions is None or not self.run_dir.is_done("regions", shard):
            return None
        return read_table(self.run_dir.output("regions", shard))


def write_export_index(run_dir: RunDir, shards: list[int]) -> int | None:
    """export/index.parquet: the exported keys of every shard, once all shards are exported."""
    if not set(shards) <= run_dir.committed("export"):
        return None
    parts = [read_table(run_dir.output("export", s)) for s in shards]
    index = pa.concat_tables(parts).filter(pa.compute.field("exported"))
    sizes = Counter(index["tar"].to_pylist())  # samples per tar: how open_clip's trainer counts a dataset
    atomic_write_bytes(run_dir.path("export", "sizes.json"), json.dumps(dict(sorted(sizes.items())), indent=1).encode())
    atomic_write_table(run_dir.path("export", "index.parquet"), index)
    return index.num_rows


def summarize(out: pa.Table) -> dict:
    """{'rows', 'ok', 'reasons'} of a stage output with status/error columns."""
    reasons = Counter()
    for status, error in zip(out["status"].to_pylist(), out["error"].to_pylist()):
        reasons[OK if status == OK else f"{status}: {(error or '').split(':')[0]}"] += 1
    return {"rows": out.num_rows, "ok": reasons.pop(OK, 0), "reasons": dict(reasons)}


WORKERS = {"download": DownloadWorker, "captions": CaptionsWorker, "sentences": SentencesWorker,
           "regions": RegionsWorker, "export": ExportWorker}
ORDER = ("download", "captions", "sentences", "regions", "export")


def upstream(stage: str, cfg: Config) -> str | None:
    """The stage whose output `stage` reads; regions sits between sentences and export only when configured."""
    order = [s for s in ORDER if s != "regions" or cfg.regions is not None]
    i = order.index(stage)
    return order[i - 1] if i else None


def run_worker(worker, shard: int, stage: str | None = None) -> dict:
    """Run one shard; with `stage`, also its outcome counts for the stage's progress summary (read back from the
    committed files, by the same code as `longcap status`), under "counts"."""
    t0 = time.time()
    summary = worker.run(shard)
    summary["seconds"] = round(time.time() - t0, 3)
    if stage is not None:
        from .status import stage_counts

        rows, urls, error = stage_counts(worker.run_dir, stage, shard)
        summary["counts"] = {"rows": dict(rows), "urls": dict(urls or {}), "error": error}
    return summary
