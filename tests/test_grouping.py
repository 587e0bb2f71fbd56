import itertools
import json
import random
import shutil

import pytest
import torch
import yaml

from localpairs_helpers import region_shards, tiny_train
from model.grouping import (GroupingBlock, GroupingModel, gumbel_hard, parse_entities_line, phrase_metrics,
                            read_flickr30k_entities, synthetic_phrases, token_iou, units, word_groups)
from model.localdata import EOT, SOT, bpe_ids, tokenize_words, word_tokens
from model.registry import build


def test_gumbel_hard_assignments_are_one_hot_forward_and_pass_gradients_to_the_logits():
    torch.manual_seed(0)
    logits = torch.randn(5, 7, 4, requires_grad=True)
    out = gumbel_hard(logits, tau=0.7)
    assert set(out.detach().unique().tolist()) <= {0.0, 1.0}  # exactly one-hot, no 0.99999
    assert torch.equal(out.detach().sum(-1), torch.ones(5, 7))
    w = torch.randn(5, 7, 4)
    (out * w).sum().backward()
    assert logits.grad.abs().sum() > 0
    # without noise: the forward is the argmax, the backward is the softmax's (straight-through)
    logits.grad = None
    hard = gumbel_hard(logits, tau=0.7, noise=False)
    assert torch.equal(hard.detach().argmax(-1), logits.detach().argmax(-1))
    (hard * w).sum().backward()
    ref = logits.detach().clone().requires_grad_(True)
    ((ref / 0.7).softmax(-1) * w).sum().backward()
    assert torch.allclose(logits.grad, ref.grad, atol=1e-6)


def test_grouping_block_assigns_each_word_token_to_one_group_and_learns_the_assignment():
    torch.manual_seed(0)
    block = GroupingBlock(16, 2)
    x, g = torch.randn(3, 9, 16), torch.randn(3, 4, 16)
    assignable = torch.ones(3, 9, dtype=torch.bool)
    assignable[:, 0] = False
    assignable[2] = False  # a padding row: nothing to assign
    out = block(x, g, assignable)
    a = out["assign"].detach()
    assert torch.equal(a.sum(-1), assignable.float()) and set(a.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(out["present"], a.sum(1) > 0) and not out["present"][2].any()
    assert torch.isfinite(out["groups"]).all()
    out["groups"].pow(2).sum().backward()
    # to_token only shapes the assignment logits: its gradient came through the hard assignment
    assert block.to_token.weight.grad.abs().sum() > 0
    block.eval()  # no noise: the argmax of the logits
    out = block(x, g, assignable)
    assert torch.equal(out["assign"][0].argmax(-1)[1:], out["logits"][0].argmax(-1)[1:])
    # a group is made of its own tokens only: changing a token's value moves its group and no other
    with torch.no_grad():
        base = block(x, g, assignable)
        t = 3
        k = base["assign"][0, t].argmax().item()
        x2 = x.clone()
        x2[0, t] += 0.01 * torch.randn(16)
        moved = block(x2, g, assignable)
    assert torch.equal(moved["assign"], base["assign"])  # a small change: the same assignment
    others = [j for j in range(4) if j != k and base["present"][0, j]]
    assert others and torch.allclose(moved["groups"][0, others], base["groups"][0, others], atol=1e-6)
    assert not torch.allclose(moved["groups"][0, k], base["groups"][0, k])


def _brute(groups, phrases, thr):
    """Reference: best IoU per phrase by enumeration; the largest one-to-one matching by trying every injection."""
    tiou = [max([len(g & p) / len(g | p) for g in groups] or [0.0]) for p in phrases]
    best = 0
    for k in range(min(len(groups), len(phrases)), 0, -1):
        for ps in itertools.combinations(range(len(phrases)), k):
            for gs in itertools.permutations(range(len(groups)), k):
                if all(len(groups[g] & phrases[p]) / len(groups[g] | phrases[p]) >= thr for p, g in zip(ps, gs)):
                    best = k
                    break
            if best:
                break
        if best:
            break
    return tiou, best


def test_tiou_and_f1_equal_a_reference_on_hand_made_spans():
    # words 0..7 of one text; groups partition them, phrases are the gold spans
    groups = [{0, 1}, {2, 3, 4}, {5}, {6, 7}]
    phrases = [{0, 1}, {2, 3}, {4, 5}, {7}]
    m = phrase_metrics([(groups, phrases)])
    # best IoUs: 1, 2/3, max(1/4, 1/2) = 1/2, 1/2 -> tIoU 2.6667 / 4; matches at >= 0.5: {0,1}, {2,3}-{2,3,4},
    # {4,5}-{5}, {7}-{6,7}: 4 of 4 groups and 4 phrases
    assert m["tiou"] == pytest.approx((1 + 2 / 3 + 0.5 + 0.5) / 4)
    assert (m["precision"], m["recall"], m["f1"]) == (1.0, 1.0, 1.0)
    m = phrase_metrics([(groups, phrases)], threshold=0.6)  # only {0,1} and {2,3} match
    assert (m["precision"], m["recall"]) == (0.5, 0.5) and m["f1"] == pytest.approx(0.5)
    # two texts: counts are summed; a text with no groups scores 0 for its phrases
    m = phrase_metrics([([{0, 1, 2}], [{0}, {1, 2}]), ([], [{0}])])
    assert m["tiou"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3) and m["n_groups"] == 1
    assert (m["precision"], m["recall"]) == (1.0, pytest.approx(1 / 3))
    # random cases against the brute-force reference (groups partition the words, as the model's do)
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 8)
        labels = [rng.randrange(4) for _ in range(n)]
        groups = units(dict(enumerate(labels)))
        phrases = []
        i = 0
        while i < n:
            j = rng.randint(i + 1, n)
            if rng.random() < 0.6:
                phrases.append(set(range(i, j)))
            i = j
        if not phrases:
            continue
        thr = rng.choice([0.5, 0.34, 0.75])
        tiou, matched = _brute(groups, phrases, thr)
        m = phrase_metrics([(groups, phrases)], thr)
        assert m["tiou"] == pytest.approx(sum(tiou) / len(tiou))
        assert m["recall"] == pytest.approx(matched / len(phrases))
        assert m["precision"] == pytest.approx(matched / len(groups))
    assert token_iou({1, 2}, {2, 3}) == pytest.approx(1 / 3)


