"""Declarative feature definitions and their compilation to store operations.

A feature is declared once (entity, source field, aggregation, window, filter,
delay); the store backend executes the compiled operations and
:func:`finalize` turns the stored components into feature values. The same
definitions drive the offline recomputation (``kestrel/offline/features.py``), so the
online and offline values agree by construction and are checked by a test.

Windows are time buckets: memory per entity is bounded by the number of
buckets in window + delay + allowed lateness. A window read at time ``t``
covers the ``window_s // bucket_s`` buckets ending with the bucket of
``t - delay_s``; with no delay, the event's own bucket is included.

Pure: compiling an event touches no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

from kestrel.feature_store.keys import KeyedHasher, KeySpace

Predicate = Callable[[Any], bool]
Agg = Literal["count", "sum", "mean", "std", "min", "max", "distinct"]

# The stored components of each aggregation and how buckets combine.
COMPONENTS: dict[str, tuple[tuple[str, str], ...]] = {
    "count": (("n", "add"),),
    "sum": (("s", "add"),),
    "mean": (("n", "add"), ("s", "add")),
    "std": (("n", "add"), ("s", "add"), ("q", "add")),
    "min": (("lo", "min"),),
    "max": (("hi", "max"),),
}


@dataclass(frozen=True)
class Windowed:
    """An aggregation of ``value_of(event)`` over a trailing, optionally delayed, window.

    ``distinct`` counts distinct values exactly (a sorted set of value ->
    latest time, trimmed past window + lateness; no delay allowed); ``std`` is
    the population standard deviation.

    ``seen_in`` names a pair feature set (entity x value, with a
    ``TimeSince``) that already keeps each value's latest time: a distinct
    count of a card's terminals is told by the card x terminal pair's head
    when each terminal was last seen. The worker path then reads that head
    (it is in the same unit) instead of a sorted set per entity: the sorted
    set's reads, writes, trims and expiries were the largest part of a
    payment's Redis and worker cost (docs/engine.md). The pair set must be
    in every unit that feeds this feature, key the pair (entity, value), and
    outlive window + lateness. The Lua path keeps the sorted set; both give
    the same counts, but the paths must not alternate on the same entities
    (the worker path does not keep the sorted set up to date).

    Features naming the same ``series`` (same source value, same filter) and
    bucket size share their stored buckets: a count, a mean and a std of
    amounts over 30 days keep one count, one sum and one sum of squares per
    day, not three copies.
    """

    name: str
    agg: Agg
    window_s: int
    bucket_s: int
    value_of: Callable[[Any], Any] | None = None
    where: Predicate | None = None
    delay_s: int = 0
    lateness_s: int = 3600
    default: float = 0.0
    series: str | None = None
    hash_as: str | None = None  # distinct values that identify a person (a card) are stored as keyed hashes
    seen_in: str | None = None  # distinct counts: the pair set whose head keeps each value's latest time

    def __post_init__(self) -> None:
        if self.window_s % self.bucket_s:
            raise ValueError(f"{self.name}: window {self.window_s}s is not a multiple of bucket {self.bucket_s}s")
        if self.agg != "count" and self.value_of is None:
            raise ValueError(f"{self.name}: a {self.agg} needs value_of")
        if "|" in self.name or "@" in self.name:
            raise ValueError(f"{self.name}: '|' and '@' are reserved")
        if self.agg == "distinct" and self.delay_s:
            raise ValueError(f"{self.name}: a distinct count cannot be delayed")
        if self.seen_in is not None and self.agg != "distinct":
            raise ValueError(f"{self.name}: only a distinct count has values seen in a pair set")

    @cached_property
    def storage(self) -> str:
        """Name of the stored bucket series (shared by features with the same ``series`` and bucket)."""
        return f"{self.series or self.name}@{self.bucket_s}"

    @cached_property
    def buckets(self) -> int:
        return self.window_s // self.bucket_s

    @cached_property
    def late_buckets(self) -> int:
        """How many buckets older than the newest an event may fall and still be counted."""
        return math.ceil(self.lateness_s / self.bucket_s)

    @cached_property
    def kept_buckets(self) -> int:
        """Buckets kept in Redis: window and delay, plus enough to accept late events."""
        return self.buckets + math.ceil((self.delay_s + self.lateness_s) / self.bucket_s)

    def bounds(self, t: float) -> tuple[int, int]:
        """First and last bucket read at time ``t``."""
        return window_bounds(t - self.delay_s, self.bucket_s, self.buckets)


@dataclass(frozen=True)
class TimeSince:
    """Seconds since the entity's previous event (``default`` when there was none)."""

    name: str
    default: float = -1.0


