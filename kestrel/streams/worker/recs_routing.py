"""Recommendation experiments in every recommendation path: routing, variants' models, exposures, outcomes.

Every path (pushed per interaction batch, ``GET /recommendations``,
``recs.requests``) asks :meth:`RecsRouter.recommend`. For each running
``recs`` experiment the user's token is routed with GrowthBook's assignment;
a variant's parameters (:data:`RECS_PARAMS`) change the user's options, and
a variant that runs another model of the recommendation registry
(``Variant.model``) answers its users with that model, loaded beside the
served one. Outcomes: a click or purchase of an exposed user within the
experiment's attribution window after the first exposure counts once for
the user's variant (:meth:`RecsRouter.outcomes`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import redis.asyncio as aioredis

from kestrel.feature_store.keys import KeyedHasher, KeySpace
from kestrel.feature_store.redis_store import AsyncRedisOnlineStore
from kestrel.feature_store.schemas import Interaction, iso_of
from kestrel.feature_store.sets import USER_ACTIVITY
from kestrel.models.experiments import Experiment, Variant, enrol, route
from kestrel.models.popularity import PopularityRecommender
from kestrel.models.registry import is_registry
from kestrel.streams.experiments.live import LiveExperiments
from kestrel.streams.experiments.results import RECS_OUTCOMES
from kestrel.streams.metrics import Metrics
from kestrel.streams.records import Output
from kestrel.streams.recs.service import RecommendationService, RecOptions, RecResult
from kestrel.streams.worker.exposures import Exposures

# what a recommendation experiment's variant may set (Variant.params), and as what
RECS_PARAMS: dict[str, type] = {"k": int, "mmr_lambda": float, "per_category": int, "fallback_only": bool}


class RecsRouter:
    def __init__(self, served: RecommendationService, experiments: LiveExperiments, exposures: Exposures,
                 store: AsyncRedisOnlineStore, client: aioredis.Redis, keys: KeySpace, hasher: KeyedHasher,
                 metrics: Metrics, registry_root: str, recommender: PopularityRecommender) -> None:
        self.served, self.experiments, self.exposures, self.store = served, experiments, exposures, store
        self.client, self.keys, self.hasher, self.metrics = client, keys, hasher, metrics
        self.registry_root, self.recommender = registry_root, recommender
        self.variants: dict[str, RecommendationService] = {}  # the recs models experiment variants name

    def observe_items(self, items: Sequence[tuple[str, str | None]]) -> None:
        """Items seen in the stream: every loaded model's index takes the new ones."""
        for service in (self.served, *self.variants.values()):
            service.observe_items(items)

    async def recommend(self, user_ids: Sequence[str], options: RecOptions | Sequence[RecOptions],
                        exposures: list[Output]) -> list[RecResult]:
        """Recommendations for raw user ids, through the running experiments; each user's first exposure per
        experiment is appended to ``exposures``, which the caller delivers (through the ledger: once per user).
        An experiment whose variant's model is not loaded yet enrols no one; one model answers a user (a
        second experiment's model variant does not enrol it: run model experiments in one namespace)."""
        experiments = await self.experiments.running("recs")
        if not experiments:
            return await self.served.recommend(user_ids, options)
        opts = [options] * len(user_ids) if isinstance(options, RecOptions) else list(options)
        services = self._services(experiments)
        enrolled: list[tuple[str, list[tuple[Experiment, Variant]]]] = []
        by_service: dict[str | None, list[int]] = {}
        for i, user_id in enumerate(user_ids):
            unit = self.hasher.token("user", user_id)
            enrolment = enrol(experiments, {"user": unit}, loaded=services.__contains__)
            for reason in enrolment.skipped:
                self.metrics.experiments_idle.labels(reason).inc()
            for _, variant in enrolment.variants:
                opts[i] = with_recs_params(opts[i], variant.params)
            enrolled.append((unit, enrolment.variants))
            by_service.setdefault(enrolment.model, []).append(i)
        results: list[RecResult] = [None] * len(user_ids)  # type: ignore[list-item]
        for ref, idx in by_service.items():
            service = self.served if ref is None else services[ref]
            for i, res in zip(idx, await service.recommend([user_ids[i] for i in idx], [opts[i] for i in idx]),
                              strict=True):
                results[i] = res
        at = iso_of(time.time())
        out = []
        new: list[tuple[Experiment, Variant, str, str, str]] = []  # first exposures: exp, variant, unit, user, version
        for user_id, (unit, chosen), res in zip(user_ids, enrolled, results, strict=True):
            if chosen:
                res = replace(res, experiments=tuple({"experiment": exp.key, "variant": v.key,
                                                      "model_version": res.model_version} for exp, v in chosen))
                new += [(exp, v, unit, user_id, res.model_version) for exp, v in chosen
                        if not self.exposures.known(exp.key, unit)]
            out.append(res)
        if new:  # each newly exposed user's engagement before the exposure: the covariate CUPED adjusts by
            users = list(dict.fromkeys(user for _, _, _, user, _ in new))
            before = dict(zip(users, await self.store.read_batch(USER_ACTIVITY, users), strict=True))
            for exp, variant, unit, user_id, version in new:
                pre = {"engagement": float(before[user_id].get("user_clicks_1h", 0.0))
                       + float(before[user_id].get("user_purchases_7d", 0.0))}
                exposure = self.exposures.propose(exp, variant, unit, f"recs:{user_id}", version, at, pre)
                if exposure is not None:
                    exposures.append(exposure)
        return out

    def ring(self, aliases: set[str]) -> None:
        """Aliases of the recs registry were announced as moved: the services serving them check now."""
        for ref, service in [(self.served.alias, self.served), *self.variants.items()]:
            if ref in aliases:
                service.ring()

    def _services(self, experiments: Sequence[Experiment]) -> dict[str, RecommendationService]:
        """The loaded services of the models the variants name (a recs registry's aliases or versions);
        those not loaded yet are started, those no longer named dropped."""
        refs = {v.model for exp in experiments for v in exp.variants if v.model}
        for gone in set(self.variants) - refs:
            del self.variants[gone]
        if not refs or not is_registry(self.registry_root, "recs"):
            return {}
        for ref in refs - set(self.variants):
            self.variants[ref] = RecommendationService(self.client, self.keys, self.hasher, self.registry_root,
                                                       self.recommender, alias=ref)
        ready = {}
        for ref, service in self.variants.items():
            service.refresh()  # loads in a thread; moving the alias swaps it, as for the served model
            if service.loaded:
                ready[ref] = service
        return ready

    async def outcomes(self, events: Sequence[Interaction]) -> None:
        """Clicks and purchases of exposed users, each counted once for the variant they were exposed to, when
        it came within the experiment's attribution window after their first exposure (processing time).
        Call it before the batch's own exposures: a unit's first event is no outcome of its exposure."""
        experiments = await self.experiments.running("recs")
        wanted = [(exp, self.hasher.token("user", e.user_id), outcome) for e in events for exp in experiments
                  for outcome, kinds in RECS_OUTCOMES.items() if e.kind in kinds]
        if not wanted:
            return
        pipe = self.client.pipeline(transaction=False)
        for exp, unit, _ in wanted:
            pipe.hget(self.keys.experiments.exposed_at(exp.key), unit)
        now = time.time()
        n = 0
        for (exp, unit, outcome), since in zip(wanted, await pipe.execute(), strict=True):
            if since is not None and 0.0 <= now - float(since) <= exp.attribution_s:
                routed = route(exp, {"user": unit})  # sticky: the variant the unit was exposed to
                if routed.variant is not None:
                    pipe.sadd(self.keys.experiments.converted(exp.key, routed.variant, outcome), unit)
                    n += 1
        if n:
            await pipe.execute()


def with_recs_params(opts: RecOptions, params: dict[str, Any]) -> RecOptions:
    """``opts`` with a recommendation variant's parameters (the known ones: :data:`RECS_PARAMS`).

    >>> with_recs_params(RecOptions(k=10), {"mmr_lambda": 0.5, "k": 3, "colour": "red"})
    RecOptions(k=3, exclude=(), mmr_lambda=0.5, per_category=None, fallback_only=False)
    """
    changes = {name: cast(params[name]) for name, cast in RECS_PARAMS.items() if name in params}
    return replace(opts, **changes) if changes else opts
