"""Cost as the corpus grows (issue 18 item 4).

1. Runner overhead per shard per stage and driver memory: the real Runner (Ray tasks, commits, progress
   summaries, manifest) over N shards with DRY stages: each stage's worker writes a 4-row output parquet with
   the columns `status` reads and does no other work (no network, no model). So the time is the runner's own.
2. `longcap status RUN --json` time and peak memory (a fresh process, imports included, like a user runs it),
   fast path (progress summaries + one listing per stage) and `--full` (every shard's files) where affordable.
   1k and 10k shards: the run made by (1). 100k shards: made without Ray, by writing each shard's output
   files and committing them to the progress summaries through the runner's own code (Runner._record);
   the files are the same as (1)'s.
3. A CPU stage on 1 vs 2 Ray nodes (ray.cluster_utils.Cluster, 1 CPU per node): the real sentences stage
   (spaCy) over the same shards; speed-up = time(1 node) / time(2 nodes).

    python benchmarks/scale_bench.py runner --shards 1000
    python benchmarks/scale_bench.py synth --shards 100000
    python benchmarks/scale_bench.py nodes --shards 16
Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ROWS = 4  # rows per shard
STAGES = ["download", "captions", "sentences", "export"]


def dry_table(stage: str, shard: int):
    import pyarrow as pa

    keys = [f"{shard:05d}{i:04d}" for i in range(ROWS)]
    if stage == "download":
        return pa.table({"key": keys, "status": ["success"] * (ROWS - 1) + ["failed_to_download"],
                         "error_message": [None] * (ROWS - 1) + ["HTTP Error 404: Not Found"]})
    if stage == "export":
        return pa.table({"key": keys, "shard": [f"{shard:05d}"] * ROWS, "exported": [True] * (ROWS - 1) + [False],
                         "tar": [f"{shard:05d}.tar"] * ROWS,
                         "reasons": [[]] * (ROWS - 1) + [["no image: http_404"]]})
    return pa.table({"key": keys, "status": ["ok"] * (ROWS - 1) + ["skipped"],
                     "error": [None] * (ROWS - 1) + ["no image (http_404)"]})


class DryWorker:
    """A stage worker that commits a tiny output and does nothing else."""
    kind = "task"
    stage = ""

    def __init__(self, cfg, root, base_url=None):
        from workflows.rundir import RunDir

        self.run_dir = RunDir(root)

    def run(self, shard: int) -> dict:
        from pipeline.storage import atomic_write_table

        atomic_write_table(self.run_dir.output(self.stage, shard), dry_table(self.stage, shard))
        return {"rows": ROWS, "ok": ROWS - 1, "reasons": {"skipped": 1}}


def install_dry() -> None:
    """Ray worker_process_setup_hook (and the driver): every stage's worker is a DryWorker."""
    from workflows import stages

    for s in STAGES:
        stages.WORKERS[s] = type(f"Dry{s}", (DryWorker,), {"stage": s})


def url_list(path: Path, n: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"url": [f"http://127.0.0.1:9/{i}.jpg" for i in range(n)],
                             "caption": ["a caption."] * n}), path)


def config(run: Path, urls: Path, shards: int):
    from pipeline.config import load_config

    return load_config(data={"run": {"dir": str(run), "shard_size": ROWS, "stages": STAGES},
                             "input": {"urls": [str(urls)], "format": "parquet", "caption_cols": ["caption"]},
                             "download": {"allow_networks": ["127.0.0.1/32"]},
                             "captioners": [{"name": "source", "backend": "source"}],
                             "ray": {"num_cpus": 2}})


