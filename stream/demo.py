"""`beat demo`: the whole platform on one machine for about a minute.

Starts the embedded broker, creates the topics, runs the producer, a stream worker and an
encoder worker as child processes, and watches the system the way an operator would:
by reading the topics and the consumer groups' committed offsets. Then it reads users back
through the Feast SDK. Every child is stopped on exit, Ctrl-C included.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient
from rich.console import Console
from rich.live import Live
from rich.table import Table

from stream.broker import EmbeddedBroker, client_config, ensure_topics, records_in
from stream.codec import AvroCodec
from stream.config import Settings

console = Console()


@dataclass
class Observed:
    """What the demo has seen of the system so far."""

    messages: dict[str, int] = field(default_factory=dict)  # per topic
    event_ms: list[int] = field(default_factory=lambda: [2**63, 0])  # first and last event's Kafka timestamp
    freshness_ms: list[float] = field(default_factory=list)
    users: dict[str, int] = field(default_factory=dict)  # user_id -> event_count last seen

    def rate_per_s(self, topic: str) -> float:
        """Rate at which the producer wrote, from the events' own Kafka timestamps."""
        span_s = (self.event_ms[1] - self.event_ms[0]) / 1000
        return self.messages.get(topic, 0) / span_s if span_s > 0 else 0.0

    def freshness(self) -> tuple[float, float]:
        if not self.freshness_ms:
            return (float("nan"), float("nan"))
        p50, p99 = np.percentile(self.freshness_ms, [50, 99])
        return float(p50), float(p99)


class Monitor:
    """Watches the system as an operator would: reads every topic from the start (counting
    messages, decoding embeddings for freshness) and compares the groups' committed
    offsets with what it has read. It counts messages rather than trusting high
    watermarks, which Tansu reports short (stream/broker.py)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = [settings.events_topic, settings.windows_topic, settings.embeddings_topic, settings.dead_letter_topic]
        # Not on the events' path: a longer fetch wait spares the broker and the CPU.
        self.consumer = Consumer(client_config(settings, **{"group.id": "beat-demo-monitor", "fetch.wait.max.ms": 200}))
        self.admin = AdminClient(client_config(settings))
        # Everything but the 768 floats, which the reader skips.
        self.codec = AvroCodec("user_embedding", settings.embeddings_topic, settings.schema_registry_url,
                               fields=("user_id", "event_count", "last_event_time", "updated_at"))
        self.observed = Observed()
        self.next_offset: dict[tuple[str, int], int] = {}
        metadata = self.consumer.list_topics(timeout=10).topics
        self.consumer.assign([TopicPartition(t, p, 0) for t in self.topics for p in metadata[t].partitions])

    def poll(self) -> Observed:
        while messages := self.consumer.consume(10_000, 0.05):
            for message in records_in(messages):
                topic = message.topic()
                self.next_offset[(topic, message.partition())] = message.offset() + 1
                if message.value() is None:  # a seal of beat.windows: an offset, not a window
                    continue
                self.observed.messages[topic] = self.observed.messages.get(topic, 0) + 1
                if topic == self.settings.events_topic:
                    timestamp = message.timestamp()[1]
                    self.observed.event_ms = [min(self.observed.event_ms[0], timestamp), max(self.observed.event_ms[1], timestamp)]
                elif topic == self.settings.embeddings_topic:
                    record = self.codec.decode(message.value())
                    # The embedding is produced after its row is in the online store, so its
                    # Kafka timestamp is when the row was readable there (or a little later).
                    written_ms = message.timestamp()[1]
                    newest_ms = record["last_event_time"].timestamp() * 1000
                    self.observed.freshness_ms.append(written_ms - newest_ms)
                    self.observed.users[record["user_id"]] = record["event_count"]
        return self.observed

    def lag(self, group: str, topic: str) -> int:
        """Messages of topic read here that group has not committed yet."""
        partitions = [TopicPartition(topic, p) for (t, p) in self.next_offset if t == topic]
        if not partitions:
            return 0
        committed = self.admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group, partitions)])
        return sum(
            self.next_offset[(topic, tp.partition)] - max(tp.offset, 0)
            for tp in committed[group].result(10).topic_partitions
        )

    def close(self) -> None:
        self.consumer.close()


def _progress_table(observed: Observed, settings: Settings, phase: str, elapsed_s: float) -> Table:
    m = observed.messages
    events = m.get(settings.events_topic, 0)
    p50, p99 = observed.freshness()
    table = Table(title=f"beat demo: {phase} ({elapsed_s:.0f}s)", show_header=False, min_width=44)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("events in", f"{events:,}")
    table.add_row("events/s", f"{observed.rate_per_s(settings.events_topic):,.0f}")
    table.add_row("windows emitted", f"{m.get(settings.windows_topic, 0):,}")
    table.add_row("users encoded", f"{m.get(settings.embeddings_topic, 0):,}")
    table.add_row("distinct users in Feast", f"{len(observed.users):,}")
    table.add_row("dead letters", f"{m.get(settings.dead_letter_topic, 0):,}")
    table.add_row("freshness p50 / p99", f"{p50:,.0f} / {p99:,.0f} ms" if observed.freshness_ms else "-")
    return table


def _spawn(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    log = open(log_path, "w")
    # Own sessions: a Ctrl-C reaches only the demo, which then stops the children in order.
    return subprocess.Popen([sys.executable, "-m", "stream.cli", *args], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _stop(process: subprocess.Popen, timeout_s: float = 20.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _raise_interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def run_demo(settings: Settings, duration_s: float, rate_per_s: float, users: int, model_dir: Path) -> dict:
    """Run the demo; returns the summary it prints (also written to data/demo/summary.json)."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    workdir = settings.data_dir / "demo"
    workdir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        try:
            return _run(stack, settings, duration_s, rate_per_s, users, model_dir, workdir)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted: stopping workers and broker[/yellow]")
            return {"interrupted": True}


