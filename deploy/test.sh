#!/usr/bin/env bash
# Run the whole test suite: unit, doctests, integration (real tansu broker and real Redis).
set -euo pipefail
cd "$(dirname "$0")/.."
# Integration tests use REDIS_URL (default redis://127.0.0.1:6379) with a key prefix of
# their own; where no Redis answers, the fixtures start a private redis-server.
exec .venv/bin/python -m pytest -q "$@"