def test_bpe_tokens_map_back_to_word_tokens():
    text = "A purple hexagon, marked with the digit 4."
    ids, word_of = word_tokens(text)
    assert ids[0] == SOT and ids[-1] == EOT and word_of[0] == word_of[-1] == -1
    words = ["A", "purple", "hexagon", ",", "marked", "with", "the", "digit", "4", "."]
    for w, word in enumerate(words):
        assert [i for i, k in zip(ids, word_of) if k == w] == bpe_ids(word)
    assert word_of.count(2) == 2  # 'hex' + 'agon'
    assert tokenize_words([text])[0, :len(ids)].tolist() == ids
    # majority vote per word; a tie goes to the word's first token
    assert word_groups([9, 0, 1, 1, 2, 3, 3, 9], [-1, 0, 1, 1, 2, 2, 2, -1]) == {0: 0, 1: 1, 2: 3}
    assert word_groups([2, 0, 1], [0, 0, 1]) == {0: 2, 1: 1}
    assert units({0: 1, 1: 1, 2: 0, 3: 1}) == [{2}, {0, 1, 3}]


def test_synthetic_phrases_are_word_spans_of_their_sentence(world):
    from pipeline.synthetic import word_spans

    items = synthetic_phrases(str(world / "truth.parquet"), {"split": "test"})
    assert items and all(p for _, p in items)
    for text, phrases in items:
        words = [text[a:b] for a, b in word_spans(text)]
        for p in phrases:
            phrase = " ".join(words[i] for i in sorted(p))
            assert phrase.replace(" ,", ",") in text, (phrase, text)
    kinds = {t.split()[0] for t, _ in items}
    assert len(items) > len(synthetic_phrases(str(world / "truth.parquet"), {"split": "nope"})) == 0 and kinds


