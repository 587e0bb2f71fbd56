"""Evaluation: retrieval R@k both ways (whole, part, CAFT++ scores), grounding mIoU (synthetic world; RefCOCO/+/g
with SaG's protocol), and FG-OVD's caption ranking of object crops.

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

from pipeline.chunking import balanced_chunks
from pipeline.images import MAX_PIXELS, decode_image

from .data import DataConfig, dataset, image_transform, selected, tokenize
from .grounding import grounding_mask, iou, text_heatmaps


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
def part_scores(model, enc: dict, img_block: int = 32, txt_block: int = 256) -> torch.Tensor:
    """[n_img, n_txt] mean over each text's sub-captions of the grounded-feature similarity (blocked both ways:
    grounded features are [img, txt, N, D])."""
    sub, valid, parts = F.normalize(enc["sub"], dim=-1), enc["valid"], enc["parts"]
    rows = []
    for i in range(0, parts.shape[0], img_block):
        cols = []
        for t in range(0, sub.shape[0], txt_block):
            g = F.normalize(model.ground(enc["sub"][t:t + txt_block], parts[i:i + img_block]), dim=-1)
            per_sub = (g * sub[t:t + txt_block].unsqueeze(0)).sum(-1)
            m = valid[t:t + txt_block].unsqueeze(0).to(per_sub.dtype)
            cols.append((per_sub * m).sum(-1) / m.sum(-1).clamp_min(1))
        rows.append(torch.cat(cols, 1))
    return torch.cat(rows)


@torch.no_grad()
def retrieval(model, enc: dict, alpha: float | None = None) -> dict:
    """R@1/R@5 both ways for the whole, part and CAFT++ scores (part scores need the part loss).

    enc: "cls"/"parts" per image, "whole"/"sub"/"valid" per text, and "image_of_text" when a text's image is
    not the one at its own index (several captions per image)."""
    n_img, n_txt = enc["cls"].shape[0], enc["whole"].shape[0]
    truth = enc.get("image_of_text")
    truth = torch.arange(n_txt) if truth is None else torch.as_tensor(truth)
    whole = F.normalize(enc["cls"], dim=-1) @ F.normalize(enc["whole"], dim=-1).T
    out = {"n": n_img, "n_texts": n_txt, "chance_r1": 1.0 / n_img, "whole": recall_at_k(whole.cpu(), truth)}
    if model.cfg.part_loss:
        a = model.cfg.alpha if alpha is None else alpha
        part = part_scores(model, enc)
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
        heat = text_heatmaps(model, image, [s["text"] for s in objs])
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
    """A ground-truth mask through the loader's geometry (torchvision's resize of the short side, centre crop)."""
    from torchvision import transforms as T

    im = Image.fromarray(mask.astype(np.uint8) * 255)
    im = T.CenterCrop(size)(T.Resize(size, interpolation=T.InterpolationMode.NEAREST)(im))
    return torch.from_numpy(np.array(im) > 127)


def read_truth(path: str) -> dict:
    import fsspec
    import pyarrow.parquet as pq

    fs, p = fsspec.core.url_to_fs(path)  # a local path or any fsspec URL
    return {r["id"]: r for r in pq.read_table(p, filesystem=fs).to_pylist()}


# ---------------------------------------------------------------- benchmark copies (model.evalsets)


def token_count(text: str) -> int:
    """CLIP BPE tokens of a text, without start/end (cached per text)."""
    from .localdata import bpe_ids

    return len(bpe_ids(text))


def _pack(items: list[tuple[str, int]], room: int) -> list[str]:
    """Greedy, in order: (text, tokens) items joined by spaces into pieces of at most `room` tokens."""
    out, piece, used = [], [], 0
    for text, n in items:
        if piece and used + n > room:
            out.append(" ".join(piece))
            piece, used = [], 0
        piece.append(text)
        used += n
    return out + ([" ".join(piece)] if piece else [])


def balanced_caption_chunks(sentences: list[str], k: int, context_length: int = 77) -> tuple[list[str], int, int]:
    """The paper's inference chunks for a model with a whole-caption encoder: min(K, S) balanced chunks of
    sentences (floor(S/K) each, the remainder to the earlier ones), never more, so the whole-caption encoder
    sees only the chunk positions 0..K-1 it trained on. A chunk over the context is truncated by the tokenizer
    (our rule, the paper is silent): returns (chunks, chunks truncated, tokens cut)."""
    room = context_length - 2  # start and end tokens
    chunks = [" ".join(sentences[a:b]) for a, b in balanced_chunks(len(sentences), k)]
    over = [token_count(c) - room for c in chunks]
    return chunks, sum(o > 0 for o in over), sum(o for o in over if o > 0)


def split_caption_chunks(sentences: list[str], k: int, context_length: int = 77) -> tuple[list[str], int]:
    """Models without a whole-caption encoder (FLAIR: sub-captions only, no chunk positions): balanced chunks,
    a chunk longer than the context split again at sentence boundaries, and a sentence longer than the
    context by words, never cut. Returns (chunks, words dropped): a single word longer than the context is
    the only thing dropped (the tokenizer cuts it)."""
    room = context_length - 2
    out, cut = [], 0
    for a, b in balanced_chunks(len(sentences), k):
        sents = [(t, token_count(t)) for t in sentences[a:b]]
        if sum(n for _, n in sents) <= room:  # the usual case: the chunk as it is
            out.append(" ".join(t for t, _ in sents))
            continue
        items = []  # sentences that fit, and the word pieces of those that do not
        for t, n in sents:
            if n <= room:
                items.append((t, n))
            else:
                words = [(w, token_count(w)) for w in t.split()]
                cut += sum(m > room for _, m in words)
                items += [(piece, room) for piece in _pack(words, room)]  # a piece alone in its chunk
        out += _pack(items, room)
    return out, cut


def split_captions(captions: list[str], nlp_name: str = "blank:en") -> list[list[str]]:
    from pipeline.sentences import load_nlp, split_docs

    return [[text[a:b] for a, b, *_ in spans] for text, (spans, _) in zip(captions, split_docs(captions,
                                                                                              load_nlp(nlp_name)))]


TEXT_MODES = ("flat", "balanced", "split")


def text_inputs(captions: list[str], k: int, mode: str, context_length: int = 77) -> dict:
    """Tokens [T,C,77] + masks for captions, and what was lost. mode: "flat" (one 77-token caption, truncated),
    "balanced" (hierarchical models: K balanced chunks, each truncated at 77), "split" (FLAIR: balanced chunks
    split again past 77, nothing truncated). truncated: captions that lost tokens; tokens_cut / words_dropped."""
    if mode not in TEXT_MODES:
        raise ValueError(f"text mode {mode!r} is not one of {TEXT_MODES}")
    room = context_length - 2
    cut = 0
    if mode == "flat":
        chunks = [[c] for c in captions]
        over = [token_count(c) - room for c in captions]
        truncated, cut = sum(o > 0 for o in over), sum(o for o in over if o > 0)
    else:
        sents = [s or [c] for s, c in zip(split_captions(captions), captions)]
        if mode == "balanced":
            out = [balanced_caption_chunks(s, k, context_length) for s in sents]
            chunks, truncated, cut = [o[0] for o in out], sum(o[1] > 0 for o in out), sum(o[2] for o in out)
        else:
            out = [split_caption_chunks(s, k, context_length) for s in sents]
            chunks, truncated, cut = [o[0] for o in out], sum(o[1] > 0 for o in out), sum(o[1] for o in out)
    n = max(len(c) for c in chunks)
    tokens = torch.zeros(len(captions), n, context_length, dtype=torch.long)
    valid = torch.zeros(len(captions), n, dtype=torch.bool)
    for i, c in enumerate(chunks):
        tokens[i, :len(c)] = tokenize(c, context_length)
        valid[i, :len(c)] = True
    return {"tokens": tokens, "valid": valid, "chunks": chunks, "truncated": truncated,
            ("words_dropped" if mode == "split" else "tokens_cut"): cut}


def _load_image(path: str, size: int, max_pixels: int):
    with open(path, "rb") as f:
        return image_transform(size)(decode_image(f.read(), max_pixels))


def encode_images(es, image_size: int, encode, batch_size: int = 32, device: str = "cpu",
                  max_pixels: int = MAX_PIXELS) -> tuple[list, list[int], list[dict]]:
    """Every image of an EvalSet through `encode` (a batch [B,3,S,S] -> its outputs) in batches; unreadable ones
    are skipped with their reason. Returns (outputs per batch, indices of the encoded images, skipped)."""
    outs, ok = [], []
    skipped = list(es.skipped)
    for s in range(0, len(es.images), batch_size):
        batch, idx = [], []
        for i in range(s, min(s + batch_size, len(es.images))):
            try:
                batch.append(_load_image(es.images[i], image_size, max_pixels))
                idx.append(i)
            except Exception as e:  # noqa: BLE001 - a missing or broken image is recorded, not fatal
                skipped.append({"item": es.images[i], "reason": f"{type(e).__name__}: {e}"})
        if batch:
            outs.append(encode(torch.stack(batch).to(device)))
            ok += idx
    if not ok:
        raise ValueError(f"{es.name}: no image could be read (first: {skipped[0]['reason'] if skipped else '-'})")
    return outs, ok, skipped


def kept_texts(es, ok: list[int]) -> tuple[list[int], list[int]]:
    """After images were skipped: the texts whose image was encoded, and each one's image among the encoded."""
    new_index = {old: new for new, old in enumerate(ok)}
    keep = [t for t, i in enumerate(es.image_of_text) if i in new_index]
    return keep, [new_index[es.image_of_text[t]] for t in keep]


