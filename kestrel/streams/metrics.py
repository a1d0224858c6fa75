"""Prometheus metrics of one worker (served at ``GET /metrics``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.events_in = Counter("kestrel_events_in", "Records consumed, by topic.", ["topic"], registry=r)
        self.events_out = Counter("kestrel_events_out", "Records produced, by topic.", ["topic"], registry=r)
        self.deadletters = Counter("kestrel_deadletters", "Rejected records, by reason.", ["topic", "reason"],
                                   registry=r)
        self.replayed = Counter("kestrel_redelivered", "Records seen again after a restart or rebalance.",
                                ["topic"], registry=r)
        self.http_rejected = Counter("kestrel_http_rejected", "HTTP events refused, by reason.", ["reason"],
                                     registry=r)
        self.decision_latency = Histogram(
            "kestrel_decision_latency_seconds", "Time from batch receipt to decision produced, by kind.",
            ["kind"], buckets=LATENCY_BUCKETS, registry=r)
        self.event_age = Histogram(
            "kestrel_event_age_seconds", "Time from the record's broker timestamp to its decision, by kind.",
            ["kind"], buckets=LATENCY_BUCKETS, registry=r)
        self.alert_cases = Counter("kestrel_alert_cases", "Analyst case changes from fraud decisions, by change "
                                   "(opened, updated, escalated).", ["change"], registry=r)
        self.alert_verdicts = Counter("kestrel_alert_verdicts", "Analyst verdicts that closed a case, by verdict.",
                                      ["verdict"], registry=r)
        self.online_labels = Counter("kestrel_online_labels", "Labels seen by the online fraud learners, by outcome "
                                     "(learned, already_learned, no_decision; parked: arrived before its payment "
                                     "was decided, learned when it is).", ["outcome"], registry=r)
        self.drift_events = Counter("kestrel_drift_events", "Drift flagged by ADWIN on the fraud decisions' missed-"
                                    "fraud or false-alarm rate.", registry=r)
        self.degraded = Counter("kestrel_degraded_decisions", "Fraud decisions made by the rules on the payment "
                                "alone while Redis was unreachable (KESTREL_DEGRADED_MODE=rules).", registry=r)
        self.batch_failures = Counter("kestrel_batch_failures", "Batches that raised, by kind (transient: Redis "
                                      "or network, retried until they pass; poison: retried a bounded number of "
                                      "times, then split and the failing records dead-lettered).", ["topic", "kind"],
                                      registry=r)
        self.model_swaps = Counter("kestrel_model_swaps", "Fraud model versions heard on models.updates, by "
                                   "result (swapped in, or failed to load: the old version kept).", ["result"],
                                   registry=r)
        self.variant_models = Counter("kestrel_variant_models", "Fraud models named by experiment variants, by "
                                      "result (loaded, or failed to load: the variant enrols no one).", ["result"],
                                      registry=r)
        self.experiments_idle = Counter("kestrel_experiment_payments_not_enrolled", "Payments an experiment did "
                                        "not enrol although routed, by reason (its variant's model not loaded yet, "
                                        "another experiment's model already decides the payment).", ["reason"],
                                        registry=r)
        self.batch_size = Histogram("kestrel_batch_size", "Records per processed batch.", ["topic"],
                                    buckets=(1, 10, 50, 100, 250, 500, 1000, 2000), registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