def time_status(run: Path, full: bool, repeats: int) -> dict:
    """`longcap status` in a fresh process: wall seconds and peak RSS (MB) per repeat."""
    # the child reports its own peak (VmHWM): getrusage of a forked child would include this process's RSS
    argv = ["status", str(run), "--json"] + (["--full"] if full else [])
    code = ("import sys; from workflows.cli import main; rc = main(%r); "
            "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1], file=sys.stderr); "
            "sys.exit(rc)" % argv)
    walls, rss = [], []
    for _ in range(repeats):
        t0 = time.time()
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                           env=dict(os.environ, PYTHONPATH=str(ROOT), LONGCAP_LOG="WARNING"))
        walls.append(round(time.time() - t0, 3))
        assert p.returncode == 0, p.stderr[-2000:]
        rss.append(round(int(p.stderr.split()[-1]) / 1024, 1))
        st = json.loads(p.stdout)
        assert st["accounted"], p.stdout[-500:]
    imports = subprocess.run([sys.executable, "-c", "import time; t=time.time(); import workflows.status, "
                              "workflows.cli; print(time.time()-t)"], capture_output=True, text=True, cwd=ROOT,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return {"status_s": walls, "status_rss_mb": rss, "full": full, "import_s": round(float(imports.stdout), 3),
            "urls": st["urls"], "accounting": st["accounting"]}


def cmd_runner(args) -> None:
    import ray

    from workflows.rundir import RunDir
    from workflows.runner import Runner

    tmp = Path(tempfile.mkdtemp(prefix="scale-", dir=args.tmp))
    try:
        urls, run = tmp / "urls.parquet", tmp / "run"
        url_list(urls, args.shards * ROWS)
        cfg = config(run, urls, args.shards)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"worker_process_setup_hook": "benchmarks.scale_bench.install_dry",
                              "env_vars": {"PYTHONPATH": str(ROOT)}})
        install_dry()
        rd = RunDir(str(run))
        rd.check_config(cfg)
        t0 = time.time()
        rd.plan(cfg)
        plan_s = time.time() - t0
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t0 = time.time()
        res = Runner(cfg, rd, progress=False).execute()
        loop_s = time.time() - t0
        assert res.ok and res.done == args.shards * len(STAGES), (res.failed, res.done)
        manifest = json.loads((run / "manifest.json").read_text())
        work_s = sum(e.get("seconds", 0) for st in manifest["stages"].values() for e in st["shards"].values())
        n = args.shards * len(STAGES)
        print(json.dumps({"bench": "runner", "shards": args.shards, "stages": len(STAGES), "plan_s": round(plan_s, 2),
                          "loop_s": round(loop_s, 2), "worker_s": round(work_s, 2),
                          "overhead_ms_per_shard_stage": round(1000 * (loop_s - work_s / 2) / n, 2),
                          "wall_ms_per_shard_stage": round(1000 * (loop_s + plan_s) / n, 2),
                          "driver_rss_mb_before": round(rss0, 1),
                          "driver_rss_mb_peak": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}),
              flush=True)
        ray.shutdown()
        print(json.dumps({"bench": "status", "shards": args.shards, **time_status(run, False, args.repeats)}), flush=True)
        if args.shards <= 10_000:
            print(json.dumps({"bench": "status", "shards": args.shards, **time_status(run, True, 1)}), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cmd_synth(args) -> None:
    """A run of N shards without Ray: the plan, every stage's output files (the dry stages' bytes), progress
    summaries and manifest entries; the last 1000 shards of each stage go through the runner's own commit
    bookkeeping (Runner._record), timed, the rest are added to the summaries in memory (same result)."""
    import io

    import pyarrow.parquet as pq

    from workflows import progress
    from workflows.rundir import RunDir
    from workflows.runner import Runner

    tmp = Path(tempfile.mkdtemp(prefix="scale-", dir=args.tmp))
    try:
        urls, run = tmp / "urls.parquet", tmp / "run"
        url_list(urls, args.shards * ROWS)
        cfg = config(run, urls, args.shards)
        rd = RunDir(str(run))
        rd.check_config(cfg)
        t0 = time.time()
        rd.plan(cfg)
        plan_s = time.time() - t0
        runner = Runner(cfg, rd, progress=False)
        t0 = time.time()
        timed = set(range(max(0, args.shards - 1000), args.shards))
        record_s, n_timed = 0.0, 0
        for s in STAGES:
            summary = runner.summaries[s] = progress.StageSummary(s, args.shards)
            folder = Path(rd.stage_dir(s))
            folder.mkdir(parents=True, exist_ok=True)
            from workflows.status import stage_counts

            for shard in range(args.shards):
                buf = io.BytesIO()
                pq.write_table(dry_table(s, shard), buf)
                (folder / f"{shard:05d}.parquet").write_bytes(buf.getvalue())
                if shard == 0:
                    rows, urls_, err = stage_counts(rd, s, 0)
                entry = {"status": "done", "rows": ROWS, "ok": ROWS - 1, "seconds": 0.0}
                if shard in timed:
                    t1 = time.time()
                    runner._record(s, shard, {**entry, "counts": {"rows": dict(rows), "urls": dict(urls_ or {}),
                                                                  "error": err}})
                    record_s += time.time() - t1
                    n_timed += 1
                else:
                    summary.add(shard, f"{shard:05d}", rows, urls_)
                    runner.manifest["stages"].setdefault(s, {"shards": {}})["shards"][f"{shard:05d}"] = entry
        runner._save_manifest()
        print(json.dumps({"bench": "synth-run", "shards": args.shards, "plan_s": round(plan_s, 2),
                          "build_s": round(time.time() - t0, 1),
                          "record_ms_per_commit": round(1000 * record_s / max(n_timed, 1), 3),
                          "manifest_mb": round((run / "manifest.json").stat().st_size / 1e6, 1),
                          "driver_rss_mb_peak": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                          "run": str(run)}), flush=True)
        print(json.dumps({"bench": "status", "shards": args.shards, **time_status(run, False, args.repeats)}), flush=True)
        if args.full:
            print(json.dumps({"bench": "status", "shards": args.shards, **time_status(run, True, 1)}), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def cmd_status_only(args) -> None:
    """`status` alone at N shards: plan.json, one empty placeholder file per shard and stage (status lists the
    folders; it opens only outputs its summary does not know), and the progress summaries as the runner leaves
    them after N commits. Says nothing about the runner; measures status's own cost at N."""
    from pipeline.storage import atomic_write_json
    from workflows import progress
    from workflows.rundir import RunDir
    from workflows.status import stage_counts

    tmp = Path(tempfile.mkdtemp(prefix="scale-", dir=args.tmp))
    try:
        run = tmp / "run"
        urls = tmp / "urls.parquet"
        url_list(urls, ROWS)
        cfg = config(run, urls, 1)
        rd = RunDir(str(run))
        rd.check_config(cfg)
        rd.plan(cfg)  # one real shard: its outputs give the counts every placeholder shard is said to have
        counts = {}
        for s in STAGES:
            from pipeline.storage import atomic_write_table

            atomic_write_table(rd.output(s, 0), dry_table(s, 0))
            counts[s] = stage_counts(rd, s, 0)
        atomic_write_json(rd.images("_shards", "plan.json"), {"shards": args.shards, "rows": args.shards * ROWS,
                                                             "shard_size": ROWS, "sources": [str(urls)]})
        t0 = time.time()
        for s in STAGES:
            folder = Path(rd.stage_dir(s))
            summary = progress.StageSummary(s, args.shards)
            rows, u, _ = counts[s]
            for shard in range(args.shards):
                if shard:
                    (folder / f"{shard:05d}.parquet").touch()
                summary.add(shard, f"{shard:05d}", rows, u)
            progress.save(rd.progress(s), summary)
        print(json.dumps({"bench": "status-only-build", "shards": args.shards, "build_s": round(time.time() - t0, 1)}),
              flush=True)
        print(json.dumps({"bench": "status", "shards": args.shards, "placeholders": True,
                          **time_status(run, False, args.repeats)}), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cmd_nodes(args) -> None:
    """The sentences stage (spaCy, CPU) over the same shards on a cluster of 1, then 2, one-CPU nodes."""
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.synthetic import write_world
    from workflows.rundir import RunDir
    from workflows.runner import Runner
    from pipeline.config import load_config

    tmp = Path(tempfile.mkdtemp(prefix="nodes-", dir=args.tmp))
    try:
        # captions of the synthetic world, made long (x20 sentences) so a shard is ~1 s of spaCy
        world = tmp / "world"
        write_world(world, families_n=args.shards, variants=4, image_size=32, seed=0, broken=False)
        import pyarrow as pa
        import pyarrow.parquet as pq

        t = pq.read_table(world / "urls.parquet")
        long = [" ".join([c] * args.repeat_caption) for c in t["caption"].to_pylist()]
        pq.write_table(t.set_column(t.column_names.index("caption"), "caption", pa.array(long)), world / "urls.parquet")
        results = {}
        for nodes in (1, 2):
            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
            for _ in range(nodes - 1):
                cluster.add_node(num_cpus=1)
            ray.init(address=cluster.address, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
            cluster.wait_for_nodes()
            run = tmp / f"run{nodes}"
            cfg = load_config(data={"run": {"dir": str(run), "shard_size": args.shard_size},
                                    "input": {"urls": [str(world / "urls.parquet")], "format": "parquet",
                                              "caption_cols": ["caption"], "serve_dir": str(world)},
                                    "download": {"allow_networks": ["127.0.0.1/32"], "image_size": 32},
                                    "captioners": [{"name": "source", "backend": "source"}],
                                    "ray": {"address": cluster.address}})
            rd = RunDir(str(run))
            rd.check_config(cfg)
            assert Runner(cfg, rd, stages=["download", "captions"], progress=False).execute().ok
            t0 = time.time()
            res = Runner(cfg, rd, stages=["sentences"], progress=False).execute()
            secs = time.time() - t0
            assert res.ok
            results[nodes] = secs
            print(json.dumps({"bench": "nodes", "nodes": nodes, "cpus": nodes, "shards": len(rd.plan(cfg)),
                              "sentences_s": round(secs, 2)}), flush=True)
            ray.shutdown()
            cluster.shutdown()
        print(json.dumps({"bench": "nodes", "speedup_2_vs_1": round(results[1] / results[2], 2)}), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["runner", "synth", "status", "nodes"])
    ap.add_argument("--shards", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shard-size", type=int, default=4, help="nodes: URLs per shard (--shards is the families, x4 URLs)")
    ap.add_argument("--repeat-caption", type=int, default=20)
    ap.add_argument("--tmp", default=None)
    ap.add_argument("--keep", action="store_true", help="synth: keep the run (its folder is printed)")
    ap.add_argument("--full", action="store_true", help="synth: also time `status --full`")
    a = ap.parse_args()
    {"runner": cmd_runner, "synth": cmd_synth, "status": cmd_status_only, "nodes": cmd_nodes}[a.mode](a)
