"""`kestrel bench e2e` at a tiny scale: every summary key, positive rates, nothing lost or duplicated."""

from __future__ import annotations

import json

import pytest

from kestrel.streams.cli.bench_e2e import JSON_KEYS
from kestrel.streams.cli.main import build_parser

pytestmark = pytest.mark.integration


def test_bench_e2e_tiny(redis_url, monkeypatch, capsys):
    monkeypatch.setenv("REDIS_URL", redis_url)
    # A few thousand events: fewer can come out in a single read, which leaves no window to time.
    args = build_parser().parse_args(["bench", "e2e", "--events", "2000", "--rates", "200", "--duration", "3",
                                      "--no-search", "--processes", "2", "--json"])
    assert args.func(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert set(JSON_KEYS) <= set(summary)
    for key in ("payments_per_s", "interactions_per_s", "bare_faust_per_s", "ratio_to_bare",
                "worker_cpu_us_per_payment", "redis_cpu_us_per_payment", "worker_cpu_us_per_interaction",
                "redis_cpu_us_per_interaction", "payments_per_s_2proc"):
        assert summary[key] is not None and summary[key] > 0, key
    assert len(summary["latency"]) == 1
    row = summary["latency"][0]
    assert {"offered_per_s", "p50_ms", "p99_ms", "lost", "duplicates"} <= set(row)
    assert row["offered_per_s"] == 200 and row["sent"] > 0
    assert 0 < row["p50_ms"] <= row["p99_ms"]
    assert row["lost"] == 0 and row["duplicates"] == 0
    assert "max_rate_p99_under_50ms" in summary  # no search here: a value only if the one rate passed
