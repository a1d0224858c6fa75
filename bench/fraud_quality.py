"""The fraud quality bar, reproduced: simulated histories, ``kestrel eval fraud`` on each, one set of tables.

    .venv/bin/python bench/fraud_quality.py --out runs/hard          # hard negatives: 10 seeds + 4 drift runs, ~30 min
    .venv/bin/python bench/fraud_quality.py --out runs/easy --easy   # the default simulator
    .venv/bin/python bench/fraud_quality.py --out runs/hard --report-only   # tables from saved runs
    .venv/bin/python bench/fraud_quality.py --out runs/quick --seeds 7 --drift-seeds 8 --train-days 7
    .venv/bin/python bench/fraud_quality.py --out runs/indep --independent   # the independent generator
    .venv/bin/python bench/fraud_quality.py --out runs/textbook --textbook   # the textbook simulator's design

A stationary run simulates the features' warm-up (37 days), the training
window, 7 days of label delay and 7 test days; a drift run adds account
takeover, absent from training, from the first test day on, with labels
back after one day. Each run is ``kestrel produce`` then ``kestrel eval
fraud --json`` in a subprocess, exactly as the README shows them; two run
at a time. Runs are independent, so a baseline's gains pool across them:
the mean of the runs' gains, with an interval from their bootstrap spreads
(normal approximation).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MODELS = {"kestrel": "Kestrel (torch + river)", "logistic_regression": "logistic regression",
          "gradient_boosted_trees": "gradient-boosted trees", "random_forest": "random forest",
          "river_alone": "river alone",
          "torch_alone": "torch alone (ablation)", "rules": "rules",
          "textbook_logistic_regression": "textbook features, logistic regression",
          "textbook_random_forest": "textbook features, random forest"}
EVAL_COLUMNS = ["--merchant-col", "merchant_id", "--card-present-col", "card_present", "--device-col", "device_id",
                "--segment-col", "region"]


def runs_of(args: argparse.Namespace) -> list[dict]:
    """Each run's name, ``produce`` arguments and ``eval`` window arguments."""
    from kestrel.offline.fraud_eval import longest_window_days

    warm_up = math.ceil(longest_window_days())  # the features' reach back: 37 days
    other = "independent" if args.independent else "textbook" if args.textbook else None
    hard = [] if args.easy or other else ["--hard-negatives"]
    per_day = ["--payments-per-day", str(args.payments_per_day)]
    if other:  # generators designed without Kestrel's features; stationary runs only (no drift option)
        per_day += ["--generator", other]
    runs = []
    days = warm_up + args.train_days + 7 + 7 + 1
    for seed in args.seeds:
        runs.append({"name": f"seed {seed}", "file": f"s{seed}", "kind": "stationary",
                     "produce": ["--days", str(days), "--seed", str(seed), *per_day, *hard],
                     "window": ["--train-days", str(args.train_days), "--delay-days", "7", "--test-days", "7"]})
    days = warm_up + args.train_days + 1 + 8 + 1
    for seed in [] if other else args.drift_seeds:
        runs.append({"name": f"drift {seed}", "file": f"d{seed}", "kind": "drift",
                     "produce": ["--days", str(days), "--seed", str(seed), "--emerging-after-days", str(days - 8),
                                 *per_day, *hard],
                     "window": ["--train-days", str(args.train_days), "--delay-days", "1", "--test-days", "8"]})
    return runs


def run_one(run: dict, out: Path) -> dict:
    kestrel = str(Path(sys.executable).with_name("kestrel"))
    csv, result = out / f"{run['file']}.csv.gz", out / f"{run['file']}.json"
    if result.exists():
        return json.loads(result.read_text())
    started = time.time()
    subprocess.run([kestrel, "produce", "--history-csv", str(csv), *run["produce"]], check=True,
                   stdout=subprocess.DEVNULL)
    proc = subprocess.run([kestrel, "eval", "fraud", "--csv", str(csv), *EVAL_COLUMNS, *run["window"], "--json"],
                          check=True, capture_output=True, text=True)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    summary["run"] = {k: run[k] for k in ("name", "kind", "produce", "window")}
    result.write_text(json.dumps(summary))
    print(f"  {run['name']}: done in {time.time() - started:.0f}s", file=sys.stderr, flush=True)
    return summary


