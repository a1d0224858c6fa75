"""The whole retraining chain on the real broker and Redis, payments streaming throughout: the worker decides
and learns labels, the archiver writes it all to Parquet, `train fraud --from-archive` builds the point-in-time
set from it, trains, registers and asks the gate, the alias move is announced and the running worker swaps.
Every payment is decided exactly once, by the version that was champion when its batch ran."""

from __future__ import annotations

import dataclasses
import itertools
import json
import threading
import time
from collections import Counter
from datetime import UTC, datetime

import pytest

from kestrel.feature_store import topics
from kestrel.feature_store.schemas import Label
from kestrel.models.registry import Registry
from kestrel.offline.archive import decode, read_archive
from kestrel.offline.simulator import Simulator, payments_config
from kestrel.streams.ingest.producer import EventProducer
from tests.integration.test_archive import _archiver
from tests.integration.test_cli import _kestrel
from tests.integration.test_model_swap import registered_copies

pytestmark = pytest.mark.integration


def test_archive_to_training_set_to_gate_to_hot_swap_while_payments_stream(
        settings, worker, outputs, fraud_model, tmp_path):
    _, (v1,) = registered_copies(fraud_model, tmp_path)
    reg_root, archive = tmp_path / "registry", tmp_path / "archive"
    worker.settings = settings.with_(fraud_model=str(reg_root))
    worker.start()
    archiver = _archiver(settings, archive, tmp_path / "archive.log")
    base = payments_config(6000, seed=33, n_cards=500)
    sim = Simulator(dataclasses.replace(base, fraud_incidents_per_sim_hour=base.fraud_incidents_per_sim_hour * 12))
    history_payments = (r for r in sim.records() if r.kind == "transaction")
    # the payments streamed during training come a month later in event time: the set is cut before them
    later = Simulator(dataclasses.replace(base, seed=34, start=base.start + 30 * 86400))
    payments = (r for r in later.records() if r.kind == "transaction")
    producer = EventProducer(settings.broker, settings.hash_key)
    try:
        history = list(itertools.islice(history_payments, 3000))  # decided by v1, then labelled
        for rec in history:
            producer.send(rec.event)
        assert producer.flush() == 0
        outputs.wait_for(topics.FRAUD_DECISIONS, {r.event_id for r in history}, timeout_s=120)
        labels = [Label(event_id=f"lab-{r.event_id}", transaction_id=r.event_id, card_id=r.event.card_id,
                        verdict="fraud" if r.fraud else "genuine", source="chargeback",
                        timestamp=datetime.fromtimestamp(r.time + 3600, UTC))  # an hour later, in event time
                  for r in history]
        cutoff = datetime.fromtimestamp(history[-1].time + 2 * 86400, UTC).isoformat()
        for label in labels:
            producer.send(label)
        assert producer.flush() == 0
        outputs.wait_for(topics.TRAINING_EXAMPLES, {lab.event_id for lab in labels}, timeout_s=120)
        deadline = time.monotonic() + 60
        archived = 0
        while archived < len(labels) and time.monotonic() < deadline:  # the archiver catches up
            time.sleep(0.5)
            archived = len({d.get("event_id") for d in decode(read_archive(str(archive), topics.TRAINING_EXAMPLES))})
        assert archived >= len(labels), archived

        streamed: list[str] = []
        stop = threading.Event()

        def stream() -> None:  # payments keep coming while the candidate trains, is gated and swapped in
            own = EventProducer(settings.broker, settings.hash_key)
            for rec in payments:
                if stop.is_set():
                    break
                own.send(rec.event)
                streamed.append(rec.event_id)
                time.sleep(0.01)
            own.flush()

        sender = threading.Thread(target=stream, daemon=True)
        sender.start()
        proc = _kestrel("train", "fraud", "--from-archive", str(archive), "--cutoff", cutoff,
                        "--registry", str(reg_root), "--promote",
                        "--epochs", "3", "--members", "1", "--out", str(tmp_path / "artifacts"),
                        "--why", "retraining chain test", env={"KESTREL_BROKER": settings.broker}, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        run = json.loads(proc.stdout.strip().splitlines()[-1])
        v2 = run["model_version"]
        assert run["source"]["archive"] == str(archive) and run["source"]["labelled"] == len(labels)
        assert run["evaluation"]["champion"] == v1  # gated against the serving champion on the same window
        registry = Registry(reg_root, "fraud")
        assert registry.history()[-1].action == run["promotion"]["action"]  # the gate's decision, audited
        if not run["promotion"]["moved"]:  # refused (with its reasons): the operator overrides, audited as forced
            assert run["promotion"]["reasons"]
            forced = _kestrel("models", "alias", "champion", v2, "--force", "--why", "chain test",
                              "--registry", str(reg_root), env={"KESTREL_BROKER": settings.broker})
            assert forced.returncode == 0, forced.stderr
        moved_at = time.monotonic()
        swapped = False
        while not swapped and time.monotonic() - moved_at < 30:
            outputs.poll(0.3)
            swapped = any(d["model_version"] == v2 for d in outputs.docs[topics.FRAUD_DECISIONS])
        assert swapped, "the worker did not swap to the new champion"
        time.sleep(2)
        stop.set()
        sender.join(30)
        outputs.wait_for(topics.FRAUD_DECISIONS, set(streamed), timeout_s=120)
    finally:
        archiver.terminate()
        archiver.wait(30)
    decided = Counter(d["event_id"] for d in outputs.docs[topics.FRAUD_DECISIONS])
    sent = [r.event_id for r in history] + streamed
    assert all(decided[e] == 1 for e in sent), "a payment lost or decided twice"
    by_version = Counter(d["model_version"] for d in outputs.docs[topics.FRAUD_DECISIONS])
    assert set(by_version) == {v1, v2} and by_version[v2] > 0, by_version
    # once a batch ran on v2, every later one did: the versions form one switch in the output order
    order = [d["model_version"] for d in outputs.docs[topics.FRAUD_DECISIONS]]
    first_v2 = order.index(v2)
    assert order[:first_v2] == [v1] * first_v2
    assert order[first_v2:].count(v1) <= 100, "v1 kept deciding long after the swap"
