"""``kestrel train fraud|recs --every PERIOD``: the unattended retraining loop, one owner for both models.

Each run trains, registers, asks the gate and moves the alias only if it
passes; a run that fails (no data, a broken export, an exception) registers
and promotes nothing, so production is never touched by it. Every run, failed
or not, writes ``REPORTS/<started>.json`` and ``.md`` (what it trained on,
candidate and champion on the same window, the gate's checks, what moved, the
plots) and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def add_every_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--every", default=None, metavar="PERIOD",
                   help="run unattended: train, register, gate and promote every PERIOD (6h, 30m, ...); a failed "
                        "run promotes nothing; a report per run under --reports")
    p.add_argument("--reports", default=None, help="with --every: report folder (default REGISTRY/runs)")
    p.add_argument("--max-runs", type=int, default=0, help="with --every: stop after this many runs (0: never)")


def duration_s(text: str) -> float:
    """``6h``, ``30m``, ``90s``, ``1d`` or seconds.

    >>> duration_s("6h"), duration_s("30m"), duration_s("45")
    (21600.0, 1800.0, 45.0)
    """
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text and text[-1] in units:
        return float(text[:-1]) * units[text[-1]]
    return float(text)


def finite(doc: Any) -> Any:
    """The document with NaN and infinities as null (JSON has neither)."""
    if isinstance(doc, dict):
        return {k: finite(v) for k, v in doc.items()}
    if isinstance(doc, list | tuple):
        return [finite(v) for v in doc]
    if isinstance(doc, float) and (doc != doc or doc in (float("inf"), float("-inf"))):
        return None
    return doc


def train_every(args: argparse.Namespace, kind: str, once: Callable[[], dict[str, Any] | None]) -> int:
    """Run ``once`` (one training run: its summary with ``promotion``, or None when there was no data) every
    ``args.every``, writing each run's report; returns 2 when the arguments cannot run a loop."""
    from kestrel.offline.run_report import run_report
    from kestrel.streams.cli.models import registry_root

    if not args.promote:
        print("--every runs the whole loop: add --promote (and --registry)", file=sys.stderr)
        return 2
    period = duration_s(args.every)
    reports = Path(args.reports or Path(registry_root(args)) / "runs")
    reports.mkdir(parents=True, exist_ok=True)
    runs = 0
    while args.max_runs == 0 or runs < args.max_runs:
        started = time.time()
        stamp = datetime.fromtimestamp(started, UTC).strftime("%Y%m%dT%H%M%SZ")
        print(f"[{stamp}] {kind} training run {runs + 1}", file=sys.stderr)
        try:
            outcome = once()
            doc = {"started": stamp, "ok": outcome is not None and outcome.get("model_version") is not None,
                   **(outcome or {"error": "no training data"})}
        except Exception as exc:  # nothing was promoted: a failed run never touches what workers serve
            doc = {"started": stamp, "ok": False, "error": repr(exc), "traceback": traceback.format_exc()}
        name = stamp if kind == "fraud" else f"{stamp}-{kind}"
        (reports / f"{name}.json").write_text(json.dumps(finite(doc), indent=1))
        (reports / f"{name}.md").write_text(run_report(doc, kind, reports))
        print(json.dumps(finite({"started": stamp, "ok": doc["ok"], "report": str(reports / f"{name}.md"),
                                 "promotion": (doc.get("promotion") or {}).get("action")})), flush=True)
        runs += 1
        if args.max_runs and runs >= args.max_runs:
            break
        time.sleep(max(0.0, started + period - time.time()))
    return 0
