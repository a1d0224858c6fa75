"""The worker's online fraud learners: one per input partition, checkpointed in Redis.

Labels and payments are both keyed by the card, so a partition's labels and
payments meet in the same worker. Keeping a learner per partition (like a
Faust table) lets partitions move between workers on a rebalance without two
workers overwriting one model: the new owner loads the partition's
checkpoint, and every label batch writes it back before its outputs are
sent (so before its offsets can be committed). The checkpoint carries the
ids of the labels it learned, so a batch replayed after a crash is learned
exactly once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import redis.asyncio as aioredis

from feature_store.keys import KeySpace
from models.fraud_online import OnlineFraudLearner

if TYPE_CHECKING:
    from models.fraud_model import ModelScorer


class PartitionLearners:
    """Learners by partition for one model version; a cache in front of Redis checkpoints."""

    def __init__(self, client: aioredis.Redis, keys: KeySpace, scorer: ModelScorer) -> None:
        self.client = client
        self.keys = keys
        self.scorer = scorer
        self._cache: dict[int, OnlineFraudLearner] = {}

    def key(self, partition: int) -> str:
        return self.keys.global_(f"online_fraud:{self.scorer.version}:{partition}")

    async def for_partitions(self, partitions: Iterable[int], fresh: bool = False) -> dict[int, OnlineFraudLearner]:
        """The learner of each partition: cached, else its checkpoint, else the model's starting state.

        ``fresh`` reloads from Redis (the label path does, so it always learns on the authoritative state).
        """
        wanted = sorted(set(partitions))
        missing = [p for p in wanted if fresh or p not in self._cache]
        if missing:
            raw = await self.client.mget([self.key(p) for p in missing])
            for p, blob in zip(missing, raw, strict=True):
                self._cache[p] = OnlineFraudLearner.loads(blob) if blob else self.scorer.new_learner()
        return {p: self._cache[p] for p in wanted}

    async def save(self, partitions: Sequence[int], ttl_s: int) -> None:
        """Persist these partitions' learners (one round trip; overwrites: a checkpoint is the latest state)."""
        pipe = self.client.pipeline(transaction=False)
        for p in sorted(set(partitions)):
            pipe.set(self.key(p), self._cache[p].dumps(), ex=ttl_s)
        await pipe.execute()

    def forget(self, partitions: Iterable[int] | None = None) -> None:
        """Drop cached learners (all, or of revoked partitions): their next use reloads the checkpoint."""
        if partitions is None:
            self._cache.clear()
        for p in partitions or ():
            self._cache.pop(p, None)
