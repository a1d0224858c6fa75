"""What a worker builds once and its agents share: the processor, topics, metrics, delivery.

Also how an agent takes its records: in batches that stay un-acked until
their outputs are delivered, so that two batches can be in flight.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import faust
import redis.asyncio as aioredis

from streams.config import Settings
from streams.metrics import Metrics
from streams.processing import Processor
from streams.records import Output, RawRecord

log = logging.getLogger("kestrel.worker")


class Runtime:
    """Objects a worker builds once, lazily, inside its event loop."""

    def __init__(self, app: faust.App, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.metrics = Metrics()
        self._processor: Processor | None = None
        self.warm = False  # set once the models answered a first call (see warm_up); /ready waits for it
        self._topics: dict[str, Any] = {}
        self._delivering: set[str] = set()  # marks of outputs sent and not yet acknowledged

    @property
    def processor(self) -> Processor:
        if self._processor is None:
            client = aioredis.Redis.from_url(self.settings.redis_url, socket_timeout=5.0)
            self._processor = Processor(self.settings, client, self.metrics)
        return self._processor

    def topic(self, name: str) -> Any:
        if name not in self._topics:
            self._topics[name] = self.app.topic(name, key_serializer="raw", value_serializer="raw",
                                                partitions=self.settings.partitions)
        return self._topics[name]

    async def send(self, outputs: list[Output]) -> None:
        """Produce and wait until the broker acknowledged every record."""
        producer = self.app.producer  # below Topic.send: no per-record FutureMessage bookkeeping
        futures = [await producer.send(o.topic, o.key, o.value, None, None, None) for o in outputs]
        if futures:
            await asyncio.gather(*futures)

    async def prepare(self, topic: str, events: list[Any]) -> list[Output]:
        """Process one batch (features, decisions, outboxes); infrastructure errors are retried, never skipped.

        Outputs that the batch still being delivered will send (a producer
        duplicate in two consecutive batches) are left to it.
        """
        records = [_raw(topic, e) for e in events]
        delay = 0.1
        while True:
            try:
                outputs = await self.processor.process(topic, records)
                return [o for o in outputs if o.mark not in self._delivering]
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("batch of %d from %s failed; retrying in %.1fs", len(records), topic, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def deliver(self, outputs: list[Output], events: list[Any], stream: Any) -> None:
        """Send, wait for the broker's acks, mark delivered, and only then ack the input events.

        Faust commits an offset once every event before it is acked, so an
        event whose outputs were not delivered is consumed again after a
        crash (at-least-once; the outboxes make the replay send the same bytes).
        """
        marks = [o.mark for o in outputs]
        self._delivering.update(marks)
        delay = 0.1
        try:
            while True:
                try:
                    await self.send(outputs)
                    await self.processor.mark_delivered(outputs)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("delivery of %d outputs failed; retrying in %.1fs", len(outputs), delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
        finally:
            self._delivering.difference_update(marks)
        for event in events:
            await stream.ack(event)


def _raw(topic: str, event: Any) -> RawRecord:
    msg = event.message
    headers = {k: (v if isinstance(v, bytes) else str(v).encode()) for k, v in (msg.headers or [])}
    ts = msg.timestamp * 1000 if msg.timestamp else None
    return RawRecord(topic, msg.partition, msg.offset, msg.key, msg.value, headers, ts)


async def take_batches(stream: Any, max_: int, within: float) -> AsyncIterator[list[Any]]:
    """Batches of up to ``max_`` events (or what came within ``within`` s), NOT acked: the caller acks them.

    Faust's ``take_events`` acks a batch as soon as the loop body ends, so the
    next batch cannot be taken before this one is delivered, and Redis, the
    worker and the broker take turns. This is the same buffering, without
    the acks, so that batch N+1 is processed while batch N is in flight.
    """
    buffer: list[Any] = []
    buffer_full = asyncio.Event()
    buffer_consumed = asyncio.Event()
    consuming: asyncio.Future | None = None
    channel_it = aiter(stream.channel)

    async def add_to_buffer(value: Any) -> Any:
        nonlocal consuming
        try:
            if consuming is not None:
                try:
                    await consuming
                finally:
                    consuming = None
            event = stream.current_event
            if event is None:
                raise RuntimeError("take buffer found current_event None")
            buffer.append(event)
            if len(buffer) >= max_:
                buffer_full.set()
                buffer_consumed.clear()
                await stream.wait(buffer_consumed)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("error adding to the take buffer: %r", exc)
            await stream.crash(exc)
        return value

    stream.enable_acks = False
    stream.add_processor(add_to_buffer)
    stream._enable_passive(channel_it)
    try:
        while not stream.should_stop:
            await stream.wait_for_stopped(buffer_full, timeout=within)
            if buffer:
                consuming = asyncio.get_running_loop().create_future()
                batch = list(buffer)
                buffer.clear()
                try:
                    yield batch
                finally:
                    if not consuming.done():
                        consuming.set_result(None)
                    buffer_full.clear()
                    buffer_consumed.set()
    finally:
        stream._processors.remove(add_to_buffer)
