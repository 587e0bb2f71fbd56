"""Evaluation: retrieval metrics vs brute force, grounding mIoU vs a reference, benchmark readers in their
published layouts, chunking without truncation, and `longcap eval` end to end on tiny copies."""

import io
import json
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from model import evalsets
from model.caft import build
from model.checkpoint import save_model
from model.evaluate import (balanced_caption_chunks, recall_at_k, retrieval, split_caption_chunks, text_inputs,
                            token_count)
from model.grounding import grounding_mask, iou
from workflows.cli import main


# ---------------------------------------------------------------- metrics


def brute_recall(sim: np.ndarray, image_of_text: list[int], k: int) -> tuple[float, float]:
    """Sort every list explicitly, ties placed against the model (wrong items first)."""
    n_img, n_txt = sim.shape
    t2i = []
    for t in range(n_txt):
        order = sorted(range(n_img), key=lambda i: (-sim[i, t], i == image_of_text[t]))
        t2i.append(order.index(image_of_text[t]) < k)
    i2t = []
    for i in range(n_img):
        own = {t for t in range(n_txt) if image_of_text[t] == i}
        if not own:
            continue
        order = sorted(range(n_txt), key=lambda t: (-sim[i, t], t in own))
        i2t.append(min(order.index(t) for t in own) < k)
    return float(np.mean(i2t)), float(np.mean(t2i))


def test_recall_on_a_hand_made_matrix():
    # 3 images, 5 texts: image 0 has texts 0 and 1, image 1 has text 2, image 2 has texts 3 and 4
    sim = torch.tensor([[0.9, 0.1, 0.9, 0.0, 0.2],
                        [0.2, 0.8, 0.5, 0.1, 0.1],
                        [0.1, 0.3, 0.5, 0.7, 0.6]])
    of = torch.tensor([0, 0, 1, 2, 2])
    r = recall_at_k(sim, of, ks=(1, 2))
    # text->image: t0 ok; t1: img1 0.8 and img2 0.3 beat img0 0.1 (rank 3); t2: img0 0.9 beats img1 0.5 and img2
    # ties it at 0.5 -> pessimistic rank 3; t3 ok; t4 ok
    assert r["t2i_r1"] == pytest.approx(3 / 5)
    assert r["t2i_r2"] == pytest.approx(3 / 5)
    # image->text: img0 best own 0.9 ties t2 (other) -> rank 2: miss@1 ok@2; img1 own t2 0.5 < t1 0.8: rank 2;
    # img2 own t3 0.7 best: ok
    assert r["i2t_r1"] == pytest.approx(1 / 3)
    assert r["i2t_r2"] == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(6))
def test_recall_equals_brute_force_with_ties_and_several_captions(seed):
    rng = np.random.default_rng(seed)
    n_img, n_txt = 7, 12
    sim = rng.integers(0, 4, size=(n_img, n_txt)).astype(np.float32)  # few levels: many ties
    of = [int(x) for x in rng.integers(0, n_img - 1, size=n_txt)]  # the last image may have no text
    r = recall_at_k(torch.from_numpy(sim), torch.tensor(of), ks=(1, 3))
    for k in (1, 3):
        i2t, t2i = brute_recall(sim, of, k)
        assert r[f"i2t_r{k}"] == pytest.approx(i2t)
        assert r[f"t2i_r{k}"] == pytest.approx(t2i)


def test_all_equal_scores_give_zero_recall_at_1():
    r = recall_at_k(torch.zeros(4, 4), torch.arange(4))
    assert r["i2t_r1"] == 0 and r["t2i_r1"] == 0  # a constant model is not rewarded for ties


# ---------------------------------------------------------------- grounding


