"""Head arithmetic in the worker: a batch of head-only events applied to their packed heads in Python.

Why: inside Redis the same arithmetic (``lua/head.lua``, ``write_head`` in
``lua/apply_batch.lua``) cost ~80 µs of Redis's single thread per payment, of
which the Redis commands were a fraction: the rest was Lua unpacking, updating
and packing heads. Redis is shared by every worker; the workers are not. So
for feature sets whose head is their whole state (``FeatureSet.buckets=False``:
only windows, time-since and last values), the store applies a batch in two
round trips (optimistic concurrency):

1. one pipeline of plain reads: the heads, tombstones and markers the batch
   touches and the scores its distinct counts need (:meth:`HeadBatch.read_commands`);
2. :class:`HeadBatch` (pure) applies the events in order, exactly as the script
   would, and gives each event its feature vectors;
3. one call of ``lua/commit_heads.lua`` checks that nothing changed since the
   read (each head's tag, tombstones, markers) and stores the new heads, the
   events' markers and the sorted-set updates, all or nothing
   (:meth:`HeadBatch.commit_args`). If anything changed (another worker wrote
   one of the entities, a subject was erased, an event was applied
   elsewhere), nothing is written and the store starts again.

(``WATCH`` would need no script, but Redis checks each watched key against
the client's whole list: quadratic, ~100 µs per event at 3,000 keys a batch.)

Every head ends with its write count (a double after its strings, ignored by
readers): the tag is its last 8 bytes, and the Lua path bumps it too, so both
paths may run side by side on the same entities, except for distinct counts
told by a pair set (``Windowed.seen_in``): the worker path reads the pair's
head and keeps no sorted set, so the Lua path must not follow it there.

Idempotency is unchanged: one marker per event holds its vectors, so a
redelivered event gets the vectors it got the first time and is not applied
twice. An absent head is an entity with nothing stored (the invariant of
head-only sets: the head and its distinct sorted sets share one TTL, renewed
together); a sorted set left without its head is dropped by the first write.

Each set's per-event update is generated Python (straight-line code per stored
series, like :class:`~kestrel.feature_store.read_path.HeadReader`), since a
generic loop over the layout cost several times more.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from kestrel.feature_store import head_kernels
from kestrel.feature_store.definitions import (
    NO_BUCKET,
    VECTOR_KINDS,
    EventOps,
    EventUnit,
    FeatureSet,
    Windowed,
    distinct_key,
    finalize,
)
from kestrel.feature_store.keys import KeySpace
from kestrel.feature_store.read_path import HeadReader, head_tail, pack_tail

NAN = math.nan
SNAPSHOT_VECTORS = b"V"  # a marker holding the event's vectors as JSON (the Lua path stores framed heads)

Command = list[Any]
SnapshotDecoder = Callable[[bytes, EventUnit], list[dict[str, Any]]]


def worker_applicable(fs: FeatureSet) -> bool:
    """Whether the worker may apply ``fs``'s events itself: its head is its whole state and every feature
    is a window, a time-since or a last value (lists, sets and global scores stay in Redis)."""
    return not fs.buckets and all(isinstance(f, VECTOR_KINDS) for f in fs.features)


class Head:
    """One entity's head for one feature set, unpacked: numbers (``HeadLayout`` order) and strings."""

    __slots__ = ("numbers", "seq", "strings", "tag")

    def __init__(self, numbers: list[Any], strings: list[str | None], seq: float, tag: bytes) -> None:
        self.numbers = numbers
        self.strings = strings
        self.seq = seq
        self.tag = tag  # the last 8 bytes of the head as read, b"" if it was absent: what the commit checks

    @property
    def absent(self) -> bool:
        return not self.tag


