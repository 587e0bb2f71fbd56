import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from model.superpixels import boundary_recall, superpixels
from pipeline import synthetic as syn


@pytest.mark.parametrize("backend", ["grid", "slic"])
def test_every_pixel_labelled_in_range(backend):
    imgs = torch.rand(2, 3, 224, 224)
    labels = superpixels(imgs, backend)
    assert labels.shape == (2, 224, 224) and labels.min() >= 0 and labels.max() < 196
    if backend == "grid":
        assert labels[0].unique().numel() == 196 and torch.equal(labels[0, :16, :16], torch.zeros(16, 16).long())


def test_slic_follows_object_boundaries_better_than_the_grid(world):
    truth = pq.read_table(world / "truth.parquet").to_pylist()[:6]
    imgs, gts = [], []
    for row in truth:
        img = Image.open(world / "images" / f"{row['id']}.jpg").convert("RGB").resize((224, 224), Image.BICUBIC)
        imgs.append(torch.from_numpy(np.asarray(img)).permute(2, 0, 1).float() / 255)
        gt = np.zeros((224, 224), np.int64)
        for i, obj in enumerate(row["objects"]):
            m = np.asarray(Image.fromarray(syn.decode_mask(obj["mask_png"]).astype(np.uint8) * 255).resize((224, 224))) > 127
            gt[m] = i + 1
        gts.append(torch.from_numpy(gt))
    imgs, gts = torch.stack(imgs), torch.stack(gts)
    slic = boundary_recall(superpixels(imgs, "slic"), gts)
    grid = boundary_recall(superpixels(imgs, "grid"), gts)
    assert slic > grid + 0.1, (slic, grid)


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="unknown superpixel backend 'sfcn'"):
        superpixels(torch.rand(1, 3, 32, 32), "sfcn")
