"""The online fraud learner: river, updated from each label as it arrives.

Between nightly retrains, new fraud patterns would go unseen; this learner
updates its weights from every ``label`` event within the batch that brings
it, and watches the decisions with ADWIN so an operator hears about drift:
the share of frauds the decisions missed, and the share of alerts that were
false alarms. Both are measured on labels that always come back (all frauds,
every alert's verdict), so neither moves when the audit share of the other
labels changes, as the overall error rate would. Inputs are the same
standardised vector the torch model sees; stacked (``base_weight``), also
the torch model's calibrated log-odds.

Labels are a biased sample: every fraud comes back (chargebacks) and every
alert gets a verdict, but of the genuine payments below the review threshold
only an audited share is ever labelled. Learned as if they were the traffic,
they would teach the layer that fraud is common (in replays of simulated
histories this cost up to 0.16 average precision). Each label is therefore
learned with the case-control offset ``-log(share)`` of :func:`labelled_share`
added to its log-odds: for a logistic model that makes the sample's odds the
traffic's again, so the weights learn the real pattern and no more.

Learning is idempotent per label: the ids of recently learned labels travel
with the checkpoint, so a label redelivered after a crash is not learned twice.

>>> learner = OnlineFraudLearner(lr=0.05)
>>> for i in range(200):
...     _ = learner.learn(f"f{i}", {"new_device": 1.0, "night": 1.0}, True, 0.9)
...     _ = learner.learn(f"g{i}", {"new_device": 0.0, "night": 0.0}, False, 0.1)
>>> p = learner.predict([{"new_device": 1.0, "night": 1.0}, {"new_device": 0.0, "night": 0.0}])
>>> bool(p[0] > 0.9 and p[1] < 0.2)
True
>>> before = dict(learner.model.weights); _ = learner.learn("f0", {"new_device": 1.0}, True, 0.1)
>>> learner.model.weights == before, learner.labels_seen  # a redelivered label changes nothing
(True, 400)
"""

from __future__ import annotations

import math
import pickle
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from river import drift, linear_model, optim

BASE = "base_logit"
LEARNED_IDS_KEPT = 5_000  # a few replayed batches; keeps a checkpoint ~100 KB


def labelled_share(score: float, review: float, audit_share: float) -> float:
    """The chance that a genuine payment decided with ``score`` gets a label at all.

    Analysts give a verdict on every alert (``score >= review``); below it only
    the audited share of genuine payments is labelled. 1.0 when every
    payment's outcome is fed back.

    >>> labelled_share(0.7, 0.5, 0.02), labelled_share(0.1, 0.5, 0.02), labelled_share(0.1, 0.5, 1.0)
    (1.0, 0.02, 1.0)
    """
    return 1.0 if score >= review else min(max(audit_share, 1e-6), 1.0)


@dataclass
class DriftEvent:
    """What an operator is told when one of the decisions' error rates shifts."""

    detector: str
    metric: str  # "missed_fraud_rate" (frauds scored under the threshold) or "false_alarm_rate" (alerts, genuine)
    rate: float  # ADWIN's estimate of that rate now
    labels_seen: int


@dataclass
class OnlineFraudLearner:
    """river logistic regression + ADWIN on the decisions' misses and false alarms; picklable as a checkpoint."""

    lr: float = 0.01
    l2: float = 1e-4
    # Stacked mode: an input "base_logit" (the calibrated torch log-odds) starts with this weight and the
    # intercept is frozen, so the learner starts as the torch model and learns corrections on top of it.
    base_weight: float | None = None
    miss_weight: float = 1.0  # > 1 learns the decisions' mistakes harder (costs AP in replays: kept at 1)
    model: linear_model.LogisticRegression = field(init=False)
    missed: drift.ADWIN = field(init=False)  # over fraud labels: 1 if the decision scored it under the threshold
    false_alarms: drift.ADWIN = field(init=False)  # over alerts' labels: 1 if the payment was genuine
    labels_seen: int = 0
    learned: deque[str] = field(default_factory=lambda: deque(maxlen=LEARNED_IDS_KEPT))
    _learned_set: set[str] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        stacked = self.base_weight is not None
        self.model = linear_model.LogisticRegression(optimizer=optim.SGD(self.lr), l2=self.l2,
                                                     intercept_lr=0.0 if stacked else self.lr)
        if stacked:
            self.model._weights[BASE] = float(self.base_weight)  # river has no public initial-weight setter
        self.reset_drift()

    def predict(self, xs: Sequence[Mapping[str, float]]) -> np.ndarray:
        """Probability of fraud for each input dict."""
        return np.array([self.model.predict_proba_one(dict(x)).get(True, 0.0) for x in xs], dtype=np.float64)

    def weight_vector(self, names: Sequence[str]) -> tuple[np.ndarray, float, float]:
        """(weights of ``names``, weight of the base log-odds, intercept): for scoring a batch as one matrix."""
        w = self.model.weights  # a fresh dict per access in river: read it once
        return np.array([w.get(n, 0.0) for n in names]), float(w.get(BASE, 0.0)), float(self.model.intercept)

    def reset_drift(self) -> None:
        """Forget the rates seen so far: the next labels set ADWIN's reference."""
        self.missed = drift.ADWIN(delta=0.002)
        self.false_alarms = drift.ADWIN(delta=0.002)

    def seen(self, label_id: str) -> bool:
        return label_id in self._learned_set

    def learn(self, label_id: str, x: Mapping[str, float], is_fraud: bool, score: float,
              threshold: float = 0.5, share: float = 1.0) -> DriftEvent | None:
        """Learn one label (once per ``label_id``); returns a drift event when ADWIN flags one.

        ``score`` is what the deployed scorer said at decision time: ADWIN
        watches the decisions, not this learner alone, and a label the
        decision got wrong (a missed fraud, a false alarm) is learned with
        ``miss_weight``. ``share`` is :func:`labelled_share` of the
        payment: its offset ``-log(share)`` rides on the intercept for this
        one update (river has no per-row offset), then comes off again.
        """
        if label_id in self._learned_set:
            return None
        alerted = score >= threshold
        wrong = alerted != bool(is_fraud)
        offset = -math.log(share) if share < 1.0 else 0.0
        self.model.intercept += offset
        try:
            self.model.learn_one(dict(x), bool(is_fraud), w=self.miss_weight if wrong else 1.0)
        finally:
            self.model.intercept -= offset  # keeps the update river made to a learned intercept
        if len(self.learned) == self.learned.maxlen:
            self._learned_set.discard(self.learned[0])
        self.learned.append(label_id)
        self._learned_set.add(label_id)
        self.labels_seen += 1
        if is_fraud:
            self.missed.update(float(not alerted))
            if self.missed.drift_detected:
                return DriftEvent("ADWIN", "missed_fraud_rate", float(self.missed.estimation), self.labels_seen)
        if alerted:
            self.false_alarms.update(float(not is_fraud))
            if self.false_alarms.drift_detected:
                return DriftEvent("ADWIN", "false_alarm_rate", float(self.false_alarms.estimation), self.labels_seen)
        return None

    # -- checkpoints -----------------------------------------------------------
    def dumps(self) -> bytes:
        return pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL)

    @staticmethod
    def loads(raw: bytes) -> OnlineFraudLearner:
        learner = pickle.loads(raw)  # our own checkpoint, from our own Redis
        learner._learned_set = set(learner.learned)
        if "missed" not in learner.__dict__:  # a checkpoint from before the two detectors
            learner.__dict__.pop("adwin", None)
            learner.reset_drift()
        return learner

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_learned_set"] = set()  # rebuilt from ``learned`` on load
        return state