@dataclass(frozen=True)
class LastValue:
    """The value of a field in the entity's previous event (by event time)."""

    name: str
    value_of: Callable[[Any], Any]
    default: Any = None


@dataclass(frozen=True)
class LastN:
    """The last ``n`` distinct values of a field by event time, newest first (e.g. recent items)."""

    name: str
    value_of: Callable[[Any], str]
    n: int = 50


@dataclass(frozen=True)
class SeenSet:
    """Every distinct value of a field for the entity (bounded by the entity TTL)."""

    name: str
    value_of: Callable[[Any], str]


@dataclass(frozen=True)
class GlobalScore:
    """A global sorted-set score per member, e.g. item popularity weighted by kind.

    With ``bucket_s``, one sorted set per event-time bucket (``name@index``),
    each kept for ``buckets`` buckets; :func:`~kestrel.feature_store.redis_store.read_windowed_top`
    unions the last ``buckets`` of them: what is popular *now* (trending), not
    since the beginning.
    """

    name: str
    member_of: Callable[[Any], str]
    weight_of: Callable[[Any], float]
    bucket_s: int | None = None
    buckets: int = 0

    def bucket_key(self, keys: KeySpace, index: int | str) -> str:
        return keys.global_(f"{self.name}@{index}")


Feature = Windowed | TimeSince | LastValue | LastN | SeenSet | GlobalScore
VECTOR_KINDS = (Windowed, TimeSince, LastValue)


@dataclass(frozen=True)
class FeatureSet:
    """The features one event type feeds for one entity type, with a version."""

    name: str
    version: str
    entity: str
    source: str
    entity_id_of: Callable[[Any], str]
    time_of: Callable[[Any], float]
    features: tuple[Feature, ...]
    ttl_s: int = 35 * 24 * 3600
    # Pair entities (card x terminal): the data subject they belong to. Their token starts with the
    # owner's token, so erasing the owner finds them by prefix without any raw id in the key.
    owner: tuple[str, Callable[[Any], str]] | None = None
    # False: the entity's head (HeadLayout) is its whole state; no bucket fields or last values are stored
    # beside it. A write is then a few head updates instead of a command per bucket component, and a read
    # before the entity's newest bucket sees it as of that bucket (nothing older is kept to answer it).
    buckets: bool = True
    # True: every write bumps the entity's version (KeySpace.version_of), so that a reader may keep its vectors
    # and read again only when the version moved (a set that labels feed and every payment reads)
    cached_reads: bool = False

    def token_of(self, event: Any, hasher: KeyedHasher) -> str:
        """The entity's keyed-hash token (owner token + pair token for pair entities)."""
        token = hasher.token(self.entity, self.entity_id_of(event))
        if self.owner is None:
            return token
        owner_entity, owner_id_of = self.owner
        return hasher.token(owner_entity, owner_id_of(event)) + token[:16]

    def __post_init__(self) -> None:
        names = [f.name for f in self.features]
        if len(names) != len(set(names)):
            raise ValueError(f"{self.name}: duplicate feature names")
        for storage, members in self.series_members().items():
            values = {id(f.value_of) for f in members if f.value_of is not None}
            if len({id(f.where) for f in members}) > 1 or len(values) > 1 or len({f.lateness_s for f in members}) > 1:
                raise ValueError(f"{self.name}: features sharing {storage} must share filter, value and lateness")
        if not self.buckets:
            if any(isinstance(f, Windowed) and f.delay_s for f in self.features):
                raise ValueError(f"{self.name}: a delayed window needs its buckets (buckets=True)")
            reach = max((f.window_s + f.bucket_s for f in self.features if isinstance(f, Windowed)), default=0)
            if self.ttl_s < reach:  # the head is the whole state: an idle entity's head must outlive its windows
                raise ValueError(f"{self.name}: ttl_s {self.ttl_s}s is shorter than the longest window "
                                 f"({reach}s with its bucket)")
            if any(isinstance(f, LastValue) for f in self.features) and \
                    not any(isinstance(f, TimeSince) for f in self.features):
                raise ValueError(f"{self.name}: without buckets a LastValue is ordered by the set's TimeSince")

    def series_members(self) -> dict[str, list[Windowed]]:
        out: dict[str, list[Windowed]] = {}
        for f in self.features:
            if isinstance(f, Windowed) and f.agg != "distinct":
                out.setdefault(f.storage, []).append(f)
        return out

    @cached_property
    def series_plan(self) -> dict[str, tuple[Windowed, list[tuple[str, str]], int]]:
        """Per stored series: a representative feature, the union of components, buckets to keep."""
        plan = {}
        for storage, members in self.series_members().items():
            comps: list[tuple[str, str]] = []
            for f in members:
                for c in COMPONENTS[f.agg]:
                    if c not in comps:
                        comps.append(c)
            source = next((f for f in members if f.value_of is not None), members[0])
            plan[storage] = (source, comps, max(f.kept_buckets for f in members))
        return plan
    @cached_property
    def write_plan(self) -> WritePlan:
        """:func:`write_plan` of this set."""
        return write_plan(self)

    @cached_property
    def compact_writer(self) -> Callable[..., None]:
        """:func:`compact_writer` of this set (a head-only set's per-event writes, generated once)."""
        return compact_writer(self)

    @cached_property
    def head(self) -> HeadLayout:
        """:func:`head_layout` of this set."""
        return head_layout(self)

    @cached_property
    def vector(self) -> tuple[Windowed | TimeSince | LastValue, ...]:
        """The features that make up the entity's feature vector, in order."""
        return tuple(f for f in self.features if isinstance(f, VECTOR_KINDS))

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.vector)

    @property
    def qualified_version(self) -> str:
        return f"{self.name}:{self.version}"


