"""Where longcap's download spends CPU beyond img2dataset's own Downloader, one shard, one process, no Ray.

Runs the same shard of N loopback URLs through (a) img2dataset's Downloader with its plain Resizer and (b)
longcap's `download_shard` (the same Downloader behind the image check and the URL guard, writing through
longcap's KeyOrderWriter, then the commit), alternating, and reports CPU seconds (all threads of this process)
per repeat; then one more untimed run of (b) under cProfile (main thread: where img2dataset resizes and longcap
checks and writes), cumulative seconds of longcap's own functions, inflated by the profiler. CPU time, not wall
time: the machine is shared.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import shutil
import time
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))  # an installed package may also be called `benchmarks`
from download_bench import serve_images  # noqa: E402


def plain(rows: pa.Table, out: Path, shard_id: int, cfg) -> None:
    """img2dataset's Downloader as `img2dataset.download` drives it for one shard."""
    from img2dataset.downloader import Downloader
    from img2dataset.resizer import Resizer
    from img2dataset.writer import WebDatasetSampleWriter

    out.mkdir(parents=True, exist_ok=True)
    with pa.ipc.new_file(str(out / "input.arrow"), rows.schema) as w:
        w.write_table(rows)
    resizer = Resizer(image_size=cfg.image_size, resize_mode=cfg.resize_mode,
                      resize_only_if_bigger=cfg.resize_only_if_bigger, encode_format=cfg.encode_format,
                      encode_quality=cfg.encode_quality, min_image_size=cfg.min_image_size,
                      max_image_area=cfg.max_image_area, max_aspect_ratio=cfg.max_aspect_ratio)
    d = Downloader(sample_writer_class=WebDatasetSampleWriter, resizer=resizer, thread_count=cfg.threads,
                   save_caption=False, extract_exif=True, output_folder=str(out), column_list=rows.column_names,
                   timeout=cfg.timeout, number_sample_per_shard=rows.num_rows, oom_shard_count=5,
                   compute_hash="sha256", verify_hash_type=None, encode_format=cfg.encode_format,
                   retries=cfg.retries, user_agent_token=cfg.user_agent_token,
                   disallowed_header_directives=cfg.disallowed_header_directives)
    ok, _ = d((shard_id, str(out / "input.arrow")))
    assert ok


def main() -> None:
    from pipeline.config import DownloadSection
    from pipeline.download import download_shard

    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()

    work, base, server = serve_images(args.images, "longcap-prof-")
    rows = pa.table({"url": [f"{base}/{i:06d}.jpg" for i in range(args.images)]})
    cfg = DownloadSection(image_size=args.size, threads=args.threads, timeout=10, encode_quality=95,
                          allow_networks=["127.0.0.1/32"])
    prof = cProfile.Profile()
    results = []
    try:
        plain(rows.slice(0, 50), work / "warm", 0, cfg)  # imports and first-use costs outside the timings
        download_shard(0, rows.slice(0, 50), str(work / "warm-l"), cfg, args.images)
        for r in range(args.repeats):
            row = {}
            for name in (("plain", "longcap") if r % 2 == 0 else ("longcap", "plain")):
                out = work / f"{name}-{r}"
                c0, t0 = time.process_time(), time.time()
                if name == "plain":
                    plain(rows, out, r + 1, cfg)
                else:
                    download_shard(r + 1, rows, str(out), cfg, args.images)
                row[name] = {"cpu_s": round(time.process_time() - c0, 3), "wall_s": round(time.time() - t0, 3)}
                shutil.rmtree(out, ignore_errors=True)
            row["cpu_ratio_longcap_over_plain"] = round(row["longcap"]["cpu_s"] / row["plain"]["cpu_s"], 3)
            print(json.dumps({"repeat": r, **row}), flush=True)
            results.append(row)
        prof.enable()  # a separate, untimed run: the profiler's own cost stays out of the CPU ratios
        download_shard(99, rows, str(work / "profiled"), cfg, args.images)
        prof.disable()
    finally:
        server.terminate()
        shutil.rmtree(work, ignore_errors=True)
    stats = pstats.Stats(prof)
    own = {}
    for (file, _, fn), (_, _, tt, ct, _) in stats.stats.items():
        if "pipeline/" in file:
            own[f"{Path(file).name}:{fn}"] = round(ct, 3)
    print(json.dumps({"longcap_functions_cumulative_s_per_shard": dict(sorted(own.items(), key=lambda x: -x[1])[:12])}))


if __name__ == "__main__":
    main()
