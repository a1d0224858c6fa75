"""Instructions the processing stage executes per payment, counted by callgrind: a cost that does not move
with this machine's 2x day-to-day swings (or with what else runs), for A/B of a change to the hot path.

    .venv/bin/python bench/processor_instructions.py [--events 1000] [--warm 2000] [--json]

Runs itself under ``valgrind --tool=callgrind`` with instrumentation off,
feeds ``--warm`` simulated payments through ``Processor.process`` as
``bench/processor_cost.py`` does (start-up, first batches and the heap
settling are not counted), switches instrumentation on for the next
``--events`` and off again. Repeated runs agree within 0.1%. What it cannot
see: Redis's side, and time that is memory-bound rather than instructions
(copies of large buffers), which ``bench/processor_cost.py`` times.
Compare two builds by running it in each checkout, e.g. a ``git worktree``
with ``PYTHONPATH`` pointing at it.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile

INSIDE = "KESTREL_UNDER_CALLGRIND"


def _toggle(on: bool) -> None:
    subprocess.run(["callgrind_control", "-i", "on" if on else "off", str(os.getpid())], check=True,
                   stdout=subprocess.DEVNULL)


async def _measured(n: int, warm: int) -> None:
    import redis
    import redis.asyncio as aioredis

    from kestrel.feature_store import topics
    from kestrel.feature_store.erase import delete_matching
    from kestrel.offline.simulator import SimConfig, Simulator
    from kestrel.streams.config import Settings
    from kestrel.streams.metrics import Metrics
    from kestrel.streams.records import RawRecord
    from kestrel.streams.worker.heap import settle_heap
    from kestrel.streams.worker.processing import Processor

    settings = Settings.from_env().with_(redis_prefix=f"bench-instr-{secrets.token_hex(4)}")
    proc = Processor(settings, aioredis.Redis.from_url(settings.redis_url), Metrics())
    sims = itertools.islice((r for r in Simulator(SimConfig(invalid_share=0.0)).records() if r.kind == "transaction"),
                            warm + n)
    records = [RawRecord(topics.TRANSACTIONS, 0, i, r.key or b"", r.value, {}, None) for i, r in enumerate(sims)]
    await proc.warm_up()
    try:
        for i in range(0, warm, 500):
            await proc.mark_delivered(await proc.process(topics.TRANSACTIONS, records[i:min(i + 500, warm)]))
        settle_heap()
        _toggle(True)
        for i in range(warm, warm + n, 500):
            await proc.mark_delivered(await proc.process(topics.TRANSACTIONS, records[i:min(i + 500, warm + n)]))
        _toggle(False)
    finally:
        delete_matching(redis.Redis.from_url(settings.redis_url), f"{settings.redis_prefix}:*")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--warm", type=int, default=2000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.environ.get(INSIDE):
        asyncio.run(_measured(args.events, args.warm))
        return 0
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        print("valgrind (callgrind) is not installed", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(["valgrind", "--tool=callgrind", "--instr-atstart=no",
                              f"--callgrind-out-file={tmp}/callgrind.out", sys.executable, __file__,
                              "--events", str(args.events), "--warm", str(args.warm)],
                             env={**os.environ, INSIDE: "1"}, capture_output=True, text=True)
    found = re.search(r"Collected : ([\d,]+)", out.stderr)
    if out.returncode != 0 or not found:
        print(out.stderr[-2000:], file=sys.stderr)
        return 1
    per = int(found.group(1).replace(",", "")) / args.events
    summary = {"events": args.events, "instructions_per_payment": round(per)}
    print(json.dumps(summary) if args.json else f"{per:,.0f} instructions per payment ({args.events:,} payments)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
