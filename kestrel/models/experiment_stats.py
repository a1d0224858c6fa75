"""Experiment statistics an operator can look at every hour: always-valid intervals, SRM, CUPED (issue 15).

Pure functions of per-variant sums, vectorised so that thousands of
simulated experiments run in seconds.

- :func:`confidence_sequence`: the asymptotic normal-mixture confidence
  sequence for a difference of means (Howard, Ramdas, McAuliffe and Sekhon;
  Waudby-Smith et al.'s time-uniform CLT), as GrowthBook's sequential
  engine computes it: a half-width that holds at every sample size at once,
  so peeking after every batch does not inflate false positives. ``tuning``
  is the sample size at which it is tightest (GrowthBook's default 5,000).
- :func:`fixed_horizon_interval`: the ordinary z interval, valid at one
  pre-set sample size only (what peeking breaks; the simulation shows it).
- :func:`srm_p_value`: chi-square test of the delivered split against the
  configured weights (flag at p < 0.001).
- :func:`cuped`: variance reduction with a pre-period covariate.
- :func:`duration_bucket` and :func:`duration_summary`: durations (decision
  latency, model time) kept as log-spaced histograms, so a variant's latency
  is a few counters, not a list of every payment's.

>>> args = (0.12, 0.10, 0.12 * 0.88, 0.10 * 0.90, 20_000, 20_000)  # 12% against 10%, 20,000 units each
>>> [round(v, 4) for v in confidence_sequence(*args)], [round(float(v), 4) for v in fixed_horizon_interval(*args)]
([0.01, 0.03], [0.0139, 0.0261])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

TUNING = 5000.0


def _rho(alpha: float, tuning: float) -> float:
    """The mixture's spread, chosen so the sequence is tightest at ``tuning`` samples."""
    return math.sqrt((-2.0 * math.log(alpha) + math.log(-2.0 * math.log(alpha) + 1.0)) / tuning)


def cs_half_width(variance_per_unit: np.ndarray | float, n: np.ndarray | float, alpha: float = 0.05,
                  tuning: float = TUNING) -> np.ndarray | float:
    """Half-width of the always-valid interval of an estimate whose variance is ``variance_per_unit / n``."""
    rho2 = _rho(alpha, tuning) ** 2
    n = np.asarray(n, dtype=float)
    return np.sqrt(variance_per_unit) * np.sqrt(2.0 * (n * rho2 + 1.0) / (n * n * rho2)
                                                * np.log(np.sqrt(n * rho2 + 1.0) / alpha))


