"""Faults that must not stall or corrupt a worker: a poison record, Redis out of reach.

The worker's batch stages (``Runtime.prepare``) run here against real Redis
servers: the shared one, and a private ``redis-server`` that the tests freeze
with SIGSTOP (connections hang, as behind a dead network) and thaw again.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import secrets
import signal
from collections import Counter
from collections.abc import Iterator
from types import SimpleNamespace

import orjson
import pytest
import redis
import redis.asyncio as aioredis

from kestrel.feature_store import topics
from kestrel.feature_store.erase import delete_matching
from kestrel.feature_store.keys import KeyedHasher, KeySpace
from kestrel.feature_store.redis_store import RedisOnlineStore
from kestrel.feature_store.sets import CARD_PROFILE
from kestrel.models.rules import RuleScorer
from kestrel.offline.simulator import SimConfig, Simulator
from kestrel.streams.config import Settings
from kestrel.streams.services import LocalRedis
from kestrel.streams.worker.processing import Processor
from kestrel.streams.worker.runtime import Runtime

pytestmark = pytest.mark.integration


def _payments(n: int, seed: int = 5) -> list[SimpleNamespace]:
    """``n`` valid simulated payments as the Faust events a worker's agent is handed."""
    recs = itertools.islice((r for r in Simulator(SimConfig(seed=seed, invalid_share=0.0)).records()
                             if r.kind == "transaction" and r.valid), n)
    return [SimpleNamespace(message=SimpleNamespace(partition=0, offset=i, key=r.key, value=r.value, headers=[],
                                                    timestamp=None), event=r.event)
            for i, r in enumerate(recs)]


def _runtime(settings: Settings, client: aioredis.Redis, scorer: RuleScorer | None = None) -> Runtime:
    runtime = Runtime(None, settings)  # type: ignore[arg-type]  # no app: these tests do not produce
    runtime._processor = Processor(settings, client, runtime.metrics, scorer=scorer or RuleScorer())
    return runtime


class PoisonScorer(RuleScorer):
    """Raises on any batch that holds one given payment, as a scorer bug triggered by one record would."""

    def __init__(self, poison_id: str) -> None:
        super().__init__()
        self.poison_id = poison_id

    def score_batch(self, events, features):  # type: ignore[no-untyped-def]
        if any(e.event_id == self.poison_id for e in events):
            raise ValueError("scorer cannot handle this payment")
        return super().score_batch(events, features)


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    p = f"kestrel-test-faults-{secrets.token_hex(4)}"
    yield p
    delete_matching(redis.Redis.from_url(redis_url), f"{p}:*")


async def test_a_poison_record_is_dead_lettered_after_bounded_retries(redis_url: str, prefix: str) -> None:
    events = _payments(20)
    poison = events[7]
    settings = Settings().with_(redis_url=redis_url, redis_prefix=prefix, poison_retries=2)
    client = aioredis.Redis.from_url(redis_url)
    runtime = _runtime(settings, client, PoisonScorer(poison.event.event_id))
    batch = await asyncio.wait_for(runtime.prepare(topics.TRANSACTIONS, events), timeout=30)
    by_topic = Counter(o.topic for o in batch.outputs)
    assert by_topic[topics.FRAUD_DECISIONS] == 19  # every other payment is decided
    (dead,) = [orjson.loads(o.value) for o in batch.outputs if o.topic == topics.DEADLETTER]
    assert dead["reason"] == "processing_failed" and "scorer cannot handle" in dead["message"]
    assert base64.b64decode(dead["value_b64"]) == poison.message.value  # the original bytes, for a replay
    decided = {orjson.loads(o.value)["event_id"] for o in batch.outputs if o.topic == topics.FRAUD_DECISIONS}
    assert decided == {e.event.event_id for e in events} - {poison.event.event_id}
    failures = runtime.metrics.batch_failures.labels(topics.TRANSACTIONS, "poison")._value.get()
    assert failures == 2
    await client.aclose()


@pytest.fixture
def frozen_redis() -> Iterator[LocalRedis]:
    """A private redis-server (never the shared one: it is frozen with SIGSTOP)."""
    local = LocalRedis("redis://127.0.0.1:1/0").start()
    assert local.started and local.proc is not None
    yield local
    os.kill(local.proc.pid, signal.SIGCONT)
    local.stop()


def _card_counts(url: str, prefix: str, events: list[SimpleNamespace]) -> dict[str, float]:
    hasher = KeyedHasher(Settings().hash_key.encode())
    store = RedisOnlineStore(redis.Redis.from_url(url), 600, KeySpace(prefix), hasher)
    cards = sorted({e.event.card_id for e in events})
    at = max(e.event.epoch_s for e in events)
    return dict(zip(cards, (v["txn_count_30d"] for v in store.read_batch(CARD_PROFILE, cards, at)), strict=True))


