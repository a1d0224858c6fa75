"""The query tower's sequence readers (``TwoTowerConfig.sequence``: "gru", "attention"): order, masking, jagged
batches, artifacts."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from kestrel.models.two_tower import QUERY_KEYS, TwoTower, TwoTowerConfig, jagged, load_artifact
from kestrel.offline.recs_train import train_two_tower

CONFIG = TwoTowerConfig(n_items=10, n_categories=3, user_buckets=11, oov_item_buckets=3, table_dim=8, output_dim=8,
                        hidden_dim=16, sequence="gru")


def _rows(histories: list[list[int]]) -> object:
    """A query KJT for rows whose only varying feature is the history (newest first)."""
    n = len(histories)
    return jagged(QUERY_KEYS, [[[1]] * n, histories, [h[:3] for h in histories], [[1]] * n, [[0]] * n])


def _reader(kind: str) -> tuple[TwoTower, object]:
    torch.manual_seed(0)
    model = TwoTower(dataclasses.replace(CONFIG, sequence=kind))
    return model, model._history_state if kind == "gru" else model._history_attention


@pytest.mark.parametrize("kind", ["gru", "attention"])
@torch.no_grad()
def test_order_matters_and_an_empty_history_gives_a_zero_state(kind):
    _, read = _reader(kind)
    forward, backward, empty = read(_rows([[3, 4, 5], [5, 4, 3], []]))
    assert not torch.allclose(forward, backward)  # the same bag in another order reads differently
    assert torch.count_nonzero(empty) == 0


@pytest.mark.parametrize("kind", ["gru", "attention"])
@torch.no_grad()
def test_a_row_reads_the_same_alone_or_beside_longer_rows(kind):
    model, read = _reader(kind)
    model.eval()
    alone = read(_rows([[2, 7]]))
    batched = read(_rows([[9, 8, 7, 6, 5, 4], [2, 7], [1]]))
    assert torch.allclose(alone[0], batched[1], atol=1e-6)  # padding to the longest row changes nothing
    assert torch.allclose(model.query(_rows([[2, 7]]))[0], model.query(_rows([[9, 8, 7], [2, 7]]))[1], atol=1e-6)


def test_unknown_sequence_kinds_are_refused():
    with pytest.raises(ValueError, match="sequence"):
        TwoTower(dataclasses.replace(CONFIG, sequence="lstm"))


@pytest.mark.parametrize("kind", ["gru", "attention"])
def test_a_trained_sequence_tower_saves_and_loads_to_the_same_queries(tmp_path, kind):
    rng = np.random.default_rng(2)
    rows = [(f"u{u}", f"i{(u % 3) * 5 + int(rng.integers(5))}", 60.0 * j + u, str(u % 3))
            for u in range(30) for j in range(8)]
    df = pd.DataFrame(rows, columns=["user", "item", "time", "category"]).sort_values("time")
    art = train_two_tower(df, dim=8, epochs=2, batch_size=32, history_len=6, progress=False,
                          config_overrides={"sequence": kind, "user_buckets": 31, "oov_item_buckets": 5,
                                            "hidden_dim": 16})
    loaded = load_artifact(art.save(tmp_path))
    assert loaded.model.config.sequence == kind
    recent = [["i1", "i2", "i3"], ["i7"]]
    assert np.allclose(art.encoder().encode(["u1", "u2"], recent, 0.0),
                       loaded.encoder().encode(["u1", "u2"], recent, 0.0), atol=1e-6)
