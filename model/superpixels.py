"""Superpixel tokenizers: image batch [B,3,H,W] in [0,1] -> label map [B,H,W] with ids in [0, g*g).

- grid: plain (H/g)x(W/g) patches (the flat-ViT baseline).
- sfcn: a small FCN's association to the 9 neighbouring cells (model/sfcn.py), trained by reconstruction.
- slic: SLIC in torch, batched: every pixel compares itself only with the centres of the 9 grid cells
  around its own, in Lab colour + position, for a few iterations. Runs on whatever device the batch is on.
"""

from __future__ import annotations

import functools

import torch


def grid_labels(b: int, h: int, w: int, g: int = 14, device=None) -> torch.Tensor:
    ys = torch.arange(h, device=device) * g // h
    xs = torch.arange(w, device=device) * g // w
    return (ys[:, None] * g + xs[None, :]).expand(b, h, w).contiguous()


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0,1], [B,3,H,W] -> CIE Lab (D65)."""
    lin = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    m = torch.tensor([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                      [0.019334, 0.119193, 0.950227]], dtype=rgb.dtype, device=rgb.device)
    xyz = torch.einsum("ij,bjhw->bihw", m, lin)
    xyz = xyz / torch.tensor([0.950456, 1.0, 1.088754], dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    f = torch.where(xyz > 0.008856, xyz.clamp_min(1e-12) ** (1 / 3), 7.787 * xyz + 16 / 116)
    L = 116 * f[:, 1] - 16
    a = 500 * (f[:, 0] - f[:, 1])
    bb = 200 * (f[:, 1] - f[:, 2])
    return torch.stack([L, a, bb], 1)


@functools.lru_cache(maxsize=8)
def _neighbours(h: int, w: int, g: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """For every pixel, the ids of the 9 cells around its own cell, and which of them exist."""
    cell = grid_labels(1, h, w, g, device)[0].flatten()
    cy, cx = cell // g, cell % g
    ids, ok = [], []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            ny, nx = cy + dy, cx + dx
            valid = (ny >= 0) & (ny < g) & (nx >= 0) & (nx < g)
            ids.append((ny.clamp(0, g - 1) * g + nx.clamp(0, g - 1)))
            ok.append(valid)
    return torch.stack(ids, 1), torch.stack(ok, 1)  # [HW, 9]


def slic_labels(images: torch.Tensor, g: int = 14, iters: int = 5, compactness: float = 10.0) -> torch.Tensor:
    """SLIC superpixels on a grid of g*g seeds; images [B,3,H,W] in [0,1]."""
    b, _, h, w = images.shape
    n = g * g
    lab = rgb_to_lab(images.float()).flatten(2).transpose(1, 2)  # [B,HW,3]
    ys, xs = torch.meshgrid(torch.arange(h, device=images.device, dtype=torch.float32),
                            torch.arange(w, device=images.device, dtype=torch.float32), indexing="ij")
    step = (h * w / n) ** 0.5
    pos = torch.stack([ys.flatten(), xs.flatten()], 1) * (compactness / step)  # [HW,2], scaled
    feats = torch.cat([lab, pos.expand(b, -1, -1)], -1)  # [B,HW,5]
    labels = grid_labels(b, h, w, g, images.device).flatten(1)
    centres = _means(feats, labels, n, None)
    assign = _assign_by_cell if h % g == 0 and w % g == 0 else _assign_by_pixel
    for _ in range(iters):
        labels = assign(feats, centres, h, w, g)
        centres = _means(feats, labels, n, centres)
    return labels.view(b, h, w)


def _assign_by_pixel(feats, centres, h, w, g):
    """Each pixel's nearest centre among its 9 neighbouring cells (any image size)."""
    b = feats.shape[0]
    nb, ok = _neighbours(h, w, g, str(feats.device))
    cand = torch.gather(centres, 1, nb.flatten().expand(b, -1).unsqueeze(-1).expand(-1, -1, 5)).view(b, h * w, 9, 5)
    dist = ((feats.unsqueeze(2) - cand) ** 2).sum(-1).masked_fill(~ok, float("inf"))
    return torch.gather(nb.expand(b, -1, -1), 2, dist.argmin(-1, keepdim=True)).squeeze(-1)


