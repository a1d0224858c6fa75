"""Head arithmetic compiled: one feature set's events of a batch applied to a matrix of heads in one call.

Why: in Python the worker's head arithmetic (:mod:`kestrel.feature_store.head_state`)
is at its floor: a head keeps suffix totals, so an event in the current bucket
adds to every suffix (97 list items for a terminal), and the arithmetic and the
vector read after it were ~45 µs of a payment's ~160 µs of processing. Here the
same generated code, statement for statement, is compiled by numba for a whole
batch: the heads of one set are the rows of a matrix of doubles, the events
are applied in order (so the k-th event of an entity sees the k-1 before it),
and each event's numeric features are written to a row of an output matrix.
The values are the Python path's to the bit (the same IEEE operations in the
same order; tested against it and against the Lua path), and the stored heads
are the same bytes.

What stays in Python: strings (a head's last values), the units' bookkeeping
(markers, tombstones, duplicates), and the pair times of distinct counts told by
a pair's head (the pair set runs first; its "time before" of each event is what
the counts read). A set the kernel cannot run (distinct counts kept in sorted
sets, a numeric feature whose default is not a number) and a machine without
numba use the Python path; ``KESTREL_HEAD_KERNELS=0`` forces it.

Kernels are compiled once per machine: the generated source is written under
``KESTREL_KERNEL_CACHE`` (default ``~/.cache/kestrel/kernels``) and numba caches
the machine code beside it, so a worker's start pays ~0.9 s (numba's import
and the cached code), the first ever ~10 s on this machine.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import os
import struct
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kestrel.feature_store.definitions import NO_BUCKET, LastValue, Windowed, series_code
from kestrel.feature_store.read_path import head_tail, pack_tail

log = logging.getLogger("kestrel.feature_store")
_KINDS = {"q": "<i8", "I": "<u4", "d": "<f8"}
_KERNELS: dict[int, tuple[Any, SetKernel | None]] = {}  # id(arith) -> (arith kept alive, its kernel or None)


def enabled() -> bool:
    return os.environ.get("KESTREL_HEAD_KERNELS", "1") != "0"


def kernel_for(arith: Any) -> SetKernel | None:
    """``arith``'s compiled kernel, or None when its set cannot have one (or numba is not installed)."""
    known = _KERNELS.get(id(arith))
    if known is None:
        kernel = None
        if eligible(arith):
            try:
                kernel = SetKernel(arith)
                kernel.warm()  # numba compiles at the first call: a failure here falls back, not a batch later
            except ImportError:
                log.warning("numba is not installed: head arithmetic runs in Python")
            except Exception:
                log.exception("could not compile the head kernel of %s: head arithmetic runs in Python",
                              arith.fs.qualified_version)
        known = _KERNELS[id(arith)] = (arith, kernel)
    return known[1]


def eligible(arith: Any) -> bool:
    """Whether a kernel can run ``arith``'s set: its distinct counts are told by pairs' heads (no sorted
    sets), its strings follow a kept latest time, and every numeric feature's default is a number."""
    fs, lay = arith.fs, arith.fs.head
    if arith.distinct_names or (lay.strings and lay.last_time is None):
        return False
    for feat in fs.vector:  # a float default: the kernel's features are doubles, as the Python path's then are
        if not isinstance(feat, LastValue) and type(getattr(feat, "default", 0.0)) is not float:
            return False
    return all(mode in ("add", "min", "max") for _, _, _, windows in lay.series
               for _, comps in windows for _, mode, _ in comps)


