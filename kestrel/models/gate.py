"""The evaluation gate: may a candidate replace the champion? Pure functions of both versions' numbers.

Both are measured on the same window (the candidate's held-out window, which
neither trained on; :mod:`kestrel.offline.fraud_registry`). The candidate
passes when it beats the champion on the primary metric by the margins,
absolute and relative, and regresses no guardrail beyond its slack; every
check is returned with its numbers, so a refusal says why and can be
audited as it is.

>>> policy = GatePolicy.for_kind("fraud")
>>> champion = {"average_precision": 0.60, "score_p99_ms": 4.0, "calibration_error": 0.010, "alert_rate": 0.010}
>>> judge({**champion, "average_precision": 0.64}, champion, policy).passed
True
>>> d = judge({**champion, "average_precision": 0.64, "score_p99_ms": 12.0}, champion, policy)
>>> d.passed, d.reasons
(False, ['score_p99_ms regressed: 12 against 4 (allowed up to 6)'])
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class Guardrail:
    """A metric the candidate must not make worse than the champion by more than its slack.

    The slack is the larger of ``abs_slack`` and ``rel_slack`` times the
    champion's value: a guardrail near zero (a calibration error of 0.001)
    is not failed by noise, and a large one scales.
    """

    metric: str
    higher_is_worse: bool = True
    abs_slack: float = 0.0
    rel_slack: float = 0.0

    def allowed(self, champion: float) -> float:
        slack = max(self.abs_slack, self.rel_slack * abs(champion))
        return champion + slack if self.higher_is_worse else champion - slack


@dataclass(frozen=True)
class GatePolicy:
    """What the candidate must do: beat ``primary`` by both margins, and keep every guardrail."""

    primary: str
    min_gain_abs: float = 0.0
    min_gain_rel: float = 0.0
    guardrails: tuple[Guardrail, ...] = field(default_factory=tuple)

    @staticmethod
    def for_kind(kind: str, **overrides: Any) -> GatePolicy:
        """The shipped policy of a model kind; ``overrides`` change the margins (``min_gain_abs=...``)."""
        if kind == "fraud":
            policy = GatePolicy("average_precision", min_gain_abs=0.002, min_gain_rel=0.0, guardrails=(
                Guardrail("score_p99_ms", abs_slack=2.0, rel_slack=0.5),      # the worker's decision budget
                Guardrail("calibration_error", abs_slack=0.01),               # scores read as probabilities
                Guardrail("alert_rate", abs_slack=0.002, rel_slack=0.25),     # the analysts' queue
            ))
        elif kind == "recs":
            policy = GatePolicy("recall_at_20", min_gain_abs=0.002, min_gain_rel=0.0, guardrails=(
                Guardrail("p99_ms", abs_slack=2.0, rel_slack=0.5),
            ))
        else:
            raise ValueError(f"no gate policy for model kind {kind!r}")
        return replace(policy, **overrides)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reasons: list[str]  # why it failed (empty when it passed)
    checks: list[dict[str, Any]]  # every check, with the numbers it compared

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def judge(candidate: Mapping[str, float], champion: Mapping[str, float] | None, policy: GatePolicy) -> GateDecision:
    """The gate's decision for ``candidate`` against ``champion`` (None: there is no champion yet).

    A metric the candidate lacks, or that is not a finite number, fails its
    check: the gate never passes on missing evidence. A guardrail the
    champion lacks is skipped (it was not measured then) and says so.
    """
    checks: list[dict[str, Any]] = []
    reasons: list[str] = []
    cand = candidate.get(policy.primary)
    if cand is None or not math.isfinite(cand):
        reasons.append(f"the candidate has no {policy.primary}")
        return GateDecision(False, reasons, checks)
    if champion is None:
        checks.append({"check": policy.primary, "candidate": cand, "champion": None, "passed": True,
                       "note": "no champion yet: the first version passes"})
        return GateDecision(True, [], checks)
    champ = champion.get(policy.primary)
    if champ is None or not math.isfinite(champ):
        reasons.append(f"the champion has no {policy.primary} on this window: evaluate it first")
        return GateDecision(False, reasons, checks)
    gain = cand - champ
    rel = gain / abs(champ) if champ else math.inf if gain > 0 else 0.0
    ok = gain > 0 and gain >= policy.min_gain_abs and rel >= policy.min_gain_rel
    checks.append({"check": policy.primary, "candidate": cand, "champion": champ, "gain": round(gain, 6),
                   "relative_gain": round(rel, 6) if math.isfinite(rel) else None,
                   "min_gain_abs": policy.min_gain_abs, "min_gain_rel": policy.min_gain_rel, "passed": ok})
    if not ok:
        reasons.append(f"{policy.primary} gain {gain:+.4f} ({rel:+.1%}) is below the margin "
                       f"(+{policy.min_gain_abs:g} and +{policy.min_gain_rel:.1%})")
    for g in policy.guardrails:
        c, h = candidate.get(g.metric), champion.get(g.metric)
        if h is None or not math.isfinite(h):
            checks.append({"check": g.metric, "candidate": c, "champion": h, "passed": True,
                           "note": "not measured for the champion: skipped"})
            continue
        limit = g.allowed(h)
        ok = c is not None and math.isfinite(c) and (c <= limit if g.higher_is_worse else c >= limit)
        checks.append({"check": g.metric, "candidate": c, "champion": h, "limit": round(limit, 6), "passed": ok})
        if not ok:
            reasons.append(f"{g.metric} not measured for the candidate" if c is None or not math.isfinite(c)
                           else f"{g.metric} regressed: {_fmt(c)} against {_fmt(h)} (allowed "
                                f"{'up to' if g.higher_is_worse else 'down to'} {_fmt(limit)})")
    return GateDecision(not reasons, reasons, checks)
