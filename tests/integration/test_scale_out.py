"""Scale out: several worker processes of one consumer group, one SIGKILLed mid-stream, another added later.

Every payment is decided exactly once on the output topic, and every card's
counters count each of its payments once, whichever worker (or workers, across
the rebalances) processed it.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from kestrel.feature_store import topics
from kestrel.offline.simulator import SimConfig, SimRecord, Simulator
from kestrel.streams.cli.demo import _wait_ready, erase_prefix
from kestrel.streams.cli.produce import send
from kestrel.streams.config import Settings
from kestrel.streams.ingest.producer import EventProducer
from kestrel.streams.services import EmbeddedBroker, free_port
from tests.integration.conftest import OutputReader, WorkerHandle

pytestmark = pytest.mark.integration

PARTITIONS = 6


@pytest.fixture
def group_settings(broker: EmbeddedBroker, redis_url: str) -> Iterator[Settings]:
    """The conftest settings, on topics of six partitions, so that three and four workers all get some."""
    run = secrets.token_hex(4)
    s = Settings().with_(broker=broker.bootstrap, redis_url=redis_url, redis_prefix=f"kestrel-test-{run}",
                         app_id=f"kestrel-test-{run}", web_port=free_port(), api_token=secrets.token_urlsafe(16),
                         partitions=PARTITIONS, session_timeout_s=3.0, heartbeat_interval_s=0.5,
                         # rare commits: the partitions of the killed worker are consumed again from far back
                         commit_interval_s=5.0, batch_size=100)
    topics.ensure_topics(s.broker, PARTITIONS)
    yield s
    erase_prefix(redis_url, s.redis_prefix)


@pytest.fixture
def group_outputs(group_settings: Settings) -> Iterator[OutputReader]:
    reader = OutputReader(group_settings.broker, PARTITIONS)
    yield reader
    reader.close()


def _get(url: str) -> tuple[int, dict | str | None]:
    try:
        with urllib.request.urlopen(url, timeout=2.0) as resp:
            body = resp.read().decode()
            return resp.status, json.loads(body) if body.startswith("{") else body
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (urllib.error.URLError, OSError):
        return 0, None


def _assignment(handle: WorkerHandle) -> set[str]:
    status, body = _get(f"{handle.url}/ready")
    return set(body["partitions"]) if status == 200 and isinstance(body, dict) else set()


def _wait_balanced(handles: list[WorkerHandle], timeout_s: float = 60.0) -> list[set[str]]:
    """Until the group's assignment is settled: every payment partition owned by exactly one live worker."""
    wanted = {f"{topics.TRANSACTIONS}:{p}" for p in range(PARTITIONS)}
    deadline = time.monotonic() + timeout_s
    while True:
        shares = [{tp for tp in _assignment(h) if tp.startswith(topics.TRANSACTIONS + ":")} for h in handles]
        owned = [tp for share in shares for tp in share]
        if sorted(owned) == sorted(wanted) and all(shares):
            return shares
        if time.monotonic() > deadline:
            raise AssertionError(f"group not balanced after {timeout_s}s: {shares}")
        time.sleep(0.3)


def _metric(handle: WorkerHandle, name: str) -> float:
    status, body = _get(f"{handle.url}/metrics")
    assert status == 200 and isinstance(body, str)
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith(name))


def _payments(n: int) -> list[SimRecord]:
    """``n`` records of the payments topic (a few malformed) from 300 cards, in event-time order.

    At 2 events per simulated second the whole stream is well under an hour of event time: inside every
    card's 30-day window, so its 30-day count is simply the running count of its payments.
    """
    sim = Simulator(SimConfig(seed=23, n_cards=300, invalid_share=0.01, label_delay_s=60))
    records = (r for r in sim.records() if r.topic == topics.TRANSACTIONS)
    out = list(itertools.islice(records, n))
    valid = [r for r in out if r.valid]
    assert valid[-1].event.epoch_s - valid[0].event.epoch_s < 20 * 24 * 3600
    return out


def _stream(producer: EventProducer, records: list[SimRecord], rate: float, outputs: OutputReader) -> None:
    """Send at ``rate`` per second, reading the outputs meanwhile."""
    started = time.monotonic()
    for i in range(0, len(records), 50):
        for rec in records[i:i + 50]:
            send(producer, rec)
        producer.flush()
        ahead = started + (i + 50) / rate - time.monotonic()
        outputs.poll(max(ahead, 0.0))


