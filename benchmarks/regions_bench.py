"""Regions stage throughput vs raw YOLO predict + raw open_clip encoding of the same images, crops and sentences.

The stage (RegionPairer.pair_shard) reads the shard's tar, decodes each image
(pixel limit, mode conversion), runs the detector in batches, builds and
filters regions, crops, embeds crops and sentences, scores every region
against every sentence, selects pairs and builds the Arrow table. The
baseline gets the decoded images in memory and only calls YOLO.predict on
them, then open_clip on the same crops (cut beforehand) and the same texts the
stage embeds (its unique sentences, and the noun phrases it scores relation and
object sentences by). Both run in one process with the same torch thread count.
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
import pyarrow as pa


def make_shard(out: Path, n: int, size: int, seed: int = 0):
    """A synthetic shard: tar of JPEGs, img2dataset-like meta, a sentences table."""
    from pipeline import synthetic
    from pipeline.records import SENTENCES, empty_row

    rng = random.Random(seed)
    meta, sents = [], []
    with tarfile.open(out / "00000.tar", "w") as tf:
        for i in range(n):
            scene = synthetic.random_scene(rng)
            img, _ = synthetic.render(scene, size)
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=92)
            key = f"{i:09d}"
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(buf.getvalue())
            tf.addfile(info, io.BytesIO(buf.getvalue()))
            meta.append({"key": key, "status": "success", "error_message": None, "width": size, "height": size})
            texts = [s["text"] for s in synthetic.sentences(scene)]
            sents.append(empty_row(SENTENCES, key=key, captioner="source", prompt_id="caption", text=" ".join(texts),
                                   sentences=texts, excluded=False, exclude_reasons=[], status="ok"))
    return pa.Table.from_pylist(meta), str(out / "00000.tar"), pa.Table.from_pylist(sents, schema=SENTENCES)


def bench(images: int = 128, size: int = 256, weights: str = "yolo11n.yaml", conf: float = 0.25, imgsz: int = 256,
          clip_model: str = "ViT-S-32", clip_size: int = 96, threads: int = 1, repeats: int = 3,
          device: str = "cpu", log=print) -> dict:
    """Stage vs raw libraries on one synthetic shard; returns the summary (best images/s of each side)."""
    import torch

    from pipeline.config import RegionsSection
    from pipeline.detector import Detector
    from pipeline.images import decode_image
    from pipeline.regions import RegionPairer, crop
    from pipeline.scorers import build_scorer

    torch.set_num_threads(threads)
    cfg = RegionsSection(detector={"weights": weights, "imgsz": imgsz, "conf": conf},
                         scorer={"model": clip_model, "image_size": clip_size})
    detector = Detector(cfg.detector, weights, device)
    scorer = build_scorer(cfg.scorer, device)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    pairer = RegionPairer(cfg, scorer, detector)
    with tempfile.TemporaryDirectory() as tmp:
        meta, tar, sents = make_shard(Path(tmp), images, size)
        encoded: list[str] = []  # every text the stage embeds: sentences, and noun phrases of relation/object ones
        encode = pairer._encode_texts
        pairer._encode_texts = lambda texts: (encoded.extend(texts), encode(texts))
        out = pairer.pair_shard(meta, tar, sents)  # warm-up; also gives the crops and texts the baseline encodes
        pairer._encode_texts = encode
        from pipeline.export import image_members

        decoded = [decode_image(f["jpg"], 1e9, 1024, 1) for _, f in image_members(tar)]
        arrays = [np.ascontiguousarray(np.asarray(im)[:, :, ::-1]) for im in decoded]
        crops = [crop(im, g["box"]) for im, r in zip(decoded, out.to_pylist()) for g in r["regions"]]
        texts = sorted(set(encoded))
        n_sentences = len({s for ss in sents["sentences"].to_pylist() for s in ss})
        best = {"stage": 0.0, "raw": 0.0}
        for rep in range(repeats):
            sync()
            t0 = time.perf_counter()
            pairer.pair_shard(meta, tar, sents)
            sync()
            stage = len(decoded) / (time.perf_counter() - t0)
            best["stage"] = max(best["stage"], stage)
            t = [time.perf_counter()]
            for i in range(0, len(arrays), cfg.detector.batch):
                detector.predict(arrays[i:i + cfg.detector.batch])
            sync()
            t.append(time.perf_counter())
            scorer.encode_images(crops)
            t.append(time.perf_counter())
            scorer.encode_texts(texts)
            t.append(time.perf_counter())
            raw = len(decoded) / (t[-1] - t[0])
            best["raw"] = max(best["raw"], raw)
            log(json.dumps({"repeat": rep, "stage_images_per_s": round(stage, 2), "raw_images_per_s": round(raw, 2),
                            "ratio": round(stage / raw, 3),
                            "raw_s": {"yolo": round(t[1] - t[0], 2), "crops": round(t[2] - t[1], 2),
                                      "texts": round(t[3] - t[2], 2)}}))
    n_det = sum(g["source"].startswith("det:") for r in out.to_pylist() for g in r["regions"])
    return {"summary": True, "device": device, "images": len(decoded), "crops": len(crops), "detections": n_det,
            "sentences_unique": n_sentences, "texts_encoded": len(texts), "threads": threads, "weights": weights,
            "clip": f"{clip_model}@{clip_size}", "stage_images_per_s": round(best["stage"], 2),
            "raw_images_per_s": round(best["raw"], 2), "ratio": round(best["stage"] / best["raw"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--weights", default="yolo11n.yaml", help="detector weights (default: random-init yolo11n)")
    ap.add_argument("--conf", type=float, default=0.25)
    ap.add_argument("--imgsz", type=int, default=256)
    ap.add_argument("--clip-model", default="ViT-S-32")
    ap.add_argument("--clip-size", type=int, default=96)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a Ray actor with num_cpus=1 has 1)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    print(json.dumps(bench(a.images, a.size, a.weights, a.conf, a.imgsz, a.clip_model, a.clip_size, a.threads,
                           a.repeats, a.device)))


if __name__ == "__main__":
    main()
