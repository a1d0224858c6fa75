"""Two fraud model versions on the same live payments: the served one and its shadow, from the decision log.

A worker with a ``shadow`` alias scores every payment with both versions and
logs the shadow's score and action beside the decision (``shadow`` in the
decision document); nothing acts on them. Joined to the labels that came
back (``training.examples``), this reports how often the two agree, how
their scores are spread, and, on the labelled payments, each one's average
precision and alert precision, on exactly the same events.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def compare_shadow(decisions: Sequence[Mapping[str, Any]], examples: Sequence[Mapping[str, Any]],
                   a: str, b: str) -> dict[str, Any]:
    """Version ``a`` against version ``b`` on the payments one served while the other shadowed.

    >>> d = [{"type": "fraud_decision", "event_id": str(i), "model_version": "v1", "score": s, "action": act,
    ...       "shadow": {"model_version": "v2", "score": t, "action": act2}}
    ...      for i, (s, act, t, act2) in enumerate([(0.9, "review", 0.8, "review"), (0.1, "allow", 0.6, "review"),
    ...                                             (0.2, "allow", 0.1, "allow")])]
    >>> r = compare_shadow(d, [{"transaction_id": "0", "label": 1}, {"transaction_id": "1", "label": 0}], "v1", "v2")
    >>> r["events"], r["action_agreement"], r["labelled"], r["versions"]["v1"]["alert_precision"]
    (3, 0.6667, 2, 1.0)
    """
    from scipy.stats import spearmanr
    from sklearn.metrics import average_precision_score

    pairs: dict[str, tuple[float, str, float, str]] = {}  # event -> (a's score, a's action, b's score, b's action)
    for d in decisions:
        shadow = d.get("shadow")
        if d.get("type") != "fraud_decision" or not shadow:
            continue
        served, other = d.get("model_version"), shadow.get("model_version")
        if (served, other) == (a, b):
            pairs[d["event_id"]] = (d["score"], d["action"], shadow["score"], shadow["action"])
        elif (served, other) == (b, a):
            pairs[d["event_id"]] = (shadow["score"], shadow["action"], d["score"], d["action"])
    labels = {e["transaction_id"]: int(e["label"]) for e in examples if e.get("transaction_id") in pairs}
    report: dict[str, Any] = {"a": a, "b": b, "events": len(pairs), "labelled": len(labels)}
    if not pairs:
        report["note"] = f"no payment was decided by one of {a}, {b} with the other as its shadow"
        return report
    sa, acts_a, sb, acts_b = (np.array(col) for col in zip(*pairs.values(), strict=True))
    report["action_agreement"] = round(float((acts_a == acts_b).mean()), 4)
    report["score_rank_correlation"] = round(float(spearmanr(sa, sb).statistic), 4) if len(pairs) > 2 else None
    versions: dict[str, dict[str, Any]] = {}
    ids = list(pairs)
    y = np.array([labels.get(i, -1) for i in ids])
    known = y >= 0
    for name, scores, acts in ((a, sa, acts_a), (b, sb, acts_b)):
        q = np.quantile(scores, [0.5, 0.9, 0.99])
        alerted = (acts != "allow") & known
        m: dict[str, Any] = {"mean_score": round(float(scores.mean()), 5),
                             "score_p50": round(float(q[0]), 5), "score_p90": round(float(q[1]), 5),
                             "score_p99": round(float(q[2]), 5),
                             "alert_rate": round(float((acts != "allow").mean()), 5)}
        if known.any():
            m["alert_precision"] = round(float(y[alerted].mean()), 4) if alerted.any() else None
            m["frauds_alerted"] = int((y[alerted] == 1).sum())
            both = 0 < y[known].sum() < known.sum()
            m["average_precision"] = round(float(average_precision_score(y[known], scores[known])), 4) if both \
                else None
        versions[name] = m
    report["versions"] = versions
    return report
