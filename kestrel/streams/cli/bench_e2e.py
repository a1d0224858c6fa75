"""``kestrel bench e2e``: the whole worker measured in one run, beside the framework's own floor.

On the embedded broker (a fresh one per phase, so backlogs never mix) and the
real Redis (``REDIS_URL``, or a private one when none answers), one command
measures:

* **drains**: one worker process draining a pre-loaded backlog of N payments,
  then (fresh broker) of N interactions, full path, outputs acknowledged. The
  rate is timed from the first output read back to the last (start-up and the
  group join are not counted), counting distinct ``event_id`` s on the output
  topic read from the beginning.
* **bare Faust**: the same payment backlog through a Faust agent that takes the
  same batches and produces one record per input (the input's own bytes) to an
  output topic, waiting for each batch's acks before taking the next (the
  worker keeps two batches in flight): the framework's floor, like for like,
  timed the same way from its outputs.
* **CPU**: the worker's user+system CPU over the drain (``/proc/<pid>/stat``),
  and Redis's (``INFO cpu``; *whole server*, so anything else using that Redis
  counts too), per event.
* **latency**: the simulator's mixed stream (payments, interactions, labels)
  offered at fixed rates for a fixed duration each, each step on a fresh
  broker and worker after a 2 s warm-up at 200 events/s. Latency runs from the producer's send
  to the moment this process reads the output (decision, recommendation,
  training example or dead letter); every event id sent is reconciled
  (``lost``: no output; ``duplicates``: outputs beyond the first). Then a few
  more steps look for the highest rate whose p99 stays under 50 ms with nothing
  lost: doubling from the best passing rate (halving when none passed), then
  one bisection step.
* with ``--processes 2``: the payment drain by two worker processes of one
  consumer group. Both are started and have their partitions before the
  backlog is loaded (so the rebalance of the second join is not timed); the
  load takes a small fraction of the drain.

Everything runs on this machine: the worker, the broker, Redis, the load
generator and the reader share its cores, so the numbers are this machine's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from kestrel.feature_store import topics
from kestrel.offline.simulator import SimConfig, SimRecord, Simulator
from kestrel.streams.cli.demo import (
    Collector,
    Progress,
    _wait_ready,
    erase_prefix,
    start_worker,
    stop_worker,
    worker_env,
)
from kestrel.streams.cli.produce import paced, send
from kestrel.streams.config import Settings
from kestrel.streams.ingest.producer import EventProducer
from kestrel.streams.services import EmbeddedBroker, LocalRedis, free_port

BARE_OUT = "bench.bare.out"
JSON_KEYS = ("payments_per_s", "interactions_per_s", "bare_faust_per_s", "ratio_to_bare",
             "worker_cpu_us_per_payment", "redis_cpu_us_per_payment", "worker_cpu_us_per_interaction",
             "redis_cpu_us_per_interaction", "latency", "max_rate_p99_under_50ms", "payments_per_s_2proc")


@dataclass(frozen=True)
class E2EConfig:
    events: int = 20_000
    rates: tuple[float, ...] = (500.0, 1000.0, 2000.0)
    duration_s: float = 10.0
    processes: int = 1
    search: bool = True
    search_steps: int = 3  # extra latency steps at most, after the fixed rates
    p99_target_ms: float = 50.0
    fraud_model: str = ""  # "" = the rules scorer
    recs_model: str = ""  # "" = trending items only
    seed: int = 7
    stall_s: float = 30.0  # a drain with no new output for this long ends (the rest counts as lost)
    warmup_s: float = 2.0  # latency: seconds at 200 events/s before the first step, not counted


@dataclass
class Drain:
    """What a drain read back: distinct outputs, the timed window and the CPU spent in it."""

    expected: int
    distinct: int = 0
    messages: int = 0
    n0: int = 0  # distinct outputs already read when the clock started (the first read)
    t0: float = 0.0
    t1: float = 0.0
    worker_cpu_s: float = 0.0
    redis_cpu_s: float = 0.0

    @property
    def timed(self) -> int:
        return self.distinct - self.n0

    @property
    def rate(self) -> float | None:
        return self.timed / (self.t1 - self.t0) if self.timed > 0 and self.t1 > self.t0 else None

    def us_per_event(self, cpu_s: float) -> float | None:
        return cpu_s / self.timed * 1e6 if self.timed > 0 else None


def proc_cpu_s(pids: Sequence[int]) -> float:
    """User + system CPU seconds of these processes so far (``/proc/<pid>/stat`` fields 14 and 15)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # after ")": field 3 (state) is index 0
    return total / tick


