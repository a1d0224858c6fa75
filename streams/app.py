"""The Faust application: the composition root of a Kestrel worker.

One agent per input topic takes micro-batches (``take_events``), hands them to
:class:`~streams.processing.Processor`, sends the outputs, waits for the
broker's acknowledgements, marks them delivered, and only then lets Faust
ack (and later commit) the input offsets: at-least-once delivery with
idempotent processing, which is what works on both tansu and Apache Kafka.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiokafka
import faust
import faust.transport.drivers.aiokafka as faust_aiokafka_driver
import redis.asyncio as aioredis

from streams import topics
from streams.alerts_web import install_alert_views
from streams.config import Settings
from streams.http import install_views
from streams.metrics import Metrics
from streams.processing import Output, Processor, RawRecord
from streams.recommend import install_request_agent

log = logging.getLogger("kestrel.worker")


class _AiokafkaWithFetchWait:
    """Stands in for the ``aiokafka`` module inside Faust's driver to set ``fetch_max_wait_ms``.

    Faust hard-codes 1500 ms. Apache Kafka answers a fetch as soon as data
    arrives, but tansu holds every fetch for the full wait, which would put
    that wait on every decision. A short wait costs only idle fetches.
    """

    def __init__(self, fetch_max_wait_ms: int) -> None:
        self._wait = fetch_max_wait_ms

    def __getattr__(self, name: str) -> Any:
        return getattr(aiokafka, name)

    def AIOKafkaConsumer(self, *args: Any, **kwargs: Any) -> aiokafka.AIOKafkaConsumer:
        kwargs["fetch_max_wait_ms"] = self._wait
        return aiokafka.AIOKafkaConsumer(*args, **kwargs)


def _set_fetch_wait(fetch_max_wait_ms: int) -> None:
    faust_aiokafka_driver.aiokafka = _AiokafkaWithFetchWait(fetch_max_wait_ms)


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


def create_app(settings: Settings | None = None) -> faust.App:
    settings = settings or Settings.from_env()
    _set_fetch_wait(settings.fetch_max_wait_ms)
    brokers = [f"kafka://{host.strip()}" for host in settings.broker.split(",") if host.strip()]
    app = faust.App(
        settings.app_id,
        broker=brokers,
        store="memory://",
        topic_partitions=settings.partitions,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=settings.heartbeat_interval_s,
        broker_commit_interval=settings.commit_interval_s,
        producer_acks=-1,
        producer_linger=settings.linger_ms / 1000,
        web_enabled=True,
        web_bind=settings.web_host,
        web_host=settings.web_host,
        web_port=settings.web_port,
        web_in_thread=False,
    )
    runtime = Runtime(app, settings)
    app.kestrel = runtime  # type: ignore[attr-defined]

    for name in topics.INPUT_TOPICS:
        _install_agent(app, runtime, name)
    install_views(app, runtime)
    install_alert_views(app, runtime)
    install_request_agent(app, runtime)  # recs.requests -> recs.responses

    @app.task
    async def warm_up() -> None:
        """Pay one-time costs (model files, first torch/FAISS calls, Redis scripts) before reporting ready."""
        delay = 0.5
        while True:
            try:
                await runtime.processor.warm_up()
                runtime.warm = True
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("warm-up failed; retrying in %.1fs", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    return app


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


def _install_agent(app: faust.App, runtime: Runtime, topic_name: str) -> None:
    source = runtime.topic(topic_name)
    size, within = runtime.settings.batch_size, runtime.settings.batch_within_s

    async def consume(stream: Any) -> None:
        # Two batches in flight: batch N is sent, acknowledged and marked while batch N+1 is processed; N+1's
        # sends start only after N's acks (per-partition order), and each batch's events are acked only after
        # its outputs were delivered.
        delivering: asyncio.Future | None = None
        try:
            async for events in take_batches(stream, size, within):
                outputs = await runtime.prepare(topic_name, events)
                if delivering is not None:
                    await asyncio.shield(delivering)  # a cancel here must not cancel the delivery itself
                delivering = asyncio.ensure_future(runtime.deliver(outputs, events, stream))
            if delivering is not None:
                await asyncio.shield(delivering)
        except asyncio.CancelledError:
            if delivering is not None:  # shutdown: let a batch in flight finish its delivery first
                await asyncio.shield(delivering)
            raise

    consume.__name__ = consume.__qualname__ = "consume_" + topic_name.replace(".", "_")
    app.agent(source, name=f"kestrel.{topic_name}")(consume)


def run_worker(app: faust.App, loglevel: str = "warning") -> None:
    """Run ``app`` in this process until SIGTERM/SIGINT, without Faust's terminal spinner.

    The spinner installs a DEBUG-level log handler, which makes every library
    log call in the hot path build a record; measurably slower.
    """
    from faust.worker import Worker

    class QuietWorker(Worker):
        def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
            logger.setLevel(level or logging.WARNING)

    QuietWorker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False).execute_from_commandline()
