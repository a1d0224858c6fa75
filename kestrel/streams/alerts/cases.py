"""Analyst alert cases: pure rules for opening, updating, escalating and closing them.

One open case per card (by its keyed-hash token). A flagged fraud decision
(``review`` or ``block``) opens a case when the card has none, otherwise it
updates that case; an alert goes to ``alerts.fraud`` only when a case opens
or its severity rises, so a burst of hits on one card is one queue entry
that gets richer, not a flood. A verdict closes the case and becomes one
``label`` event per transaction of the case.

Everything here is pure (no I/O): :mod:`kestrel.streams.alerts.store` reads and writes
Redis around it, :mod:`kestrel.streams.web.alerts` serves it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from dataclasses import field as dc_field
from typing import Any, Literal

import orjson

from kestrel.feature_store.schemas import epoch_of

SEVERITIES = ("low", "medium", "high", "critical")
FLAGGED_ACTIONS = ("review", "block")
MEDIUM_SCORE = 0.65  # a review at or above this is medium, below it low
CRITICAL_SCORE = 0.95  # a block at or above this is critical, below it high
REPEAT_ESCALATION = 3  # a case with this many hits is one severity level above its worst hit
MAX_NOTE_CHARS = 1000
HISTORY_IN_ALERT = 10

Verdict = Literal["fraud", "genuine"]
Change = Literal["opened", "escalated", "updated", "closed"]


def hit_level(score: float, action: str) -> int | None:
    """Severity level (index into SEVERITIES) of one decision; None when it is not an alert.

    >>> hit_level(0.5, "review"), hit_level(0.7, "review"), hit_level(0.85, "block"), hit_level(0.97, "block")
    (0, 1, 2, 3)
    >>> hit_level(0.99, "allow") is None
    True
    """
    if action == "block":
        return 3 if score >= CRITICAL_SCORE else 2
    if action == "review":
        return 1 if score >= MEDIUM_SCORE else 0
    return None


def case_level(worst_hit_level: int, hits: int) -> int:
    """A case is as severe as its worst hit, one level more once hits repeat.

    >>> case_level(0, 1), case_level(0, 3), case_level(3, 10)
    (0, 1, 3)
    """
    return min(worst_hit_level + (1 if hits >= REPEAT_ESCALATION else 0), len(SEVERITIES) - 1)


def risk_rank(level: int, risk: float, hits: int) -> int:
    """Sort key of the open-cases queue: severity, then the highest score, then the number of hits.

    An integer (exact as a Redis sorted-set score), lexicographic in its parts:

    >>> risk_rank(2, 0.1, 1) > risk_rank(1, 1.0, 999)
    True
    >>> risk_rank(1, 0.71, 1) > risk_rank(1, 0.70, 500)
    True
    >>> risk_rank(1, 0.7, 5) > risk_rank(1, 0.7, 4)
    True
    """
    return level * 10_000_000 + round(min(max(risk, 0.0), 1.0) * 10_000) * 1000 + min(hits, 999)


def case_id_for(card: str, opening_event_id: str) -> str:
    """Deterministic case id: a replayed batch re-opens the same case, not a second one.

    >>> case_id_for("tok", "e-1") == case_id_for("tok", "e-1") != case_id_for("tok", "e-2")
    True
    >>> len(case_id_for("tok", "e-1"))
    20
    """
    return hashlib.sha256(f"{card}\x1f{opening_event_id}".encode()).hexdigest()[:20]


def label_id_for(case_id: str, transaction_id: str) -> str:
    """Deterministic label event id: re-sending a verdict's labels cannot count them twice."""
    return "analyst-" + hashlib.sha256(f"{case_id}\x1f{transaction_id}".encode()).hexdigest()[:24]


@dataclass(frozen=True, slots=True)
class Hit:
    """The fields of a fraud decision that cases use (nothing else of the decision is assumed)."""

    event_id: str
    card: str
    score: float
    action: str
    level: int
    reasons: tuple[Mapping[str, Any], ...]
    event_time: str
    epoch: float

    @classmethod
    def from_decision(cls, doc: Mapping[str, Any]) -> Hit | None:
        """The hit a decision makes, or None when it raises no alert.

        >>> d = {"event_id": "e1", "card": "c", "score": 0.7, "action": "review",
        ...      "reasons": [{"code": "large_amount", "message": "m", "value": 5000.0}],
        ...      "event_time": "2026-03-01T12:00:00.000Z"}
        >>> Hit.from_decision(d).level, Hit.from_decision({**d, "action": "allow"})
        (1, None)
        """
        score = float(doc.get("score") or 0.0)
        level = hit_level(score, str(doc.get("action")))
        if level is None:
            return None
        event_time = str(doc["event_time"])
        reasons = tuple(r for r in doc.get("reasons") or () if isinstance(r, Mapping) and r.get("code"))
        return cls(str(doc["event_id"]), str(doc["card"]), score, str(doc["action"]), level, reasons, event_time,
                   epoch_of(event_time))


