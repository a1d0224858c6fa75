"""Redis key layout and keyed hashing of identifiers.

Raw identifiers (card numbers, user ids) never appear in Redis keys: an
entity is addressed by an HMAC-SHA256 token keyed with a secret from the
environment, so a leaked key dump does not reveal who is who.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

TOKEN_CHARS = 32
RECENT_TOKENS = 65_536  # tokens a hasher remembers (a few MB at most)
# Pair entities (FeatureSet.owner) and the data subject they belong to; their tokens start with the owner's.
PAIR_OWNER = {"card_terminal": "card", "card_device": "card"}


@dataclass(frozen=True)
class KeyedHasher:
    """Deterministic pseudonymous tokens for identifiers.

    >>> h = KeyedHasher(b"secret")
    >>> h.token("card", "4111111111111111") == h.token("card", "4111111111111111")
    True
    >>> "4111" in h.token("card", "4111111111111111")
    False
    >>> len(h.token("card", "x"))
    32
    """

    key: bytes
    _pads: tuple[Any, Any] = field(init=False, repr=False, compare=False)
    # recent tokens: a payment's card is hashed for several feature sets and its decision (bounded: cleared
    # when full; the ids are in the worker's memory anyway, never written out)
    _recent: dict[tuple[str, str], str] = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        # HMAC's keyed inner and outer states, computed once: a token then costs two SHA-256 blocks, not
        # four plus an HMAC object (~3x cheaper; a batch read hashes every id it is given)
        key = hashlib.sha256(self.key).digest() if len(self.key) > 64 else self.key
        key = key.ljust(64, b"\0")
        object.__setattr__(self, "_pads", (hashlib.sha256(bytes(b ^ 0x36 for b in key)),
                                           hashlib.sha256(bytes(b ^ 0x5C for b in key))))

    def token(self, entity: str, raw_id: str) -> str:
        """HMAC-SHA256 of ``entity \\x1f raw_id``, hex, truncated.

        >>> import hmac as h
        >>> KeyedHasher(b"k").token("card", "x") == h.new(b"k", b"card\\x1fx", "sha256").hexdigest()[:TOKEN_CHARS]
        True
        """
        recent = self._recent
        token = recent.get((entity, raw_id))
        if token is None:
            inner, outer = self._pads[0].copy(), self._pads[1].copy()
            inner.update(f"{entity}\x1f{raw_id}".encode())
            outer.update(inner.digest())
            token = outer.hexdigest()[:TOKEN_CHARS]
            if len(recent) >= RECENT_TOKENS:
                recent.clear()
            recent[(entity, raw_id)] = token
        return token


@dataclass(frozen=True)
class KeySpace:
    """All Redis keys under one prefix (tests and tenants use distinct prefixes)."""

    prefix: str

    def entity(self, entity: str, token: str) -> str:
        return f"{self.prefix}:e:{entity}:{token}"

    def entity_part(self, entity: str, token: str, part: str) -> str:
        return f"{self.prefix}:e:{entity}:{token}:{part}"

    def tombstone(self, entity: str, token: str) -> str:
        """Marks an erased data subject: writes for it are refused, so a replay cannot recreate it."""
        return f"{self.prefix}:tomb:{entity}:{token}"

    def tombstone_of(self, entity_key: str) -> str:
        """The tombstone that guards ``entity_key``: a pair entity's is its owner's (erasing a card stops both).

        >>> ks = KeySpace("k")
        >>> ks.tombstone_of("k:e:card:abc"), ks.tombstone_of("k:e:card_terminal:" + "a" * 32 + "b" * 16)
        ('k:tomb:card:abc', 'k:tomb:card:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa')
        """
        _, _, entity, token = entity_key.rsplit(":", 3)
        owner = PAIR_OWNER.get(entity)
        if owner is not None:
            return self.tombstone(owner, token[:TOKEN_CHARS])
        return self.tombstone(entity, token)

    def applied(self, event_id: str) -> str:
        """Marks an event whose feature updates were applied; holds the feature snapshot."""
        return f"{self.prefix}:applied:{event_id}"

    def published(self, stream: str, ident: str) -> str:
        """Marks an output that was delivered to the broker, so a replay does not resend it."""
        return f"{self.prefix}:pub:{stream}:{ident}"

    def global_(self, name: str) -> str:
        return f"{self.prefix}:g:{name}"

    def decision(self, event_id: str) -> str:
        return f"{self.prefix}:decision:{event_id}"

    @staticmethod
    def version_of(entity_key: str) -> str:
        """A counter bumped by every write of a cached-read set's entity (see FeatureSet.cached_reads)."""
        return f"{entity_key}|ver"

    @property
    def alerts(self) -> AlertKeys:
        return AlertKeys(self.prefix)

    @property
    def experiments(self) -> ExperimentKeys:
        return ExperimentKeys(self.prefix)

    def early_labels(self, transaction_id: str) -> str:
        """Labels that arrived before their transaction was decided (a hash: label id -> label), joined later."""
        return f"{self.prefix}:early-labels:{transaction_id}"


