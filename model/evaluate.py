"""Evaluation: retrieval R@k both ways (whole, part, CAFT++ scores) and grounding mIoU on the synthetic world.

Ranks count ties against the model: a ground-truth item is at rank r when r other candidates score at
least as high. With several captions per image, image->text succeeds when any of its captions is in the
top k.
"""

from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .data import DataConfig, dataset, decode_image, image_transform, selected, tokenize
from .grounding import grounding_mask, iou


def recall_at_k(sim: torch.Tensor, image_of_text: torch.Tensor, ks=(1, 5)) -> dict:
    """sim [n_img, n_txt]; image_of_text [n_txt] the true image of each text."""
    n_img, n_txt = sim.shape
    cols = torch.arange(n_txt)
    true_t2i = sim[image_of_text, cols]  # [n_txt]
    # text -> image: other images scoring >= the true one
    t2i_rank = (sim >= true_t2i.unsqueeze(0)).sum(0) - 1
    # image -> text: best-ranked of the image's own texts; others (texts of other images) scoring >= it
    own = image_of_text.unsqueeze(0) == torch.arange(n_img).unsqueeze(1)  # [n_img, n_txt]
    best_own = sim.masked_fill(~own, float("-inf")).max(1).values  # [n_img]
    i2t_rank = ((sim >= best_own.unsqueeze(1)) & ~own).sum(1)
    has_text = own.any(1)
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = (i2t_rank[has_text] < k).float().mean().item() if has_text.any() else float("nan")
        out[f"t2i_r{k}"] = (t2i_rank < k).float().mean().item()
    return out


@torch.no_grad()
def encode_shards(model, urls: list[str], data: DataConfig, device: str = "cpu") -> dict:
    """Encode every selected sample once: one caption per image (the longest, balanced chunks)."""
    model.eval()
    keys, extras, cls, parts, whole, sub, valid = [], [], [], [], [], [], []
    for batch in dataset(urls, data):
        v = model.encode_image(batch["image"].to(device))
        t = model.encode_text(batch["tokens"].to(device), batch["valid"].to(device), batch["whole"].to(device))
        keys += batch["keys"]
        cls.append(v["cls"])
        parts.append(v["parts"])
        whole.append(t["whole"])
        sub.append(t["sub"])
        valid.append(batch["valid"].to(device))
    if not keys:
        raise ValueError(f"no evaluation samples in {urls} (filter {data.where})")
    return {"keys": keys, "cls": torch.cat(cls), "parts": torch.cat(parts), "whole": torch.cat(whole),
            "sub": torch.cat(sub), "valid": torch.cat(valid)}


@torch.no_grad()
def retrieval(model, enc: dict, alpha: float | None = None, block: int = 64) -> dict:
    """R@1/R@5 both ways for the whole, part and CAFT++ scores (part scores need the part loss)."""
    n = len(enc["keys"])
    img = F.normalize(enc["cls"], dim=-1)
    whole = img @ F.normalize(enc["whole"], dim=-1).T
    truth = torch.arange(n)
    out = {"n": n, "chance_r1": 1.0 / n, "whole": recall_at_k(whole.cpu(), truth)}
    if model.cfg.part_loss:
        a = model.cfg.alpha if alpha is None else alpha
        sub, valid = F.normalize(enc["sub"], dim=-1), enc["valid"]
        rows = []
        for s in range(0, n, block):  # images in blocks: grounded features are [img, txt, N, D]
            g = F.normalize(model.ground(enc["sub"], enc["parts"][s:s + block]), dim=-1)
            per_sub = (g * sub.unsqueeze(0)).sum(-1)
            m = valid.unsqueeze(0).to(per_sub.dtype)
            rows.append((per_sub * m).sum(-1) / m.sum(-1).clamp_min(1))
        part = torch.cat(rows)
        out["part"] = recall_at_k(part.cpu(), truth)
        out["caftpp"] = recall_at_k(((1 - a) * whole + a * part).cpu(), truth)
        out["alpha"] = a
    return out


@torch.no_grad()
def synthetic_grounding(model, urls: list[str], truth: dict, data: DataConfig, device: str = "cpu",
                        limit: int = 200) -> dict:
    """mIoU of Otsu masks of object sentences against their ground-truth masks (synthetic world).

    truth: image id -> truth row (pipeline.synthetic). Baseline: a mask covering the whole image.
    """
    import webdataset as wds

    from pipeline.synthetic import decode_mask

    model.eval()
    size = data.image_size
    ious, whole_ious = [], []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        meta = json.loads(sample["json"])
        if not selected(meta, data.where):
            continue
        row = truth.get(meta.get("extra", {}).get("id"))
        if row is None:
            continue
        image = image_transform(size)(decode_image(sample["jpg"], data.max_pixels)).unsqueeze(0).to(device)
        objs = [s for s in row["sentences"] if s["kind"] == "object" and len(s["objects"]) == 1]
        if not objs:
            continue
        tokens = tokenize([s["text"] for s in objs]).unsqueeze(1).to(device)  # each sentence its own caption
        ones = torch.ones(len(objs), 1, dtype=torch.bool, device=device)
        sub = model.encode_text(tokens, ones, ones)["sub"][:, 0]
        heat = model.heatmap(model.encode_image(image), sub)  # [Q,H,W]
        for q, s in enumerate(objs):
            gt = _mask_to(decode_mask(s["mask_png"]), size)
            ious.append(iou(grounding_mask(heat[q].cpu()), gt))
            whole_ious.append(iou(torch.ones_like(gt), gt))
        if len(ious) >= limit:
            break
    if not ious:
        raise ValueError("no synthetic object sentences to ground (is the truth table for these shards?)")
    return {"miou": float(np.mean(ious)), "n": len(ious), "baseline_whole_image_miou": float(np.mean(whole_ious))}


def _mask_to(mask: np.ndarray, size: int) -> torch.Tensor:
    """A ground-truth mask through the loader's geometry (resize the short side, centre crop)."""
    im = Image.fromarray(mask.astype(np.uint8) * 255)
    w, h = im.size
    scale = size / min(w, h)
    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.NEAREST)
    left, top = (im.width - size) // 2, (im.height - size) // 2
    im = im.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.array(im) > 127)


def read_truth(path: str) -> dict:
    import pyarrow.parquet as pq

    return {r["id"]: r for r in pq.read_table(path).to_pylist()}
