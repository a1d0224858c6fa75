"""Two-tower model: jagged features, tower shapes, unknown ids, training signal, artifact round trip."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from kestrel.models.two_tower import (
    QUERY_KEYS,
    UNKNOWN_USER,
    TwoTower,
    TwoTowerConfig,
    embed_items,
    jagged,
    load_artifact,
    stable_hash,
)
from kestrel.offline.recs_data import recent_distinct, temporal_split, training_examples
from kestrel.offline.recs_train import train_two_tower


def _toy_interactions(n_users: int = 60, per_user: int = 12, n_cats: int = 4, items_per_cat: int = 8,
                      seed: int = 0) -> pd.DataFrame:
    """Each user only ever touches one category: a structure a working model must find."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        cat = u % n_cats
        for j in range(per_user):
            item = cat * items_per_cat + int(rng.integers(items_per_cat))
            rows.append((f"u{u}", f"i{item}", 1000.0 * u + j, str(cat)))
    df = pd.DataFrame(rows, columns=["user", "item", "time", "category"])
    return df.sort_values("time", kind="stable").reset_index(drop=True)


def test_jagged_features_keep_per_row_lengths_and_values_in_key_order():
    kjt = jagged(["a", "b"], [[[1, 2], [], [3]], np.array([[4, -1], [5, 6], [-1, -1]])])
    assert kjt.keys() == ["a", "b"]
    assert kjt["a"].lengths().tolist() == [2, 0, 1]
    assert kjt["a"].values().tolist() == [1, 2, 3]
    assert kjt["b"].lengths().tolist() == [1, 2, 0]
    assert kjt["b"].values().tolist() == [4, 5, 6]


def test_towers_give_unit_vectors_and_empty_histories_are_allowed():
    config = TwoTowerConfig(n_items=10, n_categories=3, user_buckets=7, oov_item_buckets=5, table_dim=8,
                            output_dim=8, hidden_dim=16, history_len=4)
    model = TwoTower(config)
    q_kjt = jagged(QUERY_KEYS, [[[1], [UNKNOWN_USER]], [[1, 2, 3], []], [[1], []], [[1, 2], []], [[5], [6]]])
    q = model.query(q_kjt)
    assert q.shape == (2, 8)
    assert torch.allclose(q.norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.isfinite(q).all()


def test_recent_distinct_matches_the_feature_store_last_n():
    assert recent_distinct(["a", "b", "a", "c", "b"], 3) == ["b", "c", "a"]
    assert recent_distinct(["a", "b", "c"], 2) == ["c", "b"]


def test_training_examples_are_first_interactions_with_the_history_before_them():
    df = pd.DataFrame({"user": ["u"] * 4, "item": ["a", "b", "a", "c"], "time": [1.0, 2.0, 3.0, 4.0],
                       "category": ""})
    ex = training_examples(df, history_len=5)
    assert ex.targets.tolist() == ["a", "b", "c"]
    assert ex.history == [[], ["a"], ["a", "b"]]


def test_temporal_split_holds_out_each_users_last_fifth_and_only_new_known_items():
    df = _toy_interactions(n_users=8, per_user=10)
    train, held = temporal_split(df)
    for user, items in held.items():
        mine = df[df["user"] == user].sort_values("time")
        cutoff = mine["time"].iloc[-2]  # last 20% of 10 interactions = 2
        assert (train[train["user"] == user]["time"] < cutoff).all()
        assert items.isdisjoint(set(train[train["user"] == user]["item"]))
        assert items <= set(train["item"])


def test_trained_model_ranks_the_users_category_first_and_handles_unseen_ids(tmp_path):
    df = _toy_interactions()
    art = train_two_tower(df, dim=16, epochs=15, batch_size=64, lr=1e-2, history_len=8, progress=False,
                          config_overrides={"user_buckets": 101, "oov_item_buckets": 7, "hidden_dim": 32})
    enc = art.encoder()
    cat_of = dict(zip(art.vocab.item_ids, art.vocab.item_category, strict=True))
    # An unseen user with a history in category 2 only: the top items should be category 2.
    hist = [i for i in art.vocab.item_ids if cat_of[i] == "2"][:3]
    q = enc.encode(["never-seen-user"], [hist], now=0.0)
    assert art.vocab.user_bucket("never-seen-user") == UNKNOWN_USER
    scores = art.item_embeddings @ q[0]
    top = [art.vocab.item_ids[r] for r in np.argsort(-scores)[:8]]
    assert sum(cat_of[i] == "2" for i in top) >= 6
    # Items never seen in training still embed (hashed id bucket + category attribute).
    new = embed_items(art.model, art.vocab, ["brand-new-item"], categories=["2"])
    assert new.shape == (1, art.model.config.index_dim) and np.isfinite(new).all()
    assert art.vocab.item_row("brand-new-item") >= art.model.config.n_items
    # Artifact: versioned folder + CURRENT pointer; reload gives the same vectors.
    folder = art.save(tmp_path)
    assert (tmp_path / "CURRENT").read_text().strip() == art.version == folder.name
    again = load_artifact(tmp_path, device=torch.device("cpu"))
    assert again.version == art.version
    np.testing.assert_allclose(again.encoder().encode(["never-seen-user"], [hist], now=0.0), q, atol=1e-5)
    np.testing.assert_allclose(again.item_embeddings, art.item_embeddings)


def test_stable_hash_is_stable_and_load_refuses_a_missing_model(tmp_path):
    assert stable_hash("user_1") == stable_hash("user_1") != stable_hash("user_2")
    with pytest.raises(FileNotFoundError):
        load_artifact(tmp_path)
