"""The recommender in the model registry: `kestrel train recs --registry --promote` registers each version with
its numbers and the champion's on the same split, the gate decides, and a worker's recommendation service serves
the alias, swapping when it moves and refusing files that differ from the registered checksum."""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from kestrel.feature_store.keys import KeyedHasher, KeySpace
from kestrel.models.registry import Registry
from kestrel.streams.recs.service import RecommendationService
from tests.integration.test_cli import _kestrel

pytestmark = pytest.mark.integration


def _train(root: Path, out: Path, seed: int) -> dict:
    proc = _kestrel("train", "recs", "--simulate", "8000", "--epochs", "2", "--dim", "16", "--seed", str(seed),
                    "--registry", str(root), "--out", str(out), "--promote", "--why", f"seed {seed}", "--json",
                    "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_train_register_gate_and_serve_the_alias(tmp_path, redis_url):
    root, out = tmp_path / "registry", tmp_path / "artifacts"
    first = _train(root, out, seed=3)
    assert first["promotion"]["moved"] and first["promotion"]["to"] == first["model_version"]
    assert {"recall_at_20", "p99_ms"} <= set(first["metrics"])
    second = _train(root, out, seed=4)
    evaluation = second["evaluation"]
    assert evaluation["champion"] == first["model_version"]  # measured against the champion, on its own split
    assert {"recall_at_20", "p99_ms"} <= set(evaluation["champion_metrics"])
    promotion = second["promotion"]
    assert promotion["action"] in {"promote", "refused"} and promotion["gate"]["checks"], promotion
    registry = Registry(root, "recs")
    assert [m.action for m in registry.history()][-1] == promotion["action"]
    report = Path(second["report"]).read_text()  # the run's report, its plots linked beside the artifact
    assert second["model_version"] in report and "| recall_at_20 |" in report and promotion["action"] in report
    assert second["evaluation"]["plots"] == ["report/recall_at_k.png", "report/loss.png"]
    for plot in second["evaluation"]["plots"]:
        assert (Path(second["path"]) / plot).read_bytes()[:4] == b"\x89PNG" and plot in report
    registry.get(second["model_version"]).verify()  # drawn before registering: covered by the checksum
    champion = registry.aliases()["champion"]
    other = second["model_version"] if champion == first["model_version"] else first["model_version"]

    async def serve() -> None:
        client = aioredis.Redis.from_url(redis_url)
        try:
            service = RecommendationService(client, KeySpace(f"t-{secrets.token_hex(4)}"), KeyedHasher(b"k"),
                                            model_path=str(root))
            assert await service.wait_loaded(timeout_s=120)
            assert service.version == champion
            registry.move("champion", other, action="force", why="swap test")
            assert await service.wait_loaded(timeout_s=120) and service.version == other  # the alias moved
            path = Path(registry.get(champion).path)
            (path / "metadata.json").write_text((path / "metadata.json").read_text() + " ")  # tampered on disk
            registry.move("champion", champion, action="force", why="back, but its files changed")
            await service.wait_loaded(timeout_s=120)
            assert service.version == other  # refused: the registered checksum does not match
        finally:
            await client.aclose()

    asyncio.run(serve())


def test_a_recs_variant_answers_its_users_with_its_model(tmp_path, redis_url):
    """An experiment whose variant runs the registry's `challenger`: its users get that model's
    recommendations (and say so), control users the champion's; nobody is enrolled before it is loaded."""
    import dataclasses

    import orjson
    import redis as sync_redis

    from kestrel.feature_store import topics
    from kestrel.feature_store.erase import delete_matching
    from kestrel.models.experiments import Experiment, route
    from kestrel.models.two_tower import load_artifact
    from kestrel.streams.config import Settings
    from kestrel.streams.experiments.store import ExperimentStore
    from kestrel.streams.metrics import Metrics
    from kestrel.streams.worker.processing import Processor
    from tests.integration.test_recs_experiments import _interactions

    root, out = tmp_path / "registry", tmp_path / "artifacts"
    v1, v2 = _train(root, out, seed=3)["model_version"], _train(root, out, seed=4)["model_version"]
    registry = Registry(root, "recs")
    registry.move("champion", v1, action="force", why="test")
    registry.move("challenger", v2, action="force", why="test")
    items = load_artifact(registry.get(v1).path).vocab.item_ids
    prefix = f"kestrel-test-recs-variant-{secrets.token_hex(4)}"
    settings = Settings().with_(redis_prefix=prefix, redis_url=redis_url, recs_model=str(root))
    sync = sync_redis.Redis.from_url(redis_url)
    exp = Experiment.model_validate({
        "key": "recs-model", "target": "recs", "hash_attribute": "user", "seed": "recs-model-1",
        "variants": [{"key": "control"}, {"key": "challenger", "model": "challenger"}],
        "primary_metric": "ctr", "status": "running"})
    ExperimentStore(sync, KeySpace(prefix)).create(exp, "test")

    async def run() -> None:
        client = aioredis.Redis.from_url(redis_url)
        proc = Processor(settings, client, Metrics())
        try:
            assert await proc.recs.wait_loaded(timeout_s=120) and proc.recs.version == v1
            records = [dataclasses.replace(r, value=orjson.dumps(  # items the models know: personalised answers
                {**orjson.loads(r.value), "item_id": items[i % len(items)]}))
                for i, r in enumerate(_interactions(range(80), "view", "a"))]
            first = await proc.process(topics.INTERACTIONS, records[:40])
            assert not [o for o in first if o.topic == topics.EXPOSURES]  # the challenger was not loaded yet
            await proc.mark_delivered(first)
            await proc.recs_router.variants["challenger"].wait_loaded(timeout_s=120)
            outs = await proc.process(topics.INTERACTIONS, records)
            docs = [orjson.loads(o.value) for o in outs if o.topic == topics.RECOMMENDATION_DECISIONS]
            seen = set()
            for d in docs:
                (enrolled,) = d["experiments"]
                variant = route(exp, {"user": d["user"]}).variant
                assert enrolled["variant"] == variant
                if d["path"] == "personalised":
                    assert d["model_version"] == (v2 if variant == "challenger" else v1), d
                    seen.add(variant)
            assert seen == {"control", "challenger"}
        finally:
            await client.aclose()
            delete_matching(sync, f"{prefix}:*")

    asyncio.run(run())


def test_an_announced_recs_alias_move_swaps_the_running_worker(settings, worker, outputs, tmp_path):
    """`kestrel models alias --kind recs` announces the move on models.updates; the worker hears it and swaps
    its recommender within seconds, not at its next registry poll (60 s)."""
    import shutil
    import time
    from datetime import UTC, datetime

    from kestrel.feature_store import topics
    from kestrel.feature_store.schemas import Interaction
    from kestrel.models.registry import ModelRecord
    from kestrel.models.two_tower import load_artifact
    from kestrel.streams.ingest.producer import EventProducer

    root, out = tmp_path / "registry", tmp_path / "artifacts"
    v1 = _train(root, out, seed=3)["model_version"]
    registry = Registry(root, "recs")
    v2 = f"{v1}-b"  # the same weights under another version: a distinct registered version
    copy = out / v2
    shutil.copytree(registry.get(v1).path, copy)
    meta = json.loads((copy / "metadata.json").read_text())
    (copy / "metadata.json").write_text(json.dumps({**meta, "version": v2}))
    registry.register(ModelRecord.new("recs", v2, copy, metrics={}))
    items = load_artifact(registry.get(v1).path).vocab.item_ids
    worker.settings = settings.with_(recs_model=str(root))
    worker.start()
    producer = EventProducer(settings.broker, settings.hash_key)
    sent = 0

    def versions(n: int) -> set[str]:
        nonlocal sent
        ids = set()
        for _ in range(n):
            event = Interaction(event_id=f"swap-{sent}", timestamp=datetime.now(UTC), user_id=f"user-{sent % 30}",
                                item_id=items[sent % len(items)], kind="view")
            producer.send(event)
            ids.add(event.event_id)
            sent += 1
        assert producer.flush() == 0
        outputs.wait_for(topics.RECOMMENDATION_DECISIONS, ids, timeout_s=60)
        return {d["model_version"] for d in outputs.docs[topics.RECOMMENDATION_DECISIONS]
                if d["event_id"] in ids and d["path"] == "personalised"}

    deadline = time.monotonic() + 60
    while v1 not in (seen := versions(10)) and time.monotonic() < deadline:  # the first load, in its thread
        time.sleep(0.5)
    assert seen == {v1}
    proc = _kestrel("models", "alias", "champion", v2, "--kind", "recs", "--force", "--why", "announced swap",
                    "--registry", str(root), "--json", env={"KESTREL_BROKER": settings.broker})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]).get("announced") is True, proc.stdout
    moved_at = time.monotonic()
    seen = set()
    while v2 not in seen and time.monotonic() - moved_at < 30:
        seen = versions(10)
    swap_s = time.monotonic() - moved_at
    print(f"recs alias move -> first answer by the new version: {swap_s:.2f}s")
    assert v2 in seen and swap_s < 10, (seen, swap_s)  # the issue asks for 5 s; margin for a loaded CI machine
    assert versions(20) == {v2}


