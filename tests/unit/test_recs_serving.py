"""The serving logic without I/O: filters, fallback for cold start, request parsing, diversity."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from kestrel.feature_store.keys import KeyedHasher, KeySpace
from kestrel.models.hybrid_recs import ItemItem
from kestrel.models.retrieval import build_snapshot
from kestrel.models.two_tower import load_artifact
from kestrel.offline.recs_train import train_two_tower
from kestrel.streams.recs.service import FALLBACK, PERSONALISED, RecommendationService, RecOptions, _Live, parse_request


@pytest.fixture(scope="module")
def service() -> RecommendationService:
    rng = np.random.default_rng(1)
    rows = []
    for u in range(40):
        cat = u % 4
        rows += [(f"u{u}", f"i{cat * 10 + int(rng.integers(10))}", 100.0 * u + j, str(cat)) for j in range(10)]
    df = pd.DataFrame(rows, columns=["user", "item", "time", "category"])
    art = train_two_tower(df.sort_values("time"), dim=16, epochs=10, batch_size=64, lr=1e-2, history_len=8,
                          progress=False, config_overrides={"user_buckets": 101, "oov_item_buckets": 7,
                                                            "hidden_dim": 32})
    snap = build_snapshot(art.vocab.item_ids, art.item_embeddings, art.version)
    live = _Live(art, dict(zip(art.vocab.item_ids, art.vocab.item_category, strict=True)))
    svc = RecommendationService(client=None, keys=KeySpace("t"), hasher=KeyedHasher(b"k"))  # type: ignore[arg-type]
    svc.holder.swap(dataclasses.replace(snap, extra=live, row_of=snap.row_of))
    return svc


def test_history_gives_personalised_items_minus_seen_and_excluded(service):
    trending = ["i0", "i11", "i22"]
    (res,) = service.rank(["u1"], [["i12", "i13"]], [{"i12", "i13", "i14"}], trending, {"i15"},
                          [RecOptions(5, exclude=("i16",))])
    assert res.path == PERSONALISED and res.model_version.startswith("two-tower-")
    assert len(res.items) == 5 and not {"i12", "i13", "i14", "i15", "i16"} & set(res.items)
    cats = Counter(service.holder.current.extra.category_of[i] for i in res.items)
    assert cats.most_common(1)[0][0] == "1"  # the history's category leads


def test_cold_start_and_fallback_only_take_trending_minus_seen(service):
    trending = ["i0", "i11", "i22", "i33"]
    cold, forced = service.rank(["new", "u1"], [[], ["i12"]], [set(), {"i12", "i0"}], trending, {"i11"},
                                [RecOptions(2), RecOptions(2, fallback_only=True)])
    assert cold.path == FALLBACK and cold.items == ["i0", "i22"] and cold.model_version == "popularity-v1"
    assert forced.path == FALLBACK and forced.items == ["i22", "i33"]


def test_no_model_means_fallback_for_everyone():
    svc = RecommendationService(client=None, keys=KeySpace("t"), hasher=KeyedHasher(b"k"))  # type: ignore[arg-type]
    (res,) = svc.rank(["u"], [["i1"]], [{"i1"}], ["i1", "i2"], set(), [RecOptions(3)])
    assert res.path == FALLBACK and res.items == ["i2"] and svc.version == "popularity-v1"


def _serving(service: RecommendationService, part: ItemItem, root) -> RecommendationService:
    """A service whose artifact carries ``part``, through a save and a load (as a worker gets it)."""
    snap = service.holder.current
    live: _Live = snap.extra
    loaded = load_artifact(dataclasses.replace(live.artifact, item_item=part).save(root))
    svc = RecommendationService(client=None, keys=KeySpace("t"), hasher=KeyedHasher(b"k"))  # type: ignore[arg-type]
    svc.holder.swap(dataclasses.replace(snap, extra=_Live(loaded, live.category_of), row_of=snap.row_of))
    return svc


def test_the_hybrid_blends_ease_weights_summed_over_the_seen_items(service, tmp_path):
    row = service.holder.current.row_of
    n = service.holder.current.size
    w = np.zeros((n, n), dtype=np.float32)
    w[row["i12"], row["i39"]], w[row["i12"], row["i38"]] = 5.0, 1.0  # i12 recommends two items of another category
    weights = sp.csr_matrix(w)
    ease_only = _serving(service, ItemItem(weights, 1.0), tmp_path / "ease")
    assert ease_only.holder.current.extra.artifact.item_item.weights.nnz == 2  # saved beside the tower, loaded
    args = (["u1"], [["i12"]], [{"i12"}], [], set(), [RecOptions(3)])
    (res,) = ease_only.rank(*args)
    assert res.path == PERSONALISED and res.items[:2] == ["i39", "i38"]  # weight 1: EASE's order
    (tower,) = _serving(service, ItemItem(weights, 0.0), tmp_path / "tower").rank(*args)
    assert tower.items == service.rank(*args)[0].items  # weight 0: the tower's order, as without the part
    clicked_now = (["u1"], [["i12"]], [set()], [], set(), [RecOptions(3)])  # i12 newest, not yet in seen
    (session,) = ease_only.rank(*clicked_now)
    assert session.items[0] == "i39"  # the session's rows lift what its newest item recommends
    (no_session,) = _serving(service, ItemItem(weights, 1.0, session_weight=0.0), tmp_path / "x").rank(*clicked_now)
    assert "i39" not in no_session.items[:1]  # nothing seen and no session weight: no EASE lift


def test_category_cap_applies_to_personalised_lists(service):
    (res,) = service.rank(["u2"], [["i20", "i21"]], [{"i20", "i21"}], [], set(), [RecOptions(8, per_category=2)])
    cats = Counter(service.holder.current.extra.category_of[i] for i in res.items)
    assert len(res.items) == 8 and max(cats.values()) <= 2


@pytest.mark.parametrize(("doc", "error"), [
    (b"{", "not valid JSON"), (b'{"k": 3}', "user_id"), (b'{"user_id": "u", "k": 101}', "k must be"),
    (b'{"user_id": "u", "exclude": "x"}', "exclude"), (b'{"user_id": "u", "per_category": 0}', "per_category"),
    (b'{"user_id": "u", "mmr_lambda": 2}', "mmr_lambda"), (b'{"user_id": "u", "path": "other"}', "path"),
])
def test_bad_requests_are_refused_with_a_reason(doc, error):
    assert error in parse_request(doc)


def test_a_good_request_becomes_options():
    doc, opt = parse_request(b'{"user_id": "u", "k": 7, "exclude": ["a"], "per_category": 2, "mmr_lambda": 0.5}')
    assert doc["user_id"] == "u" and opt == RecOptions(7, ("a",), 0.5, 2, False)


def test_items_first_seen_in_the_stream_join_the_index_by_a_swap(service):
    import asyncio

    from kestrel.streams.recs.service import NEW_ITEMS_BATCH

    before = service.holder.current
    new = [(f"fresh-{j}", "2") for j in range(NEW_ITEMS_BATCH)]

    async def run() -> None:
        service.observe_items([("i1", "0"), *new])  # a known item is not re-added
        await service._adding

    asyncio.run(run())
    after = service.holder.current
    assert after is not before and before.size == len(before.item_ids)  # the old snapshot is untouched
    assert after.size == before.size + NEW_ITEMS_BATCH and after.version == before.version
    assert after.extra.category_of["fresh-0"] == "2" and "fresh-0" in after.row_of
    # A category-2 history now retrieves from the whole, bigger index without error.
    (res,) = service.rank(["u2"], [["i20"]], [{"i20"}], [], set(), [RecOptions(5)])
    assert res.path == PERSONALISED and len(res.items) == 5
