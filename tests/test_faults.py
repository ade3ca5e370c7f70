"""Broker faults: a stream worker waits for the broker only so long, honours SIGTERM within
seconds when the broker is frozen, and exits with an error (code 3) when the broker is gone,
so that a supervisor restarts it; so does an encoder worker stopped with a frozen broker;
`beat` commands against a closed port say so in a line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition
from test_encoder_worker import encoder_process
from test_pipeline import T0, event

from model import init_model_dir
from stream.broker import EmbeddedBroker, _free_port, consumer_config, ensure_topics
from stream.config import Settings
from stream.producer import EventProducer, produce
from stream.synthetic import SyntheticEvents

from conftest import (
    ACTIONS,
    REPO,
    WindowFeed,
    embedded_broker,
    read_topic,
    stream_worker,
    wait_for,
)

pytestmark = pytest.mark.skipif(
    bool(os.environ.get("KAFKA_BOOTSTRAP_SERVERS")), reason="freezes and kills a broker of its own"
)


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    with embedded_broker() as embedded:  # killed at the end, frozen or not
        yield embedded


@pytest.fixture
def bootstrap_servers(broker: EmbeddedBroker) -> str:
    """The settings fixture (conftest) on this test's own broker."""
    return broker.bootstrap_servers


def history(settings: Settings, events: int) -> None:
    start = datetime.now(UTC) - timedelta(days=30)
    population = SyntheticEvents(n_users=2_000, seed=1, origin=start)
    produce(settings, population.history(start, start + timedelta(days=30)), limit=events)


def exited_within(process: subprocess.Popen, seconds: float) -> float:
    """Seconds the process took to exit; fails if it is still running after `seconds`."""
    start = time.monotonic()
    try:
        process.wait(seconds)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker still ran {seconds:g}s later")
    return time.monotonic() - start


def test_sigterm_is_honoured_within_seconds_with_a_frozen_broker(
    broker: EmbeddedBroker, settings: Settings, tmp_path: Path
) -> None:
    settings = settings.model_copy(update={"max_batch_events": 20_000})  # many batches
    history(settings, 400_000)
    log = tmp_path / "stream.log"
    with stream_worker(settings, log) as worker:
        read_topic(settings, settings.windows_topic, until=lambda m: len(m) > 0)
        broker._process.send_signal(signal.SIGSTOP)  # mid-stream: batches still queued
        time.sleep(1.0)
        worker.send_signal(signal.SIGTERM)
        took = exited_within(worker, 15)
    assert took < 10, f"exit took {took:.1f}s"
    assert worker.returncode in (0, 3), log.read_text()[-2000:]


def test_sigterm_is_honoured_when_idle_with_a_frozen_broker(
    broker: EmbeddedBroker, settings: Settings, tmp_path: Path
) -> None:
    ready = tmp_path / "ready"
    with stream_worker(settings, tmp_path / "stream.log", ready) as worker:
        wait_for(ready.exists, 30, "partitions assigned")
        broker._process.send_signal(signal.SIGSTOP)
        time.sleep(1.0)
        worker.send_signal(signal.SIGTERM)
        took = exited_within(worker, 15)
    assert took < 10, f"exit took {took:.1f}s"


def test_an_encoder_stopped_with_a_frozen_broker_exits_within_its_grace_with_code_3(
    broker: EmbeddedBroker, settings: Settings, tmp_path: Path
) -> None:
    """It used to wait for the broker without end (flush() had no timeout: about 60 s, the
    message timeout) and then end in a traceback. Small batches over a backlog: the worker
    has a batch in hand, its embeddings unacknowledged, when the broker freezes."""
    init_model_dir(tmp_path / "model", "tiny", ACTIONS, ["web"], seed=2)
    settings = settings.model_copy(update={
        "model_dir": tmp_path / "model", "torch_threads": 1, "max_events": 64,
        "max_batch": 20, "read_ahead": 50, "stop_grace_ms": 2_000,
    })
    with WindowFeed(settings, users=600) as feed:
        feed.__exit__()  # a backlog, and no more
        for _ in range(30):
            feed.send_round()
    log, ready = tmp_path / "encoder.log", tmp_path / "ready"
    with encoder_process(settings, log, ready) as encoder:
        read_topic(settings, settings.embeddings_topic, until=lambda m: len(m) > 0, timeout_s=90)
        broker._process.send_signal(signal.SIGSTOP)
        time.sleep(1.0)
        encoder.send_signal(signal.SIGTERM)
        took = exited_within(encoder, 15)
    assert encoder.returncode == 3, log.read_text()[-2000:]
    assert took < 2 + 3, f"exit took {took:.1f}s"  # the grace, and a batch's encoding
    assert "(BEAT_STOP_GRACE_MS)" in log.read_text()
    assert "Traceback" not in log.read_text()


