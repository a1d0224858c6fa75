"""The two-tower and EASE's item-item weights, blended per user: the hybrid recommender (issue 16).

Why a hybrid: the two-tower serves the session (a click moves the query) and
scales through FAISS; EASE (Steck, 2019) ranks a user's long-run history
better on rating logs. Neither wins everywhere, so the served ranking takes
candidates from both and mixes their scores:

* candidates: the two-tower's FAISS top ``pool`` and EASE's top ``pool``
  (EASE's score of an item is the sum of its weights from the user's
  history items: one sparse row per history item, so a catalogue of 100k
  items costs a few sparse rows, not an items x items product);
* both scores standardised over that union of candidates and mixed:
  ``(1 - weight) * z(tower) + weight * z(ease)``. ``weight`` 0 is the tower's
  order, 1 EASE's; it is chosen on a validation split by a fixed rule
  (``kestrel.offline.recs_hybrid``), never on the test split.

The weights keep each item's ``top_k`` largest EASE weights (a sparse
matrix aligned with the tower's item rows), so memory is items x top_k.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

ITEM_ITEM_FILE = "item_item.npz"
POOL = 200  # candidates taken from each part per user
SESSION_ITEMS = 3  # the newest items that make the session (as the tower pools its newest 3 apart)
# How much the session's rows weigh against the whole history's mean: a product setting, fixed on the
# development seed of simulated shoppers (seed 7) as the smallest of 0.1, 0.2, 0.3, 0.5 that lifts a rarely
# visited category to 30% of the top 10 after 3 clicks (docs/recommendations.md), then checked on fresh seeds.
SESSION_WEIGHT = 0.2


@dataclass(frozen=True)
class ItemItem:
    """EASE's item-item weights, sparse, and how they are blended with the tower."""

    weights: sp.csr_matrix  # row: a history item; columns: the items it recommends, with their weights
    weight: float  # the blend: 0 the tower alone, 1 EASE alone
    session_weight: float = SESSION_WEIGHT  # the newest items' rows again, this much against the history's mean

    @property
    def size(self) -> int:
        return int(self.weights.shape[0])

    def _mean_rows(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        w = self.weights
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        rows = rows[(rows >= 0) & (rows < w.shape[0])]
        if len(rows) == 0:
            return np.zeros(w.shape[1], dtype=np.float64)
        # the history rows' entries gathered in one step (their positions in the CSR arrays), then summed per item
        starts, lengths = w.indptr[rows], w.indptr[rows + 1] - w.indptr[rows]
        picks = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(int(lengths.sum()))
        return np.bincount(w.indices[picks], weights=w.data[picks], minlength=w.shape[1]) / len(rows)

    def scores(self, history: Sequence[int] | np.ndarray, session: Sequence[int] | np.ndarray = ()) -> np.ndarray:
        """EASE's score of every item (dense) for a user whose history is these item rows: the mean of their
        rows (EASE's x_u B up to scale, which the blend's standardising removes), plus ``session_weight`` times
        the mean of the ``session`` rows (the newest few), so that a short session moves the list as it moves
        the tower's query.

        >>> w = sp.csr_matrix(np.array([[0, 2, 1], [1, 0, 0], [0, 0, 0]], dtype=np.float32))
        >>> ItemItem(w, 0.5, session_weight=0.0).scores([0, 1]).tolist()
        [0.5, 1.0, 0.5]
        >>> ItemItem(w, 0.5, session_weight=2.0).scores([0, 1], session=[1]).tolist()
        [2.5, 1.0, 0.5]
        """
        out = self._mean_rows(history)
        if self.session_weight and len(session):
            out = out + self.session_weight * self._mean_rows(session)
        return out

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / ITEM_ITEM_FILE
        w = self.weights
        np.savez(path, data=w.data, indices=w.indices, indptr=w.indptr, shape=np.asarray(w.shape),
                 weight=np.asarray(self.weight), session_weight=np.asarray(self.session_weight))
        return path

    @staticmethod
    def load(folder: str | Path) -> ItemItem | None:
        """The item-item part saved beside a two-tower artifact, or None (a tower-only artifact)."""
        path = Path(folder) / ITEM_ITEM_FILE
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as f:
            w = sp.csr_matrix((f["data"], f["indices"], f["indptr"]), shape=tuple(int(s) for s in f["shape"]))
            return ItemItem(w, float(f["weight"]), float(f["session_weight"]))


def sparsify(b: np.ndarray, top_k: int) -> sp.csr_matrix:
    """Each row's ``top_k`` largest weights of a dense item-item matrix, as a sparse matrix.

    >>> sparsify(np.array([[0.0, 3.0, -1.0, 2.0]], dtype=np.float32), 2).toarray().tolist()
    [[0.0, 3.0, 0.0, 2.0]]
    """
    n, m = b.shape
    k = min(top_k, m)
    cols = np.argpartition(-b, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(b, cols, axis=1)
    keep = vals > 0  # a negative or zero weight cannot lift an item into a top list
    rows = np.repeat(np.arange(n), k).reshape(n, k)
    return sp.csr_matrix((vals[keep], (rows[keep], cols[keep])), shape=(n, m), dtype=np.float32)


def _z(v: np.ndarray) -> np.ndarray:
    return (v - v.mean()) / (v.std() + 1e-9)


def blend_rank(query: np.ndarray, vectors: np.ndarray, tower_rows: np.ndarray, ease: np.ndarray,
               drop: np.ndarray, weight: float, k: int, pool: int = POOL) -> tuple[np.ndarray, np.ndarray]:
    """The top ``k`` item rows of the blend for one user, best first, and their blended scores.

    ``query``/``vectors``: the tower's query and item index vectors (a score is
    their inner product); ``tower_rows``: its FAISS candidates, best first (-1
    pads); ``ease``: :meth:`ItemItem.scores` of the user; ``drop``: rows never
    recommended (seen, excluded). Items the index gained after EASE was fitted
    get an EASE score of 0.

    >>> vecs = np.eye(4, dtype=np.float32); q = np.array([4, 3, 2, 1], dtype=np.float32)
    >>> ease = np.array([0, 0, 1, 5], dtype=np.float32)
    >>> blend_rank(q, vecs, np.array([0, 1, 2, 3]), ease, np.array([0]), 0.0, 2)[0].tolist()
    [1, 2]
    >>> blend_rank(q, vecs, np.array([0, 1, 2, 3]), ease, np.array([0]), 1.0, 2)[0].tolist()
    [3, 2]
    """
    ease = np.pad(ease.astype(np.float64), (0, max(0, len(vectors) - len(ease))))  # items added since the fit: 0
    ease[np.asarray(drop, dtype=np.int64)] = -np.inf  # dropped rows, and only they, are not finite from here on
    tower_rows = np.asarray(tower_rows, dtype=np.int64)
    tower_rows = tower_rows[tower_rows >= 0]
    from_tower = tower_rows[np.isfinite(ease[tower_rows])][:pool]
    kk = min(pool, int(np.isfinite(ease).sum()))
    from_ease = np.argpartition(-ease, kk - 1)[:kk] if kk > 0 else np.zeros(0, dtype=np.int64)
    both = np.concatenate([from_tower, from_ease[np.isfinite(ease[from_ease])]])
    _, first = np.unique(both, return_index=True)
    cand = both[np.sort(first)]  # the union, in order of first appearance: the tower's first
    if len(cand) == 0:
        return cand, np.zeros(0)
    t = vectors[cand] @ query
    score = (1.0 - weight) * _z(t.astype(np.float64)) + weight * _z(ease[cand])
    order = np.argsort(-score, kind="stable")[:k]
    return cand[order], score[order]
