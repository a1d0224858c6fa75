"""Offline features: the vectorised path equals the exact replay of the online algorithm."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kestrel.feature_store.definitions import FeatureSet, LastValue, TimeSince, Windowed
from kestrel.feature_store.sets import CARD_PROFILE
from kestrel.offline.features import _replay_exactly, compute_features
from kestrel.offline.simulator import SimConfig, Simulator

FS = FeatureSet("off", "1", "card", "test", lambda e: e.card, lambda e: e.ts, (
    Windowed("n_10m", "count", 600, 60, lateness_s=600),
    Windowed("sum_1h", "sum", 3600, 300, value_of=lambda e: e.amount),
    Windowed("mean_1h", "mean", 3600, 300, value_of=lambda e: e.amount),
    Windowed("std_1h", "std", 3600, 300, value_of=lambda e: e.amount),
    Windowed("min_1h", "min", 3600, 300, value_of=lambda e: e.amount, where=lambda e: e.amount > 2),
    Windowed("max_1h", "max", 3600, 300, value_of=lambda e: e.amount),
    Windowed("terms_1h", "distinct", 3600, 300, value_of=lambda e: e.term),
    Windowed("late_1h", "count", 3600, 300, delay_s=1200, lateness_s=300),
    TimeSince("since"),
    LastValue("prev_term", value_of=lambda e: e.term),
))


def _frame_equal(a, b):
    assert list(a.columns) == list(b.columns)
    for col in a.columns:
        x, y = a[col].to_list(), b[col].to_list()
        if all(isinstance(v, float) for v in x + y):
            np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-6, err_msg=col)
        else:
            assert x == y, col


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("xyz"), st.integers(0, 20_000), st.integers(1, 900), st.sampled_from("pqr")),
                min_size=1, max_size=60), st.booleans())
def test_vectorised_equals_exact_replay(raw, shuffle_time):
    rows = sorted(raw, key=lambda r: r[1]) if not shuffle_time else raw
    events = [SimpleNamespace(event_id=str(i), card=c, ts=1_000_000.0 + t, amount=a / 10, term=m)
              for i, (c, t, a, m) in enumerate(rows)]
    _frame_equal(compute_features(FS, events), _replay_exactly(FS, events))


def test_shipped_card_features_on_simulated_data():
    recs = [r.event for r in itertools.islice(Simulator(SimConfig(seed=2)).records(), 6000) if r.kind == "transaction"]
    frame = compute_features(CARD_PROFILE, recs)
    assert len(frame) == len(recs) and list(frame.columns) == list(CARD_PROFILE.feature_names)
    assert (frame["txn_count_10m"] >= 1).all()  # the payment itself is in its own window
    assert (frame["txn_count_24h"] >= frame["txn_count_1h"]).all()
    assert (frame["amount_max_7d"] >= frame["amount_mean_30d"] - 1e-9).all()
    _frame_equal(frame.iloc[:400], _replay_exactly(CARD_PROFILE, recs)[:400])


@pytest.mark.parametrize("n", [0, 1])
def test_tiny_inputs(n):
    events = [SimpleNamespace(event_id="a", card="c", ts=10.0, amount=1.0, term="t")][:n]
    frame = compute_features(FS, events)
    assert len(frame) == n


def test_a_huge_old_amount_does_not_leak_into_later_windows():
    events = [SimpleNamespace(event_id=str(i), card="c", ts=ts, amount=a, term="t")
              for i, (ts, a) in enumerate([(0.0, 1e9), (40 * 86400.0, 10.0), (40 * 86400.0 + 60, 20.0)])]
    def amount(e):
        return e.amount

    fs = FeatureSet("big", "1", "card", "test", lambda e: e.card, lambda e: e.ts, (
        Windowed("std_30d", "std", 30 * 86400, 86400, value_of=amount, series="a"),
        Windowed("sum_30d", "sum", 30 * 86400, 86400, value_of=amount, series="a"),
    ))
    fast, exact = compute_features(fs, events), _replay_exactly(fs, events)
    assert fast["std_30d"].tolist() == pytest.approx([0.0, 0.0, 5.0]) == exact["std_30d"].tolist()
    assert fast["sum_30d"].tolist() == pytest.approx([1e9, 10.0, 30.0]) == exact["sum_30d"].tolist()
