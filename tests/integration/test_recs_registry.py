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
