"""What Kestrel changes in Faust's consumer, and why: each change is measured or a loss it prevents.

Faust stays the application (agents, partition assignment, commits, web
views); these patches touch only how records get from aiokafka to the
agents' queues and how a rebalance seeks:

* a short ``fetch_max_wait_ms`` (tansu holds every fetch for the full wait);
* partitions the group never committed are rewound after a rebalance;
* records are handed to the conductor without Faust's per-record
  ``wait_first`` (four tasks per record, ~48 µs here) whenever that hand-over
  cannot block;
* the worker's topics carry raw bytes, so their records become events
  without Faust's codec lookups (:class:`RawSchema`).

:func:`patch_faust_consumer` applies the first three once per process.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
from typing import Any, cast

import aiokafka
import faust
import faust.transport.consumer as faust_consumer
import faust.transport.drivers.aiokafka as faust_aiokafka_driver
from mode import Service

log = logging.getLogger("kestrel.worker")
# sha256 (16 hex) of faust-streaming 0.15.3's Consumer._drain_messages source, which _hand_over_without_tasks copies
FAUST_DRAIN_SOURCE = "44a2500309e83c63"


def patch_faust_consumer(fetch_max_wait_ms: int) -> None:
    """Apply Kestrel's changes to Faust's consumer (idempotent)."""
    set_fetch_wait(fetch_max_wait_ms)
    _rewind_uncommitted_partitions()
    _hand_over_without_tasks()


class _AiokafkaWithFetchWait:
    """Stands in for the ``aiokafka`` module inside Faust's driver to set ``fetch_max_wait_ms``.

    Faust hard-codes 1500 ms. Apache Kafka answers a fetch as soon as data
    arrives, but tansu holds every fetch for the full wait, which would put
    that wait on every decision. A short wait costs only idle fetches.
    """

    def __init__(self, fetch_max_wait_ms: int) -> None:
        self._wait = fetch_max_wait_ms

    def __getattr__(self, name: str) -> Any:
        return getattr(aiokafka, name)

    def AIOKafkaConsumer(self, *args: Any, **kwargs: Any) -> aiokafka.AIOKafkaConsumer:
        kwargs["fetch_max_wait_ms"] = self._wait
        return aiokafka.AIOKafkaConsumer(*args, **kwargs)


def set_fetch_wait(fetch_max_wait_ms: int) -> None:
    faust_aiokafka_driver.aiokafka = _AiokafkaWithFetchWait(fetch_max_wait_ms)


def _rewind_uncommitted_partitions() -> None:
    """After a rebalance, also rewind the partitions the group never committed.

    Faust drops records it fetched while flow was stopped and seeks back to
    the committed offsets, but aiokafka's ``seek_to_committed`` skips a
    partition without one, so its position stays past the dropped records and
    Faust then commits over them (seen losing 255 payments of a partition whose
    first owner was SIGKILLed before its first commit). With no committed
    offset, the start is the beginning (``consumer_auto_offset_reset=earliest``).
    """
    thread_cls = faust_aiokafka_driver.AIOKafkaConsumerThread
    if getattr(thread_cls, "_kestrel_rewinds", False):
        return

    async def seek_to_committed(self: Any) -> Any:
        async def both() -> Any:
            consumer = self._ensure_consumer()
            committed = await consumer.seek_to_committed()
            never = [tp for tp, offset in committed.items() if not offset or offset <= 0]
            if never:
                await consumer.seek_to_beginning(*never)
            return committed

        return await self.call_thread(both)

    thread_cls.seek_to_committed = seek_to_committed
    thread_cls._kestrel_rewinds = True


def _hand_over_without_tasks() -> None:
    """Replace ``Consumer._drain_messages`` by the same loop, minus a task per record on the fast path.

    Faust awaits every record's hand-over as ``wait_first(callback(message),
    suspend_flow.wait())``, so that a rebalance can interrupt a hand-over that
    blocks; that costs four tasks per record. The hand-over blocks only while
    flow is suspended, the conductor is being rebuilt or a receiving queue is
    full; otherwise it finishes without yielding, so it is awaited directly,
    and the interruptible form is kept for the other cases. Everything else
    (read offsets, gaps, commits every N acks) is Faust's loop as it is.
    """
    cls = faust_consumer.Consumer
    if getattr(cls, "_kestrel_hand_over", False):
        return
    source = hashlib.sha256(inspect.getsource(cls._drain_messages).encode()).hexdigest()[:16]
    if source != FAUST_DRAIN_SOURCE:  # a Faust whose loop changed: this copy of it would be stale
        log.warning("Faust's Consumer._drain_messages is not the one this patch copies (source %s, expected %s): "
                    "keeping Faust's own, a record hand-over costs its four tasks", source, FAUST_DRAIN_SOURCE)
        return

    async def _drain_messages(self: Any, fetcher: Any) -> None:
        callback = self.callback
        getmany = self.getmany
        consumer_should_stop = cast(Service, self)._stopped.is_set
        fetcher_should_stop = cast(Service, fetcher)._stopped.is_set
        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        set_flag, unset_flag = self.diag.set_flag, self.diag.unset_flag
        commit_every = self._commit_every
        acks_enabled_for = self.app.topics.acks_enabled_for
        flow_is_active = self.app.flow_control.is_active
        suspended = self.suspend_flow.is_set
        conductor = self.app.topics
        callback_lock = conductor._tp_to_callback_lock
        channels_of = conductor._tp_index.get
        suspend_wait = self.suspend_flow.wait
        num_since_yield = 0
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                set_flag(faust_consumer.CONSUMER_FETCHING)
                ait = getmany(timeout=1.0)
                await self.sleep(0)  # getmany can return at once in a loop: let others run
                if not self.should_stop:
                    async for tp, message in ait:
                        num_since_yield += 1
                        if num_since_yield > 100:
                            await self.sleep(0)
                            num_since_yield = 0
                        offset = message.offset
                        r_offset = get_read_offset(tp)
                        if r_offset is None or offset >= r_offset:
                            gap = offset - (r_offset or 0)
                            if gap > 1 and r_offset and acks_enabled_for(message.topic):
                                await self._add_gap(tp, r_offset + 1, offset)
                            if commit_every is not None and self._n_acked >= commit_every:
                                self._n_acked = 0
                                await self.commit()
                            if (flow_is_active() and not suspended() and not callback_lock.locked()
                                    and not any(chan.queue.full() for chan in channels_of(tp, ()))):
                                await callback(message)  # cannot block: no task needed
                            else:
                                await self.wait_first(callback(message), suspend_wait())
                            set_read_offset(tp, offset)
                    unset_flag(faust_consumer.CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            unset_flag(faust_consumer.CONSUMER_FETCHING)

    cls._drain_messages = _drain_messages
    cls._kestrel_hand_over = True


class RawSchema(faust.Schema):
    """Keys and values as the broker gave them, as Faust's ``raw`` serializers give them, minus the codec lookups.

    Faust's own decode resolves the key's and the value's codec through its
    registry and settings for every record (a quarter of the records' way from
    the fetcher to an agent's queue, measured in the payment drain); for raw
    bytes both are the identity, so the event is made straight from the
    record. ``allow_empty`` has no role: a raw value is passed on as it came,
    ``None`` included, and validation owns what an empty one means.
    """

    def __init__(self) -> None:
        super().__init__(key_serializer="raw", value_serializer="raw")

    def compile(self, app: Any, **_options: Any) -> Any:
        event = app.conf.Event

        async def decode(message: Any, *, propagate: bool = False) -> Any:
            return event(app, message.key, message.value, message.headers, message)

        return decode
