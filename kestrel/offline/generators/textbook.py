"""A third payment-history generator, on the design of the textbook card-fraud simulator.

Why: Kestrel's own simulator and the independent generator were both written
in this project. Practitioners' teaching material uses a simpler, public
design: customers and terminals on a map, a few fixed fraud scenarios. Its
structure is not Kestrel's. Risk sits in terminals that stay compromised for
weeks and in customers whose amounts are scaled, and very little in
velocity, devices or card testing. A model that only works on our two
generators shows up here. The design below was written down before anything
was measured on it, and no parameter was changed after.

Genuine behaviour. Customers and terminals sit at uniform random points of a
100 x 100 map. A customer pays only at the terminals within radius 5 of
itself, uniformly among them; a customer with none in reach never pays.
Each customer has a mean amount drawn uniform on [5, 100] and a spread of
half that mean. A day's payment count is Poisson with the customer's own
rate, drawn uniform on [0, 4]. A payment's time is normal around noon with
a standard deviation of 20,000 s, and times outside the day are dropped. An
amount is normal(mean, spread), and negative draws are redrawn as uniform
on [0, 2 x mean]. There is no device and no card-not-present channel. A
terminal is its own merchant. The region is the map quadrant.

Fraud, three scenarios; a payment is fraud when any applies:
1. A large amount: every payment above 220 is fraud (a rule the models must
   learn from the amount alone).
2. A compromised terminal: each day, 2 random terminals per 5,000 customers
   are compromised, and every payment at them in the next 28 days is fraud.
   Only a terminal's fraud history shows this, and that history becomes
   known only after the label delay.
3. A compromised customer: each day, 3 random customers per 5,000 are
   compromised. For the next 14 days, a third of their payments (chosen at
   random) are multiplied by 5 and are fraud. The signal is spending far
   above the customer's own normal.

Only numpy and the standard library. The same arguments give a
byte-identical file.
"""

from __future__ import annotations

import numpy as np

from kestrel.offline.generators.files import scenario_counts, write_reproducibly

DAY = 86400
HEADER = "event_id,timestamp,card_id,merchant_id,terminal_id,amount,card_present,device_id,region,is_fraud,scenario"
SCENARIOS = ("", "large_amount", "compromised_terminal", "compromised_customer")
REGIONS = ("south_west", "south_east", "north_west", "north_east")
RADIUS, MAP = 5.0, 100.0


def generate(days: int, payments_per_day: float = 5000.0, seed: int = 7) -> dict[str, np.ndarray]:
    """Columns of the history in time order: t (seconds from the start), customer, terminal, amount, scenario."""
    rng = np.random.default_rng(seed)
    n_customers = max(int(payments_per_day / 2), 10)  # the mean daily rate is 2
    n_terminals = 2 * n_customers
    cust_xy = rng.uniform(0, MAP, (n_customers, 2)).astype(np.float32)
    term_xy = rng.uniform(0, MAP, (n_terminals, 2)).astype(np.float32)
    mean = rng.uniform(5, 100, n_customers)
    spread = mean / 2
    rate = rng.uniform(0, 4, n_customers)
    reach = [np.flatnonzero(((term_xy - xy) ** 2).sum(axis=1) < RADIUS ** 2) for xy in cust_xy]

    t_parts, c_parts = [], []
    for day in range(days):
        counts = rng.poisson(rate)
        customers = np.repeat(np.arange(n_customers), counts)
        times = rng.normal(DAY / 2, 20_000, len(customers))
        keep = (times >= 0) & (times < DAY)
        t_parts.append(day * DAY + times[keep])
        c_parts.append(customers[keep])
    t, customer = np.concatenate(t_parts), np.concatenate(c_parts)
    has_reach = np.array([len(r) > 0 for r in reach])[customer]
    t, customer = t[has_reach], customer[has_reach]
    pick = rng.random(len(customer))
    terminal = np.array([reach[c][int(p * len(reach[c]))] for c, p in zip(customer.tolist(), pick.tolist(),
                                                                           strict=True)], dtype=np.int64)
    amount = rng.normal(mean[customer], spread[customer])
    negative = amount < 0
    amount[negative] = rng.uniform(0, 2 * mean[customer[negative]])

    scenario = np.zeros(len(t), dtype=np.int8)
    day_of = (t // DAY).astype(np.int64)
    scale = n_customers / 5000
    for day in range(days):  # scenario 2: compromised terminals, 28 days each
        hit = rng.choice(n_terminals, size=max(1, round(2 * scale)), replace=False)
        scenario[np.isin(terminal, hit) & (day_of >= day) & (day_of < day + 28) & (scenario == 0)] = 2
    for day in range(days):  # scenario 3: compromised customers, 14 days each, a third of their payments
        hit = rng.choice(n_customers, size=max(1, round(3 * scale)), replace=False)
        rows = np.flatnonzero(np.isin(customer, hit) & (day_of >= day) & (day_of < day + 14))
        rows = rows[rng.random(len(rows)) < 1 / 3]
        fresh = rows[scenario[rows] == 0]
        amount[fresh] *= 5
        scenario[fresh] = 3
    scenario[(amount > 220) & (scenario == 0)] = 1  # scenario 1 last: its rule holds on the final amounts

    order = np.argsort(t, kind="stable")
    quadrant = (cust_xy[:, 0] >= MAP / 2).astype(int) + 2 * (cust_xy[:, 1] >= MAP / 2).astype(int)
    return {"t": t[order], "customer": customer[order], "terminal": terminal[order],
            "amount": np.round(amount[order], 2), "scenario": scenario[order], "region": quadrant[customer[order]]}


def _csv_text(cols: dict[str, np.ndarray], start: str) -> str:
    stamps = np.datetime_as_string(np.datetime64(start, "s") + cols["t"].astype("timedelta64[s]"), unit="s")
    lines = [HEADER]
    for i, (ts, c, te, a, rg, sc) in enumerate(zip(stamps.tolist(), cols["customer"].tolist(),
                                                    cols["terminal"].tolist(), cols["amount"].tolist(),
                                                    cols["region"].tolist(), cols["scenario"].tolist(), strict=True)):
        lines.append(f"tb{i:08d},{ts}+00:00,cust_{c},m_{te},t_{te},{a:.2f},1,,{REGIONS[rg]},{int(sc > 0)},"
                     f"{SCENARIOS[sc]}")
    return "\n".join(lines) + "\n"


def write_history(path: str, days: float, payments_per_day: float = 5000.0, seed: int = 7,
                  start: str = "2024-03-04") -> dict[str, int]:
    """Write whole ``days`` of payments to a CSV (gzip when ``path`` ends with .gz); counts per scenario."""
    if days <= 0 or payments_per_day <= 0:
        raise ValueError("days and payments_per_day must be positive")
    cols = generate(int(np.ceil(days)), payments_per_day, seed)
    write_reproducibly(path, _csv_text(cols, start))
    return scenario_counts(cols["scenario"], SCENARIOS)
