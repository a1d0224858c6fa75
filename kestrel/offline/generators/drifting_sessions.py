"""An interaction-log generator designed apart from Kestrel's simulator: drifting tastes, sessions, a long tail.

Written down before any model was measured on it (issue 16, item 7). What differs from the demo's simulator
(latent category tastes, one user at a time, a 2,000-item catalogue):

* **Items** live in a 12-dimensional latent space, not in categories alone: each category (30 of them, of very
  unequal size: Dirichlet(0.5) shares) has a random unit centroid and its items scatter around it
  (noise 0.6), so two categories can be close and an item can sit between them. Popularity is a long tail:
  a Zipf law of exponent 1.1 over a random order of the catalogue (5,000 items by default), independent of
  where an item sits.
* **Users** have a taste (a unit vector near one or two category centroids) and an activity level (lognormal,
  sigma 1: a few heavy users, many light ones). Tastes **drift**: between two of a user's sessions the taste
  takes a random step (0.35 of a unit normal vector, renormalised), so the early history is a weaker guide
  to the late one than in a stationary world.
* **Sessions**: a user is drawn by activity; the session lasts Geometric(0.22) interactions (at least one, mean ~4.5).
  The session has an intent (the taste plus noise 0.8, renormalised) that follows what was just viewed
  (intent := normalise(0.55 intent + 0.45 last item)), so consecutive items are related (a Markov component
  the temporal and the leave-last-out splits reward differently).
* **Choice**: an item is drawn with probability proportional to exp(4 x intent . item + 0.9 log popularity);
  with probability 0.08 the user instead returns to an item of their own past (re-consumption).
* **Time**: sessions start on a global clock, exponential gaps of 25 s on average (so 100k interactions span
  about a week); within a session, interactions are 15-150 s apart. Kinds: view 70%, click 20%, add_to_cart
  6%, purchase 4%, with the weights of ``recs_data.KIND_WEIGHT``.

The frame has the columns of ``recs_data.simulated_interactions`` (user_id, item_id, kind, weight, timestamp,
category), so every command that takes ``--simulate`` takes it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from kestrel.offline.recs_data import KIND_WEIGHT

DIM = 12
KINDS = ("view", "click", "add_to_cart", "purchase")
KIND_SHARE = (0.70, 0.20, 0.06, 0.04)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True).clip(1e-9)


def drifting_sessions(events: int, seed: int = 7, n_users: int = 1000, n_items: int = 5000,
                      n_categories: int = 30) -> pd.DataFrame:
    """``events`` interactions of the world in the module docstring, in time order.

    >>> df = drifting_sessions(300, seed=1, n_users=20, n_items=100, n_categories=5)
    >>> len(df), list(df.columns), df["timestamp"].is_monotonic_increasing
    (300, ['user_id', 'item_id', 'kind', 'weight', 'timestamp', 'category'], True)
    """
    rng = np.random.default_rng(seed)
    shares = rng.dirichlet(np.full(n_categories, 0.5))
    category = rng.choice(n_categories, size=n_items, p=shares)
    centroids = _unit(rng.normal(size=(n_categories, DIM)))
    items = _unit(centroids[category] + 0.6 * rng.normal(size=(n_items, DIM)) / np.sqrt(DIM))
    log_pop = -1.1 * np.log(1.0 + rng.permutation(n_items))
    favourite = rng.choice(n_categories, size=(n_users, 2), p=shares)
    mix = rng.random((n_users, 1))
    taste = _unit(mix * centroids[favourite[:, 0]] + (1 - mix) * centroids[favourite[:, 1]]
                  + 0.3 * rng.normal(size=(n_users, DIM)) / np.sqrt(DIM))
    activity = rng.lognormal(0.0, 1.0, n_users)
    activity /= activity.sum()
    past: list[list[int]] = [[] for _ in range(n_users)]
    rows: list[tuple[int, int, str, float]] = []
    clock = 1_750_000_000.0
    while len(rows) < events:
        user = int(rng.choice(n_users, p=activity))
        if past[user]:  # the taste moved since the user's last session
            taste[user] = _unit(taste[user] + 0.35 * rng.normal(size=DIM) / np.sqrt(DIM))
        clock += rng.exponential(25.0)
        t = clock
        intent = _unit(taste[user] + 0.8 * rng.normal(size=DIM) / np.sqrt(DIM))
        for _ in range(rng.geometric(0.22)):  # at least one, mean ~4.5
            if past[user] and rng.random() < 0.08:
                item = int(rng.choice(past[user]))
            else:
                logits = 4.0 * (items @ intent) + 0.9 * log_pop
                p = np.exp(logits - logits.max())
                item = int(rng.choice(n_items, p=p / p.sum()))
            kind = KINDS[int(rng.choice(len(KINDS), p=KIND_SHARE))]
            rows.append((user, item, kind, t))
            past[user].append(item)
            intent = _unit(0.55 * intent + 0.45 * items[item])
            t += rng.uniform(15.0, 150.0)
            if len(rows) >= events:
                break
    rows.sort(key=lambda r: r[3])
    df = pd.DataFrame({"user_id": [f"s{u}" for u, _, _, _ in rows], "item_id": [f"d{i}" for _, i, _, _ in rows],
                       "kind": [k for _, _, k, _ in rows], "weight": [KIND_WEIGHT[k] for _, _, k, _ in rows],
                       "timestamp": [t for _, _, _, t in rows],
                       "category": [f"c{category[i]}" for _, i, _, _ in rows]})
    df["timestamp"] = pd.to_datetime(df["timestamp"], unit="s", utc=True).dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return df