def _assign_by_cell(feats, centres, h, w, g):
    """The same when the grid divides the image: pixels of a cell share their 9 candidates, so distances
    are one batched matmul per cell (|p|^2 - 2 p.c + |c|^2) instead of a gather per pixel."""
    b, ph, pw = feats.shape[0], h // g, w // g
    cells = feats.view(b, g, ph, g, pw, 5).permute(0, 1, 3, 2, 4, 5).reshape(b, g * g, ph * pw, 5)
    nb, ok = _neighbours(g, g, g, str(feats.device))  # per cell: its 9 neighbouring cells
    cand = centres[:, nb]  # [B, g*g, 9, 5]
    dist = (cells * cells).sum(-1, keepdim=True) - 2 * cells @ cand.transpose(-1, -2) \
        + (cand * cand).sum(-1).unsqueeze(2)
    dist = dist.masked_fill(~ok.unsqueeze(1), float("inf"))  # [B, g*g, P, 9]
    lab = torch.gather(nb.expand(b, -1, -1), 2, dist.argmin(-1))  # [B, g*g, P]
    return lab.view(b, g, g, ph, pw).permute(0, 1, 3, 2, 4).reshape(b, h * w)


def _means(feats: torch.Tensor, labels: torch.Tensor, n: int, old: torch.Tensor | None) -> torch.Tensor:
    """Per-label mean of feats (scatter-add); a label with no pixel keeps its old centre."""
    b, _, d = feats.shape
    sums = torch.zeros(b, n, d, device=feats.device, dtype=feats.dtype).scatter_add_(
        1, labels.unsqueeze(-1).expand(-1, -1, d), feats)
    counts = torch.zeros(b, n, device=feats.device, dtype=feats.dtype).scatter_add_(
        1, labels, torch.ones_like(labels, dtype=feats.dtype))
    means = sums / counts.clamp_min(1).unsqueeze(-1)
    if old is not None:
        means = torch.where((counts > 0).unsqueeze(-1), means, old)
    return means


BACKENDS = ("grid", "slic", "sfcn")


def superpixels(images: torch.Tensor, backend: str = "slic", g: int = 14, net=None, **kw) -> torch.Tensor:
    """Label map [B,H,W]; `net` is the trained SFCN (model/sfcn.py) for the sfcn backend."""
    if backend == "grid":
        b, _, h, w = images.shape
        return grid_labels(b, h, w, g, images.device)
    if backend == "slic":
        return slic_labels(images, g, **kw)
    if backend == "sfcn":
        if net is None:
            raise ValueError("superpixel backend 'sfcn' needs a trained SFCN (longcap train-sfcn; sfcn_weights)")
        if net.grid != g:
            raise ValueError(f"SFCN was trained for a {net.grid}x{net.grid} grid, not {g}x{g}")
        return net.to(images.device).labels(images)
    raise ValueError(f"unknown superpixel backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def boundary(labels: torch.Tensor) -> torch.Tensor:
    """Pixels whose right or lower neighbour has another label, [B,H,W] bool."""
    edge = torch.zeros_like(labels, dtype=torch.bool)
    edge[:, :, :-1] |= labels[:, :, :-1] != labels[:, :, 1:]
    edge[:, :-1, :] |= labels[:, :-1, :] != labels[:, 1:, :]
    return edge


def boundary_recall(pred: torch.Tensor, truth: torch.Tensor, tolerance: int = 2) -> float:
    """Share of ground-truth boundary pixels with a predicted boundary within `tolerance` pixels."""
    k = 2 * tolerance + 1
    near = torch.nn.functional.max_pool2d(boundary(pred).float().unsqueeze(1), k, 1, tolerance).squeeze(1) > 0
    gt = boundary(truth)
    return (near & gt).sum().item() / max(gt.sum().item(), 1)
