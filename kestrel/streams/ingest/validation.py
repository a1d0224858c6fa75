"""Turn raw bytes from a topic into a typed event or a reason for rejection.

Pure: no I/O. The agents route rejections to ``events.deadletter`` with the
original bytes, so nothing is dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson
from pydantic import ValidationError

from kestrel.feature_store.schemas import EVENT_MODELS, SCHEMA_VERSION, Event


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why an input was refused: a stable ``reason`` code plus a human message."""

    reason: str  # oversized | bad_json | not_an_object | unsupported_version | wrong_type | invalid
    message: str
    field: str | None = None
    event_id: str | None = None


REASONS = ("oversized", "bad_json", "not_an_object", "unsupported_version", "wrong_type", "invalid")


def parse_event(raw: bytes | None, event_type: str, max_bytes: int) -> Event | Rejection:
    """Decode and validate one message of the topic that carries ``event_type``.

    >>> parse_event(b'{"event_id": "e1"', "label", 1024).reason
    'bad_json'
    >>> r = parse_event(b'{"event_id":"t1","card_id":"c","merchant_id":"m","amount":-5,'
    ...                 b'"currency":"EUR","timestamp":"2026-01-01T00:00:00Z"}', "transaction", 1024)
    >>> (r.reason, r.field, r.event_id)
    ('invalid', 'amount', 't1')
    """
    if raw is None:
        return Rejection("bad_json", "empty message (null value)")
    if len(raw) > max_bytes:
        return Rejection("oversized", f"payload is {len(raw)} bytes, limit is {max_bytes}")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return Rejection("bad_json", f"not valid JSON: {exc}")
    return validate_document(doc, event_type)


def validate_document(doc: object, event_type: str) -> Event | Rejection:
    """Validate an already-decoded JSON document against the ``event_type`` contract."""
    if not isinstance(doc, dict):
        return Rejection("not_an_object", f"expected a JSON object, got {type(doc).__name__}")
    event_id = doc.get("event_id") if isinstance(doc.get("event_id"), str) else None
    version = doc.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        message = f"schema_version {version!r} is not supported (expected {SCHEMA_VERSION})"
        return Rejection("unsupported_version", message, "schema_version", event_id)
    declared = doc.get("type", event_type)
    if declared != event_type:
        return Rejection("wrong_type", f"a {declared!r} event on the {event_type!r} topic", "type", event_id)
    try:
        return EVENT_MODELS[event_type].model_validate(doc)
    except (OverflowError, ArithmeticError) as exc:  # e.g. a date that leaves the calendar when made UTC
        return Rejection("invalid", f"timestamp: {exc}", "timestamp", event_id)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = _field_path(doc, first["loc"], missing=first["type"] == "missing")
        more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        return Rejection("invalid", f"{where}: {first['msg']}{more}", where, event_id)


def _field_path(doc: object, loc: tuple, missing: bool) -> str | None:
    """The error location as a dotted path of the document's own keys.

    pydantic adds union member tags ("int", "constrained-str") to the
    location; a producer needs the path of the field it sent (or forgot).

    >>> _field_path({"context": {"a": {"b": 1}}}, ("context", "a", "constrained-str"), missing=False)
    'context.a'
    >>> _field_path({"geo": {"lat": 1}}, ("geo", "lon"), missing=True)
    'geo.lon'
    """
    parts: list[str] = []
    node = doc
    for part in loc:
        in_dict = isinstance(node, dict) and part in node
        in_list = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        if in_dict or in_list:
            node = node[part]
        else:
            if missing:
                parts.append(str(part))
            break
        parts.append(str(part))
    return ".".join(parts) or None


def check_time(event: Event, now: float, max_future_s: float) -> Rejection | None:
    """Refuse events dated too far in the future: one would pull every window of its entity forward.

    >>> from kestrel.feature_store.schemas import Label
    >>> e = Label(event_id="l", transaction_id="t", verdict="fraud", source="analyst", timestamp=10_000)
    >>> check_time(e, now=0.0, max_future_s=3600).field, check_time(e, now=9_000.0, max_future_s=3600)
    ('timestamp', None)
    """
    if event.epoch_s > now + max_future_s:
        return Rejection("invalid", f"timestamp is more than {max_future_s:.0f}s in the future", "timestamp",
                         event.event_id)
    return None
