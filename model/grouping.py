"""Grounded text units (seed summary "Discovering Meaningful Units with Visually Grounded Semantics from Image
Captions"): a text encoder that groups caption tokens into K units, aligned with an image encoder's segment
groups, measured by how well the units match ground-truth phrases.

Text side: CLIP BPE tokens (tokenised word by word, model/localdata.py) + K learnable group tokens ->
transformer blocks over both -> a grouping block (GroupViT's, less the group token in the output): the group
tokens attend to the tokens, then every word token (not SOT/EOT/padding) is assigned to exactly one group by
Gumbel-softmax over the groups, hard one-hot in the forward pass with the softmax's gradient
(straight-through), and each group is the mean of its tokens' values (+ MLP) -> blocks over the groups ->
group embeddings.
Reconstruction: a one-layer transformer decoder whose queries are learned positions and whose memory is the
groups (all K, empty ones too) predicts every word token of the input (cross-entropy over the CLIP vocabulary, output weights tied to
the token embedding).
Image side: segment groups from a GroupViT-style encoder trained jointly (patches + group tokens -> the same
grouping block), or CAFT's pooled segments from a trained checkpoint, frozen, through a learned projection.
Contrastive alignment: the similarity of a text and an image is the mean over the text's non-empty groups of
the best cosine with any image group (InfoNCE both ways; an image's sub-captions are all its positives).
Evaluation: each word gets the group most of its BPE tokens went to; per phrase the best IoU with any group
(tIoU, over word tokens), and groups matched one-to-one to phrases at IoU >= 0.5 give precision (over
non-empty groups), recall (over phrases) and F1.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .encoders import EOT, VOCAB, blocks, init_weights, param_count, run_blocks, set_grad_checkpointing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupingConfig:
    name: str
    embed_dim: int = 256  # the paper's 256-d projection (GroupViT's projection_dim)
    text_width: int = 512
    text_heads: int = 8
    text_depth: int = 6  # blocks over tokens + group tokens before grouping (the paper: 6)
    group_depth: int = 3  # blocks over the groups after grouping (the paper: 3)
    groups: int = 4  # K (the paper: "tuned to 4")
    recon_heads: int = 1  # heads of the one-layer reconstruction decoder (the paper: 1; 0: text_heads)
    tau: float = 1.0  # Gumbel-softmax temperature
    assign_scale: float = 10.0  # assignment logits = this x cosine(token, group query)
    max_chunk: int = 1  # sentences per training text (1: single sentences)
    # image side: groupvit-frozen (transformers' GroupViTModel, pre-trained, frozen: the paper's) | groupvit (our
    # GroupViT-style encoder, trained jointly) | caft (a trained CAFT's segments, frozen)
    image: str = "groupvit-frozen"
    groupvit: str = ""  # groupvit-frozen: a local save_pretrained folder or a hub id ("": random init, tests only)
    groupvit_vision: dict = field(default_factory=dict)  # groupvit-frozen, random init: GroupViTVisionConfig fields
    image_size: int = 224
    patch_size: int = 16  # groupvit (joint)
    image_width: int = 384
    image_heads: int = 6
    image_depth: int = 6
    image_group_depth: int = 2
    image_groups: int = 8
    caft_checkpoint: str = ""  # image: caft
    caft_level: int = -1  # which pooled CAFT level (-1: the coarsest, e.g. 16 segments)
    similarity: str = "pooled"  # pooled (InfoNCE on pooled text/image groups: the paper's) | groups (best match)
    temperature: float = 0.07  # InfoNCE temperature, fixed (the paper: 0.07); 0: learned, starting at 0.07
    contrastive_weight: float = 1.0
    recon_weight: float = 1.0  # the paper's lambda = 1 (loss = contrastive + lambda x reconstruction; our reading)
    grad_cache_chunk: int = 0  # > 0: GradCache, texts and images embedded this many at a time (model/grouping.py)
    notes: str = ""


def _rows(base: GroupingConfig) -> dict[str, GroupingConfig]:
    c = replace(base, name=f"{base.name}-contrastive", recon_weight=0.0, notes="contrastive loss only")
    r = replace(base, name=f"{base.name}-recon", contrastive_weight=0.0, notes="reconstruction loss only")
    return {base.name: base, c.name: c, r.name: r}


# GroupViT-style vision side at CPU size for tests and the synthetic ablation (GroupViT's own shape at 224 px:
# depths 6/3/3, 64 then 8 group tokens, width 384)
GROUPVIT_TINY = {"image_size": 64, "patch_size": 8, "hidden_size": 64, "intermediate_size": 256,
                 "num_attention_heads": 2, "depths": [2, 1, 1], "num_hidden_layers": 4,
                 "num_group_tokens": [16, 8, 0], "num_output_groups": [16, 8, 8]}

# the paper's setup: K = 4, 6 + 3 text layers, a one-layer 1-head decoder, InfoNCE at tau 0.07 on pooled groups,
# lambda = 1, 256-d, a frozen pre-trained GroupViT; batch 4096 through GradCache on one GPU
BASE = GroupingConfig("grouping-base", groupvit="nvidia/groupvit-gcc-yfcc", grad_cache_chunk=512,
                      notes="the paper's setup: frozen pre-trained GroupViT, pooled InfoNCE, GradCache")
TINY = GroupingConfig("grouping-tiny", text_width=64, text_heads=2, image_size=64, groupvit_vision=GROUPVIT_TINY,
                      grad_cache_chunk=64, notes="the paper's setup at CPU width (64); set groupvit to a trained one")
# today's variant: our GroupViT-style image encoder trained jointly, best-match group similarity, learned scale
JOINT = dict(image="groupvit", similarity="groups", temperature=0.0, groups=8, group_depth=2, recon_heads=0,
             grad_cache_chunk=0)
BASE_JOINT = replace(BASE, name="grouping-base-joint", groupvit="", **JOINT,
                     notes="image side: our GroupViT-style encoder trained jointly, best-match similarity")
TINY_JOINT = replace(TINY, name="grouping-tiny-joint", embed_dim=64, text_depth=2, group_depth=1, groups=4,
                     groupvit_vision={}, patch_size=8, image_width=64, image_heads=2, image_depth=2,
                     image_group_depth=1, image_groups=8, **{k: v for k, v in JOINT.items() if k not in ("groups", "group_depth")},
                     notes="image side trained jointly; trains on CPU (tests, ablations)")
CONFIGS = {**_rows(BASE), **_rows(TINY), **_rows(BASE_JOINT), **_rows(TINY_JOINT),
           "grouping-tiny-caft": replace(TINY_JOINT, name="grouping-tiny-caft", image="caft",
                                         notes="image side: a trained CAFT's segments, frozen (model_changes.caft_checkpoint)")}


# ---------------------------------------------------------------- grouping


def gumbel_hard(logits: torch.Tensor, tau: float = 1.0, noise: bool = True) -> torch.Tensor:
    """Gumbel-softmax over the last dim, hard: exactly one-hot in the forward pass (hard + soft - soft, where
    soft - soft.detach() is exactly zero), the softmax's gradient in the backward pass (straight-through).
    noise=False: the argmax of the logits (evaluation)."""
    y = logits
    if noise:
        u = torch.rand_like(logits).clamp_(1e-10, 1 - 1e-7)
        y = logits - torch.log(-torch.log(u))
    soft = (y / tau).softmax(-1)
    hard = F.one_hot(soft.argmax(-1), logits.shape[-1]).to(soft.dtype)
    return hard + (soft - soft.detach())


def _some(mask: torch.Tensor) -> torch.Tensor:
    """The mask with position 0 set in rows that have nothing set (attention needs one key per row)."""
    out = mask.clone()
    out[~mask.any(1), 0] = True
    return out


class GroupingBlock(nn.Module):
    """Group tokens attend to the tokens and become the assignment's queries; each assignable token goes to one
    group (hard Gumbel-softmax, straight-through); a group's output is made of its own tokens only: the mean of
    their values, then an MLP. So the K groups are a bottleneck (one group holding every token is one mean), and
    a loss on the outputs of every group (empty ones included) reaches the assignment of any token to any group.
    GroupViT also adds the group token to the output; we leave it out: it has seen every token, so a single
    group could carry the whole text and nothing would push tokens apart (the groups collapsed to one per
    sentence in our first runs)."""

    def __init__(self, dim: int, heads: int, tau: float = 1.0, scale: float = 10.0):
        super().__init__()
        self.tau, self.scale = tau, scale
        self.norm_x, self.norm_g, self.norm_a = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attend = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.to_token, self.to_group, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, g: torch.Tensor, assignable: torch.Tensor) -> dict:
        """x [B,T,D], g [B,K,D], assignable [B,T] -> groups [B,K,D], assign [B,T,K] (one-hot rows; zero rows for
        tokens not assigned), present [B,K] (groups with a token), logits [B,T,K]."""
        xn = self.norm_x(x)
        q = g + self.attend(self.norm_g(g), xn, xn, key_padding_mask=~_some(assignable), need_weights=False)[0]
        # cosine logits at a fixed scale, on token features centred over the text: with GroupViT's scaled dot product
        # the logits start at ~0.01 and the Gumbel noise (sd 1.3) alone picks every assignment, and without the
        # centring the component all tokens share picks one group for all of them (we saw both collapse the groups)
        tok = self.to_token(xn)
        m = assignable.unsqueeze(-1).to(tok.dtype)
        tok = tok - (tok * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1)
        logits = self.scale * F.normalize(tok, dim=-1) @ F.normalize(self.to_group(self.norm_a(q)), dim=-1).transpose(1, 2)
        assign = gumbel_hard(logits, self.tau, noise=self.training) * assignable.unsqueeze(-1).to(x.dtype)
        counts = assign.sum(1)  # [B,K]
        pooled = assign.transpose(1, 2) @ self.value(xn) / counts.clamp_min(1.0).unsqueeze(-1)
        out = self.proj(pooled)
        out = out + self.mlp(out)
        return {"groups": out, "assign": assign, "present": counts.detach() > 0, "logits": logits}


class GroupText(nn.Module):
    """Token + position embeddings and K group tokens -> blocks -> grouping -> blocks over the groups."""

    def __init__(self, cfg: GroupingConfig, context: int = 77):
        super().__init__()
        w = cfg.text_width
        self.grad_checkpointing = False
        self.tok = nn.Embedding(VOCAB, w)
        self.pos = nn.Parameter(torch.randn(context, w) * 0.01)
        self.group_tokens = nn.Parameter(torch.randn(cfg.groups, w) * 0.02)
        self.blocks = blocks(w, cfg.text_depth, cfg.text_heads)
        self.grouping = GroupingBlock(w, cfg.text_heads, cfg.tau, cfg.assign_scale)
        self.after = blocks(w, cfg.group_depth, cfg.text_heads)
        self.norm = nn.LayerNorm(w)
        self.proj = nn.Linear(w, cfg.embed_dim, bias=False)

    def forward(self, tokens: torch.Tensor) -> dict:
        """tokens [M,C] ([SOT, words..., EOT, 0...]) -> groups [M,K,D], hidden [M,K,W], assign [M,C,K],
        present [M,K], assignable [M,C] (the word tokens)."""
        m, c = tokens.shape
        pos = torch.arange(c, device=tokens.device)
        eot = (tokens == EOT).int().argmax(-1)  # a row of padding: 0, so nothing is assignable
        real = pos[None] <= eot[:, None]
        assignable = (pos[None] > 0) & (pos[None] < eot[:, None])
        k = self.group_tokens.shape[0]
        h = torch.cat([self.tok(tokens) + self.pos[:c], self.group_tokens.expand(m, -1, -1)], 1)
        pad = torch.cat([~real, torch.zeros(m, k, dtype=torch.bool, device=tokens.device)], 1)
        h = run_blocks(self, self.blocks, h, src_key_padding_mask=pad)
        out = self.grouping(h[:, :c], h[:, c:], assignable)
        g = run_blocks(self, self.after, out["groups"], src_key_padding_mask=~_some(out["present"]))
        hidden = self.norm(g)
        return {"groups": self.proj(hidden), "hidden": hidden, "assign": out["assign"], "present": out["present"],
                "assignable": assignable, "real": real}


class Reconstructor(nn.Module):
    """One transformer decoder layer: learned position queries attend to the groups; outputs -> token logits
    through the (tied) token embedding."""

    def __init__(self, width: int, heads: int, context: int = 77):
        super().__init__()
        self.query = nn.Parameter(torch.randn(context, width) * 0.02)
        self.layer = nn.TransformerDecoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                                batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(width)

    def forward(self, hidden: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """real [M,C]: the text's positions (SOT..EOT); the queries of the others are padding. Every group,
        empty ones too, is memory: the loss then reaches assignments to empty groups."""
        q = self.query[:real.shape[1]].expand(hidden.shape[0], -1, -1)
        return self.norm(self.layer(q, hidden, tgt_key_padding_mask=~_some(real)))


class GroupImage(nn.Module):
    """GroupViT-style: patch tokens + group tokens -> blocks -> grouping -> blocks over the segment groups."""

    def __init__(self, cfg: GroupingConfig):
        super().__init__()
        w, grid = cfg.image_width, cfg.image_size // cfg.patch_size
        self.grad_checkpointing = False
        self.patch = nn.Conv2d(3, w, cfg.patch_size, cfg.patch_size)
        self.pos = nn.Parameter(torch.randn(grid * grid, w) * 0.02)
        self.group_tokens = nn.Parameter(torch.randn(cfg.image_groups, w) * 0.02)
        self.blocks = blocks(w, cfg.image_depth, cfg.image_heads)
        self.grouping = GroupingBlock(w, cfg.image_heads, cfg.tau, cfg.assign_scale)
        self.after = blocks(w, cfg.image_group_depth, cfg.image_heads)
        self.norm = nn.LayerNorm(w)
        self.proj = nn.Linear(w, cfg.embed_dim, bias=False)

    def forward(self, images: torch.Tensor) -> dict:
        x = self.patch(images).flatten(2).transpose(1, 2) + self.pos
        b, p, _ = x.shape
        h = run_blocks(self, self.blocks, torch.cat([x, self.group_tokens.expand(b, -1, -1)], 1))
        out = self.grouping(h[:, :p], h[:, p:], torch.ones(b, p, dtype=torch.bool, device=x.device))
        g = run_blocks(self, self.after, out["groups"], src_key_padding_mask=~_some(out["present"]))
        groups, present = self.proj(self.norm(g)), _some(out["present"])
        return {"groups": groups, "present": present, "assign": out["assign"], "pooled": masked_mean(groups, present)}


class CaftSegments(nn.Module):
    """A trained CAFT's pooled segments (frozen, kept out of this model's parameters and state_dict) through a
    learned projection."""

    def __init__(self, cfg: GroupingConfig):
        super().__init__()
        if not cfg.caft_checkpoint:
            raise ValueError(f"model {cfg.name}: image 'caft' needs caft_checkpoint (a trained CAFT, `longcap train`)")
        from .checkpoint import load_model

        caft = load_model(cfg.caft_checkpoint)
        if getattr(caft, "kind", "caft") != "caft" or not caft.cfg.levels:
            raise ValueError(f"{cfg.caft_checkpoint}: not a CAFT with pooled segment levels")
        caft.requires_grad_(False)
        self._caft = [caft.eval()]
        self.level = cfg.caft_level
        self.proj = nn.Linear(caft.cfg.embed_dim, cfg.embed_dim, bias=False)

    def forward(self, images: torch.Tensor) -> dict:
        caft = self._caft[0]
        if caft.vision.proj.weight.device != images.device:
            caft.to(images.device)
        with torch.no_grad():
            v = caft.encode_image(images)
            segs = caft.vision.proj(caft.vision.norm(v["levels"][self.level]))
        groups = self.proj(segs)
        return {"groups": groups, "present": torch.ones(segs.shape[:2], dtype=torch.bool, device=images.device),
                "pooled": groups.mean(1)}


_NO_TEXT = {"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 1}  # random init: GroupViT's text tower is dropped, so build a minimal one


class FrozenGroupViT(nn.Module):
    """The paper's image side: a pre-trained GroupViT (transformers' GroupViTModel, weights from a local
    save_pretrained folder or a hub id; random init from GroupViTVisionConfig fields when none is named: tests),
    frozen and always in eval mode (no Gumbel noise, BatchNorm statistics kept). Only its vision model and
    visual projection are kept; they stay in this model's state_dict, so a checkpoint is self-contained.

    Our reading of "pooled image groups" (the paper does not spell it out): the image groups are GroupViT's
    final-stage segment tokens (vision last_hidden_state, 8 for GroupViT's released models, after its final
    LayerNorm), each through GroupViT's own visual projection (256-d); the pooled image embedding is GroupViT's
    own image embedding, `get_image_features` (the projection of the mean of those groups)."""

    def __init__(self, cfg: GroupingConfig):
        super().__init__()
        from transformers import GroupViTConfig, GroupViTModel

        if cfg.groupvit:
            full = GroupViTModel.from_pretrained(cfg.groupvit)
        else:
            full = GroupViTModel(GroupViTConfig(vision_config=dict(cfg.groupvit_vision), text_config=_NO_TEXT,
                                                projection_dim=cfg.embed_dim,
                                                projection_intermediate_dim=4 * cfg.embed_dim))
        vc = full.config.vision_config
        if full.config.projection_dim != cfg.embed_dim:
            raise ValueError(f"model {cfg.name}: GroupViT {cfg.groupvit!r} projects to {full.config.projection_dim}, "
                             f"embed_dim is {cfg.embed_dim}")
        if vc.image_size != cfg.image_size:
            raise ValueError(f"model {cfg.name}: GroupViT {cfg.groupvit!r} takes {vc.image_size} px images, "
                             f"image_size is {cfg.image_size}")
        self.vision, self.projection = full.vision_model, full.visual_projection
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, images: torch.Tensor) -> dict:
        with torch.no_grad():
            out = self.vision(pixel_values=images)
            h = out.last_hidden_state  # [B, groups, width]
            groups = self.projection(h.flatten(0, 1)).view(h.shape[0], h.shape[1], -1)
            pooled = self.projection(out.pooler_output)
        return {"groups": groups, "present": torch.ones(groups.shape[:2], dtype=torch.bool, device=images.device),
                "pooled": pooled}


def masked_mean(x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """[N,K,D], [N,K] -> [N,D]: the mean over the present rows (zeros where none is present)."""
    w = present.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(1) / w.sum(1).clamp_min(1)


def group_similarity(text: torch.Tensor, text_present: torch.Tensor, image: torch.Tensor,
                     image_present: torch.Tensor) -> torch.Tensor:
    """[B,M]: per image b and text m, the mean over m's present groups of the best cosine with b's present groups."""
    t, v = F.normalize(text, dim=-1), F.normalize(image, dim=-1)
    s = torch.einsum("bjd,mkd->bmkj", v, t)
    s = s.masked_fill(~image_present[:, None, None, :], float("-inf")).amax(-1)  # [B,M,K]
    w = text_present.to(s.dtype).unsqueeze(0)
    return (s * w).sum(-1) / w.sum(-1).clamp_min(1)


def group_contrastive(sim: torch.Tensor, owner: torch.Tensor, valid: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """InfoNCE both ways on sim [Bimg,M] (rows beyond the local images: other ranks' negatives): text -> image
    (its image is the positive), image -> text (all its valid texts are positives, uniform soft targets)."""
    logits = scale * sim
    t2i = F.cross_entropy(logits.T[valid], owner[valid])
    b = int(owner.max().item()) + 1 if owner.numel() else 0
    local = logits[:b].masked_fill(~valid[None], float("-inf"))
    own = (owner[None] == torch.arange(b, device=sim.device)[:, None]) & valid[None]
    has = own.any(1)
    target = own[has].to(logits.dtype) / own[has].sum(1, keepdim=True)
    logp = local[has].log_softmax(1).masked_fill(~valid[None], 0.0)
    i2t = -(target * logp).sum(1).mean()
    return (t2i + i2t) / 2


def trim(tokens: torch.Tensor) -> torch.Tensor:
    """Token rows [..., C] cut after the last EOT of any row: padding is masked everywhere (text blocks, grouping,
    decoder queries), so the result is the same, at the cost of the longest text instead of C."""
    last = int((tokens == EOT).int().argmax(-1).max().item()) if tokens.numel() else 0
    return tokens[..., :last + 1]


def cfg_chunk(cfg: GroupingConfig) -> int:
    if cfg.grad_cache_chunk < 1:
        raise ValueError(f"model {cfg.name}: grad_cache_chunk {cfg.grad_cache_chunk} is not a positive chunk size")
    return cfg.grad_cache_chunk


def rng_state(device: torch.device) -> tuple:
    """The RNG state a chunk's embedding starts from (CPU, and the device's when it is CUDA)."""
    dev = torch.device(device)
    return torch.get_rng_state(), (torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None)


class replay_rng:
    """Run a block from a saved RNG state, then put the current state back (GradCache's RandContext)."""

    def __init__(self, state: tuple, device):
        self.state, self.dev = state, torch.device(device)

    def __enter__(self):
        self.saved = rng_state(self.dev)
        torch.set_rng_state(self.state[0])
        if self.state[1] is not None:
            torch.cuda.set_rng_state(self.state[1], self.dev)

    def __exit__(self, *exc):
        torch.set_rng_state(self.saved[0])
        if self.saved[1] is not None:
            torch.cuda.set_rng_state(self.saved[1], self.dev)
        return False


class _Replay(torch.autograd.Function):
    """The GradCache loss as an autograd node over the model's parameters: its backward re-embeds chunk by chunk
    (replay) and returns the parameters' gradients, scaled by the incoming gradient (e.g. 1 / accum)."""

    @staticmethod
    def forward(ctx, value, replay, *params):
        ctx.replay = replay
        return value.clone()

    @staticmethod
    def backward(ctx, g):
        return (None, None, *ctx.replay(g))


class GroupingModel(nn.Module):
    kind = "grouping"
    find_unused_parameters = True

    def __init__(self, cfg: GroupingConfig):
        super().__init__()
        if cfg.image not in ("groupvit-frozen", "groupvit", "caft"):
            raise ValueError(f"model {cfg.name}: image {cfg.image!r} is not groupvit-frozen, groupvit or caft")
        if cfg.similarity not in ("pooled", "groups"):
            raise ValueError(f"model {cfg.name}: similarity {cfg.similarity!r} is not pooled or groups")
        self.cfg = cfg
        self.text = GroupText(cfg)
        self.recon = Reconstructor(cfg.text_width, cfg.recon_heads or cfg.text_heads)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)), requires_grad=not cfg.temperature)
        if cfg.temperature:  # fixed
            self.log_scale.data.fill_(math.log(1 / cfg.temperature))
        if cfg.image == "groupvit":
            self.image = GroupImage(cfg)
        init_weights(self)  # before a pre-trained image side is attached
        if cfg.image == "caft":
            self.image = CaftSegments(cfg)
        elif cfg.image == "groupvit-frozen":
            self.image = FrozenGroupViT(cfg)

    @property
    def input_size(self) -> int | None:
        return None if self.cfg.image == "caft" else self.cfg.image_size

    def data_options(self) -> dict:
        return {"mode": "grouping", "max_chunk": self.cfg.max_chunk}

    def batch_inputs(self, batch: dict, device) -> dict:
        return {"images": batch["image"].to(device), "tokens": batch["tokens"].to(device),
                "valid": batch["valid"].to(device)}

    def scale(self) -> torch.Tensor:
        return self.log_scale.clamp(max=math.log(100)).exp()

    def forward(self, images, tokens, valid, gather=None) -> dict:
        tokens = trim(tokens)
        if self.cfg.grad_cache_chunk and torch.is_grad_enabled():
            if gather:
                raise ValueError(f"model {self.cfg.name}: GradCache (grad_cache_chunk) runs in one process; "
                                 "set grad_cache_chunk: 0 for several processes")
            return self._grad_cached(images, tokens, valid)
        cfg = self.cfg
        b, n, c = tokens.shape
        flat, ok = tokens.reshape(b * n, c), valid.reshape(-1)
        t = self.text(flat)
        losses = {}
        if cfg.contrastive_weight > 0:
            v = self.image(images)
            if gather:  # other ranks' images: more negatives for every text
                v = {k: torch.cat([v[k], gather(v[k])]) for k in ("groups", "present", "pooled")}
            losses["contrastive"] = cfg.contrastive_weight * self.contrastive(t["groups"], t["present"], v, b, n, ok)
        if cfg.recon_weight > 0:
            total, count = self.recon_sum(t, flat, ok)
            losses["recon"] = cfg.recon_weight * total / count.clamp_min(1)
        losses["loss"] = sum(losses.values())
        return losses

    def contrastive(self, text: torch.Tensor, text_present: torch.Tensor, v: dict, b: int, n: int,
                    ok: torch.Tensor) -> torch.Tensor:
        """InfoNCE both ways between b images (v: groups, present, pooled; rows beyond b: other ranks') and their
        b*n texts (groups [b*n,K,D], present [b*n,K]). similarity pooled: cosine of the pooled text (the mean of
        its non-empty groups) and the pooled image; groups: the best-match group similarity."""
        owner = torch.arange(b, device=text.device).repeat_interleave(n)
        if self.cfg.similarity == "pooled":
            sim = F.normalize(v["pooled"], dim=-1) @ F.normalize(masked_mean(text, text_present), dim=-1).T
        else:
            sim = group_similarity(text, text_present, v["groups"], v["present"])
        return group_contrastive(sim, owner, ok, self.scale())

    def recon_sum(self, t: dict, flat: torch.Tensor, ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The reconstruction cross-entropy summed over the word tokens of the valid texts, and their count."""
        h = self.recon(t["hidden"], t["real"])
        where = t["assignable"] & ok[:, None]
        logits = h[where] @ self.text.tok.weight.T
        return F.cross_entropy(logits, flat[where], reduction="sum"), where.sum()

    def _grad_cached(self, images, tokens, valid) -> dict:
        """GradCache (Gao et al. 2021): texts (and a trainable image side's images) are embedded grad_cache_chunk
        at a time without a graph; the contrastive loss is computed on the cached embeddings and its gradient
        with respect to them kept; the backward pass then re-embeds chunk by chunk (the same random draws: each
        chunk's RNG state is saved) and backpropagates the cached gradient (+ that chunk's share of the
        reconstruction loss, which is a sum over tokens). The loss and the gradients equal the full-batch ones;
        memory holds one chunk's graph. The trainer's `loss.backward()` runs the replay (_Replay)."""
        cfg, size = self.cfg, cfg_chunk(self.cfg)
        kind = tokens.device.type  # the replay runs under the same autocast as this forward
        amp = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
        b, n, c = tokens.shape
        flat, ok = tokens.reshape(b * n, c), valid.reshape(-1)
        text_chunks = [(s, min(s + size, b * n)) for s in range(0, b * n, size)]
        img_chunks = [(s, min(s + size, b)) for s in range(0, b, size)]
        train_image = any(p.requires_grad for p in self.image.parameters())
        states, cached, recon, count = {}, [], flat.new_zeros((), dtype=torch.float32), flat.new_zeros(())
        with torch.no_grad():
            for s, e in text_chunks:
                states[("t", s)] = rng_state(flat.device)
                t = self.text(flat[s:e])
                cached.append((t["groups"], t["present"]))
                if cfg.recon_weight > 0:
                    r, k = self.recon_sum(t, flat[s:e], ok[s:e])
                    recon, count = recon + r.float(), count + k
            v = None
            if cfg.contrastive_weight > 0:
                parts = []
                for s, e in img_chunks:
                    states[("i", s)] = rng_state(flat.device)
                    parts.append(self.image(images[s:e]))
                v = {k: torch.cat([p[k] for p in parts]) for k in ("groups", "present", "pooled")}
        losses, grads = {}, {}
        tg = torch.cat([g for g, _ in cached]).requires_grad_(cfg.contrastive_weight > 0)
        tp = torch.cat([p for _, p in cached])
        if cfg.contrastive_weight > 0:
            for k in ("groups", "pooled"):
                v[k] = v[k].detach().requires_grad_(train_image)
            with torch.enable_grad():
                con = cfg.contrastive_weight * self.contrastive(tg, tp, v, b, n, ok)
                wrt = [tg] + ([v["groups"], v["pooled"]] if train_image else []) + \
                    ([self.log_scale] if self.log_scale.requires_grad else [])
                got = torch.autograd.grad(con, wrt, allow_unused=True)
            grads = dict(zip(["text"] + (["groups", "pooled"] if train_image else []) +
                             (["log_scale"] if self.log_scale.requires_grad else []), got))
            losses["contrastive"] = con.detach()
        denom = count.clamp_min(1)
        if cfg.recon_weight > 0:
            losses["recon"] = cfg.recon_weight * recon / denom
        value = sum(losses.values())
        params = [p for p in self.parameters() if p.requires_grad]

        def replay(g: torch.Tensor) -> tuple:
            total = [None] * len(params)

            def add(obj):
                for i, x in enumerate(torch.autograd.grad(obj, params, allow_unused=True)):
                    if x is not None:
                        total[i] = x if total[i] is None else total[i] + x

            for s, e in text_chunks:
                with torch.enable_grad(), replay_rng(states[("t", s)], flat.device), \
                        torch.autocast(kind, dtype=amp, enabled=amp is not None):
                    t = self.text(flat[s:e])
                    if not torch.equal(t["present"], tp[s:e]):  # e.g. a tie broken differently on a GPU
                        log.warning("GradCache: text chunk %d:%d grouped differently when re-embedded", s, e)
                    obj = t["groups"].new_zeros(())
                    if "text" in grads and grads["text"] is not None:
                        obj = obj + (t["groups"] * grads["text"][s:e]).sum()
                    if cfg.recon_weight > 0:
                        obj = obj + cfg.recon_weight * self.recon_sum(t, flat[s:e], ok[s:e])[0] / denom
                    add(obj * g)
            if train_image and v is not None:
                for s, e in img_chunks:
                    with torch.enable_grad(), replay_rng(states[("i", s)], flat.device), \
                            torch.autocast(kind, dtype=amp, enabled=amp is not None):
                        o = self.image(images[s:e])
                        obj = sum((o[k] * grads[k][s:e]).sum() for k in ("groups", "pooled") if grads.get(k) is not None)
                        if torch.is_tensor(obj):
                            add(obj * g)
            if grads.get("log_scale") is not None:
                i = next(i for i, p in enumerate(params) if p is self.log_scale)
                x = grads["log_scale"] * g
                total[i] = x if total[i] is None else total[i] + x
            return tuple(total)

        losses["loss"] = _Replay.apply(value.detach(), replay, *params)
        return losses

    def set_grad_checkpointing(self, on: bool = True) -> None:
        set_grad_checkpointing(self, on)

    def clamp_logit_scales(self) -> None:
        with torch.no_grad():
            self.log_scale.clamp_(0, math.log(100))

    def logit_scales(self) -> dict:
        return {"scale": self.scale().item()}

    # ---------------------------------------------------------------- evaluation

    @torch.no_grad()
    def text_groups(self, texts: list[str], device: str = "cpu", batch: int = 256) -> list[list[set[int]]]:
        """Per text, its discovered units as sets of word-token indices (pipeline.synthetic.word_spans)."""
        from .localdata import pad_rows, word_tokens

        self.eval()
        out = []
        for s in range(0, len(texts), batch):
            enc = [word_tokens(t) for t in texts[s:s + batch]]
            tokens = pad_rows([ids for ids, _ in enc], 77)
            assign = self.text(trim(tokens).to(device))["assign"].argmax(-1).cpu()  # [M,77]
            for i, (ids, word_of) in enumerate(enc):
                out.append(units(word_groups(assign[i, :len(ids)].tolist(), word_of)))
        return out

    @torch.no_grad()
    def evaluate(self, spec, device: str = "cpu") -> dict:
        out = {"retrieval": self.retrieval(spec, device)}
        if spec.truth:
            out["phrases"] = self.phrase_eval(synthetic_phrases(spec.truth, spec.where), device)
        if spec.phrases:
            out["flickr30k_entities"] = self.phrase_eval(read_flickr30k_entities(spec.phrases), device)
        return out

    def phrase_eval(self, items: list[tuple[str, list[set[int]]]], device: str = "cpu") -> dict:
        if not items:
            raise ValueError("no texts with phrases to evaluate the groups on")
        found = self.text_groups([t for t, _ in items], device)
        phrases = [p for _, p in items]
        words = [len(list(WORD_RE.finditer(t))) for t, _ in items]
        res = phrase_metrics(list(zip(found, phrases)))
        res["baselines"] = {"one_group": phrase_metrics([([set(range(w))] if w else [], p) for w, p in zip(words, phrases)]),
                            "word_per_group": phrase_metrics([([{i} for i in range(w)], p) for w, p in zip(words, phrases)])}
        return res

    @torch.no_grad()
    def retrieval(self, spec, device: str = "cpu", block: int = 64) -> dict:
        """Image <-> caption R@1/R@5: a caption's score = the mean over its sentences (max_chunk 1: each sentence a
        sub-caption; otherwise spec's balanced chunks) of the group similarity."""
        from .data import DataConfig, dataset
        from .evaluate import recall_at_k

        self.eval()
        n_sub, k = (16, 16) if self.cfg.max_chunk == 1 else (spec.k_chunks, spec.k_chunks)
        data = DataConfig(image_size=spec.image_size, n_sub=n_sub, k_chunks=k, train=False, batch_size=spec.batch_size,
                          where=spec.where or None, **self.data_options())
        keys, img, img_p, txt, txt_p, valid = [], [], [], [], [], []
        for batch in dataset(spec.urls, data):
            v = self.image(batch["image"].to(device))
            b, n, c = batch["tokens"].shape
            t = self.text(trim(batch["tokens"].view(b * n, c)).to(device))
            img.append(v["groups"])
            img_p.append(v["present"])
            txt.append(t["groups"].view(b, n, *t["groups"].shape[1:]))
            txt_p.append(t["present"].view(b, n, -1))
            valid.append(batch["valid"].to(device))
            keys += batch["keys"]
        if not keys:
            raise ValueError(f"no evaluation samples in {spec.urls} (filter {spec.where})")
        img, img_p = torch.cat(img), torch.cat(img_p)
        txt, txt_p, valid = torch.cat(txt), torch.cat(txt_p), torch.cat(valid)
        n_cap, n_sub = valid.shape
        flat_t, flat_p = txt.flatten(0, 1), txt_p.flatten(0, 1)
        m = valid.flatten().to(img.dtype)
        rows = []
        for s in range(0, img.shape[0], block):
            sim = group_similarity(flat_t, flat_p, img[s:s + block], img_p[s:s + block])  # [b, n_cap*n_sub]
            sim = (sim * m).view(-1, n_cap, n_sub).sum(-1) / valid.sum(1).clamp_min(1)
            rows.append(sim)
        n = len(keys)
        return {"n": n, "chance_r1": 1.0 / n, "groups": recall_at_k(torch.cat(rows).cpu(), torch.arange(n))}


# ---------------------------------------------------------------- phrase metrics

WORD_RE = re.compile(r"\w+|[^\w\s]")  # the same word tokens as pipeline.synthetic.word_spans


def word_groups(token_group: list[int], word_of: list[int]) -> dict[int, int]:
    """The group of each word: the group most of its BPE tokens went to (a tie: its first token's group)."""
    votes: dict[int, Counter] = {}
    for g, w in zip(token_group, word_of):
        if w >= 0:
            votes.setdefault(w, Counter())[g] += 1
    return {w: c.most_common(1)[0][0] for w, c in votes.items()}


def units(word_group: dict[int, int]) -> list[set[int]]:
    """Non-empty groups as sets of word indices, by group id."""
    out: dict[int, set[int]] = {}
    for w, g in word_group.items():
        out.setdefault(g, set()).add(w)
    return [out[g] for g in sorted(out)]


def token_iou(a: set[int], b: set[int]) -> float:
    union = len(a | b)
    return len(a & b) / union if union else 0.0


def max_matching(edges: list[list[int]], n_right: int) -> int:
    """Size of a maximum bipartite matching (Kuhn's augmenting paths); edges[i]: right vertices of left i."""
    match = [-1] * n_right

    def augment(i: int, seen: set[int]) -> bool:
        for j in edges[i]:
            if j not in seen:
                seen.add(j)
                if match[j] < 0 or augment(match[j], seen):
                    match[j] = i
                    return True
        return False

    return sum(augment(i, set()) for i in range(len(edges)))


def phrase_metrics(items: list[tuple[list[set[int]], list[set[int]]]], threshold: float = 0.5) -> dict:
    """items: (groups, phrases) per text, both as sets of word indices. tIoU: mean over phrases of the best IoU
    with any group; groups and phrases matched one-to-one (maximum matching) where IoU >= threshold give
    precision = matched / groups, recall = matched / phrases, F1 (counts summed over texts)."""
    best, matched, n_groups, n_phrases = [], 0, 0, 0
    for groups, phrases in items:
        groups = [g for g in groups if g]
        n_groups += len(groups)
        n_phrases += len(phrases)
        for p in phrases:
            best.append(max((token_iou(g, p) for g in groups), default=0.0))
        edges = [[j for j, g in enumerate(groups) if token_iou(g, p) >= threshold] for p in phrases]
        matched += max_matching(edges, len(groups))
    precision = matched / n_groups if n_groups else 0.0
    recall = matched / n_phrases if n_phrases else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"tiou": sum(best) / len(best) if best else 0.0, "precision": precision, "recall": recall, "f1": f1,
            "n_phrases": n_phrases, "n_groups": n_groups, "n_texts": len(items), "threshold": threshold}


def synthetic_phrases(truth_path: str, where: dict | None = None) -> list[tuple[str, list[set[int]]]]:
    """(sentence, its noun phrases as word-index sets) for every sentence of the synthetic truth whose row
    matches `where` on the truth's own columns (e.g. split: test)."""
    import pyarrow.parquet as pq

    from pipeline.synthetic import word_spans

    out = []
    import fsspec

    fs, p = fsspec.core.url_to_fs(truth_path)  # a local path or any fsspec URL
    for row in pq.read_table(p, filesystem=fs).to_pylist():
        if where and any(row.get(k) != v for k, v in where.items() if k in row):
            continue
        spans = word_spans(row["caption"])
        for si, s in enumerate(row["sentences"]):
            off = sum(1 for a, _ in spans if a < s["start"])
            phrases = [set(range(p["tok_start"] - off, p["tok_end"] - off)) for p in row["phrases"] if p["sentence"] == si]
            if phrases:
                out.append((s["text"], phrases))
    return out


ENTITY_RE = re.compile(r"\[/EN#\d+/(\S+) ([^\]]*)\]")


def parse_entities_line(line: str, skip_types: tuple[str, ...] = ("notvisual",)) -> tuple[str, list[tuple[int, int]]]:
    """One Flickr30K Entities sentence ('[/EN#18/people A man] in ...') -> plain text and phrase char spans
    (phrases whose types are all in skip_types are left out)."""
    text, spans, pos = "", [], 0
    for m in ENTITY_RE.finditer(line):
        text += line[pos:m.start()]
        start = len(text)
        text += m.group(2)
        if not set(m.group(1).split("/")) <= set(skip_types):
            spans.append((start, len(text)))
        pos = m.end()
    return text + line[pos:], spans


def read_flickr30k_entities(root: str, split: str = "test", limit: int | None = None) -> list[tuple[str, list[set[int]]]]:
    """Sentences and phrase word-index sets from a local Flickr30K Entities copy: <root>/Sentences/<id>.txt (or
    *.txt in root), limited to the ids in <root>/<split>.txt when that file exists."""
    base = Path(root)
    folder = base / "Sentences" if (base / "Sentences").is_dir() else base
    files = sorted(folder.glob("*.txt"))
    ids_file = base / f"{split}.txt"
    if ids_file.exists():
        ids = {x.strip() for x in ids_file.read_text().split()}
        files = [f for f in files if f.stem in ids]
    out = []
    for f in files:
        for line in f.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            text, spans = parse_entities_line(line.strip())
            words = [m.span() for m in WORD_RE.finditer(text)]
            phrases = [{i for i, (a, b) in enumerate(words) if a >= cs and b <= ce} for cs, ce in spans]
            phrases = [p for p in phrases if p]
            if phrases:
                out.append((text, phrases))
            if limit and len(out) >= limit:
                return out
    if not out:
        raise ValueError(f"{root}: no Flickr30K Entities sentences with phrases (expected Sentences/*.txt)")
    return out


def build_model(cfg: GroupingConfig) -> GroupingModel:
    return GroupingModel(cfg)


def describe(model: GroupingModel) -> dict:
    return {"name": model.cfg.name, "params": param_count(model), "config": asdict(model.cfg)}
