"""`kestrel eval recs` on a small generated CSV: the CLI contract, that the two-tower beats popularity, and that
`kestrel` reports the served hybrid with the blend weight its validation split chose."""

from __future__ import annotations

import json

from kestrel.offline.recs_data import simulated_interactions
from kestrel.streams.cli.main import main


def test_eval_recs_cli_reports_two_tower_and_baselines_in_one_json_line(tmp_path, capsys):
    csv = tmp_path / "interactions.csv"
    simulated_interactions(8000, seed=5, n_users=150, n_items=300, n_categories=6).to_csv(csv, index=False)
    code = main(["eval", "recs", "--csv", str(csv), "--user-col", "user_id", "--item-col", "item_id",
                 "--time-col", "timestamp", "--rating-col", "weight", "--min-rating", "1",
                 "--category-col", "category", "--epochs", "6", "--dim", "32", "--no-progress", "--json"])
    assert code == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    assert len(lines) == 1
    summary = json.loads(lines[0])
    metrics = ("recall_at_10", "recall_at_20", "ndcg_at_10", "coverage_at_10", "retrieval_p99_ms")
    assert set(metrics) <= set(summary["two_tower"])
    served = summary["kestrel"]  # one line says what would be served, and what the blend's rule saw
    assert set(metrics) <= set(served)
    rule = served["hybrid_rule"]
    validation = {float(w): r for w, r in rule["validation_recall_at_20"].items()}
    assert set(validation) == {0.0, 0.25, 0.5, 0.75, 1.0} and validation[rule["best"]] == max(validation.values())
    if rule["best"] != 0.0 and rule["best_minus_tower"]["ci95"][0] > 0:  # beyond noise: the blend is served
        assert served["deployed"] == "two_tower+ease" and served["blend_weight"] == rule["best"]
    else:  # the tower alone, measured as such
        assert served["deployed"] == "two_tower" and served["recall_at_20"] == summary["two_tower"]["recall_at_20"]
    assert set(summary["baselines"]) == {"popularity", "item_knn", "ease"}
    for m in summary["baselines"].values():
        assert set(metrics) <= set(m)
    assert summary["users_evaluated"] > 100
    tt, pop = summary["two_tower"], summary["baselines"]["popularity"]
    assert tt["recall_at_20"] > 1.5 * pop["recall_at_20"]
    assert tt["coverage_at_10"] > pop["coverage_at_10"]
