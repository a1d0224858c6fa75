"""The head read path (kestrel/feature_store/read_path.py) against the bucket path and against brute force.

The write script keeps a per-entity head beside the buckets; a read mostly
decodes the head. These tests check that whatever the arrival order (late,
too late, redelivered events), the batching and the read time, the head gives
exactly what the buckets give, and that a missing head (expired, or data
written by a version without heads) is rebuilt from the buckets.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from types import SimpleNamespace

import orjson
import pytest
import redis
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kestrel.feature_store.definitions import (
    FeatureSet,
    LastValue,
    TimeSince,
    Windowed,
    compile_event,
    event_unit,
    finalize,
    window_bounds,
)
from kestrel.feature_store.head_state import HeadBatch
from kestrel.feature_store.keys import KeyedHasher, KeySpace
from kestrel.feature_store.redis_store import (
    READ_LUA,
    AsyncRedisOnlineStore,
    RedisOnlineStore,
    _read_plan,
    _unit_vectors,
    head_suffix,
    read_template,
)
from kestrel.feature_store.resp import PinnedSync

pytestmark = pytest.mark.integration

HASHER = KeyedHasher(b"test-read-path")

def _amount(e: SimpleNamespace) -> float:
    return e.amount


# Every aggregation, shared series, two bucket sizes, lateness: all served by the head (nothing delayed).
HEADED = FeatureSet("headed", "1", "card", "test", lambda e: e.card, lambda e: e.ts, (
    Windowed("n_10m", "count", 600, 60, series="a", lateness_s=600),
    Windowed("sum_1h", "sum", 3600, 300, value_of=_amount, series="a", lateness_s=600),
    Windowed("mean_1h", "mean", 3600, 300, value_of=_amount, series="a", lateness_s=600),
    Windowed("std_1h", "std", 3600, 300, value_of=_amount, series="a", lateness_s=600),
    Windowed("n_30m", "count", 1800, 300, series="a", lateness_s=600),
    Windowed("min_1h", "min", 3600, 600, value_of=lambda e: e.amount, lateness_s=600),
    Windowed("max_20m", "max", 1200, 60, value_of=lambda e: e.amount, lateness_s=600),
    Windowed("small_10m", "count", 600, 120, where=lambda e: e.amount < 5, lateness_s=600),
    Windowed("terminals_1h", "distinct", 3600, 300, value_of=lambda e: e.terminal),
    TimeSince("since_prev"),
    LastValue("prev_terminal", value_of=lambda e: e.terminal),
))
WINDOWS = [f.name for f in HEADED.vector if isinstance(f, Windowed)]


@pytest.fixture
def space(redis_url):
    client = redis.Redis.from_url(redis_url)
    keys = KeySpace(f"kestrel-test-readpath-{secrets.token_hex(4)}")
    yield client, keys
    for key in client.scan_iter(match=f"{keys.prefix}:*"):
        client.delete(key)


def _ev(card: str, i: int, ts: float, amount: float, terminal: str) -> SimpleNamespace:
    return SimpleNamespace(event_id=f"{card}-{i}", card=card, ts=ts, amount=amount, terminal=terminal)


def _entity_keys(keys: KeySpace, fs: FeatureSet, ids: list[str]) -> list[str]:
    return [keys.entity(fs.entity, HASHER.token(fs.entity, i)) for i in ids]


def _from_buckets(client: redis.Redis, keys: KeySpace, fs: FeatureSet, ids: list[str], at: float) -> list[dict]:
    """The same reads from the buckets, as before heads existed (the bucket script)."""
    rows = client.register_script(READ_LUA)(args=[read_template(fs), repr(at), *_entity_keys(keys, fs, ids)])
    return [finalize(fs, orjson.loads(r), at) for r in rows]


def _served_by_head(client: redis.Redis, keys: KeySpace, fs: FeatureSet, ids: list[str], at: float) -> list[bool]:
    heads = [client.get(k + head_suffix(fs)) for k in _entity_keys(keys, fs, ids)]
    _, later = _read_plan(fs).decode(heads, at)
    return [h is not None and i not in later for i, h in enumerate(heads)]


def _assert_same(got: dict, want: dict, where: object) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        if isinstance(value, float):
            assert got[name] == pytest.approx(value, rel=1e-9, abs=1e-9), (name, where)
            assert isinstance(got[name], float), (name, where)
        else:
            assert got[name] == value, (name, where)


events_strategy = st.lists(
    st.tuples(st.integers(0, 3 * 3600), st.integers(1, 4000), st.sampled_from("abcd"), st.integers(-1500, 0)),
    min_size=1, max_size=35)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events_strategy, st.lists(st.integers(-4000, 3 * 3600 + 40 * 86400), min_size=1, max_size=6),
       st.integers(1, 7), st.booleans())
def test_head_reads_equal_bucket_reads_for_any_arrival_order_and_read_time(space, raw, offsets, batch, drop_head):
    client, keys = space
    store = RedisOnlineStore(client, dedup_ttl_s=3600, keys=keys, hasher=HASHER)
    card = f"h{secrets.token_hex(4)}"
    t0 = 7_000_000.0
    # arrival order as generated; an event's time is its arrival slot shifted back up to 25 min (late)
    events = [_ev(card, i, t0 + t + late, a / 100, term) for i, (t, a, term, late) in enumerate(raw)]
    ops = [compile_event(HEADED, e, keys, HASHER) for e in events]
    ops += ops[: len(ops) // 3]  # redeliveries change nothing
    for i in range(0, len(ops), batch):
        store.apply_batch(ops[i:i + batch])
    if drop_head:  # as if expired, or written by a version without heads: the next event rebuilds it
        client.delete(keys.entity("card", HASHER.token("card", card)) + head_suffix(HEADED))
        events.append(_ev(card, len(events), max(e.ts for e in events) - 200, 2.5, "e"))
        store.apply_batch([compile_event(HEADED, events[-1], keys, HASHER)])
    newest = max(e.ts for e in events)
    for off in offsets:
        at = newest + off
        got = store.read_batch(HEADED, [card, "nobody"], at=at)
        if off >= 0:  # at or after the newest event: the head serves it
            assert _served_by_head(client, keys, HEADED, [card, "nobody"], at) == [True, False]
        want = _from_buckets(client, keys, HEADED, [card, "nobody"], at)
        _assert_same(got[0], want[0], at)
        _assert_same(got[1], want[1], at)
        assert got[1] == finalize(HEADED, {}, at)  # a missing entity: the defaults


def _brute(events: list, at: float) -> dict:
    """HEADED at ``at`` from scratch over events that all arrived in time order."""
    def window(bucket_s: int, window_s: int, pick=lambda e: True):
        lo, hi = window_bounds(at, bucket_s, window_s // bucket_s)
        return [e for e in events if lo <= int(e.ts // bucket_s) <= hi and pick(e)]

    hour = [e.amount for e in window(300, 3600)]
    mean = sum(hour) / len(hour) if hour else 0.0
    var = sum(a * a for a in hour) / len(hour) - mean * mean if hour else 0.0
    mins = [e.amount for e in window(600, 3600)]
    maxs = [e.amount for e in window(60, 1200)]
    return {
        "n_10m": float(len(window(60, 600))), "sum_1h": sum(hour), "mean_1h": mean,
        "std_1h": var ** 0.5 if var > 1e-9 * max(sum(a * a for a in hour) / max(len(hour), 1), 1.0) else 0.0,
        "n_30m": float(len(window(300, 1800))), "min_1h": min(mins) if mins else 0.0,
        "max_20m": max(maxs) if maxs else 0.0, "small_10m": float(len(window(120, 600, lambda e: e.amount < 5))),
        "terminals_1h": float(len({e.terminal for e in window(300, 3600)})),
        "since_prev": at - events[-1].ts, "prev_terminal": events[-1].terminal,
    }


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 6 * 3600), st.integers(1, 4000), st.sampled_from("abcd")),
                min_size=1, max_size=30), st.integers(0, 2 * 3600))
def test_head_reads_equal_brute_force(space, raw, after):
    client, keys = space
    store = RedisOnlineStore(client, dedup_ttl_s=3600, keys=keys, hasher=HASHER)
    card = f"b{secrets.token_hex(4)}"
    events = [_ev(card, i, 8_000_000.0 + t, a / 100, term) for i, (t, a, term) in enumerate(sorted(raw))]
    store.apply_batch([compile_event(HEADED, e, keys, HASHER) for e in events])
    at = events[-1].ts + after
    key = keys.entity("card", HASHER.token("card", card)) + head_suffix(HEADED)
    assert client.exists(key) and _served_by_head(client, keys, HEADED, [card], at) == [True]
    got = store.read(HEADED, card, at=at)
    for name, value in _brute(events, at).items():
        if isinstance(value, float):
            assert got[name] == pytest.approx(value, rel=1e-9, abs=1e-6), name
        else:
            assert got[name] == value, name


def test_snapshots_of_late_and_in_order_events_equal_bucket_reads(space):
    """The write script's snapshot (after the event, at its time) comes from the head unless the event is late."""
    client, keys = space
    store = RedisOnlineStore(client, dedup_ttl_s=3600, keys=keys, hasher=HASHER)
    t0 = 9_000_000.0
    times = [0, 50, 130, 125, 400, 390, 2000, 1990, 1000, 2300, 2290, 9000, 8990, 9100]  # some late, one too late
    for i, dt in enumerate(times):
        e = _ev("snap", i, t0 + dt, 1.0 + i, "abc"[i % 3])
        (applied, snap), = store.apply_batch([compile_event(HEADED, e, keys, HASHER)])
        assert applied
        got = finalize(HEADED, snap, e.ts)
        want = _from_buckets(client, keys, HEADED, ["snap"], e.ts)[0]
        for name in WINDOWS:  # the snapshot's time since / previous value are from before the event
            assert got[name] == pytest.approx(want[name], rel=1e-9, abs=1e-9), (name, dt)


