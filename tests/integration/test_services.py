"""The launchers: the embedded broker answers Kafka requests and stops; Redis is found or started."""

from __future__ import annotations

import redis
from confluent_kafka.admin import AdminClient

from kestrel.streams.services import EmbeddedBroker, LocalRedis, free_port, redis_answers


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
