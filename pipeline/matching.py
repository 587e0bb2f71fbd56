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
