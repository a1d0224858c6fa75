"""The alert queue through a real worker, the real broker and Redis: JSON API and the page in headless Chromium.

The browser is Debian's ``chromium``, driven as in ``tests/integration/browser.py`` (the ``browser``
fixture).
"""

from __future__ import annotations

import itertools
import json
import time
import urllib.error
import urllib.request
from typing import Any

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from kestrel.feature_store import topics
from kestrel.feature_store.keys import KeyedHasher
from kestrel.feature_store.schemas import Transaction
from kestrel.streams.ingest.producer import EventProducer

pytestmark = pytest.mark.integration



def _call(url: str, body: object | None = None, token: str | None = None, raw: bytes | None = None,
          method: str | None = None) -> tuple[int, bytes, dict[str, str]]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"))
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


_ids = itertools.count()


def _txn(card: str, amount: float, at: float, merchant: str = "m-1") -> Transaction:
    return Transaction(event_id=f"w-{next(_ids)}-{int(at)}", card_id=card, merchant_id=merchant,
                       terminal_id=f"t-{merchant}", amount=amount, currency="EUR", timestamp=at)


def _send(settings: Any, events: list[Transaction]) -> None:
    producer = EventProducer(settings.broker, settings.hash_key)
    producer.send_many(events)
    assert producer.flush() == 0


def _alert_for(outputs: Any, card_token: str, timeout_s: float = 60.0, **match: Any) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for doc in reversed(outputs.docs[topics.ALERTS]):
            if doc["card"] == card_token and all(doc.get(k) == v for k, v in match.items()):
                return doc
        outputs.poll(0.2)
    raise AssertionError(f"no alert for the card with {match} within {timeout_s}s")


