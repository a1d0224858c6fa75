"""Runtime settings, read once from the environment (12-factor).

Every knob has a safe default for the embedded demo; production sets the
broker, Redis URL and secrets through the environment (see README).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


@dataclass(frozen=True)
class Settings:
    broker: str = "127.0.0.1:9092"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "kestrel"
    app_id: str = "kestrel"
    partitions: int = 4
    web_host: str = "127.0.0.1"
    web_port: int = 6066
    api_token: str = ""
    hash_key: str = "kestrel-dev-only-hash-key"
    max_event_bytes: int = 64 * 1024
    batch_size: int = 500
    batch_within_s: float = 0.005
    dedup_ttl_s: int = 7 * 24 * 3600
    max_future_s: float = 3600.0
    decision_log_ttl_s: int = 35 * 24 * 3600
    session_timeout_s: float = 10.0
    heartbeat_interval_s: float = 1.0
    commit_interval_s: float = 1.0
    fetch_max_wait_ms: int = 10
    linger_ms: float = 1.0
    # Record batches of up to this many bytes (before compression), compressed with this codec ("" for none).
    # A payment's decision is ~2 KB of JSON that zstd shrinks ~15x per batch: fewer bytes through the worker's
    # socket, the broker and every reader (docs/engine.md, 2026-12-06 evening).
    producer_compression: str = "zstd"
    producer_batch_bytes: int = 512 * 1024
    fraud_model: str = ""  # artifact directory, a root of versioned ones (the newest), or a registry; empty: rules
    model_alias: str = "champion"  # the registry alias a worker serves, when fraud_model is a registry
    guardrail_check_s: float = 15.0  # how often every worker checks running experiments' guardrails (0: never)
    shadow_alias: str = "shadow"  # scored beside it, logged, never acted on (when it points somewhere); "": off
    fraud_policy: str = ""  # JSON: {"review": 0.5, "block": 0.9} or {"alerts_per_day": 300, "block": 0.9}
    # Share of genuine payments under the review threshold that get a label anyway (audits): the online learner
    # corrects for it (kestrel.models.fraud_online.labelled_share); 1.0 when every payment's outcome is fed back.
    label_audit_share: float = 0.02
    # "rules": while Redis is unreachable, payments are decided by the rules on the event alone (degraded: true)
    degraded_mode: str = ""
    redis_timeout_s: float = 5.0  # socket timeout of the worker's Redis calls
    poison_retries: int = 3  # attempts of a batch that fails for a non-transient reason before it is split
    recs_model: str = ""  # two-tower artifact folder, a root whose CURRENT names the version, or a registry
    recs_alias: str = "champion"  # the registry alias served, when recs_model is a registry
    # "worker": head-only feature sets are updated by the worker, Redis storing the heads (head_state.py);
    # "redis": all the arithmetic in the Lua script (the values are the same)
    head_arithmetic: str = "worker"

    @classmethod
    def from_env(cls) -> Settings:
        d = cls()
        return cls(
            broker=_env("KESTREL_BROKER", d.broker),
            redis_url=_env("REDIS_URL", d.redis_url),
            redis_prefix=_env("KESTREL_REDIS_PREFIX", d.redis_prefix),
            app_id=_env("KESTREL_APP_ID", d.app_id),
            partitions=int(_env("KESTREL_PARTITIONS", str(d.partitions))),
            web_host=_env("KESTREL_WEB_HOST", d.web_host),
            web_port=int(_env("KESTREL_WEB_PORT", str(d.web_port))),
            api_token=_env("KESTREL_API_TOKEN", d.api_token),
            hash_key=_env("KESTREL_HASH_KEY", d.hash_key),
            max_event_bytes=int(_env("KESTREL_MAX_EVENT_BYTES", str(d.max_event_bytes))),
            batch_size=int(_env("KESTREL_BATCH_SIZE", str(d.batch_size))),
            batch_within_s=float(_env("KESTREL_BATCH_WITHIN_MS", str(d.batch_within_s * 1000))) / 1000,
            dedup_ttl_s=int(_env("KESTREL_DEDUP_TTL_S", str(d.dedup_ttl_s))),
            max_future_s=float(_env("KESTREL_MAX_FUTURE_S", str(d.max_future_s))),
            decision_log_ttl_s=int(_env("KESTREL_DECISION_LOG_TTL_S", str(d.decision_log_ttl_s))),
            session_timeout_s=float(_env("KESTREL_SESSION_TIMEOUT_S", str(d.session_timeout_s))),
            heartbeat_interval_s=float(_env("KESTREL_HEARTBEAT_INTERVAL_S", str(d.heartbeat_interval_s))),
            commit_interval_s=float(_env("KESTREL_COMMIT_INTERVAL_S", str(d.commit_interval_s))),
            fetch_max_wait_ms=int(_env("KESTREL_FETCH_MAX_WAIT_MS", str(d.fetch_max_wait_ms))),
            linger_ms=float(_env("KESTREL_LINGER_MS", str(d.linger_ms))),
            producer_compression=_env("KESTREL_PRODUCER_COMPRESSION", d.producer_compression),
            producer_batch_bytes=int(_env("KESTREL_PRODUCER_BATCH_BYTES", str(d.producer_batch_bytes))),
            fraud_model=_env("KESTREL_FRAUD_MODEL", d.fraud_model),
            model_alias=_env("KESTREL_MODEL_ALIAS", d.model_alias),
            shadow_alias=_env("KESTREL_SHADOW_ALIAS", d.shadow_alias),
            guardrail_check_s=float(_env("KESTREL_GUARDRAIL_CHECK_S", str(d.guardrail_check_s))),
            fraud_policy=_env("KESTREL_FRAUD_POLICY", d.fraud_policy),
            label_audit_share=float(_env("KESTREL_LABEL_AUDIT_SHARE", str(d.label_audit_share))),
            degraded_mode=_env("KESTREL_DEGRADED_MODE", d.degraded_mode),
            redis_timeout_s=float(_env("KESTREL_REDIS_TIMEOUT_S", str(d.redis_timeout_s))),
            poison_retries=int(_env("KESTREL_POISON_RETRIES", str(d.poison_retries))),
            recs_model=_env("KESTREL_RECS_MODEL", d.recs_model),
            recs_alias=_env("KESTREL_RECS_ALIAS", d.recs_alias),
            head_arithmetic=_env("KESTREL_HEAD_ARITHMETIC", d.head_arithmetic),
        )

    def faust_producer(self) -> dict[str, object]:
        """The Faust app settings of the producer: the worker's, and the bench's bare agent's (like for like)."""
        return {"producer_acks": -1, "producer_linger": self.linger_ms / 1000,
                "producer_compression_type": self.producer_compression or None,
                "producer_max_batch_size": self.producer_batch_bytes}

    def with_(self, **changes: object) -> Settings:
        return replace(self, **changes)

    def to_env(self) -> dict[str, str]:
        """The environment that makes ``from_env`` give back these settings."""
        return {
            "KESTREL_BROKER": self.broker,
            "REDIS_URL": self.redis_url,
            "KESTREL_REDIS_PREFIX": self.redis_prefix,
            "KESTREL_APP_ID": self.app_id,
            "KESTREL_PARTITIONS": str(self.partitions),
            "KESTREL_WEB_HOST": self.web_host,
            "KESTREL_WEB_PORT": str(self.web_port),
            "KESTREL_API_TOKEN": self.api_token,
            "KESTREL_HASH_KEY": self.hash_key,
            "KESTREL_MAX_EVENT_BYTES": str(self.max_event_bytes),
            "KESTREL_BATCH_SIZE": str(self.batch_size),
            "KESTREL_BATCH_WITHIN_MS": str(self.batch_within_s * 1000),
            "KESTREL_DEDUP_TTL_S": str(self.dedup_ttl_s),
            "KESTREL_DECISION_LOG_TTL_S": str(self.decision_log_ttl_s),
            "KESTREL_MAX_FUTURE_S": str(self.max_future_s),
            "KESTREL_SESSION_TIMEOUT_S": str(self.session_timeout_s),
            "KESTREL_HEARTBEAT_INTERVAL_S": str(self.heartbeat_interval_s),
            "KESTREL_COMMIT_INTERVAL_S": str(self.commit_interval_s),
            "KESTREL_FETCH_MAX_WAIT_MS": str(self.fetch_max_wait_ms),
            "KESTREL_LINGER_MS": str(self.linger_ms),
            "KESTREL_PRODUCER_COMPRESSION": self.producer_compression,
            "KESTREL_PRODUCER_BATCH_BYTES": str(self.producer_batch_bytes),
            "KESTREL_FRAUD_MODEL": self.fraud_model,
            "KESTREL_MODEL_ALIAS": self.model_alias,
            "KESTREL_SHADOW_ALIAS": self.shadow_alias,
            "KESTREL_GUARDRAIL_CHECK_S": str(self.guardrail_check_s),
            "KESTREL_FRAUD_POLICY": self.fraud_policy,
            "KESTREL_LABEL_AUDIT_SHARE": str(self.label_audit_share),
            "KESTREL_DEGRADED_MODE": self.degraded_mode,
            "KESTREL_REDIS_TIMEOUT_S": str(self.redis_timeout_s),
            "KESTREL_POISON_RETRIES": str(self.poison_retries),
            "KESTREL_RECS_MODEL": self.recs_model,
            "KESTREL_RECS_ALIAS": self.recs_alias,
            "KESTREL_HEAD_ARITHMETIC": self.head_arithmetic,
        }