def test_async_reads_and_erase(space, redis_url):
    from kestrel.feature_store.erase import erase_subject

    client, keys = space
    store = RedisOnlineStore(client, dedup_ttl_s=3600, keys=keys, hasher=HASHER)
    events = [_ev("a", i, 10_000_000.0 + 30 * i, 3.0 + i, "xy"[i % 2]) for i in range(5)]
    store.apply_batch([compile_event(HEADED, e, keys, HASHER) for e in events])
    at = 10_000_000.0 + 200
    one = store.read(HEADED, "a", at=at)
    assert one["n_10m"] == 5 and one["small_10m"] == 2 and one["terminals_1h"] == 2 and one["prev_terminal"] == "x"
    assert one["since_prev"] == 80.0 and one["max_20m"] == 7.0 and one["min_1h"] == 3.0

    async def read_async():
        aclient = aioredis.Redis.from_url(redis_url)
        try:
            astore = AsyncRedisOnlineStore(aclient, 3600, keys, HASHER)
            return await astore.read(HEADED, "a", at=at), await astore.read_batch(HEADED, ["a", "b"], at=at)
        finally:
            await aclient.aclose()

    a_one, a_batch = asyncio.run(read_async())
    assert a_one == one and a_batch == [one, store.read(HEADED, "b", at=at)]
    erase_subject(client, keys, HASHER, "card", "a")
    assert store.read(HEADED, "a", at=at) == store.read(HEADED, "b", at=at)
    assert not list(client.scan_iter(match=keys.entity("card", HASHER.token("card", "a")) + "*"))


