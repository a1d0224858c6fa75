"""``kestrel eval fraud``: replay a payment history as production would have lived it.

Train on the training window; leave a gap as long as the label delay (those
labels are not known yet when the test starts); score the test window in
time order while labels flow back only ``delay`` after each payment (the
online learner learns them then: the frauds, the verdicts on alerts and an
audited share of the rest, as the worker's label stream carries them); drop
cards whose fraud was already known before the test (they would be blocked
already). Every baseline is trained on the same rows, with the same
features, in the same run.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

from kestrel.feature_store.sets import TERMINAL_ACTIVITY
from kestrel.models.fraud_features import model_inputs
from kestrel.models.fraud_model import FraudModel, ModelScorer
from kestrel.models.fraud_online import DriftEvent, OnlineFraudLearner, labelled_share
from kestrel.models.policy import Policy
from kestrel.offline.fraud_dataset import Columns, feature_rows, payments_of, read_history
from kestrel.offline.fraud_train import fit_fraud_model, river_warm_start
from kestrel.offline.paired_ap import paired_ap_gain
from kestrel.offline.textbook_features import textbook_features

DAY = 86400.0
CHUNK = 256  # payments scored per micro-batch, as the stream path does


@dataclass(frozen=True)
class EvalConfig:
    csv: str
    columns: Columns
    train_days: float = 7.0
    delay_days: float = 7.0
    test_days: float = 7.0
    train_start: str | None = None
    epochs: int = 30
    members: int = 5
    seed: int = 0
    audit_share: float = 0.02  # genuine payments below the review threshold that get a label (as the worker's)


def ranking_metrics(y: np.ndarray, score: np.ndarray, cards: np.ndarray, day: np.ndarray) -> dict[str, float]:
    """ROC AUC, AP, card precision@100 per day, recall at a 1% alert rate.

    Card precision@100 divides by 100 even on a day with fewer fraud cards,
    as the metric is defined (so its ceiling is that day's fraud cards / 100).

    >>> y = np.array([0, 0, 1, 1]); s = np.array([0.1, 0.2, 0.8, 0.9])
    >>> m = ranking_metrics(y, s, np.array(["a", "b", "c", "d"]), np.zeros(4))
    >>> m["roc_auc"], m["average_precision"], m["card_precision_at_100"]
    (1.0, 1.0, 0.02)
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    both = 0 < y.sum() < len(y)
    threshold = np.quantile(score, 0.99) if len(score) else 1.0
    alerts = score >= threshold
    frame = pd.DataFrame({"card": cards, "day": day, "y": y, "s": score})
    per_card_day = frame.groupby(["day", "card"]).agg(s=("s", "max"), y=("y", "max")).reset_index()
    daily = [g.nlargest(100, "s")["y"].sum() / 100.0 for _, g in per_card_day.groupby("day")]
    return {
        "roc_auc": round(float(roc_auc_score(y, score)), 4) if both else float("nan"),
        "average_precision": round(float(average_precision_score(y, score)), 4) if both else float("nan"),
        "card_precision_at_100": round(float(np.mean(daily)), 4) if daily else float("nan"),
        "recall_at_1pct_alerts": round(float(alerts[y == 1].mean()), 4) if y.sum() else float("nan"),
    }


def segment_report(y: np.ndarray, score: np.ndarray, segment: np.ndarray) -> dict[str, dict[str, float]]:
    """Per segment: payments, fraud rate, alert rate and alert precision at the global 1% alert threshold."""
    threshold = np.quantile(score, 0.99)
    out = {}
    for name in sorted(set(segment.tolist())):
        m = segment == name
        alerts = score[m] >= threshold
        out[str(name)] = {"payments": int(m.sum()), "fraud_rate": round(float(y[m].mean()), 5),
                          "alert_rate": round(float(alerts.mean()), 5),
                          "alert_precision": round(float(y[m][alerts].mean()), 4) if alerts.any() else None}
    return out


def _percentile_ms(samples: list[float]) -> tuple[float, float]:
    arr = np.asarray(samples) * 1000
    return round(float(np.percentile(arr, 50)), 3), round(float(np.percentile(arr, 99)), 3)


def _single_latency(score_one: Callable[[int], object], n: int, total: int) -> list[float]:
    rng = np.random.default_rng(0)
    out = []
    for i in rng.integers(0, total, min(n, total)):
        t = time.perf_counter()
        score_one(int(i))
        out.append(time.perf_counter() - t)
    return out


def audited(ids: np.ndarray, share: float) -> np.ndarray:
    """Which payments an audit samples: a stable hash of the id, so every model sees the same labels.

    >>> audited(np.array(["a", "b", "c"]), 1.0).tolist(), audited(np.array(["a", "b", "c"]), 0.0).tolist()
    ([True, True, True], [False, False, False])
    """
    if share >= 1.0:
        return np.ones(len(ids), dtype=bool)
    digests = (int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "big") for i in ids)
    return np.fromiter((d / 2**64 < share for d in digests), dtype=bool, count=len(ids))


