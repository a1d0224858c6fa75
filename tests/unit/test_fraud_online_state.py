"""The online learner's checkpoint: plain JSON data, restored exactly, and nothing else is loaded.

Workers share the checkpoint through Redis, so it must never be code: a
pickle (the old format) is refused without being unpickled, a damaged or
edited payload fails its checksum, an unknown version is refused. What is
loaded must be the same learner: it predicts, learns and flags drift exactly
as the one that was saved.
"""

from __future__ import annotations

import ast
import asyncio
import logging
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import orjson
import pytest
from river import drift

from kestrel.feature_store.keys import KeySpace
from kestrel.models.fraud_online import (
    BASE,
    CHECKPOINT_VERSION,
    LEARNED_IDS_KEPT,
    OnlineFraudLearner,
    _canonical,
    adwin_from_state,
    adwin_state,
    labelled_share,
)
from kestrel.streams.worker.shared_learner import SharedLearner

ROOT = Path(__file__).resolve().parents[2]
FEATURES = ("amount_z", "new_device", "night", "velocity_1h")


def label_stream(seed: int, n: int, miss_rate: float, false_alarm_rate: float) -> list[tuple]:
    """(label id, inputs, is_fraud, decision score, share) as the worker learns them: every fraud, every alert,
    audited genuine payments below the threshold (2%)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        kind = rng.random()
        if kind < 0.3:  # a fraud: alerted unless missed
            is_fraud, score = True, (0.2 if rng.random() < miss_rate else 0.9)
        elif kind < 0.6:  # an alert: a false alarm or not
            is_fraud, score = bool(rng.random() >= false_alarm_rate), 0.8
        else:  # an audited genuine payment under the threshold
            is_fraud, score = False, float(rng.uniform(0.0, 0.4))
        x = {f: float(rng.normal(1.0 if is_fraud else 0.0, 1.0)) for f in FEATURES}
        x[BASE] = float(rng.normal(2.0 if is_fraud else -3.0, 1.0))
        out.append((f"s{seed}-{i}", x, is_fraud, score, labelled_share(score, 0.5, 0.02)))
    return out


def teach(learner: OnlineFraudLearner, stream: list[tuple]) -> list:
    return [learner.learn(label_id, x, y, score, 0.5, share) for label_id, x, y, score, share in stream]


def state_of(learner: OnlineFraudLearner) -> tuple:
    m = learner.model
    return (list(m.weights.items()), m.intercept, m.optimizer.n_iterations, adwin_state(learner.missed),
            adwin_state(learner.false_alarms), learner.labels_seen, list(learner.learned))


@pytest.mark.parametrize("base_weight", [None, 1.0])
def test_a_restored_learner_predicts_learns_and_flags_drift_exactly_as_the_original(base_weight):
    original = OnlineFraudLearner(lr=0.01, base_weight=base_weight)
    history = teach(original, label_stream(1, 400, miss_rate=0.05, false_alarm_rate=0.3))
    assert not any(history) and original.labels_seen == 400
    blob = original.dumps()
    restored = OnlineFraudLearner.loads(blob)

    assert state_of(restored) == state_of(original)
    assert restored.dumps() == blob  # the same document again: nothing lost or added on the way
    probe = [x for _, x, *_ in label_stream(2, 50, 0.0, 0.0)]
    assert np.array_equal(restored.predict(probe), original.predict(probe))
    assert all(restored.weight_vector(FEATURES)[i] == original.weight_vector(FEATURES)[i] for i in (1, 2))
    assert restored.seen("s1-0") and restored.learn("s1-0", probe[0], True, 0.9) is None  # still learned once

    # The same continued stream on both, in which the decisions start missing frauds: identical at every step.
    later = label_stream(3, 1500, miss_rate=0.6, false_alarm_rate=0.7)
    events_original, events_restored = [], []
    for label in later:
        events_original += teach(original, [label])
        events_restored += teach(restored, [label])
        assert events_restored[-1] == events_original[-1]
    flagged = [e for e in events_original if e is not None]
    assert {e.metric for e in flagged} == {"missed_fraud_rate", "false_alarm_rate"}  # drift was really exercised
    assert state_of(restored) == state_of(original)
    assert np.array_equal(restored.predict(probe), original.predict(probe))
    assert restored.dumps() == original.dumps()


def stream_with_shifts(seed: int, n: int) -> list[float]:
    rng = np.random.default_rng(seed)
    rates = np.repeat([0.05, 0.5, 0.1, 0.8, 0.3], n // 5)
    return [float(rng.random() < r) for r in rates]


@pytest.mark.parametrize("cut", [0, 1, 9, 31, 32, 333, 1234, 2999])
def test_a_restored_adwin_gives_the_same_drift_decisions_on_a_continued_stream(cut):
    values = stream_with_shifts(7, 6000)
    original = drift.ADWIN(delta=0.002)
    for v in values[:cut]:
        original.update(v)
    restored = adwin_from_state(orjson.loads(orjson.dumps(adwin_state(original))))
    assert restored._helper.__getstate__() == original._helper.__getstate__()
    decisions = []
    for v in values[cut:]:
        original.update(v)
        restored.update(v)
        decisions.append(original.drift_detected)
        assert (restored.drift_detected, restored.estimation, restored.width, restored.variance) == \
               (original.drift_detected, original.estimation, original.width, original.variance)
    assert sum(decisions) >= 2  # the continued stream holds drifts to agree on
    assert restored._helper.__getstate__() == original._helper.__getstate__()


def test_an_adwin_saved_just_as_it_flagged_drift_resets_on_its_next_update_as_the_original():
    values = stream_with_shifts(11, 5000)
    original = drift.ADWIN(delta=0.002)
    i = 0
    while not original.drift_detected:
        original.update(values[i])
        i += 1
    state = adwin_state(original)
    assert state["drift_detected"] is True and len(state["window"]["buckets"]) > 1
    restored = adwin_from_state(state)
    for v in values[i:]:
        original.update(v)
        restored.update(v)
        assert restored.drift_detected == original.drift_detected and restored.width == original.width
    assert restored._helper.__getstate__() == original._helper.__getstate__()


def test_the_checkpoint_is_a_versioned_checksummed_json_document():
    learner = OnlineFraudLearner(lr=0.05)
    teach(learner, label_stream(4, 300, 0.1, 0.3))
    doc = orjson.loads(learner.dumps())
    assert set(doc) == {"format", "version", "sha256", "payload"} and doc["version"] == CHECKPOINT_VERSION
    payload = doc["payload"]
    assert set(payload) >= {"params", "model", "detectors", "labels_seen", "learned"}
    assert dict(payload["model"]["weights"]) == learner.model.weights
    assert payload["learned"] == list(learner.learned) and payload["labels_seen"] == 300
    assert set(payload["detectors"]) == {"missed", "false_alarms"}


def test_the_learned_ids_keep_their_limit_and_order_across_a_checkpoint():
    learner = OnlineFraudLearner(lr=0.05)
    for i in range(LEARNED_IDS_KEPT + 20):
        learner.learn(f"id{i}", {"x": 1.0}, False, 0.1)
    restored = OnlineFraudLearner.loads(learner.dumps())
    assert list(restored.learned) == list(learner.learned) and restored.learned.maxlen == LEARNED_IDS_KEPT
    assert not restored.seen("id19") and restored.seen("id20")
    restored.learn("new", {"x": 1.0}, False, 0.1)
    learner.learn("new", {"x": 1.0}, False, 0.1)
    assert not restored.seen("id20") and list(restored.learned) == list(learner.learned)


def edited(blob: bytes, change, fix_checksum: bool = False) -> bytes:
    import hashlib

    doc = orjson.loads(blob)
    change(doc)
    if fix_checksum:
        doc["sha256"] = hashlib.sha256(_canonical(doc["payload"])).hexdigest()
    return orjson.dumps(doc)


@pytest.fixture
def blob() -> bytes:
    learner = OnlineFraudLearner(lr=0.05)
    teach(learner, label_stream(5, 300, 0.1, 0.3))
    return learner.dumps()


def test_a_changed_weight_fails_the_checksum(blob):
    def nudge(doc):
        doc["payload"]["model"]["weights"][0][1] += 1e-9

    with pytest.raises(ValueError, match="sha256"):
        OnlineFraudLearner.loads(edited(blob, nudge))
    for damaged in (blob[:-10], blob.replace(b'"labels_seen":300', b'"labels_seen":301')):
        with pytest.raises(ValueError):
            OnlineFraudLearner.loads(damaged)


def test_an_unknown_version_or_format_is_refused(blob):
    for version in (CHECKPOINT_VERSION + 1, 0, "1", None):
        with pytest.raises(ValueError, match="unknown version"):
            OnlineFraudLearner.loads(edited(blob, lambda d, v=version: d.update(version=v)))
    with pytest.raises(ValueError, match="not a Kestrel"):
        OnlineFraudLearner.loads(edited(blob, lambda d: d.update(format="something.else")))
    for other in (b"[]", b"{}", b"null", b'"text"'):
        with pytest.raises(ValueError):
            OnlineFraudLearner.loads(other)


@pytest.mark.parametrize("change, why", [
    (lambda p: p["detectors"]["missed"]["window"].update(width=1e6), "width"),
    (lambda p: p["detectors"]["missed"]["window"]["buckets"][0].update(current_idx=99), "integer"),
    (lambda p: p["detectors"]["false_alarms"]["window"]["buckets"][0]["totals"].pop(), "totals"),
    (lambda p: p["detectors"]["missed"]["params"].update(clock=0), "integer"),
    (lambda p: p["model"].update(weights={"x": 1.0}), "pairs"),
    (lambda p: p["learned"].append(p["learned"][0]), "twice"),
    (lambda p: p.pop("labels_seen"), "labels_seen"),
])
def test_a_payload_with_a_good_checksum_but_not_a_learners_state_is_refused(blob, change, why):
    """The checksum is no signature; the shapes are checked too, so river is never handed a window it would panic on."""
    with pytest.raises(ValueError, match=why):
        OnlineFraudLearner.loads(edited(blob, lambda d: change(d["payload"]), fix_checksum=True))


class WritesAFile:
    """A pickle that creates a file when unpickled: what anyone who can write the Redis key could store."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_a_pickle_is_refused_without_being_unpickled(tmp_path, protocol):
    target = tmp_path / "pwned"
    evil = pickle.dumps(WritesAFile(target), protocol=protocol)
    with pytest.raises(ValueError, match=r"pickle|not JSON"):
        OnlineFraudLearner.loads(evil)
    assert not target.exists()
    pickle.loads(evil).close()  # the control: unpickled, this blob would indeed have run
    assert target.exists()