async def test_while_redis_is_unreachable_payments_wait(frozen_redis: LocalRedis) -> None:
    events = _payments(20)
    settings = Settings().with_(redis_url=frozen_redis.url, redis_prefix="kestrel-wait", redis_timeout_s=0.3)
    client = aioredis.Redis.from_url(frozen_redis.url, socket_timeout=0.3, socket_connect_timeout=0.3)
    runtime = _runtime(settings, client)
    await runtime.processor.warm_up()
    assert frozen_redis.proc is not None
    os.kill(frozen_redis.proc.pid, signal.SIGSTOP)
    task = asyncio.ensure_future(runtime.prepare(topics.TRANSACTIONS, events))
    await asyncio.sleep(2.0)
    assert not task.done()  # no decision without the features, and nothing skipped
    os.kill(frozen_redis.proc.pid, signal.SIGCONT)
    batch = await asyncio.wait_for(task, timeout=30)
    docs = [orjson.loads(o.value) for o in batch.outputs if o.topic == topics.FRAUD_DECISIONS]
    assert len(docs) == 20 and not any(d.get("degraded") for d in docs)
    assert runtime.metrics.batch_failures.labels(topics.TRANSACTIONS, "transient")._value.get() >= 1
    expected = Counter(e.event.card_id for e in events)
    assert _card_counts(frozen_redis.url, "kestrel-wait", events) == {c: float(n) for c, n in expected.items()}
    await client.aclose()


async def test_degraded_mode_decides_by_rules_and_applies_the_features_once_redis_is_back(
        frozen_redis: LocalRedis) -> None:
    events = _payments(20)
    large = events[3]  # a payment the rules flag on its own (large amount): its alert must follow the recovery
    large.message.value = orjson.dumps({**orjson.loads(large.message.value), "amount": 5000.0})
    settings = Settings().with_(redis_url=frozen_redis.url, redis_prefix="kestrel-degraded", redis_timeout_s=0.3,
                                degraded_mode="rules")
    client = aioredis.Redis.from_url(frozen_redis.url, socket_timeout=0.3, socket_connect_timeout=0.3)
    runtime = _runtime(settings, client)
    await runtime.processor.warm_up()
    assert frozen_redis.proc is not None
    os.kill(frozen_redis.proc.pid, signal.SIGSTOP)
    batch = await asyncio.wait_for(runtime.prepare(topics.TRANSACTIONS, events), timeout=10)
    assert batch.degraded
    docs = [orjson.loads(o.value) for o in batch.outputs]
    assert len(docs) == 20 and all(d["degraded"] is True and d["model_version"] == "rules-v2" for d in docs)
    assert runtime.metrics.degraded._value.get() == 20
    # while the outage lasts, the next batch is decided at once, without waiting for a timeout
    later = await asyncio.wait_for(runtime.prepare(topics.TRANSACTIONS, _payments(5, seed=6)), timeout=1.0)
    assert later.degraded and len(later.outputs) == 5

    os.kill(frozen_redis.proc.pid, signal.SIGCONT)
    alerts = await asyncio.wait_for(runtime.processor.recover(topics.TRANSACTIONS, batch.records, batch.outputs),
                                    timeout=30)
    # the large payment's degraded decision (review, by the rules alone) raises its alert once Redis is back
    flagged = [d for d in docs if d["action"] != "allow"]
    assert [d["event_id"] for d in flagged] == [large.event.event_id]
    assert [o.topic for o in alerts] == [topics.ALERTS]
    alert = orjson.loads(alerts[0].value)
    assert alert["type"] == "fraud_alert" and alert["card"] == flagged[0]["card"]
    # a retry before the alert was delivered returns the same alert, byte for byte (the desk's markers)
    retry = await runtime.processor.recover(topics.TRANSACTIONS, batch.records, batch.outputs)
    assert [o.value for o in retry] == [alerts[0].value]
    await runtime.processor.mark_delivered(alerts)  # what the runtime does once the broker acked them
    expected = Counter(e.event.card_id for e in events)
    assert _card_counts(frozen_redis.url, "kestrel-degraded", events) == {c: float(n) for c, n in expected.items()}
    # the degraded decisions are the logged ones, and delivered: a replay of the batch sends nothing again
    logged = await client.get(f"kestrel-degraded:decision:{docs[0]['event_id']}")
    assert orjson.loads(logged)["degraded"] is True
    assert await runtime.processor.process(topics.TRANSACTIONS, batch.records) == []
    # and recovering again (a retry after a lost reply) changes nothing and sends no alert twice
    assert await runtime.processor.recover(topics.TRANSACTIONS, batch.records, batch.outputs) == []
    assert _card_counts(frozen_redis.url, "kestrel-degraded", events) == {c: float(n) for c, n in expected.items()}
    await client.aclose()
