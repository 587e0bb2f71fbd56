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


# ---------------------------------------------------------------- FLAIR (Xiao et al., CVPR 2025)
# Read from ExplainableML/flair, src/flair/loss.py (FlairLoss, lines 224-292) and src/flair/model.py
# (FLAIR.__init__, lines 478-495): one shared logit scale (init 1/0.07) and bias (init -10,
# model_configs/ViT-B-16-FLAIR.json) for both losses; loss = (tcs + mps) / 2 (loss.py line 287). K = the
# sub-captions per image (--num-sampled-captions: 8 by default, 10 for Merged-30M in
# train_merged30m_slurm.sh), each 1..3 sentences (data.py sample_dict, "diverse_sampling"). There is no
# separate global text: every sub-caption is encoded alone (EOT token) and is a text of both losses.


def flair_pick(valid: torch.Tensor, n_images: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """FLAIR's text sampling for the text-conditioned loss (loss.py downsample_text_features, lines
    434-454): image i keeps all K of its own sub-captions and one random sub-caption of every other image.

    valid [Ball,N] -> pick [n_images, Ball]: the slot n of image j's sub-caption that image i sees (a valid
    slot; the column j == i is unused). FLAIR draws the slot uniformly over K; ours over j's valid slots.
    """
    ball, n = valid.shape
    probs = valid.float() + (~valid.any(1, keepdim=True)).float()  # an image with no valid slot: masked later
    probs = probs.unsqueeze(0).expand(n_images, ball, n).reshape(-1, n)
    return torch.multinomial(probs, 1, generator=generator).view(n_images, ball)


def flair_tcs_loss(sub: torch.Tensor, grounded: torch.Tensor, valid: torch.Tensor, pick: torch.Tensor,
                   scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """FLAIR's text-conditioned sigmoid loss (loss.py _loss_with_attn_pool, lines 256-272).

    sub [Ball,N,D]: sub-caption embeddings (normalised; the first B images are this process's, the rest
    other ranks' negatives); grounded [B,Ball,N,D]: image i's tokens attention-pooled with sub-caption
    (j, n) as the query (normalised); valid [Ball,N]; pick [B,Ball] from flair_pick. Image i is scored
    against its own valid sub-captions (label +1) and the picked one of every other image j (label -1);
    the sum is divided by K + B - 1, the texts per image (loss.py line 272: / text_features.shape[1]).
    """
    b, ball, n = grounded.shape[:3]
    logits = scale * (grounded * sub.unsqueeze(0)).sum(-1) + bias  # [B, Ball, N]
    own = torch.zeros(b, ball, dtype=torch.bool, device=logits.device)
    own[torch.arange(b), torch.arange(b)] = True
    chosen = F.one_hot(pick, n).bool() & ~own.unsqueeze(-1)  # one sub-caption of every other image
    use = (chosen | own.unsqueeze(-1)) & valid.unsqueeze(0)
    labels = torch.where(own.unsqueeze(-1), 1.0, -1.0).to(logits.dtype)
    return -(F.logsigmoid(labels * logits) * use).sum() / (n + b - 1)


def flair_mps_loss(image: torch.Tensor, sub: torch.Tensor, valid: torch.Tensor, scale: torch.Tensor,
                   bias: torch.Tensor) -> torch.Tensor:
    """FLAIR's multi-positive sigmoid loss (loss.py lines 275-285): the global image embedding [B,D]
    against every sub-caption in the batch [Ball,N,D] (normalised), positives = image i's own valid
    sub-captions; the sum is divided by B * K (line 285: / g_text_features.shape[0])."""
    b, n = image.shape[0], sub.shape[1]
    logits = scale * image @ sub.reshape(-1, sub.shape[-1]).T + bias  # [B, Ball*N]
    owner = torch.arange(sub.shape[0], device=image.device).repeat_interleave(n)
    labels = torch.where(owner.unsqueeze(0) == torch.arange(b, device=image.device).unsqueeze(1), 1.0, -1.0)
    mask = valid.reshape(1, -1).to(logits.dtype)
    return -(F.logsigmoid(labels.to(logits.dtype) * logits) * mask).sum() / (b * n)
