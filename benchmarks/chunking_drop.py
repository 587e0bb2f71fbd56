"""Training chunker: the fraction of a caption's sentences that no chunk uses (CAFT appendix B.2).

Compares the previous chunker (partition left to right into chunks of 1..3, then keep a random K of
them; kept here as `previous_random_chunks` only for this comparison) with `pipeline.chunking.random_chunks`
on (1) the synthetic world's captions (pipeline/synthetic.py), (2) the caption fixtures of the tests
(importers and benchmark readers) and (3) captions of S = 1..20 sentences. Per caption: dropped =
1 - distinct sentences used / S; reported sentence-weighted over captions x seeds, split by S < K,
K <= S <= 3K (where B.2 uses every sentence) and S > 3K (where B.2 discards the excess).

    python benchmarks/chunking_drop.py [--k 4] [--seeds 20]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.chunking import random_chunks  # noqa: E402


def previous_random_chunks(n: int, k: int, rng: random.Random, max_len: int = 3):
    """The chunker before issue 17 (commit 423767e), for the comparison only."""
    chunks, i = [], 0
    while i < n:
        size = rng.randint(1, min(max_len, n - i))
        chunks.append((i, i + size))
        i += size
    if len(chunks) > k:
        keep = sorted(rng.sample(range(len(chunks)), k))
        return [chunks[j] for j in keep]
    return chunks + [chunks[rng.randrange(len(chunks))] for _ in range(k - len(chunks))]


def synthetic_counts(n_families: int = 200, variants: int = 3) -> list[int]:
    from pipeline.synthetic import families, sentences

    return [len(sentences(s)) for fam in families(n_families, variants, seed=0) for s in fam]


def fixture_counts() -> list[int]:
    """Sentence counts of the tests' caption fixtures, split as the sentences stage does (spaCy)."""
    from tests import test_evaluate as te
    from tests import test_importers as ti

    texts = [ti.LONG, ti.LONG + " SV", ti.LONG + " LLA", te.LONG, *[te._caption(c) for c in te.COLOURS],
             te._caption("red", te.LONG)]
    from model.evaluate import split_captions

    return [len(s) for s in split_captions(texts)]


def dropped(fn, counts: list[int], k: int, seeds: int) -> dict:
    groups = {"S<K": [0, 0], "K<=S<=3K": [0, 0], "S>3K": [0, 0], "all": [0, 0]}
    for seed in range(seeds):
        for j, n in enumerate(counts):
            rng = random.Random(f"{seed}:{j}")
            used = {i for a, b in fn(n, k, rng) for i in range(a, b)}
            g = "S<K" if n < k else ("S>3K" if n > 3 * k else "K<=S<=3K")
            for key in (g, "all"):
                groups[key][0] += n - len(used)
                groups[key][1] += n
    return {g: (d / t if t else None) for g, (d, t) in groups.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=20)
    args = ap.parse_args()
    sets = {"synthetic world (200 families x 3)": synthetic_counts(), "test fixtures": fixture_counts(),
            "S = 1..20, one each": list(range(1, 21)), "S = 11 (DCI-like)": [11]}
    print(f"K = {args.k}, {args.seeds} seeds; dropped-sentence fraction (sentence-weighted)")
    print("| captions | S range | before: S<K | K<=S<=3K | S>3K | all | after: S<K | K<=S<=3K | S>3K | all |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for name, counts in sets.items():
        b, a = dropped(previous_random_chunks, counts, args.k, args.seeds), dropped(random_chunks, counts, args.k,
                                                                                  args.seeds)
        keys = ("S<K", "K<=S<=3K", "S>3K", "all")
        print(f"| {name} ({len(counts)}) | {min(counts)}..{max(counts)} | " + " | ".join(fmt(b[x]) for x in keys)
              + " | " + " | ".join(fmt(a[x]) for x in keys) + " |")


if __name__ == "__main__":
    main()