def redis_cpu_s(client: redis.Redis) -> float:
    """CPU seconds the whole Redis server has used (``INFO cpu``: used_cpu_sys + used_cpu_user)."""
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def _r(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(x, nd)


class E2EBench:
    def __init__(self, cfg: E2EConfig, say: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.say = say or (lambda m: print(m, file=sys.stderr, flush=True))
        self.progress = Progress()
        self.base = Settings.from_env()
        self.run_id = secrets.token_hex(4)
        self.local_redis: LocalRedis | None = None
        self.logs: list[Path] = []
        self.prefixes: list[str] = []

    # -- environment -------------------------------------------------------
    def settings_for(self, phase: str, broker: EmbeddedBroker) -> Settings:
        assert self.local_redis is not None
        tag = f"{self.run_id}-{phase}"
        settings = self.base.with_(
            broker=broker.bootstrap, redis_url=self.local_redis.url, redis_prefix=f"kestrel-bench-{tag}",
            app_id=f"kestrel-bench-{tag}", web_port=free_port(), session_timeout_s=3.0, heartbeat_interval_s=0.5,
            api_token=self.base.api_token or secrets.token_urlsafe(16), fraud_model=self.cfg.fraud_model,
            recs_model=self.cfg.recs_model)
        self.prefixes.append(settings.redis_prefix)
        return settings

    @contextlib.contextmanager
    def phase(self, name: str, topic_names: tuple[str, ...] = topics.ALL_TOPICS) -> Iterator[Phase]:
        broker = EmbeddedBroker().start()
        settings = self.settings_for(name, broker)
        ph = Phase(self, name, broker, settings)
        try:
            topics.ensure_topics(broker.bootstrap, settings.partitions, topic_names)
            yield ph
        finally:
            ph.close()
            broker.stop()
            with contextlib.suppress(redis.RedisError):
                erase_prefix(settings.redis_url, settings.redis_prefix)

    def backlog(self, kind: str) -> list[SimRecord]:
        records = (r for r in Simulator(SimConfig(seed=self.cfg.seed)).records() if r.kind == kind)
        return list(itertools.islice(records, self.cfg.events))

    def load(self, settings: Settings, records: list[SimRecord]) -> None:
        producer = EventProducer(settings.broker, settings.hash_key)
        t0 = time.monotonic()
        for rec in records:
            send(producer, rec)
        left = producer.flush(60)
        if left or producer.errors:
            raise RuntimeError(f"loading the backlog: {left} undelivered, errors {producer.errors[:3]}")
        self.say(f"  loaded {len(records):,} {records[0].kind if records else ''} events "
                 f"in {time.monotonic() - t0:.1f}s")

    # -- measurements ----------------------------------------------------------
    def reader(self, ph: Phase, out_topics: tuple[str, ...], expected: int, label: str) -> DrainReader:
        """A reader of ``out_topics``, polling from before the worker starts (so it never lags behind it)."""
        return DrainReader(self, ph, out_topics, expected, label).start()

    def worker_drain(self, kind: str, records: list[SimRecord]) -> Drain:
        out = topics.FRAUD_DECISIONS if kind == "transaction" else topics.RECOMMENDATION_DECISIONS
        with self.phase(f"drain-{kind[:3]}") as ph:
            self.load(ph.settings, records)
            reader = self.reader(ph, (out, topics.DEADLETTER), len(records), f"worker, {kind}s")
            worker = ph.start_worker(wait=False)
            reader.pids = [worker.pid]
            ph.wait_ready()
            return reader.wait()

    def bare_drain(self, records: list[SimRecord]) -> Drain:
        with self.phase("bare", (topics.TRANSACTIONS, BARE_OUT)) as ph:
            self.load(ph.settings, records)
            reader = self.reader(ph, (BARE_OUT,), len(records), "bare Faust agent (consume + produce)")
            s = ph.settings
            log = ph.log_path("bare")
            with log.open("ab") as fh:  # the worker's settings, read from the environment as the worker reads them
                proc = subprocess.Popen([sys.executable, "-m", "kestrel.streams.cli.bench_e2e", "bare-worker"],
                                        env=worker_env(s),
                                        stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
            ph.workers.append(proc)
            reader.pids = [proc.pid]
            return reader.wait()

    def two_process_drain(self, records: list[SimRecord]) -> Drain:
        with self.phase("drain-2proc") as ph:
            workers = [ph.start_worker(wait=False), ph.start_worker(wait=False, web_port=free_port())]
            ph.wait_ready()
            self.say("  both workers have their partitions; loading the backlog")
            reader = self.reader(ph, (topics.FRAUD_DECISIONS, topics.DEADLETTER), len(records), "2 workers, payments")
            reader.pids = [w.pid for w in workers]
            self.load(ph.settings, records)
            return reader.wait()

    def latency(self) -> tuple[list[dict[str, Any]], float | None]:
        """Fixed offered rates, then a short search for the highest rate with p99 under target and none lost."""
        cfg = self.cfg
        steps: dict[float, dict[str, Any]] = {}

        def measure(rate: float) -> dict[str, Any]:
            # A fresh broker, Redis prefix and worker per step: a step after an overloaded one measured on the
            # same rig came out slower (longer topics, more state), so the order of the steps would matter.
            rig = LatencyRig(self, f"lat{len(steps)}")
            try:
                steps[rate] = rig.start().step(rate, cfg.duration_s)
            finally:
                rig.close()
            return steps[rate]

        def passes(rate: float) -> bool:
            row = steps[rate]
            # ... and the load generator kept the offered rate (it shares this machine's cores).
            return (row["p99_ms"] is not None and row["p99_ms"] < cfg.p99_target_ms and row["lost"] == 0
                    and row["sent_per_s"] >= 0.95 * rate)

        for rate in cfg.rates:
            measure(float(rate))
        if cfg.search and cfg.rates:
            self._search(measure, passes, steps)
        passing = [r for r in steps if passes(r)]
        rows = [{k: v for k, v in steps[r].items() if k != "drained"} for r in sorted(steps)]
        return rows, (max(passing) if passing else None)

    def _search(self, measure: Callable[[float], Any], passes: Callable[[float], bool],
                steps: dict[float, Any]) -> None:
        budget = self.cfg.search_steps

        def bounds() -> tuple[float | None, float | None]:
            good = [r for r in steps if passes(r)]
            best = max(good) if good else None
            bad = [r for r in steps if not passes(r) and (best is None or r > best)]
            return best, (min(bad) if bad else None)

        def step(rate: float) -> None:
            nonlocal budget
            rate = float(round(rate))
            if rate not in steps and rate > 0:
                self.say(f"  search: {rate:,.0f} events/s")
                measure(rate)
                budget -= 1

        best, worst = bounds()
        # Double up from the best passing rate (or halve down when none passed) until a bound on each side...
        while budget > 1 and (best is None or worst is None):
            step(best * 2 if best is not None else (worst or 0) / 2)
            if bounds() == (best, worst):
                break
            best, worst = bounds()
        # ... then one bisection step between them.
        if budget > 0 and best is not None and worst is not None and worst / best > 1.2:
            step((best + worst) / 2)

    # -- the whole run -----------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        started = time.monotonic()
        self.local_redis = LocalRedis(self.base.redis_url).start()
        self.say(f"redis: {self.local_redis.describe()} (its CPU is counted for the whole server)")
        self.say(f"fraud scorer: {cfg.fraud_model or 'rules'}; recommender: {cfg.recs_model or 'trending'}; "
                 f"worker logs under {tempfile.gettempdir()}/kestrel-bench-{self.run_id}-*.log")
        try:
            self.say(f"[1/5] simulating backlogs of {cfg.events:,} payments and {cfg.events:,} interactions")
            payments, interactions = self.backlog("transaction"), self.backlog("interaction")
            self.say("[2/5] one worker drains the payment backlog")
            pay = self.worker_drain("transaction", payments)
            self.say("[3/5] one worker drains the interaction backlog")
            inter = self.worker_drain("interaction", interactions)
            self.say("[4/5] a bare Faust agent (consume + produce one record per event) drains the payments")
            bare = self.bare_drain(payments)
            two = None
            if cfg.processes >= 2:
                self.say("[4b] two workers of one group drain the payment backlog")
                two = self.two_process_drain(payments)
            self.say(f"[5/5] latency of the mixed stream at {', '.join(f'{r:g}' for r in cfg.rates)} events/s, "
                     f"{cfg.duration_s:g}s each" + (", then a search for the best rate under "
                                                     f"{cfg.p99_target_ms:g} ms p99" if cfg.search else ""))
            rows, best = self.latency()
        finally:
            with contextlib.suppress(redis.RedisError):
                for prefix in self.prefixes:
                    erase_prefix(self.local_redis.url, prefix)
            self.local_redis.stop()
        self._report_logs()
        self.say(f"bench e2e took {time.monotonic() - started:.0f}s")
        for name, d in (("payments", pay), ("interactions", inter), ("bare", bare), ("2proc", two)):
            if d is not None and d.distinct < d.expected:
                self.say(f"WARNING: {name} drain read {d.distinct:,} of {d.expected:,} outputs")
        return {
            "payments_per_s": _r(pay.rate),
            "interactions_per_s": _r(inter.rate),
            "bare_faust_per_s": _r(bare.rate),
            "ratio_to_bare": _r(pay.rate / bare.rate, 3) if pay.rate and bare.rate else None,
            "worker_cpu_us_per_payment": _r(pay.us_per_event(pay.worker_cpu_s)),
            "redis_cpu_us_per_payment": _r(pay.us_per_event(pay.redis_cpu_s)),
            "worker_cpu_us_per_interaction": _r(inter.us_per_event(inter.worker_cpu_s)),
            "redis_cpu_us_per_interaction": _r(inter.us_per_event(inter.redis_cpu_s)),
            "latency": rows,
            "max_rate_p99_under_50ms": best,
            "payments_per_s_2proc": _r(two.rate) if two is not None else None,
        }

    def _report_logs(self) -> None:
        for path in self.logs:
            if not path.exists():
                continue
            text = path.read_text(errors="replace")
            errors = sum(1 for line in text.splitlines() if " ERROR " in line or line.startswith("Traceback"))
            if errors:
                self.say(f"WARNING: {errors} error line(s) in {path}")


class DrainReader:
    """Reads output topics from the beginning in a thread until ``expected`` distinct event ids came out.

    The clock starts at the first output read (``n0`` of them then) and stops at the last; the CPU of
    ``pids`` and of Redis is sampled at the same two moments.
    """

    def __init__(self, bench: E2EBench, ph: Phase, out_topics: tuple[str, ...], expected: int, label: str) -> None:
        self.bench, self.ph, self.label = bench, ph, label
        self.drain = Drain(expected)
        self.pids: list[int] = []
        self.seen: set[str] = set()
        self.last_new = time.monotonic()
        self.stop = threading.Event()
        self.failure: BaseException | None = None
        self.redis = redis.Redis.from_url(ph.settings.redis_url)
        self.consumer = Consumer({"bootstrap.servers": ph.broker.bootstrap,
                                  "group.id": f"bench-{secrets.token_hex(4)}", "enable.auto.commit": False,
                                  "fetch.wait.max.ms": 10})
        self.consumer.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t in out_topics
                              for p in range(ph.settings.partitions)])
        self.thread = threading.Thread(target=self._run, name="drain-reader", daemon=True)

    def start(self) -> DrainReader:
        self.thread.start()
        return self

    def _run(self) -> None:
        d, seen = self.drain, self.seen
        cpu0 = rcpu0 = 0.0
        try:
            while not self.stop.is_set() and len(seen) < d.expected:
                msgs = self.consumer.consume(500, timeout=0.05)
                now = time.monotonic()
                before = len(seen)
                for msg in msgs:
                    if msg.error() is None:
                        d.messages += 1
                        seen.add(orjson.loads(msg.value()).get("event_id") or "")
                if len(seen) > before:
                    self.last_new = d.t1 = now
                    if not d.t0:
                        cpu0, rcpu0 = proc_cpu_s(self.pids), redis_cpu_s(self.redis)
                        d.t0, d.n0 = now, len(seen)
            if d.t0:
                d.worker_cpu_s = proc_cpu_s(self.pids) - cpu0
                d.redis_cpu_s = redis_cpu_s(self.redis) - rcpu0
        except BaseException as exc:  # surfaced by wait()
            self.failure = exc
        finally:
            self.consumer.close()
            self.redis.close()

    def wait(self) -> Drain:
        d, progress, stall_s = self.drain, self.bench.progress, self.bench.cfg.stall_s
        try:
            while self.thread.is_alive():
                self.thread.join(0.2)
                now = time.monotonic()
                if now - self.last_new > stall_s + (0 if d.t0 else 60):
                    self.bench.say(f"\n  {self.label}: no new output for {now - self.last_new:.0f}s; "
                                   f"stopping at {len(self.seen):,}")
                    break
                self.ph.check_alive()
                elapsed = now - d.t0 if d.t0 else 0
                progress.show(f"  {self.label}: {len(self.seen):,}/{d.expected:,} outputs"
                              + (f" ({(len(self.seen) - d.n0) / elapsed:,.0f}/s)" if elapsed > 0 else ""))
        finally:
            self.stop.set()
            self.thread.join()
        if self.failure is not None:
            raise RuntimeError(f"{self.label}: the output reader failed") from self.failure
        d.distinct = len(self.seen)
        if d.distinct and not d.timed:
            self.bench.say(f"  {self.label}: every output came in the first read, so there is no window to "
                           "time: use more --events (a few thousand)")
        progress.show(f"  {self.label}: {d.distinct:,}/{d.expected:,} outputs, {(d.rate or 0):,.0f}/s (from the "
                      f"first output to the last; {d.messages - d.distinct} repeated)", force=True)
        progress.done()
        return d


@dataclass
class Phase:
    """One fresh broker, a Redis prefix of its own, and the worker processes started on them."""

    bench: E2EBench
    name: str
    broker: EmbeddedBroker
    settings: Settings
    workers: list[subprocess.Popen] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)

    def log_path(self, what: str) -> Path:
        path = Path(tempfile.gettempdir()) / f"kestrel-bench-{self.bench.run_id}-{self.name}-{what}.log"
        self.bench.logs.append(path)
        return path

    def start_worker(self, wait: bool = True, web_port: int | None = None) -> subprocess.Popen:
        settings = self.settings.with_(web_port=web_port or self.settings.web_port)
        proc = start_worker(settings, self.log_path(f"worker{len(self.workers)}"))
        self.workers.append(proc)
        self.urls.append(f"http://{settings.web_host}:{settings.web_port}")
        if wait:
            self.wait_ready()
        return proc

    def wait_ready(self) -> None:
        t0 = time.monotonic()
        for url, proc in zip(self.urls, self.workers, strict=True):
            _wait_ready(url, proc, timeout_s=120)
        self.bench.say(f"  {len(self.workers)} worker(s) ready in {time.monotonic() - t0:.1f}s "
                       f"(pid {', '.join(str(w.pid) for w in self.workers)})")

    def check_alive(self) -> None:
        for proc in self.workers:
            if proc.poll() is not None:
                raise RuntimeError(f"{self.name}: process {proc.pid} exited with code {proc.returncode} "
                                   f"(logs: {', '.join(str(p) for p in self.bench.logs[-2:])})")

    def close(self) -> None:
        for proc in self.workers:
            stop_worker(proc)
        self.workers.clear()


