"""Runs the selected stages over every shard on Ray.

Task stages run as one Ray task per shard; model stages run in Ray actors that
build their worker (and so load their model) once and then take shard after
shard. A shard moves to its next stage as soon as it is done, so stages
overlap. A failing shard is retried, then recorded; the run goes on.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass, field

import ray
from tqdm import tqdm

from pipeline.config import Config, ConfigError
from pipeline.download import shard_name
from pipeline.storage import exists
from . import progress
from .rundir import RunDir
from .serve import serve_folder
from .status import reconcile
from .stages import ORDER, WORKERS, prepare, requires, run_worker, upstream, write_export_index

log = logging.getLogger("longcap")


STARTED_HERE = []  # set when ensure_ray started a local Ray in this process (so it may stop it)


def ensure_ray(cfg: Config) -> None:
    if ray.is_initialized():
        return
    rc = cfg.ray
    if rc.address:
        ray.init(address=rc.address, runtime_env=rc.runtime_env, log_to_driver=True)
    else:
        STARTED_HERE.append(True)
        ray.init(num_cpus=rc.num_cpus, num_gpus=rc.num_gpus, include_dashboard=False, runtime_env=rc.runtime_env,
                 log_to_driver=True)


def die_with_raylet() -> None:
    """(Linux) This worker gets SIGKILL when the raylet that started it dies. Called first in every task and actor
    method, before any work: Ray kills a local raylet with the driver, but its workers (each in its own process
    group) lived on for about 30 s after `longcap run` was killed, long enough to commit an output; on a cluster a
    worker frozen when its node's raylet died held its shard until gRPC's 5-minute keepalive. (Not a
    worker_process_setup_hook: a job runtime_env makes Ray start workers of its own instead of using the ones it
    prestarted, 1-2 s of a short run.) The parent-death signal belongs to the calling thread: Ray runs tasks and
    a sync actor's methods on the worker's main thread, so it holds while the worker lives."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    try:
        with open(f"/proc/{parent}/cmdline", "rb") as f:
            alive = b"raylet" in f.read()
    except OSError:
        alive = False
    if not alive or os.getppid() != parent:  # the raylet died before prctl: this worker was orphaned
        os._exit(1)


@ray.remote(max_retries=0)
def _shard_task(stage: str, cfg: Config, root: str, base_url, shard: int) -> dict:
    die_with_raylet()
    return run_worker(WORKERS[stage](cfg, root, base_url), shard, stage)


@ray.remote(max_retries=0)
def _dedup_task(step: str, cfg: Config, root: str, arg) -> dict:
    """One step of the dedup stage's global part: "hash" a shard, "verify" a candidate chunk, or the "global" pass
    (whose verification chunks run as more of these tasks, spread over the cluster)."""
    die_with_raylet()
    worker = WORKERS["dedup"](cfg, root)
    if step == "hash":
        return worker.hash(arg)
    if step == "verify":
        return {"duplicates": worker.verify(arg)}

    def verify_all(ids: list[int]) -> None:
        ray.get([_dedup_task.options(num_cpus=1).remote("verify", cfg, root, i) for i in ids])

    return worker.global_pass(arg, verify_all)


class DedupBarrier:
    """The dedup stage's global step inside the runner's loop: each downloaded shard is hashed (a task), and once
    every shard of the plan is hashed, one global task groups them; then the stage's per-shard outputs are written
    like any task stage's. Shards wait here (not in `pending`) until the global result exists."""

    def __init__(self, cfg: Config, run: RunDir, all_shards: list[int]):
        self.cfg, self.run, self.all = cfg, run, set(all_shards)
        self.worker = WORKERS["dedup"](cfg, run.root)
        self.hashed = run.shard_ids(run.dedup_hashes(0).rsplit("/", 1)[0])
        self.done = exists(self.worker.groups_path())
        self.failed: str | None = None  # the global step failed for good in this run
        self.to_hash: collections.deque = collections.deque()
        self.hashing: set[int] = set()
        self.waiting: set[int] = set()  # shards for the stage's output, once the global result is there
        self.global_running, self.global_attempts = False, 0

    def hold(self, shard: int) -> None:
        self.waiting.add(shard)

    def downloaded(self, shard: int) -> None:
        if shard not in self.hashed and shard not in self.hashing and shard not in self.to_hash:
            self.to_hash.append(shard)

    def ready_for_global(self) -> bool:
        return not self.done and not self.failed and not self.global_running and self.all <= self.hashed

    def blocked(self) -> str:
        missing = len(self.all - self.hashed)
        return (f"the global dedup pass needs every shard of the plan downloaded and hashed; {missing} are not "
                f"(run the download stage for them)")


