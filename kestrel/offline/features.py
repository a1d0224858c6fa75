"""Offline recomputation of online features, point-in-time correct.

Given an event log in the order the online store applied it (an archive of
the topic, or a CSV sorted by time), :func:`compute_features` returns, for
every event, the feature values the online path computed at that event:
the same :class:`~kestrel.feature_store.definitions.FeatureSet`, the same buckets,
the same lateness rule. A test replays a stream through the real worker and
checks every value.

Why numpy/pandas: the hot part is range aggregation over sorted bucket
indices, which is a ``searchsorted`` plus prefix sums (count, sum, mean,
std) and a sparse table (min, max), all vectorised; pandas only groups and
aligns. Entities whose events arrive out of time order (possible online
within the allowed lateness) are replayed exactly by a slower per-entity
path, so parity holds for them too.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from kestrel.feature_store.definitions import (
    COMPONENTS,
    FeatureSet,
    LastValue,
    TimeSince,
    Windowed,
    combine,
    finalize,
    std_from_moments,
)


def compute_features(fs: FeatureSet, events: Sequence[Any]) -> pd.DataFrame:
    """One row per event (same order), one column per feature of ``fs``'s vector."""
    n = len(events)
    if n == 0:
        return pd.DataFrame(columns=list(fs.feature_names))
    entity = np.array([fs.entity_id_of(e) for e in events], dtype=object)
    t = np.array([fs.time_of(e) for e in events], dtype=float)
    codes, _ = pd.factorize(entity)
    order = np.lexsort((np.arange(n), codes))  # group by entity, keep log order inside a group
    g, ts = codes[order], t[order]
    in_order = _groups_in_time_order(g, ts)
    columns: dict[str, np.ndarray] = {}
    for feat in fs.vector:
        if isinstance(feat, Windowed):
            columns[feat.name] = _windowed(feat, [events[i] for i in order], g, ts)
        elif isinstance(feat, TimeSince):
            prev = pd.Series(ts).groupby(g).cummax().groupby(g).shift(1).to_numpy()
            columns[feat.name] = np.where(np.isnan(prev), feat.default, np.maximum(ts - prev, 0.0))
        elif isinstance(feat, LastValue):
            values = pd.Series([str(feat.value_of(events[i])) for i in order], dtype=object)
            prev = values.groupby(g).shift(1)
            columns[feat.name] = np.array([feat.default if pd.isna(v) else v for v in prev], dtype=object)
    frame = pd.DataFrame(columns, index=order).sort_index()
    slow = np.flatnonzero(~in_order[np.argsort(order)])
    if slow.size:  # entities with out-of-order events: replay them exactly
        exact = _replay_exactly(fs, [events[i] for i in slow])
        frame.iloc[slow] = exact.to_numpy()
    return _keep_defaults(fs, frame.reset_index(drop=True))


def _keep_defaults(fs: FeatureSet, frame: pd.DataFrame) -> pd.DataFrame:
    """pandas turns a missing string into NaN: put back the online default (e.g. None)."""
    for feat in fs.vector:
        if isinstance(feat, LastValue):
            frame[feat.name] = pd.Series([feat.default if pd.isna(v) else v for v in frame[feat.name]], dtype=object)
    return frame


