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

The checkpoint (:meth:`OnlineFraudLearner.dumps`) is a JSON document of plain
data, never a pickle: every worker loads it from shared Redis, and a pickle
there would run the code of whoever can write that key on every worker. It
holds the river model's weights, intercept and optimizer step count, each
ADWIN detector's bucketed window, the learned label ids and the counters,
with a format version and the sha256 of the payload; :meth:`~OnlineFraudLearner.loads`
rebuilds the same objects from them (the learner then learns and flags
drift exactly as the one saved would) and refuses, with ``ValueError``,
anything else: a pickle, a damaged or edited payload, an unknown version.
The checksum catches damage and hand edits; it is no signature (whoever can
write the key can recompute it): safety comes from loading data, not code.

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
>>> restored = OnlineFraudLearner.loads(learner.dumps())
>>> restored.model.weights == learner.model.weights, restored.labels_seen, restored.seen("g199")
(True, 400, True)
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import orjson
import river
from river import drift, linear_model, optim

BASE = "base_logit"
LEARNED_IDS_KEPT = 5_000  # a few replayed batches; keeps a checkpoint ~100 KB
CHECKPOINT_FORMAT = "kestrel.online_fraud_learner"
CHECKPOINT_VERSION = 1


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
    """river logistic regression + ADWIN on the decisions' misses and false alarms; checkpointed as JSON."""

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
        self.model = self.new_model()
        if self.base_weight is not None:
            self.model._weights[BASE] = float(self.base_weight)  # river has no public initial-weight setter
        self.reset_drift()

    def new_model(self) -> linear_model.LogisticRegression:
        """A river model with this learner's configuration and nothing learned (a checkpoint rebuilds it so)."""
        return linear_model.LogisticRegression(optimizer=optim.SGD(self.lr), l2=self.l2,
                                               intercept_lr=0.0 if self.base_weight is not None else self.lr)

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
        """The checkpoint: a JSON document of plain data (see :func:`checkpoint_payload`), never a pickle."""
        payload = checkpoint_payload(self)
        body = _canonical(payload)
        return orjson.dumps({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                             "sha256": hashlib.sha256(body).hexdigest(), "payload": payload})

    @staticmethod
    def loads(raw: bytes | bytearray | memoryview) -> OnlineFraudLearner:
        """The learner a :meth:`dumps` checkpoint holds; ``ValueError`` for anything else.

        Refused, without running any of it: a pickle (the format before
        this one), a blob that is not JSON, another format, an unknown
        version, a payload whose sha256 differs from the one it carries,
        and a payload that does not hold a learner's state.
        """
        raw = bytes(raw)
        if raw[:1] == b"\x80":  # pickle protocol 2+ opens with PROTO (0x80): the old checkpoints
            raise ValueError("online learner checkpoint is a pickle (the format before JSON checkpoints): "
                             "refused, unpickling can run code (a worker starts from a fresh learner; "
                             "a model artifact saved before JSON checkpoints must be retrained)")
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise ValueError(f"online learner checkpoint is not JSON ({e}): refused") from None
        if not isinstance(doc, dict) or doc.get("format") != CHECKPOINT_FORMAT:
            raise ValueError("online learner checkpoint: not a Kestrel online learner document")
        version = doc.get("version")
        if type(version) is not int or version != CHECKPOINT_VERSION:
            raise ValueError(f"online learner checkpoint: unknown version {version!r} "
                             f"(this code reads version {CHECKPOINT_VERSION})")
        payload = doc.get("payload")
        if not isinstance(payload, dict) or not isinstance(doc.get("sha256"), str):
            raise ValueError("online learner checkpoint: no payload or no checksum")
        try:
            body = _canonical(payload)
        except orjson.JSONEncodeError as e:
            raise ValueError(f"online learner checkpoint: payload cannot be checksummed ({e})") from None
        if hashlib.sha256(body).hexdigest() != doc["sha256"]:
            raise ValueError("online learner checkpoint: sha256 of the payload does not match its checksum "
                             "(corrupted or edited)")
        try:
            return learner_from_payload(payload)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError, struct.error) as e:
            raise ValueError(f"online learner checkpoint: malformed payload ({type(e).__name__}: {e})") from None


# -- the checkpoint's plain data -------------------------------------------------
# river keeps an ADWIN window in a Rust object (``river._river_rust.drift.AdaptiveWindowing``) whose only
# state export is its own bincode bytes: the struct's fields in order, little-endian, fixed-width ints,
# u64 lengths (the window's fields and its buckets, then the binding's copy of the parameters). The
# checkpoint holds those fields as JSON; the bytes are decoded here when saving and re-encoded from
# validated numbers when loading, so river's decoder (which panics, a BaseException, on bytes it cannot
# read) only ever sees bytes of the exact shape it wrote. A river whose struct differs fails loudly when
# saving (the decode is checked by re-encoding it), not by restoring the wrong state.

_I32 = (-(2**31), 2**31 - 1)
_ADWIN_HEAD = struct.Struct("<diQddddddiiiiQ")  # delta .. n_detections, then len(bucket_list)
_ADWIN_HEAD_FIELDS = ("delta", "clock", "max_buckets", "min_window_length", "grace_period", "total", "variance",
                      "width", "total_width", "n_buckets", "max_n_buckets", "tick", "n_detections")