def text_mode(model) -> str:
    """How a model reads a long caption at evaluation (see text_inputs)."""
    if model.cfg.whole_depth == 0 and not model.cfg.part_loss:
        return "flat"
    return "split" if getattr(model.text, "chunk_pos", None) is None else "balanced"


@torch.no_grad()
def encode_set(model, es, image_size: int, k_chunks: int, batch_size: int = 32, device: str = "cpu",
               max_pixels: int = MAX_PIXELS) -> dict:
    """Encode an EvalSet: every image once (unreadable ones skipped with their reason, with their texts), every
    caption as the model reads long text (text_mode): K balanced chunks, flat 77 tokens, or split chunks."""
    model.eval()
    mode = text_mode(model)
    pos = getattr(model.text, "chunk_pos", None)
    if mode == "balanced" and k_chunks > pos.shape[0]:
        raise ValueError(f"K = {k_chunks} chunks, but the whole-caption encoder has only {pos.shape[0]} positions")
    outs, ok, skipped = encode_images(es, image_size, model.encode_image, batch_size, device, max_pixels)
    cls, parts = [v["cls"] for v in outs], [v["parts"] for v in outs]
    keep, image_of_text = kept_texts(es, ok)
    caps = [es.captions[t] for t in keep]
    whole, sub, valid = [], [], []
    truncated, cut = 0, 0
    for s in range(0, len(caps), batch_size):
        t = text_inputs(caps[s:s + batch_size], 1 if mode == "flat" else k_chunks, mode)
        truncated += t["truncated"]
        cut += t.get("tokens_cut", t.get("words_dropped", 0))
        tok, val = t["tokens"].to(device), t["valid"].to(device)
        e = model.encode_text(tok, val, val)
        whole.append(e["whole"])
        sub.append(e["sub"])
        valid.append(val)
    n = max(x.shape[1] for x in sub)  # chunk counts differ between batches: pad
    sub = torch.cat([F.pad(x, (0, 0, 0, n - x.shape[1])) for x in sub])
    valid = torch.cat([F.pad(x, (0, n - x.shape[1])) for x in valid])
    text_note = {
        "flat": f"flat text encoder: {truncated} of {len(caps)} captions truncated at 77 tokens ({cut} tokens cut)",
        "balanced": f"K={k_chunks} balanced chunks (the whole-caption encoder sees positions 0..{k_chunks - 1} "
                    f"only); {truncated} of {len(caps)} captions had a chunk truncated at 77 tokens "
                    f"({cut} tokens cut)",
        "split": f"balanced chunks (K={k_chunks}) split again past 77 tokens (no chunk positions); {truncated} "
                 f"captions lost words ({cut} single words over 75 tokens)"}[mode]
    return {"keys": [es.images[i] for i in ok], "cls": torch.cat(cls), "parts": torch.cat(parts),
            "whole": torch.cat(whole), "sub": sub, "valid": valid,
            "image_of_text": image_of_text, "skipped": skipped, "text_mode": mode,
            "text": text_note, "truncated": truncated, "tokens_cut" if mode != "split" else "words_dropped": cut}


