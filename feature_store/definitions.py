"""Declarative feature definitions and their compilation to store operations.

A feature is declared once (entity, source field, aggregation, window); the
store backend executes the compiled operations. Windows are time buckets, so
memory per entity is bounded by ``window / bucket`` fields plus lateness.

Pure: compiling an event touches no I/O, which keeps the online path and any
offline recomputation on one definition.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from feature_store.keys import KeyedHasher, KeySpace

Predicate = Callable[[Any], bool]


@dataclass(frozen=True)
class Windowed:
    """Count or sum of ``value_of(event)`` over the trailing ``window_s`` seconds, bucketed.

    The window is the ``window_s // bucket_s`` buckets ending with the event's
    own bucket, read at the event's time (point-in-time correct, the event
    itself included).
    """

    name: str
    agg: Literal["count", "sum"]
    window_s: int
    bucket_s: int
    value_of: Callable[[Any], float] | None = None
    where: Predicate | None = None
    lateness_s: int = 3600

    def __post_init__(self) -> None:
        if self.window_s % self.bucket_s:
            raise ValueError(f"{self.name}: window {self.window_s}s is not a multiple of bucket {self.bucket_s}s")
        if self.agg == "sum" and self.value_of is None:
            raise ValueError(f"{self.name}: a sum needs value_of")

    @property
    def buckets(self) -> int:
        return self.window_s // self.bucket_s

    @property
    def kept_buckets(self) -> int:
        """Buckets kept in Redis: the window plus enough to accept late events."""
        return self.buckets + math.ceil(self.lateness_s / self.bucket_s)


@dataclass(frozen=True)
class Previous:
    """The largest ``value_of`` seen before this event (e.g. the previous event time)."""

    name: str
    value_of: Callable[[Any], float]


@dataclass(frozen=True)
class LastN:
    """The last ``n`` values of a field, newest first (e.g. a user's recent items)."""

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
    """A global sorted-set score per member, e.g. item popularity weighted by kind."""

    name: str
    member_of: Callable[[Any], str]
    weight_of: Callable[[Any], float]


Feature = Windowed | Previous | LastN | SeenSet | GlobalScore


@dataclass(frozen=True)
class FeatureSet:
    """The features one event type feeds for one entity type, with a version."""

    name: str
    version: str
    entity: str
    entity_id_of: Callable[[Any], str]
    time_of: Callable[[Any], float]
    features: tuple[Feature, ...]
    ttl_s: int = 35 * 24 * 3600

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features if isinstance(f, Windowed | Previous))


@dataclass(frozen=True)
class EventOps:
    """What the store must do for one event: one idempotent unit keyed by ``applied_key``."""

    applied_key: str
    pre: list[list[Any]] = field(default_factory=list)
    writes: list[list[Any]] = field(default_factory=list)
    post: list[list[Any]] = field(default_factory=list)

    def to_wire(self) -> dict[str, Any]:
        return {"d": self.applied_key, "pre": self.pre, "w": self.writes, "post": self.post}


def compile_event(fs: FeatureSet, event: Any, keys: KeySpace, hasher: KeyedHasher) -> EventOps:
    """The store operations that apply ``event`` to every feature of ``fs``.

    >>> from types import SimpleNamespace as E
    >>> fs = FeatureSet("t", "1", "card", lambda e: e.card, lambda e: e.ts,
    ...                 (Windowed("n_10m", "count", 600, 60),))
    >>> ops = compile_event(fs, E(event_id="e1", card="c1", ts=1000.0), KeySpace("k"), KeyedHasher(b"x"))
    >>> ops.writes[0][0], ops.writes[0][2], ops.writes[0][3]
    ('bucket', 'n_10m', [60, 70, 1.0, 1000.0])
    >>> ops.post[0][:2], ops.post[0][3:]
    (['n_10m', 'window'], ['n_10m', 60, 10, 1000.0])
    """
    token = hasher.token(fs.entity, fs.entity_id_of(event))
    key = keys.entity(fs.entity, token)
    t = fs.time_of(event)
    ops = EventOps(applied_key=keys.applied(f"{fs.name}:{event.event_id}"))
    for feat in fs.features:
        if isinstance(feat, Windowed):
            if feat.where is not None and not feat.where(event):
                ops.post.append([feat.name, "window", key, feat.name, feat.bucket_s, feat.buckets, t])
                continue
            value = 1.0 if feat.agg == "count" else float(feat.value_of(event))  # type: ignore[misc]
            ops.writes.append(["bucket", key, feat.name, [feat.bucket_s, feat.kept_buckets, value, t]])
            ops.post.append([feat.name, "window", key, feat.name, feat.bucket_s, feat.buckets, t])
        elif isinstance(feat, Previous):
            ops.pre.append([feat.name, "hget", key, feat.name])
            ops.writes.append(["hmax", key, feat.name, [float(feat.value_of(event))]])
        elif isinstance(feat, LastN):
            list_key = keys.entity_part(fs.entity, token, feat.name)
            ops.writes.append(["lpush_trim", list_key, feat.value_of(event), [feat.n]])
            ops.writes.append(["expire", list_key, "", [fs.ttl_s]])
        elif isinstance(feat, SeenSet):
            set_key = keys.entity_part(fs.entity, token, feat.name)
            ops.writes.append(["sadd", set_key, feat.value_of(event), []])
            ops.writes.append(["expire", set_key, "", [fs.ttl_s]])
        elif isinstance(feat, GlobalScore):
            ops.writes.append(["zincr", keys.global_(feat.name), feat.member_of(event), [float(feat.weight_of(event))]])
    if any(isinstance(f, Windowed | Previous) for f in fs.features):
        ops.writes.append(["expire", key, "", [fs.ttl_s]])
    return ops


def window_bounds(t: float, bucket_s: int, buckets: int) -> tuple[int, int]:
    """First and last bucket index of the window read at time ``t``.

    >>> window_bounds(1000.0, 60, 10)
    (7, 16)
    """
    last = math.floor(t / bucket_s)
    return last - buckets + 1, last


def derived(values: Mapping[str, float | None]) -> dict[str, float]:
    """Replace missing values by 0.0 (missing entity or feature gives defaults, not errors)."""
    return {k: (0.0 if v is None else float(v)) for k, v in values.items()}
