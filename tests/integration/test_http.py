"""The worker's HTTP surface against the real broker and Redis."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from kestrel.feature_store import topics

pytestmark = pytest.mark.integration


def _call(url: str, body: object | None = None, token: str | None = None, raw: bytes | None = None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


TXN = {"type": "transaction", "event_id": "h-1", "card_id": "4111111111111111", "merchant_id": "m-1",
       "amount": 42.5, "currency": "EUR", "timestamp": "2026-03-01T12:00:00Z"}


def _interaction(i: int, user: str, item: str, kind: str = "click") -> dict:
    return {"type": "interaction", "event_id": f"hi-{i}", "user_id": user, "item_id": item, "kind": kind,
            "timestamp": 1772366400 + i}


def test_health_ready_and_metrics(settings, worker):
    worker.start()
    status, body = _call(f"{worker.url}/health")
    assert status == 200 and json.loads(body)["redis"] == "ok"
    status, body = _call(f"{worker.url}/ready")
    assert status == 200 and json.loads(body)["partitions"]
    status, body = _call(f"{worker.url}/metrics")
    assert status == 200 and b"kestrel_decision_latency_seconds" in body


def test_post_events_needs_a_token_and_names_the_failing_field(settings, worker, outputs):
    worker.start()
    url = f"{worker.url}/events"
    assert _call(url, TXN)[0] == 401
    assert _call(url, TXN, token="wrong")[0] == 401

    status, body = _call(url, {**TXN, "amount": -3}, token=settings.api_token)
    err = json.loads(body)
    assert status == 422 and err["field"] == "amount" and err["event_id"] == "h-1"
    status, body = _call(url, {k: v for k, v in TXN.items() if k != "merchant_id"}, token=settings.api_token)
    assert status == 422 and json.loads(body)["field"] == "merchant_id"
    status, body = _call(url, {**TXN, "type": "payment"}, token=settings.api_token)
    assert status == 422 and json.loads(body)["field"] == "type"
    assert _call(url, raw=b'{"type": "transaction", ', token=settings.api_token)[0] == 400
    big = {**TXN, "ip": "x" * (settings.max_event_bytes + 10)}
    assert _call(url, big, token=settings.api_token)[0] == 413

    status, body = _call(url, TXN, token=settings.api_token)
    assert status == 202 and json.loads(body)["events"][0]["topic"] == topics.TRANSACTIONS
    outputs.wait_for(topics.FRAUD_DECISIONS, {"h-1"}, timeout_s=30)
    decision = outputs.docs[topics.FRAUD_DECISIONS][0]
    assert decision["event_id"] == "h-1" and "4111" not in json.dumps(decision)

    status, body = _call(f"{worker.url}/metrics")
    assert b'kestrel_http_rejected_total{reason="unauthorized"} 2.0' in body


def test_recommendations_are_popular_items_the_user_has_not_seen(settings, worker, outputs):
    worker.start()
    url = f"{worker.url}/events"
    events, i = [], 0
    for item, fans in (("item-a", 5), ("item-b", 4), ("item-c", 3), ("item-d", 2)):
        for u in range(fans):
            i += 1
            events.append(_interaction(i, f"fan-{u}", item, "purchase"))
    events.append(_interaction(99, "alice", "item-a", "view"))
    status, _ = _call(url, events, token=settings.api_token)
    assert status == 202
    outputs.wait_for(topics.RECOMMENDATION_DECISIONS, {e["event_id"] for e in events}, timeout_s=30)

    # Trending is the union of the window's buckets, cached for up to 5 s (kestrel.streams.recs.service): a union taken
    # while the events were still being processed may be served until it expires, then the full counts are.
    deadline = time.monotonic() + 8
    while True:
        status, body = _call(f"{worker.url}/recommendations/alice?k=2")
        recs = json.loads(body)
        if recs.get("items") == ["item-b", "item-c"] or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert status == 200 and recs["items"] == ["item-b", "item-c"] and recs["model_version"] == "popularity-v1"
    status, body = _call(f"{worker.url}/recommendations/newcomer?k=3")
    assert json.loads(body)["items"] == ["item-a", "item-b", "item-c"]
    assert _call(f"{worker.url}/recommendations/alice?k=0")[0] == 422
    assert _call(f"{worker.url}/recommendations/alice?k=abc")[0] == 422

    # the user's next interaction changes what comes next
    status, _ = _call(url, _interaction(100, "alice", "item-b", "click"), token=settings.api_token)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        items = json.loads(_call(f"{worker.url}/recommendations/alice?k=2")[1])["items"]
        if items == ["item-c", "item-d"]:
            break
        time.sleep(0.1)
    assert items == ["item-c", "item-d"]
