"""Run alone (a fresh process, so its peak RSS is its own): every place longcap decodes an image gets the
decompression bombs; prints JSON {step: [outcome, peak RSS growth in MB]}. Used by test_bomb.py."""

from __future__ import annotations

import json
import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: http_helpers
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from faults import BOMB, QUIET_BOMB, ImageFaults  # noqa: E402

LIMIT = 50_000_000  # pixels; QUIET_BOMB is 144 Mpixel, BOMB 900 Mpixel


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def outcome(fn) -> str:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the named refusal is the expected outcome
        return f"{type(e).__name__}: {e}"[:200]
    return "decoded"


def main() -> None:
    from pipeline.config import DownloadSection
    from pipeline.download import download_shard
    from pipeline.images import decode_image
    from pipeline.records import download_reason
    from workflows.serve import serve

    results = {}
    with serve(ImageFaults) as base, tempfile.TemporaryDirectory() as tmp:
        cfg = DownloadSection(image_size=64, timeout=5, threads=4, max_image_area=LIMIT, allow_networks=["127.0.0.1/32"])
        download_shard(0, pa.table({"url": ["ok/0.jpg"]}), tmp, cfg, 10, base)  # warm up: imports, threads
        before = peak_mb()
        download_shard(1, pa.table({"url": ["quiet-bomb.png", "bomb.png"]}), tmp, cfg, 10, base)
        meta = pq.read_table(f"{tmp}/00001.parquet").to_pylist()
        results["download"] = ["; ".join(f"{download_reason(m['status'], m['error_message'])}: {m['error_message']}"
                                         for m in meta), peak_mb() - before]
    # the one guard, called as each stage calls it (captions, regions, training loader / evaluation / report)
    for name, fn in [("captions", lambda b: decode_image(b, LIMIT, max_side=768)),
                     ("regions", lambda b: decode_image(b, LIMIT, 1024, 16)),
                     ("loader", lambda b: decode_image(b, LIMIT))]:
        for label, bomb in (("quiet", QUIET_BOMB), ("bomb", BOMB)):
            before = peak_mb()
            results[f"{name}:{label}"] = [outcome(lambda: fn(bomb)), peak_mb() - before]
    results["_sizes"] = [len(QUIET_BOMB), len(BOMB)]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
