"""The router's decision for one unit: a table of cases, and definitions that are refused."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest

from kestrel.models.assignment import assign
from kestrel.models.experiments import Experiment, Variant, in_holdout, route


def _exp(**change) -> Experiment:
    doc = {"key": "fraud-threshold", "target": "fraud", "hash_attribute": "card", "seed": "fraud-threshold",
           "variants": [{"key": "control", "params": {"review_threshold": 0.5}},
                        {"key": "lower", "params": {"review_threshold": 0.4}}],
           "status": "running", "primary_metric": "alert_precision", **change}
    return Experiment.model_validate(doc)


@pytest.mark.parametrize(("change", "attributes", "reason"), [
    ({}, {"card": "tok-1"}, "assigned"),
    ({"status": "draft"}, {"card": "tok-1"}, "not running"),
    ({"status": "stopped"}, {"card": "tok-1"}, "not running"),
    ({}, {"user": "u-1"}, "no hash attribute"),
    ({}, {"card": ""}, "no hash attribute"),
    ({"filters": [{"attribute": "region", "values": ["north"]}]}, {"card": "tok-1", "region": "south"}, "filtered"),
    ({"filters": [{"attribute": "region", "values": ["north"]}]}, {"card": "tok-1", "region": "north"}, "assigned"),
    ({"coverage": 0.0}, {"card": "tok-1"}, "coverage"),
    ({"holdout": 0.999}, {"card": "tok-1"}, "holdout"),
])
def test_route(change, attributes, reason):
    routed = route(_exp(**change), attributes)
    assert routed.reason == reason
    assert (routed.variant is not None) is (reason == "assigned")


def test_the_router_gives_growthbooks_variant_and_respects_namespaces():
    exp = _exp(variants=[{"key": "a", "weight": 0.2}, {"key": "b", "weight": 0.8}])
    for i in range(200):
        unit = f"tok-{i}"
        assert route(exp, {"card": unit}).index == assign("fraud-threshold", unit, (0.2, 0.8))
    units = [f"tok-{i}" for i in range(4000)]
    left = _exp(namespace=("fraud", 0.0, 0.5))
    right = _exp(key="other", seed="other", namespace=("fraud", 0.5, 1.0))
    both = [u for u in units if route(left, {"card": u}).variant and route(right, {"card": u}).variant]
    assert not both
    assert {route(left, {"card": u}).reason for u in units} == {"assigned", "namespace"}


def test_the_holdout_is_the_same_units_for_every_experiment():
    units = [f"u-{i}" for i in range(10_000)]
    held = {u for u in units if in_holdout(u, 0.05)}
    assert abs(len(held) / len(units) - 0.05) < 0.01
    other = _exp(key="x", seed="x", holdout=0.05)
    assert {u for u in units if route(other, {"card": u}).reason == "holdout"} == held


@pytest.mark.parametrize("change", [
    {"variants": [{"key": "a"}]},                                        # one variant is not an experiment
    {"variants": [{"key": "a"}, {"key": "a"}]},                          # keys must be unique
    {"variants": [{"key": "a", "weight": 0.7}, {"key": "b", "weight": 0.7}]},  # weights must sum to 1
    {"variants": [{"key": "a", "weight": 1.0}, {"key": "b"}]},           # all or none
    {"coverage": 1.5}, {"namespace": ("ns", 0.6, 0.4)}, {"target": "ads"}, {"unknown_field": 1},
])
def test_definitions_that_are_refused(change):
    with pytest.raises(pydantic.ValidationError):
        _exp(**change)


def test_variant_keys_are_safe_names():
    with pytest.raises(pydantic.ValidationError):
        Variant(key="a b")


def test_results_flag_a_broken_split_and_compare_with_control():
    from kestrel.streams.experiments.results import analyse

    exp = _exp(primary_metric="recall")
    counts = {"control": {"labelled": 4000, "frauds": 400, "alerted": 300, "alerted_frauds": 200},
              "lower": {"labelled": 4000, "frauds": 400, "alerted": 500, "alerted_frauds": 300}}
    report = analyse(exp, {"control": 5200, "lower": 4800}, counts)
    assert report["srm"] and report["srm_p_value"] < 0.001
    assert report["variants"]["lower"]["recall"] == 0.75 and report["variants"]["control"]["alert_precision"] == 0.6667
    lo, hi = report["comparisons"]["lower"]["ci"]
    assert lo < 0.25 < hi and report["comparisons"]["lower"]["decision"] == "ship"
    balanced = analyse(exp, {"control": 5000, "lower": 5000}, counts)
    assert not balanced["srm"]
    empty = analyse(exp, {}, {})
    assert "30+" in empty["comparisons"]["lower"]["note"] and empty["srm_p_value"] is None


def test_a_guardrail_breach_needs_the_interval_on_the_bad_side_and_enough_data():
    from kestrel.streams.experiments.results import analyse

    exp = _exp(primary_metric="recall", guardrail_metrics=["alert_rate", "false_positive_rate"])

    def counts(alerted_b: int, labelled: int = 2000) -> dict:
        base = {"labelled": labelled, "frauds": 0, "alerted_frauds": 0, "genuine": labelled}
        return {"control": {**base, "alerted": labelled // 10, "alerted_genuine": labelled // 10},
                "lower": {**base, "alerted": alerted_b, "alerted_genuine": alerted_b}}

    breached = analyse(exp, {"control": 1, "lower": 1}, counts(alerted_b=400))  # 20% against 10% alerted
    assert {b["guardrail"] for b in breached["breaches"]} == {"alert_rate", "false_positive_rate"}
    assert not analyse(exp, {}, counts(alerted_b=210))["breaches"]  # 10.5%: within noise
    assert not analyse(exp, {}, counts(alerted_b=8, labelled=20))["breaches"]  # 40% of 20: too few to judge


def test_block_rate_is_a_guardrail_where_more_blocks_are_worse():
    from kestrel.streams.experiments.results import analyse, variant_counts

    exp = _exp(primary_metric="recall", guardrail_metrics=["block_rate"])
    outcomes = ([("control", False, "block")] * 20 + [("control", False, "allow")] * 980
                + [("lower", False, "block")] * 90 + [("lower", False, "allow")] * 910)
    report = analyse(exp, {"control": 1, "lower": 1}, variant_counts(outcomes, ["control", "lower"]))
    assert report["variants"]["lower"]["block_rate"] == 0.09 and report["variants"]["control"]["block_rate"] == 0.02
    assert [b["guardrail"] for b in report["breaches"]] == ["block_rate"]


@pytest.mark.parametrize(("control_ms", "variant_ms", "n", "breached"), [
    (2.0, 8.0, 500, True),  # a model four times slower, on 500 decisions each: stopped
    (2.0, 2.1, 500, False),  # within one bucket: no difference that holds
    (2.0, 8.0, 10, False),  # too few decisions to judge
    (8.0, 2.0, 500, False),  # faster is never a breach
])
def test_a_variant_whose_model_is_slower_breaches_a_duration_guardrail(control_ms, variant_ms, n, breached):
    from kestrel.models.experiment_stats import duration_bucket
    from kestrel.streams.experiments.results import analyse

    exp = _exp(primary_metric="recall", guardrail_metrics=["model_ms", "decision_latency_ms"])
    rng = np.random.default_rng(3)

    def histogram(ms: float) -> dict[int, int]:
        out: dict[int, int] = {}
        for x in rng.lognormal(np.log(ms), 0.3, n):
            b = duration_bucket(x / 1000)
            out[b] = out.get(b, 0) + 1
        return out

    model = {"control": histogram(control_ms), "lower": histogram(variant_ms)}
    shared = {"control": histogram(20.0), "lower": histogram(20.0)}  # one batch decides both: the same wait
    report = analyse(exp, {"control": n, "lower": n}, {}, durations={"model": model, "latency": shared})
    assert report["variants"]["lower"]["model_ms"]["n"] == n
    assert [b["guardrail"] for b in report["breaches"]] == (["model_ms"] if breached else [])
    assert report["primary_metric"] == "recall"  # the durations do not take its place
