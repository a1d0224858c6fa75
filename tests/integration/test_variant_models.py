"""Model variants: an experiment whose variant runs another registered model version (the real Redis, the real
registry, the real processor). Payments routed to it are decided by its model and say so; nothing is enrolled
before the model is loaded; labels teach every loaded version; moving the variant's alias changes its model."""

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
from kestrel.feature_store.schemas import Label, Transaction
from kestrel.models.experiments import Experiment, route
from kestrel.models.registry import ModelRecord, Registry
from kestrel.streams.config import Settings
from kestrel.streams.experiments.store import ExperimentStore
from kestrel.streams.metrics import Metrics
from kestrel.streams.records import RawRecord
from kestrel.streams.worker.processing import Processor
from tests.integration.test_model_swap import _copy_as

pytestmark = pytest.mark.integration


def _payments(n: int, tag: str) -> list[Transaction]:
    start = datetime.now(UTC) - timedelta(hours=1)
    return [Transaction(event_id=f"{tag}-{i}", timestamp=start + timedelta(seconds=i), card_id=f"4111{i % 120:012d}",
                        merchant_id=f"m{i % 7}", terminal_id=f"t{i % 11}", amount=10.0 + i % 300, currency="EUR")
            for i in range(n)]


def _records(events: list, topic: str) -> list[RawRecord]:
    return [RawRecord(topic, 0, i, b"k", e.model_dump_json().encode(), {}, None) for i, e in enumerate(events)]


@pytest.fixture
def registry_and_settings(fraud_model, tmp_path, redis_url):
    model, path = fraud_model
    root = tmp_path / "registry"
    registry = Registry(root, "fraud")
    v1, v2, v3 = model.version, f"{model.version}-challenger", f"{model.version}-next"
    registry.register(ModelRecord.new("fraud", v1, path))
    for version in (v2, v3):
        registry.register(ModelRecord.new("fraud", version, _copy_as(path, tmp_path / "artifacts", version)))
    registry.move("champion", v1, action="force", why="test")
    registry.move("challenger", v2, action="force", why="test")
    prefix = f"kestrel-test-variants-{secrets.token_hex(4)}"
    yield registry, (v1, v2, v3), Settings().with_(redis_prefix=prefix, redis_url=redis_url, fraud_model=str(root))
    delete_matching(redis.Redis.from_url(redis_url), f"{prefix}:*")


async def test_a_variant_runs_its_model_once_loaded_and_follows_its_alias(registry_and_settings) -> None:
    registry, (v1, v2, v3), settings = registry_and_settings
    sync = redis.Redis.from_url(settings.redis_url)
    keys = KeySpace(settings.redis_prefix)
    exp = Experiment.model_validate({
        "key": "model-ab", "target": "fraud", "hash_attribute": "card", "seed": "model-ab-1",
        "variants": [{"key": "control"}, {"key": "challenger", "model": "challenger"}],
        "primary_metric": "alert_precision", "status": "running"})
    ExperimentStore(sync, keys).create(exp, "test")
    client = aioredis.Redis.from_url(settings.redis_url)
    metrics = Metrics()
    proc = Processor(settings, client, metrics)
    proc.variant_models.refresh_s = 0.0
    try:
        assert proc.scorer.version == v1
        before = [orjson.loads(o.value) for o in await proc.process(topics.TRANSACTIONS,
                                                                    _records(_payments(60, "a"), topics.TRANSACTIONS))]
        decisions = [d for d in before if d.get("type") != "exposure"]
        # the challenger's model was not loaded when this batch was decided: no one enrolled, all by the champion
        assert {d["model_version"] for d in decisions} == {v1} and not any("experiments" in d for d in decisions)
        assert metrics.experiments_idle.labels("model_not_loaded")._value.get() == 60
        await proc.variant_models.settle()

        outs = await proc.process(topics.TRANSACTIONS, _records(_payments(240, "b"), topics.TRANSACTIONS))
        docs = [orjson.loads(o.value) for o in outs if o.topic == topics.FRAUD_DECISIONS]
        exposures = [orjson.loads(o.value) for o in outs if o.topic == topics.EXPOSURES]
        by_variant: dict[str, set[str]] = {}
        for d in docs:
            (enrolled,) = d["experiments"]
            want = route(exp, {"card": d["card"]}).variant
            assert enrolled["variant"] == want  # GrowthBook's assignment, as the pure router gives it
            assert d["model_version"] == enrolled["model_version"] == (v2 if want == "challenger" else v1)
            by_variant.setdefault(want, set()).add(d["card"])
        assert set(by_variant) == {"control", "challenger"}
        assert sorted((x["unit"], x["variant"], x["model_version"]) for x in exposures) == sorted(
            (card, variant, v2 if variant == "challenger" else v1) for variant, cards in by_variant.items()
            for card in cards)  # each card's first exposure, once, naming the version that decided it
        await proc.mark_delivered(outs)

        labels = [Label(event_id=f"l-{d['event_id']}", timestamp=datetime.now(UTC), transaction_id=d["event_id"],
                        verdict="fraud" if i % 5 == 0 else "genuine", source="chargeback")
                  for i, d in enumerate(docs[:50])]
        await proc.process(topics.LABELS, _records(labels, topics.LABELS))
        for version in (v1, v2):  # both versions learned from every label, whichever decided the payment
            learned = sync.hget(keys.global_(f"online_fraud:{version}"), "rev")
            assert learned is not None and int(learned) >= 1, version

        registry.move("challenger", v3, action="force", why="next challenger")
        await proc.process(topics.TRANSACTIONS, _records(_payments(1, "c"), topics.TRANSACTIONS))  # starts the refresh
        await proc.variant_models.settle()
        outs = await proc.process(topics.TRANSACTIONS, _records(_payments(240, "d"), topics.TRANSACTIONS))
        versions = {orjson.loads(o.value)["experiments"][0]["variant"]: orjson.loads(o.value)["model_version"]
                    for o in outs if o.topic == topics.FRAUD_DECISIONS}
        assert versions == {"control": v1, "challenger": v3}
    finally:
        await client.aclose()


async def test_a_variant_whose_model_cannot_load_enrols_no_one(registry_and_settings) -> None:
    _, (v1, _, _), settings = registry_and_settings
    sync = redis.Redis.from_url(settings.redis_url)
    ExperimentStore(sync, KeySpace(settings.redis_prefix)).create(Experiment.model_validate({
        "key": "ghost", "target": "fraud", "hash_attribute": "card", "seed": "ghost",
        "variants": [{"key": "control"}, {"key": "ghost", "model": "no-such-alias"}],
        "primary_metric": "alert_precision", "status": "running"}), "test")
    client = aioredis.Redis.from_url(settings.redis_url)
    proc = Processor(settings, client, Metrics())
    try:
        for tag in ("a", "b"):
            outs = await proc.process(topics.TRANSACTIONS, _records(_payments(40, tag), topics.TRANSACTIONS))
            await proc.variant_models.settle()
            assert {o.topic for o in outs} <= {topics.FRAUD_DECISIONS, topics.ALERTS}  # no exposure
            docs = [orjson.loads(o.value) for o in outs if o.topic == topics.FRAUD_DECISIONS]
            assert len(docs) == 40 and {d["model_version"] for d in docs} == {v1}
            assert not any("experiments" in d for d in docs)
    finally:
        await client.aclose()
