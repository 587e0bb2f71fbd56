"""Sentence segmenters on the labelled captions, and the sentences stage's throughput, one core.

Part 1 (--gold): every candidate, wrapped as a spaCy component after spacy.blank('en')'s tokenizer (the
stage's load_nlp), on tests/data/sentences_gold.jsonl: caption-level exact accuracy, boundary precision and
recall (a boundary = the character offset where a sentence after the first starts), captions/s.
Part 2: the whole stage (normalisation, split, quality measures and flags, strip actions, the Arrow table) on
long captions (100-250 words) against its segmenter alone through nlp.pipe on the same captions, for the
default (rules) and for spaCy's sentencizer (the old default).
Rates are captions per CPU second of this process (time.process_time; the work is single-threaded), so a
machine shared with other jobs slows them less than wall-clock rates; they are captions/s per core. Each repeat
also times spaCy's tokenizer alone (nlp.make_doc, the floor under any spaCy segmenter) and records the machine's
load average, since the ratio stage / segmenter in one repeat holds better than the absolute rates on a shared
machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import pyarrow as pa

WORDS = ("red blue green small large wooden metal shiny old new cat dog car table chair window tree "
         "building person woman man child street sky cloud light shadow left right behind front near "
         "holding sitting standing walking next corner background foreground wall floor").split()


def make_captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        target, words = rng.randint(100, 250), []
        sents = []
        while len(words) < target:
            s = [rng.choice(WORDS) for _ in range(rng.randint(8, 22))]
            words += s
            sents.append(" ".join(s).capitalize() + rng.choice([".", ".", ".", "!", ";"]))
        out.append(" ".join(sents))
    return out


GOLD = Path(__file__).resolve().parents[1] / "tests" / "data" / "sentences_gold.jsonl"
CANDIDATES = ("sentencizer", "rules", "pysbd", "nupunkt")


def starts(text: str, sentences: list[str]) -> set[int]:
    """Offsets in `text` where the 2nd, 3rd, ... sentence starts (sentences are in order, whitespace between)."""
    out, pos = set(), 0
    for i, s in enumerate(sentences):
        at = text.index(s, pos)
        if i:
            out.add(at)
        pos = at + len(s)
    return out


def gold_scores(segmenter: str, repeats: int) -> dict:
    """Exact accuracy, boundary precision/recall and captions/s of one segmenter on the labelled captions."""
    from pipeline.sentences import load_nlp, normalize, split_docs

    rows = [json.loads(line) for line in GOLD.read_text().splitlines()]
    texts = [normalize(r["text"]) for r in rows]
    nlp = load_nlp("blank:en", segmenter)
    split_docs(texts[:20], nlp)  # warm up (pysbd compiles its rules on first use)
    best, got = 0.0, None
    for _ in range(repeats):
        t0 = time.process_time()
        got = [[t[a:b] for a, b in spans] for t, (spans, _) in zip(texts, split_docs(texts, nlp))]
        best = max(best, len(texts) / (time.process_time() - t0))
    exact = sum(g == r["sentences"] for g, r in zip(got, rows))
    tp = fp = fn = 0
    for t, g, r in zip(texts, got, rows):
        want, have = starts(t, r["sentences"]), starts(t, g)
        tp, fp, fn = tp + len(want & have), fp + len(have - want), fn + len(want - have)
    return {"segmenter": segmenter, "captions": len(rows), "exact": round(exact / len(rows), 4),
            "precision": round(tp / max(tp + fp, 1), 4), "recall": round(tp / max(tp + fn, 1), 4),
            "captions_per_s": round(best, 1)}


def stage_vs_segmenter(segmenter: str, n: int, repeats: int) -> dict:
    from pipeline.config import SentencesSection
    from pipeline.records import CAPTIONS, empty_row
    from pipeline.sentences import SentenceSplitter, load_nlp

    texts = make_captions(n)
    table = pa.Table.from_pylist([empty_row(CAPTIONS, key=f"{i:09d}", captioner="c", prompt_id="p", text=t,
                                            status="ok") for i, t in enumerate(texts)], schema=CAPTIONS)
    raw = load_nlp("blank:en", segmenter)  # the segmenter alone: tokenizer + the component, nlp.pipe
    stage = SentenceSplitter(SentencesSection(segmenter=segmenter))
    best = {"segmenter": 0.0, "stage": 0.0}
    ratios = []
    best["tokenizer"] = 0.0
    stage.split_shard(table)  # warm-up
    for r in range(repeats):
        load = os.getloadavg()[0]
        t0 = time.process_time()
        for text in texts:
            raw.make_doc(text)
        tok = len(texts) / (time.process_time() - t0)
        t0 = time.process_time()
        n_raw = sum(1 for doc in raw.pipe(texts, batch_size=256) for _ in doc.sents)
        seg = len(texts) / (time.process_time() - t0)
        t0 = time.process_time()
        out = stage.split_shard(table)
        st = len(texts) / (time.process_time() - t0)
        best = {"tokenizer": max(best["tokenizer"], tok), "segmenter": max(best["segmenter"], seg),
                "stage": max(best["stage"], st)}
        ratios.append(round(st / seg, 3))
        print(json.dumps({"segmenter": segmenter, "repeat": r, "load_1min": round(load, 2),
                          "tokenizer_captions_per_s": round(tok, 1), "segmenter_captions_per_s": round(seg, 1),
                          "stage_captions_per_s": round(st, 1), "ratio": round(st / seg, 3),
                          "sentences_segmenter": n_raw, "sentences_stage": sum(out["n_sentences"].to_pylist())}),
              flush=True)
    return {"summary": True, "segmenter": segmenter, "captions": len(texts),
            "mean_words": round(sum(len(t.split()) for t in texts) / len(texts), 1),
            "tokenizer_captions_per_s": round(best["tokenizer"], 1),
            "segmenter_captions_per_s": round(best["segmenter"], 1), "stage_captions_per_s": round(best["stage"], 1),
            "ratio": round(best["stage"] / best["segmenter"], 3), "ratios_per_repeat": ratios}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--captions", type=int, default=4000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gold", action="store_true", help="part 1: every candidate on the labelled captions")
    ap.add_argument("--candidates", default=",".join(CANDIDATES))
    ap.add_argument("--segmenters", default="rules,sentencizer", help="part 2: the stage with these segmenters")
    args = ap.parse_args()
    if args.gold:
        for c in args.candidates.split(","):
            print(json.dumps(gold_scores(c, args.repeats)), flush=True)
        return
    for c in args.segmenters.split(","):
        print(json.dumps(stage_vs_segmenter(c, args.captions, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
