import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from localpairs_helpers import region_shards, tiny_train
from model.data import DataConfig, dataset, image_transform
from model.goal import (GoalModel, patch_membership, span_membership, stretch_positions, tsl_loss)
from model.localdata import EOT, SOT, bpe_ids, box_to_input, goal_collate, pack_chunks, pack_stretch
from model.registry import build


def naive_tsl(tokens, owner, boxes, targets, patch, grid):
    """The image-side TSL by loops: patch centres inside each box (else the patch under the box centre),
    their mean, cosine with the target, (1 - cos)^2, averaged over boxes."""
    losses = []
    for r in range(len(boxes)):
        x0, y0, x1, y1 = boxes[r]
        inside = []
        for i in range(grid):
            for j in range(grid):
                cx, cy = (j + 0.5) * patch, (i + 0.5) * patch
                if x0 <= cx < x1 and y0 <= cy < y1:
                    inside.append(i * grid + j)
        if not inside:
            i = min(max(int((y0 + y1) / 2 // patch), 0), grid - 1)
            j = min(max(int((x0 + x1) / 2 // patch), 0), grid - 1)
            inside = [i * grid + j]
        vecs = [tokens[owner[r]][k].tolist() for k in inside]
        mean = [sum(v[d] for v in vecs) / len(vecs) for d in range(len(vecs[0]))]
        t = targets[r].tolist()
        cos = sum(a * b for a, b in zip(mean, t)) / (math.sqrt(sum(a * a for a in mean)) * math.sqrt(sum(b * b for b in t)))
        losses.append((1 - cos) ** 2)
    return sum(losses) / len(losses)


def test_tsl_loss_equals_a_naive_reference_on_hand_made_tokens_and_boxes():
    g = torch.Generator().manual_seed(0)
    grid, patch = 4, 8  # a 32 px image of 4 x 4 patches
    tokens = torch.randn(2, grid * grid, 3, generator=g, dtype=torch.float64)
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0],  # centres 4 and 12 in x and y: the top-left 2 x 2 patches
                          [5.0, 9.0, 30.0, 21.0],  # x centres 12, 20, 28; y centre 12 and 20
                          [17.0, 17.0, 19.0, 19.0],  # holds no centre: the patch under (18, 18)
                          [0.0, 0.0, 32.0, 32.0]], dtype=torch.float64)
    owner = torch.tensor([0, 1, 1, 0])
    targets = torch.randn(4, 3, generator=g, dtype=torch.float64)
    member = patch_membership(boxes, (grid, grid), (patch, patch))
    assert member.sum(1).tolist() == [4, 6, 1, 16]
    assert member[0].nonzero().squeeze(1).tolist() == [0, 1, 4, 5] and member[2].nonzero().item() == 2 * 4 + 2
    got = tsl_loss(tokens, owner, member, targets)
    assert got.item() == pytest.approx(naive_tsl(tokens, owner, boxes.tolist(), targets, patch, grid), rel=1e-12)

    # text side: token spans in caption rows; a span cut by truncation (valid False) is left out
    rows = torch.randn(2, 10, 3, generator=g, dtype=torch.float64)
    spans = torch.tensor([[1, 4], [4, 9], [2, 3], [7, 7]])
    row_of = torch.tensor([0, 0, 1, 1])
    ok = torch.tensor([True, True, True, False])
    sent = torch.randn(4, 3, generator=g, dtype=torch.float64)
    want = []
    for r in range(3):
        mean = rows[row_of[r], spans[r, 0]:spans[r, 1]].mean(0)
        want.append((1 - torch.dot(mean, sent[r]) / (mean.norm() * sent[r].norm())) ** 2)
    got = tsl_loss(rows, row_of, span_membership(spans, 10), sent, ok)
    assert got.item() == pytest.approx(torch.stack(want).mean().item(), rel=1e-12)
    # gradients reach both the tokens and the targets (no stop-gradient, as GOAL's reference code)
    tokens.requires_grad_(True)
    targets.requires_grad_(True)
    tsl_loss(tokens, owner, member, targets).backward()
    assert tokens.grad.abs().sum() > 0 and targets.grad.abs().sum() > 0
    assert tokens.grad[1][[k for k in range(16) if not member[1, k] and not member[2, k]]].abs().sum() == 0


def test_long_clip_stretch_keeps_20_positions_and_interpolates_the_rest_by_four():
    pos = torch.randn(77, 5, dtype=torch.float64)
    got = stretch_positions(pos, 248, 20)
    # Long-CLIP's construction, written out
    want = torch.zeros(248, 5, dtype=torch.float64)
    want[:20] = pos[:20]
    for i in range(77 - 1 - 20):
        for j in range(4):
            want[4 * i + j + 20] = (4 - j) / 4 * pos[i + 20] + j / 4 * pos[i + 21]
    for j in range(4):
        want[244 + j] = pos[76] + j * (pos[76] - pos[75]) / 4
    assert torch.allclose(got, want, atol=1e-12)


def test_box_to_input_follows_the_loaders_resize_and_centre_crop():
    im = Image.new("RGB", (200, 120), (0, 0, 0))
    box = [0.35, 0.25, 0.6, 0.7]  # normalised xyxy
    px = [round(box[0] * 200), round(box[1] * 120), round(box[2] * 200), round(box[3] * 120)]
    im.paste((255, 255, 255), (px[0], px[1], px[2], px[3]))
    x = image_transform(60)(im)[0]  # 120 -> 60 on the short side, 200 -> 100, crop 20 px off the left
    ys, xs = np.nonzero((x > 0.5).numpy())
    seen = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    got = box_to_input(box, 200, 120, 60)
    assert got == pytest.approx([0.35 * 100 - 20, 0.25 * 60, 0.6 * 100 - 20, 0.7 * 60])
    assert all(abs(a - b) <= 1.0 for a, b in zip(got, seen)), (got, seen)
    assert box_to_input([0.5, 0.0, 0.95, 1.0], 200, 120, 60) == pytest.approx([30.0, 0.0, 60.0, 60.0])  # clipped
    assert box_to_input([0.0, 0.0, 0.05, 1.0], 200, 120, 60) == [0.0, 0.0, 0.0, 60.0]  # cropped away: empty


def test_packed_captions_put_each_sentence_where_its_span_says():
    sents = ["A small red circle sits in the top left.", "The background is white.",
             "A large blue striped hexagon, marked with the digit 7, sits in the center."]
    ids = [bpe_ids(s) for s in sents]
    rows, spans = pack_stretch(ids, 248)
    assert rows[0][0] == SOT and rows[0][-1] == EOT
    for (r, a, b), sid in zip(spans, ids):
        assert rows[r][a:b] == sid
    rows, spans = pack_stretch(ids, 14)  # truncated: SOT + 10 tokens + 2 of the second sentence + EOT
    assert len(ids[0]) == 10 and len(rows[0]) == 14 and rows[0][-1] == EOT and [b > 0 for _, _, b in spans] == [True, False, False]
    rows, spans = pack_chunks(ids, 30)  # rows of 30 tokens: whole sentences only
    assert [r for r, _, _ in spans] == [0, 0, 1] and all(len(r) <= 30 for r in rows)
    for (r, a, b), sid in zip(spans, ids):
        assert rows[r][a:b] == sid
    import open_clip

    sample = {"key": "k", "url": "u", "image": torch.zeros(3, 8, 8), "text": " ".join(sents), "sentence_ids": ids,
              "pair_sentence": [2, 1], "pair_text": [sents[2], sents[1]], "crops": torch.zeros(2, 3, 8, 8),
              "boxes": torch.zeros(2, 4)}
    b = goal_collate([sample, dict(sample, pair_sentence=[1], pair_text=[sents[1]], crops=torch.zeros(1, 3, 8, 8),
                                   boxes=torch.zeros(1, 4))], "stretch", 248)
    width = len(ids[2]) + 2  # the longest sentence with SOT and EOT: trailing padding is trimmed
    assert torch.equal(b["sent_tokens"], open_clip.tokenize([sents[2], sents[1], sents[1]])[:, :width])
    assert b["sent_group"].tolist() == [0, 1, 1] and b["region_image"].tolist() == [0, 0, 1]
    for r in range(3):
        a, e = b["sent_span"][r].tolist()
        assert b["text"][b["sent_row"][r], a:e].tolist() == ids[[2, 1, 1][r]]


def test_goal_loader_maps_pairs_to_crops_boxes_and_spans(world, tmp_path):
    urls = region_shards(world, tmp_path / "shards")
    cfg = DataConfig(mode="goal", train=False, batch_size=3, image_size=64, max_pairs=2)
    b = next(iter(dataset(urls, cfg)))
    assert b["crops"].shape == (6, 3, 64, 64) and b["boxes"].shape == (6, 4) and b["image"].shape == (3, 3, 64, 64)
    import pyarrow.parquet as pq

    truth = {r["id"]: r for r in pq.read_table(world / "truth.parquet").to_pylist()}
    doc = json.loads(next(iter(__import__("webdataset").WebDataset(urls[:1], shardshuffle=False)))["json"])
    row = truth[doc["extra"]["id"]]
    # the first image's pairs: its sentences' boxes in input pixels (the world is square: a plain scaling)
    want = {tuple(round(v * 64, 4) for v in s["box"]) for s in row["sentences"]}
    got = {tuple(round(v, 4) for v in bx) for bx in b["boxes"][:2].tolist()}
    assert got <= want
    spans = b["sent_span"][:2]
    for r in range(2):
        ids = b["text"][b["sent_row"][r], spans[r, 0]:spans[r, 1]].tolist()
        tok = b["sent_tokens"][r]
        assert ids == tok[1:(tok == EOT).nonzero()[0, 0]].tolist()
    glob = DataConfig(mode="goal", train=True, batch_size=3, image_size=64, max_pairs=0)
    assert next(iter(dataset(urls, glob)))["crops"].shape[0] == 0


def test_goal_sample_takes_one_pair_per_region():
    """Two sentences matched to one region would be each other's negatives in the local loss: one is taken."""
    import random

    from model.localdata import goal_sample

    sents = ["A red circle.", "A round red thing.", "A blue square."]
    meta = {"captions": [{"captioner": "c", "prompt_id": "p", "sentences": sents}],
            "regions": {"boxes": [{"box": [0, 0, 10, 10]}, {"box": [10, 10, 20, 20]}],
                        "pairs": [{"captioner": "c", "prompt_id": "p", "region": 0, "sentence_index": 0, "score": 0.9},
                                  {"captioner": "c", "prompt_id": "p", "region": 0, "sentence_index": 1, "score": 0.8},
                                  {"captioner": "c", "prompt_id": "p", "region": 1, "sentence_index": 2, "score": 0.7}]}}
    image = Image.new("RGB", (20, 20))
    for train in (False, True):
        cfg = DataConfig(mode="goal", train=train, image_size=16, max_pairs=3)
        for seed in range(5):
            s = goal_sample(cfg, "k", "u", meta, image, random.Random(seed), image_transform(16))
            assert len(s["pair_sentence"]) == 2 and 2 in s["pair_sentence"], (train, seed)
            if not train:
                assert s["pair_sentence"] == [0, 2]  # the better-scored pair of region 0


def test_every_goal_parameter_learns_and_global_only_has_only_the_global_loss(world, tmp_path):
    urls = region_shards(world, tmp_path / "shards")
    torch.manual_seed(0)
    model = build("goal-tiny")
    assert model.clip.positional_embedding.shape[0] == 248 and model.clip.attn_mask.shape == (248, 248)
    b = next(iter(dataset(urls, DataConfig(train=True, batch_size=4, image_size=64, **model.data_options()))))
    out = model(**model.batch_inputs(b, "cpu"))
    assert set(out) == {"global", "local", "tsl_image", "tsl_text", "loss"}
    assert all(torch.isfinite(v) and v > 0 for v in out.values())
    out["loss"].backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []

    glob = build("goal-tiny-global")
    assert glob.data_options()["max_pairs"] == 0
    b = next(iter(dataset(urls, DataConfig(train=True, batch_size=4, image_size=64, **glob.data_options()))))
    assert set(glob(**glob.batch_inputs(b, "cpu"))) == {"global", "loss"}


def test_chunked_long_text_averages_rows_of_77(world, tmp_path):
    urls = region_shards(world, tmp_path / "shards")
    torch.manual_seed(0)
    model = build("goal-tiny", long_text="chunk").eval()
    assert model.clip.positional_embedding.shape[0] == 77
    b = next(iter(dataset(urls, DataConfig(train=False, batch_size=3, image_size=64, **model.data_options()))))
    assert b["text"].shape[1] <= 77 and b["text"].shape[0] >= 3  # long captions take more than one row
    with torch.no_grad():
        caps = model.encode_captions(b["text"], b["text_owner"], 3)
        rows = torch.nn.functional.normalize(model.text_tokens(b["text"])[0], dim=-1)
    for i in range(3):
        want = torch.nn.functional.normalize(rows[b["text_owner"] == i].sum(0), dim=0)
        assert torch.allclose(caps[i], want, atol=1e-6)
    out = build("goal-tiny", long_text="chunk")(**model.batch_inputs(
        next(iter(dataset(urls, DataConfig(train=True, batch_size=4, image_size=64, **model.data_options())))), "cpu"))
    assert torch.isfinite(out["loss"])


def test_goal_trains_end_to_end_from_a_config_and_reloads(world, tmp_path, capsys):
    from model.checkpoint import load_model
    from workflows.cli import main

    urls = region_shards(world, tmp_path / "run" / "export")
    out = tmp_path / "goal"
    cfg = tiny_train(model="goal-tiny", shards=urls, out=str(out), eval_where={"split": "test"},
                     train_where={"split": "train"}).model_dump(mode="json")
    path = tmp_path / "goal.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "trained to step 3" in printed and "global" in printed and "R@1" in printed
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and all(r["tsl_image"] > 0 and r["tsl_text"] >= 0 for r in steps)
    ev = [r for r in rows if "eval" in r][-1]["eval"]["retrieval"]
    assert ev["n"] == 3 and 0 <= ev["global"]["t2i_r1"] <= 1  # the held-out family: 3 variants
    model = load_model(out)
    assert isinstance(model, GoalModel) and model.cfg.name == "goal-tiny" and model.trained_steps == 3
    assert model.clip.positional_embedding.shape[0] == 248
    # the reloaded model embeds like the trained one: its state is exactly the checkpoint's
    from safetensors.torch import load_file

    saved = load_file(str(out / "step-0000003" / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    # longcap eval gives the same held-out retrieval as training's last evaluation; other sets are refused by name
    capsys.readouterr()
    assert main(["eval", str(out), "synthetic", "--run", str(tmp_path / "run")]) == 0
    again = json.loads((tmp_path / "run" / "eval" / "synthetic-goal.json").read_text())["retrieval"]
    assert again["n"] == 3 and again["global"] == pytest.approx(ev["global"])
    assert "global" in capsys.readouterr().out
    # the same held-out images and captions in Urban-1k's layout: the same numbers through the benchmark reader
    test = pq.read_table(world / "truth.parquet").to_pylist()  # every image: finer recall values than 3
    for d in ("image", "caption"):
        (tmp_path / "urban" / d).mkdir(parents=True)
    for n, r in enumerate(test):
        (tmp_path / "urban" / "image" / f"{n}.jpg").write_bytes((world / "images" / f"{r['id']}.jpg").read_bytes())
        (tmp_path / "urban" / "caption" / f"{n}.txt").write_text(" ".join(x["text"] for x in r["sentences"]))
    assert main(["eval", str(out), "urban-1k", "--root", str(tmp_path / "urban"), "--out",
                 str(tmp_path / "urban.json")]) == 0
    urban = json.loads((tmp_path / "urban.json").read_text())
    from model.train import EvalSpec

    whole = model.evaluate(EvalSpec(urls, image_size=64))["retrieval"]
    assert urban["retrieval"]["n"] == whole["n"] == len(test) and 0 < whole["global"]["i2t_r1"] < 1
    assert urban["retrieval"]["global"] == pytest.approx(whole["global"])
    assert urban["truncated"] == 0 and f"stretch to 248 tokens; 0 of {len(test)} captions cut" in urban["text"]
    capsys.readouterr()
    assert main(["eval", str(out), "refcoco", "--root", str(tmp_path)]) == 2
    assert "not evaluated on refcoco" in capsys.readouterr().err
    img = tmp_path / "urban" / "image" / "0.jpg"
    assert main(["ground", str(img), "a red ball", "--checkpoint", str(out), "--out", str(tmp_path / "h.png")]) == 2
    assert "goal-tiny model (goal)" in capsys.readouterr().err and not (tmp_path / "h.png").exists()
    # a wrong image size is refused by name
    bad = tiny_train(model="goal-tiny", shards=urls, out=str(tmp_path / "bad"), image_size=96)
    from model.train import TrainConfigError, train

    with pytest.raises(TrainConfigError, match="takes 64 px"):
        train(bad, urls, tmp_path / "bad")


def test_pretrained_is_taken_from_the_config_and_never_fetched_for_loading(tmp_path):
    """A GOAL config names pretrained weights (a tag or a file); a checkpoint rebuilds without them."""
    from model.checkpoint import load_model, save_model
    from model.goal import CONFIGS

    assert CONFIGS["goal-vitb16-openai"].pretrained == "openai" and CONFIGS["goal-tiny"].pretrained is None
    import open_clip

    from model.goal import register_clip_configs

    register_clip_configs()
    torch.manual_seed(0)
    src = open_clip.create_model("longcap-tiny-clip", pretrained=None)
    clip_file = tmp_path / "clip.pt"  # an open_clip checkpoint file as `pretrained`
    torch.save({"state_dict": src.state_dict()}, clip_file)
    torch.manual_seed(1)
    model = build("goal-tiny", pretrained=str(clip_file))
    assert torch.equal(model.clip.visual.proj, src.visual.proj)
    assert torch.equal(model.clip.positional_embedding, stretch_positions(src.positional_embedding.data, 248, 20))
    save_model(model, tmp_path / "m.safetensors", step=5)
    clip_file.unlink()  # loading a longcap checkpoint needs only the checkpoint
    again = load_model(tmp_path / "m.safetensors")
    assert again.cfg.pretrained is None and torch.equal(again.clip.visual.proj, src.visual.proj)


def test_train_configs_validate_and_name_known_models():
    from model.registry import all_configs
    from pipeline.config import load_train_config

    root = Path(__file__).resolve().parents[1] / "configs" / "train"
    seen = set()
    for path in sorted(root.glob("*.yaml")):
        cfg, run = load_train_config(str(path))
        kind, mcfg = all_configs()[cfg.model]
        seen.add(kind)
        if hasattr(mcfg, "image_size") and (kind == "goal" or getattr(mcfg, "image", "") == "groupvit"):
            assert cfg.image_size == mcfg.image_size, path.name
    assert {"caft", "goal", "grouping"} <= seen
    # OpenAI's CLIP weights run with the activation they were trained with (open_clip only warns otherwise)
    import open_clip

    for name, (kind, mcfg) in all_configs().items():
        if kind == "goal" and mcfg.pretrained:
            want = open_clip.get_pretrained_cfg(mcfg.clip_model, mcfg.pretrained).get("quick_gelu", False)
            assert open_clip.get_model_config(mcfg.clip_model).get("quick_gelu", False) == want, name


def test_a_bad_model_change_is_refused_by_name(tmp_path, capsys):
    from workflows.cli import main

    for changes, word in (({"long_text": "sideways"}, "long_text"), ({"colour": 1}, "unknown model config fields"),
                          ({"pretrained": str(tmp_path / "missing.pt")}, "goal-tiny")):
        path = tmp_path / "bad.yaml"
        cfg = tiny_train(model="goal-tiny", shards=[str(tmp_path / "none.tar")], out=str(tmp_path / "o"))
        path.write_text(yaml.safe_dump({**cfg.model_dump(mode="json"), "model_changes": changes}))
        assert main(["train", str(path)]) == 2
        err = capsys.readouterr().err
        assert word in err and "Traceback" not in err, err
