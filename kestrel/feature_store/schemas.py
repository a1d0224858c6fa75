"""Event contracts: what producers send, as pydantic v2 models.

JSON on the wire, one event type per topic, ``schema_version`` 1. Unknown
extra fields are ignored (forward compatible within a major version);
anything else that does not fit is a rejection with the failing field.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SCHEMA_VERSION = 1

Id = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^\s]+$")]
ContextValue = str | int | float | bool



def epoch_of(iso: str) -> float:
    """Epoch seconds of a time the system wrote (ISO 8601, ``Z`` suffix)."""
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def iso_of(ts: float) -> str:
    """The system's output time format: UTC, milliseconds, ``Z`` suffix.

    Every decision writes one, so the minute's text is kept and only the
    seconds are formatted: the same text as ``datetime.fromtimestamp(ts,
    UTC).isoformat(timespec="milliseconds")`` (microseconds rounded half to
    even, then truncated to milliseconds), which a time within a microsecond
    of the next second, or before 1970, still takes.

    >>> iso_of(1767225600.0), iso_of(1767225661.2345), iso_of(1767225599.9999996), iso_of(-0.5)
    ('2026-01-01T00:00:00.000Z', '2026-01-01T00:01:01.234Z', '2026-01-01T00:00:00.000Z', '1969-12-31T23:59:59.500Z')
    """
    whole = math.floor(ts)
    frac = ts - whole  # exact (Sterbenz): the fraction datetime rounds to microseconds
    if frac > 0.999998 or whole < 0:
        return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    minute = whole // 60
    prefix = _MINUTES.get(minute)
    if prefix is None:
        if len(_MINUTES) >= 4096:
            _MINUTES.clear()
        prefix = _MINUTES[minute] = datetime.fromtimestamp(minute * 60, UTC).strftime("%Y-%m-%dT%H:%M:")
    return f"{prefix}{whole - minute * 60:02d}.{round(frac * 1e6) // 1000:03d}Z"


_MINUTES: dict[int, str] = {}


class _Event(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, str_strip_whitespace=True)

    schema_version: Literal[1] = Field(SCHEMA_VERSION, description="Major version of this contract.")
    event_id: Id = Field(description="Globally unique id; processing is idempotent per event_id.")
    timestamp: datetime = Field(description="When the event happened (ISO 8601 or epoch seconds); UTC if no zone.")

    @field_validator("timestamp")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    @cached_property
    def epoch_s(self) -> float:
        """Epoch seconds (computed once: every feature set, the scorer and the decision read it)."""
        return self.timestamp.timestamp()


class Geo(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    lat: float = Field(ge=-90, le=90)
    lon: float = Field(ge=-180, le=180)
    country: str | None = Field(None, pattern=r"^[A-Z]{2}$")


class Transaction(_Event):
    """A card payment attempt; keyed by the card (as a keyed hash)."""

    type: Literal["transaction"] = "transaction"
    card_id: Id = Field(description="Card identifier (PAN or token); only its keyed hash leaves ingestion.")
    customer_id: Id | None = None
    merchant_id: Id
    terminal_id: Id | None = None
    amount: float = Field(ge=0, le=1e9, description="Amount in major units of `currency`; never negative.")
    currency: str = Field(pattern=r"^[A-Z]{3}$", description="ISO 4217 code.")
    card_present: bool | None = None
    device_id: Id | None = None
    ip: str | None = Field(None, max_length=64)
    geo: Geo | None = None

    @field_validator("amount")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("amount must be a finite number")
        return value


class Interaction(_Event):
    """A user's interaction with an item; keyed by the user."""

    type: Literal["interaction"] = "interaction"
    user_id: Id
    item_id: Id
    kind: Literal["view", "click", "add_to_cart", "purchase"]
    context: dict[Annotated[str, Field(max_length=64)], ContextValue] | None = Field(
        None, description="Optional flat context: session_id, device, page, position ...")


class Label(_Event):
    """Ground truth for a transaction, arriving later (chargeback or analyst verdict)."""

    type: Literal["label"] = "label"
    transaction_id: Id = Field(description="event_id of the labelled transaction.")
    verdict: Literal["fraud", "genuine"]
    source: Literal["chargeback", "analyst"]
    card_id: Id | None = Field(None, description="Card of the transaction, when the sender knows it (used as key).")


Event = Transaction | Interaction | Label
EVENT_MODELS: dict[str, type[_Event]] = {"transaction": Transaction, "interaction": Interaction, "label": Label}


def json_schema() -> dict[str, Any]:
    """The documented JSON Schema of every event type (``kestrel schema``)."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Kestrel events",
        "description": f"Kestrel event contracts, schema_version {SCHEMA_VERSION}. JSON objects, one type per topic.",
        "oneOf": [{"$ref": f"#/$defs/{name}"} for name in EVENT_MODELS],
        "$defs": {name: _inline(model.model_json_schema()) for name, model in EVENT_MODELS.items()},
    }


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """Move a model's nested ``$defs`` so the combined document stays valid."""
    defs = schema.pop("$defs", {})
    text = json.dumps(schema)
    for name, sub in defs.items():
        text = text.replace(json.dumps({"$ref": f"#/$defs/{name}"}), json.dumps(sub))
    return json.loads(text)


def utcnow() -> datetime:
    return datetime.now(UTC)
