import random

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.chunking import balanced_chunks, chunk_texts, random_chunks, sample_subcaptions


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 60), k=st.integers(1, 12), seed=st.integers(0, 2**32))
def test_random_chunks_constraints(n, k, seed):
    chunks = random_chunks(n, k, random.Random(seed))
    assert len(chunks) == k
    for a, b in chunks:
        assert 0 <= a < b <= n and 1 <= b - a <= 3
    distinct = list(dict.fromkeys(chunks))
    # chunks never overlap: they come from one left-to-right partition
    for (a, b), (c, d) in zip(sorted(distinct), sorted(distinct)[1:]):
        assert b <= c
    if len(distinct) == k:  # no resampling needed: kept in caption order
        assert chunks == sorted(chunks)
    assert random_chunks(n, k, random.Random(seed)) == chunks  # seeded


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
    assert len(few) == 5 and set(few) <= {(0, 1), (1, 2), (0, 2)}
    many = random_chunks(40, 4, rng)
    assert len(many) == 4 and sum(b - a for a, b in many) < 40
    assert chunk_texts(["A.", "B.", "C."], [(0, 2), (2, 3)]) == ["A. B.", "C."]
