"""Feature families against brute force: every generated feature is what its name says."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kestrel.feature_store.definitions import FeatureSet
from kestrel.feature_store.families import Horizon, MaturedCounts, amount_family
from kestrel.feature_store.sets import CARD_HORIZONS, CARD_PROFILE, TERMINAL_ACTIVITY, TERMINAL_MATURED
from kestrel.offline.features import compute_features

DAY = 86400
HORIZONS = (Horizon("1h", 3600, 600), Horizon("1d", DAY, 7200), Horizon("7d", 7 * DAY, DAY))
FAMILY = FeatureSet("fam", "1", "card", "test", lambda e: e.card, lambda e: e.ts,
                    amount_family(HORIZONS, lambda e: e.amount, count_prefix="n", value_prefix="amt", series="amt"))
MATURED = MaturedCounts("t", 3 * DAY, DAY, (Horizon("1d", DAY, DAY), Horizon("5d", 5 * DAY, DAY)), series="t")
MATURED_SET = FeatureSet("mat", "1", "terminal", "test", lambda e: e.card, lambda e: e.ts, MATURED.features())


def _in_window(events, i, h: Horizon, delay_s: int = 0):
    """Brute force: the events of the same entity, applied so far, whose bucket is in the window read at i."""
    last = math.floor((events[i].ts - delay_s) / h.bucket_s)
    first = last - h.window_s // h.bucket_s + 1
    return [e for e in events[:i + 1] if e.card == events[i].card and first <= math.floor(e.ts / h.bucket_s) <= last]


_events = st.lists(st.tuples(st.sampled_from("ab"), st.integers(0, 12 * DAY), st.integers(1, 5000)),
                   min_size=1, max_size=40)


@settings(max_examples=40, deadline=None)
@given(_events)
def test_amount_family_is_count_sum_mean_std_per_horizon(raw):
    events = [SimpleNamespace(event_id=str(i), card=c, ts=1_000_000.0 + t, amount=a / 10)
              for i, (c, t, a) in enumerate(sorted(raw, key=lambda r: r[1]))]
    frame = compute_features(FAMILY, events)
    for i in range(len(events)):
        for h in HORIZONS:
            xs = np.array([e.amount for e in _in_window(events, i, h)])
            row = frame.iloc[i]
            assert row[f"n_count_{h.label}"] == len(xs)
            assert row[f"amt_sum_{h.label}"] == pytest.approx(xs.sum(), abs=1e-6)
            assert row[f"amt_mean_{h.label}"] == pytest.approx(xs.mean() if len(xs) else 0.0, abs=1e-6)
            assert row[f"amt_std_{h.label}"] == pytest.approx(xs.std() if len(xs) else 0.0, abs=1e-4)


@settings(max_examples=40, deadline=None)
@given(_events)
def test_matured_counts_are_the_windows_ending_one_delay_ago(raw):
    events = [SimpleNamespace(event_id=str(i), card=c, ts=1_000_000.0 + t)
              for i, (c, t, _) in enumerate(sorted(raw, key=lambda r: r[1]))]
    frame = compute_features(MATURED_SET, events)
    for i in range(len(events)):
        got = MATURED.values(frame.iloc[i].to_dict())
        for name, h in zip(MATURED.names, MATURED.horizons, strict=True):
            assert got[name] == len(_in_window(events, i, h, delay_s=MATURED.delay_s)), (i, name)


def test_shipped_sets_carry_every_family_member():
    names = set(CARD_PROFILE.feature_names)
    for h in CARD_HORIZONS:
        assert {f"txn_count_{h.label}", f"amount_sum_{h.label}", f"amount_mean_{h.label}",
                f"amount_std_{h.label}"} <= names
    assert {f.name for f in TERMINAL_MATURED.features()} <= set(TERMINAL_ACTIVITY.feature_names)
    assert TERMINAL_MATURED.names == ("terminal_txn_count_1d_d7", "terminal_txn_count_7d_d7",
                                        "terminal_txn_count_30d_d7")


def test_matured_counts_need_whole_buckets():
    with pytest.raises(ValueError, match="whole buckets"):
        MaturedCounts("x", DAY + 1, DAY, (Horizon("1d", DAY, DAY),))


def test_a_head_only_set_must_outlive_its_longest_window():
    """Its head is its whole state: a TTL shorter than a window would drop in-window events of an idle entity."""
    with pytest.raises(ValueError, match="shorter than the longest window"):
        FeatureSet("short", "1", "terminal", "test", lambda e: e.card, lambda e: e.ts, MATURED.features(),
                   ttl_s=7 * DAY, buckets=False)
    assert TERMINAL_ACTIVITY.ttl_s >= max(f.window_s + f.bucket_s for f in TERMINAL_MATURED.features())
