"""Redis backend of the online store.

Writes: one Lua call applies a whole batch. Each event's operations run
atomically inside the script, guarded by its ``applied`` key: an event seen
before changes nothing and gets back the feature snapshot stored the first
time, so a redelivered event (crash, rebalance) is neither double counted
nor decided differently.

Reads: one round trip for one entity or many, sync or asyncio: a ``GET`` /
``MGET`` of the entities' heads, decoded in Python
(:mod:`kestrel.feature_store.read_path`). The write script keeps each head in step
with the buckets, so that a read touches one stored number per feature
instead of every bucket of every window. Reads a head cannot serve (before
the entity's newest bucket; sets with delayed windows) run the bucket script,
whose arithmetic is the same :func:`~kestrel.feature_store.definitions.finalize`
the write path uses.

Layout per entity (key ``{prefix}:e:{entity}:{token}``, a hash):
``{series}@{bucket_s}|{component}|{bucket}`` bucket values,
``{series}@{bucket_s}|lo`` oldest kept bucket, ``{feature}|v`` /
``{feature}|t`` last value and its time, ``@|t`` time of the latest event.
Distinct counts use a sorted set (value -> latest time) under the same key
prefix, recent values a sorted set by time. The head of feature set ``fs`` is
the string ``{entity key}|@{fs.name}`` (:class:`~kestrel.feature_store.definitions.HeadLayout`),
with the entity's TTL.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import cached_property
from typing import Any, TypeVar

import orjson
import redis
import redis.asyncio as aioredis

from kestrel.feature_store import head_kernels
from kestrel.feature_store.definitions import (
    COMPONENTS,
    EventOps,
    EventUnit,
    FeatureSet,
    GlobalScore,
    TimeSince,
    Windowed,
    finalize,
)
from kestrel.feature_store.head_state import HeadArithmetic, HeadBatch, vectors_snapshot, worker_applicable
from kestrel.feature_store.keys import KeyedHasher, KeySpace, escape_glob
from kestrel.feature_store.read_path import PAST, HeadReader
from kestrel.feature_store.resp import Pinned, PinnedSync, run_script, run_script_sync
from kestrel.feature_store.scripts import load_lua

T = TypeVar("T")


async def _nothing(results: object) -> None:
    """The ``then`` of a plain :meth:`AsyncRedisOnlineStore.apply_units`."""

LUA_READS = load_lua(__file__, "reads")

LUA_PLAN = load_lua(__file__, "plan")

LUA_HEAD = load_lua(__file__, "head")

APPLY_BATCH_LUA = LUA_READS + LUA_PLAN + LUA_HEAD + load_lua(__file__, "apply_batch")

REBUILD_LUA = LUA_READS + LUA_PLAN + LUA_HEAD + load_lua(__file__, "rebuild_heads")

READ_LUA = LUA_READS + load_lua(__file__, "read_buckets")

COMMIT_HEADS_LUA = load_lua(__file__, "commit_heads")

# Attempts of the worker path on a batch whose entities keep changing under it (other workers writing
# the same terminals, say) before the batch goes to the Lua path, which never conflicts.
HEAD_BATCH_ATTEMPTS = 5

Snapshot = dict[str, Any]


def read_template(fs: FeatureSet) -> bytes:
    """The feature set's reads, independent of entity and time, for the read script."""
    tpl: list[list[Any]] = []
    for feat in fs.vector:
        if isinstance(feat, Windowed):
            if feat.agg == "distinct":
                tpl.append(["z", feat.name, feat.bucket_s, feat.buckets, feat.delay_s])
            else:
                modes = [[suffix, mode] for suffix, mode in COMPONENTS[feat.agg]]
                tpl.append(["w", feat.name, feat.storage, feat.bucket_s, feat.buckets, feat.delay_s, modes])
        elif isinstance(feat, TimeSince):
            tpl.append(["h", feat.name, "@|t"])
        else:
            tpl.append(["h", feat.name, f"{feat.name}|v"])
    return orjson.dumps(tpl)