def _diff_variance(var_b: np.ndarray | float, var_a: np.ndarray | float, n_b: np.ndarray | float,
                   n_a: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """(variance of mean_b - mean_a, total n): the variance per unit is that times n."""
    n_b, n_a = np.asarray(n_b, dtype=float), np.asarray(n_a, dtype=float)
    return np.asarray(var_b) / n_b + np.asarray(var_a) / n_a, n_a + n_b


def confidence_sequence(mean_b: float, mean_a: float, var_b: float, var_a: float, n_b: float, n_a: float,
                        alpha: float = 0.05, tuning: float = TUNING) -> tuple[float, float]:
    """Always-valid interval for ``mean_b - mean_a``."""
    v, n = _diff_variance(var_b, var_a, n_b, n_a)
    half = float(cs_half_width(v * n, n, alpha, tuning))
    d = mean_b - mean_a
    return d - half, d + half


def fixed_horizon_interval(mean_b: float, mean_a: float, var_b: float, var_a: float, n_b: float, n_a: float,
                           alpha: float = 0.05) -> tuple[float, float]:
    """The z interval for ``mean_b - mean_a``, valid at a sample size fixed in advance."""
    v, _ = _diff_variance(var_b, var_a, n_b, n_a)
    half = float(stats.norm.ppf(1 - alpha / 2)) * math.sqrt(float(v))
    d = mean_b - mean_a
    return d - half, d + half


def srm_p_value(counts: Sequence[int], weights: Sequence[float]) -> float:
    """p-value of the delivered counts under the configured weights (sample-ratio mismatch).

    >>> srm_p_value([5000, 5000], [0.5, 0.5]), srm_p_value([5200, 4800], [0.5, 0.5]) < 0.001
    (1.0, True)
    """
    total = sum(counts)
    expected = [total * w / sum(weights) for w in weights]
    return float(stats.chisquare(counts, expected).pvalue)


def cuped(y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, float]:
    """``y`` adjusted by the pre-period covariate ``x`` (theta = cov / var), and the variance reduction."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    vx = x.var()
    if vx == 0:
        return y, 0.0
    theta = np.cov(y, x, bias=True)[0, 1] / vx
    adjusted = y - theta * (x - x.mean())
    return adjusted, float(1.0 - adjusted.var() / y.var()) if y.var() > 0 else 0.0


BUCKETS_PER_DOUBLING = 4  # bucket edges 2^(b/4) µs apart: 19% wide, quantiles within that


def duration_bucket(seconds: float) -> int:
    """The histogram bucket of a duration: ``b`` holds (2^((b-1)/4), 2^(b/4)] µs; 0 holds 1 µs and less.

    >>> duration_bucket(0.0), duration_bucket(1e-6), duration_bucket(0.001), duration_bucket(0.0011)
    (0, 0, 40, 41)
    """
    us = seconds * 1e6
    return 0 if us <= 1.0 else math.ceil(BUCKETS_PER_DOUBLING * math.log2(us) - 1e-9)


def duration_summary(histogram: dict[int, int]) -> dict[str, float] | None:
    """Count, mean, variance (ms, from the buckets' geometric midpoints), p50 and p99 (upper edges, ms).

    >>> h = {duration_bucket(0.010): 90, duration_bucket(0.100): 10}  # 90 decisions in 10 ms, 10 in 100 ms
    >>> s = duration_summary(h)
    >>> s["n"], s["p50_ms"], s["p99_ms"], round(s["mean_ms"], 1)  # upper edges: up to 19% above the truth
    (100, 11.585, 110.218, 19.7)
    """
    counts = sorted((b, n) for b, n in histogram.items() if n > 0)
    total = sum(n for _, n in counts)
    if not total:
        return None
    upper = [2 ** (b / BUCKETS_PER_DOUBLING) / 1000 for b, _ in counts]
    mid = [u * 2 ** (-0.5 / BUCKETS_PER_DOUBLING) if b > 0 else u for (b, _), u in zip(counts, upper, strict=True)]
    n = np.array([c for _, c in counts], dtype=float)
    mean = float((n * mid).sum() / total)
    var = float((n * (np.array(mid) - mean) ** 2).sum() / total)

    def quantile(q: float) -> float:
        seen = np.cumsum(n)
        return round(upper[int(np.searchsorted(seen, q * total - 1e-9))], 3)

    return {"n": total, "mean_ms": round(mean, 4), "var_ms2": var, "p50_ms": quantile(0.5),
            "p99_ms": quantile(0.99)}


@dataclass(frozen=True)
class Verdict:
    text: str
    decision: str  # "ship", "stop", "keep running"


def verdict(metric: str, lo: float, hi: float, baseline: float, higher_is_better: bool = True) -> Verdict:
    """A plain-language reading of an always-valid interval for B minus A.

    >>> verdict("CTR", 0.01, 0.03, 0.10).text
    'B is better on CTR by +20.0% [+10.0%, +30.0%]: ship'
    """
    mid = (lo + hi) / 2
    rel = (lambda v: f"{v / baseline:+.1%}") if baseline else (lambda v: f"{v:+.4g}")
    span = f"{rel(mid)} [{rel(lo)}, {rel(hi)}]"
    better = lo > 0 if higher_is_better else hi < 0
    worse = hi < 0 if higher_is_better else lo > 0
    if better:
        return Verdict(f"B is better on {metric} by {span}: ship", "ship")
    if worse:
        return Verdict(f"B is worse on {metric} by {span}: stop", "stop")
    return Verdict(f"no difference on {metric} yet ({span}): keep running", "keep running")


def simulate(runs: int = 1000, units: int = 20_000, look_every: int = 1000, base_rate: float = 0.10,
             effect: float = 0.02, alpha: float = 0.05, seed: int = 0) -> dict[str, float | int]:
    """A/A, A/B and broken-split experiments through the statistics above, with a look every ``look_every``.

    A/A: both variants convert at ``base_rate``; a run is a false positive
    if at any look the interval excludes zero (always-valid sequence), or
    the fixed-horizon z-test rejects (naive peeking, for comparison). A/B:
    B converts at ``base_rate + effect``; power is the share of runs whose
    sequence excludes zero by the last look. SRM: configured 50/50,
    delivered 52/48; the share flagged at p < 0.001 at the end.
    """
    rng = np.random.default_rng(seed)
    looks = np.arange(look_every, units + 1, look_every)

    def cumulative(rate_a: float, rate_b: float, share_b: float = 0.5) -> tuple[np.ndarray, ...]:
        n_b = rng.binomial(look_every, share_b, (runs, len(looks))).cumsum(axis=1)
        n_a = looks[None, :] - n_b
        inc_b = rng.binomial(np.diff(np.concatenate([np.zeros((runs, 1), int), n_b], axis=1), axis=1), rate_b)
        inc_a = rng.binomial(np.diff(np.concatenate([np.zeros((runs, 1), int), n_a], axis=1), axis=1), rate_a)
        return n_a, n_b, inc_a.cumsum(axis=1), inc_b.cumsum(axis=1)

    def rejections(n_a: np.ndarray, n_b: np.ndarray, s_a: np.ndarray, s_b: np.ndarray) -> tuple[np.ndarray, ...]:
        m_a, m_b = s_a / n_a, s_b / n_b
        v, n = _diff_variance(m_b * (1 - m_b), m_a * (1 - m_a), n_b, n_a)
        d = m_b - m_a
        sequential = np.abs(d) > cs_half_width(v * n, n, alpha)
        naive = np.abs(d) > stats.norm.ppf(1 - alpha / 2) * np.sqrt(v)
        return sequential, naive

    aa_seq, aa_naive = rejections(*cumulative(base_rate, base_rate))
    ab_seq, _ = rejections(*cumulative(base_rate, base_rate + effect))
    n_a, n_b, _, _ = cumulative(base_rate, base_rate, share_b=0.48)
    srm = [srm_p_value([int(a), int(b)], [0.5, 0.5]) < 0.001 for a, b in zip(n_a[:, -1], n_b[:, -1], strict=True)]
    return {"aa_runs": runs, "aa_false_positive_rate": round(float(aa_seq.any(axis=1).mean()), 4),
            "naive_peeking_false_positive_rate": round(float(aa_naive.any(axis=1).mean()), 4),
            "ab_runs": runs, "ab_power": round(float(ab_seq.any(axis=1).mean()), 4),
            "srm_runs": runs, "srm_detection_rate": round(float(np.mean(srm)), 4), "alpha": alpha,
            "units": units, "look_every": look_every, "base_rate": base_rate, "effect": effect}
