"""An independent payment-history generator: fraud patterns designed without looking at Kestrel's features.

Genuine behaviour. Each card has a home region ("north", "south", ...; the CSV's ``region``), an activity rate
from a gamma law (a few very active cards, many quiet ones), a spend level from a three-part lognormal mixture
(everyday, comfortable, affluent) and a card-not-present propensity from a beta law. Merchants have a category
(grocery, fuel, restaurant, transit, pharmacy, electronics, fashion; online retail, digital goods, travel,
subscriptions, online electronics), each with its own amount scale and spread, and a merchant-specific scale
around it; physical merchants have 1-6 terminals in their region, online ones one virtual terminal. A payment's
amount is merchant scale x spend level^0.8 x lognormal noise, so amounts are heavy-tailed and depend on where
one pays. Volume has weekly seasonality (Friday/Saturday high, Sunday low) and a daily profile (morning, lunch and
evening peaks; weekends later), shifted per card by a personal offset. Card-present payments go 80% to the card's
few home terminals, the rest to other terminals in its region and a few anywhere; CNP payments go mostly to a
handful of favourite online merchants with the card's own device. Realistic confounders arise from the model,
not as labelled extras: cards replace their phone (a persistent new device) at a per-card hazard, 1% of CNP
payments come from a one-off browser, cards go on multi-day trips to another region (all card-present payments
there, at strange terminals), transit/parking payments are tiny, electronics/travel produce big tickets.

Fraud comes in campaigns (counts Poisson in the history length, at least one of each), five scenarios:
(a) terminal_compromise: a busy physical terminal (fuel pumps favoured) is skimmed for 7-28 days; 70% of cards
    paying there are copied, and from 5-12 days after the compromise began the dumps are cashed out: each
    copied card (60%) makes 1-6 card-present payments within hours, in one cash-out region per compromise, at
    electronics/fashion/grocery/pharmacy terminals it never used, with raised amounts. The compromised terminal's
    own payments stay genuine. Signals: a common point of compromise in the victims' recent history, region and
    terminal novelty (trips make this noisy), a short card-present burst.
(b) card_ramp: a compromised card (30% of them earlier hit by card testing) is worked by a ring that shares 1-2
    devices across its cards: 1-2 tiny test payments at digital merchants, then CNP payments growing by x1.35-2.0
    per step (capped at 3,000) at online retail/electronics/travel until the card is blocked (12% per step after
    the third) or the plan ends (4-12 steps), at hours of the fraudster's own timezone. Signals: a monotone amount
    ramp, a device new to the card and shared by other cards, new merchants, odd hours.
(c) cnp_ordinary: account takeover with a fresh device used by nobody else; 1-5 CNP payments over days, amounts
    resampled from the card's own past payments, at popular online merchants, at ordinary hours. Signals: only the
    new device and new merchants, which genuine phone changes and one-off browsers also show (deliberately hard).
(d) card_testing: a bot with 1-3 devices runs a leaked batch of 5-300 cards (from every region) through one small
    digital-goods/subscription merchant within 3-25 minutes, 1-3 attempts per card, amounts like 1.00, 0.99 or
    random under 3. Signals: a merchant/device-level spike of distinct cards, tiny amounts, one device, many cards.
(e) stolen_card: a lost/stolen physical card is used 2-7 times within hours in its own region at unfamiliar
    terminals, mostly just under a 50.00 contactless (no-PIN) limit; the victim's own card-present payments stop
    until the card is blocked and replaced 1-4 days later. Signals: velocity, new terminals, amounts under 50.

Deliberate differences from Kestrel's own simulator (as described to the author, who did not read it): there,
incidents start at ~0.2% of payments per hour with ~1% fraud each; here fraud is organised in campaigns of
hours (testing), days (ramps, takeovers) and weeks (terminal compromises), so the fraud rate is lumpy and
skimming links genuine payments to fraud much later and elsewhere. Kestrel adds "hard negatives" (genuine new
devices, trips, big tickets) as an option; here they are always on and come from the behaviour model itself
(device lifecycles, multi-day trips, category tails), and half the fraud (cash-outs, takeovers, stolen cards)
has no amount or device signal of its own. The overall fraud share is about 1% of payments.
Only numpy and the standard library; each day's genuine payments are drawn with vectorised numpy calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kestrel.offline.generators.files import scenario_counts, write_reproducibly

HEADER = "event_id,timestamp,card_id,merchant_id,terminal_id,amount,card_present,device_id,region,is_fraud,scenario"
REGIONS = ("north", "south", "east", "west", "central")
REGION_SHARE = (0.28, 0.24, 0.2, 0.16, 0.12)
SCENARIOS = ("", "terminal_compromise", "card_ramp", "cnp_ordinary", "card_testing", "stolen_card")
DAY = 86_400.0
# name: (share of merchants, median amount, log-sd, card-present)
CATEGORIES = {
    "grocery": (0.20, 34.0, 0.6, True), "fuel": (0.09, 45.0, 0.35, True), "restaurant": (0.13, 27.0, 0.55, True),
    "transit": (0.07, 3.2, 0.5, True), "pharmacy": (0.05, 17.0, 0.6, True), "electronics": (0.04, 170.0, 0.9, True),
    "fashion": (0.07, 58.0, 0.7, True), "online_retail": (0.14, 42.0, 0.8, False),
    "digital_goods": (0.09, 8.5, 0.8, False), "travel": (0.03, 240.0, 0.8, False),
    "subscriptions": (0.05, 11.0, 0.3, False), "online_electronics": (0.04, 150.0, 0.9, False),
}
CAT_NAMES = tuple(CATEGORIES)
WEEKDAY = np.array([0.96, 0.97, 0.99, 1.01, 1.12, 1.08, 0.87])  # Monday first
_H = np.array([0.2, 0.1, 0.08, 0.06, 0.08, 0.2, 0.6, 1.4, 2.0, 1.6, 1.5, 1.8,
               2.6, 2.2, 1.6, 1.5, 1.7, 2.1, 2.6, 2.4, 1.9, 1.3, 0.8, 0.4])
HOURS_WEEKDAY = _H / _H.sum()
_HW = np.roll(_H, 1) * np.where(np.arange(24) < 7, 1.5, 1.0)
HOURS_WEEKEND = _HW / _HW.sum()


@dataclass
class _Rows:
    """Payments as parallel arrays (time in seconds from the start; device -1: none; scenario 0: genuine)."""

    t: np.ndarray
    card: np.ndarray
    merchant: np.ndarray
    terminal: np.ndarray
    amount: np.ndarray
    cp: np.ndarray
    device: np.ndarray
    scenario: np.ndarray

    @staticmethod
    def concat(parts: list[_Rows]) -> _Rows:
        return _Rows(*(np.concatenate([getattr(p, f) for p in parts]) for f in _Rows.__dataclass_fields__))

    def take(self, idx: np.ndarray) -> _Rows:
        return _Rows(*(getattr(self, f)[idx] for f in _Rows.__dataclass_fields__))


def _rows(t, card, merchant, terminal, amount, cp, device, scenario) -> _Rows:
    n = len(t)

    def full(v, dt):
        return np.full(n, v, dt) if np.isscalar(v) else np.asarray(v, dt)

    return _Rows(np.asarray(t, float), full(card, np.int64), full(merchant, np.int64), full(terminal, np.int64),
                 np.asarray(amount, float), full(cp, np.int8), full(device, np.int64), full(scenario, np.int8))


class _World:
    """Cards, merchants, terminals and devices, with the per-card habits the genuine payments follow."""

    def __init__(self, rng: np.random.Generator, days: float, payments_per_day: float) -> None:
        self.rng, self.days, self.T = rng, days, days * DAY
        self.n_days = int(np.ceil(days))
        nc = self.n_cards = max(300, round(payments_per_day * 0.8))
        nm = max(60, round(payments_per_day * 0.06))
        self.region = rng.choice(len(REGIONS), nc, p=REGION_SHARE)
        self.activity = rng.gamma(0.9, 1.0, nc) + 0.02
        comp = rng.choice(3, nc, p=[0.7, 0.25, 0.05])
        self.spend = np.exp(np.array([-0.2, 0.5, 1.4])[comp] + np.array([0.45, 0.5, 0.6])[comp] * rng.normal(size=nc))
        self.cnp_share = rng.beta(1.5, 4.0, nc)
        self.hour_shift = rng.normal(0.0, 1.2, nc)
        # merchants and terminals
        shares = np.array([v[0] for v in CATEGORIES.values()])
        self.m_cat = rng.choice(len(CATEGORIES), nm, p=shares / shares.sum())
        cat_median = np.array([v[1] for v in CATEGORIES.values()])
        self.cat_sd = np.array([v[2] for v in CATEGORIES.values()])
        cat_cp = np.array([v[3] for v in CATEGORIES.values()])
        self.m_scale = cat_median[self.m_cat] * np.exp(rng.normal(0.0, 0.3, nm))
        self.m_cp = cat_cp[self.m_cat]
        self.m_region = rng.choice(len(REGIONS), nm, p=REGION_SHARE)
        self.m_pop = rng.gamma(0.8, 1.0, nm) + 0.05
        n_term = np.where(self.m_cp, rng.integers(1, 7, nm), 1)
        self.t_merchant = np.repeat(np.arange(nm), n_term)
        self.t_region = self.m_region[self.t_merchant]
        self.t_pop = self.m_pop[self.t_merchant] / n_term[self.t_merchant] * np.exp(rng.normal(0, 0.4, n_term.sum()))
        self.m_terminal = np.cumsum(n_term) - n_term  # the first (for online merchants the only) terminal
        cp_t = self.m_cp[self.t_merchant]
        self.cp_terms = {r: np.flatnonzero(cp_t & (self.t_region == r)) for r in range(len(REGIONS))}
        self.cp_terms_all = np.flatnonzero(cp_t)
        self.cnp_merchants = np.flatnonzero(~self.m_cp)
        # habits: home terminals (weighted by popularity, a favourite first) and favourite online merchants
        self.home_k = rng.integers(3, 11, nc)
        self.home = np.zeros((nc, 10), np.int64)
        for r, terms in self.cp_terms.items():
            cards = np.flatnonzero(self.region == r)
            self.home[cards] = rng.choice(terms, (len(cards), 10), p=self._p(self.t_pop[terms]))
        self.fav_online = rng.choice(self.cnp_merchants, (nc, 4), p=self._p(self.m_pop[self.cnp_merchants]))
        # devices: a phone, replaced at a per-card hazard; a second device for some cards
        self.n_devices = 0
        self.phone = self.new_devices(nc)
        self.phone_change_day = rng.exponential(300.0, nc)
        self.new_phone = self.new_devices(nc)
        self.second = np.where(rng.random(nc) < 0.3, self.new_devices(nc), -1)
        # trips: days away in another region
        self.trip_region = np.full((self.n_days, nc), -1, np.int64)
        for c in rng.choice(nc, rng.poisson(nc * days / 150.0), p=self._p(self.activity)):
            start, length = rng.integers(0, self.n_days), rng.integers(2, 9)
            self.trip_region[start:start + length, c] = (self.region[c] + rng.integers(1, len(REGIONS))) % 5

    @staticmethod
    def _p(w: np.ndarray) -> np.ndarray:
        return w / w.sum()

    def new_devices(self, n: int) -> np.ndarray:
        ids = np.arange(self.n_devices, self.n_devices + n)
        self.n_devices += n
        return ids

    def terminals_in(self, regions: np.ndarray, pool: dict[int, np.ndarray] | None = None) -> np.ndarray:
        """A popularity-weighted card-present terminal in each given region."""
        pool = self.cp_terms if pool is None else pool
        out = np.zeros(len(regions), np.int64)
        for r, terms in pool.items():
            idx = np.flatnonzero(regions == r)
            if len(idx) and len(terms):
                out[idx] = self.rng.choice(terms, len(idx), p=self._p(self.t_pop[terms]))
        return out

    def amount(self, merchant: np.ndarray, level: np.ndarray) -> np.ndarray:
        noise = np.exp(self.rng.normal(0.0, 1.0, len(merchant)) * self.cat_sd[self.m_cat[merchant]])
        return np.maximum(np.round(self.m_scale[merchant] * level ** 0.8 * noise, 2), 0.3)

    def day(self, d: int, per_day: float) -> _Rows:
        """One day of genuine payments, vectorised."""
        rng, nc = self.rng, self.n_cards
        weekday = d % 7
        n = rng.poisson(per_day * WEEKDAY[weekday] / WEEKDAY.mean() * min(1.0, self.days - d))
        card = rng.choice(nc, n, p=self._p(self.activity))
        hours = HOURS_WEEKEND if weekday >= 5 else HOURS_WEEKDAY
        hour = (rng.choice(24, n, p=hours) + rng.random(n) + self.hour_shift[card]) % 24
        t = d * DAY + hour * 3600.0
        cnp = rng.random(n) < self.cnp_share[card]
        trip = self.trip_region[d, card]
        # card present: home terminals, else the region (the trip's when away), else anywhere
        u = rng.random(n)
        slot = np.minimum((self.home_k[card] * rng.random(n) ** 1.7).astype(np.int64), self.home_k[card] - 1)
        terminal = self.home[card, slot]
        local = (trip < 0) & (u >= 0.8) & (u < 0.96)
        away = trip >= 0
        terminal[local] = self.terminals_in(self.region[card[local]])
        terminal[away] = self.terminals_in(trip[away])
        anywhere = (trip < 0) & (u >= 0.96)
        terminal[anywhere] = rng.choice(self.cp_terms_all, anywhere.sum(), p=self._p(self.t_pop[self.cp_terms_all]))
        merchant = self.t_merchant[terminal]
        # card not present: favourite online merchants, else any by popularity; own devices, rarely a one-off
        fav = rng.random(n) < 0.75
        online = np.where(fav, self.fav_online[card, rng.integers(0, 4, n)],
                          rng.choice(self.cnp_merchants, n, p=self._p(self.m_pop[self.cnp_merchants])))
        merchant = np.where(cnp, online, merchant)
        terminal = np.where(cnp, self.m_terminal[merchant], terminal)
        phone = np.where(d >= self.phone_change_day[card], self.new_phone[card], self.phone[card])
        second = self.second[card]
        device = np.where((second >= 0) & (rng.random(n) < 0.25), second, phone)
        one_off = cnp & (rng.random(n) < 0.01)
        device[one_off] = self.new_devices(int(one_off.sum()))
        device = np.where(cnp, device, -1)
        return _rows(t, card, merchant, terminal, self.amount(merchant, self.spend[card]), ~cnp, device, 0)


def _count(rng: np.random.Generator, mean: float) -> int:
    return max(1, int(rng.poisson(mean)))


def _terminal_compromises(w: _World, genuine: _Rows, scale: float) -> list[_Rows]:
    rng, out = w.rng, []
    cat = w.m_cat[w.t_merchant]
    traffic = np.bincount(genuine.terminal[genuine.cp == 1], minlength=len(w.t_merchant)).astype(float)
    weight = traffic * np.where(cat == CAT_NAMES.index("fuel"), 3.0, 1.0)
    targets = {CAT_NAMES.index(c) for c in ("electronics", "fashion", "grocery", "pharmacy")}
    cashout_pool = {r: t[np.isin(cat[t], list(targets))] for r, t in w.cp_terms.items()}
    for _ in range(_count(rng, 0.09 * scale * w.days)):
        term = rng.choice(len(weight), p=w._p(weight))
        start = rng.uniform(0.0, max(w.T - 7 * DAY, 1.0) * 0.8)
        end = start + rng.uniform(7, 28) * DAY
        hit = np.flatnonzero((genuine.terminal == term) & (genuine.t >= start) & (genuine.t < end))
        cards, first = np.unique(genuine.card[hit], return_index=True)
        skim_t = genuine.t[hit][first]
        keep = rng.random(len(cards)) < 0.7 * 0.6
        cards, skim_t = cards[keep], skim_t[keep]
        sell = start + rng.uniform(5, 12) * DAY
        region = rng.integers(0, len(REGIONS))
        for c, ts in zip(cards, skim_t, strict=True):
            t0 = max(ts + DAY, sell + rng.exponential(3 * DAY))
            t0 = np.floor(t0 / DAY) * DAY + rng.uniform(9, 20) * 3600
            k = rng.integers(1, 7)
            t = t0 + np.cumsum(rng.exponential(1800.0, k))
            term_k = w.terminals_in(np.full(k, region), cashout_pool)
            merch = w.t_merchant[term_k]
            amt = np.round(w.m_scale[merch] * np.exp(rng.normal(0.7, 0.5, k)), 2)
            out.append(_rows(t, c, merch, term_k, amt, 1, -1, 1))
    return out


def _card_testing(w: _World, scale: float) -> tuple[list[_Rows], list[tuple[int, float]]]:
    rng, out, tested = w.rng, [], []
    small = np.isin(w.m_cat, [CAT_NAMES.index("digital_goods"), CAT_NAMES.index("subscriptions")])
    testers = np.flatnonzero(small)
    for _ in range(_count(rng, 0.35 * scale * w.days)):
        merch = rng.choice(testers)
        start, length = rng.uniform(0.0, w.T - 3600), rng.uniform(3, 25) * 60
        median = 30.0 * min(1.0, scale) ** 0.5  # a small bank sees smaller slices of a leaked batch
        n_cards = int(np.clip(np.round(np.exp(rng.normal(np.log(median), 0.6))), 5, min(300, w.n_cards // 20)))
        cards = rng.choice(w.n_cards, n_cards, replace=False)
        tries = np.repeat(cards, rng.choice([1, 2, 3], n_cards, p=[0.8, 0.15, 0.05]))
        k = len(tries)
        bots = w.new_devices(rng.integers(1, 4))
        fixed = rng.choice([1.0, 0.99, 2.0, 0.5, 1.5], k)
        amt = np.where(rng.random(k) < 0.5, fixed, np.round(rng.uniform(0.5, 3.0, k), 2))
        t = np.sort(start + rng.uniform(0.0, length, k))
        out.append(_rows(t, tries, merch, w.m_terminal[merch], amt, 0, rng.choice(bots, k), 4))
        tested += [(int(c), start + length) for c in cards]
    return out, tested


def _card_ramps(w: _World, scale: float, tested: list[tuple[int, float]]) -> list[_Rows]:
    rng, out = w.rng, []
    cat = w.m_cat
    tiny = np.flatnonzero(np.isin(cat, [CAT_NAMES.index(c) for c in ("digital_goods", "subscriptions")]))
    big = np.flatnonzero(np.isin(cat, [CAT_NAMES.index(c) for c in ("online_retail", "online_electronics", "travel")]))
    n = _count(rng, 1.5 * scale * w.days)
    rings = [w.new_devices(rng.integers(1, 3)) for _ in range(max(1, n // 4))]
    for _ in range(n):
        if tested and rng.random() < 0.3:
            card, after = tested[rng.integers(len(tested))]
            start = after + rng.uniform(0.5, 7) * DAY
        else:
            card, start = int(rng.integers(w.n_cards)), rng.uniform(0.0, w.T)
        steps, n_test = rng.integers(4, 13), rng.integers(1, 3)
        amounts = list(np.round(rng.uniform(0.5, 4.0, n_test), 2))
        a0, g = rng.uniform(8, 25), rng.uniform(1.35, 2.0)
        for i in range(steps - n_test):
            if i >= 3 and rng.random() < 0.12:
                break
            amounts.append(round(min(a0 * g ** i * float(np.exp(rng.normal(0, 0.1))), 3000.0), 2))
        k = len(amounts)
        gaps = np.where(np.arange(k) <= n_test, rng.exponential(600.0, k), rng.exponential(4 * 3600.0, k))
        t = start + np.cumsum(gaps)
        merch = np.where(np.arange(k) < n_test, rng.choice(tiny, k), rng.choice(big, k))
        ring = rings[rng.integers(len(rings))]
        out.append(_rows(t, card, merch, w.m_terminal[merch], amounts, 0, rng.choice(ring, k), 2))
    return out


def _cnp_ordinary(w: _World, genuine: _Rows, scale: float) -> list[_Rows]:
    rng, out = w.rng, []
    order = np.argsort(genuine.card, kind="stable")
    bounds = np.searchsorted(genuine.card[order], np.arange(w.n_cards + 1))
    pop = w._p(w.m_pop[w.cnp_merchants])
    for _ in range(_count(rng, 2.5 * scale * w.days)):
        card = int(rng.choice(w.n_cards, p=w._p(w.activity)))
        k = rng.integers(1, 6)
        lo, hi = bounds[card], bounds[card + 1]
        merch = rng.choice(w.cnp_merchants, k, p=pop)
        if hi > lo:
            amt = genuine.amount[order[rng.integers(lo, hi, k)]] * np.exp(rng.normal(0, 0.08, k))
        else:
            amt = w.amount(merch, np.full(k, w.spend[card]))
        day = np.floor(rng.uniform(0, w.days) + np.cumsum(rng.exponential(1.5, k)))
        t = day * DAY + (rng.choice(24, k, p=HOURS_WEEKDAY) + rng.random(k)) * 3600
        out.append(_rows(t, card, merch, w.m_terminal[merch], np.round(np.maximum(amt, 0.3), 2), 0,
                         w.new_devices(1)[0], 3))
    return out


def _stolen_cards(w: _World, scale: float) -> tuple[list[_Rows], list[tuple[int, float, float]]]:
    rng, out, blocked = w.rng, [], []
    for _ in range(_count(rng, 1.0 * scale * w.days)):
        card = int(rng.choice(w.n_cards, p=w._p(w.activity)))
        theft = np.floor(rng.uniform(0, w.days)) * DAY + rng.uniform(8, 22) * 3600
        k = rng.integers(2, 8)
        t = theft + np.cumsum(rng.exponential(25 * 60.0, k))
        term = w.terminals_in(np.full(k, w.region[card]))
        merch = w.t_merchant[term]
        high = np.round(w.m_scale[merch] * np.exp(rng.normal(0.5, 0.5, k)), 2)
        amt = np.where(rng.random(k) < 0.75, np.round(rng.uniform(12.0, 49.99, k), 2), high)
        out.append(_rows(t, card, merch, term, amt, 1, -1, 5))
        blocked.append((card, theft, theft + rng.uniform(1, 4) * DAY))
    return out, blocked


def generate(days: float, payments_per_day: float = 5000.0, seed: int = 7,
             fraud_scale: float = 1.0) -> tuple[_Rows, np.ndarray]:
    """All payments, genuine and fraud, time-ordered, and each card's region index.

    ``fraud_scale`` multiplies every campaign's expected count.
    """
    rng = np.random.default_rng(seed)
    w = _World(rng, days, payments_per_day)
    genuine = _Rows.concat([w.day(d, payments_per_day) for d in range(w.n_days)])
    scale = payments_per_day / 5000.0 * fraud_scale
    testing, tested = _card_testing(w, scale)
    stolen, blocked = _stolen_cards(w, scale)
    parts = [*_terminal_compromises(w, genuine, scale), *_card_ramps(w, scale, tested),
             *_cnp_ordinary(w, genuine, scale), *testing, *stolen]
    drop = np.zeros(len(genuine.t), bool)
    for card, since, until in blocked:  # the victim has no card to present until it is replaced
        drop |= (genuine.card == card) & (genuine.cp == 1) & (genuine.t >= since) & (genuine.t < until)
    rows = _Rows.concat([genuine.take(np.flatnonzero(~drop)), *parts])
    rows = rows.take(np.flatnonzero((rows.t >= 0) & (rows.t < w.T)))
    return rows.take(np.argsort(rows.t, kind="stable")), w.region


def _csv_text(rows: _Rows, card_region: np.ndarray, start: str) -> str:
    stamps = np.datetime_as_string(np.datetime64(start, "s") + rows.t.astype("timedelta64[s]"), unit="s")
    region = np.array(REGIONS)[card_region[rows.card]]
    lines = [HEADER]
    for i, (ts, c, m, te, a, cp, dv, rg, sc) in enumerate(zip(
            stamps.tolist(), rows.card.tolist(), rows.merchant.tolist(), rows.terminal.tolist(),
            rows.amount.tolist(), rows.cp.tolist(), rows.device.tolist(), region.tolist(), rows.scenario.tolist(),
            strict=True)):
        dev = f"d_{dv}" if dv >= 0 else ""
        lines.append(f"ix{i:08d},{ts}+00:00,card_{c},m_{m},t_{te},{a:.2f},{cp},{dev},{rg},{int(sc > 0)},"
                     f"{SCENARIOS[sc]}")
    return "\n".join(lines) + "\n"


def write_history(path: str, days: float, payments_per_day: float = 5000.0, seed: int = 7,
                  **options: object) -> dict[str, int]:
    """Write ``days`` of payments to a CSV (gzip when ``path`` ends with .gz); counts of payments and frauds.

    Options: ``start`` (ISO date of the first day, default 2024-03-04, a Monday) and ``fraud_scale``
    (multiplies the campaign counts, default 1.0). The file is byte-identical for the same arguments.
    """
    start = str(options.pop("start", "2024-03-04"))
    fraud_scale = float(options.pop("fraud_scale", 1.0))  # type: ignore[arg-type]
    if options:
        raise TypeError(f"unknown options for the independent generator: {sorted(options)}")
    if days <= 0 or payments_per_day <= 0:
        raise ValueError("days and payments_per_day must be positive")
    rows, card_region = generate(days, payments_per_day, seed, fraud_scale)
    write_reproducibly(path, _csv_text(rows, card_region, start))
    return scenario_counts(rows.scenario, SCENARIOS)
