"""The deployed fraud model: torch network + river learner, combined and calibrated.

``score = sigmoid(w_t · (a·z_torch + b) + w_r · logit(p_river) + c)``: the
torch logit calibrated by Platt scaling, the online learner's log-odds, and a
stacking layer fitted on held-out traffic, so the output is a probability an
operator's policy can threshold. Reason codes are each input's share of that
log-odds (torch gradient × input plus river weight × input), worded with the
payment's own values.

An artifact is a directory: ``model.pt`` (network weights), ``online.pkl``
(the river learner's starting state) and ``meta.json`` (version, inputs,
calibration, combiner, reference scores for alert budgets, training report).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.device import pick_device
from models.fraud_features import INPUT_NAMES, INPUTS, input_dict, model_inputs
from models.fraud_online import OnlineFraudLearner, sigmoid_logit
from models.fraud_torch import FraudNet, logits, logits_and_attributions
from models.policy import Policy
from models.scoring import FraudScore, Reason, Thresholds

TOP_REASONS = 3


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))


@dataclass
class FraudModel:
    version: str
    net: FraudNet
    platt: tuple[float, float]
    combiner: tuple[float, float, float]  # w_torch, w_river, bias
    online: OnlineFraudLearner
    reference_scores: np.ndarray
    payments_per_day: float
    report: dict[str, Any] = field(default_factory=dict)

    # -- inference -------------------------------------------------------------
    def standardised(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.net.mean.cpu().numpy()) / self.net.std.cpu().numpy()).astype(np.float32)

    def online_inputs(self, x: np.ndarray) -> list[dict[str, float]]:
        return [input_dict(row) for row in self.standardised(x)]

    def combine(self, z_torch: np.ndarray, p_river: np.ndarray) -> np.ndarray:
        a, b = self.platt
        wt, wr, c = self.combiner
        return _sigmoid(wt * (a * z_torch + b) + wr * sigmoid_logit(p_river) + c)

    def torch_probability(self, x: np.ndarray) -> np.ndarray:
        a, b = self.platt
        return _sigmoid(a * logits(self.net, x) + b)

    def score_arrays(self, x: np.ndarray, learners: Sequence[OnlineFraudLearner]) -> tuple[np.ndarray, np.ndarray]:
        """Combined probabilities and per-input log-odds contributions, (n,) and (n, d)."""
        z, attr = logits_and_attributions(self.net, x)
        xs = self.online_inputs(x)
        p_river = np.array([learner.predict([xi])[0] for learner, xi in zip(learners, xs, strict=True)])
        a, _ = self.platt
        wt, wr, _ = self.combiner
        river_contrib = np.array([[learner.contributions(xi).get(name, 0.0) for name in INPUT_NAMES]
                                  for learner, xi in zip(learners, xs, strict=True)]).reshape(len(xs), len(INPUTS))
        return self.combine(z, p_river), wt * a * attr + wr * river_contrib

    # -- artifact ----------------------------------------------------------------
    def save(self, directory: str | os.PathLike[str]) -> Path:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        torch.save({"state": self.net.state_dict(), "hidden": list(self.net.hidden)}, path / "model.pt")
        (path / "online.pkl").write_bytes(self.online.dumps())
        meta = {"version": self.version, "inputs": list(INPUT_NAMES), "platt": list(self.platt),
                "combiner": list(self.combiner), "payments_per_day": self.payments_per_day,
                "reference_scores": [round(float(s), 6) for s in self.reference_scores], "report": self.report}
        (path / "meta.json").write_text(json.dumps(meta, indent=1))
        return path

    @staticmethod
    def load(directory: str | os.PathLike[str], device: torch.device | None = None) -> FraudModel:
        path = Path(directory)
        meta = json.loads((path / "meta.json").read_text())
        if tuple(meta["inputs"]) != INPUT_NAMES:
            raise ValueError(f"{path}: model inputs {meta['inputs']} differ from this code's {list(INPUT_NAMES)}")
        blob = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
        net = FraudNet(len(INPUT_NAMES), tuple(blob["hidden"]))
        net.load_state_dict(blob["state"])
        net.to(device or pick_device()).eval()
        return FraudModel(meta["version"], net, tuple(meta["platt"]), tuple(meta["combiner"]),
                          OnlineFraudLearner.loads((path / "online.pkl").read_bytes()),
                          np.asarray(meta["reference_scores"], dtype=np.float64), float(meta["payments_per_day"]),
                          meta.get("report", {}))


def latest_artifact(root: str | os.PathLike[str]) -> Path | None:
    """The newest artifact under ``root`` (versions sort by time), or ``root`` itself if it is one."""
    base = Path(root)
    if (base / "meta.json").exists():
        return base
    found = sorted(p.parent for p in base.glob("*/meta.json"))
    return found[-1] if found else None


class ModelScorer:
    """The :class:`~models.scoring.FraudScorer` of a trained :class:`FraudModel`.

    ``learners`` (one per event) are the online learners of the events'
    partitions; without them the artifact's own starting state is used.
    """

    def __init__(self, model: FraudModel, policy: Policy | None = None) -> None:
        self.model = model
        self.version = model.version
        self.policy = policy or Policy.from_env()
        self.thresholds: Thresholds = self.policy.thresholds(model.reference_scores, model.payments_per_day)

    def new_learner(self) -> OnlineFraudLearner:
        return OnlineFraudLearner.loads(self.model.online.dumps())

    def score_batch(self, events: Sequence[Any], features: Sequence[Mapping[str, Any]],
                    learners: Sequence[OnlineFraudLearner] | None = None) -> list[FraudScore]:
        if not features:
            return []
        x = model_inputs(features)
        scores, contrib = self.model.score_arrays(x, learners or [self.model.online] * len(features))
        out = []
        for f, p, c in zip(features, scores, contrib, strict=True):
            top = [i for i in np.argsort(-c)[:TOP_REASONS] if c[i] > 0.05]
            reasons = tuple(Reason(INPUTS[i].name, INPUTS[i].explain(f), round(float(INPUTS[i].raw_of(f)), 4),
                                   round(float(c[i]), 3)) for i in top)
            score = round(float(p), 6)
            out.append(FraudScore(score, self.thresholds.action(score), reasons))
        return out