class DistinctScores:
    """The distinct counts' sorted sets as a batch sees them: scores read before it, its own updates on
    top, and the commands that store those updates in order (ZADD GT, and the trims), each as
    (name, argument count, arguments...) for the commit script."""

    def __init__(self) -> None:
        self._scores: dict[str, dict[str, float | None]] = {}
        self.ops: dict[str, list[Command]] = {}
        self.ttl: dict[str, int] = {}
        # the part being applied: its paired distinct counts' value -> latest time, read off the pair's head
        # (``Windowed.seen_in``); None: never seen, or not within the pair's TTL
        self.paired: dict[str, float | None] = {}

    def known(self, zkey: str, member: str, raw: bytes | None) -> None:
        self._scores.setdefault(zkey, {}).setdefault(member, None if raw is None else float(raw))

    def score(self, zkey: str, member: str) -> float | None:
        return self._scores[zkey][member]

    def add(self, zkey: str, member: str, t: float, ttl_s: int) -> None:
        members = self._scores[zkey]
        cur = members.get(member)
        members[member] = t if cur is None else max(cur, t)
        self.ops.setdefault(zkey, []).append(["ZADD", 4, zkey, "GT", t, member])
        self.ttl[zkey] = ttl_s

    def trim(self, zkey: str, bound: float) -> None:
        """Scores below ``bound`` are gone (``ZREMRANGEBYSCORE -inf (bound``)."""
        members = self._scores[zkey]
        for member, score in members.items():
            if score is not None and score < bound:
                members[member] = None
        self.ops.setdefault(zkey, []).append(["ZREMRANGEBYSCORE", 3, zkey, "-inf", f"({bound!r}"])


