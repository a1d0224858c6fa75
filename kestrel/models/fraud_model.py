"""The deployed fraud model: torch network + river learner, combined and calibrated.

``score = sigmoid(w_base · (a·z_torch + b) + Σ w_i · x_i)``: the torch logit,
calibrated by Platt scaling, is the base log-odds; a river logistic layer
over that base and the same (standardised) inputs turns it into the score.
The layer starts as the identity (``w_base = 1``, the rest 0, intercept
frozen), is warm-started on held-out training traffic, and then learns from
every label as it arrives: a new fraud pattern the network never saw moves
the weights of the inputs that mark it within a few labels, while the
network keeps ranking everything it knows. Reason codes are each input's
share of the log-odds (torch gradient × input × ``w_base`` plus ``w_i · x_i``),
worded with the payment's own values.

An artifact is a directory: ``model.pt`` (network weights), ``online.pkl``
(the river learner's starting state) and ``meta.json`` (version, inputs,
calibration, reference scores for alert budgets, training report).
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

from kestrel.models.device import pick_device
from kestrel.models.fraud_features import INPUT_NAMES, INPUTS, input_dict, model_inputs
from kestrel.models.fraud_online import BASE, OnlineFraudLearner
from kestrel.models.fraud_torch import LINEAR_KEYS, FraudNet, logits, logits_and_attributions, standardise_rows
from kestrel.models.policy import Policy
from kestrel.models.scoring import FraudScore, Reason, Thresholds

TOP_REASONS = 3


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))


@dataclass
class FraudModel:
    version: str
    net: FraudNet
    platt: tuple[float, float]
    online: OnlineFraudLearner  # the stacked learner's starting state (each partition gets a copy)
    reference_scores: np.ndarray
    payments_per_day: float
    report: dict[str, Any] = field(default_factory=dict)

    # -- inference -------------------------------------------------------------
    def standardised(self, x: np.ndarray) -> np.ndarray:
        return standardise_rows(x, self.net.mean.cpu().numpy(), self.net.std.cpu().numpy()).astype(np.float32)

    def online_inputs(self, x: np.ndarray, base_logits: np.ndarray | None = None) -> list[dict[str, float]]:
        """River's input dicts: standardised inputs, plus the torch base log-odds when given."""
        rows = [input_dict(row) for row in self.standardised(x)]
        if base_logits is not None:
            for row, base in zip(rows, base_logits, strict=True):
                row[BASE] = float(base)
        return rows

    def base_logits(self, x: np.ndarray) -> np.ndarray:
        a, b = self.platt
        return a * logits(self.net, x) + b

    def torch_probability(self, x: np.ndarray) -> np.ndarray:
        return _sigmoid(self.base_logits(x))

    def score_arrays(self, x: np.ndarray, learner: OnlineFraudLearner) -> tuple[np.ndarray, np.ndarray]:
        """Scores and per-input log-odds contributions, (n,) and (n, d), with the given river layer.

        The river layer is evaluated as one matrix product (the same logistic
        function river's ``predict_proba_one`` computes), not one dict at a
        time: a micro-batch costs one pass.
        """
        z, attr = logits_and_attributions(self.net, x)
        a, b = self.platt
        w, w_base, intercept = learner.weight_vector(INPUT_NAMES)
        river = self.standardised(x).astype(np.float64) * w
        scores = _sigmoid(river.sum(axis=1) + w_base * (a * z + b) + intercept)
        return scores, w_base * a * attr + river

    # -- artifact ----------------------------------------------------------------
    def save(self, directory: str | os.PathLike[str]) -> Path:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        torch.save({"state": self.net.state_dict(), "hidden": list(self.net.hidden), "members": len(self.net.mlps)},
                   path / "model.pt")
        (path / "online.pkl").write_bytes(self.online.dumps())
        meta = {"version": self.version, "inputs": list(INPUT_NAMES), "platt": list(self.platt),
                "payments_per_day": self.payments_per_day,
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
        net = FraudNet(len(INPUT_NAMES), tuple(blob["hidden"]), int(blob["members"]))
        loaded = net.load_state_dict(blob["state"], strict=False)
        if loaded.unexpected_keys or set(loaded.missing_keys) - LINEAR_KEYS:
            raise ValueError(f"{path}: model.pt does not match the network (missing {loaded.missing_keys}, "
                             f"unexpected {loaded.unexpected_keys})")
        net.to(device or pick_device()).eval()
        return FraudModel(meta["version"], net, tuple(meta["platt"]),
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
    """The :class:`~kestrel.models.scoring.FraudScorer` of a trained :class:`FraudModel`.

    ``learner`` is the online layer to score with (the workers' shared one);
    without it the artifact's own starting state is used.
    """

    def __init__(self, model: FraudModel, policy: Policy | None = None) -> None:
        self.model = model
        self.version = model.version
        self.policy = policy or Policy.from_env()
        self.thresholds: Thresholds = self.policy.thresholds(model.reference_scores, model.payments_per_day)

    def new_learner(self) -> OnlineFraudLearner:
        return OnlineFraudLearner.loads(self.model.online.dumps())

    def score_batch(self, events: Sequence[Any], features: Sequence[Mapping[str, Any]],
                    learner: OnlineFraudLearner | None = None) -> list[FraudScore]:
        if not features:
            return []
        x = model_inputs(features)
        scores, contrib = self.model.score_arrays(x, learner or self.model.online)
        out = []
        tops = np.argsort(-contrib, axis=1)[:, :TOP_REASONS]
        for f, p, c, order in zip(features, scores, contrib, tops, strict=True):
            top = [i for i in order if c[i] > 0.05]
            reasons = tuple(Reason(INPUTS[i].name, INPUTS[i].explain(f), round(float(INPUTS[i].raw_of(f)), 4),
                                   round(float(c[i]), 3)) for i in top)
            score = round(float(p), 6)
            out.append(FraudScore(score, self.thresholds.action(score), reasons))
        return out
