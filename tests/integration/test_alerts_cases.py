"""Analyst cases from fraud decisions against the real Redis: one case per card, idempotent replays, verdicts.

These drive :class:`~kestrel.streams.worker.processing.Processor` directly (no broker needed for the case logic);
the worker, the broker and the browser are in ``test_alerts_web.py``.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Sequence

import orjson
import pytest
import redis.asyncio as aioredis

from kestrel.feature_store import topics
from kestrel.feature_store.erase import delete_matching
from kestrel.feature_store.schemas import Label
from kestrel.models.rules import RuleScorer
from kestrel.streams.alerts.cases import Hit, VerdictRequest
from kestrel.streams.config import Settings
from kestrel.streams.metrics import Metrics
from kestrel.streams.records import Output, RawRecord
from kestrel.streams.worker.processing import Processor

pytestmark = pytest.mark.integration

T0 = 1_780_000_000.0  # a fixed instant: the decisions are deterministic


def _txn(event_id: str, card: str, amount: float, at: float, merchant: str = "m-1") -> RawRecord:
    doc = {"type": "transaction", "event_id": event_id, "card_id": card, "merchant_id": merchant,
           "terminal_id": f"t-{merchant}", "amount": amount, "currency": "EUR", "timestamp": at}
    return RawRecord(topics.TRANSACTIONS, 0, 0, b"k", orjson.dumps(doc))


@pytest.fixture
async def proc(redis_url: str) -> AsyncIterator[Processor]:
    prefix = f"kestrel-test-{secrets.token_hex(4)}"
    client = aioredis.Redis.from_url(redis_url)
    p = Processor(Settings().with_(redis_prefix=prefix, redis_url=redis_url), client, Metrics(), scorer=RuleScorer())
    yield p
    delete_matching(__import__("redis").Redis.from_url(redis_url), f"{prefix}:*")
    await client.aclose()


def _alerts(outputs: Sequence[Output]) -> list[dict]:
    return [orjson.loads(o.value) for o in outputs if o.topic == topics.ALERTS]


def _decisions(outputs: Sequence[Output]) -> dict[str, dict]:
    return {d["event_id"]: d for o in outputs if o.topic == topics.FRAUD_DECISIONS for d in [orjson.loads(o.value)]}


async def test_hits_update_one_case_per_card_and_a_replay_counts_nothing(proc: Processor) -> None:
    card = "4000123412341234"
    batch1 = [_txn("p1", card, 5000.0, T0), _txn("p2", card, 20.0, T0 + 60), _txn("q1", "5500000000000004", 30.0, T0)]
    out1 = await proc.process(topics.TRANSACTIONS, batch1)
    decided = _decisions(out1)
    assert decided["p1"]["action"] == "review" and decided["p2"]["action"] == "allow"
    assert decided["q1"]["action"] == "allow"
    (opened,) = _alerts(out1)
    token = decided["p1"]["card"]
    assert opened["alert"] == "opened" and opened["card"] == token and opened["hits"] == 1
    assert opened["severity"] == "low" and opened["trigger"]["event_id"] == "p1"
    assert [r["code"] for r in opened["reasons"]] == ["large_amount"]
    assert [h["event_id"] for h in opened["history"]] == ["p1"]  # p2 came later than the trigger

    # The same batch again (a crash before the delivery marks): the same alert, byte for byte, no second hit.
    replay = await proc.process(topics.TRANSACTIONS, batch1)
    assert [o for o in replay if o.topic == topics.ALERTS] == [o for o in out1 if o.topic == topics.ALERTS]
    case = await proc.alerts.store.get(opened["case_id"])
    assert case is not None and case.hits == 1 and case.revision == 1
    await proc.mark_delivered(replay)
    assert await proc.process(topics.TRANSACTIONS, batch1) == []  # delivered: nothing is sent again

    # Two more flagged payments in one batch: one update, then the third hit escalates; one alert for both.
    batch2 = [_txn("p3", card, 6000.0, T0 + 120), _txn("p4", card, 7000.0, T0 + 180)]
    out2 = await proc.process(topics.TRANSACTIONS, batch2)
    (escalated,) = _alerts(out2)
    assert escalated["alert"] == "escalated" and escalated["case_id"] == opened["case_id"]
    assert escalated["hits"] == 3 and escalated["severity"] == "medium" and escalated["trigger"]["event_id"] == "p4"
    assert [h["event_id"] for h in escalated["history"]] == ["p4", "p3", "p2", "p1"]
    assert escalated["event_id"] != opened["event_id"]
    await proc.mark_delivered(out2)
    out3 = await proc.process(topics.TRANSACTIONS, [_txn("p5", card, 8000.0, T0 + 240)])
    assert _alerts(out3) == []  # a repeated hit updates the case without a new alert
    view = await proc.alerts.case_view(opened["case_id"])
    assert view is not None and view["hits"] == 4 and view["reasons"][0] == {
        "code": "large_amount", "count": 4, "message": "amount 8000.00 ≥ 1000", "value": 8000.0}
    assert [t["event_id"] for t in view["transactions"]] == ["p5", "p4", "p3", "p1"]
    assert [t["event_id"] for t in view["history"]] == ["p5", "p4", "p3", "p2", "p1"]

    queue, total = await proc.alerts.queue(10)
    assert total == 1 and [c["case_id"] for c in queue] == [opened["case_id"]]
    keys = [k async for k in proc.client.scan_iter(match=f"{proc.keys.prefix}:*")]
    assert keys and not any(card.encode() in k or b"5500000000000004" in k for k in keys)
    assert all(card not in o.value.decode() for o in out1 + out2 + out3)
    assert proc.metrics.alert_cases.labels("opened")._value.get() == 1


async def test_queue_is_ordered_by_risk(proc: Processor) -> None:
    out = await proc.process(topics.TRANSACTIONS, [
        _txn("low", "card-low", 2000.0, T0),  # large amount: review, low
        *[_txn(f"hi{i}", "card-high", 1.0, T0 + i) for i in range(6)],  # card testing burst: block
    ])
    alerts = {a["trigger"]["event_id"]: a for a in _alerts(out)}
    assert alerts["low"]["severity"] == "low"
    top = max(alerts.values(), key=lambda a: a["hits"])
    assert top["card"] != alerts["low"]["card"] and top["severity"] in {"high", "critical"}
    queue, total = await proc.alerts.queue(10)
    assert total == 2 and [c["case_id"] for c in queue] == [top["case_id"], alerts["low"]["case_id"]]


class Collecting:
    """The verdict's send step, recording what would go to the broker (or failing like an unreachable one)."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.records: list[tuple[str, bytes, bytes, str]] = []

    async def __call__(self, records: Sequence[tuple[str, bytes, bytes, str]]) -> None:
        if self.fail:
            raise ConnectionError("broker unreachable")
        self.records.extend(records)


