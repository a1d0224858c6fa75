"""An experiment's live results: per-variant outcomes from Redis, SRM, always-valid intervals, a verdict.

The worker keeps, per experiment, each variant's exposed units (a set) and
its outcomes, all idempotent, so replays and restarts count nothing twice:
for fraud, each labelled enrolled payment's outcome (a hash keyed by label
id, set once); for recommendations, the units that clicked and that
purchased within the attribution window after their first exposure (sets).
This module reads them and computes, per variant, the alert rate, alert
precision and recall against the labels (fraud) or the click-through and
purchase rates per exposed unit (recs), then compares every variant with
the first (control) on the primary metric with the always-valid interval,
and checks the split against the configured weights (SRM).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import redis

from kestrel.feature_store.keys import KeySpace
from kestrel.models.experiment_stats import confidence_sequence, cuped, srm_p_value, verdict
from kestrel.models.experiments import Experiment

# metric -> (denominator, numerator) among a variant's counts
METRICS = {"alert_precision": ("alerted", "alerted_frauds"), "recall": ("frauds", "alerted_frauds"),
           "alert_rate": ("labelled", "alerted"), "false_positive_rate": ("genuine", "alerted_genuine"),
           "block_rate": ("labelled", "blocked"),
           "ctr": ("units", "clicked"), "purchase_rate": ("units", "purchased")}
TARGET_METRICS = {"fraud": ("alert_precision", "recall", "alert_rate", "false_positive_rate", "block_rate"),
                  "recs": ("ctr", "purchase_rate")}
RECS_OUTCOMES = {"clicked": ("click", "add_to_cart", "purchase"), "purchased": ("purchase",)}  # outcome -> kinds
HIGHER_IS_WORSE = {"alert_rate", "false_positive_rate", "block_rate"}  # analysts' load, customers bothered


def variant_counts(outcomes: list[tuple[str, bool, str]], variants: list[str]) -> dict[str, dict[str, int]]:
    """Per variant: labelled, frauds, alerted (review or block), alerted frauds, blocked.

    >>> variant_counts([("a", True, "block"), ("a", False, "allow"), ("b", True, "allow")], ["a", "b"])["a"]
    {'labelled': 2, 'frauds': 1, 'alerted': 1, 'alerted_frauds': 1, 'blocked': 1, 'genuine': 1, 'alerted_genuine': 0}
    """
    def empty() -> dict[str, int]:
        return {"labelled": 0, "frauds": 0, "alerted": 0, "alerted_frauds": 0, "blocked": 0}

    counts = {v: empty() for v in variants}
    for variant, is_fraud, action in outcomes:
        c = counts.setdefault(variant, empty())
        c["labelled"] += 1
        c["frauds"] += is_fraud
        alerted = action != "allow"
        c["alerted"] += alerted
        c["alerted_frauds"] += alerted and is_fraud
        c["blocked"] += action == "block"
    for c in counts.values():
        c["genuine"] = c["labelled"] - c["frauds"]
        c["alerted_genuine"] = c["alerted"] - c["alerted_frauds"]
    return counts


def analyse(experiment: Experiment, units: dict[str, int], counts: dict[str, dict[str, int]],
            alpha: float = 0.05, per_unit: dict[str, list[tuple[float, float]]] | None = None) -> dict[str, Any]:
    """The report of one experiment from its per-variant numbers (pure).

    ``per_unit`` (recs): each variant's units as (outcome on the primary
    metric, pre-period covariate): the comparisons then also carry the
    CUPED-adjusted interval (:func:`cuped_comparisons`).
    """
    keys = [v.key for v in experiment.variants]
    names = TARGET_METRICS[experiment.target]
    metric = experiment.primary_metric if experiment.primary_metric in names else names[0]
    counts = {k: {"units": units.get(k, 0), **counts.get(k, {})} for k in keys}
    per_variant = {k: {**counts[k], **{name: (round(counts[k].get(METRICS[name][1], 0) / counts[k][METRICS[name][0]],
                                                     4) if counts[k].get(METRICS[name][0]) else None)
                                       for name in names}} for k in keys}
    total = sum(units.get(k, 0) for k in keys)
    srm = srm_p_value([units.get(k, 0) for k in keys], experiment.weights()) if total else None
    comparisons = {k: compare(counts, keys[0], k, metric, alpha) for k in keys[1:]}
    adjusted = cuped_comparisons(per_unit, keys, metric, alpha) if per_unit else None
    guardrails = {g: {k: compare(counts, keys[0], k, g, alpha) for k in keys[1:]}
                  for g in experiment.guardrail_metrics if g in names}
    breaches = [{"guardrail": g, "variant": k, **c} for g, by in guardrails.items() for k, c in by.items()
                if c.get("ci") and (c["ci"][0] > 0 if g in HIGHER_IS_WORSE else c["ci"][1] < 0)]
    return {"experiment": experiment.key, "status": experiment.status, "primary_metric": metric, "alpha": alpha,
            "variants": per_variant, "srm_p_value": round(srm, 6) if srm is not None else None,
            "srm": bool(srm is not None and srm < 0.001), "comparisons": comparisons, "guardrails": guardrails,
            "breaches": breaches, **({"cuped": adjusted} if adjusted else {})}


MIN_COVERED = 0.9  # CUPED only when this share of units has its pre-period covariate


def cuped_comparisons(per_unit: dict[str, list[tuple[float, float]]], keys: list[str], metric: str,
                      alpha: float) -> dict[str, Any] | None:
    """Each variant against control on a per-unit metric, adjusted by the units' pre-period covariate (CUPED).

    One ``theta`` from all variants pooled (the covariate is measured before
    exposure, so the adjustment cannot bias the difference), then the always-
    valid interval on the adjusted values; ``variance_reduction`` is how much
    narrower the metric's variance became. None when too few units have it.

    Engaged users click more; B lifts the click rate by 4 points. Adjusted,
    the interval excludes 0 where the plain one does not yet:

    >>> rng = np.random.default_rng(1)
    >>> def arm(lift):
    ...     x = rng.poisson(1, 4000).astype(float)
    ...     return [(float(rng.random() < min(0.9, 0.05 + 0.25 * xi + lift)), xi) for xi in x]
    >>> a, b = arm(0.0), arm(0.04)
    >>> out = cuped_comparisons({"a": a, "b": b}, ["a", "b"], "ctr", 0.05)
    >>> out["variance_reduction"], out["comparisons"]["b"]["decision"]
    (0.2645, 'ship')
    >>> plain = {v: {"units": 4000, "clicked": sum(y for y, _ in arm_)} for v, arm_ in (("a", a), ("b", b))}
    >>> compare(plain, "a", "b", "ctr", 0.05)["decision"]
    'keep running'
    """
    rows = [(v, y, x) for v in keys for y, x in per_unit.get(v, ())]
    if not rows or min(len(per_unit.get(v, ())) for v in keys) < MIN_DENOMINATOR:
        return None
    y = np.array([r[1] for r in rows])
    x = np.array([r[2] for r in rows])
    if np.isnan(x).mean() > 1 - MIN_COVERED:
        return None
    x = np.where(np.isnan(x), np.nanmean(x), x)
    adjusted, reduction = cuped(y, x)
    arms = np.array([r[0] for r in rows])
    stats = {v: (float(adjusted[arms == v].mean()), float(adjusted[arms == v].var()), int((arms == v).sum()),
                 float(y[arms == v].mean())) for v in keys}
    out = {}
    for k in keys[1:]:
        (ma, va, na, raw_a), (mb, vb, nb, _) = stats[keys[0]], stats[k]
        lo, hi = confidence_sequence(mb, ma, vb, va, nb, na, alpha)
        said = verdict(metric.replace("_", " ") + " (CUPED)", lo, hi, raw_a or 1.0,
                       higher_is_better=metric not in HIGHER_IS_WORSE)
        out[k] = {"difference": round(mb - ma, 4), "ci": [round(lo, 4), round(hi, 4)], "verdict": said.text,
                  "decision": said.decision}
    return {"covariate": "engagement before the first exposure (clicks in the hour + purchases in 7 days)",
            "variance_reduction": round(reduction, 4), "comparisons": out}


MIN_DENOMINATOR = 30  # below this a proportion's variance estimate is not trusted (0 of 3 is not "never")


def compare(counts: dict[str, dict[str, int]], control: str, variant: str, metric: str,
            alpha: float) -> dict[str, Any]:
    """``variant`` minus ``control`` on a proportion metric, with the always-valid interval and a verdict."""
    den_key, num_key = METRICS[metric]
    a, b = counts.get(control, {}), counts.get(variant, {})
    na, nb = a.get(den_key, 0), b.get(den_key, 0)
    if min(na, nb) < MIN_DENOMINATOR:
        return {"note": f"{metric} needs {MIN_DENOMINATOR}+ {den_key} in both variants "
                        f"(control {na}, {variant} {nb})"}
    pa, pb = a.get(num_key, 0) / na, b.get(num_key, 0) / nb
    lo, hi = confidence_sequence(pb, pa, pb * (1 - pb), pa * (1 - pa), nb, na, alpha)
    said = verdict(metric.replace("_", " "), lo, hi, pa or 1.0, higher_is_better=metric not in HIGHER_IS_WORSE)
    return {"difference": round(pb - pa, 4), "ci": [round(lo, 4), round(hi, 4)], "verdict": said.text,
            "decision": said.decision}


def experiment_results(client: redis.Redis, keys: KeySpace, experiment: Experiment) -> dict[str, Any]:
    """Read an experiment's per-variant numbers from Redis and analyse them."""
    k = keys.experiments
    variants = [v.key for v in experiment.variants]
    pipe = client.pipeline(transaction=False)
    for v in variants:
        pipe.scard(k.units(experiment.key, v))
    units = dict(zip(variants, pipe.execute(), strict=True))
    if experiment.target == "recs":
        for v in variants:
            pipe.smembers(k.units(experiment.key, v))
            for outcome in RECS_OUTCOMES:
                pipe.smembers(k.converted(experiment.key, v, outcome))
        pipe.hgetall(k.pre_period(experiment.key))
        *found, pre_raw = pipe.execute()
        replies = iter(found)
        members = {v: (next(replies), {outcome: next(replies) for outcome in RECS_OUTCOMES}) for v in variants}
        counts = {v: {outcome: len(done) for outcome, done in members[v][1].items()} for v in variants}
        pre = {unit: float(value) for unit, value in pre_raw.items()}
        outcome = "purchased" if experiment.primary_metric == "purchase_rate" else "clicked"
        per_unit = {v: [(float(u in members[v][1][outcome]), pre.get(u, float("nan"))) for u in members[v][0]]
                    for v in variants}
        return analyse(experiment, units, counts, per_unit=per_unit)
    outcomes = [tuple(orjson.loads(raw)) for raw in client.hvals(k.outcomes(experiment.key))]
    return analyse(experiment, units, variant_counts(outcomes, variants))  # type: ignore[arg-type]
