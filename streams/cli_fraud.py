"""`kestrel train|eval|bench fraud`: argument parsing only; the work lives in `offline/` and `models/`."""

from __future__ import annotations

import argparse


def register(train: argparse._SubParsersAction, evaluate: argparse._SubParsersAction,
             bench: argparse._SubParsersAction) -> None:
    """Add the fraud verbs to the `train`, `eval` and `bench` command groups."""