@ray.remote(max_restarts=0, max_task_retries=0)
class _StageActor:
    def __init__(self, stage: str, cfg: Config, root: str, base_url):
        die_with_raylet()
        self.stage, self.worker = stage, WORKERS[stage](cfg, root, base_url)

    def run(self, shard: int) -> dict:
        die_with_raylet()
        return run_worker(self.worker, shard, self.stage)


def actor_options(stage: str, cfg: Config) -> dict:
    """Ray options of one model-stage actor: one CPU, its GPUs, and for captions `ray.captions_runtime_env`."""
    opts = {"num_cpus": 1, "num_gpus": actor_gpus(stage, cfg)}
    if stage == "captions" and cfg.ray.captions_runtime_env:
        opts["runtime_env"] = cfg.ray.captions_runtime_env
    return opts


def actor_gpus(stage: str, cfg: Config) -> float:
    """GPUs one actor of a model stage reserves (its worker's num_gpus(cfg); 0 if it has none)."""
    return getattr(WORKERS[stage], "num_gpus", lambda cfg: 0)(cfg)


@dataclass
class RunResult:
    failed: dict = field(default_factory=dict)  # (stage, shard) -> error
    blocked: dict = field(default_factory=dict)  # (stage, shard) -> why it could not run
    done: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed and not self.blocked


def error_text(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    if isinstance(exc, ray.exceptions.RayActorError):
        return f"worker died: {str(exc).splitlines()[0][:300]}"
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"[:2000]
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:2000]


