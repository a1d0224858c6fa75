"""The delivery ledger's outbox against the real Redis: a replay re-sends the bytes first attempted.

A worker killed after the broker acknowledged an output but before its
delivery mark was set replays the batch; what it computes the second time
can differ (a recommendation from trending items that moved, a new
``decided_at``), and a consumer keyed by event id must not get two different
decisions for one event.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import orjson
import pytest
import redis.asyncio as aioredis

from kestrel.feature_store import topics
from kestrel.feature_store.erase import delete_matching
from kestrel.models.rules import RuleScorer
from kestrel.streams.config import Settings
from kestrel.streams.metrics import Metrics
from kestrel.streams.records import RawRecord
from kestrel.streams.worker.delivery import DeliveryLedger, outbox_key
from kestrel.streams.worker.processing import Processor

pytestmark = pytest.mark.integration


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[tuple[aioredis.Redis, str]]:
    prefix = f"kestrel-test-outbox-{secrets.token_hex(4)}"
    conn = aioredis.Redis.from_url(redis_url)
    yield conn, prefix
    delete_matching(__import__("redis").Redis.from_url(redis_url), f"{prefix}:*")
    await conn.aclose()


async def test_ledger_resends_what_was_first_attempted_until_marked(client) -> None:
    conn, prefix = client
    ledger = DeliveryLedger(conn, ttl_s=600, writes_ttl_s=600)
    mark, log_key = f"{prefix}:pub:recs:e1", f"{prefix}:decision:e2"
    first = await ledger.unsent([(mark, None, b"first"), (f"{prefix}:pub:fraud:e2", log_key, b"logged")],
                                writes=[(log_key, b"logged")])
    assert first == [b"first", b"logged"]
    again = await ledger.unsent([(mark, None, b"recomputed"), (f"{prefix}:pub:fraud:e2", log_key, b"")],
                                writes=[(log_key, b"other")])
    assert again == [b"first", b"logged"]  # the bytes of the first attempt, not the recomputation
    await ledger.mark([(mark, None), (f"{prefix}:pub:fraud:e2", log_key)])
    assert await ledger.unsent([(mark, None, b"x"), (f"{prefix}:pub:fraud:e2", log_key, b"y")]) == [None, None]
    assert not await conn.exists(outbox_key(mark))  # the transient outbox is gone once delivered
    assert await conn.get(log_key) == b"logged"  # a log kept for its own sake stays


async def test_a_replayed_recommendation_is_byte_identical(client, redis_url: str) -> None:
    conn, prefix = client
    proc = Processor(Settings().with_(redis_prefix=prefix, redis_url=redis_url), conn, Metrics(), scorer=RuleScorer())
    batch = [RawRecord(topics.INTERACTIONS, 0, i, b"u1", orjson.dumps(
        {"type": "interaction", "event_id": f"i{i}", "user_id": "u1", "item_id": f"item-{i}", "kind": "view",
         "timestamp": 1_780_000_000 + i})) for i in range(3)]
    first = await proc.process(topics.INTERACTIONS, batch)
    assert {orjson.loads(o.value)["event_id"] for o in first} == {"i0", "i1", "i2"}
    await asyncio.sleep(0.01)  # a recomputation would carry another decided_at
    replay = await proc.process(topics.INTERACTIONS, batch)  # crashed before the marks: sent again...
    assert [o.value for o in replay] == [o.value for o in first]  # ...byte for byte
    await proc.mark_delivered(replay)
    assert await proc.process(topics.INTERACTIONS, batch) == []


async def test_a_log_that_is_its_own_mark_needs_no_mark_key_and_still_reads_as_json(client) -> None:
    conn, prefix = client
    ledger = DeliveryLedger(conn, ttl_s=600, writes_ttl_s=600)
    log_key, body = f"{prefix}:decision:e3", orjson.dumps({"event_id": "e3", "action": "allow"})
    assert await ledger.unsent([(log_key, log_key, body)], writes=[(log_key, body)]) == [body]
    again = orjson.dumps({"event_id": "e3", "action": "block"})  # recomputed after a crash before the mark
    assert await ledger.unsent([(log_key, log_key, again)], writes=[(log_key, again)]) == [body]
    await ledger.mark([(log_key, log_key)])
    assert await ledger.unsent([(log_key, log_key, again)], writes=[(log_key, again)]) == [None]
    assert orjson.loads(await conn.get(log_key)) == {"event_id": "e3", "action": "allow"}
    assert await conn.ttl(log_key) > 0
    assert [k async for k in conn.scan_iter(match=f"{prefix}:*")] == [log_key.encode()]  # no mark, no outbox


async def test_counts_made_with_a_log_are_added_once_however_often_its_batch_is_replayed(client) -> None:
    conn, prefix = client
    ledger = DeliveryLedger(conn, ttl_s=600, writes_ttl_s=600)
    hist = f"{prefix}:exp:durations:x"
    logs = [(f"{prefix}:decision:e{i}", b"{}") for i in range(3)]
    counts = [(hist, "latency|a|40", logs[0][0]), (hist, "latency|a|40", logs[1][0]), (hist, "model|a|9", logs[1][0]),
              (hist, "latency|b|41", logs[2][0])]
    outputs = [(key, key, body) for key, body in logs]
    await ledger.unsent(outputs[:2], logs[:2], counts[:3])  # the first attempt of e0 and e1
    assert await conn.hgetall(hist) == {b"latency|a|40": b"2", b"model|a|9": b"1"}
    await ledger.unsent(outputs, logs, counts)  # replayed with e2 added: e0 and e1 count nothing more
    await ledger.unsent(outputs, logs, counts)
    assert await conn.hgetall(hist) == {b"latency|a|40": b"2", b"model|a|9": b"1", b"latency|b|41": b"1"}
