"""Which tree members to blend with the fraud network, judged on validation windows only (never test weeks).

    .venv/bin/python bench/fraud_members.py --out runs/members --sources textbook independent hard --seeds 101

For each source and development seed (not a seed of the reported tables) it
simulates the history ``bench/fraud_quality.py`` would, cuts the same
training window (``kestrel.offline.fraud_eval.replay_windows``, 7 days), and
splits it 80/20 in time as ``fit_fraud_model`` does. On the last 20% it
reports each candidate's AP after Platt calibration (fitted there, as
training does): the network (5 members), the boosted trees Kestrel ships,
several random forests and extra trees (the textbook's forest also as the
worker's node walk would serve it, by mean leaf log-odds), and the
equal-weight blends of the
network with one or two tree members, each with the paired AP gain over
the shipped blend (network + boosted trees; bootstrap by card). A candidate
that is not ahead of the shipped blend beyond noise on every source does not
replace it (docs/fraud.md, 2026-12-06). One JSON line per run is appended to
``OUT/members.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

GENERATOR = {"textbook": ["--generator", "textbook"], "independent": ["--generator", "independent"],
             "hard": ["--hard-negatives"]}


def forests() -> dict[str, object]:
    from sklearn.ensemble import ExtraTreesClassifier, RandomForestClassifier

    return {"rf100d20": RandomForestClassifier(100, max_depth=20, random_state=0, n_jobs=1),  # the textbook's
            "rf100d12": RandomForestClassifier(100, max_depth=12, random_state=0, n_jobs=1),
            "rf200d8": RandomForestClassifier(200, max_depth=8, random_state=0, n_jobs=1),
            "rf100leaf20": RandomForestClassifier(100, min_samples_leaf=20, random_state=0, n_jobs=1),
            "et100d20": ExtraTreesClassifier(100, max_depth=20, random_state=0, n_jobs=1)}


def forest_as_node_walk(rf: object, n_features: int) -> object:
    """A fitted random forest as the worker's :class:`~kestrel.models.fraud_trees.TreeEnsemble` would serve it:
    each leaf's fraud share (smoothed toward the forest's base rate by one pseudo-payment) as log-odds divided
    by the number of trees, so that the log-odds add up over trees as the walk sums them (the mean of the trees'
    log-odds, where scikit-learn averages probabilities)."""
    from kestrel.models.fraud_trees import NodeTree, ensemble_of

    estimators = rf.estimators_  # type: ignore[attr-defined]
    prior = float(np.mean([e.tree_.value[0, 0, 1] for e in estimators]))
    trees = []
    for est in estimators:
        t = est.tree_
        n = t.weighted_n_node_samples
        p = (t.value[:, 0, 1] * n + prior) / (n + 1.0)
        leaf = t.children_left < 0
        trees.append(NodeTree(np.where(leaf, 0, t.feature), np.where(leaf, 0.0, t.threshold),
                              t.missing_go_to_left.astype(bool), t.children_left, t.children_right,
                              np.log(p / (1 - p)) / len(estimators), n, t.max_depth))
    return ensemble_of(trees, 0.0, n_features)


def run(source: str, seed: int, out: Path) -> dict:
    from sklearn.metrics import average_precision_score

    from kestrel.models.fraud_torch import fit_platt, train_fraud_net
    from kestrel.models.fraud_trees import fit_trees
    from kestrel.offline.fraud_dataset import Columns
    from kestrel.offline.fraud_eval import EvalConfig, longest_window_days, replay_windows
    from kestrel.offline.paired_ap import paired_ap_gain

    csv = out / f"{source}{seed}.csv.gz"
    if not csv.exists():
        days = int(np.ceil(longest_window_days())) + 7 + 7 + 7 + 1  # warm-up, train, delay, test, as fraud_quality
        subprocess.run([str(Path(sys.executable).with_name("kestrel")), "produce", "--history-csv", str(csv),
                        "--days", str(days), "--seed", str(seed), "--payments-per-day", "5000", *GENERATOR[source]],
                       check=True, stdout=subprocess.DEVNULL)
    columns = Columns(merchant="merchant_id", card_present="card_present", device="device_id", segment="region")
    r = replay_windows(EvalConfig(csv=str(csv), columns=columns, train_days=7, delay_days=7, test_days=7),
                       lambda _m: None)
    x, y, groups = r.x[r.train], r.y[r.train], r.cards[r.train]
    cut = int(len(y) * 0.8)
    y_val = y[cut:]
    print(f"{source} {seed}: {cut:,} rows to fit ({int(y[:cut].sum())} frauds), {len(y_val):,} to validate "
          f"({int(y_val.sum())} frauds)", file=sys.stderr, flush=True)
    z: dict[str, np.ndarray] = {}
    _net, z["network"] = train_fraud_net(x[:cut], y[:cut], x[cut:], y_val, epochs=30, members=5, seed=0)
    z["boosted"] = fit_trees(x[:cut], y[:cut], seed=0).log_odds(x[cut:])
    for name, model in forests().items():
        started = time.time()
        p = np.clip(model.fit(x[:cut], y[:cut]).predict_proba(x[cut:])[:, 1], 1e-4, 1 - 1e-4)
        z[name] = np.log(p / (1 - p))
        if name == "rf100d20":
            z["rf100d20 walked"] = forest_as_node_walk(model, x.shape[1]).log_odds(x[cut:])
        print(f"  {name}: {time.time() - started:.0f}s", file=sys.stderr, flush=True)
    calibrated = {k: (lambda a, b: a * v + b)(*fit_platt(v, y_val)) for k, v in z.items()}
    blends = {f"network + {k}": 0.5 * (calibrated["network"] + calibrated[k]) for k in calibrated if k != "network"}
    blends |= {f"network + boosted + {k}": (calibrated["network"] + calibrated["boosted"] + calibrated[k]) / 3
               for k in calibrated if k not in ("network", "boosted")}
    shipped = blends["network + boosted"]
    result = {"source": source, "seed": seed,
              "validation_ap": {k: round(float(average_precision_score(y_val, v)), 4)
                                for k, v in (calibrated | blends).items()},
              "gain_over_shipped": {k: {"gain": round(g["gain"], 4), "ci95": [round(c, 4) for c in g["ci95"]]}
                                    for k, v in blends.items() if k != "network + boosted"
                                    for g in [paired_ap_gain(y_val, v, shipped, groups[cut:])]}}
    with (out / "members.jsonl").open("a") as fh:
        fh.write(json.dumps(result) + "\n")
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--sources", nargs="+", choices=sorted(GENERATOR), default=sorted(GENERATOR))
    p.add_argument("--seeds", type=int, nargs="+", default=[101])
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for source in args.sources:
        for seed in args.seeds:
            result = run(source, seed, out)
            print(f"{source} {seed}: " + ", ".join(f"{k} {v}" for k, v in result["validation_ap"].items()))
            for k, g in result["gain_over_shipped"].items():
                print(f"    {k} - shipped: {g['gain']:+.4f} [{g['ci95'][0]:+.4f}, {g['ci95'][1]:+.4f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