class SetKernel:
    """One feature set's compiled batch arithmetic and the layout it works on.

    ``run(H, rows, ts, C, present, pair, tp_out, out)``: for each event ``e`` in
    order, the head ``H[rows[e]]`` takes the event at time ``ts[e]``: series ``i``
    (when ``present[e, i]``) with component values ``C[e, i, :]`` (``xs`` of the
    compact write), the latest time (``present[e, S]``), distinct count ``j``
    (``present[e, S + 1 + j]``) whose pair was last seen at ``pair[e, j]`` (NaN:
    never); ``tp_out[e]`` gets the latest time before the event and ``out[e]``
    the event's numeric features (the vector minus the strings, in order).
    """

    def __init__(self, arith: Any) -> None:
        fs, lay = arith.fs, arith.fs.head
        self.arith = arith
        self.fs = fs
        self.series_index = {storage: i for i, (storage, *_rest) in enumerate(lay.series)}
        self.n_series = len(lay.series)
        self.distinct_index = {name: j for j, (name, *_rest) in enumerate(lay.distinct)}
        self.n_distinct = len(lay.distinct)
        self.string_index = {name: j for j, name in enumerate(lay.strings)}
        self.names = fs.feature_names
        # where the strings go among the features (ascending), and which string each is
        self.string_slots = tuple((n, self.string_index[f.name]) for n, f in enumerate(fs.vector)
                                  if isinstance(f, LastValue))
        self.string_defaults = {self.string_index[f.name]: f.default for f in fs.vector if isinstance(f, LastValue)}
        self.n_numeric = len(fs.vector) - len(self.string_slots)
        self.size = struct.calcsize(lay.fmt)
        self.dtype = np.dtype([(f"f{i}", _KINDS[k]) for i, k in enumerate(lay.fmt[1:])])
        self.empty = struct.pack(lay.fmt, *arith._empty)
        self.source = self._source()
        self.run = _compile(self.source, f"{fs.name}_{fs.version}")
        self.columns = self._columns()

    def warm(self) -> None:
        """One call on an event that writes nothing: numba compiles (or loads) the machine code now."""
        run = SetRun(self)
        run.add(run.head("", None), _NoOps())
        run.run()

    # -- heads ----------------------------------------------------------------
    def matrix(self, blobs: Sequence[bytes | None]) -> np.ndarray:
        """The heads' numbers as rows of doubles (an absent head: the empty head)."""
        size, empty = self.size, self.empty
        raw = b"".join(blob[:size] if blob is not None else empty for blob in blobs)
        packed = np.frombuffer(raw, dtype=self.dtype, count=len(blobs))
        out = np.empty((len(blobs), len(self.dtype.names)), dtype=np.float64)
        for i, name in enumerate(self.dtype.names):
            out[:, i] = packed[name]
        return out

    def tails(self, blobs: Sequence[bytes | None]) -> list[tuple[list[str | None], float]]:
        """Each head's strings and write count (what follows its numbers)."""
        n, size = len(self.string_index), self.size
        return [head_tail(blob, size, n) if blob is not None else ([None] * n, 0.0) for blob in blobs]

    def packed(self, H: np.ndarray, rows: Sequence[int], tails: Sequence[tuple[list[str | None], float]]
               ) -> list[bytes]:
        """The heads of ``rows`` as stored (``HeadArithmetic.pack``'s bytes), write counts bumped."""
        if not rows:
            return []
        chosen = H[list(rows)]
        packed = np.empty(len(rows), dtype=self.dtype)
        for i, name in enumerate(self.dtype.names):
            packed[name] = chosen[:, i]
        raw, size = packed.tobytes(), self.size
        return [raw[k * size:(k + 1) * size] + pack_tail(strings, seq) for k, (strings, seq) in enumerate(tails)]

    def vector(self, numbers: list[float], strings: list[str | None]) -> dict[str, Any]:
        """An event's vector from its numeric features (in order) and its head's strings before it."""
        if not self.string_slots:
            return dict(zip(self.names, numbers, strict=True))
        values: list[Any] = list(numbers)
        for at, j in self.string_slots:
            s = strings[j]
            values.insert(at, s if s is not None else self.string_defaults[j])
        return dict(zip(self.names, values, strict=True))

    def _columns(self) -> Any:
        """``columns(event, c, present, strings)``: an event's inputs to the kernel straight from the event, as
        its compact writes (``definitions.compact_writer``) would give them: components ``c`` (3 per series),
        ``present`` flags and (string, value) pairs of its last values. Generated from the same write plan."""
        plan = self.fs.write_plan
        n_series = self.n_series
        scope: dict[str, Any] = {}
        lines = ["def columns(event, c, present, strings):"]
        lines += series_code(plan, scope, lambda i, storage, indent, values: [
            f"{indent}present[{self.series_index[storage]}] = 1",
            *(f"{indent}c[{3 * self.series_index[storage] + k}] = {value}" for k, value in enumerate(values))])
        for j, (kind, feat) in enumerate(plan.others):
            scope[f"F{j}"] = feat
            if kind == "distinct":
                flag = f"present[{n_series + 1 + self.distinct_index[feat.name]}] = 1"
                lines.append(f"    if F{j}.where(event):\n        {flag}" if feat.where is not None else f"    {flag}")
            elif kind == "since":
                lines.append(f"    present[{n_series}] = 1")
            elif kind == "last":
                lines.append(f"    strings.append(({self.string_index[feat.name]}, str(F{j}.value_of(event))))")
            else:
                raise ValueError(f"{self.fs.name}: a {kind} feature has no kernel column")
        if len(lines) == 1:
            lines.append("    pass")
        exec(compile("\n".join(lines) + "\n", f"<kernel columns {self.fs.qualified_version}>", "exec"), scope)
        return scope["columns"]

    # -- the generated kernel ---------------------------------------------------
    def _source(self) -> str:
        """``run``'s source: ``HeadArithmetic._source``'s statements for arrays, then ``HeadReader``'s read."""
        arith, fs, lay = self.arith, self.fs, self.fs.head
        plan = fs.series_plan
        s_count = self.n_series
        lines = ["def run(H, rows, ts, C, present, pair, tp_out, out):",
                 "    for e in range(rows.shape[0]):",
                 "        h = H[rows[e]]",
                 "        t = ts[e]",
                 f"        tp = h[{lay.last_time}]" if lay.last_time is not None else "        tp = NAN",
                 "        tp_out[e] = tp"]
        for i, (storage, top, _, windows) in enumerate(lay.series):
            feat, comps, _ = plan[storage]
            values = {c: ("1.0" if c == "n" else f"C[e, {i}, {k}]") for k, (c, _) in enumerate(comps)}
            lines += [f"        if present[e, {i}]:",
                      f"            b = FLOOR(t / {feat.bucket_s})",
                      f"            top = h[{top}]",
                      f"            if not (top != NO_BUCKET and b < top - {feat.late_buckets}):",
                      "                d = b - top",
                      "                if d > 0:"]
            slide, same = [], []
            for w, entries in windows:
                for c, mode, p in entries:
                    end = p + w
                    if mode == "add":
                        shifted = "h[j] = h[j + di] + v"
                        inplace = ["h[j] += v"]
                    else:
                        cmp = "<" if mode == "min" else ">"
                        shifted = f"x = h[j + di]\n{' ' * 28}h[j] = v if (x != x or v {cmp} x) else x"
                        inplace = ["x = h[j]", f"if x != x or v {cmp} x:", "    h[j] = v"]
                    slide += [f"                    v = {values[c]}",
                              f"                    if d < {w}:",
                              "                        di = int(d)",
                              f"                        for j in range({p}, {end} - di):",
                              f"                            {shifted}",
                              f"                        for j in range({end} - di, {end}):",
                              "                            h[j] = v",
                              "                    else:",
                              f"                        for j in range({p}, {end}):",
                              "                            h[j] = v"]
                    same += [f"                    v = {values[c]}",
                             f"                    for j in range({p}, {end} + di):",
                             *(f"                        {line}" for line in inplace)]
            lines += [*slide, f"                    h[{top}] = b", "                else:",
                      "                    di = int(d)", *same]
        if lay.last_time is not None:
            at = lay.last_time
            lines += [f"        if present[e, {s_count}]:", f"            cur = h[{at}]",
                      "            if cur != cur or t >= cur:", f"                h[{at}] = t"]
        for j, (_name, at, bucket_s, w) in enumerate(lay.distinct):
            lines += [f"        if present[e, {s_count + 1 + j}]:",
                      f"            old = pair[e, {j}]",
                      f"            bt = FLOOR(t / {bucket_s})",
                      f"            xn = FLOOR(max(old, t) / {bucket_s}) if old == old else bt",
                      f"            xo = FLOOR(old / {bucket_s}) if old == old else 0.0",
                      f"            top = h[{at}]",
                      "            if bt > top:",
                      "                shift = bt - top",
                      f"                if shift < {w}:",
                      "                    si = int(shift)",
                      f"                    for j in range({at + 1}, {at + 1 + w} - si):",
                      "                        h[j] = h[j + si]",
                      f"                    for j in range({at + 1 + w} - si, {at + 1 + w}):",
                      "                        h[j] = 0.0",
                      "                else:",
                      f"                    for j in range({at + 1}, {at + 1 + w}):",
                      "                        h[j] = 0.0",
                      f"                h[{at}] = bt",
                      "                top = bt",
                      "            if old != old or xn > xo:",
                      f"                first = top - {w - 1}",
                      "                start = 0.0 if old != old else max(0.0, xo - first + 1)",
                      f"                last = {at + 1} + int(min({w - 1}, xn - first))",
                      f"                for j in range({at + 1} + int(start), last + 1):",
                      "                    h[j] += 1.0"]
        reader = arith.reader
        body, exprs = reader.vector_code(integral=True)
        sizes = sorted({f.bucket_s for f in fs.vector if isinstance(f, Windowed)})
        lines += ["        v = h", "        at = t",
                  f"        lasts = ({''.join(f'FLOOR(at / {b}), ' for b in sizes)})"]
        lines += ["    " + line.replace(f"t_ = v[{lay.last_time}]", "t_ = tp") for line in body]
        k = 0
        for feat, expr in exprs:
            if not isinstance(feat, LastValue):
                lines.append(f"        out[e, {k}] = {expr}")
                k += 1
        return "\n".join(lines) + "\n"


