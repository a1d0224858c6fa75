"""Point-in-time fraud training data from a payment history (CSV or simulator).

Every payment gets the feature dict the online path would have logged for it:
the same feature sets recomputed offline (:func:`kestrel.offline.features.compute_features`,
checked for parity with the online store), the terminal's fraud counts from
labels already known at that time (the 7-day-delayed window), and the same
derived values and context (:func:`kestrel.models.fraud_features.payment_features`).
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kestrel.feature_store.definitions import Windowed
from kestrel.feature_store.sets import CARD_DEVICE, CARD_PROFILE, CARD_TERMINAL, TERMINAL_ACTIVITY, TERMINAL_RISK
from kestrel.models.fraud_features import payment_features
from kestrel.offline.features import compute_features


@dataclass(frozen=True, slots=True)
class Payment:
    """The fields of a transaction the fraud features read (duck-types kestrel.feature_store.schemas.Transaction)."""

    event_id: str
    card_id: str
    merchant_id: str
    terminal_id: str | None
    amount: float
    epoch_s: float
    card_present: bool | None = None
    device_id: str | None = None


@dataclass(frozen=True)
class Columns:
    """Which CSV column holds which field (``kestrel eval fraud --id-col ...``)."""

    id: str = "event_id"
    time: str = "timestamp"
    entity: str = "card_id"
    terminal: str = "terminal_id"
    amount: str = "amount"
    label: str = "is_fraud"
    merchant: str | None = None
    card_present: str | None = None
    device: str | None = None
    segment: str | None = None


# The columns of `kestrel produce --history-csv` (kestrel.offline.simulator.write_history).
SIMULATED_COLUMNS = Columns(merchant="merchant_id", card_present="card_present", device="device_id")


def read_history(path: str | Path, cols: Columns) -> pd.DataFrame:
    """Read a (possibly gzipped) CSV, parse times to epoch seconds, sort by time. Raises on a missing column."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as fh:
        frame = pd.read_csv(fh, dtype=str, keep_default_na=False)
    wanted = [c for c in (cols.id, cols.time, cols.entity, cols.terminal, cols.amount, cols.label, cols.merchant,
                          cols.card_present, cols.device, cols.segment) if c]
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: no column(s) {missing}; columns are {list(frame.columns)}")
    raw_time = frame[cols.time]
    numeric = pd.to_numeric(raw_time, errors="coerce")
    if numeric.notna().all():
        epoch = numeric.astype(float)
    else:
        parsed = pd.to_datetime(raw_time, utc=True, format="mixed")
        epoch = (parsed - pd.Timestamp(0, tz="UTC")).dt.total_seconds()  # resolution-independent
    out = pd.DataFrame({
        "event_id": frame[cols.id].astype(str),
        "epoch_s": epoch.astype(float),
        "card_id": frame[cols.entity].astype(str),
        "terminal_id": frame[cols.terminal].astype(str),
        "amount": pd.to_numeric(frame[cols.amount], errors="raise").astype(float),
        "label": pd.to_numeric(frame[cols.label], errors="coerce"),
    })
    out["merchant_id"] = frame[cols.merchant].astype(str) if cols.merchant else out["terminal_id"]
    out["card_present"] = frame[cols.card_present].map(_bool) if cols.card_present else None
    out["device_id"] = frame[cols.device].replace("", None) if cols.device else None
    if cols.segment:
        out["segment"] = frame[cols.segment].astype(str)
    return out.sort_values("epoch_s", kind="stable").reset_index(drop=True)


def _bool(value: str) -> bool | None:
    v = value.strip().lower()
    return True if v in ("1", "true", "yes", "t") else False if v in ("0", "false", "no", "f") else None


def payments_of(frame: pd.DataFrame) -> list[Payment]:
    present = frame["card_present"] if "card_present" in frame else [None] * len(frame)
    device = frame["device_id"] if "device_id" in frame else [None] * len(frame)
    return [Payment(str(i), str(c), str(m), str(t) if t else None, float(a), float(ts),
                    p if p in (True, False) else None, d if isinstance(d, str) and d else None)
            for i, c, m, t, a, ts, p, d in zip(frame["event_id"], frame["card_id"], frame["merchant_id"],
                                               frame["terminal_id"], frame["amount"], frame["epoch_s"], present,
                                               device, strict=True)]


def terminal_risk(payments: Sequence[Payment], is_fraud: np.ndarray) -> pd.DataFrame:
    """Terminal fraud and label counts over the delayed window, as the online store would read them.

    Labelled payments (``is_fraud`` not NaN) are counted in the bucket of the
    payment's time; each payment reads the window ending ``delay`` before it,
    so only labels old enough to have arrived are used.
    """
    terminals = np.array([TERMINAL_RISK.entity_id_of(_Risk(p.terminal_id or f"merchant:{p.merchant_id}"))
                          for p in payments], dtype=object)
    t = np.array([p.epoch_s for p in payments], dtype=float)
    codes, _ = pd.factorize(terminals)
    known = ~np.isnan(is_fraud)
    out: dict[str, np.ndarray] = {}
    for feat in TERMINAL_RISK.vector:
        assert isinstance(feat, Windowed)
        span = 1 << 24  # bucket indices (days since 1970) stay far below this
        bucket = np.floor(t / feat.bucket_s).astype(np.int64)
        keys = codes[known].astype(np.int64) * span + bucket[known]
        order = np.argsort(keys, kind="stable")
        keys = keys[order]
        values = (is_fraud[known][order] if feat.agg == "sum" else np.ones(known.sum()))
        cum = np.concatenate([[0.0], np.cumsum(values)])
        first, last = np.array([feat.bounds(x) for x in t]).T if len(t) else (np.array([]), np.array([]))
        lo = np.searchsorted(keys, codes.astype(np.int64) * span + first, side="left")
        hi = np.searchsorted(keys, codes.astype(np.int64) * span + last, side="right")
        out[feat.name] = cum[hi] - cum[lo]
    return pd.DataFrame(out)


@dataclass(frozen=True, slots=True)
class _Risk:
    terminal_id: str


def feature_rows(payments: Sequence[Payment], is_fraud: np.ndarray) -> list[dict[str, object]]:
    """The feature dict of every payment (log order), point-in-time correct."""
    card = compute_features(CARD_PROFILE, payments).to_dict("records")
    terminal = compute_features(TERMINAL_ACTIVITY, payments).to_dict("records")
    pair_terminal = compute_features(CARD_TERMINAL, payments).to_dict("records")
    pair_device = compute_features(CARD_DEVICE, payments).to_dict("records")
    risk = terminal_risk(payments, is_fraud).to_dict("records")
    return [payment_features(p.amount, p.epoch_s, p.card_present, p.device_id, {**c, **t, **pt, **pd_, **r})
            for p, c, t, pt, pd_, r in zip(payments, card, terminal, pair_terminal, pair_device, risk, strict=True)]


def fraud_features(transactions: Sequence[Any]) -> list[dict[str, Any]]:
    """For each transaction (log order), the feature dict its online fraud decision carries.

    Terminal risk comes from labels, which the online path applies as they
    arrive; without a label log here it is taken as empty (no label known yet).
    """
    return feature_rows(transactions, np.full(len(transactions), np.nan))
