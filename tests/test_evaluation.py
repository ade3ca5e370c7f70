"""Evaluation on a temporal split and the report: metrics, baselines, churn labels, files."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pytest
from rich.console import Console
from sklearn.metrics import roc_auc_score

from model import BeatConfig, PretrainConfig, init_model_dir
from model.evaluation import (
    EvalConfig,
    TransitionBaseline,
    check_label_window,
    churn_labels,
    evaluate_model,
    future_labels,
    masked_windows,
    most_valuable_action,
    probe_models,
    rfm_features,
    weighted_auc,
)
from model.report import print_summary, write_report
from model.sequences import SEQUENCE_SCHEMA, lengths, split_at
from model.train import TrainConfig, train
from stream.synthetic import SyntheticEvents

from conftest import synthetic_sequences

DAY_MS = 86_400_000
START = datetime(2024, 1, 1, tzinfo=UTC)
CUTOFF = datetime(2024, 3, 1, tzinfo=UTC)
END = datetime(2024, 4, 1, tzinfo=UTC)
CUTOFF_MS = int(CUTOFF.timestamp() * 1000)
# Churners fade out within the first 60 days, so by the cutoff every one of them is gone.
EVENTS = SyntheticEvents(240, seed=5, churn_fraction=0.3, origin=START, churn_horizon_days=60)
QUICK = EvalConfig(bootstrap=200, segments=4)


@pytest.fixture(scope="module")
def sequences() -> pa.Table:
    return synthetic_sequences(EVENTS, START, END)


@pytest.fixture(scope="module")
def trained(sequences, tmp_path_factory) -> str:
    """A tiny model trained for a few steps on the events before the cutoff (plumbing only)."""
    out = tmp_path_factory.mktemp("trained")
    past, _ = split_at(sequences, CUTOFF_MS)
    train(
        past,
        out,
        BeatConfig.preset("tiny"),
        PretrainConfig(min_view_events=3, max_view_events=8),
        TrainConfig(steps=6, batch_size=8, warmup_steps=1, log_every=2, checkpoint_every=6),
    )
    return str(out)


def hand_made(users: dict[str, list[tuple[float, str]]]) -> pa.Table:
    """A sequences table from {user: [(day, action), ...]} (days after the cutoff's epoch day 0)."""
    rows = sorted(users.items())
    return pa.table(
        {
            "user_id": [u for u, _ in rows],
            "event_time": [[int(day * DAY_MS) for day, _ in events] for _, events in rows],
            "action": [[a for _, a in events] for _, events in rows],
            "property": [[None] * len(events) for _, events in rows],
            "value": [[None] * len(events) for _, events in rows],
        }
    ).cast(SEQUENCE_SCHEMA)


# --- the whole evaluation and the report ---------------------------------------------------


def in_unit_interval(metric: dict) -> bool:
    low, high = metric["ci95"]
    return 0 <= low <= metric["value"] <= high <= 1


@pytest.mark.training
def test_evaluation_of_a_trained_model_and_its_report(sequences, trained, tmp_path):
    results = evaluate_model(trained, sequences, CUTOFF_MS, QUICK)

    data = results["data"]
    assert data["users"] == 240 and data["events"] == int(lengths(sequences).sum())
    assert data["events_before_cutoff"] + data["events_after_cutoff"] == data["events"]
    assert 0.2 < data["churn_rate"] < 0.6
    masked = results["masked"]
    assert (
        masked["windows"] == data["users_with_future"]
        and masked["masked_events"] >= masked["windows"]
    )
    for field in ("action", "property"):
        assert all(in_unit_interval(m) for m in masked[field].values())
        next_event = dict(results["next_event"][field])
        probes = next_event.pop("probes")
        assert set(next_event) == {"beat", "markov", "popular"}
        assert set(probes) == {"users", "beat", "untrained"} and probes["users"] > 50
        for rates in [*next_event.values(), probes["beat"], probes["untrained"]]:
            assert in_unit_interval(rates["hit@1"]) and in_unit_interval(rates["hit@10"])
            assert rates["hit@1"]["value"] <= rates["hit@10"]["value"]
    for task in ("churn", "propensity"):
        scores = results[task]
        assert set(scores["auc"]) == {
            "beat_logistic",
            "untrained_logistic",
            "rfm_logistic",
            "rfm_boosting",
            "beat_rfm_logistic",
        }
        assert all(in_unit_interval(m) for m in scores["auc"].values())
        for name in (
            "beat_minus_best_handmade",
            "beat_rfm_minus_best_handmade",
            "beat_minus_untrained",
        ):
            low, high = scores[name]["ci95"]
            assert low <= scores[name]["value"] <= high
    churn = results["churn"]
    totals: dict[str, float] = {}  # value per action before the cutoff, counted here in Python
    past = split_at(sequences, CUTOFF_MS)[0]
    for actions, values in zip(past["action"].to_pylist(), past["value"].to_pylist()):
        for action, value in zip(actions, values):
            totals[action] = totals.get(action, 0.0) + (value or 0.0)
    assert results["propensity"]["action"] == max(totals, key=totals.get)
    segments = results["segments"]["segments"]
    assert sum(s["users"] for s in segments) == data["users_with_history"] and len(segments) == 4
    assert all(s["events_per_active_day"] >= 1 and len(s["top_actions"]) == 3 for s in segments)

    paths = write_report(tmp_path, results)
    report = json.loads(paths["report.json"].read_text())
    assert report["churn"]["auc"]["rfm_boosting"] == churn["auc"]["rfm_boosting"]
    assert "map" not in report["segments"]
    assert report["training"]["steps"] == 6 and set(report["training"]["losses"]) >= {
        "masked",
        "next",
        "contrastive",
    }
    for name in ("segments.png", "loss.png"):
        assert paths[name].read_bytes()[:4] == b"\x89PNG"
    assert paths["segments.csv"].read_text().startswith('"user_id","x","y","segment"')
    console = Console(record=True, width=160)
    print_summary(results, console)
    assert "beat_rfm_logistic" in console.export_text()


def test_a_plain_model_directory_is_evaluated_without_heads(sequences, tmp_path):
    init_model_dir(tmp_path, "tiny", EVENTS.actions, EVENTS.properties)
    few = sequences.slice(0, 80)
    results = evaluate_model(tmp_path, few, CUTOFF_MS, QUICK)
    assert "pretrain_heads" in results["masked"]["skipped"]
    assert set(results["next_event"]["action"]) == {"markov", "popular", "probes"}
    assert results["train_log"] is None and "loss.png" not in write_report(tmp_path / "r", results)


def test_churn_labels_need_data_past_the_label_window(sequences):
    with pytest.raises(ValueError, match="churn_days"):
        check_label_window(sequences, int(datetime(2024, 3, 10, tzinfo=UTC).timestamp() * 1000), 30)
    check_label_window(sequences, CUTOFF_MS, 30)


# --- pieces --------------------------------------------------------------------------------


def test_rfm_churn_model_finds_the_planted_churners(sequences):
    past, future = split_at(sequences, CUTOFF_MS)
    active = lengths(past) > 0
    history, after = past.filter(pa.array(active)), future.filter(pa.array(active))
    labels = churn_labels(after, CUTOFF_MS, 30)
    planted = dict(zip(*(EVENTS.personas()[c].to_pylist() for c in ("user_id", "churner"))))
    churner = np.array([planted[u] for u in history["user_id"].to_pylist()])
    assert churner.sum() > 20 and labels[churner].all()  # every planted churner is labelled churned
    # (retained users may be labelled churned too: the rarest users can go quiet for a month)

    names, rfm = rfm_features(history, CUTOFF_MS, top_actions=8)
    noise = np.random.default_rng(0).normal(size=(len(labels), 16))  # stands in for embeddings
    # the RFM features themselves stand in for a model that carries them all
    churn = probe_models(noise, rfm, rfm, labels, QUICK)
    assert (
        churn["auc"]["rfm_boosting"]["value"] > 0.9 and churn["auc"]["rfm_logistic"]["value"] > 0.9
    )
    low, high = churn["auc"]["beat_logistic"]["ci95"]
    assert low < 0.5 < high  # noise has no signal, and the interval says so
    assert churn["beat_minus_best_handmade"]["ci95"][1] < 0
    assert churn["beat_minus_untrained"]["ci95"][1] < 0
    assert churn["beat_rfm_minus_best_handmade"]["ci95"][0] < 0.05  # noise adds nothing
    assert names[:3] == ["recency_days", "tenure_days", "log_events"] and len(names) == 9 + 8


def test_propensity_labels_the_most_valuable_action_within_the_horizon():
    day = DAY_MS
    table = pa.table(
        {
            "user_id": ["a", "b", "c"],
            "event_time": [[10 * day, 50 * day], [12 * day], [11 * day, 20 * day]],
            "action": [["view", "buy"], ["buy"], ["view", "view"]],
            "property": [[None, None], [None], [None, None]],
            "value": [[None, 30.0], [5.0], [None, None]],
        }
    ).cast(SEQUENCE_SCHEMA)
    assert most_valuable_action(table) == "buy"
    labels = future_labels(table, cutoff_ms=10 * day, days=30, action="buy")
    assert labels.tolist() == [False, True, False]  # a's purchase is 40 days after the cutoff
    assert future_labels(table, cutoff_ms=10 * day, days=30).tolist() == [True, True, True]
    no_values = table.set_column(
        4, "value", pa.array([[None, None], [None], [None, None]], pa.list_(pa.float64()))
    )
    assert most_valuable_action(no_values) is None


def test_rfm_features_of_a_hand_made_user():
    table = hand_made({"a": [(1, "x"), (3, "y"), (7, "x"), (9.5, "x")], "b": [(5, "y")]})
    names, rfm = rfm_features(table, cutoff_ms=10 * DAY_MS, top_actions=2)
    a, b = dict(zip(names, rfm[0])), dict(zip(names, rfm[1]))
    assert a["recency_days"] == 0.5 and a["tenure_days"] == 9 and a["log_events"] == np.log1p(4)
    assert a["log_events_7d"] == np.log1p(2) and a["log_events_30d"] == np.log1p(4)
    np.testing.assert_allclose(
        [a["gap_mean_days"], a["gap_std_days"], a["gap_max_days"]], [17 / 6, np.std([2, 4, 2.5]), 4]
    )
    assert a["log_x"] == np.log1p(3) and b["log_y"] == np.log1p(1) and b["gap_max_days"] == 0


def test_markov_baseline_beats_popularity_on_a_planted_chain():
    # users walk the cycle 3 → 4 → 5 → 6 → 7 → 3 ..., with one step in ten to a random id
    rng = np.random.default_rng(0)
    users, steps = 200, 50
    ids = np.empty((users, steps), np.int64)
    ids[:, 0] = rng.integers(3, 8, users)
    for t in range(1, steps):
        ids[:, t] = np.where(
            rng.random(users) < 0.1, rng.integers(3, 8, users), (ids[:, t - 1] - 2) % 5 + 3
        )
    baseline = TransitionBaseline.fit(
        ids[:, :-1].ravel(), np.repeat(np.arange(users), steps - 1), 10
    )
    markov = baseline.markov_ranks(ids[:, -2], ids[:, -1])
    popular = baseline.popular_ranks(ids[:, -1])
    assert (markov == 0).mean() > 0.85 and (popular == 0).mean() < 0.35
    assert (markov < 5).all() and (popular < 5).all()  # never ranks padding or OOV above them
    # a previous id never seen followed by anything falls back to popularity
    np.testing.assert_array_equal(baseline.ranks[9], baseline.popularity_ranks)


def test_masked_windows_keep_the_first_future_events_after_the_newest_history():
    table = hand_made(
        {"a": [(d, f"e{d}") for d in range(10)], "b": [(1, "x")], "c": [(8, "y"), (9, "z")]}
    )
    history = lengths(split_at(table, 7 * DAY_MS)[0])  # a: 7, b: 1, c: 0
    windows, context = masked_windows(table, history, max_events=6, future_share=0.5)
    assert windows["user_id"].to_pylist() == ["a", "c"]  # b has no future
    assert windows["action"].to_pylist() == [["e4", "e5", "e6", "e7", "e8", "e9"], ["y", "z"]]
    np.testing.assert_array_equal(context, [3, 0])


def test_weighted_auc_is_roc_auc_with_ties_and_a_bootstrap_of_multiplicities():
    rng = np.random.default_rng(1)
    labels = rng.random(300) < 0.3
    scores = np.round(labels + rng.normal(size=300), 1)  # rounding makes ties
    assert weighted_auc(scores, labels, np.ones((1, 300)))[0] == pytest.approx(
        roc_auc_score(labels, scores)
    )
    twice = np.r_[np.arange(300), np.arange(150)]
    weights = np.bincount(twice, minlength=300)[None].astype(float)
    assert weighted_auc(scores, labels, weights)[0] == pytest.approx(
        roc_auc_score(labels[twice], scores[twice])
    )
