"""The archiver on the real broker, SIGKILLed mid-stream and restarted: nothing lost, nothing twice on read."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Producer

from kestrel.feature_store import topics
from kestrel.feature_store.keys import KeyedHasher
from kestrel.offline.archive import decode, read_archive

pytestmark = pytest.mark.integration


def _archiver(settings, root: Path, log: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, **settings.to_env()}
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "kestrel", "archive", "--root", str(root), "--flush-rows",
                                 "400", "--flush-s", "0.3", *extra], env=env, stdout=out, stderr=subprocess.STDOUT)


def test_archive_survives_sigkill_without_loss_or_duplicates(settings, tmp_path):
    root = tmp_path / "archive"
    producer = Producer({"bootstrap.servers": settings.broker, "linger.ms": 5})
    sent: dict[str, set[str]] = {topics.TRANSACTIONS: set(), topics.FRAUD_DECISIONS: set()}

    def produce(start: int, n: int) -> None:
        for i in range(start, start + n):
            day = 1 + i % 3  # three event dates: three folders per topic
            txn = {"type": "transaction", "event_id": f"t{i}", "timestamp": f"2026-11-0{day}T10:00:00Z",
                   "card_id": f"4000{i:012d}"}
            producer.produce(topics.TRANSACTIONS, key=f"c{i % 50}".encode(), value=orjson.dumps(txn))
            decision = {"type": "fraud_decision", "event_id": f"t{i}", "event_time": txn["timestamp"], "score": 0.1}
            producer.produce(topics.FRAUD_DECISIONS, key=f"c{i % 50}".encode(), value=orjson.dumps(decision))
            sent[topics.TRANSACTIONS].add(f"t{i}")
            sent[topics.FRAUD_DECISIONS].add(f"t{i}")
            if i % 500 == 0:
                producer.poll(0)
        assert producer.flush(30) == 0

    produce(0, 3000)
    producer.produce(topics.TRANSACTIONS, value=b"{not json")  # kept as it came, with its coordinates
    producer.produce(topics.TRANSACTIONS, value=orjson.dumps({"type": "transaction", "event_id": "t7",
                                                              "timestamp": "2026-11-02T10:00:00Z"}))  # a resend
    assert producer.flush(30) == 0
    first = _archiver(settings, root, tmp_path / "archive.log")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(root.rglob("*.parquet"))) < 6:
        time.sleep(0.05)
    produce(3000, 3000)  # more arrives while it runs
    os.kill(first.pid, signal.SIGKILL)  # mid-stream: files written whose offsets may not be committed yet
    first.wait()
    files_before = len(list(root.rglob("*.parquet")))
    assert files_before >= 6
    produce(6000, 1000)

    second = _archiver(settings, root, tmp_path / "archive.log", "--idle-exit-s", "4")
    assert second.wait(timeout=120) == 0, (tmp_path / "archive.log").read_text()[-3000:]

    for topic, ids in sent.items():
        table = read_archive(str(root), topic)
        docs = decode(table)
        got = [d["event_id"] for d in docs if isinstance(d, dict)] if topic == topics.FRAUD_DECISIONS else \
            [e for e in table.column("event_id").to_pylist() if e is not None]
        assert sorted(got) == sorted(ids), topic  # every record once: none lost, none twice
    raw = read_archive(str(root), topics.TRANSACTIONS)
    hasher = KeyedHasher(settings.hash_key.encode())
    cards = {d["event_id"]: d["card_id"] for d in decode(raw) if d.get("card_id")}
    assert cards["t12"] == hasher.token("card", "4000000000000012")  # tokenised as the worker does
    assert not any(c.startswith("4000") for c in cards.values())
    assert raw.num_rows == len(sent[topics.TRANSACTIONS]) + 1  # plus the malformed one, kept as bytes
    assert b"{not json" in raw.column("value").to_pylist()
    assert sorted({p.parent.name for p in root.glob(f"topic={topics.TRANSACTIONS}/*/*.parquet")}) >= \
        ["date=2026-11-01", "date=2026-11-02", "date=2026-11-03"]
    by_date = read_archive(str(root), topics.FRAUD_DECISIONS, dates=("2026-11-02", "2026-11-02"))
    assert by_date.num_rows == sum(1 for i in range(7000) if i % 3 == 1)
    shown = subprocess.run([sys.executable, "-m", "kestrel", "archive", "--root", str(root), "--show"],
                           capture_output=True, text=True, timeout=60)
    assert json.loads(shown.stdout)["by_topic"][topics.FRAUD_DECISIONS] == 7000
