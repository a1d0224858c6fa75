"""Each running experiment's results over time, for the experiments page's plots.

Every worker's monitor tick (``KESTREL_GUARDRAIL_CHECK_S``, the guardrail
check's pass over the results) stores a small snapshot of each running
experiment's live results under its time bucket:
the units exposed per variant, the primary metric per variant, and each
variant's difference to control with its always-valid interval. Workers
write the same bucket with the same numbers (the results are read from
Redis, not held by a worker), so several workers give one series, not
several. The oldest snapshots are dropped beyond ``KEEP`` buckets.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
import redis

from kestrel.feature_store.keys import KeySpace
from kestrel.models.experiments import Experiment

KEEP = 5760  # a day of 15-second buckets


def snapshot(report: dict[str, Any], at: float) -> dict[str, Any]:
    """What a plot needs from one results report (pure).

    >>> snapshot({"primary_metric": "recall", "variants": {"a": {"units": 3, "recall": 0.5}, "b": {"units": 2,
    ...           "recall": None}}, "comparisons": {"b": {"note": "too few"}}}, 60.0)
    {'t': 60.0, 'units': {'a': 3, 'b': 2}, 'metric': {'a': 0.5, 'b': None}, 'ci': {'b': None}}
    """
    metric = report["primary_metric"]
    return {"t": at, "units": {v: row["units"] for v, row in report["variants"].items()},
            "metric": {v: row.get(metric) for v, row in report["variants"].items()},
            "ci": {v: c.get("ci") for v, c in report["comparisons"].items()}}


def record(client: redis.Redis, keys: KeySpace, exp: Experiment, report: dict[str, Any], bucket_s: float,
           now: float | None = None) -> None:
    """Store ``report``'s snapshot under the current time bucket; drop the oldest beyond ``KEEP``."""
    now = time.time() if now is None else now
    bucket_s = max(bucket_s, 1.0)
    bucket = int(now // bucket_s)
    key = keys.experiments.series(exp.key)
    pipe = client.pipeline(transaction=False)
    pipe.hset(key, str(bucket), orjson.dumps(snapshot(report, round(bucket * bucket_s, 3))))
    pipe.hlen(key)
    _, size = pipe.execute()
    if size > KEEP:
        oldest = sorted(int(b) for b in client.hkeys(key))[: size - KEEP]
        client.hdel(key, *(str(b) for b in oldest))


def read_series(client: redis.Redis, keys: KeySpace, experiment: str) -> list[dict[str, Any]]:
    """The experiment's snapshots, oldest first."""
    raw = client.hgetall(keys.experiments.series(experiment))
    return [orjson.loads(v) for _, v in sorted(raw.items(), key=lambda kv: int(kv[0]))]
