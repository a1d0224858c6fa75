"""Python producer client for event producers (apps, payment gateways).

Validates each event against its contract before it leaves the process,
keys it by the entity whose state it changes (as a keyed hash, so raw card
numbers never become Kafka keys) and produces JSON with confluent-kafka.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import orjson
from confluent_kafka import Producer

from kestrel.feature_store.keys import KeyedHasher
from kestrel.feature_store.schemas import Event, Interaction, Label, Transaction
from kestrel.feature_store.topics import EVENT_TYPE_TOPIC

EVENT_ID_HEADER = "kestrel-event-id"


def partition_key(event: Event, hasher: KeyedHasher) -> bytes:
    """Kafka key: the entity whose state the event changes (card or user), hashed."""
    if isinstance(event, Transaction):
        return hasher.token("card", event.card_id).encode()
    if isinstance(event, Interaction):
        return hasher.token("user", event.user_id).encode()
    if isinstance(event, Label):
        return (hasher.token("card", event.card_id) if event.card_id else event.transaction_id).encode()
    raise TypeError(f"not an event: {type(event).__name__}")


def to_wire(event: Event) -> bytes:
    return orjson.dumps(event.model_dump(mode="json", exclude_none=True))


class EventProducer:
    """Thin, validated wrapper around a confluent-kafka producer.

    ``send`` validates and enqueues; ``send_raw`` sends bytes as they are
    (the simulator uses it to inject malformed events on purpose).
    """

    def __init__(self, bootstrap: str, hash_key: str, config: Mapping[str, Any] | None = None) -> None:
        # murmur2_random: the Java client's (and aiokafka's, i.e. the worker's) partitioner, so a card's
        # events from this client, from POST /events and from analyst verdicts land in the same partition.
        conf = {"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": "all", "partitioner": "murmur2_random",
                "enable.idempotence": False, "queue.buffering.max.messages": 1_000_000}
        conf.update(config or {})
        self._producer = Producer(conf)
        self.hasher = KeyedHasher(hash_key.encode())
        self.errors: list[str] = []
        self.delivered = 0

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.errors.append(str(err))
        else:
            self.delivered += 1

    def send(self, event: Event) -> None:
        self.send_raw(EVENT_TYPE_TOPIC[event.type], partition_key(event, self.hasher), to_wire(event),
                      event.event_id)

    def send_raw(self, topic: str, key: bytes | None, value: bytes | None, event_id: str | None = None) -> None:
        headers = [(EVENT_ID_HEADER, event_id.encode())] if event_id else None
        while True:
            try:
                self._producer.produce(topic, key=key, value=value, headers=headers, on_delivery=self._on_delivery)
                break
            except BufferError:  # local queue full: let deliveries drain, then retry
                self._producer.poll(0.05)
        self._producer.poll(0)

    def send_many(self, events: Iterable[Event]) -> int:
        n = 0
        for event in events:
            self.send(event)
            n += 1
        return n

    def flush(self, timeout_s: float = 30.0) -> int:
        """Wait for deliveries; returns how many are still undelivered."""
        return self._producer.flush(timeout_s)
