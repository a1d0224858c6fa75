"""How an agent takes its records (`kestrel.streams.worker.runtime.take_batches`), against a stand-in for Faust."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from kestrel.streams.worker.runtime import take_batches


class FakeStream:
    """The parts of a Faust stream and app that take_batches touches."""

    def __init__(self, generation: int) -> None:
        self.unacked: set = set()
        self.app = SimpleNamespace(
            consumer=SimpleNamespace(unacked=self.unacked), consumer_generation_id=generation,
            flow_control=SimpleNamespace(is_active=lambda: True), topics=SimpleNamespace(acking_topics={"t"}))
        self.channel = SimpleNamespace(queue=asyncio.Queue())
        self.should_stop = False
        self.acked: list = []
        self.seen_in: list = []

    def _on_message_in(self, tp, offset, message) -> None:
        self.seen_in.append(offset)

    async def maybe_start(self) -> bool:
        return False

    async def ack(self, event) -> bool:
        self.acked.append(event.message.offset)
        return True


class Message:
    """A consumer record (hashable by identity, as Faust's are)."""

    def __init__(self, offset: int, generation: int) -> None:
        self.topic, self.tp, self.offset, self.generation_id, self.tracked = "t", ("t", 0), offset, generation, False


def _event(offset: int, generation: int) -> SimpleNamespace:
    return SimpleNamespace(message=Message(offset, generation))


async def test_records_of_an_older_generation_are_dropped_unacked_and_the_rest_tracked() -> None:
    stream = FakeStream(generation=2)
    for i, gen in enumerate([1, 1, 2, 2, 2]):  # the first two were fetched before a rebalance
        stream.channel.queue.put_nowait(_event(i, gen))
    batches = take_batches(stream, max_=10, within=0.01)
    batch = await asyncio.wait_for(batches.__anext__(), timeout=2)
    await batches.aclose()
    assert [e.message.offset for e in batch] == [2, 3, 4]
    # never acked: an ack would let the commit pass over events nobody processed (the new owner re-reads them)
    assert stream.acked == []
    assert {m.offset for m in stream.unacked} == {2, 3, 4} and stream.seen_in == [2, 3, 4]


async def test_a_batch_holds_at_most_max_records_and_waits_at_most_within() -> None:
    stream = FakeStream(generation=1)
    for i in range(7):
        stream.channel.queue.put_nowait(_event(i, 1))
    batches = take_batches(stream, max_=5, within=0.05)
    first = await asyncio.wait_for(batches.__anext__(), timeout=2)
    second = await asyncio.wait_for(batches.__anext__(), timeout=2)  # the 2 left, after `within`
    await batches.aclose()
    assert [len(first), len(second)] == [5, 2]
