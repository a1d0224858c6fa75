"""The simulator: reproducible, realistic enough to tell models apart, and honest about ground truth."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np

from streams.simulator import FRAUD_SCENARIOS, INVALID_KINDS, SimConfig, Simulator
from streams.validation import Rejection, parse_event


def _take(n: int, **kw) -> list:
    return list(itertools.islice(Simulator(SimConfig(**kw)).records(), n))


def test_same_seed_same_stream_other_seed_other_stream():
    a, b, c = _take(2000, seed=1), _take(2000, seed=1), _take(2000, seed=2)
    assert [r.value for r in a] == [r.value for r in b]
    assert [r.value for r in a] != [r.value for r in c]


def test_events_are_in_time_order_and_labels_come_after_their_transaction():
    recs = _take(30000, seed=4, label_delay_s=900)
    times = [r.time for r in recs]
    assert all(x <= y + 0.05 for x, y in itertools.pairwise(times))  # sessions: a few ms of disorder
    txn_time = {r.event_id: r.time for r in recs if r.kind == "transaction"}
    labels = [r for r in recs if r.kind == "label"]
    assert labels
    for lab in labels:
        delay = lab.time - txn_time[lab.event.transaction_id]
        assert 0.5 * 900 - 1 <= delay <= 1.5 * 900 + 1


def test_every_fraud_scenario_occurs_and_frauds_get_fraud_labels():
    recs = _take(60000, seed=9, label_delay_s=60)
    scenarios = Counter(r.scenario for r in recs if r.fraud)
    assert set(scenarios) == set(FRAUD_SCENARIOS)
    fraud_ids = {r.event_id for r in recs if r.fraud}
    verdicts = {r.event.transaction_id: r.event.verdict for r in recs if r.kind == "label"}
    labelled_frauds = fraud_ids & set(verdicts)
    assert labelled_frauds and all(verdicts[t] == "fraud" for t in labelled_frauds)
    assert all(verdicts[t] == "genuine" for t in set(verdicts) - fraud_ids)


def test_fraud_looks_different_from_normal_spending():
    recs = [r for r in _take(60000, seed=9) if r.kind == "transaction"]
    fraud = np.array([r.event.amount for r in recs if r.scenario in ("card_spree", "large_amount")])
    normal = np.array([r.event.amount for r in recs if not r.fraud])
    assert np.median(fraud) > 2 * np.median(normal)
    testing = [r.event.amount for r in recs if r.scenario == "card_testing"]
    assert sum(a < 5 for a in testing) >= len(testing) / 2


def test_clicks_follow_taste_so_personalisation_can_beat_popularity():
    sim = Simulator(SimConfig(seed=3))
    recs = [r for r in itertools.islice(sim.records(), 20000) if r.kind == "interaction"]
    clicks_by_user = Counter(r.event.user_id for r in recs if r.event.kind == "click")
    top_user_id = clicks_by_user.most_common(1)[0][0]
    user = Simulator.user_index(top_user_id)
    taste = sim.user_taste[user]
    best, worst = int(np.argmax(taste)), int(np.argmin(taste))
    p_best = np.mean([sim.click_probability(user, i) for i in sim.items_by_category[best]])
    p_worst = np.mean([sim.click_probability(user, i) for i in sim.items_by_category[worst]])
    assert p_best > 3 * p_worst
    clicks = [r for r in recs if r.event.kind == "click" and r.event.user_id == top_user_id]
    cats = Counter(int(sim.item_category[Simulator.item_index(r.event.item_id)]) for r in clicks)
    liked = set(np.argsort(taste)[-3:].tolist())
    assert sum(n for c, n in cats.items() if c in liked) > 0.6 * len(clicks)


def test_invalid_events_are_rejected_by_the_worker_validation():
    recs = [r for r in _take(20000, seed=5, invalid_share=0.05) if not r.valid]
    assert {r.kind.split(":")[1] for r in recs} == set(INVALID_KINDS)
    for r in recs:
        kind = "interaction" if r.topic == "events.interactions" else "transaction"
        assert isinstance(parse_event(r.value, kind, 64 * 1024), Rejection), r.kind
