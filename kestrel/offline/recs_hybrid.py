"""Fitting the hybrid recommender (``kestrel.models.hybrid_recs``): EASE's weights and the blend weight.

The blend weight is chosen by a rule fixed in code, on a validation split
carved from the training data only (each user's last 20% of training
interactions, as the test split is carved from the whole): a two-tower and
EASE are fitted on the rest, every weight of ``WEIGHT_GRID`` is scored by
Recall@20 on the validation users, and :func:`choose_weight` takes the best.
The grid holds 0 (the tower alone) and 1 (EASE alone), so the deployed blend
is never one of its parts' losers on validation. Above ``EASE_MAX_ITEMS``
items EASE is not fitted and the tower serves alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd

from kestrel.models.hybrid_recs import POOL, SESSION_ITEMS, ItemItem, blend_rank, sparsify
from kestrel.models.retrieval import IndexSnapshot, build_snapshot
from kestrel.models.two_tower import RecsArtifact
from kestrel.offline.recs_baselines import EASE, EASE_MAX_ITEMS, interaction_matrix
from kestrel.offline.recs_data import temporal_split
from kestrel.offline.recs_metrics import ranking_metrics
from kestrel.offline.recs_train import query_for_users

WEIGHT_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
TOP_K = 200  # EASE weights kept per item (measured: no loss against the dense matrix on simulated shoppers)


def choose_weight(recall_by_weight: dict[float, float]) -> float:
    """The weight with the highest validation Recall@20; a tie goes to the smaller weight (more of the tower,
    which follows the session).

    >>> choose_weight({0.0: 0.09, 0.5: 0.11, 0.75: 0.11, 1.0: 0.10})
    0.5
    """
    best = max(recall_by_weight.values())
    return min(w for w, r in recall_by_weight.items() if r == best)


def user_matrix(train: pd.DataFrame, item_index: dict[str, int], n_items: int) -> tuple[Any, dict[str, int]]:
    """The binary user x item matrix of ``train`` in the tower's item rows, and each user's row in it."""
    user_row = {u: r for r, u in enumerate(sorted(train["user"].unique()))}
    known = train[train["item"].isin(item_index)]
    items = np.fromiter((item_index[i] for i in known["item"]), dtype=np.int64, count=len(known))
    return interaction_matrix(known["user"].map(user_row).to_numpy(), items, len(user_row), n_items), user_row


def fit_item_item(train: pd.DataFrame, art: RecsArtifact, lam: float = 200.0, weight: float = 0.0) -> ItemItem | None:
    """EASE fitted on ``train`` in ``art``'s item rows, sparsified; None above ``EASE_MAX_ITEMS`` items."""
    n_items = len(art.vocab.item_ids)
    if n_items > EASE_MAX_ITEMS:
        return None
    x, _ = user_matrix(train, art.vocab.item_index, n_items)
    return ItemItem(sparsify(EASE(lam).fit(x).b, TOP_K), weight)


class ServedRanking:
    """The served ranking of a split's users, prepared once: each user's training items (EASE's history), newest
    items (the tower's query and the session) and the tower's FAISS candidates, as the worker has them."""

    def __init__(self, art: RecsArtifact, train: pd.DataFrame, users: Sequence[str],
                 snap: IndexSnapshot | None = None) -> None:
        vocab = art.vocab
        self.art, self.users = art, list(users)
        self.snap = snap or build_snapshot(vocab.item_ids, art.item_embeddings, art.version)
        seen_items = train.groupby("user")["item"].agg(list).to_dict()
        self.seen = [np.fromiter((vocab.item_index[i] for i in seen_items.get(u, ()) if i in vocab.item_index),
                                 dtype=np.int64) for u in self.users]
        self.recents, self.times = query_for_users(train, self.users, art.model.config.history_len)
        self.session = [np.asarray([vocab.item_index[i] for i in r[:SESSION_ITEMS] if i in vocab.item_index],
                                   dtype=np.int64) for r in self.recents]
        self.encoder = art.encoder()

    def rank(self, part: ItemItem, weights: Sequence[float], start: int = 0, end: int | None = None,
             k: int = 20) -> dict[float, list[list[int]]]:
        """Users ``start:end``'s top ``k`` item rows under each blend weight (``part``'s own session weight)."""
        end = len(self.users) if end is None else end
        out: dict[float, list[list[int]]] = {w: [] for w in weights}
        n_items = self.snap.size
        for lo in range(start, end, 1024):
            hi = min(lo + 1024, end)
            q = self.encoder.encode(self.users[lo:hi], self.recents[lo:hi], self.times[lo:hi])
            _, found = self.snap.search(q, min(n_items, POOL + max(len(s) for s in self.seen[lo:hi])))
            for j in range(hi - lo):
                hist = self.seen[lo + j]
                ease = part.scores(hist, self.session[lo + j])
                for w in weights:
                    out[w].append(blend_rank(q[j], self.snap.vectors, found[j], ease, hist, w, k)[0].tolist())
        return out


def choose_blend(train: pd.DataFrame, train_tower: Callable[[pd.DataFrame], RecsArtifact], lam: float = 200.0,
                 ) -> tuple[float, dict[float, float]] | None:
    """The blend weight by the module's rule, and each weight's validation Recall@20 (None: no EASE part, or no
    validation users)."""
    inner, held = temporal_split(train)
    if not held:
        return None
    art = train_tower(inner)
    part = fit_item_item(inner, art, lam)
    if part is None:
        return None
    users = sorted(held)
    relevant = [{art.vocab.item_index.get(i, -1) for i in held[u]} for u in users]
    ranked = ServedRanking(art, inner, users).rank(part, WEIGHT_GRID)
    recalls = {w: round(ranking_metrics(r, relevant, len(art.vocab.item_ids))["recall_at_20"], 4)
               for w, r in ranked.items()}
    return choose_weight(recalls), recalls


def with_blend(art: RecsArtifact, train: pd.DataFrame, train_tower: Callable[[pd.DataFrame], RecsArtifact],
               lam: float = 200.0, log: Callable[[str], None] | None = None) -> RecsArtifact:
    """``art`` (a tower trained on ``train``) with EASE's weights fitted on ``train`` and the blend weight chosen
    on a validation split of it; ``art`` unchanged where EASE does not fit (a catalogue above
    ``EASE_MAX_ITEMS``). ``train_tower`` trains a tower the way ``art`` was trained (for the validation fit)."""
    say = log or (lambda _m: None)
    chosen = choose_blend(train, train_tower, lam)
    if chosen is None:
        say(f"hybrid: no EASE part ({len(art.vocab.item_ids):,} items, limit {EASE_MAX_ITEMS:,}); the tower alone")
        return art
    weight, recalls = chosen
    part = fit_item_item(train, art, lam, weight)
    say(f"hybrid: blend weight {weight} chosen on validation (Recall@20 by weight {recalls})")
    return replace(art, item_item=part, metadata={**art.metadata, "hybrid": {
        "weight": weight, "validation_recall_at_20": {str(w): r for w, r in recalls.items()},
        "session_weight": part.session_weight, "ease_lambda": lam, "top_k": TOP_K, "pool": POOL}})
