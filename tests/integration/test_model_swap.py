"""Hot swap through the real broker: an alias move announced on models.updates reaches a running worker,
which swaps the fraud model between batches; a version that fails its checks is refused and operators told;
a shadow version is scored beside the served one, compared on the same payments, and unloaded."""

from __future__ import annotations

import json
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from kestrel.feature_store import topics
from kestrel.feature_store.schemas import Label
from kestrel.models.registry import ModelRecord, Registry
from kestrel.offline.simulator import Simulator, payments_config
from kestrel.streams.ingest.producer import EventProducer
from tests.integration.test_cli import _kestrel

pytestmark = pytest.mark.integration


def registered_copies(fraud_model, tmp_path: Path, *suffixes: str) -> tuple[Registry, list[str]]:
    """A fraud registry holding the session's model and copies of it under other versions (same weights),
    ``champion`` on the model itself: (registry, [its version, then one per suffix])."""
    model, path = fraud_model
    registry = Registry(tmp_path / "registry", "fraud")
    versions = [model.version, *(f"{model.version}-{s}" for s in suffixes)]
    registry.register(ModelRecord.new("fraud", versions[0], path))
    for version in versions[1:]:
        registry.register(ModelRecord.new("fraud", version, _copy_as(path, tmp_path / "artifacts", version)))
    registry.move("champion", versions[0], action="force", why="test start")
    return registry, versions


def _copy_as(artifact: Path, root: Path, version: str) -> Path:
    """The artifact under another version name (same weights): a distinct registered version."""
    target = root / version
    shutil.copytree(artifact, target)
    meta = json.loads((target / "meta.json").read_text())
    meta["version"] = version
    (target / "meta.json").write_text(json.dumps(meta))
    return target


def test_an_alias_move_swaps_the_running_worker_and_a_broken_version_is_refused(
        settings, worker, outputs, fraud_model, tmp_path):
    registry, (v1, v2, v3) = registered_copies(fraud_model, tmp_path, "b", "c")
    reg_root = tmp_path / "registry"
    worker.settings = settings.with_(fraud_model=str(reg_root))
    worker.start()

    sim = Simulator(payments_config(3000, seed=4, n_cards=500))
    payments = (r for r in sim.records() if r.kind == "transaction")
    producer = EventProducer(settings.broker, settings.hash_key)
    sent: dict[str, object] = {}

    def send(n: int) -> set[str]:
        ids = set()
        for _ in range(n):
            rec = next(payments)
            producer.send(rec.event)
            ids.add(rec.event.event_id)
            sent[rec.event.event_id] = rec
        assert producer.flush() == 0 and not producer.errors
        return ids

    def versions_of(ids: set[str]) -> set[str]:
        outputs.wait_for(topics.FRAUD_DECISIONS, ids, timeout_s=60)
        return {d["model_version"] for d in outputs.docs[topics.FRAUD_DECISIONS] if d["event_id"] in ids}

    assert versions_of(send(200)) == {v1}

    env = {"KESTREL_BROKER": settings.broker}
    proc = _kestrel("models", "alias", "champion", v2, "--force", "--why", "swap test", "--registry", str(reg_root),
                    "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    moved_at = time.monotonic()
    seen: set[str] = set()
    while v2 not in seen and time.monotonic() - moved_at < 30:  # payments keep streaming during the swap
        seen |= versions_of(send(20))
    swap_s = time.monotonic() - moved_at
    print(f"alias move -> first decision by the new version: {swap_s:.2f}s")
    assert v2 in seen and seen <= {v1, v2}, seen
    assert swap_s < 10, swap_s  # the issue asks for 5 s; the margin is for a loaded CI machine
    assert versions_of(send(200)) == {v2}  # once swapped, every later batch is decided by the new version

    # v3's files change after registration: its checksum fails, the worker keeps v2 and tells operators
    (Path(registry.get(v3).path) / "meta.json").write_text(json.dumps({"version": v3, "tampered": True}))
    proc = _kestrel("models", "alias", "champion", v3, "--force", "--registry", str(reg_root), env=env)
    assert proc.returncode == 0, proc.stderr
    deadline = time.monotonic() + 30
    failed = []
    while not failed and time.monotonic() < deadline:
        outputs.poll(0.3)
        failed = [d for d in outputs.docs[topics.OPERATOR_EVENTS] if d.get("type") == "model_load_failed"]
    assert failed and failed[0]["version"] == v3 and failed[0]["serving"] == v2
    assert "checksum" in failed[0]["error"]
    assert versions_of(send(200)) == {v2}

    # a shadow: every payment scored by v1 too, logged beside v2's decision, never acted on
    proc = _kestrel("models", "alias", "shadow", v1, "--registry", str(reg_root), env=env)
    assert proc.returncode == 0, proc.stderr
    deadline, shadowed = time.monotonic() + 30, set()
    while not shadowed and time.monotonic() < deadline:
        ids = send(20)
        versions_of(ids)
        shadowed = {d["event_id"] for d in outputs.docs[topics.FRAUD_DECISIONS]
                    if d["event_id"] in ids and d.get("shadow", {}).get("model_version") == v1}
    ids = send(300)
    versions_of(ids)
    docs = [d for d in outputs.docs[topics.FRAUD_DECISIONS] if d["event_id"] in ids]
    assert all(d["model_version"] == v2 and d["shadow"]["model_version"] == v1 for d in docs)
    assert all(0.0 <= d["shadow"]["score"] <= 1.0 for d in docs)
    labels = [Label(event_id=f"lab-{i}", transaction_id=i, card_id=sent[i].event.card_id,
                    verdict="fraud" if sent[i].fraud else "genuine", source="chargeback",
                    timestamp=datetime.now(UTC)) for i in sorted(ids)]
    for label in labels:
        producer.send(label)
    assert producer.flush() == 0
    outputs.wait_for(topics.TRAINING_EXAMPLES, {lab.event_id for lab in labels}, timeout_s=60)
    # by version: the champion alias names v3, which the worker refused (it serves v2, and said so)
    proc = _kestrel("models", "compare", v2, "shadow", "--registry", str(reg_root), "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["a"] == v2 and report["b"] == v1 and report["events"] >= 300 and report["labelled"] >= 300
    assert report["action_agreement"] == 1.0  # the same weights under two names: they agree on everything
    assert report["versions"][v1]["mean_score"] == pytest.approx(report["versions"][v2]["mean_score"], abs=0.05)
    proc = _kestrel("models", "alias", "shadow", "--remove", "--registry", str(reg_root), env=env)
    assert proc.returncode == 0, proc.stderr
    deadline, last = time.monotonic() + 30, [{"shadow": {}}]
    while any("shadow" in d for d in last) and time.monotonic() < deadline:
        ids = send(20)
        versions_of(ids)
        last = [d for d in outputs.docs[topics.FRAUD_DECISIONS] if d["event_id"] in ids]
    assert not any("shadow" in d for d in last)  # the shadow was unloaded

    metrics = _metrics(worker.url)
    assert 'kestrel_model_swaps_total{result="swapped"} 2.0' in metrics  # v2 served, v1 shadowed
    assert 'kestrel_model_swaps_total{result="unloaded"} 1.0' in metrics
    assert 'kestrel_model_swaps_total{result="failed"} 1.0' in metrics


def _metrics(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        return resp.read().decode()
