"""Experiment definitions and the router's decision for one unit: pure, no I/O (issue 15).

An :class:`Experiment` says what is compared (variants: a model version or
alias and/or parameters), on whom (target, hash attribute, eligibility,
coverage, a namespace range, a global holdout), and how it is judged
(primary and guardrail metrics, minimum detectable effect). :func:`route`
gives a unit's variant the way GrowthBook would (:mod:`kestrel.models.assignment`),
or None when the unit is not in the experiment, with the reason.

>>> exp = Experiment(key="recs-mmr", target="recs", hash_attribute="user", seed="recs-mmr",
...                  variants=[Variant(key="control", params={"mmr_lambda": 0.7}),
...                            Variant(key="more-diverse", params={"mmr_lambda": 0.5})],
...                  status="running", primary_metric="ctr")
>>> r = route(exp, {"user": "u-42"}); r.variant, r.reason
('control', 'assigned')
>>> route(exp, {"device": "ios"}).reason
'no hash attribute'
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kestrel.models.assignment import assign, bucket

HOLDOUT_SEED = "kestrel-global-holdout"


class Variant(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    weight: float | None = Field(None, ge=0, le=1, description="share of enrolled units; default equal")
    model: str | None = Field(None, description="a registry version or alias the variant runs")
    params: dict[str, float | int | str | bool] = Field(default_factory=dict,
                                                        description="e.g. review_threshold, mmr_lambda")


class Filter(BaseModel):
    """Eligibility: the unit's attribute must be one of ``values``."""

    model_config = ConfigDict(extra="forbid")

    attribute: str
    values: list[str | int | float | bool]


class Experiment(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    owner: str = ""
    target: Literal["recs", "fraud"]
    hash_attribute: Literal["user", "card", "customer"]
    seed: str = Field(min_length=1)
    variants: list[Variant] = Field(min_length=2)
    coverage: float = Field(1.0, ge=0, le=1)
    filters: list[Filter] = Field(default_factory=list)
    namespace: tuple[str, float, float] | None = None
    holdout: float = Field(0.0, ge=0, lt=1, description="share of all units kept out of every experiment")
    status: Literal["draft", "running", "stopped"] = "draft"
    primary_metric: str
    guardrail_metrics: list[str] = Field(default_factory=list)
    minimum_detectable_effect: float | None = Field(None, gt=0)
    attribution_s: int = Field(86400, gt=0, description="recs: how long after a unit's first exposure its clicks "
                                                         "and purchases count for its variant")
    hash_version: Literal[1, 2] = 2

    @field_validator("namespace")
    @classmethod
    def _range(cls, ns: tuple[str, float, float] | None) -> tuple[str, float, float] | None:
        if ns is not None and not 0 <= ns[1] < ns[2] <= 1:
            raise ValueError("namespace range must satisfy 0 <= start < end <= 1")
        return ns

    @model_validator(mode="after")
    def _variants(self) -> Experiment:
        keys = [v.key for v in self.variants]
        if len(set(keys)) != len(keys):
            raise ValueError("variant keys must be unique")
        given = [v.weight for v in self.variants if v.weight is not None]
        if given and (len(given) != len(self.variants) or abs(sum(given) - 1.0) > 1e-6):
            raise ValueError("give every variant a weight, summing to 1, or none (equal weights)")
        return self

    def weights(self) -> list[float]:
        if self.variants[0].weight is None:
            return [1.0 / len(self.variants)] * len(self.variants)
        return [float(v.weight or 0.0) for v in self.variants]


@dataclass(frozen=True)
class Routed:
    """What the router decided for one unit: the variant, or None with the reason it is not enrolled."""

    variant: str | None
    index: int
    reason: str  # assigned | not running | no hash attribute | filtered | holdout | namespace | coverage
    unit: str | None = None


def in_holdout(unit: str, share: float) -> bool:
    """The global holdout: the same units for every experiment (its own seed), kept on the defaults."""
    position = bucket(HOLDOUT_SEED, unit)
    return share > 0 and position is not None and position < share


def route(experiment: Experiment, attributes: Mapping[str, Any]) -> Routed:
    """The unit's variant in ``experiment``, given its attributes (the hash attribute among them)."""
    if experiment.status != "running":
        return Routed(None, -1, "not running")
    raw = attributes.get(experiment.hash_attribute)
    if raw is None or raw == "":
        return Routed(None, -1, "no hash attribute")
    unit = str(raw)
    for f in experiment.filters:
        if attributes.get(f.attribute) not in f.values:
            return Routed(None, -1, "filtered", unit)
    if in_holdout(unit, experiment.holdout):
        return Routed(None, -1, "holdout", unit)
    weights = experiment.weights()
    if experiment.namespace is not None:
        index = assign(experiment.seed, unit, weights, experiment.coverage, experiment.namespace,
                       experiment.hash_version)
        if index < 0 and assign(experiment.seed, unit, weights, experiment.coverage, None,
                                experiment.hash_version) >= 0:
            return Routed(None, -1, "namespace", unit)
    else:
        index = assign(experiment.seed, unit, weights, experiment.coverage, None, experiment.hash_version)
    if index < 0:
        return Routed(None, -1, "coverage", unit)
    return Routed(experiment.variants[index].key, index, "assigned", unit)


@dataclass(frozen=True)
class Enrolment:
    """A unit's variants across the running experiments, the model one of them runs, and what was passed over."""

    variants: list[tuple[Experiment, Variant]]
    model: str | None  # the ref (alias or version) the unit's model variant runs; None: the served model
    skipped: list[str]  # per experiment that routed the unit but did not enrol it: why


def enrol(experiments: Sequence[Experiment], attributes: Mapping[str, Any],
          loaded: Callable[[str], bool]) -> Enrolment:
    """Route one unit through every experiment. An experiment whose variants name a model not ``loaded`` yet
    enrols no one (all its variants wait, so the split stays as configured), and one model serves a unit: a
    second experiment's model variant does not enrol it (put model experiments in one namespace).

    >>> a = Experiment(key="a", target="fraud", hash_attribute="card", seed="a", primary_metric="recall",
    ...                status="running", variants=[{"key": "x", "model": "m1"}, {"key": "y", "model": "m1"}])
    >>> b = a.model_copy(update={"key": "b", "seed": "b"})
    >>> e = enrol([a, b], {"card": "c1"}, loaded=lambda ref: True)
    >>> [exp.key for exp, _ in e.variants], e.model, e.skipped
    (['a'], 'm1', ['another_model_decides'])
    >>> enrol([a], {"card": "c1"}, loaded=lambda ref: False).skipped
    ['model_not_loaded']
    """
    variants: list[tuple[Experiment, Variant]] = []
    model: str | None = None
    skipped: list[str] = []
    for exp in experiments:
        routed = route(exp, attributes)
        if routed.variant is None:
            continue
        if any(v.model and not loaded(v.model) for v in exp.variants):
            skipped.append("model_not_loaded")
            continue
        variant = exp.variants[routed.index]
        if variant.model:
            if model is not None:
                skipped.append("another_model_decides")
                continue
            model = variant.model
        variants.append((exp, variant))
    return Enrolment(variants, model, skipped)
