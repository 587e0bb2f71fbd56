"""Sentences stage throughput vs spaCy's nlp.pipe alone, on long captions (100-250 words), one core.

The stage does: normalisation, spaCy split (blank English + sentencizer, plus
longcap's newline component), quality measures and flags, strip actions and
building the output table. The baseline is spacy.blank('en') + sentencizer
run through nlp.pipe on the same captions, nothing else.
"""

from __future__ import annotations

import argparse
import json
import random
import time

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--captions", type=int, default=4000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import spacy

    from pipeline.config import SentencesSection
    from pipeline.records import CAPTIONS, empty_row
    from pipeline.sentences import SentenceSplitter

    texts = make_captions(args.captions)
    table = pa.Table.from_pylist([empty_row(CAPTIONS, key=f"{i:09d}", captioner="c", prompt_id="p", text=t,
                                            status="ok") for i, t in enumerate(texts)], schema=CAPTIONS)
    raw = spacy.blank("en")
    raw.add_pipe("sentencizer")
    stage = SentenceSplitter(SentencesSection())
    best = {"spacy": 0.0, "stage": 0.0}
    n_words = sum(len(t.split()) for t in texts) / len(texts)
    for r in range(args.repeats):
        t0 = time.perf_counter()
        n_raw = sum(1 for doc in raw.pipe(texts, batch_size=256) for _ in doc.sents)
        best["spacy"] = max(best["spacy"], len(texts) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        out = stage.split_shard(table)
        best["stage"] = max(best["stage"], len(texts) / (time.perf_counter() - t0))
        n_stage = sum(out["n_sentences"].to_pylist())
        print(json.dumps({"repeat": r, "spacy_captions_per_s": round(best["spacy"], 1),
                          "stage_captions_per_s": round(best["stage"], 1),
                          "sentences_spacy": n_raw, "sentences_stage": n_stage}), flush=True)
    print(json.dumps({"summary": True, "captions": len(texts), "mean_words": round(n_words, 1),
                      "spacy_captions_per_s": round(best["spacy"], 1), "stage_captions_per_s": round(best["stage"], 1),
                      "ratio": round(best["stage"] / best["spacy"], 3)}))


if __name__ == "__main__":
    main()
