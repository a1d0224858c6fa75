"""Hot swap: an alias move is announced on ``models.updates``; every worker loads the version and swaps.

The announcement is a doorbell, not the truth: a worker that hears one
resolves its alias in the registry again (the registry's audit log is the
truth), so announcements replayed at start, duplicated or out of order all
end on the alias's current version, and one lost announcement is made good
by the next one or by a restart. Every worker reads the whole topic itself
(no consumer group: each must hear every move), from the beginning, so a
worker started after a move still converges on it.

Loading runs in a thread beside the event loop: the artifact's files are
checked against the registered checksum, the model is loaded and a smoke
batch scored (finite scores in [0, 1]), and only then are the scorer and its
shared online learner replaced, in one assignment between two batches: a
batch in flight finishes on the version it started with, and every decision
names the version that made it. A load that fails keeps the old version and
tells operators (an event on ``alerts.operator`` and a metric).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from kestrel.feature_store import topics
from kestrel.feature_store.schemas import iso_of
from kestrel.models.fraud_features import payment_features
from kestrel.models.fraud_model import FraudModel, ModelScorer
from kestrel.models.policy import Policy
from kestrel.models.registry import ModelRecord, Registry

log = logging.getLogger("kestrel.worker")


def announcement(kind: str, alias: str, version: str | None, registry_root: str, seq: int) -> bytes:
    """The record an alias move publishes (what moved; workers resolve the alias themselves)."""
    return orjson.dumps({"type": "alias_moved", "kind": kind, "alias": alias, "version": version,
                         "registry": registry_root, "seq": seq, "at": iso_of(time.time())})


def announce(bootstrap: str, kind: str, alias: str, version: str | None, registry_root: str, seq: int,
             timeout_s: float = 10.0) -> bool:
    """Publish an alias move; False (and the reason logged) if the broker did not take it."""
    from confluent_kafka import Producer

    failures: list[str] = []
    try:
        topics.ensure_topics(bootstrap, 1, (topics.MODEL_UPDATES,), timeout_s=timeout_s)
        producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": False,
                             "message.timeout.ms": int(timeout_s * 1000)})
        producer.produce(topics.MODEL_UPDATES, key=f"{kind}:{alias}".encode(),
                         value=announcement(kind, alias, version, registry_root, seq),
                         on_delivery=lambda err, _msg: failures.append(str(err)) if err else None)
        left = producer.flush(timeout_s)
    except Exception as exc:  # the broker is down or unknown: the move stands, workers see it at start
        failures.append(repr(exc))
        left = 1
    if left or failures:
        log.warning("alias move %s/%s -> %s not announced on %s (%s): workers load it at their next start",
                    kind, alias, version, topics.MODEL_UPDATES, failures or "timed out")
        return False
    return True


def load_checked_scorer(record: ModelRecord, policy: Policy) -> ModelScorer:
    """A scorer of the registered version: files checked, model loaded, a smoke batch scored. Blocking."""
    record.verify()
    scorer = ModelScorer(FraudModel.load(record.path), policy)
    if scorer.version != record.version:
        raise ValueError(f"artifact at {record.path} holds {scorer.version}, registered as {record.version}")
    now = time.time()
    feats = [payment_features(amount, now - 3600 * i, i % 2 == 0, None, {})
             for i, amount in enumerate((1.0, 25.0, 480.0, 9_999.0))]
    scores = scorer.score_batch([None] * len(feats), feats)
    if not all(math.isfinite(s.score) and 0.0 <= s.score <= 1.0 for s in scores):
        raise ValueError(f"{record.version}: the smoke batch gave scores outside [0, 1]: {[s.score for s in scores]}")
    return scorer


class ModelWatcher:
    """Listens on ``models.updates`` and swaps the worker's fraud scorer when its alias moves.

    ``swap(scorer)`` installs a loaded scorer (on the event loop);
    ``report(doc)`` sends an operator event.
    """

    def __init__(self, bootstrap: str, registry_root: str, alias: str, policy: Policy,
                 current: Callable[[], str], swap: Callable[[ModelScorer], None],
                 report: Callable[[dict[str, Any]], Awaitable[None]], on_result: Callable[[str], None]) -> None:
        self.bootstrap = bootstrap
        self.registry = Registry(registry_root, "fraud")
        self.registry_root = registry_root
        self.alias = alias
        self.policy = policy
        self.current = current
        self.swap = swap
        self.report = report
        self.on_result = on_result
        self.failed: set[str] = set()  # versions whose load failed: not retried until the alias moves again

    async def run(self) -> None:
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                    auto_offset_reset="earliest", fetch_max_wait_ms=100)
        await consumer.start()
        try:
            parts = await self._partitions(consumer)
            consumer.assign(parts)
            await consumer.seek_to_beginning(*parts)
            await self.check()  # a move made while this worker was starting
            while True:
                batches = await consumer.getmany(timeout_ms=1000)
                heard = [orjson.loads(r.value) for recs in batches.values() for r in recs if r.value]
                if any(d.get("kind") == "fraud" and d.get("alias") == self.alias for d in heard):
                    self.failed.clear()  # a new move: a version that failed before may be fixed now
                    await self.check()
        finally:
            await consumer.stop()

    async def _partitions(self, consumer: AIOKafkaConsumer) -> list[TopicPartition]:
        while True:
            found = consumer.partitions_for_topic(topics.MODEL_UPDATES)
            if found:
                return [TopicPartition(topics.MODEL_UPDATES, p) for p in sorted(found)]
            await consumer._client.force_metadata_update()
            await asyncio.sleep(0.5)

    async def check(self) -> None:
        """Resolve the alias; load, check and swap in its version if it is not the one served."""
        try:
            record = self.registry.resolve(self.alias)
        except Exception as exc:  # the alias was removed, or the registry is unreadable: keep serving
            log.warning("fraud alias %s not resolvable (%s); keeping %s", self.alias, exc, self.current())
            return
        if record.version == self.current() or record.version in self.failed:
            return
        started = time.monotonic()
        try:
            scorer = await asyncio.to_thread(load_checked_scorer, record, self.policy)
        except Exception as exc:
            self.failed.add(record.version)
            self.on_result("failed")
            log.exception("fraud model %s (alias %s) failed to load; keeping %s", record.version, self.alias,
                          self.current())
            await self.report({"type": "model_load_failed", "kind": "fraud", "alias": self.alias,
                               "version": record.version, "serving": self.current(), "error": repr(exc)[:500],
                               "at": iso_of(time.time()),
                               "message": f"{record.version} could not be loaded; decisions stay on "
                                          f"{self.current()}. Check the artifact, then move the alias again."})
            return
        previous = self.current()
        self.swap(scorer)
        self.on_result("swapped")
        log.warning("fraud model swapped: %s -> %s (alias %s, loaded in %.1fs)", previous, record.version,
                    self.alias, time.monotonic() - started)
