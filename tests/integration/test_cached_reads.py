"""Versioned reads of a set that labels feed (terminal risk): reused while nothing changed, exact always."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import pytest
import redis
import redis.asyncio as aioredis

from kestrel.feature_store.cached_reads import VersionedReads
from kestrel.feature_store.definitions import compile_event
from kestrel.feature_store.erase import delete_matching
from kestrel.feature_store.keys import KeyedHasher, KeySpace
from kestrel.feature_store.redis_store import AsyncRedisOnlineStore
from kestrel.feature_store.sets import DAY, TERMINAL_RISK
from kestrel.streams.worker.processing import LabelledTransaction

pytestmark = pytest.mark.integration
T0 = 1_780_000_000.0


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[AsyncRedisOnlineStore]:
    keys = KeySpace(f"kestrel-test-cached-{secrets.token_hex(4)}")
    client = aioredis.Redis.from_url(redis_url)
    yield AsyncRedisOnlineStore(client, 3600, keys, KeyedHasher(b"cached"))
    delete_matching(redis.Redis.from_url(redis_url), f"{keys.prefix}:*")
    await client.aclose()


async def _label(store: AsyncRedisOnlineStore, terminal: str, at: float, fraud: bool) -> None:
    event = LabelledTransaction(f"l-{secrets.token_hex(4)}", terminal, at, fraud)
    await store.apply_batch([compile_event(TERMINAL_RISK, event, store.keys, store.hasher)])


async def test_vectors_equal_direct_reads_and_are_read_again_only_when_they_change(store) -> None:
    reads = VersionedReads(store, TERMINAL_RISK)
    for i in range(6):  # labels of payments 10..15 days before T0: inside the 30-day window delayed by 7
        await _label(store, "t1", T0 - (10 + i) * DAY, i % 2 == 0)
    await _label(store, "t2", T0 - 12 * DAY, True)
    terminals, times = ["t1", "t2", "t1", "t3"], [T0, T0 + 60, T0 + 120, T0]

    async def direct() -> list[dict]:
        return [(await store.read_batch(TERMINAL_RISK, [t], at))[0] for t, at in zip(terminals, times, strict=True)]

    first = await reads.vectors(terminals, times)
    assert first == await direct()
    assert first[0]["terminal_frauds_30d_d7"] == 3.0 and first[0]["terminal_labels_30d_d7"] == 6.0
    assert reads.misses == 2  # one read per entity and window position; t3, never written, needs none
    again = await reads.vectors(terminals, times)
    assert again == first and reads.misses == 2 and reads.hits == 5  # nothing changed: nothing read
    await _label(store, "t2", T0 - 11 * DAY, True)  # a label (any worker's) bumps t2's version
    after = await reads.vectors(terminals, times)
    assert after == await direct() and after[1]["terminal_frauds_30d_d7"] == 2.0
    assert reads.misses == 3  # only t2 was read again
    later = [t + 3 * DAY for t in times]  # the delayed window moved on: read again, still exact
    moved = await reads.vectors(terminals, later)
    assert moved == [(await store.read_batch(TERMINAL_RISK, [t], at))[0] for t, at in zip(terminals, later,
                                                                                          strict=True)]


def test_only_sets_that_keep_versions_can_be_cached(store) -> None:
    from kestrel.feature_store.sets import CARD_PROFILE

    with pytest.raises(ValueError, match="cached_reads"):
        VersionedReads(store, CARD_PROFILE)