def test_group_of_three_survives_a_sigkill_and_a_new_member_exactly_once(group_settings, group_outputs, tmp_path):
    s, outputs = group_settings, group_outputs
    records = _payments(4500)
    producer = EventProducer(s.broker, s.hash_key)
    handles = [WorkerHandle(s.with_(web_port=free_port()), tmp_path / f"worker{i}.log") for i in range(4)]
    first, victim, third, late = handles
    try:
        t0 = time.monotonic()
        for h in (first, victim, third):
            h.start(wait=False)
        for h in (first, victim, third):
            _wait_ready(h.url, h.proc, timeout_s=90)
        shares = _wait_balanced([first, victim, third])
        print(f"\n3 workers ready and balanced in {time.monotonic() - t0:.1f}s: {shares}")

        _stream(producer, records[:1500], 300.0, outputs)
        assert _metric(victim, "kestrel_events_in_total") > 0, "the victim must hold payment partitions"
        victim.kill()  # SIGKILL mid-stream: no shutdown, no commit; its batch in flight is cut anywhere
        killed_at = time.monotonic()
        decided_at_kill = len(outputs.ids(topics.FRAUD_DECISIONS))
        assert 0 < decided_at_kill < len(records)

        _stream(producer, records[1500:2700], 300.0, outputs)  # the survivors take over its partitions meanwhile
        late.start(wait=False)  # a fourth member joins while payments keep coming
        _stream(producer, records[2700:3300], 300.0, outputs)
        _wait_ready(late.url, late.proc, timeout_s=90)
        joined_at = time.monotonic()
        shares = _wait_balanced([first, third, late])
        _stream(producer, records[3300:], 300.0, outputs)
        sent_at = time.monotonic()

        valid = [r for r in records if r.valid]
        invalid = {r.event_id for r in records if not r.valid}
        expected = {r.event_id for r in valid}
        outputs.wait_for(topics.FRAUD_DECISIONS, expected, timeout_s=60)
        outputs.wait_for(topics.DEADLETTER, invalid, timeout_s=30)
        drained = time.monotonic()
        outputs.poll(3.0)  # a late duplicate would arrive now
        print(f"kill after {killed_at - t0:.1f}s, {decided_at_kill} decided before it; new member ready after "
              f"{joined_at - t0:.1f}s, balanced {shares}; all sent after {sent_at - t0:.1f}s, all decided "
              f"{drained - sent_at:.1f}s later")
        assert _metric(late, "kestrel_events_in_total") > 0, "the new member must have taken partitions"

        seen = outputs.ids(topics.FRAUD_DECISIONS)
        missing = expected - set(seen)
        twice = {k: v for k, v in seen.items() if v > 1}
        redelivered = sum(_metric(h, "kestrel_redelivered_total") for h in (first, third, late))
        print(f"decisions: {len(seen)} event ids, {sum(seen.values())} records, missing {len(missing)}, "
              f"more than once {len(twice)}; redelivered (recognised, not re-sent) {redelivered:g}")
        # A loss here has so far always been Faust (faust-streaming 0.15.3) committing past records it never gave
        # the agent during a rebalance: records it fetched while flow was stopped are dropped and rewound by a
        # seek to the committed offset, which does nothing for a partition the group never committed (the
        # victim dies before its first commit); or records it skipped as of the old generation are acked.
        assert not missing, (f"lost {len(missing)} payments (never processed, yet their offsets were committed), "
                             f"e.g. {sorted(missing)[:5]}")
        assert set(seen) == expected, f"unexpected decisions {sorted(set(seen) - expected)[:5]}"
        dl = outputs.ids(topics.DEADLETTER)
        assert set(dl) == invalid and max(dl.values()) == 1, dl.most_common(3)
        # One decision per payment on the wire, rebalances of live members included (a revoked member finishes
        # and commits its batches first). The one exception is the at-least-once window of a SIGKILL: the
        # victim's batch in flight that the broker had already stored when it died but whose delivery marks
        # were not yet set in Redis (Runtime.deliver: send, broker acks, then mark_delivered). Its new owner
        # finds no mark and re-sends the outbox, the same bytes. Measured by killing a saturated worker: 0, 23
        # and 44 payments twice, contiguous, byte-identical; here (paced, the victim mostly idle) none in 10 runs.
        # So a duplicate must be byte-identical, one of the payments sent before the kill, at most one batch.
        copies: dict[str, set[bytes]] = {}
        for doc, raw in zip(outputs.docs[topics.FRAUD_DECISIONS], outputs.raw[topics.FRAUD_DECISIONS], strict=True):
            copies.setdefault(doc["event_id"], set()).add(raw)
        assert all(len(copies[k]) == 1 for k in twice), "a payment got two different decisions"
        before_kill = {r.event_id for r in records[:1500]}
        outside = set(twice) - before_kill
        assert not outside, f"duplicates outside the kill's window: {sorted(outside)[:5]}"
        assert sum(twice.values()) - len(twice) <= s.batch_size, f"{len(twice)} payments decided more than once"
        assert redelivered > 0, "the killed worker's uncommitted payments should have been consumed again"

        # Counters exact: each decision counts every earlier payment of its card once (in the order sent, which
        # is event-time order and, per card, partition order).
        decision = {d["event_id"]: d for d in outputs.docs[topics.FRAUD_DECISIONS]}
        running: Counter = Counter()
        wrong = []
        for rec in valid:
            running[rec.event.card_id] += 1
            count = decision[rec.event_id]["features"]["txn_count_30d"]
            if count != running[rec.event.card_id]:
                wrong.append((rec.event_id, rec.event.card_id, count, running[rec.event.card_id]))
        assert len(running) > 100 and max(running.values()) >= 10
        assert not wrong, f"{len(wrong)} decisions with a wrong 30-day count, e.g. {wrong[:5]}"
        for h in (first, third, late):
            assert "Traceback" not in h.log(), h.log()[-3000:]
    finally:
        for h in handles:
            h.stop()


