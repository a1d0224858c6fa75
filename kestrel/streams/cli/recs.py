"""`kestrel train|eval|bench recs`: argument parsing only; the work lives in `kestrel/offline/` and `kestrel/models/`.

Heavy imports (torch, torchrec, faiss) happen inside the commands, so
`kestrel --help` and the other verbs stay fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from kestrel.streams.cli.every import add_every_args


def _data_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--csv", required=required, help="interaction CSV (plain or .gz)")
    p.add_argument("--user-col", default="user_id")
    p.add_argument("--item-col", default="item_id")
    p.add_argument("--time-col", default="timestamp", help="epoch seconds or ISO-8601")
    p.add_argument("--rating-col", default=None, help="keep rows whose value here is >= --min-rating")
    p.add_argument("--min-rating", type=float, default=None)
    p.add_argument("--category-col", default=None, help="item attribute for the item tower (e.g. category)")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--sequence", default=None, choices=["bag", "gru", "attention"],
                   help="how the query tower reads the history beside its pooled bags: not at all (bag), a GRU in "
                        "time order, or the newest item's attention over it with positions (the default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(train: argparse._SubParsersAction, evaluate: argparse._SubParsersAction,
             bench: argparse._SubParsersAction) -> None:
    """Add the recs verbs to the `train`, `eval` and `bench` command groups."""
    p = train.add_parser("recs", help="train the two-tower recommender and write a versioned artifact")
    _data_args(p, required=False)
    p.add_argument("--simulate", type=int, default=0, metavar="N",
                   help="train on N simulated interactions (the demo's simulator) instead of --csv")
    p.add_argument("--out", default="artifacts/recs", help="artifact root: writes OUT/<version>/ and OUT/CURRENT")
    p.add_argument("--registry", default=None,
                   help="register the version in this registry (or KESTREL_REGISTRY with --promote): each user's "
                        "newest interactions are then held out, and the candidate and the champion are both "
                        "measured there for the gate")
    p.add_argument("--promote", action="store_true", help="register, then move the alias if the gate passes")
    p.add_argument("--alias", default="champion", help="with --promote: the alias to move (workers serve "
                                                        "KESTREL_RECS_ALIAS)")
    p.add_argument("--why", default=None, help="with --promote: the reason, for the audit log")
    p.add_argument("--from-archive", default=None, metavar="ROOT",
                   help="the interactions of the event archive (kestrel archive), in time order up to --cutoff")
    p.add_argument("--cutoff", default=None, help="with --from-archive: ISO time the set is built as of (default now)")
    add_every_args(p)
    _model_args(p)
    p.add_argument("--json", action="store_true", help="one line of JSON")
    p.set_defaults(func=cmd_train)

    p = evaluate.add_parser("recs", help="per-user split evaluation of the served recommender against baselines")
    _data_args(p, required=False)
    p.add_argument("--simulate", type=int, default=0, metavar="N",
                   help="evaluate on N simulated interactions instead of --csv; with the shoppers generator, add "
                        "the simulator checks (session shift, expected click-through against popularity)")
    p.add_argument("--generator", default="shoppers", choices=["shoppers", "sessions"],
                   help="with --simulate: the demo's shoppers, or drifting tastes in sessions over a long tail "
                        "(kestrel/offline/generators/drifting_sessions.py)")
    _model_args(p)
    p.add_argument("--ease-lambda", type=float, default=200.0)
    p.add_argument("--split", default="temporal", choices=["temporal", "last"],
                   help="held out per user: the last 20%% of interactions (temporal) or the last one (next item)")
    p.add_argument("--index", default="auto", choices=["auto", "flat", "hnsw", "ivf"])
    p.add_argument("--save-model", default=None, metavar="DIR", help="also write the trained artifact here")
    p.add_argument("--json", action="store_true", help="one line of JSON")
    p.set_defaults(func=cmd_eval)

    p = bench.add_parser("recs", help="end-to-end recommendation latency and FAISS recall by catalog size")
    p.add_argument("--sizes", default="10000,100000", help="comma-separated catalog sizes (e.g. 10000,100000,1000000)")
    p.add_argument("--requests", type=int, default=2000, help="requests per size")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--index", default="auto", choices=["auto", "flat", "hnsw", "ivf"])
    p.add_argument("--redis-url", default=None, help="Redis for the feature reads (default REDIS_URL or local)")
    p.add_argument("--json", action="store_true", help="one line of JSON")
    p.set_defaults(func=cmd_bench)


def _load(args: argparse.Namespace) -> Any:
    from kestrel.offline.recs_data import load_interactions, simulated_interactions

    if getattr(args, "simulate", 0):
        if getattr(args, "generator", "shoppers") == "sessions":
            from kestrel.offline.generators.drifting_sessions import drifting_sessions

            return load_interactions_frame(drifting_sessions(args.simulate, seed=args.seed))
        return load_interactions_frame(simulated_interactions(args.simulate, seed=args.seed))
    if getattr(args, "from_archive", None):
        import time

        from kestrel.feature_store.schemas import epoch_of
        from kestrel.offline.training_sets import interaction_frame

        frame = interaction_frame(args.from_archive, epoch_of(args.cutoff) if args.cutoff else time.time())
        print(f"archive {args.from_archive} as of {args.cutoff or 'now'}: {len(frame):,} interactions of "
              f"{frame['user'].nunique():,} users", file=sys.stderr)
        return frame
    if not args.csv:
        raise SystemExit("give --csv FILE, --from-archive ROOT or --simulate N")
    return load_interactions(args.csv, args.user_col, args.item_col, args.time_col, args.rating_col,
                             args.min_rating, args.category_col)


def load_interactions_frame(df: Any) -> Any:
    """A simulated frame in the shape ``load_interactions`` returns (through a CSV-like round trip)."""
    import io

    from kestrel.offline.recs_data import load_interactions

    buf = io.StringIO()
    df.to_csv(buf, index=False)
    buf.seek(0)
    return load_interactions(buf, "user_id", "item_id", "timestamp", category_col="category")


def cmd_train(args: argparse.Namespace) -> int:
    from kestrel.offline.recs_train import train_two_tower

    if args.every:
        from kestrel.streams.cli.every import train_every

        return train_every(args, "recs", lambda: _train_candidate(args, _load(args)))
    df = _load(args)
    if args.registry or args.promote:
        summary = _train_candidate(args, df)
        print(json.dumps(summary) if args.json else json.dumps(summary, indent=2))
        return 0
    from kestrel.offline.recs_hybrid import with_blend

    def tower(frame: Any, progress: bool = False) -> Any:
        return train_two_tower(frame, dim=args.dim, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                               seed=args.seed, progress=progress, config_overrides=_sequence(args))

    # the served form: the tower and EASE's weights blended, the weight chosen on a validation split of df
    art = with_blend(tower(df, not args.no_progress), df, tower, log=lambda m: print(m, file=sys.stderr))
    art.metadata["user_ids"] = _user_ids(args)
    folder = art.save(args.out)
    summary = {"version": art.version, "path": str(folder), "items": len(art.vocab.item_ids),
               "hybrid": art.metadata.get("hybrid"),
               **{k: art.metadata[k] for k in ("examples", "train_seconds", "examples_per_s", "loss_per_epoch")}}
    print(json.dumps(summary) if args.json else "\n".join(f"{k}: {v}" for k, v in summary.items()))
    return 0


def _train_candidate(args: argparse.Namespace, df: Any) -> dict[str, Any] | None:
    """Train with each user's newest interactions held out, register the version, ask the gate if ``--promote``."""
    from kestrel.models.gate import GatePolicy
    from kestrel.models.registry import Registry, promote
    from kestrel.offline.recs_registry import train_recs_candidate
    from kestrel.streams.cli.models import announce_move, registry_root

    registry = Registry(registry_root(args), "recs")
    if len(df) == 0:
        return None  # nothing to learn from (an empty archive): the loop reports it, nothing is registered
    art, record = train_recs_candidate(df, registry, args.out, alias=args.alias, epochs=args.epochs, dim=args.dim,
                                       batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                       user_ids=_user_ids(args), progress=lambda m: print(m, file=sys.stderr),
                                       sequence=args.sequence)
    out: dict[str, Any] = {"model_version": art.version, "path": record.path, "registry": str(registry.root),
                           "metrics": record.metrics, "evaluation": record.evaluation}
    if args.promote:
        out["promotion"] = promote(registry, record.version, alias=args.alias, policy=GatePolicy.for_kind("recs"),
                                   why=args.why or "")
        if out["promotion"]["moved"]:
            out["promotion"]["announced"] = announce_move(args, "recs", args.alias, record.version,
                                                          out["promotion"]["seq"])
        print(f"{args.alias}: {out['promotion']['from']} -> {out['promotion']['to']} ({out['promotion']['action']})"
              + "".join(f"\n  - {r}" for r in out["promotion"]["reasons"]), file=sys.stderr)
    if not args.every:  # the loop writes each run's report itself
        out["report"] = str(_write_run_report(registry.root, out))
    return out