def head_suffix(fs: FeatureSet) -> str:
    """Key suffix of ``fs``'s head next to the entity hash ('@' cannot occur in a feature name).

    It names the set's version and a digest of the head layout: a head
    written under another definition of the set is never misread (its
    numbers would sit at other places); the new definition's heads are
    rebuilt from the buckets by each entity's next event, or by
    :meth:`RedisOnlineStore.rebuild_heads`, and the old ones expire.
    """
    lay = fs.head
    shape = repr((lay.lua_fmt, lay.series, lay.distinct, lay.last_time, lay.strings)).encode()
    return f"|@{fs.name}:{fs.version}:{hashlib.sha1(shape).hexdigest()[:8]}"


def write_template(fs: FeatureSet) -> bytes:
    """The write script's view of ``fs``: the reads after an event (``f``, with where the head
    answers each; indexes 1-based, as Lua counts) and the head's layout (``hd``)."""
    lay = fs.head
    entries: list[list[Any]] = []
    for feat in fs.vector:
        if isinstance(feat, Windowed):
            if feat.agg == "distinct":
                entries.append(["z", feat.name, feat.bucket_s, feat.buckets, feat.delay_s,
                                lay.distinct_index(feat.name) + 1])
            else:
                modes = [[suffix, mode] for suffix, mode in COMPONENTS[feat.agg]]
                starts = [] if feat.delay_s else [lay.suffix_start(feat.storage, feat.buckets, s) + 1 for s, _ in modes]
                entries.append(["w", feat.name, feat.storage, feat.bucket_s, feat.buckets, feat.delay_s, modes,
                                lay.top_index(feat.storage) + 1, starts])
        elif isinstance(feat, TimeSince):
            entries.append(["h", feat.name, "@|t"])
        else:
            entries.append(["h", feat.name, f"{feat.name}|v"])
    series = {storage: [top + 1, kept, [[w, [[c, m, start + 1] for c, m, start in comps]] for w, comps in windows]]
              for storage, top, kept, windows in lay.series}
    distinct = {name: [top + 1, bucket_s, buckets] for name, top, bucket_s, buckets in lay.distinct}
    head = {"sfx": head_suffix(fs), "n": lay.size, "fmt": lay.lua_fmt, "ttl": lay.ttl_s, "S": series, "D": distinct,
            "T": 0 if lay.last_time is None else lay.last_time + 1, "V": list(lay.strings), "ho": not fs.buckets}
    if not fs.buckets:  # what a compact write leaves out (the same for every event)
        head["C"] = {storage: [[c for c, _ in comps], feat.late_buckets, feat.bucket_s]
                     for storage, (feat, comps, _) in fs.series_plan.items()}
        head["Z"] = {f.name: f.window_s + f.lateness_s for f in fs.vector if isinstance(f, Windowed)
                     and f.agg == "distinct"}
    return orjson.dumps({"f": entries, "hd": head})


def _decode(rows: Sequence[Any]) -> list[tuple[bool, Snapshot]]:
    return [(bool(applied), orjson.loads(snap)) for applied, snap in rows]


_FRAME = struct.Struct("<I")
_NONE = 0xFFFFFFFF


def _frames(snap: bytes) -> list[tuple[bytes, bytes | None, bytes | None]]:
    """A framed unit snapshot: per part ('H', head before, head after) or ('J', component JSON, None)."""
    out = []
    pos, end = 0, len(snap)
    while pos < end:
        kind = snap[pos:pos + 1]
        pos += 1
        blobs: list[bytes | None] = []
        for _ in range(2 if kind == b"H" else 1):
            (n,) = _FRAME.unpack_from(snap, pos)
            pos += 4
            if n == _NONE:
                blobs.append(None)
            else:
                blobs.append(snap[pos:pos + n])
                pos += n
        out.append((kind, blobs[0], blobs[1] if kind == b"H" else None))
    return out


def _unit_vectors(snap: bytes, unit: EventUnit) -> list[dict[str, Any]]:
    """A unit's feature vectors, one per part, as of the part's time (its event's), from its snapshot."""
    vectors = vectors_snapshot(snap)  # written by the worker path
    if vectors is not None:
        return vectors
    if snap.startswith(b"{"):  # a unit whose every part was erased: nothing applied, nothing framed
        return [finalize(ops.reads_of, {}, ops.time) for ops in unit.parts]
    return [_read_plan(ops.reads_of).vector_after(kind, a, b, ops.time)
            for ops, (kind, a, b) in zip(unit.parts, _frames(snap), strict=True)]


