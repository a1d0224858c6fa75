"""Feature families: one declaration that expands into the windowed features of several horizons.

Risk lives at several time scales at once: a card tested a minute ago, a
card spending five times its month's mean today, a terminal skimmed last
week. Declaring each window by hand gave a few chosen scales; a family
declares the scales once and generates every feature, with names that say
what they are (``txn_count_7d``, ``amount_mean_24h``).

:class:`MaturedCounts` covers the label-delayed side. A terminal's fraud
rate is its frauds over *all* its payments whose outcome is known by now,
which means the payments of a window that ended one label delay ago. Heads
keep undelayed windows only (see :class:`~kestrel.feature_store.definitions.HeadLayout`).
So the family stores the count over ``horizon + delay`` and the count over
``delay``, and their difference is the delayed window, bucket for bucket:
the window of ``h`` ending ``delay`` ago, with ``delay`` a whole number of
buckets.

Pure: declarations only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from kestrel.feature_store.definitions import Predicate, Windowed

STATS = ("count", "sum", "mean", "std")


@dataclass(frozen=True)
class Horizon:
    """A window length, the bucket size it is kept in, and the label its feature names carry."""

    label: str
    window_s: int
    bucket_s: int


def amount_family(horizons: Sequence[Horizon], value_of: Callable[[Any], float], *, count_prefix: str,
                  value_prefix: str, series: str, stats: Sequence[str] = STATS,
                  where: Predicate | None = None) -> tuple[Windowed, ...]:
    """Count, sum, mean and std of an amount over every horizon; one stored series per bucket size.

    >>> fam = amount_family([Horizon("1h", 3600, 600), Horizon("24h", 86400, 7200)], abs,
    ...                     count_prefix="txn", value_prefix="amount", series="txn", stats=("count", "mean"))
    >>> [f.name for f in fam], sorted({f.storage for f in fam})
    (['txn_count_1h', 'amount_mean_1h', 'txn_count_24h', 'amount_mean_24h'], ['txn@600', 'txn@7200'])
    """
    out = []
    for h in horizons:
        for stat in stats:
            name = f"{count_prefix}_count_{h.label}" if stat == "count" else f"{value_prefix}_{stat}_{h.label}"
            out.append(Windowed(name, stat, h.window_s, h.bucket_s,  # type: ignore[arg-type]
                                value_of=None if stat == "count" else value_of, where=where, series=series))
    return tuple(out)


@dataclass(frozen=True)
class MaturedCounts:
    """Events in windows that ended ``delay_s`` ago, kept as undelayed counts (see the module docstring).

    >>> m = MaturedCounts("terminal_txn", 7 * 86400, 86400, (Horizon("1d", 86400, 86400),
    ...                                                       Horizon("30d", 30 * 86400, 86400)))
    >>> [f.name for f in m.features()]
    ['terminal_txn_count_7d', 'terminal_txn_count_8d', 'terminal_txn_count_37d']
    >>> m.values({"terminal_txn_count_7d": 5, "terminal_txn_count_8d": 9, "terminal_txn_count_37d": 40})
    {'terminal_txn_count_1d_d7': 4.0, 'terminal_txn_count_30d_d7': 35.0}
    """

    prefix: str
    delay_s: int
    bucket_s: int
    horizons: tuple[Horizon, ...]
    series: str = "txn"

    def __post_init__(self) -> None:
        for h in (*self.horizons, Horizon("delay", self.delay_s, self.bucket_s)):
            if h.window_s % self.bucket_s or h.bucket_s != self.bucket_s:
                raise ValueError(f"{self.prefix}: {h.label} must be whole buckets of {self.bucket_s}s")

    def _name(self, window_s: int) -> str:
        days, rest = divmod(window_s, 86400)
        return f"{self.prefix}_count_{days}d" if not rest else f"{self.prefix}_count_{window_s}s"

    def features(self) -> tuple[Windowed, ...]:
        """The stored counts: the delay's window, then each horizon + delay (names by length, shared if equal)."""
        lengths = [self.delay_s] + [h.window_s + self.delay_s for h in self.horizons]
        return tuple(Windowed(self._name(w), "count", w, self.bucket_s, series=self.series)
                     for w in dict.fromkeys(lengths))

    @cached_property
    def names(self) -> tuple[str, ...]:
        """The matured counts' names, one per horizon: ``<prefix>_count_<label>_d<delay days>``."""
        return tuple(f"{self.prefix}_count_{h.label}_d{self.delay_s // 86400}" for h in self.horizons)

    @cached_property
    def _reads(self) -> tuple[str, tuple[tuple[str, str], ...]]:
        """The stored names each value is computed from (built once: ``values`` runs for every payment)."""
        return self._name(self.delay_s), tuple((name, self._name(h.window_s + self.delay_s))
                                               for name, h in zip(self.names, self.horizons, strict=True))

    def values(self, vector: Mapping[str, Any]) -> dict[str, float]:
        """Each horizon's matured count from a stored vector: count over horizon + delay minus over delay."""
        recent_name, longer = self._reads
        recent = float(vector.get(recent_name, 0.0))
        return {name: max(float(vector.get(long_name, 0.0)) - recent, 0.0) for name, long_name in longer}
