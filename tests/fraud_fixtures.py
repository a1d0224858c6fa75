"""A small fraud model trained on simulated history, shared by unit and integration tests."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from kestrel.models.fraud_model import FraudModel
from kestrel.offline.fraud_dataset import SIMULATED_COLUMNS, feature_rows, payments_of, read_history
from kestrel.offline.fraud_train import train_on_simulated_history
from kestrel.offline.simulator import write_history

HISTORY_COLUMNS = dataclasses.replace(SIMULATED_COLUMNS, segment="scenario")


def simulated_frame(path: Path, days: float, per_day: float, seed: int, **kwargs: object):
    write_history(str(path), days, per_day, seed=seed, n_cards=1000, **kwargs)  # type: ignore[arg-type]
    return read_history(path, HISTORY_COLUMNS)


def train_small_model(directory: Path) -> tuple[FraudModel, Path]:
    """Four simulated days (default fraud mix, no account takeover), a few epochs: seconds on 2 cores."""
    model = train_on_simulated_history(directory / "artifacts", days=4, payments_per_day=3000, seed=1, epochs=8)
    return model, directory / "artifacts" / model.version


def rows_and_inputs(frame) -> tuple[list[dict], np.ndarray]:
    from kestrel.models.fraud_features import model_inputs

    rows = feature_rows(payments_of(frame), np.full(len(frame), np.nan))
    return rows, model_inputs(rows)
