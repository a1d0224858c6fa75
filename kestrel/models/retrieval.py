"""FAISS retrieval over item vectors, with an index that is swapped whole, never edited in place.

The index type follows the catalog: exact (flat inner product) for small
catalogs, IVF or HNSW (whichever reaches the recall target) for large ones, with the search
breadth (``efSearch`` / ``nprobe``) raised until recall@k against exact search
on a sample of queries reaches the target: the choice is measured, not assumed.

Serving reads ``IndexHolder.current`` once per request and searches that
snapshot: a new model or new items build a new snapshot aside (no lock held,
queries keep running on the old one) and one reference assignment swaps it
in. A query therefore sees either the old or the new index, never a
half-built one, and no lock is held during a search.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from kestrel.models.device import faiss_gpu_available

EXACT_MAX_ITEMS = 20_000  # below this, brute force is both exact and fast (<0.5 ms for 64-d)
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
EF_SEARCH_STEPS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512)
NPROBE_STEPS = (4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class IndexSnapshot:
    """An immutable, fully built index with the ids of its rows; safe to search from many threads."""

    index: Any
    item_ids: np.ndarray  # row -> item id (object array of str)
    vectors: np.ndarray  # row -> the vector, kept for re-ranking and rebuilding with new items
    version: str
    kind: str  # "flat" | "hnsw" | "ivf"
    search_params: Any = None
    measured_recall: float | None = None
    build_s: float = 0.0
    gpu: bool = False
    extra: Any = None  # what must change together with the index (serving: the model of the same version)
    mips_norm: float | None = None  # set when inner product was turned into L2 (see ``_mips_to_l2``)
    row_of: dict[str, int] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not self.row_of:
            object.__setattr__(self, "row_of", {str(i): r for r, i in enumerate(self.item_ids)})

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and row numbers (-1 where fewer than ``k`` rows exist), best first."""
        return self.search_with(queries, k, self.search_params)

    def search_with(self, queries: np.ndarray, k: int, params: Any = None) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        k = max(1, min(k, self.size))
        if self.mips_norm is None:
            return self.index.search(q, k, params=params) if params is not None else self.index.search(q, k)
        q_aug = np.hstack([q, np.zeros((len(q), 1), dtype=np.float32)])
        dist, rows = self.index.search(q_aug, k, params=params) if params is not None else self.index.search(q_aug, k)
        # ||q' - x'||^2 = ||q||^2 + M^2 - 2 q.x: back to inner-product scores, same order
        scores = (np.sum(q * q, axis=1, keepdims=True) + self.mips_norm ** 2 - dist) / 2
        return scores.astype(np.float32), rows


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int, chunk: int = 262_144) -> np.ndarray:
    """Row numbers of the exact inner-product top ``k`` (numpy, chunked): the recall yardstick."""
    best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(vectors), chunk):
        scores = queries @ vectors[start:start + chunk].T
        kk = min(k, scores.shape[1])
        part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        best_s = np.concatenate([best_s, np.take_along_axis(scores, part, 1)], axis=1)
        best_i = np.concatenate([best_i, part + start], axis=1)
        keep = np.argsort(-best_s, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    return best_i


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Share of the exact top-k that the approximate search returned."""
    hits = sum(len(set(f[f >= 0].tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True))
    return hits / max(truth.size, 1)


def _mips_to_l2(vectors: np.ndarray) -> tuple[np.ndarray, float]:
    """Append ``sqrt(M^2 - |x|^2)``: nearest in L2 (query padded with 0) is then largest inner product.

    Item vectors carry a bias dimension, so their norms differ and inner product is not a metric; HNSW
    graphs are built for metrics and lose recall on raw inner product (Bachrach et al., 2014).
    """
    norms2 = np.sum(vectors.astype(np.float64) ** 2, axis=1)
    m2 = float(norms2.max())
    extra = np.sqrt(np.maximum(m2 - norms2, 0.0)).astype(np.float32)[:, None]
    return np.ascontiguousarray(np.hstack([vectors, extra])), float(np.sqrt(m2))


def _sample_queries(vectors: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Stand-in queries when the caller has none: perturbed item vectors, re-normalised."""
    picks = vectors[rng.integers(0, len(vectors), n)]
    q = picks + rng.normal(0, 0.3 * float(np.abs(picks).mean() + 1e-6), picks.shape).astype(np.float32)
    return (q / np.linalg.norm(q, axis=1, keepdims=True).clip(1e-9)).astype(np.float32)


def build_snapshot(item_ids: Sequence[str] | np.ndarray, vectors: np.ndarray, version: str, *,
                   kind: str = "auto", k: int = 20, target_recall: float = 0.97,
                   queries: np.ndarray | None = None, use_gpu: bool | None = None,
                   seed: int = 0) -> IndexSnapshot:
    """Build a complete index aside (nothing is swapped here); ``kind``: auto | flat | hnsw | ivf.

    ``auto``: exact up to ``EXACT_MAX_ITEMS``; above, IVF first (it builds in seconds, and on clustered
    catalogs, where many items are near-duplicates, it keeps recall that HNSW loses); when IVF does
    not reach ``target_recall`` even at the widest ``nprobe``, HNSW is built too and the better
    measured recall wins. On a GPU the IVF index is a GPU index and is kept (faiss has no GPU HNSW).
    """
    n = len(vectors)
    if kind == "auto" and n > EXACT_MAX_ITEMS:
        build = {"k": k, "target_recall": target_recall, "queries": queries, "use_gpu": use_gpu, "seed": seed}
        ivf = build_snapshot(item_ids, vectors, version, kind="ivf", **build)
        if (ivf.measured_recall is not None and ivf.measured_recall >= target_recall) or ivf.gpu:
            return ivf
        hnsw = build_snapshot(item_ids, vectors, version, kind="hnsw", **build)
        return hnsw if (hnsw.measured_recall or 0.0) > (ivf.measured_recall or 0.0) else ivf
    started = time.perf_counter()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.asarray(list(item_ids), dtype=object)
    n, dim = vectors.shape
    gpu = faiss_gpu_available() if use_gpu is None else use_gpu
    if kind == "auto":
        kind = "flat"
    rng = np.random.default_rng(seed)
    params: Any = None
    if kind == "flat":
        index: Any = faiss.IndexFlatIP(dim)
        if gpu:
            index = faiss.index_cpu_to_all_gpus(index)
        index.add(vectors)
        snap = IndexSnapshot(index, ids, vectors, version, kind, None, 1.0, gpu=gpu)
        return _with_time(snap, started)
    sample = queries if queries is not None else _sample_queries(vectors, min(500, n), rng)
    sample = np.ascontiguousarray(sample[:500], dtype=np.float32)
    truth = exact_top_k(vectors, sample, min(k, n))
    mips_norm = None
    if kind == "hnsw":
        augmented, mips_norm = _mips_to_l2(vectors)
        index = faiss.IndexHNSWFlat(dim + 1, HNSW_M)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.add(augmented)
        steps = [faiss.SearchParametersHNSW(efSearch=max(ef, k)) for ef in EF_SEARCH_STEPS]
    elif kind == "ivf":
        nlist = int(max(16, min(4 * np.sqrt(n), n // 39)))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        if gpu:
            index = faiss.index_cpu_to_all_gpus(index)
        train = vectors[rng.choice(n, min(n, nlist * 64), replace=False)]
        index.train(train)
        index.add(vectors)
        steps = [faiss.SearchParametersIVF(nprobe=min(p, nlist)) for p in NPROBE_STEPS]
    else:
        raise ValueError(f"unknown index kind {kind!r}")
    snap = IndexSnapshot(index, ids, vectors, version, kind, None, 0.0, gpu=gpu, mips_norm=mips_norm)
    recall = 0.0
    for params in steps:  # the cheapest breadth that reaches the target on the sample
        _, found = snap.search_with(sample, min(k, n), params)
        recall = recall_at_k(found, truth)
        if recall >= target_recall:
            break
    object.__setattr__(snap, "search_params", params)
    object.__setattr__(snap, "measured_recall", recall)
    return _with_time(snap, started)


def _with_time(snap: IndexSnapshot, started: float) -> IndexSnapshot:
    object.__setattr__(snap, "build_s", time.perf_counter() - started)
    return snap


def with_items(snap: IndexSnapshot, new_ids: Sequence[str], new_vectors: np.ndarray, version: str | None = None,
               **build: Any) -> IndexSnapshot:
    """A new snapshot holding ``snap``'s items plus new ones (replacing the vectors of ids it already has)."""
    new_vectors = np.asarray(new_vectors, dtype=np.float32)
    keep = np.ones(len(snap.item_ids), dtype=bool)
    for item in new_ids:
        row = snap.row_of.get(str(item))
        if row is not None:
            keep[row] = False
    ids = np.concatenate([snap.item_ids[keep], np.asarray(list(new_ids), dtype=object)])
    vectors = np.concatenate([snap.vectors[keep], new_vectors])
    return build_snapshot(ids, vectors, version or snap.version, use_gpu=snap.gpu, **build)


class IndexHolder:
    """The one live snapshot; readers take ``current`` without a lock, writers swap a complete one in."""

    def __init__(self, snapshot: IndexSnapshot | None = None) -> None:
        self._current = snapshot
        self._swap_lock = threading.Lock()  # serialises writers only; readers never take it
        self.swaps = 0

    @property
    def current(self) -> IndexSnapshot | None:
        return self._current

    def swap(self, snapshot: IndexSnapshot) -> IndexSnapshot | None:
        """Make ``snapshot`` live (one reference assignment: atomic under the GIL); returns the old one."""
        if snapshot.size != len(snapshot.item_ids):
            raise ValueError("refusing to swap in an index whose rows and ids differ")
        with self._swap_lock:
            old, self._current = self._current, snapshot
            self.swaps += 1
        return old

    def search(self, queries: np.ndarray, k: int) -> tuple[IndexSnapshot, np.ndarray, np.ndarray]:
        """Search whatever snapshot is live now; returns it too so ids are read from the same one."""
        snap = self._current
        if snap is None:
            raise LookupError("no index loaded")
        scores, rows = snap.search(queries, k)
        return snap, scores, rows
