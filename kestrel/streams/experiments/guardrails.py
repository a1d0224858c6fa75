"""The guardrail monitor: a running experiment whose variant is worse than control on a guardrail beyond
noise (the always-valid interval of the difference lies entirely on the bad side) is stopped, traffic goes
back to control, and the stop is in the audit log with the numbers that triggered it.

Every worker runs it (a stop is a compare-and-set transition: the second worker to try finds it stopped).
The interval is valid at any look, so checking every few seconds does not inflate false stops.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import redis

from kestrel.feature_store.keys import KeySpace
from kestrel.models.experiments import Experiment
from kestrel.streams.experiments.results import experiment_results
from kestrel.streams.experiments.store import ExperimentError, ExperimentStore

MONITOR = "guardrail-monitor"


def stop_breached(client: redis.Redis, keys: KeySpace,
                  seen: Callable[[Experiment, dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Check every running experiment once; stop those whose guardrails are breached. Returns what was stopped.

    ``seen`` gets every running experiment's report (the page's series record it: one read of the results
    per tick, not two)."""
    store = ExperimentStore(client, keys)
    stopped = []
    for exp in store.list():
        if exp.status != "running" or not (exp.guardrail_metrics or seen):
            continue
        report = experiment_results(client, keys, exp)
        if seen is not None:
            seen(exp, report)
        if not exp.guardrail_metrics or not report["breaches"]:
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
