"""A worker SIGKILLed mid-stream: after the restart every flagged decision is counted once, in one case per card."""

from __future__ import annotations

import itertools
import json
import time
import urllib.request
from collections import Counter

import pytest

from kestrel.feature_store import topics
from kestrel.offline.simulator import SimConfig, Simulator
from kestrel.streams.ingest.producer import EventProducer

pytestmark = pytest.mark.integration


def test_kill_and_restart_neither_opens_a_second_case_nor_counts_a_hit_twice(settings, worker, outputs):
    sim = Simulator(SimConfig(seed=21, fraud_incidents_per_sim_hour=120.0, n_cards=300))
    txns = [r.event for r in itertools.islice(sim.records(), 5000) if r.kind == "transaction"][:3000]
    producer = EventProducer(settings.broker, settings.hash_key)
    worker.settings = settings.with_(commit_interval_s=5.0)  # the kill lands before a commit: redeliveries
    worker.start()
    producer.send_many(txns[:1500])
    assert producer.flush() == 0
    deadline = time.monotonic() + 30
    while len(outputs.docs[topics.ALERTS]) < 5 and time.monotonic() < deadline:
        outputs.poll(0.1)
    worker.kill()
    assert outputs.docs[topics.ALERTS], "the first half should already have opened cases"
    producer.send_many(txns[1500:])
    assert producer.flush() == 0
    worker.start()
    outputs.wait_for(topics.FRAUD_DECISIONS, {t.event_id for t in txns}, timeout_s=90)
    outputs.poll(2.0)  # alerts of the last batches

    decisions = {d["event_id"]: d for d in outputs.docs[topics.FRAUD_DECISIONS]}
    flagged = Counter(d["card"] for d in decisions.values() if d["action"] in {"review", "block"})
    assert len(flagged) >= 5

    with urllib.request.urlopen(f"{worker.url}/api/alerts?limit=500", timeout=10) as resp:
        queue = json.loads(resp.read())
    by_card = Counter(c["card"] for c in queue["alerts"])
    assert queue["open"] == len(flagged) and max(by_card.values()) == 1  # one open case per flagged card
    assert {c["card"]: c["hits"] for c in queue["alerts"]} == dict(flagged)  # every hit counted exactly once

    # One "opened" alert per case; a record that reached the topic twice (kill between ack and mark) is a
    # byte-identical copy of the same case revision.
    copies: dict[str, set[bytes]] = {}
    for doc, raw in zip(outputs.docs[topics.ALERTS], outputs.raw[topics.ALERTS], strict=True):
        copies.setdefault(doc["event_id"], set()).add(raw)
    assert all(len(v) == 1 for v in copies.values())
    opened = {d["case_id"] for d in outputs.docs[topics.ALERTS] if d["alert"] == "opened"}
    assert opened == {c["case_id"] for c in queue["alerts"]}
    with urllib.request.urlopen(f"{worker.url}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    redelivered = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                      if line.startswith("kestrel_redelivered_total"))
    assert redelivered > 0, "the restart should have seen already-decided events again"
    print(f"{len(flagged)} flagged cards, {sum(flagged.values())} hits, {redelivered:.0f} outputs not re-sent")
    assert "Traceback" not in worker.log()