_PRELUDE = '''"""Generated by kestrel.feature_store.head_kernels: do not edit (a new source gets a new file)."""
import math
import numba
import numpy as np

NAN = math.nan
NO_BUCKET = {no_bucket!r}
FLOOR = np.floor


@numba.njit(cache=True)
def STD(n, s, q, default):
    if n == 0:
        return default
    mean = s / n
    var = q / n - mean * mean
    return math.sqrt(var) if var > 1e-9 * max(q / n, 1.0) else 0.0


'''


def _cache_dir() -> Path:
    root = os.environ.get("KESTREL_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "kestrel", "kernels")
    path = Path(root)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".writable"
        probe.touch()
        return path
    except OSError:
        fallback = Path(tempfile.gettempdir()) / f"kestrel-kernels-{os.getuid()}"
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback


def _compile(source: str, name: str) -> Any:
    """``run`` of ``source``, compiled with numba and cached on disk (one module file per source)."""
    import numba  # noqa: F401  (ImportError: no kernel, the Python path)

    text = _PRELUDE.format(no_bucket=NO_BUCKET) + "@numba.njit(cache=True)\n" + source
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    module_name = f"kestrel_kernel_{name}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name].run
    path = _cache_dir() / f"{module_name}.py"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)  # atomic: workers starting together never read half a file
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module.run


