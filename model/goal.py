"""FAST-GOAL: fine-tuning a pretrained open_clip CLIP on global image-long-caption pairs and local
region-sentence pairs, with token-similarity learning (TSL).

Losses (weights from the config; defaults as in the GOAL reference implementation: 1, 0.5, 1, 1):
- global: CLIP's symmetric InfoNCE, image [CLS] embedding vs long-caption embedding (CLIP's logit scale);
  other ranks' embeddings are extra negatives under DDP;
- local: the same loss between region crops (encoded as images of their own) and their matched sentences
  (encoded alone); two pairs whose sentences are the same text are positives of each other (soft targets), so
  "The background is white." in two images is not a false negative;
- TSL, image side: the patch tokens whose patch centre lies inside the region's box (mapped into the input
  image; the patch holding the box centre when no centre lies inside) are mean-pooled, projected like the
  [CLS] token, and pulled toward the region crop's embedding;
- TSL, text side: the long caption's tokens of the matched sentence are mean-pooled, projected, and pulled
  toward the sentence's own embedding.
TSL's distance is (1 - cos)^2, the squared error between the cosine and 1, as GOAL's reference code does:
cosine because CLIP compares embeddings by angle (pooled patch tokens and the [CLS] embedding have different
norms, which MSE on the vectors would try to equalise); gradients reach both sides (no stop-gradient).

Long captions: `long_text: stretch` (default, GOAL's choice via Long-CLIP) extends the text positional
embedding from 77 to `context_length` (248) by keeping the first `keep_positions` (20) rows and linearly
interpolating the rest (x4); `long_text: chunk` keeps 77 and packs whole sentences into rows of 77 tokens,
the caption embedding being the mean of its rows' normalised embeddings.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .encoders import param_count

log = logging.getLogger("longcap.goal")
CLIP_CONFIGS = Path(__file__).with_name("clip_configs")


@dataclass(frozen=True)
class GoalConfig:
    name: str
    # an open_clip architecture (model/clip_configs/ adds longcap-tiny-clip); OpenAI's weights were trained with
    # QuickGELU: the -quickgelu architectures, or open_clip runs them with plain GELU (it only warns)
    clip_model: str = "ViT-B-16-quickgelu"
    pretrained: str | None = "openai"  # an open_clip pretrained tag, a checkpoint file, or None (random init)
    image_size: int = 224
    long_text: str = "stretch"  # stretch | chunk
    context_length: int = 248  # stretch: text positions after stretching
    keep_positions: int = 20  # stretch: leading positions kept as they are (Long-CLIP)
    max_pairs: int = 2  # local pairs per image in a batch (GOAL's reference code: 1, the best-scoring)
    global_weight: float = 1.0
    local_weight: float = 0.5
    patch_weight: float = 1.0  # TSL, image side
    text_weight: float = 1.0  # TSL, text side
    notes: str = ""

    @property
    def uses_pairs(self) -> bool:
        return self.max_pairs > 0 and (self.local_weight > 0 or self.patch_weight > 0 or self.text_weight > 0)


def _rows(base: GoalConfig) -> dict[str, GoalConfig]:
    glob = replace(base, name=f"{base.name}-global", local_weight=0.0, patch_weight=0.0, text_weight=0.0,
                   notes="global-only fine-tuning: the same model and long-text handling, no local pairs")
    return {base.name: base, glob.name: glob}


CONFIGS = {
    **_rows(GoalConfig("goal-vitb16-openai", notes="GOAL/FAST-GOAL's ViT-B/16 setting (OpenAI CLIP weights)")),
    **_rows(GoalConfig("goal-vitl14-openai", clip_model="ViT-L-14-quickgelu", notes="ViT-L/14 (OpenAI CLIP weights)")),
    **_rows(GoalConfig("goal-tiny", clip_model="longcap-tiny-clip", pretrained=None, image_size=64,
                       notes="a tiny random-init CLIP standing in for pretrained weights (tests, CPU ablations)")),
}


def register_clip_configs() -> None:
    import open_clip

    if "longcap-tiny-clip" not in open_clip.list_models():
        open_clip.add_model_config(CLIP_CONFIGS)


def stretch_positions(pos: torch.Tensor, length: int, keep: int = 20) -> torch.Tensor:
    """Long-CLIP's knowledge-preserving stretch: rows [0, keep) as they are; the other n - keep rows linearly
    interpolated onto length - keep rows (the last interval extrapolated with the last difference)."""
    n = pos.shape[0]
    if length <= n:
        return pos[:length].clone()
    if not 0 <= keep <= n - 2:
        raise ValueError(f"keep_positions {keep} must be in [0, {n - 2}] for {n} positions")
    rest = pos[keep:].double()
    m, new = rest.shape[0], length - keep
    x = torch.arange(new, dtype=torch.float64) * m / new
    i0 = x.floor().long().clamp(max=m - 2)
    frac = (x - i0).unsqueeze(1)
    out = rest[i0] * (1 - frac) + rest[i0 + 1] * frac
    return torch.cat([pos[:keep], out.to(pos.dtype)])


def patch_membership(boxes: torch.Tensor, grid: tuple[int, int], patch: tuple[int, int]) -> torch.Tensor:
    """boxes [R,4] pixel xyxy -> [R, gh*gw] bool: the patches whose centre lies inside the box (x0 <= cx < x1,
    y0 <= cy < y1); a box holding no centre gets the patch that holds the box centre."""
    gh, gw = grid
    ph, pw = patch
    cy = (torch.arange(gh, device=boxes.device, dtype=boxes.dtype) + 0.5) * ph
    cx = (torch.arange(gw, device=boxes.device, dtype=boxes.dtype) + 0.5) * pw
    x0, y0, x1, y1 = (boxes[:, i, None] for i in range(4))
    inx = (cx[None] >= x0) & (cx[None] < x1)  # [R,gw]
    iny = (cy[None] >= y0) & (cy[None] < y1)  # [R,gh]
    member = (iny[:, :, None] & inx[:, None, :]).flatten(1)
    empty = ~member.any(1)
    if empty.any():
        r = ((boxes[empty, 1] + boxes[empty, 3]) / 2 / ph).long().clamp(0, gh - 1)
        c = ((boxes[empty, 0] + boxes[empty, 2]) / 2 / pw).long().clamp(0, gw - 1)
        rows = empty.nonzero().squeeze(1)
        member[rows, r * gw + c] = True
    return member


def span_membership(spans: torch.Tensor, length: int) -> torch.Tensor:
    """spans [R,2] (start, end exclusive) -> [R, length] bool."""
    pos = torch.arange(length, device=spans.device)
    return (pos[None] >= spans[:, :1]) & (pos[None] < spans[:, 1:])


def tsl_loss(tokens: torch.Tensor, owner: torch.Tensor, member: torch.Tensor, target: torch.Tensor,
             valid: torch.Tensor | None = None) -> torch.Tensor:
    """Token-similarity loss: mean over pairs r of (1 - cos(mean of tokens[owner[r]] where member[r], target[r]))^2.

    tokens [B,L,D] (projected token embeddings), owner [R] (row of each pair), member [R,L] bool,
    target [R,D] (the region's / sentence's own embedding), valid [R] (pairs taking part)."""
    keep = member.any(1) if valid is None else (valid & member.any(1))
    if not keep.any():
        return tokens.sum() * 0.0
    m = member[keep].to(tokens.dtype)
    pooled = (m.unsqueeze(-1) * tokens[owner[keep]]).sum(1) / m.sum(1, keepdim=True)
    cos = F.cosine_similarity(pooled, target[keep], dim=-1)
    return ((1 - cos) ** 2).mean()


def clip_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, neg_image: torch.Tensor | None = None,
              neg_text: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP's symmetric InfoNCE on normalised features, pairs on the diagonal; neg_* more candidates (other ranks)."""
    texts = text if neg_text is None else torch.cat([text, neg_text])
    images = image if neg_image is None else torch.cat([image, neg_image])
    target = torch.arange(image.shape[0], device=image.device)
    return (F.cross_entropy(scale * image @ texts.T, target) + F.cross_entropy(scale * text @ images.T, target)) / 2


