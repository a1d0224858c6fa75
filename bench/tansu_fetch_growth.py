"""The embedded tansu broker's cost of a fetch as its partition fills with batches.

    .venv/bin/python bench/tansu_fetch_growth.py [--steps 4] [--batches-per-step 5000]

Why this exists: ``kestrel demo`` gets slower through its run (p50 33 ms in its
first thousand events, ~50 ms in its last), while the worker's CPU per event
stays flat. tansu 0.6's memory storage finds the records of a fetch by walking
the partition's stored batches, so a fetch that returns data costs time in
proportion to how many batches the partition already holds; a produce alone
does not (Apache Kafka indexes its log and has no such growth). This measures
it: one record is produced and then fetched, 300 times, on a partition that
holds 0, 5,000, 10,000, ... single-record batches, against a second, empty
topic of the same broker. It reports the broker's CPU (``/proc``) per
produce-and-fetch round and the round's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from confluent_kafka import OFFSET_END, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from kestrel.streams.services import EmbeddedBroker

ROUNDS = 300


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rounds(bootstrap: str, producer: Producer, topic: str, pid: int) -> dict[str, float]:
    """Broker CPU and wall time per round: produce one record, wait until the consumer has it."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"growth-{topic}-{time.monotonic_ns()}",
                         "fetch.wait.max.ms": 10, "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, 0, OFFSET_END)])
    for _ in range(10):
        consumer.poll(0.05)
    cpu0, t0, missed = _cpu_s(pid), time.monotonic(), 0
    for _ in range(ROUNDS):
        producer.produce(topic, b"x" * 200)
        producer.flush()
        msg = consumer.poll(2.0)
        missed += msg is None or msg.error() is not None
    cpu1, t1 = _cpu_s(pid), time.monotonic()
    consumer.close()
    return {"broker_cpu_us": round(1e6 * (cpu1 - cpu0) / ROUNDS), "wall_ms": round(1e3 * (t1 - t0) / ROUNDS, 2),
            "missed": missed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batches-per-step", type=int, default=5000)
    args = p.parse_args()
    with EmbeddedBroker() as broker:
        assert broker.proc is not None
        pid = broker.proc.pid
        admin = AdminClient({"bootstrap.servers": broker.bootstrap})
        for name in ("filling", "empty"):
            admin.create_topics([NewTopic(name, 1, 1)])[name].result()
        producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 0})
        stored = 0
        for step in range(args.steps + 1):
            row = {"stored_batches": stored,
                   "filling_partition": _rounds(broker.bootstrap, producer, "filling", pid),
                   "empty_topic": _rounds(broker.bootstrap, producer, "empty", pid)}
            print(json.dumps(row), flush=True)
            stored += ROUNDS  # each round stored one batch on "filling"
            if step < args.steps:
                for _ in range(args.batches_per_step):
                    producer.produce("filling", b"x" * 200)
                    producer.flush()  # one batch per record, as a producer at light load sends them
                stored += args.batches_per_step


if __name__ == "__main__":
    main()
