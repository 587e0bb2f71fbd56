import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from model.sfcn import SFCN, load_sfcn, save_sfcn, train_sfcn
from model.superpixels import boundary_recall, superpixels
from pipeline import synthetic as syn


@pytest.mark.parametrize("backend", ["grid", "slic", "sfcn"])
def test_every_pixel_labelled_in_range(backend):
    imgs = torch.rand(2, 3, 224, 224)
    labels = superpixels(imgs, backend, net=SFCN().eval() if backend == "sfcn" else None)
    assert labels.shape == (2, 224, 224) and labels.min() >= 0 and labels.max() < 196
    if backend != "slic":  # an untrained SFCN is the grid (its logits are the distance prior)
        assert labels[0].unique().numel() == 196 and torch.equal(labels[0, :16, :16], torch.zeros(16, 16).long())


def synthetic_batch(world, rows, size):
    truth = pq.read_table(world / "truth.parquet").to_pylist()[rows]
    imgs, gts = [], []
    for row in truth:
        img = Image.open(world / "images" / f"{row['id']}.jpg").convert("RGB").resize((size, size), Image.BICUBIC)
        imgs.append(torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255)
        gt = np.zeros((size, size), np.int64)
        for i, obj in enumerate(row["objects"]):
            mask = Image.fromarray(syn.decode_mask(obj["mask_png"]).astype(np.uint8) * 255).resize((size, size))
            gt[np.asarray(mask) > 127] = i + 1
        gts.append(torch.from_numpy(gt))
    return torch.stack(imgs), torch.stack(gts)


def test_slic_follows_object_boundaries_better_than_the_grid(world):
    imgs, gts = synthetic_batch(world, slice(0, 6), 224)
    slic = boundary_recall(superpixels(imgs, "slic"), gts)
    grid = boundary_recall(superpixels(imgs, "grid"), gts)
    assert slic > grid + 0.1, (slic, grid)


def test_sfcn_trains_by_reconstruction_and_beats_the_grid(world, tmp_path):
    imgs, gts = synthetic_batch(world, slice(0, 6), 112)  # held out from training
    train = [Image.open(p).convert("RGB") for p in sorted((world / "images").glob("*.jpg"))[6:]]
    model, losses = train_sfcn(train, steps=40, batch=4, size=112, lr=3e-3, log_every=0)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    sfcn = boundary_recall(model.labels(imgs), gts)
    grid = boundary_recall(superpixels(imgs, "grid"), gts)
    assert sfcn > grid + 0.05, (sfcn, grid)
    path = tmp_path / "sfcn.safetensors"
    save_sfcn(model, str(path))
    assert torch.equal(superpixels(imgs, "sfcn", net=load_sfcn(str(path))), model.labels(imgs))


def test_sfcn_checkpoint_refuses_other_files(tmp_path):
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a longcap SFCN checkpoint"):
        load_sfcn(str(other))
    pickle = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2)}, pickle)
    with pytest.raises(ValueError, match="cannot read as a safetensors"):
        load_sfcn(str(pickle))


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="unknown superpixel backend 'quickshift'"):
        superpixels(torch.rand(1, 3, 32, 32), "quickshift")
    with pytest.raises(ValueError, match="needs a trained SFCN"):
        superpixels(torch.rand(1, 3, 32, 32), "sfcn")
