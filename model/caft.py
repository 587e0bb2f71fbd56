"""CAFT and its baselines as configurations of one model: encoders, losses, scores, grounding."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .encoders import (AttentionPool, HierarchicalText, TextEncoder, VisionEncoder, init_weights, param_count,
                       set_grad_checkpointing)
from .losses import (LogitParams, flair_mps_loss, flair_pick, flair_tcs_loss, part_sigmoid_loss,
                     whole_sigmoid_loss)
from .pooling import soft_map


@dataclass(frozen=True)
class CaftConfig:
    name: str
    embed_dim: int = 512
    vision_width: int = 768
    vision_heads: int = 12
    vision_depths: tuple = (4, 4, 2, 2)  # blocks before each pooling, and after the last
    levels: tuple = (64, 32, 16)  # segments after each pooling (empty: flat ViT)
    backend: str = "slic"  # superpixels: slic | grid | sfcn
    sfcn_weights: str = ""  # the sfcn backend's checkpoint (longcap train-sfcn)
    part_tokens: str = "mid"  # part features: mid = the second stage's 64 segments (CAFT), top = the last stage's
    text_width: int = 512
    text_heads: int = 8
    sub_depth: int = 8
    whole_depth: int = 4  # 0: flat text
    loss: str = "caft"  # caft: whole + part sigmoid losses | flair: FLAIR's text-conditioned + multi-positive losses
    part_loss: bool = True  # caft: the part-level loss (flair: its text-conditioned loss trains the pooling too)
    whole_loss: bool = True
    alpha: float = 0.3  # CAFT++: (1 - alpha) whole + alpha part
    logit_bias: float = -10.0  # initial bias of both sigmoid losses (SigLIP's -10 suits large batches)
    notes: str = ""


def rows(base: CaftConfig, size: str) -> dict[str, CaftConfig]:
    """SigLIP and the paper's ablation rows (CAFT §4.4, Table 3) as configurations of one base size.

    The Table 3 rows are cumulative, starting from FLAIR:
    - flair: a flat ViT over patches + a flat text encoder on sub-captions + FLAIR's two losses
      (text-conditioned sigmoid + multi-positive sigmoid, model/losses.py).
    - +visual hierarchy: FLAIR with the superpixel + fine-to-coarse grouping image encoder; everything
      else as FLAIR (its tokens for the text-conditioned pooling: the encoder's last, top-level output).
    - +textual hierarchy: + the hierarchical text transformer, still "a flat loss method that naively
      aligns both levels only at the top layer": part-level (sub-caption) and whole-level alignment both
      on the top-level image representation.
    - +hierarchical loss = CAFT: "part- and whole-level alignment losses to mid- and top-level
      representations, respectively" (part loss on the second stage's 64 segments, whole loss on [CLS]).
    - -part-level alignment: "relying exclusively on a whole-level loss": CAFT's encoders, whole loss only.
    siglip (flat ViT + flat text on the whole caption truncated at 77 tokens + SigLIP's loss) is an extra
    row, not in the paper.
    """
    flat_vision = dict(backend="grid", levels=(), vision_depths=(sum(base.vision_depths),))
    flat_text = dict(sub_depth=base.sub_depth + base.whole_depth, whole_depth=0)
    hier_vision = dict(backend=base.backend, levels=base.levels, vision_depths=base.vision_depths)
    siglip = replace(base, name=f"siglip-{size}", **flat_vision, **flat_text, part_loss=False, part_tokens="top",
                     notes="not in the paper: flat ViT + flat text on the whole caption truncated at 77 tokens "
                           "(N=K=1 in the loader) + SigLIP's loss")
    flair = replace(base, name=f"flair-{size}", **flat_vision, **flat_text, loss="flair", part_tokens="top",
                    notes="Table 3 FLAIR: flat ViT + flat text on sub-captions + FLAIR's TCS and MPS losses")
    visual = replace(flair, name=f"ablate-{size}-visual", **hier_vision,
                     notes="Table 3 + visual hierarchy: FLAIR with the superpixel + grouping image encoder "
                           "(text-conditioned pooling over its top-level segments)")
    textual = replace(base, name=f"ablate-{size}-textual", part_tokens="top",
                      notes="Table 3 + textual hierarchy: + hierarchical text; part and whole losses both on the "
                            "top-level image representation")
    hloss = replace(base, name=f"ablate-{size}-hloss",
                    notes="Table 3 + hierarchical loss (= CAFT): part loss on the mid-level (second stage) "
                          "segments, whole loss on the top level")
    no_part = replace(base, name=f"ablate-{size}-no-part", part_loss=False,
                      notes="Table 3 - part-level alignment: CAFT's encoders, whole-level loss only")
    return {c.name: c for c in (siglip, flair, visual, textual, hloss, no_part)}


B16 = CaftConfig("caft-b16")
TINY = CaftConfig("caft-tiny", embed_dim=64, vision_width=64, vision_heads=2, vision_depths=(1, 1, 1, 1),
                  text_width=64, text_heads=2, sub_depth=2, whole_depth=1,
                  logit_bias=-4.0)  # batches of ~32 on CPU: -10 lets the positives' pull collapse the features
CONFIGS = {"caft-b16": B16, "caft-tiny": TINY, **rows(B16, "b16"), **rows(TINY, "tiny")}
ABLATION_ROWS = ("flair", "ablate-{}-visual", "ablate-{}-textual", "ablate-{}-hloss", "ablate-{}-no-part")
EXTRA_ROWS = ("siglip",)  # run with the ablation, labelled "not in the paper"
ROW_LABELS = {"flair": "FLAIR", "ablate-{}-visual": "+ visual hierarchy", "ablate-{}-textual": "+ textual hierarchy",
              "ablate-{}-hloss": "+ hierarchical loss (CAFT)", "ablate-{}-no-part": "- part-level alignment",
              "siglip": "SigLIP (not in the paper)"}


def _row_name(r: str, size: str) -> str:
    return r.format(size) if "{" in r else f"{r}-{size}"


def ablation_names(size: str, extra: bool = True) -> list[str]:
    """The Table 3 rows in the paper's order, then (extra) the rows that are not in the paper."""
    return [_row_name(r, size) for r in ABLATION_ROWS + (EXTRA_ROWS if extra else ())]


def row_label(name: str) -> str:
    """The paper's name of an ablation row's config (the config name for any other model)."""
    for r, label in ROW_LABELS.items():
        for size in ("tiny", "b16"):
            if _row_name(r, size) == name:
                return label
    return name


class CAFT(nn.Module):
    def __init__(self, cfg: CaftConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.loss not in ("caft", "flair"):
            raise ValueError(f"loss {cfg.loss!r}: use 'caft' (whole + part sigmoid losses) or 'flair'")
        if cfg.loss == "flair" and cfg.whole_depth > 0:
            raise ValueError("loss 'flair' takes a flat text encoder (whole_depth 0): FLAIR has no whole-caption text")
        self.vision = VisionEncoder(cfg.vision_width, cfg.vision_heads, list(cfg.vision_depths), list(cfg.levels),
                                    cfg.embed_dim, cfg.backend, cfg.part_tokens, cfg.sfcn_weights)
        if cfg.whole_depth > 0:
            self.text = HierarchicalText(cfg.text_width, cfg.text_heads, cfg.sub_depth, cfg.whole_depth, cfg.embed_dim)
        else:
            self.text = TextEncoder(cfg.text_width, cfg.text_heads, cfg.sub_depth, cfg.embed_dim)
        self.pool = AttentionPool(cfg.embed_dim, max(1, cfg.embed_dim // 64))
        self.whole_logit = LogitParams(init_bias=cfg.logit_bias)  # flair: the one pair both losses share
        self.part_logit = LogitParams(init_bias=cfg.logit_bias)
        init_weights(self)

    @property
    def find_unused_parameters(self) -> bool:
        """DDP: some parameters get no gradient (flair: part_logit; whole loss only: the pooling)."""
        return self.cfg.loss == "flair" or not self.cfg.part_loss

    def losses_used(self) -> tuple[str, ...]:
        """The loss terms forward() returns besides 'loss'."""
        if self.cfg.loss == "flair":
            return ("tcs", "mps")
        return tuple(k for k, on in (("whole", self.cfg.whole_loss), ("part", self.cfg.part_loss)) if on)

    # ---------------------------------------------------------------- encoders

    def encode_image(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        return self.vision(images, labels)

    def encode_text(self, tokens: torch.Tensor, valid: torch.Tensor, whole: torch.Tensor) -> dict:
        """tokens [B,N,77] -> {'sub': [B,N,D], 'whole': [B,D]}."""
        if isinstance(self.text, HierarchicalText):
            return self.text(tokens, valid, whole)
        b, n, c = tokens.shape
        sub = self.text(tokens.view(b * n, c)).view(b, n, -1)
        w = (whole & valid).unsqueeze(-1).to(sub.dtype)
        return {"sub": sub, "whole": (sub * w).sum(1) / w.sum(1).clamp_min(1)}

    def ground(self, sub: torch.Tensor, parts: torch.Tensor, return_weights: bool = False):
        """Every sub-caption [B,N,D] against every image's parts [Bimg,M,D] -> [Bimg,B,N,D] (+ weights)."""
        b, n, d = sub.shape
        out = self.pool(sub.reshape(b * n, d), parts, return_weights)
        if return_weights:
            g, w = out
            return g.view(parts.shape[0], b, n, d), w.view(parts.shape[0], b, n, -1)
        return out.view(parts.shape[0], b, n, d)

    # ---------------------------------------------------------------- training

    def forward(self, images, tokens, valid, whole, gather=None) -> dict:
        """Losses of one batch. `gather(x)`: the other ranks' x (with gradients), added as negatives."""
        v = self.encode_image(images)
        t = self.encode_text(tokens, valid, whole)
        if self.cfg.loss == "flair":
            return self._flair_losses(v, t, valid, gather)
        losses = {}
        if self.cfg.whole_loss:
            text = F.normalize(t["whole"], dim=-1)
            losses["whole"] = whole_sigmoid_loss(F.normalize(v["cls"], dim=-1), text, self.whole_logit.scale(),
                                                 self.whole_logit.bias, neg_text=gather(text) if gather else None)
        if self.cfg.part_loss:
            sub, mask = t["sub"], valid
            if gather:  # local sub-captions first: the positives stay on the diagonal
                sub, mask = torch.cat([sub, gather(sub)]), torch.cat([mask, gather(mask)])
            g = self.ground(sub, v["parts"])
            losses["part"] = part_sigmoid_loss(F.normalize(sub, dim=-1), F.normalize(g, dim=-1), mask,
                                               self.part_logit.scale(), self.part_logit.bias)
        losses["loss"] = sum(losses.values())
        return losses

    def _flair_losses(self, v: dict, t: dict, valid: torch.Tensor, gather) -> dict:
        """FLAIR: (text-conditioned sigmoid + multi-positive sigmoid) / 2 with one shared scale and bias.
        Every valid sub-caption is a text; other ranks' sub-captions are negatives (FLAIR passes them
        round the ring; each rank's share is divided by K + B - 1 and B * K as the local one)."""
        sub, mask = t["sub"], valid
        if gather:  # local sub-captions first: image i's own texts are sub[i]
            sub, mask = torch.cat([sub, gather(sub)]), torch.cat([mask, gather(mask)])
        g = F.normalize(self.ground(sub, v["parts"]), dim=-1)  # [B, Ball, N, D]
        subn = F.normalize(sub, dim=-1)
        scale, bias = self.whole_logit.scale(), self.whole_logit.bias
        tcs = flair_tcs_loss(subn, g, mask, flair_pick(mask, g.shape[0]), scale, bias)
        mps = flair_mps_loss(F.normalize(v["cls"], dim=-1), subn, mask, scale, bias)
        return {"tcs": tcs, "mps": mps, "loss": (tcs + mps) / 2}

    def set_grad_checkpointing(self, on: bool = True) -> None:
        set_grad_checkpointing(self, on)

    def clamp_logit_scales(self) -> None:
        with torch.no_grad():
            for p in (self.whole_logit, self.part_logit):
                p.log_scale.clamp_(0, p.max_log_scale)

    # ---------------------------------------------------------------- scoring

    @torch.no_grad()
    def scores(self, v: dict, t: dict, valid: torch.Tensor, alpha: float | None = None) -> dict:
        """Image x caption similarity matrices: whole, part, and CAFT++ = (1-a) whole + a part."""
        a = self.cfg.alpha if alpha is None else alpha
        whole = F.normalize(v["cls"], dim=-1) @ F.normalize(t["whole"], dim=-1).T
        g = F.normalize(self.ground(t["sub"], v["parts"]), dim=-1)
        per_sub = (g * F.normalize(t["sub"], dim=-1).unsqueeze(0)).sum(-1)  # [Bimg,B,N]
        m = valid.unsqueeze(0).to(per_sub.dtype)
        part = (per_sub * m).sum(-1) / m.sum(-1).clamp_min(1)
        return {"whole": whole, "part": part, "caftpp": (1 - a) * whole + a * part}

    @torch.no_grad()
    def heatmap(self, v: dict, sub: torch.Tensor) -> torch.Tensor:
        """Attention of each sub-caption [Q,D] over one image's parts, painted to pixels: [Q,H,W]."""
        _, w = self.pool(sub, v["parts"][:1], return_weights=True)  # [1,Q,M]
        labels = v["labels"][:1]
        assigns = [a[:1] for a in v["assignments"][: self.vision.part_assignments]]
        return torch.stack([soft_map(labels, assigns, w[0, q:q + 1])[0] for q in range(w.shape[1])])


def build(name: str, **changes) -> CAFT:
    """A model by config name, with field changes (e.g. backend='sfcn', sfcn_weights=path)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(CONFIGS)}")
    bad = [k for k in changes if k not in CaftConfig.__dataclass_fields__]
    if bad:
        raise ValueError(f"unknown model config fields {bad}; known: {', '.join(CaftConfig.__dataclass_fields__)}")
    return CAFT(replace(CONFIGS[name], **changes))


def describe(model: CAFT) -> dict:
    return {"name": model.cfg.name, "params": param_count(model), "vision_params": param_count(model.vision),
            "text_params": param_count(model.text), "config": asdict(model.cfg)}


