"""The regions stage through Ray on a tiny synthetic run: a 1-epoch YOLO, a tiny random open_clip."""

import glob
import json
import socket

import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml

from workflows.cli import main

from conftest import demo_config

REGIONS = {
    "detector": {"train": {"train_images": 8, "val_images": 4, "image_size": 64, "imgsz": 64, "epochs": 1,
                          "batch": 8},
                 "imgsz": 64, "conf": 0.01},
    "division": ["whole", "quadrants"],
    "scorer": {"model": "ViT-S-32", "image_size": 32},
    "threshold": -1.0,
    "goal_json": True,
}


LOOKUPS = []  # host names this process resolved during the run (detector training runs here)


@pytest.fixture(scope="module")
def run_dir(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("regions")
    run_dir = tmp / "run"
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(demo_config(run_dir, regions=REGIONS)))
    resolve = socket.getaddrinfo
    socket.getaddrinfo = lambda host, *a, **k: LOOKUPS.append(host) or resolve(host, *a, **k)
    try:
        assert main(["run", str(tmp / "cfg.yaml"), "--no-progress"]) == 0
    finally:
        socket.getaddrinfo = resolve
    return run_dir


def rows(run_dir, stage):
    return [r for f in sorted(glob.glob(str(run_dir / stage / "0*.parquet"))) for r in pq.read_table(f).to_pylist()]


@pytest.mark.slow
def test_every_key_has_regions_or_a_reason(run_dir, capsys):
    images = {r["key"]: r["status"] for r in rows(run_dir, "images")}
    regions = {r["key"]: r for r in rows(run_dir, "regions")}
    assert sorted(regions) == sorted(images) and len(images) == 12
    for key, r in regions.items():
        if images[key] != "success":
            assert r["status"] == "skipped" and r["error"].startswith("no image (") and r["regions"] is None
        else:
            assert r["status"] == "ok", r["error"]
            assert [g["source"] for g in r["regions"] if g["source"].startswith("grid:")] == [
                "grid:whole:0", "grid:quadrants:0", "grid:quadrants:1", "grid:quadrants:2", "grid:quadrants:3"]
            assert r["n_sentences"] == len(r["matches"]) > 0
            # threshold -1: every best region is kept unless it ties (identical crops, e.g. two empty quadrants)
            assert r["n_pairs"] == sum(m["margin"] is None or m["margin"] > 0 for m in r["matches"])
            assert r["n_pairs"] > 0
            for g in r["regions"]:
                x0, y0, x1, y1 = g["box"]
                assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
                assert (g["score"] is None) == (not g["source"].startswith("det:"))  # grid and union regions
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["regions"]["summary"]["samples_ok"] == 9
    assert (run_dir / "models" / "detector" / "weights.pt").exists()
    assert not [h for h in LOOKUPS if h not in ("127.0.0.1", "localhost", None)]  # ultralytics stayed offline
    assert main(["status", str(run_dir)]) == 0
    assert "regions    shards done 6, failed 0, pending 0" in capsys.readouterr().out


@pytest.mark.slow
def test_export_and_goal_json_carry_the_pairs(run_dir):
    regions = {r["key"]: r for r in rows(run_dir, "regions")}
    tars = sorted(glob.glob(str(run_dir / "export" / "*.tar")))
    samples = list(wds.WebDataset(tars, shardshuffle=False).to_tuple("__key__", "json"))
    assert len(samples) == 9
    for key, raw in samples:
        doc = json.loads(raw)
        r = regions[key]
        assert [b["source"] for b in doc["regions"]["boxes"]] == [g["source"] for g in r["regions"]]
        assert [p["sentence"] for p in doc["regions"]["pairs"]] == [m["sentence"] for m in r["matches"] if m["kept"]]
    goal = [g for f in sorted(glob.glob(str(run_dir / "regions" / "*.goal.json"))) for g in json.loads(open(f).read())]
    assert sorted(g["original_filename"] for g in goal) == sorted(f"{k}.jpg" for k, _ in samples)
    for g in goal:
        assert all(set(s) == {"caption", "bbox_coordinates", "similarity_score"} for s in g["segment"])
        assert all(0 <= v <= 128 for s in g["segment"] for v in s["bbox_coordinates"])


