"""``kestrel models list|show|promote|rollback|alias|history``: the registry from the command line.

Argument parsing and printing only; the registry is :mod:`kestrel.models.registry`,
the gate :mod:`kestrel.models.gate`. Every command takes ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import UTC, datetime
from typing import Any

DEFAULT_REGISTRY = "artifacts/registry"


def registry_root(args: argparse.Namespace) -> str:
    return args.registry or os.environ.get("KESTREL_REGISTRY") or DEFAULT_REGISTRY


def _registry(args: argparse.Namespace) -> Any:
    from kestrel.models.registry import Registry

    return Registry(registry_root(args), args.kind)


def _when(epoch: float | None) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M") if epoch else "-"


def _print(args: argparse.Namespace, doc: Any, text: str) -> None:
    print(json.dumps(doc) if args.json else text)


def _fail(args: argparse.Namespace, message: str, code: int = 1) -> int:
    """Say why the command did nothing (as ``{"error"}`` with ``--json``) and return its exit code."""
    _print(args, {"error": message}, message)
    return code


def announce_move(args: argparse.Namespace, kind: str, alias: str, version: str | None, seq: int) -> bool | None:
    """Tell the workers (``models.updates`` on ``--broker`` / KESTREL_BROKER); None when no broker is named."""
    broker = getattr(args, "broker", None) or os.environ.get("KESTREL_BROKER")
    if not broker:
        return None
    from kestrel.streams.worker.model_updates import announce

    return announce(broker, kind, alias, version, str(os.path.abspath(registry_root(args))), seq)


def cmd_list(args: argparse.Namespace) -> int:
    reg = _registry(args)
    aliases = reg.aliases()
    by_version: dict[str, list[str]] = {}
    for alias, version in sorted(aliases.items()):
        by_version.setdefault(version, []).append(alias)
    records = reg.versions()
    doc = {"kind": reg.kind, "root": str(reg.root), "aliases": aliases,
           "versions": [{**r.to_json(), "aliases": by_version.get(r.version, [])} for r in records]}
    primary = "average_precision" if reg.kind == "fraud" else "recall_at_20"
    lines = [f"{'version':<36} {'aliases':<20} {primary:>18}  {'trained up to':<17} created"]
    for r in records:
        lines.append(f"{r.version:<36} {','.join(by_version.get(r.version, [])) or '-':<20} "
                     f"{r.metrics.get(primary, float('nan')):>18.4f}  {_when(r.data_range.get('last_event')):<17} "
                     f"{r.created_at}")
    _print(args, doc, "\n".join(lines) if records else f"no {reg.kind} versions in {reg.root}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from kestrel.models.registry import RegistryError

    reg = _registry(args)
    try:
        record = reg.resolve(args.name)
    except RegistryError as exc:
        return _fail(args, str(exc))
    doc = {**record.to_json(), "aliases": sorted(a for a, v in reg.aliases().items() if v == record.version)}
    _print(args, doc, json.dumps(doc, indent=1))
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from kestrel.models.gate import GatePolicy
    from kestrel.models.registry import RegistryError, promote

    reg = _registry(args)
    overrides = {k: v for k, v in (("min_gain_abs", args.min_gain_abs), ("min_gain_rel", args.min_gain_rel))
                 if v is not None}
    try:
        result = promote(reg, args.version, alias=args.alias, policy=GatePolicy.for_kind(reg.kind, **overrides),
                         force=args.force, why=args.why or "")
    except RegistryError as exc:
        return _fail(args, str(exc))
    if result["moved"]:
        result["announced"] = announce_move(args, reg.kind, args.alias, result["to"], result["seq"])
    verdict = {"promote": "gate passed", "force": "FORCED past the gate",
               "refused": "refused by the gate"}[result["action"]]
    text = [f"{args.alias}: {result['from']} -> {result['to']} ({verdict})"]
    text += [f"  - {reason}" for reason in result["reasons"]]
    for check in result["gate"]["checks"]:
        text.append(f"  {check['check']:<20} candidate {check.get('candidate')}  champion {check.get('champion')}"
                    f"  {'ok' if check['passed'] else 'FAIL'}")
    _print(args, result, "\n".join(text))
    return 0 if result["moved"] else 3


def cmd_rollback(args: argparse.Namespace) -> int:
    from kestrel.models.registry import RegistryError, rollback

    reg = _registry(args)
    try:
        move = rollback(reg, args.alias, why=args.why or "")
    except RegistryError as exc:
        return _fail(args, str(exc))
    announced = announce_move(args, reg.kind, args.alias, move.to_version, move.seq)
    _print(args, {**move.to_json(), "announced": announced},
           f"{args.alias}: {move.from_version} -> {move.to_version} (rollback)")
    return 0


def cmd_alias(args: argparse.Namespace) -> int:
    from kestrel.models.registry import RegistryError

    reg = _registry(args)
    if args.alias == "champion" and not args.force:
        return _fail(args, "champion moves through the gate: use `kestrel models promote` (or --force, audited)", 2)
    if not args.remove and not args.version:
        return _fail(args, "give a version, or --remove", 2)
    try:
        move = reg.move(args.alias, None if args.remove else args.version, why=args.why or "",
                        action="force" if args.force else "alias")
    except RegistryError as exc:
        return _fail(args, str(exc))
    announced = announce_move(args, reg.kind, args.alias, move.to_version, move.seq)
    _print(args, {**move.to_json(), "announced": announced}, f"{args.alias}: {move.from_version} -> {move.to_version}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """The served version against its shadow on the same live payments (decision log + labels, from the broker)."""
    from kestrel.feature_store import topics
    from kestrel.models.registry import RegistryError
    from kestrel.offline.fraud_logs import read_topic
    from kestrel.offline.shadow_compare import compare_shadow
    from kestrel.streams.config import Settings

    reg = _registry(args)
    try:
        a, b = (reg.resolve(name).version for name in (args.a, args.b))
    except RegistryError as exc:
        return _fail(args, str(exc))
    settings = Settings.from_env()
    broker = args.broker or settings.broker
    decisions = read_topic(broker, topics.FRAUD_DECISIONS, settings.partitions)
    examples = [e for e in read_topic(broker, topics.TRAINING_EXAMPLES, settings.partitions)
                if e.get("type") == "training_example"]
    report = compare_shadow(decisions, examples, a, b)
    lines = [f"{args.a} = {a}, {args.b} = {b}: {report['events']:,} payments scored by both, "
             f"{report['labelled']:,} labelled"]
    if report["events"]:
        lines.append(f"actions agree on {report['action_agreement']:.1%}; score rank correlation "
                     f"{report['score_rank_correlation']}")
        for name, m in report["versions"].items():
            lines.append(f"  {name}: " + ", ".join(f"{k} {v}" for k, v in m.items()))
    else:
        lines.append(report["note"])
    _print(args, report, "\n".join(lines))
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    moves = _registry(args).history()
    lines = [f"{m.seq:>4} {m.at} {m.who:<12} {m.action:<9} {m.alias:<12} {m.from_version} -> {m.to_version}  {m.why}"
             for m in moves]
    _print(args, [m.to_json() for m in moves], "\n".join(lines) or "no alias moves yet")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    models = sub.add_parser("models", help="the model registry: versions, aliases (champion, shadow, ...), "
                                           "the evaluation gate, the audit log").add_subparsers(dest="what",
                                                                                                required=True)

    def verb(name: str, help_: str, func: Any) -> argparse.ArgumentParser:
        p = models.add_parser(name, help=help_)
        p.add_argument("--kind", choices=["fraud", "recs"], default="fraud")
        p.add_argument("--registry", default=None,
                       help=f"registry root (default KESTREL_REGISTRY or {DEFAULT_REGISTRY})")
        p.add_argument("--json", action="store_true", help="one line of JSON")
        p.add_argument("--broker", default=None,
                       help="announce alias moves to the workers here (default KESTREL_BROKER; none: not announced)")
        p.set_defaults(func=func)
        return p

    verb("list", "registered versions and the aliases that point at them", cmd_list)
    verb("show", "one version's record (metrics, data range, code version, checksum)", cmd_show) \
        .add_argument("name", help="a version or an alias")
    p = verb("promote", "move an alias (default champion) to a version if the gate passes; recorded either way",
             cmd_promote)
    p.add_argument("version")
    p.add_argument("--alias", default="champion")
    p.add_argument("--force", action="store_true", help="move even if the gate refuses (audited as forced)")
    p.add_argument("--why", default=None, help="the reason, for the audit log")
    p.add_argument("--min-gain-abs", type=float, default=None, help="primary metric margin, absolute")
    p.add_argument("--min-gain-rel", type=float, default=None, help="primary metric margin, relative (0.01 = 1%%)")
    p = verb("rollback", "point an alias back at the version it held before", cmd_rollback)
    p.add_argument("--alias", default="champion")
    p.add_argument("--why", default=None)
    p = verb("alias", "point any alias but champion at a version (shadow, challenger, ...)", cmd_alias)
    p.add_argument("alias")
    p.add_argument("version", nargs="?")
    p.add_argument("--remove", action="store_true")
    p.add_argument("--force", action="store_true", help="allowed for champion too (audited as forced)")
    p.add_argument("--why", default=None)
    p = verb("compare", "two versions on the same live payments: the served one and its shadow (agreement, "
                        "score distributions, and AP and alert precision once labels arrive)", cmd_compare)
    p.add_argument("a", help="a version or alias (e.g. champion)")
    p.add_argument("b", help="a version or alias (e.g. shadow)")
    verb("history", "the audit log of alias moves (who, when, from, to, why, the gate's numbers)", cmd_history)
