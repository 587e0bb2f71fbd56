"""Training loader throughput (one worker process, 224 px) vs a plain loop doing the same decode, resize and tokenise.

Both take the same 256-px JPEG samples with long captions (8 sentences) from
webdataset shards. The plain loop reads the tars with tarfile, decodes with
PIL, applies the same torchvision transform and tokenises the same N texts
(picked by the same function); the loader streams through webdataset with
shuffling, per-key seeding, masks and collation into batches.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

SENT = "A {c} {s} sits near the {p} corner of the wooden table under a warm lamp."


def make_shards(folder: Path, n: int, per_shard: int = 250) -> list[str]:
    rng = np.random.default_rng(0)
    urls = []
    for start in range(0, n, per_shard):
        path = folder / f"{start // per_shard:05d}-000.tar"
        with wds.TarWriter(str(path)) as w:
            for i in range(start, min(n, start + per_shard)):
                arr = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, "JPEG", quality=90)
                sents = [SENT.format(c=c, s=s, p=p) for c, s, p in zip(
                    ["red", "blue", "green", "pink"] * 2, ["cube", "ball", "cone", "box"] * 2, ["left", "right"] * 4)]
                caps = [{"captioner": "long", "prompt_id": "p", "sentences": sents, "text": " ".join(sents)},
                        {"captioner": "short", "prompt_id": "p", "sentences": sents[:1], "text": sents[0]}]
                w.write({"__key__": f"{i:09d}", "jpg": buf.getvalue(), "json": json.dumps({"captions": caps}).encode()})
        urls.append(str(path))
    return urls


def plain_loop(urls, cfg, batch: bool = True) -> int:
    """Read tars, decode, transform, pick and tokenise texts; with `batch`, also stack images and token
    rows into batches of cfg.batch_size (the work a trainer needs done; the loader always does it)."""
    import torch

    from model.data import decode_image, image_transform, pick_texts, tokenize  # decode_image: pipeline.images

    n = 0
    tf = image_transform(cfg.image_size)
    images, tokens = [], []
    for url in urls:
        with tarfile.open(url) as t:
            members = {}
            for m in t.getmembers():
                members.setdefault(m.name.split(".")[0], {})[m.name.split(".", 1)[1]] = t.extractfile(m).read()
        for key, files in members.items():
            img = tf(decode_image(files["jpg"], cfg.max_pixels))
            texts, _ = pick_texts(json.loads(files["json"])["captions"], random.Random(key), cfg)
            tok = tokenize(texts, cfg.context_length)
            n += 1
            if batch:
                images.append(img)
                tokens.append(tok)
                if len(images) == cfg.batch_size:
                    torch.stack(images), torch.stack(tokens)
                    images, tokens = [], []
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    import torch

    from model.data import DataConfig, dataset

    torch.set_num_threads(1)  # one worker process = one core
    work = Path(tempfile.mkdtemp(prefix="longcap-loader-"))
    urls = make_shards(work, args.samples)
    cfg = DataConfig(train=True, batch_size=64, n_sub=8, k_chunks=4, shuffle_buffer=500)
    best = {"plain": 0.0, "plain_unbatched": 0.0, "loader": 0.0}
    for r in range(args.repeats):
        t0 = time.perf_counter()
        n = plain_loop(urls, cfg, batch=False)
        best["plain_unbatched"] = max(best["plain_unbatched"], n / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        n = plain_loop(urls, cfg)
        best["plain"] = max(best["plain"], n / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        m = sum(len(b["keys"]) for b in dataset(urls, cfg))
        best["loader"] = max(best["loader"], m / (time.perf_counter() - t0))
        print(json.dumps({"repeat": r, "plain_samples": n, "loader_samples": m,
                          "plain_unbatched_per_s": round(best["plain_unbatched"], 1),
                          "plain_per_s": round(best["plain"], 1), "loader_per_s": round(best["loader"], 1)}), flush=True)
    print(json.dumps({"summary": True, "samples": args.samples, "image_px": 256, "model_px": cfg.image_size,
                      "plain_samples_per_s": round(best["plain"], 1), "loader_samples_per_s": round(best["loader"], 1),
                      "plain_unbatched_samples_per_s": round(best["plain_unbatched"], 1),
                      "ratio": round(best["loader"] / best["plain"], 3),
                      "ratio_vs_unbatched": round(best["loader"] / best["plain_unbatched"], 3)}))


if __name__ == "__main__":
    main()
