"""CSV replay: column mapping, time order, gzip, invalid rows kept for the dead-letter path."""

from __future__ import annotations

import gzip

import pytest

from kestrel.feature_store.keys import KeyedHasher
from kestrel.streams.ingest.replay import csv_records, parse_mapping

CSV = """TX_ID,CUST,TERM,TX_AMOUNT,TX_DATETIME,REGION
b,c1,t1,20.0,2026-02-01 10:05:00,north
a,c1,t1,10.0,2026-02-01 10:00:00,south
c,c2,t2,abc,2026-02-01 10:07:00,north
"""
MAPPING = parse_mapping(["event_id=TX_ID,card_id=CUST,merchant_id=TERM,terminal_id=TERM",
                         "amount=TX_AMOUNT,timestamp=TX_DATETIME"])


@pytest.mark.parametrize("compressed", [False, True])
def test_rows_come_in_time_order_mapped_and_keyed(tmp_path, compressed):
    path = tmp_path / ("h.csv.gz" if compressed else "h.csv")
    path.write_bytes(gzip.compress(CSV.encode()) if compressed else CSV.encode())
    hasher = KeyedHasher(b"k")
    recs = list(csv_records(path, "transaction", MAPPING, hasher, constants={"currency": "EUR"}))
    assert [r.event_id for r in recs] == ["a", "b", "c"]
    a, _b, c = recs
    assert a.valid and a.event.merchant_id == "t1" and a.event.terminal_id == "t1" and a.event.amount == 10.0
    assert a.key == hasher.token("card", "c1").encode() and b"c1" not in a.key
    assert not c.valid and c.kind == "invalid:invalid"


def test_missing_column_is_a_clear_error(tmp_path):
    path = tmp_path / "h.csv"
    path.write_text(CSV)
    with pytest.raises(ValueError, match="NOPE"):
        list(csv_records(path, "transaction", {"amount": "NOPE"}, KeyedHasher(b"k")))


def test_bad_mapping_spec():
    with pytest.raises(ValueError, match="FIELD=COLUMN"):
        parse_mapping(["amount"])
