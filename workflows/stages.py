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
from pipeline import dedup_stage
from pipeline.download import download_shard, key_shard, read_images_meta, shard_name
from pipeline.export import export_shard
from pipeline.records import CAPTIONS, OK
from pipeline.sentences import SentenceSplitter
from pipeline.storage import atomic_write_bytes, atomic_write_table, exists, read_table
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


class DedupWorker:
    """The dedup stage (pipeline/dedup_stage.py): `hash(shard)` per shard, `global_pass()` once every shard is
    hashed (its verification chunks through `verify(chunk)`, which the runner spreads over Ray tasks), then
    `run(shard)` writes the stage's output. Every step commits atomically and skips what is already committed."""
    kind = "global"

    def __init__(self, cfg: Config, root: str, base_url: str | None = None):
        self.cfg, self.run_dir = cfg, RunDir(root, cfg.input.images_from)
        self.fp = dedup_fingerprint(cfg)

    def hash(self, shard: int) -> dict:
        out = self.run_dir.dedup_hashes(shard)
        if not exists(out) or "phash_crops" not in read_table(out).column_names:  # (hashes of before crop windows)
            meta = read_images_meta(self.run_dir.images(), shard)
            atomic_write_table(out, dedup_stage.hash_shard(shard, meta, self.run_dir.images(f"{shard_name(shard)}.tar")))
        return {"shard": shard}

    def groups_path(self) -> str:
        return self.run_dir.dedup_global(self.fp, "groups.parquet")

    def _hashes(self, shards: list[int]) -> pa.Table:
        return pa.concat_tables([read_table(self.run_dir.dedup_hashes(s)) for s in shards]).cast(dedup_stage.HASHES)

    def _evalsets(self) -> dict[str, pa.Table]:
        out = {}
        for e in self.cfg.dedup.evalsets:
            path = self.run_dir.dedup_global(self.fp, "evalsets", f"{e.name}.parquet")
            if not exists(path):
                items = dedup_stage.evalset_images(dedup_stage.resolve_path(e.path, self.run_dir.root), e.kind, e.split)
                atomic_write_table(path, dedup_stage.hash_evalset(items))
            out[e.name] = read_table(path)
        return out

    def _candidates(self, shards: list[int]) -> pa.Table:
        path = self.run_dir.dedup_global(self.fp, "candidates.parquet")
        if not exists(path):
            atomic_write_table(path, dedup_stage.candidates(self._hashes(shards), self._evalsets(), self.cfg.dedup,
                                                            seed=self.cfg.run.seed))
        return read_table(path)

    def _chunk_path(self, i: int) -> str:
        return self.run_dir.dedup_global(self.fp, "verified", f"{i:05d}.parquet")

    def verify(self, i: int) -> int:
        """Verify candidate chunk i (committed as verified/<i>.parquet); returns its duplicates."""
        path = self._chunk_path(i)
        if not exists(path):
            cands = read_table(self.run_dir.dedup_global(self.fp, "candidates.parquet"))
            lo, hi = dedup_stage.chunks(cands.num_rows, self.cfg.dedup.verify_chunk)[i]
            part = cands.slice(lo, hi - lo)
            refs = {r for c in ("a", "b") for r in part[c].to_pylist()}
            shard_of = {k: key_shard(k, self.cfg.run.shard_size) for k in refs if "/" not in k}
            evals = {}
            for name, t in self._evalsets().items():
                evals.update({f"{name}/{i_}": p for i_, p in zip(t["id"].to_pylist(), t["path"].to_pylist())})
            source = dedup_stage.ImageSource(lambda sh: self.run_dir.images(f"{shard_name(sh)}.tar"), evals)
            atomic_write_table(path, dedup_stage.verify_chunk(part, source, shard_of, dedup_stage.params_of(self.cfg.dedup)))
        return int(pa.compute.sum(read_table(path)["duplicate"]).as_py() or 0)

    def global_pass(self, shards: list[int], verify_all=None) -> dict:
        """The global result (groups.parquet) from every shard's hashes; `verify_all(chunk ids)` verifies the
        chunks not verified yet (default: here, one after another)."""
        t0 = time.time()
        if not exists(self.groups_path()):
            n = len(dedup_stage.chunks(self._candidates(shards).num_rows, self.cfg.dedup.verify_chunk))
            todo = [i for i in range(n) if not exists(self._chunk_path(i))]
            (verify_all or (lambda ids: [self.verify(i) for i in ids]))(todo)
            verified = (pa.concat_tables([read_table(self._chunk_path(i)) for i in range(n)]).cast(dedup_stage.VERIFIED)
                        if n else dedup_stage.VERIFIED.empty_table())
            atomic_write_table(self.groups_path(), dedup_stage.assign(self._hashes(shards), verified, self.cfg.dedup))
        groups = read_table(self.groups_path())
        return {"not_kept": groups.num_rows, "seconds": round(time.time() - t0, 3)}

    def run(self, shard: int) -> dict:
        out = dedup_stage.shard_rows(read_table(self.run_dir.dedup_hashes(shard)), read_table(self.groups_path()))
        atomic_write_table(self.run_dir.output("dedup", shard), out)
        return summarize(out)


