"""After training: the regions stage's regions rescored with the trained CAFT (the scorer interface of the
regions stage), written to regions-caft/<shard>.parquet in the regions schema; `eval-pairs` compares both."""

from __future__ import annotations

import logging

from pipeline.download import read_images_meta, shard_name
from pipeline.storage import atomic_write_table, read_table
from .rundir import RunDir

log = logging.getLogger("longcap.rescore")


def rescore_with_caft(cfg, run: RunDir, checkpoint: str, shards: list[int]) -> int:
    """Rescore every shard that has regions; returns the number of kept pairs."""
    from model.scorer import CaftScorer
    from pipeline.regions import RegionPairer

    scorer = CaftScorer(checkpoint)
    pairer = RegionPairer(cfg.regions, scorer, None, cfg.download.max_image_area)
    kept = 0
    for shard in shards:
        if not run.is_done("regions", shard):
            continue
        fixed = {r["key"]: r["regions"] for r in read_table(run.output("regions", shard), ["key", "regions"]).to_pylist()
                 if r["regions"]}
        out = pairer.pair_shard(read_images_meta(run.images(), shard), run.images(f"{shard_name(shard)}.tar"),
                                read_table(run.output("sentences", shard)), fixed=fixed)
        atomic_write_table(run.output("regions_caft", shard), out)
        kept += sum(n or 0 for n in out["n_pairs"].to_pylist())
    log.info("regions rescored with %s: %d pairs kept", scorer.name, kept)
    return kept
