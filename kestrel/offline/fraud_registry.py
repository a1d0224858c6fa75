"""Train a fraud candidate for the registry, and measure it and the champion on the same held-out window.

The newest ``holdout_share`` of the time-ordered rows is the gate's window:
the candidate trains on the rows before it (its own validation split is
inside those), so neither it nor, as a rule, the champion has seen the
window's labels. Both are scored there by the same function, with their
artifacts' starting river layer (no learning during the window, for both),
and their numbers go into the candidate's record: the gate
(:mod:`kestrel.models.gate`) compares exactly these. If the champion's
training data reaches into the window the record says so
(``champion_saw_window``): the comparison then favours the champion, which
only makes the gate stricter.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kestrel.feature_store.sets import FRAUD_FEATURE_SET_VERSION
from kestrel.models.fraud_features import model_inputs
from kestrel.models.fraud_model import FraudModel
from kestrel.models.fraud_online import OnlineFraudLearner
from kestrel.models.policy import Policy
from kestrel.models.registry import ModelRecord, Registry, code_version
from kestrel.offline.fraud_train import fit_fraud_model
from kestrel.offline.run_report import fraud_plots, report_plots

Progress = Callable[[str], None]
BATCH = 100  # rows per scoring call when timing: the worker's micro-batches are of this order


def calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: the rows' mean |predicted - observed rate| over equal-width score bins.

    >>> y = np.array([0, 0, 0, 1] * 250); round(calibration_error(y, np.full(1000, 0.25)), 6)
    0.0
    >>> round(calibration_error(y, np.full(1000, 0.75)), 6)
    0.5
    """
    idx = np.minimum((np.asarray(p) * bins).astype(int), bins - 1)
    total = 0.0
    for b in np.unique(idx):
        sel = idx == b
        total += sel.sum() * abs(float(p[sel].mean()) - float(y[sel].mean()))
    return float(total / len(y))


def window_scores(model: FraudModel, x: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """The model's scores on the gate's window, in serving-sized batches, and each batch's milliseconds."""
    learner = OnlineFraudLearner.loads(model.online.dumps())  # the artifact's own layer, untouched
    model.score_arrays(x[:BATCH], learner)  # first call pays one-time costs
    parts, latency = [], []
    for i in range(0, len(x), BATCH):
        t0 = time.perf_counter()
        parts.append(model.score_arrays(x[i:i + BATCH], learner)[0])
        latency.append((time.perf_counter() - t0) * 1000)
    return np.concatenate(parts), latency


def window_metrics(model: FraudModel, x: np.ndarray, y: np.ndarray, policy: Policy,
                   scored: tuple[np.ndarray, list[float]] | None = None) -> dict[str, float]:
    """What the gate compares: AP, ROC AUC, calibration error, alert rate at the policy, p99 ms per batch.

    ``scored``: :func:`window_scores` of the same model and window, when the caller has it already.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    p, latency = scored or window_scores(model, x)
    review = policy.thresholds(model.reference_scores, model.payments_per_day).review
    both = 0 < y.sum() < len(y)
    return {"average_precision": round(float(average_precision_score(y, p)), 4) if both else float("nan"),
            "roc_auc": round(float(roc_auc_score(y, p)), 4) if both else float("nan"),
            "calibration_error": round(calibration_error(y, p), 5),
            "alert_rate": round(float((p >= review).mean()), 5),
            "score_p99_ms": round(float(np.percentile(latency, 99)), 3)}


def train_candidate(rows: Sequence[Mapping[str, Any]], y: np.ndarray, epoch_s: np.ndarray, ids: Sequence[str],
                    registry: Registry, out_root: str | Path, *, holdout_share: float = 0.15,
                    policy: Policy | None = None, seed: int = 0, epochs: int = 30, members: int = 5,
                    groups: Sequence[Any] | None = None,
                    progress: Progress | None = None) -> tuple[FraudModel, ModelRecord]:
    """Train on all but the newest rows, score candidate and champion there, save and register the candidate.

    Registering promotes nothing: :func:`kestrel.models.registry.promote`
    (``kestrel models promote``) asks the gate.
    """
    say = progress or (lambda _m: None)
    policy = policy or Policy.from_env()
    n = len(y)
    cut = int(n * (1.0 - holdout_share))
    if not 0.0 < holdout_share < 0.5 or n - cut < 50 or not 0 < int(np.sum(y[cut:])) < n - cut:
        raise ValueError(f"the gate's window (the newest {holdout_share:.0%}: {n - cut} rows, "
                         f"{int(np.sum(y[cut:]))} frauds) needs 50+ rows with both classes")
    say(f"gate window: the newest {n - cut:,} payments ({int(np.sum(y[cut:])):,} frauds), held out of training")
    model = fit_fraud_model(rows[:cut], y[:cut], epoch_s[:cut], ids[:cut], epochs=epochs, members=members,
                            seed=seed, groups=None if groups is None else groups[:cut], progress=say)
    x_window, y_window = model_inputs(rows[cut:]), np.asarray(y[cut:])
    scored = window_scores(model, x_window)
    metrics = window_metrics(model, x_window, y_window, policy, scored)
    scores = {f"candidate {model.version}": scored[0]}
    say(f"candidate on the gate window: {metrics}")
    window = {"first_event": float(epoch_s[cut]), "last_event": float(epoch_s[-1]), "rows": n - cut,
              "frauds": int(y_window.sum())}
    evaluation: dict[str, Any] = {"window": window}
    parent = registry.aliases().get("champion")
    if parent is not None:
        champion_record = registry.get(parent)
        champion_record.verify()
        champion = FraudModel.load(champion_record.path)
        champion_scored = window_scores(champion, x_window)
        scores[f"champion {parent}"] = champion_scored[0]
        evaluation.update(champion=parent,
                          champion_metrics=window_metrics(champion, x_window, y_window, policy, champion_scored),
                          champion_saw_window=float(champion_record.data_range.get("last_event", 0.0))
                          >= window["first_event"])
        say(f"champion {parent} on the same window: {evaluation['champion_metrics']}")
    path = model.save(Path(out_root) / model.version)
    evaluation["plots"] = report_plots(lambda folder: fraud_plots(folder, y_window, scores,
                                                                  model.report.get("learning_curves", {})), path, say)
    record = registry.register(ModelRecord.new(
        "fraud", model.version, path, metrics=metrics, validation_window=window,
        data_range={"first_event": float(epoch_s[0]), "last_event": float(epoch_s[cut - 1]), "rows": cut},
        feature_set=FRAUD_FEATURE_SET_VERSION, code_version=code_version(), parent=parent, seed=seed,
        evaluation=evaluation))
    say(f"registered {record.version} ({record.checksum[:12]}) in {registry.root}")
    return model, record

