"""FG-OVD (appendix C) and the Karpathy short-caption sets (FAST-GOAL): readers on tiny copies in their
published layouts, the FG-OVD rank metric against a brute-force reference, and `longcap eval` end to end."""

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from model import evalsets
from model.caft import build
from model.checkpoint import save_model
from workflows.cli import main

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}


def _image(path, colour, size=(96, 80)):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", size, (240, 240, 240))
    ImageDraw.Draw(im).ellipse((20, 15, 70, 65), fill=COLOURS[colour])
    im.save(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = build("caft-tiny")
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_model(model, path)
    return model, path


# ---------------------------------------------------------------- FG-OVD


def make_fgovd(root, fname="1_attributes.json"):
    """LVIS layout as the FG-OVD repository publishes it (benchmarks/*.json); captions are category names."""
    names = ["a red round ball", "a blue round ball", "a green round ball", "a red square box", "a yellow round ball",
             "a red round plate", "a red wooden ball", "a red striped ball", "a pink round ball", "a red round cup",
             "a red round hat", "a red round sign"]
    cats = [{"id": i + 1, "name": n, "def": "", "image_count": 1, "instance_count": 1, "synset": "",
             "synonyms": [], "frequency": "f"} for i, n in enumerate(names)]
    images = [{"id": 1, "file_name": "val2017/000000000001.jpg", "width": 200, "height": 120, "license": 1,
               "coco_url": "", "flickr_url": ""},
              {"id": 2, "file_name": "000000000002.jpg", "width": 96, "height": 80, "license": 1,
               "coco_url": "", "flickr_url": ""}]
    im = Image.new("RGB", (200, 120), (240, 240, 240))
    ImageDraw.Draw(im).ellipse((10, 10, 60, 60), fill=COLOURS["red"])
    ImageDraw.Draw(im).rectangle((120, 40, 190, 110), fill=COLOURS["blue"])
    (root / "coco" / "val2017").mkdir(parents=True)
    im.save(root / "coco" / "val2017" / "000000000001.jpg")
    _image(root / "coco" / "val2017" / "000000000002.jpg", "green")  # file_name without its folder
    anns = [
        {"id": 11, "image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50], "area": 2500.0, "segmentation": [],
         "neg_category_ids": list(range(2, 12))},
        {"id": 12, "image_id": 1, "category_id": 2, "bbox": [120, 40, 70, 70], "area": 4900.0, "segmentation": [],
         "neg_category_ids": [2, 3, 4, 5, 6, 7, 8, 9, 10, 11]},  # a negative equal to the positive: a tie
        {"id": 13, "image_id": 2, "category_id": 3, "bbox": [20, 15, 50, 50], "area": 2500.0, "segmentation": [],
         "neg_category_ids": [1, 2, 4, 5, 6, 7, 8, 9, 10, 12, 11]},  # 11 negatives: the first 10 used
        {"id": 14, "image_id": 2, "category_id": 4, "bbox": [0, 0, 10, 10], "area": 100.0, "segmentation": [],
         "neg_category_ids": [1, 2, 3]},  # fewer than 10 negatives: left out, as ranks.py does
    ]
    (root / "benchmarks").mkdir(parents=True, exist_ok=True)
    (root / "benchmarks" / fname).write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))


def test_fgovd_reader_in_the_published_layout(tmp_path):
    make_fgovd(tmp_path)
    items, left = evalsets.read_fgovd(tmp_path, "fg-ovd-hard")
    assert [it.ann_id for it in items] == [11, 12, 13] and left[0]["item"] == "annotation 14"
    assert items[0].positive == "a red round ball" and len(items[0].negatives) == 10
    assert items[2].negatives[-1] == "a red round sign" and items[2].image.endswith("val2017/000000000002.jpg")
    assert items[0].bbox == [10, 10, 50, 50]
    with pytest.raises(evalsets.DatasetError, match="2_attributes.json"):
        evalsets.read_fgovd(tmp_path, "fg-ovd-medium")


def test_fgovd_ranks_equal_a_brute_force_reference(tmp_path, tiny):
    import torch.nn.functional as F

    from model.data import image_transform, tokenize
    from model.evaluate import fgovd_accuracy

    model, _ = tiny
    make_fgovd(tmp_path)
    items, _ = evalsets.read_fgovd(tmp_path, "fg-ovd-hard")
    r = fgovd_accuracy(model, items, image_size=64, batch_size=2)
    ranks = []
    with torch.no_grad():
        for it in items:  # by hand: crop the box, encode, one caption at a time
            x, y, w, h = it.bbox
            crop = Image.open(it.image).convert("RGB").crop((x, y, x + w, y + h))
            cls = F.normalize(model.encode_image(image_transform(64)(crop)[None])["cls"][0], dim=-1)
            sims = []
            for text in [it.positive, *it.negatives]:
                one = torch.ones(1, 1, dtype=torch.bool)
                sims.append(float(F.normalize(model.encode_text(tokenize([text])[None], one, one)["whole"][0],
                                              dim=-1) @ cls))
            ranks.append(1 + sum(s >= sims[0] for s in sims[1:]))
    assert r["n"] == 3 and r["n_captions"] == 11 and r["chance"] == pytest.approx(1 / 11)
    assert r["accuracy"] == pytest.approx(np.mean([k == 1 for k in ranks]))
    assert r["mean_rank"] == pytest.approx(np.mean(ranks))
    assert ranks[1] >= 2  # the tied negative counts against the model


