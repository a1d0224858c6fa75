"""Online/offline parity: features computed by the real worker equal the offline recomputation."""

from __future__ import annotations

import itertools
import secrets

import numpy as np
import pytest

from kestrel.feature_store import topics
from kestrel.offline.fraud_dataset import fraud_features
from kestrel.offline.simulator import SimConfig, Simulator
from kestrel.streams.cli.produce import send
from kestrel.streams.ingest.producer import EventProducer

pytestmark = pytest.mark.integration


@pytest.fixture
def one_partition(broker, redis_url):
    """One partition per topic: the broker's log order is then the order the store applied events in."""
    from kestrel.streams.cli.demo import erase_prefix
    from kestrel.streams.config import Settings
    from kestrel.streams.services import free_port

    run = secrets.token_hex(4)
    s = Settings().with_(broker=broker.bootstrap, redis_url=redis_url, redis_prefix=f"kestrel-parity-{run}",
                         app_id=f"kestrel-parity-{run}", web_port=free_port(), partitions=1,
                         session_timeout_s=3.0, heartbeat_interval_s=0.5, batch_size=200)
    topics.ensure_topics(s.broker, 1)
    yield s
    erase_prefix(redis_url, s.redis_prefix)


def test_every_decision_carries_exactly_the_offline_features(one_partition, tmp_path):
    from tests.integration.conftest import OutputReader, WorkerHandle

    settings = one_partition
    records = [r for r in itertools.islice(Simulator(SimConfig(seed=21, events_per_sim_second=0.01, n_cards=150,
                                                                fraud_incidents_per_sim_hour=0.5)).records(), 8000)
               if r.kind == "transaction"][:2500]
    # a few payments arrive late (within the allowed lateness): swap neighbours of the same card
    for i in range(10, len(records) - 1, 97):
        records[i], records[i + 1] = records[i + 1], records[i]
    producer = EventProducer(settings.broker, settings.hash_key)
    for rec in records:
        send(producer, rec)
    assert producer.flush() == 0

    worker = WorkerHandle(settings, tmp_path / "worker.log").start()
    reader = OutputReader(settings.broker, 1)
    try:
        reader.wait_for(topics.FRAUD_DECISIONS, {r.event_id for r in records}, timeout_s=120)
    finally:
        worker.stop()
        reader.close()
    online = {d["event_id"]: d["features"] for d in reader.docs[topics.FRAUD_DECISIONS]}
    assert len(online) == len(records)

    offline = fraud_features([r.event for r in records])
    span_days = (records[-1].time - records[0].time) / 86400
    assert span_days > 2, "long enough for the 24h and 7-day windows to slide"
    checked = 0
    for rec, want in zip(records, offline, strict=True):
        got = online[rec.event_id]
        assert set(got) == set(want)
        for name, value in want.items():
            if isinstance(value, float):
                assert got[name] == pytest.approx(value, rel=1e-9, abs=1e-6), (rec.event_id, name)
            else:
                assert got[name] == value, (rec.event_id, name)
            checked += 1
    assert checked > 40_000
    assert np.mean([f["txn_count_24h"] for f in offline]) > 1.5  # windows actually hold history