def brute_otsu_mask(heat: np.ndarray, bins: int = 256) -> np.ndarray:
    h = (heat - heat.min()) / (heat.max() - heat.min())
    idx = np.minimum((h * bins).astype(int), bins - 1)  # the histogram bin of every pixel
    best, best_t = -1.0, 0
    for t in range(1, bins):  # foreground = bins >= t
        fg, bg = h[idx >= t], h[idx < t]
        if len(fg) == 0 or len(bg) == 0:
            continue
        # between-class variance on bin centres, as the histogram method sees the values
        cf, cb = (idx[idx >= t] + 0.5) / bins, (idx[idx < t] + 0.5) / bins
        w0, w1 = len(bg) / h.size, len(fg) / h.size
        var = w0 * w1 * (cb.mean() - cf.mean()) ** 2
        if var > best:
            best, best_t = var, t
    return idx >= best_t


def test_grounding_miou_equals_a_reference_on_hand_made_masks():
    rng = np.random.default_rng(0)
    ious, ref = [], []
    for q in range(5):
        gt = np.zeros((20, 20), bool)
        y, x = rng.integers(0, 10, 2)
        gt[y:y + 8, x:x + 6] = True
        heat = rng.normal(0, 0.3, (20, 20)) + 2.0 * gt + (q == 4) * 1.5 * np.eye(20)  # the last is confused
        mine = grounding_mask(torch.from_numpy(heat).float())
        theirs = brute_otsu_mask(heat.astype(np.float32))
        assert (mine.numpy() == theirs).all()
        ious.append(iou(mine, torch.from_numpy(gt)))
        ref.append((theirs & gt).sum() / (theirs | gt).sum())
    assert np.mean(ious) == pytest.approx(np.mean(ref))
    assert 0.3 < np.mean(ref) < 1.0


# ---------------------------------------------------------------- chunking


LONG = ("The photograph shows a narrow street in an old European town early in the morning, with wet cobblestones "
        "reflecting the pale light of the sky and a row of shuttered shops on both sides. "
        "A red bicycle leans against a green door. "
        "Two pigeons sit on the edge of a fountain. "
        "Far away a church tower rises above the roofs, its clock showing a quarter past seven, while thin clouds "
        "drift across a sky that turns from grey to a soft shade of pink and orange near the horizon above the hills.")


def test_balanced_chunks_truncate_and_count_never_more_than_k():
    sentences = [s.strip() + "." for s in LONG.split(".") if s.strip()]
    assert [token_count(s) for s in sentences] == [38, 9, 10, 44]
    chunks, n_trunc, cut = balanced_caption_chunks(sentences, k=2)
    assert chunks == [" ".join(sentences[:2]), " ".join(sentences[2:])] and n_trunc == 0 and cut == 0
    chunks, n_trunc, cut = balanced_caption_chunks(sentences, k=1)  # 101 tokens in one chunk: 26 cut, counted
    assert len(chunks) == 1 and n_trunc == 1 and cut == 101 - 75
    chunks, n_trunc, cut = balanced_caption_chunks(sentences * 10, k=4)  # 40 sentences: still exactly K chunks
    assert len(chunks) == 4 and n_trunc == 4 and cut == sum(token_count(c) - 75 for c in chunks)


def test_split_chunks_for_models_without_chunk_positions():
    sentences = [s.strip() + "." for s in LONG.split(".") if s.strip()]
    chunks, dropped = split_caption_chunks(sentences, k=1)
    assert chunks == [" ".join(sentences[:3]), sentences[3]] and dropped == 0  # whole sentences, greedily
    words = ["word"] * 30 + ["x" * 400] + ["end"] * 3
    chunks, dropped = split_caption_chunks([" ".join(words) + "."], k=1)
    assert dropped == 1 and " ".join(chunks).split() == (" ".join(words) + ".").split()
    # per-word counts add up to the joined text's count (CLIP's BPE works word by word)
    assert sum(token_count(w) for w in LONG.split()) == token_count(LONG)
    chunks, dropped = split_caption_chunks(sentences * 40, k=1)
    assert dropped == 0 and len(chunks) > 16


