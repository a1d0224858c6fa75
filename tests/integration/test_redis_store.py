"""The Redis online store on a real Redis: one round trip per batch, idempotent, bounded."""

from __future__ import annotations

import secrets
from types import SimpleNamespace

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kestrel.feature_store.definitions import (
    FeatureSet,
    LastN,
    LastValue,
    TimeSince,
    Windowed,
    compile_event,
    finalize,
    window_bounds,
)
from kestrel.feature_store.keys import KeyedHasher, KeySpace
from kestrel.feature_store.redis_store import RedisOnlineStore

pytestmark = pytest.mark.integration

FS = FeatureSet("t", "1", "card", "test", lambda e: e.card, lambda e: e.ts, (
    Windowed("n_10m", "count", 600, 60, lateness_s=600),
    Windowed("sum_1h", "sum", 3600, 300, value_of=lambda e: e.amount, lateness_s=600),
    Windowed("small_10m", "count", 600, 60, where=lambda e: e.amount < 5, lateness_s=600),
    TimeSince("since_prev"),
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
    """Apply in one batch; (newly applied, finalized feature values) per event."""
    store = RedisOnlineStore(client, dedup_ttl_s=3600, keys=keys, hasher=HASHER)
    rows = store.apply_batch([compile_event(FS, e, keys, HASHER) for e in events])
    return [(applied, finalize(FS, snap, e.ts)) for (applied, snap), e in zip(rows, events, strict=True)]


def test_a_redelivered_event_changes_nothing_and_gets_the_same_snapshot(space):
    client, keys = space
    first = _apply(client, keys, [_ev(1, 1000.0), _ev(2, 1010.0, 3.0)])
    again = _apply(client, keys, [_ev(2, 1010.0, 3.0), _ev(3, 1020.0)])
    assert [a for a, _ in first] == [True, True]
    assert again[0] == (False, first[1][1])
    assert again[1][1]["n_10m"] == 3 and again[1][1]["sum_1h"] == 23.0 and again[1][1]["small_10m"] == 1
    assert again[1][1]["since_prev"] == 10.0
    assert first[0][1]["since_prev"] == -1.0


def test_window_slides_and_old_buckets_are_deleted(space):
    client, keys = space
    _apply(client, keys, [_ev(i, 1000.0 + 60 * i) for i in range(40)])
    snap = _apply(client, keys, [_ev(100, 1000.0 + 60 * 40)])[0][1]
    assert snap["n_10m"] == 10  # ten 1-minute buckets
    key = keys.entity("card", HASHER.token("card", "c1"))
    fields = [f.decode() for f in client.hkeys(key) if f.decode().startswith("n_10m|n|")]
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


RICH = FeatureSet("rich", "1", "card", "test", lambda e: e.card, lambda e: e.ts, (
    Windowed("n_10m", "count", 600, 60, lateness_s=0),
    Windowed("mean_1h", "mean", 3600, 300, value_of=lambda e: e.amount, lateness_s=0),
    Windowed("std_1h", "std", 3600, 300, value_of=lambda e: e.amount, lateness_s=0),
    Windowed("min_1h", "min", 3600, 300, value_of=lambda e: e.amount, lateness_s=0),
    Windowed("max_1h", "max", 3600, 300, value_of=lambda e: e.amount, lateness_s=0),
    Windowed("terminals_1h", "distinct", 3600, 300, value_of=lambda e: e.terminal, lateness_s=0),
    Windowed("delayed_n_1h", "count", 3600, 300, delay_s=1800, lateness_s=0),
    TimeSince("since_prev"),
    LastValue("prev_terminal", value_of=lambda e: e.terminal),
    LastN("recent_terminals", value_of=lambda e: e.terminal, n=3),
))


def _rich(i: int, ts: float, amount: float, terminal: str, card: str) -> SimpleNamespace:
    return SimpleNamespace(event_id=f"{card}-{i}", card=card, ts=ts, amount=amount, terminal=terminal)


def _brute(events: list, i: int) -> dict:
    """Every feature of RICH for event i, recomputed from scratch over the raw events."""
    e = events[i]

    def in_window(x, window_s, bucket_s, delay_s=0):
        lo, hi = window_bounds(e.ts - delay_s, bucket_s, window_s // bucket_s)
        return lo <= int(x.ts // bucket_s) <= hi

    seen = events[: i + 1]
    hour = [x.amount for x in seen if in_window(x, 3600, 300)]
    mean = sum(hour) / len(hour) if hour else 0.0
    return {
        "n_10m": float(sum(1 for x in seen if in_window(x, 600, 60))),
        "mean_1h": mean,
        "std_1h": max(sum(a * a for a in hour) / len(hour) - mean * mean, 0.0) ** 0.5 if hour else 0.0,
        "min_1h": min(hour) if hour else 0.0,
        "max_1h": max(hour) if hour else 0.0,
        "terminals_1h": float(len({x.terminal for x in seen if in_window(x, 3600, 300)})),
        "delayed_n_1h": float(sum(1 for x in seen if in_window(x, 3600, 300, 1800))),
        "since_prev": e.ts - events[i - 1].ts if i else -1.0,
        "prev_terminal": events[i - 1].terminal if i else None,
    }


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 14_400), st.integers(1, 5000), st.sampled_from("abcdef")),
                min_size=1, max_size=30))
