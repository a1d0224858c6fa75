"""Recommendation experiments in the real processor (real Redis): each user's variant shapes the recommendations
it gets and is named in them, the first exposure is proposed once, and clicks and purchases within the attribution
window after it count for the variant, once per user."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta

import orjson
import pytest
import redis
import redis.asyncio as aioredis

from kestrel.feature_store import topics
from kestrel.feature_store.erase import delete_matching
from kestrel.feature_store.keys import KeySpace
from kestrel.feature_store.schemas import Interaction
from kestrel.models.experiments import Experiment, route
from kestrel.streams.config import Settings
from kestrel.streams.experiments.results import experiment_results
from kestrel.streams.experiments.store import ExperimentStore
from kestrel.streams.metrics import Metrics
from kestrel.streams.records import RawRecord
from kestrel.streams.worker.processing import Processor

pytestmark = pytest.mark.integration


def _interactions(users: range, kind: str, tag: str) -> list[RawRecord]:
    at = datetime.now(UTC) - timedelta(minutes=5)
    events = [Interaction(event_id=f"{tag}-{u}", timestamp=at, user_id=f"user-{u}", item_id=f"item-{u % 40}",
                          kind=kind) for u in users]
    return [RawRecord(topics.INTERACTIONS, 0, i, b"k", e.model_dump_json().encode(), {}, None)
            for i, e in enumerate(events)]


@pytest.fixture
async def processor(redis_url):
    prefix = f"kestrel-test-recs-exp-{secrets.token_hex(4)}"
    settings = Settings().with_(redis_prefix=prefix, redis_url=redis_url)
    sync = redis.Redis.from_url(redis_url)
    client = aioredis.Redis.from_url(redis_url)
    yield Processor(settings, client, Metrics()), sync, KeySpace(prefix)
    await client.aclose()
    delete_matching(sync, f"{prefix}:*")


async def test_variants_shape_recommendations_and_clicks_count_once_per_exposed_user(processor) -> None:
    proc, sync, keys = processor
    exp = Experiment.model_validate({
        "key": "recs-short", "target": "recs", "hash_attribute": "user", "seed": "recs-short-1",
        "variants": [{"key": "control"}, {"key": "short", "params": {"k": 3}}],
        "primary_metric": "ctr", "status": "running"})
    ExperimentStore(sync, keys).create(exp, "test")
    outs = await proc.process(topics.INTERACTIONS, _interactions(range(200), "view", "a"))
    recs = [orjson.loads(o.value) for o in outs if o.topic == topics.RECOMMENDATION_DECISIONS]
    exposures = [orjson.loads(o.value) for o in outs if o.topic == topics.EXPOSURES]
    variant_of = {}
    for doc in recs:
        (enrolled,) = doc["experiments"]
        assert enrolled["variant"] == route(exp, {"user": doc["user"]}).variant  # GrowthBook's assignment
        assert len(doc["items"]) <= (3 if enrolled["variant"] == "short" else 10)  # the variant's k
        variant_of[doc["user"]] = enrolled["variant"]
    assert {len(d["items"]) for d in recs if variant_of[d["user"]] == "control"} - {0, 1, 2, 3}  # control: more
    assert sorted((x["unit"], x["variant"]) for x in exposures) == sorted(variant_of.items())
    # each exposure carries the user's engagement before it (one view, no click yet): CUPED's covariate
    assert {x["pre_period"]["engagement"] for x in exposures} == {0.0}
    await proc.mark_delivered(outs)
    again = await proc.process(topics.INTERACTIONS, _interactions(range(200), "view", "b"))
    assert not [o for o in again if o.topic == topics.EXPOSURES]  # each user's first exposure only
    await proc.mark_delivered(again)

    # one user's window is long over: a click now is not the variant's doing
    late_user = next(iter(variant_of))
    sync.hset(keys.experiments.exposed_at("recs-short"), late_user, repr(datetime.now(UTC).timestamp() - 2 * 86400))
    clicks = _interactions(range(0, 120), "click", "c") + _interactions(range(0, 120), "click", "c2")  # twice each
    await proc.mark_delivered(await proc.process(topics.INTERACTIONS, clicks))
    await proc.mark_delivered(await proc.process(topics.INTERACTIONS, _interactions(range(0, 30), "purchase", "p")))
    await proc.mark_delivered(await proc.process(topics.INTERACTIONS, _interactions(range(500, 520), "click", "x")))

    report = experiment_results(sync, keys, exp)
    tokens = [proc.token("user", f"user-{u}") for u in range(200)]
    newcomers = [proc.token("user", f"user-{u}") for u in range(500, 520)]
    for variant in ("control", "short"):
        mine = [t for t in tokens if variant_of[t] == variant]
        row = report["variants"][variant]
        # the newcomers' first clicks came before their first exposure: exposed then, but no click counted
        assert row["units"] == len(mine) + sum(route(exp, {"user": t}).variant == variant for t in newcomers)
        assert row["clicked"] == sum(1 for i, t in enumerate(tokens) if t in mine and i < 120 and t != late_user)
        assert row["purchased"] == sum(1 for i, t in enumerate(tokens) if t in mine and i < 30 and t != late_user)
        assert row["ctr"] == round(row["clicked"] / row["units"], 4)
    assert report["primary_metric"] == "ctr" and not report["srm"]
    assert "difference" in report["comparisons"]["short"]
    # CUPED: the newcomers were exposed after their click (engagement 1 before it) and never counted a click
    # afterwards; the others had none before: the covariate explains part of the outcome's variance
    pre = {k.decode(): float(v) for k, v in sync.hgetall(keys.experiments.pre_period("recs-short")).items()}
    assert {pre[t] for t in newcomers} == {1.0} and {pre[t] for t in tokens} == {0.0}
    cuped = report["cuped"]
    assert cuped["variance_reduction"] > 0 and "ci" in cuped["comparisons"]["short"]


def test_http_and_request_topic_recommendations_are_routed_and_exposed_once(settings, worker, outputs,
                                                                            redis_client):
    """Through the real broker and worker: ``GET /recommendations`` and ``recs.requests`` answers name the variant,
    and a user asking twice, over both paths, is exposed once."""
    import time
    import urllib.request

    from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

    keys = KeySpace(settings.redis_prefix)
    exp = Experiment.model_validate({
        "key": "recs-http", "target": "recs", "hash_attribute": "user", "seed": "recs-http-1",
        "variants": [{"key": "control"}, {"key": "diverse", "params": {"mmr_lambda": 0.5, "per_category": 2}}],
        "primary_metric": "ctr", "status": "running"})
    ExperimentStore(redis_client, keys).create(exp, "test")
    worker.start()
    users = [f"http-user-{i}" for i in range(6)]
    want = {u: route(exp, {"user": worker_token(settings, u)}).variant for u in users}
    for user in users:
        for _ in range(2):
            with urllib.request.urlopen(f"{worker.url}/recommendations/{user}?k=4", timeout=10) as resp:
                body = orjson.loads(resp.read())
            assert body["experiments"] == [{"experiment": "recs-http", "variant": want[user],
                                            "model_version": body["model_version"]}]
    consumer = Consumer({"bootstrap.servers": settings.broker, "group.id": f"t-{secrets.token_hex(4)}",
                         "enable.auto.commit": False, "fetch.wait.max.ms": 10})
    consumer.assign([TopicPartition(topics.RECS_RESPONSES, p, OFFSET_BEGINNING) for p in range(settings.partitions)])
    producer = Producer({"bootstrap.servers": settings.broker})
    producer.produce(topics.RECS_REQUESTS, key=b"r1", value=orjson.dumps({"request_id": "r1", "user_id": users[0],
                                                                           "k": 4}))
    producer.flush(10)
    answer = None
    deadline = time.monotonic() + 30
    while answer is None and time.monotonic() < deadline:
        for msg in consumer.consume(10, timeout=0.2):
            if msg.error() is None and msg.key() == b"r1":
                answer = orjson.loads(msg.value())
    consumer.close()
    assert answer is not None and answer["experiments"][0]["variant"] == want[users[0]]
    outputs.poll(2.0)
    exposures = [d for d in outputs.docs[topics.EXPOSURES] if d["experiment"] == "recs-http"]
    assert sorted((d["unit"], d["variant"]) for d in exposures) == sorted(
        (worker_token(settings, u), want[u]) for u in users)  # once per user, though asked three times


def worker_token(settings: Settings, user_id: str) -> str:
    from kestrel.feature_store.keys import KeyedHasher

    return KeyedHasher(settings.hash_key.encode()).token("user", user_id)
