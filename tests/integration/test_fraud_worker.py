"""The trained fraud model in a real worker: model decisions with reasons, and online learning from labels.

A fraud pattern absent from training (account takeover) streams through the
real broker; two days of its labels arrive as ``label`` events; the next
day's takeovers score measurably higher than the shipped model scores the
same payments, and labels sent twice are learned once.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import numpy as np
import pytest

from kestrel.feature_store import topics
from kestrel.feature_store.schemas import Label, Transaction
from kestrel.models.fraud_online import OnlineFraudLearner
from kestrel.offline.simulator import EXTRA_SCENARIOS, Simulator, payments_config
from kestrel.streams.ingest.producer import EventProducer

pytestmark = pytest.mark.integration
DAY = 86400.0


def _send_and_collect(producer: EventProducer, outputs, txns: list[Transaction]) -> dict[str, dict]:
    for t in txns:
        producer.send(t)
    assert producer.flush() == 0 and not producer.errors
    outputs.wait_for(topics.FRAUD_DECISIONS, {t.event_id for t in txns}, timeout_s=120)
    by_id = {d["event_id"]: d for d in outputs.docs[topics.FRAUD_DECISIONS]}
    return {t.event_id: by_id[t.event_id] for t in txns}


def test_model_decisions_and_online_learning_of_a_new_pattern(settings, worker, outputs, redis_client, fraud_model):
    from sklearn.metrics import average_precision_score

    from kestrel.models.fraud_features import model_inputs

    model, path = fraud_model
    worker.settings = settings.with_(fraud_model=str(path.parent))  # the artifacts root: newest version wins
    worker.start()
    sim = Simulator(payments_config(3000, seed=2, scenarios=EXTRA_SCENARIOS, n_cards=1000))
    start = sim.config.start
    days: dict[int, list] = {0: [], 1: [], 2: [], 3: []}
    for rec in sim.records():
        if rec.time >= start + 4 * DAY:
            break
        if rec.kind == "transaction":
            days[int((rec.time - start) // DAY)].append(rec)
    producer = EventProducer(settings.broker, settings.hash_key)

    first = _send_and_collect(producer, outputs, [r.event for r in days[0] + days[1] + days[2]])
    decisions = list(first.values())
    assert all(d["model_version"] == model.version for d in decisions)
    flagged = [d for d in decisions if d["action"] != "allow"]
    assert flagged and all(d["reasons"] and d["reasons"][0]["contribution"] > 0 for d in flagged)

    rng = np.random.default_rng(0)
    labelled = [r for r in days[1] + days[2] if r.fraud or first[r.event_id]["action"] != "allow"
                or rng.random() < 0.02]  # chargebacks, analysts' verdicts on alerts, 2% audits (the default share)
    now = datetime.now(UTC)
    labels = [Label(event_id=f"lab-{r.event_id}", transaction_id=r.event_id, card_id=r.event.card_id,
                    verdict="fraud" if r.fraud else "genuine", source="chargeback" if r.fraud else "analyst",
                    timestamp=now) for r in labelled]
    for lab in labels + labels[:20]:  # twenty of them delivered twice
        producer.send(lab)
    assert producer.flush() == 0
    outputs.wait_for(topics.TRAINING_EXAMPLES, {lab.event_id for lab in labels}, timeout_s=60)

    # The next day's payments as the worker scored them (with what it learned), against the same payments
    # scored from their logged features by the artifact as shipped: the difference is the learning.
    later = _send_and_collect(producer, outputs, [r.event for r in days[3]])
    fraud = np.array([r.fraud for r in days[3]])
    after = np.array([later[r.event_id]["score"] for r in days[3]])
    before = model.score_arrays(model_inputs([later[r.event_id]["features"] for r in days[3]]), model.online)[0]
    measured = {"frauds": int(fraud.sum()), "labels": len(labels), "mean_before": before[fraud].mean(),
                "mean_after": after[fraud].mean(), "frauds_scored_higher": (after[fraud] > before[fraud]).mean(),
                "ap_before": average_precision_score(fraud, before), "ap_after": average_precision_score(fraud, after),
                "genuine_flagged_before": (before[~fraud] >= 0.5).mean(),
                "genuine_flagged_after": (after[~fraud] >= 0.5).mean()}
    print(measured)
    assert measured["frauds"] >= 10
    assert measured["frauds_scored_higher"] >= 0.8, measured
    # measured 1.10-1.11x over several runs: the terminal features depend on the arrival order of payments
    # across partitions, so the ratio moves by about 0.01 from run to run; 1.05 keeps the check meaningful
    # without failing on that spread (every fraud scored higher and AP up are asserted beside it)
    assert measured["mean_after"] > 1.05 * measured["mean_before"], measured
    assert measured["ap_after"] > measured["ap_before"], measured
    assert measured["genuine_flagged_after"] <= measured["genuine_flagged_before"] + 0.01, measured

    # Every label taught the shared learner exactly once, duplicates included.
    time.sleep(0.5)
    blob = redis_client.hget(f"{settings.redis_prefix}:g:online_fraud:{model.version}", "blob")
    assert OnlineFraudLearner.loads(blob).labels_seen - model.online.labels_seen == len(labels)
    metrics = worker_metrics(worker.url)
    assert metrics.get('kestrel_online_labels_total{outcome="learned"}') == len(labels)


def worker_metrics(base: str) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_train_from_the_logged_decisions_and_labels(settings, worker, outputs, tmp_path):
    """`kestrel train fraud --from-broker`: the features the worker logged, joined to the labels that came back."""
    import json
    import os
    import subprocess
    import sys

    worker.start()
    sim = Simulator(payments_config(3000, seed=4, n_cards=1000))
    producer = EventProducer(settings.broker, settings.hash_key)
    sent: dict[str, list[str]] = {"transaction": [], "label": []}
    for rec in sim.records():
        if rec.time >= sim.config.start + 2 * DAY:
            break
        producer.send(rec.event)
        sent[rec.kind].append(rec.event_id)
    assert producer.flush() == 0
    outputs.wait_for(topics.TRAINING_EXAMPLES, set(sent["label"]), timeout_s=120)
    outputs.wait_for(topics.FRAUD_DECISIONS, set(sent["transaction"]), timeout_s=60)
    proc = subprocess.run([sys.executable, "-m", "kestrel", "train", "fraud", "--from-broker", "--epochs", "3",
                           "--assume-genuine-after-days", "0.5", "--out", str(tmp_path / "models")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, **settings.to_env()})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    source = report["source"]
    labelled = {d["transaction_id"] for d in outputs.docs[topics.TRAINING_EXAMPLES]}
    assert source["labelled"] == len(labelled & set(sent["transaction"]))
    assert source["labelled"] + source["assumed_genuine"] + source["too_recent"] == len(sent["transaction"])
    assert source["too_recent"] > 0 and report["train_rows"] == source["labelled"] + source["assumed_genuine"]
    assert (tmp_path / "models" / report["model_version"] / "model.pt").exists()
