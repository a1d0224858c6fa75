"""Baseline rules and thresholds: a table of feature vectors and the decision each must get."""

from __future__ import annotations

import pytest

from kestrel.models.rules import RuleScorer, derive
from kestrel.models.scoring import Thresholds


@pytest.mark.parametrize(("features", "action", "codes"), [
    ({"amount": 20.0}, "allow", []),
    ({"amount": 1500.0}, "review", ["large_amount"]),
    ({"amount": 1.0, "small_txn_count_10m": 4, "txn_count_10m": 4}, "review", ["card_testing"]),
    ({"amount": 500.0, "txn_count_30d_before": 5, "amount_vs_mean_30d": 12.5}, "allow", ["amount_vs_history"]),
    ({"amount": 2000.0, "txn_count_30d_before": 5, "amount_vs_mean_30d": 50.0, "txn_count_10m": 7},
     "block", ["large_amount", "amount_vs_history", "velocity_10m"]),
    ({"amount": 80.0, "terminal_txn_count_30d_d7": 10, "terminal_fraud_rate_30d_d7": 0.4,
      "distinct_terminals_24h": 6},
     "review", ["terminal_fraud_rate", "many_terminals"]),
    ({"amount": 80.0, "terminal_txn_count_30d_d7": 2, "terminal_fraud_rate_30d_d7": 1.0}, "allow", []),
    ({"amount": 2.0, "small_txn_count_10m": 5, "txn_count_10m": 8, "seconds_since_prev": 3.0}, "block",
     ["card_testing", "velocity_10m", "rapid_repeat"]),
    ({"amount": 300.0, "txn_count_30d_before": 1, "amount_vs_mean_30d": 30.0}, "allow", []),
])
def test_rule_table(features, action, codes):
    score = RuleScorer().score_one(features)
    assert score.action == action
    assert [r.code for r in score.reasons] == codes
    assert 0.0 <= score.score <= 1.0


def test_reasons_carry_the_values_that_fired():
    score = RuleScorer().score_one(derive(500.0, {"txn_count_30d": 6, "amount_mean_30d": 125.0}))
    assert score.reasons[0].value == pytest.approx(10.0)
    assert "10.0×" in score.reasons[0].message


@pytest.mark.parametrize(("score", "action"), [(0.0, "allow"), (0.49, "allow"), (0.5, "review"), (0.8, "block"),
                                               (1.0, "block")])
def test_thresholds(score, action):
    assert Thresholds(review=0.5, block=0.8).action(score) == action


def test_derived_history_excludes_the_current_payment():
    f = derive(100.0, {"txn_count_30d": 1.0, "amount_mean_30d": 100.0, "seconds_since_prev": -1.0})
    assert f["txn_count_30d_before"] == 0.0 and f["amount_mean_30d_before"] == 0.0 and f["amount_vs_mean_30d"] == 0.0
    assert f["seconds_since_prev"] == -1.0
