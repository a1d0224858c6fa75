"""``kestrel``: the command line of the whole system."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from typing import TYPE_CHECKING

from kestrel.streams.config import Settings

if TYPE_CHECKING:
    from kestrel.feature_store.keys import KeySpace


def cmd_worker(args: argparse.Namespace) -> int:
    from kestrel.feature_store.topics import ensure_topics
    from kestrel.streams.worker.app import create_app, run_worker

    settings = Settings.from_env()
    if args.processes != 1:  # a supervisor of N plain `kestrel worker` children (kestrel.streams.worker.supervisor)
        from kestrel.streams.worker.supervisor import run_supervised

        return run_supervised(args.processes, args.web_port if args.web_port is not None else settings.web_port,
                              ["--loglevel", args.loglevel])
    if settings.hash_key == Settings().hash_key:
        logging.getLogger("kestrel").warning(
            "KESTREL_HASH_KEY is not set: identifiers are hashed with the public development key")
    if args.web_port is not None:
        settings = settings.with_(web_port=args.web_port)
    ensure_topics(settings.broker, settings.partitions)
    run_worker(create_app(settings), args.loglevel)
    return 0


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return int(text)


def cmd_services(args: argparse.Namespace) -> int:
    """Run the dev services in the foreground until Ctrl-C (or SIGTERM), then stop them cleanly."""
    import signal
    import threading

    from kestrel.feature_store.topics import ensure_topics
    from kestrel.streams.services import EmbeddedBroker, LocalRedis

    settings = Settings.from_env()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    broker = EmbeddedBroker(port=args.port) if args.port else EmbeddedBroker()
    with broker, LocalRedis(settings.redis_url) as local_redis:
        ensure_topics(broker.bootstrap, settings.partitions)
        print(f"# tansu broker at {broker.bootstrap} (memory storage); redis: {local_redis.describe()}",
              file=sys.stderr)
        print(f"export KESTREL_BROKER={broker.bootstrap}")
        print(f"export REDIS_URL={local_redis.url}", flush=True)
        try:
            while not stop.wait(0.5):
                if broker.proc is None or broker.proc.poll() is not None:
                    print("broker exited", file=sys.stderr)
                    return 1
        except KeyboardInterrupt:
            pass
    print("# services stopped", file=sys.stderr)
    return 0


def cmd_erase(args: argparse.Namespace) -> int:
    import redis

    from kestrel.feature_store.erase import erase_subject
    from kestrel.feature_store.keys import KeyedHasher, KeySpace

    settings = Settings.from_env()
    entity, _, raw_id = args.entity.partition(":")
    if not raw_id:
        print("use --entity ENTITY:ID, e.g. card:4111111111111111", file=sys.stderr)
        return 2
    keys = KeySpace(settings.redis_prefix)
    report = erase_subject(redis.Redis.from_url(settings.redis_url), keys, KeyedHasher(settings.hash_key.encode()),
                           entity, raw_id)
    case_keys = asyncio.run(_erase_cases(settings, keys, report.token)) if entity == "card" else 0
    print(json.dumps({"entity": report.entity, "token": report.token, "keys_deleted": report.keys_deleted,
                      "alert_case_keys_deleted": case_keys, "tombstone": report.tombstone}))
    return 0


async def _erase_cases(settings: Settings, keys: KeySpace, card_token: str) -> int:
    """The analyst cases and decision history of a card (kestrel.streams.alerts.store), erased with its features."""
    import redis.asyncio as aioredis

    from kestrel.streams.alerts.store import CaseStore

    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        return await CaseStore(client, keys, 0, 0).erase_card(card_token)
    finally:
        await client.aclose()


def cmd_exclude(args: argparse.Namespace) -> int:
    """Items that must not be recommended (out of stock, blocked), or allowed again with --remove."""
    import redis.asyncio as aioredis

    from kestrel.feature_store.keys import KeySpace
    from kestrel.streams.recs.service import EXCLUDED_SET, exclude_items

    settings = Settings.from_env()
    keys = KeySpace(settings.redis_prefix)

    async def run() -> list[str]:
        client = aioredis.Redis.from_url(settings.redis_url)
        try:
            await exclude_items(client, keys, args.items, remove=args.remove)
            return sorted(m.decode() for m in await client.smembers(keys.global_(EXCLUDED_SET)))
        finally:
            await client.aclose()

    print(json.dumps({"excluded": asyncio.run(run())}))
    return 0


def cmd_rebuild_heads(args: argparse.Namespace) -> int:
    """After upgrading from a version without read heads: build them for every stored entity."""
    import redis

    from kestrel.feature_store.keys import KeyedHasher, KeySpace
    from kestrel.feature_store.redis_store import RedisOnlineStore
    from kestrel.feature_store.sets import ALL_SETS

    settings = Settings.from_env()
    store = RedisOnlineStore(redis.Redis.from_url(settings.redis_url), settings.dedup_ttl_s,
                             KeySpace(settings.redis_prefix), KeyedHasher(settings.hash_key.encode()))
    names = args.set or sorted(ALL_SETS)
    print(json.dumps({name: store.rebuild_heads(ALL_SETS[name]) for name in names}))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from kestrel.feature_store.bench import BenchConfig, run

    settings = Settings.from_env()
    result = run(BenchConfig(redis_url=settings.redis_url, events=args.events, entities=args.entities,
                             naive_events=args.naive_events, reads=args.reads))
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>24}  {value}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from kestrel.feature_store.schemas import json_schema

    doc = json_schema()
    if args.type:
        doc = doc["$defs"][args.type]
    print(json.dumps(doc, indent=2))
    return 0


def cmd_produce(args: argparse.Namespace) -> int:
    from kestrel.streams.cli.produce import run_produce

    return run_produce(args)


def cmd_archive(args: argparse.Namespace) -> int:
    """Archive every topic to Parquet until stopped (or idle), or show what the archive holds."""
    from kestrel.offline.archive import Archiver, read_archive

    if args.show:
        table = read_archive(args.root)
        counts: dict[str, int] = {}
        for topic in table.column("topic").to_pylist():
            counts[topic] = counts.get(topic, 0) + 1
        print(json.dumps({"root": args.root, "records": table.num_rows, "by_topic": counts}))
        return 0
    settings = Settings.from_env()
    from kestrel.feature_store.keys import KeyedHasher

    archiver = Archiver(settings.broker, args.root, KeyedHasher(settings.hash_key.encode()), group_id=args.group,
                        flush_rows=args.flush_rows,
                        flush_s=args.flush_s, idle_exit_s=args.idle_exit_s,
                        progress=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps(archiver.run()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from kestrel.streams.cli.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kestrel", description="Real-time recommendations and fraud decisions.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("worker", help="run a stream worker (Faust) against KESTREL_BROKER and REDIS_URL")
    p.add_argument("--web-port", type=int, default=None, help="HTTP port (default KESTREL_WEB_PORT or 6066)")
    p.add_argument("--loglevel", default="warning")
    p.add_argument("--processes", type=_positive_int, default=1, metavar="N",
                   help="run N worker processes of one consumer group (web ports WEB_PORT, WEB_PORT+1, ...), "
                        "supervised: signals are forwarded, a child that dies is restarted (default 1: no supervisor)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("services", help="run the embedded broker (and Redis if none answers) until Ctrl-C")
    p.add_argument("--port", type=int, default=0, help="broker port (default: a free one)")
    p.set_defaults(func=cmd_services)

    p = sub.add_parser("erase", help="delete every feature-store key of a data subject and leave a tombstone")
    p.add_argument("--entity", required=True, metavar="ENTITY:ID",
                   help="card:ID, user:ID or terminal:ID (the raw id; only its keyed hash is used)")
    p.set_defaults(func=cmd_erase)

    from kestrel.feature_store.sets import ALL_SETS

    p = sub.add_parser("exclude", help="items never to recommend (out of stock, blocked); prints the whole list")
    p.add_argument("items", nargs="*", metavar="ITEM_ID")
    p.add_argument("--remove", action="store_true", help="allow these items again")
    p.set_defaults(func=cmd_exclude)

    p = sub.add_parser("rebuild-heads", help="build the feature store's read heads for entities stored "
                                             "without them (once, after upgrading)")
    p.add_argument("--set", action="append", choices=sorted(ALL_SETS), help="feature set (repeatable; default all)")
    p.set_defaults(func=cmd_rebuild_heads)

    # Nested verbs: `kestrel train|eval {fraud,recs}`, `kestrel bench {features,recs}`.
    train = sub.add_parser("train", help="train a model and write a versioned artifact").add_subparsers(
        dest="what", required=True)
    evaluate = sub.add_parser("eval", help="replay a historical CSV and report quality against baselines") \
        .add_subparsers(dest="what", required=True)
    bench = sub.add_parser("bench", help="benchmarks with a baseline in the same run").add_subparsers(
        dest="what", required=True)

    p = bench.add_parser("features", help="online feature store: writes, reads, memory")
    p.add_argument("--events", type=int, default=50_000)
    p.add_argument("--entities", type=int, default=5_000)
    p.add_argument("--naive-events", type=int, default=3_000)
    p.add_argument("--reads", type=int, default=3_000)
    p.add_argument("--json", action="store_true", help="one line of JSON")
    p.set_defaults(func=cmd_bench)

    from kestrel.streams.cli import bench_e2e, experiments, fraud, models, recs

    models.register(sub)
    experiments.register(sub)
    fraud.register(train, evaluate, bench)
    recs.register(train, evaluate, bench)
    bench_e2e.register(bench)

    p = sub.add_parser("schema", help="print the JSON Schema of the event contracts")
    p.add_argument("--type", choices=["transaction", "interaction", "label"])
    p.set_defaults(func=cmd_schema)

    from kestrel.streams.cli.produce import add_produce_args

    p = sub.add_parser("produce", help="send simulated events or replay a CSV to the broker")
    add_produce_args(p)
    p.set_defaults(func=cmd_produce)

    p = sub.add_parser("archive", help="write every topic to Parquet (by topic and event date), committing "
                                       "offsets only after the files are durable; --show: what it holds")
    p.add_argument("--root", default=os.environ.get("KESTREL_ARCHIVE", "artifacts/archive"),
                   help="a folder or an fsspec URL (default KESTREL_ARCHIVE or artifacts/archive)")
    p.add_argument("--group", default="kestrel-archive", help="consumer group (its offsets are the archive's)")
    p.add_argument("--flush-rows", type=int, default=50_000)
    p.add_argument("--flush-s", type=float, default=10.0, help="flush at least this often")
    p.add_argument("--idle-exit-s", type=float, default=0.0, help="stop after this long with nothing new (0: never)")
    p.add_argument("--show", action="store_true", help="count the archived records (duplicates removed)")
    p.set_defaults(func=cmd_archive)

    from kestrel.streams.cli.demo import add_demo_args

    p = sub.add_parser("demo", help="start broker, Redis, a worker and the simulator; stream and report")
    add_demo_args(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
