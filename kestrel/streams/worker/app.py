"""The Faust application: the composition root of a Kestrel worker.

One agent per input topic takes micro-batches (:func:`~kestrel.streams.worker.runtime.take_batches`),
hands them to :class:`~kestrel.streams.worker.processing.Processor`, sends the outputs,
waits for the broker's acknowledgements, marks them delivered, and only then
acks the input events (Faust commits contiguous acked offsets): at-least-once
delivery with idempotent processing, which works on both tansu and Apache
Kafka. While one batch is being delivered the next one is processed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import faust
import orjson

from kestrel.feature_store import topics
from kestrel.feature_store.redis_store import prepare_kernels
from kestrel.models.registry import is_registry
from kestrel.streams.config import Settings
from kestrel.streams.records import Output
from kestrel.streams.recs.agent import install_request_agent
from kestrel.streams.web.alerts import install_alert_views
from kestrel.streams.web.experiments import install_experiment_views
from kestrel.streams.web.views import install_views
from kestrel.streams.worker.consumer import patch_faust_consumer
from kestrel.streams.worker.heap import settle_heap
from kestrel.streams.worker.model_updates import ModelWatcher, Served
from kestrel.streams.worker.processing import PAYMENT_SETS, fraud_policy
from kestrel.streams.worker.runtime import Runtime, take_batches

log = logging.getLogger("kestrel.worker")


def create_app(settings: Settings | None = None) -> faust.App:
    settings = settings or Settings.from_env()
    patch_faust_consumer(settings.fetch_max_wait_ms)
    if settings.head_arithmetic != "redis":  # before the app runs: no batch waits for them, no heartbeat is late
        prepare_kernels(PAYMENT_SETS)
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
        **settings.faust_producer(),
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
    install_experiment_views(app, runtime)
    install_request_agent(app, runtime)  # recs.requests -> recs.responses
    if is_registry(settings.fraud_model, "fraud") or is_registry(settings.recs_model, "recs"):
        _install_model_watcher(app, runtime)
    if settings.guardrail_check_s > 0:
        _install_guardrail_monitor(app, runtime)

    @app.task
    async def warm_up() -> None:
        """Pay one-time costs (model files, first torch/FAISS calls, Redis scripts) before reporting ready."""
        async def once() -> None:
            await runtime.processor.warm_up()
            settle_heap()  # see heap.py: frozen warm-up objects, rare young collections
            runtime.warm = True

        await _until_done(once, "warm-up failed", cap_s=5.0)

    return app


async def _until_done(step: Any, failure: str, cap_s: float) -> None:
    """Await ``step()`` until it returns, retrying failures with a doubling delay (at most ``cap_s``)."""
    delay = 0.5
    while True:
        try:
            await step()
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s; retrying in %.1fs", failure, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, cap_s)


def _install_guardrail_monitor(app: faust.App, runtime: Runtime) -> None:
    """Stop experiments whose guardrails are breached (see kestrel/streams/experiments/guardrails.py), and keep
    each running experiment's results over time for the experiments page (series.py)."""
    import redis

    from kestrel.feature_store.keys import KeySpace
    from kestrel.streams.experiments.guardrails import stop_breached
    from kestrel.streams.experiments.series import record

    settings = runtime.settings

    def tick(client: redis.Redis, keys: KeySpace) -> list[dict[str, Any]]:
        return stop_breached(client, keys, lambda exp, report: record(client, keys, exp, report,
                                                                      settings.guardrail_check_s))

    @app.timer(settings.guardrail_check_s)
    async def watch_guardrails() -> None:
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=settings.redis_timeout_s)
        try:
            stopped = await asyncio.to_thread(tick, client, KeySpace(settings.redis_prefix))
        except Exception:  # Redis away: the next tick tries again; decisions are not affected
            log.exception("guardrail check failed")
            return
        finally:
            client.close()
        for doc in stopped:
            log.warning("%s", doc["message"])
            await runtime.send([Output(topics.OPERATOR_EVENTS, doc["experiment"].encode(),
                                       orjson.dumps({k: v for k, v in doc.items() if k != "report"}), "")])


def _install_model_watcher(app: faust.App, runtime: Runtime) -> None:
    """Hot swap of the fraud model, and of the recommender, when a registry alias moves (see model_updates.py)."""
    settings = runtime.settings

    async def report(doc: dict[str, Any]) -> None:
        await runtime.send([Output(topics.OPERATOR_EVENTS, b"models", orjson.dumps(doc), "")])

    @app.task
    async def watch_models() -> None:
        processor = runtime.processor
        served = [Served(settings.model_alias, lambda: processor.scorer.version,
                         lambda scorer: processor.swap_scorer(scorer) if scorer is not None else None)]
        if settings.shadow_alias:
            served.append(Served(settings.shadow_alias, lambda: processor.shadow.version if processor.shadow else None,
                                 processor.set_shadow, required=False))
        fraud_registry = settings.fraud_model if is_registry(settings.fraud_model, "fraud") else None
        watcher = ModelWatcher(settings.broker, fraud_registry, served, fraud_policy(settings), report=report,
                               on_result=lambda result: runtime.metrics.model_swaps.labels(result).inc(),
                               doorbells={"recs": processor.recs_router.ring})
        await _until_done(watcher.run, "model watcher stopped", cap_s=10.0)  # run() returns only when cancelled


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
                batch = await runtime.prepare(topic_name, events)
                if delivering is not None:
                    await asyncio.shield(delivering)  # a cancel here must not cancel the delivery itself
                delivering = asyncio.ensure_future(runtime.deliver(batch, stream))
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