def test_every_aggregation_equals_brute_force(space, raw):
    client, keys = space
    card = f"r{secrets.token_hex(4)}"
    events = [_rich(i, 2_000_000.0 + t, a / 100, term, card) for i, (t, a, term) in enumerate(sorted(raw))]
    store = RedisOnlineStore(client, dedup_ttl_s=3600, keys=keys, hasher=HASHER)
    rows = store.apply_batch([compile_event(RICH, e, keys, HASHER) for e in events])
    for i, ((_, snap), e) in enumerate(zip(rows, events, strict=True)):
        got = finalize(RICH, snap, e.ts)
        want = _brute(events, i)
        for name, value in want.items():
            if isinstance(value, float):
                assert got[name] == pytest.approx(value, rel=1e-9, abs=1e-6), (name, i)
            else:
                assert got[name] == value, (name, i)


def test_read_api_sync_and_async_single_and_batch(space, redis_url):
    client, keys = space
    store = RedisOnlineStore(client, dedup_ttl_s=3600, keys=keys, hasher=HASHER)
    t0 = 3_000_000.0
    events = [_rich(i, t0 + 30 * i, 10.0 * (i + 1), "tuv"[i % 3], "reader") for i in range(6)]
    store.apply_batch([compile_event(RICH, e, keys, HASHER) for e in events])
    at = t0 + 200
    one = store.read(RICH, "reader", at=at)
    assert one["n_10m"] == 6 and one["mean_1h"] == 35.0 and one["max_1h"] == 60.0 and one["min_1h"] == 10.0
    assert one["terminals_1h"] == 3 and one["since_prev"] == 50.0 and one["prev_terminal"] == "v"
    missing = store.read(RICH, "nobody", at=at)
    assert missing == finalize(RICH, {}, at)  # defaults, not errors
    batch = store.read_batch(RICH, ["reader", "nobody", "reader"], at=at)
    assert batch == [one, missing, one]

    import asyncio

    import redis.asyncio as aioredis

    from kestrel.feature_store.redis_store import AsyncRedisOnlineStore

    async def read_async():
        aclient = aioredis.Redis.from_url(redis_url)
        try:
            astore = AsyncRedisOnlineStore(aclient, 3600, keys, HASHER)
            return await astore.read(RICH, "reader", at=at), await astore.read_batch(RICH, ["nobody"], at=at)
        finally:
            await aclient.aclose()

    a_one, a_batch = asyncio.run(read_async())
    assert a_one == one and a_batch == [missing]
    recent = client.zrevrange(keys.entity_part("card", HASHER.token("card", "reader"), "recent_terminals"), 0, -1)
    assert [m.decode() for m in recent] == ["v", "u", "t"]


def test_delayed_window_only_sees_the_past(space):
    client, keys = space
    store = RedisOnlineStore(client, dedup_ttl_s=3600, keys=keys, hasher=HASHER)
    t0 = 4_000_000.0 - 4_000_000.0 % 300
    events = [_rich(i, t0 + 60 * i, 1.0, "t", "delayed") for i in range(40)]
    store.apply_batch([compile_event(RICH, e, keys, HASHER) for e in events])
    assert store.read(RICH, "delayed", at=t0 + 60 * 39)["delayed_n_1h"] == 10  # buckets 30 min+ in the past
    assert store.read(RICH, "delayed", at=t0 + 1700)["delayed_n_1h"] == 0


def test_a_tombstoned_subject_is_not_recreated(space):
    client, keys = space
    store = RedisOnlineStore(client, dedup_ttl_s=3600, keys=keys, hasher=HASHER)
    token = HASHER.token("card", "gone")
    client.set(keys.tombstone("card", token), b"1")
    rows = store.apply_batch([compile_event(RICH, _rich(1, 5_000_000.0, 5.0, "t", "gone"), keys, HASHER)])
    assert rows[0][0] is False
    assert not client.exists(keys.entity("card", token))


def test_erase_deletes_every_key_of_the_subject_and_a_replay_does_not_recreate_it(space):
    from kestrel.feature_store.erase import erase_subject

    client, keys = space
    store = RedisOnlineStore(client, dedup_ttl_s=3600, keys=keys, hasher=HASHER)
    events = [_rich(i, 6_000_000.0 + 60 * i, 5.0, "ab"[i % 2], "subject") for i in range(5)]
    others = [_rich(i, 6_000_000.0 + 60 * i, 5.0, "a", "bystander") for i in range(3)]
    store.apply_batch([compile_event(RICH, e, keys, HASHER) for e in events + others])
    token = HASHER.token("card", "subject")
    base = keys.entity("card", token)
    before = [k for k in client.scan_iter(match=f"{base}*")]
    assert len(before) >= 3  # the hash, HyperLogLog buckets, the recent-values set

    report = erase_subject(client, keys, HASHER, "card", "subject")
    assert report.keys_deleted == len(before)
    assert not list(client.scan_iter(match=f"{base}*"))
    assert store.read(RICH, "bystander", at=6_000_200.0)["n_10m"] == 3  # nobody else is touched

    replay = [_rich(10 + i, 6_001_000.0 + i, 5.0, "a", "subject") for i in range(3)]
    rows = store.apply_batch([compile_event(RICH, e, keys, HASHER) for e in replay])
    assert all(not applied for applied, _ in rows)
    assert not list(client.scan_iter(match=f"{base}*"))
    assert store.read(RICH, "subject", at=6_001_010.0) == finalize(RICH, {}, 6_001_010.0)
    assert "subject" not in report.token and "subject" not in report.tombstone
