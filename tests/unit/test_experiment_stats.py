"""Experiment statistics: always-valid under peeking (simulated), SRM, CUPED, verdicts, against scipy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from kestrel.models.experiment_stats import (
    confidence_sequence,
    cs_half_width,
    cuped,
    fixed_horizon_interval,
    simulate,
    srm_p_value,
    verdict,
)


def test_peeking_after_every_batch_keeps_the_sequence_within_alpha_and_breaks_the_z_test():
    r = simulate(runs=400, units=10_000, look_every=500, seed=3)
    assert r["aa_false_positive_rate"] <= r["alpha"]  # always valid: peeking costs nothing
    assert r["naive_peeking_false_positive_rate"] > 2 * r["alpha"]  # the same looks with a z-test
    assert r["ab_power"] > 0.6 and r["srm_detection_rate"] > 0.7  # 10,000 units; 0.95 and 0.99 at 20,000


def test_the_sequence_covers_the_true_difference_at_every_look():
    rng = np.random.default_rng(5)
    runs, misses = 300, 0
    for _ in range(runs):
        a, b = rng.random(8000) < 0.10, rng.random(8000) < 0.13
        for n in range(500, 8001, 500):
            ma, mb = a[:n].mean(), b[:n].mean()
            lo, hi = confidence_sequence(mb, ma, mb * (1 - mb), ma * (1 - ma), n, n)
            if not lo <= 0.03 <= hi:
                misses += 1
                break
    assert misses / runs <= 0.05


def test_intervals_against_scipy_and_each_other():
    args = (0.52, 0.50, 0.25, 0.25, 10_000, 10_000)
    lo, hi = fixed_horizon_interval(*args)
    se = np.sqrt(0.25 / 10_000 * 2)
    assert (lo, hi) == pytest.approx((0.02 - stats.norm.ppf(0.975) * se, 0.02 + stats.norm.ppf(0.975) * se))
    cs_lo, cs_hi = confidence_sequence(*args)
    assert cs_lo < lo and cs_hi > hi  # the price of looking any time: wider than the fixed-horizon interval
    widths = cs_half_width(0.25, np.array([1e3, 1e4, 1e5, 1e6]))
    assert np.all(np.diff(widths) < 0)  # and it still shrinks as data comes


def test_srm_matches_the_chi_square_by_hand():
    counts, weights = [10_300, 9_700], [0.5, 0.5]
    expected = 10_000
    chi2 = sum((c - expected) ** 2 / expected for c in counts)
    assert srm_p_value(counts, weights) == pytest.approx(stats.chi2.sf(chi2, 1))
    assert srm_p_value([2000, 8000], [0.2, 0.8]) == pytest.approx(1.0)


def test_cuped_removes_the_variance_its_covariate_explains():
    rng = np.random.default_rng(2)
    pre = rng.normal(10, 3, 50_000)
    post = 0.8 * pre + rng.normal(0, 2, 50_000)
    adjusted, reduction = cuped(post, pre)
    r2 = np.corrcoef(post, pre)[0, 1] ** 2
    assert reduction == pytest.approx(r2, abs=0.01) and adjusted.mean() == pytest.approx(post.mean())
    assert cuped(post, np.ones(50_000))[1] == 0.0  # a constant covariate explains nothing


@pytest.mark.parametrize(("lo", "hi", "decision"), [(0.01, 0.03, "ship"), (-0.03, -0.01, "stop"),
                                                     (-0.01, 0.02, "keep running")])
def test_verdicts(lo, hi, decision):
    assert verdict("CTR", lo, hi, 0.10).decision == decision
    assert verdict("false-positive rate", -hi, -lo, 0.10, higher_is_better=False).decision == decision


def test_the_simulate_command_prints_one_json_line(capsys):
    import json

    from kestrel.streams.cli.main import main

    assert main(["experiments", "simulate", "--runs", "50", "--units", "4000", "--look-every", "500", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"aa_runs", "aa_false_positive_rate", "naive_peeking_false_positive_rate", "ab_runs", "ab_power",
            "srm_runs", "srm_detection_rate", "alpha"} <= set(out)
