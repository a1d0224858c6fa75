"""What a worker builds once and its agents share: the processor, topics, metrics, delivery.

Also how an agent takes its records: in batches that stay un-acked until
their outputs are delivered, so that two batches can be in flight.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import faust
import redis
import redis.asyncio as aioredis
from aiokafka.partitioner import DefaultPartitioner

from kestrel.feature_store import topics
from kestrel.streams.config import Settings
from kestrel.streams.metrics import Metrics
from kestrel.streams.records import Output, RawRecord
from kestrel.streams.worker.consumer import RawSchema
from kestrel.streams.worker.processing import Processor

log = logging.getLogger("kestrel.worker")
# Failures that go away by themselves: retried without limit, never dead-lettered.
TRANSIENT = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.BusyLoadingError,
             OSError, asyncio.TimeoutError)


@dataclass
class Batch:
    """One batch between its two stages: the outputs to deliver and the events to ack once they are."""

    outputs: list[Output]
    events: list[Any]
    records: list[RawRecord]
    degraded: bool = False


class KeyPartitions:
    """The partition aiokafka's default partitioner gives each record key, remembered per topic layout.

    The partitioner costs ~8 µs a record here (murmur2 in Python and two lists
    of partitions per call) and keys repeat (a card's decisions). A keyed
    record's partition depends only on its key and the topic's partitions, so
    the cache is exact; a producer with another partitioner is always asked.
    """

    def __init__(self, limit: int = 200_000) -> None:
        self.limit = limit
        self._known: dict[tuple[str, tuple[int, ...]], dict[bytes, int]] = {}

    def of(self, producer: Any, topic: str) -> Callable[[bytes | None, bytes], int]:
        """The partition function for ``topic`` as its partitions are now (one call per batch and topic)."""
        def ask(key: bytes | None, value: bytes) -> int:
            return producer._partition(topic, None, None, None, key, value)

        if not isinstance(producer._partitioner, DefaultPartitioner):
            return ask
        layout = (topic, tuple(sorted(producer._metadata.partitions_for_topic(topic) or ())))
        known = self._known.get(layout)
        if known is None or len(known) >= self.limit:
            known = self._known[layout] = {}

        def partition_of(key: bytes | None, value: bytes) -> int:
            if key is None:  # no key: the partitioner picks one at random
                return ask(key, value)
            partition = known.get(key)
            if partition is None:
                partition = known[key] = ask(key, value)
            return partition

        return partition_of


class Runtime:
    """Objects a worker builds once, lazily, inside its event loop."""

    def __init__(self, app: faust.App, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.metrics = Metrics()
        self._processor: Processor | None = None
        self.warm = False  # set once the models answered a first call (see warm_up); /ready waits for it
        self._topics: dict[str, Any] = {}
        self._partitions = KeyPartitions()
        self._delivering: set[str] = set()  # marks of outputs sent and not yet acknowledged
        self._outage = False  # Redis was found unreachable and degraded decisions are being made
        self._recovery: deque[tuple[Batch, Any]] = deque()  # degraded batches waiting for their feature updates
        self._recoverer: asyncio.Future | None = None
        self._recovered = asyncio.Event()  # set when no degraded batch waits
        self._recovered.set()

    @property
    def processor(self) -> Processor:
        if self._processor is None:
            timeout = self.settings.redis_timeout_s
            client = aioredis.Redis.from_url(self.settings.redis_url, socket_timeout=timeout,
                                             socket_connect_timeout=timeout)
            self._processor = Processor(self.settings, client, self.metrics)
        return self._processor

    def topic(self, name: str) -> Any:
        if name not in self._topics:
            self._topics[name] = self.app.topic(name, schema=RawSchema(), partitions=self.settings.partitions)
        return self._topics[name]

    async def send(self, outputs: list[Output]) -> None:
        """Produce and wait until the broker acknowledged every record.

        Below Faust's ``Producer.send`` and aiokafka's per-record ``send`` (a
        metadata wait, a partitioner call and a future per record): the
        outputs are grouped by partition, with aiokafka's own partitioner (so
        a key lands where a plain send would put it), and handed over as one
        record batch per partition, in order; one future per batch.
        """
        if not outputs:
            return
        producer = self.app.producer._ensure_producer()  # the aiokafka producer Faust started
        partition_of = {}
        for name in {o.topic for o in outputs}:
            await producer.client._wait_on_metadata(name)
            partition_of[name] = self._partitions.of(producer, name)
        by_partition: dict[tuple[str, int], list[Output]] = {}
        for o in outputs:
            by_partition.setdefault((o.topic, partition_of[o.topic](o.key, o.value)), []).append(o)
        futures = []
        for (name, partition), outs in by_partition.items():
            batch = producer.create_batch()
            for o in outs:
                if batch.append(key=o.key, value=o.value, timestamp=None) is None:  # full: an empty one takes it
                    futures.append(await producer.send_batch(batch, name, partition=partition))
                    batch = producer.create_batch()
                    batch.append(key=o.key, value=o.value, timestamp=None)
            futures.append(await producer.send_batch(batch, name, partition=partition))
        await asyncio.gather(*futures)

    async def recommend(self, user_ids: list[str], options: Any) -> list[Any]:
        """Recommendations asked for outside a batch (HTTP, ``recs.requests``), through the running experiments:
        their first exposures are delivered (once per user, through the ledger) before the answer goes out."""
        exposures: list[Output] = []
        results = await self.processor.recommend(user_ids, options, exposures)
        if exposures:
            fresh = await self.processor.deliverable(exposures)
            await self.send(fresh)
            await self.processor.mark_delivered(fresh)
        return results

    async def prepare(self, topic: str, events: list[Any]) -> Batch:
        """Process one batch (features, decisions, outboxes).

        Transient failures (Redis or the network) are retried until they pass,
        nothing skipped; with ``KESTREL_DEGRADED_MODE=rules`` a payment batch
        is decided by the rules meanwhile (:meth:`Processor.degraded`). Any
        other failure is retried ``poison_retries`` times, then the batch is
        split record by record and the records that still fail go to the
        dead-letter topic with the error, so one poison record cannot stall
        its partition. Outputs that the batch still being delivered will send
        (a producer duplicate in two consecutive batches) are left to it.
        """
        records = [_raw(topic, e) for e in events]
        degradable = self.settings.degraded_mode == "rules" and topic == topics.TRANSACTIONS
        delay, failures = 0.1, 0
        while True:
            if degradable and self._outage:
                return Batch(self.processor.degraded(topic, records), events, records, degraded=True)
            try:
                await self._recovered.wait()  # degraded batches get their feature updates first, in order
                outputs = await self.processor.process(topic, records)
                return Batch([o for o in outputs if o.mark not in self._delivering], events, records)
            except asyncio.CancelledError:
                raise
            except TRANSIENT as exc:
                self.metrics.batch_failures.labels(topic, "transient").inc()
                if degradable:
                    log.warning("Redis unreachable (%r): deciding payments by the rules until it is back", exc)
                    self._outage = True
                    continue
                log.warning("batch of %d from %s: %r; retrying in %.1fs", len(records), topic, exc, delay)
            except Exception:
                self.metrics.batch_failures.labels(topic, "poison").inc()
                failures += 1
                if failures >= self.settings.poison_retries:
                    return Batch(await self._split(topic, records), events, records)
                log.exception("batch of %d from %s failed (%d of %d attempts); retrying in %.1fs", len(records),
                              topic, failures, self.settings.poison_retries, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _split(self, topic: str, records: list[RawRecord]) -> list[Output]:
        """A batch that keeps failing, processed record by record: the records that fail alone are dead-lettered.

        A transient error meanwhile propagates, and the whole batch is retried.
        """
        outputs: list[Output] = []
        for rec in records:
            try:
                outputs += await self.processor.process(topic, [rec])
            except TRANSIENT:
                raise
            except Exception as exc:
                log.exception("record %s:%d:%d fails on its own: dead-lettered", rec.topic, rec.partition,
                              rec.offset)
                outputs += await self.processor.reject([rec], "processing_failed", f"processing raised {exc!r}")
        return outputs

    async def deliver(self, batch: Batch, stream: Any) -> None:
        """Send, wait for the broker's acks, mark delivered, and only then ack the input events.

        Faust commits an offset once every event before it is acked, so an
        event whose outputs were not delivered is consumed again after a
        crash (at-least-once; the outboxes make the replay send the same bytes).
        A degraded batch cannot be marked yet: it joins the recovery queue,
        its events un-acked until Redis has its feature updates.
        """
        outputs = batch.outputs
        marks = [o.mark for o in outputs]
        self._delivering.update(marks)
        delay = 0.1
        try:
            while True:
                try:
                    await self.send(outputs)
                    if not batch.degraded:
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
        if batch.degraded:
            self._recovered.clear()
            self._recovery.append((batch, stream))
            if self._recoverer is None or self._recoverer.done():
                self._recoverer = asyncio.ensure_future(self._recover())
            return
        await ack_events(stream, batch.events)

    async def _recover(self) -> None:
        """Apply the degraded batches' feature updates in order once Redis answers, deliver the alerts their
        flagged decisions raise (none could be raised without Redis), then ack their events."""
        delay = 0.1
        while self._recovery:
            batch, stream = self._recovery[0]
            try:
                alerts = await self.processor.recover(batch.records[0].topic, batch.records, batch.outputs)
                if alerts:
                    await self.send(alerts)
                    await self.processor.mark_delivered(alerts)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("degraded batch not recovered yet (%r); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            self._outage = False  # Redis answers again: new batches take the normal path (after this queue)
            delay = 0.1
            self._recovery.popleft()
            await ack_events(stream, batch.events)
        self._recovered.set()


async def ack_events(stream: Any, events: list[Any]) -> None:
    """Ack events taken by :func:`take_batches` once their outputs were delivered (Faust then commits them)."""
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
    worker and the broker take turns; and its stream yields one record at a
    time (a loop turn, processors and context per record: ~120 µs here). This
    takes the events in bulk from the channel queue the consumer fills,
    doing per event only what the stream does for bookkeeping: skip events of
    an older consumer generation or while flow control is off (without acking
    them, unlike Faust's stream: see below), and track each message as
    unacked so that commits wait for its ack.
    Faust stays the application: agents, partition assignment, commits.
    """
    app = stream.app
    consumer = app.consumer
    queue = stream.channel.queue
    acking_topics = app.topics.acking_topics
    track = consumer.unacked.add
    on_message_in = stream._on_message_in
    loop = asyncio.get_running_loop()
    started_here = await stream.maybe_start()
    try:
        while not stream.should_stop:
            batch = [await queue.get()]
            deadline = loop.time() + within
            while len(batch) < max_:
                if not queue.empty():
                    batch.append(queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), remaining))
                except TimeoutError:
                    break
            events = []
            active, generation = app.flow_control.is_active(), app.consumer_generation_id
            for event in batch:
                message = event.message
                if not active or message.generation_id != generation:
                    # fetched before a rebalance: dropped, and NOT acked. Faust's own stream acks such a record
                    # "so that the lag does not grow", which lets the commit pass over an event nobody processed
                    # (found losing 11 payments of a partition in a 3-worker SIGKILL run); unacked, the
                    # partition's new owner consumes it again from the committed offset.
                    continue
                if message.topic in acking_topics and not message.tracked:
                    message.tracked = True
                    track(message)
                    on_message_in(message.tp, message.offset, message)
                events.append(event)
            if events:
                yield events
    except StopAsyncIteration:  # the channel was closed (shutdown): the end of the stream, as in Faust's
        return
    finally:
        if started_here:
            await stream.stop()
