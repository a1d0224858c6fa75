"""A seeded, reproducible simulator of shoppers and card holders.

Shoppers have latent tastes over item categories; whether they click depends
on that affinity (so a personalised recommender can measurably beat
popularity). Card holders spend normally around their own habits; fraud is
injected as four scenarios (compromised card spree, compromised terminal,
card-testing bursts, unusually large amounts) and its ground truth arrives
later as ``label`` events, after a configurable delay.

Output is wire-level :class:`SimRecord` objects, so the same stream can carry
deliberately malformed events to exercise the dead-letter path.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import numpy as np
import orjson

from kestrel.feature_store.schemas import Interaction, Label, Transaction
from kestrel.feature_store.topics import INTERACTIONS, LABELS, TRANSACTIONS

FRAUD_SCENARIOS = ("card_spree", "terminal_compromise", "card_testing", "large_amount")
# Not in the default mix: a pattern a model trained on the default mix has never seen (new device, card
# not present, ordinary amounts, at night), used to test that the online learner picks it up from labels.
EXTRA_SCENARIOS = ("account_takeover",)
INVALID_KINDS = ("bad_json", "missing_field", "wrong_type", "negative_amount", "unknown_kind", "oversized")


@dataclass(frozen=True)
class SimConfig:
    seed: int = 7
    start: float = 1_767_225_600.0  # 2026-01-01T00:00:00Z
    events_per_sim_second: float = 2.0
    transaction_share: float = 0.75
    n_users: int = 1000
    n_items: int = 2000
    n_categories: int = 20
    taste_concentration: float = 0.25
    n_cards: int = 2000
    n_merchants: int = 300
    terminals_per_merchant: int = 2
    fraud_incidents_per_sim_hour: float = 10.0
    label_delay_s: float = 3600.0
    genuine_label_share: float = 0.02
    scenarios: tuple[str, ...] = FRAUD_SCENARIOS
    night_fraud_share: float = 0.6  # share of sprees / large amounts moved to the night (00:00-05:00 UTC)
    # Genuine behaviour that looks like fraud on one input alone (the hard negatives of real traffic); off by
    # default (see HARD_NEGATIVES), and when off the stream is exactly what it was without these fields:
    genuine_new_device_share: float = 0.0  # an online payment from a device the card never used (a new phone)
    trip_share: float = 0.0  # a payment that starts a 1-3 day trip: payments at unfamiliar merchants
    big_ticket_share: float = 0.0  # a purchase 5-20x the card's usual amount (a flight, a sofa)
    invalid_share: float = 0.0
    max_event_bytes: int = 64 * 1024


@dataclass(frozen=True, slots=True)
class SimRecord:
    """One message as it goes on the wire, plus the ground truth the test harness needs."""

    topic: str
    key: bytes
    value: bytes
    event_id: str
    time: float
    valid: bool = True
    kind: str = "event"  # transaction | interaction | label | invalid:<why>
    fraud: bool = False
    scenario: str | None = None
    event: Transaction | Interaction | Label | None = None


@dataclass
class _Card:
    mean_amount: float
    merchants: np.ndarray
    devices: list[str]
    away_until: float = 0.0  # travelling until then: shops mostly at merchants it does not use at home


@dataclass(order=True)
class _Pending:
    time: float
    seq: int
    record: SimRecord = field(compare=False)


class Simulator:
    """Generates an endless, time-ordered event stream (``records()``)."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = c = config or SimConfig()
        self.rng = np.random.default_rng(c.seed)
        rng = self.rng
        self.item_category = rng.integers(0, c.n_categories, c.n_items)
        self.item_quality = rng.normal(0.0, 0.5, c.n_items)
        self.items_by_category = [np.flatnonzero(self.item_category == k) for k in range(c.n_categories)]
        self.user_taste = rng.dirichlet(np.full(c.n_categories, c.taste_concentration), c.n_users)
        self.user_activity = rng.pareto(1.5, c.n_users) + 1.0
        self.user_activity /= self.user_activity.sum()
        self.cards = [
            _Card(float(np.exp(rng.normal(3.6, 0.7))), rng.integers(0, c.n_merchants, int(rng.integers(3, 12))),
                  [f"dev_{i:06d}_{j}" for j in range(int(rng.integers(1, 3)))])
            for i in range(c.n_cards)
        ]
        self.card_activity = rng.pareto(2.0, c.n_cards) + 1.0
        self.card_activity /= self.card_activity.sum()
        self.n_terminals = c.n_merchants * c.terminals_per_merchant
        self.now = c.start
        self._seq = 0
        self._pending: list[_Pending] = []  # future events: fraud follow-ups and labels
        self.compromised_terminals: dict[int, float] = {}  # terminal -> compromised until

    # -- public API ----------------------------------------------------------
    def records(self) -> Iterator[SimRecord]:
        c = self.config
        while True:
            self.now += float(self.rng.exponential(1.0 / c.events_per_sim_second))
            while self._pending and self._pending[0].time <= self.now:
                yield heapq.heappop(self._pending).record
            if self.rng.random() < c.invalid_share:
                yield self._invalid()
                continue
            if self.rng.random() < c.fraud_incidents_per_sim_hour / 3600.0 / c.events_per_sim_second:
                self._start_incident()
            if self.rng.random() < c.transaction_share:
                yield self._transaction()
            else:
                yield from self._session()

    def click_probability(self, user: int, item: int) -> float:
        """Chance that ``user`` clicks ``item`` when shown it: taste for its category and quality."""
        affinity = self.user_taste[user, self.item_category[item]] * self.config.n_categories
        return 1.0 / (1.0 + math.exp(-(1.2 * math.log(affinity + 1e-3) + 0.5 * self.item_quality[item] - 1.5)))

    @staticmethod
    def user_index(user_id: str) -> int:
        return int(user_id.split("_")[1])

    @staticmethod
    def item_index(item_id: str) -> int:
        return int(item_id.split("_")[1])

    # -- shoppers ------------------------------------------------------------
    def _session(self) -> Iterator[SimRecord]:
        rng, c = self.rng, self.config
        user = int(rng.choice(c.n_users, p=self.user_activity))
        category = int(rng.choice(c.n_categories, p=self.user_taste[user]))
        pool = self.items_by_category[category]
        if pool.size == 0:
            return
        weights = np.exp(self.item_quality[pool])
        for _ in range(int(rng.integers(1, 4))):
            item = int(rng.choice(pool, p=weights / weights.sum()))
            yield self._interaction(user, item, "view")
            if rng.random() < self.click_probability(user, item):
                yield self._interaction(user, item, "click")
                if rng.random() < 0.3:
                    yield self._interaction(user, item, "add_to_cart")
                    if rng.random() < 0.5:
                        yield self._interaction(user, item, "purchase")

    def _interaction(self, user: int, item: int, kind: str) -> SimRecord:
        self.now += 0.001
        ev = Interaction(event_id=self._id("i"), user_id=f"user_{user}", item_id=f"item_{item}", kind=kind,
                         timestamp=_dt(self.now), context={"category": int(self.item_category[item])})
        return SimRecord(INTERACTIONS, ev.user_id.encode(), _json(ev), ev.event_id, self.now, kind="interaction",
                         event=ev)

    # -- card holders ----------------------------------------------------------
    def _transaction(self, card: int | None = None, amount: float | None = None, terminal: int | None = None,
                     scenario: str | None = None, at: float | None = None, device: str | None = None) -> SimRecord:
        rng, c = self.rng, self.config
        if card is None:
            card = int(rng.choice(c.n_cards, p=self.card_activity))
        holder = self.cards[card]
        t = self.now if at is None else at
        genuine = scenario is None and amount is None
        if genuine and c.trip_share and rng.random() < c.trip_share:
            holder.away_until = t + float(rng.uniform(1, 3)) * 86400
        if terminal is None:
            home = rng.random() < (0.85 if holder.away_until <= t else 0.1)
            merchant = int(rng.choice(holder.merchants)) if home else int(rng.integers(c.n_merchants))
            terminal = merchant * c.terminals_per_merchant + int(rng.integers(c.terminals_per_merchant))
        merchant = terminal // c.terminals_per_merchant
        if amount is None:
            amount = float(np.exp(rng.normal(math.log(holder.mean_amount), 0.5)))
            if c.big_ticket_share and rng.random() < c.big_ticket_share:
                amount *= float(rng.uniform(5, 20))
        if scenario is None and self.compromised_terminals.get(terminal, 0.0) > t and rng.random() < 0.5:
            scenario, amount = "terminal_compromise", amount * float(rng.uniform(1.5, 3.0))
        present = bool(rng.random() < 0.6) if device is None else False
        if device is None and not present:
            if genuine and c.genuine_new_device_share and rng.random() < c.genuine_new_device_share:
                holder.devices.append(f"dev_{card:06d}_{len(holder.devices)}")
                device = holder.devices[-1]
            else:
                device = holder.devices[int(rng.integers(len(holder.devices)))]
        ev = Transaction(event_id=self._id("t"), card_id=f"card_{card:06d}", customer_id=f"cust_{card:06d}",
                         merchant_id=f"merchant_{merchant}", terminal_id=f"term_{terminal}",
                         amount=round(amount, 2), currency="EUR", timestamp=_dt(t),
                         card_present=present, device_id=device)
        fraud = scenario is not None
        if fraud or rng.random() < c.genuine_label_share:
            self._label_later(ev, fraud)
        return SimRecord(TRANSACTIONS, ev.card_id.encode(), _json(ev), ev.event_id, t, kind="transaction",
                         fraud=fraud, scenario=scenario, event=ev)

    def _start_incident(self) -> None:
        rng, c = self.rng, self.config
        scenario = c.scenarios[int(rng.integers(len(c.scenarios)))]
        card = int(rng.integers(c.n_cards))
        mean = self.cards[card].mean_amount
        start = self._night_after(self.now) if rng.random() < c.night_fraud_share else self.now
        if scenario == "card_spree":
            t = start
            device = f"dev_fraud_{self._id('d')}" if rng.random() < 0.5 else None  # card details online, or a clone
            for _ in range(int(rng.integers(4, 12))):
                t += float(rng.exponential(120.0))
                terminal = int(rng.integers(self.n_terminals))
                self._later(self._transaction(card, mean * float(rng.uniform(2, 6)), terminal, scenario, t, device))
        elif scenario == "card_testing":
            t = self.now
            terminal = int(rng.integers(self.n_terminals))
            device = f"dev_fraud_{self._id('d')}"
            for _ in range(int(rng.integers(4, 9))):
                t += float(rng.exponential(20.0))
                self._later(self._transaction(card, float(rng.uniform(0.5, 2.5)), terminal, scenario, t, device))
            t += float(rng.exponential(300.0))
            self._later(self._transaction(card, mean * float(rng.uniform(5, 15)), None, scenario, t))
        elif scenario == "large_amount":
            self._later(self._transaction(card, mean * float(rng.uniform(10, 30)), None, scenario,
                                          start + float(rng.exponential(60.0))))
        elif scenario == "account_takeover":
            t, device = self._night_after(self.now), f"dev_ato_{self._id('d')}"
            for _ in range(int(rng.integers(2, 5))):
                t += float(rng.exponential(600.0))
                self._later(self._transaction(card, mean * float(rng.uniform(0.7, 1.6)), None, scenario, t, device))
        else:
            terminal = int(rng.integers(self.n_terminals))
            self.compromised_terminals[terminal] = self.now + float(rng.uniform(1, 4)) * 3600

    def _night_after(self, t: float) -> float:
        """A random moment of the next night (00:00-05:00 UTC) at or after ``t``."""
        day = math.floor(t / 86400) * 86400
        night = day + float(self.rng.uniform(0, 5 * 3600))
        return night if night >= t else night + 86400

    def _label_later(self, txn: Transaction, fraud: bool) -> None:
        c = self.config
        at = txn.epoch_s + c.label_delay_s * float(self.rng.uniform(0.5, 1.5))
        ev = Label(event_id=self._id("l"), transaction_id=txn.event_id, verdict="fraud" if fraud else "genuine",
                   source="chargeback" if fraud else "analyst", card_id=txn.card_id, timestamp=_dt(at))
        self._later(SimRecord(LABELS, txn.card_id.encode(), _json(ev), ev.event_id, at, kind="label", event=ev))

    def _later(self, record: SimRecord) -> None:
        self._seq += 1
        heapq.heappush(self._pending, _Pending(record.time, self._seq, record))

    # -- malformed input -------------------------------------------------------
    def _invalid(self) -> SimRecord:
        rng = self.rng
        why = INVALID_KINDS[int(rng.integers(len(INVALID_KINDS)))]
        event_id = self._id("x")
        base = {"event_id": event_id, "card_id": "card_000001", "merchant_id": "merchant_1", "amount": 12.5,
                "currency": "EUR", "timestamp": _dt(self.now).isoformat()}
        topic = TRANSACTIONS
        if why == "bad_json":
            value = orjson.dumps(base)[:-7]
        elif why == "missing_field":
            value = orjson.dumps({k: v for k, v in base.items() if k != "merchant_id"})
        elif why == "wrong_type":
            value = orjson.dumps({**base, "amount": "twelve"})
        elif why == "negative_amount":
            value = orjson.dumps({**base, "amount": -12.5})
        elif why == "unknown_kind":
            topic = INTERACTIONS
            value = orjson.dumps({"event_id": event_id, "user_id": "user_1", "item_id": "item_1", "kind": "like",
                                  "timestamp": base["timestamp"]})
        else:
            value = orjson.dumps({**base, "ip": "x" * (self.config.max_event_bytes + 1)})
        return SimRecord(topic, b"card_000001", value, event_id, self.now, valid=False, kind=f"invalid:{why}")

    def _id(self, prefix: str) -> str:
        self._seq += 1
        return f"{prefix}{self.config.seed}-{self._seq:010d}"