def _decode_units(rows: Sequence[Any], units: Sequence[EventUnit]) -> list[tuple[bool, list[dict[str, Any]]]]:
    return [(bool(applied), _unit_vectors(snap, unit)) for (applied, snap), unit in zip(rows, units, strict=True)]


def _apply_args(batch: Sequence[EventUnit], keys: KeySpace, ttl_s: int) -> list[Any]:
    """Script arguments: TTL, the templates used in this batch, then one JSON document per unit."""
    sets: dict[int, int] = {}
    templates: list[bytes] = []
    events: list[bytes] = []
    for unit in batch:
        parts = []
        for ops in unit.parts:
            index = sets.get(id(ops.reads_of))  # ops keep their feature set alive for this call
            if index is None:
                index = sets[id(ops.reads_of)] = len(templates)
                templates.append(_write_template(ops.reads_of))
            parts.append({"x": keys.tombstone_of(ops.entity_key), "k": ops.entity_key, "t": ops.time, "r": index,
                          "w": ops.writes})
        events.append(orjson.dumps({"d": unit.applied_key, "m": int(len(parts) > 1), "h": int(unit.framed),
                                    "p": parts}))
    return [ttl_s, b"[" + b",".join(templates) + b"]", *events]


def _single(batch: Sequence[EventOps]) -> list[EventUnit]:
    """Each operation as a unit of its own, under its own marker, answering component maps (the old contract)."""
    return [EventUnit(ops.applied_key, (ops,), framed=False) for ops in batch]


def entity_keys(fs: FeatureSet, entity_ids: Sequence[str], keys: KeySpace, hasher: KeyedHasher) -> list[str]:
    return [keys.entity(fs.entity, hasher.token(fs.entity, e)) for e in entity_ids]


_TEMPLATES: dict[FeatureSet, bytes] = {}
_WRITE_TEMPLATES: dict[FeatureSet, bytes] = {}


def _template(fs: FeatureSet) -> bytes:
    if fs not in _TEMPLATES:
        _TEMPLATES[fs] = read_template(fs)
    return _TEMPLATES[fs]


def _write_template(fs: FeatureSet) -> bytes:
    if fs not in _WRITE_TEMPLATES:
        _WRITE_TEMPLATES[fs] = write_template(fs)
    return _WRITE_TEMPLATES[fs]


class _ReadPlan:
    """How to read ``fs``: its heads' key suffix and decoder, and the bucket script's template."""

    def __init__(self, fs: FeatureSet) -> None:
        self.fs = fs
        self.reader = HeadReader(fs)
        self.suffix = head_suffix(fs)
        self.template = read_template(fs)

    def decode(self, heads: Sequence[bytes | None], at: float) -> tuple[list[Any], list[int]]:
        """Vectors from heads (a missing head is an entity with nothing stored: the defaults), and the
        positions the heads cannot serve (reads before an entity's newest bucket, delayed windows)."""
        reader = self.reader
        if not reader.usable:
            return [None] * len(heads), list(range(len(heads)))
        lasts = reader.lasts(at)
        decode = reader.decode
        out: list[Any] = []
        later: list[int] = []
        for i, head in enumerate(heads):
            if head is None:
                out.append(self.missing(at))
                continue
            vector = decode(head, at, lasts)
            if vector is PAST:
                later.append(i)
            out.append(vector)
        return out, later

    def vector_after(self, kind: bytes, first: bytes | None, second: bytes | None, at: float) -> dict[str, Any]:
        """A part of a framed unit snapshot as the feature vector at ``at``: the component map ('J'), or
        ('H') the windows from the head after the event and the previous time / values from the head before."""
        if kind == b"J":
            return finalize(self.fs, orjson.loads(first or b"{}"), at)
        vector = self.missing(at) if second is None else self.reader.decode(second, at, self.reader.lasts(at))
        vector.update(self.reader.previous(first, at))
        return vector

    def missing(self, at: float) -> dict[str, Any]:
        """An entity without a head: the values the bucket script gives one with nothing stored."""
        return finalize(self.fs, self._empty, at)

    @cached_property
    def _empty(self) -> dict[str, Any]:
        raw: dict[str, Any] = {}
        for feat in self.fs.vector:
            if isinstance(feat, Windowed):
                if feat.agg == "distinct":
                    raw[feat.name] = 0
                for suffix, mode in COMPONENTS.get(feat.agg, ()):
                    raw[f"{feat.name}|{suffix}"] = "0" if mode == "add" else None
        return raw

    def from_buckets(self, rows: Sequence[bytes], at: float) -> list[dict[str, Any]]:
        return [finalize(self.fs, orjson.loads(row), at) for row in rows]


