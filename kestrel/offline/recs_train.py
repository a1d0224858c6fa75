"""Train the two-tower model: in-batch softmax with a popularity (logQ) correction.

In-batch negatives are sampled in proportion to popularity, so without a
correction the model learns to push popular items down; subtracting
``log q(item)`` from each logit (Yi et al., 2019) removes that bias. Items
that appear twice in a batch are not used as each other's negatives.
The user id is dropped (mapped to the "unknown" bucket) for a share of the
examples, so the query tower also learns to serve users never seen in
training from their recent items alone.
"""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from kestrel.models.device import pick_device
from kestrel.models.two_tower import (
    ITEM_KEYS,
    QUERY_KEYS,
    UNKNOWN_USER,
    RecsArtifact,
    TwoTower,
    TwoTowerConfig,
    Vocab,
    embed_items,
    jagged,
    stable_hash,
)
from kestrel.offline.recs_data import item_categories, training_examples


def build_vocab(train: pd.DataFrame, config: TwoTowerConfig) -> Vocab:
    cats = item_categories(train)
    items = sorted(cats)
    categories = sorted({c for c in cats.values() if c})
    hashes = np.unique(np.fromiter((stable_hash(u) for u in train["user"].unique()), dtype=np.int64))
    config = replace(config, n_items=len(items), n_categories=len(categories))
    return Vocab(items, [cats[i] for i in items], categories, hashes, config)