def prepare(ariths: Sequence[Any]) -> int:
    """Compile (or load from the disk cache) and run once the kernels of ``ariths``' sets, so that a worker pays
    this before it starts, not in its first batch; how many sets have a kernel. Blocking."""
    return sum(1 for arith in ariths if enabled() and kernel_for(arith) is not None)


class _NoOps:
    """An event that writes nothing (a kernel's warm-up call)."""

    _writes: tuple[list[Any], ...] = ()
    writes: tuple[list[Any], ...] = ()
    source = None
    time = 0.0


class SetRun:
    """One set's part of a batch for its kernel: its heads (matrix rows), then its events in order.

    Pure but for the kernel call: :meth:`add` each event as the batch's units
    come, :meth:`pair_at` the pair times known at once (an erased pair),
    :meth:`run` (after the runs whose times it reads), then :meth:`vectors` and
    :meth:`packed_heads`.
    """

    def __init__(self, kernel: SetKernel) -> None:
        self.kernel = kernel
        self.keys: list[str] = []
        self.blobs: list[bytes | None] = []
        self.rows: list[int] = []
        self.ts: list[float] = []
        self._c: list[list[float]] = []
        self._present: list[list[int]] = []
        self._strings: dict[int, list[tuple[int, str]]] = {}  # event -> (string, value) of its last-value writes
        self._pairs: list[tuple[int, int, float]] = []  # (event, distinct count, pair time)
        self.tp: list[float] = []
        self._out: list[list[float]] = []
        self._matrix: np.ndarray | None = None

    def head(self, key: str, blob: bytes | None) -> int:
        self.keys.append(key)
        self.blobs.append(blob)
        return len(self.keys) - 1

    def add(self, row: int, ops: Any) -> int:
        """Event ``ops`` (an ``EventOps``) on head ``row``; its index in this run."""
        k = self.kernel
        n_series = k.n_series
        c = [0.0] * (3 * n_series)
        present = [0] * (n_series + 1 + k.n_distinct)
        e = len(self.rows)
        if ops._writes is None and ops.source is not None:  # straight from the event: no compact writes made
            strings: list[tuple[int, str]] = []
            k.columns(ops.source, c, present, strings)
            if strings:
                self._strings[e] = strings
            writes: Sequence[list[Any]] = ()
        else:
            writes = ops.writes
        for op in writes:
            kind = op[0]
            if kind == "b":
                i = k.series_index[op[1]]
                present[i] = 1
                xs = op[2]
                c[3 * i:3 * i + len(xs)] = xs
            elif kind == "l":
                if op[1] == "@":
                    present[n_series] = 1
                else:
                    self._strings.setdefault(e, []).append((k.string_index[op[1]], op[2]))
            elif kind == "z":
                present[n_series + 1 + k.distinct_index[op[1]]] = 1
            else:
                raise ValueError(f"write {op!r} is not applied in the worker")
        self.rows.append(row)
        self.ts.append(ops.time)
        self._c.append(c)
        self._present.append(present)
        return e

    def pair_at(self, event: int, distinct: int, time: float | None) -> None:
        self._pairs.append((event, distinct, math.nan if time is None else time))

    def run(self) -> None:
        k, n = self.kernel, len(self.rows)
        self._matrix = H = k.matrix(self.blobs)
        pair = np.full((n, max(k.n_distinct, 1)), math.nan)
        for e, j, t in self._pairs:
            pair[e, j] = t
        tp = np.empty(n)
        out = np.empty((n, k.n_numeric))
        if n:
            k.run(H, np.array(self.rows, dtype=np.int64), np.array(self.ts, dtype=np.float64),
                  np.array(self._c, dtype=np.float64).reshape(n, k.n_series, 3),
                  np.array(self._present, dtype=np.uint8), pair, tp, out)
        self.tp = tp.tolist()
        self._out = out.tolist()

    def vectors(self) -> tuple[list[dict[str, Any]], list[tuple[list[str | None], float]]]:
        """Each event's vector, and each head's strings and write count after the batch."""
        k = self.kernel
        tails = k.tails(self.blobs)
        strings = [list(s) for s, _ in tails]
        vectors = []
        for e, (row, numbers) in enumerate(zip(self.rows, self._out, strict=True)):
            current = strings[row]
            vectors.append(k.vector(numbers, current))  # the strings as before the event
            writes = self._strings.get(e)
            if writes:
                tp, t = self.tp[e], self.ts[e]
                if tp != tp or t >= tp:  # as the latest time moved (or would have): head.lua's rule
                    for j, value in writes:
                        current[j] = value
        return vectors, [(s, seq) for s, (_, seq) in zip(strings, tails, strict=True)]

    def packed_heads(self, rows: Sequence[int], tails: Sequence[tuple[list[str | None], float]]) -> list[bytes]:
        assert self._matrix is not None
        return self.kernel.packed(self._matrix, rows, [tails[r] for r in rows])
