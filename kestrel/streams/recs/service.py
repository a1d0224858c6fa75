"""Online recommendations: the query vector from the user's current features, FAISS, filters, fallback.

One service behind three front doors: the worker (a recommendation after
every interaction), ``GET /recommendations/{user_id}`` and the
``recs.requests`` -> ``recs.responses`` topic pair. Per request:

1. one Redis round trip reads the user's recent items (the feature store's
   LastN, newest first, already updated by the interaction that just
   happened), seen items, the excluded items (out of stock, blocked) and the
   trending items (interactions of the last 24 hours, weighted by kind);
2. with a model and a history, the query tower turns them into a vector and
   FAISS returns candidates; seen and excluded items are dropped; an optional
   MMR / per-category cap re-ranks; the answer's ``path`` is ``personalised``;
3. without a model, or for a user with no history yet (cold start), the
   trending items the user has not seen: ``path`` is ``fallback``.

The model artifact (``KESTREL_RECS_MODEL``) loads in a thread and is checked
for a newer version every ``RELOAD_CHECK_S``; items first seen in the stream
(with a ``category`` in their context) are embedded by the item tower and
added. Both build a new index aside and swap it in (see
:mod:`kestrel.models.retrieval`): requests never wait for a build.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
import redis.asyncio as aioredis

from kestrel.feature_store.keys import KeyedHasher, KeySpace
from kestrel.feature_store.redis_store import WINDOWED_TOP_LUA, windowed_top_args
from kestrel.feature_store.sets import TRENDING
from kestrel.models.hybrid_recs import POOL, SESSION_ITEMS, blend_rank
from kestrel.models.popularity import PopularityRecommender
from kestrel.models.retrieval import IndexHolder, IndexSnapshot

if TYPE_CHECKING:
    from kestrel.models.two_tower import RecsArtifact

log = logging.getLogger("kestrel.recs")

HISTORY_LEN = 50  # what the feature store keeps (USER_ACTIVITY recent_items LastN(50))
TRENDING_DEPTH = 300  # trending items read per request for the fallback
RELOAD_CHECK_S = 10.0  # a CURRENT file: nothing announces its change
REGISTRY_CHECK_S = 60.0  # a registry: alias moves ring the service (ring()); this poll only backs up a lost one
NEW_ITEMS_BATCH = 64  # items seen in the stream that are buffered before a rebuild
NEW_ITEMS_MAX_WAIT_S = 30.0
EXCLUDED_SET = "recs_excluded"
PERSONALISED, FALLBACK = "personalised", "fallback"


@dataclass(frozen=True)
class RecOptions:
    k: int = 10
    exclude: tuple[str, ...] = ()
    mmr_lambda: float = 1.0  # 1: relevance order; lower trades relevance for variety
    per_category: int | None = None  # at most this many items of one category
    fallback_only: bool = False  # the trending path even with a model: the baseline, for comparisons


@dataclass(frozen=True)
class RecResult:
    items: list[str]
    path: str
    model_version: str
    experiments: tuple[dict[str, str], ...] = ()  # the running experiments that shaped it: experiment, variant


@dataclass
class _Live:
    """What a request reads once: the model's encoder, its categories, and the matching index."""

    artifact: RecsArtifact
    category_of: dict[str, str] = field(default_factory=dict)


async def exclude_items(client: aioredis.Redis, keys: KeySpace, items: Sequence[str], remove: bool = False) -> None:
    """Mark items as not recommendable (out of stock, blocked), or allow them again."""
    if items:
        key = keys.global_(EXCLUDED_SET)
        await (client.srem(key, *items) if remove else client.sadd(key, *items))