_ADWIN_TAIL = struct.Struct("<diQii")  # the binding's delta, clock, max_buckets, min_window_length, grace_period
_U64 = struct.Struct("<Q")
_MAX_BUCKET_LEVELS = 62  # bucket level i holds 2**i points; river computes that as a u64 shift


def _canonical(payload: dict) -> bytes:
    """The payload's bytes the checksum covers: sorted keys, orjson's shortest round-trip floats."""
    return orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)


def _num(x: float) -> float | str:
    """A float as JSON: itself when finite (orjson writes the shortest repr that reads back exactly)."""
    x = float(x)
    return x if math.isfinite(x) else repr(x)  # "nan", "inf", "-inf": JSON has no such numbers


def _float(v: object) -> float:
    if isinstance(v, float) or (isinstance(v, int) and not isinstance(v, bool)):
        return float(v)
    if v in ("nan", "inf", "-inf"):
        return float(v)  # type: ignore[arg-type]
    raise TypeError(f"expected a number, got {v!r}")


def _int(v: object, lo: int, hi: int) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise ValueError(f"expected an integer in [{lo}, {hi}], got {v!r}")
    return v


def _bool(v: object) -> bool:
    if type(v) is not bool:
        raise TypeError(f"expected true or false, got {v!r}")
    return v


def adwin_state(detector: drift.ADWIN) -> dict:
    """Everything an ADWIN detector holds, as plain data: its parameters, flag and bucketed window."""
    raw = detector._helper.__getstate__()
    head = _ADWIN_HEAD.unpack_from(raw, 0)
    fields = dict(zip(_ADWIN_HEAD_FIELDS, head[:-1], strict=True))
    pos, buckets = _ADWIN_HEAD.size, []
    for _ in range(head[-1]):
        max_size, current_idx = struct.unpack_from("<QQ", raw, pos)
        pos += 16
        columns = []
        for _column in ("totals", "variances"):
            (n,) = _U64.unpack_from(raw, pos)
            columns.append([_num(v) for v in struct.unpack_from(f"<{n}d", raw, pos + 8)])
            pos += 8 + 8 * n
        if max_size != fields["max_buckets"]:
            raise RuntimeError(f"river's ADWIN state: a bucket of size {max_size}, window of {fields['max_buckets']}")
        buckets.append({"current_idx": current_idx, "totals": columns[0], "variances": columns[1]})
    params = {"delta": float(detector.delta), "clock": int(detector.clock), "max_buckets": int(detector.max_buckets),
              "min_window_length": int(detector.min_window_length), "grace_period": int(detector.grace_period)}
    window = {k: _num(fields[k]) if isinstance(fields[k], float) else fields[k] for k in _ADWIN_HEAD_FIELDS[5:]}
    window["buckets"] = buckets
    state = {"params": params, "drift_detected": bool(detector.drift_detected), "window": window}
    tail = _ADWIN_TAIL.unpack_from(raw, pos) if len(raw) == pos + _ADWIN_TAIL.size else None
    window_params = (fields["delta"], fields["clock"], fields["max_buckets"], fields["min_window_length"],
                     fields["grace_period"])
    if (tail != tuple(params.values()) or window_params != tuple(map(float, tail or ()))
            or _adwin_bytes(params, window) != raw):
        raise RuntimeError(f"river {river.__version__}: ADWIN's state is not laid out as this code reads it; "
                           "cannot checkpoint the online learner")
    return state


def _adwin_bytes(params: dict, window: dict) -> bytes:
    head = _ADWIN_HEAD.pack(params["delta"], params["clock"], params["max_buckets"],
                            float(params["min_window_length"]), float(params["grace_period"]),
                            *(_float(window[k]) for k in ("total", "variance", "width", "total_width")),
                            *(window[k] for k in ("n_buckets", "max_n_buckets", "tick", "n_detections")),
                            len(window["buckets"]))
    parts = [head]
    for b in window["buckets"]:
        parts.append(struct.pack("<QQ", params["max_buckets"], b["current_idx"]))
        for column in (b["totals"], b["variances"]):
            parts.append(_U64.pack(len(column)) + struct.pack(f"<{len(column)}d", *map(_float, column)))
    parts.append(_ADWIN_TAIL.pack(*(params[k] for k in ("delta", "clock", "max_buckets", "min_window_length",
                                                        "grace_period"))))
    return b"".join(parts)


