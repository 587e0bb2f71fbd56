import random

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.chunking import balanced_chunks, chunk_texts, random_chunks, sample_subcaptions


@settings(max_examples=400, deadline=None)
@given(n=st.integers(1, 60), k=st.integers(1, 12), seed=st.integers(0, 2**32))
def test_random_chunks_follow_appendix_b2(n, k, seed):
    chunks = random_chunks(n, k, random.Random(seed))
    assert len(chunks) == k
    assert all(0 <= a < b <= n and 1 <= b - a <= 3 for a, b in chunks)
    assert chunks == sorted(chunks)  # caption order
    used = [i for a, b in chunks for i in range(a, b)]
    if k <= n <= 3 * k:  # every sentence, once, in order, no gaps
        assert used == list(range(n))
    elif n < k:  # every sentence, then resampled ones (single sentences) until K chunks are filled
        assert set(used) == set(range(n)) and all(b - a == 1 for a, b in chunks)
    else:  # S > 3K: one contiguous run, the excess discarded
        assert used == list(range(used[0], used[-1] + 1))
    assert random_chunks(n, k, random.Random(seed)) == chunks  # seeded


def test_random_chunk_sizes_are_uniform_over_compositions():
    from collections import Counter

    from pipeline.chunking import random_sizes

    rng = random.Random(0)
    seen = Counter(tuple(random_sizes(6, 3, rng)) for _ in range(7000))
    # the compositions of 6 into 3 parts of 1..3: 7 of them, each about 1/7
    assert set(seen) == {(1, 2, 3), (1, 3, 2), (2, 1, 3), (2, 3, 1), (3, 1, 2), (3, 2, 1), (2, 2, 2)}
    assert all(850 < c < 1150 for c in seen.values())
    sizes = Counter(b - a for _ in range(2000) for a, b in random_chunks(40, 4, rng))
    assert set(sizes) == {1, 2, 3} and min(sizes.values()) > 2000  # S > 3K: each size 1..3 at random


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 80), k=st.integers(1, 12))
def test_balanced_chunks_even_ordered_complete(n, k):
    chunks = balanced_chunks(n, k)
    assert len(chunks) == min(n, k)
    assert chunks[0][0] == 0 and chunks[-1][1] == n
    assert all(b == c for (_, b), (c, _) in zip(chunks, chunks[1:]))  # contiguous, in order, covering all
    sizes = [b - a for a, b in chunks]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)  # earlier take the remainder
    assert balanced_chunks(n, k) == chunks


def test_balanced_examples():
    assert balanced_chunks(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert balanced_chunks(2, 4) == [(0, 1), (1, 2)]
    assert balanced_chunks(0, 4) == []


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(1, 10), seed=st.integers(0, 2**32))
def test_subcaption_sampling(n, k, seed):
    subs = sample_subcaptions(n, k, random.Random(seed), max_len=3)
    assert len(subs) == k and all(0 <= a < b <= n and b - a <= 3 for a, b in subs)


def test_random_chunks_resample_when_few_and_drop_when_many():
    rng = random.Random(0)
    few = random_chunks(2, 5, rng)
    assert len(few) == 5 and {(0, 1), (1, 2)} == set(few)
    many = random_chunks(40, 4, rng)
    assert len(many) == 4 and 4 <= sum(b - a for a, b in many) <= 12
    assert random_chunks(11, 4, random.Random(3))[0][0] == 0  # S = 11 <= 3K: nothing dropped
    assert chunk_texts(["A.", "B.", "C."], [(0, 2), (2, 3)]) == ["A. B.", "C."]


def test_loader_chunks_never_exceed_k_positions():
    """The loader's long caption: K chunks in training (B.2), at most K balanced ones in evaluation, so the
    whole-caption encoder sees positions 0..K-1 only, in both."""
    from model.data import DataConfig, pick_texts

    sents = [f"Sentence {i}." for i in range(30)]
    caps = [{"sentences": sents}, {"sentences": ["Other one.", "Other two."]}]
    texts, k = pick_texts(caps, random.Random(0), DataConfig(train=False, k_chunks=4, n_sub=4))
    assert k == 4 and texts == [" ".join(sents[a:b]) for a, b in [(0, 8), (8, 16), (16, 23), (23, 30)]]
    nine = [{"sentences": sents[:9]}]  # K <= S <= 3K: every sentence of the long caption, in order, each time
    for seed in range(20):
        texts, k = pick_texts(nine, random.Random(seed), DataConfig(train=True, k_chunks=4, n_sub=6))
        assert k == 4 and len(texts) == 6 and " ".join(texts[:4]) == " ".join(sents[:9])