class RecommendationService:
    def __init__(self, client: aioredis.Redis, keys: KeySpace, hasher: KeyedHasher, model_path: str = "",
                 fallback: PopularityRecommender | None = None, alias: str = "champion") -> None:
        self.client, self.keys, self.hasher = client, keys, hasher
        self.model_path = model_path
        self.alias = alias  # when model_path is a registry: the alias served (moving it swaps the model)
        self._checksums: dict[str, str] = {}  # registered artifact path -> checksum, checked before loading
        self.fallback = fallback or PopularityRecommender()
        self.holder = IndexHolder()  # snapshot.extra is the _Live of the same model version
        self._loading: asyncio.Task[None] | None = None
        self._next_check = 0.0
        self._loaded_from: str | None = None
        self._warned_missing = False
        self._new_items: dict[str, str] = {}
        self._new_since = 0.0
        self._adding: asyncio.Task[None] | None = None
        self._trending: Any = None  # the windowed-top script, registered on first use

    # -- model lifecycle ---------------------------------------------------------
    @property
    def version(self) -> str:
        snap = self.holder.current
        return snap.version if snap is not None else self.fallback.version

    def _current_target(self) -> str | None:
        """The artifact to serve: the registry alias's version, or the folder ``CURRENT`` names."""
        from kestrel.models.registry import Registry, RegistryError, is_registry
        from kestrel.models.two_tower import resolve_artifact

        if is_registry(self.model_path, "recs"):
            try:
                record = Registry(self.model_path, "recs").resolve(self.alias)
            except RegistryError:
                return None
            self._checksums[record.path] = record.checksum
            return record.path
        try:
            return str(resolve_artifact(self.model_path))
        except FileNotFoundError:
            return None

    def _maybe_reload(self) -> None:
        """Start loading a new artifact in a thread when ``CURRENT`` or the registry alias names one we do not serve
        yet (checked every ``RELOAD_CHECK_S``, or ``REGISTRY_CHECK_S`` for a registry, whose moves ring)."""
        from kestrel.models.registry import is_registry

        if not self.model_path or time.monotonic() < self._next_check:
            return
        registry = is_registry(self.model_path, "recs")
        self._next_check = time.monotonic() + (REGISTRY_CHECK_S if registry else RELOAD_CHECK_S)
        if self._loading is not None and not self._loading.done():
            return
        target = self._current_target()
        if target is None and not self._warned_missing:
            self._warned_missing = True
            log.warning("KESTREL_RECS_MODEL=%s holds no model (yet): serving trending items", self.model_path)
        if target is not None and target != self._loaded_from:
            self._loading = asyncio.get_running_loop().create_task(self._load(target))

    async def _load(self, target: str) -> None:
        try:
            snap = await asyncio.to_thread(self._build, target, self._checksums.get(target))
        except Exception:
            log.exception("could not load the recommendation model at %s; serving the previous one", target)
            self._loaded_from = target  # do not retry a broken artifact every few seconds
            return
        self.holder.swap(snap)
        self._loaded_from = target
        _one_search_thread()
        log.warning("recommendation model %s live (%s index, %d items)", snap.version, snap.kind, snap.size)

    @staticmethod
    def _build(target: str, checksum: str | None = None) -> IndexSnapshot:
        from kestrel.models.registry import artifact_checksum
        from kestrel.models.retrieval import build_snapshot
        from kestrel.models.two_tower import load_artifact

        if checksum is not None and artifact_checksum(target) != checksum:  # a registered version, changed on disk
            raise ValueError(f"{target}: the files differ from the registered checksum; not loaded")
        art = load_artifact(target)
        snap = build_snapshot(art.vocab.item_ids, art.item_embeddings, art.version)
        live = _Live(art, dict(zip(art.vocab.item_ids, art.vocab.item_category, strict=True)))
        return dataclasses.replace(snap, extra=live, row_of=snap.row_of)

    @property
    def loaded(self) -> bool:
        """Whether a model serves (else every answer is the trending fallback)."""
        return self.holder.current is not None

    def refresh(self) -> None:
        """Check ``CURRENT`` or the alias (at most every ``RELOAD_CHECK_S``), for a service not asked yet."""
        self._maybe_reload()

    def ring(self) -> None:
        """An alias move was announced (``models.updates``): check the registry now, not at the next poll."""
        self._next_check = 0.0
        self._maybe_reload()

    async def wait_loaded(self, timeout_s: float = 60.0) -> bool:
        """For tools and tests: start loading now and wait until a model is live."""
        self._next_check = 0.0
        self._maybe_reload()
        if self._loading is not None:
            await asyncio.wait_for(asyncio.shield(self._loading), timeout_s)
        return self.holder.current is not None

    # -- new items ---------------------------------------------------------------
    def observe_items(self, items: Sequence[tuple[str, str | None]]) -> None:
        """Items seen in the stream, with their category when known: new ones join the index in batches."""
        snap = self.holder.current
        if snap is None:
            return
        for item, category in items:
            if category is not None and item not in snap.row_of and item not in self._new_items:
                if not self._new_items:
                    self._new_since = time.monotonic()
                self._new_items[item] = str(category)
        due = len(self._new_items) >= NEW_ITEMS_BATCH or (
            self._new_items and time.monotonic() - self._new_since > NEW_ITEMS_MAX_WAIT_S)
        if due and (self._adding is None or self._adding.done()):
            batch, self._new_items = self._new_items, {}
            self._adding = asyncio.get_running_loop().create_task(self._add_items(snap, batch))

    async def _add_items(self, snap: IndexSnapshot, batch: dict[str, str]) -> None:
        try:
            new = await asyncio.to_thread(self._build_with_items, snap, batch)
        except Exception:
            log.exception("could not add %d new items to the index", len(batch))
            return
        if self.holder.current is snap:  # a newer model was swapped in meanwhile: it will see them again
            self.holder.swap(new)

    @staticmethod
    def _build_with_items(snap: IndexSnapshot, batch: dict[str, str]) -> IndexSnapshot:
        from kestrel.models.retrieval import with_items
        from kestrel.models.two_tower import embed_items

        live: _Live = snap.extra
        ids, cats = list(batch), list(batch.values())
        vectors = embed_items(live.artifact.model, live.artifact.vocab, ids, cats)
        new = with_items(snap, ids, vectors, snap.version)
        return dataclasses.replace(new, extra=_Live(live.artifact, {**live.category_of, **batch}), row_of=new.row_of)

    # -- requests ----------------------------------------------------------------
    async def recommend(self, user_ids: Sequence[str], options: RecOptions | Sequence[RecOptions]) -> list[RecResult]:
        """Recommendations for each raw user id, one Redis round trip for all of them."""
        self._maybe_reload()
        opts = [options] * len(user_ids) if isinstance(options, RecOptions) else list(options)
        tokens = [self.hasher.token("user", u) for u in user_ids]
        pipe = self.client.pipeline(transaction=False)
        for t in tokens:
            pipe.zrevrange(self.keys.entity_part("user", t, "recent_items"), 0, HISTORY_LEN - 1)
            pipe.smembers(self.keys.entity_part("user", t, "seen_items"))
        if self._trending is None:
            self._trending = self.client.register_script(WINDOWED_TOP_LUA)
        await self._trending(args=windowed_top_args(TRENDING, self.keys, TRENDING_DEPTH), client=pipe)
        pipe.zrevrange(self.keys.global_("item_popularity"), 0, TRENDING_DEPTH - 1)
        pipe.smembers(self.keys.global_(EXCLUDED_SET))
        *per_user, trending_raw, all_time_raw, excluded_raw = await pipe.execute()
        # trending: the last 24 hours of interactions; all-time popularity only while those are empty
        trending = [m.decode() for m in (trending_raw or all_time_raw)]
        excluded = {m.decode() for m in excluded_raw}
        recents = [[m.decode() for m in per_user[2 * i]] for i in range(len(tokens))]
        seens = [{m.decode() for m in per_user[2 * i + 1]} for i in range(len(tokens))]
        return self.rank(user_ids, recents, seens, trending, excluded, opts, tokens)

    def rank(self, user_ids: Sequence[str], recents: Sequence[list[str]], seens: Sequence[set[str]],
             trending: Sequence[str], excluded: set[str], opts: Sequence[RecOptions],
             tokens: Sequence[str] | None = None) -> list[RecResult]:
        """The CPU part of a request (no I/O): query tower, FAISS, filters, re-ranking, fallback.

        ``tokens``: the users' keyed tokens, which a model trained from the archive knows them by.
        """
        snap = self.holder.current  # read once: model and index of the same version for the whole batch
        results: list[RecResult | None] = [None] * len(user_ids)
        personal = [i for i, r in enumerate(recents) if r and not opts[i].fallback_only] if snap is not None else []
        if personal and snap is not None:
            live: _Live = snap.extra
            by_token = live.artifact.metadata.get("user_ids") == "tokens"
            names = tokens if by_token and tokens is not None else user_ids
            q = live.artifact.encoder().encode([names[i] for i in personal], [recents[i] for i in personal])
            part = live.artifact.item_item
            wanted = max(_pool(opts[i]) + len(seens[i]) + len(opts[i].exclude) for i in personal)
            # the hybrid takes the tower's POOL best unseen candidates, as measured by `kestrel eval recs`
            depth = min(snap.size, wanted + (POOL if part is not None else 0))
            scores, rows = snap.search(q, depth)
            for j, i in enumerate(personal):
                if part is not None:  # the hybrid: EASE's weights summed over the user's seen items
                    seen_rows = np.fromiter((snap.row_of[s] for s in seens[i] if s in snap.row_of), dtype=np.int64)
                    session = [snap.row_of[s] for s in recents[i][:SESSION_ITEMS] if s in snap.row_of]
                    rows_j, scores_j = blend_rank(q[j], snap.vectors, rows[j], part.scores(seen_rows, session),
                                                  seen_rows, part.weight, depth)
                else:
                    rows_j, scores_j = rows[j], scores[j]
                items = self._pick(snap, live, scores_j, rows_j, seens[i] | excluded | set(opts[i].exclude), opts[i])
                if items:
                    results[i] = RecResult(items, PERSONALISED, snap.version)
        for i, res in enumerate(results):
            if res is None:
                drop = seens[i] | excluded | set(opts[i].exclude)
                results[i] = RecResult(self.fallback.recommend(trending, drop, opts[i].k), FALLBACK,
                                       self.fallback.version)
        return [r for r in results if r is not None]

    @staticmethod
    def _pick(snap: IndexSnapshot, live: _Live, scores: np.ndarray, rows: np.ndarray, drop: set[str],
              opt: RecOptions) -> list[str]:
        keep = [(float(s), int(r)) for s, r in zip(scores, rows, strict=True)
                if r >= 0 and str(snap.item_ids[r]) not in drop]
        if not keep:
            return []
        if opt.mmr_lambda >= 1.0 and opt.per_category is None:
            return [str(snap.item_ids[r]) for _, r in keep[:opt.k]]
        from kestrel.models.diversity import mmr

        cand = keep[:_pool(opt)]
        ids = [str(snap.item_ids[r]) for _, r in cand]
        vecs = snap.vectors[[r for _, r in cand], :-1]  # the tower part, without the bias dimension
        order = mmr(np.array([s for s, _ in cand]), vecs, opt.k, opt.mmr_lambda,
                    [live.category_of.get(i, "") for i in ids], opt.per_category)
        return [ids[p] for p in order]


