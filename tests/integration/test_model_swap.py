"""Hot swap through the real broker: an alias move announced on models.updates reaches a running worker,
which swaps the fraud model between batches; a version that fails its checks is refused and operators told."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from kestrel.feature_store import topics
from kestrel.models.registry import ModelRecord, Registry
from kestrel.offline.simulator import Simulator, payments_config
from kestrel.streams.ingest.producer import EventProducer
from tests.integration.test_cli import _kestrel

pytestmark = pytest.mark.integration


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
    model, path = fraud_model
    reg_root = tmp_path / "registry"
    registry = Registry(reg_root, "fraud")
    v1, v2, v3 = model.version, f"{model.version}-b", f"{model.version}-c"
    registry.register(ModelRecord.new("fraud", v1, path))
    for version in (v2, v3):
        registry.register(ModelRecord.new("fraud", version, _copy_as(path, tmp_path / "artifacts", version)))
    registry.move("champion", v1, action="force", why="test start")
    worker.settings = settings.with_(fraud_model=str(reg_root))
    worker.start()

    sim = Simulator(payments_config(3000, seed=4, n_cards=500))
    payments = (r.event for r in sim.records() if r.kind == "transaction")
    producer = EventProducer(settings.broker, settings.hash_key)

    def send(n: int) -> set[str]:
        ids = set()
        for _ in range(n):
            event = next(payments)
            producer.send(event)
            ids.add(event.event_id)
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
    metrics = _metrics(worker.url)
    assert 'kestrel_model_swaps_total{result="swapped"} 1.0' in metrics
    assert 'kestrel_model_swaps_total{result="failed"} 1.0' in metrics


def _metrics(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        return resp.read().decode()
