"""Case rules as tables: severity, escalation, queue order, verdict parsing, labels and the escaped pages."""

from __future__ import annotations

from dataclasses import replace

import pytest

from kestrel.feature_store.schemas import Label
from kestrel.streams.alerts.cases import (
    REPEAT_ESCALATION,
    SEVERITIES,
    Case,
    Hit,
    Problem,
    VerdictRequest,
    alert_doc,
    apply_hit,
    case_level,
    close_case,
    epoch_of,
    hit_level,
    label_docs,
    label_id_for,
    mark_delivered,
    parse_verdict,
    risk_rank,
)
from kestrel.streams.web.alerts import render_case, render_queue


def _hit(event_id: str, score: float, action: str, at: str = "2026-03-01T12:00:00.000Z", card: str = "tok",
         codes: tuple[str, ...] = ("large_amount",)) -> Hit:
    level = hit_level(score, action)
    assert level is not None
    return Hit(event_id, card, score, action, level, tuple({"code": c, "message": f"{c} fired", "value": score}
                                                            for c in codes), at, epoch_of(at))


@pytest.mark.parametrize(("score", "action", "severity"), [
    (0.50, "review", "low"), (0.64, "review", "low"), (0.65, "review", "medium"), (0.79, "review", "medium"),
    (0.80, "block", "high"), (0.94, "block", "high"), (0.95, "block", "critical"), (1.0, "block", "critical"),
    (0.99, "allow", None), (0.0, "allow", None), (0.9, "unknown", None),
])
def test_severity_of_one_decision(score: float, action: str, severity: str | None) -> None:
    level = hit_level(score, action)
    assert (SEVERITIES[level] if level is not None else None) == severity


@pytest.mark.parametrize(("worst", "hits", "level"), [
    (0, 1, 0), (0, REPEAT_ESCALATION - 1, 0), (0, REPEAT_ESCALATION, 1), (1, 50, 2), (2, 3, 3), (3, 1, 3), (3, 9, 3),
])
def test_repeated_hits_raise_a_case_one_level(worst: int, hits: int, level: int) -> None:
    assert case_level(worst, hits) == level


def test_queue_order_is_severity_then_score_then_hits() -> None:
    cases = [(0, 0.5, 1), (0, 0.6, 1), (1, 0.65, 1), (1, 0.65, 40), (2, 0.8, 1), (3, 1.0, 2), (3, 1.0, 999),
             (3, 1.0, 5000)]
    ranks = [risk_rank(*c) for c in cases]
    assert ranks == sorted(ranks) and len(set(ranks[:-1])) == len(ranks) - 1  # hits saturate at 999
    assert all(isinstance(r, int) and r < 2**53 for r in ranks)  # exact as a Redis sorted-set score


# (action, score, expected change, expected severity after the hit) applied in order to one card
SEQUENCES = {
    "review hits repeat, then one escalation": [
        ("review", 0.5, "opened", "low"), ("review", 0.55, "updated", "low"), ("review", 0.5, "escalated", "medium"),
        ("review", 0.6, "updated", "medium"), ("review", 0.5, "updated", "medium"),
    ],
    "a block on an open review case escalates": [
        ("review", 0.7, "opened", "medium"), ("block", 0.85, "escalated", "high"),
        ("block", 0.97, "escalated", "critical"), ("review", 0.5, "updated", "critical"),
    ],
    "a critical case stays critical": [
        ("block", 0.99, "opened", "critical"), ("block", 0.99, "updated", "critical"),
        ("block", 0.99, "updated", "critical"),
    ],
}


@pytest.mark.parametrize("name", list(SEQUENCES))
def test_which_hits_publish_an_alert(name: str) -> None:
    case = None
    for i, (action, score, change, severity) in enumerate(SEQUENCES[name]):
        case, got = apply_hit(case, _hit(f"e{i}", score, action, at=f"2026-03-01T12:00:{i:02d}.000Z"), f"t{i}")
        assert (got, case.severity) == (change, severity), (name, i)
        assert case.hits == i + 1 and case.revision == i + 1
    assert case is not None and case.case_id == apply_hit(None, _hit("e0", 0.5, "review"), "x")[0].case_id
    assert case.opened_at == "t0" and case.updated_at == f"t{len(SEQUENCES[name]) - 1}"


def test_case_keeps_worst_score_reason_counts_and_event_span_for_late_hits() -> None:
    case, _ = apply_hit(None, _hit("a", 0.9, "block", at="2026-03-01T12:00:10.000Z",
                                   codes=("large_amount", "velocity_10m")), "t")
    case, _ = apply_hit(case, _hit("b", 0.6, "review", at="2026-03-01T12:00:05.000Z", codes=("velocity_10m",)), "t")
    assert case.risk == 0.9 and case.actions == {"block": 1, "review": 1}
    assert [(r["code"], r["count"]) for r in case.reason_list()] == [("velocity_10m", 2), ("large_amount", 1)]
    assert case.first_event_time == "2026-03-01T12:00:05.000Z" and case.last_event_time == "2026-03-01T12:00:10.000Z"
    assert case.last_event_id == "a"  # the late-arriving hit is not the latest one
    assert Case.from_json(case.to_json()) == case


