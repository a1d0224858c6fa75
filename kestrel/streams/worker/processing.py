"""Batch processing of one topic's records: validate, update features, decide.

Broker-agnostic: the Faust agents hand in :class:`RawRecord` batches and send
the returned :class:`Output` records. Delivery is at-least-once; each output
carries a ``mark`` key, set in Redis only after the broker acknowledged it,
so a batch replayed after a crash re-sends only what was never delivered.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis

from kestrel.feature_store import topics
from kestrel.feature_store.cached_reads import VersionedReads
from kestrel.feature_store.definitions import EventUnit, compile_event, event_unit
from kestrel.feature_store.keys import KeyedHasher, KeySpace
from kestrel.feature_store.redis_store import AsyncRedisOnlineStore, Snapshot, prepare_kernels
from kestrel.feature_store.schemas import Interaction, Label, Transaction, epoch_of, iso_of
from kestrel.feature_store.sets import (
    CARD_DEVICE,
    CARD_PROFILE,
    CARD_TERMINAL,
    FRAUD_FEATURE_SET_VERSION,
    TERMINAL_ACTIVITY,
    TERMINAL_RISK,
    USER_ACTIVITY,
)
from kestrel.models.experiments import Experiment, Variant, enrol
from kestrel.models.fraud_features import model_inputs, payment_features
from kestrel.models.fraud_model import FraudModel, ModelScorer, latest_artifact
from kestrel.models.fraud_online import DriftEvent, OnlineFraudLearner, labelled_share
from kestrel.models.policy import Policy
from kestrel.models.popularity import PopularityRecommender
from kestrel.models.registry import Registry, is_registry
from kestrel.models.rules import RuleScorer
from kestrel.models.scoring import FraudScore, FraudScorer, Thresholds
from kestrel.streams.alerts.store import AlertDesk
from kestrel.streams.config import Settings
from kestrel.streams.experiments.live import LiveExperiments
from kestrel.streams.experiments.results import variant_durations
from kestrel.streams.ingest.producer import EVENT_ID_HEADER
from kestrel.streams.ingest.validation import Rejection, check_time, parse_event
from kestrel.streams.metrics import Metrics
from kestrel.streams.records import Output, RawRecord
from kestrel.streams.recs.service import RecommendationService, RecOptions, RecResult
from kestrel.streams.worker.delivery import DeliveryLedger, Logs
from kestrel.streams.worker.exposures import Exposures
from kestrel.streams.worker.recs_routing import RecsRouter
from kestrel.streams.worker.shared_learner import SharedLearner
from kestrel.streams.worker.variant_models import VariantModels, model_refs

log = logging.getLogger("kestrel.worker")
RECS_PER_DECISION = 10
PAYMENT_SETS = (CARD_PROFILE, TERMINAL_ACTIVITY, CARD_TERMINAL, CARD_DEVICE)  # a payment's unit, in this order


DRIFT_MESSAGES = {
    "missed_fraud_rate": "more frauds are scored under the review threshold than before: a new pattern? The "
                         "online learner is learning it; review thresholds and consider a retrain",
    "false_alarm_rate": "more alerts turn out genuine than before: review thresholds and consider a retrain",
}


def fraud_policy(settings: Settings) -> Policy:
    """``KESTREL_FRAUD_POLICY``, else review at 0.5: the thresholds every served model version gets."""
    return Policy.from_json(settings.fraud_policy) if settings.fraud_policy else Policy(review=0.5)


def load_fraud_scorer(settings: Settings) -> FraudScorer:
    """The trained model named by ``KESTREL_FRAUD_MODEL``, else the rules.

    A registry root serves the version its alias ``KESTREL_MODEL_ALIAS``
    (default ``champion``) points at, checked against its registered
    checksum; any other folder serves the newest artifact under it.
    """
    if not settings.fraud_model:
        return RuleScorer()
    if is_registry(settings.fraud_model, "fraud"):
        record = Registry(settings.fraud_model, "fraud").resolve(settings.model_alias)
        record.verify()
        path: Path | None = Path(record.path)
    else:
        path = latest_artifact(settings.fraud_model)
    if path is None:
        raise FileNotFoundError(f"KESTREL_FRAUD_MODEL={settings.fraud_model}: no model artifact (meta.json) there")
    policy = fraud_policy(settings)
    import torch

    # A micro-batch through a small MLP is 5x faster on one thread than on two that contend with the event
    # loop (measured: 12 vs 55-85 ms per 500 payments, forward + attribution backward, on this 2-core box).
    torch.set_num_threads(int(os.environ.get("KESTREL_TORCH_THREADS", "1")))
    return ModelScorer(FraudModel.load(path), policy)


@dataclass(frozen=True, slots=True)
class LabelledTransaction:
    """A label joined with its logged decision: what the terminal-risk features aggregate."""

    event_id: str
    terminal_id: str
    epoch_s: float
    is_fraud: bool


def _terminal_of(decision: dict[str, Any]) -> str:
    return decision.get("terminal_id") or f"merchant:{decision['merchant_id']}"


def deadletter_record(rec: RawRecord, rej: Rejection, now: float) -> dict[str, Any]:
    """The dead-letter document: reason, where it came from, and the original bytes."""
    header_id = rec.headers.get(EVENT_ID_HEADER)
    return {
        "type": "deadletter",
        "reason": rej.reason,
        "message": rej.message,
        "field": rej.field,
        "event_id": rej.event_id or (header_id.decode(errors="replace") if header_id else None),
        "source_topic": rec.topic,
        "partition": rec.partition,
        "offset": rec.offset,
        "key_b64": base64.b64encode(rec.key).decode() if rec.key is not None else None,
        "value_b64": base64.b64encode(rec.value).decode() if rec.value is not None else None,
        "headers": {k: base64.b64encode(v).decode() for k, v in rec.headers.items()},
        "received_at": iso_of(now),
    }


class Processor:
    """Owns the per-batch logic of every input topic for one worker."""

    def __init__(self, settings: Settings, client: aioredis.Redis, metrics: Metrics,
                 scorer: FraudScorer | None = None, recommender: PopularityRecommender | None = None) -> None:
        self.settings = settings
        self.client = client
        self.metrics = metrics
        self.keys = KeySpace(settings.redis_prefix)
        self.hasher = KeyedHasher(settings.hash_key.encode())
        self.store = AsyncRedisOnlineStore(client, settings.dedup_ttl_s, self.keys, self.hasher,
                                           heads_in_worker=settings.head_arithmetic != "redis")
        self.terminal_risk = VersionedReads(self.store, TERMINAL_RISK)  # read by every payment, changed by labels
        self.ledger = DeliveryLedger(client, settings.dedup_ttl_s, writes_ttl_s=settings.decision_log_ttl_s)
        self.scorer: FraudScorer = scorer or load_fraud_scorer(settings)
        self._rules = RuleScorer()  # degraded mode's scorer: the rules on the payment alone
        # the online learner shared by all workers, when the scorer is a trained model (rules do not learn)
        self.learner = SharedLearner(client, self.keys, self.scorer, settings.decision_log_ttl_s) \
            if isinstance(self.scorer, ModelScorer) else None
        self.shadow: ModelScorer | None = None  # scored beside the served model, logged, never acted on
        self.experiments = LiveExperiments(client, self.keys)
        # the models experiment variants run (Variant.model), loaded beside the served one
        self.variant_models = VariantModels(settings.fraud_model, fraud_policy(settings), client, self.keys,
                                            settings.decision_log_ttl_s,
                                            on_result=lambda result: metrics.variant_models.labels(result).inc())
        self.exposures = Exposures(client, self.keys)
        self.recommender = recommender or PopularityRecommender()
        self.recs = RecommendationService(client, self.keys, self.hasher, settings.recs_model, self.recommender,
                                          alias=settings.recs_alias)
        self.recs_router = RecsRouter(self.recs, self.experiments, self.exposures, self.store, client, self.keys,
                                      self.hasher, metrics, settings.recs_model, self.recommender)
        self.alerts = AlertDesk(settings, client, self.keys, metrics)  # analyst cases and alerts.fraud
        self._timing = {kind: (metrics.decision_latency.labels(kind), metrics.event_age.labels(kind))
                        for kind in ("fraud", "recommendation", "label")}

    def swap_scorer(self, scorer: ModelScorer) -> None:
        """Serve another fraud model version from the next batch on (a batch in flight keeps its own).

        The scorer and its shared online learner change together, in one
        step between two awaits of the event loop.
        """
        learner = SharedLearner(self.client, self.keys, scorer, self.settings.decision_log_ttl_s)
        self.scorer, self.learner = scorer, learner

    def set_shadow(self, scorer: ModelScorer | None) -> None:
        """Score every payment with ``scorer`` too, from the next batch on (None: stop). Its score and the
        action it would have taken go in the decision's ``shadow``; nothing acts on them."""
        self.shadow = scorer

    # -- entry point -------------------------------------------------------
    async def process(self, topic: str, records: Sequence[RawRecord]) -> list[Output]:
        """Every record yields exactly one output (decision or dead letter), minus those already delivered."""
        started = time.time()
        self.metrics.events_in.labels(topic).inc(len(records))
        self.metrics.batch_size.labels(topic).observe(len(records))
        outputs, valid = self._validate(topic, records, started)
        logs = Logs()
        if valid:
            handler = {"transaction": self._transactions, "interaction": self._interactions,
                       "label": self._labels}[topics.TOPIC_EVENT_TYPE[topic]]
            outputs.extend(await handler(valid, started, logs))
        return await self.deliverable(outputs, logs)

    async def deliverable(self, outputs: list[Output], logs: Logs | None = None) -> list[Output]:
        """The outputs still to send (see :meth:`_not_yet_delivered`), their exposures counted."""
        fresh = await self._not_yet_delivered(outputs, logs)
        await self.exposures.count([o for o in fresh if o.topic == topics.EXPOSURES])
        return fresh

    def _validate(self, topic: str, records: Sequence[RawRecord],
                  started: float) -> tuple[list[Output], list[tuple[RawRecord, Any]]]:
        """Dead letters for the records that fail validation, and the parsed events of the others."""
        event_type = topics.TOPIC_EVENT_TYPE[topic]
        rejected: list[Output] = []
        valid: list[tuple[RawRecord, Any]] = []
        for rec in records:
            try:
                parsed = parse_event(rec.value, event_type, self.settings.max_event_bytes)
                if not isinstance(parsed, Rejection):
                    parsed = check_time(parsed, started, self.settings.max_future_s) or parsed
            except Exception as exc:
                parsed = Rejection("invalid", f"could not be validated: {exc!r}")
            if isinstance(parsed, Rejection):
                rejected.append(self._deadletter(rec, parsed, started))
            else:
                valid.append((rec, parsed))
        return rejected, valid

    def _deadletter(self, rec: RawRecord, rej: Rejection, now: float) -> Output:
        self.metrics.deadletters.labels(rec.topic, rej.reason).inc()
        return Output(topics.DEADLETTER, rec.key or b"", orjson.dumps(deadletter_record(rec, rej, now)),
                      self.keys.published("dl", f"{rec.topic}:{rec.partition}:{rec.offset}"))

    async def reject(self, records: Sequence[RawRecord], reason: str, message: str) -> list[Output]:
        """Dead letters for records that cannot be processed (a poison record), through the outbox like any output."""
        now = time.time()
        return await self._not_yet_delivered([self._deadletter(rec, Rejection(reason, message), now)
                                              for rec in records])

    # -- degraded mode: decisions while Redis is unreachable ----------------
    def degraded(self, topic: str, records: Sequence[RawRecord]) -> list[Output]:
        """Decisions from the rules on each payment alone (no stored features), flagged ``degraded``; no I/O.

        For ``KESTREL_DEGRADED_MODE=rules``: a payment gateway gets an answer
        while Redis is down. The feature updates are applied, and the decisions
        logged and marked delivered, once Redis is back (:meth:`recover`).
        """
        started = time.time()
        self.metrics.events_in.labels(topic).inc(len(records))
        outputs, valid = self._validate(topic, records, started)
        events = [e for _, e in valid]
        feats = [payment_features(e.amount, e.epoch_s, e.card_present, e.device_id, {}) for e in events]
        scores = self._rules.score_batch(events, feats)
        now = time.time()
        for (rec, e), f, sc in zip(valid, feats, scores, strict=True):
            body = orjson.dumps(self._decision_doc(e, f, sc, self._rules.version, started, now, degraded=True))
            outputs.append(Output(topics.FRAUD_DECISIONS, self.token("card", e.card_id).encode(), body,
                                  self.keys.decision(e.event_id), self.keys.decision(e.event_id)))
            self._observe("fraud", rec, started, now)
        self.metrics.degraded.inc(len(valid))
        return outputs

    async def recover(self, topic: str, records: Sequence[RawRecord], sent: Sequence[Output]) -> list[Output]:
        """After a degraded batch: apply its feature updates, log its decisions as sent, mark them delivered,
        and return the analyst alerts its flagged decisions open or update (for the caller to deliver).

        Idempotent (the units' markers, NX logs, marks, the alert desk's per-decision markers), so it is
        simply retried until Redis answers; alerts already delivered are not returned again.
        """
        _, valid = self._validate(topic, records, time.time())
        await self.store.apply_units([self._payment_unit(e) for _, e in valid])
        await self.ledger.unsent([], [(o.log_key, o.value) for o in sent if o.log_key])
        await self.mark_delivered(sent)
        # the degraded decisions, as sent (parsed back: this is the rare recovery path, not the hot one)
        docs = [orjson.loads(o.value) for o in sent if o.topic == topics.FRAUD_DECISIONS]
        return await self._not_yet_delivered(await self.alerts.on_decisions(docs))

    async def warm_up(self) -> None:
        """First calls pay one-time costs (model files, torch and FAISS first calls): pay them before ready.

        Without this the first batches after a start wait seconds behind them
        (measured in the demo: p50 1.1 s over the first 3,000 events).
        """
        await self.client.ping()
        if self.store.heads_in_worker:  # a thread: compiling the head kernels the first time takes seconds
            await asyncio.to_thread(prepare_kernels, PAYMENT_SETS)
        if isinstance(self.scorer, ModelScorer):
            self.scorer.score_batch([None], [payment_features(10.0, time.time(), None, None, {})])
        if self.settings.recs_model:
            try:  # a missing or broken recommender must not keep fraud decisions from starting: fallback
                await self.recs.wait_loaded(timeout_s=120.0)
            except Exception:
                log.exception("recommendation model not loaded at start; serving trending items meanwhile")

    async def mark_delivered(self, outputs: Sequence[Output]) -> None:
        """Record that these outputs reached the broker (called after the acks)."""
        if not outputs:
            return
        await self.ledger.mark([(out.mark, out.log_key) for out in outputs if out.mark])
        self.exposures.delivered(outputs)
        for topic, n in Counter(out.topic for out in outputs).items():
            self.metrics.events_out.labels(topic).inc(n)

    async def _not_yet_delivered(self, outputs: list[Output], logs: Logs | None = None) -> list[Output]:
        """Drop outputs already delivered before a restart, and re-send exactly the bytes first attempted.

        Also stores ``logs`` in the same round trip (see :mod:`kestrel.streams.worker.delivery`).
        """
        unique: dict[str, Output] = {}
        for out in outputs:
            unique.setdefault(out.mark, out)
        logs = logs or Logs()
        stored = await self.ledger.unsent([(m, o.log_key, o.value) for m, o in unique.items()], logs.writes,
                                          logs.counts)
        fresh = [o if body is o.value or body == o.value else replace(o, value=body)
                 for o, body in zip(unique.values(), stored, strict=True) if body is not None]
        if len(fresh) < len(outputs):
            self.metrics.replayed.labels(outputs[0].topic).inc(len(outputs) - len(fresh))
        return fresh

    def token(self, entity: str, raw_id: str) -> str:
        return self.hasher.token(entity, raw_id)

    async def recommend(self, user_ids: Sequence[str], options: RecOptions | Sequence[RecOptions],
                        exposures: list[Output]) -> list[RecResult]:
        """Recommendations for raw user ids from their current features (two-tower, or trending fallback),
        through the running recommendation experiments (see :mod:`kestrel.streams.worker.recs_routing`)."""
        return await self.recs_router.recommend(user_ids, options, exposures)

    # -- per event type ----------------------------------------------------
    async def _transactions(self, valid: list[tuple[RawRecord, Transaction]], started: float,
                            logs: Logs) -> list[Output]:
        events = [e for _, e in valid]
        risks = asyncio.ensure_future(self.terminal_risk.vectors([TERMINAL_ACTIVITY.entity_id_of(e) for e in events],
                                                                 [e.epoch_s for e in events]))
        # the versions this batch is decided (and shadowed) by, even if one is swapped meanwhile
        scorer, shared, shadow = self.scorer, self.learner, self.shadow
        learner = await shared.current() if shared is not None else None
        experiments = await self.experiments.running("fraud")
        self.variant_models.want(model_refs(experiments))
        cards = [self.token("card", e.card_id) for e in events]
        # routing is pure: each payment's variants, and the model one of them runs (None: the served one)
        routes = [self._variants_of(experiments, e, card) for e, card in zip(events, cards, strict=True)] \
            if experiments else None
        variant_models = {} if routes is None else {m[0].version: m[1] for _, m in routes if m is not None}
        variant_learners = {version: await shared.current() for version, shared in variant_models.items()}

        def score(feats: list[dict[str, Any]]) -> list[tuple[FraudScore, FraudScorer, float]]:
            """Each payment's score, by the served model or the model its variant runs (one batch per model), and
            its share of that model's time (s): what an experiment's variants are compared on, besides latency."""
            by_model: dict[str, list[int]] = {}
            models: dict[str, FraudScorer] = {scorer.version: scorer}
            for i in range(len(events)):
                model = routes[i][1] if routes is not None else None
                version = scorer.version if model is None else model[0].version
                if model is not None:
                    models[version] = model[0]
                by_model.setdefault(version, []).append(i)
            out: list[tuple[FraudScore, FraudScorer, float]] = [None] * len(events)  # type: ignore[list-item]
            for version, idx in by_model.items():
                model, online = models[version], learner if version == scorer.version else variant_learners[version]
                part_events, part_feats = [events[i] for i in idx], [feats[i] for i in idx]
                t0 = time.perf_counter()
                scored = (model.score_batch(part_events, part_feats, online) if online is not None  # type: ignore[call-arg]
                          else model.score_batch(part_events, part_feats))
                each = (time.perf_counter() - t0) / len(idx)
                for i, sc in zip(idx, scored, strict=True):
                    out[i] = (sc, model, each)
            return out

        async def decide(applied: list[tuple[bool, list[Snapshot]]]
                         ) -> tuple[list[Output], list[dict[str, Any]], list[Output], list[tuple[str, str, str]]]:
            """The batch's decisions from its feature vectors (no side effects: run again if the commit is
            refused), computed while Redis stores the feature commit; and the enrolled decisions' durations,
            counted with their logs' first writes."""
            feats = []
            for e, (_, (card, terminal, card_terminal, card_device)), risk in zip(events, applied, await risks,
                                                                                 strict=True):
                vector = {**card, **terminal, **risk, **card_terminal, **card_device}  # FRAUD_VECTOR_SETS order
                feats.append(payment_features(e.amount, e.epoch_s, e.card_present, e.device_id, vector))
            scores = score(feats)
            shadowed = shadow.score_batch(events, feats) if shadow is not None else None
            now = time.time()
            outputs, docs = [], []
            decided_at = iso_of(now)  # one time for the batch
            exposures: list[Output] = []
            durations: list[tuple[str, str, str]] = []
            for i, (e, f, (s, model, model_s)) in enumerate(zip(events, feats, scores, strict=True)):
                card = cards[i]
                enrolled: list[dict[str, Any]] = []
                if routes is not None and routes[i][0]:
                    s, enrolled = self._apply_variants(routes[i][0], e, card, s, model, exposures, decided_at)
                doc = self._decision_doc(e, f, s, model.version, started, now, card=card,
                                         decided_at=decided_at)
                if enrolled:
                    doc["experiments"] = enrolled
                    durations += variant_durations(enrolled, self.keys, self.keys.decision(e.event_id),
                                                   now - stamps[i] if stamps[i] else None, model_s)
                if shadowed is not None:
                    other = shadowed[len(docs)]
                    doc["shadow"] = {"model_version": shadow.version, "score": other.score, "action": other.action}
                docs.append(doc)
                outputs.append(Output(topics.FRAUD_DECISIONS, card.encode(), orjson.dumps(doc),
                                      self.keys.decision(e.event_id), self.keys.decision(e.event_id)))
            return outputs, docs, exposures, durations

        # the payment's time at the broker, for the decision latency of enrolled payments (none enrolled: not read)
        stamps = [] if routes is None else [rec.timestamp_ms / 1000 if rec.timestamp_ms else None for rec, _ in valid]
        try:
            _, (outputs, docs, exposures, durations) = await self.store.apply_units_then(
                [self._payment_unit(e) for e in events], decide)
        finally:  # where the feature path failed first: the read stops, and its own error is not left unread
            risks.cancel()
            if risks.done() and not risks.cancelled():
                risks.exception()
        now = time.time()
        for (rec, _), out in zip(valid, outputs, strict=True):
            logs.writes.append((out.log_key, out.value))  # the decision log labels join to, and this output's outbox
            self._observe("fraud", rec, started, now)
        logs.counts += durations
        outputs += exposures  # after the decisions (whose order the loop above follows)
        outputs += await self._join_early_labels(docs)
        return outputs + await self.alerts.on_decisions(docs)

    def _variants_of(self, experiments: Sequence[Experiment], e: Transaction, card: str
                     ) -> tuple[list[tuple[Experiment, Variant]], tuple[ModelScorer, SharedLearner] | None]:
        """The payment's variants and the model one of them runs, if loaded (None: the served one); see
        :func:`kestrel.models.experiments.enrol` for who is enrolled."""
        attributes = {"card": card, "merchant_id": e.merchant_id, "currency": e.currency,
                      "card_present": e.card_present, "terminal_id": e.terminal_id}
        models = self.variant_models
        enrolment = enrol(experiments, attributes, loaded=lambda ref: models.ready(ref) is not None)
        for reason in enrolment.skipped:
            self.metrics.experiments_idle.labels(reason).inc()
        return enrolment.variants, models.ready(enrolment.model) if enrolment.model else None

    def _apply_variants(self, enrolled_in: Sequence[tuple[Experiment, Variant]], e: Transaction, card: str,
                        s: FraudScore, scorer: FraudScorer, exposures: list[Output],
                        at: str) -> tuple[FraudScore, list[dict[str, Any]]]:
        """The variants' parameters applied to the payment's action (``scorer`` decided it), its exposures proposed.

        An exposure's mark is per (experiment, unit), so the delivery ledger
        sends each unit's first exposure once, across batches, redelivery and
        restarts (as long as marks are kept: ``KESTREL_DEDUP_TTL_S``).
        """
        enrolled = []
        for exp, variant in enrolled_in:
            review, block = variant.params.get("review_threshold"), variant.params.get("block_threshold")
            if review is not None or block is not None:
                base = scorer.thresholds
                review_t = float(review) if review is not None else base.review
                thresholds = Thresholds(review=review_t, block=max(float(block) if block is not None else base.block,
                                                                    review_t))
                s = FraudScore(s.score, thresholds.action(s.score), s.reasons)
            enrolled.append({"experiment": exp.key, "variant": variant.key, "model_version": scorer.version})
            exposure = self.exposures.propose(exp, variant, card, e.event_id, scorer.version, at)
            if exposure is not None:
                exposures.append(exposure)
        return s, enrolled

    def _payment_unit(self, e: Transaction) -> EventUnit:
        """A payment's one idempotency unit: the sets it feeds (terminal risk, which labels feed, is read apart)."""
        keys, hasher = self.keys, self.hasher
        return event_unit(e.event_id, [compile_event(fs, e, keys, hasher, in_unit=True) for fs in PAYMENT_SETS],
                          keys, "payment")

    def _decision_doc(self, e: Transaction, f: dict[str, Any], s: FraudScore, version: str, started: float,
                      now: float, card: str | None = None, degraded: bool = False,
                      decided_at: str | None = None) -> dict[str, Any]:
        doc = {
            "type": "fraud_decision", "event_id": e.event_id, "card": card or self.token("card", e.card_id),
            "merchant_id": e.merchant_id, "terminal_id": e.terminal_id,
            "amount": e.amount, "currency": e.currency, "score": s.score, "action": s.action,
            "reasons": [{"code": r.code, "message": r.message, "value": r.value,
                         **({"contribution": r.contribution} if r.contribution is not None else {})}
                        for r in s.reasons],
            "model_version": version,
            "feature_set": FRAUD_FEATURE_SET_VERSION, "features": f,
            "event_time": iso_of(e.epoch_s), "decided_at": decided_at or iso_of(now),
            "processing_ms": round((now - started) * 1000, 3),
        }
        if degraded:
            doc["degraded"] = True
        return doc

    async def _interactions(self, valid: list[tuple[RawRecord, Interaction]], started: float,
                            logs: Logs) -> list[Output]:
        events = [e for _, e in valid]
        await self.store.apply_batch([compile_event(USER_ACTIVITY, e, self.keys, self.hasher) for e in events])
        # Items first seen here (with a category in their context) join the index in batches.
        self.recs_router.observe_items([(e.item_id, (e.context or {}).get("category")) for e in events])
        await self.recs_router.outcomes(events)  # before this batch's exposures
        users = sorted({e.user_id for e in events})  # after the writes: the next recs reflect this batch
        exposures: list[Output] = []
        recs = dict(zip(users, await self.recommend(users, RecOptions(RECS_PER_DECISION), exposures), strict=True))
        now = time.time()
        outputs = []
        for rec, e in valid:
            user = self.token("user", e.user_id)
            res = recs[e.user_id]
            doc = {"type": "recommendation", "event_id": e.event_id, "user": user, "items": res.items,
                   "model_version": res.model_version, "path": res.path,
                   "trigger": {"item_id": e.item_id, "kind": e.kind},
                   **({"experiments": list(res.experiments)} if res.experiments else {}),
                   "event_time": iso_of(e.epoch_s), "decided_at": iso_of(now),
                   "processing_ms": round((now - started) * 1000, 3)}
            outputs.append(Output(topics.RECOMMENDATION_DECISIONS, user.encode(), orjson.dumps(doc),
                                  self.keys.published("recs", e.event_id)))
            self._observe("recommendation", rec, started, now)
        return outputs + exposures

    async def _labels(self, valid: list[tuple[RawRecord, Label]], started: float,
                      logs: Logs) -> list[Output]:
        pipe = self.client.pipeline(transaction=False)
        for _, e in valid:
            pipe.get(self.keys.decision(e.transaction_id))
        decisions = [orjson.loads(raw) if raw else None for raw in await pipe.execute()]
        await self._park_early_labels([e for (_, e), d in zip(valid, decisions, strict=True) if d is None])
        now = time.time()
        outputs = await self._apply_labels([e for _, e in valid], decisions, now)
        for (rec, e), decision in zip(valid, decisions, strict=True):
            doc = {"type": "training_example", "event_id": e.event_id, "transaction_id": e.transaction_id,
                   "label": 1 if e.verdict == "fraud" else 0, "verdict": e.verdict, "source": e.source,
                   "label_time": iso_of(e.epoch_s), "decision": decision,
                   "note": None if decision else ("no logged decision for this transaction yet: kept for "
                                                  "the online learner until it is decided (or expires)")}
            key = (decision or {}).get("card") or (self.token("card", e.card_id) if e.card_id else e.transaction_id)
            outputs.append(Output(topics.TRAINING_EXAMPLES, key.encode(), orjson.dumps(doc),
                                  self.keys.published("label", e.event_id)))
            self._observe("label", rec, started, now)
        return outputs

    async def _apply_labels(self, labels: list[Label], decisions: list[dict[str, Any] | None],
                            now: float) -> list[Output]:
        """What a label joined to its decision changes: the terminal's fraud counts and the online learner."""
        risk_events = [LabelledTransaction(e.event_id, _terminal_of(d), epoch_of(d["event_time"]), e.verdict == "fraud")
                       for e, d in zip(labels, decisions, strict=True) if d is not None]
        await self.store.apply_batch([compile_event(TERMINAL_RISK, r, self.keys, self.hasher) for r in risk_events])
        await self._experiment_outcomes(labels, decisions)
        return await self._learn(labels, decisions, now)

    async def _experiment_outcomes(self, labels: Sequence[Label], decisions: Sequence[dict[str, Any] | None]) -> None:
        """Labels of enrolled payments, per experiment: set once per label id (``HSETNX``), so idempotent."""
        pipe = self.client.pipeline(transaction=False)
        n = 0
        for e, d in zip(labels, decisions, strict=True):
            for enrolled in (d or {}).get("experiments", ()):
                pipe.hsetnx(self.keys.experiments.outcomes(enrolled["experiment"]), e.event_id,
                            orjson.dumps([enrolled["variant"], e.verdict == "fraud", d["action"]]))
                n += 1
        if n:
            await pipe.execute()

    async def _park_early_labels(self, labels: list[Label]) -> None:
        """Keep labels whose transaction is not decided yet (the labels topic ran ahead), to join them later.

        Only what the join needs is kept (no card id): the label's ids, verdict,
        source and time, for as long as decisions are kept.
        """
        if not labels:
            return
        pipe = self.client.pipeline(transaction=False)
        for e in labels:
            key = self.keys.early_labels(e.transaction_id)
            pipe.hset(key, e.event_id, orjson.dumps(e.model_dump(mode="json", exclude={"card_id"})))
            pipe.expire(key, self.settings.decision_log_ttl_s)
        await pipe.execute()
        self.metrics.online_labels.labels("parked").inc(len(labels))

    async def _join_early_labels(self, docs: list[dict[str, Any]]) -> list[Output]:
        """Labels parked before these transactions were decided: applied now, as if they had come after.

        One ``EXISTS`` per batch when none are parked (the usual case). Applying
        is idempotent (the terminal counts and the learner skip a label id they
        have seen), so a crash between applying and deleting is harmless.
        """
        keys = [self.keys.early_labels(d["event_id"]) for d in docs]
        if not keys or not await self.client.exists(*keys):
            return []
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.hvals(key)
        labels, decisions = [], []
        for doc, raws in zip(docs, await pipe.execute(), strict=True):
            for raw in raws:
                labels.append(Label.model_validate_json(raw))
                decisions.append(doc)
        outputs = await self._apply_labels(labels, decisions, time.time())
        await self.client.delete(*keys)
        return outputs

    async def _learn(self, labels: list[Label], decisions: list[dict[str, Any] | None], now: float) -> list[Output]:
        """Each label teaches the online learners at once, from the features its decision logged: the served
        model's and those of the models experiment variants run (every loaded version learns from every label,
        whichever version decided the payment, so that the versions compared learn from the same labels).

        Idempotent per label id (each checkpoint remembers them); a learner
        is saved (compare-and-set, shared by all workers) before the batch's
        outputs are sent, so before its offsets can be committed. A drift
        flagged by ADWIN becomes an operator event.
        """
        learners = [(self.scorer, self.learner)] if self.learner is not None and isinstance(self.scorer, ModelScorer) \
            else []
        learners += [(m, shared) for m, shared in self.variant_models.loaded()
                     if m.version not in {scorer.version for scorer, _ in learners}]
        if not learners:
            return []
        known = [(e, d) for e, d in zip(labels, decisions, strict=True) if d and d.get("features")]
        self.metrics.online_labels.labels("no_decision").inc(sum(1 for d in decisions if d and not d.get("features")))
        if not known:
            return []
        outputs = []
        for scorer, shared in learners:
            outputs += await self._teach(scorer, shared, known, now)
        return outputs

    async def _teach(self, scorer: ModelScorer, shared: SharedLearner, known: list[tuple[Label, dict[str, Any]]],
                     now: float) -> list[Output]:
        model = scorer.model
        x = model_inputs([d["features"] for _, d in known])
        inputs = model.online_inputs(x, model.base_logits(x))
        review = scorer.thresholds.review

        def teach(learner: OnlineFraudLearner) -> tuple[Counter, list[tuple[Label, DriftEvent]]]:
            outcomes: Counter = Counter()
            drifts = []
            for (e, d), xi in zip(known, inputs, strict=True):
                if learner.seen(e.event_id):
                    outcomes["already_learned"] += 1
                    continue
                outcomes["learned"] += 1
                score = float(d.get("score", 0.0))
                share = labelled_share(score, review, self.settings.label_audit_share)
                drift = learner.learn(e.event_id, xi, e.verdict == "fraud", score, review, share)
                if drift is not None:
                    drifts.append((e, drift))
            return outcomes, drifts

        outcomes, drifts = await shared.update(teach)
        for outcome, n in outcomes.items():
            self.metrics.online_labels.labels(outcome).inc(n)
        outputs = []
        for e, drift in drifts:
            self.metrics.drift_events.inc()
            doc = {"type": "drift", "detector": drift.detector, "metric": drift.metric,
                   "rate": round(drift.rate, 4), "labels_seen": drift.labels_seen,
                   "model_version": scorer.version, "label_event_id": e.event_id, "at": iso_of(now),
                   "message": DRIFT_MESSAGES.get(drift.metric, "the fraud decisions changed")}
            ident = e.event_id if scorer is self.scorer else f"{scorer.version}:{e.event_id}"
            outputs.append(Output(topics.OPERATOR_EVENTS, scorer.version.encode(), orjson.dumps(doc),
                                  self.keys.published("drift", ident)))
        return outputs

    def _observe(self, kind: str, rec: RawRecord, started: float, now: float) -> None:
        latency, age = self._timing[kind]  # the labelled children, looked up once (a lookup costs an observe)
        latency.observe(now - started)
        if rec.timestamp_ms:
            age.observe(max(now - rec.timestamp_ms / 1000, 0.0))

