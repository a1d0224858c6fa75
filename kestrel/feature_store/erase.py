"""Right to erasure: delete every key of a data subject and leave a tombstone.

The tombstone is written first, so a write racing the erasure (or a later
replay of old events) is refused by the store's script and cannot quietly
recreate the subject's data.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from kestrel.feature_store.keys import PAIR_OWNER, KeyedHasher, KeySpace, escape_glob


@dataclass(frozen=True)
class ErasureReport:
    entity: str
    token: str
    keys_deleted: int
    tombstone: str


def erase_subject(client: redis.Redis, keys: KeySpace, hasher: KeyedHasher, entity: str, raw_id: str,
                  tombstone_ttl_s: int | None = None) -> ErasureReport:
    """Erase one subject (e.g. ``card`` / ``4111...``); only its keyed hash is ever used or printed."""
    token = hasher.token(entity, raw_id)
    tombstone = keys.tombstone(entity, token)
    client.set(tombstone, b"1", ex=tombstone_ttl_s)
    deleted = delete_matching(client, f"{escape_glob(keys.entity(entity, token))}*")
    # Pair keys (card x terminal) start with the owner's token.
    for pair in (p for p, owner in PAIR_OWNER.items() if owner == entity):
        deleted += delete_matching(client, f"{escape_glob(keys.entity(pair, token))}*")
    return ErasureReport(entity, token, deleted, tombstone)


def delete_matching(client: redis.Redis, pattern: str, batch_size: int = 500) -> int:
    """Delete every key matching a SCAN pattern, in batches (never FLUSHALL a shared server)."""
    deleted = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) >= batch_size:
            deleted += client.unlink(*batch)
            batch.clear()
    if batch:
        deleted += client.unlink(*batch)
    return deleted