def test_flat_baselines_truncate_and_say_so():
    t = text_inputs([LONG, "A red circle."], k=4, mode="flat")
    assert t["tokens"].shape == (2, 1, 77) and t["truncated"] == 1 and t["tokens_cut"] == token_count(LONG) - 75
    h = text_inputs([LONG, "A red circle."], k=4, mode="balanced")
    assert h["truncated"] == 0 and h["valid"][0].sum() == 4 > h["valid"][1].sum() == 1


def test_no_unseen_chunk_position_at_evaluation(tmp_path):
    """The whole-caption encoder of a model trained with K chunks sees positions 0..K-1 only, however long the
    caption: over-long chunks are truncated (and counted), never split into more chunks."""
    from model.evaluate import encode_set

    torch.manual_seed(0)
    model = build("caft-tiny")
    seen = []
    encode = model.encode_text
    model.encode_text = lambda tok, val, whole: (seen.append(val.clone()), encode(tok, val, whole))[1]
    make_urban(tmp_path / "urban")
    es = evalsets.read_urban1k(tmp_path / "urban")
    es.captions[0] = " ".join([LONG] * 6)  # 24 sentences, 600 tokens
    for k in (1, 2, 4):
        seen.clear()
        enc = encode_set(model, es, image_size=64, k_chunks=k, batch_size=2)
        assert max(v.shape[1] for v in seen) <= k  # positions past K-1 never reach the encoder
        assert enc["valid"].sum(1).tolist()[0] == k and enc["truncated"] >= 1 and enc["tokens_cut"] > 0
    with pytest.raises(ValueError, match="only 16 positions"):
        encode_set(model, es, image_size=64, k_chunks=17)


# ---------------------------------------------------------------- readers (tiny copies in published layouts)


COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}


def _image(path, colour, shape="circle"):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", (96, 80), (240, 240, 240))
    d = ImageDraw.Draw(im)
    (d.ellipse if shape == "circle" else d.rectangle)((20, 15, 70, 65), fill=COLOURS[colour])
    im.save(path)


def _caption(colour, extra=""):
    return f"A {colour} circle on a light background. It is large and centred. {extra}".strip()


def make_dci(root):
    base = root / "densely_captioned_images"
    splits = {"train": ["a.json"], "valid": ["b.json"], "test": ["c.json", "d.json"]}
    for (name, colour) in zip(["a", "b", "c", "d"], COLOURS):
        _image(base / "photos" / f"sa_{name}.jpg", colour)
        (base / "annotations").mkdir(parents=True, exist_ok=True)
        (base / "annotations" / f"{name}.json").write_text(json.dumps(
            {"image": f"sa_{name}.jpg", "short_caption": f"A {colour} circle.", "extra_caption": _caption(colour),
             "mask_data": {}, "summaries": {}}))
    (base / "splits.json").write_text(json.dumps(splits))


def make_docci(root):
    rows = []
    for i, colour in enumerate(COLOURS):
        split = "test" if i < 3 else "train"
        rows.append({"example_id": f"{split}_{i:05d}", "split": split, "image_file": f"{split}_{i:05d}.jpg",
                     "description": _caption(colour)})
        _image(root / "images" / f"{split}_{i:05d}.jpg", colour)
    (root / "docci_descriptions.jsonlines").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def make_urban(root):
    for i, colour in enumerate(COLOURS, 1):
        _image(root / "image" / f"{i}.jpg", colour)
        (root / "caption").mkdir(parents=True, exist_ok=True)
        (root / "caption" / f"{i}.txt").write_text(_caption(colour, LONG if i == 2 else ""))


def make_sharegpt4v(root, n=1000):
    rows = []
    for i in range(n):
        colour = list(COLOURS)[i % 4]
        rel = f"sam/images/sa_{i}.jpg"
        if i < 8:
            _image(root / rel, colour)
        rows.append({"id": f"sa_{i}", "image": rel, "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image in detail."},
            {"from": "gpt", "value": _caption(colour)}]})
    (root / "share-captioner_coco_lcs_sam_1246k_1107.json").write_text(json.dumps(rows))


