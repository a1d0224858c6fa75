"""The Redis online store on a real Redis: one round trip per batch, idempotent, bounded."""

from __future__ import annotations

import secrets
from types import SimpleNamespace

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from feature_store.definitions import FeatureSet, Previous, Windowed, compile_event, window_bounds
from feature_store.keys import KeyedHasher, KeySpace
from feature_store.redis_store import RedisOnlineStore

pytestmark = pytest.mark.integration

FS = FeatureSet("t", "1", "card", lambda e: e.card, lambda e: e.ts, (
    Windowed("n_10m", "count", 600, 60, lateness_s=600),
    Windowed("sum_1h", "sum", 3600, 300, value_of=lambda e: e.amount, lateness_s=600),
    Windowed("small_10m", "count", 600, 60, where=lambda e: e.amount < 5, lateness_s=600),
    Previous("prev_ts", value_of=lambda e: e.ts),
))
HASHER = KeyedHasher(b"test")


@pytest.fixture
def space(redis_url):
    client = redis.Redis.from_url(redis_url)
    keys = KeySpace(f"kestrel-test-store-{secrets.token_hex(4)}")
    yield client, keys
    for key in client.scan_iter(match=f"{keys.prefix}:*"):
        client.delete(key)


def _ev(i: int, ts: float, amount: float = 10.0, card: str = "c1") -> SimpleNamespace:
    return SimpleNamespace(event_id=f"e{i}", card=card, ts=ts, amount=amount)


def _apply(client, keys, events):
    store = RedisOnlineStore(client, dedup_ttl_s=3600)
    return store.apply_batch([compile_event(FS, e, keys, HASHER) for e in events])


def test_a_redelivered_event_changes_nothing_and_gets_the_same_snapshot(space):
    client, keys = space
    first = _apply(client, keys, [_ev(1, 1000.0), _ev(2, 1010.0, 3.0)])
    again = _apply(client, keys, [_ev(2, 1010.0, 3.0), _ev(3, 1020.0)])
    assert [a for a, _ in first] == [True, True]
    assert again[0] == (False, first[1][1])
    assert again[1][1]["n_10m"] == 3 and again[1][1]["sum_1h"] == 23.0 and again[1][1]["small_10m"] == 1
    assert again[1][1]["prev_ts"] == 1010.0
    assert first[0][1]["prev_ts"] is None


def test_window_slides_and_old_buckets_are_deleted(space):
    client, keys = space
    _apply(client, keys, [_ev(i, 1000.0 + 60 * i) for i in range(40)])
    snap = _apply(client, keys, [_ev(100, 1000.0 + 60 * 40)])[0][1]
    assert snap["n_10m"] == 10  # ten 1-minute buckets
    key = keys.entity("card", HASHER.token("card", "c1"))
    fields = [f.decode() for f in client.hkeys(key) if f.decode().startswith("n_10m|") and not f.endswith(b"|lo")]
    assert len(fields) <= 10 + 10  # window plus lateness, not every bucket ever written
    assert client.ttl(key) > 0


def test_late_events_land_in_their_own_bucket_and_too_late_ones_are_ignored(space):
    client, keys = space
    _apply(client, keys, [_ev(1, 10_000.0)])
    late = _apply(client, keys, [_ev(2, 10_000.0 - 300)])[0][1]  # 5 min late: within lateness
    assert late["n_10m"] == 1  # at its own time, the later event is not in its window
    now = _apply(client, keys, [_ev(3, 10_000.0 + 1)])[0][1]
    assert now["n_10m"] == 3
    _apply(client, keys, [_ev(4, 10_000.0 - 3000)])  # 50 min late: past lateness, dropped from windows
    assert _apply(client, keys, [_ev(5, 10_000.0 + 2)])[0][1]["n_10m"] == 4


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.floats(0, 7200), st.floats(0.01, 50)), min_size=1, max_size=40))
def test_bucketed_window_equals_brute_force(space, raw):
    client, keys = space
    card = f"p{secrets.token_hex(4)}"
    events = [_ev(i, 1_000_000.0 + t, round(a, 2), card) for i, (t, a) in enumerate(sorted(raw))]
    events = [SimpleNamespace(**{**vars(e), "event_id": f"{card}-{e.event_id}"}) for e in events]
    snaps = [s for _, s in _apply(client, keys, events)]
    for i, (e, snap) in enumerate(zip(events, snaps, strict=True)):
        lo, hi = window_bounds(e.ts, 60, 10)
        expected = sum(1 for x in events[: i + 1] if lo <= int(x.ts // 60) <= hi)
        assert snap["n_10m"] == expected
        lo, hi = window_bounds(e.ts, 300, 12)
        expected_sum = sum(x.amount for x in events[: i + 1] if lo <= int(x.ts // 300) <= hi)
        assert snap["sum_1h"] == pytest.approx(expected_sum, abs=1e-6)
