"""Real services for integration tests: a tansu broker per test, Redis with a per-test key prefix."""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest
import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from kestrel.feature_store import topics
from kestrel.streams.cli.demo import _wait_ready, erase_prefix, start_worker, stop_worker
from kestrel.streams.config import Settings
from kestrel.streams.services import EmbeddedBroker, LocalRedis, free_port
from tests.integration.browser import browser  # noqa: F401  (the fixture of the page tests)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    local = LocalRedis(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")).start()
    yield local.url
    local.stop()


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as b:
        yield b


@pytest.fixture
def settings(broker: EmbeddedBroker, redis_url: str) -> Iterator[Settings]:
    run = secrets.token_hex(4)
    s = Settings().with_(broker=broker.bootstrap, redis_url=redis_url, redis_prefix=f"kestrel-test-{run}",
                         app_id=f"kestrel-test-{run}", web_port=free_port(), api_token=secrets.token_urlsafe(16),
                         session_timeout_s=3.0, heartbeat_interval_s=0.5, commit_interval_s=0.5,
                         batch_size=100)
    topics.ensure_topics(s.broker, s.partitions)
    yield s
    erase_prefix(redis_url, s.redis_prefix)


@pytest.fixture
def redis_client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@dataclass
class WorkerHandle:
    settings: Settings
    log_path: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.settings.web_host}:{self.settings.web_port}"

    def start(self, wait: bool = True) -> WorkerHandle:
        self.proc = start_worker(self.settings, self.log_path)
        if wait:
            _wait_ready(self.url, self.proc, timeout_s=60)
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()  # SIGKILL: no shutdown hooks, no final commit
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None:
            stop_worker(self.proc)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def worker(settings: Settings, tmp_path: Path) -> Iterator[WorkerHandle]:
    handle = WorkerHandle(settings, tmp_path / "worker.log")
    yield handle
    handle.stop()


@dataclass
class OutputReader:
    """Reads output topics from the beginning by assignment (no group join wait)."""

    bootstrap: str
    partitions: int
    docs: dict[str, list[dict]] = field(default_factory=lambda: {t: [] for t in topics.OUTPUT_TOPICS})
    raw: dict[str, list[bytes]] = field(default_factory=lambda: {t: [] for t in topics.OUTPUT_TOPICS})

    def __post_init__(self) -> None:
        self.consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": f"t-{secrets.token_hex(4)}",
                                  "enable.auto.commit": False, "fetch.wait.max.ms": 10})
        self.consumer.assign([TopicPartition(t, p, OFFSET_BEGINNING)
                              for t in topics.OUTPUT_TOPICS for p in range(self.partitions)])

    def poll(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for msg in self.consumer.consume(500, timeout=0.05):
                if msg.error() is None:
                    self.raw[msg.topic()].append(msg.value())
                    self.docs[msg.topic()].append(orjson.loads(msg.value()))

    def ids(self, topic: str) -> Counter:
        return Counter(d["event_id"] for d in self.docs[topic])

    def wait_for(self, topic: str, expected_ids: set[str], timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not expected_ids <= set(self.ids(topic)):
            self.poll(0.2)

    def close(self) -> None:
        self.consumer.close()


@pytest.fixture
def outputs(settings: Settings) -> Iterator[OutputReader]:
    reader = OutputReader(settings.broker, settings.partitions)
    yield reader
    reader.close()
