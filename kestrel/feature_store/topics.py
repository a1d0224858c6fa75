"""Topic names and their creation; one owner for every topic the system uses."""

from __future__ import annotations

from confluent_kafka.admin import AdminClient, NewTopic

TRANSACTIONS = "events.transactions"
INTERACTIONS = "events.interactions"
LABELS = "events.labels"
DEADLETTER = "events.deadletter"
FRAUD_DECISIONS = "decisions.fraud"
RECOMMENDATION_DECISIONS = "decisions.recommendations"
TRAINING_EXAMPLES = "training.examples"
ALERTS = "alerts.fraud"
OPERATOR_EVENTS = "alerts.operator"  # for operators: drift of the online fraud learner
EXPOSURES = "experiments.exposures"  # a unit's first exposure to each experiment, once
RECS_REQUESTS = "recs.requests"  # {"request_id", "user_id", "k", ...} -> an answer on RECS_RESPONSES
RECS_RESPONSES = "recs.responses"
RECS_TOPICS = (RECS_REQUESTS, RECS_RESPONSES)
MODEL_UPDATES = "models.updates"  # registry alias moves, read by every worker (no group): hot swap
CONTROL_TOPICS = (MODEL_UPDATES,)

INPUT_TOPICS = (TRANSACTIONS, INTERACTIONS, LABELS)
OUTPUT_TOPICS = (DEADLETTER, FRAUD_DECISIONS, RECOMMENDATION_DECISIONS, TRAINING_EXAMPLES, ALERTS, OPERATOR_EVENTS,
                 EXPOSURES)
ALL_TOPICS = INPUT_TOPICS + OUTPUT_TOPICS + RECS_TOPICS + CONTROL_TOPICS

EVENT_TYPE_TOPIC = {"transaction": TRANSACTIONS, "interaction": INTERACTIONS, "label": LABELS}
TOPIC_EVENT_TYPE = {topic: kind for kind, topic in EVENT_TYPE_TOPIC.items()}


def ensure_topics(bootstrap: str, partitions: int, topics: tuple[str, ...] = ALL_TOPICS,
                  replication: int = 1, timeout_s: float = 15.0) -> None:
    """Create the topics that do not exist yet (idempotent).

    Created up front so that consumers never subscribe to a missing topic
    (librdkafka only re-checks those every few minutes).
    """
    admin = AdminClient({"bootstrap.servers": bootstrap})
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    missing = [NewTopic(t, partitions, replication) for t in topics if t not in existing]
    if not missing:
        return
    for topic, future in admin.create_topics(missing, request_timeout=timeout_s).items():
        try:
            future.result(timeout=timeout_s)
        except Exception as exc:  # TOPIC_ALREADY_EXISTS from a concurrent creator is fine
            if "already exists" not in str(exc).lower() and "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise RuntimeError(f"could not create topic {topic}: {exc}") from exc
