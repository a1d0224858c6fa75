"""Archive rows, files and reads without a broker: on an fsspec object store (memory://) and a local folder."""

from __future__ import annotations

import secrets

import orjson
import pytest

from kestrel.offline.archive import ArchivedRecord, ArchiveWriter, decode, read_archive, row_of


def _rec(topic: str, offset: int, doc: dict | bytes, partition: int = 0) -> ArchivedRecord:
    value = doc if isinstance(doc, bytes) else orjson.dumps(doc)
    return ArchivedRecord(topic, partition, offset, 1_764_000_000_000, b"k", value)


@pytest.mark.parametrize("local", [True, False])
def test_written_twice_read_once_by_event_id_or_by_coordinates(tmp_path, local):
    root = str(tmp_path / "archive") if local else f"memory://archive-{secrets.token_hex(4)}"
    writer = ArchiveWriter(root)
    rows = [row_of(_rec("decisions.fraud", i, {"type": "fraud_decision", "event_id": f"e{i}",
                                               "event_time": f"2026-12-0{1 + i % 2}T00:00:00Z"}))
            for i in range(10)]
    rows.append(row_of(_rec("events.transactions", 0, b"\xff not json")))
    assert len(writer.write(rows)) == 3  # two dates of decisions, one of raw input
    writer.write(rows[3:])  # a crash after the files, before the commit: the same records again
    writer.write([row_of(_rec("decisions.fraud", 99, {"type": "fraud_decision", "event_id": "e4",
                                                      "event_time": "2026-12-01T00:00:00Z"}))])  # a resend
    table = read_archive(root)
    assert table.num_rows == 11
    assert sorted(d["event_id"] for d in decode(table)) == sorted(f"e{i}" for i in range(10))
    assert read_archive(root, "decisions.fraud", dates=("2026-12-02", "2026-12-02")).num_rows == 5
    raw = read_archive(root, "events.transactions")
    assert raw.column("value").to_pylist() == [b"\xff not json"] and raw.column("event_id").to_pylist() == [None]
    assert read_archive(str(tmp_path / "nothing")).num_rows == 0


def test_rows_keep_the_record_and_its_coordinates():
    row = row_of(_rec("events.labels", 7, {"type": "label", "event_id": "l1", "timestamp": "2026-12-03T01:02:03Z"},
                      partition=3))
    assert (row["topic"], row["partition"], row["offset"], row["event_id"], row["type"]) == \
        ("events.labels", 3, 7, "l1", "label")
    assert row["event_time"] == "2026-12-03T01:02:03Z" and orjson.loads(row["value"])["event_id"] == "l1"
