"""Experiment definitions in Redis, every change appended to an audit stream in the same transaction.

Why Redis: every worker already reads it on the hot path, so a ramp or a
stop reaches the routers without another service; the definitions are a
few kilobytes. Each change is one ``MULTI``/``EXEC`` under ``WATCH`` of the
revision counter: the definition, the counter and the audit entry change
together or not at all, and two operators changing experiments at the same
moment cannot overwrite each other (the loser retries on the new state).
Production Redis must persist (AOF) for the audit log to be durable; the
embedded dev Redis does not.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson
import redis

from kestrel.feature_store.keys import KeySpace
from kestrel.feature_store.schemas import iso_of
from kestrel.models.experiments import Experiment


class ExperimentError(RuntimeError):
    """A change that cannot be made as asked (unknown key, already exists, invalid transition)."""


class ExperimentStore:
    def __init__(self, client: redis.Redis, keys: KeySpace) -> None:
        self.client = client
        self.key_space = keys
        self.keys = keys.experiments

    def get(self, key: str) -> Experiment:
        raw = self.client.hget(self.keys.definitions, key)
        if raw is None:
            raise ExperimentError(f"no experiment {key!r}")
        return Experiment.model_validate_json(raw)

    def list(self) -> list[Experiment]:
        return sorted((Experiment.model_validate_json(v) for v in self.client.hvals(self.keys.definitions)),
                      key=lambda e: e.key)

    def revision(self) -> int:
        return int(self.client.get(self.keys.revision) or 0)

    def history(self, key: str | None = None) -> list[dict[str, Any]]:
        """The audit log, oldest first (of one experiment, or all)."""
        entries = []
        for entry_id, fields in self.client.xrange(self.keys.audit):
            doc = orjson.loads(fields[b"doc"])
            if key is None or doc["key"] == key:
                entries.append({"id": entry_id.decode(), **doc})
        return entries

    # -- changes ---------------------------------------------------------------
    def create(self, experiment: Experiment, who: str, why: str = "") -> Experiment:
        def change(current: Experiment | None) -> Experiment:
            if current is not None:
                raise ExperimentError(f"experiment {experiment.key!r} exists; change it with ramp/stop")
            return experiment

        return self._change(experiment.key, "create", who, why, change)

    def ramp(self, key: str, coverage: float, who: str, why: str = "") -> Experiment:
        """Change coverage. Units already enrolled keep their variant (bucket ranges grow from fixed starts)."""
        return self._change(key, "ramp", who, why, lambda e: _require(e, key).model_copy(update={"coverage": coverage}),
                            validate=True)

    def start(self, key: str, who: str, why: str = "") -> Experiment:
        return self._change(key, "start", who, why, lambda e: _transition(e, key, "draft", "running"))

    def stop(self, key: str, who: str, why: str = "") -> Experiment:
        """Stop: every unit goes back to the default (control) behaviour. Guardrail stops use this too."""
        return self._change(key, "stop", who, why, lambda e: _transition(e, key, "running", "stopped"))

    def promote(self, key: str, variant: str, who: str, why: str = "") -> Experiment:
        """Stop and record the winning variant in the audit log (rolling it out is the variant's own change:
        a registry alias move, a policy setting)."""
        def change(current: Experiment | None) -> Experiment:
            exp = _require(current, key)
            if variant not in {v.key for v in exp.variants}:
                raise ExperimentError(f"{key!r} has no variant {variant!r}")
            return exp.model_copy(update={"status": "stopped"})

        return self._change(key, "promote", who, why, change, extra={"winner": variant})

    def _change(self, key: str, action: str, who: str, why: str,
                change: Callable[[Experiment | None], Experiment], validate: bool = False,
                extra: dict[str, Any] | None = None) -> Experiment:
        with self.client.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(self.keys.revision)
                    raw = pipe.hget(self.keys.definitions, key)
                    current = Experiment.model_validate_json(raw) if raw else None
                    updated = change(current)
                    if validate:  # model_copy skips validation: check the changed definition
                        updated = Experiment.model_validate(updated.model_dump())
                    rev = int(pipe.get(self.keys.revision) or 0) + 1
                    doc = {"key": key, "action": action, "who": who, "why": why, "at": iso_of(time.time()),
                           "revision": rev, "before": current.model_dump() if current else None,
                           "after": updated.model_dump(), **(extra or {})}
                    pipe.multi()
                    pipe.hset(self.keys.definitions, key, updated.model_dump_json())
                    pipe.set(self.keys.revision, rev)
                    pipe.xadd(self.keys.audit, {"doc": orjson.dumps(doc)})
                    pipe.execute()
                    return updated
                except redis.WatchError:
                    continue


def _require(current: Experiment | None, key: str) -> Experiment:
    if current is None:
        raise ExperimentError(f"no experiment {key!r}")
    return current


def _transition(current: Experiment | None, key: str, source: str, target: str) -> Experiment:
    exp = _require(current, key)
    if exp.status != source:
        raise ExperimentError(f"{key!r} is {exp.status}; only a {source} experiment can become {target}")
    return exp.model_copy(update={"status": target})
