"""Train the fraud model: torch network, Platt calibration, river warm start, stacking combiner.

The training window is split in time: the network learns on the first 80%,
the last 20% (later payments, as in production) selects the epoch,
calibrates it, and fits the combiner on what the river learner predicted
there before seeing those labels. The river learner then learns the rest,
so the artifact starts serving with every label of the window.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np

from models.fraud_features import model_inputs
from models.fraud_model import FraudModel
from models.fraud_online import OnlineFraudLearner, sigmoid_logit
from models.fraud_torch import fit_platt, logits, train_fraud_net

Progress = Callable[[str], None]


def _stack(z_cal: np.ndarray, p_river: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Stacking weights over (calibrated torch log-odds, river log-odds); both kept non-negative."""
    from sklearn.linear_model import LogisticRegression

    feats = np.column_stack([z_cal, sigmoid_logit(p_river)])
    lr = LogisticRegression(C=1.0, max_iter=1000).fit(feats, y)
    wt, wr = (max(float(w), 0.0) for w in lr.coef_[0])
    if wt == 0.0 and wr == 0.0:
        wt = 1.0
    # refit the bias for the clipped weights, so the output stays calibrated
    z = wt * feats[:, 0] + wr * feats[:, 1]
    bias_fit = LogisticRegression(C=1e6, max_iter=1000).fit(z.reshape(-1, 1), y)
    scale = float(bias_fit.coef_[0, 0])
    return wt * scale, wr * scale, float(bias_fit.intercept_[0])


def river_warm_start(learner: OnlineFraudLearner, model_std: Callable[[np.ndarray], list[dict[str, float]]],
                     x: np.ndarray, y: np.ndarray, ids: Sequence[str], passes: int = 1) -> None:
    """Let the online learner learn labelled rows in time order (as it would have, live)."""
    xs = model_std(x)
    for _ in range(passes):
        for i, (xi, yi) in enumerate(zip(xs, y, strict=True)):
            learner.learn(f"{ids[i]}", xi, bool(yi), 0.0)


def fit_fraud_model(rows: Sequence[Mapping[str, Any]], y: np.ndarray, epoch_s: np.ndarray, ids: Sequence[str], *,
                    epochs: int = 30, seed: int = 0, progress: Progress | None = None) -> FraudModel:
    """Train every part of the fraud model from time-ordered rows with labels."""
    say = progress or (lambda _m: None)
    started = time.time()
    x = model_inputs(rows)
    y = np.asarray(y, dtype=np.int64)
    n = len(y)
    if n < 50 or y.sum() < 5 or y.sum() == n:
        raise ValueError(f"need 50+ rows with both classes (5+ frauds) to train; got {n} rows, {y.sum()} frauds")
    cut = int(n * 0.8)
    fit, val = slice(0, cut), slice(cut, n)
    say(f"training on {cut:,} payments ({int(y[fit].sum()):,} frauds), validating on {n - cut:,} "
        f"({int(y[val].sum()):,} frauds)")

    def epoch_report(epoch: int, loss: float, val_ap: float) -> None:
        say(f"  epoch {epoch:>2}/{epochs}  loss {loss:.4f}  validation AP {val_ap:.3f}")

    net = train_fraud_net(x[fit], y[fit], x[val], y[val], epochs=epochs, seed=seed, progress=epoch_report)
    z_val = logits(net, x[val])
    platt = fit_platt(z_val, y[val])
    model = FraudModel("pending", net, platt, (1.0, 0.0, 0.0), OnlineFraudLearner(), np.array([]), 0.0)
    say("online learner: learning the training labels in time order")
    river_warm_start(model.online, model.online_inputs, x[fit], y[fit], [ids[i] for i in range(cut)])
    p_river_val = model.online.predict(model.online_inputs(x[val]))
    model.combiner = _stack(platt[0] * z_val + platt[1], p_river_val, y[val])
    scores_val = model.combine(z_val, p_river_val)
    river_warm_start(model.online, model.online_inputs, x[val], y[val], [ids[i] for i in range(cut, n)])
    days = max((float(epoch_s[-1]) - float(epoch_s[0])) / 86400.0, 1e-3)
    model.payments_per_day = n / days
    model.reference_scores = np.sort(scores_val)
    digest = hashlib.sha256(b"".join(np.ascontiguousarray(p.detach().cpu().numpy()).tobytes()
                                     for p in net.parameters())).hexdigest()[:8]
    model.version = f"fraud-{datetime.now(UTC):%Y%m%dT%H%M%S}-{digest}"
    model.report = {"train_rows": n, "train_frauds": int(y.sum()), "validation_rows": n - cut,
                    "platt": list(platt), "combiner": list(model.combiner), "seconds": round(time.time() - started, 1),
                    "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
                    "first_event": float(epoch_s[0]), "last_event": float(epoch_s[-1])}
    say(f"combiner: torch weight {model.combiner[0]:.2f}, river weight {model.combiner[1]:.2f}; "
        f"done in {time.time() - started:.1f}s -> {model.version}")
    return model