def _run(stack: ExitStack, settings: Settings, duration_s: float, rate_per_s: float, users: int,
         model_dir: Path, workdir: Path) -> dict:
    if not settings.bootstrap_servers:
        broker = stack.enter_context(EmbeddedBroker())
        settings = settings.model_copy(update={"bootstrap_servers": broker.bootstrap_servers})
        console.print(f"embedded Tansu broker on {broker.bootstrap_servers}")
    ensure_topics(settings)
    # Five processes share this machine's cores: one torch thread unless told otherwise.
    worker_settings = settings.model_copy(update={"model_dir": model_dir, "torch_threads": settings.torch_threads or 1})
    env = {**os.environ, **worker_settings.to_env()}

    ready = {name: workdir / f"{name}.ready" for name in ("stream", "encode")}
    for path in ready.values():
        path.unlink(missing_ok=True)
    workers = {
        "stream worker": _spawn(["stream", "--ready-file", str(ready["stream"])], env, workdir / "stream-worker.log"),
        "encoder worker": _spawn(["encode", "--ready-file", str(ready["encode"])], env, workdir / "encoder-worker.log"),
    }
    for process in workers.values():
        stack.callback(_stop, process)
    monitor = Monitor(settings)
    stack.callback(monitor.close)

    dashboard = Dashboard(monitor, settings, workers)
    with Live(console=console, refresh_per_second=2) as dashboard.live:
        dashboard.wait("starting workers", lambda: all(p.exists() for p in ready.values()), timeout_s=120)
        producer = _spawn(["produce", "--synthetic", "--users", str(users), "--rate", str(rate_per_s),
                           "--duration", str(duration_s)], env, workdir / "producer.log")
        stack.callback(_stop, producer)
        dashboard.wait("producing", lambda: producer.poll() is not None, timeout_s=duration_s + 60)
        if producer.returncode:
            raise SystemExit(f"producer exited with code {producer.returncode}; see {workdir / 'producer.log'}")
        produced = time.monotonic()
        dashboard.wait("draining", lambda: monitor.lag(settings.stream_group, settings.events_topic) == 0
                       and monitor.lag(settings.encoder_group, settings.windows_topic) == 0,
                       timeout_s=max(60, duration_s))
        drain_s = time.monotonic() - produced
        observed = monitor.poll()
    for process in workers.values():
        _stop(process)

    summary = _summary(observed, settings)
    summary["drain_s"] = round(drain_s, 1)
    summary["read_back"] = _read_back(settings, list(observed.users)[:3])
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print_json(data=summary)
    console.print(f"logs and summary in {workdir}")
    return summary


@dataclass
class Dashboard:
    """The live progress table, refreshed while waiting for each phase of the demo."""

    monitor: Monitor
    settings: Settings
    workers: dict[str, subprocess.Popen]
    live: Live | None = None
    start: float = field(default_factory=time.monotonic)

    def wait(self, phase: str, done: Callable[[], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            for name, process in self.workers.items():
                if process.poll() is not None:
                    raise SystemExit(f"{name} exited with code {process.returncode}; see {self.settings.data_dir / 'demo'}")
            if time.monotonic() > deadline:
                raise SystemExit(f"demo: '{phase}' did not finish within {timeout_s:.0f}s")
            self.refresh(phase)
            time.sleep(0.5)
        self.refresh(phase)

    def refresh(self, phase: str) -> None:
        self.live.update(_progress_table(self.monitor.poll(), self.settings, phase, time.monotonic() - self.start))


def _summary(observed: Observed, settings: Settings) -> dict:
    p50, p99 = observed.freshness()
    o = observed.messages
    return {
        "events": o[settings.events_topic],
        "events_per_s": round(observed.rate_per_s(settings.events_topic), 1),
        "windows_emitted": o[settings.windows_topic],
        "users_encoded": o[settings.embeddings_topic],
        "distinct_users": len(observed.users),
        "dead_letters": o.get(settings.dead_letter_topic, 0),
        "coalescing_ratio": round(o[settings.events_topic] / max(1, o[settings.windows_topic]), 2),
        "freshness_p50_ms": round(p50, 1),
        "freshness_p99_ms": round(p99, 1),
    }


def _read_back(settings: Settings, user_ids: list[str]) -> list[dict]:
    """Read users through the Feast SDK, as another team would."""
    from stream.feast_sink import FeatureSink

    values = FeatureSink(settings).read(user_ids)
    rows = []
    for i, user_id in enumerate(user_ids):
        embedding = values["embedding"][i]
        rows.append({
            "user_id": user_id,
            "model_version": values["model_version"][i],
            "event_count": values["event_count"][i],
            "embedding_norm": None if embedding is None else round(float(np.linalg.norm(embedding)), 4),
        })
    return rows