def make_iiw(root):
    for part, folder in evalsets.IIW_PARTS.items():
        rows = []
        for j, colour in enumerate(list(COLOURS)[:2]):
            key = f"{part}_{j}"
            _image(root / folder / f"{key}.jpg", colour)
            rows.append({"image/key": key, "IIW": _caption(colour), "IIW-P5B": "machine text"})
        (root / part).mkdir(parents=True, exist_ok=True)
        (root / part / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))


def test_readers_in_published_layouts(tmp_path):
    make_dci(tmp_path / "dci")
    es = evalsets.read_dci(tmp_path / "dci")
    assert len(es.images) == 4 and es.image_of_text == [0, 1, 2, 3]
    assert es.captions[0].startswith("A red circle.\nA red circle on")
    assert len(evalsets.read_dci(tmp_path / "dci", "test").images) == 2
    with pytest.raises(evalsets.DatasetError, match="split 'nope'"):
        evalsets.read_dci(tmp_path / "dci", "nope")

    make_docci(tmp_path / "docci")
    es = evalsets.read_docci(tmp_path / "docci")
    assert [p.rsplit("/", 1)[1] for p in es.images] == ["test_00000.jpg", "test_00001.jpg", "test_00002.jpg"]

    make_urban(tmp_path / "urban")
    es = evalsets.read_urban1k(tmp_path / "urban")
    assert len(es.images) == 4 and "green" in es.captions[1] and "church tower" in es.captions[1]

    make_sharegpt4v(tmp_path / "s4v")
    es = evalsets.retrieval_set("sharegpt4v-1k", str(tmp_path / "s4v"))
    assert len(es.captions) == 1000 and es.images[5].endswith("sam/images/sa_5.jpg") and "green" in es.captions[5]
    with pytest.raises(evalsets.DatasetError, match="needs 10000"):
        evalsets.retrieval_set("sharegpt4v-10k", str(tmp_path / "s4v"))

    make_iiw(tmp_path / "iiw")
    es = evalsets.read_iiw(tmp_path / "iiw")
    assert len(es.images) == 6 and es.images[0].endswith("docci_aar/IIW-400_0.jpg")

    with pytest.raises(evalsets.DatasetError, match="docci_descriptions.jsonlines"):
        evalsets.read_docci(tmp_path)


def test_several_captions_per_image_and_empty_ones_recorded():
    es = evalsets._build("x", [("a.jpg", "one"), ("b.jpg", "two"), ("a.jpg", "three"), ("c.jpg", " ")])
    assert es.images == ["a.jpg", "b.jpg"] and es.image_of_text == [0, 1, 0]
    assert es.skipped == [{"item": "c.jpg", "reason": "empty caption"}]


def make_refcoco(root, name="refcoco"):
    images = root / "images" / "mscoco" / "images" / "train2014"
    anns, imgs, refs = [], [], []
    for i, colour in enumerate(["red", "blue"]):
        fname = f"COCO_train2014_{i:012d}.jpg"
        _image(images / fname, colour, "square")
        imgs.append({"id": i, "file_name": fname, "height": 80, "width": 96})
        anns.append({"id": 100 + i, "image_id": i, "category_id": 1, "iscrowd": 0, "bbox": [20, 15, 50, 50],
                     "segmentation": [[20, 15, 70, 15, 70, 65, 20, 65]]})
        refs.append({"ref_id": i, "ann_id": 100 + i, "image_id": i, "split": "val", "category_id": 1,
                     "file_name": fname.replace(".jpg", f"_{100 + i}.jpg"),
                     "sentences": [{"sent": f"the {colour} square", "raw": f"The {colour} square", "tokens": []},
                                   {"sent": "the big square in the middle", "raw": "", "tokens": []}]})
    refs.append({"ref_id": 9, "ann_id": 100, "image_id": 0, "split": "testA", "sentences": []})
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / name / "instances.json").write_text(json.dumps({"images": imgs, "annotations": anns, "categories": []}))
    (root / name / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))


