"""``kestrel worker --processes N``: N worker processes of one consumer group on one host, kept at N.

Each child is a plain ``kestrel worker`` (same environment, so the same
``KESTREL_APP_ID`` and group; web ports ``web_port``, ``web_port + 1``, ...).
The parent only supervises: SIGTERM or SIGINT is forwarded to every child and
the children are waited for (each finishes its batch in flight and commits);
a child that dies without being asked to is started again after a short
backoff, so that the group keeps N members. The partitions of a dead child
move to the others after the session timeout and come back at its restart
(Kafka's rebalance; its uncommitted events are consumed again and recognised
by their delivery marks).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

log = logging.getLogger("kestrel.supervisor")

BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0  # a child that ran this long before dying restarts after the first backoff again
STOP_TIMEOUT_S = 30.0  # after the forwarded signal, a child still running after this is killed


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    """In the child before exec: SIGTERM when the supervisor dies (even by SIGKILL), on Linux."""

    def setup() -> None:
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # not Linux: children outlive a killed supervisor
            return
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return setup


@dataclass
class Slot:
    """One of the N places in the group: its port, its current process and its restart history."""

    index: int
    web_port: int
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    failures: int = 0  # consecutive quick deaths, for the backoff
    restart_at: float | None = None


@dataclass
class Supervisor:
    processes: int
    web_port: int
    worker_args: Sequence[str] = ()
    env: dict[str, str] | None = None
    out: object = field(default_factory=lambda: sys.stdout)
    slots: list[Slot] = field(init=False)

    def __post_init__(self) -> None:
        if self.processes < 1:
            raise ValueError("--processes must be at least 1")
        self.slots = [Slot(i, self.web_port + i) for i in range(self.processes)]
        self._stop = threading.Event()
        self._signal: int = signal.SIGTERM

    def command(self, slot: Slot) -> list[str]:
        return [sys.executable, "-m", "kestrel", "worker", "--web-port", str(slot.web_port), *self.worker_args]

    def _print(self, line: str) -> None:
        print(line, file=self.out, flush=True)  # type: ignore[call-overload]

    def _start(self, slot: Slot) -> None:
        env = {**(self.env if self.env is not None else os.environ), "PYTHONUNBUFFERED": "1"}
        # A session of its own: a Ctrl-C on the terminal reaches the supervisor only, which forwards it once.
        slot.proc = subprocess.Popen(self.command(slot), env=env, stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=_die_with_parent(os.getpid()))
        slot.started_at = time.monotonic()
        slot.restart_at = None
        what = f"restart {slot.restarts}" if slot.restarts else "started"
        self._print(f"kestrel worker {slot.index}: pid {slot.proc.pid}, web port {slot.web_port} ({what})")

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        self._signal = signum
        self._stop.set()

    def _check(self, slot: Slot, now: float) -> None:
        """Notice a child that died, and start it again once its backoff has passed."""
        if slot.proc is not None and slot.proc.poll() is not None:
            code = slot.proc.returncode
            lived = now - slot.started_at
            slot.failures = 1 if lived >= STABLE_AFTER_S else slot.failures + 1
            delay = min(BACKOFF_START_S * 2 ** (slot.failures - 1), BACKOFF_MAX_S)
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            log.warning("worker %d (pid %d, web port %d) died (%s) after %.1fs; restarting in %.1fs",
                        slot.index, slot.proc.pid, slot.web_port, how, lived, delay)
            slot.proc = None
            slot.restart_at = now + delay
        if slot.proc is None and slot.restart_at is not None and now >= slot.restart_at:
            slot.restarts += 1
            self._start(slot)

    def run(self, install_signals: bool = True) -> int:
        """Start the N children and keep them running until SIGTERM/SIGINT; the exit code of the stop."""
        if install_signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, lambda s, _frame: self.request_stop(s))
        self._print(f"kestrel worker: {self.processes} processes of one consumer group, "
                    f"web ports {self.web_port}-{self.web_port + self.processes - 1}; supervisor pid {os.getpid()}")
        try:
            for slot in self.slots:
                self._start(slot)
            while not self._stop.wait(0.2):
                now = time.monotonic()
                for slot in self.slots:
                    self._check(slot, now)
        finally:
            code = self._stop_all()
        return code

    def _stop_all(self) -> int:
        running = [s.proc for s in self.slots if s.proc is not None and s.proc.poll() is None]
        name = signal.Signals(self._signal).name
        self._print(f"kestrel worker: {name} to {len(running)} processes "
                    f"({', '.join(str(p.pid) for p in running)}); waiting for them")
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(self._signal)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        worst = 0
        for proc in running:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                log.warning("worker pid %d still running %.0fs after %s: killing it", proc.pid, STOP_TIMEOUT_S, name)
                proc.kill()
                proc.wait()
                worst = 1
            if proc.returncode not in (0, -signal.SIGTERM, -signal.SIGINT):
                worst = worst or 1
        self._print("kestrel worker: all processes stopped")
        return worst


def run_supervised(processes: int, web_port: int, worker_args: Sequence[str]) -> int:
    return Supervisor(processes, web_port, worker_args).run()