@dataclass(frozen=True)
class Case:
    """One card's case as stored (JSON in Redis) and served."""

    case_id: str
    card: str
    status: Literal["open", "closed"]
    level: int
    worst_hit_level: int
    risk: float
    hits: int
    actions: dict[str, int]
    reasons: dict[str, dict[str, Any]]
    opening_event_id: str
    last_event_id: str
    first_event_time: str
    last_event_time: str
    opened_at: str
    updated_at: str
    revision: int = 1
    verdict: dict[str, Any] | None = None

    @property
    def severity(self) -> str:
        return SEVERITIES[self.level]

    @property
    def rank(self) -> int:
        return risk_rank(self.level, self.risk, self.hits)

    def reason_list(self) -> list[dict[str, Any]]:
        """Reasons by how often they fired, most frequent first."""
        return [{"code": code, **info}
                for code, info in sorted(self.reasons.items(), key=lambda kv: (-kv[1]["count"], kv[0]))]

    def to_json(self) -> bytes:
        return orjson.dumps(self)  # orjson writes dataclasses natively (asdict's deep copy is slow)

    @classmethod
    def from_json(cls, raw: bytes | str) -> Case:
        return cls(**orjson.loads(raw))

    def public(self, with_note: bool = True) -> dict[str, Any]:
        """The case as the API shows it; topics get it without the analyst's free-text note."""
        doc = {f.name: getattr(self, f.name) for f in fields(self)}
        doc["verdict"] = dict(self.verdict) if self.verdict else None
        doc["severity"] = self.severity
        doc["reasons"] = self.reason_list()
        doc.pop("worst_hit_level")
        if not with_note and doc["verdict"]:
            doc["verdict"].pop("note", None)
        return doc


def _merge_reasons(reasons: Mapping[str, dict[str, Any]], hit: Hit) -> dict[str, dict[str, Any]]:
    out = {code: dict(info) for code, info in reasons.items()}
    for r in hit.reasons:
        info = out.setdefault(str(r["code"]), {"count": 0})
        info["count"] += 1
        info["message"] = str(r.get("message", ""))  # the latest wording, with its value
        info["value"] = r.get("value")
    return out


def apply_hit(case: Case | None, hit: Hit, now_iso: str) -> tuple[Case, Change]:
    """The case after one more flagged decision, and what changed.

    >>> h = Hit("e1", "tok", 0.6, "review", 0, ({"code": "large_amount", "message": "m", "value": 5e3},),
    ...         "2026-03-01T12:00:00.000Z", 0.0)
    >>> c, change = apply_hit(None, h, "now")
    >>> change, c.severity, c.hits, c.reasons["large_amount"]["count"]
    ('opened', 'low', 1, 1)
    >>> c, change = apply_hit(c, replace(h, event_id="e2"), "now")
    >>> change, c.severity, c.hits, c.revision
    ('updated', 'low', 2, 2)
    >>> c, change = apply_hit(c, replace(h, event_id="e3"), "now")
    >>> change, c.severity, c.hits
    ('escalated', 'medium', 3)
    """
    if case is None or case.status != "open":
        new = Case(case_id=case_id_for(hit.card, hit.event_id), card=hit.card, status="open", level=hit.level,
                   worst_hit_level=hit.level, risk=hit.score, hits=1, actions={hit.action: 1},
                   reasons=_merge_reasons({}, hit), opening_event_id=hit.event_id, last_event_id=hit.event_id,
                   first_event_time=hit.event_time, last_event_time=hit.event_time, opened_at=now_iso,
                   updated_at=now_iso)
        return new, "opened"
    worst = max(case.worst_hit_level, hit.level)
    hits = case.hits + 1
    level = max(case.level, case_level(worst, hits))  # severity never drops while the case is open
    actions = dict(case.actions)
    actions[hit.action] = actions.get(hit.action, 0) + 1
    later = hit.epoch >= epoch_of(case.last_event_time)
    new = replace(case, level=level, worst_hit_level=worst, risk=max(case.risk, hit.score), hits=hits,
                  actions=actions, reasons=_merge_reasons(case.reasons, hit),
                  last_event_id=hit.event_id if later else case.last_event_id,
                  first_event_time=min(case.first_event_time, hit.event_time, key=epoch_of),
                  last_event_time=max(case.last_event_time, hit.event_time, key=epoch_of),
                  updated_at=now_iso, revision=case.revision + 1)
    return new, ("escalated" if level > case.level else "updated")


