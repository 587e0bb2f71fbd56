"""Download-stage throughput: longcap (Ray runner, per-shard img2dataset + checks) vs img2dataset called directly.

Both fetch the same URL list from the same loopback HTTP server (a separate
process), with the same processes/threads, image size, shard size and hashing.
Each measurement is one fresh Python process timed from spawn to exit, so each tool pays its own start-up
(img2dataset its process pool, longcap its local Ray) the same way; the tools alternate which goes first.
Images are counted from what was written (the .jpg members of the output tars). Prints one JSON line per
measurement, the per-repeat ratio longcap / img2dataset (wall, and the tool call alone for reference).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from PIL import Image  # noqa: E402


def make_images(folder: Path, n: int, size: int) -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = np.roll(base, i, axis=(0, 1)).repeat(8, 0).repeat(8, 1)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=90)
        (folder / f"{i:06d}.jpg").write_bytes(buf.getvalue())


def _serve(folder: str, q) -> None:
    from workflows.serve import serve_folder

    with serve_folder(folder) as base:
        q.put(base)
        while True:
            time.sleep(3600)


def serve_images(n: int, prefix: str, timeout: float = 60):
    """n JPEGs of 384 px in a temp folder, served on 127.0.0.1 by a spawned process: (folder, base URL, process)."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    make_images(work / "www", n, 384)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    server = ctx.Process(target=_serve, args=(str(work / "www"), q), daemon=True)
    server.start()
    return work, q.get(timeout=timeout), server


def run_img2dataset(url_list: str, out: str, procs: int, threads: int, shard: int, image_size: int) -> dict:
    from img2dataset import download

    t0 = time.time()
    download(url_list=url_list, output_folder=out, processes_count=procs, thread_count=threads,
             number_sample_per_shard=shard, output_format="webdataset", input_format="parquet", url_col="url",
             image_size=image_size, resize_mode="keep_ratio", resize_only_if_bigger=True, encode_format="jpg",
             timeout=10, compute_hash="sha256", extract_exif=True, distributor="multiprocessing",
             enable_wandb=False)
    return {"call_s": time.time() - t0}


def run_longcap(url_list: str, run_dir: str, procs: int, threads: int, shard: int, image_size: int) -> dict:
    from pipeline.config import load_config
    from workflows.rundir import RunDir
    from workflows.runner import Runner, ensure_ray

    cfg = load_config(data={
        "run": {"dir": run_dir, "shard_size": shard, "stages": ["download"]},
        "ray": {"num_cpus": procs, "download_tasks": procs},
        "input": {"urls": [url_list]},
        "download": {"image_size": image_size, "threads": threads, "timeout": 10, "allow_networks": ["127.0.0.1/32"]},
    })
    t0 = time.time()
    ensure_ray(cfg)  # what `longcap run` does: its own local Ray
    t1 = time.time()
    result = Runner(cfg, RunDir(run_dir), progress=False).execute()
    assert result.ok, result.failed
    return {"ray_start_s": t1 - t0, "call_s": time.time() - t1}


def _one(name: str, args: list) -> None:
    """Child process: one tool, one repeat; prints its own timings as JSON."""
    t = time.time()
    fn = {"img2dataset": run_img2dataset, "longcap": run_longcap}[name]
    out = fn(*args)
    out["in_process_s"] = time.time() - t
    print("RESULT " + json.dumps(out), flush=True)


def measure(name: str, args: list) -> dict:
    """One tool in a fresh Python process, timed from spawn to exit: interpreter start, imports, the tool's own
    start-up (img2dataset's process pool, longcap's local Ray) and shut-down count the same for both."""
    import subprocess
    import sys

    here = str(Path(__file__).resolve().parent)  # by path: an installed package may also be called `benchmarks`
    code = f"import sys; sys.path.insert(0, {here!r}); import download_bench as b; b._one({name!r}, {args!r})"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    t0 = time.time()
    cpu = CpuMeter(proc.pid)
    stdout, stderr = proc.communicate()
    wall = time.time() - t0
    cpu.stop()
    res = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    if res.returncode != 0:
        raise RuntimeError(f"{name} failed ({res.returncode}): {res.stderr[-3000:]}")
    inner = json.loads([x for x in res.stdout.splitlines() if x.startswith("RESULT ")][-1][7:])
    return {"wall_s": wall, "cpu_s": cpu.total(), "cpu_by_process": cpu.by_name(), **inner}


