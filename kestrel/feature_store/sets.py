"""The feature sets that ship with Kestrel.

Fraud: a card's spending profile and velocity, a terminal's activity, and a
terminal's fraud rate from labels that have already arrived (delayed window).
Recommendations: a user's recent and seen items, item popularity.
"""

from __future__ import annotations

from kestrel.feature_store.definitions import (
    FeatureSet,
    GlobalScore,
    LastN,
    LastValue,
    SeenSet,
    TimeSince,
    Windowed,
)
from kestrel.feature_store.families import Horizon, MaturedCounts, amount_family

MINUTE, HOUR, DAY = 60, 3600, 86400
SMALL_AMOUNT = 5.0  # below this a payment looks like a card-testing probe
LABEL_DELAY_S = 7 * DAY  # labels of the last week are not complete yet


def _amount(e: object) -> float:
    return e.amount  # type: ignore[attr-defined]

# The scales of a card's spending, short to long; each gets count, sum, mean and std of amounts. Buckets are a
# tenth to a twelfth of each window: a read touches ~80 values, not ~300.
CARD_HORIZONS = (Horizon("10m", 10 * MINUTE, 2 * MINUTE), Horizon("1h", HOUR, 10 * MINUTE),
                 Horizon("24h", DAY, 2 * HOUR), Horizon("7d", 7 * DAY, DAY), Horizon("30d", 30 * DAY, 3 * DAY))
# A terminal's payments whose outcome is known (the windows ending one label delay ago): the denominators of its
# fraud rates, so a terminal compromised last week shows in the 1-day window instead of being diluted in 30 days.
TERMINAL_MATURED = MaturedCounts("terminal_txn", LABEL_DELAY_S, DAY,
                                 (Horizon("1d", DAY, DAY), Horizon("7d", 7 * DAY, DAY), Horizon("30d", 30 * DAY, DAY)))

CARD_PROFILE = FeatureSet(
    name="card_profile",
    version="5",
    entity="card",
    source="transaction",
    entity_id_of=lambda e: e.card_id,
    time_of=lambda e: e.epoch_s,
    features=(
        # One stored series of payment amounts per bucket size, shared by count, sum, mean and std.
        *amount_family(CARD_HORIZONS, _amount, count_prefix="txn", value_prefix="amount", series="txn"),
        Windowed("amount_max_7d", "max", 7 * DAY, DAY, value_of=_amount),
        Windowed("small_txn_count_10m", "count", 10 * MINUTE, 2 * MINUTE, where=lambda e: e.amount < SMALL_AMOUNT),
        Windowed("distinct_terminals_24h", "distinct", DAY, 2 * HOUR, value_of=lambda e: e.terminal_id,
                 where=lambda e: e.terminal_id is not None, seen_in="card_terminal"),
        TimeSince("seconds_since_prev"),
        LastValue("prev_terminal", value_of=lambda e: e.terminal_id or ""),
    ),
    buckets=False,  # the head is the whole state (see FeatureSet.buckets)
)

TERMINAL_ACTIVITY = FeatureSet(
    name="terminal_activity",
    version="2",
    entity="terminal",
    source="transaction",
    entity_id_of=lambda e: e.terminal_id or f"merchant:{e.merchant_id}",
    time_of=lambda e: e.epoch_s,
    features=(
        Windowed("terminal_txn_count_1h", "count", HOUR, 5 * MINUTE),
        Windowed("terminal_txn_count_24h", "count", DAY, HOUR, series="txn"),
        *TERMINAL_MATURED.features(),  # terminal_txn_count_7d, _8d, _14d, _37d: daily, one series
        Windowed("terminal_distinct_cards_24h", "distinct", DAY, HOUR, value_of=lambda e: e.card_id, hash_as="card",
                 seen_in="card_terminal"),
    ),
    ttl_s=40 * DAY,  # the head is the whole state and holds 37 days: an idle terminal's must outlive them
    buckets=False,  # the head is the whole state (see FeatureSet.buckets)
)


def _is_fraud(e: object) -> float:
    return e.is_fraud  # type: ignore[attr-defined]


