"""A fraud experiment's live results: per-variant outcomes from Redis, SRM, always-valid intervals, a verdict.

The worker keeps, per experiment, each variant's exposed units (a set) and
each labelled enrolled payment's outcome (a hash keyed by label id, set
once): both idempotent, so replays and restarts count nothing twice. This
module reads them and computes, per variant, the alert rate, alert
precision and recall against the labels, then compares every variant with
the first (control) on the primary metric with the always-valid interval,
and checks the split against the configured weights (SRM).
"""

from __future__ import annotations

from typing import Any

import orjson
import redis

from kestrel.feature_store.keys import KeySpace
from kestrel.models.experiment_stats import confidence_sequence, srm_p_value, verdict
from kestrel.models.experiments import Experiment

METRICS = {"alert_precision": ("alerted", "alerted_frauds"), "recall": ("frauds", "alerted_frauds"),
           "alert_rate": ("labelled", "alerted")}


def variant_counts(outcomes: list[tuple[str, bool, str]], variants: list[str]) -> dict[str, dict[str, int]]:
    """Per variant: labelled, frauds, alerted (review or block), alerted frauds.

    >>> variant_counts([("a", True, "review"), ("a", False, "allow"), ("b", True, "allow")], ["a", "b"])["a"]
    {'labelled': 2, 'frauds': 1, 'alerted': 1, 'alerted_frauds': 1}
    """
    counts = {v: {"labelled": 0, "frauds": 0, "alerted": 0, "alerted_frauds": 0} for v in variants}
    for variant, is_fraud, action in outcomes:
        c = counts.setdefault(variant, {"labelled": 0, "frauds": 0, "alerted": 0, "alerted_frauds": 0})
        c["labelled"] += 1
        c["frauds"] += is_fraud
        alerted = action != "allow"
        c["alerted"] += alerted
        c["alerted_frauds"] += alerted and is_fraud
    return counts


def analyse(experiment: Experiment, units: dict[str, int], counts: dict[str, dict[str, int]],
            alpha: float = 0.05) -> dict[str, Any]:
    """The report of one experiment from its per-variant numbers (pure)."""
    keys = [v.key for v in experiment.variants]
    metric = experiment.primary_metric if experiment.primary_metric in METRICS else "alert_precision"
    per_variant: dict[str, dict[str, Any]] = {}
    for k in keys:
        c = counts.get(k, {})
        den_key, num_key = METRICS[metric]
        den, num = c.get(den_key, 0), c.get(num_key, 0)
        per_variant[k] = {"units": units.get(k, 0), **c,
                          **{name: (round(c.get(b, 0) / c.get(a, 0), 4) if c.get(a, 0) else None)
                             for name, (a, b) in METRICS.items()},
                          "_n": den, "_p": num / den if den else None}
    total = sum(units.get(k, 0) for k in keys)
    srm = srm_p_value([units.get(k, 0) for k in keys], experiment.weights()) if total else None
    control = per_variant[keys[0]]
    comparisons = {}
    for k in keys[1:]:
        v = per_variant[k]
        if not control["_n"] or not v["_n"]:
            comparisons[k] = {"note": f"{metric} needs {METRICS[metric][0]} payments in both variants; "
                                      "none yet in one of them"}
            continue
        pa, pb = control["_p"], v["_p"]
        lo, hi = confidence_sequence(pb, pa, pb * (1 - pb), pa * (1 - pa), v["_n"], control["_n"], alpha)
        said = verdict(metric.replace("_", " "), lo, hi, pa or 1.0)
        comparisons[k] = {"difference": round(pb - pa, 4), "ci": [round(lo, 4), round(hi, 4)],
                          "verdict": said.text, "decision": said.decision}
    for v in per_variant.values():
        v.pop("_n")
        v.pop("_p")
    return {"experiment": experiment.key, "status": experiment.status, "primary_metric": metric, "alpha": alpha,
            "variants": per_variant, "srm_p_value": round(srm, 6) if srm is not None else None,
            "srm": bool(srm is not None and srm < 0.001), "comparisons": comparisons}


def experiment_results(client: redis.Redis, keys: KeySpace, experiment: Experiment) -> dict[str, Any]:
    """Read an experiment's per-variant numbers from Redis and analyse them."""
    k = keys.experiments
    variants = [v.key for v in experiment.variants]
    pipe = client.pipeline(transaction=False)
    for v in variants:
        pipe.scard(k.units(experiment.key, v))
    units = dict(zip(variants, pipe.execute(), strict=True))
    outcomes = [tuple(orjson.loads(raw)) for raw in client.hvals(k.outcomes(experiment.key))]
    return analyse(experiment, units, variant_counts(outcomes, variants))  # type: ignore[arg-type]
