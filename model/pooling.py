"""Graph pooling for the fine-to-coarse encoder (CAST style), in pure torch.

Farthest-point sampling picks segment centres among the tokens; every token is
softly assigned to the centres by scaled cosine similarity; segment features
are assignment-weighted means. Assignments compose: a chain of them maps any
level's segments back to superpixels, and a superpixel label map takes them to
pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def farthest_point_sampling(x: torch.Tensor, m: int) -> torch.Tensor:
    """Indices [B, m] of m tokens of x [B, T, D], each the farthest (L2) from those already chosen.

    The first is the token farthest from the mean token, so the result does not depend on token order.
    """
    b, t, _ = x.shape
    if m > t:
        raise ValueError(f"cannot sample {m} centres from {t} tokens")
    idx = torch.empty(b, m, dtype=torch.long, device=x.device)
    rows = torch.arange(b, device=x.device)
    dist = ((x - x.mean(1, keepdim=True)) ** 2).sum(-1)
    nearest = torch.full((b, t), float("inf"), device=x.device, dtype=x.dtype)
    for k in range(m):
        pick = dist.argmax(1) if k == 0 else nearest.argmax(1)
        idx[:, k] = pick
        d = ((x - x[rows, pick].unsqueeze(1)) ** 2).sum(-1)
        nearest = torch.minimum(nearest, d)
    return idx


class GraphPool(nn.Module):
    """Pool T tokens to m segments: FPS centres, scaled-cosine soft assignment, weighted means."""

    def __init__(self, dim: int, m: int, init_scale: float = 10.0):
        super().__init__()
        self.m = m
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)
        self.log_scale = nn.Parameter(torch.tensor(float(init_scale)).log())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B,T,D] -> (segments [B,m,D], assignment [B,T,m] with rows summing to 1)."""
        h = self.proj(self.norm(x))
        with torch.no_grad():
            centres_idx = farthest_point_sampling(h.detach(), self.m)
        centres = torch.gather(h, 1, centres_idx.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        sim = F.normalize(h, dim=-1) @ F.normalize(centres, dim=-1).transpose(1, 2)  # [B,T,m]
        assign = (self.log_scale.exp() * sim).softmax(-1)
        weights = assign / assign.sum(1, keepdim=True).clamp_min(1e-6)  # column-normalised: weighted means
        return weights.transpose(1, 2) @ x, assign


def compose(assignments: list[torch.Tensor]) -> torch.Tensor:
    """Chain [B,T0,T1], [B,T1,T2], ... into [B,T0,Tk] (rows still sum to 1)."""
    out = assignments[0]
    for a in assignments[1:]:
        out = out @ a
    return out


def segments_to_pixels(labels: torch.Tensor, assignments: list[torch.Tensor]) -> torch.Tensor:
    """Hard segment id per pixel: labels [B,H,W] (superpixel ids) through the argmax of each assignment."""
    seg = labels.long()
    for a in assignments:
        hard = a.argmax(-1)  # [B, T_in] -> id in the next level
        seg = torch.gather(hard, 1, seg.flatten(1)).view_as(seg)
    return seg


def soft_map(labels: torch.Tensor, assignments: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Per-pixel value of segment weights [B, Tk] (e.g. attention over segments) through the composed soft map."""
    # no pooling levels (flat ViT, or parts = the superpixel tokens): the weights are per superpixel already
    per_token = (compose(assignments) @ weights.unsqueeze(-1)).squeeze(-1) if assignments else weights  # [B, T0]
    return torch.gather(per_token, 1, labels.long().flatten(1)).view_as(labels).to(weights.dtype)