class Runner:
    def __init__(self, cfg: Config, run: RunDir, stages: list[str] | None = None,
                 shards: list[int] | None = None, progress: bool = True):
        self.cfg, self.run = cfg, run
        self.stages = [s for s in ORDER if s in (stages or cfg.run.stages)]
        if cfg.input.images_from:  # images come from an earlier run: never download into it
            self.stages = [s for s in self.stages if s != "download"]
        self.only = set(shards) if shards is not None else None
        self.progress = progress and sys.stderr.isatty()
        self.manifest = run.load_manifest()
        self.summaries: dict = {}  # stage -> progress.StageSummary (progress/<stage>.json)
        self._done: dict = {}  # stage -> committed shard ids
        self._saved_at, self._save_cost = 0.0, 0.0

    # ---------------------------------------------------------------- bookkeeping

    def _record(self, stage: str, shard: int, entry: dict) -> None:
        """After each shard: its progress summary (small, written every time) and the manifest (per-shard
        detail; rewritten at most about once a second and at the end, since at 100k shards it is large)."""
        name = shard_name(shard)
        counts = entry.pop("counts", None)
        if entry["status"] == "done":
            self._committed(stage).add(shard)
        summary = self.summaries.get(stage)
        if summary is not None:
            if entry["status"] == "done":
                summary.add(shard, name, (counts or {}).get("rows", {}), (counts or {}).get("urls"))
                if (counts or {}).get("error"):
                    summary.fail(name, counts["error"])
            else:
                summary.fail(name, entry.get("error", ""))
            progress.save(self.run.progress(stage), summary)
        self.manifest["stages"].setdefault(stage, {"shards": {}})["shards"][name] = entry
        if entry["status"] != "done" or time.time() - self._saved_at > max(1.0, 10 * self._save_cost):
            self._save_manifest()

    def _save_manifest(self) -> None:
        t0 = time.time()
        for st in self.manifest["stages"].values():
            done = [e for e in st["shards"].values() if e["status"] == "done"]
            st["summary"] = {
                "shards_done": len(done),
                "shards_failed": sum(e["status"] == "failed" for e in st["shards"].values()),
                "samples": sum(e.get("rows", 0) for e in done),
                "samples_ok": sum(e.get("ok", 0) for e in done),
                "seconds": round(sum(e.get("seconds", 0) for e in done), 3),
            }
        self.run.save_manifest(self.manifest)
        self._saved_at, self._save_cost = time.time(), time.time() - t0

    def _committed(self, stage: str) -> set[int]:
        """Shards with an output, from one listing per stage at the start (not one existence check per shard:
        100k HEAD requests on object storage), kept up to date as shards commit."""
        if stage not in self._done:
            self._done[stage] = self.run.committed(stage)
        return self._done[stage]

    def _next_stages(self, stage: str, shard: int) -> list[str]:
        """The stages that can take `shard` now that `stage` committed it."""
        return [s for s in self.stages if stage in requires(s, self.cfg) and shard not in self._committed(s)
                and all(shard in self._committed(r) for r in requires(s, self.cfg))]

    # ---------------------------------------------------------------- main loop

    def execute(self) -> RunResult:
        ensure_ray(self.cfg)
        all_shards = self.run.plan(self.cfg)
        shards = [s for s in all_shards if self.only is None or s in self.only]
        self.run.clean_stale()
        for stage in self.stages:  # the summaries `status` reads, brought up to date with the files
            summary, changed = reconcile(self.run, stage, len(all_shards))
            self.summaries[stage] = summary
            if changed:
                progress.save(self.run.progress(stage), summary)
        result = RunResult()
        pending = {s: collections.deque() for s in self.stages}
        self.dedup = DedupBarrier(self.cfg, self.run, all_shards) if "dedup" in self.stages else None
        for shard in shards:
            for stage in self.stages:
                if shard in self._committed(stage):
                    continue
                missing = [r for r in requires(stage, self.cfg) if shard not in self._committed(r)]
                if not missing:
                    pending[stage].append(shard)
                elif missing[0] == "download" and self.cfg.input.images_from:
                    result.blocked[(stage, shard)] = f"input.images_from run {self.cfg.input.images_from} has no images for it"
                elif any(up not in self.stages for up in missing):
                    up = next(up for up in missing if up not in self.stages)
                    result.blocked[(stage, shard)] = f"needs {up} output first (run with --stages {up},{stage})"
                if missing and stage != "dedup":
                    break
        if self.dedup is not None:  # every downloaded shard of the plan is hashed, --shards or not
            for shard in sorted(all_shards):
                if shard in self._committed("download"):
                    self.dedup.downloaded(shard)
        if "regions" in self.stages and any(s not in self._committed("regions") for s in shards):
            self._prepare(shards, pending, result)
        need_server = bool(pending.get("download")) and self.run.serve_dir(self.cfg)
        with (serve_folder(self.run.serve_dir(self.cfg)) if need_server else contextlib.nullcontext()) as base:
            self._loop(shards, pending, base, result)
        self.run.drop_leftovers({s: self._committed(s) for s in self.stages})
        if "export" in self.stages:
            n = write_export_index(self.run, all_shards, self.cfg.export.caption_repeats)
            if n is not None:
                log.info("export/index.parquet: %d exported keys", n)
        return result

    def _dedup_fail(self, dd: DedupBarrier, shard: int, result: RunResult) -> None:
        result.failed[("dedup", shard)] = dd.failed
        self._record("dedup", shard, {"status": "failed", "error": dd.failed, "attempts": dd.global_attempts})

    def _dedup_submit(self, dd: DedupBarrier, pending, inflight, task_limit: int) -> None:
        """Hash tasks for downloaded shards (within the task limit), and the global task once all are hashed."""
        while dd.to_hash and sum(1 for v in inflight.values() if v[0].startswith("dedup")) < task_limit:
            shard = dd.to_hash.popleft()
            dd.hashing.add(shard)
            ref = _dedup_task.options(num_cpus=1).remote("hash", self.cfg, self.run.root, shard)
            inflight[ref] = ("dedup:hash", shard, None)
        if dd.ready_for_global():
            dd.global_running = True
            log.info("dedup: global pass over %d shards", len(dd.all))
            ref = _dedup_task.options(num_cpus=1).remote("global", self.cfg, self.run.root, sorted(dd.all))
            inflight[ref] = ("dedup:global", -1, None)

    def _dedup_done(self, dd: DedupBarrier, step: str, shard: int, ref, pending, result: RunResult, retries: int) -> None:
        try:
            summary = ray.get(ref)
        except (ray.exceptions.RayError, Exception) as e:  # noqa: BLE001 - recorded against the waiting shards
            err = error_text(e)
            if step == "dedup:hash":
                dd.hashing.discard(shard)
                dd.global_attempts += 1  # hash and global failures share the stage's retry budget
                if dd.global_attempts <= retries:
                    log.warning("dedup: hashing shard %s failed, retrying: %s", shard_name(shard), err)
                    dd.to_hash.appendleft(shard)
                    return
            else:
                dd.global_running = False
                dd.global_attempts += 1
                if dd.global_attempts <= retries:
                    log.warning("dedup: global pass failed (attempt %d), retrying: %s", dd.global_attempts, err)
                    return
            err = f"dedup {'hashing shard ' + shard_name(shard) if step == 'dedup:hash' else 'global pass'} failed: {err}"
            log.error(err)
            dd.failed = err
            dd.to_hash.clear()
            for s in sorted(dd.waiting):
                self._dedup_fail(dd, s, result)
            dd.waiting.clear()
            return
        if step == "dedup:hash":
            dd.hashing.discard(shard)
            dd.hashed.add(shard)
            return
        dd.global_running, dd.done = False, True
        log.info("dedup: global pass done: %d keys not kept (%.1f s)", summary["not_kept"], summary["seconds"])
        pending["dedup"].extend(sorted(dd.waiting))
        dd.waiting.clear()

    def _prepare(self, shards, pending, result: RunResult) -> None:
        """Train the synthetic detector if the config asks for one; if that fails, regions shards fail with it."""
        try:
            trained = prepare(self.cfg, self.run)
        except Exception as e:  # noqa: BLE001 - recorded against the shards that needed it
            err = f"detector training failed: {error_text(e)}"
            log.error(err)
            for shard in shards:
                if shard not in self._committed("regions"):
                    result.failed[("regions", shard)] = err
                    self._record("regions", shard, {"status": "failed", "error": err, "attempts": 1})
            pending["regions"].clear()
            self.stages.remove("regions")
            return
        if trained:
            how = "cached" if trained["cached"] else f"trained in {trained['seconds']} s"
            print(f"detector mAP50 on synthetic validation: {trained['map50']:.3f} ({how})", flush=True)

    def _cpus(self) -> float:
        """The cluster's CPUs, asked at most every 5 s (nodes join and die during a run)."""
        if time.time() - self._cpus_at[0] > 5:
            self._cpus_at = (time.time(), ray.cluster_resources().get("CPU", 1))
        return self._cpus_at[1]

    def _starves_tasks(self, actor_cpus: int, pending, inflight) -> bool:
        """Whether actors holding `actor_cpus` CPUs (one each) leave no CPU to shard tasks that have work.
        Without this rule a 2-CPU Ray deadlocks: a captions and a regions actor hold both CPUs, waiting for
        download and sentences tasks that can never start."""
        work = (any(actor is None for _, _, actor in inflight.values())  # tasks in flight (an actor's run names it)
                or any(WORKERS[s].kind != "actor" for s in self._busy_stages(pending, {})))
        return work and actor_cpus > self._cpus() - 1

    def _busy_stages(self, pending, inflight) -> set[str]:
        """Stages with shards pending or in flight; dedup's hash and global tasks (`dedup:hash`, `dedup:global`)
        and the hashes it has yet to submit count as dedup's."""
        busy = {s for s in self.stages if pending[s]} | {v[0].split(":", 1)[0] for v in inflight.values()}
        dd = getattr(self, "dedup", None)
        if dd is not None and (dd.to_hash or dd.ready_for_global()):
            busy.add("dedup")
        return busy

    def _loop(self, shards, pending, base_url, result: RunResult) -> None:
        self._cpus_at = (0.0, 1.0)
        cpus = int(self._cpus())
        for stage in self.stages:  # a local Ray cannot grow: an actor it cannot place would wait forever
            need, have = actor_gpus(stage, self.cfg), ray.cluster_resources().get("GPU", 0)
            if need > have and self.cfg.ray.address is None and not set(shards) <= self._committed(stage):
                raise ConfigError(f"{stage}: an actor needs {need:g} GPU(s) (captioners[].gpus, regions.num_gpus) but the Ray "
                                  f"cluster has {have:g}; set gpus: 0 to run on CPU")
        task_limit = self.cfg.ray.download_tasks or max(1, cpus)
        bars = {s: tqdm(total=len(shards), desc=f"{s:>9}", unit="shard", position=i, leave=True,
                        disable=not self.progress, initial=len(self._committed(s) & set(shards)))
                for i, s in enumerate(self.stages)}
        dd = self.dedup
        samples = collections.Counter()
        started = {}
        inflight: dict = {}
        attempts = collections.Counter()
        actors = {s: [] for s in self.stages}  # idle actors
        live_actors = collections.Counter()
        max_actors = {"captions": self.cfg.ray.captions_actors}
        retries = self.cfg.ray.shard_retries
        try:
            while any(pending.values()) or inflight or (dd is not None and (dd.to_hash or dd.ready_for_global())):
                if dd is not None:
                    self._dedup_submit(dd, pending, inflight, task_limit)
                for stage in self.stages:
                    q = pending[stage]
                    while q:
                        shard = q[0]
                        if stage == "dedup" and not dd.done:
                            if dd.failed:
                                self._dedup_fail(dd, q.popleft(), result)
                            else:
                                dd.hold(q.popleft())
                            continue
                        if WORKERS[stage].kind in ("task", "global"):
                            if sum(1 for v in inflight.values() if v[0] == stage) >= task_limit:
                                break
                            ref = _shard_task.options(num_cpus=1).remote(stage, self.cfg, self.run.root, base_url, shard)
                            actor = None
                        else:
                            if (not actors[stage] and live_actors[stage] < max_actors.get(stage, 1)
                                    and not self._starves_tasks(sum(live_actors.values()) + 1, pending, inflight)):
                                actors[stage].append(_StageActor.options(**actor_options(stage, self.cfg)).remote(
                                    stage, self.cfg, self.run.root, base_url))
                                live_actors[stage] += 1
                            if not actors[stage]:
                                break
                            actor = actors[stage].pop()
                            ref = actor.run.remote(shard)
                        q.popleft()
                        started.setdefault(stage, time.time())
                        inflight[ref] = (stage, shard, actor)
                busy = self._busy_stages(pending, inflight)
                for stage in self.stages:  # a model stage that gets no more shards gives its CPUs/GPUs back
                    if actors[stage] and not pending[stage] and busy.isdisjoint(self.stages[:self.stages.index(stage)]):
                        for a in actors[stage]:
                            ray.kill(a, no_restart=True)
                        live_actors[stage] -= len(actors[stage])
                        actors[stage].clear()
                for stage in self.stages:  # tasks waiting for a CPU that idle actors hold: the idle ones go
                    if actors[stage] and not pending[stage] and self._starves_tasks(sum(live_actors.values()),
                                                                                    pending, inflight):
                        ray.kill(actors[stage].pop(), no_restart=True)
                        live_actors[stage] -= 1
                if not inflight:
                    break
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
                for ref in ready:
                    stage, shard, actor = inflight.pop(ref)
                    if stage.startswith("dedup:"):
                        self._dedup_done(dd, stage, shard, ref, pending, result, retries)
                        continue
                    try:
                        summary = ray.get(ref)
                    except (ray.exceptions.RayError, Exception) as e:  # a worker's failure is data, not a crash
                        err = error_text(e)
                        attempts[(stage, shard)] += 1
                        if actor is not None:
                            if isinstance(e, ray.exceptions.RayActorError):
                                live_actors[stage] -= 1
                                ray.kill(actor, no_restart=True)
                            else:
                                actors[stage].append(actor)
                        n = attempts[(stage, shard)]
                        if n <= retries:
                            log.warning("%s shard %s failed (attempt %d), retrying: %s", stage, shard_name(shard), n, err)
                            pending[stage].appendleft(shard)
                        else:
                            result.failed[(stage, shard)] = err
                            self._record(stage, shard, {"status": "failed", "error": err, "attempts": n})
                            log.error("%s shard %s failed after %d attempts: %s", stage, shard_name(shard), n, err)
                        continue
                    if actor is not None:
                        actors[stage].append(actor)
                    summary.update(status="done", attempts=attempts[(stage, shard)] + 1)
                    self._record(stage, shard, summary)
                    result.done += 1
                    samples[stage] += summary.get("rows", 0)
                    bars[stage].update(1)
                    rate = samples[stage] / max(time.time() - started[stage], 1e-6)
                    bars[stage].set_postfix_str(f"{rate:.1f} samples/s", refresh=False)
                    if not self.progress:
                        log.info("%s %s done: %d rows, %d ok, %.1f s (%.1f samples/s in this stage)", stage,
                                 shard_name(shard), summary.get("rows", 0), summary.get("ok", 0),
                                 summary.get("seconds", 0), rate)
                    for nxt in self._next_stages(stage, shard):
                        pending[nxt].append(shard)
                    if stage == "download" and dd is not None:
                        dd.downloaded(shard)
        finally:
            for b in bars.values():
                b.close()
            for a in [a for pool in actors.values() for a in pool] + [v[2] for v in inflight.values() if v[2]]:
                ray.kill(a, no_restart=True)  # in-flight ones too: an interrupted run leaves no actor holding CPUs
        if dd is not None and dd.waiting and not dd.done:
            for shard in sorted(dd.waiting):
                if ("dedup", shard) not in result.failed:
                    result.blocked[("dedup", shard)] = dd.blocked()
        for stage in self.stages:
            if stage in started:
                st = self.manifest["stages"].setdefault(stage, {"shards": {}})
                st["last_run"] = {"samples": samples[stage], "seconds": round(time.time() - started[stage], 3),
                                  "samples_per_s": round(samples[stage] / max(time.time() - started[stage], 1e-6), 2)}
        self._save_manifest()
