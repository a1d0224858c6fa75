"""Point-in-time training sets from the event archive (:mod:`kestrel.offline.archive`).

Fraud: each payment's decision as logged (its feature vector exactly as the
model saw it, never features computed later) joined to the labels that had
arrived by the cut-off; a label that arrived after it is not known yet, and
a payment without a label is taken as genuine only once it is older than the
label delay at the cut-off (:func:`~kestrel.offline.fraud_logs.join_logged`).
Decisions made after the cut-off are left out. The time-based train and
validation split is the trainer's (:func:`~kestrel.offline.fraud_train.fit_fraud_model`).

Recommendations: the interactions up to the cut-off, rebuilt in time order
(users as the archive's keyed tokens), in the frame the recommender trains on
(:func:`~kestrel.offline.recs_data.load_interactions`).
"""

from __future__ import annotations

import pandas as pd

from kestrel.feature_store import topics
from kestrel.feature_store.schemas import epoch_of
from kestrel.offline.archive import decode, read_archive
from kestrel.offline.fraud_logs import LoggedTrainingSet, join_logged


def fraud_training_set(root: str, cutoff_s: float, assume_genuine_after_s: float) -> LoggedTrainingSet:
    """Decisions and labels known at ``cutoff_s`` (epoch seconds), joined point in time."""
    decisions = [d for d in decode(read_archive(root, topics.FRAUD_DECISIONS))
                 if d.get("type") == "fraud_decision" and d.get("features") and epoch_of(d["event_time"]) <= cutoff_s]
    examples = [e for e in decode(read_archive(root, topics.TRAINING_EXAMPLES))
                if e.get("type") == "training_example" and e.get("label_time")
                and epoch_of(e["label_time"]) <= cutoff_s]
    return join_logged(decisions, examples, assume_genuine_after_s, as_of=cutoff_s)


def interaction_frame(root: str, cutoff_s: float) -> pd.DataFrame:
    """Columns ``user``, ``item``, ``time``, ``category`` of the interactions up to ``cutoff_s``, time-sorted."""
    rows = []
    for d in decode(read_archive(root, topics.INTERACTIONS)):
        if d.get("type") != "interaction" or not d.get("timestamp"):
            continue
        t = epoch_of(d["timestamp"])
        if t <= cutoff_s:
            rows.append((str(d["user_id"]), str(d["item_id"]), t, str((d.get("context") or {}).get("category", ""))))
    frame = pd.DataFrame(rows, columns=["user", "item", "time", "category"])
    return frame.sort_values(["time"], kind="stable").reset_index(drop=True)
