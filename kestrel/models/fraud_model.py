"""The deployed fraud model: torch network and boosted trees, a river learner on top, calibrated.

``score = sigmoid(w_base · base + Σ w_i · x_i)``. The base log-odds come
from the members (:class:`Combination`): the torch network's logit and the
trees' log-odds (:mod:`kestrel.models.fraud_trees`), each calibrated by
Platt scaling and averaged, or one member alone, as the trainer's fixed rule
chose on the validation window. A river logistic layer over that base and
the same (standardised) inputs turns it into the score.
The layer starts as the identity (``w_base = 1``, the rest 0, intercept
frozen), is warm-started on held-out training traffic, and then learns from
every label as it arrives: a new fraud pattern the network never saw moves
the weights of the inputs that mark it within a few labels, while the
network keeps ranking everything it knows. Reason codes are each input's
share of the log-odds (the network's gradient × input and the trees' path
contributions, each scaled by its share of the base, times ``w_base``, plus
``w_i · x_i``), worded with the payment's own values.

An artifact is a directory: ``model.pt`` (network weights), ``trees.npz``
(the tree member's node arrays, when it has one), ``online.pkl`` (the river
learner's starting state) and ``meta.json`` (version, inputs, the
combination, reference scores for alert budgets, training report).
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
from kestrel.models.fraud_trees import TreeEnsemble
from kestrel.models.policy import Policy
from kestrel.models.scoring import FraudScore, Reason, Thresholds

TOP_REASONS = 3


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))


@dataclass(frozen=True)
class Combination:
    """How the members' log-odds make the base log-odds (chosen by ``kestrel.offline.fraud_train.select_members``).

    Each member is calibrated (Platt: ``a·z + b``), the calibrated log-odds
    are averaged with ``weights`` (network, trees), and the average is
    calibrated again (``outer``): an average of calibrated log-odds is more
    confident than either. A member of weight 0 is not scored at all.

    >>> Combination(network=(2.0, -1.0)).base(np.array([1.0]), None)
    array([1.])
    >>> c = Combination(network=(1.0, 0.0), trees=(2.0, 0.0), weights=(0.5, 0.5), outer=(2.0, -1.0))
    >>> c.base(np.array([1.0]), np.array([1.0]))
    array([2.])
    """

    network: tuple[float, float] = (1.0, 0.0)
    trees: tuple[float, float] = (1.0, 0.0)
    weights: tuple[float, float] = (1.0, 0.0)
    outer: tuple[float, float] = (1.0, 0.0)

    def slopes(self) -> tuple[float, float]:
        """d(base)/d(member logit), network and trees: how each member's own contributions scale into the base."""
        return (self.outer[0] * self.weights[0] * self.network[0], self.outer[0] * self.weights[1] * self.trees[0])

    def base(self, z_network: np.ndarray | None, z_trees: np.ndarray | None) -> np.ndarray:
        mixed = 0.0
        if self.weights[0] > 0:
            mixed = mixed + self.weights[0] * (self.network[0] * z_network + self.network[1])
        if self.weights[1] > 0:
            mixed = mixed + self.weights[1] * (self.trees[0] * z_trees + self.trees[1])
        return self.outer[0] * mixed + self.outer[1]

    def to_json(self) -> dict[str, list[float]]:
        return {name: list(getattr(self, name)) for name in ("network", "trees", "weights", "outer")}

    @staticmethod
    def from_json(blob: dict[str, list[float]]) -> Combination:
        return Combination(**{name: tuple(float(v) for v in blob[name]) for name in blob})  # type: ignore[arg-type]


@dataclass
class FraudModel:
    version: str
    net: FraudNet
    combination: Combination
    online: OnlineFraudLearner  # the stacked learner's starting state (each partition gets a copy)
    reference_scores: np.ndarray
    payments_per_day: float
    report: dict[str, Any] = field(default_factory=dict)
    trees: TreeEnsemble | None = None

    def __post_init__(self) -> None:
        if self.combination.weights[1] > 0 and self.trees is None:
            raise ValueError("the combination weighs a tree member the model does not have")

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
        """The members' combined, calibrated log-odds: the river layer's base input."""
        c = self.combination
        return c.base(logits(self.net, x) if c.weights[0] > 0 else None,
                      self.trees.log_odds(x) if c.weights[1] > 0 and self.trees is not None else None)

    def network_probability(self, x: np.ndarray) -> np.ndarray:
        """The network member alone, calibrated (an ablation the evaluation reports)."""
        a, b = self.combination.network
        return _sigmoid(a * logits(self.net, x) + b)

    def trees_probability(self, x: np.ndarray) -> np.ndarray | None:
        """The tree member alone, calibrated; ``None`` without one."""
        if self.trees is None:
            return None
        a, b = self.combination.trees
        return _sigmoid(a * self.trees.log_odds(x) + b)

    def score_arrays(self, x: np.ndarray, learner: OnlineFraudLearner) -> tuple[np.ndarray, np.ndarray]:
        """Scores and per-input log-odds contributions, (n,) and (n, d), with the given river layer.

        The river layer is evaluated as one matrix product (the same logistic
        function river's ``predict_proba_one`` computes), not one dict at a
        time: a micro-batch costs one pass.
        """
        c = self.combination
        slope_net, slope_trees = c.slopes()
        z_net = z_trees = None
        members = 0.0
        if c.weights[0] > 0:
            z_net, attr = logits_and_attributions(self.net, x)
            members = members + slope_net * attr
        if c.weights[1] > 0 and self.trees is not None:
            z_trees, paths = self.trees.log_odds_and_contributions(x)
            members = members + slope_trees * paths
        w, w_base, intercept = learner.weight_vector(INPUT_NAMES)
        river = self.standardised(x).astype(np.float64) * w
        scores = _sigmoid(river.sum(axis=1) + w_base * c.base(z_net, z_trees) + intercept)
        return scores, w_base * members + river

    # -- artifact ----------------------------------------------------------------
    def save(self, directory: str | os.PathLike[str]) -> Path:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        torch.save({"state": self.net.state_dict(), "hidden": list(self.net.hidden), "members": len(self.net.mlps)},
                   path / "model.pt")
        if self.trees is not None:
            (path / "trees.npz").write_bytes(self.trees.to_bytes())
        (path / "online.pkl").write_bytes(self.online.dumps())
        meta = {"version": self.version, "inputs": list(INPUT_NAMES), "combination": self.combination.to_json(),
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
        device = device or pick_device()
        net.to(device).eval()
        trees = None
        if (path / "trees.npz").exists():
            trees = TreeEnsemble.from_bytes((path / "trees.npz").read_bytes())
            if trees.n_features != len(INPUT_NAMES):
                raise ValueError(f"{path}: trees.npz splits {trees.n_features} inputs, not {len(INPUT_NAMES)}")
            trees.to(None if device.type == "cpu" else device)
        # an artifact from before the tree member keeps the network's calibration under "platt"
        combination = (Combination.from_json(meta["combination"]) if "combination" in meta
                       else Combination(network=tuple(meta["platt"])))
        return FraudModel(meta["version"], net, combination,
                          OnlineFraudLearner.loads((path / "online.pkl").read_bytes()),
                          np.asarray(meta["reference_scores"], dtype=np.float64), float(meta["payments_per_day"]),
                          meta.get("report", {}), trees)


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
