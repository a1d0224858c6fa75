"""Trending items: interactions of the last 24 hours (event time), not of all time."""

from __future__ import annotations

import secrets

import pytest
import redis

from kestrel.feature_store.definitions import compile_event
from kestrel.feature_store.erase import delete_matching
from kestrel.feature_store.keys import KeyedHasher, KeySpace
from kestrel.feature_store.redis_store import WINDOWED_TOP_LUA, RedisOnlineStore, windowed_top_args
from kestrel.feature_store.schemas import Interaction
from kestrel.feature_store.sets import TRENDING, USER_ACTIVITY

pytestmark = pytest.mark.integration
T0 = 1_767_225_600.0


def test_trending_follows_the_last_day_while_popularity_remembers_everything(redis_url):
    client = redis.Redis.from_url(redis_url)
    keys, hasher = KeySpace(f"kestrel-test-trend-{secrets.token_hex(4)}"), KeyedHasher(b"k")
    store = RedisOnlineStore(client, 3600, keys, hasher)
    events = [Interaction(event_id=f"old-{i}", user_id=f"u{i}", item_id="old-hit", kind="purchase",
                          timestamp=T0 + i) for i in range(30)]  # a hit two days ago
    later = T0 + 2 * 86400
    events += [Interaction(event_id=f"new-{i}", user_id=f"v{i}", item_id="new-hit", kind="click",
                           timestamp=later + 60 * i) for i in range(5)]
    events += [Interaction(event_id="view", user_id="w", item_id="quiet", kind="view", timestamp=later + 7200)]
    try:
        store.apply_batch([compile_event(USER_ACTIVITY, e, keys, hasher) for e in events])
        store.apply_batch([compile_event(USER_ACTIVITY, events[-1], keys, hasher)])  # redelivered: counted once
        top = client.register_script(WINDOWED_TOP_LUA)
        trending = [m.decode() for m in top(args=windowed_top_args(TRENDING, keys, 10))]
        assert trending == ["new-hit", "quiet"]  # the old hit left the 24-hour window
        union = TRENDING.bucket_key(keys, "top")
        assert client.zscore(union, "quiet") == 1.0 and 0 < client.ttl(union) <= 5  # cached for a few seconds
        all_time = [m.decode() for m in client.zrevrange(keys.global_("item_popularity"), 0, -1)]
        assert all_time == ["old-hit", "new-hit", "quiet"]
    finally:
        delete_matching(client, f"{keys.prefix}:*")
