"""Scorer interfaces: the seam where rules, torch and river models plug in.

A fraud scorer sees a batch of (event, features) and returns one
:class:`FraudScore` per event; it is pure given its inputs, so the stream
path can batch and the offline evaluator can replay it unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Action = Literal["allow", "review", "block"]


@dataclass(frozen=True, slots=True)
class Reason:
    code: str
    message: str
    value: float | None = None
    contribution: float | None = None  # share of the model's log-odds, when a model (not a rule) gave it


@dataclass(frozen=True, slots=True)
class FraudScore:
    score: float
    action: Action
    reasons: tuple[Reason, ...] = field(default_factory=tuple)


class FraudScorer(Protocol):
    version: str

    def score_batch(self, events: Sequence[Any], features: Sequence[Mapping[str, float]]) -> list[FraudScore]:
        """Score each event given the features read at its time."""
        ...


@dataclass(frozen=True)
class Thresholds:
    """Policy: a score at or above ``block`` blocks, at or above ``review`` is reviewed."""

    review: float = 0.5
    block: float = 0.8

    def action(self, score: float) -> Action:
        """
        >>> Thresholds(0.5, 0.8).action(0.79), Thresholds(0.5, 0.8).action(0.8)
        ('review', 'block')
        """
        if score >= self.block:
            return "block"
        if score >= self.review:
            return "review"
        return "allow"