def test_a_closed_case_is_not_reopened_a_new_hit_opens_a_new_one() -> None:
    case, _ = apply_hit(None, _hit("a", 0.9, "block"), "t")
    closed = close_case(case, "fraud", "called the bank", "t2", 1)
    assert closed.status == "closed" and closed.revision == case.revision + 1 and closed.rank == case.rank
    assert mark_delivered(closed).verdict == {**closed.verdict, "delivered": True}
    fresh, change = apply_hit(closed, _hit("b", 0.6, "review"), "t3")
    assert change == "opened" and fresh.case_id != case.case_id and fresh.hits == 1 and fresh.verdict is None


def test_labels_are_valid_events_with_stable_ids_and_no_card() -> None:
    case, _ = apply_hit(None, _hit("tx-1", 0.9, "block"), "t")
    docs = label_docs(case, ["tx-1", "tx-2"], "fraud", "2026-03-01T13:00:00.000Z")
    labels = [Label.model_validate(d) for d in docs]
    assert [lab.transaction_id for lab in labels] == ["tx-1", "tx-2"]
    assert all(lab.source == "analyst" and lab.verdict == "fraud" and lab.card_id is None for lab in labels)
    assert docs[0]["event_id"] == label_id_for(case.case_id, "tx-1") != label_id_for("other", "tx-1")
    assert len(docs[0]["event_id"]) <= 128


def test_alert_record_carries_case_trigger_history_and_no_note() -> None:
    case, _ = apply_hit(None, _hit("tx-1", 0.9, "block"), "t")
    decision = {"event_id": "tx-1", "card": "tok", "amount": 10.0, "currency": "EUR", "merchant_id": "m",
                "score": 0.9, "action": "block", "reasons": [{"code": "large_amount", "message": "m", "value": 1}],
                "event_time": "2026-03-01T12:00:00.000Z", "features": {"secret_feature": 1.0}}
    doc = alert_doc(case, "opened", decision, [decision] * 30, "now")
    assert doc["event_id"] == f"alert-{case.case_id}-1" and doc["severity"] == "high" and doc["hits"] == 1
    assert doc["trigger"]["event_id"] == "tx-1" and "features" not in doc["trigger"] and len(doc["history"]) == 10
    closed = close_case(case, "genuine", "private words", "t2", 1)
    assert "note" not in alert_doc(closed, "closed", None, [], "t2")["verdict"]
    assert closed.public()["verdict"]["note"] == "private words"  # the API shows it; topics do not


@pytest.mark.parametrize(("body", "expected"), [
    (b'{"verdict": "fraud"}', VerdictRequest("fraud", None)),
    (b'{"verdict": "genuine", "note": "  ok  "}', VerdictRequest("genuine", "ok")),
    (b'{"verdict": "genuine", "note": "   "}', VerdictRequest("genuine", None)),
    (b'{"verdict": "FRAUD"}', (422, "verdict")),
    (b'{"note": "x"}', (422, "verdict")),
    (b'{"verdict": "fraud", "note": ["x"]}', (422, "note")),
    (b'{"verdict": "fraud", "note": "' + b"x" * 1001 + b'"}', (422, "note")),
    (b'"fraud"', (422, None)),
    (b"", (400, None)),
    (b"{verdict: fraud}", (400, None)),
])
def test_verdict_requests(body: bytes, expected: object) -> None:
    got = parse_verdict(body)
    if isinstance(got, Problem):
        assert (got.status, got.field) == expected and got.message
    else:
        assert got == expected


def test_pages_escape_everything_producers_and_analysts_wrote() -> None:
    evil = '<img src=x onerror="alert(1)">'
    case, _ = apply_hit(None, replace(_hit("tx-1", 0.9, "block"), reasons=({"code": evil, "message": evil},)), "t")
    closed = close_case(case, "fraud", evil, "t2", 1)
    line = {"event_id": evil, "event_time": evil, "amount": 1.0, "currency": evil, "merchant_id": evil,
            "terminal_id": evil, "score": 0.9, "action": evil, "reasons": [{"code": evil, "message": evil}]}
    pages = [render_case({**closed.public(), "transactions": [line], "history": [line]}),
             render_queue([case.public()], 1)]
    for html in pages:
        assert "<img" not in html and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in html
    assert "disabled" in pages[0]  # a closed case offers no verdict buttons
