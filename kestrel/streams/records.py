"""The records a worker's stages hand each other: what came from the broker and what goes back.

Their own module so that every stage (processing, alert desk, request
agents, runtime) can name them without importing one another.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class RawRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes] = field(default_factory=dict)
    timestamp_ms: float | None = None


@dataclass(frozen=True, slots=True)
class Output:
    topic: str
    key: bytes
    value: bytes
    mark: str  # set once the broker acknowledged it; equal to ``log_key``: the log is its own mark (delivery.py)
    log_key: str | None = None  # where ``value`` is also logged (NX): the ledger's outbox for it, when set