def _replay_online(model_score: Callable[[np.ndarray, OnlineFraudLearner], np.ndarray], learner: OnlineFraudLearner,
                   std: Callable[[np.ndarray], Sequence[Mapping[str, float]]], x: np.ndarray, t: np.ndarray,
                   test_idx: np.ndarray, label_idx: np.ndarray, y: np.ndarray, ids: np.ndarray,
                   delay_s: float, audit_share: float = 1.0, review: float = 0.5,
                   drifts: list[DriftEvent] | None = None) -> np.ndarray:
    """Score ``test_idx`` in time order in micro-batches; labels of ``label_idx`` arrive at t + delay.

    The labels that arrive are the ones the worker's label stream carries:
    every fraud (chargebacks), a verdict on every payment scored at or above
    ``review`` (the analysts' queue), and the ``audit_share`` of the rest;
    each is learned with its :func:`~kestrel.models.fraud_online.labelled_share`.
    ADWIN's drift events are appended to ``drifts`` when given.
    """
    arrival = t[label_idx] + delay_s
    order = np.argsort(arrival, kind="stable")
    label_idx, arrival = label_idx[order], arrival[order]
    audit = audited(ids[label_idx], audit_share)
    decided: dict[int, float] = {}  # the score each test payment got when it was decided
    learned = 0
    scores = np.empty(len(test_idx))
    for start in range(0, len(test_idx), CHUNK):
        chunk = test_idx[start:start + CHUNK]
        due = int(np.searchsorted(arrival, t[chunk[0]], side="right"))
        if due > learned:
            rows = label_idx[learned:due]
            said = np.array([decided.get(j, np.nan) for j in rows.tolist()])
            undecided = np.isnan(said)  # gap payments: what the model would have said of them
            if undecided.any():
                said[undecided] = model_score(x[rows[undecided]], learner)
            keep = (y[rows] == 1) | (said >= review) | audit[learned:due]
            rows, said = rows[keep], said[keep]
            for xi, j, s in zip(std(x[rows]), rows, said, strict=True):
                event = learner.learn(str(ids[j]), xi, bool(y[j]), float(s), review,
                                      labelled_share(s, review, audit_share))
                if event is not None and drifts is not None:
                    drifts.append(event)
            learned = due
        chunk_scores = model_score(x[chunk], learner)
        scores[start:start + len(chunk)] = chunk_scores
        decided.update(zip(chunk.tolist(), chunk_scores.tolist(), strict=True))
    return scores