class Payload:
    def __reduce__(self):
        return (open, ("/tmp/longcap-pwned", "w"))


def test_refer_reader_masks_and_refuses_pickled_objects(tmp_path):
    make_refcoco(tmp_path)
    items = evalsets.read_refer(tmp_path, "refcoco", "val")
    assert [it.sentences[0] for it in items] == ["the red square", "the blue square"]
    m = evalsets.ref_mask(items[0])
    assert m.shape == (80, 96) and m[40, 45] and not m[5, 5]
    assert abs(int(m.sum()) - 51 * 51) <= 110  # the polygon's area, rasterised
    (tmp_path / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps([Payload()]))
    with pytest.raises(evalsets.DatasetError, match="refusing to unpickle"):
        evalsets.read_refer(tmp_path, "refcoco", "val")
    assert not (tmp_path / "longcap-pwned").exists()


def make_offcentre_ref(root):
    """A 240x80 image whose referred object lies at the far left: a centre crop would cut it away."""
    images = root / "images" / "mscoco" / "images" / "train2014"
    images.mkdir(parents=True)
    im = Image.new("RGB", (240, 80), (240, 240, 240))
    ImageDraw.Draw(im).rectangle((5, 20, 44, 59), fill=COLOURS["red"])
    ImageDraw.Draw(im).ellipse((150, 10, 210, 70), fill=COLOURS["blue"])
    im.save(images / "COCO_train2014_000000000007.jpg")
    inst = {"images": [{"id": 7, "file_name": "COCO_train2014_000000000007.jpg", "height": 80, "width": 240}],
            "annotations": [{"id": 70, "image_id": 7, "category_id": 1, "iscrowd": 0, "bbox": [5, 20, 40, 40],
                             "segmentation": [[5, 20, 45, 20, 45, 60, 5, 60]]}], "categories": []}
    refs = [{"ref_id": 1, "ann_id": 70, "image_id": 7, "split": "val", "category_id": 1,
             "sentences": [{"sent": "the red square on the left"}, {"sent": "left square"}]}]
    (root / "refcoco").mkdir()
    (root / "refcoco" / "instances.json").write_text(json.dumps(inst))
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))


def test_sag_masks_resize_to_the_original_size_then_threshold():
    from model.grounding import sag_masks

    heat = torch.zeros(1, 4, 4)
    heat[0, :2, :2] = 3.0  # hot top-left quarter of the square input
    m = sag_masks(heat, (8, 12))[0]
    assert m.shape == (8, 12) and m[:3, :5].all() and not m[5:, :].any() and not m[:, 7:].any()
    assert sag_masks(heat * 7 - 2, (8, 12))[0, :3, :5].all()  # min-max normalised: scale and offset free
    assert sag_masks(heat, (8, 12), None)[0].sum() == 24  # Otsu variant: the same 4x6 hot corner


def test_sag_grounding_counts_a_ref_outside_the_centre(tmp_path):
    """SaG's protocol: every sentence counts, the full image resized square (no crop), maps back at the
    original size, threshold 0.5; checked against SaG's own steps (torchvision resize of the map, numpy IoU)."""
    from torchvision.transforms import functional as TF

    from model.evaluate import _mask_to, refer_grounding, square_image
    from model.grounding import text_heatmaps

    make_offcentre_ref(tmp_path)
    items = evalsets.read_refer(tmp_path, "refcoco", "val")
    gt = evalsets.ref_mask(items[0])
    assert gt.shape == (80, 240) and gt.sum() == 40 * 40 and not _mask_to(gt, 64).any()  # a centre crop loses it
    torch.manual_seed(0)
    model = build("caft-tiny")
    g = refer_grounding(model, items, image_size=64)
    assert g["n"] == 2 and g["skipped"] == []
    image, hw = square_image(items[0].image, 64, 10**8)
    heat = text_heatmaps(model, image.unsqueeze(0), items[0].sentences)
    ious, inter, union = [], 0, 0
    for h in heat:  # SaG eval_cma_recon.py get_IoU_map, step by step
        a = TF.resize(h[None], list(gt.shape)).squeeze().numpy()
        a = (a - a.min()) / (a.max() - a.min() + 1e-9)
        pred = a >= 0.5
        i, u = np.logical_and(pred, gt).sum(), np.logical_or(pred, gt).sum()
        ious.append(i / u)
        inter, union = inter + i, union + u
    assert g["miou"] == pytest.approx(np.mean(ious), abs=1e-6) and g["ciou"] == pytest.approx(inter / union)
    assert g["baseline_whole_image_miou"] == pytest.approx(1600 / (80 * 240))


