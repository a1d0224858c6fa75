"""The experiments page in a real browser (Debian's chromium) against the real worker, broker and Redis: the
list, one experiment's live numbers and plots, and the ramp / stop controls with the token, audited."""

from __future__ import annotations

import asyncio
import json

import pytest

from kestrel.feature_store import topics
from kestrel.feature_store.keys import KeySpace
from kestrel.models.experiments import Experiment
from kestrel.streams.experiments.store import ExperimentStore
from kestrel.streams.ingest.producer import EventProducer
from tests.integration.test_experiments_worker import _payments

pytestmark = pytest.mark.integration


async def test_operator_watches_and_ramps_then_stops_an_experiment_in_the_browser(settings, worker, outputs,
                                                                                   redis_client, browser, tmp_path):
    store = ExperimentStore(redis_client, KeySpace(settings.redis_prefix))
    store.create(Experiment.model_validate({
        "key": "page-test", "target": "fraud", "hash_attribute": "card", "seed": "page-test-1", "owner": "ops",
        "variants": [{"key": "control"}, {"key": "strict", "params": {"review_threshold": 0.2}}],
        "status": "running", "coverage": 1.0, "primary_metric": "recall", "guardrail_metrics": ["alert_rate"]}),
        "test")
    worker.settings = settings.with_(guardrail_check_s=1.0)
    worker.start()
    producer = EventProducer(settings.broker, settings.hash_key)
    for part in ("a", "b"):  # two waves, so that the plots have more than one point
        payments = _payments(150, 1, part)
        for t in payments:
            producer.send(t)
        assert producer.flush() == 0
        outputs.wait_for(topics.FRAUD_DECISIONS, {t.event_id for t in payments}, timeout_s=60)
        await asyncio.sleep(2.5)

    await browser.goto(f"{worker.url}/experiments")
    rows = await browser.wait_for("Array.from(document.querySelectorAll('#experiments tbody tr'), "
                                  "r => r.dataset.experiment)")
    assert rows == ["page-test"]
    await browser.click('tr[data-experiment="page-test"] a')
    await browser.wait_for("document.body.dataset.experiment === 'page-test'")
    units = await browser.eval("Array.from(document.querySelectorAll('#variants tbody tr'), "
                               "r => Number(r.children[4].textContent))")
    assert len(units) == 2 and sum(units) == 150 and min(units) > 0  # every card, both variants
    points = await browser.eval("Array.from(document.querySelectorAll('#plot-units polyline'), "
                                "p => p.getAttribute('points').split(' ').length)")
    assert len(points) == 2 and min(points) >= 2, points  # units over time, one line per variant
    assert "Sample ratio" in await browser.eval("document.getElementById('srm').textContent")
    await browser.screenshot(tmp_path / "experiment.png")

    # ramp without a token: refused by the page; with it: done, shown and audited
    await browser.click("#ramp")
    assert "token" in await browser.wait_for("document.getElementById('result').textContent")
    await browser.type("#token", settings.api_token)
    await browser.click("#save-token")
    await browser.wait_for("document.getElementById('token-state').textContent === 'token set for this tab'")
    await browser.eval("document.getElementById('ramp-to').value = ''")
    await browser.type("#ramp-to", "0.5")
    await browser.type("#why", "halve exposure while we look")
    await browser.click("#ramp")
    await browser.wait_for("document.getElementById('result').className === 'ok'")
    assert await browser.eval("document.getElementById('coverage').textContent") == "0.5"
    assert store.get("page-test").coverage == 0.5
    ramp = [h for h in store.history("page-test") if h["action"] == "ramp"][-1]
    assert ramp["who"] == "experiments page" and ramp["why"] == "halve exposure while we look"

    await browser.click("#stop")
    await browser.wait_for("document.getElementById('status').textContent === 'stopped'")
    assert store.get("page-test").status == "stopped"
    await browser.goto(f"{worker.url}/experiments/page-test")
    audit = await browser.eval("Array.from(document.querySelectorAll('#audit tbody tr'), "
                               "r => r.children[1].textContent)")
    assert audit[:2] == ["stop", "ramp"]  # newest first
    assert await browser.eval("document.documentElement.outerHTML.includes(" + json.dumps(settings.api_token) + ")") \
        is False
    assert not [c for c in browser.console if c.startswith("exception")]
    await browser.goto(f"{worker.url}/experiments/nope")
    assert "no experiment" in await browser.eval("document.body.textContent")