# ---------------------------------------------------------------- Karpathy splits (MSCOCO 5k, Flickr30k 1k)


def make_karpathy(root, name):
    rows = []
    for i, (colour, split) in enumerate(zip(COLOURS, ["test", "test", "train", "test"])):
        sents = [{"raw": f"A {colour} circle, caption {j}.", "tokens": [], "imgid": i, "sentid": 5 * i + j}
                 for j in range(5)]
        if name == "coco":
            row = {"filepath": "val2014", "filename": f"COCO_val2014_{i:012d}.jpg", "cocoid": i}
            _image(root / "val2014" / row["filename"], colour)
        else:
            row = {"filename": f"{1000 + i}.jpg"}
            _image(root / "flickr30k-images" / row["filename"], colour)
        rows.append({**row, "imgid": i, "split": split, "sentids": [s["sentid"] for s in sents], "sentences": sents})
    (root / f"dataset_{name}.json").write_text(json.dumps({"images": rows, "dataset": name}))


def test_karpathy_readers_keep_five_captions_per_image(tmp_path):
    make_karpathy(tmp_path / "coco", "coco")
    es = evalsets.retrieval_set("coco-5k", str(tmp_path / "coco"))
    assert len(es.images) == 3 and len(es.captions) == 15
    assert es.image_of_text == [0] * 5 + [1] * 5 + [2] * 5
    assert es.images[0].endswith("val2014/COCO_val2014_000000000000.jpg")
    assert es.captions[6] == "A green circle, caption 1."
    assert "the published split has 5000" in es.notes
    make_karpathy(tmp_path / "f30k", "flickr30k")
    es = evalsets.retrieval_set("flickr30k-1k", str(tmp_path / "f30k"))
    assert es.images[2].endswith("flickr30k-images/1003.jpg") and len(es.captions) == 15
    assert len(evalsets.retrieval_set("flickr30k-1k", str(tmp_path / "f30k"), split="train").images) == 1
    with pytest.raises(evalsets.DatasetError, match="dataset_coco.json"):
        evalsets.retrieval_set("coco-5k", str(tmp_path / "f30k"))


def test_eval_cli_on_coco_and_fgovd(tmp_path, tiny, capsys):
    _, ckpt = tiny
    make_karpathy(tmp_path / "coco", "coco")
    rc = main(["eval", str(ckpt), "coco-5k", "--root", str(tmp_path / "coco"), "--image-size", "64",
               "--out", str(tmp_path / "c.json")])
    r = json.loads((tmp_path / "c.json").read_text())
    assert rc == 0 and r["retrieval"]["n"] == 3 and r["retrieval"]["n_texts"] == 15
    assert r["retrieval"]["whole"]["t2i_r5"] == 1.0  # 3 images: every text finds its image in the top 5
    make_fgovd(tmp_path / "fg", "shuffle_negatives.json")
    rc = main(["eval", str(ckpt), "fg-ovd-trivial", "--root", str(tmp_path / "fg"), "--image-size", "64",
               "--out", str(tmp_path / "f.json")])
    f = json.loads((tmp_path / "f.json").read_text())["fgovd"]
    assert rc == 0 and f["n"] == 3 and f["left_out"] == 1 and 0 <= f["accuracy"] <= 1
    assert "FG-OVD accuracy" in capsys.readouterr().out


def test_eval_refuses_more_chunks_than_trained(tmp_path, tiny, capsys):
    model, _ = tiny
    folder = tmp_path / "trained"
    folder.mkdir()
    save_model(model, folder / "model.safetensors")
    (folder / "train.json").write_text(json.dumps({"k_chunks": 2, "image_size": 64}))
    make_karpathy(tmp_path / "coco", "coco")
    rc = main(["eval", str(folder / "model.safetensors"), "coco-5k", "--root", str(tmp_path / "coco"),
               "--k-chunks", "3"])
    assert rc == 2 and "trained with K = 2" in capsys.readouterr().err


def test_goal_checkpoints_read_the_short_caption_sets(tmp_path):
    """FAST-GOAL's short-caption retrieval: a goal checkpoint on flickr30k-1k, every caption counted."""
    from model.registry import build as build_any

    torch.manual_seed(0)
    save_model(build_any("goal-tiny"), tmp_path / "goal.safetensors")
    make_karpathy(tmp_path / "f30k", "flickr30k")
    rc = main(["eval", str(tmp_path / "goal.safetensors"), "flickr30k-1k", "--root", str(tmp_path / "f30k"),
               "--out", str(tmp_path / "g.json")])
    r = json.loads((tmp_path / "g.json").read_text())
    assert rc == 0 and r["retrieval"]["n"] == 3 and r["retrieval"]["n_texts"] == 15