def test_a_missing_head_is_rebuilt_exactly_from_the_buckets(space):
    """Data written without a head (an older version, or an expired head): the next event rebuilds it."""
    client, keys = space
    store = RedisOnlineStore(client, dedup_ttl_s=3600, keys=keys, hasher=HASHER)
    t0 = 11_000_000.0 - 11_000_000.0 % 3600
    # a value in every 5-minute bucket of the last hour, each seen once, some values seen again later
    events = [_ev("r", i, t0 + 300 * i + 7, 1.0 + i % 4, "abcdefghijkl"[i]) for i in range(12)]
    events += [_ev("r", 12 + i, t0 + 3400 + i, 9.0, "abc"[i]) for i in range(3)]
    store.apply_batch([compile_event(HEADED, e, keys, HASHER) for e in events])
    head = keys.entity("card", HASHER.token("card", "r")) + head_suffix(HEADED)
    client.delete(head)
    assert store.read(HEADED, "r", at=t0 + 3500) == finalize(HEADED, _read_plan(HEADED)._empty, t0 + 3500)
    last = _ev("r", 99, t0 + 3450, 4.0, "z")
    store.apply_batch([compile_event(HEADED, last, keys, HASHER)])
    for at in (t0 + 3500, t0 + 3600 + 299, t0 + 3600 + 300 * 5 + 1, t0 + 3600 * 2 - 1):
        got = store.read(HEADED, "r", at=at)
        _assert_same(got, _from_buckets(client, keys, HEADED, ["r"], at)[0], at)
    other = RedisOnlineStore(client, dedup_ttl_s=3600, keys=KeySpace(keys.prefix + "-x"), hasher=HASHER)
    other.apply_batch([compile_event(HEADED, e, other.keys, HASHER) for e in [*events, last]])
    rebuilt = client.get(head)
    written = client.get(other.keys.entity("card", HASHER.token("card", "r")) + head_suffix(HEADED))
    assert rebuilt[:-8] == written[:-8]  # the same head; the last 8 bytes count its writes (one since the rebuild)
    for key in client.scan_iter(match=f"{other.keys.prefix}:*"):
        client.delete(key)


