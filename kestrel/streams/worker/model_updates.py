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
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
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


def heard_moves(values: Any) -> dict[str, set[str]]:
    """The aliases announced as moved, by kind, from raw ``models.updates`` values (unreadable ones skipped).

    >>> heard_moves([announcement("recs", "champion", "v2", "/r", 3), b"not json", None,
    ...              announcement("fraud", "shadow", None, "/f", 4)])
    {'recs': {'champion'}, 'fraud': {'shadow'}}
    """
    heard: dict[str, set[str]] = {}
    for value in values:
        try:
            doc = orjson.loads(value) if value else None
        except orjson.JSONDecodeError:
            continue
        if isinstance(doc, dict) and isinstance(doc.get("kind"), str) and isinstance(doc.get("alias"), str):
            heard.setdefault(doc["kind"], set()).add(doc["alias"])
    return heard


@dataclass
class Served:
    """One alias a worker serves: what version it serves now, and how to put another one in place.

    ``required``: the alias must always resolve (the champion: if it does not,
    the worker keeps what it serves); otherwise a removed alias unloads
    (``install(None)``: the shadow stops).
    """

    alias: str
    current: Callable[[], str | None]
    install: Callable[[ModelScorer | None], None]
    required: bool = True


class ModelWatcher:
    """Listens on ``models.updates`` and swaps what the worker serves when one of its aliases moves.

    Fraud aliases (``served``, from the fraud registry at ``registry_root``)
    are loaded, checked and installed here. Other kinds ring a doorbell:
    ``doorbells[kind](aliases)`` is called with the aliases heard moving (the
    recommender checks its registry at once and swaps in its own thread).
    ``report(doc)`` sends an operator event; ``on_result`` counts outcomes.
    """

    def __init__(self, bootstrap: str, registry_root: str | None, served: list[Served], policy: Policy,
                 report: Callable[[dict[str, Any]], Awaitable[None]], on_result: Callable[[str], None],
                 doorbells: Mapping[str, Callable[[set[str]], None]] | None = None) -> None:
        self.bootstrap = bootstrap
        self.registry = Registry(registry_root, "fraud") if registry_root else None
        self.served = {s.alias: s for s in served} if registry_root else {}
        self.doorbells = dict(doorbells or {})
        self.policy = policy
        self.report = report
        self.on_result = on_result
        self.failed: set[tuple[str, str]] = set()  # (alias, version) loads that failed: not retried until it moves

    async def run(self) -> None:
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                    auto_offset_reset="earliest", fetch_max_wait_ms=100)
        await consumer.start()
        try:
            parts = await self._partitions(consumer)
            consumer.assign(parts)
            await consumer.seek_to_beginning(*parts)
            for alias in self.served:  # a move made while this worker was starting
                await self.check(alias)
            while True:
                batches = await consumer.getmany(timeout_ms=1000)
                heard = heard_moves(r.value for recs in batches.values() for r in recs)
                for kind, aliases in heard.items():
                    if kind in self.doorbells:
                        self.doorbells[kind](aliases)
                for alias in heard.get("fraud", set()) & set(self.served):
                    self.failed = {f for f in self.failed if f[0] != alias}  # it moved: try again
                    await self.check(alias)
        finally:
            await consumer.stop()

    async def _partitions(self, consumer: AIOKafkaConsumer) -> list[TopicPartition]:
        while True:
            found = consumer.partitions_for_topic(topics.MODEL_UPDATES)
            if found:
                return [TopicPartition(topics.MODEL_UPDATES, p) for p in sorted(found)]
            await consumer._client.force_metadata_update()
            await asyncio.sleep(0.5)

    async def check(self, alias: str) -> None:
        """Resolve ``alias``; load, check and install its version if it is not the one served."""
        assert self.registry is not None  # served is empty without a fraud registry
        served = self.served[alias]
        version = self.registry.aliases().get(alias)
        if version is None:
            if served.required:
                log.warning("fraud alias %s points nowhere; keeping %s", alias, served.current())
            elif served.current() is not None:
                served.install(None)
                self.on_result("unloaded")
                log.warning("fraud alias %s removed: no longer served", alias)
            return
        if version == served.current() or (alias, version) in self.failed:
            return
        started = time.monotonic()
        try:
            scorer = await asyncio.to_thread(load_checked_scorer, self.registry.get(version), self.policy)
        except Exception as exc:
            self.failed.add((alias, version))
            self.on_result("failed")
            log.exception("fraud model %s (alias %s) failed to load; keeping %s", version, alias, served.current())
            await self.report({"type": "model_load_failed", "kind": "fraud", "alias": alias, "version": version,
                               "serving": served.current(), "error": repr(exc)[:500], "at": iso_of(time.time()),
                               "message": f"{version} could not be loaded for {alias}; {alias} stays on "
                                          f"{served.current()}. Check the artifact, then move the alias again."})
            return
        previous = served.current()
        served.install(scorer)
        self.on_result("swapped")
        log.warning("fraud model for %s: %s -> %s (loaded in %.1fs)", alias, previous, version,
                    time.monotonic() - started)
