"""CAFT's sigmoid losses: whole level ([CLS] vs whole caption) and part level (sub-caption vs its
text-grounded visual feature), each with its own learnable scale (init 1/0.07) and bias (init -10).

Both take local features; a distributed trainer adds other ranks' features as
extra negatives by passing them as `neg_*` (they carry no positives).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LogitParams(nn.Module):
    """A learnable log-scale and bias for one sigmoid loss."""

    def __init__(self, init_temperature: float = 0.07, init_bias: float = -10.0, max_scale: float = 100.0):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.bias = nn.Parameter(torch.tensor(float(init_bias)))
        self.max_log_scale = math.log(max_scale)

    def scale(self) -> torch.Tensor:
        return self.log_scale.clamp(max=self.max_log_scale).exp()


def whole_sigmoid_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                       neg_text: torch.Tensor | None = None) -> torch.Tensor:
    """SigLIP loss on L2-normalised features: -sum log sigmoid(label * logit) / batch.

    image [B,D], text [B,D] (pairs on the diagonal); neg_text [M,D] more texts with no positive here.
    """
    texts = text if neg_text is None else torch.cat([text, neg_text])
    logits = scale * image @ texts.T + bias
    labels = -torch.ones_like(logits)
    idx = torch.arange(image.shape[0], device=image.device)
    labels[idx, idx] = 1.0
    return -F.logsigmoid(labels * logits).sum() / image.shape[0]


def part_sigmoid_loss(sub: torch.Tensor, grounded: torch.Tensor, valid: torch.Tensor, scale: torch.Tensor,
                      bias: torch.Tensor) -> torch.Tensor:
    """Part-level loss over every (image j, sub-caption (i, n)) pair.

    sub [B,N,D]: sub-caption embeddings of each caption i (normalised);
    grounded [Bimg,B,N,D]: image j's visual feature grounded by sub-caption (i, n) (normalised);
    valid [B,N]: real sub-captions. Positives: j == i (every sub-caption of an image is a positive).
    Divided by the number of images, as the whole-level loss.
    """
    logits = scale * (grounded * sub.unsqueeze(0)).sum(-1) + bias  # [Bimg, B, N]
    b_img, b = logits.shape[:2]
    labels = -torch.ones_like(logits)
    idx = torch.arange(min(b_img, b), device=logits.device)
    labels[idx, idx] = 1.0
    mask = valid.unsqueeze(0).expand_as(logits).to(logits.dtype)
    return -(F.logsigmoid(labels * logits) * mask).sum() / b_img