class LatencyRig:
    """A broker, one worker and a Collector for a latency step, after a short warm-up that is not counted."""

    def __init__(self, bench: E2EBench, name: str) -> None:
        self.bench, self.name = bench, name
        self.stack = contextlib.ExitStack()
        self.sim = Simulator(SimConfig(seed=bench.cfg.seed + 1))
        self.records = self.sim.records()
        self.sent_at: dict[str, float] = {}
        self.producer: EventProducer | None = None

    def start(self) -> LatencyRig:
        ph = self.ph = self.stack.enter_context(self.bench.phase(self.name))
        ph.start_worker()
        self.collector = Collector(ph.broker.bootstrap, ph.settings.partitions, self.sent_at)
        self.thread = threading.Thread(target=self.collector.run, name="collector", daemon=True)
        self.thread.start()
        self.producer = EventProducer(ph.broker.bootstrap, ph.settings.hash_key)
        if self.bench.cfg.warmup_s:
            self.bench.say(f"  warm-up: {self.bench.cfg.warmup_s:g}s at 200 events/s (not counted)")
            self._send(200.0, self.bench.cfg.warmup_s, "warm-up")
        return self

    def _send(self, rate: float, duration: float, label: str) -> tuple[list[str], float, bool]:
        stream = list(itertools.islice(self.records, int(rate * duration)))
        ids: list[str] = []
        progress, producer = self.bench.progress, self.producer
        assert producer is not None
        t0 = time.monotonic()
        for rec in paced(iter(stream), rate, len(stream), duration):
            self.sent_at[rec.event_id] = time.monotonic()
            send(producer, rec)
            ids.append(rec.event_id)
            if len(ids) % 100 == 0:
                progress.show(f"  {label}: sent {len(ids):,} ({len(ids) / max(time.monotonic() - t0, 1e-9):,.0f}/s)"
                              f" | outputs so far {len(self.collector.latencies_ms):,}")
                self.ph.check_alive()
        producer.flush()
        elapsed = time.monotonic() - t0
        drained = self._wait_drained(set(ids), label)
        return ids, elapsed, drained

    def _wait_drained(self, pending: set[str], label: str) -> bool:
        progress = self.bench.progress
        last_progress, left = time.monotonic(), len(pending)
        while pending:
            with self.collector.lock:
                seen = self.collector.seen.values()
                pending = {eid for eid in pending if not any(eid in c for c in seen)}
            now = time.monotonic()
            if len(pending) < left:
                last_progress, left = now, len(pending)
            elif now - last_progress > self.bench.cfg.stall_s:
                self.bench.say(f"\n  {label}: {len(pending):,} events without output after "
                               f"{self.bench.cfg.stall_s:g}s of no progress")
                return False
            progress.show(f"  {label}: draining, {len(pending):,} events without an output yet")
            self.ph.check_alive()
            time.sleep(0.1)
        return True

    def step(self, rate: float, duration: float) -> dict[str, Any]:
        label = f"{rate:,.0f} events/s"
        with self.collector.lock:
            i0 = len(self.collector.latencies_ms)
        ids, elapsed, drained = self._send(rate, duration, label)
        time.sleep(0.5)  # let a late duplicate arrive before counting
        with self.collector.lock:
            lat = np.asarray(self.collector.latencies_ms[i0:])
            counts = [sum(c.get(eid, 0) for c in self.collector.seen.values()) for eid in ids]
        lost = sum(1 for n in counts if n == 0)
        duplicates = sum(n - 1 for n in counts if n > 1)
        p50 = float(np.percentile(lat, 50)) if lat.size else None
        p99 = float(np.percentile(lat, 99)) if lat.size else None
        row = {"offered_per_s": rate, "p50_ms": _r(p50, 2), "p99_ms": _r(p99, 2), "lost": lost,
               "duplicates": duplicates, "sent": len(ids), "sent_per_s": _r(len(ids) / max(elapsed, 1e-9)),
               "drained": drained}
        self.bench.progress.show(f"  {label}: sent {len(ids):,} ({row['sent_per_s']:,.0f}/s), p50 {row['p50_ms']} ms, "
                                 f"p99 {row['p99_ms']} ms, lost {lost}, duplicates {duplicates}", force=True)
        self.bench.progress.done()
        return row

    def close(self) -> None:
        with contextlib.suppress(AttributeError):
            self.collector.stop.set()
            self.thread.join(timeout=10)
        self.producer = None  # gone before its broker is, or librdkafka logs the disconnect
        self.stack.close()