@dataclass(slots=True)
class EventOps:
    """What the store must do for one event: one idempotent unit keyed by ``applied_key``.

    The reads are ``reads_of``'s feature vector at ``time`` (evaluated by the
    store from the set's read template); ``writes`` are this event's updates.
    Not frozen, though nothing changes one once built: a frozen dataclass's
    ``__init__`` sets each field through ``object.__setattr__`` (1.2 µs an
    instance here, four instances a payment).
    """

    applied_key: str
    entity_key: str
    time: float
    reads_of: FeatureSet
    _writes: list[list[Any]] | None = None
    # a head-only set's event: its compact writes are made when first asked for (the compiled head arithmetic
    # reads the event itself, see head_kernels.SetKernel.columns)
    source: Any = None
    token: str = ""
    keys: KeySpace | None = None
    hasher: KeyedHasher | None = None

    @property
    def writes(self) -> list[list[Any]]:
        if self._writes is None:
            self._writes = []
            if self.source is not None:
                self.reads_of.compact_writer(self.source, self.entity_key, self.token, self.time, self.keys,
                                             self.hasher, self._writes)
        return self._writes


@dataclass(slots=True)
class EventUnit:
    """One input event's whole effect on the store: one idempotency unit however many sets it feeds.

    A payment feeds five feature sets; guarding each with its own marker and
    snapshot cost five marker reads, five snapshot writes and five JSON
    round trips per payment. A unit is applied once, atomically, under one
    ``applied_key``; its stored snapshot holds one component map per part.
    """

    applied_key: str
    parts: tuple[EventOps, ...]
    # True: the store answers each head-only part with its heads before and after the event, decoded in
    # Python (no reads or JSON inside Redis); the unit's answer is then feature vectors, not component maps
    framed: bool = True


