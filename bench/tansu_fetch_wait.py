"""Consumer latency on the embedded tansu broker as a function of the fetch wait.

    .venv/bin/python bench/tansu_fetch_wait.py

tansu holds a fetch for the full ``fetch.max.wait`` even when data arrives
(Apache Kafka answers at once), so the wait lands on every record. This sends
one record every 40 ms and reports the median produce -> consume latency for
aiokafka (Faust's client) and librdkafka at a long and a short wait.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition as AioTP
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from kestrel.feature_store.topics import ensure_topics
from kestrel.streams.services import EmbeddedBroker

TOPIC, PARTITIONS, RECORDS, SECONDS = "fetch-wait", 4, 50, 4.0


def _librdkafka(bootstrap: str, wait_ms: int, out: dict[str, float]) -> None:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"w{wait_ms}", "fetch.wait.max.ms": wait_ms})
    consumer.assign([TopicPartition(TOPIC, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
    lat, start = [], time.time()
    while time.time() - start < SECONDS:
        msg = consumer.poll(0.05)
        if msg is not None and msg.error() is None:
            lat.append(time.time() - float(msg.value()))
    consumer.close()
    out[f"librdkafka fetch.wait.max.ms={wait_ms}"] = statistics.median(lat) * 1000


async def _aiokafka(bootstrap: str, wait_ms: int, out: dict[str, float]) -> None:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, fetch_max_wait_ms=wait_ms, enable_auto_commit=False)
    await consumer.start()
    consumer.assign([AioTP(TOPIC, p) for p in range(PARTITIONS)])
    for p in range(PARTITIONS):
        consumer.seek(AioTP(TOPIC, p), 0)
    lat, start = [], time.time()
    while time.time() - start < SECONDS:
        for records in (await consumer.getmany(timeout_ms=50)).values():
            lat += [time.time() - float(r.value) for r in records]
    await consumer.stop()
    out[f"aiokafka fetch_max_wait_ms={wait_ms}"] = statistics.median(lat) * 1000


def main() -> None:
    with EmbeddedBroker() as broker:
        ensure_topics(broker.bootstrap, PARTITIONS, (TOPIC,))
        out: dict[str, float] = {}
        threads = [threading.Thread(target=_librdkafka, args=(broker.bootstrap, w, out)) for w in (500, 10)]
        threads += [threading.Thread(target=lambda w=w: asyncio.run(_aiokafka(broker.bootstrap, w, out)))
                    for w in (1500, 10)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 0})
        for i in range(RECORDS):
            producer.produce(TOPIC, key=str(i).encode(), value=str(time.time()).encode())
            producer.poll(0)
            time.sleep(0.04)
        producer.flush()
        for t in threads:
            t.join()
    print(json.dumps({k: round(v, 1) for k, v in sorted(out.items())}))


if __name__ == "__main__":
    main()