@dataclass(frozen=True)
class AlertKeys:
    """The analyst desk's keys (cases, their hits, per-card pointers and histories, hit markers)."""

    prefix: str

    @property
    def open(self) -> str:
        return f"{self.prefix}:alerts:open"

    @property
    def case_prefix(self) -> str:
        return f"{self.prefix}:alerts:case:"

    def case(self, case_id: str) -> str:
        return self.case_prefix + case_id

    def hits(self, case_id: str) -> str:
        return f"{self.prefix}:alerts:case:{case_id}:hits"

    def card(self, card: str) -> str:
        return f"{self.prefix}:alerts:card:{card}"

    def history(self, card: str) -> str:
        return f"{self.prefix}:alerts:hist:{card}"

    def applied(self, event_id: str) -> str:
        return f"{self.prefix}:alerts:applied:{event_id}"


@dataclass(frozen=True)
class ExperimentKeys:
    """Experiment definitions (one hash: key -> JSON), their revision counter and their audit stream."""

    prefix: str

    @property
    def definitions(self) -> str:
        return f"{self.prefix}:exp:defs"

    @property
    def revision(self) -> str:
        return f"{self.prefix}:exp:rev"

    @property
    def audit(self) -> str:
        return f"{self.prefix}:exp:audit"

    def units(self, experiment: str, variant: str) -> str:
        """The units (tokens) exposed to one variant: a set, so a replay adds nothing."""
        return f"{self.prefix}:exp:units:{experiment}:{variant}"

    def outcomes(self, experiment: str) -> str:
        """Labelled outcomes of enrolled payments: a hash, label id -> [variant, is_fraud, action], set once."""
        return f"{self.prefix}:exp:outcomes:{experiment}"

    def durations(self, experiment: str) -> str:
        """Enrolled decisions' durations as histograms: a hash, ``{measure}|{variant}|{bucket}`` -> count, each
        decision counted once, with its decision log's first write (measure: ``latency``, ``model``)."""
        return f"{self.prefix}:exp:durations:{experiment}"

    def exposed_at(self, experiment: str) -> str:
        """When each unit was first exposed (recs: the start of its attribution window): unit -> epoch, set once."""
        return f"{self.prefix}:exp:exposed_at:{experiment}"

    def pre_period(self, experiment: str) -> str:
        """Each unit's pre-period covariate, taken at its first exposure (CUPED): unit -> value, set once."""
        return f"{self.prefix}:exp:pre:{experiment}"

    def series(self, experiment: str) -> str:
        """The experiment's results over time: a hash, time bucket -> snapshot (any worker may write a bucket)."""
        return f"{self.prefix}:exp:series:{experiment}"

    def converted(self, experiment: str, variant: str, outcome: str) -> str:
        """The units of a variant that clicked or purchased (``outcome``) within their attribution window: a set."""
        return f"{self.prefix}:exp:converted:{experiment}:{variant}:{outcome}"


def escape_glob(pattern: str) -> str:
    """Escape glob characters so a key prefix matches literally in a SCAN pattern.

    >>> escape_glob("k:e:card:a*b")
    'k:e:card:a\\\\*b'
    """
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in pattern)