# -- the bare Faust agent (run in its own process) ---------------------------------
def bare_worker(s: Settings) -> None:
    """Takes the worker's batches from events.transactions and produces each input, acked, to BARE_OUT.

    Its consumer and producer are configured as the worker's are (fetch wait, linger, record batches and their
    compression), so the floor is like for like.
    """
    import faust

    from kestrel.streams.worker.app import run_worker
    from kestrel.streams.worker.consumer import set_fetch_wait

    set_fetch_wait(s.fetch_max_wait_ms)
    app = faust.App(f"bare-{secrets.token_hex(3)}", broker=f"kafka://{s.broker}", store="memory://",
                    topic_partitions=s.partitions, consumer_auto_offset_reset="earliest", broker_session_timeout=3,
                    broker_heartbeat_interval=0.5, **s.faust_producer(), web_port=free_port(), web_bind="127.0.0.1",
                    web_host="127.0.0.1")
    source = app.topic(topics.TRANSACTIONS, value_serializer="raw", key_serializer="raw")

    @app.agent(source)
    async def relay(stream: Any) -> None:
        async for events in stream.take_events(s.batch_size, within=s.batch_within_s):
            producer = app.producer
            futures = [await producer.send(BARE_OUT, e.message.key, e.message.value, None, None, None)
                       for e in events]
            await asyncio.gather(*futures)

    run_worker(app, "warning")


