"""Experiment definitions on the real Redis: audited changes, refused ones, concurrent operators, the CLI."""

from __future__ import annotations

import json
import threading

import pytest

from kestrel.feature_store.keys import KeySpace
from kestrel.models.experiments import Experiment
from kestrel.streams.experiments.store import ExperimentError, ExperimentStore
from tests.integration.test_cli import _kestrel

pytestmark = pytest.mark.integration

DEFINITION = {"key": "recs-mmr", "target": "recs", "hash_attribute": "user", "seed": "recs-mmr-1",
              "variants": [{"key": "control", "params": {"mmr_lambda": 0.7}},
                           {"key": "diverse", "params": {"mmr_lambda": 0.5}}],
              "coverage": 0.1, "primary_metric": "ctr", "guardrail_metrics": ["latency_p99_ms"]}


def test_changes_are_audited_and_wrong_ones_refused(settings, redis_client):
    store = ExperimentStore(redis_client, KeySpace(settings.redis_prefix))
    store.create(Experiment.model_validate(DEFINITION), "ana", "first try")
    with pytest.raises(ExperimentError, match="exists"):
        store.create(Experiment.model_validate(DEFINITION), "bo")
    with pytest.raises(ExperimentError, match="only a running"):
        store.stop("recs-mmr", "ana")  # a draft cannot be stopped
    store.start("recs-mmr", "ana")
    store.ramp("recs-mmr", 0.5, "ana", "no guardrail moved at 10%")
    with pytest.raises(Exception):  # noqa: B017 - pydantic's ValidationError: coverage above 1
        store.ramp("recs-mmr", 1.5, "ana")
    store.promote("recs-mmr", "diverse", "ana", "B wins on CTR")
    assert store.get("recs-mmr").status == "stopped" and store.get("recs-mmr").coverage == 0.5
    history = store.history("recs-mmr")
    assert [h["action"] for h in history] == ["create", "start", "ramp", "promote"]
    assert [h["revision"] for h in history] == [1, 2, 3, 4] and history[-1]["winner"] == "diverse"
    assert history[2]["before"]["coverage"] == 0.1 and history[2]["after"]["coverage"] == 0.5
    assert history[2]["who"] == "ana" and history[2]["why"] == "no guardrail moved at 10%"


def test_concurrent_operators_never_lose_a_change(settings, redis_client):
    store = ExperimentStore(redis_client, KeySpace(settings.redis_prefix))
    for i in range(4):
        store.create(Experiment.model_validate({**DEFINITION, "key": f"e{i}", "seed": f"e{i}"}), "setup")

    def ramp_many(i: int) -> None:
        own = ExperimentStore(redis_client.__class__.from_url(settings.redis_url), KeySpace(settings.redis_prefix))
        for step in range(25):
            own.ramp(f"e{i}", round(0.01 * (step + 1), 2), f"op{i}")

    threads = [threading.Thread(target=ramp_many, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    history = store.history()
    assert len(history) == 4 + 100 and [h["revision"] for h in history] == list(range(1, 105))
    assert all(store.get(f"e{i}").coverage == 0.25 for i in range(4))


def test_the_cli(settings, tmp_path):
    env = settings.to_env()
    path = tmp_path / "exp.json"
    path.write_text(json.dumps(DEFINITION))
    created = _kestrel("experiments", "create", str(path), "--json", env=env)
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["status"] == "draft"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**DEFINITION, "key": "x", "variants": [{"key": "a", "weight": 0.9},
                                                                      {"key": "b", "weight": 0.9}]}))
    refused = _kestrel("experiments", "create", str(bad), "--json", env=env)
    assert refused.returncode == 2 and json.loads(refused.stdout)["error"] == "invalid experiment"
    assert _kestrel("experiments", "start", "recs-mmr", env=env).returncode == 0
    assert _kestrel("experiments", "ramp", "recs-mmr", "--coverage", "0.3", "--why", "ramp", env=env).returncode == 0
    listed = json.loads(_kestrel("experiments", "list", "--json", env=env).stdout)
    assert [(e["key"], e["status"], e["coverage"]) for e in listed] == [("recs-mmr", "running", 0.3)]
    shown = json.loads(_kestrel("experiments", "show", "recs-mmr", "--json", env=env).stdout)
    assert [h["action"] for h in shown["history"]] == ["create", "start", "ramp"]


def test_the_http_api_reads_freely_and_changes_with_the_token(settings, worker):
    from tests.integration.test_http import _call

    worker.start()
    base, token = f"{worker.url}/api/experiments", settings.api_token
    assert _call(base, DEFINITION)[0] == 401  # no token
    assert _call(base, DEFINITION, token="wrong")[0] == 401
    status, body = _call(base, {**DEFINITION, "coverage": 2}, token=token)
    assert status == 422 and json.loads(body)["fields"][0]["field"] == "coverage"
    status, body = _call(base, {**DEFINITION, "why": "try the diverse re-ranker"}, token=token)
    assert status == 200 and json.loads(body)["status"] == "draft"
    assert _call(base, DEFINITION, token=token)[0] == 409  # exists
    assert _call(f"{base}/recs-mmr/start", {}, token=token)[0] == 200
    status, body = _call(f"{base}/recs-mmr/ramp", {"coverage": "lots"}, token=token)
    assert status == 422 and json.loads(body)["field"] == "coverage"
    assert _call(f"{base}/recs-mmr/ramp", {"coverage": 0.5, "who": "ana"}, token=token)[0] == 200
    assert _call(f"{base}/recs-mmr/explode", {}, token=token)[0] == 404
    assert _call(f"{base}/nope/stop", {}, token=token)[0] == 404
    status, body = _call(f"{base}/recs-mmr")
    doc = json.loads(body)
    assert status == 200 and doc["coverage"] == 0.5
    assert [(h["action"], h["who"]) for h in doc["history"]] == [("create", "api"), ("start", "api"), ("ramp", "ana")]
    status, body = _call(f"{base}/recs-mmr/results")
    assert status == 200 and set(json.loads(body)["variants"]) == {"control", "diverse"}
    status, body = _call(base)
    assert status == 200 and [e["key"] for e in json.loads(body)] == ["recs-mmr"]
