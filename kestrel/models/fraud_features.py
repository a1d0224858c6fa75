"""The fraud models' inputs: one numeric vector per payment, and how to explain each input.

The stream path and the offline trainer both build a payment's feature dict
(the stored feature vector plus :func:`derive` and :func:`payment_context`),
and both turn it into model inputs here, so training and serving cannot
drift apart. Each input knows how to say what its value means, so reason
codes come from the model's attributions with the payment's own numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from kestrel.feature_store.sets import TERMINAL_MATURED

MONTH_S = 30 * 86400.0
NIGHT_END_HOUR = 6  # 00:00-05:59 UTC: payments of the small hours


def payment_context(epoch_s: float, card_present: bool | None, device_id: str | None) -> dict[str, float]:
    """Facts of the payment itself that the stored features do not hold.

    >>> payment_context(1767225600.0 + 3 * 3600, False, "d1")  # Thursday 2026-01-01 03:00 UTC
    {'hour_utc': 3.0, 'weekday': 3.0, 'card_present': 0.0, 'has_device': 1.0}
    """
    whole = math.floor(epoch_s)
    if epoch_s - whole > 0.999998:  # datetime rounds to the microsecond: this one may reach the next hour
        at = datetime.fromtimestamp(epoch_s, UTC)
        hour, weekday = at.hour, at.weekday()
    else:  # the calendar's arithmetic, without a datetime per payment (1970-01-01 was a Thursday: 3)
        hour, weekday = whole // 3600 % 24, (whole // 86400 + 3) % 7
    present = -1.0 if card_present is None else float(card_present)
    return {"hour_utc": float(hour), "weekday": float(weekday), "card_present": present,
            "has_device": float(device_id is not None)}


def payment_features(amount: float, epoch_s: float, card_present: bool | None, device_id: str | None,
                     vector: Mapping[str, object]) -> dict[str, object]:
    """The feature dict of one payment: stored vector + derived values + the payment's own context.

    The one function both the stream path and the offline trainer call, so a
    decision logs exactly what a retrain will be fed.
    """
    from kestrel.models.rules import derive

    features: dict[str, object] = derive(amount, vector)  # type: ignore[arg-type, assignment]
    features.update(payment_context(epoch_s, card_present, device_id))  # in place: a payment's dict is copied once
    features["prev_terminal"] = vector.get("prev_terminal", "")
    return features


# Input functions take a feature dict (one payment: floats) or a :class:`Columns` (a batch: arrays), so the
# stream path computes a whole micro-batch with numpy while explanations read one payment's values.
def _log(x: Any) -> Any:
    return np.log1p(np.maximum(x, 0.0))


def _z(f: Any) -> Any:
    std = np.maximum(f.get("amount_std_30d", 0.0), 1.0)
    z = np.clip((f.get("amount", 0.0) - f.get("amount_mean_30d_before", 0.0)) / std, -20.0, 20.0)
    return np.where(f.get("txn_count_30d_before", 0.0) < 2, 0.0, z)


def _since(f: Any) -> Any:
    s = f.get("seconds_since_prev", -1.0)
    return _log(np.where(s >= 0, s, MONTH_S))


def _spend_ratio(f: Any) -> Any:
    return f.get("amount_sum_1h", 0.0) / np.maximum(f.get("amount_mean_30d_before", 0.0), 1.0)


def _new_device(f: Any) -> Any:
    return (f.get("has_device", 0.0) > 0) & (f.get("card_device_seconds_since_prev", -1.0) < 0)


def _device_payments_before(f: Any) -> Any:
    """Earlier payments from this card's device in 30 days; a card-present payment counts as a known device."""
    before = np.maximum(f.get("card_device_txn_count_30d", 1.0) - 1.0, 0.0)
    return np.where(f.get("has_device", 0.0) <= 0, 30.0, before)


def _ratio(f: Any, num: str, den: str) -> Any:
    """``num / den`` where ``den`` is positive, else 0 (no history to compare with)."""
    d = f.get(den, 0.0)
    return np.where(d > 0, f.get(num, 0.0) / np.maximum(d, 1e-9), 0.0)


_SPAN = {"1d": "1 day", "7d": "7 days", "30d": "30 days"}


