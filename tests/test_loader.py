import io
import json
import logging

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from model.data import CLIP_MEAN, CLIP_STD, DataConfig, dataset, loader, tokenize

LONG = ["One red cube.", "Two blue balls.", "A green cone.", "The floor is grey.", "A lamp glows."]


def jpeg(rgb, size=(160, 120)):
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def write_shards(folder, n_shards=4, per_shard=3, corrupt=None):
    urls = []
    for s in range(n_shards):
        path = folder / f"{s:05d}-000.tar"
        with wds.TarWriter(str(path)) as w:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                caps = [{"captioner": "long", "prompt_id": "p", "sentences": LONG, "text": " ".join(LONG)},
                        {"captioner": "short", "prompt_id": "p", "sentences": ["Tiny."], "text": "Tiny."}]
                data = b"\xff\xd8\xff\xe0 not really a jpeg" if key == corrupt else jpeg((255, 0, 0))
                w.write({"__key__": key, "jpg": data, "json": json.dumps({"key": key, "captions": caps}).encode()})
        urls.append(str(path))
    return urls


def test_eval_batch_shapes_masks_and_chunks(tmp_path):
    urls = write_shards(tmp_path, n_shards=1, per_shard=3)
    cfg = DataConfig(train=False, batch_size=3, n_sub=4, k_chunks=2)
    (batch,) = list(dataset(urls, cfg))
    assert batch["image"].shape == (3, 3, 224, 224) and batch["tokens"].shape == (3, 4, 77)
    assert batch["valid"].all() and batch["whole"].tolist() == [[True, True, False, False]] * 3
    # balanced chunking of 5 sentences into 2: 3 + 2; the extras come from the other caption
    assert batch["texts"][0] == ["One red cube. Two blue balls. A green cone.", "The floor is grey. A lamp glows.",
                                 "Tiny.", "Tiny."]
    assert torch.equal(batch["tokens"][0], tokenize(batch["texts"][0]))
    # a pure red image: channel values are (x - mean) / std exactly
    want = [(v - m) / s for v, m, s in zip((1.0, 0.0, 0.0), CLIP_MEAN, CLIP_STD)]
    got = batch["image"][0].mean(dim=(1, 2)).tolist()
    assert np.allclose(got, want, atol=0.02)


def test_padding_when_fewer_chunks_than_k(tmp_path):
    path = tmp_path / "00000-000.tar"
    with wds.TarWriter(str(path)) as w:
        caps = [{"captioner": "c", "prompt_id": "p", "sentences": ["Only one."], "text": "Only one."}]
        w.write({"__key__": "k0", "jpg": jpeg((0, 0, 255)), "json": json.dumps({"captions": caps}).encode()})
    (batch,) = list(dataset([str(path)], DataConfig(train=False, batch_size=4, n_sub=4, k_chunks=3)))
    assert batch["valid"].tolist() == [[True, True, False, False]]  # 1 chunk + N-K=1 extra
    assert batch["whole"].tolist() == [[True, False, False, False]]
    assert (batch["tokens"][0, 2:] == 0).all()


def test_training_chunks_are_seeded_per_key(tmp_path):
    urls = write_shards(tmp_path, n_shards=2, per_shard=4)
    cfg = DataConfig(train=True, batch_size=8, n_sub=6, k_chunks=4, seed=3)

    def texts(c):
        return {k: t for b in dataset(urls, c) for k, t in zip(b["keys"], b["texts"])}

    a, b = texts(cfg), texts(cfg)
    assert a == b and len(a) == 8
    for t in a.values():
        assert len(t) == 6
        for chunk in t[:4]:  # each of the K chunks is 1-3 consecutive sentences of the long caption
            assert chunk in {" ".join(LONG[i:j]) for i in range(5) for j in range(i + 1, min(i + 3, 5) + 1)}
    other = texts(DataConfig(train=True, batch_size=8, n_sub=6, k_chunks=4, seed=3, epoch=1))
    assert other != a


def test_two_ranks_two_workers_see_disjoint_shards(tmp_path):
    urls = write_shards(tmp_path, n_shards=8, per_shard=2)
    seen = {}
    for rank in (0, 1):
        cfg = DataConfig(train=False, batch_size=2, n_sub=2, k_chunks=1, rank=rank, world_size=2)
        for batch in loader(urls, cfg, num_workers=2, context="spawn"):
            for key, url in zip(batch["keys"], batch["urls"]):
                assert key not in seen, f"{key} read twice"
                seen[key] = (rank, url)
    assert len(seen) == 16
    shards_of = {r: {u for rr, u in seen.values() if rr == r} for r in (0, 1)}
    assert len(shards_of[0]) == len(shards_of[1]) == 4 and not shards_of[0] & shards_of[1]


def test_corrupt_jpeg_is_skipped_with_a_logged_reason(tmp_path, caplog):
    urls = write_shards(tmp_path, n_shards=1, per_shard=3, corrupt="000000001")
    with caplog.at_level(logging.WARNING, logger="longcap.data"):
        keys = [k for b in dataset(urls, DataConfig(train=False, batch_size=8, n_sub=2, k_chunks=1)) for k in b["keys"]]
    assert keys == ["000000000", "000000002"]
    assert any("skipping sample 000000001" in r.getMessage() and "ImageError: truncated image: Truncated File Read" in r.getMessage()
               for r in caplog.records)


def test_resampled_stream_repeats_exactly_and_differs_by_rank(tmp_path):
    urls = write_shards(tmp_path, n_shards=4, per_shard=3)

    def keys(rank, epoch=0):
        cfg = DataConfig(train=True, batch_size=2, n_sub=2, k_chunks=1, image_size=32, resampled=True,
                         epoch_samples=12, rank=rank, world_size=2, epoch=epoch, shuffle_buffer=4)
        return [k for b in dataset(urls, cfg) for k in b["keys"]]

    a = keys(0)
    assert len(a) == 12 and a == keys(0)  # bounded epoch, same stream on a rerun
    assert a != keys(1) and a != keys(0, epoch=1)
