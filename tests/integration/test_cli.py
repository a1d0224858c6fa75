"""The `kestrel` commands end to end: demo, produce (simulator and CSV replay), schema."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kestrel.feature_store import topics

pytestmark = pytest.mark.integration


def _kestrel(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kestrel", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_demo_reconciles_every_event(redis_url):
    # The first demo of a fresh clone trains both demo models first: minutes on a slow, shared 2-core machine.
    env = {k: v for k, v in os.environ.items() if k != "KESTREL_BROKER"}
    env["REDIS_URL"] = redis_url
    proc = subprocess.run([sys.executable, "-m", "kestrel", "demo", "--events", "2500", "--rate", "800",
                           "--invalid-share", "0.03", "--label-delay", "60", "--json"],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["events_sent"] == 2500
    assert summary["lost"] == 0 and summary["duplicates"] == 0
    assert summary["deadlettered"] == summary["invalid_injected"] > 0
    assert summary["events_valid"] + summary["deadlettered"] == 2500
    assert summary["fraud_decisions"] > 0 and summary["recommendation_requests"] > 0
    assert 0 < summary["p50_ms"] <= summary["p99_ms"]
    for key in ("events_sent", "events_valid", "deadlettered", "fraud_decisions", "recommendation_requests",
                "lost", "duplicates", "p50_ms", "p99_ms", "events_per_s"):
        assert key in summary
    assert "embedded tansu" in proc.stderr and "redis:" in proc.stderr


def test_demo_promotes_a_second_version_of_both_models_midway_through_the_gate(redis_url):
    env = {k: v for k, v in os.environ.items() if k != "KESTREL_BROKER"}
    env["REDIS_URL"] = redis_url
    proc = subprocess.run([sys.executable, "-m", "kestrel", "demo", "--events", "3000", "--rate", "800",
                           "--recs-every", "0", "--promote-midway", "--json"],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["lost"] == 0 and summary["duplicates"] == 0
    assert summary["events_sent"] == 3000 + 750  # the stream's last quarter waits for the gate's decision
    promotion, versions = summary["promotion"], summary["decisions_by_version"]
    assert promotion["gate"] in ("promote", "refused"), promotion
    assert sum(versions.values()) == summary["fraud_decisions"]
    if promotion["gate"] == "promote":  # swapped: the later payments were decided by the new version
        assert summary["swaps"] == 1 and versions.get(promotion["candidate"], 0) > 0 and len(versions) == 2
        assert promotion["candidate_ap"] > promotion["champion_ap"]
    else:  # refused: the reasons say why, and nothing moved
        assert summary["swaps"] == 0 and len(versions) == 1 and promotion["reasons"]
    recs, answered = promotion["recs"], summary["recommendations_by_version"]  # the recommender, the same way
    assert recs["gate"] in ("promote", "refused") and sum(answered.values()) > 0, (recs, answered)
    if recs["gate"] == "promote":  # the worker heard the announcement: later answers came from the candidate
        assert answered.get(recs["candidate"], 0) > 0 and len(answered) == 2, answered
    else:
        assert len(answered) == 1 and recs["reasons"], (recs, answered)


def test_demo_experiment_finds_the_truly_better_model(redis_url):
    """``--experiment``: control runs a champion trained on shuffled labels, B the trained model. The worker
    routes, logs and counts; the summary's verdict comes from the live results it counted."""
    env = {k: v for k, v in os.environ.items() if k != "KESTREL_BROKER"}
    env["REDIS_URL"] = redis_url
    proc = subprocess.run([sys.executable, "-m", "kestrel", "demo", "--events", "8000", "--rate", "800",
                           "--recs-every", "0", "--label-delay", "300", "--experiment", "--json"],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["lost"] == 0 and summary["duplicates"] == 0
    exp = summary["experiment"]
    control, challenger = exp["variants"]["control"], exp["variants"]["challenger"]
    assert control["units"] > 100 and challenger["units"] > 100 and not exp["srm"], exp
    assert min(control["frauds"], challenger["frauds"]) >= 30, exp  # labelled frauds in both: a real comparison
    assert challenger["recall"] > control["recall"], exp
    assert exp["decision"] in ("ship", "keep running") and exp["breaches"] == [], exp
    if exp["decision"] == "ship":
        assert exp["verdict"].startswith("B is better on recall"), exp


def test_csv_replay_in_time_order_with_column_mapping(settings, worker, outputs, tmp_path):
    rows = [
        ("TX_ID", "CUSTOMER", "TERMINAL", "TX_AMOUNT", "TX_DATETIME"),
        ("a3", "c1", "t1", "30.00", "2026-02-01 10:02:00"),
        ("a1", "c1", "t1", "10.00", "2026-02-01 10:00:00"),
        ("a2", "c2", "t2", "20.00", "2026-02-01 10:01:00"),
        ("a4", "c1", "t9", "-5", "2026-02-01 10:03:00"),
    ]
    path = tmp_path / "history.csv"
    path.write_text("\n".join(",".join(r) for r in rows) + "\n")
    env = {**settings.to_env()}
    proc = _kestrel("produce", "--csv", str(path), "--type", "transaction", "--rate", "0",
                    "--map", "event_id=TX_ID,card_id=CUSTOMER,merchant_id=TERMINAL,terminal_id=TERMINAL",
                    "--map", "amount=TX_AMOUNT", "--map", "timestamp=TX_DATETIME", "--set", "currency=EUR", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "1 invalid" in proc.stderr
    worker.start()
    outputs.wait_for(topics.FRAUD_DECISIONS, {"a1", "a2", "a3"}, timeout_s=30)
    outputs.wait_for(topics.DEADLETTER, {"a4"}, timeout_s=30)
    by_id = {d["event_id"]: d for d in outputs.docs[topics.FRAUD_DECISIONS]}
    # a1 happened before a3 on the same card: a3 sees two payments in its 10-minute window
    assert by_id["a3"]["features"]["txn_count_10m"] == 2.0
    assert by_id["a3"]["features"]["seconds_since_prev"] == 120.0
    dl = outputs.docs[topics.DEADLETTER][0]
    assert dl["field"] == "amount"


def test_schema_command_exports_all_contracts():
    proc = _kestrel("schema")
    doc = json.loads(proc.stdout)
    assert set(doc["$defs"]) == {"transaction", "interaction", "label"}
    assert "amount" in doc["$defs"]["transaction"]["required"]
    assert doc["$defs"]["interaction"]["properties"]["kind"]["enum"] == ["view", "click", "add_to_cart", "purchase"]


def test_bench_features_reports_every_measure(redis_url):
    proc = _kestrel("bench", "features", "--events", "3000", "--entities", "300", "--naive-events", "300",
                    "--reads", "200", "--json", env={"REDIS_URL": redis_url})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("write_events_per_s", "naive_write_events_per_s", "read_p50_ms", "read_p99_ms", "batch_read_p99_ms",
                "bytes_per_entity"):
        assert result[key] > 0, key
    assert result["write_events_per_s"] > result["naive_write_events_per_s"]  # one round trip per batch wins
    assert result["read_p50_ms"] <= result["read_p99_ms"]


def test_erase_command_removes_a_subject(settings, redis_client):
    from kestrel.feature_store.definitions import compile_event
    from kestrel.feature_store.keys import KeyedHasher, KeySpace, escape_glob
    from kestrel.feature_store.redis_store import RedisOnlineStore
    from kestrel.feature_store.schemas import Transaction
    from kestrel.feature_store.sets import CARD_DEVICE, CARD_PROFILE, CARD_TERMINAL

    keys, hasher = KeySpace(settings.redis_prefix), KeyedHasher(settings.hash_key.encode())
    txn = Transaction(event_id="er-1", card_id="4000123412341234", merchant_id="m", terminal_id="t",
                      amount=12.0, currency="EUR", timestamp=1_767_225_600, device_id="phone-1")
    store = RedisOnlineStore(redis_client, 3600, keys, hasher)
    sets = (CARD_PROFILE, CARD_TERMINAL, CARD_DEVICE)
    store.apply_batch([compile_event(fs, txn, keys, hasher) for fs in sets])
    pair_keys = [compile_event(fs, txn, keys, hasher).entity_key for fs in (CARD_TERMINAL, CARD_DEVICE)]

    def stored(entity_key: str) -> bool:  # the entity's hash, head or parts (a head-only set keeps only a head)
        return bool(list(redis_client.scan_iter(match=escape_glob(entity_key) + "*")))

    assert all(stored(k) for k in pair_keys)  # card x terminal / device state exists ...
    proc = _kestrel("erase", "--entity", "card:4000123412341234", env=settings.to_env())
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["keys_deleted"] >= 4 and "4000" not in proc.stdout
    assert not list(redis_client.scan_iter(match=f"{keys.entity('card', report['token'])}*"))
    assert not any(stored(k) for k in pair_keys)  # ... and goes with the card
    replay = Transaction(**{**txn.model_dump(), "event_id": "er-2"})
    store.apply_batch([compile_event(fs, replay, keys, hasher) for fs in sets])  # a replay after erasure
    assert not any(stored(k) for k in pair_keys)  # is refused by the card's tombstone


def test_fraud_history_train_and_eval_commands(tmp_path):
    """`kestrel produce --history-csv`, `kestrel train fraud`, `kestrel eval fraud --json` on a small history."""
    history = tmp_path / "history.csv.gz"
    proc = _kestrel("produce", "--history-csv", str(history), "--days", "6", "--payments-per-day", "2000",
                    "--seed", "3")
    assert proc.returncode == 0 and history.exists(), proc.stderr
    columns = ["--merchant-col", "merchant_id", "--card-present-col", "card_present", "--device-col", "device_id",
               "--epochs", "5", "--members", "2"]
    proc = _kestrel("train", "fraud", "--csv", str(history), "--out", str(tmp_path / "models"), *columns)
    assert proc.returncode == 0, proc.stderr[-2000:]
    trained = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (tmp_path / "models" / trained["model_version"] / "meta.json").exists()
    assert "epoch" in proc.stderr  # progress is shown
    proc = _kestrel("eval", "fraud", "--csv", str(history), "--train-days", "3", "--delay-days", "1",
                    "--test-days", "2", "--segment-col", "region", "--json", *columns)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    metrics = ("roc_auc", "average_precision", "card_precision_at_100", "recall_at_1pct_alerts", "score_p99_ms")
    assert set(metrics) <= set(summary["kestrel"])
    assert {"logistic_regression", "gradient_boosted_trees", "river_alone"} <= set(summary["baselines"])
    for name, m in [("kestrel", summary["kestrel"]), *summary["baselines"].items()]:
        assert 0.0 <= m["average_precision"] <= 1.0 and m["score_p99_ms"] > 0, name
    assert summary["test_rows"] > 0 and summary["test_frauds"] > 0 and summary["train_rows"] > 0
    assert summary["kestrel"]["average_precision"] > summary["baselines"]["rules"]["average_precision"]
    assert set(summary["segments"]) == {"north", "south", "east", "west"}
    assert summary["warm_up_days"] < summary["longest_feature_window_days"] == 37.0  # a 6-day history is cold
    assert "partial windows" in proc.stderr  # and the user is told the comparison is skewed
    # The river layer learned the labels the worker's stream would carry (frauds, alerts' verdicts, 2% audits)
    # as they came back: some, and far fewer than the payments.
    assert summary["label_audit_share"] == 0.02
    assert 0 < summary["online"]["labels_learned"] < summary["test_rows"] / 4
    for name, gain in summary["kestrel_ap_gain"].items():  # paired bootstrap against every baseline
        lo, hi = gain["ci95"]
        assert gain["se"] >= 0
        assert lo <= hi and gain["gain"] == pytest.approx(
            summary["kestrel"]["average_precision"] - summary["baselines"][name]["average_precision"], abs=2e-4)


def test_rebuild_heads_command_restores_read_heads(settings, redis_client):
    """Data stored without read heads (an older version) gets them back from `kestrel rebuild-heads`; a head-only
    set's heads are its state, so there is nothing to rebuild them from and they are left alone."""
    from kestrel.feature_store.definitions import compile_event
    from kestrel.feature_store.keys import KeyedHasher, KeySpace
    from kestrel.feature_store.redis_store import RedisOnlineStore
    from kestrel.feature_store.schemas import Transaction
    from kestrel.feature_store.sets import CARD_PROFILE, TERMINAL_RISK
    from kestrel.streams.worker.processing import LabelledTransaction

    keys, hasher = KeySpace(settings.redis_prefix), KeyedHasher(settings.hash_key.encode())
    store = RedisOnlineStore(redis_client, 3600, keys, hasher)
    labels = [LabelledTransaction(f"rh-{i}", f"t-{i % 3}", 1_767_225_600 + 86_400 * i, i % 2 == 0) for i in range(9)]
    store.apply_batch([compile_event(TERMINAL_RISK, e, keys, hasher) for e in labels])
    heads = list(redis_client.scan_iter(match=f"{settings.redis_prefix}:e:terminal:*|@*"))
    assert len(heads) == 3
    expected = {h: redis_client.get(h) for h in heads}
    redis_client.delete(*heads)
    txns = [Transaction(event_id=f"rh-{i}", card_id=f"card-{i % 3}", merchant_id="m", terminal_id="t",
                        amount=10.0 + i, currency="EUR", timestamp=1_767_225_600 + 60 * i) for i in range(9)]
    store.apply_batch([compile_event(CARD_PROFILE, t, keys, hasher) for t in txns])
    card_heads = {h: redis_client.get(h) for h in redis_client.scan_iter(match=f"{settings.redis_prefix}:e:card:*|@*")}
    assert len(card_heads) == 3
    proc = _kestrel("rebuild-heads", "--set", "terminal_risk", "--set", "card_profile", env=settings.to_env())
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"terminal_risk": 3, "card_profile": 0}
    # bit for bit what the writes had built, but for the last 8 bytes (the head's write count starts again)
    assert {h: redis_client.get(h)[:-8] for h in heads} == {h: b[:-8] for h, b in expected.items()}
    assert {h: redis_client.get(h) for h in card_heads} == card_heads


def test_exclude_command_manages_the_items_never_recommended(settings):
    env = settings.to_env()
    proc = _kestrel("exclude", "item_7", "item_9", env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"excluded": ["item_7", "item_9"]}
    proc = _kestrel("exclude", "item_7", "--remove", env=env)
    assert json.loads(proc.stdout) == {"excluded": ["item_9"]}
