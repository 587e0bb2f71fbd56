"""Grounding masks: a heat map (a sub-caption's attention painted back to pixels) -> Otsu-thresholded mask."""

from __future__ import annotations

import torch


def minmax(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)


def otsu_threshold(x: torch.Tensor, bins: int = 256) -> float:
    """The threshold on values in [0, 1] that maximises the between-class variance (Otsu, 1979)."""
    hist = torch.histc(x.float().flatten(), bins=bins, min=0.0, max=1.0).double()
    p = hist / hist.sum()
    centres = (torch.arange(bins, dtype=torch.float64) + 0.5) / bins
    w0 = p.cumsum(0)
    mu = (p * centres).cumsum(0)
    mu_t = mu[-1]
    w1 = 1 - w0
    between = (mu_t * w0 - mu) ** 2 / (w0 * w1).clamp_min(1e-12)
    between[(w0 <= 0) | (w1 <= 0)] = -1
    k = int(between.argmax())
    return float((k + 1) / bins)  # values >= this edge are foreground


def grounding_mask(heat: torch.Tensor) -> torch.Tensor:
    """Min-max normalise a [H,W] heat map and threshold it with Otsu: a boolean mask."""
    h = minmax(heat)
    return h >= otsu_threshold(h)


SAG_THRESHOLD = 0.5  # SaG's --pseudo_threshold in train_eval_{unc,unc+,gref}.sh (option.py default 0.5)


def sag_masks(heat: torch.Tensor, size: tuple[int, int], threshold: float | None = SAG_THRESHOLD) -> torch.Tensor:
    """SaG's prediction (eval_cma_recon.py get_IoU_map): a [Q,h,w] heat map of the square model input resized
    (bilinear) to the image's original [H,W], min-max normalised per map, foreground where >= threshold
    (None: Otsu's threshold instead). Returns [Q,H,W] booleans at the original resolution."""
    big = torch.nn.functional.interpolate(heat.float().unsqueeze(1), size=size, mode="bilinear",
                                          align_corners=False)[:, 0]
    lo = big.flatten(1).min(1).values[:, None, None]
    hi = big.flatten(1).max(1).values[:, None, None]
    norm = (big - lo) / (hi - lo + 1e-9)
    if threshold is None:
        return torch.stack([m >= otsu_threshold(m) for m in norm])
    return norm >= threshold


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = (a | b).sum().item()
    return (a & b).sum().item() / union if union else 1.0


def cannot_ground(model) -> str | None:
    """Why a model's attention maps mean nothing (None: they do). Only a CAFT-family model trained with the
    part-level loss (CAFT, +textual) or FLAIR's
    text-conditioned loss (FLAIR, +visual) has trained its sub-caption attention pooling."""
    if getattr(model, "kind", "caft") != "caft":
        return (f"a {model.cfg.name} model ({model.kind}) has no sub-caption attention to draw: heat maps come "
                f"from CAFT-family models trained with the part loss (caft-*, flair-*)")
    if not model.cfg.part_loss:
        return (f"{model.cfg.name} is trained without the part-level loss: its attention pooling keeps its random "
                f"initial weights, so its heat maps would mean nothing")
    return None


@torch.no_grad()
def text_heatmaps(model, image: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """Each text as its own one-chunk caption, its attention over one image [1,3,S,S] painted to pixels: [Q,S,S]."""
    from .data import tokenize

    why = cannot_ground(model)
    if why:
        raise ValueError(why)
    device = image.device
    tokens = tokenize(list(texts)).unsqueeze(1).to(device)
    ones = torch.ones(len(texts), 1, dtype=torch.bool, device=device)
    sub = model.encode_text(tokens, ones, ones)["sub"][:, 0]
    return model.heatmap(model.encode_image(image), sub)


@torch.no_grad()
def image_heatmaps(model, image, texts: list[str], size: int, device: str = "cpu") -> torch.Tensor:
    """Heat maps [len(texts), size, size] of sub-captions over one PIL image, in the model's input geometry
    (short side resized to `size`, centre crop)."""
    from .data import image_transform

    if not texts:
        raise ValueError("no texts to ground")
    x = image_transform(size)(image.convert("RGB")).unsqueeze(0).to(device)
    return text_heatmaps(model, x, texts).float().cpu()
