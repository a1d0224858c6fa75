"""Re-ranking for diversity: maximal marginal relevance with a per-category cap.

Retrieval alone returns near-duplicates (one category, one brand); a short
list that covers more of the user's tastes gets more clicks and teaches the
model more. MMR trades relevance against similarity to what is already
picked; the cap is a hard rule product teams ask for ("at most n per category").
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np


def mmr(scores: np.ndarray, vectors: np.ndarray, k: int, lam: float = 0.8,
        categories: Sequence[str] | None = None, max_per_category: int | None = None) -> list[int]:
    """Positions of ``k`` candidates picked greedily by ``lam * score - (1 - lam) * max similarity to picked``.

    ``lam = 1`` keeps the relevance order (only the cap applies). Candidates over
    the cap are skipped while others remain, so the list is never shorter than
    ``min(k, len(scores))``.

    >>> v = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    >>> mmr(np.array([0.9, 0.89, 0.5]), v, 2, lam=0.5)
    [0, 2]
    >>> mmr(np.array([0.9, 0.8, 0.5]), v, 2, lam=1.0, categories=["a", "a", "b"], max_per_category=1)
    [0, 2]
    """
    n = len(scores)
    k = min(k, n)
    if k <= 0:
        return []
    scores = np.asarray(scores, dtype=np.float64)
    sims = np.asarray(vectors, dtype=np.float64) @ np.asarray(vectors, dtype=np.float64).T if lam < 1.0 else None
    max_sim = np.full(n, -np.inf)
    picked: list[int] = []
    available = np.ones(n, dtype=bool)
    per_cat: Counter[str] = Counter()
    while len(picked) < k:
        gain = lam * scores - (1.0 - lam) * np.where(np.isfinite(max_sim), max_sim, 0.0) if sims is not None \
            else scores.copy()
        gain = np.where(available, gain, -np.inf)
        if categories is not None and max_per_category is not None:
            capped = np.array([per_cat[c] >= max_per_category for c in categories])
            if np.any(available & ~capped):
                gain = np.where(capped, -np.inf, gain)
        best = int(np.argmax(gain))
        picked.append(best)
        available[best] = False
        if categories is not None:
            per_cat[categories[best]] += 1
        if sims is not None:
            max_sim = np.maximum(max_sim, sims[best])
    return picked
