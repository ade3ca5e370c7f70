"""`beat demo`: the whole platform on one machine for about a minute.

Starts the embedded broker, creates the topics, runs the producer, a stream worker and an
encoder worker as child processes, and watches the system the way an operator would:
through the topics' offsets and the beat.embeddings stream. Then it reads users back
through the Feast SDK. Every child is stopped on exit, Ctrl-C included.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient
from rich.console import Console
from rich.live import Live
from rich.table import Table

from stream.broker import EmbeddedBroker, client_config, ensure_topics
from stream.codec import AvroCodec
from stream.config import Settings

console = Console()


@dataclass
class Observed:
    """What the demo has seen of the system so far."""

    offsets: dict[str, int] = field(default_factory=dict)
    freshness_ms: list[float] = field(default_factory=list)
    users: dict[str, int] = field(default_factory=dict)  # user_id -> event_count last seen

    def freshness(self) -> tuple[float, float]:
        if not self.freshness_ms:
            return (float("nan"), float("nan"))
        p50, p99 = np.percentile(self.freshness_ms, [50, 99])
        return float(p50), float(p99)


class Monitor:
    """Reads topic end offsets and consumes beat.embeddings for freshness."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = [settings.events_topic, settings.windows_topic, settings.embeddings_topic, settings.dead_letter_topic]
        self.consumer = Consumer(client_config(settings, **{"group.id": "beat-demo-monitor", "fetch.wait.max.ms": 10}))
        self.admin = AdminClient(client_config(settings))
        self.codec = AvroCodec("user_embedding", settings.embeddings_topic, settings.schema_registry_url)
        self.observed = Observed()
        parts = self.consumer.list_topics(timeout=10).topics[settings.embeddings_topic].partitions
        self.consumer.assign([TopicPartition(settings.embeddings_topic, p, 0) for p in parts])

    def poll(self) -> Observed:
        for topic in self.topics:
            self.observed.offsets[topic] = self._end_offset(topic)
        while messages := self.consumer.consume(5000, 0.05):
            for message in messages:
                if message.error():
                    continue
                record = self.codec.decode(message.value())
                lag = record["updated_at"] - record["last_event_time"]
                self.observed.freshness_ms.append(lag.total_seconds() * 1000)
                self.observed.users[record["user_id"]] = record["event_count"]
        return self.observed

    def _end_offset(self, topic: str) -> int:
        parts = self.consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return sum(self.consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=5)[1] for p in parts)

    def lag(self, group: str, topic: str) -> int:
        parts = self.consumer.list_topics(topic, timeout=10).topics[topic].partitions
        committed = self.admin.list_consumer_group_offsets(
            [_group_request(group, [TopicPartition(topic, p) for p in parts])]
        )[group].result(10)
        return sum(
            self.consumer.get_watermark_offsets(TopicPartition(topic, tp.partition), timeout=5)[1] - max(tp.offset, 0)
            for tp in committed.topic_partitions
        )

    def group_ready(self, group: str) -> bool:
        try:
            description = self.admin.describe_consumer_groups([group])[group].result(10)
        except Exception:  # the group does not exist yet
            return False
        return any(member.assignment.topic_partitions for member in description.members)

    def close(self) -> None:
        self.consumer.close()


def _group_request(group: str, partitions: list[TopicPartition]):  # noqa: ANN202
    from confluent_kafka import ConsumerGroupTopicPartitions

    return ConsumerGroupTopicPartitions(group, partitions)


def _progress_table(observed: Observed, elapsed_s: float, settings: Settings, phase: str) -> Table:
    o = observed.offsets
    events = o.get(settings.events_topic, 0)
    p50, p99 = observed.freshness()
    table = Table(title=f"beat demo: {phase}, {elapsed_s:.0f}s", show_header=True)
    for column in ("events in", "events/s", "windows emitted", "users encoded", "distinct users", "dead letters", "freshness p50", "freshness p99"):
        table.add_column(column, justify="right")
    table.add_row(
        f"{events:,}", f"{events / max(elapsed_s, 1e-9):,.0f}", f"{o.get(settings.windows_topic, 0):,}",
        f"{o.get(settings.embeddings_topic, 0):,}", f"{len(observed.users):,}", f"{o.get(settings.dead_letter_topic, 0):,}",
        f"{p50:,.0f} ms", f"{p99:,.0f} ms",
    )
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
    env = {**os.environ, **settings.model_copy(update={"model_dir": model_dir}).to_env()}

    workers = {
        "stream worker": _spawn(["stream"], env, workdir / "stream-worker.log"),
        "encoder worker": _spawn(["encode"], env, workdir / "encoder-worker.log"),
    }
    for process in workers.values():
        stack.callback(_stop, process)
    monitor = Monitor(settings)
    stack.callback(monitor.close)

    start = time.monotonic()
    with Live(console=console, refresh_per_second=2) as live:
        _wait(live, monitor, settings, start, "starting workers", lambda: all(
            monitor.group_ready(g) for g in (settings.stream_group, settings.encoder_group)), workers, timeout_s=120)
        producer = _spawn(["produce", "--synthetic", "--users", str(users), "--rate", str(rate_per_s),
                           "--duration", str(duration_s)], env, workdir / "producer.log")
        stack.callback(_stop, producer)
        produce_start = time.monotonic()
        _wait(live, monitor, settings, start, "producing", lambda: producer.poll() is not None, workers,
              timeout_s=duration_s + 60)
        produce_s = time.monotonic() - produce_start
        _wait(live, monitor, settings, start, "draining", lambda: monitor.lag(settings.stream_group, settings.events_topic) == 0
              and monitor.lag(settings.encoder_group, settings.windows_topic) == 0, workers, timeout_s=60)
        observed = monitor.poll()
    for process in workers.values():
        _stop(process)

    summary = _summary(observed, settings, produce_s)
    summary["read_back"] = _read_back(settings, list(observed.users)[:3])
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print_json(data=summary)
    console.print(f"logs and summary in {workdir}")
    return summary


def _wait(live: Live, monitor: Monitor, settings: Settings, start: float, phase: str, done, workers: dict,
          timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        for name, process in workers.items():
            if process.poll() is not None:
                raise SystemExit(f"{name} exited with code {process.returncode}; see {settings.data_dir / 'demo'}")
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: '{phase}' did not finish within {timeout_s:.0f}s")
        live.update(_progress_table(monitor.poll(), time.monotonic() - start, settings, phase))
        time.sleep(0.5)


def _summary(observed: Observed, settings: Settings, produce_s: float) -> dict:
    p50, p99 = observed.freshness()
    o = observed.offsets
    return {
        "events": o[settings.events_topic],
        "events_per_s": round(o[settings.events_topic] / produce_s, 1),
        "windows_emitted": o[settings.windows_topic],
        "users_encoded": o[settings.embeddings_topic],
        "distinct_users": len(observed.users),
        "dead_letters": o[settings.dead_letter_topic],
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
