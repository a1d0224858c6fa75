"""The fast time formats written per decision are exactly datetime's, edge cases included."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime

import pytest

from kestrel.feature_store.schemas import iso_of
from kestrel.models.fraud_features import payment_context


def _datetime_iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _times(n: int) -> list[float]:
    rng = random.Random(7)
    edges = (0.0, 1e-7, 0.0004999, 0.0005, 0.0015, 0.999, 0.9995, 0.9999994, 0.9999995, 0.9999996)
    out = []
    for _ in range(n):
        whole = math.floor(rng.uniform(-2e9, 4e9))
        out += [whole + rng.choice(edges), rng.uniform(-2e9, 4e9), round(rng.uniform(1.6e9, 1.9e9), rng.randint(0, 6))]
    return out


@pytest.mark.parametrize("ts", [0.0, -0.5, 59.9999996, 1767225599.9999996, 1767225661.2345, 951782400.0])
def test_iso_of_is_datetimes_text(ts: float) -> None:
    assert iso_of(ts) == _datetime_iso(ts)


def test_iso_of_and_payment_context_match_datetime_on_many_times() -> None:
    for ts in _times(20_000):
        assert iso_of(ts) == _datetime_iso(ts), ts
        at = datetime.fromtimestamp(ts, UTC)
        ctx = payment_context(ts, None, None)
        assert (ctx["hour_utc"], ctx["weekday"]) == (float(at.hour), float(at.weekday())), ts
