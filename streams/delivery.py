"""Delivery ledger: which outputs already reached the broker, kept in Redis.

Each output has a mark key; it is set only after the broker acknowledged the
record, so a batch replayed after a crash re-sends exactly the outputs that
were never delivered. One script call per batch keeps this off the hot path
(a pipeline of one command per record costs more in reply parsing than the
commands themselves).
"""

from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio as aioredis

WRITE_AND_CHECK_LUA = r"""
local ttl, n = tonumber(ARGV[1]), tonumber(ARGV[2])
for i = 0, n - 1 do
  -- NX: a replayed batch must not rewrite what was logged (and sent) the first time
  redis.call('SET', ARGV[3 + 2 * i], ARGV[4 + 2 * i], 'EX', ttl, 'NX')
end
local out = {}
for i = 3 + 2 * n, #ARGV do out[#out + 1] = redis.call('EXISTS', ARGV[i]) end
return out
"""

MARK_LUA = r"""
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('SET', ARGV[i], '1', 'EX', ttl) end
return #ARGV - 1
"""


class DeliveryLedger:
    def __init__(self, client: aioredis.Redis, ttl_s: int, writes_ttl_s: int | None = None) -> None:
        self.ttl_s = ttl_s
        self.writes_ttl_s = writes_ttl_s or ttl_s
        self._write_and_check = client.register_script(WRITE_AND_CHECK_LUA)
        self._mark = client.register_script(MARK_LUA)

    async def delivered(self, marks: Sequence[str], writes: Sequence[tuple[str, bytes]] = ()) -> list[bool]:
        """Which ``marks`` are set; first stores ``writes`` (key, value) with ``writes_ttl_s``, same round trip."""
        if not marks and not writes:
            return []
        args: list[object] = [self.writes_ttl_s, len(writes)]
        for key, value in writes:
            args += [key, value]
        args += list(marks)
        return [bool(x) for x in await self._write_and_check(args=args)]

    async def mark(self, marks: Sequence[str]) -> None:
        if marks:
            await self._mark(args=[self.ttl_s, *marks])