def _padded(rows: list[list[int]], width: int) -> np.ndarray:
    out = np.full((len(rows), width), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r[:width]
    return out


# The history reader new models get (TwoTowerConfig.sequence): chosen on the development seed of both interaction
# generators under both splits (docs/recommendations.md, 2026-12-06): the tower is ahead of the bags alone in all
# four, by half on the next item of simulated shoppers, at twice the bags' training time (the GRU: eight times).
SEQUENCE = "attention"


def train_two_tower(train: pd.DataFrame, *, dim: int = 64, epochs: int = 8, batch_size: int = 512,
                    lr: float = 3e-3, history_len: int = 50, user_dropout: float = 0.3, seed: int = 7,
                    target_window: int = 1,
                    device: torch.device | None = None, progress: bool = True,
                    config_overrides: dict[str, Any] | None = None) -> RecsArtifact:
    """Train on a time-sorted interaction frame (``user, item, time, category``) and embed the catalog."""
    started = time.time()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = device or pick_device()
    base = TwoTowerConfig(n_items=0, n_categories=0, table_dim=dim, output_dim=dim, history_len=history_len,
                          **{"sequence": SEQUENCE, **(config_overrides or {})})
    vocab = build_vocab(train, base)
    config = vocab.config
    ex = training_examples(train, history_len)
    if len(ex.targets) < 2:
        raise ValueError("too few interactions to train on")
    user_bucket = {u: 1 + stable_hash(u) % config.user_buckets for u in np.unique(ex.users)}
    users = np.fromiter((user_bucket[u] for u in ex.users), dtype=np.int64, count=len(ex.users))
    hist = _padded([vocab.item_rows(h) for h in ex.history], history_len)
    hist_cat = np.where(hist >= 0, vocab.item_cat_row[np.clip(hist, 0, None)], -1)
    hist_cat = np.where(hist_cat > 0, hist_cat, -1)
    recent = hist[:, :config.recent_len]
    target = np.fromiter((vocab.item_index[t] for t in ex.targets), dtype=np.int64, count=len(ex.targets))
    target_cat = np.where(vocab.item_cat_row[target] > 0, vocab.item_cat_row[target], -1)
    hours = (ex.times // 3600 % 24).astype(np.int64)
    # Examples are grouped by user in time order: the end of each example's user block bounds how far
    # ahead a target may be drawn (target_window > 1 trains for the next few new items, not just the next).
    starts = np.flatnonzero(np.r_[True, ex.users[1:] != ex.users[:-1]])
    user_end = np.repeat(np.r_[starts[1:], len(ex.users)], np.diff(np.r_[starts, len(ex.users)]))
    freq = np.bincount(target, minlength=config.n_items).astype(np.float64)
    log_q = torch.tensor(np.log((freq + 1.0) / (freq.sum() + config.n_items)), dtype=torch.float32, device=device)

    model = TwoTower(config, device)
    opts = _optimizers(model, lr)
    n = len(target)
    steps_per_epoch = max(1, n // batch_size)
    losses: list[float] = []
    progress_bar = _progress(progress)
    with progress_bar as bar:
        task = bar.add_task("training two-tower", total=epochs * steps_per_epoch) if bar else None
        for epoch in range(epochs):
            order = rng.permutation(n)
            epoch_loss = 0.0
            for step in range(steps_per_epoch):
                b = order[step * batch_size:(step + 1) * batch_size]
                t = np.minimum(b + rng.integers(0, target_window, len(b)), user_end[b] - 1)
                u = users[b].copy()
                u[rng.random(len(b)) < user_dropout] = UNKNOWN_USER
                q_kjt = jagged(QUERY_KEYS, [u, hist[b], recent[b], hist_cat[b], hours[b]], device)
                i_kjt = jagged(ITEM_KEYS, [target[t], target_cat[t]], device)
                q, v = model.query(q_kjt), model.item(i_kjt)
                tgt = torch.from_numpy(target[t]).to(device)
                logits = model.logits(q, v, tgt) - log_q[tgt][None, :]
                dup = (tgt[:, None] == tgt[None, :]) & ~torch.eye(len(b), dtype=torch.bool, device=device)
                logits = logits.masked_fill(dup, float("-inf"))
                loss = nn.functional.cross_entropy(logits, torch.arange(len(b), device=device))
                for opt in opts:
                    opt.zero_grad(set_to_none=True)
                loss.backward()
                for opt in opts:
                    opt.step()
                epoch_loss += float(loss.detach())
                if bar is not None:
                    bar.update(task, advance=1, description=f"training two-tower: epoch {epoch + 1}/{epochs} "
                                                            f"loss {epoch_loss / (step + 1):.3f}")
            losses.append(epoch_loss / steps_per_epoch)
    model.eval()
    embeddings = embed_items(model, vocab, vocab.item_ids)
    trained_at = datetime.now(UTC)
    digest = stable_hash(f"{trained_at.isoformat()}:{n}:{losses[-1]}") % 16**6
    version = f"two-tower-{trained_at:%Y%m%dT%H%M%SZ}-{digest:06x}"
    meta = {"trained_at": trained_at.isoformat(), "examples": n, "epochs": epochs, "batch_size": batch_size,
            "lr": lr, "user_dropout": user_dropout, "target_window": target_window,
            "loss_per_epoch": [round(x, 4) for x in losses],
            "train_seconds": round(time.time() - started, 2), "device": str(device),
            "examples_per_s": round(n * epochs / max(time.time() - started, 1e-9), 1),
            "data_end_time": float(train["time"].max())}
    return RecsArtifact(version, model, vocab, embeddings, meta)


def _optimizers(model: TwoTower, lr: float) -> list[torch.optim.Optimizer]:
    """Sparse gradients and lazy Adam for the embedding tables, Adam for the rest.

    A batch touches a few thousand rows; dense gradients would make every step
    read and write every row of every table (the user table alone has 20k rows),
    which was 70% of the training time.
    """
    tables: list[nn.Parameter] = []
    for ebc in (model.query_ebc, model.item_ebc):
        for bag in ebc.embedding_bags.values():
            bag.sparse = True
            tables.append(bag.weight)
    model.item_bias.sparse = True
    tables.append(model.item_bias.weight)
    table_ids = {id(t) for t in tables}
    dense = [p for p in model.parameters() if id(p) not in table_ids]
    return [torch.optim.SparseAdam(tables, lr=lr), torch.optim.Adam(dense, lr=lr)]


class _NoProgress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _progress(show: bool) -> Any:
    if not show:
        return _NoProgress()
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), transient=False)


def query_for_users(train: pd.DataFrame, users: list[str], history_len: int) -> tuple[list[list[str]], list[float]]:
    """Each user's recent distinct items (newest first) and last time at the end of ``train``."""
    from kestrel.offline.recs_data import recent_distinct

    grouped = train.groupby("user", sort=False)
    recents, times = [], []
    for u in users:
        g = grouped.get_group(u)
        recents.append(recent_distinct(g["item"].tolist(), history_len))
        times.append(float(g["time"].iloc[-1]))
    return recents, times