def square_image(path: str, size: int, max_pixels: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """SaG's test geometry: the whole image resized to size x size (no crop, aspect not kept), the model's
    interpolation and normalisation. Returns the tensor [3,S,S] and the original (H, W)."""
    from torchvision import transforms as T

    from .data import CLIP_MEAN, CLIP_STD

    with open(path, "rb") as f:
        im = decode_image(f.read(), max_pixels)
    t = T.Compose([T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                   T.Normalize(CLIP_MEAN, CLIP_STD)])
    return t(im), (im.height, im.width)


@torch.no_grad()
def refer_grounding(model, items: list, image_size: int, device: str = "cpu", limit: int | None = None,
                    max_pixels: int = MAX_PIXELS) -> dict:
    """Referring-expression mIoU as SaG (Kim et al., 2023) evaluates it: every sentence of every ref counts;
    the whole image resized to the model's square input (no crop); each heat map resized back to the image's
    original size, min-max normalised, thresholded at 0.5; IoU against the full-resolution mask; mIoU = mean
    over sentences, cIoU = total intersection / total union. `miou_otsu`: the same maps with Otsu's threshold
    (our grounding rule elsewhere). Baseline: the whole-image mask."""
    from .evalsets import ref_mask
    from .grounding import sag_masks

    model.eval()
    ious, otsu, whole_ious, skipped = [], [], [], []
    inter = union = 0
    for item in items[:limit]:
        if not item.sentences:
            skipped.append({"item": f"ref {item.ref_id}", "reason": "no sentences"})
            continue
        try:
            image, hw = square_image(item.image, image_size, max_pixels)
        except Exception as e:  # noqa: BLE001
            skipped.append({"item": item.image, "reason": f"{type(e).__name__}: {e}"})
            continue
        gt = torch.from_numpy(ref_mask(item))
        if tuple(gt.shape) != hw:
            skipped.append({"item": f"ref {item.ref_id}", "reason": f"mask {tuple(gt.shape)} but image {hw}"})
            continue
        heat = text_heatmaps(model, image.unsqueeze(0).to(device), item.sentences).cpu()
        for pred, pred_otsu in zip(sag_masks(heat, hw), sag_masks(heat, hw, None)):
            i, u = (pred & gt).sum().item(), (pred | gt).sum().item()
            inter, union = inter + i, union + u
            ious.append(i / u if u else 1.0)
            otsu.append(iou(pred_otsu, gt))
            whole_ious.append(iou(torch.ones_like(gt), gt))
    if not ious:
        raise ValueError(f"no referring expression could be evaluated (skipped: {skipped[:3]})")
    return {"protocol": "SaG: full image resized square, maps resized to the original size, threshold 0.5",
            "miou": float(np.mean(ious)), "ciou": inter / union if union else 1.0, "miou_otsu": float(np.mean(otsu)),
            "n": len(ious), "baseline_whole_image_miou": float(np.mean(whole_ious)), "skipped": skipped}


def _crop(path: str, bbox: list[float], size: int, max_pixels: int) -> torch.Tensor:
    """The object's box cut from its image (floor of the top-left, ceiling of the bottom-right, clamped to the
    image, as the FG-OVD authors' CLIP evaluation crops: lorebianchi98/FG-CLIP fg-ovd_feature_extraction/
    extraction.py, scale 1), then the model's own transform (short side resized, centre crop, as CLIP's)."""
    import math

    with open(path, "rb") as f:
        im = decode_image(f.read(), max_pixels)
    x, y, w, h = bbox
    box = (max(0, math.floor(x)), max(0, math.floor(y)), min(im.width, math.ceil(x + w)),
           min(im.height, math.ceil(y + h)))
    if box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(f"box {bbox} is empty inside the {im.width}x{im.height} image")
    return image_transform(size)(im.crop(box))


@torch.no_grad()
def fgovd_accuracy(model, items: list, image_size: int, k_chunks: int = 4, batch_size: int = 32,
                   device: str = "cpu", limit: int | None = None, max_pixels: int = MAX_PIXELS) -> dict:
    """FG-OVD for an image-text model (no detector): each annotated object's box crop against its positive
    caption and its hard negatives; the positive's rank is 1 + the number of negatives scoring at least as high
    (ties against the model, as the benchmark's ranks.py counts). accuracy = share of rank 1; mean/median rank
    as ranks.py reports them. Score: the whole-level similarity (image [CLS] . caption)."""
    model.eval()
    mode = text_mode(model)
    ranks, skipped = [], []
    items = items[:limit]
    for s in range(0, len(items), batch_size):
        batch, crops = [], []
        for it in items[s:s + batch_size]:
            try:
                crops.append(_crop(it.image, it.bbox, image_size, max_pixels))
                batch.append(it)
            except Exception as e:  # noqa: BLE001 - recorded, not fatal
                skipped.append({"item": f"annotation {it.ann_id} ({it.image})", "reason": f"{type(e).__name__}: {e}"})
        if not batch:
            continue
        cls = F.normalize(model.encode_image(torch.stack(crops).to(device))["cls"], dim=-1)
        texts = [t for it in batch for t in [it.positive, *it.negatives]]
        t = text_inputs(texts, 1 if mode == "flat" else k_chunks, mode)
        val = t["valid"].to(device)
        whole = F.normalize(model.encode_text(t["tokens"].to(device), val, val)["whole"], dim=-1)
        start = 0
        for b, it in enumerate(batch):
            n = 1 + len(it.negatives)
            sims = whole[start:start + n] @ cls[b]
            ranks.append(int((sims[1:] >= sims[0]).sum().item()) + 1)
            start += n
    if not ranks:
        raise ValueError(f"no FG-OVD object could be evaluated (first: {skipped[0]['reason'] if skipped else '-'})")
    r = np.array(ranks)
    return {"accuracy": float((r == 1).mean()), "mean_rank": float(r.mean()), "median_rank": float(np.median(r)),
            "n": len(ranks), "n_captions": 1 + len(items[0].negatives), "chance": 1.0 / (1 + len(items[0].negatives)),
            "skipped": skipped}
