"""Metrics, /healthz and /readyz of the workers (stream/observability.py).

The end-to-end test scrapes a stream worker process and an encoder worker while events
flow and checks that the counters add up against what was sent and read back.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from confluent_kafka import Message, Producer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from model import BeatEncoder, init_model_dir
from stream.broker import producer_config
from stream.codec import AvroCodec
from stream.config import ConfigError, Settings, load_settings
from stream.encoder_worker import EncoderWorker
from stream.feast_sink import FeatureSink
from stream.observability import (
    UNDECODABLE,
    EncoderMetrics,
    WorkerMetrics,
    reason_kind,
    serving,
)
from stream.producer import EventProducer
from stream.runtime import Batching, WorkerRuntime
from stream.stream_worker import Rejected, validate

from conftest import REPO, read_topic, running, stream_worker, wait_for
from reference_windows import ACTIONS, PROPERTIES, event


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics: (name, labels) -> value."""
    status, text = get(port, "/metrics")
    assert status == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: dict, name: str, **labels: str) -> float:
    """The sum of name's samples whose labels include labels."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def test_reasons_are_counted_under_few_kinds() -> None:
    events_codec = AvroCodec("behavior_event", "t")
    from stream.event_columns import EventDecoder

    decoded = EventDecoder(events_codec).decode([b"garbage"])
    now = int(time.time() * 1000)
    assert [reason_kind(r) for _, r in decoded.rejected] == [UNDECODABLE]
    bad = [
        {**event("u", 0, datetime.now(UTC)), "action": ""},
        event("u", 1, datetime.now(UTC) + timedelta(days=2)),
        event("u", 2, datetime(1960, 1, 1, tzinfo=UTC)),
        event("v", 3, datetime.now(UTC)),  # keyed by another user below
    ]
    columns = EventDecoder(events_codec).decode([events_codec.encode(e) for e in bad])
    rejected = Rejected()
    keys = pa.array([b"u", b"u", b"u", b"u"], pa.binary())
    validate(columns, keys, now, 3_600_000, rejected)
    assert [reason_kind(r) for r in rejected.reason] == [
        "missing_field", "wrong_key", "future_time", "time_out_of_range"
    ]
    assert reason_kind("an action of 300 bytes is over BEAT_MAX_ACTION_BYTES=256") == "over_limit"
    assert reason_kind("window has no events") == "empty_window"


def test_lag_follows_the_assigned_partitions() -> None:
    metrics = WorkerMetrics()

    def statistics(**partitions: dict) -> str:
        return json.dumps({"topics": {"t": {"partitions": {
            "-1": {"desired": False, "app_offset": -1001, "committed_offset": -1001,
                   "hi_offset": -1},
            **{p: {"desired": True, "app_offset": -1001, "committed_offset": -1001,
                   "hi_offset": -1, **about} for p, about in partitions.items()},
        }}}})

    metrics.read_statistics(statistics(**{
        "0": {"app_offset": 7, "hi_offset": 10},
        "1": {"committed_offset": 4, "hi_offset": 4},  # nothing consumed yet: committed
        "2": {},  # nothing known
    }))
    lag = {s.labels["partition"]: s.value
           for s in metrics.consumer_lag.collect()[0].samples}
    assert lag == {"0": 3, "1": 0}
    metrics.read_statistics(statistics(**{"1": {"app_offset": 9, "hi_offset": 12}}))
    lag = {s.labels["partition"]: s.value
           for s in metrics.consumer_lag.collect()[0].samples}
    assert lag == {"1": 3}  # partition 0 was revoked: its series goes


def test_health_and_readiness_answer(tmp_path: Path) -> None:
    port = free_port()
    settings = load_settings(metrics_port=port, data_dir=tmp_path)
    metrics = EncoderMetrics(ready_file=tmp_path / "ready")
    with serving(settings, metrics):
        assert get(port, "/healthz") == (200, "ok\n")
        assert get(port, "/readyz") == (503, "no partitions\n")
        metrics.partitions_assigned([2, 0])
        assert get(port, "/readyz") == (200, "ready: partitions 0,2\n")
        assert (tmp_path / "ready").exists()
        metrics.partitions_revoked([0, 2])
        assert get(port, "/readyz")[0] == 503
        assert get(port, "/nowhere")[0] == 404
        with pytest.raises(ConfigError, match="BEAT_METRICS_PORT"):  # taken: said at start
            with serving(settings, EncoderMetrics()):
                pass
    with pytest.raises(ConfigError, match="BEAT_METRICS_PORT"):
        load_settings(metrics_port=70_000)


class StuckProcessing:
    """A worker's processing whose batch takes until it is let go: a loop that stops
    turning, as a hung call to a store or a deadlock would leave it."""

    def __init__(self) -> None:
        self.taken: list[Message] = []
        self.holding, self.let_go = threading.Event(), threading.Event()

    def take(self, records: list[Message]) -> None:
        self.taken += records

    def process_taken(self) -> None:
        if self.taken:
            self.holding.set()
            self.let_go.wait(60)
            self.taken = []

    def on_assign(self, partitions: list[TopicPartition]) -> None:
        pass

    on_revoke = on_lost = on_assign

    def backlog(self) -> bool:
        return False

    def between_batches(self) -> None:
        pass

    def summary(self) -> str:
        return f"{len(self.taken)} taken"

    def release(self) -> None:
        pass


def test_health_fails_while_the_loop_is_stuck_and_recovers(settings: Settings) -> None:
    port = free_port()
    settings = settings.model_copy(update={"metrics_port": port, "health_timeout_ms": 1_000})
    processing, metrics = StuckProcessing(), WorkerMetrics()
    runtime = WorkerRuntime(
        settings, processing, name="stuck worker", group=settings.stream_group,
        topics=[settings.events_topic], batching=Batching(0.1, 0.0, 100, 100), metrics=metrics,
    )
    thread = threading.Thread(target=runtime.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: metrics.ready, 30, "partitions assigned")
        time.sleep(1.5)  # idle longer than the timeout: an idle loop still turns
        assert get(port, "/healthz") == (200, "ok\n")
        raw = Producer(producer_config(settings))
        raw.produce(settings.events_topic, b"anything", b"u")
        raw.flush(10)
        assert processing.holding.wait(30)
        wait_for(lambda: get(port, "/healthz")[0] == 503, 10, "/healthz failing")
        status, text = get(port, "/healthz")
        assert status == 503 and "BEAT_HEALTH_TIMEOUT_MS=1000" in text, text
        assert get(port, "/readyz")[0] == 200  # stuck is not unready: it holds partitions
        processing.let_go.set()
        wait_for(lambda: get(port, "/healthz") == (200, "ok\n"), 10, "/healthz back")
    finally:
        processing.let_go.set()
        runtime.stop()
        thread.join(30)
    assert not thread.is_alive()


# Run with Feast imported first, which sets PROMETHEUS_MULTIPROC_DIR: prometheus_client's
# own metrics then share memory-mapped files per process and name.
FEAST_FIRST = """
import json, feast
from prometheus_client import generate_latest, values
assert values.ValueClass is not values.MutexValue, "feast no longer sets multiprocess mode"
from stream.observability import EncoderMetrics
first, second = EncoderMetrics(), EncoderMetrics()
first.users_encoded.labels("v1").inc(5)
second.users_encoded.labels("v1").inc(1)
second.written("v1", [50, 700, 400_000])
first.consumer_lag.labels("t", "0").set(3)
first.consumer_lag.remove("t", "0")
print(json.dumps([generate_latest(m.registry).decode() for m in (first, second)]))
"""


def test_each_workers_metrics_are_its_own_when_feast_was_imported_first() -> None:
    env = {k: v for k, v in os.environ.items() if "MULTIPROC" not in k.upper()}
    done = subprocess.run([sys.executable, "-W", "error", "-c", FEAST_FIRST], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = (
        {(s.name, frozenset(s.labels.items())): s.value
         for family in text_string_to_metric_families(text) for s in family.samples}
        for text in json.loads(done.stdout.splitlines()[-1])
    )
    assert total(first, "beat_users_encoded_total", model_version="v1") == 5
    assert total(second, "beat_users_encoded_total", model_version="v1") == 1 + 3
    assert total(first, "beat_consumer_lag") == 0 and not any(
        name == "beat_consumer_lag" for name, _ in first)  # fmt: skip

    def bucket(le: str) -> float:
        return total(second, "beat_freshness_seconds_bucket", model_version="v1", le=le)

    assert [bucket(le) for le in ("0.1", "0.5", "1.0", "300.0", "3600.0", "+Inf")] == [
        1, 1, 2, 2, 3, 3]
    assert total(second, "beat_freshness_seconds_count") == 3
    assert np.isclose(total(second, "beat_freshness_seconds_sum"), 400.75)


def test_counters_add_up_while_the_pipeline_runs(settings: Settings, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    init_model_dir(model_dir, "tiny", ACTIONS, [p for p in PROPERTIES if p], seed=3)
    stream_port, encoder_port = free_port(), free_port()
    while encoder_port == stream_port:
        encoder_port = free_port()
    users = [f"user-{i}" for i in range(12)]
    start = datetime.now(UTC) - timedelta(seconds=30)
    events = [event(u, n, start + timedelta(seconds=n)) for u in users for n in range(5)]
    garbage = 3  # undecodable messages, dead-lettered by the stream worker

    encoder = BeatEncoder.from_pretrained(model_dir, device="cpu")
    encoder_settings = settings.model_copy(update={"metrics_port": encoder_port})
    worker = EncoderWorker(encoder_settings, encoder, FeatureSink(encoder_settings))
    stream_settings = settings.model_copy(update={"metrics_port": stream_port})
    ready = tmp_path / "stream.ready"
    with stream_worker(stream_settings, tmp_path / "stream.log", ready) as process, \
            running(worker):
        wait_for(lambda: ready.exists() and worker.metrics.ready, 60, "both workers ready")
        for port in (stream_port, encoder_port):
            assert get(port, "/healthz") == (200, "ok\n")
            assert get(port, "/readyz")[0] == 200
        producer = EventProducer(settings)
        producer.send(events)
        producer.flush()
        raw = Producer(producer_config(settings))
        for i in range(garbage):
            raw.produce(settings.events_topic, b"not avro", users[i].encode())
        raw.flush(10)

        embeddings = AvroCodec("user_embedding", settings.embeddings_topic)

        def all_encoded(messages: list) -> bool:
            assert process.poll() is None, (tmp_path / "stream.log").read_text()[-3000:]
            final = {r["user_id"]: r["event_count"]
                     for r in (embeddings.decode(m.value()) for m in messages)}
            return all(final.get(u) == 5 for u in users)

        read_topic(settings, settings.embeddings_topic, until=all_encoded, timeout_s=90)

        sent = len(events) + garbage
        events_topic = settings.events_topic
        wait_for(lambda: total(scrape(stream_port), "beat_events_total",
                               topic=events_topic) == sent, 30, "every event counted in")
        published = len(read_topic(settings, settings.embeddings_topic))
        wait_for(lambda: total(scrape(encoder_port), "beat_users_encoded_total") == published,
                 30, "the users encoded equal to the embeddings published")
        # The lag comes every 5 s from librdkafka's statistics; all is read by now.
        wait_for(lambda: all(total(scrape(p), "beat_consumer_lag") == 0
                             and any(n == "beat_consumer_lag" for n, _ in scrape(p))
                             for p in (stream_port, encoder_port)), 30, "lag 0 reported")
        stream, encoded = scrape(stream_port), scrape(encoder_port)

    version = encoder.model_version
    windows = total(stream, "beat_windows_total")
    assert windows >= len(users)
    assert total(stream, "beat_events_total", topic=settings.repartition_topic) == 0
    assert total(stream, "beat_dead_letters_total", reason=UNDECODABLE) == garbage
    assert total(stream, "beat_batch_messages_sum") == sent
    assert total(stream, "beat_stage_seconds_count", stage="merge") >= 1
    assert total(stream, "process_resident_memory_bytes") > 0
    # Every window message the stream worker sent is read once by the encoder.
    assert total(encoded, "beat_window_messages_total", model_version=version) == windows
    assert total(encoded, "beat_users_encoded_total", model_version=version) == published
    assert total(encoded, "beat_freshness_seconds_count", model_version=version) == published
    # The events are 25-30 s old when sent: every embedding is fresh within a minute of them.
    assert total(encoded, "beat_freshness_seconds_bucket", model_version=version,
                 le="60.0") == published
    assert total(encoded, "beat_dead_letters_total") == 0
    assert total(encoded, "beat_stage_seconds_count", stage="encode") >= 1
    assert np.isclose(total(encoded, "beat_batch_messages_count"),
                      total(encoded, "beat_stage_seconds_count", stage="decode"))
