"""CAFT's encoders: superpixel tokens, the fine-to-coarse vision encoder, the hierarchical and flat
text encoders, and FLAIR-style attention pooling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .pooling import GraphPool
from .superpixels import superpixels

VOCAB = 49408  # CLIP BPE
EOT = 49407
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def blocks(dim: int, depth: int, heads: int) -> nn.ModuleList:
    return nn.ModuleList(nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu",
                                                    batch_first=True, norm_first=True) for _ in range(depth))


def set_grad_checkpointing(model: nn.Module, on: bool = True) -> None:
    """Turn recomputation in backward on/off for every submodule that supports it (run_blocks)."""
    for m in model.modules():
        if hasattr(m, "grad_checkpointing"):
            m.grad_checkpointing = on


def run_blocks(module: nn.Module, layers, x: torch.Tensor, **kw) -> torch.Tensor:
    """Apply transformer layers; with `module.grad_checkpointing` in training, recompute them in backward."""
    ckpt = getattr(module, "grad_checkpointing", False) and module.training and torch.is_grad_enabled()
    for blk in layers:
        x = checkpoint(blk, x, use_reentrant=False, **kw) if ckpt else blk(x, **kw)
    return x


def sincos_2d(h: int, w: int, dim: int, device=None) -> torch.Tensor:
    """Per-pixel 2-D sin-cos position features [h*w, dim] (dim divisible by 4)."""
    q = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(q, device=device, dtype=torch.float32) / q))
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                            torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
    y = ys.flatten()[:, None] / h * 224 * omega
    x = xs.flatten()[:, None] / w * 224 * omega
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], 1)


def scatter_mean(feats: torch.Tensor, labels: torch.Tensor, n: int) -> torch.Tensor:
    """feats [B,P,D], labels [B,P] in [0,n) -> per-label means [B,n,D]."""
    b, _, d = feats.shape
    sums = feats.new_zeros(b, n, d).scatter_add_(1, labels.unsqueeze(-1).expand(-1, -1, d), feats)
    counts = feats.new_zeros(b, n).scatter_add_(1, labels, torch.ones_like(labels, dtype=feats.dtype))
    return sums / counts.clamp_min(1).unsqueeze(-1)


class SuperpixelEmbed(nn.Module):
    """Conv-stem features averaged inside each superpixel, plus the superpixel's averaged sin-cos position."""

    def __init__(self, dim: int, backend: str = "slic", grid: int = 14, stem_width: int = 64, sfcn_weights: str = ""):
        super().__init__()
        self.backend, self.grid, self.dim = backend, grid, dim
        self._sfcn = []  # frozen tokenizer net: kept out of parameters and state_dict
        if backend == "sfcn":
            if not sfcn_weights:
                raise ValueError("backend 'sfcn' needs sfcn_weights: a checkpoint from `longcap train-sfcn`")
            from .sfcn import load_sfcn

            self._sfcn.append(load_sfcn(sfcn_weights))
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem_width, 3, 2, 1), nn.GELU(), nn.Conv2d(stem_width, stem_width, 3, 2, 1), nn.GELU(),
            nn.Conv2d(stem_width, dim, 1))
        self.norm = nn.LayerNorm(dim)  # stem features at the scale of the sin-cos positions

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        """images normalised [B,3,H,W] -> (tokens [B,g*g,D], labels [B,H,W])."""
        if labels is None:
            with torch.no_grad():
                raw = (images * CLIP_STD.to(images) + CLIP_MEAN.to(images)).clamp(0, 1)
                labels = superpixels(raw, self.backend, self.grid, net=self._sfcn[0] if self._sfcn else None)
        fmap = self.stem(images)  # [B,D,H/4,W/4]
        h, w = fmap.shape[-2:]
        small = F.interpolate(labels.unsqueeze(1).float(), size=(h, w), mode="nearest").squeeze(1).long()
        n = self.grid * self.grid
        feats = scatter_mean(fmap.flatten(2).transpose(1, 2), small.flatten(1), n)
        pos = scatter_mean(sincos_2d(h, w, self.dim, images.device).expand(images.shape[0], -1, -1).to(feats),
                           small.flatten(1), n)
        return self.norm(feats) + pos, labels


