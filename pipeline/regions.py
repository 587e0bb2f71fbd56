"""Regions stage: detector + division regions per image, every region scored against every sentence.

Per key of a shard: decode the image (pixel limit, any mode -> RGB, large
images downscaled), detector boxes and division boxes (filtered, deduplicated),
crops and sentences embedded by the scorer, the region x sentence cosine
matrix, and per sentence the best region (kept by threshold and margin).
Every key of the shard gets a row, with a status and a reason when skipped.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torchvision.ops import box_iou

from .division import build_regions
from .export import image_members
from .images import MAX_PIXELS, decode_image
from .kinds import OBJECT, RELATION, KindClassifier, is_word
from .matching import assign_one_to_one, select_pairs, select_two, union_box
from .records import FAILED, OK, REGIONS, SKIPPED, download_reason, empty_row, table

CHUNK = 64  # images decoded, detected and scored together


def crop(im: Image.Image, box: list[float]) -> Image.Image:
    """The pixels of a normalised box, at least 1x1."""
    w, h = im.size
    x0, y0 = min(int(math.floor(box[0] * w)), w - 1), min(int(math.floor(box[1] * h)), h - 1)
    x1, y1 = max(int(math.ceil(box[2] * w)), x0 + 1), max(int(math.ceil(box[3] * h)), y0 + 1)
    return im.crop((x0, y0, x1, y1))


def sentences_by_key(sentences: pa.Table) -> tuple[dict, dict]:
    """Usable captions per key ({captioner, prompt_id, text, sentences}) and per key why others are not."""
    usable, why = defaultdict(list), defaultdict(list)
    cols = ["key", "captioner", "prompt_id", "text", "sentences", "excluded", "exclude_reasons", "status", "error"]
    for r in sentences.select(cols).to_pylist():
        name = f"{r['captioner']}/{r['prompt_id']}"
        if r["status"] != OK:
            why[r["key"]].append(f"{name}: {r['status']}")
        elif r["excluded"]:
            why[r["key"]].append(f"{name}: excluded ({', '.join(r['exclude_reasons'] or [])})")
        elif not r["sentences"]:
            why[r["key"]].append(f"{name}: 0 sentences")
        else:
            usable[r["key"]].append(r)
    return usable, why


class RegionPairer:
    """The stage's logic over one shard's inputs (no Ray, no run directory)."""

    def __init__(self, cfg, scorer, detector=None, max_pixels: float = MAX_PIXELS):
        self.cfg, self.scorer, self.detector, self.max_pixels = cfg, scorer, detector, max_pixels
        self.text_cache: dict[str, np.ndarray] = {}
        self.fixed = None
        self.classes = [str(n) for n in dict(getattr(detector, "names", None) or {}).values()]
        self.kinds = KindClassifier(cfg.kinds_spacy_model, self.classes, cfg.synonyms)

    def pair_shard(self, images_meta: pa.Table, images_tar: str, sentences: pa.Table,
                   fixed: dict | None = None) -> pa.Table:
        """fixed: key -> regions from an earlier pass; they are rescored (no detection, no division)."""
        usable, why = sentences_by_key(sentences)
        self.fixed = fixed
        meta = images_meta.select(["key", "status", "error_message", "width", "height"]).to_pylist()
        rows, todo = {}, []
        for m in meta:
            row = empty_row(REGIONS, key=m["key"], width=m["width"], height=m["height"])
            rows[m["key"]] = row
            reason = download_reason(m["status"], m["error_message"])
            if reason != OK:
                row.update(status=SKIPPED, error=f"no image ({reason})")
            else:
                todo.append(m["key"])
        wanted = set(todo)
        chunk = []
        for key, files in image_members(images_tar):
            if key not in wanted:
                continue
            wanted.discard(key)
            ext = next((e for e in files if e not in ("json", "txt")), None)
            chunk.append((key, files.get(ext)))
            if len(chunk) >= CHUNK:
                self._pair_chunk(chunk, rows, usable, why)
                chunk = []
        if chunk:
            self._pair_chunk(chunk, rows, usable, why)
        for key in wanted:
            rows[key].update(status=FAILED, error="image missing from the shard's tar")
        self.text_cache.clear()
        return table([rows[m["key"]] for m in meta], REGIONS)

    def _pair_chunk(self, chunk: list, rows: dict, usable: dict, why: dict) -> None:
        images = {}
        for key, data in chunk:
            try:
                if data is None:
                    raise ValueError("no image member in the shard's tar")
                images[key] = decode_image(data, self.max_pixels, self.cfg.max_side, self.cfg.min_side)
            except ValueError as e:
                rows[key].update(status=FAILED, error=str(e))
        keys = list(images)
        regions = {}
        if self.fixed is not None:
            keys, regions = [], {k: [r for r in self.fixed[k] if not r["source"].startswith("union:")]
                                 for k in images if self.fixed.get(k)}
            for k in set(images) - set(regions):
                rows[k].update(status=SKIPPED, error="no regions from the regions stage")
        dets = self.detector.detect([images[k] for k in keys]) if self.detector and keys else [[] for _ in keys]
        for key, d in zip(keys, dets):
            if isinstance(d, str):
                rows[key].update(status=FAILED, error=d)
                continue
            regions[key] = build_regions(d, self.cfg.division, self.cfg.min_area, self.cfg.max_area,
                                         self.cfg.dedup_iou, self.cfg.class_alternatives)
        crops = [crop(images[k], r["box"]) for k in regions for r in regions[k]]
        emb = self.scorer.encode_images(crops) if crops else np.zeros((0, 0), np.float32)
        texts = {s for k in regions for c in usable.get(k, []) for s in c["sentences"]}
        kinds = self.kinds.classify(sorted(texts))
        texts |= {p.text for k in kinds if k.kind == RELATION for p in k.phrases}
        if self.cfg.object_text != "sentence":
            texts |= {k.phrases[0].text for k in kinds if k.kind == OBJECT and k.phrases}
        self._encode_texts(sorted(texts - set(self.text_cache)))
        at = 0
        for key, regs in regions.items():
            region_emb, at = emb[at:at + len(regs)], at + len(regs)
            self._fill(rows[key], regs, region_emb, usable.get(key, []), why.get(key, []))

    def _encode_texts(self, texts: list[str]) -> None:
        if texts:
            self.text_cache.update(zip(texts, self.scorer.encode_texts(texts)))

    def _fill(self, row: dict, regs: list[dict], region_emb: np.ndarray, captions: list, why: list) -> None:
        regs = list(regs)  # relation and scene pairs may append union / whole-image regions
        classes = [r["source"][4:] if r["source"].startswith("det:") else None for r in regs]
        for name in {c for c in classes if c and c not in self.classes}:  # rescoring fixed regions
            self.classes.append(name)
            self.kinds.add_label(name, self.cfg.synonyms.get(name, []))
        on = self.cfg.labels if self.cfg.labels is not None else bool(self.classes) and all(
            is_word(c) for c in self.classes)
        weight = self.cfg.label_weight if on else 0.0
        if self.cfg.label_scale == "confidence":  # a box's label counts as much as the detector is sure of it
            classes = [(c, r["score"] if r["score"] is not None else 1.0) if c else None
                       for c, r in zip(classes, regs)]
        else:
            classes = [(c, 1.0) if c else None for c in classes]
        dets = [k for k, c in enumerate(classes) if c]  # the detector's boxes among the regions
        matches = []
        for c in captions:
            sents = c["sentences"]
            if regs:
                scores = region_emb @ np.stack([self.text_cache[s] for s in sents]).T
            else:
                scores = np.zeros((0, len(sents)))
            kinds, columns = self.kinds.classify(sents), []
            for i, kind in enumerate(kinds):
                label = np.array([weight * k[1] * self.kinds.agreement(kind, k[0]) if k and weight else 0.0
                                  for k in classes])
                column = scores[:, i]
                if kind.kind == OBJECT and kind.phrases and regs and self.cfg.object_text != "sentence":
                    phrase = region_emb @ self.text_cache[kind.phrases[0].text]  # what a crop can show
                    column = phrase if self.cfg.object_text == "phrase" else (column + phrase) / 2
                columns.append(column + label)
            joint = self._assign(kinds, columns, dets, regs)
            for i, (s, kind) in enumerate(zip(sents, kinds)):
                m = joint.get(i) or self._pair(kind, columns[i], regs, region_emb, classes, dets, weight)
                matches.append({"captioner": c["captioner"], "prompt_id": c["prompt_id"], "sentence_index": i,
                                "sentence": s, "kind": kind.kind, **m})
        row.update(regions=regs, n_regions=len(regs))
        row.update(matches=matches, n_sentences=len(matches), n_pairs=sum(m["kept"] for m in matches))
        if matches:
            row.update(status=OK)
        else:
            row.update(status=SKIPPED, error="no sentences" + (f": {'; '.join(why)}" if why else ""))

    def _assign(self, kinds: list, columns: list, dets: list[int], regs: list) -> dict:
        """object_assignment one_to_one: a caption's object sentences on distinct regions (of their pool), jointly."""
        cfg = self.cfg
        objs = [i for i, k in enumerate(kinds) if k.kind == OBJECT]
        if cfg.object_assignment != "one_to_one" or cfg.pair_object != "best" or len(objs) < 2 or not len(columns[0]):
            return {}
        pool = dets if cfg.object_regions == "detector" and dets else list(range(len(columns[0])))
        # one object, one candidate: a region and its near-equal class alternatives (IoU >= dedup_iou) are one
        # group, scored per sentence by its best member, so two sentences never take two readings of one object
        boxes = torch.tensor([regs[k]["box"] for k in pool], dtype=torch.float64)
        near = (box_iou(boxes, boxes) >= cfg.dedup_iou).numpy()
        groups: list[list[int]] = []
        for a in range(len(pool)):
            home = next((g for g in groups if near[g[0], a]), None)
            home.append(a) if home is not None else groups.append([a])
        scores = np.stack([columns[i][pool] for i in objs], axis=1)  # pool x object sentences
        grouped = np.stack([scores[g].max(axis=0) for g in groups])
        got = assign_one_to_one(grouped, cfg.threshold, cfg.margin, cfg.top_k)
        for j, m in enumerate(got):
            best = [pool[g[int(np.argmax(scores[g, j]))]] for g in groups]  # each group's member for this sentence
            m.update(region=best[m["region"]], top_regions=[best[k] for k in m["top_regions"]])
        return dict(zip(objs, got))

    def _pair(self, kind, column: np.ndarray, regs: list[dict], region_emb: np.ndarray, classes: list,
              dets: list[int], weight: float) -> dict:
        """One sentence's match by its kind's rule (regions.pair_<kind>); may append a region to regs."""
        cfg, n = self.cfg, len(column)
        mode = {"object": cfg.pair_object, "relation": cfg.pair_relation, "scene": cfg.pair_scene,
                "other": cfg.pair_other}[kind.kind]
        pool = dets if kind.kind == "object" and cfg.object_regions == "detector" and dets else list(range(n))
        best = _best_of(column, pool, cfg)
        if mode == "none":
            return {**best, "kept": False}
        if mode == "whole":  # the whole image, whatever the scores
            at = next((k for k, r in enumerate(regs) if list(r["box"]) == [0.0, 0.0, 1.0, 1.0]), None)
            if at is None:
                at = _append(regs, [0.0, 0.0, 1.0, 1.0], "grid:whole:0")
            score = float(column[at]) if at < n else None
            return {"region": at, "score": score, "margin": None, "kept": True, "top_regions": [at],
                    "top_scores": [score] if score is not None else []}
        if mode == "union" and len(kind.phrases) >= 2 and n >= 2:
            (a, b), phrase_scores = kind.pair, []
            pool = dets if cfg.relation_regions == "detector" and len(dets) >= 2 else list(range(n))
            for p in (kind.phrases[a], kind.phrases[b]):
                label = [weight * classes[k][1] * self.kinds.names(p, classes[k][0]) if classes[k] else 0.0
                         for k in pool]
                phrase_scores.append(region_emb[pool] @ self.text_cache[p.text] + np.array(label))
            boxes = torch.tensor([regs[k]["box"] for k in pool], dtype=torch.float64)
            distinct = (box_iou(boxes, boxes) < cfg.relation_max_iou).numpy()  # two readings of one object are not two
            two = select_two(*phrase_scores, cfg.threshold, cfg.margin, distinct)
            if two["regions"] is None:
                return {**best, "kept": False}
            i, j = (pool[x] for x in two["regions"])
            at = _append(regs, union_box(regs[i]["box"], regs[j]["box"]), f"union:{i}+{j}")
            return {"region": at, "score": two["score"], "margin": two["margin"], "kept": two["kept"],
                    "top_regions": [i, j], "top_scores": list(two["scores"])}
        return best


