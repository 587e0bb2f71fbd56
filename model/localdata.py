"""Samples for the GOAL and grouping models (the loader's `mode`), next to CAFT's chunked captions in data.py.

goal: the image, one long caption as per-sentence CLIP BPE ids (packed into rows at collation: one row of
`long_context` tokens for positional-embedding stretching, or rows of 77 tokens holding whole sentences for
chunking), and up to `max_pairs` of the caption's local pairs from the export JSON's `regions`: the region's
crop (an image of its own, same transform), its box mapped into the loader's resized and centre-cropped input
(pixels), and the matched sentence's position in the long caption.

grouping: CAFT's sub-captions, tokenised word by word (every BPE token belongs to exactly one word token of
pipeline.synthetic.word_spans), so groups of BPE tokens map back to words for phrase tIoU.
"""

from __future__ import annotations

import functools
import logging

import torch

from pipeline.regions import crop
from pipeline.synthetic import WORD_RE

log = logging.getLogger("longcap.data")
SOT, EOT = 49406, 49407
CHUNK_CONTEXT = 77


@functools.lru_cache(maxsize=200_000)
def _bpe(text: str) -> tuple[int, ...]:
    from open_clip.tokenizer import _tokenizer

    return tuple(_tokenizer.encode(text))


def bpe_ids(text: str) -> list[int]:
    """CLIP BPE ids of a text, without start/end tokens (open_clip's tokenizer, cleaning and lower-casing included)."""
    return list(_bpe(text))


def word_tokens(text: str, context: int = 77) -> tuple[list[int], list[int]]:
    """Token ids [SOT, ..., EOT] (at most `context`) and, per id, the index of its word token (-1 for SOT/EOT).

    Words are pipeline.synthetic's word tokens (\\w+ or one punctuation character); each is BPE-encoded alone,
    so a BPE token never straddles two words."""
    ids, word_of = [SOT], [-1]
    for w, m in enumerate(WORD_RE.finditer(text)):
        piece = _bpe(m.group())
        if len(ids) + len(piece) > context - 1:
            break
        ids.extend(piece)
        word_of.extend([w] * len(piece))
    return ids + [EOT], word_of + [-1]