def event_unit(event_id: str, parts: Sequence[EventOps], keys: KeySpace, kind: str = "event") -> EventUnit:
    """The unit of ``parts`` for event ``event_id`` (``kind`` names the marker, e.g. ``payment``).

    >>> from types import SimpleNamespace as E
    >>> fs = FeatureSet("t", "1", "card", "transaction", lambda e: e.card, lambda e: e.ts,
    ...                 (Windowed("n_10m", "count", 600, 60),))
    >>> ks = KeySpace("k"); ops = compile_event(fs, E(event_id="e1", card="c1", ts=1000.0), ks, KeyedHasher(b"x"))
    >>> u = event_unit("e1", [ops, ops], ks, "payment")
    >>> u.applied_key, len(u.parts)
    ('k:applied:payment:e1', 2)
    """
    return EventUnit(keys.applied(f"{kind}:{event_id}"), tuple(parts))


NO_BUCKET = -(2.0**53)  # a head's newest bucket before anything was stored: every window is empty


@dataclass(frozen=True)
class HeadLayout:
    """Where each value sits in an entity's head, a packed index kept next to its buckets.

    The head of one entity for one feature set is a string of little-endian
    numbers (bucket indexes as 64-bit integers, counts as unsigned 32-bit
    integers, everything else doubles), then
    one length-prefixed string per :class:`LastValue`. For each
    stored series: its newest bucket ``top``, then for each undelayed window
    length ``w`` and each of its components, ``w`` suffix totals
    ``S[k] = combine(buckets top-w+1+k .. top)``. The window read ``k``
    buckets after ``top`` is ``S[k]`` (later buckets are empty), and ``k >= w``
    is an empty window, so such a read needs one value, not the window's
    buckets. A distinct count keeps its newest bucket and ``D[k]``, the number
    of values last seen at or after bucket ``top-w+1+k``. Then the previous
    event's time.

    The head is derived data: the buckets, sorted sets and last values stay
    stored as before, the write script keeps the head in step with them, and
    rebuilds it from them when it is missing (expired, or written by a
    version without heads); a read without a head falls back to the buckets.
    """

    size: int  # numbers
    fmt: str  # their Python struct format: newest buckets 64-bit integers, counts 32-bit unsigned, the rest doubles
    lua_fmt: str  # the same for Redis's Lua struct library
    series: tuple[tuple[str, int, int, tuple[tuple[int, tuple[tuple[str, str, int], ...]], ...]], ...]
    # per stored series: (storage, index of top, kept buckets, ((w, ((component, mode, start), ...)), ...))
    distinct: tuple[tuple[str, int, int, int], ...]  # (feature, index of its top, bucket_s, buckets); counts follow
    last_time: int | None  # index of the previous event's time
    strings: tuple[str, ...]  # LastValue features, in order after the doubles
    ttl_s: int

    def suffix_start(self, storage: str, window: int, component: str) -> int:
        """Where the ``window``-bucket suffix totals of a component start: the tail of its longest window's."""
        for name, _, _, windows in self.series:
            if name == storage:
                for w, comps in windows:
                    for suffix, _, start in comps:
                        if suffix == component and window <= w:
                            return start + w - window
        raise KeyError((storage, window, component))

    def top_index(self, storage: str) -> int:
        return next(top for name, top, _, _ in self.series if name == storage)

    def distinct_index(self, feature: str) -> int:
        return next(top for name, top, _, _ in self.distinct if name == feature)