# ---------------------------------------------------------------- `longcap eval`


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = build("caft-tiny")
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_model(model, path)
    return path


def test_eval_retrieval_matches_brute_force_on_the_model_scores(tmp_path, tiny_ckpt):
    from model.checkpoint import load_model
    from model.evaluate import encode_set

    make_urban(tmp_path / "urban")
    model = load_model(tiny_ckpt)
    es = evalsets.read_urban1k(tmp_path / "urban")
    enc = encode_set(model, es, image_size=64, k_chunks=3, batch_size=3)
    r = retrieval(model, enc)
    assert enc["truncated"] == 0 and enc["valid"][1].sum() == 3 > enc["valid"][0].sum() == 2  # S=6 / S=2 sentences
    whole = torch.nn.functional.normalize(enc["cls"], dim=-1) @ torch.nn.functional.normalize(enc["whole"], dim=-1).T
    i2t, t2i = brute_recall(whole.numpy(), enc["image_of_text"], 1)
    assert r["whole"]["i2t_r1"] == pytest.approx(i2t) and r["whole"]["t2i_r1"] == pytest.approx(t2i)
    # the part score of one pair equals the model's own score of that pair
    s = model.scores({"cls": enc["cls"][:1], "parts": enc["parts"][:1]},
                     {"whole": enc["whole"][1:2], "sub": enc["sub"][1:2]}, enc["valid"][1:2])
    from model.evaluate import part_scores
    assert part_scores(model, enc, img_block=2, txt_block=3)[0, 1] == pytest.approx(s["part"][0, 0].item(), abs=1e-5)


def test_eval_cli_writes_results_and_records_broken_images(tmp_path, tiny_ckpt, capsys):
    make_docci(tmp_path / "docci")
    (tmp_path / "docci" / "images" / "test_00001.jpg").write_bytes(b"not a jpeg")
    run = tmp_path / "run"
    rc = main(["eval", str(tiny_ckpt), "docci", "--root", str(tmp_path / "docci"), "--run", str(run),
               "--image-size", "64"])
    assert rc == 0
    [written] = (run / "eval").glob("docci-*.json")
    assert written.name == f"docci-{tiny_ckpt.parent.name}.json"  # named after the checkpoint: no overwrites
    r = json.loads(written.read_text())
    assert r["retrieval"]["n"] == 2 and r["retrieval"]["n_texts"] == 2
    assert r["skipped"][0]["item"].endswith("test_00001.jpg") and "not an image" in r["skipped"][0]["reason"]
    assert set(r["retrieval"]) >= {"whole", "part", "caftpp"}
    out = capsys.readouterr().out
    assert "skipped 1" in out and written.name in out

    make_refcoco(tmp_path / "refer")
    rc = main(["eval", str(tiny_ckpt), "refcoco", "--root", str(tmp_path / "refer"), "--image-size", "64",
               "--out", str(tmp_path / "g.json")])
    g = json.loads((tmp_path / "g.json").read_text())["grounding"]
    assert rc == 0 and g["n"] == 4 and 0 <= g["miou"] <= 1 and 0 < g["baseline_whole_image_miou"] < 1

    rc = main(["eval", str(tiny_ckpt), "dci", "--root", str(tmp_path / "nothing")])
    assert rc == 2 and "densely_captioned_images" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["flair-tiny", "ablate-tiny-visual", "caft-tiny"])
