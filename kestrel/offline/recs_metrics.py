"""Ranking metrics of recommendation lists against held-out items (``kestrel eval recs``, the hybrid's rule)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def ranking_metrics(rankings: Sequence[Sequence[int]], relevant: Sequence[set[int]], n_items: int) -> dict[str, float]:
    """Recall@10/@20, NDCG@10 and coverage@10 of ranked item rows against each user's relevant rows.

    >>> m = ranking_metrics([[1, 2, 3]], [{2}], 10)
    >>> m["recall_at_10"], round(m["ndcg_at_10"], 4), m["coverage_at_10"]
    (1.0, 0.6309, 0.3)
    """
    r10, r20, ndcg = [], [], []
    covered: set[int] = set()
    discounts = 1.0 / np.log2(np.arange(2, 12))
    for ranked, rel in zip(rankings, relevant, strict=True):
        top10, top20 = list(ranked[:10]), list(ranked[:20])
        covered.update(top10)
        r10.append(len(rel.intersection(top10)) / min(10, len(rel)))
        r20.append(len(rel.intersection(top20)) / min(20, len(rel)))
        dcg = sum(discounts[i] for i, item in enumerate(top10) if item in rel)
        ndcg.append(dcg / discounts[: min(10, len(rel))].sum())
    return {"recall_at_10": float(np.mean(r10)), "recall_at_20": float(np.mean(r20)),
            "ndcg_at_10": float(np.mean(ndcg)), "coverage_at_10": len(covered) / max(n_items, 1)}


def recall_curve(rankings: Sequence[Sequence[int]], relevant: Sequence[set[int]], max_k: int = 20) -> list[float]:
    """Recall@K for K = 1..max_k, as ``ranking_metrics`` defines it (hits in the top K / min(K, relevant)).

    >>> recall_curve([[5, 1, 2]], [{1, 2}], max_k=3)
    [0.0, 0.5, 1.0]
    """
    curve = np.zeros(max_k)
    for ranked, rel in zip(rankings, relevant, strict=True):
        if not rel:
            continue
        hits = np.cumsum([item in rel for item in list(ranked[:max_k])] + [False] * max(0, max_k - len(ranked)))
        curve += hits[:max_k] / np.minimum(np.arange(1, max_k + 1), len(rel))
    return [round(float(v), 4) for v in curve / max(len(rankings), 1)]


def per_user_recall(rankings: Sequence[Sequence[int]], relevant: Sequence[set[int]], k: int = 20) -> np.ndarray:
    """Each user's Recall@K, as ``ranking_metrics`` averages it.

    >>> per_user_recall([[1, 2], [3]], [{2}, {4, 5}], k=2).tolist()
    [1.0, 0.0]
    """
    return np.asarray([len(rel.intersection(list(r[:k]))) / min(k, len(rel))
                       for r, rel in zip(rankings, relevant, strict=True)], dtype=np.float64)


def paired_mean_gain(better: np.ndarray, other: np.ndarray, draws: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Mean of ``better`` minus mean of ``other`` over the same users, with a 95% bootstrap interval (users
    resampled with Poisson(1) weights, both lists on the same resamples).

    >>> a = np.r_[np.ones(300), np.zeros(700)]; b = np.r_[np.ones(200), np.zeros(800)]
    >>> g = paired_mean_gain(a, b); g["gain"], g["ci95"][0] > 0
    (0.1, True)
    """
    diff = np.asarray(better, dtype=np.float64) - np.asarray(other, dtype=np.float64)
    w = np.random.default_rng(seed).poisson(1.0, (draws, len(diff))).astype(np.float64)
    drawn = (w @ diff) / np.maximum(w.sum(axis=1), 1e-12)
    lo, hi = np.percentile(drawn, [2.5, 97.5])
    return {"gain": round(float(diff.mean()), 4), "ci95": [round(float(lo), 4), round(float(hi), 4)]}
