"""The embedded demo end to end (configs/demo.yaml, made small): pipeline, then training and evaluation."""

import json
from pathlib import Path

import pytest

from workflows.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_config_runs_end_to_end_with_training(ray_session, tmp_path, capsys):
    run = tmp_path / "demo"
    small = [f"run.dir={run}", "input.synthetic.families=5", "input.synthetic.image_size=128",
             "download.image_size=128", "train.steps=4", "train.log_every=2", "train.ckpt_every=2",
             "train.image_size=56", "train.workers=0", "train.batch_size=4", "train.warmup=1",
             "regions.detector.train.train_images=8", "regions.detector.train.val_images=4",
             "regions.detector.train.epochs=1", "regions.detector.train.imgsz=64", "regions.detector.imgsz=64",
             "regions.scorer.image_size=64"]
    assert main(["run", str(ROOT / "configs" / "demo.yaml"), *small, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "all accounted for" in out and "trained to step 4" in out
    assert "held-out retrieval on 3 images (chance R@1 = 0.333)" in out  # family 0 of 5 is held out: 3 variants
    assert "grounding mIoU" in out and "a mask of the whole image scores" in out
    assert "detector mAP50 on synthetic validation" in out
    assert "regions rescored with the trained caft-tiny" in out and "the trained CAFT (regions-caft/)" in out
    assert sorted(p.name for p in (run / "regions-caft").glob("*.parquet")) == \
        sorted(p.name for p in (run / "regions").glob("*.parquet"))
    import pyarrow.parquet as pq

    first = [r for f in sorted((run / "regions").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    again = [r for f in sorted((run / "regions-caft").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert [r["key"] for r in first] == [r["key"] for r in again]

    def boxes(regions):  # union boxes of relation sentences depend on the scorer's choice; the rest stays
        return [g for g in regions or [] if not g["source"].startswith("union:")]

    assert [boxes(r["regions"]) for r in first] == [boxes(r["regions"]) for r in again]  # the same boxes, rescored
    assert sum(len(r["matches"] or []) for r in again) == sum(len(r["matches"] or []) for r in first) > 0
    rows = [json.loads(x) for x in (run / "models" / "caft-tiny" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4] and rows[-1]["step"] == 4 and "eval" in rows[-1]
    assert (run / "models" / "caft-tiny" / "latest").read_text().strip() == "step-0000004"
    assert list((run / "models" / "caft-tiny" / "tensorboard").glob("events.out.tfevents.*"))  # tensorboard installed
    # a second run finds everything done: no new steps, the same evaluation printed again
    assert main(["run", str(run), "--no-progress"]) == 0
    again = capsys.readouterr().out
    assert "trained to step 4" in again
    rows2 = (run / "models" / "caft-tiny" / "metrics.jsonl").read_text().splitlines()
    assert len([r for r in rows2 if '"loss"' in r]) == 2
    # the demo's next command: the self-training loop on the run's own captions, both rounds recorded with
    # pairs per kind; the report's gallery then shows the last round's pairs
    assert main(["selftrain", str(ROOT / "configs" / "demo.yaml"), f"run.dir={run}", "selftrain.steps=2",
                 "selftrain.batch_size=4", "selftrain.workers=0", "selftrain.warmup=1"]) == 0
    record = json.loads((run / "selftrain" / "rounds.json").read_text())
    assert [(e["round"], e["kind"], e["step"]) for e in record["rounds"]] == [(0, "global", 2), (1, "local", 2)]
    assert all(e["pairs"]["background"]["precision"] == 1.0 for e in record["rounds"])
    assert main(["report", str(run)]) == 0
    assert "selftrain/round-1/regions/ (self-training round 1" in (run / "report" / "index.html").read_text()