class HeadArithmetic:
    """``fs``'s heads: unpack, pack, apply one event's compact writes, and the vectors they give.

    >>> from types import SimpleNamespace as E
    >>> from kestrel.feature_store.definitions import TimeSince, compile_event
    >>> from kestrel.feature_store.keys import KeyedHasher
    >>> fs = FeatureSet("t", "1", "card", "transaction", lambda e: e.card, lambda e: e.ts,
    ...                 (Windowed("n_10m", "count", 600, 60), TimeSince("since")), buckets=False)
    >>> arith, scores = HeadArithmetic(fs, "|@t"), DistinctScores()
    >>> head = arith.unpack(None)  # an entity with nothing stored
    >>> for i, ts in enumerate((1000.0, 1090.0)):
    ...     ops = compile_event(fs, E(event_id=f"e{i}", card="c1", ts=ts), KeySpace("k"), KeyedHasher(b"x"))
    ...     before = arith.before(head)
    ...     arith.apply(head, ops.entity_key, ts, ops.writes, scores)
    >>> arith.event_vector(head, before, 1090.0)
    {'n_10m': 2.0, 'since': 90.0}
    >>> stored = arith.unpack(arith.pack(head))  # what is stored reads back the same, its write count bumped
    >>> stored.numbers == head.numbers, stored.seq
    (True, 1.0)
    """

    def __init__(self, fs: FeatureSet, suffix: str) -> None:
        if not worker_applicable(fs):
            raise ValueError(f"{fs.name}: not a head-only set of windows, times and last values")
        lay = fs.head
        self.fs = fs
        self.suffix = suffix  # the head's key is the entity key + suffix (redis_store.head_suffix)
        self.reader = HeadReader(fs)
        self.numbers = struct.Struct(lay.fmt)
        self.n_strings = len(lay.strings)
        self.ttl_s = lay.ttl_s
        # distinct counts whose values' latest times a pair set's head keeps (Windowed.seen_in): name -> pair set
        self.paired = {f.name: f.seen_in for f in fs.features if isinstance(f, Windowed) and f.seen_in}
        self.distinct_names = tuple(name for name, *_ in lay.distinct if name not in self.paired)  # sorted sets
        self.last_time_at = lay.last_time  # where the head keeps its latest event time (a pair set's: its values')
        empty: list[Any] = [0 if kind in "qI" else 0.0 for kind in lay.fmt[1:]]  # the types unpack gives
        for _, top, _, windows in lay.series:
            empty[top] = int(NO_BUCKET)
            for w, comps in windows:
                for _, mode, p in comps:
                    if mode != "add":
                        empty[p:p + w] = [math.nan] * w
        for _, top, _, _ in lay.distinct:
            empty[top] = int(NO_BUCKET)
        if lay.last_time is not None:
            empty[lay.last_time] = math.nan
        self._empty = empty
        self.source = self._source()
        scope: dict[str, Any] = {"FLOOR": math.floor, "NO_BUCKET": int(NO_BUCKET), "NAN": math.nan}
        exec(compile(self.source, f"<head arithmetic {fs.qualified_version}>", "exec"), scope)
        self._apply: Callable[..., None] = scope["apply"]

    # -- the stored form ----------------------------------------------------
    def unpack(self, blob: bytes | None) -> Head:
        if blob is None:
            return Head(list(self._empty), [None] * self.n_strings, 0.0, b"")
        strings, seq = head_tail(blob, self.numbers.size, self.n_strings)
        return Head(list(self.numbers.unpack_from(blob)), strings, seq, blob[-8:])

    def pack(self, head: Head) -> bytes:
        """The head as stored, its write count bumped (as ``save_head`` in head.lua packs it)."""
        return self.numbers.pack(*head.numbers) + pack_tail(head.strings, head.seq)

    # -- one event ----------------------------------------------------------
    def apply(self, head: Head, entity_key: str, t: float, writes: Sequence[list[Any]],
              scores: DistinctScores) -> None:
        """Apply one event's compact writes (``definitions.compact_writer``) at time ``t``."""
        self._apply(head.numbers, head.strings, t, writes, scores, entity_key, self.ttl_s)

    def before(self, head: Head) -> tuple[float, list[str | None]]:
        """What :meth:`event_vector` needs of the head before the event: its latest time (NaN: none) and strings."""
        return (head.numbers[self.last_time_at] if self.last_time_at is not None else NAN), list(head.strings)

    def event_vector(self, head: Head, before: tuple[float, list[str | None]], t: float) -> dict[str, Any]:
        """The event's vector: windows from the head after it, time since and last values from :meth:`before`."""
        return self.reader.decode_event(head.numbers, head.strings, t, before[0], before[1])

    def _source(self) -> str:
        """``apply(h, ss, t, writes, scores, key, ttl)``: head.lua's ``write_head`` for this set, unrolled.

        Counts stay Python ints (their places pack as integers), so a count
        component adds the literal 1 (``compile_event`` sends 1.0 for it).
        """
        fs, lay = self.fs, self.fs.head
        plan = fs.series_plan
        lines = ["def apply(h, ss, t, writes, scores, key, ttl):", "    for op in writes:", "        kind = op[0]"]
        first = True
        for storage, top, _, windows in lay.series:
            feat, comps, _ = plan[storage]
            cond = "if" if first else "elif"
            first = False
            lines += [f"        {cond} kind == 'b' and op[1] == {storage!r}:",
                      "            xs = op[2]",
                      f"            b = FLOOR(t / {feat.bucket_s})",
                      f"            top = h[{top}]",
                      f"            if top != NO_BUCKET and b < top - {feat.late_buckets}:",
                      "                continue",
                      "            d = b - top"]
            values = {c: ("1" if c == "n" else f"xs[{i}]") for i, (c, _) in enumerate(comps)}
            slide, same = [], []
            for w, entries in windows:
                for c, mode, p in entries:
                    v, end = values[c], p + w
                    if mode == "add":
                        shifted, inplace = f"[x + v for x in h[{p} + d:{end}]]", "h[k] += v"
                    else:
                        cmp = "<" if mode == "min" else ">"
                        shifted = f"[v if (x != x or v {cmp} x) else x for x in h[{p} + d:{end}]]"
                        inplace = f"x = h[k]\n                    if x != x or v {cmp} x: h[k] = v"
                    slide += [f"                v = {v}",
                              f"                if d < {w}:",
                              f"                    h[{p}:{end} - d] = {shifted}",
                              f"                    h[{end} - d:{end}] = [v] * d",
                              "                else:",
                              f"                    h[{p}:{end}] = [v] * {w}"]
                    same += [f"                v = {v}",
                             f"                for k in range({p}, {end} + d):",
                             f"                    {inplace}"]
            lines += ["            if d > 0:", *slide, f"                h[{top}] = b", "            else:", *same]
        if lay.last_time is not None:
            at = lay.last_time
            strings = {name: i for i, name in enumerate(lay.strings)}
            lines += [f"        {'if' if first else 'elif'} kind == 'l':",
                      f"            cur = h[{at}]",
                      "            if cur != cur or t >= cur:",
                      "                if op[1] == '@':",
                      f"                    h[{at}] = t"]
            first = False
            for name, i in strings.items():
                lines += [f"                elif op[1] == {name!r}:", f"                    ss[{i}] = op[2]"]
        window_and_lateness = {f.name: f.window_s + f.lateness_s for f in fs.vector
                               if isinstance(f, Windowed) and f.agg == "distinct"}
        for name, at, bucket_s, w in lay.distinct:
            paired = name in self.paired
            lines += [f"        {'if' if first else 'elif'} kind == 'z' and op[1] == {name!r}:",
                      *([f"            old = scores.paired[{name!r}]"] if paired else
                        [f"            zkey = key + {'|' + name!r}", "            member = op[2]",
                         "            old = scores.score(zkey, member)"]),
                      f"            bt = FLOOR(t / {bucket_s})",
                      f"            xn = FLOOR(max(old, t) / {bucket_s}) if old is not None else bt",
                      f"            xo = FLOOR(old / {bucket_s}) if old is not None else None",
                      f"            top = before = h[{at}]",
                      "            if bt > top:  # slide the counts to the new newest bucket",
                      "                shift = bt - top",
                      f"                if shift < {w}:",
                      f"                    h[{at + 1}:{at + 1 + w} - shift] = h[{at + 1} + shift:{at + 1 + w}]",
                      f"                    h[{at + 1 + w} - shift:{at + 1 + w}] = [0] * shift",
                      "                else:",
                      f"                    h[{at + 1}:{at + 1 + w}] = [0] * {w}",
                      f"                h[{at}] = top = bt",
                      "            if xo is None or xn > xo:  # D[k]: values last seen at or after bucket first + k",
                      f"                first = top - {w - 1}",
                      "                start = 0 if xo is None else max(0, xo - first + 1)",
                      f"                for k in range({at + 1} + start, {at + 1} + min({w - 1}, xn - first) + 1):",
                      "                    h[k] += 1",
                      *([] if paired else [
                          "            scores.add(zkey, member, t, ttl)",
                          f"            if h[{at}] != before:  # a new bucket: drop what left window + lateness",
                          f"                scores.trim(zkey, t - {window_and_lateness[name]})"])]
            first = False
        lines += ["        else:", "            raise ValueError(f'write {op!r} is not applied in the worker')"]
        return "\n".join(lines) + "\n"


