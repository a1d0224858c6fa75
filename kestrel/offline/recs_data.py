"""Interaction data for the recommender: CSV loading, simulated data, temporal split, training examples.

Training examples mirror what the online feature store holds at decision
time: ``recent_items`` is the last N *distinct* items, newest first (an item
seen again moves to the front), read before the interaction is applied. The
same function builds the query features for evaluation, so offline and
online see the same thing.
"""

from __future__ import annotations

import argparse
import itertools
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

KIND_WEIGHT = {"view": 1.0, "click": 2.0, "add_to_cart": 3.0, "purchase": 5.0}


def load_interactions(path: str | Path, user_col: str, item_col: str, time_col: str,
                      rating_col: str | None = None, min_rating: float | None = None,
                      category_col: str | None = None) -> pd.DataFrame:
    """Columns ``user``, ``item``, ``time`` (epoch seconds) and ``category`` ("" when absent), time-sorted."""
    cols = [user_col, item_col, time_col] + [c for c in (rating_col, category_col) if c]
    df = pd.read_csv(path, usecols=cols, dtype={user_col: str, item_col: str})
    if rating_col and min_rating is not None:
        df = df[pd.to_numeric(df[rating_col], errors="coerce") >= min_rating]
    t = df[time_col]
    if pd.api.types.is_numeric_dtype(t):
        epoch = t.astype(float)
    else:
        epoch = pd.to_datetime(t, utc=True, format="mixed").astype("int64") / 1e9
    out = pd.DataFrame({"user": df[user_col].astype(str).to_numpy(), "item": df[item_col].astype(str).to_numpy(),
                        "time": epoch.to_numpy(dtype=float),
                        "category": df[category_col].astype(str).to_numpy() if category_col else ""})
    return out.sort_values(["time"], kind="stable").reset_index(drop=True)


def simulated_interactions(events: int, seed: int = 7, n_users: int = 1000, n_items: int = 2000,
                           n_categories: int = 20) -> pd.DataFrame:
    """Interactions from the project's simulator (latent category tastes), as a CSV-shaped frame."""
    from kestrel.offline.simulator import SimConfig, Simulator

    sim = Simulator(SimConfig(seed=seed, transaction_share=0.0, fraud_incidents_per_sim_hour=0.0,
                              n_users=n_users, n_items=n_items, n_categories=n_categories))
    rows = []
    for rec in itertools.islice((r for r in sim.records() if r.kind == "interaction"), events):
        e = rec.event
        rows.append((e.user_id, e.item_id, e.kind, KIND_WEIGHT[e.kind], rec.time, (e.context or {})["category"]))
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "kind", "weight", "timestamp", "category"])
    df["timestamp"] = pd.to_datetime(df["timestamp"], unit="s", utc=True).dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return df


# The evaluation protocols by name: each user's last 20% of interactions (the long horizon: the rest of a
# history), or only the last one (the short horizon: the next item).
SPLITS = {"temporal": 0.2, "last": 0.0}


def temporal_split(df: pd.DataFrame, test_share: float = 0.2,
                   min_interactions: int = 5) -> tuple[pd.DataFrame, dict[str, set[str]]]:
    """Each user's last ``test_share`` of interactions (by time) held out, at least one: ``test_share`` 0 is the
    next-item protocol (leave-last-out, :data:`SPLITS` ``"last"``).

    Returns the training frame (every user's early interactions, plus all of
    those of users too short to evaluate) and, per evaluated user, the held-out
    items that are new to that user and known to the catalog in training: items
    never seen in training cannot be ranked by any model, and re-interactions
    are filtered out at serving.
    """
    df = df.sort_values(["user", "time"], kind="stable")
    pos = df.groupby("user", sort=False).cumcount().to_numpy()
    size = df.groupby("user", sort=False)["item"].transform("size").to_numpy()
    n_test = np.where(size >= min_interactions, np.maximum(1, np.floor(size * test_share)).astype(int), 0)
    is_test = pos >= size - n_test
    train, test = df[~is_test], df[is_test]
    known = set(train["item"].unique())
    train_items = train.groupby("user")["item"].agg(set).to_dict()
    held: dict[str, set[str]] = {}
    for user, items in test.groupby("user")["item"].agg(set).items():
        new = {i for i in items if i in known} - train_items.get(user, set())
        if new:
            held[str(user)] = new
    return train.sort_values("time", kind="stable").reset_index(drop=True), held


@dataclass
class Examples:
    """One row per first interaction of a user with an item: the history before it and the target."""

    users: np.ndarray  # object: raw user id
    history: list[list[str]]  # newest first, distinct, at most history_len
    targets: np.ndarray  # object: item id
    times: np.ndarray


def recent_distinct(items: Iterator[str] | list[str], n: int) -> list[str]:
    """The last ``n`` distinct items of a time-ordered sequence, newest first (the feature store's LastN)."""
    seen: OrderedDict[str, None] = OrderedDict()
    for item in items:
        seen.pop(item, None)
        seen[item] = None
    return list(reversed(seen))[:n]


def training_examples(train: pd.DataFrame, history_len: int) -> Examples:
    users, hist, targets, times = [], [], [], []
    for user, group in train.sort_values(["user", "time"], kind="stable").groupby("user", sort=False):
        recent: OrderedDict[str, None] = OrderedDict()
        seen: set[str] = set()
        for item, t in zip(group["item"].to_numpy(), group["time"].to_numpy(), strict=True):
            if item not in seen:
                users.append(user)
                hist.append(list(reversed(recent))[:history_len])
                targets.append(item)
                times.append(t)
            seen.add(item)
            recent.pop(item, None)
            recent[item] = None
            if len(recent) > 4 * history_len:  # bounded, like the online LastN
                recent.popitem(last=False)
    return Examples(np.asarray(users, dtype=object), hist, np.asarray(targets, dtype=object),
                    np.asarray(times, dtype=float))


def item_categories(df: pd.DataFrame) -> dict[str, str]:
    """The latest category seen for each item ("" when the data has none)."""
    last = df.drop_duplicates("item", keep="last")
    return dict(zip(last["item"].astype(str), last["category"].astype(str), strict=True))


def main(argv: list[str] | None = None) -> int:
    """``python -m kestrel.offline.recs_data OUT.csv --events N``: write simulated interactions as a CSV."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("out")
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--items", type=int, default=2000)
    args = p.parse_args(argv)
    simulated_interactions(args.events, args.seed, args.users, args.items).to_csv(args.out, index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
