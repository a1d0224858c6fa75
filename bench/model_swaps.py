"""Memory and time of model hot swaps: N swaps through the worker's own load and swap path.

    .venv/bin/python bench/model_swaps.py [--swaps 50] [--artifact DIR] [--json]
    .venv/bin/python bench/model_swaps.py --kind recs [--swaps 50] [--artifact DIR] [--json]

``--kind recs``: the recommender instead (towers and FAISS index): two
registered versions of one two-tower artifact, the service's alias moved N
times, each move rung as an announcement rings it (``ring()``: checksum,
load, index build in a thread, atomic swap), 200 users recommended after
each; the control is the same recommendations with no move.

Registers two versions of one trained artifact (trained here in seconds if
``--artifact`` is not given), then alternates them N times, each time as a
worker does on an alias move (``load_checked_scorer``: checksum, load,
smoke batch; then ``Processor.swap_scorer``), and processes a batch of 500
payments through ``Processor.process`` with the new version, so the old
one's last references are gone as they would be in a worker. Before that,
the same number of batches with no swap: their growth (new cards and
terminals in the caches) is the control. Reports the process's resident
memory (``/proc/self/statm``) growth in both, and the load time per swap.
Redis must be running.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis

from kestrel.feature_store import topics
from kestrel.feature_store.erase import delete_matching
from kestrel.models.registry import ModelRecord, Registry
from kestrel.offline.simulator import SimConfig, Simulator
from kestrel.streams.config import Settings
from kestrel.streams.metrics import Metrics
from kestrel.streams.records import RawRecord
from kestrel.streams.worker.model_updates import load_checked_scorer
from kestrel.streams.worker.processing import Processor, fraud_policy


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def two_versions(artifact: Path, tmp: Path, kind: str, meta_file: str) -> tuple[Registry, list[ModelRecord]]:
    """A registry of ``kind`` holding two copies of ``artifact`` under two versions (same weights)."""
    registry = Registry(tmp / "registry", kind)
    meta = json.loads((artifact / meta_file).read_text())
    records = []
    for suffix in ("a", "b"):
        target = tmp / "artifacts" / f"{meta['version']}-{suffix}"
        shutil.copytree(artifact, target)
        (target / meta_file).write_text(json.dumps({**meta, "version": target.name}))
        records.append(registry.register(ModelRecord.new(kind, target.name, target)))
    return registry, records


async def run(swaps: int, artifact: Path, tmp: Path) -> dict[str, object]:
    registry, versions = two_versions(artifact, tmp, "fraud", "meta.json")
    settings = Settings.from_env().with_(redis_prefix=f"bench-swaps-{secrets.token_hex(4)}",
                                         fraud_model=str(tmp / "registry"))
    registry.move("champion", versions[0].version, action="force", why="bench")
    client = aioredis.Redis.from_url(settings.redis_url)
    proc = Processor(settings, client, Metrics())
    sims = (r for r in Simulator(SimConfig(invalid_share=0.0)).records() if r.kind == "transaction")
    offsets = itertools.count()

    async def one_batch() -> None:
        batch = [RawRecord(topics.TRANSACTIONS, 0, next(offsets), r.key or b"", r.value, {}, None)
                 for r in itertools.islice(sims, 500)]
        await proc.mark_delivered(await proc.process(topics.TRANSACTIONS, batch))

    await proc.warm_up()
    for _ in range(10):
        await one_batch()

    async def rounds(swap: bool) -> tuple[list[float], list[float]]:
        rss, load_s = [], []
        for i in range(swaps):
            if swap:
                record = versions[(i + 1) % 2]
                t0 = time.perf_counter()
                scorer = await asyncio.to_thread(load_checked_scorer, record, fraud_policy(settings))
                load_s.append(time.perf_counter() - t0)
                proc.swap_scorer(scorer)
            await one_batch()
            gc.collect()
            rss.append(rss_mb())
            print(f"\r{'swap' if swap else 'batch without swap'} {i + 1}/{swaps}: {proc.scorer.version}, "
                  f"rss {rss[-1]:.0f} MB", end="", file=sys.stderr)
        return rss, load_s

    control, _ = await rounds(swap=False)  # the same batches with no swap: what the batches alone add
    rss, load_s = await rounds(swap=True)
    print(file=sys.stderr)
    delete_matching(__import__("redis").Redis.from_url(settings.redis_url), f"{settings.redis_prefix}:*")
    await client.aclose()
    load_s.sort()
    return {"swaps": swaps, "rss_mb_before_swaps": round(rss[0], 1), "rss_mb_after_last": round(rss[-1], 1),
            "rss_growth_mb_with_swaps": round(rss[-1] - rss[0], 1),
            "rss_growth_mb_same_batches_without_swaps": round(control[-1] - control[0], 1),
            "load_s_p50": round(load_s[len(load_s) // 2], 3), "load_s_max": round(load_s[-1], 3)}


async def run_recs(swaps: int, artifact: Path, tmp: Path) -> dict[str, object]:
    from kestrel.feature_store.keys import KeyedHasher, KeySpace
    from kestrel.streams.recs.service import RecommendationService, RecOptions

    registry, records = two_versions(artifact, tmp, "recs", "metadata.json")
    versions = [r.version for r in records]
    registry.move("champion", versions[0], action="force", why="bench")
    settings = Settings.from_env()
    client = aioredis.Redis.from_url(settings.redis_url)
    service = RecommendationService(client, KeySpace(f"bench-recs-swaps-{secrets.token_hex(4)}"),
                                    KeyedHasher(b"bench"), str(tmp / "registry"))
    await service.wait_loaded()
    users = [f"user-{i}" for i in range(200)]

    async def rounds(swap: bool) -> tuple[list[float], list[float]]:
        rss, load_s = [], []
        for i in range(swaps):
            if swap:
                want = versions[(i + 1) % 2]
                registry.move("champion", want, action="force", why="bench")
                t0 = time.perf_counter()
                service.ring()
                while service.version != want:
                    await asyncio.sleep(0.005)
                load_s.append(time.perf_counter() - t0)
            await service.recommend(users, RecOptions())
            gc.collect()
            rss.append(rss_mb())
            print(f"\r{'swap' if swap else 'batch without swap'} {i + 1}/{swaps}: {service.version}, "
                  f"rss {rss[-1]:.0f} MB", end="", file=sys.stderr)
        return rss, load_s

    control, _ = await rounds(swap=False)
    rss, load_s = await rounds(swap=True)
    print(file=sys.stderr)
    await client.aclose()
    load_s.sort()
    return {"kind": "recs", "swaps": swaps, "rss_mb_before_swaps": round(rss[0], 1),
            "rss_mb_after_last": round(rss[-1], 1), "rss_growth_mb_with_swaps": round(rss[-1] - rss[0], 1),
            "rss_growth_mb_same_batches_without_swaps": round(control[-1] - control[0], 1),
            "load_s_p50": round(load_s[len(load_s) // 2], 3), "load_s_max": round(load_s[-1], 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swaps", type=int, default=50)
    parser.add_argument("--kind", choices=["fraud", "recs"], default="fraud")
    parser.add_argument("--artifact", type=Path, default=None,
                        help="a trained artifact of that kind (default: train one)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        artifact = args.artifact
        if args.kind == "recs":
            if artifact is None:
                from kestrel.offline.recs_data import simulated_interactions
                from kestrel.offline.recs_train import train_two_tower
                from kestrel.streams.cli.recs import load_interactions_frame

                art = train_two_tower(load_interactions_frame(simulated_interactions(30_000)), epochs=2, progress=False)
                artifact = art.save(Path(tmp) / "trained")
            result = asyncio.run(run_recs(args.swaps, Path(artifact), Path(tmp)))
            print(json.dumps(result) if args.json else "\n".join(f"{k:>30}  {v}" for k, v in result.items()))
            return 0
        if artifact is None:
            from kestrel.offline.fraud_train import train_on_simulated_history

            model = train_on_simulated_history(Path(tmp) / "trained", days=4, payments_per_day=3000, epochs=3)
            artifact = Path(tmp) / "trained" / model.version
        result = asyncio.run(run(args.swaps, artifact, Path(tmp)))
    print(json.dumps(result) if args.json else "\n".join(f"{k:>30}  {v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