class HeadBatch:
    """One batch of event units whose every part is worker-applicable: what to read, the events applied
    in order once read, and what to commit. Pure: the store sends the commands.

    ``sets`` gives each feature set's arithmetic by ``id`` (hashing a set hashes all its features);
    ``decode_snapshot`` turns a marker's stored snapshot back into the event's vectors.
    """

    def __init__(self, units: Sequence[EventUnit], keys: KeySpace, sets: dict[int, HeadArithmetic],
                 decode_snapshot: SnapshotDecoder, marker_ttl_s: int) -> None:
        self.units = units
        self.decode_snapshot = decode_snapshot
        self.marker_ttl_s = marker_ttl_s
        self.head_keys: dict[str, tuple[str, HeadArithmetic]] = {}  # head key -> (entity key, its set)
        self.tombs: dict[str, None] = {}
        self.markers: dict[str, None] = {}
        self.members: dict[tuple[str, str], str] = {}  # (sorted set, member) -> head key of its entity
        # per unit part: (its operations, arithmetic, head key, tombstone), worked out once
        self.parts: list[list[tuple[EventOps, HeadArithmetic, str, str]]] = []
        # per unit: (part index, paired distinct count, the pair part's index) for Windowed.seen_in
        self.pairings: list[list[tuple[int, str, int]]] = []
        tombstones: dict[str, str] = {}
        for unit in units:
            self.markers[unit.applied_key] = None
            parts = []
            paired = False
            for ops in unit.parts:
                arith = sets[id(ops.reads_of)]
                entity_key = ops.entity_key
                hk = entity_key + arith.suffix
                if hk not in self.head_keys:
                    self.head_keys[hk] = (entity_key, arith)
                tomb = tombstones.get(entity_key)
                if tomb is None:
                    tomb = tombstones[entity_key] = keys.tombstone_of(entity_key)
                    self.tombs[tomb] = None
                if arith.distinct_names:  # sorted sets to read (a count told by a pair's head reads none)
                    for op in ops.writes:
                        if op[0] == "z" and op[1] not in arith.paired:
                            self.members[(distinct_key(entity_key, op[1]), op[2])] = hk
                parts.append((ops, arith, hk, tomb))
                paired = paired or bool(arith.paired)
            self.parts.append(parts)
            self.pairings.append(_pairings(parts) if paired else [])
        self.results: list[tuple[bool, list[dict[str, Any]]]] = []
        # the sets' compiled kernels (head_kernels.py), when every set of the batch has one
        self.kernels = _kernels(sets) if head_kernels.enabled() else None
        self._packed: dict[str, tuple[bytes, bytes]] = {}  # head key -> (tag as read, new head): the kernel path
        self._heads: dict[str, Head] = {}
        self._touched: dict[str, None] = {}
        self._live_tombs: dict[str, None] = {}  # the tombstones of the parts applied: still absent at commit
        self._new_markers: list[tuple[str, bytes]] = []
        self._scores = DistinctScores()

    def read_commands(self) -> list[Command]:
        """What the batch depends on: heads, tombstones, markers, scores (a pipeline of plain reads)."""
        return [["MGET", *self.head_keys], ["MGET", *self.tombs], ["MGET", *self.markers],
                *(["ZSCORE", zkey, member] for zkey, member in self.members)]

    def apply(self, replies: Sequence[Any]) -> None:
        """Apply the batch, in order, to what :meth:`read_commands` read (their replies)."""
        blobs, tombs, markers, *scores = replies
        erased = {key for key, flag in zip(self.tombs, tombs, strict=True) if flag is not None}
        priors = dict(zip(self.markers, markers, strict=True))
        if self.kernels is not None and not self.members:
            self._apply_compiled(blobs, erased, priors)
            return
        for (hk, (_, arith)), blob in zip(self.head_keys.items(), blobs, strict=True):
            self._heads[hk] = arith.unpack(blob)
        heads = self._heads
        for ((zkey, member), hk), raw in zip(self.members.items(), scores, strict=True):
            # an absent head's entity has nothing stored: a sorted set left without it is not read
            self._scores.known(zkey, member, None if heads[hk].absent else raw)
        done: dict[str, list[dict[str, Any]]] = {}
        touched = self._touched
        scores = self._scores
        for unit, parts, pairings in zip(self.units, self.parts, self.pairings, strict=True):
            prior = priors[unit.applied_key]
            if prior is not None:
                self.results.append((False, self.decode_snapshot(prior, unit)))
                continue
            if unit.applied_key in done:  # the same event twice in one batch
                self.results.append((False, done[unit.applied_key]))
                continue
            # the pairs' latest times before this event touches any of its parts (a pair part may come first)
            seen = _pair_times(parts, pairings, heads, erased) if pairings else None
            vectors, applied = [], False
            for i, (ops, arith, hk, tomb) in enumerate(parts):
                if tomb in erased:  # an erased subject: nothing changes, the defaults are read
                    vectors.append(finalize(ops.reads_of, {}, ops.time))
                    continue
                applied = True
                self._live_tombs[tomb] = None
                head = heads[hk]
                before = arith.before(head)
                if seen is not None:
                    scores.paired = seen[i]
                arith.apply(head, ops.entity_key, ops.time, ops.writes, scores)
                touched[hk] = None
                vectors.append(arith.event_vector(head, before, ops.time))
            self._finish(unit.applied_key, applied, vectors, done)

    def _apply_compiled(self, blobs: Sequence[bytes | None], erased: set[str], priors: dict[str, Any]) -> None:
        """:meth:`apply` with each set's events run by its compiled kernel (the same results and heads).

        The units are walked once to hand each applied part to its set's run
        (and to note which pair times each distinct count reads); the runs that
        keep pairs go first, since the others read their events' times before.
        """
        assert self.kernels is not None
        runs: dict[int, head_kernels.SetRun] = {}
        where: dict[str, tuple[head_kernels.SetRun, int]] = {}
        for (hk, (_, arith)), blob in zip(self.head_keys.items(), blobs, strict=True):
            run = runs.get(id(arith))
            if run is None:
                run = runs[id(arith)] = head_kernels.SetRun(self.kernels[id(arith)])
            where[hk] = (run, run.head(hk, blob))
        slots: list[Any] = []  # per unit: (False, vectors) | its duplicate's marker | (applied, parts, marker)
        reads: list[tuple[head_kernels.SetRun, int, int, head_kernels.SetRun, int]] = []
        done: set[str] = set()
        for unit, parts, pairings in zip(self.units, self.parts, self.pairings, strict=True):
            prior = priors[unit.applied_key]
            if prior is not None:
                slots.append((False, self.decode_snapshot(prior, unit)))
                continue
            if unit.applied_key in done:  # the same event twice in one batch
                slots.append(unit.applied_key)
                continue
            placed: list[Any] = []  # per part: (run, event), or the defaults of an erased subject
            for ops, _arith, hk, tomb in parts:
                if tomb in erased:
                    placed.append(finalize(ops.reads_of, {}, ops.time))
                    continue
                self._live_tombs[tomb] = None
                self._touched[hk] = None
                run, row = where[hk]
                placed.append((run, run.add(row, ops)))
            for i, name, j in pairings:
                if isinstance(placed[i], dict):
                    continue
                run, event = placed[i]
                count = run.kernel.distinct_index[name]
                if isinstance(placed[j], dict):  # an erased pair reads as seen at this very time
                    run.pair_at(event, count, parts[i][0].time)
                else:
                    reads.append((run, event, count, *placed[j]))
            applied = any(not isinstance(p, dict) for p in placed)
            if applied:
                done.add(unit.applied_key)
            slots.append((applied, placed, unit.applied_key))
        sources = {id(source) for *_, source, _ in reads}
        if sources & {id(run) for run, *_ in reads}:
            raise ValueError("a pair set's distinct counts are told by another pair set: not supported")
        for run in runs.values():
            if id(run) in sources:
                run.run()
        for run, event, count, source, at in reads:
            run.pair_at(event, count, source.tp[at])
        for run in runs.values():
            if id(run) not in sources:
                run.run()
        vectors_of: dict[int, list[dict[str, Any]]] = {}
        for run in runs.values():
            vectors, tails = run.vectors()
            vectors_of[id(run)] = vectors
            touched = [r for r, key in enumerate(run.keys) if key in self._touched]
            for r, head in zip(touched, run.packed_heads(touched, tails), strict=True):
                blob = run.blobs[r]
                self._packed[run.keys[r]] = (blob[-8:] if blob is not None else b"", head)
        unit_vectors: dict[str, list[dict[str, Any]]] = {}
        for slot in slots:
            if isinstance(slot, str):
                self.results.append((False, unit_vectors[slot]))
                continue
            if len(slot) == 2:
                self.results.append(slot)
                continue
            applied, placed, marker = slot
            self._finish(marker, applied, [p if isinstance(p, dict) else vectors_of[id(p[0])][p[1]] for p in placed],
                         unit_vectors)

    def _finish(self, marker: str, applied: bool, vectors: list[dict[str, Any]],
                done: dict[str, list[dict[str, Any]]]) -> None:
        """A unit's result, and its marker unless nothing was applied (every part erased: none, as in Lua)."""
        if applied:
            self._new_markers.append((marker, SNAPSHOT_VECTORS + orjson.dumps(vectors)))
            done[marker] = vectors
        self.results.append((applied, vectors))

    def _written(self, hk: str, arith: HeadArithmetic) -> tuple[bytes, bytes]:
        """A touched head's tag as read (b"": it was absent) and its new stored form, whichever path applied it."""
        if hk in self._packed:
            return self._packed[hk]
        head = self._heads[hk]
        return head.tag, arith.pack(head)

    def commit_args(self) -> list[Any]:
        """``lua/commit_heads.lua``'s arguments, once :meth:`apply` ran."""
        heads: list[Any] = []
        commands: list[Any] = []
        stale: list[str] = []
        for hk in self._touched:
            entity_key, arith = self.head_keys[hk]
            tag, packed = self._written(hk, arith)
            heads += [hk, tag, packed, arith.ttl_s]
            if not tag:  # absent when read
                stale += [distinct_key(entity_key, name) for name in arith.distinct_names]
        n_commands = 0
        if stale:  # sorted sets left without their head: the entity has nothing stored
            commands += ["DEL", len(stale), *stale]
            n_commands += 1
        for zkey, zops in self._scores.ops.items():
            for op in zops:
                commands += op
            commands += ["EXPIRE", 2, zkey, self._scores.ttl[zkey]]
            n_commands += len(zops) + 1
        markers = self._new_markers
        return [self.marker_ttl_s, len(self._touched), *heads, len(self._live_tombs), *self._live_tombs,
                len(markers), *(key for key, _ in markers), *(snap for _, snap in markers), n_commands, *commands]