def head_layout(fs: FeatureSet) -> HeadLayout:
    """The layout of ``fs``'s heads (0-based indexes into the numbers).

    >>> fs = FeatureSet("t", "1", "card", "x", lambda e: e.c, lambda e: e.t, (
    ...     Windowed("n", "count", 600, 60, series="a"), Windowed("s", "sum", 300, 60, value_of=abs, series="a"),
    ...     Windowed("d", "distinct", 120, 60, value_of=abs), TimeSince("since")))
    >>> lay = head_layout(fs)
    >>> lay.series
    (('a@60', 0, 70, ((5, (('s', 'add', 1),)), (10, (('n', 'add', 6),)))),)
    >>> lay.distinct, lay.last_time, lay.size, lay.fmt
    ((('d', 16, 60, 2),), 19, 20, '<qdddddIIIIIIIIIIqIId')
    """
    pos = 0
    series = []
    counts: set[int] = set()  # positions holding counts (whole numbers: 4 bytes instead of 8)
    for storage, (_, comps, kept) in fs.series_plan.items():
        top = pos
        pos += 1
        windows = []
        members = fs.series_members()[storage]
        # One suffix array per component, as long as the longest window that needs it: a shorter window's
        # totals are its tail (S_w[k] = S_W[W - w + k]), so a series read over 7, 8, 14 and 37 days keeps 37.
        longest: dict[tuple[str, str], int] = {}
        for f in members:
            if not f.delay_s:
                for c in COMPONENTS[f.agg]:
                    longest[c] = max(longest.get(c, 0), f.buckets)
        for w in sorted(set(longest.values())):
            entries = []
            for suffix, mode in comps:
                if longest.get((suffix, mode)) == w:
                    entries.append((suffix, mode, pos))
                    if suffix == "n":
                        counts.update(range(pos, pos + w))
                    pos += w
            windows.append((w, tuple(entries)))
        series.append((storage, top, kept, tuple(windows)))
    distinct = []
    for f in fs.vector:
        if isinstance(f, Windowed) and f.agg == "distinct":
            distinct.append((f.name, pos, f.bucket_s, f.buckets))
            counts.update(range(pos + 1, pos + 1 + f.buckets))
            pos += 1 + f.buckets
    last_time = None
    if any(isinstance(f, TimeSince) for f in fs.vector):
        last_time = pos
        pos += 1
    strings = tuple(f.name for f in fs.vector if isinstance(f, LastValue))
    tops = {top for _, top, _, _ in series} | {top for _, top, _, _ in distinct}
    kinds = ["q" if i in tops else "I" if i in counts else "d" for i in range(pos)]
    fmt = "<" + "".join(kinds)
    lua_fmt = "<" + "".join({"q": "i8", "I": "I4", "d": "d"}[k] for k in kinds)  # no repeat counts in Lua's struct
    return HeadLayout(pos, fmt, lua_fmt, tuple(series), tuple(distinct), last_time, strings, fs.ttl_s)


def window_bounds(t: float, bucket_s: int, buckets: int) -> tuple[int, int]:
    """First and last bucket index of the window read at time ``t``.

    >>> window_bounds(1000.0, 60, 10)
    (7, 16)
    """
    last = math.floor(t / bucket_s)
    return last - buckets + 1, last


def distinct_key(entity_key: str, name: str) -> str:
    """The sorted set (value -> latest time) of a distinct-count feature; shares the entity's key prefix."""
    return f"{entity_key}|{name}"


def vector_reads(fs: FeatureSet, entity_key: str, t: float) -> tuple[list[list[Any]], list[list[Any]]]:
    """The reads that give the feature vector at time ``t``: (before this event, after it).

    Windows are read after the event's own writes (they include it); the
    previous event's time and values before (they exclude it).
    """
    pre: list[list[Any]] = []
    post: list[list[Any]] = []
    for feat in fs.vector:
        if isinstance(feat, Windowed):
            first, last = feat.bounds(t)
            if feat.agg == "distinct":
                post.append([feat.name, "zcount", distinct_key(entity_key, feat.name),
                             first * feat.bucket_s, (last + 1) * feat.bucket_s])
            else:
                modes = [[suffix, mode] for suffix, mode in COMPONENTS[feat.agg]]
                post.append([feat.name, "window", entity_key, feat.storage, first, last, modes])
        elif isinstance(feat, TimeSince):
            pre.append([feat.name, "hget", entity_key, "@|t"])
        elif isinstance(feat, LastValue):
            pre.append([feat.name, "hget", entity_key, f"{feat.name}|v"])
    return pre, post


