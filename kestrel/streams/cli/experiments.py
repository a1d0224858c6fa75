"""``kestrel experiments create|list|show|start|ramp|stop|promote|history|bucket|simulate``.

Argument parsing and printing only: definitions and routing are in
:mod:`kestrel.models.experiments`, the store in :mod:`kestrel.streams.experiments.store`,
the statistics in :mod:`kestrel.models.experiment_stats`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _store() -> Any:
    import redis

    from kestrel.feature_store.keys import KeySpace
    from kestrel.streams.config import Settings
    from kestrel.streams.experiments.store import ExperimentStore

    settings = Settings.from_env()
    return ExperimentStore(redis.Redis.from_url(settings.redis_url), KeySpace(settings.redis_prefix))


def _out(args: argparse.Namespace, doc: Any) -> None:
    print(json.dumps(doc) if args.json else json.dumps(doc, indent=1))


def _fail(args: argparse.Namespace, message: str, code: int = 1) -> int:
    _out(args, {"error": message})
    return code


def cmd_change(args: argparse.Namespace) -> int:
    """create / start / ramp / stop / promote: one audited change."""
    import pydantic

    from kestrel.models.experiments import Experiment
    from kestrel.models.registry import current_user
    from kestrel.streams.experiments.store import ExperimentError

    store, who, why = _store(), current_user(), args.why or ""
    try:
        if args.what == "create":
            text = Path(args.file).read_text() if args.file != "-" else sys.stdin.read()
            exp = store.create(Experiment.model_validate_json(text), who, why)
        elif args.what == "ramp":
            exp = store.ramp(args.key, args.coverage, who, why)
        elif args.what == "promote":
            exp = store.promote(args.key, args.variant, who, why)
        else:
            exp = getattr(store, args.what)(args.key, who, why)
    except pydantic.ValidationError as exc:
        _out(args, {"error": "invalid experiment", "fields": [
            {"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()]})
        return 2
    except ExperimentError as exc:
        return _fail(args, str(exc))
    _out(args, exp.model_dump())
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    exps = _store().list()
    if args.json:
        print(json.dumps([e.model_dump() for e in exps]))
    else:
        for e in exps:
            print(f"{e.key:<28} {e.status:<8} {e.target:<6} coverage {e.coverage:<5} "
                  f"variants {','.join(v.key for v in e.variants)}  ({e.primary_metric})")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from kestrel.streams.experiments.store import ExperimentError

    store = _store()
    try:
        doc = {**store.get(args.key).model_dump(), "history": store.history(args.key)}
    except ExperimentError as exc:
        return _fail(args, str(exc))
    _out(args, doc)
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    """Per-variant outcomes, SRM, the always-valid comparison with control, and a verdict."""
    from kestrel.streams.experiments.results import experiment_results
    from kestrel.streams.experiments.store import ExperimentError

    store = _store()
    try:
        report = experiment_results(store.client, store.key_space, store.get(args.key))
    except ExperimentError as exc:
        return _fail(args, str(exc))
    _out(args, report)
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    _out(args, _store().history(args.key))
    return 0


def cmd_bucket(args: argparse.Namespace) -> int:
    """The unit's bucket in [0, 1) for an experiment seed (GrowthBook's hash), for scripts."""
    from kestrel.models.assignment import bucket

    value = bucket(args.seed, args.id, args.hash_version)
    if value is None:
        print(f"unknown hash version {args.hash_version}", file=sys.stderr)
        return 2
    print(value)
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    """Seeded A/A, A/B and broken-split experiments through the statistics, peeking after every look."""
    from kestrel.models.experiment_stats import simulate

    result = simulate(runs=args.runs, units=args.units, look_every=args.look_every, base_rate=args.base_rate,
                      effect=args.effect, alpha=args.alpha, seed=args.seed)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>36}  {value}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    experiments = sub.add_parser("experiments", help="A/B experiments: definitions with an audit log (Redis), "
                                                     "GrowthBook-compatible assignment, statistics") \
        .add_subparsers(dest="what", required=True)

    def verb(name: str, help_: str, func: Any) -> argparse.ArgumentParser:
        p = experiments.add_parser(name, help=help_)
        p.add_argument("--json", action="store_true", help="one line of JSON")
        p.set_defaults(func=func)
        return p

    p = verb("create", "add an experiment from a JSON definition (FILE, or - for stdin)", cmd_change)
    p.add_argument("file")
    p.add_argument("--why", default=None)
    for name, help_ in (("start", "start a draft experiment"),
                        ("stop", "stop: every unit back to the default behaviour")):
        p = verb(name, help_, cmd_change)
        p.add_argument("key")
        p.add_argument("--why", default=None)
    p = verb("ramp", "change coverage (enrolled units keep their variant)", cmd_change)
    p.add_argument("key")
    p.add_argument("--coverage", type=float, required=True)
    p.add_argument("--why", default=None)
    p = verb("promote", "stop and record the winning variant", cmd_change)
    p.add_argument("key")
    p.add_argument("--variant", required=True)
    p.add_argument("--why", default=None)
    verb("list", "every experiment and its status", cmd_list)
    verb("show", "one experiment with its audit log", cmd_show).add_argument("key")
    verb("history", "the audit log (of one experiment, or all)", cmd_history).add_argument("key", nargs="?")
    verb("results", "per-variant outcomes against labels, SRM, always-valid comparison with control, verdict",
         cmd_results).add_argument("key")

    p = experiments.add_parser("bucket", help="print a unit's bucket in [0, 1) for an experiment seed")
    p.add_argument("--seed", required=True)
    p.add_argument("--id", required=True, help="the unit's hash attribute value (user, card, customer)")
    p.add_argument("--hash-version", type=int, default=2)
    p.set_defaults(func=cmd_bucket)
    p = verb("simulate", "A/A false positives under peeking (always-valid vs a naive z-test), A/B power, SRM "
                         "detection", cmd_simulate)
    p.add_argument("--runs", type=int, default=1000)
    p.add_argument("--units", type=int, default=20_000)
    p.add_argument("--look-every", type=int, default=1000)
    p.add_argument("--base-rate", type=float, default=0.10)
    p.add_argument("--effect", type=float, default=0.02, help="B's absolute lift in the A/B runs")
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
