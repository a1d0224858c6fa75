"""Decision policy: from a calibrated fraud probability to allow / review / block.

An operator sets fixed thresholds, or an alert budget ("at most 300 reviews a
day") that is turned into a review threshold from the score distribution the
model produced on its validation traffic.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from kestrel.models.scoring import Thresholds


@dataclass(frozen=True)
class Policy:
    """Either ``review`` or ``alerts_per_day`` sets the review threshold; ``block`` is a probability.

    >>> ref = np.linspace(0, 1, 1001)
    >>> Policy(alerts_per_day=100).thresholds(ref, payments_per_day=1000)  # top 10% go to review
    Thresholds(review=0.9, block=0.9)
    >>> Policy(review=0.3, block=0.8).thresholds(ref, 1000)
    Thresholds(review=0.3, block=0.8)
    """

    review: float | None = None
    block: float = 0.9
    alerts_per_day: float | None = None

    @staticmethod
    def from_env(name: str = "KESTREL_FRAUD_POLICY") -> Policy:
        """``{"alerts_per_day": 300, "block": 0.95}`` or ``{"review": 0.4, "block": 0.9}``; default review 0.5."""
        raw = os.environ.get(name)
        return Policy.from_json(raw) if raw else Policy(review=0.5)

    @staticmethod
    def from_json(raw: str) -> Policy:
        doc = json.loads(raw)
        unknown = set(doc) - {"review", "block", "alerts_per_day"}
        if unknown:
            raise ValueError(f"unknown policy fields: {sorted(unknown)}")
        return Policy(**doc)

    def thresholds(self, reference_scores: np.ndarray, payments_per_day: float) -> Thresholds:
        if self.alerts_per_day is not None and len(reference_scores):
            share = min(max(self.alerts_per_day / max(payments_per_day, 1e-9), 0.0), 1.0)
            review = float(np.quantile(reference_scores, 1.0 - share)) if share > 0 else 1.0
        else:
            review = 0.5 if self.review is None else self.review
        return Thresholds(review=round(review, 6), block=max(self.block, round(review, 6)))