# -- command line ------------------------------------------------------------------
def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--events", type=int, default=20_000,
                   help="backlog size of each drain (default 20,000; a few thousand at least, so that the outputs "
                        "span several reads)")
    p.add_argument("--rates", default="500,1000,2000", help="offered rates of the latency steps, events/s")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of each latency step")
    p.add_argument("--processes", type=int, default=1, choices=[1, 2],
                   help="2: also the payment drain by two worker processes of one group")
    p.add_argument("--no-search", action="store_true", help="only the fixed rates: no search for the best one")
    p.add_argument("--quick", action="store_true",
                   help="a short run: 3,000 events, rates 500,1000 for 5 s each, one search step")
    p.add_argument("--fraud-model", default="", metavar="PATH", help="fraud model artifact (default: rules)")
    p.add_argument("--recs-model", default="", metavar="PATH", help="two-tower artifact (default: trending)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--json", action="store_true", help="print the summary as one line of JSON")


def config_from_args(args: argparse.Namespace) -> E2EConfig:
    rates = tuple(float(r) for r in str(args.rates).split(",") if r.strip())
    cfg = E2EConfig(events=args.events, rates=rates, duration_s=args.duration, processes=args.processes,
                    search=not args.no_search, fraud_model=args.fraud_model, recs_model=args.recs_model,
                    seed=args.seed)
    if args.quick:
        cfg = replace(cfg, events=min(cfg.events, 3000), duration_s=min(cfg.duration_s, 5.0),
                      rates=rates if args.rates != "500,1000,2000" else (500.0, 1000.0), search_steps=1)
    return cfg


