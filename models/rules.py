"""Baseline fraud scorer: transparent rules on amount and card velocity.

An honest starting point that later model-based scorers must beat; each rule
that fires adds its weight and a reason with the value that triggered it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from models.scoring import FraudScore, Reason, Thresholds


@dataclass(frozen=True)
class RuleConfig:
    large_amount: float = 1000.0
    amount_vs_mean: float = 5.0
    min_history: int = 3
    burst_10m: int = 6
    card_testing_small_10m: int = 3
    rapid_seconds: float = 10.0


def card_features(amount: float, event_ts: float, raw: Mapping[str, float | None]) -> dict[str, float]:
    """Derive model-ready values from the stored snapshot (which includes this event).

    >>> f = card_features(50.0, 1000.0, {"txn_count_24h": 3, "amount_sum_24h": 90.0, "prev_txn_ts": 990.0})
    >>> f["mean_amount_24h_before"], f["seconds_since_prev"]
    (20.0, 10.0)
    """
    out = {k: float(v) for k, v in raw.items() if v is not None and k != "prev_txn_ts"}
    count_before = max(out.get("txn_count_24h", 1.0) - 1.0, 0.0)
    sum_before = max(out.get("amount_sum_24h", amount) - amount, 0.0)
    out["amount"] = amount
    out["txn_count_24h_before"] = count_before
    out["mean_amount_24h_before"] = sum_before / count_before if count_before else 0.0
    prev = raw.get("prev_txn_ts")
    out["seconds_since_prev"] = max(event_ts - float(prev), 0.0) if prev is not None else -1.0
    return out


class RuleScorer:
    """Scores with fixed rules; ``version`` names the rule set in every decision."""

    version = "rules-v1"

    def __init__(self, config: RuleConfig | None = None, thresholds: Thresholds | None = None) -> None:
        self.config = config or RuleConfig()
        self.thresholds = thresholds or Thresholds(review=0.5, block=0.8)

    def score_one(self, f: Mapping[str, float]) -> FraudScore:
        """
        >>> s = RuleScorer().score_one({"amount": 5000.0, "txn_count_10m": 1})
        >>> s.action, [r.code for r in s.reasons]
        ('review', ['large_amount'])
        """
        c = self.config
        reasons: list[tuple[float, Reason]] = []
        amount = f.get("amount", 0.0)
        if amount >= c.large_amount:
            reasons.append((0.5, Reason("large_amount", f"amount {amount:.2f} ≥ {c.large_amount:.0f}", amount)))
        mean = f.get("mean_amount_24h_before", 0.0)
        if f.get("txn_count_24h_before", 0.0) >= c.min_history and mean > 0 and amount >= c.amount_vs_mean * mean:
            ratio = amount / mean
            reasons.append((0.35, Reason("amount_vs_history", f"amount {ratio:.1f}× this card's 24h mean", ratio)))
        burst = f.get("txn_count_10m", 0.0)
        if burst >= c.burst_10m:
            reasons.append((0.35, Reason("velocity_10m", f"{burst:.0f} payments in 10 minutes", burst)))
        small = f.get("small_txn_count_10m", 0.0)
        if small >= c.card_testing_small_10m:
            reasons.append((0.5, Reason("card_testing", f"{small:.0f} small payments in 10 minutes", small)))
        since = f.get("seconds_since_prev", -1.0)
        if 0 <= since < c.rapid_seconds:
            reasons.append((0.15, Reason("rapid_repeat", f"{since:.1f}s after the previous payment", since)))
        score = min(sum(w for w, _ in reasons), 1.0)
        ordered = tuple(r for _, r in sorted(reasons, key=lambda wr: -wr[0]))
        return FraudScore(score=round(score, 4), action=self.thresholds.action(score), reasons=ordered)

    def score_batch(self, events: Sequence[object], features: Sequence[Mapping[str, float]]) -> list[FraudScore]:
        return [self.score_one(f) for f in features]
