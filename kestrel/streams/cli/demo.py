"""``kestrel demo``: the whole pipeline on one machine, reconciled end to end.

Starts the embedded broker (unless ``KESTREL_BROKER`` points at one), finds or
starts Redis, runs a real worker process and the simulator, shows live
progress, then reconciles every event id sent against the decisions and dead
letters that came out: ``lost`` and ``duplicates`` are counted, not assumed.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import queue
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from kestrel.feature_store import topics
from kestrel.feature_store.erase import delete_matching
from kestrel.offline.simulator import SimConfig, SimRecord, Simulator
from kestrel.streams.cli.produce import paced, send
from kestrel.streams.config import Settings
from kestrel.streams.ingest.producer import EventProducer
from kestrel.streams.services import EmbeddedBroker, LocalRedis, free_port

OUTPUT_KINDS = {topics.FRAUD_DECISIONS: "fraud", topics.RECOMMENDATION_DECISIONS: "recs",
                topics.TRAINING_EXAMPLES: "labels", topics.DEADLETTER: "deadletter"}


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--events", type=int, default=20_000, help="events to send (0: use --duration)")
    p.add_argument("--duration", type=float, default=0.0, help="seconds to stream (0: until --events sent)")
    p.add_argument("--rate", type=float, default=2000.0, help="events per second (0: as fast as possible)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--invalid-share", type=float, default=0.01, help="share of malformed events injected")
    p.add_argument("--label-delay", type=float, default=1800.0, help="simulated seconds before labels arrive")
    p.add_argument("--recs-every", type=int, default=200, help="ask GET /recommendations every N events")
    p.add_argument("--drain-timeout", type=float, default=60.0, help="seconds to wait for the last decisions")
    p.add_argument("--fraud-model", default="auto", metavar="auto|rules|PATH",
                   help="auto: KESTREL_FRAUD_MODEL, else artifacts/fraud-demo (trained on simulated history on the "
                        "first run, ~10 s); rules: the rules baseline; PATH: an artifact (root)")
    p.add_argument("--recs-model", default="auto", metavar="auto|trending|PATH",
                   help="auto: KESTREL_RECS_MODEL, else artifacts/recs-demo (a two-tower trained on simulated "
                        "interactions on the first run, ~45 s); trending: no model; PATH: an artifact (root)")
    p.add_argument("--promote-midway", action="store_true",
                   help="serve the fraud model from a registry, train a second version halfway through the stream, "
                        "promote it through the gate (or report why the gate refused) and hot-swap the worker")
    p.add_argument("--experiment", action="store_true",
                   help="run an A/B experiment on the live payments: control keeps a champion trained on shuffled "
                        "labels, variant B runs the demo's model, in a world with ten times the fraud (labelled "
                        "frauds in both variants); the summary ends with the live verdict")
    p.add_argument("--json", action="store_true", help="end with a one-line JSON summary")


@dataclass
class Collector:
    """Reads every output topic from the beginning and tallies event ids."""

    bootstrap: str
    partitions: int
    sent_at: dict[str, float]
    seen: dict[str, Counter] = field(default_factory=lambda: {k: Counter() for k in OUTPUT_KINDS.values()})
    latencies_ms: list[float] = field(default_factory=list)
    actions: Counter = field(default_factory=Counter)
    fraud_actions: dict[str, str] = field(default_factory=dict)
    versions: Counter = field(default_factory=Counter)  # fraud decisions by the model version that made them
    recs_versions: Counter = field(default_factory=Counter)  # personalised recommendations by model version
    dl_reasons: Counter = field(default_factory=Counter)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self) -> None:
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": f"demo-{secrets.token_hex(4)}",
                             "enable.auto.commit": False, "auto.offset.reset": "earliest",
                             "fetch.wait.max.ms": 10})
        consumer.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t in OUTPUT_KINDS for p in range(self.partitions)])
        try:
            while not self.stop.is_set():
                for msg in consumer.consume(500, timeout=0.005):
                    if msg.error():
                        continue
                    self._tally(msg.topic(), msg.value(), time.monotonic())
        finally:
            consumer.close()

    def _tally(self, topic: str, value: bytes, now: float) -> None:
        doc = orjson.loads(value)
        event_id = doc.get("event_id") or ""
        kind = OUTPUT_KINDS[topic]
        with self.lock:
            self.seen[kind][event_id] += 1
            sent = self.sent_at.get(event_id)
            if sent is not None and self.seen[kind][event_id] == 1:
                self.latencies_ms.append((now - sent) * 1000)
            if kind == "fraud":
                self.actions[doc.get("action")] += 1
                self.fraud_actions[event_id] = doc.get("action")
                if self.seen[kind][event_id] == 1:
                    self.versions[doc.get("model_version")] += 1
            elif kind == "recs" and doc.get("path") == "personalised" and self.seen[kind][event_id] == 1:
                self.recs_versions[doc.get("model_version")] += 1
            elif kind == "deadletter":
                self.dl_reasons[doc.get("reason")] += 1

    def distinct(self, kind: str) -> int:
        with self.lock:
            return len(self.seen[kind])

    def all_ids(self) -> Counter:
        with self.lock:
            total: Counter = Counter()
            for counts in self.seen.values():
                total.update(counts)
            return total

    def percentiles(self) -> tuple[float, float]:
        with self.lock:
            if not self.latencies_ms:
                return 0.0, 0.0
            arr = np.asarray(self.latencies_ms)
        return float(np.percentile(arr, 50)), float(np.percentile(arr, 99))

    def p99_by_quarter(self) -> list[float]:
        """p99 of each quarter of the decisions in arrival order: shows a pipeline that slows through the run."""
        with self.lock:
            arr = np.asarray(self.latencies_ms)
        return [round(float(np.percentile(q, 99)), 1) for q in np.array_split(arr, 4) if len(q)]


def _get_json(url: str, timeout: float = 2.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (urllib.error.URLError, OSError):
        return 0, None


class RecommendationAsker:
    """Asks ``GET /recommendations`` from a thread of its own, as an app would, and scores the answers.

    The expected click-through uses the simulator's ground-truth click model.
    Each request is followed by the same request on the trending path
    (``path=fallback``), so the served model and the popularity baseline are
    judged on the same users at the same moments.
    """

    def __init__(self, web: str, sim: Simulator) -> None:
        self.web, self.sim = web, sim
        self.answered = 0
        self.latencies_ms: list[float] = []
        self.expected_ctr: list[float] = []
        self.expected_ctr_popularity: list[float] = []
        self.ctr_by_path: dict[str, list[float]] = {}
        self.queue: queue.Queue[str | None] = queue.Queue(maxsize=100)
        self.thread = threading.Thread(target=self._run, name="recs", daemon=True)
        self.thread.start()

    def ask(self, user_id: str) -> None:
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(user_id)

    def _run(self) -> None:
        while (user_id := self.queue.get()) is not None:
            t0 = time.monotonic()
            status, body = _get_json(f"{self.web}/recommendations/{user_id}?k=10")
            if status != 200:
                continue
            self.latencies_ms.append((time.monotonic() - t0) * 1000)
            self.answered += 1
            user = Simulator.user_index(user_id)
            ctr = self._ctr(user, body["items"])
            if ctr is None:
                continue
            self.expected_ctr.append(ctr)
            self.ctr_by_path.setdefault(body.get("path", "?"), []).append(ctr)
            status, base = _get_json(f"{self.web}/recommendations/{user_id}?k=10&path=fallback")
            base_ctr = self._ctr(user, base["items"]) if status == 200 else None
            if base_ctr is not None:
                self.expected_ctr_popularity.append(base_ctr)

    def _ctr(self, user: int, item_ids: list[str]) -> float | None:
        items = [Simulator.item_index(i) for i in item_ids]
        return float(np.mean([self.sim.click_probability(user, i) for i in items])) if items else None

    def ctr_summary(self) -> dict[str, Any]:
        """Mean expected click-through of what was served, of the popularity baseline, and by path."""
        def mean(xs: list[float]) -> float | None:
            return round(float(np.mean(xs)), 4) if xs else None

        return {"recommendation_expected_ctr": mean(self.expected_ctr),
                "recommendation_expected_ctr_popularity": mean(self.expected_ctr_popularity),
                "recommendation_paths": {p: len(v) for p, v in self.ctr_by_path.items()},
                "recommendation_expected_ctr_personalised": mean(self.ctr_by_path.get("personalised", []))}

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=10)


def _wait_ready(base: str, worker: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise RuntimeError(f"worker exited with code {worker.returncode}")
        status, _ = _get_json(f"{base}/ready", timeout=1.0)
        if status == 200:
            return
        time.sleep(0.2)
    raise TimeoutError(f"worker not ready after {timeout_s}s")


def worker_env(settings: Settings) -> dict[str, str]:
    """The environment a worker process (or the bench's bare agent) reads ``settings`` from."""
    return {**os.environ, **settings.to_env(), "PYTHONUNBUFFERED": "1"}


def start_worker(settings: Settings, log_path: Path) -> subprocess.Popen:
    env = worker_env(settings)
    log = log_path.open("ab")
    try:
        return subprocess.Popen([sys.executable, "-m", "kestrel", "worker", "--loglevel", "warning"],
                                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    finally:
        log.close()


def stop_worker(worker: subprocess.Popen, timeout_s: float = 20.0) -> None:
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def erase_prefix(url: str, prefix: str) -> int:
    """Delete every key of one run (never FLUSHALL a shared server)."""
    return delete_matching(redis.Redis.from_url(url), f"{prefix}:*")


class Progress:
    """One status line, refreshed in place on a terminal and every few seconds otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def show(self, line: str | Callable[[], str], force: bool = False) -> None:
        """Draw ``line``; a callable is called only when the line is due (the demo's costs percentiles)."""
        now = time.monotonic()
        if not force and now - self.last < (0.25 if self.tty else 3.0):
            return
        self.last = now
        if callable(line):
            line = line()
        if self.tty:
            print(f"\r\033[K{line}", end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.tty:
            print(file=sys.stderr)


def run_demo(args: argparse.Namespace) -> int:
    base = Settings.from_env()
    run_id = secrets.token_hex(4)
    embedded = "KESTREL_BROKER" not in os.environ
    broker = EmbeddedBroker().start() if embedded else None
    local_redis = LocalRedis(base.redis_url).start()
    def say(m):
        return (print(m, file=sys.stderr))
    say(f"broker: {'embedded tansu at ' + broker.bootstrap if broker else base.broker + ' (KESTREL_BROKER)'}")
    say(f"redis: {local_redis.describe()}")
    settings = base.with_(
        broker=broker.bootstrap if broker else base.broker, redis_url=local_redis.url,
        redis_prefix=f"{base.redis_prefix}-demo-{run_id}", app_id=f"{base.app_id}-demo-{run_id}",
        web_port=free_port(), api_token=base.api_token or secrets.token_urlsafe(24),
        session_timeout_s=min(base.session_timeout_s, 6.0), heartbeat_interval_s=0.5)
    settings = settings.with_(fraud_model=demo_fraud_model(args.fraud_model, args.seed, say))
    say(f"fraud scorer: {settings.fraud_model or 'rules baseline'}")
    settings = settings.with_(recs_model=demo_recs_model(args.recs_model, args.seed, say))
    say(f"recommender: {settings.recs_model or 'trending items only'}")
    promotion = None
    if args.promote_midway:
        run_dir = Path(tempfile.mkdtemp(prefix=f"kestrel-demo-{run_id}-"))
        root = demo_registry(settings.fraud_model, settings.recs_model, run_dir / "registry")
        settings = settings.with_(fraud_model=str(root), recs_model=str(root) if settings.recs_model else "")
        promotion = MidwayPromotion(root, settings.broker, args.seed, say)
        say(f"model registry for this run: {root} (champions: the demo's models)")
    experiment = None
    if args.experiment:
        if args.promote_midway:
            raise SystemExit("--experiment and --promote-midway both move the registry's champion: choose one")
        run_dir = Path(tempfile.mkdtemp(prefix=f"kestrel-demo-{run_id}-"))
        root = experiment_registry(settings.fraud_model, run_dir / "registry", say)
        settings = settings.with_(fraud_model=str(root))
        experiment = create_demo_experiment(settings)
        say(f"experiment {experiment.key!r}: control = champion (shuffled labels), challenger = the demo's model, "
            f"registry {root}; live at /experiments/{experiment.key}")
    log_path = Path(tempfile.gettempdir()) / f"kestrel-demo-worker-{run_id}.log"
    worker = None
    collector_thread = None
    summary: dict[str, Any] = {}
    try:
        topics.ensure_topics(settings.broker, settings.partitions)
        worker = start_worker(settings, log_path)
        web = f"http://{settings.web_host}:{settings.web_port}"
        _wait_ready(web, worker, timeout_s=60)
        say(f"worker: pid {worker.pid}, {web} (log {log_path})")
        summary = _stream(args, settings, web, worker, promotion)
        if experiment is not None:
            summary["experiment"] = demo_experiment_summary(settings, experiment.key)
    finally:
        if worker is not None:
            stop_worker(worker)
        if collector_thread is not None:
            collector_thread.join()
        if broker is not None:
            broker.stop()
        with contextlib.suppress(redis.RedisError):
            erase_prefix(settings.redis_url, settings.redis_prefix)
        local_redis.stop()
    _print_summary(summary)
    if args.json:
        print(json.dumps(summary))
    return 0 if summary.get("lost", 1) == 0 and summary.get("duplicates", 1) == 0 else 1


def _stream(args: argparse.Namespace, settings: Settings, web: str, worker: subprocess.Popen,
            promotion: MidwayPromotion | None = None) -> dict[str, Any]:
    base = SimConfig()
    # An experiment on fraud needs labelled frauds in both variants: its world has ten times the fraud incidents.
    incidents = base.fraud_incidents_per_sim_hour * (EXPERIMENT_FRAUD_SCALE if args.experiment else 1)
    sim = Simulator(SimConfig(seed=args.seed, invalid_share=args.invalid_share, label_delay_s=args.label_delay,
                              max_event_bytes=settings.max_event_bytes, fraud_incidents_per_sim_hour=incidents))
    sent_at: dict[str, float] = {}
    collector = Collector(settings.broker, settings.partitions, sent_at)
    thread = threading.Thread(target=collector.run, name="collector", daemon=True)
    thread.start()
    producer = EventProducer(settings.broker, settings.hash_key)
    progress = Progress()
    sent = invalid = 0
    asker = RecommendationAsker(web, sim)
    last_user: str | None = None
    started = time.monotonic()

    def line(phase: str) -> str:
        elapsed = max(time.monotonic() - started, 1e-9)
        p50, p99 = collector.percentiles()
        return (f"{phase}: sent {sent:,} ({sent / elapsed:,.0f} ev/s) | fraud decisions "
                f"{collector.distinct('fraud'):,} | recs {collector.distinct('recs'):,} | labels "
                f"{collector.distinct('labels'):,} | dead letters {collector.distinct('deadletter'):,} | "
                f"p50 {p50:.1f} ms p99 {p99:.1f} ms")

    # Generate up front, so the send loop measures the pipeline and not the simulator.
    planned = args.events or int(max(args.rate, 1000) * args.duration)
    print(f"simulating {planned:,} events ...", file=sys.stderr)
    # With a promotion, a quarter more: sent once the candidate's training and the gate are done (the stream
    # pauses for them if it gets there first), so that a promoted version decides a share of the run.
    tail = planned // 4 if promotion else 0
    stream = list(itertools.islice(sim.records(), planned + tail))
    started = time.monotonic()
    paused = 0.0

    def send_paced(records: list[SimRecord]) -> None:
        nonlocal sent, invalid, last_user
        for rec in paced(iter(records), args.rate, 0, args.duration):
            if promotion is not None and promotion.thread is None and sent >= planned // 2:
                promotion.start()
            sent_at[rec.event_id] = time.monotonic()
            send(producer, rec)
            sent += 1
            invalid += not rec.valid
            if rec.kind == "interaction" and rec.event is not None:
                last_user = rec.event.user_id
            if args.recs_every and sent % args.recs_every == 0 and last_user:
                asker.ask(last_user)
            progress.show(lambda: line("streaming"))
            if worker.poll() is not None:
                raise RuntimeError(f"worker died with code {worker.returncode}")

    send_paced(stream[:planned])
    if promotion is not None:
        wait_from = time.monotonic()
        while not promotion.done.wait(0.2):  # nothing in flight meanwhile: latencies are not affected
            progress.show(lambda: line("paused until the candidate is trained and gated"))
        paused = time.monotonic() - wait_from
        send_paced(stream[planned:])  # paced afresh: no burst to catch up
    producer.flush()
    send_elapsed = time.monotonic() - started - paused
    deadline = time.monotonic() + args.drain_timeout
    while time.monotonic() < deadline:
        if set(sent_at) <= set(collector.all_ids()):
            break
        progress.show(lambda: line("draining"))
        time.sleep(0.1)
    time.sleep(0.5)  # let any late duplicate arrive before counting
    collector.stop.set()
    thread.join()
    asker.close()
    swaps = _worker_swaps(web) if promotion is not None else None
    progress.show(line("done"), force=True)
    progress.done()
    seen = collector.all_ids()
    lost = len(set(sent_at) - set(seen))
    duplicates = sum(n - 1 for n in seen.values() if n > 1)
    p50, p99 = collector.percentiles()
    valid = sum(1 for eid in sent_at if eid in seen) - collector.distinct("deadletter")
    return {
        "events_sent": sent,
        "events_valid": valid,
        "deadlettered": collector.distinct("deadletter"),
        "invalid_injected": invalid,
        "fraud_decisions": collector.distinct("fraud"),
        "recommendation_decisions": collector.distinct("recs"),
        "training_examples": collector.distinct("labels"),
        "recommendation_requests": asker.answered,
        "recommendation_p99_ms": round(float(np.percentile(asker.latencies_ms, 99)), 2) if asker.latencies_ms else None,
        **asker.ctr_summary(),
        "lost": lost,
        "duplicates": duplicates,
        "p50_ms": round(p50, 2),
        "p99_ms": round(p99, 2),
        "p99_ms_by_quarter": collector.p99_by_quarter(),
        "events_per_s": round(sent / max(send_elapsed, 1e-9), 1),
        "actions": dict(collector.actions),
        **_fraud_summary(stream, collector),
        "deadletter_reasons": dict(collector.dl_reasons),
        **({"swaps": swaps, "decisions_by_version": dict(collector.versions),
            "recommendations_by_version": dict(collector.recs_versions), "promotion": promotion.result}
           if promotion is not None else {}),
    }


def _fraud_summary(stream: list[SimRecord], collector: Collector) -> dict[str, Any]:
    """How the live scorer did against the simulator's ground truth (flagged = review or block)."""
    with collector.lock:
        actions = dict(collector.fraud_actions)
    frauds = [r.event_id for r in stream if r.kind == "transaction" and r.fraud]
    flagged = [eid for eid, action in actions.items() if action != "allow"]
    fraud_ids = set(frauds)
    caught = sum(1 for eid in frauds if actions.get(eid, "allow") != "allow")
    return {"frauds_sent": len(frauds), "frauds_flagged": caught,
            "fraud_recall": round(caught / len(frauds), 4) if frauds else None,
            "flagged_precision": round(sum(1 for eid in flagged if eid in fraud_ids) / len(flagged), 4)
            if flagged else None}


def _explicit_model(choice: str, baseline: str, env_var: str) -> str | None:
    """What ``--*-model`` asks for unless it is "auto": "" for the baseline, a path, or the env var's path."""
    if choice == baseline:
        return ""
    if choice != "auto":
        return choice
    return os.environ.get(env_var) or None


def demo_fraud_model(choice: str, seed: int, say: Callable[[str], None]) -> str:
    """The fraud model artifact the demo's worker loads ("" = rules); trains one on its first run."""
    chosen = _explicit_model(choice, "rules", "KESTREL_FRAUD_MODEL")
    if chosen is not None:
        return chosen
    from kestrel.models.fraud_features import INPUT_NAMES
    from kestrel.models.fraud_model import latest_artifact

    # The demo's simulator: 2 events per simulated second, 75% payments, 2,000 cards. A model trained on the
    # same traffic (another seed): velocity features mean the same thing in training and in the demo.
    per_day, cards = SimConfig().events_per_sim_second * SimConfig().transaction_share * 86400, SimConfig().n_cards
    root = Path("artifacts/fraud-demo")
    found = latest_artifact(root)
    meta = json.loads((found / "meta.json").read_text()) if found is not None else {}
    stale = (meta.get("report", {}).get("source", {}).get("payments_per_day") != per_day
             or meta.get("inputs") != list(INPUT_NAMES))  # trained by an older build on other inputs
    if found is None or stale:
        from kestrel.offline.fraud_train import train_on_simulated_history

        say("training a fraud model on 12 simulated hours of the demo's traffic (first run only, ~20 s; "
            "`kestrel train fraud` for real data)")
        train_on_simulated_history(root, days=0.5, payments_per_day=per_day, n_cards=cards, seed=seed + 1000,
                                   progress=say)
    return str(root)


def demo_recs_model(choice: str, seed: int, say: Callable[[str], None]) -> str:
    """The two-tower artifact root the demo's worker loads ("" = trending only); trains one on its first run."""
    chosen = _explicit_model(choice, "trending", "KESTREL_RECS_MODEL")
    if chosen is not None:
        return chosen
    root = Path("artifacts/recs-demo")
    if not (root / "CURRENT").exists():
        say("training a two-tower recommender and its EASE part on 100,000 simulated interactions "
            "(first run only, ~45 s)")
        # Same seed as the demo's stream: the seed makes the world (catalog, shoppers' tastes) the model must know.
        subprocess.run([sys.executable, "-m", "kestrel", "train", "recs", "--simulate", "100000",
                        "--seed", str(seed), "--out", str(root)], check=True, stdout=subprocess.DEVNULL)
    return str(root)


class MidwayPromotion:
    """``--promote-midway``: a second version of both models trained while the stream runs, put through the gate.

    The demo's worker serves a registry (made for the run) whose ``champion``
    of each kind is the demo's model. Halfway through the stream a process
    trains a fraud candidate on another simulated history of the demo's
    traffic, and a recommender on another sample of its world, registers
    each with its held-out window (the champion measured on the same one),
    asks the gate, and announces each move that passed; the worker hears it
    and hot-swaps. The result says what each gate decided and why.
    """

    def __init__(self, registry_root: Path, broker: str, seed: int, say: Callable[[str], None]) -> None:
        self.registry_root, self.broker, self.seed, self.say = registry_root, broker, seed, say
        self.result: dict[str, Any] = {}
        self.done = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="promote-midway", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import multiprocessing

        started = time.monotonic()
        try:  # in another process: training would hold this one's GIL and delay the sender and the collector
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                self.result = pool.apply(train_and_promote, (str(self.registry_root), self.broker, self.seed))
            for kind, result in (("fraud", self.result), ("recs", self.result.get("recs"))):
                if result:
                    self.say(f"midway promotion ({kind}): {result['candidate']} {result['gate']}"
                             + "".join(f" ({r})" for r in result["reasons"]))
        except Exception as exc:  # the demo goes on with its champion
            self.result = {"error": repr(exc)}
            self.say(f"midway promotion failed: {exc!r}")
        finally:
            self.result["seconds"] = round(time.monotonic() - started, 1)
            self.done.set()


def train_and_promote(registry_root: str, broker: str, seed: int, days: float = 0.75, epochs: int = 4,
                      members: int = 2) -> dict[str, Any]:
    """Train a candidate on ``days`` of simulated demo traffic, register it, ask the gate, announce if it passed.

    Smaller than the first run's model (fewer epochs and members) so that it is ready while the stream still
    runs on two shared cores, trained on more hours than the champion's twelve.
    """
    import torch

    from kestrel.models.registry import Registry, is_registry, promote
    from kestrel.offline.fraud_registry import train_candidate
    from kestrel.offline.fraud_train import simulated_training_rows
    from kestrel.streams.worker.model_updates import announce

    torch.set_num_threads(1)  # the stream's worker, broker and Redis share the cores: they go first
    os.nice(10)
    registry = Registry(registry_root, "fraud")
    per_day = SimConfig().events_per_sim_second * SimConfig().transaction_share * 86400
    rows, y, epoch_s, ids, cards = simulated_training_rows(days, per_day, seed=seed + 2000,
                                                           n_cards=SimConfig().n_cards)
    _, record = train_candidate(rows, y, epoch_s, ids, registry, Path(registry_root).parent / "artifacts",
                                epochs=epochs, members=members, groups=cards)
    outcome = promote(registry, record.version, why="kestrel demo --promote-midway")
    if outcome["moved"]:
        announce(broker, "fraud", "champion", record.version, registry_root, outcome["seq"])
    result = {"candidate": record.version, "gate": outcome["action"], "reasons": outcome["reasons"],
              "candidate_ap": record.metrics.get("average_precision"),
              "champion_ap": (record.evaluation.get("champion_metrics") or {}).get("average_precision")}
    if is_registry(registry_root, "recs"):
        result["recs"] = train_and_promote_recs(registry_root, broker, seed)
    return result


def train_and_promote_recs(registry_root: str, broker: str, seed: int, interactions: int = 200_000,
                           epochs: int = 8) -> dict[str, Any]:
    """The recommender's midway candidate: the champion's recipe on twice its history of the demo's world (same
    seed: the same catalogue and tastes; the champion learned the first 100,000 interactions), measured beside
    the champion on its held-out split (each user's newest, mostly after the champion's data), gated,
    announced if it passed. With 120,000 interactions and 3 epochs the gate refused it (Recall@20 0.095
    against 0.137): the champion had seen most of that split."""
    from kestrel.models.gate import GatePolicy
    from kestrel.models.registry import Registry, promote
    from kestrel.offline.recs_data import simulated_interactions
    from kestrel.offline.recs_registry import train_recs_candidate
    from kestrel.streams.cli.recs import load_interactions_frame
    from kestrel.streams.worker.model_updates import announce

    registry = Registry(registry_root, "recs")
    frame = load_interactions_frame(simulated_interactions(interactions, seed=seed))
    _, record = train_recs_candidate(frame, registry, Path(registry_root).parent / "recs-artifacts",
                                       epochs=epochs, seed=seed + 3000)
    outcome = promote(registry, record.version, policy=GatePolicy.for_kind("recs"),
                      why="kestrel demo --promote-midway")
    if outcome["moved"]:
        announce(broker, "recs", "champion", record.version, registry_root, outcome["seq"])
    return {"candidate": record.version, "gate": outcome["action"], "reasons": outcome["reasons"],
            "candidate_recall_at_20": record.metrics.get("recall_at_20"),
            "champion_recall_at_20": (record.evaluation.get("champion_metrics") or {}).get("recall_at_20")}


def demo_registry(fraud_model: str, recs_model: str, root: Path) -> Path:
    """A registry for one run whose ``champion`` of each kind is the demo's model ("" recs model: none)."""
    from kestrel.models.fraud_model import latest_artifact
    from kestrel.models.registry import Registry
    from kestrel.models.two_tower import resolve_artifact

    artifact = latest_artifact(fraud_model)
    if artifact is None:
        raise FileNotFoundError(f"--promote-midway needs a trained fraud model; none at {fraud_model}")
    _register_as(Registry(root, "fraud"), artifact, "meta.json", "champion", "the demo's starting model")
    if recs_model:
        _register_as(Registry(root, "recs"), resolve_artifact(recs_model), "metadata.json", "champion",
                     "the demo's starting recommender")
    return root


def experiment_registry(fraud_model: str, root: Path, say: Callable[[str], None]) -> Path:
    """A registry for ``--experiment``: ``champion`` learned nothing (shuffled labels), ``challenger`` is the
    demo's model, so the experiment has a truly better variant B to find."""
    from kestrel.models.fraud_model import latest_artifact
    from kestrel.models.registry import Registry

    trained = latest_artifact(fraud_model) if fraud_model else None
    if trained is None:
        raise FileNotFoundError(f"--experiment needs a trained fraud model; none at {fraud_model or '(rules)'}")
    shuffled_root = Path("artifacts/fraud-demo-shuffled")
    shuffled = latest_artifact(shuffled_root)
    if shuffled is None:
        from kestrel.offline.fraud_train import train_on_shuffled_labels

        say("training the experiment's champion on shuffled labels (first run only, ~10 s)")
        shuffled = shuffled_root / train_on_shuffled_labels(shuffled_root).version
    registry = Registry(root, "fraud")
    _register_as(registry, shuffled, "meta.json", "champion", "the demo experiment's control: no skill")
    _register_as(registry, trained, "meta.json", "challenger", "the demo experiment's variant B: the demo's model")
    return root


def _register_as(registry: Any, artifact: Path, meta_file: str, alias: str, why: str) -> None:
    """Register a demo artifact (its version read from its metadata) and point ``alias`` at it."""
    from kestrel.models.registry import ModelRecord

    version = json.loads((artifact / meta_file).read_text())["version"]
    registry.register(ModelRecord.new(registry.kind, version, artifact, metrics={}))
    registry.move(alias, version, action="force", why=why)


EXPERIMENT_FRAUD_SCALE = 10  # with --experiment: ~650 frauds in 20,000 events instead of ~65

DEMO_EXPERIMENT = {
    "key": "demo-challenger", "owner": "kestrel demo", "target": "fraud", "hash_attribute": "card",
    "description": "Does the trained model catch more fraud than a champion that learned nothing?",
    "seed": "demo-challenger-1", "status": "running", "primary_metric": "recall",
    "variants": [{"key": "control"}, {"key": "challenger", "model": "challenger"}],
    # The variants of a batch share its latency: a breach here would be a real fault, never the model's skill.
    "guardrail_metrics": ["decision_latency_ms"],
}


def create_demo_experiment(settings: Settings) -> Any:
    """Store the demo's experiment (audited like any other) before the worker starts."""
    from kestrel.feature_store.keys import KeySpace
    from kestrel.models.experiments import Experiment
    from kestrel.streams.experiments.store import ExperimentStore

    store = ExperimentStore(redis.Redis.from_url(settings.redis_url), KeySpace(settings.redis_prefix))
    return store.create(Experiment.model_validate(DEMO_EXPERIMENT), "kestrel demo", why="kestrel demo --experiment")


def demo_experiment_summary(settings: Settings, key: str) -> dict[str, Any]:
    """The experiment's live results as the worker counted them: units, recall per variant, the verdict."""
    from kestrel.feature_store.keys import KeySpace
    from kestrel.streams.experiments.results import experiment_results
    from kestrel.streams.experiments.store import ExperimentStore

    client = redis.Redis.from_url(settings.redis_url)
    keys = KeySpace(settings.redis_prefix)
    store = ExperimentStore(client, keys)
    experiment = store.get(key)
    report = experiment_results(client, keys, experiment)
    comparison = report["comparisons"]["challenger"]
    return {"key": key, "status": experiment.status,
            "variants": {v: {m: r.get(m) for m in ("units", "labelled", "frauds", "recall", "alert_precision",
                                                    "false_positive_rate")}
                         for v, r in report["variants"].items()},
            "srm": report["srm"], "verdict": comparison.get("verdict") or comparison["note"],
            "decision": comparison.get("decision", "keep running"),
            "breaches": [b["guardrail"] for b in report["breaches"]]}


def _worker_swaps(web: str) -> int:
    try:
        with urllib.request.urlopen(f"{web}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except (urllib.error.URLError, OSError):
        return -1
    for line in text.splitlines():
        if line.startswith('kestrel_model_swaps_total{result="swapped"}'):
            return int(float(line.split()[-1]))
    return 0


def _print_summary(summary: dict[str, Any]) -> None:
    if not summary:
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Kestrel demo summary")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        table.add_row(key, str(value))
    Console(stderr=True).print(table)
