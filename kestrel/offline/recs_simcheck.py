"""Checks against the simulator's ground truth: session awareness and expected click-through.

The simulator knows every user's latent taste and its click model
(:meth:`kestrel.offline.simulator.Simulator.click_probability`), so two things can be
measured without an A/B test:

* **session shift**: take a user, pick a category they rarely visit, and add
  1, 2, 3, 5 interactions with items of that category to the front of their
  recent items (as the feature store would after a short session); the share
  of that category in the top 10 must rise within a few interactions;
* **expected CTR**: the mean click probability of the top 10 unseen items
  from the served recommender (the two-tower, or its blend with EASE)
  versus from popularity, for the same users.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from kestrel.models.hybrid_recs import POOL, SESSION_ITEMS, blend_rank
from kestrel.models.two_tower import RecsArtifact
from kestrel.offline.recs_data import recent_distinct

if TYPE_CHECKING:
    from kestrel.offline.simulator import SimConfig


def _top_unseen(scores: np.ndarray, item_ids: Sequence[str], seen: set[str], k: int) -> list[str]:
    out = []
    for r in np.argsort(-scores):
        if item_ids[r] not in seen:
            out.append(item_ids[r])
            if len(out) == k:
                break
    return out


def _top_served(art: RecsArtifact, q: np.ndarray, seen: set[str], recent: Sequence[str], k: int) -> list[str]:
    """The top ``k`` unseen items as served: the tower's order, or with an EASE part the hybrid's blend of the
    tower's candidates and EASE's weights summed over the seen items (as the worker does)."""
    ids, vectors = art.vocab.item_ids, art.item_embeddings
    scores = vectors @ q
    part = art.item_item
    if part is None:
        return _top_unseen(scores, ids, seen, k)
    seen_rows = np.fromiter((art.vocab.item_index[i] for i in seen if i in art.vocab.item_index), dtype=np.int64)
    candidates = np.argsort(-scores)[:POOL + len(seen_rows)]
    session = [art.vocab.item_index[i] for i in recent[:SESSION_ITEMS] if i in art.vocab.item_index]
    rows, _ = blend_rank(q, vectors, candidates, part.scores(seen_rows, session), seen_rows, part.weight, k)
    return [ids[r] for r in rows]


def simulator_check(art: RecsArtifact, train: pd.DataFrame, sim_config: SimConfig, users: int = 200,
                    steps: Sequence[int] = (0, 1, 2, 3, 5), k: int = 10, seed: int = 0) -> dict[str, Any]:
    """Session shift (category share in the top ``k`` after n in-category interactions) and expected CTR."""
    from kestrel.offline.simulator import Simulator  # the ground truth lives with the simulator

    sim = Simulator(sim_config)
    rng = np.random.default_rng(seed)
    enc, ids = art.encoder(), art.vocab.item_ids
    cat_of = {i: int(c) for i, c in zip(ids, art.vocab.item_category, strict=True) if c != ""}
    known_users = sorted(train["user"].unique())
    grouped = train.groupby("user")
    picked = [known_users[i] for i in rng.choice(len(known_users), min(users, len(known_users)), replace=False)]
    pop = train["item"].value_counts()
    shares: dict[int, list[float]] = {n: [] for n in steps}
    ctr_tt, ctr_pop = [], []
    for user in picked:
        g = grouped.get_group(user)
        hist = recent_distinct(g["item"].tolist(), art.model.config.history_len)
        seen = set(g["item"])
        u = Simulator.user_index(user)
        # Expected click-through: two-tower vs popularity, top k unseen for this user now.
        q = enc.encode([user], [hist])[0]
        top_tt = _top_served(art, q, seen, hist, k)
        top_pop = [i for i in pop.index if i not in seen][:k]
        ctr_tt.append(np.mean([sim.click_probability(u, Simulator.item_index(i)) for i in top_tt]))
        ctr_pop.append(np.mean([sim.click_probability(u, Simulator.item_index(i)) for i in top_pop]))
        # Session shift: a category this user rarely visits (lowest taste among well-stocked ones).
        stocked = [c for c in range(sim_config.n_categories) if sum(1 for v in cat_of.values() if v == c) >= 2 * k]
        cat = min(stocked, key=lambda c: sim.user_taste[u, c])
        pool = [i for i in ids if cat_of.get(i) == cat and i not in seen]
        weights = np.exp(sim.item_quality[[Simulator.item_index(i) for i in pool]])
        session = list(rng.choice(pool, size=min(max(steps), len(pool)), replace=False, p=weights / weights.sum()))
        for n in steps:
            recent = list(reversed(session[:n])) + [h for h in hist if h not in session[:n]]
            q = enc.encode([user], [recent[: art.model.config.history_len]])[0]
            top = _top_served(art, q, seen | set(session[:n]), recent, k)
            shares[n].append(sum(cat_of.get(i) == cat for i in top) / k)
    return {"users": len(picked),
            "session_category_share_at_10": {str(n): round(float(np.mean(v)), 4) for n, v in shares.items()},
            "expected_ctr_two_tower": round(float(np.mean(ctr_tt)), 4),
            "expected_ctr_popularity": round(float(np.mean(ctr_pop)), 4)}
