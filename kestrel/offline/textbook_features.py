"""The textbook card-fraud features, as a baseline's inputs: what a practitioner starts from.

Why a baseline: Kestrel's inputs must carry at least what the textbook
feature set carries. The same split with these features and a random forest
is the reference any Kestrel change is held to. The set: the amount, weekend
and night flags; the card's payment count and mean amount over the last 1,
7 and 30 days (this payment included); the terminal's payment count and
fraud rate over 1, 7 and 30 days ending one label delay before the payment
(every payment's outcome is known by then).

Pure numpy: exact time windows in seconds, by sorted search per entity.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

DAY = 86400
WINDOWS_DAYS = (1, 7, 30)
NAMES = ("amount", "weekend", "night",
         *(f"card_{k}_{d}d" for d in WINDOWS_DAYS for k in ("count", "mean_amount")),
         *(f"terminal_{k}_{d}d_delayed" for d in WINDOWS_DAYS for k in ("count", "risk")))


class _Windows:
    """Sums over time windows of one entity's earlier rows: one sorted search per window edge."""

    def __init__(self, entity: np.ndarray, t: np.ndarray) -> None:
        self.codes = pd.factorize(entity)[0].astype(np.int64)
        self.order = np.lexsort((np.arange(len(t)), t, self.codes))
        span = int(t.max() - t.min()) + 10 * 365 * DAY if len(t) else 1
        self.span, self.t0 = span, float(t.min()) if len(t) else 0.0
        self.keys = self.codes[self.order] * span + (t[self.order] - self.t0)

    def sums(self, values: np.ndarray, start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per row: count and sum of ``values`` over the same entity's rows with start < time <= end."""
        cum = np.concatenate([[0.0], np.cumsum(values[self.order])])
        base = self.codes * self.span - self.t0
        lo = np.searchsorted(self.keys, base + start, side="right")
        hi = np.searchsorted(self.keys, base + end, side="right")
        return (hi - lo).astype(float), cum[hi] - cum[lo]


def textbook_features(card: np.ndarray, terminal: np.ndarray, amount: np.ndarray, t: np.ndarray,
                      is_fraud: np.ndarray, delay_s: float) -> np.ndarray:
    """The (n, len(NAMES)) matrix, point-in-time: terminal risk reads only outcomes a delay old.

    >>> t = np.array([0.0, 3600.0, 9 * DAY, 9 * DAY + 60])
    >>> x = textbook_features(np.array(["c", "c", "c", "d"]), np.array(["t", "t", "t", "t"]),
    ...                       np.array([10.0, 30.0, 50.0, 5.0]), t, np.array([0, 1, 0, 0]), 7 * DAY)
    >>> x[1, NAMES.index("card_count_1d")].item(), x[1, NAMES.index("card_mean_amount_1d")].item()
    (2.0, 20.0)
    >>> x[2, NAMES.index("terminal_count_7d_delayed")].item(), x[3, NAMES.index("terminal_risk_7d_delayed")].item()
    (2.0, 0.5)
    """
    at = pd.to_datetime(t, unit="s", utc=True)
    cols = [amount, np.asarray(at.day_of_week >= 5, float), np.asarray(at.hour < 6, float)]
    cards, terminals = _Windows(card, t), _Windows(terminal, t)
    for d in WINDOWS_DAYS:
        n, s = cards.sums(amount, t - d * DAY, t)
        cols += [n, np.where(n > 0, s / np.maximum(n, 1), 0.0)]
    for d in WINDOWS_DAYS:
        n, frauds = terminals.sums(is_fraud.astype(float), t - delay_s - d * DAY, t - delay_s)
        cols += [n, np.where(n > 0, frauds / np.maximum(n, 1), 0.0)]
    return np.column_stack(cols).astype(np.float64)
