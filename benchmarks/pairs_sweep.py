"""Local pairs of a finished synthetic run, re-paired in memory with changed regions settings (no files written).

    python -m benchmarks.pairs_sweep RUN SCORER CHANGE [CHANGE ...]

SCORER: `stage` (the run's regions.scorer) or a trained checkpoint (model/scorer.py load_scorer: a selftrain round's
model/ folder, a CAFT). CHANGE: a JSON object of regions keys ({"margin": 0.03}); {"detector": {...}} changes the
detector's inference settings. The run's images are detected again with the run's detector (so detector and region
settings can change), every sentence paired by RegionPairer (the regions stage's code), and measured like
`longcap eval-pairs` (workflows/evalpairs.py). Crop and sentence embeddings are cached across changes."""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np


class CachedScorer:
    """A scorer whose embeddings are kept by image bytes / text, so each change re-embeds only new crops."""

    def __init__(self, scorer):
        self.scorer, self.images, self.texts, self.name = scorer, {}, {}, scorer.name

    def encode_images(self, ims):
        keys = [hashlib.sha1(im.tobytes() + str(im.size).encode()).hexdigest() for im in ims]
        todo = {k: im for k, im in zip(keys, ims) if k not in self.images}
        if todo:
            self.images.update(zip(todo, self.scorer.encode_images(list(todo.values()))))
        return np.stack([self.images[k] for k in keys]) if keys else np.zeros((0, 0), np.float32)

    def encode_texts(self, texts):
        todo = [t for t in dict.fromkeys(texts) if t not in self.texts]
        if todo:
            self.texts.update(zip(todo, self.scorer.encode_texts(todo)))
        return np.stack([self.texts[t] for t in texts])


def main(argv: list[str]) -> None:
    from pipeline.config import load_config
    from pipeline.detector import Detector
    from pipeline.regions import RegionPairer
    from pipeline.scorers import build_scorer
    from workflows.evalpairs import KINDS, collect_items, pair_metrics
    from workflows.rundir import RunDir
    from workflows.stages import detector_weights

    run = RunDir(argv[0])
    cfg = load_config(run.path("run.yaml"))
    shards = run.plan(cfg)
    if argv[1] == "stage":
        scorer = CachedScorer(build_scorer(cfg.regions.scorer, "cpu", cfg.run.seed))
    else:
        from model.scorer import load_scorer

        scorer = CachedScorer(load_scorer(argv[1], "cpu"))
    detectors = {}
    for arg in argv[2:]:
        change = json.loads(arg)
        det = change.pop("detector", {})
        key = json.dumps(det, sort_keys=True)
        if key not in detectors:
            detectors[key] = Detector(cfg.regions.detector.model_copy(update=det), detector_weights(cfg, run), "cpu")
        pairer = RegionPairer(cfg.regions.model_copy(update=change), scorer, detectors[key])
        items, _, _ = collect_items(run, shards, rescore=pairer, redetect=True)
        m = {k: pair_metrics(items.get(k, []), 0.5) for k in KINDS}
        print(arg, " | ".join(f"{k} P {v['precision']} R {v['recall']} pairs {v['pairs']}" for k, v in m.items()),
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