@pytest.mark.slow
def test_eval_pairs_and_resume(run_dir, capsys):
    truth = pq.read_table(run_dir / "synth" / "truth.parquet").to_pylist()
    ok_ids = {r["id"] for r in rows(run_dir, "images") if r["status"] == "success"}
    n_objects = sum(len(t["objects"]) for t in truth if t["id"] in ok_ids)
    assert main(["eval-pairs", str(run_dir), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["shards_with_regions"] == 6 and rep["sentences_without_truth"] == 0
    assert isinstance(rep["detector"]["map50"], float) and 0 <= rep["detector"]["map50"] <= 1
    obj = rep["pairs"]["object"]
    assert obj["sentences"] == n_objects and 0 < obj["pairs"] <= n_objects
    assert rep["all"]["pairs"] == sum(r["n_pairs"] or 0 for r in rows(run_dir, "regions"))
    bg = rep["pairs"]["background"]
    assert bg["sentences"] == 9 and bg["coverage"] == 1.0  # the whole-image region is the background's box
    assert rep["kinds"]["background"] == {"scene": 9}  # classified as scene sentences: paired with the whole image
    assert (bg["pairs"], bg["precision"]) == (9, 1.0)
    assert set(rep["kinds"]["relation"]) == {"relation"} and set(rep["kinds"]["object"]) == {"object"}
    assert main(["eval-pairs", str(run_dir), "--json", "--ablations"]) == 0
    abl = json.loads(capsys.readouterr().out)["ablations"]
    before = abl["best region for every kind, labels off (before issue 20)"]
    assert before["pairs"]["object"]["sentences"] == obj["sentences"]
    assert before["pairs"]["background"]["precision"] is not None and before["pairs"]["background"]["pairs"] <= 9
    assert (run_dir / "report" / "eval_pairs.json").exists()
    # a second start skips every shard and reuses the trained detector
    before = {f: open(f, "rb").read() for f in glob.glob(str(run_dir / "regions" / "*"))}
    assert main(["run", str(run_dir), "--no-progress"]) == 0
    assert "(cached)" not in capsys.readouterr().out  # nothing left to do: no detector step at all
    assert {f: open(f, "rb").read() for f in glob.glob(str(run_dir / "regions" / "*"))} == before
    # a shard redone by a new actor (new random-init scorer, same seed) gives the same bytes
    (run_dir / "regions" / "00001.parquet").unlink()
    assert main(["run", str(run_dir), "--stages", "regions", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "detector mAP50 on synthetic validation" in out and "(cached)" in out
    assert {f: open(f, "rb").read() for f in glob.glob(str(run_dir / "regions" / "*"))} == before


@pytest.mark.slow
def test_failed_detector_training_fails_the_regions_shards_not_the_run(ray_session, tmp_path, capsys):
    regions = {**REGIONS, "detector": {"train": {**REGIONS["detector"]["train"], "model": "no-such-model.yaml"}}}
    run_dir = tmp_path / "run"
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(demo_config(run_dir, regions=regions,
                                                                  **{"run.shard_size": 6})))
    assert main(["run", str(tmp_path / "cfg.yaml"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "FAILED regions shard 00000: detector training failed" in err and "no-such-model.yaml" in err
    assert len(rows(run_dir, "sentences")) == 12  # the stages before it finished
    assert not list(run_dir.glob("regions/*.parquet")) and not list(run_dir.glob("export/*.parquet"))
    entry = json.loads((run_dir / "manifest.json").read_text())["stages"]["regions"]["shards"]["00001"]
    assert entry["status"] == "failed" and "detector training failed" in entry["error"]
