"""Assignment against GrowthBook's published test vectors, plus our own table: stickiness, layers, split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kestrel.models.assignment import assign, bucket, bucket_ranges, choose_variation, equal_weights, in_namespace

CASES = json.loads((Path(__file__).parents[1] / "data" / "growthbook_cases.json").read_text())


@pytest.mark.parametrize(("seed", "value", "version", "expected"), CASES["hash"])
def test_hash_matches_growthbook(seed, value, version, expected):
    got = bucket(seed, value, version)
    assert got == expected if expected is None else got == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize(("name", "args", "expected"), CASES["getBucketRange"])
def test_bucket_ranges_match_growthbook(name, args, expected):
    got = bucket_ranges(*args)
    assert len(got) == len(expected), name
    for (lo, hi), (elo, ehi) in zip(got, expected, strict=True):
        assert lo == pytest.approx(elo, abs=1e-9) and hi == pytest.approx(ehi, abs=1e-9), name


@pytest.mark.parametrize(("name", "position", "ranges", "expected"), CASES["chooseVariation"])
def test_choose_variation_matches_growthbook(name, position, ranges, expected):
    assert choose_variation(position, ranges) == expected, name


@pytest.mark.parametrize(("name", "unit", "namespace", "expected"), CASES["inNamespace"])
def test_namespaces_match_growthbook(name, unit, namespace, expected):
    assert in_namespace(unit, namespace) is expected, name


@pytest.mark.parametrize(("n", "expected"), CASES["getEqualWeights"])
def test_equal_weights_match_growthbook(n, expected):
    assert equal_weights(n) == pytest.approx(expected, abs=1e-6)


def test_ramping_coverage_never_moves_an_enrolled_unit():
    units = [f"user-{i}" for i in range(5000)]
    weights = (0.2, 0.3, 0.5)
    before = {u: assign("exp-ramp", u, weights, coverage=0.1) for u in units}
    for coverage in (0.25, 0.5, 1.0):
        now = {u: assign("exp-ramp", u, weights, coverage=coverage) for u in units}
        assert all(now[u] == v for u, v in before.items() if v >= 0)  # enrolled units stay where they were
        before = now
    assert -1 not in before.values()  # full coverage enrols everyone


def test_splits_follow_weights_and_experiments_are_independent():
    units = [f"card-{i}" for i in range(20000)]
    a = [assign("exp-a", u, (0.5, 0.5)) for u in units]
    b = [assign("exp-b", u, (0.5, 0.5)) for u in units]
    assert abs(a.count(1) / len(units) - 0.5) < 0.015
    both = sum(1 for x, y in zip(a, b, strict=True) if x == 1 and y == 1) / len(units)
    assert abs(both - 0.25) < 0.015  # other seeds: independent assignments
    uneven = [assign("exp-c", u, (0.1, 0.9)) for u in units]
    assert abs(uneven.count(0) / len(units) - 0.1) < 0.01


def test_namespaces_make_experiments_mutually_exclusive():
    units = [f"user-{i}" for i in range(5000)]
    left = [assign("exp-1", u, (0.5, 0.5), namespace=("pricing", 0.0, 0.5)) for u in units]
    right = [assign("exp-2", u, (0.5, 0.5), namespace=("pricing", 0.5, 1.0)) for u in units]
    assert not any(x >= 0 and y >= 0 for x, y in zip(left, right, strict=True))
    assert abs(sum(x >= 0 for x in left) / len(units) - 0.5) < 0.03


def test_the_bucket_command_prints_growthbooks_hash(capsys):
    from kestrel.streams.cli.main import main

    assert main(["experiments", "bucket", "--seed", "foo", "--id", "def"]) == 0
    assert float(capsys.readouterr().out) == pytest.approx(0.2019)
