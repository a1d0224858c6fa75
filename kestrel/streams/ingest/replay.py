"""Replay a CSV of historical events in time order, through the same contracts.

Columns are mapped onto contract fields (``--map amount=TX_AMOUNT``); rows
that do not validate are still sent, so the worker dead-letters them with a
reason instead of the replay dropping them silently.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson
import pandas as pd

from kestrel.feature_store.keys import KeyedHasher
from kestrel.feature_store.topics import EVENT_TYPE_TOPIC
from kestrel.offline.simulator import SimRecord
from kestrel.streams.ingest.producer import partition_key
from kestrel.streams.ingest.validation import Rejection, validate_document


def parse_mapping(specs: list[str] | None) -> dict[str, str]:
    """``["amount=TX_AMOUNT", "card_id=CUSTOMER_ID,timestamp=TX_DATETIME"]`` -> field -> column.

    >>> parse_mapping(["amount=TX_AMOUNT,card_id=CID"])
    {'amount': 'TX_AMOUNT', 'card_id': 'CID'}
    """
    mapping: dict[str, str] = {}
    for spec in specs or []:
        for pair in spec.split(","):
            if pair.strip():
                field, _, column = pair.partition("=")
                if not column:
                    raise ValueError(f"bad mapping {pair!r}: use FIELD=COLUMN")
                mapping[field.strip()] = column.strip()
    return mapping


def _timestamp(value: Any) -> Any:
    if isinstance(value, int | float):
        return float(value)
    return str(value)


def csv_records(path: str | Path, event_type: str, mapping: Mapping[str, str], hasher: KeyedHasher,
                constants: Mapping[str, str] | None = None, time_field: str = "timestamp") -> Iterator[SimRecord]:
    """Rows of ``path`` (plain or .gz) as wire records, ordered by the mapped time column.

    ``mapping`` is field -> column (one column may feed several fields);
    ``constants`` fills fields the file lacks (e.g. ``currency=EUR``).
    """
    source = pd.read_csv(path)
    missing = sorted({c for c in mapping.values() if c not in source.columns})
    if missing:
        raise ValueError(f"columns not in {path}: {', '.join(missing)}")
    mapped_columns = set(mapping.values())
    frame = pd.DataFrame({
        **{c: source[c] for c in source.columns if c not in mapped_columns},
        **{field: source[column] for field, column in mapping.items()},
    })
    for field, value in (constants or {}).items():
        if field not in frame.columns:
            frame[field] = value
    if time_field not in frame.columns:
        raise ValueError(f"no {time_field!r} column: map one with --map {time_field}=COLUMN")
    order = pd.to_datetime(frame[time_field], utc=True, errors="coerce", format="mixed")
    if pd.api.types.is_numeric_dtype(frame[time_field]):
        order = pd.to_datetime(frame[time_field], unit="s", utc=True)
    frame = frame.assign(_order=order).sort_values("_order", kind="stable", na_position="last")
    stem = Path(path).name.split(".")[0]
    topic = EVENT_TYPE_TOPIC[event_type]
    for row_no, row in zip(frame.index, frame.drop(columns="_order").to_dict("records"), strict=True):
        doc = {k: (None if pd.isna(v) else v) for k, v in row.items()}
        doc = {k: v for k, v in doc.items() if v is not None}
        doc.setdefault("event_id", f"{stem}-{row_no}")
        doc["event_id"] = str(doc["event_id"])
        doc["type"] = event_type
        for id_field in ("card_id", "customer_id", "merchant_id", "terminal_id", "user_id", "item_id",
                         "transaction_id"):
            if id_field in doc:
                doc[id_field] = str(doc[id_field])
        if time_field in doc:
            doc[time_field] = _timestamp(doc[time_field])
        parsed = validate_document(doc, event_type)
        value = orjson.dumps(doc, default=str)
        if isinstance(parsed, Rejection):
            yield SimRecord(topic, b"", value, doc["event_id"], 0.0, valid=False, kind=f"invalid:{parsed.reason}")
        else:
            yield SimRecord(topic, partition_key(parsed, hasher), value, parsed.event_id, parsed.epoch_s,
                            kind=event_type, event=parsed)
