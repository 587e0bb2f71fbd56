"""Grouping a caption's sentences into sub-captions (pure functions on sentence counts).

A chunk is a half-open range [start, end) of sentence indices, always
consecutive sentences in caption order.

- random_chunks (CAFT training, paper appendix B.2): K chunks of 1, 2 or 3
  sentences with random sizes. "When S > 3K, excess sentences are discarded.
  Conversely, if S < K, sentences are randomly resampled with replacement until
  all chunks are filled." So for K <= S <= 3K every sentence is used, in order,
  with no gaps (the sizes are drawn uniformly among the compositions of S into
  K parts of 1..3). Our readings where the paper is silent: for S > 3K each
  size is drawn from 1..3 and the K chunks are one contiguous run starting at
  a random sentence (the excess is cut from both ends, so a long caption's
  tail is not always the part lost); for S < K
  every sentence is its own chunk and K - S more single sentences are drawn
  with replacement, all in caption order.
- balanced_chunks (CAFT inference): min(K, n) chunks whose lengths differ by at
  most one, the earlier chunks taking the remainder; deterministic.
- sample_subcaptions (DreamLIP / FLAIR style): K sub-captions, each a random
  run of 1..max_len consecutive sentences starting anywhere.
"""

from __future__ import annotations

import random

Chunk = tuple[int, int]


def _compositions(total: int, parts: int, max_len: int) -> list[list[int]]:
    """count[j][r]: the ways to write r as j ordered parts of 1..max_len."""
    count = [[0] * (total + 1) for _ in range(parts + 1)]
    count[0][0] = 1
    for j in range(1, parts + 1):
        for r in range(j, min(total, j * max_len) + 1):
            count[j][r] = sum(count[j - 1][r - s] for s in range(1, min(max_len, r) + 1))
    return count


def random_sizes(total: int, parts: int, rng: random.Random, max_len: int = 3) -> list[int]:
    """`parts` sizes in 1..max_len summing to `total`, uniform over all such compositions."""
    if not parts <= total <= parts * max_len:
        raise ValueError(f"{total} sentences cannot fill {parts} chunks of 1..{max_len}")
    count = _compositions(total, parts, max_len)
    sizes, left = [], total
    for j in range(parts, 0, -1):
        pick = rng.randrange(count[j][left])
        for s in range(1, min(max_len, left) + 1):
            pick -= count[j - 1][left - s]
            if pick < 0:
                break
        sizes.append(s)
        left -= s
    return sizes


def random_chunks(n: int, k: int, rng: random.Random, max_len: int = 3) -> list[Chunk]:
    if n <= 0 or k <= 0:
        return []
    if n < k:  # every sentence once, then K - S resampled with replacement; caption order
        picks = sorted(list(range(n)) + [rng.randrange(n) for _ in range(k - n)])
        return [(i, i + 1) for i in picks]
    if n <= k * max_len:  # every sentence, in order, no gaps
        sizes = random_sizes(n, k, rng, max_len)
    else:  # S > 3K: each size drawn from 1..3; the excess is discarded around one contiguous run
        sizes = [rng.randint(1, max_len) for _ in range(k)]
    start = rng.randint(0, n - sum(sizes))
    out = []
    for size in sizes:
        out.append((start, start + size))
        start += size
    return out


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
