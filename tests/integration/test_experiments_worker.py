"""A fraud experiment through the real worker: variants in decisions and acted on, each card's first exposure
published once per card across a SIGKILL and a restart (a copy only from the batch in flight, byte-identical) and
counted once, a stop reaching the worker."""

from __future__ import annotations

import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from kestrel.feature_store import topics
from kestrel.feature_store.keys import KeySpace
from kestrel.feature_store.schemas import Label, Transaction
from kestrel.models.experiments import Experiment
from kestrel.streams.experiments.results import experiment_results
from kestrel.streams.experiments.store import ExperimentStore
from kestrel.streams.ingest.producer import EventProducer

pytestmark = pytest.mark.integration


def _payments(cards: int, per_card: int, tag: str) -> list[Transaction]:
    start = datetime.now(UTC) - timedelta(hours=2)
    return [Transaction(event_id=f"{tag}-{c}-{i}", timestamp=start + timedelta(seconds=60 * i + c % 50),
                        card_id=f"4000{c:012d}", merchant_id=f"m{c % 17}", terminal_id=f"t{c % 23}",
                        amount=20.0 + (c * 7 + i) % 90, currency="EUR")
            for i in range(per_card) for c in range(cards)]


def test_variants_exposures_once_across_a_crash_and_a_stop(settings, worker, outputs, redis_client):
    store = ExperimentStore(redis_client, KeySpace(settings.redis_prefix))
    store.create(Experiment.model_validate({
        "key": "review-all", "target": "fraud", "hash_attribute": "card", "seed": "review-all-1",
        "variants": [{"key": "control"}, {"key": "strict", "params": {"review_threshold": 0.0}}],
        "primary_metric": "recall"}), "test")
    store.start("review-all", "test")
    worker.start()
    producer = EventProducer(settings.broker, settings.hash_key)
    first, second = _payments(300, 2, "a"), _payments(300, 2, "b")
    for t in first:
        producer.send(t)
    assert producer.flush() == 0
    deadline = time.monotonic() + 60
    while len(outputs.docs[topics.FRAUD_DECISIONS]) < 150 and time.monotonic() < deadline:
        outputs.poll(0.1)
    worker.kill()  # SIGKILL mid-stream: exposures and decisions of unacked batches are sent again
    for t in second:
        producer.send(t)
    assert producer.flush() == 0
    worker.start()
    ids = {t.event_id for t in first + second}
    outputs.wait_for(topics.FRAUD_DECISIONS, ids, timeout_s=120)
    outputs.poll(1.5)

    decisions = {d["event_id"]: d for d in outputs.docs[topics.FRAUD_DECISIONS]}
    assert ids <= set(decisions)
    variant_of: dict[str, set[str]] = {}
    for d in decisions.values():
        (enrolled,) = d["experiments"]  # coverage 1: every payment is in the experiment
        variant_of.setdefault(d["card"], set()).add(enrolled["variant"])
        if enrolled["variant"] == "strict":
            assert d["action"] != "allow"  # the variant's threshold is what decided
    assert all(len(v) == 1 for v in variant_of.values())  # sticky per card, across the restart
    share = sum(v == {"strict"} for v in variant_of.values()) / len(variant_of)
    assert 0.35 < share < 0.65
    # One exposure per unit: outputs already marked delivered are not sent again after the restart. A kill
    # between the broker's ack and the mark re-sends the batch in flight from its outbox, byte for byte, so
    # a consumer keyed by event_id still sees one exposure (the delivery contract, README "Delivery semantics").
    copies: dict[str, set[bytes]] = {}
    for raw in outputs.raw[topics.EXPOSURES]:
        copies.setdefault(orjson.loads(raw)["event_id"], set()).add(raw)
    assert all(len(c) == 1 for c in copies.values()), "an exposure was sent twice with different contents"
    exposures = Counter(d["event_id"] for d in outputs.docs[topics.EXPOSURES])
    assert sum(n - 1 for n in exposures.values()) <= settings.batch_size  # at most the batch in flight
    assert {d["unit"] for d in outputs.docs[topics.EXPOSURES]} == set(variant_of)
    assert all(d["variant"] in variant_of[d["unit"]] for d in outputs.docs[topics.EXPOSURES])

    # labels come back for every payment of the first half: outcomes per variant, counted once
    labels = [Label(event_id=f"lab-{t.event_id}", transaction_id=t.event_id, card_id=t.card_id,
                    verdict="fraud" if int(t.event_id.split("-")[1]) % 4 == 0 else "genuine", source="chargeback",
                    timestamp=datetime.now(UTC)) for t in first]
    for lab in labels + labels[:50]:  # fifty delivered twice
        producer.send(lab)
    assert producer.flush() == 0
    outputs.wait_for(topics.TRAINING_EXAMPLES, {lab.event_id for lab in labels}, timeout_s=60)
    report = experiment_results(redis_client, KeySpace(settings.redis_prefix), store.get("review-all"))
    control, strict = report["variants"]["control"], report["variants"]["strict"]
    assert control["labelled"] + strict["labelled"] == len(labels)  # the duplicates counted once
    assert control["units"] + strict["units"] == len(variant_of) and not report["srm"]
    assert strict["alert_rate"] == 1.0 and strict["recall"] == 1.0  # review everything: every fraud alerted
    assert control["alert_rate"] < 0.5
    comparison = report["comparisons"]["strict"]
    assert comparison["decision"] == "ship" and comparison["ci"][0] > 0, comparison  # recall: strict wins
    assert "B is better on recall" in comparison["verdict"]

    store.stop("review-all", "test", "guardrail")  # every card back to the default behaviour
    time.sleep(1.5)  # the worker checks the revision every second
    later = _payments(50, 1, "c")
    for t in later:
        producer.send(t)
    assert producer.flush() == 0
    outputs.wait_for(topics.FRAUD_DECISIONS, {t.event_id for t in later}, timeout_s=60)
    after = [d for d in outputs.docs[topics.FRAUD_DECISIONS] if d["event_id"].startswith("c-")]
    assert after and not any("experiments" in d for d in after)


