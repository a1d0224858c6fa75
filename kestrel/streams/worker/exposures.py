"""Experiment exposures: each unit's first exposure per experiment, published once and counted once.

An exposure's delivery mark is per (experiment, unit), so the delivery
ledger sends it once across batches, redelivery and restarts (as long as
marks are kept: ``KESTREL_DEDUP_TTL_S``). A bounded memory of the marks this
worker saw delivered keeps it from proposing them again; after a restart
the ledger still decides. Counting (:meth:`Exposures.count`) is sets and
set-once fields, so a replay adds nothing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import orjson
import redis.asyncio as aioredis

from kestrel.feature_store import topics
from kestrel.feature_store.keys import KeySpace
from kestrel.models.experiments import Experiment, Variant
from kestrel.streams.records import Output


class RecentMarks:
    """A bounded set of delivery marks, oldest forgotten first: memory stays bounded however many units.

    >>> m = RecentMarks(2); m.add("a"); m.add("b"); m.add("c"); ("a" in m, "b" in m, "c" in m)
    (False, True, True)
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._marks: dict[str, None] = {}

    def add(self, mark: str) -> None:
        self._marks.pop(mark, None)
        self._marks[mark] = None
        if len(self._marks) > self.limit:
            del self._marks[next(iter(self._marks))]

    def __contains__(self, mark: object) -> bool:
        return mark in self._marks


class Exposures:
    def __init__(self, client: aioredis.Redis, keys: KeySpace, remembered: int = 200_000) -> None:
        self.client, self.keys = client, keys
        self._delivered = RecentMarks(remembered)  # exposures this worker knows delivered: not proposed again

    def mark(self, experiment: str, unit: str) -> str:
        return self.keys.published("exposure", f"{experiment}:{unit}")

    def known(self, experiment: str, unit: str) -> bool:
        """Whether this worker saw the unit's exposure delivered (the ledger would drop it anyway)."""
        return self.mark(experiment, unit) in self._delivered

    def propose(self, exp: Experiment, variant: Variant, unit: str, first: str, version: str, at: str,
                pre: dict[str, float] | None = None) -> Output | None:
        """The unit's exposure to ``variant`` for the ledger (None: known delivered). ``first``: what exposed it;
        ``pre``: the unit's pre-period covariates (CUPED)."""
        if self.known(exp.key, unit):
            return None
        doc = {"type": "exposure", "event_id": f"exposure-{exp.key}:{unit}", "experiment": exp.key,
               "variant": variant.key, "hash_attribute": exp.hash_attribute, "unit": unit, "first_event_id": first,
               "model_version": version, "at": at, **({"pre_period": pre} if pre else {})}
        return Output(topics.EXPOSURES, unit.encode(), orjson.dumps(doc), self.mark(exp.key, unit))

    def delivered(self, outputs: Sequence[Output]) -> None:
        """Remember the exposures among ``outputs``, which the broker acknowledged."""
        for out in outputs:
            if out.topic == topics.EXPOSURES:
                self._delivered.add(out.mark)

    async def count(self, exposures: Sequence[Output]) -> None:
        """Each variant's exposed units (a set per variant: counting twice is impossible), for the SRM check;
        when each unit was first exposed (set once: the start of a recommendation's attribution window); and
        its pre-period covariate (set once)."""
        if not exposures:
            return
        k = self.keys.experiments
        pipe = self.client.pipeline(transaction=False)
        now = repr(time.time())
        for out in exposures:
            doc = orjson.loads(out.value)
            pipe.sadd(k.units(doc["experiment"], doc["variant"]), doc["unit"])
            pipe.hsetnx(k.exposed_at(doc["experiment"]), doc["unit"], now)
            if "pre_period" in doc:
                pipe.hsetnx(k.pre_period(doc["experiment"]), doc["unit"], repr(doc["pre_period"]["engagement"]))
        await pipe.execute()
