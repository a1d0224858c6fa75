"""Two-tower serving in a real worker: interactions through the broker change the next recommendation."""

from __future__ import annotations

import json
import secrets
import time
import urllib.request
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from kestrel.feature_store import topics
from kestrel.feature_store.schemas import Interaction
from kestrel.offline.recs_data import load_interactions, simulated_interactions
from kestrel.offline.recs_train import train_two_tower
from kestrel.streams.ingest.producer import EventProducer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def recs_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A small two-tower trained on simulated shoppers (seconds), saved as a versioned artifact."""
    root = tmp_path_factory.mktemp("recs")
    csv = root / "interactions.csv"
    simulated_interactions(15_000, seed=3, n_users=300, n_items=400, n_categories=8).to_csv(csv, index=False)
    df = load_interactions(csv, "user_id", "item_id", "timestamp", category_col="category")
    art = train_two_tower(df, dim=32, epochs=6, batch_size=256, progress=False)
    art.save(root / "model")
    return root / "model", dict(zip(art.vocab.item_ids, art.vocab.item_category, strict=True))


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def _send(producer: EventProducer, user: str, items: list[str], categories: dict[str, str], tag: str) -> list[str]:
    ids = []
    for n, item in enumerate(items):
        ev = Interaction(event_id=f"{tag}-{n}-{secrets.token_hex(3)}", user_id=user, item_id=item, kind="click",
                         timestamp=datetime.now(UTC), context={"category": int(categories[item])})
        producer.send(ev)
        ids.append(ev.event_id)
    producer.flush()
    return ids


def _share(items: list[str], categories: dict[str, str], category: str) -> float:
    return sum(categories.get(i) == category for i in items) / max(len(items), 1)


def test_interactions_through_the_broker_shift_the_next_recommendation(settings, worker, outputs, recs_model):
    root, categories = recs_model
    worker.settings = settings.with_(recs_model=str(root))
    worker.start()
    producer = EventProducer(settings.broker, settings.hash_key)
    by_cat: dict[str, list[str]] = {}
    for item, cat in categories.items():
        by_cat.setdefault(cat, []).append(item)
    cat_a, cat_b = sorted(by_cat, key=lambda c: -len(by_cat[c]))[:2]
    user = f"shopper-{secrets.token_hex(3)}"

    # Cold start: no history yet -> trending fallback, and it says so.
    cold = _get(f"{worker.url}/recommendations/{user}?k=10")
    assert cold["path"] == "fallback"

    ids = _send(producer, user, by_cat[cat_a][:3], categories, "a")
    outputs.wait_for(topics.RECOMMENDATION_DECISIONS, set(ids), timeout_s=60)
    deadline = time.monotonic() + 90  # the worker loads torch and the model in a thread after start
    while time.monotonic() < deadline:
        first = _get(f"{worker.url}/recommendations/{user}?k=10")
        if first["path"] == "personalised":
            break
        time.sleep(0.5)
    assert first["path"] == "personalised", worker.log()[-2000:]
    assert first["model_version"].startswith("two-tower-")
    assert not set(first["items"]) & set(by_cat[cat_a][:3]), "seen items must not be recommended"
    share_a_before = _share(first["items"], categories, cat_a)
    share_b_before = _share(first["items"], categories, cat_b)
    assert share_a_before >= 0.5

    ids = _send(producer, user, by_cat[cat_b][:4], categories, "b")
    outputs.wait_for(topics.RECOMMENDATION_DECISIONS, set(ids), timeout_s=30)
    after = _get(f"{worker.url}/recommendations/{user}?k=10")
    assert after["path"] == "personalised"
    assert _share(after["items"], categories, cat_b) >= share_b_before + 0.3
    assert _share(after["items"], categories, cat_a) < share_a_before
    # The worker's own recommendation after the last event reflects it too.
    last = next(d for d in outputs.docs[topics.RECOMMENDATION_DECISIONS] if d["event_id"] == ids[-1])
    assert last["path"] == "personalised" and _share(last["items"], categories, cat_b) >= 0.4

    # Diversity: at most 2 per category when asked.
    capped = _get(f"{worker.url}/recommendations/{user}?k=10&per_category=2")
    assert len(capped["items"]) == 10 and max(Counter(categories.get(i) for i in capped["items"]).values()) <= 2
    # Per-request exclusions are honoured.
    excluded = _get(f"{worker.url}/recommendations/{user}?k=10&exclude={after['items'][0]}")
    assert after["items"][0] not in excluded["items"]


def test_request_and_response_topics_answer_with_the_model_and_path(settings, worker, outputs, recs_model):
    root, categories = recs_model
    worker.settings = settings.with_(recs_model=str(root))
    worker.start()
    user = f"asker-{secrets.token_hex(3)}"
    some_cat = next(iter(set(categories.values())))
    history = [i for i, c in categories.items() if c == some_cat][:3]
    ids = _send(EventProducer(settings.broker, settings.hash_key), user, history, categories, "q")
    outputs.wait_for(topics.RECOMMENDATION_DECISIONS, set(ids), timeout_s=60)
    consumer = Consumer({"bootstrap.servers": settings.broker, "group.id": f"t-{secrets.token_hex(4)}",
                         "enable.auto.commit": False, "fetch.wait.max.ms": 10})
    consumer.assign([TopicPartition(topics.RECS_RESPONSES, p, OFFSET_BEGINNING) for p in range(settings.partitions)])
    producer = Producer({"bootstrap.servers": settings.broker})
    answers: dict[bytes, dict] = {}

    def ask(rid: str, doc: dict) -> dict:
        producer.produce(topics.RECS_REQUESTS, key=rid.encode(), value=orjson.dumps({"request_id": rid, **doc}))
        producer.flush(10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and rid.encode() not in answers:
            for msg in consumer.consume(10, timeout=0.2):
                if msg.error() is None:
                    answers[msg.key()] = orjson.loads(msg.value())
        return answers[rid.encode()]

    assert "k must be" in ask("bad", {"user_id": user, "k": 0})["error"]
    cold = ask("cold", {"user_id": "nobody-yet", "k": 5})
    assert cold["path"] == "fallback" and cold["model_version"] == "popularity-v1"
    deadline = time.monotonic() + 90  # the model loads in a thread after the worker starts
    n = 0
    while True:
        n += 1
        ans = ask(f"warm-{n}", {"user_id": user, "k": 5, "exclude": [history[0]]})
        if ans["path"] == "personalised" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    consumer.close()
    assert ans["path"] == "personalised" and ans["model_version"].startswith("two-tower-")
    assert ans["user_id"] == user and len(ans["items"]) == 5 and not set(ans["items"]) & set(history)
