"""Can the archiver keep up? Records per second from a backlog on the embedded broker to durable Parquet.

    .venv/bin/python bench/archive_throughput.py [--records 50000] [--json]

Produces a backlog of decision-sized documents (the largest records the
worker writes: ~1.5 KB with their feature vector) to ``decisions.fraud``,
then runs :class:`~kestrel.offline.archive.Archiver` over it until idle and
reports rows per second and the archiver's CPU per row (its process time).
Compare with the worker's output rate (``kestrel bench e2e``: a few
thousand decisions per second on this machine).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import orjson
from confluent_kafka import Producer

from kestrel.feature_store import topics
from kestrel.offline.archive import Archiver, read_archive
from kestrel.streams.services import EmbeddedBroker


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    features = {f"feature_{i}": i * 0.5 for i in range(45)}
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as root:
        topics.ensure_topics(broker.bootstrap, 4)
        producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 20})
        for i in range(args.records):
            doc = {"type": "fraud_decision", "event_id": f"e{i}", "event_time": "2026-12-03T10:00:00Z",
                   "score": 0.01, "action": "allow", "reasons": [], "features": features}
            producer.produce(topics.FRAUD_DECISIONS, key=f"c{i % 997}".encode(), value=orjson.dumps(doc))
            if i % 1000 == 0:
                producer.poll(0)
        producer.flush(60)
        print(f"backlog of {args.records:,} records produced", file=sys.stderr)
        cpu0 = time.process_time()
        result = Archiver(broker.bootstrap, root, None, topics=[topics.FRAUD_DECISIONS], idle_exit_s=2.0,
                          progress=lambda m: print(f"\r{m}", end="", file=sys.stderr)).run()
        cpu = time.process_time() - cpu0
        print(file=sys.stderr)
        result["cpu_us_per_row"] = round(1e6 * cpu / max(result["archived"], 1), 1)
        result["read_back_rows"] = read_archive(root).num_rows
    print(json.dumps(result) if args.json else "\n".join(f"{k:>18}  {v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
