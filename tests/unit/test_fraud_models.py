"""Fraud model pieces: inputs and their wording, the delayed terminal-risk window, calibration,
policy thresholds, the online learner (idempotence, drift, new patterns), the artifact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kestrel.models.fraud_features import INPUT_INDEX, INPUTS, model_inputs, payment_context
from kestrel.models.fraud_model import FraudModel, ModelScorer, latest_artifact
from kestrel.models.fraud_online import OnlineFraudLearner, labelled_share
from kestrel.models.fraud_torch import FraudNet, fit_platt, logits, train_fraud_net
from kestrel.models.policy import Policy
from kestrel.models.scoring import Thresholds
from kestrel.offline.fraud_dataset import Payment, terminal_risk
from kestrel.offline.simulator import EXTRA_SCENARIOS
from tests.fraud_fixtures import rows_and_inputs, simulated_frame

DAY = 86400.0


def test_inputs_are_computed_and_worded_from_the_payment_own_values():
    f = {"amount": 700.0, "amount_vs_mean_30d": 14.0, "amount_mean_30d_before": 50.0, "txn_count_30d_before": 9.0,
         "small_txn_count_10m": 4.0, "card_terminal_seconds_since_prev": -1.0, "has_device": 1.0,
         "card_device_seconds_since_prev": -1.0, "card_device_txn_count_30d": 1.0, "card_present": 0.0,
         "hour_utc": 3.0, "terminal_frauds_30d_d7": 3.0, "terminal_labels_30d_d7": 10.0,
         "terminal_fraud_rate_30d_d7": 0.3}
    x = model_inputs([f])[0]
    assert x[INPUT_INDEX["new_terminal"]] == x[INPUT_INDEX["new_device"]] == x[INPUT_INDEX["night"]] == 1.0
    assert x[INPUT_INDEX["card_not_present"]] == 1.0 and x[INPUT_INDEX["device_history_30d"]] == 0.0
    words = {inp.name: inp.explain(f) for inp in INPUTS}
    assert words["amount_vs_mean_30d"].startswith("amount 14.0× this card's 30-day mean")
    assert "31%" not in words["terminal_fraud_rate_30d"] and "30%" in words["terminal_fraud_rate_30d"]
    assert "4 small payments" in words["small_txn_count_10m"]
    assert words["new_device"] == "first payment by this card from this device"


def test_missing_features_give_neutral_inputs_not_errors():
    x = model_inputs([{}])[0]
    assert np.isfinite(x).all()
    assert x[INPUT_INDEX["new_device"]] == 0.0  # no device, so not a new one


@pytest.mark.parametrize(("epoch", "present", "device", "expected"), [
    (1767225600.0, True, None, {"hour_utc": 0.0, "weekday": 3.0, "card_present": 1.0, "has_device": 0.0}),
    (1767225600.0 + 2 * DAY + 13 * 3600, None, "d", {"hour_utc": 13.0, "weekday": 5.0, "card_present": -1.0,
                                                       "has_device": 1.0}),
])
def test_payment_context(epoch, present, device, expected):
    assert payment_context(epoch, present, device) == expected


def test_terminal_risk_counts_only_labels_old_enough_to_be_known():
    start = 1_767_225_600.0
    pays = [Payment(f"p{i}", "c", "m", "T", 10.0, start + i * 3600) for i in range(3)]  # three frauds on day 0
    pays += [Payment("q5", "c", "m", "T", 10.0, start + 5 * DAY),  # 5 days later: inside the 7-day label delay
             Payment("q10", "c", "m", "T", 10.0, start + 10 * DAY),  # 10 days later: the day-0 labels are in
             Payment("u10", "c", "m", "U", 10.0, start + 10 * DAY)]  # another terminal
    labels = np.array([1.0, 1.0, 0.0, np.nan, np.nan, np.nan])
    risk = terminal_risk(pays, labels)
    assert risk["terminal_frauds_30d_d7"].tolist()[3:] == [0.0, 2.0, 0.0]
    assert risk["terminal_labels_30d_d7"].tolist()[3:] == [0.0, 3.0, 0.0]


def test_platt_scaling_calibrates_overconfident_logits():
    rng = np.random.default_rng(1)
    true_logit = rng.normal(-3, 2, 20_000)
    y = (rng.random(20_000) < 1 / (1 + np.exp(-true_logit))).astype(int)
    a, b = fit_platt(3 * true_logit + 1, y)  # a model three times too confident, shifted
    p = 1 / (1 + np.exp(-(a * (3 * true_logit + 1) + b)))
    for lo, hi in ((0.0, 0.1), (0.1, 0.5), (0.5, 1.0)):
        m = (p >= lo) & (p < hi)
        assert abs(p[m].mean() - y[m].mean()) < 0.03  # predicted rate = observed rate per bin


@pytest.mark.parametrize(("policy", "expected"), [
    (Policy(review=0.3, block=0.8), Thresholds(0.3, 0.8)),
    (Policy(), Thresholds(0.5, 0.9)),
    (Policy(alerts_per_day=10), Thresholds(0.99, 0.99)),  # 1% of 1000 payments a day -> top 1% of scores
    (Policy(alerts_per_day=500, block=0.7), Thresholds(0.5, 0.7)),
    (Policy(alerts_per_day=0), Thresholds(1.0, 1.0)),
])
def test_policy_thresholds(policy, expected):
    assert policy.thresholds(np.linspace(0, 1, 10_001), payments_per_day=1000) == expected


def test_policy_from_json_refuses_unknown_fields():
    assert Policy.from_json('{"alerts_per_day": 300}') == Policy(alerts_per_day=300)
    with pytest.raises(ValueError, match="unknown policy fields"):
        Policy.from_json('{"reveiw": 0.3}')


def test_online_learner_learns_each_label_once_across_checkpoints():
    learner = OnlineFraudLearner(lr=0.05)
    learner.learn("a", {"x": 1.0}, True, 0.1)
    restored = OnlineFraudLearner.loads(learner.dumps())
    before = dict(restored.model.weights)
    assert restored.learn("a", {"x": 1.0}, True, 0.1) is None and restored.model.weights == before
    restored.learn("b", {"x": 1.0}, True, 0.1)
    assert restored.labels_seen == 2 and restored.model.weights != before


def test_online_learner_flags_drift_when_frauds_start_being_missed():
    learner = OnlineFraudLearner()
    events = [learner.learn(f"caught{i}", {"x": 0.0}, True, 0.9) for i in range(300)]  # frauds, alerted
    events += [learner.learn(f"audit{i}", {"x": 0.0}, False, 0.01) for i in range(2000)]  # audits: not watched
    assert not any(events)
    events = [learner.learn(f"missed{i}", {"x": 1.0}, True, 0.1) for i in range(200)]  # a new pattern, missed
    drift = next(e for e in events if e is not None)
    assert (drift.detector, drift.metric) == ("ADWIN", "missed_fraud_rate") and drift.rate > 0.05
    assert drift.labels_seen < 2300 + 60  # flagged within a few dozen missed frauds


def test_online_learner_flags_drift_when_alerts_turn_into_false_alarms():
    learner = OnlineFraudLearner()
    events = [learner.learn(f"a{i}", {"x": 0.0}, i % 4 != 0, 0.8) for i in range(400)]  # 25% false alarms
    assert not any(events)
    events = [learner.learn(f"b{i}", {"x": 1.0}, i % 4 == 0, 0.8) for i in range(400)]  # now 75%
    drift = next(e for e in events if e is not None)
    assert drift.metric == "false_alarm_rate" and drift.rate > 0.3


def test_the_audit_share_does_not_look_like_drift():
    """Fewer or more audited genuine payments change the overall error rate, not the two watched rates."""
    learner = OnlineFraudLearner()
    rng = np.random.default_rng(0)
    events = []
    for i in range(6000):
        audit_heavy = i < 3000  # halfway, audited genuine payments drop from 90% of the labels to 50%
        if rng.random() < (0.9 if audit_heavy else 0.5):
            events.append(learner.learn(f"g{i}", {"x": 0.0}, False, 0.01))
        else:
            events.append(learner.learn(f"f{i}", {"x": 1.0}, True, 0.9 if rng.random() < 0.8 else 0.1))
    assert not any(events)


def test_artifact_roundtrip_and_model_based_reasons(fraud_model, tmp_path):
    model, path = fraud_model
    assert latest_artifact(path.parent) == path
    loaded = FraudModel.load(path)
    frame = simulated_frame(tmp_path / "h.csv", days=1, per_day=3000, seed=5)
    rows, x = rows_and_inputs(frame)
    a, _ = model.score_arrays(x, model.online)
    b, _ = loaded.score_arrays(x, loaded.online)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    river_says = model.online.predict(model.online_inputs(x[:50], model.base_logits(x[:50])))
    np.testing.assert_allclose(a[:50], river_says, rtol=1e-4, atol=1e-7)  # the matrix path is river's function
    scorer = ModelScorer(loaded, Policy(review=0.5))
    scores = scorer.score_batch([None] * len(rows), rows)
    flagged = [s for s in scores if s.action != "allow"]
    assert flagged, "the model flags some of a simulated day's payments"
    for s in flagged:
        contributions = [r.contribution for r in s.reasons]
        assert s.reasons and contributions == sorted(contributions, reverse=True) and contributions[0] > 0
        assert all(r.code in INPUT_INDEX and r.message for r in s.reasons)
    y = frame["label"].to_numpy()
    assert np.mean([s.score for s, yi in zip(scores, y, strict=True) if yi]) > 10 * np.mean(
        [s.score for s, yi in zip(scores, y, strict=True) if not yi])


def test_the_linear_member_gets_an_equal_share_of_the_calibrated_log_odds():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3000, 4)).astype(np.float32)
    y = (rng.random(3000) < 1 / (1 + np.exp(-(3 * x[:, 0] - 4)))).astype(np.int64)
    net, z_val = train_fraud_net(x[:2400], y[:2400], x[2400:], y[2400:], epochs=4, members=2, refit=False)
    weight = float(net.linear_weight)
    assert weight > 0 and net.linear.weight[0, 0] > 0  # risk rises with input 0, and the linear member says so
    np.testing.assert_allclose(logits(net, x[2400:]), z_val, rtol=1e-4, atol=1e-4)  # no refit: honest = deployed
    mlps_only = FraudNet(4, net.hidden, 2)  # linear_weight stays 0
    mlps_only.load_state_dict({k: v for k, v in net.state_dict().items() if k != "linear_weight"}, strict=False)
    mlp_val = logits(mlps_only, x[2400:])
    linear_val = (z_val - mlp_val) / weight
    slope_mlp, slope_linear = fit_platt(mlp_val, y[2400:])[0], fit_platt(linear_val, y[2400:])[0]
    assert weight * slope_mlp == pytest.approx(slope_linear, rel=1e-3)  # equal shares once calibrated
    without, _ = train_fraud_net(x[:2400], y[:2400], x[2400:], y[2400:], epochs=4, members=2, refit=False,
                                 linear_share=0.0)
    assert float(without.linear_weight) == 0.0
    no_fraud_yet, _ = train_fraud_net(x[:2400], np.zeros(2400, dtype=np.int64), x[2400:], y[2400:], epochs=1,
                                      members=1, refit=False)  # nothing for the linear member to learn from
    assert float(no_fraud_yet.linear_weight) == 0.0


def test_an_artifact_from_before_the_linear_member_loads_as_mlps_only(fraud_model, tmp_path):
    import shutil

    import torch

    _model, path = fraud_model
    copy = Path(shutil.copytree(path, tmp_path / "old"))
    blob = torch.load(copy / "model.pt", weights_only=True)
    old = {k: v for k, v in blob["state"].items() if not k.startswith("linear")}
    torch.save({**blob, "state": old}, copy / "model.pt")
    loaded = FraudModel.load(copy)
    assert float(loaded.net.linear_weight) == 0.0
    x = np.zeros((1, len(INPUTS)), dtype=np.float32)
    with torch.no_grad():
        mlps = torch.stack([m(loaded.net.standardise(torch.from_numpy(x))).squeeze(-1) for m in loaded.net.mlps])
    assert logits(loaded.net, x)[0] == pytest.approx(float(mlps.mean()), abs=1e-6)
    torch.save({**blob, "state": {**old, "surplus": torch.zeros(1)}}, copy / "model.pt")
    with pytest.raises(ValueError, match="does not match"):
        FraudModel.load(copy)


def test_a_new_fraud_pattern_is_picked_up_from_its_labels(fraud_model, tmp_path):
    """Account takeover (absent from training): the same day's payments, scored before and after two days of labels.

    Labels arrive as the worker gets them (every chargeback, a verdict on
    every alert, 2% audits) and are learned with their case-control offset.
    Comparing the same payments with and without the learned corrections
    measures the learning itself, not the difference between two days.
    """
    from sklearn.metrics import average_precision_score

    model, _ = fraud_model
    frame = simulated_frame(tmp_path / "ato.csv", days=4, per_day=3000, seed=2, scenarios=EXTRA_SCENARIOS)
    _, x = rows_and_inputs(frame)
    y = frame["label"].to_numpy(dtype=int)
    day = ((frame["epoch_s"] - frame["epoch_s"].min()) // DAY).to_numpy()
    untaught, learner = ModelScorer(model).new_learner(), ModelScorer(model).new_learner()
    rng = np.random.default_rng(0)
    for d in (1, 2):
        rows = np.flatnonzero(day == d)
        decided, _ = model.score_arrays(x[rows], learner)
        for i, xi, s in zip(rows, model.online_inputs(x[rows], model.base_logits(x[rows])), decided, strict=True):
            if y[i] or s >= 0.5 or rng.random() < 0.02:  # chargebacks, analysts' verdicts on alerts, audits
                learner.learn(str(frame["event_id"][i]), xi, bool(y[i]), float(s), 0.5, labelled_share(s, 0.5, 0.02))
    later = np.flatnonzero(day == 3)
    fraud = y[later] == 1
    before, _ = model.score_arrays(x[later], untaught)
    after, _ = model.score_arrays(x[later], learner)
    measured = {"frauds": int(fraud.sum()), "mean_before": before[fraud].mean(), "mean_after": after[fraud].mean(),
                "ap_before": average_precision_score(fraud, before), "ap_after": average_precision_score(fraud, after),
                "frauds_scored_higher": (after[fraud] > before[fraud]).mean(),
                "genuine_flagged_before": (before[~fraud] >= 0.5).mean(),
                "genuine_flagged_after": (after[~fraud] >= 0.5).mean()}
    print(measured)  # the README quotes these
    assert measured["frauds"] >= 10
    assert measured["frauds_scored_higher"] >= 0.8, measured
    assert measured["mean_after"] > 1.1 * measured["mean_before"], measured
    assert measured["ap_after"] > measured["ap_before"], measured
    assert measured["genuine_flagged_after"] <= measured["genuine_flagged_before"] + 0.005, measured


def test_bootstrap_average_precision_matches_scikit_learn_with_ties():
    from sklearn.metrics import average_precision_score

    from kestrel.offline.paired_ap import paired_ap_gain

    rng = np.random.default_rng(4)
    y = (rng.random(3000) < 0.03).astype(int)
    a = np.round(y + rng.normal(0, 0.5, 3000), 1)  # rounded: many tied scores
    b = np.round(y + rng.normal(0, 0.9, 3000), 1)
    g = paired_ap_gain(y, a, b, np.arange(3000) // 3, draws=200)
    assert g["gain"] == pytest.approx(average_precision_score(y, a) - average_precision_score(y, b), abs=1e-4)
    assert g["ci95"][0] < g["gain"] < g["ci95"][1]


@pytest.mark.parametrize(("stack_noise", "network_noise", "deploy_stack"), [
    (1.5, 0.6, False),  # the stack is clearly worse on validation: the members alone are deployed
    (0.6, 1.5, True),   # clearly better: kept
    (0.9, 0.9, True),   # the same quality (independent noise): within noise, kept
])
def test_the_selection_rule_never_deploys_a_stack_worse_than_the_network(stack_noise, network_noise, deploy_stack):
    from kestrel.offline.fraud_train import select_stack

    rng = np.random.default_rng(11)
    y = (rng.random(4000) < 0.05).astype(int)
    network, stacked = y + rng.normal(0, network_noise, 4000), y + rng.normal(0, stack_noise, 4000)
    keep, report = select_stack(y, network, stacked, np.arange(4000) // 2)
    assert keep is deploy_stack
    assert report["deployed"] == ("members + river layer" if deploy_stack else "members alone")
    hi = report["stack_minus_members_ap"]["ci95"][1]
    assert (hi >= 0) is deploy_stack


def test_the_frozen_layer_deployed_instead_is_the_network_alone_and_learns_nothing():
    from kestrel.models.fraud_online import BASE, OnlineFraudLearner

    layer = OnlineFraudLearner(lr=0.0, base_weight=1.0)
    xs = [{BASE: z, "amount_log": 3.0} for z in (-4.0, 0.0, 2.5)]
    network = 1.0 / (1.0 + np.exp(-np.array([-4.0, 0.0, 2.5])))
    np.testing.assert_allclose(layer.predict(xs), network, rtol=1e-9)
    for i in range(50):
        layer.learn(f"l{i}", xs[i % 3], is_fraud=i % 2 == 0, score=0.5)
    np.testing.assert_allclose(layer.predict(xs), network, rtol=1e-9)


def test_training_reports_the_selection_it_made(fraud_model):
    model, path = fraud_model
    selection = model.report["selection"]
    assert FraudModel.load(path).report["selection"] == selection  # kept in the artifact
    assert selection["deployed"] in ("members + river layer", "members alone")
    assert "95%" in selection["rule"] and len(selection["stack_minus_members_ap"]["ci95"]) == 2


@pytest.mark.parametrize(("network_noise", "trees_noise", "deployed", "weights"), [
    (0.6, 0.6, "network + trees", (0.5, 0.5)),  # equal members, independent errors: the blend beats both
    (0.6, 0.9, "network + trees", (0.5, 0.5)),  # one weaker member: the blend still helps
    (0.5, 3.0, "network", (1.0, 0.0)),          # trees near useless: the blend is worse beyond noise
    (3.0, 0.5, "trees", (0.0, 1.0)),            # the network near useless: the trees alone
])
def test_the_member_rule_never_deploys_a_blend_worse_than_its_best_member(network_noise, trees_noise, deployed,
                                                                          weights):
    from sklearn.metrics import average_precision_score

    from kestrel.offline.fraud_train import select_members

    rng = np.random.default_rng(5)
    y = (rng.random(5000) < 0.05).astype(int)
    network, trees = 2 * y + rng.normal(0, network_noise, 5000), 2 * y + rng.normal(0, trees_noise, 5000)
    chosen, report = select_members(y, network, trees, np.arange(5000) // 2)
    assert chosen == weights and report["deployed"] == deployed
    deployed_scores = chosen[0] * network + chosen[1] * trees
    best = max(average_precision_score(y, network), average_precision_score(y, trees))
    gain = report["blend_minus_best_member_ap"]
    # what is deployed is never below the better member beyond the interval's width
    assert average_precision_score(y, deployed_scores) >= best - (gain["ci95"][1] - gain["ci95"][0])
    assert (gain["ci95"][1] < 0) is (deployed != "network + trees")


@pytest.mark.parametrize(("noise", "chosen"), [
    ({0.001: 0.6, 0.003: 0.6, 0.01: 0.6}, 0.003),  # no difference the window can show: the default step
    ({0.001: 0.6, 0.003: 0.6, 0.01: 2.0}, 0.003),  # another step clearly worse: still the default
    ({0.001: 2.0, 0.003: 2.0, 0.01: 0.6}, 0.01),   # another step clearly better: it
    ({0.001: 0.6, 0.003: 2.0, 0.01: 2.0}, 0.001),
])
def test_the_layer_step_rule_keeps_the_default_unless_another_step_is_better_beyond_noise(noise, chosen):
    from kestrel.offline.fraud_train import select_layer_step

    rng = np.random.default_rng(8)
    y = (rng.random(5000) < 0.05).astype(int)
    signal = y + rng.normal(0, 0.3, 5000)  # shared by all steps: they differ by their own noise only
    scores = {step: signal + rng.normal(0, sd, 5000) for step, sd in noise.items()}
    step, report = select_layer_step(y, scores, np.arange(5000) // 2)
    assert step == chosen and report["chosen"] == chosen
    gain = report["best_minus_default_ap"]
    assert (gain is not None and gain["ci95"][0] > 0) is (chosen != 0.003)