class CpuMeter:
    """CPU seconds (user + system) of a process and all its descendants (Ray's gcs/raylet/workers, img2dataset's
    pool), polled every 0.1 s: on a shared machine the CPU cost per image is steadier than wall time, which follows
    whatever else runs. A process that ends between two polls loses at most its last 0.1 s."""

    def __init__(self, pid: int):
        import threading

        import psutil

        self.root, self.seen, self.names, self.done = psutil.Process(pid), {}, {}, threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self):
        import psutil

        while not self.done.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                procs = []
            for p in procs:
                try:
                    t = p.cpu_times()
                    key = (p.pid, p.create_time())
                    self.names[key] = _short_name(p.cmdline())  # each time: a forked child execs its own program
                    self.seen[key] = t.user + t.system
                except psutil.Error:
                    pass
            self.done.wait(0.1)

    def stop(self):
        self.done.set()
        self.thread.join()

    def total(self) -> float:
        return sum(self.seen.values())

    def by_name(self) -> dict:
        out = {}
        for k, v in self.seen.items():
            out[self.names[k]] = round(out.get(self.names[k], 0) + v, 2)
        return dict(sorted(out.items(), key=lambda x: -x[1]))


def _short_name(cmd: list[str]) -> str:
    """ray::IDLE / ray::_shard_task / raylet / gcs_server / log_monitor.py / the tool's own python ..."""
    if not cmd:
        return "?"
    if cmd[0].startswith("ray::"):
        return cmd[0].split()[0]
    scripts = [Path(c).name for c in cmd[1:3] if c.endswith(".py")]
    if scripts:
        return scripts[0]
    if len(cmd) > 1 and cmd[1] == "-c":
        return "python -c (" + ("multiprocessing child" if "multiprocessing" in cmd[2] else "the tool") + ")"
    return Path(cmd[0]).name


def count_written(out: str) -> int:
    """Images as written: .jpg members of every tar under `out` (not the list size, not a status column)."""
    import tarfile

    n = 0
    for tar in Path(out).rglob("*.tar"):
        with tarfile.open(tar) as t:
            n += sum(1 for m in t.getmembers() if m.isfile() and m.name.endswith(".jpg"))
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--shard", type=int, default=500)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    work, base, server = serve_images(args.images, "longcap-bench-", timeout=30)
    urls = [f"{base}/{i:06d}.jpg" for i in range(args.images)]
    pq.write_table(pa.table({"url": urls}), work / "urls.parquet")

    rows = []
    try:
        for r in range(args.repeats):
            # alternate which tool goes first, so a slow spell on the shared machine does not favour one side
            order = ("img2dataset", "longcap") if r % 2 == 0 else ("longcap", "img2dataset")
            pair = {}
            for name in order:
                out = str(work / f"{name}-{r}")
                m = measure(name, [str(work / "urls.parquet"), out, args.procs, args.threads, args.shard, args.size])
                m["written"] = count_written(out)
                m["images_per_s"] = m["written"] / m["wall_s"]
                pair[name] = m
                print(json.dumps({"tool": name, "repeat": r, **{k: round(v, 2) if isinstance(v, float) else v
                                                                for k, v in m.items()}}), flush=True)
                shutil.rmtree(out, ignore_errors=True)
            ratio = pair["longcap"]["images_per_s"] / pair["img2dataset"]["images_per_s"]
            ratio_call = (pair["longcap"]["written"] / pair["longcap"]["call_s"]) / (
                pair["img2dataset"]["written"] / pair["img2dataset"]["call_s"])
            ratio_cpu = (pair["img2dataset"]["cpu_s"] / pair["img2dataset"]["written"]) / (
                pair["longcap"]["cpu_s"] / pair["longcap"]["written"])
            rows.append({"ratio": ratio, "ratio_call": ratio_call, "ratio_cpu": ratio_cpu})
            print(json.dumps({"repeat": r, "ratio_wall": round(ratio, 3), "ratio_call_only": round(ratio_call, 3),
                              "ratio_cpu_per_image": round(ratio_cpu, 3)}), flush=True)
    finally:
        server.terminate()
        shutil.rmtree(work, ignore_errors=True)
    ratios = [x["ratio"] for x in rows]
    print(json.dumps({"summary": True, "images": args.images, "shard": args.shard, "procs": args.procs,
                      "threads": args.threads, "ratios_wall": [round(x, 3) for x in ratios],
                      "mean_ratio_wall": round(sum(ratios) / len(ratios), 3),
                      "ratios_call_only": [round(x["ratio_call"], 3) for x in rows],
                      "ratios_cpu_per_image": [round(x["ratio_cpu"], 3) for x in rows]}))


if __name__ == "__main__":
    main()
