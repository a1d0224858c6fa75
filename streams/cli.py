"""``kestrel``: the command line of the whole system."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from streams.config import Settings


def cmd_worker(args: argparse.Namespace) -> int:
    from faust.worker import Worker

    from streams.app import create_app
    from streams.topics import ensure_topics

    settings = Settings.from_env()
    if args.web_port is not None:
        settings = settings.with_(web_port=args.web_port)
    ensure_topics(settings.broker, settings.partitions)
    app = create_app(settings)
    class QuietWorker(Worker):
        """No terminal spinner: its DEBUG-level handler makes every library log call build a record."""

        def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
            logger.setLevel(level or logging.WARNING)

    worker = QuietWorker(app, loglevel=args.loglevel, quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from streams.schemas import json_schema

    doc = json_schema()
    if args.type:
        doc = doc["$defs"][args.type]
    print(json.dumps(doc, indent=2))
    return 0


def cmd_produce(args: argparse.Namespace) -> int:
    from streams.simulate_cli import run_produce

    return run_produce(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from streams.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kestrel", description="Real-time recommendations and fraud decisions.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("worker", help="run a stream worker (Faust) against KESTREL_BROKER and REDIS_URL")
    p.add_argument("--web-port", type=int, default=None, help="HTTP port (default KESTREL_WEB_PORT or 6066)")
    p.add_argument("--loglevel", default="warning")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("schema", help="print the JSON Schema of the event contracts")
    p.add_argument("--type", choices=["transaction", "interaction", "label"])
    p.set_defaults(func=cmd_schema)

    from streams.simulate_cli import add_produce_args

    p = sub.add_parser("produce", help="send simulated events or replay a CSV to the broker")
    add_produce_args(p)
    p.set_defaults(func=cmd_produce)

    from streams.demo import add_demo_args

    p = sub.add_parser("demo", help="start broker, Redis, a worker and the simulator; stream and report")
    add_demo_args(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