def compile_event(fs: FeatureSet, event: Any, keys: KeySpace, hasher: KeyedHasher, in_unit: bool = False) -> EventOps:
    """The store operations that apply ``event`` to every feature of ``fs``.

    ``in_unit``: the operations are a part of an :class:`EventUnit`, whose own
    marker guards them, so they get no marker key of their own.

    >>> from types import SimpleNamespace as E
    >>> fs = FeatureSet("t", "1", "card", "transaction", lambda e: e.card, lambda e: e.ts,
    ...                 (Windowed("n_10m", "count", 600, 60),))
    >>> ops = compile_event(fs, E(event_id="e1", card="c1", ts=1000.0), KeySpace("k"), KeyedHasher(b"x"))
    >>> ops.writes[0][0], ops.writes[0][2], ops.writes[0][3]
    ('bucket', 'n_10m@60', [60, 70, 1000.0, [['n', 'add', 1.0]], 60])
    >>> ops.entity_key.startswith("k:e:card:"), ops.reads_of is fs
    (True, True)
    """
    token = fs.token_of(event, hasher)
    key = keys.entity(fs.entity, token)
    t = fs.time_of(event)
    writes: list[list[Any]] = []
    if not fs.buckets:  # the compact writes, made when first asked for
        return EventOps("" if in_unit else keys.applied(f"{fs.name}:{event.event_id}"), key, t, fs, None, event,
                        token, keys, hasher)
    has_hash = False
    for storage, where, value_of, bucket_s, kept, comps, late in fs.write_plan.series:
        if where is not None and not where(event):
            continue
        x = 1.0 if value_of is None else float(value_of(event))
        q = x * x
        writes.append(["bucket", key, storage, [bucket_s, kept, t,
                                                [[c, mode, 1.0 if c == "n" else q if c == "q" else x]
                                                 for c, mode in comps], late]])
        has_hash = True
    for kind, feat in fs.write_plan.others:
        if kind == "distinct":
            if feat.where is None or feat.where(event):
                member = str(feat.value_of(event))
                if feat.hash_as:
                    member = hasher.token(feat.hash_as, member)
                writes.append(["zdistinct", distinct_key(key, feat.name), member,
                               [t, repr(t - feat.window_s - feat.lateness_s), fs.ttl_s, feat.name]])
        elif kind == "since":
            writes.append(["last", key, "@", [t, "", repr(t)]])
            has_hash = True
        elif kind == "last":
            writes.append(["last", key, feat.name, [t, str(feat.value_of(event)), repr(t)]])
            has_hash = True
        elif kind == "lastn":
            zkey = keys.entity_part(fs.entity, token, feat.name)
            writes.append(["zlast", zkey, str(feat.value_of(event)), [t, feat.n, fs.ttl_s]])
        elif kind == "seen":
            skey = keys.entity_part(fs.entity, token, feat.name)
            writes.append(["sadd", skey, str(feat.value_of(event)), [fs.ttl_s]])
        else:  # global score
            writes.append(_global_write(feat, event, t, keys))
    if has_hash and fs.buckets:  # a head-only set's head carries its own TTL
        writes.append(["expire", key, "", [fs.ttl_s]])
    if fs.cached_reads and writes:
        writes.append(["version", keys.version_of(key), "", [fs.ttl_s]])
    return EventOps("" if in_unit else keys.applied(f"{fs.name}:{event.event_id}"), key, t, fs, writes)


def compact_writer(fs: FeatureSet) -> Callable[..., None]:
    """``write(event, key, token, t, keys, hasher, writes)`` for ``fs``: its plan unrolled into straight code.

    A head-only set's writes: only what changes per event (the store's template has the rest; the entity key
    and time are the part's), a third of the bytes Redis would otherwise decode per payment; straight code,
    since a loop over the plan cost a payment ~3x more.

    A series' value is converted once per filter and value function (the amount family's five series share
    one); lists, seen sets and global scores keep their general form.
    """
    plan = fs.write_plan
    scope: dict[str, Any] = {"_other_write": _other_compact_write}
    lines = ["def write(event, key, token, t, keys, hasher, writes):", "    append = writes.append"]
    lines += series_code(plan, scope, lambda i, storage, indent, values: [
        f"{indent}append(['b', {storage!r}, [{', '.join(values)}]])"])
    for j, (kind, feat) in enumerate(plan.others):
        scope[f"F{j}"] = feat
        if kind == "distinct":
            indent = "    "
            if feat.where is not None:
                lines.append(f"    if F{j}.where(event):")
                indent = "        "
            lines.append(f"{indent}member = str(F{j}.value_of(event))")
            member = f"hasher.token({feat.hash_as!r}, member)" if feat.hash_as else "member"
            lines.append(f"{indent}append(['z', {feat.name!r}, {member}])")
        elif kind == "since":
            lines.append("    append(['l', '@', ''])")
        elif kind == "last":
            lines.append(f"    append(['l', {feat.name!r}, str(F{j}.value_of(event))])")
        else:
            lines.append(f"    append(_other_write({kind!r}, F{j}, fs, event, token, t, keys))")
    scope["fs"] = fs
    exec(compile("\n".join(lines) + "\n", f"<compact writes {fs.qualified_version}>", "exec"), scope)
    return scope["write"]