class VisionEncoder(nn.Module):
    """Transformer blocks on the superpixel tokens, then graph pooling to coarser segment levels.

    Stage i runs its blocks, then (except the last) pools its tokens to levels[i] segments. The part
    features are one stage's tokens as that stage outputs them (after its blocks):
    - part_tokens "mid": the second stage's output, the levels[0] (64) segment tokens. CAFT §3.1: "the
      segment tokens in the second stage ... are used for the part-level alignment"; CAST's own encoder
      names the same tensor `block2` (twke18/CAST, cast_models/cast.py, forward_features: blocks2 run on
      the 64 centroids of pool1, before pool2).
    - part_tokens "top": the last stage's output (the top-level segments; a flat ViT's patch tokens).
    """

    def __init__(self, dim: int, heads: int, depths: list[int], levels: list[int], out_dim: int,
                 backend: str = "slic", part_tokens: str = "mid", sfcn_weights: str = ""):
        super().__init__()
        if part_tokens not in ("mid", "top"):
            raise ValueError(f"part_tokens {part_tokens!r}: use 'mid' (the second stage's segments) or 'top'")
        if part_tokens == "mid" and levels and len(depths) < 2:
            raise ValueError("part_tokens 'mid' needs a second stage (vision_depths with two entries or more)")
        self.grad_checkpointing = False
        self.embed = SuperpixelEmbed(dim, backend, sfcn_weights=sfcn_weights)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.stages = nn.ModuleList(blocks(dim, d, heads) for d in depths)
        self.pools = nn.ModuleList(GraphPool(dim, m) for m in levels)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, out_dim, bias=False)
        self.part_tokens = part_tokens
        # pooling steps between the superpixels and the part tokens (heat maps compose this many assignments)
        self.part_assignments = 0 if not levels else (1 if part_tokens == "mid" else len(levels))
        self.part_stage = len(depths) - 1 if not levels or part_tokens == "top" else 1

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        tokens, labels = self.embed(images, labels)
        x = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], 1)
        levels, assigns, stage_out = [], [], []
        for i, stage in enumerate(self.stages):
            x = run_blocks(self, stage, x)
            stage_out.append(x[:, 1:])  # this stage's tokens after its blocks
            if i < len(self.pools):
                cls, segs = x[:, :1], x[:, 1:]
                segs, a = self.pools[i](segs)
                assigns.append(a)
                levels.append(segs)
                x = torch.cat([cls, segs], 1)  # [CLS] goes on through the residual path
        x = self.norm(x)
        parts = x[:, 1:] if self.part_stage == len(self.stages) - 1 else self.norm(stage_out[self.part_stage])
        return {"cls": self.proj(x[:, 0]), "parts": self.proj(parts), "levels": levels, "stage_out": stage_out,
                "assignments": assigns, "labels": labels}


class TextEncoder(nn.Module):
    """CLIP-style causal transformer over BPE tokens (context 77), pooled at the EOT token."""

    def __init__(self, dim: int, heads: int, depth: int, out_dim: int, context: int = 77):
        super().__init__()
        self.grad_checkpointing = False
        self.tok = nn.Embedding(VOCAB, dim)
        self.pos = nn.Parameter(torch.randn(context, dim) * 0.01)
        self.blocks = blocks(dim, depth, heads)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, out_dim, bias=False)
        self.register_buffer("causal", torch.triu(torch.full((context, context), float("-inf")), 1), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens) + self.pos[: tokens.shape[1]]
        mask = self.causal[: tokens.shape[1], : tokens.shape[1]]
        x = run_blocks(self, self.blocks, x, src_mask=mask)
        x = self.norm(x)
        eot = (tokens == EOT).int().argmax(-1)  # first EOT (a padded row of zeros pools position 0)
        return self.proj(x[torch.arange(x.shape[0], device=x.device), eot])


class HierarchicalText(nn.Module):
    """Sub-caption encoder per chunk -> residual MLP adapter -> whole-caption transformer over [CLS] + chunks."""

    def __init__(self, dim: int, heads: int, sub_depth: int, whole_depth: int, out_dim: int, max_chunks: int = 16):
        super().__init__()
        self.grad_checkpointing = False
        self.sub = TextEncoder(dim, heads, sub_depth, out_dim)
        self.adapter = nn.Sequential(nn.LayerNorm(out_dim), nn.Linear(out_dim, 4 * out_dim), nn.GELU(),
                                     nn.Linear(4 * out_dim, out_dim))
        self.cls = nn.Parameter(torch.zeros(1, 1, out_dim))
        self.chunk_pos = nn.Parameter(torch.randn(max_chunks, out_dim) * 0.01)
        self.whole = blocks(out_dim, whole_depth, max(1, out_dim // 64))
        self.norm = nn.LayerNorm(out_dim)
        self.proj = nn.Linear(out_dim, out_dim, bias=False)

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor, whole: torch.Tensor) -> dict:
        """tokens [B,N,77], valid/whole [B,N] -> sub-caption embeddings [B,N,D] and whole caption [B,D]."""
        b, n, c = tokens.shape
        sub = self.sub(tokens.view(b * n, c)).view(b, n, -1)
        chunks = sub + self.adapter(sub)
        x = torch.cat([self.cls.expand(b, -1, -1), chunks + self.chunk_pos[:n]], 1)
        pad = torch.cat([torch.zeros(b, 1, dtype=torch.bool, device=x.device), ~(whole & valid)], 1)
        x = run_blocks(self, self.whole, x, src_key_padding_mask=pad)
        return {"sub": sub, "whole": self.proj(self.norm(x[:, 0]))}


class AttentionPool(nn.Module):
    """FLAIR-style: query = sub-caption embedding, keys/values = an image's part-level segments."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, queries: torch.Tensor, parts: torch.Tensor, return_weights: bool = False):
        """queries [Q,D] (every sub-caption), parts [Bimg,M,D] -> grounded [Bimg,Q,D] (+ weights [Bimg,Q,M])."""
        q = self.norm_q(queries).unsqueeze(0).expand(parts.shape[0], -1, -1)
        kv = self.norm_kv(parts)
        out, w = self.attn(q, kv, kv, need_weights=return_weights, average_attn_weights=True)
        out = self.proj(out)
        return (out, w) if return_weights else out


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
