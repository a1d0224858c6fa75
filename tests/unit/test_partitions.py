"""KeyPartitions: the remembered partition of a key is the one aiokafka's partitioner gives."""

from __future__ import annotations

from types import SimpleNamespace

from aiokafka.partitioner import DefaultPartitioner

from kestrel.streams.worker.runtime import KeyPartitions


class _Producer:
    """The two attributes of an aiokafka producer KeyPartitions reads, and its ``_partition``, counted."""

    def __init__(self, partitions: set[int], partitioner=None) -> None:
        self.partitions = partitions
        self._partitioner = partitioner or DefaultPartitioner()
        self._metadata = SimpleNamespace(partitions_for_topic=lambda topic: self.partitions)
        self.asked = 0

    def _partition(self, topic, partition, key, value, serialized_key, serialized_value):
        self.asked += 1
        return self._partitioner(serialized_key, sorted(self.partitions), sorted(self.partitions))


def test_partitions_equal_the_partitioners_and_are_asked_once_per_key_and_layout():
    producer, cache = _Producer(set(range(6))), KeyPartitions()
    keys = [f"card-{i % 50}".encode() for i in range(500)]
    of = cache.of(producer, "t")
    assert [of(k, b"v") for k in keys] == [DefaultPartitioner()(k, list(range(6)), list(range(6))) for k in keys]
    assert producer.asked == 50
    producer.partitions = set(range(12))  # the topic grew: a new layout, asked again
    of = cache.of(producer, "t")
    assert [of(k, b"v") for k in keys[:50]] == [DefaultPartitioner()(k, list(range(12)), []) for k in keys[:50]]
    assert producer.asked == 100


def test_records_without_a_key_and_other_partitioners_are_always_asked():
    producer, cache = _Producer({0, 1}), KeyPartitions()
    of = cache.of(producer, "t")
    of(None, b"v"), of(None, b"v")
    assert producer.asked == 2

    class Custom:
        def __call__(self, key, all_partitions, available):
            return 1

    other = _Producer({0, 1}, Custom())
    of = cache.of(other, "t")
    assert [of(b"k", b"v"), of(b"k", b"v")] == [1, 1] and other.asked == 2


def test_a_full_cache_starts_over():
    producer, cache = _Producer({0, 1, 2}), KeyPartitions(limit=10)
    for i in range(25):
        cache.of(producer, "t")(f"k{i}".encode(), b"v")
    assert all(len(known) <= 10 for known in cache._known.values())
