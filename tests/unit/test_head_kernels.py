"""Which sets the compiled head arithmetic runs, and that a kernel that cannot be built leaves the Python path."""

from __future__ import annotations

import logging

import pytest

from kestrel.feature_store import head_kernels
from kestrel.feature_store.definitions import FeatureSet, LastValue, TimeSince, Windowed
from kestrel.feature_store.head_state import HeadArithmetic
from kestrel.feature_store.redis_store import head_suffix


def _set(*features, name: str = "k") -> FeatureSet:
    return FeatureSet(name, "1", "card", "test", lambda e: e.card, lambda e: e.ts, features, buckets=False)


def _arith(fs: FeatureSet) -> HeadArithmetic:
    return HeadArithmetic(fs, head_suffix(fs))  # a fresh one: kernel_for remembers by identity


WINDOWS = (Windowed("n_10m", "count", 600, 60), Windowed("max_1h", "max", 3600, 300, value_of=lambda e: e.amount),
           TimeSince("since"), LastValue("prev", value_of=lambda e: e.terminal))


@pytest.mark.parametrize(("features", "runs_compiled"), [
    (WINDOWS, True),
    ((*WINDOWS, Windowed("terminals", "distinct", 3600, 300, value_of=lambda e: e.terminal)), False),  # sorted set
    ((Windowed("n_10m", "count", 600, 60, default=-1),), False),  # an int default: the Python path's type
    ((TimeSince("since"),), True),
])
def test_which_sets_run_compiled(features, runs_compiled):
    assert head_kernels.eligible(_arith(_set(*features))) is runs_compiled


def test_a_kernel_that_cannot_be_built_leaves_the_python_path(monkeypatch, caplog):
    def broken(source: str, name: str):
        raise RuntimeError("no compiler today")

    monkeypatch.setattr(head_kernels, "_compile", broken)
    with caplog.at_level(logging.ERROR, logger="kestrel.feature_store"):
        assert head_kernels.kernel_for(_arith(_set(*WINDOWS, name="broken"))) is None
    assert "runs in Python" in caplog.text


def test_kernels_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("KESTREL_HEAD_KERNELS", "0")
    assert head_kernels.prepare([_arith(_set(*WINDOWS, name="off"))]) == 0