def test_processes_flag_supervises_its_children(group_settings, tmp_path):
    """``kestrel worker --processes 2``: two children on consecutive ports, one restarted after a SIGKILL."""
    port = free_port()
    while not _port_free(port + 1):
        port = free_port()
    log_path = tmp_path / "supervisor.log"
    env = {**os.environ, **group_settings.to_env(), "PYTHONUNBUFFERED": "1"}
    with log_path.open("ab") as log:
        sup = subprocess.Popen([sys.executable, "-m", "kestrel", "worker", "--processes", "2", "--web-port",
                                str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        urls = [f"http://{group_settings.web_host}:{port + i}" for i in range(2)]
        _wait_until(lambda: all(_get(f"{u}/ready")[0] == 200 for u in urls), 90, sup, log_path)
        pids = _child_pids(log_path)
        assert len(pids) == 2, log_path.read_text()
        assert sorted(pids.values()) == [port, port + 1]
        assert all(_parent(pid) == sup.pid for pid in pids)

        victim = next(pid for pid, p in pids.items() if p == port + 1)
        os.kill(victim, signal.SIGKILL)
        _wait_until(lambda: len(_child_pids(log_path)) == 3 and _get(f"{urls[1]}/ready")[0] == 200, 90, sup,
                    log_path)
        text = log_path.read_text()
        assert re.search(rf"worker 1 \(pid {victim}, web port {port + 1}\) died \(signal 9\).*restarting in", text)
        survivor = next(pid for pid, p in pids.items() if p == port)
        assert _alive(survivor), "the other child is left alone"

        sup.send_signal(signal.SIGTERM)
        assert sup.wait(timeout=40) == 0, log_path.read_text()[-3000:]
        children = list(_child_pids(log_path))
        assert not any(_alive(pid) for pid in children), "every child stopped with the supervisor"
        assert "SIGTERM to 2 processes" in log_path.read_text()
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()
        for pid in _child_pids(log_path):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _child_pids(log_path: Path) -> dict[int, int]:
    """pid -> web port of every child the supervisor reported starting."""
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    return {int(pid): int(port) for pid, port in re.findall(r"kestrel worker \d+: pid (\d+), web port (\d+)", text)}


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait_until(check, timeout_s: float, sup: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert sup.poll() is None, f"supervisor exited {sup.returncode}: {log_path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out: {log_path.read_text()[-3000:]}"
        time.sleep(0.3)
