"""The textbook-design generator: format, order, determinism, and each scenario as its docstring states it."""

from __future__ import annotations

import csv
import gzip
from collections import defaultdict
from datetime import datetime
from pathlib import Path

import pytest

from kestrel.offline.generators.textbook import HEADER, write_history


def _read(path: Path) -> list[dict[str, str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int], list[dict[str, str]]]:
    path = tmp_path_factory.mktemp("textbook") / "history.csv.gz"
    counts = write_history(str(path), 30, 5000, seed=3)
    return path, counts, _read(path)


def test_format_order_and_counts(history):
    path, counts, rows = history
    with gzip.open(path, "rt") as f:
        assert f.readline().rstrip("\n") == HEADER
    times = [datetime.fromisoformat(r["timestamp"]) for r in rows]
    assert times == sorted(times)
    assert counts["payments"] == len(rows) and counts["frauds"] == sum(r["is_fraud"] == "1" for r in rows)
    assert 0.004 < counts["frauds"] / counts["payments"] < 0.02  # the design's ~0.8%, give or take the draw
    assert all(counts[s] > 0 for s in ("large_amount", "compromised_terminal", "compromised_customer"))


def test_same_arguments_same_bytes(tmp_path):
    a, b = tmp_path / "a.csv.gz", tmp_path / "b.csv.gz"
    write_history(str(a), 3, 1000, seed=5)
    write_history(str(b), 3, 1000, seed=5)
    assert a.read_bytes() == b.read_bytes()


def test_every_large_amount_is_fraud(history):
    _, _, rows = history
    assert all(r["is_fraud"] == "1" for r in rows if float(r["amount"]) > 220)


def test_a_compromised_terminal_stays_fraudulent(history):
    """Once a terminal's payment is a compromise fraud, its later payments in the same 28 days are too."""
    _, _, rows = history
    by_terminal: dict[str, list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        by_terminal[r["terminal_id"]].append(r)
    checked = 0
    for payments in by_terminal.values():
        first = next((p for p in payments if p["scenario"] == "compromised_terminal"), None)
        if first is None:
            continue
        start = datetime.fromisoformat(first["timestamp"])
        same_day = start.replace(hour=0, minute=0, second=0)
        for p in payments:
            age = (datetime.fromisoformat(p["timestamp"]) - same_day).days
            if datetime.fromisoformat(p["timestamp"]) >= start and age < 1:
                assert p["is_fraud"] == "1"
                checked += 1
    assert checked > 0
