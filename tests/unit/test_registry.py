"""The model registry (records, aliases, audit log, concurrent writers) and the evaluation gate's table."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from kestrel.models.gate import GatePolicy, Guardrail, judge
from kestrel.models.registry import ModelRecord, Registry, RegistryError, artifact_checksum, promote, rollback

CHAMPION = {"average_precision": 0.600, "score_p99_ms": 4.0, "calibration_error": 0.010, "alert_rate": 0.0100}


@pytest.mark.parametrize(("change", "passed", "failing"), [
    ({"average_precision": 0.640}, True, []),
    ({"average_precision": 0.601}, False, ["average_precision"]),      # below the absolute margin (0.002)
    ({"average_precision": 0.590}, False, ["average_precision"]),      # worse
    ({"average_precision": 0.600}, False, ["average_precision"]),      # a tie does not beat
    ({"average_precision": 0.640, "score_p99_ms": 6.5}, False, ["score_p99_ms"]),  # slack: max(2, 50%) = 2 ms
    ({"average_precision": 0.640, "score_p99_ms": 5.9}, True, []),
    ({"average_precision": 0.640, "calibration_error": 0.03}, False, ["calibration_error"]),
    ({"average_precision": 0.640, "alert_rate": 0.0130}, False, ["alert_rate"]),  # 30% more alerts than 25%
    ({"average_precision": 0.640, "alert_rate": 0.0120}, True, []),
    ({"average_precision": 0.640, "alert_rate": 0.0010}, True, []),      # fewer alerts is no regression
    ({"average_precision": float("nan")}, False, ["average_precision"]),  # no evidence never passes
    ({"average_precision": 0.640, "calibration_error": None}, False, ["calibration_error"]),
])
def test_the_fraud_gate(change, passed, failing):
    candidate = {k: v for k, v in {**CHAMPION, **change}.items() if v is not None}
    decision = judge(candidate, CHAMPION, GatePolicy.for_kind("fraud"))
    assert decision.passed is passed
    assert [c["check"] for c in decision.checks if not c["passed"]] == failing or (
        failing == ["average_precision"] and not decision.checks)
    assert bool(decision.reasons) is not passed


def test_gate_margins_relative_and_first_version():
    policy = GatePolicy.for_kind("fraud", min_gain_abs=0.0, min_gain_rel=0.05)
    assert not judge({**CHAMPION, "average_precision": 0.62}, CHAMPION, policy).passed  # +3.3% < 5%
    assert judge({**CHAMPION, "average_precision": 0.64}, CHAMPION, policy).passed       # +6.7%
    first = judge({"average_precision": 0.1}, None, policy)
    assert first.passed and "first version" in first.checks[0]["note"]
    # a guardrail the champion never measured is skipped, and says so
    skipped = judge({**CHAMPION, "average_precision": 0.7}, {"average_precision": 0.6}, policy)
    assert skipped.passed and all("skipped" in c["note"] for c in skipped.checks[1:])
    lower_better = GatePolicy("recall_at_20", guardrails=(Guardrail("coverage", higher_is_worse=False,
                                                                    abs_slack=0.05),))
    assert not judge({"recall_at_20": 0.5, "coverage": 0.7}, {"recall_at_20": 0.4, "coverage": 0.8},
                     lower_better).passed


def _artifact(root: Path, name: str, content: str = "weights") -> Path:
    path = root / "artifacts" / name
    path.mkdir(parents=True)
    (path / "meta.json").write_text(json.dumps({"version": name}))
    (path / "model.pt").write_text(content)
    return path


def _record(root: Path, name: str, ap: float, champion: str | None = None, champion_ap: float | None = None,
            **more) -> ModelRecord:
    evaluation = {"window": {"rows": 1000}}
    if champion is not None:
        evaluation.update(champion=champion, champion_metrics={**CHAMPION, "average_precision": champion_ap})
    return ModelRecord.new("fraud", name, _artifact(root, name), metrics={**CHAMPION, "average_precision": ap},
                           parent=champion, evaluation=evaluation, **more)


def test_records_are_immutable_and_checked_against_their_files(tmp_path):
    reg = Registry(tmp_path / "reg", "fraud")
    record = reg.register(_record(tmp_path, "v1", 0.6, seed=3, code_version="abc123"))
    assert reg.get("v1") == record and reg.resolve("v1") == record and [r.version for r in reg.versions()] == ["v1"]
    with pytest.raises(RegistryError, match="already registered"):
        reg.register(record)
    record.verify()
    before = artifact_checksum(record.path)
    (Path(record.path) / "model.pt").write_text("weights, changed")
    assert artifact_checksum(record.path) != before
    with pytest.raises(RegistryError, match="checksum"):
        record.verify()
    with pytest.raises(RegistryError, match="neither an alias nor a registered version"):
        reg.resolve("nope")
    with pytest.raises(RegistryError):
        reg.move("champion", "v-unknown")


def test_a_worse_candidate_is_refused_and_the_refusal_is_logged_with_its_numbers(tmp_path):
    reg = Registry(tmp_path / "reg", "fraud")
    reg.register(_record(tmp_path, "v1", 0.60))
    first = promote(reg, "v1", who="ml-eng")
    assert first["moved"] and reg.aliases() == {"champion": "v1"}
    reg.register(_record(tmp_path, "v2", 0.58, champion="v1", champion_ap=0.60))
    refused = promote(reg, "v2", who="ml-eng")
    assert not refused["moved"] and refused["action"] == "refused" and reg.aliases() == {"champion": "v1"}
    last = reg.history()[-1]
    assert last.action == "refused" and last.from_version == last.to_version == "v1" and last.who == "ml-eng"
    primary = last.gate["checks"][0]
    assert (primary["candidate"], primary["champion"], primary["passed"]) == (0.58, 0.60, False)
    assert "below the margin" in last.why
    forced = promote(reg, "v2", force=True, why="incident 42: v1 flags every card in one region")
    assert forced["moved"] and forced["action"] == "force" and reg.aliases() == {"champion": "v2"}
    assert reg.history()[-1].gate["passed"] is False  # a forced move keeps the gate's no


def test_promotion_against_a_champion_that_moved_meanwhile_is_refused(tmp_path):
    reg = Registry(tmp_path / "reg", "fraud")
    for name in ("v1", "v2"):
        reg.register(_record(tmp_path, name, 0.6))
    promote(reg, "v1")
    reg.register(_record(tmp_path, "v3", 0.70, champion="v1", champion_ap=0.60))  # evaluated against v1
    reg.move("champion", "v2", action="force", why="hotfix")
    stale = promote(reg, "v3")
    assert not stale["moved"] and "evaluate the candidate against it" in stale["reasons"][0]
    with pytest.raises(RegistryError, match="moved meanwhile"):  # compare-and-set on the alias
        reg.move("champion", "v3", expect_from="v1")


def test_rollback_aliases_and_a_half_written_line(tmp_path):
    reg = Registry(tmp_path / "reg", "fraud")
    reg.register(_record(tmp_path, "v1", 0.60))
    reg.register(_record(tmp_path, "v2", 0.65, champion="v1", champion_ap=0.60))
    promote(reg, "v1")
    promote(reg, "v2")
    reg.move("shadow", "v1", why="compare live")
    assert reg.aliases() == {"champion": "v2", "shadow": "v1"}
    back = rollback(reg, why="alert rate doubled")
    assert (back.from_version, back.to_version, back.action) == ("v2", "v1", "rollback")
    reg.move("shadow", None)
    assert reg.aliases() == {"champion": "v1"}
    with reg.log_path.open("a") as fh:  # a writer that died mid-line: not a move
        fh.write('{"seq": 99, "alias": "champion", "to_ver')
    assert reg.aliases() == {"champion": "v1"} and reg.history()[-1].seq == 5
    reg.move("shadow", "v2")  # the next writer cuts the torn tail before it appends
    assert [m.seq for m in reg.history()] == [1, 2, 3, 4, 5, 6] and reg.aliases()["shadow"] == "v2"


def _move_many(root: str, worker: int, n: int) -> None:
    reg = Registry(root, "fraud")
    for i in range(n):
        reg.move(f"w{worker}", "v1" if i % 2 else None, why=f"{worker}-{i}")


def test_concurrent_writers_never_lose_or_tear_a_move(tmp_path):
    reg = Registry(tmp_path / "reg", "fraud")
    reg.register(_record(tmp_path, "v1", 0.6))
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_move_many, args=(str(tmp_path / "reg"), w, 40)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    moves = reg.history()
    assert len(moves) == 160 and [m.seq for m in moves] == list(range(1, 161))
    assert sorted(m.why for m in moves) == sorted(f"{w}-{i}" for w in range(4) for i in range(40))
    assert reg.aliases() == {f"w{w}": "v1" for w in range(4)}
