"""The launchers: the embedded broker answers Kafka requests and stops; Redis is found or started."""

from __future__ import annotations

import asyncio
import secrets

import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from kestrel.streams.config import Settings
from kestrel.streams.services import EmbeddedBroker, LocalRedis, free_port, redis_answers
from kestrel.streams.worker.app import create_app


def test_embedded_broker_answers_metadata_and_stops_cleanly():
    broker = EmbeddedBroker().start()
    try:
        metadata = AdminClient({"bootstrap.servers": broker.bootstrap}).list_topics(timeout=5)
        assert metadata.brokers
    finally:
        broker.stop()
    assert broker.proc is None


def test_a_private_redis_is_started_when_none_answers():
    url = f"redis://127.0.0.1:{free_port()}/0"
    assert not redis_answers(url)
    with LocalRedis(url) as local:
        assert local.started and local.url != url
        assert "started a private redis-server" in local.describe()
        client = redis.Redis.from_url(local.url)
        client.set("k", "v")
        assert client.get("k") == b"v"
        started_url = local.url
    assert not redis_answers(started_url)


def test_an_answering_redis_is_used_as_it_is(redis_url):
    with LocalRedis(redis_url) as local:
        assert not local.started and local.url == redis_url


def test_the_worker_s_compressed_record_batches_round_trip_through_the_embedded_broker(broker):
    """The worker's producer settings (zstd, large batches) against tansu: aiokafka writes, librdkafka and
    aiokafka read back every record, byte for byte and in order per key."""
    s = Settings().with_(broker=broker.bootstrap)
    conf = create_app(s).conf  # what the worker's Faust producer is given
    assert (conf.producer_compression_type, conf.producer_max_batch_size) == ("zstd", 512 * 1024)
    topic = f"compressed-{secrets.token_hex(3)}"
    values = [b'{"event_id": "e%d", "features": {"amount_sum_1h": %d.25}}' % (i, i) for i in range(3000)]

    async def produce_then_read() -> list[bytes]:
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks=-1,
                                    compression_type=conf.producer_compression_type,
                                    max_batch_size=conf.producer_max_batch_size)
        await producer.start()
        try:
            batch = producer.create_batch()
            for v in values:
                assert batch.append(key=b"card", value=v, timestamp=None) is not None  # one batch holds them all
            await (await producer.send_batch(batch, topic, partition=0))
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest")
        await consumer.start()
        got: list[bytes] = []
        try:
            for _ in range(30):  # a bounded wait: a broker that loses them fails the test, not the run
                got += [m.value for ms in (await consumer.getmany(timeout_ms=1000)).values() for m in ms]
                if len(got) >= len(values):
                    break
        finally:
            await consumer.stop()
        return got

    assert asyncio.run(produce_then_read()) == values
    reader = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": f"t-{secrets.token_hex(3)}",
                       "enable.auto.commit": False})
    reader.assign([TopicPartition(topic, 0, 0)])
    got: list[bytes] = []
    try:
        for _ in range(30):
            got += [m.value() for m in reader.consume(1000, timeout=1.0) if m.error() is None]
            if len(got) >= len(values):
                break
    finally:
        reader.close()
    assert got == values
