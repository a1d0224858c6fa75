"""Train -> register -> gate -> promote through the CLI, then a worker's scorer serving the champion alias."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kestrel.models.registry import Registry, RegistryError
from kestrel.streams.config import Settings
from kestrel.streams.worker.processing import load_fraud_scorer
from tests.integration.test_cli import _kestrel

COLUMNS = ["--merchant-col", "merchant_id", "--card-present-col", "card_present", "--device-col", "device_id",
           "--epochs", "3", "--members", "1"]


def _json(proc) -> dict:
    assert proc.returncode in (0, 3), proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_train_register_gate_promote_and_serve_the_champion(tmp_path):
    history = tmp_path / "history.csv.gz"
    proc = _kestrel("produce", "--history-csv", str(history), "--days", "6", "--payments-per-day", "2000",
                    "--seed", "5")
    assert proc.returncode == 0, proc.stderr
    reg_root, out = tmp_path / "registry", tmp_path / "artifacts"
    train = ["train", "fraud", "--csv", str(history), "--out", str(out), "--registry", str(reg_root), *COLUMNS]

    first = _json(_kestrel(*train, "--promote", "--seed", "1", "--why", "first model"))
    assert first["promotion"]["action"] == "promote" and first["promotion"]["from"] is None
    assert "champion" not in first["evaluation"]  # nothing to compare with yet
    assert {"average_precision", "calibration_error", "alert_rate", "score_p99_ms"} <= set(first["metrics"])
    assert "gate window" in _kestrel(*train, "--seed", "9").stderr  # registered, not promoted: still v1
    registry = Registry(reg_root, "fraud")
    assert registry.aliases() == {"champion": first["model_version"]} and len(registry.versions()) == 2

    second = _json(_kestrel(*train, "--promote", "--seed", "2"))
    evaluation = second["evaluation"]
    assert evaluation["champion"] == first["model_version"]  # both measured on the same held-out window
    assert evaluation["window"] == registry.get(first["model_version"]).validation_window
    assert evaluation["champion_saw_window"] is False  # same data, same cut: the champion never trained on it
    promotion = second["promotion"]
    moved = promotion["action"] == "promote"
    assert moved == promotion["gate"]["passed"]
    assert promotion["gate"]["checks"][0]["champion"] == evaluation["champion_metrics"]["average_precision"]
    champion = second["model_version"] if moved else first["model_version"]
    last = registry.history()[-1]
    assert registry.aliases()["champion"] == champion and last.action == ("promote" if moved else "refused")
    assert last.gate["checks"][0]["candidate"] == second["metrics"]["average_precision"]

    listed = _json(_kestrel("models", "list", "--registry", str(reg_root), "--json"))
    assert len(listed["versions"]) == 3 and listed["aliases"]["champion"] == champion
    shown = _json(_kestrel("models", "show", "champion", "--registry", str(reg_root), "--json"))
    assert shown["version"] == champion and shown["code_version"] and len(shown["checksum"]) == 64
    assert shown["feature_set"].startswith("card_profile")
    refused = _kestrel("models", "alias", "champion", first["model_version"], "--registry", str(reg_root))
    assert refused.returncode == 2 and "gate" in refused.stdout  # champion moves only through the gate

    scorer = load_fraud_scorer(Settings(fraud_model=str(reg_root)))  # what a worker serves
    assert scorer.version == champion
    shadow = _json(_kestrel("models", "alias", "shadow", first["model_version"], "--registry", str(reg_root),
                            "--json"))
    assert shadow["to_version"] == first["model_version"]
    assert load_fraud_scorer(Settings(fraud_model=str(reg_root), model_alias="shadow")).version == \
        first["model_version"]

    (Path(registry.get(champion).path) / "meta.json").write_text("{}")  # the files changed after registration
    with pytest.raises(RegistryError, match="checksum"):
        load_fraud_scorer(Settings(fraud_model=str(reg_root)))
    history_out = _kestrel("models", "history", "--registry", str(reg_root))
    assert history_out.returncode == 0 and "first model" in history_out.stdout


def test_the_unattended_loop_reports_every_run_and_a_failed_run_promotes_nothing(tmp_path):
    import pandas as pd

    history = tmp_path / "history.csv.gz"
    proc = _kestrel("produce", "--history-csv", str(history), "--days", "6", "--payments-per-day", "2000",
                    "--seed", "5")
    assert proc.returncode == 0, proc.stderr
    reg_root, reports = tmp_path / "registry", tmp_path / "runs"
    loop = ["train", "fraud", "--out", str(tmp_path / "artifacts"), "--registry", str(reg_root), "--promote",
            "--every", "1s", "--max-runs", "1", "--reports", str(reports), *COLUMNS]
    first = _json(_kestrel(*loop, "--csv", str(history)))
    assert first["ok"] and first["promotion"] == "promote"
    champion = Registry(reg_root, "fraud").aliases()["champion"]
    report = Path(first["report"]).read_text()
    assert champion in report and "| average_precision |" in report and "promote" in report
    plots = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)  # the plots, linked relative to the report
    assert {Path(p).name for p in plots} == {"learning_curves.png", "pr_roc.png", "calibration.png",
                                             "scores_by_class.png"}, plots
    for plot in plots:
        assert (reports / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot  # real PNG files
    Registry(reg_root, "fraud").get(champion).verify()  # drawn before registering: covered by the checksum

    no_fraud = tmp_path / "no-fraud.csv.gz"
    frame = pd.read_csv(history)
    frame["is_fraud"] = 0  # a broken export: nothing to learn from
    frame.to_csv(no_fraud, index=False)
    failed = _json(_kestrel(*loop, "--csv", str(no_fraud)))
    assert not failed["ok"] and failed["promotion"] is None
    assert Registry(reg_root, "fraud").aliases()["champion"] == champion  # production untouched
    assert "Failed: nothing was registered or promoted" in Path(failed["report"]).read_text()
    assert len(list(reports.glob("*.md"))) == 2 and len(Registry(reg_root, "fraud").versions()) == 1
