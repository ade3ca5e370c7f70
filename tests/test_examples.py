"""The examples/ other teams copy, run against the real broker, stream worker and stores."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import yaml

from stream.codec import AvroCodec
from stream.config import Settings, load_settings
from stream.feast_server import feast_server
from stream.feast_sink import EmbeddingRows, FeatureSink, feature_store_yaml
from stream.window import Window, event_id_hashes

from conftest import POSTGRES_URL, REPO, read_topic, stream_worker

EXAMPLES = REPO / "examples"
NOW = datetime.now(timezone.utc).replace(microsecond=0)


def example(name: str) -> ModuleType:
    """examples/<name>.py as a module (examples/ is not a package: teams copy single files)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def imported_modules(path: Path) -> set[str]:
    """The top-level names of every module a file imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_the_producer_needs_only_confluent_kafka_and_fastavro() -> None:
    outside = imported_modules(EXAMPLES / "producer.py") - set(sys.stdlib_module_names)
    assert outside == {"confluent_kafka", "fastavro"}


def test_the_producer_writes_the_bytes_beatstream_writes() -> None:
    """Its framing and body are byte for byte the platform's own codec's."""
    event = {"user_id": "u1", "event_id": "e1", "event_time": "2026-11-30T09:15:00Z",
             "action": "purchase", "property": "books", "value": 12.5,
             "attributes": {"app": "ios"}}
    producer = example("producer")
    ours = AvroCodec("behavior_event", "beat.events")
    encoded = producer.EventEncoder().encode(event)
    assert encoded == ours.encode(producer.as_record(event))
    assert ours.decode(encoded)["event_time"] == datetime(2026, 11, 30, 9, 15, tzinfo=timezone.utc)
    epoch_ms = int(datetime(2026, 11, 30, 9, 15, tzinfo=timezone.utc).timestamp() * 1000)
    assert producer.EventEncoder().encode({**event, "event_time": epoch_ms}) == encoded


def run_producer(settings: Settings, events: list[dict]) -> subprocess.CompletedProcess:
    """examples/producer.py as a team runs it: JSON lines on stdin."""
    properties = [f"-X{name}={value}" for name, value in settings.kafka_properties.items()]
    return subprocess.run(
        [sys.executable, str(EXAMPLES / "producer.py"), "--bootstrap-servers",
         settings.bootstrap_servers, "--topic", settings.events_topic, *properties],
        input="".join(json.dumps(e) + "\n" for e in events), capture_output=True, text=True,
        timeout=60,
    )


def shop_event(user: str, n: int) -> dict:
    """A valid event n minutes into the last hour, times in both forms the producer takes."""
    at = NOW - timedelta(minutes=60 - n)
    return {"user_id": user, "event_id": f"{user}-{n}",
            "event_time": at.isoformat() if n % 2 else int(at.timestamp() * 1000),
            "action": ["page_view", "add_to_cart", "purchase"][n % 3],
            **({"property": "books", "value": 9.5} if n % 3 == 2 else {})}


def test_producer_events_are_windowed_and_bad_ones_dead_lettered(
    settings: Settings, tmp_path: Path
) -> None:
    users = [f"user-{u}" for u in range(6)]
    good = [shop_event(user, n) for user in users for n in range(4)]
    no_action = {**shop_event("user-0", 10), "event_id": "bad-1", "action": ""}
    tomorrow = {**shop_event("user-1", 11), "event_id": "bad-2",
                "event_time": int((NOW + timedelta(days=1)).timestamp() * 1000)}
    sent = run_producer(settings, good + [no_action, tomorrow])
    assert sent.returncode == 0, sent.stderr
    assert f"26 of 26 events delivered to {settings.events_topic}" in sent.stderr

    window_codec = AvroCodec("user_window", settings.windows_topic)

    def latest(messages: list) -> dict[str, Window]:
        windows = (Window.from_record(window_codec.decode(m.value()))
                   for m in messages if m.value() is not None)
        return {w.user_id: w for w in windows}

    with stream_worker(settings, tmp_path / "stream.log"):
        windows = read_topic(settings, settings.windows_topic, timeout_s=60,
                             until=lambda m: {u: len(w) for u, w in latest(m).items()}
                             == dict.fromkeys(users, 4))
        dead = read_topic(settings, settings.dead_letter_topic, until=lambda m: len(m) >= 2)
        moved = read_topic(settings, settings.repartition_topic)

    for user, window in latest(windows).items():  # exactly the user's four events
        ids = [e["event_id"] for e in good if e["user_id"] == user]
        assert sorted(window.rows["id_hash"].tolist()) == sorted(
            event_id_hashes(pa.array(ids)).tolist())
    reasons = {m.key(): dict(m.headers())["dlq.reason"].decode() for m in dead}
    assert reasons.keys() == {b"user-0", b"user-1"}
    assert reasons[b"user-0"] == "missing action"
    assert re.fullmatch(r"event_time is 8\d{4}s in the future", reasons[b"user-1"])
    assert all(dict(m.headers())["dlq.topic"].decode() == settings.events_topic for m in dead)
    assert moved == []  # murmur2_random put every event on its key's partition


def test_the_producer_stops_at_a_line_that_is_not_an_event(settings: Settings) -> None:
    lines = [shop_event("user-0", 1), {"user_id": "user-0", "event_id": "x", "action": "login"}]
    sent = run_producer(settings, lines)
    assert sent.returncode == 2
    assert "line 2: not a behavior_event (KeyError('event_time'))" in sent.stderr


# -- reading embeddings: the fraud scorer (SDK) and the personalization lookup (HTTP) --------

T1_MS = 1_780_315_200_000  # 2026-06-01 12:00 UTC
HOUR_MS = 3_600_000
VERSION = "beat-small-1a2b3c4d"


def embedding_rows(users: list[str], signs: np.ndarray, at_ms: int, seed: int,
                   version: str = VERSION) -> EmbeddingRows:
    """Embeddings along one direction of the embedding space (+1: fraud-like, -1: not), with
    a little noise, as of at_ms."""
    rng = np.random.default_rng(seed)
    direction = np.zeros(768, np.float32)
    direction[:8] = 1 / np.sqrt(8)
    noise = 0.1 * rng.standard_normal((len(users), 768))
    return EmbeddingRows(
        user_id=users, embedding=(signs[:, None] * direction + noise).astype(np.float32),
        model_version=version, event_count=np.full(len(users), 12),
        last_event_time_ms=np.full(len(users), at_ms - 60_000), as_of_ms=np.full(len(users), at_ms),
    )


@pytest.fixture
def history_settings(postgres_project: str, tmp_path: Path) -> Settings:
    """A deployment with the embedding history in PostgreSQL (Feast sqlite online)."""
    return load_settings(feast_project=postgres_project, feast_data_dir=tmp_path / "feast",
                         offline_store="postgres", postgres_url=POSTGRES_URL)


def deployment_yaml(settings: Settings, directory: Path) -> Path:
    """The feature_store.yaml a reading team gets (`beat feast-config`)."""
    path = directory / "feature_store.yaml"
    path.write_text(yaml.safe_dump(feature_store_yaml(settings)))
    return path


@pytest.fixture
def fraud_history(history_settings: Settings) -> tuple[FeatureSink, pd.DataFrame]:
    """40 users labelled half an hour after T1, when the fraudsters' embeddings pointed one way;
    an hour later every user's embedding points the other way (accounts closed, cards
    replaced), so a classifier that learnt from later rows than the labels' learns it
    backwards. Then five suspects (fraud-like) and five regulars appear, online and in history."""
    sink = FeatureSink(history_settings)
    users = [f"user-{i:02d}" for i in range(40)]
    fraud = np.arange(40) < 20
    signs = np.where(fraud, 1.0, -1.0)
    sink.write(embedding_rows(users, signs, T1_MS, seed=1))
    sink.write(embedding_rows(users, -signs, T1_MS + HOUR_MS, seed=2))
    new = [f"suspect-{i}" for i in range(5)] + [f"regular-{i}" for i in range(5)]
    sink.write(embedding_rows(new, np.repeat([1.0, -1.0], 5), T1_MS + 2 * HOUR_MS, seed=3))
    labels = pd.DataFrame({
        "user_id": users,
        "event_timestamp": pd.to_datetime(T1_MS + HOUR_MS // 2, unit="ms", utc=True),
        "is_fraud": fraud.astype(int),
    })
    return sink, labels


def test_the_fraud_scorer_learns_from_the_embeddings_current_at_each_label(
    history_settings: Settings, fraud_history: tuple[FeatureSink, pd.DataFrame], tmp_path: Path
) -> None:
    from feast import FeatureStore

    sink, labels = fraud_history
    fraud_scorer = example("fraud_scorer")
    store = FeatureStore(fs_yaml_file=deployment_yaml(history_settings, tmp_path))

    frame = fraud_scorer.training_frame(store, labels, fraud_scorer.SERVICE)
    at_t1 = embedding_rows(labels["user_id"].tolist(), np.where(labels["is_fraud"], 1.0, -1.0),
                           T1_MS, seed=1)
    by_user = frame.set_index("user_id")["embedding"]
    for user, vector in zip(at_t1.user_id, at_t1.embedding):  # point in time: T1's rows
        np.testing.assert_array_equal(np.asarray(by_user[user], np.float32), vector)

    scorer = fraud_scorer.FraudScorer.train(store, labels)
    vector = np.asarray(frame["embedding"].iloc[0], np.float64)  # its arithmetic is sklearn's
    assert scorer.probability(vector) == pytest.approx(
        scorer.classifier.predict_proba(vector[None])[0, 1], rel=1e-9)
    suspects = [scorer.score(f"suspect-{i}") for i in range(5)]
    regulars = [scorer.score(f"regular-{i}") for i in range(5)]
    assert min(suspects) > 0.8 and max(regulars) < 0.2, (suspects, regulars)
    assert scorer.score("never-seen") is None

    # A new model's embedding is not comparable: the scorer refuses it.
    sink.write(embedding_rows(["suspect-0"], np.ones(1), T1_MS + 3 * HOUR_MS, seed=4,
                              version="beat-small-99999999"))
    with pytest.raises(fraud_scorer.ModelVersionChanged, match="beat-small-99999999"):
        scorer.score("suspect-0")


@pytest.mark.broker  # starts a process (feast serve, the command)
def test_the_fraud_scorer_command(
    history_settings: Settings, fraud_history: tuple[FeatureSink, pd.DataFrame], tmp_path: Path
) -> None:
    _, labels = fraud_history
    labels.to_csv(tmp_path / "labels.csv", index=False)
    scored = subprocess.run(
        [sys.executable, str(EXAMPLES / "fraud_scorer.py"),
         "-f", str(deployment_yaml(history_settings, tmp_path)),
         "--labels", str(tmp_path / "labels.csv"),
         "--user", "suspect-1", "--user", "regular-1", "--user", "never-seen"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert scored.returncode == 0, scored.stderr
    lines = dict(line.split("\t") for line in scored.stdout.splitlines())
    assert float(lines["suspect-1"]) > 0.8 and float(lines["regular-1"]) < 0.2
    assert lines["never-seen"] == "no embedding"


@pytest.mark.broker  # starts a process (feast serve, the command)
def test_the_personalization_lookup_reads_through_feast_serve_with_curl(tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed: examples/personalization_lookup.sh needs it")
    settings = load_settings(feast_project=f"beat_lookup_{tmp_path.name[-8:].lower()}",
                             feast_data_dir=tmp_path / "feast")
    sink = FeatureSink(settings)
    rows = embedding_rows(["u-1", "u-2"], np.array([1.0, -1.0]), T1_MS, seed=5)
    sink.write(rows)
    script = str(EXAMPLES / "personalization_lookup.sh")
    with feast_server(settings, tmp_path) as url:
        looked_up = subprocess.run([script, url, "u-2", "nobody"], capture_output=True,
                                   text=True, timeout=60)
        usage = subprocess.run([script, url], capture_output=True, text=True, timeout=60)

    assert looked_up.returncode == 0, looked_up.stderr
    body = json.loads(looked_up.stdout)
    names = body["metadata"]["feature_names"]
    results = dict(zip(names, body["results"]))
    got = np.array(results["embedding"]["values"][0], np.float32)
    assert got.view(np.uint32).tolist() == rows.embedding[1].view(np.uint32).tolist()
    assert results["model_version"]["values"] == [VERSION, None]
    assert results["embedding"]["statuses"] == ["PRESENT", "NOT_FOUND"]
    assert usage.returncode == 2 and "usage:" in usage.stderr