def run(cfg: E2EConfig, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The whole bench; returns the summary (the keys of ``JSON_KEYS``)."""
    return E2EBench(cfg, say).run()


def print_table(summary: dict[str, Any]) -> None:
    def fmt(v: Any, unit: str = "") -> str:
        return "-" if v is None else (f"{v:,.1f}{unit}" if isinstance(v, float) else f"{v}{unit}")

    rows = [("payments/s, one worker (drain)", fmt(summary["payments_per_s"])),
            ("interactions/s, one worker (drain)", fmt(summary["interactions_per_s"])),
            ("bare Faust agent, consume + produce, /s", fmt(summary["bare_faust_per_s"])),
            ("payments / bare", "-" if summary["ratio_to_bare"] is None else f"{summary['ratio_to_bare']:.3f}"),
            ("worker CPU per payment", fmt(summary["worker_cpu_us_per_payment"], " µs")),
            ("Redis CPU per payment (whole server)", fmt(summary["redis_cpu_us_per_payment"], " µs")),
            ("worker CPU per interaction", fmt(summary["worker_cpu_us_per_interaction"], " µs")),
            ("Redis CPU per interaction (whole server)", fmt(summary["redis_cpu_us_per_interaction"], " µs")),
            ("payments/s, two workers (drain)", fmt(summary["payments_per_s_2proc"])),
            ("highest rate with p99 < 50 ms", fmt(summary["max_rate_p99_under_50ms"], " events/s"))]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v:>14}")
    print()
    print(f"{'offered/s':>10} {'sent/s':>10} {'p50 ms':>9} {'p99 ms':>9} {'lost':>6} {'dups':>6}")
    for row in summary["latency"]:
        print(f"{row['offered_per_s']:>10,.0f} {row['sent_per_s']:>10,.0f} {fmt(row['p50_ms']):>9} "
              f"{fmt(row['p99_ms']):>9} {row['lost']:>6} {row['duplicates']:>6}")


def cmd_bench_e2e(args: argparse.Namespace) -> int:
    summary = run(config_from_args(args))
    if args.json:
        print(json.dumps(summary))
    else:
        print_table(summary)
    return 0


def register(bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser(
        "e2e", help="one worker end to end: payment and interaction drains beside a bare Faust agent, CPU per "
                    "event (worker; Redis whole-server), latency at fixed rates and the best rate under 50 ms p99",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    p.set_defaults(func=cmd_bench_e2e)


if __name__ == "__main__":
    if sys.argv[1:] == ["bare-worker"]:
        bare_worker(Settings.from_env())
    else:
        print("usage: kestrel bench e2e (this module's own entry point only runs the bare agent)", file=sys.stderr)
        sys.exit(2)
