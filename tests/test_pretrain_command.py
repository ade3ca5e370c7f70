"""`beat pretrain` end to end: synthetic history in the broker -> model directory + report."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from model import BeatEncoder
from stream.cli import main
from stream.config import Settings
from stream.producer import produce
from stream.synthetic import SyntheticEvents


def test_pretrain_from_the_topic_writes_model_and_report(settings: Settings, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    history = SyntheticEvents(n_users=120, seed=3, origin=start, churn_horizon_days=100).history(
        start, start + timedelta(days=100)
    )
    sent = produce(settings, history)
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "run"
    args = ["pretrain", "--out", str(out), "--preset", "tiny", "--steps", "6", "--batch-size", "16",
            "--warmup-steps", "2", "--checkpoint-every", "3", "--log-every", "1"]

    assert main(args) == 0

    report = json.loads((out / "report.json").read_text())
    assert report["load"]["events"] + report["load"]["duplicates"] == sent
    assert report["training_run"]["steps"] == 6
    assert (
        0 <= report["churn"]["auc"]["rfm_logistic"]["value"] <= 1
        and report["churn"]["auc"]["beat_logistic"]["value"] >= 0
    )
    assert (out / "loss.png").stat().st_size > 0 and (out / "segments.png").stat().st_size > 0
    encoder = BeatEncoder.from_pretrained(out / "model")
    assert encoder.model_version == report["training_run"]["model_version"]
    # The same command again resumes: nothing left to train, same model.
    assert main(args) == 0
    assert (
        json.loads((out / "report.json").read_text())["training_run"]["model_version"]
        == encoder.model_version
    )


def test_pretrain_without_broker_or_file_says_what_to_set(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    monkeypatch.setenv("BEAT_DATA_DIR", str(tmp_path))  # no `beat broker` record
    assert main(["pretrain", "--out", str(tmp_path)]) == 2
    assert "--sequences" in capsys.readouterr().err


def test_model_init_builds_the_vocabularies_from_the_users_events(tmp_path: Path) -> None:
    import pyarrow as pa

    from model.sequences import SEQUENCE_SCHEMA, write_sequences

    day = 86_400_000
    write_sequences(pa.table({
        "user_id": ["a", "b"],
        "event_time": [[day, 2 * day, 3 * day], [day]],
        "action": [["deposit", "withdraw", "deposit"], ["deposit"]],
        "property": [["atm", None, "branch"], ["atm"]],
        "value": [[50.0, 20.0, 10.0], [5.0]],
    }).cast(SEQUENCE_SCHEMA), tmp_path / "history.parquet")
    out = tmp_path / "model"
    assert main(["model", "init", str(out), "--preset", "tiny",
                 "--sequences", str(tmp_path / "history.parquet")]) == 0
    encoder = BeatEncoder.from_pretrained(out)
    assert encoder.actions.tokens == ["deposit", "withdraw"]  # most frequent first
    assert encoder.properties.tokens == ["atm", "branch"]
