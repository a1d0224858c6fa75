"""FAISS retrieval: index choice and measured recall, atomic swap under concurrent queries, diversity."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from kestrel.models.diversity import mmr
from kestrel.models.retrieval import IndexHolder, build_snapshot, exact_top_k, recall_at_k, with_items


def _vectors(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_small_catalog_is_exact_and_large_one_reaches_the_target_recall():
    v = _vectors(500)
    small = build_snapshot([f"i{j}" for j in range(500)], v, "v1")
    assert small.kind == "flat" and small.measured_recall == 1.0
    q = _vectors(20, seed=1)
    _, rows = small.search(q, 10)
    np.testing.assert_array_equal(np.sort(rows, axis=1), np.sort(exact_top_k(v, q, 10), axis=1))
    big = build_snapshot([f"i{j}" for j in range(3000)], _vectors(3000), "v1", kind="hnsw", target_recall=0.95)
    assert big.kind == "hnsw" and big.measured_recall >= 0.95
    _, rows = big.search(q, 20)
    assert recall_at_k(rows, exact_top_k(big.vectors, q, 20)) >= 0.85  # fresh queries, not the tuning sample


def test_auto_above_the_exact_limit_picks_an_approximate_index_that_reaches_the_target():
    snap = build_snapshot([f"i{j}" for j in range(25_000)], _vectors(25_000, seed=5), "v1", target_recall=0.9)
    assert snap.kind in ("ivf", "hnsw") and snap.measured_recall >= 0.9


def test_ivf_index_is_tuned_by_measured_recall_too():
    snap = build_snapshot([f"i{j}" for j in range(4000)], _vectors(4000), "v1", kind="ivf", target_recall=0.9)
    assert snap.kind == "ivf" and snap.measured_recall >= 0.9


def test_swap_under_concurrent_queries_never_shows_a_half_built_index():
    """Readers query while a writer swaps between two complete indexes; every answer is wholly one of them."""
    data = {"A": ([f"a{j}" for j in range(2000)], _vectors(2000, seed=2)),
            "B": ([f"b{j}" for j in range(3000)], _vectors(3000, seed=3))}
    holder = IndexHolder(build_snapshot(*data["A"], "A"))
    queries = _vectors(8, seed=4)
    stop = threading.Event()
    errors: list[BaseException] = []
    seen_versions: set[str] = set()

    def reader() -> None:
        try:
            while not stop.is_set():
                snap, _, rows = holder.search(queries, 20)
                ids = {str(snap.item_ids[r])[0] for r in rows.ravel()}
                assert (rows >= 0).all() and rows.shape == (8, 20)
                assert ids == {snap.version.lower()}, "ids from two indexes in one answer"
                seen_versions.add(snap.version)
        except BaseException as exc:  # reported to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(60):
        # Build aside while the readers keep querying the live index, then swap.
        version = "B" if i % 2 == 0 else "A"
        holder.swap(build_snapshot(*data[version], version))
        time.sleep(0.002)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert seen_versions == {"A", "B"}
    assert holder.swaps == 60


def test_new_items_arrive_through_a_new_snapshot_and_the_old_one_is_untouched():
    v = _vectors(100)
    old = build_snapshot([f"i{j}" for j in range(100)], v, "v1")
    extra = _vectors(5, seed=9)
    new = with_items(old, [f"n{j}" for j in range(5)] + ["i0"], np.vstack([extra, v[:1]]), "v1+6")
    assert old.size == 100 and new.size == 105
    _, rows = new.search(extra[:1], 1)
    assert new.item_ids[rows[0, 0]] == "n0"
    holder = IndexHolder(old)
    assert holder.swap(new) is old and holder.current is new


def test_swap_refuses_an_inconsistent_index():
    snap = build_snapshot(["a", "b"], _vectors(2), "v")
    broken = build_snapshot(["a", "b", "c"], _vectors(3), "v")
    object.__setattr__(broken, "item_ids", broken.item_ids[:2])
    with pytest.raises(ValueError):
        IndexHolder(snap).swap(broken)


def test_mmr_diversifies_and_caps_categories():
    v = np.array([[1, 0], [0.99, 0.14], [0.98, 0.2], [0, 1], [0.1, 0.99]], dtype=float)
    scores = np.array([0.95, 0.94, 0.93, 0.6, 0.55])
    assert mmr(scores, v, 3, lam=1.0) == [0, 1, 2]
    assert 3 in mmr(scores, v, 3, lam=0.5)
    cats = ["x", "x", "x", "y", "y"]
    picked = mmr(scores, v, 4, lam=1.0, categories=cats, max_per_category=2)
    assert picked == [0, 1, 3, 4]
    # Cap cannot be met: still returns k items.
    assert len(mmr(scores, v, 5, lam=1.0, categories=cats, max_per_category=1)) == 5
