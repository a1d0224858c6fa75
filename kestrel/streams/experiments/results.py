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

Fraud variants are also compared on what they cost: each enrolled
decision's latency (from the payment's time at the broker to its decision)
and its share of its model's scoring time, kept as histograms that count a
decision with its log's first write (so once). A batch decides every
variant's payments together, so a slower model delays the other variants'
payments of its batch too: ``model_ms`` is what tells the variants apart,
``decision_latency_ms`` what the payments waited in all.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import redis

from kestrel.feature_store.keys import KeySpace
from kestrel.models.experiment_stats import (
    confidence_sequence,
    cuped,
    duration_bucket,
    duration_summary,
    srm_p_value,
    verdict,
)
from kestrel.models.experiments import Experiment

# metric -> (denominator, numerator) among a variant's counts
METRICS = {"alert_precision": ("alerted", "alerted_frauds"), "recall": ("frauds", "alerted_frauds"),
           "alert_rate": ("labelled", "alerted"), "false_positive_rate": ("genuine", "alerted_genuine"),
           "block_rate": ("labelled", "blocked"),
           "ctr": ("units", "clicked"), "purchase_rate": ("units", "purchased")}
TARGET_METRICS = {"fraud": ("alert_precision", "recall", "alert_rate", "false_positive_rate", "block_rate"),
                  "recs": ("ctr", "purchase_rate")}
RECS_OUTCOMES = {"clicked": ("click", "add_to_cart", "purchase"), "purchased": ("purchase",)}  # outcome -> kinds
# fraud: durations per enrolled decision (metric -> the histogram's measure)
DURATIONS = {"decision_latency_ms": "latency", "model_ms": "model"}
HIGHER_IS_WORSE = {"alert_rate", "false_positive_rate", "block_rate",  # analysts' load, customers bothered
                   *DURATIONS}


def variant_durations(enrolled: list[dict[str, Any]], keys: KeySpace, log_key: str, latency_s: float | None,
                      model_s: float) -> list[tuple[str, str, str]]:
    """One enrolled decision's histogram counts, (hash, field, its log's key), for the delivery call to add with
    the log's first write (:class:`~kestrel.streams.worker.delivery.Logs`).

    >>> variant_durations([{"experiment": "x", "variant": "b"}], KeySpace("k"), "k:d:e1", 0.012, 0.0003)
    [('k:exp:durations:x', 'latency|b|55', 'k:d:e1'), ('k:exp:durations:x', 'model|b|33', 'k:d:e1')]
    """
    out = []
    for entry in enrolled:
        hist = keys.experiments.durations(entry["experiment"])
        if latency_s is not None:
            out.append((hist, f"latency|{entry['variant']}|{duration_bucket(max(latency_s, 0.0))}", log_key))
        out.append((hist, f"model|{entry['variant']}|{duration_bucket(model_s)}", log_key))
    return out


def duration_histograms(raw: dict[bytes, bytes]) -> dict[str, dict[str, dict[int, int]]]:
    """The durations hash read back: measure -> variant -> bucket -> count.

    >>> duration_histograms({b"latency|b|55": b"3", b"model|b|33": b"3"})["latency"]
    {'b': {55: 3}}
    """
    out: dict[str, dict[str, dict[int, int]]] = {}
    for name, count in raw.items():
        measure, variant, bucket = name.decode().split("|")
        out.setdefault(measure, {}).setdefault(variant, {})[int(bucket)] = int(count)
    return out


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
            alpha: float = 0.05, per_unit: dict[str, list[tuple[float, float]]] | None = None,
            durations: dict[str, dict[str, dict[int, int]]] | None = None) -> dict[str, Any]:
    """The report of one experiment from its per-variant numbers (pure).

    ``per_unit`` (recs): each variant's units as (outcome on the primary
    metric, pre-period covariate): the comparisons then also carry the
    CUPED-adjusted interval (:func:`cuped_comparisons`). ``durations``
    (fraud): the histograms of :func:`duration_histograms`, summarised per
    variant and usable as guardrails.
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
    summaries = {metric: {k: duration_summary(durations.get(measure, {}).get(k, {})) for k in keys}
                 for metric, measure in DURATIONS.items()} if durations is not None else {}
    for timed, by in summaries.items():
        for k in keys:
            summary = by[k]
            per_variant[k][timed] = {n: summary[n] for n in ("n", "mean_ms", "p50_ms", "p99_ms")} \
                if summary else None
    guardrails = {g: {k: compare(counts, keys[0], k, g, alpha) for k in keys[1:]}
                  for g in experiment.guardrail_metrics if g in names}
    guardrails.update({g: {k: compare_durations(summaries[g], keys[0], k, g, alpha) for k in keys[1:]}
                       for g in experiment.guardrail_metrics if g in summaries})
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


def compare_durations(summaries: dict[str, dict[str, float] | None], control: str, variant: str, metric: str,
                      alpha: float) -> dict[str, Any]:
    """``variant`` minus ``control`` on a mean duration (ms), with the always-valid interval and a verdict.

    >>> from kestrel.models.experiment_stats import duration_bucket as b
    >>> fast, slow = {b(0.001): 400, b(0.002): 400}, {b(0.004): 400, b(0.008): 400}
    >>> out = compare_durations({"a": duration_summary(fast), "b": duration_summary(slow)}, "a", "b", "model_ms", 0.05)
    >>> out["decision"], out["verdict"].split(" by ")[0]
    ('stop', 'B is worse on model ms')
    """
    a, b = summaries.get(control), summaries.get(variant)
    na, nb = (a or {}).get("n", 0), (b or {}).get("n", 0)
    if a is None or b is None or min(na, nb) < MIN_DENOMINATOR:
        return {"note": f"{metric} needs {MIN_DENOMINATOR}+ enrolled decisions in both variants "
                        f"(control {na}, {variant} {nb})"}
    lo, hi = confidence_sequence(b["mean_ms"], a["mean_ms"], b["var_ms2"], a["var_ms2"], nb, na, alpha)
    said = verdict(metric.replace("_", " "), lo, hi, a["mean_ms"] or 1.0, higher_is_better=False)
    return {"difference": round(b["mean_ms"] - a["mean_ms"], 4), "ci": [round(lo, 4), round(hi, 4)],
            "verdict": said.text, "decision": said.decision}


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
    durations = duration_histograms(client.hgetall(k.durations(experiment.key)))
    return analyse(experiment, units, variant_counts(outcomes, variants),  # type: ignore[arg-type]
                   durations=durations)