_READ_PLANS: dict[FeatureSet, _ReadPlan] = {}


def _read_plan(fs: FeatureSet) -> _ReadPlan:
    plan = _READ_PLANS.get(fs)
    if plan is None:
        plan = _READ_PLANS[fs] = _ReadPlan(fs)
    return plan


_ARITHMETIC: dict[FeatureSet, HeadArithmetic] = {}


def _arithmetic(fs: FeatureSet) -> HeadArithmetic | None:
    """``fs``'s worker arithmetic, or None when the worker cannot apply its events."""
    if fs not in _ARITHMETIC:
        _ARITHMETIC[fs] = HeadArithmetic(fs, head_suffix(fs)) if worker_applicable(fs) else None
    return _ARITHMETIC[fs]


class _StoreBase:
    """What the sync and asyncio stores share: client, scripts, key layout, hashing.

    ``heads_in_worker``: units whose every part is a head-only set of windows, times and last values
    are applied by this process (:mod:`kestrel.feature_store.head_state`), Redis storing the heads it
    computes; False keeps all the arithmetic in the Lua script (the values are the same either way).
    """

    def __init__(self, client: redis.Redis | aioredis.Redis, dedup_ttl_s: int, keys: KeySpace | None = None,
                 hasher: KeyedHasher | None = None, heads_in_worker: bool = True) -> None:
        self.client = client
        self.dedup_ttl_s = dedup_ttl_s
        self.keys = keys or KeySpace("kestrel")
        self.hasher = hasher or KeyedHasher(b"kestrel-dev-only-hash-key")
        self.heads_in_worker = heads_in_worker
        self._script = client.register_script(APPLY_BATCH_LUA)
        self._read = client.register_script(READ_LUA)
        self._commit_heads = client.register_script(COMMIT_HEADS_LUA)

    def _apply_args(self, batch: Sequence[EventUnit]) -> list[Any]:
        return _apply_args(batch, self.keys, self.dedup_ttl_s)

    def _head_sets(self, units: Sequence[EventUnit]) -> dict[int, HeadArithmetic] | None:
        """The arithmetic of each set the units feed, for the worker path (by id: hashing a set hashes all
        its features), or None when a part needs the Lua path."""
        if not self.heads_in_worker:
            return None
        sets: dict[int, HeadArithmetic] = {}
        for unit in units:
            if not unit.framed:
                return None
            for ops in unit.parts:
                fs = ops.reads_of
                if id(fs) not in sets:
                    arith = _arithmetic(fs)
                    if arith is None:
                        return None
                    sets[id(fs)] = arith
        return sets


def prepare_kernels(sets: Sequence[FeatureSet]) -> int:
    """Compile the head kernels of ``sets`` now (see :func:`head_kernels.prepare`); how many have one."""
    return head_kernels.prepare([a for a in (_arithmetic(fs) for fs in sets) if a is not None])