def _dt(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def _json(ev: Transaction | Interaction | Label) -> bytes:
    return orjson.dumps(ev.model_dump(mode="json", exclude_none=True))


REGIONS = ("north", "south", "east", "west")
HISTORY_COLUMNS = ("event_id", "timestamp", "card_id", "merchant_id", "terminal_id", "amount", "card_present",
                   "device_id", "region", "is_fraud", "scenario")


# Genuine customers who change phones, travel and buy big once in a while (``--hard-negatives``): a new device,
# an unfamiliar terminal or a large amount alone no longer marks fraud; their combination still does.
HARD_NEGATIVES = {"genuine_new_device_share": 0.03, "trip_share": 0.004, "big_ticket_share": 0.005}


def payments_config(payments_per_day: float, seed: int = 7, scenarios: tuple[str, ...] = FRAUD_SCENARIOS,
                    n_cards: int = 2000, hard_negatives: bool = False) -> SimConfig:
    """Payments only, at a daily volume; fraud incidents scale with it (fraud stays near 1% of payments)."""
    per_s = payments_per_day / 86400.0
    return SimConfig(seed=seed, events_per_sim_second=per_s, transaction_share=1.0, n_cards=n_cards,
                     fraud_incidents_per_sim_hour=per_s * 3600 * 0.00185, scenarios=scenarios,
                     **(HARD_NEGATIVES if hard_negatives else {}))


def write_history(path: str, days: float, payments_per_day: float = 5000.0, seed: int = 7,
                  scenarios: tuple[str, ...] = FRAUD_SCENARIOS, n_cards: int = 2000,
                  emerging_after_days: float | None = None, hard_negatives: bool = False) -> dict[str, int]:
    """Write ``days`` of simulated payments with their ground truth to a CSV (gzip when ``path`` ends in .gz).

    Fraud incidents scale with the payment rate, so fraud stays near 1% of
    payments whatever the volume. ``region`` is a segment column (from the
    card) for the fairness report of ``kestrel eval fraud``. With
    ``emerging_after_days``, fraudsters add the :data:`EXTRA_SCENARIOS` from
    that day on: a pattern absent from earlier (training) data.
    """
    import csv
    import gzip

    config = payments_config(payments_per_day, seed, scenarios, n_cards, hard_negatives)
    sim = Simulator(config)
    end = config.start + days * 86400.0
    emerge_at = end if emerging_after_days is None else config.start + emerging_after_days * 86400.0
    counts = {"payments": 0, "frauds": 0}
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wt", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(HISTORY_COLUMNS)
        for rec in sim.records():
            if rec.time >= end:
                break
            if rec.time >= emerge_at and sim.config.scenarios == scenarios:
                sim.config = replace(sim.config, scenarios=scenarios + EXTRA_SCENARIOS)
            if rec.kind != "transaction":
                continue
            e = rec.event
            assert isinstance(e, Transaction)
            card = int(e.card_id.split("_")[1])
            out.writerow((e.event_id, e.timestamp.isoformat(), e.card_id, e.merchant_id, e.terminal_id, e.amount,
                          int(bool(e.card_present)), e.device_id or "", REGIONS[card % len(REGIONS)], int(rec.fraud),
                          rec.scenario or ""))
            counts["payments"] += 1
            counts["frauds"] += rec.fraud
    return counts
