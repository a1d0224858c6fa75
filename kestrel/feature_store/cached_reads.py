"""Vectors of a set that changes rarely but is read by every event, kept by the reader until they change.

Every payment reads its terminal's fraud counts over a delayed window
(``terminal_risk``), which only labels change: reading them from the buckets
cost about 30 µs of Redis CPU per payment, a fifth of the whole write path.
A set declared ``cached_reads`` bumps a per-entity version with every write
(:meth:`~kestrel.feature_store.keys.KeySpace.version_of`); the reader fetches the
versions of a batch's entities in one ``MGET`` and reads again only the
entities whose version, or the window's last bucket, moved; an entity
without a version was never written (the version shares the data's TTL),
so it reads the defaults without a read at all (data written by a version
of Kestrel before these counters would read as empty until its next write:
none was ever deployed). Exact, not a
time-to-live cache: a vector is reused only while nothing it depends on
changed, and one read under version ``v`` that already saw a later write is
refreshed at the next batch (the version no longer matches).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from kestrel.feature_store.definitions import FeatureSet, Windowed
from kestrel.feature_store.redis_store import AsyncRedisOnlineStore, _read_plan, entity_keys


class VersionedReads:
    """Feature vectors of ``fs`` for many (entity, time) pairs, cached by entity version and window."""

    def __init__(self, store: AsyncRedisOnlineStore, fs: FeatureSet, max_entries: int = 200_000) -> None:
        if not fs.cached_reads:
            raise ValueError(f"{fs.name} does not keep versions (cached_reads=False)")
        sizes = {(f.bucket_s, f.delay_s) for f in fs.vector if isinstance(f, Windowed)}
        if any(not isinstance(f, Windowed) for f in fs.vector):
            raise ValueError(f"{fs.name}: cached reads are for sets of windows only")
        if len(sizes) != 1:
            raise ValueError(f"{fs.name}: cached reads need one bucket size and delay for all its windows")
        (self._bucket_s, self._delay_s), = sizes
        self.store, self.fs, self.max_entries = store, fs, max_entries
        self._cache: dict[str, tuple[bytes | None, int, dict[str, Any]]] = {}  # key -> (version, last bucket, vector)
        # what the bucket script gives an entity with nothing stored (its windows do not depend on the time)
        self._empty = _read_plan(fs).missing(0.0)
        self.hits = self.misses = 0

    def _last(self, t: float) -> int:
        return math.floor((t - self._delay_s) / self._bucket_s)

    async def vectors(self, entity_ids: Sequence[str], times: Sequence[float]) -> list[dict[str, Any]]:
        """The vector of each entity at its time, from the cache where it still holds, else from Redis."""
        store = self.store
        keys = entity_keys(self.fs, entity_ids, store.keys, store.hasher)
        unique = list(dict.fromkeys(keys))
        versions = dict(zip(unique, await store.client.mget([store.keys.version_of(k) for k in unique]),
                            strict=True))
        out: list[dict[str, Any] | None] = [None] * len(keys)
        missing: dict[int, list[int]] = {}  # last bucket -> positions to read
        empty = self._empty
        for i, (key, t) in enumerate(zip(keys, times, strict=True)):
            version = versions[key]
            if version is None:  # never written (or expired with its data: they share the TTL): the defaults
                out[i] = empty
                continue
            hit = self._cache.get(key)
            last = self._last(t)
            if hit is not None and hit[0] == version and hit[1] == last:
                out[i] = hit[2]
            else:
                missing.setdefault(last, []).append(i)
        self.hits += len(keys) - sum(len(v) for v in missing.values())
        if len(self._cache) > self.max_entries:
            self._cache.clear()
        for last, positions in missing.items():
            # one read per window position; read at the last second of it, where every read in it answers alike
            at = (last + 1) * self._bucket_s + self._delay_s - 1e-3
            key_of = {entity_ids[i]: keys[i] for i in positions}  # hashed once, above
            ids = list(key_of)
            for eid, vector in zip(ids, await store.read_batch(self.fs, ids, at), strict=True):
                key = key_of[eid]
                self._cache[key] = (versions[key], last, vector)
            for i in positions:
                out[i] = self._cache[keys[i]][2]
            self.misses += len(ids)
        return out  # type: ignore[return-value]
