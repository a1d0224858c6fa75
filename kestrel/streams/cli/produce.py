"""``kestrel produce``: stream simulated events, or replay a CSV, at a given rate."""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Iterator

from kestrel.feature_store.keys import KeyedHasher
from kestrel.feature_store.topics import ensure_topics
from kestrel.offline.simulator import SimConfig, SimRecord, Simulator
from kestrel.streams.config import Settings
from kestrel.streams.ingest.producer import EventProducer, partition_key
from kestrel.streams.ingest.replay import csv_records, parse_mapping


def add_produce_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--count", type=int, default=10_000, help="events to send (0: no limit)")
    p.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0: no limit)")
    p.add_argument("--rate", type=float, default=1000.0, help="events per second (0: as fast as possible)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--label-delay", type=float, default=3600.0, help="simulated seconds before labels arrive")
    p.add_argument("--invalid-share", type=float, default=0.0, help="share of deliberately malformed events")
    p.add_argument("--csv", help="replay this CSV (plain or .gz) instead of simulating")
    p.add_argument("--type", choices=["transaction", "interaction", "label"], default="transaction",
                   help="event type of the CSV rows")
    p.add_argument("--map", action="append", metavar="FIELD=COLUMN", help="CSV column mapping, repeatable")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="constant for a field the CSV lacks, e.g. currency=EUR; repeatable")
    h = p.add_argument_group("payment history to a file (for `kestrel train|eval fraud`), no broker needed")
    h.add_argument("--history-csv", metavar="PATH", help="write simulated payments with ground truth (.gz ok)")
    h.add_argument("--days", type=float, default=59.0,
                   help="59 (the default) fits `kestrel eval fraud`'s default windows (7 train, 7 delay, 7 test) "
                        "after the 37 days the features need to warm up")
    h.add_argument("--payments-per-day", type=float, default=5000.0)
    h.add_argument("--generator", choices=["kestrel", "independent", "textbook"], default="kestrel",
                   help="kestrel: the simulator the features were designed with; independent: "
                        "kestrel.offline.generators.independent, fraud patterns designed without Kestrel's features; "
                        "textbook: kestrel.offline.generators.textbook, the textbook simulator's design")
    h.add_argument("--emerging-after-days", type=float, default=None,
                   help="from this day on fraudsters add a pattern absent before (account takeover); "
                        "--generator kestrel only")
    h.add_argument("--hard-negatives", action="store_true",
                   help="genuine customers also change phones, travel and make big purchases now and then, "
                        "so no single input marks fraud (a harder, more realistic history); --generator kestrel only")


def simulated(args: argparse.Namespace, max_event_bytes: int) -> Iterator[SimRecord]:
    config = SimConfig(seed=args.seed, label_delay_s=args.label_delay, invalid_share=args.invalid_share,
                       max_event_bytes=max_event_bytes)
    return Simulator(config).records()


def paced(records: Iterator[SimRecord], rate: float, count: int, duration: float) -> Iterator[SimRecord]:
    """At most ``count`` records, at ``rate`` per second, for at most ``duration`` seconds."""
    source = itertools.islice(records, count) if count else records
    start = time.monotonic()
    for n, rec in enumerate(source):
        now = time.monotonic()
        if duration and now - start >= duration:
            return
        if rate:
            ahead = start + n / rate - now
            if ahead > 0:
                time.sleep(ahead)
        yield rec


def send(producer: EventProducer, rec: SimRecord) -> None:
    """Send a record's own bytes (no re-serialisation), keyed by the hashed entity when it is valid."""
    key = partition_key(rec.event, producer.hasher) if rec.event is not None else rec.key
    producer.send_raw(rec.topic, key, rec.value, rec.event_id)


def run_produce(args: argparse.Namespace) -> int:
    if args.history_csv:
        if args.generator in ("independent", "textbook"):
            if args.emerging_after_days is not None or args.hard_negatives:
                print("--emerging-after-days and --hard-negatives are for --generator kestrel only",
                      file=sys.stderr)
                return 2
            if args.generator == "independent":
                from kestrel.offline.generators.independent import write_history as write_other
            else:
                from kestrel.offline.generators.textbook import write_history as write_other

            counts = write_other(args.history_csv, args.days, args.payments_per_day, seed=args.seed)
        else:
            from kestrel.offline.simulator import write_history

            counts = write_history(args.history_csv, args.days, args.payments_per_day, seed=args.seed,
                                   emerging_after_days=args.emerging_after_days, hard_negatives=args.hard_negatives)
        print(f"wrote {counts['payments']:,} payments ({counts['frauds']:,} frauds) over {args.days:g} days "
              f"to {args.history_csv}", file=sys.stderr)
        return 0
    settings = Settings.from_env()
    ensure_topics(settings.broker, settings.partitions)
    producer = EventProducer(settings.broker, settings.hash_key)
    if args.csv:
        source = csv_records(args.csv, args.type, parse_mapping(args.map), KeyedHasher(settings.hash_key.encode()),
                             constants=parse_mapping(args.set))
    else:
        source = simulated(args, settings.max_event_bytes)
    sent = invalid = 0
    started = last = time.monotonic()
    for rec in paced(source, args.rate, args.count, args.duration):
        send(producer, rec)
        sent += 1
        invalid += not rec.valid
        if time.monotonic() - last >= 1.0:
            last = time.monotonic()
            print(f"\rsent {sent:,} ({sent / (last - started):,.0f}/s), invalid {invalid:,}", end="", file=sys.stderr)
    left = producer.flush()
    elapsed = time.monotonic() - started
    print(f"\rsent {sent:,} events in {elapsed:.1f}s ({sent / max(elapsed, 1e-9):,.0f}/s); "
          f"{invalid:,} invalid on purpose or in the CSV; undelivered {left}; errors {len(producer.errors)}",
          file=sys.stderr)
    return 1 if left or producer.errors else 0