def pooled(gains: list[dict]) -> tuple[float, float, float]:
    """Mean gain of independent runs and its 95% interval.

    >>> pooled([{"gain": 0.02, "se": 0.01}, {"gain": 0.04, "se": 0.01}])
    (0.03, 0.0161, 0.0439)
    """
    mean = sum(g["gain"] for g in gains) / len(gains)
    se = math.sqrt(sum(g["se"] ** 2 for g in gains)) / len(gains)
    return round(mean, 4), round(mean - 1.96 * se, 4), round(mean + 1.96 * se, 4)


def _gain_cell(gain: float, lo: float, hi: float) -> str:
    return f"{gain:+.3f} [{lo:+.3f}, {hi:+.3f}]{'*' if lo > 0 or hi < 0 else ''}"


def report(summaries: list[dict]) -> str:
    """Markdown tables, one row per run (so many runs stay readable): AP, then gains, then pooled gains."""
    models = {m: label for m, label in MODELS.items()  # runs saved by an older build may lack newer baselines
              if m == "kestrel" or all(m in s["baselines"] for s in summaries)}
    baselines = list(models)[1:]
    lines = ["Average precision:", "", "| run | " + " | ".join(models.values()) + " |",
             "|---" * (len(models) + 1) + "|"]
    for s in summaries:
        aps = [(s["kestrel"] if m == "kestrel" else s["baselines"][m])["average_precision"] for m in models]
        lines.append(f"| {s['run']['name']} | " + " | ".join(f"{ap:.4f}" for ap in aps) + " |")
    lines += ["", "Kestrel's AP gain over each baseline, 95% paired-bootstrap interval (* excludes 0):", "",
              "| run | " + " | ".join(models[m] for m in baselines) + " |", "|---" * (len(baselines) + 1) + "|"]
    for s in summaries:
        cells = [_gain_cell(g["gain"], *g["ci95"]) for g in (s["kestrel_ap_gain"][m] for m in baselines)]
        lines.append(f"| {s['run']['name']} | " + " | ".join(cells) + " |")
    for kind in ("stationary", "drift"):
        runs = [s for s in summaries if s["run"]["kind"] == kind]
        if runs and all("se" in g for s in runs for g in s["kestrel_ap_gain"].values()):
            cells = [_gain_cell(*pooled([s["kestrel_ap_gain"][m] for s in runs])) for m in baselines]
            lines.append(f"| **pooled, {kind} ({len(runs)} runs)** | " + " | ".join(cells) + " |")
    lines += ["", "| run | training payments | test payments | test frauds |", "|---|---|---|---|"]
    lines += [f"| {s['run']['name']} | {s['train_rows']:,} | {s['test_rows']:,} | {s['test_frauds']} |"
              for s in summaries]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the histories and each run's eval JSON")
    p.add_argument("--seeds", type=int, nargs="*", default=[7, 17, 27, 37, 47, 57, 67, 77, 87, 97])
    p.add_argument("--drift-seeds", type=int, nargs="*", default=[8, 18, 28, 38])
    p.add_argument("--train-days", type=int, default=14)
    p.add_argument("--payments-per-day", type=int, default=5000)
    p.add_argument("--easy", action="store_true", help="the default simulator (no hard negatives)")
    p.add_argument("--independent", action="store_true",
                   help="histories from kestrel.offline.generators.independent (fraud designed without Kestrel's "
                        "features); stationary runs only")
    p.add_argument("--textbook", action="store_true",
                   help="kestrel.offline.generators.textbook: the textbook simulator's design (terminal and customer "
                        "compromises, large amounts)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--report-only", action="store_true", help="tables from the runs already in --out")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = runs_of(args)
    if args.report_only:
        summaries = [json.loads((out / f"{r['file']}.json").read_text()) for r in runs
                     if (out / f"{r['file']}.json").exists()]
    else:
        print(f"{len(runs)} runs, {args.jobs} at a time (a few minutes each) -> {out}", file=sys.stderr, flush=True)
        with ThreadPoolExecutor(args.jobs) as pool:
            summaries = list(pool.map(lambda r: run_one(r, out), runs))
    (out / "summary.json").write_text(json.dumps(summaries))
    print(report(summaries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