def adwin_from_state(state: dict) -> drift.ADWIN:
    """The ADWIN detector :func:`adwin_state` describes, exactly (checked); ``ValueError`` if it is not one."""
    p = state["params"]
    params = {"delta": _float(p["delta"]), "clock": _int(p["clock"], 1, _I32[1]),
              "max_buckets": _int(p["max_buckets"], 1, 10_000),
              "min_window_length": _int(p["min_window_length"], *_I32), "grace_period": _int(p["grace_period"], *_I32)}
    if not 0.0 < params["delta"] < 1.0:
        raise ValueError(f"ADWIN delta {params['delta']} outside (0, 1)")
    w = state["window"]
    window = {k: _float(w[k]) for k in ("total", "variance", "width", "total_width")}
    window |= {k: _int(w[k], *_I32) for k in ("n_buckets", "max_n_buckets", "tick", "n_detections")}
    slots = params["max_buckets"] + 1
    buckets = w["buckets"]
    if not isinstance(buckets, list) or not 1 <= len(buckets) <= _MAX_BUCKET_LEVELS:
        raise ValueError(f"ADWIN window: 1 to {_MAX_BUCKET_LEVELS} bucket levels expected")
    window["buckets"] = []
    for b in buckets:
        totals, variances = b["totals"], b["variances"]
        if not (isinstance(totals, list) and isinstance(variances, list) and len(totals) == len(variances) == slots):
            raise ValueError(f"ADWIN bucket: {slots} totals and variances expected")
        window["buckets"].append({"current_idx": _int(b["current_idx"], 0, params["max_buckets"]),
                                  "totals": [_float(v) for v in totals], "variances": [_float(v) for v in variances]})
    if len(buckets) > 1 and window["buckets"][-1]["current_idx"] == 0:  # river's next cut takes from it
        raise ValueError("ADWIN window: its oldest bucket level is empty")
    points = sum(b["current_idx"] << i for i, b in enumerate(window["buckets"]))
    if window["width"] != float(points):  # river's update indexes the buckets by this
        raise ValueError(f"ADWIN window: width {window['width']} but its buckets hold {points} points")
    raw = _adwin_bytes(params, window)
    detector = drift.ADWIN(**params)
    detector._helper.__setstate__(raw)  # river has no public way to restore a window
    if detector._helper.__getstate__() != raw:
        raise ValueError("ADWIN window: river did not restore the state it was given")
    detector._drift_detected = _bool(state["drift_detected"])  # the next update starts a new window if set
    return detector


def checkpoint_payload(learner: OnlineFraudLearner) -> dict:
    """The learner's whole state as plain data: what :meth:`OnlineFraudLearner.dumps` checksums and stores.

    The river model is rebuilt from the learner's parameters, so only its
    learned state travels: the weights (in river's order), the intercept
    and the optimizer's step count (plain SGD at a constant rate holds
    nothing else); a model configured otherwise could not be rebuilt, and
    is refused here rather than saved wrong.
    """
    model = learner.model
    if model._get_params() != learner.new_model()._get_params():
        raise ValueError("online learner: the river model's configuration differs from the learner's parameters")
    weights = model.weights
    if not all(isinstance(k, str) for k in weights) or not all(isinstance(i, str) for i in learner.learned):
        raise TypeError("online learner: feature names and label ids must be strings to checkpoint")
    return {
        "params": {"lr": float(learner.lr), "l2": float(learner.l2), "miss_weight": float(learner.miss_weight),
                   "base_weight": None if learner.base_weight is None else float(learner.base_weight)},
        "model": {"weights": [[k, _num(v)] for k, v in weights.items()], "intercept": _num(model.intercept),
                  "optimizer_steps": int(model.optimizer.n_iterations)},
        "detectors": {"missed": adwin_state(learner.missed), "false_alarms": adwin_state(learner.false_alarms)},
        "labels_seen": int(learner.labels_seen),
        "learned": list(learner.learned),  # oldest first, as the deque forgets them
        "river": river.__version__,  # for whoever reads the document; not checked
    }


def learner_from_payload(payload: dict) -> OnlineFraudLearner:
    """The learner :func:`checkpoint_payload` describes (types and shapes checked; river's model rebuilt)."""
    p = payload["params"]
    base = p["base_weight"]
    learner = OnlineFraudLearner(lr=_float(p["lr"]), l2=_float(p["l2"]), miss_weight=_float(p["miss_weight"]),
                                 base_weight=None if base is None else _float(base))
    m = payload["model"]
    pairs = m["weights"]
    if not isinstance(pairs, list) or not all(isinstance(kv, list) and len(kv) == 2 and isinstance(kv[0], str)
                                              for kv in pairs):
        raise TypeError("model weights: a list of [feature name, weight] pairs expected")
    if len({k for k, _ in pairs}) != len(pairs):
        raise ValueError("model weights: a feature named twice")
    learner.model._weights.clear()
    for k, v in pairs:
        learner.model._weights[k] = _float(v)
    learner.model.intercept = _float(m["intercept"])
    learner.model.optimizer.n_iterations = _int(m["optimizer_steps"], 0, 2**63 - 1)
    d = payload["detectors"]
    learner.missed, learner.false_alarms = adwin_from_state(d["missed"]), adwin_from_state(d["false_alarms"])
    learner.labels_seen = _int(payload["labels_seen"], 0, 2**63 - 1)
    ids = payload["learned"]
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise TypeError("learned label ids: a list of strings expected")
    learner.learned = deque(ids, maxlen=LEARNED_IDS_KEPT)
    learner._learned_set = set(learner.learned)
    if len(learner._learned_set) != len(learner.learned):  # the set forgets an id when the deque drops it
        raise ValueError("learned label ids: an id listed twice")
    return learner
