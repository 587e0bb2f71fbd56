"""Export-format shards of the synthetic world with `regions` (exact sentence boxes as local pairs), for the GOAL
and grouping tests."""

import json

import pyarrow.parquet as pq
import webdataset as wds

from model.localdata import truth_regions
from pipeline.config import TrainSection


def region_shards(world, folder, per_shard=5, regions=True, limit=None):
    rows = pq.read_table(world / "truth.parquet").to_pylist()[:limit]
    folder.mkdir(parents=True, exist_ok=True)
    urls = []
    for s in range(0, len(rows), per_shard):
        path = folder / f"{s // per_shard:05d}-000.tar"
        with wds.TarWriter(str(path)) as w:
            for i, r in enumerate(rows[s:s + per_shard]):
                key = f"{s // per_shard:05d}{i:04d}"
                doc = {"key": key, "captions": [{"captioner": "source", "prompt_id": "caption", "text": r["caption"],
                                                 "sentences": [x["text"] for x in r["sentences"]]}],
                       "extra": {"id": r["id"], "split": r["split"], "family": r["family"]}}
                if regions:
                    doc["regions"] = truth_regions(r)
                w.write({"__key__": key, "jpg": (world / "images" / f"{r['id']}.jpg").read_bytes(),
                         "json": json.dumps(doc).encode()})
        urls.append(str(path))
    return urls


def tiny_train(**kw):
    base = dict(steps=3, batch_size=4, warmup=1, log_every=1, ckpt_every=100, workers=0, n_sub=2, k_chunks=2,
                image_size=64, lr=1e-3, tensorboard=False, threads=1, epoch_samples=8)
    base.update(kw)
    return TrainSection(**base)
