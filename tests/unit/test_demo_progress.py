"""The demo's progress line and latency summary: pure logic, no broker."""

from __future__ import annotations

from kestrel.streams.cli.demo import Collector, Progress


def test_progress_builds_the_line_only_when_it_is_drawn(capsys):
    """The demo's line computes percentiles over every latency so far: building it per event slowed the demo."""
    progress, built = Progress(), []

    def line() -> str:
        built.append(1)
        return f"line {len(built)}"

    for _ in range(1000):
        progress.show(line)
    progress.show(line, force=True)
    assert len(built) == 2  # the first call (nothing drawn yet) and the forced one
    assert "line 2" in capsys.readouterr().err


def test_p99_by_quarter_follows_arrival_order():
    collector = Collector(bootstrap="unused:0", partitions=1, sent_at={})
    collector.latencies_ms = [10.0] * 100 + [20.0] * 100 + [30.0] * 100 + [40.0] * 99 + [400.0]
    assert collector.p99_by_quarter() == [10.0, 20.0, 30.0, 43.6]  # numpy interpolates: 40 + 0.01 * 360


def test_p99_by_quarter_of_nothing_is_empty():
    assert Collector(bootstrap="unused:0", partitions=1, sent_at={}).p99_by_quarter() == []
