"""Fitting the hybrid recommender (``kestrel.models.hybrid_recs``): EASE's weights and the blend weight.

The blend weight is chosen by a rule fixed in code, on a validation split
carved from the training data only, the way the test split is carved from
the whole (each user's last 20% of training interactions, or the last one): a two-tower and
EASE are fitted on the rest, every weight of ``WEIGHT_GRID`` is scored by
Recall@20 on the validation users, and :func:`choose_weight` takes the best
if it beats the tower alone beyond noise, else the tower alone. The grid
holds 1 (EASE alone), so the deployed blend is not a loser to either part on
validation. Above ``EASE_MAX_ITEMS``
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
from kestrel.offline.recs_data import SPLITS, temporal_split
from kestrel.offline.recs_metrics import paired_mean_gain, per_user_recall
from kestrel.offline.recs_train import query_for_users

WEIGHT_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
TOP_K = 200  # EASE weights kept per item (measured: no loss against the dense matrix on simulated shoppers)


def choose_weight(recall_by_weight: dict[float, np.ndarray]) -> tuple[float, dict[str, Any]]:
    """The rule: the weight with the best mean validation Recall@20 (a tie goes to the smaller weight), if its
    gain over the tower alone (weight 0) is beyond noise (the 95% interval of the paired per-user gain lies
    above zero); else the tower alone. The tower is the default because it follows the session; EASE's part has
    to earn its place. Returns the weight and what the rule saw.

    >>> tower = np.r_[np.ones(100), np.zeros(900)]
    >>> choose_weight({0.0: tower, 0.5: np.r_[np.ones(200), np.zeros(800)], 1.0: tower})[0]
    0.5
    >>> choose_weight({0.0: tower, 0.5: np.r_[np.ones(102), np.zeros(898)]})[0]  # a gain within noise
    0.0
    """
    means = {w: float(np.mean(r)) for w, r in recall_by_weight.items()}
    best = min(w for w, m in means.items() if m == max(means.values()))
    gain = paired_mean_gain(recall_by_weight[best], recall_by_weight[0.0]) if best != 0.0 else None
    chosen = best if gain is not None and gain["ci95"][0] > 0 else 0.0
    return chosen, {"validation_recall_at_20": {str(w): round(m, 4) for w, m in means.items()},
                    "best": best, "best_minus_tower": gain,
                    "rule": "best validation Recall@20 if its paired gain over the tower alone is beyond noise"}


def user_matrix(train: pd.DataFrame, item_index: dict[str, int], n_items: int) -> tuple[Any, dict[str, int]]:
    """The binary user x item matrix of ``train`` in the tower's item rows, and each user's row in it."""
    user_row = {u: r for r, u in enumerate(sorted(train["user"].unique()))}
    known = train[train["item"].isin(item_index)]
    items = np.fromiter((item_index[i] for i in known["item"]), dtype=np.int64, count=len(known))
    return interaction_matrix(known["user"].map(user_row).to_numpy(), items, len(user_row), n_items), user_row


def fit_item_item(train: pd.DataFrame, art: RecsArtifact, lam: float = 200.0, weight: float = 0.0,
                  fitted: np.ndarray | None = None) -> ItemItem | None:
    """EASE fitted on ``train`` in ``art``'s item rows, sparsified; None above ``EASE_MAX_ITEMS`` items.
    ``fitted``: EASE's dense weights already fitted on exactly that matrix (the evaluation's baseline)."""
    n_items = len(art.vocab.item_ids)
    if n_items > EASE_MAX_ITEMS:
        return None
    if fitted is None:
        fitted = EASE(lam).fit(user_matrix(train, art.vocab.item_index, n_items)[0]).b
    return ItemItem(sparsify(fitted, TOP_K), weight)


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

    def tower(self, start: int = 0, end: int | None = None, k: int = 20) -> list[list[int]]:
        """Users ``start:end``'s top ``k`` item rows from the tower alone (FAISS, seen items dropped)."""
        end = len(self.users) if end is None else end
        out: list[list[int]] = []
        for lo in range(start, end, 1024):
            hi = min(lo + 1024, end)
            q = self.encoder.encode(self.users[lo:hi], self.recents[lo:hi], self.times[lo:hi])
            _, found = self.snap.search(q, min(self.snap.size, k + max(len(s) for s in self.seen[lo:hi])))
            for rows, seen in zip(found, self.seen[lo:hi], strict=True):
                drop = set(seen.tolist())
                out.append([int(r) for r in rows if r >= 0 and r not in drop][:k])
        return out

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
                 test_share: float = SPLITS["temporal"]) -> tuple[float, dict[str, Any]] | None:
    """The blend weight by :func:`choose_weight`, and what the rule saw (None: no EASE part, or no validation
    users). The validation split is cut from ``train`` as the test split was cut from the whole
    (``test_share``: see ``recs_data.SPLITS``)."""
    inner, held = temporal_split(train, test_share)
    if not held:
        return None
    art = train_tower(inner)
    part = fit_item_item(inner, art, lam)
    if part is None:
        return None
    users = sorted(held)
    relevant = [{art.vocab.item_index.get(i, -1) for i in held[u]} for u in users]
    ranked = ServedRanking(art, inner, users).rank(part, WEIGHT_GRID)
    return choose_weight({w: per_user_recall(r, relevant) for w, r in ranked.items()})


def with_blend(art: RecsArtifact, train: pd.DataFrame, train_tower: Callable[[pd.DataFrame], RecsArtifact],
               lam: float = 200.0, log: Callable[[str], None] | None = None,
               test_share: float = SPLITS["temporal"], fitted: np.ndarray | None = None) -> RecsArtifact:
    """``art`` (a tower trained on ``train``) with EASE's weights fitted on ``train`` and the blend weight chosen
    on a validation split of it; ``art`` unchanged where EASE does not fit (a catalogue above
    ``EASE_MAX_ITEMS``). ``train_tower`` trains a tower the way ``art`` was trained (for the validation fit);
    ``fitted``: see :func:`fit_item_item`."""
    say = log or (lambda _m: None)
    chosen = choose_blend(train, train_tower, lam, test_share)
    if chosen is None:
        say(f"hybrid: no EASE part ({len(art.vocab.item_ids):,} items, limit {EASE_MAX_ITEMS:,}); the tower alone")
        return art
    weight, seen = chosen
    say(f"hybrid: blend weight {weight} (validation Recall@20 by weight {seen['validation_recall_at_20']}, best "
        f"{seen['best']}, its gain over the tower alone {seen['best_minus_tower']})")
    if weight == 0.0:
        say("hybrid: EASE's part did not beat the tower beyond noise on validation; the tower serves alone")
        return replace(art, metadata={**art.metadata, "hybrid": {"weight": 0.0, **seen}})
    part = fit_item_item(train, art, lam, weight, fitted)
    if part is None:  # cannot happen: choose_blend fitted one on a subset of the same catalogue
        return art
    return replace(art, item_item=part, metadata={**art.metadata, "hybrid": {
        "weight": weight, **seen, "session_weight": part.session_weight, "ease_lambda": lam, "top_k": TOP_K,
        "pool": POOL}})
