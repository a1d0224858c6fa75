"""What the history generators share: writing a CSV byte-identically, and counting rows per scenario."""

from __future__ import annotations

import gzip
import io
from collections.abc import Sequence

import numpy as np


def write_reproducibly(path: str, text: str) -> None:
    """``text`` to ``path``, gzip when it ends with .gz, with no timestamp: same text, same bytes."""
    data = text.encode()
    if path.endswith(".gz"):
        buf = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=6) as gz:
            gz.write(data)
        data = buf.getvalue()
    with open(path, "wb") as f:
        f.write(data)


def scenario_counts(scenario: np.ndarray, names: Sequence[str]) -> dict[str, int]:
    """Payments, frauds (scenario > 0) and rows of each named scenario (``names[0]`` is genuine).

    >>> scenario_counts(np.array([0, 1, 2, 2]), ("", "a", "b"))
    {'payments': 4, 'frauds': 3, 'a': 1, 'b': 2}
    """
    counts = {"payments": len(scenario), "frauds": int((scenario > 0).sum())}
    for code, name in enumerate(names[1:], start=1):
        counts[name] = int((scenario == code).sum())
    return counts