def test_a_guardrail_breach_stops_the_variant_automatically(settings, worker, outputs, redis_client):
    store = ExperimentStore(redis_client, KeySpace(settings.redis_prefix))
    store.create(Experiment.model_validate({
        "key": "too-strict", "target": "fraud", "hash_attribute": "card", "seed": "too-strict-1",
        "variants": [{"key": "control"}, {"key": "strict", "params": {"review_threshold": 0.0}}],
        "status": "running", "primary_metric": "recall", "guardrail_metrics": ["alert_rate"]}), "test")
    worker.settings = settings.with_(guardrail_check_s=1.0)
    worker.start()
    producer = EventProducer(settings.broker, settings.hash_key)
    payments = _payments(200, 1, "g")
    for t in payments:
        producer.send(t)
    assert producer.flush() == 0
    outputs.wait_for(topics.FRAUD_DECISIONS, {t.event_id for t in payments}, timeout_s=60)
    labels = [Label(event_id=f"lab-{t.event_id}", transaction_id=t.event_id, card_id=t.card_id, verdict="genuine",
                    source="analyst", timestamp=datetime.now(UTC)) for t in payments]
    for lab in labels:
        producer.send(lab)
    assert producer.flush() == 0
    deadline = time.monotonic() + 60
    while store.get("too-strict").status == "running" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert store.get("too-strict").status == "stopped"  # every genuine payment reviewed: the analysts' queue
    stop = store.history("too-strict")[-1]
    assert stop["action"] == "stop" and stop["who"] == "guardrail-monitor" and "alert_rate" in stop["why"]
    deadline = time.monotonic() + 30
    events: list[dict] = []
    while not events and time.monotonic() < deadline:
        outputs.poll(0.3)
        events = [d for d in outputs.docs[topics.OPERATOR_EVENTS] if d.get("type") == "experiment_stopped"]
    assert events and events[0]["breaches"][0]["guardrail"] == "alert_rate"