async def test_verdict_labels_every_transaction_once_and_then_conflicts(proc: Processor) -> None:
    card = "4000999988887777"
    out = await proc.process(topics.TRANSACTIONS, [_txn("v1", card, 5000.0, T0), _txn("v2", card, 9000.0, T0 + 30)])
    (alert,) = _alerts(out)
    case_id = alert["case_id"]

    down = Collecting(fail=True)
    problem = await proc.alerts.record_verdict(case_id, VerdictRequest("fraud", "called the cardholder"), down)
    assert getattr(problem, "status", None) == 503  # recorded, labels not acknowledged
    queue, _ = await proc.alerts.queue(10)
    assert queue == []  # closed: off the queue
    conflict = await proc.alerts.record_verdict(case_id, VerdictRequest("genuine", None), Collecting())
    assert getattr(conflict, "status", None) == 409

    up = Collecting()
    result = await proc.alerts.record_verdict(case_id, VerdictRequest("fraud", None), up)
    assert isinstance(result, dict) and sorted(result["transactions"]) == ["v1", "v2"]
    labels = [orjson.loads(v) for t, _, v, _ in up.records if t == topics.LABELS]
    assert {lab["transaction_id"] for lab in labels} == {"v1", "v2"} and len(result["labels"]) == 2
    for lab in labels:
        parsed = Label.model_validate(lab)
        assert parsed.source == "analyst" and parsed.verdict == "fraud" and parsed.card_id is None
    keys = {k for t, k, _, _ in up.records}
    assert keys == {alert["card"].encode()}  # keyed by the card token, like the card-keyed topics
    closing = [orjson.loads(v) for t, _, v, _ in up.records if t == topics.ALERTS]
    assert closing[0]["alert"] == "closed" and "note" not in closing[0]["verdict"]
    assert all(card not in v.decode() and "cardholder" not in v.decode() for _, _, v, _ in up.records)

    again = await proc.alerts.record_verdict(case_id, VerdictRequest("fraud", None), Collecting())
    assert getattr(again, "status", None) == 409
    assert proc.metrics.alert_verdicts.labels("fraud")._value.get() == 1

    # The next flagged payment of the card opens a new case.
    out = await proc.process(topics.TRANSACTIONS, [_txn("v3", card, 4000.0, T0 + 90)])
    (fresh,) = _alerts(out)
    assert fresh["alert"] == "opened" and fresh["case_id"] != case_id and fresh["hits"] == 1
    missing = await proc.alerts.record_verdict("0" * 20, VerdictRequest("fraud", None), Collecting())
    assert getattr(missing, "status", None) == 404


