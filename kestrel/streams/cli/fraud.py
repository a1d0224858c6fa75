"""``kestrel train fraud`` and ``kestrel eval fraud``: argument parsing only; the work is in ``kestrel/offline/``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from kestrel.streams.cli.every import add_every_args, finite


def _add_columns(p: argparse.ArgumentParser, csv_required: bool = True) -> None:
    p.add_argument("--csv", required=csv_required, help="payment history, CSV or CSV.gz, one row per payment")
    p.add_argument("--id-col", default="event_id")
    p.add_argument("--time-col", default="timestamp", help="ISO 8601 or epoch seconds")
    p.add_argument("--entity-col", default="card_id", help="the card (or customer) whose history is profiled")
    p.add_argument("--terminal-col", default="terminal_id")
    p.add_argument("--amount-col", default="amount")
    p.add_argument("--label-col", default="is_fraud", help="1 = fraud, 0 = genuine")
    p.add_argument("--merchant-col", default=None)
    p.add_argument("--card-present-col", default=None)
    p.add_argument("--device-col", default=None)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--members", type=int, default=5, help="networks averaged in the torch model")
    p.add_argument("--seed", type=int, default=0)


def _columns(args: argparse.Namespace) -> Any:
    from kestrel.offline.fraud_dataset import Columns

    return Columns(id=args.id_col, time=args.time_col, entity=args.entity_col, terminal=args.terminal_col,
                   amount=args.amount_col, label=args.label_col, merchant=args.merchant_col,
                   card_present=args.card_present_col, device=args.device_col,
                   segment=getattr(args, "segment_col", None))


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_train(args: argparse.Namespace) -> int:
    if sum((bool(args.csv), args.from_broker, bool(args.from_archive))) != 1:
        _say("give one of --csv FILE, --from-broker, --from-archive ROOT")
        return 2
    if args.every:
        from kestrel.streams.cli.every import train_every

        return train_every(args, "fraud", lambda: _train_once(args, quiet=True))
    return _train_once(args)


def _train_once(args: argparse.Namespace, quiet: bool = False) -> Any:
    """One training run; prints its JSON line and returns 0, or (``quiet``) returns the document."""
    data = (_broker_training_set(args) if args.from_broker else _archive_training_set(args) if args.from_archive
            else _csv_training_set(args))
    if data is None:
        return None if quiet else 2
    rows, labels, epoch_s, ids, cards, source = data
    if args.registry or args.promote:
        out = _train_candidate(args, rows, labels, epoch_s, ids, cards, source)
        if quiet:
            return out
        print(json.dumps(finite(out)))
        return 0
    from kestrel.offline.fraud_train import fit_fraud_model

    model = fit_fraud_model(rows, labels, epoch_s, ids, epochs=args.epochs, members=args.members, seed=args.seed,
                            groups=cards, progress=_say)
    model.report["source"] = source
    path = model.save(Path(args.out) / model.version)
    print(json.dumps({"model_version": model.version, "path": str(path), **model.report}))
    return 0


def _train_candidate(args: argparse.Namespace, rows: Any, labels: Any, epoch_s: Any, ids: Any, cards: Any,
                     source: dict[str, Any]) -> dict[str, Any]:
    """Train with the newest rows held out, register the version, and ask the gate if ``--promote``."""
    from kestrel.models.registry import Registry, promote
    from kestrel.offline.fraud_registry import train_candidate
    from kestrel.streams.cli.models import registry_root

    registry = Registry(registry_root(args), "fraud")
    model, record = train_candidate(rows, labels, epoch_s, ids, registry, args.out,
                                    holdout_share=args.gate_share, seed=args.seed, epochs=args.epochs,
                                    members=args.members, groups=cards, progress=_say)
    out: dict[str, Any] = {"model_version": model.version, "path": record.path, "registry": str(registry.root),
                           "metrics": record.metrics, "evaluation": record.evaluation, "source": source}
    if args.promote:
        out["promotion"] = promote(registry, record.version, why=args.why or "")
        if out["promotion"]["moved"]:
            from kestrel.streams.cli.models import announce_move

            out["promotion"]["announced"] = announce_move(args, "fraud", "champion", record.version,
                                                          out["promotion"]["seq"])
        _say(f"champion: {out['promotion']['from']} -> {out['promotion']['to']} ({out['promotion']['action']})"
             + "".join(f"\n  - {r}" for r in out["promotion"]["reasons"]))
    return out


def _broker_training_set(args: argparse.Namespace) -> Any:
    from kestrel.offline.fraud_logs import logged_training_set
    from kestrel.streams.config import Settings

    settings = Settings.from_env()
    data = logged_training_set(settings.broker, settings.partitions, args.assume_genuine_after_days * 86400, _say)
    source = {"broker": settings.broker, "labelled": data.labelled, "assumed_genuine": data.assumed_genuine,
              "too_recent": data.left_out}
    return data.rows, data.labels, data.epoch_s, data.ids, data.cards, source


def _archive_training_set(args: argparse.Namespace) -> Any:
    import time

    from kestrel.feature_store.schemas import epoch_of
    from kestrel.offline.training_sets import fraud_training_set

    cutoff = epoch_of(args.cutoff) if args.cutoff else time.time()
    data = fraud_training_set(args.from_archive, cutoff, args.assume_genuine_after_days * 86400)
    _say(f"archive {args.from_archive} as of {args.cutoff or 'now'}: {len(data.ids):,} payments, {data.labelled:,} "
         f"labelled, {data.assumed_genuine:,} taken as genuine, {data.left_out:,} too recent")
    if not data.ids:
        return None
    source = {"archive": args.from_archive, "cutoff": cutoff, "labelled": data.labelled,
              "assumed_genuine": data.assumed_genuine, "too_recent": data.left_out}
    return data.rows, data.labels, data.epoch_s, data.ids, data.cards, source


def _csv_training_set(args: argparse.Namespace) -> Any:
    import numpy as np

    from kestrel.offline.fraud_dataset import feature_rows, payments_of, read_history

    frame = read_history(args.csv, _columns(args))
    labels = frame["label"].to_numpy(dtype=float)
    if np.isnan(labels).any():
        _say(f"{int(np.isnan(labels).sum())} rows have no 0/1 label in {args.label_col}")
        return None
    _say(f"{len(frame):,} payments, {int(labels.sum()):,} frauds; computing features point-in-time")
    rows = feature_rows(payments_of(frame), labels)
    return (rows, labels.astype(int), frame["epoch_s"].to_numpy(), frame["event_id"].tolist(),
            frame["card_id"].to_numpy(), {"csv": str(args.csv)})


def cmd_eval(args: argparse.Namespace) -> int:
    from kestrel.offline.fraud_eval import EvalConfig, run_eval

    cfg = EvalConfig(csv=args.csv, columns=_columns(args), train_days=args.train_days, delay_days=args.delay_days,
                     test_days=args.test_days, train_start=args.train_start, epochs=args.epochs,
                     members=args.members, seed=args.seed, audit_share=args.audit_share)
    summary = run_eval(cfg, _say)
    if args.json:
        print(json.dumps(finite(summary)))
    else:
        _print_table(summary)
    return 0


def _print_table(summary: dict[str, Any]) -> None:
    keys = ("roc_auc", "average_precision", "card_precision_at_100", "recall_at_1pct_alerts", "score_p99_ms")
    print(f"{'model':<24}" + "".join(f"{k:>24}" for k in keys) + "   Kestrel's AP gain (95% interval)")
    for name, m in [("kestrel", summary["kestrel"]), *summary["baselines"].items()]:
        g = summary["kestrel_ap_gain"].get(name)
        gain = f"   {g['gain']:+.4f} [{g['ci95'][0]:+.4f}, {g['ci95'][1]:+.4f}]" if g else ""
        print(f"{name:<24}" + "".join(f"{m[k]:>24}" for k in keys) + gain)
    print(f"train rows {summary['train_rows']:,}, test rows {summary['test_rows']:,}, "
          f"test frauds {summary['test_frauds']:,}; {summary['windows']}")
    for seg, s in summary.get("segments", {}).items():
        print(f"  segment {seg}: {s}")


def register(train: argparse._SubParsersAction, evaluate: argparse._SubParsersAction,
             bench: argparse._SubParsersAction) -> None:
    """Add the fraud verbs to the ``train`` and ``eval`` command groups."""
    p = train.add_parser("fraud", help="train the fraud model (torch + river) from the decision log and labels "
                                       "on the broker (--from-broker) or from a labelled payment history (--csv)")
    _add_columns(p, csv_required=False)
    p.add_argument("--from-broker", action="store_true",
                   help="decisions.fraud (features as logged) joined to training.examples, from KESTREL_BROKER")
    p.add_argument("--from-archive", default=None, metavar="ROOT",
                   help="decisions (features as logged) and labels from the event archive (kestrel archive), "
                        "point in time at --cutoff")
    p.add_argument("--cutoff", default=None, help="with --from-archive: ISO time the set is built as of "
                                                   "(default now): later decisions and labels are left out")
    p.add_argument("--assume-genuine-after-days", type=float, default=7.0,
                   help="with --from-broker/--from-archive: an unlabelled payment older than this is genuine "
                        "(label delay)")
    p.add_argument("--out", default="artifacts/fraud", help="artifacts root; the model goes to OUT/VERSION/")
    p.add_argument("--registry", default=None,
                   help="register the version in this registry (or KESTREL_REGISTRY with --promote): the newest "
                        "--gate-share of the rows is then held out, and the candidate and the champion are both "
                        "measured there for the gate")
    p.add_argument("--gate-share", type=float, default=0.15, help="with --registry: the held-out newest share")
    p.add_argument("--promote", action="store_true", help="register, then move champion if the gate passes")
    p.add_argument("--why", default=None, help="with --promote: the reason, for the audit log")
    add_every_args(p)
    p.set_defaults(func=cmd_train)

    p = evaluate.add_parser("fraud", help="train on one window, replay the next with delayed labels, "
                                          "compare with baselines")
    _add_columns(p)
    p.add_argument("--segment-col", default=None, help="report alert rate and precision per value (fairness)")
    p.add_argument("--train-days", type=float, default=7.0)
    p.add_argument("--delay-days", type=float, default=7.0, help="label delay: the gap before the test window")
    p.add_argument("--test-days", type=float, default=7.0)
    p.add_argument("--train-start", default=None, help="YYYY-MM-DD (default: the latest span that fits)")
    p.add_argument("--audit-share", type=float, default=0.02,
                   help="share of genuine payments under the review threshold whose label reaches the online "
                        "learner, as in the worker's label stream (KESTREL_LABEL_AUDIT_SHARE); 1 = every label")
    p.add_argument("--json", action="store_true", help="one line of JSON")
    p.set_defaults(func=cmd_eval)
