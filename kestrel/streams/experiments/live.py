"""The running experiments a worker routes by: read from Redis, cached, refreshed when their revision moves.

A ramp or a stop made with ``kestrel experiments`` reaches every worker
within ``refresh_s`` (one ``GET`` of the revision counter per check); the
definitions are read again only when it moved.
"""

from __future__ import annotations

import logging
import time

import redis.asyncio as aioredis

from kestrel.feature_store.keys import KeySpace
from kestrel.models.experiments import Experiment

log = logging.getLogger("kestrel.worker")


class LiveExperiments:
    def __init__(self, client: aioredis.Redis, keys: KeySpace, refresh_s: float = 1.0) -> None:
        self.client = client
        self.keys = keys.experiments
        self.refresh_s = refresh_s
        self._revision: bytes | None = None
        self._running: dict[str, list[Experiment]] = {}
        self._checked = float("-inf")

    async def running(self, target: str) -> list[Experiment]:
        """The running experiments of ``target`` (``fraud`` or ``recs``), as of at most ``refresh_s`` ago."""
        now = time.monotonic()
        if now - self._checked >= self.refresh_s:
            self._checked = now
            revision = await self.client.get(self.keys.revision)
            if revision != self._revision:
                experiments = []
                for raw in await self.client.hvals(self.keys.definitions):
                    try:
                        experiments.append(Experiment.model_validate_json(raw))
                    except ValueError:  # written around the store: never route by it, never stall on it
                        log.warning("experiment definition refused (not a valid experiment): %.200r", raw)
                self._running = {t: sorted((e for e in experiments if e.status == "running" and e.target == t),
                                           key=lambda e: e.key) for t in ("fraud", "recs")}
                self._revision = revision
        return self._running.get(target, [])