async def test_a_verdict_between_read_and_write_makes_the_batch_recompute(proc: Processor) -> None:
    card = "4000123400001111"
    (first,) = _alerts(await proc.process(topics.TRANSACTIONS, [_txn("r1", card, 5000.0, T0)]))
    decision = {"type": "fraud_decision", "event_id": "r2", "card": first["card"], "merchant_id": "m-1",
                "terminal_id": "t-m-1", "amount": 6000.0, "currency": "EUR", "score": 0.5, "action": "review",
                "reasons": [{"code": "large_amount", "message": "amount 6000.00 ≥ 1000", "value": 6000.0}],
                "event_time": "2026-05-28T20:28:20.000Z"}
    hit = Hit.from_decision(decision)
    assert hit is not None
    desk = proc.alerts
    # the worker reads the open case and plans to add r2 to it ...
    prep = await desk.store.prepare({hit.card: [(hit.epoch, "r2")]}, ["r2"], [hit.card], 50)
    plan = await desk._plan(prep, [hit], {"r2": decision})
    # ... an analyst closes the case meanwhile ...
    closed = await desk.record_verdict(first["case_id"], VerdictRequest("genuine", None), Collecting())
    assert isinstance(closed, dict) and closed["transactions"] == ["r1"]
    # ... so the planned write changes nothing, and the batch, computed again, opens a new case for r2
    assert await desk.store.commit(plan.writes, plan.markers) is False
    old = await desk.store.get(first["case_id"])
    assert old is not None and old.status == "closed" and old.hits == 1
    out = Output(topics.FRAUD_DECISIONS, hit.card.encode(), orjson.dumps(decision), "mark-r2")
    (fresh,) = _alerts(await desk.on_decisions([orjson.loads(out.value)]))
    assert fresh["alert"] == "opened" and fresh["case_id"] != first["case_id"] and fresh["hits"] == 1
    assert await desk.store.hit_ids(first["case_id"]) == ["r1"]


async def test_erasing_a_card_deletes_its_cases_history_and_pointer(proc: Processor) -> None:
    card, other = "4000123400002222", "4000123400003333"
    out = await proc.process(topics.TRANSACTIONS, [_txn("x1", card, 5000.0, T0), _txn("y1", other, 5000.0, T0)])
    alerts = {a["trigger"]["event_id"]: a for a in _alerts(out)}
    token, first = alerts["x1"]["card"], alerts["x1"]["case_id"]
    await proc.alerts.record_verdict(first, VerdictRequest("fraud", None), Collecting())
    (second,) = _alerts(await proc.process(topics.TRANSACTIONS, [_txn("x2", card, 5000.0, T0 + 60)]))

    deleted = await proc.alerts.store.erase_card(token)
    assert deleted == 6  # pointer, history, two cases with their hit sets
    assert await proc.alerts.store.get(first) is None and await proc.alerts.store.get(second["case_id"]) is None
    assert await proc.alerts.store.history_ids(token, 10) == []
    queue, total = await proc.alerts.queue(10)
    assert total == 1 and [c["case_id"] for c in queue] == [alerts["y1"]["case_id"]]  # other cards untouched
    remaining = [k async for k in proc.client.scan_iter(match=f"{proc.keys.prefix}:alerts:*")]
    assert not any(token.encode() in k for k in remaining)


async def test_the_same_decision_twice_in_one_batch_is_one_hit(proc: Processor) -> None:
    out = await proc.process(topics.TRANSACTIONS, [_txn("d1", "4000123400004444", 5000.0, T0)])
    decision = next(o for o in out if o.topic == topics.FRAUD_DECISIONS)
    (alert,) = _alerts(out)
    again = {"type": "fraud_decision", **orjson.loads(decision.value), "event_id": "d2", "score": 0.97,
             "action": "block", "event_time": "2026-05-28T20:27:40.000Z"}
    twice = Output(topics.FRAUD_DECISIONS, decision.key, orjson.dumps(again), "mark-d2")
    (escalated,) = _alerts(await proc.alerts.on_decisions([orjson.loads(twice.value)] * 2))
    assert escalated["case_id"] == alert["case_id"] and escalated["hits"] == 2 and escalated["severity"] == "critical"
    assert sorted(await proc.alerts.store.hit_ids(alert["case_id"])) == ["d1", "d2"]