class RedisOnlineStore(_StoreBase):
    """Sync store: batch writes in one round trip, typed reads of one or many entities."""

    def __init__(self, client: redis.Redis, dedup_ttl_s: int, keys: KeySpace | None = None,
                 hasher: KeyedHasher | None = None, heads_in_worker: bool = True) -> None:
        super().__init__(client, dedup_ttl_s, keys, hasher, heads_in_worker)
        # Sync reads use one connection of their own, outside the pool: checking a connection out and
        # back in costs about as much as the read itself. Another thread reading meanwhile uses the pool.
        self._conn: Any = None
        self._conn_pid = 0
        self._conn_lock = threading.Lock()

    def apply_batch(self, batch: Sequence[EventOps]) -> list[tuple[bool, Snapshot]]:
        """Apply each event once; returns (newly_applied, stored components) per event."""
        if not batch:
            return []
        return _decode(run_script_sync(self.client, self._script, self._apply_args(_single(batch))))

    def apply_units(self, units: Sequence[EventUnit]) -> list[tuple[bool, list[Snapshot]]]:
        """Apply each unit once; returns (newly_applied, feature vector of each part) per unit."""
        if not units:
            return []
        sets = self._head_sets(units)
        for _ in range(HEAD_BATCH_ATTEMPTS if sets else 0):
            batch = HeadBatch(units, self.keys, sets, _unit_vectors, self.dedup_ttl_s)  # fresh reads each time
            with PinnedSync(self.client) as conn:
                batch.apply(conn.run(batch.read_commands()))
                committed = conn.script(self._commit_heads, batch.commit_args())
            if committed:
                return batch.results
        return _decode_units(run_script_sync(self.client, self._script, self._apply_args(units)), units)

    def read(self, fs: FeatureSet, entity_id: str, at: float | None = None) -> dict[str, Any]:
        """One entity's feature vector at ``at`` (default now); a missing entity gives the defaults."""
        return self.read_batch(fs, [entity_id], at)[0]

    def read_batch(self, fs: FeatureSet, entity_ids: Sequence[str], at: float | None = None) -> list[dict[str, Any]]:
        """Feature vectors of many entities in one round trip: one ``MGET`` of their heads.

        Reads the heads cannot serve take a second round trip, to the bucket script.
        """
        at = time.time() if at is None else at
        plan = _read_plan(fs)
        keys = entity_keys(fs, entity_ids, self.keys, self.hasher)
        if plan.reader.usable:
            suffix = plan.suffix
            heads = self._command("MGET", *[k + suffix for k in keys])
        else:
            heads = [None] * len(keys)
        out, later = plan.decode(heads, at)
        if later:
            rows = self._read(args=[plan.template, repr(at), *[keys[i] for i in later]])
            for i, vector in zip(later, plan.from_buckets(rows, at), strict=True):
                out[i] = vector
        return out

    def _command(self, *args: Any) -> Any:
        """One command on the read connection; the pool (and the client's retry policy) when it is busy
        in another thread or fails."""
        if not self._conn_lock.acquire(blocking=False):
            return self.client.execute_command(*args)
        try:
            conn = self._conn
            if conn is None or self._conn_pid != os.getpid():  # never share a socket with a forked parent
                conn = self._conn = self.client.connection_pool.make_connection()
                self._conn_pid = os.getpid()
            try:
                conn.send_command(*args)
                return conn.read_response()
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
                conn.disconnect()  # a reply may be left behind: start over on a fresh socket next time
        finally:
            self._conn_lock.release()
        return self.client.execute_command(*args)

    def rebuild_heads(self, fs: FeatureSet, batch_size: int = 500) -> int:
        """Build the heads of ``fs``'s entities stored without one; returns how many were built.

        For data written by a version without heads: a read takes an entity
        without a head to have nothing stored (so that a missing entity costs
        one round trip), and the next event of an entity builds its head
        anyway; this builds them all at once after an upgrade. Safe to run
        while events are applied (each head is built atomically, or left
        alone if an event built it first).
        """
        if not fs.buckets:
            return 0  # a head-only set has nothing to rebuild its heads from: they are its state
        script = self.client.register_script(REBUILD_LUA)
        template = _write_template(fs)
        prefix = self.keys.entity(fs.entity, "")
        built, chunk = 0, []
        for key in self.client.scan_iter(match=escape_glob(prefix) + "*", count=1000, _type="hash"):
            name = key.decode()
            if ":" in name[len(prefix):] or "|" in name:
                continue  # another entity type's key, or a part of an entity
            chunk.append(name)
            if len(chunk) >= batch_size:
                built += script(args=[template, *chunk])
                chunk.clear()
        if chunk:
            built += script(args=[template, *chunk])
        return built

    def close(self) -> None:
        """Close the read connection (the client's pool is the caller's)."""
        with self._conn_lock:
            if self._conn is not None:
                self._conn.disconnect()
                self._conn = None


