"""Regions and local pairs: division boxes, filters, pair selection, decoding, the stage logic, metrics."""

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.config import ConfigError, RegionsSection, load_config
from pipeline.division import area_filter, build_regions, dedup, division_regions
from pipeline.matching import select_pairs
from pipeline.records import REGIONS, SENTENCES, empty_row
from pipeline.regions import RegionPairer, crop, goal_records
from workflows.evalpairs import pair_metrics

# ---------------------------------------------------------------- division and filters


def boxes(regions):
    return [r["box"] for r in regions]


def test_division_boxes_are_exact():
    assert boxes(division_regions(["whole"])) == [[0, 0, 1, 1]]
    assert boxes(division_regions(["halves"])) == [[0, 0, 0.5, 1], [0.5, 0, 1, 1], [0, 0, 1, 0.5], [0, 0.5, 1, 1]]
    assert boxes(division_regions(["quadrants"])) == [[0, 0, .5, .5], [.5, 0, 1, .5], [0, .5, .5, 1], [.5, .5, 1, 1]]
    t = 1 / 3
    grid = boxes(division_regions(["3x3"]))
    assert len(grid) == 9
    assert grid[0] == [0, 0, t, t] and grid[4] == [t, t, 2 * t, 2 * t] and grid[8] == [2 * t, 2 * t, 1, 1]
    assert grid[5] == [2 * t, t, 1, 2 * t]  # row by row, left to right
    srcs = [r["source"] for r in division_regions(["whole", "quadrants"])]
    assert srcs == ["grid:whole:0", "grid:quadrants:0", "grid:quadrants:1", "grid:quadrants:2", "grid:quadrants:3"]
    assert all(r["score"] is None for r in division_regions(["3x3"]))
    with pytest.raises(ValueError, match="unknown division scheme 'fifths'"):
        division_regions(["fifths"])


def det(box, score, cls="circle"):
    return {"box": box, "source": f"det:{cls}", "score": score}


def test_area_filter_bounds_are_inclusive():
    regs = [det([0, 0, 0.1, 0.1], .9), det([0, 0, 0.05, 0.1], .9), det([0, 0, 0.8, 1.0], .9), det([0, 0, 0.9, 1], .9)]
    kept = area_filter(regs, 0.01, 0.8)  # areas 0.01, 0.005, 0.8, 0.9
    assert boxes(kept) == [[0, 0, 0.1, 0.1], [0, 0, 0.8, 1.0]]
    assert area_filter([], 0.01, 0.8) == []


def test_dedup_keeps_the_earlier_of_near_duplicates():
    a, b, c = det([0, 0, .5, .5], .9), det([0, 0, .5, .49], .5), det([.5, .5, 1, 1], .4)  # IoU(a, b) = 0.98
    assert dedup([a, b, c], 0.9) == [a, c]
    assert dedup([a, b, c], 0.99) == [a, b, c]
    assert dedup([b, a], 0.9) == [b]
    # keep_classes: a near-duplicate of another class stays (the detector's other reading); of its own class not
    other, grid = det([0, 0, .5, .49], .5, "star"), {"box": [0, 0, .5, .5], "source": "grid:quadrants:0", "score": None}
    assert dedup([a, other, b, grid], 0.9, keep_classes=True) == [a, other]
    assert dedup([a, other], 0.9) == [a]


def test_build_regions_orders_detections_by_score_then_division():
    dets = [det([.1, .1, .3, .3], .4, "star"), det([.6, .6, .9, .9], .8, "square"), det([0, 0, .05, .05], .99)]
    regs = build_regions(dets, ["whole", "halves"], 0.01, 0.8, 0.9)
    assert [r["source"] for r in regs] == ["det:square", "det:star", "grid:whole:0", "grid:halves:0",
                                           "grid:halves:1", "grid:halves:2", "grid:halves:3"]
    # a detection equal to a division box replaces it
    regs = build_regions([det([0, 0, .5, 1], .7)], ["halves"], 0.01, 0.8, 0.9)
    assert [r["source"] for r in regs] == ["det:circle", "grid:halves:1", "grid:halves:2", "grid:halves:3"]


def test_no_detections_still_gives_division_regions():
    assert boxes(build_regions([], ["quadrants"], 0.01, 0.8, 0.9)) == boxes(division_regions(["quadrants"]))


# ---------------------------------------------------------------- pair selection