def _one_search_thread() -> None:
    """One FAISS thread per search: a request is one query, and waking a thread pool per query costs more
    than it saves (and spikes p99 on a busy machine); requests run side by side instead."""
    import faiss

    faiss.omp_set_num_threads(1)


def _pool(opt: RecOptions) -> int:
    """Candidates to retrieve: a category cap needs a wider pool to find enough other categories."""
    return opt.k * (20 if opt.per_category is not None else 4)


# -- the request/response topic pair ------------------------------------------------------------
def parse_request(value: bytes | None) -> tuple[dict[str, Any], RecOptions] | str:
    """A request document and its options, or the reason it is refused."""
    try:
        doc = orjson.loads(value or b"")
    except orjson.JSONDecodeError as exc:
        return f"not valid JSON: {exc}"
    if not isinstance(doc, dict) or not isinstance(doc.get("user_id"), str) or not doc["user_id"]:
        return "user_id (a non-empty string) is required"
    k = doc.get("k", 10)
    if not isinstance(k, int) or not 1 <= k <= 100:
        return "k must be an integer from 1 to 100"
    exclude = doc.get("exclude") or []
    per_cat = doc.get("per_category")
    lam = doc.get("mmr_lambda", 1.0)
    if not isinstance(exclude, list) or not all(isinstance(x, str) for x in exclude):
        return "exclude must be a list of item ids"
    if per_cat is not None and (not isinstance(per_cat, int) or per_cat < 1):
        return "per_category must be a positive integer"
    if not isinstance(lam, int | float) or not 0.0 <= lam <= 1.0:
        return "mmr_lambda must be a number from 0 to 1"
    path = doc.get("path")
    if path not in (None, FALLBACK):
        return f"path may only be {FALLBACK!r} (to ask for the trending baseline)"
    return doc, RecOptions(k, tuple(exclude), float(lam), per_cat, path == FALLBACK)
