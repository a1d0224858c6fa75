"""Baselines the two-tower model has to beat: popularity, item-to-item cosine kNN, EASE.

All work on the binary user x item matrix of the training split and score
every item for a batch of users; the evaluation masks what each user already
interacted with. EASE (Steck, 2019) is a closed-form linear autoencoder and
is usually the strongest of the three on implicit feedback; it inverts an
items x items matrix, so it is skipped above ``EASE_MAX_ITEMS``.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

EASE_MAX_ITEMS = 20_000


class Popularity:
    name = "popularity"

    def fit(self, x: sp.csr_matrix) -> Popularity:
        self.counts = np.asarray(x.sum(axis=0)).ravel().astype(np.float32)
        return self

    def scores(self, x_users: sp.csr_matrix) -> np.ndarray:
        return np.broadcast_to(self.counts, (x_users.shape[0], len(self.counts))).copy()


class ItemKNN:
    """Cosine similarity between item columns, each item keeping its ``neighbours`` most similar items."""

    name = "item_knn"

    def __init__(self, neighbours: int = 100) -> None:
        self.neighbours = neighbours

    def fit(self, x: sp.csr_matrix) -> ItemKNN:
        xc = x.tocsc().astype(np.float32)
        norms = np.sqrt(np.asarray(xc.multiply(xc).sum(axis=0)).ravel()).clip(1e-9)
        xn = xc @ sp.diags(1.0 / norms)
        sim = (xn.T @ xn).tocsr()
        sim.setdiag(0.0)
        sim.eliminate_zeros()
        self.sim = _top_per_row(sim, self.neighbours)
        return self

    def scores(self, x_users: sp.csr_matrix) -> np.ndarray:
        return np.asarray((x_users.astype(np.float32) @ self.sim).todense())


class EASE:
    """B = I - P / diag(P) with P = (X'X + lambda I)^-1, zero diagonal; score = x_u B."""

    name = "ease"

    def __init__(self, lam: float = 200.0) -> None:
        self.lam = lam

    def fit(self, x: sp.csr_matrix) -> EASE:
        g = (x.T @ x).toarray().astype(np.float64)
        g[np.diag_indices_from(g)] += self.lam
        p = np.linalg.inv(g)
        b = -p / np.diag(p)
        b[np.diag_indices_from(b)] = 0.0
        self.b = b.astype(np.float32)
        return self

    def scores(self, x_users: sp.csr_matrix) -> np.ndarray:
        return np.asarray(x_users.astype(np.float32) @ self.b)


def _top_per_row(m: sp.csr_matrix, k: int) -> sp.csr_matrix:
    rows, cols, vals = [], [], []
    for r in range(m.shape[0]):
        start, end = m.indptr[r], m.indptr[r + 1]
        if end == start:
            continue
        v, c = m.data[start:end], m.indices[start:end]
        if len(v) > k:
            keep = np.argpartition(-v, k - 1)[:k]
            v, c = v[keep], c[keep]
        rows.append(np.full(len(v), r))
        cols.append(c)
        vals.append(v)
    if not rows:
        return sp.csr_matrix(m.shape, dtype=np.float32)
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=m.shape,
                         dtype=np.float32)


def interaction_matrix(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int) -> sp.csr_matrix:
    """Binary user x item matrix from parallel arrays of row and column numbers."""
    x = sp.csr_matrix((np.ones(len(users), dtype=np.float32), (users, items)), shape=(n_users, n_items))
    x.data[:] = 1.0  # duplicates were summed
    return x
