"""``kestrel eval recs``: train on a historical CSV, evaluate on a per-user temporal split, against baselines.

Protocol: each user's last 20% of interactions (by time) are held out
(users with at least 5 interactions); the model is trained on everything
before. For each evaluated user every catalog item the user has not
interacted with in training is ranked; the relevant items are the held-out
items that are new to the user and known in training. Metrics:

* Recall@K = hits in the top K / min(K, relevant items) (so a perfect list scores 1);
* NDCG@10 with binary relevance;
* coverage@10 = share of the catalog that appears in at least one user's top 10;
* retrieval latency per user (one query at a time): p50/p99 in ms.

The two-tower ranks through the real serving path (query tower, FAISS
index, seen-item filter); the baselines score the full item vector.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from kestrel.models.retrieval import build_snapshot
from kestrel.offline.recs_baselines import EASE, EASE_MAX_ITEMS, ItemKNN, Popularity, interaction_matrix
from kestrel.offline.recs_data import temporal_split
from kestrel.offline.recs_train import query_for_users, train_two_tower

LATENCY_SAMPLE = 300


def ranking_metrics(rankings: Sequence[Sequence[int]], relevant: Sequence[set[int]], n_items: int) -> dict[str, float]:
    """Recall@10/@20, NDCG@10 and coverage@10 of ranked item rows against each user's relevant rows.

    >>> m = ranking_metrics([[1, 2, 3]], [{2}], 10)
    >>> m["recall_at_10"], round(m["ndcg_at_10"], 4), m["coverage_at_10"]
    (1.0, 0.6309, 0.3)
    """
    r10, r20, ndcg = [], [], []
    covered: set[int] = set()
    discounts = 1.0 / np.log2(np.arange(2, 12))
    for ranked, rel in zip(rankings, relevant, strict=True):
        top10, top20 = list(ranked[:10]), list(ranked[:20])
        covered.update(top10)
        r10.append(len(rel.intersection(top10)) / min(10, len(rel)))
        r20.append(len(rel.intersection(top20)) / min(20, len(rel)))
        dcg = sum(discounts[i] for i, item in enumerate(top10) if item in rel)
        ndcg.append(dcg / discounts[: min(10, len(rel))].sum())
    return {"recall_at_10": float(np.mean(r10)), "recall_at_20": float(np.mean(r20)),
            "ndcg_at_10": float(np.mean(ndcg)), "coverage_at_10": len(covered) / max(n_items, 1)}


def recall_curve(rankings: Sequence[Sequence[int]], relevant: Sequence[set[int]], max_k: int = 20) -> list[float]:
    """Recall@K for K = 1..max_k, as ``ranking_metrics`` defines it (hits in the top K / min(K, relevant)).

    >>> recall_curve([[5, 1, 2]], [{1, 2}], max_k=3)
    [0.0, 0.5, 1.0]
    """
    curve = np.zeros(max_k)
    for ranked, rel in zip(rankings, relevant, strict=True):
        if not rel:
            continue
        hits = np.cumsum([item in rel for item in list(ranked[:max_k])] + [False] * max(0, max_k - len(ranked)))
        curve += hits[:max_k] / np.minimum(np.arange(1, max_k + 1), len(rel))
    return [round(float(v), 4) for v in curve / max(len(rankings), 1)]


def _latency(fn: Callable[[int], object], users: Sequence[int]) -> dict[str, float]:
    times = []
    for u in users:
        t0 = time.perf_counter()
        fn(u)
        times.append((time.perf_counter() - t0) * 1000)
    return {"retrieval_p50_ms": float(np.percentile(times, 50)), "retrieval_p99_ms": float(np.percentile(times, 99))}


def _top_unseen(scores: np.ndarray, seen_rows: Sequence[np.ndarray], k: int) -> list[list[int]]:
    out = []
    for row, seen in zip(scores, seen_rows, strict=True):
        row = row.astype(np.float64, copy=True)
        row[seen] = -np.inf
        kk = min(k, len(row) - len(seen))
        if kk <= 0:
            out.append([])
            continue
        part = np.argpartition(-row, kk - 1)[:kk]
        out.append(part[np.argsort(-row[part])].tolist())
    return out


def two_tower_metrics(art: Any, train: pd.DataFrame, held: dict[str, set[str]], *, index_kind: str = "auto",
                      seed: int = 7, snap: Any = None) -> dict[str, Any]:
    """A two-tower artifact's ranking metrics on a split, through the serving path (query tower, FAISS index,
    seen items dropped), with its retrieval latency.

    ``art`` need not be the model trained on ``train``: an older version (the
    champion a candidate is gated against) is measured on the same users and
    held-out items; a held-out item its catalogue does not know is a miss.
    """
    vocab = art.vocab
    n_items = len(vocab.item_ids)
    users = sorted(held)
    unknown = iter(range(-1, -10 ** 9, -1))  # rows no index returns: items this version does not know
    relevant = [{vocab.item_index.get(i, next(unknown)) for i in held[u]} for u in users]
    seen_items = train.groupby("user")["item"].agg(list).to_dict()
    seen = [np.fromiter((vocab.item_index[i] for i in seen_items.get(u, ()) if i in vocab.item_index), dtype=np.int64)
            for u in users]
    sample = np.random.default_rng(seed).choice(len(users), min(LATENCY_SAMPLE, len(users)), replace=False)
    snap = snap or build_snapshot(vocab.item_ids, art.item_embeddings, art.version, kind=index_kind)
    encoder = art.encoder()
    recents, times = query_for_users(train, users, art.model.config.history_len)

    def retrieve(qvecs: np.ndarray, seen_rows: Sequence[np.ndarray]) -> list[list[int]]:
        depth = min(n_items, 20 + max(len(s) for s in seen_rows))
        _, rows = snap.search(qvecs, depth)
        out = []
        for found, s in zip(rows, seen_rows, strict=True):
            sset = set(s.tolist())
            out.append([int(r) for r in found if r >= 0 and r not in sset][:20])
        return out

    ranked: list[list[int]] = []
    for start in range(0, len(users), 1024):
        end = start + 1024
        ranked.extend(retrieve(encoder.encode(users[start:end], recents[start:end], times[start:end]),
                               seen[start:end]))
    metrics: dict[str, Any] = ranking_metrics(ranked, relevant, n_items)
    metrics["recall_at_k"] = recall_curve(ranked, relevant, 20)  # K = 1..20, for the run report's plot
    metrics |= _latency(lambda i: retrieve(encoder.encode([users[i]], [recents[i]], [times[i]]), [seen[i]]), sample)
    return metrics | {"index": snap.kind, "index_recall_at_20": snap.measured_recall}


def evaluate_recs(df: pd.DataFrame, *, epochs: int = 8, dim: int = 64, batch_size: int = 512, lr: float = 3e-3,
                  ease_lambda: float = 200.0, knn_neighbours: int = 100, seed: int = 7, progress: bool = True,
                  index_kind: str = "auto", log: Callable[[str], None] | None = None,
                  **train_options: Any) -> dict[str, Any]:
    """Train the two-tower and the baselines on the split and report the same metrics for each."""
    say = log or (lambda _msg: None)
    t0 = time.perf_counter()
    train, held = temporal_split(df)
    if not held:
        raise ValueError("no user has held-out interactions: need users with at least 5 interactions")
    say(f"split: {len(train):,} training interactions, {len(held):,} users evaluated")
    art = train_two_tower(train, dim=dim, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                          progress=progress, **train_options)
    vocab = art.vocab
    n_items = len(vocab.item_ids)
    users = sorted(held)
    relevant = [{vocab.item_index[i] for i in held[u]} for u in users]
    user_row = {u: r for r, u in enumerate(sorted(train["user"].unique()))}
    item_rows = np.fromiter((vocab.item_index[i] for i in train["item"]), dtype=np.int64, count=len(train))
    x = interaction_matrix(train["user"].map(user_row).to_numpy(), item_rows, len(user_row), n_items)
    seen = [x.indices[x.indptr[user_row[u]]:x.indptr[user_row[u] + 1]] for u in users]
    rng = np.random.default_rng(seed)
    sample = rng.choice(len(users), min(LATENCY_SAMPLE, len(users)), replace=False)

    snap = build_snapshot(vocab.item_ids, art.item_embeddings, art.version, kind=index_kind)
    results: dict[str, Any] = {"two_tower": two_tower_metrics(art, train, held, seed=seed, snap=snap)}
    encoder = art.encoder()
    recents, times = query_for_users(train, users, art.model.config.history_len)

    # -- baselines ------------------------------------------------------------------------------------
    baselines: list[Any] = [Popularity(), ItemKNN(knn_neighbours)]
    skipped = {}
    if n_items <= EASE_MAX_ITEMS:
        baselines.append(EASE(ease_lambda))
    else:
        skipped["ease"] = f"catalog of {n_items:,} items exceeds {EASE_MAX_ITEMS:,} (items x items inverse)"
    rows_of = np.asarray([user_row[u] for u in users])
    for model in baselines:
        fit_start = time.perf_counter()
        model.fit(x)
        ranks: list[list[int]] = []
        for start in range(0, len(users), 1024):
            chunk = rows_of[start:start + 1024]
            ranks.extend(_top_unseen(model.scores(x[chunk]), seen[start:start + 1024], 20))
        metrics = ranking_metrics(ranks, relevant, n_items)
        metrics |= _latency(lambda i, m=model: _top_unseen(m.scores(x[rows_of[i:i + 1]]), [seen[i]], 20), sample)
        metrics["fit_s"] = round(time.perf_counter() - fit_start, 3)
        results[model.name] = metrics
        say(f"baseline {model.name}: recall@20 {metrics['recall_at_20']:.4f}")
        if model.name == "ease":
            ease_model = model

    # -- hybrids of the two-tower and EASE, measured, not deployed (issue 16 item 3) -----------------
    hybrids: dict[str, Any] = {}
    if "ease" in results:
        hybrids = _hybrids(ease_model, x, rows_of, seen, relevant, n_items, art, encoder, users, recents, times,
                           snap)
        for name, m in hybrids.items():
            say(f"hybrid {name}: recall@20 {m['recall_at_20']:.4f}")

    two_tower = results.pop("two_tower")
    two_tower |= {"model_version": art.version, "train_seconds": art.metadata["train_seconds"],
                  "examples": art.metadata["examples"], "target_window": art.metadata["target_window"]}
    # what `kestrel train recs` deploys, whatever its parts: today the two-tower alone (issue 16 adds parts)
    deployed = {"deployed": "two_tower", **_round(two_tower)}
    return {"kestrel": deployed, "two_tower": _round(two_tower),
            "baselines": {k: _round(v) for k, v in results.items()},
            "hybrids": {k: _round(v) for k, v in hybrids.items()},
            "users_evaluated": len(users), "items": n_items, "train_interactions": len(train),
            "skipped": skipped, "seconds": round(time.perf_counter() - t0, 2), "artifact": art}


def _hybrids(ease: Any, x: Any, rows_of: np.ndarray, seen: Sequence[np.ndarray], relevant: Sequence[set[int]],
             n_items: int, art: Any, encoder: Any, users: Sequence[str], recents: Any, times: Any,
             snap: Any, candidates: int = 200) -> dict[str, dict[str, Any]]:
    """Two ways to combine the two-tower with EASE, on the same split (research: nothing here is served).

    ``rerank``: the two-tower's top ``candidates`` unseen items (its FAISS
    retrieval, as served) ordered by EASE's score. ``blend``: both scores
    standardised per user over the whole catalogue and added.
    """
    items = np.asarray(art.item_embeddings, dtype=np.float32)
    rerank: list[list[int]] = []
    blend: list[list[int]] = []
    for start in range(0, len(users), 1024):
        end = min(start + 1024, len(users))
        q = encoder.encode(users[start:end], recents[start:end], times[start:end])
        e = ease.scores(x[rows_of[start:end]])
        _, found = snap.search(q, min(n_items, candidates + max(len(s) for s in seen[start:end])))
        for j, (cand, s) in enumerate(zip(found, seen[start:end], strict=True)):
            sset = set(s.tolist())
            pool = [int(r) for r in cand if r >= 0 and r not in sset][:candidates]
            rerank.append(sorted(pool, key=lambda r, row=e[j]: -row[r])[:20])
        t = q @ items.T

        def z(m: np.ndarray) -> np.ndarray:
            return (m - m.mean(axis=1, keepdims=True)) / (m.std(axis=1, keepdims=True) + 1e-9)

        blend.extend(_top_unseen(z(t) + z(e), seen[start:end], 20))
    return {"two_tower_candidates_ease_rerank": ranking_metrics(rerank, relevant, n_items),
            "two_tower_ease_blend": ranking_metrics(blend, relevant, n_items)}


def _round(d: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}
