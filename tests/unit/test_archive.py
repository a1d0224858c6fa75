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


def test_input_identifiers_are_tokenised_and_location_dropped_before_archiving():
    from kestrel.feature_store.keys import KeyedHasher

    hasher = KeyedHasher(b"k")
    doc = {"type": "transaction", "event_id": "t1", "card_id": "4111111111111111", "customer_id": "cust-9",
           "ip": "10.1.2.3", "geo": {"lat": 48.85, "lon": 2.35}, "amount": 12.5, "timestamp": "2026-12-03T00:00:00Z"}
    row = row_of(_rec("events.transactions", 0, doc), hasher)
    stored = orjson.loads(row["value"])
    assert b"4111111111111111" not in row["value"] and b"cust-9" not in row["value"] and b"10.1.2.3" not in row["value"]
    assert stored["card_id"] == hasher.token("card", "4111111111111111") and "geo" not in stored
    assert stored["amount"] == 12.5 and row["event_id"] == "t1"
    decision = {"type": "fraud_decision", "event_id": "t1", "card": "already-a-token"}
    assert row_of(_rec("decisions.fraud", 0, decision), hasher)["value"] == orjson.dumps(decision)  # outputs as-is


def test_a_point_in_time_fraud_set_uses_logged_features_and_only_labels_known_at_the_cutoff(tmp_path):
    from kestrel.feature_store.schemas import epoch_of
    from kestrel.offline.training_sets import fraud_training_set, interaction_frame

    root = str(tmp_path / "archive")
    day = 86400.0

    def decision(i: int, when: str) -> dict:
        return {"type": "fraud_decision", "event_id": f"p{i}", "event_time": when, "card": f"c{i}",
                "features": {"amount": float(i), "logged_only": 1.0}}

    def example(i: int, label: int, when: str) -> dict:
        return {"type": "training_example", "event_id": f"l{i}", "transaction_id": f"p{i}", "label": label,
                "label_time": when}

    docs = [("decisions.fraud", decision(1, "2026-11-01T00:00:00Z")),
            ("decisions.fraud", decision(2, "2026-11-02T00:00:00Z")),
            ("decisions.fraud", decision(3, "2026-11-02T12:00:00Z")),
            ("decisions.fraud", decision(4, "2026-11-09T00:00:00Z")),   # too recent to assume genuine
            ("decisions.fraud", decision(5, "2026-11-20T00:00:00Z")),   # after the cut-off
            ("training.examples", example(1, 1, "2026-11-03T00:00:00Z")),
            ("training.examples", example(2, 1, "2026-11-12T00:00:00Z")),  # arrives after the cut-off
            ("events.interactions", {"type": "interaction", "event_id": "i1", "user_id": "u", "item_id": "b",
                                     "kind": "view", "timestamp": "2026-11-02T00:00:00Z",
                                     "context": {"category": "x"}}),
            ("events.interactions", {"type": "interaction", "event_id": "i0", "user_id": "u", "item_id": "a",
                                     "kind": "view", "timestamp": "2026-11-01T00:00:00Z"})]
    ArchiveWriter(root).write([row_of(_rec(topic, i, doc)) for i, (topic, doc) in enumerate(docs)])
    cutoff = epoch_of("2026-11-10T00:00:00Z")
    data = fraud_training_set(root, cutoff, assume_genuine_after_s=7 * day)
    assert data.ids == ["p1", "p2", "p3"] and data.labels.tolist() == [1, 0, 0]  # p2's fraud label is not known yet
    assert data.rows == [decision(i, "")["features"] for i in (1, 2, 3)]  # the logged vectors, as they were
    assert (data.labelled, data.assumed_genuine, data.left_out) == (1, 2, 1)
    frame = interaction_frame(root, cutoff)
    assert frame["item"].tolist() == ["a", "b"] and frame["category"].tolist() == ["", "x"]  # rebuilt in time order