@dataclass
class Replay:
    """A history's point-in-time features and the evaluation's windows: what :func:`run_eval` trains and scores
    on, for any other study of the same split (``bench/fraud_members.py``)."""

    frame: pd.DataFrame
    rows: list[dict[str, Any]]  # each payment's feature row, point-in-time
    x: np.ndarray  # the model inputs of ``rows``
    x_textbook: np.ndarray  # the textbook features of the same payments
    y: np.ndarray
    t: np.ndarray  # epoch seconds
    ids: np.ndarray
    cards: np.ndarray
    train: np.ndarray  # row indices of each window
    test: np.ndarray  # cards with fraud known before the test removed
    label_idx: np.ndarray  # labels that come back during the test, in time order of their payments
    known_fraud_cards: set[Any]
    train_start: float
    test_start: float
    test_end: float
    warm_days: float


def replay_windows(cfg: EvalConfig, say: Callable[[str], None]) -> Replay:
    """Read the history, compute every payment's features point-in-time, and cut the windows."""
    frame = read_history(cfg.csv, cfg.columns)
    t_all = frame["epoch_s"].to_numpy()
    span = (cfg.train_days + cfg.delay_days + cfg.test_days) * DAY
    if cfg.train_start:
        train_start = datetime.fromisoformat(cfg.train_start).replace(tzinfo=UTC).timestamp()
    else:  # the latest full span that fits; what comes before warms the long windows
        train_start = max(np.floor((t_all[-1] - span) / DAY) * DAY, t_all[0])
    train_end = train_start + cfg.train_days * DAY
    test_start = train_end + cfg.delay_days * DAY
    test_end = test_start + cfg.test_days * DAY
    frame = frame[t_all < test_end].reset_index(drop=True)
    t = frame["epoch_s"].to_numpy()
    y_raw = frame["label"].to_numpy(dtype=float)
    if np.isnan(y_raw).any():
        raise ValueError(f"{int(np.isnan(y_raw).sum())} rows have no 0/1 label in --label-col")
    y = y_raw.astype(np.int64)
    ids = frame["event_id"].to_numpy()
    cards = frame["card_id"].to_numpy()
    say(f"history: {len(frame):,} payments up to the end of the test window; computing features point-in-time")
    started = time.time()
    payments = payments_of(frame)
    rows = feature_rows(payments, y_raw)
    x = model_inputs(rows)
    terminal = np.array([TERMINAL_ACTIVITY.entity_id_of(p) for p in payments], dtype=object)  # as the store keys it
    x_textbook = textbook_features(cards, terminal, frame["amount"].to_numpy(dtype=float), t, y,
                                   cfg.delay_days * DAY)
    say(f"features: {x.shape[1]} model inputs for {len(rows):,} payments in {time.time() - started:.1f}s")

    warm_days = (train_start - t[0]) / DAY
    longest = longest_window_days()
    if warm_days < longest - 1 / 24:  # an hour's slack: a history's first payment comes a little after midnight
        say(f"warning: {warm_days:.1f} days of history before the training window, but the features reach back "
            f"{longest:.0f} days: early payments see partial windows, so features drift upward through the run "
            f"(models that cannot extrapolate suffer most). Give {longest:.0f}+ days of history before "
            "--train-start for a fair comparison.")
    train = np.flatnonzero((t >= train_start) & (t < train_end))
    gap = np.flatnonzero((t >= train_end) & (t < test_start))
    known_fraud_cards = set(cards[np.concatenate([train, gap])][y[np.concatenate([train, gap])] == 1])
    test = np.flatnonzero((t >= test_start) & (t < test_end) & ~np.isin(cards, list(known_fraud_cards)))
    if len(train) < 50 or len(test) == 0:
        raise ValueError(f"windows hold {len(train)} training and {len(test)} test payments: "
                         "check --train-start and the window lengths against the data's time span")
    say(f"windows: train {len(train):,} (frauds {int(y[train].sum())}), gap {len(gap):,}, test {len(test):,} "
        f"(frauds {int(y[test].sum())}; {len(known_fraud_cards)} cards with known fraud removed)")
    label_idx = np.concatenate([train, gap, np.flatnonzero((t >= test_start) & (t < test_end))])
    label_idx = label_idx[t[label_idx] >= train_end]  # training labels are learned at training time
    return Replay(frame, rows, x, x_textbook, y, t, ids, cards, train, test, label_idx, known_fraud_cards,
                  train_start, test_start, test_end, warm_days)


