"""The fraud models that running experiments' variants name, loaded beside the served one.

A variant may run a model (``Variant.model``: a registry version, or an
alias such as ``challenger``). Each worker keeps those models loaded, each
with its own shared online learner (one per version, as the served model's),
so that a payment routed to the variant is scored by its model and every
label teaches every loaded version.

Loading never holds a batch up: the models are resolved and loaded in a
thread, off the event loop (files checked against the registered checksum, a
smoke batch scored, as for a hot swap), and until a variant's model is ready
its units are simply not enrolled: a payment is exposed to a variant only
when the variant really decided it. Aliases are resolved again every
``refresh_s``, so moving ``challenger`` changes what the variant runs within
seconds; a model no running experiment names any more is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import redis.asyncio as aioredis

from kestrel.feature_store.keys import KeySpace
from kestrel.models.fraud_model import ModelScorer
from kestrel.models.policy import Policy
from kestrel.models.registry import ModelRecord, Registry, is_registry
from kestrel.streams.worker.model_updates import load_checked_scorer
from kestrel.streams.worker.shared_learner import SharedLearner

log = logging.getLogger("kestrel.worker")


class VariantModels:
    """``ref`` (version or alias) -> a ready scorer and its shared learner, for the refs the worker is told."""

    def __init__(self, registry_root: str, policy: Policy, client: aioredis.Redis, keys: KeySpace, ttl_s: int,
                 refresh_s: float = 5.0, on_result: Callable[[str], None] | None = None,
                 load: Callable[[ModelRecord, Policy], ModelScorer] = load_checked_scorer) -> None:
        self.registry = Registry(registry_root, "fraud") if registry_root and is_registry(registry_root, "fraud") \
            else None
        self.policy = policy
        self.client, self.keys, self.ttl_s = client, keys, ttl_s
        self.refresh_s = refresh_s
        self.on_result = on_result or (lambda _result: None)
        self._load = load
        self._wanted: frozenset[str] = frozenset()
        self._ready: dict[str, tuple[ModelScorer, SharedLearner]] = {}  # ref -> what it runs now
        self._failed: dict[str, str] = {}  # ref -> the version that failed to load (not retried until it moves)
        self._task: asyncio.Task[None] | None = None
        self._checked = 0.0
        self._warned: set[str] = set()

    def want(self, refs: Iterable[str]) -> None:
        """The refs running experiments name (called per batch: cheap when nothing changed)."""
        refs = frozenset(refs)
        changed = refs != self._wanted
        self._wanted = refs
        for gone in set(self._ready) - refs:
            del self._ready[gone]
        if refs and (changed or time.monotonic() - self._checked >= self.refresh_s) and \
                (self._task is None or self._task.done()):
            self._checked = time.monotonic()
            self._task = asyncio.ensure_future(self._refresh(refs))

    def ready(self, ref: str) -> tuple[ModelScorer, SharedLearner] | None:
        """The scorer ``ref`` runs and its learner, or None while it is not loaded (or cannot be)."""
        return self._ready.get(ref)

    def loaded(self) -> list[tuple[ModelScorer, SharedLearner]]:
        """Every distinct version loaded (what labels also teach)."""
        return list({scorer.version: (scorer, learner) for scorer, learner in self._ready.values()}.values())

    async def settle(self) -> None:
        """Wait for a refresh in flight (tests, warm-up)."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def _refresh(self, refs: frozenset[str]) -> None:
        try:
            for ref in sorted(refs):
                await self._refresh_one(ref)
        except Exception:  # never let a background refresh die unseen: the next batch starts another
            log.exception("variant models: refresh failed")

    async def _refresh_one(self, ref: str) -> None:
        if self.registry is None:
            self._warn(ref, "the fraud model is not a registry (KESTREL_FRAUD_MODEL): variant models cannot load")
            return
        try:
            record = await asyncio.to_thread(self.registry.resolve, ref)
        except Exception as exc:
            self._warn(ref, f"does not resolve in the registry: {exc}")
            self._ready.pop(ref, None)
            return
        current = self._ready.get(ref)
        if current is not None and current[0].version == record.version:
            return
        if self._failed.get(ref) == record.version:
            return
        same = next((pair for pair in self._ready.values() if pair[0].version == record.version), None)
        try:
            scorer = same[0] if same is not None else await asyncio.to_thread(self._load, record, self.policy)
        except Exception:
            self._failed[ref] = record.version
            self.on_result("failed")
            log.exception("variant model %s (%s) failed to load; its variant enrols no one", ref, record.version)
            return
        if ref in self._wanted:
            self._ready[ref] = (scorer, same[1] if same is not None else
                                SharedLearner(self.client, self.keys, scorer, self.ttl_s))
            self._failed.pop(ref, None)
            self.on_result("loaded")
            log.warning("variant model %s: %s loaded", ref, record.version)

    def _warn(self, ref: str, why: str) -> None:
        if ref not in self._warned:
            self._warned.add(ref)
            log.warning("variant model %s %s; its variant enrols no one", ref, why)


def model_refs(experiments: Iterable[Any]) -> set[str]:
    """The model refs the variants of ``experiments`` name."""
    return {v.model for exp in experiments for v in exp.variants if v.model}
