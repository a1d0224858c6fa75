"""Experiment assignment, GrowthBook-compatible: pure functions, no I/O (issue 15).

The same hashing and bucket ranges as GrowthBook's SDKs, pinned by their
published test vectors (``tests/data/growthbook_cases.json``), so an operator
who runs GrowthBook gets the same variant for the same unit here:

- :func:`bucket` (GrowthBook's ``hash``): version 2 is
  ``fnv1a32(str(fnv1a32(seed + value))) % 10000 / 10000``; version 1,
  ``fnv1a32(value + seed) % 1000 / 1000``.
- :func:`bucket_ranges`: each variation's ``[start, start + coverage *
  weight)`` with ``start`` the cumulative weights, so raising coverage only
  widens each range from its fixed start: a unit enrolled at a lower
  coverage keeps its variant (ramping never reassigns).
- :func:`choose_variation`, :func:`in_namespace`, :func:`assign`.

>>> round(bucket("seed", "a"), 4), choose_variation(0.3, bucket_ranges(2, 1.0))
(0.0505, 0)
>>> assign("exp-1", "user-42", weights=(0.5, 0.5), coverage=0.1)  # outside the 10% coverage
-1
"""

from __future__ import annotations

from collections.abc import Sequence

Range = tuple[float, float]
Namespace = tuple[str, float, float]


def fnv1a32(text: str) -> int:
    """32-bit FNV-1a over the string's characters (as GrowthBook's SDKs hash them)."""
    h = 0x811C9DC5
    for ch in text:
        h = ((h ^ ord(ch)) * 0x01000193) & 0xFFFFFFFF
    return h


def bucket(seed: str, value: str, version: int = 2) -> float | None:
    """The unit's position in [0, 1) for ``seed`` (GrowthBook's ``hash``); None for an unknown version."""
    if version == 2:
        return fnv1a32(str(fnv1a32(seed + value))) % 10000 / 10000
    if version == 1:
        return fnv1a32(value + seed) % 1000 / 1000
    return None


def equal_weights(n: int) -> list[float]:
    """``n`` equal weights (none for ``n < 1``)."""
    return [1.0 / n] * n if n >= 1 else []


def bucket_ranges(n: int, coverage: float = 1.0, weights: Sequence[float] | None = None) -> list[Range]:
    """Each variation's bucket range; weights that do not fit (wrong count, sum off by > 0.01) become equal."""
    coverage = min(max(coverage, 0.0), 1.0)
    if weights is None or len(weights) != n or abs(sum(weights) - 1.0) > 0.01:
        weights = equal_weights(n)
    ranges, start = [], 0.0
    for w in weights:
        ranges.append((start, start + coverage * w))
        start += w
    return ranges


def choose_variation(position: float, ranges: Sequence[Sequence[float]]) -> int:
    """The variation whose range holds ``position``, else -1 (outside coverage)."""
    for i, (lo, hi) in enumerate(ranges):
        if lo <= position < hi:
            return i
    return -1


def in_namespace(unit_id: str, namespace: Sequence) -> bool:
    """Whether the unit falls in the namespace's range (mutually exclusive experiments share a namespace)."""
    name, lo, hi = namespace
    position = bucket("__" + name, unit_id, 1)
    return position is not None and lo <= position < hi


def assign(seed: str, unit_id: str, weights: Sequence[float], coverage: float = 1.0,
           namespace: Namespace | None = None, version: int = 2) -> int:
    """The variation index of ``unit_id`` in the experiment seeded ``seed``, or -1 if not enrolled."""
    if namespace is not None and not in_namespace(unit_id, namespace):
        return -1
    position = bucket(seed, unit_id, version)
    if position is None:
        return -1
    return choose_variation(position, bucket_ranges(len(weights), coverage, weights))