Part = tuple[EventOps, HeadArithmetic, str, str]


def _kernels(sets: dict[int, HeadArithmetic]) -> dict[int, head_kernels.SetKernel] | None:
    """Each set's kernel by ``id`` of its arithmetic, or None unless every set has one (a batch runs wholly
    compiled or wholly in Python)."""
    kernels = {}
    for arith in sets.values():
        kernel = head_kernels.kernel_for(arith)
        if kernel is None:
            return None
        kernels[id(arith)] = kernel
    return kernels


# by the ids of the unit's sets (every payment's are the same); the sets are kept too, so an id is never reused
_PAIRINGS: dict[tuple[int, ...], tuple[tuple[FeatureSet, ...], list[tuple[int, str, int]]]] = {}


def _pairings(parts: Sequence[Part]) -> list[tuple[int, str, int]]:
    """(part, paired distinct count, pair part) of one unit; the pair set must be in it and fit the count."""
    shape = tuple(id(ops.reads_of) for ops, _, _, _ in parts)
    known = _PAIRINGS.get(shape)
    if known is None:
        known = _PAIRINGS[shape] = (tuple(ops.reads_of for ops, _, _, _ in parts), _resolve_pairings(parts))
    return known[1]


def _resolve_pairings(parts: Sequence[Part]) -> list[tuple[int, str, int]]:
    index = {ops.reads_of.name: j for j, (ops, _, _, _) in enumerate(parts)}
    out = []
    for i, (ops, arith, _, _) in enumerate(parts):
        for name, pair_set in arith.paired.items():
            j = index.get(pair_set)
            if j is None:
                raise ValueError(f"{ops.reads_of.name}.{name}: its pair set {pair_set} is not in the event's unit")
            _check_pair(ops.reads_of, name, parts[j][1])
            out.append((i, name, j))
    return out


