"""Delivery ledger: which outputs already reached the broker, and what was sent, kept in Redis.

Each output has a mark key; it is set only after the broker acknowledged the
record, so a batch replayed after a crash re-sends exactly the outputs that
were never delivered. Before an output is first sent its bytes go to an
outbox key (``mark:out``, or a log key the output is already written to);
a replay re-sends those bytes, not a recomputation: a recommendation or an
alert computed again after a crash can differ (other events moved the state
meanwhile), and a consumer keyed by event id must never see two different
decisions for one event. The outbox entry is dropped when the mark is set.

A fraud decision's log is its own mark (an output whose ``mark`` is its
``log_key``): once delivered, a space is appended to it (JSON allows trailing
whitespace, so its readers parse it unchanged). A payment then keeps one key
for its decision, not a log and a mark, and its first attempt needs no
lookup: a log this call just wrote cannot have been delivered.
Counts that must follow a logged decision exactly once (an experiment
variant's latency histogram) travel with the log's write: each is added only
by the call that stored the log.
One script call per batch keeps this off the hot path (a pipeline of one
command per record costs more in reply parsing than the commands
themselves).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from kestrel.feature_store.resp import run_script
from kestrel.feature_store.scripts import load_lua

WRITE_AND_CHECK_LUA = load_lua(__file__, "delivery_write_and_check")

MARK_LUA = load_lua(__file__, "delivery_mark")


@dataclass
class Logs:
    """What a batch stores in its delivery call beside the outboxes: logs (``SET NX``) and the counts that follow
    them (:meth:`DeliveryLedger.unsent`)."""

    writes: list[tuple[str, bytes]] = field(default_factory=list)
    counts: list[tuple[str, str, str]] = field(default_factory=list)  # (hash, field, key of one of writes)


def outbox_key(mark: str) -> str:
    return f"{mark}:out"


class DeliveryLedger:
    def __init__(self, client: aioredis.Redis, ttl_s: int, writes_ttl_s: int | None = None) -> None:
        self.ttl_s = ttl_s
        self.writes_ttl_s = writes_ttl_s or ttl_s
        self.client = client
        self._write_and_check = client.register_script(WRITE_AND_CHECK_LUA)
        self._mark = client.register_script(MARK_LUA)

    async def unsent(self, outputs: Sequence[tuple[str, str | None, bytes]],
                     writes: Sequence[tuple[str, bytes]] = (),
                     counts: Sequence[tuple[str, str, str]] = ()) -> list[bytes | None]:
        """For each (mark, log key or None, body): None if delivered, else the bytes to send.

        The bytes are those stored when the output was first attempted (on
        the first attempt, ``body`` itself, which then does not travel back);
        a log key (written NX by ``writes`` in the same call) serves as the
        outbox itself, so its body is not sent twice. ``writes`` (key, value)
        are stored first, with ``writes_ttl_s``. Each of ``counts`` (hash,
        field, key of one of ``writes``) adds 1 to the hash's field if this
        call stored that write, so it is counted once across replays.
        """
        if not outputs and not writes:
            return []
        args: list[object] = [self.writes_ttl_s, len(writes)]
        for key, value in writes:
            args += [key, value]
        args.append(len(counts))
        for count in counts:
            args += count
        args.append(self.ttl_s)
        for mark, log_key, body in outputs:
            if mark == log_key:  # a log that is its own mark
                args += ["", log_key, b""]
            else:
                args += [mark, log_key or outbox_key(mark), b"" if log_key else body]
        replies = await run_script(self.client, self._write_and_check, args)
        return [None if reply == 0 else body if reply == 1 else reply
                for (_, _, body), reply in zip(outputs, replies, strict=True)]

    async def mark(self, outputs: Sequence[tuple[str, str | None]]) -> None:
        """Set the marks of delivered (mark, log key or None) outputs; their transient outboxes go."""
        if outputs:
            marks = [m for m, log_key in outputs if m != log_key]
            logs = [m for m, log_key in outputs if m == log_key]
            await run_script(self.client, self._mark, [self.ttl_s, len(marks), *marks, len(logs), *logs,
                                                       *(outbox_key(m) for m, log_key in outputs if log_key is None)])
