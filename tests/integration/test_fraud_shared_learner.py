"""The online learner shared by workers: concurrent label batches from several workers lose no update."""

from __future__ import annotations

import asyncio
import secrets

import orjson
import pytest
import redis.asyncio as aioredis

from kestrel.feature_store.keys import KeySpace
from kestrel.models.fraud_model import ModelScorer
from kestrel.models.policy import Policy
from kestrel.streams.worker.shared_learner import SharedLearner

pytestmark = pytest.mark.integration


def test_concurrent_workers_lose_no_update_and_learn_each_label_once(redis_url, fraud_model):
    model, _ = fraud_model
    scorer = ModelScorer(model, Policy(review=0.5))
    keys = KeySpace(f"kestrel-test-shared-{secrets.token_hex(4)}")
    start = model.online.labels_seen

    async def run() -> tuple[int, int]:
        clients = [aioredis.Redis.from_url(redis_url) for _ in range(3)]
        workers = [SharedLearner(c, keys, scorer, ttl_s=600) for c in clients]

        async def worker(w: SharedLearner, name: str) -> None:
            for batch in range(15):
                ids = [f"{name}-{batch}-{i}" for i in range(5)] + ["shared-label"]  # one label every worker sees

                def teach(learner, ids=ids):
                    for label_id in ids:
                        learner.learn(label_id, {"new_device": 1.0}, True, 0.0)

                await w.update(teach)
                await asyncio.sleep(0)

        await asyncio.gather(*(worker(w, f"w{i}") for i, w in enumerate(workers)))
        final = await workers[0].current()
        await asyncio.sleep(0)
        fresh = await SharedLearner(clients[0], keys, scorer, ttl_s=600, refresh_s=0.0).current()
        for c in clients:
            await c.delete(keys.global_(f"online_fraud:{model.version}"))
            await c.aclose()
        return final.labels_seen, fresh.labels_seen

    cached, stored = asyncio.run(run())
    assert stored - start == 3 * 15 * 5 + 1  # every distinct label once, the shared one once
    assert cached <= stored


def test_a_label_that_arrives_before_its_payment_is_learned_when_the_payment_is_decided(redis_url, fraud_model):
    """The labels topic may run ahead of the transactions topic: the label waits, then counts once."""
    import redis

    from kestrel.feature_store import topics
    from kestrel.feature_store.erase import delete_matching
    from kestrel.streams.config import Settings
    from kestrel.streams.metrics import Metrics
    from kestrel.streams.records import RawRecord
    from kestrel.streams.worker.processing import Processor

    model, _ = fraud_model
    prefix = f"kestrel-test-early-{secrets.token_hex(4)}"
    t0 = 1_780_000_000.0

    def txn(event_id: str, at: float) -> RawRecord:
        doc = {"type": "transaction", "event_id": event_id, "card_id": f"card-{event_id}", "merchant_id": "m-9",
               "terminal_id": "t-9", "amount": 900.0, "currency": "EUR", "timestamp": at, "card_present": False,
               "device_id": f"dev-{event_id}"}
        return RawRecord(topics.TRANSACTIONS, 0, 0, b"k", orjson.dumps(doc))

    label = {"type": "label", "event_id": "early-label-1", "transaction_id": "early-1", "verdict": "fraud",
             "source": "chargeback", "card_id": "card-early-1", "timestamp": t0 + 60}

    async def run() -> dict:
        client = aioredis.Redis.from_url(redis_url)
        proc = Processor(Settings().with_(redis_prefix=prefix, redis_url=redis_url), client, Metrics(),
                         scorer=ModelScorer(model, Policy(review=0.5)))
        try:
            out = await proc.process(topics.LABELS, [RawRecord(topics.LABELS, 0, 0, b"k", orjson.dumps(label))])
            (example,) = [orjson.loads(o.value) for o in out if o.topic == topics.TRAINING_EXAMPLES]
            parked = await client.hgetall(proc.keys.early_labels("early-1"))
            seen_before = (await proc.learner.current()).seen("early-label-1")
            await proc.process(topics.TRANSACTIONS, [txn("early-1", t0)])
            learner = await proc.learner.current()
            seen_after, count = learner.seen("early-label-1"), learner.labels_seen
            left = await client.exists(proc.keys.early_labels("early-1"))
            await proc.process(topics.TRANSACTIONS, [txn("early-1", t0)])  # redelivered: nothing counts twice
            again = (await proc.learner.current()).labels_seen
            later = await proc.process(topics.TRANSACTIONS, [txn("early-2", t0 + 8 * 86400)])  # same terminal
            (decision,) = [orjson.loads(o.value) for o in later if o.topic == topics.FRAUD_DECISIONS]
            return {"example": example, "parked": parked, "seen_before": seen_before, "seen_after": seen_after,
                    "count": count, "again": again, "left": left, "later": decision["features"],
                    "parked_metric": proc.metrics.online_labels.labels("parked")._value.get()}
        finally:
            await client.delete(proc.keys.global_(f"online_fraud:{model.version}"))
            await client.aclose()
            delete_matching(redis.Redis.from_url(redis_url), f"{prefix}:*")

    r = asyncio.run(run())
    assert r["example"]["decision"] is None and "kept for the online learner" in r["example"]["note"]
    assert list(r["parked"]) == [b"early-label-1"] and b"card-early-1" not in r["parked"][b"early-label-1"]
    assert r["parked_metric"] == 1
    assert not r["seen_before"] and r["seen_after"]
    assert r["again"] == r["count"] and r["left"] == 0
    assert r["later"]["terminal_frauds_30d_d7"] == 1  # the terminal's fraud count got the early label too