def test_rebuild_heads_after_an_upgrade_from_a_version_without_heads(space):
    client, keys = space
    store = RedisOnlineStore(client, dedup_ttl_s=3600, keys=keys, hasher=HASHER)
    t0 = 12_000_000.0
    cards = [f"u{i}" for i in range(7)]
    events = [_ev(c, i, t0 + 97 * i + 13 * j, 0.5 * (i % 9) + 1, "abcde"[(i + j) % 5])
              for j, c in enumerate(cards) for i in range(9)]
    store.apply_batch([compile_event(HEADED, e, keys, HASHER) for e in events])
    heads = [keys.entity("card", HASHER.token("card", c)) + head_suffix(HEADED) for c in cards]
    before = [client.get(h) for h in heads]
    client.delete(*heads[:5])  # as if written before heads existed
    at = t0 + 97 * 9 + 13 * 7
    assert store.read(HEADED, "u0", at=at) == _read_plan(HEADED).missing(at)  # until rebuilt: nothing stored
    assert store.rebuild_heads(HEADED, batch_size=3) == 5
    # rebuilt from the buckets, bit for bit (but for the last 8 bytes: the head's write count starts again)
    assert [client.get(h)[:-8] for h in heads] == [b[:-8] for b in before]
    assert 0 < client.pttl(heads[0]) <= client.pttl(keys.entity("card", HASHER.token("card", "u0"))) + 100
    assert store.rebuild_heads(HEADED) == 0
    for c in cards:
        _assert_same(store.read(HEADED, c, at=at), _from_buckets(client, keys, HEADED, [c], at)[0], c)


def test_sync_reads_survive_a_dropped_connection_and_close(space):
    client, keys = space
    store = RedisOnlineStore(client, dedup_ttl_s=3600, keys=keys, hasher=HASHER)
    store.apply_batch([compile_event(HEADED, _ev("c", 0, 13_000_000.0, 2.0, "a"), keys, HASHER)])
    want = store.read(HEADED, "c", at=13_000_100.0)
    assert want["n_10m"] == 1.0
    store._conn._sock.close()  # the server or the network dropped it
    assert store.read(HEADED, "c", at=13_000_100.0) == want
    store.close()
    assert store.read(HEADED, "c", at=13_000_100.0) == want


def test_a_changed_definition_never_misreads_an_old_head(space):
    client, keys = space
    store = RedisOnlineStore(client, dedup_ttl_s=3600, keys=keys, hasher=HASHER)
    # a longer window on a stored series: its suffix totals grow, so the head's layout changes
    changed = FeatureSet(HEADED.name, HEADED.version, "card", "test", HEADED.entity_id_of, HEADED.time_of,
                         (Windowed("n_20m", "count", 1200, 60, series="a", lateness_s=600), *HEADED.features))
    assert head_suffix(changed) != head_suffix(HEADED)
    t0 = 14_000_000.0
    store.apply_batch([compile_event(HEADED, _ev("d", i, t0 + 50 * i, 6.0, "ab"[i % 2]), keys, HASHER)
                       for i in range(6)])
    at = t0 + 400
    assert store.read(changed, "d", at=at) == _read_plan(changed).missing(at)  # no head of this layout yet
    store.apply_batch([compile_event(changed, _ev("d", 6, t0 + 300, 1.0, "c"), keys, HASHER)])
    got = store.read(changed, "d", at=at)
    assert got["n_10m"] == 7 and got["n_20m"] == 7 and got["terminals_1h"] == 3
    _assert_same(got, _from_buckets(client, keys, changed, ["d"], at)[0], at)


def test_a_shorter_window_on_a_stored_series_reads_the_same_head(space):
    """A window shorter than one its series keeps is the tail of that one's suffix totals: same head layout."""
    client, keys = space
    store = RedisOnlineStore(client, dedup_ttl_s=3600, keys=keys, hasher=HASHER)
    shorter = FeatureSet(HEADED.name, HEADED.version, "card", "test", HEADED.entity_id_of, HEADED.time_of,
                         (Windowed("n_5m", "count", 300, 60, series="a", lateness_s=600), *HEADED.features))
    assert head_suffix(shorter) == head_suffix(HEADED)
    t0 = 14_500_000.0
    store.apply_batch([compile_event(HEADED, _ev("s", i, t0 + 50 * i, 6.0, "ab"[i % 2]), keys, HASHER)
                       for i in range(7)])
    at = t0 + 400
    got = store.read(shorter, "s", at=at)
    assert got["n_5m"] == 4 and got["n_10m"] == 7  # buckets of a minute: t0+150 ... t0+300 in the last five
    _assert_same(got, _from_buckets(client, keys, shorter, ["s"], at)[0], at)