def grouped_clip_loss(a: torch.Tensor, b: torch.Tensor, group: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """InfoNCE both ways where items of the same `group` are positives (uniform soft targets)."""
    logits = scale * a @ b.T
    same = (group[:, None] == group[None, :]).to(logits.dtype)
    target = same / same.sum(1, keepdim=True)
    return (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.T.log_softmax(1)).sum(1).mean()) / 2


class GoalModel(nn.Module):
    kind = "goal"
    find_unused_parameters = True

    def __init__(self, cfg: GoalConfig):
        super().__init__()
        if cfg.long_text not in ("stretch", "chunk"):
            raise ValueError(f"long_text {cfg.long_text!r} is not stretch or chunk")
        self.cfg = cfg
        self.clip = _create_clip(cfg)
        self.clip.visual.output_tokens = True
        if cfg.long_text == "stretch" and cfg.context_length > self.clip.positional_embedding.shape[0]:
            with torch.no_grad():
                pos = stretch_positions(self.clip.positional_embedding.data, cfg.context_length, cfg.keep_positions)
            self.clip.positional_embedding = nn.Parameter(pos)
            mask = torch.full((cfg.context_length, cfg.context_length), float("-inf")).triu_(1)
            self.clip.register_buffer("attn_mask", mask, persistent=False)
            self.clip.context_length = cfg.context_length

    @property
    def input_size(self) -> int:
        return self.cfg.image_size

    @property
    def text_context(self) -> int:
        return self.clip.positional_embedding.shape[0]

    # ---------------------------------------------------------------- encoders

    def image_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B,3,S,S] -> ([CLS] embedding [B,D], projected patch tokens [B,P,D], row-major patch grid)."""
        vis = self.clip.visual
        pooled, tokens = vis(images)
        return pooled, tokens @ vis.proj

    def text_tokens(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """text [T,L] ids (L <= context) -> (embedding at EOT [T,D], projected token embeddings [T,L,D])."""
        c = self.clip
        n = text.shape[1]
        x = c.token_embedding(text) + c.positional_embedding[:n]
        x = c.transformer(x, attn_mask=c.attn_mask[:n, :n])
        x = c.ln_final(x)
        x = c.text_projection(x) if isinstance(c.text_projection, nn.Linear) else x @ c.text_projection
        return x[torch.arange(x.shape[0], device=x.device), text.argmax(-1)], x

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.visual(images)[0]

    def encode_captions(self, text: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
        """Caption embeddings [n,D] (normalised) from packed rows: stretch, one row each; chunk, the mean of rows."""
        rows, _ = self.text_tokens(text)
        return self._captions(rows, owner, n)

    def _captions(self, rows: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
        rows = F.normalize(rows, dim=-1)
        if rows.shape[0] == n:
            return rows
        sums = rows.new_zeros(n, rows.shape[1]).index_add_(0, owner, rows)
        return F.normalize(sums, dim=-1)

    # ---------------------------------------------------------------- training

    def data_options(self) -> dict:
        return {"mode": "goal", "max_pairs": self.cfg.max_pairs if self.cfg.uses_pairs else 0,
                "long_text": self.cfg.long_text, "long_context": self.text_context}

    def batch_inputs(self, batch: dict, device) -> dict:
        names = ("image", "text", "text_owner", "crops", "boxes", "region_image", "sent_tokens", "sent_row",
                 "sent_span", "sent_ok", "sent_group")
        return {k: batch[k].to(device) for k in names}

    def forward(self, image, text, text_owner, crops, boxes, region_image, sent_tokens, sent_row, sent_span, sent_ok,
                sent_group, gather=None) -> dict:
        cfg = self.cfg
        scale = self.clip.logit_scale.exp()
        cls, patches = self.image_tokens(image)
        rows, toks = self.text_tokens(text)
        img = F.normalize(cls, dim=-1)
        cap = self._captions(rows, text_owner, image.shape[0])
        losses = {"global": cfg.global_weight * clip_loss(img, cap, scale, gather(img) if gather else None,
                                                          gather(cap) if gather else None)}
        if cfg.uses_pairs:
            zero = cls.sum() * 0.0
            if crops.shape[0]:
                crop_emb = self.encode_image(crops)
                sent_emb, _ = self.text_tokens(sent_tokens)
                losses["local"] = cfg.local_weight * grouped_clip_loss(
                    F.normalize(crop_emb, dim=-1), F.normalize(sent_emb, dim=-1), sent_group, scale)
                vis = self.clip.visual
                member = patch_membership(boxes, vis.grid_size, vis.patch_size)
                inside = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # cropped away: no patches
                losses["tsl_image"] = cfg.patch_weight * tsl_loss(patches, region_image, member, crop_emb, inside)
                tmember = span_membership(sent_span, toks.shape[1])
                losses["tsl_text"] = cfg.text_weight * tsl_loss(toks, sent_row, tmember, sent_emb, sent_ok)
            else:
                losses.update(local=zero, tsl_image=zero, tsl_text=zero)
        losses["loss"] = sum(losses.values())
        return losses

    def set_grad_checkpointing(self, on: bool = True) -> None:
        self.clip.set_grad_checkpointing(on)

    def clamp_logit_scales(self) -> None:
        with torch.no_grad():
            self.clip.logit_scale.clamp_(0, 4.6052)  # ln 100, as open_clip's trainer

    def logit_scales(self) -> dict:
        return {"scale": self.clip.logit_scale.exp().item()}

    # ---------------------------------------------------------------- evaluation

    @torch.no_grad()
    def encode_shards(self, urls: list[str], data, device: str = "cpu") -> dict:
        from .data import dataset

        self.eval()
        keys, images, caps = [], [], []
        for batch in dataset(urls, data):
            images.append(F.normalize(self.encode_image(batch["image"].to(device)), dim=-1))
            caps.append(self.encode_captions(batch["text"].to(device), batch["text_owner"].to(device),
                                             batch["image"].shape[0]))
            keys += batch["keys"]
        if not keys:
            raise ValueError(f"no evaluation samples in {urls} (filter {data.where})")
        return {"keys": keys, "image": torch.cat(images), "caption": torch.cat(caps)}

    def evaluate(self, spec, device: str = "cpu") -> dict:
        """Long-caption retrieval R@1/R@5 both ways on the evaluation shards (one long caption per image)."""
        from .data import DataConfig
        from .evaluate import recall_at_k

        data = DataConfig(image_size=self.input_size, train=False, batch_size=spec.batch_size,
                          where=spec.where or None, **{**self.data_options(), "max_pairs": 0})
        enc = self.encode_shards(spec.urls, data, device)
        n = len(enc["keys"])
        sim = (enc["image"] @ enc["caption"].T).cpu()
        return {"retrieval": {"n": n, "chance_r1": 1.0 / n, "global": recall_at_k(sim, torch.arange(n))}}

    @torch.no_grad()
    def evaluate_set(self, es, image_size: int, batch_size: int = 32, device: str = "cpu") -> dict:
        """Long-caption retrieval R@1/R@5 both ways on a benchmark's EvalSet (model.evalsets): each caption split
        into sentences and packed as in training (stretch: one row of the stretched context, the rest cut and
        counted; chunk: rows of 77 averaged, a sentence past 75 tokens cut and counted)."""
        from .evaluate import encode_images, kept_texts, recall_at_k, split_captions
        from .localdata import CHUNK_CONTEXT, bpe_ids, pack_chunks, pack_stretch, pad_rows

        self.eval()
        if image_size != self.input_size:
            raise ValueError(f"{self.cfg.name} takes {self.input_size} px images, not {image_size}")
        outs, ok, skipped = encode_images(es, image_size, lambda x: F.normalize(self.encode_image(x), dim=-1),
                                          batch_size, device)
        keep, truth = kept_texts(es, ok)
        caps = [es.captions[t] for t in keep]
        embs, cut = [], 0
        for s in range(0, len(caps), batch_size):
            rows, owner = [], []
            for i, sents in enumerate(split_captions(caps[s:s + batch_size])):
                ids = [bpe_ids(x) for x in sents or [caps[s + i]]]
                if self.cfg.long_text == "stretch":
                    packed, spans = pack_stretch(ids, self.text_context)
                    cut += any(end < 0 for _, _, end in spans)
                else:
                    packed, _ = pack_chunks(ids)
                    cut += any(len(x) > CHUNK_CONTEXT - 2 for x in ids)
                rows += packed
                owner += [i] * len(packed)
            n = len(caps[s:s + batch_size])
            embs.append(self.encode_captions(pad_rows(rows).to(device), torch.tensor(owner, device=device), n))
        sim = (torch.cat(outs) @ torch.cat(embs).T).cpu()
        note = (f"long text: stretch to {self.text_context} tokens; {cut} of {len(caps)} captions cut"
                if self.cfg.long_text == "stretch" else
                f"long text: whole sentences in rows of {CHUNK_CONTEXT}, averaged; {cut} of {len(caps)} captions "
                f"had a sentence cut at {CHUNK_CONTEXT - 2} tokens")
        return {"retrieval": {"n": len(ok), "n_texts": len(caps), "chance_r1": 1.0 / len(ok),
                              "global": recall_at_k(sim, torch.tensor(truth))}, "text": note, "truncated": cut, "skipped": skipped}


def _create_clip(cfg: GoalConfig):
    import open_clip

    register_clip_configs()
    kw = dict(pretrained=cfg.pretrained or None, force_image_size=cfg.image_size, weights_only=True)
    if not cfg.pretrained:
        kw.update(pretrained_image=False, pretrained_text=False)  # nothing is fetched for a random init
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # open_clip logs its model building (and random init) on the root logger
    try:
        model = open_clip.create_model(cfg.clip_model, **kw)
    except RuntimeError as e:
        raise ValueError(f"model {cfg.name}: cannot build open_clip {cfg.clip_model!r} "
                         f"(pretrained={cfg.pretrained!r}): {e}") from None
    finally:
        root.setLevel(level)
    if not (hasattr(model, "token_embedding") and hasattr(model.visual, "grid_size")
            and getattr(model, "text_pool_type", "argmax") == "argmax"):
        raise ValueError(f"model {cfg.name}: GOAL needs an open_clip CLIP with a ViT image tower and the built-in "
                         f"text tower pooled at EOT; {cfg.clip_model!r} is a {type(model).__name__}")
    return model


def build_model(cfg: GoalConfig) -> GoalModel:
    return GoalModel(cfg)


def for_loading(cfg: GoalConfig) -> GoalConfig:
    """The config to rebuild a saved model: every weight comes from the checkpoint, none is fetched."""
    return replace(cfg, pretrained=None)


def describe(model: GoalModel) -> dict:
    return {"name": model.cfg.name, "params": param_count(model), "config": asdict(model.cfg)}
