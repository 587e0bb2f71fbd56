"""`longcap selftrain`: the loop's rounds are recorded, a rerun skips them, an interrupted loop resumes, and
changed settings redo the rounds they touch. A tiny synthetic run (division regions only, a tiny random
open_clip in the regions stage), tiny FAST-GOAL models trained for a few steps."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml

from pipeline.config import ConfigError, SelfTrainSection, load_config
from workflows.cli import main

from conftest import demo_config

REGIONS = {"division": ["whole", "halves", "quadrants"], "scorer": {"model": "ViT-S-32", "image_size": 32},
           "threshold": -1.0}
LOOP = ["selftrain.steps=3", "selftrain.local_steps=2", "selftrain.batch_size=4", "selftrain.workers=0",
        "selftrain.threads=1", "selftrain.warmup=1"]


@pytest.fixture(scope="module")
def run(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("selftrain")
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(demo_config(tmp / "run", regions=REGIONS)))
    assert main(["run", str(tmp / "cfg.yaml"), "--no-progress"]) == 0
    return tmp / "run"


def loop(run, capsys, *extra) -> tuple[dict, str]:
    capsys.readouterr()
    assert main(["selftrain", str(run), *LOOP, *extra]) == 0
    return json.loads((run / "selftrain" / "rounds.json").read_text()), capsys.readouterr().out


def truth_counts(run) -> dict:
    """Sentences per truth kind over the images the run downloaded."""
    ids = {r["id"] for f in sorted((run / "images").glob("0*.parquet")) for r in pq.read_table(f).to_pylist()
           if r["status"] == "success"}
    counts = {"object": 0, "relation": 0, "background": 0}
    for r in pq.read_table(run / "synth" / "truth.parquet").to_pylist():
        if r["id"] in ids:
            for s in r["sentences"]:
                counts[s["kind"]] += 1
    return counts


def strip_seconds(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k != "seconds"}


def test_rounds_recorded_then_skipped_resumed_and_redone(run, capsys):
    record, out = loop(run, capsys)
    rounds = record["rounds"]
    assert [(e["round"], e["kind"], e["model"], e["step"]) for e in rounds] == [
        (0, "global", "goal-tiny-global", 3), (1, "local", "goal-tiny", 2)]
    counts = truth_counts(run)
    assert counts["object"] > 0 and counts["relation"] > 0 and counts["background"] == 9
    for e in rounds:
        assert {k: m["sentences"] for k, m in e["pairs"].items()} == counts
        # scene sentences pair with the whole image: right by construction, every one of them kept
        assert e["pairs"]["background"] == {"sentences": 9, "pairs": 9, "right": 9, "precision": 1.0, "recall": 1.0,
                                            "coverage": 1.0}
        assert e["all"]["right"] == sum(m["right"] for m in e["pairs"].values())
        assert e["all"]["pairs"] == e["pairs_kept"]
        for m in e["pairs"].values():
            assert 0 <= m["right"] <= m["pairs"] <= m["sentences"]
        # the round's pairs are its own regions' kept matches, and its export carries them
        regions = [r for f in sorted((run / "selftrain" / f"round-{e['round']}" / "regions").glob("*.parquet"))
                   for r in pq.read_table(f).to_pylist()]
        assert sum(r["n_pairs"] or 0 for r in regions) == e["pairs_kept"]
        kept = {r["key"]: sorted(m["sentence_index"] for m in r["matches"] or [] if m["kept"]) for r in regions}
        tars = sorted((run / "selftrain" / f"round-{e['round']}" / "export").glob("*.tar"))
        assert tars
        for sample in wds.WebDataset([str(t) for t in tars], shardshuffle=False).decode():
            doc = sample["json"]
            assert sorted(p["sentence_index"] for p in doc["regions"]["pairs"]) == kept[doc["key"]]
        assert Path(e["checkpoint"]).is_relative_to(run / "selftrain" / f"round-{e['round']}" / "model")
    assert "selftrain round 1 (local, goal-tiny, step 2)" in out and "background       9      9      9" in out
    # round 1 started from round 0's weights
    assert (run / "selftrain" / "round-1" / "init-clip.safetensors").exists()

    # a rerun: every round recorded with the same settings is skipped, nothing is trained, the record is the same
    model_file = Path(rounds[1]["checkpoint"]) / "model.safetensors"
    mtime = model_file.stat().st_mtime_ns
    again, out = loop(run, capsys)
    assert again == record
    assert "round 0 (global, goal-tiny-global): recorded, skipped" in out
    assert "round 1 (local, goal-tiny): recorded, skipped" in out
    assert model_file.stat().st_mtime_ns == mtime

    # killed after round 0 was recorded: the rerun skips round 0 and finishes round 1 from its checkpoint
    (run / "selftrain" / "rounds.json").write_text(json.dumps({**record, "rounds": rounds[:1]}))
    resumed, out = loop(run, capsys)
    assert "round 0 (global, goal-tiny-global): recorded, skipped" in out
    assert "selftrain round 1 (local): training goal-tiny" in out
    assert [strip_seconds(e) for e in resumed["rounds"]] == [strip_seconds(e) for e in rounds]

    # changed settings of round 1 only: round 0 stays, round 1 is trained again from the start
    changed, out = loop(run, capsys, "selftrain.local_steps=3")
    assert changed["rounds"][0] == rounds[0]
    assert changed["rounds"][1]["step"] == 3 and changed["rounds"][1]["settings"]["steps"] == 3
    assert "round 1 (local, goal-tiny): recorded" not in out

    # changed settings of round 0: both rounds are trained again, round 1 from scratch on the new round 0
    before = (run / "selftrain" / "round-1" / "init-clip.safetensors").stat().st_mtime_ns
    both, out = loop(run, capsys, "selftrain.local_steps=3", "selftrain.steps=4")
    assert [e["step"] for e in both["rounds"]] == [4, 3]
    assert "recorded, skipped" not in out and "selftrain round 1 (local): training goal-tiny" in out
    assert (run / "selftrain" / "round-1" / "init-clip.safetensors").stat().st_mtime_ns != before
    rows = (Path(both["rounds"][1]["checkpoint"]).parent / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in rows if '"loss"' in x] == [1, 2, 3]  # not resumed from the old model

    # the record is what eval-pairs reports per round
    capsys.readouterr()
    assert main(["eval-pairs", str(run)]) == 0
    text = capsys.readouterr().out
    assert "self-training round 0 (global, goal-tiny-global, step 4;" in text
    assert "self-training round 1 (local, goal-tiny, step 3;" in text


def test_selftrain_config_checks(tmp_path):
    assert SelfTrainSection().rounds == 1 and SelfTrainSection().model_changes == {"long_text": "chunk"}
    data = demo_config(tmp_path / "r", regions=REGIONS)
    for bad in ({"global_model": "caft-tiny"}, {"local_model": "nope"}, {"regions": {"treshold": 0.1}}):
        (tmp_path / "c.yaml").write_text(yaml.safe_dump({**data, "selftrain": bad}))
        with pytest.raises(ConfigError):
            load_config(str(tmp_path / "c.yaml"))
    assert main(["selftrain", str(tmp_path / "nothing")]) == 2