def test_a_worker_exits_with_an_error_once_the_broker_is_gone(
    broker: EmbeddedBroker, settings: Settings, tmp_path: Path
) -> None:
    settings = settings.model_copy(update={"broker_timeout_ms": 3_000})
    ready, log = tmp_path / "ready", tmp_path / "stream.log"
    with stream_worker(settings, log, ready) as worker:
        wait_for(ready.exists, 30, "partitions assigned")
        broker._process.kill()
        took = exited_within(worker, 30)
    assert worker.returncode == 3, log.read_text()[-2000:]
    assert "unreachable for over 3s (BEAT_BROKER_TIMEOUT_MS)" in log.read_text()
    assert took > 3


def test_after_a_broker_restart_the_worker_exits_and_its_restart_works(
    broker: EmbeddedBroker, settings: Settings, tmp_path: Path
) -> None:
    """Tansu keeps topics in memory: a restarted broker is an empty one, so the worker's
    idempotent producer and offsets no longer fit. It must say so and exit (code 3), and
    the restarted worker must window what the new broker holds."""
    settings = settings.model_copy(update={"broker_timeout_ms": 3_000})
    ready, log = tmp_path / "ready", tmp_path / "stream.log"
    producer = EventProducer(settings)
    producer.send([event("u1", 1, T0)])
    producer.flush()
    with stream_worker(settings, log, ready) as worker:
        read_topic(settings, settings.windows_topic, until=lambda m: len(m) > 0)
        broker._process.kill()
        broker._process.wait()
        broker.start()  # the same port
        ensure_topics(settings)
        producer = EventProducer(settings)
        producer.send([event("u1", 2, T0), event("u2", 1, T0)])
        producer.flush()
        exited_within(worker, 60)
    assert worker.returncode == 3, log.read_text()[-2000:]
    ready.unlink()
    with stream_worker(settings, log, ready):
        windows = read_topic(settings, settings.windows_topic, until=lambda m: len(m) >= 2)
    assert {m.key() for m in windows if m.value()} == {b"u1", b"u2"}


def test_a_fatal_client_error_ends_the_worker_at_once_with_code_3(
    broker: EmbeddedBroker, settings: Settings, tmp_path: Path
) -> None:
    """A real fatal error, provoked on Tansu: a restarted broker has forgotten every
    producer id and hands them out from 1 again, so a new producer gets the worker's. The
    worker's idempotent producer then sends its next window with a sequence number the
    broker does not expect for that id: OUT_OF_ORDER_SEQUENCE_NUMBER, which librdkafka
    makes fatal (no retry can tell a gap from a duplicate). The worker must not wait for
    BEAT_BROKER_TIMEOUT_MS nor end in a traceback: code 3 at once, its batch uncommitted."""
    ready, log = tmp_path / "ready", tmp_path / "stream.log"
    with stream_worker(settings, log, ready) as worker:
        wait_for(ready.exists, 30, "partitions assigned")  # its producer id is the first
        producer = EventProducer(settings)
        producer.send([event("u1", 1, T0)])
        producer.flush()
        read_topic(settings, settings.windows_topic, until=lambda m: len(m) > 0)
        broker._process.kill()
        broker._process.wait()
        broker.start()  # the same port, no state
        ensure_topics(settings)
        for n in range(3):  # producer ids 1, 2, 3 of the new broker: one is the worker's
            producer = EventProducer(settings)
            producer.send([event("u1", 2 + n, T0)])
            producer.flush()
        took = exited_within(worker, 30)
    text = log.read_text()
    assert worker.returncode == 3, text[-2000:]
    assert "fatal Kafka client error" in text and "OUT_OF_ORDER_SEQUENCE_NUMBER" in text, text
    assert "Traceback" not in text, text[-2000:]
    assert took < 20, f"{took:.1f}s: it waited for BEAT_BROKER_TIMEOUT_MS (60 s) instead"
    group = Consumer(consumer_config(settings, settings.stream_group))
    partitions = [TopicPartition(settings.events_topic, p) for p in range(settings.partitions)]
    assert all(tp.offset < 0 for tp in group.committed(partitions, timeout=10))
    group.close()


CLOSED_PORT_COMMANDS = [["topics"], ["stream"]]


@pytest.fixture(scope="module")
def against_a_closed_port() -> dict[str, tuple[int, str]]:
    """Each command's exit code and stderr against a closed port. They run side by side: each
    waits out the reachability check's 10 s, and waiting is all they do."""
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{_free_port()}"}
    processes = {
        " ".join(command): subprocess.Popen(
            [sys.executable, "-m", "stream.cli", *command], env=env, cwd=REPO,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for command in CLOSED_PORT_COMMANDS
    }
    done = {}
    for name, process in processes.items():
        try:
            _, stderr = process.communicate(timeout=60)
        finally:
            process.kill()
        done[name] = (process.returncode, stderr)
    return done


@pytest.mark.parametrize("command", CLOSED_PORT_COMMANDS)
def test_commands_against_a_closed_port_fail_in_one_line(
    command: list[str], against_a_closed_port: dict[str, tuple[int, str]]
) -> None:
    returncode, stderr = against_a_closed_port[" ".join(command)]
    assert returncode == 3
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cannot reach the Kafka broker at 127.0.0.1:")
    assert "check KAFKA_BOOTSTRAP_SERVERS" in lines[0]