def _vs_own_mean(label: str) -> ModelInput:
    """This payment's amount against the card's own mean over a horizon (this payment included)."""
    mean = f"amount_mean_{label}"
    return _input(f"amount_vs_mean_{label}", lambda f: _log(np.minimum(_ratio(f, "amount", mean), 1000.0)),
                  lambda f: (f"amount {_ratio(f, 'amount', mean):.1f}× this card's {label} mean "
                             f"({f.get(mean, 0.0):,.2f}, this payment included)"),
                  lambda f: _ratio(f, "amount", mean))


def _terminal_rate(label: str) -> ModelInput:
    """The terminal's fraud rate over one matured window: frauds / all its payments there."""
    rate, frauds, payments = (f"terminal_fraud_rate_{label}_d7", f"terminal_frauds_{label}_d7",
                              f"terminal_txn_count_{label}_d7")
    span = _SPAN[label]
    return _input(f"terminal_fraud_rate_{label}", lambda f: f.get(rate, 0.0),
                  lambda f: (f"terminal fraud rate {f.get(rate, 0.0):.0%} over {span} ending 7 days ago "
                             f"({f.get(frauds, 0.0):.0f} frauds in {f.get(payments, 0.0):.0f} payments)"), _g(rate))


class Columns:
    """A batch of feature dicts seen column-wise: ``get(name, default)`` is a float array (cached)."""

    def __init__(self, rows: Sequence[Mapping[str, Any]]) -> None:
        self.rows = rows
        self._cache: dict[tuple[str, float], np.ndarray] = {}

    def get(self, name: str, default: float = 0.0) -> np.ndarray:
        key = (name, default)
        if key not in self._cache:
            self._cache[key] = np.fromiter((_num(r.get(name, default), default) for r in self.rows), dtype=np.float64,
                                           count=len(self.rows))
        return self._cache[key]


def _num(value: Any, default: float) -> float:
    return float(value) if isinstance(value, int | float) else default


@dataclass(frozen=True)
class ModelInput:
    """One model input: how it is computed from the feature dict, and how to say what it means."""

    name: str
    value_of: Callable[[Mapping[str, float]], float]
    explain: Callable[[Mapping[str, float]], str]
    raw_of: Callable[[Mapping[str, float]], float]


def _input(name: str, value_of: Callable[[Mapping[str, float]], float], explain: Callable[[Mapping[str, float]], str],
           raw_of: Callable[[Mapping[str, float]], float] | None = None) -> ModelInput:
    return ModelInput(name, value_of, explain, raw_of or value_of)


def _g(name: str, default: float = 0.0) -> Callable[[Mapping[str, float]], float]:
    return lambda f: float(f.get(name, default))


def _count(name: str, text: str, key: str | None = None) -> ModelInput:
    """An input that is log(1 + a stored count), worded as "<count> <text>"."""
    key = key or name
    return _input(name, lambda f: _log(f.get(key, 0.0)), lambda f: f"{f.get(key, 0.0):.0f} {text}", _g(key))