def pad_rows(rows: list[list[int]], width: int | None = None) -> torch.Tensor:
    """Token id rows, zero-padded to `width` (default: the longest row): [len(rows), width]."""
    out = torch.zeros(len(rows), width or max(map(len, rows)), dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def tokenize_words(texts: list[str], context: int = 77) -> torch.Tensor:
    """[len(texts), context] ids from `word_tokens`, zero-padded."""
    return pad_rows([word_tokens(t, context)[0] for t in texts], context)


def box_to_input(box: list[float], width: int, height: int, size: int) -> list[float]:
    """A normalised xyxy box of a width x height image -> pixel xyxy in the loader's size x size input.

    The loader resizes the short side to `size` (the long side to int(size * long / short), as torchvision's
    Resize does) and centre-crops (offsets int(round((side - size) / 2))); the box is clipped to the crop."""
    if width <= height:
        rw, rh = size, int(size * height / width)
    else:
        rw, rh = int(size * width / height), size
    left, top = int(round((rw - size) / 2.0)), int(round((rh - size) / 2.0))
    x0, y0, x1, y1 = box[0] * rw - left, box[1] * rh - top, box[2] * rw - left, box[3] * rh - top
    return [min(max(x0, 0.0), size), min(max(y0, 0.0), size), min(max(x1, 0.0), size), min(max(y1, 0.0), size)]


def _caption_id(c: dict) -> tuple:
    return c.get("captioner"), c.get("prompt_id")


def goal_sample(cfg, key: str, url: str, meta: dict, image, rng, transform) -> dict | None:
    caps = [c for c in meta.get("captions", []) if c.get("sentences")]
    if not caps:
        log.warning("skipping sample %s in %s: no captions with sentences", key, url)
        return None
    regions = meta.get("regions") or {}
    boxes, pairs = regions.get("boxes") or [], regions.get("pairs") or []

    def usable(c):
        return [p for p in pairs if (p.get("captioner"), p.get("prompt_id")) == _caption_id(c)
                and 0 <= p.get("region", -1) < len(boxes) and 0 <= p.get("sentence_index", -1) < len(c["sentences"])
                and p.get("sentence", c["sentences"][p["sentence_index"]]) == c["sentences"][p["sentence_index"]]]

    if cfg.train:
        with_pairs = [c for c in caps if usable(c)] if cfg.max_pairs else []
        long = rng.choice(with_pairs or [c for c in caps if len(c["sentences"]) >= 2] or caps)
    else:
        long = max(caps, key=lambda c: len(c["sentences"]))
    mine = usable(long) if cfg.max_pairs else []
    # one pair per region: two sentences on one crop would each be the other's negative in the local loss
    order = rng.sample(mine, len(mine)) if cfg.train else sorted(mine, key=lambda p: -(p.get("score") or 0.0))
    chosen, regions = [], set()
    for p in order:
        if p["region"] not in regions and len(chosen) < cfg.max_pairs:
            regions.add(p["region"])
            chosen.append(p)
    size = cfg.image_size
    crops = [transform(crop(image, boxes[p["region"]]["box"])) for p in chosen]
    return {"key": key, "url": url, "image": transform(image), "text": " ".join(long["sentences"]),
            "sentence_ids": [bpe_ids(s) for s in long["sentences"]],
            "pair_sentence": [p["sentence_index"] for p in chosen],
            "pair_text": [long["sentences"][p["sentence_index"]] for p in chosen],
            "crops": torch.stack(crops) if crops else torch.zeros(0, 3, size, size),
            "boxes": torch.tensor([box_to_input(boxes[p["region"]]["box"], image.width, image.height, size)
                                   for p in chosen], dtype=torch.float32).view(-1, 4)}


def pack_stretch(sentence_ids: list[list[int]], context: int) -> tuple[list[list[int]], list[tuple[int, int, int]]]:
    """One row [SOT, sentences..., EOT] of at most `context` tokens; per sentence (row, start, end), end exclusive;
    a sentence cut by the truncation gets end = -1."""
    row, spans = [SOT], []
    for ids in sentence_ids:
        start = len(row)
        row.extend(ids)
        end = len(row)
        spans.append((0, start, end if end <= context - 1 else -1))
    return [row[:context - 1] + [EOT]], spans


def pack_chunks(sentence_ids: list[list[int]], context: int = CHUNK_CONTEXT) -> tuple[list[list[int]], list[tuple[int, int, int]]]:
    """Whole sentences packed greedily, in order, into rows [SOT, ..., EOT] of at most `context` tokens; a sentence
    longer than a row is truncated into a row of its own. Per sentence (row, start, end)."""
    room = context - 2
    rows, cur, spans = [], [], []
    for ids in sentence_ids:
        ids = ids[:room]
        if cur and len(cur) + len(ids) > room:
            rows.append(cur)
            cur = []
        spans.append((len(rows), 1 + len(cur), 1 + len(cur) + len(ids)))
        cur = cur + ids
    rows.append(cur)
    return [[SOT] + r + [EOT] for r in rows], spans


def goal_collate(samples: list[dict], long_text: str, long_context: int) -> dict:
    """Images [B,3,S,S]; caption rows `text` [T,C] with `text_owner` [T] (the caption each row belongs to);
    per local pair r: `crops` [R,3,S,S], `boxes` [R,4] (input pixels), `region_image` [R], `sent_tokens` [R,<=77]
    (the sentence alone, as open_clip.tokenize gives it, trailing padding trimmed), `sent_row`/`sent_span` [R]/[R,2] (where it sits in `text`), `sent_ok` [R] (False when
    truncated away), `sent_group` [R] (pairs with the same sentence text share a group: positives of each other)."""
    rows, owner, crops, boxes, region_image = [], [], [], [], []
    sent_tokens, sent_row, sent_span, sent_ok, group_of, sent_group = [], [], [], [], {}, []
    for i, s in enumerate(samples):
        packed, spans = (pack_stretch(s["sentence_ids"], long_context) if long_text == "stretch"
                         else pack_chunks(s["sentence_ids"]))
        base = len(rows)
        rows += packed
        owner += [i] * len(packed)
        for j, text in zip(s["pair_sentence"], s["pair_text"]):
            r, start, end = spans[j]
            sent_row.append(base + r)
            sent_span.append((start, min(max(end, start), start + CHUNK_CONTEXT - 2)))  # as sent_tokens: 75 ids
            sent_ok.append(end > start)
            ids = s["sentence_ids"][j][:CHUNK_CONTEXT - 2]
            sent_tokens.append([SOT] + ids + [EOT] + [0] * (CHUNK_CONTEXT - 2 - len(ids)))
            sent_group.append(group_of.setdefault(text, len(group_of)))
            region_image.append(i)
        crops.append(s["crops"])
        boxes.append(s["boxes"])
    text = pad_rows(rows)
    # sentences: padding after the longest EOT trimmed (a causal text tower's EOT output does not see it)
    sent_width = max((len(t) - t[::-1].index(EOT) for t in sent_tokens), default=CHUNK_CONTEXT)
    sent_tokens = [t[:sent_width] for t in sent_tokens]
    return {"image": torch.stack([s["image"] for s in samples]), "text": text,
            "text_owner": torch.tensor(owner, dtype=torch.long), "crops": torch.cat(crops), "boxes": torch.cat(boxes),
            "region_image": torch.tensor(region_image, dtype=torch.long),
            "sent_tokens": torch.tensor(sent_tokens, dtype=torch.long).view(len(sent_tokens), sent_width),
            "sent_row": torch.tensor(sent_row, dtype=torch.long),
            "sent_span": torch.tensor(sent_span, dtype=torch.long).view(-1, 2),
            "sent_ok": torch.tensor(sent_ok, dtype=torch.bool), "sent_group": torch.tensor(sent_group, dtype=torch.long),
            "keys": [s["key"] for s in samples], "urls": [s["url"] for s in samples],
            "texts": [s["text"] for s in samples]}


def truth_regions(row: dict, captioner: str = "source", prompt_id: str = "caption") -> dict:
    """The export JSON's `regions` for a synthetic truth row with exact pairs: one box per sentence (its objects'
    box; the whole image for the background sentence), each sentence paired with its own box (score 1). An oracle
    for the pairs stage, for tests and for ablations that separate pair quality from the training method."""
    boxes = [{"box": [float(x) for x in s["box"]], "source": f"truth:{s['kind']}", "score": 1.0} for s in row["sentences"]]
    pairs = [{"captioner": captioner, "prompt_id": prompt_id, "sentence_index": i, "sentence": s["text"], "region": i,
              "score": 1.0} for i, s in enumerate(row["sentences"])]
    return {"boxes": boxes, "pairs": pairs}
