"""The sentences stage's output on fixed inputs, written as parquet, to check that a change keeps it identical.

Inputs: the benchmark's long captions (benchmarks/sentences_bench.py make_captions), the 330 labelled captions of
tests/data/sentences_gold.jsonl, and hand-made edge cases (replacement characters, not-ok captions, empty, emoji,
newlines and bullets, control characters, boilerplate openings, repeated sentences, a too-long caption, no final
punctuation, finish_reason 'length'); each under the default config and under one that strips every strippable flag
and one with the old default segmenter (sentencizer).

    python benchmarks/sentences_identity.py --write DIR      # one parquet file per config
    python benchmarks/sentences_identity.py --compare A B    # byte-for-byte and row-for-row
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.sentences_bench import GOLD, make_captions  # noqa: E402

EDGE = [
    "The image shows a red cube on a table. It is shiny. It is shiny. It is shiny. It is shiny. It is shiny.",
    "In this picture, we can see two dogs playing in a park\n- a ball\n- a frisbee\n\n2) The end",
    "caf\ufffd au lait, a cup on a table.",
    "   \n\t ", "", "😀🐶🌈", "a dog running on the beach with no punctuation",
    "Control\x00chars\x07and\u200bzero width\ufeff and **bold** and __under__ text.\r\nNext line\rthird.",
    "ﬁne ligatures and full-width ＡＢＣ letters. Ⅻ roman numeral.",
    ("word " * 1500).strip(), ("A long sentence here. " * 400).strip(),
    "the the the the the the the the the the the the the the the the",
    "Dr. Lee holds No. 7 at approx. 3 p.m. on Sat. 10 Oct. The U.S. flag waves... A cat sleeps.",
    "He said \"Stop!\" and left. (A dog barks.) Then: 1. one 2. two • three",
    "12 34 56 78 90 !!! ??? ...", "x", "Short one.",
]


def captions_table() -> pa.Table:
    from pipeline.records import CAPTIONS, empty_row

    gold = [json.loads(line)["text"] for line in GOLD.read_text().splitlines()]
    texts = make_captions(4000) + gold + EDGE
    rows = [empty_row(CAPTIONS, key=f"{i:09d}", captioner="c", prompt_id="p", text=t, status="ok")
            for i, t in enumerate(texts)]
    rows[-1]["finish_reason"] = "length"
    rows[-2]["status"], rows[-2]["error"] = "failed", "boom"
    rows[5]["finish_reason"] = "length"
    return pa.Table.from_pylist(rows, schema=CAPTIONS)


CONFIGS = {
    "default": {},
    "strip_all": {"quality": {"actions": {"boilerplate": "strip", "repetition": "strip", "truncated": "strip",
                                          "too_long": "strip"}, "max_words": 120}},
    "sentencizer": {"segmenter": "sentencizer"},
}


def write(out: Path) -> None:
    from pipeline.config import SentencesSection
    from pipeline.sentences import SentenceSplitter

    out.mkdir(parents=True, exist_ok=True)
    table = captions_table()
    for name, cfg in CONFIGS.items():
        result = SentenceSplitter(SentencesSection(**cfg)).split_shard(table)
        pq.write_table(result, out / f"{name}.parquet")
        print(name, result.num_rows, "rows")


def compare(a: Path, b: Path) -> bool:
    same = True
    for name in CONFIGS:
        fa, fb = a / f"{name}.parquet", b / f"{name}.parquet"
        ta, tb = pq.read_table(fa), pq.read_table(fb)
        bytes_same = fa.read_bytes() == fb.read_bytes()
        rows_same = ta.schema == tb.schema and ta.to_pylist() == tb.to_pylist()
        print(f"{name}: {ta.num_rows} rows; byte-identical {bytes_same}; row-identical {rows_same}; "
              f"schema equal {ta.schema == tb.schema}")
        same = same and bytes_same and rows_same
    return same


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", type=Path)
    ap.add_argument("--compare", type=Path, nargs=2)
    args = ap.parse_args()
    if args.write:
        write(args.write)
    if args.compare:
        sys.exit(0 if compare(*args.compare) else 1)


if __name__ == "__main__":
    main()