INPUTS: tuple[ModelInput, ...] = (
    _input("amount", lambda f: _log(f.get("amount", 0.0)), lambda f: f"amount {f.get('amount', 0.0):,.2f}",
           _g("amount")),
    _input("amount_vs_mean_30d", lambda f: _log(np.minimum(f.get("amount_vs_mean_30d", 0.0), 1000.0)),
           lambda f: f"amount {f.get('amount_vs_mean_30d', 0.0):.1f}× this card's 30-day mean "
                     f"({f.get('amount_mean_30d_before', 0.0):,.2f})", _g("amount_vs_mean_30d")),
    _input("amount_z_30d", _z, lambda f: f"amount {_z(f):+.1f} standard deviations from this card's 30-day mean"),
    _count("card_history_30d", "earlier payments by this card in 30 days", key="txn_count_30d_before"),
    _count("txn_count_10m", "payments by this card in 10 minutes"),
    _count("txn_count_1h", "payments by this card in 1 hour"),
    _count("txn_count_24h", "payments by this card in 24 hours"),
    _count("txn_count_7d", "payments by this card in 7 days"),
    *(_vs_own_mean(label) for label in ("24h", "7d")),
    _input("mean_24h_vs_30d", lambda f: _log(np.minimum(_ratio(f, "amount_mean_24h", "amount_mean_30d"), 1000.0)),
           lambda f: (f"this card's mean payment today {f.get('amount_mean_24h', 0.0):,.2f} against "
                      f"{f.get('amount_mean_30d', 0.0):,.2f} over 30 days"),
           lambda f: _ratio(f, "amount_mean_24h", "amount_mean_30d")),
    _input("spend_1h_vs_mean", lambda f: _log(_spend_ratio(f)),
           lambda f: f"{f.get('amount_sum_1h', 0.0):,.2f} spent in 1 hour ({_spend_ratio(f):.1f}× the 30-day mean)",
           _g("amount_sum_1h")),
    _count("small_txn_count_10m", "small payments (under 5) in 10 minutes: card testing?"),
    _count("distinct_terminals_24h", "different terminals in 24 hours"),
    _input("seconds_since_prev", _since,
           lambda f: (f"{f.get('seconds_since_prev', -1.0):,.0f} s after this card's previous payment"
                      if f.get("seconds_since_prev", -1.0) >= 0 else "first payment seen from this card"),
           _g("seconds_since_prev", -1.0)),
    _input("new_terminal", lambda f: 1.0 * (f.get("card_terminal_seconds_since_prev", -1.0) < 0),
           lambda f: ("first payment by this card at this terminal"
                      if f.get("card_terminal_seconds_since_prev", -1.0) < 0 else "a terminal this card has used"),
           _g("card_terminal_txn_count_30d")),
    _input("new_device", lambda f: 1.0 * _new_device(f),
           lambda f: "first payment by this card from this device" if _new_device(f) else "a known device (or none)",
           _g("has_device")),
    _input("device_history_30d", lambda f: _log(_device_payments_before(f)),
           lambda f: (f"{_device_payments_before(f):.0f} earlier payments by this card from this device in 30 days"
                      if f.get("has_device", 0.0) > 0 else "no device (card present)"),
           _device_payments_before),
    _input("card_not_present", lambda f: 1.0 * (f.get("card_present", -1.0) == 0.0),
           lambda f: "card not present (online / phone)" if f.get("card_present", -1.0) == 0.0 else "card present",
           _g("card_present", -1.0)),
    _input("night", lambda f: 1.0 * (f.get("hour_utc", 12.0) < NIGHT_END_HOUR),
           lambda f: f"at {f.get('hour_utc', 12.0):02.0f}h UTC", _g("hour_utc", 12.0)),
    _input("weekend", lambda f: 1.0 * (f.get("weekday", 0.0) >= 5),
           lambda f: "on a weekend" if f.get("weekday", 0.0) >= 5 else "on a weekday", _g("weekday")),
    *(_terminal_rate(h.label) for h in TERMINAL_MATURED.horizons),
    *(_count(f"terminal_payments_{h.label}_d7", f"payments at this terminal over {_SPAN[h.label]} ending 7 days ago",
             key=name) for h, name in zip(TERMINAL_MATURED.horizons, TERMINAL_MATURED.names, strict=True)),
    _count("terminal_frauds_30d", "confirmed frauds at this terminal over 30 days ending 7 days ago",
           key="terminal_frauds_30d_d7"),
    _count("terminal_txn_count_1h", "payments at this terminal in 1 hour"),
    _count("terminal_txn_count_24h", "payments at this terminal in 24 hours"),
    _count("terminal_distinct_cards_24h", "different cards at this terminal in 24 hours"),
)
INPUT_NAMES: tuple[str, ...] = tuple(i.name for i in INPUTS)
INPUT_INDEX = {name: i for i, name in enumerate(INPUT_NAMES)}


def model_inputs(rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """The (n, len(INPUTS)) float32 matrix of model inputs, computed column-wise.

    >>> x = model_inputs([{"amount": 0.0}, {"amount": 99.0, "hour_utc": 2.0}])
    >>> x.shape == (2, len(INPUTS)), float(x[1, INPUT_INDEX["night"]]), round(float(x[1, 0]), 3)
    (True, 1.0, 4.605)
    """
    cols = Columns(rows)
    out = np.empty((len(rows), len(INPUTS)), dtype=np.float32)
    for c, inp in enumerate(INPUTS):
        out[:, c] = inp.value_of(cols)
    return out


def input_dict(row: np.ndarray) -> dict[str, float]:
    """One row of :func:`model_inputs` as river's plain dict."""
    return {name: float(v) for name, v in zip(INPUT_NAMES, row, strict=True)}
