"""Grouping a caption's sentences into sub-captions (pure functions on sentence counts).

A chunk is a half-open range [start, end) of sentence indices, always
consecutive sentences in caption order.

- random_chunks (CAFT training): partition the sentences left to right into
  chunks of 1..max_len sentences with random lengths; keep K of them (a random
  subset, in order) when there are more, resample chunks with replacement when
  there are fewer.
- balanced_chunks (CAFT inference): min(K, n) chunks whose lengths differ by at
  most one, the earlier chunks taking the remainder; deterministic.
- sample_subcaptions (DreamLIP / FLAIR style): K sub-captions, each a random
  run of 1..max_len consecutive sentences starting anywhere.
"""

from __future__ import annotations

import random

Chunk = tuple[int, int]


def random_chunks(n: int, k: int, rng: random.Random, max_len: int = 3) -> list[Chunk]:
    if n <= 0 or k <= 0:
        return []
    chunks, i = [], 0
    while i < n:
        size = rng.randint(1, min(max_len, n - i))
        chunks.append((i, i + size))
        i += size
    if len(chunks) > k:
        keep = sorted(rng.sample(range(len(chunks)), k))
        return [chunks[j] for j in keep]
    return chunks + [chunks[rng.randrange(len(chunks))] for _ in range(k - len(chunks))]


def balanced_chunks(n: int, k: int) -> list[Chunk]:
    if n <= 0 or k <= 0:
        return []
    m = min(k, n)
    base, rem = divmod(n, m)
    out, start = [], 0
    for i in range(m):
        size = base + (1 if i < rem else 0)
        out.append((start, start + size))
        start += size
    return out


def sample_subcaptions(n: int, k: int, rng: random.Random, max_len: int = 3) -> list[Chunk]:
    if n <= 0 or k <= 0:
        return []
    out = []
    for _ in range(k):
        size = rng.randint(1, min(max_len, n))
        start = rng.randint(0, n - size)
        out.append((start, start + size))
    return out


def chunk_texts(sentences: list[str], chunks: list[Chunk]) -> list[str]:
    return [" ".join(sentences[a:b]) for a, b in chunks]
