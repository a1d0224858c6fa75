"""Throughput of one worker process draining a backlog, beside a bare Faust agent as the baseline.

    .venv/bin/python bench/worker_throughput.py [--events 20000] [--kind transaction|interaction] [--bare] [--json]

Loads N events into a fresh embedded broker, then starts one worker and times
from its first output to its last (so start-up and the group join are not
counted). ``--bare`` times a Faust agent that only takes batches, in the same
way: the framework's own ceiling on this machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from kestrel.feature_store import topics
from kestrel.offline.simulator import SimConfig, Simulator
from kestrel.streams.cli.demo import erase_prefix, start_worker, stop_worker
from kestrel.streams.cli.produce import send
from kestrel.streams.config import Settings
from kestrel.streams.ingest.producer import EventProducer
from kestrel.streams.services import EmbeddedBroker, free_port

BARE_DONE = "BARE-DONE"


def bare_worker(broker: str, n: int) -> None:
    """A Faust app whose agent only takes batches: prints when it has seen ``n`` events."""
    import faust

    from kestrel.streams.worker.app import run_worker
    from kestrel.streams.worker.consumer import set_fetch_wait

    set_fetch_wait(10)
    app = faust.App(f"bare-{secrets.token_hex(3)}", broker=f"kafka://{broker}", store="memory://",
                    broker_session_timeout=3, broker_heartbeat_interval=0.5, web_port=free_port())
    source = app.topic(topics.TRANSACTIONS, value_serializer="raw", key_serializer="raw")
    seen = {"n": 0, "t0": 0.0}

    @app.agent(source)
    async def take(stream):
        async for events in stream.take_events(500, within=0.005):
            seen["t0"] = seen["t0"] or time.monotonic()
            seen["n"] += len(events)
            if seen["n"] >= n:
                print(f"{BARE_DONE} {seen['n'] / (time.monotonic() - seen['t0']):.0f}", flush=True)

    run_worker(app, "error")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--kind", choices=["transaction", "interaction"], default="transaction")
    parser.add_argument("--bare", action="store_true", help="time a bare Faust agent instead")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--bare-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_worker:
        bare_worker(args.bare_worker, args.events)
        return 0
    kind = "transaction" if args.bare else args.kind
    with EmbeddedBroker() as broker:
        settings = Settings.from_env().with_(broker=broker.bootstrap, redis_prefix=f"bench-{secrets.token_hex(4)}",
                                             app_id=f"bench-{secrets.token_hex(3)}", web_port=free_port(),
                                             session_timeout_s=3.0, heartbeat_interval_s=0.5)
        topics.ensure_topics(broker.bootstrap, settings.partitions)
        producer = EventProducer(broker.bootstrap, settings.hash_key)
        records = (r for r in Simulator(SimConfig()).records() if r.kind == kind)
        for rec in itertools.islice(records, args.events):
            send(producer, rec)
        producer.flush()
        print(f"loaded {args.events:,} {kind} events", file=sys.stderr)
        if args.bare:
            proc = subprocess.Popen([sys.executable, __file__, "--events", str(args.events), "--bare-worker",
                                     broker.bootstrap], stdout=subprocess.PIPE, text=True)
            rate = None
            assert proc.stdout is not None
            for line in proc.stdout:
                if BARE_DONE in line:
                    rate = float(line.split(BARE_DONE)[1].split()[0])
                    break
            proc.terminate()
            proc.wait()
        else:
            out_topic = topics.FRAUD_DECISIONS if kind == "transaction" else topics.RECOMMENDATION_DECISIONS
            consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "bench",
                                 "fetch.wait.max.ms": 10})
            consumer.assign([TopicPartition(out_topic, p, OFFSET_BEGINNING) for p in range(settings.partitions)])
            worker = start_worker(settings, Path(tempfile.gettempdir()) / "kestrel-bench-worker.log")
            n, first = 0, 0.0
            deadline = time.monotonic() + 600
            while n < args.events and time.monotonic() < deadline:
                for msg in consumer.consume(500, timeout=0.05):
                    if msg.error() is None:
                        n += 1
                        first = first or time.monotonic()
                print(f"\r{n:,} decisions", end="", file=sys.stderr)
            rate = n / (time.monotonic() - first)
            print(file=sys.stderr)
            stop_worker(worker)
            consumer.close()
            erase_prefix(settings.redis_url, settings.redis_prefix)
    summary = {"kind": "bare_faust_agent" if args.bare else kind, "events": args.events,
               "events_per_s": round(rate or 0.0, 1)}
    print(json.dumps(summary) if args.json else f"{summary['kind']}: {summary['events_per_s']:,.0f} events/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