HEAD_ONLY = dataclasses.replace(HEADED, name="headonly", buckets=False)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events_strategy, st.lists(st.integers(0, 3 * 3600 + 40 * 86400), min_size=1, max_size=4), st.integers(1, 7))
def test_a_head_only_set_reads_what_the_bucketed_set_reads(space, raw, offsets, batch):
    """Without buckets the head is the whole state: any arrival order (late, too late, redelivered), read at
    or after the newest event, gives what the same set with buckets gives; each event's unit vector too."""
    client, keys = space
    store = RedisOnlineStore(client, dedup_ttl_s=3600, keys=keys, hasher=HASHER)
    only_keys = KeySpace(f"{keys.prefix}:ho")  # the same entities, stored apart (under the fixture's prefix)
    only = RedisOnlineStore(client, dedup_ttl_s=3600, keys=only_keys, hasher=HASHER)
    card = f"o{secrets.token_hex(4)}"
    events = [_ev(card, i, 7_500_000.0 + t + late, a / 100, term) for i, (t, a, term, late) in enumerate(raw)]
    for i in range(0, len(events), batch):
        chunk = events[i:i + batch]
        bucketed = store.apply_batch([compile_event(HEADED, e, keys, HASHER) for e in chunk])
        units = [event_unit(e.event_id, [compile_event(HEAD_ONLY, e, only_keys, HASHER)], only_keys) for e in chunk]
        for e, (_, snap), (_, (vector,)) in zip(chunk, bucketed, only.apply_units(units), strict=True):
            newest_so_far = max(x.ts for x in events[: events.index(e) + 1])
            if int(e.ts // 60) == int(newest_so_far // 60):  # not late: both answer as of the event
                _assert_same(vector, finalize(HEADED, snap, e.ts), e.ts)
    assert not client.exists(only_keys.entity("card", HASHER.token("card", card)))  # no hash: only the head
    newest = max(e.ts for e in events)
    for off in offsets:
        at = newest + off
        _assert_same(only.read(HEAD_ONLY, card, at=at), store.read(HEADED, card, at=at), at)


# -- the worker path (kestrel/feature_store/head_state.py) against the Lua path ---------------------------------

def _stored_state(client: redis.Redis, keys: KeySpace, cards: list[str]) -> dict:
    """Every head (but its write count) and distinct sorted set of ``cards`` under ``keys``."""
    state = {}
    for card in cards:
        entity = keys.entity("card", HASHER.token("card", card))
        head = client.get(entity + head_suffix(HEAD_ONLY))
        state[card] = (head[:-8] if head else None,
                       client.zrange(entity + "|terminals_1h", 0, -1, withscores=True))
    return state


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 3 * 3600), st.integers(1, 4000), st.sampled_from("abcd"),
                          st.integers(-1500, 0), st.sampled_from("xyz")), min_size=1, max_size=40),
       st.integers(1, 9), st.booleans())