def series_code(plan: WritePlan, scope: dict[str, Any],
                store: Callable[[int, str, str, list[str]], list[str]]) -> list[str]:
    """Generated lines that give each stored series of ``plan`` an event's component values: ``store(i,
    storage, indent, values)`` says what to do with them (expressions, in the series' component order).

    Shared by :func:`compact_writer` and the compiled head arithmetic's inputs (``head_kernels``), so both
    see the same values: a filter is an ``if``, a value function is called and converted once per event
    (once for all the unfiltered series that share it: the amount family's five), its square once.
    """
    lines: list[str] = []
    converted: dict[int, str] = {}  # unfiltered value functions already converted: id -> local name
    squared: set[str] = set()
    for i, (storage, where, value_of, _, _, comps, _) in enumerate(plan.series):
        indent = "    "
        if where is not None:
            scope[f"W{i}"] = where
            lines.append(f"    if W{i}(event):")
            indent = "        "
        if value_of is None:
            values = ["1.0" for _ in comps]
        else:
            x = converted.get(id(value_of)) if where is None else None
            if x is None:
                x = f"x{i}"
                scope[f"V{i}"] = value_of
                lines.append(f"{indent}{x} = float(V{i}(event))")
                if where is None:
                    converted[id(value_of)] = x
            if any(c == "q" for c, _ in comps) and (x not in squared or where is not None):
                lines.append(f"{indent}q{x[1:]} = {x} * {x}")
                squared.add(x)
            values = ["1.0" if c == "n" else f"q{x[1:]}" if c == "q" else x for c, _ in comps]
        lines += store(i, storage, indent, values)
    return lines


def _other_compact_write(kind: str, feat: Any, fs: FeatureSet, event: Any, token: str, t: float,
                         keys: KeySpace) -> list[Any]:
    """A head-only set's write of a last-N list, a seen set or a global score (kept apart from the head)."""
    if kind == "lastn":
        return ["zlast", keys.entity_part(fs.entity, token, feat.name), str(feat.value_of(event)),
                [t, feat.n, fs.ttl_s]]
    if kind == "seen":
        return ["sadd", keys.entity_part(fs.entity, token, feat.name), str(feat.value_of(event)), [fs.ttl_s]]
    return _global_write(feat, event, t, keys)


def _global_write(feat: GlobalScore, event: Any, t: float, keys: KeySpace) -> list[Any]:
    weight = float(feat.weight_of(event))
    if feat.bucket_s is None:
        return ["zincr", keys.global_(feat.name), feat.member_of(event), [weight]]
    index = math.floor(t / feat.bucket_s)
    keep_s = (feat.buckets + 1) * feat.bucket_s
    return ["zincr", feat.bucket_key(keys, index), feat.member_of(event),
            [weight, keep_s, index, feat.bucket_key(keys, "latest")]]


@dataclass(frozen=True)
class WritePlan:
    """What :func:`compile_event` walks per event, worked out once per feature set.

    ``series``: (storage, filter, value, bucket size, buckets kept, components,
    late buckets) per stored series; ``others``: (kind, feature) for the rest.
    """

    series: tuple[tuple[Any, ...], ...]
    others: tuple[tuple[str, Any], ...]


