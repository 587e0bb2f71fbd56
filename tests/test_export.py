import glob
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml

from pipeline.export import TarParts
from workflows.cli import main

from conftest import demo_config


@pytest.fixture(scope="module")
def exported(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    run_dir = tmp / "run"
    # captions of fewer than 45 words are excluded, and every tar holds at most 1 sample
    cfg = demo_config(run_dir, **{"sentences.quality.min_words": 45, "export.max_samples": 1})
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp / "cfg.yaml"), "--no-progress"]) == 0
    return run_dir


def test_every_key_accounted_for_with_reasons(exported):
    images = {r["key"]: r for f in sorted(glob.glob(str(exported / "images" / "0*.parquet")))
              for r in pq.read_table(f, columns=["key", "status"]).to_pylist()}
    sents = {r["key"]: r for f in sorted(glob.glob(str(exported / "sentences" / "0*.parquet")))
             for r in pq.read_table(f, columns=["key", "n_words", "excluded"]).to_pylist()}
    rows = [r for f in sorted(glob.glob(str(exported / "export" / "0*.parquet"))) for r in pq.read_table(f).to_pylist()]
    assert sorted(r["key"] for r in rows) == sorted(images)  # every key, once
    for r in rows:
        if images[r["key"]]["status"] != "success":
            assert not r["exported"] and r["reasons"][0].startswith("no image (")
        elif sents[r["key"]]["n_words"] < 45:
            assert not r["exported"] and "too_few_words" in r["reasons"][0]
        else:
            assert r["exported"] and r["reasons"] == [] and r["tar"].endswith(".tar")
    n_ok = sum(r["exported"] for r in rows)
    assert 0 < n_ok < 9  # some exported, some excluded by the word limit
    index = pq.read_table(exported / "export" / "index.parquet")
    assert sorted(index["key"].to_pylist()) == sorted(r["key"] for r in rows if r["exported"])


def test_plain_webdataset_and_datasets_read_the_export(exported):
    tars = sorted(glob.glob(str(exported / "export" / "*.tar")))
    index = pq.read_table(exported / "export" / "index.parquet").to_pylist()
    assert len(tars) == len(index)  # max_samples = 1: one tar per sample
    samples = list(wds.WebDataset(tars, shardshuffle=False).decode("pil").to_tuple("jpg", "json"))
    assert len(samples) == len(index)
    truth = {r["caption"]: r for r in pq.read_table(exported / "synth" / "truth.parquet").to_pylist()}
    for img, meta in samples:
        assert img.size == (128, 128)
        cap = meta["captions"][0]
        assert cap["captioner"] == "source" and cap["prompt_id"] == "caption"
        assert cap["sentences"] == [s["text"] for s in truth[cap["text"]]["sentences"]]
    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(exported / "export" / "index.parquet"), split="train")
    assert sorted(ds["key"]) == sorted(r["key"] for r in index)


def test_tar_parts_cut_by_bytes(tmp_path):
    parts = TarParts(str(tmp_path / "00000"), max_samples=100, max_bytes=8000)  # ~3.6 kB per sample with headers
    names = [parts.add(f"k{i}", {"jpg": b"x" * 1500, "json": json.dumps({"i": i}).encode()}) for i in range(6)]
    parts.close()
    assert names == ["00000-000.tar", "00000-000.tar", "00000-001.tar", "00000-001.tar", "00000-002.tar",
                     "00000-002.tar"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000-000.tar", "00000-001.tar", "00000-002.tar"]


def test_txt_member_holds_the_configured_caption_in_full(exported):
    tars = sorted(glob.glob(str(exported / "export" / "*.tar")))
    for sample in wds.WebDataset(tars, shardshuffle=False):
        meta = json.loads(sample["json"])
        # default: the first captioner's first caption (the demo's source/caption), its whole text
        assert meta["txt"] == "source/caption"
        assert sample["txt"].decode() == meta["captions"][0]["text"] and len(sample["txt"]) > 200


def test_open_clip_train_loader_yields_batches_from_the_export(exported):
    import argparse

    import open_clip
    import torch
    from open_clip_train.data import get_dataset_size, get_wds_dataset

    from workflows.open_clip_main import patch_open_clip_train

    patch_open_clip_train()  # webdataset's end-of-shard marker, which open_clip_train's grouping cannot take
    tars = sorted(glob.glob(str(exported / "export" / "*.tar")))
    assert get_dataset_size("::".join(tars)) == (len(tars), len(tars))  # from export/sizes.json
    args = argparse.Namespace(train_data="::".join(tars), val_data=None, train_num_samples=None,
                              dataset_resampled=False, train_data_upsampling_factors=None, seed=0, batch_size=2,
                              world_size=1, workers=0)
    preprocess = open_clip.image_transform(64, is_train=False)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    info = get_wds_dataset(args, preprocess, is_train=True, tokenizer=tokenizer)
    batches = list(info.dataloader)
    assert len(batches) == info.dataloader.num_batches == -(-len(tars) // 2)
    images, texts = batches[0]
    assert images.shape == (2, 3, 64, 64) and texts.shape == (2, 77) and texts.dtype == torch.long
    captions = {json.loads(s["json"])["captions"][0]["text"] for s in wds.WebDataset(tars, shardshuffle=False)}
    seen = [t for _, tt in batches for t in tt]
    assert len(seen) >= len(tars) and all(any(torch.equal(t, tokenizer(c)[0]) for c in captions) for t in seen)


def test_datasets_webdataset_builder_reads_the_export(exported):
    import datasets

    tars = sorted(glob.glob(str(exported / "export" / "*.tar")))
    ds = datasets.load_dataset("webdataset", data_files={"train": tars}, split="train")
    index = pq.read_table(exported / "export" / "index.parquet").to_pylist()
    assert sorted(ds["__key__"]) == sorted(r["key"] for r in index)
    row = ds[0]
    assert row["jpg"].size == (128, 128) and row["json"]["captions"][0]["text"] == row["txt"]


@pytest.mark.slow
def test_open_clip_trainer_trains_one_epoch_on_the_export(exported, tmp_path):
    import subprocess
    import sys

    tars = sorted(glob.glob(str(exported / "export" / "*.tar")))
    cmd = [sys.executable, "-m", "workflows.open_clip_main", "--train-data", "::".join(tars),
           "--dataset-type", "webdataset", "--model", "ViT-S-32", "--force-image-size", "64", "--batch-size", "2",
           "--epochs", "1", "--workers", "0", "--device", "cpu", "--precision", "fp32", "--warmup", "1",
           "--lr", "1e-4", "--logs", str(tmp_path), "--name", "t", "--seed", "0"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr[-3000:]
    log = (tmp_path / "t" / "out.log").read_text()
    assert "Train Epoch: 0" in log and (tmp_path / "t" / "checkpoints" / "epoch_1.pt").exists()