def test_the_worker_path_gives_what_the_lua_path_gives(space, raw, batch, erase_one):
    """Any arrival order (late, too late, redelivered), any batching, several cards per batch, an erased card:
    each event's vectors and everything stored are the same whether Redis or the worker does the arithmetic."""
    client, keys = space
    lua_keys, worker_keys = KeySpace(f"{keys.prefix}:lua"), KeySpace(f"{keys.prefix}:wk")
    lua = RedisOnlineStore(client, dedup_ttl_s=3600, keys=lua_keys, hasher=HASHER, heads_in_worker=False)
    worker = RedisOnlineStore(client, dedup_ttl_s=3600, keys=worker_keys, hasher=HASHER)
    tag = secrets.token_hex(3)
    events = [_ev(f"{card}{tag}", i, 7_500_000.0 + t + late, a / 100, term)
              for i, (t, a, term, late, card) in enumerate(raw)]
    cards = sorted({e.card for e in events})
    if erase_one:
        for ks in (lua_keys, worker_keys):
            client.set(ks.tombstone("card", HASHER.token("card", cards[0])), b"1")
    events += events[: len(events) // 3]  # redeliveries: applied once, answered with the first vectors
    for i in range(0, len(events), batch):
        chunk = events[i:i + batch]
        got = [worker.apply_units([event_unit(e.event_id, [compile_event(HEAD_ONLY, e, worker_keys, HASHER)],
                                              worker_keys)])[0] for e in chunk[:1]]
        got += worker.apply_units([event_unit(e.event_id, [compile_event(HEAD_ONLY, e, worker_keys, HASHER)],
                                              worker_keys) for e in chunk[1:]])
        want = lua.apply_units([event_unit(e.event_id, [compile_event(HEAD_ONLY, e, lua_keys, HASHER)], lua_keys)
                                for e in chunk])
        for e, (applied, (vector,)), (want_applied, (want_vector,)) in zip(chunk, got, want, strict=True):
            assert applied == want_applied, e
            _assert_same(vector, want_vector, e)
    assert _stored_state(client, worker_keys, cards) == _stored_state(client, lua_keys, cards)
    if erase_one:
        assert _stored_state(client, worker_keys, cards[:1]) == {cards[0]: (None, [])}  # nothing recreated


def _contended_card(client: redis.Redis, keys: KeySpace, card: str, t0: float):
    """The Lua-path store (the other writer), three events of ``card`` a minute apart, and an event's unit."""
    lua = RedisOnlineStore(client, dedup_ttl_s=3600, keys=keys, hasher=HASHER, heads_in_worker=False)
    events = tuple(_ev(card, i, t0 + 60 * i, 10.0 * (i + 1), "abc"[i]) for i in range(3))

    def unit(e: SimpleNamespace):
        return event_unit(e.event_id, [compile_event(HEAD_ONLY, e, keys, HASHER)], keys)

    return lua, events, unit


def test_a_batch_whose_entity_changed_after_its_read_is_not_written_and_is_applied_again(space):
    """Optimistic concurrency: another writer between the worker's read and its commit (another worker, the
    Lua path) makes the commit write nothing; the store reads again and the result is as if in sequence."""
    client, keys = space
    worker = RedisOnlineStore(client, dedup_ttl_s=3600, keys=keys, hasher=HASHER)
    lua, (first, second, third), unit = _contended_card(client, keys, "cas", 7_600_000.0)
    worker.apply_units([unit(first)])
    units = [unit(third)]
    batch = HeadBatch(units, keys, worker._head_sets(units), _unit_vectors, 3600)
    with PinnedSync(client) as conn:
        batch.apply(conn.run(batch.read_commands()))
        lua.apply_units([unit(second)])  # meanwhile, another writer
        assert conn.script(worker._commit_heads, batch.commit_args()) == 0  # refused: nothing written
    assert not client.exists(unit(third).applied_key)
    (applied, (vector,)), = worker.apply_units([unit(third)])  # read again, applied on top of the other write
    assert applied and vector["n_10m"] == 3.0 and vector["prev_terminal"] == "b" and vector["terminals_1h"] == 3.0
    ref = KeySpace(f"{keys.prefix}:ref")
    lua_ref = RedisOnlineStore(client, dedup_ttl_s=3600, keys=ref, hasher=HASHER, heads_in_worker=False)
    for e in (first, second, third):
        lua_ref.apply_units([event_unit(e.event_id, [compile_event(HEAD_ONLY, e, ref, HASHER)], ref)])
    assert _stored_state(client, keys, ["cas"]) == _stored_state(client, ref, ["cas"])


def test_work_overlapping_the_commit_is_redone_when_the_commit_is_refused(space, redis_url, monkeypatch):
    """``apply_units_then``: what the caller computes while Redis runs the commit (the worker's scores) is
    computed again from the re-read vectors when the commit was refused, and only the last result is returned."""
    client, keys = space
    lua, (first, second, third), unit = _contended_card(client, keys, "ovl", 7_700_000.0)
    lua.apply_units([unit(first)])
    reads = []
    apply = HeadBatch.apply

    def apply_then_interfere(self, replies):  # another writer between the first read and its commit
        apply(self, replies)
        reads.append(1)
        if len(reads) == 1:
            lua.apply_units([unit(second)])

    monkeypatch.setattr(HeadBatch, "apply", apply_then_interfere)
    seen: list[float] = []

    async def then(results):
        seen.append(results[0][1][0]["n_10m"])
        return results[0][1][0]["n_10m"] * 10

    async def main():
        aclient = aioredis.from_url(redis_url)
        try:
            store = AsyncRedisOnlineStore(aclient, dedup_ttl_s=3600, keys=keys, hasher=HASHER)
            return await store.apply_units_then([unit(third)], then)
        finally:
            await aclient.aclose()

    ((applied, (vector,)),), done = asyncio.run(main())
    assert seen == [2.0, 3.0]  # first from the stale read (its commit refused), then from the fresh one
    assert applied and vector["n_10m"] == 3.0 and done == 30.0
    assert orjson.loads(client.get(unit(third).applied_key)[1:]) == [vector]


# -- distinct counts told by a pair set's head (Windowed.seen_in) ------------------------------------------------

PAIR = FeatureSet("pair", "1", "card_terminal", "test", lambda e: f"{e.card}|{e.terminal}", lambda e: e.ts,
                  (TimeSince("pair_since"),), ttl_s=4 * 3600, owner=("card", lambda e: e.card), buckets=False)
PAIRED_CARD = FeatureSet("paired_card", "1", "card", "test", lambda e: e.card, lambda e: e.ts, (
    Windowed("terminals_1h", "distinct", 3600, 300, value_of=lambda e: e.terminal, seen_in="pair",
             where=lambda e: e.terminal != "d"),
    TimeSince("card_since")), buckets=False)
PAIRED_TERMINAL = FeatureSet("paired_terminal", "1", "terminal", "test", lambda e: e.terminal, lambda e: e.ts, (
    Windowed("cards_2h", "distinct", 7200, 600, value_of=lambda e: e.card, hash_as="card", seen_in="pair"),
    Windowed("n_1h", "count", 3600, 300)), ttl_s=3 * 3600, buckets=False)


def _paired_unit(e: SimpleNamespace, keys: KeySpace, pair_first: bool):
    parts = [compile_event(fs, e, keys, HASHER) for fs in (PAIRED_CARD, PAIRED_TERMINAL, PAIR)]
    return event_unit(e.event_id, parts[-1:] + parts[:-1] if pair_first else parts, keys)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 4 * 3600), st.sampled_from("abcd"), st.integers(-6000, 0),
                          st.sampled_from("xyz")), min_size=1, max_size=40),
       st.integers(1, 9), st.booleans())
