"""The online learner shared by workers: concurrent label batches from several workers lose no update."""

from __future__ import annotations

import asyncio
import secrets

import pytest
import redis.asyncio as aioredis

from feature_store.keys import KeySpace
from models.fraud_model import ModelScorer
from models.policy import Policy
from streams.fraud_online import SharedLearner

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