def test_flickr30k_entities_format_is_read(tmp_path):
    line = "[/EN#18/people A man] in [/EN#19/clothing an orange hat] starring at [/EN#0/notvisual something] ."
    text, spans = parse_entities_line(line)
    assert text == "A man in an orange hat starring at something ."
    assert [text[a:b] for a, b in spans] == ["A man", "an orange hat"]  # notvisual left out
    (tmp_path / "Sentences").mkdir()
    (tmp_path / "Sentences" / "1000.txt").write_text(line + "\n[/EN#3/people/other Two kids] play .\n")
    (tmp_path / "Sentences" / "2000.txt").write_text("[/EN#5/animals A dog] runs .\n")
    (tmp_path / "test.txt").write_text("1000\n")
    items = read_flickr30k_entities(str(tmp_path))
    assert items == [(text, [{0, 1}, {3, 4, 5}]), ("Two kids play .", [{0, 1}])]


def test_grouping_trains_end_to_end_from_a_config_in_a_run(world, tmp_path, capsys):
    from model.checkpoint import load_model
    from workflows.cli import main

    run = tmp_path / "run"
    region_shards(world, run / "export", regions=False)
    (run / "synth").mkdir()
    shutil.copy(world / "truth.parquet", run / "synth" / "truth.parquet")
    cfg = tiny_train(model="grouping-tiny", eval_where={"split": "test"}, train_where={"split": "train"}).model_dump(
        mode="json")
    path = tmp_path / "grouping.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "--run", str(run)]) == 0
    printed = capsys.readouterr().out
    assert "trained to step 3" in printed and "synthetic phrases: tIoU" in printed
    out = run / "models" / "grouping-tiny"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert all(r["recon"] > 0 and r["contrastive"] > 0 for r in rows if "loss" in r)
    ev = [r for r in rows if "eval" in r][-1]["eval"]
    ph = ev["phrases"]
    assert ph["n_texts"] > 0 and 0 <= ph["tiou"] <= 1 and 0 <= ph["f1"] <= 1
    assert 0 < ph["n_groups"] <= 4 * ph["n_texts"]  # K = 4 groups at most per sentence
    assert ph["baselines"]["word_per_group"]["tiou"] > 0 and ev["retrieval"]["n"] == 3
    model = load_model(out)
    assert isinstance(model, GroupingModel) and model.trained_steps == 3
    assert model.phrase_eval(synthetic_phrases(str(run / "synth" / "truth.parquet"), {"split": "test"})) == ph
    # longcap eval: the same phrase measures from the checkpoint; benchmark readers are for other model kinds
    capsys.readouterr()
    assert main(["eval", str(out), "synthetic", "--run", str(run)]) == 0
    assert json.loads((run / "eval" / "synthetic-grouping-tiny.json").read_text())["phrases"] == ph
    assert "synthetic phrases: tIoU" in capsys.readouterr().out
    assert main(["eval", str(out), "urban-1k", "--root", str(tmp_path)]) == 2
    assert "grouping models on 'synthetic' only" in capsys.readouterr().err


def test_grouping_on_a_frozen_caft_segments(world, tmp_path):
    from localpairs_helpers import region_shards as shards
    from model.checkpoint import load_model, save_model
    from model.data import DataConfig, dataset

    torch.manual_seed(0)
    save_model(build("caft-tiny"), tmp_path / "caft.safetensors", step=1)
    model = build("grouping-tiny-caft", caft_checkpoint=str(tmp_path / "caft.safetensors"))
    assert not any(k.startswith("image._caft") or "vision." in k for k in model.state_dict())
    urls = shards(world, tmp_path / "shards", regions=False)
    b = next(iter(dataset(urls, DataConfig(train=True, batch_size=3, n_sub=2, k_chunks=2, image_size=56,
                                           **model.data_options()))))
    out = model(**model.batch_inputs(b, "cpu"))
    out["loss"].backward()
    caft = model.image._caft[0]
    assert all(p.grad is None for p in caft.parameters())
    assert model.image.proj.weight.grad.abs().sum() > 0
    v = model.image(b["image"])
    assert v["groups"].shape == (3, caft.cfg.levels[-1], 64)
    save_model(model, tmp_path / "g.safetensors")
    again = load_model(tmp_path / "g.safetensors")
    assert torch.equal(again.image.proj.weight, model.image.proj.weight)