def dedup_fingerprint(cfg: Config) -> str:
    """Names the global pass of one dedup config (a --force restart with other thresholds or evaluation sets
    starts a new one) and one shard plan."""
    import hashlib

    from pipeline.dedup import HASH_VERSION

    doc = json.dumps([cfg.dedup.model_dump(mode="json") if cfg.dedup else None, cfg.run.shard_size, cfg.run.seed,
                      HASH_VERSION],
                     sort_keys=True)
    return hashlib.blake2b(doc.encode(), digest_size=6).hexdigest()


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
        skip = None
        if self.cfg.dedup is not None and self.cfg.dedup.before_captions:  # dedup.before_captions: not captioned
            rows = read_table(self.run_dir.output("dedup", shard)).to_pylist()
            skip = {r["key"]: why for r in rows if (why := dedup_stage.export_reason(r))}
        out = pa.concat_tables([c.caption_shard(images, tar, skip) for c in self.captioners]).cast(CAPTIONS)
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
                                      extra_cols=self.cfg.extra_columns(), txt_caption=self.cfg.txt_caption(),
                                      dedup=read_table(self.run_dir.output("dedup", shard)) if self.cfg.dedup else None)
        atomic_write_table(self.run_dir.output("export", shard), index)
        return summary

    def _regions(self, shard: int):
        if self.cfg.regions is None or not self.run_dir.is_done("regions", shard):
            return None
        return read_table(self.run_dir.output("regions", shard))


def write_export_index(run_dir: RunDir, shards: list[int], caption_repeats: int | None = None) -> int | None:
    """export/index.parquet: the exported keys of every shard, once all shards are exported."""
    if not set(shards) <= run_dir.committed("export"):
        return None
    parts = [read_table(run_dir.output("export", s)) for s in shards]
    index = pa.concat_tables(parts, promote_options="default").filter(pa.compute.field("exported"))
    index = index.append_column("caption_repeats", pa.array(write_repeated_captions(run_dir, index, caption_repeats),
                                                                     pa.int32()))
    sizes = Counter(index["tar"].to_pylist())  # samples per tar: how open_clip's trainer counts a dataset
    atomic_write_bytes(run_dir.path("export", "sizes.json"), json.dumps(dict(sorted(sizes.items())), indent=1).encode())
    atomic_write_table(run_dir.path("export", "index.parquet"), index)
    return index.num_rows


def write_repeated_captions(run_dir: RunDir, index: pa.Table, cfg_repeats: int | None = None) -> list[int]:
    """export/repeated_captions.json: every caption text on export.caption_repeats or more different exported
    images (a captioner's boilerplate answer), with its count, a few keys and the text; returns, per index row,
    the most images that share one of its captions."""
    if cfg_repeats is None:
        cfg_repeats = ((run_dir.load_snapshot() or {}).get("export") or {}).get("caption_repeats", 3)
    digests = index["caption_digests"].to_pylist() if "caption_digests" in index.column_names else [[]] * index.num_rows
    keys = index["key"].to_pylist()
    count, first = Counter(), {}
    for key, ds in zip(keys, digests):
        for d in ds or []:
            count[d] += 1
            first.setdefault(d, []).append(key)
    repeated = sorted((d for d, n in count.items() if n >= cfg_repeats), key=lambda d: (-count[d], d))
    shard_of = dict(zip(keys, index["shard"].to_pylist()))
    texts = {}
    for d in repeated[:100]:  # the text of the first 100, read back from a shard that has it
        sents = read_table(run_dir.output("sentences", int(shard_of[first[d][0]])), ["key", "text"])
        texts[d] = next((t for k, t in zip(sents["key"].to_pylist(), sents["text"].to_pylist())
                         if k == first[d][0] and dedup_stage.caption_digest(t) == d), None)
    doc = {"min_images": cfg_repeats, "texts": len(repeated), "images": len({k for d in repeated for k in first[d]}),
           "repeated": [{"digest": d, "images": count[d], "keys": first[d][:5], "text": texts.get(d)}
                        for d in repeated[:100]]}
    atomic_write_bytes(run_dir.repeated_captions(), json.dumps(doc, indent=1, ensure_ascii=False).encode())
    return [max((count[d] for d in ds or []), default=0) for ds in digests]


def summarize(out: pa.Table) -> dict:
    """{'rows', 'ok', 'reasons'} of a stage output with status/error columns."""
    reasons = Counter()
    for status, error in zip(out["status"].to_pylist(), out["error"].to_pylist()):
        reasons[OK if status == OK else f"{status}: {(error or '').split(':')[0]}"] += 1
    return {"rows": out.num_rows, "ok": reasons.pop(OK, 0), "reasons": dict(reasons)}


WORKERS = {"download": DownloadWorker, "dedup": DedupWorker, "captions": CaptionsWorker, "sentences": SentencesWorker,
           "regions": RegionsWorker, "export": ExportWorker}
ORDER = ("download", "dedup", "captions", "sentences", "regions", "export")


def upstream(stage: str, cfg: Config) -> str | None:
    """The stage whose output `stage` reads; regions sits between sentences and export only when configured.
    dedup is a side branch: it reads download's output, and export reads it too (`requires`)."""
    if stage == "dedup":
        return "download"
    order = [s for s in ORDER if s != "dedup" and (s != "regions" or cfg.regions is not None)]
    i = order.index(stage)
    return order[i - 1] if i else None


def requires(stage: str, cfg: Config) -> list[str]:
    """Every stage whose output a shard needs before `stage` can run on it: its upstream, and for export the
    dedup stage when the config has one (duplicates are captioned like any image; export leaves them out)."""
    up = upstream(stage, cfg)
    gated = stage == "export" or (stage == "captions" and cfg.dedup is not None and cfg.dedup.before_captions)
    return ([up] if up else []) + (["dedup"] if gated and cfg.dedup is not None else [])


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
