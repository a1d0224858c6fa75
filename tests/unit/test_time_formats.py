"""The fast time formats written (and read back) per decision are exactly datetime's, edge cases included."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime

import pytest

from kestrel.feature_store.schemas import epoch_of, iso_of
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
        assert epoch_of(iso_of(ts)) == datetime.fromisoformat(_datetime_iso(ts).replace("Z", "+00:00")).timestamp()
        at = datetime.fromtimestamp(ts, UTC)
        ctx = payment_context(ts, None, None)
        assert (ctx["hour_utc"], ctx["weekday"]) == (float(at.hour), float(at.weekday())), ts


@pytest.mark.parametrize("iso", ["2026-01-01T00:00:00Z", "2026-01-01T00:00:00.5Z", "2026-01-01T00:00:00.123456Z",
                                 "2026-01-01T00:00:00.123+00:00", "1969-12-31T23:59:59.500Z",
                                 "2026-01-01T00:00:0a.123Z"])
def test_epoch_of_other_forms_go_through_datetime(iso: str) -> None:
    try:
        want = datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        with pytest.raises(ValueError):
            epoch_of(iso)
        return
    assert epoch_of(iso) == want
