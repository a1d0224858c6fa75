"""The independent payment-history generator: file format, order, determinism, fraud share and scenarios."""

from __future__ import annotations

import csv
import gzip
from datetime import datetime
from pathlib import Path

import pytest

from kestrel.offline.generators.independent import SCENARIOS, write_history

HEADER = ["event_id", "timestamp", "card_id", "merchant_id", "terminal_id", "amount", "card_present", "device_id",
          "region", "is_fraud", "scenario"]


def _read(path: Path) -> list[dict[str, str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    path = tmp_path_factory.mktemp("indep") / "history.csv"
    return path, write_history(str(path), 3, 2000, seed=11)


@pytest.fixture(scope="module")
def long(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    path = tmp_path_factory.mktemp("indep") / "long.csv"
    return path, write_history(str(path), 21, 2000, seed=7)


def test_header_and_column_order(small: tuple[Path, dict[str, int]]) -> None:
    path, _ = small
    with open(path) as f:
        assert f.readline().rstrip("\n").split(",") == HEADER


def test_rows_are_well_formed_and_time_ordered(small: tuple[Path, dict[str, int]]) -> None:
    path, counts = small
    rows = _read(path)
    assert len(rows) == counts["payments"]
    assert sum(r["is_fraud"] == "1" for r in rows) == counts["frauds"]
    assert len({r["event_id"] for r in rows}) == len(rows)
    stamps = [datetime.fromisoformat(r["timestamp"]) for r in rows]
    assert all(s.utcoffset() is not None and s.utcoffset().total_seconds() == 0 for s in stamps)
    assert stamps == sorted(stamps)
    for r in rows:
        assert r["card_id"].startswith("card_") and r["merchant_id"].startswith("m_")
        assert r["terminal_id"].startswith("t_")
        assert float(r["amount"]) > 0 and r["amount"] == f"{float(r['amount']):.2f}"
        assert r["card_present"] in ("0", "1") and r["is_fraud"] in ("0", "1")
        assert r["region"] in ("north", "south", "east", "west", "central")
        assert (r["scenario"] == "") == (r["is_fraud"] == "0")
    regions: dict[str, set[str]] = {}
    for r in rows:
        regions.setdefault(r["card_id"], set()).add(r["region"])
    assert all(len(v) == 1 for v in regions.values())  # the region belongs to the card


def test_card_present_rows_mostly_lack_a_device_and_online_rows_have_one(small: tuple[Path, dict[str, int]]) -> None:
    rows = _read(small[0])
    present = [r for r in rows if r["card_present"] == "1"]
    online = [r for r in rows if r["card_present"] == "0"]
    assert present and online
    assert sum(r["device_id"] == "" for r in present) / len(present) > 0.95
    assert sum(r["device_id"] != "" for r in online) / len(online) > 0.9


def test_fraud_share(small: tuple[Path, dict[str, int]]) -> None:
    _, counts = small
    assert 0.003 <= counts["frauds"] / counts["payments"] <= 0.03


def test_deterministic_for_a_seed_and_different_for_another(tmp_path: Path) -> None:
    a, b, c = (tmp_path / n for n in ("a.csv.gz", "b.csv.gz", "c.csv.gz"))
    write_history(str(a), 2, 1000, seed=3)
    write_history(str(b), 2, 1000, seed=3)
    write_history(str(c), 2, 1000, seed=4)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert gzip.decompress(a.read_bytes()).startswith(",".join(HEADER).encode())


def test_every_scenario_appears_in_a_longer_run(long: tuple[Path, dict[str, int]]) -> None:
    path, counts = long
    seen = {r["scenario"] for r in _read(path) if r["is_fraud"] == "1"}
    assert seen == set(SCENARIOS[1:])
    assert all(counts[name] > 0 for name in SCENARIOS[1:])
    assert 0.003 <= counts["frauds"] / counts["payments"] <= 0.03


def test_card_testing_is_tiny_and_bursty(long: tuple[Path, dict[str, int]]) -> None:
    tests = [r for r in _read(long[0]) if r["scenario"] == "card_testing"]
    assert all(float(r["amount"]) < 3.0 and r["card_present"] == "0" for r in tests)
    by_merchant: dict[str, list[datetime]] = {}
    for r in tests:
        by_merchant.setdefault(r["merchant_id"], []).append(datetime.fromisoformat(r["timestamp"]))
    # at least one merchant sees a burst: 5+ attempts within half an hour
    assert any(any((ts[i + 4] - ts[i]).total_seconds() <= 1800 for i in range(len(ts) - 4))
               for ts in by_merchant.values())


def test_unknown_options_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        write_history(str(tmp_path / "x.csv"), 1, 100, hard_negatives=True)
