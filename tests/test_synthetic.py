import hashlib
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import synthetic as syn


@pytest.fixture(scope="module")
def truth(world):
    return pq.read_table(world / "truth.parquet").to_pylist()


def test_boxes_inside_image_and_tight_around_masks(truth):
    for row in truth:
        for obj in row["objects"]:
            x0, y0, x1, y1 = obj["box"]
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
            mask = syn.decode_mask(obj["mask_png"])
            assert syn.box_of(mask) == pytest.approx(obj["box"])
        for s in row["sentences"]:
            x0, y0, x1, y1 = s["box"]
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
            assert syn.decode_mask(s["mask_png"]).any()


def test_object_pixels_have_the_described_colour(world, truth):
    checked = 0
    for row in truth:
        img = np.asarray(Image.open(world / "images" / f"{row['id']}.jpg").convert("RGB")).astype(float)
        for obj in row["objects"]:
            if obj["texture"] != "plain" or obj["digit"] is not None:
                continue
            mask = syn.decode_mask(obj["mask_png"])
            # erode by a pixel to stay off JPEG edge blur
            inner = mask & np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1)
            mean = img[inner].mean(0)
            assert np.abs(mean - np.array(syn.COLOURS[obj["colour"]])).max() < 25, (row["id"], obj)
            checked += 1
    assert checked > 0


def test_sentences_describe_their_objects(truth):
    for row in truth:
        objs = row["objects"]
        assert row["caption"] == " ".join(s["text"] for s in row["sentences"])
        for s in row["sentences"]:
            assert row["caption"][s["start"]:s["end"]] == s["text"]
            words = s["text"].lower()
            if s["kind"] == "object":
                o = objs[s["objects"][0]]
                assert f" {o['colour']} " in words and o["shape"] in words and o["size"] in words
                assert syn.cell_name(o["cell"]) in words
                assert (o["texture"] in words) == (o["texture"] != "plain")
                assert ("digit" in words) == (o["digit"] is not None)
                if o["digit"] is not None:
                    assert f"digit {o['digit']}" in words
                others = [c for c in syn.COLOURS if c != o["colour"]]
                assert not any(f" {c} " in f" {words} " for c in others)
            elif s["kind"] == "background":
                assert row["background"] in words
            else:
                a, b = (objs[i] for i in s["objects"])
                assert f"the {a['colour']} {a['shape']} is" in words and words.endswith(f"the {b['colour']} {b['shape']}.")
                (ra, ca), (rb, cb) = divmod(a["cell"], 3), divmod(b["cell"], 3)
                want = ("left of" if ca < cb else "right of") if ca != cb else ("above" if ra < rb else "below")
                assert want in words


def test_phrase_spans_point_at_their_text(truth):
    for row in truth:
        tokens = [row["caption"][a:b] for a, b in syn.word_spans(row["caption"])]
        for p in row["phrases"]:
            assert row["caption"][p["char_start"]:p["char_end"]] == p["text"]
            assert " ".join(tokens[p["tok_start"]:p["tok_end"]]) == " ".join(syn.WORD_RE.findall(p["text"]))


def _details(row):
    out = {("background",): row["background"]}
    for i, o in enumerate(row["objects"]):
        for attr in syn.ATTRS:
            out[(i, attr)] = o[attr]
    return out


def test_families_differ_in_exactly_one_detail(truth):
    by_family = {}
    for row in truth:
        by_family.setdefault(row["family"], []).append(row)
    for rows in by_family.values():
        base = next(r for r in rows if r["variant"] == 0)
        for r in rows:
            if r["variant"] == 0:
                continue
            changed = [k for k, v in _details(r).items() if _details(base)[k] != v]
            assert len(changed) == 1, (r["id"], changed)
            diff = json.loads(r["diff"])
            assert diff["detail"] == changed[0][-1]
            if diff["detail"] != "background":
                assert diff["object"] == changed[0][0] and diff["to"] == _details(r)[changed[0]]
            assert r["caption"] != base["caption"]


def test_same_seed_same_world_other_seed_other_world(tmp_path):
    def digest(d):
        return hashlib.sha256(b"".join((d / "images" / p).read_bytes() for p in sorted(
            x.name for x in (d / "images").iterdir())) + (d / "truth.parquet").read_bytes()).hexdigest()

    syn.write_world(tmp_path / "a", 2, 2, 96, seed=5, broken=False)
    syn.write_world(tmp_path / "b", 2, 2, 96, seed=5, broken=False)
    syn.write_world(tmp_path / "c", 2, 2, 96, seed=6, broken=False)
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")


def test_url_list_includes_broken_entries(world):
    urls = pq.read_table(world / "urls.parquet").to_pylist()
    broken = {u["id"]: u["url"] for u in urls if u["split"] == "broken"}
    assert set(broken) == {b[0] for b in syn.BROKEN}
    assert not (world / broken["broken-404"]).exists()
    assert (world / broken["broken-not-image"]).read_bytes().startswith(b"<html>")
    assert {u["split"] for u in urls} == {"train", "test", "broken"}