def _labels_on_topic(settings: Any, event_ids: set[str], timeout_s: float = 30.0) -> dict[str, tuple[bytes, dict]]:
    """Read events.labels from the beginning: (key, doc) of the given label event ids."""
    consumer = Consumer({"bootstrap.servers": settings.broker, "group.id": f"labels-{time.time_ns()}",
                         "enable.auto.commit": False})
    consumer.assign([TopicPartition(topics.LABELS, p, OFFSET_BEGINNING) for p in range(settings.partitions)])
    found: dict[str, tuple[bytes, dict]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and set(found) < event_ids:
            for msg in consumer.consume(100, timeout=0.2):
                if msg.error() is None:
                    doc = orjson.loads(msg.value())
                    if doc.get("event_id") in event_ids:
                        found[doc["event_id"]] = (msg.key(), doc)
    finally:
        consumer.close()
    return found


def test_alert_api_lists_by_risk_validates_and_turns_a_dismissal_into_labels(settings, worker, outputs):
    worker.start()
    hasher = KeyedHasher(settings.hash_key.encode())
    now = time.time() - 600
    burst_card, big_card = "4000111122223333", "4000555566667777"
    events = [_txn(burst_card, 1.0, now + 5 * i) for i in range(6)]  # card testing burst
    events.append(_txn(big_card, 2500.0, now, merchant="<script>alert(1)</script>"))  # one large payment
    _send(settings, events)
    burst = _alert_for(outputs, hasher.token("card", burst_card))
    big = _alert_for(outputs, hasher.token("card", big_card))
    outputs.wait_for(topics.FRAUD_DECISIONS, {e.event_id for e in events})  # cases are written before these

    status, body, _ = _call(f"{worker.url}/api/alerts")
    listed = json.loads(body)
    assert status == 200 and listed["open"] == 2
    assert [c["case_id"] for c in listed["alerts"]] == [burst["case_id"], big["case_id"]]  # riskier first
    status, body, _ = _call(f"{worker.url}/api/alerts/{big['case_id']}")
    case = json.loads(body)
    assert status == 200 and case["status"] == "open" and case["hits"] == 1
    assert [t["event_id"] for t in case["transactions"]] == [events[-1].event_id]
    assert case["reasons"][0]["code"] == "large_amount" and case["history"][0]["amount"] == 2500.0

    # the page escapes what producers sent and allows only its own script
    status, body, headers = _call(f"{worker.url}/alerts/{big['case_id']}")
    page = body.decode()
    assert status == 200 and "<script>alert(1)" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "script-src 'self'" in headers["Content-Security-Policy"] and settings.api_token not in page
    assert _call(f"{worker.url}/alerts")[1].decode().count("data-case-id=") == 2

    verdict_url = f"{worker.url}/api/alerts/{big['case_id']}/verdict"
    assert _call(verdict_url, {"verdict": "genuine"})[0] == 401
    assert _call(verdict_url, {"verdict": "genuine"}, token="wrong")[0] == 401
    status, body, _ = _call(verdict_url, {"verdict": "maybe"}, token=settings.api_token)
    assert status == 422 and json.loads(body)["field"] == "verdict"
    status, body, _ = _call(verdict_url, {"verdict": "genuine", "note": 7}, token=settings.api_token)
    assert status == 422 and json.loads(body)["field"] == "note"
    assert _call(verdict_url, raw=b'{"verdict": ', token=settings.api_token)[0] == 400
    assert _call(verdict_url, raw=b"x" * 20_000, token=settings.api_token)[0] == 413
    status, body, _ = _call(f"{worker.url}/api/alerts/NOT-A-CASE/verdict", {"verdict": "genuine"},
                            token=settings.api_token)
    assert status == 422 and json.loads(body)["field"] == "case_id"
    status, body, _ = _call(f"{worker.url}/api/alerts/{'0' * 20}/verdict", {"verdict": "genuine"},
                            token=settings.api_token)
    assert status == 404 and json.loads(body)["field"] == "case_id"
    status, body, _ = _call(f"{worker.url}/api/alerts?limit=0")
    assert status == 422 and json.loads(body)["field"] == "limit"
    assert _call(f"{worker.url}/alerts/{'0' * 20}")[0] == 404

    status, body, _ = _call(verdict_url, {"verdict": "genuine", "note": "customer confirmed"}, token=settings.api_token)
    done = json.loads(body)
    assert status == 202 and done["transactions"] == [events[-1].event_id] and len(done["labels"]) == 1
    assert _call(verdict_url, {"verdict": "fraud"}, token=settings.api_token)[0] == 409
    outputs.wait_for(topics.TRAINING_EXAMPLES, set(done["labels"]), timeout_s=30)
    (example,) = [d for d in outputs.docs[topics.TRAINING_EXAMPLES] if d["event_id"] in done["labels"]]
    assert example["source"] == "analyst" and example["label"] == 0 and example["verdict"] == "genuine"
    assert example["decision"]["event_id"] == events[-1].event_id
    closing = _alert_for(outputs, big["card"], alert="closed")
    assert closing["case_id"] == big["case_id"] and closing["verdict"]["verdict"] == "genuine"
    assert "customer confirmed" not in json.dumps(closing)
    status, body, _ = _call(f"{worker.url}/api/alerts")
    assert [c["case_id"] for c in json.loads(body)["alerts"]] == [burst["case_id"]]

    everything = b"".join(outputs.raw[topics.ALERTS])
    assert burst_card.encode() not in everything and big_card.encode() not in everything
    status, body, _ = _call(f"{worker.url}/metrics")
    assert b'kestrel_alert_verdicts_total{verdict="genuine"} 1.0' in body
    assert b'kestrel_alert_cases_total{change="opened"} 2.0' in body
    assert "Traceback" not in worker.log()


# -- the page in headless Chromium -------------------------------------------------------------------


async def test_analyst_confirms_fraud_in_the_browser_and_the_label_arrives(settings, worker, outputs, browser,
                                                                           tmp_path):
    worker.start()
    hasher = KeyedHasher(settings.hash_key.encode())
    card, other = "4000222233334444", "4000888899990000"
    now = time.time() - 600
    events = [_txn(card, 1.0, now + 5 * i) for i in range(5)] + [_txn(card, 3000.0, now + 30)]
    events.append(_txn(other, 1500.0, now))
    _send(settings, events)
    outputs.wait_for(topics.FRAUD_DECISIONS, {e.event_id for e in events})
    token = hasher.token("card", card)
    case_id = _alert_for(outputs, token)["case_id"]
    other_case = _alert_for(outputs, hasher.token("card", other))["case_id"]

    # open the queue: both cases listed, the card-testing one first
    await browser.goto(f"{worker.url}/alerts")
    rows = await browser.wait_for("Array.from(document.querySelectorAll('#queue tbody tr'), r => r.dataset.caseId)")
    assert rows == [case_id, other_case]

    # open the case: reasons, flagged transactions and history are on the page
    await browser.screenshot(tmp_path / "queue.png")
    await browser.click(f'tr[data-case-id="{case_id}"] a')
    await browser.wait_for(f"document.body.dataset.caseId === {json.dumps(case_id)}")
    reasons = await browser.eval("document.getElementById('reasons').innerText")
    assert "card_testing" in reasons
    rows_of = "Array.from(document.querySelectorAll('#{} tbody tr'), r => r.dataset.eventId)"
    flagged = await browser.eval(rows_of.format("transactions"))
    history = await browser.eval(rows_of.format("history"))
    assert events[5].event_id in flagged and set(flagged) <= {e.event_id for e in events[:6]}
    assert set(history) == {e.event_id for e in events[:6]}
    assert await browser.eval("document.getElementById('status').textContent") == "open"

    # confirm fraud without a token: refused by the page itself; then paste the token and confirm
    await browser.click("#confirm-fraud")
    assert "token" in await browser.wait_for("document.getElementById('result').textContent")
    await browser.type("#token", settings.api_token)
    await browser.click("#save-token")
    await browser.wait_for("document.getElementById('token-state').textContent === 'token set for this tab'")
    assert await browser.eval("document.documentElement.outerHTML.includes(" + json.dumps(settings.api_token) + ")") \
        is False
    await browser.type("#note", "cardholder did not make these")
    await browser.click("#confirm-fraud")
    await browser.wait_for("document.getElementById('result').className === 'ok'")
    labels = await browser.eval("Array.from(document.querySelectorAll('#labels li'), li => li.textContent)")
    assert await browser.eval("document.getElementById('status').textContent") == "closed"
    assert await browser.eval("document.getElementById('confirm-fraud').disabled") is True
    await browser.screenshot(tmp_path / "case-confirmed.png")
    assert labels and not [c for c in browser.console if c.startswith("exception")]

    # the labels land on events.labels, keyed by the card token, and become training examples
    on_topic = _labels_on_topic(settings, set(labels))
    assert set(on_topic) == set(labels)
    assert all(key == token.encode() for key, _ in on_topic.values())
    labelled = {doc["transaction_id"] for _, doc in on_topic.values()}
    assert events[5].event_id in labelled and labelled == set(flagged)
    assert all(doc["source"] == "analyst" and doc["verdict"] == "fraud" for _, doc in on_topic.values())
    outputs.wait_for(topics.TRAINING_EXAMPLES, set(labels), timeout_s=30)
    examples = [d for d in outputs.docs[topics.TRAINING_EXAMPLES] if d["event_id"] in set(labels)]
    assert {d["transaction_id"] for d in examples} == labelled
    assert all(d["label"] == 1 and d["source"] == "analyst" and d["decision"]["card"] == token for d in examples)

    # back on the queue the case is gone; the other is still there
    await browser.goto(f"{worker.url}/alerts")
    rows = await browser.wait_for("Array.from(document.querySelectorAll('#queue tbody tr'), r => r.dataset.caseId)")
    assert rows == [other_case]
    assert "Traceback" not in worker.log()