def test_distinct_counts_told_by_a_pair_head_equal_the_sorted_sets(space, raw, batch, pair_first):
    """Any arrival order (late, too late, redelivered), any batching, the pair part first or last in the unit:
    the worker path, which reads each value's latest time off the pair's head, gives every event the vectors the
    Lua path gives from its sorted sets, and stores the same heads, without a sorted set of its own."""
    client, keys = space
    lua_keys, worker_keys = KeySpace(f"{keys.prefix}:lua"), KeySpace(f"{keys.prefix}:wk")
    lua = RedisOnlineStore(client, dedup_ttl_s=3600, keys=lua_keys, hasher=HASHER, heads_in_worker=False)
    worker = RedisOnlineStore(client, dedup_ttl_s=3600, keys=worker_keys, hasher=HASHER)
    tag = secrets.token_hex(3)
    events = [_ev(f"{card}{tag}", i, 7_800_000.0 + t + late, 1.0, term)
              for i, (t, term, late, card) in enumerate(raw)]
    events += events[: len(events) // 3]  # redeliveries
    for i in range(0, len(events), batch):
        chunk = events[i:i + batch]
        got = worker.apply_units([_paired_unit(e, worker_keys, pair_first) for e in chunk])
        want = lua.apply_units([_paired_unit(e, lua_keys, pair_first) for e in chunk])
        for e, (applied, vectors), (want_applied, want_vectors) in zip(chunk, got, want, strict=True):
            assert applied == want_applied, e
            for vector, want_vector in zip(vectors, want_vectors, strict=True):
                _assert_same(vector, want_vector, e)
    for fs, ids in ((PAIRED_CARD, {e.card for e in events}), (PAIRED_TERMINAL, {e.terminal for e in events})):
        for entity_ids in sorted(ids):
            (wk,), (lk,) = _entity_keys(worker_keys, fs, [entity_ids]), _entity_keys(lua_keys, fs, [entity_ids])
            assert client.get(wk + head_suffix(fs))[:-8] == client.get(lk + head_suffix(fs))[:-8]
    assert not list(client.scan_iter(match=f"{worker_keys.prefix}:*|terminals_1h"))
    assert not list(client.scan_iter(match=f"{worker_keys.prefix}:*|cards_2h"))


def test_an_erased_card_is_not_counted_among_a_terminals_distinct_cards(space):
    client, keys = space
    worker = RedisOnlineStore(client, dedup_ttl_s=3600, keys=keys, hasher=HASHER)
    t0 = 7_900_000.0
    client.set(keys.tombstone("card", HASHER.token("card", "gone")), b"1")
    events = [_ev("kept", 0, t0, 1.0, "x"), _ev("gone", 1, t0 + 60, 1.0, "x"), _ev("gone", 2, t0 + 120, 1.0, "x"),
              _ev("other", 3, t0 + 180, 1.0, "x")]
    results = worker.apply_units([_paired_unit(e, keys, False) for e in events])
    assert [vectors[1]["cards_2h"] for _, vectors in results] == [1.0, 1.0, 1.0, 2.0]
    assert [vectors[1]["n_1h"] for _, vectors in results] == [1.0, 2.0, 3.0, 4.0]  # the terminal still counts


def test_a_paired_count_needs_its_pair_set_in_the_unit_and_long_enough(space):
    client, keys = space
    worker = RedisOnlineStore(client, dedup_ttl_s=3600, keys=keys, hasher=HASHER)
    e = _ev("c", 0, 7_950_000.0, 1.0, "x")
    alone = event_unit(e.event_id, [compile_event(PAIRED_CARD, e, keys, HASHER)], keys)
    with pytest.raises(ValueError, match="pair set pair is not in the event's unit"):
        worker.apply_units([alone])
    short = dataclasses.replace(PAIR, name="short_pair", ttl_s=3600)
    card = dataclasses.replace(PAIRED_CARD, name="short_card", features=(
        dataclasses.replace(PAIRED_CARD.features[0], seen_in="short_pair"), PAIRED_CARD.features[1]))
    unit = event_unit(e.event_id, [compile_event(card, e, keys, HASHER), compile_event(short, e, keys, HASHER)], keys)
    with pytest.raises(ValueError, match="forgets pairs"):
        worker.apply_units([unit])


# -- the compiled head arithmetic (kestrel/feature_store/head_kernels.py) against the Python path -----------------

# HEAD_ONLY but for its distinct count kept in a sorted set (a compiled kernel tells distinct counts by pairs only)
COMPILED = dataclasses.replace(HEAD_ONLY, name="compiled", features=tuple(
    f for f in HEAD_ONLY.features if not (isinstance(f, Windowed) and f.agg == "distinct")))


def test_the_sets_a_worker_applies_have_compiled_kernels():
    """numba is a pinned dependency: every set a payment feeds, and the test sets below, run compiled."""
    from kestrel.feature_store.head_kernels import kernel_for
    from kestrel.feature_store.redis_store import _arithmetic
    from kestrel.feature_store.sets import CARD_DEVICE, CARD_PROFILE, CARD_TERMINAL, TERMINAL_ACTIVITY

    for fs in (CARD_PROFILE, TERMINAL_ACTIVITY, CARD_TERMINAL, CARD_DEVICE, COMPILED, PAIR, PAIRED_CARD,
               PAIRED_TERMINAL):
        assert kernel_for(_arithmetic(fs)) is not None, fs.name
    assert kernel_for(_arithmetic(HEAD_ONLY)) is None  # its sorted set: the Python path


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 3 * 3600), st.integers(1, 4000), st.sampled_from("abcd"),
                          st.integers(-1500, 0), st.sampled_from("xyz")), min_size=1, max_size=40),
       st.integers(1, 9), st.booleans(), st.booleans())