def _check_pair(fs: FeatureSet, name: str, pair: HeadArithmetic) -> None:
    """A pair set can stand in for a distinct count's sorted set if it keeps each pair's latest time for
    longer than the count looks back."""
    feat = next(f for f in fs.features if f.name == name)
    assert isinstance(feat, Windowed)
    if pair.last_time_at is None:
        raise ValueError(f"{fs.name}.{name}: pair set {pair.fs.name} has no TimeSince to keep latest times")
    if pair.ttl_s < feat.window_s + feat.lateness_s + feat.bucket_s:
        raise ValueError(f"{fs.name}.{name}: pair set {pair.fs.name} forgets pairs ({pair.ttl_s}s) before "
                         f"the count does ({feat.window_s + feat.lateness_s + feat.bucket_s}s)")


def _pair_times(parts: Sequence[Part], pairings: Sequence[tuple[int, str, int]], heads: dict[str, Head],
                erased: set[str]) -> list[dict[str, float | None]]:
    """Per part, its paired distinct counts' value -> latest time, from the pair parts' heads.

    An erased pair (its owner is erased) reads as seen at this very time: an erased subject is not counted.
    """
    seen: list[dict[str, float | None]] = [{} for _ in parts]
    for i, name, j in pairings:
        _, pair, pair_hk, pair_tomb = parts[j]
        if pair_tomb in erased:
            seen[i][name] = parts[i][0].time
            continue
        t = heads[pair_hk].numbers[pair.last_time_at]  # type: ignore[index]
        seen[i][name] = None if t != t else t
    return seen


def vectors_snapshot(snap: bytes) -> list[dict[str, Any]] | None:
    """The vectors a marker written by the worker path holds (None: a snapshot of the Lua path's form)."""
    if snap.startswith(SNAPSHOT_VECTORS):
        return orjson.loads(snap[len(SNAPSHOT_VECTORS):])
    return None
