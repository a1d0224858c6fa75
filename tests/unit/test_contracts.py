"""Event contracts and validation: a table of inputs and the rejection each must get."""

from __future__ import annotations

import orjson
import pytest

from kestrel.feature_store.schemas import Interaction, Label, Transaction, json_schema
from kestrel.streams.ingest.validation import Rejection, parse_event

TXN = {"event_id": "t1", "card_id": "c1", "merchant_id": "m1", "amount": 12.5, "currency": "EUR",
       "timestamp": "2026-01-01T00:00:00Z"}
INTERACTION = {"event_id": "i1", "user_id": "u1", "item_id": "it1", "kind": "click", "timestamp": 1767225600}
LABEL = {"event_id": "l1", "transaction_id": "t1", "verdict": "fraud", "source": "chargeback",
         "timestamp": "2026-01-08T00:00:00+02:00"}


def _bytes(doc: object) -> bytes:
    return orjson.dumps(doc)


@pytest.mark.parametrize(("raw", "kind", "reason", "field"), [
    (b"", "transaction", "bad_json", None),
    (b'{"event_id": "t1", ', "transaction", "bad_json", None),
    (b"[1, 2]", "transaction", "not_an_object", None),
    (_bytes({k: v for k, v in TXN.items() if k != "merchant_id"}), "transaction", "invalid", "merchant_id"),
    (_bytes({**TXN, "amount": "twelve"}), "transaction", "invalid", "amount"),
    (_bytes({**TXN, "amount": -1}), "transaction", "invalid", "amount"),
    (_bytes({**TXN, "currency": "euro"}), "transaction", "invalid", "currency"),
    (_bytes({**TXN, "timestamp": "yesterday"}), "transaction", "invalid", "timestamp"),
    (_bytes({**TXN, "event_id": ""}), "transaction", "invalid", "event_id"),
    (_bytes({**TXN, "schema_version": 2}), "transaction", "unsupported_version", "schema_version"),
    (_bytes({**TXN, "type": "interaction"}), "transaction", "wrong_type", "type"),
    (_bytes({**INTERACTION, "kind": "like"}), "interaction", "invalid", "kind"),
    (_bytes({**INTERACTION, "context": {"nested": {"a": 1}}}), "interaction", "invalid", "context.nested"),
    (_bytes({**LABEL, "verdict": "maybe"}), "label", "invalid", "verdict"),
    (_bytes({**TXN, "ip": "x" * 2000}), "transaction", "oversized", None),
])
def test_rejections(raw, kind, reason, field):
    got = parse_event(raw, kind, max_bytes=1024)
    assert isinstance(got, Rejection)
    assert got.reason == reason
    assert got.message
    if field is not None:
        assert got.field == field


def test_nan_amount_is_rejected():
    got = parse_event(b'{"event_id":"t","card_id":"c","merchant_id":"m","amount":NaN,"currency":"EUR",'
                      b'"timestamp":1}', "transaction", 1024)
    assert isinstance(got, Rejection) and got.reason == "bad_json"


@pytest.mark.parametrize(("doc", "kind", "model"), [(TXN, "transaction", Transaction),
                                                      (INTERACTION, "interaction", Interaction),
                                                      (LABEL, "label", Label)])
def test_valid_events_parse_to_utc(doc, kind, model):
    got = parse_event(_bytes({**doc, "unknown_future_field": 1}), kind, 4096)
    assert isinstance(got, model)
    assert got.timestamp.utcoffset().total_seconds() == 0
    assert got.schema_version == 1


def test_label_timezone_is_normalised():
    got = parse_event(_bytes(LABEL), "label", 4096)
    assert got.timestamp.isoformat() == "2026-01-07T22:00:00+00:00"


def test_json_schema_documents_every_field():
    doc = json_schema()
    assert set(doc["$defs"]) == {"transaction", "interaction", "label"}
    txn = doc["$defs"]["transaction"]
    assert {"event_id", "card_id", "merchant_id", "amount", "currency", "timestamp"} <= set(txn["required"])
    assert all("description" in txn["properties"][f] for f in ("event_id", "amount", "card_id"))
    assert "$ref" not in orjson.dumps(doc["$defs"]).decode()  # nested models are inlined


@pytest.mark.parametrize("stamp", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-05:00"])
def test_dates_that_leave_the_calendar_are_rejections_not_crashes(stamp):
    got = parse_event(_bytes({**TXN, "timestamp": stamp}), "transaction", 4096)
    assert isinstance(got, Rejection) and got.field == "timestamp"


def test_far_future_events_are_refused():
    from kestrel.streams.ingest.validation import check_time

    event = parse_event(_bytes({**TXN, "timestamp": "2030-01-01T00:00:00Z"}), "transaction", 4096)
    assert check_time(event, now=1_767_225_600.0, max_future_s=3600).field == "timestamp"
    assert check_time(event, now=1_893_456_000.0, max_future_s=3600) is None
