"""The guardrail monitor: a running experiment whose variant is worse than control on a guardrail beyond
noise (the always-valid interval of the difference lies entirely on the bad side) is stopped, traffic goes
back to control, and the stop is in the audit log with the numbers that triggered it.

Every worker runs it (a stop is a compare-and-set transition: the second worker to try finds it stopped).
The interval is valid at any look, so checking every few seconds does not inflate false stops.
"""

from __future__ import annotations

import json
from typing import Any

import redis

from kestrel.feature_store.keys import KeySpace
from kestrel.streams.experiments.results import experiment_results
from kestrel.streams.experiments.store import ExperimentError, ExperimentStore

MONITOR = "guardrail-monitor"


def stop_breached(client: redis.Redis, keys: KeySpace) -> list[dict[str, Any]]:
    """Check every running experiment with guardrails once; stop those breached. Returns what was stopped."""
    store = ExperimentStore(client, keys)
    stopped = []
    for exp in store.list():
        if exp.status != "running" or not exp.guardrail_metrics:
            continue
        report = experiment_results(client, keys, exp)
        if not report["breaches"]:
            continue
        why = "; ".join(f"{b['variant']} worse on {b['guardrail']}: {b['difference']:+.4f} {b['ci']}"
                        for b in report["breaches"])
        try:
            store.stop(exp.key, MONITOR, f"guardrail breached: {why}")
        except ExperimentError:  # another worker stopped it first
            continue
        stopped.append({"type": "experiment_stopped", "experiment": exp.key, "by": MONITOR,
                        "breaches": report["breaches"], "message": f"{exp.key} stopped: {why}",
                        "report": json.loads(json.dumps(report, default=str))})
    return stopped
