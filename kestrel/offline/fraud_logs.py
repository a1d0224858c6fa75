"""Training data from what the system logged: decisions with their features, joined to labels.

Every fraud decision carries the exact feature dict the model saw
(``decisions.fraud``); labels come back as ``training.examples``. Joining the
two needs no recomputation and cannot leak the future. A payment with no
label yet is taken as genuine only once it is older than the label delay
(chargebacks can still arrive before that); younger ones are left out.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from kestrel.feature_store import topics
from kestrel.feature_store.schemas import epoch_of


def read_topic(bootstrap: str, topic: str, partitions: int, idle_s: float = 3.0,
               progress: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Every JSON record of ``topic`` from the beginning, until nothing new arrives for ``idle_s``.

    Reads by assignment (no consumer group join). The end is found by
    idleness, not by end offsets: tansu's "latest" offsets are not reliable.
    """
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"kestrel-train-{secrets.token_hex(4)}",
                         "enable.auto.commit": False, "fetch.wait.max.ms": 50})
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    docs: list[dict[str, Any]] = []
    last = time.monotonic()
    try:
        while time.monotonic() - last < idle_s:
            batch = consumer.consume(1000, timeout=0.2)
            for msg in batch:
                if msg.error() is None and msg.value():
                    docs.append(orjson.loads(msg.value()))
            if batch:
                last = time.monotonic()
                if progress:
                    progress(len(docs))
    finally:
        consumer.close()
    return docs


@dataclass(frozen=True)
class LoggedTrainingSet:
    rows: list[dict[str, Any]]
    labels: np.ndarray
    epoch_s: np.ndarray
    ids: list[str]
    labelled: int
    assumed_genuine: int
    left_out: int
    cards: list[str | None]  # each row's card token: the selection rules' bootstrap groups


def join_logged(decisions: list[dict[str, Any]], examples: list[dict[str, Any]],
                assume_genuine_after_s: float, as_of: float | None = None) -> LoggedTrainingSet:
    """Decisions (one per event_id, features as logged) with labels; time-ordered.

    ``as_of``: the moment the set is built for (default: the newest
    decision); the label delay is counted back from it.

    >>> d = [{"event_id": e, "event_time": t, "features": {"amount": 1.0}} for e, t in
    ...      [("a", "2026-01-01T00:00:00Z"), ("b", "2026-01-05T00:00:00Z"), ("c", "2026-01-09T00:00:00Z")]]
    >>> s = join_logged(d, [{"transaction_id": "b", "label": 1, "label_time": "2026-01-06T00:00:00Z"}], 7 * 86400)
    >>> s.ids, s.labels.tolist(), (s.labelled, s.assumed_genuine, s.left_out)
    (['a', 'b'], [0, 1], (1, 1, 1))
    """
    latest_label: dict[str, tuple[str, int]] = {}
    for ex in examples:
        tid, when = ex.get("transaction_id"), ex.get("label_time", "")
        if tid is not None and (tid not in latest_label or when >= latest_label[tid][0]):
            latest_label[tid] = (when, int(ex["label"]))
    unique = {d["event_id"]: d for d in decisions if d.get("features")}
    ordered = sorted(unique.values(), key=lambda d: d["event_time"])
    newest = as_of if as_of is not None else max((epoch_of(d["event_time"]) for d in ordered), default=0.0)
    rows, labels, times, ids, cards = [], [], [], [], []
    labelled = assumed = left_out = 0
    for d in ordered:
        t = epoch_of(d["event_time"])
        if d["event_id"] in latest_label:
            y = latest_label[d["event_id"]][1]
            labelled += 1
        elif t <= newest - assume_genuine_after_s:
            y = 0
            assumed += 1
        else:
            left_out += 1
            continue
        rows.append(d["features"])
        labels.append(y)
        times.append(t)
        ids.append(d["event_id"])
        cards.append(d.get("card"))
    return LoggedTrainingSet(rows, np.array(labels, dtype=np.int64), np.array(times), ids, labelled, assumed,
                             left_out, cards)


def logged_training_set(bootstrap: str, partitions: int, assume_genuine_after_s: float,
                        say: Callable[[str], None]) -> LoggedTrainingSet:
    say(f"reading {topics.FRAUD_DECISIONS} and {topics.TRAINING_EXAMPLES} from {bootstrap}")
    decisions = [d for d in read_topic(bootstrap, topics.FRAUD_DECISIONS, partitions,
                                       progress=lambda n: say(f"  {n:,} decisions read"))
                 if d.get("type") == "fraud_decision"]
    examples = [e for e in read_topic(bootstrap, topics.TRAINING_EXAMPLES, partitions)
                if e.get("type") == "training_example"]
    data = join_logged(decisions, examples, assume_genuine_after_s)
    say(f"{len(decisions):,} decisions, {len(examples):,} labels: {data.labelled:,} labelled, "
        f"{data.assumed_genuine:,} taken as genuine (older than the label delay), {data.left_out:,} too recent")
    return data