def test_heatmaps_of_every_grounding_row(name):
    """FLAIR (flat ViT: attention over patches) and +visual (over the top-level segments) paint heat maps too;
    -part-level (whole loss only) has no trained pooling and is refused."""
    from model.grounding import text_heatmaps as heatmaps

    with pytest.raises(ValueError, match="without the part-level loss"):
        heatmaps(build("ablate-tiny-no-part").eval(), torch.randn(1, 3, 64, 64), ["a red circle"])
    from model.grounding import text_heatmaps

    torch.manual_seed(0)
    model = build(name).eval()
    image = torch.randn(1, 3, 64, 64)
    heat = text_heatmaps(model, image, ["a red circle", "a blue square"])
    assert heat.shape == (2, 64, 64)
    # attention weights painted back: per pixel in [0, 1], and each map is constant on every superpixel
    v = model.encode_image(image)
    labels = v["labels"][0]
    for q in range(2):
        for s in labels.unique()[:10]:
            vals = heat[q][labels == s]
            assert torch.allclose(vals, vals[0].expand_as(vals))
    assert (heat >= 0).all() and (heat <= 1).all() and not torch.allclose(heat[0], heat[1])


def test_ablate_trains_every_row_with_the_same_section(world, tmp_path, capsys):
    import shutil

    import yaml

    from conftest import demo_config
    from tests.test_train import world_shards
    from workflows.evalcmd import row_config

    run = tmp_path / "run"
    world_shards(world, run / "export")
    (run / "synth").mkdir()
    shutil.copy(world / "truth.parquet", run / "synth" / "truth.parquet")
    cfg = demo_config(run, train={"model": "caft-tiny", "steps": 3, "batch_size": 4, "warmup": 1, "workers": 0,
                                  "n_sub": 3, "k_chunks": 2, "image_size": 56, "threads": 1, "tensorboard": False,
                                  "epoch_samples": 8, "eval_where": {"split": "test"}})
    (run / "run.yaml").write_text(yaml.safe_dump(cfg))
    rc = main(["ablate", str(run), "--rows", "siglip-tiny,ablate-tiny-hloss", "--seeds", "0,1", "--steps", "2"])
    assert rc == 0
    t = json.loads((run / "ablation.json").read_text())
    assert [r["row"] for r in t["rows"]] == ["siglip-tiny", "ablate-tiny-hloss"] and t["steps"] == 2
    for r in t["rows"]:
        assert r["seeds"] == [0, 1] and len(r["i2t_r1"]["values"]) == 2
        vals = r["t2i_r1"]["values"]
        assert r["t2i_r1"]["mean"] == pytest.approx(sum(vals) / 2)
        assert r["t2i_r1"]["std"] == pytest.approx(abs(vals[0] - vals[1]) / 2 ** 0.5)
    siglip, caft = t["rows"]
    assert siglip["miou"] is None and caft["miou"] is not None and 0 <= caft["miou"]["mean"] <= 1
    # the flat-text row trains on one 77-token caption per image; the others keep the section's N and K
    trained = json.loads(next((run / "ablation" / "siglip-tiny" / "seed-1").glob("step-*/train.json")).read_text())
    assert (trained["n_sub"], trained["k_chunks"], trained["seed"], trained["steps"]) == (1, 1, 1, 2)
    assert row_config(yaml_train(cfg), "ablate-tiny-hloss", 0, 2, "x").n_sub == 3
    assert row_config(yaml_train(cfg), "flair-tiny", 0, 2, "x").n_sub == 3  # FLAIR: every sub-caption a text
    assert t["claims"] == [] and t["device"] == "cpu"  # no pair of the paper's claims among these two rows
    out = capsys.readouterr().out
    assert "| siglip-tiny |" in out and "— |" in out


def yaml_train(cfg):
    from pipeline.config import load_config

    return load_config(data=cfg).train
