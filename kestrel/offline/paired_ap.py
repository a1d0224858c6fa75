"""Whether one scorer's average precision beats another's on the same rows, or is luck: a paired bootstrap.

Shared by the evaluation (Kestrel against each baseline on the test weeks)
and the trainer's selection rule (the stacked layer against the network
alone on the validation window).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _weighted_ap(y_sorted: np.ndarray, weights: np.ndarray, tie_ends: np.ndarray) -> np.ndarray:
    """Average precision of rows already sorted by score (descending), one value per row of ``weights``.

    ``tie_ends`` are the last positions of each run of equal scores: a tie is
    one threshold, as in scikit-learn's ``average_precision_score``.
    """
    tp = np.cumsum(weights * y_sorted, axis=1)[:, tie_ends]
    seen = np.cumsum(weights, axis=1)[:, tie_ends]
    new_tp = np.diff(tp, axis=1, prepend=0.0)
    return (new_tp * tp / np.maximum(seen, 1e-12)).sum(axis=1) / np.maximum(tp[:, -1], 1e-12)


def paired_ap_gain(y: np.ndarray, better: np.ndarray, other: np.ndarray, groups: np.ndarray, *, draws: int = 400,
                   seed: int = 0) -> dict[str, Any]:
    """AP of ``better`` minus AP of ``other`` on the same rows, with a 95% bootstrap interval.

    Resampling is by ``groups`` (cards), with Poisson(1) weights: a card's
    payments, and a spree's frauds, stay together, so the interval is not
    narrowed by treating a card's correlated payments as independent. Both
    models are scored on the same resamples, so their shared difficulty
    cancels and the interval says whether the gain is real or luck. ``se``
    (the resamples' spread) lets independent runs be pooled.

    >>> rng = np.random.default_rng(1); y = (rng.random(4000) < 0.05).astype(int)
    >>> good = y + rng.normal(0, 0.6, 4000); weak = y + rng.normal(0, 1.2, 4000)
    >>> g = paired_ap_gain(y, good, weak, np.arange(4000) // 2)
    >>> g["gain"] > 0.1 and g["ci95"][0] > 0, paired_ap_gain(y, good, good, np.arange(4000))["ci95"]
    (True, [0.0, 0.0])
    """
    y = np.asarray(y, dtype=np.float64)
    codes = np.unique(groups, return_inverse=True)[1]
    rng = np.random.default_rng(seed)
    sorted_views = []
    for s in (np.asarray(better, dtype=np.float64), np.asarray(other, dtype=np.float64)):
        order = np.argsort(-s, kind="stable")
        ranked = s[order]
        sorted_views.append((order, np.flatnonzero(np.r_[ranked[1:] != ranked[:-1], True])))
    gains = []
    for start in range(0, draws, 50):  # 50 resamples at a time bounds memory on long test windows
        w = rng.poisson(1.0, (min(50, draws - start), codes.max() + 1)).astype(np.float64)[:, codes]
        a, b = (_weighted_ap(y[order], w[:, order], ends) for order, ends in sorted_views)
        gains.append(a - b)
    full = [_weighted_ap(y[order], np.ones((1, len(y))), ends)[0] for order, ends in sorted_views]
    drawn = np.concatenate(gains)
    lo, hi = np.percentile(drawn, [2.5, 97.5])
    return {"gain": round(float(full[0] - full[1]), 4), "ci95": [round(float(lo), 4), round(float(hi), 4)],
            "se": round(float(drawn.std(ddof=1)), 5)}
