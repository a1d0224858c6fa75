"""Model variants: an experiment whose variant runs another registered model version (the real Redis, the real
registry, the real processor). Payments routed to it are decided by its model and say so; nothing is enrolled
before the model is loaded; labels teach every loaded version; moving the variant's alias changes its model."""

from __future__ import annotations

import itertools
import secrets
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import orjson
import pytest
import redis
import redis.asyncio as aioredis

from kestrel.feature_store import topics
from kestrel.feature_store.erase import delete_matching
from kestrel.feature_store.keys import KeySpace
from kestrel.feature_store.schemas import Label, Transaction
from kestrel.models.experiment_stats import duration_bucket
from kestrel.models.experiments import Experiment, route
from kestrel.models.registry import ModelRecord, Registry
from kestrel.offline.fraud_train import train_on_shuffled_labels
from kestrel.streams.config import Settings
from kestrel.streams.experiments.results import duration_histograms, experiment_results
from kestrel.streams.experiments.store import ExperimentStore
from kestrel.streams.metrics import Metrics
from kestrel.streams.records import RawRecord
from kestrel.streams.worker.processing import Processor
from tests.integration.test_model_swap import registered_copies

pytestmark = pytest.mark.integration


def _payments(n: int, tag: str) -> list[Transaction]:
    start = datetime.now(UTC) - timedelta(hours=1)
    return [Transaction(event_id=f"{tag}-{i}", timestamp=start + timedelta(seconds=i), card_id=f"4111{i % 120:012d}",
                        merchant_id=f"m{i % 7}", terminal_id=f"t{i % 11}", amount=10.0 + i % 300, currency="EUR")
            for i in range(n)]


def _records(events: list, topic: str) -> list[RawRecord]:
    at_broker = time.time() * 1000 - 5.0  # the records' timestamp (ms): each decision's latency runs from it
    return [RawRecord(topic, 0, i, b"k", e.model_dump_json().encode(), {}, at_broker) for i, e in enumerate(events)]


@pytest.fixture
def registry_and_settings(fraud_model, tmp_path, redis_url):
    registry, (v1, v2, v3) = registered_copies(fraud_model, tmp_path, "challenger", "next")
    root = tmp_path / "registry"
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
        # each enrolled decision's latency and model time, counted once per variant, and again not on a replay
        durations = duration_histograms(sync.hgetall(keys.experiments.durations("model-ab")))
        per_variant = Counter(d["experiments"][0]["variant"] for d in docs)
        for measure in ("latency", "model"):
            assert {v: sum(h.values()) for v, h in durations[measure].items()} == per_variant, measure
        assert min(durations["latency"]["control"]) >= duration_bucket(0.005)  # at least the 5 ms since the broker
        assert await proc.process(topics.TRANSACTIONS, _records(_payments(240, "b"), topics.TRANSACTIONS)) == []
        assert duration_histograms(sync.hgetall(keys.experiments.durations("model-ab"))) == durations
        report = experiment_results(sync, keys, exp)
        assert report["variants"]["challenger"]["model_ms"]["n"] == per_variant["challenger"]
        assert report["variants"]["control"]["decision_latency_ms"]["p99_ms"] >= 5.0

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


def test_through_the_worker_the_truly_better_model_wins_its_experiment(
        settings, worker, outputs, redis_client, fraud_model, tmp_path):
    """The champion learned nothing (shuffled labels); the challenger variant runs the trained model. Simulated
    payments with their true labels through the real broker and worker: the live results say B wins."""
    import dataclasses

    from kestrel.offline.simulator import Simulator, payments_config
    from kestrel.streams.experiments.results import experiment_results
    from kestrel.streams.ingest.producer import EventProducer

    model, path = fraud_model
    root = tmp_path / "registry"
    registry = Registry(root, "fraud")
    weak_model = train_on_shuffled_labels(tmp_path / "shuffled")
    weak = weak_model.version
    registry.register(ModelRecord.new("fraud", weak, tmp_path / "shuffled" / weak))
    registry.register(ModelRecord.new("fraud", model.version, path))
    registry.move("champion", weak, action="force", why="test: the model to beat")
    registry.move("challenger", model.version, action="force", why="test: the trained model")
    keys = KeySpace(settings.redis_prefix)
    store = ExperimentStore(redis_client, keys)
    store.create(Experiment.model_validate({
        "key": "better-model", "target": "fraud", "hash_attribute": "card", "seed": "better-model-1",
        "variants": [{"key": "control"}, {"key": "challenger", "model": "challenger"}],
        "status": "running", "primary_metric": "recall"}), "test")
    worker.settings = settings.with_(fraud_model=str(root))
    worker.start()

    base = payments_config(6000, seed=21, n_cards=600)
    sim = Simulator(dataclasses.replace(base, fraud_incidents_per_sim_hour=base.fraud_incidents_per_sim_hour * 12))
    producer = EventProducer(settings.broker, settings.hash_key)
    warm = [r for r in itertools.islice((r for r in sim.records() if r.kind == "transaction"), 5)]
    for rec in warm:  # the first batches start loading the challenger; none of them is enrolled
        producer.send(rec.event)
    assert producer.flush() == 0
    outputs.wait_for(topics.FRAUD_DECISIONS, {r.event_id for r in warm}, timeout_s=60)
    time.sleep(3)  # the challenger's model loads in a thread meanwhile
    payments = list(itertools.islice((r for r in sim.records() if r.kind == "transaction"), 5000))
    for rec in payments:
        producer.send(rec.event)
    assert producer.flush() == 0
    outputs.wait_for(topics.FRAUD_DECISIONS, {r.event_id for r in payments}, timeout_s=180)
    decisions = {d["event_id"]: d for d in outputs.docs[topics.FRAUD_DECISIONS]}
    enrolled = [decisions[r.event_id]["experiments"][0] for r in payments if "experiments" in decisions[r.event_id]]
    assert len(enrolled) > 0.9 * len(payments)
    assert {(e["variant"], e["model_version"]) for e in enrolled} == {("control", weak),
                                                                      ("challenger", model.version)}

    labels = [Label(event_id=f"lab-{r.event_id}", transaction_id=r.event_id, card_id=r.event.card_id,
                    verdict="fraud" if r.fraud else "genuine", source="chargeback", timestamp=datetime.now(UTC))
              for r in payments]
    for lab in labels:
        producer.send(lab)
    assert producer.flush() == 0
    outputs.wait_for(topics.TRAINING_EXAMPLES, {lab.event_id for lab in labels}, timeout_s=180)
    report = experiment_results(redis_client, keys, store.get("better-model"))
    control, challenger = report["variants"]["control"], report["variants"]["challenger"]
    print(f"frauds {sum(r.fraud for r in payments)}; control {control}; challenger {challenger}; "
          f"{report['comparisons']['challenger']}")
    comparison = report["comparisons"]["challenger"]
    assert comparison["decision"] == "ship" and comparison["ci"][0] > 0, comparison
    assert "B is better on recall" in comparison["verdict"], comparison["verdict"]