def test_select_pairs_threshold_and_margin():
    s = np.array([[0.30, 0.10, 0.25],
                  [0.20, 0.15, 0.24],
                  [0.10, 0.05, 0.05]])  # regions x sentences
    out = select_pairs(s, threshold=0.2, margin=0.05, top_k=2)
    assert [m["region"] for m in out] == [0, 1, 0]
    assert [m["kept"] for m in out] == [True, False, False]  # s1 below threshold; s2 margin 0.01 too small
    assert out[0]["margin"] == pytest.approx(0.10) and out[2]["margin"] == pytest.approx(0.01)
    assert out[0]["top_regions"] == [0, 1] and out[0]["top_scores"] == pytest.approx([0.30, 0.20])
    assert select_pairs(s, threshold=0.2, margin=0.0, top_k=3)[2]["kept"]
    assert select_pairs(s, threshold=0.3, margin=0.0, top_k=1)[0]["kept"]  # score == threshold is kept


def test_select_pairs_ties_go_to_the_first_region_and_are_not_kept():
    s = np.array([[0.1, 0.5], [0.5, 0.5], [0.5, 0.2]])
    out = select_pairs(s, threshold=0.0, margin=0.0, top_k=3)
    assert [m["region"] for m in out] == [1, 0]
    assert [m["kept"] for m in out] == [False, False] and out[0]["margin"] == 0.0
    assert out[0]["top_regions"] == [1, 2, 0]


def test_select_pairs_one_region_and_no_regions():
    one = select_pairs(np.array([[0.3, 0.1]]), threshold=0.2, margin=0.5, top_k=3)
    assert [(m["region"], m["margin"], m["kept"]) for m in one] == [(0, None, True), (0, None, False)]
    none = select_pairs(np.zeros((0, 2)), threshold=0.0, margin=0.0, top_k=3)
    assert [(m["region"], m["kept"], m["top_regions"]) for m in none] == [(None, False, [])] * 2
    assert select_pairs(np.zeros((3, 0)), 0, 0, 1) == []


# ---------------------------------------------------------------- crops (decoding: test_images.py)


def encode(im, fmt="JPEG", **kw):
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def test_crop_is_at_least_one_pixel():
    im = Image.new("RGB", (10, 10))
    assert crop(im, [0, 0, 0.5, 0.5]).size == (5, 5)
    assert crop(im, [0.99, 0.99, 1.0, 1.0]).size == (1, 1)
    assert crop(im, [0.42, 0.42, 0.42, 0.42]).size == (1, 1)


# ---------------------------------------------------------------- the stage logic

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


