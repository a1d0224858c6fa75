"""Analyst cases in Redis, and the desk that feeds them from fraud decisions.

Layout (under the worker's key prefix; cards appear only as keyed-hash tokens):

* ``alerts:case:{case_id}`` hash ``doc`` (the case JSON), ``rev``, ``status``;
  ``alerts:case:{case_id}:hits`` sorted set of its transactions' event_ids by event time
* ``alerts:card:{card}`` the card's open case id (absent: none)
* ``alerts:open`` sorted set of open case ids by :func:`kestrel.streams.alerts.cases.risk_rank`
* ``alerts:hist:{card}`` the card's latest decisions (event_ids by event time, capped);
  the decisions themselves are read from the decision log (``decision:{event_id}``)
* ``alerts:applied:{event_id}`` what a flagged decision did to its case (and the
  alert it published): a replayed batch re-emits exactly that instead of counting again;
  kept as long as the cases, so no replay can re-open a case

A batch costs one script call (history), plus two when it holds flagged
decisions: a read of the cards' cases, the pure update of
:mod:`kestrel.streams.alerts.cases`, then one compare-and-set write of every case and
marker. The write fails as a whole when a verdict closed a case meanwhile;
the batch's cases are then read and computed again.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis.asyncio as aioredis

from kestrel.feature_store import topics
from kestrel.feature_store.keys import KeySpace, escape_glob
from kestrel.feature_store.schemas import epoch_of, iso_of
from kestrel.feature_store.scripts import load_lua
from kestrel.streams.alerts.cases import (
    HISTORY_IN_ALERT,
    Case,
    Change,
    Hit,
    Problem,
    VerdictRequest,
    alert_doc,
    apply_hit,
    close_case,
    label_docs,
    mark_delivered,
    summarize,
)
from kestrel.streams.config import Settings
from kestrel.streams.metrics import Metrics
from kestrel.streams.records import Output

HISTORY_KEEP = 50  # decisions kept per card for the case page
HISTORY_SHOWN = 20
CASE_HITS_SHOWN = 100
MAX_CASE_HITS = 1000  # transactions remembered per case (labels go to these); the hit count goes on
COMMIT_ATTEMPTS = 5

# Send (topic, key, value, event_id) and wait for the broker's ack.
Sender = Callable[[Sequence[tuple[str, bytes, bytes, str]]], Awaitable[None]]

# Batch contents travel as one JSON argument (cjson inside Redis): packing thousands of separate
# arguments costs more client CPU than the script itself.
PREPARE_LUA = load_lua(__file__, "case_prepare")

COMMIT_LUA = load_lua(__file__, "case_commit")

CLOSE_LUA = load_lua(__file__, "case_close")


@dataclass
class Prepared:
    markers: dict[str, bytes | None]
    pointers: dict[str, str]
    cases: dict[str, Case | None]
    history: dict[str, list[tuple[str, float]]]


@dataclass
class CaseWrite:
    case: Case
    expected_pointer: str
    expected_revision: int
    new_hits: list[Hit] = field(default_factory=list)


class CaseStore:
    """Reads and writes cases; every write is one script call, compare-and-set on the case revision."""

    def __init__(self, client: aioredis.Redis, keys: KeySpace, case_ttl_s: int, marker_ttl_s: int) -> None:
        self.client = client
        self.keys = keys
        self.k = keys.alerts
        self.case_ttl_s = case_ttl_s
        self.marker_ttl_s = marker_ttl_s
        self._prepare = client.register_script(PREPARE_LUA)
        self._commit = client.register_script(COMMIT_LUA)
        self._close = client.register_script(CLOSE_LUA)

    async def prepare(self, history: Mapping[str, Sequence[tuple[float, str]]], flagged_ids: Sequence[str],
                      cards: Sequence[str], history_read: int) -> Prepared:
        """Record the batch's decisions in each card's history; read markers, open cases and histories."""
        req = {"h": [[self.k.history(card), [x for epoch, event_id in entries for x in (repr(epoch), event_id)]]
                     for card, entries in history.items()],
               "m": [self.k.applied(e) for e in flagged_ids],
               "c": [[self.k.card(card), self.k.history(card)] for card in cards]}
        args = [self.case_ttl_s, HISTORY_KEEP, history_read, self.k.case_prefix, orjson.dumps(req)]
        markers, per_card = await self._prepare(args=args)
        prepared = Prepared(dict(zip(flagged_ids, markers, strict=True)), {}, {}, {})
        for card, (ptr, doc, hist) in zip(cards, per_card, strict=True):
            prepared.pointers[card] = ptr.decode() if ptr else ""
            prepared.cases[card] = Case.from_json(doc) if doc else None
            prepared.history[card] = [(hist[j].decode(), float(hist[j + 1])) for j in range(0, len(hist), 2)]
        return prepared

    async def commit(self, writes: Sequence[CaseWrite], markers: Sequence[tuple[str, bytes]]) -> bool:
        """Write every case and marker, or nothing if any case changed since it was read."""
        req = {"w": [[self.k.card(w.case.card), w.expected_pointer, self.k.case(w.case.case_id),
                      str(w.expected_revision), w.case.to_json().decode(), str(w.case.revision), w.case.case_id,
                      str(w.case.rank), self.k.hits(w.case.case_id),
                      [x for h in w.new_hits for x in (repr(h.epoch), h.event_id)]] for w in writes],
               "m": [[self.k.applied(event_id), value.decode()] for event_id, value in markers]}
        args = [self.case_ttl_s, self.marker_ttl_s, MAX_CASE_HITS, self.k.open, orjson.dumps(req)]
        return bool(await self._commit(args=args))

    async def close(self, before: Case, after: Case) -> bool:
        """Store ``after`` (a closed case) if the case is still at ``before``'s revision."""
        return bool(await self._close(args=[self.k.case(after.case_id), str(before.revision), after.to_json(),
                                            str(after.revision), self.k.open, after.case_id, self.k.card(after.card),
                                            self.case_ttl_s]))

    async def get(self, case_id: str) -> Case | None:
        raw = await self.client.hget(self.k.case(case_id), "doc")
        return Case.from_json(raw) if raw else None

    async def open_cases(self, limit: int) -> tuple[list[Case], int]:
        """The highest-risk open cases first, and how many are open in all."""
        pipe = self.client.pipeline(transaction=False)
        pipe.zrevrange(self.k.open, 0, limit - 1)
        pipe.zcard(self.k.open)
        ids, total = await pipe.execute()
        if not ids:
            return [], total
        pipe = self.client.pipeline(transaction=False)
        for case_id in ids:
            pipe.hget(self.k.case(case_id.decode()), "doc")
        docs = await pipe.execute()
        gone = [case_id for case_id, doc in zip(ids, docs, strict=True) if doc is None]
        if gone:  # expired while open: drop them from the queue
            await self.client.zrem(self.k.open, *gone)
        cases = [Case.from_json(d) for d in docs if d is not None]
        return [c for c in cases if c.status == "open"], total - len(gone)

    async def hit_ids(self, case_id: str, limit: int | None = None) -> list[str]:
        """The case's transactions, newest first."""
        ids = await self.client.zrevrange(self.k.hits(case_id), 0, -1 if limit is None else limit - 1)
        return [i.decode() for i in ids]

    async def history_ids(self, card: str, limit: int) -> list[str]:
        return [i.decode() for i in await self.client.zrevrange(self.k.history(card), 0, limit - 1)]

    async def decisions(self, event_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Logged decisions by event_id (those still in the decision log)."""
        if not event_ids:
            return {}
        raws = await self.client.mget([self.keys.decision(e) for e in event_ids])
        return {e: orjson.loads(raw) for e, raw in zip(event_ids, raws, strict=True) if raw}

    async def erase_card(self, card: str) -> int:
        """Right to erasure: delete the card's open-case pointer, history and every case of it (open or closed).

        Cases are found by a SCAN of the case keys (erasure is rare; no per-card index of closed cases is
        kept on the hot path). Hit markers keep the token until they expire, like the decision log.
        """
        doomed = [self.k.card(card), self.k.history(card)]
        async for key in self.client.scan_iter(match=f"{escape_glob(self.k.case_prefix)}*", count=1000):
            if key.endswith(b":hits"):
                continue
            raw = await self.client.hget(key, "doc")
            if raw and orjson.loads(raw).get("card") == card:
                case_id = key.decode()[len(self.k.case_prefix):]
                await self.client.zrem(self.k.open, case_id)
                doomed += [key.decode(), self.k.hits(case_id)]
        return int(await self.client.unlink(*doomed))


class AlertDesk:
    """Turns each batch's fraud decisions into case updates and ``alerts.fraud`` records; records verdicts."""

    def __init__(self, settings: Settings, client: aioredis.Redis, keys: KeySpace, metrics: Metrics) -> None:
        self.store = CaseStore(client, keys, settings.decision_log_ttl_s, settings.decision_log_ttl_s)
        self.keys = keys
        self.metrics = metrics

    # -- stream side --------------------------------------------------------
    async def on_decisions(self, decisions: Sequence[Mapping[str, Any]]) -> list[Output]:
        """Alert records for a batch's fraud decisions (the documents, as built: never parsed again);
        idempotent per decision."""
        # one doc per event_id: a payment sent twice within one batch is one hit, not two
        by_id = {d["event_id"]: d for d in decisions}
        docs = list(by_id.values())
        if not docs:
            return []
        history: dict[str, list[tuple[float, str]]] = {}
        for d in docs:
            history.setdefault(d["card"], []).append((epoch_of(d["event_time"]), d["event_id"]))
        hits = [h for h in map(Hit.from_decision, docs) if h is not None]
        cards = list(dict.fromkeys(h.card for h in hits))
        for _ in range(COMMIT_ATTEMPTS):
            prep = await self.store.prepare(history, [h.event_id for h in hits], cards, HISTORY_KEEP)
            if not hits:
                return []
            plan = await self._plan(prep, hits, by_id)
            if await self.store.commit(plan.writes, plan.markers):
                for change in plan.changes:
                    self.metrics.alert_cases.labels(change).inc()
                return plan.outputs
        raise RuntimeError(f"case updates for {len(cards)} cards kept conflicting with verdicts; batch retried")

    async def _plan(self, prep: Prepared, hits: Sequence[Hit], by_id: Mapping[str, dict[str, Any]]) -> _Plan:
        """Apply the batch's new hits in order; at most one alert per card per batch (its latest state)."""
        now_iso = iso_of(time.time())
        state = dict(prep.cases)
        new_hits: dict[str, list[Hit]] = {}
        opened_here: set[str] = set()
        trigger: dict[str, Hit] = {}
        markers: dict[str, dict[str, Any]] = {}
        plan = _Plan()
        for h in hits:
            marker = prep.markers.get(h.event_id)
            if marker:  # applied before a restart: re-emit what it emitted then, count nothing
                alert = orjson.loads(marker).get("alert")
                if alert:
                    plan.outputs.append(self._output(Output, alert))
                continue
            case, change = apply_hit(state[h.card], h, now_iso)
            state[h.card] = case
            new_hits.setdefault(h.card, []).append(h)
            plan.changes.append(change)
            if change == "opened":
                opened_here.add(h.card)
            if change != "updated":
                trigger[h.card] = h
            markers[h.event_id] = {"case_id": case.case_id, "revision": case.revision}
        for card, card_hits in new_hits.items():
            case, prior = state[card], prep.cases[card]
            assert case is not None
            expected_rev = prior.revision if prior is not None and prior.case_id == case.case_id else 0
            plan.writes.append(CaseWrite(case, prep.pointers[card], expected_rev, card_hits))
        if trigger:
            wanted = {card: [e for e, t in prep.history[card] if t <= h.epoch][:HISTORY_IN_ALERT]
                      for card, h in trigger.items()}
            logged = await self.store.decisions([e for ids in wanted.values() for e in ids if e not in by_id])
            for card, h in trigger.items():
                case = state[card]
                assert case is not None
                history = [summarize(by_id.get(e) or logged[e]) for e in wanted[card] if e in by_id or e in logged]
                alert = alert_doc(case, "opened" if card in opened_here else "escalated", by_id[h.event_id], history,
                                  now_iso)
                markers[h.event_id]["alert"] = alert
                plan.outputs.append(self._output(Output, alert))
        plan.markers = [(e, orjson.dumps(m)) for e, m in markers.items()]
        return plan

    # -- analyst side -------------------------------------------------------
    async def queue(self, limit: int) -> tuple[list[dict[str, Any]], int]:
        """Open cases by risk (highest first) as the API lists them, and how many are open."""
        cases, total = await self.store.open_cases(limit)
        return [c.public() for c in cases], total

    async def case_view(self, case_id: str) -> dict[str, Any] | None:
        """A case with its transactions and the card's recent history (from the decision log)."""
        case = await self.store.get(case_id)
        if case is None:
            return None
        hit_ids = await self.store.hit_ids(case_id, CASE_HITS_SHOWN)
        history_ids = await self.store.history_ids(case.card, HISTORY_SHOWN)
        logged = await self.store.decisions(list(dict.fromkeys(hit_ids + history_ids)))
        return {**case.public(),
                "transactions": [summarize(logged[e]) for e in hit_ids if e in logged],
                "history": [summarize(logged[e]) for e in history_ids if e in logged]}

    async def record_verdict(self, case_id: str, req: VerdictRequest, send: Sender) -> dict[str, Any] | Problem:
        """Close the case, then produce one label per transaction of it (and a closing alert).

        The verdict is stored before the labels are sent; when the broker does not acknowledge them, the
        same verdict sent again re-sends them (same event ids, so they count once). A different verdict,
        or any verdict once the labels were delivered, is a conflict.
        """
        for _ in range(COMMIT_ATTEMPTS):
            case = await self.store.get(case_id)
            if case is None:
                return Problem(404, "not_found", "no case with this id", "case_id")
            if case.status == "closed":
                given = (case.verdict or {}).get("verdict")
                if (case.verdict or {}).get("delivered") or given != req.verdict:
                    return Problem(409, "closed", f"this case is already closed with verdict {given!r}", "case_id",
                                   {"case_id": case_id, "verdict": given})
                closed = case
                break
            transactions = await self.store.hit_ids(case_id)
            closed = close_case(case, req.verdict, req.note, iso_of(time.time()), len(transactions))
            if await self.store.close(case, closed):
                self.metrics.alert_verdicts.labels(req.verdict).inc()
                break
        else:
            return Problem(503, "busy", "the case kept changing while closing it; send the verdict again", "case_id")
        transactions = await self.store.hit_ids(case_id)
        assert closed.verdict is not None
        labels = label_docs(closed, transactions, req.verdict, closed.verdict["at"])
        card = closed.card.encode()
        records = [(topics.LABELS, card, orjson.dumps(doc), doc["event_id"]) for doc in labels]
        closing = alert_doc(closed, "closed", None, [], closed.verdict["at"])
        records.append((topics.ALERTS, card, orjson.dumps(closing), closing["event_id"]))
        try:
            await send(records)
        except Exception as exc:
            return Problem(503, "unavailable", f"verdict recorded but its labels were not acknowledged ({exc}); "
                           "send the same verdict again", None, {"case_id": case_id})
        await self.store.close(closed, mark_delivered(closed))
        return {"case_id": case_id, "status": "closed", "verdict": req.verdict,
                "labels": [d["event_id"] for d in labels], "transactions": transactions}

    def _output(self, output_cls: type, alert: Mapping[str, Any]) -> Output:
        return output_cls(topics.ALERTS, str(alert["card"]).encode(), orjson.dumps(alert),
                          self.keys.published("alert", str(alert["event_id"])))




@dataclass
class _Plan:
    writes: list[CaseWrite] = field(default_factory=list)
    markers: list[tuple[str, bytes]] = field(default_factory=list)
    outputs: list[Any] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)