def test_the_compiled_path_gives_what_the_python_path_gives(space, raw, batch, erase_one, paired):
    """Any arrival order (late, too late, redelivered), any batching, several cards per batch, an erased card,
    single-set units or units of a card, its terminal and their pair: each event's vectors and every stored head
    (write count included) are the same whether the compiled kernels or the Python code apply the batch, and
    the same as the Lua path's (but for the write count; and but for an erased card among a terminal's distinct
    cards, which the Lua path's sorted set counts and a pair's head does not: see the test above)."""
    client, keys = space
    spaces = {name: KeySpace(f"{keys.prefix}:{name}") for name in ("compiled", "python", "lua")}
    stores = {name: RedisOnlineStore(client, dedup_ttl_s=3600, keys=ks, hasher=HASHER,
                                     heads_in_worker=name != "lua") for name, ks in spaces.items()}
    tag = secrets.token_hex(3)  # cards and terminals of their own: an erased card sets the paths apart for good
    events = [_ev(f"{card}{tag}", i, 7_500_000.0 + t + late, a / 100, f"{term}{tag}")
              for i, (t, a, term, late, card) in enumerate(raw)]
    cards = sorted({e.card for e in events})
    if erase_one:
        for ks in spaces.values():
            client.set(ks.tombstone("card", HASHER.token("card", cards[0])), b"1")
    events += events[: len(events) // 3]  # redeliveries: applied once, answered with the first vectors
    sets = (PAIRED_CARD, PAIRED_TERMINAL, PAIR) if paired else (COMPILED,)

    def units(chunk, ks):
        return [event_unit(e.event_id, [compile_event(fs, e, ks, HASHER) for fs in sets], ks) for e in chunk]

    for i in range(0, len(events), batch):
        chunk = events[i:i + batch]
        got = {}
        for name, store in stores.items():
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("KESTREL_HEAD_KERNELS", "0" if name == "python" else "1")
                got[name] = store.apply_units(units(chunk, spaces[name]))
        for e, compiled, python, lua in zip(chunk, got["compiled"], got["python"], got["lua"], strict=True):
            assert compiled[0] == python[0] == lua[0], e
            assert orjson.dumps(compiled[1]) == orjson.dumps(python[1]), e  # the same values and types, in order
            if not (erase_one and paired):
                for vector, want in zip(compiled[1], lua[1], strict=True):
                    _assert_same(vector, want, e)
    for fs in sets:
        ids = sorted({fs.entity_id_of(e) for e in events})
        heads = {name: [client.get(k + head_suffix(fs)) for k in _entity_keys(ks, fs, ids)]
                 for name, ks in spaces.items()}
        assert heads["compiled"] == heads["python"], fs.name
        if not (erase_one and paired):
            lua_heads = [h[:-8] if h else h for h in heads["lua"]]
            assert [h[:-8] if h else h for h in heads["compiled"]] == lua_heads, fs.name