def _best_of(column: np.ndarray, pool: list[int], cfg) -> dict:
    """select_pairs over the regions in pool (indices into column); region indices are the column's."""
    m = select_pairs(column[pool][:, None], cfg.threshold, cfg.margin, cfg.top_k)[0]
    if m["region"] is not None:
        m.update(region=pool[m["region"]], top_regions=[pool[k] for k in m["top_regions"]])
    return m


def _append(regs: list[dict], box: list[float], source: str) -> int:
    """Index of the region with this source, appended first when new (no detector score)."""
    for k, r in enumerate(regs):
        if r["source"] == source:
            return k
    regs.append({"box": [float(v) for v in box], "source": source, "score": None})
    return len(regs) - 1


def goal_records(regions: pa.Table, sentences: pa.Table) -> list[dict]:
    """GOAL's format: per (image, caption) with kept pairs, {original_filename, original_caption, segment}."""
    usable, _ = sentences_by_key(sentences)
    out = []
    for r in regions.select(["key", "width", "height", "regions", "matches", "status"]).to_pylist():
        if r["status"] != OK:
            continue
        for c in usable.get(r["key"], []):
            segs = [{"caption": m["sentence"],
                     "similarity_score": round(m["score"], 6) if m["score"] is not None else None,
                     "bbox_coordinates": _pixels(r["regions"][m["region"]]["box"], r["width"], r["height"])}
                    for m in r["matches"]
                    if m["kept"] and m["captioner"] == c["captioner"] and m["prompt_id"] == c["prompt_id"]]
            if segs:
                out.append({"original_filename": f"{r['key']}.jpg", "original_caption": c["text"], "segment": segs})
    return out


def _pixels(box: list[float], w: int, h: int) -> list[int]:
    return [round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h)]
