"""Train a recommendation candidate for the registry, and measure it and the champion on the same split.

Each user's newest interactions are held out (the per-user temporal split of
``kestrel eval recs``); the candidate trains on the rest. The candidate and
the champion are ranked through the serving path on the same users and
held-out items (:func:`~kestrel.offline.recs_eval.two_tower_metrics`): an
item the champion's catalogue does not know is a miss for it, as it would
be live. Their numbers go into the candidate's record, and the gate
(:mod:`kestrel.models.gate`, policy ``recs``: Recall@20, retrieval p99)
compares exactly these. The champion may have been trained on interactions
the split holds out; the record says when (``champion_saw_window``), which
favours the champion and so only makes the gate stricter.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from kestrel.models.registry import ModelRecord, Registry, code_version
from kestrel.models.two_tower import RecsArtifact, load_artifact
from kestrel.offline.recs_data import temporal_split
from kestrel.offline.recs_eval import two_tower_metrics
from kestrel.offline.recs_hybrid import with_blend
from kestrel.offline.recs_train import train_two_tower
from kestrel.offline.run_report import recs_plots, report_plots

Progress = Callable[[str], None]
GATE_METRICS = ("recall_at_10", "recall_at_20", "ndcg_at_10", "coverage_at_10", "retrieval_p99_ms")


def _gate_view(metrics: dict[str, Any]) -> dict[str, float]:
    """The metrics a recs record carries, named as the gate's policy reads them (``p99_ms``)."""
    out = {k: round(float(metrics[k]), 4) for k in GATE_METRICS}
    out["p99_ms"] = out.pop("retrieval_p99_ms")
    return out


def train_recs_candidate(df: pd.DataFrame, registry: Registry, out_root: str | Path, *, alias: str = "champion",
                         epochs: int = 8, dim: int = 64, batch_size: int = 512, lr: float = 3e-3, seed: int = 7,
                         user_ids: str = "raw", progress: Progress | None = None,
                         sequence: str | None = None) -> tuple[RecsArtifact, ModelRecord]:
    """Train on all but each user's newest interactions, measure candidate and ``alias`` there, register.

    Registering promotes nothing: ``kestrel models promote --kind recs`` (or
    ``train recs --promote``) asks the gate. ``user_ids``: how ``df`` names
    users ("tokens" from the archive, "raw" ids otherwise), kept in the
    artifact so that serving looks users up the same way.
    """
    say = progress or (lambda _m: None)
    train, held = temporal_split(df)
    if len(held) < 20:
        raise ValueError(f"the gate's split holds {len(held)} users out: need 20+ users with 5+ interactions")
    say(f"gate split: {len(held):,} users' newest interactions held out of {len(df):,}")
    def tower(frame: pd.DataFrame) -> RecsArtifact:
        return train_two_tower(frame, dim=dim, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, progress=False,
                               config_overrides={"sequence": sequence} if sequence else None)

    art = with_blend(tower(train), train, tower, log=say)  # the served form: the tower and EASE blended
    measured = two_tower_metrics(art, train, held, seed=seed)
    metrics = _gate_view(measured)
    curves = {f"candidate {art.version}": measured["recall_at_k"]}
    say(f"candidate {art.version} on the split: {metrics}")
    pairs = pd.MultiIndex.from_tuples([(u, i) for u, items in held.items() for i in items])
    held_times = df["time"][pd.MultiIndex.from_arrays([df["user"].astype(str), df["item"]]).isin(pairs)]
    window = {"users": len(held), "held_out": len(pairs), "first_event": float(held_times.min()),
              "last_event": float(held_times.max())}
    evaluation: dict[str, Any] = {"window": window, "training": {
        "epochs": epochs, "dim": dim, "examples": art.metadata.get("examples"),
        "train_seconds": art.metadata.get("train_seconds")}}
    parent = registry.aliases().get(alias)
    if parent is not None:
        record = registry.get(parent)
        record.verify()
        champion_measured = two_tower_metrics(load_artifact(record.path), train, held, seed=seed)
        curves[f"champion {parent}"] = champion_measured["recall_at_k"]
        evaluation.update(champion=parent, champion_metrics=_gate_view(champion_measured),
                          champion_saw_window=float(record.data_range.get("last_event", 0.0))
                          >= window["first_event"])
        say(f"champion {parent} on the same split: {evaluation['champion_metrics']}")
    art.metadata["user_ids"] = user_ids
    folder = art.save(out_root)
    evaluation["plots"] = report_plots(
        lambda plots: recs_plots(plots, curves, art.metadata.get("loss_per_epoch", [])), folder, say)
    record = registry.register(ModelRecord.new(
        "recs", art.version, folder, metrics=metrics, validation_window=window,
        data_range={"first_event": float(train["time"].min()), "last_event": float(train["time"].max()),
                    "rows": len(train)},
        code_version=code_version(), parent=parent, seed=seed, evaluation=evaluation))
    return art, record