def close_case(case: Case, verdict: Verdict, note: str | None, now_iso: str, transactions: int) -> Case:
    """The case after the analyst's verdict; ``delivered`` turns true once its labels are acknowledged.

    >>> h = Hit("e1", "tok", 0.9, "block", 2, (), "2026-03-01T12:00:00.000Z", 0.0)
    >>> c = close_case(apply_hit(None, h, "t0")[0], "fraud", None, "t1", 1)
    >>> c.status, c.revision, c.verdict["verdict"], c.verdict["delivered"]
    ('closed', 2, 'fraud', False)
    """
    return replace(case, status="closed", updated_at=now_iso, revision=case.revision + 1,
                   verdict={"verdict": verdict, "note": note, "at": now_iso, "transactions": transactions,
                            "delivered": False})


def mark_delivered(case: Case) -> Case:
    """The closed case once the broker acknowledged its labels (a repeated verdict is then a conflict)."""
    assert case.verdict is not None
    return replace(case, revision=case.revision + 1, verdict={**case.verdict, "delivered": True})


def summarize(decision: Mapping[str, Any]) -> dict[str, Any]:
    """A decision as a history line: what an analyst scans, no features.

    >>> summarize({"event_id": "e", "card": "c", "amount": 5.0, "currency": "EUR", "merchant_id": "m",
    ...            "score": 0.1, "action": "allow", "reasons": [], "event_time": "t", "features": {"x": 1}})["action"]
    'allow'
    """
    return {
        "event_id": decision.get("event_id"), "event_time": decision.get("event_time"),
        "amount": decision.get("amount"), "currency": decision.get("currency"),
        "merchant_id": decision.get("merchant_id"), "terminal_id": decision.get("terminal_id"),
        "score": decision.get("score"), "action": decision.get("action"),
        "reasons": [{"code": r.get("code"), "message": r.get("message")} for r in decision.get("reasons") or ()
                    if isinstance(r, Mapping)],
        "model_version": decision.get("model_version"),
    }


def alert_doc(case: Case, change: Change, trigger: Mapping[str, Any] | None, history: Sequence[Mapping[str, Any]],
              created_at: str) -> dict[str, Any]:
    """The ``alerts.fraud`` record of one case revision; ``event_id`` is unique per case and revision."""
    return {"type": "fraud_alert", "event_id": f"alert-{case.case_id}-{case.revision}", "alert": change,
            **case.public(with_note=False), "trigger": summarize(trigger) if trigger else None,
            "history": list(history)[:HISTORY_IN_ALERT], "created_at": created_at}


def label_docs(case: Case, transaction_ids: Sequence[str], verdict: Verdict, at_iso: str) -> list[dict[str, Any]]:
    """One ``label`` event (schema_version 1, source analyst) per transaction of the case; no card id in them."""
    return [{"type": "label", "schema_version": 1, "event_id": label_id_for(case.case_id, txn), "timestamp": at_iso,
             "transaction_id": txn, "verdict": verdict, "source": "analyst"} for txn in transaction_ids]


@dataclass(frozen=True)
class Problem:
    """A refused request: HTTP status, error code, message and the failing field."""

    status: int
    error: str
    message: str
    field: str | None = None
    extra: dict[str, Any] = dc_field(default_factory=dict)

    def doc(self) -> dict[str, Any]:
        return {"error": self.error, "message": self.message, "field": self.field, **self.extra}


@dataclass(frozen=True)
class VerdictRequest:
    verdict: Verdict
    note: str | None


def parse_verdict(body: bytes) -> VerdictRequest | Problem:
    """Validate a verdict request body; a refusal names the failing field.

    >>> parse_verdict(b'{"verdict": "fraud", "note": " stolen "}')
    VerdictRequest(verdict='fraud', note='stolen')
    >>> p = parse_verdict(b'{"verdict": "maybe"}'); (p.status, p.field)
    (422, 'verdict')
    >>> parse_verdict(b'{"verdict": ').status, parse_verdict(b'[1]').status
    (400, 422)
    >>> parse_verdict(b'{"verdict": "genuine", "note": 3}').field
    'note'
    """
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return Problem(400, "bad_json", f"not valid JSON: {exc}")
    if not isinstance(doc, dict):
        return Problem(422, "invalid", "send a JSON object like {\"verdict\": \"fraud\"}")
    verdict = doc.get("verdict")
    if verdict not in ("fraud", "genuine"):
        return Problem(422, "invalid", "verdict must be \"fraud\" (confirm) or \"genuine\" (dismiss)", "verdict")
    note = doc.get("note")
    if note is not None and not isinstance(note, str):
        return Problem(422, "invalid", "note must be a string", "note")
    if note is not None and len(note) > MAX_NOTE_CHARS:
        return Problem(422, "invalid", f"note must be at most {MAX_NOTE_CHARS} characters", "note")
    note = note.strip() or None if note is not None else None
    return VerdictRequest(verdict, note)