TERMINAL_RISK = FeatureSet(
    name="terminal_risk",
    version="1",
    entity="terminal",
    source="labelled_transaction",  # a label joined with its logged decision: terminal_id, time, is_fraud
    entity_id_of=lambda e: e.terminal_id,
    time_of=lambda e: e.epoch_s,
    features=(
        # Frauds among the payments of each matured window (the numerators of TERMINAL_MATURED's rates).
        *(Windowed(f"terminal_frauds_{h.label}_d7", "sum", h.window_s, DAY, value_of=_is_fraud,
                   delay_s=LABEL_DELAY_S, lateness_s=30 * DAY, series="labels") for h in TERMINAL_MATURED.horizons),
        Windowed("terminal_labels_30d_d7", "count", 30 * DAY, DAY, delay_s=LABEL_DELAY_S, lateness_s=30 * DAY,
                 series="labels"),
    ),
    cached_reads=True,  # every payment reads it, only labels change it: workers keep it by version
)

# Pairs: has this card paid at this terminal / from this device before? (-1 = never: a new terminal/device)
CARD_TERMINAL = FeatureSet(
    name="card_terminal",
    version="1",
    entity="card_terminal",  # token: card's keyed hash + keyed hash of "card|terminal"
    source="transaction",
    entity_id_of=lambda e: f"{e.card_id}|{e.terminal_id or 'merchant:' + e.merchant_id}",
    time_of=lambda e: e.epoch_s,
    features=(
        TimeSince("card_terminal_seconds_since_prev"),
        Windowed("card_terminal_txn_count_30d", "count", 30 * DAY, 3 * DAY),
    ),
    ttl_s=60 * DAY,
    owner=("card", lambda e: e.card_id),
    buckets=False,  # the head is the whole state (see FeatureSet.buckets)
)

CARD_DEVICE = FeatureSet(
    name="card_device",
    version="1",
    entity="card_device",
    source="transaction",
    entity_id_of=lambda e: f"{e.card_id}|{e.device_id or '-'}",
    time_of=lambda e: e.epoch_s,
    features=(
        TimeSince("card_device_seconds_since_prev"),
        Windowed("card_device_txn_count_30d", "count", 30 * DAY, 3 * DAY),
    ),
    ttl_s=60 * DAY,
    owner=("card", lambda e: e.card_id),
    buckets=False,  # the head is the whole state (see FeatureSet.buckets)
)

INTERACTION_WEIGHTS = {"view": 1.0, "click": 2.0, "add_to_cart": 3.0, "purchase": 5.0}

USER_ACTIVITY = FeatureSet(
    name="user_activity",
    version="3",
    entity="user",
    source="interaction",
    entity_id_of=lambda e: e.user_id,
    time_of=lambda e: e.epoch_s,
    features=(
        Windowed("user_clicks_1h", "count", HOUR, 5 * MINUTE, where=lambda e: e.kind == "click"),
        Windowed("user_purchases_7d", "count", 7 * DAY, DAY, where=lambda e: e.kind == "purchase"),
        Windowed("user_distinct_items_24h", "distinct", DAY, HOUR, value_of=lambda e: e.item_id),
        TimeSince("user_seconds_since_prev"),
        LastN("recent_items", value_of=lambda e: e.item_id, n=50),
        SeenSet("seen_items", value_of=lambda e: e.item_id),
        GlobalScore("item_popularity", member_of=lambda e: e.item_id, weight_of=lambda e: INTERACTION_WEIGHTS[e.kind]),
        # What is popular now: the last 24 hours (event time) in hourly buckets; the cold-start fallback.
        GlobalScore("item_trending", member_of=lambda e: e.item_id, weight_of=lambda e: INTERACTION_WEIGHTS[e.kind],
                    bucket_s=HOUR, buckets=24),
    ),
    ttl_s=30 * DAY,
    buckets=False,  # the head is the whole state (see FeatureSet.buckets)
)

FRAUD_SETS = (CARD_PROFILE, TERMINAL_ACTIVITY)
# Every set a payment's fraud vector is read from (the worker's scoring path, the offline replay, the eval).
FRAUD_VECTOR_SETS = (CARD_PROFILE, TERMINAL_ACTIVITY, TERMINAL_RISK, CARD_TERMINAL, CARD_DEVICE)
# What a decision logs and a model registers as its inputs' version: a change to any set changes it.
FRAUD_FEATURE_SET_VERSION = "+".join(fs.qualified_version for fs in FRAUD_VECTOR_SETS)
TRENDING = next(f for f in USER_ACTIVITY.features if f.name == "item_trending")
ALL_SETS = {fs.name: fs for fs in (CARD_PROFILE, TERMINAL_ACTIVITY, TERMINAL_RISK, CARD_TERMINAL, CARD_DEVICE,
                                   USER_ACTIVITY)}
