"""Region x sentence score matrix -> one best region per sentence, kept by threshold and margin."""

from __future__ import annotations

import numpy as np


def select_pairs(scores: np.ndarray, threshold: float, margin: float, top_k: int) -> list[dict]:
    """Per sentence (column of `scores`, regions are rows): best region, its margin over the runner-up, kept or not.

    Ties go to the lowest region index (a stable sort), and a tie never passes the margin test:
    a pair is kept when score >= threshold and score - runner_up > margin.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be a regions x sentences matrix, got shape {scores.shape}")
    n_regions, n_sentences = scores.shape
    if n_regions == 0:
        return [{"region": None, "score": None, "margin": None, "kept": False, "top_regions": [], "top_scores": []}
                for _ in range(n_sentences)]
    order = np.argsort(-scores, axis=0, kind="stable")  # regions by score, per sentence
    out = []
    for j in range(n_sentences):
        ranked = order[:, j]
        best = float(scores[ranked[0], j])
        gap = best - float(scores[ranked[1], j]) if n_regions > 1 else None
        kept = best >= threshold and (gap is None or gap > margin)
        top = ranked[:top_k]
        out.append({"region": int(ranked[0]), "score": best, "margin": gap, "kept": bool(kept),
                    "top_regions": [int(i) for i in top], "top_scores": [float(scores[i, j]) for i in top]})
    return out


def union_box(a: list[float], b: list[float]) -> list[float]:
    """The smallest box holding both (normalised xyxy)."""
    return [min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])]


def select_two(first: np.ndarray, second: np.ndarray, threshold: float, margin: float,
               allowed: np.ndarray | None = None) -> dict:
    """A relation's two objects: regions i != j maximising (first[i] + second[j]) / 2, each phrase's own scores.

    allowed: an n x n boolean matrix of the (i, j) that may be the two objects (default: every i != j).
    The pair is kept when that mean is >= threshold and beats the next-best allowed (i, j) by more than margin.
    Returns {'regions': (i, j) or None, 'score', 'margin', 'kept', 'scores': (first[i], second[j])}.
    """
    first, second = np.asarray(first, np.float64), np.asarray(second, np.float64)
    n = len(first)
    none = {"regions": None, "score": None, "margin": None, "kept": False, "scores": ()}
    if n < 2:
        return none
    total = (first[:, None] + second[None, :]) / 2
    np.fill_diagonal(total, -np.inf)
    if allowed is not None:
        total[~np.asarray(allowed, bool)] = -np.inf
    flat = np.argsort(-total, axis=None, kind="stable")
    i, j = divmod(int(flat[0]), n)
    best = float(total[i, j])
    if best == -np.inf:
        return none
    runner_up = float(total.flat[flat[1]])
    gap = best - runner_up if runner_up > -np.inf else None
    kept = best >= threshold and (gap is None or gap > margin)
    return {"regions": (i, j), "score": best, "margin": gap, "kept": bool(kept),
            "scores": (float(first[i]), float(second[j]))}


def assign_one_to_one(scores: np.ndarray, threshold: float, margin: float, top_k: int) -> list[dict]:
    """Sentences (columns) to distinct regions (rows), the assignment with the highest total score (scipy's
    linear_sum_assignment). A sentence's margin is how much the total drops when it may not take its region (the
    best assignment without that one pair); kept when its score is >= threshold and that margin > margin. With more
    sentences than regions, the sentences left without a region get their own best region, not kept.
    Same result shape as select_pairs (top_regions / top_scores: the sentence's own ranking)."""
    from scipy.optimize import linear_sum_assignment

    scores = np.asarray(scores, dtype=np.float64)
    out = select_pairs(scores, threshold, margin, top_k)
    n_regions, n_sentences = scores.shape
    if n_regions == 0 or n_sentences < 2:
        return out
    rows, cols = linear_sum_assignment(scores, maximize=True)
    total = float(scores[rows, cols].sum())
    taken = dict(zip(cols.tolist(), rows.tolist()))
    for j in range(n_sentences):
        if j not in taken:
            out[j]["kept"] = False
            continue
        i = taken[j]
        forbidden = scores.copy()
        forbidden[i, j] = -1e9  # the best assignment without this pair
        r2, c2 = linear_sum_assignment(forbidden, maximize=True)
        gap = total - float(forbidden[r2, c2].sum()) if n_regions > 1 else None
        best = float(scores[i, j])
        out[j].update(region=int(i), score=best, margin=gap,
                      kept=bool(best >= threshold and (gap is None or gap > margin)))
    return out
