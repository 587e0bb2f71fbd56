"""Sentence boundaries on long captions in the styles of recaptioned corpora (tests/data/sentences_gold.jsonl,
written by tests/data/make_sentence_gold.py): the stage's default split must get >= 97% of them exactly right."""

import json
from pathlib import Path

import pyarrow as pa

from pipeline.config import SentencesSection
from pipeline.records import CAPTIONS, empty_row
from pipeline.sentences import SentenceSplitter

GOLD = Path(__file__).resolve().parent / "data" / "sentences_gold.jsonl"
MIN_EXACT = 0.97  # the target; the default (rules) gets every caption of the set right today


def test_default_split_matches_the_gold_boundaries():
    rows = [json.loads(line) for line in GOLD.read_text().splitlines()]
    assert len(rows) >= 300 and len({r["style"] for r in rows}) == 6
    table = pa.Table.from_pylist([empty_row(CAPTIONS, key=f"{i:04d}", captioner="c", prompt_id="p", text=r["text"],
                                            status="ok") for i, r in enumerate(rows)], schema=CAPTIONS)
    keep = {"quality": {"actions": {"boilerplate": "keep"}}}  # the split alone: no opening stripped
    assert SentencesSection().segmenter == "rules"
    out = SentenceSplitter(SentencesSection(**keep)).split_shard(table).to_pylist()
    wrong = [(r["id"], o["sentences"]) for r, o in zip(rows, out) if o["sentences"] != r["sentences"]]
    exact = 1 - len(wrong) / len(rows)
    assert exact >= MIN_EXACT, f"{exact:.3f} exact; first wrong: {wrong[:3]}"