def run_eval(cfg: EvalConfig, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    say = say or (lambda m: print(m, file=sys.stderr, flush=True))
    r = replay_windows(cfg, say)
    frame, rows, x, x_textbook, y, t, ids, cards = r.frame, r.rows, r.x, r.x_textbook, r.y, r.t, r.ids, r.cards
    train, test, label_idx, known_fraud_cards = r.train, r.test, r.label_idx, r.known_fraud_cards
    train_start, test_start, test_end, warm_days = r.train_start, r.test_start, r.test_end, r.warm_days
    delay_s = cfg.delay_days * DAY

    model = fit_fraud_model([rows[i] for i in train], y[train], t[train], ids[train].tolist(), epochs=cfg.epochs,
                            members=cfg.members, seed=cfg.seed, groups=cards[train], progress=say)
    import torch

    torch.set_num_threads(1)  # as the worker scores (see kestrel.streams.worker.processing.load_fraud_scorer)
    scorer = ModelScorer(model, Policy(review=0.5))
    say("scoring the test window in time order (labels fed back after the delay)")
    learner, drifts = scorer.new_learner(), []
    seen_before = learner.labels_seen
    kestrel_scores = _replay_online(lambda xb, lr: model.score_arrays(xb, lr)[0], learner,
                                    lambda xb: model.online_inputs(xb, model.base_logits(xb)), x, t, test, label_idx,
                                    y, ids, delay_s, cfg.audit_share, scorer.thresholds.review, drifts)
    latency = _single_latency(lambda i: scorer.score_batch([None], [rows[test[i]]]), 300, len(test))

    results: dict[str, dict[str, float]] = {}
    day = np.floor(t[test] / DAY)
    y_test = y[test]
    kestrel = ranking_metrics(y_test, kestrel_scores, cards[test], day)
    kestrel["score_p50_ms"], kestrel["score_p99_ms"] = _percentile_ms(latency)
    results["kestrel"] = kestrel

    say("baselines: logistic regression, gradient-boosted trees, river alone, torch alone, rules, and logistic "
        "regression and a random forest on the textbook features")
    baselines = _baselines(model, x, y, t, ids, rows, train, test, label_idx, delay_s, cfg.seed, cfg.audit_share)
    baselines |= _textbook_baselines(x_textbook, y, train, test, cfg.seed)
    for name, (scores, lat) in baselines.items():
        m = ranking_metrics(y_test, scores, cards[test], day)
        m["score_p50_ms"], m["score_p99_ms"] = _percentile_ms(lat)
        results[name] = m
    say("paired bootstrap of Kestrel's AP gain over each baseline (resampling cards)")
    gains = {name: paired_ap_gain(y_test, kestrel_scores, scores, cards[test], seed=cfg.seed)
             for name, (scores, _lat) in baselines.items()}
    summary: dict[str, Any] = {
        "kestrel": results.pop("kestrel"), "baselines": results, "kestrel_ap_gain": gains, "train_rows": len(train),
        "test_rows": len(test), "test_frauds": int(y_test.sum()), "model_version": model.version,
        "selection": model.report.get("selection"),
        "windows": {"train_start": _iso(train_start), "test_start": _iso(test_start), "test_end": _iso(test_end),
                    "delay_days": cfg.delay_days},
        "removed_known_fraud_cards": len(known_fraud_cards),
        "warm_up_days": round(warm_days, 2), "longest_feature_window_days": longest_window_days(),
        "label_audit_share": cfg.audit_share,
        # what the river layer went through in the replay: labels learned, and ADWIN's drift events (labels seen)
        "online": {"labels_learned": learner.labels_seen - seen_before,
                   "drift_events_at_label": [d.labels_seen - seen_before for d in drifts]},
    }
    if "segment" in frame:
        summary["segments"] = segment_report(y_test, kestrel_scores, frame["segment"].to_numpy()[test])
    return summary


def longest_window_days() -> float:
    """How far back (days) the fraud features look, delay included: the warm-up a replay needs."""
    from kestrel.feature_store.definitions import Windowed
    from kestrel.feature_store.sets import FRAUD_VECTOR_SETS

    return max((f.window_s + f.delay_s) / DAY for fs in FRAUD_VECTOR_SETS for f in fs.vector if isinstance(f, Windowed))


def _baselines(model: FraudModel, x: np.ndarray, y: np.ndarray, t: np.ndarray, ids: np.ndarray, rows: list,
               train: np.ndarray, test: np.ndarray, label_idx: np.ndarray, delay_s: float,
               seed: int, audit_share: float) -> dict[str, tuple[np.ndarray, list[float]]]:
    from sklearn.ensemble import HistGradientBoostingClassifier

    from kestrel.models.rules import RuleScorer

    out: dict[str, tuple[np.ndarray, list[float]]] = {}
    out["logistic_regression"] = _logistic_regression(x, y, train, test)
    gbt = HistGradientBoostingClassifier(random_state=seed).fit(x[train], y[train])
    out["gradient_boosted_trees"] = (gbt.predict_proba(x[test])[:, 1], _single_latency(
        lambda i: gbt.predict_proba(x[test[i]:test[i] + 1]), 300, len(test)))
    out["random_forest"] = _random_forest(x, y, train, test, seed)
    river_alone = OnlineFraudLearner()
    river_warm_start(river_alone, model.online_inputs(x[train]), y[train], ids[train].tolist())
    river_scores = _replay_online(lambda xb, lr_: lr_.predict(model.online_inputs(xb)), river_alone,
                                  model.online_inputs, x, t, test, label_idx, y, ids, delay_s, audit_share)
    out["river_alone"] = (river_scores, _single_latency(
        lambda i: river_alone.predict(model.online_inputs(x[test[i]:test[i] + 1])), 300, len(test)))
    out["torch_alone"] = (model.network_probability(x[test]), _single_latency(
        lambda i: model.network_probability(x[test[i]:test[i] + 1]), 300, len(test)))
    if model.trees is not None:
        out["trees_alone"] = (model.trees_probability(x[test]), _single_latency(
            lambda i: model.trees_probability(x[test[i]:test[i] + 1]), 300, len(test)))
    rules = RuleScorer()
    out["rules"] = (np.array([rules.score_one(rows[i]).score for i in test]),
                    _single_latency(lambda i: rules.score_one(rows[test[i]]), 300, len(test)))
    return out


def _textbook_baselines(x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray,
                        seed: int) -> dict[str, tuple[np.ndarray, list[float]]]:
    """The practitioner's reference: the textbook features (:mod:`kestrel.offline.textbook_features`), same split."""
    return {"textbook_logistic_regression": _logistic_regression(x, y, train, test),
            "textbook_random_forest": _random_forest(x, y, train, test, seed)}


def _logistic_regression(x: np.ndarray, y: np.ndarray, train: np.ndarray,
                         test: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """Standardised inputs, plain logistic regression: test scores and single-payment latencies."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    lr = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x[train], y[train])
    return lr.predict_proba(x[test])[:, 1], _single_latency(lambda i: lr.predict_proba(x[test[i]:test[i] + 1]), 300,
                                                            len(test))


def _random_forest(x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray,
                   seed: int) -> tuple[np.ndarray, list[float]]:
    """A random forest with the textbook's own settings (100 trees, depth 20), not tuned here."""
    from sklearn.ensemble import RandomForestClassifier

    rf = RandomForestClassifier(n_estimators=100, max_depth=20, random_state=seed, n_jobs=2).fit(x[train], y[train])
    return rf.predict_proba(x[test])[:, 1], _single_latency(lambda i: rf.predict_proba(x[test[i]:test[i] + 1]), 100,
                                                            len(test))


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")