def _groups_in_time_order(g: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Per row (grouped order): is its entity's time non-decreasing in log order?"""
    backwards = np.r_[False, (np.diff(ts) < 0) & (np.diff(g) == 0)]
    bad = pd.Series(backwards).groupby(g).transform("any").to_numpy()
    return ~bad


def _windowed(feat: Windowed, events: list[Any], g: np.ndarray, ts: np.ndarray) -> np.ndarray:
    n = len(events)
    mask = np.array([feat.where(e) for e in events], dtype=bool) if feat.where else np.ones(n, dtype=bool)
    bucket = np.floor(ts / feat.bucket_s).astype(np.int64)
    first, last = _bounds(ts, feat)
    # Rows of the feature's own events, with group-offset buckets: sorted, so ranges are contiguous.
    rows = np.flatnonzero(mask)
    offset = g.astype(np.int64) * (1 << 40)
    keyed = offset[rows] + bucket[rows]
    lo = np.searchsorted(keyed, offset + first, side="left")
    hi_bucket = np.searchsorted(keyed, offset + last, side="right")
    hi_self = np.searchsorted(rows, np.arange(n), side="right")  # only events applied so far (j <= i)
    hi = np.minimum(hi_bucket, hi_self)
    hi = np.maximum(hi, lo)
    if feat.agg == "distinct":
        values = [str(feat.value_of(events[r])) for r in rows]  # type: ignore[misc]
        return _distinct(values, lo, hi)
    x = np.ones(len(rows)) if feat.agg == "count" else np.array(
        [float(feat.value_of(events[r])) for r in rows], dtype=float)  # type: ignore[misc]
    count = (hi - lo).astype(float)
    if feat.agg == "count":
        return count
    sums = _BucketSums(keyed, offset + last, feat.buckets, hi)
    s = sums(x)
    if feat.agg == "sum":
        return s
    if feat.agg == "mean":
        return np.where(count > 0, s / np.maximum(count, 1), feat.default)
    if feat.agg == "std":
        q = sums(x * x)
        return np.array([std_from_moments(c, a, b, feat.default) for c, a, b in zip(count, s, q, strict=True)])
    out = _range_extreme(x, lo, hi, np.minimum if feat.agg == "min" else np.maximum)
    return np.where(count > 0, out, feat.default)


def _bounds(ts: np.ndarray, feat: Windowed) -> tuple[np.ndarray, np.ndarray]:
    last = np.floor((ts - feat.delay_s) / feat.bucket_s).astype(np.int64)
    return last - feat.buckets + 1, last


class _BucketSums:
    """Window sums taken bucket by bucket, as the store does.

    A difference of prefix sums would let one huge old value swamp a window
    that no longer holds it (catastrophic cancellation); summing the
    window's own buckets keeps the error to that of the values inside.
    """

    def __init__(self, keyed: np.ndarray, last_key: np.ndarray, buckets: int, hi: np.ndarray) -> None:
        self.keyed, self.last_key, self.buckets, self.hi = keyed, last_key, buckets, hi
        starts = np.flatnonzero(np.r_[True, keyed[1:] != keyed[:-1]]) if keyed.size else np.zeros(0, dtype=int)
        self.run_start = starts
        self.run_end = np.r_[starts[1:], keyed.size].astype(int)
        self.run_key = keyed[starts]
        self.run_id = np.repeat(np.arange(starts.size), self.run_end - starts)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = np.zeros(self.last_key.shape)
        if x.size == 0:
            return out
        total = np.add.reduceat(x, self.run_start)
        within = pd.Series(x).groupby(self.run_id).cumsum().to_numpy()  # rounding stays inside a bucket
        hi = self.hi
        for k in range(self.buckets - 1, -1, -1):  # oldest bucket first, like the store
            key = self.last_key - k
            r = np.clip(np.searchsorted(self.run_key, key), 0, self.run_key.size - 1)
            ok = (self.run_key[r] == key) & (self.run_start[r] < hi)
            full = self.run_end[r] <= hi
            part = within[np.clip(hi - 1, 0, x.size - 1)]
            out += np.where(ok, np.where(full, total[r], part), 0.0)
        return out


def _range_extreme(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, op: np.ufunc) -> np.ndarray:
    """Range min/max with a sparse table: O(n log n) build, O(1) per query."""
    if x.size == 0:
        return np.zeros(lo.shape)
    table = [x]
    k = 1
    while (1 << k) <= x.size:
        prev = table[-1]
        table.append(op(prev[: x.size - (1 << k) + 1], prev[(1 << (k - 1)):(1 << (k - 1)) + x.size - (1 << k) + 1]))
        k += 1
    length = np.maximum(hi - lo, 1)
    level = np.floor(np.log2(length)).astype(int)
    out = np.empty(lo.shape)
    for lv in np.unique(level):
        sel = level == lv
        row = table[lv]
        a = np.minimum(lo[sel], row.size - 1)
        b = np.clip(hi[sel] - (1 << lv), 0, row.size - 1)
        out[sel] = op(row[a], row[b])
    return out


def _distinct(values: list[str], lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Distinct values in each [lo, hi) range; ranges only move forward, so a sliding counter suffices."""
    out = np.zeros(lo.shape)
    counts: Counter[str] = Counter()
    cur_lo = cur_hi = 0
    for i in np.argsort(lo, kind="stable"):
        a, b = int(lo[i]), int(hi[i])
        if a < cur_lo or b < cur_hi:  # not monotone (mixed groups): recount this one
            out[i] = len(set(values[a:b]))
            continue
        while cur_hi < b:
            counts[values[cur_hi]] += 1
            cur_hi += 1
        while cur_lo < a:
            counts[values[cur_lo]] -= 1
            if not counts[values[cur_lo]]:
                del counts[values[cur_lo]]
            cur_lo += 1
        out[i] = len(counts)
    return out


def _replay_exactly(fs: FeatureSet, events: list[Any]) -> pd.DataFrame:
    """The online algorithm itself, per entity, in log order (shared series, lateness, cleanup)."""
    plan = fs.series_plan
    state: dict[str, dict[str, Any]] = {}
    rows = []
    for e in events:
        t = fs.time_of(e)
        st = state.setdefault(fs.entity_id_of(e), {"buckets": {}, "lo": {}, "last": {}, "distinct": {}})
        raw: dict[str, Any] = {}
        for feat in fs.vector:  # reads before the event's writes
            if isinstance(feat, TimeSince):
                raw[feat.name] = st["last"].get("@", (None, None))[0]
            elif isinstance(feat, LastValue):
                raw[feat.name] = st["last"].get(feat.name, (None, None))[1]
        for storage, (feat, comps, kept) in plan.items():  # bucket writes, one per stored series
            if feat.where is not None and not feat.where(e):
                continue
            b = math.floor(t / feat.bucket_s)
            x = 1.0 if feat.value_of is None else float(feat.value_of(e))
            lo = st["lo"].get(storage)
            buckets = st["buckets"].setdefault(storage, {})
            if lo is not None and b < lo + kept - 1 - feat.late_buckets:
                continue  # later than the allowed lateness
            for suffix, mode in comps:
                v = {"n": 1.0, "q": x * x}.get(suffix, x)
                cur = buckets.get((suffix, b))
                buckets[(suffix, b)] = v if cur is None else (
                    cur + v if mode == "add" else (min(cur, v) if mode == "min" else max(cur, v)))
            new_lo = b - kept + 1
            if lo is None or new_lo > lo:
                st["lo"][storage] = new_lo
                for key in [k for k in buckets if k[1] < new_lo]:
                    del buckets[key]
        for feat in fs.vector:  # other writes
            if isinstance(feat, Windowed) and feat.agg == "distinct" and (feat.where is None or feat.where(e)):
                seen = st["distinct"].setdefault(feat.name, {})
                v = str(feat.value_of(e))  # type: ignore[misc]
                seen[v] = max(seen.get(v, t), t)
                horizon = t - feat.window_s - feat.lateness_s
                for old in [k for k, when in seen.items() if when < horizon]:
                    del seen[old]
            elif isinstance(feat, TimeSince | LastValue):
                name = "@" if isinstance(feat, TimeSince) else feat.name
                value = "" if isinstance(feat, TimeSince) else str(feat.value_of(e))
                cur = st["last"].get(name)
                if cur is None or t >= cur[0]:
                    st["last"][name] = (t, value)
        for feat in fs.vector:  # window reads after the writes
            if isinstance(feat, Windowed):
                first, last = feat.bounds(t)
                if feat.agg == "distinct":
                    seen = st["distinct"].get(feat.name, {})
                    lo_t, hi_t = first * feat.bucket_s, (last + 1) * feat.bucket_s
                    raw[feat.name] = sum(1 for when in seen.values() if lo_t <= when < hi_t)
                    continue
                buckets = st["buckets"].get(feat.storage, {})
                for suffix, mode in COMPONENTS[feat.agg]:
                    vals = [buckets[(suffix, b)] for b in range(first, last + 1) if (suffix, b) in buckets]
                    raw[f"{feat.name}|{suffix}"] = combine(mode, vals)
        rows.append(finalize(fs, raw, t))
    return _keep_defaults(fs, pd.DataFrame(rows, columns=list(fs.feature_names)))
