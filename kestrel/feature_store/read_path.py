"""The read API's fast path: one entity's feature vector from its head, decoded in Python.

Why: a vector read from the buckets touches ~80 stored values inside Redis,
and Redis's Lua pays 0.2–1 µs for each (number formatting, conversions). The
write script keeps a per-entity head (:class:`~kestrel.feature_store.definitions.HeadLayout`)
from which every undelayed window and distinct count read at or after the
entity's newest bucket is one stored double, so a read is a plain ``GET``
(``MGET`` for many entities): no script, nothing computed inside Redis,
binary doubles that need no parsing. The decoder is generated per feature set
(straight-line code, no loops over metadata), since at 100 entities per call
the Python per entity is most of the cost.

It cannot answer a read before the entity's newest bucket (the past), a
delayed window, or an entity without a head; those go to the bucket script,
and the values are the same either way (tests check both against brute force).
A head-only set (``FeatureSet.buckets=False``) keeps no buckets: its head is
its state, and a read before an entity's newest bucket sees it as of that
bucket.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from typing import Any

from kestrel.feature_store.definitions import (
    COMPONENTS,
    FeatureSet,
    LastValue,
    TimeSince,
    Windowed,
    std_from_moments,
)

PAST = object()  # the decoder's answer when the head cannot serve the read

Decoder = Callable[[bytes, float, list[int]], Any]


_LEN = struct.Struct("<I")
_SEQ = struct.Struct("<d")  # a stored head's last 8 bytes: its write count (the compare-and-set tag)
_NONE = 0xFFFFFFFF


def head_strings(blob: bytes, pos: int, count: int) -> tuple[list[str | None], int]:
    """A head's ``count`` length-prefixed strings from ``pos`` (after its numbers), and where they end.

    >>> head_strings(b"\\x02\\x00\\x00\\x00ab\\xff\\xff\\xff\\xff!", 0, 2)
    (['ab', None], 10)
    """
    strings: list[str | None] = []
    for _ in range(count):
        (n,) = _LEN.unpack_from(blob, pos)
        pos += 4
        if n == _NONE:
            strings.append(None)
        else:
            strings.append(blob[pos:pos + n].decode())
            pos += n
    return strings, pos


def head_tail(blob: bytes, pos: int, count: int) -> tuple[list[str | None], float]:
    """A stored head's ``count`` strings from ``pos`` and the write count after them (0 if it has none).

    >>> head_tail(pack_tail(["ab", None], 4.0), 0, 2)
    (['ab', None], 5.0)
    """
    strings, end = head_strings(blob, pos, count)
    return strings, _SEQ.unpack_from(blob, end)[0] if len(blob) >= end + 8 else 0.0


def pack_tail(strings: list[str | None], seq: float) -> bytes:
    """What follows a head's numbers when stored: its strings, then its write count bumped (head.lua's form)."""
    parts = []
    for s in strings:
        if s is None:
            parts.append(_LEN.pack(_NONE))
        else:
            raw = s.encode()
            parts.append(_LEN.pack(len(raw)) + raw)
    parts.append(_SEQ.pack(seq + 1))
    return b"".join(parts)


class HeadReader:
    """Decodes ``fs``'s heads into feature vectors (or :data:`PAST` when the buckets must answer)."""

    def __init__(self, fs: FeatureSet) -> None:
        self.fs = fs
        self.layout = fs.head
        # a feature set with a delayed window is always read from its buckets
        self.usable = not any(isinstance(f, Windowed) and f.delay_s for f in fs.vector)
        self._bucket_sizes = sorted({f.bucket_s for f in fs.vector if isinstance(f, Windowed)})
        self.source = self._source() if self.usable else ("def decode(blob, at, lasts):\n    return PAST\n"
                                                          "def decode_event(v, ss, at, tp, sp):\n    return PAST\n")
        numbers = struct.Struct(self.layout.fmt)
        scope: dict[str, Any] = {"UNPACK": numbers.unpack_from,
                                 "LEN": struct.Struct("<I").unpack_from, "STD": std_from_moments,
                                 "PAST": PAST, "OFFSET": numbers.size, "NAN": math.nan, "FLOOR": math.floor}
        exec(compile(self.source, f"<head decoder {fs.qualified_version}>", "exec"), scope)
        self.decode: Decoder = scope["decode"]
        # head_state.py's worker arithmetic: an event's vector from its entity's head just after it (windows),
        # time since and last values from before it (``tp``, the latest time before it, NaN if none; ``sp``)
        self.decode_event: Callable[[Any, list[str | None], float, float, list[str | None]], Any] = \
            scope["decode_event"]

    def previous(self, blob: bytes | None, at: float) -> dict[str, Any]:
        """The features an event reads from before itself (time since the previous event, previous values),
        from the head as it was before the event (None: no earlier event)."""
        lay = self.layout
        if blob is None:
            return self.previous_values(None, [None] * len(lay.strings), at)
        strings, _ = head_strings(blob, struct.calcsize(lay.fmt), len(lay.strings))
        return self.previous_values(struct.unpack_from(lay.fmt, blob), strings, at)

    def previous_values(self, numbers: Any, strings: list[str | None], at: float) -> dict[str, Any]:
        """:meth:`previous` from a head already unpacked (numbers, or None for no head; strings)."""
        out: dict[str, Any] = {}
        lay = self.layout
        for feat in self.fs.vector:
            if isinstance(feat, TimeSince):
                t = numbers[lay.last_time] if numbers is not None and lay.last_time is not None else math.nan
                out[feat.name] = max(at - t, 0.0) if t == t else feat.default
            elif isinstance(feat, LastValue):
                value = strings[lay.strings.index(feat.name)]
                out[feat.name] = value if value is not None else feat.default
        return out

    def lasts(self, at: float) -> list[int]:
        """The newest bucket of a window read at ``at``, per bucket size (undelayed: the bucket of ``at``)."""
        return [math.floor(at / b) for b in self._bucket_sizes]

    def vector_code(self, integral: bool = False) -> tuple[list[str], list[tuple[Any, str]]]:
        """The statements that read ``v`` (a head's numbers) at ``at`` (``lasts``: its newest buckets, per
        bucket size; ``t_``: the previous event's time; ``s{j}``: the strings) and each feature's expression.

        ``integral``: window positions are made ``int`` (for a compiled twin that indexes arrays of doubles,
        see :mod:`kestrel.feature_store.head_kernels`); the values are the same.
        """
        lay = self.layout
        lines: list[str] = []
        # before the newest bucket: the buckets answer, or for a head-only set the head as of that bucket
        past = "return PAST" if self.fs.buckets else "{} = 0"
        slot = {b: i for i, b in enumerate(self._bucket_sizes)}
        names = {storage: i for i, (storage, *_rest) in enumerate(lay.series)}
        used = {f.storage for f in self.fs.vector if isinstance(f, Windowed) and f.agg != "distinct"}
        whole = "int({})" if integral else "{}"
        for storage, top, _, _ in lay.series:
            if storage in used:
                bucket_s = int(storage.rsplit("@", 1)[1])
                i = names[storage]
                lines += [f"    k{i} = {whole.format(f'lasts[{slot[bucket_s]}] - v[{top}]')}",
                          f"    if k{i} < 0: {past.format(f'k{i}')}"]
        for j, (_name, top, bucket_s, _) in enumerate(lay.distinct):
            lines += [f"    d{j} = {whole.format(f'lasts[{slot[bucket_s]}] - v[{top}]')}",
                      f"    if d{j} < 0: {past.format(f'd{j}')}"]
        exprs: list[tuple[Any, str]] = []
        distinct = {name: j for j, (name, *_rest) in enumerate(lay.distinct)}
        strings = {name: j for j, name in enumerate(lay.strings)}
        read_by: dict[tuple[int, int], int] = {}
        for n, feat in enumerate(self.fs.vector):
            default = repr(getattr(feat, "default", None))
            if isinstance(feat, Windowed) and feat.agg == "distinct":
                j = distinct[feat.name]
                _, top, _, w = lay.distinct[j]
                exprs.append((feat, f"(float(v[{top + 1} + d{j}]) if d{j} < {w} else 0.0)"))
            elif isinstance(feat, Windowed):
                i, w = names[feat.storage], feat.buckets
                for s, m in COMPONENTS[feat.agg]:  # this window's components, as locals c{n}_{s}
                    start, empty = lay.suffix_start(feat.storage, w, s), "0.0" if m == "add" else "NAN"
                    first = read_by.setdefault((start, i), n)  # windows sharing a series and length share them
                    lines.append(f"    c{n}_{s} = v[{start} + k{i}] if k{i} < {w} else {empty}" if first == n
                                 else f"    c{n}_{s} = c{first}_{s}")
                expr = {"count": f"float(c{n}_n)", "sum": f"c{n}_s",
                        "mean": f"(c{n}_s / c{n}_n if c{n}_n else {default})",
                        "std": f"STD(c{n}_n, c{n}_s, c{n}_q, {default})",
                        "min": f"(c{n}_lo if c{n}_lo == c{n}_lo else {default})",
                        "max": f"(c{n}_hi if c{n}_hi == c{n}_hi else {default})"}[feat.agg]
                exprs.append((feat, expr))
            elif isinstance(feat, TimeSince):
                lines.append(f"    t_ = v[{lay.last_time}]")
                exprs.append((feat, f"(max(at - t_, 0.0) if t_ == t_ else {default})"))
            elif isinstance(feat, LastValue):
                j = strings[feat.name]
                exprs.append((feat, f"(s{j} if s{j} is not None else {default})"))
        return lines, exprs

    def _source(self) -> str:
        """Python source of ``decode(blob, at, lasts)`` and ``decode_event(numbers, strings, at, tp, sp)``:
        the vector, or PAST."""
        lay = self.layout
        lines, exprs = self.vector_code()
        from_blob = ["def decode(blob, at, lasts):", "    v = UNPACK(blob)"]
        from_event = ["def decode_event(v, ss, at, tp, sp):",
                      f"    lasts = [{', '.join(f'FLOOR(at / {b})' for b in self._bucket_sizes)}]"]
        if lay.strings:
            from_blob.append("    o = OFFSET")
            for j, _ in enumerate(lay.strings):
                from_blob += ["    (n,) = LEN(blob, o)", "    o += 4",
                              f"    s{j} = None if n == 0xFFFFFFFF else blob[o:o + n].decode()",
                              "    if n != 0xFFFFFFFF: o += n"]
                from_event.append(f"    s{j} = sp[{j}]")
        out = [f"{feat.name!r}: {expr}" for feat, expr in exprs]
        lines.append("    return {" + ", ".join(out) + "}")
        event_lines = [line.replace(f"t_ = v[{lay.last_time}]", "t_ = tp") for line in lines]
        return "\n".join(from_blob + lines) + "\n" + "\n".join(from_event + event_lines) + "\n"