class ColourScorer:
    """A transparent scorer for tests: images by mean colour, texts by the colour words they name."""

    name = "colour"

    def __init__(self):
        self.image_batches = []

    def encode_images(self, images):
        self.image_batches.append(len(images))
        v = np.array([np.asarray(im, np.float64).reshape(-1, 3).mean(0) for im in images]) - 128
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    def encode_texts(self, texts):
        v = np.array([sum((np.array(c, float) - 128) * (w in t) for w, c in COLOURS.items()) + 1e-9 for t in texts])
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def two_colour_image(size=(64, 64), mode="RGB"):
    """Left half red, right half blue."""
    a = np.zeros((size[1], size[0], 3), np.uint8)
    a[:, : size[0] // 2] = COLOURS["red"]
    a[:, size[0] // 2:] = COLOURS["blue"]
    return Image.fromarray(a).convert(mode)


def shard_inputs(tmp_path, images: dict, sentences: dict, failed=()):
    """images/<shard>.tar + meta table + sentences table for keys -> (bytes | None) and keys -> [sentences] | None."""
    tar_path = tmp_path / "00000.tar"
    with tarfile.open(tar_path, "w") as tf:
        for key in sorted(images):
            if images[key] is None:
                continue
            for ext, data in (("jpg", images[key]), ("json", b"{}")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    meta = pa.Table.from_pylist([{"key": k, "status": "failed_to_download" if k in failed else "success",
                                  "error_message": "HTTP Error 404: Not Found" if k in failed else None,
                                  "width": 64, "height": 64} for k in sorted(images)])
    rows = [empty_row(SENTENCES, key=k, captioner="src", prompt_id="caption", text=" ".join(s), sentences=s,
                      excluded=False, exclude_reasons=[], status="ok")
            for k, s in sorted(sentences.items()) if s is not None]
    return meta, str(tar_path), pa.Table.from_pylist(rows, schema=SENTENCES)


def regions_cfg(**kw):
    return RegionsSection(**{"division": ["halves"], "threshold": 0.5, "margin": 0.1, **kw})


def test_pair_shard_matches_colours_and_accounts_for_every_key(tmp_path):
    jpg = encode(two_colour_image(), quality=95)
    images = {"000": jpg, "001": jpg, "002": None, "003": b"garbage", "004": encode(Image.new("RGB", (1, 1))),
              "005": jpg, "006": encode(two_colour_image(mode="L")), "007": encode(two_colour_image(mode="CMYK"))}
    sents = {"000": ["A red square.", "A blue square.", "Something grey."], "001": [], "003": ["x."],
             "004": ["A red dot."], "006": ["A red thing."], "007": ["The red half.", "The blue half."]}
    meta, tar, st = shard_inputs(tmp_path, images, sents, failed={"002"})
    scorer = ColourScorer()
    out = RegionPairer(regions_cfg(), scorer).pair_shard(meta, tar, st)
    assert out.schema == REGIONS
    rows = {r["key"]: r for r in out.to_pylist()}
    assert sorted(rows) == sorted(images)  # every key, in a row

    r = rows["000"]
    assert r["status"] == "ok" and r["n_regions"] == 4 and r["n_sentences"] == 3 and r["n_pairs"] == 2
    assert [g["source"] for g in r["regions"]] == ["grid:halves:0", "grid:halves:1", "grid:halves:2",
                                                   "grid:halves:3"]
    red, blue, grey = r["matches"]
    assert (red["region"], red["kept"], blue["region"], blue["kept"]) == (0, True, 1, True)
    assert red["score"] > 0.99 and red["top_regions"][0] == 0 and len(red["top_scores"]) == 3
    assert not grey["kept"]  # names no colour: every score ~0, below the threshold
    assert [m["sentence_index"] for m in r["matches"]] == [0, 1, 2]

    assert rows["001"]["status"] == "skipped" and "no sentences: src/caption: 0 sentences" in rows["001"]["error"]
    assert rows["001"]["n_regions"] == 4 and rows["001"]["n_pairs"] == 0  # regions, but no pairs
    assert rows["005"]["status"] == "skipped" and rows["005"]["error"] == "no sentences"
    assert rows["002"]["status"] == "skipped" and rows["002"]["error"] == "no image (http_404)"
    assert rows["003"]["status"] == "failed" and rows["003"]["error"].startswith("not an image")
    assert rows["004"]["status"] == "failed" and "image too small: 1x1 px" in rows["004"]["error"]
    assert rows["006"]["status"] == "ok" and rows["006"]["n_pairs"] == 0  # grayscale: no colour to match
    assert rows["007"]["status"] == "ok" and [m["region"] for m in rows["007"]["matches"]] == [0, 1]
    assert sum(scorer.image_batches) == 4 * 5  # five decodable images, four crops each, in one batch


def test_goal_json_and_export_doc(tmp_path):
    from pipeline.export import regions_by_key

    meta, tar, st = shard_inputs(tmp_path, {"000": encode(two_colour_image())},
                                 {"000": ["A red square.", "A blue square.", "Grey."]})
    out = RegionPairer(regions_cfg(), ColourScorer()).pair_shard(meta, tar, st)
    goal = goal_records(out, st)
    assert len(goal) == 1 and goal[0]["original_filename"] == "000.jpg"
    assert goal[0]["original_caption"] == "A red square. A blue square. Grey."
    assert [(s["caption"], s["bbox_coordinates"]) for s in goal[0]["segment"]] == [
        ("A red square.", [0, 0, 32, 64]), ("A blue square.", [32, 0, 64, 64])]
    assert all(s["similarity_score"] > 0.99 for s in goal[0]["segment"])
    doc = regions_by_key(out)["000"]
    json.dumps(doc)
    assert len(doc["boxes"]) == 4 and [p["region"] for p in doc["pairs"]] == [0, 1]


def test_yolo_with_no_detections_still_gives_division_regions(tmp_path):
    from pipeline.config import DetectorSection
    from pipeline.detector import Detector

    dcfg = DetectorSection(weights="yolo11n.yaml", conf=1.0, imgsz=64)  # random init; nothing reaches conf 1
    detector = Detector(dcfg, "yolo11n.yaml", "cpu")
    meta, tar, st = shard_inputs(tmp_path, {"000": encode(two_colour_image())}, {"000": ["A red square."]})
    out = RegionPairer(regions_cfg(division=["whole", "quadrants"]), ColourScorer(), detector).pair_shard(meta, tar, st)
    r = out.to_pylist()[0]
    assert r["status"] == "ok" and [g["source"] for g in r["regions"]] == [
        "grid:whole:0", "grid:quadrants:0", "grid:quadrants:1", "grid:quadrants:2", "grid:quadrants:3"]
    # importing ultralytics patches PIL.Image.open; a non-image must still be a per-key failure, not a crash
    meta, tar, st = shard_inputs(tmp_path, {"001": b"<html>no</html>"}, {"001": ["A red square."]})
    bad = RegionPairer(regions_cfg(), ColourScorer(), detector).pair_shard(meta, tar, st).to_pylist()[0]
    assert bad["status"] == "failed" and bad["error"] == "not an image: cannot identify image file"
    with pytest.raises(ValueError, match=r"classes \['zebra crossing'\] are not classes of 'yolo11n.yaml'"):
        Detector(DetectorSection(weights="yolo11n.yaml", classes=["zebra crossing"]), "yolo11n.yaml", "cpu")
    with pytest.raises(ValueError, match="cannot load weights"):
        Detector(dcfg, str(tmp_path / "missing.pt"), "cpu")


# ---------------------------------------------------------------- config


def test_regions_config(tmp_path):
    base = {"run": {"dir": str(tmp_path)}, "input": {"synthetic": {}}, "download": {"allow_networks": ["127.0.0.1/32"]}}
    assert "regions" not in load_config(data=dict(base)).run.stages
    cfg = load_config(data={**base, "regions": {"detector": {"train": {"epochs": 1}}}})
    assert cfg.run.stages == ["download", "captions", "sentences", "regions", "export"]
    with pytest.raises(ConfigError, match="exactly one of regions.detector.weights and regions.detector.train"):
        load_config(data={**base, "regions": {"detector": {"classes": ["person"]}}})
    with pytest.raises(ConfigError, match="run.stages has 'regions' but there is no regions section"):
        load_config(data={"run": {"dir": "x", "stages": ["regions"]}, "input": {"synthetic": {}}, "download": {"allow_networks": ["127.0.0.1/32"]}})
    with pytest.raises(ConfigError, match="regions.detector.weights: file not found: /nope/best.pt"):
        load_config(data={**base, "regions": {"detector": {"weights": "/nope/best.pt"}}})
    with pytest.raises(ConfigError, match="must be below max_area"):
        load_config(data={**base, "regions": {"min_area": 0.5, "max_area": 0.4}})
    with pytest.raises(ConfigError, match=r"regions.division.0"):
        load_config(data={**base, "regions": {"division": ["fifths"]}})


# ---------------------------------------------------------------- metrics


def test_pair_metrics_on_hand_made_cases():
    truth = [0, 0, 0.5, 0.5]
    items = [
        {"truth": truth, "pred": [0, 0, 0.5, 0.5], "regions": [[0, 0, 0.5, 0.5]]},  # right (IoU 1)
        {"truth": truth, "pred": [0, 0, 0.5, 0.25], "regions": [[0, 0, 0.5, 0.25]]},  # IoU exactly 0.5: right
        {"truth": truth, "pred": [0, 0, 0.5, 0.24], "regions": [[0, 0, 0.5, 0.24], [0, 0, .5, .5]]},  # wrong
        {"truth": truth, "pred": None, "regions": [[.5, .5, 1, 1]]},  # no pair, not coverable
        {"truth": truth, "pred": None, "regions": []},
    ]
    m = pair_metrics(items)
    assert m == {"sentences": 5, "pairs": 3, "right": 2, "precision": round(2 / 3, 4), "recall": 0.4,
                 "coverage": 0.6}
    assert pair_metrics([]) == {"sentences": 0, "pairs": 0, "right": 0, "precision": None, "recall": None,
                                "coverage": None}
    assert pair_metrics(items, min_iou=0.9)["right"] == 1


def test_cli_refuses_regions_stage_without_a_section(tmp_path, capsys):
    import yaml

    from workflows.cli import main

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"run": {"dir": str(tmp_path / "run")}, "input": {"synthetic": {}}, "download": {"allow_networks": ["127.0.0.1/32"]}}))
    assert main(["run", str(cfg), "--stages", "regions"]) == 2
    assert "--stages regions: the config has no regions section" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_random_init_scorer_is_seeded():
    from pipeline.config import ScorerSection
    from pipeline.scorers import build_scorer

    cfg = ScorerSection(model="ViT-S-32", image_size=32)
    ims, texts = [two_colour_image(), Image.new("RGB", (40, 20), (0, 200, 0))], ["A red square.", "Green."]
    a, b, c = build_scorer(cfg, "cpu", 0), build_scorer(cfg, "cpu", 0), build_scorer(cfg, "cpu", 1)
    ea, eb, ec = a.encode_images(ims), b.encode_images(ims), c.encode_images(ims)
    assert ea.shape == (2, 384) and np.allclose(np.linalg.norm(ea, axis=1), 1, atol=1e-5)
    assert np.array_equal(ea, eb) and not np.allclose(ea, ec)
    assert np.array_equal(a.encode_texts(texts), b.encode_texts(texts))
