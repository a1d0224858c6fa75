"""The tree member's node-array walk against scikit-learn's own predictions, its storage and its reasons."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.ensemble import HistGradientBoostingClassifier

from kestrel.models.fraud_trees import TREE_SETTINGS, TreeEnsemble, fit_trees, from_sklearn


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(4000, 6))
    x[:, 5] = rng.integers(0, 4, 4000)  # a few distinct values: ties with thresholds
    y = ((x[:, 0] + x[:, 1] * x[:, 2] + 0.5 * x[:, 5] + rng.normal(0, 0.7, 4000)) > 2.0).astype(int)
    return x, y


@pytest.fixture(scope="module")
def fitted(data: tuple[np.ndarray, np.ndarray]) -> tuple[HistGradientBoostingClassifier, TreeEnsemble]:
    x, y = data
    clf = HistGradientBoostingClassifier(**TREE_SETTINGS, early_stopping=False, random_state=0).fit(x, y)
    return clf, from_sklearn(clf, x.shape[1])


def test_the_walk_gives_scikit_learns_log_odds(data, fitted) -> None:
    x, _ = data
    clf, trees = fitted
    probe = np.vstack([x[:500], x[:50, :] + 1e-12])  # values a hair off a split
    assert trees.depth <= TREE_SETTINGS["max_depth"]
    np.testing.assert_allclose(trees.log_odds(probe), clf.decision_function(probe), rtol=0, atol=1e-9)


def test_missing_values_go_where_scikit_learn_sends_them(data) -> None:
    x, y = data
    holes = x.copy()
    holes[::7, 0] = np.nan
    holes[::5, 2] = np.nan
    clf = HistGradientBoostingClassifier(max_iter=30, early_stopping=False, random_state=0).fit(holes, y)
    trees = from_sklearn(clf, x.shape[1])
    np.testing.assert_allclose(trees.log_odds(holes[:400]), clf.decision_function(holes[:400]), atol=1e-9)


def test_contributions_add_up_and_name_the_features_that_matter(data, fitted) -> None:
    x, _ = data
    _, trees = fitted
    z, contrib = trees.log_odds_and_contributions(x[:300])
    np.testing.assert_allclose(contrib.sum(axis=1), z - trees.expected_log_odds, atol=1e-9)
    weight = np.abs(contrib).mean(axis=0)
    assert set(np.argsort(-weight)[:3]) >= {0, 1}  # the label depends on features 0, 1, 2 and 5
    assert weight[3] < weight[0] / 5 and weight[4] < weight[0] / 5  # features 3 and 4 are noise


def test_bytes_round_trip_without_pickle(data, fitted) -> None:
    x, _ = data
    _, trees = fitted
    blob = trees.to_bytes()
    again = TreeEnsemble.from_bytes(blob)
    np.testing.assert_array_equal(again.log_odds(x[:200]), trees.log_odds(x[:200]))
    assert b"pickle" not in blob[:2000] and again.depth == trees.depth


def test_arrays_that_are_not_trees_are_refused(fitted) -> None:
    _, trees = fitted
    loop = trees.left.copy()
    inner = np.flatnonzero(loop >= 0)
    loop[inner[1]] = 0  # a child pointing back at the first root
    with pytest.raises(ValueError, match="not trees"):
        TreeEnsemble(trees.feature, trees.threshold, trees.missing_left, loop, trees.right, trees.value, trees.roots,
                     trees.base, trees.n_features, trees.depth)
    far = trees.feature.copy()
    far[inner[0]] = 99
    with pytest.raises(ValueError, match="outside"):
        TreeEnsemble(far, trees.threshold, trees.missing_left, trees.left, trees.right, trees.value, trees.roots,
                     trees.base, trees.n_features, trees.depth)


def test_the_torch_walk_matches_the_numpy_walk(data) -> None:
    x, y = data
    holes = x.copy()
    holes[::9, 1] = np.nan
    trees = fit_trees(holes, y, max_iter=25)
    expected = trees.leaves(holes[:300])
    trees.to(torch.device("cpu"))  # the GPU's code path, run on the CPU
    np.testing.assert_array_equal(trees.leaves(holes[:300]), expected)
    trees.to(None)
    np.testing.assert_array_equal(trees.leaves(holes[:300]), expected)
