"""Cost of scoring a micro-batch of payments: the trained fraud model beside the rules, in one process.

    .venv/bin/python bench/fraud_scoring.py [--model artifacts/fraud-demo] [--batch 500] [--rounds 50] [--json]

Feature dicts come from a simulated day (offline feature path); the model is
the newest artifact under ``--model`` (trained on simulated history when there
is none). Scoring runs on one torch thread, as in the worker.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kestrel.models.fraud_model import FraudModel, ModelScorer, latest_artifact
from kestrel.models.rules import RuleScorer
from kestrel.offline.fraud_dataset import SIMULATED_COLUMNS, feature_rows, payments_of, read_history
from kestrel.offline.fraud_train import train_on_simulated_history
from kestrel.offline.simulator import write_history


def _time(score, rounds: int) -> np.ndarray:
    score()  # first call pays one-time costs
    samples = []
    for _ in range(rounds):
        t = time.perf_counter()
        score()
        samples.append(time.perf_counter() - t)
    return np.asarray(samples) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="artifacts/fraud-demo")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if latest_artifact(args.model) is None:
        print(f"no model under {args.model}: training one on simulated history", file=sys.stderr)
        train_on_simulated_history(args.model)
    model = FraudModel.load(latest_artifact(args.model))
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "day.csv"
        write_history(str(csv), 1, 3000, seed=9)
        frame = read_history(csv, SIMULATED_COLUMNS)
    rows = feature_rows(payments_of(frame), np.full(len(frame), np.nan))[:args.batch]
    scorer, rules = ModelScorer(model), RuleScorer()
    learner = scorer.new_learner()
    results = {}
    for name, score in [("model", lambda: scorer.score_batch([None] * len(rows), rows, learner)),
                        ("rules", lambda: rules.score_batch([None] * len(rows), rows))]:
        ms = _time(score, args.rounds)
        results[name] = {"batch_p50_ms": round(float(np.percentile(ms, 50)), 3),
                         "batch_p99_ms": round(float(np.percentile(ms, 99)), 3),
                         "per_payment_us": round(float(np.percentile(ms, 50)) * 1000 / len(rows), 1)}
    summary = {"batch": len(rows), "networks": len(model.net.mlps), **results,
               "model_vs_rules": round(results["model"]["batch_p50_ms"] / results["rules"]["batch_p50_ms"], 1)}
    print(json.dumps(summary) if args.json else "\n".join(f"{k}: {v}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