def test_an_old_pickle_checkpoint_is_refused(tmp_path):
    learner = OnlineFraudLearner(lr=0.05)
    learner.learn("a", {"x": 1.0}, True, 0.1)
    with pytest.raises(ValueError, match="pickle"):
        OnlineFraudLearner.loads(pickle.dumps(learner, protocol=pickle.HIGHEST_PROTOCOL))


def test_no_pickle_in_the_learner_modules():
    for path in ("kestrel/models/fraud_online.py", "kestrel/streams/worker/shared_learner.py"):
        tree = ast.parse((ROOT / path).read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not imported & {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}, path


class FakeRedis:
    """The three calls SharedLearner makes, over a dict (the CAS script as in kestrel.streams.worker.shared_learner)."""

    def __init__(self) -> None:
        self.hashes: dict[str, dict[str, bytes]] = {}

    async def hget(self, key, field):
        return self.hashes.get(key, {}).get(field)

    async def hmget(self, key, fields):
        h = self.hashes.get(key, {})
        return [h.get(f) for f in fields]

    def register_script(self, _source):
        async def cas(keys, args):
            h = self.hashes.setdefault(keys[0], {})
            rev = h.get("rev", b"").decode()
            if rev != args[0]:
                return 0
            h["blob"], h["rev"] = args[1], str((int(rev) if rev else 0) + 1).encode()
            return 1

        return cas


def test_a_worker_that_finds_a_pickle_in_redis_warns_and_carries_on_with_a_fresh_learner(tmp_path, caplog):
    target = tmp_path / "pwned"
    client = FakeRedis()
    keys = KeySpace("kestrel-test-state")
    start = OnlineFraudLearner(lr=0.05)
    start.learn("warm", {"x": 1.0}, True, 0.9)
    scorer = SimpleNamespace(version="v1", new_learner=lambda: OnlineFraudLearner.loads(start.dumps()))
    shared = SharedLearner(client, keys, scorer, ttl_s=60, refresh_s=0.0)
    client.hashes[shared.key] = {"blob": pickle.dumps(WritesAFile(target)), "rev": b"7"}

    async def run():
        with caplog.at_level(logging.WARNING, logger="kestrel.worker"):
            fresh = await shared.current()
        n = await shared.update(lambda learner: (learner.learn("next", {"x": 0.0}, False, 0.1), learner.labels_seen)[1])
        return fresh, n, await SharedLearner(client, keys, scorer, ttl_s=60).current()

    fresh, learned, reloaded = asyncio.run(run())
    assert not target.exists()
    assert fresh.labels_seen == 1 and fresh.seen("warm")  # the scorer's starting learner
    assert any("checkpoint refused" in r.getMessage() and "pickle" in r.getMessage() for r in caplog.records)
    assert learned == 2 and client.hashes[shared.key]["rev"] == b"8"  # the next batch saved over the pickle
    assert orjson.loads(client.hashes[shared.key]["blob"])["version"] == CHECKPOINT_VERSION
    assert reloaded.labels_seen == 2 and reloaded.seen("next")
