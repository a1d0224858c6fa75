"""Cost of the processing stage alone: worker CPU and Redis CPU per event, no broker, no Faust.

    .venv/bin/python bench/processor_cost.py [--kind transaction|interaction] [--events 10000] [--batch 500] [--json]

Feeds simulated events in batches (500, the worker's size under load; a
light load's batches hold a few events, and ``--batch 10`` shows their fixed
cost as ``batch_ms`` p50/p99) straight into ``Processor.process``
(validation, features, scoring, decisions, outboxes) and marks the outputs
delivered, as a worker does between taking a batch and producing it. Worker
CPU is this process's (``time.process_time``, after ``settle_heap`` as the
worker does); Redis CPU is the server's ``used_cpu_*`` delta, so run it on a
quiet server. ``--commands`` lists the Redis commands per event; ``--experiment`` runs
a fraud experiment on every card (its cost is the difference to a run without).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import secrets
import sys
import time

import numpy as np
import redis
import redis.asyncio as aioredis

from kestrel.feature_store import topics
from kestrel.feature_store.erase import delete_matching
from kestrel.feature_store.keys import KeySpace
from kestrel.models.experiments import Experiment
from kestrel.offline.simulator import SimConfig, Simulator
from kestrel.streams.config import Settings
from kestrel.streams.experiments.store import ExperimentStore
from kestrel.streams.metrics import Metrics
from kestrel.streams.records import RawRecord
from kestrel.streams.worker.heap import settle_heap
from kestrel.streams.worker.processing import Processor


def _redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return info["used_cpu_sys"] + info["used_cpu_user"]


async def run(kind: str, n: int, commands: bool, experiment: bool = False, batch: int = 500) -> dict[str, object]:
    settings = Settings.from_env().with_(redis_prefix=f"bench-proc-{secrets.token_hex(4)}")
    client = aioredis.Redis.from_url(settings.redis_url)
    sync = redis.Redis.from_url(settings.redis_url)
    if experiment:  # a running fraud experiment on every card: routing, variant thresholds, exposures
        store = ExperimentStore(sync, KeySpace(settings.redis_prefix))
        store.create(Experiment.model_validate({
            "key": "bench", "target": "fraud", "hash_attribute": "card", "seed": "bench",
            "variants": [{"key": "control"}, {"key": "lower", "params": {"review_threshold": 0.4}}],
            "primary_metric": "alert_precision", "status": "running"}), "bench")
    proc = Processor(settings, client, Metrics())
    topic = {"transaction": topics.TRANSACTIONS, "interaction": topics.INTERACTIONS}[kind]
    sims = itertools.islice((r for r in Simulator(SimConfig(invalid_share=0.0)).records() if r.kind == kind), n)
    records = [RawRecord(topic, 0, i, r.key or b"", r.value, {}, None) for i, r in enumerate(sims)]
    await proc.warm_up()
    settle_heap()
    stats0, redis0, cpu0, wall0 = sync.info("commandstats"), _redis_cpu(sync), time.process_time(), time.perf_counter()
    batch_s = []
    for i in range(0, len(records), batch):
        t0 = time.perf_counter()
        await proc.mark_delivered(await proc.process(topic, records[i:i + batch]))
        batch_s.append(time.perf_counter() - t0)
        if len(batch_s) % max(1, 500 // batch) == 0:
            print(f"\r{min(i + batch, len(records)):,} / {len(records):,}", end="", file=sys.stderr)
    wall, cpu, redis_cpu = time.perf_counter() - wall0, time.process_time() - cpu0, _redis_cpu(sync) - redis0
    print(file=sys.stderr)
    per_command = {}
    if commands:
        for name, v in sync.info("commandstats").items():
            calls = v["calls"] - stats0.get(name, {"calls": 0})["calls"]
            if calls and name != "cmdstat_info":
                per_command[name.removeprefix("cmdstat_")] = round(calls / len(records), 2)
    delete_matching(sync, f"{settings.redis_prefix}:*")
    await client.aclose()
    return {"kind": kind, "events": len(records), "events_per_s_sequential": round(len(records) / wall, 1),
            "worker_cpu_us_per_event": round(1e6 * cpu / len(records), 1),
            "redis_cpu_us_per_event": round(1e6 * redis_cpu / len(records), 1), "batch": batch,
            "batch_ms": {"p50": round(1e3 * float(np.percentile(batch_s, 50)), 2),
                         "p99": round(1e3 * float(np.percentile(batch_s, 99)), 2)},
            **({"redis_commands_per_event": per_command} if commands else {})}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=["transaction", "interaction"], default="transaction")
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--commands", action="store_true", help="Redis commands per event, by command")
    parser.add_argument("--experiment", action="store_true", help="with a running fraud experiment on every card")
    parser.add_argument("--batch", type=int, default=500, help="events per batch")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = asyncio.run(run(args.kind, args.events, args.commands, args.experiment, args.batch))
    print(json.dumps(result) if args.json else "\n".join(f"{k:>28}  {v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