def _sequence(args: argparse.Namespace) -> dict[str, str]:
    """``--sequence`` as a config override (none given: the trainer's default reader)."""
    return {"sequence": args.sequence} if args.sequence else {}


def _user_ids(args: argparse.Namespace) -> str:
    """How the artifact knows users: "tokens" (the archive stores keyed tokens, not ids) or "raw"."""
    return "tokens" if getattr(args, "from_archive", None) else "raw"


def _write_run_report(root: Any, out: dict[str, Any]) -> Path:
    """The run's Markdown report (numbers, gate, plots) in ``REGISTRY/runs/``, as the fraud loop writes it."""
    from datetime import UTC, datetime

    from kestrel.offline.run_report import run_report

    reports = Path(root) / "runs"
    reports.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = reports / f"{stamp}-recs-{out['model_version']}.md"
    path.write_text(run_report({"started": stamp, "ok": True, **out}, "recs", reports))
    return path


def cmd_eval(args: argparse.Namespace) -> int:
    from kestrel.offline.recs_eval import evaluate_recs

    df = _load(args)
    if not args.simulate and not args.csv:
        raise SystemExit("give --csv FILE or --simulate N")
    result = evaluate_recs(df, epochs=args.epochs, dim=args.dim, batch_size=args.batch_size, lr=args.lr,
                           ease_lambda=args.ease_lambda, seed=args.seed, progress=not args.no_progress,
                           index_kind=args.index, split=args.split, log=lambda m: print(m, file=sys.stderr),
                           config_overrides=_sequence(args))
    art = result.pop("artifact")
    if args.save_model:
        result["saved_to"] = str(art.save(args.save_model))
    if args.simulate and args.generator == "shoppers":  # the checks need the shoppers' ground truth
        from kestrel.offline.recs_data import SPLITS, temporal_split
        from kestrel.offline.recs_simcheck import simulator_check
        from kestrel.offline.simulator import SimConfig

        train, _ = temporal_split(df, SPLITS[args.split])
        result["simulator"] = simulator_check(art, train, SimConfig(seed=args.seed))
    _print_table(result)
    if args.json:
        print(json.dumps(result))
    return 0


def _print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    cols = ("recall_at_10", "recall_at_20", "ndcg_at_10", "coverage_at_10", "retrieval_p50_ms", "retrieval_p99_ms")
    table = Table(title=f"Recommendations: {result['users_evaluated']:,} users, {result['items']:,} items")
    table.add_column("model")
    for c in cols:
        table.add_column(c, justify="right")
    for name, m in [("two_tower", result["two_tower"]), *result["baselines"].items()]:
        table.add_row(name, *(f"{m[c]:.4f}" if c in m else "-" for c in cols))
    Console(stderr=True).print(table)


def cmd_bench(args: argparse.Namespace) -> int:
    from kestrel.streams.recs.bench import run_bench

    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    rows = run_bench(sizes, requests=args.requests, dim=args.dim, index_kind=args.index, redis_url=args.redis_url,
                     log=lambda m: print(m, file=sys.stderr))
    if args.json:
        print(json.dumps(rows))
    else:
        for row in rows:
            print(row)
    return 0
