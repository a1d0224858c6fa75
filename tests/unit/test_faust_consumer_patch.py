"""Kestrel's patches of Faust's consumer apply to the Faust that is pinned, and only to it."""

from __future__ import annotations

import hashlib
import inspect

import faust.transport.consumer as faust_consumer

from kestrel.streams.worker import consumer


def test_the_copied_loop_is_the_pinned_fausts() -> None:
    original = faust_consumer.Consumer._drain_messages
    if getattr(faust_consumer.Consumer, "_kestrel_hand_over", False):  # patched earlier in this process
        return
    source = hashlib.sha256(inspect.getsource(original).encode()).hexdigest()[:16]
    assert source == consumer.FAUST_DRAIN_SOURCE  # a Faust upgrade: re-read its loop before updating the hash


def test_patching_replaces_the_hand_over_once() -> None:
    consumer.patch_faust_consumer(10)
    patched = faust_consumer.Consumer._drain_messages
    consumer.patch_faust_consumer(10)
    assert faust_consumer.Consumer._kestrel_hand_over is True
    assert faust_consumer.Consumer._drain_messages is patched
    assert "wait_first" in inspect.getsource(patched)  # the interruptible form is kept for blocking hand-overs


def test_the_raw_schema_gives_the_events_fausts_raw_serializers_give() -> None:
    import asyncio

    import faust
    from faust.types import TP
    from faust.types.tuples import Message

    app = faust.App("raw-schema-test", broker="kafka://127.0.0.1:1", store="memory://")
    stock = faust.Schema(key_serializer="raw", value_serializer="raw").compile(app)
    lean = consumer.RawSchema().compile(app)
    for key, value in [(b"card", b'{"amount": 1}'), (None, b"\x00\xff raw"), (b"k", b""), (b"k", None)]:
        message = Message("events.transactions", 3, 17, 1.0, 0, [("event-id", b"e1")], key, value, None,
                          tp=TP("events.transactions", 3))
        want, got = asyncio.run(stock(message)), asyncio.run(lean(message))
        assert type(got) is type(want)
        assert (got.key, got.value, got.headers, got.message) == (want.key, want.value, want.headers, message)