class AsyncRedisOnlineStore(_StoreBase):
    """The asyncio twin of :class:`RedisOnlineStore`, used by the stream agents and HTTP views."""

    async def apply_batch(self, batch: Sequence[EventOps]) -> list[tuple[bool, Snapshot]]:
        if not batch:
            return []
        return _decode(await run_script(self.client, self._script, self._apply_args(_single(batch))))

    async def apply_units(self, units: Sequence[EventUnit]) -> list[tuple[bool, list[Snapshot]]]:
        return (await self.apply_units_then(units, _nothing))[0]

    async def apply_units_then(self, units: Sequence[EventUnit],
                               then: Callable[[list[tuple[bool, list[Snapshot]]]], Awaitable[T]],
                               ) -> tuple[list[tuple[bool, list[Snapshot]]], T]:
        """:meth:`apply_units`, and ``then`` of its results, run while Redis runs the commit.

        On the worker path the results are known before the commit is
        stored, so what the caller computes from them (scores, documents)
        overlaps the commit's time in Redis instead of following it. ``then``
        must have no side effects: a refused commit reads again and calls it
        again with the new results.
        """
        if not units:
            return [], await then([])
        sets = self._head_sets(units)
        for _ in range(HEAD_BATCH_ATTEMPTS if sets else 0):
            batch = HeadBatch(units, self.keys, sets, _unit_vectors, self.dedup_ttl_s)  # fresh reads each time
            async with Pinned(self.client) as conn:
                batch.apply(await conn.run(batch.read_commands()))
                reply = await conn.script_sent(self._commit_heads, batch.commit_args())
                done = await then(batch.results)
                committed = await reply()
            if committed:
                return batch.results, done
        results = _decode_units(await run_script(self.client, self._script, self._apply_args(units)), units)
        return results, await then(results)

    async def read(self, fs: FeatureSet, entity_id: str, at: float | None = None) -> dict[str, Any]:
        return (await self.read_batch(fs, [entity_id], at))[0]

    async def read_batch(self, fs: FeatureSet, entity_ids: Sequence[str],
                         at: float | None = None) -> list[dict[str, Any]]:
        at = time.time() if at is None else at
        plan = _read_plan(fs)
        keys = entity_keys(fs, entity_ids, self.keys, self.hasher)
        if plan.reader.usable:
            suffix = plan.suffix
            heads = await self.client.execute_command("MGET", *[k + suffix for k in keys])
        else:
            heads = [None] * len(keys)
        out, later = plan.decode(heads, at)
        if later:
            rows = await self._read(args=[plan.template, repr(at), *[keys[i] for i in later]])
            for i, vector in zip(later, plan.from_buckets(rows, at), strict=True):
                out[i] = vector
        return out


async def read_recent_and_top(client: aioredis.Redis, set_keys: Sequence[str], top_key: str,
                              top_n: int) -> tuple[list[set[str]], list[str]]:
    """Members of each set in ``set_keys`` and the ``top_n`` best of a sorted set, one round trip."""
    pipe = client.pipeline(transaction=False)
    for key in set_keys:
        pipe.smembers(key)
    pipe.zrevrange(top_key, 0, max(top_n - 1, 0))
    *sets, top = await pipe.execute()
    return ([{m.decode() for m in s} for s in sets], [m.decode() for m in top])


# ARGV: newest-bucket key, bucket key prefix ("...name@"), buckets, depth, union key, union lifetime (s)
WINDOWED_TOP_LUA = load_lua(__file__, "windowed_top")


def windowed_top_args(feat: GlobalScore, keys: KeySpace, depth: int, union_s: int = 5) -> list[object]:
    """Arguments of :data:`WINDOWED_TOP_LUA` for a time-bucketed :class:`GlobalScore`.

    The union of the window's buckets is cached under ``name@top`` for
    ``union_s`` seconds, shared by every worker: a request reads one sorted
    set, and the union is recomputed at most every few seconds.
    """
    if feat.bucket_s is None:
        raise ValueError(f"{feat.name} is not time-bucketed")
    prefix = feat.bucket_key(keys, "")
    return [feat.bucket_key(keys, "latest"), prefix, feat.buckets, depth, feat.bucket_key(keys, "top"), union_s]
