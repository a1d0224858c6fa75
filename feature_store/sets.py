"""The feature sets that ship with Kestrel (fraud: per card; recommendations: per user)."""

from __future__ import annotations

from feature_store.definitions import FeatureSet, GlobalScore, LastN, Previous, SeenSet, Windowed

SMALL_AMOUNT = 5.0  # below this a payment looks like a card-testing probe

CARD_VELOCITY = FeatureSet(
    name="card_velocity",
    version="1",
    entity="card",
    entity_id_of=lambda e: e.card_id,
    time_of=lambda e: e.epoch_s,
    features=(
        Windowed("txn_count_10m", "count", 600, 60),
        Windowed("txn_count_1h", "count", 3600, 300),
        Windowed("txn_count_24h", "count", 86400, 3600),
        Windowed("amount_sum_1h", "sum", 3600, 300, value_of=lambda e: e.amount),
        Windowed("amount_sum_24h", "sum", 86400, 3600, value_of=lambda e: e.amount),
        Windowed("small_txn_count_10m", "count", 600, 60, where=lambda e: e.amount < SMALL_AMOUNT),
        Previous("prev_txn_ts", value_of=lambda e: e.epoch_s),
    ),
)

INTERACTION_WEIGHTS = {"view": 1.0, "click": 2.0, "add_to_cart": 3.0, "purchase": 5.0}

USER_ACTIVITY = FeatureSet(
    name="user_activity",
    version="1",
    entity="user",
    entity_id_of=lambda e: e.user_id,
    time_of=lambda e: e.epoch_s,
    features=(
        LastN("recent_items", value_of=lambda e: e.item_id, n=50),
        SeenSet("seen_items", value_of=lambda e: e.item_id),
        GlobalScore("item_popularity", member_of=lambda e: e.item_id, weight_of=lambda e: INTERACTION_WEIGHTS[e.kind]),
    ),
    ttl_s=30 * 24 * 3600,
)