def test_the_recs_loop_trains_from_the_archive_and_serves_users_by_their_tokens(tmp_path):
    """`train recs --from-archive --every`: the interactions the archiver wrote (user ids as keyed tokens),
    rebuilt in time order, trained, registered, gated and reported with plots; the artifact says it knows
    users by token, so serving looks them up by token. An empty archive registers nothing."""
    import itertools

    from kestrel.feature_store import topics
    from kestrel.models.two_tower import UNKNOWN_USER, load_artifact
    from kestrel.offline.archive import ArchivedRecord, ArchiveWriter, row_of
    from kestrel.offline.simulator import SimConfig, Simulator

    hasher = KeyedHasher(b"archive-test-key")
    sim = Simulator(SimConfig(seed=11, transaction_share=0.0, fraud_incidents_per_sim_hour=0.0, invalid_share=0.0,
                              n_users=300, n_items=400))
    events = [r.event for r in itertools.islice((r for r in sim.records() if r.kind == "interaction"), 12000)]
    archive = tmp_path / "archive"
    ArchiveWriter(str(archive)).write([row_of(ArchivedRecord(topics.INTERACTIONS, 0, i, 1_764_000_000_000, b"k",
                                                             e.model_dump_json().encode()), hasher)
                                       for i, e in enumerate(events)])
    root, reports = tmp_path / "registry", tmp_path / "runs"
    loop = ["train", "recs", "--registry", str(root), "--out", str(tmp_path / "artifacts"), "--promote",
            "--every", "1s", "--max-runs", "1", "--reports", str(reports), "--epochs", "2", "--dim", "16",
            "--no-progress"]
    proc = _kestrel(*loop, "--from-archive", str(archive))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads(proc.stdout.strip().splitlines()[-1])
    assert run["ok"] and run["promotion"] == "promote", run
    report = Path(run["report"]).read_text()
    champion = Registry(root, "recs").aliases()["champion"]
    assert champion in report and "recall_at_k" in report and "| recall_at_20 |" in report
    art = load_artifact(Registry(root, "recs").get(champion).path)
    assert art.metadata["user_ids"] == "tokens"
    user = events[0].user_id
    assert art.vocab.user_bucket(hasher.token("user", user)) != UNKNOWN_USER  # known by its token ...
    assert art.vocab.user_bucket(user) == UNKNOWN_USER  # ... and the raw id never reached the archive

    empty = tmp_path / "empty-archive"
    empty.mkdir()
    proc = _kestrel(*loop, "--from-archive", str(empty))
    assert proc.returncode == 0, proc.stderr[-3000:]
    failed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failed["ok"] and failed["promotion"] is None
    assert Registry(root, "recs").aliases()["champion"] == champion and len(Registry(root, "recs").versions()) == 1
