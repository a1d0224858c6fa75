"""The workers' online fraud learner: one per model version, shared through Redis.

Every worker scores with the same learner and every label teaches it, so a
new fraud pattern is learned from all of its labels, whichever partition or
worker they land on. Updates are compare-and-set on a revision number: a
label batch loads the latest checkpoint, learns, and writes it back only if
no other worker wrote in between (else it reloads and learns again). Labels
are rare next to payments, so retries are rare too. The checkpoint carries
the ids of the labels it learned, so a batch replayed after a crash, or a
label sent twice, is learned exactly once. Scoring uses a cached copy that
is refreshed when the revision moved (checked at most every ``refresh_s``).

The checkpoint is plain JSON data (see :mod:`kestrel.models.fraud_online`): a blob
that is not one, such as a pickle from an older version or a damaged or
edited one, is refused without running any of it; the worker logs a warning
and carries on with a fresh learner, which the next label batch saves over it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import redis.asyncio as aioredis

from kestrel.feature_store.keys import KeySpace
from kestrel.feature_store.scripts import load_lua
from kestrel.models.fraud_online import OnlineFraudLearner

if TYPE_CHECKING:
    from kestrel.models.fraud_model import ModelScorer

T = TypeVar("T")
log = logging.getLogger("kestrel.worker")

# KEYS[1] checkpoint hash; ARGV: expected revision ("" = none yet), new blob, ttl. Returns 1 if written.
CAS_LUA = load_lua(__file__, "learner_cas")


class SharedLearner:
    """The online learner of one model version, checkpointed in one Redis hash."""

    def __init__(self, client: aioredis.Redis, keys: KeySpace, scorer: ModelScorer, ttl_s: int,
                 refresh_s: float = 2.0, max_attempts: int = 20) -> None:
        self.client = client
        self.scorer = scorer
        self.key = keys.global_(f"online_fraud:{scorer.version}")
        self.ttl_s = ttl_s
        self.refresh_s = refresh_s
        self.max_attempts = max_attempts
        self._cas = client.register_script(CAS_LUA)
        self._cached: OnlineFraudLearner | None = None
        self._rev = ""
        self._checked = 0.0

    async def current(self) -> OnlineFraudLearner:
        """The learner to score with: cached, reloaded when another batch or worker has taught it since."""
        now = time.monotonic()
        if self._cached is None or now - self._checked >= self.refresh_s:
            self._checked = now
            rev = await self.client.hget(self.key, "rev")
            rev_s = rev.decode() if rev else ""
            if self._cached is None or rev_s != self._rev:
                await self._load()
        assert self._cached is not None
        return self._cached

    async def _load(self) -> tuple[OnlineFraudLearner, str]:
        blob, rev = await self.client.hmget(self.key, ["blob", "rev"])
        learner = None
        if blob:
            try:
                learner = OnlineFraudLearner.loads(blob)
            except ValueError as e:
                log.warning("online learner %s: checkpoint refused, starting from a fresh learner: %s", self.key, e)
        if learner is None:
            learner = self.scorer.new_learner()
        self._cached, self._rev = learner, rev.decode() if rev else ""
        return learner, self._rev

    async def update(self, teach: Callable[[OnlineFraudLearner], T]) -> T:
        """Apply ``teach`` to the latest learner and save it atomically; retried on a concurrent update.

        ``teach`` must only touch the learner it is given (it may run more than once).
        """
        for attempt in range(self.max_attempts):
            learner, rev = await self._load()
            result = teach(learner)
            if await self._cas(keys=[self.key], args=[rev, learner.dumps(), self.ttl_s]):
                self._rev = str((int(rev) if rev else 0) + 1)
                self._checked = time.monotonic()
                return result
            # Lost the race: back off a random, growing while, so that workers in lockstep stop colliding
            # (without it, one worker could lose every round to the others and run out of attempts).
            await asyncio.sleep(random.uniform(0.0, min(0.002 * 2 ** attempt, 0.1)))
        raise RuntimeError(f"online learner {self.key}: {self.max_attempts} concurrent updates in a row")
