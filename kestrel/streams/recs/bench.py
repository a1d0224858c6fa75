"""``kestrel bench recs``: end-to-end recommendation latency and FAISS recall by catalog size.

What one request does here is what the worker does: one Redis round trip
(recent items, seen items, excluded items, trending), the query tower on
the user's history, a FAISS search, the seen-item filter. Requests run one
after another on one connection, so requests/s is for one serving coroutine.

The model is a small two-tower trained on simulated shoppers (seconds); the
catalog of each size is synthesised around its trained item vectors
(Gaussian noise, re-normalised, biases kept), so the queries are real query
tower outputs against a catalog with the model's geometry. Recall@20 is
FAISS against exact search for held-out queries (not the tuning sample).
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from kestrel.models.retrieval import build_snapshot, exact_top_k, recall_at_k

NOISE = 0.35


def synth_catalog(base: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` item vectors near the trained ones: tower part perturbed and re-normalised, bias kept."""
    pick = rng.integers(0, len(base), n)
    tower = base[pick, :-1] + rng.normal(0, NOISE / np.sqrt(base.shape[1] - 1), (n, base.shape[1] - 1))
    tower /= np.linalg.norm(tower, axis=1, keepdims=True)
    return np.hstack([tower, base[pick, -1:]]).astype(np.float32)


def run_bench(sizes: list[int], requests: int = 2000, dim: int = 64, index_kind: str = "auto",
              redis_url: str | None = None, seed: int = 7,
              log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    return asyncio.run(_bench(sizes, requests, dim, index_kind, redis_url, seed, log or (lambda _m: None)))


async def _bench(sizes: list[int], requests: int, dim: int, index_kind: str, redis_url: str | None, seed: int,
                 say: Callable[[str], None]) -> list[dict[str, Any]]:
    import os

    import faiss
    import redis.asyncio as aioredis

    from kestrel.feature_store.keys import KeyedHasher, KeySpace
    from kestrel.offline.recs_data import load_interactions, recent_distinct, simulated_interactions
    from kestrel.offline.recs_train import train_two_tower
    from kestrel.streams.recs.service import RecommendationService, RecOptions, _Live
    from kestrel.streams.services import LocalRedis

    build_threads = faiss.omp_get_max_threads()
    rng = np.random.default_rng(seed)
    say("training a small two-tower on simulated shoppers ...")
    raw = simulated_interactions(30_000, seed=seed)
    df = load_interactions(_csv(raw), "user_id", "item_id", "timestamp", category_col="category")
    art = train_two_tower(df, dim=dim, epochs=4, progress=False)
    users = sorted(df["user"].unique())
    histories = {u: recent_distinct(g["item"].tolist(), 50) for u, g in df.groupby("user")}

    local = LocalRedis(redis_url or os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")).start()
    client = aioredis.Redis.from_url(local.url)
    prefix = f"kestrel-bench-recs-{secrets.token_hex(4)}"
    keys, hasher = KeySpace(prefix), KeyedHasher(b"bench")
    service = RecommendationService(client, keys, hasher)
    rows: list[dict[str, Any]] = []
    try:
        pipe = client.pipeline(transaction=False)
        for u in users:
            t = hasher.token("user", u)
            hist = histories[u]
            pipe.zadd(keys.entity_part("user", t, "recent_items"), {item: -i for i, item in enumerate(hist)})
            pipe.sadd(keys.entity_part("user", t, "seen_items"), *hist)
        counts = df["item"].value_counts()
        pipe.zadd(keys.global_("item_popularity"), dict(zip(counts.index, map(float, counts.to_numpy()),
                                                            strict=True)))
        await pipe.execute()
        enc = art.encoder()
        tune_users = [users[i] for i in rng.integers(0, len(users), 300)]
        test_users = [users[i] for i in rng.integers(0, len(users), 300)]
        tune_q = enc.encode(tune_users, [histories[u] for u in tune_users])
        test_q = enc.encode(test_users, [histories[u] for u in test_users])
        for n in sizes:
            vectors = synth_catalog(art.item_embeddings, n, rng)
            ids = [f"item_{j}" if j < len(art.vocab.item_ids) else f"synth_{j}" for j in range(n)]
            say(f"{n:,} items: building the index ...")
            faiss.omp_set_num_threads(build_threads)
            snap = build_snapshot(ids, vectors, art.version, kind=index_kind, queries=tune_q)
            faiss.omp_set_num_threads(1)  # as the worker serves: one thread per query
            live = _Live(art, {})
            service.holder.swap(dataclasses.replace(snap, extra=live, row_of=snap.row_of))
            _, found = snap.search(test_q, 20)
            recall = recall_at_k(found, exact_top_k(vectors, test_q, 20))
            search_ms = []
            for q in test_q:
                t0 = time.perf_counter()
                snap.search(q[None, :], 20)
                search_ms.append((time.perf_counter() - t0) * 1000)
            say(f"{n:,} items: {snap.kind} built in {snap.build_s:.1f}s, recall@20 {recall:.3f}; "
                f"{requests:,} requests ...")
            opts = RecOptions(20)
            for u in users[:50]:  # warm-up
                await service.recommend([u], opts)
            lat = []
            picks = rng.integers(0, len(users), requests)
            t_all = time.perf_counter()
            for i in picks:
                t0 = time.perf_counter()
                (res,) = await service.recommend([users[i]], opts)
                lat.append((time.perf_counter() - t0) * 1000)
                assert res.path == "personalised"
            total = time.perf_counter() - t_all
            rows.append({"items": n, "p50_ms": round(float(np.percentile(lat, 50)), 3),
                         "p99_ms": round(float(np.percentile(lat, 99)), 3),
                         "requests_per_s": round(requests / total, 1), "faiss_recall_at_20": round(recall, 4),
                         "index": snap.kind, "index_params": _params(snap.search_params),
                         "build_s": round(snap.build_s, 2),
                         "faiss_search_p50_ms": round(float(np.percentile(search_ms, 50)), 4),
                         "faiss_search_p99_ms": round(float(np.percentile(search_ms, 99)), 4)})
            say(str(rows[-1]))
    finally:
        from kestrel.feature_store.erase import delete_matching

        await asyncio.to_thread(_erase, local.url, prefix, delete_matching)
        await client.aclose()
        local.stop()
    return rows


def _params(params: Any) -> dict[str, int] | None:
    if params is None:
        return None
    for name in ("efSearch", "nprobe"):
        if hasattr(params, name):
            return {name: int(getattr(params, name))}
    return None


def _erase(url: str, prefix: str, delete_matching: Callable[..., Any]) -> None:
    import redis

    delete_matching(redis.Redis.from_url(url), f"{prefix}:*")


def _csv(df: Any) -> Any:
    import io

    buf = io.StringIO()
    df.to_csv(buf, index=False)
    buf.seek(0)
    return buf