def write_plan(fs: FeatureSet) -> WritePlan:
    series = tuple((storage, feat.where, feat.value_of, feat.bucket_s, kept, tuple(comps), feat.late_buckets)
                   for storage, (feat, comps, kept) in fs.series_plan.items())
    others: list[tuple[str, Any]] = []
    for feat in fs.features:
        if isinstance(feat, Windowed):
            if feat.agg == "distinct":
                others.append(("distinct", feat))
        elif isinstance(feat, TimeSince):
            others.append(("since", feat))
        elif isinstance(feat, LastValue):
            others.append(("last", feat))
        elif isinstance(feat, LastN):
            others.append(("lastn", feat))
        elif isinstance(feat, SeenSet):
            others.append(("seen", feat))
        elif isinstance(feat, GlobalScore):
            others.append(("global", feat))
    return WritePlan(series, tuple(others))


def combine(mode: str, values: list[float]) -> float | None:
    """How bucket values of one component combine over a window."""
    if not values:
        return None if mode in ("min", "max") else 0.0
    if mode == "min":
        return min(values)
    if mode == "max":
        return max(values)
    return math.fsum(values)


def std_from_moments(n: float, s: float, q: float, default: float = 0.0) -> float:
    """Population std from count, sum and sum of squares.

    A variance within rounding of zero is zero: ``q/n - mean²`` cancels
    catastrophically there, and online (bucket sums) and offline (prefix
    sums) round differently.

    >>> std_from_moments(2, 30.0, 500.0), std_from_moments(3, 3.3, 3.63), std_from_moments(0, 0.0, 0.0, -1.0)
    (5.0, 0.0, -1.0)
    """
    if not n:
        return default
    mean = s / n
    var = q / n - mean * mean
    return math.sqrt(var) if var > 1e-9 * max(q / n, 1.0) else 0.0


def _num(v: Any) -> float | None:
    return None if v is None else float(v)


def finalize(fs: FeatureSet, raw: Mapping[str, Any], t: float) -> dict[str, Any]:
    """Feature values at time ``t`` from the stored components in ``raw``.

    ``raw`` maps ``name|component`` (windows), ``name`` (distinct counts) and
    ``name`` (previous time / value) to what the store returned; missing
    entries give each feature's default, never an error.

    >>> fs = FeatureSet("t", "1", "card", "transaction", lambda e: e.card, lambda e: e.ts, (
    ...     Windowed("amt_mean", "mean", 600, 60, value_of=lambda e: e.amount),
    ...     Windowed("amt_std", "std", 600, 60, value_of=lambda e: e.amount),
    ...     TimeSince("since_prev")))
    >>> finalize(fs, {"amt_mean|n": 2, "amt_mean|s": 30.0, "amt_std|n": 2, "amt_std|s": 30.0,
    ...               "amt_std|q": 500.0, "since_prev": 990.0}, 1000.0)
    {'amt_mean': 15.0, 'amt_std': 5.0, 'since_prev': 10.0}
    >>> finalize(fs, {}, 1000.0)
    {'amt_mean': 0.0, 'amt_std': 0.0, 'since_prev': -1.0}
    """
    out: dict[str, Any] = {}
    for feat in fs.vector:
        name = feat.name
        if isinstance(feat, Windowed):
            if feat.agg == "distinct":
                value = raw.get(name)
                out[name] = float(value) if value is not None else feat.default
                continue
            c = {s: _num(raw.get(f"{name}|{s}")) for s, _ in COMPONENTS[feat.agg]}
            n = c.get("n") or 0.0
            if feat.agg in ("count", "sum"):
                value = c["n" if feat.agg == "count" else "s"]
                out[name] = float(value) if value is not None else feat.default
            elif feat.agg == "mean":
                out[name] = float(c["s"]) / n if n else feat.default
            elif feat.agg == "std":
                out[name] = std_from_moments(n, float(c["s"] or 0.0), float(c["q"] or 0.0), feat.default)
            else:
                extreme = c["lo" if feat.agg == "min" else "hi"]
                out[name] = float(extreme) if extreme is not None else feat.default
        elif isinstance(feat, TimeSince):
            prev = raw.get(name)
            out[name] = max(t - float(prev), 0.0) if prev is not None else feat.default
        else:
            value = raw.get(name)
            out[name] = value if value is not None else feat.default
    return out
