"""The event archive: every topic the system writes, as Parquet, partitioned by topic and event date.

``kestrel archive`` consumes the input, decision, label, alert, operator and
dead-letter topics in its own consumer group and writes, per flush, one file
per (topic, event date)::

    ROOT/topic=decisions.fraud/date=2026-12-03/part-<first offset time>-<random>.parquet

Nothing is lost in a crash: offsets are committed only after every file of
the flush is durably written (written aside, fsynced, renamed into place,
directory fsynced; on an object store a put is atomic by itself). A crash
after the files and before the commit re-reads those records and writes them
again in another file, so a reader removes duplicates: by ``event_id`` where
the record has one (which also drops a producer's duplicate sends), else by
the record's (topic, partition, offset). :func:`read_archive` does both.

Identifiers never reach the archive raw: the input events' ``card_id``,
``customer_id``, ``user_id`` and ``ip`` are replaced by keyed tokens (the
worker's, so archived events join to decisions' ``card``) and ``geo`` is
dropped, before the row is built. Input that is
not JSON (kept for the dead-letter trail) is archived as it came.

Each row keeps the record as it was (``value``: its JSON bytes, ``key``),
where it came from (``topic``, ``partition``, ``offset``, ``timestamp_ms``)
and the fields every reader filters on (``event_id``, ``type``,
``event_time``); :func:`decode` expands ``value`` into columns.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from kestrel.feature_store import topics
from kestrel.feature_store.keys import KeyedHasher

ARCHIVED_TOPICS = topics.INPUT_TOPICS + topics.OUTPUT_TOPICS
SCHEMA = pa.schema([
    ("topic", pa.string()), ("partition", pa.int32()), ("offset", pa.int64()), ("timestamp_ms", pa.int64()),
    ("event_id", pa.string()), ("type", pa.string()), ("event_time", pa.string()),
    ("key", pa.binary()), ("value", pa.binary()),
])
# where a record's event time is, by document type (the first field present wins)
TIME_FIELDS = ("event_time", "timestamp", "label_time", "received_at", "at", "decided_at", "updated_at")


@dataclass(frozen=True)
class ArchivedRecord:
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes


# input fields replaced by the worker's keyed tokens, and personal fields no training set needs, dropped
TOKENISED = {"card_id": "card", "customer_id": "customer", "user_id": "user", "ip": "ip"}
DROPPED = ("geo",)


def row_of(rec: ArchivedRecord, hasher: KeyedHasher | None = None) -> dict[str, Any]:
    """The archive row of one record; a value that is not a JSON object is kept as bytes, its fields empty.

    With ``hasher``, an input event's identifiers are tokenised first (see the module docstring).
    """
    try:
        doc = orjson.loads(rec.value)
    except orjson.JSONDecodeError:
        doc = None
    if not isinstance(doc, dict):
        doc = {}
    elif hasher is not None and rec.topic in topics.INPUT_TOPICS and any(f in doc for f in (*TOKENISED, *DROPPED)):
        for name, entity in TOKENISED.items():
            if doc.get(name) is not None:
                doc[name] = hasher.token(entity, str(doc[name]))
        for name in DROPPED:
            doc.pop(name, None)
        rec = ArchivedRecord(rec.topic, rec.partition, rec.offset, rec.timestamp_ms, rec.key, orjson.dumps(doc))
    event_time = next((str(doc[f]) for f in TIME_FIELDS if doc.get(f)), None)
    event_id = doc.get("event_id")
    return {"topic": rec.topic, "partition": rec.partition, "offset": rec.offset, "timestamp_ms": rec.timestamp_ms,
            "event_id": str(event_id) if event_id is not None else None, "type": doc.get("type"),
            "event_time": event_time, "key": rec.key, "value": rec.value}


def date_of(row: dict[str, Any]) -> str:
    """The event date a row is filed under (UTC): its event time, else the broker's timestamp.

    >>> date_of({"event_time": "2026-12-03T23:59:59Z", "timestamp_ms": 0})
    '2026-12-03'
    >>> date_of({"event_time": None, "timestamp_ms": 86_400_000})
    '1970-01-02'
    """
    text = row.get("event_time")
    if text:
        try:
            return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC).strftime("%Y-%m-%d")
        except ValueError:
            pass
    return datetime.fromtimestamp(row["timestamp_ms"] / 1000, UTC).strftime("%Y-%m-%d")


class ArchiveWriter:
    """Writes batches of rows as Parquet files under ``root`` (a folder or an fsspec URL), durably."""

    def __init__(self, root: str) -> None:
        import fsspec

        self.fs, self.root = fsspec.core.url_to_fs(root)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def write(self, rows: Sequence[dict[str, Any]]) -> list[str]:
        """One file per (topic, date) of ``rows``; returns their paths once all are durable."""
        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for row in rows:
            groups.setdefault((row["topic"], date_of(row)), []).append(row)
        written = []
        stamp = f"{time.time_ns()}-{secrets.token_hex(3)}"
        for (topic, date), part in sorted(groups.items()):
            folder = f"{self.root}/topic={topic}/date={date}"
            path = f"{folder}/part-{stamp}.parquet"
            table = pa.Table.from_pylist(part, schema=SCHEMA)
            if self.local:
                self._write_local(folder, path, table)
            else:  # an object store's put is atomic: the object appears whole or not at all
                self.fs.makedirs(folder, exist_ok=True)
                with self.fs.open(path, "wb") as fh:
                    pq.write_table(table, fh, compression="zstd")
            written.append(path)
        return written

    @staticmethod
    def _write_local(folder: str, path: str, table: pa.Table) -> None:
        os.makedirs(folder, exist_ok=True)
        tmp = f"{folder}/.{os.path.basename(path)}.tmp"
        with open(tmp, "wb") as fh:
            pq.write_table(table, fh, compression="zstd")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass
class Archiver:
    """Consume, buffer, flush to the archive, then commit: the loop of ``kestrel archive``.

    ``flush_rows`` / ``flush_s`` bound what is buffered (rows, and seconds
    since the oldest buffered record); ``idle_exit_s`` > 0 stops once nothing
    has arrived for that long (a batch run, and the tests).
    """

    bootstrap: str
    root: str
    hasher: KeyedHasher | None
    group_id: str = "kestrel-archive"
    topics: Sequence[str] = ARCHIVED_TOPICS
    flush_rows: int = 50_000
    flush_s: float = 10.0
    idle_exit_s: float = 0.0
    progress: Callable[[str], None] | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    archived: int = 0
    files: int = 0
    _last_flush: float = 0.0

    def run(self) -> dict[str, Any]:
        from confluent_kafka import Consumer

        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": self.group_id,
                             "enable.auto.commit": False, "auto.offset.reset": "earliest",
                             "fetch.wait.max.ms": 100, "session.timeout.ms": 10_000})
        consumer.subscribe(list(self.topics))
        writer = ArchiveWriter(self.root)
        started = time.monotonic()
        oldest = last_seen = time.monotonic()
        assigned = False
        first_record = None
        try:
            while True:
                batch = consumer.consume(5000, timeout=0.2)
                now = time.monotonic()
                for msg in batch:
                    if msg.error() is not None:
                        continue
                    if not self.rows:
                        oldest = now
                    _, ts = msg.timestamp()
                    self.rows.append(row_of(ArchivedRecord(msg.topic(), msg.partition(), msg.offset(), ts,
                                                           msg.key(), msg.value() or b""), self.hasher))
                if batch and first_record is None:
                    first_record = now
                if batch or not assigned:  # idleness counts from the group join (tansu's takes seconds)
                    last_seen = now
                    assigned = assigned or bool(consumer.assignment())
                idle = self.idle_exit_s > 0 and now - last_seen >= self.idle_exit_s
                if self.rows and (len(self.rows) >= self.flush_rows or now - oldest >= self.flush_s or idle):
                    self._flush(writer, consumer)
                if idle:
                    break
        finally:
            consumer.close()
        elapsed = time.monotonic() - started
        busy = (self._last_flush - first_record) if first_record is not None else 0.0
        return {"archived": self.archived, "files": self.files, "seconds": round(elapsed, 1),
                "rows_per_s": round(self.archived / busy, 1) if busy > 0 else None}  # first record to last file

    def _flush(self, writer: ArchiveWriter, consumer: Any) -> None:
        paths = writer.write(self.rows)
        consumer.commit(asynchronous=False)  # only now: every record consumed so far is in a durable file
        self.archived += len(self.rows)
        self.files += len(paths)
        if self.progress:
            self.progress(f"archived {self.archived:,} records in {self.files:,} files")
        self.rows = []
        self._last_flush = time.monotonic()


def read_archive(root: str, topic: str | None = None, dates: tuple[str, str] | None = None) -> pa.Table:
    """The archived rows (of one topic, between two dates inclusive), duplicates removed, in log order."""
    import fsspec
    import pyarrow.dataset as ds

    fs, base = fsspec.core.url_to_fs(root)
    if not fs.exists(base):
        return SCHEMA.empty_table()
    dataset = ds.dataset(base, filesystem=fs, format="parquet", partitioning="hive",
                         exclude_invalid_files=True, ignore_prefixes=["."])
    expr = None
    if topic is not None:
        expr = ds.field("topic") == topic
    if dates is not None:
        in_range = (ds.field("date") >= dates[0]) & (ds.field("date") <= dates[1])
        expr = in_range if expr is None else expr & in_range
    table = dataset.to_table(filter=expr, columns=SCHEMA.names)
    return deduplicate(table)


def deduplicate(table: pa.Table) -> pa.Table:
    """First copy of each record: by (topic, event_id) where there is one, else by (topic, partition, offset).

    Ordered by (topic, partition, offset): a partition's log order.
    """
    table = table.sort_by([("topic", "ascending"), ("partition", "ascending"), ("offset", "ascending")])
    seen: set[tuple[Any, ...]] = set()
    keep = []
    for i, (t, p, o, e) in enumerate(zip(*(table.column(c).to_pylist()
                                           for c in ("topic", "partition", "offset", "event_id")), strict=True)):
        ident = (t, "e", e) if e is not None else (t, "o", p, o)
        if ident not in seen:
            seen.add(ident)
            keep.append(i)
    return table.take(keep) if len(keep) < len(table) else table


def decode(table: pa.Table) -> list[dict[str, Any]]:
    """The archived documents as dicts (their JSON ``value``), in the table's order.

    Records that are not JSON objects (malformed input, archived as it came)
    have no document: they are skipped here and stay in the table's bytes.
    """
    docs = []
    for v in table.column("value").to_pylist():
        try:
            doc = orjson.loads(v) if v else None
        except orjson.JSONDecodeError:
            continue
        if isinstance(doc, dict):
            docs.append(doc)
    return docs


def iter_records(table: pa.Table) -> Iterable[ArchivedRecord]:
    for t, p, o, ts, k, v in zip(*(table.column(c).to_pylist() for c in
                                   ("topic", "partition", "offset", "timestamp_ms", "key", "value")), strict=True):
        yield ArchivedRecord(t, p, o, ts, k, v)
